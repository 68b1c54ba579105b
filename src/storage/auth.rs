//! Reading and writing auth rows, in read and write transactions alike (one codec, one place).

use redb::{ReadableTable, WriteTransaction};

use super::{codec, AUTH_KEYS, AUTH_ROLES, QUOTAS};
use crate::auth::policy::resolve_roles;
use crate::auth::records::{KeyRecord, Quota, Role, DEFAULT_QUOTA_TENANT};
use crate::auth::token::KeyId;
use crate::error::StorageError;

pub fn key<T: ReadableTable<&'static str, &'static [u8]>>(
    t: &T,
    id: &KeyId,
) -> Result<Option<KeyRecord>, StorageError> {
    t.get(id.to_string().as_str())?.map(|v| codec::decode_row("auth_keys", v.value())).transpose()
}

pub fn role<T: ReadableTable<&'static str, &'static [u8]>>(t: &T, name: &str) -> Result<Option<Role>, StorageError> {
    t.get(name)?.map(|v| codec::decode_row("auth_roles", v.value())).transpose()
}

/// The role records `names` refer to (`root` built in; unknown names grant nothing).
pub fn roles<T: ReadableTable<&'static str, &'static [u8]>>(
    t: &T,
    names: &[String],
) -> Result<Vec<Role>, StorageError> {
    let mut err = None;
    let out = resolve_roles(names, |n| match role(t, n) {
        Ok(r) => r,
        Err(e) => {
            err = Some(e);
            None
        }
    });
    match err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// Whether any key speaks for the root role (the cluster has been claimed).
pub fn has_root_key<T: ReadableTable<&'static str, &'static [u8]>>(t: &T) -> Result<bool, StorageError> {
    let keys: Vec<(String, KeyRecord)> = all(t, "auth_keys")?;
    Ok(keys.iter().any(|(_, k)| k.roles.iter().any(|r| r == crate::auth::records::ROOT_ROLE)))
}

/// The quota that applies to `tenant`: its own row, else the `*` row, else none.
pub fn quota<T: ReadableTable<&'static str, &'static [u8]>>(t: &T, tenant: &str) -> Result<Quota, StorageError> {
    for name in [tenant, DEFAULT_QUOTA_TENANT] {
        if let Some(v) = t.get(name)? {
            return codec::decode_row("quotas", v.value());
        }
    }
    Ok(Quota::default())
}

pub fn put_key(txn: &WriteTransaction, rec: &KeyRecord) -> Result<(), StorageError> {
    txn.open_table(AUTH_KEYS)?.insert(rec.id.to_string().as_str(), codec::encode_row(rec).as_slice())?;
    Ok(())
}

pub fn put_role(txn: &WriteTransaction, role: &Role) -> Result<(), StorageError> {
    txn.open_table(AUTH_ROLES)?.insert(role.name.as_str(), codec::encode_row(role).as_slice())?;
    Ok(())
}

pub fn put_quota(txn: &WriteTransaction, tenant: &str, q: &Quota) -> Result<(), StorageError> {
    let mut t = txn.open_table(QUOTAS)?;
    if *q == Quota::default() {
        t.remove(tenant)?;
    } else {
        t.insert(tenant, codec::encode_row(q).as_slice())?;
    }
    Ok(())
}

/// Every row of an auth table, decoded.
pub fn all<V: serde::de::DeserializeOwned, T: ReadableTable<&'static str, &'static [u8]>>(
    t: &T,
    what: &'static str,
) -> Result<Vec<(String, V)>, StorageError> {
    let mut out = Vec::new();
    for item in t.iter()? {
        let (k, v) = item?;
        out.push((k.value().to_string(), codec::decode_row(what, v.value())?));
    }
    Ok(out)
}
