//! Determinism of the state machine: applying the same log on fresh state machines gives
//! byte-identical state (equal digests), however the entries are batched into `apply` calls,
//! and a snapshot installed elsewhere reproduces the same state. The log mixes memory writes
//! with auth changes (keys, grants, revocations, quotas) and commands made by those keys, so
//! every authorization and quota decision in `apply` is covered too. Memory policies (exact
//! dedup, near-duplicates with every action, default TTLs, retention, the gate), purges,
//! consolidation and reinforcement are in the mix, with few texts and few directions so
//! duplicates are common: their decisions must not depend on how entries are batched (the
//! vector shard a near-duplicate check consults sees only earlier batches).

use std::collections::BTreeMap;

use engram::auth::records::{Grant, KeyRecord, Permission, Permissions, Quota};
use engram::auth::token::KeyId;
use engram::auth::Principal;
use engram::memory::policy::{DedupMode, Gate, KeepText, NearAction, NearDuplicate, Retention};
use engram::memory::{MemoryInput, MemoryPolicy, Metric, Precondition};
use engram::raft::{Command, ConsolidationCluster, Entry, Idempotency, LogId, Op, StateMachineStore};
use engram::storage::StateReader;
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::EntryPayload;
use proptest::prelude::*;

fn op() -> impl Strategy<Value = Op> {
    let ns = prop_oneof![Just("a"), Just("b/c")].prop_map(String::from);
    let id = "[a-d]".prop_map(String::from);
    let pre = prop_oneof![
        3 => Just(Precondition::None),
        1 => Just(Precondition::Absent),
        1 => (1u64..40).prop_map(Precondition::Revision),
    ];
    // Few texts and a few directions (with small jitter): exact and near duplicates abound.
    let embedding = (0usize..4, prop::collection::vec(-0.05f32..0.05, 3)).prop_map(|(d, jitter)| {
        let base = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]][d];
        base.iter().zip(jitter).map(|(b, j)| b + j).collect::<Vec<f32>>()
    });
    let expiry = prop_oneof![4 => Just(None), 1 => (0u64..200_000_000).prop_map(Some)];
    let item = (id.clone(), "[ab]{1,2}", embedding, pre.clone(), 0.0f32..=1.0, expiry).prop_map(
        |(id, text, embedding, pre, importance, expires_at_ms)| {
            (
                MemoryInput {
                    id,
                    text,
                    embedding,
                    tags: BTreeMap::from([("k".to_string(), "v".to_string())]),
                    importance,
                    expires_at_ms,
                },
                pre,
            )
        },
    );
    prop_oneof![
        6 => (ns.clone(), prop::collection::vec(item, 1..4)).prop_map(|(namespace, mut items)| {
            items.dedup_by(|a, b| a.0.id == b.0.id);
            Op::Put { namespace, items, approx_min_vectors: 64 }
        }),
        2 => (ns.clone(), id, pre).prop_map(|(namespace, id, precondition)| Op::Delete { namespace, id, precondition }),
        1 => ns.clone().prop_map(|namespace| Op::DeleteNamespace { namespace }),
        1 => (ns, prop_oneof![Just(3u32), Just(4u32)]).prop_map(|(namespace, dimension)| Op::CreateNamespace {
            namespace,
            dimension,
            metric: Metric::Cosine,
            approx_min_vectors: 64,
        }),
        2 => auth_op(),
        3 => memory_op(),
    ]
}

fn policy() -> impl Strategy<Value = MemoryPolicy> {
    let dedup = prop_oneof![Just(DedupMode::Off), Just(DedupMode::Text), Just(DedupMode::TextAndEmbedding)];
    let action = prop_oneof![Just(NearAction::Reject), Just(NearAction::Merge), Just(NearAction::Link)];
    let keep = prop_oneof![Just(KeepText::Longer), Just(KeepText::Newer)];
    let near = proptest::option::weighted(
        0.8,
        (0.9f32..0.999, action, keep).prop_map(|(threshold, action, keep)| NearDuplicate { threshold, action, keep }),
    );
    let gate = prop_oneof![
        3 => Just(Gate::default()),
        1 => Just(Gate { max_per_id_prefix: Some(2), id_prefix_separator: Some("b".into()), ..Gate::default() }),
        1 => Just(Gate { deny_patterns: vec!["^bb$".into()], ..Gate::default() }),
    ];
    let retention =
        prop::option::of((1u64..100_000_000).prop_map(|max_age_ms| Retention { max_age_ms, archive: false }));
    (dedup, any::<bool>(), near, prop::option::of(1u64..100_000_000), retention, gate).prop_map(
        |(dedup, dedup_merge, near_duplicate, default_ttl_ms, retention, gate)| MemoryPolicy {
            dedup,
            dedup_merge,
            near_duplicate,
            default_ttl_ms,
            retention,
            gate,
            ..MemoryPolicy::default()
        },
    )
}

/// Policies, purges, consolidation, retirement and reinforcement over the same ids.
fn memory_op() -> impl Strategy<Value = Op> {
    let ns = prop_oneof![Just("a"), Just("b/c")].prop_map(String::from);
    let id = "[a-d]".prop_map(String::from);
    let keep = prop_oneof![Just(KeepText::Longer), Just(KeepText::Newer)];
    prop_oneof![
        4 => (ns.clone(), policy()).prop_map(|(namespace, policy)| Op::SetPolicy { namespace, policy }),
        1 => (ns.clone(), policy()).prop_map(|(namespace, policy)| Op::DefineNamespace {
            namespace,
            dimension: 3,
            metric: Metric::Cosine,
            approx_min_vectors: 64,
            policy,
        }),
        1 => prop::collection::vec((ns.clone(), id.clone()), 0..6).prop_map(|items| Op::Purge { items }),
        1 => (ns.clone(), prop::collection::vec(((id.clone(), 1u64..40), prop::collection::vec((id.clone(), 1u64..40), 1..3)), 1..3), keep)
            .prop_map(|(namespace, clusters, keep)| Op::Consolidate {
                namespace,
                clusters: clusters.into_iter().map(|(keep, absorb)| ConsolidationCluster { keep, absorb }).collect(),
                keep,
            }),
        1 => (ns.clone(), prop::collection::vec((id.clone(), 1u64..40), 1..3), any::<bool>())
            .prop_map(|(namespace, items, archived)| Op::Retire { namespace, items, archived }),
        1 => (ns, prop::collection::vec((id, 1u32..5), 1..4)).prop_map(|(namespace, hits)| Op::Reinforce { namespace, hits }),
    ]
}

/// Keys 1..=3 with role "r" (or root for key 1), grants on "a" or "b/*" (some tagged), revocations, quotas.
fn auth_op() -> impl Strategy<Value = Op> {
    let key = (1u8..=3).prop_map(|i| KeyRecord {
        id: KeyId([i; 8]),
        name: format!("k{i}"),
        roles: vec![if i == 1 { "root".into() } else { "r".into() }],
        hash: [i; 32],
        created_at_ms: 0,
        expires_at_ms: (i == 3).then_some(100_000_000),
        revoked_at_ms: None,
    });
    let grant =
        (prop_oneof![Just("a"), Just("b/*")], any::<bool>(), any::<bool>()).prop_map(|(ns, write, tagged)| Grant {
            namespace: ns.into(),
            permissions: Permissions::of(if write {
                &[Permission::Read, Permission::Write][..]
            } else {
                &[Permission::Read][..]
            }),
            tag: tagged.then(|| ("k".to_string(), "v".to_string())),
        });
    prop_oneof![
        key.prop_map(|record| Op::CreateKey { record }),
        Just(Op::CreateRole { name: "r".into() }),
        grant.prop_map(|grant| Op::GrantRole { role: "r".into(), grant }),
        Just(Op::RevokeGrant { role: "r".into(), namespace: "a".into() }),
        (1u8..=3).prop_map(|i| Op::RevokeKey { id: KeyId([i; 8]) }),
        (prop::option::of(1u64..4), prop::option::of(1u64..6)).prop_map(|(n, m)| Op::SetQuota {
            tenant: "b".into(),
            quota: Quota { max_namespaces: n, max_memories_per_namespace: m, max_bytes_per_namespace: None },
        }),
    ]
}

fn command() -> impl Strategy<Value = Command> {
    let principal =
        prop_oneof![2 => Just(None), 1 => (1u8..=4).prop_map(|i| Some(Principal::Key { id: KeyId([i; 8]) }))];
    (op(), prop::option::of(("[a-c]", 0u8..2)), 0u64..200_000_000, principal).prop_map(
        |(op, key, now_ms, principal)| Command {
            principal,
            idempotency: key.map(|(k, f)| Idempotency { key: format!("key-{k}"), fingerprint: [f; 32] }),
            now_ms,
            op,
        },
    )
}

fn entries(cmds: &[Command]) -> Vec<Entry> {
    cmds.iter()
        .enumerate()
        .map(|(i, c)| Entry {
            log_id: LogId::new(openraft::vote::leader_id_adv::LeaderId { term: 1, node_id: 1 }, i as u64 + 1),
            payload: EntryPayload::Normal(c.clone()),
        })
        .collect()
}

struct Fresh {
    _dir: tempfile::TempDir,
    sm: StateMachineStore,
}

fn fresh() -> Fresh {
    let dir = tempfile::tempdir().unwrap();
    let sm = StateMachineStore::open(&dir.path().join("state.redb"), dir.path().join("snap.bin")).unwrap();
    Fresh { _dir: dir, sm }
}

async fn apply_in_chunks(sm: &mut StateMachineStore, entries: &[Entry], chunk: usize) {
    for part in entries.chunks(chunk.max(1)) {
        let stream = futures::stream::iter(part.iter().cloned().map(|e| Ok((e, None))));
        sm.apply(stream).await.unwrap();
    }
}

fn digest(sm: &StateMachineStore) -> [u8; 32] {
    StateReader::new(sm.database()).digest().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn same_log_same_state(cmds in prop::collection::vec(command(), 1..40), chunk in 1usize..8) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let entries = entries(&cmds);
            let (mut a, mut b, mut c) = (fresh(), fresh(), fresh());
            apply_in_chunks(&mut a.sm, &entries, entries.len()).await;
            apply_in_chunks(&mut b.sm, &entries, chunk).await;
            prop_assert_eq!(digest(&a.sm), digest(&b.sm));
            // What byte and memory quotas count is what the namespace holds.
            let reader = StateReader::new(a.sm.database());
            for ns in reader.namespaces().unwrap() {
                let (_, page) = reader.list(&ns.name, None, 100_000, 0).unwrap();
                prop_assert_eq!(ns.memory_count, page.memories.len() as u64, "{}", ns.name);
                prop_assert_eq!(ns.bytes, page.memories.iter().map(|m| m.stored_bytes()).sum::<u64>(), "{}", ns.name);
            }

            // A snapshot of `a` installed on a fresh node reproduces the state exactly.
            let snap = a.sm.build_snapshot().await.unwrap();
            c.sm.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
            prop_assert_eq!(digest(&a.sm), digest(&c.sm));
            Ok(())
        })?;
    }
}
