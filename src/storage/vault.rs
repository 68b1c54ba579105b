//! Encryption at rest: per-namespace data keys, wrapped by the cluster's master key.
//!
//! * A **master key** (key-encryption key) is 32 bytes from a 0600 keyring file or
//!   `ENGRAM_AT_REST_KEY`, the same on every node (the keyring format of backup keys; several
//!   keys, one active). It never leaves the node and is never in the config, the log or a dump.
//! * A **data key** is 32 random bytes the leader makes for a namespace the first time the
//!   namespace's memories are written, wraps under the cluster's master key of record and sends
//!   through the log with that write (`Op::Sealed`'s `new_key`, kept only if the write applies).
//!   Every node stores the wrapped row in
//!   `data_keys` and holds the unwrapped key in memory. Its id is the first 8 bytes of
//!   `BLAKE3-derive-key("engram data key id v1", key)`.
//! * What the data key seals: the leader seals every command carrying memory content (put,
//!   restore) before it enters the log ([`Op::Sealed`](crate::raft::Op)); `apply` seals every
//!   `memories` row ([`seal_row`]); checkpoints seal the index files. A snapshot copies sealed rows
//!   and the wrapped keys; a backup copies sealed rows and no keys at all.
//! * Seals are AES-256-GCM with a synthetic nonce: the first 12 bytes of a BLAKE3 keyed hash
//!   (key derived from the data key) of the associated data and the plaintext. The same row
//!   seals to the same bytes on every node, so state digests still compare replicas; two
//!   different plaintexts share a nonce only if the hash collides (2^-48 after 2^24 rows).
//!   The associated data binds a row to its key (namespace and id): a row moved elsewhere
//!   fails its tag.
//! * **Erasure** destroys the data key through the log (`DeleteNamespace`): after it applies,
//!   no node holds the key, and every sealed copy of the namespace's content — older snapshots,
//!   backups, log segments — is undecryptable, except to someone who copied both a file holding
//!   the *wrapped* key (a snapshot or log segment from before the erase) and the master key.
//!   Rotating the master key and retiring the old one closes that (`docs/encryption.md`).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::backup::{Keyring, MasterKey};
use crate::error::StorageError;

/// namespace -> ROW_V1 | bincode([`DataKeyRow`]): the wrapped data key of each namespace.
pub const DATA_KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("data_keys");
/// data key id (16 hex) -> ROW_V1 | bincode([`Erasure`]): what erasures destroyed (no key
/// material), so a restore can say a row is erased rather than corrupt.
pub const ERASED: TableDefinition<&str, &[u8]> = TableDefinition::new("erased_keys");

pub const KEY_ENV: &str = "ENGRAM_AT_REST_KEY";
const NONCE_BYTES: usize = 12;
const WRAP_CONTEXT: &[u8] = b"engram data key wrap v1";

/// A data key as every node stores it: wrapped under a master key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataKeyRow {
    pub namespace: String,
    pub id: [u8; 8],
    /// The id of the master key that wraps it.
    pub kek: [u8; 8],
    /// nonce || AES-256-GCM(master, data key), associated data: context, namespace, id.
    pub wrapped: Vec<u8>,
}

/// A destroyed data key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Erasure {
    pub namespace: String,
    pub id: [u8; 8],
    /// The log index of the entry that destroyed it, and that entry's time.
    pub index: u64,
    pub at_ms: u64,
    /// Memories the namespace held when it was erased.
    pub memories: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("{0}")]
    Key(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// A seal that did not open: a wrong key, or bytes changed.
#[derive(Debug)]
pub struct SealBroken;

/// One namespace's data key, unwrapped.
pub struct DataKey {
    pub id: [u8; 8],
    aead: Aes256Gcm,
    nonce_key: Zeroizing<[u8; 32]>,
    index_key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataKey({})", hex::encode(self.id))
    }
}

fn key_id(secret: &[u8; 32]) -> [u8; 8] {
    blake3::derive_key("engram data key id v1", secret)[..8].try_into().expect("8 of 32 bytes")
}

impl DataKey {
    fn from_secret(secret: &[u8; 32]) -> DataKey {
        let enc = Zeroizing::new(blake3::derive_key("engram data key seal v1", secret));
        DataKey {
            id: key_id(secret),
            aead: Aes256Gcm::new_from_slice(enc.as_ref()).expect("32-byte key"),
            nonce_key: Zeroizing::new(blake3::derive_key("engram data key nonce v1", secret)),
            index_key: Zeroizing::new(blake3::derive_key("engram data key index v1", secret)),
        }
    }

    /// nonce || ciphertext || tag; the nonce is synthetic (see the module docs).
    pub fn seal(&self, aad: &[u8], plain: &[u8]) -> Vec<u8> {
        let mut h = blake3::Hasher::new_keyed(&self.nonce_key);
        h.update(&(aad.len() as u64).to_le_bytes());
        h.update(aad);
        h.update(plain);
        let nonce: [u8; NONCE_BYTES] = h.finalize().as_bytes()[..NONCE_BYTES].try_into().expect("12 of 32 bytes");
        let mut out = Vec::with_capacity(NONCE_BYTES + plain.len() + 16);
        out.extend_from_slice(&nonce);
        out.extend(
            self.aead
                .encrypt(Nonce::from_slice(&nonce), Payload { msg: plain, aad })
                .expect("AES-GCM of a bounded message cannot fail"),
        );
        out
    }

    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealBroken> {
        if sealed.len() < NONCE_BYTES + 16 {
            return Err(SealBroken);
        }
        let (nonce, ct) = sealed.split_at(NONCE_BYTES);
        self.aead.decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad }).map_err(|_| SealBroken)
    }

    /// The content-index form of a text hash: keyed, so the index cannot confirm a guessed text.
    pub fn index_hash(&self, hash: &[u8; 32]) -> [u8; 32] {
        *blake3::keyed_hash(&self.index_key, hash).as_bytes()
    }
}

fn wrap_aad(namespace: &str, id: &[u8; 8]) -> Vec<u8> {
    let mut aad = WRAP_CONTEXT.to_vec();
    aad.extend_from_slice(&(namespace.len() as u64).to_le_bytes());
    aad.extend_from_slice(namespace.as_bytes());
    aad.extend_from_slice(id);
    aad
}

/// Wraps `secret` for `namespace` under `kek`.
fn wrap(kek: &MasterKey, namespace: &str, secret: &[u8; 32]) -> DataKeyRow {
    let id = key_id(secret);
    let aead = Aes256Gcm::new_from_slice(kek.expose()).expect("32-byte key");
    let mut nonce = [0u8; NONCE_BYTES];
    rand::rng().fill_bytes(&mut nonce);
    let mut wrapped = nonce.to_vec();
    wrapped.extend(
        aead.encrypt(Nonce::from_slice(&nonce), Payload { msg: secret, aad: &wrap_aad(namespace, &id) })
            .expect("AES-GCM of 32 bytes cannot fail"),
    );
    DataKeyRow { namespace: namespace.into(), id, kek: kek.id(), wrapped }
}

/// The secret of `row`, if `keks` holds the master key that wrapped it and the row is intact.
fn unwrap_secret(keks: &Keyring, row: &DataKeyRow) -> Result<Zeroizing<[u8; 32]>, VaultError> {
    let what = || format!("data key {} of namespace {:?}", hex::encode(row.id), row.namespace);
    let kek = keks.get(&row.kek).ok_or_else(|| {
        VaultError::Key(format!(
            "{} is wrapped by master key {}, which the at-rest keyring does not hold (a wrong or missing key?)",
            what(),
            hex::encode(row.kek)
        ))
    })?;
    let aead = Aes256Gcm::new_from_slice(kek.expose()).expect("32-byte key");
    let broken = || VaultError::Key(format!("{} does not open under master key {}", what(), hex::encode(row.kek)));
    if row.wrapped.len() < NONCE_BYTES {
        return Err(broken());
    }
    let (nonce, ct) = row.wrapped.split_at(NONCE_BYTES);
    let plain = Zeroizing::new(
        aead.decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad: &wrap_aad(&row.namespace, &row.id) })
            .map_err(|_| broken())?,
    );
    let secret: [u8; 32] = plain.as_slice().try_into().map_err(|_| broken())?;
    let secret = Zeroizing::new(secret);
    if key_id(&secret) != row.id {
        return Err(broken());
    }
    Ok(secret)
}

#[derive(Default)]
struct Keys {
    by_namespace: HashMap<String, Arc<DataKey>>,
    by_id: HashMap<[u8; 8], Arc<DataKey>>,
    /// Keys an erasure removed in a transaction not committed yet: readers of the state before
    /// it still open their rows until [`Vault::forget_removed`].
    removed: HashMap<[u8; 8], Arc<DataKey>>,
}

/// A node's master keyring and the data keys of its state, unwrapped. One per state machine;
/// `apply` keeps it in step with the `data_keys` table.
pub struct Vault {
    keks: RwLock<Option<Keyring>>,
    keys: RwLock<Keys>,
    /// Where the keyring came from (a rotation reads it again); `None`: the environment.
    source: Option<std::path::PathBuf>,
    /// The master key new data keys are wrapped under: the cluster's of record (see
    /// [`cluster_kek`]), once the state has one.
    cluster_kek: RwLock<Option<[u8; 8]>>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Vault(enabled: {}, keys: {})", self.enabled(), self.read().by_id.len())
    }
}

impl Vault {
    /// Encryption at rest off: nothing is sealed (sealed rows still open if their keys load).
    pub fn off() -> Arc<Vault> {
        Vault::new(None)
    }

    pub fn new(keks: Option<Keyring>) -> Arc<Vault> {
        Arc::new(Vault {
            keks: RwLock::new(keks),
            keys: RwLock::default(),
            source: None,
            cluster_kek: RwLock::new(None),
        })
    }

    /// A node's vault: its key file if one is named, else `ENGRAM_AT_REST_KEY`, else off.
    pub fn from_config(key_file: Option<&std::path::Path>) -> Result<Arc<Vault>, VaultError> {
        let keks = master_keys(key_file)?;
        Ok(Arc::new(Vault {
            keks: RwLock::new(keks),
            keys: RwLock::default(),
            source: key_file.map(|p| p.to_path_buf()),
            cluster_kek: RwLock::new(None),
        }))
    }

    /// Reads the key file again (a rotation applied). A file that does not load leaves the ring
    /// as it was, and says so.
    pub fn reload(&self) {
        let Some(path) = &self.source else { return };
        match Keyring::load(path) {
            Ok(ring) => self.set_keks(ring),
            Err(e) => tracing::error!(file = %path.display(), error = %e, "cannot read the at-rest key file again"),
        }
    }

    /// The master key of record, as the state says (kept in step by `set_cluster_kek`).
    pub fn note_cluster_kek(&self, kek: Option<[u8; 8]>) {
        *self.cluster_kek.write().unwrap_or_else(|p| p.into_inner()) = kek;
    }

    fn wrapping_key(&self, keks: &Keyring) -> Result<MasterKey, VaultError> {
        match *self.cluster_kek.read().unwrap_or_else(|p| p.into_inner()) {
            None => Ok(keks.active().clone()),
            Some(id) => keks.get(&id).cloned().ok_or_else(|| {
                VaultError::Key(format!(
                    "the cluster's master key {} is not in this node's at-rest keyring (a key file behind a rotation?)",
                    hex::encode(id)
                ))
            }),
        }
    }

    /// A vault with this one's master keyring and no data keys (a load's scratch vault).
    pub fn fresh(&self) -> Arc<Vault> {
        Vault::new(self.keks())
    }

    /// Takes `other`'s data keys (and master key of record) in place of this vault's (a load
    /// committed).
    pub fn adopt(&self, other: &Vault) {
        self.note_cluster_kek(*other.cluster_kek.read().unwrap_or_else(|p| p.into_inner()));
        let keys = other.read();
        let copy = Keys { by_namespace: keys.by_namespace.clone(), by_id: keys.by_id.clone(), removed: HashMap::new() };
        drop(keys);
        *self.write() = copy;
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Keys> {
        self.keys.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Keys> {
        self.keys.write().unwrap_or_else(|p| p.into_inner())
    }

    fn keks(&self) -> Option<Keyring> {
        self.keks.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether this node seals new content (it holds a master key).
    pub fn enabled(&self) -> bool {
        self.keks.read().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// The master keyring, if this node has one.
    pub fn master(&self) -> Option<Keyring> {
        self.keks()
    }

    /// The id of the active master key, if any.
    pub fn active_kek(&self) -> Option<[u8; 8]> {
        self.keks().map(|k| k.active().id())
    }

    /// Replaces the master keyring (a rotation read the key file again). Keys already
    /// unwrapped stay as they are.
    pub fn set_keks(&self, keks: Keyring) {
        *self.keks.write().unwrap_or_else(|p| p.into_inner()) = Some(keks);
    }

    pub fn for_namespace(&self, namespace: &str) -> Option<Arc<DataKey>> {
        self.read().by_namespace.get(namespace).cloned()
    }

    pub fn by_id(&self, id: &[u8; 8]) -> Option<Arc<DataKey>> {
        let keys = self.read();
        keys.by_id.get(id).or_else(|| keys.removed.get(id)).cloned()
    }

    /// Drops the keys removed since the last call (their removal committed).
    pub fn forget_removed(&self) {
        self.write().removed.clear();
    }

    /// Data keys held (not counting removed ones awaiting their commit).
    pub fn len(&self) -> usize {
        self.read().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A new data key for `namespace` (the leader), wrapped under the cluster's master key of
    /// record, or the active one before the state has one.
    pub fn new_key(&self, namespace: &str) -> Result<DataKeyRow, VaultError> {
        let keks = self.keks().ok_or_else(|| VaultError::Key("encryption at rest is off on this node".into()))?;
        let kek = self.wrapping_key(&keks)?;
        let mut secret = Zeroizing::new([0u8; 32]);
        rand::rng().fill_bytes(secret.as_mut());
        Ok(wrap(&kek, namespace, &secret))
    }

    /// A sealed command's idempotency fingerprint: the client's (a hash of the plain request)
    /// keyed under the master key of record and the namespace, so the log and the idempotency
    /// rows cannot confirm a guessed memory. Stable across data keys, so a retry around a
    /// namespace's first write still matches.
    pub fn keyed_fingerprint(&self, namespace: &str, fingerprint: &[u8; 32]) -> Result<[u8; 32], VaultError> {
        let keks = self.keks().ok_or_else(|| VaultError::Key(no_master_key()))?;
        let kek = self.wrapping_key(&keks)?;
        let mut material = Zeroizing::new(kek.expose().to_vec());
        material.extend_from_slice(namespace.as_bytes());
        let key = Zeroizing::new(blake3::derive_key("engram idempotency fingerprint v1", &material));
        Ok(*blake3::keyed_hash(&key, fingerprint).as_bytes())
    }

    /// `row` wrapped again under the active master key (rotation); the data key is unchanged.
    pub fn rewrap(&self, row: &DataKeyRow) -> Result<DataKeyRow, VaultError> {
        let keks = self.keks().ok_or_else(|| VaultError::Key("encryption at rest is off on this node".into()))?;
        let secret = unwrap_secret(&keks, row)?;
        Ok(wrap(keks.active(), &row.namespace, &secret))
    }

    /// Whether this node's keyring opens `row` (a rotated row wrapped under a key it lacks).
    pub fn opens(&self, row: &DataKeyRow) -> Result<(), VaultError> {
        let keks = self.keks().ok_or_else(|| VaultError::Key(no_master_key()))?;
        unwrap_secret(&keks, row).map(drop)
    }

    /// Unwraps `row` without holding it (a sealed op carrying a new key).
    pub fn open_key(&self, row: &DataKeyRow) -> Result<Arc<DataKey>, VaultError> {
        let keks = self.keks().ok_or_else(|| VaultError::Key(no_master_key()))?;
        Ok(Arc::new(DataKey::from_secret(&*unwrap_secret(&keks, row)?)))
    }

    /// Unwraps `row` and holds its key (a sealed op's new key applied, a load).
    pub fn insert(&self, row: &DataKeyRow) -> Result<(), VaultError> {
        let keks = self.keks().ok_or_else(|| VaultError::Key(no_master_key()))?;
        let key = Arc::new(DataKey::from_secret(&*unwrap_secret(&keks, row)?));
        let mut keys = self.write();
        if let Some(old) = keys.by_namespace.insert(row.namespace.clone(), key.clone()) {
            keys.by_id.remove(&old.id);
        }
        keys.by_id.insert(key.id, key);
        Ok(())
    }

    /// Forgets `namespace`'s key (an erasure applied): no new row is sealed under it, and once
    /// the erasure commits ([`forget_removed`](Self::forget_removed)) none opens with it.
    pub fn remove(&self, namespace: &str) {
        let mut keys = self.write();
        if let Some(old) = keys.by_namespace.remove(namespace) {
            keys.by_id.remove(&old.id);
            keys.removed.insert(old.id, old);
        }
    }

    /// Replaces every key held with `rows`, all or nothing: a row this node's master keyring
    /// cannot open is an error (a wrong or missing master key), and the keys stay as they were.
    pub fn load(&self, rows: &[DataKeyRow]) -> Result<(), VaultError> {
        let mut fresh = Keys::default();
        if !rows.is_empty() {
            let keks = self.keks().ok_or_else(|| {
                VaultError::Key(format!(
                    "this node's state is encrypted at rest ({} data keys); set at_rest_key_file or {KEY_ENV}",
                    rows.len()
                ))
            })?;
            for row in rows {
                let key = Arc::new(DataKey::from_secret(&*unwrap_secret(&keks, row)?));
                fresh.by_namespace.insert(row.namespace.clone(), key.clone());
                fresh.by_id.insert(key.id, key);
            }
        }
        *self.write() = fresh;
        Ok(())
    }

    /// The content-index form of `hash` for a memory of `namespace`.
    pub fn index_hash(&self, namespace: &str, hash: &[u8; 32]) -> [u8; 32] {
        match self.read().by_namespace.get(namespace) {
            Some(k) => k.index_hash(hash),
            None => *hash,
        }
    }
}

/// Refuses to start on a state file whose data keys this vault's master keyring cannot all
/// open (a wrong or missing key), reading the file only: a refused node keeps every byte.
pub fn check_state(path: &std::path::Path, vault: &Vault) -> Result<(), StorageError> {
    if std::fs::metadata(path).map(|m| m.len() == 0).unwrap_or(true) {
        return Ok(());
    }
    let rows = match redb::ReadOnlyDatabase::open(path) {
        Ok(db) => stored_rows(&db.begin_read()?)?,
        // A file a crash left open needs the writable open's repair; `open_with` checks then.
        Err(redb::DatabaseError::RepairAborted) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    vault
        .fresh()
        .load(&rows)
        .map_err(|e| StorageError::Format { file: path.display().to_string(), reason: e.to_string() })
}

fn stored_rows(txn: &redb::ReadTransaction) -> Result<Vec<DataKeyRow>, StorageError> {
    match super::optional_table(txn, DATA_KEYS)? {
        Some(t) => rows(&t),
        None => Ok(Vec::new()),
    }
}

/// The `sm_meta` row naming the master key new data keys are wrapped under.
const META_KEK: &str = "at_rest_master_key";

/// The cluster's master key of record: the first data key's, then each rotation's.
pub fn cluster_kek(txn: &redb::WriteTransaction) -> Result<Option<[u8; 8]>, StorageError> {
    let meta = txn.open_table(super::SM_META)?;
    let v = meta.get(META_KEK)?;
    v.map(|v| v.value().try_into().map_err(|_| corrupt("sm_meta", "a master key id of the wrong size"))).transpose()
}

/// Records `kek` as the cluster's master key of record, here and in `vault`.
pub fn set_cluster_kek(txn: &redb::WriteTransaction, kek: &[u8; 8], vault: &Vault) -> Result<(), StorageError> {
    txn.open_table(super::SM_META)?.insert(META_KEK, kek.as_slice())?;
    vault.note_cluster_kek(Some(*kek));
    Ok(())
}

/// Forgets the master key of record (a restore: the data keys it brings say which).
pub fn clear_cluster_kek(txn: &redb::WriteTransaction) -> Result<(), StorageError> {
    txn.open_table(super::SM_META)?.remove(META_KEK)?;
    Ok(())
}

/// Whether `row` has the shape of a wrapped key (nonce, 32 bytes, tag).
pub fn well_formed(row: &DataKeyRow) -> bool {
    row.wrapped.len() == NONCE_BYTES + 32 + 16
}

fn no_master_key() -> String {
    format!("this node holds no at-rest master key (set at_rest_key_file or {KEY_ENV})")
}

/// The master keyring of a node: its key file if one is named, else `ENGRAM_AT_REST_KEY`,
/// else `None` (encryption at rest off).
pub fn master_keys(key_file: Option<&std::path::Path>) -> Result<Option<Keyring>, VaultError> {
    let err = |e: crate::backup::BackupError| VaultError::Key(format!("at-rest key: {e}"));
    match (key_file, std::env::var(KEY_ENV)) {
        (Some(path), _) => Keyring::load(path).map(Some).map_err(err),
        (None, Ok(value)) => Keyring::from_env_value_named(&value, KEY_ENV).map(Some).map_err(err),
        (None, Err(_)) => Ok(None),
    }
}

fn corrupt(table: &'static str, reason: impl Into<String>) -> StorageError {
    StorageError::Corrupt { table, reason: reason.into() }
}

/// Every data key row of a state.
pub fn rows<T: ReadableTable<&'static str, &'static [u8]>>(t: &T) -> Result<Vec<DataKeyRow>, StorageError> {
    let mut out = Vec::new();
    for item in t.iter()? {
        let (k, v) = item?;
        let row: DataKeyRow = super::codec::decode_row("data_keys", v.value())?;
        if row.namespace != k.value() {
            return Err(corrupt("data_keys", format!("row of {:?} filed under {:?}", row.namespace, k.value())));
        }
        out.push(row);
    }
    Ok(out)
}

/// Every erasure a state remembers.
pub fn erasures<T: ReadableTable<&'static str, &'static [u8]>>(t: &T) -> Result<Vec<Erasure>, StorageError> {
    let mut out = Vec::new();
    for item in t.iter()? {
        out.push(super::codec::decode_row("erased_keys", item?.1.value())?);
    }
    Ok(out)
}

/// The version byte of a sealed `memories` row: [`SEALED_ROW`], the data key id, then the
/// seal of the plain row (`codec::encode_memory`), bound to the row's key.
pub const SEALED_ROW: u8 = 4;

/// Seals an encoded memory row under `key`, bound to the row's `memories` key.
pub fn seal_row(key: &DataKey, row_key: &[u8], plain: &[u8]) -> Vec<u8> {
    let sealed = key.seal(row_key, plain);
    let mut out = Vec::with_capacity(1 + 8 + sealed.len());
    out.push(SEALED_ROW);
    out.extend_from_slice(&key.id);
    out.extend(sealed);
    out
}

/// The data key id of a sealed row, `None` for a plain one.
pub fn sealed_by(value: &[u8]) -> Option<[u8; 8]> {
    match value.split_first() {
        Some((&SEALED_ROW, rest)) if rest.len() >= 8 => rest[..8].try_into().ok(),
        _ => None,
    }
}

/// Opens a row [`seal_row`] wrote. A key this vault lacks is an error naming it.
pub fn open_row(vault: &Vault, row_key: &[u8], value: &[u8]) -> Result<Vec<u8>, StorageError> {
    let id = sealed_by(value).ok_or_else(|| corrupt("memories", "a sealed row too short for its key id"))?;
    let key = vault.by_id(&id).ok_or_else(|| {
        corrupt(
            "memories",
            format!("sealed under data key {}, which this node does not hold (erased?)", hex::encode(id)),
        )
    })?;
    key.open(row_key, &value[9..]).map_err(|_| corrupt("memories", "a sealed row failed authentication"))
}

/// The associated data of a sealed command: what the seal is bound to.
pub fn command_aad(namespace: &str) -> Vec<u8> {
    let mut aad = b"engram sealed op v1".to_vec();
    aad.extend_from_slice(namespace.as_bytes());
    aad
}

/// The associated data of a sealed index file.
pub fn file_aad(namespace: &str, name: &str) -> Vec<u8> {
    let mut aad = b"engram sealed index file v1".to_vec();
    aad.extend_from_slice(&(namespace.len() as u64).to_le_bytes());
    aad.extend_from_slice(namespace.as_bytes());
    aad.extend_from_slice(name.as_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn vault_with(ns: &str) -> (Arc<Vault>, DataKeyRow) {
        let v = Vault::new(Some(Keyring::single(MasterKey::generate())));
        let row = v.new_key(ns).unwrap();
        v.insert(&row).unwrap();
        (v, row)
    }

    #[test]
    fn a_wrong_or_missing_master_key_opens_no_data_key() {
        let (v, row) = vault_with("a");
        assert!(v.load(std::slice::from_ref(&row)).is_ok());
        let other = Vault::new(Some(Keyring::single(MasterKey::generate())));
        let e = other.load(std::slice::from_ref(&row)).unwrap_err().to_string();
        assert!(e.contains("does not hold"), "{e}");
        let e = Vault::off().load(std::slice::from_ref(&row)).unwrap_err().to_string();
        assert!(e.contains("encrypted at rest"), "{e}");
        // A row moved to another namespace does not open either.
        let moved = DataKeyRow { namespace: "b".into(), ..row.clone() };
        assert!(v.load(&[moved]).is_err());
        // Rewrapped under a new active key, it opens with the new ring only.
        let new = MasterKey::generate();
        let ring = Keyring::single(new.clone()).with(v.keks().unwrap().active().clone());
        v.set_keks(ring);
        let again = v.rewrap(&row).unwrap();
        assert_eq!((again.id, again.kek), (row.id, new.id()));
        assert!(Vault::new(Some(Keyring::single(new))).load(&[again]).is_ok());
    }

    #[test]
    fn seals_are_deterministic_and_bound_to_their_row() {
        let (v, _) = vault_with("a");
        let k = v.for_namespace("a").unwrap();
        let s = seal_row(&k, b"a\0x", b"hello");
        assert_eq!(s, seal_row(&k, b"a\0x", b"hello"), "every node seals a row to the same bytes");
        assert_ne!(s, seal_row(&k, b"a\0x", b"hellp"));
        assert_eq!(open_row(&v, b"a\0x", &s).unwrap(), b"hello");
        assert!(open_row(&v, b"a\0y", &s).is_err(), "moved to another id");
        v.remove("a");
        assert!(v.for_namespace("a").is_none(), "nothing new is sealed under a removed key");
        assert!(open_row(&v, b"a\0x", &s).is_ok(), "readers of the state before the erasure commits");
        v.forget_removed();
        let e = open_row(&v, b"a\0x", &s).unwrap_err().to_string();
        assert!(e.contains("does not hold"), "{e}");
    }

    proptest! {
        #[test]
        fn every_corrupted_seal_is_refused(
            plain in proptest::collection::vec(any::<u8>(), 0..300),
            at in any::<usize>(),
            flip in 1u8..=255,
            cut in any::<usize>(),
            garbage in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let (v, row) = vault_with("a");
            let k = v.for_namespace("a").unwrap();
            let s = seal_row(&k, b"a\0x", &plain);
            prop_assert_eq!(&open_row(&v, b"a\0x", &s).unwrap(), &plain);
            // One flipped byte anywhere, past the version byte and key id.
            let mut bad = s.clone();
            let i = 9 + at % (bad.len() - 9);
            bad[i] ^= flip;
            prop_assert!(open_row(&v, b"a\0x", &bad).is_err());
            // Truncated, extended, or garbage.
            prop_assert!(open_row(&v, b"a\0x", &s[..cut % s.len()]).is_err());
            let mut longer = s.clone();
            longer.push(flip);
            prop_assert!(open_row(&v, b"a\0x", &longer).is_err());
            let mut g = vec![SEALED_ROW];
            g.extend_from_slice(&k.id);
            g.extend(&garbage);
            prop_assert!(open_row(&v, b"a\0x", &g).is_err());
            // The wrapped key, flipped, does not load.
            let mut w = row.clone();
            let j = at % w.wrapped.len();
            w.wrapped[j] ^= flip;
            prop_assert!(v.load(&[w]).is_err());
        }
    }
}
