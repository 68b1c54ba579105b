//! Recall and throughput of the vector engines, in-process and through the gRPC API, measured
//! side by side in one run.
//!
//! Data, either:
//! * a TEXMEX-style directory (`base.fvecs`, `queries.fvecs`, `groundtruth.ivecs`, inner
//!   product ground truth), e.g. `../shared/datasets/debian-minilm` (30k × 384-d
//!   all-MiniLM-L6-v2 sentence embeddings, L2-normalised); or
//! * `--synthetic N`: N unit vectors drawn around `--clusters` random centres (clustered like
//!   real embeddings; uniform noise would make every approximate index look bad), with exact
//!   ground truth computed by FAISS Flat.
//!
//! Part 1 builds each engine in-process (build time, RSS per vector, recall@10, queries/s).
//! Part 2 loads the same vectors into a real single-node cluster through `PutBatch`, then for
//! each `nprobe` runs the queries through gRPC `Search` (1 client), through `SearchBatch`,
//! and directly against that node's own shard in-process: the ratio is the API's cost.
//!
//! Run:
//! `cargo bench --bench vector_recall -- --dataset ../shared/datasets/debian-minilm`
//! `cargo bench --bench vector_recall -- --synthetic 1000000 --queries 500`

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[path = "common/mod.rs"]
mod common;

use clap::Parser;
use engram::client::{Client, Consistency, Metric, NewMemory, Precondition};
use engram::memory::Metric as DomainMetric;
use engram::proto as pb;
use engram::vector::exact::ExactIndex;
use engram::vector::faiss::{FaissIndex, FaissKind};
use engram::vector::{Filter, SearchParams, VectorIndex};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "../shared/datasets/debian-minilm")]
    dataset: PathBuf,
    /// Use N synthetic clustered vectors instead of `--dataset`.
    #[arg(long)]
    synthetic: Option<usize>,
    /// Synthetic: dimension.
    #[arg(long, default_value_t = 384)]
    dim: usize,
    /// Synthetic: cluster centres.
    #[arg(long, default_value_t = 1000)]
    clusters: usize,
    /// Queries to run.
    #[arg(long, default_value_t = 1000)]
    queries: usize,
    /// IVF lists for the in-process IVF row (default: the power of two nearest √n, as nodes do).
    #[arg(long)]
    nlist: Option<u32>,
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    nprobe: Vec<usize>,
    /// HNSW efSearch values for the in-process HNSW32 rows.
    #[arg(long, value_delimiter = ',', default_value = "16,32,64,128")]
    ef: Vec<usize>,
    /// The node's approximate-index threshold: namespaces this large are HNSW shards.
    #[arg(long, default_value_t = 10_000)]
    approx_min: usize,
    /// The node's shard part size.
    #[arg(long, default_value_t = 250_000)]
    part_max: usize,
    /// Skip the pure-Rust exact engine (slow at large N).
    #[arg(long)]
    no_exact: bool,
    /// Skip the gRPC part.
    #[arg(long)]
    no_grpc: bool,
    #[arg(long, hide = true)]
    bench: bool,
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()).unwrap_or(0) * 4096
}

/// Ground truth: the ids of each query's true nearest neighbours, `truth_k` per query.
struct Data {
    dim: usize,
    base: Vec<f32>,
    queries: Vec<f32>,
    truth: Vec<u64>,
    truth_k: usize,
    source: String,
}

impl Data {
    fn n(&self) -> usize {
        self.base.len() / self.dim
    }

    fn nq(&self) -> usize {
        self.queries.len() / self.dim
    }

    fn recall(&self, query: usize, got: &[u64]) -> f64 {
        let want: std::collections::HashSet<u64> =
            self.truth[query * self.truth_k..query * self.truth_k + 10].iter().copied().collect();
        got.iter().take(10).filter(|id| want.contains(id)).count() as f64 / 10.0
    }
}

fn dataset(dir: &Path, queries: usize) -> Data {
    let (dim, base) = common::read_vecs(&dir.join("base.fvecs"), f32::from_le_bytes);
    let (qdim, mut q) = common::read_vecs(&dir.join("queries.fvecs"), f32::from_le_bytes);
    let (gk, truth) = common::read_vecs(&dir.join("groundtruth.ivecs"), i32::from_le_bytes);
    assert_eq!(qdim, dim);
    q.truncate(queries * dim);
    Data {
        dim,
        base,
        queries: q,
        truth: truth.into_iter().map(|x| x as u64).collect(),
        truth_k: gk,
        source: dir.display().to_string(),
    }
}

fn synthetic(n: usize, dim: usize, clusters: usize, queries: usize) -> Data {
    let t = Instant::now();
    let base = engram::vector::synthetic::clustered(n, dim, clusters, 42, 1);
    let queries = engram::vector::synthetic::clustered(queries, dim, clusters, 42, 2);
    let mut flat = FaissIndex::new(dim, DomainMetric::InnerProduct, FaissKind::Flat).unwrap();
    let ids: Vec<u64> = (0..n as u64).collect();
    flat.upsert(&ids, &base).unwrap();
    let mut truth = Vec::with_capacity(queries.len() / dim * 10);
    for q in queries.chunks_exact(dim) {
        let hits = flat.search(q, 10, None, SearchParams::default()).unwrap();
        truth.extend(hits.iter().map(|h| h.id));
    }
    eprintln!(
        "generated {n} × {dim}-d around {clusters} centres and exact ground truth in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Data { dim, base, queries, truth, truth_k: 10, source: format!("synthetic {n} × {dim}-d, {clusters} clusters") }
}

struct Measured {
    recall: f64,
    qps: f64,
    p50_us: f64,
}

fn summarise(recall_sum: f64, nq: usize, total: Duration, mut lat: Vec<Duration>) -> Measured {
    lat.sort();
    Measured {
        recall: recall_sum / nq as f64,
        qps: nq as f64 / total.as_secs_f64(),
        p50_us: lat[lat.len() / 2].as_secs_f64() * 1e6,
    }
}

fn measure(engine: &dyn VectorIndex, data: &Data, params: SearchParams) -> Measured {
    let (mut lat, mut recall) = (Vec::with_capacity(data.nq()), 0.0);
    let t0 = Instant::now();
    for (i, q) in data.queries.chunks_exact(data.dim).enumerate() {
        let t = Instant::now();
        let hits = engine.search(q, 10, None, params).unwrap();
        lat.push(t.elapsed());
        recall += data.recall(i, &hits.iter().map(|h| h.id).collect::<Vec<_>>());
    }
    summarise(recall, data.nq(), t0.elapsed(), lat)
}

struct Row {
    engine: String,
    build: Option<Duration>,
    bytes_per_vector: Option<f64>,
    m: Measured,
}

fn print_rows(rows: &[Row]) {
    println!("\n| engine | build s | RSS bytes/vector | recall@10 | queries/s | p50 µs |");
    println!("|---|---|---|---|---|---|");
    for r in rows {
        let bpv = r.bytes_per_vector.map(|b| format!("{b:.0}")).unwrap_or_default();
        let build = r.build.map(|b| format!("{:.2}", b.as_secs_f64())).unwrap_or_default();
        println!("| {} | {build} | {bpv} | {:.4} | {:.0} | {:.0} |", r.engine, r.m.recall, r.m.qps, r.m.p50_us);
    }
}

fn default_nlist(n: usize) -> u32 {
    ((n as f64).sqrt() as u32).next_power_of_two()
}

fn in_process(args: &Args, data: &Data) {
    let (n, dim) = (data.n(), data.dim);
    let ids: Vec<u64> = (0..n as u64).collect();
    let metric = DomainMetric::InnerProduct;
    let mut rows = Vec::new();
    // RSS above what the process held before any index existed, while this one is alive
    // (each index is dropped before the next is built; freed memory the allocator keeps
    // would count against the later ones, never for them).
    let baseline = rss_bytes();
    let build = |f: &mut dyn FnMut() -> Box<dyn VectorIndex>| {
        let t = Instant::now();
        let idx = f();
        (idx, t.elapsed(), rss_bytes().saturating_sub(baseline) as f64 / n as f64)
    };
    if !args.no_exact {
        let (exact, t, b) = build(&mut || {
            let mut e = ExactIndex::new(dim, metric);
            e.upsert(&ids, &data.base).unwrap();
            Box::new(e)
        });
        let m = measure(exact.as_ref(), data, SearchParams::default());
        rows.push(Row { engine: "exact (pure Rust)".into(), build: Some(t), bytes_per_vector: Some(b), m });
    }
    let (flat, t, b) = build(&mut || {
        let mut f = FaissIndex::new(dim, metric, FaissKind::Flat).unwrap();
        f.upsert(&ids, &data.base).unwrap();
        Box::new(f)
    });
    let m = measure(flat.as_ref(), data, SearchParams::default());
    rows.push(Row { engine: "faiss IDMap,Flat".into(), build: Some(t), bytes_per_vector: Some(b), m });
    drop(flat);
    let nlist = args.nlist.unwrap_or_else(|| default_nlist(n));
    let (ivf, t, b) = build(&mut || {
        let mut f = FaissIndex::new(dim, metric, FaissKind::Ivf { nlist }).unwrap();
        f.train(&data.base).unwrap();
        f.upsert(&ids, &data.base).unwrap();
        Box::new(f)
    });
    for (i, nprobe) in args.nprobe.iter().enumerate() {
        let m = measure(ivf.as_ref(), data, SearchParams { nprobe: *nprobe, ..SearchParams::default() });
        let (build, bytes) = if i == 0 { (Some(t), Some(b)) } else { (None, None) };
        rows.push(Row { engine: format!("faiss IVF{nlist},Flat nprobe={nprobe}"), build, bytes_per_vector: bytes, m });
    }
    drop(ivf);
    let (hnsw, t, b) = build(&mut || {
        let mut f = FaissIndex::new(dim, metric, FaissKind::Hnsw { m: 32 }).unwrap();
        f.upsert(&ids, &data.base).unwrap();
        Box::new(f)
    });
    for (i, ef) in args.ef.iter().enumerate() {
        let m = measure(hnsw.as_ref(), data, SearchParams { ef: *ef, ..SearchParams::default() });
        let (build, bytes) = if i == 0 { (Some(t), Some(b)) } else { (None, None) };
        rows.push(Row { engine: format!("faiss HNSW32 ef={ef}"), build, bytes_per_vector: bytes, m });
    }
    print_rows(&rows);
}

async fn through_grpc(args: &Args, data: &Data) {
    const NS: &str = "bench/vectors";
    let (n, dim) = (data.n(), data.dim);
    let dir = tempfile::tempdir().unwrap();
    let mut config = engram::config::Config::for_test(1, dir.path().to_path_buf());
    config.approx_min_vectors = args.approx_min;
    config.vector_part_max = args.part_max;
    let node = engram::server::start(config).await.unwrap();
    let client = Client::new([node.api_addr.to_string()]).unwrap().creating_namespaces();
    client.admin().init_cluster(vec![]).await.unwrap();
    while !node.node.is_leader() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client.create_namespace(NS, dim as u32, Metric::InnerProduct).await.unwrap();
    let rss_before = rss_bytes();
    let t = Instant::now();
    const BATCH: usize = 1000;
    const WRITERS: usize = 4;
    let chunks: Vec<(usize, &[f32])> = data.base.chunks(dim * BATCH).enumerate().collect();
    let mut next = 0;
    while next < chunks.len() {
        let wave: Vec<_> = chunks[next..(next + WRITERS).min(chunks.len())]
            .iter()
            .map(|(c, chunk)| {
                let items: Vec<_> = chunk
                    .chunks_exact(dim)
                    .enumerate()
                    .map(|(i, v)| {
                        (NewMemory::new("v", v.to_vec()).with_id(format!("{}", c * BATCH + i)), Precondition::None)
                    })
                    .collect();
                let client = client.clone();
                tokio::spawn(async move { client.put_batch(NS, items).await.unwrap() })
            })
            .collect();
        for w in wave {
            w.await.unwrap();
        }
        next += WRITERS;
    }
    let load = t.elapsed();
    let kinds = node.vectors.shard_kinds();
    println!(
        "\nnode: loaded {n} memories through PutBatch({BATCH}) × {WRITERS} writers in {:.1} s ({:.0}/s); shard {:?}; \
         process RSS grew {:.0} bytes/memory (redb cache, log and shard together)",
        load.as_secs_f64(),
        n as f64 / load.as_secs_f64(),
        kinds,
        rss_bytes().saturating_sub(rss_before) as f64 / n as f64
    );
    let nlist = match kinds.first().map(|k| k.1) {
        Some(FaissKind::Ivf { nlist }) => nlist as usize,
        _ => 1,
    };
    let mut probes: Vec<usize> = args.nprobe.iter().copied().filter(|p| *p <= nlist).collect();
    probes.push(nlist);
    probes.dedup();
    println!("\n| nprobe | in-process recall@10 | in-process q/s | gRPC recall@10 | gRPC q/s | gRPC p50 µs | in-process / gRPC | SearchBatch(32) q/s |");
    println!("|---|---|---|---|---|---|---|---|");
    for nprobe in probes {
        let params = SearchParams { nprobe, ..SearchParams::default() };
        // The node's own shard, no gRPC.
        let (mut lat, mut recall) = (Vec::new(), 0.0);
        let t0 = Instant::now();
        for (i, q) in data.queries.chunks_exact(dim).enumerate() {
            let t = Instant::now();
            let hits = node.vectors.search(NS, q, 10, &Filter::default(), params, 0).unwrap().unwrap();
            lat.push(t.elapsed());
            recall += data.recall(i, &hits.iter().map(|h| h.0.parse().unwrap()).collect::<Vec<u64>>());
        }
        let local = summarise(recall, data.nq(), t0.elapsed(), lat);
        let req = |q: &[f32]| pb::SearchRequest {
            namespace: NS.into(),
            vector: q.to_vec(),
            k: 10,
            nprobe: nprobe as u32,
            ..Default::default()
        };
        let (mut lat, mut recall) = (Vec::new(), 0.0);
        let t0 = Instant::now();
        for (i, q) in data.queries.chunks_exact(dim).enumerate() {
            let t = Instant::now();
            let r = client.search_with(req(q)).await.unwrap();
            lat.push(t.elapsed());
            recall += data.recall(i, &r.hits.iter().map(|h| h.id.parse().unwrap()).collect::<Vec<u64>>());
        }
        let remote = summarise(recall, data.nq(), t0.elapsed(), lat);
        let t0 = Instant::now();
        let qs: Vec<_> = data.queries.chunks_exact(dim).collect();
        for group in qs.chunks(32) {
            let r =
                client.search_batch(group.iter().map(|q| req(q)).collect(), Consistency::Linearizable).await.unwrap();
            assert_eq!(r.results.len(), group.len());
        }
        let batch_qps = data.nq() as f64 / t0.elapsed().as_secs_f64();
        println!(
            "| {nprobe} | {:.4} | {:.0} | {:.4} | {:.0} | {:.0} | {:.2}× | {batch_qps:.0} |",
            local.recall,
            local.qps,
            remote.recall,
            remote.qps,
            remote.p50_us,
            local.qps / remote.qps
        );
    }
    // Restart cost: from the index files the shutdown wrote, then with them deleted.
    let t = Instant::now();
    node.shutdown().await;
    let shutdown = t.elapsed();
    let config = {
        let mut c = engram::config::Config::for_test(1, dir.path().to_path_buf());
        c.approx_min_vectors = args.approx_min;
        c.vector_part_max = args.part_max;
        c
    };
    let t = Instant::now();
    let node = engram::server::start(config.clone()).await.unwrap();
    let from_files = t.elapsed();
    let report = node.vectors.opened().unwrap();
    assert_eq!(report.loaded.len(), 1, "{report:?}");
    node.shutdown().await;
    std::fs::remove_dir_all(dir.path().join("vectors")).unwrap();
    let t = Instant::now();
    let node = engram::server::start(config).await.unwrap();
    let rebuilt = t.elapsed();
    assert_eq!(node.vectors.opened().unwrap().rebuilt.len(), 1);
    node.shutdown().await;
    println!(
        "
restart: shutdown writing index files {:.2} s; start loading them {:.2} s; start rebuilding from redb {:.2} s ({:.1}×)",
        shutdown.as_secs_f64(),
        from_files.as_secs_f64(),
        rebuilt.as_secs_f64(),
        rebuilt.as_secs_f64() / from_files.as_secs_f64()
    );
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let data = match args.synthetic {
        Some(n) => synthetic(n, args.dim, args.clusters, args.queries),
        None => dataset(&args.dataset, args.queries),
    };
    println!(
        "vector_recall: {}: {} base × {}-d, {} queries, recall@10 vs exact ground truth, 1 client thread",
        data.source,
        data.n(),
        data.dim,
        data.nq()
    );
    in_process(&args, &data);
    if !args.no_grpc {
        through_grpc(&args, &data).await;
    }
}
