//! Who may do what on a secured cluster, through real TLS and gRPC: admin RPCs need an admin
//! key, a prefix-scoped key stays inside its prefix (and learns nothing about the rest), a
//! tag-scoped key only ever sees its own memories, revoked and expired keys stop working on
//! every node, plaintext is refused.

mod common;

use std::time::Duration;

use common::{vector, TestCluster};
use engram::client::{Client, ClientError, Consistency, NewMemory};
use engram::proto as pb;
use tonic::Code;

/// A role with one grant and a key for it; returns the key.
async fn key_for(
    root: &Client,
    role: &str,
    pattern: &str,
    perms: &[&str],
    tag: Option<(&str, &str)>,
    name: &str,
) -> String {
    if root.auth().create_role(role).await.is_ok() {
        root.auth().grant(role, pattern, perms, tag).await.unwrap();
    }
    root.auth().create_key(name, &[role], 0).await.unwrap().key
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

fn denied<T: std::fmt::Debug>(what: &str, r: Result<T, ClientError>) -> ClientError {
    let e = r.expect_err(&format!("{what} was allowed"));
    assert_eq!(e.code, Code::PermissionDenied, "{what}: {e:?}");
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_admin_rpc_works_without_an_admin_key() {
    let cluster = TestCluster::start_secure(3).await;
    let root = cluster.client();
    let tenant = key_for(&root, "acme-rw", "acme/*", &["read", "write", "delete"], None, "acme-app").await;
    cluster.settle().await;
    let before = cluster.digests().await;
    let members_before = root.admin().status().await.unwrap().voters;

    // No key, a malformed key, a well-formed unknown key, and a tenant's key.
    let unknown = engram::auth::token::ApiKey::generate().expose().to_string();
    for (who, cred, code) in [
        ("no key", None, Code::Unauthenticated),
        ("garbage", Some("hello".to_string()), Code::Unauthenticated),
        ("unknown key", Some(unknown), Code::Unauthenticated),
        ("tenant key", Some(tenant.clone()), Code::PermissionDenied),
    ] {
        let c = cluster.client_as(cred).pinned_like(&cluster.slot(1).api.to_string()).unwrap();
        let a = c.admin();
        let node = pb::NodeInfo { id: 9, raft_addr: "127.0.0.1:1".into(), api_addr: "127.0.0.1:2".into() };
        let dir = tempfile::tempdir().unwrap();
        let results: Vec<(&str, Result<(), ClientError>)> = vec![
            ("status", a.status().await.map(drop)),
            ("add learner", a.add_learner(node.clone(), false).await.map(drop)),
            ("promote", a.promote_voters(vec![2]).await.map(drop)),
            ("remove", a.remove_nodes(vec![3]).await.map(drop)),
            ("transfer", a.transfer_leader(2).await.map(drop)),
            ("snapshot", a.trigger_snapshot().await.map(drop)),
            ("verify ledger", a.verify_ledger().await.map(drop)),
            ("export ledger", a.export_ledger(0, 0, 0).await.map(drop)),
            ("propose mark", a.propose_mark().await.map(drop)),
            ("mark digest", a.mark_digest("m", 10).await.map(drop)),
            ("backup", a.create_backup(dir.path()).await.map(drop)),
            ("init", a.init_cluster(vec![node]).await.map(drop)),
            ("create key", c.auth().create_key("evil", &["root"], 0).await.map(drop)),
            ("list keys", c.auth().list_keys().await.map(drop)),
            ("revoke key", c.auth().revoke_key("0000000000000000").await.map(drop)),
            ("create role", c.auth().create_role("evil").await.map(drop)),
            ("grant", c.auth().grant("acme-rw", "*", &["admin"], None).await.map(drop)),
            ("revoke grant", c.auth().revoke_grant("acme-rw", "acme/*").await.map(drop)),
            ("delete role", c.auth().delete_role("acme-rw").await.map(drop)),
            ("list roles", c.auth().list_roles().await.map(drop)),
            ("set quota", c.auth().set_quota("acme", pb::Quota::default()).await.map(drop)),
            ("list quotas", c.auth().list_quotas().await.map(drop)),
        ];
        for (rpc, r) in results {
            let e = r.expect_err(&format!("{who}: {rpc} was allowed"));
            // `init` without credentials reaches a node that already has a cluster: refused.
            assert_eq!(e.code, code, "{who}: {rpc}: {e:?}");
            assert!(dir.path().read_dir().unwrap().next().is_none(), "{who}: a backup file was written");
        }
    }
    // Whoami works for any valid key and says what it is.
    let me = cluster.client_as(Some(tenant)).auth().whoami().await.unwrap();
    assert_eq!((me.principal.as_str(), me.kind.as_str(), me.cluster_admin), ("acme-app", "key", false));

    // Every refusal and every admin change is an audit event.
    let metrics = http_get(cluster.slot(1).http, "/metrics").await;
    assert!(metrics.contains(r#"engram_audit_events_total{kind="denied",outcome="unauthenticated"}"#), "{metrics}");
    assert!(metrics.contains(r#"engram_audit_events_total{kind="denied",outcome="permission_denied"}"#));
    assert!(metrics.contains(r#"engram_audit_events_total{kind="admin",outcome="ok"}"#));

    cluster.settle().await;
    assert_eq!(cluster.digests().await, before, "a refused admin call changed state");
    assert_eq!(root.admin().status().await.unwrap().voters, members_before);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prefix_key_works_inside_its_prefix_and_learns_nothing_outside() {
    let cluster = TestCluster::start_secure(3).await;
    let root = cluster.client();
    let acme = cluster
        .client_as(Some(key_for(&root, "acme-rw", "acme/*", &["read", "write", "delete"], None, "acme-app").await));
    // Another tenant's namespace exists; "other/ghost" does not.
    root.put("other/secret", NewMemory::new("not yours", vector(1, 4)).with_id("s1")).await.unwrap();

    // Inside: every RPC works.
    acme.create_namespace("acme/x", 4, engram::client::Metric::Cosine).await.unwrap();
    acme.put("acme/x", NewMemory::new("mine", vector(2, 4)).with_id("a1")).await.unwrap();
    acme.put_batch("acme/x", vec![(NewMemory::new("two", vector(3, 4)).with_id("a2"), Default::default())])
        .await
        .unwrap();
    assert_eq!(acme.get("acme/x", "a1").await.unwrap().text, "mine");
    assert_eq!(acme.list("acme/x", 10, "", Consistency::Linearizable).await.unwrap().memories.len(), 2);
    assert_eq!(acme.search("acme/x", vector(2, 4), 2).await.unwrap().hits.len(), 2);
    let q = |ns: &str| pb::SearchRequest { namespace: ns.into(), vector: vector(2, 4), k: 1, ..Default::default() };
    assert_eq!(acme.search_batch(vec![q("acme/x")], Consistency::Linearizable).await.unwrap().results.len(), 1);
    assert!(acme.delete("acme/x", "a2").await.unwrap().deleted);
    cluster.settle().await;
    let before = cluster.digests().await;

    // Outside: PERMISSION_DENIED for every RPC, said the same for an existing namespace and a
    // missing one, so nothing about other tenants leaks.
    let mut messages = Vec::new();
    for ns in ["other/secret", "other/ghost"] {
        let mut m = vec![
            denied("create", acme.create_namespace(ns, 4, engram::client::Metric::Cosine).await).message,
            denied("put", acme.put(ns, NewMemory::new("x", vector(1, 4)).with_id("s1")).await).message,
            denied("batch", acme.put_batch(ns, vec![(NewMemory::new("x", vector(1, 4)), Default::default())]).await)
                .message,
            denied("get", acme.get(ns, "s1").await).message,
            denied("list", acme.list(ns, 10, "", Consistency::Linearizable).await).message,
            denied("search", acme.search(ns, vector(1, 4), 1).await).message,
            denied("delete", acme.delete(ns, "s1").await).message,
            denied("delete namespace", acme.delete_namespace(ns).await).message,
        ];
        let e = denied("batch search", acme.search_batch(vec![q("acme/x"), q(ns)], Consistency::Linearizable).await);
        assert_eq!(e.field.as_deref(), Some("queries[1].namespace"));
        m.push(e.message);
        messages.push(m);
    }
    assert_eq!(messages[0], messages[1], "existing and missing namespaces must look alike");
    assert!(messages.iter().flatten().all(|m| !m.contains("not yours") && !m.contains("s1")));
    cluster.settle().await;
    assert_eq!(cluster.digests().await, before, "a refused call changed state");
    assert_eq!(root.get("other/secret", "s1").await.unwrap().text, "not yours");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tag_scoped_key_only_ever_sees_its_own_memories() {
    let cluster = TestCluster::start_secure(3).await;
    let root = cluster.client();
    let tag = Some(("agent", "$principal"));
    let bot1_key = key_for(&root, "agents", "acme/*", &["read", "write", "delete"], tag, "bot-1").await;
    let bot1 = cluster.client_as(Some(bot1_key.clone()));
    let _bot2_key = root.auth().create_key("bot-2", &["agents"], 0).await.unwrap();

    // Phase 1: 60 memories of bot-2 and unscoped ones sit closest to the query; bot-1 has 6.
    let ns = "acme/shared";
    let mut batch = Vec::new();
    for i in 0..60u32 {
        let owner = if i % 2 == 0 { "bot-2" } else { "nobody" };
        batch.push((
            NewMemory::new(format!("other {i}"), vector(1, 8)).with_id(format!("o{i}")).with_tag("agent", owner),
            Default::default(),
        ));
    }
    for i in 0..6u32 {
        batch.push((
            NewMemory::new(format!("mine {i}"), vector(40 + i, 8)).with_id(format!("b{i}")).with_tag("agent", "bot-1"),
            Default::default(),
        ));
    }
    root.put_batch(ns, batch).await.unwrap();

    // Phase 2: reads see only bot-1's: get, list (paged), search (k hits when k exist, on any node).
    assert_eq!(bot1.get(ns, "b0").await.unwrap().text, "mine 0");
    assert_eq!(bot1.get(ns, "o0").await.unwrap_err().code, Code::NotFound);
    let mut listed = Vec::new();
    let mut token = String::new();
    loop {
        let page = bot1.list(ns, 4, &token, Consistency::Linearizable).await.unwrap();
        listed.extend(page.memories.into_iter().map(|m| m.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(listed, (0..6).map(|i| format!("b{i}")).collect::<Vec<_>>());
    for id in 1..=3 {
        let pinned = bot1.pinned_like(&cluster.slot(id).api.to_string()).unwrap();
        let hits = pinned.search(ns, vector(1, 8), 5).await.unwrap().hits;
        assert_eq!(hits.len(), 5, "node {id}: a scoped search returns k hits");
        assert!(hits.iter().all(|h| h.id.starts_with('b')), "node {id}: {hits:?}");
    }
    let filtered = pb::SearchRequest {
        namespace: ns.into(),
        vector: vector(1, 8),
        k: 10,
        include_memory: true,
        filter: Some(pb::SearchFilter { tags: [("agent".into(), "bot-2".into())].into(), ..Default::default() }),
        ..Default::default()
    };
    assert!(bot1.search_with(filtered).await.unwrap().hits.is_empty(), "a filter cannot widen the scope");

    // Phase 3: writes stay in scope, decided again in apply. (Refusals from apply take a log
    // index, so the memories, not the digests, are compared.)
    let memories = |c: Client| async move {
        c.list_all(ns).await.unwrap().into_iter().map(|m| (m.id, m.revision, m.text)).collect::<Vec<_>>()
    };
    let before = memories(root.clone()).await;
    denied("untagged put", bot1.put(ns, NewMemory::new("x", vector(1, 8)).with_id("n1")).await);
    denied(
        "put as bot-2",
        bot1.put(ns, NewMemory::new("x", vector(1, 8)).with_id("n2").with_tag("agent", "bot-2")).await,
    );
    denied(
        "overwrite bot-2's",
        bot1.put(ns, NewMemory::new("x", vector(1, 8)).with_id("o0").with_tag("agent", "bot-1")).await,
    );
    denied("erase the namespace", bot1.delete_namespace(ns).await);
    assert!(!bot1.delete(ns, "o0").await.unwrap().deleted, "another's memory is absent to it");
    assert_eq!(memories(root.clone()).await, before);
    cluster.settle().await;
    let digests = cluster.digests().await;
    assert!(digests.windows(2).all(|w| w[0].1 == w[1].1), "nodes disagree: {digests:?}");
    bot1.put(ns, NewMemory::new("new", vector(1, 8)).with_id("b9").with_tag("agent", "bot-1")).await.unwrap();
    assert!(bot1.delete(ns, "b9").await.unwrap().deleted);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revoked_and_expired_keys_stop_working_on_every_node() {
    let cluster = TestCluster::start_secure(3).await;
    let root = cluster.client();
    let key = key_for(&root, "acme-rw", "acme/*", &["read", "write"], None, "app").await;
    let short = root.auth().create_key("app", &["acme-rw"], 2).await.unwrap().key;
    root.put("acme/a", NewMemory::new("x", vector(1, 4)).with_id("m1")).await.unwrap();
    let on = |id: u64, k: &str| {
        cluster.client_as(Some(k.to_string())).pinned_like(&cluster.slot(id).api.to_string()).unwrap()
    };
    for id in 1..=3 {
        for k in [&key, &short] {
            on(id, k).get("acme/a", "m1").await.unwrap();
        }
    }

    // Revoke: once applied on a node, every call with the key fails there.
    let id = key.split('_').nth(1).unwrap().to_string();
    let r = root.auth().revoke_key(&id).await.unwrap();
    assert!(r.existed);
    cluster.wait_applied(r.applied_index).await;
    for node in 1..=3 {
        let c = on(node, &key);
        assert_eq!(c.get("acme/a", "m1").await.unwrap_err().code, Code::Unauthenticated, "node {node}");
        assert_eq!(c.put("acme/a", NewMemory::new("y", vector(2, 4))).await.unwrap_err().code, Code::Unauthenticated);
    }
    // A write proposed for the revoked key (as a node that had not seen the revocation
    // would) is refused in apply, on every node alike.
    let leader = cluster.wait_for_leader().await;
    let cmd = engram::raft::Command {
        principal: Some(engram::auth::Principal::Key { id: id.parse().unwrap() }),
        idempotency: None,
        now_ms: engram::memory::now_ms(),
        op: engram::raft::Op::DeleteNamespace { namespace: "acme/a".into() },
    };
    let res = cluster.handle(leader).node.write(cmd).await.unwrap();
    assert!(
        matches!(res.outcome, engram::raft::Outcome::Rejected(engram::raft::Rejection::Unauthenticated { .. })),
        "{res:?}"
    );
    assert_eq!(root.get("acme/a", "m1").await.unwrap().text, "x");

    // Expire: the two-second key stops working everywhere.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    for node in 1..=3 {
        assert_eq!(on(node, &short).get("acme/a", "m1").await.unwrap_err().code, Code::Unauthenticated, "node {node}");
    }
    let listed = root.auth().list_keys().await.unwrap();
    assert!(listed.iter().any(|k| k.id == id && k.revoked_at_ms > 0));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plaintext_and_unverified_clients_are_refused_when_tls_is_on() {
    let cluster = TestCluster::start_secure(1).await;
    let addr = cluster.slot(1).api.to_string();
    let root = cluster.root_key();
    let quick = engram::client::RetryPolicy { max_attempts: 1, timeout: Duration::from_secs(2), ..Default::default() };

    // Plaintext with the root key: nothing answers.
    let plain = Client::with_options(
        [addr.clone()],
        engram::client::ClientOptions { retry: quick, tls: None, credential: root.clone(), create_namespaces: true },
    )
    .unwrap();
    assert!(plain.get("acme/a", "x").await.is_err());
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy(),
    );
    assert!(health.check(tonic_health::pb::HealthCheckRequest::default()).await.is_err());

    // TLS trusting another CA: the handshake fails.
    let other = engram::auth::certs::CertAuthority::generate("test", 1).unwrap();
    let wrong = engram::client::ClientTls {
        ca_pem: other.cert_pem.into_bytes(),
        ..cluster.secure.as_ref().unwrap().client_tls()
    };
    let c = Client::with_options(
        [addr.clone()],
        engram::client::ClientOptions {
            retry: quick,
            tls: Some(wrong),
            credential: root.clone(),
            create_namespaces: true,
        },
    )
    .unwrap();
    assert!(c.get("acme/a", "x").await.is_err());

    // The right CA and no key: UNAUTHENTICATED; health answers without a key.
    let c = cluster.client_as(None);
    assert_eq!(c.get("acme/a", "x").await.unwrap_err().code, Code::Unauthenticated);
    assert!(cluster.client().auth().whoami().await.is_ok());
    cluster.shutdown().await;
}
