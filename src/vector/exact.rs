//! Brute-force exact search in pure Rust: the test oracle. Ties are broken by id so results
//! are fully deterministic.

use std::collections::BTreeMap;

use roaring::RoaringTreemap;

use super::{check_shape, rank, Hit, SearchParams, VectorError, VectorIndex};
use crate::memory::Metric;

pub struct ExactIndex {
    dim: usize,
    metric: Metric,
    vectors: BTreeMap<u64, Vec<f32>>,
}

impl ExactIndex {
    pub fn new(dim: usize, metric: Metric) -> Self {
        ExactIndex { dim, metric, vectors: BTreeMap::new() }
    }

    fn score(&self, a: &[f32], b: &[f32]) -> f32 {
        match self.metric {
            Metric::L2 => a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum(),
            Metric::Cosine | Metric::InnerProduct => a.iter().zip(b).map(|(x, y)| x * y).sum(),
        }
    }
}

impl VectorIndex for ExactIndex {
    fn dimension(&self) -> usize {
        self.dim
    }

    fn metric(&self) -> Metric {
        self.metric
    }

    fn len(&self) -> usize {
        self.vectors.len()
    }

    fn upsert(&mut self, ids: &[u64], vectors: &[f32]) -> Result<(), VectorError> {
        check_shape(self.dim, ids, vectors)?;
        for (id, v) in ids.iter().zip(vectors.chunks_exact(self.dim)) {
            self.vectors.insert(*id, v.to_vec());
        }
        Ok(())
    }

    fn remove(&mut self, ids: &[u64]) -> Result<usize, VectorError> {
        Ok(ids.iter().filter(|id| self.vectors.remove(id).is_some()).count())
    }

    fn search(
        &self,
        query: &[f32],
        k: usize,
        filter: Option<&RoaringTreemap>,
        _params: SearchParams,
    ) -> Result<Vec<Hit>, VectorError> {
        if query.len() != self.dim {
            return Err(VectorError::Dimension { expected: self.dim, got: query.len() });
        }
        let mut hits: Vec<Hit> = self
            .vectors
            .iter()
            .filter(|(id, _)| filter.is_none_or(|f| f.contains(**id)))
            .map(|(id, v)| Hit { id: *id, score: self.score(query, v) })
            .collect();
        rank(self.metric, &mut hits, k);
        Ok(hits)
    }
}
