//! The HTTP side door: Prometheus `/metrics`, liveness `/healthz`, readiness `/readyz`
//! (ready = this node knows a leader and has applied at least one entry of its term).

use std::sync::OnceLock;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use openraft::async_runtime::watch::WatchReceiver;

use crate::raft::RaftNode;

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Namespaces that get their own label value (`metrics_namespaces`); the first node started in
/// a process sets it.
static LABELLED: OnceLock<std::collections::HashSet<String>> = OnceLock::new();

/// Sets which namespaces get their own metric series.
pub fn label_namespaces(names: &[String]) {
    let _ = LABELLED.set(names.iter().cloned().collect());
}

/// The allow-listed namespaces.
pub fn labelled_namespaces() -> impl Iterator<Item = &'static String> {
    LABELLED.get().into_iter().flatten()
}

/// The `namespace` label value for `ns`: itself when allow-listed, else `_other`, so a tenant
/// creating namespaces cannot create metric series.
pub fn namespace_label(ns: &str) -> String {
    match LABELLED.get() {
        Some(set) if set.contains(ns) => ns.to_string(),
        _ => "_other".to_string(),
    }
}

/// The process-wide metrics recorder (installed once; in-process test clusters share it).
pub fn prometheus() -> &'static PrometheusHandle {
    PROMETHEUS.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (embedding); then ours only renders.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

pub fn router(node: RaftNode) -> Router {
    Router::new()
        .route("/metrics", get(|| async { prometheus().render() }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(node)
}

async fn readyz(State(node): State<RaftNode>) -> (StatusCode, String) {
    let m = node.raft.metrics().borrow_watched().clone();
    match m.current_leader {
        Some(leader) if m.last_applied.is_some() => (StatusCode::OK, format!("ready: leader {leader}\n")),
        Some(_) => (StatusCode::SERVICE_UNAVAILABLE, "not ready: nothing applied yet\n".into()),
        None => (StatusCode::SERVICE_UNAVAILABLE, "not ready: no leader known\n".into()),
    }
}

/// Publishes Raft state as gauges whenever it changes.
pub async fn export_raft_metrics(node: RaftNode) {
    let mut rx = node.raft.metrics();
    loop {
        {
            let m = rx.borrow_watched().clone();
            metrics::gauge!("engram_raft_term").set(m.current_term as f64);
            metrics::gauge!("engram_raft_is_leader").set(if m.current_leader == Some(m.id) { 1.0 } else { 0.0 });
            metrics::gauge!("engram_raft_last_log_index").set(m.last_log_index.unwrap_or(0) as f64);
            metrics::gauge!("engram_raft_applied_index").set(m.last_applied.map(|l| l.index).unwrap_or(0) as f64);
            metrics::gauge!("engram_raft_snapshot_index").set(m.snapshot.map(|l| l.index).unwrap_or(0) as f64);
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}
