//! `engramctl backup drill` against real processes: a backup of a three-node cluster is
//! restored into three scratch nodes, which must reproduce the source's data digest at the
//! backup's index and answer searches as the backup's rows do; RTO and data age are reported.
//! A wrong key, a damaged archive and a scratch binary that cannot start all fail the drill,
//! and no scratch dir is left behind.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

mod common;

use common::process::{cluster_of_three, http_get, EngramProcess};
use engram::client::NewMemory;

const KEY: &str = "8f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
const OTHER_KEY: &str = "0000000000000000000000000000000000000000000000000000000000000001";

fn drill(path: &Path, key: &str, scratch: &Path, extra: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_engramctl"))
        .env_remove("ENGRAM_BACKUP_KEY_FILE")
        .env(engram::backup::keys::KEY_ENV, key)
        .args(["backup", "drill"])
        .arg(path)
        .arg("--scratch-dir")
        .arg(scratch)
        .args(["--engram-bin", env!("CARGO_BIN_EXE_engram")])
        .args(extra)
        .output()
        .expect("run engramctl")
}

use common::distinct_vector as vector;

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// One drill at a time in this binary: a drill picks free ports before its nodes bind them,
/// and two drills at once could pick the same one.
static DRILLS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().next().is_none()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drill_restores_scratch_nodes_that_match_the_backup() {
    let _one = DRILLS.lock().await;
    // SAFETY: set before any node starts; the nodes inherit it as their backup key.
    unsafe { std::env::set_var(engram::backup::keys::KEY_ENV, KEY) };
    let dir = tempfile::tempdir().unwrap();
    let (_nodes, client) = cluster_of_three(Path::new(env!("CARGO_BIN_EXE_engram")), 27500, dir.path(), 50).await;
    let client = client.creating_namespaces();
    let batch = |ns: &str, from: u32, n: u32| {
        let items: Vec<_> = (from..from + n)
            .map(|i| {
                (NewMemory::new(format!("{ns} memory {i}"), vector(i, 16)).with_id(format!("m{i}")), Default::default())
            })
            .collect();
        let (client, ns) = (client.clone(), ns.to_string());
        async move { client.put_batch(&ns, items).await.unwrap() }
    };
    batch("drill/big", 0, 200).await;
    batch("drill/big", 200, 100).await;
    batch("drill/small", 0, 5).await;
    let backups = dir.path().join("backups");
    std::fs::create_dir_all(&backups).unwrap();
    let (archive, header) = client.admin().create_backup(&backups).await.unwrap();
    // Writes after the backup: the drill checks the backup's rows, not today's.
    batch("drill/big", 300, 50).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let scratch = dir.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let out = drill(&backups, KEY, &scratch, &["--nodes", "3", "--queries", "20"]);
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["archive"], archive.display().to_string());
    assert_eq!(report["applied_index"], header.applied_index);
    assert_eq!((report["memories"].as_u64(), report["namespaces"].as_u64()), (Some(305), Some(2)));
    // The source's digest at the backup's index, the restored rows' and each node's at its
    // mark are one digest.
    let source = report["source_digest"].as_str().unwrap();
    assert_eq!(report["restored_digest"], source);
    let nodes = report["node_digests"].as_object().unwrap();
    assert_eq!(nodes.len(), 3);
    assert!(nodes.values().all(|d| d == source), "{report}");
    // Flat shards answer exactly: every sampled search found its exact top 10.
    assert_eq!(report["queries"], 25, "20 in the big namespace, 5 in the small one");
    assert_eq!(report["recall_at_10"], 1.0);
    let (rto, restore, start) = (
        report["rto_ms"].as_u64().unwrap(),
        report["restore_ms"].as_u64().unwrap(),
        report["start_ms"].as_u64().unwrap(),
    );
    assert!(rto >= restore + start && start > 0, "{report}");
    assert!(report["data_age_ms"].as_u64().unwrap() >= 300, "{report}");
    assert!(empty(&scratch), "the scratch nodes' dirs were left behind");

    // Partial restore of one namespace through engramctl: the dry run says what would change
    // and changes nothing; the restore then takes drill/big back to the backup's 300.
    let eps: Vec<String> = _nodes.iter().map(|n| n.api.clone()).collect();
    let restore_args = |dry: bool, extra: &[&str]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_engramctl"));
        c.env(engram::backup::keys::KEY_ENV, KEY)
            .args(["--insecure", "--endpoints", &eps.join(","), "backup", "restore-namespace"])
            .arg(&archive)
            .args(["--namespace", "drill/big"])
            .args(extra);
        if dry {
            c.arg("--dry-run");
        }
        c.output().unwrap()
    };
    let restore_ns = |dry: bool| restore_args(dry, &[]);
    let out = restore_ns(true);
    assert!(out.status.success(), "{}", text(&out));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (plan["added"].as_u64(), plan["changed"].as_u64(), plan["removed"].as_u64()),
        (Some(0), Some(0), Some(50)),
        "{plan}"
    );
    assert_eq!(plan["unchanged"], 300);
    assert!(plan.get("applied_index").is_none(), "a dry run restored: {plan}");
    assert_eq!(client.list_all("drill/big").await.unwrap().len(), 350, "the dry run changed the namespace");
    let small_before: Vec<_> =
        client.list_all("drill/small").await.unwrap().into_iter().map(|m| (m.id, m.revision)).collect();
    let out = restore_ns(false);
    assert!(out.status.success(), "{}", text(&out));
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((done["restored"].as_u64(), done["replaced"].as_u64()), (Some(300), Some(350)), "{done}");
    assert_eq!(client.list_all("drill/big").await.unwrap().len(), 300);
    let small_after: Vec<_> =
        client.list_all("drill/small").await.unwrap().into_iter().map(|m| (m.id, m.revision)).collect();
    assert_eq!(small_after, small_before, "another namespace moved");
    // One memory by id: m7 rewritten, then taken back; an id the backup lacks is refused.
    client.put("drill/big", NewMemory::new("rewritten", vector(7, 16)).with_id("m7")).await.unwrap();
    let out = restore_args(false, &["--ids", "m7"]);
    assert!(out.status.success(), "{}", text(&out));
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (done["changed"].as_u64(), done["restored"].as_u64(), done["replaced"].as_u64()),
        (Some(1), Some(1), Some(1)),
        "{done}"
    );
    assert_eq!(client.get("drill/big", "m7").await.unwrap().text, "drill/big memory 7");
    assert_eq!(client.list_all("drill/big").await.unwrap().len(), 300);
    let out = restore_args(false, &["--ids", "m7,m999"]);
    assert!(!out.status.success() && text(&out).contains("not in the backup's drill/big: m999"), "{}", text(&out));

    // A wrong key: no drill, a clear error, nothing left behind.
    let out = drill(&archive, OTHER_KEY, &scratch, &[]);
    assert!(!out.status.success());
    assert!(text(&out).contains("not in the keyring"), "{}", text(&out));
    assert!(empty(&scratch));

    // A damaged archive: refused by the restore, nothing left behind.
    let mut bytes = std::fs::read(&archive).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    let damaged = dir.path().join("damaged.engram");
    std::fs::write(&damaged, bytes).unwrap();
    let out = drill(&damaged, KEY, &scratch, &[]);
    assert!(!out.status.success());
    assert!(text(&out).contains("corrupt"), "{}", text(&out));
    assert!(empty(&scratch));

    // Scratch nodes that cannot start: the drill reports it failed (exit 1), with the reason.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_engramctl"))
        .env(engram::backup::keys::KEY_ENV, KEY)
        .args(["backup", "drill"])
        .arg(&archive)
        .arg("--scratch-dir")
        .arg(&scratch)
        .args(["--engram-bin", "/bin/false", "--timeout-secs", "20"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], false);
    assert!(text(&out).contains("exited during start"), "{}", text(&out));
    assert!(empty(&scratch));
}

/// The leader drills its newest scheduled backup on its own and shows the outcome in status
/// and metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scheduled_drill_reports_in_status_and_metrics() {
    let _one = DRILLS.lock().await;
    // SAFETY: set before the node starts; it inherits it as its backup key.
    unsafe { std::env::set_var(engram::backup::keys::KEY_ENV, KEY) };
    let dir = tempfile::tempdir().unwrap();
    let a = |p: u16| format!("127.0.0.1:{p}");
    let mut node = EngramProcess::new(1, a(27610), a(27611), a(27612), dir.path().join("n1"));
    node.security.extend(["--backup-interval-secs", "1", "--backup-drill-interval-secs", "2"].map(String::from));
    node.start(Path::new(env!("CARGO_BIN_EXE_engram")), 50);
    let client = engram::client::Client::new([node.api.clone()]).unwrap().creating_namespaces();
    let me = engram::proto::NodeInfo { id: 1, raft_addr: node.raft.clone(), api_addr: node.api.clone() };
    for attempt in 0.. {
        match client.admin().init_cluster(vec![me.clone()]).await {
            Ok(_) => break,
            Err(e) if common::process::initialized(&e) => break,
            Err(_) if attempt < 100 => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("init: {e}"),
        }
    }
    let items: Vec<_> = (0..50)
        .map(|i| (NewMemory::new(format!("memory {i}"), vector(i, 8)).with_id(format!("m{i}")), Default::default()))
        .collect();
    client.put_batch("drill/scheduled", items).await.unwrap();

    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let status = loop {
        let s = client.admin().status().await.unwrap();
        if s.last_drill_at_ms > 0 && s.last_drill_ok {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "no passing drill yet: {s:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(status.last_drill_backup.contains("/backups/backup-"), "{status:?}");
    assert!(status.last_drill_rto_ms > 0 && status.last_drill_error.is_empty(), "{status:?}");
    let metrics = http_get(&node.http, "/metrics").await;
    assert!(metrics.contains("engram_backup_drills_total{result=\"ok\"}"), "{metrics}");
    assert!(metrics.contains("engram_backup_drill_rto_seconds"), "{metrics}");
    let health: serde_json::Value = serde_json::from_str(&http_get(&node.http, "/status").await).unwrap();
    assert_eq!(health["backups"]["last_drill"]["ok"], true, "{health}");
    // The scratch node is gone, and so is its dir.
    let left: Vec<_> = std::fs::read_dir(dir.path().join("n1").join("drill")).map(|d| d.count()).into_iter().collect();
    assert!(left.iter().all(|&n| n == 0), "scratch dirs left: {left:?}");
}

const AT_REST_KEY: &str = "6c5b4a39281706f5e4d3c2b1a0918273645546372819a0b1c2d3e4f5a6b7c8d9";

/// A backup of a cluster sealed at rest holds no data keys: a drill needs the cluster's
/// (`keys export --at-rest`) and the master key, and reports a namespace erased since the
/// backup instead of failing on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drill_of_a_sealed_backup_takes_the_clusters_data_keys_and_reports_erasures() {
    let _one = DRILLS.lock().await;
    // SAFETY: set before any node starts; the nodes inherit it as their backup key.
    unsafe { std::env::set_var(engram::backup::keys::KEY_ENV, KEY) };
    let dir = tempfile::tempdir().unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_engram"));
    let mut node = EngramProcess::new(
        1,
        "127.0.0.1:27561".into(),
        "127.0.0.1:27562".into(),
        "127.0.0.1:27563".into(),
        dir.path().join("n1"),
    );
    node.start_with_env(bin, 50, &[(engram::storage::vault::KEY_ENV, AT_REST_KEY.into())]);
    let me = engram::proto::NodeInfo { id: 1, raft_addr: node.raft.clone(), api_addr: node.api.clone() };
    for attempt in 0.. {
        match engram::client::Client::new([node.api.clone()]).unwrap().admin().init_cluster(vec![me.clone()]).await {
            Ok(_) => break,
            Err(e) if common::process::initialized(&e) => break,
            Err(e) if attempt > 100 => panic!("init: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let client = engram::client::Client::new([node.api.clone()]).unwrap().creating_namespaces();
    for ns in ["sealed/keep", "sealed/gone"] {
        let items: Vec<_> = (0..40u32)
            .map(|i| (NewMemory::new(format!("{ns} {i}"), vector(i, 16)).with_id(format!("m{i}")), Default::default()))
            .collect();
        client.put_batch(ns, items).await.unwrap();
    }
    let backups = dir.path().join("backups");
    std::fs::create_dir_all(&backups).unwrap();
    client.admin().create_backup(&backups).await.unwrap();
    let ctl = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_engramctl"))
            .env(engram::storage::vault::KEY_ENV, AT_REST_KEY)
            .args(["--insecure", "--endpoints", &node.api])
            .args(args)
            .output()
            .unwrap()
    };
    let keys = dir.path().join("data-keys.json");
    let out = ctl(&["keys", "export", "--at-rest", "--out", keys.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let scratch = dir.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let sealed_drill = |extra: &[&str]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_engramctl"));
        c.env(engram::backup::keys::KEY_ENV, KEY)
            .env(engram::storage::vault::KEY_ENV, AT_REST_KEY)
            .args(["backup", "drill"])
            .arg(&backups)
            .arg("--scratch-dir")
            .arg(&scratch)
            .args(["--engram-bin", env!("CARGO_BIN_EXE_engram")])
            .args(extra);
        c.output().unwrap()
    };
    // Without the data keys: refused, saying why.
    let out = sealed_drill(&[]);
    assert!(!out.status.success() && text(&out).contains("sealed at rest"), "{}", text(&out));
    let out = sealed_drill(&["--data-keys", keys.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["restored_digest"], report["source_digest"], "{report}");
    assert_eq!(report["recall_at_10"], 1.0);

    // Erased since the backup: the drill restores the rest and names it.
    let out = ctl(&["namespace", "erase", "sealed/gone"]);
    assert!(out.status.success(), "{}", text(&out));
    let receipt: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (receipt["memories"].as_u64(), receipt["crypto_shredded"].as_bool()),
        (Some(40), Some(true)),
        "{receipt}"
    );
    let out = ctl(&["keys", "export", "--at-rest", "--out", dir.path().join("now.json").to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let out = sealed_drill(&["--data-keys", dir.path().join("now.json").to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["erased"], serde_json::json!(["sealed/gone"]), "{report}");
    assert!(empty(&scratch), "the scratch nodes' dirs were left behind");
}
