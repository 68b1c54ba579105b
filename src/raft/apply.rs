//! Applying one [`Command`] inside a state-machine write transaction.
//!
//! Pure function of (current state, log index, command): no clock, no randomness, so every
//! node reaches byte-identical state. A command that cannot apply (a failed precondition, a
//! dimension mismatch, a denied principal, a quota) becomes [`Outcome::Rejected`] and leaves
//! the state unchanged.
//!
//! Order: authenticate the principal at the entry's time → look up the idempotency key in the
//! principal's and namespace's scope → authorize the op (`apply_auth`) → apply → remember the
//! result under the key. Authentication and authorization refusals are not remembered: they
//! say nothing about the write, only about who asked.

use std::collections::HashMap;

use redb::{ReadableTable, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::apply_auth;
use super::types::{Command, CommandResult, Op, Outcome, PutResult, Rejection};
use crate::auth::policy::Access;
use crate::auth::records::tenant_of;
use crate::error::StorageError;
use crate::memory::{content_hash, IndexKind, Memory, MemoryInput, Metric, NamespaceInfo, Precondition};
use crate::storage::{codec, memory_key, namespace_range, IDEMPOTENCY, IDEM_EXPIRY, MEMORIES, NAMESPACES, QUOTAS};
use crate::vector::VectorOp;

/// How long an idempotency key is remembered, measured on the leaders' clocks as written in
/// the log (never the applying node's clock).
pub const IDEMPOTENCY_TTL_MS: u64 = 24 * 60 * 60 * 1000;

#[derive(Debug, Serialize, Deserialize)]
struct IdempotencyRecord {
    recorded_at_ms: u64,
    fingerprint: [u8; 32],
    result: CommandResult,
}

/// The idempotency table's key: principal, namespace, client key (see `storage`).
fn scoped_key(principal: &str, namespace: &str, key: &str) -> String {
    format!("{principal}\0{namespace}\0{key}")
}

/// Applies `cmd` at log index `index`; every state change also pushes its [`VectorOp`].
pub(crate) fn apply_command(
    txn: &WriteTransaction,
    index: u64,
    cmd: &Command,
    ops: &mut Vec<VectorOp>,
) -> Result<CommandResult, StorageError> {
    let rejected = |r: Rejection| CommandResult { index, outcome: Outcome::Rejected(r) };
    let who = match apply_auth::authenticate(txn, cmd)? {
        Ok(who) => who,
        Err(r) => return Ok(rejected(r)),
    };
    let key = cmd.idempotency.as_ref().map(|i| scoped_key(&who.name, cmd.op.namespace().unwrap_or(""), &i.key));
    if let (Some(idem), Some(key)) = (&cmd.idempotency, &key) {
        let table = txn.open_table(IDEMPOTENCY)?;
        let seen = table.get(key.as_str())?.map(|v| codec::decode::<IdempotencyRecord>("idempotency", v.value()));
        if let Some(rec) = seen {
            let rec = rec?;
            if rec.fingerprint != idem.fingerprint {
                return Ok(rejected(Rejection::IdempotencyKeyReused));
            }
            metrics::counter!("engram_idempotent_replays_total").increment(1);
            return Ok(rec.result);
        }
    }
    prune_idempotency(txn, cmd.now_ms)?;
    let access = match apply_auth::authorize(&who, &cmd.op) {
        Ok(access) => access,
        Err(r) => return Ok(rejected(r)),
    };
    let outcome = run(txn, index, cmd, &access, ops)?;
    let result = CommandResult { index, outcome };
    if let (Some(idem), Some(key)) = (&cmd.idempotency, &key) {
        let rec =
            IdempotencyRecord { recorded_at_ms: cmd.now_ms, fingerprint: idem.fingerprint, result: result.clone() };
        txn.open_table(IDEMPOTENCY)?.insert(key.as_str(), codec::encode(&rec).as_slice())?;
        txn.open_table(IDEM_EXPIRY)?.insert((cmd.now_ms, key.as_str()), ())?;
    }
    Ok(result)
}

fn run(
    txn: &WriteTransaction,
    index: u64,
    cmd: &Command,
    access: &Access,
    ops: &mut Vec<VectorOp>,
) -> Result<Outcome, StorageError> {
    Ok(match &cmd.op {
        Op::CreateNamespace { namespace, dimension, metric, ivf_min_vectors } => {
            create_namespace(txn, cmd.now_ms, namespace, (*dimension, *metric, *ivf_min_vectors), ops)?
        }
        Op::Put { namespace, items, ivf_min_vectors } => {
            put(txn, (index, cmd.now_ms, *ivf_min_vectors), namespace, items, access, ops)?
        }
        Op::Delete { namespace, id, precondition } => delete(txn, namespace, id, *precondition, access, ops)?,
        Op::DeleteNamespace { namespace } => delete_namespace(txn, namespace, ops)?,
        Op::SetClusterId { cluster_id } => set_cluster_id(txn, cluster_id)?,
        other => apply_auth::apply_admin(txn, cmd.now_ms, other)?,
    })
}

/// Records what `cmd` may have changed, for catching vector index files up with the log:
/// every memory it names, and every namespace it may have dropped. (Creating a namespace needs
/// no entry: one missing from the index files is rebuilt anyway.)
pub(crate) fn touched(cmd: &Command, changes: &mut crate::vector::Changes) {
    match &cmd.op {
        Op::Put { namespace, items, .. } => {
            changes.memories.extend(items.iter().map(|(m, _)| (namespace.clone(), m.id.clone())));
        }
        Op::Delete { namespace, id, .. } => {
            changes.memories.insert((namespace.clone(), id.clone()));
        }
        Op::DeleteNamespace { namespace } => {
            changes.namespaces.insert(namespace.clone());
        }
        Op::CreateNamespace { .. }
        | Op::SetClusterId { .. }
        | Op::CreateKey { .. }
        | Op::BootstrapRootKey { .. }
        | Op::RevokeKey { .. }
        | Op::CreateRole { .. }
        | Op::DeleteRole { .. }
        | Op::GrantRole { .. }
        | Op::RevokeGrant { .. }
        | Op::SetQuota { .. } => {}
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

/// Refuses a new namespace past its tenant's `max_namespaces`.
fn namespace_quota(txn: &WriteTransaction, namespace: &str) -> Result<Option<Rejection>, StorageError> {
    let tenant = tenant_of(namespace);
    let quota = crate::storage::auth::quota(&txn.open_table(QUOTAS)?, tenant)?;
    let Some(max) = quota.max_namespaces else { return Ok(None) };
    let table = txn.open_table(NAMESPACES)?;
    // The tenant's namespaces: `tenant` itself and the names in ["tenant/", "tenant0").
    let (lo, hi) = (format!("{tenant}/"), format!("{tenant}0"));
    let mut count = table.get(tenant)?.is_some() as u64;
    for item in table.range::<&str>(lo.as_str()..hi.as_str())? {
        item?;
        count += 1;
    }
    Ok((count >= max).then(|| Rejection::QuotaExceeded {
        field: "namespace".into(),
        reason: format!("tenant {tenant:?} already has {count} of its {max} namespaces"),
    }))
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
    if let Some(r) = namespace_quota(txn, namespace)? {
        return Ok(Outcome::Rejected(r));
    }
    let info = NamespaceInfo {
        name: namespace.into(),
        dimension,
        metric,
        memory_count: 0,
        created_at_ms: now_ms,
        index: IndexKind::Flat,
        ivf_min_vectors,
        bytes: 0,
    };
    store_namespace(txn, &info)?;
    ops.push(VectorOp::Namespace { namespace: namespace.into(), dimension, metric });
    Ok(Outcome::NamespaceCreated(info))
}

/// Every check of a put against the state before it: dimensions, scope, guards, quotas.
/// Returns the memories the items replace, or the refusal.
fn check_put(
    txn: &WriteTransaction,
    namespace: &str,
    items: &[(MemoryInput, Precondition)],
    access: &Access,
    info: &NamespaceInfo,
) -> Result<Result<Vec<Option<Memory>>, Rejection>, StorageError> {
    for (i, (m, _)) in items.iter().enumerate() {
        if m.embedding.len() as u32 != info.dimension {
            return Ok(Err(Rejection::DimensionMismatch {
                field: format!("items[{i}].memory.embedding"),
                expected: info.dimension,
                got: m.embedding.len() as u32,
            }));
        }
        if !access.covers(&m.tags) {
            return Ok(Err(Rejection::PermissionDenied {
                field: format!("items[{i}].memory.tags"),
                reason: "the key may only write memories carrying its scope's tag".into(),
            }));
        }
    }
    let table = txn.open_table(MEMORIES)?;
    let mut previous = Vec::with_capacity(items.len());
    let (mut count, mut bytes) = (info.memory_count, info.bytes);
    for (i, (m, pre)) in items.iter().enumerate() {
        let cur = table.get(memory_key(namespace, &m.id).as_slice())?;
        let cur = cur.map(|v| codec::decode_memory(v.value())).transpose()?;
        if cur.as_ref().is_some_and(|c| !access.covers(&c.tags)) {
            return Ok(Err(Rejection::PermissionDenied {
                field: format!("items[{i}].memory.id"),
                reason: "the id belongs to a memory outside the key's scope".into(),
            }));
        }
        let current_revision = cur.as_ref().map(|c| c.revision);
        if !pre.holds(current_revision) {
            return Ok(Err(Rejection::PreconditionFailed {
                field: format!("items[{i}].precondition"),
                id: m.id.clone(),
                current_revision,
            }));
        }
        match &cur {
            Some(c) => bytes = bytes.saturating_sub(c.stored_bytes()) + m.stored_bytes(),
            None => {
                count += 1;
                bytes += m.stored_bytes();
            }
        }
        previous.push(cur);
    }
    let quota = crate::storage::auth::quota(&txn.open_table(QUOTAS)?, tenant_of(namespace))?;
    let over = |max: Option<u64>, now: u64, before: u64| max.is_some_and(|m| now > m && now > before);
    if over(quota.max_memories_per_namespace, count, info.memory_count) {
        return Ok(Err(Rejection::QuotaExceeded {
            field: "items".into(),
            reason: format!(
                "namespace would hold {count} memories; its tenant's limit is {}",
                quota.max_memories_per_namespace.unwrap_or(0)
            ),
        }));
    }
    if over(quota.max_bytes_per_namespace, bytes, info.bytes) {
        return Ok(Err(Rejection::QuotaExceeded {
            field: "items".into(),
            reason: format!(
                "namespace would hold {bytes} bytes; its tenant's limit is {}",
                quota.max_bytes_per_namespace.unwrap_or(0)
            ),
        }));
    }
    Ok(Ok(previous))
}

fn put(
    txn: &WriteTransaction,
    (index, now_ms, ivf_min_vectors): (u64, u64, u64),
    namespace: &str,
    items: &[(MemoryInput, Precondition)],
    access: &Access,
    ops: &mut Vec<VectorOp>,
) -> Result<Outcome, StorageError> {
    let existing_ns = load_namespace(txn, namespace)?;
    if existing_ns.is_none() {
        if let Some(r) = namespace_quota(txn, namespace)? {
            return Ok(Outcome::Rejected(r));
        }
    }
    let first_dim = items.first().map(|(m, _)| m.embedding.len() as u32).unwrap_or(0);
    let mut info = existing_ns.unwrap_or_else(|| NamespaceInfo {
        name: namespace.into(),
        dimension: first_dim,
        metric: Metric::Cosine,
        memory_count: 0,
        created_at_ms: now_ms,
        index: IndexKind::Flat,
        ivf_min_vectors,
        bytes: 0,
    });
    // Every guard is checked against the state before the batch, then everything applies.
    let previous = match check_put(txn, namespace, items, access, &info)? {
        Ok(previous) => previous,
        Err(r) => return Ok(Outcome::Rejected(r)),
    };
    let mut table = txn.open_table(MEMORIES)?;
    let mut results = Vec::with_capacity(items.len());
    // Bytes of what this batch wrote, by id: a batch naming one id twice replaces its own.
    let mut written: HashMap<&str, u64> = HashMap::new();
    for ((m, _), prev) in items.iter().zip(previous) {
        let created_at_ms = prev.as_ref().map(|p| p.created_at_ms).unwrap_or(now_ms);
        let record = Memory {
            namespace: namespace.into(),
            id: m.id.clone(),
            text: m.text.clone(),
            embedding: m.embedding.clone(),
            tags: m.tags.clone(),
            importance: m.importance,
            created_at_ms,
            updated_at_ms: now_ms,
            last_accessed_at_ms: now_ms,
            expires_at_ms: m.expires_at_ms,
            content_hash: content_hash(&m.text),
            revision: index,
        };
        let key = memory_key(namespace, &m.id);
        // Whether the insert replaced something (not `prev`): a batch naming one id twice
        // counts it once. What it replaced weighs what this batch wrote there, else `prev`.
        let replaced = table.insert(key.as_slice(), codec::encode_memory(&record).as_slice())?.is_some();
        if replaced {
            let old = written.get(m.id.as_str()).copied().or(prev.as_ref().map(Memory::stored_bytes)).unwrap_or(0);
            info.bytes = info.bytes.saturating_sub(old) + record.stored_bytes();
        } else {
            info.memory_count += 1;
            info.bytes += record.stored_bytes();
        }
        written.insert(&m.id, record.stored_bytes());
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
    access: &Access,
    ops: &mut Vec<VectorOp>,
) -> Result<Outcome, StorageError> {
    let Some(mut info) = load_namespace(txn, namespace)? else {
        return Ok(Outcome::Rejected(Rejection::NamespaceNotFound { namespace: namespace.into() }));
    };
    let mut table = txn.open_table(MEMORIES)?;
    let key = memory_key(namespace, id);
    let current = match table.get(key.as_slice())? {
        Some(v) => Some(codec::decode_memory(v.value())?),
        None => None,
    };
    // A memory outside the caller's scope is, to the caller, not there.
    let current = current.filter(|m| access.covers(&m.tags));
    let current_revision = current.as_ref().map(|m| m.revision);
    if !pre.holds(current_revision) {
        return Ok(Outcome::Rejected(Rejection::PreconditionFailed {
            field: "precondition".into(),
            id: id.into(),
            current_revision,
        }));
    }
    let Some(removed) = current else {
        return Ok(Outcome::Deleted { deleted: false });
    };
    table.remove(key.as_slice())?;
    drop(table);
    info.memory_count -= 1;
    info.bytes = info.bytes.saturating_sub(removed.stored_bytes());
    ops.push(VectorOp::Remove { namespace: namespace.into(), id: id.into() });
    reconsider_index(&mut info, ops);
    store_namespace(txn, &info)?;
    Ok(Outcome::Deleted { deleted: true })
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
