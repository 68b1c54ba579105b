//! The single mapping from Engram errors to gRPC status codes (STYLE.md habit 4).
//!
//! | error | code | a failed write was… |
//! |---|---|---|
//! | `InvalidArgument` | INVALID_ARGUMENT (+ `engram-field`) | not applied |
//! | `NotFound` | NOT_FOUND | not applied |
//! | `FailedPrecondition` | FAILED_PRECONDITION (+ `engram-current-revision`) | not applied |
//! | `AlreadyExists` | ALREADY_EXISTS | not applied |
//! | `NotLeader` | UNAVAILABLE + `engram-not-leader`, `engram-leader-id`, `engram-leader-addr` | not applied |
//! | `Unavailable` | UNAVAILABLE | maybe applied |
//! | `Timeout` | DEADLINE_EXCEEDED | maybe applied |
//! | `DataLoss` | DATA_LOSS | not applied (nothing was written) |
//! | `Unauthenticated` | UNAUTHENTICATED | not applied |
//! | `PermissionDenied` | PERMISSION_DENIED (+ `engram-field`) | not applied |
//! | `ResourceExhausted` | RESOURCE_EXHAUSTED + `retry-after` (s), `engram-retry-after-ms` | not applied |
//! | `Internal` | INTERNAL | maybe applied |
//!
//! Beside the `engram-*` metadata every status carries the standard `google.rpc` details a
//! generated client decodes: `ErrorInfo` (domain `engram`, reason = the error's kind, metadata
//! `outcome` = `not-applied` | `maybe-applied`, plus `field`, `leader_id`, `leader_addr`,
//! `current_revision` where they apply), `BadRequest` field violations for bad input,
//! `PreconditionFailure` for a guard, and `RetryInfo` where waiting and resending is the remedy.

use std::collections::HashMap;
use std::time::Duration;

use tonic::metadata::MetadataMap;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::ApiError;
use crate::raft::Rejection;

pub const FIELD_HEADER: &str = "engram-field";
pub const NOT_LEADER_HEADER: &str = "engram-not-leader";
pub const LEADER_ID_HEADER: &str = "engram-leader-id";
pub const LEADER_ADDR_HEADER: &str = "engram-leader-addr";
pub const REVISION_HEADER: &str = "engram-current-revision";
pub const RETRY_AFTER_HEADER: &str = "retry-after";
pub const RETRY_AFTER_MS_HEADER: &str = "engram-retry-after-ms";
/// How long a quota refusal tells a client to wait: quotas do not refill by themselves.
pub const QUOTA_RETRY_AFTER_MS: u64 = 60_000;
/// `ErrorInfo.domain` of every Engram error.
pub const ERROR_DOMAIN: &str = "engram";
/// How long a client should wait before resending after a transient failure.
const TRANSIENT_RETRY_DELAY: Duration = Duration::from_millis(100);

impl ApiError {
    /// Whether a write that failed with this error may still have been applied (the table in
    /// docs/errors.md): resend it only with the same idempotency key.
    pub fn may_have_applied(&self) -> bool {
        matches!(self, ApiError::Unavailable { .. } | ApiError::Timeout { .. } | ApiError::Internal(_))
    }

    /// `ErrorInfo.reason`: the error's kind, stable across versions.
    pub fn reason_code(&self) -> &'static str {
        match self {
            ApiError::InvalidArgument { .. } => "INVALID_ARGUMENT",
            ApiError::NotFound { .. } => "NOT_FOUND",
            ApiError::FailedPrecondition { .. } => "PRECONDITION_FAILED",
            ApiError::AlreadyExists { .. } => "ALREADY_EXISTS",
            ApiError::NotLeader { .. } => "NOT_LEADER",
            ApiError::Unavailable { .. } => "UNAVAILABLE",
            ApiError::Timeout { .. } => "DEADLINE_EXCEEDED",
            ApiError::DataLoss { .. } => "DATA_LOSS",
            ApiError::Unauthenticated { .. } => "UNAUTHENTICATED",
            ApiError::PermissionDenied { .. } => "PERMISSION_DENIED",
            ApiError::ResourceExhausted { .. } => "RESOURCE_EXHAUSTED",
            ApiError::Internal(_) => "INTERNAL",
        }
    }
}

/// The `google.rpc` details of `e`.
fn details(e: &ApiError) -> ErrorDetails {
    let mut d = ErrorDetails::new();
    let mut info: HashMap<String, String> = HashMap::new();
    let outcome = if e.may_have_applied() { "maybe-applied" } else { "not-applied" };
    info.insert("outcome".into(), outcome.into());
    match e {
        ApiError::InvalidArgument { field, reason } => {
            d.add_bad_request_violation(field, reason);
            info.insert("field".into(), field.clone());
        }
        ApiError::FailedPrecondition { field, reason, current_revision } => {
            d.add_precondition_failure_violation("PRECONDITION", field, reason);
            info.insert("field".into(), field.clone());
            info.insert("current_revision".into(), current_revision.to_string());
        }
        ApiError::NotLeader { leader_id, leader_addr } => {
            if let Some(id) = leader_id {
                info.insert("leader_id".into(), id.to_string());
            }
            if let Some(addr) = leader_addr {
                info.insert("leader_addr".into(), addr.clone());
            }
            d.set_retry_info(Some(Duration::ZERO));
        }
        ApiError::Unavailable { .. } | ApiError::Timeout { .. } => {
            d.set_retry_info(Some(TRANSIENT_RETRY_DELAY));
        }
        ApiError::PermissionDenied { field, .. } if !field.is_empty() => {
            info.insert("field".into(), field.clone());
        }
        ApiError::ResourceExhausted { field, retry_after_ms, .. } => {
            if !field.is_empty() {
                info.insert("field".into(), field.clone());
            }
            d.set_retry_info(Some(Duration::from_millis(*retry_after_ms)));
        }
        _ => {}
    }
    d.set_error_info(e.reason_code(), ERROR_DOMAIN, info);
    d
}

fn insert(md: &mut MetadataMap, key: &'static str, value: &str) {
    if let Ok(v) = value.parse() {
        md.insert(key, v);
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let message = e.to_string();
        let details = details(&e);
        let mut md = MetadataMap::new();
        let code = match e {
            ApiError::InvalidArgument { field, .. } => {
                insert(&mut md, FIELD_HEADER, &field);
                Code::InvalidArgument
            }
            ApiError::NotFound { .. } => Code::NotFound,
            ApiError::FailedPrecondition { field, current_revision, .. } => {
                insert(&mut md, FIELD_HEADER, &field);
                insert(&mut md, REVISION_HEADER, &current_revision.to_string());
                Code::FailedPrecondition
            }
            ApiError::AlreadyExists { .. } => Code::AlreadyExists,
            ApiError::NotLeader { leader_id, leader_addr } => {
                insert(&mut md, NOT_LEADER_HEADER, "1");
                if let Some(id) = leader_id {
                    insert(&mut md, LEADER_ID_HEADER, &id.to_string());
                }
                if let Some(addr) = leader_addr {
                    insert(&mut md, LEADER_ADDR_HEADER, &addr);
                }
                Code::Unavailable
            }
            ApiError::Unavailable { .. } => Code::Unavailable,
            ApiError::Timeout { .. } => Code::DeadlineExceeded,
            ApiError::DataLoss { .. } => Code::DataLoss,
            ApiError::Unauthenticated { .. } => Code::Unauthenticated,
            ApiError::PermissionDenied { field, .. } => {
                if !field.is_empty() {
                    insert(&mut md, FIELD_HEADER, &field);
                }
                Code::PermissionDenied
            }
            ApiError::ResourceExhausted { field, retry_after_ms, .. } => {
                if !field.is_empty() {
                    insert(&mut md, FIELD_HEADER, &field);
                }
                insert(&mut md, RETRY_AFTER_HEADER, &retry_after_ms.div_ceil(1000).max(1).to_string());
                insert(&mut md, RETRY_AFTER_MS_HEADER, &retry_after_ms.to_string());
                Code::ResourceExhausted
            }
            ApiError::Internal(_) => Code::Internal,
        };
        Status::with_error_details_and_metadata(code, message, details, md)
    }
}

/// Backup and restore failures, as the API reports them.
impl From<crate::backup::BackupError> for ApiError {
    fn from(e: crate::backup::BackupError) -> ApiError {
        use crate::backup::BackupError as B;
        let reason = e.to_string();
        match e {
            B::Corrupt { .. } | B::WrongKey { .. } => ApiError::DataLoss { reason },
            B::Key(_) => ApiError::FailedPrecondition { field: "backup_key".into(), reason, current_revision: 0 },
            B::Empty(_) => ApiError::FailedPrecondition { field: "state".into(), reason, current_revision: 0 },
            B::Target(_) => ApiError::invalid("target", reason),
            B::Storage(_) | B::Io(_) => ApiError::Internal(reason),
        }
    }
}

/// A deterministic refusal from `apply` as an API error (nothing was applied).
impl From<Rejection> for ApiError {
    fn from(r: Rejection) -> ApiError {
        match r {
            Rejection::PreconditionFailed { field, id, current_revision } => ApiError::FailedPrecondition {
                field,
                reason: match current_revision {
                    Some(rev) => format!("memory {id:?} is at revision {rev}"),
                    None => format!("memory {id:?} does not exist"),
                },
                current_revision: current_revision.unwrap_or(0),
            },
            Rejection::NamespaceNotFound { namespace } => ApiError::not_found(format!("namespace {namespace:?}")),
            Rejection::DimensionMismatch { field, expected, got } => {
                ApiError::invalid(field, format!("dimension {got} does not match the namespace's {expected}"))
            }
            Rejection::NamespaceExists { namespace, dimension, metric } => ApiError::AlreadyExists {
                what: format!("namespace {namespace:?}"),
                reason: format!("it has dimension {dimension} and metric {metric:?}"),
            },
            Rejection::Unauthenticated { reason } => ApiError::Unauthenticated { reason },
            Rejection::PermissionDenied { field, reason } => ApiError::PermissionDenied { field, reason },
            Rejection::QuotaExceeded { field, reason } => {
                ApiError::ResourceExhausted { field, reason, retry_after_ms: QUOTA_RETRY_AFTER_MS }
            }
            Rejection::IdempotencyKeyReused => ApiError::FailedPrecondition {
                field: "options.idempotency_key".into(),
                reason: "this idempotency key was already used for a different request".into(),
                current_revision: 0,
            },
            Rejection::AuthNotFound { what } => ApiError::NotFound { what },
            Rejection::AuthExists { what } => {
                ApiError::AlreadyExists { what, reason: "pick another name or id".into() }
            }
            Rejection::NearDuplicate { field, twin, score_bits } => ApiError::AlreadyExists {
                what: format!("near-duplicate memory {twin:?}"),
                reason: format!(
                    "{field} scores {:.6} against it, past the namespace's threshold",
                    f64::from_bits(score_bits)
                ),
            },
            Rejection::GateRefused { field, rule, reason } => {
                ApiError::invalid(field, format!("verification gate rule {rule}: {reason}"))
            }
            Rejection::Invalid { field, reason } => ApiError::invalid(field, reason),
            Rejection::PolicyDiffers { namespace } => ApiError::AlreadyExists {
                what: format!("namespace {namespace:?}"),
                reason: "it has another memory policy; change it with SetNamespacePolicy".into(),
            },
            Rejection::DataKeyGone { namespace } => ApiError::FailedPrecondition {
                field: "namespace".into(),
                reason: format!(
                    "namespace {namespace:?} was erased while the write was in flight; nothing was written"
                ),
                current_revision: 0,
            },
        }
    }
}

pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::InvalidArgument => "invalid_argument",
        Code::NotFound => "not_found",
        Code::FailedPrecondition => "failed_precondition",
        Code::AlreadyExists => "already_exists",
        Code::Unavailable => "unavailable",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::Internal => "internal",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::StatusExt;

    #[test]
    fn statuses_carry_standard_details() {
        let s = Status::from(ApiError::invalid("memory.embedding", "has NaN at 3"));
        assert_eq!(s.code(), Code::InvalidArgument);
        let d = s.get_error_details();
        let v = &d.bad_request().expect("BadRequest").field_violations[0];
        assert_eq!((v.field.as_str(), v.description.as_str()), ("memory.embedding", "has NaN at 3"));
        let info = d.error_info().expect("ErrorInfo");
        assert_eq!((info.reason.as_str(), info.domain.as_str()), ("INVALID_ARGUMENT", ERROR_DOMAIN));
        assert_eq!(info.metadata["outcome"], "not-applied");
        assert_eq!(s.metadata().get(FIELD_HEADER).unwrap(), "memory.embedding");

        let s = Status::from(ApiError::Timeout { reason: "slow".into() });
        let d = s.get_error_details();
        assert_eq!(d.error_info().unwrap().metadata["outcome"], "maybe-applied");
        assert!(d.retry_info().unwrap().retry_delay.is_some());

        let s = Status::from(ApiError::ResourceExhausted {
            field: String::new(),
            reason: "slow down".into(),
            retry_after_ms: 2500,
        });
        assert_eq!(s.get_error_details().retry_info().unwrap().retry_delay, Some(Duration::from_millis(2500)));
        assert_eq!(s.metadata().get(RETRY_AFTER_HEADER).unwrap(), "3");
    }

    #[test]
    fn not_leader_reads_as_prose() {
        let s = Status::from(ApiError::NotLeader { leader_id: Some(2), leader_addr: Some("10.0.0.2:7001".into()) });
        assert_eq!(s.message(), "not the leader; the leader is node 2 at 10.0.0.2:7001");
        let info = s.get_error_details().error_info().cloned().unwrap();
        assert_eq!(info.metadata["leader_id"], "2");
        assert_eq!(info.metadata["leader_addr"], "10.0.0.2:7001");
        let s = Status::from(ApiError::NotLeader { leader_id: None, leader_addr: None });
        assert_eq!(s.message(), "not the leader; no leader is known yet");
        assert!(!s.message().contains("Some("));
    }
}
