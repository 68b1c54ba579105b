//! One run: build the network, boot the cluster, run workloads under the nemesis schedule,
//! heal, read everything back from every node, check, and write the outputs:
//!
//! ```text
//! jepsen/store/<run>/
//!   run.json        the options, seed included: `engram-jepsen replay <dir>` reruns it
//!   seed            the seed alone
//!   schedule.json   the nemesis schedule drawn from the seed
//!   history.jsonl   every event, one JSON object per line
//!   results.json    verdicts, anomalies, counts, faults injected
//!   report.html     timeline, latency and throughput plots, nemesis log
//!   n<slot>.log     each node slot's engram output (all its lives)
//! ```

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::checker::{self, Check, Validity};
use crate::cluster::{Cluster, NodeOptions};
use crate::history::{self, Event, Kind, Recorder};
use crate::nemesis::{self, Family, Nemesis};
use crate::net::{self, Net};
use crate::report;
use crate::workload::{self, Ctx, WorkloadOptions};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunOptions {
    pub name: String,
    pub nodes: usize,
    pub time_limit_s: u64,
    pub seed: u64,
    pub nemeses: Vec<Family>,
    /// Mean quiet time and mean fault time of each nemesis stream.
    pub interval_ms: u64,
    pub workload: WorkloadOptions,
    /// The canary: nodes serve reads without the read index. The run must come out invalid.
    pub canary: bool,
    /// The fsync canary: nodes acknowledge log writes before fsyncing them. With the crash
    /// nemesis the run must come out invalid.
    #[serde(default)]
    pub canary_fsync: bool,
    /// Crashes lose every un-fsynced write and never tear them (the fsync canary: with fsync a
    /// no-op, a torn crash leaves redb files no recovery can read, the node rightly refuses
    /// them, and the run ends unknown instead of showing the lost writes).
    #[serde(default)]
    pub crash_lost_only: bool,
    pub snapshot_logs_since_last: u64,
    pub snapshot_keep_logs: u64,
    /// Per-key time budget of the linearizability search.
    pub key_budget_s: u64,
    pub engram: PathBuf,
    pub store: PathBuf,
    pub keep_data: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Results {
    pub name: String,
    pub seed: u64,
    pub valid: Validity,
    pub canary: bool,
    pub nodes: usize,
    pub duration_s: f64,
    pub operations: serde_json::Value,
    pub injected: nemesis::Injected,
    pub checks: Vec<Check>,
    pub dir: PathBuf,
}

/// Runs the whole thing. Must be called on the main thread before any other thread exists:
/// the process moves into the clients' network namespace.
pub fn run(opts: RunOptions) -> Result<Results> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the harness needs root (network namespaces, nftables)");
    }
    if !opts.engram.exists() {
        bail!("no engram binary at {} (build it, or pass --engram)", opts.engram.display());
    }
    net::ensure_tools(opts.nemeses.contains(&Family::Skew), opts.nemeses.contains(&Family::Disk))?;
    let stale = net::sweep_stale();
    if stale > 0 {
        eprintln!("jepsen: removed {stale} stale namespaces of earlier runs");
    }
    let stale = crate::disk::sweep_stale();
    if stale > 0 {
        eprintln!("jepsen: unmounted {stale} stale node disks of earlier runs");
    }
    let stamp = chrono_like_stamp();
    let dir = opts.store.join(format!("{stamp}-{}", opts.name));
    std::fs::create_dir_all(&dir)?;
    let dir = dir.canonicalize()?;
    std::fs::write(dir.join("run.json"), serde_json::to_vec_pretty(&opts)?)?;
    std::fs::write(dir.join("seed"), format!("{}\n", opts.seed))?;
    let latest = opts.store.join("latest");
    let _ = std::fs::remove_file(&latest);
    let _ = std::os::unix::fs::symlink(&dir, &latest);

    catch_interrupts()?;
    CHECKING.store(false, Ordering::SeqCst);
    let net = Net::create(opts.nodes)?;
    let mut guard = net.guard();
    net.enter_client_ns()?;
    let _supervisor = Supervisor::start(net.guard(), Duration::from_secs(opts.time_limit_s + 1200));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let out = rt.block_on(run_async(&opts, net, &dir));
    rt.shutdown_timeout(Duration::from_secs(5));
    guard.teardown();
    let results = out?;
    if results.valid == Validity::Valid && !opts.keep_data {
        let _ = std::fs::remove_dir_all(dir.join("data"));
    }
    Ok(results)
}

/// Each node's disk when the disk nemeses need one: room for a long soak's data, small enough
/// to fill in a moment.
const DISK_BYTES: u64 = 512 << 20;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static CHECKING: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: nix::libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// From here on SIGINT and SIGTERM only raise a flag; the run's [`Supervisor`] acts on it,
/// whatever phase the run is in (booting, workload, final reads, checking).
fn catch_interrupts() -> Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(SigHandler::Handler(on_interrupt), SaFlags::SA_RESTART, SigSet::empty());
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(sig, &action) }.context("installing a signal handler")?;
    }
    Ok(())
}

/// Watches one run from a thread of its own. On SIGINT or SIGTERM it tears the network down
/// (killing every node in it) and exits 130. If the run wedges past `limit` before it
/// reaches checking (checking has its own per-key budgets), it tears down and exits 3
/// rather than hang a CI job. Dropping it ends the watch.
struct Supervisor {
    done: Arc<AtomicBool>,
}

impl Supervisor {
    fn start(mut guard: net::Guard, limit: Duration) -> Supervisor {
        let done = Arc::new(AtomicBool::new(false));
        let watching = done.clone();
        let deadline = Instant::now() + limit;
        std::thread::spawn(move || {
            while !watching.load(Ordering::SeqCst) {
                if INTERRUPTED.load(Ordering::SeqCst) {
                    eprintln!("jepsen: interrupted; tearing down");
                    guard.teardown();
                    crate::disk::sweep_own();
                    std::process::exit(130);
                }
                if !CHECKING.load(Ordering::SeqCst) && Instant::now() > deadline {
                    eprintln!("jepsen: the run exceeded its time limit by 20 minutes; tearing down");
                    guard.teardown();
                    std::process::exit(3);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Supervisor { done }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
    }
}

fn chrono_like_stamp() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    // YYYYMMDDTHHMMSS in UTC, by the civil-from-days algorithm.
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}{m:02}{d:02}T{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

async fn run_async(opts: &RunOptions, net: Net, dir: &Path) -> Result<Results> {
    let started = Instant::now();
    // The canary flag exists only in builds with the `canary` feature: scripts/test.sh makes
    // one, `engram-canary`, beside the normal binary.
    let canary = opts.canary || opts.canary_fsync;
    let engram = if canary { opts.engram.with_file_name("engram-canary") } else { opts.engram.clone() };
    if !engram.exists() {
        anyhow::bail!(
            "{} is missing (the canary needs `cargo build --bin engram --features canary`, copied to engram-canary)",
            engram.display()
        );
    }
    let node_opts = NodeOptions {
        engram,
        faketime: opts.nemeses.contains(&Family::Skew),
        fiu: opts.nemeses.contains(&Family::Disk),
        unsafe_stale_reads: opts.canary,
        unsafe_ack_before_fsync: opts.canary_fsync,
        snapshot_logs_since_last: opts.snapshot_logs_since_last,
        snapshot_keep_logs: opts.snapshot_keep_logs,
        disk_bytes: opts.nemeses.iter().any(|f| f.needs_disks()).then_some(DISK_BYTES),
    };
    let cluster = Arc::new(Cluster::new(dir, net, node_opts)?);
    let outcome = drive(opts, &cluster, dir, started).await;
    cluster.stop_all();
    let keep = opts.keep_data || !matches!(&outcome, Ok(r) if r.valid == Validity::Valid);
    cluster.unmount_disks(keep);
    outcome
}

async fn drive(opts: &RunOptions, cluster: &Arc<Cluster>, dir: &Path, started: Instant) -> Result<Results> {
    let leader = cluster.boot().await.context("booting the cluster")?;
    eprintln!("jepsen[{}]: {} nodes up, leader n{}", opts.name, cluster.len(), leader + 1);
    let rec = Recorder::new(Some(&dir.join("history.jsonl")))?;
    let ctx = Ctx::new(rec.clone(), cluster.len(), &opts.workload);
    workload::setup(&ctx, &opts.workload).await?;
    if opts.canary_fsync {
        make_setup_durable(cluster).await?;
    }

    let run_ms = opts.time_limit_s * 1000;
    let schedule =
        nemesis::schedule(opts.seed, &opts.nemeses, cluster.len(), run_ms, opts.interval_ms, opts.crash_lost_only);
    std::fs::write(dir.join("schedule.json"), serde_json::to_vec_pretty(&schedule)?)?;
    let nem = Nemesis::new(cluster.clone(), ctx.clone(), opts.seed);
    let workers = workload::spawn(&ctx, &opts.workload, opts.seed);
    let streams: Vec<_> = schedule.streams.into_iter().map(|s| tokio::spawn(nem.clone().run_stream(s))).collect();

    tokio::time::sleep(Duration::from_millis(run_ms)).await;
    ctx.stop.store(true, Ordering::Relaxed);
    for s in &streams {
        s.abort();
    }
    eprintln!("jepsen[{}]: workload done; final heal", opts.name);
    nem.heal_all().await;
    for w in workers {
        // A worker finishes its operation in flight; one stuck past this stays open (info).
        let _ = tokio::time::timeout(Duration::from_secs(15), w).await;
    }
    // Let restarted nodes catch up before the final reads (they retry anyway).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let final_from = rec.events().len() as u64;
    eprintln!("jepsen[{}]: final reads from every node", opts.name);
    workload::final_reads(&ctx, &opts.workload).await;
    rec.flush()?;
    eprintln!("jepsen[{}]: ledger verification on every node", opts.name);
    let ledger = checker::ledger::check(cluster).await;
    cluster.stop_all();

    let events = rec.events();
    CHECKING.store(true, Ordering::SeqCst);
    let mut checks = check(&events, &opts.workload, final_from, cluster.len(), Duration::from_secs(opts.key_budget_s));
    checks.push(ledger);
    let injected = nem.injected.lock().unwrap().clone();
    checks.extend(disk_check(opts, &injected));
    finish(opts, dir, &events, checks, injected, started.elapsed())
}

/// The fsync canary fsyncs the log only when a vote is saved, so a crash would lose the
/// cluster's keys and namespaces with everything else, and the run would end unable to
/// authenticate (unknown) rather than with lost acknowledged writes (invalid). One leader
/// transfer after setup saves a vote on every node, making the setup durable.
async fn make_setup_durable(cluster: &Cluster) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let l = cluster.await_leader(Duration::from_secs(10)).await?;
        let to = cluster.node_id((l + 1) % cluster.len());
        let moved = cluster.admin_client_with_timeout(l, Duration::from_secs(5)).admin().transfer_leader(to).await;
        if moved.is_ok() {
            let l2 = cluster.await_leader(Duration::from_secs(10)).await?;
            if cluster.node_id(l2) == to {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("could not transfer leadership after setup: {moved:?}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The disk nemeses' own verdict: a full disk must never make a node exit (without the `disk`
/// family, whose failing fsyncs stop nodes on purpose, any exit a disk-full heal finds is
/// one), and every crash must have been rolled back as drawn.
fn disk_check(opts: &RunOptions, injected: &nemesis::Injected) -> Option<Check> {
    if !opts.nemeses.iter().any(|f| f.needs_disks()) {
        return None;
    }
    let mut c = Check::new("disk");
    c.stat("crash_files_rolled_back", injected.crash_files_rolled_back);
    c.stat("crash_pages_rolled_back", injected.crash_pages_rolled_back);
    c.stat("disk_full_node_exited", injected.disk_full_node_exited);
    if !opts.nemeses.contains(&Family::Disk) && injected.disk_full_node_exited > 0 {
        c.anomaly(format!("{} nodes had exited when their disk-full fault ended", injected.disk_full_node_exited));
    }
    if injected.crash_rollback_failed > 0 {
        c.unknown(format!("{} crash rollbacks failed (see the nemesis log)", injected.crash_rollback_failed));
    }
    Some(c.finish())
}

/// Runs every enabled checker over a history.
pub fn check(events: &[Event], w: &WorkloadOptions, final_from: u64, nodes: usize, key_budget: Duration) -> Vec<Check> {
    let ops = history::pair(events);
    let mut checks = Vec::new();
    if w.register {
        checks.push(checker::register::check(&ops, key_budget));
    }
    if w.set {
        checks.push(checker::set::check(&ops, final_from, nodes));
    }
    if w.search {
        checks.push(checker::search::check(&ops, final_from, nodes));
    }
    if w.dedup {
        checks.push(checker::dedup::check(&ops, final_from, nodes));
    }
    if w.bank {
        checks.push(checker::bank::check(&ops, final_from, nodes, workload::BANK_ACCOUNTS, workload::BANK_INITIAL));
    }
    checks
}

/// The index of the first final read, recovered from a stored history.
pub fn final_from(events: &[Event]) -> u64 {
    events
        .iter()
        .find(|e| matches!(e.process, history::Process::Client(p) if p >= history::FINAL_PROCESSES))
        .map_or(u64::MAX, |e| e.index)
}

pub fn finish(
    opts: &RunOptions,
    dir: &Path,
    events: &[Event],
    checks: Vec<Check>,
    injected: nemesis::Injected,
    took: Duration,
) -> Result<Results> {
    let ops = history::pair(events);
    let count = |k: Kind| ops.iter().filter(|o| o.kind == k).count();
    let operations = serde_json::json!({
        "total": ops.len(),
        "ok": count(Kind::Ok),
        "fail": count(Kind::Fail),
        "info": count(Kind::Info),
    });
    let valid = checks.iter().fold(Validity::Valid, |v, c| v.and(c.valid));
    let results = Results {
        name: opts.name.clone(),
        seed: opts.seed,
        valid,
        canary: opts.canary,
        nodes: opts.nodes,
        duration_s: took.as_secs_f64(),
        operations,
        injected,
        checks,
        dir: dir.to_path_buf(),
    };
    std::fs::write(dir.join("results.json"), serde_json::to_vec_pretty(&results)?)?;
    let summary = serde_json::json!({
        "valid": results.valid,
        "seed": results.seed,
        "nodes": results.nodes,
        "canary": results.canary,
        "canary_fsync": opts.canary_fsync,
        "nemeses": opts.nemeses,
        "duration_s": results.duration_s,
        "operations": results.operations,
        "injected": results.injected,
    });
    let workers = workload::total_workers(&opts.workload) as usize;
    let html = report::html(&format!("Engram jepsen: {}", opts.name), events, &ops, &results.checks, &summary, workers);
    std::fs::write(dir.join("report.html"), html)?;
    Ok(results)
}
