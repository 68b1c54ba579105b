//! The ledger: a hash chain over every log entry the state machine applied.
//!
//! ```text
//! ledger   index -> entry_hash (32) | head (32)
//! entry_hash = BLAKE3-derive("engram ledger entry v1", bincode(Entry))   the log's own bytes
//! head_i     = BLAKE3-derive("engram ledger chain v1", head_prev | index_i LE | entry_hash_i)
//! ```
//!
//! `head_prev` is the head of the row before (all zeros for the first row). A row is written
//! in the same transaction that applies its entry, so the ledger always ends at the applied
//! index, and every replica that applied the same entries holds the same rows. Rows are never
//! purged with the log: they travel in snapshots and backups (dump format 4), so a node that
//! joined from a snapshot holds the history before it too. A state machine from before the
//! ledger starts its chain at the first entry it applies after the upgrade; a dump of format
//! 2 or 3 (no ledger rows) does the same from its applied index.
//!
//! [`verify`] recomputes every link of the chain and, for every row whose entry the log still
//! holds, the entry hash from the log's bytes; the first mismatch is reported with its index.
//! The chain costs 64 bytes per applied entry (plus redb's overhead) and one BLAKE3 pass over
//! each entry's encoding in `apply`.

use redb::{ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};

use crate::error::StorageError;
use crate::raft::Entry;

pub const LEDGER: TableDefinition<u64, &[u8]> = TableDefinition::new("ledger");

const ENTRY_CONTEXT: &str = "engram ledger entry v1";
const CHAIN_CONTEXT: &str = "engram ledger chain v1";

/// One row of the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    pub index: u64,
    pub entry_hash: [u8; 32],
    pub head: [u8; 32],
}

impl Link {
    fn encode(&self) -> [u8; 64] {
        let mut v = [0u8; 64];
        v[..32].copy_from_slice(&self.entry_hash);
        v[32..].copy_from_slice(&self.head);
        v
    }

    fn decode(index: u64, v: &[u8]) -> Result<Link, StorageError> {
        if v.len() != 64 {
            return Err(StorageError::Corrupt {
                table: "ledger",
                reason: format!("row {index} has {} bytes, not 64", v.len()),
            });
        }
        let (e, h) = v.split_at(32);
        Ok(Link { index, entry_hash: e.try_into().expect("32 bytes"), head: h.try_into().expect("32 bytes") })
    }
}

/// The hash of one log entry: of the bincode the log stores it as.
pub fn entry_hash(entry: &Entry) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key(ENTRY_CONTEXT);
    bincode::serialize_into(&mut h, entry).expect("bincode into a hasher cannot fail");
    *h.finalize().as_bytes()
}

/// The head after appending the entry at `index` with hash `entry_hash` to a chain at `prev`.
pub fn chain(prev: &[u8; 32], index: u64, entry_hash: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key(CHAIN_CONTEXT);
    h.update(prev);
    h.update(&index.to_le_bytes());
    h.update(entry_hash);
    *h.finalize().as_bytes()
}

/// Appends a row per entry to the chain, inside the transaction that applies them. Entries
/// must come after the ledger's last row (as applied entries do).
pub fn extend(txn: &WriteTransaction, entries: &[Entry]) -> Result<(), StorageError> {
    let mut table = txn.open_table(LEDGER)?;
    let (mut last, mut head) = match table.last()? {
        Some((k, v)) => {
            let link = Link::decode(k.value(), v.value())?;
            (Some(link.index), link.head)
        }
        None => (None, [0u8; 32]),
    };
    for entry in entries {
        let index = entry.log_id.index;
        if let Some(last) = last.filter(|l| index <= *l) {
            return Err(StorageError::Corrupt {
                table: "ledger",
                reason: format!("entry {index} applied again after the ledger's row {last}"),
            });
        }
        let entry_hash = entry_hash(entry);
        head = chain(&head, index, &entry_hash);
        table.insert(index, Link { index, entry_hash, head }.encode().as_slice())?;
        last = Some(index);
    }
    Ok(())
}

/// The last row, if any.
pub fn last(txn: &ReadTransaction) -> Result<Option<Link>, StorageError> {
    let Some(t) = super::optional_table(txn, LEDGER)? else { return Ok(None) };
    let last = t.last()?.map(|(k, v)| Link::decode(k.value(), v.value())).transpose();
    last
}

/// The row at `index`, if the ledger has one.
pub fn at(txn: &ReadTransaction, index: u64) -> Result<Option<Link>, StorageError> {
    let Some(t) = super::optional_table(txn, LEDGER)? else { return Ok(None) };
    t.get(index)?.map(|v| Link::decode(index, v.value())).transpose()
}

/// Up to `limit` rows with indexes in `from..=to`, in order.
pub fn range(txn: &ReadTransaction, from: u64, to: u64, limit: usize) -> Result<Vec<Link>, StorageError> {
    let Some(t) = super::optional_table(txn, LEDGER)? else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for item in t.range(from..=to)?.take(limit) {
        let (k, v) = item?;
        out.push(Link::decode(k.value(), v.value())?);
    }
    Ok(out)
}

/// A ledger that checked out (the default: an empty one).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Verified {
    /// Rows checked (0: no ledger yet).
    pub rows: u64,
    pub first: u64,
    pub last: u64,
    pub head: [u8; 32],
    /// Rows whose entry hash was recomputed from the log (the rest were purged from it).
    pub against_log: u64,
}

/// Where a ledger stopped checking out.
#[derive(Debug, Clone, PartialEq)]
pub struct Broken {
    pub index: u64,
    pub reason: String,
}

/// What [`verify`] needs of the Raft log: its entries in a range and the index it was purged
/// through (read after the entries, so a purge racing the check is told apart from a hole).
pub trait LogSource {
    fn entries(&self, from: u64, to: u64) -> Result<Vec<Entry>, StorageError>;
    /// `None`: never purged.
    fn purged_through(&self) -> Result<Option<u64>, StorageError>;
}

/// Rows fetched from the log at a time.
const VERIFY_CHUNK: u64 = 512;

/// Checks the ledger `txn` sees: every head follows from the row before, the last row is the
/// applied index, and every row whose entry the log still holds has that entry's hash.
/// `Ok(Err(_))` names the first index that does not check out.
pub fn verify(txn: &ReadTransaction, log: &dyn LogSource) -> Result<Result<Verified, Broken>, StorageError> {
    let applied = super::reader::StateReader::applied(txn)?;
    let Some(t) = super::optional_table(txn, LEDGER)? else {
        return Ok(Ok(Verified::default()));
    };
    let mut v = Verified::default();
    let mut next_from = 0u64;
    loop {
        // One chunk of rows, then the log's entries for the same indexes.
        let mut rows = Vec::with_capacity(VERIFY_CHUNK as usize);
        for item in t.range(next_from..)?.take(VERIFY_CHUNK as usize) {
            let (k, val) = item?;
            match Link::decode(k.value(), val.value()) {
                Ok(link) => rows.push(link),
                Err(e) => return Ok(Err(Broken { index: k.value(), reason: e.to_string() })),
            }
        }
        let (Some(lo), Some(hi)) = (rows.first().map(|l| l.index), rows.last().map(|l| l.index)) else { break };
        let entries = log.entries(lo, hi)?;
        let purged = log.purged_through()?;
        let mut entries = entries.into_iter().peekable();
        for link in &rows {
            let want = chain(&v.head, link.index, &link.entry_hash);
            if want != link.head {
                return Ok(Err(Broken {
                    index: link.index,
                    reason: "head does not follow from the row before".into(),
                }));
            }
            while entries.peek().is_some_and(|e| e.log_id.index < link.index) {
                entries.next();
            }
            match entries.peek() {
                Some(e) if e.log_id.index == link.index => {
                    if entry_hash(e) != link.entry_hash {
                        return Ok(Err(Broken {
                            index: link.index,
                            reason: "the log's entry does not match the hash the state machine applied".into(),
                        }));
                    }
                    v.against_log += 1;
                }
                _ if purged.is_none_or(|p| link.index > p) => {
                    let through = purged.map(|p| format!("purged only through {p}")).unwrap_or("never purged".into());
                    return Ok(Err(Broken {
                        index: link.index,
                        reason: format!("the entry is missing from the log ({through})"),
                    }));
                }
                _ => {}
            }
            if v.rows == 0 {
                v.first = link.index;
            }
            v.rows += 1;
            v.last = link.index;
            v.head = link.head;
        }
        next_from = hi + 1;
    }
    if v.rows > 0 && v.last != applied {
        return Ok(Err(Broken {
            index: v.last.min(applied),
            reason: format!("the ledger ends at {} but the state machine applied {applied}", v.last),
        }));
    }
    Ok(Ok(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::types::{Command, LogId, Op};

    fn entry(index: u64, namespace: &str) -> Entry {
        let op = Op::CreateNamespace {
            namespace: namespace.into(),
            dimension: 3,
            metric: crate::memory::Metric::Cosine,
            approx_min_vectors: 64,
        };
        let leader_id = openraft::vote::leader_id_adv::LeaderId { term: 1, node_id: 1 };
        Entry { log_id: LogId { leader_id, index }, payload: openraft::EntryPayload::Normal(Command::system(op)) }
    }

    struct Log {
        entries: Vec<Entry>,
        purged: Option<u64>,
    }

    impl LogSource for Log {
        fn entries(&self, from: u64, to: u64) -> Result<Vec<Entry>, StorageError> {
            let keep =
                |e: &&Entry| (from..=to).contains(&e.log_id.index) && self.purged.is_none_or(|p| e.log_id.index > p);
            Ok(self.entries.iter().filter(keep).cloned().collect())
        }
        fn purged_through(&self) -> Result<Option<u64>, StorageError> {
            Ok(self.purged)
        }
    }

    /// A state machine that applied `entries` (ledger rows and applied id only).
    fn applied(entries: &[Entry]) -> redb::Database {
        let db = redb::Database::builder().create_with_backend(redb::backends::InMemoryBackend::new()).unwrap();
        let txn = db.begin_write().unwrap();
        extend(&txn, entries).unwrap();
        let last = entries.last().unwrap().log_id;
        txn.open_table(super::super::SM_META)
            .unwrap()
            .insert(super::super::META_APPLIED, crate::storage::codec::encode(&last).as_slice())
            .unwrap();
        txn.commit().unwrap();
        db
    }

    fn check(db: &redb::Database, log: &Log) -> Result<Verified, Broken> {
        use redb::ReadableDatabase;
        verify(&db.begin_read().unwrap(), log).unwrap()
    }

    fn set_row(db: &redb::Database, index: u64, value: &[u8]) {
        let txn = db.begin_write().unwrap();
        txn.open_table(LEDGER).unwrap().insert(index, value).unwrap();
        txn.commit().unwrap();
    }

    #[test]
    fn verify_names_the_first_index_that_does_not_check_out() {
        let entries: Vec<Entry> = (0..1500).map(|i| entry(i, &format!("ns{i}"))).collect();
        let db = applied(&entries);
        let log = Log { entries: entries.clone(), purged: None };
        let v = check(&db, &log).unwrap();
        assert_eq!((v.rows, v.first, v.last, v.against_log), (1500, 0, 1499, 1500));

        // A purged prefix is chain-checked only; a hole above the purge point is not allowed.
        let purged = Log { entries: entries.clone(), purged: Some(700) };
        assert_eq!(check(&db, &purged).unwrap().against_log, 799);
        let mut holed = log.entries.clone();
        holed.remove(900);
        let b = check(&db, &Log { entries: holed, purged: None }).unwrap_err();
        assert_eq!(b.index, 900, "{b:?}");

        // Another entry in the log at an applied index.
        let mut other = log.entries.clone();
        other[1234] = entry(1234, "not what was applied");
        let b = check(&db, &Log { entries: other, purged: None }).unwrap_err();
        assert_eq!(b.index, 1234, "{b:?}");

        // A row whose head was flipped, and the row after it (which no longer follows).
        let row = |i: u64| {
            use redb::ReadableDatabase;
            let txn = db.begin_read().unwrap();
            at(&txn, i).unwrap().unwrap()
        };
        let good = row(600);
        let mut bad = good.encode();
        bad[63] ^= 0x80;
        set_row(&db, 600, &bad);
        assert_eq!(check(&db, &log).unwrap_err().index, 600);
        // A forged entry hash with a head that follows from it still fails against the log.
        let forged = entry_hash(&entry(600, "forged"));
        let head = chain(&row(599).head, 600, &forged);
        set_row(&db, 600, &Link { index: 600, entry_hash: forged, head }.encode());
        assert_eq!(check(&db, &log).unwrap_err().index, 600);
        // ... and its successor's head no longer follows once the log is purged past it.
        let b = check(&db, &Log { entries: entries.clone(), purged: Some(1000) }).unwrap_err();
        assert_eq!(b.index, 601, "{b:?}");
        set_row(&db, 600, &good.encode());
        assert!(check(&db, &log).is_ok());

        // A row of the wrong size, and a ledger that stops short of the applied index.
        let ten = row(10);
        set_row(&db, 10, &[0u8; 63]);
        assert_eq!(check(&db, &log).unwrap_err().index, 10);
        set_row(&db, 10, &ten.encode());
        assert!(check(&db, &log).is_ok());
        let short = applied(&entries[..1000]);
        {
            let txn = short.begin_write().unwrap();
            txn.open_table(super::super::SM_META)
                .unwrap()
                .insert(super::super::META_APPLIED, crate::storage::codec::encode(&entries[1200].log_id).as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        let b = check(&short, &log).unwrap_err();
        assert!(b.reason.contains("ends at 999"), "{b:?}");
    }

    #[test]
    fn dumps_carry_the_ledger_and_refuse_one_that_does_not_end_at_the_applied_index() {
        use crate::storage::{dump, AUTH_TABLES, IDEMPOTENCY, IDEM_EXPIRY, MEMORIES, NAMESPACES, SM_META};
        use redb::ReadableDatabase;
        let entries: Vec<Entry> = (0..40).map(|i| entry(i, "a")).collect();
        let db = applied(&entries);
        let txn = db.begin_write().unwrap();
        txn.open_table(MEMORIES).unwrap();
        txn.open_table(NAMESPACES).unwrap();
        txn.open_table(IDEMPOTENCY).unwrap();
        txn.open_table(IDEM_EXPIRY).unwrap();
        txn.open_table(SM_META).unwrap();
        for (_, t) in AUTH_TABLES {
            txn.open_table(t).unwrap();
        }
        txn.commit().unwrap();
        let dump_of = |db: &redb::Database| {
            let mut out = Vec::new();
            dump::write(&db.begin_read().unwrap(), &mut out, dump::DataKeys::Include).unwrap();
            out
        };
        let load = |bytes: &[u8]| {
            let fresh = redb::Database::builder().create_with_backend(redb::backends::InMemoryBackend::new()).unwrap();
            let txn = fresh.begin_write().unwrap();
            let r = dump::load(bytes, &txn, &crate::storage::vault::Vault::off()).map(drop);
            if r.is_ok() {
                txn.commit().unwrap();
            }
            r.map(|_| fresh)
        };
        let loaded = load(&dump_of(&db)).unwrap();
        let log = Log { entries: entries.clone(), purged: None };
        assert_eq!(check(&loaded, &log).unwrap().head, check(&db, &log).unwrap().head);
        // A row past the applied index would make every later apply refuse its entry.
        set_row(&db, 41, &Link { index: 41, entry_hash: [1; 32], head: [2; 32] }.encode());
        let e = load(&dump_of(&db)).map(drop).unwrap_err();
        assert!(e.to_string().contains("ledger ends at 41"), "{e}");
    }

    #[test]
    fn extend_refuses_an_entry_applied_twice() {
        let entries: Vec<Entry> = (0..3).map(|i| entry(i, "a")).collect();
        let db = applied(&entries);
        let txn = db.begin_write().unwrap();
        assert!(extend(&txn, &entries[2..]).is_err());
    }

    #[test]
    fn heads_depend_on_every_entry_and_its_place() {
        let a = [entry(1, "a"), entry(2, "b")];
        let h1 = chain(&[0; 32], 1, &entry_hash(&a[0]));
        let h2 = chain(&h1, 2, &entry_hash(&a[1]));
        assert_ne!(h1, h2);
        // Another entry at the same index, or the same entry at another index, changes the head.
        assert_ne!(chain(&[0; 32], 1, &entry_hash(&entry(1, "c"))), h1);
        assert_ne!(chain(&[0; 32], 2, &entry_hash(&a[0])), h1);
        assert_ne!(entry_hash(&entry(1, "a")), entry_hash(&entry(2, "a")));
    }
}
