//! One side of the Rust-vs-Python SDK comparison (`scripts/bench-sdk.sh` runs both against
//! the same cluster, alternating): `--ops` puts (server-assigned ids, one idempotency key each)
//! then `--ops` top-10 searches, from `--concurrency` tasks sharing one client. Prints one JSON
//! line: throughput (ops/s) and latency percentiles (ms) for each.
//!
//! `cargo bench --bench sdk_compare -- --endpoints 127.0.0.1:7001 --namespace bench/rust-1`

use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use engram::client::{Client, Metric, NewMemory};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, value_delimiter = ',')]
    endpoints: Vec<String>,
    #[arg(long)]
    namespace: String,
    #[arg(long, default_value_t = 2000)]
    ops: usize,
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    #[arg(long, default_value_t = 384)]
    dim: usize,
    #[arg(long, hide = true)]
    bench: bool,
}

fn vector(seed: usize, dim: usize) -> Vec<f32> {
    let mut x = seed as u64 * 0x9E37_79B9_7F4A_7C15 + 1;
    (0..dim)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 10_000) as f32 / 10_000.0 + 0.001
        })
        .collect()
}

fn summary(name: &str, mut lat: Vec<f64>, wall: f64) -> serde_json::Value {
    lat.sort_by(f64::total_cmp);
    let p = |q: f64| lat[((lat.len() as f64 - 1.0) * q).round() as usize] * 1000.0;
    serde_json::json!({ "op": name, "ops_per_sec": lat.len() as f64 / wall, "p50_ms": p(0.5), "p99_ms": p(0.99) })
}

async fn run<F, Fut>(ops: usize, concurrency: usize, f: F) -> (Vec<f64>, f64)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let f = Arc::new(f);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = w;
            while i < ops {
                let t = Instant::now();
                f(i).await;
                lat.push(t.elapsed().as_secs_f64());
                i += concurrency;
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    (all, started.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let client = Client::new(args.endpoints.clone()).unwrap();
    client.create_namespace(&args.namespace, args.dim as u32, Metric::Cosine).await.unwrap();
    let (c, ns, dim) = (client.clone(), args.namespace.clone(), args.dim);
    let (put_lat, put_wall) = run(args.ops, args.concurrency, move |i| {
        let (c, ns) = (c.clone(), ns.clone());
        async move {
            c.put(&ns, NewMemory::new(format!("memory number {i}"), vector(i, dim))).await.unwrap();
        }
    })
    .await;
    let (c, ns) = (client.clone(), args.namespace.clone());
    let (search_lat, search_wall) = run(args.ops, args.concurrency, move |i| {
        let (c, ns) = (c.clone(), ns.clone());
        async move {
            let hits = c.search(&ns, vector(i + 7, dim), 10).await.unwrap();
            assert!(!hits.hits.is_empty());
        }
    })
    .await;
    let out = serde_json::json!({
        "sdk": "rust",
        "put": summary("put", put_lat, put_wall),
        "search": summary("search", search_lat, search_wall),
    });
    println!("{out}");
}
