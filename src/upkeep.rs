//! The leader's memory upkeep: TTL purges, retention (drop, or archive then drop) and
//! reinforcement flushes. Each proposes ordinary log entries; `apply` decides again from the
//! replicated state whether each memory is due, so a stale leader or a skewed clock can make a
//! purge late, never wrong.
//!
//! * Purge: every `purge_interval` the leader reads the expiry index (and the age index of
//!   namespaces with a drop-only retention rule) up to its clock and proposes the due memories
//!   in batches of [`PURGE_BATCH`]. No search or read ever scans for expired memories; they
//!   are hidden by their `expires_at_ms` until the purge removes them.
//! * Archive: for a retention rule with `archive`, the leader first writes the due memories
//!   to an encrypted archive in backup format (`<archive_dir>/archive-<ns>-<ms>-<index>.engram`,
//!   fsynced), then proposes `Retire` of exactly the versions it wrote.
//! * Reinforcement: reads and searches that ask to reinforce add their hits to a
//!   [`Reinforcer`]; every `flush_interval` the leader proposes one `Reinforce` entry per
//!   namespace with the summed counts. Hits served by a follower are counted in
//!   `engram_reinforcement_dropped_total` and dropped: only the leader proposes.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backup::Keyring;
use crate::memory::Memory;
use crate::raft::{Command, Op, Outcome, RaftNode};
use crate::storage::StateReader;

/// Memories per purge or retire entry.
pub const PURGE_BATCH: usize = 1000;
/// Batches one upkeep tick may propose, so a backlog drains without starving anything.
const MAX_BATCHES_PER_TICK: usize = 16;
/// Distinct memories a reinforcement buffer holds before it drops new hits.
const MAX_PENDING_HITS: usize = 100_000;
/// Hits per `Reinforce` entry.
const REINFORCE_BATCH: usize = 4096;

/// Access hits waiting for the next flush, summed per memory.
#[derive(Default)]
pub struct Reinforcer {
    pending: Mutex<BTreeMap<String, BTreeMap<String, u32>>>,
}

impl Reinforcer {
    pub fn record<'a>(&self, namespace: &str, ids: impl IntoIterator<Item = &'a str>) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let mut held: usize = p.values().map(BTreeMap::len).sum();
        let ns = p.entry(namespace.to_string()).or_default();
        let mut dropped = 0u64;
        for id in ids {
            if let Some(n) = ns.get_mut(id) {
                *n = n.saturating_add(1);
            } else if held < MAX_PENDING_HITS {
                ns.insert(id.to_string(), 1);
                held += 1;
            } else {
                dropped += 1;
            }
        }
        if dropped > 0 {
            metrics::counter!("engram_reinforcement_dropped_total", "reason" => "buffer_full").increment(dropped);
        }
    }

    fn take(&self) -> BTreeMap<String, BTreeMap<String, u32>> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Proposes what is pending, if this node leads; returns the entries written.
    pub async fn flush(&self, node: &RaftNode) -> usize {
        let pending = self.take();
        if pending.is_empty() {
            return 0;
        }
        if !node.is_leader() {
            let n: usize = pending.values().map(|m| m.values().map(|c| *c as usize).sum::<usize>()).sum();
            metrics::counter!("engram_reinforcement_dropped_total", "reason" => "not_leader").increment(n as u64);
            return 0;
        }
        let mut entries = 0;
        for (namespace, hits) in pending {
            let hits: Vec<(String, u32)> = hits.into_iter().collect();
            for chunk in hits.chunks(REINFORCE_BATCH) {
                let op = Op::Reinforce { namespace: namespace.clone(), hits: chunk.to_vec() };
                match node.write(Command::system(op)).await {
                    Ok(_) => entries += 1,
                    Err(e) => tracing::debug!(error = %e, namespace, "reinforcement flush failed"),
                }
            }
        }
        metrics::counter!("engram_reinforcement_entries_total").increment(entries as u64);
        entries
    }
}

/// Where retention archives go and how they are sealed.
#[derive(Clone)]
pub struct ArchiveTarget {
    pub dir: PathBuf,
    pub key_file: Option<PathBuf>,
}

/// Runs the leader's upkeep until `stop` resolves.
pub async fn run(
    node: RaftNode,
    reader: StateReader,
    reinforcer: Arc<Reinforcer>,
    (purge_every, flush_every): (Duration, Duration),
    archive: ArchiveTarget,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut purge_tick = tokio::time::interval(purge_every);
    let mut flush_tick = tokio::time::interval(flush_every);
    purge_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    flush_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => {
                reinforcer.flush(&node).await;
                return;
            }
            _ = flush_tick.tick() => {
                reinforcer.flush(&node).await;
            }
            _ = purge_tick.tick() => {
                if node.is_leader() {
                    if let Err(e) = purge_once(&node, &reader).await {
                        tracing::warn!(error = %e, "purge failed; retrying at the next tick");
                    }
                    if let Err(e) = archive_once(&node, &reader, &archive).await {
                        metrics::counter!("engram_memory_archive_failures_total").increment(1);
                        tracing::warn!(error = %e, "retention archive failed; nothing was deleted");
                    }
                }
            }
        }
    }
}

/// Proposes purges of what is due by this node's clock; returns the memories purged.
pub async fn purge_once(node: &RaftNode, reader: &StateReader) -> Result<u64, String> {
    let mut purged = 0;
    for _ in 0..MAX_BATCHES_PER_TICK {
        let now = crate::memory::now_ms();
        let items = due(reader, now, PURGE_BATCH).map_err(|e| e.to_string())?;
        if items.is_empty() {
            break;
        }
        let full = items.len() >= PURGE_BATCH;
        let res = node.write(Command::system(Op::Purge { items })).await.map_err(|e| e.to_string())?;
        if let Outcome::Purged { expired, retired } = res.outcome {
            purged += expired + retired;
            if expired + retired == 0 {
                break;
            }
        }
        if !full {
            break;
        }
    }
    Ok(purged)
}

/// Up to `limit` memories due at `now`: expired first, then past drop-only retention.
fn due(reader: &StateReader, now: u64, limit: usize) -> Result<Vec<(String, String)>, crate::error::StorageError> {
    let mut items = reader.expired(now, limit)?;
    for (ns, rule) in reader.retention_rules()? {
        if rule.archive || items.len() >= limit {
            continue;
        }
        let cutoff = now.saturating_sub(rule.max_age_ms);
        for m in reader.created_before(&ns, cutoff, limit - items.len())? {
            items.push((ns.clone(), m.id));
        }
    }
    Ok(items)
}

/// Archives, then retires, what archiving retention rules make due.
pub async fn archive_once(node: &RaftNode, reader: &StateReader, target: &ArchiveTarget) -> Result<u64, String> {
    let mut archived = 0;
    for (ns, rule) in reader.retention_rules().map_err(|e| e.to_string())? {
        if !rule.archive {
            continue;
        }
        let cutoff = crate::memory::now_ms().saturating_sub(rule.max_age_ms);
        let due: Vec<Memory> = reader
            .created_before(&ns, cutoff, PURGE_BATCH)
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|m| !m.expired(crate::memory::now_ms()))
            .collect();
        if due.is_empty() {
            continue;
        }
        let keys = Keyring::resolve(target.key_file.as_deref()).map_err(|e| e.to_string())?;
        let info = reader.namespace(&ns).map_err(|e| e.to_string())?.ok_or("namespace gone")?;
        let cluster_id = reader.cluster_id().map_err(|e| e.to_string())?.ok_or("the cluster has no id yet")?;
        let applied = reader.applied_log_id().map_err(|e| e.to_string())?.ok_or("nothing applied yet")?;
        let (dir, memories) = (target.dir.clone(), due.clone());
        let path =
            tokio::task::spawn_blocking(move || write_archive(&dir, cluster_id, &keys, &info, applied, &memories))
                .await
                .map_err(|e| e.to_string())??;
        let items = due.iter().map(|m| (m.id.clone(), m.revision)).collect();
        let res = node
            .write(Command::system(Op::Retire { namespace: ns.clone(), items, archived: true }))
            .await
            .map_err(|e| e.to_string())?;
        if let Outcome::Retired { deleted } = res.outcome {
            archived += deleted;
            tracing::info!(namespace = ns, archived = deleted, path = %path.display(), "retention archive written");
        }
    }
    Ok(archived)
}

/// Writes `memories` as a backup-format archive (a state holding just them and their
/// namespace), restorable with `engram restore`. Returns the file's path.
pub fn write_archive(
    dir: &Path,
    cluster_id: [u8; 16],
    keys: &Keyring,
    info: &crate::memory::NamespaceInfo,
    applied: crate::raft::LogId,
    memories: &[Memory],
) -> Result<PathBuf, String> {
    use crate::storage::{codec, memory_key, MEMORIES, META_APPLIED, META_CLUSTER_ID, NAMESPACES, SM_META};
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    (|| -> Result<PathBuf, String> {
        // In memory: the archived memories are plain here and must not touch the disk so.
        let db = redb::Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(|e| e.to_string())?;
        let txn = db.begin_write().map_err(|e| e.to_string())?;
        {
            let mut meta = txn.open_table(SM_META).map_err(|e| e.to_string())?;
            meta.insert(META_APPLIED, codec::encode(&applied).as_slice()).map_err(|e| e.to_string())?;
            meta.insert(META_CLUSTER_ID, cluster_id.as_slice()).map_err(|e| e.to_string())?;
            let mut ns = info.clone();
            ns.memory_count = memories.len() as u64;
            ns.bytes = memories.iter().map(Memory::stored_bytes).sum();
            ns.index = crate::memory::IndexKind::Flat;
            txn.open_table(NAMESPACES)
                .map_err(|e| e.to_string())?
                .insert(info.name.as_str(), codec::encode_row(&ns).as_slice())
                .map_err(|e| e.to_string())?;
            let mut t = txn.open_table(MEMORIES).map_err(|e| e.to_string())?;
            for m in memories {
                t.insert(memory_key(&m.namespace, &m.id).as_slice(), codec::encode_memory(m).as_slice())
                    .map_err(|e| e.to_string())?;
            }
            for (_, def) in crate::storage::AUTH_TABLES.iter().chain(crate::storage::MODEL_TABLES.iter()) {
                txn.open_table(*def).map_err(|e| e.to_string())?;
            }
            txn.open_table(crate::storage::IDEMPOTENCY).map_err(|e| e.to_string())?;
            txn.open_table(crate::storage::IDEM_EXPIRY).map_err(|e| e.to_string())?;
        }
        // The derived indexes a restore rebuilds: the archive's data digest covers them.
        crate::storage::index::rebuild(&txn, &crate::storage::vault::Vault::off()).map_err(|e| e.to_string())?;
        txn.commit().map_err(|e| e.to_string())?;
        let name =
            format!("archive-{}-{:013}-{}.engram", info.name.replace('/', "_"), crate::memory::now_ms(), applied.index);
        let path = dir.join(name);
        let partial = dir.join(format!(".{}.partial", uuid::Uuid::now_v7()));
        let file = std::fs::File::create(&partial).map_err(|e| e.to_string())?;
        let (w, _) =
            crate::backup::create(&db, cluster_id, keys, std::io::BufWriter::new(file)).map_err(|e| e.to_string())?;
        w.into_inner().map_err(|e| e.to_string())?.sync_all().map_err(|e| e.to_string())?;
        std::fs::rename(&partial, &path).map_err(|e| e.to_string())?;
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| e.to_string())?;
        Ok(path)
    })()
}
