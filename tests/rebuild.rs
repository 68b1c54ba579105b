//! A node whose data dir is damaged refuses to start, naming the file, and
//! `engramctl members rebuild` brings it back from its peers without anyone editing files:
//! real processes, a flipped byte in a page of `state.redb`, then a truncated `raft-log.redb`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use common::process::{cluster_of_three, EngramProcess};
use engram::client::{Client, Metric, NewMemory};

const NS: &str = "rebuild/me";

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_engram"))
}

fn engramctl(endpoints: &[&EngramProcess], args: &[&str]) -> std::process::Child {
    let eps: Vec<&str> = endpoints.iter().map(|p| p.api.as_str()).collect();
    Command::new(env!("CARGO_BIN_EXE_engramctl"))
        .args(["--insecure", "--endpoints", &eps.join(",")])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn output(child: std::process::Child) -> (bool, String) {
    let out = child.wait_with_output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Starts `node` on its damaged data dir: it must exit non-zero, its log naming `file`.
async fn refuses_to_start(node: &mut EngramProcess, file: &str) {
    let before = std::fs::read_to_string(&node.log).unwrap_or_default().len();
    node.start(bin(), 100);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = node.exited() {
            break s;
        }
        assert!(Instant::now() < deadline, "node {} started from a damaged {file}", node.id);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success(), "{status}");
    let log = std::fs::read_to_string(&node.log).unwrap();
    let said = &log[before..];
    assert!(said.contains(file) && said.contains("damaged"), "the refusal does not name {file}:\n{said}");
    assert!(said.contains("members rebuild"), "the refusal does not say the way back:\n{said}");
}

/// Rebuilds `node` through engramctl while starting it, as an operator (or systemd) would.
async fn rebuild(node: &mut EngramProcess, peers: &[&EngramProcess]) {
    let dir = node.data_dir.clone();
    let id = node.id.to_string();
    let ctl = engramctl(
        peers,
        &["members", "rebuild", "--id", &id, "--data-dir", dir.to_str().unwrap(), "--timeout-secs", "120"],
    );
    // Start the node once its damaged dir has moved aside.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_dir(dir.parent().unwrap())
        .unwrap()
        .any(|e| e.unwrap().file_name().to_string_lossy().starts_with(&format!("n{id}.damaged-")))
    {
        assert!(Instant::now() < deadline, "members rebuild never moved the data dir aside");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.start(bin(), 100);
    let (ok, said) = tokio::task::spawn_blocking(move || output(ctl)).await.unwrap();
    assert!(ok, "members rebuild failed:\n{said}");
    assert!(said.contains(&format!("node {id} rebuilt")), "{said}");
    eprintln!("{said}");
}

async fn digests_equal(nodes: &[&EngramProcess]) {
    let ctl = engramctl(nodes, &["cluster", "verify"]);
    let (ok, said) = tokio::task::spawn_blocking(move || output(ctl)).await.unwrap();
    assert!(ok && said.contains("all 3 endpoints hold the same state"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_node_refuses_to_start_and_members_rebuild_brings_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let port = 43000 + (std::process::id() % 500) as u16 * 9;
    let (mut nodes, client) = cluster_of_three(bin(), port, dir.path(), 100).await;
    let c = client.creating_namespaces();
    c.create_namespace(NS, 4, Metric::Cosine).await.unwrap();
    for i in 0..60u32 {
        c.put(NS, NewMemory::new(format!("rebuild marker {i:03}"), vec![1.0, i as f32, 0.5, 0.25])).await.unwrap();
    }

    // A flipped byte in a page of node 3's state machine (stopped cleanly first).
    let status = nodes[2].terminate().unwrap();
    assert!(status.success(), "{status}");
    let state = nodes[2].data_dir.join("state.redb");
    let mut bytes = std::fs::read(&state).unwrap();
    // Every copy (freed pages keep old ones): the live page is among them.
    let at: Vec<usize> =
        bytes.windows(18).enumerate().filter(|(_, w)| *w == b"rebuild marker 007").map(|(i, _)| i).collect();
    assert!(!at.is_empty(), "the marker in state.redb");
    for i in at {
        bytes[i + 3] ^= 0x20;
    }
    std::fs::write(&state, &bytes).unwrap();
    refuses_to_start(&mut nodes[2], "state.redb").await;

    // The cluster carries on meanwhile; the rebuild brings node 3 back with all of it.
    for i in 60..80u32 {
        c.put(NS, NewMemory::new(format!("rebuild marker {i:03}"), vec![1.0, i as f32, 0.5, 0.25])).await.unwrap();
    }
    let (a, b, rest) = split3(&mut nodes);
    rebuild(rest, &[&*a, &*b]).await;
    let own = Client::new([rest.api.clone()]).unwrap();
    assert_eq!(own.list_all(NS).await.unwrap().len(), 80, "node 3 after its rebuild");
    let s = c.admin().status().await.unwrap();
    assert!(s.voters.iter().any(|n| n.id == 3), "node 3 is a voter again: {:?}", s.voters);
    digests_equal(&[&*a, &*b, &*rest]).await;

    // A truncated Raft log on node 2.
    b.terminate().unwrap();
    let log = b.data_dir.join("raft-log.redb");
    let len = std::fs::metadata(&log).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&log).unwrap().set_len(len / 2).unwrap();
    refuses_to_start(b, "raft-log.redb").await;
    rebuild(b, &[&*a, &*rest]).await;
    digests_equal(&[&*a, &*b, &*rest]).await;
}

fn split3(n: &mut [EngramProcess]) -> (&mut EngramProcess, &mut EngramProcess, &mut EngramProcess) {
    let (a, rest) = n.split_first_mut().unwrap();
    let (b, rest) = rest.split_first_mut().unwrap();
    (a, b, &mut rest[0])
}
