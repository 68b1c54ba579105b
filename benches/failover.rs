//! kill -9 of the leader → first acknowledged write, on a real 3-node cluster of release
//! `engram` processes on loopback with the nodes' default heartbeat and election timeouts
//! (or `--timing H,MIN,MAX`), under write load; plus a load-only phase that counts spurious
//! elections (term changes with every node alive).
//!
//! Each trial: `--writers` clients keep putting 384-d memories; the leader is killed with
//! SIGKILL; a separate writer (fast retries, addressed to the survivors) times its first
//! acknowledged put; the victim restarts from its data dir, and the next trial starts once
//! every node has applied to within 64 entries of the leader (a healthy cluster).
//!
//! Run: `cargo build --release --bins && cargo bench --bench failover -- --trials 20`

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "common/mod.rs"]
mod common;

use common::process;

use clap::Parser;
use engram::client::{Client, Metric, NewMemory, RetryPolicy};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value_t = 20)]
    trials: usize,
    /// Background writers during the trials and the load-only phase.
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// Seconds of load with every node alive, counting elections.
    #[arg(long, default_value_t = 20)]
    steady_secs: u64,
    /// Heartbeat, election-timeout min and max (ms) for every node; default: the nodes' own.
    #[arg(long, value_delimiter = ',')]
    timing: Option<Vec<u64>>,
    #[arg(long)]
    engram_bin: Option<PathBuf>,
    #[arg(long, default_value_t = 28201)]
    base_port: u16,
    #[arg(long, hide = true)]
    bench: bool,
}

fn memory(seed: u64) -> NewMemory {
    let v: Vec<f32> = (0..384).map(|i| ((seed as usize * 131 + i * 17) % 1009) as f32 / 1009.0 - 0.5).collect();
    NewMemory::new(format!("memory {seed}: the user prefers green tea in the afternoon."), v)
}

async fn leader(client: &Client) -> u64 {
    loop {
        if let Ok(s) = client.admin().status().await {
            if s.leader_id != 0 {
                return s.leader_id;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts `n` writers putting into `ns` until `stop`; counts acknowledged puts.
fn load(client: &Client, ns: &str, n: usize, stop: &Arc<AtomicBool>, acked: &Arc<AtomicU64>) {
    for w in 0..n {
        let (client, ns, stop, acked) = (client.clone(), ns.to_string(), stop.clone(), acked.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if client.put(&ns, memory(w as u64 * 1_000_000 + i)).await.is_ok() {
                    acked.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
        });
    }
}

/// How far behind the leader's log a node may be for the cluster to count as healthy.
const CAUGHT_UP: u64 = 64;

/// Waits until every running node has applied to within [`CAUGHT_UP`] entries of the leader's
/// last log index (from each node's /status); gives up (and says so) after two minutes.
async fn caught_up(procs: &[process::EngramProcess]) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if Instant::now() > deadline {
            println!("(a node is still more than {CAUGHT_UP} entries behind after 120 s; going on)");
            return;
        }
        let mut applied = Vec::new();
        let mut leader_last = None;
        for p in procs.iter().filter(|p| p.is_running()) {
            let status: serde_json::Value =
                serde_json::from_str(&process::http_get(&p.http, "/status").await).unwrap_or_default();
            let raft = &status["raft"];
            applied.push(raft["applied_index"].as_u64().unwrap_or(0));
            if raft["state"] == "leader" {
                leader_last = raft["last_log_index"].as_u64();
            }
        }
        if let Some(last) = leader_last {
            if applied.iter().all(|a| a + CAUGHT_UP >= last) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let bin = common::release_bin(args.engram_bin.clone());
    let timing = args.timing.as_ref().map(|t| {
        assert_eq!(t.len(), 3, "--timing H,MIN,MAX");
        [t[0], t[1], t[2]]
    });
    let tmp = tempfile::tempdir().unwrap();
    let (mut procs, client) = process::cluster_of_three_timed(&bin, args.base_port, tmp.path(), 100, timing).await;
    let client = client.creating_namespaces();
    const NS: &str = "bench/failover";
    client.create_namespace(NS, 384, Metric::Cosine).await.unwrap();
    let timing_desc = match timing {
        Some([h, lo, hi]) => format!("heartbeat {h} ms, election {lo}-{hi} ms"),
        None => "the nodes' default heartbeat and election timeouts".into(),
    };
    println!("failover: 3 release nodes, {timing_desc}, {} background writers\n", args.writers);

    // Steady load, every node alive: any term change is a spurious election.
    let (stop, acked) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    load(&client, NS, args.writers, &stop, &acked);
    let before = common::raft_terms(&procs).await;
    tokio::time::sleep(Duration::from_secs(args.steady_secs)).await;
    let after = common::raft_terms(&procs).await;
    println!(
        "steady load {} s: {} puts acknowledged ({:.0}/s); terms {before:?} → {after:?}: {} spurious election(s)",
        args.steady_secs,
        acked.load(Ordering::Relaxed),
        acked.load(Ordering::Relaxed) as f64 / args.steady_secs as f64,
        after.iter().max().unwrap_or(&0) - before.iter().max().unwrap_or(&0)
    );

    println!("\n| trial | killed | kill -9 → first ack ms | elections (term change) | new leader |");
    println!("|---|---|---|---|---|");
    let (mut times, mut catch_up) = (Vec::new(), Vec::new());
    for trial in 0..args.trials {
        let lid = leader(&client).await;
        let survivors: Vec<String> = procs.iter().filter(|p| p.id != lid).map(|p| p.api.clone()).collect();
        let fast = RetryPolicy {
            max_attempts: 10_000,
            initial_backoff: Duration::from_millis(2),
            max_backoff: Duration::from_millis(10),
            timeout: Duration::from_millis(300),
            ..RetryPolicy::default()
        };
        let writer = Client::with_retry(survivors, fast).unwrap();
        let term_before = common::raft_terms(&procs).await.into_iter().max().unwrap_or(0);
        let victim = procs.iter_mut().find(|p| p.id == lid).unwrap();
        let t0 = Instant::now();
        victim.kill9();
        writer.put(NS, memory(9_000_000 + trial as u64).with_id(format!("failover-{trial}"))).await.unwrap();
        let took = t0.elapsed();
        // More than one term per failover: a split or refused vote cost a round.
        let term_after = common::raft_terms(&procs).await.into_iter().max().unwrap_or(0);
        let new_leader = writer.admin().status().await.map(|s| s.leader_id).unwrap_or(0);
        println!(
            "| {trial} | {lid} | {:.0} | {} | {new_leader} |",
            took.as_secs_f64() * 1e3,
            term_after.saturating_sub(term_before)
        );
        let victim = procs.iter_mut().find(|p| p.id == lid).unwrap();
        times.push(took);
        victim.start(&bin, 100);
        let pinned =
            Client::with_retry([victim.api.clone()], RetryPolicy { max_attempts: 400, ..Default::default() }).unwrap();
        pinned.get(NS, &format!("failover-{trial}")).await.unwrap();
        // The next trial starts from a healthy cluster: every node applied to within
        // `CAUGHT_UP` entries of the leader. Without this, a victim still replaying its backlog
        // under the writers' load is the whole quorum of the next trial, and that trial times
        // the backlog, not the failover.
        let t = Instant::now();
        caught_up(&procs).await;
        catch_up.push(t.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    times.sort();
    catch_up.sort();
    println!(
        "\nkill -9 → first ack over {} trials: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({timing_desc})",
        times.len(),
        pct(&times, 0.5),
        pct(&times, 0.99),
        pct(&times, 1.0)
    );
    println!(
        "restarted victim → every node within {CAUGHT_UP} entries of the leader: p50 {:.0} ms, max {:.0} ms",
        pct(&catch_up, 0.5),
        pct(&catch_up, 1.0)
    );
    for p in procs.iter_mut() {
        p.kill9();
    }
}
