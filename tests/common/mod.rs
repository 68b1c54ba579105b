//! In-process test cluster: real nodes (`server::start`) on 127.0.0.1 with real redb files in
//! temp dirs and real gRPC between them. Fault knobs: stop, restart, add a fresh node.
#![allow(dead_code)]

pub mod process;
pub mod secure;

use std::net::SocketAddr;
use std::time::Duration;

use engram::client::{Client, ClientOptions, RetryPolicy};
use engram::config::Config;
use engram::proto as pb;
use engram::server::{self, NodeHandle};
use openraft::async_runtime::watch::WatchReceiver;
use tempfile::TempDir;

pub struct Slot {
    pub id: u64,
    pub dir: TempDir,
    pub api: SocketAddr,
    pub raft: SocketAddr,
    pub http: SocketAddr,
    pub handle: Option<NodeHandle>,
}

pub struct TestCluster {
    pub slots: Vec<Slot>,
    /// Applied to every node's config (fault and tuning knobs).
    pub tweak: fn(&mut Config),
    /// Certificates and the root key, for a secured cluster (`None`: `--insecure` nodes).
    pub secure: Option<std::sync::Arc<secure::Secure>>,
    /// Every node's at-rest master keyring file (`None`: encryption at rest off).
    pub at_rest_key_file: Option<std::path::PathBuf>,
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("ENGRAM_TEST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

impl TestCluster {
    /// Starts `n` nodes and bootstraps them as one cluster of `n` voters.
    pub async fn start(n: u64) -> TestCluster {
        Self::start_with(n, |_| {}).await
    }

    pub async fn start_with(n: u64, tweak: fn(&mut Config)) -> TestCluster {
        Self::boot(n, tweak, None).await
    }

    /// `n` nodes with certificates (mutual TLS between peers, TLS for clients) and keys: the
    /// cluster is initialized with a root key, which [`client`](Self::client) uses.
    pub async fn start_secure(n: u64) -> TestCluster {
        Self::start_secure_with(n, |_| {}).await
    }

    pub async fn start_secure_with(n: u64, tweak: fn(&mut Config)) -> TestCluster {
        Self::boot(n, tweak, Some(std::sync::Arc::new(secure::Secure::new("test")))).await
    }

    /// A secured cluster whose nodes seal memories at rest under the keyring in `key_file`.
    #[allow(dead_code)]
    pub async fn start_secure_at_rest(n: u64, key_file: std::path::PathBuf, tweak: fn(&mut Config)) -> TestCluster {
        let secure = Some(std::sync::Arc::new(secure::Secure::new("test")));
        Self::boot_with(n, tweak, secure, Some(key_file)).await
    }

    async fn boot(n: u64, tweak: fn(&mut Config), secure: Option<std::sync::Arc<secure::Secure>>) -> TestCluster {
        Self::boot_with(n, tweak, secure, None).await
    }

    async fn boot_with(
        n: u64,
        tweak: fn(&mut Config),
        secure: Option<std::sync::Arc<secure::Secure>>,
        at_rest_key_file: Option<std::path::PathBuf>,
    ) -> TestCluster {
        init_tracing();
        let mut c = TestCluster { slots: vec![], tweak, secure, at_rest_key_file };
        for id in 1..=n {
            c.add_node(id).await;
        }
        let members = c.slots.iter().map(|s| c.node_info(s.id)).collect();
        let first = c.pinned(c.slots[0].id).with_credential(None).unwrap();
        match &c.secure {
            Some(s) => first.admin().init_secure_cluster(members, &s.root).await.unwrap(),
            None => first.admin().init_cluster(members).await.unwrap(),
        }
        c.wait_for_leader().await;
        // The first leader names the cluster from a background task: wait for that entry, so
        // no test sees it land in the middle of what it measures.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while c.running().iter().any(|id| c.handle(*id).reader.cluster_id().unwrap().is_none()) {
            assert!(std::time::Instant::now() < deadline, "the cluster was never named");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        c
    }

    /// A node's config: loopback, test timeouts, certificates when secured, then `tweak`.
    pub fn config(&self, id: u64, data_dir: std::path::PathBuf) -> Config {
        let mut cfg = match &self.secure {
            Some(s) => Config::for_test_secure(id, data_dir, s.node_paths(id)),
            None => Config::for_test(id, data_dir),
        };
        cfg.at_rest_key_file = self.at_rest_key_file.clone();
        (self.tweak)(&mut cfg);
        cfg
    }

    /// The config a restart of stopped node `id` would use (its data dir and addresses), for
    /// a test that starts it itself (and expects a refusal).
    #[allow(dead_code)]
    pub fn restart_config(&self, id: u64) -> Config {
        let slot = self.slot(id);
        let mut cfg = self.config(id, Self::data_dir(slot));
        cfg.listen_api = slot.api;
        cfg.listen_raft = slot.raft;
        cfg.listen_http = slot.http;
        cfg
    }

    /// Connection options for this cluster with `credential` (TLS when secured).
    pub fn options(&self, credential: Option<String>) -> ClientOptions {
        ClientOptions {
            retry: RetryPolicy { max_attempts: 60, timeout: Duration::from_secs(5), ..Default::default() },
            tls: self.secure.as_ref().map(|s| s.client_tls()),
            credential,
            // Most tests write to namespaces they never created.
            create_namespaces: true,
        }
    }

    /// The root key's text, when secured.
    pub fn root_key(&self) -> Option<String> {
        self.secure.as_ref().map(|s| s.root.expose().to_string())
    }

    /// A client over every node with `credential`.
    pub fn client_as(&self, credential: Option<String>) -> Client {
        let eps: Vec<String> = self.slots.iter().map(|s| s.api.to_string()).collect();
        Client::with_options(eps, self.options(credential)).unwrap()
    }

    /// Starts a fresh, uninitialized node (not yet a member).
    pub async fn add_node(&mut self, id: u64) -> &Slot {
        self.add_node_in(id, tempfile::tempdir().unwrap()).await
    }

    /// Starts node `id` on `dir` as it is (a data dir made elsewhere, e.g. an upgrade fixture).
    pub async fn add_node_in(&mut self, id: u64, dir: TempDir) -> &Slot {
        let cfg = self.config(id, dir.path().to_path_buf());
        let handle = server::start(cfg).await.unwrap();
        self.slots.push(Slot {
            id,
            dir,
            api: handle.api_addr,
            raft: handle.raft_addr,
            http: handle.http_addr,
            handle: Some(handle),
        });
        self.slots.last().unwrap()
    }

    pub fn slot(&self, id: u64) -> &Slot {
        self.slots.iter().find(|s| s.id == id).expect("no such node")
    }

    fn slot_mut(&mut self, id: u64) -> &mut Slot {
        self.slots.iter_mut().find(|s| s.id == id).expect("no such node")
    }

    pub fn node_info(&self, id: u64) -> pb::NodeInfo {
        let s = self.slot(id);
        pb::NodeInfo { id, raft_addr: s.raft.to_string(), api_addr: s.api.to_string() }
    }

    pub fn handle(&self, id: u64) -> &NodeHandle {
        self.slot(id).handle.as_ref().expect("node is stopped")
    }

    pub fn running(&self) -> Vec<u64> {
        self.slots.iter().filter(|s| s.handle.is_some()).map(|s| s.id).collect()
    }

    /// An SDK client over every node's address (running or not); the root key when secured.
    pub fn client(&self) -> Client {
        self.client_as(self.root_key())
    }

    /// A client that only ever talks to node `id` (the root key when secured).
    pub fn pinned(&self, id: u64) -> Client {
        self.client().pinned_like(&self.slot(id).api.to_string()).unwrap()
    }

    /// Waits until every running voter agrees on one running leader; returns its id.
    pub async fn wait_for_leader(&self) -> u64 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let leaders: Vec<Option<u64>> = self
                .running()
                .iter()
                .map(|id| {
                    let h = self.handle(*id);
                    let m = h.node.raft.metrics().borrow_watched().clone();
                    m.current_leader
                })
                .collect();
            if let Some(Some(l)) = leaders.first() {
                if leaders.iter().all(|x| *x == Some(*l))
                    && self.running().contains(l)
                    && self.handle(*l).node.is_leader()
                {
                    return *l;
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "no stable leader: {leaders:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the first leader has named the cluster and every running node has applied
    /// everything the leader has: the state is quiet (for before/after comparisons).
    pub async fn settle(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let leader = self.wait_for_leader().await;
            let h = self.handle(leader);
            if h.reader.cluster_id().unwrap().is_some() {
                let applied = h.reader.applied_index().unwrap();
                self.wait_applied(applied).await;
                if self.handle(leader).reader.applied_index().unwrap() == applied {
                    return;
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "the cluster never settled");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every running node has applied at least `index`.
    pub async fn wait_applied(&self, index: u64) {
        for id in self.running() {
            let h = self.handle(id);
            h.node
                .raft
                .wait(Some(Duration::from_secs(20)))
                .applied_index_at_least(Some(index), "test")
                .await
                .unwrap_or_else(|e| panic!("node {id} did not apply {index}: {e}"));
        }
    }

    /// Graceful stop of one node; its data dir and addresses are kept for a restart.
    pub async fn stop(&mut self, id: u64) {
        if let Some(h) = self.slot_mut(id).handle.take() {
            h.shutdown().await;
        }
    }

    /// A new cluster of `n` nodes restored from `backup` (`engram::backup::restore`, one data
    /// dir per member), started without `init`: they elect a leader from the restored state.
    pub async fn restored(
        backup: &std::path::Path,
        n: u64,
        keys: &engram::backup::Keyring,
        tweak: fn(&mut Config),
    ) -> TestCluster {
        Self::restored_with(backup, n, keys, tweak, None).await
    }

    /// [`restored`](Self::restored) with certificates (a restored cluster gets new ones; its
    /// keys and grants come from the backup).
    pub async fn restored_with(
        backup: &std::path::Path,
        n: u64,
        keys: &engram::backup::Keyring,
        tweak: fn(&mut Config),
        secure: Option<std::sync::Arc<secure::Secure>>,
    ) -> TestCluster {
        Self::restored_sealed(backup, n, keys, tweak, secure, None).await.0
    }

    /// [`restored_with`](Self::restored_with) of a backup sealed at rest: `at_rest` is the
    /// nodes' at-rest key file and what the restore needs. Also returns what it left out.
    pub async fn restored_sealed(
        backup: &std::path::Path,
        n: u64,
        keys: &engram::backup::Keyring,
        tweak: fn(&mut Config),
        secure: Option<std::sync::Arc<secure::Secure>>,
        at_rest: Option<(std::path::PathBuf, engram::backup::restore::AtRest)>,
    ) -> (TestCluster, Vec<engram::storage::dump::ErasedNamespace>) {
        init_tracing();
        let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let at_rest_key_file = at_rest.as_ref().map(|(f, _)| f.clone());
        let mut c = TestCluster { slots: vec![], tweak, secure, at_rest_key_file };
        let mut erased = Vec::new();
        for id in 1..=n {
            let dir = tempfile::tempdir().unwrap();
            c.slots.push(Slot { id, dir, api: free(), raft: free(), http: free(), handle: None });
        }
        let members: std::collections::BTreeMap<u64, engram::raft::EngramNode> = c
            .slots
            .iter()
            .map(|s| (s.id, engram::raft::EngramNode { raft_addr: s.raft.to_string(), api_addr: s.api.to_string() }))
            .collect();
        for s in &c.slots {
            let target = engram::backup::restore::RestoreTarget {
                data_dir: s.dir.path().join("data"),
                node_id: s.id,
                members: members.clone(),
                force: false,
                at_rest: at_rest.as_ref().map(|(_, a)| a.clone()),
            };
            erased =
                engram::backup::restore::restore(std::fs::File::open(backup).unwrap(), keys, &target).unwrap().erased;
        }
        for id in 1..=n {
            c.restart(id).await;
        }
        c.wait_for_leader().await;
        (c, erased)
    }

    /// The data dir of a node: restored clusters keep it one level down.
    fn data_dir(slot: &Slot) -> std::path::PathBuf {
        let restored = slot.dir.path().join("data");
        if restored.exists() {
            restored
        } else {
            slot.dir.path().to_path_buf()
        }
    }

    /// Restarts a stopped node from its data dir on its old addresses.
    pub async fn restart(&mut self, id: u64) {
        let mut cfg = self.config(id, Self::data_dir(self.slot(id)));
        let slot = self.slot_mut(id);
        cfg.listen_api = slot.api;
        cfg.listen_raft = slot.raft;
        cfg.listen_http = slot.http;
        slot.handle = Some(Self::start_retrying(cfg).await);
    }

    /// Starts a fresh node `id` (empty data dir, not yet a member) on the addresses of the
    /// stopped node `old`, as an operator replacing a machine would.
    pub async fn replace_at(&mut self, old: u64, id: u64) -> &Slot {
        let (api, raft, http) = {
            let s = self.slot(old);
            assert!(s.handle.is_none(), "node {old} still runs");
            (s.api, s.raft, s.http)
        };
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = self.config(id, dir.path().to_path_buf());
        cfg.listen_api = api;
        cfg.listen_raft = raft;
        cfg.listen_http = http;
        let handle = Self::start_retrying(cfg).await;
        self.slots.push(Slot { id, dir, api, raft, http, handle: Some(handle) });
        self.slots.last().unwrap()
    }

    /// `server::start`, retried while the old listener's ports are still being released.
    async fn start_retrying(cfg: Config) -> NodeHandle {
        let mut tries = 0;
        loop {
            match server::start(cfg.clone()).await {
                Ok(h) => return h,
                Err(e) if tries < 50 => {
                    tries += 1;
                    tracing::warn!("start of node {} failed ({e}), retrying", cfg.node_id);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("start of node {} failed: {e}", cfg.node_id),
            }
        }
    }

    /// State digests of every running node.
    /// Every running node's full state digest, taken once all of them stand at the same applied
    /// index (each index and digest read from one transaction). A follower may apply an entry
    /// before the leader does, and background work (upkeep, reinforcement) keeps proposing, so
    /// digests read at "the leader's index" can describe different states.
    pub async fn digests(&self) -> Vec<(u64, [u8; 32])> {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let seen: Vec<(u64, u64, [u8; 32])> = self
                .running()
                .into_iter()
                .map(|id| {
                    let (applied, digest) = self.handle(id).reader.applied_digest().unwrap();
                    (id, applied, digest)
                })
                .collect();
            if seen.windows(2).all(|w| w[0].1 == w[1].1) {
                return seen.into_iter().map(|(id, _, d)| (id, d)).collect();
            }
            let applied: Vec<(u64, u64)> = seen.iter().map(|&(id, a, _)| (id, a)).collect();
            assert!(std::time::Instant::now() < deadline, "the nodes never stood at one applied index: {applied:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn shutdown(mut self) {
        for id in self.running() {
            self.stop(id).await;
        }
    }
}

pub fn vector(seed: u32, dim: usize) -> Vec<f32> {
    (0..dim).map(|i| ((seed as usize * 31 + i * 7) % 97) as f32 / 97.0).collect()
}

/// A vector of its own for every seed ([`vector`] repeats every 97 seeds), so exact answers
/// have no ties.
pub fn distinct_vector(seed: u32, dim: usize) -> Vec<f32> {
    let mut x = 0x9e3779b97f4a7c15u64 ^ (seed as u64 + 1).wrapping_mul(0xbf58476d1ce4e5b9);
    (0..dim)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}
