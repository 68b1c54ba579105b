//! JWTs from an external issuer, as Qdrant accepts them: one algorithm (HS256 with a secret
//! file, RS256 or EdDSA with a PEM public key), `exp` required and `nbf` honoured (60 s
//! leeway), optional issuer and audience. The subject becomes the principal's name and a
//! claim (default `roles`) lists role names from the replicated state.
//!
//! A verified token travels into the log as [`Principal::Token`] with its expiry, so `apply`
//! refuses a write whose token expired before the leader proposed it, on every node alike.

use std::collections::HashMap;
use std::path::PathBuf;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::Principal;
use crate::error::ApiError;

/// Which signature the issuer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum JwtAlgorithm {
    Hs256,
    Rs256,
    Eddsa,
}

/// JWT settings from the node's config.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct JwtSettings {
    pub algorithm: JwtAlgorithm,
    /// HS256: the shared secret (mode 0600). RS256 / EdDSA: the issuer's public key (PEM).
    pub key_file: PathBuf,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub roles_claim: String,
}

pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
    roles_claim: String,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(flatten)]
    rest: HashMap<String, serde_json::Value>,
}

fn invalid() -> ApiError {
    ApiError::Unauthenticated { reason: "invalid, revoked or expired credentials".into() }
}

impl JwtVerifier {
    pub fn load(s: &JwtSettings) -> Result<JwtVerifier, String> {
        let (alg, key) = match s.algorithm {
            JwtAlgorithm::Hs256 => {
                let secret = crate::secrets::read_private(&s.key_file).map_err(|e| format!("jwt key: {e}"))?;
                let secret: &[u8] = secret.as_slice().trim_ascii();
                if secret.len() < 32 {
                    return Err("jwt key: an HS256 secret must be at least 32 bytes".into());
                }
                (Algorithm::HS256, DecodingKey::from_secret(secret))
            }
            JwtAlgorithm::Rs256 | JwtAlgorithm::Eddsa => {
                let pem = std::fs::read(&s.key_file).map_err(|e| format!("jwt key {}: {e}", s.key_file.display()))?;
                let key = if s.algorithm == JwtAlgorithm::Rs256 {
                    DecodingKey::from_rsa_pem(&pem)
                } else {
                    DecodingKey::from_ed_pem(&pem)
                };
                let alg = if s.algorithm == JwtAlgorithm::Rs256 { Algorithm::RS256 } else { Algorithm::EdDSA };
                (alg, key.map_err(|e| format!("jwt key {}: {e}", s.key_file.display()))?)
            }
        };
        let mut validation = Validation::new(alg);
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        match &s.audience {
            Some(a) => validation.set_audience(&[a]),
            None => validation.validate_aud = false,
        }
        if let Some(i) = &s.issuer {
            validation.set_issuer(&[i]);
        }
        Ok(JwtVerifier { key, validation, roles_claim: s.roles_claim.clone() })
    }

    /// The principal a token speaks for, or UNAUTHENTICATED (never saying why).
    pub fn verify(&self, token: &str) -> Result<Principal, ApiError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|e| {
            tracing::debug!(error = %e, "JWT refused");
            invalid()
        })?;
        let Claims { sub, exp, rest } = data.claims;
        // The subject scopes idempotency keys and fills `$principal` tag grants.
        if sub.is_empty() || sub.len() > 128 || sub.chars().any(char::is_control) {
            return Err(invalid());
        }
        let roles = match rest.get(&self.roles_claim) {
            None => vec![],
            Some(serde_json::Value::Array(items)) => {
                items.iter().map(|v| v.as_str().map(String::from).ok_or_else(invalid)).collect::<Result<_, _>>()?
            }
            Some(_) => return Err(invalid()),
        };
        Ok(Principal::Token { subject: sub, roles, expires_at_ms: exp.saturating_mul(1000) })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use jsonwebtoken::{encode, EncodingKey, Header};
    use proptest::prelude::*;

    use super::*;

    fn verifier(dir: &std::path::Path, audience: Option<&str>) -> JwtVerifier {
        let path = dir.join("jwt.secret");
        std::fs::write(&path, "0123456789abcdef0123456789abcdef").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        JwtVerifier::load(&JwtSettings {
            algorithm: JwtAlgorithm::Hs256,
            key_file: path,
            issuer: Some("idp".into()),
            audience: audience.map(String::from),
            roles_claim: "roles".into(),
        })
        .unwrap()
    }

    fn token(claims: serde_json::Value, secret: &[u8]) -> String {
        encode(&Header::default(), &claims, &EncodingKey::from_secret(secret)).unwrap()
    }

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn claims_map_to_a_principal_and_bad_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let v = verifier(dir.path(), Some("engram"));
        let now = crate::memory::now_ms() / 1000;
        let good =
            serde_json::json!({"sub": "bot-1", "exp": now + 60, "iss": "idp", "aud": "engram", "roles": ["reader"]});
        assert_eq!(
            v.verify(&token(good.clone(), SECRET)).unwrap(),
            Principal::Token {
                subject: "bot-1".into(),
                roles: vec!["reader".into()],
                expires_at_ms: (now + 60) * 1000
            }
        );
        let mut expired = good.clone();
        expired["exp"] = (now - 3600).into();
        let mut early = good.clone();
        early["nbf"] = (now + 3600).into();
        let mut wrong_iss = good.clone();
        wrong_iss["iss"] = "other".into();
        let mut wrong_aud = good.clone();
        wrong_aud["aud"] = "other".into();
        let mut bad_roles = good.clone();
        bad_roles["roles"] = serde_json::json!("admin");
        let no_exp = serde_json::json!({"sub": "bot-1", "iss": "idp", "aud": "engram"});
        for (what, claims) in [
            ("expired", expired),
            ("not yet valid", early),
            ("issuer", wrong_iss),
            ("audience", wrong_aud),
            ("roles", bad_roles),
            ("no exp", no_exp),
        ] {
            assert!(v.verify(&token(claims, SECRET)).is_err(), "{what} accepted");
        }
        assert!(v.verify(&token(good.clone(), b"another secret of thirty-two byte")).is_err(), "wrong key");
        let other_alg = encode(&Header::new(Algorithm::HS384), &good, &EncodingKey::from_secret(SECRET)).unwrap();
        assert!(v.verify(&other_alg).is_err(), "algorithm switch");
    }

    #[test]
    fn an_open_or_short_secret_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, "short").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let s = JwtSettings {
            algorithm: JwtAlgorithm::Hs256,
            key_file: path.clone(),
            issuer: None,
            audience: None,
            roles_claim: "roles".into(),
        };
        assert!(JwtVerifier::load(&s).is_err());
        std::fs::write(&path, "0123456789abcdef0123456789abcdef").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(JwtVerifier::load(&s).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        #[test]
        fn garbage_tokens_are_refused_without_panics(s in "[A-Za-z0-9_.-]{0,300}") {
            let dir = tempfile::tempdir().unwrap();
            let v = verifier(dir.path(), None);
            prop_assert!(v.verify(&s).is_err());
        }
    }
}
