//! The leader's background `cluster verify`: every `cluster_verify_interval_secs` it proposes a
//! mark, waits for its own digest at the mark, asks every other member for theirs over the
//! peer service (`MarkDigest`), and names the members whose digest differs from the majority's.
//! Outcomes go to `engram_cluster_verify_runs_total{outcome}` and the
//! `engram_cluster_verify_diverged_nodes` gauge, and a divergence is logged as an error naming
//! the nodes, and the last outcome is in `/status` under `replicas` ([`VerifyStatus`]).
//! `engramctl cluster verify` does the same on demand.

use std::collections::BTreeMap;
use std::time::Duration;

use super::marks::{MarkDigest, Marks};
use super::network::{addressed, decode, encode};
use super::types::{Command, NodeId, Op};
use super::RaftNode;
use crate::error::ApiError;

/// How long each node may take to apply the mark.
const WAIT: Duration = Duration::from_secs(30);

/// What one verification found.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub index: u64,
    /// Members whose digest differs from the majority's.
    pub diverged: Vec<NodeId>,
    /// Members with no digest at the mark (down, behind, restarted, or past it by a snapshot).
    pub missing: Vec<NodeId>,
    /// No digest was held by a majority of the members that answered.
    pub no_majority: bool,
}

/// The last background verification this node ran (as leader), for `/status`.
#[derive(Debug, Clone, Default)]
pub struct LastVerify {
    /// When it finished (0: never).
    pub at_ms: u64,
    /// The mark's index (0 when it could not run).
    pub index: u64,
    /// `ok`, `diverged`, `no_majority`, `incomplete` or `failed` (as in the metric).
    pub outcome: &'static str,
    pub diverged: Vec<NodeId>,
    pub missing: Vec<NodeId>,
}

pub type VerifyStatus = std::sync::Arc<std::sync::Mutex<LastVerify>>;

/// The value more than half of `values` hold; `None` when none does (or there are none).
/// `engramctl cluster verify` and `ledger verify` judge the endpoints' answers with it too.
pub fn majority<'a, D: Ord + 'a>(values: impl IntoIterator<Item = &'a D>) -> Option<&'a D> {
    let mut counts = BTreeMap::<&D, usize>::new();
    let mut total = 0;
    for v in values {
        *counts.entry(v).or_default() += 1;
        total += 1;
    }
    counts.into_iter().find(|(_, n)| n * 2 > total).map(|(v, _)| v)
}

/// The members whose digest is not the majority's, or `None` when no digest has a majority.
pub fn minority(digests: &[(NodeId, [u8; 32])]) -> Option<Vec<NodeId>> {
    let m = majority(digests.iter().map(|(_, d)| d))?;
    Some(digests.iter().filter(|(_, d)| d != m).map(|(id, _)| *id).collect())
}

/// Proposes a mark on the leader (a mark is node-only: a forwarded one is refused); its id and
/// log index.
pub async fn propose_mark(node: &RaftNode) -> Result<(String, u64), ApiError> {
    node.require_leader()?;
    let id = uuid::Uuid::now_v7().simple().to_string();
    let written = node.write(Command::system(Op::Mark { id: id.clone() })).await?;
    Ok((id, written.index))
}

/// One verification, run on the leader.
pub async fn verify_once(node: &RaftNode, marks: &Marks) -> Result<Report, ApiError> {
    let (id, index) = propose_mark(node).await?;
    let members: Vec<(NodeId, String)> = {
        use openraft::async_runtime::watch::WatchReceiver;
        let m = node.raft.metrics().borrow_watched().membership_config.clone();
        m.membership().nodes().map(|(id, n)| (*id, n.raft_addr.clone())).collect()
    };
    let asks = members.into_iter().map(|(member, addr)| {
        let id = id.clone();
        async move {
            let found =
                if member == node.id { marks.wait(&id, WAIT).await } else { ask(node, member, &addr, &id).await };
            (member, found)
        }
    });
    let answers = futures::future::join_all(asks).await;
    let mut digests = Vec::new();
    let mut missing = Vec::new();
    for (member, found) in answers {
        match found.map(|d| d.digest) {
            Some(Ok(d)) => digests.push((member, d)),
            Some(Err(e)) => {
                tracing::warn!(node = member, error = %e, "no state digest at the mark");
                missing.push(member);
            }
            None => missing.push(member),
        }
    }
    let (diverged, no_majority) = match minority(&digests) {
        Some(d) => (d, false),
        None => (Vec::new(), true),
    };
    Ok(Report { index, diverged, missing, no_majority })
}

/// A member's digest at mark `id` over the peer service.
async fn ask(node: &RaftNode, member: NodeId, addr: &str, id: &str) -> Option<MarkDigest> {
    let mut client = match node.peer(member, addr) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(node = member, error = %e, "cannot reach a member for cluster verify");
            return None;
        }
    };
    let mut req = addressed(encode(&(id.to_string(), WAIT.as_millis() as u32)), member);
    req.set_timeout(WAIT + Duration::from_secs(5));
    match client.mark_digest(req).await {
        Ok(resp) => decode::<Option<MarkDigest>>(resp.get_ref()).unwrap_or_else(|e| {
            tracing::warn!(node = member, error = %e, "undecodable mark digest");
            None
        }),
        Err(s) => {
            tracing::warn!(node = member, code = ?s.code(), msg = s.message(), "mark digest failed");
            None
        }
    }
}

/// Runs a verification every `every` while this node leads, until `stop`.
pub async fn run(
    node: RaftNode,
    marks: Marks,
    every: Duration,
    status: VerifyStatus,
    stop: impl std::future::Future<Output = ()>,
) {
    node.every_while_leader(every, stop, || report(&node, &marks, &status)).await;
}

/// One background verification, into the metrics, the log and `status`.
async fn report(node: &RaftNode, marks: &Marks, status: &VerifyStatus) {
    let mut last = LastVerify::default();
    let outcome = match verify_once(node, marks).await {
        Ok(r) => {
            last.index = r.index;
            last.diverged = r.diverged.clone();
            last.missing = r.missing.clone();
            metrics::gauge!("engram_cluster_verify_diverged_nodes").set(r.diverged.len() as f64);
            metrics::gauge!("engram_cluster_verify_index").set(r.index as f64);
            if !r.diverged.is_empty() {
                tracing::error!(index = r.index, diverged = ?r.diverged, "replicas hold different state at one log index");
                "diverged"
            } else if r.no_majority {
                tracing::error!(index = r.index, "no state digest is held by a majority of the members");
                "no_majority"
            } else if !r.missing.is_empty() {
                tracing::warn!(index = r.index, missing = ?r.missing, "cluster verify: members without a digest");
                "incomplete"
            } else {
                "ok"
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cluster verify could not run");
            "failed"
        }
    };
    metrics::counter!("engram_cluster_verify_runs_total", "outcome" => outcome).increment(1);
    last.outcome = outcome;
    last.at_ms = crate::memory::now_ms();
    *status.lock().unwrap_or_else(|p| p.into_inner()) = last;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_minority_is_named_and_a_tie_has_no_majority() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        assert_eq!(minority(&[(1, a), (2, a), (3, a)]), Some(vec![]));
        assert_eq!(minority(&[(1, a), (2, b), (3, a)]), Some(vec![2]));
        assert_eq!(minority(&[(1, a), (2, b)]), None);
        assert_eq!(minority(&[(1, a)]), Some(vec![]));
        assert_eq!(minority(&[]), None);
    }
}
