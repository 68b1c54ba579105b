//! Applying one [`Command`] inside a state-machine write transaction.
//!
//! Pure function of (current state, log index, command): no clock, no randomness, so every
//! node reaches byte-identical state. A command that cannot apply (a failed precondition, a
//! dimension mismatch) becomes [`Outcome::Rejected`] and leaves the state unchanged.

use redb::{ReadableTable, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::types::{Command, CommandResult, Op, Outcome, PutResult, Rejection};
use crate::error::StorageError;
use crate::memory::{content_hash, IndexKind, Memory, MemoryInput, Metric, NamespaceInfo, Precondition};
use crate::storage::{codec, memory_key, namespace_range, IDEMPOTENCY, IDEM_EXPIRY, MEMORIES, NAMESPACES};
use crate::vector::VectorOp;

/// How long an idempotency key is remembered, measured on the leaders' clocks as written in
/// the log (never the applying node's clock).
pub const IDEMPOTENCY_TTL_MS: u64 = 24 * 60 * 60 * 1000;

#[derive(Debug, Serialize, Deserialize)]
struct IdempotencyRecord {
    recorded_at_ms: u64,
    result: CommandResult,
}

/// Applies `cmd` at log index `index`; every state change also pushes its [`VectorOp`].
pub(crate) fn apply_command(
    txn: &WriteTransaction,
    index: u64,
    cmd: &Command,
    ops: &mut Vec<VectorOp>,
) -> Result<CommandResult, StorageError> {
    if let Some(key) = &cmd.idempotency_key {
        let table = txn.open_table(IDEMPOTENCY)?;
        let seen = table.get(key.as_str())?.map(|v| codec::decode::<IdempotencyRecord>("idempotency", v.value()));
        if let Some(rec) = seen {
            metrics::counter!("engram_idempotent_replays_total").increment(1);
            return Ok(rec?.result);
        }
    }
    prune_idempotency(txn, cmd.now_ms)?;
    let outcome = match &cmd.op {
        Op::CreateNamespace { namespace, dimension, metric, ivf_min_vectors } => {
            create_namespace(txn, cmd.now_ms, namespace, (*dimension, *metric, *ivf_min_vectors), ops)?
        }
        Op::Put { namespace, items, ivf_min_vectors } => {
            put(txn, (index, cmd.now_ms, *ivf_min_vectors), namespace, items, ops)?
        }
        Op::Delete { namespace, id, precondition } => delete(txn, namespace, id, *precondition, ops)?,
        Op::DeleteNamespace { namespace } => delete_namespace(txn, namespace, ops)?,
        Op::SetClusterId { cluster_id } => set_cluster_id(txn, cluster_id)?,
    };
    let result = CommandResult { index, outcome };
    if let Some(key) = &cmd.idempotency_key {
        let rec = IdempotencyRecord { recorded_at_ms: cmd.now_ms, result: result.clone() };
        txn.open_table(IDEMPOTENCY)?.insert(key.as_str(), codec::encode(&rec).as_slice())?;
        txn.open_table(IDEM_EXPIRY)?.insert((cmd.now_ms, key.as_str()), ())?;
    }
    Ok(result)
}

/// Records what `cmd` may have changed, for catching vector index files up with the log:
/// every memory it names, and every namespace it may have dropped. (Creating a namespace needs
/// no entry: one missing from the index files is rebuilt anyway.)
pub(crate) fn touched(cmd: &Command, changes: &mut crate::vector::Changes) {
    match &cmd.op {
        Op::CreateNamespace { .. } => {}
        Op::Put { namespace, items, .. } => {
            changes.memories.extend(items.iter().map(|(m, _)| (namespace.clone(), m.id.clone())));
        }
        Op::Delete { namespace, id, .. } => {
            changes.memories.insert((namespace.clone(), id.clone()));
        }
        Op::SetClusterId { .. } => {}
        Op::DeleteNamespace { namespace } => {
            changes.namespaces.insert(namespace.clone());
        }
    }
}

/// Forgets idempotency keys recorded more than the TTL before `now_ms`.
fn prune_idempotency(txn: &WriteTransaction, now_ms: u64) -> Result<(), StorageError> {
    let cutoff = now_ms.saturating_sub(IDEMPOTENCY_TTL_MS);
    let mut expiry = txn.open_table(IDEM_EXPIRY)?;
    let mut keys = Vec::new();
    for item in expiry.range::<(u64, &str)>(..(cutoff, ""))? {
        let (k, _) = item?;
        let (ts, key) = k.value();
        keys.push((ts, key.to_string()));
    }
    if keys.is_empty() {
        return Ok(());
    }
    let mut idem = txn.open_table(IDEMPOTENCY)?;
    for (ts, key) in &keys {
        expiry.remove((*ts, key.as_str()))?;
        idem.remove(key.as_str())?;
    }
    Ok(())
}

fn load_namespace(txn: &WriteTransaction, namespace: &str) -> Result<Option<NamespaceInfo>, StorageError> {
    let table = txn.open_table(NAMESPACES)?;
    let v = table.get(namespace)?;
    v.map(|v| codec::decode("namespaces", v.value())).transpose()
}

fn store_namespace(txn: &WriteTransaction, info: &NamespaceInfo) -> Result<(), StorageError> {
    txn.open_table(NAMESPACES)?.insert(info.name.as_str(), codec::encode(info).as_slice())?;
    Ok(())
}

fn create_namespace(
    txn: &WriteTransaction,
    now_ms: u64,
    namespace: &str,
    (dimension, metric, ivf_min_vectors): (u32, Metric, u64),
    ops: &mut Vec<VectorOp>,
) -> Result<Outcome, StorageError> {
    if let Some(info) = load_namespace(txn, namespace)? {
        if info.dimension == dimension && info.metric == metric {
            return Ok(Outcome::NamespaceCreated(info));
        }
        return Ok(Outcome::Rejected(Rejection::NamespaceExists {
            namespace: namespace.into(),
            dimension: info.dimension,
            metric: info.metric,
        }));
    }
    let info = NamespaceInfo {
        name: namespace.into(),
        dimension,
        metric,
        memory_count: 0,
        created_at_ms: now_ms,
        index: IndexKind::Flat,
        ivf_min_vectors,
    };
    store_namespace(txn, &info)?;
    ops.push(VectorOp::Namespace { namespace: namespace.into(), dimension, metric });
    Ok(Outcome::NamespaceCreated(info))
}

fn put(
    txn: &WriteTransaction,
    (index, now_ms, ivf_min_vectors): (u64, u64, u64),
    namespace: &str,
    items: &[(MemoryInput, Precondition)],
    ops: &mut Vec<VectorOp>,
) -> Result<Outcome, StorageError> {
    let existing_ns = load_namespace(txn, namespace)?;
    let first_dim = items.first().map(|(m, _)| m.embedding.len() as u32).unwrap_or(0);
    let expected = existing_ns.as_ref().map(|i| i.dimension).unwrap_or(first_dim);
    for (i, (m, _)) in items.iter().enumerate() {
        if m.embedding.len() as u32 != expected {
            return Ok(Outcome::Rejected(Rejection::DimensionMismatch {
                field: format!("items[{i}].memory.embedding"),
                expected,
                got: m.embedding.len() as u32,
            }));
        }
    }
    let mut table = txn.open_table(MEMORIES)?;
    // Every guard is checked against the state before the batch, then everything applies.
    let mut previous = Vec::with_capacity(items.len());
    for (i, (m, pre)) in items.iter().enumerate() {
        let cur = table.get(memory_key(namespace, &m.id).as_slice())?;
        let cur = cur.map(|v| codec::decode_memory(v.value())).transpose()?;
        let current_revision = cur.as_ref().map(|c| c.revision);
        if !pre.holds(current_revision) {
            return Ok(Outcome::Rejected(Rejection::PreconditionFailed {
                field: format!("items[{i}].precondition"),
                id: m.id.clone(),
                current_revision,
            }));
        }
        previous.push(cur);
    }
    let mut info = existing_ns.unwrap_or_else(|| NamespaceInfo {
        name: namespace.into(),
        dimension: expected,
        metric: Metric::Cosine,
        memory_count: 0,
        created_at_ms: now_ms,
        index: IndexKind::Flat,
        ivf_min_vectors,
    });
    let mut results = Vec::with_capacity(items.len());
    for ((m, _), prev) in items.iter().zip(previous) {
        let record = Memory {
            namespace: namespace.into(),
            id: m.id.clone(),
            text: m.text.clone(),
            embedding: m.embedding.clone(),
            tags: m.tags.clone(),
            importance: m.importance,
            created_at_ms: prev.as_ref().map(|p| p.created_at_ms).unwrap_or(now_ms),
            updated_at_ms: now_ms,
            last_accessed_at_ms: now_ms,
            expires_at_ms: m.expires_at_ms,
            content_hash: content_hash(&m.text),
            revision: index,
        };
        let key = memory_key(namespace, &m.id);
        let replaced = table.insert(key.as_slice(), codec::encode_memory(&record).as_slice())?.is_some();
        if !replaced {
            info.memory_count += 1;
        }
        results.push(PutResult { id: m.id.clone(), revision: index, updated: replaced });
        ops.push(VectorOp::Upsert { metric: info.metric, memory: Box::new(record) });
    }
    drop(table);
    reconsider_index(&mut info, ops);
    store_namespace(txn, &info)?;
    Ok(Outcome::Put(results))
}

fn delete(
    txn: &WriteTransaction,
    namespace: &str,
    id: &str,
    pre: Precondition,
    ops: &mut Vec<VectorOp>,
) -> Result<Outcome, StorageError> {
    let Some(mut info) = load_namespace(txn, namespace)? else {
        return Ok(Outcome::Rejected(Rejection::NamespaceNotFound { namespace: namespace.into() }));
    };
    let mut table = txn.open_table(MEMORIES)?;
    let key = memory_key(namespace, id);
    let current_revision = match table.get(key.as_slice())? {
        Some(v) => Some(codec::decode_memory(v.value())?.revision),
        None => None,
    };
    if !pre.holds(current_revision) {
        return Ok(Outcome::Rejected(Rejection::PreconditionFailed {
            field: "precondition".into(),
            id: id.into(),
            current_revision,
        }));
    }
    let deleted = table.remove(key.as_slice())?.is_some();
    drop(table);
    if deleted {
        info.memory_count -= 1;
        ops.push(VectorOp::Remove { namespace: namespace.into(), id: id.into() });
        reconsider_index(&mut info, ops);
        store_namespace(txn, &info)?;
    }
    Ok(Outcome::Deleted { deleted })
}

/// Moves the namespace to the index kind its new size calls for, and tells the vector view.
fn reconsider_index(info: &mut NamespaceInfo, ops: &mut Vec<VectorOp>) {
    let next = info.index.next(info.memory_count, info.ivf_min_vectors);
    if next != info.index {
        info.index = next;
        ops.push(VectorOp::Rebuild { namespace: info.name.clone(), kind: next });
    }
}

fn delete_namespace(txn: &WriteTransaction, namespace: &str, ops: &mut Vec<VectorOp>) -> Result<Outcome, StorageError> {
    if load_namespace(txn, namespace)?.is_none() {
        return Ok(Outcome::Rejected(Rejection::NamespaceNotFound { namespace: namespace.into() }));
    }
    let (lo, hi) = namespace_range(namespace);
    let mut table = txn.open_table(MEMORIES)?;
    let mut memories = 0u64;
    table.retain_in::<&[u8], _>(lo.as_slice()..hi.as_slice(), |_, _| {
        memories += 1;
        false
    })?;
    drop(table);
    txn.open_table(NAMESPACES)?.remove(namespace)?;
    ops.push(VectorOp::DropNamespace { namespace: namespace.into() });
    Ok(Outcome::NamespaceDeleted { memories })
}

/// The first cluster id applied wins; later proposals (a new leader racing) change nothing.
fn set_cluster_id(txn: &WriteTransaction, id: &[u8; 16]) -> Result<Outcome, StorageError> {
    let mut meta = txn.open_table(crate::storage::SM_META)?;
    if meta.get(crate::storage::META_CLUSTER_ID)?.is_none() {
        meta.insert(crate::storage::META_CLUSTER_ID, id.as_slice())?;
    }
    Ok(Outcome::None)
}
