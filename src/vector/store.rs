//! [`VectorStore`]: every namespace's [`Shard`] on this node, kept in step with the state
//! machine. `apply` feeds it the [`VectorOp`]s of each committed batch before the batch's
//! results are released, so a read that waits for an applied index also sees that index in
//! search. On start and after a snapshot install it is rebuilt from redb.

use std::collections::HashMap;
use std::sync::RwLock;

use super::faiss::FaissKind;
use super::shard::{Filter, Shard};
use super::{SearchParams, VectorError};
use crate::error::StorageError;
use crate::memory::{Memory, Metric};
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

pub struct VectorStore {
    shards: RwLock<HashMap<String, Shard>>,
    reader: StateReader,
}

#[derive(Debug, thiserror::Error)]
pub enum VectorStoreError {
    #[error(transparent)]
    Vector(#[from] VectorError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl VectorStore {
    /// A store over the state machine that `reader` reads (it rebuilds shards from there).
    pub fn new(reader: StateReader) -> Self {
        VectorStore { shards: RwLock::default(), reader }
    }

    pub fn apply(&self, ops: &[VectorOp]) -> Result<(), VectorStoreError> {
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
                // Later ops of the same batch may touch this namespace again: the rebuilt
                // shard reflects the whole committed batch, and replaying them is idempotent.
                // Dimension and metric come from the committed namespace, not the old shard: a
                // later entry of the batch may have dropped and re-created it differently.
                VectorOp::Rebuild { namespace, kind } => match self.reader.namespace(namespace)? {
                    Some(info) => {
                        let rebuilt = self.build_namespace(namespace, info.dimension as usize, info.metric, *kind)?;
                        shards.insert(namespace.clone(), rebuilt);
                    }
                    None => {
                        shards.remove(namespace);
                    }
                },
            }
        }
        Self::export(&shards);
        Ok(())
    }

    fn export(shards: &HashMap<String, Shard>) {
        let total: usize = shards.values().map(Shard::len).sum();
        metrics::gauge!("engram_vector_indexed_memories").set(total as f64);
        for (ns, s) in shards {
            metrics::gauge!("engram_vector_shard_memories", "namespace" => ns.clone()).set(s.len() as f64);
        }
    }

    /// Builds one namespace's shard from the state machine with the given kind.
    fn build_namespace(
        &self,
        ns: &str,
        dim: usize,
        metric: Metric,
        kind: FaissKind,
    ) -> Result<Shard, VectorStoreError> {
        let started = std::time::Instant::now();
        let mut memories = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let (_, page) = self.reader.list(ns, after.as_deref(), 4096, 0)?;
            memories.extend(page.memories);
            match page.next_after {
                Some(a) => after = Some(a),
                None => break,
            }
        }
        let kind = match kind {
            FaissKind::Flat => FaissKind::Flat,
            // Never fewer training points than lists.
            FaissKind::Ivf { .. } if memories.is_empty() => FaissKind::Flat,
            FaissKind::Ivf { nlist } => FaissKind::Ivf { nlist: nlist.min(memories.len() as u32) },
        };
        let shard = Shard::build(dim, metric, kind, &memories)?;
        metrics::counter!("engram_vector_rebuilds_total", "namespace" => ns.to_string()).increment(1);
        tracing::info!(
            namespace = ns,
            memories = memories.len(),
            ?kind,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "vector shard built"
        );
        Ok(shard)
    }

    /// The kind and size of every shard (for status and tests).
    pub fn shard_kinds(&self) -> Vec<(String, FaissKind, usize)> {
        let shards = self.shards.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<_> = shards.iter().map(|(n, s)| (n.clone(), s.kind(), s.len())).collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Replaces every shard with one built from the state machine's current contents.
    pub fn rebuild(&self) -> Result<(), VectorStoreError> {
        let mut fresh = HashMap::new();
        for info in self.reader.namespaces()? {
            let shard = self.build_namespace(&info.name, info.dimension as usize, info.metric, info.index)?;
            fresh.insert(info.name.clone(), shard);
        }
        let mut shards = self.shards.write().unwrap_or_else(|p| p.into_inner());
        *shards = fresh;
        Self::export(&shards);
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
