//! Cluster behaviour through the real path: gRPC on loopback, redb files in temp dirs,
//! openraft replication between in-process nodes.

mod common;

use std::time::Duration;

use common::{vector, TestCluster};
use engram::client::{Consistency, NewMemory, Precondition, WriteOutcome};
use openraft::async_runtime::watch::WatchReceiver;
use tonic::Code;

const NS: &str = "acme/user-42";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_replicate_every_write() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();

    // Phase 1: writes through the SDK land on the leader.
    let mut last = 0;
    for i in 0..20 {
        let put = client
            .put(
                NS,
                NewMemory::new(format!("memory {i}"), vector(i, 8))
                    .with_id(format!("m{i}"))
                    .with_tag("i", i.to_string()),
            )
            .await
            .unwrap();
        assert_eq!(put.revision, put.applied_index);
        last = put.applied_index;
    }

    // Phase 2: every node applies them and holds byte-identical state.
    cluster.wait_applied(last).await;
    let digests = cluster.digests().await;
    assert!(digests.windows(2).all(|w| w[0].1 == w[1].1), "state diverged: {digests:?}");

    // Phase 3: a stale read on each node sees the data locally.
    for id in cluster.running() {
        let got = cluster.pinned(id).get_with(NS, "m7", Consistency::Stale).await.unwrap();
        assert_eq!(got.memory.unwrap().text, "memory 7");
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn followers_serve_linearizable_reads_and_forward_writes() {
    let cluster = TestCluster::start(3).await;
    let leader = cluster.wait_for_leader().await;
    let follower = cluster.running().into_iter().find(|id| *id != leader).unwrap();

    // Phase 1: a write sent to a follower is forwarded to the leader and applied there
    // (tests/api_conventions.rs covers the hint for clients that ask not to be forwarded).
    let fwd = cluster.pinned(follower).put(NS, NewMemory::new("x", vector(1, 4)).with_id("b")).await.unwrap();
    assert_eq!(fwd.id, "b");

    // Phase 2: the SDK given only the follower writes through it.
    let sdk = engram::client::Client::new([cluster.slot(follower).api.to_string()]).unwrap().creating_namespaces();
    let put = sdk.put(NS, NewMemory::new("hello", vector(1, 4)).with_id("a")).await.unwrap();

    // Phase 3: every follower's linearizable read sees the acknowledged write at once
    // (ReadIndex from the leader, then wait for local apply), with no sleeping in between.
    for id in cluster.running() {
        let got = cluster.pinned(id).get_with(NS, "a", Consistency::Linearizable).await.unwrap();
        assert_eq!(got.memory.as_ref().unwrap().revision, put.revision, "node {id}");
        assert!(got.read_index >= put.applied_index);
        let lease = cluster.pinned(id).get_with(NS, "a", Consistency::Lease).await.unwrap();
        assert_eq!(lease.memory.unwrap().text, "hello");
    }

    // Phase 4: an update followed immediately by a follower read never shows the old value.
    for round in 0..10 {
        let text = format!("v{round}");
        sdk.put(NS, NewMemory::new(text.clone(), vector(round, 4)).with_id("a")).await.unwrap();
        let got = cluster.pinned(follower).get(NS, "a").await.unwrap();
        assert_eq!(got.text, text);
    }
    cluster.shutdown().await;
}

/// A linearizable search for `v` on node `id` (retrying only while the node knows no leader);
/// the top hit's id.
async fn top_hit(cluster: &TestCluster, id: u64, v: Vec<f32>) -> String {
    let req = engram::proto::SearchRequest {
        namespace: NS.into(),
        vector: v,
        k: 1,
        consistency: engram::proto::Consistency::Linearizable as i32,
        ..Default::default()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match cluster.pinned(id).search_with(req.clone()).await {
            Ok(r) => return r.hits.first().map(|h| h.id.clone()).unwrap_or_default(),
            Err(e) if e.code == Code::Unavailable && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Err(e) => panic!("search on node {id}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn linearizable_searches_see_every_acknowledged_write_on_every_node() {
    // A linearizable search on a node with nothing pending in its log runs while its read
    // barrier is in flight and keeps that answer only if the shards had applied the index the
    // barrier confirmed; otherwise it searches again once they have. Either way it must see
    // every write acknowledged before it was sent.
    let mut cluster = TestCluster::start(3).await;
    let client = cluster.client();
    const DIM: usize = 16;
    // Phase 1: a put, then at once a search on every node, finds the new memory first.
    for round in 0..15u32 {
        let id = format!("r{round}");
        client.put(NS, NewMemory::new("x", vector(round, DIM)).with_id(id.clone())).await.unwrap();
        for node in cluster.running() {
            assert_eq!(top_hit(&cluster, node, vector(round, DIM)).await, id, "node {node}, round {round}");
        }
    }
    // Phase 2: a follower that was down while writes went on is searched the moment it is
    // back, before it can have caught up: its shards are behind the barrier, never the answer.
    let leader = cluster.wait_for_leader().await;
    let behind = cluster.running().into_iter().find(|id| *id != leader).unwrap();
    cluster.stop(behind).await;
    for round in 15..75u32 {
        client.put(NS, NewMemory::new("y", vector(round, DIM)).with_id(format!("r{round}"))).await.unwrap();
    }
    cluster.restart(behind).await;
    for round in (15..75u32).rev() {
        assert_eq!(top_hit(&cluster, behind, vector(round, DIM)).await, format!("r{round}"), "round {round}");
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_loss_keeps_every_acknowledged_write() {
    let mut cluster = TestCluster::start(3).await;
    let client = cluster.client();
    let mut acked = Vec::new();

    // Phase 1: acknowledged writes under the first leader.
    for i in 0..30 {
        let id = format!("before-{i}");
        client.put(NS, NewMemory::new(format!("t{i}"), vector(i, 8)).with_id(id.clone())).await.unwrap();
        acked.push(id);
    }

    // Phase 2: the leader goes away; a new one is elected among the survivors and takes writes.
    let old = cluster.wait_for_leader().await;
    cluster.stop(old).await;
    let new = cluster.wait_for_leader().await;
    assert_ne!(new, old);
    for i in 0..30 {
        let id = format!("after-{i}");
        client.put(NS, NewMemory::new(format!("u{i}"), vector(i, 8)).with_id(id.clone())).await.unwrap();
        acked.push(id);
    }

    // Phase 3: every acknowledged write is readable from the new leader.
    let all = client.list_all(NS).await.unwrap();
    for id in &acked {
        assert!(all.iter().any(|m| &m.id == id), "acknowledged write {id} lost");
    }

    // Phase 4: the old leader comes back, catches up and converges.
    cluster.restart(old).await;
    let idx = cluster.handle(new).node.raft.metrics().borrow_watched().last_applied.unwrap().index;
    cluster.wait_applied(idx).await;
    let got = cluster.pinned(old).get_with(NS, "after-29", Consistency::Stale).await.unwrap();
    assert_eq!(got.memory.unwrap().text, "u29");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_cluster_restart_loses_nothing() {
    let mut cluster = TestCluster::start(3).await;
    let client = cluster.client();
    // Phase 1: writes, including an update and a delete.
    for i in 0..25 {
        client.put(NS, NewMemory::new(format!("t{i}"), vector(i, 8)).with_id(format!("m{i:02}"))).await.unwrap();
    }
    client.put(NS, NewMemory::new("updated", vector(99, 8)).with_id("m03")).await.unwrap();
    client.delete(NS, "m04").await.unwrap();
    let before = client.list_all(NS).await.unwrap();
    assert_eq!(before.len(), 24);

    // Phase 2: every node stops; all restart from their data dirs on the same addresses.
    for id in cluster.running() {
        cluster.stop(id).await;
    }
    for id in [1, 2, 3] {
        cluster.restart(id).await;
    }
    cluster.wait_for_leader().await;

    // Phase 3: the same memories, revisions and contents; new writes still work.
    let after = client.list_all(NS).await.unwrap();
    assert_eq!(before, after);
    assert_eq!(client.get(NS, "m03").await.unwrap().text, "updated");
    let e = client.get(NS, "m04").await.unwrap_err();
    assert_eq!(e.code, Code::NotFound);
    client.put(NS, NewMemory::new("post-restart", vector(5, 8)).with_id("new")).await.unwrap();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn learner_is_added_promoted_and_removed() {
    let mut cluster = TestCluster::start(3).await;
    let client = cluster.client();
    for i in 0..10 {
        client.put(NS, NewMemory::new(format!("t{i}"), vector(i, 4)).with_id(format!("m{i}"))).await.unwrap();
    }

    // Phase 1: a fresh node joins as a learner and catches up from the log.
    cluster.add_node(4).await;
    let r = client.admin().add_learner(cluster.node_info(4), true).await.unwrap();
    assert!(r.learners.iter().any(|n| n.id == 4));
    let got = cluster.pinned(4).get_with(NS, "m9", Consistency::Linearizable).await.unwrap();
    assert_eq!(got.memory.unwrap().text, "t9");

    // Phase 2: promoted to voter, it takes part in commits.
    let r = client.admin().promote_voters(vec![4]).await.unwrap();
    assert_eq!(r.voters.iter().map(|n| n.id).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    let put = client.put(NS, NewMemory::new("with four", vector(1, 4)).with_id("four")).await.unwrap();
    cluster.wait_applied(put.applied_index).await;

    // Phase 3: node 1 is removed; the remaining three keep serving writes.
    let r = client.admin().remove_nodes(vec![1]).await.unwrap();
    assert_eq!(r.voters.iter().map(|n| n.id).collect::<Vec<_>>(), vec![2, 3, 4]);
    cluster.stop(1).await;
    cluster.wait_for_leader().await;
    client.put(NS, NewMemory::new("after removal", vector(2, 4)).with_id("five")).await.unwrap();
    let s = cluster.pinned(4).admin().status().await.unwrap();
    assert_eq!(s.voters.iter().map(|n| n.id).collect::<Vec<_>>(), vec![2, 3, 4]);

    // Phase 4: unknown or invalid membership requests change nothing.
    let e = client.admin().promote_voters(vec![9]).await.unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument);
    let e = client.admin().remove_nodes(vec![]).await.unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leadership_transfers_on_request() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    let leader = cluster.wait_for_leader().await;
    let target = cluster.running().into_iter().find(|id| *id != leader).unwrap();
    let r = client.admin().transfer_leader(target).await.unwrap();
    assert_eq!(r.leader_id, target);
    assert_eq!(cluster.wait_for_leader().await, target);
    client.put(NS, NewMemory::new("x", vector(1, 4))).await.unwrap();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compare_and_set_and_atomic_batches() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();

    // Phase 1: if-absent creates once, then refuses.
    let first =
        client.put_if(NS, NewMemory::new("a", vector(1, 4)).with_id("k"), Precondition::IfAbsent).await.unwrap();
    let e =
        client.put_if(NS, NewMemory::new("b", vector(1, 4)).with_id("k"), Precondition::IfAbsent).await.unwrap_err();
    assert_eq!((e.code, e.outcome), (Code::FailedPrecondition, WriteOutcome::NotApplied));

    // Phase 2: if-revision succeeds only at the current revision.
    let second = client
        .put_if(NS, NewMemory::new("c", vector(1, 4)).with_id("k"), Precondition::IfRevision(first.revision))
        .await
        .unwrap();
    assert!(second.updated && second.revision > first.revision);
    let e = client
        .put_if(NS, NewMemory::new("d", vector(1, 4)).with_id("k"), Precondition::IfRevision(first.revision))
        .await
        .unwrap_err();
    assert_eq!(e.code, Code::FailedPrecondition);
    assert_eq!(client.get(NS, "k").await.unwrap().text, "c");
    let e = client.delete_if(NS, "k", Precondition::IfRevision(first.revision)).await.unwrap_err();
    assert_eq!(e.code, Code::FailedPrecondition);

    // Phase 3: a batch whose last guard fails applies none of its items.
    let e = client
        .put_batch(
            NS,
            vec![
                (NewMemory::new("x", vector(2, 4)).with_id("b1"), Precondition::None),
                (NewMemory::new("y", vector(3, 4)).with_id("k"), Precondition::IfAbsent),
            ],
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, Code::FailedPrecondition);
    assert_eq!(e.field.as_deref(), Some("items[1].precondition"));
    assert_eq!(client.get(NS, "b1").await.unwrap_err().code, Code::NotFound);

    // Phase 4: a good batch is one log entry: every item gets the same revision.
    let items = (0..100).map(|i| (NewMemory::new(format!("b{i}"), vector(i, 4)), Precondition::None)).collect();
    let r = client.put_batch(NS, items).await.unwrap();
    assert_eq!(r.results.len(), 100);
    assert!(r.results.iter().all(|x| x.revision == r.applied_index));

    // Phase 5: delete at the right revision; delete-namespace erases everything.
    client.delete_if(NS, "k", Precondition::IfRevision(second.revision)).await.unwrap();
    let d = client.delete_namespace(NS).await.unwrap();
    assert_eq!(d.deleted_memories, 100);
    assert_eq!(client.get(NS, "b1").await.unwrap_err().code, Code::NotFound);
    assert_eq!(client.list(NS, 10, "", Consistency::Linearizable).await.unwrap_err().code, Code::NotFound);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn list_paginates_in_id_order() {
    let cluster = TestCluster::start(1).await;
    let client = cluster.client();
    let items = (0..250)
        .map(|i| (NewMemory::new(format!("t{i}"), vector(i, 4)).with_id(format!("id{i:04}")), Precondition::None))
        .collect();
    client.put_batch(NS, items).await.unwrap();
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = client.list(NS, 100, &token, Consistency::Linearizable).await.unwrap();
        pages += 1;
        seen.extend(page.memories.into_iter().map(|m| m.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    let expected: Vec<String> = (0..250).map(|i| format!("id{i:04}")).collect();
    assert_eq!(seen, expected);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_report_health_readiness_and_metrics() {
    let cluster = TestCluster::start(1).await;
    cluster.client().put(NS, NewMemory::new("x", vector(1, 4))).await.unwrap();
    let http = cluster.slot(1).http;
    let get = |path: &'static str| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    assert!(get("/healthz").await.starts_with("HTTP/1.0 200"));
    assert!(get("/readyz").await.starts_with("HTTP/1.0 200"));
    let metrics = get("/metrics").await;
    assert!(metrics.contains("engram_api_requests_total"), "{metrics}");
    assert!(metrics.contains("engram_raft_applied_index"));

    // gRPC health on the client port, as stock tools would ask.
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.slot(1).api))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
    let r =
        health.check(tonic_health::pb::HealthCheckRequest { service: "engram.v1.MemoryService".into() }).await.unwrap();
    assert_eq!(r.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    tokio::time::sleep(Duration::from_millis(10)).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_learner_added_after_compaction_catches_up_by_snapshot() {
    let mut cluster = TestCluster::start_with(3, |c| {
        c.snapshot_logs_since_last = 20;
        c.snapshot_keep_logs = 0;
    })
    .await;
    let client = cluster.client();
    // Phase 1: enough writes that snapshots are taken and the log head is purged.
    let mut last = 0;
    for i in 0..150 {
        last = client
            .put(NS, NewMemory::new(format!("t{i}"), vector(i, 4)).with_id(format!("m{i:03}")))
            .await
            .unwrap()
            .applied_index;
    }
    cluster.wait_applied(last).await;
    let leader = cluster.wait_for_leader().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let m = cluster.handle(leader).node.raft.metrics().borrow_watched().clone();
        if m.purged.is_some_and(|p| p.index > 10) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "leader never purged its log: {:?}", m.purged);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Phase 2: a new learner cannot be fed from the log alone; it installs a snapshot.
    cluster.add_node(4).await;
    client.admin().add_learner(cluster.node_info(4), true).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m4 = cluster.handle(4).node.raft.metrics().borrow_watched().clone();
        if m4.snapshot.is_some() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "learner did not install a snapshot: {m4:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Phase 3: it serves the same data, linearizably, and converges byte for byte.
    let all = cluster.pinned(4).list(NS, 1000, "", Consistency::Linearizable).await.unwrap();
    assert_eq!(all.memories.len(), 150);
    // Its vector shards were rebuilt from the installed snapshot.
    // (m077 holds exactly this vector, so the best cosine similarity is 1.)
    let hit = cluster.pinned(4).search(NS, vector(77, 4), 1).await.unwrap();
    assert!(hit.hits[0].score > 0.999, "{hit:?}");
    cluster.wait_applied(last).await;
    let digests = cluster.digests().await;
    assert!(digests.windows(2).all(|w| w[0].1 == w[1].1), "state diverged: {digests:?}");
    // The snapshot carried the ledger: the learner's chain covers the history before it joined
    // (whose entries its log never held) and checks out against the entries it did receive.
    let ledger = cluster.pinned(4).admin().verify_ledger().await.unwrap();
    let leaders = cluster.pinned(leader).admin().verify_ledger().await.unwrap();
    assert!(ledger.ok && ledger.first_index == 0, "{ledger:?}");
    assert!(ledger.checked_against_log < ledger.rows, "{ledger:?}");
    assert_eq!((ledger.last_index, &ledger.head), (leaders.last_index, &leaders.head));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_nodes_tolerate_two_failures_and_refuse_writes_without_a_majority() {
    let mut cluster = TestCluster::start(5).await;
    let client = cluster.client();
    client.put(NS, NewMemory::new("first", vector(1, 4)).with_id("a")).await.unwrap();

    // Phase 1: two nodes (one of them the leader) go down; three of five still commit.
    let leader = cluster.wait_for_leader().await;
    let other = cluster.running().into_iter().find(|id| *id != leader).unwrap();
    cluster.stop(leader).await;
    cluster.stop(other).await;
    cluster.wait_for_leader().await;
    client.put(NS, NewMemory::new("second", vector(2, 4)).with_id("b")).await.unwrap();
    assert_eq!(client.get(NS, "a").await.unwrap().text, "first");

    // Phase 2: a third failure leaves no majority: a write cannot be acknowledged and a
    // linearizable read cannot be served, but a stale read still answers locally.
    let third = cluster.running()[0];
    cluster.stop(third).await;
    let impatient = engram::client::Client::with_retry(
        cluster.running().iter().map(|id| cluster.slot(*id).api.to_string()),
        engram::client::RetryPolicy { max_attempts: 3, timeout: Duration::from_millis(800), ..Default::default() },
    )
    .unwrap();
    let e = impatient.put(NS, NewMemory::new("third", vector(3, 4)).with_id("c")).await.unwrap_err();
    assert!(matches!(e.code, Code::Unavailable | Code::DeadlineExceeded), "{e:?}");
    let survivor = cluster.running()[0];
    let stale = cluster.pinned(survivor).get_with(NS, "b", Consistency::Stale).await.unwrap();
    assert_eq!(stale.memory.unwrap().text, "second");

    // Phase 3: the majority returns; the cluster serves again and nothing acknowledged is lost.
    cluster.restart(third).await;
    cluster.restart(leader).await;
    cluster.wait_for_leader().await;
    assert_eq!(client.get(NS, "b").await.unwrap().text, "second");
    cluster.shutdown().await;
}

/// Found by the chaos harness's soak run: acknowledged writes were lost after a node was
/// replaced by a new one on its address while the old one's removal had not landed. The new
/// node answered Raft requests meant for the old one, so the leader counted it twice and
/// committed with a minority.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_never_answers_raft_requests_meant_for_another() {
    let mut cluster = TestCluster::start(3).await;
    let client = cluster.client();
    client.put(NS, NewMemory::new("first", vector(1, 4)).with_id("a")).await.unwrap();
    let leader = cluster.wait_for_leader().await;
    let followers: Vec<u64> = cluster.running().into_iter().filter(|id| *id != leader).collect();
    let (gone, other) = (followers[0], followers[1]);

    // `gone` dies for good; node 4 takes its address and joins while `gone` is still a
    // voter: four voters, so a write needs three of them.
    cluster.stop(gone).await;
    cluster.replace_at(gone, 4).await;
    let admin = cluster.pinned(leader);
    admin.admin().add_learner(cluster.node_info(4), true).await.unwrap();
    admin.admin().promote_voters(vec![4]).await.unwrap();
    client.put(NS, NewMemory::new("second", vector(2, 4)).with_id("b")).await.unwrap();

    // With `other` down too, two voters are alive: the leader and node 4. Node 4 must not
    // also answer as `gone`, or the leader counts three and acknowledges the write.
    cluster.stop(other).await;
    let impatient = engram::client::Client::with_retry(
        [cluster.slot(leader).api.to_string()],
        engram::client::RetryPolicy { max_attempts: 1, timeout: Duration::from_secs(3), ..Default::default() },
    )
    .unwrap();
    let e = impatient.put(NS, NewMemory::new("third", vector(3, 4)).with_id("c")).await.unwrap_err();
    // The client's own deadline ends the call (Cancelled), or the node gives up first.
    assert!(matches!(e.code, Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled), "{e:?}");

    // `other` returns: a real majority (the leader, `other`, node 4) commits again, and what
    // was acknowledged is there.
    cluster.restart(other).await;
    cluster.wait_for_leader().await;
    client.put(NS, NewMemory::new("fourth", vector(4, 4)).with_id("d")).await.unwrap();
    assert_eq!(client.get(NS, "b").await.unwrap().text, "second");
    cluster.shutdown().await;
}

/// A follower that missed ~24 MiB of large batches catches up through AppendEntries cut to
/// the 8 MiB budget (openraft resends the rest), never sending a message past the receiver's
/// 32 MiB limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_catches_up_on_large_entries_in_bounded_messages() {
    let mut cluster = TestCluster::start(3).await;
    let client = cluster.client();
    let leader = cluster.wait_for_leader().await;
    let lagging = cluster.running().into_iter().find(|id| *id != leader).unwrap();
    cluster.stop(lagging).await;
    let text = "z".repeat(60_000);
    for b in 0..8u32 {
        let items = (0..50u32)
            .map(|i| {
                (NewMemory::new(text.clone(), vector(b * 50 + i, 4)).with_id(format!("b{b}-{i}")), Default::default())
            })
            .collect();
        client.put_batch(NS, items).await.unwrap();
    }
    cluster.restart(lagging).await;
    cluster.settle().await;
    let digests = cluster.digests().await;
    assert!(digests.windows(2).all(|w| w[0].1 == w[1].1), "{digests:?}");
    let got = cluster.pinned(lagging).list(NS, 1000, "", engram::client::Consistency::Stale).await.unwrap();
    assert!(!got.next_page_token.is_empty() || got.memories.len() == 400);
    assert_eq!(cluster.pinned(lagging).list_all(NS).await.unwrap().len(), 400);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_node_digests_the_same_state_at_a_mark_proposed_under_write_load() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..8u32 {
        let (client, stop) = (client.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let m = NewMemory::new(format!("w{w} {i}"), vector(w * 100_000 + i, 4)).with_id(format!("w{w}-{i}"));
                client.put(NS, m).await.unwrap();
                i += 1;
            }
            i
        }));
    }
    // Marks land in the middle of apply batches full of other writes: each node must still
    // digest the state exactly at the mark, not at the end of its batch.
    let mut indexes = Vec::new();
    for _ in 0..24 {
        tokio::time::sleep(Duration::from_millis(15)).await;
        let mark = client.admin().propose_mark().await.unwrap();
        let mut digests = Vec::new();
        for id in 1..=3 {
            let d = cluster.pinned(id).admin().mark_digest(&mark.mark_id, 10_000).await.unwrap();
            assert_eq!(d.index, mark.index);
            digests.push((id, d.digest, d.head));
        }
        assert!(digests.windows(2).all(|w| w[0].1 == w[1].1 && w[0].2 == w[1].2), "{digests:?}");
        indexes.push(mark.index);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut written = 0;
    for w in writers {
        written += w.await.unwrap();
    }
    assert!(written > 50, "too little load to interleave with the marks: {written} puts");
    // A follower refuses to propose one (a mark is node-only; the client follows the hint).
    let leader = cluster.wait_for_leader().await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let direct = engram::client::Client::with_retry(
        [cluster.slot(follower).api.to_string()],
        engram::client::RetryPolicy { max_attempts: 1, ..Default::default() },
    )
    .unwrap();
    let e = direct.admin().propose_mark().await.unwrap_err();
    assert_eq!(e.code, Code::Unavailable, "{e:?}");
    assert!(e.message.contains("not the leader"), "{e:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_verifies_the_replicas_in_the_background() {
    let cluster = TestCluster::start_with(3, |c| c.cluster_verify_interval_secs = 1).await;
    let client = cluster.client();
    for i in 0..20 {
        client.put(NS, NewMemory::new(format!("m{i}"), vector(i, 4)).with_id(format!("m{i}"))).await.unwrap();
    }
    let leader = cluster.wait_for_leader().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let m = common::process::http_get(&cluster.slot(leader).http.to_string(), "/metrics").await;
        if m.contains(r#"engram_cluster_verify_runs_total{outcome="ok"}"#) {
            assert!(m.contains("engram_cluster_verify_diverged_nodes 0"), "{m}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no background verify finished: {m}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.shutdown().await;
}
