//! Disaster-recovery drill: restore a backup into scratch nodes, start them as real `engram`
//! processes on loopback, check them against the backup, and time it.
//!
//! 1. Every scratch member's data dir is restored from the archive (in parallel, as members on
//!    separate machines would), which authenticates every chunk.
//! 2. Before any node starts, the restored state's data digest is compared with the one the
//!    source computed in the backup's own read transaction (manifests from format 2 on):
//!    a backup that left out rows the source held fails here.
//! 3. Search answers are prepared from the restored rows: for a sample of memories per
//!    namespace, the exact top 10 by the namespace's metric (the oracle).
//! 4. The nodes start on loopback, with no backup or verify schedules of their own, and **secured**: a
//!    throwaway CA and certificates, and an HS256 secret that only this drill holds and signs
//!    its root token with. A scratch node serves a copy of every tenant's data, so no other
//!    local user may read it while the drill runs. The recovery time (RTO) is the restore
//!    plus the time from the nodes' start until the scratch cluster has committed a write: a
//!    mark, after which every node's data digest at that mark must be the same. (Not the
//!    backup's: each entry applied at drill time prunes idempotency records older than a day,
//!    and the leader purges memories that expired since the backup, both by the drill's
//!    clock. The backup's own rows were compared with the source's in step 2.)
//! 5. The sample queries run as linearizable searches on the scratch cluster; recall@10
//!    against the oracle must reach [`MIN_RECALL`] (approximate shards may miss a neighbour).
//!
//! The data age (RPO) is the time from the backup's creation to the drill. Scratch nodes are
//! killed and their dirs removed at the end, whatever the outcome.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::restore::{restore, RestoreTarget};
use super::{BackupError, BackupInfo, Keyring};
use crate::client::Client;
use crate::memory::{Memory, Metric};
use crate::raft::{EngramNode, NodeId};
use crate::storage::StateReader;
use crate::vector::{exact::ExactIndex, SearchParams, VectorIndex};

/// Mean recall@10 the scratch cluster's answers must reach against the exact oracle.
pub const MIN_RECALL: f64 = 0.9;
/// Namespaces sampled for search answers (the largest first).
const MAX_NAMESPACES: usize = 16;
const K: usize = 10;

/// What to drill and how.
#[derive(Debug, Clone)]
pub struct DrillSpec {
    pub archive: PathBuf,
    /// The `engram` binary the scratch nodes run.
    pub engram_bin: PathBuf,
    /// Where the scratch data dirs go (a fresh subdirectory, removed afterwards).
    pub scratch_dir: PathBuf,
    /// Scratch members, 1 to 5.
    pub nodes: u64,
    /// Sample queries per namespace.
    pub queries_per_namespace: usize,
    /// How long the scratch cluster may take to start and commit.
    pub timeout: Duration,
    /// For a backup sealed at rest: the master keyring the scratch nodes run with and the
    /// source cluster's data keys now.
    pub at_rest: Option<super::restore::AtRest>,
}

impl DrillSpec {
    pub fn new(archive: PathBuf, engram_bin: PathBuf, scratch_dir: PathBuf) -> Self {
        DrillSpec {
            archive,
            engram_bin,
            scratch_dir,
            nodes: 1,
            queries_per_namespace: 16,
            timeout: Duration::from_secs(600),
            at_rest: None,
        }
    }
}

/// What a drill found. `ok` only if every check passed; `problems` says which did not.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DrillReport {
    pub ok: bool,
    pub problems: Vec<String>,
    pub archive: String,
    pub backup_id: String,
    pub applied_index: u64,
    pub memories: u64,
    pub namespaces: u64,
    pub nodes: u64,
    pub backup_created_at_ms: u64,
    pub drilled_at_ms: u64,
    /// Recovery point: how old the backup's data was when the drill began.
    pub data_age_ms: u64,
    /// Restoring every member's data dir (in parallel).
    pub restore_ms: u64,
    /// From the nodes' start to the first committed write.
    pub start_ms: u64,
    /// Recovery time: restore plus start (the drill's own checks are not part of it).
    pub rto_ms: u64,
    /// The drill's own preparation between restore and start: the restored rows' digest and
    /// the exact search answers.
    pub check_ms: u64,
    /// Namespaces the restore left out: erased since the backup (their data keys destroyed).
    pub erased: Vec<String>,
    /// The source's data digest at the backup's index, if its manifest has one (hex).
    pub source_digest: Option<String>,
    /// The restored rows' data digest before start, and every node's at the mark (hex; equal
    /// to each other, and to the restored one unless the drill's clock pruned or purged rows).
    pub restored_digest: String,
    pub node_digests: BTreeMap<NodeId, String>,
    pub queries: u64,
    pub recall_at_10: f64,
}

/// Kills the scratch nodes and removes their dirs when dropped.
struct Scratch {
    dir: PathBuf,
    children: Vec<Child>,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One sample query and its exact answer.
struct Probe {
    namespace: String,
    vector: Vec<f32>,
    want: Vec<String>,
}

/// Loopback addresses that were free a moment ago, for each node's api, raft and http
/// listeners. They are picked below the kernel's ephemeral range, so the outgoing connections
/// made while the drill restores cannot take one before its node binds it; all are held until
/// all are chosen, so no two are the same port.
fn free_addrs(nodes: u64) -> Result<BTreeMap<NodeId, [std::net::SocketAddr; 3]>, BackupError> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse::<u16>().ok()))
        .unwrap_or(32768);
    let (lo, hi) = (10_000u16, ephemeral_low.max(10_001));
    let mut seed = u64::from_le_bytes(super::crypto::random_salt()[..8].try_into().expect("8 bytes"));
    let mut held: Vec<std::net::TcpListener> = Vec::new();
    let mut tries = 0;
    while held.len() < (nodes * 3) as usize {
        tries += 1;
        if tries > 10_000 {
            return Err(BackupError::Target(format!("no free loopback ports in {lo}..{hi} for the scratch nodes")));
        }
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let port = lo + (seed % u64::from(hi - lo)) as u16;
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            held.push(l);
        }
    }
    let addrs: Vec<std::net::SocketAddr> = held.iter().map(|l| l.local_addr()).collect::<Result<_, _>>()?;
    Ok((1..=nodes).zip(addrs.chunks_exact(3)).map(|(id, a)| (id, [a[0], a[1], a[2]])).collect())
}

/// Runs a drill. An `Err` means the drill could not run (unreadable archive, wrong key, no
/// binary); a drill that ran returns its report, `ok` or not.
pub async fn run(spec: &DrillSpec, keys: &Keyring) -> Result<DrillReport, BackupError> {
    if !(1..=5).contains(&spec.nodes) {
        return Err(BackupError::Target(format!("a drill runs 1 to 5 scratch nodes, not {}", spec.nodes)));
    }
    let started = Instant::now();
    let drilled_at_ms = crate::memory::now_ms();
    let dir = spec.scratch_dir.join(format!("drill-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&spec.scratch_dir)?;
    // Private from the start: it holds decrypted data of every tenant (the default parent is
    // the shared temp dir). Not recursive, so an existing path is refused.
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    }
    let mut scratch = Scratch { dir: dir.clone(), children: Vec::new() };

    let addrs = free_addrs(spec.nodes)?;
    let members: BTreeMap<NodeId, EngramNode> = addrs
        .iter()
        .map(|(id, a)| (*id, EngramNode { api_addr: a[0].to_string(), raft_addr: a[1].to_string() }))
        .collect();

    // 1. Restore every member, in parallel.
    let restores: Vec<_> = members
        .keys()
        .map(|&id| {
            let (archive, keys, members) = (spec.archive.clone(), keys.clone(), members.clone());
            let target = RestoreTarget {
                data_dir: dir.join(format!("n{id}")),
                node_id: id,
                members,
                force: false,
                at_rest: spec.at_rest.clone(),
            };
            tokio::task::spawn_blocking(move || restore(std::fs::File::open(&archive)?, &keys, &target))
        })
        .collect();
    // Every restore is awaited before any error is returned, so none writes into the scratch
    // dir after it was removed.
    let mut outcomes = Vec::new();
    for r in restores {
        outcomes.push(r.await.map_err(|e| BackupError::Io(std::io::Error::other(e))).and_then(|r| r));
    }
    let mut info: Option<BackupInfo> = None;
    let mut erased = Vec::new();
    for o in outcomes {
        let o = o?;
        erased = o.erased.iter().map(|e| e.namespace.clone()).collect();
        info = Some(o.info);
    }
    let info = info.expect("at least one member");
    let restore_ms = started.elapsed().as_millis() as u64;

    // 2 and 3: the restored rows, before anything runs on them.
    let first = dir.join("n1").join("state.redb");
    let queries = spec.queries_per_namespace;
    let master = spec.at_rest.as_ref().map(|a| a.master.clone());
    let (restored_digest, probes) = tokio::task::spawn_blocking(move || -> Result<_, BackupError> {
        let db = Arc::new(redb::Database::open(&first).map_err(crate::error::StorageError::from)?);
        // Sealed rows open with the data keys the restore put in the state.
        let vault = crate::storage::vault::Vault::new(master);
        let reader = StateReader::with_vault(db.clone(), vault.clone());
        let (_, keys, _) = reader.data_keys()?;
        vault.load(&keys).map_err(|e| BackupError::Key(e.to_string()))?;
        Ok((reader.data_digest()?, probes(&reader, queries, drilled_at_ms)?))
    })
    .await
    .map_err(|e| BackupError::Io(std::io::Error::other(e)))??;

    let check_ms = started.elapsed().as_millis() as u64 - restore_ms;
    let h = &info.header;
    let mut report = DrillReport {
        ok: false,
        problems: Vec::new(),
        archive: spec.archive.display().to_string(),
        backup_id: uuid::Uuid::from_bytes(h.backup_id).to_string(),
        applied_index: h.applied_index,
        memories: info.manifest.memories,
        namespaces: info.manifest.namespaces,
        nodes: spec.nodes,
        backup_created_at_ms: h.created_at_ms,
        drilled_at_ms,
        data_age_ms: drilled_at_ms.saturating_sub(h.created_at_ms),
        restore_ms,
        start_ms: 0,
        rto_ms: 0,
        check_ms,
        source_digest: info.manifest.data_digest.map(hex::encode),
        restored_digest: hex::encode(restored_digest),
        node_digests: BTreeMap::new(),
        queries: 0,
        recall_at_10: 0.0,
        erased,
    };
    match info.manifest.data_digest {
        // The source's digest covers namespaces erased since: the rows left can not match it.
        Some(_) if !report.erased.is_empty() => {}
        Some(d) if d != restored_digest => report.problems.push(format!(
            "the restored rows' digest {} differs from the source's {} at index {}",
            report.restored_digest,
            hex::encode(d),
            h.applied_index
        )),
        Some(_) => {}
        None => report.problems.push(
            "the backup's manifest has no source digest (format 1): only the archive's own checks vouch for its rows"
                .into(),
        ),
    }

    // 4. Start the members, secured, and wait for a committed write.
    let (secure, options) = secure_scratch(&dir, &addrs.keys().copied().collect::<Vec<_>>())?;
    for (id, a) in &addrs {
        let data_dir = dir.join(format!("n{id}"));
        let log = std::fs::File::create(dir.join(format!("n{id}.log")))?;
        let mut cmd = Command::new(&spec.engram_bin);
        // Nothing of the caller's environment configures a scratch node.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ENGRAM_") {
                cmd.env_remove(k);
            }
        }
        // The master key goes to the scratch node in its environment, never to a file beside
        // the sealed state.
        if let Some(a) = &spec.at_rest {
            cmd.env(crate::storage::vault::KEY_ENV, a.master.to_env_value().as_str());
        }
        cmd.args(&secure[id])
            .args(["--node-id", &id.to_string()])
            .arg("--data-dir")
            .arg(&data_dir)
            .args([
                "--listen-api",
                &a[0].to_string(),
                "--listen-raft",
                &a[1].to_string(),
                "--listen-http",
                &a[2].to_string(),
            ])
            .args(["--backup-interval-secs", "0", "--cluster-verify-interval-secs", "0"])
            .arg("--backup-dir")
            .arg(dir.join(format!("n{id}-backups")))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // A scratch node must not outlive a drill whose process was killed (no drop runs then).
        // The signal follows the thread that spawned it: a runtime worker, which lives as long
        // as the runtime.
        #[cfg(target_os = "linux")]
        // SAFETY: the closure only calls prctl, which is async-signal-safe.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| {
            BackupError::Target(format!("cannot start the scratch node {}: {e}", spec.engram_bin.display()))
        })?;
        scratch.children.push(child);
    }
    let nodes_started = Instant::now();
    let endpoints: Vec<String> = members.values().map(|n| n.api_addr.clone()).collect();
    let client =
        Client::with_options(endpoints.clone(), options.clone()).map_err(|e| BackupError::Target(e.to_string()))?;
    let deadline = nodes_started + spec.timeout;
    let mark = loop {
        match client.admin().propose_mark().await {
            Ok(m) => break m,
            Err(e) if Instant::now() >= deadline => {
                report
                    .problems
                    .push(format!("the scratch cluster did not commit a write within {:?}: {e}", spec.timeout));
                return Ok(report);
            }
            Err(_) => {
                if let Some(dead) = exited(&mut scratch.children) {
                    report.problems.push(format!("scratch node {dead} exited during start: {}", log_tail(&dir, dead)));
                    return Ok(report);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    report.start_ms = nodes_started.elapsed().as_millis() as u64;
    report.rto_ms = report.restore_ms + report.start_ms;
    // A majority committed the mark; a member that died meanwhile (its port was taken between
    // the drill choosing it and the node binding it, say) is a failed drill, said plainly.
    if let Some(dead) = exited(&mut scratch.children) {
        report.problems.push(format!("scratch node {dead} exited during start: {}", log_tail(&dir, dead)));
        return Ok(report);
    }
    for (id, addr) in members.keys().zip(&endpoints) {
        let pinned =
            Client::with_options([addr.clone()], options.clone()).map_err(|e| BackupError::Target(e.to_string()))?;
        match pinned.admin().mark_digest(&mark.mark_id, 60_000).await {
            Ok(d) => {
                report.node_digests.insert(*id, hex::encode(&d.digest));
            }
            Err(e) => report.problems.push(format!("node {id} gave no digest at the mark: {e}")),
        }
    }
    let mut distinct: Vec<&String> = report.node_digests.values().collect();
    distinct.dedup();
    if distinct.len() > 1 {
        report.problems.push(format!("the scratch nodes hold different states at mark index {}", mark.index));
    }

    // 5. Search answers.
    let (mut found, mut wanted) = (0usize, 0usize);
    for p in &probes {
        // Pure similarity, as the oracle ranks: not the namespace's decay policy.
        let req = crate::proto::SearchRequest {
            namespace: p.namespace.clone(),
            vector: p.vector.clone(),
            k: K as u32,
            consistency: crate::proto::Consistency::Linearizable as i32,
            ranking: Some(crate::proto::DecayPolicy { half_life_ms: 1, similarity: 1.0, ..Default::default() }),
            ..Default::default()
        };
        match client.search_with(req).await {
            Ok(r) => {
                let got: std::collections::HashSet<&str> = r.hits.iter().map(|h| h.id.as_str()).collect();
                found += p.want.iter().filter(|id| got.contains(id.as_str())).count();
                wanted += p.want.len();
                report.queries += 1;
            }
            Err(e) => {
                report.problems.push(format!("a search in {} failed: {e}", p.namespace));
                break;
            }
        }
    }
    report.recall_at_10 = if wanted == 0 { 1.0 } else { found as f64 / wanted as f64 };
    if report.recall_at_10 < MIN_RECALL {
        report
            .problems
            .push(format!("recall@10 {:.4} against the backup's rows is below {MIN_RECALL}", report.recall_at_10));
    }
    report.ok = report.problems.is_empty();
    drop(scratch);
    Ok(report)
}

/// The name in the scratch nodes' certificates.
const SCRATCH_CLUSTER: &str = "engram-drill";

/// Throwaway credentials for the scratch nodes under `dir/tls`: each node's flags (a CA and
/// its certificate, and an HS256 secret for tokens), and the options of a client holding a
/// root token signed with that secret (valid for a day, the certificates' lifetime).
fn secure_scratch(
    dir: &Path,
    ids: &[NodeId],
) -> Result<(BTreeMap<NodeId, Vec<std::ffi::OsString>>, crate::client::ClientOptions), BackupError> {
    use crate::auth::certs::CertAuthority;
    let tls = dir.join("tls");
    std::fs::create_dir_all(&tls)?;
    let failed = |e: crate::auth::certs::CertError| BackupError::Target(format!("scratch certificates: {e}"));
    let ca = CertAuthority::generate(SCRATCH_CLUSTER, 1).map_err(failed)?;
    let ca_path = tls.join("ca.pem");
    std::fs::write(&ca_path, &ca.cert_pem)?;
    let secret = hex::encode(super::crypto::random_salt());
    let secret_path = tls.join("jwt.secret");
    crate::secrets::write_private(&secret_path, secret.as_bytes(), false)?;
    let mut flags = BTreeMap::new();
    for &id in ids {
        let issued = ca.issue_node(id, &["127.0.0.1".to_string()], 1).map_err(failed)?;
        let (cert, key) = (tls.join(format!("node-{id}.pem")), tls.join(format!("node-{id}-key.pem")));
        std::fs::write(&cert, &issued.cert_pem)?;
        crate::secrets::write_private(&key, issued.key_pem.as_bytes(), false)?;
        let mut f: Vec<std::ffi::OsString> = Vec::new();
        for (flag, path) in [
            ("--tls-ca-file", &ca_path),
            ("--tls-cert-file", &cert),
            ("--tls-key-file", &key),
            ("--jwt-key-file", &secret_path),
        ] {
            f.push(flag.into());
            f.push(path.into());
        }
        f.extend(["--jwt-algorithm", "hs256"].map(Into::into));
        flags.insert(id, f);
    }
    let now = crate::memory::now_ms() / 1000;
    let claims =
        serde_json::json!({"sub": "backup-drill", "roles": [crate::auth::records::ROOT_ROLE], "exp": now + 86_400});
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| BackupError::Target(format!("scratch token: {e}")))?;
    let options = crate::client::ClientOptions {
        tls: Some(crate::client::ClientTls {
            ca_pem: ca.cert_pem.clone().into_bytes(),
            server_name: Some(crate::auth::identity::cluster_dns_name(SCRATCH_CLUSTER)),
            identity: None,
        }),
        credential: Some(token),
        ..Default::default()
    };
    Ok((flags, options))
}

/// Refuses a drill whose restored copies would not fit with room to spare: a copy takes up to
/// about 4 times the (compressed) archive, and a scheduled drill restores on the data dir's
/// own volume, whose free space the node's own writes need.
fn check_space(archive: &Path, scratch: &Path, nodes: u64) -> Result<(), BackupError> {
    let size = std::fs::metadata(archive)?.len();
    std::fs::create_dir_all(scratch)?;
    let need = size.saturating_mul(4).saturating_mul(nodes).saturating_add(1 << 30);
    match crate::http::free_bytes(scratch) {
        Some(free) if free < need => Err(BackupError::Target(format!(
            "{} has {free} bytes free; a drill of {} ({size} bytes) into {nodes} node(s) needs about {need}",
            scratch.display(),
            archive.display()
        ))),
        _ => Ok(()),
    }
}

/// The last lines of scratch node `id`'s log.
fn log_tail(dir: &Path, id: usize) -> String {
    let log = std::fs::read_to_string(dir.join(format!("n{id}.log"))).unwrap_or_default();
    let lines: Vec<&str> = log.lines().rev().take(3).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// The id of a scratch node that has exited, if any.
fn exited(children: &mut [Child]) -> Option<usize> {
    children.iter_mut().position(|c| matches!(c.try_wait(), Ok(Some(_)))).map(|i| i + 1)
}

/// Memories read per page while answering the sample queries exactly.
const PAGE: usize = 8192;

/// What [`probes`] does with each page: its first memory's position, and the page.
type PageFn<'a> = dyn FnMut(u64, &[Memory]) -> Result<(), BackupError> + 'a;

/// Sample queries from the largest namespaces, each with its exact top [`K`] among the
/// namespace's live memories at `now_ms`. Each namespace is read twice, a page at a time (the
/// sample, then every memory against it), so memory use is one page whatever its size.
fn probes(reader: &StateReader, per_namespace: usize, now_ms: u64) -> Result<Vec<Probe>, BackupError> {
    let mut namespaces = reader.namespaces()?;
    namespaces.sort_by(|a, b| b.memory_count.cmp(&a.memory_count).then(a.name.cmp(&b.name)));
    let bad = |e: crate::vector::VectorError| BackupError::corrupt("restored memories", e.to_string());
    let pages = |ns: &str, f: &mut PageFn| -> Result<(), BackupError> {
        let (mut after, mut seen) = (None::<String>, 0u64);
        loop {
            let (_, page) = reader.list(ns, after.as_deref(), PAGE, now_ms)?;
            f(seen, &page.memories)?;
            seen += page.memories.len() as u64;
            match page.next_after {
                Some(next) => after = Some(next),
                None => return Ok(()),
            }
        }
    };
    let mut out = Vec::new();
    for ns in namespaces.into_iter().filter(|n| n.memory_count > 0).take(MAX_NAMESPACES) {
        if per_namespace == 0 {
            break;
        }
        let prepare = |v: &[f32]| {
            let mut v = v.to_vec();
            if ns.metric == Metric::Cosine {
                crate::vector::normalize(&mut v);
            }
            v
        };
        // The sample: evenly spaced by position in id order.
        let step = (ns.memory_count as usize / per_namespace).max(1) as u64;
        let mut sample: Vec<Vec<f32>> = Vec::new();
        pages(&ns.name, &mut |first, ms| {
            for (i, m) in ms.iter().enumerate() {
                if (first + i as u64).is_multiple_of(step) && sample.len() < per_namespace {
                    sample.push(m.embedding.clone());
                }
            }
            Ok(())
        })?;
        // Every live memory against the sample: the best K of each page, merged.
        let mut best: Vec<Vec<crate::vector::Hit>> = vec![Vec::new(); sample.len()];
        let mut ids: Vec<String> = Vec::new();
        pages(&ns.name, &mut |first, ms| {
            let mut index = ExactIndex::new(ns.dimension as usize, ns.metric);
            let flat: Vec<f32> = ms.iter().flat_map(|m| prepare(&m.embedding)).collect();
            let positions: Vec<u64> = (first..first + ms.len() as u64).collect();
            index.upsert(&positions, &flat).map_err(bad)?;
            ids.extend(ms.iter().map(|m| m.id.clone()));
            for (q, hits) in sample.iter().zip(best.iter_mut()) {
                hits.extend(index.search(&prepare(q), K, None, SearchParams::default()).map_err(bad)?);
                crate::vector::rank(ns.metric, hits, K);
            }
            Ok(())
        })?;
        for (vector, hits) in sample.into_iter().zip(best) {
            let want = hits.iter().map(|h| ids[h.id as usize].clone()).collect();
            out.push(Probe { namespace: ns.name.clone(), vector, want });
        }
    }
    Ok(out)
}

/// The newest backup in `dir` (names sort by age), if any.
pub fn latest_in(dir: &Path) -> Result<Option<PathBuf>, BackupError> {
    Ok(super::schedule::backup_names(dir)?.pop().map(|n| dir.join(n)))
}

/// The last scheduled drill's outcome, for status and metrics.
#[derive(Debug, Clone, Default)]
pub struct LastDrill {
    /// When it ran (0: never).
    pub at_ms: u64,
    pub ok: bool,
    pub backup: String,
    pub rto_ms: u64,
    pub data_age_ms: u64,
    /// Why it failed, or could not run.
    pub error: String,
}

/// Runs until `stop` resolves: every `every`, the leader drills the newest backup in
/// `backup_dir` with one scratch node (`spec.archive` is chosen at each run), the keyring from
/// `key_file` (else `ENGRAM_BACKUP_KEY`).
pub async fn scheduled(
    (node, reader): (crate::raft::RaftNode, StateReader),
    every: Duration,
    backup_dir: PathBuf,
    key_file: Option<PathBuf>,
    spec: DrillSpec,
    status: super::schedule::BackupStatus,
    stop: impl std::future::Future<Output = ()>,
) {
    // A shutdown ends a drill under way; its scratch nodes are killed as it is dropped.
    let vault = node.vault().clone();
    node.every_while_leader(every, stop, || async {
        // A cluster sealed at rest: its master keyring and its data keys now.
        let at_rest = match (vault.master(), reader.data_keys()) {
            (Some(master), Ok((_, keys, erasures))) => Some(super::restore::AtRest { master, keys, erasures }),
            _ => None,
        };
        drill_once(&backup_dir, key_file.as_deref(), &DrillSpec { at_rest, ..spec.clone() }, &status).await
    })
    .await;
}

async fn drill_once(
    backup_dir: &Path,
    key_file: Option<&Path>,
    spec: &DrillSpec,
    status: &super::schedule::BackupStatus,
) {
    let outcome = async {
        // Scratch dirs a killed drill left behind: this node's own dir, so nothing else uses them.
        if let Ok(entries) = std::fs::read_dir(&spec.scratch_dir) {
            for e in entries.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("drill-")) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let keys = Keyring::resolve(key_file)?;
        let archive = latest_in(backup_dir)?
            .ok_or_else(|| BackupError::Empty(format!("no backup in {} to drill", backup_dir.display())))?;
        check_space(&archive, &spec.scratch_dir, spec.nodes)?;
        run(&DrillSpec { archive, ..spec.clone() }, &keys).await
    }
    .await;
    let mut last = LastDrill { at_ms: crate::memory::now_ms(), ..Default::default() };
    match outcome {
        Ok(r) => {
            metrics::counter!("engram_backup_drills_total", "result" => if r.ok { "ok" } else { "failed" })
                .increment(1);
            metrics::gauge!("engram_backup_drill_rto_seconds").set(r.rto_ms as f64 / 1000.0);
            metrics::gauge!("engram_backup_drill_data_age_seconds").set(r.data_age_ms as f64 / 1000.0);
            metrics::gauge!("engram_backup_drill_recall").set(r.recall_at_10);
            if r.ok {
                metrics::gauge!("engram_backup_drill_last_success_timestamp_seconds").set(last.at_ms as f64 / 1000.0);
                tracing::info!(backup = %r.archive, rto_ms = r.rto_ms, data_age_ms = r.data_age_ms, recall = r.recall_at_10, "backup drill passed");
            } else {
                tracing::error!(backup = %r.archive, problems = ?r.problems, "backup drill FAILED");
            }
            last.ok = r.ok;
            last.backup = r.archive;
            last.rto_ms = r.rto_ms;
            last.data_age_ms = r.data_age_ms;
            last.error = r.problems.join("; ");
        }
        Err(e) => {
            metrics::counter!("engram_backup_drills_total", "result" => "error").increment(1);
            tracing::error!(error = %e, "backup drill could not run");
            last.error = e.to_string();
        }
    }
    status.lock().unwrap_or_else(|p| p.into_inner()).drill = last;
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn scratch_nodes_are_secured_and_their_secrets_private() {
        let dir = tempfile::tempdir().unwrap();
        let (flags, options) = secure_scratch(dir.path(), &[1, 2]).unwrap();
        for (id, f) in &flags {
            let f: Vec<String> = f.iter().map(|s| s.to_string_lossy().into_owned()).collect();
            assert!(!f.iter().any(|a| a == "--insecure"), "node {id}: {f:?}");
            for flag in ["--tls-ca-file", "--tls-cert-file", "--tls-key-file", "--jwt-key-file", "--jwt-algorithm"] {
                assert!(f.iter().any(|a| a == flag), "node {id} lacks {flag}: {f:?}");
            }
        }
        for private in ["jwt.secret", "node-1-key.pem", "node-2-key.pem"] {
            let mode = std::fs::metadata(dir.path().join("tls").join(private)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{private}");
        }
        // The token is signed with the secret the nodes get, and speaks for root.
        let secret = std::fs::read(dir.path().join("tls/jwt.secret")).unwrap();
        let settings = crate::auth::jwt::JwtSettings {
            algorithm: crate::auth::jwt::JwtAlgorithm::Hs256,
            key_file: dir.path().join("tls/jwt.secret"),
            issuer: None,
            audience: None,
            roles_claim: "roles".into(),
        };
        assert!(secret.len() >= 32);
        let p = crate::auth::jwt::JwtVerifier::load(&settings)
            .unwrap()
            .verify(options.credential.as_deref().unwrap())
            .unwrap();
        assert!(
            matches!(p, crate::auth::Principal::Token { ref roles, .. } if roles == &["root".to_string()]),
            "{p:?}"
        );
        assert!(options.tls.is_some());
    }
}
