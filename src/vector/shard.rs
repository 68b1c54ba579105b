//! A namespace's vector shard: a [`VectorIndex`] over dense `u64` slots, the slot ↔ memory
//! id map, and the metadata filters need (roaring bitmaps per tag, timestamps, importance).
//!
//! Cosine namespaces store unit vectors and search with a unit query, so FAISS's inner
//! product equals cosine similarity.

use std::collections::{BTreeMap, HashMap};

use roaring::RoaringTreemap;

use super::faiss::{FaissIndex, FaissKind};
use super::{normalize, SearchParams, VectorError, VectorIndex};
use crate::memory::{Memory, Metric};

/// Metadata conditions; all given conditions must hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    /// `key == value` for every pair.
    pub tags: Vec<(String, String)>,
    /// `key ∈ values` for every entry.
    pub tag_in: Vec<(String, Vec<String>)>,
    pub created_after_ms: Option<u64>,
    pub created_before_ms: Option<u64>,
    pub min_importance: Option<f32>,
}

impl Filter {
    fn scans_docs(&self) -> bool {
        self.created_after_ms.is_some() || self.created_before_ms.is_some() || self.min_importance.is_some()
    }
}

struct Doc {
    id: String,
    tags: BTreeMap<String, String>,
    created_at_ms: u64,
    importance: f32,
    expires_at_ms: Option<u64>,
}

/// The vector as the index stores or queries it: unit length for cosine.
fn prepared(metric: Metric, v: &[f32]) -> Vec<f32> {
    let mut v = v.to_vec();
    if metric == Metric::Cosine {
        normalize(&mut v);
    }
    v
}

pub struct Shard {
    metric: Metric,
    dim: usize,
    kind: FaissKind,
    index: Box<dyn VectorIndex>,
    next_slot: u64,
    slots: HashMap<String, u64>,
    docs: HashMap<u64, Doc>,
    tag_index: HashMap<(String, String), RoaringTreemap>,
    expiring: RoaringTreemap,
}

impl Shard {
    /// An empty exact (Flat) shard.
    pub fn new(dim: usize, metric: Metric) -> Result<Self, VectorError> {
        Self::build(dim, metric, FaissKind::Flat, &[])
    }

    /// A shard of `kind` holding `memories`; an IVF shard is trained on them first.
    pub fn build(dim: usize, metric: Metric, kind: FaissKind, memories: &[Memory]) -> Result<Self, VectorError> {
        let mut index = FaissIndex::new(dim, metric, kind)?;
        if let FaissKind::Ivf { .. } = kind {
            let mut sample = Vec::with_capacity(memories.len() * dim);
            for m in memories {
                sample.extend_from_slice(&prepared(metric, &m.embedding));
            }
            index.train(&sample)?;
        }
        let mut shard = Shard {
            metric,
            dim,
            kind,
            index: Box::new(index),
            next_slot: 0,
            slots: HashMap::new(),
            docs: HashMap::new(),
            tag_index: HashMap::new(),
            expiring: RoaringTreemap::new(),
        };
        for m in memories {
            shard.upsert(m)?;
        }
        Ok(shard)
    }

    pub fn kind(&self) -> FaissKind {
        self.kind
    }

    pub fn metric(&self) -> Metric {
        self.metric
    }

    pub fn len(&self) -> usize {
        self.docs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    pub fn dimension(&self) -> usize {
        self.dim
    }

    fn unindex(&mut self, slot: u64) {
        if let Some(doc) = self.docs.remove(&slot) {
            for (k, v) in doc.tags {
                if let Some(b) = self.tag_index.get_mut(&(k.clone(), v.clone())) {
                    b.remove(slot);
                    if b.is_empty() {
                        self.tag_index.remove(&(k, v));
                    }
                }
            }
            self.expiring.remove(slot);
        }
    }

    pub fn upsert(&mut self, m: &Memory) -> Result<(), VectorError> {
        if m.embedding.len() != self.dim {
            return Err(VectorError::Dimension { expected: self.dim, got: m.embedding.len() });
        }
        let slot = match self.slots.get(&m.id) {
            Some(s) => *s,
            None => {
                self.next_slot += 1;
                self.next_slot - 1
            }
        };
        self.index.upsert(&[slot], &prepared(self.metric, &m.embedding))?;
        self.unindex(slot);
        for (k, val) in &m.tags {
            self.tag_index.entry((k.clone(), val.clone())).or_default().insert(slot);
        }
        if m.expires_at_ms.is_some() {
            self.expiring.insert(slot);
        }
        self.slots.insert(m.id.clone(), slot);
        self.docs.insert(
            slot,
            Doc {
                id: m.id.clone(),
                tags: m.tags.clone(),
                created_at_ms: m.created_at_ms,
                importance: m.importance,
                expires_at_ms: m.expires_at_ms,
            },
        );
        Ok(())
    }

    pub fn remove(&mut self, id: &str) -> Result<(), VectorError> {
        if let Some(slot) = self.slots.remove(id) {
            self.index.remove(&[slot])?;
            self.unindex(slot);
        }
        Ok(())
    }

    /// The allowed slots, or `None` when every slot is allowed.
    fn allowed(&self, f: &Filter, now_ms: u64) -> Option<RoaringTreemap> {
        let mut allowed: Option<RoaringTreemap> = None;
        let mut narrow = |b: RoaringTreemap| {
            allowed = Some(match allowed.take() {
                Some(a) => a & b,
                None => b,
            });
        };
        for (k, v) in &f.tags {
            narrow(self.tag_index.get(&(k.clone(), v.clone())).cloned().unwrap_or_default());
        }
        for (k, values) in &f.tag_in {
            let mut any = RoaringTreemap::new();
            for v in values {
                if let Some(b) = self.tag_index.get(&(k.clone(), v.clone())) {
                    any |= b;
                }
            }
            narrow(any);
        }
        if f.scans_docs() {
            let pass: RoaringTreemap = self
                .docs
                .iter()
                .filter(|(_, d)| {
                    f.created_after_ms.is_none_or(|t| d.created_at_ms >= t)
                        && f.created_before_ms.is_none_or(|t| d.created_at_ms < t)
                        && f.min_importance.is_none_or(|i| d.importance >= i)
                })
                .map(|(s, _)| *s)
                .collect();
            narrow(pass);
        }
        // Expired memories are invisible to reads, so to search too.
        let expired: RoaringTreemap = self
            .expiring
            .iter()
            .filter(|s| self.docs.get(s).and_then(|d| d.expires_at_ms).is_some_and(|e| e <= now_ms))
            .collect();
        if !expired.is_empty() {
            let all: RoaringTreemap = self.docs.keys().copied().collect();
            let base = allowed.take().unwrap_or(all);
            allowed = Some(base - expired);
        }
        allowed
    }

    /// Top-k `(memory id, score)` pairs, best first.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        filter: &Filter,
        params: SearchParams,
        now_ms: u64,
    ) -> Result<Vec<(String, f32)>, VectorError> {
        let q = prepared(self.metric, query);
        let allowed = self.allowed(filter, now_ms);
        let hits = self.index.search(&q, k, allowed.as_ref(), params)?;
        Ok(hits.into_iter().filter_map(|h| self.docs.get(&h.id).map(|d| (d.id.clone(), h.score))).collect())
    }
}
