//! Proto ↔ domain conversions. Incoming messages are destructured exhaustively, so a new
//! proto field fails to compile until it is handled here.

use crate::error::ApiError;
use crate::memory::{
    policy, Memory, MemoryInput, MemoryPolicy, Metric, NamespaceInfo, NamespaceStats, Precondition, DEFAULT_IMPORTANCE,
};
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
        Ok(pb::Metric::Unspecified) => {
            Err(ApiError::invalid("metric", "must be set: METRIC_COSINE, METRIC_L2 or METRIC_INNER_PRODUCT"))
        }
        Ok(pb::Metric::Cosine) => Ok(Metric::Cosine),
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
    let NamespaceInfo {
        name,
        dimension,
        metric,
        memory_count,
        created_at_ms,
        index: _,
        approx_min_vectors: _,
        bytes: _,
    } = n;
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
        access_count,
        merge_count,
        merged_from,
        linked_to,
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
        access_count,
        merge_count,
        merged_from,
        linked_to: linked_to.unwrap_or_default(),
    }
}

pub fn decay_to_pb(d: policy::Decay) -> pb::DecayPolicy {
    let policy::Decay { half_life_ms, similarity, importance, recency, access } = d;
    pb::DecayPolicy { half_life_ms, similarity, importance, recency, access }
}

pub fn decay_from_pb(d: pb::DecayPolicy) -> policy::Decay {
    let pb::DecayPolicy { half_life_ms, similarity, importance, recency, access } = d;
    policy::Decay { half_life_ms, similarity, importance, recency, access }
}

pub fn policy_to_pb(p: MemoryPolicy) -> pb::MemoryPolicy {
    let MemoryPolicy { dedup, dedup_merge, near_duplicate, decay, default_ttl_ms, retention, gate } = p;
    let policy::Gate {
        required_tags,
        allowed_tag_keys,
        allowed_tag_values,
        min_text_bytes,
        max_text_bytes,
        min_norm,
        max_norm,
        deny_patterns,
        max_per_id_prefix,
        id_prefix_separator,
    } = gate;
    pb::MemoryPolicy {
        dedup: match dedup {
            policy::DedupMode::Off => pb::DedupMode::Off,
            policy::DedupMode::Text => pb::DedupMode::Text,
            policy::DedupMode::TextAndEmbedding => pb::DedupMode::TextAndEmbedding,
        } as i32,
        dedup_merge,
        near_duplicate: near_duplicate.map(|n| pb::NearDuplicatePolicy {
            threshold: n.threshold,
            action: match n.action {
                policy::NearAction::Reject => pb::NearAction::Reject,
                policy::NearAction::Merge => pb::NearAction::Merge,
                policy::NearAction::Link => pb::NearAction::Link,
            } as i32,
            keep: keep_to_pb(n.keep) as i32,
        }),
        decay: Some(decay_to_pb(decay)),
        default_ttl_ms: default_ttl_ms.unwrap_or(0),
        retention: retention.map(|r| pb::RetentionPolicy { max_age_ms: r.max_age_ms, archive: r.archive }),
        gate: Some(pb::VerificationGate {
            required_tags,
            allowed_tag_keys: allowed_tag_keys.unwrap_or_default(),
            allowed_tag_values: allowed_tag_values
                .into_iter()
                .map(|(k, values)| (k, pb::TagValues { values }))
                .collect(),
            min_text_bytes: min_text_bytes.unwrap_or(0),
            max_text_bytes: max_text_bytes.unwrap_or(0),
            min_norm,
            max_norm,
            deny_patterns,
            max_per_id_prefix: max_per_id_prefix.unwrap_or(0),
            id_prefix_separator: id_prefix_separator.unwrap_or_default(),
        }),
    }
}

fn keep_to_pb(k: policy::KeepText) -> pb::KeepText {
    match k {
        policy::KeepText::Longer => pb::KeepText::Longer,
        policy::KeepText::Newer => pb::KeepText::Newer,
    }
}

/// A policy from the wire; unknown enum values are refused, the rest is checked by
/// [`MemoryPolicy::validate`].
pub fn policy_from_pb(field: &str, p: Option<pb::MemoryPolicy>) -> Result<MemoryPolicy, ApiError> {
    let Some(p) = p else { return Ok(MemoryPolicy::default()) };
    let pb::MemoryPolicy { dedup, dedup_merge, near_duplicate, decay, default_ttl_ms, retention, gate } = p;
    let dedup = match pb::DedupMode::try_from(dedup) {
        Ok(pb::DedupMode::Off) => policy::DedupMode::Off,
        Ok(pb::DedupMode::Text) => policy::DedupMode::Text,
        Ok(pb::DedupMode::TextAndEmbedding) => policy::DedupMode::TextAndEmbedding,
        Err(_) => return Err(ApiError::invalid(format!("{field}.dedup"), format!("unknown mode {dedup}"))),
    };
    let near_duplicate = match near_duplicate {
        None => None,
        Some(pb::NearDuplicatePolicy { threshold, action, keep }) => Some(policy::NearDuplicate {
            threshold,
            action: match pb::NearAction::try_from(action) {
                Ok(pb::NearAction::Reject) => policy::NearAction::Reject,
                Ok(pb::NearAction::Merge) => policy::NearAction::Merge,
                Ok(pb::NearAction::Link) => policy::NearAction::Link,
                Err(_) => {
                    return Err(ApiError::invalid(
                        format!("{field}.near_duplicate.action"),
                        format!("unknown action {action}"),
                    ))
                }
            },
            keep: keep_from_pb(&format!("{field}.near_duplicate.keep"), keep)?,
        }),
    };
    let gate = match gate {
        None => policy::Gate::default(),
        Some(pb::VerificationGate {
            required_tags,
            allowed_tag_keys,
            allowed_tag_values,
            min_text_bytes,
            max_text_bytes,
            min_norm,
            max_norm,
            deny_patterns,
            max_per_id_prefix,
            id_prefix_separator,
        }) => policy::Gate {
            required_tags,
            allowed_tag_keys: (!allowed_tag_keys.is_empty()).then_some(allowed_tag_keys),
            allowed_tag_values: allowed_tag_values.into_iter().map(|(k, v)| (k, v.values)).collect(),
            min_text_bytes: (min_text_bytes != 0).then_some(min_text_bytes),
            max_text_bytes: (max_text_bytes != 0).then_some(max_text_bytes),
            min_norm,
            max_norm,
            deny_patterns,
            max_per_id_prefix: (max_per_id_prefix != 0).then_some(max_per_id_prefix),
            id_prefix_separator: (!id_prefix_separator.is_empty()).then_some(id_prefix_separator),
        },
    };
    Ok(MemoryPolicy {
        dedup,
        dedup_merge,
        near_duplicate,
        decay: decay.map(decay_from_pb).unwrap_or_default(),
        default_ttl_ms: (default_ttl_ms != 0).then_some(default_ttl_ms),
        retention: retention.map(|r| policy::Retention { max_age_ms: r.max_age_ms, archive: r.archive }),
        gate,
    })
}

pub fn keep_from_pb(field: &str, keep: i32) -> Result<policy::KeepText, ApiError> {
    match pb::KeepText::try_from(keep) {
        Ok(pb::KeepText::Longer) => Ok(policy::KeepText::Longer),
        Ok(pb::KeepText::Newer) => Ok(policy::KeepText::Newer),
        Err(_) => Err(ApiError::invalid(field, format!("unknown value {keep}"))),
    }
}

pub fn stats_to_pb(s: NamespaceStats, bytes: u64) -> pb::NamespaceStats {
    let dedup_hit_rate = s.dedup_hit_rate();
    let NamespaceStats {
        created,
        updated,
        dedup_hits,
        near_merges,
        near_links,
        consolidated,
        purged,
        retired,
        archived,
        reinforced,
    } = s;
    pb::NamespaceStats {
        created,
        updated,
        dedup_hits,
        near_merges,
        near_links,
        consolidated,
        purged,
        retired,
        archived,
        reinforced,
        dedup_hit_rate,
        bytes,
    }
}

pub fn store_result_to_pb(index: u64, r: crate::raft::StoreResult) -> pb::PutResponse {
    use crate::raft::PutAction as A;
    let (action, linked_to) = match r.action {
        A::Created => (pb::PutAction::Created, String::new()),
        A::Updated => (pb::PutAction::Updated, String::new()),
        A::Deduplicated => (pb::PutAction::Deduplicated, String::new()),
        A::Merged => (pb::PutAction::Merged, String::new()),
        A::Linked { twin } => (pb::PutAction::Linked, twin),
    };
    pb::PutResponse {
        applied_index: index,
        id: r.id,
        revision: r.revision,
        updated: action == pb::PutAction::Updated,
        deduplicated: action == pb::PutAction::Deduplicated,
        action: action as i32,
        linked_to,
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
    decode_token(token, "v1:", |id| crate::memory::validate_id("page_token", id).is_ok())
}

/// A `ListNamespaces` page token: the last namespace of the page.
pub fn encode_namespace_token(after: &str) -> String {
    format!("ns1:{after}").bytes().map(|b| format!("{b:02x}")).collect()
}

pub fn decode_namespace_token(token: &str) -> Result<Option<String>, ApiError> {
    decode_token(token, "ns1:", |ns| crate::memory::validate_namespace(ns).is_ok())
}

fn decode_token(token: &str, tag: &str, valid: impl Fn(&str) -> bool) -> Result<Option<String>, ApiError> {
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
    let after = s.strip_prefix(tag).ok_or_else(bad)?;
    if !valid(after) {
        return Err(bad());
    }
    Ok(Some(after.to_string()))
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
