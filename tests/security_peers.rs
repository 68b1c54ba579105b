//! The peer port of a secured cluster, attacked as a stranger on the network would, and as a
//! holder of one member's certificate forging another member or a hostile term would.
//!
//! Every attack must get nothing back and change nothing: terms, votes, logs, leaders and
//! state digests stay as they were, and the cluster keeps serving (also after a restart, so no
//! poisoned vote was persisted).

mod common;

use std::time::Duration;

use common::{vector, TestCluster};
use engram::client::NewMemory;
use engram::proto::raft_service_client::RaftServiceClient;
use engram::proto::{RaftPayload, ReadIndexRequest, SnapshotChunk};
use engram::raft::network::TARGET_NODE_HEADER;
use engram::raft::{Command, Entry, LogId, Op, SnapshotMeta, TypeConfig, Vote};
use openraft::async_runtime::watch::WatchReceiver;
use openraft::raft::{AppendEntriesRequest, TransferLeaderRequest, VoteRequest};
use openraft::vote::leader_id_adv::LeaderId;
use openraft::EntryPayload;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// What an attack must not move, per node.
#[derive(Debug, PartialEq)]
struct Seen {
    term: u64,
    vote: Vote,
    last_log: Option<u64>,
    leader: Option<u64>,
}

fn seen(cluster: &TestCluster) -> Vec<(u64, Seen)> {
    cluster
        .running()
        .into_iter()
        .map(|id| {
            let m = cluster.handle(id).node.raft.metrics().borrow_watched().clone();
            (id, Seen { term: m.current_term, vote: m.vote, last_log: m.last_log_index, leader: m.current_leader })
        })
        .collect()
}

fn payload<T: serde::Serialize>(v: &T) -> RaftPayload {
    RaftPayload { data: bincode::serialize(v).unwrap() }
}

fn to<T>(msg: T, target: u64) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(TARGET_NODE_HEADER, target.into());
    r.set_timeout(Duration::from_secs(3));
    r
}

fn vote(term: u64, node_id: u64, committed: bool) -> Vote {
    Vote { leader_id: LeaderId { term, node_id }, committed }
}

/// Every peer RPC, as `as_node` at `term`, to node `target`; returns each RPC's error (an
/// `Ok` answer is a failure of the test).
async fn attack(
    c: &mut RaftServiceClient<Channel>,
    target: u64,
    as_node: u64,
    term: u64,
    last: Option<LogId>,
) -> Vec<String> {
    let mut errors = Vec::new();
    let mut record = |what: &str, r: Result<(), tonic::Status>| match r {
        Ok(()) => panic!("{what} was answered"),
        Err(s) => errors.push(format!("{what}: {:?} {}", s.code(), s.message())),
    };
    let v =
        VoteRequest::<TypeConfig> { vote: vote(term, as_node, false), last_log_id: last, leadership_transfer: false };
    record("vote", c.vote(to(payload(&v), target)).await.map(drop));
    record("pre-vote", c.pre_vote(to(payload(&v), target)).await.map(drop));
    // A heartbeat from a "leader" with a higher term would depose the real one.
    let hb = AppendEntriesRequest::<TypeConfig> {
        vote: vote(term, as_node, true),
        prev_log_id: last,
        entries: vec![],
        leader_commit: last,
    };
    record("heartbeat", c.append_entries(to(payload(&hb), target)).await.map(drop));
    // An append of a memory no leader proposed.
    let forged = Command::system(Op::DeleteNamespace { namespace: "acme/a".into() });
    let next = last.map(|l| l.index + 1).unwrap_or(0);
    let append = AppendEntriesRequest::<TypeConfig> {
        vote: vote(term, as_node, true),
        prev_log_id: last,
        entries: vec![Entry {
            log_id: LogId { leader_id: LeaderId { term, node_id: as_node }, index: next },
            payload: EntryPayload::Normal(forged),
        }],
        leader_commit: Some(LogId { leader_id: LeaderId { term, node_id: as_node }, index: next }),
    };
    record("append", c.append_entries(to(payload(&append), target)).await.map(drop));
    let tl = TransferLeaderRequest::<TypeConfig>::new(vote(term, as_node, true), target, last);
    record("transfer", c.transfer_leader(to(payload(&tl), target)).await.map(drop));
    // A snapshot that would replace the whole state.
    let meta = SnapshotMeta {
        last_log_id: Some(LogId { leader_id: LeaderId { term, node_id: as_node }, index: next + 100 }),
        last_membership: Default::default(),
    };
    let head = bincode::serialize(&(vote(term, as_node, true), meta)).unwrap();
    let chunks = vec![SnapshotChunk { meta: head, data: vec![7u8; 64 << 10], checksum: vec![] }];
    record("snapshot", c.install_snapshot(to(futures::stream::iter(chunks), target)).await.map(drop));
    errors
}

fn peer_channel(addr: &str, tls: Option<ClientTlsConfig>) -> RaftServiceClient<Channel> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut e = Endpoint::from_shared(format!("{scheme}://{addr}")).unwrap().connect_timeout(Duration::from_secs(2));
    if let Some(t) = tls {
        e = e.tls_config(t).unwrap();
    }
    RaftServiceClient::new(e.connect_lazy())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strangers_and_forgers_get_nothing_from_the_peer_port_and_change_nothing() {
    let mut cluster = TestCluster::start_secure_with(3, |c| c.max_snapshot_bytes = 2 << 20).await;
    let client = cluster.client();
    client.put("acme/a", NewMemory::new("real", vector(1, 4)).with_id("m1")).await.unwrap();
    cluster.settle().await;
    let leader = cluster.wait_for_leader().await;
    let before = (seen(&cluster), cluster.digests().await);
    let target = cluster.running().into_iter().find(|id| *id != leader).unwrap();
    let addr = cluster.slot(target).raft.to_string();
    let last = cluster.handle(target).node.raft.metrics().borrow_watched().last_applied;
    let secure = cluster.secure.clone().unwrap();
    let name = engram::auth::identity::node_dns_name(&secure.ca.cluster, target);
    let ca = Certificate::from_pem(&secure.ca.cert_pem);

    // Phase 1: strangers. Plaintext; TLS without a client certificate; a certificate for the
    // same names from another CA. None gets past the handshake, whatever it sends.
    let other_ca = engram::auth::certs::CertAuthority::generate(&secure.ca.cluster, 1).unwrap();
    let imposter = other_ca.issue_node(leader, &[], 1).unwrap();
    let strangers: Vec<(&str, Option<ClientTlsConfig>)> = vec![
        ("plaintext", None),
        ("no client certificate", Some(ClientTlsConfig::new().ca_certificate(ca.clone()).domain_name(name.clone()))),
        (
            "another CA's certificate",
            Some(
                ClientTlsConfig::new()
                    .ca_certificate(ca.clone())
                    .domain_name(name.clone())
                    .identity(Identity::from_pem(&imposter.cert_pem, &*imposter.key_pem)),
            ),
        ),
    ];
    for (who, tls) in strangers {
        let mut c = peer_channel(&addr, tls);
        for term in [u64::MAX, before.0[0].1.term + 5] {
            let errors = attack(&mut c, target, leader, term, last).await;
            assert_eq!(errors.len(), 6, "{who}");
        }
        let ri = c.read_index(to(ReadIndexRequest { lease: false }, target)).await;
        assert!(ri.is_err(), "{who}: read index answered");
        let query = RaftPayload { data: bincode::serialize(&("m".to_string(), 10u32)).unwrap() };
        assert!(c.mark_digest(to(query, target)).await.is_err(), "{who}: mark digest answered");
    }

    // Phase 2: a member's own certificate (node `forger`), used to speak as the leader, and as
    // itself with a hostile term. The guard refuses each message before openraft sees it.
    let forger = cluster.running().into_iter().find(|id| *id != leader && *id != target).unwrap();
    let paths = secure.node_paths(forger);
    let tls = ClientTlsConfig::new()
        .ca_certificate(ca.clone())
        .domain_name(name.clone())
        .identity(Identity::from_pem(std::fs::read(&paths.cert).unwrap(), std::fs::read(&paths.key).unwrap()));
    let mut c = peer_channel(&addr, Some(tls));
    let as_leader = attack(&mut c, target, leader, before.0[0].1.term + 5, last).await;
    assert!(
        as_leader.iter().all(|e| e.contains("InvalidArgument") && e.contains("claims to come from")),
        "{as_leader:#?}"
    );
    // A member may ask for mark digests, but only well-formed, bounded questions.
    for (what, data) in [
        ("garbage", vec![0xff; 7]),
        ("an empty id", bincode::serialize(&(String::new(), 10u32)).unwrap()),
        ("a long id", bincode::serialize(&("x".repeat(65), 10u32)).unwrap()),
        ("a long wait", bincode::serialize(&("x".to_string(), 60_001u32)).unwrap()),
    ] {
        let e = c.mark_digest(to(RaftPayload { data }, target)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{what}: {e:?}");
    }
    let hostile_term = attack(&mut c, target, forger, u64::MAX, last).await;
    assert!(hostile_term.iter().all(|e| e.contains("InvalidArgument") && e.contains("term")), "{hostile_term:#?}");
    // A snapshot that is well-formed for its sender but larger than max_snapshot_bytes is cut
    // off while it streams, before anything is installed.
    let term = before.0[0].1.term;
    let meta = SnapshotMeta {
        last_log_id: Some(LogId { leader_id: LeaderId { term, node_id: forger }, index: 1_000 }),
        last_membership: Default::default(),
    };
    let head = bincode::serialize(&(vote(term, forger, true), meta)).unwrap();
    let mut chunks = vec![SnapshotChunk { meta: head, data: vec![1u8; 1 << 20], checksum: vec![] }];
    chunks.extend((0..2).map(|_| SnapshotChunk { meta: vec![], data: vec![2u8; 1 << 20], checksum: vec![] }));
    let e = c.install_snapshot(to(futures::stream::iter(chunks), target)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");

    // Phase 3: nothing moved, anywhere.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!((seen(&cluster), cluster.digests().await), before);

    // Phase 4: the cluster serves, and a restart finds no poisoned vote to trip over.
    client.put("acme/a", NewMemory::new("after", vector(2, 4)).with_id("m2")).await.unwrap();
    for id in cluster.running() {
        cluster.stop(id).await;
    }
    for id in 1..=3 {
        cluster.restart(id).await;
    }
    cluster.wait_for_leader().await;
    assert_eq!(cluster.client().get("acme/a", "m1").await.unwrap().text, "real");
    for (_, s) in seen(&cluster) {
        assert!(s.term < 1 << 20, "term {} after restart", s.term);
    }
    cluster.shutdown().await;
}

/// The regression from the report: one `Vote` with term 2^64-1 used to be persisted, and the
/// node then panicked in openraft at every election (`term + 1` overflowed). On an insecure
/// node nothing checks the sender, so the message-level guard alone must hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_u64_max_vote_is_refused_even_without_certificates() {
    let mut cluster = TestCluster::start(3).await;
    cluster.settle().await;
    let leader = cluster.wait_for_leader().await;
    let target = cluster.running().into_iter().find(|id| *id != leader).unwrap();
    let before = seen(&cluster);
    let mut c = peer_channel(&cluster.slot(target).raft.to_string(), None);
    let last = cluster.handle(target).node.raft.metrics().borrow_watched().last_applied;
    let errors = attack(&mut c, target, 9, u64::MAX, last).await;
    assert!(errors.iter().all(|e| e.contains("term")), "{errors:#?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(seen(&cluster), before);
    cluster.stop(target).await;
    cluster.restart(target).await;
    cluster.wait_for_leader().await;
    cluster.client().put("acme/a", NewMemory::new("x", vector(1, 4))).await.unwrap();
    cluster.shutdown().await;
}
