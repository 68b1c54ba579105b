//! Full disks, through real processes and real filesystems: each node's data dir is on its own
//! small tmpfs (a size-limited filesystem this test mounts and unmounts; needs root, as the
//! chaos harness does), with a ballast file the test deletes to "free space".
//!
//! * With disk-space admission (`storage::space`), a cluster whose disks fill under a write
//!   load refuses writes with RESOURCE_EXHAUSTED, keeps serving reads and searches on every
//!   node, no node exits, and writes resume by themselves once space is freed, with every
//!   acknowledged write present.
//! * With admission off (reserve 0), ENOSPC reaches redb: the node does not exit and crash-loop
//!   but stays up explaining itself on `/status`, and starts again by itself (same pid) when
//!   space comes back, with every acknowledged write.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use common::process::EngramProcess;
use engram::client::{Client, ClientError, Metric, NewMemory, Precondition, RetryPolicy};
use tonic::Code;

const NS: &str = "disk/full";
const DIM: usize = 16;

/// A tmpfs of `mib` MiB mounted at a fresh directory, unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
    /// The node's log, outside the mount.
    log: PathBuf,
    _parent: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(mib: u64) -> Tmpfs {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("fs");
        std::fs::create_dir(&dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m,mode=0700"), "tmpfs", dir.to_str().unwrap()])
            .output()
            .expect("mount");
        assert!(out.status.success(), "mount tmpfs: {}", String::from_utf8_lossy(&out.stderr));
        let log = parent.path().join("node.log");
        Tmpfs { dir, log, _parent: parent }
    }

    /// Fills `mib` MiB with a file of random bytes (tmpfs allocates what is written).
    fn ballast(&self, mib: usize) -> PathBuf {
        let path = self.dir.join("ballast");
        let mut bytes = vec![0u8; mib << 20];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i.wrapping_mul(2654435761) >> 13) as u8;
        }
        std::fs::write(&path, &bytes).unwrap();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Mounting needs root. The chaos tier needs it too: `ENGRAM_SKIP_JEPSEN=1` (machines without
/// root) skips this test with it; anywhere else a missing root is a failure, not a pass.
fn have_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert_eq!(
        std::env::var("ENGRAM_SKIP_JEPSEN").as_deref(),
        Ok("1"),
        "tests/disk_space.rs mounts filesystems and needs root (ENGRAM_SKIP_JEPSEN=1 skips it)"
    );
    eprintln!("disk_space: not root and ENGRAM_SKIP_JEPSEN=1: skipped");
    false
}

/// GET `path` from a node's HTTP listener; `None` while nothing listens.
async fn http_get(addr: &str, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).await.ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    Some(out.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or(out))
}

/// A node on `fs`, its log beside the test's other files (not on the small filesystem).
fn node_on(id: u64, fs: &Tmpfs, reserve: u64) -> EngramProcess {
    let mut p = EngramProcess::new(id, free_addr(), free_addr(), free_addr(), fs.dir.join("node"));
    p.extra = vec!["--disk-reserve-bytes".into(), reserve.to_string()];
    p.log = fs.log.clone();
    p
}

fn free_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    format!("127.0.0.1:{port}")
}

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_engram"))
}

/// Text that does not compress (so the disk fills by what was written) and never repeats.
fn text(seed: u64) -> String {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..1500)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (b'a' + (x % 26) as u8) as char
        })
        .collect()
}

fn vector(seed: u64) -> Vec<f32> {
    (0..DIM).map(|d| (((seed * 31 + d as u64 * 17) % 97) as f32 + 1.0) / 97.0).collect()
}

fn once(addr: &str) -> Client {
    Client::with_retry([addr.to_string()], RetryPolicy { max_attempts: 1, ..RetryPolicy::default() }).unwrap()
}

async fn init(nodes: &[EngramProcess]) -> Client {
    common::process::init_cluster(nodes).await.creating_namespaces()
}

/// One batch of `n` new memories; the ids it acknowledged, or the error.
async fn batch(c: &Client, seed: u64, n: u64) -> Result<Vec<String>, ClientError> {
    let items =
        (0..n).map(|i| (NewMemory::new(text(seed * 1000 + i), vector(seed * 1000 + i)), Precondition::None)).collect();
    Ok(c.put_batch(NS, items).await?.results.into_iter().map(|r| r.id).collect())
}

/// The end of a node's log, for a failure message.
fn tail(log: &Path) -> String {
    let s = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

fn all_running(nodes: &mut [EngramProcess]) {
    for n in nodes.iter_mut() {
        assert!(n.exited().is_none(), "node {} exited: {}", n.id, tail(&n.log));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_whose_disks_fill_refuses_writes_keeps_serving_and_resumes() {
    if !have_root() {
        return;
    }
    let fss: Vec<Tmpfs> = (0..3).map(|_| Tmpfs::mount(64)).collect();
    let ballasts: Vec<PathBuf> = fss.iter().map(|fs| fs.ballast(20)).collect();
    let mut nodes: Vec<EngramProcess> =
        fss.iter().enumerate().map(|(i, fs)| node_on(i as u64 + 1, fs, 12 << 20)).collect();
    for n in nodes.iter_mut() {
        n.start(bin(), 100);
    }
    let c = init(&nodes).await;
    c.create_namespace(NS, DIM as u32, Metric::Cosine).await.unwrap();

    // Writers until every one of them is refused for a second running.
    let leader_api = |c: &Client| {
        let c = c.clone();
        async move {
            let s = c.admin().status().await.unwrap();
            s.leader_api_addr
        }
    };
    let mut acked: BTreeSet<String> = BTreeSet::new();
    let mut refused = 0u32;
    let mut refusal: Option<ClientError> = None;
    let started = Instant::now();
    let mut seed = 1u64;
    let mut refused_since: Option<Instant> = None;
    while refused_since.is_none_or(|t| t.elapsed() < Duration::from_secs(2)) {
        assert!(started.elapsed() < Duration::from_secs(180), "the disks never filled: {} acknowledged", acked.len());
        let w = once(&leader_api(&c).await);
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let (w, s) = (w.clone(), seed);
            seed += 1;
            tasks.push(tokio::spawn(async move { batch(&w, s, 25).await }));
        }
        for t in tasks {
            match t.await.unwrap() {
                Ok(ids) => {
                    acked.extend(ids);
                    refused_since = None;
                }
                Err(e) if e.code == Code::ResourceExhausted => {
                    refused += 1;
                    refused_since.get_or_insert_with(Instant::now);
                    refusal = Some(e);
                }
                // Leadership moving under load: not acknowledged, not refused.
                Err(e) => eprintln!("write failed: {e}"),
            }
        }
        all_running(&mut nodes);
    }
    let refusal = refusal.expect("no write was refused");
    assert_eq!(refusal.field.as_deref(), Some("disk"), "{refusal:?}");
    assert!(refusal.message.contains("reserve"), "{}", refusal.message);
    assert!(refusal.retry_after.is_some(), "a refusal tells the client when to retry");
    assert!(acked.len() > 100, "only {} writes were acknowledged before the disks filled", acked.len());
    eprintln!("{} memories acknowledged, {refused} batches refused", acked.len());

    // Reads and searches keep working on every node; no node exited.
    let sample: Vec<&String> = acked.iter().step_by(acked.len() / 20 + 1).collect();
    for n in &nodes {
        let r = Client::new([n.api.clone()]).unwrap();
        for id in &sample {
            let m = r.get(NS, id).await.unwrap_or_else(|e| panic!("node {}: get {id}: {e}", n.id));
            assert_eq!(m.id, **id);
        }
        let hits = r.search(NS, vector(7), 5).await.unwrap_or_else(|e| panic!("node {}: search: {e}", n.id));
        assert_eq!(hits.hits.len(), 5, "node {}", n.id);
        let status: serde_json::Value = serde_json::from_str(&http_get(&n.http, "/status").await.unwrap()).unwrap();
        assert!(status["storage"]["disk"]["reserve_bytes"].as_u64() == Some(12 << 20), "{status}");
    }
    let leader = c.admin().status().await.unwrap().leader_id;
    let lnode = nodes.iter().find(|n| n.id == leader).unwrap();
    let status: serde_json::Value = serde_json::from_str(&http_get(&lnode.http, "/status").await.unwrap()).unwrap();
    assert_eq!(status["storage"]["disk"]["writes"], "refused", "{status}");
    assert_eq!(status["storage"]["status"], "degraded", "{status}");
    // Deletes still go through: they are how space comes back.
    let gone = acked.iter().next().cloned().unwrap();
    once(&lnode.api).delete(NS, &gone).await.expect("a delete on a full cluster");
    acked.remove(&gone);
    all_running(&mut nodes);

    // Space comes back: writes resume without anyone restarting anything.
    for b in &ballasts {
        std::fs::remove_file(b).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let resumed = loop {
        match batch(&once(&leader_api(&c).await), 999_999, 5).await {
            Ok(ids) => break ids,
            Err(e) => {
                assert!(Instant::now() < deadline, "writes did not resume after space was freed: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    acked.extend(resumed);
    all_running(&mut nodes);

    // Every acknowledged write is there, on every node.
    for n in &nodes {
        let r = Client::new([n.api.clone()]).unwrap();
        let have: BTreeSet<String> = r.list_all(NS).await.unwrap().into_iter().map(|m| m.id).collect();
        let lost: Vec<&String> = acked.difference(&have).collect();
        assert!(lost.is_empty(), "node {} lost {} acknowledged writes, e.g. {:?}", n.id, lost.len(), lost.first());
        assert!(!have.contains(&gone), "node {} still has the deleted memory", n.id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enospc_in_the_log_keeps_the_node_up_and_it_starts_again_when_space_returns() {
    if !have_root() {
        return;
    }
    let fs = Tmpfs::mount(48);
    let ballast = fs.ballast(24);
    // Admission off: writes run until redb itself meets ENOSPC.
    let mut node = node_on(1, &fs, 0);
    node.start(bin(), 100);
    let pid = node.pid().unwrap();
    let c = init(std::slice::from_ref(&node)).await;
    c.create_namespace(NS, DIM as u32, Metric::Cosine).await.unwrap();

    let w = once(&node.api);
    let mut acked: BTreeSet<String> = BTreeSet::new();
    let started = Instant::now();
    let mut seed = 1u64;
    let error = loop {
        assert!(started.elapsed() < Duration::from_secs(180), "the disk never filled: {} acknowledged", acked.len());
        seed += 1;
        match batch(&w, seed, 25).await {
            Ok(ids) => acked.extend(ids),
            Err(e) => break e,
        }
    };
    eprintln!("{} memories acknowledged; then: {error}", acked.len());
    assert!(acked.len() > 100, "only {} writes were acknowledged", acked.len());

    // The node stays up (no exit, no crash loop) and says why on /status.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(node.exited().is_none(), "the node exited on a full disk: {}", tail(&node.log));
        let body = tokio::time::timeout(Duration::from_secs(2), http_get(&node.http, "/status")).await;
        if let Ok(Some(body)) = body {
            if body.contains("the disk is full") {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                assert_eq!(v["status"], "down", "{v}");
                assert_eq!(v["storage"]["disk"]["writes"], "refused", "{v}");
                break;
            }
        }
        assert!(Instant::now() < deadline, "the node never said its disk is full");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(node.exited().is_none(), "the node exited while waiting for space");
    assert_eq!(node.pid(), Some(pid));

    // Space comes back: the node starts again by itself, as the same process.
    std::fs::remove_file(&ballast).unwrap();
    let c = Client::new([node.api.clone()]).unwrap().creating_namespaces();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(node.exited().is_none(), "the node exited instead of starting again: {}", tail(&node.log));
        match batch(&once(&node.api), 999_999, 5).await {
            Ok(ids) => {
                acked.extend(ids);
                break;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "the node did not come back after space was freed: {e}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
    assert_eq!(node.pid(), Some(pid), "started again in place, not by a supervisor");
    let have: BTreeSet<String> = c.list_all(NS).await.unwrap().into_iter().map(|m| m.id).collect();
    let lost: Vec<&String> = acked.difference(&have).collect();
    assert!(lost.is_empty(), "{} acknowledged writes lost, e.g. {:?}", lost.len(), lost.first());
}
