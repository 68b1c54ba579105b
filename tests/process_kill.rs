//! Durability against real `engram` processes: acknowledged writes survive kill -9 of the
//! leader under load, and kill -9 of every node followed by a restart from disk.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;

use common::process::EngramProcess;
use engram::client::{Client, NewMemory, RetryPolicy, WriteOutcome};
use engram::proto as pb;

const NS: &str = "durable/ns";

fn free_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    format!("127.0.0.1:{port}")
}

/// Worst case: the state machine is (almost) never fsynced, so after kill -9 all of it must
/// come back from the durable log.
const NEVER_SYNC_MS: u64 = 3_600_000;

fn start(n: &mut EngramProcess) {
    n.start(Path::new(env!("CARGO_BIN_EXE_engram")), NEVER_SYNC_MS);
}

fn client(nodes: &[EngramProcess]) -> Client {
    let eps: Vec<String> = nodes.iter().filter(|n| n.is_running()).map(|n| n.api.clone()).collect();
    let retry = RetryPolicy {
        max_attempts: 200,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        timeout: Duration::from_secs(2),
        ..RetryPolicy::default()
    };
    Client::with_retry(eps, retry).unwrap().creating_namespaces()
}

async fn leader_of(c: &Client) -> u64 {
    for _ in 0..400 {
        if let Ok(s) = c.admin().status().await {
            if s.leader_id != 0 {
                return s.leader_id;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no leader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes: Vec<EngramProcess> = (1..=3)
        .map(|id| EngramProcess::new(id, free_addr(), free_addr(), free_addr(), dir.path().join(format!("n{id}"))))
        .collect();
    for n in nodes.iter_mut() {
        start(n);
    }
    // Phase 1: bootstrap (retry until the first node listens).
    let members: Vec<pb::NodeInfo> =
        nodes.iter().map(|n| pb::NodeInfo { id: n.id, raft_addr: n.raft.clone(), api_addr: n.api.clone() }).collect();
    let mut ok = false;
    // Up to 20 s: three debug processes starting on a loaded 2-core CI box can take a while.
    for _ in 0..400 {
        let r = Client::new([nodes[0].api.clone()]).unwrap().admin().init_cluster(members.clone()).await;
        // An earlier attempt may have initialized it and lost its answer to a client timeout.
        if r.as_ref().is_ok() || r.as_ref().is_err_and(common::process::initialized) {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "cluster init failed");
    let c = client(&nodes);
    leader_of(&c).await;

    // Phase 2: four writers; the leader is killed with SIGKILL while they run. Every write
    // the cluster acknowledges is recorded; writes that failed with "maybe applied" are
    // allowed to be present or absent.
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (c, acked) = (c.clone(), acked.clone());
        writers.push(tokio::spawn(async move {
            for i in 0..60 {
                let id = format!("w{w}-{i}");
                match c
                    .put(NS, NewMemory::new(format!("v{i}"), vec![w as f32, i as f32, 1.0]).with_id(id.clone()))
                    .await
                {
                    Ok(_) => {
                        acked.lock().unwrap().insert(id);
                    }
                    Err(e) => assert_eq!(e.outcome, WriteOutcome::MaybeApplied, "{e}"),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let old = leader_of(&c).await;
    nodes.iter_mut().find(|n| n.id == old).unwrap().kill9();
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 100, "too few writes acknowledged: {}", acked.len());

    // Phase 3: SIGKILL every node, restart them all from their data dirs.
    for n in nodes.iter_mut() {
        n.kill9();
    }
    for n in nodes.iter_mut() {
        start(n);
    }
    let c = client(&nodes);
    leader_of(&c).await;

    // Phase 4: every acknowledged write is there, linearizably, with its value.
    let all = c.list_all(NS).await.unwrap();
    let present: BTreeSet<String> = all.iter().map(|m| m.id.clone()).collect();
    let lost: Vec<_> = acked.difference(&present).collect();
    assert!(lost.is_empty(), "acknowledged writes lost after kill -9: {lost:?}");
    for m in &all {
        let i: usize = m.id.rsplit('-').next().unwrap().parse().unwrap();
        assert_eq!(m.text, format!("v{i}"));
    }
}
