//! Online backups: consistent, compressed, encrypted, verifiable, restorable into a new cluster.
//!
//! A backup is the state dump (`storage::dump`) of one redb read transaction, so it is
//! consistent at the applied log id it names however many writes run meanwhile. The dump is
//! zstd-compressed, cut into chunks and sealed with AES-256-GCM ([`crypto`]) into an archive
//! ([`archive`]; byte layout and threat model in `docs/backup.md`).
//!
//! * [`create`] writes an archive to any `Write` (a file, a gRPC stream) holding one chunk in
//!   memory;
//! * [`verify`] reads one end to end, authenticating every chunk and checking the manifest and
//!   the dump's digest, and writes nothing;
//! * [`restore::restore`] builds a new node's data dir from one (a new cluster identity, like
//!   `etcdutl snapshot restore`), staging it beside the target and moving it into place only
//!   after the whole archive checked out.
//! * [`keys`]: keyring files and `ENGRAM_BACKUP_KEY`; [`schedule`]: the leader's periodic
//!   backups with retention.
#![doc = include_str!("../../docs/backup.md")]

pub mod archive;
pub mod crypto;
pub mod drill;
pub mod keys;
pub mod restore;
pub mod schedule;

use std::io::{self, BufReader, Read, Write};

use redb::{Database, ReadableDatabase};
use thiserror::Error;

use crate::error::StorageError;
use crate::storage::dump::{self, DumpSummary};
use archive::{ArchiveReader, ArchiveWriter, Contents, Header, Manifest, DEFAULT_CHUNK_BYTES};
pub use crypto::MasterKey;
pub use keys::Keyring;

/// zstd level of backup payloads: level 3 compresses text noticeably better than 1 and still
/// outruns the disk on one core.
const ZSTD_LEVEL: i32 = 3;

#[derive(Debug, Error)]
pub enum BackupError {
    /// The archive is damaged or was tampered with: nothing was written.
    #[error("backup is corrupt at {what}: {reason}")]
    Corrupt { what: String, reason: String },
    /// No key in the keyring has the id the archive names: nothing was written.
    #[error("backup was sealed with key {key_id}, which is not in the keyring (have: {have})")]
    WrongKey { key_id: String, have: String },
    /// A key file or variable is missing, malformed or too open.
    #[error("backup key: {0}")]
    Key(String),
    /// A restore target that cannot be used as asked (non-empty data dir, bad members).
    #[error("restore: {0}")]
    Target(String),
    #[error("nothing to back up: {0}")]
    Empty(String),
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
}

impl BackupError {
    pub fn corrupt(what: impl Into<String>, reason: impl Into<String>) -> Self {
        BackupError::Corrupt { what: what.into(), reason: reason.into() }
    }

    /// An error reading the payload: a chunk's own error if the archive layer raised it.
    fn payload(e: StorageError) -> Self {
        match e {
            StorageError::Corrupt { reason, .. } => BackupError::corrupt("payload", reason),
            StorageError::Io(io) if io.kind() == io::ErrorKind::InvalidData => match io.into_inner() {
                Some(inner) => match inner.downcast::<BackupError>() {
                    Ok(archive) => *archive,
                    Err(other) => BackupError::corrupt("payload", other.to_string()),
                },
                None => BackupError::corrupt("payload", "invalid data"),
            },
            other => BackupError::Storage(other),
        }
    }
}

/// What a backup holds and where it stands, from its header and manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct BackupInfo {
    pub header: Header,
    pub manifest: Manifest,
    /// Size of the archive in bytes.
    pub archive_bytes: u64,
}

impl std::fmt::Display for BackupInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h = &self.header;
        let m = &self.manifest;
        write!(
            f,
            "backup {} of cluster {} at log index {} (term {}), created at {} ms, key {}: {} memories in {} namespaces, {} rows, {} chunks, {} bytes ({} bytes of state, {:.2}x smaller)",
            uuid::Uuid::from_bytes(h.backup_id),
            uuid::Uuid::from_bytes(h.cluster_id),
            h.applied_index,
            h.applied_term,
            h.created_at_ms,
            hex::encode(h.key_id),
            m.memories,
            m.namespaces,
            m.rows,
            m.chunks,
            self.archive_bytes,
            m.dump_bytes,
            m.dump_bytes as f64 / self.archive_bytes.max(1) as f64,
        )
    }
}

/// Writes a backup of `db`, consistent at its applied log id, sealed with the keyring's
/// active key. Returns the sink (for the caller to fsync) and what was written.
pub fn create<W: Write>(
    db: &Database,
    cluster_id: [u8; 16],
    keys: &Keyring,
    out: W,
) -> Result<(W, BackupInfo), BackupError> {
    let txn = db.begin_read().map_err(StorageError::from)?;
    let (applied, _) = dump::head(&txn)?;
    let applied = applied.ok_or_else(|| BackupError::Empty("the state machine has applied nothing yet".into()))?;
    let key = keys.active();
    let header = Header {
        format: archive::FORMAT_VERSION,
        cluster_id,
        backup_id: *uuid::Uuid::now_v7().as_bytes(),
        created_at_ms: crate::memory::now_ms(),
        applied_term: applied.leader_id.term,
        applied_node: applied.leader_id.node_id,
        applied_index: applied.index,
        key_id: key.id(),
        salt: crypto::random_salt(),
        chunk_bytes: DEFAULT_CHUNK_BYTES,
    };
    let mut writer = ArchiveWriter::new(out, &header, key)?;
    let mut z = zstd::stream::Encoder::new(&mut writer, ZSTD_LEVEL)?;
    // Never the data keys: a backup must not outlive an erasure's reach (see `storage::vault`).
    let summary = dump::write(&txn, &mut z, dump::DataKeys::Exclude)?;
    z.finish()?;
    let contents = Contents {
        rows: summary.rows,
        memories: summary.memories,
        namespaces: summary.namespaces,
        dump_bytes: summary.bytes,
        dump_digest: summary.digest,
        // The same transaction's rows: what a restore must reproduce (a DR drill checks it).
        data_digest: Some(crate::storage::StateReader::digest_in(&txn, false)?),
    };
    let (out, manifest, archive_bytes) = writer.finish(contents)?;
    Ok((out, BackupInfo { header, manifest, archive_bytes }))
}

/// Checks that the dump read from an archive is the one its manifest and header describe.
fn check_contents(header: &Header, manifest: &Manifest, summary: &DumpSummary) -> Result<(), BackupError> {
    let applied = summary.applied.as_ref().map(|l| (l.leader_id.term, l.leader_id.node_id, l.index));
    if applied != Some((header.applied_term, header.applied_node, header.applied_index)) {
        return Err(BackupError::corrupt("payload", "the state's applied log id differs from the header's"));
    }
    if (summary.rows, summary.memories, summary.namespaces, summary.bytes, summary.digest)
        != (manifest.rows, manifest.memories, manifest.namespaces, manifest.dump_bytes, manifest.dump_digest)
    {
        return Err(BackupError::corrupt("payload", "the state's rows or digest differ from the manifest's"));
    }
    Ok(())
}

/// Counts the bytes read through it.
struct Counted<R> {
    inner: R,
    bytes: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Reads a whole archive through `sink` (which consumes the decompressed dump), then checks
/// the manifest and contents. Shared by verify and restore.
fn read_archive<R: Read>(
    input: R,
    keys: &Keyring,
    sink: impl FnOnce(&mut dyn Read) -> Result<DumpSummary, StorageError>,
) -> Result<BackupInfo, BackupError> {
    let mut reader = ArchiveReader::open(Counted { inner: BufReader::with_capacity(1 << 20, input), bytes: 0 }, keys)?;
    let summary = {
        let mut z = zstd::stream::Decoder::new(&mut reader)?;
        sink(&mut z).map_err(BackupError::payload)?
    };
    let (header, manifest, input) = reader.finish()?;
    check_contents(&header, &manifest, &summary)?;
    Ok(BackupInfo { header, manifest, archive_bytes: input.bytes })
}

/// Reads a backup end to end, checking it as [`verify`] does, and returns the rows of one
/// namespace (`None`: the backup has no such namespace). Writes nothing.
pub fn namespace_of(
    input: impl Read,
    keys: &Keyring,
    namespace: &str,
) -> Result<(BackupInfo, Option<dump::NamespaceRows>), BackupError> {
    let mut rows = None;
    let info = read_archive(input, keys, |r| {
        let (summary, found) = dump::namespace_rows(r, namespace)?;
        rows = found;
        Ok(summary)
    })?;
    Ok((info, rows))
}

/// What a partial restore of one namespace would change, by memory id.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RestoreDiff {
    /// In the backup, not in the live namespace.
    pub added: Vec<String>,
    /// In both, with another text, embedding, tags, importance or expiry.
    pub changed: Vec<String>,
    /// In the live namespace, not in the backup: a restore deletes them.
    pub removed: Vec<String>,
    pub unchanged: u64,
    /// In both, sealed at rest in the backup: only the cluster can open them, so a client
    /// cannot say whether they changed.
    pub sealed: Vec<String>,
}

/// Compares a backup's rows of a namespace with the live namespace's memories.
pub fn restore_diff(rows: &dump::NamespaceRows, live: &[crate::proto::Memory]) -> RestoreDiff {
    let live: std::collections::BTreeMap<&str, &crate::proto::Memory> =
        live.iter().map(|m| (m.id.as_str(), m)).collect();
    let mut d = RestoreDiff::default();
    let sealed = rows.sealed_ids();
    let mut seen = std::collections::BTreeSet::new();
    for m in &rows.memories {
        seen.insert(m.id.as_str());
        match live.get(m.id.as_str()) {
            None => d.added.push(m.id.clone()),
            Some(l) => {
                let tags: std::collections::BTreeMap<&String, &String> = l.tags.iter().collect();
                let same = l.text == m.text
                    && l.embedding == m.embedding
                    && tags == m.tags.iter().collect()
                    && l.importance == m.importance
                    && l.expires_at_ms == m.expires_at_ms.unwrap_or(0);
                if same {
                    d.unchanged += 1;
                } else {
                    d.changed.push(m.id.clone());
                }
            }
        }
    }
    for id in &sealed {
        seen.insert(id.as_str());
        match live.contains_key(id.as_str()) {
            true => d.sealed.push(id.clone()),
            false => d.added.push(id.clone()),
        }
    }
    d.removed = live.keys().filter(|id| !seen.contains(*id)).map(|id| id.to_string()).collect();
    d
}

/// Checks a backup end to end without restoring it: header, every chunk's tag, the manifest,
/// and the state dump's shape and digest.
pub fn verify(input: impl Read, keys: &Keyring) -> Result<BackupInfo, BackupError> {
    read_archive(input, keys, |r| dump::check(r))
}

#[cfg(test)]
mod tests;
