//! Peer transport, client side: one lazily connected tonic channel per target node, over
//! mutual TLS when the node has certificates (the target's certificate must name it:
//! `node-<target>.<cluster>.engram`), rebuilt after a certificate reload.
//!
//! Raft messages travel as bincode inside `RaftPayload` (see `proto/engram/v1/raft.proto`).
//! An AppendEntries is cut to at most [`MAX_APPEND_BYTES`] of entries (openraft resends the
//! rest), so every peer message stays under the receiver's limit. Responses are checked by
//! [`super::guard`] like requests. Snapshots are streamed in chunks with a BLAKE3 checksum on
//! the last chunk.

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

use super::guard;
use super::snapshot::SnapshotData;
use super::types::{EngramNode, NodeId, TypeConfig, Vote};
use crate::proto::raft_service_client::RaftServiceClient;
use crate::proto::{RaftPayload, SnapshotChunk};
use crate::transport::NodeTls;

type RPCError = openraft::errors::RPCError<TypeConfig>;

/// Snapshot chunk size on the wire.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// Entries sent in one AppendEntries, by encoded size (at least one entry is always sent).
pub const MAX_APPEND_BYTES: usize = 8 << 20;

/// Largest peer message either side accepts: a full AppendEntries plus one maximal entry
/// (a client request of at most 8 MiB grows by a few percent as bincode).
pub const MAX_PEER_MESSAGE_BYTES: usize = 32 << 20;

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
pub struct Network {
    tls: Option<Arc<NodeTls>>,
}

impl Network {
    /// Plaintext without `tls` (`--insecure`), else mutual TLS with the node's certificates.
    pub fn new(tls: Option<Arc<NodeTls>>) -> Self {
        Network { tls }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &EngramNode) -> PeerClient {
        PeerClient::new(target, &node.raft_addr, self.tls.clone())
    }
}

/// A lazily connected channel to peer `target` at `addr`.
pub(crate) fn peer_channel(target: NodeId, addr: &str, tls: Option<&NodeTls>) -> Result<Channel, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut e =
        Endpoint::from_shared(format!("{scheme}://{addr}")).map_err(|e| format!("bad peer address {addr:?}: {e}"))?;
    if let Some(tls) = tls {
        e = e.tls_config(tls.peer_client(target)).map_err(|e| format!("peer TLS: {e}"))?;
    }
    Ok(e.connect_timeout(Duration::from_millis(500)).tcp_nodelay(true).connect_lazy())
}

/// A connection to one peer.
pub struct PeerClient {
    target: NodeId,
    addr: String,
    tls: Option<Arc<NodeTls>>,
    /// The channel and the TLS generation it was made with.
    client: Result<(RaftServiceClient<Channel>, u64), String>,
}

impl PeerClient {
    pub fn new(target: NodeId, addr: &str, tls: Option<Arc<NodeTls>>) -> Self {
        let mut c = PeerClient { target, addr: addr.to_string(), tls, client: Err(String::new()) };
        c.connect();
        c
    }

    fn generation(&self) -> u64 {
        self.tls.as_ref().map(|t| t.generation()).unwrap_or(0)
    }

    fn connect(&mut self) {
        let generation = self.generation();
        self.client = peer_channel(self.target, &self.addr, self.tls.as_deref()).map(|ch| {
            let c = RaftServiceClient::new(ch)
                .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES);
            (c, generation)
        });
    }

    fn client(&mut self) -> Result<RaftServiceClient<Channel>, RPCError> {
        if matches!(&self.client, Ok((_, g)) if *g != self.generation()) {
            self.connect();
        }
        self.client
            .clone()
            .map(|(c, _)| c)
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&std::io::Error::other(e))))
    }
}

/// A transfer-leader answer carries nothing openraft acts on beyond success.
fn accept_transfer(_: &TransferLeaderResponse<TypeConfig>) -> Result<(), guard::GuardError> {
    Ok(())
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
    ($self:ident, $method:ident, $rpc:expr, $option:expr, $check:path) => {{
        let mut c = $self.client()?;
        let resp = c
            .$method(request(encode(&$rpc), $self.target, &$option))
            .await
            .map_err(|s| status_to_rpc($self.target, s))?;
        let resp = decode(resp.get_ref()).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        $check(&resp).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        resp
    }};
}

/// How many of `entries` fit in one message of at most [`MAX_APPEND_BYTES`] (at least one).
fn fitting(entries: &[super::types::Entry]) -> usize {
    let mut bytes = 0u64;
    for (i, e) in entries.iter().enumerate() {
        bytes += bincode::serialized_size(e).unwrap_or(u64::MAX);
        if bytes > MAX_APPEND_BYTES as u64 {
            return i.max(1);
        }
    }
    entries.len()
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError> {
        // openraft allows sending a prefix and answering PartialSuccess up to its last entry.
        let keep = fitting(&rpc.entries);
        let cut = (keep < rpc.entries.len()).then(|| {
            rpc.entries.truncate(keep);
            rpc.entries.last().map(|e| e.log_id)
        });
        let resp: AppendEntriesResponse<TypeConfig> = unary!(self, append_entries, rpc, option, guard::append_response);
        Ok(match (resp, cut) {
            (AppendEntriesResponse::Success, Some(last)) => AppendEntriesResponse::PartialSuccess(last),
            (resp, _) => resp,
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError> {
        Ok(unary!(self, vote, rpc, option, guard::vote_response))
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError> {
        Ok(unary!(self, pre_vote, rpc, option, guard::vote_response))
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError> {
        Ok(unary!(self, transfer_leader, req, option, accept_transfer))
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
                let resp = decode(resp.get_ref()).map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
                guard::snapshot_response(&resp).map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
                Ok(resp)
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

#[cfg(test)]
mod tests {
    use openraft::EntryPayload;

    use super::*;
    use crate::memory::{MemoryInput, Precondition};
    use crate::raft::types::{Command, Entry, LogId, Op};

    fn big_entry(index: u64, bytes: usize) -> Entry {
        let m = MemoryInput {
            id: format!("m{index}"),
            text: "x".repeat(bytes),
            embedding: vec![0.5; 4],
            tags: Default::default(),
            importance: 0.5,
            expires_at_ms: None,
        };
        let op = Op::Put { namespace: "a".into(), items: vec![(m, Precondition::None)], approx_min_vectors: 64 };
        let leader_id = openraft::vote::leader_id_adv::LeaderId { term: 1, node_id: 1 };
        Entry { log_id: LogId { leader_id, index }, payload: EntryPayload::Normal(Command::system(op)) }
    }

    #[test]
    fn appends_are_cut_to_the_byte_budget_but_always_carry_one_entry() {
        let three_mib: Vec<Entry> = (0..4).map(|i| big_entry(i, 3 << 20)).collect();
        assert_eq!(fitting(&three_mib), 2, "two 3 MiB entries fit in 8 MiB, a third does not");
        let huge = vec![big_entry(0, 9 << 20), big_entry(1, 10)];
        assert_eq!(fitting(&huge), 1, "an entry bigger than the budget still goes, alone");
        let small: Vec<Entry> = (0..32).map(|i| big_entry(i, 100)).collect();
        assert_eq!(fitting(&small), 32);
        let one = bincode::serialized_size(&three_mib[0]).unwrap() as usize;
        assert!(2 * one + one < MAX_PEER_MESSAGE_BYTES);
    }
}
