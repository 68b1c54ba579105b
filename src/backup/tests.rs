//! Archive round trips and the refusal of every damaged archive, with a real redb state.

use std::collections::BTreeMap;

use proptest::prelude::*;
use redb::{Database, ReadableDatabase, ReadableTable};

use super::archive::{ArchiveWriter, Contents, Header, HEADER_BYTES};
use super::crypto::MasterKey;
use super::restore::{restore, RestoreTarget};
use super::*;
use crate::raft::{EngramNode, LogId};
use crate::storage::{codec, IDEMPOTENCY, MEMORIES, META_APPLIED, NAMESPACES, SM_META};

/// A state machine file with `n` memories (half of them incompressible), two namespaces and
/// an idempotency row, applied at index 42.
fn fixture(dir: &std::path::Path, n: u64) -> Database {
    let db = Database::create(dir.join("state.redb")).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let leader = openraft::vote::leader_id_adv::LeaderId { term: 3, node_id: 2 };
        let mut meta = txn.open_table(SM_META).unwrap();
        meta.insert(META_APPLIED, codec::encode(&LogId::new(leader, 42)).as_slice()).unwrap();
        let mut ns = txn.open_table(NAMESPACES).unwrap();
        ns.insert("a", b"info-a".as_slice()).unwrap();
        ns.insert("b", b"info-b".as_slice()).unwrap();
        let mut m = txn.open_table(MEMORIES).unwrap();
        let mut x = 0x9e3779b97f4a7c15u64;
        for i in 0..n {
            // Real records (a restore rebuilds the derived indexes from them): half with
            // incompressible text, half with repetitive text.
            let bytes: Vec<u8> = (0..150)
                .map(|j| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    if i % 2 == 0 {
                        (x & 0xff) as u8
                    } else {
                        (j % 7) as u8
                    }
                })
                .collect();
            let ns = if i % 3 == 0 { "a" } else { "b" };
            let text = hex::encode(&bytes);
            let memory = crate::memory::Memory {
                namespace: ns.into(),
                id: format!("m{i:05}"),
                content_hash: crate::memory::content_hash(&text),
                text,
                embedding: vec![i as f32, 1.0],
                expires_at_ms: (i % 5 == 0).then_some(1000 + i),
                ..Default::default()
            };
            m.insert(crate::storage::memory_key(ns, &memory.id).as_slice(), codec::encode_memory(&memory).as_slice())
                .unwrap();
        }
        txn.open_table(IDEMPOTENCY).unwrap().insert("k1", b"result".as_slice()).unwrap();
        txn.open_table(crate::storage::IDEM_EXPIRY).unwrap().insert((7u64, "k1"), ()).unwrap();
        // The auth state travels with the data: a key, a role, a quota.
        for (i, (_, table)) in crate::storage::AUTH_TABLES.into_iter().enumerate() {
            txn.open_table(table).unwrap().insert(format!("row-{i}").as_str(), b"auth".as_slice()).unwrap();
        }
    }
    txn.commit().unwrap();
    db
}

/// BLAKE3 over the data tables (not sm_meta, which a restore rewrites).
fn data_digest(db: &Database) -> [u8; 32] {
    let txn = db.begin_read().unwrap();
    let mut h = blake3::Hasher::new();
    for item in txn.open_table(MEMORIES).unwrap().iter().unwrap() {
        let (k, v) = item.unwrap();
        h.update(k.value());
        h.update(v.value());
    }
    for item in txn.open_table(NAMESPACES).unwrap().iter().unwrap() {
        let (k, v) = item.unwrap();
        h.update(k.value().as_bytes());
        h.update(v.value());
    }
    for item in txn.open_table(IDEMPOTENCY).unwrap().iter().unwrap() {
        let (k, v) = item.unwrap();
        h.update(k.value().as_bytes());
        h.update(v.value());
    }
    for (_, table) in crate::storage::AUTH_TABLES {
        for item in txn.open_table(table).unwrap().iter().unwrap() {
            let (k, v) = item.unwrap();
            h.update(k.value().as_bytes());
            h.update(v.value());
        }
    }
    *h.finalize().as_bytes()
}

/// An archive of `db` with small chunks, so that tests see many of them.
fn small_chunked(db: &Database, key: &MasterKey) -> Vec<u8> {
    chunked_as(db, key, super::archive::FORMAT_VERSION)
}

/// An archive of `db` in archive `format`, with small chunks.
fn chunked_as(db: &Database, key: &MasterKey, format: u16) -> Vec<u8> {
    let txn = db.begin_read().unwrap();
    let (applied, _) = crate::storage::dump::head(&txn).unwrap();
    let applied = applied.unwrap();
    let header = Header {
        format,
        cluster_id: [7; 16],
        backup_id: *uuid::Uuid::now_v7().as_bytes(),
        created_at_ms: 1,
        applied_term: applied.leader_id.term,
        applied_node: applied.leader_id.node_id,
        applied_index: applied.index,
        key_id: key.id(),
        salt: crypto::random_salt(),
        chunk_bytes: 512,
    };
    let mut w = ArchiveWriter::new(Vec::new(), &header, key).unwrap();
    let mut z = zstd::stream::Encoder::new(&mut w, 3).unwrap();
    let s = crate::storage::dump::write(&txn, &mut z, crate::storage::dump::DataKeys::Exclude).unwrap();
    z.finish().unwrap();
    let contents = Contents {
        rows: s.rows,
        memories: s.memories,
        namespaces: s.namespaces,
        dump_bytes: s.bytes,
        dump_digest: s.digest,
        // Any value: these tests check that it is carried (the drill tests check what it is).
        data_digest: (format >= 2).then_some([5; 32]),
    };
    w.finish(contents).unwrap().0
}

/// (offset, total length) of each frame after the header.
fn frames(archive: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = HEADER_BYTES;
    while at < archive.len() {
        let len = u32::from_le_bytes(archive[at + 1..at + 5].try_into().unwrap()) as usize;
        out.push((at, 5 + len));
        at += 5 + len;
    }
    out
}

fn members() -> BTreeMap<u64, EngramNode> {
    (1..=3)
        .map(|i| {
            (
                i,
                EngramNode {
                    raft_addr: format!("127.0.0.1:{}", 7100 + i),
                    api_addr: format!("127.0.0.1:{}", 7000 + i),
                },
            )
        })
        .collect()
}

fn target(dir: &std::path::Path) -> RestoreTarget {
    RestoreTarget { data_dir: dir.to_path_buf(), node_id: 2, members: members(), force: false, at_rest: None }
}

#[test]
fn a_backup_verifies_and_restores_to_the_same_data_with_a_new_identity() {
    let dir = tempfile::tempdir().unwrap();
    let db = fixture(dir.path(), 300);
    let keys = Keyring::single(MasterKey::generate());
    let (archive, created) = create(&db, [9; 16], &keys, Vec::new()).unwrap();
    assert_eq!(created.archive_bytes, archive.len() as u64);
    assert_eq!((created.manifest.memories, created.manifest.namespaces), (300, 2));
    assert_eq!(created.header.applied_index, 42);

    let verified = verify(archive.as_slice(), &keys).unwrap();
    assert_eq!(verified, created);

    let data_dir = dir.path().join("restored");
    let restored = restore(archive.as_slice(), &keys, &target(&data_dir)).unwrap();
    assert_eq!(restored.info.manifest, created.manifest);
    let rdb = Database::create(data_dir.join("state.redb")).unwrap();
    assert_eq!(data_digest(&rdb), data_digest(&db));
    let reader = crate::storage::StateReader::new(std::sync::Arc::new(rdb));
    let new_id = reader.cluster_id().unwrap().unwrap();
    assert_ne!(new_id, [9; 16], "a restored cluster has a new identity");
    assert_eq!(new_id, restore::restored_cluster_id(&created.header.backup_id, &members()));
    assert_eq!(std::fs::read_to_string(data_dir.join("node_id")).unwrap(), "2");
    // Nothing but the data dir was left beside it.
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn a_format_1_archive_still_verifies_and_restores_without_a_source_digest() {
    let dir = tempfile::tempdir().unwrap();
    let db = fixture(dir.path(), 40);
    let key = MasterKey::generate();
    let keys = Keyring::single(key.clone());
    let old = chunked_as(&db, &key, 1);
    let new = chunked_as(&db, &key, 2);
    assert_eq!(u16::from_le_bytes([old[8], old[9]]), 1);
    let v1 = verify(old.as_slice(), &keys).unwrap();
    assert_eq!((v1.header.format, v1.manifest.data_digest), (1, None));
    let v2 = verify(new.as_slice(), &keys).unwrap();
    assert_eq!((v2.header.format, v2.manifest.data_digest), (2, Some([5; 32])));
    let restored = restore(old.as_slice(), &keys, &target(&dir.path().join("restored"))).unwrap();
    assert_eq!(restored.info.manifest.memories, 40);
    let rdb = Database::create(dir.path().join("restored").join("state.redb")).unwrap();
    assert_eq!(data_digest(&rdb), data_digest(&db));
    // A format this build does not know is refused.
    let mut future = chunked_as(&db, &key, 2);
    future[8] = 3;
    let sum = blake3::hash(&future[..128]);
    future[128..160].copy_from_slice(sum.as_bytes());
    let e = verify(future.as_slice(), &keys).unwrap_err().to_string();
    assert!(e.contains("unsupported format version 3"), "{e}");
}

#[test]
fn a_non_empty_data_dir_is_refused_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let db = fixture(dir.path(), 10);
    let keys = Keyring::single(MasterKey::generate());
    let (archive, _) = create(&db, [1; 16], &keys, Vec::new()).unwrap();
    let data_dir = dir.path().join("node");
    std::fs::create_dir_all(&data_dir).unwrap();
    std::fs::write(data_dir.join("precious"), b"x").unwrap();
    let e = restore(archive.as_slice(), &keys, &target(&data_dir)).unwrap_err();
    assert!(matches!(e, BackupError::Target(_)), "{e}");
    assert!(data_dir.join("precious").exists());
    let forced = RestoreTarget { force: true, ..target(&data_dir) };
    restore(archive.as_slice(), &keys, &forced).unwrap();
    assert!(!data_dir.join("precious").exists());
    assert!(data_dir.join("state.redb").exists());
    let bad = RestoreTarget { node_id: 9, ..target(&dir.path().join("other")) };
    assert!(matches!(restore(archive.as_slice(), &keys, &bad).unwrap_err(), BackupError::Target(_)));
}

/// Every way of damaging an archive is refused, and a refused restore writes nothing.
fn refused(archive: &[u8], keys: &Keyring, what: &str) {
    let e = verify(archive, keys).expect_err(what);
    assert!(matches!(e, BackupError::Corrupt { .. } | BackupError::WrongKey { .. }), "{what}: {e}");
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("node");
    assert!(restore(archive, keys, &target(&data_dir)).is_err(), "{what}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "{what}: a refused restore wrote something");
}

#[test]
fn every_flipped_bit_truncation_and_chunk_shuffle_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = fixture(dir.path(), 40);
    let key = MasterKey::generate();
    let keys = Keyring::single(key.clone());
    let archive = small_chunked(&db, &key);
    verify(archive.as_slice(), &keys).unwrap();
    let fr = frames(&archive);
    assert!(fr.len() > 8, "want many chunks, got {}", fr.len());

    // One flipped bit at every byte (the bit cycles), header included.
    for i in 0..archive.len() {
        let mut a = archive.clone();
        a[i] ^= 1 << (i % 8);
        assert!(verify(a.as_slice(), &keys).is_err(), "flip at byte {i} accepted");
    }
    // Every truncation, and one byte appended.
    for len in 0..archive.len() {
        assert!(verify(&archive[..len], &keys).is_err(), "truncation to {len} accepted");
    }
    let mut longer = archive.clone();
    longer.push(0);
    refused(&longer, &keys, "appended byte");

    let splice = |order: &[usize]| {
        let mut a = archive[..HEADER_BYTES].to_vec();
        for &i in order {
            let (at, len) = fr[i];
            a.extend_from_slice(&archive[at..at + len]);
        }
        a
    };
    let n = fr.len();
    let all: Vec<usize> = (0..n).collect();
    assert_eq!(splice(&all), archive);
    let mut swapped = all.clone();
    swapped.swap(1, 2);
    refused(&splice(&swapped), &keys, "two chunks swapped");
    let dropped: Vec<usize> = all.iter().copied().filter(|&i| i != 3).collect();
    refused(&splice(&dropped), &keys, "a chunk dropped");
    let no_manifest: Vec<usize> = all[..n - 1].to_vec();
    refused(&splice(&no_manifest), &keys, "the manifest dropped");
    let mut duplicated = all.clone();
    duplicated.insert(4, 4);
    refused(&splice(&duplicated), &keys, "a chunk duplicated");

    // A chunk from another backup (same key, same state) does not fit.
    let other = small_chunked(&db, &key);
    let ofr = frames(&other);
    let mut mixed = archive[..fr[2].0].to_vec();
    mixed.extend_from_slice(&other[ofr[2].0..ofr[2].0 + ofr[2].1]);
    mixed.extend_from_slice(&archive[fr[3].0..]);
    refused(&mixed, &keys, "a chunk from another backup");

    // The wrong key: named clearly, before any chunk is read.
    let e = verify(archive.as_slice(), &Keyring::single(MasterKey::generate())).unwrap_err();
    assert!(matches!(e, BackupError::WrongKey { .. }), "{e}");
    refused(&archive, &Keyring::single(MasterKey::generate()), "wrong key");
}

fn proptest_archive() -> &'static (Vec<u8>, Keyring) {
    static A: std::sync::OnceLock<(Vec<u8>, Keyring)> = std::sync::OnceLock::new();
    A.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let db = fixture(dir.path(), 20);
        let key = MasterKey::generate();
        (small_chunked(&db, &key), Keyring::single(key))
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Arbitrary edits (overwrite a run of bytes, cut, insert) never pass verification.
    #[test]
    fn the_decoder_refuses_any_edit(at in 0usize..100_000, edit in prop::collection::vec(any::<u8>(), 1..24), kind in 0u8..3) {
        let (archive, keys) = proptest_archive();
        let at = at % archive.len();
        let mut a = archive.clone();
        match kind {
            0 => {
                let end = (at + edit.len()).min(a.len());
                let before = a[at..end].to_vec();
                a[at..end].copy_from_slice(&edit[..end - at]);
                prop_assume!(a[at..end] != before[..]);
            }
            1 => a.truncate(at),
            _ => { a.splice(at..at, edit.iter().copied()); }
        }
        prop_assert!(verify(a.as_slice(), keys).is_err());
    }

    /// Random bytes, with or without a valid-looking header, are refused without a panic.
    #[test]
    fn garbage_is_refused_without_panicking(body in prop::collection::vec(any::<u8>(), 0..4096), keep_header in any::<bool>()) {
        let (archive, keys) = proptest_archive();
        let mut a = if keep_header { archive[..HEADER_BYTES].to_vec() } else { Vec::new() };
        a.extend_from_slice(&body);
        prop_assert!(verify(a.as_slice(), keys).is_err());
    }
}
