//! On-disk format versions of a node's two redb files, and the upgrade from the files of
//! earlier builds.
//!
//! Each file carries its format in a `format` table (`"format" -> u32`), outside every dump
//! and digest. The rows whose layout may change carry a version byte of their own (see
//! [`codec::encode_row`](super::codec::encode_row); memories have had one since their
//! first format): a later format can then read old and new rows side by side, and a file-wide
//! rewrite is needed only when a row without a version byte changes.
//!
//! ```text
//! raft-log.redb  0  before format markers: `log` values are bare bincode(Entry)
//!                1  `log` values are ROW_V1 | bincode(Entry)
//!                2  entries may be sealed at rest (`Op::Sealed`, `Op::RewrapDataKeys`): same rows
//! state.redb     0  before format markers: namespace, idempotency and auth rows are bare bincode
//!                1  those rows are ROW_V1 | bincode
//!                2  `data_keys` and `erased_keys` tables; memory rows may be sealed (version 4)
//! ```
//!
//! Format 1 becomes 2 by its stamp alone (no row changes): what 2 adds, an older build cannot
//! read, so it refuses the file instead of failing on its first sealed row.
//!
//! Opening a file of format 0 upgrades it in one write transaction (all rows or none, so a
//! crash mid-upgrade leaves format 0 to upgrade again). A file of a format newer than this
//! build knows is refused before anything is opened for writing: a downgrade never rewrites a
//! newer node's data. The bookkeeping rows (`sm_meta`, the log's vote/committed/purged, the
//! JSON memory-model rows, the ledger's fixed-size hashes) have no version byte: the file's
//! format covers them.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use crate::error::StorageError;

pub const FORMAT: TableDefinition<&str, u32> = TableDefinition::new("format");
const KEY: &str = "format";

/// The `raft-log.redb` format this build writes.
pub const LOG_FORMAT: u32 = 2;
/// The `state.redb` format this build writes.
pub const STATE_FORMAT: u32 = 2;

/// The format recorded in `txn`'s file; `None` for a file from before format markers (or a
/// new one).
pub fn recorded(txn: &redb::ReadTransaction) -> Result<Option<u32>, StorageError> {
    match super::optional_table(txn, FORMAT)? {
        Some(t) => Ok(t.get(KEY)?.map(|v| v.value())),
        None => Ok(None),
    }
}

/// Refuses a file written in a format newer than `current`, without opening it for writing
/// (an existing file only; a missing one is fine).
pub fn refuse_newer(path: &Path, current: u32) -> Result<(), StorageError> {
    // A file a crash left empty (created, no header yet) is a new file, as `create` takes it.
    if std::fs::metadata(path).map(|m| m.len() == 0).unwrap_or(true) {
        return Ok(());
    }
    // Read-only, so a refused file keeps every byte; a file left open by a crash needs redb's
    // repair first, which only a writable open does (it changes no row).
    let found = match redb::ReadOnlyDatabase::open(path) {
        Ok(db) => recorded(&db.begin_read()?)?,
        Err(redb::DatabaseError::RepairAborted) => recorded(&Database::open(path)?.begin_read()?)?,
        Err(e) => return Err(e.into()),
    };
    check(path, found, current)
}

/// The refusal of a file that does not read back as redb wrote it, naming the file and the way
/// back (the node rebuilt from its peers: `engramctl members rebuild`, docs/operations.md).
pub fn damaged(path: &Path, reason: impl std::fmt::Display) -> StorageError {
    metrics::counter!("engram_storage_damaged_files_total").increment(1);
    StorageError::Format {
        file: path.display().to_string(),
        reason: format!(
            "the file is damaged ({reason}); the node will not start from it. Rebuild this node from its peers \
             with `engramctl members rebuild --id <node id> --data-dir <data dir>` (docs/operations.md)"
        ),
    }
}

/// Runs a read-only start check of `path`; a damaged file that makes redb panic or fail is
/// refused as [`damaged`]. A refusal of its own (a newer format, a wrong key) stays as it is.
pub fn readable<T>(path: &Path, check: impl FnOnce() -> Result<T, StorageError>) -> Result<T, StorageError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(check)) {
        Ok(Err(e @ StorageError::Format { .. })) => Err(e),
        Ok(Err(e @ (StorageError::Redb(_) | StorageError::Io(_)))) => Err(damaged(path, e)),
        Ok(other) => other,
        Err(_) => Err(damaged(path, "reading it panicked")),
    }
}

/// Verifies the checksum of every page of the file's committed trees
/// (`set_check_integrity_on_open`): a file altered outside redb (a flipped byte, a truncation)
/// is refused as [`damaged`] instead of trusted. Reads the whole file once; like any writable
/// open it may commit redb's own bookkeeping (never a row), so it runs after every read-only
/// check that may refuse the start. An absent or empty file passes (a new node).
pub fn verify_pages(path: &Path) -> Result<(), StorageError> {
    if std::fs::metadata(path).map(|m| m.len() == 0).unwrap_or(true) {
        return Ok(());
    }
    let opened = std::panic::catch_unwind(|| {
        redb::Builder::new().set_check_integrity_on_open(true).open(path).map(drop).map_err(|e| e.to_string())
    });
    match opened {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(damaged(path, e)),
        Err(_) => Err(damaged(path, "reading it panicked")),
    }
}

fn check(path: &Path, found: Option<u32>, current: u32) -> Result<(), StorageError> {
    match found {
        Some(f) if f > current => Err(StorageError::Format {
            file: path.display().to_string(),
            reason: format!(
                "format {f}, written by a newer Engram; this build reads formats 0 to {current}. Run a build that \
                 knows format {f}, or restore a backup into an empty data dir"
            ),
        }),
        _ => Ok(()),
    }
}

/// Brings the file `txn` writes to format `current`, in `txn`: records it on a new file
/// (`empty`), runs `upgrade` (format 0 → 1, returning the rows it rewrote) on a file from
/// before format markers, refuses a newer format. Returns the format the file had.
pub fn ensure(
    txn: &WriteTransaction,
    path: &Path,
    current: u32,
    empty: bool,
    upgrade: impl FnOnce(&WriteTransaction) -> Result<u64, StorageError>,
) -> Result<u32, StorageError> {
    let found = txn.open_table(FORMAT)?.get(KEY)?.map(|v| v.value());
    check(path, found, current)?;
    let had = match found {
        Some(f) => f,
        None if empty => current,
        None => {
            let rows = upgrade(txn)?;
            tracing::info!(file = %path.display(), rows, from = 0, to = current, "upgraded the file's format");
            0
        }
    };
    if found != Some(current) {
        stamp(txn, current)?;
    }
    Ok(had)
}

/// Records `format` as the file's (the rows `txn` wrote are all of it).
pub fn stamp(txn: &WriteTransaction, format: u32) -> Result<(), StorageError> {
    txn.open_table(FORMAT)?.insert(KEY, format)?;
    Ok(())
}

/// Rows an upgrade rewrites per step, so a long log is not held in memory at once.
const CHUNK: usize = 1024;

/// `v` after the version byte `version`.
pub(super) fn prefixed(version: u8, v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() + 1);
    out.push(version);
    out.extend_from_slice(v);
    out
}

/// Prefixes every value of a u64-keyed table with `version`; returns the rows rewritten.
pub fn prefix_u64_rows(
    txn: &WriteTransaction,
    table: TableDefinition<u64, &'static [u8]>,
    version: u8,
) -> Result<u64, StorageError> {
    let mut t = txn.open_table(table)?;
    let (mut from, mut n) = (Some(0u64), 0u64);
    while let Some(start) = from {
        let chunk: Vec<(u64, Vec<u8>)> = t
            .range(start..)?
            .take(CHUNK)
            .map(|r| r.map(|(k, v)| (k.value(), prefixed(version, v.value()))))
            .collect::<Result<_, _>>()?;
        from = if chunk.len() == CHUNK { chunk.last().and_then(|(k, _)| k.checked_add(1)) } else { None };
        for (k, v) in &chunk {
            t.insert(*k, v.as_slice())?;
        }
        n += chunk.len() as u64;
    }
    Ok(n)
}

/// Prefixes every value of a string-keyed table with `version`; returns the rows rewritten.
pub fn prefix_str_rows(
    txn: &WriteTransaction,
    table: TableDefinition<&'static str, &'static [u8]>,
    version: u8,
) -> Result<u64, StorageError> {
    let mut t = txn.open_table(table)?;
    let (mut after, mut n): (Option<String>, u64) = (None, 0);
    loop {
        let chunk: Vec<(String, Vec<u8>)> = match &after {
            None => t.iter()?,
            Some(k) => t.range::<&str>((std::ops::Bound::Excluded(k.as_str()), std::ops::Bound::Unbounded))?,
        }
        .take(CHUNK)
        .map(|r| r.map(|(k, v)| (k.value().to_string(), prefixed(version, v.value()))))
        .collect::<Result<_, _>>()?;
        for (k, v) in &chunk {
            t.insert(k.as_str(), v.as_slice())?;
        }
        n += chunk.len() as u64;
        if chunk.len() < CHUNK {
            return Ok(n);
        }
        after = chunk.into_iter().last().map(|(k, _)| k);
    }
}

#[cfg(test)]
mod tests {
    use redb::backends::InMemoryBackend;
    use redb::ReadableTableMetadata;

    use super::*;

    const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
    const ROWS: TableDefinition<&str, &[u8]> = TableDefinition::new("rows");

    fn fresh() -> Database {
        Database::builder().create_with_backend(InMemoryBackend::new()).unwrap()
    }

    #[test]
    fn a_file_a_crash_left_empty_opens_as_new() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft-log.redb");
        std::fs::write(&path, b"").unwrap();
        refuse_newer(&path, LOG_FORMAT).unwrap();
        crate::raft::LogStore::open(&path).unwrap();
        let db = redb::ReadOnlyDatabase::open(&path).unwrap();
        assert_eq!(recorded(&db.begin_read().unwrap()).unwrap(), Some(LOG_FORMAT));
    }

    #[test]
    fn every_row_is_prefixed_once_across_chunks() {
        let db = fresh();
        let n = CHUNK as u64 * 2 + 7;
        let txn = db.begin_write().unwrap();
        {
            let mut log = txn.open_table(LOG).unwrap();
            let mut rows = txn.open_table(ROWS).unwrap();
            for i in 0..n {
                log.insert(i * 3, format!("entry {i}").as_bytes()).unwrap();
                rows.insert(format!("k{i:05}").as_str(), format!("row {i}").as_bytes()).unwrap();
            }
        }
        assert_eq!(prefix_u64_rows(&txn, LOG, 7).unwrap(), n);
        assert_eq!(prefix_str_rows(&txn, ROWS, 7).unwrap(), n);
        let log = txn.open_table(LOG).unwrap();
        let rows = txn.open_table(ROWS).unwrap();
        assert_eq!((log.len().unwrap(), rows.len().unwrap()), (n, n));
        for i in 0..n {
            assert_eq!(
                log.get(i * 3).unwrap().unwrap().value(),
                [&[7u8][..], format!("entry {i}").as_bytes()].concat()
            );
            let k = format!("k{i:05}");
            assert_eq!(
                rows.get(k.as_str()).unwrap().unwrap().value(),
                [&[7u8][..], format!("row {i}").as_bytes()].concat()
            );
        }
    }

    #[test]
    fn ensure_stamps_new_files_upgrades_old_ones_and_refuses_newer() {
        let path = Path::new("state.redb");
        let db = fresh();
        // A new file: stamped, nothing upgraded.
        let txn = db.begin_write().unwrap();
        let had = ensure(&txn, path, 1, true, |_| panic!("a new file has nothing to upgrade")).unwrap();
        assert_eq!(had, 1);
        txn.commit().unwrap();
        assert_eq!(recorded(&db.begin_read().unwrap()).unwrap(), Some(1));
        // Stamped: opened again without an upgrade.
        let txn = db.begin_write().unwrap();
        assert_eq!(ensure(&txn, path, 1, false, |_| panic!("already current")).unwrap(), 1);
        drop(txn);

        // A file from before markers: upgraded once, then stamped.
        let db = fresh();
        let txn = db.begin_write().unwrap();
        txn.open_table(ROWS).unwrap().insert("a", b"x".as_slice()).unwrap();
        let mut runs = 0;
        let had = ensure(&txn, path, 1, false, |txn| {
            runs += 1;
            prefix_str_rows(txn, ROWS, 1)
        })
        .unwrap();
        txn.commit().unwrap();
        assert_eq!((had, runs), (0, 1));
        let r = db.begin_read().unwrap();
        assert_eq!(recorded(&r).unwrap(), Some(1));
        assert_eq!(r.open_table(ROWS).unwrap().get("a").unwrap().unwrap().value(), b"\x01x");

        // A newer file: refused, naming the file and both formats.
        let txn = db.begin_write().unwrap();
        stamp(&txn, 3).unwrap();
        txn.commit().unwrap();
        let txn = db.begin_write().unwrap();
        let e = ensure(&txn, path, 1, false, |_| panic!("never upgrade a newer file")).unwrap_err().to_string();
        assert!(e.contains("state.redb") && e.contains("format 3") && e.contains("0 to 1"), "{e}");
    }
}
