//! Peer transport, client side: one lazily connected tonic channel per target node.
//!
//! Raft messages travel as bincode inside `RaftPayload` (see `proto/engram/v1/raft.proto`).
//! Snapshots are streamed in chunks with a BLAKE3 checksum on the last chunk.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openraft::errors::{NetworkError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest, TransferLeaderResponse,
    VoteRequest, VoteResponse,
};
use openraft::{OptionalSend, RaftNetworkV2};
use serde::{de::DeserializeOwned, Serialize};
use tonic::transport::{Channel, Endpoint};

use super::snapshot::SnapshotData;
use super::types::{EngramNode, NodeId, TypeConfig, Vote};
use crate::proto::raft_service_client::RaftServiceClient;
use crate::proto::{RaftPayload, SnapshotChunk};

type RPCError = openraft::errors::RPCError<TypeConfig>;

/// Snapshot chunk size on the wire.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// Metadata on every peer RPC: the node id it is meant for. Addresses outlive identities (a
/// replaced node's successor often gets its address) and a removal can be cut short, so a
/// request for a departed node may reach another one. Answering it would let one node vote
/// and acknowledge appends in two members' names, and a leader would count a quorum that
/// does not exist. The receiver refuses a request meant for anyone else (see
/// `service::PeerService`), and the sender sees that node as unreachable.
pub const TARGET_NODE_HEADER: &str = "engram-target-node";

/// A peer request addressed to node `target`.
pub(crate) fn addressed<T>(msg: T, target: NodeId) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(TARGET_NODE_HEADER, target.into());
    req
}

/// Opens peer connections.
#[derive(Clone, Default)]
pub struct Network {}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &EngramNode) -> PeerClient {
        PeerClient::new(target, &node.raft_addr)
    }
}

/// A connection to one peer.
pub struct PeerClient {
    target: NodeId,
    client: Result<RaftServiceClient<Channel>, String>,
}

impl PeerClient {
    pub fn new(target: NodeId, addr: &str) -> Self {
        let client = Endpoint::from_shared(format!("http://{addr}"))
            .map(|e| {
                let ch = e.connect_timeout(Duration::from_millis(500)).tcp_nodelay(true).connect_lazy();
                RaftServiceClient::new(ch).max_decoding_message_size(512 << 20).max_encoding_message_size(512 << 20)
            })
            .map_err(|e| format!("bad peer address {addr:?}: {e}"));
        PeerClient { target, client }
    }

    fn client(&self) -> Result<RaftServiceClient<Channel>, RPCError> {
        self.client.clone().map_err(|e| RPCError::Unreachable(Unreachable::new(&std::io::Error::other(e))))
    }
}

pub(crate) fn encode<T: Serialize>(v: &T) -> RaftPayload {
    RaftPayload { data: bincode::serialize(v).expect("bincode of a raft message cannot fail") }
}

pub(crate) fn decode<T: DeserializeOwned>(p: &RaftPayload) -> Result<T, bincode::Error> {
    bincode::deserialize(&p.data)
}

/// Connection failures mean "unreachable" (openraft backs off); anything else is a network error.
fn status_to_rpc(target: NodeId, s: tonic::Status) -> RPCError {
    tracing::debug!(target, code = ?s.code(), msg = s.message(), "peer rpc failed");
    if s.code() == tonic::Code::Unavailable {
        RPCError::Unreachable(Unreachable::new(&s))
    } else {
        RPCError::Network(NetworkError::new(&s))
    }
}

fn request<T>(msg: T, target: NodeId, option: &RPCOption) -> tonic::Request<T> {
    let mut req = addressed(msg, target);
    req.set_timeout(option.hard_ttl());
    req
}

macro_rules! unary {
    ($self:ident, $method:ident, $rpc:expr, $option:expr) => {{
        let mut c = $self.client()?;
        let resp = c
            .$method(request(encode(&$rpc), $self.target, &$option))
            .await
            .map_err(|s| status_to_rpc($self.target, s))?;
        decode(resp.get_ref()).map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }};
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError> {
        unary!(self, append_entries, rpc, option)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError> {
        unary!(self, vote, rpc, option)
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError> {
        unary!(self, pre_vote, rpc, option)
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError> {
        unary!(self, transfer_leader, req, option)
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: super::state_machine::Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let mut client = self.client().map_err(|e| match e {
            RPCError::Unreachable(u) => StreamingError::Unreachable(u),
            other => StreamingError::Network(NetworkError::new(&other)),
        })?;
        let meta = bincode::serialize(&(vote, snapshot.meta.clone())).expect("bincode of snapshot meta");
        let data = Arc::new(snapshot.snapshot);
        let len = data.len().map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        let target = self.target;
        let send = client.install_snapshot(addressed(chunks(data, len, meta), target));
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            resp = send => {
                let resp = resp.map_err(|s| match status_to_rpc(target, s) {
                    RPCError::Unreachable(u) => StreamingError::Unreachable(u),
                    other => StreamingError::Network(NetworkError::new(&other)),
                })?;
                decode(resp.get_ref()).map_err(|e| StreamingError::Network(NetworkError::new(&e)))
            }
        }
    }
}

/// The snapshot file as a lazy stream of chunks, read one at a time: the first carries `meta`,
/// the last the BLAKE3 of all bytes. A read error ends the stream early, which the receiver
/// refuses (no checksum).
fn chunks(data: Arc<SnapshotData>, len: u64, meta: Vec<u8>) -> impl futures::Stream<Item = SnapshotChunk> {
    let state = (0u64, Some(meta), blake3::Hasher::new(), false);
    futures::stream::unfold(state, move |(offset, meta, mut hasher, done)| {
        let data = data.clone();
        async move {
            if done {
                return None;
            }
            let want = (len - offset).min(SNAPSHOT_CHUNK_BYTES as u64) as usize;
            let read = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; want];
                let mut filled = 0;
                while filled < want {
                    match data.read_at(&mut buf[filled..], offset + filled as u64) {
                        Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
                        Ok(n) => filled += n,
                        Err(e) => return Err(e),
                    }
                }
                Ok(buf)
            })
            .await;
            let buf = match read {
                Ok(Ok(buf)) => buf,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "reading the snapshot file for a transfer failed");
                    return None;
                }
                Err(_) => return None,
            };
            hasher.update(&buf);
            let next = offset + buf.len() as u64;
            let last = next == len;
            let chunk = SnapshotChunk {
                meta: meta.unwrap_or_default(),
                data: buf,
                checksum: if last { hasher.finalize().as_bytes().to_vec() } else { vec![] },
            };
            Some((chunk, (next, None, hasher, last)))
        }
    })
}
