//! Backups, restore into a new cluster, scheduled backups and the log purge policy, through
//! real nodes, real gRPC and real files.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{vector, TestCluster};
use engram::backup::{self, Keyring};
use engram::client::{Client, NewMemory};
use openraft::async_runtime::watch::WatchReceiver;

const KEY: &str = "7d1f0c3b9a8e2d4c6b5a49382716f5e4d3c2b1a0f9e8d7c6b5a4938271605f4e";

/// Every node in these tests seals backups with `KEY` (from the environment, as an operator
/// without a key file would).
fn keys() -> Keyring {
    // SAFETY: every test in this binary sets the same value before any node reads it.
    unsafe { std::env::set_var(backup::keys::KEY_ENV, KEY) };
    Keyring::from_env_value(KEY).unwrap()
}

fn rvec(seed: u64, dim: usize) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e3779b97f4a7c15).wrapping_add(1);
    (0..dim)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

/// What a client can observe: every memory of both namespaces, and a set of searches.
async fn observe(client: &Client) -> (Vec<String>, Vec<Vec<(String, u32)>>) {
    let mut memories = Vec::new();
    for ns in ["notes", "facts"] {
        for m in client.list_all(ns).await.unwrap() {
            memories.push(format!("{ns}/{}/{}/{}/{:?}", m.id, m.revision, m.text, m.embedding));
        }
    }
    let mut searches = Vec::new();
    for q in 0..12 {
        let ns = if q % 2 == 0 { "notes" } else { "facts" };
        let dim = if q % 2 == 0 { 16 } else { 4 };
        let hits = client.search(ns, rvec(10_000 + q, dim), 7).await.unwrap().hits;
        searches.push(hits.into_iter().map(|h| (h.id, h.score.to_bits())).collect());
    }
    (memories, searches)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backup_wipe_restore_serves_identical_memories_and_search_answers() {
    let keys = keys();
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();

    // Phase 1: a state worth restoring: two namespaces, updates and deletes.
    for i in 0..120u64 {
        let m = NewMemory::new(format!("note {i}"), rvec(i, 16))
            .with_id(format!("n{i:03}"))
            .with_tag("k", (i % 3).to_string());
        client.put("notes", m).await.unwrap();
    }
    for i in 0..40u64 {
        client
            .put("facts", NewMemory::new(format!("fact {i}"), vector(i as u32, 4)).with_id(format!("f{i:02}")))
            .await
            .unwrap();
    }
    for i in (0..120).step_by(7) {
        client.delete("notes", &format!("n{i:03}")).await.unwrap();
    }
    client.put("notes", NewMemory::new("rewritten", rvec(999, 16)).with_id("n001")).await.unwrap();
    let before = observe(&client).await;
    let leader = cluster.wait_for_leader().await;
    let digest = cluster.handle(leader).reader.data_digest().unwrap();
    let old_cluster_id =
        cluster.handle(leader).reader.cluster_id().unwrap().expect("the first leader named the cluster");

    // Phase 2: an online backup over gRPC into a directory; it verifies offline.
    let store = tempfile::tempdir().unwrap();
    let (path, header) = client.admin().create_backup(store.path()).await.unwrap();
    assert!(path.starts_with(store.path()) && path.file_name().unwrap().to_string_lossy().ends_with(".engram"));
    assert_eq!(header.cluster_id, old_cluster_id);
    let info = backup::verify(std::fs::File::open(&path).unwrap(), &keys).unwrap();
    assert_eq!(info.manifest.memories, 120 - 18 + 40);
    assert_eq!(std::fs::read_dir(store.path()).unwrap().count(), 1, "no partial file is left");

    // Phase 3: the whole cluster is gone.
    cluster.shutdown().await;

    // Phase 4: a new cluster on new addresses and new data dirs, from the backup alone.
    let restored = TestCluster::restored(&path, 3, &keys, |_| {}).await;
    let client = restored.client();
    assert_eq!(observe(&client).await, before, "memories or search answers changed");
    let digests = restored.digests().await;
    for (id, _) in &digests {
        assert_eq!(restored.handle(*id).reader.data_digest().unwrap(), digest, "node {id} holds other data");
    }
    let new_id = restored.handle(1).reader.cluster_id().unwrap().unwrap();
    assert_ne!(new_id, old_cluster_id, "a restored cluster has a new identity");
    assert!(restored.running().iter().all(|id| restored.handle(*id).reader.cluster_id().unwrap() == Some(new_id)));

    // Phase 5: it is a working cluster: writes replicate, every node converges.
    let r = client.put("notes", NewMemory::new("after restore", rvec(5, 16)).with_id("new")).await.unwrap();
    restored.wait_applied(r.applied_index).await;
    let digests = restored.digests().await;
    assert!(digests.windows(2).all(|w| w[0].1 == w[1].1), "{digests:?}");
    restored.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_under_concurrent_writes_is_consistent_at_its_index() {
    let keys = keys();
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    client.put("notes", NewMemory::new("seed", rvec(0, 16)).with_id("seed")).await.unwrap();

    // Phase 1: a writer runs flat out and records the log index of every acknowledged write.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (client, stop) = (cluster.client(), stop.clone());
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("w{i:05}");
                let r = client.put("notes", NewMemory::new(format!("w {i}"), rvec(i, 16)).with_id(&id)).await.unwrap();
                acked.push((id, r.applied_index));
                i += 1;
            }
            acked
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Phase 2: a backup from a follower, mid-stream.
    let leader = cluster.wait_for_leader().await;
    let follower = cluster.running().into_iter().find(|id| *id != leader).unwrap();
    let floor = cluster.handle(leader).node.raft.metrics().borrow_watched().last_applied.unwrap().index;
    let store = tempfile::tempdir().unwrap();
    let file = store.path().join("mid-write.engram");
    let (_, header) = cluster.pinned(follower).admin().create_backup(&file).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let acked = writer.await.unwrap();
    assert!(header.applied_index >= floor, "the read barrier let the backup miss acknowledged writes");
    let n = header.applied_index;
    assert!(
        acked.iter().any(|(_, i)| *i > n) && acked.iter().any(|(_, i)| *i <= n),
        "writes did not straddle the backup"
    );

    // Phase 3: it holds exactly the writes at or below its index.
    let dir = store.path().join("restored");
    let members = [(1, engram::raft::EngramNode { raft_addr: "127.0.0.1:1".into(), api_addr: "127.0.0.1:2".into() })];
    let target = backup::restore::RestoreTarget {
        data_dir: dir.clone(),
        node_id: 1,
        members: members.into(),
        force: false,
        at_rest: None,
    };
    backup::restore::restore(std::fs::File::open(&file).unwrap(), &keys, &target).unwrap();
    let db = redb::Database::open(dir.join("state.redb")).unwrap();
    let reader = engram::storage::StateReader::new(Arc::new(db));
    let (_, page) = reader.list("notes", None, 1_000_000, 0).unwrap();
    let mut got: Vec<String> = page.memories.into_iter().map(|m| m.id).filter(|id| id != "seed").collect();
    let mut want: Vec<String> = acked.iter().filter(|(_, i)| *i <= n).map(|(id, _)| id.clone()).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    assert_eq!(page.applied_index, n);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_takes_scheduled_backups_and_keeps_the_newest() {
    keys();
    let cluster = TestCluster::start_with(3, |c| {
        c.backup_interval_secs = 1;
        c.backup_retention = 2;
    })
    .await;
    let client = cluster.client();
    for i in 0..5u64 {
        client.put("notes", NewMemory::new(format!("m {i}"), rvec(i, 16)).with_id(format!("m{i}"))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(900)).await;
    }
    let leader = cluster.wait_for_leader().await;
    let dir = cluster.slot(leader).dir.path().join("backups");
    let files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 2, "retention keeps two: {files:?}");
    for f in &files {
        backup::verify(std::fs::File::open(f).unwrap(), &Keyring::from_env_value(KEY).unwrap()).unwrap();
    }
    let status = cluster.pinned(leader).admin().status().await.unwrap();
    assert!(status.last_backup_at_ms > 0 && status.last_backup_index > 0, "{status:?}");
    assert!(status.last_backup_error.is_empty(), "{status:?}");
    assert!(!status.cluster_id.is_empty());
    for id in cluster.running().into_iter().filter(|id| *id != leader) {
        assert!(!cluster.slot(id).dir.path().join("backups").exists(), "follower {id} took a backup");
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_keeps_the_log_a_stopped_follower_needs() {
    let mut cluster = TestCluster::start_with(3, |c| {
        c.snapshot_logs_since_last = 20;
        c.snapshot_keep_logs = 0;
        c.snapshot_max_lag_logs = 10_000;
    })
    .await;
    let client = cluster.client();
    let leader = cluster.wait_for_leader().await;
    let follower = cluster.running().into_iter().find(|id| *id != leader).unwrap();
    let r = client.put("notes", NewMemory::new("first", rvec(1, 16)).with_id("first")).await.unwrap();
    cluster.wait_applied(r.applied_index).await;
    cluster.stop(follower).await;
    let matched = r.applied_index;

    // Phase 1: snapshots move far past the stopped follower; the log behind it stays. (Snapshots
    // come every 20 entries once the writes since reach half the memories in the last one, so
    // the last of several lands somewhere past 60.)
    let mut last = 0;
    for i in 0..120u64 {
        last = client
            .put("notes", NewMemory::new(format!("m {i}"), rvec(i, 16)).with_id(format!("m{i}")))
            .await
            .unwrap()
            .applied_index;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let m = cluster.handle(leader).node.raft.metrics().borrow_watched().clone();
        if m.snapshot.is_some_and(|s| s.index >= 60) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no snapshot: {m:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let purged = cluster.handle(leader).node.raft.metrics().borrow_watched().purged.map(|l| l.index).unwrap_or(0);
    assert!(purged <= matched, "the leader purged {purged}, past what follower {follower} has ({matched})");
    // A follower that is up purges behind its own snapshot (keep = 0).
    let up = cluster.running().into_iter().find(|id| *id != leader).unwrap();
    let m = cluster.handle(up).node.raft.metrics().borrow_watched().clone();
    assert!(m.purged.is_some_and(|p| p.index >= 60), "the running follower kept its log: {m:?}");

    // Phase 2: the follower comes back and catches up from the log.
    cluster.restart(follower).await;
    cluster.wait_applied(last).await;
    let digests = cluster.digests().await;
    assert!(digests.windows(2).all(|w| w[0].1 == w[1].1), "{digests:?}");
    // With everyone caught up, the leader's log is purged again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while cluster.handle(leader).node.raft.metrics().borrow_watched().purged.map(|l| l.index).unwrap_or(0) <= matched {
        assert!(tokio::time::Instant::now() < deadline, "the leader never purged after the follower caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.shutdown().await;
}
