//! [`RaftNode`]: the consensus handle the API layer uses.
//!
//! Writes are proposed on the leader only; elsewhere they fail with
//! [`ApiError::NotLeader`] carrying a hint. Linearizable reads work on every node: the leader
//! confirms its leadership (ReadIndex or lease), a follower asks the leader for that read
//! index over the peer RPC, and either then waits until its own state machine has applied it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;
use openraft::errors::{ClientWriteError, RaftError};
use openraft::raft::linearizable_read::Linearizer;
use openraft::{ReadPolicy, ServerState};
use tonic::transport::Channel;

use super::network::decode;
use super::read_batch::ReadBatcher;
use super::types::{Command, CommandResult, EngramNode, NodeId, Op, Raft, TypeConfig};
use crate::error::ApiError;
use crate::proto::raft_service_client::RaftServiceClient;
use crate::proto::ReadIndexRequest;
use crate::storage::space::Space;
use crate::storage::vault::Vault;
use crate::transport::NodeTls;

/// How long a follower waits for the leader's answer to a forwarded write when the client
/// set no deadline.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);

/// Proposes `cmd` on this node (the leader) and waits until it is applied here. A write that
/// adds data is refused first when this node or a majority of the voters is short of disk
/// (`storage::space`). With encryption at rest on, a command carrying memory content is
/// sealed under its namespace's data key, made on first use.
pub(crate) async fn write(raft: &Raft, vault: &Vault, space: &Space, cmd: Command) -> Result<CommandResult, ApiError> {
    if cmd.op.needs_disk() {
        let m = raft.metrics().borrow_watched().clone();
        let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
        space.admit(&cmd.op, &voters, m.id)?;
    }
    let cmd = seal(vault, cmd)?;
    propose_raw(raft, cmd).await
}

fn seal(vault: &Vault, cmd: Command) -> Result<Command, ApiError> {
    if !vault.enabled() || !cmd.op.carries_content() {
        return Ok(cmd);
    }
    let namespace = cmd.op.namespace().unwrap_or_default().to_string();
    // A namespace without a data key gets one with this write: `apply` keeps it only if the
    // write applies (see `Op::Sealed`).
    let (key, new_key) = match vault.for_namespace(&namespace) {
        Some(key) => (key, None),
        None => {
            crate::memory::validate_namespace(&namespace)?;
            let row = vault.new_key(&namespace).map_err(|e| ApiError::Internal(e.to_string()))?;
            (vault.open_key(&row).map_err(|e| ApiError::Internal(e.to_string()))?, Some(row))
        }
    };
    let plain = crate::storage::codec::encode(&cmd.op);
    let blob = key.seal(&crate::storage::vault::command_aad(&namespace), &plain);
    let idempotency = match cmd.idempotency {
        Some(i) => Some(super::types::Idempotency {
            fingerprint: vault
                .keyed_fingerprint(&namespace, &i.fingerprint)
                .map_err(|e| ApiError::Internal(e.to_string()))?,
            key: i.key,
        }),
        None => None,
    };
    Ok(Command { op: Op::Sealed { namespace, key: key.id, blob, new_key }, idempotency, ..cmd })
}

async fn propose_raw(raft: &Raft, cmd: Command) -> Result<CommandResult, ApiError> {
    let span = crate::trace_span!("raft.write", op = cmd.op.name());
    // Files the span for the state machine's `apply`, which runs in another task.
    let _proposal = crate::telemetry::Proposal::file(&cmd, &span);
    match tracing::Instrument::instrument(raft.client_write(cmd), span).await {
        Ok(resp) => Ok(resp.data),
        Err(e) => Err(write_error(e)),
    }
}

fn write_error(e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> ApiError {
    match e {
        // Rejected before the entry was appended: definitely not applied.
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            ApiError::NotLeader { leader_id: f.leader_id, leader_addr: f.leader_node.map(|n| n.api_addr) }
        }
        RaftError::APIError(ClientWriteError::LogEntryDiscarded(f)) => ApiError::Unavailable {
            reason: match f.leader_id {
                Some(id) => format!("leadership moved to node {id} while the write was in flight"),
                None => "leadership changed while the write was in flight".into(),
            },
        },
        RaftError::APIError(other) => ApiError::Unavailable { reason: other.to_string() },
        RaftError::Fatal(f) => ApiError::Internal(format!("raft stopped: {f}")),
    }
}

/// How a read is made consistent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadConsistency {
    Linearizable,
    Lease,
    Stale,
}

/// Channels to leaders by (node id, address), with the TLS generation they were made with.
type PeerChannels = HashMap<(NodeId, String), (RaftServiceClient<Channel>, u64)>;

/// A leadership confirmation's outcome, shareable by every read that waited for it.
pub(crate) type Confirmation =
    Result<Linearizer<TypeConfig>, Arc<RaftError<TypeConfig, openraft::errors::LinearizableReadError<TypeConfig>>>>;

/// This node's shared read barriers, one per policy (see [`super::read_batch`]): reads here
/// and followers' ReadIndex calls to this leader all join them.
pub struct ReadBarriers {
    read_index: Arc<ReadBatcher<Confirmation>>,
    lease: Arc<ReadBatcher<Confirmation>>,
}

impl ReadBarriers {
    pub fn new(raft: &Raft) -> Arc<Self> {
        let round = |policy: ReadPolicy, raft: Raft| {
            move || {
                let (raft, policy) = (raft.clone(), policy.clone());
                async move { raft.get_read_linearizer(policy).await.map_err(Arc::new) }
            }
        };
        Arc::new(ReadBarriers {
            read_index: ReadBatcher::new("read_index", round(ReadPolicy::ReadIndex, raft.clone())),
            lease: ReadBatcher::new("lease", round(ReadPolicy::LeaseRead, raft.clone())),
        })
    }

    /// A leadership confirmation under `policy` that began after this call.
    pub(crate) async fn confirm(&self, policy: ReadPolicy) -> Confirmation {
        let batcher = match policy {
            ReadPolicy::LeaseRead => &self.lease,
            _ => &self.read_index,
        };
        batcher.join().await.unwrap_or_else(|| Err(Arc::new(RaftError::Fatal(openraft::errors::Fatal::Stopped))))
    }
}

/// A confirmed read index ([`RaftNode::read_barrier`]) the local state machine may not have
/// reached yet.
pub struct ReadBarrier(Linearizer<TypeConfig>);

impl ReadBarrier {
    /// The log index a linearizable read must see applied.
    pub fn index(&self) -> u64 {
        self.0.read_log_id().index()
    }
}

#[derive(Clone)]
pub struct RaftNode {
    pub id: NodeId,
    pub raft: Raft,
    barriers: Arc<ReadBarriers>,
    read_timeout: Duration,
    /// The chaos harness's canary: every read is served locally, skipping the read index.
    unsafe_stale_reads: bool,
    /// Lazily connected channels to leaders, by node and address, for follower ReadIndex
    /// calls, with the TLS generation they were made with.
    peers: Arc<Mutex<PeerChannels>>,
    /// Peer TLS (`None`: an `--insecure` node).
    tls: Option<Arc<NodeTls>>,
    /// Seals content ops before they are proposed (see `storage::vault`).
    vault: Arc<Vault>,
    /// Refuses writes that add data when disks are short (see `storage::space`).
    space: Arc<Space>,
}

impl RaftNode {
    pub fn new(id: NodeId, raft: Raft, read_timeout: Duration, tls: Option<Arc<NodeTls>>) -> Self {
        let barriers = ReadBarriers::new(&raft);
        RaftNode {
            id,
            raft,
            barriers,
            read_timeout,
            unsafe_stale_reads: false,
            peers: Arc::default(),
            tls,
            vault: Vault::off(),
            space: Space::off(),
        }
    }

    /// Admits writes by the free disk space `space` watches.
    pub fn with_space(mut self, space: Arc<Space>) -> Self {
        self.space = space;
        self
    }

    pub fn space(&self) -> &Arc<Space> {
        &self.space
    }

    /// Seals with `vault` (the state machine's) when it holds a master key.
    pub fn with_vault(mut self, vault: Arc<Vault>) -> Self {
        self.vault = vault;
        self
    }

    pub fn vault(&self) -> &Arc<Vault> {
        &self.vault
    }

    /// The read barriers this node's reads share (the peer service's ReadIndex joins them).
    pub fn barriers(&self) -> Arc<ReadBarriers> {
        self.barriers.clone()
    }

    /// The node's TLS state, if it has certificates.
    pub fn tls(&self) -> Option<&Arc<NodeTls>> {
        self.tls.as_ref()
    }

    /// Breaks linearizability on purpose: reads skip the read index and serve local state.
    /// Only the chaos harness's canary sets this (`--unsafe-stale-reads`); it must be caught.
    pub fn with_unsafe_stale_reads(mut self, on: bool) -> Self {
        self.unsafe_stale_reads = on;
        self
    }

    /// The leader's id and node, as this node currently knows it.
    pub fn leader(&self) -> Option<(NodeId, Option<EngramNode>)> {
        let m = self.raft.metrics().borrow_watched().clone();
        let id = m.current_leader?;
        let node = m.membership_config.membership().get_node(&id).cloned();
        Some((id, node))
    }

    fn not_leader(&self) -> ApiError {
        let hint = self.leader();
        ApiError::NotLeader {
            leader_id: hint.as_ref().map(|(id, _)| *id),
            leader_addr: hint.and_then(|(_, n)| n).map(|n| n.api_addr),
        }
    }

    /// Proposes a command and waits until it is committed and applied here.
    pub async fn write(&self, cmd: Command) -> Result<CommandResult, ApiError> {
        write(&self.raft, &self.vault, &self.space, cmd).await
    }

    /// Proposes a client's command: here on the leader; on a follower, sent to the leader
    /// (one hop: the leader proposes it or refuses, never forwards again) and answered with the
    /// leader's result. `deadline` is the client's; without one the forward gives up after
    /// [`FORWARD_TIMEOUT`]. The leader stamps its own clock into the command.
    pub async fn propose(
        &self,
        cmd: Command,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<CommandResult, ApiError> {
        let leader = match self.leader() {
            Some((id, _)) if id == self.id => return self.write(cmd).await,
            Some((id, Some(node))) => (id, node),
            _ => return Err(self.not_leader()),
        };
        let span = crate::trace_span!("raft.forward", leader = leader.0);
        let res = tracing::Instrument::instrument(self.forward(leader, cmd, deadline), span).await;
        let result = match &res {
            Ok(_) => "ok",
            Err(ApiError::NotLeader { .. }) => "not_leader",
            Err(_) => "failed",
        };
        metrics::counter!("engram_forwarded_writes_total", "result" => result).increment(1);
        res
    }

    async fn forward(
        &self,
        (leader_id, leader): (NodeId, EngramNode),
        cmd: Command,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<CommandResult, ApiError> {
        let timeout = match deadline {
            Some(d) => d.saturating_duration_since(tokio::time::Instant::now()),
            None => FORWARD_TIMEOUT,
        };
        if timeout.is_zero() {
            return Err(ApiError::Timeout { reason: "the deadline passed before the write reached the leader".into() });
        }
        let mut client = self
            .peer(leader_id, &leader.raft_addr)
            .map_err(|e| ApiError::Unavailable { reason: format!("cannot reach the leader, node {leader_id}: {e}") })?;
        let mut req = super::network::addressed(super::network::encode(&cmd), leader_id);
        req.set_timeout(timeout);
        crate::telemetry::inject(req.metadata_mut());
        let resp = client.forward_write(req).await.map_err(|s| match s.code() {
            // The leader refused the forward itself (an older version without ForwardWrite,
            // a membership or certificate dispute): nothing was applied; the client may go to
            // the leader directly.
            tonic::Code::Unimplemented
            | tonic::Code::InvalidArgument
            | tonic::Code::PermissionDenied
            | tonic::Code::Unauthenticated
            | tonic::Code::FailedPrecondition => {
                tracing::warn!(leader = leader_id, code = ?s.code(), msg = s.message(), "the leader refused a forwarded write");
                ApiError::NotLeader { leader_id: Some(leader_id), leader_addr: Some(leader.api_addr.clone()) }
            }
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => ApiError::Timeout {
                reason: format!("the leader, node {leader_id}, did not answer the forwarded write in time"),
            },
            _ => ApiError::Unavailable {
                reason: format!("forwarding the write to the leader, node {leader_id}, failed: {}", s.message()),
            },
        })?;
        decode::<Result<CommandResult, ApiError>>(resp.get_ref()).map_err(|e| {
            ApiError::Internal(format!("the leader, node {leader_id}, answered the forwarded write with garbage: {e}"))
        })?
    }

    /// Waits until a read at `consistency` may be served from the local state machine.
    pub async fn linearize(&self, consistency: ReadConsistency) -> Result<(), ApiError> {
        match self.read_barrier(consistency).await? {
            Some(barrier) => self.await_read(barrier).await,
            None => Ok(()),
        }
    }

    /// The first half of [`linearize`](Self::linearize): a leadership confirmation that began
    /// after this call, and the index it requires, without waiting for the local state machine
    /// to reach it. `None`: a read at `consistency` may be served from local state as it is.
    /// A read that already ran against state at or past [`ReadBarrier::index`] is linearizable
    /// (searches run while the barrier is in flight and keep their answer when it holds).
    pub async fn read_barrier(&self, consistency: ReadConsistency) -> Result<Option<ReadBarrier>, ApiError> {
        let span = crate::trace_span!("read_barrier", consistency = ?consistency);
        tracing::Instrument::instrument(self.read_barrier_inner(consistency), span).await
    }

    /// The second half of [`linearize`](Self::linearize): waits (up to the read timeout) until
    /// the local state machine applied `barrier`'s index.
    pub async fn await_read(&self, barrier: ReadBarrier) -> Result<(), ApiError> {
        match barrier.0.try_await_ready(&self.raft, Some(self.read_timeout)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(state)) => Err(ApiError::Timeout {
                reason: format!("local state machine did not reach read index {}", state.read_log_id()),
            }),
            Err(fatal) => Err(ApiError::Internal(format!("raft stopped: {fatal}"))),
        }
    }

    /// Whether this node holds log entries past `applied` (writes appended or committed but
    /// not yet applied there): a read barrier then most likely needs more than `applied`.
    pub fn log_ahead_of(&self, applied: u64) -> bool {
        self.raft.metrics().borrow_watched().last_log_index.unwrap_or(0) > applied
    }

    async fn read_barrier_inner(&self, consistency: ReadConsistency) -> Result<Option<ReadBarrier>, ApiError> {
        if self.unsafe_stale_reads {
            return Ok(None);
        }
        let lease = match consistency {
            ReadConsistency::Stale => return Ok(None),
            ReadConsistency::Lease => true,
            ReadConsistency::Linearizable => false,
        };
        let policy = if lease { ReadPolicy::LeaseRead } else { ReadPolicy::ReadIndex };
        let linearizer = match self.barriers.confirm(policy).await {
            Ok(l) => l,
            Err(e) => match &*e {
                RaftError::APIError(openraft::errors::LinearizableReadError::ForwardToLeader(f)) => {
                    let (Some(id), Some(leader)) = (f.leader_id, f.leader_node.clone()) else {
                        return Err(ApiError::Unavailable { reason: "no leader known".into() });
                    };
                    self.remote_linearizer(id, &leader, lease).await?
                }
                e => return Err(ApiError::Unavailable { reason: format!("cannot confirm leadership: {e}") }),
            },
        };
        Ok(Some(ReadBarrier(linearizer)))
    }

    async fn remote_linearizer(
        &self,
        leader_id: NodeId,
        leader: &EngramNode,
        lease: bool,
    ) -> Result<Linearizer<TypeConfig>, ApiError> {
        let unavailable = |e: String| ApiError::Unavailable { reason: format!("read index from leader: {e}") };
        let mut client = self.peer(leader_id, &leader.raft_addr).map_err(unavailable)?;
        let mut req = super::network::addressed(ReadIndexRequest { lease }, leader_id);
        req.set_timeout(self.read_timeout);
        let resp = client.read_index(req).await.map_err(|s| unavailable(s.message().to_string()))?;
        let read_log_id: openraft::raft::linearizable_read::ReadLogId<TypeConfig> =
            decode(resp.get_ref()).map_err(|e| unavailable(e.to_string()))?;
        super::guard::read_index(read_log_id.log_id()).map_err(|e| unavailable(e.to_string()))?;
        let applied = self.raft.metrics().borrow_watched().last_applied;
        Ok(Linearizer::new(self.id, read_log_id, applied))
    }

    pub(crate) fn peer(&self, id: NodeId, addr: &str) -> Result<RaftServiceClient<Channel>, String> {
        let generation = self.tls.as_ref().map(|t| t.generation()).unwrap_or(0);
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let key = (id, addr.to_string());
        if let Some((c, g)) = peers.get(&key) {
            if *g == generation {
                return Ok(c.clone());
            }
        }
        let c = RaftServiceClient::new(super::network::peer_channel(id, addr, self.tls.as_deref())?);
        peers.insert(key, (c.clone(), generation));
        Ok(c)
    }

    /// Bootstraps a new cluster with the given members.
    pub async fn initialize(&self, members: BTreeMap<NodeId, EngramNode>) -> Result<(), ApiError> {
        self.raft.initialize(members).await.map_err(|e| match e {
            RaftError::APIError(e) => {
                ApiError::FailedPrecondition { field: "members".into(), reason: e.to_string(), current_revision: 0 }
            }
            RaftError::Fatal(f) => ApiError::Internal(f.to_string()),
        })
    }

    pub async fn add_learner(&self, id: NodeId, node: EngramNode, blocking: bool) -> Result<u64, ApiError> {
        self.raft.add_learner(id, node, blocking).await.map(|r| r.log_id.index).map_err(write_error)
    }

    /// Replaces the voter set; `retain` keeps removed voters as learners.
    pub async fn change_voters(&self, voters: BTreeSet<NodeId>, retain: bool) -> Result<u64, ApiError> {
        self.raft.change_membership(voters, retain).await.map(|r| r.log_id.index).map_err(write_error)
    }

    /// Removes nodes entirely (voters and learners).
    pub async fn remove_nodes(&self, ids: BTreeSet<NodeId>) -> Result<u64, ApiError> {
        use openraft::ChangeMembers;
        let m = self.raft.metrics().borrow_watched().membership_config.clone();
        let voters: BTreeSet<NodeId> = m.membership().voter_ids().filter(|v| ids.contains(v)).collect();
        let learners: BTreeSet<NodeId> = m.membership().learner_ids().filter(|v| ids.contains(v)).collect();
        let mut last = 0;
        if !voters.is_empty() {
            last = self
                .raft
                .change_membership(ChangeMembers::RemoveVoters(voters), false)
                .await
                .map(|r| r.log_id.index)
                .map_err(write_error)?;
        }
        if !learners.is_empty() {
            last = self
                .raft
                .change_membership(ChangeMembers::RemoveNodes(learners), false)
                .await
                .map(|r| r.log_id.index)
                .map_err(write_error)?;
        }
        Ok(last)
    }

    /// Asks the current leader to hand leadership to `to`, then waits for it to happen.
    pub async fn transfer_leader(&self, to: NodeId) -> Result<NodeId, ApiError> {
        if !self.raft.is_leader() {
            return Err(self.not_leader());
        }
        let m = self.raft.metrics().borrow_watched().clone();
        if !m.membership_config.membership().voter_ids().any(|v| v == to) {
            return Err(ApiError::invalid("to_node_id", format!("node {to} is not a voter")));
        }
        self.raft.trigger().transfer_leader(to).await.map_err(|e| ApiError::Internal(e.to_string()))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut rx = self.raft.metrics();
        loop {
            let leader = rx.borrow_watched().current_leader;
            if leader == Some(to) {
                return Ok(to);
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return Err(ApiError::Timeout { reason: format!("leadership did not move to {to}") });
            }
        }
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow_watched().state == ServerState::Leader
    }

    /// Runs `f` every `every` (first one period from now) whenever this node leads, until
    /// `stop` resolves: the leader's periodic jobs (scheduled backups, cluster verify).
    pub async fn every_while_leader<Fut: std::future::Future<Output = ()>>(
        &self,
        every: Duration,
        stop: impl std::future::Future<Output = ()>,
        mut f: impl FnMut() -> Fut,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tick.tick() => {}
            }
            if self.is_leader() {
                // A shutdown also ends a run under way (a backup, a verification, a drill).
                tokio::select! {
                    _ = &mut stop => return,
                    _ = f() => {}
                }
            }
        }
    }

    pub fn require_leader(&self) -> Result<(), ApiError> {
        if self.is_leader() {
            Ok(())
        } else {
            Err(self.not_leader())
        }
    }
}
