//! Raft snapshots as files, never whole in memory.
//!
//! ```text
//! snapshot file := "EGSNAP" 0x00 0x01 | meta_len: u32 LE | bincode(SnapshotMeta) | zstd(dump)
//! ```
//!
//! The body is the state dump (`storage::dump`) of one redb read transaction, so a build never
//! blocks applies. A build or a received snapshot is written to a temp file beside the current
//! one, fsynced, then renamed over it (and the directory fsynced): the current snapshot is
//! always a whole file. It only moves forward: a file at an older log id never replaces a newer
//! one, so the current snapshot never ends below the purged log.
//!
//! [`SnapshotData`] holds an open handle: a sender reads with positional reads, so a newer
//! build renamed over the path meanwhile does not disturb a transfer in flight.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase};

use super::types::SnapshotMeta;
use crate::error::StorageError;
use crate::storage::dump::{self, DumpSummary};

const MAGIC: &[u8; 8] = b"EGSNAP\x00\x01";
const MAX_META_BYTES: u32 = 16 << 20;
const ZSTD_LEVEL: i32 = 1;

/// A snapshot file: an open handle and the path it had when opened.
#[derive(Debug)]
pub struct SnapshotData {
    file: File,
    path: PathBuf,
}

impl SnapshotData {
    pub fn open(path: &Path) -> io::Result<SnapshotData> {
        Ok(SnapshotData { file: File::open(path)?, path: path.to_path_buf() })
    }

    pub fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    pub fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Reads up to `buf.len()` bytes at `offset`; 0 at the end.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.file.read_at(buf, offset)
    }

    /// The meta in the file's header.
    pub fn meta(&self) -> Result<SnapshotMeta, StorageError> {
        read_header(&mut BufReader::new(Positional { data: self, pos: 0 }))
    }
}

/// A `Read` over a [`SnapshotData`] that leaves the shared file cursor alone.
struct Positional<'a> {
    data: &'a SnapshotData,
    pos: u64,
}

impl Read for Positional<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.data.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

fn corrupt(reason: impl Into<String>) -> StorageError {
    StorageError::Corrupt { table: "snapshot", reason: reason.into() }
}

fn read_header(r: &mut impl Read) -> Result<SnapshotMeta, StorageError> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).map_err(|e| corrupt(format!("header: {e}")))?;
    if &magic != MAGIC {
        return Err(corrupt("not an Engram snapshot (bad magic)"));
    }
    let mut len = [0u8; 4];
    r.read_exact(&mut len).map_err(|e| corrupt(format!("header: {e}")))?;
    let len = u32::from_le_bytes(len);
    if len > MAX_META_BYTES {
        return Err(corrupt(format!("meta length {len} exceeds the limit")));
    }
    let mut meta = vec![0u8; len as usize];
    r.read_exact(&mut meta).map_err(|e| corrupt(format!("header: {e}")))?;
    crate::storage::codec::decode("snapshot", &meta)
}

/// Paths of the current snapshot and of its temp files.
#[derive(Clone, Debug)]
pub struct SnapshotFiles {
    current: PathBuf,
}

impl SnapshotFiles {
    /// Removes temp files a crash left behind.
    pub fn open(current: PathBuf) -> io::Result<SnapshotFiles> {
        let files = SnapshotFiles { current };
        if let (Some(dir), Some(name)) = (files.current.parent(), files.current.file_name()) {
            let prefix = format!("{}.tmp-", name.to_string_lossy());
            for entry in std::fs::read_dir(dir)? {
                let entry = entry?;
                if entry.file_name().to_string_lossy().starts_with(&prefix) {
                    std::fs::remove_file(entry.path())?;
                }
            }
        }
        Ok(files)
    }

    fn is_temp(&self, path: &Path) -> bool {
        let prefix = format!("{}.tmp-", self.current.file_name().unwrap_or_default().to_string_lossy());
        path.parent() == self.current.parent()
            && path.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
    }

    /// A fresh temp path beside the current snapshot (same file system, so rename is atomic).
    pub fn temp_path(&self) -> PathBuf {
        let mut name = self.current.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".tmp-{}", uuid::Uuid::now_v7()));
        self.current.with_file_name(name)
    }

    pub fn current(&self) -> Result<Option<(SnapshotMeta, SnapshotData)>, StorageError> {
        match SnapshotData::open(&self.current) {
            Ok(data) => Ok(Some((data.meta()?, data))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes a snapshot of `db` as it is now to a temp file; returns it unpublished.
    pub fn build(&self, db: &Database) -> Result<(SnapshotMeta, SnapshotData, DumpSummary), StorageError> {
        let txn = db.begin_read()?;
        let (last_log_id, last_membership) = dump::head(&txn)?;
        let meta = SnapshotMeta { last_log_id, last_membership };
        let path = self.temp_path();
        let result = (|| {
            let file = File::create(&path)?;
            let mut w = BufWriter::with_capacity(1 << 20, &file);
            let encoded = crate::storage::codec::encode(&meta);
            w.write_all(MAGIC)?;
            w.write_all(&(encoded.len() as u32).to_le_bytes())?;
            w.write_all(&encoded)?;
            let mut z = zstd::stream::Encoder::new(w, ZSTD_LEVEL)?;
            let summary = dump::write(&txn, &mut z, dump::DataKeys::Include)?;
            z.finish()?.flush()?;
            file.sync_all()?;
            Ok::<_, StorageError>(summary)
        })();
        match result {
            Ok(summary) => Ok((meta, SnapshotData::open(&path)?, summary)),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    /// Makes `data` (a temp file written by [`build`](Self::build) or received from the
    /// leader) the current snapshot, unless the current one is at the same or a later log id.
    ///
    /// A file that is not one of this node's temp files (another node's snapshot, in tests
    /// that move snapshots between in-process nodes) is copied, never moved.
    pub fn publish(&self, meta: &SnapshotMeta, data: &mut SnapshotData) -> Result<(), StorageError> {
        if data.path == self.current {
            return Ok(());
        }
        if let Some((current, _)) = self.current()? {
            if current.last_log_id >= meta.last_log_id {
                if self.is_temp(&data.path) {
                    let _ = std::fs::remove_file(&data.path);
                }
                return Ok(());
            }
        }
        let source = if self.is_temp(&data.path) {
            data.path.clone()
        } else {
            let copy = self.temp_path();
            let mut out = File::create(&copy)?;
            io::copy(&mut Positional { data, pos: 0 }, &mut out)?;
            out.sync_all()?;
            copy
        };
        std::fs::rename(&source, &self.current)?;
        data.path = self.current.clone();
        if let Some(dir) = self.current.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// Replaces the whole state of `db` with the snapshot in one durable transaction. The file's
/// header and its dump must agree with `meta`; otherwise nothing is written.
/// `vault` takes the snapshot's data keys once the state is committed.
pub fn install(
    db: &Database,
    meta: &SnapshotMeta,
    data: &SnapshotData,
    vault: &crate::storage::vault::Vault,
) -> Result<DumpSummary, StorageError> {
    let mut r = BufReader::with_capacity(1 << 20, Positional { data, pos: 0 });
    let header = read_header(&mut r)?;
    if &header != meta {
        return Err(corrupt(format!("file header {header:?} does not match the snapshot meta {meta:?}")));
    }
    let z = zstd::stream::Decoder::with_buffer(r).map_err(|e| corrupt(format!("zstd: {e}")))?;
    let mut txn = db.begin_write()?;
    crate::storage::set_durable(&mut txn, "snapshot")?;
    let fresh = vault.fresh();
    let summary = dump::load(ZstdErrors(z), &txn, &fresh)?;
    if summary.applied != meta.last_log_id || summary.membership != meta.last_membership {
        return Err(corrupt("the dump's applied log id or membership differs from the snapshot meta"));
    }
    txn.commit()?;
    vault.adopt(&fresh);
    Ok(summary)
}

/// zstd reports corrupt frames as I/O errors; they are data errors here.
struct ZstdErrors<R>(R);

impl<R: Read> Read for ZstdErrors<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("zstd: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::LogId;
    use crate::raft::StoredMembership;

    fn meta(index: u64) -> SnapshotMeta {
        let leader = openraft::vote::leader_id_adv::LeaderId { term: 1, node_id: 1 };
        SnapshotMeta { last_log_id: Some(LogId::new(leader, index)), last_membership: StoredMembership::default() }
    }

    fn file_with(files: &SnapshotFiles, m: &SnapshotMeta, body: &[u8]) -> SnapshotData {
        let path = files.temp_path();
        let mut f = File::create(&path).unwrap();
        let enc = crate::storage::codec::encode(m);
        f.write_all(MAGIC).unwrap();
        f.write_all(&(enc.len() as u32).to_le_bytes()).unwrap();
        f.write_all(&enc).unwrap();
        f.write_all(body).unwrap();
        SnapshotData::open(&path).unwrap()
    }

    #[test]
    fn the_current_snapshot_only_moves_forward_and_temp_files_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let files = SnapshotFiles::open(dir.path().join("snapshot.bin")).unwrap();
        files.publish(&meta(10), &mut file_with(&files, &meta(10), b"ten")).unwrap();
        // A slower, older build finishing late must not replace the newer snapshot.
        files.publish(&meta(5), &mut file_with(&files, &meta(5), b"five")).unwrap();
        assert_eq!(files.current().unwrap().unwrap().0, meta(10));
        files.publish(&meta(12), &mut file_with(&files, &meta(12), b"twelve")).unwrap();
        assert_eq!(files.current().unwrap().unwrap().0, meta(12));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // A crash leaves a temp file; the next open removes it.
        let _ = file_with(&files, &meta(13), b"partial");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
        let files = SnapshotFiles::open(dir.path().join("snapshot.bin")).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        assert_eq!(files.current().unwrap().unwrap().0, meta(12));
    }
}
