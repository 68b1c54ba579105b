//! Disk-space admission: a node refuses new writes before its disk is full, not after.
//!
//! Every replica of a replicated write fills its disk at the same rate, so a full disk is not
//! one node's problem: if writes ran until the log's fsync failed with ENOSPC, every node
//! would stop at about the same time and fail again on restart. Instead each node watches the
//! free space of its data dir ([`Space::refresh`], once a second) and keeps a *reserve*
//! (`disk_reserve_bytes`; default the smaller of 1 GiB and 5 % of the filesystem) that client
//! writes may not eat into:
//!
//! * below the reserve the node's leader refuses writes that add data with
//!   RESOURCE_EXHAUSTED (nothing was applied; retry later), as a quota would;
//! * deletes, revocations and the node's own housekeeping (TTL purge, cluster naming, marks,
//!   key rewraps) still go through: they are how space comes back, and security must not wait
//!   on a disk;
//! * the leader also asks every voter for its space (peer `DiskSpace`, see
//!   `raft::service`) and refuses when fewer than a majority of voters could store the write,
//!   so a cluster never commits what a quorum cannot keep;
//! * reads, searches, snapshots to peers and backups are not affected;
//! * when space comes back (above the reserve plus an eighth, so the state does not flap)
//!   writes are admitted again, with no operator step.
//!
//! The reserve is also what a snapshot or index checkpoint still under way can use. What
//! still reaches a full disk (ENOSPC from redb) stops Raft; `server::run` then waits for space
//! without exiting and starts the node again in-process (see `server::run`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::raft::{NodeId, Op};

/// A voter's report older than this is not used (it may be partitioned or gone: the quorum
/// check then leaves it out rather than trusting what it last said).
pub const REPORT_TTL: Duration = Duration::from_secs(10);
/// How often the local free space is measured and, on the leader, voters are asked.
pub const REFRESH: Duration = Duration::from_secs(1);
/// The default reserve: the smaller of this and [`DEFAULT_RESERVE_FRACTION`] of the filesystem.
pub const DEFAULT_RESERVE_BYTES: u64 = 1 << 30;
pub const DEFAULT_RESERVE_FRACTION: f64 = 0.05;
/// How stale the leader's own measure may be when it admits a write.
pub const WRITE_REFRESH_MS: u64 = 50;
/// Clients retry a refused write after this.
pub const RETRY_AFTER_MS: u64 = 1000;

/// What a node says about its disk (the peer `DiskSpace` answer, bincode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub free_bytes: u64,
    pub reserve_bytes: u64,
    /// Below the reserve: this node refuses writes that add data.
    pub low: bool,
}

/// Free and total bytes of the filesystem holding `dir`, as an unprivileged writer sees it.
pub fn statvfs(dir: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a path with a NUL byte"))?;
    // SAFETY: statvfs is plain data; all-zero is a valid value for it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let unit = st.f_frsize as u64;
    Ok((st.f_bavail as u64 * unit, st.f_blocks as u64 * unit))
}

/// Free bytes of the filesystem holding `dir` (`None` when it cannot be measured).
pub fn free_bytes(dir: &Path) -> Option<u64> {
    statvfs(dir).ok().map(|(free, _)| free)
}

/// Whether `e` (or an error it was made from, as text through openraft) is a full disk.
pub fn is_disk_full(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if matches!(io.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
                || io.kind() == std::io::ErrorKind::StorageFull
            {
                return true;
            }
        }
        cur = err.source();
    }
    mentions_disk_full(&e.to_string())
}

/// openraft keeps storage errors as text: ENOSPC and EDQUOT as the OS words them.
pub fn mentions_disk_full(text: &str) -> bool {
    text.contains("No space left on device") || text.contains("Disk quota exceeded") || text.contains("storage full")
}

/// The reserve for a filesystem of `total` bytes: `configured`, or the default rule.
pub fn reserve_for(configured: Option<u64>, total: u64) -> u64 {
    configured.unwrap_or_else(|| DEFAULT_RESERVE_BYTES.min((total as f64 * DEFAULT_RESERVE_FRACTION) as u64))
}

/// Whether `low` of `voters` being short of disk leaves fewer than a majority able to store.
pub fn majority_low(voters: usize, low: usize) -> bool {
    low > 0 && voters.saturating_sub(low) < voters / 2 + 1
}

#[derive(Debug, Clone, Copy)]
struct Heard {
    report: Report,
    at: Instant,
}

/// One node's view of its own disk and its voters' (see the module docs).
pub struct Space {
    dir: PathBuf,
    reserve: u64,
    free: AtomicU64,
    /// When `free` was measured, in ms since `epoch`.
    measured_ms: AtomicU64,
    epoch: Instant,
    low: AtomicBool,
    peers: Mutex<HashMap<NodeId, Heard>>,
}

impl Space {
    /// Measures `dir` once; `reserve` is `disk_reserve_bytes` (`None`: the default rule,
    /// `Some(0)`: admission off).
    pub fn new(dir: &Path, reserve: Option<u64>) -> std::io::Result<Arc<Space>> {
        let (free, total) = statvfs(dir)?;
        let space = Space {
            dir: dir.to_path_buf(),
            reserve: reserve_for(reserve, total),
            free: AtomicU64::new(free),
            measured_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            low: AtomicBool::new(false),
            peers: Mutex::default(),
        };
        space.set(free);
        metrics::gauge!("engram_disk_reserve_bytes").set(space.reserve as f64);
        Ok(Arc::new(space))
    }

    /// Admission off: never refuses (embedding, tools).
    pub fn off() -> Arc<Space> {
        Arc::new(Space {
            dir: PathBuf::new(),
            reserve: 0,
            free: AtomicU64::new(u64::MAX),
            measured_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            low: AtomicBool::new(false),
            peers: Mutex::default(),
        })
    }

    pub fn reserve(&self) -> u64 {
        self.reserve
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn set(&self, free: u64) {
        self.free.store(free, Ordering::Relaxed);
        let was = self.low.load(Ordering::Relaxed);
        // Low below the reserve; back only above the reserve and an eighth of it.
        let low = self.reserve > 0 && if was { free < self.reserve + self.reserve / 8 } else { free < self.reserve };
        if low != was {
            self.low.store(low, Ordering::Relaxed);
            if low {
                tracing::warn!(
                    free_bytes = free,
                    reserve_bytes = self.reserve,
                    dir = %self.dir.display(),
                    "free disk space is below the reserve: writes that add data are refused"
                );
            } else {
                tracing::info!(
                    free_bytes = free,
                    reserve_bytes = self.reserve,
                    "free disk space is back: writes resume"
                );
            }
        }
        metrics::gauge!("engram_data_dir_free_bytes").set(free as f64);
        metrics::gauge!("engram_disk_low").set(if low { 1.0 } else { 0.0 });
    }

    /// Measures the data dir again.
    pub fn refresh(&self) -> std::io::Result<Report> {
        if !self.dir.as_os_str().is_empty() {
            let (free, _) = statvfs(&self.dir)?;
            self.measured_ms.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
            self.set(free);
        }
        Ok(self.report())
    }

    /// Measures again if the last measure is older than [`WRITE_REFRESH_MS`]: a leader taking
    /// writes faster than the background refresh sees its disk fill between two ticks.
    pub fn refresh_if_stale(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        if self.reserve > 0 && now.saturating_sub(self.measured_ms.load(Ordering::Relaxed)) >= WRITE_REFRESH_MS {
            if let Err(e) = self.refresh() {
                tracing::warn!(error = %e, dir = %self.dir.display(), "cannot measure free disk space");
            }
        }
    }

    /// What this node says about its disk.
    pub fn report(&self) -> Report {
        Report {
            free_bytes: self.free.load(Ordering::Relaxed),
            reserve_bytes: self.reserve,
            low: self.low.load(Ordering::Relaxed),
        }
    }

    /// A voter's answer to the leader's `DiskSpace` question.
    pub fn heard(&self, id: NodeId, report: Report) {
        self.peers.lock().unwrap_or_else(|p| p.into_inner()).insert(id, Heard { report, at: Instant::now() });
    }

    /// The voters (other than this node) whose recent report says they are below their reserve.
    pub fn low_voters(&self, voters: &[NodeId], me: NodeId) -> Vec<NodeId> {
        let now = Instant::now();
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        voters
            .iter()
            .copied()
            .filter(|v| *v != me)
            .filter(|v| peers.get(v).is_some_and(|h| h.report.low && now.duration_since(h.at) < REPORT_TTL))
            .collect()
    }

    /// Whether a write of `op` may be proposed by this node, the leader of `voters`.
    pub fn admit(&self, op: &Op, voters: &[NodeId], me: NodeId) -> Result<(), ApiError> {
        if self.reserve == 0 || !op.needs_disk() {
            return Ok(());
        }
        self.refresh_if_stale();
        let exhausted = |reason: String| {
            metrics::counter!("engram_disk_refused_writes_total").increment(1);
            ApiError::ResourceExhausted { field: "disk".into(), reason, retry_after_ms: RETRY_AFTER_MS }
        };
        let r = self.report();
        if r.low {
            return Err(exhausted(format!(
                "the leader, node {me}, has {} bytes free on its data dir, below its reserve of {} bytes; \
                 writes that add data resume when space is freed",
                r.free_bytes, r.reserve_bytes
            )));
        }
        let low = self.low_voters(voters, me);
        if majority_low(voters.len(), low.len()) {
            return Err(exhausted(format!(
                "voters {low:?} are below their disk reserve: a majority of the cluster cannot store more; \
                 writes that add data resume when space is freed"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space(reserve: u64) -> Space {
        Space {
            dir: PathBuf::new(),
            reserve,
            free: AtomicU64::new(u64::MAX),
            measured_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            low: AtomicBool::new(false),
            peers: Mutex::default(),
        }
    }

    fn put() -> Op {
        Op::PutChecked { namespace: "a/b".into(), items: vec![], create: false, approx_min_vectors: 1 }
    }

    #[test]
    fn below_the_reserve_writes_are_refused_and_deletes_are_not() {
        let s = space(1000);
        s.set(5000);
        assert!(s.admit(&put(), &[1], 1).is_ok());
        s.set(999);
        let e = s.admit(&put(), &[1], 1).unwrap_err();
        assert!(matches!(e, ApiError::ResourceExhausted { ref field, .. } if field == "disk"), "{e:?}");
        assert!(s.admit(&Op::DeleteNamespace { namespace: "a/b".into() }, &[1], 1).is_ok());
        assert!(s.admit(&Op::Purge { items: vec![] }, &[1], 1).is_ok());
        // Back above the reserve but within an eighth of it: still refused (no flapping).
        s.set(1100);
        assert!(s.admit(&put(), &[1], 1).is_err());
        s.set(1125);
        assert!(s.admit(&put(), &[1], 1).is_ok());
    }

    #[test]
    fn the_leader_refuses_when_a_majority_of_voters_is_low() {
        let s = space(1000);
        s.set(5000);
        let low = Report { free_bytes: 10, reserve_bytes: 1000, low: true };
        s.heard(2, low);
        assert!(s.admit(&put(), &[1, 2, 3], 1).is_ok(), "one low follower of three: a majority can store");
        s.heard(3, low);
        assert!(s.admit(&put(), &[1, 2, 3], 1).is_err(), "two of three low");
        assert!(s.admit(&put(), &[1, 2, 3, 4, 5], 1).is_ok(), "two of five low");
        // A report that went stale is not used.
        s.peers.lock().unwrap().get_mut(&3).unwrap().at = Instant::now() - REPORT_TTL;
        assert!(s.admit(&put(), &[1, 2, 3], 1).is_ok());
    }

    #[test]
    fn reserve_zero_turns_admission_off_and_the_default_is_bounded() {
        let s = space(0);
        s.set(0);
        assert!(s.admit(&put(), &[1], 1).is_ok());
        assert_eq!(reserve_for(None, 10 << 30), (10u64 << 30) / 20);
        assert_eq!(reserve_for(None, 1 << 40), DEFAULT_RESERVE_BYTES);
        assert_eq!(reserve_for(Some(7), 1 << 40), 7);
    }

    #[test]
    fn a_full_disk_is_recognised_through_error_chains_and_text() {
        let e = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert!(is_disk_full(&e));
        let wrapped = crate::error::StorageError::Io(std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(is_disk_full(&wrapped));
        assert!(!is_disk_full(&std::io::Error::from_raw_os_error(libc::EIO)));
        assert!(mentions_disk_full("fatal: storage error: write logs: No space left on device (os error 28)"));
    }
}
