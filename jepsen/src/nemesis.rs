//! Nemeses: faults injected on a schedule drawn from the run's seed.
//!
//! Each enabled fault family runs as its own stream: quiet for a while, a fault for a while,
//! heal, repeat. Streams run concurrently, so with several families faults overlap (a kill
//! during a partition during clock skew...). The schedule (which fault, on which node, when)
//! depends only on the seed and the options; what the cluster does in response does not
//! change it, so a run can be replayed with the same seed and schedule.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::cluster::Cluster;
use crate::history::{Kind, NemesisTag, Op, Process};
use crate::workload::Ctx;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    /// Network partitions between nodes (leader isolated, majority/minority, ring).
    Partition,
    /// Random packet loss between nodes.
    Loss,
    /// kill -9 a node, restart it later.
    Kill,
    /// SIGSTOP a node, SIGCONT it later.
    Pause,
    /// Remove a voter, replace it with a brand-new node (new id, empty disk).
    Membership,
    /// Shift nodes' wall clocks (libfaketime; monotonic time stays real).
    Skew,
    /// Make fsync/fdatasync fail with EIO (libfiu): the node must stop.
    Disk,
    /// Fill nodes' disks (a tmpfs each): to below the free-space reserve, or to the last byte.
    DiskFull,
    /// Power loss: kill -9 a majority or all nodes and undo what they wrote since their last
    /// fsync, wholly or torn page by page (crash/crashfs.c).
    Crash,
    /// fsync / fdatasync take 20 to 400 ms longer on some nodes.
    SlowDisk,
}

impl Family {
    pub fn all() -> Vec<Family> {
        use Family::*;
        vec![Partition, Loss, Kill, Pause, Membership, Skew, Disk, DiskFull, Crash, SlowDisk]
    }

    /// Whether the family needs each node's data on a filesystem of its own.
    pub fn needs_disks(self) -> bool {
        matches!(self, Family::DiskFull | Family::Crash | Family::SlowDisk)
    }
}

/// One fault, fully decided by the schedule. Node choices are slot numbers, or "the leader
/// at the time" where the fault says so.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "fault", rename_all = "kebab-case")]
pub enum Fault {
    PartitionLeader,
    /// Split into a majority and a minority; `leader_in_majority` picks the side.
    PartitionHalves {
        leader_in_majority: bool,
    },
    /// Each node hears only its ring neighbours.
    PartitionRing,
    Loss {
        pct: u32,
    },
    Kill {
        leader: bool,
        slot: usize,
    },
    Pause {
        leader: bool,
        slot: usize,
    },
    Membership {
        slot: usize,
    },
    Skew {
        slots: Vec<usize>,
        secs: Vec<i64>,
    },
    Disk {
        slot: usize,
    },
    /// `to_last_byte`: fill completely (writes then meet ENOSPC), else to half the reserve.
    DiskFull {
        slots: Vec<usize>,
        to_last_byte: bool,
    },
    Crash {
        slots: Vec<usize>,
        torn: bool,
    },
    SlowDisk {
        slots: Vec<usize>,
        ms: u64,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    pub at_ms: u64,
    pub hold_ms: u64,
    pub fault: Fault,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Schedule {
    pub streams: Vec<Vec<Step>>,
}

/// Draws the schedule for `families` over `run_ms`. `crash_lost_only`: crashes lose every
/// un-fsynced write, never tear them.
pub fn schedule(
    seed: u64,
    families: &[Family],
    nodes: usize,
    run_ms: u64,
    interval_ms: u64,
    crash_lost_only: bool,
) -> Schedule {
    let mut streams = Vec::new();
    for (i, f) in families.iter().enumerate() {
        let mut rng = StdRng::seed_from_u64(seed.wrapping_add(0x5EED * (i as u64 + 1)));
        let mut steps = Vec::new();
        // Let the workload warm up; stagger the streams.
        let mut t = 2000 + rng.random_range(0..interval_ms.max(1));
        loop {
            let hold = rng.random_range(interval_ms / 2..=interval_ms * 3 / 2);
            if t + hold + 1000 > run_ms {
                break;
            }
            let slot = rng.random_range(0..nodes);
            let fault = match f {
                Family::Partition => match rng.random_range(0..if nodes >= 5 { 4 } else { 3 }) {
                    0 => Fault::PartitionLeader,
                    1 => Fault::PartitionHalves { leader_in_majority: true },
                    2 => Fault::PartitionHalves { leader_in_majority: false },
                    _ => Fault::PartitionRing,
                },
                Family::Loss => Fault::Loss { pct: *[5, 20, 40].choose(&mut rng).unwrap() },
                Family::Kill => Fault::Kill { leader: rng.random_bool(0.5), slot },
                Family::Pause => Fault::Pause { leader: rng.random_bool(0.5), slot },
                Family::Membership => Fault::Membership { slot },
                Family::Skew => {
                    let mut slots: Vec<usize> = (0..nodes).collect();
                    slots.shuffle(&mut rng);
                    slots.truncate(rng.random_range(1..=nodes));
                    let secs = slots.iter().map(|_| rng.random_range(-120i64..=120)).collect();
                    Fault::Skew { slots, secs }
                }
                Family::Disk => Fault::Disk { slot },
                Family::DiskFull => {
                    let k = if rng.random_bool(0.5) { 1 } else { nodes / 2 + 1 };
                    Fault::DiskFull { slots: pick(&mut rng, nodes, k), to_last_byte: rng.random_bool(0.5) }
                }
                Family::Crash => {
                    let k = if rng.random_bool(0.5) { nodes } else { nodes / 2 + 1 };
                    let torn = rng.random_bool(0.5);
                    Fault::Crash { slots: pick(&mut rng, nodes, k), torn: torn && !crash_lost_only }
                }
                Family::SlowDisk => {
                    let k = if rng.random_bool(0.5) { 1 } else { nodes };
                    Fault::SlowDisk { slots: pick(&mut rng, nodes, k), ms: *[20, 100, 400].choose(&mut rng).unwrap() }
                }
            };
            steps.push(Step { at_ms: t, hold_ms: hold, fault });
            t += hold + rng.random_range(interval_ms / 2..=interval_ms * 3 / 2);
        }
        streams.push(steps);
    }
    Schedule { streams }
}

/// How slow a crash makes syncs just before it strikes.
const CRASH_SYNC_DELAY_MS: u64 = 100;

/// `k` distinct slots of `nodes`, in ascending order.
fn pick(rng: &mut StdRng, nodes: usize, k: usize) -> Vec<usize> {
    let mut all: Vec<usize> = (0..nodes).collect();
    all.shuffle(rng);
    all.truncate(k);
    all.sort_unstable();
    all
}

/// Counts of what was injected, for results.json.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Injected {
    pub faults: std::collections::BTreeMap<String, u64>,
    /// Disk faults after which the node stopped on its own, and those where it kept running
    /// (no write reached it while the fault held, e.g. it was partitioned or paused).
    pub disk_node_stopped: u64,
    pub disk_node_kept_running: u64,
    pub membership_replaced: u64,
    pub membership_failed: u64,
    /// Membership steps spent finishing what an earlier one left undone (a node that had not
    /// joined, a retired identity still listed).
    #[serde(default)]
    pub membership_repaired: u64,
    /// Crashes: files whose un-fsynced writes were undone, and pages changed back.
    #[serde(default)]
    pub crash_files_rolled_back: u64,
    #[serde(default)]
    pub crash_pages_rolled_back: u64,
    /// Crashes whose rollback failed (the node restarted on everything it wrote).
    #[serde(default)]
    pub crash_rollback_failed: u64,
    /// Disk-full faults after which a filled node had exited (it must not). Only meaningful
    /// without the `disk` (EIO) family, whose nodes exit on purpose.
    #[serde(default)]
    pub disk_full_node_exited: u64,
}

pub struct Nemesis {
    pub cluster: Arc<Cluster>,
    pub ctx: Arc<Ctx>,
    pub injected: std::sync::Mutex<Injected>,
    start: Instant,
    /// Chooses torn pages; seeded from the run, though which pages differ depends on timing.
    tear: std::sync::Mutex<StdRng>,
}

impl Nemesis {
    pub fn new(cluster: Arc<Cluster>, ctx: Arc<Ctx>, seed: u64) -> Arc<Nemesis> {
        Arc::new(Nemesis {
            cluster,
            ctx,
            injected: Default::default(),
            start: Instant::now(),
            tear: std::sync::Mutex::new(StdRng::seed_from_u64(seed ^ 0x7EA4)),
        })
    }

    fn log(&self, kind: Kind, fault: &str, detail: String) {
        self.ctx.rec.record(
            Process::Nemesis(NemesisTag::Nemesis),
            kind,
            Op::Nemesis { fault: fault.into(), detail },
            None,
            None,
        );
    }

    fn count(&self, name: &str) {
        *self.injected.lock().unwrap().faults.entry(name.into()).or_default() += 1;
    }

    /// Runs one stream to its end (or until the run stops).
    pub async fn run_stream(self: Arc<Self>, steps: Vec<Step>) {
        for step in steps {
            let at = self.start + Duration::from_millis(step.at_ms);
            tokio::time::sleep_until(at.into()).await;
            if self.ctx.stop.load(Ordering::Relaxed) {
                return;
            }
            let name = fault_name(&step.fault);
            let mut target = None;
            match self.apply(&step.fault, &mut target).await {
                Ok(Some(detail)) => {
                    self.count(name);
                    self.log(Kind::Invoke, name, detail);
                    tokio::time::sleep(Duration::from_millis(step.hold_ms)).await;
                    let healed = self.heal(&step.fault, target).await;
                    self.log(Kind::Info, name, healed);
                }
                Ok(None) => {}
                Err(e) => self.log(Kind::Info, name, format!("could not inject: {e}")),
            }
        }
    }

    async fn target(&self, leader: bool, slot: usize) -> usize {
        if leader {
            if let Some(l) = self.cluster.leader().await {
                return l;
            }
        }
        slot
    }

    /// Injects a fault; returns what was done, or None when it did not apply. `target` gets
    /// the slot a kill or pause hit (for a crash, a bit set of slots), so the heal undoes
    /// exactly that.
    async fn apply(&self, fault: &Fault, target: &mut Option<usize>) -> Result<Option<String>> {
        let c = &self.cluster;
        let n = c.len();
        Ok(Some(match fault {
            Fault::PartitionLeader => {
                let Some(l) = c.leader().await else { return Ok(None) };
                let others: Vec<usize> = (0..n).filter(|s| *s != l).collect();
                self.partition(&[vec![l], others.clone()])?;
                format!("isolated leader n{}", l + 1)
            }
            Fault::PartitionHalves { leader_in_majority } => {
                let l = c.leader().await.unwrap_or(0);
                let mut rest: Vec<usize> = (0..n).filter(|s| *s != l).collect();
                let minority_size = (n - 1) / 2;
                let (mut majority, mut minority) =
                    if *leader_in_majority { (vec![l], Vec::new()) } else { (Vec::new(), vec![l]) };
                while let Some(s) = rest.pop() {
                    if minority.len() < minority_size {
                        minority.push(s);
                    } else {
                        majority.push(s);
                    }
                }
                self.partition(&[majority.clone(), minority.clone()])?;
                format!("majority {} | minority {}", slots(&majority), slots(&minority))
            }
            Fault::PartitionRing => {
                for s in 0..n {
                    let blocked: Vec<usize> = (0..n).filter(|o| ring_distance(s, *o, n) > 1).collect();
                    c.net.set_blocked(s, &blocked)?;
                }
                "ring: each node hears its two neighbours".into()
            }
            Fault::Loss { pct } => {
                for s in 0..n {
                    c.net.set_loss(s, *pct)?;
                }
                format!("{pct}% packet loss between nodes")
            }
            Fault::Kill { leader, slot } => {
                let s = self.target(*leader, *slot).await;
                if !c.kill(s) {
                    return Ok(None);
                }
                *target = Some(s);
                format!("kill -9 n{}", s + 1)
            }
            Fault::Pause { leader, slot } => {
                let s = self.target(*leader, *slot).await;
                if !c.pause(s) {
                    return Ok(None);
                }
                *target = Some(s);
                format!("SIGSTOP n{}", s + 1)
            }
            Fault::Membership { slot } => return self.replace(*slot).await,
            Fault::Skew { slots: ss, secs } => {
                for (s, d) in ss.iter().zip(secs) {
                    c.set_skew(*s, *d)?;
                }
                let parts: Vec<String> = ss.iter().zip(secs).map(|(s, d)| format!("n{} {d:+}s", s + 1)).collect();
                format!("clock skew {}", parts.join(", "))
            }
            Fault::Disk { slot } => {
                if c.pid(*slot).is_none() {
                    return Ok(None);
                }
                c.fsync_faults(*slot, true)?;
                format!("fsync/fdatasync → EIO on n{}", slot + 1)
            }
            Fault::DiskFull { slots: ss, to_last_byte } => {
                let Some(disks) = &c.disks else { anyhow::bail!("no disks") };
                let disks = disks.lock().unwrap();
                // Half the node's default reserve: writes are refused before they could fail.
                let reserve = engram::storage::space::reserve_for(None, disks.bytes);
                let leave = if *to_last_byte { 0 } else { reserve / 2 };
                let mut parts = Vec::new();
                for s in ss {
                    let free = disks.fill(*s, leave)?;
                    parts.push(format!("n{} {} KiB free", s + 1, free / 1024));
                }
                format!(
                    "disk {} on {}",
                    if *to_last_byte { "full to the last byte" } else { "below the reserve" },
                    parts.join(", ")
                )
            }
            Fault::Crash { slots: ss, torn } => {
                // Power fails while the disks are busy: syncs slowed for a moment first leave
                // more written and not yet flushed for the crash to lose.
                self.crash_syncs(ss, CRASH_SYNC_DELAY_MS);
                tokio::time::sleep(Duration::from_millis(3 * CRASH_SYNC_DELAY_MS)).await;
                let mut parts = Vec::new();
                let mut crashed = Vec::new();
                for s in ss {
                    let mut rng = self.tear.lock().unwrap();
                    let torn_rng: Option<&mut rand::rngs::StdRng> = if *torn { Some(&mut *rng) } else { None };
                    match c.crash(*s, torn_rng) {
                        Ok(Some(rolled)) => {
                            crashed.push(*s);
                            let mut inj = self.injected.lock().unwrap();
                            inj.crash_files_rolled_back += rolled.files;
                            inj.crash_pages_rolled_back += rolled.pages;
                            parts.push(format!("n{}: {rolled}", s + 1));
                        }
                        Ok(None) => {}
                        // Killed, not rolled back: it restarts on what it wrote, as after a kill.
                        Err(e) => {
                            crashed.push(*s);
                            self.injected.lock().unwrap().crash_rollback_failed += 1;
                            parts.push(format!("n{}: ROLLBACK FAILED: {e:#}", s + 1));
                        }
                    }
                }
                self.crash_syncs(ss, 0);
                if crashed.is_empty() {
                    return Ok(None);
                }
                *target = Some(crashed.iter().fold(0, |m, s| m | (1 << s)));
                format!(
                    "power loss on {}, un-fsynced writes {}: {}",
                    slots(&crashed),
                    if *torn { "torn" } else { "lost" },
                    parts.join("; ")
                )
            }
            Fault::SlowDisk { slots: ss, ms } => {
                let Some(disks) = &c.disks else { anyhow::bail!("no disks") };
                let disks = disks.lock().unwrap();
                for s in ss {
                    disks.set_fsync_delay(*s, *ms)?;
                }
                format!("fsync +{ms} ms on {}", slots(ss))
            }
        }))
    }

    /// Sets the crash nemesis's own fsync delay on the slots.
    fn crash_syncs(&self, ss: &[usize], ms: u64) {
        if let Some(disks) = &self.cluster.disks {
            let disks = disks.lock().unwrap();
            for s in ss {
                let _ = disks.set_crash_fsync_delay(*s, ms);
            }
        }
    }

    fn partition(&self, groups: &[Vec<usize>]) -> Result<()> {
        let c = &self.cluster;
        for g in groups {
            let outside: Vec<usize> = (0..c.len()).filter(|s| !g.contains(s)).collect();
            for s in g {
                c.net.set_blocked(*s, &outside)?;
            }
        }
        Ok(())
    }

    /// Undoes a fault; returns what was done.
    async fn heal(&self, fault: &Fault, target: Option<usize>) -> String {
        let c = &self.cluster;
        match fault {
            Fault::PartitionLeader | Fault::PartitionHalves { .. } | Fault::PartitionRing => {
                for s in 0..c.len() {
                    let _ = c.net.set_blocked(s, &[]);
                }
                "partition healed".into()
            }
            Fault::Loss { .. } => {
                for s in 0..c.len() {
                    let _ = c.net.set_loss(s, 0);
                }
                "packet loss healed".into()
            }
            Fault::Kill { .. } => {
                let s = target.expect("a kill that applied has a target");
                match c.start(s) {
                    Ok(()) => format!("restarted n{}", s + 1),
                    Err(e) => format!("restarting n{} failed: {e}", s + 1),
                }
            }
            Fault::Pause { .. } => {
                let s = target.expect("a pause that applied has a target");
                c.resume(s);
                format!("SIGCONT n{}", s + 1)
            }
            // Done (or given up) when it was applied.
            Fault::Membership { .. } => "nothing to heal".into(),
            Fault::Skew { slots: ss, .. } => {
                for s in ss {
                    let _ = c.set_skew(*s, 0);
                }
                "clocks reset".into()
            }
            Fault::Disk { slot } => {
                let stopped = c.exited(*slot).is_some() || c.pid(*slot).is_none();
                {
                    let mut inj = self.injected.lock().unwrap();
                    if stopped {
                        inj.disk_node_stopped += 1;
                    } else {
                        inj.disk_node_kept_running += 1;
                    }
                }
                if !stopped {
                    let _ = c.fsync_faults(*slot, false);
                    // It may have acknowledged nothing since; restart it anyway so every
                    // disk fault ends the same way: a node recovering from its own files.
                    c.kill(*slot);
                }
                let _ = c.start(*slot);
                format!(
                    "n{} {} under failing fsync; restarted",
                    slot + 1,
                    if stopped { "stopped on its own" } else { "was still running" }
                )
            }
            Fault::DiskFull { slots: ss, .. } => {
                let mut parts = Vec::new();
                for s in ss {
                    if let Some(disks) = &c.disks {
                        let _ = disks.lock().unwrap().clear(*s);
                    }
                    // A full disk must be a refusal, never an exit.
                    if let Some(status) = c.exited(*s) {
                        self.injected.lock().unwrap().disk_full_node_exited += 1;
                        parts.push(format!("n{} HAD EXITED ({status}); restarted", s + 1));
                        let _ = c.start(*s);
                    }
                }
                format!(
                    "ballast removed from {}{}",
                    slots(ss),
                    if parts.is_empty() { String::new() } else { format!("; {}", parts.join("; ")) }
                )
            }
            Fault::Crash { .. } => {
                let set = target.expect("a crash that applied has targets");
                let mut parts = Vec::new();
                for s in (0..c.len()).filter(|s| set & (1 << s) != 0) {
                    match c.start(s) {
                        Ok(()) => parts.push(format!("restarted n{}", s + 1)),
                        Err(e) => parts.push(format!("restarting n{} failed: {e}", s + 1)),
                    }
                }
                parts.join("; ")
            }
            Fault::SlowDisk { slots: ss, .. } => {
                if let Some(disks) = &c.disks {
                    let disks = disks.lock().unwrap();
                    for s in ss {
                        let _ = disks.set_fsync_delay(*s, 0);
                    }
                }
                format!("fsync delay removed from {}", slots(ss))
            }
        }
    }

    /// Removes the slot's node from the cluster and replaces it with a new identity.
    async fn replace(&self, slot: usize) -> Result<Option<String>> {
        let c = &self.cluster;
        let Some(l) = c.leader().await else { return Ok(None) };
        let old = c.node_id(slot);
        let admin = c.admin_client(l);
        let st = admin.admin().status().await?;
        // First finish what an earlier step left undone, as an operator would.
        if let Some(done) = self.repair(l, &st).await {
            self.injected.lock().unwrap().membership_repaired += 1;
            return Ok(Some(done));
        }
        // Only when every slot's node is a voter: never shrink below the full cluster twice.
        let voters: Vec<u64> = st.voters.iter().map(|v| v.id).collect();
        if (0..c.len()).any(|s| !voters.contains(&c.node_id(s))) || st.voters.len() != c.len() {
            return Ok(None);
        }
        if l == slot {
            // Removing the leader works in Raft, but let the other families test leader loss.
            return Ok(None);
        }
        // A removal that times out may still land: the old identity is retired either way,
        // and never joins again (the final heal removes it if it is still a member).
        let removed = admin.admin().remove_nodes(vec![old]).await;
        if let Err(e) = &removed {
            if e.outcome == engram::client::WriteOutcome::NotApplied {
                self.injected.lock().unwrap().membership_failed += 1;
                return Err(anyhow::anyhow!("removing node {old}: {e}"));
            }
        }
        c.kill(slot);
        let new = c.replace_identity(slot);
        c.start(slot)?;
        let joined = self.join(slot).await;
        let mut inj = self.injected.lock().unwrap();
        match &joined {
            Ok(()) => inj.membership_replaced += 1,
            Err(_) => inj.membership_failed += 1,
        }
        Ok(Some(match joined {
            Ok(()) => {
                format!("removed node {old} from n{}{}; node {new} joined in its place", slot + 1, maybe(&removed))
            }
            Err(e) => {
                format!("removed node {old} from n{}{}; node {new} not joined yet: {e}", slot + 1, maybe(&removed))
            }
        }))
    }

    /// Adds the slot's (new) node as a learner, waits for it to catch up, promotes it.
    pub async fn join(&self, slot: usize) -> Result<()> {
        let c = &self.cluster;
        let info = c.node_info(slot);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let l = c.leader().await;
            if let Some(l) = l {
                let admin = c.admin_client_with_timeout(l, Duration::from_secs(30));
                let added = admin.admin().add_learner(info.clone(), true).await;
                if added.is_ok() && admin.admin().promote_voters(vec![info.id]).await.is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                anyhow::bail!("node {} could not join within 60 s", info.id);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Makes every slot's node a voter and removes retired identities still listed (a removal
    /// that timed out but landed, or the learner a cut-short joint change leaves behind).
    /// Says what it did, or None when there was nothing to do.
    async fn repair(&self, leader: usize, st: &engram::proto::StatusResponse) -> Option<String> {
        let c = &self.cluster;
        let mut done = Vec::new();
        let voters: Vec<u64> = st.voters.iter().map(|v| v.id).collect();
        for s in 0..c.len() {
            if !voters.contains(&c.node_id(s)) {
                let r = self.join(s).await;
                done.push(format!("n{} (node {}) joined: {r:?}", s + 1, c.node_id(s)));
            }
        }
        let current: Vec<u64> = (0..c.len()).map(|s| c.node_id(s)).collect();
        let mut stale: Vec<u64> = st.voters.iter().chain(&st.learners).map(|v| v.id).collect();
        stale.retain(|id| !current.contains(id));
        if !stale.is_empty() {
            let r =
                c.admin_client_with_timeout(leader, Duration::from_secs(10)).admin().remove_nodes(stale.clone()).await;
            done.push(format!("removed retired nodes {stale:?}: {:?}", r.map(|_| ())));
        }
        (!done.is_empty()).then(|| done.join("; "))
    }

    /// The final heal: network, clocks, processes; then every slot's node a voter again.
    pub async fn heal_all(&self) -> Vec<String> {
        let c = &self.cluster;
        let mut done = Vec::new();
        for s in 0..c.len() {
            let _ = c.net.set_blocked(s, &[]);
            let _ = c.net.set_loss(s, 0);
            let _ = c.set_skew(s, 0);
            c.resume(s);
            // A disk-fault hold cut short by the end of the run leaves failing fsyncs behind.
            let _ = c.fsync_faults(s, false);
            if let Some(disks) = &c.disks {
                let disks = disks.lock().unwrap();
                let _ = disks.clear(s);
                let _ = disks.set_fsync_delay(s, 0);
                let _ = disks.set_crash_fsync_delay(s, 0);
            }
            if c.pid(s).is_none() {
                let _ = c.start(s);
                done.push(format!("started n{}", s + 1));
            }
        }
        if let Ok(l) = c.await_leader(Duration::from_secs(30)).await {
            if let Ok(st) = c.admin_client(l).admin().status().await {
                done.extend(self.repair(l, &st).await);
            }
        }
        self.log(Kind::Info, "final-heal", done.join("; "));
        done
    }
}

fn maybe<T>(r: &Result<T, engram::client::ClientError>) -> &'static str {
    if r.is_ok() {
        ""
    } else {
        " (removal indeterminate)"
    }
}

fn ring_distance(a: usize, b: usize, n: usize) -> usize {
    let d = a.abs_diff(b);
    d.min(n - d)
}

fn slots(v: &[usize]) -> String {
    let names: Vec<String> = v.iter().map(|s| format!("n{}", s + 1)).collect();
    format!("[{}]", names.join(" "))
}

pub fn fault_name(f: &Fault) -> &'static str {
    match f {
        Fault::PartitionLeader => "partition-leader",
        Fault::PartitionHalves { leader_in_majority: true } => "partition-majority-with-leader",
        Fault::PartitionHalves { leader_in_majority: false } => "partition-minority-with-leader",
        Fault::PartitionRing => "partition-ring",
        Fault::Loss { .. } => "packet-loss",
        Fault::Kill { .. } => "kill",
        Fault::Pause { .. } => "pause",
        Fault::Membership { .. } => "membership",
        Fault::Skew { .. } => "clock-skew",
        Fault::Disk { .. } => "disk-eio",
        Fault::DiskFull { to_last_byte: false, .. } => "disk-full-reserve",
        Fault::DiskFull { to_last_byte: true, .. } => "disk-full-enospc",
        Fault::Crash { torn: false, .. } => "crash-lost-writes",
        Fault::Crash { torn: true, .. } => "crash-torn-writes",
        Fault::SlowDisk { .. } => "slow-disk",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_depends_only_on_the_seed() {
        let a = serde_json::to_string(&schedule(7, &Family::all(), 5, 120_000, 8000, false)).unwrap();
        let b = serde_json::to_string(&schedule(7, &Family::all(), 5, 120_000, 8000, false)).unwrap();
        let c = serde_json::to_string(&schedule(8, &Family::all(), 5, 120_000, 8000, false)).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let s = schedule(7, &[Family::Kill], 3, 60_000, 5000, false);
        assert!(!s.streams[0].is_empty());
        assert!(s.streams[0].iter().all(|st| st.at_ms + st.hold_ms < 60_000));
        assert!(s.streams[0].windows(2).all(|w| w[0].at_ms + w[0].hold_ms < w[1].at_ms));
    }

    #[test]
    fn a_ring_keeps_only_neighbours() {
        assert_eq!(ring_distance(0, 4, 5), 1);
        assert_eq!(ring_distance(0, 2, 5), 2);
        assert_eq!(ring_distance(1, 3, 5), 2);
    }
}
