//! Every cryptographic operation of backups, in one file.
//!
//! * A master key is 32 random bytes; its id is the first 8 bytes of
//!   `BLAKE3-derive-key("engram backup key id v1", key)`. The id names the key without
//!   revealing anything about it, and a key file cannot pair a key with a wrong id.
//! * Each archive gets its own key: `BLAKE3-derive-key("engram backup v1 archive key",
//!   master || salt)` with a fresh 32-byte random salt from the header. Nonces then only need
//!   to be unique within one archive, and they are: chunk `i` (a `u64`) is sealed under nonce
//!   `i (8 bytes BE) || 0 0 0 || last` with `last` = 1 only for the closing manifest chunk.
//!   Two archives under one master key share a key only if their salts collide (2^-256).
//! * AES-256-GCM; the associated data of every chunk is the whole archive header, so a
//!   changed header fails every chunk. A chunk sealed at another index (reordered, dropped)
//!   or as another kind (a data chunk passed off as the last) fails its tag.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use zeroize::Zeroizing;

pub const KEY_BYTES: usize = 32;
pub const SALT_BYTES: usize = 32;
pub const TAG_BYTES: usize = 16;

/// A master key: zeroed when dropped.
#[derive(Clone)]
pub struct MasterKey(Zeroizing<[u8; KEY_BYTES]>);

impl MasterKey {
    pub fn generate() -> MasterKey {
        let mut k = Zeroizing::new([0u8; KEY_BYTES]);
        rand::rng().fill_bytes(k.as_mut());
        MasterKey(k)
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<MasterKey> {
        let arr: [u8; KEY_BYTES] = bytes.try_into().ok()?;
        Some(MasterKey(Zeroizing::new(arr)))
    }

    pub fn expose(&self) -> &[u8; KEY_BYTES] {
        &self.0
    }

    pub fn id(&self) -> [u8; 8] {
        let d = blake3::derive_key("engram backup key id v1", self.0.as_ref());
        d[..8].try_into().expect("8 of 32 bytes")
    }
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKey({})", hex::encode(self.id()))
    }
}

pub fn random_salt() -> [u8; SALT_BYTES] {
    let mut s = [0u8; SALT_BYTES];
    rand::rng().fill_bytes(&mut s);
    s
}

/// The key of one archive.
pub struct ArchiveCipher {
    aead: Aes256Gcm,
}

/// A chunk failed authentication.
#[derive(Debug)]
pub struct SealBroken;

fn nonce(index: u64, last: bool) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&index.to_be_bytes());
    n[11] = last as u8;
    n
}

impl ArchiveCipher {
    pub fn new(master: &MasterKey, salt: &[u8; SALT_BYTES]) -> ArchiveCipher {
        let mut material = Zeroizing::new([0u8; KEY_BYTES + SALT_BYTES]);
        material[..KEY_BYTES].copy_from_slice(master.expose());
        material[KEY_BYTES..].copy_from_slice(salt);
        let key = Zeroizing::new(blake3::derive_key("engram backup v1 archive key", material.as_ref()));
        ArchiveCipher { aead: Aes256Gcm::new_from_slice(key.as_ref()).expect("32-byte key") }
    }

    pub fn seal(&self, index: u64, last: bool, header: &[u8], plaintext: &[u8]) -> Vec<u8> {
        self.aead
            .encrypt(Nonce::from_slice(&nonce(index, last)), Payload { msg: plaintext, aad: header })
            .expect("AES-GCM encryption of a bounded chunk cannot fail")
    }

    pub fn open(&self, index: u64, last: bool, header: &[u8], ciphertext: &[u8]) -> Result<Vec<u8>, SealBroken> {
        self.aead
            .decrypt(Nonce::from_slice(&nonce(index, last)), Payload { msg: ciphertext, aad: header })
            .map_err(|_| SealBroken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_opens_only_at_its_index_kind_header_and_key() {
        let key = MasterKey::generate();
        let salt = random_salt();
        let c = ArchiveCipher::new(&key, &salt);
        let sealed = c.seal(3, false, b"header", b"hello");
        assert_eq!(c.open(3, false, b"header", &sealed).unwrap(), b"hello");
        assert!(c.open(4, false, b"header", &sealed).is_err(), "moved to another index");
        assert!(c.open(3, true, b"header", &sealed).is_err(), "passed off as the last chunk");
        assert!(c.open(3, false, b"headex", &sealed).is_err(), "another header");
        assert!(ArchiveCipher::new(&MasterKey::generate(), &salt).open(3, false, b"header", &sealed).is_err());
        assert!(ArchiveCipher::new(&key, &random_salt()).open(3, false, b"header", &sealed).is_err());
        // Same key, same index, another archive: a different ciphertext (fresh salt).
        assert_ne!(ArchiveCipher::new(&key, &random_salt()).seal(3, false, b"header", b"hello"), sealed);
        assert_ne!(key.id(), MasterKey::generate().id());
    }
}
