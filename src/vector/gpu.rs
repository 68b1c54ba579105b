//! GPU replicas of FAISS parts (cargo feature `gpu`).
//!
//! The CPU index stays the source of truth: every write goes to it, and it alone serves
//! filtered searches (FAISS GPU indexes ignore `IDSelector`s, which would silently break the
//! "only matching ids" promise). An unfiltered search on a part of at least [`MIN_VECTORS`]
//! vectors (Flat, or IVF probing at least [`MIN_NPROBE`] lists) goes to a GPU copy of that
//! part, made with `index_cpu_to_gpu` on first use and
//! re-made after the part changed (FAISS GPU indexes cannot remove ids, so the copy is
//! replaced rather than patched). With no GPU present, or `ENGRAM_GPU=off`, everything stays
//! on the CPU.
//!
//! FAISS GPU resources are not safe for concurrent use, so GPU work is serialised by one lock.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use faiss::gpu::{GpuResourcesProvider, StandardGpuResources};

use super::faiss::{check, FaissKind};
use super::{Hit, VectorError};

/// Smallest part worth a GPU copy: below this the CPU answers faster than a kernel launch.
pub const MIN_VECTORS: u64 = 4096;

/// IVF searches probing fewer lists stay on the CPU: on an H100 against 16 CPU cores, one
/// query at nprobe 1 ran 4.6× slower on the GPU, at 8 about even, at 32 3.1× faster.
pub const MIN_NPROBE: usize = 16;

static RESOURCES: OnceLock<Option<Mutex<StandardGpuResources>>> = OnceLock::new();

fn resources() -> Option<&'static Mutex<StandardGpuResources>> {
    RESOURCES
        .get_or_init(|| {
            if std::env::var("ENGRAM_GPU").is_ok_and(|v| v == "off" || v == "0") {
                tracing::info!("GPU disabled by ENGRAM_GPU");
                return None;
            }
            let mut n = 0;
            // SAFETY: writes the device count into `n`.
            let found = unsafe { faiss_sys::faiss_get_num_gpus(&mut n) } == 0 && n > 0;
            if !found {
                tracing::info!("no GPU found: vector search stays on the CPU");
                return None;
            }
            match StandardGpuResources::new() {
                Ok(r) => {
                    tracing::info!(gpus = n, "vector search uses GPU 0 for unfiltered queries");
                    Some(Mutex::new(r))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "GPU resources unavailable: vector search stays on the CPU");
                    None
                }
            }
        })
        .as_ref()
}

/// Set by the self-test to time the CPU path on the same shards.
static FORCE_CPU: AtomicBool = AtomicBool::new(false);

/// Whether unfiltered searches can use a GPU.
pub fn available() -> bool {
    !FORCE_CPU.load(Ordering::Relaxed) && resources().is_some()
}

struct Copy {
    index: NonNull<faiss_sys::FaissIndex>,
    version: u64,
}

/// One part's GPU copy, made lazily.
#[derive(Default)]
pub struct Replica {
    copy: Mutex<Option<Copy>>,
}

// SAFETY: the GPU index behind the pointer is only touched with `copy` locked, and GPU calls
// additionally hold the global resources lock.
unsafe impl Send for Replica {}
unsafe impl Sync for Replica {}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(c) = self.copy.get_mut().unwrap_or_else(|p| p.into_inner()).take() {
            // SAFETY: the pointer came from index_cpu_to_gpu and is freed once.
            unsafe { faiss_sys::faiss_Index_free(c.index.as_ptr()) };
        }
    }
}

impl Replica {
    /// Searches the GPU copy of `cpu` (at `version`), refreshing it first if `cpu` changed.
    /// `None` when no GPU is available.
    pub fn search(
        &self,
        cpu: &faiss::index::IndexImpl,
        version: u64,
        kind: FaissKind,
        query: &[f32],
        k: usize,
        nprobe: usize,
    ) -> Result<Option<Vec<Hit>>, VectorError> {
        let Some(res) = resources() else { return Ok(None) };
        let mut copy = self.copy.lock().unwrap_or_else(|p| p.into_inner());
        let res = res.lock().unwrap_or_else(|p| p.into_inner());
        if copy.as_ref().is_none_or(|c| c.version != version) {
            if let Some(old) = copy.take() {
                // SAFETY: the old copy is no longer reachable.
                unsafe { faiss_sys::faiss_Index_free(old.index.as_ptr()) };
            }
            let started = std::time::Instant::now();
            let mut out: *mut faiss_sys::FaissGpuIndex = std::ptr::null_mut();
            // SAFETY: `cpu` is a live CPU index borrowed for the call; the copy is a new object
            // we own.
            check(unsafe { faiss_sys::faiss_index_cpu_to_gpu(res.inner_ptr(), 0, cpu.inner_ptr(), &mut out) })?;
            let index = NonNull::new(out as *mut faiss_sys::FaissIndex)
                .ok_or_else(|| VectorError::Faiss("index_cpu_to_gpu returned null".into()))?;
            metrics::counter!("engram_vector_gpu_uploads_total").increment(1);
            metrics::histogram!("engram_vector_gpu_upload_seconds").record(started.elapsed().as_secs_f64());
            *copy = Some(Copy { index, version });
        }
        let gpu = copy.as_ref().expect("made above").index.as_ptr();
        let mut distances = vec![0f32; k];
        let mut labels = vec![-1i64; k];
        // SAFETY: one query of the index's dimension (checked by the caller), k-sized output
        // buffers, parameters freed after the call.
        unsafe {
            let rc = match kind {
                FaissKind::Ivf { .. } => {
                    let mut p: *mut faiss_sys::FaissSearchParametersIVF = std::ptr::null_mut();
                    check(faiss_sys::faiss_SearchParametersIVF_new_with(
                        &mut p,
                        std::ptr::null_mut(),
                        nprobe.max(1),
                        0,
                    ))?;
                    let rc = faiss_sys::faiss_Index_search_with_params(
                        gpu,
                        1,
                        query.as_ptr(),
                        k as faiss_sys::idx_t,
                        p as *mut _,
                        distances.as_mut_ptr(),
                        labels.as_mut_ptr(),
                    );
                    faiss_sys::faiss_SearchParametersIVF_free(p);
                    rc
                }
                // Graph parts never get a GPU copy (see FaissIndex::search_gpu).
                FaissKind::Hnsw { .. } => {
                    return Err(VectorError::Faiss("no GPU search for HNSW parts".into()));
                }
                FaissKind::Flat => faiss_sys::faiss_Index_search(
                    gpu,
                    1,
                    query.as_ptr(),
                    k as faiss_sys::idx_t,
                    distances.as_mut_ptr(),
                    labels.as_mut_ptr(),
                ),
            };
            check(rc)?;
        }
        drop(res);
        metrics::counter!("engram_vector_gpu_searches_total").increment(1);
        Ok(Some(
            labels
                .into_iter()
                .zip(distances)
                .filter(|(l, _)| *l >= 0)
                .map(|(l, d)| Hit { id: l as u64, score: d })
                .collect(),
        ))
    }
}

/// Checks the GPU path against the CPU path on the same shards and prints what it measured:
/// `n` synthetic clustered vectors of dimension `dim`, `nq` queries, Flat and IVF shards in 1
/// and 4 parts. True when every check held. (`scripts/gpu/selftest.sh` runs it on a GPU
/// machine; it needs no cluster.)
pub fn selftest(n: usize, dim: usize, nq: usize) -> bool {
    use super::shard::{Filter, Shard};
    use super::SearchParams;
    use crate::memory::{Memory, Metric};
    use std::time::Instant;

    let mut ok = true;
    let mut fail = |what: String| {
        println!("FAIL: {what}");
        ok = false;
    };
    if resources().is_none() {
        println!("FAIL: no GPU visible to FAISS");
        return false;
    }
    let started = Instant::now();
    let base = super::synthetic::clustered(n, dim, 1000, 42, 1);
    let queries = super::synthetic::clustered(nq, dim, 1000, 42, 2);
    let memories: Vec<Memory> = base
        .chunks_exact(dim)
        .enumerate()
        .map(|(i, v)| Memory {
            namespace: "selftest".into(),
            id: i.to_string(),
            text: String::new(),
            embedding: v.to_vec(),
            tags: [("parity".to_string(), (i % 2).to_string())].into(),
            importance: 0.5,
            created_at_ms: 0,
            updated_at_ms: 0,
            last_accessed_at_ms: 0,
            expires_at_ms: None,
            content_hash: [0; 32],
            revision: 1,
            ..Default::default()
        })
        .collect();
    drop(base);
    println!(
        "gpu selftest: {n} × {dim}-d clustered vectors, {nq} queries, data ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    type Answers = Vec<Vec<(String, f32)>>;
    let run = |shard: &Shard, params: SearchParams| -> (Answers, f64) {
        let t = Instant::now();
        let answers: Answers = queries
            .chunks_exact(dim)
            .map(|q| shard.search(q, 10, &Filter::default(), params, 0).expect("search"))
            .collect();
        (answers, nq as f64 / t.elapsed().as_secs_f64())
    };
    let ids = |a: &[(String, f32)]| a.iter().map(|h| h.0.clone()).collect::<Vec<_>>();
    let overlap = |a: &Answers, b: &Answers| -> f64 {
        let mut hit = 0usize;
        for (x, y) in a.iter().zip(b) {
            let want: std::collections::HashSet<&String> = y.iter().map(|h| &h.0).collect();
            hit += x.iter().filter(|h| want.contains(&h.0)).count();
        }
        hit as f64 / (10 * a.len()) as f64
    };
    let mut truth: Option<Answers> = None;
    println!("\n| shard | nprobe | build s | GPU upload s | CPU q/s | GPU q/s | GPU / CPU | GPU = CPU top-10 | recall@10 GPU | recall@10 CPU |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let four = n.div_ceil(4);
    for (label, kind, max_part, probes) in [
        ("Flat", FaissKind::Flat, usize::MAX, vec![0]),
        ("Flat, 4 parts", FaissKind::Flat, four, vec![0]),
        ("IVF1024, 4 parts", FaissKind::Ivf { nlist: 1024 }, four, vec![1, 16, 64]),
    ] {
        let t = Instant::now();
        let mut shard = match Shard::build(dim, Metric::InnerProduct, kind, &memories, max_part) {
            Ok(s) => s,
            Err(e) => {
                fail(format!("{label}: build: {e}"));
                continue;
            }
        };
        let build = t.elapsed().as_secs_f64();
        for nprobe in probes {
            let params = SearchParams { nprobe: nprobe.max(1), ..SearchParams::default() };
            FORCE_CPU.store(true, Ordering::Relaxed);
            let (cpu, cpu_qps) = run(&shard, params);
            FORCE_CPU.store(false, Ordering::Relaxed);
            let t = Instant::now();
            let _ = shard.search(&queries[..dim], 10, &Filter::default(), params, 0);
            let upload = t.elapsed().as_secs_f64();
            let (gpu, gpu_qps) = run(&shard, params);
            if truth.is_none() {
                truth = Some(cpu.clone());
            }
            let truth = truth.as_ref().expect("set above");
            let same = cpu.iter().zip(&gpu).filter(|(c, g)| ids(c) == ids(g)).count() as f64 / nq as f64;
            // Exact shards must agree up to float rounding among near-ties.
            if kind == FaissKind::Flat && overlap(&gpu, &cpu) < 0.999 {
                fail(format!("{label}: GPU and CPU exact answers differ ({:.4} overlap)", overlap(&gpu, &cpu)));
            }
            println!(
                "| {label} | {} | {build:.2} | {upload:.3} | {cpu_qps:.0} | {gpu_qps:.0} | {:.1}× | {same:.3} | {:.4} | {:.4} |",
                match (kind, nprobe) {
                    (FaissKind::Flat, _) => "-".to_string(),
                    (_, p) if p < MIN_NPROBE => format!("{p} (GPU path stays on the CPU)"),
                    (_, p) => p.to_string(),
                },
                gpu_qps / cpu_qps,
                overlap(&gpu, truth),
                overlap(&cpu, truth)
            );
        }
        // Filtered searches never use the GPU copy (it would ignore the selector): only
        // matches come back, k of them.
        let odd = Filter { tags: vec![("parity".into(), "1".into())], ..Default::default() };
        for q in queries.chunks_exact(dim).take(20) {
            let hits =
                shard.search(q, 10, &odd, SearchParams { nprobe: 1, ..SearchParams::default() }, 0).expect("search");
            if hits.len() != 10 || hits.iter().any(|(id, _)| id.parse::<usize>().unwrap_or(0) % 2 != 1) {
                fail(format!("{label}: filtered search returned {hits:?}"));
            }
        }
        // A delete reaches the GPU path at once: the copy is replaced, the id never returns.
        let q = &queries[..dim];
        let params = SearchParams { nprobe: 1024, ..SearchParams::default() };
        let top = shard.search(q, 1, &Filter::default(), params, 0).expect("search")[0].0.clone();
        shard.remove(&top).expect("remove");
        let after = shard.search(q, 10, &Filter::default(), params, 0).expect("search");
        FORCE_CPU.store(true, Ordering::Relaxed);
        let cpu_after = shard.search(q, 10, &Filter::default(), params, 0).expect("search");
        FORCE_CPU.store(false, Ordering::Relaxed);
        if after.iter().any(|(id, _)| *id == top) || ids(&after) != ids(&cpu_after) {
            fail(format!("{label}: after deleting {top}: GPU {after:?}, CPU {cpu_after:?}"));
        }
    }
    println!("\ngpu selftest {} in {:.1} s", if ok { "passed" } else { "FAILED" }, started.elapsed().as_secs_f64());
    ok
}

/// C entry point for [`selftest`], for linking on a GPU machine without a Rust toolchain
/// (`cargo rustc --crate-type staticlib`): returns 0 when every check held.
#[unsafe(no_mangle)]
pub extern "C" fn engram_gpu_selftest(n: u64, dim: u32, nq: u32) -> i32 {
    match std::panic::catch_unwind(|| selftest(n as usize, dim as usize, nq as usize)) {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(_) => 2,
    }
}
