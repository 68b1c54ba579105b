//! The hash-chained ledger against real `engram` processes and `engramctl`: three nodes agree,
//! an entry altered in one node's log file is found and named by its index, a ledger row
//! altered in a state file is found, and a replica whose history differs but whose own chain
//! is consistent is named by comparing heads across the nodes.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

mod common;

use common::process::{cluster_of_three, EngramProcess};
use engram::client::{Client, NewMemory};
use engram::raft::{Entry, Op};
use engram::storage::{codec, ledger};
use openraft::EntryPayload;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};

const NS: &str = "audit/ledger";
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");

fn engramctl(endpoints: &[&str], args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_engramctl"))
        .args(["--insecure", "--endpoints", &endpoints.join(",")])
        .args(args)
        .output()
        .expect("run engramctl")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// The index of the first log entry of `node` that puts into [`NS`], and that entry.
fn first_put(node: &EngramProcess) -> (u64, Entry) {
    let db = redb::Database::open(node.data_dir.join("raft-log.redb")).unwrap();
    let txn = db.begin_read().unwrap();
    let table = txn.open_table(LOG).unwrap();
    for item in table.iter().unwrap() {
        let (k, v) = item.unwrap();
        let entry: Entry = codec::decode_row("log", v.value()).unwrap();
        if let EntryPayload::Normal(c) = &entry.payload {
            if matches!(&c.op, Op::PutChecked { namespace, .. } if namespace == NS) {
                return (k.value(), entry);
            }
        }
    }
    let ops: Vec<String> = table
        .iter()
        .unwrap()
        .map(|r| format!("{:?}", codec::decode_row::<Entry>("log", r.unwrap().1.value()).unwrap().payload))
        .collect();
    panic!("no put in the log: {ops:?}");
}

/// Rewrites the entry at `index` in `node`'s log with another memory text (the node is down).
fn alter_log_entry(node: &EngramProcess, index: u64, mut entry: Entry) -> Entry {
    if let EntryPayload::Normal(c) = &mut entry.payload {
        if let Op::PutChecked { items, .. } = &mut c.op {
            items[0].0.text = "a text this cluster never accepted".into();
        }
    }
    let db = redb::Database::open(node.data_dir.join("raft-log.redb")).unwrap();
    let txn = db.begin_write().unwrap();
    txn.open_table(LOG).unwrap().insert(index, codec::encode_row(&entry).as_slice()).unwrap();
    txn.commit().unwrap();
    entry
}

async fn verify_on(node: &EngramProcess) -> engram::proto::VerifyLedgerResponse {
    let c = Client::new([node.api.clone()]).unwrap();
    for _ in 0..200 {
        if let Ok(r) = c.admin().verify_ledger().await {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("node {} never answered VerifyLedger", node.id);
}

/// Every node applied at least `index` (so each has a row for it).
async fn applied_everywhere(nodes: &[EngramProcess], index: u64) {
    for _ in 0..400 {
        let mut all = true;
        for n in nodes {
            let r = verify_on(n).await;
            all &= r.applied_index >= index;
        }
        if all {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("not every node applied {index}");
}

/// A node's /metrics, or nothing while it is (re)starting and not listening yet.
async fn metrics_of(node: &EngramProcess) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(&node.http).await else { return String::new() };
    let mut out = String::new();
    if s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").await.is_err()
        || s.read_to_string(&mut out).await.is_err()
    {
        return String::new();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_ledger_checks_out_and_names_an_altered_entry_and_a_diverged_replica() {
    let dir = tempfile::tempdir().unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_engram"));
    let (mut nodes, client) = cluster_of_three(bin, 27300, dir.path(), 50).await;
    let client = client.creating_namespaces();
    for i in 0..30 {
        client.put(NS, NewMemory::new(format!("memory {i}"), vec![i as f32, 1.0, 0.5])).await.unwrap();
    }
    let last = client.admin().status().await.unwrap().last_log_index;
    applied_everywhere(&nodes, last).await;
    let owned: Vec<String> = nodes.iter().map(|n| n.api.clone()).collect();
    let eps: Vec<&str> = owned.iter().map(String::as_str).collect();

    // Healthy: every node's chain checks out against its log, and the heads agree.
    let out = engramctl(&eps, &["ledger", "verify"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("all 3 endpoints agree"), "{}", text(&out));
    for n in &nodes {
        let r = verify_on(n).await;
        assert!(r.ok && r.rows > last && r.last_index == r.applied_index, "node {}: {r:?}", n.id);
        assert_eq!(r.checked_against_log, r.rows, "nothing was purged yet");
    }
    // Export: one JSON line per row, each head the chain of the row before.
    let out = engramctl(&eps[..1], &["ledger", "export"]);
    assert!(out.status.success(), "{}", text(&out));
    let rows: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(rows.len() as u64 > last, "{} rows for {last} entries", rows.len());
    let mut head = [0u8; 32];
    for r in &rows {
        let entry: [u8; 32] = hex::decode(r["entry_hash"].as_str().unwrap()).unwrap().try_into().unwrap();
        head = ledger::chain(&head, r["index"].as_u64().unwrap(), &entry);
        assert_eq!(hex::encode(head), r["head"].as_str().unwrap());
    }
    // Bad export bounds are refused.
    let c = Client::new([nodes[0].api.clone()]).unwrap();
    assert!(c.admin().export_ledger(10, 5, 0).await.is_err());
    assert!(c.admin().export_ledger(1, 0, 10_001).await.is_err());
    let page = c.admin().export_ledger(1, 0, 5).await.unwrap();
    assert_eq!((page.links.len(), page.next_index), (5, page.links[4].index + 1));

    // Let the state machines' non-durable commits reach disk, then stop nodes 2 and 3.
    tokio::time::sleep(Duration::from_millis(500)).await;
    nodes[1].kill9();
    nodes[2].kill9();

    // Node 3: one applied entry altered in its log file. Its ledger names that index.
    let (altered, entry) = first_put(&nodes[2]);
    alter_log_entry(&nodes[2], altered, entry);
    // Node 2: the same entry altered and its ledger rebuilt to match, as a replica that applied
    // another history would hold. Its own check passes; the heads across nodes do not agree.
    let (index2, entry2) = first_put(&nodes[1]);
    assert_eq!(index2, altered);
    let forged = alter_log_entry(&nodes[1], index2, entry2);
    {
        let db = redb::Database::open(nodes[1].data_dir.join("state.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(ledger::LEDGER).unwrap();
            let prev: [u8; 32] = t.get(index2 - 1).unwrap().unwrap().value()[32..].try_into().unwrap();
            let rows: Vec<(u64, [u8; 32])> = t
                .range(index2..)
                .unwrap()
                .map(|r| {
                    let (k, v) = r.unwrap();
                    (k.value(), v.value()[..32].try_into().unwrap())
                })
                .collect();
            let mut head = prev;
            for (i, mut e) in rows {
                if i == index2 {
                    e = ledger::entry_hash(&forged);
                }
                head = ledger::chain(&head, i, &e);
                t.insert(i, [e, head].concat().as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();
    }
    nodes[1].start(bin, 50);
    nodes[2].start(bin, 50);

    let r = verify_on(&nodes[2]).await;
    assert!(!r.ok, "{r:?}");
    assert_eq!(r.broken_index, altered, "{r:?}");
    assert!(r.reason.contains("log"), "{r:?}");
    let r = verify_on(&nodes[1]).await;
    assert!(r.ok, "node 2's own chain is consistent: {r:?}");

    let out = engramctl(&eps, &["ledger", "verify"]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains(&format!("{}  BROKEN at index {altered}", nodes[2].api)), "{said}");
    assert!(said.contains(&format!("{}  DIVERGED", nodes[1].api)), "{said}");
    assert!(!said.contains(&format!("{}  DIVERGED", nodes[0].api)), "{said}");

    // A ledger row altered in a state file is named too (node 1, stopped for it; an early row,
    // which the state machine's periodic durable commits certainly covered).
    let row_at = altered + 1;
    nodes[0].kill9();
    {
        let db = redb::Database::open(nodes[0].data_dir.join("state.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(ledger::LEDGER).unwrap();
            let mut row = t.get(row_at).unwrap().unwrap().value().to_vec();
            row[40] ^= 1;
            t.insert(row_at, row.as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    nodes[0].start(bin, 50);
    let r = verify_on(&nodes[0]).await;
    assert!(!r.ok && r.broken_index == row_at, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_verify_names_a_replica_whose_state_was_altered() {
    let dir = tempfile::tempdir().unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_engram"));
    let (mut nodes, client) = cluster_of_three(bin, 27400, dir.path(), 50).await;
    let client = client.creating_namespaces();
    for i in 0..20 {
        let m = NewMemory::new(format!("memory {i}"), vec![i as f32, 1.0, 0.5]).with_id(format!("m{i:02}"));
        client.put(NS, m).await.unwrap();
    }
    let owned: Vec<String> = nodes.iter().map(|n| n.api.clone()).collect();
    let eps: Vec<&str> = owned.iter().map(String::as_str).collect();

    // Healthy: one mark, three equal digests, and a mark changes no memory.
    let out = engramctl(&eps, &["cluster", "verify"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("all 3 endpoints hold the same state at index"), "{}", text(&out));
    assert_eq!(client.list(NS, 100, "", engram::client::Consistency::Linearizable).await.unwrap().memories.len(), 20);

    // Node 3's copy of one memory is altered on disk while it is down (test-only corruption:
    // a well-formed row, so the node starts and serves it).
    tokio::time::sleep(Duration::from_millis(500)).await;
    nodes[2].kill9();
    {
        let db = redb::Database::open(nodes[2].data_dir.join("state.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(engram::storage::MEMORIES).unwrap();
            let key = engram::storage::memory_key(NS, "m03");
            let mut m = codec::decode_memory(t.get(key.as_slice()).unwrap().unwrap().value()).unwrap();
            m.text = "memory 3, quietly rewritten".into();
            t.insert(key.as_slice(), codec::encode_memory(&m).as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    nodes[2].start(bin, 50);
    // Its ledger still checks out: the chain covers the entries, not the rows they made. (This
    // also waits for it to serve again.)
    let r = verify_on(&nodes[2]).await;
    assert!(r.ok, "{r:?}");

    let out = engramctl(&eps, &["cluster", "verify"]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains(&format!("{}  DIVERGED", nodes[2].api)), "{said}");
    for n in &nodes[..2] {
        assert!(said.contains(&format!("{}  ok", n.api)), "{said}");
    }

    // The leader's background check finds the same node: every node restarted with a 1 s
    // interval (whoever leads runs it).
    for n in nodes.iter_mut() {
        n.kill9();
        n.start_with_env(bin, 50, &[("ENGRAM_CLUSTER_VERIFY_INTERVAL_SECS", "1".to_string())]);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let found = loop {
        let mut found = None;
        for n in &nodes {
            let m = metrics_of(n).await;
            if m.contains(r#"engram_cluster_verify_runs_total{outcome="diverged"}"#) {
                found = Some(m);
            }
        }
        if let Some(m) = found {
            break m;
        }
        assert!(std::time::Instant::now() < deadline, "no background verify found the diverged node");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(found.contains("engram_cluster_verify_diverged_nodes 1"), "{found}");
    // The leader's /status names the node and degrades its health.
    let mut named = None;
    for n in &nodes {
        let s: serde_json::Value = serde_json::from_str(&common::process::http_get(&n.http, "/status").await).unwrap();
        if s["replicas"]["status"] == "degraded" {
            named = Some(s);
        }
    }
    let s = named.expect("no node's /status shows the divergence");
    assert_eq!(s["replicas"]["diverged"], serde_json::json!([3]), "{s}");
    assert_eq!(s["status"], "degraded", "{s}");

    // Bad requests to MarkDigest are refused; an unknown mark times out.
    let c = Client::new([nodes[0].api.clone()]).unwrap();
    assert_eq!(c.admin().mark_digest("", 0).await.unwrap_err().code, tonic::Code::InvalidArgument);
    assert_eq!(c.admin().mark_digest(&"x".repeat(65), 0).await.unwrap_err().code, tonic::Code::InvalidArgument);
    assert_eq!(c.admin().mark_digest("m", 60_001).await.unwrap_err().code, tonic::Code::InvalidArgument);
    assert_eq!(c.admin().mark_digest("never-proposed", 200).await.unwrap_err().code, tonic::Code::DeadlineExceeded);
}
