//! A namespace's vector shard: one or more FAISS parts over dense `u64` slots, the slot ↔
//! memory id map, and the metadata filters need (roaring bitmaps per tag, timestamps,
//! importance).
//!
//! A large namespace is split into parts (slot `s` lives in part `s % parts`) that are searched
//! in parallel, each with the same filter bitmap, and merged into one top-k. The part count is
//! fixed when the shard is built (`max_part` memories each) and kept until the next rebuild.
//!
//! Cosine namespaces store unit vectors and search with a unit query, so FAISS's inner
//! product equals cosine similarity.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};

use roaring::RoaringTreemap;
use serde::{Deserialize, Serialize};

use super::faiss::{FaissIndex, FaissKind};
use super::{normalize, rank, Hit, SearchParams, VectorError, VectorIndex};
use crate::memory::{Memory, Metric};

/// Most parts a shard is split into.
pub const MAX_PARTS: usize = 64;

/// Memories per FAISS add while a shard is built (bounds the copy of their vectors).
const BUILD_CHUNK: usize = 16_384;

/// An HNSW shard is rebuilt without its tombstones once they are this share of its graph.
pub const COMPACT_DEAD_SHARE: f64 = 0.2;

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
    /// An access scope: the memory carries at least one of these tags (a tag-scoped key's
    /// grants). `Some(empty)` allows nothing.
    pub scope: Option<Vec<(String, String)>>,
}

impl Filter {
    fn scans_docs(&self) -> bool {
        self.created_after_ms.is_some() || self.created_before_ms.is_some() || self.min_importance.is_some()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Doc {
    id: String,
    tags: BTreeMap<String, String>,
    created_at_ms: u64,
    importance: f32,
    expires_at_ms: Option<u64>,
}

impl Doc {
    fn of(m: &Memory) -> Doc {
        Doc {
            id: m.id.clone(),
            tags: m.tags.clone(),
            created_at_ms: m.created_at_ms,
            importance: m.importance,
            expires_at_ms: m.expires_at_ms,
        }
    }
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
    parts: Vec<FaissIndex>,
    next_slot: u64,
    slots: HashMap<String, u64>,
    docs: HashMap<u64, Doc>,
    tag_index: HashMap<(String, String), RoaringTreemap>,
    /// Slots with an expiry, by expiry: the expired ones are a range, never a scan.
    expiring: std::collections::BTreeSet<(u64, u64)>,
    /// Every slot in use.
    live: RoaringTreemap,
    /// Tells this shard from the one a rebuild puts in its place (unique per process).
    identity: u64,
    /// Bumped by every change; `saved` is the value the last index file holds.
    changes: u64,
    saved: AtomicU64,
}

/// A copy of a shard taken under its lock, to be written to index files without it
/// ([`Shard::freeze`]).
pub(crate) struct FrozenShard {
    pub meta: ShardMeta,
    pub parts: Vec<faiss::index::IndexImpl>,
    pub identity: u64,
    pub changes: u64,
}

static IDENTITIES: AtomicU64 = AtomicU64::new(1);

/// Everything of a shard but its FAISS parts, as an index file stores it.
#[derive(Serialize, Deserialize)]
pub(crate) struct ShardMeta {
    pub metric: Metric,
    pub dim: u32,
    pub kind: FaissKind,
    pub parts: u32,
    /// Each part's own kind (IVF parts split the namespace's lists).
    pub part_kinds: Vec<FaissKind>,
    /// Each HNSW part's local → slot map (tombstones included); `None` for other kinds.
    pub part_labels: Vec<Option<Vec<u64>>>,
    pub next_slot: u64,
    pub docs: Vec<(u64, Doc)>,
}

impl Shard {
    /// An empty exact (Flat) shard.
    pub fn new(dim: usize, metric: Metric) -> Result<Self, VectorError> {
        Self::build(dim, metric, FaissKind::Flat, &[], usize::MAX)
    }

    /// A shard of `kind` holding `memories`, in as many parts as it takes to keep each under
    /// `max_part` memories. Each IVF part is trained on its own members, with `nlist / parts`
    /// lists.
    pub fn build(
        dim: usize,
        metric: Metric,
        kind: FaissKind,
        memories: &[Memory],
        max_part: usize,
    ) -> Result<Self, VectorError> {
        let n_parts = memories.len().div_ceil(max_part.max(1)).clamp(1, MAX_PARTS);
        let mut parts = Vec::with_capacity(n_parts);
        for p in 0..n_parts {
            let part_kind = match kind {
                FaissKind::Flat | FaissKind::Hnsw { .. } => kind,
                FaissKind::Ivf { nlist } => {
                    let members = memories.len().div_ceil(n_parts).max(1) as u32;
                    FaissKind::Ivf { nlist: (nlist / n_parts as u32).clamp(1, members) }
                }
            };
            let mut index = FaissIndex::new(dim, metric, part_kind)?;
            if let FaissKind::Ivf { .. } = part_kind {
                let mut sample = Vec::with_capacity(memories.len() / n_parts * dim + dim);
                for m in memories.iter().skip(p).step_by(n_parts) {
                    sample.extend_from_slice(&prepared(metric, &m.embedding));
                }
                index.train(&sample)?;
            }
            parts.push(index);
        }
        let mut shard = Self::empty(dim, metric, kind, parts);
        // Big adds: an HNSW graph inserts a batch on every core.
        for chunk in memories.chunks(BUILD_CHUNK) {
            shard.upsert_many(&chunk.iter().collect::<Vec<_>>())?;
        }
        Ok(shard)
    }

    fn empty(dim: usize, metric: Metric, kind: FaissKind, parts: Vec<FaissIndex>) -> Self {
        Shard {
            metric,
            dim,
            kind,
            parts,
            next_slot: 0,
            slots: HashMap::new(),
            docs: HashMap::new(),
            tag_index: HashMap::new(),
            expiring: Default::default(),
            live: RoaringTreemap::new(),
            identity: IDENTITIES.fetch_add(1, Ordering::Relaxed),
            changes: 1,
            saved: AtomicU64::new(0),
        }
    }

    /// A shard from an index file's metadata and its FAISS parts (already read and checked).
    pub(crate) fn from_parts(meta: ShardMeta, parts: Vec<FaissIndex>) -> Result<Self, VectorError> {
        let corrupt = |what: String| VectorError::Faiss(format!("index file: {what}"));
        if parts.len() != meta.parts as usize || parts.is_empty() {
            return Err(corrupt(format!("{} parts, metadata says {}", parts.len(), meta.parts)));
        }
        let mut shard = Self::empty(meta.dim as usize, meta.metric, meta.kind, parts);
        shard.next_slot = meta.next_slot;
        for (slot, doc) in meta.docs {
            if slot >= meta.next_slot || shard.docs.contains_key(&slot) || shard.slots.contains_key(&doc.id) {
                return Err(corrupt(format!("slot {slot} repeated or out of range")));
            }
            shard.index_doc(slot, doc);
        }
        let indexed: usize = shard.parts.iter().map(|p| p.len()).sum();
        if indexed != shard.docs.len() {
            return Err(corrupt(format!("{indexed} vectors for {} memories", shard.docs.len())));
        }
        shard.saved.store(shard.changes, Ordering::Relaxed);
        Ok(shard)
    }

    /// The slots each part of a shard with this metadata holds.
    pub(crate) fn part_slots(meta: &ShardMeta) -> Vec<RoaringTreemap> {
        let n = meta.parts.max(1) as u64;
        let mut out = vec![RoaringTreemap::new(); n as usize];
        for (slot, _) in &meta.docs {
            out[(slot % n) as usize].insert(*slot);
        }
        out
    }

    /// The metadata an index file stores, and the parts to write beside it.
    pub(crate) fn to_parts(&self) -> (ShardMeta, &[FaissIndex]) {
        let mut docs: Vec<(u64, Doc)> = self.docs.iter().map(|(s, d)| (*s, d.clone())).collect();
        docs.sort_by_key(|(s, _)| *s);
        let meta = ShardMeta {
            metric: self.metric,
            dim: self.dim as u32,
            kind: self.kind,
            parts: self.parts.len() as u32,
            part_kinds: self.parts.iter().map(FaissIndex::kind).collect(),
            part_labels: self.parts.iter().map(|p| p.graph_labels().map(<[u64]>::to_vec)).collect(),
            next_slot: self.next_slot,
            docs,
        };
        (meta, &self.parts)
    }

    /// A copy of everything an index file holds: the metadata and clones of the FAISS parts
    /// (a memory copy, far shorter than writing and syncing files under the lock).
    pub(crate) fn freeze(&self) -> Result<FrozenShard, VectorError> {
        let (meta, parts) = self.to_parts();
        let parts = parts.iter().map(FaissIndex::clone_native).collect::<Result<_, _>>()?;
        Ok(FrozenShard { meta, parts, identity: self.identity, changes: self.changes })
    }

    /// Changed since it was last written to (or read from) an index file.
    pub(crate) fn is_dirty(&self) -> bool {
        self.saved.load(Ordering::Relaxed) != self.changes
    }

    /// Index files now hold `frozen`: this shard is clean unless it changed since (or is not
    /// the shard that was frozen).
    pub(crate) fn mark_saved(&self, frozen: &FrozenShard) {
        if frozen.identity == self.identity {
            self.saved.fetch_max(frozen.changes, Ordering::Relaxed);
        }
    }

    fn changed(&mut self) {
        self.changes += 1;
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

    /// How many parts the shard is split into.
    pub fn parts(&self) -> usize {
        self.parts.len()
    }

    /// Tombstones in the shard's HNSW graphs (0 for Flat and IVF).
    pub fn dead(&self) -> usize {
        self.parts.iter().map(FaissIndex::dead).sum()
    }

    /// Whether tombstones have grown to [`COMPACT_DEAD_SHARE`] of the graph: searches then
    /// walk (and filter out) too many dead nodes, and a rebuild should drop them.
    pub fn needs_compaction(&self) -> bool {
        let dead = self.dead();
        dead >= 64 && dead as f64 >= COMPACT_DEAD_SHARE * (dead + self.len()) as f64
    }

    fn part_of(&self, slot: u64) -> usize {
        (slot % self.parts.len() as u64) as usize
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
            if let Some(at) = doc.expires_at_ms {
                self.expiring.remove(&(at, slot));
            }
            self.live.remove(slot);
        }
    }

    fn index_doc(&mut self, slot: u64, doc: Doc) {
        for (k, val) in &doc.tags {
            self.tag_index.entry((k.clone(), val.clone())).or_default().insert(slot);
        }
        if let Some(at) = doc.expires_at_ms {
            self.expiring.insert((at, slot));
        }
        self.live.insert(slot);
        self.slots.insert(doc.id.clone(), slot);
        self.docs.insert(slot, doc);
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
        let part = self.part_of(slot);
        self.parts[part].upsert(&[slot], &prepared(self.metric, &m.embedding))?;
        self.unindex(slot);
        self.index_doc(slot, Doc::of(m));
        self.changed();
        Ok(())
    }

    /// [`upsert`](Self::upsert)s many memories with one FAISS call per part instead of one
    /// per memory (a big PutBatch). A later memory with the same id replaces an earlier one,
    /// as in order. A wrong dimension anywhere changes nothing.
    pub fn upsert_many(&mut self, memories: &[&Memory]) -> Result<(), VectorError> {
        if let Some(m) = memories.iter().find(|m| m.embedding.len() != self.dim) {
            return Err(VectorError::Dimension { expected: self.dim, got: m.embedding.len() });
        }
        let mut last: HashMap<&str, usize> = HashMap::with_capacity(memories.len());
        for (i, m) in memories.iter().enumerate() {
            last.insert(m.id.as_str(), i);
        }
        let mut per_part: Vec<(Vec<u64>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); self.parts.len()];
        let mut planned = Vec::with_capacity(last.len());
        for (i, m) in memories.iter().enumerate() {
            if last[m.id.as_str()] != i {
                continue;
            }
            let slot = match self.slots.get(&m.id) {
                Some(s) => *s,
                None => {
                    self.next_slot += 1;
                    // Reserved now so that a second new id in this batch gets its own slot.
                    self.slots.insert(m.id.clone(), self.next_slot - 1);
                    self.next_slot - 1
                }
            };
            let (slots, vectors) = &mut per_part[self.part_of(slot)];
            slots.push(slot);
            vectors.extend(prepared(self.metric, &m.embedding));
            planned.push((slot, *m));
        }
        for (part, (slots, vectors)) in per_part.iter().enumerate() {
            if !slots.is_empty() {
                self.parts[part].upsert(slots, vectors)?;
            }
        }
        for (slot, m) in planned {
            self.unindex(slot);
            self.index_doc(slot, Doc::of(m));
        }
        self.changed();
        Ok(())
    }

    pub fn remove(&mut self, id: &str) -> Result<(), VectorError> {
        if let Some(slot) = self.slots.remove(id) {
            let part = self.part_of(slot);
            self.parts[part].remove(&[slot])?;
            self.unindex(slot);
            self.changed();
        }
        Ok(())
    }

    /// Removes many ids with one index call per part (a FAISS removal scans its part, so a
    /// purge of a thousand memories costs a scan per part, not per memory).
    pub fn remove_many<'a>(&mut self, ids: impl IntoIterator<Item = &'a str>) -> Result<(), VectorError> {
        let mut per_part: Vec<Vec<u64>> = vec![Vec::new(); self.parts.len()];
        for id in ids {
            if let Some(slot) = self.slots.remove(id) {
                per_part[self.part_of(slot)].push(slot);
                self.unindex(slot);
            }
        }
        for (part, slots) in per_part.iter().enumerate() {
            if !slots.is_empty() {
                self.parts[part].remove(slots)?;
                self.changed();
            }
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
        if let Some(scope) = &f.scope {
            let mut any = RoaringTreemap::new();
            for pair in scope {
                if let Some(b) = self.tag_index.get(pair) {
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
        // Only the expired ones are visited (a range of the expiry order), and the purge
        // removes them soon after.
        let expired: RoaringTreemap =
            self.expiring.range(..(now_ms.saturating_add(1), 0)).map(|(_, slot)| *slot).collect();
        if !expired.is_empty() {
            let base = allowed.take().unwrap_or_else(|| self.live.clone());
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
        let hits = if self.parts.len() == 1 {
            self.parts[0].search(&q, k, allowed.as_ref(), params)?
        } else {
            // Every part gets the whole filter: a part's FAISS selector only ever meets its
            // own slots, and each part returns its k best, so the merge holds the global k.
            let per_part: Vec<Result<Vec<Hit>, VectorError>> = std::thread::scope(|s| {
                let handles: Vec<_> = self
                    .parts
                    .iter()
                    .map(|p| {
                        let (q, allowed) = (&q, allowed.as_ref());
                        s.spawn(move || p.search(q, k, allowed, params))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| Err(VectorError::Faiss("search part panicked".into()))))
                    .collect()
            });
            let mut merged = Vec::with_capacity(k * self.parts.len());
            for hits in per_part {
                merged.extend(hits?);
            }
            rank(self.metric, &mut merged, k);
            merged
        };
        Ok(hits.into_iter().filter_map(|h| self.docs.get(&h.id).map(|d| (d.id.clone(), h.score))).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIM: usize = 8;

    fn vector(seed: u64) -> Vec<f32> {
        (0..DIM as u64).map(|i| (((seed * 7919 + i * 104_729) % 1000) as f32 / 500.0) - 1.0).collect()
    }

    fn memory(id: &str, seed: u64, tag: &str) -> Memory {
        Memory {
            namespace: "n".into(),
            id: id.into(),
            embedding: vector(seed),
            tags: [("k".to_string(), tag.to_string())].into(),
            importance: 0.5,
            ..Default::default()
        }
    }

    #[test]
    fn a_batched_upsert_is_the_same_as_one_at_a_time() {
        for max_part in [usize::MAX, 40] {
            let base: Vec<Memory> =
                (0..100).map(|i| memory(&format!("m{i}"), i, if i % 2 == 0 { "even" } else { "odd" })).collect();
            let mut one = Shard::build(DIM, Metric::Cosine, FaissKind::Flat, &base, max_part).unwrap();
            let mut many = Shard::build(DIM, Metric::Cosine, FaissKind::Flat, &base, max_part).unwrap();
            // Updates of existing ids (new vectors, tags flipped), new ids, and ids given twice
            // (the later wins), one new and one existing.
            let mut batch: Vec<Memory> = (0..30).map(|i| memory(&format!("m{i}"), 500 + i, "odd")).collect();
            batch.extend((100..130).map(|i| memory(&format!("m{i}"), i, "even")));
            batch.push(memory("twice", 900, "odd"));
            batch.push(memory("m40", 901, "odd"));
            batch.push(memory("twice", 902, "even"));
            batch.push(memory("m40", 903, "even"));
            for m in &batch {
                one.upsert(m).unwrap();
            }
            many.upsert_many(&batch.iter().collect::<Vec<_>>()).unwrap();
            assert_eq!(one.len(), many.len());
            assert_eq!(many.len(), 131);
            let even = Filter { tags: vec![("k".into(), "even".into())], ..Default::default() };
            for q in 0..20 {
                for f in [Filter::default(), even.clone()] {
                    let a = one.search(&vector(q * 31), 10, &f, SearchParams::default(), 0).unwrap();
                    let b = many.search(&vector(q * 31), 10, &f, SearchParams::default(), 0).unwrap();
                    assert_eq!(a.len(), b.len());
                    for (x, y) in a.iter().zip(&b) {
                        assert_eq!(x.0, y.0, "max_part {max_part}, query {q}, {f:?}");
                        assert!((x.1 - y.1).abs() < 1e-5);
                    }
                }
            }
            // A wrong dimension anywhere in the batch changes nothing.
            let mut bad = memory("m1", 1, "odd");
            bad.embedding.pop();
            let fresh = memory("new-one", 5, "odd");
            assert!(many.upsert_many(&[&fresh, &bad]).is_err());
            assert_eq!(many.len(), 131);
        }
    }
}
