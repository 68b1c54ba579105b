//! Peer transport, server side: the `RaftService` on the peer listener. Only peers call it:
//! with certificates, the listener's layer has verified the caller's certificate against the
//! cluster CA and put its node id in the request ([`PeerIdentity`]); every message is then
//! checked by [`super::guard`] (bounds, and that its vote names that same node) before
//! openraft sees it. A snapshot stream is checked on its first chunk, before a byte is
//! written, and bounded in size.

use std::sync::Arc;

use futures::StreamExt;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::ReadPolicy;
use tonic::{Request, Response, Status, Streaming};

use super::guard;
use super::network::{decode, encode, TARGET_NODE_HEADER};
use super::snapshot::{SnapshotData, SnapshotFiles};
use super::state_machine::Snapshot;
use super::types::{Command, NodeId, Raft, SnapshotMeta, TypeConfig, Vote};
use crate::proto::raft_service_server::RaftService;
use crate::proto::{RaftPayload, ReadIndexRequest, SnapshotChunk};
use openraft::raft::TransferLeaderRequest;

/// The cluster member a peer request comes from, proven by its certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerIdentity(pub NodeId);

pub struct PeerService {
    me: NodeId,
    raft: Raft,
    /// Followers' ReadIndex calls share this leader's leadership confirmations.
    barriers: Arc<super::node::ReadBarriers>,
    snapshots: SnapshotFiles,
    /// Peers are authenticated by certificates: a request without a [`PeerIdentity`] is refused.
    authenticated: bool,
    max_snapshot_bytes: u64,
    /// State digests at marks, for the leader's background cluster verify.
    marks: super::marks::Marks,
    /// Seals forwarded content writes before this node, the leader, proposes them.
    vault: Arc<crate::storage::vault::Vault>,
    /// This node's disk, for the leader's `DiskSpace` question and forwarded writes' admission.
    space: Arc<crate::storage::space::Space>,
}

impl PeerService {
    pub fn new(
        me: NodeId,
        raft: Raft,
        barriers: Arc<super::node::ReadBarriers>,
        snapshots: SnapshotFiles,
        authenticated: bool,
        max_snapshot_bytes: u64,
        (marks, vault, space): (
            super::marks::Marks,
            Arc<crate::storage::vault::Vault>,
            Arc<crate::storage::space::Space>,
        ),
    ) -> Self {
        PeerService { me, raft, barriers, snapshots, authenticated, max_snapshot_bytes, marks, vault, space }
    }

    /// The sender's node id when peers are authenticated (`None` on an insecure node), after
    /// checking the request is meant for this node.
    fn sender<T>(&self, req: &Request<T>) -> Result<Option<NodeId>, Status> {
        self.check_target(req)?;
        match (self.authenticated, req.extensions().get::<PeerIdentity>()) {
            (true, Some(p)) => Ok(Some(p.0)),
            (true, None) => Err(Status::unauthenticated("peer requests need a cluster certificate")),
            (false, _) => Ok(None),
        }
    }

    /// Refuses a request meant for another node (see [`TARGET_NODE_HEADER`]) as unavailable:
    /// the node it was meant for is not at this address.
    fn check_target<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let target = req.metadata().get(TARGET_NODE_HEADER).and_then(|v| v.to_str().ok()?.parse::<NodeId>().ok());
        match target {
            Some(t) if t == self.me => Ok(()),
            Some(t) => {
                metrics::counter!("engram_raft_misaddressed_requests_total").increment(1);
                tracing::debug!(me = self.me, target = t, "refused a peer request meant for another node");
                Err(Status::unavailable(format!("this is node {}, not node {t}", self.me)))
            }
            None => Err(Status::invalid_argument(format!("peer request without a valid {TARGET_NODE_HEADER}"))),
        }
    }

    /// Writes a snapshot stream to a temp file; returns it only if every byte arrived intact.
    async fn receive(
        &self,
        stream: &mut Streaming<SnapshotChunk>,
        path: &std::path::Path,
        sender: Option<NodeId>,
    ) -> Result<(Vote, SnapshotMeta, SnapshotData), Status> {
        use tokio::io::AsyncWriteExt;
        let mut file: Option<tokio::fs::File> = None;
        let mut head: Option<(Vote, SnapshotMeta)> = None;
        let mut hasher = blake3::Hasher::new();
        let mut checksum: Option<Vec<u8>> = None;
        let mut received = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            if checksum.is_some() {
                return Err(Status::invalid_argument("snapshot chunk after the last one"));
            }
            match &head {
                None => {
                    let (vote, meta): (Vote, SnapshotMeta) = bincode::deserialize(&chunk.meta).map_err(bad)?;
                    guard::snapshot(&vote, &meta, sender).map_err(refused)?;
                    head = Some((vote, meta));
                }
                Some(_) if !chunk.meta.is_empty() => {
                    return Err(Status::invalid_argument("snapshot meta after the first chunk"))
                }
                Some(_) => {}
            }
            received += chunk.data.len() as u64;
            if received > self.max_snapshot_bytes {
                return Err(Status::resource_exhausted(format!(
                    "snapshot larger than max_snapshot_bytes ({})",
                    self.max_snapshot_bytes
                )));
            }
            if file.is_none() {
                file = Some(tokio::fs::File::create(path).await.map_err(fatal)?);
            }
            hasher.update(&chunk.data);
            if let Some(f) = file.as_mut() {
                f.write_all(&chunk.data).await.map_err(fatal)?;
            }
            if !chunk.checksum.is_empty() {
                checksum = Some(chunk.checksum);
            }
        }
        let (vote, meta) = head.ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        if checksum.as_deref() != Some(hasher.finalize().as_bytes().as_slice()) {
            return Err(Status::data_loss("snapshot checksum mismatch or stream cut short"));
        }
        let mut file = file.ok_or_else(|| Status::invalid_argument("snapshot stream without data"))?;
        // A write that failed (ENOSPC) must fail the transfer here, not leave a short file
        // for the install to call corrupt, which stops the node.
        crate::storage::flush_and_sync(&mut file).await.map_err(fatal)?;
        let data = SnapshotData::open(path).map_err(fatal)?;
        Ok((vote, meta, data))
    }
}

fn bad(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("undecodable raft payload: {e}"))
}

fn refused(e: guard::GuardError) -> Status {
    metrics::counter!("engram_raft_refused_messages_total").increment(1);
    tracing::warn!(error = %e, "refused a peer message");
    Status::invalid_argument(format!("refused raft message: {e}"))
}

fn fatal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

#[tonic::async_trait]
impl RaftService for PeerService {
    async fn append_entries(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let sender = self.sender(&req)?;
        let rpc = decode(req.get_ref()).map_err(bad)?;
        guard::append_entries(&rpc, sender).map_err(refused)?;
        let resp = self.raft.append_entries(rpc).await.map_err(fatal)?;
        Ok(Response::new(encode(&resp)))
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let sender = self.sender(&req)?;
        let rpc = decode(req.get_ref()).map_err(bad)?;
        guard::vote_request(&rpc, sender).map_err(refused)?;
        let resp = self.raft.vote(rpc).await.map_err(fatal)?;
        Ok(Response::new(encode(&resp)))
    }

    async fn pre_vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let sender = self.sender(&req)?;
        let rpc = decode(req.get_ref()).map_err(bad)?;
        guard::vote_request(&rpc, sender).map_err(refused)?;
        let resp = self.raft.pre_vote(rpc).await.map_err(fatal)?;
        Ok(Response::new(encode(&resp)))
    }

    async fn transfer_leader(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let sender = self.sender(&req)?;
        let rpc: TransferLeaderRequest<TypeConfig> = decode(req.get_ref()).map_err(bad)?;
        guard::transfer_leader(&rpc, sender).map_err(refused)?;
        if *rpc.to_node_id() != self.me {
            return Err(refused(guard::GuardError::Shape(format!("a transfer to node {}", rpc.to_node_id()))));
        }
        let resp = self.raft.handle_transfer_leader(rpc).await.map_err(fatal)?;
        Ok(Response::new(encode(&resp)))
    }

    async fn install_snapshot(&self, req: Request<Streaming<SnapshotChunk>>) -> Result<Response<RaftPayload>, Status> {
        let sender = self.sender(&req)?;
        let mut stream = req.into_inner();
        let path = self.snapshots.temp_path();
        let (vote, meta, data) = match self.receive(&mut stream, &path, sender).await {
            Ok(received) => received,
            Err(e) => {
                let _ = tokio::fs::remove_file(&path).await;
                return Err(e);
            }
        };
        // Installing publishes the file (renames it); if it is refused, it is still here.
        let resp = self.raft.install_full_snapshot(vote, Snapshot { meta, snapshot: data }).await;
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            let _ = tokio::fs::remove_file(&path).await;
        }
        Ok(Response::new(encode(&resp.map_err(fatal)?)))
    }

    /// A follower's client write. Proposed here only while this node leads: a node that is no
    /// longer leader answers `NotLeader` with its hint rather than forwarding again. The
    /// command gets this node's clock, as if its client had called here.
    async fn forward_write(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        // Only a current member forwards: a departed node's certificate stays valid, its say
        // over client writes does not.
        if let Some(sender) = self.sender(&req)? {
            let m = self.raft.metrics().borrow_watched().membership_config.clone();
            if m.membership().get_node(&sender).is_none() {
                return Err(Status::permission_denied(format!("node {sender} is not a member")));
            }
        }
        let mut cmd: Command =
            decode(req.get_ref()).map_err(|e| Status::invalid_argument(format!("undecodable forwarded write: {e}")))?;
        guard::forwarded(&cmd, self.authenticated).map_err(|e| Status::invalid_argument(e.to_string()))?;
        cmd.now_ms = crate::memory::now_ms();
        let res = super::node::write(&self.raft, &self.vault, &self.space, cmd).await;
        Ok(Response::new(encode(&res)))
    }

    async fn mark_digest(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.sender(&req)?;
        let (id, wait_ms): (String, u32) =
            decode(req.get_ref()).map_err(|e| Status::invalid_argument(format!("undecodable mark query: {e}")))?;
        if let Some((field, why)) = super::marks::bad_query(&id, wait_ms) {
            return Err(Status::invalid_argument(format!("{field}: {why}")));
        }
        let found = self.marks.wait(&id, std::time::Duration::from_millis(wait_ms.into())).await;
        Ok(Response::new(encode(&found)))
    }

    /// The leader's question about this node's disk: an empty bincode `()` in, a bincode
    /// `storage::space::Report` out.
    async fn disk_space(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.sender(&req)?;
        if !req.get_ref().data.is_empty() {
            return Err(Status::invalid_argument("a disk space question carries nothing"));
        }
        Ok(Response::new(encode(&self.space.report())))
    }

    async fn read_index(&self, req: Request<ReadIndexRequest>) -> Result<Response<RaftPayload>, Status> {
        self.sender(&req)?;
        let policy = if req.get_ref().lease { ReadPolicy::LeaseRead } else { ReadPolicy::ReadIndex };
        match self.barriers.confirm(policy).await {
            Ok(lin) => Ok(Response::new(encode(lin.read_log_id()))),
            Err(e) => Err(Status::unavailable(format!("cannot confirm leadership: {e}"))),
        }
    }
}
