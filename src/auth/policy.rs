//! Authorization: one pure function from a principal's roles to a decision about one
//! namespace. The API layer calls it with the local replicated state (after the read barrier
//! for reads); `apply` calls it again with the state at the entry's log index, so a write
//! proposed just before a revocation applied is refused on every node alike.
//!
//! Namespace patterns, segment by segment (`/`-separated):
//!
//! | pattern | matches |
//! |---|---|
//! | `*` | every namespace |
//! | `acme/*` | every namespace below `acme/` (any depth), not `acme` itself |
//! | `acme/*/notes` | `acme/<one segment>/notes` |
//! | `acme/user-42` | exactly that namespace |

use std::collections::BTreeSet;

use super::records::{Grant, Permission, Role, PRINCIPAL_PLACEHOLDER, ROOT_ROLE};
use crate::error::ApiError;

/// What a principal may see or change in one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Everything the permission covers.
    Full,
    /// Only memories carrying at least one of these `(key, value)` tags.
    Tagged(BTreeSet<(String, String)>),
}

impl Access {
    /// Whether a memory with these tags is inside the access scope.
    pub fn covers(&self, tags: &std::collections::BTreeMap<String, String>) -> bool {
        match self {
            Access::Full => true,
            Access::Tagged(allowed) => allowed.iter().any(|(k, v)| tags.get(k) == Some(v)),
        }
    }
}

/// Whether `pattern` (see the module doc) matches `namespace`.
pub fn matches(pattern: &str, namespace: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let pat: Vec<&str> = pattern.split('/').collect();
    let ns: Vec<&str> = namespace.split('/').collect();
    for (i, p) in pat.iter().enumerate() {
        let last = i + 1 == pat.len();
        match (*p, ns.get(i)) {
            (_, None) => return false,
            ("*", Some(_)) if last => return true,
            ("*", Some(_)) => {}
            (lit, Some(seg)) if lit == *seg => {}
            _ => return false,
        }
    }
    pat.len() == ns.len()
}

/// Patterns are `*` or namespaces whose segments may each be `*`.
pub fn validate_pattern(field: &str, pattern: &str) -> Result<(), ApiError> {
    if pattern == "*" {
        return Ok(());
    }
    let literal: String = pattern.split('/').map(|s| if s == "*" { "x" } else { s }).collect::<Vec<_>>().join("/");
    crate::memory::validate_namespace(&literal).map_err(|e| match e {
        ApiError::InvalidArgument { reason, .. } => ApiError::invalid(field, reason),
        other => other,
    })
}

/// The grants of `roles` that give `perm` on `namespace`, with `$principal` filled in.
fn matching<'a>(
    roles: &'a [Role],
    principal: &'a str,
    perm: Permission,
    namespace: &'a str,
) -> impl Iterator<Item = (&'a Grant, Option<(String, String)>)> + 'a {
    roles
        .iter()
        .flat_map(|r| r.grants.iter())
        .filter(move |g| g.permissions.allows(perm) && matches(&g.namespace, namespace))
        .map(move |g| {
            let tag = g.tag.as_ref().map(|(k, v)| {
                let v = if v == PRINCIPAL_PLACEHOLDER { principal.to_string() } else { v.clone() };
                (k.clone(), v)
            });
            (g, tag)
        })
}

/// The decision: `None` when no grant allows `perm` on `namespace`.
pub fn authorize(roles: &[Role], principal: &str, perm: Permission, namespace: &str) -> Option<Access> {
    let mut tags = BTreeSet::new();
    let mut any = false;
    for (_, tag) in matching(roles, principal, perm, namespace) {
        any = true;
        match tag {
            None => return Some(Access::Full),
            Some(t) => {
                tags.insert(t);
            }
        }
    }
    any.then_some(Access::Tagged(tags))
}

/// Cluster administration (admin RPCs, keys, roles, quotas): `admin` on `*`, untagged.
pub fn is_cluster_admin(roles: &[Role]) -> bool {
    roles
        .iter()
        .flat_map(|r| r.grants.iter())
        .any(|g| g.namespace == "*" && g.tag.is_none() && g.permissions.contains(Permission::Admin))
}

/// The role records a key's role names refer to; unknown names grant nothing.
pub fn resolve_roles(names: &[String], mut lookup: impl FnMut(&str) -> Option<Role>) -> Vec<Role> {
    names.iter().filter_map(|n| if n == ROOT_ROLE { Some(Role::root()) } else { lookup(n) }).collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::auth::records::Permissions;

    fn role(grants: Vec<Grant>) -> Role {
        Role { name: "r".into(), grants, created_at_ms: 0 }
    }

    fn grant(ns: &str, perms: &[Permission], tag: Option<(&str, &str)>) -> Grant {
        Grant {
            namespace: ns.into(),
            permissions: Permissions::of(perms),
            tag: tag.map(|(k, v)| (k.to_string(), v.to_string())),
        }
    }

    #[test]
    fn patterns_mean_what_they_say() {
        assert!(matches("*", "anything/at/all"));
        assert!(matches("acme/*", "acme/user-42"));
        assert!(matches("acme/*", "acme/user-42/notes"));
        assert!(!matches("acme/*", "acme"));
        assert!(!matches("acme/*", "acmecorp/x"));
        assert!(!matches("acme/*", "other/acme"));
        assert!(matches("acme/*/notes", "acme/u1/notes"));
        assert!(!matches("acme/*/notes", "acme/u1/x/notes"));
        assert!(matches("acme/user-42", "acme/user-42"));
        assert!(!matches("acme/user-42", "acme/user-42/x"));
        for bad in ["", "acme/", "a//b", "a/../b", "a/./b", "A/b", "**", "a/**"] {
            assert!(validate_pattern("p", bad).is_err(), "{bad:?} accepted");
        }
        for good in ["*", "acme/*", "acme/*/notes", "acme/user-42"] {
            assert!(validate_pattern("p", good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn decisions() {
        let rw = [Permission::Read, Permission::Write];
        let roles = vec![role(vec![grant("acme/*", &rw, None)])];
        assert_eq!(authorize(&roles, "k", Permission::Read, "acme/a"), Some(Access::Full));
        assert_eq!(authorize(&roles, "k", Permission::Delete, "acme/a"), None);
        assert_eq!(authorize(&roles, "k", Permission::Read, "other/a"), None);
        assert!(!is_cluster_admin(&roles));
        assert!(is_cluster_admin(&[Role::root()]));

        let tagged = vec![role(vec![grant("acme/*", &[Permission::Read], Some(("agent", "$principal")))])];
        let want: BTreeSet<_> = [("agent".to_string(), "bot-1".to_string())].into();
        assert_eq!(authorize(&tagged, "bot-1", Permission::Read, "acme/a"), Some(Access::Tagged(want)));
        // A full grant beside a tagged one wins.
        let both = vec![tagged[0].clone(), roles[0].clone()];
        assert_eq!(authorize(&both, "bot-1", Permission::Read, "acme/a"), Some(Access::Full));
        // A scoped admin is no cluster admin.
        assert!(!is_cluster_admin(&[role(vec![grant("acme/*", &[Permission::Admin], None)])]));
        assert!(!is_cluster_admin(&[role(vec![grant("*", &[Permission::Admin], Some(("a", "b")))])]));
    }

    proptest! {
        #[test]
        fn a_prefix_grant_never_reaches_outside_its_prefix(
            tenant in "[a-z]{1,6}", other in "[a-z]{1,6}", rest in "(/[a-z0-9_-]{1,6}){1,4}"
        ) {
            prop_assume!(tenant != other);
            let pattern = format!("{tenant}/*");
            let inside = format!("{tenant}{rest}");
            let outside = format!("{other}{rest}");
            prop_assert!(matches(&pattern, &inside));
            prop_assert!(!matches(&pattern, &outside));
            prop_assert!(!matches(&pattern, &tenant));
        }

        #[test]
        fn matching_never_panics(p in ".{0,40}", n in ".{0,40}") {
            let _ = matches(&p, &n);
            let _ = validate_pattern("p", &p);
        }
    }
}
