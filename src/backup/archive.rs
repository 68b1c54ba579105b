//! The backup archive: a fixed header, then sealed chunks, closed by a sealed manifest. The
//! byte layout is in `docs/backup.md`. [`ArchiveWriter`] and [`ArchiveReader`] hold one chunk
//! in memory at a time.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use super::crypto::{ArchiveCipher, MasterKey, SALT_BYTES, TAG_BYTES};
use super::keys::Keyring;
use super::BackupError;

pub const MAGIC: &[u8; 8] = b"ENGRAMBK";
/// 2: the manifest carries the source's data digest at the backup's index.
pub const FORMAT_VERSION: u16 = 2;
/// The oldest format this build reads.
const OLDEST_FORMAT: u16 = 1;
pub const HEADER_BYTES: usize = 160;
const FLAG_ZSTD: u32 = 1;
pub const DEFAULT_CHUNK_BYTES: u32 = 1 << 20;
const MAX_CHUNK_BYTES: u32 = 16 << 20;
const KIND_DATA: u8 = 0;
const KIND_MANIFEST: u8 = 1;

/// The archive header: in the clear, checksummed, and authenticated by every chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The archive format ([`FORMAT_VERSION`] for new archives).
    pub format: u16,
    pub cluster_id: [u8; 16],
    pub backup_id: [u8; 16],
    pub created_at_ms: u64,
    /// The applied log id the backup is consistent at: (term, leader node id, index).
    pub applied_term: u64,
    pub applied_node: u64,
    pub applied_index: u64,
    pub key_id: [u8; 8],
    pub salt: [u8; SALT_BYTES],
    pub chunk_bytes: u32,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..8].copy_from_slice(MAGIC);
        b[8..10].copy_from_slice(&self.format.to_le_bytes());
        b[10..12].copy_from_slice(&(HEADER_BYTES as u16).to_le_bytes());
        b[12..16].copy_from_slice(&FLAG_ZSTD.to_le_bytes());
        b[16..32].copy_from_slice(&self.cluster_id);
        b[32..48].copy_from_slice(&self.backup_id);
        b[48..56].copy_from_slice(&self.created_at_ms.to_le_bytes());
        b[56..64].copy_from_slice(&self.applied_term.to_le_bytes());
        b[64..72].copy_from_slice(&self.applied_node.to_le_bytes());
        b[72..80].copy_from_slice(&self.applied_index.to_le_bytes());
        b[80..88].copy_from_slice(&self.key_id);
        b[88..120].copy_from_slice(&self.salt);
        b[120..124].copy_from_slice(&self.chunk_bytes.to_le_bytes());
        // 124..128 reserved, zero.
        let sum = blake3::hash(&b[..128]);
        b[128..160].copy_from_slice(sum.as_bytes());
        b
    }

    pub fn decode(b: &[u8; HEADER_BYTES]) -> Result<Header, BackupError> {
        let bad = |reason: &str| BackupError::corrupt("header", reason);
        if &b[0..8] != MAGIC {
            return Err(bad("not an Engram backup (bad magic)"));
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if !(OLDEST_FORMAT..=FORMAT_VERSION).contains(&version) {
            return Err(bad(&format!(
                "unsupported format version {version} (this build reads {OLDEST_FORMAT} to {FORMAT_VERSION})"
            )));
        }
        if blake3::hash(&b[..128]).as_bytes() != &b[128..160] {
            return Err(bad("checksum mismatch"));
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        if u16::from_le_bytes([b[10], b[11]]) as usize != HEADER_BYTES || u32_at(12) != FLAG_ZSTD || u32_at(124) != 0 {
            return Err(bad("unknown header length, flags or reserved bits"));
        }
        let chunk_bytes = u32_at(120);
        if chunk_bytes == 0 || chunk_bytes > MAX_CHUNK_BYTES {
            return Err(bad(&format!("chunk size {chunk_bytes} out of range")));
        }
        Ok(Header {
            format: version,
            cluster_id: b[16..32].try_into().expect("16 bytes"),
            backup_id: b[32..48].try_into().expect("16 bytes"),
            created_at_ms: u64_at(48),
            applied_term: u64_at(56),
            applied_node: u64_at(64),
            applied_index: u64_at(72),
            key_id: b[80..88].try_into().expect("8 bytes"),
            salt: b[88..120].try_into().expect("32 bytes"),
            chunk_bytes,
        })
    }
}

/// The last, sealed chunk: what a reader must have seen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub chunks: u64,
    pub payload_bytes: u64,
    /// BLAKE3 of each data chunk's ciphertext, in order.
    pub chunk_checksums: Vec<[u8; 32]>,
    /// What the payload (a zstd-compressed state dump) holds.
    pub rows: u64,
    pub memories: u64,
    pub namespaces: u64,
    pub dump_bytes: u64,
    pub dump_digest: [u8; 32],
    /// The source's data digest (`StateReader::data_digest`) in the read transaction the dump
    /// came from: what a restore of this backup must reproduce. `None` in format 1.
    pub data_digest: Option<[u8; 32]>,
}

/// A format-1 manifest: no data digest.
#[derive(Serialize, Deserialize)]
struct ManifestV1 {
    chunks: u64,
    payload_bytes: u64,
    chunk_checksums: Vec<[u8; 32]>,
    rows: u64,
    memories: u64,
    namespaces: u64,
    dump_bytes: u64,
    dump_digest: [u8; 32],
}

impl From<ManifestV1> for Manifest {
    fn from(m: ManifestV1) -> Manifest {
        Manifest {
            chunks: m.chunks,
            payload_bytes: m.payload_bytes,
            chunk_checksums: m.chunk_checksums,
            rows: m.rows,
            memories: m.memories,
            namespaces: m.namespaces,
            dump_bytes: m.dump_bytes,
            dump_digest: m.dump_digest,
            data_digest: None,
        }
    }
}

/// Dump figures the writer's caller puts into the manifest.
#[derive(Debug, Clone, Default)]
pub struct Contents {
    pub rows: u64,
    pub memories: u64,
    pub namespaces: u64,
    pub dump_bytes: u64,
    pub dump_digest: [u8; 32],
    pub data_digest: Option<[u8; 32]>,
}

/// Seals a payload into an archive, one chunk at a time.
pub struct ArchiveWriter<W: Write> {
    out: W,
    header: [u8; HEADER_BYTES],
    cipher: ArchiveCipher,
    buf: Vec<u8>,
    chunk_bytes: usize,
    checksums: Vec<[u8; 32]>,
    payload_bytes: u64,
    written: u64,
}

impl<W: Write> ArchiveWriter<W> {
    pub fn new(mut out: W, header: &Header, key: &MasterKey) -> io::Result<Self> {
        assert_eq!(header.key_id, key.id(), "the header names the key that seals it");
        let encoded = header.encode();
        out.write_all(&encoded)?;
        Ok(ArchiveWriter {
            out,
            header: encoded,
            cipher: ArchiveCipher::new(key, &header.salt),
            buf: Vec::with_capacity(header.chunk_bytes as usize),
            chunk_bytes: header.chunk_bytes as usize,
            checksums: Vec::new(),
            payload_bytes: 0,
            written: HEADER_BYTES as u64,
        })
    }

    fn frame(&mut self, kind: u8, last: bool, index: u64, plaintext: &[u8]) -> io::Result<[u8; 32]> {
        let sealed = self.cipher.seal(index, last, &self.header, plaintext);
        self.out.write_all(&[kind])?;
        self.out.write_all(&(sealed.len() as u32).to_le_bytes())?;
        self.out.write_all(&sealed)?;
        self.written += 5 + sealed.len() as u64;
        Ok(*blake3::hash(&sealed).as_bytes())
    }

    fn seal_buffered(&mut self) -> io::Result<()> {
        let plaintext = std::mem::take(&mut self.buf);
        let sum = self.frame(KIND_DATA, false, self.checksums.len() as u64, &plaintext)?;
        self.checksums.push(sum);
        self.buf = plaintext;
        self.buf.clear();
        Ok(())
    }

    /// Seals what is buffered and the manifest; returns the sink, the manifest and the
    /// archive's size in bytes.
    pub fn finish(mut self, contents: Contents) -> io::Result<(W, Manifest, u64)> {
        if !self.buf.is_empty() || self.checksums.is_empty() {
            self.seal_buffered()?;
        }
        let manifest = Manifest {
            chunks: self.checksums.len() as u64,
            payload_bytes: self.payload_bytes,
            chunk_checksums: std::mem::take(&mut self.checksums),
            rows: contents.rows,
            memories: contents.memories,
            namespaces: contents.namespaces,
            dump_bytes: contents.dump_bytes,
            dump_digest: contents.dump_digest,
            data_digest: contents.data_digest,
        };
        // The manifest of the header's format (1 only where a test writes an old archive).
        let encoded = match u16::from_le_bytes([self.header[8], self.header[9]]) {
            1 => bincode::serialize(&ManifestV1 {
                chunks: manifest.chunks,
                payload_bytes: manifest.payload_bytes,
                chunk_checksums: manifest.chunk_checksums.clone(),
                rows: manifest.rows,
                memories: manifest.memories,
                namespaces: manifest.namespaces,
                dump_bytes: manifest.dump_bytes,
                dump_digest: manifest.dump_digest,
            }),
            _ => bincode::serialize(&manifest),
        }
        .expect("bincode of a manifest");
        self.frame(KIND_MANIFEST, true, manifest.chunks, &encoded)?;
        self.out.flush()?;
        Ok((self.out, manifest, self.written))
    }
}

impl<W: Write> Write for ArchiveWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(self.chunk_bytes - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        self.payload_bytes += n as u64;
        if self.buf.len() == self.chunk_bytes {
            self.seal_buffered()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads and authenticates an archive, yielding its payload. Nothing it yields is unverified:
/// each chunk is authenticated before its first byte is returned. The payload is whole only
/// once [`finish`](Self::finish) has checked the manifest.
pub struct ArchiveReader<R: Read> {
    input: R,
    header: Header,
    header_bytes: [u8; HEADER_BYTES],
    cipher: ArchiveCipher,
    plain: Vec<u8>,
    pos: usize,
    index: u64,
    checksums: Vec<[u8; 32]>,
    payload_bytes: u64,
    manifest: Option<Manifest>,
}

/// Reads the header alone (no key needed).
pub fn read_header(input: &mut impl Read) -> Result<(Header, [u8; HEADER_BYTES]), BackupError> {
    let mut b = [0u8; HEADER_BYTES];
    input.read_exact(&mut b).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => BackupError::corrupt("header", "file shorter than a header"),
        _ => BackupError::Io(e),
    })?;
    Ok((Header::decode(&b)?, b))
}

impl<R: Read> ArchiveReader<R> {
    pub fn open(mut input: R, keys: &Keyring) -> Result<Self, BackupError> {
        let (header, header_bytes) = read_header(&mut input)?;
        let key = keys.get(&header.key_id).ok_or_else(|| BackupError::WrongKey {
            key_id: hex::encode(header.key_id),
            have: keys.ids().iter().map(|(id, _, _)| hex::encode(id)).collect::<Vec<_>>().join(", "),
        })?;
        let cipher = ArchiveCipher::new(key, &header.salt);
        Ok(ArchiveReader {
            input,
            header,
            header_bytes,
            cipher,
            plain: Vec::new(),
            pos: 0,
            index: 0,
            checksums: Vec::new(),
            payload_bytes: 0,
            manifest: None,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Reads the next frame; false once the manifest has been read and checked.
    fn next_frame(&mut self) -> Result<bool, BackupError> {
        if self.manifest.is_some() {
            return Ok(false);
        }
        let at = format!("chunk {}", self.index);
        let mut head = [0u8; 5];
        self.input.read_exact(&mut head).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => BackupError::corrupt(&at, "archive ends before its manifest (truncated)"),
            _ => BackupError::Io(e),
        })?;
        let len = u32::from_le_bytes(head[1..5].try_into().expect("4 bytes")) as usize;
        let max = self.header.chunk_bytes as usize + TAG_BYTES;
        let kind = head[0];
        if kind > KIND_MANIFEST || len < TAG_BYTES || (kind == KIND_DATA && len > max) || len > MAX_CHUNK_BYTES as usize
        {
            return Err(BackupError::corrupt(&at, format!("bad frame (kind {kind}, length {len})")));
        }
        let mut sealed = vec![0u8; len];
        self.input.read_exact(&mut sealed).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => BackupError::corrupt(&at, "truncated"),
            _ => BackupError::Io(e),
        })?;
        let last = kind == KIND_MANIFEST;
        let plain = self.cipher.open(self.index, last, &self.header_bytes, &sealed).map_err(|_| {
            BackupError::corrupt(&at, "authentication failed: the chunk was altered, reordered or dropped")
        })?;
        if !last {
            self.checksums.push(*blake3::hash(&sealed).as_bytes());
            self.payload_bytes += plain.len() as u64;
            self.plain = plain;
            self.pos = 0;
            self.index += 1;
            return Ok(true);
        }
        let bad = |e: bincode::Error| BackupError::corrupt("manifest", e.to_string());
        let manifest: Manifest = match self.header.format {
            1 => bincode::deserialize::<ManifestV1>(&plain).map_err(bad)?.into(),
            _ => bincode::deserialize(&plain).map_err(bad)?,
        };
        if manifest.chunks != self.index
            || manifest.chunk_checksums != self.checksums
            || manifest.payload_bytes != self.payload_bytes
        {
            return Err(BackupError::corrupt("manifest", "chunk count, checksums or size differ from the chunks read"));
        }
        let mut extra = [0u8; 1];
        if self.input.read(&mut extra)? != 0 {
            return Err(BackupError::corrupt("manifest", "bytes after the manifest"));
        }
        self.manifest = Some(manifest);
        Ok(false)
    }

    /// Checks that the payload was read to its end and the manifest follows it; returns the
    /// header, the manifest and the input.
    pub fn finish(mut self) -> Result<(Header, Manifest, R), BackupError> {
        if self.pos < self.plain.len() || self.next_frame()? {
            return Err(BackupError::corrupt("payload", "data after the end of the state dump"));
        }
        let manifest = self.manifest.take().expect("next_frame returned false: the manifest was read");
        Ok((self.header, manifest, self.input))
    }
}

impl<R: Read> Read for ArchiveReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.plain.len() {
            match self.next_frame() {
                Ok(true) => {}
                Ok(false) => return Ok(0),
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
        }
        let n = buf.len().min(self.plain.len() - self.pos);
        buf[..n].copy_from_slice(&self.plain[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
