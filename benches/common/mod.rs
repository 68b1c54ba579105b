//! What the cluster benchmarks share: the release binary, TEXMEX vector files, and waiting
//! for a cluster to settle. Included with `#[path = "common/mod.rs"] mod common;`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use engram::client::Client;

#[path = "../../tests/common/process.rs"]
pub mod process;

/// `--engram-bin`, or the release build of this checkout (which must exist).
pub fn release_bin(arg: Option<PathBuf>) -> PathBuf {
    let bin = arg.unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/engram"));
    assert!(bin.exists(), "{} not found: run `cargo build --release --bins` first", bin.display());
    bin
}

/// A `.fvecs` / `.ivecs` file: (dimension, the values of every record in order).
pub fn read_vecs<T: Copy>(path: &Path, conv: fn([u8; 4]) -> T) -> (usize, Vec<T>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let dim = i32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
    let rec = 4 + 4 * dim;
    assert_eq!(bytes.len() % rec, 0, "{}: not a vecs file of dimension {dim}", path.display());
    let mut out = Vec::with_capacity(bytes.len() / rec * dim);
    for r in bytes.chunks_exact(rec) {
        out.extend(r[4..].chunks_exact(4).map(|c| conv(c.try_into().unwrap())));
    }
    (dim, out)
}

/// The API address of the current leader, asked until one is known.
pub async fn leader_api(client: &Client, procs: &[process::EngramProcess]) -> String {
    loop {
        let leader = client.admin().status().await.map(|s| s.leader_id).unwrap_or(0);
        if let Some(p) = procs.iter().find(|p| p.id == leader) {
            return p.api.clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every node has applied its whole log to its shards and none is rebuilding a
/// shard in the background (and, with `vectors`, every node indexes that many), seen twice in a
/// row 200 ms apart, so what a benchmark measures next is not sharing the cores with a
/// follower's backlog or a build that was about to be scheduled.
pub async fn wait_built(procs: &[process::EngramProcess], vectors: Option<u64>) {
    let mut settled_rounds = 0;
    while settled_rounds < 2 {
        let mut settled = true;
        for p in procs.iter().filter(|p| p.is_running()) {
            let status: serde_json::Value =
                serde_json::from_str(&process::http_get(&p.http, "/status").await).unwrap_or_default();
            let v = &status["vectors"];
            let last_log = status["raft"]["last_log_index"].as_u64();
            settled &= v["building"] == 0
                && last_log.is_some_and(|l| v["applied_index"].as_u64().is_some_and(|a| a >= l))
                && vectors.is_none_or(|n| v["vectors"] == n);
        }
        settled_rounds = if settled { settled_rounds + 1 } else { 0 };
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Each running node's Raft term, from its /status.
pub async fn raft_terms(procs: &[process::EngramProcess]) -> Vec<u64> {
    let mut out = Vec::new();
    for p in procs.iter().filter(|p| p.is_running()) {
        let status: serde_json::Value =
            serde_json::from_str(&process::http_get(&p.http, "/status").await).unwrap_or_default();
        out.push(status["raft"]["term"].as_u64().unwrap_or(0));
    }
    out
}
