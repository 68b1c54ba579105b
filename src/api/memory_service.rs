//! `MemoryService`: validates, authorizes, stamps (ids, timestamps) and proposes writes on the
//! leader; serves reads from the local state machine once the requested consistency holds and
//! the caller's grants allow them (checked after the read barrier, so a revocation
//! acknowledged before a read is always seen).
//!
//! Every write carries its [`Caller`]'s principal into the log, where `apply` authorizes it
//! again at the entry's index. Search lives in `api::search`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};
use tracing::instrument;

use super::convert::{self, memory_to_pb, namespace_to_pb};
use super::observe;
use crate::auth::limits::RateLimits;
use crate::auth::policy::Access;
use crate::auth::records::Permission;
use crate::auth::{Authorizer, Caller};
use crate::error::ApiError;
use crate::memory::{self, validate_id, validate_input, validate_namespace, Limits, MemoryInput, Precondition};
use crate::proto as pb;
use crate::proto::memory_service_server::MemoryService;
use crate::raft::{CommandResult, Idempotency, Op, Outcome, RaftNode};
use crate::storage::StateReader;
use crate::upkeep::Reinforcer;
use crate::vector::VectorStore;

const DEFAULT_PAGE_SIZE: u32 = 100;
const MAX_PAGE_SIZE: u32 = 1000;

/// What stands between a request and the state: grants, rates, response bounds.
#[derive(Clone)]
pub struct Guards {
    pub authorizer: Authorizer,
    pub rates: Arc<RateLimits>,
    /// Largest search or list response (`max_response_bytes`).
    pub max_response_bytes: usize,
}

#[derive(Clone)]
pub struct MemoryApi {
    pub(super) node: RaftNode,
    pub(super) reader: StateReader,
    pub(super) vectors: Arc<VectorStore>,
    /// Hits of reads that asked to reinforce, flushed into the log by `upkeep`.
    pub(super) reinforcer: Arc<Reinforcer>,
    pub(super) limits: Limits,
    pub(super) guards: Guards,
}

/// A request's page size: 0 is the default, more than the maximum is refused.
fn page_size_of(n: u32) -> Result<u32, ApiError> {
    match n {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n > MAX_PAGE_SIZE => Err(ApiError::invalid("page_size", format!("must be at most {MAX_PAGE_SIZE}"))),
        n => Ok(n),
    }
}

impl MemoryApi {
    pub fn new(
        node: RaftNode,
        reader: StateReader,
        vectors: Arc<VectorStore>,
        reinforcer: Arc<Reinforcer>,
        limits: Limits,
        guards: Guards,
    ) -> Self {
        MemoryApi { node, reader, vectors, reinforcer, limits, guards }
    }

    pub(super) fn storage(e: crate::error::StorageError) -> ApiError {
        tracing::error!(error = %e, "state machine read failed");
        ApiError::Internal(e.to_string())
    }

    /// Grants, then the namespace's request rate: a caller learns nothing about a namespace
    /// it may not touch, not even how busy it is.
    pub(super) fn admit(&self, caller: &Caller, perm: Permission, namespace: &str) -> Result<Access, ApiError> {
        validate_namespace(namespace)?;
        let access = self.guards.authorizer.authorize(caller, perm, "namespace", namespace)?;
        self.guards.rates.check_namespace(namespace)?;
        Ok(access)
    }

    async fn propose(
        &self,
        caller: &Caller,
        idempotency: Option<Idempotency>,
        op: Op,
    ) -> Result<CommandResult, ApiError> {
        super::propose(&self.node, caller, idempotency, op).await
    }

    /// Validates batch items and checks them against the caller's scope; ids stay as given.
    fn prepare_items(
        &self,
        namespace: &str,
        access: &Access,
        items: Vec<(String, Option<pb::MemoryInput>, Option<pb::Precondition>)>,
    ) -> Result<Vec<(MemoryInput, Precondition)>, ApiError> {
        let known_dim = self.reader.namespace(namespace).map_err(Self::storage)?.map(|n| n.dimension);
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(items.len());
        let mut dim = known_dim;
        for (prefix, m, p) in items {
            let m = convert::memory_input(&prefix, m)?;
            validate_input(&prefix, &m, dim, &self.limits)?;
            dim = dim.or(Some(m.embedding.len() as u32));
            let pre = convert::precondition(p);
            if m.id.is_empty() && pre != Precondition::None {
                return Err(ApiError::invalid(format!("{prefix}.id"), "a precondition needs an explicit id"));
            }
            if !m.id.is_empty() && !seen.insert(m.id.clone()) {
                return Err(ApiError::invalid(format!("{prefix}.id"), format!("duplicate id {:?} in batch", m.id)));
            }
            if !access.covers(&m.tags) {
                return Err(ApiError::PermissionDenied {
                    field: format!("{prefix}.tags"),
                    reason: "the key may only write memories carrying its scope's tag".into(),
                });
            }
            out.push((m, pre));
        }
        Ok(out)
    }

    async fn put_batch_inner(
        &self,
        caller: &Caller,
        req: pb::PutBatchRequest,
    ) -> Result<pb::PutBatchResponse, ApiError> {
        let bytes = prost::Message::encoded_len(&req);
        let pb::PutBatchRequest { namespace, items, options, create_namespace } = req;
        let access = self.admit(caller, Permission::Write, &namespace)?;
        if items.is_empty() {
            return Err(ApiError::invalid("items", "must not be empty"));
        }
        if items.len() > self.limits.max_batch_items {
            return Err(ApiError::invalid("items", format!("more than {} items", self.limits.max_batch_items)));
        }
        let raw = items
            .into_iter()
            .enumerate()
            .map(|(i, pb::PutBatchItem { memory, precondition })| (format!("items[{i}].memory"), memory, precondition))
            .collect();
        let mut items = self.prepare_items(&namespace, &access, raw)?;
        // Asking for creation is part of the request (a key reused with the flag flipped is
        // another request); without it the fingerprint is what it always was.
        let idempotency = if create_namespace {
            convert::idempotency(options, "put", &(&namespace, &items, "create_namespace"))?
        } else {
            convert::idempotency(options, "put", &(&namespace, &items))?
        };
        self.guards.rates.check_write_bytes(&caller.name, bytes)?;
        for (m, _) in &mut items {
            if m.id.is_empty() {
                m.id = memory::new_id();
            }
        }
        self.precheck(&namespace, &items)?;
        let op = Op::PutChecked {
            namespace,
            items,
            create: create_namespace,
            approx_min_vectors: self.limits.approx_min_vectors,
        };
        let res = self.propose(caller, idempotency, op).await?;
        let results = match res.outcome {
            Outcome::Stored(results) => {
                results.into_iter().map(|r| convert::store_result_to_pb(res.index, r)).collect()
            }
            // Remembered under an idempotency key before policies existed.
            Outcome::Put(results) => results
                .into_iter()
                .map(|r| pb::PutResponse {
                    applied_index: res.index,
                    id: r.id,
                    revision: r.revision,
                    updated: r.updated,
                    action: if r.updated { pb::PutAction::Updated } else { pb::PutAction::Created } as i32,
                    ..Default::default()
                })
                .collect(),
            other => return Err(ApiError::Internal(format!("unexpected outcome {other:?}"))),
        };
        Ok(pb::PutBatchResponse { applied_index: res.index, results })
    }

    /// The namespace policy's per-memory checks, before anything is proposed (this node's view
    /// of the policy; `apply` checks again against the replicated one).
    fn precheck(&self, namespace: &str, items: &[(MemoryInput, Precondition)]) -> Result<(), ApiError> {
        let Some(info) = self.reader.namespace(namespace).map_err(Self::storage)? else { return Ok(()) };
        let policy = self.reader.policy(namespace).map_err(Self::storage)?;
        let now = memory::now_ms();
        for (i, (m, _)) in items.iter().enumerate() {
            let prefix = format!("items[{i}].memory");
            if m.expires_at_ms.is_some_and(|at| at <= now) {
                return Err(ApiError::invalid(format!("{prefix}.expires_at_ms"), "is already past"));
            }
            if info.metric == memory::Metric::Cosine && m.embedding.iter().all(|x| *x == 0.0) {
                return Err(ApiError::invalid(
                    format!("{prefix}.embedding"),
                    "a zero vector has no direction (cosine namespace)",
                ));
            }
            if let Err(r) = memory::policy::check_gate(&policy.gate, &prefix, m) {
                metrics::counter!("engram_memory_refusals_total", "namespace" => crate::http::namespace_label(namespace), "rule" => r.rule.clone())
                    .increment(1);
                return Err(ApiError::invalid(r.field, format!("verification gate rule {}: {}", r.rule, r.reason)));
            }
        }
        Ok(())
    }

    /// Admission for policy changes: admin on the whole namespace.
    fn admit_admin(&self, caller: &Caller, namespace: &str) -> Result<(), ApiError> {
        match self.admit(caller, Permission::Admin, namespace)? {
            Access::Full => Ok(()),
            Access::Tagged(_) => Err(ApiError::PermissionDenied {
                field: "namespace".into(),
                reason: "a memory policy needs admin on all of the namespace, not a tag scope".into(),
            }),
        }
    }

    async fn get_namespace_inner(
        &self,
        caller: &Caller,
        req: pb::GetNamespaceRequest,
    ) -> Result<pb::GetNamespaceResponse, ApiError> {
        let pb::GetNamespaceRequest { namespace, consistency } = req;
        let d = self.describe_namespace_inner(caller, pb::DescribeNamespaceRequest { namespace, consistency }).await?;
        Ok(pb::GetNamespaceResponse { namespace: d.namespace, policy: d.policy, read_index: d.read_index })
    }

    async fn list_namespaces_inner(
        &self,
        caller: &Caller,
        req: pb::ListNamespacesRequest,
    ) -> Result<pb::ListNamespacesResponse, ApiError> {
        let pb::ListNamespacesRequest { page_size, page_token, prefix, consistency } = req;
        let page_size = page_size_of(page_size)?;
        if prefix.len() > 256 {
            return Err(ApiError::invalid("prefix", "must be at most 256 bytes"));
        }
        let after = convert::decode_namespace_token(&page_token)?;
        let consistency = convert::consistency(consistency)?;
        // Whom the caller is, before it may wait on the cluster.
        self.guards.authorizer.permits(caller, Permission::Read).map(drop)?;
        self.node.linearize(consistency).await?;
        let readable = self.guards.authorizer.permits(caller, Permission::Read)?;
        let (page, more, applied) = self
            .reader
            .namespaces_page(after.as_deref(), &prefix, page_size as usize, readable)
            .map_err(Self::storage)?;
        let next_page_token = match (more, page.last()) {
            (true, Some(last)) => convert::encode_namespace_token(&last.name),
            _ => String::new(),
        };
        Ok(pb::ListNamespacesResponse {
            namespaces: page.into_iter().map(namespace_to_pb).collect(),
            next_page_token,
            read_index: applied,
        })
    }

    async fn describe_namespace_inner(
        &self,
        caller: &Caller,
        req: pb::DescribeNamespaceRequest,
    ) -> Result<pb::DescribeNamespaceResponse, ApiError> {
        let pb::DescribeNamespaceRequest { namespace, consistency } = req;
        let consistency = convert::consistency(consistency)?;
        self.admit(caller, Permission::Read, &namespace)?;
        self.node.linearize(consistency).await?;
        self.guards.authorizer.authorize(caller, Permission::Read, "namespace", &namespace)?;
        let applied = self.reader.applied_index().map_err(Self::storage)?;
        let info = self
            .reader
            .namespace(&namespace)
            .map_err(Self::storage)?
            .ok_or_else(|| ApiError::not_found(format!("namespace {namespace:?}")))?;
        let policy = self.reader.policy(&namespace).map_err(Self::storage)?;
        let stats = self.reader.stats(&namespace).map_err(Self::storage)?;
        let bytes = info.bytes;
        Ok(pb::DescribeNamespaceResponse {
            namespace: Some(namespace_to_pb(info)),
            policy: Some(convert::policy_to_pb(policy)),
            stats: Some(convert::stats_to_pb(stats, bytes)),
            read_index: applied,
        })
    }

    async fn set_namespace_policy_inner(
        &self,
        caller: &Caller,
        req: pb::SetNamespacePolicyRequest,
    ) -> Result<pb::SetNamespacePolicyResponse, ApiError> {
        let pb::SetNamespacePolicyRequest { namespace, policy, options } = req;
        self.admit_admin(caller, &namespace)?;
        let policy = convert::policy_from_pb("policy", policy)?;
        if let Some(info) = self.reader.namespace(&namespace).map_err(Self::storage)? {
            policy.validate(info.metric).map_err(|e| ApiError::invalid(e.field, e.reason))?;
        }
        let idempotency = convert::idempotency(options, "set-policy", &(&namespace, &policy))?;
        let res = self.propose(caller, idempotency, Op::SetPolicy { namespace, policy }).await?;
        match res.outcome {
            Outcome::PolicySet(p) => {
                Ok(pb::SetNamespacePolicyResponse { applied_index: res.index, policy: Some(convert::policy_to_pb(p)) })
            }
            other => Err(ApiError::Internal(format!("unexpected outcome {other:?}"))),
        }
    }

    async fn consolidate_inner(
        &self,
        caller: &Caller,
        req: pb::ConsolidateRequest,
    ) -> Result<pb::ConsolidateResponse, ApiError> {
        let pb::ConsolidateRequest { namespace, threshold, dry_run, max_clusters, options } = req;
        for perm in [Permission::Write, Permission::Delete] {
            if let Access::Tagged(_) = self.admit(caller, perm, &namespace)? {
                return Err(ApiError::PermissionDenied {
                    field: "namespace".into(),
                    reason: "consolidation needs write and delete on all of the namespace, not a tag scope".into(),
                });
            }
        }
        let max_clusters = match max_clusters {
            0 => 100,
            n if n > 1000 => return Err(ApiError::invalid("max_clusters", "must be at most 1000")),
            n => n as usize,
        };
        if threshold.is_some_and(|t| !t.is_finite()) {
            return Err(ApiError::invalid("threshold", "must be finite"));
        }
        self.node.linearize(crate::raft::node::ReadConsistency::Linearizable).await?;
        let info = self
            .reader
            .namespace(&namespace)
            .map_err(Self::storage)?
            .ok_or_else(|| ApiError::not_found(format!("namespace {namespace:?}")))?;
        let policy = self.reader.policy(&namespace).map_err(Self::storage)?;
        let threshold = threshold
            .or(policy.near_duplicate.as_ref().map(|n| n.threshold))
            .ok_or_else(|| ApiError::invalid("threshold", "the namespace has no near-duplicate threshold: give one"))?;
        // A policy's bounds, but any cosine similarity: a one-off plan may be as loose as asked.
        if !memory::policy::threshold_ok(info.metric, threshold, -1.0) {
            return Err(ApiError::invalid("threshold", format!("{threshold} is out of range for the metric")));
        }
        let keep = policy.near_duplicate.as_ref().map(|n| n.keep).unwrap_or_default();
        let (reader, vectors) = (self.reader.clone(), self.vectors.clone());
        let clusters = tokio::task::spawn_blocking(move || {
            super::consolidate::plan(&reader, &vectors, &info, threshold, max_clusters)
        })
        .await
        .map_err(|e| ApiError::Internal(format!("consolidation plan: {e}")))??;
        let listed = |merged: &dyn Fn(usize) -> bool| {
            clusters
                .iter()
                .enumerate()
                .map(|(i, c)| pb::ConsolidationCluster {
                    keep: c.keep.0.clone(),
                    absorb: c.absorb.iter().map(|(id, _)| id.clone()).collect(),
                    merged: merged(i),
                })
                .collect::<Vec<_>>()
        };
        if dry_run || clusters.is_empty() {
            return Ok(pb::ConsolidateResponse { clusters: listed(&|_| false), applied_index: 0, absorbed: 0 });
        }
        let idempotency =
            convert::idempotency(options, "consolidate", &(&namespace, threshold.to_bits(), max_clusters))?;
        let op = Op::Consolidate { namespace, clusters: clusters.clone(), keep };
        let res = self.propose(caller, idempotency, op).await?;
        match res.outcome {
            Outcome::Consolidated { merged, absorbed } => Ok(pb::ConsolidateResponse {
                clusters: listed(&|i| merged.get(i).copied().unwrap_or(false)),
                applied_index: res.index,
                absorbed,
            }),
            other => Err(ApiError::Internal(format!("unexpected outcome {other:?}"))),
        }
    }

    async fn get_inner(&self, caller: &Caller, req: pb::GetRequest) -> Result<pb::GetResponse, ApiError> {
        let pb::GetRequest { namespace, id, consistency, reinforce } = req;
        validate_namespace(&namespace)?;
        validate_id("id", &id)?;
        let consistency = convert::consistency(consistency)?;
        self.admit(caller, Permission::Read, &namespace)?;
        self.node.linearize(consistency).await?;
        let access = self.guards.authorizer.authorize(caller, Permission::Read, "namespace", &namespace)?;
        let (ns, m, applied) = self.reader.get(&namespace, &id).map_err(Self::storage)?;
        if ns.is_none() {
            return Err(ApiError::not_found(format!("namespace {namespace:?}")));
        }
        // Outside a tag scope, a memory is as absent as one that does not exist.
        match m {
            Some(m) if !m.expired(crate::memory::now_ms()) && access.covers(&m.tags) => {
                if reinforce {
                    self.reinforcer.record(&namespace, [id.as_str()]);
                }
                Ok(pb::GetResponse { memory: Some(memory_to_pb(m)), read_index: applied })
            }
            _ => Err(ApiError::not_found(format!("memory {id:?} in namespace {namespace:?}"))),
        }
    }

    async fn list_inner(&self, caller: &Caller, req: pb::ListRequest) -> Result<pb::ListResponse, ApiError> {
        let pb::ListRequest { namespace, page_size, page_token, consistency } = req;
        validate_namespace(&namespace)?;
        let page_size = page_size_of(page_size)?;
        let after = convert::decode_page_token(&page_token)?;
        let consistency = convert::consistency(consistency)?;
        self.admit(caller, Permission::Read, &namespace)?;
        self.node.linearize(consistency).await?;
        let access = self.guards.authorizer.authorize(caller, Permission::Read, "namespace", &namespace)?;
        // A page ends early once its memories hold half the response budget (the encoding of
        // floats and tags adds overhead, so the other half is headroom).
        let bounds = (page_size as usize, self.guards.max_response_bytes / 2);
        let (ns, page) = self
            .reader
            .list_where(&namespace, after.as_deref(), bounds, crate::memory::now_ms(), |m| access.covers(&m.tags))
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

    async fn create_namespace_inner(
        &self,
        caller: &Caller,
        req: pb::CreateNamespaceRequest,
    ) -> Result<pb::CreateNamespaceResponse, ApiError> {
        let pb::CreateNamespaceRequest { namespace, dimension, metric, options, policy } = req;
        self.admit(caller, Permission::Write, &namespace)?;
        let policy = convert::policy_from_pb("policy", policy)?;
        if policy != memory::MemoryPolicy::default() {
            self.admit_admin(caller, &namespace)?;
        }
        if dimension == 0 || dimension as usize > self.limits.max_dimension {
            return Err(ApiError::invalid("dimension", format!("must be 1..={}", self.limits.max_dimension)));
        }
        let metric = convert::metric_from_pb(metric)?;
        let approx_min_vectors = self.limits.approx_min_vectors;
        let op = if policy == memory::MemoryPolicy::default() {
            Op::CreateNamespace { namespace: namespace.clone(), dimension, metric, approx_min_vectors }
        } else {
            policy.validate(metric).map_err(|e| ApiError::invalid(e.field, e.reason))?;
            Op::DefineNamespace {
                namespace: namespace.clone(),
                dimension,
                metric,
                approx_min_vectors,
                policy: policy.clone(),
            }
        };
        let idempotency = if policy == memory::MemoryPolicy::default() {
            convert::idempotency(options, "create-namespace", &(&namespace, dimension, metric))?
        } else {
            convert::idempotency(options, "define-namespace", &(&namespace, dimension, metric, &policy))?
        };
        let res = self.propose(caller, idempotency, op).await?;
        match res.outcome {
            Outcome::NamespaceCreated(info) => {
                Ok(pb::CreateNamespaceResponse { applied_index: res.index, namespace: Some(namespace_to_pb(info)) })
            }
            other => Err(ApiError::Internal(format!("unexpected outcome {other:?}"))),
        }
    }

    async fn delete_inner(&self, caller: &Caller, req: pb::DeleteRequest) -> Result<pb::DeleteResponse, ApiError> {
        let pb::DeleteRequest { namespace, id, precondition, options } = req;
        self.admit(caller, Permission::Delete, &namespace)?;
        validate_id("id", &id)?;
        let precondition = convert::precondition(precondition);
        let idempotency = convert::idempotency(options, "delete", &(&namespace, &id, precondition))?;
        let res = self.propose(caller, idempotency, Op::Delete { namespace, id, precondition }).await?;
        match res.outcome {
            Outcome::Deleted { deleted } => Ok(pb::DeleteResponse { applied_index: res.index, deleted }),
            other => Err(ApiError::Internal(format!("unexpected outcome {other:?}"))),
        }
    }

    async fn delete_namespace_inner(
        &self,
        caller: &Caller,
        req: pb::DeleteNamespaceRequest,
    ) -> Result<pb::DeleteNamespaceResponse, ApiError> {
        let pb::DeleteNamespaceRequest { namespace, options } = req;
        if let Access::Tagged(_) = self.admit(caller, Permission::Delete, &namespace)? {
            return Err(ApiError::PermissionDenied {
                field: "namespace".into(),
                reason: "erasing a namespace needs delete on all of it, not a tag scope".into(),
            });
        }
        let idempotency = convert::idempotency(options, "delete-namespace", &namespace)?;
        let res = self.propose(caller, idempotency, Op::DeleteNamespace { namespace }).await?;
        match res.outcome {
            Outcome::NamespaceDeleted { memories } => {
                Ok(pb::DeleteNamespaceResponse { applied_index: res.index, deleted_memories: memories })
            }
            other => Err(ApiError::Internal(format!("unexpected outcome {other:?}"))),
        }
    }
}

/// Runs one handler: the caller from the auth layer, the body, the outcome recorded.
#[tonic::async_trait]
impl MemoryService for MemoryApi {
    #[instrument(skip_all, fields(namespace = %req.get_ref().namespace))]
    async fn create_namespace(
        &self,
        req: Request<pb::CreateNamespaceRequest>,
    ) -> Result<Response<pb::CreateNamespaceResponse>, Status> {
        handle!(self, req, "create_namespace", create_namespace_inner)
    }

    #[instrument(skip_all, fields(namespace = %req.get_ref().namespace))]
    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let started = Instant::now();
        let caller = Caller::of(&req);
        let call = super::CallContext::of(req.metadata());
        let pb::PutRequest { namespace, memory, precondition, options, create_namespace } = req.into_inner();
        let items = vec![pb::PutBatchItem { memory, precondition }];
        let batch = pb::PutBatchRequest { namespace, items, options, create_namespace };
        // A single put is a batch of one; field names are reported without the batch prefix.
        let strip = |field: String| field.replacen("items[0].", "", 1);
        let res = super::CALL
            .scope(call, async {
                match caller {
                    Ok(caller) => self.put_batch_inner(&caller, batch).await,
                    Err(e) => Err(e),
                }
            })
            .await
            .map_err(|e| match e {
                ApiError::InvalidArgument { field, reason } => {
                    ApiError::InvalidArgument { field: strip(field), reason }
                }
                ApiError::FailedPrecondition { field, reason, current_revision } => {
                    ApiError::FailedPrecondition { field: strip(field), reason, current_revision }
                }
                ApiError::PermissionDenied { field, reason } => {
                    ApiError::PermissionDenied { field: strip(field), reason }
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
        handle!(self, req, "put_batch", put_batch_inner)
    }

    #[instrument(skip_all, fields(namespace = %req.get_ref().namespace))]
    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        handle!(self, req, "get", get_inner)
    }

    #[instrument(skip_all, fields(namespace = %req.get_ref().namespace))]
    async fn delete(&self, req: Request<pb::DeleteRequest>) -> Result<Response<pb::DeleteResponse>, Status> {
        handle!(self, req, "delete", delete_inner)
    }

    #[instrument(skip_all, fields(namespace = %req.get_ref().namespace))]
    async fn list(&self, req: Request<pb::ListRequest>) -> Result<Response<pb::ListResponse>, Status> {
        handle!(self, req, "list", list_inner)
    }

    #[instrument(skip_all, fields(namespace = %req.get_ref().namespace, k = req.get_ref().k))]
    async fn search(&self, req: Request<pb::SearchRequest>) -> Result<Response<pb::SearchResponse>, Status> {
        handle!(self, req, "search", search_inner)
    }

    #[instrument(skip_all, fields(queries = req.get_ref().queries.len()))]
    async fn search_batch(
        &self,
        req: Request<pb::SearchBatchRequest>,
    ) -> Result<Response<pb::SearchBatchResponse>, Status> {
        handle!(self, req, "search_batch", search_batch_inner)
    }

    #[instrument(skip_all, fields(namespace = %req.get_ref().namespace))]
    async fn delete_namespace(
        &self,
        req: Request<pb::DeleteNamespaceRequest>,
    ) -> Result<Response<pb::DeleteNamespaceResponse>, Status> {
        handle!(self, req, "delete_namespace", delete_namespace_inner)
    }

    #[instrument(skip_all, fields(namespace = %req.get_ref().namespace))]
    async fn get_namespace(
        &self,
        req: Request<pb::GetNamespaceRequest>,
    ) -> Result<Response<pb::GetNamespaceResponse>, Status> {
        handle!(self, req, "get_namespace", get_namespace_inner)
    }

    #[instrument(skip_all)]
    async fn list_namespaces(
        &self,
        req: Request<pb::ListNamespacesRequest>,
    ) -> Result<Response<pb::ListNamespacesResponse>, Status> {
        handle!(self, req, "list_namespaces", list_namespaces_inner)
    }

    #[instrument(skip_all, fields(namespace = %req.get_ref().namespace))]
    async fn describe_namespace(
        &self,
        req: Request<pb::DescribeNamespaceRequest>,
    ) -> Result<Response<pb::DescribeNamespaceResponse>, Status> {
        handle!(self, req, "describe_namespace", describe_namespace_inner)
    }

    #[instrument(skip_all, fields(namespace = %req.get_ref().namespace))]
    async fn set_namespace_policy(
        &self,
        req: Request<pb::SetNamespacePolicyRequest>,
    ) -> Result<Response<pb::SetNamespacePolicyResponse>, Status> {
        handle!(self, req, "set_namespace_policy", set_namespace_policy_inner)
    }

    #[instrument(skip_all, fields(namespace = %req.get_ref().namespace))]
    async fn consolidate(
        &self,
        req: Request<pb::ConsolidateRequest>,
    ) -> Result<Response<pb::ConsolidateResponse>, Status> {
        handle!(self, req, "consolidate", consolidate_inner)
    }
}
