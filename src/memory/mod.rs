//! The memory model: what a memory is, what a namespace fixes, and the limits every input is
//! validated against before it may reach the Raft log.
//!
//! Key types: [`Memory`] (a stored record), [`MemoryInput`] (what a client writes),
//! [`Precondition`] (compare-and-set guard), [`NamespaceInfo`].

pub mod policy;
mod validate;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use policy::MemoryPolicy;
pub use validate::{
    validate_embedding, validate_id, validate_input, validate_namespace, Limits, MAX_ELEMENT, MAX_NAMESPACE_BYTES,
    MAX_NAMESPACE_DEPTH,
};

/// Distance metric of a namespace, fixed at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Metric {
    Cosine,
    L2,
    InnerProduct,
}

/// The vector index structure of a namespace's shard. Part of the replicated state: `apply`
/// changes it as the namespace grows or shrinks, so every node builds the same kind with the
/// same parameters. (IVF centroids and HNSW graphs are built from the state a node sees when
/// it builds the shard, so they can differ between nodes; approximate search may differ with
/// them, which is why `apply` itself only ever searches exactly.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IndexKind {
    /// Exact search.
    Flat,
    /// Approximate inverted-file search over `nlist` k-means cells. Namespaces no longer move
    /// to IVF by size (HNSW answers better at every size measured); those already IVF keep
    /// their lists and retrain as they grow.
    Ivf { nlist: u32 },
    /// Approximate graph search (FAISS HNSW, `m` links per node and layer). A graph cannot
    /// drop a node: replaced and removed vectors stay as tombstones that every search filters
    /// out, until the part is rebuilt without them.
    Hnsw { m: u32 },
}

/// Links per HNSW node: 32 is FAISS's recommendation for ~400-d sentence embeddings (16 loses
/// recall at the same ef, 64 doubles the graph's memory for little gain).
pub const HNSW_M: u32 = 32;

impl IndexKind {
    fn nlist_for(n: u64) -> u32 {
        ((n as f64).sqrt() as u32).next_power_of_two().clamp(16, 65_536).min(n.max(1) as u32)
    }

    /// The kind a namespace of `n` memories moves to from `self`, given its approximate-index
    /// threshold: HNSW from `approx_min` memories, back to Flat below half the threshold. An
    /// IVF namespace retrains when √n moves 4× away from `nlist` (`nlist` ≈ √n, a power of two)
    /// and becomes Flat below half the threshold. A pure function of replicated values, so
    /// every node decides the same at the same log index.
    pub fn next(self, n: u64, approx_min: u64) -> IndexKind {
        match self {
            IndexKind::Flat if n >= approx_min => IndexKind::Hnsw { m: HNSW_M },
            IndexKind::Flat => IndexKind::Flat,
            IndexKind::Hnsw { .. } | IndexKind::Ivf { .. } if n < approx_min / 2 => IndexKind::Flat,
            IndexKind::Hnsw { .. } => self,
            IndexKind::Ivf { nlist } => {
                let want = Self::nlist_for(n);
                if want >= nlist.saturating_mul(4) || want.saturating_mul(4) <= nlist {
                    IndexKind::Ivf { nlist: want }
                } else {
                    self
                }
            }
        }
    }
}

/// A namespace's settings and size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceInfo {
    pub name: String,
    pub dimension: u32,
    pub metric: Metric,
    pub memory_count: u64,
    pub created_at_ms: u64,
    /// The shard structure every node builds for this namespace.
    pub index: IndexKind,
    /// Memories from which the shard becomes IVF; fixed at creation by the leader.
    pub approx_min_vectors: u64,
    /// Sum of [`Memory::stored_bytes`] over the namespace (what byte quotas count).
    pub bytes: u64,
}

/// What the memory model did in a namespace, counted in `apply` (replicated: equal on every
/// node). Refusals are not counted here (a refused write changes nothing); see the metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct NamespaceStats {
    /// Memories created by puts.
    pub created: u64,
    /// Existing memories replaced by puts naming their id.
    pub updated: u64,
    /// Puts answered with an existing memory (exact duplicates).
    pub dedup_hits: u64,
    /// Near-duplicate puts merged into their twin.
    pub near_merges: u64,
    /// Near-duplicate puts kept beside their twin, linked.
    pub near_links: u64,
    /// Memories absorbed by consolidation.
    pub consolidated: u64,
    /// Expired memories purged.
    pub purged: u64,
    /// Memories dropped by retention (archived ones included).
    pub retired: u64,
    /// Memories written to retention archives before they were dropped.
    pub archived: u64,
    /// Access counts added by reinforcement.
    pub reinforced: u64,
}

impl NamespaceStats {
    /// Share of deduplicating puts that found an exact duplicate.
    pub fn dedup_hit_rate(&self) -> f64 {
        let puts = self.created + self.dedup_hits;
        if puts == 0 {
            0.0
        } else {
            self.dedup_hits as f64 / puts as f64
        }
    }
}

/// A stored memory. `revision` is the log index of its last write (reinforcement, which only
/// moves `last_accessed_at_ms` and `access_count`, keeps it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Memory {
    pub namespace: String,
    pub id: String,
    pub text: String,
    pub embedding: Vec<f32>,
    pub tags: BTreeMap<String, String>,
    pub importance: f32,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub last_accessed_at_ms: u64,
    pub expires_at_ms: Option<u64>,
    pub content_hash: [u8; 32],
    pub revision: u64,
    /// Reads and search hits that asked to reinforce it, plus exact duplicates merged into it.
    pub access_count: u64,
    /// Memories merged into this one (near-duplicate merges and consolidation).
    pub merge_count: u32,
    /// The ids it absorbed, newest last (at most [`policy::MAX_PROVENANCE`]).
    pub merged_from: Vec<String>,
    /// The near-duplicate this memory was kept beside (`NearAction::Link`).
    pub linked_to: Option<String>,
}

impl Memory {
    /// Whether it has expired at `now_ms`: from then on it is absent to reads and writes.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|e| e <= now_ms)
    }
}

/// What a memory weighs against a byte quota: text, vector and tags as the client sent them.
fn weight(text: &str, embedding: &[f32], tags: &BTreeMap<String, String>) -> u64 {
    (text.len() + embedding.len() * 4 + tags.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()) as u64
}

impl Memory {
    pub fn stored_bytes(&self) -> u64 {
        weight(&self.text, &self.embedding, &self.tags)
    }
}

impl MemoryInput {
    pub fn stored_bytes(&self) -> u64 {
        weight(&self.text, &self.embedding, &self.tags)
    }
}

/// What a client writes. By the time it is in a log entry, `id` is always set (the leader
/// assigns one when the client did not).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryInput {
    pub id: String,
    pub text: String,
    pub embedding: Vec<f32>,
    pub tags: BTreeMap<String, String>,
    pub importance: f32,
    pub expires_at_ms: Option<u64>,
}

/// Default importance when a client gives none.
pub const DEFAULT_IMPORTANCE: f32 = 0.5;

/// Compare-and-set guard on a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Precondition {
    #[default]
    None,
    /// Apply only if no memory with this id exists.
    Absent,
    /// Apply only if the memory exists at exactly this revision.
    Revision(u64),
}

impl Precondition {
    /// Checks the guard against the current revision (`None` = absent).
    pub fn holds(&self, current: Option<u64>) -> bool {
        match self {
            Precondition::None => true,
            Precondition::Absent => current.is_none(),
            Precondition::Revision(r) => current == Some(*r),
        }
    }
}

/// BLAKE3 of the text: the exact-duplicate key.
pub fn content_hash(text: &str) -> [u8; 32] {
    *blake3::hash(text.as_bytes()).as_bytes()
}

/// A new time-ordered id (UUIDv7). Only the leader calls this, before proposing.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Wall-clock Unix milliseconds: for stamping commands on the leader and files, never in `apply`.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::IndexKind::{self, Flat, Hnsw, Ivf};

    #[test]
    fn index_kind_follows_size_with_hysteresis() {
        let min = 1000;
        let hnsw = Hnsw { m: super::HNSW_M };
        assert_eq!(Flat.next(999, min), Flat);
        assert_eq!(Flat.next(1000, min), hnsw);
        assert_eq!(hnsw.next(10_000_000, min), hnsw);
        // Shrinking: still HNSW down to half the threshold, then exact.
        assert_eq!(hnsw.next(500, min), hnsw);
        assert_eq!(hnsw.next(499, min), Flat);
        // An IVF namespace keeps its lists for small moves; a 16x growth (4x in sqrt) retrains.
        assert_eq!(Ivf { nlist: 32 }.next(4000, min), Ivf { nlist: 32 });
        assert_eq!(Ivf { nlist: 32 }.next(16_384, min), Ivf { nlist: 128 });
        assert_eq!(Ivf { nlist: 32 }.next(500, min), Ivf { nlist: 32 });
        assert_eq!(Ivf { nlist: 32 }.next(499, min), Flat);
        // At least 16 lists, never more lists than memories.
        assert_eq!(Ivf { nlist: 16 }.next(12, 10), Ivf { nlist: 16 });
        let k: IndexKind = Ivf { nlist: 16 }.next(10_000_000, min);
        assert_eq!(k, Ivf { nlist: 4096 });
    }
}
