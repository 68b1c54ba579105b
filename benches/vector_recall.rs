//! Recall and throughput of the vector engines on real embeddings, in-process and through the
//! gRPC API, measured side by side in one run.
//!
//! Dataset: a TEXMEX-style directory (`base.fvecs`, `queries.fvecs`, `groundtruth.ivecs`,
//! inner-product ground truth), e.g. `../shared/datasets/debian-minilm` (30k × 384-d
//! all-MiniLM-L6-v2 sentence embeddings, L2-normalised).
//!
//! Run: `cargo bench --bench vector_recall -- --dataset ../shared/datasets/debian-minilm`

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use engram::client::{Client, Metric, NewMemory, Precondition};
use engram::memory::Metric as DomainMetric;
use engram::proto as pb;
use engram::vector::exact::ExactIndex;
use engram::vector::faiss::{FaissIndex, FaissKind};
use engram::vector::{SearchParams, VectorIndex};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "../shared/datasets/debian-minilm")]
    dataset: PathBuf,
    /// Queries to run (from the dataset's queries).
    #[arg(long, default_value_t = 1000)]
    queries: usize,
    /// IVF lists.
    #[arg(long, default_value_t = 256)]
    nlist: u32,
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    nprobe: Vec<usize>,
    /// Skip the gRPC part.
    #[arg(long)]
    no_grpc: bool,
    #[arg(long, hide = true)]
    bench: bool,
}

fn read_vecs<T: Copy>(path: &Path, conv: fn([u8; 4]) -> T) -> (usize, Vec<T>) {
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

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()).unwrap_or(0) * 4096
}

fn recall_at(k: usize, got: &[u64], truth: &[i32]) -> f64 {
    let want: std::collections::HashSet<u64> = truth[..k].iter().map(|x| *x as u64).collect();
    got.iter().take(k).filter(|id| want.contains(id)).count() as f64 / k as f64
}

struct Row {
    engine: String,
    build: Duration,
    bytes_per_vector: f64,
    recall: f64,
    qps: f64,
    p50_us: f64,
}

fn measure(
    engine: &dyn VectorIndex,
    queries: &[f32],
    dim: usize,
    truth: &[i32],
    params: SearchParams,
) -> (f64, f64, f64) {
    let nq = queries.len() / dim;
    let mut lat = Vec::with_capacity(nq);
    let mut recall = 0.0;
    let t0 = Instant::now();
    for (i, q) in queries.chunks_exact(dim).enumerate() {
        let t = Instant::now();
        let hits = engine.search(q, 10, None, params).unwrap();
        lat.push(t.elapsed());
        let ids: Vec<u64> = hits.iter().map(|h| h.id).collect();
        recall += recall_at(10, &ids, &truth[i * 100..]);
    }
    let total = t0.elapsed();
    lat.sort();
    (recall / nq as f64, nq as f64 / total.as_secs_f64(), lat[nq / 2].as_secs_f64() * 1e6)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let (dim, base) = read_vecs(&args.dataset.join("base.fvecs"), f32::from_le_bytes);
    let (qdim, mut queries) = read_vecs(&args.dataset.join("queries.fvecs"), f32::from_le_bytes);
    let (gk, truth) = read_vecs(&args.dataset.join("groundtruth.ivecs"), i32::from_le_bytes);
    assert_eq!((dim, qdim, gk), (dim, dim, 100));
    queries.truncate(args.queries * dim);
    let n = base.len() / dim;
    let ids: Vec<u64> = (0..n as u64).collect();
    println!(
        "vector_recall: {} base × {dim}-d, {} queries, recall@10 vs the dataset's ground truth, 1 thread",
        n,
        queries.len() / dim
    );
    let metric = DomainMetric::InnerProduct;

    let mut rows = Vec::new();
    let build = |name: &str, f: &mut dyn FnMut() -> Box<dyn VectorIndex>| {
        let before = rss_bytes();
        let t = Instant::now();
        let idx = f();
        let took = t.elapsed();
        let bytes = rss_bytes().saturating_sub(before) as f64 / n as f64;
        (name.to_string(), idx, took, bytes)
    };
    let (name, exact, t, b) = build("exact (pure Rust)", &mut || {
        let mut e = ExactIndex::new(dim, metric);
        e.upsert(&ids, &base).unwrap();
        Box::new(e)
    });
    let (r, q, p) = measure(exact.as_ref(), &queries, dim, &truth, SearchParams::default());
    rows.push(Row { engine: name, build: t, bytes_per_vector: b, recall: r, qps: q, p50_us: p });
    drop(exact);
    let (name, flat, t, b) = build("faiss IDMap,Flat", &mut || {
        let mut f = FaissIndex::new(dim, metric, FaissKind::Flat).unwrap();
        f.upsert(&ids, &base).unwrap();
        Box::new(f)
    });
    let (r, q, p) = measure(flat.as_ref(), &queries, dim, &truth, SearchParams::default());
    let flat_qps = q;
    rows.push(Row { engine: name, build: t, bytes_per_vector: b, recall: r, qps: q, p50_us: p });
    drop(flat);
    let nlist = args.nlist;
    let (name, ivf, t, b) = build(&format!("faiss IVF{nlist},Flat"), &mut || {
        let mut f = FaissIndex::new(dim, metric, FaissKind::Ivf { nlist }).unwrap();
        f.train(&base).unwrap();
        f.upsert(&ids, &base).unwrap();
        Box::new(f)
    });
    for (i, nprobe) in args.nprobe.iter().enumerate() {
        let (r, q, p) = measure(ivf.as_ref(), &queries, dim, &truth, SearchParams { nprobe: *nprobe });
        let engine = format!("{name} nprobe={nprobe}");
        let (build, bytes) = if i == 0 { (t, b) } else { (Duration::ZERO, f64::NAN) };
        rows.push(Row { engine, build, bytes_per_vector: bytes, recall: r, qps: q, p50_us: p });
    }
    drop(ivf);

    println!("\n| engine | build s | RSS bytes/vector | recall@10 | queries/s | p50 µs |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        let bpv = if r.bytes_per_vector.is_nan() { "".into() } else { format!("{:.0}", r.bytes_per_vector) };
        let build = if r.build.is_zero() { "".into() } else { format!("{:.2}", r.build.as_secs_f64()) };
        println!("| {} | {build} | {bpv} | {:.4} | {:.0} | {:.0} |", r.engine, r.recall, r.qps, r.p50_us);
    }
    if args.no_grpc {
        return;
    }

    // The same search through a real node: gRPC on loopback, linearizable reads, FAISS Flat shard.
    let dir = tempfile::tempdir().unwrap();
    let node = engram::server::start(engram::config::Config::for_test(1, dir.path().to_path_buf())).await.unwrap();
    let client = Client::new([node.api_addr.to_string()]).unwrap();
    client.admin().init_cluster(vec![]).await.unwrap();
    while !node.node.is_leader() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client.create_namespace("bench/minilm", dim as u32, Metric::InnerProduct).await.unwrap();
    let t = Instant::now();
    for (c, chunk) in base.chunks(dim * 1000).enumerate() {
        let items = chunk
            .chunks_exact(dim)
            .enumerate()
            .map(|(i, v)| (NewMemory::new("x", v.to_vec()).with_id(format!("{}", c * 1000 + i)), Precondition::None))
            .collect();
        client.put_batch("bench/minilm", items).await.unwrap();
    }
    let load = t.elapsed();
    for (label, consistency) in [("linearizable", pb::Consistency::Linearizable), ("stale", pb::Consistency::Stale)] {
        let nq = queries.len() / dim;
        let mut recall = 0.0;
        let mut lat = Vec::with_capacity(nq);
        let t0 = Instant::now();
        for (i, q) in queries.chunks_exact(dim).enumerate() {
            let t = Instant::now();
            let r = client
                .search_with(pb::SearchRequest {
                    namespace: "bench/minilm".into(),
                    vector: q.to_vec(),
                    k: 10,
                    consistency: consistency as i32,
                    ..Default::default()
                })
                .await
                .unwrap();
            lat.push(t.elapsed());
            let ids: Vec<u64> = r.hits.iter().map(|h| h.id.parse().unwrap()).collect();
            recall += recall_at(10, &ids, &truth[i * 100..]);
        }
        let qps = nq as f64 / t0.elapsed().as_secs_f64();
        lat.sort();
        println!(
            "\ngRPC search ({label}, Flat shard, 1 client): recall@10 {:.4}, {:.0} queries/s, p50 {:.0} µs; in-process Flat / gRPC = {:.2}×",
            recall / nq as f64,
            qps,
            lat[nq / 2].as_secs_f64() * 1e6,
            flat_qps / qps
        );
    }
    println!("(loaded {n} memories through PutBatch(1000) in {:.1} s)", load.as_secs_f64());
    node.shutdown().await;
}
