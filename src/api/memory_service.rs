//! `MemoryService`: validates, stamps (ids, timestamps) and proposes writes on the leader;
//! serves reads from the local state machine once the requested consistency holds.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};
use tracing::instrument;

use super::convert::{self, memory_to_pb, namespace_to_pb};
use super::observe;
use crate::error::ApiError;
use crate::memory::{self, validate_id, validate_input, validate_namespace, Limits, MemoryInput, Precondition};
use crate::proto as pb;
use crate::proto::memory_service_server::MemoryService;
use crate::raft::{Command, CommandResult, Op, Outcome, RaftNode};
use crate::storage::StateReader;
use crate::vector::{better, SearchParams, VectorStore};

const DEFAULT_PAGE_SIZE: u32 = 100;
const MAX_PAGE_SIZE: u32 = 1000;

const MAX_K: u32 = 1000;
const MAX_BATCH_QUERIES: usize = 256;

/// A validated search, not yet checked against its namespace (that waits for the read barrier).
struct SearchPlan {
    namespace: String,
    vector: Vec<f32>,
    k: usize,
    filter: crate::vector::Filter,
    score_threshold: Option<f32>,
    include_memory: bool,
    params: SearchParams,
    metric: crate::memory::Metric,
}

impl SearchPlan {
    /// The plan and the request's own consistency value.
    fn new(req: pb::SearchRequest) -> Result<(SearchPlan, i32), ApiError> {
        let pb::SearchRequest { namespace, vector, k, filter, score_threshold, include_memory, consistency, nprobe } =
            req;
        validate_namespace(&namespace)?;
        if k == 0 || k > MAX_K {
            return Err(ApiError::invalid("k", format!("must be 1..={MAX_K}")));
        }
        if score_threshold.is_some_and(|t| !t.is_finite()) {
            return Err(ApiError::invalid("score_threshold", "must be finite"));
        }
        let filter = convert::search_filter(filter)?;
        convert::consistency(consistency)?;
        let params =
            SearchParams { nprobe: if nprobe == 0 { SearchParams::default().nprobe } else { nprobe as usize } };
        let plan = SearchPlan {
            namespace,
            vector,
            k: k as usize,
            filter,
            score_threshold,
            include_memory,
            params,
            metric: crate::memory::Metric::Cosine,
        };
        Ok((plan, consistency))
    }
}

#[derive(Clone)]
pub struct MemoryApi {
    node: RaftNode,
    reader: StateReader,
    vectors: Arc<VectorStore>,
    limits: Limits,
}

impl MemoryApi {
    pub fn new(node: RaftNode, reader: StateReader, vectors: Arc<VectorStore>, limits: Limits) -> Self {
        MemoryApi { node, reader, vectors, limits }
    }

    fn storage(e: crate::error::StorageError) -> ApiError {
        tracing::error!(error = %e, "state machine read failed");
        ApiError::Internal(e.to_string())
    }

    /// Proposes a command; a deterministic refusal in `apply` comes back as an error.
    async fn propose(&self, key: Option<String>, op: Op) -> Result<CommandResult, ApiError> {
        // Fail fast with a leader hint before stamping anything.
        self.node.require_leader()?;
        let res = self.node.write(Command { idempotency_key: key, now_ms: crate::memory::now_ms(), op }).await?;
        match res.outcome {
            Outcome::Rejected(r) => Err(r.into()),
            _ => Ok(res),
        }
    }

    /// Validates and stamps batch items: fills missing ids, rejects duplicates.
    fn prepare_items(
        &self,
        namespace: &str,
        items: Vec<(String, Option<pb::MemoryInput>, Option<pb::Precondition>)>,
    ) -> Result<Vec<(MemoryInput, Precondition)>, ApiError> {
        let known_dim = self.reader.namespace(namespace).map_err(Self::storage)?.map(|n| n.dimension);
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(items.len());
        let mut dim = known_dim;
        for (prefix, m, p) in items {
            let mut m = convert::memory_input(&prefix, m)?;
            validate_input(&prefix, &m, dim, &self.limits)?;
            dim = dim.or(Some(m.embedding.len() as u32));
            let pre = convert::precondition(p);
            if m.id.is_empty() {
                if pre != Precondition::None {
                    return Err(ApiError::invalid(format!("{prefix}.id"), "a precondition needs an explicit id"));
                }
                m.id = memory::new_id();
            }
            if !seen.insert(m.id.clone()) {
                return Err(ApiError::invalid(format!("{prefix}.id"), format!("duplicate id {:?} in batch", m.id)));
            }
            out.push((m, pre));
        }
        Ok(out)
    }

    async fn put_batch_inner(&self, req: pb::PutBatchRequest) -> Result<pb::PutBatchResponse, ApiError> {
        let pb::PutBatchRequest { namespace, items, options } = req;
        validate_namespace(&namespace)?;
        if items.is_empty() {
            return Err(ApiError::invalid("items", "must not be empty"));
        }
        if items.len() > self.limits.max_batch_items {
            return Err(ApiError::invalid("items", format!("more than {} items", self.limits.max_batch_items)));
        }
        let key = convert::idempotency_key(options)?;
        let raw = items
            .into_iter()
            .enumerate()
            .map(|(i, pb::PutBatchItem { memory, precondition })| (format!("items[{i}].memory"), memory, precondition))
            .collect();
        let items = self.prepare_items(&namespace, raw)?;
        let res = self.propose(key, Op::Put { namespace, items, ivf_min_vectors: self.limits.ivf_min_vectors }).await?;
        let Outcome::Put(results) = res.outcome else {
            return Err(ApiError::Internal(format!("unexpected outcome {:?}", res.outcome)));
        };
        let results = results
            .into_iter()
            .map(|r| pb::PutResponse { applied_index: res.index, id: r.id, revision: r.revision, updated: r.updated })
            .collect();
        Ok(pb::PutBatchResponse { applied_index: res.index, results })
    }

    async fn get_inner(&self, req: pb::GetRequest) -> Result<pb::GetResponse, ApiError> {
        let pb::GetRequest { namespace, id, consistency } = req;
        validate_namespace(&namespace)?;
        validate_id("id", &id)?;
        self.node.linearize(convert::consistency(consistency)?).await?;
        let (ns, m, applied) = self.reader.get(&namespace, &id).map_err(Self::storage)?;
        if ns.is_none() {
            return Err(ApiError::not_found(format!("namespace {namespace:?}")));
        }
        match m {
            Some(m) if m.expires_at_ms.is_none_or(|e| e > crate::memory::now_ms()) => {
                Ok(pb::GetResponse { memory: Some(memory_to_pb(m)), read_index: applied })
            }
            _ => Err(ApiError::not_found(format!("memory {id:?} in namespace {namespace:?}"))),
        }
    }

    async fn search_inner(&self, req: pb::SearchRequest) -> Result<pb::SearchResponse, ApiError> {
        let started = Instant::now();
        let (plan, consistency) = SearchPlan::new(req)?;
        self.node.linearize(convert::consistency(consistency)?).await?;
        let applied = self.reader.applied_index().map_err(Self::storage)?;
        let plan = self.bind(plan)?;
        let namespace = plan.namespace.clone();
        let mut hits = self.run_searches(vec![plan]).await?;
        let hits = hits.pop().expect("one result per plan")?;
        metrics::histogram!("engram_search_duration_seconds", "namespace" => namespace)
            .record(started.elapsed().as_secs_f64());
        Ok(pb::SearchResponse { hits, read_index: applied })
    }

    async fn search_batch_inner(&self, req: pb::SearchBatchRequest) -> Result<pb::SearchBatchResponse, ApiError> {
        let started = Instant::now();
        let pb::SearchBatchRequest { queries, consistency } = req;
        if queries.is_empty() || queries.len() > MAX_BATCH_QUERIES {
            return Err(ApiError::invalid("queries", format!("must hold 1..={MAX_BATCH_QUERIES} searches")));
        }
        let within = |i: usize, e: ApiError| match e {
            ApiError::InvalidArgument { field, reason } => {
                ApiError::InvalidArgument { field: format!("queries[{i}].{field}"), reason }
            }
            other => other,
        };
        let mut plans = Vec::with_capacity(queries.len());
        for (i, q) in queries.into_iter().enumerate() {
            let (plan, own) = SearchPlan::new(q).map_err(|e| within(i, e))?;
            if own != 0 && own != consistency {
                return Err(within(i, ApiError::invalid("consistency", "must be unset or the batch's")));
            }
            plans.push(plan);
        }
        self.node.linearize(convert::consistency(consistency)?).await?;
        let applied = self.reader.applied_index().map_err(Self::storage)?;
        let plans = plans
            .into_iter()
            .enumerate()
            .map(|(i, p)| self.bind(p).map_err(|e| within(i, e)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut results = Vec::with_capacity(plans.len());
        for hits in self.run_searches(plans).await? {
            results.push(pb::SearchResponse { hits: hits?, read_index: applied });
        }
        metrics::histogram!("engram_search_batch_duration_seconds").record(started.elapsed().as_secs_f64());
        Ok(pb::SearchBatchResponse { results, read_index: applied })
    }

    /// Checks a plan against the namespace it names, after the read barrier.
    fn bind(&self, mut plan: SearchPlan) -> Result<SearchPlan, ApiError> {
        let info = self
            .reader
            .namespace(&plan.namespace)
            .map_err(Self::storage)?
            .ok_or_else(|| ApiError::not_found(format!("namespace {:?}", plan.namespace)))?;
        crate::memory::validate_embedding("vector", &plan.vector, Some(info.dimension), &self.limits)?;
        plan.metric = info.metric;
        Ok(plan)
    }

    /// Runs bound plans on the blocking pool (FAISS work, and waiting out a shard rebuild,
    /// stay off the async workers); one result per plan, in order.
    async fn run_searches(
        &self,
        plans: Vec<SearchPlan>,
    ) -> Result<Vec<Result<Vec<pb::SearchHit>, ApiError>>, ApiError> {
        let vectors = self.vectors.clone();
        let now = crate::memory::now_ms();
        let found = tokio::task::spawn_blocking(move || {
            plans
                .into_iter()
                .map(|p| {
                    let hits = vectors.search(&p.namespace, &p.vector, p.k, &p.filter, p.params, now);
                    (p, hits)
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| ApiError::Internal(format!("search task: {e}")))?;
        Ok(found.into_iter().map(|(plan, hits)| self.finish(plan, hits)).collect())
    }

    /// Applies the score threshold and attaches memories.
    fn finish(
        &self,
        plan: SearchPlan,
        hits: Result<Option<Vec<(String, f32)>>, crate::vector::VectorError>,
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
        let mut out = Vec::with_capacity(hits.len());
        for (id, score) in hits {
            if plan.score_threshold.is_some_and(|t| better(plan.metric, t, score)) {
                continue;
            }
            let memory = if plan.include_memory {
                self.reader.get(&plan.namespace, &id).map_err(Self::storage)?.1.map(memory_to_pb)
            } else {
                None
            };
            out.push(pb::SearchHit { id, score, memory });
        }
        Ok(out)
    }

    async fn list_inner(&self, req: pb::ListRequest) -> Result<pb::ListResponse, ApiError> {
        let pb::ListRequest { namespace, page_size, page_token, consistency } = req;
        validate_namespace(&namespace)?;
        let page_size = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n > MAX_PAGE_SIZE => {
                return Err(ApiError::invalid("page_size", format!("must be at most {MAX_PAGE_SIZE}")))
            }
            n => n,
        };
        let after = convert::decode_page_token(&page_token)?;
        self.node.linearize(convert::consistency(consistency)?).await?;
        let (ns, page) = self
            .reader
            .list(&namespace, after.as_deref(), page_size as usize, crate::memory::now_ms())
            .map_err(Self::storage)?;
        if ns.is_none() {
            return Err(ApiError::not_found(format!("namespace {namespace:?}")));
        }
        Ok(pb::ListResponse {
            memories: page.memories.into_iter().map(memory_to_pb).collect(),
            next_page_token: page.next_after.map(|a| convert::encode_page_token(&a)).unwrap_or_default(),
            read_index: page.applied_index,
        })
    }
}

#[tonic::async_trait]
impl MemoryService for MemoryApi {
    #[instrument(skip_all, fields(namespace = %req.get_ref().namespace))]
    async fn create_namespace(
        &self,
        req: Request<pb::CreateNamespaceRequest>,
    ) -> Result<Response<pb::CreateNamespaceResponse>, Status> {
        let started = Instant::now();
        let pb::CreateNamespaceRequest { namespace, dimension, metric, options } = req.into_inner();
        let res = async {
            validate_namespace(&namespace)?;
            if dimension == 0 || dimension as usize > self.limits.max_dimension {
                return Err(ApiError::invalid("dimension", format!("must be 1..={}", self.limits.max_dimension)));
            }
            let metric = convert::metric_from_pb(metric)?;
            let key = convert::idempotency_key(options)?;
            let res = self
                .propose(
                    key,
                    Op::CreateNamespace { namespace, dimension, metric, ivf_min_vectors: self.limits.ivf_min_vectors },
                )
                .await?;
            match res.outcome {
                Outcome::NamespaceCreated(info) => {
                    Ok(pb::CreateNamespaceResponse { applied_index: res.index, namespace: Some(namespace_to_pb(info)) })
                }
                other => Err(ApiError::Internal(format!("unexpected outcome {other:?}"))),
            }
        }
        .await
        .map(Response::new)
        .map_err(Status::from);
        observe("create_namespace", started, &res);
        res
    }

    #[instrument(skip_all, fields(namespace = %req.get_ref().namespace))]
    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let started = Instant::now();
        let pb::PutRequest { namespace, memory, precondition, options } = req.into_inner();
        let batch = pb::PutBatchRequest { namespace, items: vec![pb::PutBatchItem { memory, precondition }], options };
        // A single put is a batch of one; field names are reported without the batch prefix.
        let res = self
            .put_batch_inner(batch)
            .await
            .map_err(|e| match e {
                ApiError::InvalidArgument { field, reason } => {
                    ApiError::InvalidArgument { field: field.replacen("items[0].", "", 1), reason }
                }
                ApiError::FailedPrecondition { field, reason, current_revision } => {
                    ApiError::FailedPrecondition { field: field.replacen("items[0].", "", 1), reason, current_revision }
                }
                other => other,
            })
            .and_then(|mut r| r.results.pop().ok_or_else(|| ApiError::Internal("empty put result".into())))
            .map(Response::new)
            .map_err(Status::from);
        observe("put", started, &res);
        res
    }

    #[instrument(skip_all, fields(namespace = %req.get_ref().namespace, items = req.get_ref().items.len()))]
    async fn put_batch(&self, req: Request<pb::PutBatchRequest>) -> Result<Response<pb::PutBatchResponse>, Status> {
        let started = Instant::now();
        let res = self.put_batch_inner(req.into_inner()).await.map(Response::new).map_err(Status::from);
        observe("put_batch", started, &res);
        res
    }

    #[instrument(skip_all, fields(namespace = %req.get_ref().namespace))]
    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let started = Instant::now();
        let res = self.get_inner(req.into_inner()).await.map(Response::new).map_err(Status::from);
        observe("get", started, &res);
        res
    }

    #[instrument(skip_all, fields(namespace = %req.get_ref().namespace))]
    async fn delete(&self, req: Request<pb::DeleteRequest>) -> Result<Response<pb::DeleteResponse>, Status> {
        let started = Instant::now();
        let pb::DeleteRequest { namespace, id, precondition, options } = req.into_inner();
        let res = async {
            validate_namespace(&namespace)?;
            validate_id("id", &id)?;
            let key = convert::idempotency_key(options)?;
            let precondition = convert::precondition(precondition);
            let res = self.propose(key, Op::Delete { namespace, id, precondition }).await?;
            match res.outcome {
                Outcome::Deleted { deleted } => Ok(pb::DeleteResponse { applied_index: res.index, deleted }),
                other => Err(ApiError::Internal(format!("unexpected outcome {other:?}"))),
            }
        }
        .await
        .map(Response::new)
        .map_err(Status::from);
        observe("delete", started, &res);
        res
    }

    #[instrument(skip_all, fields(namespace = %req.get_ref().namespace))]
    async fn list(&self, req: Request<pb::ListRequest>) -> Result<Response<pb::ListResponse>, Status> {
        let started = Instant::now();
        let res = self.list_inner(req.into_inner()).await.map(Response::new).map_err(Status::from);
        observe("list", started, &res);
        res
    }

    #[instrument(skip_all, fields(namespace = %req.get_ref().namespace, k = req.get_ref().k))]
    async fn search(&self, req: Request<pb::SearchRequest>) -> Result<Response<pb::SearchResponse>, Status> {
        let started = Instant::now();
        let res = self.search_inner(req.into_inner()).await.map(Response::new).map_err(Status::from);
        observe("search", started, &res);
        res
    }

    #[instrument(skip_all, fields(queries = req.get_ref().queries.len()))]
    async fn search_batch(
        &self,
        req: Request<pb::SearchBatchRequest>,
    ) -> Result<Response<pb::SearchBatchResponse>, Status> {
        let started = Instant::now();
        let res = self.search_batch_inner(req.into_inner()).await.map(Response::new).map_err(Status::from);
        observe("search_batch", started, &res);
        res
    }

    #[instrument(skip_all, fields(namespace = %req.get_ref().namespace))]
    async fn delete_namespace(
        &self,
        req: Request<pb::DeleteNamespaceRequest>,
    ) -> Result<Response<pb::DeleteNamespaceResponse>, Status> {
        let started = Instant::now();
        let pb::DeleteNamespaceRequest { namespace, options } = req.into_inner();
        let res = async {
            validate_namespace(&namespace)?;
            let key = convert::idempotency_key(options)?;
            let res = self.propose(key, Op::DeleteNamespace { namespace }).await?;
            match res.outcome {
                Outcome::NamespaceDeleted { memories } => {
                    Ok(pb::DeleteNamespaceResponse { applied_index: res.index, deleted_memories: memories })
                }
                other => Err(ApiError::Internal(format!("unexpected outcome {other:?}"))),
            }
        }
        .await
        .map(Response::new)
        .map_err(Status::from);
        observe("delete_namespace", started, &res);
        res
    }
}
