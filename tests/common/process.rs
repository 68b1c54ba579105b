//! A real `engram` process on loopback, for the kill -9 durability test and the cluster load
//! benchmark. `kill9` is SIGKILL: no shutdown hook runs. The log goes to `<data_dir>.log`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub struct EngramProcess {
    pub id: u64,
    pub api: String,
    pub raft: String,
    pub http: String,
    pub data_dir: PathBuf,
    /// Security flags: `--insecure` unless a test gives it certificates instead.
    pub security: Vec<String>,
    /// Heartbeat and election timeouts (ms): fast test values unless set; `None` runs the
    /// node's own defaults.
    pub timing: Option<[u64; 3]>,
    /// More flags, after all the others.
    pub extra: Vec<String>,
    /// Where stderr goes (default `<data_dir>.log`).
    pub log: PathBuf,
    child: Option<Child>,
}

impl EngramProcess {
    pub fn new(id: u64, api: String, raft: String, http: String, data_dir: PathBuf) -> Self {
        EngramProcess {
            id,
            api,
            raft,
            http,
            data_dir: data_dir.clone(),
            security: vec!["--insecure".into()],
            timing: Some([50, 300, 600]),
            extra: Vec::new(),
            log: data_dir.with_extension("log"),
            child: None,
        }
    }

    /// Starts the node from its data dir (fresh or existing) with fast test timeouts.
    pub fn start(&mut self, bin: &Path, state_sync_interval_ms: u64) {
        self.start_with_env(bin, state_sync_interval_ms, &[]);
    }

    /// [`start`](Self::start) with extra environment variables (fault injection preloads).
    pub fn start_with_env(&mut self, bin: &Path, state_sync_interval_ms: u64, env: &[(&str, String)]) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let timing: Vec<String> = match self.timing {
            Some([h, lo, hi]) => {
                ["--heartbeat-interval-ms", &h.to_string(), "--election-timeout-min-ms", &lo.to_string()]
                    .into_iter()
                    .map(String::from)
                    .chain(["--election-timeout-max-ms".to_string(), hi.to_string()])
                    .collect()
            }
            None => Vec::new(),
        };
        let child = Command::new(bin)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .args(["--node-id", &self.id.to_string(), "--data-dir", self.data_dir.to_str().unwrap()])
            .args(&self.security)
            .args(["--listen-api", &self.api, "--listen-raft", &self.raft, "--listen-http", &self.http])
            .args(&timing)
            .args(["--state-sync-interval-ms", &state_sync_interval_ms.to_string()])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start engram");
        self.child = Some(child);
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    #[allow(dead_code)]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The exit status if the process has ended on its own (it is reaped).
    #[allow(dead_code)]
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().unwrap()?;
        self.child = None;
        Some(status)
    }

    /// SIGTERM and wait: a graceful stop (files closed cleanly).
    #[allow(dead_code)]
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        // SAFETY: kill sends a signal to our own child; no memory is involved.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        Some(c.wait().unwrap())
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }
}

impl Drop for EngramProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Three nodes on loopback ports from `base_port` (api, raft, http per node), data under
/// `dir`, initialised as one cluster; returns them and a client of all three once a leader is
/// known.
#[allow(dead_code)]
pub async fn cluster_of_three(
    bin: &Path,
    base_port: u16,
    dir: &Path,
    state_sync_interval_ms: u64,
) -> (Vec<EngramProcess>, engram::client::Client) {
    cluster_of_three_timed(bin, base_port, dir, state_sync_interval_ms, Some([50, 300, 600])).await
}

/// [`cluster_of_three`] with the nodes' heartbeat and election timeouts (`None`: their
/// defaults).
#[allow(dead_code)]
pub async fn cluster_of_three_timed(
    bin: &Path,
    base_port: u16,
    dir: &Path,
    state_sync_interval_ms: u64,
    timing: Option<[u64; 3]>,
) -> (Vec<EngramProcess>, engram::client::Client) {
    let mut procs: Vec<EngramProcess> = (1..=3u64)
        .map(|id| {
            let p = |k: u16| format!("127.0.0.1:{}", base_port + k * 3 + id as u16 - 1);
            EngramProcess::new(id, p(0), p(1), p(2), dir.join(format!("n{id}")))
        })
        .collect();
    for p in procs.iter_mut() {
        p.timing = timing;
        p.start(bin, state_sync_interval_ms);
    }
    let client = init_cluster(&procs).await;
    (procs, client)
}

/// Initialises `procs` (running) as one cluster through the first; a client of all of them
/// once a leader is known.
#[allow(dead_code)]
pub async fn init_cluster(procs: &[EngramProcess]) -> engram::client::Client {
    use engram::client::Client;
    use std::time::Duration;
    let members: Vec<engram::proto::NodeInfo> = procs
        .iter()
        .map(|p| engram::proto::NodeInfo { id: p.id, raft_addr: p.raft.clone(), api_addr: p.api.clone() })
        .collect();
    for attempt in 0.. {
        match Client::new([procs[0].api.clone()]).unwrap().admin().init_cluster(members.clone()).await {
            Ok(_) => break,
            // An earlier attempt initialized it, but its answer was lost (a client timeout
            // on a loaded box): done all the same.
            Err(e) if initialized(&e) => break,
            Err(_) if attempt < 100 => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("cluster init: {e}"),
        }
    }
    let client = Client::new(procs.iter().map(|p| p.api.clone())).unwrap();
    while client.admin().status().await.map(|s| s.leader_id).unwrap_or(0) == 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client
}

/// Whether an `InitCluster` error says the node is already in a cluster (an insecure node
/// answers a second init that way).
#[allow(dead_code)]
pub fn initialized(e: &engram::client::ClientError) -> bool {
    e.message.contains("already belongs to a cluster")
}

/// GET `path` from a node's HTTP listener; the body.
#[allow(dead_code)]
pub async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or(out)
}
