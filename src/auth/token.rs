//! API keys and bearer credentials.
//!
//! An API key is shown to its owner once and never stored: the state machine keeps its public
//! id and a BLAKE3 hash of its secret.
//!
//! ```text
//! key    := "egk_" id "_" secret          id: 8 bytes, secret: 32 bytes, both lowercase hex
//! header := "authorization: Bearer " (key | JWT)
//! ```
//!
//! 256 random bits need no slow password hash: guessing is hopeless and the hash only keeps a
//! stolen state file or backup from handing out working keys. Comparison is constant time
//! (`blake3::Hash` equality).

use serde::{Deserialize, Serialize};

/// The public half of an API key: names the key in listings, revocations and audit logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct KeyId(pub [u8; 8]);

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::str::FromStr for KeyId {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<KeyId, TokenError> {
        let mut id = [0u8; 8];
        if s.len() != 16 || !is_lower_hex(s) {
            return Err(TokenError::Malformed("a key id is 16 lowercase hex digits"));
        }
        hex::decode_to_slice(s, &mut id).map_err(|_| TokenError::Malformed("a key id is 16 lowercase hex digits"))?;
        Ok(KeyId(id))
    }
}

/// A whole API key. Its secret is wiped when it is dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: KeyId,
    secret: zeroize::Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKey({}, <secret>)", self.id)
    }
}

/// Why a credential could not be read. The message never echoes the credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed credential: {0}")]
    Malformed(&'static str),
}

const PREFIX: &str = "egk_";
/// Length of a formatted key: prefix, 16 hex, '_', 64 hex.
pub const KEY_LEN: usize = 4 + 16 + 1 + 64;
/// Longest bearer credential accepted at all (JWTs included).
pub const MAX_BEARER_BYTES: usize = 8 * 1024;

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl ApiKey {
    /// A new key from the OS's random source.
    pub fn generate() -> ApiKey {
        let mut id = [0u8; 8];
        let mut secret = zeroize::Zeroizing::new([0u8; 32]);
        rand::fill(&mut id);
        rand::fill(&mut secret[..]);
        ApiKey { id: KeyId(id), secret }
    }

    /// The stored form: BLAKE3 of the secret, keyed by the key id, so equal secrets under two
    /// ids never hash alike.
    pub fn hash(&self) -> [u8; 32] {
        hash_secret(&self.id, &self.secret)
    }

    /// Whether `stored` is this key's hash, in constant time.
    pub fn matches(&self, stored: &[u8; 32]) -> bool {
        blake3::Hash::from(self.hash()) == blake3::Hash::from(*stored)
    }

    /// The text form, `egk_<id>_<secret>`. Handle with care: this is the credential.
    pub fn expose(&self) -> zeroize::Zeroizing<String> {
        zeroize::Zeroizing::new(format!("{PREFIX}{}_{}", hex::encode(self.id.0), hex::encode(&self.secret[..])))
    }

    /// Parses the text form strictly: exact length, prefix, lowercase hex.
    pub fn parse(s: &str) -> Result<ApiKey, TokenError> {
        const BAD: TokenError = TokenError::Malformed("an API key is egk_<16 hex>_<64 hex>");
        if s.len() != KEY_LEN || !s.is_ascii() {
            return Err(BAD);
        }
        let rest = s.strip_prefix(PREFIX).ok_or(BAD)?;
        let (id, secret_hex) = rest.split_at(16);
        let secret_hex = secret_hex.strip_prefix('_').ok_or(BAD)?;
        let id: KeyId = id.parse().map_err(|_| BAD)?;
        if !is_lower_hex(secret_hex) {
            return Err(BAD);
        }
        let mut secret = zeroize::Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(secret_hex, &mut secret[..]).map_err(|_| BAD)?;
        Ok(ApiKey { id, secret })
    }
}

fn hash_secret(id: &KeyId, secret: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("engram api key v1");
    h.update(&id.0);
    h.update(secret);
    *h.finalize().as_bytes()
}

/// What an `authorization` header carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bearer {
    Key(ApiKey),
    /// A compact JWT (three base64url parts); verified by [`super::jwt`].
    Jwt(String),
}

/// Reads `Bearer <credential>` (scheme case-insensitive, one space). Anything else is refused.
pub fn parse_bearer(header: &str) -> Result<Bearer, TokenError> {
    if header.len() > MAX_BEARER_BYTES {
        return Err(TokenError::Malformed("credential too long"));
    }
    let (scheme, cred) = header.split_once(' ').ok_or(TokenError::Malformed("expected `Bearer <credential>`"))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(TokenError::Malformed("expected `Bearer <credential>`"));
    }
    if cred.starts_with(PREFIX) {
        return ApiKey::parse(cred).map(Bearer::Key);
    }
    let parts: Vec<&str> = cred.split('.').collect();
    let b64url = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if parts.len() == 3 && parts.iter().all(|p| b64url(p)) {
        return Ok(Bearer::Jwt(cred.to_string()));
    }
    Err(TokenError::Malformed("neither an API key nor a JWT"))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_generated_key_parses_back_and_matches_only_its_own_hash() {
        let k = ApiKey::generate();
        let text = k.expose();
        assert_eq!(text.len(), KEY_LEN);
        let back = ApiKey::parse(&text).unwrap();
        assert_eq!(back, k);
        assert!(back.matches(&k.hash()));
        assert!(!ApiKey::generate().matches(&k.hash()));
        assert!(!format!("{k:?}").contains(&text[21..]), "Debug must not print the secret");
    }

    #[test]
    fn bearer_headers() {
        let k = ApiKey::generate();
        assert_eq!(parse_bearer(&format!("Bearer {}", &*k.expose())).unwrap(), Bearer::Key(k.clone()));
        assert_eq!(parse_bearer(&format!("bearer {}", &*k.expose())).unwrap(), Bearer::Key(k.clone()));
        assert!(matches!(parse_bearer("Bearer aaa.bbb.ccc").unwrap(), Bearer::Jwt(_)));
        for bad in ["", "Bearer", "Bearer ", "Basic abc", "Bearer a.b", "Bearer a..c", "Bearer egk_zz", "Bearer a b"] {
            assert!(parse_bearer(bad).is_err(), "{bad:?} accepted");
        }
        // Uppercase hex is not the canonical form.
        let upper = format!("Bearer {}", k.expose().to_uppercase().replacen("EGK_", "egk_", 1));
        assert!(parse_bearer(&upper).is_err());
    }

    proptest! {
        #[test]
        fn keys_round_trip(id in any::<[u8; 8]>(), secret in any::<[u8; 32]>()) {
            let k = ApiKey { id: KeyId(id), secret: zeroize::Zeroizing::new(secret) };
            prop_assert_eq!(ApiKey::parse(&k.expose()).unwrap(), k);
        }

        #[test]
        fn garbage_never_panics(s in ".{0,200}") {
            let _ = parse_bearer(&s);
            let _ = ApiKey::parse(&s);
            let _ = s.parse::<KeyId>();
        }

        #[test]
        fn any_single_change_to_a_key_is_refused_or_is_another_key(pos in 0usize..KEY_LEN, c in any::<char>()) {
            let k = ApiKey::generate();
            let text = k.expose();
            let mut chars: Vec<char> = text.chars().collect();
            prop_assume!(chars[pos] != c);
            chars[pos] = c;
            let mutated: String = chars.into_iter().collect();
            // A valid-looking key is a different key: it cannot match the original's hash.
            if let Ok(other) = ApiKey::parse(&mutated) {
                prop_assert!(!other.matches(&k.hash()));
            }
        }
    }
}
