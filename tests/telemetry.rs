//! OpenTelemetry traces from real `engram` processes into a real OTLP/gRPC receiver (the
//! collector's TraceService, served here): a put, a search and a put sent to a follower each
//! arrive as one trace with the spans src/telemetry.rs documents, continuing the client's
//! `traceparent`.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::process::EngramProcess;
use engram::client::{Client, Metric};
use engram::proto as pb;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

const NS: &str = "traced/ns";

fn free_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    format!("127.0.0.1:{port}")
}

#[derive(Debug, Clone)]
struct Got {
    node: String,
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
    kind: i32,
    attrs: HashMap<String, String>,
}

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Got>>>,
}

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut out = self.spans.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let node = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.instance.id")
                .map(|kv| text(&kv.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push(Got {
                        node: node.clone(),
                        trace_id: hex::encode(&s.trace_id),
                        span_id: hex::encode(&s.span_id),
                        parent: hex::encode(&s.parent_span_id),
                        name: s.name.clone(),
                        kind: s.kind,
                        attrs: s.attributes.iter().map(|kv| (kv.key.clone(), text(&kv.value))).collect(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// The spans of one trace, by name; each name must occur once.
fn by_name(trace: &[Got]) -> HashMap<String, Got> {
    let mut m = HashMap::new();
    for s in trace {
        assert!(m.insert(s.name.clone(), s.clone()).is_none(), "span {} twice in {trace:#?}", s.name);
    }
    m
}

fn child(spans: &HashMap<String, Got>, parent: &str, name: &str) {
    let (p, c) = (&spans[parent], spans.get(name).unwrap_or_else(|| panic!("no span {name} in {spans:#?}")));
    assert_eq!(c.parent, p.span_id, "{name} is not a child of {parent}: {spans:#?}");
}

fn traceparent(trace_id: &str, span_id: &str) -> tonic::metadata::MetadataValue<tonic::metadata::Ascii> {
    format!("00-{trace_id}-{span_id}-01").parse().unwrap()
}

fn put_request(id: &str, trace_id: &str, span_id: &str) -> tonic::Request<pb::PutRequest> {
    let mut r = tonic::Request::new(pb::PutRequest {
        namespace: NS.into(),
        memory: Some(pb::MemoryInput {
            id: id.into(),
            text: format!("memory {id}"),
            embedding: vec![0.1, 0.2, 0.3, 0.4],
            ..Default::default()
        }),
        ..Default::default()
    });
    r.metadata_mut().insert("traceparent", traceparent(trace_id, span_id));
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_put_a_search_and_a_forwarded_put_arrive_as_traces() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let dir = tempfile::tempdir().unwrap();
    let mut nodes: Vec<EngramProcess> = (1..=3)
        .map(|id| EngramProcess::new(id, free_addr(), free_addr(), free_addr(), dir.path().join(format!("n{id}"))))
        .collect();
    for n in nodes.iter_mut() {
        n.security = vec!["--insecure".into(), "--otlp-endpoint".into(), otlp.clone()];
        n.start_with_env(Path::new(env!("CARGO_BIN_EXE_engram")), 100, &[("OTEL_BSP_SCHEDULE_DELAY", "100".into())]);
    }
    let members: Vec<pb::NodeInfo> =
        nodes.iter().map(|n| pb::NodeInfo { id: n.id, raft_addr: n.raft.clone(), api_addr: n.api.clone() }).collect();
    let mut ok = false;
    for _ in 0..200 {
        let r = Client::new([nodes[0].api.clone()]).unwrap().admin().init_cluster(members.clone()).await;
        // An earlier attempt may have initialized it and lost its answer to a client timeout.
        if r.as_ref().is_ok() || r.as_ref().is_err_and(common::process::initialized) {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "cluster init failed");
    let sdk = Client::new(nodes.iter().map(|n| n.api.clone())).unwrap();
    let mut leader = 0;
    for _ in 0..200 {
        leader = sdk.admin().status().await.map(|s| s.leader_id).unwrap_or(0);
        if leader != 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_ne!(leader, 0, "no leader");
    sdk.create_namespace(NS, 4, Metric::Cosine).await.unwrap();
    let leader_api = nodes[leader as usize - 1].api.clone();
    let follower = nodes.iter().find(|n| n.id != leader).unwrap();
    let follower_name = format!("node-{}", follower.id);
    let leader_name = format!("node-{leader}");
    let connect = |addr: String| async move {
        pb::memory_service_client::MemoryServiceClient::connect(format!("http://{addr}")).await.unwrap()
    };

    // The client's own trace ids: the node continues them.
    let new_trace = || uuid::Uuid::now_v7().simple().to_string();
    let (put_trace, search_trace, fwd_trace) = (new_trace(), new_trace(), new_trace());
    let client_span = "00f067aa0ba902b7";
    let mut c = connect(leader_api).await;
    c.put(put_request("m1", &put_trace, client_span)).await.unwrap();
    let mut search = tonic::Request::new(pb::SearchRequest {
        namespace: NS.into(),
        vector: vec![0.1, 0.2, 0.3, 0.4],
        k: 3,
        ..Default::default()
    });
    search.metadata_mut().insert("traceparent", traceparent(&search_trace, client_span));
    let hits = c.search(search).await.unwrap().into_inner().hits;
    assert_eq!(hits.len(), 1);
    connect(follower.api.clone()).await.put(put_request("m2", &fwd_trace, client_span)).await.unwrap();

    // Wait for the batches (the exporters send every 100 ms).
    let wanted = [(put_trace.clone(), 5), (search_trace.clone(), 4), (fwd_trace.clone(), 7)];
    let mut traces: HashMap<String, Vec<Got>> = HashMap::new();
    for _ in 0..200 {
        traces.clear();
        for s in receiver.spans.lock().unwrap().iter() {
            traces.entry(s.trace_id.clone()).or_default().push(s.clone());
        }
        if wanted.iter().all(|(t, n)| traces.get(t).is_some_and(|v| v.len() >= *n)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // anything extra would arrive too
    traces.clear();
    for s in receiver.spans.lock().unwrap().iter() {
        traces.entry(s.trace_id.clone()).or_default().push(s.clone());
    }

    // The put, all on the leader: RPC → handler → raft.write → apply → vector.update.
    let put = by_name(traces.get(&put_trace).expect("the put's trace"));
    assert_eq!(put.len(), 5, "{put:#?}");
    let rpc = &put["engram.v1.MemoryService/Put"];
    assert_eq!(rpc.parent, client_span, "the RPC span continues the client's traceparent");
    assert_eq!(rpc.kind, 2, "a server span");
    assert_eq!(rpc.attrs["rpc.system"], "grpc");
    assert_eq!(rpc.attrs["rpc.method"], "Put");
    child(&put, "engram.v1.MemoryService/Put", "put");
    assert_eq!(put["put"].attrs["namespace"], NS);
    child(&put, "put", "raft.write");
    assert_eq!(put["raft.write"].attrs["op"], "put");
    child(&put, "raft.write", "apply");
    child(&put, "apply", "vector.update");
    assert!(put.values().all(|s| s.node == leader_name), "followers add no spans to the leader's write: {put:#?}");

    // The search: RPC → handler → read barrier, shard search.
    let s = by_name(traces.get(&search_trace).expect("the search's trace"));
    assert_eq!(s.len(), 4, "{s:#?}");
    assert_eq!(s["engram.v1.MemoryService/Search"].parent, client_span);
    child(&s, "engram.v1.MemoryService/Search", "search");
    child(&s, "search", "read_barrier");
    child(&s, "search", "shard.search");
    assert_eq!(s["shard.search"].attrs["namespace"], NS);

    // The forwarded put: the follower's spans, then the leader's, in one trace.
    let f = by_name(traces.get(&fwd_trace).expect("the forwarded put's trace"));
    assert_eq!(f.len(), 7, "{f:#?}");
    child(&f, "engram.v1.MemoryService/Put", "put");
    child(&f, "put", "raft.forward");
    child(&f, "raft.forward", "engram.v1.RaftService/ForwardWrite");
    child(&f, "engram.v1.RaftService/ForwardWrite", "raft.write");
    child(&f, "raft.write", "apply");
    child(&f, "apply", "vector.update");
    for name in ["engram.v1.MemoryService/Put", "put", "raft.forward"] {
        assert_eq!(f[name].node, follower_name, "{name}");
    }
    for name in ["engram.v1.RaftService/ForwardWrite", "raft.write", "apply", "vector.update"] {
        assert_eq!(f[name].node, leader_name, "{name}");
    }

    // Nothing else starts traces of its own: no heartbeats, no followers' applies.
    let roots: Vec<Got> = receiver.spans.lock().unwrap().iter().filter(|s| s.parent.is_empty()).cloned().collect();
    assert!(
        roots.iter().all(|s| s.kind == 2 && s.name.starts_with("engram.v1.")),
        "only RPC server spans start traces: {roots:#?}"
    );
    assert!(roots.iter().all(|s| !s.name.starts_with("engram.v1.RaftService/")), "peer RPCs never start traces");
    server.abort();
}
