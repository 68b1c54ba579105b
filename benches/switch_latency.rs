//! Write latency while a namespace switches from its exact Flat shard to HNSW, against the
//! same writes just before, on a real 3-node cluster of release `engram` processes.
//!
//! The nodes run with `approx_min_vectors = --n`. The namespace is loaded to `--n − --margin`
//! memories with PutBatch; `--writers` clients then put single memories (phase 1, Flat, no
//! rebuild) until `--margin − 1` more went in; one more put crosses `--n` and every node starts
//! building the HNSW graph in the background; the same writers go on (phase 2) until no node
//! is building. Prints p50/p99/max of both phases and their ratio, plus the build's length.
//!
//! Run: `cargo build --release --bins && cargo bench --bench switch_latency -- --n 200000`

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[path = "common/mod.rs"]
mod common;

use common::process;

use clap::Parser;
use engram::client::{Client, Metric, NewMemory, Precondition};
use engram::vector::synthetic;

#[derive(Parser, Debug)]
struct Args {
    /// The switch threshold, and the namespace's size when it crosses it.
    #[arg(long, default_value_t = 200_000)]
    n: u64,
    /// Single puts of phase 1 (below the threshold).
    #[arg(long, default_value_t = 4_000)]
    margin: u64,
    #[arg(long, default_value_t = 128)]
    dim: usize,
    #[arg(long, default_value_t = 8)]
    writers: usize,
    #[arg(long)]
    engram_bin: Option<PathBuf>,
    #[arg(long, default_value_t = 28501)]
    base_port: u16,
    #[arg(long, hide = true)]
    bench: bool,
}

/// Memory `seed`: one of `engram::vector::synthetic`'s clustered unit vectors (the same space
/// for every seed, drawn by the seed), so the graph is built over embedding-like data.
fn memory(dim: usize, seed: u64) -> NewMemory {
    let v = synthetic::clustered(1, dim, 64, 7, seed);
    NewMemory::new(format!("memory {seed}: a short note"), v).with_id(format!("m{seed:08}"))
}

/// `writers` clients putting single memories until `stop` says so or `limit` puts went in;
/// every latency.
async fn writes(
    client: &Client,
    ns: &'static str,
    dim: usize,
    writers: usize,
    next: Arc<AtomicU64>,
    limit: u64,
    stop: Arc<AtomicBool>,
) -> Vec<Duration> {
    let lat = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let (client, next, stop, lat) = (client.clone(), next.clone(), stop.clone(), lat.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= limit {
                    break;
                }
                let t = Instant::now();
                client.put(ns, memory(dim, seed)).await.expect("a put");
                lat.lock().unwrap().push(t.elapsed());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut v = std::mem::take(&mut *lat.lock().unwrap());
    v.sort();
    v
}

fn summary(lat: &[Duration]) -> (f64, f64, f64) {
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e3;
    (pct(0.5), pct(0.99), pct(1.0))
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    assert!(args.margin >= 2 && args.margin < args.n, "--margin must be in 2..n");
    let bin = common::release_bin(args.engram_bin.clone());
    // The nodes inherit it.
    std::env::set_var("ENGRAM_APPROX_MIN_VECTORS", args.n.to_string());
    let tmp = tempfile::tempdir().unwrap();
    let (mut procs, client) = process::cluster_of_three_timed(&bin, args.base_port, tmp.path(), 100, None).await;
    const NS: &str = "bench/switch";
    client.create_namespace(NS, args.dim as u32, Metric::Cosine).await.unwrap();

    let preload = args.n - args.margin;
    let t0 = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut loaders = Vec::new();
    for _ in 0..4 {
        let (client, next, dim) = (client.clone(), next.clone(), args.dim);
        loaders.push(tokio::spawn(async move {
            loop {
                let from = next.fetch_add(1000, Ordering::Relaxed);
                if from >= preload {
                    break;
                }
                let items = (from..(from + 1000).min(preload)).map(|s| (memory(dim, s), Precondition::None)).collect();
                client.put_batch(NS, items).await.expect("a batch");
            }
        }));
    }
    for l in loaders {
        l.await.unwrap();
    }
    common::wait_built(&procs, Some(preload)).await;
    println!(
        "switch_latency: 3 release nodes, approx_min_vectors {}, {}-d, {} writers; loaded {preload} in {:.1} s\n",
        args.n,
        args.dim,
        args.writers,
        t0.elapsed().as_secs_f64()
    );

    // Phase 1: Flat, nothing rebuilding.
    let next = Arc::new(AtomicU64::new(preload));
    let before =
        writes(&client, NS, args.dim, args.writers, next.clone(), args.n - 1, Arc::new(AtomicBool::new(false))).await;
    // The put that crosses the threshold.
    client.put(NS, memory(args.dim, args.n - 1)).await.unwrap();
    next.store(args.n, Ordering::Relaxed);
    let build_started = Instant::now();
    // Phase 2: the same writes while the nodes build their graphs.
    let stop = Arc::new(AtomicBool::new(false));
    let during = {
        let (client, next, stop2) = (client.clone(), next.clone(), stop.clone());
        let dim = args.dim;
        let w = args.writers;
        let h = tokio::spawn(async move { writes(&client, NS, dim, w, next, u64::MAX, stop2).await });
        // Building starts on each node when it applies the crossing put.
        tokio::time::sleep(Duration::from_millis(500)).await;
        common::wait_built(&procs, None).await;
        stop.store(true, Ordering::Relaxed);
        h.await.unwrap()
    };
    let build_secs = build_started.elapsed().as_secs_f64();
    let (b50, b99, bmax) = summary(&before);
    let (d50, d99, dmax) = summary(&during);
    println!("| phase | puts | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|");
    println!("| Flat, no rebuild | {} | {b50:.1} | {b99:.1} | {bmax:.1} |", before.len());
    println!(
        "| during the Flat → HNSW build ({build_secs:.1} s) | {} | {d50:.1} | {d99:.1} | {dmax:.1} |",
        during.len()
    );
    println!("\nwrite p99 during the switch / without: {:.2}×", d99 / b99);
    for p in procs.iter_mut() {
        p.kill9();
    }
}
