//! [`VectorStore`]: every namespace's [`Shard`] on this node, kept in step with the state
//! machine. `apply` feeds it the [`VectorOp`]s of each committed batch before the batch's
//! results are released, so a read that waits for an applied index also sees that index in
//! search. On start and after a snapshot install it is rebuilt from redb.

use std::collections::HashMap;
use std::sync::RwLock;

use super::shard::{Filter, Shard};
use super::{SearchParams, VectorError};
use crate::error::StorageError;
use crate::memory::{Memory, Metric};
use crate::storage::StateReader;

/// A change to the vector view, produced by `apply` for each state change it makes.
#[derive(Debug, Clone)]
pub enum VectorOp {
    Namespace { namespace: String, dimension: u32, metric: Metric },
    Upsert { metric: Metric, memory: Box<Memory> },
    Remove { namespace: String, id: String },
    DropNamespace { namespace: String },
}

#[derive(Default)]
pub struct VectorStore {
    shards: RwLock<HashMap<String, Shard>>,
}

#[derive(Debug, thiserror::Error)]
pub enum VectorStoreError {
    #[error(transparent)]
    Vector(#[from] VectorError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl VectorStore {
    pub fn apply(&self, ops: &[VectorOp]) -> Result<(), VectorError> {
        if ops.is_empty() {
            return Ok(());
        }
        let mut shards = self.shards.write().unwrap_or_else(|p| p.into_inner());
        for op in ops {
            match op {
                VectorOp::Namespace { namespace, dimension, metric } => {
                    if !shards.contains_key(namespace) {
                        shards.insert(namespace.clone(), Shard::new(*dimension as usize, *metric)?);
                    }
                }
                VectorOp::Upsert { metric, memory } => {
                    let shard = match shards.get_mut(&memory.namespace) {
                        Some(s) => s,
                        None => shards
                            .entry(memory.namespace.clone())
                            .or_insert(Shard::new(memory.embedding.len(), *metric)?),
                    };
                    shard.upsert(memory)?;
                }
                VectorOp::Remove { namespace, id } => {
                    if let Some(s) = shards.get_mut(namespace) {
                        s.remove(id)?;
                    }
                }
                VectorOp::DropNamespace { namespace } => {
                    shards.remove(namespace);
                }
            }
        }
        let total: usize = shards.values().map(Shard::len).sum();
        metrics::gauge!("engram_vector_indexed_memories").set(total as f64);
        Ok(())
    }

    /// Replaces every shard with one built from the state machine's current contents.
    pub fn rebuild(&self, reader: &StateReader) -> Result<(), VectorStoreError> {
        let started = std::time::Instant::now();
        let mut fresh = HashMap::new();
        for info in reader.namespaces()? {
            let mut shard = Shard::new(info.dimension as usize, info.metric)?;
            let mut after: Option<String> = None;
            loop {
                let (_, page) = reader.list(&info.name, after.as_deref(), 4096, 0)?;
                for m in &page.memories {
                    shard.upsert(m)?;
                }
                match page.next_after {
                    Some(a) => after = Some(a),
                    None => break,
                }
            }
            fresh.insert(info.name.clone(), shard);
        }
        let n: usize = fresh.values().map(Shard::len).sum();
        *self.shards.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        metrics::counter!("engram_vector_rebuilds_total").increment(1);
        metrics::gauge!("engram_vector_indexed_memories").set(n as f64);
        tracing::info!(memories = n, elapsed_ms = started.elapsed().as_millis() as u64, "vector shards rebuilt");
        Ok(())
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
        let shards = self.shards.read().unwrap_or_else(|p| p.into_inner());
        match shards.get(namespace) {
            Some(s) => s.search(query, k, filter, params, now_ms).map(Some),
            None => Ok(None),
        }
    }
}
