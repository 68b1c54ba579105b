//! Input validation. Runs on the node that receives a request, before anything is proposed,
//! so bad input never reaches the log. Every rejection names the offending field.

use super::MemoryInput;
use crate::error::ApiError;

/// Bounds on what a memory may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_text_bytes: usize,
    pub max_dimension: usize,
    pub max_tags: usize,
    pub max_tag_key_bytes: usize,
    pub max_tag_value_bytes: usize,
    pub max_batch_items: usize,
    /// The IVF threshold stamped into namespaces this node's leader creates.
    pub approx_min_vectors: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_text_bytes: 64 * 1024,
            max_dimension: 4096,
            max_tags: 64,
            max_tag_key_bytes: 128,
            max_tag_value_bytes: 1024,
            max_batch_items: 1000,
            approx_min_vectors: 10_000,
        }
    }
}

pub const MAX_NAMESPACE_BYTES: usize = 256;
pub const MAX_NAMESPACE_DEPTH: usize = 8;
const MAX_SEGMENT_BYTES: usize = 64;
const MAX_ID_BYTES: usize = 128;

/// Namespaces are canonical before any grant is checked: `/`-separated segments of
/// `[a-z0-9_-]` (1..=64 bytes each, so never `.` or `..`), at most 8 deep and 256 bytes long,
/// e.g. `acme/user-42`. A grant on `acme/*` therefore covers exactly the names that start
/// with `acme/`.
pub fn validate_namespace(ns: &str) -> Result<(), ApiError> {
    const F: &str = "namespace";
    if ns.is_empty() {
        return Err(ApiError::invalid(F, "must not be empty"));
    }
    if ns.len() > MAX_NAMESPACE_BYTES {
        return Err(ApiError::invalid(F, format!("longer than {MAX_NAMESPACE_BYTES} bytes")));
    }
    let mut depth = 0;
    for segment in ns.split('/') {
        depth += 1;
        if segment.is_empty() {
            return Err(ApiError::invalid(F, "empty path segment (leading, trailing or double '/')"));
        }
        if segment.len() > MAX_SEGMENT_BYTES {
            return Err(ApiError::invalid(F, format!("a segment is longer than {MAX_SEGMENT_BYTES} bytes")));
        }
        if !segment.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-') {
            return Err(ApiError::invalid(F, "segments may only hold [a-z0-9_-]"));
        }
    }
    if depth > MAX_NAMESPACE_DEPTH {
        return Err(ApiError::invalid(F, format!("deeper than {MAX_NAMESPACE_DEPTH} segments")));
    }
    Ok(())
}

/// Ids are 1..=128 bytes of `[A-Za-z0-9_.:-]`.
pub fn validate_id(field: &str, id: &str) -> Result<(), ApiError> {
    if id.is_empty() {
        return Err(ApiError::invalid(field, "must not be empty"));
    }
    if id.len() > MAX_ID_BYTES {
        return Err(ApiError::invalid(field, format!("longer than {MAX_ID_BYTES} bytes")));
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b)) {
        return Err(ApiError::invalid(field, "may only hold [A-Za-z0-9_.:-]"));
    }
    Ok(())
}

/// Validates one memory; `prefix` names its position (e.g. `items[3].memory`).
/// `dimension` is the namespace's, when the namespace already exists.
pub fn validate_input(prefix: &str, m: &MemoryInput, dimension: Option<u32>, limits: &Limits) -> Result<(), ApiError> {
    let field = |f: &str| format!("{prefix}.{f}");
    if !m.id.is_empty() {
        validate_id(&field("id"), &m.id)?;
    }
    if m.text.is_empty() {
        return Err(ApiError::invalid(field("text"), "must not be empty"));
    }
    if m.text.len() > limits.max_text_bytes {
        return Err(ApiError::invalid(
            field("text"),
            format!("{} bytes exceeds the limit of {}", m.text.len(), limits.max_text_bytes),
        ));
    }
    validate_embedding(&field("embedding"), &m.embedding, dimension, limits)?;
    if m.tags.len() > limits.max_tags {
        return Err(ApiError::invalid(field("tags"), format!("more than {} tags", limits.max_tags)));
    }
    for (k, v) in &m.tags {
        if k.is_empty() || k.len() > limits.max_tag_key_bytes {
            return Err(ApiError::invalid(
                field("tags"),
                format!("tag keys must be 1..={} bytes", limits.max_tag_key_bytes),
            ));
        }
        if v.len() > limits.max_tag_value_bytes {
            return Err(ApiError::invalid(
                field(&format!("tags[{k}]")),
                format!("value longer than {} bytes", limits.max_tag_value_bytes),
            ));
        }
    }
    if !(0.0..=1.0).contains(&m.importance) {
        return Err(ApiError::invalid(field("importance"), "must be a number in [0, 1]"));
    }
    Ok(())
}

/// Largest magnitude of a vector element: squares of 4,096 of them still sum within f32, so
/// the shards' f32 arithmetic never overflows to infinity or normalizes a vector to zeros.
pub const MAX_ELEMENT: f32 = 1e12;

/// Vectors are non-empty, finite, bounded by [`MAX_ELEMENT`], at most `max_dimension` long,
/// and match the namespace.
pub fn validate_embedding(field: &str, v: &[f32], dimension: Option<u32>, limits: &Limits) -> Result<(), ApiError> {
    if v.is_empty() {
        return Err(ApiError::invalid(field, "must not be empty"));
    }
    if v.len() > limits.max_dimension {
        return Err(ApiError::invalid(field, format!("dimension {} exceeds {}", v.len(), limits.max_dimension)));
    }
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(ApiError::invalid(field, format!("element {i} is not finite (NaN or Inf)")));
    }
    if let Some(i) = v.iter().position(|x| x.abs() > MAX_ELEMENT) {
        return Err(ApiError::invalid(field, format!("element {i} exceeds {MAX_ELEMENT:e} in magnitude")));
    }
    if let Some(d) = dimension {
        if v.len() != d as usize {
            return Err(ApiError::invalid(field, format!("dimension {} does not match the namespace's {d}", v.len())));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_elements_are_refused() {
        let l = Limits::default();
        assert!(validate_embedding("e", &[1e12, -1e12], None, &l).is_ok());
        let e = validate_embedding("e", &[0.0, 2e19], None, &l).unwrap_err();
        assert!(e.to_string().contains("element 1"), "{e}");
    }

    #[test]
    fn namespaces() {
        assert!(validate_namespace("acme/user-42").is_ok());
        assert!(validate_namespace("a/b-c/d_e/0").is_ok());
        let deep = ["a"; 9].join("/");
        let long_segment = "x".repeat(65);
        for bad in [
            "",
            "/a",
            "a/",
            "a//b",
            "a b",
            "ü",
            &"x".repeat(300),
            "..",
            ".",
            "a/../b",
            "a/./b",
            "A/b",
            "a.b",
            &deep,
            &long_segment,
        ] {
            assert!(validate_namespace(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn ids() {
        assert!(validate_id("id", "01J:abc_d.e-f").is_ok());
        for bad in ["", "a/b", "a b", &"x".repeat(129)] {
            assert!(validate_id("id", bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn embeddings() {
        let l = Limits::default();
        assert!(validate_embedding("e", &[0.1, 0.2], Some(2), &l).is_ok());
        assert!(validate_embedding("e", &[], None, &l).is_err());
        assert!(validate_embedding("e", &[f32::NAN], None, &l).is_err());
        assert!(validate_embedding("e", &[f32::INFINITY], None, &l).is_err());
        assert!(validate_embedding("e", &[0.1], Some(2), &l).is_err());
    }
}
