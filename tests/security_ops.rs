//! Running a secured cluster: certificates reload without a restart, JWT principals are held
//! to their grants, backups carry the auth state into a restored cluster with new
//! certificates, and the hygiene rules hold (private data dirs, bounded metrics, reflection
//! that lists only what the port serves).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use common::secure::served_cert;
use common::{vector, TestCluster};
use engram::client::NewMemory;
use tonic::Code;

/// The certificate the API port serves now, as a fresh client sees it.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn certificates_reload_without_a_restart_and_a_bad_reload_keeps_the_old_ones() {
    let cluster = TestCluster::start_secure(1).await;
    let s = cluster.secure.clone().unwrap();
    let addr = cluster.slot(1).api;
    let name = engram::auth::identity::cluster_dns_name(&s.ca.cluster);
    let file = |p: &std::path::Path| engram::auth::certs::first_der(&std::fs::read_to_string(p).unwrap()).unwrap();
    let paths = s.node_paths(1);
    let old = served_cert(&addr.to_string(), &s.ca.cert_pem, &name).await;
    assert_eq!(old, file(&paths.cert));
    let client = cluster.client();
    client.put("acme/a", NewMemory::new("before", vector(1, 4)).with_id("m1")).await.unwrap();

    // Phase 1: new files, a reload, and new connections get the new certificate; the client
    // carries on.
    s.write_node(1, &["127.0.0.1".into(), "db-1.internal".into()]);
    cluster.handle(1).reload_tls().unwrap();
    let new = served_cert(&addr.to_string(), &s.ca.cert_pem, &name).await;
    assert_ne!(new, old);
    assert_eq!(new, file(&paths.cert));
    assert_eq!(client.get("acme/a", "m1").await.unwrap().text, "before");

    // Phase 2: another node's certificate in this node's files is refused; the node keeps
    // serving the one it had.
    let other = s.ca.issue_node(2, &[], 1).unwrap();
    std::fs::write(&paths.cert, &other.cert_pem).unwrap();
    engram::secrets::write_private(&paths.key, other.key_pem.as_bytes(), true).unwrap();
    let e = cluster.handle(1).reload_tls().unwrap_err().to_string();
    assert!(e.contains("node 2"), "{e}");
    assert_eq!(served_cert(&addr.to_string(), &s.ca.cert_pem, &name).await, new);
    // An open key file is refused too.
    std::fs::set_permissions(&paths.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(cluster.handle(1).reload_tls().unwrap_err().to_string().contains("chmod 600"));
    cluster.client().put("acme/a", NewMemory::new("after", vector(2, 4))).await.unwrap();
    cluster.shutdown().await;
}

const JWT_SECRET: &str = "jwt-secret-for-tests-0123456789abcdef";

fn jwt_settings(c: &mut engram::config::Config) {
    let path = std::env::temp_dir().join(format!("engram-test-jwt-{}.secret", std::process::id()));
    if !path.exists() {
        engram::secrets::write_private(&path, JWT_SECRET.as_bytes(), true).unwrap();
    }
    c.jwt = Some(engram::auth::jwt::JwtSettings {
        algorithm: engram::auth::jwt::JwtAlgorithm::Hs256,
        key_file: path,
        issuer: Some("idp.test".into()),
        audience: Some("engram".into()),
        roles_claim: "roles".into(),
    });
}

fn jwt(sub: &str, roles: &[&str], exp_in_secs: i64) -> String {
    let now = (engram::memory::now_ms() / 1000) as i64;
    let claims =
        serde_json::json!({"sub": sub, "roles": roles, "iss": "idp.test", "aud": "engram", "exp": now + exp_in_secs});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jwt_principals_are_held_to_their_roles_grants() {
    let cluster = TestCluster::start_secure_with(3, jwt_settings).await;
    let root = cluster.client();
    root.auth().create_role("acme-rw").await.unwrap();
    root.auth().grant("acme-rw", "acme/*", &["read", "write"], None).await.unwrap();

    let svc = cluster.client_as(Some(jwt("svc-1", &["acme-rw"], 600)));
    let me = svc.auth().whoami().await.unwrap();
    assert_eq!((me.principal.as_str(), me.kind.as_str()), ("svc-1", "jwt"));
    svc.put("acme/a", NewMemory::new("by jwt", vector(1, 4)).with_id("j1")).await.unwrap();
    assert_eq!(svc.get("acme/a", "j1").await.unwrap().text, "by jwt");
    assert_eq!(svc.put("other/a", NewMemory::new("x", vector(1, 4))).await.unwrap_err().code, Code::PermissionDenied);
    assert_eq!(svc.auth().list_keys().await.unwrap_err().code, Code::PermissionDenied);
    // A role the token names but the cluster does not have grants nothing.
    let ghost = cluster.client_as(Some(jwt("svc-2", &["no-such-role"], 600)));
    assert_eq!(ghost.get("acme/a", "j1").await.unwrap_err().code, Code::PermissionDenied);
    // Expired, tampered with, or signed with another secret: unauthenticated.
    let expired = jwt("svc-1", &["acme-rw"], -120);
    let mut tampered = jwt("svc-1", &["acme-rw"], 600);
    tampered.insert(tampered.len() - 3, 'A');
    let foreign = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"sub": "svc-1", "roles": ["root"], "iss": "idp.test", "aud": "engram", "exp": 4_000_000_000u64}),
        &jsonwebtoken::EncodingKey::from_secret(b"not the issuer's secret at all!!"),
    )
    .unwrap();
    for (what, t) in [("expired", expired), ("tampered", tampered), ("foreign", foreign)] {
        let e = cluster.client_as(Some(t)).get("acme/a", "j1").await.unwrap_err();
        assert_eq!(e.code, Code::Unauthenticated, "{what}: {e:?}");
    }
    cluster.shutdown().await;
}

const BACKUP_KEY: &str = "1d1f0c3b9a8e2d4c6b5a49382716f5e4d3c2b1a0f9e8d7c6b5a4938271605f4e";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backups_carry_keys_and_grants_and_a_restored_cluster_takes_new_certificates() {
    // SAFETY: the only test in this binary that reads the variable, set before nodes start.
    unsafe { std::env::set_var(engram::backup::keys::KEY_ENV, BACKUP_KEY) };
    let keys = engram::backup::Keyring::from_env_value(BACKUP_KEY).unwrap();
    let cluster = TestCluster::start_secure(3).await;
    let root = cluster.client();
    root.auth().create_role("acme-rw").await.unwrap();
    root.auth().grant("acme-rw", "acme/*", &["read", "write"], None).await.unwrap();
    let tenant_key = root.auth().create_key("acme-app", &["acme-rw"], 0).await.unwrap().key;
    let tenant = cluster.client_as(Some(tenant_key.clone()));
    tenant.put("acme/a", NewMemory::new("kept", vector(1, 4)).with_id("m1")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = root.admin().create_backup(dir.path()).await.unwrap();
    let old_tls = cluster.secure.as_ref().unwrap().client_tls();
    cluster.shutdown().await;

    // A new cluster from the backup, with a CA of its own.
    let fresh = Arc::new(common::secure::Secure::new("restored"));
    let restored = TestCluster::restored_with(&path, 3, &keys, |_| {}, Some(fresh)).await;
    // The tenant's key and grants came along: it reads its memory and is still confined.
    let tenant = restored.client_as(Some(tenant_key.clone()));
    assert_eq!(tenant.get("acme/a", "m1").await.unwrap().text, "kept");
    assert_eq!(tenant.get("other/a", "m1").await.unwrap_err().code, Code::PermissionDenied);
    // The old cluster's CA does not vouch for the new nodes.
    let quick = engram::client::RetryPolicy { max_attempts: 1, timeout: Duration::from_secs(2), ..Default::default() };
    let opts = engram::client::ClientOptions {
        retry: quick,
        tls: Some(old_tls),
        credential: Some(tenant_key),
        create_namespaces: true,
    };
    let stale = engram::client::Client::with_options([restored.slot(1).api.to_string()], opts).unwrap();
    assert!(stale.get("acme/a", "m1").await.is_err());
    restored.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn data_dirs_are_private_metrics_stay_bounded_and_reflection_hides_the_peer_service() {
    let cluster = TestCluster::start(1).await;
    let c = cluster.client();
    // 60 namespaces must not make 60 metric series.
    for i in 0..60 {
        c.put(&format!("tenant-{i}/agent"), NewMemory::new("x", vector(i, 4))).await.unwrap();
        c.search(&format!("tenant-{i}/agent"), vector(i, 4), 1).await.unwrap();
    }
    let dir = cluster.slot(1).dir.path();
    assert_eq!(std::fs::metadata(dir).unwrap().permissions().mode() & 0o777, 0o700);
    for f in ["raft-log.redb", "state.redb", "node_id"] {
        assert_eq!(std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777, 0o600, "{f}");
    }

    let metrics = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(cluster.slot(1).http).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    assert!(metrics.contains("engram_search_duration_seconds"), "{metrics}");
    assert!(!metrics.contains("tenant-"), "namespace names leaked into metrics");

    // Reflection lists the API's services, never the peer-only RaftService.
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.slot(1).api)).unwrap().connect_lazy();
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(ch)
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = stream.message().await.unwrap().unwrap().message_response
    else {
        panic!("not a service list")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"engram.v1.MemoryService".to_string()), "{names:?}");
    assert!(names.contains(&"engram.v1.AuthService".to_string()), "{names:?}");
    assert!(!names.iter().any(|n| n.contains("Raft")), "{names:?}");
    cluster.shutdown().await;
}
