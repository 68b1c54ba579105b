//! The memory side of `apply`: puts under the namespace's memory policy (gate, exact dedup,
//! near-duplicates, default TTL), deletes, purges, retention, consolidation and reinforcement.
//!
//! Like the rest of `apply`, a pure function of the state, the log index and the command.
//! Near-duplicate candidates come from the node's vector shard, which reflects the state
//! before this apply batch (the batch's own writes are scanned from `ops` and the plan), are
//! searched exhaustively on the CPU, and are then re-scored exactly from the stored vectors in
//! f64 ([`policy::exact_score`]): the decision depends only on replicated data.
//!
//! Expiry is one rule here as in reads: a memory whose `expires_at_ms` is at or before the
//! entry's `now_ms` is absent (a put at its id creates, `if_absent` holds, a delete finds
//! nothing) until a purge removes it.

use std::collections::{BTreeMap, HashMap, HashSet};

use redb::WriteTransaction;

use super::types::{ConsolidationCluster, Outcome, PutAction, Rejection, StoreResult};
use crate::auth::policy::Access;
use crate::error::StorageError;
use crate::memory::policy::{self, DedupMode, KeepText, NearAction};
use crate::memory::{content_hash, Memory, MemoryInput, MemoryPolicy, Metric, NamespaceInfo, Precondition};
use crate::storage::index::{self, MemoryTables};
use crate::storage::{NS_POLICY, QUOTAS};
use crate::vector::{Filter, SearchParams, VectorOp, VectorStore};

/// What every memory op needs besides the transaction.
pub(crate) struct Ctx<'a> {
    pub index: u64,
    pub now_ms: u64,
    pub vectors: &'a VectorStore,
    /// This node's data keys: rows of a namespace that has one are sealed as they are written.
    pub vault: &'a crate::storage::vault::Vault,
}

/// Near-duplicate candidates first asked of the shard; doubled while the last one could still
/// be a twin, up to [`NEAR_CANDIDATES_MAX`], past which the namespace is scanned from the state.
const NEAR_CANDIDATES: usize = 16;
const NEAR_CANDIDATES_MAX: usize = 4096;
/// How far an f32 shard score may stray from the exact f64 score (cosine and inner product on
/// the scale of the threshold; L2 relative). Candidates are taken this much past the threshold.
const NEAR_SCORE_SLACK: f64 = 1e-3;

/// Whether a shard score may belong to a twin, allowing for the shard's f32 arithmetic.
fn may_be_twin(metric: Metric, shard_score: f32, threshold: f32) -> bool {
    let (s, t) = (shard_score as f64, threshold as f64);
    match metric {
        Metric::L2 => s <= t + NEAR_SCORE_SLACK * t.abs().max(1.0),
        Metric::Cosine | Metric::InnerProduct => s >= t - NEAR_SCORE_SLACK * t.abs().max(1.0),
    }
}

fn label(ns: &str) -> String {
    crate::http::namespace_label(ns)
}

/// The memory as `apply` sees it: `None` when absent or expired at `now_ms`.
fn live(m: Option<Memory>, now_ms: u64) -> Option<Memory> {
    m.filter(|m| !m.expired(now_ms))
}

/// Plans and applies a put. Every check runs against the state before the put (and the put's
/// own earlier items), then everything is written, or nothing.
pub(crate) fn put(
    txn: &WriteTransaction,
    ctx: &Ctx,
    info: &mut NamespaceInfo,
    items: &[(MemoryInput, Precondition)],
    access: &Access,
    ops: &mut Vec<VectorOp>,
) -> Result<Result<Vec<StoreResult>, Rejection>, StorageError> {
    let ns = info.name.clone();
    let policy = index::policy(&txn.open_table(NS_POLICY)?, &ns)?;
    let mut tables = MemoryTables::open(txn, ctx.vault)?;
    for (i, (m, _)) in items.iter().enumerate() {
        if let Some(r) = static_checks(i, m, info, access, &policy, ctx.now_ms) {
            metrics::counter!("engram_memory_refusals_total", "namespace" => label(&ns), "rule" => rule_of(&r))
                .increment(1);
            return Ok(Err(r));
        }
    }
    // The plan: the newest planned version of every id this put writes.
    let mut overlay: BTreeMap<String, Memory> = BTreeMap::new();
    let mut writes: Vec<Memory> = Vec::new();
    let mut results: Vec<StoreResult> = Vec::with_capacity(items.len());
    let mut prefix_counts: HashMap<String, u64> = HashMap::new();
    for (i, (m, pre)) in items.iter().enumerate() {
        let before = live(tables.get(&ns, &m.id)?, ctx.now_ms);
        if before.as_ref().is_some_and(|c| !access.covers(&c.tags)) {
            return Ok(Err(Rejection::PermissionDenied {
                field: format!("items[{i}].memory.id"),
                reason: "the id belongs to a memory outside the key's scope".into(),
            }));
        }
        let current_revision = before.as_ref().map(|c| c.revision);
        if !pre.holds(current_revision) {
            return Ok(Err(Rejection::PreconditionFailed {
                field: format!("items[{i}].precondition"),
                id: m.id.clone(),
                current_revision,
            }));
        }
        let current = match overlay.get(&m.id) {
            Some(planned) => Some(planned.clone()),
            None => before,
        };
        let mut record = new_record(&ns, m, current.as_ref(), ctx, &policy);
        if let Some(cur) = current {
            record.access_count = cur.access_count;
            record.merge_count = cur.merge_count;
            record.merged_from = cur.merged_from.clone();
            record.linked_to = cur.linked_to.clone();
            plan(&mut results, &mut writes, &mut overlay, ctx, record, PutAction::Updated);
            continue;
        }
        // A new memory: exact and near duplicates, then (for one that will exist) the id-prefix
        // rule.
        if policy.dedup != DedupMode::Off {
            if let Some(twin) = exact_twin(&tables, &overlay, &record, policy.dedup, access, ctx.now_ms)? {
                metrics::counter!("engram_memory_dedup_hits_total", "namespace" => label(&ns)).increment(1);
                if policy.dedup_merge {
                    let mut merged = twin.clone();
                    for (k, v) in &record.tags {
                        merged.tags.entry(k.clone()).or_insert_with(|| v.clone());
                    }
                    merged.importance = merged.importance.max(record.importance);
                    merged.access_count = merged.access_count.saturating_add(1);
                    merged.last_accessed_at_ms = merged.last_accessed_at_ms.max(ctx.now_ms);
                    plan(&mut results, &mut writes, &mut overlay, ctx, merged, PutAction::Deduplicated);
                } else {
                    results.push(StoreResult {
                        id: twin.id.clone(),
                        revision: twin.revision,
                        action: PutAction::Deduplicated,
                    });
                }
                continue;
            }
        }
        if let Some(near) = &policy.near_duplicate {
            if let Some((twin, score)) = near_twin(&tables, &overlay, ops, ctx, info, &record, near.threshold, access)?
            {
                match near.action {
                    NearAction::Reject => {
                        metrics::counter!("engram_memory_refusals_total", "namespace" => label(&ns), "rule" => "near_duplicate")
                            .increment(1);
                        return Ok(Err(Rejection::NearDuplicate {
                            field: format!("items[{i}].memory"),
                            twin: twin.id,
                            score_bits: score.to_bits(),
                        }));
                    }
                    NearAction::Merge => {
                        metrics::counter!("engram_memory_merges_total", "namespace" => label(&ns)).increment(1);
                        let mut merged = twin.clone();
                        policy::merge(&mut merged, &record, near.keep, true);
                        plan(&mut results, &mut writes, &mut overlay, ctx, merged, PutAction::Merged);
                        continue;
                    }
                    NearAction::Link => {
                        if let Some(r) = prefix_room(&tables, &ns, &policy.gate, &m.id, i, &mut prefix_counts)? {
                            return Ok(Err(r));
                        }
                        record.linked_to = Some(twin.id.clone());
                        plan(&mut results, &mut writes, &mut overlay, ctx, record, PutAction::Linked { twin: twin.id });
                        continue;
                    }
                }
            }
        }
        if let Some(r) = prefix_room(&tables, &ns, &policy.gate, &m.id, i, &mut prefix_counts)? {
            return Ok(Err(r));
        }
        plan(&mut results, &mut writes, &mut overlay, ctx, record, PutAction::Created);
    }
    if let Some(r) = check_quota(txn, &tables, info, &overlay)? {
        return Ok(Err(r));
    }
    // Everything holds: write the plan in order (a later version of an id replaces an earlier).
    let stats = |f: &mut crate::memory::NamespaceStats| {
        for r in &results {
            match r.action {
                PutAction::Created => f.created += 1,
                PutAction::Updated => f.updated += 1,
                PutAction::Deduplicated => f.dedup_hits += 1,
                PutAction::Merged => f.near_merges += 1,
                PutAction::Linked { .. } => {
                    f.created += 1;
                    f.near_links += 1;
                }
            }
        }
    };
    for m in writes {
        write(&mut tables, info, m, ops)?;
    }
    drop(tables);
    index::bump_stats(txn, &ns, stats)?;
    Ok(Ok(results))
}

/// Plans writing `m` at this entry as an item's answer: the put's results, its writes in
/// order, and the newest planned version of each id.
fn plan(
    results: &mut Vec<StoreResult>,
    writes: &mut Vec<Memory>,
    overlay: &mut BTreeMap<String, Memory>,
    ctx: &Ctx,
    mut m: Memory,
    action: PutAction,
) {
    m.updated_at_ms = ctx.now_ms;
    m.revision = ctx.index;
    results.push(StoreResult { id: m.id.clone(), revision: ctx.index, action });
    writes.push(m.clone());
    overlay.insert(m.id.clone(), m);
}

/// The record an item writes: timestamps from the entry, the expiry the policy gives it.
fn new_record(ns: &str, m: &MemoryInput, current: Option<&Memory>, ctx: &Ctx, policy: &MemoryPolicy) -> Memory {
    Memory {
        namespace: ns.into(),
        id: m.id.clone(),
        text: m.text.clone(),
        embedding: m.embedding.clone(),
        tags: m.tags.clone(),
        importance: m.importance,
        created_at_ms: current.map(|c| c.created_at_ms).unwrap_or(ctx.now_ms),
        updated_at_ms: ctx.now_ms,
        last_accessed_at_ms: ctx.now_ms,
        expires_at_ms: policy.expiry_for(m.expires_at_ms, ctx.now_ms),
        content_hash: content_hash(&m.text),
        revision: ctx.index,
        ..Memory::default()
    }
}

/// Writes one memory with its indexes and vector op, keeping the namespace's count and bytes;
/// whether it replaced one.
fn write(
    tables: &mut MemoryTables,
    info: &mut NamespaceInfo,
    m: Memory,
    ops: &mut Vec<VectorOp>,
) -> Result<bool, StorageError> {
    let replaced = match tables.put(&m)? {
        Some(old) => {
            info.bytes = info.bytes.saturating_sub(old.stored_bytes()) + m.stored_bytes();
            true
        }
        None => {
            info.memory_count = info.memory_count.checked_add(1).ok_or_else(|| miscounted(info, &m.id))?;
            // Bytes are an estimate (a row's size may differ between formats): they saturate.
            info.bytes = info.bytes.saturating_add(m.stored_bytes());
            false
        }
    };
    ops.push(VectorOp::Upsert { metric: info.metric, memory: Box::new(m) });
    Ok(replaced)
}

fn miscounted(info: &NamespaceInfo, id: &str) -> StorageError {
    StorageError::Corrupt {
        table: "namespaces",
        reason: format!(
            "namespace {:?} counts {} memories, which does not match its rows (at memory {id:?})",
            info.name, info.memory_count
        ),
    }
}

/// Removes one memory with its indexes and vector op.
fn remove(
    tables: &mut MemoryTables,
    info: &mut NamespaceInfo,
    id: &str,
    ops: &mut Vec<VectorOp>,
) -> Result<Option<Memory>, StorageError> {
    let removed = tables.remove(&info.name, id)?;
    if let Some(m) = &removed {
        // A namespace that counts no memories but holds this one does not match its rows: the
        // state is corrupt, and carrying on with a wrapped (or clamped) count would hide it.
        info.memory_count = info.memory_count.checked_sub(1).ok_or_else(|| miscounted(info, id))?;
        info.bytes = info.bytes.saturating_sub(m.stored_bytes());
        ops.push(VectorOp::Remove { namespace: info.name.clone(), id: id.into() });
    }
    Ok(removed)
}

fn rule_of(r: &Rejection) -> String {
    match r {
        Rejection::GateRefused { rule, .. } => rule.clone(),
        Rejection::Invalid { .. } => "invalid".into(),
        Rejection::DimensionMismatch { .. } => "dimension".into(),
        _ => "scope".into(),
    }
}

/// Checks of one item that need no other memory: dimension, scope, expiry, vector, gate.
fn static_checks(
    i: usize,
    m: &MemoryInput,
    info: &NamespaceInfo,
    access: &Access,
    policy: &MemoryPolicy,
    now_ms: u64,
) -> Option<Rejection> {
    if m.embedding.len() as u32 != info.dimension {
        return Some(Rejection::DimensionMismatch {
            field: format!("items[{i}].memory.embedding"),
            expected: info.dimension,
            got: m.embedding.len() as u32,
        });
    }
    if !access.covers(&m.tags) {
        return Some(Rejection::PermissionDenied {
            field: format!("items[{i}].memory.tags"),
            reason: "the key may only write memories carrying its scope's tag".into(),
        });
    }
    if let Some(at) = m.expires_at_ms.filter(|at| *at <= now_ms) {
        return Some(Rejection::Invalid {
            field: format!("items[{i}].memory.expires_at_ms"),
            reason: format!("{at} is not after the write's time {now_ms}: the memory would be born expired"),
        });
    }
    if info.metric == Metric::Cosine && m.embedding.iter().all(|x| *x == 0.0) {
        return Some(Rejection::Invalid {
            field: format!("items[{i}].memory.embedding"),
            reason: "a zero vector has no direction (cosine namespace)".into(),
        });
    }
    policy::check_gate(&policy.gate, &format!("items[{i}].memory"), m).err().map(|r| Rejection::GateRefused {
        field: r.field,
        rule: r.rule,
        reason: r.reason,
    })
}

/// The memory that `record` exactly duplicates: same text hash (and embedding, if the mode
/// says so), live, within the caller's scope, other than `record` itself. Smallest id wins;
/// the put's own earlier items count.
fn exact_twin(
    tables: &MemoryTables,
    overlay: &BTreeMap<String, Memory>,
    record: &Memory,
    mode: DedupMode,
    access: &Access,
    now_ms: u64,
) -> Result<Option<Memory>, StorageError> {
    let same = |m: &Memory| {
        m.id != record.id
            && m.content_hash == record.content_hash
            && m.text == record.text
            && (mode != DedupMode::TextAndEmbedding || bits(&m.embedding) == bits(&record.embedding))
            && !m.expired(now_ms)
            && access.covers(&m.tags)
    };
    let mut best: Option<Memory> = None;
    for id in tables.with_content(&record.namespace, &record.content_hash)? {
        let m = match overlay.get(&id) {
            Some(planned) => Some(planned.clone()),
            None => tables.get(&record.namespace, &id)?,
        };
        if let Some(m) = m.filter(|m| same(m)) {
            best = Some(m);
            break;
        }
    }
    for m in overlay.values().filter(|m| same(m)) {
        if best.as_ref().is_none_or(|b| m.id < b.id) {
            best = Some(m.clone());
        }
    }
    Ok(best)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The best near-duplicate of `record` by exact score, if one passes `threshold`: candidates
/// from the shard (exhaustive), from earlier entries of this apply batch (`ops`) and from the
/// put's own plan; each re-read from the transaction and scored exactly. Ties: smallest id.
#[allow(clippy::too_many_arguments)]
fn near_twin(
    tables: &MemoryTables,
    overlay: &BTreeMap<String, Memory>,
    ops: &[VectorOp],
    ctx: &Ctx,
    info: &NamespaceInfo,
    record: &Memory,
    threshold: f32,
    access: &Access,
) -> Result<Option<(Memory, f64)>, StorageError> {
    let ns = &info.name;
    let mut ids: HashSet<String> = HashSet::new();
    // The shard reflects the state before this batch, unless the batch dropped the namespace.
    let dropped = ops.iter().any(|op| matches!(op, VectorOp::DropNamespace { namespace } if namespace == ns));
    if !dropped {
        let filter = match access {
            Access::Full => Filter::default(),
            Access::Tagged(scope) => Filter { scope: Some(scope.iter().cloned().collect()), ..Filter::default() },
        };
        // Every memory that could be a twin, whatever order this node's shard keeps vectors
        // in: keep asking for more while the last hit could still pass the threshold, so ties
        // and near-ties are never cut off at an arbitrary k.
        let mut k = NEAR_CANDIDATES;
        loop {
            let hits = ctx
                .vectors
                .search(ns, &record.embedding, k, &filter, SearchParams::EXHAUSTIVE, ctx.now_ms)
                .map_err(|e| StorageError::Corrupt { table: "vectors", reason: e.to_string() })?
                .unwrap_or_default();
            let complete = hits.len() < k || hits.last().is_none_or(|(_, s)| !may_be_twin(info.metric, *s, threshold));
            if complete {
                ids.extend(hits.into_iter().map(|(id, _)| id));
                break;
            }
            if k >= NEAR_CANDIDATES_MAX {
                // Thousands of near-identical memories: score them all, from the state.
                ids.extend(tables.ids(ns)?);
                break;
            }
            k *= 2;
        }
    }
    for op in ops {
        if let VectorOp::Upsert { memory, .. } = op {
            if &memory.namespace == ns {
                ids.insert(memory.id.clone());
            }
        }
    }
    ids.extend(overlay.keys().cloned());
    ids.remove(&record.id);
    let mut best: Option<(Memory, f64)> = None;
    let mut sorted: Vec<String> = ids.into_iter().collect();
    sorted.sort();
    for id in sorted {
        let m = match overlay.get(&id) {
            Some(planned) => Some(planned.clone()),
            None => tables.get(ns, &id)?,
        };
        let Some(m) = live(m, ctx.now_ms).filter(|m| access.covers(&m.tags)) else { continue };
        let score = policy::exact_score(info.metric, &record.embedding, &m.embedding);
        if !policy::is_twin(info.metric, score, threshold) {
            continue;
        }
        let better = match &best {
            None => true,
            Some((_, s)) => match info.metric {
                Metric::L2 => score < *s,
                _ => score > *s,
            },
        };
        if better {
            best = Some((m, score));
        }
    }
    Ok(best)
}

/// The gate's `max_per_id_prefix` for a memory about to be created as item `i`: refused when
/// its prefix is full, else counted in `counts` (the put's own earlier creations).
fn prefix_room(
    tables: &MemoryTables,
    ns: &str,
    gate: &policy::Gate,
    id: &str,
    i: usize,
    counts: &mut HashMap<String, u64>,
) -> Result<Option<Rejection>, StorageError> {
    let (Some(max), Some(prefix)) = (gate.max_per_id_prefix, policy::id_prefix(gate, id).map(str::to_string)) else {
        return Ok(None);
    };
    let n = match counts.get(&prefix) {
        Some(n) => *n,
        None => tables.count_prefix(ns, &prefix, max.saturating_add(1))?,
    };
    if n >= max {
        metrics::counter!("engram_memory_refusals_total", "namespace" => label(ns), "rule" => "max_per_id_prefix")
            .increment(1);
        return Ok(Some(Rejection::GateRefused {
            field: format!("items[{i}].memory.id"),
            rule: "max_per_id_prefix".into(),
            reason: format!("the prefix {prefix:?} is at its limit of {max} memories"),
        }));
    }
    counts.insert(prefix, n + 1);
    Ok(None)
}

/// Tenant quotas against the namespace as the plan would leave it.
fn check_quota(
    txn: &WriteTransaction,
    tables: &MemoryTables,
    info: &NamespaceInfo,
    overlay: &BTreeMap<String, Memory>,
) -> Result<Option<Rejection>, StorageError> {
    let (mut count, mut bytes) = (info.memory_count, info.bytes);
    for (id, m) in overlay {
        match tables.get(&info.name, id)? {
            Some(old) => bytes = bytes.saturating_sub(old.stored_bytes()) + m.stored_bytes(),
            None => {
                count += 1;
                bytes += m.stored_bytes();
            }
        }
    }
    quota_refusal(txn, &info.name, "items", (count, bytes), (info.memory_count, info.bytes))
}

/// The tenant quota a namespace holding `now` (memories, bytes) instead of `before` would
/// break, if any: a limit counts only where the namespace grows past it.
fn quota_refusal(
    txn: &WriteTransaction,
    namespace: &str,
    field: &str,
    (count, bytes): (u64, u64),
    (count_before, bytes_before): (u64, u64),
) -> Result<Option<Rejection>, StorageError> {
    let quota = crate::storage::auth::quota(&txn.open_table(QUOTAS)?, crate::auth::records::tenant_of(namespace))?;
    let over = |max: Option<u64>, now: u64, before: u64| max.is_some_and(|m| now > m && now > before);
    if over(quota.max_memories_per_namespace, count, count_before) {
        return Ok(Some(Rejection::QuotaExceeded {
            field: field.into(),
            reason: format!(
                "namespace would hold {count} memories; its tenant's limit is {}",
                quota.max_memories_per_namespace.unwrap_or(0)
            ),
        }));
    }
    if over(quota.max_bytes_per_namespace, bytes, bytes_before) {
        return Ok(Some(Rejection::QuotaExceeded {
            field: field.into(),
            reason: format!(
                "namespace would hold {bytes} bytes; its tenant's limit is {}",
                quota.max_bytes_per_namespace.unwrap_or(0)
            ),
        }));
    }
    Ok(None)
}

/// Tenant quotas against a namespace that would hold exactly `memories` (a partial restore).
pub(crate) fn restore_quota(
    txn: &WriteTransaction,
    info: &NamespaceInfo,
    memories: &[Memory],
) -> Result<Option<Rejection>, StorageError> {
    let bytes: u64 = memories.iter().map(Memory::stored_bytes).sum();
    // Measured from empty: the namespace's current memories are dropped first.
    quota_refusal(txn, &info.name, "memories", (memories.len() as u64, bytes), (0, 0))
}

/// Writes the rows of a partial restore into an emptied namespace, each at revision
/// `ctx.index`.
pub(crate) fn restore(
    txn: &WriteTransaction,
    ctx: &Ctx,
    info: &mut NamespaceInfo,
    memories: &[Memory],
    ops: &mut Vec<VectorOp>,
) -> Result<(), StorageError> {
    let mut tables = MemoryTables::open(txn, ctx.vault)?;
    write_restored(&mut tables, info, memories.iter().cloned(), ctx.index, ops)?;
    Ok(())
}

/// Writes restored rows, each at revision `index`; how many replaced a memory.
fn write_restored(
    tables: &mut MemoryTables,
    info: &mut NamespaceInfo,
    memories: impl IntoIterator<Item = Memory>,
    index: u64,
    ops: &mut Vec<VectorOp>,
) -> Result<u64, StorageError> {
    let mut replaced = 0;
    for m in memories {
        replaced += write(tables, info, Memory { revision: index, ..m }, ops)? as u64;
    }
    Ok(replaced)
}

/// Writes some restored rows into a namespace that keeps its other memories, each at revision
/// `ctx.index`, after the tenant quotas (as the namespace would be). Returns how many of
/// them replaced a memory.
pub(crate) fn restore_some(
    txn: &WriteTransaction,
    ctx: &Ctx,
    info: &mut NamespaceInfo,
    memories: &[Memory],
    ops: &mut Vec<VectorOp>,
) -> Result<Result<u64, Rejection>, StorageError> {
    let mut tables = MemoryTables::open(txn, ctx.vault)?;
    let overlay: BTreeMap<String, Memory> =
        memories.iter().map(|m| (m.id.clone(), Memory { revision: ctx.index, ..m.clone() })).collect();
    if let Some(r) = check_quota(txn, &tables, info, &overlay)? {
        return Ok(Err(r));
    }
    Ok(Ok(write_restored(&mut tables, info, overlay.into_values(), ctx.index, ops)?))
}

/// Deletes one memory; an expired one is already absent.
pub(crate) fn delete(
    txn: &WriteTransaction,
    ctx: &Ctx,
    info: &mut NamespaceInfo,
    id: &str,
    pre: Precondition,
    access: &Access,
    ops: &mut Vec<VectorOp>,
) -> Result<Outcome, StorageError> {
    let mut tables = MemoryTables::open(txn, ctx.vault)?;
    // A memory outside the caller's scope is, to the caller, not there.
    let current = live(tables.get(&info.name, id)?, ctx.now_ms).filter(|m| access.covers(&m.tags));
    let current_revision = current.as_ref().map(|m| m.revision);
    if !pre.holds(current_revision) {
        return Ok(Outcome::Rejected(Rejection::PreconditionFailed {
            field: "precondition".into(),
            id: id.into(),
            current_revision,
        }));
    }
    if current.is_none() {
        return Ok(Outcome::Deleted { deleted: false });
    }
    remove(&mut tables, info, id, ops)?;
    Ok(Outcome::Deleted { deleted: true })
}

/// Drops every memory of a namespace with their indexes, policy and counters.
pub(crate) fn drop_namespace(txn: &WriteTransaction, ctx: &Ctx, ns: &str) -> Result<u64, StorageError> {
    let n = MemoryTables::open(txn, ctx.vault)?.drop_namespace(ns)?;
    index::drop_model(txn, ns)?;
    Ok(n)
}

/// Deletes the listed memories that are due: expired at `now_ms`, or past a drop-only
/// retention rule of their namespace.
pub(crate) fn purge(
    txn: &WriteTransaction,
    ctx: &Ctx,
    items: &[(String, String)],
    infos: &mut BTreeMap<String, NamespaceInfo>,
    ops: &mut Vec<VectorOp>,
) -> Result<Outcome, StorageError> {
    let mut rules: BTreeMap<String, Option<policy::Retention>> = BTreeMap::new();
    {
        let t = txn.open_table(NS_POLICY)?;
        for (ns, _) in items {
            if !rules.contains_key(ns) {
                rules.insert(ns.clone(), index::policy(&t, ns)?.retention.filter(|r| !r.archive));
            }
        }
    }
    let mut tables = MemoryTables::open(txn, ctx.vault)?;
    let mut per_ns: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let (mut expired, mut retired) = (0u64, 0u64);
    for (ns, id) in items {
        let Some(info) = infos.get_mut(ns) else { continue };
        let Some(m) = tables.get(ns, id)? else { continue };
        let old =
            rules.get(ns).copied().flatten().is_some_and(|r| m.created_at_ms < ctx.now_ms.saturating_sub(r.max_age_ms));
        let reason = if m.expired(ctx.now_ms) {
            0
        } else if old {
            1
        } else {
            continue;
        };
        remove(&mut tables, info, id, ops)?;
        let e = per_ns.entry(ns.clone()).or_default();
        if reason == 0 {
            expired += 1;
            e.0 += 1;
        } else {
            retired += 1;
            e.1 += 1;
        }
    }
    drop(tables);
    for (ns, (e, r)) in per_ns {
        metrics::counter!("engram_memory_purged_total", "namespace" => label(&ns), "reason" => "expired").increment(e);
        metrics::counter!("engram_memory_purged_total", "namespace" => label(&ns), "reason" => "retention")
            .increment(r);
        index::bump_stats(txn, &ns, |s| {
            s.purged += e;
            s.retired += r;
        })?;
    }
    Ok(Outcome::Purged { expired, retired })
}

/// Deletes the listed versions (retention archive): a memory written since stays.
pub(crate) fn retire(
    txn: &WriteTransaction,
    ctx: &Ctx,
    info: &mut NamespaceInfo,
    items: &[(String, u64)],
    archived: bool,
    ops: &mut Vec<VectorOp>,
) -> Result<Outcome, StorageError> {
    // The rule as it stands at this entry, not as the leader saw it when it planned: a rule
    // removed, lengthened or switched from archiving since retires nothing it no longer covers.
    let policy = index::policy(&txn.open_table(NS_POLICY)?, &info.name)?;
    let Some(rule) = policy.retention.filter(|r| r.archive == archived) else {
        return Ok(Outcome::Retired { deleted: 0 });
    };
    let cutoff = ctx.now_ms.saturating_sub(rule.max_age_ms);
    let mut tables = MemoryTables::open(txn, ctx.vault)?;
    let mut deleted = 0u64;
    for (id, rev) in items {
        if tables.get(&info.name, id)?.is_some_and(|m| m.revision == *rev && m.created_at_ms < cutoff) {
            remove(&mut tables, info, id, ops)?;
            deleted += 1;
        }
    }
    drop(tables);
    let ns = info.name.clone();
    if archived {
        metrics::counter!("engram_memory_archived_total", "namespace" => label(&ns)).increment(deleted);
    }
    index::bump_stats(txn, &ns, |s| {
        s.retired += deleted;
        if archived {
            s.archived += deleted;
        }
    })?;
    Ok(Outcome::Retired { deleted })
}

/// Merges each cluster whose members are all still as the plan saw them.
pub(crate) fn consolidate(
    txn: &WriteTransaction,
    ctx: &Ctx,
    info: &mut NamespaceInfo,
    clusters: &[ConsolidationCluster],
    keep_rule: KeepText,
    ops: &mut Vec<VectorOp>,
) -> Result<Outcome, StorageError> {
    let mut tables = MemoryTables::open(txn, ctx.vault)?;
    let ns = info.name.clone();
    let mut merged = Vec::with_capacity(clusters.len());
    let mut absorbed = 0u64;
    let mut seen: HashSet<&str> = HashSet::new();
    for c in clusters {
        let members: Vec<&(String, u64)> = std::iter::once(&c.keep).chain(c.absorb.iter()).collect();
        // A memory may be in one cluster only; a changed member voids its cluster.
        let mut current = Vec::with_capacity(members.len());
        let mut ok = !c.absorb.is_empty() && members.iter().all(|(id, _)| seen.insert(id.as_str()));
        if ok {
            for (id, rev) in &members {
                match live(tables.get(&ns, id)?, ctx.now_ms) {
                    Some(m) if m.revision == *rev => current.push(m),
                    _ => {
                        ok = false;
                        break;
                    }
                }
            }
        }
        if !ok {
            merged.push(false);
            continue;
        }
        let mut keep = current.remove(0);
        for m in &current {
            let newer = m.updated_at_ms > keep.updated_at_ms;
            policy::merge(&mut keep, m, keep_rule, newer);
        }
        keep.updated_at_ms = ctx.now_ms;
        keep.revision = ctx.index;
        for m in &current {
            remove(&mut tables, info, &m.id, ops)?;
        }
        write(&mut tables, info, keep, ops)?;
        absorbed += current.len() as u64;
        merged.push(true);
    }
    drop(tables);
    metrics::counter!("engram_memory_consolidated_total", "namespace" => label(&ns)).increment(absorbed);
    index::bump_stats(txn, &ns, |s| s.consolidated += absorbed)?;
    Ok(Outcome::Consolidated { merged, absorbed })
}

/// Adds coalesced access counts; revisions and vectors stay.
pub(crate) fn reinforce(
    txn: &WriteTransaction,
    ctx: &Ctx,
    ns: &str,
    hits: &[(String, u32)],
) -> Result<Outcome, StorageError> {
    let mut tables = MemoryTables::open(txn, ctx.vault)?;
    let (mut memories, mut total) = (0u64, 0u64);
    for (id, count) in hits {
        if let Some(mut m) = live(tables.get(ns, id)?, ctx.now_ms) {
            m.access_count = m.access_count.saturating_add(*count as u64);
            m.last_accessed_at_ms = m.last_accessed_at_ms.max(ctx.now_ms);
            tables.put(&m)?;
            memories += 1;
            total += *count as u64;
        }
    }
    drop(tables);
    index::bump_stats(txn, ns, |s| s.reinforced += total)?;
    Ok(Outcome::Reinforced { memories })
}

/// Replaces the policy, checked against the namespace's metric.
pub(crate) fn set_policy(
    txn: &WriteTransaction,
    info: &NamespaceInfo,
    policy: &MemoryPolicy,
) -> Result<Outcome, StorageError> {
    if let Err(e) = policy.validate(info.metric) {
        return Ok(Outcome::Rejected(Rejection::Invalid { field: e.field, reason: e.reason }));
    }
    index::put_policy(txn, &info.name, policy)?;
    Ok(Outcome::PolicySet(policy.clone()))
}
