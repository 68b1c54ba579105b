//! Search through gRPC on a real 3-node cluster of release `engram` processes with default
//! search settings, linearizable, beside the in-process FAISS HNSW32 anchor on the same
//! vectors and queries, measured in one run.
//!
//! Loads `base.fvecs` (e.g. `../shared/datasets/debian-minilm`: 30k × 384-d) through
//! PutBatch(1000) × 4 writers, waits for every node to finish its background shard build,
//! then runs `queries.fvecs` against `groundtruth.ivecs` (inner product) with 1 and
//! `--clients` concurrent clients (each its own connection; the SDK sends reads to the
//! leader), plus SearchBatch(32). The anchor is FAISS HNSW32 (the same M and efConstruction as
//! a node's shard) searched on one thread in this process, at several ef.
//!
//! Run: `cargo build --release --bins && cargo bench --bench search_cluster -- --dataset ../shared/datasets/debian-minilm`

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

#[path = "common/mod.rs"]
mod common;

use common::process;

use clap::Parser;
use engram::client::{Client, Consistency, Metric, NewMemory, Precondition};
use engram::memory::Metric as DomainMetric;
use engram::proto as pb;
use engram::vector::faiss::{FaissIndex, FaissKind};
use engram::vector::{SearchParams, VectorIndex};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "../shared/datasets/debian-minilm")]
    dataset: PathBuf,
    /// Queries to run (at most the dataset's).
    #[arg(long, default_value_t = 1000)]
    queries: usize,
    /// Concurrent clients for the concurrent row.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Passes over the queries per gRPC row (the median pass is reported).
    #[arg(long, default_value_t = 3)]
    passes: usize,
    /// Anchor efSearch values.
    #[arg(long, value_delimiter = ',', default_value = "16,32,64,128")]
    ef: Vec<usize>,
    #[arg(long)]
    engram_bin: Option<PathBuf>,
    #[arg(long, default_value_t = 28101)]
    base_port: u16,
    #[arg(long, hide = true)]
    bench: bool,
}

struct Truth {
    k: usize,
    ids: Vec<u64>,
}

impl Truth {
    fn recall(&self, q: usize, got: impl Iterator<Item = u64>) -> f64 {
        let want: std::collections::HashSet<u64> = self.ids[q * self.k..q * self.k + 10].iter().copied().collect();
        got.take(10).filter(|id| want.contains(id)).count() as f64 / 10.0
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let bin = common::release_bin(args.engram_bin.clone());
    let (dim, base) = common::read_vecs(&args.dataset.join("base.fvecs"), f32::from_le_bytes);
    let (_, mut queries) = common::read_vecs(&args.dataset.join("queries.fvecs"), f32::from_le_bytes);
    let (k, truth) = common::read_vecs(&args.dataset.join("groundtruth.ivecs"), i32::from_le_bytes);
    let truth = Arc::new(Truth { k, ids: truth.into_iter().map(|x| x as u64).collect() });
    queries.truncate(args.queries * dim);
    let (n, nq) = (base.len() / dim, queries.len() / dim);
    println!(
        "search_cluster: {} ({n} × {dim}-d, {nq} queries), recall@10 vs exact inner-product truth\n",
        args.dataset.display()
    );

    // The anchor: FAISS HNSW32 in this process, one thread.
    let ids: Vec<u64> = (0..n as u64).collect();
    let t = Instant::now();
    let mut anchor = FaissIndex::new(dim, DomainMetric::InnerProduct, FaissKind::Hnsw { m: 32 }).unwrap();
    anchor.upsert(&ids, &base).unwrap();
    let build = t.elapsed();
    println!("| engine | recall@10 | queries/s | p50 µs |");
    println!("|---|---|---|---|");
    let mut anchors = Vec::new();
    for &ef in &args.ef {
        let params = SearchParams { ef, ..SearchParams::default() };
        let mut passes = Vec::new();
        let mut recall = 0.0;
        let mut lat = Vec::with_capacity(nq);
        for _ in 0..args.passes {
            recall = 0.0;
            lat.clear();
            let t0 = Instant::now();
            for (i, q) in queries.chunks_exact(dim).enumerate() {
                let t = Instant::now();
                let hits = anchor.search(q, 10, None, params).unwrap();
                lat.push(t.elapsed());
                recall += truth.recall(i, hits.iter().map(|h| h.id));
            }
            passes.push(nq as f64 / t0.elapsed().as_secs_f64());
        }
        lat.sort();
        let qps = median(passes);
        println!(
            "| in-process FAISS HNSW32 ef={ef}, 1 thread | {:.4} | {qps:.0} | {:.0} |",
            recall / nq as f64,
            lat[lat.len() / 2].as_secs_f64() * 1e6
        );
        anchors.push((ef, recall / nq as f64, qps));
    }
    drop(anchor);
    eprintln!("anchor built in {:.1} s", build.as_secs_f64());

    // The cluster, default search settings.
    let tmp = tempfile::tempdir().unwrap();
    let (mut procs, client) = process::cluster_of_three(&bin, args.base_port, tmp.path(), 100).await;
    const NS: &str = "bench/search";
    client.create_namespace(NS, dim as u32, Metric::InnerProduct).await.unwrap();
    let t = Instant::now();
    let chunks: Vec<Vec<(NewMemory, Precondition)>> = base
        .chunks(dim * 1000)
        .enumerate()
        .map(|(c, chunk)| {
            chunk
                .chunks_exact(dim)
                .enumerate()
                .map(|(i, v)| {
                    (NewMemory::new("v", v.to_vec()).with_id(format!("{}", c * 1000 + i)), Precondition::None)
                })
                .collect()
        })
        .collect();
    let queue = Arc::new(std::sync::Mutex::new(chunks.into_iter()));
    let mut writers = Vec::new();
    for _ in 0..4 {
        let (queue, client) = (queue.clone(), client.clone());
        writers.push(tokio::spawn(async move {
            loop {
                let Some(items) = queue.lock().unwrap().next() else { break };
                client.put_batch(NS, items).await.unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let loaded = t.elapsed();
    // Every node's shard built (in the background) before anything is timed.
    common::wait_built(&procs, Some(n as u64)).await;
    eprintln!(
        "loaded {n} through PutBatch(1000) × 4 in {:.1} s; every node's shard built after {:.1} s",
        loaded.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );

    let queries = Arc::new(queries);
    let request_at = |q: &[f32], consistency: pb::Consistency| pb::SearchRequest {
        namespace: NS.into(),
        vector: q.to_vec(),
        k: 10,
        consistency: consistency as i32,
        ..Default::default()
    };
    let request = move |q: &[f32]| request_at(q, pb::Consistency::Linearizable);
    // A leader, asked until one answers (an election may be under way after the load).
    let leader_api = common::leader_api(&client, &procs).await;
    let terms: Vec<u64> = common::raft_terms(&procs).await;
    let mut rows = Vec::new();
    use pb::Consistency::{Lease, Linearizable, Stale};
    for (consistency, clients) in
        [(Linearizable, 1), (Linearizable, args.clients), (Lease, args.clients), (Stale, args.clients)]
    {
        let mut passes = Vec::new();
        let mut recall = 0.0;
        let mut p50 = 0.0;
        for _ in 0..args.passes {
            // Each client its own connection; together they cover every query once.
            let conns: Vec<Client> = (0..clients).map(|_| Client::new([leader_api.clone()]).unwrap()).collect();
            let t0 = Instant::now();
            let tasks: Vec<_> = conns
                .into_iter()
                .enumerate()
                .map(|(c, conn)| {
                    let (queries, truth) = (queries.clone(), truth.clone());
                    tokio::spawn(async move {
                        let (mut recall, mut lat) = (0.0, Vec::new());
                        for (i, q) in queries.chunks_exact(dim).enumerate().skip(c).step_by(clients) {
                            let t = Instant::now();
                            let r = conn.search_with(request_at(q, consistency)).await.unwrap();
                            lat.push(t.elapsed());
                            recall += truth.recall(i, r.hits.iter().map(|h| h.id.parse().unwrap()));
                        }
                        (recall, lat)
                    })
                })
                .collect();
            let mut lat = Vec::new();
            recall = 0.0;
            for t in tasks {
                let (r, l) = t.await.unwrap();
                recall += r;
                lat.extend(l);
            }
            passes.push(nq as f64 / t0.elapsed().as_secs_f64());
            lat.sort();
            p50 = lat[lat.len() / 2].as_secs_f64() * 1e6;
        }
        let name = format!(
            "Engram gRPC Search, 3 nodes, {}, defaults, {clients} client(s)",
            consistency.as_str_name().to_lowercase()
        );
        rows.push((name, recall / nq as f64, median(passes), p50));
    }
    let mut passes = Vec::new();
    for _ in 0..args.passes {
        let t0 = Instant::now();
        let qs: Vec<&[f32]> = queries.chunks_exact(dim).collect();
        for group in qs.chunks(32) {
            let r = client
                .search_batch(group.iter().map(|q| request(q)).collect(), Consistency::Linearizable)
                .await
                .unwrap();
            assert_eq!(r.results.len(), group.len());
        }
        passes.push(nq as f64 / t0.elapsed().as_secs_f64());
    }
    rows.push(("Engram gRPC SearchBatch(32), 1 client".into(), f64::NAN, median(passes), f64::NAN));
    for (name, recall, qps, p50) in &rows {
        let r = if recall.is_nan() { "same".to_string() } else { format!("{recall:.4}") };
        let l = if p50.is_nan() { String::new() } else { format!("{p50:.0}") };
        println!("| {name} | {r} | {qps:.0} | {l} |");
    }
    let same_ef = anchors.iter().find(|a| a.0 == engram::vector::DEFAULT_EF);
    let first_098 = anchors.iter().find(|a| a.1 >= 0.98);
    let concurrent = rows[1].2;
    println!();
    for (what, a) in [("same ef", same_ef), ("first ef with recall ≥ 0.98", first_098)] {
        if let Some((ef, r, qps)) = a {
            println!(
                "Engram ({} clients) / anchor at {what} (ef={ef}, recall {r:.4}): {:.2}×",
                args.clients,
                concurrent / qps
            );
        }
    }
    let after: Vec<u64> = common::raft_terms(&procs).await;
    println!("raft terms (per node) after the load: {terms:?}; after the searches: {after:?}");
    for p in procs.iter_mut() {
        p.kill9();
    }
}
