//! [`VectorStore`]: every namespace's [`Shard`] on this node, kept in step with the state
//! machine. `apply` feeds it the [`VectorOp`]s of each committed batch before the batch's
//! results are released, so a read that waits for an applied index also sees that index in
//! search.
//!
//! On start, [`open`](VectorStore::open) loads the shards from their index files (see
//! [`persist`](super::persist)) when those reflect a log index at or below the state's, then
//! re-reads from redb every memory the log entries in between touched; any namespace it cannot
//! trust (no file, a bad checksum, a different kind, a purged log gap) is rebuilt from redb.
//! After a snapshot install every shard is rebuilt. [`checkpoint`](VectorStore::checkpoint)
//! writes the shards that changed.
//!
//! A shard rebuild while running (a kind switch `apply` decided, or an HNSW compaction this
//! node decided) never holds up `apply`: a builder thread reads the namespace in one redb cut
//! at some applied index A, builds the new shard with no lock held, then, under the write
//! lock, replays the vector ops that arrived after A (apply keeps them for it) and swaps the
//! shard in. Until then the old shard keeps taking every write and answering every search.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use super::faiss::FaissKind;
use super::persist::{self, Manifest, PersistError};
use super::shard::{Filter, FrozenShard, Shard};
use super::{SearchParams, VectorError};
use crate::error::StorageError;
use crate::memory::{Memory, Metric};
use crate::progress::Logged;
use crate::storage::StateReader;

/// A change to the vector view, produced by `apply` for each state change it makes.
#[derive(Debug, Clone)]
pub enum VectorOp {
    Namespace {
        namespace: String,
        dimension: u32,
        metric: Metric,
    },
    Upsert {
        metric: Metric,
        memory: Box<Memory>,
    },
    Remove {
        namespace: String,
        id: String,
    },
    DropNamespace {
        namespace: String,
    },
    /// Rebuild the namespace's shard as `kind` from the committed state.
    Rebuild {
        namespace: String,
        kind: FaissKind,
    },
}

impl VectorOp {
    fn namespace(&self) -> &str {
        match self {
            VectorOp::Namespace { namespace, .. }
            | VectorOp::Remove { namespace, .. }
            | VectorOp::DropNamespace { namespace }
            | VectorOp::Rebuild { namespace, .. } => namespace,
            VectorOp::Upsert { memory, .. } => &memory.namespace,
        }
    }
}

/// Node-local settings of the vector view.
#[derive(Debug, Clone)]
pub struct VectorOptions {
    /// Where index files go; `None` keeps shards in memory only (rebuilt at every start).
    pub dir: Option<PathBuf>,
    /// Memories per shard part: a bigger namespace is split into parts searched in parallel.
    pub max_part: usize,
}

impl Default for VectorOptions {
    fn default() -> Self {
        VectorOptions { dir: None, max_part: 250_000 }
    }
}

/// What log entries changed, as far as vectors care: memories to re-read and namespaces to
/// rebuild.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Changes {
    pub memories: BTreeSet<(String, String)>,
    pub namespaces: BTreeSet<String>,
    /// Namespaces with puts: under a merging policy a put rewrites a twin it does not name.
    pub puts: BTreeSet<String>,
    /// Namespaces whose policy changed.
    pub policies: BTreeSet<String>,
}

/// How [`VectorStore::open`] got each namespace.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OpenReport {
    /// Namespaces loaded from index files.
    pub loaded: Vec<String>,
    /// Namespaces rebuilt from redb, with the reason.
    pub rebuilt: Vec<(String, String)>,
    /// Memories re-read from redb after loading (touched by the log since the files).
    pub caught_up: usize,
}

/// The kind a shard of `n` memories is built as: never fewer IVF training points than lists.
fn buildable(kind: FaissKind, n: usize) -> FaissKind {
    match kind {
        FaissKind::Flat | FaissKind::Hnsw { .. } => kind,
        FaissKind::Ivf { .. } if n == 0 => FaissKind::Flat,
        FaissKind::Ivf { nlist } => FaissKind::Ivf { nlist: nlist.min(n as u32) },
    }
}

struct Shards {
    map: HashMap<String, Shard>,
    /// The log index the shards reflect.
    applied: u64,
    /// Namespaces being rebuilt in the background, with the ops applied to them since.
    building: HashMap<String, Building>,
    /// Tells builds apart: a newer rebuild of a namespace makes an older one's result stale.
    generation: u64,
    /// When each namespace was last sent to compaction.
    compacted_at: HashMap<String, std::time::Instant>,
}

impl Shards {
    fn new(map: HashMap<String, Shard>, applied: u64, generation: u64) -> Shards {
        Shards { map, applied, building: HashMap::new(), generation, compacted_at: HashMap::new() }
    }
}

struct Building {
    generation: u64,
    /// The vector ops applied to the namespace since the build was asked for, with the log
    /// index of their batch: those after the build's cut are replayed onto the new shard.
    since: Vec<(u64, VectorOp)>,
}

/// A rebuild's catch-up ops are replayed under the write lock only once this few remain.
const SWAP_TAIL: usize = 256;

/// A namespace is compacted at most this often (a failing or immediately refilled compaction
/// must not rebuild the shard on every batch).
const COMPACT_EVERY: Duration = Duration::from_secs(60);

/// A background rebuild: namespace and generation (the kind is the namespace's own in the
/// cut the build reads).
#[derive(Clone)]
struct Job {
    namespace: String,
    generation: u64,
}

/// A checkpoint's copies, taken by [`VectorStore::freeze`] and written by
/// [`VectorStore::write_frozen`].
pub struct FrozenCheckpoint {
    applied: u64,
    /// Taken by `freeze` (which then lets no other copy be taken until this one is written).
    in_flight: bool,
    /// The manifest the copies were taken against, and the files' epoch then.
    previous: Option<Manifest>,
    epoch: u64,
    /// Shards unchanged since `previous`: their files stay.
    kept: BTreeMap<String, persist::ShardFiles>,
    /// Each copy with its namespace's data key as of the freeze: a copy taken sealed is written
    /// sealed, even if its key is gone by the time it is written.
    copies: Vec<(String, FrozenShard, Option<Arc<crate::storage::vault::DataKey>>)>,
}

impl FrozenCheckpoint {
    pub fn applied(&self) -> u64 {
        self.applied
    }
}

/// What the builder thread shares with the store.
struct Shared {
    shards: RwLock<Shards>,
    reader: StateReader,
    max_part: usize,
    /// Builds queued or running, and a signal when that falls to zero.
    pending: (Mutex<usize>, Condvar),
}

pub struct VectorStore {
    shared: Arc<Shared>,
    jobs: Mutex<mpsc::Sender<Job>>,
    options: VectorOptions,
    /// The manifest on disk, if this store wrote or read one.
    manifest: Mutex<Option<Manifest>>,
    /// Bumped (under `manifest`'s lock) whenever the files stop describing this store's past
    /// (start-up, a snapshot install): a checkpoint frozen before must not be committed.
    files_epoch: std::sync::atomic::AtomicU64,
    /// Set (under `manifest`'s lock) from `forget_files` until the shards describing the new
    /// state are in place: no checkpoint commits meanwhile.
    files_invalid: std::sync::atomic::AtomicBool,
    /// A copy taken by `freeze` is waiting to be written: the next `freeze` takes none.
    checkpoint_in_flight: std::sync::atomic::AtomicBool,
    /// What the last [`open`](Self::open) did.
    opened: Mutex<Option<OpenReport>>,
}

#[derive(Debug, thiserror::Error)]
pub enum VectorStoreError {
    #[error(transparent)]
    Vector(#[from] VectorError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Persist(#[from] PersistError),
}

impl VectorStore {
    /// A store over the state machine that `reader` reads (it rebuilds shards from there),
    /// with its builder thread.
    pub fn new(reader: StateReader, options: VectorOptions) -> Self {
        let shared = Arc::new(Shared {
            shards: RwLock::new(Shards::new(HashMap::new(), 0, 0)),
            reader,
            max_part: options.max_part,
            pending: (Mutex::new(0), Condvar::new()),
        });
        let (tx, rx) = mpsc::channel::<Job>();
        let worker = Arc::downgrade(&shared);
        let spawned = std::thread::Builder::new().name("engram-shard-builder".into()).spawn(move || {
            builder_thread_setup();
            // Ends when the store (the only sender) is dropped.
            while let Ok(job) = rx.recv() {
                let Some(shared) = worker.upgrade() else { break };
                let kept = job.clone();
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| shared.run(job))).is_err() {
                    metrics::counter!("engram_vector_rebuild_failures_total").increment(1);
                    tracing::error!(namespace = %kept.namespace, "background shard rebuild panicked; keeping the old shard");
                    shared.abandon(&kept);
                }
                let (n, done) = &shared.pending;
                let mut n = n.lock().unwrap_or_else(|p| p.into_inner());
                *n = n.saturating_sub(1);
                if *n == 0 {
                    done.notify_all();
                }
            }
        });
        if let Err(e) = spawned {
            // Without the thread, queued builds never run and shards keep their old kind
            // (still correct answers) until the next start rebuilds them.
            tracing::error!(error = %e, "could not start the shard builder thread");
        }
        VectorStore {
            shared,
            jobs: Mutex::new(tx),
            options,
            manifest: Mutex::default(),
            files_epoch: Default::default(),
            files_invalid: Default::default(),
            checkpoint_in_flight: Default::default(),
            opened: Mutex::default(),
        }
    }

    fn shards(&self) -> std::sync::RwLockReadGuard<'_, Shards> {
        self.shared.shards.read().unwrap_or_else(|p| p.into_inner())
    }

    fn shards_mut(&self) -> std::sync::RwLockWriteGuard<'_, Shards> {
        self.shared.shards.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Namespaces whose rebuild is under way.
    pub fn building(&self) -> Vec<String> {
        let mut out: Vec<String> = self.shards().building.keys().cloned().collect();
        out.sort();
        out
    }

    /// Waits up to `timeout` for queued and running rebuilds to finish; whether they did.
    pub fn wait_for_builds(&self, timeout: Duration) -> bool {
        let (n, done) = &self.shared.pending;
        let n = n.lock().unwrap_or_else(|p| p.into_inner());
        let (n, _) = done.wait_timeout_while(n, timeout, |n| *n > 0).unwrap_or_else(|p| p.into_inner());
        *n == 0
    }

    /// Registers a background rebuild of `namespace` as `kind` (superseding any under way).
    fn schedule(&self, shards: &mut Shards, namespace: &str, kind: FaissKind) {
        shards.generation += 1;
        let generation = shards.generation;
        shards.building.insert(namespace.to_string(), Building { generation, since: Vec::new() });
        *self.shared.pending.0.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        tracing::debug!(namespace, ?kind, generation, "shard rebuild scheduled");
        let job = Job { namespace: namespace.to_string(), generation };
        if self.jobs.lock().unwrap_or_else(|p| p.into_inner()).send(job).is_err() {
            shards.building.remove(namespace);
            let mut n = self.shared.pending.0.lock().unwrap_or_else(|p| p.into_inner());
            *n = n.saturating_sub(1);
            tracing::error!(namespace, "shard builder thread is gone; the shard keeps its old kind");
        }
        metrics::counter!("engram_vector_rebuilds_scheduled_total").increment(1);
    }

    /// Applies the vector changes of the entries up to log index `applied`. Rebuilds are
    /// scheduled, not run: the shard being rebuilt keeps taking this batch's writes.
    pub fn apply(&self, ops: &[VectorOp], applied: u64) -> Result<(), VectorStoreError> {
        let mut guard = self.shards_mut();
        let shards = &mut *guard;
        shards.applied = shards.applied.max(applied);
        if ops.is_empty() {
            return Ok(());
        }
        // What a build under way must replay; a drop ends the build (its result is stale).
        for op in ops {
            match op {
                VectorOp::DropNamespace { namespace } => {
                    shards.building.remove(namespace);
                }
                VectorOp::Rebuild { .. } => {}
                op => {
                    if let Some(b) = shards.building.get_mut(op.namespace()) {
                        b.since.push((applied, op.clone()));
                    }
                }
            }
        }
        let mut rebuilds = Vec::new();
        apply_ops(&mut shards.map, ops, |ns, kind| rebuilds.push((ns.to_string(), kind)))?;
        for (ns, kind) in rebuilds {
            self.schedule(shards, &ns, kind);
        }
        // Tombstone-heavy graphs are rebuilt in the background too (a local decision: it
        // changes how this node finds answers, never what the state is).
        let touched: BTreeSet<&str> = ops.iter().map(VectorOp::namespace).collect();
        for ns in touched {
            let compact = shards.map.get(ns).filter(|s| s.needs_compaction()).map(Shard::kind);
            let recent = shards.compacted_at.get(ns).is_some_and(|t| t.elapsed() < COMPACT_EVERY);
            if let Some(kind) = compact {
                if !shards.building.contains_key(ns) && !recent {
                    metrics::counter!("engram_vector_compactions_total").increment(1);
                    shards.compacted_at.insert(ns.to_string(), std::time::Instant::now());
                    self.schedule(shards, ns, kind);
                }
            }
        }
        Self::export(&shards.map);
        Ok(())
    }

    /// The totals, plus a series per allow-listed namespace (see `http::namespace_label`).
    fn export(shards: &HashMap<String, Shard>) {
        let total: usize = shards.values().map(Shard::len).sum();
        metrics::gauge!("engram_vector_indexed_memories").set(total as f64);
        metrics::gauge!("engram_vector_shards").set(shards.len() as f64);
        for ns in crate::http::labelled_namespaces() {
            let len = shards.get(ns).map(Shard::len).unwrap_or(0);
            metrics::gauge!("engram_vector_shard_memories", "namespace" => ns.clone()).set(len as f64);
        }
    }

    /// Builds one namespace's shard from the state machine with the given kind.
    fn build_namespace(
        &self,
        ns: &str,
        dim: usize,
        metric: Metric,
        kind: FaissKind,
        mut progress: Option<&mut Logged>,
    ) -> Result<Shard, VectorStoreError> {
        let started = std::time::Instant::now();
        let mut memories = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let (_, page) = self.shared.reader.list(ns, after.as_deref(), 4096, 0)?;
            if let Some(p) = progress.as_deref_mut() {
                p.inc(page.memories.len() as u64);
            }
            memories.extend(page.memories);
            match page.next_after {
                Some(a) => after = Some(a),
                None => break,
            }
        }
        let kind = buildable(kind, memories.len());
        let shard = Shard::build(dim, metric, kind, &memories, self.options.max_part)?;
        metrics::counter!("engram_vector_rebuilds_total", "namespace" => crate::http::namespace_label(ns)).increment(1);
        tracing::info!(
            namespace = ns,
            memories = memories.len(),
            ?kind,
            parts = shard.parts(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "vector shard built"
        );
        Ok(shard)
    }

    /// The kind, size and part count of every shard (for status and tests).
    pub fn shard_kinds(&self) -> Vec<(String, FaissKind, usize, usize)> {
        let shards = self.shards();
        let mut out: Vec<_> = shards.map.iter().map(|(n, s)| (n.clone(), s.kind(), s.len(), s.parts())).collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The log index the shards reflect.
    pub fn applied(&self) -> u64 {
        self.shards().applied
    }

    /// Replaces every shard with one built from the state machine's current contents, and
    /// forgets the index files (they describe another state).
    pub fn rebuild(&self) -> Result<(), VectorStoreError> {
        self.forget_files()?;
        let applied = self.shared.reader.applied_index()?;
        let mut fresh = HashMap::new();
        let namespaces = self.shared.reader.namespaces()?;
        let mut progress = rebuild_progress(&namespaces);
        for info in namespaces {
            let shard = self.build_namespace(
                &info.name,
                info.dimension as usize,
                info.metric,
                info.index,
                Some(&mut progress),
            )?;
            fresh.insert(info.name.clone(), shard);
        }
        // Builds under way describe the old state: their results are dropped.
        {
            let mut shards = self.shards_mut();
            let generation = shards.generation + 1;
            *shards = Shards::new(fresh, applied, generation);
            Self::export(&shards.map);
        }
        // Copies taken before this point describe the old state (the epoch tells them apart).
        self.files_valid_again();
        Ok(())
    }

    /// The shards now describe the state the files will be written from.
    fn files_valid_again(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        let _on_disk = self.manifest.lock().unwrap_or_else(|p| p.into_inner());
        self.files_epoch.fetch_add(1, SeqCst);
        self.files_invalid.store(false, SeqCst);
    }

    /// Removes the manifest: the index files no longer describe the state (a snapshot is
    /// about to replace it). The files themselves go at the next checkpoint.
    pub fn forget_files(&self) -> Result<(), VectorStoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        // Locked first: a checkpoint writing now finishes before the manifest goes, and none
        // commits after until `rebuild` has the new shards in place.
        let mut on_disk = self.manifest.lock().unwrap_or_else(|p| p.into_inner());
        self.files_invalid.store(true, SeqCst);
        self.files_epoch.fetch_add(1, SeqCst);
        *on_disk = None;
        if let Some(dir) = &self.options.dir {
            persist::invalidate(dir)?;
        }
        Ok(())
    }

    /// Start-up: loads shards from the index files and catches them up to the state machine,
    /// or rebuilds what it cannot load. `changes(from, to)` names what log entries `from..=to`
    /// touched, or `None` when the log no longer holds them all.
    pub fn open(
        &self,
        changes: impl FnOnce(u64, u64) -> Result<Option<Changes>, StorageError>,
    ) -> Result<OpenReport, VectorStoreError> {
        let started = std::time::Instant::now();
        let applied = self.shared.reader.applied_index()?;
        let namespaces = self.shared.reader.namespaces()?;
        let mut report = OpenReport::default();
        let manifest = match &self.options.dir {
            None => Err("no index directory".to_string()),
            Some(dir) => match persist::read_manifest(dir) {
                Ok(Some(m)) if m.applied > applied => {
                    Err(format!("index files at log index {} are ahead of the state ({applied})", m.applied))
                }
                Ok(Some(m)) => Ok(m),
                Ok(None) => Err("no index files".to_string()),
                Err(e) => Err(e.to_string()),
            },
        };
        let (manifest, changed) = match manifest {
            Ok(m) if m.applied == applied => (Ok(m), Changes::default()),
            Ok(m) => match changes(m.applied + 1, applied)? {
                Some(c) => (Ok(m), c),
                None => {
                    (Err(format!("the log no longer holds entries {}..={applied}", m.applied + 1)), Changes::default())
                }
            },
            Err(e) => (Err(e), Changes::default()),
        };
        let mut map = HashMap::new();
        let mut progress = rebuild_progress(&namespaces);
        for info in &namespaces {
            let ns = info.name.as_str();
            // A merge rewrote memories the log entries do not name: catching up by id would
            // leave them stale.
            let merged = changed.puts.contains(ns)
                && (changed.policies.contains(ns) || self.shared.reader.policy(ns)?.may_merge());
            let loaded = match &manifest {
                Err(e) => Err(e.clone()),
                Ok(_) if changed.namespaces.contains(ns) => Err("namespace re-created or dropped since".into()),
                Ok(_) if merged => Err("puts since may have merged into memories they do not name".into()),
                Ok(m) => match m.shards.get(ns) {
                    None => Err("no index file".into()),
                    Some(files) => {
                        let dir = self.options.dir.as_deref().expect("a manifest implies a directory");
                        let key = self.shared.reader.vault().for_namespace(ns);
                        persist::read_shard(dir, files, ns, key.as_deref()).map_err(|e| e.to_string()).and_then(
                            |shard| {
                                let kind = buildable(info.index, info.memory_count as usize);
                                let want = (info.dimension as usize, info.metric, kind);
                                if (shard.dimension(), shard.metric(), shard.kind()) != want {
                                    Err(format!("file has {:?}, namespace has {want:?}", shard.kind()))
                                } else {
                                    Ok(shard)
                                }
                            },
                        )
                    }
                },
            };
            let shard = match loaded {
                Ok(mut shard) => {
                    let touched = changed.memories.range((ns.to_string(), String::new())..);
                    for (_, id) in touched.take_while(|(n, _)| n == ns) {
                        let (_, memory, _) = self.shared.reader.get(ns, id)?;
                        match memory {
                            Some(m) => shard.upsert(&m)?,
                            None => shard.remove(id)?,
                        }
                        report.caught_up += 1;
                    }
                    if shard.len() as u64 == info.memory_count {
                        progress.inc(info.memory_count);
                        report.loaded.push(ns.to_string());
                        metrics::counter!("engram_vector_shard_opens_total", "source" => "file").increment(1);
                        shard
                    } else {
                        let why = format!("{} memories in the file, {} in the state", shard.len(), info.memory_count);
                        self.rebuilt(ns, why, &mut report);
                        self.build_namespace(ns, info.dimension as usize, info.metric, info.index, Some(&mut progress))?
                    }
                }
                Err(why) => {
                    self.rebuilt(ns, why, &mut report);
                    self.build_namespace(ns, info.dimension as usize, info.metric, info.index, Some(&mut progress))?
                }
            };
            map.insert(ns.to_string(), shard);
        }
        *self.manifest.lock().unwrap_or_else(|p| p.into_inner()) = manifest.ok();
        let mut shards = self.shards_mut();
        let generation = shards.generation + 1;
        *shards = Shards::new(map, applied, generation);
        Self::export(&shards.map);
        drop(shards);
        // Copies taken before the swap hold the old shards (the epoch tells them apart).
        self.files_valid_again();
        tracing::info!(
            applied,
            loaded = report.loaded.len(),
            rebuilt = report.rebuilt.len(),
            caught_up = report.caught_up,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "vector shards opened"
        );
        *self.opened.lock().unwrap_or_else(|p| p.into_inner()) = Some(report.clone());
        Ok(report)
    }

    /// What the start-up [`open`](Self::open) loaded and rebuilt.
    pub fn opened(&self) -> Option<OpenReport> {
        self.opened.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn rebuilt(&self, ns: &str, why: String, report: &mut OpenReport) {
        if self.options.dir.is_some() {
            tracing::info!(namespace = ns, reason = %why, "rebuilding vector shard from the state");
        }
        metrics::counter!("engram_vector_shard_opens_total", "source" => "rebuild").increment(1);
        report.rebuilt.push((ns.to_string(), why));
    }

    /// Writes every shard that changed since the last checkpoint to new index files and
    /// points the manifest at them ([`freeze`](Self::freeze), then
    /// [`write_frozen`](Self::write_frozen)). Returns the log index written, or `None` when
    /// there was nothing to write or no directory.
    pub fn checkpoint(&self) -> Result<Option<u64>, VectorStoreError> {
        // A copy is refused when another checkpoint committed after it was taken: take a new
        // one (that one then sees the other's files).
        for _ in 0..3 {
            match self.copy_changed()? {
                None => return Ok(None),
                Some(frozen) => {
                    if let Some(at) = self.write_frozen(frozen)? {
                        return Ok(Some(at));
                    }
                }
            }
        }
        Ok(None)
    }

    /// The first half of a checkpoint, the only one that holds the shards' lock (applies wait
    /// for it; searches do not): copies of the shards that changed since the last checkpoint
    /// (metadata and FAISS clones: a memory copy), at one applied index. `None` when nothing
    /// changed, there is no directory, the files are being replaced (a snapshot install), or
    /// an earlier copy is still waiting to be written (never wait for that here: applies
    /// would).
    pub fn freeze(&self) -> Result<Option<FrozenCheckpoint>, VectorStoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.checkpoint_in_flight.compare_exchange(false, true, SeqCst, SeqCst).is_err() {
            return Ok(None);
        }
        let frozen = self.copy_changed();
        if !matches!(frozen, Ok(Some(_))) {
            self.checkpoint_in_flight.store(false, SeqCst);
        }
        frozen.map(|f| f.map(|f| FrozenCheckpoint { in_flight: true, ..f }))
    }

    /// The copies [`freeze`](Self::freeze) takes, whether or not another copy waits.
    fn copy_changed(&self) -> Result<Option<FrozenCheckpoint>, VectorStoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.options.dir.is_none() {
            return Ok(None);
        }
        let started = std::time::Instant::now();
        let (previous, epoch) = {
            let on_disk = self.manifest.lock().unwrap_or_else(|p| p.into_inner());
            if self.files_invalid.load(SeqCst) {
                return Ok(None);
            }
            (on_disk.clone(), self.files_epoch.load(SeqCst))
        };
        let shards = self.shards();
        let base = previous.clone().unwrap_or_default();
        let unchanged = previous.is_some()
            && base.shards.len() == shards.map.len()
            && shards.map.iter().all(|(ns, s)| !s.is_dirty() && base.shards.contains_key(ns));
        if unchanged && base.applied == shards.applied {
            return Ok(None);
        }
        let mut kept = BTreeMap::new();
        let mut copies = Vec::new();
        for (ns, shard) in &shards.map {
            match base.shards.get(ns) {
                Some(files) if !shard.is_dirty() => {
                    kept.insert(ns.clone(), files.clone());
                }
                _ => copies.push((ns.clone(), shard.freeze()?, self.shared.reader.vault().for_namespace(ns))),
            }
        }
        metrics::histogram!("engram_vector_checkpoint_freeze_seconds").record(started.elapsed().as_secs_f64());
        Ok(Some(FrozenCheckpoint { applied: shards.applied, in_flight: false, previous, epoch, kept, copies }))
    }

    /// The second half of a checkpoint, with no shard lock held: writes the frozen copies and
    /// commits the manifest, unless the files changed meaning since the freeze (a start-up or
    /// snapshot install) or a newer checkpoint was committed meanwhile (then `None`).
    pub fn write_frozen(&self, frozen: FrozenCheckpoint) -> Result<Option<u64>, VectorStoreError> {
        let in_flight = frozen.in_flight;
        let written = self.write_frozen_inner(frozen);
        if in_flight {
            self.checkpoint_in_flight.store(false, std::sync::atomic::Ordering::SeqCst);
        }
        written
    }

    fn write_frozen_inner(&self, frozen: FrozenCheckpoint) -> Result<Option<u64>, VectorStoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        let Some(dir) = &self.options.dir else { return Ok(None) };
        let started = std::time::Instant::now();
        // Held throughout: one checkpoint writes at a time, and `forget_files` waits for it.
        let mut on_disk = self.manifest.lock().unwrap_or_else(|p| p.into_inner());
        let FrozenCheckpoint { applied, previous, epoch, kept, copies, .. } = frozen;
        if self.files_invalid.load(SeqCst) || self.files_epoch.load(SeqCst) != epoch || *on_disk != previous {
            return Ok(None);
        }
        std::fs::create_dir_all(dir).map_err(|e| PersistError::Io { path: dir.clone(), source: e })?;
        let mut next = Manifest { applied, shards: kept };
        for (ns, copy, key) in &copies {
            next.shards.insert(ns.clone(), persist::write_shard(dir, ns, applied, copy, key.as_deref())?);
        }
        persist::commit(dir, &next)?;
        {
            let shards = self.shards();
            for (ns, copy, _) in &copies {
                if let Some(shard) = shards.map.get(ns) {
                    shard.mark_saved(copy);
                }
            }
        }
        *on_disk = Some(next);
        metrics::counter!("engram_vector_checkpoints_total").increment(1);
        tracing::info!(
            applied,
            written = copies.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "vector checkpoint"
        );
        Ok(Some(applied))
    }

    /// Searches one namespace's shard; `None` when the namespace has no shard.
    pub fn search(
        &self,
        namespace: &str,
        query: &[f32],
        k: usize,
        filter: &Filter,
        params: SearchParams,
        now_ms: u64,
    ) -> Result<Option<Vec<(String, f32)>>, VectorError> {
        let shards = self.shards();
        match shards.map.get(namespace) {
            Some(s) => s.search(query, k, filter, params, now_ms).map(Some),
            None => Ok(None),
        }
    }
}

/// A rebuild may take minutes and nothing waits for it: the builder runs below apply and the
/// Raft heartbeats (nice 10), on at most half the cores, so a node building a big graph
/// still answers its peers in time (a starved follower would call spurious elections).
fn builder_thread_setup() {
    // SAFETY: gettid has no preconditions; setpriority on this thread's own id only lowers it.
    let lowered = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10)
    };
    if lowered != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "could not lower the shard builder's priority");
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    super::faiss::limit_threads_here((cores / 2).max(1));
}

/// Applies `ops` to `shards`; a `Rebuild` is handed to `rebuild` (the caller schedules it).
fn apply_ops(
    shards: &mut HashMap<String, Shard>,
    ops: &[VectorOp],
    mut rebuild: impl FnMut(&str, FaissKind),
) -> Result<(), VectorStoreError> {
    let mut i = 0;
    while i < ops.len() {
        let op = &ops[i];
        i += 1;
        // A run of removals from one namespace (a purge, a retirement) is one call.
        if let VectorOp::Remove { namespace, id } = op {
            let run = ops[i..]
                .iter()
                .take_while(|o| matches!(o, VectorOp::Remove { namespace: n, .. } if n == namespace))
                .count();
            if run > 0 {
                if let Some(s) = shards.get_mut(namespace) {
                    let rest = ops[i..i + run].iter().filter_map(|o| match o {
                        VectorOp::Remove { id, .. } => Some(id.as_str()),
                        _ => None,
                    });
                    s.remove_many(std::iter::once(id.as_str()).chain(rest))?;
                }
                i += run;
                continue;
            }
        }
        match op {
            VectorOp::Namespace { namespace, dimension, metric } => {
                if !shards.contains_key(namespace) {
                    shards.insert(namespace.clone(), Shard::new(*dimension as usize, *metric)?);
                }
            }
            VectorOp::Upsert { metric, memory } => {
                let shard = match shards.get_mut(&memory.namespace) {
                    Some(s) => s,
                    None => {
                        shards.entry(memory.namespace.clone()).or_insert(Shard::new(memory.embedding.len(), *metric)?)
                    }
                };
                // A run of upserts into one namespace (a PutBatch) is one FAISS call per part.
                let run = ops[i..]
                    .iter()
                    .take_while(|o| matches!(o, VectorOp::Upsert { memory: m, .. } if m.namespace == memory.namespace))
                    .count();
                if run == 0 {
                    shard.upsert(memory)?;
                } else {
                    let batch: Vec<&Memory> = std::iter::once(&**memory)
                        .chain(ops[i..i + run].iter().filter_map(|o| match o {
                            VectorOp::Upsert { memory, .. } => Some(&**memory),
                            _ => None,
                        }))
                        .collect();
                    shard.upsert_many(&batch)?;
                    i += run;
                }
            }
            VectorOp::Remove { namespace, id } => {
                if let Some(s) = shards.get_mut(namespace) {
                    s.remove(id)?;
                }
            }
            VectorOp::DropNamespace { namespace } => {
                shards.remove(namespace);
            }
            VectorOp::Rebuild { namespace, kind } => rebuild(namespace, *kind),
        }
    }
    Ok(())
}

impl Shared {
    /// One background rebuild: a cut of the namespace, a shard built from it with no lock
    /// held, then — if no newer rebuild or drop superseded it — the ops after the cut
    /// replayed and the shard swapped in.
    fn run(&self, job: Job) {
        let started = std::time::Instant::now();
        let ns = job.namespace.as_str();
        let current = |shards: &Shards| shards.building.get(ns).is_some_and(|b| b.generation == job.generation);
        if !current(&self.shards.read().unwrap_or_else(|p| p.into_inner())) {
            return;
        }
        let built = (|| -> Result<Option<(u64, Shard)>, VectorStoreError> {
            let (cut, info, memories) = self.reader.namespace_cut(ns)?;
            let Some(info) = info else { return Ok(None) };
            // The kind the namespace has in this cut, not the one asked for: a later entry of
            // the asking batch may have dropped and re-created it.
            let kind = buildable(info.index, memories.len());
            let shard = Shard::build(info.dimension as usize, info.metric, kind, &memories, self.max_part)?;
            Ok(Some((cut, shard)))
        })();
        let (cut, shard) = match built {
            Ok(Some(b)) => b,
            // Dropped since: the drop op will have removed the shard (or is about to).
            Ok(None) => return self.abandon(&job),
            Err(e) => {
                metrics::counter!("engram_vector_rebuild_failures_total").increment(1);
                tracing::error!(namespace = ns, error = %e, "background shard rebuild failed; keeping the old shard");
                return self.abandon(&job);
            }
        };
        // Catch up with the ops applied since the cut outside the lock while they are many;
        // swap with a short tail under it, so apply and search wait a moment, not a replay.
        let mut one = HashMap::from([(ns.to_string(), shard)]);
        let (mut first, mut replayed) = (true, 0usize);
        loop {
            let mut guard = self.shards.write().unwrap_or_else(|p| p.into_inner());
            if !current(&guard) {
                return;
            }
            let taken = std::mem::take(&mut guard.building.get_mut(ns).expect("checked current").since);
            let ops: Vec<VectorOp> =
                taken.into_iter().filter(|(at, _)| !first || *at > cut).map(|(_, op)| op).collect();
            first = false;
            replayed += ops.len();
            if ops.len() > SWAP_TAIL {
                drop(guard);
                if let Err(e) = apply_ops(&mut one, &ops, |_, _| {}) {
                    metrics::counter!("engram_vector_rebuild_failures_total").increment(1);
                    tracing::error!(namespace = ns, error = %e, "replaying onto a rebuilt shard failed; keeping the old shard");
                    return self.abandon(&job);
                }
                continue;
            }
            let held = std::time::Instant::now();
            guard.building.remove(ns);
            let tail = apply_ops(&mut one, &ops, |_, _| {});
            match (tail, one.remove(ns)) {
                (Ok(()), Some(shard)) => {
                    let (kind, len, parts) = (shard.kind(), shard.len(), shard.parts());
                    guard.map.insert(ns.to_string(), shard);
                    VectorStore::export(&guard.map);
                    drop(guard);
                    metrics::counter!("engram_vector_rebuilds_total", "namespace" => crate::http::namespace_label(ns))
                        .increment(1);
                    tracing::info!(
                        namespace = ns,
                        memories = len,
                        ?kind,
                        parts,
                        cut,
                        replayed,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        swap_ms = held.elapsed().as_millis() as u64,
                        "vector shard rebuilt in the background"
                    );
                }
                (Err(e), _) => {
                    metrics::counter!("engram_vector_rebuild_failures_total").increment(1);
                    tracing::error!(namespace = ns, error = %e, "replaying onto a rebuilt shard failed; keeping the old shard");
                }
                (Ok(()), None) => {}
            }
            return;
        }
    }

    /// Forgets `job`'s build if it is still the namespace's current one (it failed or has
    /// nothing to build), so apply stops keeping ops for it.
    fn abandon(&self, job: &Job) {
        let mut guard = self.shards.write().unwrap_or_else(|p| p.into_inner());
        if guard.building.get(&job.namespace).is_some_and(|b| b.generation == job.generation) {
            guard.building.remove(&job.namespace);
        }
    }
}

/// Progress over every namespace's memories, logged every few seconds with the rate and ETA
/// while shards are loaded or rebuilt (a node with millions of memories takes minutes).
fn rebuild_progress(namespaces: &[crate::memory::NamespaceInfo]) -> Logged {
    Logged::new("vector shards", "memories read", namespaces.iter().map(|n| n.memory_count).sum())
}
