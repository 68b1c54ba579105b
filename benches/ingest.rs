//! PutBatch ingest into a real 3-node cluster of release `engram` processes on loopback (every
//! batch fsynced to a majority's Raft log before it is acknowledged), from the Rust SDK.
//!
//! Loads the dataset's vectors and texts (`base.fvecs` + `base.jsonl`, e.g.
//! `../shared/datasets/debian-minilm`: 30k × 384-d) into a fresh namespace per configuration,
//! for each batch size × writers in flight, and prints memories/s and batch latency, side by
//! side in one run. Without the dataset it uses synthetic 384-d vectors.
//!
//! Run: `cargo build --release --bins && cargo bench --bench ingest -- --dataset ../shared/datasets/debian-minilm`

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[path = "common/mod.rs"]
mod common;

use common::process;

use clap::Parser;
use engram::client::{Metric, NewMemory, Precondition};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "../shared/datasets/debian-minilm")]
    dataset: PathBuf,
    /// Memories per configuration (at most the dataset's).
    #[arg(long, default_value_t = 30_000)]
    n: usize,
    /// Batch sizes to try (comma-separated).
    #[arg(long, default_value = "100,1000", value_delimiter = ',')]
    batches: Vec<usize>,
    /// Writers in flight to try (comma-separated).
    #[arg(long, default_value = "1,4", value_delimiter = ',')]
    writers: Vec<usize>,
    #[arg(long)]
    engram_bin: Option<PathBuf>,
    #[arg(long, default_value_t = 28001)]
    base_port: u16,
    #[arg(long, hide = true)]
    bench: bool,
}

fn read_fvecs(path: &Path) -> Option<(usize, Vec<f32>)> {
    let bytes = std::fs::read(path).ok()?;
    let dim = i32::from_le_bytes(bytes[..4].try_into().ok()?) as usize;
    let rec = 4 + dim * 4;
    let mut out = Vec::with_capacity(bytes.len() / rec * dim);
    for r in bytes.chunks_exact(rec) {
        out.extend(r[4..].chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())));
    }
    Some((dim, out))
}

fn texts(path: &Path, n: usize) -> Vec<String> {
    let Ok(s) = std::fs::read_to_string(path) else { return Vec::new() };
    s.lines()
        .take(n)
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["text"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let bin = common::release_bin(args.engram_bin.clone());
    let (dim, vectors, texts, source) = match read_fvecs(&args.dataset.join("base.fvecs")) {
        Some((dim, v)) => {
            let n = (v.len() / dim).min(args.n);
            (dim, v[..n * dim].to_vec(), texts(&args.dataset.join("base.jsonl"), n), args.dataset.display().to_string())
        }
        None => {
            let v = engram::vector::synthetic::clustered(args.n, 384, 64, 7, 1);
            (384, v, Vec::new(), "synthetic".to_string())
        }
    };
    let n = vectors.len() / dim;
    let items: Vec<NewMemory> = (0..n)
        .map(|i| {
            let text = texts.get(i).cloned().unwrap_or_else(|| format!("memory {i}"));
            NewMemory::new(text, vectors[i * dim..(i + 1) * dim].to_vec()).with_id(format!("m{i:06}"))
        })
        .collect();

    let tmp = tempfile::tempdir().unwrap();
    let (mut procs, client) = process::cluster_of_three(&bin, args.base_port, tmp.path(), 100).await;

    println!("ingest: {n} memories of {dim}-d from {source}; 3 nodes, fsync on\n");
    println!("| batch | writers | memories/s | batch p50 ms | batch p99 ms |");
    println!("|---|---|---|---|---|");
    for &batch in &args.batches {
        for &writers in &args.writers {
            let ns = format!("ingest/b{batch}-w{writers}");
            client.create_namespace(&ns, dim as u32, Metric::Cosine).await.unwrap();
            let chunks: Vec<Vec<NewMemory>> = items.chunks(batch).map(|c| c.to_vec()).collect();
            let queue = std::sync::Arc::new(std::sync::Mutex::new(chunks.into_iter()));
            let started = Instant::now();
            let mut tasks = Vec::new();
            for _ in 0..writers {
                let (queue, client, ns) = (queue.clone(), client.clone(), ns.clone());
                tasks.push(tokio::spawn(async move {
                    let mut lat = Vec::new();
                    loop {
                        let Some(chunk) = queue.lock().unwrap().next() else { break };
                        let items = chunk.into_iter().map(|m| (m, Precondition::None)).collect();
                        let t = Instant::now();
                        client.put_batch(&ns, items).await.unwrap();
                        lat.push(t.elapsed());
                    }
                    lat
                }));
            }
            let mut lat = Vec::new();
            for t in tasks {
                lat.extend(t.await.unwrap());
            }
            let secs = started.elapsed().as_secs_f64();
            lat.sort();
            println!(
                "| {batch} | {writers} | {:.0} | {:.1} | {:.1} |",
                n as f64 / secs,
                percentile(&lat, 0.5),
                percentile(&lat, 0.99)
            );
            let d = client.describe_namespace(&ns).await.unwrap();
            assert_eq!(d.namespace.unwrap().memory_count, n as u64, "every memory landed");
        }
    }
    for p in procs.iter_mut() {
        p.kill9();
    }
}
