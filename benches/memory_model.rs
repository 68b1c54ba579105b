//! What the memory model costs in `apply`: put throughput with dedup off, exact dedup on and
//! near-duplicate detection on, in a namespace already holding `--memories` memories, and
//! purge throughput. Entries go through `StateMachineStore::apply` (redb transaction, derived
//! indexes, FAISS shard) in chunks of `--chunk`, as openraft hands them over; Raft and gRPC are
//! left out so the figures are the policy's alone. The three put modes alternate round by round
//! on the same state (median of `--rounds`), and the ratios are to dedup off.
//!
//! `cargo bench --bench memory_model -- --memories 100000`

use std::collections::BTreeMap;
use std::time::Instant;

use clap::Parser;
use engram::memory::policy::{DedupMode, NearAction, NearDuplicate};
use engram::memory::{MemoryInput, MemoryPolicy, Metric, Precondition};
use engram::raft::{Command, Entry, LogId, Op, StateMachineStore};
use engram::vector::synthetic;
use openraft::storage::RaftStateMachine;
use openraft::EntryPayload;

#[derive(Parser, Debug)]
struct Args {
    /// Memories in the namespace before the timed puts.
    #[arg(long, default_value_t = 100_000)]
    memories: usize,
    #[arg(long, default_value_t = 384)]
    dim: usize,
    /// Timed single-memory puts per mode and round.
    #[arg(long, default_value_t = 1000)]
    puts: usize,
    /// Entries per apply call.
    #[arg(long, default_value_t = 32)]
    chunk: usize,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Expired memories purged in the purge measurement.
    #[arg(long, default_value_t = 20_000)]
    purge: usize,
    #[arg(long, hide = true)]
    bench: bool,
}

const NS: &str = "bench";

struct Log {
    sm: StateMachineStore,
    next: u64,
    _dir: tempfile::TempDir,
}

impl Log {
    async fn apply(&mut self, ops: Vec<(Op, u64)>, chunk: usize) {
        let entries: Vec<Entry> = ops
            .into_iter()
            .map(|(op, now_ms)| {
                self.next += 1;
                Entry {
                    log_id: LogId::new(openraft::vote::leader_id_adv::LeaderId { term: 1, node_id: 1 }, self.next),
                    payload: EntryPayload::Normal(Command { principal: None, idempotency: None, now_ms, op }),
                }
            })
            .collect();
        for part in entries.chunks(chunk.max(1)) {
            let stream = futures::stream::iter(part.iter().cloned().map(|e| Ok((e, None))));
            self.sm.apply(stream).await.unwrap();
        }
    }
}

fn memory(id: String, text: String, embedding: Vec<f32>, expires_at_ms: Option<u64>) -> (MemoryInput, Precondition) {
    (MemoryInput { id, text, embedding, tags: BTreeMap::new(), importance: 0.5, expires_at_ms }, Precondition::None)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn put_op(items: Vec<(MemoryInput, Precondition)>) -> Op {
    Op::Put { namespace: NS.into(), items, approx_min_vectors: 50_000 }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    let dir = tempfile::tempdir().unwrap();
    let sm = StateMachineStore::open(&dir.path().join("state.redb"), dir.path().join("snap.bin")).unwrap();
    let mut log = Log { sm, next: 0, _dir: dir };
    let now = 1_800_000_000_000u64;
    let create = Op::CreateNamespace {
        namespace: NS.into(),
        dimension: args.dim as u32,
        metric: Metric::Cosine,
        approx_min_vectors: 50_000,
    };
    log.apply(vec![(create, now)], 1).await;

    // Preload in batches of 1000 (one entry each).
    let started = Instant::now();
    let vectors = synthetic::clustered(args.memories, args.dim, 64, 7, 0);
    let mut ops = Vec::new();
    for (b, chunk) in vectors.chunks(args.dim * 1000).enumerate() {
        let items = chunk
            .chunks(args.dim)
            .enumerate()
            .map(|(i, v)| {
                let n = b * 1000 + i;
                memory(format!("pre-{n:08}"), format!("preloaded memory number {n}"), v.to_vec(), None)
            })
            .collect();
        ops.push((put_op(items), now));
    }
    log.apply(ops, 4).await;
    let kinds = log.sm.vectors().shard_kinds();
    println!(
        "preloaded {} memories ({}-d) in {:.1} s; shard {:?}",
        args.memories,
        args.dim,
        started.elapsed().as_secs_f64(),
        kinds.first().map(|k| k.1)
    );

    let policies = [
        ("dedup off", MemoryPolicy::default()),
        ("exact dedup (text)", MemoryPolicy { dedup: DedupMode::Text, ..MemoryPolicy::default() }),
        (
            "near-dup 0.95 + exact",
            MemoryPolicy {
                dedup: DedupMode::Text,
                near_duplicate: Some(NearDuplicate {
                    threshold: 0.95,
                    action: NearAction::Merge,
                    keep: Default::default(),
                }),
                ..MemoryPolicy::default()
            },
        ),
    ];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); policies.len()];
    let mut hit_rates: Vec<Vec<f64>> = vec![Vec::new(); policies.len()];
    let mut seq = 0u64;
    for round in 0..args.rounds {
        for (p, (_, policy)) in policies.iter().enumerate() {
            log.apply(vec![(Op::SetPolicy { namespace: NS.into(), policy: policy.clone() }, now)], 1).await;
            // Fresh vectors from far draws; every fourth text repeats an earlier one.
            let fresh = synthetic::clustered(args.puts, args.dim, 64, 7, 1 + seq);
            let ops: Vec<(Op, u64)> = fresh
                .chunks(args.dim)
                .enumerate()
                .map(|(i, v)| {
                    seq += 1;
                    let text = if i % 4 == 3 {
                        format!("preloaded memory number {}", i * 7)
                    } else {
                        format!("new memory {seq}")
                    };
                    (put_op(vec![memory(format!("r{round}-p{p}-{i:06}"), text, v.to_vec(), None)]), now)
                })
                .collect();
            let before = log.sm.vectors().shard_kinds().first().map(|k| k.2).unwrap_or(0);
            let t = Instant::now();
            log.apply(ops, args.chunk).await;
            rates[p].push(args.puts as f64 / t.elapsed().as_secs_f64());
            let after = log.sm.vectors().shard_kinds().first().map(|k| k.2).unwrap_or(0);
            hit_rates[p].push(1.0 - (after - before) as f64 / args.puts as f64);
        }
    }
    println!(
        "\n| put mode ({} memories held) | puts/s (median of {}) | vs dedup off | not created (dedup/merge) |",
        args.memories, args.rounds
    );
    println!("| --- | --- | --- | --- |");
    let base = median(rates[0].clone());
    for (p, (name, _)) in policies.iter().enumerate() {
        let r = median(rates[p].clone());
        println!("| {name} | {r:.0} | {:.2}× | {:.0}% |", r / base, median(hit_rates[p].clone()) * 100.0);
    }

    // Purge: memories that expired, removed in entries of 1000 (as the leader proposes them).
    log.apply(vec![(Op::SetPolicy { namespace: NS.into(), policy: MemoryPolicy::default() }, now)], 1).await;
    let expiring = synthetic::clustered(args.purge, args.dim, 64, 9, 0);
    let ops: Vec<(Op, u64)> = expiring
        .chunks(args.dim * 1000)
        .enumerate()
        .map(|(b, chunk)| {
            let items = chunk
                .chunks(args.dim)
                .enumerate()
                .map(|(i, v)| {
                    memory(
                        format!("exp-{:08}", b * 1000 + i),
                        format!("short-lived {b} {i}"),
                        v.to_vec(),
                        Some(now + 1000),
                    )
                })
                .collect();
            (put_op(items), now)
        })
        .collect();
    log.apply(ops, 4).await;
    let reader = engram::storage::StateReader::new(log.sm.database());
    let t = Instant::now();
    let mut purged = 0;
    loop {
        let items = reader.expired(now + 2000, engram::upkeep::PURGE_BATCH).unwrap();
        if items.is_empty() {
            break;
        }
        purged += items.len();
        log.apply(vec![(Op::Purge { items }, now + 2000)], 1).await;
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "\npurge: {purged} expired memories in {secs:.2} s = {:.0} memories/s (entries of {})",
        purged as f64 / secs,
        engram::upkeep::PURGE_BATCH
    );
}
