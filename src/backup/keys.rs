//! Backup keys: a keyring file or an environment variable, never the config file.
//!
//! ```toml
//! # Engram backup keyring. Mode 0600; keep every key an old backup may still need.
//! active = "5d2c9a0e41b7f3a8"
//!
//! [[keys]]
//! id = "5d2c9a0e41b7f3a8"       # derived from the secret (see crypto.rs); checked on load
//! secret = "…64 hex digits…"
//! created_at_ms = 1795000000000
//! ```
//!
//! `ENGRAM_BACKUP_KEY` holds one or more hex secrets, comma separated; the first is active.
//! [`rotate`] adds a new active key and keeps the old ones, so old backups stay restorable.

use std::path::Path;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::crypto::MasterKey;
use super::BackupError;

pub const KEY_ENV: &str = "ENGRAM_BACKUP_KEY";

/// Keys by id, one of them active (used for new backups).
#[derive(Debug, Clone)]
pub struct Keyring {
    keys: Vec<(MasterKey, u64)>,
    active: [u8; 8],
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyringFile {
    active: String,
    keys: Vec<KeyEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    id: String,
    secret: String,
    created_at_ms: u64,
}

fn key_err(reason: impl Into<String>) -> BackupError {
    BackupError::Key(reason.into())
}

impl Keyring {
    pub fn single(key: MasterKey) -> Keyring {
        Keyring { active: key.id(), keys: vec![(key, 0)] }
    }

    pub fn active(&self) -> &MasterKey {
        &self.keys.iter().find(|(k, _)| k.id() == self.active).expect("the active key is in the ring").0
    }

    pub fn get(&self, id: &[u8; 8]) -> Option<&MasterKey> {
        self.keys.iter().map(|(k, _)| k).find(|k| &k.id() == id)
    }

    pub fn ids(&self) -> Vec<([u8; 8], u64, bool)> {
        self.keys.iter().map(|(k, at)| (k.id(), *at, k.id() == self.active)).collect()
    }

    /// Loads a keyring file, refusing one that group or others may read.
    pub fn load(path: &Path) -> Result<Keyring, BackupError> {
        let bytes = crate::secrets::read_private(path).map_err(|e| key_err(format!("key file {e}")))?;
        let text = Zeroizing::new(
            String::from_utf8(bytes.to_vec())
                .map_err(|_| key_err(format!("key file {}: not UTF-8", path.display())))?,
        );
        let file: KeyringFile =
            toml::from_str(&text).map_err(|e| key_err(format!("key file {}: {e}", path.display())))?;
        let mut keys = Vec::new();
        for e in &file.keys {
            let secret = Zeroizing::new(
                hex::decode(&e.secret).map_err(|_| key_err(format!("key {}: secret is not hex", e.id)))?,
            );
            let key = MasterKey::from_bytes(&secret)
                .ok_or_else(|| key_err(format!("key {}: secret must be 32 bytes (64 hex digits)", e.id)))?;
            if hex::encode(key.id()) != e.id {
                return Err(key_err(format!("key {}: id does not match its secret ({})", e.id, hex::encode(key.id()))));
            }
            keys.push((key, e.created_at_ms));
        }
        let active = parse_id(&file.active)?;
        if !keys.iter().any(|(k, _)| k.id() == active) {
            return Err(key_err(format!("active key {} is not in the keyring", file.active)));
        }
        Ok(Keyring { keys, active })
    }

    /// Keys from `ENGRAM_BACKUP_KEY` (hex secrets, comma separated, the first active).
    pub fn from_env_value(value: &str) -> Result<Keyring, BackupError> {
        Keyring::from_env_value_named(value, KEY_ENV)
    }

    /// Keys from the value of environment variable `env`, as [`from_env_value`](Self::from_env_value).
    pub fn from_env_value_named(value: &str, env: &str) -> Result<Keyring, BackupError> {
        let mut keys = Vec::new();
        for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let secret = Zeroizing::new(hex::decode(part).map_err(|_| key_err(format!("{env}: not hex")))?);
            keys.push((
                MasterKey::from_bytes(&secret).ok_or_else(|| key_err(format!("{env}: a key must be 64 hex digits")))?,
                0,
            ));
        }
        let active = keys.first().map(|(k, _)| k.id()).ok_or_else(|| key_err(format!("{env} is empty")))?;
        Ok(Keyring { keys, active })
    }

    /// The ring as an environment value ([`from_env_value`](Self::from_env_value)'s format,
    /// the active key first): how a drill hands it to its scratch nodes without a file.
    pub fn to_env_value(&self) -> Zeroizing<String> {
        let mut out = Zeroizing::new(hex::encode(self.active().expose()));
        for (k, _) in self.keys.iter().filter(|(k, _)| k.id() != self.active) {
            out.push(',');
            out.push_str(&hex::encode(k.expose()));
        }
        out
    }

    /// This ring with `key` added as an inactive key.
    pub fn with(mut self, key: MasterKey) -> Keyring {
        if self.get(&key.id()).is_none() {
            self.keys.push((key, 0));
        }
        self
    }

    /// The key file if one is named, else `ENGRAM_BACKUP_KEY`.
    pub fn resolve(key_file: Option<&Path>) -> Result<Keyring, BackupError> {
        match (key_file, std::env::var(KEY_ENV)) {
            (Some(path), _) => Keyring::load(path),
            (None, Ok(value)) => Keyring::from_env_value(&value),
            (None, Err(_)) => Err(key_err(format!("no backup key: pass a key file or set {KEY_ENV}"))),
        }
    }

    pub(crate) fn save(&self, path: &Path) -> Result<(), BackupError> {
        let file = KeyringFile {
            active: hex::encode(self.active),
            keys: self
                .keys
                .iter()
                .map(|(k, at)| KeyEntry {
                    id: hex::encode(k.id()),
                    secret: hex::encode(k.expose()),
                    created_at_ms: *at,
                })
                .collect(),
        };
        let text = Zeroizing::new(format!(
            "# Engram backup keyring. Mode 0600; keep every key an old backup may still need.\n{}",
            toml::to_string(&file).map_err(|e| key_err(e.to_string()))?
        ));
        crate::secrets::write_private(path, text.as_bytes(), true)?;
        Ok(())
    }
}

fn parse_id(s: &str) -> Result<[u8; 8], BackupError> {
    hex::decode(s).ok().and_then(|b| b.try_into().ok()).ok_or_else(|| key_err(format!("bad key id {s:?}")))
}

/// Creates a keyring file with one new key; refuses to overwrite an existing file.
pub fn generate(path: &Path) -> Result<Keyring, BackupError> {
    if path.exists() {
        return Err(key_err(format!("{} exists; use `keys rotate` to add a key to it", path.display())));
    }
    let key = MasterKey::generate();
    let ring = Keyring { active: key.id(), keys: vec![(key, crate::memory::now_ms())] };
    ring.save(path)?;
    Ok(ring)
}

/// Adds a new key to a keyring file and makes it the active one; old keys stay.
pub fn rotate(path: &Path) -> Result<Keyring, BackupError> {
    let mut ring = Keyring::load(path)?;
    let key = MasterKey::generate();
    ring.active = key.id();
    ring.keys.push((key, crate::memory::now_ms()));
    ring.save(path)?;
    Ok(ring)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn keyrings_rotate_keep_old_keys_and_refuse_open_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let first = generate(&path).unwrap().active().id();
        assert!(generate(&path).is_err(), "generate never overwrites");
        let ring = rotate(&path).unwrap();
        let second = ring.active().id();
        assert_ne!(first, second);
        let loaded = Keyring::load(&path).unwrap();
        assert_eq!(loaded.active().id(), second);
        assert!(loaded.get(&first).is_some(), "the old key stays for old backups");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = Keyring::load(&path).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();

        // A secret edited by hand no longer matches its id.
        let text = std::fs::read_to_string(&path).unwrap();
        let secret = hex::encode(loaded.get(&first).unwrap().expose());
        let mut flipped = secret.clone().into_bytes();
        flipped[0] = if flipped[0] == b'0' { b'1' } else { b'0' };
        std::fs::write(&path, text.replace(&secret, std::str::from_utf8(&flipped).unwrap())).unwrap();
        let e = Keyring::load(&path).unwrap_err().to_string();
        assert!(e.contains("does not match"), "{e}");
    }

    #[test]
    fn env_keys_are_hex_and_the_first_is_active() {
        let (a, b) = (MasterKey::generate(), MasterKey::generate());
        let ring =
            Keyring::from_env_value(&format!("{}, {}", hex::encode(a.expose()), hex::encode(b.expose()))).unwrap();
        assert_eq!(ring.active().id(), a.id());
        assert!(ring.get(&b.id()).is_some());
        assert!(Keyring::from_env_value("").is_err());
        assert!(Keyring::from_env_value("abcd").is_err());
        assert!(Keyring::from_env_value("zz").is_err());
    }
}
