//! redb tables of the state machine and the record codec.
//!
//! ```text
//! memories      namespace 0x00 id        -> codec::encode_memory (version byte + zstd(bincode))
//! namespaces    namespace                -> ROW_V1 | bincode(NamespaceInfo)
//! idempotency   key                      -> ROW_V1 | bincode(IdempotencyRecord)
//! idem_expiry   (recorded_at_ms, key)    -> ()        oldest first, for deterministic pruning
//! sm_meta       "applied" | "membership" -> bincode(LogId) | bincode(StoredMembership)
//!               "cluster_id"             -> 16 bytes, set once by the first leader or a restore
//! auth_keys     key id (16 hex)          -> ROW_V1 | bincode(KeyRecord)   hash of the secret, never the secret
//! auth_roles    role name                -> ROW_V1 | bincode(Role)
//! quotas        tenant | "*"             -> ROW_V1 | bincode(Quota)
//! ns_policy     namespace                -> JSON(MemoryPolicy)   absent: the default policy
//! ns_stats      namespace                -> JSON(NamespaceStats)
//! content_index (namespace, blake3(text), id)  -> ()   derived from memories (exact dedup)
//! expiry_index  (expires_at_ms, namespace, id) -> ()   derived (TTL purge, oldest first)
//! age_index     (namespace, created_at_ms, id) -> ()   derived (retention)
//! ledger        applied log index        -> entry hash | chain head (see `ledger`)
//! format        "format"                 -> u32   the file's format (see `format`)
//! ```
//!
//! The derived indexes are not in dumps: loading a dump (snapshot install, restore) and
//! opening a state machine that predates them rebuild them from `memories`. They are in the
//! digest, so a node whose indexes drifted would show it.
//!
//! The idempotency key is `principal 0x00 namespace 0x00 client key`: the first two never hold
//! 0x00, so keys of different principals or namespaces never meet.
//!
//! The Raft log lives in its own redb file (see `raft::log_store`), so log appends and
//! state-machine applies never wait on each other's write lock.

pub mod auth;
pub mod codec;
pub mod dump;
pub mod format;
pub mod index;
pub mod ledger;
mod reader;
pub mod space;
pub mod vault;

pub use reader::{Page, StateReader};

use redb::{Durability, TableDefinition, WriteTransaction};

use crate::error::StorageError;

pub const MEMORIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("memories");
pub const NAMESPACES: TableDefinition<&str, &[u8]> = TableDefinition::new("namespaces");
pub const IDEMPOTENCY: TableDefinition<&str, &[u8]> = TableDefinition::new("idempotency");
pub const IDEM_EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("idem_expiry");
pub const SM_META: TableDefinition<&str, &[u8]> = TableDefinition::new("sm_meta");
pub const AUTH_KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("auth_keys");
pub const AUTH_ROLES: TableDefinition<&str, &[u8]> = TableDefinition::new("auth_roles");
pub const QUOTAS: TableDefinition<&str, &[u8]> = TableDefinition::new("quotas");
/// The tables whose rows carry a version byte ([`codec::encode_row`]).
pub const VERSIONED_TABLES: [TableDefinition<&str, &[u8]>; 5] =
    [NAMESPACES, IDEMPOTENCY, AUTH_KEYS, AUTH_ROLES, QUOTAS];
/// The auth tables, as snapshots, backups and digests walk them.
pub const AUTH_TABLES: [(u8, TableDefinition<&str, &[u8]>); 3] = [(0, AUTH_KEYS), (1, AUTH_ROLES), (2, QUOTAS)];

pub const NS_POLICY: TableDefinition<&str, &[u8]> = TableDefinition::new("ns_policy");
pub const NS_STATS: TableDefinition<&str, &[u8]> = TableDefinition::new("ns_stats");
/// The memory-model tables, as snapshots, backups and digests walk them.
pub const MODEL_TABLES: [(u8, TableDefinition<&str, &[u8]>); 2] = [(0, NS_POLICY), (1, NS_STATS)];
pub const CONTENT_INDEX: TableDefinition<(&str, &[u8], &str), ()> = TableDefinition::new("content_index");
pub const EXPIRY_INDEX: TableDefinition<(u64, &str, &str), ()> = TableDefinition::new("expiry_index");
pub const AGE_INDEX: TableDefinition<(&str, u64, &str), ()> = TableDefinition::new("age_index");

pub const META_APPLIED: &str = "applied";
pub const META_MEMBERSHIP: &str = "membership";
pub const META_CLUSTER_ID: &str = "cluster_id";

/// The `memories` key of a memory: namespace, a 0x00 separator (never valid in a namespace),
/// then the id. Keys of one namespace are contiguous and sorted by id.
pub fn memory_key(namespace: &str, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(namespace.len() + 1 + id.len());
    k.extend_from_slice(namespace.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

/// The half-open key range `[ns 0x00, ns 0x01)` holding every memory of a namespace.
pub fn namespace_range(namespace: &str) -> (Vec<u8>, Vec<u8>) {
    let mut lo = namespace.as_bytes().to_vec();
    lo.push(0);
    let mut hi = namespace.as_bytes().to_vec();
    hi.push(1);
    (lo, hi)
}

/// A table that a state machine from before it was added may lack: `None` then.
pub fn optional_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &redb::ReadTransaction,
    def: TableDefinition<K, V>,
) -> Result<Option<redb::ReadOnlyTable<K, V>>, StorageError> {
    match txn.open_table(def) {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Flushes what `file` still buffers, then fsyncs it. tokio's `File::sync_all` alone does not
/// report an error of a write still in flight (it keeps it for the next write): a write that
/// met ENOSPC would leave a short file that syncs "successfully", and whoever read it next
/// would call it corrupt. The chaos harness's disk-full nemesis found exactly that on a
/// snapshot received on a full disk.
pub async fn flush_and_sync(file: &mut tokio::fs::File) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    file.flush().await?;
    file.sync_all().await
}

#[cfg(test)]
mod flush_tests {
    #[tokio::test]
    async fn a_write_that_failed_in_flight_is_reported_not_synced_over() {
        use tokio::io::AsyncWriteExt;
        let mut f = tokio::fs::OpenOptions::new().write(true).open("/dev/full").await.unwrap();
        // tokio hands the bytes to a blocking write and says yes at once.
        f.write_all(b"a snapshot chunk").await.unwrap();
        let e = super::flush_and_sync(&mut f).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::StorageFull, "{e}");
    }
}

/// Makes `txn` fsync at commit (`Durability::Immediate`), as everything that must survive a
/// crash before it is acknowledged requires.
pub fn set_durable(txn: &mut WriteTransaction, table: &'static str) -> Result<(), StorageError> {
    txn.set_durability(Durability::Immediate).map_err(|e| StorageError::Corrupt { table, reason: e.to_string() })
}
