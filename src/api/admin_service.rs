//! `AdminService`: cluster bootstrap, membership changes, leader transfer and status.
//! Membership changes run on the leader; elsewhere they fail with a leader hint. The API
//! layer has already required a cluster admin for every call here, except `InitCluster` on a
//! cluster without a root key yet, which may come without credentials (see
//! [`AdminApi::init_cluster`]).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use tokio::sync::mpsc;

use openraft::async_runtime::watch::WatchReceiver;
use openraft::ServerState;
use redb::ReadableDatabase;
use tonic::{Request, Response, Status};
use tracing::instrument;

use super::convert::{node_from_pb, node_to_pb};
use super::observe;
use crate::auth::records::{KeyRecord, ROOT_ROLE};
use crate::auth::token::KeyId;
use crate::backup::schedule::BackupStatus;
use crate::backup::Keyring;
use crate::error::ApiError;
use crate::proto as pb;
use crate::proto::admin_service_server::AdminService;
use crate::raft::marks::Marks;
use crate::raft::node::ReadConsistency;
use crate::raft::{Command, EngramNode, LogStore, NodeId, Op, Outcome, RaftNode};
use crate::storage::{ledger, StateReader};

#[derive(Clone)]
pub struct AdminApi {
    node: RaftNode,
    /// This node's own advertised addresses (used for a single-node bootstrap).
    me: EngramNode,
    backup: BackupContext,
    /// Keys are required (not `--insecure`): a new cluster needs a root key.
    secure: bool,
    /// The Raft log, read by ledger verification.
    log: LogStore,
    /// State digests at marks (`cluster verify`).
    marks: Marks,
    /// One ledger verification at a time: each reads the whole history.
    verifying: Arc<tokio::sync::Semaphore>,
    /// Stamped into a namespace a partial restore creates (the node's configured threshold).
    approx_min_vectors: u64,
}

/// What `CreateBackup` and status need: the state, the key's whereabouts, the last scheduled
/// backup.
#[derive(Clone)]
pub struct BackupContext {
    pub db: Arc<redb::Database>,
    pub reader: StateReader,
    /// Keyring file; `None`: `ENGRAM_BACKUP_KEY`. Read per backup, so rotation needs no restart.
    pub key_file: Option<PathBuf>,
    pub last: BackupStatus,
    /// The state machine's file: its size is the estimate a backup stream announces.
    pub state_file: PathBuf,
    /// The at-rest master keyring file, read again by a rotation (`None`: env or off).
    pub at_rest_key_file: Option<PathBuf>,
}

/// Response header of `CreateBackup`: about how many bytes the archive will have (the state
/// file's size; compression makes the archive smaller), for progress bars.
pub const BACKUP_ESTIMATE_HEADER: &str = "engram-backup-estimated-bytes";

/// A `Write` that sends what it is given as `BackupChunk`s of about 1 MiB. Fails once the
/// caller has gone, which stops the backup.
struct ChunkSender {
    tx: mpsc::Sender<Result<pb::BackupChunk, Status>>,
    buf: Vec<u8>,
}

impl ChunkSender {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(BACKUP_CHUNK_BYTES));
        self.tx
            .blocking_send(Ok(pb::BackupChunk { data }))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the backup's receiver went away"))
    }
}

impl Write for ChunkSender {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= BACKUP_CHUNK_BYTES {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

const BACKUP_CHUNK_BYTES: usize = 1 << 20;

impl AdminApi {
    pub fn new(
        node: RaftNode,
        me: EngramNode,
        backup: BackupContext,
        secure: bool,
        (log, marks): (LogStore, Marks),
    ) -> Self {
        let approx_min_vectors = crate::memory::Limits::default().approx_min_vectors;
        AdminApi {
            node,
            me,
            backup,
            secure,
            log,
            marks,
            verifying: Arc::new(tokio::sync::Semaphore::new(1)),
            approx_min_vectors,
        }
    }

    /// The approximate-index threshold of namespaces a partial restore creates.
    pub fn with_approx_min_vectors(mut self, n: u64) -> Self {
        self.approx_min_vectors = n;
        self
    }

    /// Whether this node already belongs to a cluster (it has a membership).
    fn is_member(&self) -> bool {
        self.node.raft.metrics().borrow_watched().membership_config.membership().nodes().next().is_some()
    }

    /// The root key named in an init request.
    fn root_key(id: &str, hash: &[u8]) -> Result<KeyRecord, ApiError> {
        let id: KeyId = id.parse().map_err(|_| ApiError::invalid("root_key_id", "must be 16 lowercase hex digits"))?;
        let hash: [u8; 32] = hash.try_into().map_err(|_| ApiError::invalid("root_key_hash", "must be 32 bytes"))?;
        Ok(KeyRecord {
            id,
            name: ROOT_ROLE.into(),
            roles: vec![ROOT_ROLE.into()],
            hash,
            created_at_ms: crate::memory::now_ms(),
            expires_at_ms: None,
            revoked_at_ms: None,
        })
    }

    /// Installs the root key once this node leads (the node that initialized a cluster is its
    /// first leader: the others have no membership to campaign with).
    async fn install_root_key(&self, record: KeyRecord) -> Result<(), ApiError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !self.node.is_leader() {
            let other = matches!(self.node.leader(), Some((id, _)) if id != self.node.id);
            if other || tokio::time::Instant::now() > deadline {
                // Another node leads (a retry): send the init there.
                return self.node.require_leader();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let res = self.node.write(Command::system(Op::BootstrapRootKey { record })).await?;
        match res.outcome {
            Outcome::KeyCreated { .. } => Ok(()),
            Outcome::Rejected(r) => Err(r.into()),
            other => Err(ApiError::Internal(format!("unexpected outcome {other:?}"))),
        }
    }

    fn membership(&self, log_index: u64) -> pb::MembershipResponse {
        let m = self.node.raft.metrics().borrow_watched().membership_config.clone();
        let mem = m.membership();
        let voters = mem.voter_ids().collect::<BTreeSet<_>>();
        let mut resp = pb::MembershipResponse { log_index, ..Default::default() };
        for (id, n) in mem.nodes() {
            if voters.contains(id) {
                resp.voters.push(node_to_pb(*id, n));
            } else {
                resp.learners.push(node_to_pb(*id, n));
            }
        }
        resp
    }

    fn ids(field: &str, ids: Vec<u64>) -> Result<BTreeSet<NodeId>, ApiError> {
        if ids.is_empty() {
            return Err(ApiError::invalid(field, "must not be empty"));
        }
        if ids.contains(&0) {
            return Err(ApiError::invalid(field, "node ids start at 1"));
        }
        Ok(ids.into_iter().collect())
    }

    async fn promote(&self, ids: BTreeSet<NodeId>) -> Result<u64, ApiError> {
        self.node.require_leader()?;
        let m = self.node.raft.metrics().borrow_watched().membership_config.clone();
        let known: BTreeSet<NodeId> = m.membership().nodes().map(|(id, _)| *id).collect();
        if let Some(unknown) = ids.iter().find(|id| !known.contains(id)) {
            return Err(ApiError::invalid(
                "node_ids",
                format!("node {unknown} is not a member; add it as a learner first"),
            ));
        }
        let mut voters: BTreeSet<NodeId> = m.membership().voter_ids().collect();
        voters.extend(ids);
        self.node.change_voters(voters, false).await
    }
}

/// The state's name as `Status` and `/status` report it.
pub(crate) fn state_name(s: ServerState) -> &'static str {
    match s {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    /// Bootstraps the cluster. Without credentials it is answered only until the cluster has a
    /// root key (so whoever reaches a fresh node first claims it: bootstrap before exposing the
    /// nodes). A retry on a cluster whose root key never got installed installs it; a cluster
    /// with a root key refuses another.
    #[instrument(skip_all)]
    async fn init_cluster(
        &self,
        req: Request<pb::InitClusterRequest>,
    ) -> Result<Response<pb::InitClusterResponse>, Status> {
        let started = Instant::now();
        let authenticated = req.extensions().get::<crate::auth::Caller>().is_some();
        let pb::InitClusterRequest { members, root_key_id, root_key_hash } = req.into_inner();
        let res = async {
            let claimed = self.backup.reader.has_root_key().map_err(|e| ApiError::Internal(e.to_string()))?;
            if !authenticated && self.is_member() && (claimed || !self.secure) {
                return Err(ApiError::Unauthenticated { reason: "this node already belongs to a cluster".into() });
            }
            let root = match (self.secure, root_key_id.is_empty() && root_key_hash.is_empty()) {
                (true, true) => {
                    return Err(ApiError::invalid("root_key_id", "a secured cluster is initialized with a root key"))
                }
                (true, false) => Some(Self::root_key(&root_key_id, &root_key_hash)?),
                (false, _) => None,
            };
            let mut map = BTreeMap::new();
            if members.is_empty() {
                map.insert(self.node.id, self.me.clone());
            }
            for (i, m) in members.into_iter().enumerate() {
                let (id, node) = node_from_pb(&format!("members[{i}]"), Some(m))?;
                if map.insert(id, node).is_some() {
                    return Err(ApiError::invalid(format!("members[{i}].id"), format!("duplicate node id {id}")));
                }
            }
            if !map.contains_key(&self.node.id) {
                return Err(ApiError::invalid("members", format!("must include this node ({})", self.node.id)));
            }
            match self.node.initialize(map).await {
                Ok(()) => {}
                // Initialized before: go on only to install a missing root key.
                Err(ApiError::FailedPrecondition { .. })
                    if root.is_some()
                        && !self.backup.reader.has_root_key().map_err(|e| ApiError::Internal(e.to_string()))? => {}
                Err(e) => return Err(e),
            }
            let installed = match root {
                Some(record) => {
                    self.install_root_key(record).await?;
                    true
                }
                None => false,
            };
            Ok(pb::InitClusterResponse { root_key_installed: installed })
        }
        .await
        .map(Response::new)
        .map_err(Status::from);
        observe("init_cluster", started, &res);
        res
    }

    async fn status(&self, _req: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        let m = self.node.raft.metrics().borrow_watched().clone();
        let leader_id = m.current_leader.unwrap_or(0);
        let leader_api_addr = m
            .current_leader
            .and_then(|l| m.membership_config.membership().get_node(&l).map(|n| n.api_addr.clone()))
            .unwrap_or_default();
        let membership = self.membership(m.membership_config.log_id().map(|l| l.index).unwrap_or(0));
        let cluster_id = self
            .backup
            .reader
            .cluster_id()
            .map_err(|e| Status::from(ApiError::Internal(e.to_string())))?
            .map(|id| uuid::Uuid::from_bytes(id).to_string())
            .unwrap_or_default();
        let last = self.backup.last.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Ok(Response::new(pb::StatusResponse {
            node_id: m.id,
            state: state_name(m.state).into(),
            term: m.current_term,
            leader_id,
            leader_api_addr,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
            voters: membership.voters,
            learners: membership.learners,
            membership_log_index: membership.log_index,
            cluster_id,
            last_backup_at_ms: last.succeeded_at_ms,
            last_backup_index: last.index,
            last_backup_path: last.path,
            last_backup_failed_at_ms: last.failed_at_ms,
            last_backup_error: last.error,
            purged_index: m.purged.map(|l| l.index).unwrap_or(0),
            last_drill_at_ms: last.drill.at_ms,
            last_drill_ok: last.drill.ok,
            last_drill_backup: last.drill.backup,
            last_drill_rto_ms: last.drill.rto_ms,
            last_drill_data_age_ms: last.drill.data_age_ms,
            last_drill_error: last.drill.error,
        }))
    }

    #[instrument(skip_all)]
    async fn add_learner(
        &self,
        req: Request<pb::AddLearnerRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let started = Instant::now();
        let pb::AddLearnerRequest { node, blocking } = req.into_inner();
        let res = async {
            let (id, node) = node_from_pb("node", node)?;
            let m = self.node.raft.metrics().borrow_watched().membership_config.clone();
            if m.membership().voter_ids().any(|v| v == id) {
                return Err(ApiError::invalid("node.id", format!("node {id} is already a voter")));
            }
            self.node.require_leader()?;
            let index = self.node.add_learner(id, node, blocking).await?;
            Ok::<_, ApiError>(self.membership(index))
        }
        .await
        .map(Response::new)
        .map_err(Status::from);
        observe("add_learner", started, &res);
        res
    }

    #[instrument(skip_all)]
    async fn promote_voters(
        &self,
        req: Request<pb::PromoteVotersRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let started = Instant::now();
        let pb::PromoteVotersRequest { node_ids } = req.into_inner();
        let res = async {
            let ids = Self::ids("node_ids", node_ids)?;
            let index = self.promote(ids).await?;
            Ok::<_, ApiError>(self.membership(index))
        }
        .await
        .map(Response::new)
        .map_err(Status::from);
        observe("promote_voters", started, &res);
        res
    }

    #[instrument(skip_all)]
    async fn remove_nodes(
        &self,
        req: Request<pb::RemoveNodesRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let started = Instant::now();
        let pb::RemoveNodesRequest { node_ids } = req.into_inner();
        let res = async {
            let ids = Self::ids("node_ids", node_ids)?;
            self.node.require_leader()?;
            let m = self.node.raft.metrics().borrow_watched().membership_config.clone();
            let known: BTreeSet<NodeId> = m.membership().nodes().map(|(id, _)| *id).collect();
            if let Some(unknown) = ids.iter().find(|id| !known.contains(id)) {
                return Err(ApiError::not_found(format!("node {unknown}")));
            }
            let index = self.node.remove_nodes(ids).await?;
            Ok(self.membership(index))
        }
        .await
        .map(Response::new)
        .map_err(Status::from);
        observe("remove_nodes", started, &res);
        res
    }

    #[instrument(skip_all)]
    async fn transfer_leader(
        &self,
        req: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        let started = Instant::now();
        let pb::TransferLeaderRequest { to_node_id } = req.into_inner();
        let res = self
            .node
            .transfer_leader(to_node_id)
            .await
            .map(|leader_id| Response::new(pb::TransferLeaderResponse { leader_id }))
            .map_err(Status::from);
        observe("transfer_leader", started, &res);
        res
    }

    type CreateBackupStream = Pin<Box<dyn Stream<Item = Result<pb::BackupChunk, Status>> + Send>>;

    #[instrument(skip_all)]
    async fn create_backup(
        &self,
        _req: Request<pb::CreateBackupRequest>,
    ) -> Result<Response<Self::CreateBackupStream>, Status> {
        let started = Instant::now();
        let res = async {
            let keys = Keyring::resolve(self.backup.key_file.as_deref())?;
            // Every write acknowledged before this call is in the backup.
            self.node.linearize(ReadConsistency::Linearizable).await?;
            let cluster_id = self.backup.reader.cluster_id().map_err(|e| ApiError::Internal(e.to_string()))?;
            Ok::<_, ApiError>((keys, cluster_id.unwrap_or_default()))
        }
        .await;
        let (keys, cluster_id) = match res {
            Ok(v) => v,
            Err(e) => {
                let status = Status::from(e);
                observe::<()>("create_backup", started, &Err(status.clone()));
                return Err(status);
            }
        };
        let (tx, rx) = mpsc::channel(4);
        let db = self.backup.db.clone();
        tokio::task::spawn_blocking(move || {
            let sink = ChunkSender { tx: tx.clone(), buf: Vec::with_capacity(BACKUP_CHUNK_BYTES) };
            let outcome = crate::backup::create(&db, cluster_id, &keys, sink);
            metrics::histogram!("engram_backup_stream_seconds").record(started.elapsed().as_secs_f64());
            match outcome {
                Ok((_, info)) => {
                    tracing::info!(index = info.header.applied_index, bytes = info.archive_bytes, "backup streamed");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "backup stream failed");
                    let _ = tx.blocking_send(Err(Status::from(ApiError::from(e))));
                }
            }
        });
        let mut resp =
            Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)) as Self::CreateBackupStream);
        if let Ok(meta) = std::fs::metadata(&self.backup.state_file) {
            resp.metadata_mut().insert(BACKUP_ESTIMATE_HEADER, meta.len().into());
        }
        Ok(resp)
    }

    #[instrument(skip_all)]
    async fn trigger_snapshot(
        &self,
        _req: Request<pb::TriggerSnapshotRequest>,
    ) -> Result<Response<pb::TriggerSnapshotResponse>, Status> {
        let started = Instant::now();
        let res = async {
            let applied = self.node.raft.metrics().borrow_watched().last_applied.map(|l| l.index).unwrap_or(0);
            self.node.raft.trigger().snapshot().await.map_err(|e| ApiError::Internal(e.to_string()))?;
            let mut rx = self.node.raft.metrics();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
            loop {
                let snapshot = rx.borrow_watched().snapshot.map(|l| l.index).unwrap_or(0);
                if snapshot >= applied {
                    return Ok(pb::TriggerSnapshotResponse { snapshot_index: snapshot });
                }
                if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                    return Err(ApiError::Timeout { reason: format!("no snapshot at index {applied} yet") });
                }
            }
        }
        .await
        .map(Response::new)
        .map_err(Status::from);
        observe("trigger_snapshot", started, &res);
        res
    }

    #[instrument(skip_all)]
    async fn verify_ledger(
        &self,
        _req: Request<pb::VerifyLedgerRequest>,
    ) -> Result<Response<pb::VerifyLedgerResponse>, Status> {
        let started = Instant::now();
        let (db, log) = (self.backup.db.clone(), self.log.clone());
        let Ok(permit) = self.verifying.clone().try_acquire_owned() else {
            let e = ApiError::ResourceExhausted {
                field: String::new(),
                reason: "a ledger verification is already running on this node".into(),
                retry_after_ms: 1_000,
            };
            let res = Err(Status::from(e));
            observe::<Response<pb::VerifyLedgerResponse>>("verify_ledger", started, &res);
            return res;
        };
        let res = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let txn = db.begin_read().map_err(|e| storage_error(e.into()))?;
            let applied = StateReader::applied(&txn).map_err(storage_error)?;
            let out = match ledger::verify(&txn, &log).map_err(storage_error)? {
                Ok(v) => pb::VerifyLedgerResponse {
                    ok: true,
                    rows: v.rows,
                    first_index: v.first,
                    last_index: v.last,
                    head: v.head.to_vec(),
                    checked_against_log: v.against_log,
                    applied_index: applied,
                    ..Default::default()
                },
                Err(b) => {
                    metrics::counter!("engram_ledger_verify_failures_total").increment(1);
                    tracing::error!(index = b.index, reason = %b.reason, "ledger verification failed");
                    pb::VerifyLedgerResponse {
                        ok: false,
                        broken_index: b.index,
                        reason: b.reason,
                        applied_index: applied,
                        ..Default::default()
                    }
                }
            };
            Ok::<_, ApiError>(out)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))
        .and_then(|r| r.map(Response::new).map_err(Status::from));
        observe("verify_ledger", started, &res);
        res
    }

    #[instrument(skip_all)]
    async fn export_ledger(
        &self,
        req: Request<pb::ExportLedgerRequest>,
    ) -> Result<Response<pb::ExportLedgerResponse>, Status> {
        let started = Instant::now();
        let req = req.into_inner();
        let db = self.backup.db.clone();
        let res = async {
            let limit = match req.limit {
                0 => 1_000,
                n @ 1..=MAX_LEDGER_PAGE => n as usize,
                n => return Err(ApiError::invalid("limit", format!("{n} is over {MAX_LEDGER_PAGE} rows"))),
            };
            let to = if req.to_index == 0 { u64::MAX } else { req.to_index };
            if req.from_index > to {
                return Err(ApiError::invalid("from_index", "must not be after to_index"));
            }
            let links = tokio::task::spawn_blocking(move || {
                let txn = db.begin_read().map_err(|e| storage_error(e.into()))?;
                // One row past the page says whether there is a next one.
                ledger::range(&txn, req.from_index, to, limit + 1).map_err(storage_error)
            })
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))??;
            let next_index = if links.len() > limit { links[limit].index } else { 0 };
            let links = links
                .into_iter()
                .take(limit)
                .map(|l| pb::LedgerLink { index: l.index, entry_hash: l.entry_hash.to_vec(), head: l.head.to_vec() })
                .collect();
            Ok(pb::ExportLedgerResponse { links, next_index })
        }
        .await
        .map(Response::new)
        .map_err(Status::from);
        observe("export_ledger", started, &res);
        res
    }

    #[instrument(skip_all, fields(namespace = %req.get_ref().namespace))]
    async fn restore_namespace(
        &self,
        req: Request<pb::RestoreNamespaceRequest>,
    ) -> Result<Response<pb::RestoreNamespaceResponse>, Status> {
        handle!(self, req, "restore_namespace", restore_namespace_inner)
    }

    #[instrument(skip_all)]
    async fn export_data_keys(
        &self,
        req: Request<pb::ExportDataKeysRequest>,
    ) -> Result<Response<pb::ExportDataKeysResponse>, Status> {
        handle!(self, req, "export_data_keys", export_data_keys_inner)
    }

    #[instrument(skip_all)]
    async fn rotate_at_rest_key(
        &self,
        req: Request<pb::RotateAtRestKeyRequest>,
    ) -> Result<Response<pb::RotateAtRestKeyResponse>, Status> {
        handle!(self, req, "rotate_at_rest_key", rotate_at_rest_key_inner)
    }

    #[instrument(skip_all, fields(namespace = %req.get_ref().namespace))]
    async fn erase_namespace(
        &self,
        req: Request<pb::EraseNamespaceRequest>,
    ) -> Result<Response<pb::EraseNamespaceResponse>, Status> {
        handle!(self, req, "erase_namespace", erase_namespace_inner)
    }

    #[instrument(skip_all)]
    async fn propose_mark(
        &self,
        _req: Request<pb::ProposeMarkRequest>,
    ) -> Result<Response<pb::ProposeMarkResponse>, Status> {
        let started = Instant::now();
        let res = crate::raft::cluster_verify::propose_mark(&self.node)
            .await
            .map(|(mark_id, index)| Response::new(pb::ProposeMarkResponse { mark_id, index }))
            .map_err(Status::from);
        observe("propose_mark", started, &res);
        res
    }

    #[instrument(skip_all)]
    async fn mark_digest(
        &self,
        req: Request<pb::MarkDigestRequest>,
    ) -> Result<Response<pb::MarkDigestResponse>, Status> {
        let started = Instant::now();
        let req = req.into_inner();
        let res = async {
            if let Some((field, why)) = crate::raft::marks::bad_query(&req.mark_id, req.wait_ms) {
                return Err(ApiError::invalid(field, why));
            }
            let wait = match req.wait_ms {
                0 => Duration::from_secs(10),
                n => Duration::from_millis(n.into()),
            };
            let Some(d) = self.marks.wait(&req.mark_id, wait).await else {
                return Err(ApiError::Timeout {
                    reason: format!("this node has not applied mark {} (or forgot it)", req.mark_id),
                });
            };
            let digest = d.digest.map_err(|e| ApiError::Internal(format!("digest at mark {}: {e}", d.id)))?;
            Ok(pb::MarkDigestResponse {
                index: d.index,
                digest: digest.to_vec(),
                head: d.head.map(|h| h.to_vec()).unwrap_or_default(),
            })
        }
        .await
        .map(Response::new)
        .map_err(Status::from);
        observe("mark_digest", started, &res);
        res
    }
}

/// A row that does not decode is data loss; anything else went wrong on this node.
fn storage_error(e: crate::error::StorageError) -> ApiError {
    match e {
        crate::error::StorageError::Corrupt { .. } => ApiError::DataLoss { reason: e.to_string() },
        e => ApiError::Internal(e.to_string()),
    }
}

/// Most ledger rows one `ExportLedger` page holds (64 bytes each plus framing).
const MAX_LEDGER_PAGE: u32 = 10_000;

/// The memories of a `RestoreNamespace` request: at most the request's own size, nothing after.
pub(crate) fn decode_restored(bytes: &[u8]) -> Result<Vec<crate::memory::Memory>, ApiError> {
    crate::storage::codec::decode_exact(bytes)
        .map_err(|e| ApiError::invalid("memories", format!("not a list of memory rows: {e}")))
}

impl AdminApi {
    /// Opens a partial restore's sealed rows with this node's data keys. Rows under a key an
    /// erasure destroyed are refused as erased: an erased namespace never comes back.
    fn open_restored(&self, namespace: &str, sealed: &[u8]) -> Result<Vec<crate::memory::Memory>, ApiError> {
        if sealed.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<(Vec<u8>, Vec<u8>)> = crate::storage::codec::decode_exact(sealed)
            .map_err(|e| ApiError::invalid("sealed_rows", format!("not a list of (key, value) rows: {e}")))?;
        let vault = self.node.vault();
        let prefix = crate::storage::memory_key(namespace, "");
        let mut out = Vec::with_capacity(rows.len());
        for (key, value) in &rows {
            if !key.starts_with(&prefix) {
                return Err(ApiError::invalid("sealed_rows", format!("a row of another namespace than {namespace:?}")));
            }
            let id = crate::storage::vault::sealed_by(value)
                .ok_or_else(|| ApiError::invalid("sealed_rows", "a row that is not sealed"))?;
            if vault.by_id(&id).is_none() {
                let erasure = self.backup.reader.erasure(&id).map_err(storage_error)?;
                return Err(ApiError::FailedPrecondition {
                    field: "namespace".into(),
                    reason: match erasure {
                        Some(e) => format!(
                            "erased: the backup's rows of {namespace:?} are sealed under data key {}, destroyed by the erasure at log index {} ({} ms); nothing was restored",
                            hex::encode(id), e.index, e.at_ms
                        ),
                        None => format!(
                            "the backup's rows of {namespace:?} are sealed under data key {}, which this cluster does not hold (erased, or another cluster's); nothing was restored",
                            hex::encode(id)
                        ),
                    },
                    current_revision: 0,
                });
            }
            let m = crate::storage::codec::decode_memory_in(vault, key, value)
                .map_err(|e| ApiError::invalid("sealed_rows", e.to_string()))?;
            if crate::storage::memory_key(&m.namespace, &m.id) != *key {
                return Err(ApiError::invalid("sealed_rows", "a row filed under another key"));
            }
            out.push(m);
        }
        Ok(out)
    }

    async fn export_data_keys_inner(
        &self,
        _caller: &crate::auth::Caller,
        _req: pb::ExportDataKeysRequest,
    ) -> Result<pb::ExportDataKeysResponse, ApiError> {
        // What this node has applied after a read barrier: every key made before the call.
        if let Some(barrier) = self.node.read_barrier(crate::raft::node::ReadConsistency::Linearizable).await? {
            self.node.await_read(barrier).await?;
        }
        let (applied, keys, erased) = self.backup.reader.data_keys().map_err(storage_error)?;
        Ok(pb::ExportDataKeysResponse {
            data_keys: keys.len() as u32,
            erasures: erased.len() as u32,
            keys: crate::storage::codec::encode(&(keys, erased)),
            applied_index: applied,
        })
    }

    async fn rotate_at_rest_key_inner(
        &self,
        caller: &crate::auth::Caller,
        _req: pb::RotateAtRestKeyRequest,
    ) -> Result<pb::RotateAtRestKeyResponse, ApiError> {
        self.node.require_leader()?;
        let vault = self.node.vault();
        if !vault.enabled() {
            return Err(ApiError::FailedPrecondition {
                field: "at_rest_key_file".into(),
                reason: "encryption at rest is off on this node".into(),
                current_revision: 0,
            });
        }
        // The key file again, for a new active key; an env-only keyring cannot change. Each
        // node reads its own file again when the rotation applies.
        let precondition = |reason: String| ApiError::FailedPrecondition {
            field: "at_rest_key_file".into(),
            reason,
            current_revision: 0,
        };
        let path = self.backup.at_rest_key_file.as_ref().ok_or_else(|| {
            precondition(
                "a rotation reads the nodes' at-rest key files again; these keys come from ENGRAM_AT_REST_KEY".into(),
            )
        })?;
        let ring = crate::backup::Keyring::load(path).map_err(|e| precondition(e.to_string()))?;
        // Every key held must still open under the new ring, and is wrapped again under its
        // active key.
        let probe = crate::storage::vault::Vault::new(Some(ring));
        let (_, rows, _) = self.backup.reader.data_keys().map_err(storage_error)?;
        let mut keys = Vec::with_capacity(rows.len());
        for row in &rows {
            keys.push(probe.rewrap(row).map_err(|e| {
                precondition(format!("the key file must keep the old master key until the rotation is done: {e}"))
            })?);
        }
        let master_key_id = probe.active_kek().map(|k| k.to_vec()).unwrap_or_default();
        let res = crate::api::propose(&self.node, caller, None, Op::RewrapDataKeys { keys }).await?;
        let crate::raft::Outcome::DataKeysRewrapped { rewrapped } = res.outcome else {
            return Err(ApiError::Internal(format!("unexpected outcome {:?}", res.outcome)));
        };
        // A snapshot past the rotation, so this node's log no longer needs entries whose keys
        // only the old master key opens (other nodes compact on their own schedule).
        if let Err(e) = self.node.raft.trigger().snapshot().await {
            tracing::warn!(error = %e, "no snapshot after the at-rest key rotation");
        }
        Ok(pb::RotateAtRestKeyResponse { applied_index: res.index, rewrapped, master_key_id })
    }

    async fn erase_namespace_inner(
        &self,
        caller: &crate::auth::Caller,
        req: pb::EraseNamespaceRequest,
    ) -> Result<pb::EraseNamespaceResponse, ApiError> {
        crate::memory::validate_namespace(&req.namespace)?;
        let idempotency = crate::api::convert::idempotency(req.options, "erase-namespace", &req.namespace)?;
        let before = self.backup.reader.data_keys().map_err(storage_error)?.1;
        let key = before.iter().find(|k| k.namespace == req.namespace).map(|k| k.id);
        let res = crate::api::propose(
            &self.node,
            caller,
            idempotency,
            Op::DeleteNamespace { namespace: req.namespace.clone() },
        )
        .await?;
        let memories = match res.outcome {
            crate::raft::Outcome::NamespaceDeleted { memories } => memories,
            other => return Err(ApiError::Internal(format!("unexpected outcome {other:?}"))),
        };
        // The erasure as this node applied it: a follower that forwarded the call may not
        // have yet.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.backup.reader.applied_index().map_err(storage_error)? < res.index {
            if tokio::time::Instant::now() >= deadline {
                return Err(ApiError::Timeout {
                    reason: format!("erased at index {}, not yet applied here", res.index),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let erasure = match &key {
            Some(id) => self.backup.reader.erasure(id).map_err(storage_error)?,
            None => None,
        };
        // A snapshot past the erase lets this node purge the log entries that held the key.
        let snapshot_index = match self.node.raft.trigger().snapshot().await {
            Ok(()) => {
                let mut rx = self.node.raft.metrics();
                let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                loop {
                    let at = rx.borrow_watched().snapshot.map(|l| l.index).unwrap_or(0);
                    if at >= res.index || tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                        break at;
                    }
                }
            }
            Err(_) => 0,
        };
        let reader = &self.backup.reader;
        Ok(pb::EraseNamespaceResponse {
            applied_index: res.index,
            memories,
            data_key_id: erasure.as_ref().map(|e| e.id.to_vec()).unwrap_or_default(),
            erased_at_ms: erasure.as_ref().map(|e| e.at_ms).unwrap_or(0),
            cluster_id: reader.cluster_id().map_err(storage_error)?.map(|c| c.to_vec()).unwrap_or_default(),
            ledger_head: reader.ledger_head(res.index).map_err(storage_error)?.map(|h| h.to_vec()).unwrap_or_default(),
            snapshot_index,
        })
    }

    async fn restore_namespace_inner(
        &self,
        caller: &crate::auth::Caller,
        req: pb::RestoreNamespaceRequest,
    ) -> Result<pb::RestoreNamespaceResponse, ApiError> {
        crate::memory::validate_namespace(&req.namespace)?;
        let metric = crate::api::convert::metric_from_pb(req.metric)?;
        let policy = match req.policy_json.as_str() {
            "" => None,
            json => Some(
                serde_json::from_str::<crate::memory::MemoryPolicy>(json)
                    .map_err(|e| ApiError::invalid("policy_json", e.to_string()))?,
            ),
        };
        let mut memories = decode_restored(&req.memories)?;
        memories.extend(self.open_restored(&req.namespace, &req.sealed_rows)?);
        memories.sort_by(|a, b| a.id.cmp(&b.id));
        let idempotency = crate::api::convert::idempotency(
            req.options,
            "restore-namespace",
            &(
                &req.namespace,
                req.dimension,
                req.metric,
                &req.policy_json,
                &req.memories,
                req.only_these,
                &req.sealed_rows,
            ),
        )?;
        let op = match req.only_these {
            true => Op::RestoreMemories { namespace: req.namespace, memories },
            false => Op::RestoreNamespace {
                namespace: req.namespace,
                dimension: req.dimension,
                metric,
                approx_min_vectors: self.approx_min_vectors,
                policy,
                memories,
            },
        };
        let res = crate::api::propose(&self.node, caller, idempotency, op).await?;
        match res.outcome {
            crate::raft::Outcome::NamespaceRestored { restored, replaced } => {
                Ok(pb::RestoreNamespaceResponse { applied_index: res.index, restored, replaced })
            }
            other => Err(ApiError::Internal(format!("unexpected outcome {other:?}"))),
        }
    }
}
