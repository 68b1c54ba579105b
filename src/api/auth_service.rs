//! `AuthService`: keys, roles, grants and quotas. The API layer has already required a
//! cluster admin for every call but `WhoAmI`. Changes go through Raft (the caller's principal
//! rides along and `apply` checks it again); listings follow a read barrier.

use std::time::Instant;

use tonic::{Request, Response, Status};
use tracing::instrument;

use super::convert::{self, grant_from_pb, key_to_pb, quota_from_pb, quota_to_pb, role_to_pb};
use super::observe;
use crate::auth::records::{validate_name, KeyRecord, DEFAULT_QUOTA_TENANT, ROOT_ROLE};
use crate::auth::token::{ApiKey, KeyId};
use crate::auth::{policy, Authorizer, Caller, Principal};
use crate::error::ApiError;
use crate::proto as pb;
use crate::proto::auth_service_server::AuthService;
use crate::raft::node::ReadConsistency;
use crate::raft::{CommandResult, Op, Outcome, RaftNode};
use crate::storage::StateReader;

#[derive(Clone)]
pub struct AuthApi {
    node: RaftNode,
    reader: StateReader,
    authorizer: Authorizer,
}

fn storage(e: crate::error::StorageError) -> ApiError {
    ApiError::Internal(e.to_string())
}

impl AuthApi {
    pub fn new(node: RaftNode, reader: StateReader, authorizer: Authorizer) -> Self {
        AuthApi { node, reader, authorizer }
    }

    async fn propose(
        &self,
        caller: &Caller,
        options: Option<pb::WriteOptions>,
        what: &str,
        op: Op,
    ) -> Result<CommandResult, ApiError> {
        let idempotency = convert::idempotency(options, what, &op)?;
        super::propose(&self.node, caller, idempotency, op).await
    }

    fn role_response(res: CommandResult) -> Result<pb::RoleResponse, ApiError> {
        match res.outcome {
            Outcome::Role(r) => Ok(pb::RoleResponse { role: Some(role_to_pb(&r)), applied_index: res.index }),
            other => Err(ApiError::Internal(format!("unexpected outcome {other:?}"))),
        }
    }

    async fn whoami(&self, caller: &Caller) -> Result<pb::WhoAmIResponse, ApiError> {
        let roles = self.authorizer.roles(caller, crate::memory::now_ms())?;
        let (kind, key_id) = match &caller.principal {
            None => ("insecure", String::new()),
            Some(Principal::Key { id }) => ("key", id.to_string()),
            Some(Principal::Token { .. }) => ("jwt", String::new()),
        };
        Ok(pb::WhoAmIResponse {
            principal: caller.name.clone(),
            kind: kind.into(),
            key_id,
            cluster_admin: policy::is_cluster_admin(&roles),
            roles: roles.iter().map(role_to_pb).collect(),
        })
    }

    async fn create_key(&self, caller: &Caller, req: pb::CreateKeyRequest) -> Result<pb::CreateKeyResponse, ApiError> {
        let pb::CreateKeyRequest { name, roles, ttl_secs, options } = req;
        validate_name("name", &name)?;
        if roles.is_empty() || roles.len() > 16 {
            return Err(ApiError::invalid("roles", "name 1..=16 roles"));
        }
        for (i, r) in roles.iter().enumerate() {
            validate_name(&format!("roles[{i}]"), r)?;
            if r != ROOT_ROLE && self.reader.roles(std::slice::from_ref(r)).map_err(storage)?.is_empty() {
                return Err(ApiError::not_found(format!("role {r:?}")));
            }
        }
        if ttl_secs > 100 * 365 * 86_400 {
            return Err(ApiError::invalid("ttl_secs", "at most 100 years"));
        }
        let now = crate::memory::now_ms();
        let key = ApiKey::generate();
        let record = KeyRecord {
            id: key.id,
            name,
            roles,
            hash: key.hash(),
            created_at_ms: now,
            expires_at_ms: (ttl_secs > 0).then(|| now + ttl_secs * 1000),
            revoked_at_ms: None,
        };
        let info = key_to_pb(&record);
        // The fingerprint covers what the client asked for, not the fresh secret.
        let fp = (&record.name, &record.roles, ttl_secs);
        let idempotency = convert::idempotency(options, "create-key", &fp)?;
        let res = super::propose(&self.node, caller, idempotency, Op::CreateKey { record }).await?;
        match res.outcome {
            Outcome::KeyCreated { id } if id == key.id => {
                Ok(pb::CreateKeyResponse { key: key.expose().to_string(), info: Some(info), applied_index: res.index })
            }
            // A retry answered by the first attempt's result: that key's secret was shown then.
            Outcome::KeyCreated { id } => Err(ApiError::FailedPrecondition {
                field: "options.idempotency_key".into(),
                reason: format!("this request already created key {id}; its secret was returned then"),
                current_revision: 0,
            }),
            other => Err(ApiError::Internal(format!("unexpected outcome {other:?}"))),
        }
    }

    async fn list_keys(&self, _caller: &Caller, _req: pb::ListKeysRequest) -> Result<pb::ListKeysResponse, ApiError> {
        self.node.linearize(ReadConsistency::Linearizable).await?;
        Ok(pb::ListKeysResponse { keys: self.reader.keys().map_err(storage)?.iter().map(key_to_pb).collect() })
    }

    async fn revoke_key(&self, caller: &Caller, req: pb::RevokeKeyRequest) -> Result<pb::RevokeKeyResponse, ApiError> {
        let pb::RevokeKeyRequest { id, options } = req;
        let id: KeyId = id.parse().map_err(|_| ApiError::invalid("id", "a key id is 16 lowercase hex digits"))?;
        let res = self.propose(caller, options, "revoke-key", Op::RevokeKey { id }).await?;
        match res.outcome {
            Outcome::KeyRevoked { existed } => Ok(pb::RevokeKeyResponse { existed, applied_index: res.index }),
            other => Err(ApiError::Internal(format!("unexpected outcome {other:?}"))),
        }
    }

    async fn create_role(&self, caller: &Caller, req: pb::CreateRoleRequest) -> Result<pb::RoleResponse, ApiError> {
        let pb::CreateRoleRequest { name, options } = req;
        validate_name("name", &name)?;
        Self::role_response(self.propose(caller, options, "create-role", Op::CreateRole { name }).await?)
    }

    async fn delete_role(
        &self,
        caller: &Caller,
        req: pb::DeleteRoleRequest,
    ) -> Result<pb::DeleteRoleResponse, ApiError> {
        let pb::DeleteRoleRequest { name, options } = req;
        validate_name("name", &name)?;
        if name == ROOT_ROLE {
            return Err(ApiError::invalid("name", "the root role is built in"));
        }
        let res = self.propose(caller, options, "delete-role", Op::DeleteRole { name }).await?;
        match res.outcome {
            Outcome::RoleDeleted { existed } => Ok(pb::DeleteRoleResponse { existed, applied_index: res.index }),
            other => Err(ApiError::Internal(format!("unexpected outcome {other:?}"))),
        }
    }

    async fn grant_role(&self, caller: &Caller, req: pb::GrantRoleRequest) -> Result<pb::RoleResponse, ApiError> {
        let pb::GrantRoleRequest { role, grant, options } = req;
        validate_name("role", &role)?;
        if role == ROOT_ROLE {
            return Err(ApiError::invalid("role", "the root role is built in"));
        }
        let grant = grant_from_pb("grant", grant)?;
        Self::role_response(self.propose(caller, options, "grant", Op::GrantRole { role, grant }).await?)
    }

    async fn revoke_grant(&self, caller: &Caller, req: pb::RevokeGrantRequest) -> Result<pb::RoleResponse, ApiError> {
        let pb::RevokeGrantRequest { role, namespace, options } = req;
        validate_name("role", &role)?;
        policy::validate_pattern("namespace", &namespace)?;
        Self::role_response(self.propose(caller, options, "revoke", Op::RevokeGrant { role, namespace }).await?)
    }

    async fn list_roles(
        &self,
        _caller: &Caller,
        _req: pb::ListRolesRequest,
    ) -> Result<pb::ListRolesResponse, ApiError> {
        self.node.linearize(ReadConsistency::Linearizable).await?;
        let mut roles = vec![crate::auth::records::Role::root()];
        roles.extend(self.reader.all_roles().map_err(storage)?);
        Ok(pb::ListRolesResponse { roles: roles.iter().map(role_to_pb).collect() })
    }

    async fn set_quota(&self, caller: &Caller, req: pb::SetQuotaRequest) -> Result<pb::SetQuotaResponse, ApiError> {
        let pb::SetQuotaRequest { tenant, quota, options } = req;
        if tenant != DEFAULT_QUOTA_TENANT {
            crate::memory::validate_namespace(&tenant)
                .map_err(|_| ApiError::invalid("tenant", "a namespace's first segment, or *"))?;
            if tenant.contains('/') {
                return Err(ApiError::invalid("tenant", "a tenant is one segment"));
            }
        }
        let quota = quota_from_pb(quota);
        let res = self.propose(caller, options, "set-quota", Op::SetQuota { tenant, quota }).await?;
        Ok(pb::SetQuotaResponse { applied_index: res.index })
    }

    async fn list_quotas(
        &self,
        _caller: &Caller,
        _req: pb::ListQuotasRequest,
    ) -> Result<pb::ListQuotasResponse, ApiError> {
        self.node.linearize(ReadConsistency::Linearizable).await?;
        let quotas = self.reader.quotas().map_err(storage)?.iter().map(|(t, q)| (t.clone(), quota_to_pb(q))).collect();
        Ok(pb::ListQuotasResponse { quotas })
    }
}

#[tonic::async_trait]
impl AuthService for AuthApi {
    async fn who_am_i(&self, req: Request<pb::WhoAmIRequest>) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let started = Instant::now();
        let res = match Caller::of(&req) {
            Ok(caller) => self.whoami(&caller).await,
            Err(e) => Err(e),
        }
        .map(Response::new)
        .map_err(Status::from);
        observe("whoami", started, &res);
        res
    }

    #[instrument(skip_all, fields(name = %req.get_ref().name))]
    async fn create_key(&self, req: Request<pb::CreateKeyRequest>) -> Result<Response<pb::CreateKeyResponse>, Status> {
        handle!(self, req, "create_key", create_key)
    }

    async fn list_keys(&self, req: Request<pb::ListKeysRequest>) -> Result<Response<pb::ListKeysResponse>, Status> {
        handle!(self, req, "list_keys", list_keys)
    }

    #[instrument(skip_all, fields(id = %req.get_ref().id))]
    async fn revoke_key(&self, req: Request<pb::RevokeKeyRequest>) -> Result<Response<pb::RevokeKeyResponse>, Status> {
        handle!(self, req, "revoke_key", revoke_key)
    }

    #[instrument(skip_all, fields(name = %req.get_ref().name))]
    async fn create_role(&self, req: Request<pb::CreateRoleRequest>) -> Result<Response<pb::RoleResponse>, Status> {
        handle!(self, req, "create_role", create_role)
    }

    #[instrument(skip_all, fields(name = %req.get_ref().name))]
    async fn delete_role(
        &self,
        req: Request<pb::DeleteRoleRequest>,
    ) -> Result<Response<pb::DeleteRoleResponse>, Status> {
        handle!(self, req, "delete_role", delete_role)
    }

    #[instrument(skip_all, fields(role = %req.get_ref().role))]
    async fn grant_role(&self, req: Request<pb::GrantRoleRequest>) -> Result<Response<pb::RoleResponse>, Status> {
        handle!(self, req, "grant_role", grant_role)
    }

    #[instrument(skip_all, fields(role = %req.get_ref().role))]
    async fn revoke_grant(&self, req: Request<pb::RevokeGrantRequest>) -> Result<Response<pb::RoleResponse>, Status> {
        handle!(self, req, "revoke_grant", revoke_grant)
    }

    async fn list_roles(&self, req: Request<pb::ListRolesRequest>) -> Result<Response<pb::ListRolesResponse>, Status> {
        handle!(self, req, "list_roles", list_roles)
    }

    #[instrument(skip_all, fields(tenant = %req.get_ref().tenant))]
    async fn set_quota(&self, req: Request<pb::SetQuotaRequest>) -> Result<Response<pb::SetQuotaResponse>, Status> {
        handle!(self, req, "set_quota", set_quota)
    }

    async fn list_quotas(
        &self,
        req: Request<pb::ListQuotasRequest>,
    ) -> Result<Response<pb::ListQuotasResponse>, Status> {
        handle!(self, req, "list_quotas", list_quotas)
    }
}
