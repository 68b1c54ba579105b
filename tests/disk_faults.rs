//! A node whose disk stops syncing must stop, not carry on. Found while building the chaos
//! harness's `disk` nemesis (jepsen/): when fsync failed, openraft went fatal but the process
//! kept its listeners open, answering every call with INTERNAL errors forever. Now the node
//! exits non-zero, and on restart it still has everything it acknowledged.
//!
//! Faults come from libfiu's POSIX preload (Debian `fiu-utils`, installed by scripts/setup.sh):
//! `fiu-ctrl` makes every fsync / fdatasync of the running process fail with EIO.

use std::path::Path;
use std::time::{Duration, Instant};

mod common;

use common::process::EngramProcess;
use engram::client::{Client, Metric, NewMemory};

const FIU_PRELOAD: &str = "/usr/lib/fiu/fiu_run_preload.so /usr/lib/fiu/fiu_posix_preload.so";
const NS: &str = "disk/faults";

fn free_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    format!("127.0.0.1:{port}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_fsync_fails_stops_and_keeps_what_it_acknowledged() {
    assert!(
        Path::new("/usr/lib/fiu/fiu_posix_preload.so").exists(),
        "libfiu's preload is missing: install fiu-utils (scripts/setup.sh does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fiu");
    let bin = Path::new(env!("CARGO_BIN_EXE_engram"));
    let mut node = EngramProcess::new(1, free_addr(), free_addr(), free_addr(), dir.path().join("n1"));
    let env = [("LD_PRELOAD", FIU_PRELOAD.to_string()), ("FIU_CTRL_FIFO", fifo.to_string_lossy().into_owned())];
    node.start_with_env(bin, 0, &env);

    let c = Client::new([node.api.clone()]).unwrap().creating_namespaces();
    let mut inited = false;
    for _ in 0..100 {
        if c.admin().init_cluster(vec![]).await.is_ok() {
            inited = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(inited, "init failed");
    c.create_namespace(NS, 4, Metric::Cosine).await.unwrap();
    let mut acked = Vec::new();
    for i in 0..20 {
        let put = c.put(NS, NewMemory::new(format!("memory {i}"), vec![1.0, 0.0, 0.0, i as f32])).await.unwrap();
        acked.push(put.id);
    }

    // Every fsync now fails with EIO.
    let pid = node.pid().unwrap().to_string();
    let out = std::process::Command::new("fiu-ctrl")
        .args(["-c", "enable name=posix/io/sync/*,failinfo=5", "-f", fifo.to_str().unwrap(), &pid])
        .output()
        .expect("fiu-ctrl");
    assert!(out.status.success(), "fiu-ctrl: {}", String::from_utf8_lossy(&out.stderr));

    // The next write cannot be made durable, so it must not be acknowledged...
    let one = Client::pinned(&node.api).unwrap();
    let r = one.put(NS, NewMemory::new("never durable", vec![0.0, 1.0, 0.0, 0.0])).await;
    assert!(r.is_err(), "a write was acknowledged although fsync fails: {r:?}");
    // ...and the node must stop on its own, with a failure status.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = node.exited() {
            break s;
        }
        assert!(Instant::now() < deadline, "the node kept running with a failing disk");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success(), "the node exited successfully after a storage failure: {status}");

    // Restarted on a healthy disk, it has every acknowledged write.
    node.start(bin, 0);
    let c = Client::new([node.api.clone()]).unwrap().creating_namespaces();
    for id in &acked {
        let m = c.get(NS, id).await.unwrap_or_else(|e| panic!("acknowledged memory {id} lost: {e}"));
        assert!(m.text.starts_with("memory "));
    }
}
