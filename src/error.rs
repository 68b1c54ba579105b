//! Error families. API errors (the caller's fault or a transient cluster condition) are kept
//! apart from fatal storage errors (corruption, I/O), which stop the node.
//!
//! Every error reaches a client through exactly one mapping, [`crate::api::status`].

use thiserror::Error;

/// Errors returned to API callers. Each variant documents whether a write that failed with it
/// may have been applied; see `docs/errors.md`.
/// Serializable so a leader can answer a write a follower forwarded (see
/// `RaftNode::forward`) with the same error it would have given the client.
#[derive(Debug, Error, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum ApiError {
    /// Bad input: nothing was applied.
    #[error("invalid argument `{field}`: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// The namespace or memory does not exist: nothing was applied.
    #[error("{what} not found")]
    NotFound { what: String },
    /// A compare-and-set guard did not hold: nothing was applied.
    #[error("precondition failed for `{field}`: {reason}")]
    FailedPrecondition { field: String, reason: String, current_revision: u64 },
    /// Already exists with different settings: nothing was applied.
    #[error("{what} already exists: {reason}")]
    AlreadyExists { what: String, reason: String },
    /// This node is not the leader; nothing was applied. Retry at the hinted leader.
    #[error("not the leader{}", leader_hint(*leader_id, leader_addr.as_deref()))]
    NotLeader { leader_id: Option<u64>, leader_addr: Option<String> },
    /// The cluster could not be reached or lost leadership while the request was in flight:
    /// a write MAY have been applied. Retry with the same idempotency key.
    #[error("unavailable: {reason}")]
    Unavailable { reason: String },
    /// A write timed out after it was proposed: it MAY have been applied.
    #[error("deadline exceeded: {reason}")]
    Timeout { reason: String },
    /// Stored or supplied data failed its checksum or authentication (a corrupt backup, a
    /// wrong key): nothing was written.
    #[error("data loss: {reason}")]
    DataLoss { reason: String },
    /// No valid credentials (missing, malformed, unknown, revoked, expired): nothing was
    /// applied. The message never says which.
    #[error("unauthenticated: {reason}")]
    Unauthenticated { reason: String },
    /// The caller's grants do not allow this: nothing was applied. Said the same way whether or
    /// not the namespace exists.
    #[error("permission denied{}: {reason}", if field.is_empty() { String::new() } else { format!(" on `{field}`") })]
    PermissionDenied { field: String, reason: String },
    /// A rate limit or quota: nothing was applied. Retry after `retry_after_ms` (rate limits);
    /// a quota stays exceeded until memories are deleted or the quota is raised.
    #[error("resource exhausted: {reason}")]
    ResourceExhausted { field: String, reason: String, retry_after_ms: u64 },
    /// Unexpected failure inside the node: a write MAY have been applied.
    #[error("internal error: {0}")]
    Internal(String),
}

/// `; the leader is node 2 at 10.0.0.2:7001`, or nothing when no leader is known.
fn leader_hint(id: Option<u64>, addr: Option<&str>) -> String {
    match (id, addr) {
        (Some(id), Some(addr)) => format!("; the leader is node {id} at {addr}"),
        (Some(id), None) => format!("; the leader is node {id}"),
        (None, _) => "; no leader is known yet".into(),
    }
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ApiError::InvalidArgument { field: field.into(), reason: reason.into() }
    }

    pub fn not_found(what: impl Into<String>) -> Self {
        ApiError::NotFound { what: what.into() }
    }
}

/// Fatal storage errors: the node cannot trust its disk and must stop.
#[derive(Debug, Error)]
pub enum StorageError {
    #[error("redb: {0}")]
    Redb(#[from] redb::Error),
    #[error("corrupt record in `{table}`: {reason}")]
    Corrupt { table: &'static str, reason: String },
    /// A file this build cannot read as it is (see `storage::format`); nothing was changed.
    #[error("{file}: {reason}")]
    Format { file: String, reason: String },
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

macro_rules! redb_from {
    ($($t:ty),*) => {$(
        impl From<$t> for StorageError {
            fn from(e: $t) -> Self { StorageError::Redb(e.into()) }
        }
    )*};
}
redb_from!(redb::DatabaseError, redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

impl From<StorageError> for std::io::Error {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Io(io) => io,
            other => std::io::Error::other(other.to_string()),
        }
    }
}

/// Errors starting or running a node.
#[derive(Debug, Error)]
pub enum ServerError {
    #[error("config: {0}")]
    Config(String),
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("raft: {0}")]
    Raft(String),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Raft stopped on a full disk and space has been freed since: start the node again
    /// (see `server::run`).
    #[error("the disk was full and has space again: the node must be started afresh")]
    DiskFreed,
}
