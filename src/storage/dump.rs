//! The state dump: every row of the state machine as a stream of records, read from one redb
//! read transaction (a consistent cut at the applied log id). It is the body of Raft snapshots
//! (zstd) and of backups (zstd, then encrypted in chunks; see `backup`).
//!
//! ```text
//! dump    := record*            record := len: u32 LE | bincode(Record)   (len <= 64 MiB)
//! records := Begin, (Meta | Namespace | Memory | Idempotency | IdemExpiry | Auth | Model | Ledger)*, End
//! Auth    := { table: 0 keys | 1 roles | 2 quotas, key, value }     (format 2)
//! Model   := { table: 0 ns_policy | 1 ns_stats, key, value }       (format 3)
//! Ledger  := { index, value: entry hash | chain head }              (format 4)
//! Namespace, Idempotency and Auth values carry their row version byte (format 5; see
//! `storage::format`); an older dump's bare values get it as they load
//! DataKey := { namespace, value: ROW_V1 | wrapped data key }      (format 6; snapshots only)
//! Erased  := { key id, value: ROW_V1 | erasure record }            (format 6)
//! End     := { rows, digest = BLAKE3 over every byte before End's length prefix }
//! ```
//!
//! A reader refuses anything but exactly this shape: a missing `End`, a wrong row count or
//! digest, or bytes after `End`. [`load`] writes into a caller's write transaction, so a
//! refused dump is dropped with the transaction and changes nothing. Format 2 and 3 dumps (no
//! memory-model rows, no ledger rows) and format 4 (bare rows) still load. The derived indexes are rebuilt from the loaded memories.

use std::io::{Read, Write};

use redb::{ReadTransaction, ReadableTable, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::vault::Vault;
use super::{codec, IDEMPOTENCY, IDEM_EXPIRY, MEMORIES, META_APPLIED, META_MEMBERSHIP, NAMESPACES, SM_META};
use crate::error::StorageError;
use crate::raft::{LogId, StoredMembership};

pub const DUMP_FORMAT: u16 = 6;
/// The first format whose versioned rows carry their version byte.
const VERSIONED_ROWS: u16 = 5;
/// Oldest format [`load`] reads.
const OLDEST_FORMAT: u16 = 2;
const MAX_RECORD_BYTES: usize = 64 << 20;

#[derive(Debug, Serialize, Deserialize)]
enum Record {
    Begin { format: u16, applied: Option<LogId>, membership: StoredMembership },
    Meta { key: String, value: Vec<u8> },
    Namespace { name: String, value: Vec<u8> },
    Memory { key: Vec<u8>, value: Vec<u8> },
    Idempotency { key: String, value: Vec<u8> },
    IdemExpiry { at_ms: u64, key: String },
    Auth { table: u8, key: String, value: Vec<u8> },
    End { rows: u64, digest: [u8; 32] },
    Model { table: u8, key: String, value: Vec<u8> },
    Ledger { index: u64, value: Vec<u8> },
    DataKey { namespace: String, value: Vec<u8> },
    Erased { key: String, value: Vec<u8> },
}

/// Whether a dump carries the wrapped data keys: a snapshot must (a follower installing it
/// needs them), a backup must not (an erasure could not reach it otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataKeys {
    Include,
    Exclude,
}

/// What a dump holds, as written or as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct DumpSummary {
    pub applied: Option<LogId>,
    pub membership: StoredMembership,
    /// Rows between `Begin` and `End`.
    pub rows: u64,
    pub memories: u64,
    pub namespaces: u64,
    /// Bytes of the dump, `End` included.
    pub bytes: u64,
    pub digest: [u8; 32],
}

fn corrupt(reason: impl Into<String>) -> StorageError {
    StorageError::Corrupt { table: "dump", reason: reason.into() }
}

struct Writer<'a, W: Write> {
    out: &'a mut W,
    hasher: blake3::Hasher,
    buf: Vec<u8>,
    bytes: u64,
}

impl<W: Write> Writer<'_, W> {
    fn put(&mut self, r: &Record) -> Result<(), StorageError> {
        self.buf.clear();
        bincode::serialize_into(&mut self.buf, r).expect("bincode into a Vec cannot fail");
        if self.buf.len() > MAX_RECORD_BYTES {
            return Err(corrupt(format!("a row of {} bytes exceeds the dump's record limit", self.buf.len())));
        }
        let len = (self.buf.len() as u32).to_le_bytes();
        self.out.write_all(&len)?;
        self.out.write_all(&self.buf)?;
        if !matches!(r, Record::End { .. }) {
            self.hasher.update(&len);
            self.hasher.update(&self.buf);
        }
        self.bytes += 4 + self.buf.len() as u64;
        Ok(())
    }
}

/// The applied log id and membership `txn` sees.
pub fn head(txn: &ReadTransaction) -> Result<(Option<LogId>, StoredMembership), StorageError> {
    let meta = txn.open_table(SM_META)?;
    let applied = meta.get(META_APPLIED)?.map(|v| codec::decode("sm_meta", v.value())).transpose()?;
    let membership = meta.get(META_MEMBERSHIP)?.map(|v| codec::decode("sm_meta", v.value())).transpose()?;
    Ok((applied, membership.unwrap_or_default()))
}

/// Writes every row visible to `txn` to `out`, in table and key order.
pub fn write(txn: &ReadTransaction, out: &mut impl Write, keys: DataKeys) -> Result<DumpSummary, StorageError> {
    let (applied, membership) = head(txn)?;
    let meta = txn.open_table(SM_META)?;
    let mut w = Writer { out, hasher: blake3::Hasher::new(), buf: Vec::with_capacity(4096), bytes: 0 };
    w.put(&Record::Begin { format: DUMP_FORMAT, applied, membership: membership.clone() })?;
    let (mut rows, mut memories, mut namespaces) = (0u64, 0u64, 0u64);
    for item in meta.iter()? {
        let (k, v) = item?;
        w.put(&Record::Meta { key: k.value().to_string(), value: v.value().to_vec() })?;
        rows += 1;
    }
    for item in txn.open_table(NAMESPACES)?.iter()? {
        let (k, v) = item?;
        w.put(&Record::Namespace { name: k.value().to_string(), value: v.value().to_vec() })?;
        rows += 1;
        namespaces += 1;
    }
    for item in txn.open_table(MEMORIES)?.iter()? {
        let (k, v) = item?;
        w.put(&Record::Memory { key: k.value().to_vec(), value: v.value().to_vec() })?;
        rows += 1;
        memories += 1;
    }
    for item in txn.open_table(IDEMPOTENCY)?.iter()? {
        let (k, v) = item?;
        w.put(&Record::Idempotency { key: k.value().to_string(), value: v.value().to_vec() })?;
        rows += 1;
    }
    for item in txn.open_table(IDEM_EXPIRY)?.iter()? {
        let (k, _) = item?;
        let (at_ms, key) = k.value();
        w.put(&Record::IdemExpiry { at_ms, key: key.to_string() })?;
        rows += 1;
    }
    for (table, def) in super::AUTH_TABLES {
        for item in txn.open_table(def)?.iter()? {
            let (k, v) = item?;
            w.put(&Record::Auth { table, key: k.value().to_string(), value: v.value().to_vec() })?;
            rows += 1;
        }
    }
    for (table, def) in super::MODEL_TABLES {
        let Some(t) = super::optional_table(txn, def)? else { continue };
        for item in t.iter()? {
            let (k, v) = item?;
            w.put(&Record::Model { table, key: k.value().to_string(), value: v.value().to_vec() })?;
            rows += 1;
        }
    }
    if let Some(t) = super::optional_table(txn, super::ledger::LEDGER)? {
        for item in t.iter()? {
            let (k, v) = item?;
            w.put(&Record::Ledger { index: k.value(), value: v.value().to_vec() })?;
            rows += 1;
        }
    }
    if keys == DataKeys::Include {
        if let Some(t) = super::optional_table(txn, super::vault::DATA_KEYS)? {
            for item in t.iter()? {
                let (k, v) = item?;
                w.put(&Record::DataKey { namespace: k.value().to_string(), value: v.value().to_vec() })?;
                rows += 1;
            }
        }
    }
    if let Some(t) = super::optional_table(txn, super::vault::ERASED)? {
        for item in t.iter()? {
            let (k, v) = item?;
            w.put(&Record::Erased { key: k.value().to_string(), value: v.value().to_vec() })?;
            rows += 1;
        }
    }
    let digest = *w.hasher.finalize().as_bytes();
    w.put(&Record::End { rows, digest })?;
    Ok(DumpSummary { applied, membership, rows, memories, namespaces, bytes: w.bytes, digest })
}

/// A read that ran out is a truncated dump; an error from below (a layer that checks its
/// own data, such as a backup archive) is passed on as it is.
fn read_error(e: std::io::Error, what: &str) -> StorageError {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => corrupt(what),
        _ => StorageError::Io(e),
    }
}

/// Reads records one at a time, checking the dump's shape as it goes.
struct Reader<R: Read> {
    r: R,
    hasher: blake3::Hasher,
    buf: Vec<u8>,
    bytes: u64,
}

impl<R: Read> Reader<R> {
    fn next(&mut self) -> Result<Record, StorageError> {
        let mut len = [0u8; 4];
        self.r.read_exact(&mut len).map_err(|e| read_error(e, "truncated before a record"))?;
        let n = u32::from_le_bytes(len) as usize;
        if n > MAX_RECORD_BYTES {
            return Err(corrupt(format!("record length {n} exceeds the limit")));
        }
        self.buf.resize(n, 0);
        self.r.read_exact(&mut self.buf).map_err(|e| read_error(e, "truncated record"))?;
        let rec: Record = bincode::deserialize(&self.buf).map_err(|e| corrupt(format!("undecodable record: {e}")))?;
        if !matches!(rec, Record::End { .. }) {
            self.hasher.update(&len);
            self.hasher.update(&self.buf);
        }
        self.bytes += 4 + n as u64;
        Ok(rec)
    }
}

/// Where a checked dump's rows go.
trait Sink {
    /// A row of a dump of `format`.
    fn row(&mut self, format: u16, r: Record) -> Result<(), StorageError>;
}

struct Discard;
impl Sink for Discard {
    fn row(&mut self, _: u16, _: Record) -> Result<(), StorageError> {
        Ok(())
    }
}

fn read_all(r: impl Read, sink: &mut dyn Sink) -> Result<DumpSummary, StorageError> {
    let mut rd = Reader { r, hasher: blake3::Hasher::new(), buf: Vec::new(), bytes: 0 };
    let (format, applied, membership) = match rd.next()? {
        Record::Begin { format: format @ OLDEST_FORMAT..=DUMP_FORMAT, applied, membership } => {
            (format, applied, membership)
        }
        Record::Begin { format, .. } => return Err(corrupt(format!("unsupported dump format {format}"))),
        other => return Err(corrupt(format!("dump does not start with Begin: {other:?}"))),
    };
    let (mut rows, mut memories, mut namespaces) = (0u64, 0u64, 0u64);
    // Ledger rows come in index order and end at the applied index: a row past it would make
    // every later apply refuse its entry.
    let mut ledger_last: Option<u64> = None;
    loop {
        match rd.next()? {
            Record::Begin { .. } => return Err(corrupt("a second Begin record")),
            Record::End { rows: want_rows, digest } => {
                let got = *rd.hasher.finalize().as_bytes();
                if want_rows != rows || digest != got {
                    return Err(corrupt(format!("dump digest mismatch ({rows} rows read, {want_rows} written)")));
                }
                if let Some(last) = ledger_last.filter(|l| Some(*l) != applied.map(|a| a.index)) {
                    return Err(corrupt(format!("the ledger ends at {last}, not at the applied index {applied:?}")));
                }
                let mut trailing = [0u8; 1];
                if rd.r.read(&mut trailing)? != 0 {
                    return Err(corrupt("bytes after the End record"));
                }
                let bytes = rd.bytes;
                return Ok(DumpSummary { applied, membership, rows, memories, namespaces, bytes, digest });
            }
            row => {
                if let Record::Ledger { index, .. } = &row {
                    if ledger_last.is_some_and(|l| *index <= l) {
                        return Err(corrupt(format!("ledger row {index} out of order")));
                    }
                    ledger_last = Some(*index);
                }
                rows += 1;
                memories += matches!(row, Record::Memory { .. }) as u64;
                namespaces += matches!(row, Record::Namespace { .. }) as u64;
                sink.row(format, row)?;
            }
        }
    }
}

/// Reads a whole dump, checking its shape, counts and digest; writes nothing.
pub fn check(r: impl Read) -> Result<DumpSummary, StorageError> {
    read_all(r, &mut Discard)
}

/// One namespace's rows in a dump (a partial restore's input).
#[derive(Debug, Clone, PartialEq)]
pub struct NamespaceRows {
    pub info: crate::memory::NamespaceInfo,
    /// The `ns_policy` row (JSON), if the namespace had a policy of its own.
    pub policy_json: Option<String>,
    /// In id order: the plain rows.
    pub memories: Vec<crate::memory::Memory>,
    /// Rows sealed at rest, as (key, value): only a node holding their data key opens them.
    pub sealed: Vec<(Vec<u8>, Vec<u8>)>,
}

impl NamespaceRows {
    /// The ids of the sealed rows (from their keys), in id order.
    pub fn sealed_ids(&self) -> Vec<String> {
        let skip = self.info.name.len() + 1;
        self.sealed.iter().map(|(k, _)| String::from_utf8_lossy(&k[skip.min(k.len())..]).into_owned()).collect()
    }

    /// Keeps only the memories (plain or sealed) whose id `keep` accepts.
    pub fn retain_ids(&mut self, keep: impl Fn(&str) -> bool) {
        self.memories.retain(|m| keep(&m.id));
        let skip = self.info.name.len() + 1;
        self.sealed.retain(|(k, _)| keep(&String::from_utf8_lossy(&k[skip.min(k.len())..])));
    }

    /// How many memories the rows hold, plain and sealed.
    pub fn len(&self) -> usize {
        self.memories.len() + self.sealed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

struct OneNamespace<'a> {
    name: &'a str,
    prefix: Vec<u8>,
    info: Option<crate::memory::NamespaceInfo>,
    policy_json: Option<String>,
    memories: Vec<crate::memory::Memory>,
    sealed: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Sink for OneNamespace<'_> {
    fn row(&mut self, format: u16, r: Record) -> Result<(), StorageError> {
        match r {
            Record::Namespace { name, value } if name == self.name => {
                self.info = Some(codec::decode_row("namespaces", &current_row(format, value))?);
            }
            Record::Memory { key, value } if key.starts_with(&self.prefix) => match super::vault::sealed_by(&value) {
                Some(_) => self.sealed.push((key, value)),
                None => self.memories.push(codec::decode_memory(&value)?),
            },
            Record::Model { table: 0, key, value } if key == self.name => {
                self.policy_json = Some(String::from_utf8(value).map_err(|_| corrupt("a policy row is not UTF-8"))?);
            }
            _ => {}
        }
        Ok(())
    }
}

/// Reads a whole dump, checking it as [`check`] does, and keeps the rows of `namespace`
/// (`None`: the dump has no such namespace).
pub fn namespace_rows(r: impl Read, namespace: &str) -> Result<(DumpSummary, Option<NamespaceRows>), StorageError> {
    let mut prefix = namespace.as_bytes().to_vec();
    prefix.push(0);
    let mut sink = OneNamespace {
        name: namespace,
        prefix,
        info: None,
        policy_json: None,
        memories: Vec::new(),
        sealed: Vec::new(),
    };
    let summary = read_all(r, &mut sink)?;
    let rows = sink.info.map(|info| NamespaceRows {
        info,
        policy_json: sink.policy_json,
        memories: sink.memories,
        sealed: sink.sealed,
    });
    Ok((summary, rows))
}

struct Tables<'t> {
    meta: redb::Table<'t, &'static str, &'static [u8]>,
    namespaces: redb::Table<'t, &'static str, &'static [u8]>,
    memories: redb::Table<'t, &'static [u8], &'static [u8]>,
    idempotency: redb::Table<'t, &'static str, &'static [u8]>,
    idem_expiry: redb::Table<'t, (u64, &'static str), ()>,
    auth: Vec<redb::Table<'t, &'static str, &'static [u8]>>,
    model: Vec<redb::Table<'t, &'static str, &'static [u8]>>,
    ledger: redb::Table<'t, u64, &'static [u8]>,
    data_keys: redb::Table<'t, &'static str, &'static [u8]>,
    erased: redb::Table<'t, &'static str, &'static [u8]>,
}

/// A versioned row of a dump of `format`, as this build stores it.
fn current_row(format: u16, value: Vec<u8>) -> Vec<u8> {
    match format >= VERSIONED_ROWS {
        true => value,
        false => super::format::prefixed(codec::ROW_V1, &value),
    }
}

impl Sink for Tables<'_> {
    fn row(&mut self, format: u16, r: Record) -> Result<(), StorageError> {
        let r = match r {
            Record::Namespace { name, value } => Record::Namespace { name, value: current_row(format, value) },
            Record::Idempotency { key, value } => Record::Idempotency { key, value: current_row(format, value) },
            Record::Auth { table, key, value } => Record::Auth { table, key, value: current_row(format, value) },
            other => other,
        };
        match r {
            Record::Meta { key, value } => self.meta.insert(key.as_str(), value.as_slice()).map(drop),
            Record::Namespace { name, value } => self.namespaces.insert(name.as_str(), value.as_slice()).map(drop),
            Record::Memory { key, value } => self.memories.insert(key.as_slice(), value.as_slice()).map(drop),
            Record::Idempotency { key, value } => self.idempotency.insert(key.as_str(), value.as_slice()).map(drop),
            Record::IdemExpiry { at_ms, key } => self.idem_expiry.insert((at_ms, key.as_str()), ()).map(drop),
            Record::Auth { table, key, value } => match self.auth.get_mut(table as usize) {
                Some(t) => t.insert(key.as_str(), value.as_slice()).map(drop),
                None => return Err(corrupt(format!("unknown auth table {table}"))),
            },
            Record::Model { table, key, value } => match self.model.get_mut(table as usize) {
                Some(t) => t.insert(key.as_str(), value.as_slice()).map(drop),
                None => return Err(corrupt(format!("unknown memory-model table {table}"))),
            },
            Record::Ledger { index, value } => {
                if value.len() != 64 {
                    return Err(corrupt(format!("ledger row {index} has {} bytes, not 64", value.len())));
                }
                self.ledger.insert(index, value.as_slice()).map(drop)
            }
            Record::DataKey { namespace, value } => {
                self.data_keys.insert(namespace.as_str(), value.as_slice()).map(drop)
            }
            Record::Erased { key, value } => self.erased.insert(key.as_str(), value.as_slice()).map(drop),
            Record::Begin { .. } | Record::End { .. } => unreachable!("read_all passes rows only"),
        }
        .map_err(StorageError::from)
    }
}

/// Replaces every row of the state machine with the dump's, inside `txn` (a snapshot
/// install). `vault` must hold no keys: it takes the dump's data keys, which open its sealed
/// rows (the caller adopts them once `txn` commits). On error the caller drops `txn` and
/// nothing changes.
pub fn load(r: impl Read, txn: &WriteTransaction, vault: &Vault) -> Result<DumpSummary, StorageError> {
    let summary = load_rows(r, txn)?;
    let keys = super::vault::rows(&txn.open_table(super::vault::DATA_KEYS)?)?;
    vault.load(&keys).map_err(|e| corrupt(format!("data keys: {e}")))?;
    vault.note_cluster_kek(super::vault::cluster_kek(txn)?);
    finish_load(txn, vault)?;
    Ok(summary)
}

/// A namespace a restore left out: erased since the backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErasedNamespace {
    pub namespace: String,
    /// The destroyed data key its rows were sealed under (`None`: they were plain).
    pub key: Option<[u8; 8]>,
    pub memories: u64,
    /// The log index of the erasure, when the key export records it.
    pub erased_at_index: Option<u64>,
}

/// [`load`] for a restore: a backup has no data keys, so `keys` and `erasures` (the live
/// cluster's, from a key export) stand in for them. A namespace erased after the backup's
/// index is left out whole, plain rows too, with its namespace row, policy and stats, and
/// reported; so is one whose rows are sealed under a key the export lists as destroyed. A
/// sealed row under a key the export does not know at all is an error: the export is older
/// than the data, and guessing "erased" would drop a live namespace.
pub fn load_restored(
    r: impl Read,
    txn: &WriteTransaction,
    vault: &Vault,
    at_rest: Option<(&[super::vault::DataKeyRow], &[super::vault::Erasure])>,
) -> Result<(DumpSummary, Vec<ErasedNamespace>), StorageError> {
    use std::collections::{BTreeMap, BTreeSet};
    let sealed_at_rest = at_rest.is_some();
    let (keys, erasures) = at_rest.unwrap_or((&[], &[]));
    let summary = load_rows(r, txn)?;
    let backup_index = summary.applied.map(|a| a.index).unwrap_or(0);
    let held: BTreeMap<[u8; 8], &super::vault::DataKeyRow> = keys.iter().map(|k| (k.id, k)).collect();
    let destroyed: BTreeMap<[u8; 8], &super::vault::Erasure> = erasures.iter().map(|e| (e.id, e)).collect();
    // Namespace -> the latest erasure after the backup.
    let mut erased_after: BTreeMap<&str, u64> = BTreeMap::new();
    for e in erasures.iter().filter(|e| e.index > backup_index) {
        let at = erased_after.entry(e.namespace.as_str()).or_default();
        *at = (*at).max(e.index);
    }
    let mut memories = txn.open_table(MEMORIES)?;
    let mut gone: BTreeMap<String, ErasedNamespace> = BTreeMap::new();
    let mut used: BTreeSet<[u8; 8]> = BTreeSet::new();
    let mut drop_keys = Vec::new();
    for item in memories.iter()? {
        let (k, v) = item?;
        let ns_end =
            k.value().iter().position(|b| *b == 0).ok_or_else(|| corrupt("a memory key without a namespace"))?;
        let ns = String::from_utf8_lossy(&k.value()[..ns_end]).into_owned();
        let sealed = super::vault::sealed_by(v.value());
        let erased_at = match (erased_after.get(ns.as_str()), sealed) {
            (Some(at), _) => Some(Some(*at)),
            (None, Some(id)) => match (held.get(&id), destroyed.get(&id)) {
                (Some(row), _) if row.namespace == ns => {
                    used.insert(id);
                    None
                }
                (_, Some(e)) => Some(Some(e.index)),
                _ if !sealed_at_rest => {
                    return Err(StorageError::Format {
                        file: "backup".into(),
                        reason: format!(
                            "the memories of {ns:?} are sealed at rest: pass the at-rest master key and the cluster's data keys (engramctl keys export --at-rest)"
                        ),
                    })
                }
                _ => {
                    return Err(corrupt(format!(
                        "the memories of {ns:?} are sealed under data key {}, which the key export neither holds nor lists as erased: take a newer export (engramctl keys export --at-rest)",
                        hex::encode(id)
                    )))
                }
            },
            (None, None) => None,
        };
        if let Some(at) = erased_at {
            let entry = gone.entry(ns.clone()).or_insert(ErasedNamespace {
                namespace: ns,
                key: sealed,
                memories: 0,
                erased_at_index: at,
            });
            entry.memories += 1;
            drop_keys.push(k.value().to_vec());
        }
    }
    for k in &drop_keys {
        memories.remove(k.as_slice())?;
    }
    drop(memories);
    let mut erased = Vec::new();
    let named: BTreeSet<String> = erased_after.keys().map(|n| n.to_string()).collect();
    for namespace in gone.keys().cloned().chain(named).collect::<BTreeSet<_>>() {
        // A namespace erased since, with no rows in the backup, goes too.
        let existed = txn.open_table(NAMESPACES)?.remove(namespace.as_str())?.is_some();
        for (_, table) in super::MODEL_TABLES {
            txn.open_table(table)?.remove(namespace.as_str())?;
        }
        if let Some(e) = gone.remove(&namespace) {
            erased.push(e);
        } else if existed {
            let at = erased_after.get(namespace.as_str()).copied();
            erased.push(ErasedNamespace { namespace, key: None, memories: 0, erased_at_index: at });
        }
    }
    let rows: Vec<_> = keys.iter().filter(|r| used.contains(&r.id)).cloned().collect();
    {
        let mut t = txn.open_table(super::vault::DATA_KEYS)?;
        t.retain(|_, _| false)?;
        for row in &rows {
            t.insert(row.namespace.as_str(), codec::encode_row(row).as_slice())?;
        }
        // The cluster's erasures stay known: the restored cluster refuses their keys too.
        let mut t = txn.open_table(super::vault::ERASED)?;
        for e in erasures {
            t.insert(hex::encode(e.id).as_str(), codec::encode_row(e).as_slice())?;
        }
    }
    super::vault::clear_cluster_kek(txn)?;
    vault.load(&rows).map_err(|e| corrupt(format!("data keys: {e}")))?;
    if let Some(kek) = keys.first().map(|k| k.kek) {
        super::vault::set_cluster_kek(txn, &kek, vault)?;
    }
    finish_load(txn, vault)?;
    Ok((summary, erased))
}

fn load_rows(r: impl Read, txn: &WriteTransaction) -> Result<DumpSummary, StorageError> {
    let mut t = Tables {
        meta: txn.open_table(SM_META)?,
        namespaces: txn.open_table(NAMESPACES)?,
        memories: txn.open_table(MEMORIES)?,
        idempotency: txn.open_table(IDEMPOTENCY)?,
        idem_expiry: txn.open_table(IDEM_EXPIRY)?,
        auth: super::AUTH_TABLES.iter().map(|(_, def)| txn.open_table(*def)).collect::<Result<_, _>>()?,
        model: super::MODEL_TABLES.iter().map(|(_, def)| txn.open_table(*def)).collect::<Result<_, _>>()?,
        ledger: txn.open_table(super::ledger::LEDGER)?,
        data_keys: txn.open_table(super::vault::DATA_KEYS)?,
        erased: txn.open_table(super::vault::ERASED)?,
    };
    t.ledger.retain(|_, _| false)?;
    t.meta.retain(|_, _| false)?;
    t.namespaces.retain(|_, _| false)?;
    t.memories.retain(|_, _| false)?;
    t.idempotency.retain(|_, _| false)?;
    t.idem_expiry.retain(|_, _| false)?;
    t.data_keys.retain(|_, _| false)?;
    t.erased.retain(|_, _| false)?;
    for table in t.auth.iter_mut().chain(t.model.iter_mut()) {
        table.retain(|_, _| false)?;
    }
    read_all(r, &mut t)
}

fn finish_load(txn: &WriteTransaction, vault: &Vault) -> Result<(), StorageError> {
    super::index::rebuild(txn, vault)?;
    // The rows loaded are in this build's format, whatever the dump's was.
    super::format::stamp(txn, super::format::STATE_FORMAT)
}

#[cfg(test)]
mod tests {
    use redb::backends::InMemoryBackend;
    use redb::{Database, ReadableDatabase};

    use super::*;

    /// A dump of `format` with one namespace, idempotency and auth row, each value `value`.
    fn dump_of(format: u16, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = Writer { out: &mut out, hasher: blake3::Hasher::new(), buf: Vec::new(), bytes: 0 };
        w.put(&Record::Begin { format, applied: None, membership: Default::default() }).unwrap();
        w.put(&Record::Namespace { name: "ns".into(), value: value.to_vec() }).unwrap();
        w.put(&Record::Idempotency { key: "k".into(), value: value.to_vec() }).unwrap();
        w.put(&Record::Auth { table: 1, key: "role".into(), value: value.to_vec() }).unwrap();
        let digest = *w.hasher.finalize().as_bytes();
        w.put(&Record::End { rows: 3, digest }).unwrap();
        out
    }

    fn load_into_fresh(dump: &[u8]) -> Database {
        let db = Database::builder().create_with_backend(InMemoryBackend::new()).unwrap();
        let txn = db.begin_write().unwrap();
        load(dump, &txn, &Vault::off()).unwrap();
        txn.commit().unwrap();
        db
    }

    #[test]
    fn an_older_dumps_bare_rows_load_with_their_version_byte() {
        for (format, value, want) in [(4u16, &b"body"[..], &b"\x01body"[..]), (DUMP_FORMAT, b"\x01body", b"\x01body")] {
            let db = load_into_fresh(&dump_of(format, value));
            let r = db.begin_read().unwrap();
            assert_eq!(r.open_table(NAMESPACES).unwrap().get("ns").unwrap().unwrap().value(), want, "format {format}");
            assert_eq!(r.open_table(IDEMPOTENCY).unwrap().get("k").unwrap().unwrap().value(), want);
            assert_eq!(r.open_table(super::super::AUTH_ROLES).unwrap().get("role").unwrap().unwrap().value(), want);
            assert_eq!(super::super::format::recorded(&r).unwrap(), Some(super::super::format::STATE_FORMAT));
            // Either way the digest sees the same rows.
            let digest = crate::storage::StateReader::digest_in(&r, false).unwrap();
            let other = load_into_fresh(&dump_of(
                if format == 4 { DUMP_FORMAT } else { 4 },
                if format == 4 { b"\x01body" } else { b"body" },
            ));
            assert_eq!(crate::storage::StateReader::digest_in(&other.begin_read().unwrap(), false).unwrap(), digest);
        }
    }

    /// A hostile dump: any records, framed with a correct row count and digest (what a buggy
    /// or hostile member could send as a snapshot), read back through every reader.
    fn hostile(records: &[Record]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = Writer { out: &mut out, hasher: blake3::Hasher::new(), buf: Vec::new(), bytes: 0 };
        w.put(&Record::Begin { format: DUMP_FORMAT, applied: None, membership: Default::default() }).unwrap();
        for r in records {
            w.put(r).unwrap();
        }
        let digest = *w.hasher.finalize().as_bytes();
        w.put(&Record::End { rows: records.len() as u64, digest }).unwrap();
        out
    }

    fn record() -> impl proptest::strategy::Strategy<Value = Record> {
        use proptest::prelude::*;
        // Values up to 256 KiB: some rows are large on purpose (a decoder must bound them by
        // what it holds, never by what a length prefix claims).
        let bytes = || {
            prop_oneof![
                4 => proptest::collection::vec(any::<u8>(), 0..64),
                1 => proptest::collection::vec(any::<u8>(), 0..(256 << 10)),
                // A real row's version byte, then garbage.
                2 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(|mut v| { v.insert(0, 1); v }),
            ]
        };
        let name = || prop_oneof![Just("a/b".to_string()), "[a-z/]{0,8}", any::<String>()];
        let meta_key = prop_oneof![
            Just("applied".to_string()),
            Just("membership".to_string()),
            Just("cluster_id".to_string()),
            Just("at_rest_master_key".to_string()),
            name(),
        ];
        prop_oneof![
            (meta_key, bytes()).prop_map(|(key, value)| Record::Meta { key, value }),
            (name(), bytes()).prop_map(|(name, value)| Record::Namespace { name, value }),
            (name(), bytes()).prop_map(|(ns, value)| {
                let mut key = ns.into_bytes();
                key.push(0);
                key.extend(b"id");
                Record::Memory { key, value }
            }),
            (bytes(), bytes()).prop_map(|(key, value)| Record::Memory { key, value }),
            (name(), bytes()).prop_map(|(key, value)| Record::Idempotency { key, value }),
            (any::<u64>(), name()).prop_map(|(at_ms, key)| Record::IdemExpiry { at_ms, key }),
            (0u8..4, name(), bytes()).prop_map(|(table, key, value)| Record::Auth { table, key, value }),
            (0u8..3, name(), bytes()).prop_map(|(table, key, value)| Record::Model { table, key, value }),
            (any::<u64>(), proptest::collection::vec(any::<u8>(), 64..=64))
                .prop_map(|(index, value)| Record::Ledger { index, value }),
            (name(), bytes()).prop_map(|(namespace, value)| Record::DataKey { namespace, value }),
            (name(), bytes()).prop_map(|(key, value)| Record::Erased { key, value }),
        ]
    }

    /// Every reader of a loaded state, which must answer or refuse but never panic.
    fn read_everything(db: Database) {
        let reader = crate::storage::StateReader::new(std::sync::Arc::new(db));
        let _ = reader.digest();
        let _ = reader.applied_log_id();
        let _ = reader.cluster_id();
        let _ = reader.keys();
        let _ = reader.all_roles();
        let _ = reader.quotas();
        let _ = reader.retention_rules();
        let _ = reader.next_expiry();
        let _ = reader.expired(u64::MAX, 100);
        let _ = reader.data_keys();
        if let Ok(all) = reader.namespaces() {
            for ns in all {
                let _ = reader.list(&ns.name, None, 100, 0);
                let _ = reader.policy(&ns.name);
                let _ = reader.stats(&ns.name);
                let _ = reader.namespace_cut(&ns.name);
            }
        }
        let _ = reader.get("a/b", "id");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: std::env::var("ENGRAM_FUZZ_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(64),
            ..Default::default()
        })]

        /// Fuzz target (dump records, snapshot stream): a well-framed dump of hostile rows loads
        /// or is refused, and whatever loaded reads back without a panic.
        #[test]
        fn hostile_rows_in_a_well_framed_dump_never_panic(records in proptest::collection::vec(record(), 0..12)) {
            let dump = hostile(&records);
            let _ = check(dump.as_slice());
            let db = Database::builder().create_with_backend(InMemoryBackend::new()).unwrap();
            let txn = db.begin_write().unwrap();
            let loaded = load(dump.as_slice(), &txn, &Vault::off());
            if loaded.is_ok() {
                txn.commit().unwrap();
                read_everything(db);
            }
        }

        /// Fuzz target (dump framing): any edit of a real dump's bytes is refused by `check`
        /// and by `load`, without a panic and without a hostile length allocating.
        #[test]
        fn edited_dump_bytes_are_refused(at in 0usize..4096, edit in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..16), kind in 0u8..3) {
            let good = dump_of(DUMP_FORMAT, b"\x01body");
            let at = at % good.len();
            let mut d = good.clone();
            match kind {
                0 => {
                    let end = (at + edit.len()).min(d.len());
                    d[at..end].copy_from_slice(&edit[..end - at]);
                }
                1 => d.truncate(at),
                _ => { d.splice(at..at, edit.iter().copied()); }
            }
            proptest::prop_assume!(d != good);
            proptest::prop_assert!(check(d.as_slice()).is_err());
            let db = Database::builder().create_with_backend(InMemoryBackend::new()).unwrap();
            let txn = db.begin_write().unwrap();
            proptest::prop_assert!(load(d.as_slice(), &txn, &Vault::off()).is_err());
        }
    }
}
