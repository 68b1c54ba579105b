//! Who may do what. Identity comes from the transport or a bearer credential, checked once per
//! request in the listener's layer ([`layer`]); authorization is one function over replicated
//! grants ([`policy`]); handlers receive the authenticated [`Caller`] and ask [`Authorizer`]
//! about the namespace they touch (the namespace is inside the message, which the layer does
//! not decode).
//!
//! * [`token`] — API keys (`egk_…`, shown once, stored as hashes) and bearer headers.
//! * [`jwt`] — JWTs from an external issuer (HS256 / RS256 / EdDSA), claims mapped to roles.
//! * [`records`] — the replicated auth state: keys, roles, grants, quotas.
//! * [`policy`] — namespace patterns and the authorization decision.
//! * [`identity`] / [`certs`] — node identities in certificates; making a cluster's certificates.
//! * [`layer`] — the tower layers of the API and peer listeners (authenticate, admit, audit).
//! * [`limits`] — per-principal and per-namespace rate limits.
//! * [`audit`] — the audit trail of denials and admin actions.

pub mod audit;
pub mod certs;
pub mod identity;
pub mod jwt;
pub mod layer;
pub mod limits;
pub mod policy;
pub mod records;
pub mod token;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::storage::StateReader;
use policy::Access;
use records::{KeyRecord, Permission, Role};
use token::KeyId;

/// The principal a replicated write is made for (it travels in the log entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Principal {
    /// An API key; its name and roles are looked up in the state at each use.
    Key { id: KeyId },
    /// A verified JWT: subject, role names, and expiry (Unix ms).
    Token { subject: String, roles: Vec<String>, expires_at_ms: u64 },
}

/// The authenticated caller of one request, as the layer put it into the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// `None`: the node runs `--insecure` and everyone may do everything.
    pub principal: Option<Principal>,
    /// The principal's name (key name or JWT subject); tag grants may refer to it.
    pub name: String,
}

impl Caller {
    pub fn insecure() -> Caller {
        Caller { principal: None, name: String::new() }
    }

    /// The caller of a tonic request; a request that bypassed the layer has none.
    pub fn of<T>(req: &tonic::Request<T>) -> Result<Caller, ApiError> {
        req.extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| ApiError::Unauthenticated { reason: "no credentials".into() })
    }

    /// For logs and audit events.
    pub fn display(&self) -> String {
        match &self.principal {
            None => "insecure".into(),
            Some(Principal::Key { id }) => format!("key:{id}({})", self.name),
            Some(Principal::Token { subject, .. }) => format!("jwt:{subject}"),
        }
    }
}

/// Authorization against the local replicated state, through a cache of keys and roles that
/// is dropped whenever the state machine commits an auth change (its generation moves).
#[derive(Clone)]
pub struct Authorizer {
    reader: StateReader,
    generation: Arc<AtomicU64>,
    cache: Arc<Mutex<AuthCache>>,
}

/// A key's record with the roles it names.
pub type KeyWithRoles = (KeyRecord, Arc<Vec<Role>>);

/// Keys and role sets as of one generation. Only keys that exist are cached, so unknown ids
/// cannot grow it; it is emptied past [`MAX_CACHED`] entries.
#[derive(Default)]
struct AuthCache {
    generation: u64,
    keys: HashMap<KeyId, KeyWithRoles>,
    roles: HashMap<Vec<String>, Arc<Vec<Role>>>,
}

const MAX_CACHED: usize = 100_000;

fn unauthenticated() -> ApiError {
    ApiError::Unauthenticated { reason: "invalid, revoked or expired credentials".into() }
}

fn storage(e: crate::error::StorageError) -> ApiError {
    ApiError::Internal(e.to_string())
}

impl Authorizer {
    /// `generation` is the state machine's [`auth_generation`](crate::raft::StateMachineStore::auth_generation).
    pub fn new(reader: StateReader, generation: Arc<AtomicU64>) -> Self {
        Authorizer { reader, generation, cache: Arc::default() }
    }

    /// The cache, emptied if the auth state moved on. The generation is read before the
    /// state, so what is cached is never older than the generation it is filed under.
    fn cache(&self) -> std::sync::MutexGuard<'_, AuthCache> {
        let now = self.generation.load(Ordering::SeqCst);
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if c.generation != now || c.keys.len() + c.roles.len() > MAX_CACHED {
            *c = AuthCache { generation: now, ..Default::default() };
        }
        c
    }

    /// A key's record and the roles it names, as the local state has them.
    pub fn key(&self, id: &KeyId) -> Result<Option<KeyWithRoles>, ApiError> {
        let generation = self.generation.load(Ordering::SeqCst);
        if let Some(hit) = self.cache().keys.get(id) {
            return Ok(Some(hit.clone()));
        }
        let Some(rec) = self.reader.key(id).map_err(storage)? else { return Ok(None) };
        let roles = Arc::new(self.reader.roles(&rec.roles).map_err(storage)?);
        let mut c = self.cache();
        if c.generation == generation {
            c.keys.insert(*id, (rec.clone(), roles.clone()));
        }
        Ok(Some((rec, roles)))
    }

    fn named_roles(&self, names: &[String]) -> Result<Arc<Vec<Role>>, ApiError> {
        let generation = self.generation.load(Ordering::SeqCst);
        if let Some(hit) = self.cache().roles.get(names) {
            return Ok(hit.clone());
        }
        let roles = Arc::new(self.reader.roles(names).map_err(storage)?);
        let mut c = self.cache();
        if c.generation == generation {
            c.roles.insert(names.to_vec(), roles.clone());
        }
        Ok(roles)
    }

    /// The caller's roles now, or UNAUTHENTICATED if its key stopped working.
    pub fn roles(&self, caller: &Caller, now_ms: u64) -> Result<Arc<Vec<Role>>, ApiError> {
        match &caller.principal {
            None => Ok(Arc::new(vec![Role::root()])),
            Some(Principal::Key { id }) => {
                let (rec, roles) = self.key(id)?.ok_or_else(unauthenticated)?;
                if !rec.usable_at(now_ms) {
                    return Err(unauthenticated());
                }
                Ok(roles)
            }
            Some(Principal::Token { roles, expires_at_ms, .. }) => {
                if *expires_at_ms <= now_ms {
                    return Err(unauthenticated());
                }
                self.named_roles(roles)
            }
        }
    }

    /// What the caller may do with `perm` in `namespace`; PERMISSION_DENIED (naming `field`)
    /// when nothing, whether or not the namespace exists.
    pub fn authorize(
        &self,
        caller: &Caller,
        perm: Permission,
        field: &str,
        namespace: &str,
    ) -> Result<Access, ApiError> {
        if caller.principal.is_none() {
            return Ok(Access::Full);
        }
        let roles = self.roles(caller, crate::memory::now_ms())?;
        policy::authorize(&roles, &caller.name, perm, namespace).ok_or_else(|| ApiError::PermissionDenied {
            field: field.into(),
            reason: format!("no grant allows {} here", perm.name()),
        })
    }

    /// A test of `perm` on any namespace for this caller, resolving its roles once (for
    /// listings that must leave out what the caller may not see).
    pub fn permits(&self, caller: &Caller, perm: Permission) -> Result<impl Fn(&str) -> bool, ApiError> {
        let roles = (caller.principal.is_some()).then(|| self.roles(caller, crate::memory::now_ms())).transpose()?;
        let name = caller.name.clone();
        Ok(move |namespace: &str| match &roles {
            None => true,
            Some(roles) => policy::authorize(roles, &name, perm, namespace).is_some(),
        })
    }

    /// Cluster administration needs `admin` on `*`.
    pub fn require_admin(&self, caller: &Caller) -> Result<(), ApiError> {
        if caller.principal.is_none() {
            return Ok(());
        }
        let roles = self.roles(caller, crate::memory::now_ms())?;
        if policy::is_cluster_admin(&roles) {
            Ok(())
        } else {
            Err(ApiError::PermissionDenied { field: "".into(), reason: "needs admin on *".into() })
        }
    }
}
