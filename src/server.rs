//! An embeddable Engram node. [`start`] binds the three listeners, opens storage, starts Raft
//! and the services, and returns a [`NodeHandle`]; [`run`] does the same and waits for a
//! shutdown signal. The `engram` binary and the in-process test clusters both use it.
//!
//! Listeners: client/admin gRPC (with health and reflection), peer Raft gRPC, HTTP. Both gRPC
//! listeners run the accept loop of [`crate::transport`] (connection limit, handshake and idle
//! deadlines, TLS) and an auth layer ([`crate::auth::layer`]): keys or JWTs on the API port,
//! the cluster certificate on the peer port. SIGHUP (or [`NodeHandle::reload_tls`]) reloads
//! the certificates.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Server;

use crate::api::admin_service::BackupContext;
use crate::api::{AdminApi, AuthApi, MemoryApi};
use crate::auth::jwt::JwtVerifier;
use crate::auth::layer::{ApiAuth, ApiAuthLayer, PeerAuthLayer};
use crate::auth::limits::RateLimits;
use crate::backup::schedule::{self, BackupStatus, Schedule};
use crate::config::Config;
use crate::error::ServerError;
use crate::memory::Limits;
use crate::proto::admin_service_server::AdminServiceServer;
use crate::proto::auth_service_server::AuthServiceServer;
use crate::proto::memory_service_server::MemoryServiceServer;
use crate::proto::raft_service_server::RaftServiceServer;
use crate::raft::network::{Network, MAX_PEER_MESSAGE_BYTES};
use crate::raft::service::PeerService;
use crate::raft::{Command, EngramNode, LogStore, Op, Raft, RaftNode, StateMachineStore};
use crate::storage::StateReader;
use crate::transport::NodeTls;
use crate::vector::VectorOptions;

/// Largest client request. AppendEntries carry at most `network::MAX_APPEND_BYTES` of entries,
/// or one entry, so a peer message stays under `network::MAX_PEER_MESSAGE_BYTES`.
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;

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
    /// Certificates (`None` on an `--insecure` node).
    pub tls: Option<Arc<NodeTls>>,
    state: StateMachineStore,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl NodeHandle {
    /// The addresses this node announces to the cluster.
    pub fn engram_node(&self) -> EngramNode {
        EngramNode { raft_addr: self.raft_addr.to_string(), api_addr: self.api_addr.to_string() }
    }

    /// Re-reads the certificate files (what SIGHUP does); on error the old ones stay in use.
    pub fn reload_tls(&self) -> Result<(), crate::transport::tls::TlsError> {
        match &self.tls {
            Some(t) => t.reload(),
            None => Ok(()),
        }
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
        // Snapshots follow `raft::compaction::SnapshotPace` (entries and memories written).
        snapshot_policy: openraft::SnapshotPolicy::Never,
        // Purging follows `raft::compaction`, which also keeps what lagging followers need.
        max_in_snapshot_log_to_keep: u64::MAX,
        install_snapshot_timeout: 30_000,
        max_payload_entries: crate::raft::guard::MAX_PAYLOAD_ENTRIES,
        // A node that cannot win (just restarted, partitioned, behind) asks first instead of
        // bumping its term: with short election timeouts it would otherwise depose a healthy
        // leader whenever it misses a few heartbeats.
        enable_pre_vote: Some(true),
        ..Default::default()
    };
    Ok(Arc::new(rc.validate().map_err(|e| ServerError::Config(e.to_string()))?))
}

/// Makes the data dir private (0700) and refuses one that belongs to another node id.
fn check_identity(c: &Config) -> Result<(), ServerError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&c.data_dir)?;
    std::fs::set_permissions(&c.data_dir, std::fs::Permissions::from_mode(0o700))?;
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
            crate::secrets::write_private(&path, c.node_id.to_string().as_bytes(), false)?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// The storage files are the node's data: no one else reads them (the process umask covers
/// files created later; `engram` sets 077).
fn private_files(dir: &std::path::Path) -> Result<(), ServerError> {
    use std::os::unix::fs::PermissionsExt;
    for name in ["raft-log.redb", "state.redb"] {
        let p = dir.join(name);
        if p.exists() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(())
}

fn listener_limits(c: &Config) -> crate::transport::Limits {
    crate::transport::Limits {
        max_connections: c.max_connections,
        handshake_timeout: Duration::from_millis(c.handshake_timeout_ms),
        idle_timeout: Duration::from_millis(c.idle_timeout_ms),
    }
}

/// Starts a node and returns once its listeners are bound and Raft is running.
pub async fn start(config: Config) -> Result<NodeHandle, ServerError> {
    config.validate()?;
    check_identity(&config)?;
    let space = crate::storage::space::Space::new(&config.data_dir, config.disk_reserve_bytes)?;
    crate::http::prometheus();
    crate::http::label_namespaces(&config.metrics_namespaces);
    let tls = match &config.tls {
        Some(paths) => Some(Arc::new(
            NodeTls::load(paths.clone(), config.node_id).map_err(|e| ServerError::Config(format!("TLS: {e}")))?,
        )),
        None => {
            tracing::warn!(
                node = config.node_id,
                "--insecure: plaintext listeners and NO authentication; every caller may do everything"
            );
            None
        }
    };
    let api_listener = TcpListener::bind(config.listen_api).await?;
    let raft_listener = TcpListener::bind(config.listen_raft).await?;
    let http_listener = TcpListener::bind(config.listen_http).await?;
    let (api_addr, raft_addr, http_addr) =
        (api_listener.local_addr()?, raft_listener.local_addr()?, http_listener.local_addr()?);
    let me = EngramNode {
        raft_addr: config.advertise_raft.clone().unwrap_or_else(|| raft_addr.to_string()),
        api_addr: config.advertise_api.clone().unwrap_or_else(|| api_addr.to_string()),
    };

    // Both files are checked before either is opened for writing: a node that cannot read one
    // leaves the other as it was too.
    let (log_path, state_path) = (config.data_dir.join("raft-log.redb"), config.data_dir.join("state.redb"));
    // A damaged file (a flipped byte in a page, a truncation) is refused naming the file.
    use crate::storage::format::{readable, verify_pages, LOG_FORMAT, STATE_FORMAT};
    readable(&log_path, || crate::storage::format::refuse_newer(&log_path, LOG_FORMAT))?;
    readable(&state_path, || crate::storage::format::refuse_newer(&state_path, STATE_FORMAT))?;
    // Encryption at rest: the master keyring (or none). Every data key of the state must open
    // with it, checked read-only before either file is opened for writing.
    let vault = crate::storage::vault::Vault::from_config(config.at_rest_key_file.as_deref())
        .map_err(|e| ServerError::Config(e.to_string()))?;
    readable(&state_path, || crate::storage::vault::check_state(&state_path, &vault))?;
    // Every read-only check passed: now every page of both files (this may write redb's own
    // bookkeeping, so it comes after the checks that may refuse).
    verify_pages(&log_path)?;
    verify_pages(&state_path)?;
    // The fsync canary also leaves the state machine unsynced between snapshots: a state
    // machine ahead of its log after a power loss is refused by openraft at start, and the
    // canary is there to show lost acknowledged writes, not a node that cannot start.
    let state_sync = if cfg!(feature = "canary") && config.unsafe_ack_before_fsync {
        Duration::from_secs(24 * 3600)
    } else {
        Duration::from_millis(config.state_sync_interval_ms)
    };
    let sm = StateMachineStore::open_with(
        &state_path,
        config.data_dir.join("snapshot.bin"),
        state_sync,
        VectorOptions { dir: Some(config.data_dir.join("vectors")), max_part: config.vector_part_max },
        (config.vector_checkpoint_secs > 0).then(|| Duration::from_secs(config.vector_checkpoint_secs)),
        vault.clone(),
    )?;
    #[cfg(feature = "canary")]
    let log_store = if config.unsafe_ack_before_fsync {
        tracing::warn!(node = config.node_id, "--unsafe-ack-before-fsync: log writes are acknowledged unsynced");
        LogStore::open_ack_before_fsync(&log_path)?
    } else {
        LogStore::open(&log_path)?
    };
    #[cfg(not(feature = "canary"))]
    let log_store = LogStore::open(&log_path)?;
    let reader = StateReader::with_vault(sm.database(), vault.clone());
    // Vector shards start from their index files or the state on disk; entries Raft re-applies
    // update them after.
    let vectors = sm.vectors();
    {
        let (sm, log) = (sm.clone(), log_store.clone());
        tokio::task::spawn_blocking(move || sm.open_vectors(&log)).await.map_err(std::io::Error::other)??;
    }
    let state = sm.clone();
    private_files(&config.data_dir)?;
    let log_reader = log_store.clone();
    let marks = sm.marks();
    let raft = Raft::new(config.node_id, raft_config(&config)?, Network::new(tls.clone()), log_store, sm)
        .await
        .map_err(|e| ServerError::Raft(e.to_string()))?;
    let node = RaftNode::new(config.node_id, raft.clone(), Duration::from_millis(config.read_timeout_ms), tls.clone())
        .with_unsafe_stale_reads(config.unsafe_stale_reads)
        .with_vault(vault.clone())
        .with_space(space.clone());
    if config.unsafe_stale_reads {
        tracing::warn!(node = config.node_id, "--unsafe-stale-reads: reads skip the read index and may be stale");
    }
    let limits = Limits {
        max_text_bytes: config.max_text_bytes,
        approx_min_vectors: config.approx_min_vectors as u64,
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
    health_reporter.set_serving::<AuthServiceServer<AuthApi>>().await;
    // Reflection lists what this port serves, never the peer-only RaftService; v1 and the
    // v1alpha that grpcio-reflection clients and older tools still speak.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("engram.v1.MemoryService")
            .with_service_name("engram.v1.AdminService")
            .with_service_name("engram.v1.AuthService")
            .with_service_name("grpc.health.v1.Health")
    };
    let reflection_err = |e: tonic_reflection::server::Error| ServerError::Config(format!("reflection: {e}"));
    let reflection_v1 = reflection().build_v1().map_err(reflection_err)?;
    let reflection_v1alpha = reflection().build_v1alpha().map_err(reflection_err)?;

    let rates = Arc::new(RateLimits::new(config.rates));
    let jwt = config.jwt.as_ref().map(JwtVerifier::load).transpose().map_err(ServerError::Config)?;
    let authorizer = crate::auth::Authorizer::new(reader.clone(), state.auth_generation());
    let auth = Arc::new(ApiAuth::new(!config.insecure, authorizer.clone(), node.clone(), jwt, rates.clone()));
    let reinforcer = Arc::new(crate::upkeep::Reinforcer::default());
    let memory = MemoryServiceServer::new(MemoryApi::new(
        node.clone(),
        reader.clone(),
        vectors.clone(),
        reinforcer.clone(),
        limits,
        crate::api::memory_service::Guards {
            authorizer: authorizer.clone(),
            rates: rates.clone(),
            max_response_bytes: config.max_response_bytes,
        },
    ))
    .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let last_backup = BackupStatus::default();
    let backup = BackupContext {
        db: state.database(),
        reader: reader.clone(),
        key_file: config.backup_key_file.clone(),
        last: last_backup.clone(),
        state_file: config.data_dir.join("state.redb"),
        at_rest_key_file: config.at_rest_key_file.clone(),
    };
    let admin = AdminServiceServer::new(
        AdminApi::new(node.clone(), me, backup, !config.insecure, (log_reader, marks))
            .with_approx_min_vectors(config.approx_min_vectors as u64),
    )
    // A partial restore carries a namespace's rows in one request.
    .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let auth_api = AuthServiceServer::new(AuthApi::new(node.clone(), reader.clone(), authorizer));
    let listen = listener_limits(&config);
    let api_tls = tls.clone().map(|t| Arc::new(move || t.api_acceptor()) as crate::transport::listener::Acceptors);
    let peer_tls = tls.clone().map(|t| Arc::new(move || t.peer_acceptor()) as crate::transport::listener::Acceptors);
    let api_server = Server::builder()
        .layer(crate::telemetry::RpcTraceLayer::api())
        .layer(ApiAuthLayer::new(auth))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(memory)
        .add_service(admin)
        .add_service(auth_api)
        .serve_with_incoming_shutdown(
            crate::transport::listener::incoming(api_listener, "api", listen, api_tls),
            stopped(),
        );

    let peer = RaftServiceServer::new(PeerService::new(
        config.node_id,
        raft.clone(),
        node.barriers(),
        state.snapshot_files(),
        tls.is_some(),
        config.max_snapshot_bytes,
        (state.marks(), vault.clone(), space.clone()),
    ))
    .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES);
    let raft_server = Server::builder()
        .layer(crate::telemetry::RpcTraceLayer::peer())
        .layer(PeerAuthLayer::new(tls.as_ref().map(|t| t.cluster())))
        .add_service(peer)
        .serve_with_incoming_shutdown(
            crate::transport::listener::incoming(raft_listener, "peer", listen, peer_tls),
            stopped(),
        );

    let last_verify = crate::raft::cluster_verify::VerifyStatus::default();
    let http_state = crate::http::HttpState {
        node: node.clone(),
        reader: reader.clone(),
        vectors: vectors.clone(),
        last_backup: last_backup.clone(),
        last_verify: last_verify.clone(),
        cluster_verify_interval_secs: config.cluster_verify_interval_secs,
        backup_interval_secs: config.backup_interval_secs,
        data_dir: config.data_dir.clone(),
    };
    let http_server = axum::serve(http_listener, crate::http::router(http_state)).with_graceful_shutdown(stopped());

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
        state.snapshot_pace(),
        config.snapshot_logs_since_last,
        Duration::from_millis(config.heartbeat_interval_ms * 5),
        stopped(),
    )));
    tasks.push(tokio::spawn(leader_duties(node.clone(), reader.clone(), stopped())));
    tasks.push(tokio::spawn(crate::raft::disk::run(node.clone(), stopped())));
    tasks.push(tokio::spawn(crate::upkeep::run(
        node.clone(),
        reader.clone(),
        reinforcer,
        (Duration::from_millis(config.purge_interval_ms), Duration::from_millis(config.reinforce_flush_ms)),
        crate::upkeep::ArchiveTarget { dir: config.archive_dir.clone(), key_file: config.backup_key_file.clone() },
        stopped(),
    )));
    tasks.push(tokio::spawn(sweep_rate_limits(rates, stopped())));
    if let Some(t) = tls.clone() {
        tasks.push(tokio::spawn(reload_on_sighup(t, stopped())));
    }
    if config.cluster_verify_interval_secs > 0 {
        tasks.push(tokio::spawn(crate::raft::cluster_verify::run(
            node.clone(),
            state.marks(),
            Duration::from_secs(config.cluster_verify_interval_secs),
            last_verify.clone(),
            stopped(),
        )));
    }
    if config.backup_drill_interval_secs > 0 {
        // A drill starts this very binary as its scratch node.
        let bin = std::env::current_exe()?;
        let spec = crate::backup::drill::DrillSpec::new(std::path::PathBuf::new(), bin, config.data_dir.join("drill"));
        tasks.push(tokio::spawn(crate::backup::drill::scheduled(
            (node.clone(), reader.clone()),
            Duration::from_secs(config.backup_drill_interval_secs),
            config.backup_dir.clone(),
            config.backup_key_file.clone(),
            spec,
            last_backup.clone(),
            stopped(),
        )));
    }
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
    let at_rest = vault.active_kek().map(hex::encode).unwrap_or_else(|| "off".into());
    let disk_reserve = space.reserve();
    tracing::info!(node = id, %api_addr, %raft_addr, %http_addr, at_rest, disk_reserve, "engram node started");
    Ok(NodeHandle {
        id,
        api_addr,
        raft_addr,
        http_addr,
        node,
        reader,
        vectors,
        last_backup,
        tls,
        state,
        shutdown,
        tasks,
    })
}

/// Rate-limit buckets that have refilled are forgotten every minute.
async fn sweep_rate_limits(rates: Arc<RateLimits>, stop: impl Future<Output = ()>) {
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => rates.sweep(),
        }
    }
}

/// SIGHUP reloads the certificates.
async fn reload_on_sighup(tls: Arc<NodeTls>, stop: impl Future<Output = ()>) {
    use tokio::signal::unix::{signal, SignalKind};
    tokio::pin!(stop);
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("no SIGHUP handler: certificates reload only through the API");
        return;
    };
    loop {
        tokio::select! {
            _ = &mut stop => return,
            got = hup.recv() => {
                if got.is_none() {
                    return;
                }
                if let Err(e) = tls.reload() {
                    metrics::counter!("engram_tls_reload_failures_total").increment(1);
                    tracing::error!(error = %e, "TLS reload failed; the previous certificates stay in use");
                }
            }
        }
    }
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
            if let Err(e) = node.write(Command::system(Op::SetClusterId { cluster_id })).await {
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
///
/// A full disk is the exception (ENOSPC reached redb although `storage::space` keeps a
/// reserve: a reserve of 0, another process filling the disk). Restarting at once would fail
/// again, on every replica at once: instead the node stays up with its HTTP listener
/// explaining why (`/status` down, `storage.error`), waits until the data dir has its reserve
/// back, and returns [`ServerError::DiskFreed`] so the caller starts it afresh (the `engram`
/// binary re-executes itself: same pid, every file reopened, nothing of the failed run kept).
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    tokio::pin!(shutdown);
    let outcome = match start(config.clone()).await {
        Ok(handle) => serve(handle, &mut shutdown).await,
        Err(e) => Err(e),
    };
    match outcome {
        Err(e) if crate::storage::space::is_disk_full(&e) => {
            metrics::counter!("engram_disk_full_restarts_total").increment(1);
            tracing::error!(
                node = config.node_id,
                error = %e,
                "the disk is full: the node stays up, refuses everything but /status, and starts again when space is freed"
            );
            match wait_for_space(&config, &e.to_string(), &mut shutdown).await? {
                true => Err(ServerError::DiskFreed),
                false => Ok(()),
            }
        }
        other => other,
    }
}

async fn serve(handle: NodeHandle, shutdown: &mut (impl Future<Output = ()> + Unpin)) -> Result<(), ServerError> {
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

/// Serves `/healthz`, `/readyz`, `/status` and `/metrics` saying the disk is full until the data
/// dir has its reserve back (`true`) or `shutdown` resolves (`false`).
async fn wait_for_space(
    config: &Config,
    error: &str,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
) -> Result<bool, ServerError> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let (_, total) = crate::storage::space::statvfs(&config.data_dir)?;
    let reserve = crate::storage::space::reserve_for(config.disk_reserve_bytes, total);
    // Back with the reserve and an eighth (as admission resumes), and never less than 16 MiB:
    // what a start needs to open its files.
    let want = (reserve + reserve / 8).max(16 << 20);
    let dir = config.data_dir.clone();
    let (id, error) = (config.node_id, error.to_string());
    let status = move || {
        let free = crate::storage::space::free_bytes(&dir);
        serde_json::json!({
            "node_id": id,
            "status": "down",
            "raft": {"status": "down", "state": "Stopped"},
            "storage": {
                "status": "down",
                "error": format!("the disk is full; the node starts again once {want} bytes are free: {error}"),
                "free_bytes": free,
                "disk": {"free_bytes": free, "reserve_bytes": reserve, "low": true, "writes": "refused", "low_voters": []},
            },
        })
    };
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { (StatusCode::SERVICE_UNAVAILABLE, "not ready: the disk is full\n") }))
        .route("/status", get(move || async move { (StatusCode::SERVICE_UNAVAILABLE, axum::Json(status())) }))
        .route("/metrics", get(|| async { crate::http::prometheus().render() }));
    let listener = TcpListener::bind(config.listen_http).await?;
    let (stop, stop_rx) = watch::channel(false);
    let server = tokio::spawn(async move {
        let mut rx = stop_rx;
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await;
    });
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let freed = loop {
        tokio::select! {
            _ = &mut *shutdown => break false,
            _ = tick.tick() => {}
        }
        let free = crate::storage::space::free_bytes(&config.data_dir).unwrap_or(0);
        metrics::gauge!("engram_data_dir_free_bytes").set(free as f64);
        if free >= want {
            tracing::info!(node = id, free_bytes = free, "disk space is back: starting again");
            break true;
        }
    };
    let _ = stop.send(true);
    let _ = server.await;
    Ok(freed)
}
