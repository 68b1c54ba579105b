//! The client-facing gRPC services and everything between them and the domain:
//!
//! * [`status`] — the only place errors become `tonic::Status`.
//! * [`convert`] — proto ↔ domain conversions, destructuring messages exhaustively.
//! * [`memory_service`] — `MemoryService`: writes through Raft, reads at a chosen consistency.
//! * [`admin_service`] — `AdminService`: bootstrap, membership, leadership, status, backups.
//! * [`auth_service`] — `AuthService`: keys, roles, grants, quotas, whoami.
//!
//! Handlers take the [`Caller`] the listener's auth layer put into the request.

/// Runs one handler: the caller from the auth layer, the body, the outcome recorded.
macro_rules! handle {
    ($self:ident, $req:ident, $name:literal, $inner:ident) => {{
        let started = std::time::Instant::now();
        let res = match crate::auth::Caller::of(&$req) {
            Ok(caller) => $self.$inner(&caller, $req.into_inner()).await,
            Err(e) => Err(e),
        }
        .map(tonic::Response::new)
        .map_err(tonic::Status::from);
        crate::api::observe($name, started, &res);
        res
    }};
}

pub mod admin_service;
pub mod auth_service;
mod consolidate;
pub mod convert;
pub mod memory_service;
mod search;
pub mod status;

pub use admin_service::AdminApi;
pub use auth_service::AuthApi;
pub use memory_service::MemoryApi;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::raft::{Command, CommandResult, Idempotency, Op, Outcome, RaftNode};

/// Proposes `op` for `caller` on the leader; a deterministic refusal in `apply` comes back as
/// an error.
pub(crate) async fn propose(
    node: &RaftNode,
    caller: &Caller,
    idempotency: Option<Idempotency>,
    op: Op,
) -> Result<CommandResult, ApiError> {
    // Fail fast with a leader hint before stamping anything.
    node.require_leader()?;
    let cmd = Command { principal: caller.principal.clone(), idempotency, now_ms: crate::memory::now_ms(), op };
    let res = node.write(cmd).await?;
    match res.outcome {
        Outcome::Rejected(r) => Err(r.into()),
        _ => Ok(res),
    }
}

/// Records one RPC's outcome and latency.
pub(crate) fn observe<T>(method: &'static str, started: std::time::Instant, res: &Result<T, tonic::Status>) {
    let code = match res {
        Ok(_) => "ok",
        Err(s) => status::code_name(s.code()),
    };
    metrics::counter!("engram_api_requests_total", "method" => method, "code" => code).increment(1);
    metrics::histogram!("engram_api_request_duration_seconds", "method" => method)
        .record(started.elapsed().as_secs_f64());
}
