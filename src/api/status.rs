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

use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

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

fn insert(md: &mut MetadataMap, key: &'static str, value: &str) {
    if let Ok(v) = value.parse() {
        md.insert(key, v);
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let message = e.to_string();
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
        Status::with_metadata(code, message, md)
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
