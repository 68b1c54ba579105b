//! Client errors. Every failed call says whether a write may have been applied, following the
//! server's error semantics (docs/errors.md).

use thiserror::Error;
use tonic::Code;

use crate::api::status::{FIELD_HEADER, NOT_LEADER_HEADER, RETRY_AFTER_MS_HEADER};

/// Whether a failed write may have taken effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The write was definitely not applied: safe to change and resend.
    NotApplied,
    /// The write may have been applied: resend with the same idempotency key to find out.
    MaybeApplied,
}

#[derive(Debug, Error, Clone)]
#[error("{code:?}: {message}")]
pub struct ClientError {
    pub code: Code,
    pub message: String,
    /// The offending field, for InvalidArgument / FailedPrecondition.
    pub field: Option<String>,
    pub outcome: WriteOutcome,
    /// RESOURCE_EXHAUSTED: how long the node asked the client to wait.
    pub retry_after: Option<std::time::Duration>,
}

impl ClientError {
    pub fn from_status(s: &tonic::Status) -> Self {
        let md = s.metadata();
        let not_leader = md.get(NOT_LEADER_HEADER).is_some();
        let outcome = match s.code() {
            Code::InvalidArgument
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::AlreadyExists
            | Code::DataLoss
            | Code::Unauthenticated
            | Code::PermissionDenied
            | Code::ResourceExhausted => WriteOutcome::NotApplied,
            Code::Unavailable if not_leader || never_sent(s) => WriteOutcome::NotApplied,
            _ => WriteOutcome::MaybeApplied,
        };
        ClientError {
            code: s.code(),
            message: s.message().to_string(),
            field: md.get(FIELD_HEADER).and_then(|v| v.to_str().ok()).map(String::from),
            outcome,
            retry_after: (s.code() == Code::ResourceExhausted)
                .then(|| md.get(RETRY_AFTER_MS_HEADER)?.to_str().ok()?.parse::<u64>().ok())
                .flatten()
                .map(std::time::Duration::from_millis),
        }
    }

    pub(crate) fn config(message: impl Into<String>) -> Self {
        ClientError {
            code: Code::InvalidArgument,
            message: message.into(),
            field: None,
            outcome: WriteOutcome::NotApplied,
            retry_after: None,
        }
    }

    /// Transient: another attempt (possibly at another node) may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self.code, Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled)
    }
}

/// The call failed while connecting, so the request never left this process. (A connection
/// that breaks after the request was written fails with another error, which stays
/// "maybe applied".)
fn never_sent(s: &tonic::Status) -> bool {
    let mut cause = std::error::Error::source(s);
    while let Some(e) = cause {
        if e.is::<tonic::ConnectError>() {
            return true;
        }
        cause = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_unavailable_errors_may_have_been_applied() {
        let e = ClientError::from_status(&tonic::Status::unavailable("leadership changed"));
        assert_eq!(e.outcome, WriteOutcome::MaybeApplied);
        let e = ClientError::from_status(&tonic::Status::deadline_exceeded("slow"));
        assert_eq!(e.outcome, WriteOutcome::MaybeApplied);
    }
}
