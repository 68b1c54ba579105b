//! What security costs: two 3-node clusters of real `engram` processes on loopback, fsync on,
//! one `--insecure` (plaintext, no authentication) and one secured (mutual TLS between the
//! nodes, TLS to clients, an API key per client checked against the replicated state, rate
//! limiting on, apply re-authorizing every write). The same load runs against each in
//! alternating rounds, so the machine's noise falls on both alike; the cluster not under load
//! is stopped (SIGSTOP) meanwhile, so its heartbeats take no CPU from the other:
//!
//! * put: 16 clients, one memory per call (384-d), throughput and latency;
//! * search: 16 clients, top-10 over 2,000 memories, throughput and latency.
//!
//! Figures are medians over the rounds, with the secured/insecure ratio.
//! Run: `cargo bench --bench security_overhead -- --rounds 3 --secs 5` (needs the release
//! binaries: `cargo build --release --bins`).
//!
//! `--at-rest` compares encryption at rest instead: both clusters secured, one also sealing
//! every memory (log, state, snapshots, index files) under per-namespace data keys
//! (`docs/encryption.md`); the same put and search phases, plus batched puts (100 per call),
//! where sealing is the largest share of a write.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "../tests/common/process.rs"]
#[allow(dead_code)]
mod process;

use clap::Parser;
use engram::auth::certs::CertAuthority;
use engram::auth::token::ApiKey;
use engram::client::{Client, ClientOptions, ClientTls, NewMemory, RetryPolicy};
use engram::proto as pb;
use process::EngramProcess;

#[derive(Parser, Debug)]
struct Args {
    /// Rounds (each runs every phase on both clusters).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds per phase.
    #[arg(long, default_value_t = 5)]
    secs: u64,
    #[arg(long, default_value_t = 16)]
    clients: usize,
    #[arg(long, default_value_t = 384)]
    dim: usize,
    /// The node binary [default: target/release/engram].
    #[arg(long)]
    engram_bin: Option<PathBuf>,
    /// First of 18 consecutive loopback ports.
    #[arg(long, default_value_t = 28001)]
    base_port: u16,
    /// Compare a secured cluster with and without encryption at rest.
    #[arg(long)]
    at_rest: bool,
    #[arg(long, hide = true)]
    bench: bool,
}

struct Setup {
    procs: Vec<EngramProcess>,
    clients: Vec<Client>,
}

impl Setup {
    /// Stops (SIGSTOP) or resumes (SIGCONT) every process of the cluster.
    fn pause(&self, stop: bool) {
        for p in &self.procs {
            let sig = if stop { libc::SIGSTOP } else { libc::SIGCONT };
            // SAFETY: kill(2) on a child this benchmark started.
            unsafe { libc::kill(p.pid().unwrap() as i32, sig) };
        }
    }
}

fn vector(dim: usize, seed: u64) -> Vec<f32> {
    (0..dim).map(|i| ((seed as usize * 131 + i * 17) % 1009) as f32 / 1009.0).collect()
}

async fn boot(bin: &std::path::Path, dir: &std::path::Path, base: u16, secure: bool, at_rest: bool, a: &Args) -> Setup {
    let ca = CertAuthority::generate("bench", 1).unwrap();
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::write(certs.join("ca.pem"), &ca.cert_pem).unwrap();
    let mut procs = Vec::new();
    for id in 1..=3u64 {
        let p = |k: u16| format!("127.0.0.1:{}", base + k * 3 + id as u16 - 1);
        let mut proc = EngramProcess::new(id, p(0), p(1), p(2), dir.join(format!("n{id}")));
        if secure {
            let n = ca.issue_node(id, &["127.0.0.1".into()], 1).unwrap();
            let (c, k) = (certs.join(format!("n{id}.pem")), certs.join(format!("n{id}-key.pem")));
            std::fs::write(&c, &n.cert_pem).unwrap();
            engram::secrets::write_private(&k, n.key_pem.as_bytes(), true).unwrap();
            proc.security = ["--tls-ca-file", certs.join("ca.pem").to_str().unwrap(), "--tls-cert-file"]
                .iter()
                .map(|s| s.to_string())
                .chain([c.to_str().unwrap().to_string(), "--tls-key-file".into(), k.to_str().unwrap().to_string()])
                .collect();
        }
        if at_rest {
            let key = dir.join("at-rest-keys.toml");
            if !key.exists() {
                engram::backup::keys::generate(&key).unwrap();
            }
            proc.security.extend(["--at-rest-key-file".to_string(), key.to_str().unwrap().to_string()]);
        }
        proc.start(bin, 100);
        procs.push(proc);
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let members: Vec<pb::NodeInfo> =
        procs.iter().map(|p| pb::NodeInfo { id: p.id, raft_addr: p.raft.clone(), api_addr: p.api.clone() }).collect();
    let eps: Vec<String> = procs.iter().map(|p| p.api.clone()).collect();
    let tls = secure.then(|| ClientTls {
        ca_pem: ca.cert_pem.clone().into_bytes(),
        server_name: Some("bench.engram".into()),
        identity: None,
    });
    let opts = |credential| ClientOptions {
        retry: RetryPolicy { max_attempts: 50, ..Default::default() },
        tls: tls.clone(),
        credential,
        create_namespaces: true,
    };
    let root = ApiKey::generate();
    let first = Client::with_options([eps[0].clone()], opts(None)).unwrap();
    if secure {
        first.admin().init_secure_cluster(members, &root).await.expect("init");
    } else {
        first.admin().init_cluster(members).await.expect("init");
    }
    let admin = Client::with_options(eps.clone(), opts(secure.then(|| root.expose().to_string()))).unwrap();
    while admin.admin().status().await.map(|s| s.leader_id == 0).unwrap_or(true) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut clients = Vec::new();
    if secure {
        admin.auth().create_role("bench").await.unwrap();
        admin.auth().grant("bench", "bench/*", &["read", "write"], None).await.unwrap();
    }
    for i in 0..a.clients {
        let cred = if secure {
            Some(admin.auth().create_key(&format!("client-{i}"), &["bench"], 0).await.unwrap().key)
        } else {
            None
        };
        clients.push(Client::with_options(eps.clone(), opts(cred)).unwrap());
    }
    let items: Vec<_> = (0..2000u64)
        .map(|i| (NewMemory::new(format!("seed memory {i}"), vector(a.dim, i)), Default::default()))
        .collect();
    for chunk in items.chunks(500) {
        clients[0].put_batch("bench/search", chunk.to_vec()).await.unwrap();
    }
    Setup { procs, clients }
}

/// Each client calls `op` in a loop for `secs`; returns (ops/s, p50, p99).
async fn load<F, Fut>(clients: &[Client], secs: u64, op: F) -> (f64, Duration, Duration)
where
    F: Fn(Client, u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (w, c) in clients.iter().enumerate() {
        let (c, stop, op) = (c.clone(), stop.clone(), op.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                op(c.clone(), w as u64 * 1_000_000_000 + i).await;
                lat.push(t.elapsed());
                i += 1;
            }
            lat
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    let pct = |p: f64| all.get(((all.len().max(1) - 1) as f64 * p) as usize).copied().unwrap_or_default();
    (all.len() as f64 / secs as f64, pct(0.5), pct(0.99))
}

/// One phase's (ops/s, p50 ms, p99 ms).
type Figures = (f64, f64, f64);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let a = Args::parse();
    let bin =
        a.engram_bin.clone().unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/engram"));
    assert!(bin.exists(), "{} not found: run `cargo build --release --bins` first", bin.display());
    let tmp = tempfile::tempdir().unwrap();
    let (off_mode, on_mode) = if a.at_rest { ("secured", "+ at rest") } else { ("insecure", "mTLS + keys") };
    let off = boot(&bin, &tmp.path().join("off"), a.base_port, a.at_rest, false, &a).await;
    let on = boot(&bin, &tmp.path().join("on"), a.base_port + 9, true, a.at_rest, &a).await;
    let dim = a.dim;
    // (workload, mode) -> per-round (ops/s, p50 ms, p99 ms)
    let mut rows: std::collections::BTreeMap<(&str, &str), Vec<Figures>> = Default::default();
    for round in 0..a.rounds {
        // Alternate which mode goes first, so neither always runs on a freshly woken machine.
        let order = if round % 2 == 0 {
            [(off_mode, &off, &on), (on_mode, &on, &off)]
        } else {
            [(on_mode, &on, &off), (off_mode, &off, &on)]
        };
        for (mode, s, other) in order {
            other.pause(true);
            s.pause(false);
            tokio::time::sleep(Duration::from_millis(1500)).await; // elections settle after a resume
            let put = load(&s.clients, a.secs, move |c, i| async move {
                c.put("bench/put", NewMemory::new(format!("memory {i}"), vector(dim, i))).await.expect("put");
            })
            .await;
            let search = load(&s.clients, a.secs, move |c, i| async move {
                c.search("bench/search", vector(dim, i % 5000), 10).await.expect("search");
            })
            .await;
            // Memories per second in calls of 100 (ops/s below counts memories).
            let batch = load(&s.clients, a.secs, move |c, i| async move {
                let items: Vec<_> = (0..100u64)
                    .map(|j| {
                        (
                            NewMemory::new(format!("batched memory {i} {j}"), vector(dim, i * 100 + j)),
                            Default::default(),
                        )
                    })
                    .collect();
                c.put_batch("bench/batch", items).await.expect("batch put");
            })
            .await;
            let batch = (batch.0 * 100.0, batch.1, batch.2);
            other.pause(false);
            for (w, (ops, p50, p99)) in [("put", put), ("search", search), ("put x100", batch)] {
                eprintln!("round {round} {w:<6} {mode:<12} {ops:>8.0} ops/s  p50 {p50:?}  p99 {p99:?}");
                rows.entry((w, mode)).or_default().push((ops, p50.as_secs_f64() * 1e3, p99.as_secs_f64() * 1e3));
            }
        }
    }
    println!("\n| workload ({} clients) | mode | ops/s | p50 ms | p99 ms |", a.clients);
    println!("|---|---|---|---|---|");
    let mut med = std::collections::BTreeMap::new();
    for ((w, mode), v) in &rows {
        let m = (
            median(v.iter().map(|x| x.0).collect()),
            median(v.iter().map(|x| x.1).collect()),
            median(v.iter().map(|x| x.2).collect()),
        );
        println!("| {w} | {mode} | {:.0} | {:.2} | {:.2} |", m.0, m.1, m.2);
        med.insert((*w, *mode), m);
    }
    println!();
    for w in ["put", "search", "put x100"] {
        let (off, on) = (med[&(w, off_mode)], med[&(w, on_mode)]);
        println!(
            "{w}: {on_mode}/{off_mode} throughput {:.3} ({:+.1}%), p50 {:.3}x, p99 {:.3}x",
            on.0 / off.0,
            (on.0 / off.0 - 1.0) * 100.0,
            on.1 / off.1,
            on.2 / off.2
        );
    }
}
