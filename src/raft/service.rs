//! Peer transport, server side: the `RaftService` on the peer listener. Only peers call it.

use futures::StreamExt;
use openraft::ReadPolicy;
use tonic::{Request, Response, Status, Streaming};

use super::network::{decode, encode};
use super::state_machine::Snapshot;
use super::types::{Raft, SnapshotMeta, Vote};
use crate::proto::raft_service_server::RaftService;
use crate::proto::{RaftPayload, ReadIndexRequest, SnapshotChunk};

pub struct PeerService {
    raft: Raft,
}

impl PeerService {
    pub fn new(raft: Raft) -> Self {
        PeerService { raft }
    }
}

fn bad(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("undecodable raft payload: {e}"))
}

fn fatal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

#[tonic::async_trait]
impl RaftService for PeerService {
    async fn append_entries(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc = decode(req.get_ref()).map_err(bad)?;
        let resp = self.raft.append_entries(rpc).await.map_err(fatal)?;
        Ok(Response::new(encode(&resp)))
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc = decode(req.get_ref()).map_err(bad)?;
        let resp = self.raft.vote(rpc).await.map_err(fatal)?;
        Ok(Response::new(encode(&resp)))
    }

    async fn pre_vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc = decode(req.get_ref()).map_err(bad)?;
        let resp = self.raft.pre_vote(rpc).await.map_err(fatal)?;
        Ok(Response::new(encode(&resp)))
    }

    async fn transfer_leader(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc = decode(req.get_ref()).map_err(bad)?;
        let resp = self.raft.handle_transfer_leader(rpc).await.map_err(fatal)?;
        Ok(Response::new(encode(&resp)))
    }

    async fn install_snapshot(&self, req: Request<Streaming<SnapshotChunk>>) -> Result<Response<RaftPayload>, Status> {
        let mut stream = req.into_inner();
        let mut head: Option<(Vote, SnapshotMeta)> = None;
        let mut data = Vec::new();
        let mut checksum = None;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            if head.is_none() {
                head = Some(bincode::deserialize(&chunk.meta).map_err(bad)?);
            }
            data.extend_from_slice(&chunk.data);
            if !chunk.checksum.is_empty() {
                checksum = Some(chunk.checksum);
            }
        }
        let (vote, meta) = head.ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        // A snapshot is installed only if every byte arrived intact.
        if checksum.as_deref() != Some(blake3::hash(&data).as_bytes().as_slice()) {
            return Err(Status::data_loss("snapshot checksum mismatch"));
        }
        let resp = self.raft.install_full_snapshot(vote, Snapshot { meta, snapshot: data }).await.map_err(fatal)?;
        Ok(Response::new(encode(&resp)))
    }

    async fn read_index(&self, req: Request<ReadIndexRequest>) -> Result<Response<RaftPayload>, Status> {
        let policy = if req.get_ref().lease { ReadPolicy::LeaseRead } else { ReadPolicy::ReadIndex };
        match self.raft.get_read_linearizer(policy).await {
            Ok(lin) => Ok(Response::new(encode(lin.read_log_id()))),
            Err(e) => Err(Status::unavailable(format!("cannot confirm leadership: {e}"))),
        }
    }
}
