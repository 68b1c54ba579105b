//! Consolidation plans: the clusters of near-duplicates in a namespace, computed on the
//! leader from its state and shard, then put into the log whole (`Op::Consolidate`), so every
//! node merges exactly what the plan lists.
//!
//! A cluster is a connected component of the "twin" graph: two live memories are twins when
//! their exact score ([`exact_score`]) passes the threshold. Each memory's candidates are its
//! 32 nearest in the shard. The keeper is the member with the highest importance, then the
//! most accesses, then the oldest, then the smallest id; the others are absorbed in id order.
//! Clusters are listed by keeper id, at most `max_clusters`. A dry run lists the same plan.
//!
//! Only memories with exactly the same tags share a cluster, so consolidation never moves
//! one tag scope's memory into another's, nor an untagged one into a scope. A cluster holds at most
//! [`MAX_CLUSTER_MEMBERS`] and a plan at most [`MAX_PLAN_MEMBERS`], so its log entry stays far
//! below the peer message limit whatever the threshold.

use std::collections::BTreeMap;

use crate::error::ApiError;
use crate::memory::policy::{exact_score, is_twin};
use crate::memory::{Memory, NamespaceInfo};
use crate::raft::ConsolidationCluster;
use crate::storage::StateReader;
use crate::vector::{Filter, SearchParams, VectorStore};

const NEIGHBOURS: usize = 32;
pub const MAX_CLUSTER_MEMBERS: usize = 256;
pub const MAX_PLAN_MEMBERS: usize = 10_000;

fn find(parent: &mut [usize], mut i: usize) -> usize {
    while parent[i] != i {
        parent[i] = parent[parent[i]];
        i = parent[i];
    }
    i
}

pub(super) fn plan(
    reader: &StateReader,
    vectors: &VectorStore,
    info: &NamespaceInfo,
    threshold: f32,
    max_clusters: usize,
) -> Result<Vec<ConsolidationCluster>, ApiError> {
    let now = crate::memory::now_ms();
    let storage = |e: crate::error::StorageError| ApiError::Internal(e.to_string());
    let all: Vec<Memory> = reader.all_live(&info.name, now).map_err(storage)?;
    let pos: BTreeMap<&str, usize> = all.iter().enumerate().map(|(i, m)| (m.id.as_str(), i)).collect();
    let mut parent: Vec<usize> = (0..all.len()).collect();
    // Per cluster root, its size. Every member of a cluster has its root's tags.
    let mut size: Vec<usize> = vec![1; all.len()];
    for (i, m) in all.iter().enumerate() {
        let hits = vectors
            .search(&info.name, &m.embedding, NEIGHBOURS, &Filter::default(), SearchParams::default(), now)
            .map_err(|e| ApiError::Internal(format!("vector search: {e}")))?
            .unwrap_or_default();
        for (id, _) in hits {
            let Some(&j) = pos.get(id.as_str()) else { continue };
            // Exactly the same tags, so a merge never gives a memory a tag (and with it a tag
            // scope's readers) it did not have.
            if j == i
                || m.tags != all[j].tags
                || !is_twin(info.metric, exact_score(info.metric, &m.embedding, &all[j].embedding), threshold)
            {
                continue;
            }
            let (a, b) = (find(&mut parent, i), find(&mut parent, j));
            if a == b || size[a] + size[b] > MAX_CLUSTER_MEMBERS {
                continue;
            }
            let (root, child) = (a.min(b), a.max(b));
            parent[child] = root;
            size[root] += size[child];
        }
    }
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for i in 0..all.len() {
        let root = find(&mut parent, i);
        groups.entry(root).or_default().push(i);
    }
    let mut clusters: Vec<ConsolidationCluster> = groups
        .into_values()
        .filter(|g| g.len() > 1)
        .map(|g| {
            let keep = *g
                .iter()
                .max_by(|&&a, &&b| {
                    let (x, y) = (&all[a], &all[b]);
                    x.importance
                        .total_cmp(&y.importance)
                        .then(x.access_count.cmp(&y.access_count))
                        .then(y.created_at_ms.cmp(&x.created_at_ms))
                        .then(y.id.cmp(&x.id))
                })
                .expect("a cluster has members");
            let mut absorb: Vec<(String, u64)> =
                g.iter().filter(|&&i| i != keep).map(|&i| (all[i].id.clone(), all[i].revision)).collect();
            absorb.sort();
            ConsolidationCluster { keep: (all[keep].id.clone(), all[keep].revision), absorb }
        })
        .collect();
    clusters.sort_by(|a, b| a.keep.0.cmp(&b.keep.0));
    clusters.truncate(max_clusters);
    let mut members = 0;
    clusters.retain(|c| {
        members += 1 + c.absorb.len();
        members <= MAX_PLAN_MEMBERS
    });
    Ok(clusters)
}
