//! Index files: the vector shards written to disk with the log index they reflect, so a
//! restart loads them instead of rebuilding every namespace from redb.
//!
//! Layout of `<data_dir>/vectors/`:
//!
//! * `MANIFEST` — which files make up the shards as of applied log index `applied`:
//!   `b"EVMF"`, a format byte, the bincode [`Manifest`], then the BLAKE3 hash of everything
//!   before it.
//! * `<ns>-<index>.meta` — one namespace's [`ShardMeta`] (bincode), written at log `index`.
//! * `<ns>-<index>-<part>.faiss` — its FAISS parts, in FAISS's own format.
//!
//! `<ns>` is the first 16 hex digits of the namespace's BLAKE3 hash. Files are never rewritten
//! in place: a checkpoint writes the namespaces that changed under new names, fsyncs them,
//! replaces `MANIFEST` (temp file, fsync, rename, fsync the directory) and only then deletes
//! the files no manifest names. The manifest holds the BLAKE3 hash of every file, so a torn or
//! flipped file is refused before FAISS parses it.
//!
//! A namespace with a data key (encryption at rest, `storage::vault`) has its `.meta` and
//! `.faiss` files sealed under that key: `b"EVSL"`, the key id, then the seal of the plain
//! bytes, bound to the namespace and file name. The FAISS bytes are produced in memory and
//! sealed before anything is written. The manifest holds names, hashes and counts only.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::faiss::{native_bytes, write_native, FaissIndex, Native};
use super::shard::{FrozenShard, Shard, ShardMeta};
use crate::storage::vault::{self, DataKey};

const MAGIC: &[u8; 4] = b"EVMF";
/// 2: shard metadata holds HNSW id maps. Files of another format are rebuilt from the state.
const FORMAT: u8 = 2;
const MANIFEST: &str = "MANIFEST";
const SEALED: &[u8; 4] = b"EVSL";

/// `plain` sealed for file `name` of `namespace`.
fn seal_file(key: &DataKey, namespace: &str, name: &str, plain: &[u8]) -> Vec<u8> {
    let mut out = SEALED.to_vec();
    out.extend_from_slice(&key.id);
    out.extend(key.seal(&vault::file_aad(namespace, name), plain));
    out
}

/// The plain bytes of a file [`seal_file`] may have sealed; a plain file is returned as it is.
fn open_file(
    path: &Path,
    key: Option<&DataKey>,
    namespace: &str,
    name: &str,
    bytes: Vec<u8>,
) -> Result<Vec<u8>, PersistError> {
    if bytes.len() < 12 || &bytes[..4] != SEALED {
        return Ok(bytes);
    }
    let id = &bytes[4..12];
    let key = key.filter(|k| k.id == id).ok_or_else(|| {
        corrupt(path, format!("sealed under data key {}, which this node does not hold", hex::encode(id)))
    })?;
    key.open(&vault::file_aad(namespace, name), &bytes[12..])
        .map_err(|_| corrupt(path, "a sealed file failed authentication"))
}

/// What a checkpoint wrote: the shard files valid at log index `applied`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub applied: u64,
    pub shards: BTreeMap<String, ShardFiles>,
}

/// One namespace's files and their hashes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardFiles {
    pub meta: String,
    pub meta_hash: [u8; 32],
    pub parts: Vec<(String, [u8; 32])>,
    pub memories: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PersistError + '_ {
    move |source| PersistError::Io { path: path.to_path_buf(), source }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> PersistError {
    PersistError::Corrupt { path: path.to_path_buf(), reason: reason.into() }
}

fn hash_file(path: &Path) -> Result<[u8; 32], PersistError> {
    let mut f = File::open(path).map_err(io(path))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(*hasher.finalize().as_bytes())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), PersistError> {
    let mut f = File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn sync_dir(dir: &Path) -> Result<(), PersistError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

fn stem(namespace: &str) -> String {
    blake3::hash(namespace.as_bytes()).to_hex()[..16].to_string()
}

/// Reads `dir/MANIFEST`; `Ok(None)` when there is none.
pub fn read_manifest(dir: &Path) -> Result<Option<Manifest>, PersistError> {
    let path = dir.join(MANIFEST);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&path)(e)),
    };
    if bytes.len() < MAGIC.len() + 1 + 32 || &bytes[..4] != MAGIC {
        return Err(corrupt(&path, "not a manifest"));
    }
    if bytes[4] != FORMAT {
        return Err(corrupt(&path, format!("format {} (this build reads {FORMAT})", bytes[4])));
    }
    let (body, sum) = bytes.split_at(bytes.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err(corrupt(&path, "checksum mismatch"));
    }
    bincode::deserialize(&body[5..]).map(Some).map_err(|e| corrupt(&path, e.to_string()))
}

/// Removes the manifest (the shards on disk no longer describe the state, e.g. after a
/// snapshot install); the files it named go at the next checkpoint.
pub fn invalidate(dir: &Path) -> Result<(), PersistError> {
    let path = dir.join(MANIFEST);
    match std::fs::remove_file(&path) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(&path)(e)),
    }
}

/// Writes one shard's files for log index `applied` (from a copy taken under the shard's
/// lock: [`Shard::freeze`]); returns their manifest entry.
pub(crate) fn write_shard(
    dir: &Path,
    namespace: &str,
    applied: u64,
    shard: &FrozenShard,
    key: Option<&DataKey>,
) -> Result<ShardFiles, PersistError> {
    let base = format!("{}-{applied}", stem(namespace));
    let meta_name = format!("{base}.meta");
    let meta_path = dir.join(&meta_name);
    let mut encoded = bincode::serialize(&shard.meta).map_err(|e| corrupt(&meta_path, e.to_string()))?;
    if let Some(key) = key {
        encoded = seal_file(key, namespace, &meta_name, &encoded);
    }
    write_synced(&meta_path, &encoded)?;
    let mut files = ShardFiles {
        meta: meta_name,
        meta_hash: *blake3::hash(&encoded).as_bytes(),
        parts: Vec::with_capacity(shard.parts.len()),
        memories: shard.meta.docs.len() as u64,
    };
    for (i, part) in shard.parts.iter().enumerate() {
        let name = format!("{base}-{i}.faiss");
        let path = dir.join(&name);
        match key {
            Some(key) => {
                let plain = native_bytes(part).map_err(|e| corrupt(&path, e.to_string()))?;
                write_synced(&path, &seal_file(key, namespace, &name, &plain))?;
            }
            None => {
                write_native(part, &path).map_err(|e| corrupt(&path, e.to_string()))?;
                File::open(&path).and_then(|f| f.sync_all()).map_err(io(&path))?;
            }
        }
        files.parts.push((name, hash_file(&path)?));
    }
    Ok(files)
}

/// Replaces the manifest, then deletes every shard file it does not name.
pub fn commit(dir: &Path, manifest: &Manifest) -> Result<(), PersistError> {
    let path = dir.join(MANIFEST);
    let tmp = dir.join("MANIFEST.tmp");
    let mut bytes = MAGIC.to_vec();
    bytes.push(FORMAT);
    bytes.extend(bincode::serialize(manifest).map_err(|e| corrupt(&path, e.to_string()))?);
    let sum = *blake3::hash(&bytes).as_bytes();
    bytes.extend_from_slice(&sum);
    write_synced(&tmp, &bytes)?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    sync_dir(dir)?;
    let keep: std::collections::HashSet<&str> = manifest
        .shards
        .values()
        .flat_map(|f| std::iter::once(f.meta.as_str()).chain(f.parts.iter().map(|(n, _)| n.as_str())))
        .collect();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let ours = name.ends_with(".meta") || name.ends_with(".faiss");
        if ours && !keep.contains(name) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// Reads one shard back, refusing any file whose hash differs from the manifest's.
pub fn read_shard(
    dir: &Path,
    files: &ShardFiles,
    namespace: &str,
    key: Option<&DataKey>,
) -> Result<Shard, PersistError> {
    let meta_path = dir.join(&files.meta);
    let bytes = std::fs::read(&meta_path).map_err(io(&meta_path))?;
    if blake3::hash(&bytes).as_bytes() != &files.meta_hash {
        return Err(corrupt(&meta_path, "checksum mismatch"));
    }
    let bytes = open_file(&meta_path, key, namespace, &files.meta, bytes)?;
    let meta: ShardMeta = bincode::deserialize(&bytes).map_err(|e| corrupt(&meta_path, e.to_string()))?;
    if meta.parts as usize != files.parts.len()
        || meta.part_kinds.len() != files.parts.len()
        || meta.part_labels.len() != files.parts.len()
        || meta.docs.len() as u64 != files.memories
    {
        return Err(corrupt(&meta_path, "does not match the manifest"));
    }
    let slots = Shard::part_slots(&meta);
    let mut parts = Vec::with_capacity(files.parts.len());
    for ((name, hash), present) in files.parts.iter().zip(slots) {
        let path = dir.join(name);
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        if blake3::hash(&bytes).as_bytes() != hash {
            return Err(corrupt(&path, "checksum mismatch"));
        }
        let kind = meta.part_kinds.get(parts.len()).copied().ok_or_else(|| corrupt(&meta_path, "part kinds"))?;
        let labels = meta.part_labels.get(parts.len()).cloned().flatten();
        let sealed = bytes.len() >= 4 && &bytes[..4] == SEALED;
        let plain = match sealed {
            true => Some(open_file(&path, key, namespace, name, bytes)?),
            false => None,
        };
        let shown = path.display();
        let source = match &plain {
            Some(bytes) => Native::Bytes(bytes, &shown),
            None => Native::File(&path),
        };
        let part = FaissIndex::read(source, meta.dim as usize, meta.metric, kind, present, labels)
            .map_err(|e| corrupt(&path, e.to_string()))?;
        parts.push(part);
    }
    Shard::from_parts(meta, parts).map_err(|e| corrupt(&meta_path, e.to_string()))
}
