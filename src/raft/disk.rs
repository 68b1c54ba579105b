//! The leader's half of disk-space admission (`storage::space`): every second it asks each
//! voter how much room it has (peer `DiskSpace`), so it can refuse writes a majority could not
//! store. A voter that does not answer is left out until it does (its last report expires).

use std::time::Duration;

use super::network::{addressed, decode, encode};
use super::{NodeId, RaftNode};
use crate::storage::space::{Report, REFRESH};

/// How long one voter may take to answer.
const ASK_TIMEOUT: Duration = Duration::from_millis(900);

/// Asks every voter but this node, concurrently, and records the answers.
pub async fn poll_voters(node: &RaftNode) {
    use openraft::async_runtime::watch::WatchReceiver;
    let m = node.raft.metrics().borrow_watched().clone();
    let membership = m.membership_config.membership().clone();
    let asks = membership.voter_ids().filter(|v| *v != node.id).filter_map(|v| {
        let addr = membership.get_node(&v)?.raft_addr.clone();
        Some(async move { (v, ask(node, v, &addr).await) })
    });
    for (id, report) in futures::future::join_all(asks).await {
        if let Some(r) = report {
            node.space().heard(id, r);
        }
    }
}

async fn ask(node: &RaftNode, id: NodeId, addr: &str) -> Option<Report> {
    let mut client = node.peer(id, addr).ok()?;
    let mut req = addressed(encode(&()), id);
    req.set_timeout(ASK_TIMEOUT);
    match client.disk_space(req).await {
        Ok(resp) => match decode::<Report>(resp.get_ref()) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(node = id, error = %e, "undecodable disk space report");
                None
            }
        },
        Err(s) => {
            tracing::debug!(node = id, code = ?s.code(), msg = s.message(), "disk space question failed");
            None
        }
    }
}

/// Measures this node's disk every second and, while it leads, asks the voters, until `stop`.
pub async fn run(node: RaftNode, stop: impl std::future::Future<Output = ()>) {
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = node.space().refresh() {
            tracing::warn!(error = %e, dir = %node.space().dir().display(), "cannot measure free disk space");
        }
        if node.is_leader() {
            tokio::select! {
                _ = &mut stop => return,
                _ = poll_voters(&node) => {}
            }
        }
    }
}
