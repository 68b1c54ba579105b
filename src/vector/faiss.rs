//! FAISS behind [`VectorIndex`]: the only file in the crate that touches FFI (with
//! `hnsw_shim.cpp`, the few lines of C++ the C API lacks for HNSW).
//!
//! Kinds: `IDMap,Flat` (exact), `IVF<nlist>,Flat` (approximate, trained on a sample, `nprobe`
//! per query) and `HNSW<m>` (approximate graph, `ef` per query). Flat and IVF support
//! `remove_ids`, so their deletes are real removals. A graph cannot drop a node: an HNSW
//! index numbers its vectors in insertion order ("locals"), maps them to the caller's ids, and
//! a replaced or removed vector becomes a tombstone that a liveness bitmap hides from every
//! search; [`dead`](FaissIndex::dead) says how many, so the shard can rebuild the part.
//! Filters become an `IDSelector` (batch for sparse sets, bitmap for dense ones) passed
//! through `SearchParameters`, so FAISS itself skips non-matching ids. An HNSW search whose
//! filter leaves few candidates, or that the graph leaves short of k, scores the candidates
//! exactly instead (FAISS's flat scan of the graph's own vectors, under the same selector).
//!
//! The `faiss` crate's `SearchParameters::new` forgets its selector, which FAISS never frees;
//! searches here build the parameters through `faiss-sys` and keep ownership of the selector.

use std::collections::HashMap;
use std::path::Path;
use std::ptr;

use faiss::index::IndexImpl;
use faiss::selector::IdSelector;
use faiss::{index_factory, Idx, Index, MetricType};
use roaring::RoaringTreemap;

use super::{check_shape, Hit, SearchParams, VectorError, VectorIndex};
use crate::memory::Metric;

/// Which FAISS structure backs an index: the namespace's replicated [`IndexKind`].
pub type FaissKind = crate::memory::IndexKind;

/// An HNSW search with this many candidates or fewer (after its filter) scores them exactly:
/// a graph walk visits about that many vectors anyway, and finds all k.
const EXACT_BELOW: u64 = 2048;

/// efConstruction of HNSW graphs: with M = 32 on sentence embeddings, 80 builds about 1.6×
/// faster than 200 for a point or two of recall at the same ef.
const EF_CONSTRUCTION: i32 = 80;

extern "C" {
    fn engram_hnsw_is_graph(index: *const faiss_sys::FaissIndex) -> std::os::raw::c_int;
    fn engram_hnsw_set_ef_construction(
        index: *mut faiss_sys::FaissIndex,
        ef: std::os::raw::c_int,
        err: *mut std::os::raw::c_char,
        err_len: usize,
    ) -> std::os::raw::c_int;
    #[allow(clippy::too_many_arguments)]
    fn engram_hnsw_search(
        index: *const faiss_sys::FaissIndex,
        query: *const f32,
        k: i64,
        ef: std::os::raw::c_int,
        sel: *const faiss_sys::FaissIDSelector,
        exact: std::os::raw::c_int,
        distances: *mut f32,
        labels: *mut i64,
        err: *mut std::os::raw::c_char,
        err_len: usize,
    ) -> std::os::raw::c_int;
}

extern "C" {
    // libgomp, which FAISS's parallel loops run on (linked by faiss-sys).
    fn omp_set_num_threads(n: std::os::raw::c_int);
}

/// Caps the threads FAISS's parallel work (an HNSW graph's batch insert) uses when started
/// from the calling thread; other threads keep theirs.
pub fn limit_threads_here(n: usize) {
    // SAFETY: sets an OpenMP control variable of the calling thread.
    unsafe { omp_set_num_threads(n.clamp(1, i32::MAX as usize) as std::os::raw::c_int) }
}

/// Calls a shim function with an error buffer, turning its failure into a [`VectorError`].
fn shim(f: impl FnOnce(*mut std::os::raw::c_char, usize) -> std::os::raw::c_int) -> Result<(), VectorError> {
    let mut buf = [0 as std::os::raw::c_char; 256];
    if f(buf.as_mut_ptr(), buf.len()) == 0 {
        return Ok(());
    }
    // SAFETY: the shim NUL-terminates whatever it writes within the buffer; the buffer starts
    // zeroed, so it is a C string either way.
    let msg = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Err(VectorError::Faiss(msg.to_string_lossy().into_owned()))
}

/// An HNSW index's id map: FAISS numbers graph nodes 0.. in insertion order ("locals").
#[derive(Debug, Default, Clone, PartialEq)]
struct Graph {
    /// Local → caller's id; [`TOMBSTONE`] for replaced and removed vectors.
    labels: Vec<u64>,
    /// Caller's id → its current local.
    locals: HashMap<u64, u64>,
    /// Bit `l` set when local `l` is live: the selector of an unfiltered search.
    live: Vec<u8>,
}

const TOMBSTONE: u64 = u64::MAX;

impl Graph {
    fn from_labels(labels: Vec<u64>) -> Result<Graph, VectorError> {
        let mut g = Graph { live: vec![0; labels.len() / 8 + 1], ..Graph::default() };
        for (local, id) in labels.iter().enumerate() {
            if *id == TOMBSTONE {
                continue;
            }
            if g.locals.insert(*id, local as u64).is_some() {
                return Err(VectorError::Faiss(format!("id {id} appears twice in the graph")));
            }
            g.live[local / 8] |= 1 << (local % 8);
        }
        g.labels = labels;
        Ok(g)
    }

    fn bury(&mut self, id: u64) {
        if let Some(local) = self.locals.remove(&id) {
            self.labels[local as usize] = TOMBSTONE;
            self.live[(local / 8) as usize] &= !(1 << (local % 8));
        }
    }

    fn push(&mut self, id: u64) {
        let local = self.labels.len() as u64;
        self.labels.push(id);
        self.locals.insert(id, local);
        if self.live.len() <= (local / 8) as usize {
            self.live.resize((local / 8) as usize + 1, 0);
        }
        self.live[(local / 8) as usize] |= 1 << (local % 8);
    }
}

pub struct FaissIndex {
    index: IndexImpl,
    dim: usize,
    metric: Metric,
    kind: FaissKind,
    present: RoaringTreemap,
    /// HNSW only: locals, tombstones.
    graph: Option<Graph>,
    /// Bumped by every change, so a GPU copy knows when it is stale.
    version: u64,
    #[cfg(feature = "gpu")]
    gpu: super::gpu::Replica,
}

// SAFETY: FAISS CPU indexes allow concurrent const searches; every mutation goes through
// `&mut self`, so Rust's borrow rules serialise writers against readers.
unsafe impl Sync for FaissIndex {}

fn err(e: impl std::fmt::Display) -> VectorError {
    VectorError::Faiss(e.to_string())
}

/// Writes a FAISS index in FAISS's own format.
pub(crate) fn write_native(index: &IndexImpl, path: &Path) -> Result<(), VectorError> {
    let path = path.to_str().ok_or_else(|| VectorError::Faiss(format!("path {} is not UTF-8", path.display())))?;
    faiss::write_index(index, path).map_err(err)
}

/// A FAISS index in FAISS's own format, in memory: index files sealed at rest are encrypted
/// before any byte reaches the disk.
pub(crate) fn native_bytes(index: &IndexImpl) -> Result<Vec<u8>, VectorError> {
    let mut buf: *mut libc::c_char = ptr::null_mut();
    let mut size: libc::size_t = 0;
    // SAFETY: open_memstream writes into a buffer it allocates, valid (with `size` bytes)
    // after fclose and ours to free; FAISS writes through the FILE* only during the call.
    unsafe {
        let f = libc::open_memstream(&mut buf, &mut size);
        if f.is_null() {
            return Err(VectorError::Faiss("open_memstream failed".into()));
        }
        let rc = faiss_sys::faiss_write_index(index.inner_ptr(), f.cast());
        let closed = libc::fclose(f);
        let out = match buf.is_null() {
            true => Vec::new(),
            false => std::slice::from_raw_parts(buf as *const u8, size).to_vec(),
        };
        libc::free(buf.cast());
        check(rc)?;
        if closed != 0 {
            return Err(VectorError::Faiss("closing an in-memory index stream failed".into()));
        }
        Ok(out)
    }
}

/// Where [`FaissIndex::read`] finds an index in FAISS's own format.
pub enum Native<'a> {
    File(&'a Path),
    /// In memory (a sealed file, opened), named `.1` in errors.
    Bytes(&'a [u8], &'a dyn std::fmt::Display),
}

/// Reads an index [`native_bytes`] wrote.
fn index_from_bytes(bytes: &[u8]) -> Result<IndexImpl, VectorError> {
    use faiss::index::FromInnerPtr;
    if bytes.is_empty() {
        return Err(VectorError::Faiss("an empty index".into()));
    }
    // SAFETY: fmemopen reads `bytes` (which outlive the FILE*) and never writes in "rb" mode;
    // FAISS hands back an index it allocated, owned by the IndexImpl from here on.
    unsafe {
        let f = libc::fmemopen(bytes.as_ptr() as *mut libc::c_void, bytes.len(), c"rb".as_ptr());
        if f.is_null() {
            return Err(VectorError::Faiss("fmemopen failed".into()));
        }
        let mut out: *mut faiss_sys::FaissIndex = ptr::null_mut();
        let rc = faiss_sys::faiss_read_index(f.cast(), 0, &mut out);
        libc::fclose(f);
        check(rc)?;
        if out.is_null() {
            return Err(VectorError::Faiss("FAISS read no index".into()));
        }
        Ok(IndexImpl::from_inner_ptr(out))
    }
}

pub(super) fn check(code: std::os::raw::c_int) -> Result<(), VectorError> {
    if code == 0 {
        return Ok(());
    }
    // SAFETY: faiss_get_last_error returns a thread-local C string or null.
    let msg = unsafe {
        let p = faiss_sys::faiss_get_last_error();
        if p.is_null() {
            format!("error code {code}")
        } else {
            std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    Err(VectorError::Faiss(msg))
}

impl FaissIndex {
    /// An empty index. An IVF index must be [`train`](Self::train)ed before vectors are added.
    pub fn new(dim: usize, metric: Metric, kind: FaissKind) -> Result<Self, VectorError> {
        let description = match kind {
            FaissKind::Flat => "IDMap,Flat".to_string(),
            FaissKind::Ivf { nlist } => format!("IVF{nlist},Flat"),
            FaissKind::Hnsw { m } => format!("HNSW{}", m.clamp(2, 256)),
        };
        let mt = match metric {
            Metric::L2 => MetricType::L2,
            Metric::Cosine | Metric::InnerProduct => MetricType::InnerProduct,
        };
        let index = index_factory(dim as u32, description, mt).map_err(err)?;
        let graph = matches!(kind, FaissKind::Hnsw { .. }).then(Graph::default);
        if graph.is_some() {
            // SAFETY: `index` is a live FAISS index the shim only reads the type of and
            // writes one field of; the error buffer is the shim's to fill.
            shim(|e, n| unsafe { engram_hnsw_set_ef_construction(index.inner_ptr(), EF_CONSTRUCTION, e, n) })?;
        }
        Ok(FaissIndex::wrap(index, dim, metric, kind, RoaringTreemap::new(), graph))
    }

    fn wrap(
        index: IndexImpl,
        dim: usize,
        metric: Metric,
        kind: FaissKind,
        present: RoaringTreemap,
        graph: Option<Graph>,
    ) -> Self {
        FaissIndex {
            index,
            dim,
            metric,
            kind,
            present,
            graph,
            version: 0,
            #[cfg(feature = "gpu")]
            gpu: Default::default(),
        }
    }

    pub fn kind(&self) -> FaissKind {
        self.kind
    }

    /// Tombstones: replaced or removed vectors an HNSW graph still holds (0 for other kinds).
    pub fn dead(&self) -> usize {
        self.graph.as_ref().map_or(0, |g| g.labels.len() - g.locals.len())
    }

    /// An HNSW graph's local → id map (tombstones as `u64::MAX`), which its index file needs
    /// beside FAISS's own; `None` for other kinds.
    pub fn graph_labels(&self) -> Option<&[u64]> {
        self.graph.as_ref().map(|g| g.labels.as_slice())
    }

    /// Trains IVF centroids on `sample` (at least `nlist` vectors; ~40× that is better).
    pub fn train(&mut self, sample: &[f32]) -> Result<(), VectorError> {
        if !sample.len().is_multiple_of(self.dim) {
            return Err(VectorError::Dimension { expected: self.dim, got: sample.len() % self.dim });
        }
        self.version += 1;
        self.index.train(sample).map_err(err)
    }

    pub fn is_trained(&self) -> bool {
        self.index.is_trained()
    }

    /// An independent copy of the FAISS index, for [`write_native`].
    pub(crate) fn clone_native(&self) -> Result<IndexImpl, VectorError> {
        use faiss::index::TryClone;
        self.index.try_clone().map_err(err)
    }

    /// Reads an index [`write_native`] (a file) or [`native_bytes`] (sealed, opened into memory)
    /// wrote, from [`clone_native`](Self::clone_native); it must hold exactly the ids `present`
    /// and match `dim`, `metric` and `kind`; an HNSW index also needs its
    /// [`graph_labels`](Self::graph_labels).
    pub fn read(
        source: Native<'_>,
        dim: usize,
        metric: Metric,
        kind: FaissKind,
        present: RoaringTreemap,
        labels: Option<Vec<u64>>,
    ) -> Result<Self, VectorError> {
        let (index, what) = match source {
            Native::File(path) => {
                let name =
                    path.to_str().ok_or_else(|| VectorError::Faiss(format!("path {} is not UTF-8", path.display())))?;
                (faiss::read_index(name).map_err(err)?, path.display().to_string())
            }
            Native::Bytes(bytes, what) => {
                (index_from_bytes(bytes).map_err(|e| VectorError::Faiss(format!("{what}: {e}")))?, what.to_string())
            }
        };
        let mt = match metric {
            Metric::L2 => MetricType::L2,
            Metric::Cosine | Metric::InnerProduct => MetricType::InnerProduct,
        };
        let graph = match (kind, labels) {
            (FaissKind::Hnsw { .. }, Some(labels)) => {
                let g = Graph::from_labels(labels)?;
                let ids: RoaringTreemap = g.locals.keys().copied().collect();
                if ids != present {
                    return Err(VectorError::Faiss(format!("{}: graph ids differ from the shard's", what)));
                }
                // A file of another kind must not pass for a graph (searches would fail).
                // SAFETY: `index` is a live FAISS index; the shim only inspects its type.
                if unsafe { engram_hnsw_is_graph(index.inner_ptr()) } != 1 {
                    return Err(VectorError::Faiss(format!("{}: not an HNSW index", what)));
                }
                Some(g)
            }
            (FaissKind::Hnsw { .. }, None) => {
                return Err(VectorError::Faiss(format!("{}: an HNSW part without its id map", what)))
            }
            (_, Some(_)) => return Err(VectorError::Faiss(format!("{}: an id map for a {kind:?} part", what))),
            (_, None) => None,
        };
        let stored = graph.as_ref().map_or(present.len(), |g| g.labels.len() as u64);
        let found = (index.d() as usize, index.metric_type(), index.ntotal(), index.is_trained());
        if found != (dim, mt, stored, true) {
            return Err(VectorError::Faiss(format!(
                "{}: (dimension, metric, vectors, trained) = {found:?}, expected ({dim}, {mt:?}, {stored}, true)",
                what,
            )));
        }
        Ok(FaissIndex::wrap(index, dim, metric, kind, present, graph))
    }

    /// Dense sets become a bitmap (max/8 bytes), sparse ones a batch (FAISS copies those into
    /// a hash set). FAISS's bitmap selector keeps a pointer to the bytes, not a copy: the
    /// returned buffer must outlive every use of the selector.
    fn selector(filter: &RoaringTreemap) -> Result<(IdSelector, Option<Vec<u8>>), VectorError> {
        let max = filter.max().unwrap_or(0);
        if filter.len().saturating_mul(64) >= max {
            let mut bytes = vec![0u8; (max / 8 + 1) as usize];
            for id in filter.iter() {
                bytes[(id / 8) as usize] |= 1 << (id % 8);
            }
            let sel = IdSelector::bitmap(&bytes).map_err(err)?;
            Ok((sel, Some(bytes)))
        } else {
            let ids: Vec<Idx> = filter.iter().map(Idx::new).collect();
            Ok((IdSelector::batch(&ids).map_err(err)?, None))
        }
    }
}

impl VectorIndex for FaissIndex {
    fn dimension(&self) -> usize {
        self.dim
    }

    fn metric(&self) -> Metric {
        self.metric
    }

    fn len(&self) -> usize {
        self.present.len() as usize
    }

    fn upsert(&mut self, ids: &[u64], vectors: &[f32]) -> Result<(), VectorError> {
        check_shape(self.dim, ids, vectors)?;
        if !self.index.is_trained() {
            return Err(VectorError::Faiss("IVF index used before training".into()));
        }
        if self.graph.is_some() {
            // A later copy of an id in the same call wins, as if one at a time.
            let mut seen = std::collections::HashSet::with_capacity(ids.len());
            if ids.iter().any(|id| !seen.insert(*id)) {
                for (i, id) in ids.iter().enumerate() {
                    self.upsert(&[*id], &vectors[i * self.dim..(i + 1) * self.dim])?;
                }
                return Ok(());
            }
            let graph = self.graph.as_mut().expect("checked above");
            self.version += 1;
            self.index.add(vectors).map_err(err)?;
            // Locals are positions: a partial add would shift every later id onto another
            // vector. FAISS adds all or throws, but check rather than trust it.
            if self.index.ntotal() != (graph.labels.len() + ids.len()) as u64 {
                return Err(VectorError::Faiss(format!(
                    "graph holds {} vectors after adding {} to {}",
                    self.index.ntotal(),
                    ids.len(),
                    graph.labels.len()
                )));
            }
            for id in ids {
                graph.bury(*id);
                graph.push(*id);
            }
            self.present.extend(ids.iter().copied());
            return Ok(());
        }
        // FAISS keeps duplicates: replace by removing first.
        let existing: Vec<u64> = ids.iter().copied().filter(|id| self.present.contains(*id)).collect();
        if !existing.is_empty() {
            self.remove(&existing)?;
        }
        let xids: Vec<Idx> = ids.iter().map(|id| Idx::new(*id)).collect();
        self.version += 1;
        self.index.add_with_ids(vectors, &xids).map_err(err)?;
        self.present.extend(ids.iter().copied());
        Ok(())
    }

    fn remove(&mut self, ids: &[u64]) -> Result<usize, VectorError> {
        if let Some(graph) = &mut self.graph {
            let mut n = 0;
            for id in ids {
                if self.present.remove(*id) {
                    graph.bury(*id);
                    n += 1;
                }
            }
            self.version += (n > 0) as u64;
            return Ok(n);
        }
        let targets: Vec<Idx> = ids.iter().filter(|id| self.present.contains(**id)).map(|id| Idx::new(*id)).collect();
        if targets.is_empty() {
            return Ok(0);
        }
        let sel = IdSelector::batch(&targets).map_err(err)?;
        self.version += 1;
        let n = self.index.remove_ids(&sel).map_err(err)?;
        for id in &targets {
            self.present.remove(id.get().expect("ids are never none"));
        }
        Ok(n)
    }

    fn search(
        &self,
        query: &[f32],
        k: usize,
        filter: Option<&RoaringTreemap>,
        params: SearchParams,
    ) -> Result<Vec<Hit>, VectorError> {
        if query.len() != self.dim {
            return Err(VectorError::Dimension { expected: self.dim, got: query.len() });
        }
        if k == 0 || self.present.is_empty() || filter.is_some_and(|f| f.is_empty()) {
            return Ok(vec![]);
        }
        let k = k.min(self.present.len() as usize);
        if let Some(graph) = &self.graph {
            return self.search_graph(graph, query, k, filter, params);
        }
        let selector = filter.map(Self::selector).transpose()?;
        let sel_ptr = selector.as_ref().map(|(s, _)| s.inner_ptr()).unwrap_or(ptr::null_mut());
        // Exhaustive (near-duplicate checks in `apply`): every list, on the CPU.
        let exhaustive = params.is_exhaustive();
        let params = match self.kind {
            FaissKind::Ivf { nlist } if exhaustive => SearchParams { nprobe: nlist as usize, ..params },
            _ => params,
        };
        let gpu = if exhaustive { None } else { self.search_gpu(filter.is_none(), query, k, params.nprobe)? };
        let mut hits = match gpu {
            Some(hits) => hits,
            None => self.search_once(query, k, sel_ptr, params.nprobe)?,
        };
        // IVF scans only `nprobe` lists: a selective filter (or a small index) can leave it
        // short of k although k matches exist. Then it probes every list.
        if let FaissKind::Ivf { nlist } = self.kind {
            let available = filter.map(|f| f.intersection_len(&self.present)).unwrap_or(self.present.len());
            if (hits.len() as u64) < (k as u64).min(available) && params.nprobe < nlist as usize {
                hits = self.search_once(query, k, sel_ptr, nlist as usize)?;
            }
        }
        drop(selector);
        Ok(hits)
    }
}

impl FaissIndex {
    /// An unfiltered search on this part's GPU copy, when the `gpu` feature is on, a GPU is
    /// present and the part is big enough; `None` otherwise.
    #[cfg(feature = "gpu")]
    fn search_gpu(
        &self,
        unfiltered: bool,
        query: &[f32],
        k: usize,
        nprobe: usize,
    ) -> Result<Option<Vec<Hit>>, VectorError> {
        let worth_it = match self.kind {
            FaissKind::Flat => true,
            FaissKind::Ivf { .. } => nprobe >= super::gpu::MIN_NPROBE,
            // FAISS's GPU code has no HNSW; graph parts never get here (see `search`).
            FaissKind::Hnsw { .. } => false,
        };
        if !unfiltered || !worth_it || self.present.len() < super::gpu::MIN_VECTORS || !super::gpu::available() {
            return Ok(None);
        }
        self.gpu.search(&self.index, self.version, self.kind, query, k, nprobe)
    }

    #[cfg(not(feature = "gpu"))]
    fn search_gpu(&self, _: bool, _: &[f32], _: usize, _: usize) -> Result<Option<Vec<Hit>>, VectorError> {
        Ok(None)
    }

    /// An HNSW search: the filter (over the caller's ids) and the liveness bitmap become one
    /// bitmap selector over locals; few candidates, an exhaustive request, or a graph walk
    /// that comes back short of k are scored exactly.
    fn search_graph(
        &self,
        graph: &Graph,
        query: &[f32],
        k: usize,
        filter: Option<&RoaringTreemap>,
        params: SearchParams,
    ) -> Result<Vec<Hit>, VectorError> {
        let owned;
        let (bits, available): (&[u8], u64) = match filter {
            None => (&graph.live, self.present.len()),
            Some(f) => {
                let mut bits = vec![0u8; graph.labels.len() / 8 + 1];
                let mut n = 0;
                for id in f.iter() {
                    if let Some(local) = graph.locals.get(&id) {
                        bits[(*local / 8) as usize] |= 1 << (local % 8);
                        n += 1;
                    }
                }
                owned = bits;
                (&owned, n)
            }
        };
        if available == 0 {
            return Ok(vec![]);
        }
        let k = k.min(available as usize);
        // No selector at all when nothing is hidden: FAISS's fastest path.
        let everything = filter.is_none() && graph.locals.len() == graph.labels.len();
        let selector = if everything { None } else { Some(IdSelector::bitmap(bits).map_err(err)?) };
        let sel_ptr = selector.as_ref().map(|s| s.inner_ptr() as *const _).unwrap_or(ptr::null());
        let exact = params.is_exhaustive() || available <= EXACT_BELOW;
        let ef = params.ef.clamp(k, super::MAX_EF.max(k));
        let mut hits = self.graph_once(graph, query, k, ef, sel_ptr, exact)?;
        if hits.len() < k && !exact {
            hits = self.graph_once(graph, query, k, ef, sel_ptr, true)?;
        }
        drop(selector);
        Ok(hits)
    }

    fn graph_once(
        &self,
        graph: &Graph,
        query: &[f32],
        k: usize,
        ef: usize,
        sel: *const faiss_sys::FaissIDSelector,
        exact: bool,
    ) -> Result<Vec<Hit>, VectorError> {
        let mut distances = vec![0f32; k];
        let mut labels = vec![-1i64; k];
        // SAFETY: `self.index` is an HNSW index (checked when it was made or read); `sel` is
        // null or a selector the caller keeps alive (with the bitmap it points into) for this
        // call; the output buffers hold exactly k entries for one query of `dim` floats.
        shim(|e, n| unsafe {
            engram_hnsw_search(
                self.index.inner_ptr(),
                query.as_ptr(),
                k as i64,
                ef.min(i32::MAX as usize) as std::os::raw::c_int,
                sel,
                exact as std::os::raw::c_int,
                distances.as_mut_ptr(),
                labels.as_mut_ptr(),
                e,
                n,
            )
        })?;
        Ok(labels
            .into_iter()
            .zip(distances)
            .filter_map(|(l, d)| {
                let id = *graph.labels.get(usize::try_from(l).ok()?)?;
                (id != TOMBSTONE).then_some(Hit { id, score: d })
            })
            .collect())
    }

    /// One FAISS search with the given selector (null: none) and, for IVF, `nprobe`.
    fn search_once(
        &self,
        query: &[f32],
        k: usize,
        sel_ptr: *mut faiss_sys::FaissIDSelector,
        nprobe: usize,
    ) -> Result<Vec<Hit>, VectorError> {
        let mut distances = vec![0f32; k];
        let mut labels = vec![-1i64; k];
        // SAFETY: the caller keeps the selector behind `sel_ptr` (and its bitmap bytes) alive
        // for this call; the parameters only borrow it. The output buffers hold exactly k
        // entries for one query.
        unsafe {
            let mut p: *mut faiss_sys::FaissSearchParameters = ptr::null_mut();
            match self.kind {
                FaissKind::Ivf { .. } => {
                    let mut ivf: *mut faiss_sys::FaissSearchParametersIVF = ptr::null_mut();
                    check(faiss_sys::faiss_SearchParametersIVF_new_with(&mut ivf, sel_ptr, nprobe.max(1), 0))?;
                    p = ivf as *mut _;
                }
                FaissKind::Flat | FaissKind::Hnsw { .. } => {
                    check(faiss_sys::faiss_SearchParameters_new(&mut p, sel_ptr))?
                }
            }
            let rc = faiss_sys::faiss_Index_search_with_params(
                self.index.inner_ptr(),
                1,
                query.as_ptr(),
                k as faiss_sys::idx_t,
                p,
                distances.as_mut_ptr(),
                labels.as_mut_ptr(),
            );
            match self.kind {
                FaissKind::Ivf { .. } => faiss_sys::faiss_SearchParametersIVF_free(p as *mut _),
                FaissKind::Flat | FaissKind::Hnsw { .. } => faiss_sys::faiss_SearchParameters_free(p),
            }
            check(rc)?;
        }
        Ok(labels
            .into_iter()
            .zip(distances)
            .filter(|(l, _)| *l >= 0)
            .map(|(l, d)| Hit { id: l as u64, score: d })
            .collect())
    }
}
