//! Limits that keep one tenant from hurting others: per-principal rates answered with
//! RESOURCE_EXHAUSTED and a retry-after the SDK honours, replicated quotas that every node
//! decides alike, bounded responses, connection limits and idle deadlines, and idempotency
//! keys that belong to one principal and one request.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::{vector, TestCluster};
use engram::client::{ClientError, Consistency, NewMemory, RetryPolicy};
use engram::proto as pb;
use engram::proto::memory_service_client::MemoryServiceClient;
use tonic::Code;

fn exhausted<T: std::fmt::Debug>(what: &str, r: Result<T, ClientError>) -> ClientError {
    let e = r.expect_err(&format!("{what} was allowed"));
    assert_eq!(e.code, Code::ResourceExhausted, "{what}: {e:?}");
    assert!(e.retry_after.is_some_and(|w| w > Duration::ZERO), "{what}: no retry-after in {e:?}");
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_principal_over_its_rate_is_told_when_to_retry_and_the_sdk_waits() {
    let cluster = TestCluster::start_secure_with(1, |c| {
        c.rates.requests_per_sec_per_principal = 10;
        c.rates.write_bytes_per_sec_per_principal = 10_000;
    })
    .await;
    let patient = cluster.client();
    patient.put("acme/a", NewMemory::new("x", vector(1, 4)).with_id("m1")).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await; // a full bucket
    let mut opts = cluster.options(cluster.root_key());
    opts.retry = RetryPolicy { max_attempts: 1, max_rate_limit_wait: Duration::ZERO, ..Default::default() };
    let impatient = engram::client::Client::with_options([cluster.slot(1).api.to_string()], opts).unwrap();

    // Phase 1: the burst (20) passes, then the node refuses with a retry-after.
    let mut ok = 0;
    let refused = loop {
        match impatient.get("acme/a", "m1").await {
            Ok(_) => ok += 1,
            Err(e) => break e,
        }
        assert!(ok < 100, "never limited");
    };
    assert!((15..=25).contains(&ok), "{ok} calls before the limit");
    assert_eq!(refused.code, Code::ResourceExhausted, "{refused:?}");
    assert!(refused.retry_after.is_some_and(|w| w <= Duration::from_millis(200)), "{refused:?}");

    // Phase 2: the SDK honours retry-after: 30 calls all succeed, paced by the rate.
    let started = Instant::now();
    for _ in 0..30 {
        patient.get("acme/a", "m1").await.unwrap();
    }
    assert!(started.elapsed() >= Duration::from_secs(1), "not paced: {:?}", started.elapsed());

    // Phase 3: written bytes are limited too: more than the burst at once is refused.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let big = "x".repeat(30_000);
    exhausted("30 kB at once", impatient.put("acme/a", NewMemory::new(big, vector(2, 4))).await);
    assert_eq!(patient.list_all("acme/a").await.unwrap().len(), 1, "the refused write was not applied");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quotas_are_decided_in_apply_and_every_node_decides_alike() {
    let cluster = TestCluster::start_secure(3).await;
    let root = cluster.client();
    root.auth().create_role("acme-rw").await.unwrap();
    root.auth().grant("acme-rw", "acme/*", &["read", "write", "delete"], None).await.unwrap();
    let key = root.auth().create_key("acme-app", &["acme-rw"], 0).await.unwrap().key;
    let q = pb::Quota { max_namespaces: Some(2), max_memories_per_namespace: Some(5), max_bytes_per_namespace: None };
    root.auth().set_quota("acme", q).await.unwrap();
    assert_eq!(root.auth().list_quotas().await.unwrap().quotas["acme"].max_memories_per_namespace, Some(5));

    // Phase 1: three writers through three nodes race for five places.
    let mut tasks = Vec::new();
    for w in 0..3u32 {
        // Each writer starts at another node (and follows the leader from there).
        let eps: Vec<String> = (0..3u64).map(|k| cluster.slot((u64::from(w) + k) % 3 + 1).api.to_string()).collect();
        let c = engram::client::Client::with_options(eps, cluster.options(Some(key.clone()))).unwrap();
        tasks.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for i in 0..4u32 {
                let id = format!("w{w}-{i}");
                let r = c.put("acme/q", NewMemory::new("x", vector(i, 4)).with_id(id.clone())).await;
                outcomes.push((id, r.map_err(|e| (e.code, e.retry_after.is_some()))));
            }
            outcomes
        }));
    }
    let mut accepted = Vec::new();
    for t in tasks {
        for (id, r) in t.await.unwrap() {
            match r {
                Ok(_) => accepted.push(id),
                Err((code, retry_after)) => assert!(code == Code::ResourceExhausted && retry_after, "{id}: {code:?}"),
            }
        }
    }
    assert_eq!(accepted.len(), 5, "{accepted:?}");

    // Phase 2: every node holds exactly the accepted five.
    cluster.settle().await;
    accepted.sort();
    for id in 1..=3 {
        let c = cluster.pinned(id);
        let mut held: Vec<String> =
            c.list("acme/q", 100, "", Consistency::Stale).await.unwrap().memories.into_iter().map(|m| m.id).collect();
        held.sort();
        assert_eq!(held, accepted, "node {id}");
    }
    let digests = cluster.digests().await;
    assert!(digests.windows(2).all(|w| w[0].1 == w[1].1), "{digests:?}");

    // Phase 3: a batch that would pass the limit is refused whole; replacing is fine; the
    // namespace limit holds too.
    let tenant = cluster.client_as(Some(key));
    let batch =
        (0..2).map(|i| (NewMemory::new("b", vector(i, 4)).with_id(format!("b{i}")), Default::default())).collect();
    exhausted("batch over the limit", tenant.put_batch("acme/q", batch).await);
    tenant.put("acme/q", NewMemory::new("replaced", vector(9, 4)).with_id(accepted[0].clone())).await.unwrap();
    tenant.create_namespace("acme/second", 4, engram::client::Metric::Cosine).await.unwrap();
    exhausted("a third namespace", tenant.create_namespace("acme/third", 4, engram::client::Metric::Cosine).await);
    exhausted("a third namespace by put", tenant.put("acme/third", NewMemory::new("x", vector(1, 4))).await);
    assert_eq!(tenant.get("acme/third", "x").await.unwrap_err().code, Code::NotFound);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn responses_are_bounded() {
    let cluster = TestCluster::start_with(1, |c| c.max_response_bytes = 1 << 20).await;
    let c = cluster.client();
    let text = "y".repeat(40_000);
    let batch = (0..40u32)
        .map(|i| (NewMemory::new(text.clone(), vector(i, 8)).with_id(format!("m{i:02}")), Default::default()))
        .collect();
    c.put_batch("acme/big", batch).await.unwrap();

    // Search: 40 memories of 40 kB exceed 1 MiB; ids alone do not.
    let req = |include_memory| pb::SearchRequest {
        namespace: "acme/big".into(),
        vector: vector(1, 8),
        k: 40,
        include_memory,
        ..Default::default()
    };
    let e = c.search_with(req(true)).await.unwrap_err();
    assert_eq!((e.code, e.field.as_deref()), (Code::InvalidArgument, Some("k")), "{e:?}");
    assert_eq!(c.search_with(req(false)).await.unwrap().hits.len(), 40);
    // A batch may not ask for more than 16,384 hits in all.
    let queries = (0..17).map(|_| pb::SearchRequest { k: 1000, ..req(false) }).collect();
    let e = c.search_batch(queries, Consistency::Linearizable).await.unwrap_err();
    assert_eq!((e.code, e.field.as_deref()), (Code::InvalidArgument, Some("queries")), "{e:?}");

    // List: pages end early by size, and paging still reaches everything.
    let first = c.list("acme/big", 1000, "", Consistency::Linearizable).await.unwrap();
    assert!(first.memories.len() < 40 && !first.next_page_token.is_empty(), "{}", first.memories.len());
    assert_eq!(c.list_all("acme/big").await.unwrap().len(), 40);
    cluster.shutdown().await;
}

/// Opens a raw TCP connection and reports whether the server closed it within `within`.
fn closed_within(stream: &mut std::net::TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 64];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false
            }
            Err(_) => return true,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connection_limits_and_idle_deadlines_hold_on_both_listeners() {
    let cluster = TestCluster::start_secure_with(1, |c| {
        c.max_connections = 4;
        c.handshake_timeout_ms = 1500;
        c.idle_timeout_ms = 1000;
    })
    .await;
    // The boot's own client connection goes away first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for addr in [cluster.slot(1).api, cluster.slot(1).raft] {
        // Four silent connections take every place; a fifth is closed at once.
        let mut held: Vec<_> = (0..4).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut fifth = std::net::TcpStream::connect(addr).unwrap();
        assert!(closed_within(&mut fifth, Duration::from_millis(300)), "{addr}: a fifth connection was kept");
        assert!(
            !closed_within(&mut held[0], Duration::from_millis(50)),
            "{addr}: a connection within the limit was closed"
        );
        // None of them says anything: the handshake deadline closes them all.
        for (i, s) in held.iter_mut().enumerate() {
            assert!(closed_within(s, Duration::from_secs(3)), "{addr}: silent connection {i} was kept");
        }
    }
    // The places are free again.
    cluster.client().put("acme/a", NewMemory::new("x", vector(1, 4))).await.unwrap();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotency_keys_belong_to_one_principal_and_one_request() {
    let cluster = TestCluster::start_secure(3).await;
    let root = cluster.client();
    for (role, pattern) in [("a-rw", "acme/*"), ("b-rw", "other/*")] {
        root.auth().create_role(role).await.unwrap();
        root.auth().grant(role, pattern, &["read", "write"], None).await.unwrap();
    }
    let a = cluster.client_as(Some(root.auth().create_key("tenant-a", &["a-rw"], 0).await.unwrap().key));
    let b = cluster.client_as(Some(root.auth().create_key("tenant-b", &["b-rw"], 0).await.unwrap().key));
    let leader = cluster.wait_for_leader().await;
    let addr = cluster.slot(leader).api.to_string();
    let put = |ns: &str, text: &str| pb::PutRequest {
        namespace: ns.into(),
        memory: Some(pb::MemoryInput { text: text.into(), embedding: vector(1, 4), ..Default::default() }),
        precondition: None,
        options: Some(pb::WriteOptions { idempotency_key: "same-key".into() }),
        create_namespace: true,
    };
    let mut ca = MemoryServiceClient::new(a.raw_channel(&addr).unwrap());
    let mut cb = MemoryServiceClient::new(b.raw_channel(&addr).unwrap());

    // Tenant A writes with a key; tenant B's write with the same key is its own write.
    let first = ca.put(put("acme/a", "from a")).await.unwrap().into_inner();
    let other = cb.put(put("other/b", "from b")).await.unwrap().into_inner();
    assert_ne!(other.id, first.id);
    assert!(other.applied_index > first.applied_index, "B was answered with A's result");
    assert_eq!(b.get("other/b", &other.id).await.unwrap().text, "from b");

    // A's retry gets its first result; A's reuse for another request is refused.
    let retry = ca.put(put("acme/a", "from a")).await.unwrap().into_inner();
    assert_eq!((retry.id, retry.applied_index), (first.id.clone(), first.applied_index));
    let reuse = ca.put(put("acme/a", "something else")).await.unwrap_err();
    assert_eq!(reuse.code(), Code::FailedPrecondition);
    assert_eq!(reuse.metadata().get("engram-field").unwrap(), "options.idempotency_key");
    assert_eq!(a.list_all("acme/a").await.unwrap().len(), 1);
    // Keys are capped in size.
    let mut long = put("acme/a", "x");
    long.options = Some(pb::WriteOptions { idempotency_key: "k".repeat(300) });
    assert_eq!(ca.put(long).await.unwrap_err().code(), Code::InvalidArgument);
    cluster.shutdown().await;
}
