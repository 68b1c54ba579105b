//! Backups to a directory: the leader's periodic backups with retention, and the file naming
//! and atomic publication shared with `engramctl backup create`.
//!
//! A backup is written to `.<name>.partial`, fsynced, and renamed to
//! `backup-<created_at_ms, 13 digits>-<applied index>.engram` (then the directory is fsynced),
//! so a directory never shows a partial backup under a final name and names sort by age.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redb::Database;

use super::archive::Header;
use super::{create, BackupError, BackupInfo, Keyring};
use crate::raft::RaftNode;
use crate::storage::StateReader;

pub const SUFFIX: &str = ".engram";

/// The file name of a backup.
pub fn file_name(h: &Header) -> String {
    format!("backup-{:013}-{}{SUFFIX}", h.created_at_ms, h.applied_index)
}

/// Writes a backup of `db` into `dir` under its final name; returns the path.
pub fn write_to_dir(
    db: &Database,
    cluster_id: [u8; 16],
    keys: &Keyring,
    dir: &Path,
) -> Result<(PathBuf, BackupInfo), BackupError> {
    std::fs::create_dir_all(dir)?;
    let partial = dir.join(format!(".{}.partial", uuid::Uuid::now_v7()));
    let result = (|| {
        let file = std::fs::File::create(&partial)?;
        let (w, info) = create(db, cluster_id, keys, std::io::BufWriter::with_capacity(1 << 20, file))?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        let path = dir.join(file_name(&info.header));
        std::fs::rename(&partial, &path)?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok((path, info))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

/// Deletes all but the newest `keep` backups in `dir` (by name, which sorts by age); returns
/// how many were deleted. Files not named like backups are left alone.
pub fn prune(dir: &Path, keep: usize) -> Result<usize, BackupError> {
    let names = backup_names(dir)?;
    let excess = names.len().saturating_sub(keep);
    for n in &names[..excess] {
        std::fs::remove_file(dir.join(n))?;
    }
    Ok(excess)
}

/// The names of the backups in `dir`, oldest first (names sort by age); files not named like
/// backups are left out.
pub fn backup_names(dir: &Path) -> Result<Vec<String>, BackupError> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("backup-") && n.ends_with(SUFFIX))
        .collect();
    names.sort();
    Ok(names)
}

/// How often, where, with which key, and how many to keep.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub every: Duration,
    pub dir: PathBuf,
    pub keep: usize,
    /// The keyring file; without one, `ENGRAM_BACKUP_KEY`. Read at each backup, so a
    /// rotated key is used from the next one on.
    pub key_file: Option<PathBuf>,
}

/// The last scheduled backup's outcome, for status and metrics.
#[derive(Debug, Clone, Default)]
pub struct LastBackup {
    pub succeeded_at_ms: u64,
    pub index: u64,
    pub path: String,
    pub failed_at_ms: u64,
    pub error: String,
    /// The last scheduled drill of a backup (`drill::scheduled`).
    pub drill: super::drill::LastDrill,
}

pub type BackupStatus = Arc<Mutex<LastBackup>>;

/// One scheduled backup, if this node leads and the cluster has an id.
fn take(db: &Database, reader: &StateReader, s: &Schedule) -> Result<(PathBuf, BackupInfo), BackupError> {
    let keys = Keyring::resolve(s.key_file.as_deref())?;
    let cluster_id = reader.cluster_id()?.unwrap_or_default();
    let out = write_to_dir(db, cluster_id, &keys, &s.dir)?;
    prune(&s.dir, s.keep)?;
    Ok(out)
}

/// Runs until `stop` resolves: every `s.every`, the leader takes a backup.
pub async fn run(
    node: RaftNode,
    db: Arc<Database>,
    reader: StateReader,
    s: Schedule,
    status: BackupStatus,
    stop: impl std::future::Future<Output = ()>,
) {
    node.every_while_leader(s.every, stop, || backup_once(db.clone(), reader.clone(), s.clone(), status.clone())).await;
}

/// One scheduled backup, recorded in `status` and the metrics.
async fn backup_once(db: Arc<Database>, reader: StateReader, sched: Schedule, status: BackupStatus) {
    let started = std::time::Instant::now();
    let outcome = tokio::task::spawn_blocking(move || take(&db, &reader, &sched)).await;
    let outcome = outcome.unwrap_or_else(|e| Err(BackupError::Io(std::io::Error::other(e))));
    let mut last = status.lock().unwrap_or_else(|p| p.into_inner());
    match outcome {
        Ok((path, info)) => {
            metrics::counter!("engram_backups_total", "result" => "ok").increment(1);
            metrics::gauge!("engram_backup_last_success_timestamp_seconds")
                .set(crate::memory::now_ms() as f64 / 1000.0);
            metrics::gauge!("engram_backup_last_bytes").set(info.archive_bytes as f64);
            metrics::histogram!("engram_backup_seconds").record(started.elapsed().as_secs_f64());
            tracing::info!(path = %path.display(), index = info.header.applied_index, bytes = info.archive_bytes, "scheduled backup written");
            last.succeeded_at_ms = crate::memory::now_ms();
            last.index = info.header.applied_index;
            last.path = path.display().to_string();
        }
        Err(e) => {
            metrics::counter!("engram_backups_total", "result" => "error").increment(1);
            metrics::gauge!("engram_backup_last_failure_timestamp_seconds")
                .set(crate::memory::now_ms() as f64 / 1000.0);
            tracing::error!(error = %e, "scheduled backup failed");
            last.failed_at_ms = crate::memory::now_ms();
            last.error = e.to_string();
        }
    }
}
