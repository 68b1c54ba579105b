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
        let call = crate::api::CallContext::of($req.metadata());
        let res = crate::api::CALL
            .scope(call, async move {
                match crate::auth::Caller::of(&$req) {
                    Ok(caller) => $self.$inner(&caller, $req.into_inner()).await,
                    Err(e) => Err(e),
                }
            })
            .await
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

#[cfg(test)]
mod tests {
    use super::deadline_of;
    use tonic::metadata::MetadataMap;

    fn parse(v: &str) -> Option<std::time::Duration> {
        let mut md = MetadataMap::new();
        md.insert("grpc-timeout", v.parse().ok()?);
        deadline_of(&md).map(|d| d.saturating_duration_since(tokio::time::Instant::now()))
    }

    #[test]
    fn grpc_timeouts_parse_and_garbage_is_no_deadline() {
        let ms = |v: &str| parse(v).map(|d| d.as_millis());
        assert!(matches!(ms("1500m"), Some(1400..=1500)));
        assert!(matches!(ms("2S"), Some(1900..=2000)));
        assert!(matches!(ms("1M"), Some(59_900..=60_000)));
        assert!(ms("99999999H").is_some(), "8 digits of hours still fit");
        for bad in ["", "m", "12", "10x", "-5S", "123456789S", "1.5S", "S1"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}

use crate::auth::Caller;
use crate::error::ApiError;
use crate::raft::{Command, CommandResult, Idempotency, Op, Outcome, RaftNode};

/// Request metadata that asks a follower to refuse a write with the leader hint instead of
/// forwarding it (for clients that route writes themselves).
pub const NO_FORWARD_HEADER: &str = "engram-no-forward";

/// What a handler passes on when it hands work to another node.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallContext {
    /// The calling client's deadline (its `grpc-timeout`).
    pub deadline: Option<tokio::time::Instant>,
    /// Whether a follower may forward this call's write to the leader.
    pub forward: bool,
}

impl CallContext {
    pub(crate) fn of(md: &tonic::metadata::MetadataMap) -> Self {
        let no_forward = md.get(NO_FORWARD_HEADER).is_some_and(|v| v.as_bytes() != b"0");
        CallContext { deadline: deadline_of(md), forward: !no_forward }
    }

    fn current() -> Self {
        CALL.try_with(|c| *c).unwrap_or(CallContext { deadline: None, forward: true })
    }
}

tokio::task_local! {
    pub(crate) static CALL: CallContext;
}

/// The deadline a `grpc-timeout` header sets (`<at most 8 digits><H|M|S|m|u|n>`), if any.
pub(crate) fn deadline_of(md: &tonic::metadata::MetadataMap) -> Option<tokio::time::Instant> {
    use std::time::Duration;
    let v = md.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    let d = match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    tokio::time::Instant::now().checked_add(d)
}

/// Proposes `op` for `caller` — on the leader, or forwarded there from a follower within the
/// client's deadline; a deterministic refusal in `apply` comes back as an error.
pub(crate) async fn propose(
    node: &RaftNode,
    caller: &Caller,
    idempotency: Option<Idempotency>,
    op: Op,
) -> Result<CommandResult, ApiError> {
    let cmd = Command { principal: caller.principal.clone(), idempotency, now_ms: crate::memory::now_ms(), op };
    let call = CallContext::current();
    let res = if call.forward {
        node.propose(cmd, call.deadline).await?
    } else {
        node.require_leader()?;
        node.write(cmd).await?
    };
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
