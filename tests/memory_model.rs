//! The memory model through the real path (3-node clusters, gRPC, redb, FAISS): exact dedup
//! under concurrency, near-duplicates, consolidation, decay ranking, reinforcement, TTL purge,
//! retention archives and the verification gate. Each test ends with equal digests on every
//! node: every decision is made in `apply`, the same everywhere.

mod common;

use std::time::Duration;

use common::TestCluster;
use engram::client::{Client, Consistency, NewMemory, Precondition};
use engram::proto as pb;
use tonic::Code;

const DIM: usize = 4;

/// A unit vector at `deg` degrees in the first plane: cos(a - b) between two of them.
fn at(deg: f32) -> Vec<f32> {
    let r = deg.to_radians();
    vec![r.cos(), r.sin(), 0.0, 0.0]
}

fn now_ms() -> u64 {
    engram::memory::now_ms()
}

async fn same_state(cluster: &TestCluster) {
    cluster.settle().await;
    let digests = cluster.digests().await;
    assert!(digests.windows(2).all(|w| w[0].1 == w[1].1), "state diverged: {digests:?}");
}

async fn create(client: &Client, ns: &str, policy: pb::MemoryPolicy) {
    client.create_namespace_with_policy(ns, DIM as u32, pb::Metric::Cosine, Some(policy)).await.unwrap();
}

async fn stats(client: &Client, ns: &str) -> pb::NamespaceStats {
    client.describe_namespace(ns).await.unwrap().stats.unwrap()
}

fn near(threshold: f32, action: pb::NearAction) -> pb::MemoryPolicy {
    pb::MemoryPolicy {
        near_duplicate: Some(pb::NearDuplicatePolicy { threshold, action: action as i32, keep: 0 }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_identical_adds_give_one_memory() {
    let cluster = TestCluster::start(3).await;
    let ns = "acme/dedup";
    create(&cluster.client(), ns, pb::MemoryPolicy { dedup: pb::DedupMode::Text as i32, ..Default::default() }).await;

    // 64 clients add the same memory at once; none of them names an id.
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let client = cluster.client();
            tokio::spawn(async move { client.put(ns, NewMemory::new("the user prefers tea", at(10.0))).await.unwrap() })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    let created: Vec<_> = answers.iter().filter(|a| a.action == pb::PutAction::Created as i32).collect();
    let dedup: Vec<_> = answers.iter().filter(|a| a.deduplicated).collect();
    assert_eq!(created.len(), 1, "{answers:?}");
    assert_eq!(dedup.len(), 63);
    assert!(dedup.iter().all(|a| a.id == created[0].id && a.action == pb::PutAction::Deduplicated as i32));
    let all = cluster.client().list_all(ns).await.unwrap();
    assert_eq!(all.len(), 1);
    let s = stats(&cluster.client(), ns).await;
    assert_eq!((s.created, s.dedup_hits), (1, 63));
    assert!((s.dedup_hit_rate - 63.0 / 64.0).abs() < 1e-9);

    // Other text is another memory; the same text in another namespace is too.
    let other = cluster.client().put(ns, NewMemory::new("the user prefers coffee", at(10.0))).await.unwrap();
    assert_eq!(other.action, pb::PutAction::Created as i32);
    let elsewhere = cluster.client().put("acme/other", NewMemory::new("the user prefers tea", at(10.0))).await.unwrap();
    assert_eq!(elsewhere.action, pb::PutAction::Created as i32);
    same_state(&cluster).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exact_dedup_modes_and_merge() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    let ns = "acme/modes";
    let policy =
        pb::MemoryPolicy { dedup: pb::DedupMode::TextAndEmbedding as i32, dedup_merge: true, ..Default::default() };
    create(&client, ns, policy).await;
    let first = client.put(ns, NewMemory::new("likes jazz", at(0.0)).with_tag("src", "chat")).await.unwrap();
    // Same text, another vector: not a duplicate under text+embedding.
    let moved = client.put(ns, NewMemory::new("likes jazz", at(30.0))).await.unwrap();
    assert_eq!(moved.action, pb::PutAction::Created as i32);
    // Same text and vector: merged into the first (tags united, importance raised, one access).
    let mut again = NewMemory::new("likes jazz", at(0.0)).with_tag("mood", "calm");
    again.importance = Some(0.9);
    let dup = client.put(ns, again).await.unwrap();
    assert!(dup.deduplicated);
    assert_eq!(dup.id, first.id);
    let m = client.get(ns, &first.id).await.unwrap();
    assert_eq!(m.tags.get("src").map(String::as_str), Some("chat"));
    assert_eq!(m.tags.get("mood").map(String::as_str), Some("calm"));
    assert_eq!(m.importance, 0.9);
    assert_eq!(m.access_count, 1);
    assert_eq!(m.revision, dup.revision);
    same_state(&cluster).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn near_duplicates_are_rejected_merged_or_linked_per_policy() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();

    // Reject: cos(8°) = 0.990 >= 0.95 is refused naming the twin; cos(25°) = 0.906 is kept.
    let ns = "acme/near-reject";
    create(&client, ns, near(0.95, pb::NearAction::Reject)).await;
    let a = client.put(ns, NewMemory::new("lives in Paris", at(0.0)).with_id("a")).await.unwrap();
    let err = client.put(ns, NewMemory::new("lives in Paris, France", at(8.0))).await.unwrap_err();
    assert_eq!(err.code, Code::AlreadyExists, "{err}");
    assert!(err.message.contains("\"a\""), "{err}");
    let b = client.put(ns, NewMemory::new("works in Lyon", at(25.0))).await.unwrap();
    assert_eq!(b.action, pb::PutAction::Created as i32);
    // A batch whose second item twins its first is refused whole.
    let err = client
        .put_batch(
            ns,
            vec![
                (NewMemory::new("likes cats", at(90.0)), Precondition::None),
                (NewMemory::new("likes cats a lot", at(91.0)), Precondition::None),
            ],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::AlreadyExists);
    assert_eq!(client.list_all(ns).await.unwrap().len(), 2);
    // Updating a memory in place is not a duplicate of itself.
    let upd = client.put(ns, NewMemory::new("lives in Paris (updated)", at(1.0)).with_id("a")).await.unwrap();
    assert_eq!(upd.action, pb::PutAction::Updated as i32);
    assert!(upd.revision > a.revision);

    // Merge (keep the longer text): the twin absorbs the put.
    let ns = "acme/near-merge";
    create(&client, ns, near(0.95, pb::NearAction::Merge)).await;
    client.put(ns, NewMemory::new("likes tea", at(0.0)).with_id("t").with_tag("k", "1")).await.unwrap();
    let merged = client.put(ns, NewMemory::new("likes green tea a lot", at(5.0)).with_tag("j", "2")).await.unwrap();
    assert_eq!((merged.action, merged.id.as_str()), (pb::PutAction::Merged as i32, "t"));
    let t = client.get(ns, "t").await.unwrap();
    assert_eq!(t.text, "likes green tea a lot");
    assert_eq!(t.merge_count, 1);
    assert_eq!(t.merged_from.len(), 1);
    assert_eq!(t.tags.len(), 2);
    let apart = client.put(ns, NewMemory::new("hates mornings", at(60.0))).await.unwrap();
    assert_eq!(apart.action, pb::PutAction::Created as i32);
    assert_eq!(client.list_all(ns).await.unwrap().len(), 2);
    assert_eq!(stats(&client, ns).await.near_merges, 1);

    // Link: both kept, the new one names its twin.
    let ns = "acme/near-link";
    create(&client, ns, near(0.95, pb::NearAction::Link)).await;
    client.put(ns, NewMemory::new("owns a bike", at(0.0)).with_id("bike")).await.unwrap();
    let linked = client.put(ns, NewMemory::new("owns a red bike", at(3.0))).await.unwrap();
    assert_eq!(linked.action, pb::PutAction::Linked as i32);
    assert_eq!(linked.linked_to, "bike");
    assert_eq!(client.get(ns, &linked.id).await.unwrap().linked_to, "bike");
    same_state(&cluster).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consolidation_merges_exactly_what_its_dry_run_listed() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    let ns = "acme/consolidate";
    client.create_namespace(ns, DIM as u32, pb::Metric::Cosine).await.unwrap();
    let put = |id: &str, deg: f32, importance: f32| {
        let mut m = NewMemory::new(format!("memory {id}"), at(deg)).with_id(id);
        m.importance = Some(importance);
        (m, Precondition::None)
    };
    // Two clusters at 0.99: {a0, a1, a2} (within 4°) and {b0, b1}; singles 45° and more apart.
    client
        .put_batch(
            ns,
            vec![
                put("a0", 0.0, 0.2),
                put("a1", 2.0, 0.9),
                put("a2", 4.0, 0.1),
                put("b0", 120.0, 0.5),
                put("b1", 121.0, 0.5),
                put("s1", 45.0, 0.5),
                put("s2", 200.0, 0.5),
                put("s3", 270.0, 0.5),
            ],
        )
        .await
        .unwrap();
    let dry = client.consolidate(ns, Some(0.99), true).await.unwrap();
    let listed: Vec<(String, Vec<String>)> = dry.clusters.iter().map(|c| (c.keep.clone(), c.absorb.clone())).collect();
    // Keepers: the most important (a1), then the oldest, then the smallest id (b0).
    assert_eq!(
        listed,
        vec![("a1".to_string(), vec!["a0".to_string(), "a2".to_string()]), ("b0".to_string(), vec!["b1".to_string()])]
    );
    assert_eq!(client.list_all(ns).await.unwrap().len(), 8, "a dry run changes nothing");

    let done = client.consolidate(ns, Some(0.99), false).await.unwrap();
    let merged: Vec<(String, Vec<String>)> = done.clusters.iter().map(|c| (c.keep.clone(), c.absorb.clone())).collect();
    assert_eq!(merged, listed);
    assert!(done.clusters.iter().all(|c| c.merged));
    assert_eq!(done.absorbed, 3);
    let mut ids: Vec<String> = client.list_all(ns).await.unwrap().into_iter().map(|m| m.id).collect();
    ids.sort();
    assert_eq!(ids, ["a1", "b0", "s1", "s2", "s3"]);
    let a1 = client.get(ns, "a1").await.unwrap();
    assert_eq!(a1.merge_count, 2);
    assert_eq!(a1.merged_from, ["a0", "a2"]);
    assert_eq!(stats(&client, ns).await.consolidated, 3);
    // Nothing left to merge.
    assert!(client.consolidate(ns, Some(0.99), false).await.unwrap().clusters.is_empty());
    same_state(&cluster).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn decay_ranking_follows_the_formula_on_every_node() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    let ns = "acme/rank";
    client.create_namespace(ns, DIM as u32, pb::Metric::Cosine).await.unwrap();
    // Similarities to the query at 0°: a 1.0, b cos 36.87° = 0.8, c cos 53.13° = 0.6.
    for (id, deg, importance) in [("a", 0.0f32, 0.0f32), ("b", 36.8699, 0.5), ("c", 53.1301, 1.0)] {
        let mut m = NewMemory::new(format!("memory {id}"), at(deg)).with_id(id);
        m.importance = Some(importance);
        client.put(ns, m).await.unwrap();
    }
    cluster.settle().await;
    let query = |ranking: Option<pb::DecayPolicy>, now: u64| pb::SearchRequest {
        namespace: ns.into(),
        vector: at(0.0),
        k: 3,
        ranking,
        ranking_now_ms: now,
        include_memory: true,
        ..Default::default()
    };
    let ids = |r: &pb::SearchResponse| r.hits.iter().map(|h| h.id.clone()).collect::<Vec<_>>();
    // Default: pure similarity, as before policies.
    let plain = client.search_with(query(None, 0)).await.unwrap();
    assert_eq!(ids(&plain), ["a", "b", "c"]);
    assert!(plain.hits.iter().all(|h| h.rank_score == 0.0));
    // similarity + importance: a 1.0, b 1.3, c 1.6.
    let w = pb::DecayPolicy { half_life_ms: 1000, similarity: 1.0, importance: 1.0, recency: 0.0, access: 0.0 };
    let ranked = client.search_with(query(Some(w), 0)).await.unwrap();
    assert_eq!(ids(&ranked), ["c", "b", "a"]);
    for (hit, want) in ranked.hits.iter().zip([1.6, 1.3, 1.0]) {
        assert!((hit.rank_score - want).abs() < 1e-5, "{}: {} vs {want}", hit.id, hit.rank_score);
    }
    // Recency alone, measured from a fixed now one half-life after the newest write: the
    // newest scores 2^-1, each older one 2^-(1 + its head start in half-lives).
    let newest = plain.hits.iter().map(|h| h.memory.as_ref().unwrap().updated_at_ms).max().unwrap();
    let w = pb::DecayPolicy { half_life_ms: 10_000, similarity: 0.0, importance: 0.0, recency: 1.0, access: 0.0 };
    let now = newest + 10_000;
    let by_age = client.search_with(query(Some(w), now)).await.unwrap();
    for hit in &by_age.hits {
        let m = hit.memory.as_ref().unwrap();
        let want = (-((now - m.updated_at_ms) as f64 / 10_000.0)).exp2();
        assert!((hit.rank_score - want).abs() < 1e-12, "{}: {} vs {want}", hit.id, hit.rank_score);
    }
    // Identical on every node.
    for id in cluster.running() {
        let r = cluster.pinned(id).search_with(query(Some(w), now)).await.unwrap();
        assert_eq!(
            r.hits.iter().map(|h| (h.id.clone(), h.rank_score)).collect::<Vec<_>>(),
            by_age.hits.iter().map(|h| (h.id.clone(), h.rank_score)).collect::<Vec<_>>()
        );
    }
    // A namespace's policy weights apply when the request gives none.
    let p = pb::MemoryPolicy {
        decay: Some(pb::DecayPolicy {
            half_life_ms: 1000,
            similarity: 1.0,
            importance: 1.0,
            recency: 0.0,
            access: 0.0,
        }),
        ..Default::default()
    };
    client.set_namespace_policy(ns, p).await.unwrap();
    assert_eq!(ids(&client.search_with(query(None, 0)).await.unwrap()), ["c", "b", "a"]);
    // Bad weights are refused.
    let bad = pb::DecayPolicy { half_life_ms: 0, similarity: 1.0, importance: 0.0, recency: 1.0, access: 0.0 };
    assert_eq!(client.search_with(query(Some(bad), 0)).await.unwrap_err().code, Code::InvalidArgument);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reinforcement_coalesces_hits_into_few_entries() {
    let cluster = TestCluster::start(3).await;
    let leader = cluster.wait_for_leader().await;
    let client = cluster.pinned(leader);
    let ns = "acme/reinforce";
    client.create_namespace(ns, DIM as u32, pb::Metric::Cosine).await.unwrap();
    client.put(ns, NewMemory::new("one", at(0.0)).with_id("one")).await.unwrap();
    let last = client.put(ns, NewMemory::new("two", at(60.0)).with_id("two")).await.unwrap();
    let rev = client.get(ns, "one").await.unwrap().revision;
    cluster.settle().await;
    let before = cluster.handle(leader).reader.applied_index().unwrap();
    assert!(before >= last.applied_index);

    let hits = 100;
    for _ in 0..hits {
        let req =
            pb::SearchRequest { namespace: ns.into(), vector: at(0.0), k: 1, reinforce: true, ..Default::default() };
        assert_eq!(client.search_with(req).await.unwrap().hits[0].id, "one");
    }
    let get = pb::GetRequest { namespace: ns.into(), id: "two".into(), consistency: 0, reinforce: true };
    client.get_request(get).await.unwrap();
    // Flushed within a few flush intervals.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let one = client.get(ns, "one").await.unwrap();
        if one.access_count == hits && client.get(ns, "two").await.unwrap().access_count == 1 {
            assert_eq!(one.revision, rev, "reinforcement keeps the revision");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "hits were not flushed: {}", one.access_count);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.settle().await;
    let entries = cluster.handle(leader).reader.applied_index().unwrap() - before;
    assert!(entries <= 10, "{hits} hits took {entries} log entries");
    assert_eq!(stats(&client, ns).await.reinforced, hits + 1);
    // Access counts rank: access weight alone puts the reinforced memory first.
    let w = pb::DecayPolicy { half_life_ms: 1000, similarity: 0.0, importance: 0.0, recency: 0.0, access: 1.0 };
    let req =
        pb::SearchRequest { namespace: ns.into(), vector: at(60.0), k: 2, ranking: Some(w), ..Default::default() };
    let r = client.search_with(req).await.unwrap();
    assert_eq!(r.hits[0].id, "one");
    assert!((r.hits[0].rank_score - (1.0 - 1.0 / (1.0 + hits as f64))).abs() < 1e-12);
    same_state(&cluster).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_memories_vanish_everywhere_and_are_purged() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    let ns = "acme/ttl";
    client.create_namespace(ns, DIM as u32, pb::Metric::Cosine).await.unwrap();
    // A write already expired is refused.
    let mut past = NewMemory::new("old news", at(0.0));
    past.expires_at_ms = Some(now_ms() - 1000);
    assert_eq!(client.put(ns, past).await.unwrap_err().code, Code::InvalidArgument);

    let expires = now_ms() + 1500;
    let mut m = NewMemory::new("short-lived", at(0.0)).with_id("short");
    m.expires_at_ms = Some(expires);
    client.put(ns, m).await.unwrap();
    client.put(ns, NewMemory::new("lasting", at(90.0)).with_id("long")).await.unwrap();
    assert_eq!(client.get(ns, "short").await.unwrap().expires_at_ms, expires);
    let search = || pb::SearchRequest { namespace: ns.into(), vector: at(0.0), k: 5, ..Default::default() };
    assert_eq!(client.search_with(search()).await.unwrap().hits.len(), 2);

    tokio::time::sleep(Duration::from_millis(expires.saturating_sub(now_ms()) + 50)).await;
    // Expired: absent to reads at once, on every node.
    for id in cluster.running() {
        let c = cluster.pinned(id);
        assert_eq!(c.get(ns, "short").await.unwrap_err().code, Code::NotFound);
        let hits = c.search_with(search()).await.unwrap().hits;
        assert_eq!(hits.iter().map(|h| h.id.as_str()).collect::<Vec<_>>(), ["long"]);
        assert_eq!(c.list_all(ns).await.unwrap().len(), 1);
    }
    // ...and to writes: if_absent holds, a delete finds nothing.
    assert!(!client.delete(ns, "short").await.unwrap().deleted);
    // Physically purged within a few purge intervals.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let d = client.describe_namespace(ns).await.unwrap();
        if d.stats.unwrap().purged == 1 {
            assert_eq!(d.namespace.unwrap().memory_count, 1);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never purged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every node applies the purge (followers may be a moment behind the leader's answer).
    for id in cluster.running() {
        while cluster.handle(id).reader.next_expiry().unwrap().is_some() {
            assert!(tokio::time::Instant::now() < deadline, "node {id} never applied the purge");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let again = client.put_if(ns, NewMemory::new("reborn", at(0.0)).with_id("short"), Precondition::IfAbsent).await;
    assert_eq!(again.unwrap().action, pb::PutAction::Created as i32);

    // A default TTL stamps puts that give none.
    let ns2 = "acme/ttl-default";
    create(&client, ns2, pb::MemoryPolicy { default_ttl_ms: 60_000, ..Default::default() }).await;
    let put = client.put(ns2, NewMemory::new("fleeting", at(0.0))).await.unwrap();
    let m = client.get(ns2, &put.id).await.unwrap();
    assert_eq!(m.expires_at_ms, m.created_at_ms + 60_000);
    same_state(&cluster).await;
    cluster.shutdown().await;
}

const KEY: &str = "3c1f0c3b9a8e2d4c6b5a49382716f5e4d3c2b1a0f9e8d7c6b5a4938271605f4e";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_drops_or_archives_and_the_archive_restores() {
    // SAFETY: no other test in this binary reads or sets this variable.
    unsafe { std::env::set_var(engram::backup::keys::KEY_ENV, KEY) };
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    let retain = |archive| pb::MemoryPolicy {
        retention: Some(pb::RetentionPolicy { max_age_ms: 2_000, archive }),
        ..Default::default()
    };
    let (dropped, archived) = ("acme/retain-drop", "acme/retain-archive");
    create(&client, dropped, retain(false)).await;
    create(&client, archived, retain(true)).await;
    let mut originals = Vec::new();
    for i in 0..5 {
        client.put(dropped, NewMemory::new(format!("drop {i}"), at(i as f32 * 30.0))).await.unwrap();
        let put = client
            .put(archived, NewMemory::new(format!("keep {i}"), at(i as f32 * 30.0)).with_tag("i", i.to_string()))
            .await
            .unwrap();
        originals.push(client.get(archived, &put.id).await.unwrap());
    }
    // Younger than the limit: still there.
    assert_eq!(client.list_all(archived).await.unwrap().len(), 5);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (d, a) = (stats(&client, dropped).await, stats(&client, archived).await);
        if d.retired == 5 && a.archived == 5 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "retention did not run: {d:?} {a:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(client.list_all(dropped).await.unwrap().is_empty());
    assert!(client.list_all(archived).await.unwrap().is_empty());
    same_state(&cluster).await;

    // The archive is a backup: a cluster restored from it holds exactly the archived memories.
    let mut files = Vec::new();
    for slot in &cluster.slots {
        for entry in walk(slot.dir.path()) {
            if entry.file_name().is_some_and(|n| n.to_string_lossy().starts_with("archive-")) {
                files.push(entry);
            }
        }
    }
    // Memories cross the age limit tick by tick, so there may be several archives.
    assert!(!files.is_empty());
    let keys = engram::backup::Keyring::from_env_value(KEY).unwrap();
    let kept = tempfile::tempdir().unwrap();
    let copies: Vec<_> = files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let to = kept.path().join(format!("archive-{i}.engram"));
            std::fs::copy(f, &to).unwrap();
            to
        })
        .collect();
    cluster.shutdown().await;
    let mut back = Vec::new();
    for archive in &copies {
        let restored = TestCluster::restored(archive, 1, &keys, |_| {}).await;
        back.extend(restored.client().list_all(archived).await.unwrap());
        restored.shutdown().await;
    }
    back.sort_by(|a, b| a.id.cmp(&b.id));
    originals.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(back, originals);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_gate_rule_refuses_and_changes_nothing() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    let ns = "acme/gate";
    let gate = pb::VerificationGate {
        required_tags: vec!["user".into()],
        allowed_tag_keys: vec!["user".into(), "kind".into()],
        allowed_tag_values: [("kind".to_string(), pb::TagValues { values: vec!["fact".into()] })].into(),
        min_text_bytes: 3,
        max_text_bytes: 40,
        min_norm: Some(0.5),
        max_norm: Some(2.0),
        deny_patterns: vec!["(?i)password".into()],
        max_per_id_prefix: 2,
        id_prefix_separator: String::new(),
    };
    create(&client, ns, pb::MemoryPolicy { gate: Some(gate), ..Default::default() }).await;
    let ok = || NewMemory::new("a fine fact", at(0.0)).with_tag("user", "u1");
    client.put(ns, ok().with_id("u1:a")).await.unwrap();
    client.put(ns, ok().with_id("u1:b")).await.unwrap();
    let snapshot = || async {
        let d = client.describe_namespace(ns).await.unwrap();
        (client.list_all(ns).await.unwrap(), d.namespace, d.stats)
    };
    let before = snapshot().await;

    let scaled = |k: f32| at(0.0).into_iter().map(|x| x * k).collect::<Vec<_>>();
    let cases: Vec<(&str, NewMemory)> = vec![
        ("required_tags", NewMemory::new("a fine fact", at(0.0))),
        ("allowed_tag_keys", ok().with_tag("color", "red")),
        ("allowed_tag_values", ok().with_tag("kind", "opinion")),
        ("min_text_bytes", NewMemory::new("ab", at(0.0)).with_tag("user", "u1")),
        ("max_text_bytes", NewMemory::new("x".repeat(41), at(0.0)).with_tag("user", "u1")),
        ("min_norm", NewMemory::new("a fine fact", scaled(0.1)).with_tag("user", "u1")),
        ("max_norm", NewMemory::new("a fine fact", scaled(3.0)).with_tag("user", "u1")),
        ("deny_patterns[0]", NewMemory::new("my PASSWORD is hunter2", at(0.0)).with_tag("user", "u1")),
        ("max_per_id_prefix", ok().with_id("u1:c")),
    ];
    for (rule, m) in cases {
        let err = client.put(ns, m).await.unwrap_err();
        assert_eq!(err.code, Code::InvalidArgument, "{rule}: {err}");
        assert!(err.message.contains(rule), "{rule}: {err}");
    }
    let zero = NewMemory::new("a fine fact", vec![0.0; DIM]).with_tag("user", "u1");
    assert_eq!(client.put(ns, zero).await.unwrap_err().code, Code::InvalidArgument);
    // Refusals wrote nothing: memories, namespace and counters are as before.
    assert_eq!(snapshot().await, before);
    // Another prefix has its own count.
    client.put(ns, ok().with_id("u2:a")).await.unwrap();

    // A bad policy is refused and changes nothing.
    let bad = pb::MemoryPolicy {
        gate: Some(pb::VerificationGate { deny_patterns: vec!["(unclosed".into()], ..Default::default() }),
        ..Default::default()
    };
    let err = client.set_namespace_policy(ns, bad).await.unwrap_err();
    assert_eq!(err.code, Code::InvalidArgument);
    assert!(err.field.as_deref().unwrap_or("").contains("deny_patterns"), "{err}");
    let shown = client.describe_namespace(ns).await.unwrap().policy.unwrap();
    assert_eq!(shown.gate.unwrap().max_per_id_prefix, 2);
    let err = client.describe_namespace("acme/missing").await.unwrap_err();
    assert_eq!(err.code, Code::NotFound);
    let stale = client.get_with(ns, "u1:a", Consistency::Stale).await.unwrap();
    assert!(stale.memory.is_some());
    same_state(&cluster).await;
    cluster.shutdown().await;
}
