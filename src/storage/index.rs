//! Memories with their derived indexes, kept in step inside one write transaction: every
//! write and removal of a memory in `apply` goes through [`MemoryTables`], so the content,
//! expiry and age indexes always equal what [`rebuild`] derives from `memories` alone (the
//! digest covers both, and snapshot installs rebuild).

use redb::{ReadableTable, ReadableTableMetadata, Table, WriteTransaction};

use super::vault::Vault;
use super::{
    codec, memory_key, namespace_range, AGE_INDEX, CONTENT_INDEX, EXPIRY_INDEX, MEMORIES, NS_POLICY, NS_STATS,
};
use crate::error::StorageError;
use crate::memory::{Memory, MemoryPolicy, NamespaceStats};

/// Above every id (ids are `[A-Za-z0-9_.:-]`).
const ID_MAX: &str = "~";

pub struct MemoryTables<'t> {
    vault: &'t Vault,
    memories: Table<'t, &'static [u8], &'static [u8]>,
    content: Table<'t, (&'static str, &'static [u8], &'static str), ()>,
    expiry: Table<'t, (u64, &'static str, &'static str), ()>,
    age: Table<'t, (&'static str, u64, &'static str), ()>,
}

impl<'t> MemoryTables<'t> {
    pub fn open(txn: &'t WriteTransaction, vault: &'t Vault) -> Result<Self, StorageError> {
        Ok(MemoryTables {
            vault,
            memories: txn.open_table(MEMORIES)?,
            content: txn.open_table(CONTENT_INDEX)?,
            expiry: txn.open_table(EXPIRY_INDEX)?,
            age: txn.open_table(AGE_INDEX)?,
        })
    }

    pub fn get(&self, ns: &str, id: &str) -> Result<Option<Memory>, StorageError> {
        let key = memory_key(ns, id);
        let v = self.memories.get(key.as_slice())?;
        v.map(|v| codec::decode_memory_in(self.vault, &key, v.value())).transpose()
    }

    fn index(&mut self, m: &Memory) -> Result<(), StorageError> {
        let hash = self.vault.index_hash(&m.namespace, &m.content_hash);
        self.content.insert((m.namespace.as_str(), hash.as_slice(), m.id.as_str()), ())?;
        if let Some(at) = m.expires_at_ms {
            self.expiry.insert((at, m.namespace.as_str(), m.id.as_str()), ())?;
        }
        self.age.insert((m.namespace.as_str(), m.created_at_ms, m.id.as_str()), ())?;
        Ok(())
    }

    fn unindex(&mut self, m: &Memory) -> Result<(), StorageError> {
        let hash = self.vault.index_hash(&m.namespace, &m.content_hash);
        self.content.remove((m.namespace.as_str(), hash.as_slice(), m.id.as_str()))?;
        if let Some(at) = m.expires_at_ms {
            self.expiry.remove((at, m.namespace.as_str(), m.id.as_str()))?;
        }
        self.age.remove((m.namespace.as_str(), m.created_at_ms, m.id.as_str()))?;
        Ok(())
    }

    /// Writes `m`, returning what it replaced.
    pub fn put(&mut self, m: &Memory) -> Result<Option<Memory>, StorageError> {
        let key = memory_key(&m.namespace, &m.id);
        let old = self.memories.insert(key.as_slice(), codec::encode_memory_in(self.vault, m).as_slice())?;
        let old = old.map(|v| codec::decode_memory_in(self.vault, &key, v.value())).transpose()?;
        if let Some(old) = &old {
            self.unindex(old)?;
        }
        self.index(m)?;
        Ok(old)
    }

    /// Removes a memory, returning it.
    pub fn remove(&mut self, ns: &str, id: &str) -> Result<Option<Memory>, StorageError> {
        let key = memory_key(ns, id);
        let old = self.memories.remove(key.as_slice())?;
        let old = old.map(|v| codec::decode_memory_in(self.vault, &key, v.value())).transpose()?;
        if let Some(old) = &old {
            self.unindex(old)?;
        }
        Ok(old)
    }

    /// Ids of `ns` whose text hashes to `hash`, in id order.
    pub fn with_content(&self, ns: &str, hash: &[u8; 32]) -> Result<Vec<String>, StorageError> {
        let hash = &self.vault.index_hash(ns, hash);
        let mut out = Vec::new();
        for item in self.content.range((ns, hash.as_slice(), "")..(ns, hash.as_slice(), ID_MAX))? {
            let (k, _) = item?;
            out.push(k.value().2.to_string());
        }
        Ok(out)
    }

    /// Up to `limit` (expires_at, namespace, id) with `expires_at <= now_ms`, oldest first.
    pub fn expired(&self, now_ms: u64, limit: usize) -> Result<Vec<(u64, String, String)>, StorageError> {
        let mut out = Vec::new();
        for item in self.expiry.range(..(now_ms.saturating_add(1), "", ""))?.take(limit) {
            let (k, _) = item?;
            let (at, ns, id) = k.value();
            out.push((at, ns.to_string(), id.to_string()));
        }
        Ok(out)
    }

    /// Up to `limit` ids of `ns` created before `cutoff_ms`, oldest first.
    pub fn created_before(&self, ns: &str, cutoff_ms: u64, limit: usize) -> Result<Vec<String>, StorageError> {
        let mut out = Vec::new();
        for item in self.age.range((ns, 0, "")..(ns, cutoff_ms, ""))?.take(limit) {
            let (k, _) = item?;
            out.push(k.value().2.to_string());
        }
        Ok(out)
    }

    /// How many memories of `ns` have ids starting with `prefix`, counting at most `cap`.
    /// Every memory id of a namespace, in id order.
    pub fn ids(&self, ns: &str) -> Result<Vec<String>, StorageError> {
        let (lo, hi) = super::namespace_range(ns);
        let mut out = Vec::new();
        for item in self.memories.range(lo.as_slice()..hi.as_slice())? {
            let (k, _) = item?;
            let id = &k.value()[ns.len() + 1..];
            out.push(String::from_utf8_lossy(id).into_owned());
        }
        Ok(out)
    }

    pub fn count_prefix(&self, ns: &str, prefix: &str, cap: u64) -> Result<u64, StorageError> {
        let lo = memory_key(ns, prefix);
        let mut hi = memory_key(ns, prefix);
        hi.extend_from_slice(ID_MAX.as_bytes());
        let mut n = 0;
        for item in self.memories.range(lo.as_slice()..hi.as_slice())? {
            item?;
            n += 1;
            if n >= cap {
                break;
            }
        }
        Ok(n)
    }

    /// Every memory of `ns`, in id order (consolidation plans, namespace drops).
    pub fn all(&self, ns: &str) -> Result<Vec<Memory>, StorageError> {
        let (lo, hi) = namespace_range(ns);
        let mut out = Vec::new();
        for item in self.memories.range(lo.as_slice()..hi.as_slice())? {
            let (k, v) = item?;
            out.push(codec::decode_memory_in(self.vault, k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Seals every plain memory of `ns` now that the namespace has a data key in the vault (a
    /// namespace written before encryption at rest was on). Returns how many.
    pub fn reseal_namespace(&mut self, ns: &str) -> Result<u64, StorageError> {
        let (lo, hi) = namespace_range(ns);
        let mut plain = Vec::new();
        for item in self.memories.range(lo.as_slice()..hi.as_slice())? {
            let (k, v) = item?;
            if super::vault::sealed_by(v.value()).is_none() {
                plain.push(codec::decode_memory_in(self.vault, k.value(), v.value())?);
            }
        }
        for m in &plain {
            // Indexed under the plain hash while the row was plain.
            self.content.remove((ns, m.content_hash.as_slice(), m.id.as_str()))?;
            self.put(m)?;
        }
        Ok(plain.len() as u64)
    }

    /// Removes every memory of `ns` with its index entries; returns how many.
    pub fn drop_namespace(&mut self, ns: &str) -> Result<u64, StorageError> {
        let all = self.all(ns)?;
        for m in &all {
            self.memories.remove(memory_key(ns, &m.id).as_slice())?;
            self.unindex(m)?;
        }
        Ok(all.len() as u64)
    }
}

/// Re-derives every index from `memories` (dump loads, and state machines from before the
/// indexes existed).
pub fn rebuild(txn: &WriteTransaction, vault: &Vault) -> Result<u64, StorageError> {
    let mut t = MemoryTables::open(txn, vault)?;
    t.content.retain(|_, _| false)?;
    t.expiry.retain(|_, _| false)?;
    t.age.retain(|_, _| false)?;
    let mut all = Vec::new();
    for item in t.memories.iter()? {
        let (k, v) = item?;
        all.push(codec::decode_memory_in(vault, k.value(), v.value())?);
    }
    for m in &all {
        t.index(m)?;
    }
    Ok(all.len() as u64)
}

/// Whether the indexes may be missing: no memory is indexed yet but memories exist.
pub fn needs_rebuild(txn: &WriteTransaction) -> Result<bool, StorageError> {
    let off = Vault::off();
    let t = MemoryTables::open(txn, &off)?;
    Ok(t.age.is_empty()? && !t.memories.is_empty()?)
}

pub fn policy<T: ReadableTable<&'static str, &'static [u8]>>(t: &T, ns: &str) -> Result<MemoryPolicy, StorageError> {
    match t.get(ns)? {
        Some(v) => serde_json::from_slice(v.value())
            .map_err(|e| StorageError::Corrupt { table: "ns_policy", reason: e.to_string() }),
        None => Ok(MemoryPolicy::default()),
    }
}

pub fn stats<T: ReadableTable<&'static str, &'static [u8]>>(t: &T, ns: &str) -> Result<NamespaceStats, StorageError> {
    match t.get(ns)? {
        Some(v) => serde_json::from_slice(v.value())
            .map_err(|e| StorageError::Corrupt { table: "ns_stats", reason: e.to_string() }),
        None => Ok(NamespaceStats::default()),
    }
}

/// Stores a policy; the default policy is stored as no row.
pub fn put_policy(txn: &WriteTransaction, ns: &str, p: &MemoryPolicy) -> Result<(), StorageError> {
    let mut t = txn.open_table(NS_POLICY)?;
    if *p == MemoryPolicy::default() {
        t.remove(ns)?;
    } else {
        t.insert(ns, serde_json::to_vec(p).expect("a policy serializes").as_slice())?;
    }
    Ok(())
}

/// Applies `f` to the namespace's counters.
pub fn bump_stats(txn: &WriteTransaction, ns: &str, f: impl FnOnce(&mut NamespaceStats)) -> Result<(), StorageError> {
    let mut t = txn.open_table(NS_STATS)?;
    let mut s = stats(&t, ns)?;
    let before = s.clone();
    f(&mut s);
    if s != before {
        t.insert(ns, serde_json::to_vec(&s).expect("stats serialize").as_slice())?;
    }
    Ok(())
}

/// Forgets a dropped namespace's policy and counters.
pub fn drop_model(txn: &WriteTransaction, ns: &str) -> Result<(), StorageError> {
    txn.open_table(NS_POLICY)?.remove(ns)?;
    txn.open_table(NS_STATS)?.remove(ns)?;
    Ok(())
}
