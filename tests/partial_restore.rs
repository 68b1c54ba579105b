//! Partial restore: one namespace of a live secure cluster brought back to what a backup
//! holds, through the log, leaving every other namespace as it is; refused without a cluster
//! admin key, with garbage, with rows of another namespace or of another shape, each refusal
//! changing nothing.

use std::time::Duration;

mod common;

use common::TestCluster;
use engram::client::NewMemory;
use engram::proto as pb;
use engram::proto::admin_service_client::AdminServiceClient;
use tonic::Code;

const KEY: &str = "4a5b6c7d8e9f0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293";

fn vector(seed: u32) -> Vec<f32> {
    common::distinct_vector(seed, 8)
}

type Listing = Vec<(String, String, u64)>;

/// Every node's data digest (not the applied index or the ledger: a refusal in `apply` is
/// an entry of its own, and moves those).
async fn data_digests(cluster: &TestCluster) -> Vec<[u8; 32]> {
    cluster.settle().await;
    cluster.running().into_iter().map(|id| cluster.handle(id).reader.data_digest().unwrap()).collect()
}

async fn listing(c: &engram::client::Client, ns: &str) -> Listing {
    c.list_all(ns).await.unwrap().into_iter().map(|m| (m.id, m.text, m.revision)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_namespace_comes_back_from_a_backup_and_nothing_else_moves() {
    // SAFETY: set before any node starts; the in-process nodes read it as their backup key.
    unsafe { std::env::set_var(engram::backup::keys::KEY_ENV, KEY) };
    let keys = engram::backup::Keyring::from_env_value(KEY).unwrap();
    let cluster = TestCluster::start_secure(3).await;
    let root = cluster.client();
    root.auth().create_role("acme-rw").await.unwrap();
    root.auth().grant("acme-rw", "acme/*", &["read", "write", "delete"], None).await.unwrap();
    let tenant = cluster.client_as(Some(root.auth().create_key("acme", &["acme-rw"], 0).await.unwrap().key));
    for i in 0..10 {
        tenant
            .put("acme/a", NewMemory::new(format!("a memory {i}"), vector(i)).with_id(format!("a{i}")))
            .await
            .unwrap();
    }
    for i in 0..5 {
        tenant
            .put("acme/b", NewMemory::new(format!("b memory {i}"), vector(100 + i)).with_id(format!("b{i}")))
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let (archive, header) = root.admin().create_backup(dir.path()).await.unwrap();
    let at_backup = listing(&tenant, "acme/a").await;

    // After the backup: a1 rewritten, a2 deleted, a10 added; b gains b5.
    tenant.put("acme/a", NewMemory::new("a memory 1, rewritten", vector(1)).with_id("a1")).await.unwrap();
    tenant.delete("acme/a", "a2").await.unwrap();
    tenant.put("acme/a", NewMemory::new("a memory 10", vector(10)).with_id("a10")).await.unwrap();
    tenant.put("acme/b", NewMemory::new("b memory 5", vector(105)).with_id("b5")).await.unwrap();
    let b_before = listing(&tenant, "acme/b").await;
    cluster.settle().await;
    let b_digests = |c: &TestCluster| -> Vec<[u8; 32]> {
        c.running().into_iter().map(|id| c.handle(id).reader.namespace_digest("acme/b").unwrap()).collect()
    };
    let b_digest_before = b_digests(&cluster);
    assert!(b_digest_before.windows(2).all(|w| w[0] == w[1]));

    // What the restore would do (the dry run's answer), from the backup's rows.
    let (info, rows) = engram::backup::namespace_of(std::fs::File::open(&archive).unwrap(), &keys, "acme/a").unwrap();
    assert_eq!(info.header.applied_index, header.applied_index);
    let rows = rows.expect("the backup holds acme/a");
    assert_eq!(rows.memories.len(), 10);
    let diff = engram::backup::restore_diff(&rows, &tenant.list_all("acme/a").await.unwrap());
    assert_eq!(
        (diff.added, diff.changed, diff.removed, diff.unchanged),
        (vec!["a2".into()], vec!["a1".into()], vec!["a10".into()], 8)
    );
    let (_, none) = engram::backup::namespace_of(std::fs::File::open(&archive).unwrap(), &keys, "acme/zz").unwrap();
    assert!(none.is_none());

    // Refusals first: each changes nothing on any node.
    let before = data_digests(&cluster).await;
    let addr = cluster.slot(1).api.to_string();
    let good = pb::RestoreNamespaceRequest {
        namespace: "acme/a".into(),
        dimension: 8,
        metric: pb::Metric::Cosine as i32,
        policy_json: String::new(),
        memories: engram::storage::codec::encode(&rows.memories),
        options: None,
        only_these: false,
        sealed_rows: Vec::new(),
    };
    let raw = |who: &engram::client::Client| AdminServiceClient::new(who.raw_channel(&addr).unwrap());
    let e = raw(&tenant).restore_namespace(good.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "a tenant key: {e:?}");
    let e = raw(&cluster.client_as(None)).restore_namespace(good.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "no key: {e:?}");
    let mut other_ns = rows.memories.clone();
    other_ns[3].namespace = "acme/b".into();
    let mut short = rows.memories.clone();
    short[4].embedding.pop();
    let mut nan = rows.memories.clone();
    nan[5].embedding[0] = f32::NAN;
    let mut twice = rows.memories.clone();
    twice[6].id = twice[7].id.clone();
    let mut weighty = rows.memories.clone();
    weighty[9].importance = 2.0;
    let mut forged = rows.memories.clone();
    forged[8].text = "not the text its hash was taken of".into();
    for (what, req, code) in [
        (
            "garbage rows",
            pb::RestoreNamespaceRequest { memories: b"\xff\x00garbage".to_vec(), ..good.clone() },
            Code::InvalidArgument,
        ),
        (
            "a row of another namespace",
            pb::RestoreNamespaceRequest { memories: engram::storage::codec::encode(&other_ns), ..good.clone() },
            Code::InvalidArgument,
        ),
        (
            "a short vector",
            pb::RestoreNamespaceRequest { memories: engram::storage::codec::encode(&short), ..good.clone() },
            Code::InvalidArgument,
        ),
        (
            "a NaN",
            pb::RestoreNamespaceRequest { memories: engram::storage::codec::encode(&nan), ..good.clone() },
            Code::InvalidArgument,
        ),
        (
            "an id twice",
            pb::RestoreNamespaceRequest { memories: engram::storage::codec::encode(&twice), ..good.clone() },
            Code::InvalidArgument,
        ),
        (
            "an importance out of range",
            pb::RestoreNamespaceRequest { memories: engram::storage::codec::encode(&weighty), ..good.clone() },
            Code::InvalidArgument,
        ),
        (
            "a forged content hash",
            pb::RestoreNamespaceRequest { memories: engram::storage::codec::encode(&forged), ..good.clone() },
            Code::InvalidArgument,
        ),
        ("another dimension", pb::RestoreNamespaceRequest { dimension: 16, ..good.clone() }, Code::InvalidArgument),
        (
            "another metric",
            pb::RestoreNamespaceRequest { metric: pb::Metric::L2 as i32, ..good.clone() },
            Code::AlreadyExists,
        ),
        (
            "a bad namespace",
            pb::RestoreNamespaceRequest { namespace: "../etc".into(), ..good.clone() },
            Code::InvalidArgument,
        ),
        (
            "a bad policy",
            pb::RestoreNamespaceRequest { policy_json: "{not json".into(), ..good.clone() },
            Code::InvalidArgument,
        ),
    ] {
        let e = raw(&root).restore_namespace(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{what}: {e:?}");
    }
    let oversized = pb::RestoreNamespaceRequest { memories: vec![0; 9 << 20], ..good.clone() };
    assert!(raw(&root).restore_namespace(oversized).await.is_err(), "an oversized request was accepted");
    assert_eq!(data_digests(&cluster).await, before, "a refused restore changed state");

    // The restore: acme/a is the backup's again, at new revisions; acme/b did not move.
    let r = root.admin().restore_namespace(&rows).await.unwrap();
    assert_eq!((r.restored, r.replaced), (10, 10));
    cluster.wait_applied(r.applied_index).await;
    let restored = listing(&tenant, "acme/a").await;
    let strip = |l: &Listing| l.iter().map(|(id, t, _)| (id.clone(), t.clone())).collect::<Vec<_>>();
    assert_eq!(strip(&restored), strip(&at_backup));
    assert!(restored.iter().all(|(_, _, rev)| *rev == r.applied_index), "{restored:?}");
    assert_eq!(listing(&tenant, "acme/b").await, b_before, "another namespace moved");
    assert_eq!(b_digests(&cluster), b_digest_before, "another namespace's rows changed on some node");
    // The vector shard follows: a2 is found again, a10 no longer.
    let hit = tenant.search("acme/a", vector(2), 1).await.unwrap();
    assert_eq!(hit.hits[0].id, "a2");
    let hits = tenant.search("acme/a", vector(10), 10).await.unwrap();
    assert!(hits.hits.iter().all(|h| h.id != "a10"), "{hits:?}");
    // A CAS written against the old state fails.
    let e = tenant
        .put_if(
            "acme/a",
            NewMemory::new("stale", vector(1)).with_id("a1"),
            engram::client::Precondition::IfRevision(at_backup[1].2),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, Code::FailedPrecondition, "{e:?}");
    cluster.settle().await;
    let d = cluster.digests().await;
    assert!(d.windows(2).all(|w| w[0].1 == w[1].1), "replicas differ after the restore: {d:?}");

    // Some memories only: a3 and a4 go back to their backup rows; a5's later rewrite and
    // everything else stay.
    for i in [3, 4, 5] {
        tenant
            .put("acme/a", NewMemory::new(format!("a memory {i}, later"), vector(i)).with_id(format!("a{i}")))
            .await
            .unwrap();
    }
    let mut some = rows.clone();
    some.memories.retain(|m| m.id == "a3" || m.id == "a4");
    let r = root.admin().restore_memories(&some).await.unwrap();
    assert_eq!((r.restored, r.replaced), (2, 2));
    let now: std::collections::BTreeMap<String, String> =
        listing(&tenant, "acme/a").await.into_iter().map(|(id, t, _)| (id, t)).collect();
    assert_eq!(now["a3"], "a memory 3");
    assert_eq!(now["a4"], "a memory 4");
    assert_eq!(now["a5"], "a memory 5, later");
    assert_eq!(now.len(), 10);
    // Into a namespace that does not exist, or by a tenant: refused.
    let mut elsewhere = some.clone();
    elsewhere.info.name = "acme/none".into();
    for m in &mut elsewhere.memories {
        m.namespace = "acme/none".into();
    }
    assert_eq!(root.admin().restore_memories(&elsewhere).await.unwrap_err().code, Code::NotFound);
    let e = raw(&tenant)
        .restore_namespace(pb::RestoreNamespaceRequest { only_these: true, ..good.clone() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // Restore the whole namespace again for the rest of the test.
    root.admin().restore_namespace(&rows).await.unwrap();

    // A namespace deleted outright comes back too.
    tenant.delete_namespace("acme/a").await.unwrap();
    assert_eq!(tenant.list_all("acme/a").await.unwrap_err().code, Code::NotFound);
    let r = root.admin().restore_namespace(&rows).await.unwrap();
    assert_eq!((r.restored, r.replaced), (10, 0));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(strip(&listing(&tenant, "acme/a").await), strip(&at_backup));
    assert_eq!(tenant.search("acme/a", vector(7), 1).await.unwrap().hits[0].id, "a7");
    cluster.shutdown().await;
}
