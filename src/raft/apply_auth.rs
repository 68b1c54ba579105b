//! The auth side of `apply`: who a command's principal is at the entry's log index and time,
//! whether its grants allow the op, and the ops that change keys, roles and quotas. Pure
//! functions of the state and the command, like the rest of `apply`.

use redb::WriteTransaction;

use super::types::{Command, Op, Outcome, Rejection};
use crate::auth::policy::{self, Access};
use crate::auth::records::{Permission, Role, ROOT_ROLE};
use crate::auth::Principal;
use crate::error::StorageError;
use crate::storage::{auth as rows, AUTH_KEYS, AUTH_ROLES};

/// The principal of a command as the state knows it at the entry.
pub(crate) struct Who {
    /// Scopes idempotency keys; empty for the node itself or an insecure node.
    pub name: String,
    /// `None`: unrestricted (the node itself, an insecure node).
    pub roles: Option<Vec<Role>>,
}

fn unauthenticated(reason: &str) -> Rejection {
    Rejection::Unauthenticated { reason: reason.into() }
}

/// The command's principal, refused if its key is unknown, revoked or expired at `now_ms` (the
/// proposing leader's clock, in the entry).
pub(crate) fn authenticate(txn: &WriteTransaction, cmd: &Command) -> Result<Result<Who, Rejection>, StorageError> {
    match &cmd.principal {
        None => Ok(Ok(Who { name: String::new(), roles: None })),
        Some(Principal::Key { id }) => {
            let Some(rec) = rows::key(&txn.open_table(AUTH_KEYS)?, id)? else {
                return Ok(Err(unauthenticated("unknown key")));
            };
            if !rec.usable_at(cmd.now_ms) {
                return Ok(Err(unauthenticated("the key is revoked or expired")));
            }
            let roles = rows::roles(&txn.open_table(AUTH_ROLES)?, &rec.roles)?;
            Ok(Ok(Who { name: rec.name, roles: Some(roles) }))
        }
        Some(Principal::Token { subject, roles, expires_at_ms }) => {
            if *expires_at_ms <= cmd.now_ms {
                return Ok(Err(unauthenticated("the token has expired")));
            }
            let roles = rows::roles(&txn.open_table(AUTH_ROLES)?, roles)?;
            Ok(Ok(Who { name: subject.clone(), roles: Some(roles) }))
        }
    }
}

/// Whether `who` may run `op`, and within which scope.
pub(crate) fn authorize(who: &Who, op: &Op) -> Result<Access, Rejection> {
    let Some(roles) = &who.roles else { return Ok(Access::Full) };
    let denied = |field: &str, perm: Permission| Rejection::PermissionDenied {
        field: field.into(),
        reason: format!("no grant allows {} here", perm.name()),
    };
    let on = |perm: Permission, namespace: &str| {
        policy::authorize(roles, &who.name, perm, namespace).ok_or_else(|| denied("namespace", perm))
    };
    let full = |a: Access, perm: Permission| match a {
        Access::Full => Ok(Access::Full),
        Access::Tagged(_) => Err(denied("namespace", perm)),
    };
    match op {
        Op::CreateNamespace { namespace, .. } | Op::Put { namespace, .. } | Op::PutChecked { namespace, .. } => {
            on(Permission::Write, namespace)
        }
        // A policy governs everyone's memories in the namespace: admin on all of it.
        Op::DefineNamespace { namespace, .. } | Op::SetPolicy { namespace, .. } => {
            full(on(Permission::Admin, namespace)?, Permission::Admin)
        }
        // Consolidation rewrites and removes memories: write and delete on all of it.
        Op::Consolidate { namespace, .. } => {
            full(on(Permission::Write, namespace)?, Permission::Write)?;
            full(on(Permission::Delete, namespace)?, Permission::Delete)
        }
        Op::Delete { namespace, .. } => on(Permission::Delete, namespace),
        // Erasing a namespace erases everyone's memories in it: a tag scope is not enough.
        Op::DeleteNamespace { namespace } => match on(Permission::Delete, namespace)? {
            Access::Full => Ok(Access::Full),
            Access::Tagged(_) => Err(denied("namespace", Permission::Delete)),
        },
        // Every other op is cluster-level (no namespace): a new op fails closed, needing admin.
        _ => {
            if policy::is_cluster_admin(roles) {
                Ok(Access::Full)
            } else {
                Err(denied("", Permission::Admin))
            }
        }
    }
}

fn load_role(txn: &WriteTransaction, name: &str) -> Result<Option<Role>, StorageError> {
    rows::role(&txn.open_table(AUTH_ROLES)?, name)
}

fn rejected(r: Rejection) -> Result<Outcome, StorageError> {
    Ok(Outcome::Rejected(r))
}

/// Keys, roles and quotas.
pub(crate) fn apply_admin(txn: &WriteTransaction, now_ms: u64, op: &Op) -> Result<Outcome, StorageError> {
    match op {
        Op::CreateKey { record } => {
            if rows::key(&txn.open_table(AUTH_KEYS)?, &record.id)?.is_some() {
                return rejected(Rejection::AuthExists { what: format!("key {}", record.id) });
            }
            rows::put_key(txn, record)?;
            Ok(Outcome::KeyCreated { id: record.id })
        }
        Op::BootstrapRootKey { record } => {
            if rows::has_root_key(&txn.open_table(AUTH_KEYS)?)? {
                return rejected(Rejection::AuthExists { what: "a root key".into() });
            }
            rows::put_key(txn, record)?;
            Ok(Outcome::KeyCreated { id: record.id })
        }
        Op::RevokeKey { id } => {
            let current = rows::key(&txn.open_table(AUTH_KEYS)?, id)?;
            match current {
                Some(mut rec) => {
                    if rec.revoked_at_ms.is_none() {
                        rec.revoked_at_ms = Some(now_ms);
                        rows::put_key(txn, &rec)?;
                    }
                    Ok(Outcome::KeyRevoked { existed: true })
                }
                None => Ok(Outcome::KeyRevoked { existed: false }),
            }
        }
        Op::CreateRole { name } => {
            if name == ROOT_ROLE || load_role(txn, name)?.is_some() {
                return rejected(Rejection::AuthExists { what: format!("role {name:?}") });
            }
            let role = Role { name: name.clone(), grants: vec![], created_at_ms: now_ms };
            rows::put_role(txn, &role)?;
            Ok(Outcome::Role(role))
        }
        Op::DeleteRole { name } => {
            let existed = name != ROOT_ROLE && txn.open_table(AUTH_ROLES)?.remove(name.as_str())?.is_some();
            Ok(Outcome::RoleDeleted { existed })
        }
        Op::GrantRole { role, grant } => {
            let Some(mut r) = load_role(txn, role)? else {
                return rejected(Rejection::AuthNotFound { what: format!("role {role:?}") });
            };
            if !r.grants.contains(grant) {
                r.grants.push(grant.clone());
                rows::put_role(txn, &r)?;
            }
            Ok(Outcome::Role(r))
        }
        Op::RevokeGrant { role, namespace } => {
            let Some(mut r) = load_role(txn, role)? else {
                return rejected(Rejection::AuthNotFound { what: format!("role {role:?}") });
            };
            r.grants.retain(|g| &g.namespace != namespace);
            rows::put_role(txn, &r)?;
            Ok(Outcome::Role(r))
        }
        Op::SetQuota { tenant, quota } => {
            rows::put_quota(txn, tenant, quota)?;
            Ok(Outcome::QuotaSet)
        }
        Op::CreateNamespace { .. }
        | Op::Put { .. }
        | Op::PutChecked { .. }
        | Op::Delete { .. }
        | Op::DeleteNamespace { .. }
        | Op::SetClusterId { .. }
        | Op::DefineNamespace { .. }
        | Op::SetPolicy { .. }
        | Op::Purge { .. }
        | Op::Retire { .. }
        | Op::Consolidate { .. }
        | Op::Reinforce { .. }
        | Op::Mark { .. }
        | Op::RestoreNamespace { .. }
        | Op::RestoreMemories { .. }
        | Op::Sealed { .. }
        | Op::RewrapDataKeys { .. } => unreachable!("memory ops, data keys and marks are applied by apply::run"),
    }
}
