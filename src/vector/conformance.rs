//! One conformance suite, run against every [`VectorIndex`] engine: FAISS Flat must agree
//! with the exact oracle; IVF probing every list must too; filters and deletes must hold for
//! all of them.

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
    vec![("exact", Box::new(exact)), ("faiss-flat", Box::new(flat)), ("faiss-ivf", Box::new(ivf))]
}

/// IVF probing all of its 8 lists is exhaustive.
const ALL_LISTS: SearchParams = SearchParams { nprobe: 8 };

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
                for params in [ALL_LISTS, SearchParams { nprobe: 1 }] {
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
