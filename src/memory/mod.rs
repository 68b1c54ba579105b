//! The memory model: what a memory is, what a namespace fixes, and the limits every input is
//! validated against before it may reach the Raft log.
//!
//! Key types: [`Memory`] (a stored record), [`MemoryInput`] (what a client writes),
//! [`Precondition`] (compare-and-set guard), [`NamespaceInfo`].

mod validate;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use validate::{validate_embedding, validate_id, validate_input, validate_namespace, Limits};

/// Distance metric of a namespace, fixed at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Metric {
    Cosine,
    L2,
    InnerProduct,
}

/// A namespace's fixed settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceInfo {
    pub name: String,
    pub dimension: u32,
    pub metric: Metric,
    pub memory_count: u64,
    pub created_at_ms: u64,
}

/// A stored memory. `revision` is the log index of its last write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
