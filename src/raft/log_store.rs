//! The Raft log in redb: entries, vote, committed and purged log ids.
//!
//! Durability: every mutation commits a redb write transaction with
//! `Durability::Immediate` (fsync) before it returns or calls back, as openraft requires for
//! vote, append, truncate and purge. All redb work runs on the blocking pool.
//!
//! ```text
//! log     u64 index -> ROW_V1 | bincode(Entry)
//! meta    "vote" | "committed" | "purged" -> bincode(..)
//! format  "format" -> u32   (see `storage::format`; a log of format 0 is upgraded at open)
//! ```

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::types::{Entry, LogId, TypeConfig, Vote};
use crate::error::StorageError;
use crate::storage::codec;
use crate::storage::format::LOG_FORMAT;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "purged";

/// Cheap to clone: all clones share one redb database.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    /// The chaos harness's fsync canary: while closed, the file's syncs do nothing; it is
    /// opened only for a vote. `None` in every normal store.
    sync_gate: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl LogStore {
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        Self::init(Database::create(path)?, path, None)
    }

    /// Breaks durability on purpose: every log write but a vote is acknowledged without an
    /// fsync (it reaches the file, and the page cache, but no disk), so a power loss loses
    /// acknowledged entries and a process crash does not. Only the chaos harness's fsync
    /// canary opens a log so (`--unsafe-ack-before-fsync`); its crash nemesis must catch it.
    #[cfg(feature = "canary")]
    pub fn open_ack_before_fsync(path: &Path) -> Result<Self, StorageError> {
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        let gate = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let backend = super::canary_backend::AckBeforeFsync::new(file, gate.clone())?;
        Self::init(Database::builder().create_with_backend(backend)?, path, Some(gate))
    }

    fn init(
        db: Database,
        path: &Path,
        sync_gate: Option<Arc<std::sync::atomic::AtomicBool>>,
    ) -> Result<Self, StorageError> {
        // A newer format is refused in `ensure`, before anything is written; a node checks both
        // files read-only first (`server::start`), so a refused start leaves every byte.
        let mut txn = db.begin_write()?;
        crate::storage::set_durable(&mut txn, "log")?;
        let empty = {
            use redb::ReadableTableMetadata;
            txn.open_table(LOG)?.is_empty()? && txn.open_table(META)?.is_empty()?
        };
        crate::storage::format::ensure(&txn, path, LOG_FORMAT, empty, |txn| {
            crate::storage::format::prefix_u64_rows(txn, LOG, codec::ROW_V1)
        })?;
        txn.commit()?;
        Ok(LogStore { db: Arc::new(db), sync_gate })
    }

    /// The entries with indexes in `range`, read synchronously (start-up, before Raft runs).
    pub fn entries(&self, range: impl RangeBounds<u64>) -> Result<Vec<Entry>, StorageError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(LOG)?;
        let mut out = Vec::new();
        for item in table.range::<u64>(to_range(&range))? {
            let (_, v) = item?;
            out.push(codec::decode_row("log", v.value())?);
        }
        Ok(out)
    }

    /// The index the log was purged through (`None`: never purged), read synchronously.
    pub fn purged_through(&self) -> Result<Option<u64>, StorageError> {
        let txn = self.db.begin_read()?;
        let purged: Option<LogId> =
            txn.open_table(META)?.get(PURGED)?.map(|v| codec::decode("log", v.value())).transpose()?;
        Ok(purged.map(|l| l.index))
    }

    /// Seeds an empty log for a node restored from a backup: everything up to `purged` is
    /// committed and covered by the restored state; `vote` is where elections resume.
    pub fn seed_restored(&self, vote: &Vote, purged: &LogId) -> Result<(), StorageError> {
        let mut txn = self.db.begin_write()?;
        crate::storage::set_durable(&mut txn, "log")?;
        {
            if txn.open_table(LOG)?.iter()?.next().is_some() {
                return Err(StorageError::Corrupt { table: "log", reason: "a restored log must start empty".into() });
            }
            let mut meta = txn.open_table(META)?;
            meta.insert(VOTE, codec::encode(vote).as_slice())?;
            meta.insert(PURGED, codec::encode(purged).as_slice())?;
            meta.insert(COMMITTED, codec::encode(&Some(*purged)).as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Runs `f` in one durable write transaction on the blocking pool; `op` names it in
    /// `engram_raft_log_syncs_total`.
    async fn write<F>(&self, op: &'static str, f: F) -> Result<(), io::Error>
    where
        F: FnOnce(&redb::WriteTransaction) -> Result<(), StorageError> + Send + 'static,
    {
        metrics::counter!("engram_raft_log_syncs_total", "op" => op).increment(1);
        let db = self.db.clone();
        let gate = self.sync_gate.clone();
        tokio::task::spawn_blocking(move || -> Result<(), StorageError> {
            use std::sync::atomic::Ordering;
            let mut txn = db.begin_write()?;
            crate::storage::set_durable(&mut txn, "log")?;
            f(&txn)?;
            // Write transactions are exclusive: only this commit's syncs pass the open gate.
            if let Some(g) = &gate {
                g.store(op == VOTE, Ordering::Release);
            }
            let done = txn.commit();
            if let Some(g) = &gate {
                g.store(false, Ordering::Release);
            }
            done?;
            Ok(())
        })
        .await
        .map_err(io::Error::other)?
        .map_err(io::Error::from)
    }

    async fn read_meta<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        key: &'static str,
    ) -> Result<Option<T>, io::Error> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || -> Result<Option<T>, StorageError> {
            let txn = db.begin_read()?;
            let table = txn.open_table(META)?;
            match table.get(key)? {
                Some(v) => Ok(Some(codec::decode("log.meta", v.value())?)),
                None => Ok(None),
            }
        })
        .await
        .map_err(io::Error::other)?
        .map_err(io::Error::from)
    }

    async fn put_meta<T: serde::Serialize>(&self, key: &'static str, value: &T) -> Result<(), io::Error> {
        let bytes = codec::encode(value);
        self.write(key, move |txn| {
            txn.open_table(META)?.insert(key, bytes.as_slice())?;
            Ok(())
        })
        .await
    }
}

fn to_range<RB: RangeBounds<u64>>(range: &RB) -> (Bound<u64>, Bound<u64>) {
    (range.start_bound().cloned(), range.end_bound().cloned())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let bounds = to_range(&range);
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.entries(bounds))
            .await
            .map_err(io::Error::other)?
            .map_err(io::Error::from)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        self.read_meta(VOTE).await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let purged: Option<LogId> = self.read_meta(PURGED).await?;
        let db = self.db.clone();
        let last: Option<LogId> = tokio::task::spawn_blocking(move || -> Result<Option<LogId>, StorageError> {
            let txn = db.begin_read()?;
            let table = txn.open_table(LOG)?;
            let last = match table.last()? {
                Some((_, v)) => Some(codec::decode_row::<Entry>("log", v.value())?.log_id()),
                None => None,
            };
            Ok(last)
        })
        .await
        .map_err(io::Error::other)??;
        Ok(LogState { last_log_id: last.or(purged), last_purged_log_id: purged })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.put_meta(VOTE, vote).await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        self.put_meta(COMMITTED, &committed).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.read_meta::<Option<LogId>>(COMMITTED).await?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let encoded: Vec<(u64, Vec<u8>)> = entries.into_iter().map(|e| (e.index(), codec::encode_row(&e))).collect();
        let n = encoded.len() as u64;
        let res = self
            .write("append", move |txn| {
                let mut table = txn.open_table(LOG)?;
                for (index, bytes) in &encoded {
                    table.insert(*index, bytes.as_slice())?;
                }
                Ok(())
            })
            .await;
        metrics::counter!("engram_raft_log_appended_entries_total").increment(n);
        metrics::histogram!("engram_raft_log_append_batch_entries").record(n as f64);
        // The transaction above committed durably (or failed) before the callback fires.
        match res {
            Ok(()) => {
                callback.io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.io_completed(Err(io::Error::new(e.kind(), e.to_string())));
                Err(e)
            }
        }
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map(|l| l.index() + 1).unwrap_or(0);
        self.write("truncate", move |txn| {
            txn.open_table(LOG)?.retain_in::<u64, _>(from.., |_, _| false)?;
            Ok(())
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let upto = log_id.index();
        let bytes = codec::encode(&log_id);
        self.write("purge", move |txn| {
            // The purged marker and the deletion commit together.
            txn.open_table(META)?.insert(PURGED, bytes.as_slice())?;
            txn.open_table(LOG)?.retain_in::<u64, _>(..=upto, |_, _| false)?;
            Ok(())
        })
        .await
    }
}

impl crate::storage::ledger::LogSource for LogStore {
    fn entries(&self, from: u64, to: u64) -> Result<Vec<Entry>, StorageError> {
        LogStore::entries(self, from..=to)
    }

    fn purged_through(&self) -> Result<Option<u64>, StorageError> {
        LogStore::purged_through(self)
    }
}
