//! A namespace's memory policy: what makes the namespace behave like memory rather than a
//! vector table. Replicated (table `ns_policy`), applied in `apply` from the log, the same on
//! every node. Every field's default keeps a namespace as it was before policies existed:
//! no dedup, no near-duplicate check, pure-similarity ranking, no TTL, no retention, no gate.
//!
//! See `docs/memory-model.md` for every rule and the ranking formula.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};

use serde::{Deserialize, Serialize};

use super::{Memory, MemoryInput, Metric};

/// Exact-duplicate detection by content hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DedupMode {
    /// Every put creates or replaces by id (today's behaviour).
    #[default]
    Off,
    /// A new memory whose text equals an existing one's is not created.
    Text,
    /// Text and embedding (bit for bit) must both be equal.
    TextAndEmbedding,
}

/// What a near-duplicate put does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum NearAction {
    /// Refused with ALREADY_EXISTS naming the twin.
    #[default]
    Reject,
    /// Merged into the twin (see [`merge`]).
    Merge,
    /// Kept as a new memory that names its twin in `linked_to`.
    Link,
}

/// Which text a merge keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KeepText {
    /// The longer text (and its embedding); the existing one on a tie.
    #[default]
    Longer,
    /// The newer text (and its embedding).
    Newer,
}

/// Near-duplicate detection by vector similarity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NearDuplicate {
    /// Cosine / inner product: a twin has similarity >= threshold. L2: squared distance <=
    /// threshold.
    pub threshold: f32,
    #[serde(default)]
    pub action: NearAction,
    #[serde(default)]
    pub keep: KeepText,
}

/// Ranking weights (see [`rank_score`]). The default is pure similarity.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Decay {
    pub half_life_ms: u64,
    pub similarity: f32,
    pub importance: f32,
    pub recency: f32,
    pub access: f32,
}

impl Default for Decay {
    fn default() -> Self {
        Decay { half_life_ms: 7 * 24 * 3600 * 1000, similarity: 1.0, importance: 0.0, recency: 0.0, access: 0.0 }
    }
}

impl Decay {
    /// Whether ranking is plain similarity order.
    pub fn is_pure_similarity(&self) -> bool {
        self.importance == 0.0 && self.recency == 0.0 && self.access == 0.0 && self.similarity > 0.0
    }
}

/// Memories older than `max_age_ms` (by `created_at_ms`) are dropped, or archived then
/// dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    pub max_age_ms: u64,
    /// Write them to an encrypted archive file (backup format) before deleting them.
    #[serde(default)]
    pub archive: bool,
}

/// Rules a write must pass before it enters the log (and again in `apply`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Gate {
    /// Tag keys every memory must carry.
    pub required_tags: Vec<String>,
    /// When set, the only tag keys allowed.
    pub allowed_tag_keys: Option<Vec<String>>,
    /// Per tag key, the only values allowed.
    pub allowed_tag_values: BTreeMap<String, Vec<String>>,
    pub min_text_bytes: Option<u32>,
    pub max_text_bytes: Option<u32>,
    /// Bounds on the L2 norm of the embedding as sent.
    pub min_norm: Option<f32>,
    pub max_norm: Option<f32>,
    /// Regular expressions (Rust `regex` syntax, linear time); a text matching any is refused.
    pub deny_patterns: Vec<String>,
    /// At most this many memories whose ids share a prefix (the id up to its first
    /// `id_prefix_separator`, default `:`).
    pub max_per_id_prefix: Option<u64>,
    pub id_prefix_separator: Option<String>,
}

/// A namespace's policy. `#[serde(default)]` on every field: a JSON file names only what it
/// changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct MemoryPolicy {
    pub dedup: DedupMode,
    /// On an exact duplicate, also merge the put into the existing memory: union of tags
    /// (existing values win), max importance, one more access. Off: the existing memory is
    /// left untouched.
    pub dedup_merge: bool,
    pub near_duplicate: Option<NearDuplicate>,
    pub decay: Decay,
    /// Applied to puts that give no `expires_at_ms`.
    pub default_ttl_ms: Option<u64>,
    pub retention: Option<Retention>,
    pub gate: Gate,
}

/// Bounds on a policy, so a policy cannot make `apply` slow.
pub const MAX_PATTERNS: usize = 32;
pub const MAX_PATTERN_BYTES: usize = 512;
pub const MAX_RULE_ENTRIES: usize = 256;
/// Lowest cosine near-duplicate threshold a policy may set.
pub const MIN_COSINE_THRESHOLD: f32 = 0.5;
/// Longest tag key or value a gate rule names.
pub const MAX_RULE_BYTES: usize = 256;
/// Largest `max_per_id_prefix`: `apply` counts a prefix's memories up to it.
pub const MAX_PER_PREFIX_LIMIT: u64 = 100_000;
/// Ids a merged memory remembers it absorbed (the newest).
pub const MAX_PROVENANCE: usize = 32;

/// A policy problem: the field and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub field: String,
    pub reason: String,
}

impl PolicyError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        PolicyError { field: field.into(), reason: reason.into() }
    }
}

impl MemoryPolicy {
    /// Whether a put may rewrite a memory other than the ones it names (a merge into a twin).
    pub fn may_merge(&self) -> bool {
        (self.dedup != DedupMode::Off && self.dedup_merge)
            || self.near_duplicate.as_ref().is_some_and(|n| n.action == NearAction::Merge)
    }

    /// Checks the policy itself (before it is proposed, and again in `apply`).
    pub fn validate(&self, metric: Metric) -> Result<(), PolicyError> {
        if let Some(n) = &self.near_duplicate {
            let t = n.threshold;
            // Below 0.5 nearly everything is a "twin", and apply would score whole namespaces
            // on every put.
            if !threshold_ok(metric, t, MIN_COSINE_THRESHOLD) {
                return Err(PolicyError::new(
                    "policy.near_duplicate.threshold",
                    format!("{t} is out of range (cosine: {MIN_COSINE_THRESHOLD}..=1; L2: >= 0)"),
                ));
            }
        }
        let d = &self.decay;
        for (name, w) in
            [("similarity", d.similarity), ("importance", d.importance), ("recency", d.recency), ("access", d.access)]
        {
            if !(w.is_finite() && (0.0..=1000.0).contains(&w)) {
                return Err(PolicyError::new(format!("policy.decay.{name}"), "weights must lie in [0, 1000]"));
            }
        }
        if d.half_life_ms == 0 {
            return Err(PolicyError::new("policy.decay.half_life_ms", "must be > 0"));
        }
        if self.default_ttl_ms == Some(0) {
            return Err(PolicyError::new("policy.default_ttl_ms", "must be > 0 when set"));
        }
        if self.retention.is_some_and(|r| r.max_age_ms == 0) {
            return Err(PolicyError::new("policy.retention.max_age_ms", "must be > 0"));
        }
        let g = &self.gate;
        let entries = g.required_tags.len()
            + g.allowed_tag_keys.as_ref().map_or(0, Vec::len)
            + g.allowed_tag_values.len()
            + g.allowed_tag_values.values().map(Vec::len).sum::<usize>();
        if entries > MAX_RULE_ENTRIES {
            return Err(PolicyError::new("policy.gate", format!("more than {MAX_RULE_ENTRIES} tag rules")));
        }
        let strings = g
            .required_tags
            .iter()
            .chain(g.allowed_tag_keys.iter().flatten())
            .chain(g.allowed_tag_values.iter().flat_map(|(k, vs)| std::iter::once(k).chain(vs)));
        if strings.into_iter().any(|t| t.len() > MAX_RULE_BYTES) {
            return Err(PolicyError::new("policy.gate", format!("a tag rule is longer than {MAX_RULE_BYTES} bytes")));
        }
        if let (Some(lo), Some(hi)) = (g.min_norm, g.max_norm) {
            if lo > hi {
                return Err(PolicyError::new("policy.gate.min_norm", "exceeds max_norm"));
            }
        }
        if g.max_per_id_prefix.is_some_and(|m| m > MAX_PER_PREFIX_LIMIT) {
            return Err(PolicyError::new(
                "policy.gate.max_per_id_prefix",
                format!("must be at most {MAX_PER_PREFIX_LIMIT} (apply counts up to it)"),
            ));
        }
        if let (Some(lo), Some(hi)) = (g.min_text_bytes, g.max_text_bytes) {
            if lo > hi {
                return Err(PolicyError::new("policy.gate.min_text_bytes", "exceeds max_text_bytes"));
            }
        }
        for (name, v) in [("min_norm", g.min_norm), ("max_norm", g.max_norm)] {
            if v.is_some_and(|v| !v.is_finite() || v < 0.0) {
                return Err(PolicyError::new(format!("policy.gate.{name}"), "must be a finite number >= 0"));
            }
        }
        if g.deny_patterns.len() > MAX_PATTERNS {
            return Err(PolicyError::new("policy.gate.deny_patterns", format!("more than {MAX_PATTERNS} patterns")));
        }
        for (i, p) in g.deny_patterns.iter().enumerate() {
            if p.len() > MAX_PATTERN_BYTES {
                return Err(PolicyError::new(
                    format!("policy.gate.deny_patterns[{i}]"),
                    format!("longer than {MAX_PATTERN_BYTES} bytes"),
                ));
            }
            compiled(p).map_err(|e| PolicyError::new(format!("policy.gate.deny_patterns[{i}]"), e))?;
        }
        if g.max_per_id_prefix == Some(0) {
            return Err(PolicyError::new("policy.gate.max_per_id_prefix", "must be > 0 when set"));
        }
        if g.id_prefix_separator.as_ref().is_some_and(|s| s.is_empty() || s.len() > 8) {
            return Err(PolicyError::new("policy.gate.id_prefix_separator", "must be 1..=8 bytes"));
        }
        Ok(())
    }

    /// The expiry a put gets: its own, else the namespace's default TTL from `now_ms`.
    pub fn expiry_for(&self, given: Option<u64>, now_ms: u64) -> Option<u64> {
        given.or_else(|| self.default_ttl_ms.map(|ttl| now_ms.saturating_add(ttl)))
    }
}

/// Compiled deny patterns, shared by every check (a policy holds at most 32; the cache is
/// bounded and rebuilt when full).
fn compiled(pattern: &str) -> Result<regex::Regex, String> {
    static CACHE: OnceLock<Mutex<BTreeMap<String, regex::Regex>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Mutex::default);
    let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(r) = cache.get(pattern) {
        return Ok(r.clone());
    }
    let r = regex::RegexBuilder::new(pattern)
        .size_limit(1 << 20)
        .dfa_size_limit(1 << 20)
        .build()
        .map_err(|e| format!("not a valid pattern: {e}"))?;
    if cache.len() >= 1024 {
        cache.clear();
    }
    cache.insert(pattern.to_string(), r.clone());
    Ok(r)
}

/// A gate refusal: the field and the rule it broke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateRefusal {
    pub field: String,
    pub rule: String,
    pub reason: String,
}

/// The prefix of `id` that `max_per_id_prefix` counts by.
pub fn id_prefix<'a>(gate: &Gate, id: &'a str) -> Option<&'a str> {
    let sep = gate.id_prefix_separator.as_deref().unwrap_or(":");
    id.find(sep).map(|i| &id[..i + sep.len()])
}

/// Checks one memory against the gate's per-memory rules (everything but the id-prefix
/// count, which needs the state). `prefix` names the item, e.g. `items[2].memory`.
pub fn check_gate(gate: &Gate, prefix: &str, m: &MemoryInput) -> Result<(), GateRefusal> {
    let refuse = |f: &str, rule: &str, reason: String| {
        Err(GateRefusal { field: format!("{prefix}.{f}"), rule: rule.into(), reason })
    };
    for key in &gate.required_tags {
        if !m.tags.contains_key(key) {
            return refuse("tags", "required_tags", format!("tag {key:?} is required"));
        }
    }
    if let Some(allowed) = &gate.allowed_tag_keys {
        if let Some(k) = m.tags.keys().find(|k| !allowed.contains(k)) {
            return refuse("tags", "allowed_tag_keys", format!("tag {k:?} is not an allowed key"));
        }
    }
    for (key, values) in &gate.allowed_tag_values {
        if let Some(v) = m.tags.get(key) {
            if !values.contains(v) {
                return refuse(&format!("tags[{key}]"), "allowed_tag_values", format!("{v:?} is not an allowed value"));
            }
        }
    }
    let len = m.text.len() as u64;
    if gate.min_text_bytes.is_some_and(|lo| len < lo as u64) {
        return refuse("text", "min_text_bytes", format!("{len} bytes is under {}", gate.min_text_bytes.unwrap_or(0)));
    }
    if gate.max_text_bytes.is_some_and(|hi| len > hi as u64) {
        return refuse("text", "max_text_bytes", format!("{len} bytes is over {}", gate.max_text_bytes.unwrap_or(0)));
    }
    let norm = norm(&m.embedding);
    if gate.min_norm.is_some_and(|lo| norm < lo as f64) {
        return refuse("embedding", "min_norm", format!("norm {norm:.6} is under {}", gate.min_norm.unwrap_or(0.0)));
    }
    if gate.max_norm.is_some_and(|hi| norm > hi as f64) {
        return refuse("embedding", "max_norm", format!("norm {norm:.6} is over {}", gate.max_norm.unwrap_or(0.0)));
    }
    for (i, p) in gate.deny_patterns.iter().enumerate() {
        // A pattern that no longer compiles (it was validated when set) refuses: fail closed.
        let hit = compiled(p).map(|r| r.is_match(&m.text)).unwrap_or(true);
        if hit {
            return refuse("text", &format!("deny_patterns[{i}]"), "the text matches a denied pattern".into());
        }
    }
    Ok(())
}

/// L2 norm, summed in f64 in index order (deterministic on every node).
pub fn norm(v: &[f32]) -> f64 {
    v.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>().sqrt()
}

/// The metric's score between two vectors, computed in f64 in index order so every node gets
/// the same bits: cosine similarity, inner product, or squared L2 distance.
pub fn exact_score(metric: Metric, a: &[f32], b: &[f32]) -> f64 {
    match metric {
        Metric::L2 => a
            .iter()
            .zip(b)
            .map(|(x, y)| {
                let d = *x as f64 - *y as f64;
                d * d
            })
            .sum(),
        Metric::InnerProduct => a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum(),
        Metric::Cosine => {
            let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let (na, nb) = (norm(a), norm(b));
            if na == 0.0 || nb == 0.0 {
                0.0
            } else {
                dot / (na * nb)
            }
        }
    }
}

/// Whether `t` is a usable twin threshold under `metric`: finite, within `min_cosine..=1`
/// for cosine, not negative for L2.
pub fn threshold_ok(metric: Metric, t: f32, min_cosine: f32) -> bool {
    t.is_finite()
        && match metric {
            Metric::Cosine => (min_cosine..=1.0).contains(&t),
            Metric::InnerProduct => true,
            Metric::L2 => t >= 0.0,
        }
}

/// Whether `score` makes a twin under `threshold`.
pub fn is_twin(metric: Metric, score: f64, threshold: f32) -> bool {
    match metric {
        Metric::L2 => score <= threshold as f64,
        Metric::Cosine | Metric::InnerProduct => score >= threshold as f64,
    }
}

/// What ranking needs of a memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RankInput {
    /// The metric's raw score of the hit.
    pub score: f32,
    pub importance: f32,
    /// `max(updated_at_ms, last_accessed_at_ms)`.
    pub touched_at_ms: u64,
    pub access_count: u64,
}

/// The ranking score, higher is better:
///
/// ```text
/// score = w_sim · s + w_imp · importance + w_rec · 2^(−age / half_life) + w_acc · (1 − 1/(1 + accesses))
/// s     = similarity (cosine, inner product), or 1 / (1 + d) for squared L2 distance d
/// age   = max(0, now − max(updated_at, last_accessed_at))
/// ```
pub fn rank_score(metric: Metric, w: &Decay, m: &RankInput, now_ms: u64) -> f64 {
    let s = match metric {
        Metric::L2 => 1.0 / (1.0 + m.score.max(0.0) as f64),
        Metric::Cosine | Metric::InnerProduct => m.score as f64,
    };
    let age = now_ms.saturating_sub(m.touched_at_ms) as f64;
    let recency = (-(age / w.half_life_ms.max(1) as f64)).exp2();
    let access = 1.0 - 1.0 / (1.0 + m.access_count as f64);
    w.similarity as f64 * s
        + w.importance as f64 * m.importance as f64
        + w.recency as f64 * recency
        + w.access as f64 * access
}

/// Merges `incoming` into `keep` (near-duplicate merge and consolidation): the text and
/// embedding `rule` picks, the union of tags (`keep`'s values win), the higher importance,
/// the sum of accesses, the absorbed ids (newest [`MAX_PROVENANCE`]) and one more merge per
/// absorbed memory. `incoming_is_newer` decides [`KeepText::Newer`].
pub fn merge(keep: &mut Memory, incoming: &Memory, rule: KeepText, incoming_is_newer: bool) {
    let take_text = match rule {
        KeepText::Longer => incoming.text.len() > keep.text.len(),
        KeepText::Newer => incoming_is_newer,
    };
    if take_text {
        keep.text = incoming.text.clone();
        keep.embedding = incoming.embedding.clone();
        keep.content_hash = incoming.content_hash;
    }
    for (k, v) in &incoming.tags {
        keep.tags.entry(k.clone()).or_insert_with(|| v.clone());
    }
    keep.importance = keep.importance.max(incoming.importance);
    keep.access_count = keep.access_count.saturating_add(incoming.access_count);
    keep.last_accessed_at_ms = keep.last_accessed_at_ms.max(incoming.last_accessed_at_ms);
    keep.expires_at_ms = match (keep.expires_at_ms, incoming.expires_at_ms) {
        (Some(a), Some(b)) => Some(a.max(b)),
        _ => None,
    };
    keep.merge_count = keep.merge_count.saturating_add(1 + incoming.merge_count);
    let mut from: Vec<String> = keep.merged_from.clone();
    from.extend(incoming.merged_from.iter().cloned());
    from.push(incoming.id.clone());
    from.dedup();
    if from.len() > MAX_PROVENANCE {
        from.drain(..from.len() - MAX_PROVENANCE);
    }
    keep.merged_from = from;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(text: &str, tags: &[(&str, &str)], embedding: Vec<f32>) -> MemoryInput {
        MemoryInput {
            id: "a:1".into(),
            text: text.into(),
            embedding,
            tags: tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            importance: 0.5,
            expires_at_ms: None,
        }
    }

    #[test]
    fn default_policy_is_valid_and_inert() {
        let p = MemoryPolicy::default();
        assert!(p.validate(Metric::Cosine).is_ok());
        assert_eq!(p.dedup, DedupMode::Off);
        assert!(p.decay.is_pure_similarity());
        assert_eq!(p.expiry_for(None, 5), None);
        assert!(check_gate(&p.gate, "m", &input("x", &[], vec![0.0])).is_ok());
    }

    #[test]
    fn json_names_only_what_it_changes() {
        let p: MemoryPolicy = serde_json::from_str(r#"{"dedup":"text","near_duplicate":{"threshold":0.9}}"#).unwrap();
        assert_eq!(p.dedup, DedupMode::Text);
        assert_eq!(p.near_duplicate.unwrap().action, NearAction::Reject);
        assert_eq!(p.decay, Decay::default());
    }

    #[test]
    fn every_gate_rule_refuses_by_name() {
        let gate = Gate {
            required_tags: vec!["user".into()],
            allowed_tag_keys: Some(vec!["user".into(), "kind".into()]),
            allowed_tag_values: [("kind".to_string(), vec!["fact".to_string()])].into(),
            min_text_bytes: Some(3),
            max_text_bytes: Some(10),
            min_norm: Some(0.5),
            max_norm: Some(2.0),
            deny_patterns: vec!["(?i)password".into()],
            ..Gate::default()
        };
        let ok = input("hello", &[("user", "u")], vec![1.0, 0.0]);
        assert!(check_gate(&gate, "m", &ok).is_ok());
        let cases = [
            (input("hello", &[], vec![1.0, 0.0]), "required_tags"),
            (input("hello", &[("user", "u"), ("x", "y")], vec![1.0, 0.0]), "allowed_tag_keys"),
            (input("hello", &[("user", "u"), ("kind", "opinion")], vec![1.0, 0.0]), "allowed_tag_values"),
            (input("hi", &[("user", "u")], vec![1.0, 0.0]), "min_text_bytes"),
            (input("hello world!", &[("user", "u")], vec![1.0, 0.0]), "max_text_bytes"),
            (input("hello", &[("user", "u")], vec![0.0, 0.0]), "min_norm"),
            (input("hello", &[("user", "u")], vec![3.0, 0.0]), "max_norm"),
            (input("PassWord", &[("user", "u")], vec![1.0, 0.0]), "deny_patterns[0]"),
        ];
        for (m, rule) in cases {
            let r = check_gate(&gate, "m", &m).unwrap_err();
            assert_eq!(r.rule, rule, "{m:?}");
        }
    }

    #[test]
    fn bad_policies_are_refused() {
        let mut p = MemoryPolicy::default();
        p.gate.deny_patterns = vec!["(unclosed".into()];
        assert_eq!(p.validate(Metric::Cosine).unwrap_err().field, "policy.gate.deny_patterns[0]");
        let p = MemoryPolicy {
            near_duplicate: Some(NearDuplicate { threshold: 1.5, action: NearAction::Merge, keep: KeepText::Longer }),
            ..MemoryPolicy::default()
        };
        assert!(p.validate(Metric::Cosine).is_err());
        assert!(p.validate(Metric::InnerProduct).is_ok());
        let p = MemoryPolicy { default_ttl_ms: Some(0), ..MemoryPolicy::default() };
        assert!(p.validate(Metric::Cosine).is_err());
        let mut p = MemoryPolicy::default();
        p.decay.recency = f32::NAN;
        assert!(p.validate(Metric::Cosine).is_err());
    }

    #[test]
    fn ranking_follows_the_formula() {
        let w = Decay { half_life_ms: 1000, similarity: 1.0, importance: 0.5, recency: 1.0, access: 0.25 };
        let m = RankInput { score: 0.8, importance: 0.4, touched_at_ms: 1000, access_count: 3 };
        // 0.8 + 0.5*0.4 + 2^(-2000/1000) + 0.25*(1 - 1/4)
        let want = 0.8f32 as f64 + 0.5 * 0.4f32 as f64 + 0.25 + 0.25 * 0.75;
        assert!((rank_score(Metric::Cosine, &w, &m, 3000) - want).abs() < 1e-9);
        // L2 distance d becomes 1/(1+d).
        let m = RankInput { score: 1.0, ..m };
        let w = Decay { similarity: 1.0, importance: 0.0, recency: 0.0, access: 0.0, half_life_ms: 1 };
        assert_eq!(rank_score(Metric::L2, &w, &m, 0), 0.5);
    }

    #[test]
    fn exact_scores_and_twins() {
        assert!((exact_score(Metric::Cosine, &[1.0, 0.0], &[2.0, 0.0]) - 1.0).abs() < 1e-12);
        assert_eq!(exact_score(Metric::Cosine, &[0.0, 0.0], &[1.0, 0.0]), 0.0);
        assert_eq!(exact_score(Metric::L2, &[1.0, 0.0], &[0.0, 0.0]), 1.0);
        assert!(is_twin(Metric::Cosine, 0.95, 0.9));
        assert!(!is_twin(Metric::L2, 0.95, 0.9));
    }

    #[test]
    fn id_prefixes() {
        let g = Gate::default();
        assert_eq!(id_prefix(&g, "user-1:abc"), Some("user-1:"));
        assert_eq!(id_prefix(&g, "plain"), None);
    }

    #[test]
    fn thresholds_are_finite_and_within_the_metric() {
        for t in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for m in [Metric::Cosine, Metric::InnerProduct, Metric::L2] {
                assert!(!threshold_ok(m, t, -1.0), "{m:?} {t}");
            }
        }
        assert!(threshold_ok(Metric::Cosine, -0.5, -1.0) && !threshold_ok(Metric::Cosine, -0.5, MIN_COSINE_THRESHOLD));
        assert!(!threshold_ok(Metric::Cosine, 1.01, -1.0));
        assert!(threshold_ok(Metric::InnerProduct, -7.0, -1.0));
        assert!(threshold_ok(Metric::L2, 0.0, -1.0) && !threshold_ok(Metric::L2, -0.1, -1.0));
    }
}
