//! Engram beside the systems a user would pick instead, on this box, in one invocation:
//!
//! * **replicated puts**: a 3-node etcd (Debian's `etcd-server`) and a 3-node Engram, both on
//!   loopback with fsync on, driven by the same load generator: `--clients` concurrent
//!   clients, each putting in a loop for `--secs`; etcd values are 1.5 KB, Engram memories
//!   carry a 384-d vector and a short text (~1.6 KB on the wire).
//! * **search** on the dataset's vectors and queries (recall@10 against its ground truth):
//!   Engram (3 nodes, gRPC, linearizable, default settings, `--search-clients` clients),
//!   FAISS HNSW32 in this process on one thread at ef 64 (Engram's default), and chromadb
//!   (its in-process HNSW, through `scripts/compare/chroma_search.py`) when `--python` names
//!   an interpreter that has it.
//!
//! Prints one table of ratios. `scripts/compare.sh` installs etcd and chromadb and runs it:
//! `scripts/compare.sh --dataset ../shared/datasets/debian-minilm`

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "common/mod.rs"]
mod common;

use common::process;

use clap::Parser;
use engram::client::{Client, Metric, NewMemory};
use engram::memory::Metric as DomainMetric;
use engram::proto as pb;
use engram::vector::faiss::{FaissIndex, FaissKind};
use engram::vector::{SearchParams, VectorIndex};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "../shared/datasets/debian-minilm")]
    dataset: PathBuf,
    #[arg(long, default_value_t = 64)]
    clients: usize,
    #[arg(long, default_value_t = 10)]
    secs: u64,
    #[arg(long, default_value_t = 4)]
    search_clients: usize,
    #[arg(long, default_value_t = 1000)]
    queries: usize,
    #[arg(long, default_value = "/usr/bin/etcd")]
    etcd: PathBuf,
    /// A Python with chromadb installed; without it the chromadb row is skipped.
    #[arg(long)]
    python: Option<PathBuf>,
    #[arg(long)]
    engram_bin: Option<PathBuf>,
    #[arg(long, default_value_t = 28301)]
    base_port: u16,
    /// Skip the etcd put phase (to profile Engram alone).
    #[arg(long)]
    no_etcd: bool,
    /// Skip the search phase.
    #[arg(long)]
    no_search: bool,
    #[arg(long, hide = true)]
    bench: bool,
}

/// etcd's `KV.Put`, the two fields this benchmark sends (etcd's api/etcdserverpb/rpc.proto).
#[derive(Clone, PartialEq, prost::Message)]
struct PutRequest {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

/// Its response; the header is not needed (unknown fields are skipped).
#[derive(Clone, PartialEq, prost::Message)]
struct PutResponse {}

async fn etcd_put(ch: tonic::transport::Channel, key: Vec<u8>, value: Vec<u8>) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = http::uri::PathAndQuery::from_static("/etcdserverpb.KV/Put");
    let codec = tonic_prost::ProstCodec::<PutRequest, PutResponse>::default();
    grpc.unary(tonic::Request::new(PutRequest { key, value }), path, codec).await.map(|_| ())
}

struct Etcd {
    children: Vec<Child>,
    client_urls: Vec<String>,
}

impl Etcd {
    fn start(bin: &Path, base: u16, dir: &Path) -> Etcd {
        let peer = |i: u16| format!("http://127.0.0.1:{}", base + 10 + i);
        let client = |i: u16| format!("http://127.0.0.1:{}", base + 20 + i);
        let cluster: Vec<String> = (0..3).map(|i| format!("e{i}={}", peer(i))).collect();
        let mut children = Vec::new();
        for i in 0..3u16 {
            let log = std::fs::File::create(dir.join(format!("etcd{i}.log"))).unwrap();
            children.push(
                Command::new(bin)
                    .args(["--name", &format!("e{i}"), "--data-dir", dir.join(format!("etcd{i}")).to_str().unwrap()])
                    .args(["--listen-peer-urls", &peer(i), "--initial-advertise-peer-urls", &peer(i)])
                    .args(["--listen-client-urls", &client(i), "--advertise-client-urls", &client(i)])
                    .args(["--initial-cluster", &cluster.join(","), "--initial-cluster-state", "new"])
                    .args(["--initial-cluster-token", "engram-compare"])
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .unwrap_or_else(|e| {
                        panic!("start {}: {e} (scripts/compare.sh installs etcd-server)", bin.display())
                    }),
            );
        }
        Etcd { children, client_urls: (0..3).map(client).collect() }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `clients` tasks calling `op(i)` in a loop for `dur`: (ops/s, p50 ms, p99 ms).
async fn drive<F, Fut>(clients: usize, dur: Duration, op: F) -> (f64, f64, f64)
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let op = Arc::new(op);
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (op, stop) = (op.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                assert!(op(c, i).await, "a put failed");
                lat.push(t.elapsed());
                i += 1;
            }
            lat
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(dur).await;
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e3;
    (lat.len() as f64 / secs, pct(0.5), pct(0.99))
}

fn recall(truth: &[u64], k: usize, q: usize, got: impl Iterator<Item = u64>) -> f64 {
    let want: std::collections::HashSet<u64> = truth[q * k..q * k + 10].iter().copied().collect();
    got.take(10).filter(|id| want.contains(id)).count() as f64 / 10.0
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let bin = common::release_bin(args.engram_bin.clone());
    let tmp = tempfile::tempdir().unwrap();
    let dur = Duration::from_secs(args.secs);
    let mut table: Vec<(String, String, String, String)> = Vec::new();

    // Replicated puts: etcd.
    let etcd_run = if args.no_etcd {
        None
    } else {
        let etcd = Etcd::start(&args.etcd, args.base_port, tmp.path());
        let channels: Vec<tonic::transport::Channel> = etcd
            .client_urls
            .iter()
            .map(|u| tonic::transport::Channel::from_shared(u.clone()).unwrap().connect_lazy())
            .collect();
        let value = vec![b'v'; 1536];
        let leader_ch = loop {
            // The first node that takes a put (any node forwards to etcd's leader; the first
            // that answers is ready).
            let mut ready = None;
            for ch in &channels {
                if etcd_put(ch.clone(), b"warmup".to_vec(), value.clone()).await.is_ok() {
                    ready = Some(ch.clone());
                    break;
                }
            }
            if let Some(ch) = ready {
                break ch;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let _ = leader_ch;
        // Each client its own connection, spread over the three nodes like etcd's own benchmark.
        let conns: Arc<Vec<tonic::transport::Channel>> = Arc::new(
            (0..args.clients)
                .map(|c| {
                    tonic::transport::Channel::from_shared(etcd.client_urls[c % 3].clone()).unwrap().connect_lazy()
                })
                .collect(),
        );
        let v = Arc::new(value);
        let (etcd_ops, etcd_p50, etcd_p99) = drive(args.clients, dur, move |c, i| {
            let (ch, v) = (conns[c].clone(), v.clone());
            async move { etcd_put(ch, format!("k{c}-{i}").into_bytes(), v.to_vec()).await.is_ok() }
        })
        .await;
        drop(etcd);
        Some((etcd_ops, etcd_p50, etcd_p99))
    };

    // Replicated puts: Engram, node defaults.
    std::fs::create_dir_all(tmp.path().join("engram")).unwrap();
    let (mut procs, client) =
        process::cluster_of_three_timed(&bin, args.base_port + 100, &tmp.path().join("engram"), 100, None).await;
    const PUTS: &str = "compare/puts";
    client.create_namespace(PUTS, 384, Metric::Cosine).await.unwrap();
    let clients: Arc<Vec<Client>> = Arc::new((0..args.clients).map(|_| client.clone()).collect());
    let (eng_ops, eng_p50, eng_p99) = drive(args.clients, dur, move |c, i| {
        let client = clients[c].clone();
        async move {
            let v: Vec<f32> =
                (0..384).map(|d| ((c * 7919 + i as usize * 131 + d * 17) % 1009) as f32 / 1009.0 - 0.5).collect();
            let text =
                format!("memory {c}-{i}: the user prefers green tea in the afternoon and dislikes early meetings.");
            client.put(PUTS, NewMemory::new(text, v)).await.is_ok()
        }
    })
    .await;
    if let Some((etcd_ops, etcd_p50, etcd_p99)) = etcd_run {
        table.push((
            format!("single put, {} clients: etcd 3 nodes (1.5 KB values)", args.clients),
            format!("{etcd_ops:.0}/s"),
            format!("p50 {etcd_p50:.1} ms, p99 {etcd_p99:.1} ms"),
            "1.00×".into(),
        ));
    }
    table.push((
        format!("single put, {} clients: Engram 3 nodes (384-d memories)", args.clients),
        format!("{eng_ops:.0}/s"),
        format!("p50 {eng_p50:.1} ms, p99 {eng_p99:.1} ms"),
        etcd_run.map(|(e, _, _)| format!("{:.2}× etcd", eng_ops / e)).unwrap_or_default(),
    ));

    if args.no_search {
        print_table("compare: puts only", &table);
        return;
    }

    // Search.
    let (dim, base) = common::read_vecs(&args.dataset.join("base.fvecs"), f32::from_le_bytes);
    let (_, mut queries) = common::read_vecs(&args.dataset.join("queries.fvecs"), f32::from_le_bytes);
    let (tk, truth) = common::read_vecs(&args.dataset.join("groundtruth.ivecs"), i32::from_le_bytes);
    let truth: Arc<Vec<u64>> = Arc::new(truth.into_iter().map(|x| x as u64).collect());
    queries.truncate(args.queries * dim);
    let (n, nq) = (base.len() / dim, queries.len() / dim);

    let mut anchor = FaissIndex::new(dim, DomainMetric::InnerProduct, FaissKind::Hnsw { m: 32 }).unwrap();
    anchor.upsert(&(0..n as u64).collect::<Vec<_>>(), &base).unwrap();
    let params = SearchParams::default();
    let (mut r, t0) = (0.0, Instant::now());
    for (i, q) in queries.chunks_exact(dim).enumerate() {
        r += recall(&truth, tk, i, anchor.search(q, 10, None, params).unwrap().iter().map(|h| h.id));
    }
    let anchor_qps = nq as f64 / t0.elapsed().as_secs_f64();
    let anchor_recall = r / nq as f64;
    drop(anchor);

    const NS: &str = "compare/search";
    client.create_namespace(NS, dim as u32, Metric::InnerProduct).await.unwrap();
    for (c, chunk) in base.chunks(dim * 1000).enumerate() {
        let items = chunk
            .chunks_exact(dim)
            .enumerate()
            .map(|(i, v)| {
                (
                    NewMemory::new("v", v.to_vec()).with_id(format!("{}", c * 1000 + i)),
                    engram::client::Precondition::None,
                )
            })
            .collect();
        client.put_batch(NS, items).await.unwrap();
    }
    common::wait_built(&procs, None).await;
    let leader_api = common::leader_api(&client, &procs).await;
    let queries = Arc::new(queries);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.search_clients {
        let (queries, truth, conn, sc) =
            (queries.clone(), truth.clone(), Client::new([leader_api.clone()]).unwrap(), args.search_clients);
        tasks.push(tokio::spawn(async move {
            let mut r = 0.0;
            for (i, q) in queries.chunks_exact(dim).enumerate().skip(c).step_by(sc) {
                let req = pb::SearchRequest {
                    namespace: NS.into(),
                    vector: q.to_vec(),
                    k: 10,
                    consistency: pb::Consistency::Linearizable as i32,
                    ..Default::default()
                };
                let hits = conn.search_with(req).await.unwrap().hits;
                r += recall(&truth, tk, i, hits.iter().map(|h| h.id.parse().unwrap()));
            }
            r
        }));
    }
    let mut r = 0.0;
    for t in tasks {
        r += t.await.unwrap();
    }
    let engram_qps = nq as f64 / t0.elapsed().as_secs_f64();
    let engram_recall = r / nq as f64;
    for p in procs.iter_mut() {
        p.kill9();
    }
    table.push((
        "search: FAISS HNSW32 in-process, 1 thread, ef 64".into(),
        format!("{anchor_qps:.0} q/s"),
        format!("recall@10 {anchor_recall:.4}"),
        "1.00×".into(),
    ));
    table.push((
        format!("search: Engram 3 nodes, gRPC, linearizable, defaults, {} clients", args.search_clients),
        format!("{engram_qps:.0} q/s"),
        format!("recall@10 {engram_recall:.4}"),
        format!("{:.2}× FAISS", engram_qps / anchor_qps),
    ));

    // chromadb, in its own process (its HNSW runs in-process there, one client).
    if let Some(python) = &args.python {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/compare/chroma_search.py");
        let out = Command::new(python)
            .arg(&script)
            .args(["--dataset", args.dataset.to_str().unwrap(), "--queries", &args.queries.to_string()])
            .stderr(Stdio::inherit())
            .output()
            .expect("run chroma_search.py");
        assert!(out.status.success(), "chroma_search.py failed");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("chroma_search.py prints JSON");
        let (qps, rec) = (v["qps"].as_f64().unwrap(), v["recall"].as_f64().unwrap());
        table.push((
            format!("search: chromadb {} in-process (HNSW, defaults), 1 client", v["version"].as_str().unwrap_or("?")),
            format!("{qps:.0} q/s"),
            format!("recall@10 {rec:.4}"),
            format!("Engram is {:.2}× chromadb", engram_qps / qps),
        ));
    }

    let head =
        format!("compare: one run on this box ({n} × {dim}-d vectors, {nq} queries from {})", args.dataset.display());
    print_table(&head, &table);
}

fn print_table(head: &str, table: &[(String, String, String, String)]) {
    println!("\n{head}\n");
    println!("| workload | throughput | latency / quality | ratio |");
    println!("|---|---|---|---|");
    for (a, b, c, d) in table {
        println!("| {a} | {b} | {c} | {d} |");
    }
}
