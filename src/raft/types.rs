//! Raft type configuration and the application data carried in log entries.
//!
//! A [`Command`] is everything `apply` needs: ids, timestamps and idempotency keys are fixed
//! by the proposing leader, so applying the same log gives the same state on every node.

use serde::{Deserialize, Serialize};

use crate::auth::records::{Grant, KeyRecord, Quota, Role};
use crate::auth::token::KeyId;
use crate::auth::Principal;
use crate::memory::policy::KeepText;
use crate::memory::{MemoryInput, MemoryPolicy, Metric, NamespaceInfo, Precondition};

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
    /// Who asked. `apply` authorizes the op again for this principal at the entry's log index,
    /// so a write proposed just before a revocation applied is refused on every node. `None`:
    /// the node itself (naming the cluster, installing the root key) or an `--insecure` node.
    pub principal: Option<Principal>,
    /// Client-chosen key: a second command with the same key, principal and namespace returns
    /// the first result; one whose request differs is refused.
    pub idempotency: Option<Idempotency>,
    /// The leader's wall clock when it proposed the command (Unix ms).
    pub now_ms: u64,
    pub op: Op,
}

impl Command {
    /// A command the node proposes on its own behalf.
    pub fn system(op: Op) -> Command {
        Command { principal: None, idempotency: None, now_ms: crate::memory::now_ms(), op }
    }
}

/// An idempotency key and the fingerprint of the request it was first used with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Idempotency {
    pub key: String,
    /// BLAKE3 of the request as the client sent it (before the leader stamped ids).
    pub fingerprint: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// `approx_min_vectors` is the leader's configured IVF threshold, fixed into the namespace.
    CreateNamespace {
        namespace: String,
        dimension: u32,
        metric: Metric,
        approx_min_vectors: u64,
    },
    /// Atomic: every item applies or none does. Creates the namespace on first write (with the
    /// leader's `approx_min_vectors`).
    Put {
        namespace: String,
        items: Vec<(MemoryInput, Precondition)>,
        approx_min_vectors: u64,
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
    /// Stores an API key (its hash; the leader made the secret and returned it once).
    CreateKey {
        record: KeyRecord,
    },
    /// The root key proposed at `cluster init`: applied only while no root key exists.
    BootstrapRootKey {
        record: KeyRecord,
    },
    RevokeKey {
        id: KeyId,
    },
    CreateRole {
        name: String,
    },
    DeleteRole {
        name: String,
    },
    /// Adds a grant to a role (a grant equal to an existing one is not added twice).
    GrantRole {
        role: String,
        grant: Grant,
    },
    /// Removes every grant of the role on exactly this namespace pattern.
    RevokeGrant {
        role: String,
        namespace: String,
    },
    /// Sets (or, with every limit `None`, clears) a tenant's quota; `*` is the default.
    SetQuota {
        tenant: String,
        quota: Quota,
    },
    /// `CreateNamespace` with a memory policy (validated again in `apply`). An existing
    /// namespace of the same dimension and metric is returned as it is, policy unchanged.
    DefineNamespace {
        namespace: String,
        dimension: u32,
        metric: Metric,
        approx_min_vectors: u64,
        policy: MemoryPolicy,
    },
    /// Replaces a namespace's memory policy.
    SetPolicy {
        namespace: String,
        policy: MemoryPolicy,
    },
    /// Deletes the listed memories that are due at the entry's `now_ms`: expired, or older
    /// than their namespace's drop-only retention rule. Listed by the leader from its expiry
    /// and age indexes; an entry that is not due (rewritten since, say) is left alone.
    Purge {
        items: Vec<(String, String)>,
    },
    /// Deletes memories of a namespace at exactly these revisions (retention: the leader
    /// archived these versions first when `archived`).
    Retire {
        namespace: String,
        items: Vec<(String, u64)>,
        archived: bool,
    },
    /// Merges each cluster into its keeper, in one entry. A cluster any member of which changed
    /// since the plan (another revision, gone, expired) is skipped whole.
    Consolidate {
        namespace: String,
        clusters: Vec<ConsolidationCluster>,
        keep: KeepText,
    },
    /// Coalesced reinforcement: adds each count to the memory's `access_count` and moves its
    /// `last_accessed_at_ms` to the entry's time. Revisions stay as they are.
    Reinforce {
        namespace: String,
        hits: Vec<(String, u32)>,
    },
    /// `Put` that refuses an unknown namespace (`NamespaceNotFound`) unless `create` is set:
    /// then it creates it as `Put` does (cosine, default policy, the leader's
    /// `approx_min_vectors`). What the API proposes; `Put` stays for entries already in logs.
    PutChecked {
        namespace: String,
        items: Vec<(MemoryInput, Precondition)>,
        create: bool,
        approx_min_vectors: u64,
    },
    /// No effect of its own (it moves the applied index and the ledger like any entry). Every
    /// node that applies it digests its state right after it, so replicas can be compared at
    /// one common index (`cluster verify`). Proposed by the leader on an admin's request.
    Mark {
        id: String,
    },
    /// Partial restore: the namespace becomes exactly `memories` (rows as a backup holds them),
    /// in one entry. Its current memories go; each restored one takes the entry's index as its
    /// revision, so a precondition written against the old state fails. An absent namespace is
    /// created with `dimension` and `metric`; an existing one must have them. `policy` (JSON,
    /// as the backup's `ns_policy` row) replaces the namespace's, `None` restores the default.
    /// Cluster admins only. Other namespaces are not touched.
    RestoreNamespace {
        namespace: String,
        dimension: u32,
        metric: Metric,
        approx_min_vectors: u64,
        policy: Option<MemoryPolicy>,
        memories: Vec<crate::memory::Memory>,
    },
    /// Partial restore of some memories: each becomes exactly its backup row (the entry's
    /// index as revision); the rest of the namespace, which must exist, stays as it is.
    /// Cluster admins only.
    RestoreMemories {
        namespace: String,
        memories: Vec<crate::memory::Memory>,
    },
    /// A memory op sealed by the leader under `namespace`'s data key `key` (the bincode `Op`,
    /// bound to the namespace): the log never holds memory content in the clear. Applies as
    /// the op inside, authorized for the command's principal; refused if the key is gone.
    /// `new_key`: the namespace had no data key when the leader sealed it, so the leader made
    /// `key` (wrapped; see `storage::vault`). It becomes the namespace's key only if the op
    /// inside applies and leaves the namespace in place (and no other key won a race); plain
    /// rows the namespace already held are sealed under it in the same entry.
    Sealed {
        namespace: String,
        key: [u8; 8],
        blob: Vec<u8>,
        new_key: Option<crate::storage::vault::DataKeyRow>,
    },
    /// The same data keys, wrapped again under the active master key (`keys rotate
    /// --at-rest`). A row whose namespace has another key by now is skipped. Cluster admins.
    RewrapDataKeys {
        keys: Vec<crate::storage::vault::DataKeyRow>,
    },
}

/// One consolidation group: the keeper and the memories it absorbs, each at the revision the
/// plan saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsolidationCluster {
    pub keep: (String, u64),
    pub absorb: Vec<(String, u64)>,
}

impl Op {
    /// The op's kind, for traces and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Op::CreateNamespace { .. } => "create_namespace",
            Op::Put { .. } => "put",
            Op::PutChecked { .. } => "put",
            Op::Delete { .. } => "delete",
            Op::DeleteNamespace { .. } => "delete_namespace",
            Op::DefineNamespace { .. } => "define_namespace",
            Op::SetPolicy { .. } => "set_policy",
            Op::Retire { .. } => "retire",
            Op::Consolidate { .. } => "consolidate",
            Op::Reinforce { .. } => "reinforce",
            Op::Purge { .. } => "purge",
            Op::SetClusterId { .. } => "set_cluster_id",
            Op::CreateKey { .. } => "create_key",
            Op::BootstrapRootKey { .. } => "bootstrap_root_key",
            Op::RevokeKey { .. } => "revoke_key",
            Op::CreateRole { .. } => "create_role",
            Op::DeleteRole { .. } => "delete_role",
            Op::GrantRole { .. } => "grant_role",
            Op::RevokeGrant { .. } => "revoke_grant",
            Op::SetQuota { .. } => "set_quota",
            Op::Mark { .. } => "mark",
            Op::RestoreNamespace { .. } => "restore_namespace",
            Op::RestoreMemories { .. } => "restore_memories",
            Op::Sealed { .. } => "sealed",
            Op::RewrapDataKeys { .. } => "rewrap_data_keys",
        }
    }

    /// The namespace a memory op touches; `None` for cluster-level ops.
    pub fn namespace(&self) -> Option<&str> {
        match self {
            Op::CreateNamespace { namespace, .. }
            | Op::Put { namespace, .. }
            | Op::PutChecked { namespace, .. }
            | Op::Delete { namespace, .. }
            | Op::DeleteNamespace { namespace }
            | Op::DefineNamespace { namespace, .. }
            | Op::SetPolicy { namespace, .. }
            | Op::Retire { namespace, .. }
            | Op::Consolidate { namespace, .. }
            | Op::Reinforce { namespace, .. }
            | Op::RestoreNamespace { namespace, .. }
            | Op::RestoreMemories { namespace, .. }
            | Op::Sealed { namespace, .. } => Some(namespace),
            Op::Purge { .. } | Op::RewrapDataKeys { .. } => None,
            Op::SetClusterId { .. }
            | Op::CreateKey { .. }
            | Op::BootstrapRootKey { .. }
            | Op::RevokeKey { .. }
            | Op::CreateRole { .. }
            | Op::DeleteRole { .. }
            | Op::GrantRole { .. }
            | Op::RevokeGrant { .. }
            | Op::SetQuota { .. }
            | Op::Mark { .. } => None,
        }
    }

    /// Ops only a node proposes on its own behalf, never on a client's: a forwarded write
    /// carrying one is refused (see `guard::forwarded`).
    pub fn node_only(&self) -> bool {
        matches!(
            self,
            Op::SetClusterId { .. }
                | Op::BootstrapRootKey { .. }
                | Op::Purge { .. }
                | Op::Retire { .. }
                | Op::Reinforce { .. }
                | Op::Mark { .. }
                | Op::Sealed { .. }
                | Op::RewrapDataKeys { .. }
        )
    }

    /// Whether the op adds data, so a node short of disk refuses it (`storage::space`).
    /// Deletes, revocations and the node's housekeeping are how space and safety come back:
    /// they never wait on a disk.
    pub fn needs_disk(&self) -> bool {
        !matches!(
            self,
            Op::Delete { .. }
                | Op::DeleteNamespace { .. }
                | Op::RevokeKey { .. }
                | Op::DeleteRole { .. }
                | Op::RevokeGrant { .. }
                | Op::Purge { .. }
                | Op::Retire { .. }
                | Op::SetClusterId { .. }
                | Op::Mark { .. }
                | Op::RewrapDataKeys { .. }
        )
    }

    /// Whether the op carries memory content (text, embedding, tags): what the leader seals
    /// before it enters the log when encryption at rest is on.
    pub fn carries_content(&self) -> bool {
        matches!(
            self,
            Op::Put { .. } | Op::PutChecked { .. } | Op::RestoreNamespace { .. } | Op::RestoreMemories { .. }
        )
    }

    /// Whether applying it may change keys, roles or quotas (auth caches reload after).
    pub fn changes_auth(&self) -> bool {
        matches!(
            self,
            Op::SetClusterId { .. }
                | Op::CreateKey { .. }
                | Op::BootstrapRootKey { .. }
                | Op::RevokeKey { .. }
                | Op::CreateRole { .. }
                | Op::DeleteRole { .. }
                | Op::GrantRole { .. }
                | Op::RevokeGrant { .. }
                | Op::SetQuota { .. }
        )
    }
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
    KeyCreated {
        id: KeyId,
    },
    KeyRevoked {
        existed: bool,
    },
    /// The role as it is after the change.
    Role(Role),
    RoleDeleted {
        existed: bool,
    },
    QuotaSet,
    /// Puts under a memory policy (every put since policies exist).
    Stored(Vec<StoreResult>),
    PolicySet(MemoryPolicy),
    Purged {
        expired: u64,
        retired: u64,
    },
    Retired {
        deleted: u64,
    },
    Consolidated {
        /// Per cluster of the plan: whether it merged (false: a member changed since).
        merged: Vec<bool>,
        absorbed: u64,
    },
    Reinforced {
        memories: u64,
    },
    NamespaceRestored {
        /// Memories the namespace holds now, and held before.
        restored: u64,
        replaced: u64,
    },
    DataKeysRewrapped {
        rewrapped: u64,
    },
}

/// What one put item did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PutAction {
    Created,
    /// Replaced the memory with the item's id.
    Updated,
    /// An exact duplicate of `id`: nothing created (`id` merged the put when `dedup_merge`).
    Deduplicated,
    /// A near-duplicate merged into `id`.
    Merged,
    /// Created, linked to its near-duplicate `twin`.
    Linked {
        twin: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreResult {
    /// The memory that holds the item now (the twin's id when deduplicated or merged).
    pub id: String,
    pub revision: u64,
    pub action: PutAction,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutResult {
    pub id: String,
    pub revision: u64,
    pub updated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rejection {
    PreconditionFailed {
        field: String,
        id: String,
        current_revision: Option<u64>,
    },
    NamespaceNotFound {
        namespace: String,
    },
    DimensionMismatch {
        field: String,
        expected: u32,
        got: u32,
    },
    NamespaceExists {
        namespace: String,
        dimension: u32,
        metric: Metric,
    },
    /// The principal's key is unknown, revoked or expired at the entry's time.
    Unauthenticated {
        reason: String,
    },
    /// No grant of the principal allows the op.
    PermissionDenied {
        field: String,
        reason: String,
    },
    /// A tenant quota would be exceeded.
    QuotaExceeded {
        field: String,
        reason: String,
    },
    /// The idempotency key was first used for a different request.
    IdempotencyKeyReused,
    /// An auth record the op names does not exist (a role, a key).
    AuthNotFound {
        what: String,
    },
    AuthExists {
        what: String,
    },
    /// A near-duplicate under a `reject` policy.
    NearDuplicate {
        field: String,
        twin: String,
        /// The exact score against the twin, as f64 bits (so the rejection stays `Eq`).
        score_bits: u64,
    },
    /// A verification-gate rule refused the item.
    GateRefused {
        field: String,
        rule: String,
        reason: String,
    },
    /// Input that cannot apply at the entry's time or under the namespace's policy (an expiry
    /// already past, an invalid policy, a zero vector in a cosine namespace).
    Invalid {
        field: String,
        reason: String,
    },
    /// A namespace created with a policy exists already with another one.
    PolicyDiffers {
        namespace: String,
    },
    /// A sealed write whose data key was destroyed (the namespace was erased) before it applied.
    DataKeyGone {
        namespace: String,
    },
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.op {
            Op::CreateNamespace { namespace, .. } => write!(f, "create-namespace {namespace}"),
            Op::Put { namespace, items, .. } | Op::PutChecked { namespace, items, .. } => {
                write!(f, "put {namespace} x{}", items.len())
            }
            Op::Delete { namespace, id, .. } => write!(f, "delete {namespace}/{id}"),
            Op::DeleteNamespace { namespace } => write!(f, "delete-namespace {namespace}"),
            Op::SetClusterId { cluster_id } => write!(f, "set-cluster-id {}", uuid::Uuid::from_bytes(*cluster_id)),
            Op::CreateKey { record } | Op::BootstrapRootKey { record } => {
                write!(f, "create-key {} ({})", record.id, record.name)
            }
            Op::RevokeKey { id } => write!(f, "revoke-key {id}"),
            Op::CreateRole { name } => write!(f, "create-role {name}"),
            Op::DeleteRole { name } => write!(f, "delete-role {name}"),
            Op::GrantRole { role, grant } => write!(f, "grant {role} {}", grant.namespace),
            Op::RevokeGrant { role, namespace } => write!(f, "revoke {role} {namespace}"),
            Op::SetQuota { tenant, .. } => write!(f, "set-quota {tenant}"),
            Op::DefineNamespace { namespace, .. } => write!(f, "define-namespace {namespace}"),
            Op::SetPolicy { namespace, .. } => write!(f, "set-policy {namespace}"),
            Op::Purge { items } => write!(f, "purge x{}", items.len()),
            Op::Retire { namespace, items, .. } => write!(f, "retire {namespace} x{}", items.len()),
            Op::Consolidate { namespace, clusters, .. } => write!(f, "consolidate {namespace} x{}", clusters.len()),
            Op::Reinforce { namespace, hits } => write!(f, "reinforce {namespace} x{}", hits.len()),
            Op::Mark { id } => write!(f, "mark {id}"),
            Op::RestoreNamespace { namespace, memories, .. } => {
                write!(f, "restore-namespace {namespace} x{}", memories.len())
            }
            Op::RestoreMemories { namespace, memories } => {
                write!(f, "restore-memories {namespace} x{}", memories.len())
            }
            Op::Sealed { namespace, blob, .. } => write!(f, "sealed {namespace} ({} bytes)", blob.len()),
            Op::RewrapDataKeys { keys } => write!(f, "rewrap-data-keys x{}", keys.len()),
        }
    }
}

impl std::fmt::Display for CommandResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "@{} {:?}", self.index, self.outcome)
    }
}
