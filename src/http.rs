//! The HTTP side door: Prometheus `/metrics`, liveness `/healthz`, readiness `/readyz`
//! (ready = this node knows a leader and has applied at least one entry of its term), and
//! `/status`: per-subsystem health as JSON (see [`status`]).

use std::sync::OnceLock;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use openraft::async_runtime::watch::WatchReceiver;

use crate::raft::RaftNode;

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Namespaces that get their own label value (`metrics_namespaces`); the first node started in
/// a process sets it.
static LABELLED: OnceLock<std::collections::HashSet<String>> = OnceLock::new();

/// Sets which namespaces get their own metric series.
pub fn label_namespaces(names: &[String]) {
    let _ = LABELLED.set(names.iter().cloned().collect());
}

/// The allow-listed namespaces.
pub fn labelled_namespaces() -> impl Iterator<Item = &'static String> {
    LABELLED.get().into_iter().flatten()
}

/// The `namespace` label value for `ns`: itself when allow-listed, else `_other`, so a tenant
/// creating namespaces cannot create metric series.
pub fn namespace_label(ns: &str) -> String {
    match LABELLED.get() {
        Some(set) if set.contains(ns) => ns.to_string(),
        _ => "_other".to_string(),
    }
}

/// The process-wide metrics recorder (installed once; in-process test clusters share it).
pub fn prometheus() -> &'static PrometheusHandle {
    PROMETHEUS.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (embedding); then ours only renders.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        handle
    })
}

/// Help text for every metric (Prometheus `# HELP`).
fn describe() {
    metrics::describe_histogram!("engram_api_request_duration_seconds", "Client RPC latency, by method.");
    metrics::describe_counter!("engram_api_requests_total", "Client RPCs, by method and outcome code.");
    metrics::describe_counter!("engram_audit_events_total", "Audit-trail events written, by kind.");
    metrics::describe_gauge!("engram_backup_last_bytes", "Size of this node's last scheduled backup.");
    metrics::describe_counter!(
        "engram_backup_drills_total",
        "Scheduled DR drills, by result: ok, failed (a check did not pass), error (could not run)."
    );
    metrics::describe_gauge!(
        "engram_backup_drill_rto_seconds",
        "Recovery time of the last drill: restore, start, first committed write."
    );
    metrics::describe_gauge!(
        "engram_backup_drill_data_age_seconds",
        "Age of the drilled backup's data when the last drill began (the recovery point)."
    );
    metrics::describe_gauge!(
        "engram_backup_drill_recall",
        "Recall@10 of the last drill's scratch searches against the backup's exact answers."
    );
    metrics::describe_gauge!(
        "engram_backup_drill_last_success_timestamp_seconds",
        "Unix time of this node's last passing drill."
    );
    metrics::describe_gauge!(
        "engram_backup_last_failure_timestamp_seconds",
        "Unix time of this node's last failed scheduled backup."
    );
    metrics::describe_gauge!(
        "engram_backup_last_success_timestamp_seconds",
        "Unix time of this node's last successful scheduled backup."
    );
    metrics::describe_histogram!("engram_backup_seconds", "Time to take a scheduled backup.");
    metrics::describe_histogram!("engram_backup_stream_seconds", "Time to stream a backup to a client.");
    metrics::describe_counter!("engram_backups_total", "Backups taken, by outcome.");
    metrics::describe_counter!(
        "engram_data_keys_created_total",
        "Namespace data keys (encryption at rest) this node applied."
    );
    metrics::describe_counter!(
        "engram_data_keys_destroyed_total",
        "Namespace data keys destroyed by erasures (crypto-shredding) this node applied."
    );
    metrics::describe_counter!(
        "engram_at_rest_rewrap_unopenable_total",
        "Data keys rewrapped under a master key this node's at-rest key file lacks (it would not restart)."
    );
    metrics::describe_counter!("engram_connections_accepted_total", "Connections accepted, by listener.");
    metrics::describe_counter!("engram_connections_idle_closed_total", "Connections closed for idling, by listener.");
    metrics::describe_counter!(
        "engram_connections_refused_total",
        "Connections refused (limit, handshake), by listener and reason."
    );
    metrics::describe_gauge!("engram_data_dir_free_bytes", "Free bytes on the data directory's filesystem.");
    metrics::describe_gauge!(
        "engram_disk_reserve_bytes",
        "Free bytes the data dir keeps: below them writes that add data are refused (0: admission off)."
    );
    metrics::describe_counter!(
        "engram_storage_damaged_files_total",
        "Data files refused at start because their pages did not verify (see docs/operations.md)."
    );
    metrics::describe_gauge!("engram_disk_low", "1 while free space on the data dir is below the reserve.");
    metrics::describe_counter!(
        "engram_disk_refused_writes_total",
        "Writes refused with RESOURCE_EXHAUSTED because this node or a majority of the voters was short of disk."
    );
    metrics::describe_counter!(
        "engram_disk_full_restarts_total",
        "Times Raft stopped on a full disk and the node waited for space to start again (the engram binary re-executes itself)."
    );
    metrics::describe_counter!(
        "engram_forwarded_writes_total",
        "Client writes a follower forwarded to the leader, by result."
    );
    metrics::describe_counter!(
        "engram_idempotent_replays_total",
        "Writes answered from the idempotency table instead of applied again."
    );
    metrics::describe_counter!("engram_memory_archive_failures_total", "Retention archives that failed to write.");
    metrics::describe_counter!("engram_memory_archived_total", "Memories archived by retention, by namespace.");
    metrics::describe_counter!("engram_memory_consolidated_total", "Memories absorbed by consolidation, by namespace.");
    metrics::describe_counter!(
        "engram_memory_dedup_hits_total",
        "Puts answered with an exact duplicate, by namespace."
    );
    metrics::describe_counter!("engram_memory_merges_total", "Near-duplicate merges, by namespace.");
    metrics::describe_counter!("engram_memory_purged_total", "Expired memories purged, by namespace.");
    metrics::describe_counter!(
        "engram_memory_refusals_total",
        "Writes refused by a namespace rule, by namespace and rule."
    );
    metrics::describe_counter!(
        "engram_peer_unauthenticated_total",
        "Peer requests refused for lacking a cluster certificate."
    );
    metrics::describe_gauge!("engram_raft_applied_index", "Log index this node's state machine has applied.");
    metrics::describe_histogram!(
        "engram_read_barrier_batch_size",
        "Reads that shared one leadership confirmation, by barrier (read_index, lease)."
    );
    metrics::describe_counter!(
        "engram_vector_rebuilds_scheduled_total",
        "Background shard rebuilds asked for (kind switches and compactions)."
    );
    metrics::describe_counter!(
        "engram_vector_compactions_total",
        "HNSW shards rebuilt to drop tombstones (replaced and deleted vectors)."
    );
    metrics::describe_counter!(
        "engram_vector_rebuild_failures_total",
        "Background shard rebuilds that failed (the old shard stays in use)."
    );
    metrics::describe_gauge!("engram_raft_is_leader", "1 while this node is the leader.");
    metrics::describe_gauge!("engram_raft_last_log_index", "Last log index in this node's log.");
    metrics::describe_counter!("engram_raft_log_appended_entries_total", "Entries appended to this node's log.");
    metrics::describe_histogram!("engram_raft_log_append_batch_entries", "Entries per durable log append.");
    metrics::describe_counter!(
        "engram_raft_log_syncs_total",
        "Durable (fsynced) log writes, by what they wrote: append, vote, committed, truncate, purge."
    );
    metrics::describe_counter!(
        "engram_raft_misaddressed_requests_total",
        "Peer requests refused because they named another node."
    );
    metrics::describe_counter!("engram_raft_refused_messages_total", "Peer messages refused by the guard, by kind.");
    metrics::describe_gauge!("engram_raft_snapshot_index", "Log index of this node's latest snapshot.");
    metrics::describe_gauge!("engram_raft_term", "This node's current Raft term.");
    metrics::describe_counter!("engram_rate_limited_total", "Requests refused by a rate limit, by limit.");
    metrics::describe_counter!(
        "engram_reinforcement_dropped_total",
        "Reinforcement hits dropped (follower, full buffer)."
    );
    metrics::describe_counter!("engram_reinforcement_entries_total", "Coalesced reinforcement entries proposed.");
    metrics::describe_histogram!("engram_search_batch_duration_seconds", "SearchBatch latency.");
    metrics::describe_histogram!("engram_search_duration_seconds", "Search latency.");
    metrics::describe_counter!(
        "engram_search_speculation_total",
        "Linearizable searches run while their read barrier was in flight, by outcome: kept (the shards had applied the read index) or redone."
    );
    metrics::describe_counter!("engram_sm_applied_entries_total", "Log entries applied to the state machine.");
    metrics::describe_histogram!("engram_sm_apply_batch_entries", "Log entries per state-machine apply transaction.");
    metrics::describe_histogram!("engram_snapshot_build_seconds", "Time to build a snapshot.");
    metrics::describe_gauge!("engram_snapshot_bytes", "Size of the latest snapshot.");
    metrics::describe_histogram!("engram_snapshot_install_seconds", "Time to install a snapshot from the leader.");
    metrics::describe_counter!("engram_tls_handshake_failures_total", "TLS handshakes that failed, by listener.");
    metrics::describe_counter!("engram_tls_reload_failures_total", "Certificate reloads that failed.");
    metrics::describe_counter!("engram_tls_reloads_total", "Certificate reloads.");
    metrics::describe_counter!("engram_vector_checkpoint_failures_total", "Vector index checkpoints that failed.");
    metrics::describe_counter!(
        "engram_cluster_verify_runs_total",
        "The leader's background cluster verifications, by outcome (ok, diverged, no_majority, incomplete, failed)."
    );
    metrics::describe_gauge!(
        "engram_cluster_verify_diverged_nodes",
        "Members whose state digest differed from the majority's at the last background cluster verify."
    );
    metrics::describe_gauge!("engram_cluster_verify_index", "Log index of the last background cluster verify's mark.");
    metrics::describe_counter!(
        "engram_ledger_verify_failures_total",
        "Ledger verifications (VerifyLedger) that found an index that does not check out."
    );
    metrics::describe_histogram!(
        "engram_vector_checkpoint_freeze_seconds",
        "Time a vector checkpoint held the shards (copying the changed ones); writing the copies happens after."
    );
    metrics::describe_counter!("engram_vector_checkpoints_total", "Vector index checkpoints written.");
    metrics::describe_counter!("engram_vector_gpu_searches_total", "Searches served from a GPU copy of a shard.");
    metrics::describe_histogram!("engram_vector_gpu_upload_seconds", "Time to upload a shard part to the GPU.");
    metrics::describe_counter!("engram_vector_gpu_uploads_total", "Shard parts uploaded to the GPU.");
    metrics::describe_gauge!("engram_vector_indexed_memories", "Memories in this node's vector shards.");
    metrics::describe_counter!(
        "engram_vector_rebuilds_total",
        "Vector shards rebuilt from the state machine, by reason."
    );
    metrics::describe_gauge!(
        "engram_vector_shard_memories",
        "Memories in a namespace's shard (allow-listed namespaces)."
    );
    metrics::describe_counter!("engram_vector_shard_opens_total", "Vector shards opened, by source (file, rebuild).");
    metrics::describe_gauge!("engram_vector_shards", "Vector shards on this node.");
}

/// What the HTTP handlers look at.
#[derive(Clone)]
pub struct HttpState {
    pub node: RaftNode,
    pub reader: crate::storage::StateReader,
    pub vectors: std::sync::Arc<crate::vector::VectorStore>,
    pub last_backup: crate::backup::schedule::BackupStatus,
    /// The leader's last background `cluster verify`.
    pub last_verify: crate::raft::cluster_verify::VerifyStatus,
    /// 0: no background verification.
    pub cluster_verify_interval_secs: u64,
    /// 0: no scheduled backups.
    pub backup_interval_secs: u64,
    pub data_dir: std::path::PathBuf,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status_handler))
        .with_state(state)
}

/// Per-subsystem health, each `"ok"`, `"degraded"` (works, needs attention) or `"down"`, and
/// the worst of them at the top:
///
/// * `raft`: down without a known leader; degraded while applying lags the log by more than
///   1,000 entries;
/// * `storage`: down when the state machine cannot be read; degraded below twice the disk
///   reserve (`storage::space`), with `disk.writes` `"refused"` below the reserve itself
///   (on the leader also when a majority of the voters is below theirs);
/// * `vectors`: degraded while the shards lag the state machine by more than 1,000 entries;
/// * `backups`: `disabled` without a schedule, `standby` on a follower (the leader takes
///   them); on the leader degraded when the last one failed after the last success, or none
///   succeeded within two intervals.
pub fn status(s: &HttpState) -> serde_json::Value {
    use serde_json::json;
    let m = s.node.raft.metrics().borrow_watched().clone();
    let last_log = m.last_log_index.unwrap_or(0);
    let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
    let raft_health = match m.current_leader {
        None => "down",
        Some(_) if last_log.saturating_sub(applied) > 1000 => "degraded",
        Some(_) => "ok",
    };
    let raft = json!({
        "status": raft_health,
        "state": crate::api::admin_service::state_name(m.state),
        "term": m.current_term,
        "leader_id": m.current_leader,
        "last_log_index": last_log,
        "applied_index": applied,
        "snapshot_index": m.snapshot.map(|l| l.index).unwrap_or(0),
    });
    let free = free_bytes(&s.data_dir);
    let space = s.node.space().report();
    let voters: Vec<u64> = m.membership_config.membership().voter_ids().collect();
    let low_voters = if m.current_leader == Some(m.id) { s.node.space().low_voters(&voters, m.id) } else { vec![] };
    let refused = space.low || crate::storage::space::majority_low(voters.len(), low_voters.len());
    let short = free.is_some_and(|f| f < space.reserve_bytes.saturating_mul(2));
    let storage = match s.reader.applied_index() {
        Err(e) => json!({"status": "down", "error": e.to_string()}),
        Ok(idx) => {
            let vault = s.reader.vault();
            json!({
                "status": if short || refused { "degraded" } else { "ok" },
                "applied_index": idx,
                "free_bytes": free,
                // Disk-space admission (see `storage::space`): below the reserve, writes that add
                // data are refused with RESOURCE_EXHAUSTED; `low_voters` only on the leader.
                "disk": {
                    "free_bytes": space.free_bytes,
                    "reserve_bytes": space.reserve_bytes,
                    "low": space.low,
                    "writes": if refused { "refused" } else { "accepted" },
                    "low_voters": low_voters,
                },
                // Encryption at rest: whether new content is sealed, under which master key, and
                // how many namespace data keys this node holds (ids only; see docs/encryption.md).
                "at_rest": {
                    "enabled": vault.enabled(),
                    "master_key": vault.active_kek().map(hex::encode),
                    "data_keys": vault.len(),
                },
            })
        }
    };
    let shards = s.vectors.shard_kinds();
    let vectors_applied = s.vectors.applied();
    let vectors = json!({
        "status": if applied.saturating_sub(vectors_applied) > 1000 { "degraded" } else { "ok" },
        "applied_index": vectors_applied,
        "namespaces": shards.len(),
        "vectors": shards.iter().map(|(_, _, n, _)| *n as u64).sum::<u64>(),
        // Shards being rebuilt in the background (their old shard answers meanwhile).
        "building": s.vectors.building().len(),
    });
    let last = s.last_backup.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let now = crate::memory::now_ms();
    let stale = last.succeeded_at_ms > 0
        && now.saturating_sub(last.succeeded_at_ms) > s.backup_interval_secs.saturating_mul(2000);
    // Only the leader takes scheduled backups: a follower's record is whatever it did when it
    // last led.
    let backups_health = if s.backup_interval_secs == 0 {
        "disabled"
    } else if m.current_leader != Some(m.id) {
        "standby"
    } else if last.failed_at_ms > last.succeeded_at_ms || stale {
        "degraded"
    } else {
        "ok"
    };
    // A drill that failed degrades the backups' health; one that never ran says nothing.
    let drill_failed = last.drill.at_ms > 0 && !last.drill.ok && m.current_leader == Some(m.id);
    let backups_health = if drill_failed { "degraded" } else { backups_health };
    let backups = json!({
        "status": backups_health,
        "interval_secs": s.backup_interval_secs,
        "last_success_at_ms": last.succeeded_at_ms,
        "last_index": last.index,
        "last_failure_at_ms": last.failed_at_ms,
        "last_error": last.error,
        "last_drill": {
            "at_ms": last.drill.at_ms,
            "ok": last.drill.ok,
            "backup": last.drill.backup,
            "rto_ms": last.drill.rto_ms,
            "data_age_ms": last.drill.data_age_ms,
            "error": last.drill.error,
        },
    });
    // Replicas: only the leader verifies; a divergence (or no majority digest) degrades it.
    let v = s.last_verify.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let replicas_health = if s.cluster_verify_interval_secs == 0 {
        "disabled"
    } else if m.current_leader != Some(m.id) {
        "standby"
    } else if matches!(v.outcome, "diverged" | "no_majority") {
        "degraded"
    } else if v.at_ms == 0 {
        "pending"
    } else {
        "ok"
    };
    let replicas = json!({
        "status": replicas_health,
        "interval_secs": s.cluster_verify_interval_secs,
        "last_at_ms": v.at_ms,
        "last_index": v.index,
        "last_outcome": v.outcome,
        "diverged": v.diverged,
        "missing": v.missing,
    });
    let healths = [
        raft_health,
        storage["status"].as_str().unwrap_or("down"),
        vectors["status"].as_str().unwrap_or("down"),
        backups_health,
        replicas_health,
    ];
    let overall = if healths.contains(&"down") {
        "down"
    } else if healths.contains(&"degraded") {
        "degraded"
    } else {
        "ok"
    };
    json!({"node_id": m.id, "status": overall, "raft": raft, "storage": storage, "vectors": vectors, "backups": backups, "replicas": replicas})
}

pub(crate) use crate::storage::space::free_bytes;

async fn metrics_handler(State(s): State<HttpState>) -> String {
    if let Some(free) = free_bytes(&s.data_dir) {
        metrics::gauge!("engram_data_dir_free_bytes").set(free as f64);
    }
    prometheus().render()
}

async fn status_handler(State(s): State<HttpState>) -> (StatusCode, axum::Json<serde_json::Value>) {
    let v = status(&s);
    let code = if v["status"] == "down" { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    (code, axum::Json(v))
}

async fn readyz(State(s): State<HttpState>) -> (StatusCode, String) {
    let m = s.node.raft.metrics().borrow_watched().clone();
    match m.current_leader {
        Some(leader) if m.last_applied.is_some() => (StatusCode::OK, format!("ready: leader {leader}\n")),
        Some(_) => (StatusCode::SERVICE_UNAVAILABLE, "not ready: nothing applied yet\n".into()),
        None => (StatusCode::SERVICE_UNAVAILABLE, "not ready: no leader known\n".into()),
    }
}

/// Publishes Raft state as gauges whenever it changes.
pub async fn export_raft_metrics(node: RaftNode) {
    let mut rx = node.raft.metrics();
    loop {
        {
            let m = rx.borrow_watched().clone();
            metrics::gauge!("engram_raft_term").set(m.current_term as f64);
            metrics::gauge!("engram_raft_is_leader").set(if m.current_leader == Some(m.id) { 1.0 } else { 0.0 });
            metrics::gauge!("engram_raft_last_log_index").set(m.last_log_index.unwrap_or(0) as f64);
            metrics::gauge!("engram_raft_applied_index").set(m.last_applied.map(|l| l.index).unwrap_or(0) as f64);
            metrics::gauge!("engram_raft_snapshot_index").set(m.snapshot.map(|l| l.index).unwrap_or(0) as f64);
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}
