//! Load generator against a real 3-node cluster of `engram` processes on loopback, fsync on.
//!
//! Measures, in one run so the figures compare side by side:
//! * single-put throughput and latency at 1, 16 and 64 concurrent clients;
//! * batch-of-100 throughput;
//! * get latency p50/p99 at each consistency level, on the leader and on a follower;
//! * time from kill -9 of the leader to the first acknowledged write on a new leader.
//!
//! Run: `scripts/bench.sh` (builds release binaries first), or
//! `cargo bench --bench cluster_load -- --duration-secs 10`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "../tests/common/process.rs"]
#[allow(dead_code)] // shared with tests/process_kill.rs, which uses all of it
mod process;

use clap::Parser;
use engram::client::{Client, Consistency, NewMemory, Precondition, RetryPolicy};
use engram::proto as pb;
use process::EngramProcess;

#[derive(Parser, Debug)]
struct Args {
    /// Seconds per throughput/latency phase.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Embedding dimension of the written memories.
    #[arg(long, default_value_t = 384)]
    dim: usize,
    /// Kill -9 trials for the failover measurement.
    #[arg(long, default_value_t = 5)]
    failover_trials: usize,
    /// The node binary [default: target/release/engram].
    #[arg(long)]
    engram_bin: Option<PathBuf>,
    /// First of 9 consecutive loopback ports to use.
    #[arg(long, default_value_t = 27001)]
    base_port: u16,
    /// Passed to every node (0: fsync the state machine on every apply).
    #[arg(long, default_value_t = 100)]
    state_sync_interval_ms: u64,
    /// Accepted for `cargo bench` compatibility.
    #[arg(long, hide = true)]
    bench: bool,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn memory(dim: usize, seed: u64) -> NewMemory {
    let embedding = (0..dim).map(|i| ((seed as usize * 131 + i * 17) % 1009) as f32 / 1009.0).collect();
    NewMemory::new(
        format!("memory {seed}: the user prefers green tea in the afternoon and dislikes meetings before ten."),
        embedding,
    )
}

/// Runs `workers` tasks, each calling `op` in a loop for `dur`; returns (ops, sorted latencies).
async fn run_load<F, Fut>(workers: usize, dur: Duration, op: F) -> (u64, Vec<Duration>)
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (op, stop) = (op.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                op(w as u64 * 1_000_000_000 + i).await;
                lat.push(t.elapsed());
                i += 1;
            }
            lat
        }));
    }
    tokio::time::sleep(dur).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    (all.len() as u64, all)
}

async fn leader(client: &Client) -> (u64, String) {
    loop {
        if let Ok(s) = client.admin().status().await {
            if s.leader_id != 0 && !s.leader_api_addr.is_empty() {
                return (s.leader_id, s.leader_api_addr);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let bin = args
        .engram_bin
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/engram"));
    assert!(bin.exists(), "{} not found: run `cargo build --release --bins` first", bin.display());
    let tmp = tempfile::tempdir().unwrap();
    let mut procs: Vec<EngramProcess> = (1..=3u64)
        .map(|id| {
            let p = |k: u16| format!("127.0.0.1:{}", args.base_port + k * 3 + id as u16 - 1);
            EngramProcess::new(id, p(0), p(1), p(2), tmp.path().join(format!("n{id}")))
        })
        .collect();
    for p in procs.iter_mut() {
        p.start(&bin, args.state_sync_interval_ms);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let members =
        procs.iter().map(|p| pb::NodeInfo { id: p.id, raft_addr: p.raft.clone(), api_addr: p.api.clone() }).collect();
    Client::new([procs[0].api.clone()])
        .unwrap()
        .creating_namespaces()
        .admin()
        .init_cluster(members)
        .await
        .expect("init");
    let endpoints: Vec<String> = procs.iter().map(|p| p.api.clone()).collect();
    let client = Client::new(endpoints.clone()).unwrap().creating_namespaces();
    let (leader_id, leader_addr) = leader(&client).await;
    client.create_namespace("bench/a", args.dim as u32, engram::client::Metric::Cosine).await.unwrap();
    let dur = Duration::from_secs(args.duration_secs);
    println!(
        "engram cluster_load: 3 nodes (processes), loopback, fsync on, dim={}, {}s per phase",
        args.dim, args.duration_secs
    );
    println!("leader: node {leader_id} at {leader_addr}\n");

    println!("| workload | clients | ops/s | memories/s | p50 ms | p99 ms |");
    println!("|---|---|---|---|---|---|");
    for clients in [1usize, 16, 64] {
        let c = Client::new([leader_addr.clone()]).unwrap().creating_namespaces();
        let dim = args.dim;
        let (n, lat) = run_load(clients, dur, move |i| {
            let c = c.clone();
            async move {
                c.put("bench/a", memory(dim, i).with_id(format!("s{i}"))).await.unwrap();
            }
        })
        .await;
        let rate = n as f64 / dur.as_secs_f64();
        println!(
            "| put | {clients} | {rate:.0} | {rate:.0} | {} | {} |",
            ms(percentile(&lat, 0.5)),
            ms(percentile(&lat, 0.99))
        );
    }
    for clients in [1usize, 4] {
        let c = Client::new([leader_addr.clone()]).unwrap().creating_namespaces();
        let dim = args.dim;
        let (n, lat) = run_load(clients, dur, move |i| {
            let c = c.clone();
            async move {
                let items = (0..100)
                    .map(|j| (memory(dim, i * 100 + j).with_id(format!("b{i}-{j}")), Precondition::None))
                    .collect();
                c.put_batch("bench/a", items).await.unwrap();
            }
        })
        .await;
        let rate = n as f64 / dur.as_secs_f64();
        println!(
            "| put_batch(100) | {clients} | {rate:.0} | {:.0} | {} | {} |",
            rate * 100.0,
            ms(percentile(&lat, 0.5)),
            ms(percentile(&lat, 0.99))
        );
    }

    // Reads: a fixed set of ids, one client, each consistency, leader and a follower.
    let follower = procs.iter().find(|p| p.id != leader_id).unwrap().api.clone();
    println!("\n| get | served by | p50 ms | p99 ms | ops/s (1 client) |");
    println!("|---|---|---|---|---|");
    for (name, cons) in
        [("linearizable", Consistency::Linearizable), ("lease", Consistency::Lease), ("stale", Consistency::Stale)]
    {
        for (role, addr) in [("leader", leader_addr.clone()), ("follower", follower.clone())] {
            let c = Client::pinned(&addr).unwrap();
            let (n, lat) = run_load(1, dur / 2, move |i| {
                let c = c.clone();
                async move {
                    c.get_with("bench/a", &format!("s{}", i % 100), cons).await.unwrap();
                }
            })
            .await;
            println!(
                "| {name} | {role} | {} | {} | {:.0} |",
                ms(percentile(&lat, 0.5)),
                ms(percentile(&lat, 0.99)),
                n as f64 / (dur / 2).as_secs_f64()
            );
        }
    }

    // Failover: kill -9 the leader; time until a write is acknowledged by a new leader.
    println!("\n| failover trial | killed | new leader | kill -9 → first ack ms |");
    println!("|---|---|---|---|");
    let mut times = Vec::new();
    for trial in 0..args.failover_trials {
        let (lid, _) = leader(&client).await;
        let survivors: Vec<String> = procs.iter().filter(|p| p.id != lid).map(|p| p.api.clone()).collect();
        let fast = RetryPolicy {
            max_attempts: 1000,
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
            timeout: Duration::from_millis(300),
            ..RetryPolicy::default()
        };
        let writer = Client::with_retry(survivors, fast).unwrap().creating_namespaces();
        let victim = procs.iter_mut().find(|p| p.id == lid).unwrap();
        let t0 = Instant::now();
        victim.kill9();
        writer.put("bench/a", memory(args.dim, trial as u64).with_id(format!("failover-{trial}"))).await.unwrap();
        let took = t0.elapsed();
        let (new_leader, _) = leader(&writer).await;
        println!("| {trial} | {lid} | {new_leader} | {} |", ms(took));
        times.push(took);
        // Bring the victim back from its data dir and let it catch up before the next trial.
        victim.start(&bin, args.state_sync_interval_ms);
        let pinned = Client::with_retry([victim.api.clone()], RetryPolicy { max_attempts: 200, ..Default::default() })
            .unwrap()
            .creating_namespaces();
        pinned.get("bench/a", &format!("failover-{trial}")).await.unwrap();
    }
    times.sort();
    println!(
        "\nfailover median {} ms (min {}, max {}) over {} kill -9 trials",
        ms(percentile(&times, 0.5)),
        ms(times[0]),
        ms(*times.last().unwrap()),
        times.len()
    );

    // Durability check: every phase's acknowledged failover write is still there.
    for trial in 0..args.failover_trials {
        client.get("bench/a", &format!("failover-{trial}")).await.expect("acknowledged write lost");
    }
    for p in procs.iter_mut() {
        p.kill9();
    }
}
