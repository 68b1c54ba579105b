//! The SDK side of `AuthService`: keys, roles, grants, quotas, whoami. Writes carry an
//! idempotency key chosen once per call, like memory writes.

use super::connect::Svc;
use super::{timed, Client, ClientError};
use crate::proto as pb;
use crate::proto::auth_service_client::AuthServiceClient;

/// Auth administration (cluster admin), and `whoami` (any valid credential).
pub struct Auth<'a> {
    pub(super) client: &'a Client,
}

fn options() -> Option<pb::WriteOptions> {
    Some(pb::WriteOptions { idempotency_key: uuid::Uuid::now_v7().to_string() })
}

macro_rules! call {
    ($self:ident, $method:ident, $req:expr) => {{
        let req = $req;
        $self
            .client
            .call(|ch, t| {
                let r = req.clone();
                async move { AuthServiceClient::<Svc>::new(ch).$method(timed(r, t)).await }
            })
            .await
    }};
}

impl Auth<'_> {
    pub async fn whoami(&self) -> Result<pb::WhoAmIResponse, ClientError> {
        call!(self, who_am_i, pb::WhoAmIRequest {})
    }

    /// A new key for principal `name` with `roles`; `ttl_secs` 0 = no expiry. The response's
    /// `key` is the only copy of the secret.
    pub async fn create_key(
        &self,
        name: &str,
        roles: &[&str],
        ttl_secs: u64,
    ) -> Result<pb::CreateKeyResponse, ClientError> {
        call!(
            self,
            create_key,
            pb::CreateKeyRequest {
                name: name.into(),
                roles: roles.iter().map(|r| r.to_string()).collect(),
                ttl_secs,
                options: options(),
            }
        )
    }

    pub async fn list_keys(&self) -> Result<Vec<pb::KeyInfo>, ClientError> {
        call!(self, list_keys, pb::ListKeysRequest {}).map(|r| r.keys)
    }

    pub async fn revoke_key(&self, id: &str) -> Result<pb::RevokeKeyResponse, ClientError> {
        call!(self, revoke_key, pb::RevokeKeyRequest { id: id.into(), options: options() })
    }

    pub async fn create_role(&self, name: &str) -> Result<pb::RoleResponse, ClientError> {
        call!(self, create_role, pb::CreateRoleRequest { name: name.into(), options: options() })
    }

    pub async fn delete_role(&self, name: &str) -> Result<pb::DeleteRoleResponse, ClientError> {
        call!(self, delete_role, pb::DeleteRoleRequest { name: name.into(), options: options() })
    }

    /// Adds a grant: `permissions` on `namespace` (a pattern), optionally only on memories
    /// tagged `tag` (`$principal` as the value stands for the caller).
    pub async fn grant(
        &self,
        role: &str,
        namespace: &str,
        permissions: &[&str],
        tag: Option<(&str, &str)>,
    ) -> Result<pb::RoleResponse, ClientError> {
        let (tag_key, tag_value) = tag.map(|(k, v)| (k.to_string(), v.to_string())).unwrap_or_default();
        let grant = pb::Grant {
            namespace: namespace.into(),
            permissions: permissions.iter().map(|p| p.to_string()).collect(),
            tag_key,
            tag_value,
        };
        call!(self, grant_role, pb::GrantRoleRequest { role: role.into(), grant: Some(grant), options: options() })
    }

    pub async fn revoke_grant(&self, role: &str, namespace: &str) -> Result<pb::RoleResponse, ClientError> {
        call!(
            self,
            revoke_grant,
            pb::RevokeGrantRequest { role: role.into(), namespace: namespace.into(), options: options() }
        )
    }

    pub async fn list_roles(&self) -> Result<Vec<pb::Role>, ClientError> {
        call!(self, list_roles, pb::ListRolesRequest {}).map(|r| r.roles)
    }

    pub async fn set_quota(&self, tenant: &str, quota: pb::Quota) -> Result<pb::SetQuotaResponse, ClientError> {
        call!(self, set_quota, pb::SetQuotaRequest { tenant: tenant.into(), quota: Some(quota), options: options() })
    }

    pub async fn list_quotas(&self) -> Result<pb::ListQuotasResponse, ClientError> {
        call!(self, list_quotas, pb::ListQuotasRequest {})
    }
}
