//! Read-only access to the state machine through redb read transactions (MVCC): reads never
//! block applies, and one read transaction is one consistent cut.

use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable};

use super::{codec, memory_key, namespace_range, MEMORIES, META_APPLIED, NAMESPACES, SM_META};
use crate::error::StorageError;
use crate::memory::{Memory, NamespaceInfo};

#[derive(Clone)]
pub struct StateReader {
    db: Arc<Database>,
    vault: Arc<super::vault::Vault>,
}

/// A page of memories plus the id to resume after.
pub struct Page {
    pub memories: Vec<Memory>,
    pub next_after: Option<String>,
    pub applied_index: u64,
}

/// One row into a digest: its tag, key and value, each length-prefixed.
fn feed_row(h: &mut blake3::Hasher, tag: &[u8], k: &[u8], v: &[u8]) {
    for part in [tag, k, v] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part);
    }
}

impl StateReader {
    /// A reader of plain state (sealed rows need [`with_vault`](Self::with_vault)).
    pub fn new(db: Arc<Database>) -> Self {
        StateReader { db, vault: super::vault::Vault::off() }
    }

    /// A reader that opens sealed rows with `vault`'s data keys.
    pub fn with_vault(db: Arc<Database>, vault: Arc<super::vault::Vault>) -> Self {
        StateReader { db, vault }
    }

    pub fn vault(&self) -> &Arc<super::vault::Vault> {
        &self.vault
    }

    pub(crate) fn applied(txn: &redb::ReadTransaction) -> Result<u64, StorageError> {
        let meta = txn.open_table(SM_META)?;
        let v = meta.get(META_APPLIED)?;
        let applied: Option<crate::raft::LogId> = v.map(|v| codec::decode("sm_meta", v.value())).transpose()?;
        Ok(applied.map(|l| l.index).unwrap_or(0))
    }

    pub fn namespace(&self, ns: &str) -> Result<Option<NamespaceInfo>, StorageError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(NAMESPACES)?;
        let v = table.get(ns)?;
        v.map(|v| codec::decode_row("namespaces", v.value())).transpose()
    }

    pub fn namespaces(&self) -> Result<Vec<NamespaceInfo>, StorageError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(NAMESPACES)?;
        let mut out = Vec::new();
        for item in table.iter()? {
            let (_, v) = item?;
            out.push(codec::decode_row("namespaces", v.value())?);
        }
        Ok(out)
    }

    /// Up to `limit` namespaces after `after` whose names start with `prefix` and pass `keep`,
    /// in name order; whether more may follow; the applied index — in one cut.
    pub fn namespaces_page(
        &self,
        after: Option<&str>,
        prefix: &str,
        limit: usize,
        mut keep: impl FnMut(&str) -> bool,
    ) -> Result<(Vec<NamespaceInfo>, bool, u64), StorageError> {
        use std::ops::Bound;
        let txn = self.db.begin_read()?;
        let applied = Self::applied(&txn)?;
        let table = txn.open_table(NAMESPACES)?;
        let start = match after {
            Some(a) if a >= prefix => Bound::Excluded(a),
            _ => Bound::Included(prefix),
        };
        let mut out = Vec::new();
        for item in table.range::<&str>((start, Bound::Unbounded))? {
            let (k, v) = item?;
            if !k.value().starts_with(prefix) {
                break;
            }
            if !keep(k.value()) {
                continue;
            }
            if out.len() == limit {
                return Ok((out, true, applied));
            }
            out.push(codec::decode_row("namespaces", v.value())?);
        }
        Ok((out, false, applied))
    }

    /// The namespace (if any), the memory (if any) and the applied index, in one cut.
    pub fn get(&self, ns: &str, id: &str) -> Result<(Option<NamespaceInfo>, Option<Memory>, u64), StorageError> {
        let txn = self.db.begin_read()?;
        let applied = Self::applied(&txn)?;
        let nss = txn.open_table(NAMESPACES)?;
        let info: Option<NamespaceInfo> =
            nss.get(ns)?.map(|v| codec::decode_row("namespaces", v.value())).transpose()?;
        let table = txn.open_table(MEMORIES)?;
        let key = memory_key(ns, id);
        let m = table.get(key.as_slice())?;
        let m = m.map(|v| codec::decode_memory_in(&self.vault, &key, v.value())).transpose()?;
        Ok((info, m, applied))
    }

    /// Up to `limit` memories of `ns` with ids after `after`, in id order.
    pub fn list(
        &self,
        ns: &str,
        after: Option<&str>,
        limit: usize,
        now_ms: u64,
    ) -> Result<(Option<NamespaceInfo>, Page), StorageError> {
        self.list_where(ns, after, (limit, usize::MAX), now_ms, |_| true)
    }

    /// [`list`](Self::list) of the memories `keep` accepts, stopping early (with a next page)
    /// once the page's memories hold `max_bytes` of text and vectors.
    pub fn list_where(
        &self,
        ns: &str,
        after: Option<&str>,
        (limit, max_bytes): (usize, usize),
        now_ms: u64,
        keep: impl Fn(&Memory) -> bool,
    ) -> Result<(Option<NamespaceInfo>, Page), StorageError> {
        let txn = self.db.begin_read()?;
        let applied_index = Self::applied(&txn)?;
        let nss = txn.open_table(NAMESPACES)?;
        let info: Option<NamespaceInfo> =
            nss.get(ns)?.map(|v| codec::decode_row("namespaces", v.value())).transpose()?;
        let (lo, hi) = namespace_range(ns);
        let start = match after {
            Some(id) => {
                let mut k = memory_key(ns, id);
                k.push(0); // the smallest key strictly after `id`
                k
            }
            None => lo,
        };
        let table = txn.open_table(MEMORIES)?;
        let mut memories = Vec::with_capacity(limit.min(1024));
        let mut more = false;
        let mut bytes = 0usize;
        for item in table.range::<&[u8]>(start.as_slice()..hi.as_slice())? {
            let (k, v) = item?;
            let m = codec::decode_memory_in(&self.vault, k.value(), v.value())?;
            if m.expires_at_ms.is_some_and(|e| e <= now_ms) || !keep(&m) {
                continue;
            }
            if memories.len() == limit || (bytes >= max_bytes && !memories.is_empty()) {
                more = true;
                break;
            }
            bytes += m.stored_bytes() as usize;
            memories.push(m);
        }
        let next_after = if more { memories.last().map(|m| m.id.clone()) } else { None };
        Ok((info, Page { memories, next_after, applied_index }))
    }

    /// The applied index, the namespace (if any) and every one of its memories (expired ones
    /// included), in one cut: what a vector shard is built from while applies go on.
    pub fn namespace_cut(&self, ns: &str) -> Result<(u64, Option<NamespaceInfo>, Vec<Memory>), StorageError> {
        let txn = self.db.begin_read()?;
        let applied = Self::applied(&txn)?;
        let nss = txn.open_table(NAMESPACES)?;
        let info: Option<NamespaceInfo> =
            nss.get(ns)?.map(|v| codec::decode_row("namespaces", v.value())).transpose()?;
        let mut memories = Vec::with_capacity(info.as_ref().map_or(0, |i| i.memory_count as usize));
        if info.is_some() {
            let (lo, hi) = namespace_range(ns);
            let table = txn.open_table(MEMORIES)?;
            for item in table.range::<&[u8]>(lo.as_slice()..hi.as_slice())? {
                let (k, v) = item?;
                memories.push(codec::decode_memory_in(&self.vault, k.value(), v.value())?);
            }
        }
        Ok((applied, info, memories))
    }

    /// An API key's record.
    pub fn key(&self, id: &crate::auth::token::KeyId) -> Result<Option<crate::auth::records::KeyRecord>, StorageError> {
        super::auth::key(&self.db.begin_read()?.open_table(super::AUTH_KEYS)?, id)
    }

    /// The role records `names` refer to.
    pub fn roles(&self, names: &[String]) -> Result<Vec<crate::auth::records::Role>, StorageError> {
        super::auth::roles(&self.db.begin_read()?.open_table(super::AUTH_ROLES)?, names)
    }

    pub fn keys(&self) -> Result<Vec<crate::auth::records::KeyRecord>, StorageError> {
        let txn = self.db.begin_read()?;
        Ok(super::auth::all(&txn.open_table(super::AUTH_KEYS)?, "auth_keys")?.into_iter().map(|(_, v)| v).collect())
    }

    pub fn all_roles(&self) -> Result<Vec<crate::auth::records::Role>, StorageError> {
        let txn = self.db.begin_read()?;
        Ok(super::auth::all(&txn.open_table(super::AUTH_ROLES)?, "auth_roles")?.into_iter().map(|(_, v)| v).collect())
    }

    pub fn quotas(&self) -> Result<Vec<(String, crate::auth::records::Quota)>, StorageError> {
        super::auth::all(&self.db.begin_read()?.open_table(super::QUOTAS)?, "quotas")
    }

    /// Whether any root key exists (the cluster has been claimed).
    pub fn has_root_key(&self) -> Result<bool, StorageError> {
        super::auth::has_root_key(&self.db.begin_read()?.open_table(super::AUTH_KEYS)?)
    }

    /// The cluster's id, once the first leader has named it.
    pub fn cluster_id(&self) -> Result<Option<[u8; 16]>, StorageError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(SM_META)?;
        let v = meta.get(super::META_CLUSTER_ID)?;
        v.map(|v| {
            v.value()
                .try_into()
                .map_err(|_| StorageError::Corrupt { table: "sm_meta", reason: "cluster id is not 16 bytes".into() })
        })
        .transpose()
    }

    /// The namespace's memory policy (the default when none was set).
    pub fn policy(&self, ns: &str) -> Result<crate::memory::MemoryPolicy, StorageError> {
        super::index::policy(&self.db.begin_read()?.open_table(super::NS_POLICY)?, ns)
    }

    /// The namespace's memory-model counters.
    pub fn stats(&self, ns: &str) -> Result<crate::memory::NamespaceStats, StorageError> {
        super::index::stats(&self.db.begin_read()?.open_table(super::NS_STATS)?, ns)
    }

    /// Up to `limit` (namespace, id) expired at `now_ms`, oldest expiry first.
    pub fn expired(&self, now_ms: u64, limit: usize) -> Result<Vec<(String, String)>, StorageError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(super::EXPIRY_INDEX)?;
        let mut out = Vec::new();
        for item in t.range(..(now_ms.saturating_add(1), "", ""))?.take(limit) {
            let (k, _) = item?;
            let (_, ns, id) = k.value();
            out.push((ns.to_string(), id.to_string()));
        }
        Ok(out)
    }

    /// The last applied log id.
    pub fn applied_log_id(&self) -> Result<Option<crate::raft::LogId>, StorageError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(SM_META)?;
        let v = meta.get(META_APPLIED)?;
        v.map(|v| codec::decode("sm_meta", v.value())).transpose()
    }

    /// The earliest expiry in the expiry index, if any.
    pub fn next_expiry(&self) -> Result<Option<u64>, StorageError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(super::EXPIRY_INDEX)?;
        let first = t.first()?;
        Ok(first.map(|(k, _)| k.value().0))
    }

    /// Namespaces with a retention rule, with it.
    pub fn retention_rules(&self) -> Result<Vec<(String, crate::memory::policy::Retention)>, StorageError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(super::NS_POLICY)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (k, _) = item?;
            if let Some(r) = super::index::policy(&t, k.value())?.retention {
                out.push((k.value().to_string(), r));
            }
        }
        Ok(out)
    }

    /// Up to `limit` memories of `ns` created before `cutoff_ms`, oldest first.
    pub fn created_before(&self, ns: &str, cutoff_ms: u64, limit: usize) -> Result<Vec<Memory>, StorageError> {
        let txn = self.db.begin_read()?;
        let age = txn.open_table(super::AGE_INDEX)?;
        let memories = txn.open_table(MEMORIES)?;
        let mut out = Vec::new();
        for item in age.range((ns, 0u64, "")..(ns, cutoff_ms, ""))?.take(limit) {
            let (k, _) = item?;
            let (_, _, id) = k.value();
            let key = memory_key(ns, id);
            if let Some(v) = memories.get(key.as_slice())? {
                out.push(codec::decode_memory_in(&self.vault, &key, v.value())?);
            }
        }
        Ok(out)
    }

    /// Every memory of `ns` in id order, expired ones left out (consolidation plans).
    pub fn all_live(&self, ns: &str, now_ms: u64) -> Result<Vec<Memory>, StorageError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(MEMORIES)?;
        let (lo, hi) = namespace_range(ns);
        let mut out = Vec::new();
        for item in table.range(lo.as_slice()..hi.as_slice())? {
            let (k, v) = item?;
            let m = codec::decode_memory_in(&self.vault, k.value(), v.value())?;
            if !m.expired(now_ms) {
                out.push(m);
            }
        }
        Ok(out)
    }

    /// Every data key row (wrapped) and every erasure, with the applied index they stand at.
    pub fn data_keys(&self) -> Result<(u64, Vec<super::vault::DataKeyRow>, Vec<super::vault::Erasure>), StorageError> {
        let txn = self.db.begin_read()?;
        let keys = match super::optional_table(&txn, super::vault::DATA_KEYS)? {
            Some(t) => super::vault::rows(&t)?,
            None => Vec::new(),
        };
        let erased = match super::optional_table(&txn, super::vault::ERASED)? {
            Some(t) => super::vault::erasures(&t)?,
            None => Vec::new(),
        };
        Ok((Self::applied(&txn)?, keys, erased))
    }

    /// The erasure that destroyed data key `id`, if one did.
    pub fn erasure(&self, id: &[u8; 8]) -> Result<Option<super::vault::Erasure>, StorageError> {
        let txn = self.db.begin_read()?;
        let Some(t) = super::optional_table(&txn, super::vault::ERASED)? else { return Ok(None) };
        let v = t.get(hex::encode(id).as_str())?;
        v.map(|v| codec::decode_row("erased_keys", v.value())).transpose()
    }

    /// The ledger's chain head at `index`, if this node still has that row.
    pub fn ledger_head(&self, index: u64) -> Result<Option<[u8; 32]>, StorageError> {
        Ok(super::ledger::at(&self.db.begin_read()?, index)?.map(|l| l.head))
    }

    pub fn applied_index(&self) -> Result<u64, StorageError> {
        Self::applied(&self.db.begin_read()?)
    }

    /// BLAKE3 over every table of the state machine, in key order: equal digests mean
    /// identical state. Versioned rows count by their body ([`codec::row_body`]), so a file
    /// before and after its format upgrade digests the same.
    pub fn digest(&self) -> Result<[u8; 32], StorageError> {
        self.digest_of(true)
    }

    /// BLAKE3 over the data tables only (memories, namespaces, idempotency, auth), leaving out
    /// `sm_meta` (applied id, membership, cluster id) and the ledger: equal across a backup and its restore.
    pub fn data_digest(&self) -> Result<[u8; 32], StorageError> {
        self.digest_of(false)
    }

    /// The applied index and [`digest`](Self::digest), read from one transaction, so the two
    /// describe the same state.
    pub fn applied_digest(&self) -> Result<(u64, [u8; 32]), StorageError> {
        let txn = self.db.begin_read()?;
        Ok((Self::applied(&txn)?, Self::digest_in(&txn, true)?))
    }

    /// BLAKE3 over one namespace's rows (its memories, its namespace row's body, policy and
    /// stats), in key order: equal digests mean the namespace holds the same rows.
    pub fn namespace_digest(&self, ns: &str) -> Result<[u8; 32], StorageError> {
        let txn = self.db.begin_read()?;
        let mut h = blake3::Hasher::new();
        let mut feed = |tag: &[u8], k: &[u8], v: &[u8]| feed_row(&mut h, tag, k, v);
        let (lo, hi) = namespace_range(ns);
        for item in txn.open_table(MEMORIES)?.range(lo.as_slice()..hi.as_slice())? {
            let (k, v) = item?;
            feed(b"m", k.value(), v.value());
        }
        if let Some(v) = txn.open_table(NAMESPACES)?.get(ns)? {
            feed(b"n", ns.as_bytes(), codec::row_body(v.value()));
        }
        for (tag, table) in super::MODEL_TABLES {
            if let Some(t) = super::optional_table(&txn, table)? {
                if let Some(v) = t.get(ns)? {
                    feed(&[b'p', tag], ns.as_bytes(), v.value());
                }
            }
        }
        Ok(*h.finalize().as_bytes())
    }

    fn digest_of(&self, with_meta: bool) -> Result<[u8; 32], StorageError> {
        Self::digest_in(&self.db.begin_read()?, with_meta)
    }

    /// [`digest`](Self::digest) (`with_meta`) or [`data_digest`](Self::data_digest) of the
    /// state `txn` sees.
    pub fn digest_in(txn: &redb::ReadTransaction, with_meta: bool) -> Result<[u8; 32], StorageError> {
        let mut h = blake3::Hasher::new();
        let mut feed = |tag: &[u8], k: &[u8], v: &[u8]| feed_row(&mut h, tag, k, v);
        for item in txn.open_table(MEMORIES)?.iter()? {
            let (k, v) = item?;
            feed(b"m", k.value(), v.value());
        }
        for item in txn.open_table(NAMESPACES)?.iter()? {
            let (k, v) = item?;
            feed(b"n", k.value().as_bytes(), codec::row_body(v.value()));
        }
        for item in txn.open_table(super::IDEMPOTENCY)?.iter()? {
            let (k, v) = item?;
            feed(b"i", k.value().as_bytes(), codec::row_body(v.value()));
        }
        for item in txn.open_table(super::IDEM_EXPIRY)?.iter()? {
            let (k, _) = item?;
            let (ts, key) = k.value();
            feed(b"e", &ts.to_be_bytes(), key.as_bytes());
        }
        for (tag, table) in super::AUTH_TABLES {
            for item in txn.open_table(table)?.iter()? {
                let (k, v) = item?;
                feed(&[b'a', tag], k.value().as_bytes(), codec::row_body(v.value()));
            }
        }
        for (tag, table) in super::MODEL_TABLES {
            for item in super::optional_table(txn, table)?.iter().flat_map(|t| t.iter()).flatten() {
                let (k, v) = item?;
                feed(&[b'p', tag], k.value().as_bytes(), v.value());
            }
        }
        if let Some(t) = super::optional_table(txn, super::CONTENT_INDEX)? {
            for item in t.iter()? {
                let (k, _) = item?;
                let (ns, hash, id) = k.value();
                feed(b"c", ns.as_bytes(), &[hash, id.as_bytes()].concat());
            }
        }
        if let Some(t) = super::optional_table(txn, super::EXPIRY_INDEX)? {
            for item in t.iter()? {
                let (k, _) = item?;
                let (at, ns, id) = k.value();
                feed(b"x", &at.to_be_bytes(), format!("{ns}\0{id}").as_bytes());
            }
        }
        if let Some(t) = super::optional_table(txn, super::AGE_INDEX)? {
            for item in t.iter()? {
                let (k, _) = item?;
                let (ns, at, id) = k.value();
                feed(b"g", &at.to_be_bytes(), format!("{ns}\0{id}").as_bytes());
            }
        }
        if with_meta {
            // Wrapped keys are in snapshots, not backups: with the metadata, not the data.
            for (tag, table) in [(b'k', super::vault::DATA_KEYS), (b'z', super::vault::ERASED)] {
                if let Some(t) = super::optional_table(txn, table)? {
                    for item in t.iter()? {
                        let (k, v) = item?;
                        feed(&[tag], k.value().as_bytes(), codec::row_body(v.value()));
                    }
                }
            }
            for item in txn.open_table(SM_META)?.iter()? {
                let (k, v) = item?;
                feed(b"s", k.value().as_bytes(), v.value());
            }
            // The ledger follows the log (a restore's new entries extend it), like the applied id.
            if let Some(t) = super::optional_table(txn, super::ledger::LEDGER)? {
                for item in t.iter()? {
                    let (k, v) = item?;
                    feed(b"l", &k.value().to_be_bytes(), v.value());
                }
            }
        }
        Ok(*h.finalize().as_bytes())
    }
}
