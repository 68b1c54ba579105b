//! The error model through real gRPC: every bad input is refused with InvalidArgument naming
//! the field and changes nothing; missing things are NotFound; retried writes with the same
//! idempotency key apply once.

mod common;

use common::{vector, TestCluster};
use engram::api::status::FIELD_HEADER;
use engram::client::NewMemory;
use engram::proto as pb;
use engram::proto::memory_service_client::MemoryServiceClient;
use tonic::transport::Channel;
use tonic::Code;

const NS: &str = "acme/user-42";

async fn raw(cluster: &TestCluster) -> MemoryServiceClient<Channel> {
    let leader = cluster.wait_for_leader().await;
    MemoryServiceClient::connect(format!("http://{}", cluster.slot(leader).api)).await.unwrap()
}

fn input(id: &str, text: &str, embedding: Vec<f32>) -> pb::MemoryInput {
    pb::MemoryInput { id: id.into(), text: text.into(), embedding, ..Default::default() }
}

fn put(ns: &str, m: pb::MemoryInput) -> pb::PutRequest {
    pb::PutRequest { namespace: ns.into(), memory: Some(m), precondition: None, options: None, create_namespace: true }
}

fn expect_invalid(res: Result<impl std::fmt::Debug, tonic::Status>, field: &str) {
    let s = res.expect_err(&format!("expected InvalidArgument for {field}"));
    assert_eq!(s.code(), Code::InvalidArgument, "{field}: {s:?}");
    let got = s.metadata().get(FIELD_HEADER).map(|v| v.to_str().unwrap().to_string());
    assert_eq!(got.as_deref(), Some(field), "wrong field in {s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_refused_with_the_field_and_changes_nothing() {
    let cluster = TestCluster::start(3).await;
    let mut c = raw(&cluster).await;
    // Phase 1: a namespace with dimension 4 and one memory.
    c.put(put(NS, input("m1", "hello", vector(1, 4)))).await.unwrap();
    // Settled: the first leader names the cluster in an entry of its own, which must not land
    // between the two digests.
    cluster.settle().await;
    let before = cluster.digests().await;

    // Phase 2: every kind of bad write.
    let big = "x".repeat(64 * 1024 + 1);
    let cases: Vec<(pb::PutRequest, &str)> = vec![
        (put("", input("a", "t", vector(1, 4))), "namespace"),
        (put("a//b", input("a", "t", vector(1, 4))), "namespace"),
        (put("bad ns", input("a", "t", vector(1, 4))), "namespace"),
        // Canonical names only, so a prefix grant means what it says.
        (put("..", input("a", "t", vector(1, 4))), "namespace"),
        (put("acme/../other", input("a", "t", vector(1, 4))), "namespace"),
        (put("acme/./x", input("a", "t", vector(1, 4))), "namespace"),
        (put("Acme/x", input("a", "t", vector(1, 4))), "namespace"),
        (put(&["a"; 9].join("/"), input("a", "t", vector(1, 4))), "namespace"),
        (pb::PutRequest { memory: None, ..put(NS, input("a", "t", vector(1, 4))) }, "memory"),
        (put(NS, input("a", "", vector(1, 4))), "memory.text"),
        (put(NS, input("a", &big, vector(1, 4))), "memory.text"),
        (put(NS, input("a", "t", vec![])), "memory.embedding"),
        (put(NS, input("a", "t", vec![0.1, f32::NAN, 0.2, 0.3])), "memory.embedding"),
        (put(NS, input("a", "t", vec![0.1, f32::INFINITY, 0.2, 0.3])), "memory.embedding"),
        (put(NS, input("a", "t", vector(1, 3))), "memory.embedding"),
        (put(NS, input("a", "t", vector(1, 5000))), "memory.embedding"),
        (put(NS, input("bad/id", "t", vector(1, 4))), "memory.id"),
        (put(NS, input(&"i".repeat(200), "t", vector(1, 4))), "memory.id"),
        (put(NS, pb::MemoryInput { importance: Some(1.5), ..input("a", "t", vector(1, 4)) }), "memory.importance"),
        (put(NS, pb::MemoryInput { importance: Some(f32::NAN), ..input("a", "t", vector(1, 4)) }), "memory.importance"),
        (
            put(NS, pb::MemoryInput { tags: [(String::new(), "v".into())].into(), ..input("a", "t", vector(1, 4)) }),
            "memory.tags",
        ),
        (
            pb::PutRequest {
                options: Some(pb::WriteOptions { idempotency_key: "k".repeat(300) }),
                ..put(NS, input("a", "t", vector(1, 4)))
            },
            "options.idempotency_key",
        ),
    ];
    for (req, field) in cases {
        expect_invalid(c.put(req).await, field);
    }

    // Batches: empty, duplicate ids, a bad item deep inside.
    let batch = |items: Vec<pb::MemoryInput>| pb::PutBatchRequest {
        namespace: NS.into(),
        items: items.into_iter().map(|m| pb::PutBatchItem { memory: Some(m), precondition: None }).collect(),
        options: None,
        create_namespace: true,
    };
    expect_invalid(c.put_batch(batch(vec![])).await, "items");
    expect_invalid(
        c.put_batch(batch(vec![input("d", "t", vector(1, 4)), input("d", "t", vector(2, 4))])).await,
        "items[1].memory.id",
    );
    expect_invalid(
        c.put_batch(batch(vec![input("e", "t", vector(1, 4)), input("f", "t", vec![f32::NAN; 4])])).await,
        "items[1].memory.embedding",
    );
    expect_invalid(
        c.put_batch(batch((0..1001).map(|i| input(&format!("z{i}"), "t", vector(i, 4))).collect())).await,
        "items",
    );

    // Reads and other writes.
    let get = |ns: &str, id: &str, consistency: i32| pb::GetRequest {
        namespace: ns.into(),
        id: id.into(),
        consistency,
        reinforce: false,
    };
    expect_invalid(c.get(get(NS, "", 0)).await, "id");
    expect_invalid(c.get(get("", "m1", 0)).await, "namespace");
    expect_invalid(c.get(get(NS, "m1", 42)).await, "consistency");
    let list = |size: u32, token: &str| pb::ListRequest {
        namespace: NS.into(),
        page_size: size,
        page_token: token.into(),
        consistency: 0,
    };
    expect_invalid(c.list(list(5000, "")).await, "page_size");
    expect_invalid(c.list(list(10, "not-a-token")).await, "page_token");
    expect_invalid(c.list(list(10, "zz")).await, "page_token");
    expect_invalid(c.list(list(10, "aéb")).await, "page_token");
    expect_invalid(
        c.delete(pb::DeleteRequest { namespace: NS.into(), id: "".into(), precondition: None, options: None }).await,
        "id",
    );
    expect_invalid(
        c.create_namespace(pb::CreateNamespaceRequest {
            namespace: "x".into(),
            dimension: 0,
            metric: 0,
            options: None,
            policy: None,
        })
        .await,
        "dimension",
    );
    expect_invalid(
        c.create_namespace(pb::CreateNamespaceRequest {
            namespace: "x".into(),
            dimension: 4,
            metric: 9,
            options: None,
            policy: None,
        })
        .await,
        "metric",
    );

    // Every refusal above happened before proposal: no node's state changed by a byte.
    assert_eq!(cluster.digests().await, before, "a refused write changed state");

    // Phase 3: unknown things are NotFound; a conflicting namespace is AlreadyExists.
    assert_eq!(c.get(get("nobody/here", "m1", 0)).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(c.get(get(NS, "missing", 0)).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(
        c.list(pb::ListRequest { namespace: "nobody".into(), ..list(10, "") }).await.unwrap_err().code(),
        Code::NotFound
    );
    let del_ns = pb::DeleteNamespaceRequest { namespace: "nobody".into(), options: None };
    assert_eq!(c.delete_namespace(del_ns).await.unwrap_err().code(), Code::NotFound);
    let conflicting =
        pb::CreateNamespaceRequest { namespace: NS.into(), dimension: 8, metric: 1, options: None, policy: None };
    assert_eq!(c.create_namespace(conflicting).await.unwrap_err().code(), Code::AlreadyExists);

    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_writes_leave_state_byte_identical() {
    let cluster = TestCluster::start(1).await;
    let mut c = raw(&cluster).await;
    c.put(put(NS, input("m1", "hello", vector(1, 4)))).await.unwrap();
    let before = cluster.digests().await;
    for req in [
        put(NS, input("a", "t", vec![f32::NAN; 4])),
        put(NS, input("a", "t", vector(1, 3))),
        put("", input("a", "t", vector(1, 4))),
    ] {
        assert_eq!(c.put(req).await.unwrap_err().code(), Code::InvalidArgument);
    }
    assert_eq!(cluster.digests().await, before, "a refused write changed state");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retried_writes_with_one_idempotency_key_apply_once() {
    let mut cluster = TestCluster::start(3).await;
    let mut c = raw(&cluster).await;
    let opts = |k: &str| Some(pb::WriteOptions { idempotency_key: k.into() });

    // Phase 1: the same put sent twice returns the first result, and the memory's revision
    // does not move.
    let req = pb::PutRequest { options: opts("put-1"), ..put(NS, input("m", "v1", vector(1, 4))) };
    let first = c.put(req.clone()).await.unwrap().into_inner();
    let again = c.put(req).await.unwrap().into_inner();
    assert_eq!(first, again);
    let got = c
        .get(pb::GetRequest { namespace: NS.into(), id: "m".into(), consistency: 0, reinforce: false })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.memory.unwrap().revision, first.revision);

    // Phase 2: a server-generated id is assigned once: the retry returns the same id and no
    // second memory appears.
    let req = pb::PutRequest { options: opts("put-2"), ..put(NS, input("", "auto", vector(2, 4))) };
    let a = c.put(req.clone()).await.unwrap().into_inner();
    let b = c.put(req).await.unwrap().into_inner();
    assert_eq!(a.id, b.id);
    let list = c
        .list(pb::ListRequest { namespace: NS.into(), page_size: 100, page_token: String::new(), consistency: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.memories.len(), 2);

    // Phase 3: a delete retried after the memory was re-created does not delete it again.
    let del = pb::DeleteRequest { namespace: NS.into(), id: "m".into(), precondition: None, options: opts("del-1") };
    assert!(c.delete(del.clone()).await.unwrap().into_inner().deleted);
    c.put(put(NS, input("m", "v2", vector(1, 4)))).await.unwrap();
    let retry = c.delete(del).await.unwrap().into_inner();
    assert!(retry.deleted, "the retry must return the first answer");
    let got = c
        .get(pb::GetRequest { namespace: NS.into(), id: "m".into(), consistency: 0, reinforce: false })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.memory.unwrap().text, "v2");

    // Phase 4: the dedup table is replicated state: after the leader changes, a retry at the
    // new leader still returns the original answer.
    let old = cluster.wait_for_leader().await;
    cluster.stop(old).await;
    let req = pb::PutRequest { options: opts("put-1"), ..put(NS, input("m", "v1", vector(1, 4))) };
    let mut attempts = 0;
    let after_failover = loop {
        // Elections may take a round or two to settle after the stop.
        match raw(&cluster).await.put(req.clone()).await {
            Ok(r) => break r.into_inner(),
            Err(s) if s.code() == Code::Unavailable && attempts < 50 => attempts += 1,
            Err(s) => panic!("retry at the new leader failed: {s:?}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(after_failover, first);

    // Phase 5: the SDK chooses one key per logical write and reuses it on its own retries.
    let sdk = cluster.client();
    let r = sdk.put(NS, NewMemory::new("sdk", vector(3, 4))).await.unwrap();
    assert!(!r.id.is_empty());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_admin_input_is_refused_and_changes_nothing() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    let before = client.admin().status().await.unwrap();
    let node = |id: u64, raft: &str, api: &str| pb::NodeInfo { id, raft_addr: raft.into(), api_addr: api.into() };

    // Phase 1: every malformed membership request names its field.
    let bad_learners = [
        (node(0, "127.0.0.1:1", "127.0.0.1:2"), "node.id"),
        (node(9, "nohost", "127.0.0.1:2"), "node.raft_addr"),
        (node(9, "127.0.0.1:1", ":70000"), "node.api_addr"),
        (node(1, "127.0.0.1:1", "127.0.0.1:2"), "node.id"),
    ];
    for (n, field) in bad_learners {
        let e = client.admin().add_learner(n, false).await.unwrap_err();
        assert_eq!((e.code, e.field.as_deref()), (Code::InvalidArgument, Some(field)), "{e}");
    }
    let e = client.admin().transfer_leader(99).await.unwrap_err();
    assert_eq!((e.code, e.field.as_deref()), (Code::InvalidArgument, Some("to_node_id")), "{e}");
    let e = client.admin().promote_voters(vec![0]).await.unwrap_err();
    assert_eq!((e.code, e.field.as_deref()), (Code::InvalidArgument, Some("node_ids")), "{e}");
    let e = client.admin().remove_nodes(vec![42]).await.unwrap_err();
    assert_eq!(e.code, Code::NotFound, "{e}");

    // Phase 2: bootstrap requests that are malformed, or come too late, are refused.
    let n1 = cluster.node_info(1);
    let init = |members: Vec<pb::NodeInfo>| {
        let c = cluster.pinned(1);
        async move { c.admin().init_cluster(members).await.unwrap_err() }
    };
    let e = init(vec![n1.clone(), n1.clone()]).await;
    assert_eq!((e.code, e.field.as_deref()), (Code::InvalidArgument, Some("members[1].id")), "{e}");
    let e = init(vec![cluster.node_info(2)]).await;
    assert_eq!((e.code, e.field.as_deref()), (Code::InvalidArgument, Some("members")), "{e}");
    let e = init(vec![]).await;
    assert_eq!(e.code, Code::FailedPrecondition, "{e}");

    // Phase 3: membership is exactly as before.
    let after = client.admin().status().await.unwrap();
    assert_eq!((after.voters, after.learners), (before.voters, before.learners));
    cluster.shutdown().await;
}

/// Found by the chaos harness: a write to a node that is down was reported as "maybe
/// applied", so every write during a kill was indeterminate. A connection that is refused
/// never carried the request, so the SDK must say it was not applied.
#[tokio::test]
async fn a_write_that_could_not_connect_is_reported_not_applied() {
    // A port nothing listens on: the connection is refused before anything is sent.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let c = engram::client::Client::pinned(&format!("127.0.0.1:{port}")).unwrap();
    let err = c.put(NS, NewMemory::new("x", vec![1.0])).await.unwrap_err();
    assert_eq!(err.code, Code::Unavailable, "{err}");
    assert_eq!(err.outcome, engram::client::WriteOutcome::NotApplied, "{err}");
}
