//! The Rust client SDK.
//!
//! [`Client`] talks to any number of endpoints. Writes follow leader hints transparently;
//! transient failures are retried with backoff at the next endpoint, and every write carries
//! an idempotency key chosen once per logical write, so a retry after a timeout is applied at
//! most once. Failed calls return a [`ClientError`] whose [`WriteOutcome`] says whether the
//! write may have been applied. A RESOURCE_EXHAUSTED refusal (a rate limit) is retried after
//! the `retry-after` the node gives, when that is within [`RetryPolicy::max_rate_limit_wait`].
//!
//! Secured clusters need TLS and a credential ([`ClientOptions`]):
//!
//! ```no_run
//! # fn demo() -> Result<(), engram::client::ClientError> {
//! use engram::client::{Client, ClientOptions, ClientTls};
//! let tls = ClientTls::from_files("ca.pem".as_ref(), Some("demo.engram".into()), None)?;
//! let key = std::fs::read_to_string("root.key").unwrap();
//! let opts = ClientOptions { tls: Some(tls), credential: Some(key), ..Default::default() };
//! let client = Client::with_options(["10.0.0.1:7001"], opts)?;
//! # Ok(()) }
//! ```
//!
//! ```no_run
//! # async fn demo() -> Result<(), engram::client::ClientError> {
//! use engram::client::{Client, NewMemory};
//! let client = Client::new(["127.0.0.1:7001", "127.0.0.1:7002"])?;
//! let put = client.put("acme/user-42", NewMemory::new("likes tea", vec![0.1, 0.2, 0.3])).await?;
//! let got = client.get("acme/user-42", &put.id).await?;
//! assert_eq!(got.text, "likes tea");
//! # Ok(()) }
//! ```

mod admin;
mod auth;
mod connect;
mod error;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use admin::Admin;
pub use auth::Auth;
use connect::Credential;
pub use connect::Svc;
pub use connect::{ClientOptions, ClientTls};
pub use error::{ClientError, WriteOutcome};

use crate::api::status::LEADER_ADDR_HEADER;
use crate::proto as pb;
use crate::proto::memory_service_client::MemoryServiceClient;
pub use crate::proto::{Consistency, Memory, Metric};

/// A memory to write.
#[derive(Debug, Clone, Default)]
pub struct NewMemory {
    pub id: Option<String>,
    pub text: String,
    pub embedding: Vec<f32>,
    pub tags: HashMap<String, String>,
    pub importance: Option<f32>,
    pub expires_at_ms: Option<u64>,
}

impl NewMemory {
    pub fn new(text: impl Into<String>, embedding: Vec<f32>) -> Self {
        NewMemory { text: text.into(), embedding, ..Default::default() }
    }

    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    pub fn with_tag(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.tags.insert(k.into(), v.into());
        self
    }

    fn into_pb(self) -> pb::MemoryInput {
        pb::MemoryInput {
            id: self.id.unwrap_or_default(),
            text: self.text,
            embedding: self.embedding,
            tags: self.tags,
            importance: self.importance,
            expires_at_ms: self.expires_at_ms.unwrap_or(0),
        }
    }
}

/// Compare-and-set guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precondition {
    #[default]
    None,
    IfAbsent,
    IfRevision(u64),
}

impl Precondition {
    fn into_pb(self) -> Option<pb::Precondition> {
        use pb::precondition::Condition;
        match self {
            Precondition::None => None,
            Precondition::IfAbsent => Some(pb::Precondition { condition: Some(Condition::IfAbsent(true)) }),
            Precondition::IfRevision(r) => Some(pb::Precondition { condition: Some(Condition::IfRevision(r)) }),
        }
    }
}

/// Retry policy for transient failures.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Per-attempt deadline.
    pub timeout: Duration,
    /// A rate-limited call is retried after the node's `retry-after` if that is at most this
    /// long; a longer wait (a quota) is returned as the error.
    pub max_rate_limit_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 20,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(1000),
            timeout: Duration::from_secs(10),
            max_rate_limit_wait: Duration::from_secs(5),
        }
    }
}

#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    endpoints: Vec<String>,
    channels: Mutex<HashMap<String, Svc>>,
    tls: Option<ClientTls>,
    credential: Credential,
    /// Kept to make pinned clients like this one.
    options: ClientOptions,
    /// Where the next call goes first: the last known leader, else a round-robin endpoint.
    preferred: Mutex<String>,
    retry: RetryPolicy,
}

impl Client {
    /// A client over `host:port` endpoints (no scheme). Connections open lazily.
    pub fn new<I, S>(endpoints: I) -> Result<Client, ClientError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::with_retry(endpoints, RetryPolicy::default())
    }

    /// A plaintext client without credentials (for `--insecure` nodes).
    pub fn with_retry<I, S>(endpoints: I, retry: RetryPolicy) -> Result<Client, ClientError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::with_options(endpoints, ClientOptions { retry, ..Default::default() })
    }

    /// A client with TLS and a credential as `options` say.
    pub fn with_options<I, S>(endpoints: I, options: ClientOptions) -> Result<Client, ClientError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let endpoints: Vec<String> = endpoints.into_iter().map(Into::into).collect();
        let first = endpoints.first().cloned().ok_or_else(|| ClientError::config("no endpoints given"))?;
        Ok(Client {
            inner: Arc::new(Inner {
                endpoints,
                channels: Mutex::new(HashMap::new()),
                tls: options.tls.clone(),
                credential: Credential::new(options.credential.as_deref())?,
                preferred: Mutex::new(first),
                retry: options.retry,
                options,
            }),
        })
    }

    /// The same client, but its puts create an unknown namespace on first write (see
    /// [`ClientOptions::create_namespaces`]).
    pub fn creating_namespaces(self) -> Client {
        let options = ClientOptions { create_namespaces: true, ..self.inner.options.clone() };
        Self::with_options(self.inner.endpoints.clone(), options).expect("the options were valid already")
    }

    /// A client like this one (TLS, credential) pinned to `addr`, never redirected or retried.
    pub fn pinned_like(&self, addr: &str) -> Result<Client, ClientError> {
        let retry = RetryPolicy { max_attempts: 1, ..self.inner.options.retry };
        Self::with_options([addr], ClientOptions { retry, ..self.inner.options.clone() })
    }

    /// The same client with another credential (same endpoints, TLS and retries).
    pub fn with_credential(&self, credential: Option<String>) -> Result<Client, ClientError> {
        Self::with_options(self.inner.endpoints.clone(), ClientOptions { credential, ..self.inner.options.clone() })
    }

    /// This client's channel to `addr` (TLS and credential included), for calling the
    /// generated gRPC stubs directly.
    pub fn raw_channel(&self, addr: &str) -> Result<Svc, ClientError> {
        self.channel(addr)
    }

    fn channel(&self, addr: &str) -> Result<Svc, ClientError> {
        let mut channels = self.inner.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let ch = connect::channel(addr, self.inner.tls.as_ref(), &self.inner.credential)?;
        channels.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    fn rotate(&self, failed: &str) {
        let eps = &self.inner.endpoints;
        let next = match eps.iter().position(|e| e == failed) {
            Some(i) => eps[(i + 1) % eps.len()].clone(),
            None => eps[0].clone(),
        };
        *self.inner.preferred.lock().unwrap() = next;
    }

    /// Runs `call` against the preferred endpoint, following leader hints and retrying
    /// transient failures. `call` must resend the same request (same idempotency key).
    async fn call<T, F, Fut>(&self, call: F) -> Result<T, ClientError>
    where
        F: Fn(Svc, Duration) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let policy = self.inner.retry;
        let mut backoff = policy.initial_backoff;
        let mut maybe_applied = false;
        let mut last = None;
        for _ in 0..policy.max_attempts {
            let addr = self.inner.preferred.lock().unwrap().clone();
            let status = match self.channel(&addr) {
                Ok(ch) => match call(ch, policy.timeout).await {
                    Ok(resp) => return Ok(resp.into_inner()),
                    Err(s) => s,
                },
                // An unusable address (e.g. a bad leader hint): nothing was sent there.
                Err(e) => tonic::Status::unavailable(e.message),
            };
            let mut err = ClientError::from_status(&status);
            maybe_applied |= err.outcome == WriteOutcome::MaybeApplied;
            if maybe_applied {
                err.outcome = WriteOutcome::MaybeApplied;
            }
            // A rate limit: wait as told, if that is not too long, and try the same node again.
            if let Some(wait) = err.retry_after.filter(|w| *w <= policy.max_rate_limit_wait) {
                last = Some(err);
                tokio::time::sleep(wait).await;
                continue;
            }
            if !err.is_retryable() {
                return Err(err);
            }
            let hint = status.metadata().get(LEADER_ADDR_HEADER).and_then(|v| v.to_str().ok()).map(String::from);
            last = Some(err);
            match hint {
                Some(leader) if leader != addr => {
                    // Hints can bounce between nodes mid-election: pause briefly all the same.
                    *self.inner.preferred.lock().unwrap() = leader;
                    tokio::time::sleep(policy.initial_backoff / 4).await;
                    continue;
                }
                _ => self.rotate(&addr),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(policy.max_backoff);
        }
        Err(last.unwrap_or_else(|| ClientError::config("no attempts made")))
    }

    fn memory(ch: Svc) -> MemoryServiceClient<Svc> {
        MemoryServiceClient::new(ch).max_decoding_message_size(128 << 20).max_encoding_message_size(8 << 20)
    }

    fn options() -> Option<pb::WriteOptions> {
        Some(pb::WriteOptions { idempotency_key: uuid::Uuid::now_v7().to_string() })
    }

    pub async fn create_namespace(
        &self,
        namespace: &str,
        dimension: u32,
        metric: Metric,
    ) -> Result<pb::CreateNamespaceResponse, ClientError> {
        self.create_namespace_with_policy(namespace, dimension, metric, None).await
    }

    /// Creates a namespace with a memory policy (needs admin on the namespace).
    pub async fn create_namespace_with_policy(
        &self,
        namespace: &str,
        dimension: u32,
        metric: Metric,
        policy: Option<pb::MemoryPolicy>,
    ) -> Result<pb::CreateNamespaceResponse, ClientError> {
        let req = pb::CreateNamespaceRequest {
            namespace: namespace.into(),
            dimension,
            metric: metric as i32,
            options: Self::options(),
            policy,
        };
        self.call(|ch, t| {
            let r = req.clone();
            async move { Self::memory(ch).create_namespace(timed(r, t)).await }
        })
        .await
    }

    pub async fn put(&self, namespace: &str, memory: NewMemory) -> Result<pb::PutResponse, ClientError> {
        self.put_if(namespace, memory, Precondition::None).await
    }

    pub async fn put_if(
        &self,
        namespace: &str,
        memory: NewMemory,
        precondition: Precondition,
    ) -> Result<pb::PutResponse, ClientError> {
        let req = pb::PutRequest {
            namespace: namespace.into(),
            memory: Some(memory.into_pb()),
            precondition: precondition.into_pb(),
            options: Self::options(),
            create_namespace: self.inner.options.create_namespaces,
        };
        self.call(|ch, t| {
            let r = req.clone();
            async move { Self::memory(ch).put(timed(r, t)).await }
        })
        .await
    }

    /// Atomic: one log entry, all items or none.
    pub async fn put_batch(
        &self,
        namespace: &str,
        items: Vec<(NewMemory, Precondition)>,
    ) -> Result<pb::PutBatchResponse, ClientError> {
        let req = pb::PutBatchRequest {
            namespace: namespace.into(),
            items: items
                .into_iter()
                .map(|(m, p)| pb::PutBatchItem { memory: Some(m.into_pb()), precondition: p.into_pb() })
                .collect(),
            options: Self::options(),
            create_namespace: self.inner.options.create_namespaces,
        };
        self.call(|ch, t| {
            let r = req.clone();
            async move { Self::memory(ch).put_batch(timed(r, t)).await }
        })
        .await
    }

    /// Linearizable get.
    pub async fn get(&self, namespace: &str, id: &str) -> Result<Memory, ClientError> {
        self.get_with(namespace, id, Consistency::Linearizable).await.map(|r| r.memory.unwrap_or_default())
    }

    pub async fn get_with(
        &self,
        namespace: &str,
        id: &str,
        consistency: Consistency,
    ) -> Result<pb::GetResponse, ClientError> {
        self.get_request(pb::GetRequest {
            namespace: namespace.into(),
            id: id.into(),
            consistency: consistency as i32,
            reinforce: false,
        })
        .await
    }

    /// A get with every option (`reinforce` counts it as an access).
    pub async fn get_request(&self, req: pb::GetRequest) -> Result<pb::GetResponse, ClientError> {
        self.call(|ch, t| {
            let r = req.clone();
            async move { Self::memory(ch).get(timed(r, t)).await }
        })
        .await
    }

    pub async fn delete(&self, namespace: &str, id: &str) -> Result<pb::DeleteResponse, ClientError> {
        self.delete_if(namespace, id, Precondition::None).await
    }

    pub async fn delete_if(
        &self,
        namespace: &str,
        id: &str,
        precondition: Precondition,
    ) -> Result<pb::DeleteResponse, ClientError> {
        let req = pb::DeleteRequest {
            namespace: namespace.into(),
            id: id.into(),
            precondition: precondition.into_pb(),
            options: Self::options(),
        };
        self.call(|ch, t| {
            let r = req.clone();
            async move { Self::memory(ch).delete(timed(r, t)).await }
        })
        .await
    }

    /// One page; pass `next_page_token` back for the next.
    pub async fn list(
        &self,
        namespace: &str,
        page_size: u32,
        page_token: &str,
        consistency: Consistency,
    ) -> Result<pb::ListResponse, ClientError> {
        let req = pb::ListRequest {
            namespace: namespace.into(),
            page_size,
            page_token: page_token.into(),
            consistency: consistency as i32,
        };
        self.call(|ch, t| {
            let r = req.clone();
            async move { Self::memory(ch).list(timed(r, t)).await }
        })
        .await
    }

    /// Every memory of a namespace, following pages (linearizable per page).
    pub async fn list_all(&self, namespace: &str) -> Result<Vec<Memory>, ClientError> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let page = self.list(namespace, 1000, &token, Consistency::Linearizable).await?;
            out.extend(page.memories);
            if page.next_page_token.is_empty() {
                return Ok(out);
            }
            token = page.next_page_token;
        }
    }

    /// Top-k linearizable search with no filter.
    pub async fn search(&self, namespace: &str, vector: Vec<f32>, k: u32) -> Result<pb::SearchResponse, ClientError> {
        self.search_with(pb::SearchRequest { namespace: namespace.into(), vector, k, ..Default::default() }).await
    }

    /// Search with every option (filter, threshold, consistency, nprobe, include_memory).
    pub async fn search_with(&self, req: pb::SearchRequest) -> Result<pb::SearchResponse, ClientError> {
        self.call(|ch, t| {
            let r = req.clone();
            async move { Self::memory(ch).search(timed(r, t)).await }
        })
        .await
    }

    /// Several searches behind one read barrier (`consistency` applies to all); one response
    /// per query, in order.
    pub async fn search_batch(
        &self,
        queries: Vec<pb::SearchRequest>,
        consistency: Consistency,
    ) -> Result<pb::SearchBatchResponse, ClientError> {
        let req = pb::SearchBatchRequest { queries, consistency: consistency as i32 };
        self.call(|ch, t| {
            let r = req.clone();
            async move { Self::memory(ch).search_batch(timed(r, t)).await }
        })
        .await
    }

    pub async fn delete_namespace(&self, namespace: &str) -> Result<pb::DeleteNamespaceResponse, ClientError> {
        let req = pb::DeleteNamespaceRequest { namespace: namespace.into(), options: Self::options() };
        self.call(|ch, t| {
            let r = req.clone();
            async move { Self::memory(ch).delete_namespace(timed(r, t)).await }
        })
        .await
    }

    /// The namespace's settings, policy and memory-model counters.
    pub async fn describe_namespace(&self, namespace: &str) -> Result<pb::DescribeNamespaceResponse, ClientError> {
        let req = pb::DescribeNamespaceRequest { namespace: namespace.into(), consistency: 0 };
        self.call(|ch, t| {
            let r = req.clone();
            async move { Self::memory(ch).describe_namespace(timed(r, t)).await }
        })
        .await
    }

    /// Replaces the namespace's memory policy.
    pub async fn set_namespace_policy(
        &self,
        namespace: &str,
        policy: pb::MemoryPolicy,
    ) -> Result<pb::SetNamespacePolicyResponse, ClientError> {
        let req = pb::SetNamespacePolicyRequest {
            namespace: namespace.into(),
            policy: Some(policy),
            options: Self::options(),
        };
        self.call(|ch, t| {
            let r = req.clone();
            async move { Self::memory(ch).set_namespace_policy(timed(r, t)).await }
        })
        .await
    }

    /// Merges clusters of near-duplicates (or, with `dry_run`, lists them).
    pub async fn consolidate(
        &self,
        namespace: &str,
        threshold: Option<f32>,
        dry_run: bool,
    ) -> Result<pb::ConsolidateResponse, ClientError> {
        let req = pb::ConsolidateRequest {
            namespace: namespace.into(),
            threshold,
            dry_run,
            max_clusters: 0,
            options: Self::options(),
        };
        self.call(|ch, t| {
            let r = req.clone();
            async move { Self::memory(ch).consolidate(timed(r, t)).await }
        })
        .await
    }

    /// Admin calls go to the leader when a hint says so; status goes to the preferred node.
    pub fn admin(&self) -> Admin<'_> {
        Admin { client: self }
    }

    /// Keys, roles, grants and quotas (cluster admin), and whoami (anyone).
    pub fn auth(&self) -> Auth<'_> {
        Auth { client: self }
    }

    /// A client pinned to one endpoint, never redirected (for per-node status and tests).
    pub fn pinned(addr: &str) -> Result<Client, ClientError> {
        Self::with_retry([addr], RetryPolicy { max_attempts: 1, ..RetryPolicy::default() })
    }
}

pub(crate) fn timed<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(timeout);
    r
}
