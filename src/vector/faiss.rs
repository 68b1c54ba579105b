//! FAISS behind [`VectorIndex`]: the only file in the crate that touches FFI.
//!
//! Kinds: `IDMap,Flat` (exact) and `IVF<nlist>,Flat` (approximate, trained on a sample,
//! `nprobe` per query). Both support `remove_ids`, so deletes are real removals, not
//! tombstones. Filters become an `IDSelector` (batch for sparse sets, bitmap for dense ones)
//! passed through `SearchParameters`, so FAISS itself skips non-matching ids.
//!
//! The `faiss` crate's `SearchParameters::new` forgets its selector, which FAISS never frees;
//! searches here build the parameters through `faiss-sys` and keep ownership of the selector.

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

pub struct FaissIndex {
    index: IndexImpl,
    dim: usize,
    metric: Metric,
    kind: FaissKind,
    present: RoaringTreemap,
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
        };
        let mt = match metric {
            Metric::L2 => MetricType::L2,
            Metric::Cosine | Metric::InnerProduct => MetricType::InnerProduct,
        };
        let index = index_factory(dim as u32, description, mt).map_err(err)?;
        Ok(FaissIndex::wrap(index, dim, metric, kind, RoaringTreemap::new()))
    }

    fn wrap(index: IndexImpl, dim: usize, metric: Metric, kind: FaissKind, present: RoaringTreemap) -> Self {
        FaissIndex {
            index,
            dim,
            metric,
            kind,
            present,
            version: 0,
            #[cfg(feature = "gpu")]
            gpu: Default::default(),
        }
    }

    pub fn kind(&self) -> FaissKind {
        self.kind
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

    /// Writes the index in FAISS's own format.
    pub fn write(&self, path: &Path) -> Result<(), VectorError> {
        let path = path.to_str().ok_or_else(|| VectorError::Faiss(format!("path {} is not UTF-8", path.display())))?;
        faiss::write_index(&self.index, path).map_err(err)
    }

    /// Reads an index [`write`](Self::write) wrote, which must hold exactly the ids `present`
    /// and match `dim`, `metric` and `kind`.
    pub fn read(
        path: &Path,
        dim: usize,
        metric: Metric,
        kind: FaissKind,
        present: RoaringTreemap,
    ) -> Result<Self, VectorError> {
        let name = path.to_str().ok_or_else(|| VectorError::Faiss(format!("path {} is not UTF-8", path.display())))?;
        let index = faiss::read_index(name).map_err(err)?;
        let mt = match metric {
            Metric::L2 => MetricType::L2,
            Metric::Cosine | Metric::InnerProduct => MetricType::InnerProduct,
        };
        let found = (index.d() as usize, index.metric_type(), index.ntotal(), index.is_trained());
        if found != (dim, mt, present.len(), true) {
            return Err(VectorError::Faiss(format!(
                "{}: (dimension, metric, vectors, trained) = {found:?}, expected ({dim}, {mt:?}, {}, true)",
                path.display(),
                present.len()
            )));
        }
        Ok(FaissIndex::wrap(index, dim, metric, kind, present))
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
        let selector = filter.map(Self::selector).transpose()?;
        let sel_ptr = selector.as_ref().map(|(s, _)| s.inner_ptr()).unwrap_or(ptr::null_mut());
        // Exhaustive (near-duplicate checks in `apply`): every list, on the CPU.
        let exhaustive = params.nprobe == SearchParams::EXHAUSTIVE.nprobe;
        let params = match self.kind {
            FaissKind::Ivf { nlist } if exhaustive => SearchParams { nprobe: nlist as usize },
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
                FaissKind::Flat => check(faiss_sys::faiss_SearchParameters_new(&mut p, sel_ptr))?,
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
                FaissKind::Flat => faiss_sys::faiss_SearchParameters_free(p),
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
