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

use std::collections::BTreeMap;

use redb::{ReadableTable, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::apply_auth;
use super::apply_memory::{self, Ctx};
use super::types::{Command, CommandResult, Op, Outcome, Rejection};
use crate::auth::policy::Access;
use crate::auth::records::tenant_of;
use crate::error::StorageError;
use crate::memory::{IndexKind, MemoryInput, MemoryPolicy, Metric, NamespaceInfo, Precondition};
use crate::storage::vault::{DataKeyRow, Erasure, Vault, DATA_KEYS, ERASED};
use crate::storage::{codec, IDEMPOTENCY, IDEM_EXPIRY, NAMESPACES, QUOTAS};
use crate::vector::{VectorOp, VectorStore};

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

/// How `apply_command` treats a sealed op's new data key (see [`Op::Sealed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NewKey {
    /// Install it for the op (its entry runs in a transaction of its own, from a savepoint).
    Install,
    /// Do not: the op did not keep it, and runs again from the savepoint without it.
    Skip,
}

/// The namespace whose new data key `entry` would install, if any: such an entry is applied in
/// a transaction of its own (see `StateMachineStore::apply_batch`).
pub(crate) fn installs_key(cmd: &Command) -> Option<&str> {
    match &cmd.op {
        Op::Sealed { namespace, new_key: Some(_), .. } => Some(namespace),
        _ => None,
    }
}

/// Whether a sealed op's new data key stays: the op applied and left its namespace in place.
pub(crate) fn keeps_key(txn: &WriteTransaction, namespace: &str, result: &CommandResult) -> Result<bool, StorageError> {
    Ok(!matches!(result.outcome, Outcome::Rejected(_))
        && load_namespace(txn, namespace)?.is_some()
        && data_key(txn, namespace)?.is_some())
}

/// Applies `cmd` at log index `index`; every state change also pushes its [`VectorOp`].
pub(crate) fn apply_command(
    txn: &WriteTransaction,
    index: u64,
    cmd: &Command,
    ops: &mut Vec<VectorOp>,
    vectors: &VectorStore,
    vault: &Vault,
    new_key: NewKey,
) -> Result<CommandResult, StorageError> {
    let rejected = |r: Rejection| CommandResult { index, outcome: Outcome::Rejected(r) };
    // A sealed op applies as the op inside, for the same principal and idempotency key; a new
    // data key it carries is installed once the op is authorized (below).
    let opened;
    let mut install = None;
    let cmd = match &cmd.op {
        Op::Sealed { namespace, key, blob, new_key: carried } => {
            match unseal(txn, vault, namespace, key, blob, carried.as_ref())? {
                Ok(op) => {
                    if let (Some(row), NewKey::Install) = (carried, new_key) {
                        install = Some(row);
                    }
                    opened = Command {
                        principal: cmd.principal.clone(),
                        idempotency: cmd.idempotency.clone(),
                        now_ms: cmd.now_ms,
                        op,
                    };
                    &opened
                }
                Err(r) => return Ok(rejected(r)),
            }
        }
        _ => cmd,
    };
    let who = match apply_auth::authenticate(txn, cmd)? {
        Ok(who) => who,
        Err(r) => return Ok(rejected(r)),
    };
    let key = cmd.idempotency.as_ref().map(|i| scoped_key(&who.name, cmd.op.namespace().unwrap_or(""), &i.key));
    if let (Some(idem), Some(key)) = (&cmd.idempotency, &key) {
        let table = txn.open_table(IDEMPOTENCY)?;
        let seen = table.get(key.as_str())?.map(|v| codec::decode_row::<IdempotencyRecord>("idempotency", v.value()));
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
    if let Some(row) = install {
        if data_key(txn, &row.namespace)?.is_none() {
            install_key(txn, vault, row)?;
        }
    }
    let ctx = Ctx { index, now_ms: cmd.now_ms, vectors, vault };
    let outcome = run(txn, &ctx, cmd, &access, ops)?;
    let result = CommandResult { index, outcome };
    if let (Some(idem), Some(key)) = (&cmd.idempotency, &key) {
        let rec =
            IdempotencyRecord { recorded_at_ms: cmd.now_ms, fingerprint: idem.fingerprint, result: result.clone() };
        txn.open_table(IDEMPOTENCY)?.insert(key.as_str(), codec::encode_row(&rec).as_slice())?;
        txn.open_table(IDEM_EXPIRY)?.insert((cmd.now_ms, key.as_str()), ())?;
    }
    Ok(result)
}

fn run(
    txn: &WriteTransaction,
    ctx: &Ctx,
    cmd: &Command,
    access: &Access,
    ops: &mut Vec<VectorOp>,
) -> Result<Outcome, StorageError> {
    let missing = |namespace: &str| Outcome::Rejected(Rejection::NamespaceNotFound { namespace: namespace.into() });
    Ok(match &cmd.op {
        Op::CreateNamespace { namespace, dimension, metric, approx_min_vectors } => {
            create_namespace(txn, cmd.now_ms, namespace, (*dimension, *metric, *approx_min_vectors), None, ops)?
        }
        Op::DefineNamespace { namespace, dimension, metric, approx_min_vectors, policy } => {
            if let Err(e) = policy.validate(*metric) {
                return Ok(Outcome::Rejected(Rejection::Invalid { field: e.field, reason: e.reason }));
            }
            create_namespace(txn, cmd.now_ms, namespace, (*dimension, *metric, *approx_min_vectors), Some(policy), ops)?
        }
        Op::Put { namespace, items, approx_min_vectors } => {
            put(txn, ctx, Some(*approx_min_vectors), namespace, items, access, ops)?
        }
        Op::PutChecked { namespace, items, create, approx_min_vectors } => {
            put(txn, ctx, create.then_some(*approx_min_vectors), namespace, items, access, ops)?
        }
        Op::Delete { namespace, id, precondition } => match load_namespace(txn, namespace)? {
            None => missing(namespace),
            Some(mut info) => {
                let out = apply_memory::delete(txn, ctx, &mut info, id, *precondition, access, ops)?;
                if matches!(out, Outcome::Deleted { deleted: true }) {
                    reconsider_index(&mut info, ops);
                    store_namespace(txn, &info)?;
                }
                out
            }
        },
        Op::DeleteNamespace { namespace } => delete_namespace(txn, ctx, namespace, ops)?,
        Op::RewrapDataKeys { keys } => rewrap_data_keys(txn, ctx, keys)?,
        // Opened in `apply_command`; a sealed op inside a sealed op is refused by `unseal`.
        Op::Sealed { namespace, .. } => Outcome::Rejected(Rejection::Invalid {
            field: "op".into(),
            reason: format!("a sealed op for {namespace:?} inside a sealed op"),
        }),
        Op::SetClusterId { cluster_id } => set_cluster_id(txn, cluster_id)?,
        Op::SetPolicy { namespace, policy } => match load_namespace(txn, namespace)? {
            None => missing(namespace),
            Some(info) => apply_memory::set_policy(txn, &info, policy)?,
        },
        Op::Purge { items } => {
            let mut infos = BTreeMap::new();
            for (ns, _) in items {
                if !infos.contains_key(ns) {
                    if let Some(info) = load_namespace(txn, ns)? {
                        infos.insert(ns.clone(), info);
                    }
                }
            }
            let before = infos.clone();
            let out = apply_memory::purge(txn, ctx, items, &mut infos, ops)?;
            for (name, mut info) in infos {
                if before.get(&name) != Some(&info) {
                    reconsider_index(&mut info, ops);
                    store_namespace(txn, &info)?;
                }
            }
            out
        }
        Op::Retire { namespace, items, archived } => match load_namespace(txn, namespace)? {
            None => missing(namespace),
            Some(mut info) => {
                let out = apply_memory::retire(txn, ctx, &mut info, items, *archived, ops)?;
                reconsider_index(&mut info, ops);
                store_namespace(txn, &info)?;
                out
            }
        },
        Op::Consolidate { namespace, clusters, keep } => match load_namespace(txn, namespace)? {
            None => missing(namespace),
            Some(mut info) => {
                let out = apply_memory::consolidate(txn, ctx, &mut info, clusters, *keep, ops)?;
                reconsider_index(&mut info, ops);
                store_namespace(txn, &info)?;
                out
            }
        },
        Op::Reinforce { namespace, hits } => match load_namespace(txn, namespace)? {
            None => missing(namespace),
            Some(_) => apply_memory::reinforce(txn, ctx, namespace, hits)?,
        },
        Op::Mark { .. } => Outcome::None,
        Op::RestoreNamespace { namespace, memories, .. } | Op::RestoreMemories { namespace, memories }
            if erased_since(txn, namespace, memories)?.is_some() =>
        {
            Outcome::Rejected(erased_since(txn, namespace, memories)?.expect("checked in the guard"))
        }
        Op::RestoreNamespace { namespace, dimension, metric, approx_min_vectors, policy, memories } => {
            let shape = (*dimension, *metric, *approx_min_vectors);
            restore_namespace(txn, ctx, namespace, shape, policy.as_ref(), memories, ops)?
        }
        Op::RestoreMemories { namespace, memories } => match load_namespace(txn, namespace)? {
            None => missing(namespace),
            Some(mut info) => match check_restored(namespace, info.dimension, info.metric, memories) {
                Some(r) => Outcome::Rejected(r),
                None => match apply_memory::restore_some(txn, ctx, &mut info, memories, ops)? {
                    Err(r) => Outcome::Rejected(r),
                    Ok(replaced) => {
                        reconsider_index(&mut info, ops);
                        store_namespace(txn, &info)?;
                        Outcome::NamespaceRestored { restored: memories.len() as u64, replaced }
                    }
                },
            },
        },
        other => apply_auth::apply_admin(txn, cmd.now_ms, other)?,
    })
}

/// Records what `cmd` may have changed, for catching vector index files up with the log:
/// every memory it names, and every namespace it may have dropped. (Creating a namespace needs
/// no entry: one missing from the index files is rebuilt anyway.)
pub(crate) fn touched(cmd: &Command, changes: &mut crate::vector::Changes, vault: &Vault) {
    touched_op(&cmd.op, changes, vault)
}

fn touched_op(op: &Op, changes: &mut crate::vector::Changes, vault: &Vault) {
    match op {
        // Opened with the key this node holds; one it cannot open counts as the whole
        // namespace (rebuilt from the state).
        Op::Sealed { namespace, key, blob, new_key } => {
            let dek = match new_key {
                Some(row) => vault.open_key(row).ok(),
                None => vault.by_id(key),
            };
            let inner = dek
                .and_then(|k| k.open(&crate::storage::vault::command_aad(namespace), blob).ok())
                .and_then(|plain| codec::decode_exact::<Op>(&plain).ok())
                .filter(|op| op.namespace() == Some(namespace.as_str()) && op.carries_content());
            match inner {
                Some(op) => touched_op(&op, changes, vault),
                None => {
                    changes.namespaces.insert(namespace.clone());
                }
            }
        }
        Op::RewrapDataKeys { .. } => {}
        Op::Put { namespace, items, .. } | Op::PutChecked { namespace, items, .. } => {
            changes.memories.extend(items.iter().map(|(m, _)| (namespace.clone(), m.id.clone())));
            changes.puts.insert(namespace.clone());
        }
        Op::SetPolicy { namespace, .. } | Op::DefineNamespace { namespace, .. } => {
            changes.policies.insert(namespace.clone());
        }
        Op::Delete { namespace, id, .. } => {
            changes.memories.insert((namespace.clone(), id.clone()));
        }
        Op::DeleteNamespace { namespace } => {
            changes.namespaces.insert(namespace.clone());
        }
        Op::Purge { items } => changes.memories.extend(items.iter().cloned()),
        Op::Retire { namespace, items, .. } => {
            changes.memories.extend(items.iter().map(|(id, _)| (namespace.clone(), id.clone())));
        }
        Op::Consolidate { namespace, clusters, .. } => {
            for c in clusters {
                for (id, _) in std::iter::once(&c.keep).chain(&c.absorb) {
                    changes.memories.insert((namespace.clone(), id.clone()));
                }
            }
        }
        Op::CreateNamespace { .. }
        | Op::Reinforce { .. }
        | Op::SetClusterId { .. }
        | Op::CreateKey { .. }
        | Op::BootstrapRootKey { .. }
        | Op::RevokeKey { .. }
        | Op::CreateRole { .. }
        | Op::DeleteRole { .. }
        | Op::GrantRole { .. }
        | Op::RevokeGrant { .. }
        | Op::SetQuota { .. }
        | Op::Mark { .. } => {}
        Op::RestoreNamespace { namespace, .. } => {
            changes.namespaces.insert(namespace.clone());
        }
        Op::RestoreMemories { namespace, memories } => {
            changes.memories.extend(memories.iter().map(|m| (namespace.clone(), m.id.clone())));
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
    v.map(|v| codec::decode_row("namespaces", v.value())).transpose()
}

fn store_namespace(txn: &WriteTransaction, info: &NamespaceInfo) -> Result<(), StorageError> {
    txn.open_table(NAMESPACES)?.insert(info.name.as_str(), codec::encode_row(info).as_slice())?;
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
    (dimension, metric, approx_min_vectors): (u32, Metric, u64),
    policy: Option<&MemoryPolicy>,
    ops: &mut Vec<VectorOp>,
) -> Result<Outcome, StorageError> {
    if let Some(info) = load_namespace(txn, namespace)? {
        if info.dimension == dimension && info.metric == metric {
            if let Some(p) = policy {
                if &crate::storage::index::policy(&txn.open_table(crate::storage::NS_POLICY)?, namespace)? != p {
                    return Ok(Outcome::Rejected(Rejection::PolicyDiffers { namespace: namespace.into() }));
                }
            }
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
        approx_min_vectors,
        bytes: 0,
    };
    store_namespace(txn, &info)?;
    if let Some(p) = policy {
        crate::storage::index::put_policy(txn, namespace, p)?;
    }
    ops.push(VectorOp::Namespace { namespace: namespace.into(), dimension, metric });
    Ok(Outcome::NamespaceCreated(info))
}

fn put(
    txn: &WriteTransaction,
    ctx: &Ctx,
    create: Option<u64>,
    namespace: &str,
    items: &[(MemoryInput, Precondition)],
    access: &Access,
    ops: &mut Vec<VectorOp>,
) -> Result<Outcome, StorageError> {
    let existing_ns = load_namespace(txn, namespace)?;
    let approx_min_vectors = match (&existing_ns, create) {
        (Some(info), _) => info.approx_min_vectors,
        (None, Some(ivf)) => ivf,
        (None, None) => return Ok(Outcome::Rejected(Rejection::NamespaceNotFound { namespace: namespace.into() })),
    };
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
        created_at_ms: ctx.now_ms,
        index: IndexKind::Flat,
        approx_min_vectors,
        bytes: 0,
    });
    let results = match apply_memory::put(txn, ctx, &mut info, items, access, ops)? {
        Ok(results) => results,
        Err(r) => return Ok(Outcome::Rejected(r)),
    };
    reconsider_index(&mut info, ops);
    store_namespace(txn, &info)?;
    Ok(Outcome::Stored(results))
}

/// Moves the namespace to the index kind its new size calls for, and tells the vector view.
fn reconsider_index(info: &mut NamespaceInfo, ops: &mut Vec<VectorOp>) {
    let next = info.index.next(info.memory_count, info.approx_min_vectors);
    if next != info.index {
        info.index = next;
        ops.push(VectorOp::Rebuild { namespace: info.name.clone(), kind: next });
    }
}

/// Deletes a namespace and destroys its data key (crypto-shredding): every sealed copy of its
/// content anywhere becomes undecryptable. The erasure is remembered by key id, with no key
/// material, so restores can report what they leave out.
fn delete_namespace(
    txn: &WriteTransaction,
    ctx: &Ctx,
    namespace: &str,
    ops: &mut Vec<VectorOp>,
) -> Result<Outcome, StorageError> {
    if load_namespace(txn, namespace)?.is_none() {
        return Ok(Outcome::Rejected(Rejection::NamespaceNotFound { namespace: namespace.into() }));
    }
    let memories = apply_memory::drop_namespace(txn, ctx, namespace)?;
    // A data key exists only beside its namespace (see `keeps_key`).
    let key = txn.open_table(DATA_KEYS)?.remove(namespace)?.map(|v| v.value().to_vec());
    if let Some(row) = key {
        let row: DataKeyRow = codec::decode_row("data_keys", &row)?;
        let erasure =
            Erasure { namespace: namespace.into(), id: row.id, index: ctx.index, at_ms: ctx.now_ms, memories };
        txn.open_table(ERASED)?.insert(hex::encode(row.id).as_str(), codec::encode_row(&erasure).as_slice())?;
        ctx.vault.remove(namespace);
        metrics::counter!("engram_data_keys_destroyed_total").increment(1);
    }
    txn.open_table(NAMESPACES)?.remove(namespace)?;
    ops.push(VectorOp::DropNamespace { namespace: namespace.into() });
    Ok(Outcome::NamespaceDeleted { memories })
}

/// A restored row written before its namespace was erased: an erased namespace never comes
/// back from an older backup, sealed or plain, whatever key the restore was opened with. Its
/// revision is the index that wrote it; a row of a namespace re-created after the erasure was
/// written after it.
fn erased_since(
    txn: &WriteTransaction,
    namespace: &str,
    memories: &[crate::memory::Memory],
) -> Result<Option<Rejection>, StorageError> {
    let erasures = crate::storage::vault::erasures(&txn.open_table(ERASED)?)?;
    let Some(at) = erasures.iter().filter(|e| e.namespace == namespace).map(|e| e.index).max() else {
        return Ok(None);
    };
    Ok(memories.iter().find(|m| m.revision < at).map(|m| Rejection::Invalid {
        field: "memories".into(),
        reason: format!(
            "erased: memory {:?} was written at log index {}, before namespace {namespace:?} was erased at index {at}; an erased namespace does not come back",
            m.id, m.revision
        ),
    }))
}

/// Whether `namespace` has a data key.
pub(crate) fn has_data_key(txn: &WriteTransaction, namespace: &str) -> Result<bool, StorageError> {
    Ok(data_key(txn, namespace)?.is_some())
}

/// A namespace's current data key row.
fn data_key(txn: &WriteTransaction, namespace: &str) -> Result<Option<DataKeyRow>, StorageError> {
    let t = txn.open_table(DATA_KEYS)?;
    let v = t.get(namespace)?;
    v.map(|v| codec::decode_row("data_keys", v.value())).transpose()
}

/// Opens a sealed op: under the namespace's current key (or the new key it carries), bound to
/// the namespace, a content op of that namespace. A key destroyed since the leader sealed it
/// is a refusal, not an error.
fn unseal(
    txn: &WriteTransaction,
    vault: &Vault,
    namespace: &str,
    key: &[u8; 8],
    blob: &[u8],
    new_key: Option<&DataKeyRow>,
) -> Result<Result<Op, Rejection>, StorageError> {
    let invalid = |reason: String| Ok(Err(Rejection::Invalid { field: "op".into(), reason }));
    let dek = match new_key {
        Some(row) => {
            if row.namespace != namespace || row.id != *key {
                return invalid(format!("a new data key for {:?} seals a write to {namespace:?}", row.namespace));
            }
            // A destroyed key never comes back (a replayed proposal).
            if txn.open_table(ERASED)?.get(hex::encode(row.id).as_str())?.is_some() {
                return invalid(format!("data key {} was destroyed", hex::encode(row.id)));
            }
            // New keys are wrapped under the cluster's master key of record (the latest
            // rotation's), whatever a node's own key file says: every node decides alike.
            if let Some(kek) = crate::storage::vault::cluster_kek(txn)? {
                if row.kek != kek {
                    return invalid(format!(
                        "a new data key wrapped under master key {}, not the cluster's {} (a leader whose key file is behind a rotation)",
                        hex::encode(row.kek),
                        hex::encode(kek)
                    ));
                }
            }
            // Every node must open a key the leader made: one that cannot has another master key.
            vault.open_key(row).map_err(|e| StorageError::Corrupt { table: "data_keys", reason: e.to_string() })?
        }
        None => {
            match data_key(txn, namespace)? {
                Some(row) if row.id == *key => {}
                _ => return Ok(Err(Rejection::DataKeyGone { namespace: namespace.into() })),
            }
            // In the state, so every node holds it; one that cannot open it has a wrong master key.
            vault.by_id(key).ok_or_else(|| StorageError::Corrupt {
                table: "data_keys",
                reason: format!(
                    "data key {} of namespace {namespace:?} is in the state but this node cannot open it",
                    hex::encode(key)
                ),
            })?
        }
    };
    let Ok(plain) = dek.open(&crate::storage::vault::command_aad(namespace), blob) else {
        return invalid("a sealed op failed authentication".into());
    };
    let op: Op = match codec::decode_exact(&plain) {
        Ok(op) => op,
        Err(e) => return invalid(format!("a sealed op does not decode: {e}")),
    };
    if op.namespace() != Some(namespace) || !op.carries_content() {
        return invalid(format!("a sealed {} is not a content op of {namespace:?}", op.name()));
    }
    Ok(Ok(op))
}

/// Makes `key` the namespace's data key (it has none) and seals the plain rows it holds.
fn install_key(txn: &WriteTransaction, vault: &Vault, key: &DataKeyRow) -> Result<(), StorageError> {
    txn.open_table(DATA_KEYS)?.insert(key.namespace.as_str(), codec::encode_row(key).as_slice())?;
    if crate::storage::vault::cluster_kek(txn)?.is_none() {
        crate::storage::vault::set_cluster_kek(txn, &key.kek, vault)?;
    }
    vault.insert(key).map_err(|e| StorageError::Corrupt { table: "data_keys", reason: e.to_string() })?;
    let sealed = crate::storage::index::MemoryTables::open(txn, vault)?.reseal_namespace(&key.namespace)?;
    if sealed > 0 {
        tracing::info!(namespace = %key.namespace, memories = sealed, "sealed a namespace's plain memories");
    }
    metrics::counter!("engram_data_keys_created_total").increment(1);
    Ok(())
}

/// [`Op::RewrapDataKeys`]: each row replaces the namespace's if it wraps the same key; the
/// rows' master key becomes the cluster's of record. Each node reads its key file again (the
/// operator put the new key there before rotating).
fn rewrap_data_keys(txn: &WriteTransaction, ctx: &Ctx, keys: &[DataKeyRow]) -> Result<Outcome, StorageError> {
    let Some(kek) = keys.first().map(|k| k.kek) else {
        return Ok(Outcome::DataKeysRewrapped { rewrapped: 0 });
    };
    if let Some(bad) = keys.iter().find(|k| k.kek != kek || !crate::storage::vault::well_formed(k)) {
        return Ok(Outcome::Rejected(Rejection::Invalid {
            field: "keys".into(),
            reason: format!(
                "data key {} of {:?} is not a wrapped key under {}",
                hex::encode(bad.id),
                bad.namespace,
                hex::encode(kek)
            ),
        }));
    }
    ctx.vault.reload();
    let mut rewrapped = 0;
    for row in keys {
        if data_key(txn, &row.namespace)?.is_some_and(|current| current.id == row.id) {
            txn.open_table(DATA_KEYS)?.insert(row.namespace.as_str(), codec::encode_row(row).as_slice())?;
            rewrapped += 1;
            // The data key itself is unchanged and held already; a node whose key file lacks
            // the new master key would not restart, so it says so now.
            if let Err(e) = ctx.vault.opens(row) {
                metrics::counter!("engram_at_rest_rewrap_unopenable_total").increment(1);
                tracing::error!(error = %e, "a rewrapped data key does not open with this node's at-rest keyring; add the new master key to its key file before it restarts");
            }
        }
    }
    crate::storage::vault::set_cluster_kek(txn, &kek, ctx.vault)?;
    Ok(Outcome::DataKeysRewrapped { rewrapped })
}

/// The checks every restored row must pass, by constants only (every replica decides alike):
/// the namespace, each row's namespace, id (once), text, tags, importance, vector and content
/// hash. `None`: all pass.
fn check_restored(
    namespace: &str,
    dimension: u32,
    metric: Metric,
    memories: &[crate::memory::Memory],
) -> Option<Rejection> {
    let invalid = |field: String, reason: String| Some(Rejection::Invalid { field, reason });
    use crate::memory::{validate_id, validate_namespace, Limits};
    if let Err(e) = validate_namespace(namespace) {
        return invalid("namespace".into(), e.to_string());
    }
    // A constant, not this node's configured limit: every replica must decide alike.
    if dimension == 0 || dimension as usize > Limits::default().max_dimension {
        return invalid("dimension".into(), format!("{dimension} is out of range"));
    }
    let mut ids = std::collections::BTreeSet::new();
    for (i, m) in memories.iter().enumerate() {
        let field = |f: &str| format!("memories[{i}].{f}");
        if m.namespace != namespace {
            return invalid(field("namespace"), format!("`{}` is not the namespace being restored", m.namespace));
        }
        if let Err(e) = validate_id(&field("id"), &m.id) {
            return invalid(field("id"), e.to_string());
        }
        // What a put must satisfy (text, tags, importance, a finite vector of the namespace's
        // dimension), by the default limits: constants, so every replica decides alike.
        let input = MemoryInput {
            id: m.id.clone(),
            text: m.text.clone(),
            embedding: m.embedding.clone(),
            tags: m.tags.clone(),
            importance: m.importance,
            expires_at_ms: m.expires_at_ms,
        };
        if let Err(e) =
            crate::memory::validate_input(&format!("memories[{i}]"), &input, Some(dimension), &Limits::default())
        {
            return match e {
                crate::error::ApiError::InvalidArgument { field, reason } => invalid(field, reason),
                other => invalid(field("memory"), other.to_string()),
            };
        }
        if !ids.insert(m.id.as_str()) {
            return invalid(field("id"), format!("`{}` appears twice", m.id));
        }
        if metric == Metric::Cosine && m.embedding.iter().all(|x| *x == 0.0) {
            return invalid(field("embedding"), "a zero vector has no direction (cosine namespace)".into());
        }
        if m.content_hash != crate::memory::content_hash(&m.text) {
            return invalid(field("content_hash"), "does not match the text".into());
        }
    }
    None
}

/// [`Op::RestoreNamespace`]: checks everything first (a refusal changes nothing), then drops
/// the namespace's memories and writes the restored ones.
fn restore_namespace(
    txn: &WriteTransaction,
    ctx: &Ctx,
    namespace: &str,
    (dimension, metric, approx_min_vectors): (u32, Metric, u64),
    policy: Option<&crate::memory::MemoryPolicy>,
    memories: &[crate::memory::Memory],
    ops: &mut Vec<VectorOp>,
) -> Result<Outcome, StorageError> {
    if let Some(Err(e)) = policy.map(|p| p.validate(metric)) {
        return Ok(Outcome::Rejected(Rejection::Invalid { field: e.field, reason: e.reason }));
    }
    if let Some(r) = check_restored(namespace, dimension, metric, memories) {
        return Ok(Outcome::Rejected(r));
    }
    let existing = load_namespace(txn, namespace)?;
    if let Some(info) = &existing {
        if (info.dimension, info.metric) != (dimension, metric) {
            return Ok(Outcome::Rejected(Rejection::NamespaceExists {
                namespace: namespace.into(),
                dimension: info.dimension,
                metric: info.metric,
            }));
        }
    } else if let Some(r) = namespace_quota(txn, namespace)? {
        return Ok(Outcome::Rejected(r));
    }
    let mut info = NamespaceInfo {
        name: namespace.into(),
        dimension,
        metric,
        memory_count: 0,
        created_at_ms: existing.as_ref().map_or(ctx.now_ms, |i| i.created_at_ms),
        index: IndexKind::Flat,
        approx_min_vectors: existing.as_ref().map_or(approx_min_vectors, |i| i.approx_min_vectors),
        bytes: 0,
    };
    if let Some(r) = apply_memory::restore_quota(txn, &info, memories)? {
        return Ok(Outcome::Rejected(r));
    }
    let replaced = match &existing {
        Some(_) => {
            let n = apply_memory::drop_namespace(txn, ctx, namespace)?;
            ops.push(VectorOp::DropNamespace { namespace: namespace.into() });
            n
        }
        None => 0,
    };
    ops.push(VectorOp::Namespace { namespace: namespace.into(), dimension, metric });
    if let Some(p) = policy {
        crate::storage::index::put_policy(txn, namespace, p)?;
    }
    apply_memory::restore(txn, ctx, &mut info, memories, ops)?;
    reconsider_index(&mut info, ops);
    store_namespace(txn, &info)?;
    Ok(Outcome::NamespaceRestored { restored: info.memory_count, replaced })
}

/// The first cluster id applied wins; later proposals (a new leader racing) change nothing.
fn set_cluster_id(txn: &WriteTransaction, id: &[u8; 16]) -> Result<Outcome, StorageError> {
    let mut meta = txn.open_table(crate::storage::SM_META)?;
    if meta.get(crate::storage::META_CLUSTER_ID)?.is_none() {
        meta.insert(crate::storage::META_CLUSTER_ID, id.as_slice())?;
    }
    Ok(Outcome::None)
}
