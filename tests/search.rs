//! Semantic search through the real path: FAISS shards fed by the replicated state machine,
//! linearizable on every node, filtered inside the index, rebuilt from redb on restart.

mod common;

use common::TestCluster;
use engram::api::status::FIELD_HEADER;
use engram::client::{Consistency, Metric, NewMemory, Precondition};
use engram::proto as pb;
use tonic::Code;

const NS: &str = "acme/search";
const DIM: usize = 8;

/// Unit-ish vectors that are pairwise distinct: memory i points mostly along axis i % DIM.
fn vec_for(i: u32) -> Vec<f32> {
    (0..DIM).map(|d| if d == i as usize % DIM { 1.0 } else { 0.01 * ((i as usize * 7 + d) % 13) as f32 }).collect()
}

fn req(vector: Vec<f32>, k: u32) -> pb::SearchRequest {
    pb::SearchRequest { namespace: NS.into(), vector, k, ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_acknowledged_put_is_found_by_the_next_search_on_any_node() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    client.create_namespace(NS, DIM as u32, Metric::Cosine).await.unwrap();
    // Phase 1: after each acknowledged put, every node's linearizable search finds it first.
    for i in 0..6u32 {
        let id = format!("m{i}");
        client.put(NS, NewMemory::new(format!("memory {i}"), vec_for(i)).with_id(id.clone())).await.unwrap();
        for node in cluster.running() {
            let r = cluster.pinned(node).search(NS, vec_for(i), 1).await.unwrap();
            assert_eq!(r.hits[0].id, id, "node {node} missed the write it must see");
            assert!((r.hits[0].score - 1.0).abs() < 1e-4, "cosine of a vector with itself: {}", r.hits[0].score);
        }
    }
    // Phase 2: updates move a memory; deletes never come back.
    client.put(NS, NewMemory::new("moved", vec_for(7)).with_id("m0")).await.unwrap();
    let r = client.search(NS, vec_for(0), 8).await.unwrap();
    assert!(r.hits.iter().all(|h| h.id != "m0" || h.score < 0.9));
    assert_eq!(client.search(NS, vec_for(7), 1).await.unwrap().hits[0].id, "m0");
    client.delete(NS, "m3").await.unwrap();
    for node in cluster.running() {
        let r = cluster.pinned(node).search(NS, vec_for(3), 10).await.unwrap();
        assert!(r.hits.iter().all(|h| h.id != "m3"), "node {node}: deleted memory came back");
    }
    // Phase 3: include_memory returns the stored memory with the hit.
    let r = client.search_with(pb::SearchRequest { include_memory: true, ..req(vec_for(1), 1) }).await.unwrap();
    assert_eq!(r.hits[0].memory.as_ref().unwrap().text, "memory 1");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn filters_return_only_matches_and_k_when_k_exist() {
    let cluster = TestCluster::start(1).await;
    let client = cluster.client();
    let items = (0..60u32)
        .map(|i| {
            let mut m = NewMemory::new(format!("t{i}"), vec_for(i))
                .with_id(format!("m{i:02}"))
                .with_tag("kind", if i % 3 == 0 { "fact" } else { "preference" })
                .with_tag("user", format!("u{}", i % 4));
            m.importance = Some((i % 10) as f32 / 10.0);
            (m, Precondition::None)
        })
        .collect();
    client.put_batch(NS, items).await.unwrap();
    let search = |filter: pb::SearchFilter, k: u32| {
        let client = client.clone();
        async move {
            client
                .search_with(pb::SearchRequest { filter: Some(filter), include_memory: true, ..req(vec_for(1), k) })
                .await
                .unwrap()
                .hits
        }
    };
    // Tag equality: 20 facts exist, so k = 15 gives exactly 15, all facts.
    let hits =
        search(pb::SearchFilter { tags: [("kind".into(), "fact".into())].into(), ..Default::default() }, 15).await;
    assert_eq!(hits.len(), 15);
    assert!(hits.iter().all(|h| h.memory.as_ref().unwrap().tags["kind"] == "fact"));
    // Set membership AND equality: users u1 or u2 among preferences.
    let f = pb::SearchFilter {
        tags: [("kind".into(), "preference".into())].into(),
        tag_in: vec![pb::TagIn { key: "user".into(), values: vec!["u1".into(), "u2".into()] }],
        ..Default::default()
    };
    let hits = search(f, 60).await;
    let expected = (0..60).filter(|i| i % 3 != 0 && (i % 4 == 1 || i % 4 == 2)).count();
    assert_eq!(hits.len(), expected);
    // Minimum importance.
    let hits = search(pb::SearchFilter { min_importance: Some(0.8), ..Default::default() }, 60).await;
    assert_eq!(hits.len(), 12);
    assert!(hits.iter().all(|h| h.memory.as_ref().unwrap().importance >= 0.8));
    // Time range: everything was created at one instant by one batch.
    let created = hits[0].memory.as_ref().unwrap().created_at_ms;
    let f = pb::SearchFilter { created_after_ms: created + 1, ..Default::default() };
    assert!(search(f, 10).await.is_empty());
    let f = pb::SearchFilter { created_after_ms: created, created_before_ms: created + 1, ..Default::default() };
    assert_eq!(search(f, 10).await.len(), 10);
    // A filter nothing matches returns nothing.
    assert!(search(pb::SearchFilter { tags: [("kind".into(), "nope".into())].into(), ..Default::default() }, 5)
        .await
        .is_empty());
    cluster.shutdown().await;
}

const NS2: &str = "acme/tagged";

/// Pseudo-random vectors (SplitMix64), so no two memories tie on a score.
fn rvec(i: u32) -> Vec<f32> {
    (0..DIM as u64)
        .map(|d| {
            let mut z = (i as u64 * DIM as u64 + d).wrapping_add(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) % 2000) as f32 / 1000.0 - 1.0
        })
        .collect()
}

/// Searches whose answers must survive restarts: IVF probed exhaustively (so the answer is
/// exact whatever the centroids), a tag filter, and an exact L2 namespace.
fn restart_queries() -> Vec<pb::SearchRequest> {
    let mut out = Vec::new();
    for i in 0..6u32 {
        out.push(pb::SearchRequest { nprobe: 1000, ..req(rvec(i * 5), 10) });
        out.push(pb::SearchRequest {
            namespace: NS2.into(),
            filter: Some(pb::SearchFilter {
                tags: [("colour".to_string(), "red".to_string())].into(),
                ..Default::default()
            }),
            ..req(rvec(i), 5)
        });
    }
    out
}

type Answers = Vec<Vec<(String, f32)>>;

async fn answers(cluster: &TestCluster, node: u64) -> Answers {
    let mut out = Vec::new();
    for q in restart_queries() {
        let hits = cluster.pinned(node).search_with(q).await.unwrap().hits;
        out.push(hits.into_iter().map(|h| (h.id, h.score)).collect());
    }
    out
}

fn assert_same(got: &Answers, want: &Answers, context: &str) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        let ids = |a: &[(String, f32)]| a.iter().map(|h| h.0.clone()).collect::<Vec<_>>();
        assert_eq!(ids(g), ids(w), "{context}");
        for (a, b) in g.iter().zip(w) {
            assert!((a.1 - b.1).abs() < 1e-4, "{context}: {a:?} vs {b:?}");
        }
    }
}

async fn write_tagged(client: &engram::client::Client, range: std::ops::Range<u32>) {
    let items = range
        .map(|i| {
            let colour = if i % 3 == 0 { "red" } else { "blue" };
            let m = NewMemory::new(format!("t{i}"), rvec(i)).with_id(format!("t{i}")).with_tag("colour", colour);
            (m, Precondition::None)
        })
        .collect();
    client.put_batch(NS2, items).await.unwrap();
}

/// Waits for every running node's background shard rebuilds.
fn settle(cluster: &TestCluster) {
    for id in cluster.running() {
        assert!(
            cluster.handle(id).vectors.wait_for_builds(std::time::Duration::from_secs(60)),
            "node {id} still building"
        );
    }
}

fn vectors_dir(cluster: &TestCluster, node: u64) -> std::path::PathBuf {
    cluster.slot(node).dir.path().join("vectors")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarts_give_the_same_answers_with_and_without_index_files() {
    // HNSW from 64 memories, parts of at most 50: NS becomes HNSW at 100 memories, in 2 parts.
    let mut cluster = TestCluster::start_with(3, |c| {
        c.approx_min_vectors = 64;
        c.vector_part_max = 50;
        c.vector_checkpoint_secs = 0;
    })
    .await;
    let client = cluster.client();
    client.create_namespace(NS2, DIM as u32, Metric::L2).await.unwrap();
    for chunk in (0..130u32).collect::<Vec<_>>().chunks(50) {
        let items = chunk
            .iter()
            .map(|i| (NewMemory::new(format!("m{i}"), rvec(*i)).with_id(format!("m{i}")), Precondition::None))
            .collect();
        client.put_batch(NS, items).await.unwrap();
    }
    write_tagged(&client, 0..30).await;
    client.delete(NS, "m5").await.unwrap();
    client.delete(NS2, "t3").await.unwrap();
    let leader = cluster.wait_for_leader().await;
    settle(&cluster);
    let kinds = cluster.handle(leader).vectors.shard_kinds();
    assert!(matches!(kinds[0].1, engram::memory::IndexKind::Hnsw { .. }) && kinds[0].3 == 2, "{kinds:?}");
    let first = answers(&cluster, leader).await;

    // 1. Clean stop writes index files; a restart loads them and rebuilds nothing.
    for id in cluster.running() {
        cluster.stop(id).await;
    }
    let stale = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(vectors_dir(&cluster, 1)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), stale.path().join(entry.file_name())).unwrap();
    }
    for id in [1, 2, 3] {
        cluster.restart(id).await;
    }
    cluster.wait_for_leader().await;
    for id in [1, 2, 3] {
        let report = cluster.handle(id).vectors.opened().unwrap();
        assert_eq!(report.loaded, vec![NS.to_string(), NS2.to_string()], "node {id}: {report:?}");
        assert!(report.rebuilt.is_empty(), "node {id}: {report:?}");
        assert_same(&answers(&cluster, id).await, &first, &format!("node {id} after loading index files"));
    }

    // 2. More writes, then three ways to find the files at the next start: stale (older than
    // the state: caught up from the log), missing (rebuilt) and corrupt (rebuilt).
    let client = cluster.client();
    client.put(NS, NewMemory::new("moved", rvec(3)).with_id("m0")).await.unwrap();
    client.put(NS, NewMemory::new("new", rvec(200)).with_id("m200")).await.unwrap();
    client.delete(NS, "m7").await.unwrap();
    write_tagged(&client, 30..40).await;
    client.delete(NS2, "t6").await.unwrap();
    let leader = cluster.wait_for_leader().await;
    let second = answers(&cluster, leader).await;
    assert_ne!(first, second, "the writes must change some answers");
    for id in cluster.running() {
        cluster.stop(id).await;
    }
    let dir1 = vectors_dir(&cluster, 1);
    std::fs::remove_dir_all(&dir1).unwrap();
    std::fs::create_dir(&dir1).unwrap();
    for entry in std::fs::read_dir(stale.path()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir1.join(entry.file_name())).unwrap();
    }
    std::fs::remove_dir_all(vectors_dir(&cluster, 2)).unwrap();
    let faiss = std::fs::read_dir(vectors_dir(&cluster, 3))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "faiss"))
        .unwrap();
    let mut bytes = std::fs::read(&faiss).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&faiss, bytes).unwrap();
    for id in [1, 2, 3] {
        cluster.restart(id).await;
    }
    cluster.wait_for_leader().await;
    let r1 = cluster.handle(1).vectors.opened().unwrap();
    assert_eq!(r1.loaded.len(), 2, "stale files are caught up from the log: {r1:?}");
    assert!(r1.caught_up >= 14, "{r1:?}");
    let r2 = cluster.handle(2).vectors.opened().unwrap();
    assert_eq!(r2.rebuilt.len(), 2, "{r2:?}");
    let r3 = cluster.handle(3).vectors.opened().unwrap();
    assert_eq!((r3.loaded.len(), r3.rebuilt.len()), (1, 1), "{r3:?}");
    assert!(r3.rebuilt[0].1.contains("checksum"), "{r3:?}");
    for id in [1, 2, 3] {
        assert_same(&answers(&cluster, id).await, &second, &format!("node {id} after the second restart"));
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_search_input_is_refused_naming_the_field() {
    let cluster = TestCluster::start(1).await;
    let client = cluster.client();
    client.put(NS, NewMemory::new("x", vec_for(1)).with_id("a")).await.unwrap();
    let leader = cluster.wait_for_leader().await;
    let mut raw = engram::proto::memory_service_client::MemoryServiceClient::connect(format!(
        "http://{}",
        cluster.slot(leader).api
    ))
    .await
    .unwrap();
    let cases: Vec<(pb::SearchRequest, &str)> = vec![
        (req(vec_for(1)[..4].to_vec(), 5), "vector"),
        (req(vec![f32::NAN; DIM], 5), "vector"),
        (req(vec![], 5), "vector"),
        (req(vec_for(1), 0), "k"),
        (req(vec_for(1), 5000), "k"),
        (pb::SearchRequest { namespace: "".into(), ..req(vec_for(1), 5) }, "namespace"),
        (pb::SearchRequest { score_threshold: Some(f32::NAN), ..req(vec_for(1), 5) }, "score_threshold"),
        (pb::SearchRequest { consistency: 9, ..req(vec_for(1), 5) }, "consistency"),
        (pb::SearchRequest { ef_search: 4097, ..req(vec_for(1), 5) }, "ef_search"),
        (pb::SearchRequest { ef_search: u32::MAX, ..req(vec_for(1), 5) }, "ef_search"),
        (
            pb::SearchRequest {
                filter: Some(pb::SearchFilter { tags: [("".into(), "v".into())].into(), ..Default::default() }),
                ..req(vec_for(1), 5)
            },
            "filter.tags",
        ),
        (
            pb::SearchRequest {
                filter: Some(pb::SearchFilter {
                    tag_in: vec![pb::TagIn { key: "k".into(), values: vec![] }],
                    ..Default::default()
                }),
                ..req(vec_for(1), 5)
            },
            "filter.tag_in[0].values",
        ),
        (
            pb::SearchRequest {
                filter: Some(pb::SearchFilter { created_after_ms: 10, created_before_ms: 5, ..Default::default() }),
                ..req(vec_for(1), 5)
            },
            "filter.created_before_ms",
        ),
        (
            pb::SearchRequest {
                filter: Some(pb::SearchFilter { min_importance: Some(2.0), ..Default::default() }),
                ..req(vec_for(1), 5)
            },
            "filter.min_importance",
        ),
    ];
    for (r, field) in cases {
        let s = raw.search(r).await.expect_err(field);
        assert_eq!(s.code(), Code::InvalidArgument, "{field}: {s:?}");
        assert_eq!(s.metadata().get(FIELD_HEADER).unwrap().to_str().unwrap(), field);
    }
    let s = raw.search(pb::SearchRequest { namespace: "no/such".into(), ..req(vec_for(1), 5) }).await.unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    // The node still serves.
    assert_eq!(client.search(NS, vec_for(1), 1).await.unwrap().hits[0].id, "a");
    let stale = client
        .search_with(pb::SearchRequest { consistency: Consistency::Stale as i32, ..req(vec_for(1), 1) })
        .await
        .unwrap();
    assert_eq!(stale.hits.len(), 1);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_namespaces_switch_to_hnsw_on_every_node_and_back() {
    use engram::vector::faiss::FaissKind;
    let mut cluster = TestCluster::start_with(3, |c| c.approx_min_vectors = 64).await;
    let client = cluster.client();
    let batch = |from: u32, to: u32| {
        (from..to)
            .map(|i| {
                (NewMemory::new(format!("t{i}"), vec_for(i * 13 + 1)).with_id(format!("m{i:03}")), Precondition::None)
            })
            .collect()
    };
    // Phase 1: small namespaces are exact.
    let r = client.put_batch(NS, batch(0, 40)).await.unwrap();
    cluster.wait_applied(r.applied_index).await;
    for id in cluster.running() {
        assert_eq!(cluster.handle(id).vectors.shard_kinds()[0].1, FaissKind::Flat);
    }
    // Phase 2: past the threshold every node builds an HNSW shard (in the background).
    let r = client.put_batch(NS, batch(40, 300)).await.unwrap();
    cluster.wait_applied(r.applied_index).await;
    settle(&cluster);
    for id in cluster.running() {
        assert_eq!(cluster.handle(id).vectors.shard_kinds()[0], (NS.to_string(), FaissKind::Hnsw { m: 32 }, 300, 1));
    }
    // So few candidates are scored exactly, and every node answers identically.
    let probe_all = |v: Vec<f32>| pb::SearchRequest { nprobe: 32, ..req(v, 5) };
    for q in [3u32, 77, 150] {
        let mut answers = Vec::new();
        for id in cluster.running() {
            answers.push(cluster.pinned(id).search_with(probe_all(vec_for(q * 13 + 1))).await.unwrap().hits);
        }
        assert!(answers.windows(2).all(|w| w[0] == w[1]), "nodes disagree: {answers:?}");
        assert!(answers[0][0].score > 0.999, "{:?}", answers[0][0]);
    }
    // Phase 3: deletes on an HNSW shard (tombstones) never come back.
    client.delete(NS, "m077").await.unwrap();
    let hits = client.search_with(probe_all(vec_for(77 * 13 + 1))).await.unwrap().hits;
    assert!(hits.iter().all(|h| h.id != "m077"));
    // Phase 4: a restart rebuilds the same kind and the same answers.
    let before = client.search_with(probe_all(vec_for(5))).await.unwrap().hits;
    for id in cluster.running() {
        cluster.stop(id).await;
    }
    for id in [1, 2, 3] {
        cluster.restart(id).await;
    }
    cluster.wait_for_leader().await;
    for id in cluster.running() {
        assert_eq!(cluster.handle(id).vectors.shard_kinds()[0].1, FaissKind::Hnsw { m: 32 });
        assert_eq!(cluster.pinned(id).search_with(probe_all(vec_for(5))).await.unwrap().hits, before);
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shrinking_namespaces_return_to_exact_shards() {
    use engram::vector::faiss::FaissKind;
    let cluster = TestCluster::start_with(1, |c| c.approx_min_vectors = 64).await;
    let client = cluster.client();
    let items = (0..100u32)
        .map(|i| (NewMemory::new("t", vec_for(i)).with_id(format!("m{i:03}")), Precondition::None))
        .collect();
    client.put_batch(NS, items).await.unwrap();
    settle(&cluster);
    assert!(matches!(cluster.handle(1).vectors.shard_kinds()[0].1, FaissKind::Hnsw { .. }));
    // Below half the threshold (32) the shard is exact again.
    for i in 0..69u32 {
        client.delete(NS, &format!("m{i:03}")).await.unwrap();
    }
    settle(&cluster);
    assert_eq!(cluster.handle(1).vectors.shard_kinds()[0], (NS.to_string(), FaissKind::Flat, 31, 1));
    let r = client.search(NS, vec_for(80), 1).await.unwrap();
    assert_eq!(r.hits[0].id, "m080");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn selective_filters_on_approximate_shards_still_return_k() {
    use engram::vector::faiss::FaissKind;
    let cluster = TestCluster::start_with(1, |c| c.approx_min_vectors = 64).await;
    let client = cluster.client();
    // 400 memories, 3 of them tagged rare and scattered across the space.
    let items = (0..400u32)
        .map(|i| {
            let m = NewMemory::new("t", vec_for(i * 7 + 3)).with_id(format!("m{i:03}"));
            let m = if i % 150 == 0 { m.with_tag("rare", "yes") } else { m };
            (m, Precondition::None)
        })
        .collect();
    client.put_batch(NS, items).await.unwrap();
    settle(&cluster);
    assert!(matches!(cluster.handle(1).vectors.shard_kinds()[0].1, FaissKind::Hnsw { .. }));
    let r = client
        .search_with(pb::SearchRequest {
            nprobe: 1,
            filter: Some(pb::SearchFilter { tags: [("rare".into(), "yes".into())].into(), ..Default::default() }),
            ..req(vec_for(5), 3)
        })
        .await
        .unwrap();
    let mut ids: Vec<String> = r.hits.into_iter().map(|h| h.id).collect();
    ids.sort();
    assert_eq!(ids, vec!["m000", "m150", "m300"]);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn running_nodes_checkpoint_index_files_periodically() {
    let cluster = TestCluster::start_with(3, |c| c.vector_checkpoint_secs = 1).await;
    let client = cluster.client();
    let first = client.put(NS, NewMemory::new("a", rvec(1)).with_id("a")).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    // The first apply after the interval fsyncs its batch and writes the shards.
    let second = client.put(NS, NewMemory::new("b", rvec(2)).with_id("b")).await.unwrap();
    cluster.wait_applied(second.revision).await;
    for id in cluster.running() {
        let dir = vectors_dir(&cluster, id);
        let mut manifest = None;
        for _ in 0..50 {
            manifest = engram::vector::persist::read_manifest(&dir).unwrap();
            if manifest.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let manifest = manifest.unwrap_or_else(|| panic!("node {id} wrote no index files"));
        assert!(manifest.applied >= first.revision, "node {id}: {manifest:?}");
        assert_eq!(manifest.shards[NS].memories, if manifest.applied >= second.revision { 2 } else { 1 });
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batch_search_answers_like_single_searches_behind_one_barrier() {
    let cluster = TestCluster::start(3).await;
    let client = cluster.client();
    let items = (0..40u32)
        .map(|i| (NewMemory::new(format!("m{i}"), rvec(i)).with_id(format!("m{i}")), Precondition::None))
        .collect();
    client.put_batch(NS, items).await.unwrap();
    write_tagged(&client, 0..20).await;
    let queries = restart_queries();
    let leader = cluster.wait_for_leader().await;
    let follower = cluster.running().into_iter().find(|id| *id != leader).unwrap();
    // A follower answers the batch linearizably: it sees the writes acknowledged above.
    let batch = cluster.pinned(follower).search_batch(queries.clone(), Consistency::Linearizable).await.unwrap();
    assert_eq!(batch.results.len(), queries.len());
    for (q, got) in queries.iter().zip(&batch.results) {
        let want = client.search_with(q.clone()).await.unwrap();
        assert_eq!(got.hits, want.hits);
        assert!(!got.hits.is_empty());
        assert_eq!(got.read_index, batch.read_index);
    }

    // One bad query refuses the whole batch, naming the query and its field.
    let field_of = |e: engram::client::ClientError| (e.code, e.field);
    let mut bad = queries.clone();
    bad[1].k = 0;
    let e = client.search_batch(bad, Consistency::Linearizable).await.unwrap_err();
    assert_eq!(field_of(e), (Code::InvalidArgument, Some("queries[1].k".into())));
    let mut bad = queries.clone();
    bad[2].vector.push(1.0);
    let e = client.search_batch(bad, Consistency::Linearizable).await.unwrap_err();
    assert_eq!(field_of(e), (Code::InvalidArgument, Some("queries[2].vector".into())));
    let mut bad = queries.clone();
    bad[0].consistency = Consistency::Stale as i32;
    let e = client.search_batch(bad, Consistency::Lease).await.unwrap_err();
    assert_eq!(field_of(e), (Code::InvalidArgument, Some("queries[0].consistency".into())));
    let e = client.search_batch(vec![], Consistency::Linearizable).await.unwrap_err();
    assert_eq!(field_of(e), (Code::InvalidArgument, Some("queries".into())));
    let e = client.search_batch(vec![req(rvec(1), 5); 257], Consistency::Linearizable).await.unwrap_err();
    assert_eq!(field_of(e), (Code::InvalidArgument, Some("queries".into())));
    let mut bad = queries.clone();
    bad[3].namespace = "acme/nope".into();
    let e = client.search_batch(bad, Consistency::Linearizable).await.unwrap_err();
    assert_eq!(field_of(e).0, Code::NotFound);
    cluster.shutdown().await;
}

/// A random unit vector in `dim` dimensions (seeded: the test is repeatable).
fn unit(dim: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v: Vec<f32> = (0..dim)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    let n = v.iter().map(|a| a * a).sum::<f32>().sqrt();
    v.iter_mut().for_each(|a| *a /= n);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_go_on_while_a_shard_is_rebuilt_and_none_is_lost() {
    use engram::vector::faiss::FaissKind;
    const WIDE: usize = 96;
    const N: u64 = 12_000;
    let cluster = TestCluster::start_with(1, |c| c.approx_min_vectors = N as usize).await;
    let client = cluster.client();
    let vectors = cluster.handle(1).vectors.clone();
    client.create_namespace(NS, WIDE as u32, Metric::Cosine).await.unwrap();
    let item = |i: u64| (NewMemory::new("t", unit(WIDE, i)).with_id(format!("m{i:05}")), Precondition::None);
    for from in (0..N - 1).step_by(1000) {
        client.put_batch(NS, (from..(from + 1000).min(N - 1)).map(item).collect()).await.unwrap();
    }
    assert_eq!(vectors.shard_kinds()[0].1, FaissKind::Flat);
    // The put that crosses the threshold is acknowledged before the HNSW shard exists.
    client.put_batch(NS, vec![item(N - 1)]).await.unwrap();
    assert_eq!(vectors.building(), vec![NS.to_string()], "the rebuild should be under way");
    // Writes, updates and deletes while it builds: each acknowledged with the build still
    // running (apply never waits for it), and the old shard answers them meanwhile.
    let (mut during, mut latencies, mut i) = (0u32, Vec::new(), N);
    while !vectors.building().is_empty() && i < N + 2000 {
        let started = std::time::Instant::now();
        match i % 3 {
            0 => client.put(NS, item(i).0).await.map(|_| ()),
            1 => client
                .put(NS, NewMemory::new("moved", unit(WIDE, i + 1_000_000)).with_id(format!("m{:05}", i - N)))
                .await
                .map(|_| ()),
            _ => client.delete(NS, &format!("m{:05}", i - N + 5000)).await.map(|_| ()),
        }
        .unwrap();
        if !vectors.building().is_empty() {
            during += 1;
            latencies.push(started.elapsed());
        }
        i += 1;
    }
    assert!(vectors.wait_for_builds(std::time::Duration::from_secs(120)));
    latencies.sort();
    eprintln!(
        "{during} writes acknowledged during the rebuild; p50 {:?}, max {:?}",
        latencies.get(latencies.len() / 2),
        latencies.last()
    );
    assert!(during >= 3, "only {during} writes finished while the shard was rebuilt: apply waited for it");
    // The new shard holds every write, from before and during the build.
    let kinds = vectors.shard_kinds();
    assert_eq!(kinds[0].1, FaissKind::Hnsw { m: 32 });
    for j in N..i {
        let (id, v, gone) = match j % 3 {
            0 => (format!("m{j:05}"), unit(WIDE, j), false),
            1 => (format!("m{:05}", j - N), unit(WIDE, j + 1_000_000), false),
            _ => (format!("m{:05}", j - N + 5000), unit(WIDE, j - N + 5000), true),
        };
        let hits = client.search(NS, v, 1).await.unwrap().hits;
        if gone {
            assert!(hits.iter().all(|h| h.id != id), "{id} was deleted during the build and came back");
        } else {
            assert_eq!(hits[0].id, id, "write {j} during the build is missing from the new shard");
        }
    }
    let count = client.describe_namespace(NS).await.unwrap().namespace.unwrap().memory_count as usize;
    assert_eq!(kinds[0].2, count);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_checkpoint_copies_under_the_lock_and_writes_without_it() {
    let cluster = TestCluster::start_with(1, |c| c.vector_checkpoint_secs = 0).await;
    let client = cluster.client();
    let vectors = cluster.handle(1).vectors.clone();
    let dir = vectors_dir(&cluster, 1);
    let mut last = 0;
    for i in 0..20u32 {
        last =
            client.put(NS, NewMemory::new(format!("m{i}"), rvec(i)).with_id(format!("m{i}"))).await.unwrap().revision;
    }
    cluster.wait_applied(last).await;
    let frozen = vectors.freeze().unwrap().expect("changed shards to copy");
    let at = frozen.applied();
    assert!(vectors.freeze().unwrap().is_none(), "one copy waits to be written at a time");
    // Writes go on, and are applied, while the copy waits to be written.
    for i in 20..30u32 {
        last =
            client.put(NS, NewMemory::new(format!("m{i}"), rvec(i)).with_id(format!("m{i}"))).await.unwrap().revision;
    }
    cluster.wait_applied(last).await;
    assert_eq!(vectors.write_frozen(frozen).unwrap(), Some(at));
    let manifest = engram::vector::persist::read_manifest(&dir).unwrap().expect("a manifest");
    assert_eq!((manifest.applied, manifest.shards[NS].memories), (at, 20), "the files hold the copy, not later writes");
    // The shard changed after its copy: the next checkpoint writes it again.
    assert!(vectors.checkpoint().unwrap().is_some_and(|a| a >= last));
    let manifest = engram::vector::persist::read_manifest(&dir).unwrap().expect("a manifest");
    assert_eq!(manifest.shards[NS].memories, 30);
    assert_eq!(vectors.checkpoint().unwrap(), None, "nothing changed since");

    // A copy taken before the files lost their meaning (a snapshot install forgets them) is
    // never committed.
    client.put(NS, NewMemory::new("late", rvec(99)).with_id("late")).await.unwrap();
    let stale = vectors.freeze().unwrap().expect("a changed shard");
    vectors.forget_files().unwrap();
    assert_eq!(vectors.write_frozen(stale).unwrap(), None);
    assert!(engram::vector::persist::read_manifest(&dir).unwrap().is_none());
    assert!(vectors.checkpoint().unwrap().is_none(), "no checkpoint until the new shards are in place");
    vectors.rebuild().unwrap();
    assert!(vectors.checkpoint().unwrap().is_some());
    assert_eq!(engram::vector::persist::read_manifest(&dir).unwrap().expect("a manifest").shards[NS].memories, 31);
    cluster.shutdown().await;
}
