//! Encryption at rest and crypto-shredding, through real nodes: after a workload no file of a
//! node's data dir (log, state, snapshot, index files) holds a memory's text or tags; a wrong or
//! missing master key stops the node before it changes a byte; erasing a namespace destroys its
//! data key through the log, so a backup taken before restores everything else and reports the
//! namespace erased; a master-key rotation leaves stale wrapped keys undecryptable.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod common;

use common::TestCluster;
use engram::backup::Keyring;
use engram::client::NewMemory;
use engram::proto as pb;
use engram::proto::admin_service_client::AdminServiceClient;
use engram::storage::vault::{DataKeyRow, Erasure, Vault};
use tonic::Code;

const BACKUP_KEY: &str = "0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c";
const TEXT_MARK: &str = "quokka-secret";
const TAG_KEY: &str = "diagnosis-kq";
const TAG_VALUE: &str = "melancholy-vz";

fn vector(seed: u32) -> Vec<f32> {
    common::distinct_vector(seed, 8)
}

/// Index files often, HNSW shards from 64 memories: every kind of file a node writes.
fn tweak(c: &mut engram::config::Config) {
    c.vector_checkpoint_secs = 1;
    c.approx_min_vectors = 64;
}

fn new_key_file(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    engram::backup::keys::generate(&path).unwrap();
    path
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn all_files(cluster: &TestCluster) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for s in &cluster.slots {
        files_under(s.dir.path(), &mut files);
    }
    files
}

/// A file's bytes, and for a snapshot its dump too (zstd after the header): compression
/// alone must not pass for sealing.
fn contents(f: &Path) -> Vec<u8> {
    let mut bytes = std::fs::read(f).unwrap();
    if f.ends_with("snapshot.bin") {
        let magic = [0x28, 0xb5, 0x2f, 0xfd];
        let at = bytes.windows(4).position(|w| w == magic).expect("a zstd frame in the snapshot");
        let dump = zstd::stream::decode_all(&bytes[at..]).unwrap();
        assert!(dump.len() > 1000, "a snapshot of the workload");
        bytes.extend(dump);
    }
    bytes
}

/// Every file (and needle) where one of `needles` appears in the clear.
fn holding(files: &[PathBuf], needles: &[&str]) -> Vec<(PathBuf, String)> {
    let mut found = Vec::new();
    for f in files {
        let bytes = contents(f);
        for n in needles {
            if bytes.windows(n.len()).any(|w| w == n.as_bytes()) {
                found.push((f.clone(), n.to_string()));
            }
        }
    }
    found
}

fn hashes(files: &[PathBuf]) -> BTreeMap<PathBuf, [u8; 32]> {
    files.iter().map(|f| (f.clone(), *blake3::hash(&std::fs::read(f).unwrap()).as_bytes())).collect()
}

/// Puts (short texts, one long enough to be compressed), an update, a delete, tags.
async fn workload(c: &engram::client::Client) {
    for i in 0..80u32 {
        let text = format!("entry {i}: the {TEXT_MARK} of patient {i}");
        c.put("notes/a", NewMemory::new(text, vector(i)).with_id(format!("m{i}")).with_tag(TAG_KEY, TAG_VALUE))
            .await
            .unwrap();
    }
    let long = format!("{TEXT_MARK} and then some more words about it. ").repeat(40);
    c.put("notes/b", NewMemory::new(long, vector(500)).with_id("long").with_tag(TAG_KEY, TAG_VALUE)).await.unwrap();
    c.put("notes/a", NewMemory::new(format!("rewritten {TEXT_MARK}"), vector(3)).with_id("m3")).await.unwrap();
    c.delete("notes/a", "m5").await.unwrap();
}

/// Snapshots every node and lets a checkpoint write the index files, then stops them all.
async fn snapshot_and_stop(cluster: &mut TestCluster) {
    cluster.settle().await;
    for id in cluster.running() {
        cluster.pinned(id).admin().trigger_snapshot().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for id in cluster.running() {
        cluster.stop(id).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_file_holds_memory_text_or_tags_and_a_wrong_or_missing_key_refuses_start() {
    let keys = tempfile::tempdir().unwrap();
    let key = new_key_file(keys.path(), "at-rest.toml");
    let mut cluster = TestCluster::start_secure_at_rest(3, key.clone(), tweak).await;
    let client = cluster.client();
    workload(&client).await;
    // Sealed on disk, plain to a reader with a key.
    assert_eq!(client.get("notes/a", "m3").await.unwrap().text, format!("rewritten {TEXT_MARK}"));
    let hit = client.search("notes/a", vector(7), 1).await.unwrap();
    assert_eq!(hit.hits[0].id, "m7");
    snapshot_and_stop(&mut cluster).await;

    let files = all_files(&cluster);
    let names: Vec<String> = files.iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect();
    for want in ["raft-log.redb", "state.redb", "snapshot.bin", "MANIFEST"] {
        assert_eq!(names.iter().filter(|n| *n == want).count(), 3, "every node has its {want}: {names:?}");
    }
    assert!(names.iter().filter(|n| n.ends_with(".faiss")).count() >= 6, "index files: {names:?}");
    assert!(names.iter().filter(|n| n.ends_with(".meta")).count() >= 6, "index files: {names:?}");
    let found = holding(&files, &[TEXT_MARK, TAG_KEY, TAG_VALUE]);
    assert!(found.is_empty(), "memory content in the clear: {found:?}");

    // A wrong master key, then none: refused with a clear error, every byte as it was.
    let before = hashes(&files);
    let good = cluster.at_rest_key_file.take();
    cluster.at_rest_key_file = Some(new_key_file(keys.path(), "wrong.toml"));
    let e = engram::server::start(cluster.restart_config(1)).await.err().expect("a wrong key must not start");
    assert!(e.to_string().contains("does not hold"), "{e}");
    cluster.at_rest_key_file = None;
    let e = engram::server::start(cluster.restart_config(2)).await.err().expect("no key must not start");
    assert!(e.to_string().contains("encrypted at rest"), "{e}");
    assert_eq!(hashes(&files), before, "a refused start changed a file");

    // The right key: everything is there.
    cluster.at_rest_key_file = good;
    for id in 1..=3 {
        cluster.restart(id).await;
    }
    cluster.wait_for_leader().await;
    let client = cluster.client();
    assert_eq!(client.get("notes/a", "m9").await.unwrap().text, format!("entry 9: the {TEXT_MARK} of patient 9"));
    assert_eq!(client.list_all("notes/a").await.unwrap().len(), 79);
    assert_eq!(client.get("notes/b", "long").await.unwrap().tags.get(TAG_KEY).map(String::as_str), Some(TAG_VALUE));
    let digests = cluster.digests().await;
    assert!(digests.windows(2).all(|w| w[0].1 == w[1].1), "replicas seal alike: {digests:?}");
    cluster.shutdown().await;
}

/// The control: without a master key the same workload is on disk in the clear, so the check
/// above would see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_master_key_the_same_workload_is_on_disk_in_the_clear() {
    let mut cluster = TestCluster::start_secure_with(1, tweak).await;
    workload(&cluster.client()).await;
    snapshot_and_stop(&mut cluster).await;
    let found = holding(&all_files(&cluster), &[TEXT_MARK, TAG_VALUE]);
    for file in ["raft-log.redb", "state.redb", "snapshot.bin"] {
        assert!(found.iter().any(|(f, _)| f.ends_with(file)), "{file} holds plain text: {found:?}");
    }
}

fn export(r: &pb::ExportDataKeysResponse) -> (Vec<DataKeyRow>, Vec<Erasure>) {
    engram::storage::codec::decode_exact(&r.keys).unwrap()
}

async fn data_digests(cluster: &TestCluster) -> Vec<[u8; 32]> {
    cluster.settle().await;
    cluster.running().into_iter().map(|id| cluster.handle(id).reader.data_digest().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_erased_namespace_is_gone_from_older_backups_and_stale_keys_die_with_their_master_key() {
    // SAFETY: set before any node starts; the in-process nodes read it as their backup key.
    unsafe { std::env::set_var(engram::backup::keys::KEY_ENV, BACKUP_KEY) };
    let backup_keys = Keyring::from_env_value(BACKUP_KEY).unwrap();
    let keys = tempfile::tempdir().unwrap();
    let key = new_key_file(keys.path(), "at-rest.toml");
    let cluster = TestCluster::start_secure_at_rest(3, key.clone(), tweak).await;
    let root = cluster.client();
    root.auth().create_role("rw").await.unwrap();
    root.auth().grant("rw", "*", &["read", "write", "delete"], None).await.unwrap();
    let tenant = cluster.client_as(Some(root.auth().create_key("acme", &["rw"], 0).await.unwrap().key));
    for i in 0..6u32 {
        root.put("keep/a", NewMemory::new(format!("kept {i}"), vector(i)).with_id(format!("k{i}"))).await.unwrap();
        root.put("gone/b", NewMemory::new(format!("forget-me {i}"), vector(50 + i)).with_id(format!("g{i}")))
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let (archive, _) = root.admin().create_backup(dir.path()).await.unwrap();
    let (before_keys, _) = export(&root.admin().export_data_keys().await.unwrap());
    let gone_key = before_keys.iter().find(|k| k.namespace == "gone/b").unwrap().clone();
    assert_eq!(before_keys.len(), 2);

    // The erasure RPCs refuse callers without a cluster admin key, and garbage; nothing moves.
    let digests = data_digests(&cluster).await;
    let addr = cluster.slot(1).api.to_string();
    let raw = |c: &engram::client::Client| AdminServiceClient::new(c.raw_channel(&addr).unwrap());
    let erase = pb::EraseNamespaceRequest { namespace: "gone/b".into(), options: None };
    for (who, code) in [(cluster.client_as(None), Code::Unauthenticated), (tenant.clone(), Code::PermissionDenied)] {
        assert_eq!(raw(&who).erase_namespace(erase.clone()).await.unwrap_err().code(), code);
        assert_eq!(raw(&who).export_data_keys(pb::ExportDataKeysRequest {}).await.unwrap_err().code(), code);
        assert_eq!(raw(&who).rotate_at_rest_key(pb::RotateAtRestKeyRequest {}).await.unwrap_err().code(), code);
    }
    let bad = pb::EraseNamespaceRequest { namespace: "no\0pe".into(), options: None };
    assert_eq!(raw(&root).erase_namespace(bad).await.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(data_digests(&cluster).await, digests, "a refusal changed state");

    // Erase: the receipt names the destroyed key; no node holds it any more.
    let receipt = root.admin().erase_namespace("gone/b").await.unwrap();
    assert_eq!(receipt.memories, 6);
    assert_eq!(receipt.data_key_id, gone_key.id.to_vec());
    assert_eq!(receipt.ledger_head.len(), 32);
    assert!(receipt.erased_at_ms > 0 && receipt.applied_index > 0);
    cluster.settle().await;
    for id in cluster.running() {
        let reader = &cluster.handle(id).reader;
        assert!(reader.vault().by_id(&gone_key.id).is_none(), "node {id} still holds the key");
        assert_eq!(reader.erasure(&gone_key.id).unwrap().unwrap().index, receipt.applied_index);
    }
    let (now_keys, erasures) = export(&root.admin().export_data_keys().await.unwrap());
    assert_eq!(now_keys.iter().map(|k| k.namespace.as_str()).collect::<Vec<_>>(), ["keep/a"]);
    assert_eq!(erasures.iter().map(|e| (e.namespace.as_str(), e.memories)).collect::<Vec<_>>(), [("gone/b", 6)]);

    // The old backup, partially: the erased namespace is refused as erased, nothing changes;
    // the other one comes back (its sealed rows opened by the cluster).
    let (_, rows) =
        engram::backup::namespace_of(std::fs::File::open(&archive).unwrap(), &backup_keys, "gone/b").unwrap();
    let rows = rows.unwrap();
    assert_eq!((rows.memories.len(), rows.sealed.len()), (0, 6), "the backup holds sealed rows only");
    let digests = data_digests(&cluster).await;
    let e = root.admin().restore_namespace(&rows).await.unwrap_err();
    assert!(e.to_string().contains("erased"), "{e}");
    assert_eq!(data_digests(&cluster).await, digests);
    assert!(root.list_all("gone/b").await.is_err());
    // Rows filed under another namespace, and garbage, are refused too.
    let mut moved = rows.clone();
    moved.info.name = "keep/a".into();
    assert!(root.admin().restore_namespace(&moved).await.is_err());
    let (_, keep) =
        engram::backup::namespace_of(std::fs::File::open(&archive).unwrap(), &backup_keys, "keep/a").unwrap();
    let keep = keep.unwrap();
    let mut garbage = pb::RestoreNamespaceRequest {
        namespace: "keep/a".into(),
        dimension: 8,
        metric: pb::Metric::Cosine as i32,
        policy_json: String::new(),
        memories: engram::storage::codec::encode(&Vec::<engram::memory::Memory>::new()),
        options: None,
        only_these: false,
        sealed_rows: vec![7; 40],
    };
    assert_eq!(raw(&root).restore_namespace(garbage.clone()).await.unwrap_err().code(), Code::InvalidArgument);
    let mut flipped = keep.sealed.clone();
    let last = flipped[0].1.len() - 1;
    flipped[0].1[last] ^= 1;
    garbage.sealed_rows = engram::storage::codec::encode(&flipped);
    assert_eq!(raw(&root).restore_namespace(garbage).await.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(data_digests(&cluster).await, digests);
    root.delete("keep/a", "k0").await.unwrap();
    let r = root.admin().restore_namespace(&keep).await.unwrap();
    assert_eq!((r.restored, r.replaced), (6, 5));
    assert_eq!(root.get("keep/a", "k0").await.unwrap().text, "kept 0");

    // The old backup, whole, into a new cluster with the data keys of today: all but the
    // erased namespace, which is reported. Without data keys it is refused.
    let no_keys = engram::backup::restore::RestoreTarget {
        data_dir: dir.path().join("plain"),
        node_id: 1,
        members: [(1, engram::raft::EngramNode { raft_addr: "127.0.0.1:1".into(), api_addr: "127.0.0.1:2".into() })]
            .into(),
        force: false,
        at_rest: None,
    };
    let e =
        engram::backup::restore::restore(std::fs::File::open(&archive).unwrap(), &backup_keys, &no_keys).unwrap_err();
    assert!(e.to_string().contains("sealed at rest"), "{e}");
    let master = engram::storage::vault::master_keys(Some(&key)).unwrap().unwrap();
    // An export that knows neither key (older than the data): refused, not read as erasures.
    let stale = engram::backup::restore::RestoreTarget {
        data_dir: dir.path().join("stale"),
        at_rest: Some(engram::backup::restore::AtRest { master: master.clone(), keys: vec![], erasures: vec![] }),
        ..no_keys.clone()
    };
    let e = engram::backup::restore::restore(std::fs::File::open(&archive).unwrap(), &backup_keys, &stale).unwrap_err();
    assert!(e.to_string().contains("take a newer export"), "{e}");
    assert!(!dir.path().join("stale").exists(), "a refused restore left a data dir");
    let at_rest = engram::backup::restore::AtRest { master, keys: now_keys.clone(), erasures: erasures.clone() };
    let (restored, erased) = TestCluster::restored_sealed(
        &archive,
        1,
        &backup_keys,
        tweak,
        cluster.secure.clone(),
        Some((key.clone(), at_rest)),
    )
    .await;
    assert_eq!(erased.iter().map(|e| (e.namespace.as_str(), e.memories)).collect::<Vec<_>>(), [("gone/b", 6)]);
    let rc = restored.client();
    assert_eq!(rc.list_all("keep/a").await.unwrap().len(), 6);
    assert_eq!(rc.get("keep/a", "k4").await.unwrap().text, "kept 4");
    assert!(rc.list_all("gone/b").await.is_err(), "an erased namespace came back");
    restored.shutdown().await;

    // Rotation: a new active master key, every data key wrapped again under it, the old key
    // retired. A stale copy of a wrapped key (the one the old snapshots and log held for the
    // erased namespace) no longer opens with anything the nodes hold.
    engram::backup::keys::rotate(&key).unwrap();
    let r = root.admin().rotate_at_rest_key().await.unwrap();
    assert_eq!(r.rewrapped, 1);
    let ring = Keyring::load(&key).unwrap();
    assert_eq!(r.master_key_id, ring.active().id().to_vec());
    cluster.settle().await;
    let (rewrapped, _) = export(&root.admin().export_data_keys().await.unwrap());
    assert_eq!(rewrapped[0].kek, ring.active().id());
    let new_only = Keyring::single(ring.active().clone());
    assert!(Vault::new(Some(new_only.clone())).load(&rewrapped).is_ok());
    let stale = Vault::new(Some(new_only)).load(std::slice::from_ref(&gone_key)).unwrap_err();
    assert!(stale.to_string().contains("does not hold"), "{stale}");
    // Every node read its key file again: a namespace made after the rotation gets a key under
    // the new master key, and the followers apply it.
    root.put("after/rotation", NewMemory::new("new", vector(77)).with_id("n")).await.unwrap();
    cluster.settle().await;
    let (keys_now, _) = export(&root.admin().export_data_keys().await.unwrap());
    assert!(keys_now.iter().all(|k| k.kek == ring.active().id()), "{keys_now:?}");
    let digests = cluster.digests().await;
    assert!(digests.windows(2).all(|w| w[0].1 == w[1].1), "{digests:?}");
    cluster.shutdown().await;
}

/// The namespaces that have a data key on node `id`.
fn keyed(cluster: &TestCluster, id: u64) -> Vec<String> {
    cluster.handle(id).reader.data_keys().unwrap().1.into_iter().map(|k| k.namespace).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_first_write_leaves_no_data_key_and_old_plain_rows_are_sealed_on_the_next_write() {
    // SAFETY: set before any node starts; the in-process nodes read it as their backup key.
    unsafe { std::env::set_var(engram::backup::keys::KEY_ENV, BACKUP_KEY) };
    let backup_keys = Keyring::from_env_value(BACKUP_KEY).unwrap();
    let keys = tempfile::tempdir().unwrap();
    let key = new_key_file(keys.path(), "at-rest.toml");
    // A plain cluster first: a namespace written before encryption at rest was on.
    let mut cluster = TestCluster::start_secure_with(3, tweak).await;
    let root = cluster.client();
    for i in 0..5u32 {
        root.put("old/a", NewMemory::new(format!("plain {i}"), vector(i)).with_id(format!("p{i}"))).await.unwrap();
        root.put("old/b", NewMemory::new(format!("plain b {i}"), vector(20 + i)).with_id(format!("b{i}")))
            .await
            .unwrap();
    }
    let backups = tempfile::tempdir().unwrap();
    let (plain_backup, _) = root.admin().create_backup(backups.path()).await.unwrap();
    cluster.settle().await;
    for id in 1..=3 {
        cluster.stop(id).await;
    }
    cluster.at_rest_key_file = Some(key);
    for id in 1..=3 {
        cluster.restart(id).await;
    }
    cluster.wait_for_leader().await;
    let root = cluster.client();
    root.auth().create_role("rw").await.unwrap();
    root.auth().grant("rw", "acme/*", &["read", "write"], None).await.unwrap();
    let tenant_key = root.auth().create_key("acme", &["rw"], 0).await.unwrap().key;
    let mut strict = cluster.options(Some(tenant_key.clone()));
    strict.create_namespaces = false;
    let endpoints: Vec<String> = cluster.running().iter().map(|id| cluster.slot(*id).api.to_string()).collect();
    let strict = engram::client::Client::with_options(endpoints, strict).unwrap();
    let tenant = cluster.client_as(Some(tenant_key));

    // Refused first writes: another tenant's namespace, a namespace that does not exist. (The
    // refusal itself is remembered under the put's idempotency key, as any refusal is.)
    let old = cluster.handle(1).reader.namespace_digest("old/a").unwrap();
    assert!(tenant.put("other/x", NewMemory::new("no", vector(1))).await.is_err());
    let e = strict.put("acme/new", NewMemory::new("no", vector(2))).await.unwrap_err();
    assert_eq!(e.code, Code::NotFound, "{e}");
    cluster.settle().await;
    for id in 1..=3 {
        let reader = &cluster.handle(id).reader;
        assert!(reader.namespace("acme/new").unwrap().is_none() && reader.namespace("other/x").unwrap().is_none());
        assert_eq!(reader.namespace_digest("old/a").unwrap(), old, "node {id}: the plain namespace moved");
        assert_eq!(keyed(&cluster, id), Vec::<String>::new(), "node {id}");
        assert!(cluster.handle(id).reader.vault().is_empty(), "node {id} holds a key it should have dropped");
    }
    // Accepted: the namespace and its key, the same on every node.
    tenant.put("acme/new", NewMemory::new("yes", vector(3)).with_id("y")).await.unwrap();
    tenant.put("acme/new", NewMemory::new("again", vector(4)).with_id("z")).await.unwrap();
    assert_eq!(strict.get("acme/new", "y").await.unwrap().text, "yes");

    // The old namespace's plain rows are sealed by its next write, in that entry.
    root.put("old/a", NewMemory::new("sealed now", vector(9)).with_id("s")).await.unwrap();
    cluster.settle().await;
    for id in 1..=3 {
        assert_eq!(keyed(&cluster, id), ["acme/new", "old/a"], "node {id}");
    }
    let digests = cluster.digests().await;
    assert!(digests.windows(2).all(|w| w[0].1 == w[1].1), "{digests:?}");
    assert_eq!(root.get("old/a", "p3").await.unwrap().text, "plain 3");
    assert_eq!(root.list_all("old/a").await.unwrap().len(), 6);

    // Erased after a backup that holds it in the clear: a partial restore from that backup is
    // refused in `apply`, by the rows' revisions, on every node alike.
    root.put("old/b", NewMemory::new("sealed b", vector(40)).with_id("s")).await.unwrap();
    let receipt = root.admin().erase_namespace("old/b").await.unwrap();
    assert_eq!(receipt.memories, 6);
    let (_, rows) =
        engram::backup::namespace_of(std::fs::File::open(&plain_backup).unwrap(), &backup_keys, "old/b").unwrap();
    let rows = rows.unwrap();
    assert_eq!((rows.memories.len(), rows.sealed.len()), (5, 0), "plain rows in the old backup");
    let e = root.admin().restore_namespace(&rows).await.unwrap_err();
    assert!(e.to_string().contains("erased"), "{e}");
    assert!(root.list_all("old/b").await.is_err(), "an erased namespace came back");
    let state = cluster.slot(1).dir.path().join("state.redb");
    for id in 1..=3 {
        cluster.stop(id).await;
    }
    let db = redb::ReadOnlyDatabase::open(&state).unwrap();
    use redb::{ReadableDatabase, ReadableTable};
    let txn = db.begin_read().unwrap();
    let rows = txn.open_table(engram::storage::MEMORIES).unwrap();
    let mut n = 0;
    for item in rows.iter().unwrap() {
        let (k, v) = item.unwrap();
        assert!(
            engram::storage::vault::sealed_by(v.value()).is_some(),
            "a plain row: {:?}",
            String::from_utf8_lossy(k.value())
        );
        n += 1;
    }
    assert_eq!(n, 8, "acme/new 2, old/a 6; old/b erased");
}
