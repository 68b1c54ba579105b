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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarts_rebuild_the_same_answers_from_disk() {
    let mut cluster = TestCluster::start(3).await;
    let client = cluster.client();
    let items = (0..40u32)
        .map(|i| (NewMemory::new(format!("t{i}"), vec_for(i)).with_id(format!("m{i}")), Precondition::None))
        .collect();
    client.put_batch(NS, items).await.unwrap();
    client.delete(NS, "m5").await.unwrap();
    let queries: Vec<Vec<f32>> = (0..8).map(vec_for).collect();
    let mut before = Vec::new();
    for q in &queries {
        before.push(client.search(NS, q.clone(), 10).await.unwrap().hits);
    }
    for id in cluster.running() {
        cluster.stop(id).await;
    }
    for id in [1, 2, 3] {
        cluster.restart(id).await;
    }
    cluster.wait_for_leader().await;
    for (q, want) in queries.iter().zip(&before) {
        for node in cluster.running() {
            let got = cluster.pinned(node).search(NS, q.clone(), 10).await.unwrap().hits;
            assert_eq!(&got, want, "node {node} answers differently after restart");
        }
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
async fn large_namespaces_switch_to_ivf_on_every_node_and_back() {
    use engram::vector::faiss::FaissKind;
    let mut cluster = TestCluster::start_with(3, |c| c.ivf_min_vectors = 64).await;
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
    // Phase 2: past the threshold every node retrains the same IVF shard.
    let r = client.put_batch(NS, batch(40, 300)).await.unwrap();
    cluster.wait_applied(r.applied_index).await;
    for id in cluster.running() {
        assert_eq!(cluster.handle(id).vectors.shard_kinds()[0], (NS.to_string(), FaissKind::Ivf { nlist: 32 }, 300));
    }
    // Probing every list is exact, and every node answers identically.
    let probe_all = |v: Vec<f32>| pb::SearchRequest { nprobe: 32, ..req(v, 5) };
    for q in [3u32, 77, 150] {
        let mut answers = Vec::new();
        for id in cluster.running() {
            answers.push(cluster.pinned(id).search_with(probe_all(vec_for(q * 13 + 1))).await.unwrap().hits);
        }
        assert!(answers.windows(2).all(|w| w[0] == w[1]), "nodes disagree: {answers:?}");
        assert!(answers[0][0].score > 0.999, "{:?}", answers[0][0]);
    }
    // Phase 3: deletes on an IVF shard never come back.
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
        assert_eq!(cluster.handle(id).vectors.shard_kinds()[0].1, FaissKind::Ivf { nlist: 32 });
        assert_eq!(cluster.pinned(id).search_with(probe_all(vec_for(5))).await.unwrap().hits, before);
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shrinking_namespaces_return_to_exact_shards() {
    use engram::vector::faiss::FaissKind;
    let cluster = TestCluster::start_with(1, |c| c.ivf_min_vectors = 64).await;
    let client = cluster.client();
    let items = (0..100u32)
        .map(|i| (NewMemory::new("t", vec_for(i)).with_id(format!("m{i:03}")), Precondition::None))
        .collect();
    client.put_batch(NS, items).await.unwrap();
    assert!(matches!(cluster.handle(1).vectors.shard_kinds()[0].1, FaissKind::Ivf { .. }));
    // Below half the threshold (32) the shard is exact again.
    for i in 0..69u32 {
        client.delete(NS, &format!("m{i:03}")).await.unwrap();
    }
    assert_eq!(cluster.handle(1).vectors.shard_kinds()[0], (NS.to_string(), FaissKind::Flat, 31));
    let r = client.search(NS, vec_for(80), 1).await.unwrap();
    assert_eq!(r.hits[0].id, "m080");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn selective_filters_on_ivf_shards_still_return_k() {
    use engram::vector::faiss::FaissKind;
    let cluster = TestCluster::start_with(1, |c| c.ivf_min_vectors = 64).await;
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
    assert!(matches!(cluster.handle(1).vectors.shard_kinds()[0].1, FaissKind::Ivf { .. }));
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
