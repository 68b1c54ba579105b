//! Logging and opt-in OpenTelemetry traces.
//!
//! [`init`] installs the process's subscriber: the log (text or JSON, filtered by
//! `ENGRAM_LOG`) and, with `--otlp-endpoint`, an OTLP/gRPC span exporter fed by
//! `tracing-opentelemetry`. Only spans from Engram's own code are exported (not tonic's, h2's
//! or openraft's). Without an endpoint nothing here creates a span, so the log and the hot
//! paths are as they were.
//!
//! A traced write is one trace across tasks and nodes:
//!
//! ```text
//! engram.v1.MemoryService/Put      the RPC (server span; continues a client's `traceparent`)
//! └─ put                           the handler (namespace, …)
//!    └─ raft.write                 proposing, replicating and waiting for apply
//!       ├─ raft.forward            a follower sends it to the leader (traceparent travels)
//!       │  └─ engram.v1.RaftService/ForwardWrite   on the leader
//!       │     └─ raft.write …
//!       └─ apply                   the state machine's batch (links any other traced writes in it)
//!          └─ vector.update        the batch's vector changes into the shards
//! engram.v1.MemoryService/Search
//! └─ search
//!    ├─ read_barrier               ReadIndex or lease, then waiting for the local apply
//!    └─ shard.search               FAISS (or exact) search of one namespace, on the blocking pool
//! ```
//!
//! `apply` runs in the state machine's task, far from the proposer. The proposer files its
//! `raft.write` span under a fingerprint of the command ([`Proposal`]); `apply` computes the
//! same fingerprint for each entry proposed on this node and takes the span as its parent.
//! Entries a follower applies for another node's proposals get no spans: they would be
//! parentless traces, one per write per node.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::task::{Context, Poll};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use serde::{Deserialize, Serialize};
use tower::{Layer, Service};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer as _;

use crate::config::LogFormat;
use crate::raft::Command;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether this process exports traces (an `--otlp-endpoint` was given).
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Where and how much to trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceSettings {
    /// The collector's OTLP/gRPC endpoint, `http://host:port` (plaintext, like etcd's: run a
    /// collector or agent next to the node).
    pub otlp_endpoint: String,
    /// Fraction of new traces kept, 0..=1. A request that arrives with a sampled
    /// `traceparent` is always traced; one that arrives unsampled never is.
    pub sample_ratio: f64,
}

impl TraceSettings {
    pub fn validate(&self) -> Result<(), String> {
        let rest = self.otlp_endpoint.strip_prefix("http://").ok_or_else(|| {
            format!(
                "otlp_endpoint {:?} must be http://host:port (OTLP/gRPC without TLS, to a collector beside the node)",
                self.otlp_endpoint
            )
        })?;
        let authority = rest.trim_end_matches('/');
        let port = authority.rsplit_once(':').map(|(host, port)| (host, port.parse::<u16>()));
        if !matches!(port, Some((host, Ok(_))) if !host.is_empty() && !host.contains('/')) {
            return Err(format!("otlp_endpoint {:?} must be http://host:port", self.otlp_endpoint));
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(format!("trace_sample_ratio must be within 0..=1, not {}", self.sample_ratio));
        }
        Ok(())
    }
}

/// Flushes and stops the exporter when the node stops ([`Telemetry::shutdown`]).
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends the spans still queued, waiting at most a few seconds for the collector.
    pub async fn shutdown(self) {
        if let Some(p) = self.provider {
            let done = tokio::task::spawn_blocking(move || p.shutdown_with_timeout(std::time::Duration::from_secs(5)));
            if let Ok(Err(e)) = done.await {
                eprintln!("engram: flushing traces: {e}");
            }
        }
    }
}

/// Installs the log and, with `trace`, the OTLP exporter. Must run inside the Tokio runtime
/// (the exporter's gRPC channel lives on it).
pub fn init(
    format: LogFormat,
    filter: tracing_subscriber::EnvFilter,
    trace: Option<&TraceSettings>,
    node_id: u64,
) -> Result<Telemetry, String> {
    type Boxed = Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>;
    let log: Boxed = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer().json().with_filter(filter).boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer().with_filter(filter).boxed(),
    };
    let Some(t) = trace else {
        tracing_subscriber::registry().with(log).init();
        return Ok(Telemetry { provider: None });
    };
    t.validate()?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(t.otlp_endpoint.clone())
        .with_timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| format!("OTLP exporter for {}: {e}", t.otlp_endpoint))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("engram")
        .with_attribute(opentelemetry::KeyValue::new("service.instance.id", format!("node-{node_id}")))
        .with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(t.sample_ratio))))
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("engram");
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(tracing_subscriber::filter::Targets::new().with_target("engram", tracing::Level::INFO))
        .boxed();
    tracing_subscriber::registry().with(log).with(otel).init();
    ENABLED.store(true, Ordering::Relaxed);
    Ok(Telemetry { provider: Some(provider) })
}

/// An info span under target `engram::trace`, or [`Span::none`] when tracing is off. With
/// `parent: p`, the span is a child of `p`, and none at all when `p` is none (it would start
/// a trace of its own).
#[macro_export]
macro_rules! trace_span {
    (parent: $parent:expr, $($rest:tt)+) => {{
        let parent: &::tracing::Span = $parent;
        if $crate::telemetry::enabled() && !parent.is_none() {
            ::tracing::info_span!(target: "engram::trace", parent: parent, $($rest)+)
        } else {
            ::tracing::Span::none()
        }
    }};
    ($($rest:tt)+) => {{
        if $crate::telemetry::enabled() && !::tracing::Span::current().is_none() {
            ::tracing::info_span!(target: "engram::trace", $($rest)+)
        } else {
            ::tracing::Span::none()
        }
    }};
}

// ---- write proposals → apply ------------------------------------------------------------

/// A filed proposal: its token (so only its own [`Proposal`] removes it) and span.
type Filed = (u64, Span);

/// `raft.write` spans waiting for their entry's apply, by command fingerprint.
static PROPOSALS: LazyLock<Mutex<HashMap<[u8; 32], Filed>>> = LazyLock::new(Default::default);
static NEXT_PROPOSAL: AtomicU64 = AtomicU64::new(1);

fn fingerprint(cmd: &Command) -> Option<[u8; 32]> {
    bincode::serialize(cmd).ok().map(|b| *blake3::hash(&b).as_bytes())
}

/// A proposal's `raft.write` span, filed for `apply` until dropped.
pub struct Proposal {
    filed: Option<([u8; 32], u64)>,
}

impl Proposal {
    /// Files `span` (the current `raft.write`) under `cmd`'s fingerprint. Nothing when
    /// tracing is off or the span is not recorded.
    pub fn file(cmd: &Command, span: &Span) -> Proposal {
        if !enabled() || span.is_none() {
            return Proposal { filed: None };
        }
        let Some(fp) = fingerprint(cmd) else { return Proposal { filed: None } };
        let token = NEXT_PROPOSAL.fetch_add(1, Ordering::Relaxed);
        let mut map = PROPOSALS.lock().unwrap_or_else(|p| p.into_inner());
        // Two identical commands at once (same ms, same op) share one parent; the first wins.
        let mine = !map.contains_key(&fp);
        if mine {
            map.insert(fp, (token, span.clone()));
        }
        Proposal { filed: mine.then_some((fp, token)) }
    }
}

impl Drop for Proposal {
    fn drop(&mut self) {
        if let Some((fp, token)) = self.filed {
            let mut map = PROPOSALS.lock().unwrap_or_else(|p| p.into_inner());
            if map.get(&fp).is_some_and(|(t, _)| *t == token) {
                map.remove(&fp);
            }
        }
    }
}

/// The `apply` span of a batch: a child of the first traced proposal among `proposed_here`
/// (the commands of the batch's entries proposed on this node), linked to the others; none
/// when no entry of the batch is traced.
pub fn apply_span<'a>(proposed_here: impl Iterator<Item = &'a Command>, entries: usize, last_index: u64) -> Span {
    if !enabled() || PROPOSALS.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
        return Span::none();
    }
    let parents: Vec<Span> = {
        let fps: Vec<[u8; 32]> = proposed_here.filter_map(fingerprint).collect();
        if fps.is_empty() {
            return Span::none();
        }
        let map = PROPOSALS.lock().unwrap_or_else(|p| p.into_inner());
        fps.iter().filter_map(|fp| map.get(fp).map(|(_, s)| s.clone())).collect()
    };
    let Some(first) = parents.first() else { return Span::none() };
    let span = trace_span!(parent: first, "apply", entries, last_index);
    for other in &parents[1..] {
        span.add_link(other.context().span().span_context().clone());
    }
    span
}

// ---- context across the wire ------------------------------------------------------------

struct HeaderExtract<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtract<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct MetadataInject<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInject<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// Writes the current span's context into an outgoing request's metadata (`traceparent`).
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    if !enabled() {
        return;
    }
    let cx = Span::current().context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut MetadataInject(metadata));
    }
}

// ---- the RPC span -----------------------------------------------------------------------

/// A tower layer that wraps each gRPC request in a server span named after its method,
/// continuing the caller's W3C `traceparent` when it sends one. `start_traces: false` (the
/// peer listener) traces only requests that continue a trace, never heartbeats on their own.
#[derive(Clone, Copy)]
pub struct RpcTraceLayer {
    start_traces: bool,
}

impl RpcTraceLayer {
    pub fn api() -> Self {
        RpcTraceLayer { start_traces: true }
    }
    pub fn peer() -> Self {
        RpcTraceLayer { start_traces: false }
    }
}

impl<S> Layer<S> for RpcTraceLayer {
    type Service = RpcTrace<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcTrace { inner, start_traces: self.start_traces }
    }
}

#[derive(Clone)]
pub struct RpcTrace<S> {
    inner: S,
    start_traces: bool,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Paths never traced: load balancers poll health, tools walk reflection.
const UNTRACED: [&str; 3] =
    ["/grpc.health.v1.Health/", "/grpc.reflection.v1.ServerReflection/", "/grpc.reflection.v1alpha.ServerReflection/"];

fn rpc_span<B>(req: &http::Request<B>, start_traces: bool) -> Span {
    if !enabled() {
        return Span::none();
    }
    let path = req.uri().path();
    if UNTRACED.iter().any(|p| path.starts_with(p)) {
        return Span::none();
    }
    let parent = TraceContextPropagator::new().extract(&HeaderExtract(req.headers()));
    let continues = parent.span().span_context().is_valid();
    if !continues && !start_traces {
        return Span::none();
    }
    let name = path.trim_start_matches('/');
    let (service, method) = name.split_once('/').unwrap_or((name, ""));
    let span = tracing::info_span!(
        target: "engram::trace",
        parent: None,
        "rpc",
        otel.name = name,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = tracing::field::Empty,
    );
    if continues {
        let _ = span.set_parent(parent);
    }
    span
}

impl<S, B, RB> Service<http::Request<B>> for RpcTrace<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    RB: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let span = rpc_span(&req, self.start_traces);
        if span.is_none() {
            return Box::pin(self.inner.call(req));
        }
        let fut = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        let record = span.clone();
        Box::pin(tracing::Instrument::instrument(
            async move {
                let res = fut.await;
                // Errors answered at once travel as a trailers-only response: the status is a
                // header. Streamed answers carry it in trailers, after this span ends.
                if let Ok(resp) = &res {
                    if let Some(code) =
                        resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()?.parse::<i32>().ok())
                    {
                        record.record("rpc.grpc.status_code", code);
                        if code != 0 {
                            record.record("otel.status_code", "ERROR");
                        }
                    }
                }
                res
            },
            span,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(endpoint: &str, ratio: f64) -> TraceSettings {
        TraceSettings { otlp_endpoint: endpoint.into(), sample_ratio: ratio }
    }

    #[test]
    fn endpoints_and_ratios_are_checked() {
        assert!(settings("http://127.0.0.1:4317", 1.0).validate().is_ok());
        assert!(settings("http://collector:4317/", 0.0).validate().is_ok());
        for bad in ["127.0.0.1:4317", "https://c:4317", "http://:4317", "http://c", "http://c:x", "http://c:99999", ""]
        {
            assert!(settings(bad, 1.0).validate().is_err(), "{bad}");
        }
        for bad in [-0.1, 1.5, f64::NAN, f64::INFINITY] {
            assert!(settings("http://c:4317", bad).validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn nothing_is_traced_or_filed_while_tracing_is_off() {
        assert!(!enabled());
        let cmd = Command::system(crate::raft::Op::DeleteNamespace { namespace: "n".into() });
        let p = Proposal::file(&cmd, &Span::current());
        assert!(p.filed.is_none());
        assert!(apply_span([&cmd].into_iter(), 1, 1).is_none());
        assert!(trace_span!("x").is_none());
        let req = http::Request::builder().uri("/engram.v1.MemoryService/Put").body(()).unwrap();
        assert!(rpc_span(&req, true).is_none());
    }
}
