//! The replicated auth state: keys, roles with their grants, and tenant quotas. These records
//! live in state-machine tables (see `storage`), are changed only by log entries, travel in
//! snapshots and backups, and are what every node's [`super::policy`] reads.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::token::KeyId;
use crate::error::ApiError;

/// One permission bit. `Admin` on a namespace pattern implies the other three there; `Admin`
/// on `*` makes a cluster administrator (admin RPCs, keys, roles, quotas).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Permission {
    Read,
    Write,
    Delete,
    Admin,
}

impl Permission {
    pub const ALL: [Permission; 4] = [Permission::Read, Permission::Write, Permission::Delete, Permission::Admin];

    fn bit(self) -> u8 {
        match self {
            Permission::Read => 1,
            Permission::Write => 2,
            Permission::Delete => 4,
            Permission::Admin => 8,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Permission::Read => "read",
            Permission::Write => "write",
            Permission::Delete => "delete",
            Permission::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Permission> {
        Permission::ALL.into_iter().find(|p| p.name() == s)
    }
}

/// A set of permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Permissions(u8);

impl Permissions {
    pub fn of(perms: &[Permission]) -> Permissions {
        Permissions(perms.iter().fold(0, |acc, p| acc | p.bit()))
    }

    pub fn all() -> Permissions {
        Permissions::of(&Permission::ALL)
    }

    /// Whether `p` is granted; admin implies every other permission.
    pub fn allows(self, p: Permission) -> bool {
        self.0 & (p.bit() | Permission::Admin.bit()) != 0
    }

    /// Whether the `p` bit itself is set (no implication).
    pub fn contains(self, p: Permission) -> bool {
        self.0 & p.bit() != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 & 0x0f == 0
    }

    pub fn names(self) -> Vec<&'static str> {
        Permission::ALL.into_iter().filter(|p| self.0 & p.bit() != 0).map(Permission::name).collect()
    }
}

/// `(namespace pattern, permissions)`, optionally only on memories carrying one tag (ABAC).
/// A tag value of [`PRINCIPAL_PLACEHOLDER`] stands for the caller's principal name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub namespace: String,
    pub permissions: Permissions,
    pub tag: Option<(String, String)>,
}

/// In a grant's tag condition, replaced by the caller's principal name.
pub const PRINCIPAL_PLACEHOLDER: &str = "$principal";

/// A named set of grants. `root` is built in: every permission on `*`, and cannot be changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Role {
    pub name: String,
    pub grants: Vec<Grant>,
    pub created_at_ms: u64,
}

pub const ROOT_ROLE: &str = "root";

impl Role {
    pub fn root() -> Role {
        Role {
            name: ROOT_ROLE.into(),
            grants: vec![Grant { namespace: "*".into(), permissions: Permissions::all(), tag: None }],
            created_at_ms: 0,
        }
    }
}

/// An API key as the state machine stores it: never the secret, only its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: KeyId,
    /// The principal the key speaks for; several keys may share one (rotation).
    pub name: String,
    pub roles: Vec<String>,
    pub hash: [u8; 32],
    pub created_at_ms: u64,
    pub expires_at_ms: Option<u64>,
    /// Set (leader clock, from the log) when revoked; a revoked key never works again.
    pub revoked_at_ms: Option<u64>,
}

impl KeyRecord {
    /// Usable at `now_ms` (a leader's clock in `apply`, the local clock when authenticating).
    pub fn usable_at(&self, now_ms: u64) -> bool {
        self.revoked_at_ms.is_none() && self.expires_at_ms.is_none_or(|e| e > now_ms)
    }
}

/// Limits of one tenant (a namespace's first segment); `*` is the default for tenants without
/// their own. `None`: unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Quota {
    pub max_namespaces: Option<u64>,
    pub max_memories_per_namespace: Option<u64>,
    pub max_bytes_per_namespace: Option<u64>,
}

/// The quota row that applies to every tenant without its own.
pub const DEFAULT_QUOTA_TENANT: &str = "*";

/// The tenant a namespace belongs to: its first segment.
pub fn tenant_of(namespace: &str) -> &str {
    namespace.split('/').next().unwrap_or(namespace)
}

/// Principal (key) and role names: 1..=64 bytes of `[a-z0-9_.@-]`.
pub fn validate_name(field: &str, name: &str) -> Result<(), ApiError> {
    if name.is_empty() || name.len() > 64 {
        return Err(ApiError::invalid(field, "must be 1..=64 bytes"));
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.@-".contains(&b)) {
        return Err(ApiError::invalid(field, "may only hold [a-z0-9_.@-]"));
    }
    Ok(())
}

/// A grant's tag condition: a key as tags allow it, and a value or `$principal`.
pub fn validate_grant(field: &str, g: &Grant) -> Result<(), ApiError> {
    super::policy::validate_pattern(&format!("{field}.namespace"), &g.namespace)?;
    if g.permissions.is_empty() {
        return Err(ApiError::invalid(format!("{field}.permissions"), "must name at least one permission"));
    }
    if let Some((k, v)) = &g.tag {
        if k.is_empty() || k.len() > 128 || v.len() > 1024 {
            return Err(ApiError::invalid(format!("{field}.tag"), "key 1..=128 bytes, value at most 1024"));
        }
    }
    Ok(())
}

/// Every record, for codec tests and the proptest of the auth-state codec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AuthRecord {
    Key(KeyRecord),
    Role(Role),
    Quota(BTreeMap<String, Quota>),
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::storage::codec;

    fn grant() -> impl Strategy<Value = Grant> {
        ("[a-z*/]{1,20}", any::<u8>(), proptest::option::of(("[a-z]{1,8}", ".{0,12}")))
            .prop_map(|(namespace, bits, tag)| Grant { namespace, permissions: Permissions(bits & 0x0f), tag })
    }

    fn record() -> impl Strategy<Value = AuthRecord> {
        prop_oneof![
            (
                any::<[u8; 8]>(),
                "[a-z0-9_.@-]{1,64}",
                proptest::collection::vec("[a-z]{1,10}", 0..4),
                any::<[u8; 32]>(),
                any::<u64>(),
                proptest::option::of(any::<u64>()),
                proptest::option::of(any::<u64>())
            )
                .prop_map(|(id, name, roles, hash, c, e, r)| AuthRecord::Key(KeyRecord {
                    id: KeyId(id),
                    name,
                    roles,
                    hash,
                    created_at_ms: c,
                    expires_at_ms: e,
                    revoked_at_ms: r,
                })),
            ("[a-z]{1,10}", proptest::collection::vec(grant(), 0..6), any::<u64>())
                .prop_map(|(name, grants, created_at_ms)| AuthRecord::Role(Role { name, grants, created_at_ms })),
            proptest::collection::btree_map(
                "[a-z*]{1,8}",
                (
                    proptest::option::of(any::<u64>()),
                    proptest::option::of(any::<u64>()),
                    proptest::option::of(any::<u64>())
                )
                    .prop_map(|(a, b, c)| Quota {
                        max_namespaces: a,
                        max_memories_per_namespace: b,
                        max_bytes_per_namespace: c
                    }),
                0..4
            )
            .prop_map(AuthRecord::Quota),
        ]
    }

    #[test]
    fn admin_implies_everything_and_names_round_trip() {
        let admin = Permissions::of(&[Permission::Admin]);
        assert!(Permission::ALL.iter().all(|p| admin.allows(*p)));
        let rw = Permissions::of(&[Permission::Read, Permission::Write]);
        assert!(rw.allows(Permission::Read) && rw.allows(Permission::Write));
        assert!(!rw.allows(Permission::Delete) && !rw.allows(Permission::Admin));
        for p in Permission::ALL {
            assert_eq!(Permission::parse(p.name()), Some(p));
        }
        assert_eq!(tenant_of("acme/user-42"), "acme");
        assert_eq!(tenant_of("solo"), "solo");
    }

    proptest! {
        #[test]
        fn auth_records_round_trip(r in record()) {
            let bytes = codec::encode(&r);
            prop_assert_eq!(codec::decode::<AuthRecord>("auth", &bytes).unwrap(), r);
        }

        #[test]
        fn garbage_auth_records_are_errors_not_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = codec::decode::<AuthRecord>("auth", &bytes);
            let _ = codec::decode::<KeyRecord>("auth", &bytes);
            let _ = codec::decode::<Role>("auth", &bytes);
        }

        #[test]
        fn truncated_auth_records_are_refused(r in record(), cut in 0usize..4096) {
            let bytes = codec::encode(&r);
            let cut = cut % bytes.len();
            prop_assert!(codec::decode::<AuthRecord>("auth", &bytes[..cut]).is_err());
        }
    }
}
