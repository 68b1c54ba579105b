//! What a new user of grpcurl or a generated client expects of the API: writes through any
//! node (a follower forwards to the leader, one hop, within the caller's deadline), namespaces
//! listed and described, standard `google.rpc` error details, no namespace made by a typo, no
//! metric guessed, reflection in both versions.

mod common;

use std::time::Duration;

use common::{vector, TestCluster};
use engram::api::NO_FORWARD_HEADER;
use engram::proto as pb;
use engram::proto::memory_service_client::MemoryServiceClient;
use tonic::Code;
use tonic_types::StatusExt;

fn put(ns: &str, id: &str, seed: u32) -> pb::PutRequest {
    pb::PutRequest {
        namespace: ns.into(),
        memory: Some(pb::MemoryInput {
            id: id.into(),
            text: format!("memory {id}"),
            embedding: vector(seed, 4),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn follower_of(cluster: &TestCluster, leader: u64) -> u64 {
    cluster.running().into_iter().find(|&id| id != leader).expect("a follower")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_forwards_writes_with_the_callers_identity() {
    let cluster = TestCluster::start_secure(3).await;
    let root = cluster.client();
    root.auth().create_role("acme-rw").await.unwrap();
    root.auth().grant("acme-rw", "acme/*", &["read", "write"], None).await.unwrap();
    let tenant = cluster.client_as(Some(root.auth().create_key("acme", &["acme-rw"], 0).await.unwrap().key));
    root.create_namespace("acme/notes", 4, engram::client::Metric::Cosine).await.unwrap();
    root.create_namespace("other/private", 4, engram::client::Metric::Cosine).await.unwrap();
    let leader = cluster.wait_for_leader().await;
    let follower = follower_of(&cluster, leader);
    let addr = cluster.slot(follower).api.to_string();
    let mut c = MemoryServiceClient::new(tenant.raw_channel(&addr).unwrap());

    // A put and a batch sent to a follower are applied, by the leader, once.
    let mut req = tonic::Request::new(put("acme/notes", "a", 1));
    req.set_timeout(Duration::from_secs(10));
    let r = c.put(req).await.expect("a follower forwards the put").into_inner();
    assert_eq!(r.id, "a");
    let batch = pb::PutBatchRequest {
        namespace: "acme/notes".into(),
        items: (0..3)
            .map(|i| pb::PutBatchItem { memory: put("", &format!("b{i}"), 10 + i).memory, precondition: None })
            .collect(),
        options: Some(pb::WriteOptions { idempotency_key: "batch-1".into() }),
        create_namespace: false,
    };
    let first = c.put_batch(batch.clone()).await.unwrap().into_inner();
    // The same key again, through the same follower: the first answer, not a second write.
    let again = c.put_batch(batch).await.unwrap().into_inner();
    assert_eq!(first.applied_index, again.applied_index);
    cluster.wait_applied(again.applied_index).await;
    assert_eq!(root.list_all("acme/notes").await.unwrap().len(), 4);

    // The leader authorizes the forwarded write as the tenant's: another tenant's namespace is
    // refused, as it would be at the leader.
    let s = c.put(put("other/private", "x", 2)).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    // No key, through the follower: refused before anything is forwarded.
    let anon = cluster.client_as(None);
    let s =
        MemoryServiceClient::new(anon.raw_channel(&addr).unwrap()).put(put("acme/notes", "y", 3)).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    // A deterministic refusal at the leader comes back as it was: the wrong dimension.
    let mut bad = put("acme/notes", "z", 4);
    bad.memory.as_mut().unwrap().embedding = vec![0.1, 0.2];
    let s = c.put(bad).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");

    // A client that routes writes itself asks not to be forwarded and gets the hint.
    let mut req = tonic::Request::new(put("acme/notes", "c", 5));
    req.metadata_mut().insert(NO_FORWARD_HEADER, "1".parse().unwrap());
    let s = c.put(req).await.unwrap_err();
    assert_eq!(s.code(), Code::Unavailable);
    assert_eq!(s.metadata().get("engram-leader-id").unwrap().to_str().unwrap(), leader.to_string());
    assert!(s.message().starts_with("not the leader; the leader is node"), "{}", s.message());
    let info = s.get_error_details().error_info().cloned().expect("ErrorInfo");
    assert_eq!(info.reason, "NOT_LEADER");
    assert_eq!(info.metadata["outcome"], "not-applied");

    // A deadline already spent is not forwarded.
    let mut req = tonic::Request::new(put("acme/notes", "d", 6));
    req.metadata_mut().insert("grpc-timeout", "1n".parse().unwrap());
    let s = c.put(req).await.unwrap_err();
    assert!(matches!(s.code(), Code::DeadlineExceeded | Code::Cancelled), "{s:?}");

    // Every node holds the same state.
    let idx = cluster.handle(leader).reader.applied_index().unwrap();
    cluster.wait_applied(idx).await;
    let d = cluster.digests().await;
    assert!(d.windows(2).all(|w| w[0].1 == w[1].1), "{d:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn namespaces_are_listed_and_described_only_to_who_may_read_them() {
    let cluster = TestCluster::start_secure(3).await;
    let root = cluster.client();
    root.auth().create_role("acme-r").await.unwrap();
    root.auth().grant("acme-r", "acme/*", &["read"], None).await.unwrap();
    let tenant = cluster.client_as(Some(root.auth().create_key("acme", &["acme-r"], 0).await.unwrap().key));
    let mut names = Vec::new();
    for i in 0..7 {
        names.push(format!("acme/ns-{i}"));
    }
    names.push("other/secret".into());
    for n in &names {
        root.create_namespace(n, 4, engram::client::Metric::L2).await.unwrap();
    }
    root.put("acme/ns-3", engram::client::NewMemory::new("one", vector(1, 4))).await.unwrap();

    let leader = cluster.wait_for_leader().await;
    let addr = cluster.slot(follower_of(&cluster, leader)).api.to_string();
    let mut c = MemoryServiceClient::new(tenant.raw_channel(&addr).unwrap());
    // Pages of 3 through a follower: all seven of acme, never other/secret.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let req = pb::ListNamespacesRequest { page_size: 3, page_token: token.clone(), ..Default::default() };
        let page = c.list_namespaces(req).await.unwrap().into_inner();
        assert!(page.namespaces.len() <= 3);
        seen.extend(page.namespaces.into_iter().map(|n| n.namespace));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, names[..7].to_vec());
    // Root sees everything; a prefix narrows it.
    let mut rc = MemoryServiceClient::new(root.raw_channel(&addr).unwrap());
    let all = rc.list_namespaces(pb::ListNamespacesRequest::default()).await.unwrap().into_inner();
    assert_eq!(all.namespaces.len(), 8);
    let req = pb::ListNamespacesRequest { prefix: "other/".into(), ..Default::default() };
    let other = rc.list_namespaces(req).await.unwrap().into_inner();
    assert_eq!(other.namespaces.iter().map(|n| n.namespace.as_str()).collect::<Vec<_>>(), ["other/secret"]);
    // Garbage is refused.
    for bad in [
        pb::ListNamespacesRequest { page_size: 5000, ..Default::default() },
        pb::ListNamespacesRequest { page_token: "zz".into(), ..Default::default() },
        pb::ListNamespacesRequest { prefix: "p".repeat(300), ..Default::default() },
    ] {
        assert_eq!(c.list_namespaces(bad).await.unwrap_err().code(), Code::InvalidArgument);
    }

    // GetNamespace: the spec, the count and the policy.
    let req = pb::GetNamespaceRequest { namespace: "acme/ns-3".into(), ..Default::default() };
    let got = c.get_namespace(req).await.unwrap().into_inner();
    let info = got.namespace.unwrap();
    assert_eq!((info.dimension, info.metric, info.memory_count), (4, pb::Metric::L2 as i32, 1));
    assert!(got.policy.is_some());
    // Another tenant's namespace and a missing one read alike to the tenant: denied.
    for ns in ["other/secret", "other/missing"] {
        let req = pb::GetNamespaceRequest { namespace: ns.into(), ..Default::default() };
        assert_eq!(c.get_namespace(req).await.unwrap_err().code(), Code::PermissionDenied, "{ns}");
    }
    let req = pb::GetNamespaceRequest { namespace: "acme/missing".into(), ..Default::default() };
    assert_eq!(c.get_namespace(req).await.unwrap_err().code(), Code::NotFound);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_namespace_is_made_by_a_typo_and_no_metric_is_guessed() {
    let cluster = TestCluster::start(3).await;
    let leader = cluster.wait_for_leader().await;
    let mut c = MemoryServiceClient::connect(format!("http://{}", cluster.slot(leader).api)).await.unwrap();
    let before = cluster.digests().await;

    let s = c.put(put("acme/typo", "a", 1)).await.unwrap_err();
    assert_eq!(s.code(), Code::NotFound, "{s:?}");
    let batch = pb::PutBatchRequest {
        namespace: "acme/typo".into(),
        items: vec![pb::PutBatchItem { memory: put("", "b", 2).memory, precondition: None }],
        ..Default::default()
    };
    assert_eq!(c.put_batch(batch.clone()).await.unwrap_err().code(), Code::NotFound);
    let req = pb::CreateNamespaceRequest { namespace: "acme/unspecified".into(), dimension: 4, ..Default::default() };
    let s = c.create_namespace(req).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    let v = s.get_error_details().bad_request().cloned().expect("BadRequest").field_violations;
    assert_eq!(v[0].field, "metric");
    let req = pb::ListNamespacesRequest::default();
    assert!(c.list_namespaces(req).await.unwrap().into_inner().namespaces.is_empty(), "nothing was created");
    // Refusals in apply leave the state as it was (the applied index moves; the data does not).
    let idx = cluster.handle(leader).reader.applied_index().unwrap();
    cluster.wait_applied(idx).await;
    for (id, _) in &before {
        assert_eq!(
            cluster.handle(*id).reader.data_digest().unwrap(),
            cluster.handle(leader).reader.data_digest().unwrap()
        );
    }

    // Asking for it creates it, as a cosine namespace of the first embedding's dimension.
    let r = c.put_batch(pb::PutBatchRequest { create_namespace: true, ..batch }).await.unwrap().into_inner();
    assert_eq!(r.results.len(), 1);
    let req = pb::GetNamespaceRequest { namespace: "acme/typo".into(), ..Default::default() };
    let info = c.get_namespace(req).await.unwrap().into_inner().namespace.unwrap();
    assert_eq!((info.dimension, info.metric), (4, pb::Metric::Cosine as i32));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reflection_answers_in_v1_and_v1alpha() {
    use futures::StreamExt;
    use tonic_reflection::pb::{v1, v1alpha};
    let cluster = TestCluster::start(1).await;
    let addr = format!("http://{}", cluster.slot(cluster.wait_for_leader().await).api);
    let ch = tonic::transport::Channel::from_shared(addr).unwrap().connect().await.unwrap();

    let mut a = v1alpha::server_reflection_client::ServerReflectionClient::new(ch.clone());
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1alpha::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut stream = a.server_reflection_info(futures::stream::iter([req])).await.unwrap().into_inner();
    let resp = stream.next().await.unwrap().unwrap();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(l)) = resp.message_response
    else {
        panic!("no service list: {resp:?}")
    };
    let names: Vec<_> = l.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"engram.v1.MemoryService".to_string()), "{names:?}");
    assert!(!names.iter().any(|n| n.contains("Raft")), "the peer service is never listed: {names:?}");

    let mut b = v1::server_reflection_client::ServerReflectionClient::new(ch);
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::FileContainingSymbol(
            "engram.v1.MemoryService".into(),
        )),
    };
    let mut stream = b.server_reflection_info(futures::stream::iter([req])).await.unwrap().into_inner();
    let resp = stream.next().await.unwrap().unwrap();
    assert!(matches!(
        resp.message_response,
        Some(v1::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
    ));
    cluster.shutdown().await;
}
