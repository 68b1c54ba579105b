//! The nodes under test: real `engram` processes, one per network namespace ("slot").
//!
//! A slot keeps its address for the whole run, but the node in it may change: the
//! membership nemesis removes a node and puts a brand-new one (new id, empty data dir) in its
//! place, so no identity is ever reused.
//!
//! Optional fault injection rides on `LD_PRELOAD`:
//! - libfaketime shifts the wall clock by whatever the slot's timestamp file says, re-read
//!   every call (`FAKETIME_NO_CACHE`), with monotonic time left real
//!   (`FAKETIME_DONT_FAKE_MONOTONIC`: tokio hangs if monotonic time jumps);
//! - libfiu's POSIX preload lets `fiu-ctrl` make `fsync`/`fdatasync` fail with EIO at will.
//!
//! Security is on, as in production: each run makes a cluster CA, every node (fresh ids from
//! the membership nemesis included) gets its certificate from it and speaks mutual TLS to its
//! peers, the cluster is initialized with a root key, and the workload runs under a key
//! whose role may read, write and delete memories but not administer the cluster.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use engram::auth::certs::CertAuthority;
use engram::auth::token::ApiKey;
use engram::client::{Client, ClientOptions, ClientTls, RetryPolicy};
use engram::proto as pb;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::disk::{self, Disks, Rolled};
use crate::net::{self, Net};

pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
const FIU_PRELOAD: [&str; 2] = ["/usr/lib/fiu/fiu_run_preload.so", "/usr/lib/fiu/fiu_posix_preload.so"];

pub const API_PORT: u16 = 7001;
pub const RAFT_PORT: u16 = 7101;
pub const HTTP_PORT: u16 = 7201;

#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub engram: PathBuf,
    pub faketime: bool,
    pub fiu: bool,
    /// The canary: serve reads without the read index.
    pub unsafe_stale_reads: bool,
    /// The fsync canary: acknowledge log writes before they are fsynced.
    pub unsafe_ack_before_fsync: bool,
    /// Bytes of the tmpfs each slot gets for its data (`None`: data on the run's own disk).
    /// The disk-full, crash and slow-disk nemeses need one.
    pub disk_bytes: Option<u64>,
    pub snapshot_logs_since_last: u64,
    pub snapshot_keep_logs: u64,
}

struct Slot {
    node_id: u64,
    child: Option<Child>,
    paused: bool,
}

/// The run's cluster CA and keys.
pub struct Security {
    ca: CertAuthority,
    root: ApiKey,
    certs: PathBuf,
}

/// How every client of this run connects: TLS from the run's CA, and the workload's key once
/// the cluster made it (process-wide: one run per process).
static CLIENT_TLS: OnceLock<ClientTls> = OnceLock::new();
static WORKLOAD_KEY: OnceLock<String> = OnceLock::new();

/// Options for a client of the workload (TLS, the workload key) with `retry`.
pub fn workload_options(retry: RetryPolicy) -> ClientOptions {
    ClientOptions {
        retry,
        tls: CLIENT_TLS.get().cloned(),
        credential: WORKLOAD_KEY.get().cloned(),
        create_namespaces: true,
    }
}

pub struct Cluster {
    pub dir: PathBuf,
    pub net: Net,
    opts: NodeOptions,
    security: Security,
    slots: Vec<Mutex<Slot>>,
    next_id: Mutex<u64>,
    pub disks: Option<Mutex<Disks>>,
}

pub fn api_addr(slot: usize) -> String {
    format!("{}:{API_PORT}", net::node_ip(slot))
}

fn raft_addr(slot: usize) -> String {
    format!("{}:{RAFT_PORT}", net::node_ip(slot))
}

impl Cluster {
    pub fn new(dir: &Path, net: Net, opts: NodeOptions) -> Result<Cluster> {
        let n = net.nodes.len();
        let certs = dir.join("certs");
        std::fs::create_dir_all(&certs)?;
        let ca = CertAuthority::generate("jepsen", 7)?;
        std::fs::write(certs.join("ca.pem"), &ca.cert_pem)?;
        let tls = ClientTls {
            ca_pem: ca.cert_pem.clone().into_bytes(),
            server_name: Some(engram::auth::identity::cluster_dns_name("jepsen")),
            identity: None,
        };
        let _ = CLIENT_TLS.set(tls);
        let disks = match opts.disk_bytes {
            Some(bytes) => Some(Mutex::new(Disks::create(dir, n, bytes)?)),
            None => None,
        };
        let c = Cluster {
            dir: dir.to_path_buf(),
            net,
            opts,
            security: Security { ca, root: ApiKey::generate(), certs },
            slots: (0..n).map(|i| Mutex::new(Slot { node_id: i as u64 + 1, child: None, paused: false })).collect(),
            next_id: Mutex::new(n as u64 + 1),
            disks,
        };
        std::fs::create_dir_all(dir.join("faults"))?;
        for s in 0..n {
            c.set_skew(s, 0)?;
        }
        Ok(c)
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn node_id(&self, slot: usize) -> u64 {
        self.slots[slot].lock().unwrap().node_id
    }

    /// Node `node_id`'s data dir, in `slot`: on the slot's own disk when there are disks.
    fn data_dir(&self, slot: usize, node_id: u64) -> PathBuf {
        match &self.disks {
            Some(d) => d.lock().unwrap().mount_point(slot).join(format!("n{node_id}")),
            None => self.dir.join("data").join(format!("n{node_id}")),
        }
    }

    pub fn log_path(&self, slot: usize) -> PathBuf {
        self.dir.join(format!("n{}.log", slot + 1))
    }

    /// libfaketime's per-slot offset file.
    fn skew_file(&self, slot: usize) -> PathBuf {
        self.dir.join("faults").join(format!("n{}.faketime", slot + 1))
    }

    /// libfiu's control FIFO prefix (the process appends `-<pid>.in` / `.out`).
    fn fiu_fifo(&self, slot: usize) -> PathBuf {
        self.dir.join("faults").join(format!("n{}.fiu", slot + 1))
    }

    /// Starts the slot's node if it is not running.
    pub fn start(&self, slot: usize) -> Result<()> {
        let mut s = self.slots[slot].lock().unwrap();
        if let Some(child) = s.child.as_mut() {
            if child.try_wait()?.is_none() {
                return Ok(());
            }
        }
        let log = OpenOptions::new().create(true).append(true).open(self.log_path(slot))?;
        use std::io::Write;
        writeln!(&log, "==== jepsen: starting node {} in slot {} ====", s.node_id, slot + 1)?;
        let data = self.data_dir(slot, s.node_id);
        let ip = net::node_ip(slot);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.net.nodes[slot]]).arg(&self.opts.engram);
        cmd.arg("--node-id").arg(s.node_id.to_string()).arg("--data-dir").arg(&data);
        cmd.arg("--listen-api").arg(format!("{ip}:{API_PORT}"));
        cmd.arg("--listen-raft").arg(format!("{ip}:{RAFT_PORT}"));
        cmd.arg("--listen-http").arg(format!("{ip}:{HTTP_PORT}"));
        cmd.args(["--heartbeat-interval-ms", "100", "--election-timeout-min-ms", "600"]);
        cmd.args(["--election-timeout-max-ms", "1200", "--read-timeout-ms", "3000"]);
        cmd.arg("--snapshot-logs-since-last").arg(self.opts.snapshot_logs_since_last.to_string());
        cmd.arg("--snapshot-keep-logs").arg(self.opts.snapshot_keep_logs.to_string());
        let (cert, key) = self.node_cert(s.node_id)?;
        cmd.arg("--tls-ca-file").arg(self.security.certs.join("ca.pem"));
        cmd.arg("--tls-cert-file").arg(cert).arg("--tls-key-file").arg(key);
        if self.opts.unsafe_stale_reads {
            cmd.arg("--unsafe-stale-reads");
        }
        if self.opts.unsafe_ack_before_fsync {
            cmd.arg("--unsafe-ack-before-fsync");
        }
        let mut preload = Vec::new();
        if self.opts.faketime {
            preload.push(LIBFAKETIME.to_string());
            cmd.env("FAKETIME_TIMESTAMP_FILE", self.skew_file(slot));
            cmd.env("FAKETIME_NO_CACHE", "1");
            cmd.env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        if self.opts.fiu {
            preload.extend(FIU_PRELOAD.iter().map(|s| s.to_string()));
            cmd.env("FIU_CTRL_FIFO", self.fiu_fifo(slot));
        }
        // After libfiu: a sync it fails never reaches crashfs, so nothing counts as flushed.
        if let Some(d) = &self.disks {
            let d = d.lock().unwrap();
            d.reset_undo(slot)?;
            preload.push(disk::CRASHFS.to_string());
            cmd.env("ENGRAM_CRASH_DEV", d.mount_point(slot));
            cmd.env("ENGRAM_CRASH_UNDO", d.undo_dir(slot));
            cmd.env("ENGRAM_CRASH_CTL", d.fsync_delay_file(slot));
        }
        if !preload.is_empty() {
            cmd.env("LD_PRELOAD", preload.join(" "));
        }
        cmd.env("ENGRAM_LOG", "info,openraft=warn").env("NO_COLOR", "1");
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        s.child = Some(cmd.spawn().context("starting engram")?);
        s.paused = false;
        Ok(())
    }

    /// Node `id`'s certificate files, issued by the run's CA on first use.
    fn node_cert(&self, id: u64) -> Result<(PathBuf, PathBuf)> {
        let cert = self.security.certs.join(format!("node-{id}.pem"));
        let key = self.security.certs.join(format!("node-{id}-key.pem"));
        if !cert.exists() {
            let issued = self.security.ca.issue_node(id, &[], 7)?;
            engram::secrets::write_private(&key, issued.key_pem.as_bytes(), true)?;
            std::fs::write(&cert, &issued.cert_pem)?;
        }
        Ok((cert, key))
    }

    /// `kill -9`. Returns whether a process was running.
    pub fn kill(&self, slot: usize) -> bool {
        let mut s = self.slots[slot].lock().unwrap();
        let Some(mut child) = s.child.take() else { return false };
        let _ = child.kill();
        net::blocking(|| child.wait()).ok();
        s.paused = false;
        true
    }

    /// Power loss: `kill -9`, then what the node wrote since its files' last fsync is undone
    /// (all of it, or with `torn` a random part, page by page) before anything can start it
    /// again. None when no process was running.
    pub fn crash(&self, slot: usize, torn: Option<&mut rand::rngs::StdRng>) -> Result<Option<Rolled>> {
        let Some(disks) = &self.disks else { bail!("crashes need the nodes' own disks") };
        // The slot stays locked until the files are rolled back: a heal of another fault
        // must not start the node on half-undone files.
        let mut s = self.slots[slot].lock().unwrap();
        let Some(mut child) = s.child.take() else { return Ok(None) };
        let _ = child.kill();
        net::blocking(|| child.wait()).ok();
        s.paused = false;
        let rolled = disks.lock().unwrap().rollback(slot, torn)?;
        Ok(Some(rolled))
    }

    pub fn pid(&self, slot: usize) -> Option<i32> {
        let mut s = self.slots[slot].lock().unwrap();
        let child = s.child.as_mut()?;
        match child.try_wait() {
            Ok(None) => Some(child.id() as i32),
            _ => None,
        }
    }

    /// Whether the slot's process has exited on its own (and reaps it).
    pub fn exited(&self, slot: usize) -> Option<std::process::ExitStatus> {
        let mut s = self.slots[slot].lock().unwrap();
        let status = s.child.as_mut()?.try_wait().ok()??;
        s.child = None;
        Some(status)
    }

    pub fn pause(&self, slot: usize) -> bool {
        let Some(pid) = self.pid(slot) else { return false };
        let ok = kill(Pid::from_raw(pid), Signal::SIGSTOP).is_ok();
        self.slots[slot].lock().unwrap().paused = ok;
        ok
    }

    pub fn resume(&self, slot: usize) {
        let mut s = self.slots[slot].lock().unwrap();
        if let Some(child) = s.child.as_ref() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGCONT);
        }
        s.paused = false;
    }

    /// Sets the slot's wall-clock offset in seconds (libfaketime reads it on every call).
    pub fn set_skew(&self, slot: usize, secs: i64) -> Result<()> {
        std::fs::write(self.skew_file(slot), format!("{secs:+}s\n"))?;
        Ok(())
    }

    /// Makes every fsync / fdatasync of the slot's process fail with EIO (or stop failing).
    pub fn fsync_faults(&self, slot: usize, on: bool) -> Result<()> {
        let Some(pid) = self.pid(slot) else { bail!("node in slot {} is not running", slot + 1) };
        // A stopped process cannot answer on its control FIFO.
        if self.slots[slot].lock().unwrap().paused {
            bail!("node in slot {} is paused", slot + 1);
        }
        let cmd = if on {
            "enable name=posix/io/sync/*,failinfo=5" // errno 5: EIO
        } else {
            "disable name=posix/io/sync/*"
        };
        net::sh(&["fiu-ctrl", "-c", cmd, "-f", &self.fiu_fifo(slot).to_string_lossy(), &pid.to_string()])?;
        Ok(())
    }

    /// The membership nemesis's new identity for a slot: a fresh id and an empty data dir.
    pub fn replace_identity(&self, slot: usize) -> u64 {
        let mut next = self.next_id.lock().unwrap();
        let id = *next;
        *next += 1;
        let old = std::mem::replace(&mut self.slots[slot].lock().unwrap().node_id, id);
        // The retired identity's files would only fill the slot's small disk.
        if self.disks.is_some() {
            let _ = std::fs::remove_dir_all(self.data_dir(slot, old));
        }
        id
    }

    pub fn node_info(&self, slot: usize) -> pb::NodeInfo {
        pb::NodeInfo { id: self.node_id(slot), raft_addr: raft_addr(slot), api_addr: api_addr(slot) }
    }

    /// A client for admin calls to one node, no retries.
    pub fn admin_client(&self, slot: usize) -> Client {
        self.admin_client_with_timeout(slot, Duration::from_secs(2))
    }

    pub fn admin_client_with_timeout(&self, slot: usize, timeout: Duration) -> Client {
        let retry = RetryPolicy {
            max_attempts: 1,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(50),
            timeout,
            ..RetryPolicy::default()
        };
        let opts = ClientOptions {
            retry,
            tls: CLIENT_TLS.get().cloned(),
            credential: Some(self.security.root.expose().to_string()),
            create_namespaces: true,
        };
        Client::with_options([api_addr(slot)], opts).expect("valid endpoint")
    }

    /// The slot whose node says it is the leader, asking every running node.
    pub async fn leader(&self) -> Option<usize> {
        for slot in 0..self.len() {
            if self.pid(slot).is_none() {
                continue;
            }
            if let Ok(st) = self.admin_client(slot).admin().status().await {
                if st.leader_id != 0 {
                    if let Some(l) = (0..self.len()).find(|s| self.node_id(*s) == st.leader_id) {
                        return Some(l);
                    }
                }
            }
        }
        None
    }

    /// Waits until some node reports a leader that answers as leader itself.
    pub async fn await_leader(&self, within: Duration) -> Result<usize> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.leader().await {
                if let Ok(st) = self.admin_client(l).admin().status().await {
                    if st.leader_id == self.node_id(l) {
                        return Ok(l);
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("no leader within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Starts every node, initializes the cluster from slot 0 and waits for a leader.
    pub async fn boot(&self) -> Result<usize> {
        for s in 0..self.len() {
            self.start(s)?;
        }
        let members: Vec<pb::NodeInfo> = (0..self.len()).map(|s| self.node_info(s)).collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.admin_client(0).admin().init_secure_cluster(members.clone(), &self.security.root).await {
                Ok(()) => break,
                // A retry after an init that did land.
                Err(e) if matches!(e.code, tonic::Code::FailedPrecondition | tonic::Code::AlreadyExists) => break,
                Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(250)).await,
                Err(e) => bail!("init cluster: {e}"),
            }
        }
        let leader = self.await_leader(Duration::from_secs(30)).await?;
        self.make_workload_key().await?;
        Ok(leader)
    }

    /// A role that may read, write and delete every namespace (not administer), and a key.
    async fn make_workload_key(&self) -> Result<()> {
        if WORKLOAD_KEY.get().is_some() {
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let attempt = async {
                let l = self.await_leader(Duration::from_secs(10)).await?;
                let auth = self.admin_client_with_timeout(l, Duration::from_secs(5));
                let auth = auth.auth();
                match auth.create_role("workload").await {
                    Ok(_) => {}
                    Err(e) if e.code == tonic::Code::AlreadyExists => {}
                    Err(e) => bail!("create role: {e}"),
                }
                auth.grant("workload", "*", &["read", "write", "delete"], None).await?;
                // The dedup workload creates its namespaces with a memory policy.
                auth.grant("workload", "dedup/*", &["admin"], None).await?;
                Ok(auth.create_key("jepsen-worker", &["workload"], 0).await?.key)
            };
            match attempt.await {
                Ok(key) => {
                    let _ = WORKLOAD_KEY.set(key);
                    return Ok(());
                }
                Err(e) if Instant::now() < deadline => {
                    eprintln!("jepsen: making the workload key: {e:#}; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Stops everything (kill -9; the run is over) and removes the fault-control files.
    pub fn stop_all(&self) {
        for s in 0..self.len() {
            self.resume(s);
            self.kill(s);
        }
        let _ = std::fs::remove_dir_all(self.dir.join("faults"));
    }

    /// Unmounts the nodes' disks (after [`Cluster::stop_all`]); `keep` copies their files out
    /// first.
    pub fn unmount_disks(&self, keep: bool) {
        if let Some(d) = &self.disks {
            d.lock().unwrap().teardown(keep);
        }
    }
}
