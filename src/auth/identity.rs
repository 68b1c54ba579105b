//! Who a certificate speaks for. Node certificates carry their identity in a DNS name:
//!
//! ```text
//! node-<id>.<cluster>.engram     the peer identity: node <id> of cluster <cluster>
//! <cluster>.engram               a name every node of the cluster answers to (API clients)
//! ```
//!
//! A peer proves it is node `id` of this cluster by a certificate signed by the cluster CA
//! holding exactly one `node-…` name, for this cluster. A node dialling peer `id` verifies the
//! server certificate against `node-<id>.<cluster>.engram`, so a request can only reach the
//! node it names. The parsers here never panic on any input (proptested).

use thiserror::Error;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::raft::NodeId;

const SUFFIX: &str = ".engram";

/// A cluster member as its certificate names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    pub cluster: String,
    pub node_id: NodeId,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IdentityError {
    #[error("not a certificate: {0}")]
    Der(String),
    #[error("the certificate names no engram node (expected a DNS name node-<id>.<cluster>.engram)")]
    NoIdentity,
    #[error("the certificate names more than one engram node")]
    Ambiguous,
    #[error("invalid cluster name {0:?}: 1..=40 bytes of [a-z0-9-], starting with a letter or digit")]
    ClusterName(String),
}

/// Cluster names are DNS labels: 1..=40 bytes of `[a-z0-9-]`, not starting or ending with `-`.
pub fn validate_cluster_name(name: &str) -> Result<(), IdentityError> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(IdentityError::ClusterName(name.to_string()))
    }
}

/// The DNS name that identifies node `id` of `cluster`.
pub fn node_dns_name(cluster: &str, id: NodeId) -> String {
    format!("node-{id}.{cluster}{SUFFIX}")
}

/// The DNS name every node of `cluster` answers to.
pub fn cluster_dns_name(cluster: &str) -> String {
    format!("{cluster}{SUFFIX}")
}

/// Reads `node-<id>.<cluster>.engram`: a canonical decimal id >= 1 and a valid cluster name.
pub fn parse_node_name(name: &str) -> Option<NodeIdentity> {
    let rest = name.strip_prefix("node-")?.strip_suffix(SUFFIX)?;
    let (id, cluster) = rest.split_once('.')?;
    if id.is_empty() || id.len() > 20 || !id.bytes().all(|b| b.is_ascii_digit()) || id.starts_with('0') {
        return None;
    }
    let node_id: NodeId = id.parse().ok()?;
    validate_cluster_name(cluster).ok()?;
    Some(NodeIdentity { cluster: cluster.to_string(), node_id })
}

/// The DNS subject-alternative names of a DER certificate.
pub fn dns_names(der: &[u8]) -> Result<Vec<String>, IdentityError> {
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| IdentityError::Der(e.to_string()))?;
    if !rest.is_empty() {
        return Err(IdentityError::Der("trailing bytes after the certificate".into()));
    }
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                names.push(d.to_string());
            }
        }
    }
    Ok(names)
}

/// The node a certificate identifies: exactly one `node-…` DNS name.
pub fn node_identity(der: &[u8]) -> Result<NodeIdentity, IdentityError> {
    let mut found = dns_names(der)?.iter().filter_map(|n| parse_node_name(n)).collect::<Vec<_>>();
    match found.len() {
        0 => Err(IdentityError::NoIdentity),
        1 => Ok(found.remove(0)),
        _ => Err(IdentityError::Ambiguous),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::auth::certs;

    #[test]
    fn names() {
        assert_eq!(
            parse_node_name("node-7.prod-1.engram"),
            Some(NodeIdentity { cluster: "prod-1".into(), node_id: 7 })
        );
        for bad in [
            "node-0.c.engram",
            "node-07.c.engram",
            "node-.c.engram",
            "node-1.engram",
            "node-1.c.engram.evil",
            "node-1.C.engram",
            "node-1.-c.engram",
            "node-1.a.b.engram",
            "node-18446744073709551616.c.engram",
            "node--1.c.engram",
            "xnode-1.c.engram",
        ] {
            assert_eq!(parse_node_name(bad), None, "{bad:?} accepted");
        }
        assert_eq!(parse_node_name(&node_dns_name("c", u64::MAX)).map(|i| i.node_id), Some(u64::MAX));
    }

    #[test]
    fn a_node_certificate_names_its_node() {
        let ca = certs::CertAuthority::generate("prod", 1).unwrap();
        let node = ca.issue_node(3, &["127.0.0.1".into(), "db-3.internal".into()], 1).unwrap();
        let der = certs::first_der(&node.cert_pem).unwrap();
        assert_eq!(node_identity(&der).unwrap(), NodeIdentity { cluster: "prod".into(), node_id: 3 });
        let client = ca.issue_client("alice", 1).unwrap();
        let der = certs::first_der(&client.cert_pem).unwrap();
        assert_eq!(node_identity(&der), Err(IdentityError::NoIdentity));
        assert!(matches!(node_identity(b"not a certificate"), Err(IdentityError::Der(_))));
    }

    proptest! {
        #[test]
        fn node_names_round_trip(cluster in "[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?", id in 1u64..) {
            let name = node_dns_name(&cluster, id);
            prop_assert_eq!(parse_node_name(&name), Some(NodeIdentity { cluster, node_id: id }));
        }

        #[test]
        fn name_parsing_never_panics(s in ".{0,80}") {
            let _ = parse_node_name(&s);
            let _ = validate_cluster_name(&s);
        }

        #[test]
        fn certificate_parsing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = node_identity(&bytes);
        }
    }

    #[test]
    fn damaged_certificates_are_refused_or_still_name_the_same_node() {
        let ca = certs::CertAuthority::generate("prod", 1).unwrap();
        let node = ca.issue_node(9, &[], 1).unwrap();
        let der = certs::first_der(&node.cert_pem).unwrap();
        for i in 0..der.len() {
            let mut bad = der.clone();
            bad[i] ^= 0x55;
            // Parsing alone proves nothing (TLS verifies the signature); it must not panic,
            // and it can only ever yield a well-formed identity.
            if let Ok(id) = node_identity(&bad) {
                assert!(validate_cluster_name(&id.cluster).is_ok() && id.node_id >= 1);
            }
        }
    }
}
