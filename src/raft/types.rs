//! Raft type configuration and the application data carried in log entries.
//!
//! A [`Command`] is everything `apply` needs: ids, timestamps and idempotency keys are fixed
//! by the proposing leader, so applying the same log gives the same state on every node.

use serde::{Deserialize, Serialize};

use crate::memory::{MemoryInput, Metric, NamespaceInfo, Precondition};

/// A cluster member's addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct EngramNode {
    /// Peer (Raft) listener, host:port.
    pub raft_addr: String,
    /// Client/admin listener, host:port.
    pub api_addr: String,
}

impl std::fmt::Display for EngramNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "raft={} api={}", self.raft_addr, self.api_addr)
    }
}

openraft::declare_raft_types!(
    /// Engram's Raft type configuration.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = u64,
        Node = EngramNode,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig, crate::raft::StateMachineStore>;
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
pub type Membership = openraft::Membership<NodeId, EngramNode>;

/// One replicated write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Client-chosen key: a second command with the same key returns the first result.
    pub idempotency_key: Option<String>,
    /// The leader's wall clock when it proposed the command (Unix ms).
    pub now_ms: u64,
    pub op: Op,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// `ivf_min_vectors` is the leader's configured IVF threshold, fixed into the namespace.
    CreateNamespace {
        namespace: String,
        dimension: u32,
        metric: Metric,
        ivf_min_vectors: u64,
    },
    /// Atomic: every item applies or none does. Creates the namespace on first write (with the
    /// leader's `ivf_min_vectors`).
    Put {
        namespace: String,
        items: Vec<(MemoryInput, Precondition)>,
        ivf_min_vectors: u64,
    },
    Delete {
        namespace: String,
        id: String,
        precondition: Precondition,
    },
    DeleteNamespace {
        namespace: String,
    },
    /// Names the cluster once (proposed by the first leader; see `server`). Backups carry it.
    SetClusterId {
        cluster_id: [u8; 16],
    },
}

/// The result of applying one command, returned to the proposer and remembered under the
/// command's idempotency key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct CommandResult {
    /// Log index at which the command was applied.
    pub index: u64,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub enum Outcome {
    /// Blank and membership entries.
    #[default]
    None,
    NamespaceCreated(NamespaceInfo),
    Put(Vec<PutResult>),
    Deleted {
        deleted: bool,
    },
    NamespaceDeleted {
        memories: u64,
    },
    /// Deterministically refused in `apply`; the state did not change.
    Rejected(Rejection),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutResult {
    pub id: String,
    pub revision: u64,
    pub updated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rejection {
    PreconditionFailed { field: String, id: String, current_revision: Option<u64> },
    NamespaceNotFound { namespace: String },
    DimensionMismatch { field: String, expected: u32, got: u32 },
    NamespaceExists { namespace: String, dimension: u32, metric: Metric },
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.op {
            Op::CreateNamespace { namespace, .. } => write!(f, "create-namespace {namespace}"),
            Op::Put { namespace, items, .. } => write!(f, "put {namespace} x{}", items.len()),
            Op::Delete { namespace, id, .. } => write!(f, "delete {namespace}/{id}"),
            Op::DeleteNamespace { namespace } => write!(f, "delete-namespace {namespace}"),
            Op::SetClusterId { cluster_id } => write!(f, "set-cluster-id {}", uuid::Uuid::from_bytes(*cluster_id)),
        }
    }
}

impl std::fmt::Display for CommandResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "@{} {:?}", self.index, self.outcome)
    }
}
