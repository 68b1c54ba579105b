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
//! heartbeat_interval_ms = 100
//! election_timeout_min_ms = 500
//! election_timeout_max_ms = 1000
//! snapshot_logs_since_last = 5000
//! snapshot_keep_logs = 1000
//! snapshot_max_lag_logs = 100000  # the leader keeps log a follower needs, up to this far back
//! backup_dir = "/var/lib/engram/backups"  # scheduled backups (default: <data_dir>/backups)
//! backup_interval_secs = 3600      # the leader takes a backup this often; 0 = never
//! backup_retention = 24            # scheduled backups kept in backup_dir
//! backup_key_file = "/etc/engram/backup-keys.toml"   # keyring (mode 0600); else ENGRAM_BACKUP_KEY
//! state_sync_interval_ms = 100     # 0: fsync the state machine on every apply
//! ivf_min_vectors = 50000          # namespaces this large use IVF shards instead of Flat
//! vector_part_max = 250000         # shard parts searched in parallel hold at most this many
//! vector_checkpoint_secs = 300     # write changed vector shards to index files; 0 = only at shutdown
//! read_timeout_ms = 5000
//! max_text_bytes = 65536
//! log_format = "text"               # or "json"
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use serde::Deserialize;

use crate::error::ServerError;

/// Flags and file fields. Everything is optional here; [`NodeArgs::resolve`] fills defaults.
#[derive(Debug, Clone, Default, Parser, Deserialize)]
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
    /// Leader heartbeat period [default: 100].
    #[arg(long, env = "ENGRAM_HEARTBEAT_INTERVAL_MS")]
    pub heartbeat_interval_ms: Option<u64>,
    /// Lower bound of the randomized election timeout [default: 500].
    #[arg(long, env = "ENGRAM_ELECTION_TIMEOUT_MIN_MS")]
    pub election_timeout_min_ms: Option<u64>,
    /// Upper bound of the randomized election timeout [default: 1000].
    #[arg(long, env = "ENGRAM_ELECTION_TIMEOUT_MAX_MS")]
    pub election_timeout_max_ms: Option<u64>,
    /// Take a snapshot after this many log entries since the last one [default: 5000].
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
    /// Backup keyring file (mode 0600, see `engramctl keys`). Without it the key comes from
    /// ENGRAM_BACKUP_KEY. The key itself never goes in this config.
    #[arg(long, env = "ENGRAM_BACKUP_KEY_FILE")]
    pub backup_key_file: Option<PathBuf>,
    /// Fsync state-machine applies at most this often; 0 = every apply. The log is always
    /// fsynced before a write is acknowledged, so this trades restart replay for latency
    /// [default: 100].
    #[arg(long, env = "ENGRAM_STATE_SYNC_INTERVAL_MS")]
    pub state_sync_interval_ms: Option<u64>,
    /// Namespaces with at least this many memories use an approximate IVF shard instead of an
    /// exact Flat one [default: 50000].
    #[arg(long, env = "ENGRAM_IVF_MIN_VECTORS")]
    pub ivf_min_vectors: Option<usize>,
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
    /// BREAKS LINEARIZABILITY. Serves every read from local state without the read index.
    /// It exists only as the chaos harness's canary (jepsen/), which must catch it.
    #[arg(long, env = "ENGRAM_UNSAFE_STALE_READS", hide = true)]
    #[serde(default)]
    pub unsafe_stale_reads: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// A complete, validated node configuration.
#[derive(Debug, Clone)]
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
    pub backup_key_file: Option<PathBuf>,
    pub state_sync_interval_ms: u64,
    pub ivf_min_vectors: usize,
    pub vector_part_max: usize,
    pub vector_checkpoint_secs: u64,
    pub read_timeout_ms: u64,
    pub max_text_bytes: usize,
    pub log_format: LogFormat,
    /// Test-only canary: reads skip the read index (see [`NodeArgs::unsafe_stale_reads`]).
    pub unsafe_stale_reads: bool,
}

macro_rules! pick {
    ($cli:ident, $file:ident, $field:ident, $default:expr) => {
        $cli.$field.or($file.$field).unwrap_or($default)
    };
}

impl NodeArgs {
    /// Merges flags over the TOML file (if any) over defaults, then validates.
    pub fn resolve(self) -> Result<Config, ServerError> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ServerError::Config(format!("reading {}: {e}", path.display())))?;
                toml::from_str::<NodeArgs>(&text)
                    .map_err(|e| ServerError::Config(format!("parsing {}: {e}", path.display())))?
            }
            None => NodeArgs::default(),
        };
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
        let config = Config {
            node_id,
            data_dir,
            listen_api: pick!(cli, file, listen_api, "127.0.0.1:7001".parse().unwrap()),
            listen_raft: pick!(cli, file, listen_raft, "127.0.0.1:7101".parse().unwrap()),
            listen_http: pick!(cli, file, listen_http, "127.0.0.1:7201".parse().unwrap()),
            advertise_api: cli.advertise_api.clone().or(file.advertise_api.clone()),
            advertise_raft: cli.advertise_raft.clone().or(file.advertise_raft.clone()),
            heartbeat_interval_ms: pick!(cli, file, heartbeat_interval_ms, 100),
            election_timeout_min_ms: pick!(cli, file, election_timeout_min_ms, 500),
            election_timeout_max_ms: pick!(cli, file, election_timeout_max_ms, 1000),
            snapshot_logs_since_last: pick!(cli, file, snapshot_logs_since_last, 5000),
            snapshot_keep_logs: pick!(cli, file, snapshot_keep_logs, 1000),
            snapshot_max_lag_logs: pick!(cli, file, snapshot_max_lag_logs, 100_000),
            backup_dir,
            backup_interval_secs: pick!(cli, file, backup_interval_secs, 0),
            backup_retention: pick!(cli, file, backup_retention, 24),
            backup_key_file: cli.backup_key_file.clone().or(file.backup_key_file.clone()),
            state_sync_interval_ms: pick!(cli, file, state_sync_interval_ms, 100),
            ivf_min_vectors: pick!(cli, file, ivf_min_vectors, 50_000),
            vector_part_max: pick!(cli, file, vector_part_max, 250_000),
            vector_checkpoint_secs: pick!(cli, file, vector_checkpoint_secs, 300),
            read_timeout_ms: pick!(cli, file, read_timeout_ms, 5000),
            max_text_bytes: pick!(cli, file, max_text_bytes, 64 * 1024),
            log_format: pick!(cli, file, log_format, LogFormat::Text),
            unsafe_stale_reads: cli.unsafe_stale_reads || file.unsafe_stale_reads,
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
            backup_key_file: None,
            state_sync_interval_ms: 100,
            ivf_min_vectors: 50_000,
            vector_part_max: 250_000,
            vector_checkpoint_secs: 300,
            read_timeout_ms: 5000,
            max_text_bytes: 64 * 1024,
            log_format: LogFormat::Text,
            unsafe_stale_reads: false,
        }
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
        if self.ivf_min_vectors < 64 {
            return err("ivf_min_vectors must be at least 64".into());
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
        std::fs::write(&path, "node_id = 3\ndata_dir = \"/tmp/x\"\nheartbeat_interval_ms = 50\n").unwrap();
        let args =
            NodeArgs::parse_from(["engram", "--config", path.to_str().unwrap(), "--heartbeat-interval-ms", "70"]);
        let c = args.resolve().unwrap();
        assert_eq!((c.node_id, c.heartbeat_interval_ms), (3, 70));

        std::fs::write(&path, "node_id = 3\ndata_dir = \"/tmp/x\"\nbogus = 1\n").unwrap();
        let e = NodeArgs::parse_from(["engram", "--config", path.to_str().unwrap()]).resolve().unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");

        let e = NodeArgs::parse_from([
            "engram",
            "--node-id",
            "1",
            "--data-dir",
            "/tmp/x",
            "--election-timeout-min-ms",
            "1200",
        ])
        .resolve()
        .unwrap_err();
        assert!(e.to_string().contains("election_timeout_min_ms"), "{e}");
    }
}
