//! An embeddable Engram node. [`start`] binds the three listeners, opens storage, starts Raft
//! and the services, and returns a [`NodeHandle`]; [`run`] does the same and waits for a
//! shutdown signal. The `engram` binary and the in-process test clusters both use it.
//!
//! Listeners: client/admin gRPC (with health and reflection), peer Raft gRPC, HTTP.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;

use crate::api::admin_service::BackupContext;
use crate::api::{AdminApi, MemoryApi};
use crate::backup::schedule::{self, BackupStatus, Schedule};
use crate::config::Config;
use crate::error::ServerError;
use crate::memory::Limits;
use crate::proto::admin_service_server::AdminServiceServer;
use crate::proto::memory_service_server::MemoryServiceServer;
use crate::proto::raft_service_server::RaftServiceServer;
use crate::raft::network::Network;
use crate::raft::service::PeerService;
use crate::raft::{Command, EngramNode, LogStore, Op, Raft, RaftNode, StateMachineStore};
use crate::storage::StateReader;
use crate::vector::VectorOptions;

/// Largest client request. With at most `MAX_PAYLOAD_ENTRIES` entries per AppendEntries,
/// a peer message stays under `MAX_PEER_MESSAGE_BYTES` (bincode and protobuf sizes of an
/// entry are within a few percent of each other).
const MAX_MESSAGE_BYTES: usize = 8 << 20;
const MAX_PAYLOAD_ENTRIES: u64 = 32;
const MAX_PEER_MESSAGE_BYTES: usize = 512 << 20;

/// A running node.
pub struct NodeHandle {
    pub id: u64,
    pub api_addr: SocketAddr,
    pub raft_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub node: RaftNode,
    pub reader: StateReader,
    pub vectors: Arc<crate::vector::VectorStore>,
    /// The outcome of this node's last scheduled backup.
    pub last_backup: BackupStatus,
    state: StateMachineStore,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl NodeHandle {
    /// The addresses this node announces to the cluster.
    pub fn engram_node(&self) -> EngramNode {
        EngramNode { raft_addr: self.raft_addr.to_string(), api_addr: self.api_addr.to_string() }
    }

    /// Graceful stop: listeners close, Raft shuts down, the state machine is fsynced and the
    /// vector shards that changed are written to index files (so the next start loads them),
    /// storage is released.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.node.raft.shutdown().await;
        for t in self.tasks {
            let _ = t.await;
        }
        let state = self.state;
        match tokio::task::spawn_blocking(move || state.checkpoint()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(node = self.id, error = %e, "vector checkpoint at shutdown failed"),
            Err(e) => tracing::warn!(node = self.id, error = %e, "vector checkpoint at shutdown panicked"),
        }
    }
}

fn raft_config(c: &Config) -> Result<Arc<openraft::Config>, ServerError> {
    let rc = openraft::Config {
        cluster_name: "engram".into(),
        heartbeat_interval: c.heartbeat_interval_ms,
        election_timeout_min: c.election_timeout_min_ms,
        election_timeout_max: c.election_timeout_max_ms,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(c.snapshot_logs_since_last),
        // Purging follows `raft::compaction`, which also keeps what lagging followers need.
        max_in_snapshot_log_to_keep: u64::MAX,
        install_snapshot_timeout: 30_000,
        max_payload_entries: MAX_PAYLOAD_ENTRIES,
        ..Default::default()
    };
    Ok(Arc::new(rc.validate().map_err(|e| ServerError::Config(e.to_string()))?))
}

/// Refuses to start on a data dir that belongs to another node id.
fn check_identity(c: &Config) -> Result<(), ServerError> {
    std::fs::create_dir_all(&c.data_dir)?;
    let path = c.data_dir.join("node_id");
    match std::fs::read_to_string(&path) {
        Ok(s) if s.trim() == c.node_id.to_string() => Ok(()),
        Ok(s) => Err(ServerError::Config(format!(
            "data dir {} belongs to node {}, not {}",
            c.data_dir.display(),
            s.trim(),
            c.node_id
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::write(&path, c.node_id.to_string())?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Accepted connections get TCP_NODELAY: without it small responses wait out the peer's
/// delayed ACK (~40 ms per request).
fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Starts a node and returns once its listeners are bound and Raft is running.
pub async fn start(config: Config) -> Result<NodeHandle, ServerError> {
    config.validate()?;
    check_identity(&config)?;
    crate::http::prometheus();
    let api_listener = TcpListener::bind(config.listen_api).await?;
    let raft_listener = TcpListener::bind(config.listen_raft).await?;
    let http_listener = TcpListener::bind(config.listen_http).await?;
    let (api_addr, raft_addr, http_addr) =
        (api_listener.local_addr()?, raft_listener.local_addr()?, http_listener.local_addr()?);
    let me = EngramNode {
        raft_addr: config.advertise_raft.clone().unwrap_or_else(|| raft_addr.to_string()),
        api_addr: config.advertise_api.clone().unwrap_or_else(|| api_addr.to_string()),
    };

    let log_store = LogStore::open(&config.data_dir.join("raft-log.redb"))?;
    let sm = StateMachineStore::open_with(
        &config.data_dir.join("state.redb"),
        config.data_dir.join("snapshot.bin"),
        Duration::from_millis(config.state_sync_interval_ms),
        VectorOptions { dir: Some(config.data_dir.join("vectors")), max_part: config.vector_part_max },
        (config.vector_checkpoint_secs > 0).then(|| Duration::from_secs(config.vector_checkpoint_secs)),
    )?;
    let reader = StateReader::new(sm.database());
    // Vector shards start from their index files or the state on disk; entries Raft re-applies
    // update them after.
    let vectors = sm.vectors();
    {
        let (sm, log) = (sm.clone(), log_store.clone());
        tokio::task::spawn_blocking(move || sm.open_vectors(&log)).await.map_err(std::io::Error::other)??;
    }
    let state = sm.clone();
    let raft = Raft::new(config.node_id, raft_config(&config)?, Network::default(), log_store, sm)
        .await
        .map_err(|e| ServerError::Raft(e.to_string()))?;
    let node = RaftNode::new(config.node_id, raft.clone(), Duration::from_millis(config.read_timeout_ms))
        .with_unsafe_stale_reads(config.unsafe_stale_reads);
    if config.unsafe_stale_reads {
        tracing::warn!(node = config.node_id, "--unsafe-stale-reads: reads skip the read index and may be stale");
    }
    let limits = Limits {
        max_text_bytes: config.max_text_bytes,
        ivf_min_vectors: config.ivf_min_vectors as u64,
        ..Limits::default()
    };

    let (shutdown, shutdown_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = shutdown_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<MemoryServiceServer<MemoryApi>>().await;
    health_reporter.set_serving::<AdminServiceServer<AdminApi>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServerError::Config(format!("reflection: {e}")))?;

    let memory = MemoryServiceServer::new(MemoryApi::new(node.clone(), reader.clone(), vectors.clone(), limits))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let last_backup = BackupStatus::default();
    let backup = BackupContext {
        db: state.database(),
        reader: reader.clone(),
        key_file: config.backup_key_file.clone(),
        last: last_backup.clone(),
    };
    let admin = AdminServiceServer::new(AdminApi::new(node.clone(), me, backup));
    let api_server = Server::builder()
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(memory)
        .add_service(admin)
        .serve_with_incoming_shutdown(incoming(api_listener), stopped());

    let peer = RaftServiceServer::new(PeerService::new(config.node_id, raft.clone(), state.snapshot_files()))
        .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES);
    let raft_server = Server::builder()
        .tcp_nodelay(true)
        .add_service(peer)
        .serve_with_incoming_shutdown(incoming(raft_listener), stopped());

    let http_server = axum::serve(http_listener, crate::http::router(node.clone())).with_graceful_shutdown(stopped());

    let id = config.node_id;
    let tasks = vec![
        tokio::spawn(async move {
            if let Err(e) = api_server.await {
                tracing::error!(node = id, error = %e, "api listener failed");
            }
        }),
        tokio::spawn(async move {
            if let Err(e) = raft_server.await {
                tracing::error!(node = id, error = %e, "raft listener failed");
            }
        }),
        tokio::spawn(async move {
            if let Err(e) = http_server.await {
                tracing::error!(node = id, error = %e, "http listener failed");
            }
        }),
        {
            let node = node.clone();
            let stop = stopped();
            tokio::spawn(async move {
                tokio::select! {
                    _ = crate::http::export_raft_metrics(node) => {}
                    _ = stop => {}
                }
            })
        },
    ];
    let mut tasks = tasks;
    tasks.push(tokio::spawn(crate::raft::compaction::run(
        raft.clone(),
        id,
        config.snapshot_keep_logs,
        config.snapshot_max_lag_logs,
        Duration::from_millis(config.heartbeat_interval_ms * 5),
        stopped(),
    )));
    tasks.push(tokio::spawn(leader_duties(node.clone(), reader.clone(), stopped())));
    if config.backup_interval_secs > 0 {
        let s = Schedule {
            every: Duration::from_secs(config.backup_interval_secs),
            dir: config.backup_dir.clone(),
            keep: config.backup_retention,
            key_file: config.backup_key_file.clone(),
        };
        tasks.push(tokio::spawn(schedule::run(
            node.clone(),
            state.database(),
            reader.clone(),
            s,
            last_backup.clone(),
            stopped(),
        )));
    }
    tracing::info!(node = id, %api_addr, %raft_addr, %http_addr, "engram node started");
    Ok(NodeHandle { id, api_addr, raft_addr, http_addr, node, reader, vectors, last_backup, state, shutdown, tasks })
}

/// One-off chores: the first leader names the cluster (`Op::SetClusterId`); a node whose log
/// is purged past its snapshot (a restored node) builds one, so it can feed new members.
async fn leader_duties(node: RaftNode, reader: StateReader, stop: impl Future<Output = ()>) {
    use openraft::async_runtime::watch::WatchReceiver;
    tokio::pin!(stop);
    let mut snapshot_checked = false;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => {}
        }
        let m = node.raft.metrics().borrow_watched().clone();
        if !snapshot_checked && m.last_applied.is_some() {
            snapshot_checked = true;
            if m.purged.is_some() && m.snapshot < m.purged {
                let _ = node.raft.trigger().snapshot().await;
            }
        }
        let named = match reader.cluster_id() {
            Ok(id) => id.is_some(),
            Err(e) => {
                tracing::error!(error = %e, "reading the cluster id failed");
                return;
            }
        };
        if named && snapshot_checked {
            return;
        }
        if !named && node.is_leader() {
            let cluster_id = *uuid::Builder::from_random_bytes(rand::random()).into_uuid().as_bytes();
            let cmd =
                Command { idempotency_key: None, now_ms: crate::memory::now_ms(), op: Op::SetClusterId { cluster_id } };
            if let Err(e) = node.write(cmd).await {
                tracing::debug!(error = %e, "naming the cluster failed; retrying");
            }
        }
    }
}

/// Runs a node until `shutdown` resolves, then stops it gracefully.
///
/// If Raft stops on its own (a fatal error: the log or state machine failed to write or fsync),
/// the node stops too and returns the error: a node that cannot persist must not carry on
/// serving what it may not have stored.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    let handle = start(config).await?;
    let mut metrics = handle.node.raft.metrics();
    let fatal = async move {
        loop {
            if let Err(f) = &metrics.borrow_watched().running_state {
                return f.to_string();
            }
            if metrics.changed().await.is_err() {
                return "raft stopped".to_string();
            }
        }
    };
    let outcome = tokio::select! {
        _ = shutdown => Ok(()),
        f = fatal => Err(ServerError::Raft(format!("fatal: {f}"))),
    };
    match &outcome {
        Ok(()) => tracing::info!(node = handle.id, "shutting down"),
        Err(e) => tracing::error!(node = handle.id, error = %e, "raft stopped; shutting the node down"),
    }
    handle.shutdown().await;
    outcome
}
