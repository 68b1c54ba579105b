//! `engramctl`: the operator and developer CLI. Talks gRPC to any node(s) in `--endpoints`;
//! follows leader hints like the SDK. Against a secured cluster it needs the cluster CA
//! (`--ca-file`) and a key (`--api-key-file` or `ENGRAM_API_KEY`); `--insecure` talks
//! plaintext to a development node. `certs` and `keys` work on files only.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use engram::backup::{self, keys, restore, Keyring};
use engram::client::{Client, ClientError, Consistency, Metric, NewMemory, Precondition};
use engram::progress;
use engram::proto as pb;
use engram::raft::cluster_verify::majority;

mod security;
use security::{auth_cmd, certs_cmd, connect, quota_cmd, root_key, AuthCmd, CertsCmd, QuotaCmd};

#[derive(Parser)]
#[command(name = "engramctl", version, about = "Operate and use an Engram cluster")]
struct Cli {
    /// Node API addresses, comma separated.
    #[arg(long, env = "ENGRAM_ENDPOINTS", default_value = "127.0.0.1:7001", value_delimiter = ',', global = true)]
    endpoints: Vec<String>,
    /// The cluster CA certificate (PEM), to verify the nodes.
    #[arg(long, env = "ENGRAM_CA_FILE", global = true)]
    ca_file: Option<PathBuf>,
    /// The name node certificates must hold [default: the endpoint's host]; every node
    /// certificate holds <cluster>.engram.
    #[arg(long, env = "ENGRAM_SERVER_NAME", global = true)]
    server_name: Option<String>,
    /// A client certificate and key, for nodes that require one.
    #[arg(long, env = "ENGRAM_CLIENT_CERT_FILE", global = true, requires = "client_key")]
    client_cert: Option<PathBuf>,
    #[arg(long, env = "ENGRAM_CLIENT_KEY_FILE", global = true, requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// A file (mode 0600) holding the API key or JWT to send; or set ENGRAM_API_KEY.
    #[arg(long, env = "ENGRAM_API_KEY_FILE", global = true)]
    api_key_file: Option<PathBuf>,
    /// Plaintext and no credentials, for an `engram --insecure` development node.
    #[arg(long, env = "ENGRAM_INSECURE", global = true)]
    insecure: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Cluster bootstrap and status.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Membership changes.
    #[command(subcommand)]
    Members(MembersCmd),
    /// Leadership.
    #[command(subcommand)]
    Leader(LeaderCmd),
    /// Namespaces.
    #[command(subcommand)]
    Namespace(NamespaceCmd),
    /// Memories.
    #[command(subcommand)]
    Memory(MemoryCmd),
    /// Encrypted backups: create (online, over gRPC), verify and restore (offline, on files).
    #[command(subcommand)]
    Backup(BackupCmd),
    /// Backup keyrings (key files, mode 0600).
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Build a Raft snapshot on the first endpoint now.
    Snapshot,
    /// The hash-chained ledger of applied entries (docs/ledger.md).
    #[command(subcommand)]
    Ledger(LedgerCmd),
    /// Certificates for a new cluster (files only): a CA, then one per node or client.
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Keys, roles and grants.
    #[command(subcommand)]
    Auth(AuthCmd),
    /// Tenant quotas (a tenant is a namespace's first segment; `*` is the default).
    #[command(subcommand)]
    Quota(QuotaCmd),
    /// A node's configuration, without starting it: `engramctl config show -- <engram flags>`.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Status of every endpoint (as `cluster status`).
    Status {
        /// One JSON object per endpoint, one per line.
        #[arg(long)]
        json: bool,
    },
    /// Shell completions for engramctl, printed.
    Completions { shell: clap_complete::Shell },
    /// Man pages for engram and engramctl, written into DIR.
    Man { dir: PathBuf },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// The effective configuration, each setting with its source (flag, env, file, default).
    Show {
        #[arg(long)]
        json: bool,
        /// The flags `engram` would get (after `--`); `ENGRAM_*` variables apply as for it.
        #[arg(last = true)]
        node_args: Vec<String>,
    },
    /// Checks the configuration and the files it names (certificates, JWT key), then exits:
    /// 0 valid, 2 invalid.
    Validate {
        #[arg(last = true)]
        node_args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum BackupCmd {
    /// Stream a backup from a node (sealed with the node's active key) to a file or directory.
    Create {
        /// A file path, or an existing directory (the name is then chosen from the backup).
        target: PathBuf,
    },
    /// Check a backup end to end without restoring it.
    Verify {
        file: PathBuf,
        /// Keyring file; without it, ENGRAM_BACKUP_KEY.
        #[arg(long, env = "ENGRAM_BACKUP_KEY_FILE")]
        key_file: Option<PathBuf>,
    },
    /// Build one new node's data dir from a backup (run once per member, same members).
    Restore {
        file: PathBuf,
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        node_id: u64,
        /// Every member of the new cluster, as ID=RAFT_ADDR,API_ADDR (repeat).
        #[arg(long = "member", required = true)]
        members: Vec<String>,
        /// Replace a non-empty data dir.
        #[arg(long)]
        force: bool,
        #[arg(long, env = "ENGRAM_BACKUP_KEY_FILE")]
        key_file: Option<PathBuf>,
        /// For a backup of a cluster encrypted at rest: the cluster's data keys now (`keys
        /// export --at-rest`). Namespaces erased since the backup are left out and reported.
        #[arg(long)]
        data_keys: Option<PathBuf>,
        /// The at-rest master keyring the restored node will run with; without it,
        /// ENGRAM_AT_REST_KEY.
        #[arg(long, env = "ENGRAM_AT_REST_KEY_FILE")]
        at_rest_key_file: Option<PathBuf>,
    },
    /// Partial restore: one namespace of a live cluster becomes exactly what the backup holds
    /// (one replicated entry; other namespaces untouched). Prints what changes, as JSON;
    /// `--dry-run` prints it and changes nothing. Needs a cluster admin key.
    RestoreNamespace {
        file: PathBuf,
        #[arg(long)]
        namespace: String,
        /// Restore only these memory ids (comma separated); the namespace keeps the rest.
        #[arg(long, value_delimiter = ',')]
        ids: Vec<String>,
        #[arg(long)]
        dry_run: bool,
        #[arg(long, env = "ENGRAM_BACKUP_KEY_FILE")]
        key_file: Option<PathBuf>,
    },
    /// A disaster-recovery drill: restore a backup into scratch nodes started on loopback,
    /// compare their digests and search answers with the backup's, report RTO and data age
    /// (RPO) as JSON, then remove them. Exit 0 if every check passed, 1 if one failed.
    Drill {
        /// A backup file, or a directory whose newest backup is drilled.
        path: PathBuf,
        #[arg(long, env = "ENGRAM_BACKUP_KEY_FILE")]
        key_file: Option<PathBuf>,
        /// Scratch members to restore and start (1 to 5).
        #[arg(long, default_value_t = 1)]
        nodes: u64,
        /// Sample searches per namespace, checked against exact answers.
        #[arg(long, default_value_t = 16)]
        queries: usize,
        /// The engram binary [default: `engram` beside this engramctl].
        #[arg(long)]
        engram_bin: Option<PathBuf>,
        /// Where the scratch data dirs go [default: the system temp dir].
        #[arg(long)]
        scratch_dir: Option<PathBuf>,
        /// How long the scratch cluster may take to start.
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
        /// For a backup sealed at rest: the cluster's data keys (`keys export --at-rest`).
        #[arg(long)]
        data_keys: Option<PathBuf>,
        /// The at-rest master keyring; without it, ENGRAM_AT_REST_KEY.
        #[arg(long, env = "ENGRAM_AT_REST_KEY_FILE")]
        at_rest_key_file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Create a keyring file with one new key (refuses to overwrite).
    Generate {
        #[arg(long, env = "ENGRAM_BACKUP_KEY_FILE")]
        key_file: PathBuf,
    },
    /// Add a new active key to a keyring file (older keys stay, for older backups and data
    /// keys wrapped under them). With --at-rest, then (or, without --key-file, only) ask the
    /// cluster to wrap every data key again under the active key of its nodes' at-rest key
    /// files: copy the rotated file to every node first.
    Rotate {
        #[arg(long)]
        key_file: Option<PathBuf>,
        #[arg(long)]
        at_rest: bool,
    },
    /// Write the cluster's data keys (wrapped under the at-rest master key; never in the
    /// clear) and its erasures to FILE (mode 0600): what `backup restore --data-keys` needs.
    Export {
        #[arg(long)]
        at_rest: bool,
        #[arg(long)]
        out: PathBuf,
    },
    /// List key ids (never secrets).
    List {
        #[arg(long, env = "ENGRAM_BACKUP_KEY_FILE")]
        key_file: PathBuf,
    },
}

#[derive(Subcommand)]
enum LedgerCmd {
    /// Recompute every endpoint's ledger from its log and state, then compare the endpoints'
    /// chain heads at the last index they all hold. Exits non-zero when a ledger does not
    /// check out or the heads differ.
    Verify,
    /// The first endpoint's ledger rows in FROM..=TO as JSON lines (TO 0: through the end).
    Export {
        #[arg(long, default_value_t = 0)]
        from: u64,
        #[arg(long, default_value_t = 0)]
        to: u64,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Bootstrap a new cluster on the first endpoint. Members as ID=RAFT_ADDR,API_ADDR; none:
    /// single node. A secured cluster gets a root key, written to --root-key-file (0600); if
    /// that file exists its key is used (a retry).
    Init {
        #[arg(long = "member")]
        members: Vec<String>,
        #[arg(long, default_value = "root.key")]
        root_key_file: PathBuf,
    },
    /// Status of every endpoint.
    Status {
        /// One JSON object per endpoint, one per line.
        #[arg(long)]
        json: bool,
    },
    /// Compare every endpoint's whole state at one common log index: the leader proposes a
    /// mark entry, each node digests its state right after applying it, and an endpoint whose
    /// digest differs from the majority's is named. Exits non-zero on any difference.
    Verify {
        /// How long each node may take to apply the mark.
        #[arg(long, default_value_t = 30_000)]
        wait_ms: u32,
    },
}

#[derive(Subcommand)]
enum MembersCmd {
    /// Add a learner (non-voting, catches up from the leader).
    AddLearner {
        #[arg(long)]
        id: u64,
        #[arg(long)]
        raft_addr: String,
        #[arg(long)]
        api_addr: String,
        /// Return immediately instead of waiting for it to catch up.
        #[arg(long)]
        no_wait: bool,
    },
    /// Turn learners into voters.
    Promote { ids: Vec<u64> },
    /// Remove nodes from the cluster.
    Remove { ids: Vec<u64> },
    /// Bring back a stopped node whose data dir is damaged (it refuses to start, naming the
    /// file): removes it from the cluster, moves its data dir aside to
    /// `<data dir>.damaged-<unix seconds>`, adds it back as a learner, waits for you (or its
    /// supervisor) to start it and for it to catch up from its peers, then makes it a voter
    /// again if it was one. Run on the node's machine, with --endpoints naming other members.
    Rebuild {
        /// The node's id (its data dir's `node_id` must say the same).
        #[arg(long)]
        id: u64,
        /// The node's data dir.
        #[arg(long)]
        data_dir: PathBuf,
        /// How long to wait for the node to start and catch up.
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
}

#[derive(Subcommand)]
enum LeaderCmd {
    /// Hand leadership to another voter.
    Transfer { to: u64 },
}

#[derive(Subcommand)]
enum NamespaceCmd {
    Create {
        namespace: String,
        #[arg(long)]
        dimension: u32,
        #[arg(long, default_value = "cosine")]
        metric: String,
        /// A memory policy as JSON (see docs/memory-model.md); needs admin on the namespace.
        #[arg(long)]
        policy: Option<std::path::PathBuf>,
    },
    /// Delete a namespace and every memory in it.
    Delete { namespace: String },
    /// GDPR erasure: delete the namespace and destroy its data key through the log, so no
    /// copy of its content (older snapshots, backups, log segments) can be decrypted again.
    /// Prints the erasure receipt as JSON (docs/encryption.md).
    Erase { namespace: String },
    /// Settings, size and memory policy (as JSON).
    Show { namespace: String },
    /// Memory-model counters: dedup hit rate, merges, purges, archives, size.
    Stats { namespace: String },
    /// Replace the memory policy with the JSON in FILE (fields left out take their defaults).
    Policy { namespace: String, file: std::path::PathBuf },
}

#[derive(Subcommand)]
enum MemoryCmd {
    Put {
        namespace: String,
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        text: String,
        /// Comma-separated floats.
        #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
        embedding: Vec<f32>,
        /// KEY=VALUE, repeatable.
        #[arg(long = "tag")]
        tags: Vec<String>,
        #[arg(long)]
        importance: Option<f32>,
        /// Only if absent.
        #[arg(long, conflicts_with = "if_revision")]
        if_absent: bool,
        /// Only if at this revision.
        #[arg(long)]
        if_revision: Option<u64>,
        /// Create the namespace (cosine) if it does not exist, instead of failing NOT_FOUND.
        #[arg(long)]
        create_namespace: bool,
    },
    Get {
        namespace: String,
        id: String,
        /// linearizable | lease | stale
        #[arg(long, default_value = "linearizable")]
        consistency: String,
    },
    Delete {
        namespace: String,
        id: String,
        #[arg(long)]
        if_revision: Option<u64>,
    },
    /// Top-k memories by vector similarity.
    Search {
        namespace: String,
        /// Comma-separated floats.
        #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
        vector: Vec<f32>,
        #[arg(long, default_value_t = 10)]
        k: u32,
        /// KEY=VALUE that must match, repeatable.
        #[arg(long = "tag")]
        tags: Vec<String>,
        #[arg(long)]
        min_importance: Option<f32>,
        #[arg(long, default_value = "linearizable")]
        consistency: String,
    },
    /// Many searches behind one read barrier: one query vector per line of FILE
    /// (comma-separated floats; blank lines and lines starting with # are skipped).
    /// Merge clusters of near-duplicates into one memory each (one log entry); --dry-run lists
    /// them only.
    Consolidate {
        namespace: String,
        /// Similarity a twin must reach (default: the namespace policy's threshold).
        #[arg(long)]
        threshold: Option<f32>,
        #[arg(long)]
        dry_run: bool,
    },
    SearchBatch {
        namespace: String,
        #[arg(long)]
        file: std::path::PathBuf,
        #[arg(long, default_value_t = 10)]
        k: u32,
        #[arg(long, default_value = "linearizable")]
        consistency: String,
    },
    List {
        namespace: String,
        #[arg(long, default_value_t = 100)]
        page_size: u32,
        #[arg(long, default_value = "")]
        page_token: String,
        #[arg(long, default_value = "linearizable")]
        consistency: String,
    },
}

fn consistency(s: &str) -> Result<Consistency, String> {
    match s {
        "linearizable" => Ok(Consistency::Linearizable),
        "lease" => Ok(Consistency::Lease),
        "stale" => Ok(Consistency::Stale),
        other => Err(format!("unknown consistency {other:?} (linearizable | lease | stale)")),
    }
}

fn parse_member(s: &str) -> Result<pb::NodeInfo, String> {
    let (id, addrs) = s.split_once('=').ok_or("member must be ID=RAFT_ADDR,API_ADDR")?;
    let (raft, api) = addrs.split_once(',').ok_or("member must be ID=RAFT_ADDR,API_ADDR")?;
    Ok(pb::NodeInfo {
        id: id.parse().map_err(|e| format!("member id: {e}"))?,
        raft_addr: raft.into(),
        api_addr: api.into(),
    })
}

fn parse_tags(tags: &[String]) -> Result<HashMap<String, String>, &'static str> {
    tags.iter()
        .map(|t| t.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or("tag must be KEY=VALUE"))
        .collect()
}

fn print_memory(m: &pb::Memory) {
    let tags: Vec<String> = m.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!(
        "{}  rev={}  importance={:.2}  dim={}  tags=[{}]\n    {}",
        m.id,
        m.revision,
        m.importance,
        m.embedding.len(),
        tags.join(","),
        m.text
    );
}

fn status_json(addr: &str, s: &pb::StatusResponse) -> serde_json::Value {
    let ids = |v: &[pb::NodeInfo]| v.iter().map(|n| n.id).collect::<Vec<_>>();
    serde_json::json!({
        "endpoint": addr,
        "reachable": true,
        "node_id": s.node_id,
        "state": s.state,
        "term": s.term,
        "leader_id": s.leader_id,
        "leader_api_addr": s.leader_api_addr,
        "last_log_index": s.last_log_index,
        "applied_index": s.applied_index,
        "snapshot_index": s.snapshot_index,
        "purged_index": s.purged_index,
        "voters": ids(&s.voters),
        "learners": ids(&s.learners),
        "cluster_id": s.cluster_id,
        "last_backup": {
            "at_ms": s.last_backup_at_ms,
            "index": s.last_backup_index,
            "path": s.last_backup_path,
            "failed_at_ms": s.last_backup_failed_at_ms,
            "error": s.last_backup_error,
        },
        "last_drill": {
            "at_ms": s.last_drill_at_ms,
            "ok": s.last_drill_ok,
            "backup": s.last_drill_backup,
            "rto_ms": s.last_drill_rto_ms,
            "data_age_ms": s.last_drill_data_age_ms,
            "error": s.last_drill_error,
        },
    })
}

fn config_cmd(cmd: ConfigCmd) -> Result<(), Box<dyn std::error::Error>> {
    match cmd {
        ConfigCmd::Show { json, node_args } => {
            let (_, settings) = engram::config::explain(node_args)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&settings)?);
            } else {
                let width = settings.iter().map(|s| s.name.len()).max().unwrap_or(0);
                for s in settings {
                    let value = if s.value.is_null() { "(unset)".to_string() } else { s.value.to_string() };
                    println!("{:width$} = {value}  # {}", s.name, s.source);
                }
            }
        }
        ConfigCmd::Validate { node_args } => {
            let config = match engram::config::explain(node_args) {
                Ok((c, _)) => c,
                Err(e) => {
                    eprintln!("invalid: {e}");
                    std::process::exit(2);
                }
            };
            let mut problems = Vec::new();
            if let Some(tls) = &config.tls {
                if let Err(e) = engram::transport::NodeTls::load(tls.clone(), config.node_id) {
                    problems.push(format!("certificates: {e}"));
                }
            }
            if let Some(jwt) = &config.jwt {
                if let Err(e) = engram::auth::jwt::JwtVerifier::load(jwt) {
                    problems.push(format!("jwt: {e}"));
                }
            }
            if problems.is_empty() {
                let mode = if config.insecure { "insecure" } else { "secured" };
                println!("valid: node {} ({mode}), data in {}", config.node_id, config.data_dir.display());
            } else {
                for p in problems {
                    eprintln!("invalid: {p}");
                }
                std::process::exit(2);
            }
        }
    }
    Ok(())
}

fn print_status(addr: &str, s: &pb::StatusResponse) {
    let voters: Vec<String> = s.voters.iter().map(|n| n.id.to_string()).collect();
    let learners: Vec<String> = s.learners.iter().map(|n| n.id.to_string()).collect();
    println!(
        "{addr}  node={} state={} term={} leader={} last_log={} applied={} snapshot={} purged={} voters=[{}] learners=[{}] cluster={}",
        s.node_id,
        s.state,
        s.term,
        s.leader_id,
        s.last_log_index,
        s.applied_index,
        s.snapshot_index,
        s.purged_index,
        voters.join(","),
        learners.join(","),
        if s.cluster_id.is_empty() { "-" } else { &s.cluster_id }
    );
    if s.last_backup_at_ms > 0 {
        println!(
            "    last backup: index {} at {} ms: {}",
            s.last_backup_index, s.last_backup_at_ms, s.last_backup_path
        );
    }
    if s.last_backup_failed_at_ms > 0 {
        println!("    last backup failure at {} ms: {}", s.last_backup_failed_at_ms, s.last_backup_error);
    }
    if s.last_drill_at_ms > 0 {
        match s.last_drill_ok {
            true => println!(
                "    last drill at {} ms: OK, RTO {} ms, data age {} ms ({})",
                s.last_drill_at_ms, s.last_drill_rto_ms, s.last_drill_data_age_ms, s.last_drill_backup
            ),
            false => println!("    last drill at {} ms: FAILED: {}", s.last_drill_at_ms, s.last_drill_error),
        }
    }
}

async fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    // Verify and restore read a file; they need no node, so no connection flags.
    if let Cmd::Backup(BackupCmd::Verify { .. } | BackupCmd::Restore { .. } | BackupCmd::Drill { .. }) = &cli.cmd {
        let Cmd::Backup(cmd) = cli.cmd else { unreachable!("matched above") };
        return backup_file_cmd(cmd).await;
    }
    match cli.cmd {
        Cmd::Certs(cmd) => return certs_cmd(cmd),
        Cmd::Keys(KeysCmd::Rotate { key_file: Some(ref file), at_rest: true }) => {
            let ring = keys::rotate(file)?;
            eprintln!("keyring {} rotated: active key {}", file.display(), hex::encode(ring.active().id()));
        }
        Cmd::Keys(KeysCmd::Rotate { key_file: None, at_rest: true }) => {}
        Cmd::Keys(KeysCmd::Export { at_rest: true, .. }) => {}
        Cmd::Keys(KeysCmd::Export { at_rest: false, .. }) => {
            return Err("keys export exports the cluster's at-rest data keys: pass --at-rest".into())
        }
        Cmd::Keys(cmd) => return keys_cmd(cmd),
        Cmd::Config(cmd) => return config_cmd(cmd),
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "engramctl", &mut std::io::stdout());
            return Ok(());
        }
        Cmd::Man { dir } => {
            use clap::CommandFactory;
            std::fs::create_dir_all(&dir)?;
            for (name, cmd) in [("engramctl", Cli::command()), ("engram", engram::config::NodeArgs::command())] {
                let mut out = Vec::new();
                clap_mangen::Man::new(cmd).render(&mut out)?;
                std::fs::write(dir.join(format!("{name}.1")), out)?;
            }
            println!("wrote {0}/engramctl.1 and {0}/engram.1", dir.display());
            return Ok(());
        }
        _ => {}
    }
    let client = connect(&cli)?;
    match cli.cmd {
        Cmd::Cluster(ClusterCmd::Init { members, root_key_file }) => {
            let members = members.iter().map(|m| parse_member(m)).collect::<Result<Vec<_>, _>>()?;
            if cli.insecure {
                client.admin().init_cluster(members).await?;
                println!("cluster initialized (insecure: no keys)");
            } else {
                let key = root_key(&root_key_file)?;
                client.admin().init_secure_cluster(members, &key).await?;
                println!("cluster initialized; root key {} in {} (mode 0600)", key.id, root_key_file.display());
            }
        }
        Cmd::Cluster(ClusterCmd::Status { json }) | Cmd::Status { json } => {
            for addr in &cli.endpoints {
                let res = client.pinned_like(addr)?.admin().status().await;
                match (res, json) {
                    (Ok(s), false) => print_status(addr, &s),
                    (Err(e), false) => println!("{addr}  unreachable: {e}"),
                    (Ok(s), true) => println!("{}", status_json(addr, &s)),
                    (Err(e), true) => {
                        println!(
                            "{}",
                            serde_json::json!({"endpoint": addr, "reachable": false, "error": e.to_string()})
                        )
                    }
                }
            }
        }
        Cmd::Members(MembersCmd::AddLearner { id, raft_addr, api_addr, no_wait }) => {
            let r = client.admin().add_learner(pb::NodeInfo { id, raft_addr, api_addr }, !no_wait).await?;
            println!("learner {id} added at log index {}", r.log_index);
        }
        Cmd::Members(MembersCmd::Promote { ids }) => {
            let r = client.admin().promote_voters(ids).await?;
            println!("voters now {:?} (log index {})", r.voters.iter().map(|n| n.id).collect::<Vec<_>>(), r.log_index);
        }
        Cmd::Members(MembersCmd::Remove { ids }) => {
            let r = client.admin().remove_nodes(ids).await?;
            println!("voters now {:?} (log index {})", r.voters.iter().map(|n| n.id).collect::<Vec<_>>(), r.log_index);
        }
        Cmd::Members(MembersCmd::Rebuild { id, data_dir, timeout_secs }) => {
            rebuild_member(&client, id, &data_dir, std::time::Duration::from_secs(timeout_secs)).await?
        }
        Cmd::Leader(LeaderCmd::Transfer { to }) => {
            let r = client.admin().transfer_leader(to).await?;
            println!("leader is now {}", r.leader_id);
        }
        Cmd::Namespace(NamespaceCmd::Create { namespace, dimension, metric, policy }) => {
            let metric = match metric.as_str() {
                "cosine" => Metric::Cosine,
                "l2" => Metric::L2,
                "ip" | "inner_product" => Metric::InnerProduct,
                other => return Err(format!("unknown metric {other:?} (cosine | l2 | ip)").into()),
            };
            let policy = policy.as_deref().map(read_policy).transpose()?;
            let r = client.create_namespace_with_policy(&namespace, dimension, metric, policy).await?;
            println!("namespace {namespace} ready (applied at {})", r.applied_index);
        }
        Cmd::Namespace(NamespaceCmd::Show { namespace }) => {
            let d = client.describe_namespace(&namespace).await?;
            let info = d.namespace.unwrap_or_default();
            let metric = Metric::try_from(info.metric).map(|m| m.as_str_name()).unwrap_or("?");
            println!(
                "namespace {}  dimension={} metric={metric} memories={}",
                info.namespace, info.dimension, info.memory_count
            );
            let policy = engram::api::convert::policy_from_pb("policy", d.policy)?;
            println!("{}", serde_json::to_string_pretty(&policy)?);
        }
        Cmd::Namespace(NamespaceCmd::Stats { namespace }) => {
            let d = client.describe_namespace(&namespace).await?;
            let (info, s) = (d.namespace.unwrap_or_default(), d.stats.unwrap_or_default());
            println!("memories       {}", info.memory_count);
            println!("bytes          {}", s.bytes);
            println!("created        {}", s.created);
            println!("updated        {}", s.updated);
            println!("dedup hits     {} ({:.1}% of creating puts)", s.dedup_hits, s.dedup_hit_rate * 100.0);
            println!("near merges    {}", s.near_merges);
            println!("near links     {}", s.near_links);
            println!("consolidated   {}", s.consolidated);
            println!("purged         {}", s.purged);
            println!("retired        {} ({} archived)", s.retired, s.archived);
            println!("reinforced     {}", s.reinforced);
        }
        Cmd::Namespace(NamespaceCmd::Policy { namespace, file }) => {
            let r = client.set_namespace_policy(&namespace, read_policy(&file)?).await?;
            println!("policy of {namespace} set (applied at {})", r.applied_index);
        }
        Cmd::Memory(MemoryCmd::Consolidate { namespace, threshold, dry_run }) => {
            let r = client.consolidate(&namespace, threshold, dry_run).await?;
            for c in &r.clusters {
                let verb = if dry_run {
                    "would merge"
                } else if c.merged {
                    "merged"
                } else {
                    "skipped (changed)"
                };
                println!("{} {verb} {}", c.keep, c.absorb.join(" "));
            }
            if dry_run {
                println!("{} clusters (dry run: nothing changed)", r.clusters.len());
            } else {
                println!(
                    "{} clusters, {} memories absorbed (applied at {})",
                    r.clusters.len(),
                    r.absorbed,
                    r.applied_index
                );
            }
        }
        Cmd::Keys(KeysCmd::Rotate { .. }) => {
            let r = client.admin().rotate_at_rest_key().await?;
            println!(
                "{} data keys wrapped again under master key {} (log index {}); the old master key may now leave every node's key file",
                r.rewrapped,
                hex::encode(&r.master_key_id),
                r.applied_index
            );
        }
        Cmd::Keys(KeysCmd::Export { out, .. }) => {
            let r = client.admin().export_data_keys().await?;
            let (keys, erased): (Vec<engram::storage::vault::DataKeyRow>, Vec<engram::storage::vault::Erasure>) =
                engram::storage::codec::decode_exact(&r.keys)
                    .map_err(|e| format!("the node sent bad data keys: {e}"))?;
            let file = serde_json::json!({
                "format": "engram-data-keys-v1",
                "applied_index": r.applied_index,
                "data_keys": keys,
                "erasures": erased,
            });
            engram::secrets::write_private(&out, serde_json::to_string_pretty(&file)?.as_bytes(), false)?;
            println!(
                "{} data keys and {} erasures at log index {} written to {}",
                keys.len(),
                erased.len(),
                r.applied_index,
                out.display()
            );
        }
        Cmd::Namespace(NamespaceCmd::Erase { namespace }) => {
            let r = client.admin().erase_namespace(&namespace).await?;
            let receipt = serde_json::json!({
                "receipt": "engram-erasure-v1",
                "namespace": namespace,
                "cluster_id": uuid::Uuid::from_slice(&r.cluster_id).map(|u| u.to_string()).unwrap_or_default(),
                "erased_at_index": r.applied_index,
                "erased_at_ms": r.erased_at_ms,
                "memories": r.memories,
                "data_key_destroyed": (!r.data_key_id.is_empty()).then(|| hex::encode(&r.data_key_id)),
                "crypto_shredded": !r.data_key_id.is_empty(),
                "ledger_head": hex::encode(&r.ledger_head),
                "snapshot_index": r.snapshot_index,
            });
            println!("{}", serde_json::to_string_pretty(&receipt)?);
            if r.data_key_id.is_empty() {
                eprintln!("warning: {namespace} was stored unsealed (encryption at rest was off): deleted, but older backups and snapshots still hold it in the clear");
            }
        }
        Cmd::Namespace(NamespaceCmd::Delete { namespace }) => {
            let r = client.delete_namespace(&namespace).await?;
            println!("deleted namespace {namespace} and {} memories", r.deleted_memories);
        }
        Cmd::Memory(MemoryCmd::Put {
            namespace,
            id,
            text,
            embedding,
            tags,
            importance,
            if_absent,
            if_revision,
            create_namespace,
        }) => {
            let client = if create_namespace { client.creating_namespaces() } else { client };
            let tags = parse_tags(&tags)?;
            let memory = NewMemory { id, text, embedding, tags, importance, expires_at_ms: None };
            let pre = match (if_absent, if_revision) {
                (true, _) => Precondition::IfAbsent,
                (_, Some(r)) => Precondition::IfRevision(r),
                _ => Precondition::None,
            };
            let r = client.put_if(&namespace, memory, pre).await?;
            let action = engram::proto::PutAction::try_from(r.action).map(|a| a.as_str_name()).unwrap_or("?");
            let action = action.trim_start_matches("PUT_ACTION_").to_lowercase();
            println!("{} revision={} {action}", r.id, r.revision);
        }
        Cmd::Memory(MemoryCmd::Get { namespace, id, consistency: c }) => {
            let r = client.get_with(&namespace, &id, consistency(&c)?).await?;
            print_memory(&r.memory.unwrap_or_default());
        }
        Cmd::Memory(MemoryCmd::Delete { namespace, id, if_revision }) => {
            let pre = if_revision.map(Precondition::IfRevision).unwrap_or_default();
            let r = client.delete_if(&namespace, &id, pre).await?;
            println!("{}", if r.deleted { "deleted" } else { "not found (nothing to delete)" });
        }
        Cmd::Memory(MemoryCmd::Search { namespace, vector, k, tags, min_importance, consistency: c }) => {
            let tags = parse_tags(&tags)?;
            let req = pb::SearchRequest {
                namespace,
                vector,
                k,
                filter: Some(pb::SearchFilter { tags, min_importance, ..Default::default() }),
                include_memory: true,
                consistency: consistency(&c)? as i32,
                ..Default::default()
            };
            for hit in client.search_with(req).await?.hits {
                print!("score={:.4}  ", hit.score);
                print_memory(&hit.memory.unwrap_or_default());
            }
        }
        Cmd::Memory(MemoryCmd::SearchBatch { namespace, file, k, consistency: c }) => {
            let text = std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            let mut queries = Vec::new();
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let vector = line
                    .split(',')
                    .map(|x| x.trim().parse::<f32>())
                    .collect::<Result<Vec<f32>, _>>()
                    .map_err(|e| format!("{}:{}: {e}", file.display(), n + 1))?;
                queries.push(pb::SearchRequest { namespace: namespace.clone(), vector, k, ..Default::default() });
            }
            let r = client.search_batch(queries, consistency(&c)?).await?;
            for (i, result) in r.results.iter().enumerate() {
                let hits: Vec<String> = result.hits.iter().map(|h| format!("{}={:.4}", h.id, h.score)).collect();
                println!("query {i}: {}", hits.join("  "));
            }
        }
        Cmd::Backup(cmd) => backup_cmd(&client, cmd).await?,
        Cmd::Auth(cmd) => auth_cmd(&client, cmd).await?,
        Cmd::Quota(cmd) => quota_cmd(&client, cmd).await?,
        Cmd::Certs(_) | Cmd::Keys(_) | Cmd::Config(_) | Cmd::Completions { .. } | Cmd::Man { .. } => {
            unreachable!("handled before connecting")
        }
        Cmd::Snapshot => {
            let index = client.admin().trigger_snapshot().await?;
            println!("snapshot at log index {index}");
        }
        Cmd::Ledger(LedgerCmd::Verify) => ledger_verify(&client, &cli.endpoints).await?,
        Cmd::Cluster(ClusterCmd::Verify { wait_ms }) => cluster_verify(&client, &cli.endpoints, wait_ms).await?,
        Cmd::Ledger(LedgerCmd::Export { from, to }) => {
            let mut from = from;
            loop {
                let page = client.admin().export_ledger(from, to, 10_000).await?;
                for l in &page.links {
                    let line = serde_json::json!({
                        "index": l.index,
                        "entry_hash": hex::encode(&l.entry_hash),
                        "head": hex::encode(&l.head),
                    });
                    println!("{line}");
                }
                if page.next_index == 0 {
                    break;
                }
                from = page.next_index;
            }
        }
        Cmd::Memory(MemoryCmd::List { namespace, page_size, page_token, consistency: c }) => {
            let r = client.list(&namespace, page_size, &page_token, consistency(&c)?).await?;
            for m in &r.memories {
                print_memory(m);
            }
            if !r.next_page_token.is_empty() {
                println!("next page: --page-token {}", r.next_page_token);
            }
        }
    }
    Ok(())
}

/// `cluster verify`: one mark through the log, then every endpoint's digest right after it.
/// `members rebuild`: see its help. Every step says what it did; a step that fails leaves the
/// ones before it done and says how far it got, so a rerun (or the plain `members` commands)
/// can finish.
async fn rebuild_member(
    client: &Client,
    id: u64,
    data_dir: &std::path::Path,
    timeout: std::time::Duration,
) -> Result<(), Box<dyn std::error::Error>> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    use std::time::{Duration, Instant};
    let recorded = std::fs::read_to_string(data_dir.join("node_id"))
        .map_err(|e| format!("{}: no node_id file ({e}): is this a node's data dir?", data_dir.display()))?;
    if recorded.trim() != id.to_string() {
        return Err(format!("{} belongs to node {}, not {id}", data_dir.display(), recorded.trim()).into());
    }
    let status = client.admin().status().await?;
    if status.node_id == id {
        return Err(format!("--endpoints reached node {id} itself: name the other members").into());
    }
    let (node, was_voter) =
        match (status.voters.iter().find(|n| n.id == id), status.learners.iter().find(|n| n.id == id)) {
            (Some(n), _) => (n.clone(), true),
            (None, Some(n)) => (n.clone(), false),
            (None, None) => return Err(format!("node {id} is not a member of this cluster").into()),
        };
    // A node that answers is running: it must be stopped before its files move.
    let own = client.pinned_like(&node.api_addr)?;
    if tokio::time::timeout(Duration::from_secs(3), own.admin().status()).await.is_ok_and(|r| r.is_ok()) {
        return Err(format!("node {id} answers at {}: stop it before rebuilding it", node.api_addr).into());
    }
    let r = client.admin().remove_nodes(vec![id]).await?;
    println!("node {id} removed (log index {})", r.log_index);
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let mut aside = data_dir.as_os_str().to_owned();
    aside.push(format!(".damaged-{secs}"));
    let aside = PathBuf::from(aside);
    std::fs::rename(data_dir, &aside)?;
    std::fs::DirBuilder::new().mode(0o700).create(data_dir)?;
    let node_id = data_dir.join("node_id");
    std::fs::write(&node_id, id.to_string())?;
    std::fs::set_permissions(&node_id, std::fs::Permissions::from_mode(0o600))?;
    println!(
        "data dir moved to {} (delete it once the node is back); {} is empty",
        aside.display(),
        data_dir.display()
    );
    let r = client.admin().add_learner(node.clone(), false).await?;
    println!("node {id} added back as a learner (log index {}): start it now", r.log_index);
    // Caught up: the node has applied what the leader had applied when it was added back.
    let target = client.admin().status().await?.applied_index;
    let deadline = Instant::now() + timeout;
    loop {
        match tokio::time::timeout(Duration::from_secs(3), own.admin().status()).await {
            Ok(Ok(s)) if s.applied_index >= target => break,
            _ if Instant::now() > deadline => {
                return Err(format!(
                    "node {id} did not start and catch up to index {target} in {timeout:?}; once it has, run \
                     `engramctl members promote {id}`{}",
                    if was_voter { "" } else { " (it was a learner: nothing to promote)" }
                )
                .into())
            }
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    println!("node {id} caught up to index {target}");
    if was_voter {
        let r = client.admin().promote_voters(vec![id]).await?;
        println!("voters now {:?} (log index {})", r.voters.iter().map(|n| n.id).collect::<Vec<_>>(), r.log_index);
    }
    println!("node {id} rebuilt");
    Ok(())
}

async fn cluster_verify(client: &Client, endpoints: &[String], wait_ms: u32) -> Result<(), Box<dyn std::error::Error>> {
    let mark = client.admin().propose_mark().await?;
    println!("mark {} at log index {}", mark.mark_id, mark.index);
    let mut failed = false;
    let mut digests = Vec::new();
    for addr in endpoints {
        match client.pinned_like(addr)?.admin().mark_digest(&mark.mark_id, wait_ms).await {
            Ok(d) => digests.push((addr.clone(), hex::encode(&d.digest), hex::encode(&d.head))),
            Err(e) => {
                failed = true;
                println!("{addr}  no digest at the mark: {e}");
            }
        }
    }
    let majority = majority(digests.iter().map(|(_, d, _)| d)).cloned();
    for (addr, d, head) in &digests {
        let verdict = match &majority {
            Some(m) if m == d => "ok",
            Some(_) => {
                failed = true;
                "DIVERGED"
            }
            None => {
                failed = true;
                "no majority"
            }
        };
        println!("{addr}  {verdict}: state digest {d}, ledger head {head}");
    }
    if failed {
        return Err("cluster verification failed".into());
    }
    println!("all {} endpoints hold the same state at index {}", digests.len(), mark.index);
    Ok(())
}

/// `ledger verify`: each endpoint checks its own ledger; then the heads of all of them (a
/// broken one's too) are compared at the last index every one holds, which names a replica
/// whose history differs from the majority's.
async fn ledger_verify(client: &Client, endpoints: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let mut failed = false;
    let mut checked = Vec::new();
    for addr in endpoints {
        let pinned = client.pinned_like(addr)?;
        match pinned.admin().verify_ledger().await {
            Ok(r) if r.ok => {
                println!(
                    "{addr}  ok: {} rows, indexes {}..={}, {} checked against the log, head {}",
                    r.rows,
                    r.first_index,
                    r.last_index,
                    r.checked_against_log,
                    hex::encode(&r.head)
                );
                if r.rows > 0 {
                    checked.push((addr.clone(), pinned, Some(r.first_index), r.last_index));
                }
            }
            Ok(r) => {
                failed = true;
                println!("{addr}  BROKEN at index {}: {}", r.broken_index, r.reason);
                // Its rows still say what history it applied: compared below with the others.
                checked.push((addr.clone(), pinned, None, r.applied_index));
            }
            Err(e) => {
                failed = true;
                println!("{addr}  unreachable: {e}");
            }
        }
    }
    // The last index every ledger holds (rows before a node's first one it never had).
    let common = checked.iter().map(|c| c.3).min();
    // Heads are comparable only between chains that start at the same index (a node that
    // predates the ledger, or was restored from an older dump, starts later): otherwise the
    // entry hash at the common index is compared instead.
    let starts: std::collections::BTreeSet<u64> = checked.iter().filter_map(|c| c.2).collect();
    let by_head = starts.len() <= 1;
    if !by_head {
        println!("the chains start at different indexes {starts:?}: comparing entry hashes, not heads");
    }
    if let (Some(at), true) = (common, checked.len() > 1) {
        let mut heads = Vec::new();
        for (addr, pinned, first, _) in &checked {
            if first.is_some_and(|f| f > at) {
                continue;
            }
            match pinned.admin().export_ledger(at, at, 1).await {
                Ok(page) => match page.links.first() {
                    Some(l) if l.index == at => {
                        heads.push((addr.clone(), hex::encode(if by_head { &l.head } else { &l.entry_hash })))
                    }
                    _ => {
                        failed = true;
                        println!("{addr}  has no ledger row at index {at}");
                    }
                },
                Err(e) => {
                    failed = true;
                    println!("{addr}  could not export its ledger row at index {at}: {e}");
                }
            }
        }
        // The head most endpoints agree on; the others diverged.
        match majority(heads.iter().map(|(_, h)| h)) {
            Some(majority) => {
                for (addr, h) in heads.iter().filter(|(_, h)| h != majority) {
                    failed = true;
                    println!("{addr}  DIVERGED: head at index {at} is {h}, the others' {majority}");
                }
                if !failed && heads.len() > 1 {
                    println!("all {} endpoints agree at index {at}: head {majority}", heads.len());
                }
            }
            None if !heads.is_empty() => {
                failed = true;
                println!("no head at index {at} is held by a majority of the endpoints:");
                for (addr, h) in &heads {
                    println!("{addr}  head {h}");
                }
            }
            None => {}
        }
    }
    if failed {
        return Err("ledger verification failed".into());
    }
    Ok(())
}

fn open(file: &std::path::Path) -> Result<std::fs::File, String> {
    std::fs::File::open(file).map_err(|e| format!("{}: {e}", file.display()))
}

/// The file, read through a progress bar (drawn on a terminal only) over its size.
fn read_with_bar(
    file: &std::path::Path,
    message: &str,
) -> Result<(indicatif::ProgressBarIter<std::fs::File>, indicatif::ProgressBar), String> {
    let f = open(file)?;
    let len = f.metadata().map_err(|e| format!("{}: {e}", file.display()))?.len();
    let bar = progress::bytes_bar(Some(len), false, message);
    Ok((bar.wrap_read(f), bar))
}

async fn backup_cmd(client: &Client, cmd: BackupCmd) -> Result<(), Box<dyn std::error::Error>> {
    match cmd {
        BackupCmd::Verify { .. } | BackupCmd::Restore { .. } | BackupCmd::Drill { .. } => backup_file_cmd(cmd).await?,
        BackupCmd::RestoreNamespace { file, namespace, ids, dry_run, key_file } => {
            restore_namespace(client, file, namespace, ids, dry_run, key_file).await?
        }
        BackupCmd::Create { target } => {
            // The node's estimate of the total (its state file; the archive is compressed).
            let mut bar: Option<indicatif::ProgressBar> = None;
            let res = client
                .admin()
                .create_backup_with_progress(&target, |got, estimate| {
                    let b = bar.get_or_insert_with(|| progress::bytes_bar(estimate, true, "backing up"));
                    if b.length().is_some_and(|len| got > len) {
                        b.set_length(got);
                    }
                    b.set_position(got);
                })
                .await;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            let (path, h) = res?;
            let bytes = std::fs::metadata(&path)?.len();
            println!(
                "backup {} written to {} ({bytes} bytes) at log index {}, key {}",
                uuid::Uuid::from_bytes(h.backup_id),
                path.display(),
                h.applied_index,
                hex::encode(h.key_id)
            );
        }
    }
    Ok(())
}

/// The backup commands that work on a file alone.
async fn backup_file_cmd(cmd: BackupCmd) -> Result<(), Box<dyn std::error::Error>> {
    match cmd {
        BackupCmd::Create { .. } => return Err("backup create streams from a node".into()),
        BackupCmd::RestoreNamespace { .. } => return Err("restore-namespace restores into a running cluster".into()),
        BackupCmd::Verify { file, key_file } => {
            let keys = Keyring::resolve(key_file.as_deref())?;
            let info = tokio::task::spawn_blocking(move || {
                let (input, bar) = read_with_bar(&file, "verifying")?;
                let res = backup::verify(input, &keys).map_err(|e| e.to_string());
                bar.finish_and_clear();
                res
            })
            .await??;
            println!("OK: {info}");
        }
        BackupCmd::Restore { file, data_dir, node_id, members, force, key_file, data_keys, at_rest_key_file } => {
            let keys = Keyring::resolve(key_file.as_deref())?;
            let at_rest = at_rest_of(data_keys.as_deref(), at_rest_key_file.as_deref())?;
            let mut map = BTreeMap::new();
            for m in &members {
                let n = parse_member(m)?;
                map.insert(n.id, engram::raft::EngramNode { raft_addr: n.raft_addr, api_addr: n.api_addr });
            }
            let target = restore::RestoreTarget { data_dir, node_id, members: map, force, at_rest };
            let info = tokio::task::spawn_blocking(move || {
                let (input, bar) = read_with_bar(&file, "restoring")?;
                let res = restore::restore(input, &keys, &target).map_err(|e| e.to_string());
                bar.finish_and_clear();
                res
            })
            .await??;
            println!("restored: {}", info.info);
            for e in &info.erased {
                let at = e.erased_at_index.map(|i| format!(" at log index {i}")).unwrap_or_default();
                let key = e.key.map(|k| format!(", data key {} destroyed", hex::encode(k))).unwrap_or_default();
                println!("erased (left out): namespace {} ({} memories), erased{at}{key}", e.namespace, e.memories);
            }
            println!("start every member on its restored data dir; no `cluster init` is needed");
        }
        BackupCmd::Drill {
            path,
            key_file,
            nodes,
            queries,
            engram_bin,
            scratch_dir,
            timeout_secs,
            data_keys,
            at_rest_key_file,
        } => {
            let keys = Keyring::resolve(key_file.as_deref())?;
            let at_rest = at_rest_of(data_keys.as_deref(), at_rest_key_file.as_deref())?;
            let archive = if path.is_dir() {
                backup::drill::latest_in(&path)?.ok_or_else(|| format!("no backup in {}", path.display()))?
            } else {
                path
            };
            let engram_bin = match engram_bin {
                Some(b) => b,
                None => std::env::current_exe()?.with_file_name("engram"),
            };
            let mut spec =
                backup::drill::DrillSpec::new(archive, engram_bin, scratch_dir.unwrap_or_else(std::env::temp_dir));
            spec.nodes = nodes;
            spec.queries_per_namespace = queries;
            spec.timeout = std::time::Duration::from_secs(timeout_secs);
            spec.at_rest = at_rest;
            let report = backup::drill::run(&spec, &keys).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            if !report.ok {
                eprintln!("drill FAILED: {}", report.problems.join("; "));
                std::process::exit(1);
            }
            eprintln!(
                "drill OK: RTO {} ms (restore {} ms, start {} ms), data age {} ms, recall@10 {:.4} over {} searches",
                report.rto_ms,
                report.restore_ms,
                report.start_ms,
                report.data_age_ms,
                report.recall_at_10,
                report.queries
            );
        }
    }
    Ok(())
}

/// `backup restore-namespace`: the backup's rows of one namespace, compared with the live
/// namespace, then (unless a dry run) restored through the log.
async fn restore_namespace(
    client: &Client,
    file: PathBuf,
    namespace: String,
    ids: Vec<String>,
    dry_run: bool,
    key_file: Option<PathBuf>,
) -> Result<(), Box<dyn std::error::Error>> {
    engram::memory::validate_namespace(&namespace)?;
    for id in &ids {
        engram::memory::validate_id("ids", id)?;
    }
    let keys = Keyring::resolve(key_file.as_deref())?;
    let ns = namespace.clone();
    let (info, rows) = tokio::task::spawn_blocking(move || {
        let (input, bar) = read_with_bar(&file, "reading")?;
        let res = backup::namespace_of(input, &keys, &ns).map_err(|e| e.to_string());
        bar.finish_and_clear();
        res
    })
    .await??;
    let mut rows =
        rows.ok_or_else(|| format!("the backup (index {}) has no namespace {namespace}", info.header.applied_index))?;
    let mut live = match client.list_all(&namespace).await {
        Ok(l) => l,
        Err(e) if e.code == tonic::Code::NotFound && ids.is_empty() => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    if !ids.is_empty() {
        // Only these memories: every one must be in the backup, and the plan covers them alone.
        let wanted: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
        let sealed = rows.sealed_ids();
        let held: BTreeSet<&str> =
            rows.memories.iter().map(|m| m.id.as_str()).chain(sealed.iter().map(String::as_str)).collect();
        let absent: Vec<&str> = wanted.difference(&held).copied().collect();
        if !absent.is_empty() {
            return Err(format!("not in the backup's {namespace}: {}", absent.join(", ")).into());
        }
        rows.retain_ids(|id| wanted.contains(id));
        live.retain(|m| wanted.contains(m.id.as_str()));
    }
    let diff = backup::restore_diff(&rows, &live);
    let bytes =
        engram::storage::codec::encode(&rows.memories).len() + engram::storage::codec::encode(&rows.sealed).len();
    let mut out = serde_json::json!({
        "namespace": namespace,
        "backup_index": info.header.applied_index,
        "backup_memories": rows.len(),
        "live_memories": live.len(),
        "added": diff.added.len(),
        "changed": diff.changed.len(),
        "removed": diff.removed.len(),
        "unchanged": diff.unchanged,
        // Sealed at rest: only the cluster opens them, so their content is not compared here.
        "sealed": diff.sealed.len(),
        "dry_run": dry_run,
    });
    // One entry carries the whole namespace: refuse here what the node would refuse anyway.
    let limit = engram::server::MAX_MESSAGE_BYTES - (64 << 10);
    if bytes > limit {
        return Err(format!(
            "{namespace} holds {bytes} bytes of memories in the backup; a partial restore carries at most {limit} in one entry. Restore the whole backup into a new cluster instead (backup restore)"
        )
        .into());
    }
    if !dry_run {
        let admin = client.admin();
        let r = match ids.is_empty() {
            true => admin.restore_namespace(&rows).await?,
            false => admin.restore_memories(&rows).await?,
        };
        out["applied_index"] = r.applied_index.into();
        out["restored"] = r.restored.into();
        out["replaced"] = r.replaced.into();
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// What restoring a backup sealed at rest needs, from `--data-keys` and the master keyring.
fn at_rest_of(
    data_keys: Option<&std::path::Path>,
    key_file: Option<&std::path::Path>,
) -> Result<Option<restore::AtRest>, Box<dyn std::error::Error>> {
    let Some(path) = data_keys else { return Ok(None) };
    let master = engram::storage::vault::master_keys(key_file)?
        .ok_or("--data-keys needs the at-rest master key: --at-rest-key-file or ENGRAM_AT_REST_KEY")?;
    let (keys, erasures) = read_data_keys(path)?;
    Ok(Some(restore::AtRest { master, keys, erasures }))
}

/// A data key file `keys export --at-rest` wrote.
type DataKeys = (Vec<engram::storage::vault::DataKeyRow>, Vec<engram::storage::vault::Erasure>);

fn read_data_keys(path: &std::path::Path) -> Result<DataKeys, Box<dyn std::error::Error>> {
    #[derive(serde::Deserialize)]
    struct File {
        format: String,
        data_keys: Vec<engram::storage::vault::DataKeyRow>,
        erasures: Vec<engram::storage::vault::Erasure>,
    }
    let bytes = engram::secrets::read_private(path).map_err(|e| format!("data keys {e}"))?;
    let file: File =
        serde_json::from_slice(&bytes).map_err(|e| format!("{}: not a data key file: {e}", path.display()))?;
    if file.format != "engram-data-keys-v1" {
        return Err(format!("{}: unknown data key file format {:?}", path.display(), file.format).into());
    }
    Ok((file.data_keys, file.erasures))
}

fn keys_cmd(cmd: KeysCmd) -> Result<(), Box<dyn std::error::Error>> {
    let (ring, what) = match cmd {
        KeysCmd::Generate { key_file } => (keys::generate(&key_file)?, "created"),
        KeysCmd::Rotate { key_file: Some(key_file), .. } => (keys::rotate(&key_file)?, "rotated"),
        KeysCmd::Rotate { key_file: None, .. } => return Err("keys rotate needs --key-file (or --at-rest)".into()),
        KeysCmd::Export { .. } => unreachable!("handled with a connection"),
        KeysCmd::List { key_file } => (Keyring::load(&key_file)?, "listed"),
    };
    for (id, created_at_ms, active) in ring.ids() {
        println!("{}  created_at_ms={created_at_ms}{}", hex::encode(id), if active { "  (active)" } else { "" });
    }
    eprintln!("keyring {what}");
    Ok(())
}

#[tokio::main]
async fn main() {
    if let Err(e) = run(Cli::parse()).await {
        match e.downcast_ref::<ClientError>() {
            Some(ce) => eprintln!("engramctl: {ce} (write outcome: {:?})", ce.outcome),
            None => eprintln!("engramctl: {e}"),
        }
        std::process::exit(1);
    }
}

/// A policy from a JSON file, checked as the server will.
fn read_policy(path: &std::path::Path) -> Result<engram::proto::MemoryPolicy, Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let policy: engram::memory::MemoryPolicy =
        serde_json::from_str(&text).map_err(|e| format!("{}: not a memory policy: {e}", path.display()))?;
    Ok(engram::api::convert::policy_to_pb(policy))
}
