//! Record codec. Memories are stored as one version byte followed by bincode, zstd-compressed
//! (format 2) when the text is long enough for that to pay; most of a short memory is its
//! embedding, which zstd cannot shrink, and compressing it was a fifth of `apply`'s time
//! (format 3: plain). Small metadata values are plain bincode. Decoding never panics on bad
//! bytes: it returns [`StorageError::Corrupt`].

use serde::{de::DeserializeOwned, Serialize};

use crate::error::StorageError;
use crate::memory::Memory;

/// Before reinforcement and merges: no access count, merge count, provenance or link.
const MEMORY_FORMAT_V1: u8 = 1;
const MEMORY_FORMAT_V2: u8 = 2;
/// Format 2's bincode, not compressed.
const MEMORY_FORMAT_V3: u8 = 3;
const ZSTD_LEVEL: i32 = 1;
/// Texts from this long are compressed; the result is kept only if it saves a tenth.
const COMPRESS_MIN_TEXT: usize = 512;

/// A format-1 record, read into today's [`Memory`] with empty new fields.
#[derive(serde::Deserialize)]
struct MemoryV1 {
    namespace: String,
    id: String,
    text: String,
    embedding: Vec<f32>,
    tags: std::collections::BTreeMap<String, String>,
    importance: f32,
    created_at_ms: u64,
    updated_at_ms: u64,
    last_accessed_at_ms: u64,
    expires_at_ms: Option<u64>,
    content_hash: [u8; 32],
    revision: u64,
}

impl From<MemoryV1> for Memory {
    fn from(m: MemoryV1) -> Memory {
        Memory {
            namespace: m.namespace,
            id: m.id,
            text: m.text,
            embedding: m.embedding,
            tags: m.tags,
            importance: m.importance,
            created_at_ms: m.created_at_ms,
            updated_at_ms: m.updated_at_ms,
            last_accessed_at_ms: m.last_accessed_at_ms,
            expires_at_ms: m.expires_at_ms,
            content_hash: m.content_hash,
            revision: m.revision,
            ..Memory::default()
        }
    }
}

/// Largest decoded record the one-shot decoder allocates up front (a frame's declared size
/// is only a claim; larger claims go through the streaming decoder, which grows as it reads).
const MAX_DIRECT_DECODE: u64 = 16 << 20;
/// Largest decoded record at all: a dump record's limit. A few hostile bytes that claim or
/// stream more (a decompression bomb in a row from disk, a snapshot or a backup) are refused
/// as corrupt instead of filling memory.
pub const MAX_DECODED_RECORD: u64 = 64 << 20;

thread_local! {
    // A zstd context costs a ~100 µs allocation and table reset to create: made once per
    // thread instead of once per record (it was the top of an ingest profile).
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> = const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { std::cell::RefCell::new(None) };
}

fn compress(raw: &[u8], out: &mut Vec<u8>) {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        let c = match &mut *c {
            Some(c) => c,
            none => none.insert(zstd::bulk::Compressor::new(ZSTD_LEVEL).expect("a zstd context")),
        };
        let start = out.len();
        out.resize(start + zstd::zstd_safe::compress_bound(raw.len()), 0);
        let n = c.compress_to_buffer(raw, &mut out[start..]).expect("the bound always fits");
        out.truncate(start + n);
    })
}

/// One zstd frame (or several: older records were written by the streaming encoder).
fn decompress(body: &[u8]) -> std::io::Result<Vec<u8>> {
    if let Ok(Some(size)) = zstd::zstd_safe::get_frame_content_size(body) {
        if size <= MAX_DIRECT_DECODE {
            let direct = DECOMPRESSOR.with(|d| {
                let mut d = d.borrow_mut();
                let d = match &mut *d {
                    Some(d) => d,
                    none => none.insert(zstd::bulk::Decompressor::new()?),
                };
                d.decompress(body, size as usize)
            });
            // A record of several frames (or a wrong size) takes the general path.
            if let Ok(raw) = direct {
                if raw.len() as u64 == size {
                    return Ok(raw);
                }
            }
        }
    }
    use std::io::Read;
    let mut out = Vec::new();
    zstd::stream::read::Decoder::new(body)?.take(MAX_DECODED_RECORD + 1).read_to_end(&mut out)?;
    if out.len() as u64 > MAX_DECODED_RECORD {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the record decompresses past {MAX_DECODED_RECORD} bytes"),
        ));
    }
    Ok(out)
}

pub fn encode_memory(m: &Memory) -> Vec<u8> {
    let mut plain = Vec::with_capacity(m.text.len() + m.embedding.len() * 4 + 256);
    plain.push(MEMORY_FORMAT_V3);
    bincode::serialize_into(&mut plain, m).expect("bincode of an in-memory Memory cannot fail");
    if m.text.len() >= COMPRESS_MIN_TEXT {
        let mut out = Vec::with_capacity(plain.len() / 2 + 8);
        out.push(MEMORY_FORMAT_V2);
        compress(&plain[1..], &mut out);
        if out.len() < plain.len() - plain.len() / 10 {
            return out;
        }
    }
    plain
}

/// Format 3's bincode: the legacy encoding `bincode::serialize` writes, with no trailing bytes
/// and no claim larger than the record itself can hold.
fn plain_options(len: usize) -> impl bincode::Options {
    use bincode::Options;
    bincode::DefaultOptions::new().with_fixint_encoding().with_limit(len as u64).reject_trailing_bytes()
}

/// Decodes `bytes` as [`plain_options`] do: nothing after the value, no claim larger than the
/// bytes themselves (for input from outside, such as a restore request's rows).
pub fn decode_exact<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, bincode::Error> {
    use bincode::Options;
    plain_options(bytes.len()).deserialize(bytes)
}

pub fn decode_memory(bytes: &[u8]) -> Result<Memory, StorageError> {
    let corrupt = |reason: String| StorageError::Corrupt { table: "memories", reason };
    match bytes.split_first() {
        Some((&MEMORY_FORMAT_V1, body)) => {
            let raw = decompress(body).map_err(|e| corrupt(format!("zstd: {e}")))?;
            bincode::deserialize::<MemoryV1>(&raw).map(Memory::from).map_err(|e| corrupt(format!("bincode: {e}")))
        }
        Some((&MEMORY_FORMAT_V2, body)) => {
            let raw = decompress(body).map_err(|e| corrupt(format!("zstd: {e}")))?;
            bincode::deserialize(&raw).map_err(|e| corrupt(format!("bincode: {e}")))
        }
        Some((&MEMORY_FORMAT_V3, body)) => {
            use bincode::Options;
            plain_options(body.len()).deserialize(body).map_err(|e| corrupt(format!("bincode: {e}")))
        }
        Some((v, _)) => Err(corrupt(format!("unknown record format {v}"))),
        None => Err(corrupt("empty record".into())),
    }
}

/// A memory row as this node writes it: sealed under its namespace's data key when the
/// namespace has one (see `storage::vault`), plain otherwise.
pub fn encode_memory_in(vault: &super::vault::Vault, m: &Memory) -> Vec<u8> {
    let plain = encode_memory(m);
    match vault.for_namespace(&m.namespace) {
        Some(key) => super::vault::seal_row(&key, &super::memory_key(&m.namespace, &m.id), &plain),
        None => plain,
    }
}

/// Reads a `memories` row stored under `key`, opening it first if it is sealed.
pub fn decode_memory_in(vault: &super::vault::Vault, key: &[u8], value: &[u8]) -> Result<Memory, StorageError> {
    if super::vault::sealed_by(value).is_none() && value.first() != Some(&super::vault::SEALED_ROW) {
        return decode_memory(value);
    }
    let plain = super::vault::open_row(vault, key, value)?;
    if plain.first() == Some(&super::vault::SEALED_ROW) {
        return Err(StorageError::Corrupt { table: "memories", reason: "a sealed row inside a sealed row".into() });
    }
    decode_memory(&plain)
}

/// The version byte of a row of the versioned tables (log entries; namespace, idempotency and
/// auth rows), from file format 1 (see `storage::format`).
pub const ROW_V1: u8 = 1;

/// A row of a versioned table: [`ROW_V1`], then bincode.
pub fn encode_row<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.push(ROW_V1);
    bincode::serialize_into(&mut out, v).expect("bincode of an in-memory value cannot fail");
    out
}

/// Reads a row [`encode_row`] wrote; an unknown version byte is corruption, not a guess.
pub fn decode_row<T: DeserializeOwned>(table: &'static str, bytes: &[u8]) -> Result<T, StorageError> {
    match bytes.split_first() {
        Some((&ROW_V1, body)) => decode(table, body),
        Some((v, _)) => Err(StorageError::Corrupt { table, reason: format!("unknown row format {v}") }),
        None => Err(StorageError::Corrupt { table, reason: "empty row".into() }),
    }
}

/// The part of a versioned row that digests cover: its body, not its framing, so a row
/// before and after the format-1 upgrade digests the same.
pub fn row_body(bytes: &[u8]) -> &[u8] {
    match bytes.split_first() {
        Some((&ROW_V1, body)) => body,
        _ => bytes,
    }
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serialize(v).expect("bincode of an in-memory value cannot fail")
}

pub fn decode<T: DeserializeOwned>(table: &'static str, bytes: &[u8]) -> Result<T, StorageError> {
    bincode::deserialize(bytes).map_err(|e| StorageError::Corrupt { table, reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn memory() -> impl Strategy<Value = Memory> {
        (
            "[a-z]{1,8}(/[a-z0-9]{1,8})?",
            "[A-Za-z0-9_.:-]{1,40}",
            any::<String>(),
            proptest::collection::vec(-1e6f32..1e6, 0..64),
            proptest::collection::btree_map("[a-z]{1,8}", ".{0,16}", 0..6),
            (0.0f32..=1.0, any::<u64>(), any::<u64>(), proptest::option::of(any::<u64>()), any::<u64>()),
        )
            .prop_map(|(namespace, id, text, embedding, tags, (importance, c, u, exp, rev))| Memory {
                content_hash: crate::memory::content_hash(&text),
                namespace,
                id,
                text,
                embedding,
                tags: tags.into_iter().collect::<BTreeMap<_, _>>(),
                importance,
                created_at_ms: c,
                updated_at_ms: u,
                last_accessed_at_ms: u,
                expires_at_ms: exp,
                revision: rev,
                access_count: c % 7,
                merge_count: (u % 5) as u32,
                merged_from: if c % 2 == 0 { vec!["x".into()] } else { vec![] },
                linked_to: (u % 3 == 0).then(|| "twin".into()),
            })
    }

    #[test]
    fn a_decompression_bomb_is_refused() {
        use std::io::Read;
        // A few KiB of zstd that expand past the record limit, as one frame that states its
        // size and as a streamed one: refused, never held whole.
        let size = MAX_DECODED_RECORD + 1;
        let mut streamed = vec![MEMORY_FORMAT_V2];
        zstd::stream::copy_encode(std::io::repeat(0).take(size), &mut streamed, 1).unwrap();
        let mut sized = vec![MEMORY_FORMAT_V2];
        sized.extend(zstd::bulk::compress(&vec![0u8; size as usize], 1).unwrap());
        for bomb in [streamed, sized] {
            assert!(bomb.len() < 64 << 10, "a small row: {} bytes", bomb.len());
            let e = decode_memory(&bomb).unwrap_err().to_string();
            assert!(e.contains("past"), "{e}");
        }
    }

    proptest! {
        #[test]
        fn memory_round_trips(m in memory()) {
            prop_assert_eq!(decode_memory(&encode_memory(&m)).unwrap(), m);
        }

        #[test]
        fn format_1_records_still_read(m in memory()) {
            #[derive(serde::Serialize)]
            struct V1<'a> {
                namespace: &'a str, id: &'a str, text: &'a str, embedding: &'a [f32],
                tags: &'a BTreeMap<String, String>, importance: f32, created_at_ms: u64,
                updated_at_ms: u64, last_accessed_at_ms: u64, expires_at_ms: Option<u64>,
                content_hash: [u8; 32], revision: u64,
            }
            let v1 = V1 {
                namespace: &m.namespace, id: &m.id, text: &m.text, embedding: &m.embedding, tags: &m.tags,
                importance: m.importance, created_at_ms: m.created_at_ms, updated_at_ms: m.updated_at_ms,
                last_accessed_at_ms: m.last_accessed_at_ms, expires_at_ms: m.expires_at_ms,
                content_hash: m.content_hash, revision: m.revision,
            };
            let mut bytes = vec![MEMORY_FORMAT_V1];
            zstd::stream::copy_encode(&bincode::serialize(&v1).unwrap()[..], &mut bytes, 1).unwrap();
            let read = decode_memory(&bytes).unwrap();
            let want = Memory { access_count: 0, merge_count: 0, merged_from: vec![], linked_to: None, ..m };
            prop_assert_eq!(read, want);
        }

        #[test]
        fn streamed_and_multi_frame_records_still_read(m in memory(), split in 0usize..4096) {
            // Records written before the one-shot encoder: one streamed frame (no content
            // size), and the general case of several frames.
            let raw = bincode::serialize(&m).unwrap();
            let mut bytes = vec![MEMORY_FORMAT_V2];
            zstd::stream::copy_encode(&raw[..], &mut bytes, 1).unwrap();
            prop_assert_eq!(decode_memory(&bytes).unwrap(), m.clone());
            let cut = split % (raw.len() + 1);
            let mut bytes = vec![MEMORY_FORMAT_V2];
            bytes.extend(zstd::bulk::compress(&raw[..cut], 1).unwrap());
            bytes.extend(zstd::bulk::compress(&raw[cut..], 1).unwrap());
            prop_assert_eq!(decode_memory(&bytes).unwrap(), m);
        }

        #[test]
        fn short_texts_are_stored_plain_and_long_ones_compressed(m in memory(), long in any::<bool>()) {
            let m = if long { Memory { text: "the user prefers green tea. ".repeat(40), ..m } } else { m };
            let enc = encode_memory(&m);
            prop_assert_eq!(enc[0], if long { MEMORY_FORMAT_V2 } else { MEMORY_FORMAT_V3 });
            prop_assert_eq!(decode_memory(&enc).unwrap(), m.clone());
            // A plain record with a byte too many is refused, not read.
            let mut plain = vec![MEMORY_FORMAT_V3];
            plain.extend(bincode::serialize(&m).unwrap());
            plain.push(0);
            prop_assert!(decode_memory(&plain).is_err());
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_memory(&bytes);
        }

        #[test]
        fn truncated_records_are_refused(m in memory(), cut in 0usize..1000) {
            let enc = encode_memory(&m);
            let cut = cut % enc.len();
            prop_assert!(decode_memory(&enc[..cut]).is_err());
        }
    }

    /// A log row as the log store writes it: a client put with `n` memories of `text`.
    fn log_row(text: &str, n: usize) -> Vec<u8> {
        use crate::raft::{Command, Entry, LogId, Op};
        let items = (0..n)
            .map(|i| {
                (
                    crate::memory::MemoryInput {
                        id: format!("m{i}"),
                        text: text.into(),
                        embedding: vec![0.5; 8],
                        tags: [("k".to_string(), "v".to_string())].into(),
                        importance: 0.5,
                        expires_at_ms: None,
                    },
                    crate::memory::Precondition::None,
                )
            })
            .collect();
        let op = Op::PutChecked { namespace: "a/b".into(), items, create: true, approx_min_vectors: 10_000 };
        let leader = openraft::vote::leader_id_adv::LeaderId { term: 3, node_id: 1 };
        let e = Entry { log_id: LogId::new(leader, 9), payload: openraft::EntryPayload::Normal(Command::system(op)) };
        encode_row(&e)
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: std::env::var("ENGRAM_FUZZ_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256),
            ..ProptestConfig::default()
        })]

        /// Fuzz target (log entries): garbage, and any edit of a real log row, decodes or is
        /// refused without a panic, and a length prefix never allocates beyond the row.
        #[test]
        fn log_rows_decode_or_are_refused(
            text in ".{0,64}",
            n in 0usize..20,
            at in any::<usize>(),
            edit in proptest::collection::vec(any::<u8>(), 1..16),
            kind in 0u8..4,
            garbage in proptest::collection::vec(any::<u8>(), 0..(64 << 10)),
        ) {
            let good = log_row(&text, n);
            let row = match kind {
                0 => {
                    let mut r = good.clone();
                    let at = at % r.len();
                    let end = (at + edit.len()).min(r.len());
                    r[at..end].copy_from_slice(&edit[..end - at]);
                    r
                }
                1 => good[..at % good.len()].to_vec(),
                2 => {
                    let mut r = good.clone();
                    let at = at % r.len();
                    r.splice(at..at, edit.iter().copied());
                    r
                }
                _ => garbage,
            };
            let _ = decode_row::<crate::raft::Entry>("log", &row);
            prop_assert!(decode_row::<crate::raft::Entry>("log", &good).is_ok());
        }

        /// Fuzz target (state rows): big garbage (up to 1 MiB) in a memory row is refused
        /// without a panic, plain or sealed.
        #[test]
        fn big_garbage_memory_rows_are_refused(
            garbage in proptest::collection::vec(any::<u8>(), 0..(1 << 20)),
            version in 0u8..6,
        ) {
            let mut row = garbage;
            if !row.is_empty() {
                row[0] = version;
            }
            let _ = decode_memory(&row);
            let vault = crate::storage::vault::Vault::new(Some(crate::backup::Keyring::single(crate::backup::MasterKey::generate())));
            let _ = decode_memory_in(&vault, b"a/b\x00id", &row);
        }
    }
}
