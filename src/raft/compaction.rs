//! Log compaction policy: which log entries a node purges behind its latest snapshot.
//!
//! openraft's own policy purges everything `max_in_snapshot_log_to_keep` entries behind the
//! snapshot and only protects ranges a replication is reading *right now*, so a follower that
//! is briefly down or slow comes back to a purged log and has to take a whole snapshot. Engram
//! turns openraft's policy off (`max_in_snapshot_log_to_keep = u64::MAX`) and runs this one:
//!
//! * purge up to `snapshot − keep`, and
//! * on the leader, never past the last entry a follower or learner has (its `matched` index)
//!   unless that follower is more than `max_lag` entries behind the snapshot: from there a
//!   snapshot is the cheaper way to catch it up, and the log stays bounded.
//!
//! Followers purge by the first rule alone; they replicate to nobody.
//!
//! It also decides when to take a snapshot ([`SnapshotPace`]): openraft's own policy (every N
//! entries) dumps the whole state every N writes, so a node's snapshot work per write grows
//! with its state: at 40k memories and N = 5,000 a busy node spent a tenth of its CPU dumping.
//! Engram waits for N entries *and* for memory writes (or entries) amounting to half the
//! memories in the last snapshot (like an LSM's size ratio): snapshot work per write stays
//! constant and the log behind the snapshot stays under about half the state.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;

use super::types::{NodeId, Raft};

/// The index to purge up to, inclusive, or `None` to purge nothing now.
pub fn purge_upto(
    me: NodeId,
    snapshot: Option<u64>,
    purged: Option<u64>,
    matched: Option<&[(NodeId, Option<u64>)]>,
    keep: u64,
    max_lag: u64,
) -> Option<u64> {
    let snapshot = snapshot?;
    let mut upto = snapshot.checked_sub(keep)?;
    let floor = snapshot.saturating_sub(max_lag);
    for (id, m) in matched.unwrap_or_default() {
        if *id == me {
            continue;
        }
        match m {
            Some(m) if *m >= floor => upto = upto.min(*m),
            // Nothing replicated yet, but close enough: keep everything for it.
            None if floor == 0 => return None,
            _ => {}
        }
    }
    (purged.is_none_or(|p| upto > p)).then_some(upto)
}

/// Memory writes since the last snapshot, and the memories that snapshot holds. Local pacing only:
/// when a node snapshots never changes what it applies.
#[derive(Debug, Default)]
pub struct SnapshotPace {
    written: AtomicU64,
    memories: AtomicU64,
}

impl SnapshotPace {
    /// `apply` wrote (put, changed or removed) `memories` memories.
    pub fn wrote(&self, memories: u64) {
        self.written.fetch_add(memories, Ordering::Relaxed);
    }

    /// A snapshot build starts: the writes so far are in it.
    pub fn building(&self) {
        self.written.store(0, Ordering::Relaxed);
    }

    /// A snapshot holding `memories` memories was built or installed.
    pub fn built(&self, memories: u64) {
        self.memories.store(memories, Ordering::Relaxed);
    }

    /// Whether to snapshot now, `entries` entries past the last one. Entries count too (and
    /// alone bound the log at half the memories): a cluster of reinforcements, refused puts
    /// or auth changes writes no memories but still grows its log.
    pub fn due(&self, entries: u64, min_entries: u64) -> bool {
        let half = self.memories.load(Ordering::Relaxed) / 2;
        entries >= min_entries && (self.written.load(Ordering::Relaxed) >= half || entries >= half)
    }
}

/// Applies [`purge_upto`] and [`SnapshotPace`] every `every` until `stop` resolves.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    raft: Raft,
    me: NodeId,
    keep: u64,
    max_lag: u64,
    pace: std::sync::Arc<SnapshotPace>,
    snapshot_entries: u64,
    every: Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    // The applied index a snapshot was last asked at: not again until one covers it, or (a
    // build that failed) another `snapshot_entries` went by.
    let mut asked: Option<u64> = None;
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => {}
        }
        let m = raft.metrics().borrow_watched().clone();
        let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
        let snapshot = m.snapshot.map(|l| l.index);
        let since = applied.saturating_sub(snapshot.unwrap_or(0));
        let waiting =
            asked.is_some_and(|a| snapshot.is_none_or(|s| s < a) && applied.saturating_sub(a) < snapshot_entries);
        if !waiting && pace.due(since, snapshot_entries) {
            asked = Some(applied);
            if raft.trigger().snapshot().await.is_err() {
                return;
            }
        }
        let matched: Option<Vec<(NodeId, Option<u64>)>> =
            m.replication.as_ref().map(|r| r.iter().map(|(id, l)| (*id, l.as_ref().map(|l| l.index))).collect());
        let upto =
            purge_upto(me, m.snapshot.map(|l| l.index), m.purged.map(|l| l.index), matched.as_deref(), keep, max_lag);
        if let Some(upto) = upto {
            if raft.trigger().purge_log(upto).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{purge_upto, SnapshotPace};

    #[test]
    fn snapshots_wait_for_entries_and_for_half_the_last_snapshots_memories() {
        let pace = SnapshotPace::default();
        // Nothing built yet: the entry count alone decides.
        assert!(!pace.due(4_999, 5_000));
        assert!(pace.due(5_000, 5_000));
        pace.building();
        pace.built(40_000);
        pace.wrote(19_999);
        assert!(!pace.due(19_999, 5_000), "19,999 writes of the 20,000 half");
        assert!(pace.due(20_000, 5_000), "entries alone reach the half");
        pace.wrote(1);
        assert!(pace.due(5_000, 5_000));
        assert!(!pace.due(4_999, 5_000), "enough writes but too few entries");
        // A build starting takes the writes so far.
        pace.building();
        assert!(!pace.due(5_000, 5_000));
    }

    #[test]
    fn the_leader_keeps_what_followers_within_the_lag_still_need() {
        // No snapshot: nothing to purge. Follower: snapshot - keep.
        assert_eq!(purge_upto(1, None, None, None, 0, 100), None);
        assert_eq!(purge_upto(1, Some(500), None, None, 10, 100), Some(490));
        assert_eq!(purge_upto(1, Some(500), Some(490), None, 10, 100), None, "already purged");
        // Leader: follower 3 has only 450; it is within the lag, so keep from 451 on.
        let m = [(1, Some(500)), (2, Some(500)), (3, Some(450))];
        assert_eq!(purge_upto(1, Some(500), None, Some(&m), 0, 100), Some(450));
        // 3 fell more than max_lag behind: it will get a snapshot; purge as usual.
        let m = [(1, Some(500)), (2, Some(500)), (3, Some(350))];
        assert_eq!(purge_upto(1, Some(500), None, Some(&m), 0, 100), Some(500));
        // A new learner with nothing matched, while the log is still short: keep it all.
        let m = [(1, Some(50)), (4, None)];
        assert_eq!(purge_upto(1, Some(50), None, Some(&m), 0, 100), None);
    }
}
