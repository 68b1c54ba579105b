//! Snapshot build and install, backup create, verify and restore: time, throughput and size,
//! on a state machine of `--memories` memories with `--dim`-d vectors and text, all measured in
//! one run (median of `--runs`). Rows are written straight into a redb state machine in the
//! node's own format (the same bytes `apply` writes), so the figures are the storage path's
//! alone.
//!
//! `cargo bench --bench backup -- --memories 1000000`
//!
//! `--drill N` then runs a DR drill (`engramctl backup drill`) of the last backup into N
//! scratch `engram` processes and prints its report: RTO (restore, start with the vector
//! shards built from the restored rows, first committed write) and data age.

use std::path::Path;
use std::time::Instant;

use clap::Parser;
use engram::backup::{self, crypto::MasterKey, Keyring};
use engram::memory::{IndexKind, Memory, Metric, NamespaceInfo};
use engram::raft::snapshot::SnapshotFiles;
use engram::raft::EngramNode;
use engram::storage::{codec, memory_key, MEMORIES, META_APPLIED, NAMESPACES, SM_META};
use redb::Database;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value_t = 100_000)]
    memories: usize,
    #[arg(long, default_value_t = 384)]
    dim: usize,
    /// Mean text length in bytes.
    #[arg(long, default_value_t = 300)]
    text_bytes: usize,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Also time rebuilding the vector shards of the installed snapshot.
    #[arg(long)]
    rebuild_vectors: bool,
    /// Scratch nodes for a DR drill of the last backup (0: no drill).
    #[arg(long, default_value_t = 0)]
    drill: u64,
    /// The node binary a drill starts [default: target/release/engram].
    #[arg(long)]
    engram_bin: Option<std::path::PathBuf>,
    /// The namespace's index: hnsw (what a node builds at this size by default), ivf or flat.
    #[arg(long, default_value = "hnsw")]
    index: String,
    #[arg(long, hide = true)]
    bench: bool,
}

const WORDS: &[&str] = &[
    "the",
    "user",
    "prefers",
    "meeting",
    "notes",
    "agent",
    "called",
    "tool",
    "search",
    "result",
    "customer",
    "order",
    "shipped",
    "on",
    "monday",
    "asked",
    "about",
    "refund",
    "policy",
    "project",
    "deadline",
    "moved",
    "to",
    "friday",
    "memory",
    "store",
    "vector",
    "embedding",
    "likes",
    "coffee",
    "in",
    "morning",
    "python",
    "rust",
    "deploy",
    "cluster",
    "error",
    "fixed",
    "ticket",
    "priority",
    "high",
    "low",
    "summary",
    "of",
    "conversation",
    "with",
    "team",
    "and",
];

fn text(i: usize, mean: usize, x: &mut u64) -> String {
    let mut s = format!("memory {i}:");
    let target = mean / 2 + (*x as usize % mean.max(1));
    while s.len() < target {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        s.push(' ');
        s.push_str(WORDS[(*x % WORDS.len() as u64) as usize]);
    }
    s
}

fn populate(path: &Path, a: &Args) -> Database {
    let db = Database::create(path).unwrap();
    let vectors = engram::vector::synthetic::clustered(a.memories, a.dim, 1000, 7, 1);
    let txn = db.begin_write().unwrap();
    {
        let ns = NamespaceInfo {
            name: "bench".into(),
            dimension: a.dim as u32,
            metric: Metric::Cosine,
            memory_count: a.memories as u64,
            created_at_ms: 1,
            index: match a.index.as_str() {
                "flat" => IndexKind::Flat,
                "ivf" => IndexKind::Ivf { nlist: 1024 },
                _ => IndexKind::Hnsw { m: engram::memory::HNSW_M },
            },
            approx_min_vectors: 50_000,
            // Only byte quotas read this; the benchmark sets none.
            bytes: 0,
        };
        txn.open_table(NAMESPACES).unwrap().insert("bench", codec::encode_row(&ns).as_slice()).unwrap();
        txn.open_table(engram::storage::IDEMPOTENCY).unwrap();
        txn.open_table(engram::storage::IDEM_EXPIRY).unwrap();
        for (_, table) in engram::storage::AUTH_TABLES {
            txn.open_table(table).unwrap();
        }
        let mut t = txn.open_table(MEMORIES).unwrap();
        let mut x = 0x2545f4914f6cdd1du64;
        for i in 0..a.memories {
            let m = Memory {
                namespace: "bench".into(),
                id: format!("{i:08}"),
                text: text(i, a.text_bytes, &mut x),
                embedding: vectors[i * a.dim..(i + 1) * a.dim].to_vec(),
                tags: [("kind".to_string(), (i % 5).to_string())].into(),
                importance: 0.5,
                created_at_ms: 1_795_000_000_000 + i as u64,
                updated_at_ms: 1_795_000_000_000 + i as u64,
                last_accessed_at_ms: 1_795_000_000_000 + i as u64,
                expires_at_ms: None,
                content_hash: *blake3::hash(&i.to_le_bytes()).as_bytes(),
                revision: i as u64 + 2,
                ..Default::default()
            };
            t.insert(memory_key("bench", &m.id).as_slice(), codec::encode_memory(&m).as_slice()).unwrap();
        }
        let leader = openraft::vote::leader_id_adv::LeaderId { term: 1, node_id: 1 };
        let applied = engram::raft::LogId::new(leader, a.memories as u64 + 1);
        txn.open_table(SM_META).unwrap().insert(META_APPLIED, codec::encode(&applied).as_slice()).unwrap();
    }
    // The derived indexes apply would have kept (a drill compares digests that cover them).
    engram::storage::index::rebuild(&txn, &engram::storage::vault::Vault::off()).unwrap();
    txn.commit().unwrap();
    db
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn dir_bytes(p: &Path) -> u64 {
    std::fs::read_dir(p).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum()
}

fn main() {
    let a = Args::parse();
    let tmp = tempfile::tempdir_in(".").unwrap();
    let started = Instant::now();
    let db = populate(&tmp.path().join("state.redb"), &a);
    let state_bytes = std::fs::metadata(tmp.path().join("state.redb")).unwrap().len();
    println!(
        "state: {} memories × {}-d, text ~{} B: redb file {:.1} MiB, written in {:.1} s",
        a.memories,
        a.dim,
        a.text_bytes,
        state_bytes as f64 / 1048576.0,
        started.elapsed().as_secs_f64()
    );
    let mib = |b: u64| b as f64 / 1048576.0;
    let (mut build, mut install, mut create, mut verify, mut restore) = (vec![], vec![], vec![], vec![], vec![]);
    let (mut snap_bytes, mut dump_bytes, mut archive_bytes) = (0, 0, 0);
    let keys = Keyring::single(MasterKey::generate());
    for run in 0..a.runs {
        // Snapshot build: dump → zstd → file, fsynced, published.
        let files = SnapshotFiles::open(tmp.path().join(format!("snapshot-{run}.bin"))).unwrap();
        let t = Instant::now();
        let (meta, mut data, summary) = files.build(&db).unwrap();
        files.publish(&meta, &mut data).unwrap();
        build.push(t.elapsed().as_secs_f64());
        snap_bytes = data.len().unwrap();
        dump_bytes = summary.bytes;

        // Snapshot install into an empty state machine (one durable transaction).
        let target = tmp.path().join(format!("installed-{run}.redb"));
        let db2 = Database::create(&target).unwrap();
        let t = Instant::now();
        engram::raft::snapshot::install(&db2, &meta, &data, &engram::storage::vault::Vault::off()).unwrap();
        install.push(t.elapsed().as_secs_f64());
        if a.rebuild_vectors && run == 0 {
            let store = engram::vector::VectorStore::new(
                engram::storage::StateReader::new(std::sync::Arc::new(db2)),
                engram::vector::VectorOptions::default(),
            );
            let t = Instant::now();
            store.rebuild().unwrap();
            println!("vector rebuild after install: {:.1} s", t.elapsed().as_secs_f64());
        } else {
            drop(db2);
        }
        std::fs::remove_file(&target).unwrap();
        drop(data);
        std::fs::remove_file(tmp.path().join(format!("snapshot-{run}.bin"))).unwrap();

        // Backup: dump → zstd → AES-GCM chunks → file, fsynced.
        let dir = tmp.path().join(format!("backups-{run}"));
        let t = Instant::now();
        let (path, info) = backup::schedule::write_to_dir(&db, [1; 16], &keys, &dir).unwrap();
        create.push(t.elapsed().as_secs_f64());
        archive_bytes = info.archive_bytes;

        let t = Instant::now();
        backup::verify(std::fs::File::open(&path).unwrap(), &keys).unwrap();
        verify.push(t.elapsed().as_secs_f64());

        let data_dir = tmp.path().join(format!("restored-{run}"));
        let members = [(1, EngramNode { raft_addr: "127.0.0.1:7101".into(), api_addr: "127.0.0.1:7001".into() })];
        let target = backup::restore::RestoreTarget {
            data_dir: data_dir.clone(),
            node_id: 1,
            members: members.into(),
            force: false,
            at_rest: None,
        };
        let t = Instant::now();
        backup::restore::restore(std::fs::File::open(&path).unwrap(), &keys, &target).unwrap();
        restore.push(t.elapsed().as_secs_f64());
        assert!(dir_bytes(&data_dir) > 0);
        std::fs::remove_dir_all(&data_dir).unwrap();
        if run + 1 == a.runs && a.drill > 0 {
            let bin = a
                .engram_bin
                .clone()
                .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/engram"));
            let mut spec = backup::drill::DrillSpec::new(path.clone(), bin, tmp.path().to_path_buf());
            spec.nodes = a.drill;
            let rt = tokio::runtime::Runtime::new().unwrap();
            let report = rt.block_on(backup::drill::run(&spec, &keys)).unwrap();
            println!(
                "drill of {} memories into {} scratch node(s):\n{}",
                a.memories,
                a.drill,
                serde_json::to_string_pretty(&report).unwrap()
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
    let n = a.memories as f64;
    println!("sizes: state dump {:.1} MiB, snapshot file {:.1} MiB ({:.2}× smaller), backup {:.1} MiB ({:.2}× smaller than the dump, {:.2}× than the redb file)",
        mib(dump_bytes), mib(snap_bytes), dump_bytes as f64 / snap_bytes as f64, mib(archive_bytes),
        dump_bytes as f64 / archive_bytes as f64, state_bytes as f64 / archive_bytes as f64);
    println!("| step (median of {}) | seconds | memories/s | MiB/s of state dump |", a.runs);
    println!("|---|---|---|---|");
    for (name, v) in [
        ("snapshot build", build),
        ("snapshot install", install),
        ("backup create", create),
        ("backup verify", verify),
        ("backup restore", restore),
    ] {
        let s = median(v);
        println!("| {name} | {s:.2} | {:.0} | {:.0} |", n / s, mib(dump_bytes) / s);
    }
}
