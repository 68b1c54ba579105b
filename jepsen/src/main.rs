//! `engram-jepsen`: run the chaos harness. See jepsen/README.md.
//!
//! Exit codes: 0 valid, 1 invalid, 2 unknown, 3 the harness itself failed.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use engram_jepsen::checker::Validity;
use engram_jepsen::nemesis::Family;
use engram_jepsen::run::{self, RunOptions};
use engram_jepsen::workload::WorkloadOptions;

#[derive(Parser)]
#[command(name = "engram-jepsen", about = "Jepsen-style chaos harness for Engram")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// One run with the given options.
    Run(RunArgs),
    /// The CI tier: 3 nodes, register + set + search under partition, kill and pause, then
    /// the canaries (which must be caught). Prints `N passed, N failed`.
    Ci(TierArgs),
    /// The soak tier: 5 nodes, every nemesis overlapping, a low snapshot threshold.
    Soak {
        #[command(flatten)]
        tier: TierArgs,
        /// Seconds of workload.
        #[arg(long, default_value_t = 1800)]
        time_limit: u64,
    },
    /// Rerun a stored run with its seed and options.
    Replay { dir: PathBuf },
    /// Recheck a stored run's history (rewrites its results.json and report.html).
    Check { dir: PathBuf },
}

#[derive(Args, Clone)]
struct TierArgs {
    /// The engram binary [default: next to this one].
    #[arg(long)]
    engram: Option<PathBuf>,
    /// Where runs are stored [default: jepsen/store].
    #[arg(long)]
    store: Option<PathBuf>,
    #[arg(long)]
    seed: Option<u64>,
}

#[derive(Args, Clone)]
struct RunArgs {
    #[command(flatten)]
    tier: TierArgs,
    #[arg(long, default_value = "run")]
    name: String,
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Seconds of workload.
    #[arg(long, default_value_t = 60)]
    time_limit: u64,
    /// Fault families, comma-separated (all: every one).
    #[arg(long, value_delimiter = ',', default_value = "partition,kill,pause")]
    nemesis: Vec<String>,
    /// Mean quiet and mean fault time of each nemesis stream, ms.
    #[arg(long, default_value_t = 6000)]
    interval_ms: u64,
    /// Workloads, comma-separated: register, set, search, dedup, bank.
    #[arg(long, value_delimiter = ',', default_value = "register,set,search,dedup,bank")]
    workload: Vec<String>,
    /// Start the nodes with --unsafe-stale-reads. The run must come out invalid.
    #[arg(long)]
    canary: bool,
    /// Start the nodes with --unsafe-ack-before-fsync. With the crash nemesis the run must
    /// come out invalid.
    #[arg(long)]
    canary_fsync: bool,
    /// Crashes lose every un-fsynced write, never tear them.
    #[arg(long)]
    crash_lost_only: bool,
    #[arg(long, default_value_t = 5000)]
    snapshot_logs_since_last: u64,
    #[arg(long, default_value_t = 1000)]
    snapshot_keep_logs: u64,
    /// Register groups (3 workers each, one key at a time per group).
    #[arg(long, default_value_t = 2)]
    register_groups: usize,
    #[arg(long, default_value_t = 2)]
    set_workers: usize,
    #[arg(long, default_value_t = 2)]
    search_workers: usize,
    /// Workers adding the same memories concurrently (one key at a time, all of them).
    #[arg(long, default_value_t = 4)]
    dedup_workers: usize,
    /// Workers making transfers between the bank's accounts and reading every balance.
    #[arg(long, default_value_t = 2)]
    bank_workers: usize,
    #[arg(long, default_value_t = 60)]
    ops_per_key: u64,
    /// Mean pause between one worker's operations, ms.
    #[arg(long, default_value_t = 40)]
    think_ms: u64,
    /// Keep node data dirs even when the run is valid.
    #[arg(long)]
    keep_data: bool,
}

fn default_engram() -> PathBuf {
    std::env::current_exe().ok().and_then(|p| p.parent().map(|d| d.join("engram"))).unwrap_or_else(|| "engram".into())
}

fn default_store() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("store")
}

fn random_seed() -> u64 {
    rand::random()
}

impl RunArgs {
    fn options(&self) -> anyhow::Result<RunOptions> {
        let nemeses = if self.nemesis.iter().any(|n| n == "all") {
            Family::all()
        } else {
            self.nemesis
                .iter()
                .filter(|n| !n.is_empty() && n.as_str() != "none")
                .map(|n| {
                    <Family as clap::ValueEnum>::from_str(n, true).map_err(|e| anyhow::anyhow!("nemesis {n:?}: {e}"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?
        };
        let has = |w: &str| self.workload.iter().any(|x| x == w);
        for w in &self.workload {
            if !["register", "set", "search", "dedup", "bank"].contains(&w.as_str()) {
                anyhow::bail!("unknown workload {w:?} (register, set, search, dedup, bank)");
            }
        }
        if self.nodes < 3 || self.nodes > 9 {
            anyhow::bail!("--nodes must be 3..=9");
        }
        Ok(RunOptions {
            name: self.name.clone(),
            nodes: self.nodes,
            time_limit_s: self.time_limit,
            seed: self.tier.seed.unwrap_or_else(random_seed),
            nemeses,
            interval_ms: self.interval_ms,
            workload: WorkloadOptions {
                register: has("register"),
                set: has("set"),
                search: has("search"),
                dedup: has("dedup"),
                dedup_workers: self.dedup_workers,
                bank: has("bank"),
                bank_workers: self.bank_workers,
                register_group: 3,
                register_groups: self.register_groups,
                set_workers: self.set_workers,
                search_workers: self.search_workers,
                ops_per_key: self.ops_per_key,
                set_ops_per_key: 400,
                think_ms: self.think_ms,
            },
            canary: self.canary,
            canary_fsync: self.canary_fsync,
            crash_lost_only: self.crash_lost_only,
            snapshot_logs_since_last: self.snapshot_logs_since_last,
            snapshot_keep_logs: self.snapshot_keep_logs,
            key_budget_s: 20,
            engram: self.tier.engram.clone().unwrap_or_else(default_engram),
            store: self.tier.store.clone().unwrap_or_else(default_store),
            keep_data: self.keep_data,
        })
    }
}

fn run_one(opts: RunOptions) -> i32 {
    let name = opts.name.clone();
    match run::run(opts) {
        Ok(r) => {
            for c in &r.checks {
                println!("  {:<9} {:<8} {}", c.checker, format!("{:?}", c.valid).to_lowercase(), summary(c));
                for a in c.anomalies.iter().take(5).chain(c.unknown.iter().take(5)) {
                    println!("    {a}");
                }
            }
            println!(
                "{name}: {} — {} operations, faults {:?}; report {}",
                format!("{:?}", r.valid).to_lowercase(),
                r.operations["total"],
                r.injected.faults,
                r.dir.join("report.html").display()
            );
            r.valid.exit_code()
        }
        Err(e) => {
            eprintln!("{name}: harness error: {e:#}");
            3
        }
    }
}

fn summary(c: &engram_jepsen::checker::Check) -> String {
    c.stats.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
}

/// Runs each case in a child process of its own (each needs a fresh network namespace for
/// its clients, and a crash in one must not take the tier down) and tallies them.
fn tier(cases: Vec<(String, Vec<String>, i32)>, t: &TierArgs) -> i32 {
    let exe = std::env::current_exe().expect("current exe");
    let (mut passed, mut failed) = (0, 0);
    for (name, args, expect) in cases {
        let started = Instant::now();
        let mut cmd = Command::new(&exe);
        cmd.arg("run").arg("--name").arg(&name).args(&args);
        if let Some(e) = &t.engram {
            cmd.arg("--engram").arg(e);
        }
        if let Some(s) = &t.store {
            cmd.arg("--store").arg(s);
        }
        if let Some(s) = t.seed {
            cmd.arg("--seed").arg(s.to_string());
        }
        let code = cmd.status().map(|s| s.code().unwrap_or(3)).unwrap_or(3);
        let ok = code == expect;
        let want = match expect {
            0 => "valid",
            1 => "invalid (canary)",
            _ => "?",
        };
        println!(
            "case {name}: exit {code}, expected {expect} ({want}) in {:.0} s: {}",
            started.elapsed().as_secs_f64(),
            if ok { "passed" } else { "FAILED" }
        );
        if ok {
            passed += 1;
        } else {
            failed += 1;
        }
    }
    println!("{passed} passed, {failed} failed");
    i32::from(failed > 0)
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::Run(a) => match a.options() {
            Ok(o) => run_one(o),
            Err(e) => {
                eprintln!("engram-jepsen: {e:#}");
                3
            }
        },
        Cmd::Ci(t) => {
            let base = |nem: &str, secs: &str| -> Vec<String> {
                ["--nodes", "3", "--time-limit", secs, "--interval-ms", "5000", "--nemesis", nem]
                    .iter()
                    .map(|s| s.to_string())
                    .collect()
            };
            let mut canary = base("partition", "30");
            canary.push("--canary".into());
            let mut fsync_canary = base("crash", "30");
            fsync_canary.extend(["--canary-fsync".into(), "--crash-lost-only".into()]);
            // The control: the same canary under plain kill -9 loses nothing (the page cache
            // keeps what it wrote), so only the crash nemesis's rollback can catch it.
            let mut fsync_canary_kill = base("kill", "30");
            fsync_canary_kill.push("--canary-fsync".into());
            tier(
                vec![
                    ("ci-partition".into(), base("partition", "40"), 0),
                    ("ci-kill".into(), base("kill", "40"), 0),
                    ("ci-pause".into(), base("pause", "40"), 0),
                    ("ci-disk".into(), base("crash,disk-full,slow-disk", "40"), 0),
                    ("ci-canary".into(), canary, 1),
                    ("ci-fsync-canary-kill".into(), fsync_canary_kill, 0),
                    ("ci-fsync-canary".into(), fsync_canary, 1),
                ],
                &t,
            )
        }
        Cmd::Soak { tier: t, time_limit } => {
            let args: Vec<String> = [
                "--nodes",
                "5",
                "--nemesis",
                "all",
                "--interval-ms",
                "10000",
                "--snapshot-logs-since-last",
                "300",
                "--snapshot-keep-logs",
                "50",
                "--register-groups",
                "3",
                "--think-ms",
                "60",
            ]
            .iter()
            .map(|s| s.to_string())
            .chain(["--time-limit".to_string(), time_limit.to_string()])
            .collect();
            tier(vec![("soak".into(), args, 0)], &t)
        }
        Cmd::Replay { dir } => match std::fs::read(dir.join("run.json"))
            .map_err(anyhow::Error::from)
            .and_then(|b| Ok(serde_json::from_slice::<RunOptions>(&b)?))
        {
            Ok(mut o) => {
                o.name = format!("{}-replay", o.name);
                run_one(o)
            }
            Err(e) => {
                eprintln!("engram-jepsen: {}: {e:#}", dir.display());
                3
            }
        },
        Cmd::Check { dir } => recheck(&dir),
    };
    std::process::exit(code);
}

fn recheck(dir: &std::path::Path) -> i32 {
    let go = || -> anyhow::Result<i32> {
        let opts: RunOptions = serde_json::from_slice(&std::fs::read(dir.join("run.json"))?)?;
        let events = engram_jepsen::history::load(&dir.join("history.jsonl"))?;
        let final_from = run::final_from(&events);
        let checks = run::check(
            &events,
            &opts.workload,
            final_from,
            opts.nodes,
            std::time::Duration::from_secs(opts.key_budget_s),
        );
        let valid = checks.iter().fold(Validity::Valid, |v, c| v.and(c.valid));
        for c in &checks {
            println!("{:<9} {:<8} {}", c.checker, format!("{:?}", c.valid).to_lowercase(), summary(c));
            for a in c.anomalies.iter().chain(&c.unknown) {
                println!("  {a}");
            }
        }
        // Rewrite results.json and report.html; what was injected is only known from the
        // earlier results.
        let old: Option<run::Results> =
            std::fs::read(dir.join("results.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
        let (injected, took) = old.map_or_else(Default::default, |r| (r.injected, r.duration_s));
        run::finish(&opts, dir, &events, checks, injected, std::time::Duration::from_secs_f64(took))?;
        Ok(valid.exit_code())
    };
    go().unwrap_or_else(|e| {
        eprintln!("engram-jepsen: {e:#}");
        3
    })
}
