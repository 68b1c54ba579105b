//! `Search` and `SearchBatch`: validate, linearize, authorize each query's namespace (a
//! tag-scoped grant becomes a filter inside FAISS, so a scoped search still returns k hits),
//! search on the blocking pool, and assemble a response of bounded size.

use std::time::Instant;

use super::convert::{self, memory_to_pb};
use super::memory_service::MemoryApi;
use crate::auth::policy::Access;
use crate::auth::records::Permission;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::memory::policy::{rank_score, Decay, RankInput};
use crate::memory::validate_namespace;
use crate::proto as pb;
use crate::vector::{better, SearchParams};

const MAX_K: u32 = 1000;
const MAX_BATCH_QUERIES: usize = 256;
/// Hits a batch may ask for in all (queries × k).
const MAX_BATCH_HITS: usize = 16_384;

/// A validated search, not yet checked against its namespace (that waits for the read barrier).
#[derive(Clone)]
pub(super) struct SearchPlan {
    namespace: String,
    vector: Vec<f32>,
    k: usize,
    filter: crate::vector::Filter,
    score_threshold: Option<f32>,
    include_memory: bool,
    params: SearchParams,
    metric: crate::memory::Metric,
    /// The request's ranking weights; `None`: the namespace policy's.
    ranking: Option<Decay>,
    /// The weights in force once bound: `None` ranks by similarity alone.
    rank_by: Option<Decay>,
    ranking_now_ms: u64,
    reinforce: bool,
}

/// Candidates a ranked search takes by similarity before ranking them: 4k, at least 64.
fn candidates(k: usize) -> usize {
    (k * 4).max(64).min(MAX_K as usize * 4)
}

impl SearchPlan {
    /// The plan and the request's own consistency value.
    fn new(req: pb::SearchRequest) -> Result<(SearchPlan, i32), ApiError> {
        let pb::SearchRequest {
            namespace,
            vector,
            k,
            filter,
            score_threshold,
            include_memory,
            consistency,
            nprobe,
            ranking,
            reinforce,
            ranking_now_ms,
            ef_search,
        } = req;
        validate_namespace(&namespace)?;
        if k == 0 || k > MAX_K {
            return Err(ApiError::invalid("k", format!("must be 1..={MAX_K}")));
        }
        if score_threshold.is_some_and(|t| !t.is_finite()) {
            return Err(ApiError::invalid("score_threshold", "must be finite"));
        }
        let filter = convert::search_filter(filter)?;
        convert::consistency(consistency)?;
        let ranking = ranking.map(convert::decay_from_pb);
        if let Some(r) = &ranking {
            let p = crate::memory::MemoryPolicy { decay: *r, ..Default::default() };
            p.validate(crate::memory::Metric::InnerProduct)
                .map_err(|e| ApiError::invalid(e.field.replacen("policy.decay", "ranking", 1), e.reason))?;
        }
        if ef_search as usize > crate::vector::MAX_EF {
            return Err(ApiError::invalid("ef_search", format!("must be 0..={}", crate::vector::MAX_EF)));
        }
        let defaults = SearchParams::default();
        let params = SearchParams {
            nprobe: if nprobe == 0 { defaults.nprobe } else { nprobe as usize },
            ef: if ef_search == 0 { defaults.ef } else { ef_search as usize },
        };
        let plan = SearchPlan {
            namespace,
            vector,
            k: k as usize,
            filter,
            score_threshold,
            include_memory,
            params,
            metric: crate::memory::Metric::Cosine,
            ranking,
            rank_by: None,
            ranking_now_ms,
            reinforce,
        };
        Ok((plan, consistency))
    }
}

/// Prefixes an argument error's field with the query's position in a batch.
fn within(i: usize, e: ApiError) -> ApiError {
    match e {
        ApiError::InvalidArgument { field, reason } => {
            ApiError::InvalidArgument { field: format!("queries[{i}].{field}"), reason }
        }
        ApiError::PermissionDenied { field, reason } => {
            ApiError::PermissionDenied { field: format!("queries[{i}].{field}"), reason }
        }
        other => other,
    }
}

/// What a search found, before thresholds, ranking and memories are applied.
type Found = Vec<(SearchPlan, Result<Option<Vec<(String, f32)>>, crate::vector::VectorError>)>;

impl MemoryApi {
    pub(super) async fn search_inner(
        &self,
        caller: &Caller,
        req: pb::SearchRequest,
    ) -> Result<pb::SearchResponse, ApiError> {
        let started = Instant::now();
        let (plan, consistency) = SearchPlan::new(req)?;
        self.admit(caller, Permission::Read, &plan.namespace)?;
        let (found, applied) = self.searches_at(caller, vec![plan], convert::consistency(consistency)?, false).await?;
        let mut budget = self.guards.max_response_bytes;
        let (plan, hits) = found.into_iter().next().expect("one result per plan");
        let hits = self.finish(plan, hits, &mut budget)?;
        metrics::histogram!("engram_search_duration_seconds").record(started.elapsed().as_secs_f64());
        Ok(pb::SearchResponse { hits, read_index: applied })
    }

    pub(super) async fn search_batch_inner(
        &self,
        caller: &Caller,
        req: pb::SearchBatchRequest,
    ) -> Result<pb::SearchBatchResponse, ApiError> {
        let started = Instant::now();
        let pb::SearchBatchRequest { queries, consistency } = req;
        if queries.is_empty() || queries.len() > MAX_BATCH_QUERIES {
            return Err(ApiError::invalid("queries", format!("must hold 1..={MAX_BATCH_QUERIES} searches")));
        }
        let mut plans = Vec::with_capacity(queries.len());
        for (i, q) in queries.into_iter().enumerate() {
            let (plan, own) = SearchPlan::new(q).map_err(|e| within(i, e))?;
            if own != 0 && own != consistency {
                return Err(within(i, ApiError::invalid("consistency", "must be unset or the batch's")));
            }
            plans.push(plan);
        }
        let asked: usize = plans.iter().map(|p| p.k).sum();
        if asked > MAX_BATCH_HITS {
            return Err(ApiError::invalid(
                "queries",
                format!("the batch asks for {asked} hits in all; at most {MAX_BATCH_HITS}"),
            ));
        }
        for (i, p) in plans.iter().enumerate() {
            self.admit(caller, Permission::Read, &p.namespace).map_err(|e| within(i, e))?;
        }
        let (found, applied) = self.searches_at(caller, plans, convert::consistency(consistency)?, true).await?;
        let mut budget = self.guards.max_response_bytes;
        let mut results = Vec::with_capacity(found.len());
        for (plan, hits) in found {
            results.push(pb::SearchResponse { hits: self.finish(plan, hits, &mut budget)?, read_index: applied });
        }
        metrics::histogram!("engram_search_batch_duration_seconds").record(started.elapsed().as_secs_f64());
        Ok(pb::SearchBatchResponse { results, read_index: applied })
    }

    /// Binds and runs `plans` against state a read at `consistency` may see; the applied
    /// index it answers at. `batch`: errors name the query (`queries[i].…`).
    ///
    /// A linearizable read waits for a leadership confirmation (a heartbeat round to the
    /// followers) and then for the local state machine to reach its read index. When nothing
    /// is pending in this node's log, the search runs *while* the round is in flight, against
    /// the shards as they are; if they had already applied the confirmed index, that answer
    /// stands (it reflects every write committed before the read arrived, and only writes
    /// committed since), so the round trip and the search overlap. Otherwise it is thrown
    /// away and the search runs again once the state machine caught up.
    async fn searches_at(
        &self,
        caller: &Caller,
        plans: Vec<SearchPlan>,
        consistency: crate::raft::node::ReadConsistency,
        batch: bool,
    ) -> Result<(Found, u64), ApiError> {
        // The shards' applied index, when this read may search ahead of its barrier.
        let speculate = (consistency == crate::raft::node::ReadConsistency::Linearizable)
            .then(|| self.vectors.applied())
            .filter(|before| !self.node.log_ahead_of(*before));
        let kept = match speculate {
            Some(before) => {
                let (barrier, early) = tokio::join!(
                    self.node.read_barrier(consistency),
                    self.bind_and_search(caller, plans.clone(), batch)
                );
                match barrier? {
                    Some(b) if b.index() > before => {
                        metrics::counter!("engram_search_speculation_total", "outcome" => "redone").increment(1);
                        self.node.await_read(b).await?;
                        None
                    }
                    _ => {
                        metrics::counter!("engram_search_speculation_total", "outcome" => "kept").increment(1);
                        Some(early?)
                    }
                }
            }
            None => {
                self.node.linearize(consistency).await?;
                None
            }
        };
        let found = match kept {
            Some(found) => found,
            None => self.bind_and_search(caller, plans, batch).await?,
        };
        let applied = self.reader.applied_index().map_err(Self::storage)?;
        Ok((found, applied))
    }

    /// [`bind`](Self::bind)s every plan, then [`run_searches`](Self::run_searches).
    async fn bind_and_search(&self, caller: &Caller, plans: Vec<SearchPlan>, batch: bool) -> Result<Found, ApiError> {
        let plans = plans
            .into_iter()
            .enumerate()
            .map(|(i, p)| self.bind(caller, p).map_err(|e| if batch { within(i, e) } else { e }))
            .collect::<Result<Vec<_>, _>>()?;
        self.run_searches(plans).await
    }

    /// Checks a plan against the caller's grants and the namespace it names, after the read
    /// barrier (so a revocation acknowledged before the search is seen). The grant check
    /// comes first: a namespace the caller may not read is refused whether or not it exists.
    fn bind(&self, caller: &Caller, mut plan: SearchPlan) -> Result<SearchPlan, ApiError> {
        let access = self.guards.authorizer.authorize(caller, Permission::Read, "namespace", &plan.namespace)?;
        if let Access::Tagged(tags) = access {
            plan.filter.scope = Some(tags.into_iter().collect());
        }
        let info = self
            .reader
            .namespace(&plan.namespace)
            .map_err(Self::storage)?
            .ok_or_else(|| ApiError::not_found(format!("namespace {:?}", plan.namespace)))?;
        crate::memory::validate_embedding("vector", &plan.vector, Some(info.dimension), &self.limits)?;
        plan.metric = info.metric;
        let decay = match plan.ranking {
            Some(r) => r,
            None => self.reader.policy(&plan.namespace).map_err(Self::storage)?.decay,
        };
        plan.rank_by = (!decay.is_pure_similarity()).then_some(decay);
        Ok(plan)
    }

    /// Runs bound plans on the blocking pool (FAISS work, and waiting out a shard rebuild,
    /// stay off the async workers); one result per plan, in order.
    async fn run_searches(&self, plans: Vec<SearchPlan>) -> Result<Found, ApiError> {
        let vectors = self.vectors.clone();
        let now = crate::memory::now_ms();
        let parent = tracing::Span::current();
        let found = tokio::task::spawn_blocking(move || {
            plans
                .into_iter()
                .map(|p| {
                    let k = if p.rank_by.is_some() { candidates(p.k) } else { p.k };
                    let _shard =
                        crate::trace_span!(parent: &parent, "shard.search", namespace = %p.namespace, k).entered();
                    let hits = vectors.search(&p.namespace, &p.vector, k, &p.filter, p.params, now);
                    (p, hits)
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| ApiError::Internal(format!("search task: {e}")))?;
        Ok(found)
    }

    /// Applies the score threshold and attaches memories, within the response's byte budget.
    fn finish(
        &self,
        plan: SearchPlan,
        hits: Result<Option<Vec<(String, f32)>>, crate::vector::VectorError>,
        budget: &mut usize,
    ) -> Result<Vec<pb::SearchHit>, ApiError> {
        let hits = hits
            .map_err(|e| match e {
                // The namespace was re-created with another dimension after validation.
                crate::vector::VectorError::Dimension { expected, got } => {
                    ApiError::invalid("vector", format!("dimension {got} does not match the namespace's {expected}"))
                }
                other => ApiError::Internal(format!("vector search: {other}")),
            })?
            .unwrap_or_default();
        let hits: Vec<(String, f32)> = hits
            .into_iter()
            .filter(|(_, score)| !plan.score_threshold.is_some_and(|t| better(plan.metric, t, *score)))
            .collect();
        // Ranked: every candidate's score under the formula, best first (ties by id), top k.
        let ranked: Vec<(String, f32, f64, Option<crate::memory::Memory>)> = match &plan.rank_by {
            None => hits.into_iter().map(|(id, score)| (id, score, 0.0, None)).collect(),
            Some(w) => {
                let now = if plan.ranking_now_ms == 0 { crate::memory::now_ms() } else { plan.ranking_now_ms };
                let mut scored = Vec::with_capacity(hits.len());
                for (id, score) in hits {
                    let Some(m) = self.reader.get(&plan.namespace, &id).map_err(Self::storage)?.1 else { continue };
                    let input = RankInput {
                        score,
                        importance: m.importance,
                        touched_at_ms: m.updated_at_ms.max(m.last_accessed_at_ms),
                        access_count: m.access_count,
                    };
                    let r = rank_score(plan.metric, w, &input, now);
                    scored.push((id, score, r, Some(m)));
                }
                scored.sort_by(|a, b| b.2.total_cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
                scored.truncate(plan.k);
                scored
            }
        };
        if plan.reinforce {
            self.reinforcer.record(&plan.namespace, ranked.iter().map(|(id, ..)| id.as_str()));
        }
        let mut out = Vec::with_capacity(ranked.len());
        for (id, score, rank, memory) in ranked {
            let memory = match (plan.include_memory, memory) {
                (false, _) => None,
                (true, Some(m)) => Some(memory_to_pb(m)),
                (true, None) => self.reader.get(&plan.namespace, &id).map_err(Self::storage)?.1.map(memory_to_pb),
            };
            let hit = pb::SearchHit { id, score, memory, rank_score: rank };
            let size = prost::Message::encoded_len(&hit) + 8;
            if size > *budget {
                return Err(ApiError::invalid(
                    "k",
                    format!(
                        "the response would exceed {} bytes (max_response_bytes); ask for fewer hits or leave out include_memory",
                        self.guards.max_response_bytes
                    ),
                ));
            }
            *budget -= size;
            out.push(hit);
        }
        Ok(out)
    }
}
