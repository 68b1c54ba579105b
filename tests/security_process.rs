//! A real `engram` process with certificates: it refuses to start without them (or with
//! `--insecure` beyond loopback), keeps everything it writes private (umask), and reloads its
//! certificate on SIGHUP without a restart.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::process::EngramProcess;
use common::secure::{served_cert, Secure};
use engram::client::{Client, ClientOptions, NewMemory};
use engram::proto as pb;

fn free_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    format!("127.0.0.1:{port}")
}

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_engram"))
}

#[test]
fn a_node_without_certificates_or_exposed_insecure_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(bin())
            .args(["--node-id", "1", "--data-dir", dir.path().join("d").to_str().unwrap()])
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tls_ca_file"));
    let out = run(&["--insecure", "--listen-api", "0.0.0.0:0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
    assert!(run(&["--unsafe-stale-reads", "--insecure"]).status.code() == Some(2), "the canary flag in a normal build");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_secured_process_keeps_its_files_private_and_reloads_certificates_on_sighup() {
    let s = Secure::new("test");
    let dir = tempfile::tempdir().unwrap();
    let mut node = EngramProcess::new(1, free_addr(), free_addr(), free_addr(), dir.path().join("n1"));
    let paths = s.node_paths(1);
    node.security = vec![
        "--tls-ca-file".into(),
        paths.ca.to_str().unwrap().into(),
        "--tls-cert-file".into(),
        paths.cert.to_str().unwrap().into(),
        "--tls-key-file".into(),
        paths.key.to_str().unwrap().into(),
    ];
    node.start(bin(), 0);
    let opts = |credential| ClientOptions { tls: Some(s.client_tls()), credential, ..Default::default() };
    let first = Client::with_options([node.api.clone()], opts(None)).unwrap();
    let mut ok = false;
    for _ in 0..100 {
        if first.admin().init_secure_cluster(vec![], &s.root).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "cluster init failed");
    let root = Client::with_options([node.api.clone()], opts(Some(s.root.expose().to_string())))
        .unwrap()
        .creating_namespaces();
    root.put("acme/a", NewMemory::new("x", vec![0.1, 0.2, 0.3, 0.4]).with_id("m1")).await.unwrap();
    root.admin().trigger_snapshot().await.unwrap();

    // Everything in the data dir is the node's alone.
    let data = dir.path().join("n1");
    assert_eq!(std::fs::metadata(&data).unwrap().permissions().mode() & 0o777, 0o700);
    for entry in walk(&data) {
        let mode = std::fs::metadata(&entry).unwrap().permissions().mode() & 0o777;
        let want = if entry.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode, want, "{}", entry.display());
    }

    // SIGHUP: the node serves the new certificate to new connections.
    let old = served_cert(&node.api, &s.ca.cert_pem, "test.engram").await;
    s.write_node(1, &["127.0.0.1".into(), "renewed.internal".into()]);
    nix_hup(node.pid().unwrap());
    let mut renewed = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if served_cert(&node.api, &s.ca.cert_pem, "test.engram").await != old {
            renewed = true;
            break;
        }
    }
    assert!(renewed, "the node did not reload its certificate");
    let want = engram::auth::certs::first_der(&std::fs::read_to_string(&paths.cert).unwrap()).unwrap();
    assert_eq!(served_cert(&node.api, &s.ca.cert_pem, "test.engram").await, want);
    assert_eq!(root.get("acme/a", "m1").await.unwrap().text, "x");
    let status: pb::StatusResponse = root.admin().status().await.unwrap();
    assert_eq!(status.node_id, 1);
    node.kill9();
}

fn nix_hup(pid: u32) {
    // SAFETY: kill(2) with a pid this test started and a valid signal number.
    let rc = unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    assert_eq!(rc, 0);
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}
