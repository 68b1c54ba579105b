//! One conformance suite, run against every [`VectorIndex`] engine: FAISS Flat must agree
//! with the exact oracle; IVF probing every list must too, and so must HNSW on small or
//! filtered candidate sets (it scores those exactly); filters and deletes must hold for all
//! of them. HNSW's graph walk gets its own recall bounds against the oracle.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use roaring::RoaringTreemap;

use super::exact::ExactIndex;
use super::faiss::{FaissIndex, FaissKind};
use super::{normalize, SearchParams, VectorIndex};
use crate::memory::Metric;

const DIM: usize = 16;

fn data(n: usize, seed: u64, metric: Metric) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut v: Vec<f32> = (0..n * DIM).map(|_| rng.random_range(-1.0..1.0)).collect();
    if metric == Metric::Cosine {
        v.chunks_exact_mut(DIM).for_each(normalize);
    }
    v
}

/// Every engine under test, freshly built over the same data.
fn engines(metric: Metric, ids: &[u64], vectors: &[f32]) -> Vec<(&'static str, Box<dyn VectorIndex>)> {
    let mut exact = ExactIndex::new(DIM, metric);
    exact.upsert(ids, vectors).unwrap();
    let mut flat = FaissIndex::new(DIM, metric, FaissKind::Flat).unwrap();
    flat.upsert(ids, vectors).unwrap();
    let mut ivf = FaissIndex::new(DIM, metric, FaissKind::Ivf { nlist: 8 }).unwrap();
    ivf.train(vectors).unwrap();
    ivf.upsert(ids, vectors).unwrap();
    let mut hnsw = FaissIndex::new(DIM, metric, FaissKind::Hnsw { m: 16 }).unwrap();
    hnsw.upsert(ids, vectors).unwrap();
    vec![
        ("exact", Box::new(exact)),
        ("faiss-flat", Box::new(flat)),
        ("faiss-ivf", Box::new(ivf)),
        ("faiss-hnsw", Box::new(hnsw)),
    ]
}

/// IVF probing all of its 8 lists is exhaustive.
const ALL_LISTS: SearchParams = SearchParams { nprobe: 8, ef: super::DEFAULT_EF };

const fn nprobe(n: usize) -> SearchParams {
    SearchParams { nprobe: n, ef: super::DEFAULT_EF }
}

fn ids_of(hits: &[super::Hit]) -> Vec<u64> {
    hits.iter().map(|h| h.id).collect()
}

#[test]
fn every_engine_agrees_with_the_oracle() {
    for metric in [Metric::L2, Metric::InnerProduct, Metric::Cosine] {
        let n = 500;
        let ids: Vec<u64> = (0..n as u64).map(|i| i * 3 + 1).collect();
        let vectors = data(n, 7, metric);
        let all = engines(metric, &ids, &vectors);
        let oracle = &all[0].1;
        for q in data(20, 99, metric).chunks_exact(DIM) {
            let want = oracle.search(q, 10, None, ALL_LISTS).unwrap();
            for (name, engine) in &all[1..] {
                let got = engine.search(q, 10, None, ALL_LISTS).unwrap();
                assert_eq!(ids_of(&got), ids_of(&want), "{name} {metric:?}");
                for (g, w) in got.iter().zip(&want) {
                    assert!((g.score - w.score).abs() < 1e-4, "{name} {metric:?}: {g:?} vs {w:?}");
                }
            }
        }
    }
}

#[test]
fn filtered_search_returns_only_matches_and_exactly_k_when_k_exist() {
    let n = 1000;
    let ids: Vec<u64> = (0..n as u64).collect();
    let vectors = data(n, 3, Metric::L2);
    for (name, engine) in engines(Metric::L2, &ids, &vectors) {
        for (filter_ids, k) in [(vec![5u64, 17, 400, 999], 10), ((0..1000).step_by(7).collect::<Vec<u64>>(), 10)] {
            let filter: RoaringTreemap = filter_ids.iter().copied().collect();
            for q in data(5, 11, Metric::L2).chunks_exact(DIM) {
                // Probing a single IVF list must not lose matches either.
                for params in [ALL_LISTS, nprobe(1)] {
                    let hits = engine.search(q, k, Some(&filter), params).unwrap();
                    assert_eq!(hits.len(), k.min(filter_ids.len()), "{name} {params:?}");
                    assert!(hits.iter().all(|h| filter.contains(h.id)), "{name}: non-matching id returned");
                }
            }
        }
        let empty = RoaringTreemap::new();
        assert!(engine.search(&vectors[..DIM], 5, Some(&empty), ALL_LISTS).unwrap().is_empty(), "{name}");
    }
}

#[test]
fn deleted_vectors_never_come_back_and_upserts_replace() {
    let n = 300;
    let ids: Vec<u64> = (0..n as u64).collect();
    let vectors = data(n, 5, Metric::L2);
    for (name, mut engine) in engines(Metric::L2, &ids, &vectors) {
        // Deleting a vector: querying with that exact vector no longer finds it.
        let victim = 42u64;
        let v = vectors[42 * DIM..43 * DIM].to_vec();
        assert_eq!(engine.search(&v, 1, None, ALL_LISTS).unwrap()[0].id, victim, "{name}");
        assert_eq!(engine.remove(&[victim, 100_000]).unwrap(), 1, "{name}");
        assert_eq!(engine.len(), n - 1, "{name}");
        let hits = engine.search(&v, n, None, ALL_LISTS).unwrap();
        assert!(!hits.iter().any(|h| h.id == victim), "{name}: deleted id came back");
        let only_victim: RoaringTreemap = [victim].into_iter().collect();
        assert!(engine.search(&v, 5, Some(&only_victim), ALL_LISTS).unwrap().is_empty(), "{name}");

        // Upserting an existing id replaces its vector, never duplicates it.
        let far = vec![50.0f32; DIM];
        engine.upsert(&[7], &far).unwrap();
        assert_eq!(engine.len(), n - 1, "{name}");
        let hits = engine.search(&far, 3, None, ALL_LISTS).unwrap();
        assert_eq!(hits[0].id, 7, "{name}");
        assert_eq!(hits.iter().filter(|h| h.id == 7).count(), 1, "{name}: duplicate after upsert");
    }
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let ids: Vec<u64> = (0..64).collect();
    for (name, mut engine) in engines(Metric::L2, &ids, &data(64, 1, Metric::L2)) {
        assert!(engine.upsert(&[2], &[0.0; DIM - 1]).is_err(), "{name}");
        assert!(engine.upsert(&[2, 3], &[0.0; DIM]).is_err(), "{name}");
        assert!(engine.upsert(&[u64::MAX], &[0.0; DIM]).is_err(), "{name}");
        assert!(engine.search(&[0.0; DIM + 1], 1, None, ALL_LISTS).is_err(), "{name}");
        assert!(engine.search(&[0.0; DIM], 0, None, ALL_LISTS).unwrap().is_empty(), "{name}");
    }
}

fn memories(n: usize, seed: u64) -> Vec<crate::memory::Memory> {
    data(n, seed, Metric::L2)
        .chunks_exact(DIM)
        .enumerate()
        .map(|(i, v)| crate::memory::Memory {
            namespace: "ns".into(),
            id: format!("m{i:04}"),
            text: String::new(),
            embedding: v.to_vec(),
            tags: [("parity".to_string(), (i % 2).to_string())].into(),
            importance: (i % 10) as f32 / 10.0,
            created_at_ms: i as u64,
            updated_at_ms: i as u64,
            last_accessed_at_ms: 0,
            expires_at_ms: None,
            content_hash: [0; 32],
            revision: i as u64 + 1,
            ..Default::default()
        })
        .collect()
}

/// Answers of every query under a few filters, for comparing shards.
fn shard_answers(shard: &super::shard::Shard, params: SearchParams) -> Vec<Vec<(String, f32)>> {
    let filters = [
        super::Filter::default(),
        super::Filter { tags: vec![("parity".into(), "1".into())], ..Default::default() },
        super::Filter { min_importance: Some(0.85), ..Default::default() },
    ];
    let mut out = Vec::new();
    for q in data(10, 77, Metric::L2).chunks_exact(DIM) {
        for f in &filters {
            out.push(shard.search(q, 10, f, params, 0).unwrap());
        }
    }
    out
}

fn assert_same_answers(a: &[Vec<(String, f32)>], b: &[Vec<(String, f32)>], what: &str) {
    for (x, y) in a.iter().zip(b) {
        let ids = |v: &[(String, f32)]| v.iter().map(|h| h.0.clone()).collect::<Vec<_>>();
        assert_eq!(ids(x), ids(y), "{what}");
        for (p, q) in x.iter().zip(y) {
            assert!((p.1 - q.1).abs() < 1e-4, "{what}: {p:?} vs {q:?}");
        }
    }
}

#[test]
fn a_shard_split_into_parts_answers_like_one_index() {
    use super::shard::Shard;
    let all = memories(400, 21);
    for kind in [FaissKind::Flat, FaissKind::Ivf { nlist: 16 }, FaissKind::Hnsw { m: 16 }] {
        let mut one = Shard::build(DIM, Metric::L2, kind, &all[..300], usize::MAX).unwrap();
        let mut split = Shard::build(DIM, Metric::L2, kind, &all[..300], 70).unwrap();
        assert_eq!((one.parts(), split.parts()), (1, 5));
        let exhaustive = nprobe(16);
        assert_same_answers(&shard_answers(&one, exhaustive), &shard_answers(&split, exhaustive), &format!("{kind:?}"));
        // Writes after the build land in the right part; deletes leave every part.
        for m in &all[300..] {
            one.upsert(m).unwrap();
            split.upsert(m).unwrap();
        }
        for i in (0..400).step_by(9) {
            one.remove(&format!("m{i:04}")).unwrap();
            split.remove(&format!("m{i:04}")).unwrap();
        }
        assert_eq!(one.len(), split.len());
        let (a, b) = (shard_answers(&one, exhaustive), shard_answers(&split, exhaustive));
        assert_same_answers(&a, &b, &format!("{kind:?} after writes"));
        assert!(b.iter().flatten().all(|(id, _)| id[1..].parse::<usize>().unwrap() % 9 != 0));
        // A filtered query still returns k when k match, at nprobe 1 on every part.
        let one_list = nprobe(1);
        for answer in shard_answers(&split, one_list) {
            assert_eq!(answer.len(), 10, "{kind:?}");
        }
    }
}

#[test]
fn index_files_round_trip_and_refuse_corruption() {
    let vault =
        crate::storage::vault::Vault::new(Some(crate::backup::Keyring::single(crate::backup::MasterKey::generate())));
    vault.insert(&vault.new_key("ns").unwrap()).unwrap();
    index_files_round_trip(None);
    index_files_round_trip(vault.for_namespace("ns").as_deref());
}

fn index_files_round_trip(key: Option<&crate::storage::vault::DataKey>) {
    use super::persist;
    use super::shard::Shard;
    let dir = tempfile::tempdir().unwrap();
    let all = memories(300, 8);
    let shard = Shard::build(DIM, Metric::L2, FaissKind::Ivf { nlist: 12 }, &all, 100).unwrap();
    let files = persist::write_shard(dir.path(), "ns", 42, &shard.freeze().unwrap(), key).unwrap();
    let manifest = persist::Manifest { applied: 42, shards: [("ns".to_string(), files.clone())].into() };
    persist::commit(dir.path(), &manifest).unwrap();
    assert_eq!(persist::read_manifest(dir.path()).unwrap(), Some(manifest));
    let read = |d: &std::path::Path| persist::read_shard(d, &files, "ns", key);
    let loaded = read(dir.path()).unwrap();
    assert_eq!((loaded.len(), loaded.parts(), loaded.kind()), (300, 3, FaissKind::Ivf { nlist: 12 }));
    for params in [nprobe(1), nprobe(12)] {
        assert_same_answers(&shard_answers(&shard, params), &shard_answers(&loaded, params), "reloaded");
    }
    if key.is_some() {
        // Sealed: no memory id in the metadata, no FAISS header, and no key, no shard.
        let meta = std::fs::read(dir.path().join(&files.meta)).unwrap();
        assert!(!meta.windows(all[7].id.len()).any(|w| w == all[7].id.as_bytes()), "an id in the clear");
        let part = std::fs::read(dir.path().join(&files.parts[0].0)).unwrap();
        assert_eq!(&part[..4], b"EVSL");
        assert!(persist::read_shard(dir.path(), &files, "ns", None).is_err());
        assert!(persist::read_shard(dir.path(), &files, "other", key).is_err(), "bound to its namespace");
    }

    // Any flipped byte in any file is refused before it is used.
    let flip = |name: &str, at: usize| {
        let path = dir.path().join(name);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = at.min(bytes.len() - 1);
        bytes[at] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        move || {
            bytes[at] ^= 1;
            std::fs::write(&path, &bytes).unwrap();
        }
    };
    for at in [0, 7, 200, usize::MAX] {
        let mut restore = flip(&files.meta, at);
        assert!(read(dir.path()).is_err(), "meta byte {at}");
        restore();
        let mut restore = flip(&files.parts[1].0, at);
        assert!(read(dir.path()).is_err(), "faiss byte {at}");
        restore();
        let mut restore = flip("MANIFEST", at);
        assert!(persist::read_manifest(dir.path()).is_err(), "manifest byte {at}");
        restore();
    }
    assert!(read(dir.path()).is_ok());
    // A truncated part is refused too; a missing manifest is "none", not an error.
    let part = dir.path().join(&files.parts[0].0);
    let bytes = std::fs::read(&part).unwrap();
    std::fs::write(&part, &bytes[..bytes.len() / 2]).unwrap();
    assert!(read(dir.path()).is_err());
    persist::invalidate(dir.path()).unwrap();
    assert_eq!(persist::read_manifest(dir.path()).unwrap(), None);
}

/// One shard's index files (HNSW, so the FAISS part is a graph), written once for the fuzz
/// target below: the directory and the files' names.
fn fuzz_index_files() -> &'static (tempfile::TempDir, super::persist::ShardFiles) {
    static F: std::sync::OnceLock<(tempfile::TempDir, super::persist::ShardFiles)> = std::sync::OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let all = memories(200, 3);
        let shard = super::shard::Shard::build(DIM, Metric::L2, FaissKind::Hnsw { m: 8 }, &all, 50).unwrap();
        let files = super::persist::write_shard(dir.path(), "ns", 7, &shard.freeze().unwrap(), None).unwrap();
        (dir, files)
    })
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: std::env::var("ENGRAM_FUZZ_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(32),
        ..Default::default()
    })]

    /// Fuzz target (index files): any edit of a shard's metadata or FAISS file (overwrite a
    /// run, cut, insert) is refused before FAISS or bincode reads it, without a panic.
    #[test]
    fn edited_index_files_are_refused(which in 0usize..3, at in 0usize..1_000_000, edit in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..32), kind in 0u8..3) {
        let (dir, files) = fuzz_index_files();
        let name = match which {
            0 => files.meta.clone(),
            n => files.parts[(n - 1) % files.parts.len()].0.clone(),
        };
        let good = std::fs::read(dir.path().join(&name)).unwrap();
        let mut bytes = good.clone();
        let at = at % bytes.len();
        match kind {
            0 => {
                let end = (at + edit.len()).min(bytes.len());
                bytes[at..end].copy_from_slice(&edit[..end - at]);
            }
            1 => bytes.truncate(at),
            _ => { bytes.splice(at..at, edit.iter().copied()); }
        }
        proptest::prop_assume!(bytes != good);
        // A copy of the directory with the one file edited (the fixture stays intact).
        let copy = tempfile::tempdir().unwrap();
        for f in std::iter::once(&files.meta).chain(files.parts.iter().map(|(p, _)| p)) {
            std::fs::copy(dir.path().join(f), copy.path().join(f)).unwrap();
        }
        std::fs::write(copy.path().join(&name), &bytes).unwrap();
        proptest::prop_assert!(super::persist::read_shard(copy.path(), files, "ns", None).is_err());
    }
}

/// Mean recall@k of `engine` against `oracle` over `queries`.
fn recall(
    engine: &dyn VectorIndex,
    oracle: &dyn VectorIndex,
    queries: &[f32],
    k: usize,
    params: SearchParams,
    filter: Option<&RoaringTreemap>,
) -> f64 {
    let mut sum = 0.0;
    let mut n = 0;
    for q in queries.chunks_exact(DIM) {
        let want = ids_of(&oracle.search(q, k, filter, params).unwrap());
        let got = engine.search(q, k, filter, params).unwrap();
        assert_eq!(got.len(), want.len());
        if let Some(f) = filter {
            assert!(got.iter().all(|h| f.contains(h.id)));
        }
        sum += got.iter().filter(|h| want.contains(&h.id)).count() as f64 / want.len() as f64;
        n += 1;
    }
    sum / n as f64
}

/// Clustered unit vectors (like real embeddings): uniform noise in 16-d has no structure
/// for a graph to follow, and would make every approximate index look bad.
fn clustered(n: usize, seed: u64) -> Vec<f32> {
    let centres = data(64, seed ^ 0xc0ffee, Metric::Cosine);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(n * DIM);
    for _ in 0..n {
        let c = rng.random_range(0..64);
        let mut v: Vec<f32> = centres[c * DIM..(c + 1) * DIM].iter().map(|x| x + rng.random_range(-0.3..0.3)).collect();
        normalize(&mut v);
        out.extend(v);
    }
    out
}

#[test]
fn hnsw_walks_the_graph_with_high_recall_and_ef_matters() {
    let n = 6000;
    let ids: Vec<u64> = (0..n as u64).map(|i| i * 2 + 5).collect();
    let vectors = clustered(n, 4);
    let queries = clustered(100, 40);
    let mut oracle = ExactIndex::new(DIM, Metric::Cosine);
    oracle.upsert(&ids, &vectors).unwrap();
    let mut hnsw = FaissIndex::new(DIM, Metric::Cosine, FaissKind::Hnsw { m: 16 }).unwrap();
    hnsw.upsert(&ids, &vectors).unwrap();
    let at = |ef: usize| SearchParams { nprobe: 1, ef };
    let (low, default, high) = (
        recall(&hnsw, &oracle, &queries, 10, at(10), None),
        recall(&hnsw, &oracle, &queries, 10, at(64), None),
        recall(&hnsw, &oracle, &queries, 10, at(512), None),
    );
    assert!(default >= 0.95, "recall@10 at ef 64: {default}");
    assert!(high >= 0.99, "recall@10 at ef 512: {high}");
    // The request's ef reaches FAISS (a lost ef would leave every row at the index default).
    assert!(low < high - 0.02, "ef 10 → {low}, ef 512 → {high}");
    // Exhaustive is exact.
    assert_eq!(recall(&hnsw, &oracle, &queries, 10, SearchParams::EXHAUSTIVE, None), 1.0);
    // A broad filter walks the graph under the selector; a narrow one is scored exactly.
    let half: RoaringTreemap = ids.iter().copied().filter(|id| id % 4 == 1).collect();
    assert!(recall(&hnsw, &oracle, &queries, 10, at(64), Some(&half)) >= 0.9);
    let narrow: RoaringTreemap = ids.iter().copied().step_by(10).collect();
    assert_eq!(recall(&hnsw, &oracle, &queries, 10, at(64), Some(&narrow)), 1.0);

    // Replace a third and remove a sixth: tombstones never come back, replaced vectors are
    // found at their new place, and recall holds.
    let moved = clustered(n / 3, 99);
    let moved_ids: Vec<u64> = ids[..n / 3].to_vec();
    hnsw.upsert(&moved_ids, &moved).unwrap();
    oracle.upsert(&moved_ids, &moved).unwrap();
    let gone: Vec<u64> = ids[n / 3..n / 2].to_vec();
    assert_eq!(hnsw.remove(&gone).unwrap(), gone.len());
    oracle.remove(&gone).unwrap();
    assert_eq!(hnsw.len(), n - gone.len());
    assert_eq!(hnsw.dead(), moved_ids.len() + gone.len());
    for q in queries.chunks_exact(DIM) {
        let hits = hnsw.search(q, 50, None, at(64)).unwrap();
        assert!(hits.iter().all(|h| !gone.contains(&h.id)), "a removed id came back");
        let mut seen = std::collections::HashSet::new();
        assert!(hits.iter().all(|h| seen.insert(h.id)), "an id twice");
    }
    for (i, id) in moved_ids.iter().enumerate().step_by(97) {
        let hit = hnsw.search(&moved[i * DIM..(i + 1) * DIM], 1, None, at(64)).unwrap();
        assert_eq!(hit[0].id, *id);
    }
    assert!(recall(&hnsw, &oracle, &queries, 10, at(64), None) >= 0.93);
    assert_eq!(recall(&hnsw, &oracle, &queries, 10, SearchParams::EXHAUSTIVE, None), 1.0);
    // Asking for more than the live vectors returns exactly the live ones.
    let every = hnsw.search(&queries[..DIM], n, None, at(64)).unwrap();
    assert_eq!(every.len(), n - gone.len());
}

#[test]
fn hnsw_index_files_keep_their_tombstones() {
    use super::persist;
    use super::shard::Shard;
    let dir = tempfile::tempdir().unwrap();
    let all = memories(3000, 12);
    let mut shard = Shard::build(DIM, Metric::L2, FaissKind::Hnsw { m: 16 }, &all, 1000).unwrap();
    for m in all.iter().step_by(5) {
        let mut m = m.clone();
        m.embedding.iter_mut().for_each(|x| *x = -*x);
        shard.upsert(&m).unwrap();
    }
    for i in (0..3000).step_by(7) {
        shard.remove(&format!("m{i:04}")).unwrap();
    }
    assert!(shard.dead() > 0);
    let files = persist::write_shard(dir.path(), "ns", 9, &shard.freeze().unwrap(), None).unwrap();
    let loaded = persist::read_shard(dir.path(), &files, "ns", None).unwrap();
    assert_eq!((loaded.len(), loaded.parts(), loaded.dead()), (shard.len(), 3, shard.dead()));
    assert_same_answers(
        &shard_answers(&shard, SearchParams::EXHAUSTIVE),
        &shard_answers(&loaded, SearchParams::EXHAUSTIVE),
        "hnsw reloaded",
    );
    // An id map that does not match the graph is refused.
    let mut meta: super::shard::ShardMeta =
        bincode::deserialize(&std::fs::read(dir.path().join(&files.meta)).unwrap()).unwrap();
    if let Some(Some(labels)) = meta.part_labels.get_mut(0) {
        labels.pop();
    }
    let bytes = bincode::serialize(&meta).unwrap();
    std::fs::write(dir.path().join(&files.meta), &bytes).unwrap();
    let forged = persist::ShardFiles { meta_hash: *blake3::hash(&bytes).as_bytes(), ..files.clone() };
    assert!(persist::read_shard(dir.path(), &forged, "ns", None).is_err());
}
