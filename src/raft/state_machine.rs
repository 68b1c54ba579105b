//! The redb state machine: applies committed entries, builds and installs snapshots.
//!
//! Each `apply` call commits one redb transaction that holds the data changes, the last
//! applied log id and the membership together, so a crash never separates them. Responses
//! are sent only after that commit.
//!
//! Applies are fsynced at most every `sync_interval` (0: every apply). This is safe because
//! the state machine is a cache of the durable log: after a crash redb rolls back to its
//! last durable commit (a consistent cut, applied id included), and openraft re-installs a
//! newer snapshot if there is one and re-applies the committed entries from the log. Purging
//! only ever happens behind a snapshot that was fsynced first. Snapshot installs are always
//! fsynced.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::{Stream, TryStreamExt};
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use redb::{Database, Durability, ReadableDatabase, WriteTransaction};

use super::apply::{apply_command, NewKey};
use super::snapshot::{SnapshotData, SnapshotFiles};
use super::types::{CommandResult, LogId, Outcome, SnapshotMeta, StoredMembership, TypeConfig};
use crate::error::StorageError;
use crate::storage::vault::{Vault, DATA_KEYS, ERASED};
use crate::storage::{codec, IDEMPOTENCY, IDEM_EXPIRY, MEMORIES, META_APPLIED, META_MEMBERSHIP, NAMESPACES, SM_META};
use crate::vector::{Changes, OpenReport, VectorOp, VectorOptions, VectorStore};

pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, SnapshotData>;

/// Cheap to clone: clones share the database.
#[derive(Clone)]
pub struct StateMachineStore {
    db: Arc<Database>,
    snapshots: SnapshotFiles,
    /// Serializes publishing the current snapshot: a build (spawned by openraft) may overlap
    /// an install on the same node.
    snapshot_lock: Arc<std::sync::Mutex<()>>,
    sync_interval: std::time::Duration,
    last_sync: Arc<std::sync::Mutex<std::time::Instant>>,
    /// The vector view of this state; updated before apply results are released.
    vectors: Arc<VectorStore>,
    /// Vector shards are written to index files at most this often (`None`: only on demand).
    checkpoint_every: Option<std::time::Duration>,
    last_checkpoint: Arc<std::sync::Mutex<std::time::Instant>>,
    /// Bumped after every commit that changed keys, roles or quotas (and every snapshot
    /// install), so caches of the auth state know when to reload.
    auth_generation: Arc<std::sync::atomic::AtomicU64>,
    /// Memory writes since the last snapshot (see `compaction::SnapshotPace`).
    pace: Arc<super::compaction::SnapshotPace>,
    /// State digests at the marks this node applied.
    marks: super::marks::Marks,
    /// The master keyring and the data keys of this state (see `storage::vault`).
    vault: Arc<Vault>,
}

impl StateMachineStore {
    /// Opens (or creates) the state machine; applies are fsynced at most every `sync_interval`.
    pub fn open(path: &Path, snapshot_path: PathBuf) -> Result<Self, StorageError> {
        Self::open_with(path, snapshot_path, std::time::Duration::ZERO, VectorOptions::default(), None, Vault::off())
    }

    /// Opens the state machine; `checkpoint_every` paces vector index files (written to
    /// `vectors.dir`), `None` writes them only when [`checkpoint`](Self::checkpoint) is called.
    pub fn open_with(
        path: &Path,
        snapshot_path: PathBuf,
        sync_interval: std::time::Duration,
        vectors: VectorOptions,
        checkpoint_every: Option<std::time::Duration>,
        vault: Arc<Vault>,
    ) -> Result<Self, StorageError> {
        // A newer format is refused in `ensure` (and read-only before, by `server::start`).
        let db = Database::create(path)?;
        let mut txn = db.begin_write()?;
        crate::storage::set_durable(&mut txn, "state")?;
        txn.open_table(MEMORIES)?;
        txn.open_table(NAMESPACES)?;
        txn.open_table(IDEMPOTENCY)?;
        txn.open_table(IDEM_EXPIRY)?;
        txn.open_table(SM_META)?;
        for (_, table) in crate::storage::AUTH_TABLES.iter().chain(crate::storage::MODEL_TABLES.iter()) {
            txn.open_table(*table)?;
        }
        let empty = {
            use redb::ReadableTableMetadata;
            txn.open_table(SM_META)?.is_empty()? && txn.open_table(MEMORIES)?.is_empty()?
        };
        crate::storage::format::ensure(&txn, path, crate::storage::format::STATE_FORMAT, empty, |txn| {
            let mut rows = 0;
            for table in crate::storage::VERSIONED_TABLES {
                rows += crate::storage::format::prefix_str_rows(txn, table, crate::storage::codec::ROW_V1)?;
            }
            Ok(rows)
        })?;
        // Every data key must open with this node's master keyring before anything else reads
        // the state: a wrong or missing key stops the node here, with nothing changed.
        txn.open_table(DATA_KEYS)?;
        txn.open_table(ERASED)?;
        let keys = crate::storage::vault::rows(&txn.open_table(DATA_KEYS)?)?;
        vault
            .load(&keys)
            .map_err(|e| StorageError::Format { file: path.display().to_string(), reason: e.to_string() })?;
        vault.note_cluster_kek(crate::storage::vault::cluster_kek(&txn)?);
        // A state machine from before the derived indexes gets them now.
        if crate::storage::index::needs_rebuild(&txn)? {
            let n = crate::storage::index::rebuild(&txn, &vault)?;
            tracing::info!(memories = n, "built the content, expiry and age indexes");
        }
        txn.commit()?;
        let db = Arc::new(db);
        let vectors =
            Arc::new(VectorStore::new(crate::storage::StateReader::with_vault(db.clone(), vault.clone()), vectors));
        Ok(StateMachineStore {
            db,
            snapshots: SnapshotFiles::open(snapshot_path)?,
            snapshot_lock: Arc::default(),
            sync_interval,
            last_sync: Arc::new(std::sync::Mutex::new(std::time::Instant::now())),
            vectors,
            checkpoint_every,
            last_checkpoint: Arc::new(std::sync::Mutex::new(std::time::Instant::now())),
            auth_generation: Arc::default(),
            pace: Arc::default(),
            marks: Default::default(),
            vault,
        })
    }

    /// This state's master keyring and data keys.
    pub fn vault(&self) -> Arc<Vault> {
        self.vault.clone()
    }

    pub fn database(&self) -> Arc<Database> {
        self.db.clone()
    }

    /// When this node should take its next snapshot.
    pub fn snapshot_pace(&self) -> Arc<super::compaction::SnapshotPace> {
        self.pace.clone()
    }

    /// The state digests at the marks this node applied.
    pub fn marks(&self) -> super::marks::Marks {
        self.marks.clone()
    }

    /// The auth state's generation (see the field).
    pub fn auth_generation(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.auth_generation.clone()
    }

    /// Where this node's snapshots live.
    pub fn snapshot_files(&self) -> SnapshotFiles {
        self.snapshots.clone()
    }

    /// The vector shards fed by this state machine.
    pub fn vectors(&self) -> Arc<VectorStore> {
        self.vectors.clone()
    }

    /// Rebuilds the vector shards from the state on disk (snapshot install).
    pub fn rebuild_vectors(&self) -> Result<(), io::Error> {
        self.vectors.rebuild().map_err(|e| io::Error::other(e.to_string()))
    }

    /// Start-up: loads the vector shards from their index files, caught up with the log
    /// entries applied since they were written, or rebuilds them from the state.
    pub fn open_vectors(&self, log: &super::log_store::LogStore) -> Result<OpenReport, io::Error> {
        let changes = |from: u64, to: u64| -> Result<Option<Changes>, StorageError> {
            let entries = log.entries(from..=to)?;
            let contiguous = entries.first().is_some_and(|e| e.index() == from)
                && entries.len() as u64 == to - from + 1
                && entries.windows(2).all(|w| w[1].index() == w[0].index() + 1);
            if !contiguous {
                return Ok(None);
            }
            let mut changes = Changes::default();
            for entry in &entries {
                if let EntryPayload::Normal(cmd) = &entry.payload {
                    super::apply::touched(cmd, &mut changes, &self.vault);
                }
            }
            Ok(Some(changes))
        };
        self.vectors.open(changes).map_err(|e| io::Error::other(e.to_string()))
    }

    /// Makes every applied entry durable, then writes the vector shards that changed to
    /// index files at that applied index (shutdown, and periodically from `apply`).
    pub fn checkpoint(&self) -> Result<Option<u64>, io::Error> {
        let mut txn = self.db.begin_write().map_err(StorageError::from)?;
        set_durable(&mut txn)?;
        txn.commit().map_err(StorageError::from)?;
        *self.last_checkpoint.lock().unwrap_or_else(|p| p.into_inner()) = std::time::Instant::now();
        self.vectors.checkpoint().map_err(|e| io::Error::other(e.to_string()))
    }

    fn read_applied_state(db: &Database) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        crate::storage::dump::head(&db.begin_read()?)
    }

    /// Applies a batch of entries in one durable transaction; returns one result per entry.
    fn apply_batch(
        db: &Database,
        entries: &[super::types::Entry],
        durable: bool,
        ops: &mut Vec<VectorOp>,
        vectors: &VectorStore,
        vault: &Vault,
    ) -> Result<Vec<CommandResult>, StorageError> {
        let mut txn = db.begin_write()?;
        if durable {
            set_durable(&mut txn)?;
        } else {
            txn.set_durability(Durability::None)
                .map_err(|e| StorageError::Corrupt { table: "sm", reason: e.to_string() })?;
        }
        // An entry that may install a data key is alone in its transaction (see `parts`): a
        // savepoint taken before anything is written undoes the key if its op does not keep it.
        let savepoint = match entries {
            [e] if installs_key(e).is_some() => Some(
                txn.ephemeral_savepoint().map_err(|e| StorageError::Corrupt { table: "sm", reason: e.to_string() })?,
            ),
            _ => None,
        };
        let mut results = Vec::with_capacity(entries.len());
        let mut last_membership = None;
        for entry in entries {
            let index = entry.index();
            let result = match &entry.payload {
                EntryPayload::Blank => CommandResult { index, outcome: Outcome::None },
                EntryPayload::Normal(cmd) => {
                    let installing = match (super::apply::installs_key(cmd), &savepoint) {
                        (Some(ns), Some(_)) if !super::apply::has_data_key(&txn, ns)? => Some(ns),
                        _ => None,
                    };
                    let before = ops.len();
                    let result = apply_command(&txn, index, cmd, ops, vectors, vault, NewKey::Install)?;
                    match (installing, &savepoint) {
                        (Some(ns), Some(sp)) if !super::apply::keeps_key(&txn, ns, &result)? => {
                            // Not kept: back to before the entry, and once more without the key
                            // (the same refusal, remembered as any is).
                            txn.restore_savepoint(sp)
                                .map_err(|e| StorageError::Corrupt { table: "sm", reason: e.to_string() })?;
                            vault.remove(ns);
                            ops.truncate(before);
                            apply_command(&txn, index, cmd, ops, vectors, vault, NewKey::Skip)?
                        }
                        _ => result,
                    }
                }
                EntryPayload::Membership(m) => {
                    last_membership = Some(StoredMembership::new(Some(entry.log_id()), m.clone()));
                    CommandResult { index, outcome: Outcome::None }
                }
            };
            results.push(result);
        }
        // Every applied entry extends the hash chain, in the transaction that applied it.
        crate::storage::ledger::extend(&txn, entries)?;
        {
            let mut meta = txn.open_table(SM_META)?;
            if let Some(last) = entries.last() {
                meta.insert(META_APPLIED, codec::encode(&last.log_id()).as_slice())?;
            }
            if let Some(m) = &last_membership {
                meta.insert(META_MEMBERSHIP, codec::encode(m).as_slice())?;
            }
        }
        txn.commit()?;
        // Keys an erasure removed: committed now, so no reader needs them any more.
        vault.forget_removed();
        Ok(results)
    }
}

/// An entry whose sealed op carries a new data key.
fn installs_key(e: &super::types::Entry) -> Option<&str> {
    match &e.payload {
        EntryPayload::Normal(c) => super::apply::installs_key(c),
        _ => None,
    }
}

/// The transactions a batch is applied in: a mark ends one (a read right after it sees the
/// state at its index exactly), and an entry that may install a data key has one of its own.
fn parts(batch: &[super::types::Entry]) -> Vec<&[super::types::Entry]> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, e) in batch.iter().enumerate() {
        if installs_key(e).is_some() {
            if start < i {
                out.push(&batch[start..i]);
            }
            out.push(&batch[i..=i]);
            start = i + 1;
        } else if mark_id(e).is_some() {
            out.push(&batch[start..=i]);
            start = i + 1;
        }
    }
    if start < batch.len() {
        out.push(&batch[start..]);
    }
    out
}

/// The id of a mark entry.
fn mark_id(e: &super::types::Entry) -> Option<&str> {
    match &e.payload {
        EntryPayload::Normal(c) => match &c.op {
            super::types::Op::Mark { id } => Some(id),
            _ => None,
        },
        _ => None,
    }
}

fn checkpoint_failed(e: &crate::vector::store::VectorStoreError) {
    metrics::counter!("engram_vector_checkpoint_failures_total").increment(1);
    tracing::warn!(error = %e, "vector checkpoint failed");
}

fn set_durable(txn: &mut WriteTransaction) -> Result<(), StorageError> {
    crate::storage::set_durable(txn, "sm")
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, io::Error> {
    tokio::task::spawn_blocking(f).await.map_err(io::Error::other)?.map_err(io::Error::from)
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let this = self.clone();
        let started = std::time::Instant::now();
        self.pace.building();
        let (meta, data, summary) = blocking(move || {
            let (meta, mut data, summary) = this.snapshots.build(&this.db)?;
            let _guard = this.snapshot_lock.lock().unwrap_or_else(|p| p.into_inner());
            this.snapshots.publish(&meta, &mut data)?;
            Ok((meta, data, summary))
        })
        .await?;
        let bytes = data.len()?;
        self.pace.built(summary.memories);
        metrics::histogram!("engram_snapshot_build_seconds").record(started.elapsed().as_secs_f64());
        metrics::gauge!("engram_snapshot_bytes").set(bytes as f64);
        tracing::info!(last_log_id = ?meta.last_log_id, rows = summary.rows, bytes, "built snapshot");
        Ok(Snapshot { meta, snapshot: data })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let db = self.db.clone();
        blocking(move || Self::read_applied_state(&db)).await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let mut batch = Vec::new();
        let mut responders = Vec::new();
        while let Some((entry, responder)) = entries.try_next().await? {
            batch.push(entry);
            responders.push(responder);
        }
        if batch.is_empty() {
            return Ok(());
        }
        let n = batch.len() as u64;
        // A checkpoint's index files must never be ahead of the durable state: its batch is
        // fsynced.
        let checkpoint_due = self.checkpoint_every.is_some_and(|every| {
            let mut last = self.last_checkpoint.lock().unwrap_or_else(|p| p.into_inner());
            let due = last.elapsed() >= every;
            if due {
                *last = std::time::Instant::now();
            }
            due
        });
        let durable = {
            let mut last = self.last_sync.lock().unwrap_or_else(|p| p.into_inner());
            let due = checkpoint_due || last.elapsed() >= self.sync_interval;
            if due {
                *last = std::time::Instant::now();
            }
            due
        };
        let db = self.db.clone();
        let vectors = self.vectors.clone();
        let vault = self.vault.clone();
        let last_index = batch.last().map(|e| e.index()).unwrap_or_default();
        let auth_changed = batch.iter().any(|e| matches!(&e.payload, EntryPayload::Normal(c) if c.op.changes_auth()));
        let generation = self.auth_generation.clone();
        let pace = self.pace.clone();
        let marks = self.marks.clone();
        // Traced writes proposed here (they have a responder) make this batch's span.
        let span = crate::telemetry::apply_span(
            batch.iter().zip(&responders).filter_map(|(e, r)| match &e.payload {
                EntryPayload::Normal(c) if r.is_some() => Some(c),
                _ => None,
            }),
            batch.len(),
            last_index,
        );
        let (results, frozen) = blocking(move || {
            let _apply = span.enter();
            let mut ops = Vec::new();
            // A mark ends its own transaction, so a read right after it sees the state at its
            // index exactly (see `marks`).
            let mut results = Vec::with_capacity(batch.len());
            for part in parts(&batch) {
                results.extend(Self::apply_batch(&db, part, durable, &mut ops, &vectors, &vault)?);
                if let Some((id, last)) = part.last().and_then(|e| Some((mark_id(e)?, e.index()))) {
                    marks.digest_later(id.to_string(), last, db.begin_read()?);
                }
            }
            pace.wrote((ops.len() as u64).max(n));
            // Committed: readers that see the new generation see the new auth state.
            if auth_changed {
                generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            // A vector-index failure leaves search unable to see a committed write: fatal.
            let _update = crate::trace_span!(parent: &span, "vector.update", ops = ops.len()).entered();
            vectors
                .apply(&ops, last_index)
                .map_err(|e| StorageError::Corrupt { table: "vectors", reason: e.to_string() })?;
            // A checkpoint copies the shards here, right after this fsynced batch, so its
            // files are never ahead of the durable state; writing them happens elsewhere.
            let frozen = match checkpoint_due.then(|| vectors.freeze()) {
                Some(Ok(f)) => f,
                Some(Err(e)) => {
                    checkpoint_failed(&e);
                    None
                }
                None => None,
            };
            Ok((results, frozen))
        })
        .await?;
        metrics::counter!("engram_sm_applied_entries_total").increment(n);
        metrics::histogram!("engram_sm_apply_batch_entries").record(n as f64);
        // The transaction is durable; only now may anyone learn the results.
        for (responder, result) in responders.into_iter().zip(results) {
            if let Some(r) = responder {
                r.send(result);
            }
        }
        if let Some(frozen) = frozen {
            // Index files are a cache: failing to write them costs a rebuild at start, not
            // data. Applies go on while they are written (one checkpoint writes at a time).
            let vectors = self.vectors.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = vectors.write_frozen(frozen) {
                    checkpoint_failed(&e);
                }
            });
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, mut snapshot: SnapshotData) -> Result<(), io::Error> {
        let this = self.clone();
        let meta = meta.clone();
        let started = std::time::Instant::now();
        let summary = blocking(move || {
            // Check the whole file before touching anything: a bad transfer leaves this node
            // as it was.
            if snapshot.meta()? != meta {
                return Err(StorageError::Corrupt { table: "snapshot", reason: "header does not match meta".into() });
            }
            // The vector index files go first: after a crash mid-install the log below the
            // snapshot may be gone or hold entries the snapshot superseded, so the files could
            // not be caught up safely. Without them the next start rebuilds from the state.
            this.vectors
                .forget_files()
                .map_err(|e| StorageError::Corrupt { table: "vectors", reason: e.to_string() })?;
            // The state next, in one transaction: a crash before its commit leaves the previous
            // state whole. The snapshot file is published after it, so the current snapshot
            // never runs ahead of a state that failed to install.
            let summary = super::snapshot::install(&this.db, &meta, &snapshot, &this.vault)?;
            this.auth_generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _guard = this.snapshot_lock.lock().unwrap_or_else(|p| p.into_inner());
            this.snapshots.publish(&meta, &mut snapshot)?;
            Ok(summary)
        })
        .await?;
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.rebuild_vectors()).await.map_err(io::Error::other)??;
        metrics::histogram!("engram_snapshot_install_seconds").record(started.elapsed().as_secs_f64());
        self.pace.building();
        self.pace.built(summary.memories);
        tracing::info!(rows = summary.rows, memories = summary.memories, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let files = self.snapshots.clone();
        let current = blocking(move || files.current()).await?;
        Ok(current.map(|(meta, data)| Snapshot { meta, snapshot: data }))
    }
}
