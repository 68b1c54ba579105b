//! `AdminService`: cluster bootstrap, membership changes, leader transfer and status.
//! Membership changes run on the leader; elsewhere they fail with a leader hint.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use openraft::async_runtime::watch::WatchReceiver;
use openraft::ServerState;
use tonic::{Request, Response, Status};
use tracing::instrument;

use super::convert::{node_from_pb, node_to_pb};
use super::observe;
use crate::error::ApiError;
use crate::proto as pb;
use crate::proto::admin_service_server::AdminService;
use crate::raft::{EngramNode, NodeId, RaftNode};

#[derive(Clone)]
pub struct AdminApi {
    node: RaftNode,
    /// This node's own advertised addresses (used for a single-node bootstrap).
    me: EngramNode,
}

impl AdminApi {
    pub fn new(node: RaftNode, me: EngramNode) -> Self {
        AdminApi { node, me }
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

fn state_name(s: ServerState) -> &'static str {
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
    #[instrument(skip_all)]
    async fn init_cluster(
        &self,
        req: Request<pb::InitClusterRequest>,
    ) -> Result<Response<pb::InitClusterResponse>, Status> {
        let started = Instant::now();
        let pb::InitClusterRequest { members } = req.into_inner();
        let res = async {
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
            self.node.initialize(map).await?;
            Ok(pb::InitClusterResponse {})
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
}
