//! Node configuration: command-line flags, each with an `ENGRAM_…` environment variable, and
//! an optional TOML file (`--config`). Precedence: flag/env > file > default. Every duration
//! carries its unit in its name. No secrets live here.
//!
//! ```toml
//! node_id = 1
//! data_dir = "/var/lib/engram"
//! listen_api = "0.0.0.0:7001"        # client + admin gRPC
//! listen_raft = "0.0.0.0:7101"       # peer Raft gRPC
//! listen_http = "0.0.0.0:7201"       # /metrics /healthz /readyz
//! advertise_api = "10.0.0.1:7001"    # what peers and clients are told (default: listen_*)
//! advertise_raft = "10.0.0.1:7101"
//! heartbeat_interval_ms = 50
//! election_timeout_min_ms = 100    # a follower calls an election after the leader's lease
//! election_timeout_max_ms = 200    # (= election_timeout_max_ms) plus a random 100..200 ms
//! snapshot_logs_since_last = 5000  # and writes of half the last snapshot's memories
//! snapshot_keep_logs = 1000
//! snapshot_max_lag_logs = 100000  # the leader keeps log a follower needs, up to this far back
//! backup_dir = "/var/lib/engram/backups"  # scheduled backups (default: <data_dir>/backups)
//! backup_interval_secs = 3600      # the leader takes a backup this often; 0 = never
//! backup_retention = 24            # scheduled backups kept in backup_dir
//! cluster_verify_interval_secs = 3600  # the leader compares every node's state digest; 0 = never
//! backup_drill_interval_secs = 0   # the leader restores its newest backup into a scratch node; 0 = never
//! backup_key_file = "/etc/engram/backup-keys.toml"   # keyring (mode 0600); else ENGRAM_BACKUP_KEY
//! at_rest_key_file = "/etc/engram/at-rest-keys.toml" # encryption at rest (mode 0600); else ENGRAM_AT_REST_KEY
//! state_sync_interval_ms = 100     # 0: fsync the state machine on every apply
//! approx_min_vectors = 10000       # namespaces this large use HNSW shards instead of Flat
//! vector_part_max = 250000         # shard parts searched in parallel hold at most this many
//! vector_checkpoint_secs = 300     # write changed vector shards to index files; 0 = only at shutdown
//! read_timeout_ms = 5000
//! max_text_bytes = 65536
//! log_format = "text"               # or "json"
//! otlp_endpoint = "http://127.0.0.1:4317"   # OpenTelemetry traces (OTLP/gRPC); default off
//! trace_sample_ratio = 0.01         # of new traces; a client's sampled traceparent is followed
//!
//! # Security (docs/security.md). Without these the node refuses to start, unless `insecure`.
//! tls_ca_file = "/etc/engram/ca.pem"           # the cluster CA (engramctl certs init)
//! tls_cert_file = "/etc/engram/node-1.pem"     # node-<id>.<cluster>.engram (engramctl certs node)
//! tls_key_file = "/etc/engram/node-1-key.pem"  # mode 0600
//! api_tls_cert_file = "…"   # optional: another certificate for the API listener (+ api_tls_key_file)
//! api_client_ca_file = "…"  # optional: API clients must present a certificate from this CA
//! insecure = false          # plaintext, no authentication; loopback listeners only
//! jwt_algorithm = "rs256"   # optional JWTs: hs256 | rs256 | eddsa, with jwt_key_file,
//! jwt_key_file = "/etc/engram/idp.pub.pem"     # jwt_issuer, jwt_audience, jwt_roles_claim
//! rate_limit_requests_per_sec_per_principal = 5000   # 0 = off
//! rate_limit_requests_per_sec_per_namespace = 0
//! rate_limit_write_bytes_per_sec_per_principal = 67108864
//! max_connections = 1024          # per listener; more are closed at once
//! handshake_timeout_ms = 10000    # TLS handshake / first bytes
//! idle_timeout_ms = 300000        # a connection silent this long is closed
//! max_response_bytes = 16777216   # search / list responses
//! max_snapshot_bytes = 68719476736
//! disk_reserve_bytes = 1073741824  # below this much free space writes that add data are refused
//!                                  # (default: 1 GiB or 5 % of the filesystem, the smaller; 0 = off)
//! metrics_namespaces = ["acme/user-42"]   # namespaces that get their own metric series
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use serde::{Deserialize, Serialize};

use crate::error::ServerError;

/// Flags and file fields. Everything is optional here; [`NodeArgs::resolve`] fills defaults.
#[derive(Debug, Clone, Default, Parser, Deserialize, Serialize)]
#[command(name = "engram", version, about = "Engram node: a Raft-replicated memory store for AI agents")]
#[serde(deny_unknown_fields)]
pub struct NodeArgs {
    /// TOML config file; flags and env vars override its fields.
    #[arg(long, env = "ENGRAM_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// This node's id (>= 1), unique in the cluster and never reused.
    #[arg(long, env = "ENGRAM_NODE_ID")]
    pub node_id: Option<u64>,
    /// Directory holding the Raft log, state machine and snapshots.
    #[arg(long, env = "ENGRAM_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Client/admin gRPC listener [default: 127.0.0.1:7001].
    #[arg(long, env = "ENGRAM_LISTEN_API")]
    pub listen_api: Option<SocketAddr>,
    /// Peer Raft gRPC listener [default: 127.0.0.1:7101].
    #[arg(long, env = "ENGRAM_LISTEN_RAFT")]
    pub listen_raft: Option<SocketAddr>,
    /// HTTP listener for /metrics, /healthz, /readyz [default: 127.0.0.1:7201].
    #[arg(long, env = "ENGRAM_LISTEN_HTTP")]
    pub listen_http: Option<SocketAddr>,
    /// Client address announced to the cluster [default: the bound listen_api].
    #[arg(long, env = "ENGRAM_ADVERTISE_API")]
    pub advertise_api: Option<String>,
    /// Peer address announced to the cluster [default: the bound listen_raft].
    #[arg(long, env = "ENGRAM_ADVERTISE_RAFT")]
    pub advertise_raft: Option<String>,
    /// Leader heartbeat period [default: 50].
    #[arg(long, env = "ENGRAM_HEARTBEAT_INTERVAL_MS")]
    pub heartbeat_interval_ms: Option<u64>,
    /// Lower bound of the randomized election timeout [default: 100]. A follower that hears
    /// nothing for the leader's lease (election_timeout_max_ms) plus this random timeout
    /// pre-votes, then elects: 300-400 ms of silence by default.
    #[arg(long, env = "ENGRAM_ELECTION_TIMEOUT_MIN_MS")]
    pub election_timeout_min_ms: Option<u64>,
    /// Upper bound of the randomized election timeout, and the leader lease [default: 200].
    #[arg(long, env = "ENGRAM_ELECTION_TIMEOUT_MAX_MS")]
    pub election_timeout_max_ms: Option<u64>,
    /// Take a snapshot after at least this many log entries since the last one, once the
    /// memory writes (or entries) since amount to half the memories in the last snapshot
    /// [default: 5000].
    #[arg(long, env = "ENGRAM_SNAPSHOT_LOGS_SINCE_LAST")]
    pub snapshot_logs_since_last: Option<u64>,
    /// Log entries kept behind the latest snapshot for slow followers [default: 1000].
    #[arg(long, env = "ENGRAM_SNAPSHOT_KEEP_LOGS")]
    pub snapshot_keep_logs: Option<u64>,
    /// The leader keeps log entries a lagging follower still needs, unless it is more than
    /// this many entries behind the latest snapshot (then it gets the snapshot) [default: 100000].
    #[arg(long, env = "ENGRAM_SNAPSHOT_MAX_LAG_LOGS")]
    pub snapshot_max_lag_logs: Option<u64>,
    /// Directory of scheduled backups [default: <data_dir>/backups].
    #[arg(long, env = "ENGRAM_BACKUP_DIR")]
    pub backup_dir: Option<PathBuf>,
    /// The leader writes a backup to backup_dir this often; 0 = never [default: 0].
    #[arg(long, env = "ENGRAM_BACKUP_INTERVAL_SECS")]
    pub backup_interval_secs: Option<u64>,
    /// Scheduled backups kept in backup_dir; older ones are deleted [default: 24].
    #[arg(long, env = "ENGRAM_BACKUP_RETENTION")]
    pub backup_retention: Option<usize>,
    /// The leader puts a mark through the log this often and compares every node's state
    /// digest right after it (`engramctl cluster verify`, in the background); 0 = never
    /// [default: 3600].
    #[arg(long, env = "ENGRAM_CLUSTER_VERIFY_INTERVAL_SECS")]
    pub cluster_verify_interval_secs: Option<u64>,
    /// The leader drills its newest backup in backup_dir this often: restores it into a scratch
    /// node under <data_dir>/drill, checks digests and searches, records RTO and data age in
    /// status and metrics (`engramctl backup drill`); 0 = never [default: 0].
    #[arg(long, env = "ENGRAM_BACKUP_DRILL_INTERVAL_SECS")]
    pub backup_drill_interval_secs: Option<u64>,
    /// Backup keyring file (mode 0600, see `engramctl keys`). Without it the key comes from
    /// ENGRAM_BACKUP_KEY. The key itself never goes in this config.
    #[arg(long, env = "ENGRAM_BACKUP_KEY_FILE")]
    pub backup_key_file: Option<PathBuf>,
    /// Master keyring for encryption at rest (mode 0600, the format of backup keyrings; the
    /// same on every node). Without it the key comes from ENGRAM_AT_REST_KEY; with neither,
    /// memories are stored unsealed. The key itself never goes in this config.
    #[arg(long, env = "ENGRAM_AT_REST_KEY_FILE")]
    pub at_rest_key_file: Option<PathBuf>,
    /// The leader purges expired memories (and applies retention) this often [default: 1000].
    #[arg(long, env = "ENGRAM_PURGE_INTERVAL_MS")]
    pub purge_interval_ms: Option<u64>,
    /// Reinforcement hits are flushed into the log this often [default: 1000].
    #[arg(long, env = "ENGRAM_REINFORCE_FLUSH_MS")]
    pub reinforce_flush_ms: Option<u64>,
    /// Where retention archives go [default: <data_dir>/archives].
    #[arg(long, env = "ENGRAM_ARCHIVE_DIR")]
    pub archive_dir: Option<PathBuf>,
    /// Fsync state-machine applies at most this often; 0 = every apply. The log is always
    /// fsynced before a write is acknowledged, so this trades restart replay for latency
    /// [default: 100].
    #[arg(long, env = "ENGRAM_STATE_SYNC_INTERVAL_MS")]
    pub state_sync_interval_ms: Option<u64>,
    /// Namespaces with at least this many memories use an approximate HNSW shard instead of
    /// an exact Flat one [default: 10000]. Fixed into each namespace when it is created.
    #[arg(long, env = "ENGRAM_APPROX_MIN_VECTORS", alias = "ivf-min-vectors")]
    #[serde(alias = "ivf_min_vectors")]
    pub approx_min_vectors: Option<usize>,
    /// A namespace's shard is split into parts of at most this many memories, searched in
    /// parallel [default: 250000].
    #[arg(long, env = "ENGRAM_VECTOR_PART_MAX")]
    pub vector_part_max: Option<usize>,
    /// Write the vector shards that changed to index files this often, so a restart loads them
    /// instead of rebuilding; 0 = only at shutdown [default: 300].
    #[arg(long, env = "ENGRAM_VECTOR_CHECKPOINT_SECS")]
    pub vector_checkpoint_secs: Option<u64>,
    /// How long a read waits for the local state machine to catch up [default: 5000].
    #[arg(long, env = "ENGRAM_READ_TIMEOUT_MS")]
    pub read_timeout_ms: Option<u64>,
    /// Largest memory text accepted, in bytes [default: 65536].
    #[arg(long, env = "ENGRAM_MAX_TEXT_BYTES")]
    pub max_text_bytes: Option<usize>,
    /// Log format: text or json [default: text].
    #[arg(long, env = "ENGRAM_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Export OpenTelemetry traces over OTLP/gRPC to this collector, http://host:port
    /// (e.g. http://127.0.0.1:4317) [default: off].
    #[arg(long, env = "ENGRAM_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Fraction of new traces kept, 0..=1; a request's own sampled `traceparent` is always
    /// followed. Needs otlp_endpoint [default: 1].
    #[arg(long, env = "ENGRAM_TRACE_SAMPLE_RATIO")]
    pub trace_sample_ratio: Option<f64>,
    /// The cluster CA certificate (PEM). With tls_cert_file and tls_key_file: mutual TLS
    /// between peers, TLS for clients.
    #[arg(long, env = "ENGRAM_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
    /// This node's certificate, naming node-<id>.<cluster>.engram (`engramctl certs node`).
    #[arg(long, env = "ENGRAM_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// This node's private key (mode 0600).
    #[arg(long, env = "ENGRAM_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// Another certificate for the API listener [default: the node certificate].
    #[arg(long, env = "ENGRAM_API_TLS_CERT_FILE")]
    pub api_tls_cert_file: Option<PathBuf>,
    #[arg(long, env = "ENGRAM_API_TLS_KEY_FILE")]
    pub api_tls_key_file: Option<PathBuf>,
    /// API clients must present a certificate signed by this CA.
    #[arg(long, env = "ENGRAM_API_CLIENT_CA_FILE")]
    pub api_client_ca_file: Option<PathBuf>,
    /// Plaintext listeners and no authentication: everyone may do everything. Refused unless
    /// every listener is on loopback. For development and tests only.
    #[arg(long, env = "ENGRAM_INSECURE")]
    #[serde(default)]
    pub insecure: bool,
    /// Accept JWTs signed with this algorithm (with jwt_key_file).
    #[arg(long, env = "ENGRAM_JWT_ALGORITHM")]
    pub jwt_algorithm: Option<crate::auth::jwt::JwtAlgorithm>,
    /// HS256: the shared secret (mode 0600); RS256/EdDSA: the issuer's public key (PEM).
    #[arg(long, env = "ENGRAM_JWT_KEY_FILE")]
    pub jwt_key_file: Option<PathBuf>,
    /// Required `iss` claim.
    #[arg(long, env = "ENGRAM_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim.
    #[arg(long, env = "ENGRAM_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// The claim that lists role names [default: roles].
    #[arg(long, env = "ENGRAM_JWT_ROLES_CLAIM")]
    pub jwt_roles_claim: Option<String>,
    /// Requests per second one principal may make on this node; 0 = unlimited [default: 5000].
    #[arg(long, env = "ENGRAM_RATE_LIMIT_REQUESTS_PER_SEC_PER_PRINCIPAL")]
    pub rate_limit_requests_per_sec_per_principal: Option<u32>,
    /// Requests per second on one namespace on this node; 0 = unlimited [default: 0].
    #[arg(long, env = "ENGRAM_RATE_LIMIT_REQUESTS_PER_SEC_PER_NAMESPACE")]
    pub rate_limit_requests_per_sec_per_namespace: Option<u32>,
    /// Bytes of memories one principal may write per second on this node; 0 = unlimited
    /// [default: 67108864].
    #[arg(long, env = "ENGRAM_RATE_LIMIT_WRITE_BYTES_PER_SEC_PER_PRINCIPAL")]
    pub rate_limit_write_bytes_per_sec_per_principal: Option<u32>,
    /// Open connections per listener; more are closed at once [default: 1024].
    #[arg(long, env = "ENGRAM_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Time for a new connection's TLS handshake (or first bytes) [default: 10000].
    #[arg(long, env = "ENGRAM_HANDSHAKE_TIMEOUT_MS")]
    pub handshake_timeout_ms: Option<u64>,
    /// A connection that sends nothing this long is closed [default: 300000].
    #[arg(long, env = "ENGRAM_IDLE_TIMEOUT_MS")]
    pub idle_timeout_ms: Option<u64>,
    /// Largest search or list response, in bytes [default: 16777216].
    #[arg(long, env = "ENGRAM_MAX_RESPONSE_BYTES")]
    pub max_response_bytes: Option<usize>,
    /// Largest snapshot a peer may send [default: 68719476736].
    #[arg(long, env = "ENGRAM_MAX_SNAPSHOT_BYTES")]
    pub max_snapshot_bytes: Option<u64>,
    /// Free bytes the data dir keeps: below them writes that add data are refused with
    /// RESOURCE_EXHAUSTED until space is freed [default: 1 GiB or 5 % of the filesystem, the
    /// smaller; 0 = off].
    #[arg(long, env = "ENGRAM_DISK_RESERVE_BYTES")]
    pub disk_reserve_bytes: Option<u64>,
    /// Namespaces that get their own metric series (comma separated); all others are counted
    /// together, so metric cardinality stays bounded.
    #[arg(long, env = "ENGRAM_METRICS_NAMESPACES", value_delimiter = ',')]
    pub metrics_namespaces: Option<Vec<String>>,
    /// BREAKS LINEARIZABILITY. Serves every read from local state without the read index.
    /// The chaos harness's canary (jepsen/), which must catch it; only in builds with the
    /// `canary` feature, only as a flag (no env var, no config field).
    #[cfg(feature = "canary")]
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub unsafe_stale_reads: bool,
    /// LOSES ACKNOWLEDGED WRITES AT A POWER LOSS. Every Raft log write but a vote is
    /// acknowledged without an fsync (a process crash loses nothing, a power loss does). The chaos harness's fsync canary, which its crash
    /// nemesis must catch; only in builds with the `canary` feature, only as a flag.
    #[cfg(feature = "canary")]
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub unsafe_ack_before_fsync: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// A complete, validated node configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub node_id: u64,
    pub data_dir: PathBuf,
    pub listen_api: SocketAddr,
    pub listen_raft: SocketAddr,
    pub listen_http: SocketAddr,
    pub advertise_api: Option<String>,
    pub advertise_raft: Option<String>,
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    pub snapshot_logs_since_last: u64,
    pub snapshot_keep_logs: u64,
    pub snapshot_max_lag_logs: u64,
    pub backup_dir: PathBuf,
    pub backup_interval_secs: u64,
    pub backup_retention: usize,
    pub cluster_verify_interval_secs: u64,
    pub backup_drill_interval_secs: u64,
    pub backup_key_file: Option<PathBuf>,
    pub at_rest_key_file: Option<PathBuf>,
    pub purge_interval_ms: u64,
    pub reinforce_flush_ms: u64,
    pub archive_dir: PathBuf,
    pub state_sync_interval_ms: u64,
    pub approx_min_vectors: usize,
    pub vector_part_max: usize,
    pub vector_checkpoint_secs: u64,
    pub read_timeout_ms: u64,
    pub max_text_bytes: usize,
    pub log_format: LogFormat,
    /// OpenTelemetry traces (`None`: off).
    pub tracing: Option<crate::telemetry::TraceSettings>,
    /// Certificates; `None` exactly when `insecure`.
    pub tls: Option<crate::transport::TlsPaths>,
    pub insecure: bool,
    pub jwt: Option<crate::auth::jwt::JwtSettings>,
    pub rates: crate::auth::limits::RateSettings,
    pub max_connections: usize,
    pub handshake_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub max_response_bytes: usize,
    pub max_snapshot_bytes: u64,
    /// `None`: the default rule (`storage::space::reserve_for`).
    pub disk_reserve_bytes: Option<u64>,
    pub metrics_namespaces: Vec<String>,
    /// Test-only canary: reads skip the read index (only with the `canary` feature).
    #[serde(skip)]
    pub unsafe_stale_reads: bool,
    /// Test-only canary: log writes are acknowledged before an fsync (only with the `canary`
    /// feature).
    #[serde(skip)]
    pub unsafe_ack_before_fsync: bool,
}

/// Traces: on with an endpoint; a sample ratio alone is a mistake worth saying.
fn trace_settings(cli: &NodeArgs, file: &NodeArgs) -> Result<Option<crate::telemetry::TraceSettings>, ServerError> {
    let endpoint = cli.otlp_endpoint.clone().or(file.otlp_endpoint.clone());
    let ratio = cli.trace_sample_ratio.or(file.trace_sample_ratio);
    match endpoint {
        None if ratio.is_some() => Err(ServerError::Config("trace_sample_ratio needs otlp_endpoint".into())),
        None => Ok(None),
        Some(otlp_endpoint) => {
            let t = crate::telemetry::TraceSettings { otlp_endpoint, sample_ratio: ratio.unwrap_or(1.0) };
            t.validate().map_err(ServerError::Config)?;
            Ok(Some(t))
        }
    }
}

/// The certificate files: none (insecure) or at least the three peer files.
fn tls_paths(cli: &NodeArgs, file: &NodeArgs) -> Result<Option<crate::transport::TlsPaths>, ServerError> {
    let get = |c: &Option<PathBuf>, f: &Option<PathBuf>| c.clone().or(f.clone());
    let ca = get(&cli.tls_ca_file, &file.tls_ca_file);
    let cert = get(&cli.tls_cert_file, &file.tls_cert_file);
    let key = get(&cli.tls_key_file, &file.tls_key_file);
    let api_cert = get(&cli.api_tls_cert_file, &file.api_tls_cert_file);
    let api_key = get(&cli.api_tls_key_file, &file.api_tls_key_file);
    let api_client_ca = get(&cli.api_client_ca_file, &file.api_client_ca_file);
    match (ca, cert, key) {
        (None, None, None) if api_cert.is_none() && api_key.is_none() && api_client_ca.is_none() => Ok(None),
        (Some(ca), Some(cert), Some(key)) => {
            if api_cert.is_some() != api_key.is_some() {
                return Err(ServerError::Config("api_tls_cert_file and api_tls_key_file go together".into()));
            }
            Ok(Some(crate::transport::TlsPaths { ca, cert, key, api_cert, api_key, api_client_ca }))
        }
        _ => Err(ServerError::Config("TLS needs tls_ca_file, tls_cert_file and tls_key_file together".into())),
    }
}

fn jwt_settings(cli: &NodeArgs, file: &NodeArgs) -> Result<Option<crate::auth::jwt::JwtSettings>, ServerError> {
    let algorithm = cli.jwt_algorithm.or(file.jwt_algorithm);
    let key_file = cli.jwt_key_file.clone().or(file.jwt_key_file.clone());
    match (algorithm, key_file) {
        (None, None) => Ok(None),
        (Some(algorithm), Some(key_file)) => Ok(Some(crate::auth::jwt::JwtSettings {
            algorithm,
            key_file,
            issuer: cli.jwt_issuer.clone().or(file.jwt_issuer.clone()),
            audience: cli.jwt_audience.clone().or(file.jwt_audience.clone()),
            roles_claim: cli.jwt_roles_claim.clone().or(file.jwt_roles_claim.clone()).unwrap_or_else(|| "roles".into()),
        })),
        _ => Err(ServerError::Config("jwt_algorithm and jwt_key_file go together".into())),
    }
}

macro_rules! pick {
    ($cli:ident, $file:ident, $field:ident, $default:expr) => {
        $cli.$field.or($file.$field).unwrap_or($default)
    };
}

/// One setting of [`explain`]: its effective value and where it came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Setting {
    pub name: String,
    /// `null`: unset (the feature is off).
    pub value: serde_json::Value,
    /// `flag`, `env`, `file` or `default`.
    pub source: &'static str,
}

/// The effective configuration of a node started with `args` (flags, `ENGRAM_*` env, the
/// TOML file they name), validated, with each setting's source — what `engramctl config show`
/// prints. Nothing here is secret: key material lives in files, named by path; the
/// `ENGRAM_BACKUP_KEY` variable is reported only as set.
pub fn explain<I, T>(args: I) -> Result<(Config, Vec<Setting>), ServerError>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::parser::ValueSource;
    use clap::{CommandFactory, FromArgMatches};
    let matches = NodeArgs::command()
        .no_binary_name(true)
        .try_get_matches_from(args)
        .map_err(|e| ServerError::Config(e.to_string()))?;
    let cli = NodeArgs::from_arg_matches(&matches).map_err(|e| ServerError::Config(e.to_string()))?;
    let file = cli.file()?;
    let config = cli.clone().resolve()?;
    let (cli_v, file_v, config_v) = (to_json(&cli), to_json(&file), to_json(&config));
    let mut out = Vec::new();
    if let Some(path) = &cli.config {
        let source = if matches.value_source("config") == Some(ValueSource::EnvVariable) { "env" } else { "flag" };
        out.push(Setting { name: "config".into(), value: path.display().to_string().into(), source });
    }
    for (name, v) in cli_v.as_object().into_iter().flatten() {
        let set = |v: &serde_json::Value| !v.is_null() && v != &serde_json::Value::Bool(false);
        let (value, source) = match matches.value_source(name) {
            Some(ValueSource::CommandLine) => (v.clone(), "flag"),
            Some(ValueSource::EnvVariable) => (v.clone(), "env"),
            _ if set(&file_v[name]) => (file_v[name].clone(), "file"),
            _ => (default_of(name, &config_v), "default"),
        };
        out.push(Setting { name: name.clone(), value, source });
    }
    if std::env::var_os("ENGRAM_BACKUP_KEY").is_some() {
        out.push(Setting { name: "backup_key".into(), value: "(set, redacted)".into(), source: "env" });
    }
    Ok((config, out))
}

/// A setting's value when nothing set it: the resolved config's, by the same name (or inside
/// `rates`), else unset.
fn default_of(name: &str, config: &serde_json::Value) -> serde_json::Value {
    if let Some(v) = config.get(name) {
        return v.clone();
    }
    if name == "trace_sample_ratio" {
        return config["tracing"]["sample_ratio"].clone();
    }
    if let Some(rate) = name.strip_prefix("rate_limit_") {
        return config["rates"][rate].clone();
    }
    serde_json::Value::Null
}

fn to_json<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

impl NodeArgs {
    /// The TOML file `--config` names, parsed (empty without one).
    fn file(&self) -> Result<NodeArgs, ServerError> {
        match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ServerError::Config(format!("reading {}: {e}", path.display())))?;
                toml::from_str::<NodeArgs>(&text)
                    .map_err(|e| ServerError::Config(format!("parsing {}: {e}", path.display())))
            }
            None => Ok(NodeArgs::default()),
        }
    }

    /// Merges flags over the TOML file (if any) over defaults, then validates.
    pub fn resolve(self) -> Result<Config, ServerError> {
        let file = self.file()?;
        let cli = self;
        let node_id = cli
            .node_id
            .or(file.node_id)
            .ok_or_else(|| ServerError::Config("node_id is required (--node-id or ENGRAM_NODE_ID)".into()))?;
        let data_dir = cli
            .data_dir
            .clone()
            .or(file.data_dir.clone())
            .ok_or_else(|| ServerError::Config("data_dir is required (--data-dir or ENGRAM_DATA_DIR)".into()))?;
        let backup_dir = cli.backup_dir.clone().or(file.backup_dir.clone()).unwrap_or_else(|| data_dir.join("backups"));
        let archive_dir =
            cli.archive_dir.clone().or(file.archive_dir.clone()).unwrap_or_else(|| data_dir.join("archives"));
        let config = Config {
            node_id,
            data_dir,
            listen_api: pick!(cli, file, listen_api, "127.0.0.1:7001".parse().unwrap()),
            listen_raft: pick!(cli, file, listen_raft, "127.0.0.1:7101".parse().unwrap()),
            listen_http: pick!(cli, file, listen_http, "127.0.0.1:7201".parse().unwrap()),
            advertise_api: cli.advertise_api.clone().or(file.advertise_api.clone()),
            advertise_raft: cli.advertise_raft.clone().or(file.advertise_raft.clone()),
            heartbeat_interval_ms: pick!(cli, file, heartbeat_interval_ms, 50),
            election_timeout_min_ms: pick!(cli, file, election_timeout_min_ms, 100),
            election_timeout_max_ms: pick!(cli, file, election_timeout_max_ms, 200),
            snapshot_logs_since_last: pick!(cli, file, snapshot_logs_since_last, 5000),
            snapshot_keep_logs: pick!(cli, file, snapshot_keep_logs, 1000),
            snapshot_max_lag_logs: pick!(cli, file, snapshot_max_lag_logs, 100_000),
            backup_dir,
            backup_interval_secs: pick!(cli, file, backup_interval_secs, 0),
            backup_retention: pick!(cli, file, backup_retention, 24),
            cluster_verify_interval_secs: pick!(cli, file, cluster_verify_interval_secs, 3600),
            backup_drill_interval_secs: pick!(cli, file, backup_drill_interval_secs, 0),
            backup_key_file: cli.backup_key_file.clone().or(file.backup_key_file.clone()),
            at_rest_key_file: cli.at_rest_key_file.clone().or(file.at_rest_key_file.clone()),
            purge_interval_ms: pick!(cli, file, purge_interval_ms, 1000).max(10),
            reinforce_flush_ms: pick!(cli, file, reinforce_flush_ms, 1000).max(10),
            archive_dir,
            state_sync_interval_ms: pick!(cli, file, state_sync_interval_ms, 100),
            approx_min_vectors: pick!(cli, file, approx_min_vectors, 10_000),
            vector_part_max: pick!(cli, file, vector_part_max, 250_000),
            vector_checkpoint_secs: pick!(cli, file, vector_checkpoint_secs, 300),
            read_timeout_ms: pick!(cli, file, read_timeout_ms, 5000),
            max_text_bytes: pick!(cli, file, max_text_bytes, 64 * 1024),
            log_format: pick!(cli, file, log_format, LogFormat::Text),
            tracing: trace_settings(&cli, &file)?,
            tls: tls_paths(&cli, &file)?,
            insecure: cli.insecure || file.insecure,
            jwt: jwt_settings(&cli, &file)?,
            rates: crate::auth::limits::RateSettings {
                requests_per_sec_per_principal: pick!(cli, file, rate_limit_requests_per_sec_per_principal, 5000),
                requests_per_sec_per_namespace: pick!(cli, file, rate_limit_requests_per_sec_per_namespace, 0),
                write_bytes_per_sec_per_principal: pick!(
                    cli,
                    file,
                    rate_limit_write_bytes_per_sec_per_principal,
                    64 << 20
                ),
            },
            max_connections: pick!(cli, file, max_connections, 1024),
            handshake_timeout_ms: pick!(cli, file, handshake_timeout_ms, 10_000),
            idle_timeout_ms: pick!(cli, file, idle_timeout_ms, 300_000),
            max_response_bytes: pick!(cli, file, max_response_bytes, 16 << 20),
            max_snapshot_bytes: pick!(cli, file, max_snapshot_bytes, 64 << 30),
            disk_reserve_bytes: cli.disk_reserve_bytes.or(file.disk_reserve_bytes),
            metrics_namespaces: cli.metrics_namespaces.clone().or(file.metrics_namespaces.clone()).unwrap_or_default(),
            #[cfg(feature = "canary")]
            unsafe_stale_reads: cli.unsafe_stale_reads,
            #[cfg(not(feature = "canary"))]
            unsafe_stale_reads: false,
            #[cfg(feature = "canary")]
            unsafe_ack_before_fsync: cli.unsafe_ack_before_fsync,
            #[cfg(not(feature = "canary"))]
            unsafe_ack_before_fsync: false,
        };
        config.validate()?;
        Ok(config)
    }
}

impl Config {
    /// A config for tests and embedding: loopback, ephemeral ports, fast timeouts.
    pub fn for_test(node_id: u64, data_dir: PathBuf) -> Config {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let backup_dir = data_dir.join("backups");
        let archive_dir = data_dir.join("archives");
        Config {
            node_id,
            data_dir,
            listen_api: any,
            listen_raft: any,
            listen_http: any,
            advertise_api: None,
            advertise_raft: None,
            heartbeat_interval_ms: 50,
            election_timeout_min_ms: 300,
            election_timeout_max_ms: 600,
            snapshot_logs_since_last: 5000,
            snapshot_keep_logs: 1000,
            snapshot_max_lag_logs: 100_000,
            backup_dir,
            backup_interval_secs: 0,
            backup_retention: 24,
            cluster_verify_interval_secs: 0,
            backup_drill_interval_secs: 0,
            backup_key_file: None,
            at_rest_key_file: None,
            purge_interval_ms: 200,
            reinforce_flush_ms: 200,
            archive_dir,
            state_sync_interval_ms: 100,
            approx_min_vectors: 10_000,
            vector_part_max: 250_000,
            vector_checkpoint_secs: 300,
            read_timeout_ms: 5000,
            max_text_bytes: 64 * 1024,
            log_format: LogFormat::Text,
            tracing: None,
            tls: None,
            insecure: true,
            jwt: None,
            rates: crate::auth::limits::RateSettings::default(),
            max_connections: 1024,
            handshake_timeout_ms: 10_000,
            idle_timeout_ms: 300_000,
            max_response_bytes: 16 << 20,
            max_snapshot_bytes: 64 << 30,
            // Small, so a test machine short of disk still runs the suite; admission stays on.
            disk_reserve_bytes: Some(16 << 20),
            metrics_namespaces: vec![],
            unsafe_stale_reads: false,
            unsafe_ack_before_fsync: false,
        }
    }

    /// [`for_test`](Self::for_test) with certificates: TLS, mutual TLS between peers, keys.
    pub fn for_test_secure(node_id: u64, data_dir: PathBuf, tls: crate::transport::TlsPaths) -> Config {
        Config { tls: Some(tls), insecure: false, ..Config::for_test(node_id, data_dir) }
    }

    pub fn validate(&self) -> Result<(), ServerError> {
        let err = |m: String| Err(ServerError::Config(m));
        if self.node_id == 0 {
            return err("node_id must be >= 1".into());
        }
        if self.heartbeat_interval_ms == 0 {
            return err("heartbeat_interval_ms must be > 0".into());
        }
        if self.election_timeout_min_ms >= self.election_timeout_max_ms {
            return err(format!(
                "election_timeout_min_ms ({}) must be below election_timeout_max_ms ({})",
                self.election_timeout_min_ms, self.election_timeout_max_ms
            ));
        }
        if self.heartbeat_interval_ms * 2 > self.election_timeout_min_ms {
            return err(format!(
                "heartbeat_interval_ms ({}) must be at most half of election_timeout_min_ms ({})",
                self.heartbeat_interval_ms, self.election_timeout_min_ms
            ));
        }
        if self.snapshot_logs_since_last == 0 {
            return err("snapshot_logs_since_last must be > 0".into());
        }
        if self.backup_interval_secs > 0 && self.backup_retention == 0 {
            return err("backup_retention must be > 0 when backups are scheduled".into());
        }
        if self.approx_min_vectors < 64 {
            return err("approx_min_vectors must be at least 64".into());
        }
        if self.vector_part_max == 0 {
            return err("vector_part_max must be > 0".into());
        }
        if self.read_timeout_ms == 0 {
            return err("read_timeout_ms must be > 0".into());
        }
        if self.max_text_bytes == 0 || self.max_text_bytes > 16 << 20 {
            return err("max_text_bytes must be in 1..=16777216".into());
        }
        match (&self.tls, self.insecure) {
            (None, false) => {
                return err("no certificates: set tls_ca_file, tls_cert_file and tls_key_file \
                    (engramctl certs), or --insecure for a loopback-only development node"
                    .into())
            }
            (Some(_), true) => return err("--insecure and TLS certificates exclude each other".into()),
            _ => {}
        }
        if self.insecure {
            let exposed: Vec<String> = [self.listen_api, self.listen_raft, self.listen_http]
                .iter()
                .filter(|a| !a.ip().is_loopback())
                .map(|a| a.to_string())
                .collect();
            if !exposed.is_empty() {
                return err(format!(
                    "--insecure serves without authentication, so only on loopback; {} is not",
                    exposed.join(", ")
                ));
            }
        }
        if self.insecure && self.jwt.is_some() {
            return err("JWTs need TLS: drop --insecure".into());
        }
        if self.max_connections == 0 || self.handshake_timeout_ms == 0 || self.idle_timeout_ms == 0 {
            return err("max_connections, handshake_timeout_ms and idle_timeout_ms must be > 0".into());
        }
        if self.max_response_bytes < 1 << 20 {
            return err("max_response_bytes must be at least 1048576".into());
        }
        for ns in &self.metrics_namespaces {
            crate::memory::validate_namespace(ns)
                .map_err(|e| ServerError::Config(format!("metrics_namespaces: {ns:?}: {e}")))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_is_overridden_by_flags_and_validated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("engram.toml");
        std::fs::write(&path, "node_id = 3\ndata_dir = \"/tmp/x\"\nheartbeat_interval_ms = 30\ninsecure = true\n")
            .unwrap();
        let args =
            NodeArgs::parse_from(["engram", "--config", path.to_str().unwrap(), "--heartbeat-interval-ms", "40"]);
        let c = args.resolve().unwrap();
        assert_eq!((c.node_id, c.heartbeat_interval_ms), (3, 40));

        std::fs::write(&path, "node_id = 3\ndata_dir = \"/tmp/x\"\nbogus = 1\n").unwrap();
        let e = NodeArgs::parse_from(["engram", "--config", path.to_str().unwrap()]).resolve().unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");

        let e = NodeArgs::parse_from([
            "engram",
            "--node-id",
            "1",
            "--data-dir",
            "/tmp/x",
            "--insecure",
            "--election-timeout-min-ms",
            "1200",
        ])
        .resolve()
        .unwrap_err();
        assert!(e.to_string().contains("election_timeout_min_ms"), "{e}");
    }

    #[test]
    fn security_is_not_optional() {
        let base = ["engram", "--node-id", "1", "--data-dir", "/tmp/x"];
        // No certificates and no --insecure: refused, and the message says what to do.
        let e = NodeArgs::parse_from(base).resolve().unwrap_err().to_string();
        assert!(e.contains("tls_ca_file") && e.contains("--insecure"), "{e}");
        // --insecure only on loopback.
        let mut args = base.to_vec();
        args.extend(["--insecure", "--listen-api", "0.0.0.0:7001"]);
        let e = NodeArgs::parse_from(args).resolve().unwrap_err().to_string();
        assert!(e.contains("loopback") && e.contains("0.0.0.0:7001"), "{e}");
        // Half a TLS setup is no setup.
        let mut args = base.to_vec();
        args.extend(["--tls-ca-file", "/tmp/ca.pem"]);
        assert!(NodeArgs::parse_from(args).resolve().unwrap_err().to_string().contains("together"));
        let mut args = base.to_vec();
        args.extend(["--tls-ca-file", "a", "--tls-cert-file", "b", "--tls-key-file", "c"]);
        assert!(NodeArgs::parse_from(args).resolve().unwrap().tls.is_some());
    }

    #[test]
    fn traces_need_an_endpoint_and_a_sane_ratio() {
        let base = ["engram", "--node-id", "1", "--data-dir", "/tmp/x", "--insecure"];
        let resolve = |extra: &[&str]| {
            let mut args = base.to_vec();
            args.extend(extra);
            NodeArgs::parse_from(args).resolve()
        };
        assert_eq!(resolve(&[]).unwrap().tracing, None);
        let t = resolve(&["--otlp-endpoint", "http://127.0.0.1:4317"]).unwrap().tracing.unwrap();
        assert_eq!((t.otlp_endpoint.as_str(), t.sample_ratio), ("http://127.0.0.1:4317", 1.0));
        let t = resolve(&["--otlp-endpoint", "http://c:4317", "--trace-sample-ratio", "0.25"]).unwrap().tracing;
        assert_eq!(t.unwrap().sample_ratio, 0.25);
        let e = resolve(&["--trace-sample-ratio", "0.5"]).unwrap_err().to_string();
        assert!(e.contains("needs otlp_endpoint"), "{e}");
        let e = resolve(&["--otlp-endpoint", "https://c:4317"]).unwrap_err().to_string();
        assert!(e.contains("http://host:port"), "{e}");
        let e = resolve(&["--otlp-endpoint", "http://c:4317", "--trace-sample-ratio", "2"]).unwrap_err().to_string();
        assert!(e.contains("0..=1"), "{e}");
    }

    #[test]
    fn the_stale_read_canary_is_no_config_field_and_no_env_var() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("engram.toml");
        std::fs::write(&path, "node_id = 3\ndata_dir = \"/tmp/x\"\ninsecure = true\nunsafe_stale_reads = true\n")
            .unwrap();
        let e = NodeArgs::parse_from(["engram", "--config", path.to_str().unwrap()]).resolve().unwrap_err();
        assert!(e.to_string().contains("unsafe_stale_reads"), "{e}");
        // The variable the canary once read does nothing now.
        std::env::set_var("ENGRAM_UNSAFE_STALE_READS", "true");
        let c = NodeArgs::parse_from(["engram", "--node-id", "1", "--data-dir", "/tmp/x", "--insecure"]).resolve();
        std::env::remove_var("ENGRAM_UNSAFE_STALE_READS");
        assert!(!c.unwrap().unsafe_stale_reads);
        #[cfg(not(feature = "canary"))]
        assert!(NodeArgs::try_parse_from(["engram", "--unsafe-stale-reads"]).is_err());
        #[cfg(not(feature = "canary"))]
        assert!(NodeArgs::try_parse_from(["engram", "--unsafe-ack-before-fsync"]).is_err());
    }
}
