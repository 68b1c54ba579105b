//! Every Raft message from the network is checked here before openraft sees it, in both
//! directions (requests a peer sends us, responses to requests we sent).
//!
//! openraft trusts its peers: a vote with term `u64::MAX` is persisted and then overflows the
//! next election's `term + 1` (a panic on every restart), a snapshot whose last log id is
//! beyond its sender's vote trips an `assert!`, entries out of order corrupt the log. Mutual
//! TLS keeps strangers out; these checks keep a buggy or hostile member from turning one
//! message into a dead node:
//!
//! * terms stay below [`MAX_TERM`] (2^48: an election every millisecond for 8,900 years) and
//!   log indexes below [`MAX_INDEX`], so no `+ 1` can overflow;
//! * the sender is who it says it is: the node id in the message's vote is the node id in its
//!   certificate (when the listener has certificates);
//! * no log id in a message is beyond the vote it comes with, and entries are consecutive
//!   from `prev_log_id`.

use thiserror::Error;

use super::types::{Command, Entry, LogId, NodeId, SnapshotMeta, TypeConfig, Vote};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest, VoteRequest, VoteResponse,
};

pub const MAX_TERM: u64 = 1 << 48;
pub const MAX_INDEX: u64 = 1 << 62;
/// Entries per AppendEntries (openraft's `max_payload_entries`). It also bounds the batches a
/// follower appends and applies: 32 capped a busy cluster at 32 entries per replication round
/// trip. Bytes are bounded separately (`network::MAX_APPEND_BYTES`).
pub const MAX_PAYLOAD_ENTRIES: u64 = 512;
/// What a receiver accepts: the sender's limit with headroom.
pub const MAX_ENTRIES: usize = 2 * MAX_PAYLOAD_ENTRIES as usize;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum GuardError {
    #[error("term {0} is beyond the accepted maximum")]
    Term(u64),
    #[error("log index {0} is beyond the accepted maximum")]
    Index(u64),
    #[error("the message claims to come from node {claimed}, but its sender is node {actual}")]
    Sender { claimed: NodeId, actual: NodeId },
    #[error("malformed message: {0}")]
    Shape(String),
}

type Leader = openraft::vote::leader_id_adv::LeaderId<u64, NodeId>;

fn term(t: u64) -> Result<(), GuardError> {
    if t >= MAX_TERM {
        Err(GuardError::Term(t))
    } else {
        Ok(())
    }
}

fn vote(v: &Vote) -> Result<(), GuardError> {
    term(v.leader_id.term)
}

fn from(v: &Vote, sender: Option<NodeId>) -> Result<(), GuardError> {
    vote(v)?;
    match sender {
        Some(actual) if actual != v.leader_id.node_id => {
            Err(GuardError::Sender { claimed: v.leader_id.node_id, actual })
        }
        _ => Ok(()),
    }
}

/// A log id that is well within bounds and not beyond `ceiling` (the vote it travels with).
fn log_id(l: &LogId, ceiling: Option<&Leader>) -> Result<(), GuardError> {
    term(l.leader_id.term)?;
    if l.index >= MAX_INDEX {
        return Err(GuardError::Index(l.index));
    }
    if let Some(c) = ceiling {
        if &l.leader_id > c {
            return Err(GuardError::Shape(format!("log id {l} is beyond the sender's vote {c}")));
        }
    }
    Ok(())
}

fn opt_log_id(l: Option<&LogId>, ceiling: Option<&Leader>) -> Result<(), GuardError> {
    l.map_or(Ok(()), |l| log_id(l, ceiling))
}

/// A client write forwarded by a follower: it must name the client it came from (on a node
/// with certificates every client has a principal, and `apply` authorizes it again), and be
/// an op a client may ask for.
pub fn forwarded(cmd: &Command, authenticated: bool) -> Result<(), GuardError> {
    if authenticated && cmd.principal.is_none() {
        return Err(GuardError::Shape("a forwarded write names no principal".into()));
    }
    if cmd.op.node_only() {
        return Err(GuardError::Shape("a node-only op cannot be forwarded".into()));
    }
    // The API proposes `PutChecked`; the legacy `Put` would create a namespace unasked.
    if matches!(cmd.op, super::types::Op::Put { .. }) {
        return Err(GuardError::Shape("a legacy put cannot be forwarded".into()));
    }
    Ok(())
}

pub fn vote_request(req: &VoteRequest<TypeConfig>, sender: Option<NodeId>) -> Result<(), GuardError> {
    from(&req.vote, sender)?;
    opt_log_id(req.last_log_id.as_ref(), Some(&req.vote.leader_id))
}

pub fn append_entries(req: &AppendEntriesRequest<TypeConfig>, sender: Option<NodeId>) -> Result<(), GuardError> {
    from(&req.vote, sender)?;
    let ceiling = Some(&req.vote.leader_id);
    opt_log_id(req.prev_log_id.as_ref(), ceiling)?;
    opt_log_id(req.leader_commit.as_ref(), ceiling)?;
    if req.entries.len() > MAX_ENTRIES {
        return Err(GuardError::Shape(format!("{} entries in one message", req.entries.len())));
    }
    let mut prev: Option<&LogId> = req.prev_log_id.as_ref();
    let first = req.prev_log_id.as_ref().map(|p| p.index + 1).unwrap_or(0);
    for (want, e) in (first..).zip(&req.entries) {
        entry(e, ceiling)?;
        if e.log_id.index != want {
            return Err(GuardError::Shape(format!("entry {} where {want} was due", e.log_id.index)));
        }
        if prev.is_some_and(|p| p.leader_id > e.log_id.leader_id) {
            return Err(GuardError::Shape("entries go back in leader order".into()));
        }
        prev = Some(&e.log_id);
    }
    Ok(())
}

fn entry(e: &Entry, ceiling: Option<&Leader>) -> Result<(), GuardError> {
    log_id(&e.log_id, ceiling)
}

pub fn snapshot(v: &Vote, meta: &SnapshotMeta, sender: Option<NodeId>) -> Result<(), GuardError> {
    from(v, sender)?;
    let last = meta.last_log_id.as_ref().ok_or_else(|| GuardError::Shape("a snapshot without a last log id".into()))?;
    log_id(last, Some(&v.leader_id))?;
    if let Some(m) = meta.last_membership.log_id() {
        log_id(m, Some(&v.leader_id))?;
        if m > last {
            return Err(GuardError::Shape("the snapshot's membership is beyond its last log id".into()));
        }
    }
    Ok(())
}

pub fn transfer_leader(req: &TransferLeaderRequest<TypeConfig>, sender: Option<NodeId>) -> Result<(), GuardError> {
    from(req.from_leader(), sender)?;
    opt_log_id(req.last_log_id(), Some(&req.from_leader().leader_id))
}

pub fn vote_response(resp: &VoteResponse<TypeConfig>) -> Result<(), GuardError> {
    vote(&resp.vote)?;
    opt_log_id(resp.last_log_id.as_ref(), None)
}

pub fn append_response(resp: &AppendEntriesResponse<TypeConfig>) -> Result<(), GuardError> {
    match resp {
        AppendEntriesResponse::Success | AppendEntriesResponse::Conflict => Ok(()),
        AppendEntriesResponse::PartialSuccess(l) => opt_log_id(l.as_ref(), None),
        AppendEntriesResponse::HigherVote(v) => vote(v),
    }
}

pub fn snapshot_response(resp: &SnapshotResponse<TypeConfig>) -> Result<(), GuardError> {
    vote(&resp.vote)
}

/// The read index a leader answered: a bounded log id.
pub fn read_index(l: &LogId) -> Result<(), GuardError> {
    log_id(l, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::EntryPayload;

    #[test]
    fn forwarded_writes_name_a_principal_and_are_client_ops() {
        use super::super::types::{Command, Op};
        use crate::auth::Principal;
        let key = Some(Principal::Key { id: crate::auth::token::KeyId([7; 8]) });
        let cmd = |principal: Option<Principal>, op: Op| Command { principal, idempotency: None, now_ms: 1, op };
        let put = |checked: bool| {
            if checked {
                Op::PutChecked { namespace: "a".into(), items: vec![], create: false, approx_min_vectors: 1 }
            } else {
                Op::Put { namespace: "a".into(), items: vec![], approx_min_vectors: 1 }
            }
        };
        assert!(forwarded(&cmd(key.clone(), put(true)), true).is_ok());
        assert!(forwarded(&cmd(None, put(true)), false).is_ok(), "an insecure cluster has no principals");
        assert!(forwarded(&cmd(None, put(true)), true).is_err(), "no principal on a secured cluster");
        assert!(forwarded(&cmd(key.clone(), put(false)), true).is_err(), "the legacy put creates namespaces");
        assert!(forwarded(&cmd(key.clone(), Op::Purge { items: vec![] }), true).is_err(), "node-only");
        assert!(forwarded(&cmd(key, Op::SetClusterId { cluster_id: [0; 16] }), true).is_err(), "node-only");
    }

    fn leader(term: u64, node_id: NodeId) -> Leader {
        Leader { term, node_id }
    }

    fn v(term: u64, node: NodeId) -> Vote {
        Vote { leader_id: leader(term, node), committed: true }
    }

    fn lid(term: u64, node: NodeId, index: u64) -> LogId {
        LogId { leader_id: leader(term, node), index }
    }

    fn blank(l: LogId) -> Entry {
        Entry { log_id: l, payload: EntryPayload::Blank }
    }

    fn ae(vote: Vote, prev: Option<LogId>, entries: Vec<Entry>) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest { vote, prev_log_id: prev, entries, leader_commit: None }
    }

    #[test]
    fn hostile_votes_are_refused() {
        let req = |vote| VoteRequest::<TypeConfig> { vote, last_log_id: None, leadership_transfer: false };
        assert_eq!(vote_request(&req(v(u64::MAX, 2)), Some(2)), Err(GuardError::Term(u64::MAX)));
        assert_eq!(vote_request(&req(v(MAX_TERM, 2)), None), Err(GuardError::Term(MAX_TERM)));
        assert_eq!(
            vote_request(&req(v(5, 1)), Some(2)),
            Err(GuardError::Sender { claimed: 1, actual: 2 }),
            "node 2 may not ask for votes as node 1"
        );
        assert!(vote_request(&req(v(5, 2)), Some(2)).is_ok());
        let mut r = req(v(5, 2));
        r.last_log_id = Some(lid(6, 2, 10));
        assert!(vote_request(&r, Some(2)).is_err(), "a last log id beyond the vote");
    }

    #[test]
    fn appends_must_be_consecutive_and_behind_their_vote() {
        let ok = ae(v(3, 1), Some(lid(2, 1, 4)), vec![blank(lid(2, 1, 5)), blank(lid(3, 1, 6))]);
        assert!(append_entries(&ok, Some(1)).is_ok());
        assert!(append_entries(&ok, Some(3)).is_err(), "sender mismatch");
        let gap = ae(v(3, 1), Some(lid(2, 1, 4)), vec![blank(lid(3, 1, 7))]);
        assert!(append_entries(&gap, Some(1)).is_err());
        let ahead = ae(v(3, 1), None, vec![blank(lid(4, 1, 0))]);
        assert!(append_entries(&ahead, Some(1)).is_err());
        let back = ae(v(3, 1), None, vec![blank(lid(3, 1, 0)), blank(lid(2, 1, 1))]);
        assert!(append_entries(&back, Some(1)).is_err());
        let huge = ae(v(3, 1), Some(lid(3, 1, MAX_INDEX)), vec![]);
        assert!(append_entries(&huge, Some(1)).is_err());
        let mut commit = ae(v(3, 1), None, vec![]);
        commit.leader_commit = Some(lid(9, 1, 3));
        assert!(append_entries(&commit, Some(1)).is_err(), "a commit beyond the vote");
    }

    #[test]
    fn responses_are_bounded() {
        assert!(append_response(&AppendEntriesResponse::HigherVote(v(u64::MAX, 1))).is_err());
        assert!(append_response(&AppendEntriesResponse::PartialSuccess(Some(lid(1, 1, u64::MAX)))).is_err());
        assert!(read_index(&lid(1, 1, u64::MAX)).is_err());
        assert!(read_index(&lid(1, 1, 7)).is_ok());
    }
}
