//! Proto ↔ domain conversions. Incoming messages are destructured exhaustively, so a new
//! proto field fails to compile until it is handled here.

use crate::error::ApiError;
use crate::memory::{Memory, MemoryInput, Metric, NamespaceInfo, Precondition, DEFAULT_IMPORTANCE};
use crate::proto as pb;
use crate::raft::node::ReadConsistency;
use crate::raft::{EngramNode, NodeId};

pub fn memory_input(prefix: &str, m: Option<pb::MemoryInput>) -> Result<MemoryInput, ApiError> {
    let pb::MemoryInput { id, text, embedding, tags, importance, expires_at_ms } =
        m.ok_or_else(|| ApiError::invalid(prefix, "is required"))?;
    if importance.is_some_and(|i| !i.is_finite()) {
        return Err(ApiError::invalid(format!("{prefix}.importance"), "must be a number in [0, 1]"));
    }
    Ok(MemoryInput {
        id,
        text,
        embedding,
        tags: tags.into_iter().collect(),
        importance: importance.unwrap_or(DEFAULT_IMPORTANCE),
        expires_at_ms: (expires_at_ms != 0).then_some(expires_at_ms),
    })
}

pub fn precondition(p: Option<pb::Precondition>) -> Precondition {
    use pb::precondition::Condition;
    match p.and_then(|pb::Precondition { condition }| condition) {
        None | Some(Condition::IfAbsent(false)) => Precondition::None,
        Some(Condition::IfAbsent(true)) => Precondition::Absent,
        Some(Condition::IfRevision(r)) => Precondition::Revision(r),
    }
}

/// Longest idempotency key accepted.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;

pub fn idempotency_key(o: Option<pb::WriteOptions>) -> Result<Option<String>, ApiError> {
    let key = o.map(|pb::WriteOptions { idempotency_key }| idempotency_key).unwrap_or_default();
    if key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
        return Err(ApiError::invalid(
            "options.idempotency_key",
            format!("longer than {MAX_IDEMPOTENCY_KEY_BYTES} bytes"),
        ));
    }
    Ok((!key.is_empty()).then_some(key))
}

/// The idempotency key with the fingerprint of the request it comes with: what the client
/// asked for (as decoded, before the leader stamped anything), so a retry matches and a reuse
/// for another request does not.
pub fn idempotency<T: serde::Serialize>(
    o: Option<pb::WriteOptions>,
    what: &str,
    request: &T,
) -> Result<Option<crate::raft::Idempotency>, ApiError> {
    Ok(idempotency_key(o)?.map(|key| {
        let mut h = blake3::Hasher::new_derive_key("engram request fingerprint v1");
        h.update(what.as_bytes());
        h.update(&crate::storage::codec::encode(request));
        crate::raft::Idempotency { key, fingerprint: *h.finalize().as_bytes() }
    }))
}

pub fn consistency(c: i32) -> Result<ReadConsistency, ApiError> {
    match pb::Consistency::try_from(c) {
        Ok(pb::Consistency::Linearizable) => Ok(ReadConsistency::Linearizable),
        Ok(pb::Consistency::Lease) => Ok(ReadConsistency::Lease),
        Ok(pb::Consistency::Stale) => Ok(ReadConsistency::Stale),
        Err(_) => Err(ApiError::invalid("consistency", format!("unknown value {c}"))),
    }
}

pub fn metric_from_pb(m: i32) -> Result<Metric, ApiError> {
    match pb::Metric::try_from(m) {
        Ok(pb::Metric::Unspecified) | Ok(pb::Metric::Cosine) => Ok(Metric::Cosine),
        Ok(pb::Metric::L2) => Ok(Metric::L2),
        Ok(pb::Metric::InnerProduct) => Ok(Metric::InnerProduct),
        Err(_) => Err(ApiError::invalid("metric", format!("unknown value {m}"))),
    }
}

pub fn metric_to_pb(m: Metric) -> pb::Metric {
    match m {
        Metric::Cosine => pb::Metric::Cosine,
        Metric::L2 => pb::Metric::L2,
        Metric::InnerProduct => pb::Metric::InnerProduct,
    }
}

pub fn namespace_to_pb(n: NamespaceInfo) -> pb::NamespaceInfo {
    let NamespaceInfo { name, dimension, metric, memory_count, created_at_ms, index: _, ivf_min_vectors: _, bytes: _ } =
        n;
    pb::NamespaceInfo { namespace: name, dimension, metric: metric_to_pb(metric) as i32, memory_count, created_at_ms }
}

pub fn memory_to_pb(m: Memory) -> pb::Memory {
    let Memory {
        namespace,
        id,
        text,
        embedding,
        tags,
        importance,
        created_at_ms,
        updated_at_ms,
        last_accessed_at_ms,
        expires_at_ms,
        content_hash,
        revision,
    } = m;
    pb::Memory {
        namespace,
        id,
        text,
        embedding,
        tags: tags.into_iter().collect(),
        importance,
        created_at_ms,
        updated_at_ms,
        last_accessed_at_ms,
        expires_at_ms: expires_at_ms.unwrap_or(0),
        content_hash: content_hash.to_vec(),
        revision,
    }
}

pub fn node_from_pb(field: &str, n: Option<pb::NodeInfo>) -> Result<(NodeId, EngramNode), ApiError> {
    let pb::NodeInfo { id, raft_addr, api_addr } = n.ok_or_else(|| ApiError::invalid(field, "is required"))?;
    if id == 0 {
        return Err(ApiError::invalid(format!("{field}.id"), "node ids start at 1"));
    }
    for (name, addr) in [("raft_addr", &raft_addr), ("api_addr", &api_addr)] {
        if addr
            .rsplit_once(':')
            .and_then(|(h, p)| (!h.is_empty()).then_some(p))
            .and_then(|p| p.parse::<u16>().ok())
            .is_none()
        {
            return Err(ApiError::invalid(format!("{field}.{name}"), format!("{addr:?} is not host:port")));
        }
    }
    Ok((id, EngramNode { raft_addr, api_addr }))
}

pub fn node_to_pb(id: NodeId, n: &EngramNode) -> pb::NodeInfo {
    pb::NodeInfo { id, raft_addr: n.raft_addr.clone(), api_addr: n.api_addr.clone() }
}

/// Page tokens are opaque to clients: hex of `v1:` + the last id returned.
pub fn encode_page_token(after: &str) -> String {
    format!("v1:{after}").bytes().map(|b| format!("{b:02x}")).collect()
}

pub fn decode_page_token(token: &str) -> Result<Option<String>, ApiError> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || ApiError::invalid("page_token", "malformed; pass back a next_page_token unchanged");
    if !token.is_ascii() || !token.len().is_multiple_of(2) || token.len() > 512 {
        return Err(bad());
    }
    let bytes: Vec<u8> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&token[i..i + 2], 16).map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let s = String::from_utf8(bytes).map_err(|_| bad())?;
    let id = s.strip_prefix("v1:").ok_or_else(bad)?;
    crate::memory::validate_id("page_token", id).map_err(|_| bad())?;
    Ok(Some(id.to_string()))
}

/// Validates a search filter; every error names its field under `filter.`.
pub fn search_filter(f: Option<pb::SearchFilter>) -> Result<crate::vector::Filter, ApiError> {
    let Some(pb::SearchFilter { tags, tag_in, created_after_ms, created_before_ms, min_importance }) = f else {
        return Ok(crate::vector::Filter::default());
    };
    if tags.keys().any(|k| k.is_empty()) {
        return Err(ApiError::invalid("filter.tags", "tag keys must not be empty"));
    }
    let mut tag_in_out = Vec::with_capacity(tag_in.len());
    for (i, pb::TagIn { key, values }) in tag_in.into_iter().enumerate() {
        if key.is_empty() {
            return Err(ApiError::invalid(format!("filter.tag_in[{i}].key"), "must not be empty"));
        }
        if values.is_empty() {
            return Err(ApiError::invalid(format!("filter.tag_in[{i}].values"), "must not be empty"));
        }
        tag_in_out.push((key, values));
    }
    if created_after_ms != 0 && created_before_ms != 0 && created_after_ms >= created_before_ms {
        return Err(ApiError::invalid("filter.created_before_ms", "must be after created_after_ms"));
    }
    if let Some(i) = min_importance {
        if !(0.0..=1.0).contains(&i) {
            return Err(ApiError::invalid("filter.min_importance", "must be a number in [0, 1]"));
        }
    }
    let mut tags: Vec<(String, String)> = tags.into_iter().collect();
    tags.sort();
    Ok(crate::vector::Filter {
        tags,
        tag_in: tag_in_out,
        created_after_ms: (created_after_ms != 0).then_some(created_after_ms),
        created_before_ms: (created_before_ms != 0).then_some(created_before_ms),
        min_importance,
        scope: None,
    })
}

/// A grant as a client wrote it, checked.
pub fn grant_from_pb(field: &str, g: Option<pb::Grant>) -> Result<crate::auth::records::Grant, ApiError> {
    use crate::auth::records::{Grant, Permission, Permissions};
    let pb::Grant { namespace, permissions, tag_key, tag_value } =
        g.ok_or_else(|| ApiError::invalid(field, "is required"))?;
    let mut perms = Vec::with_capacity(permissions.len());
    for (i, p) in permissions.iter().enumerate() {
        perms.push(Permission::parse(p).ok_or_else(|| {
            ApiError::invalid(format!("{field}.permissions[{i}]"), "one of read, write, delete, admin")
        })?);
    }
    let tag = match (tag_key.is_empty(), tag_value.is_empty()) {
        (true, true) => None,
        (false, _) => Some((tag_key, tag_value)),
        (true, false) => return Err(ApiError::invalid(format!("{field}.tag_key"), "a tag value needs a key")),
    };
    let g = Grant { namespace, permissions: Permissions::of(&perms), tag };
    crate::auth::records::validate_grant(field, &g)?;
    Ok(g)
}

pub fn grant_to_pb(g: &crate::auth::records::Grant) -> pb::Grant {
    let (tag_key, tag_value) = g.tag.clone().unwrap_or_default();
    pb::Grant {
        namespace: g.namespace.clone(),
        permissions: g.permissions.names().into_iter().map(String::from).collect(),
        tag_key,
        tag_value,
    }
}

pub fn role_to_pb(r: &crate::auth::records::Role) -> pb::Role {
    pb::Role {
        name: r.name.clone(),
        grants: r.grants.iter().map(grant_to_pb).collect(),
        created_at_ms: r.created_at_ms,
    }
}

pub fn key_to_pb(k: &crate::auth::records::KeyRecord) -> pb::KeyInfo {
    pb::KeyInfo {
        id: k.id.to_string(),
        name: k.name.clone(),
        roles: k.roles.clone(),
        created_at_ms: k.created_at_ms,
        expires_at_ms: k.expires_at_ms.unwrap_or(0),
        revoked_at_ms: k.revoked_at_ms.unwrap_or(0),
    }
}

pub fn quota_from_pb(q: Option<pb::Quota>) -> crate::auth::records::Quota {
    let pb::Quota { max_namespaces, max_memories_per_namespace, max_bytes_per_namespace } = q.unwrap_or_default();
    crate::auth::records::Quota { max_namespaces, max_memories_per_namespace, max_bytes_per_namespace }
}

pub fn quota_to_pb(q: &crate::auth::records::Quota) -> pb::Quota {
    pb::Quota {
        max_namespaces: q.max_namespaces,
        max_memories_per_namespace: q.max_memories_per_namespace,
        max_bytes_per_namespace: q.max_bytes_per_namespace,
    }
}
