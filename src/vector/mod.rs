//! Vector indexes: the engine behind semantic search.
//!
//! * [`VectorIndex`] — the narrow trait every engine implements: upsert, remove, filtered
//!   top-k search. Scores are the metric's raw value: inner product (higher is better) for
//!   `InnerProduct` and `Cosine` (vectors normalised by the caller), squared L2 distance
//!   (lower is better) for `L2`.
//! * [`exact::ExactIndex`] — pure-Rust brute force; the oracle for tests and recall figures.
//! * [`faiss::FaissIndex`] — FAISS (`IDMap,Flat`, `IVF<n>,Flat` or `HNSW<m>`); the only FFI in
//!   the crate (with `hnsw_shim.cpp`, the C++ the C API lacks for HNSW).
//! * [`shard::Shard`] — one namespace: FAISS parts searched in parallel, slot ↔ id map, tag
//!   bitmaps, filter evaluation.
//! * [`store::VectorStore`] — all shards of a node, fed by the state machine's applies.
//! * [`persist`] — index files with the log index they reflect, loaded at start.
//!
//! Filters are roaring bitmaps of allowed ids, applied inside the engine (FAISS `IDSelector`),
//! so a filtered query returns k results whenever k matches exist.

pub mod exact;
pub mod faiss;
#[cfg(feature = "gpu")]
pub mod gpu;
pub mod persist;
pub mod shard;
pub mod store;
pub mod synthetic;

pub use shard::Filter;
pub use store::{Changes, OpenReport, VectorOp, VectorOptions, VectorStore};

use roaring::RoaringTreemap;
use thiserror::Error;

use crate::memory::Metric;

/// One search result: an index id and its score under the index's metric.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub id: u64,
    pub score: f32,
}

/// Search-time knobs; engines ignore those that do not apply to them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SearchParams {
    /// IVF lists probed per query.
    pub nprobe: usize,
    /// HNSW candidates kept per query (at least k are).
    pub ef: usize,
}

/// The HNSW `ef` searches use by default: recall@10 ≈ 0.97 on 30k MiniLM sentence embeddings
/// with M = 32 (see benches/vector_recall.rs).
pub const DEFAULT_EF: usize = 64;

/// Most HNSW candidates a request may ask for.
pub const MAX_EF: usize = 4096;

impl SearchParams {
    /// Every vector scored, on the CPU: what `apply` asks for, so every node finds the same
    /// candidates whatever its IVF centroids, HNSW graph or GPU.
    pub const EXHAUSTIVE: SearchParams = SearchParams { nprobe: usize::MAX, ef: usize::MAX };

    pub fn is_exhaustive(&self) -> bool {
        self.nprobe == usize::MAX
    }
}

impl Default for SearchParams {
    fn default() -> Self {
        SearchParams { nprobe: 16, ef: DEFAULT_EF }
    }
}

#[derive(Debug, Error)]
pub enum VectorError {
    #[error("vector of dimension {got} given to an index of dimension {expected}")]
    Dimension { expected: usize, got: usize },
    #[error("{0} vectors but {1} ids")]
    Mismatch(usize, usize),
    #[error("id {0} is out of range (ids must be < 2^63)")]
    IdRange(u64),
    #[error("faiss: {0}")]
    Faiss(String),
}

/// A vector index over `u64` ids.
pub trait VectorIndex: Send + Sync {
    fn dimension(&self) -> usize;
    fn metric(&self) -> Metric;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Inserts or replaces the vectors of `ids` (`vectors` holds `ids.len() * dimension` floats).
    fn upsert(&mut self, ids: &[u64], vectors: &[f32]) -> Result<(), VectorError>;
    /// Removes `ids`; absent ids are ignored. Returns how many were removed.
    fn remove(&mut self, ids: &[u64]) -> Result<usize, VectorError>;
    /// The best `k` hits, best first, among `filter` (all ids when `None`).
    fn search(
        &self,
        query: &[f32],
        k: usize,
        filter: Option<&RoaringTreemap>,
        params: SearchParams,
    ) -> Result<Vec<Hit>, VectorError>;
}

/// Whether score `a` ranks before score `b` under `metric`.
pub fn better(metric: Metric, a: f32, b: f32) -> bool {
    match metric {
        Metric::L2 => a < b,
        Metric::Cosine | Metric::InnerProduct => a > b,
    }
}

/// Sorts `hits` best first under `metric` (ties by id, so the order is deterministic) and
/// keeps the best `k`.
pub fn rank(metric: Metric, hits: &mut Vec<Hit>, k: usize) {
    hits.sort_by(|a, b| {
        if better(metric, a.score, b.score) {
            std::cmp::Ordering::Less
        } else if better(metric, b.score, a.score) {
            std::cmp::Ordering::Greater
        } else {
            a.id.cmp(&b.id)
        }
    });
    hits.truncate(k);
}

/// Scales `v` to unit length in place (cosine = inner product of unit vectors).
pub fn normalize(v: &mut [f32]) {
    // In f64: the norm of any finite f32 vector is finite there, so nothing overflows to a
    // zero vector.
    let norm = v.iter().map(|x| *x as f64 * *x as f64).sum::<f64>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x = (*x as f64 / norm) as f32);
    }
}

pub(crate) fn check_shape(dim: usize, ids: &[u64], vectors: &[f32]) -> Result<(), VectorError> {
    if vectors.len() != ids.len() * dim {
        if ids.is_empty() || !vectors.len().is_multiple_of(dim) {
            return Err(VectorError::Dimension { expected: dim, got: vectors.len() / ids.len().max(1) });
        }
        return Err(VectorError::Mismatch(vectors.len() / dim, ids.len()));
    }
    if let Some(id) = ids.iter().find(|id| **id > i64::MAX as u64) {
        return Err(VectorError::IdRange(*id));
    }
    Ok(())
}

#[cfg(test)]
mod conformance;
