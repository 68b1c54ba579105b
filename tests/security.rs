//! Security through the real path: certificates and TLS on loopback, keys and grants through
//! gRPC, replicated auth state enforced by every node.

mod common;

use common::{vector, TestCluster};
use engram::client::NewMemory;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_secured_cluster_serves_its_root_key() {
    let cluster = TestCluster::start_secure(3).await;
    let c = cluster.client();
    let w = c.auth().whoami().await.unwrap();
    assert!(w.cluster_admin, "{w:?}");
    c.put("acme/a", NewMemory::new("hello", vector(1, 4)).with_id("m1")).await.unwrap();
    for id in 1..=3 {
        assert_eq!(cluster.pinned(id).get("acme/a", "m1").await.unwrap().text, "hello");
    }
    cluster.shutdown().await;
}
