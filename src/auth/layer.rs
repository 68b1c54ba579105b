//! The tower layers in front of each listener's services.
//!
//! **API listener** ([`ApiAuthLayer`]): reads `authorization: Bearer …`, verifies an API key
//! against the replicated state (hash, revocation, expiry) or a JWT, applies the principal's
//! request rate, requires cluster admin for `AdminService` and `AuthService` (but `WhoAmI`),
//! and puts the [`Caller`] into the request. Health and reflection need no credentials; nor
//! does `InitCluster` while the cluster has no root key yet (its handler checks that). An
//! `--insecure` node makes every caller [`Caller::insecure`].
//!
//! **Peer listener** ([`PeerAuthLayer`]): the TLS handshake already verified the client
//! certificate against the cluster CA; this layer reads the node identity out of it, refuses
//! another cluster's, and puts [`PeerIdentity`] into the request.
//!
//! Both record an audit event for every refusal, and the API layer one for every admin call
//! that changes something.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::Semaphore;
use tower::{Layer, Service};

use super::audit::{self, Kind};
use super::jwt::JwtVerifier;
use super::limits::RateLimits;
use super::token::{parse_bearer, Bearer};
use super::{Authorizer, Caller, Principal};
use crate::api::status::code_name;
use crate::error::ApiError;
use crate::raft::node::ReadConsistency;
use crate::raft::service::PeerIdentity;
use crate::raft::RaftNode;
use crate::transport::ConnInfo;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

const OPEN_PREFIXES: [&str; 3] =
    ["/grpc.health.v1.Health/", "/grpc.reflection.v1.ServerReflection/", "/grpc.reflection.v1alpha.ServerReflection/"];
const ADMIN_PREFIXES: [&str; 2] = ["/engram.v1.AdminService/", "/engram.v1.AuthService/"];
pub const INIT_CLUSTER_PATH: &str = "/engram.v1.AdminService/InitCluster";
/// Admin calls that change nothing, so they leave no audit event when they succeed.
const READ_ONLY_ADMIN: [&str; 8] = [
    "/engram.v1.AdminService/Status",
    "/engram.v1.AdminService/MarkDigest",
    "/engram.v1.AdminService/VerifyLedger",
    "/engram.v1.AdminService/ExportLedger",
    "/engram.v1.AuthService/WhoAmI",
    "/engram.v1.AuthService/ListKeys",
    "/engram.v1.AuthService/ListRoles",
    "/engram.v1.AuthService/ListQuotas",
];
const WHOAMI_PATH: &str = "/engram.v1.AuthService/WhoAmI";

/// How many requests at once may wait on a read barrier because their key is not (yet) known
/// here; more are refused at once, so unknown keys cannot make a node run barriers at will.
const UNKNOWN_KEY_BARRIERS: usize = 8;

/// What the API layer needs to authenticate.
pub struct ApiAuth {
    /// `false`: `--insecure`, everyone may do everything.
    pub secure: bool,
    pub node: RaftNode,
    pub jwt: Option<JwtVerifier>,
    pub limits: Arc<RateLimits>,
    pub authorizer: Authorizer,
    barriers: Semaphore,
}

impl ApiAuth {
    pub fn new(
        secure: bool,
        authorizer: Authorizer,
        node: RaftNode,
        jwt: Option<JwtVerifier>,
        limits: Arc<RateLimits>,
    ) -> ApiAuth {
        ApiAuth { secure, node, jwt, limits, authorizer, barriers: Semaphore::new(UNKNOWN_KEY_BARRIERS) }
    }

    fn unauthenticated() -> ApiError {
        ApiError::Unauthenticated { reason: "missing, invalid, revoked or expired credentials".into() }
    }

    /// The caller a bearer header speaks for.
    async fn authenticate(&self, header: Option<&str>) -> Result<Caller, ApiError> {
        let header = header.ok_or_else(Self::unauthenticated)?;
        match parse_bearer(header).map_err(|_| Self::unauthenticated())? {
            Bearer::Key(key) => {
                let mut rec = self.authorizer.key(&key.id)?;
                if rec.is_none() {
                    // A key created moments ago may not have reached this node: catch up once.
                    if let Ok(_permit) = self.barriers.try_acquire() {
                        if self.node.linearize(ReadConsistency::Linearizable).await.is_ok() {
                            rec = self.authorizer.key(&key.id)?;
                        }
                    }
                }
                let (rec, _) = rec.ok_or_else(Self::unauthenticated)?;
                if !key.matches(&rec.hash) || !rec.usable_at(crate::memory::now_ms()) {
                    return Err(Self::unauthenticated());
                }
                Ok(Caller { principal: Some(Principal::Key { id: key.id }), name: rec.name })
            }
            Bearer::Jwt(token) => {
                let jwt = self.jwt.as_ref().ok_or_else(Self::unauthenticated)?;
                let principal = jwt.verify(&token)?;
                let Principal::Token { subject, .. } = &principal else { return Err(Self::unauthenticated()) };
                Ok(Caller { name: subject.clone(), principal: Some(principal) })
            }
        }
    }

    /// Admits a request: `Ok(None)` lets it through without a caller (open paths).
    async fn admit(&self, path: &str, header: Option<&str>) -> Result<Option<Caller>, ApiError> {
        if OPEN_PREFIXES.iter().any(|p| path.starts_with(p)) {
            return Ok(None);
        }
        if !self.secure {
            return Ok(Some(Caller::insecure()));
        }
        let caller = match self.authenticate(header).await {
            Ok(c) => c,
            // Until the cluster has a root key there is no key to present: the handler answers
            // InitCluster without credentials only then.
            Err(_) if path == INIT_CLUSTER_PATH => return Ok(None),
            Err(e) => return Err(e),
        };
        self.limits.check_principal(&caller.name)?;
        if ADMIN_PREFIXES.iter().any(|p| path.starts_with(p)) && path != WHOAMI_PATH {
            self.authorizer.require_admin(&caller)?;
        }
        Ok(Some(caller))
    }
}

/// The API listener's layer.
#[derive(Clone)]
pub struct ApiAuthLayer {
    auth: Arc<ApiAuth>,
}

impl ApiAuthLayer {
    pub fn new(auth: Arc<ApiAuth>) -> Self {
        ApiAuthLayer { auth }
    }
}

impl<S> Layer<S> for ApiAuthLayer {
    type Service = ApiAuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ApiAuthService { inner, auth: self.auth.clone() }
    }
}

#[derive(Clone)]
pub struct ApiAuthService<S> {
    inner: S,
    auth: Arc<ApiAuth>,
}

fn remote<B>(req: &http::Request<B>) -> Option<std::net::SocketAddr> {
    req.extensions().get::<ConnInfo>().and_then(|c| c.remote)
}

/// The service that was polled ready, for this call; a fresh clone stays for the next one.
fn take_ready<S: Clone>(inner: &mut S) -> S {
    let clone = inner.clone();
    std::mem::replace(inner, clone)
}

/// The gRPC code of a response (trailers-only errors carry it in the headers).
fn response_code<B>(resp: &http::Response<B>) -> &'static str {
    let code = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(tonic::Code::from_i32)
        .unwrap_or(tonic::Code::Ok);
    code_name(code)
}

impl<S, B, RB> Service<http::Request<B>> for ApiAuthService<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let mut inner = take_ready(&mut self.inner);
        let auth = self.auth.clone();
        Box::pin(async move {
            let path = req.uri().path().to_string();
            let from = remote(&req);
            let header = req.headers().get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(String::from);
            let caller = match auth.admit(&path, header.as_deref()).await {
                Ok(c) => c,
                Err(e) => {
                    let status = tonic::Status::from(e);
                    audit::record(Kind::Denied, "-", &path, code_name(status.code()), from);
                    return Ok(status.into_http());
                }
            };
            let who = caller.as_ref().map(Caller::display).unwrap_or_else(|| "-".into());
            if let Some(c) = caller {
                req.extensions_mut().insert(c);
            }
            let resp = inner.call(req).await?;
            let code = response_code(&resp);
            if matches!(code, "permission_denied" | "unauthenticated") {
                audit::record(Kind::Denied, &who, &path, code, from);
            } else if ADMIN_PREFIXES.iter().any(|p| path.starts_with(p)) && !READ_ONLY_ADMIN.contains(&path.as_str()) {
                audit::record(Kind::Admin, &who, &path, code, from);
            }
            Ok(resp)
        })
    }
}

/// The peer listener's layer. `cluster: None` on an insecure node (no certificates).
#[derive(Clone)]
pub struct PeerAuthLayer {
    cluster: Option<Arc<str>>,
}

impl PeerAuthLayer {
    pub fn new(cluster: Option<&str>) -> Self {
        PeerAuthLayer { cluster: cluster.map(Arc::from) }
    }
}

impl<S> Layer<S> for PeerAuthLayer {
    type Service = PeerAuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PeerAuthService { inner, cluster: self.cluster.clone() }
    }
}

#[derive(Clone)]
pub struct PeerAuthService<S> {
    inner: S,
    cluster: Option<Arc<str>>,
}

/// The node a verified client certificate names, if it belongs to `cluster`.
fn peer_identity(info: Option<&ConnInfo>, cluster: &str) -> Result<PeerIdentity, String> {
    let certs = info.and_then(|i| i.peer_certs.as_ref()).ok_or("no client certificate")?;
    let leaf = certs.first().ok_or("an empty certificate chain")?;
    let id = super::identity::node_identity(leaf).map_err(|e| e.to_string())?;
    if id.cluster != cluster {
        return Err(format!("a certificate of cluster {:?}", id.cluster));
    }
    Ok(PeerIdentity(id.node_id))
}

impl<S, B, RB> Service<http::Request<B>> for PeerAuthService<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let mut inner = take_ready(&mut self.inner);
        let cluster = self.cluster.clone();
        Box::pin(async move {
            if let Some(cluster) = cluster {
                match peer_identity(req.extensions().get::<ConnInfo>(), &cluster) {
                    Ok(id) => {
                        req.extensions_mut().insert(id);
                    }
                    Err(why) => {
                        metrics::counter!("engram_peer_unauthenticated_total").increment(1);
                        tracing::warn!(reason = %why, remote = ?remote(&req), "refused a peer request");
                        audit::record(Kind::Denied, "-", req.uri().path(), "unauthenticated", remote(&req));
                        return Ok(
                            tonic::Status::unauthenticated("peer requests need this cluster's certificate").into_http()
                        );
                    }
                }
            }
            inner.call(req).await
        })
    }
}
