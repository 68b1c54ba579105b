//! Making a cluster's certificates (`engramctl certs`, the tests, the chaos harness): a CA per
//! cluster, then one certificate per node and, for client-certificate auth, per client.
//!
//! Node certificates serve and authenticate (server and client auth) and carry
//! `node-<id>.<cluster>.engram`, `<cluster>.engram` and any hosts the operator names (see
//! [`super::identity`]). Keys are ECDSA P-256. Certificates are valid from an hour ago (clock
//! skew) for the given number of days.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use thiserror::Error;

use super::identity::{cluster_dns_name, node_dns_name, validate_cluster_name, IdentityError};
use crate::raft::NodeId;

#[derive(Debug, Error)]
pub enum CertError {
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("{0}")]
    Invalid(String),
}

/// A PEM certificate and its PEM private key.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: zeroize::Zeroizing<String>,
}

/// A cluster's certificate authority.
pub struct CertAuthority {
    pub cluster: String,
    pub cert_pem: String,
    key: KeyPair,
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - Duration::from_secs(3600);
    params.not_after = now + Duration::from_secs(u64::from(days) * 86_400);
}

impl CertAuthority {
    /// A new CA for `cluster`, valid for `days`.
    pub fn generate(cluster: &str, days: u32) -> Result<CertAuthority, CertError> {
        validate_cluster_name(cluster)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, format!("engram cluster {cluster} CA"));
        params.distinguished_name.push(DnType::OrganizationName, cluster_dns_name(cluster));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut params, days);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(CertAuthority { cluster: cluster.into(), cert_pem: cert.pem(), key })
    }

    /// Loads a CA written by [`generate`](Self::generate); the cluster name comes from it.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<CertAuthority, CertError> {
        let key = KeyPair::from_pem(key_pem)?;
        let der = first_der(cert_pem).ok_or_else(|| CertError::Invalid("no certificate in the CA file".into()))?;
        let (_, x509) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| CertError::Invalid(format!("CA certificate: {e}")))?;
        let org = x509
            .subject()
            .iter_organization()
            .next()
            .and_then(|o| o.as_str().ok())
            .ok_or_else(|| CertError::Invalid("the CA names no cluster (organization)".into()))?;
        let cluster = org
            .strip_suffix(".engram")
            .ok_or_else(|| CertError::Invalid(format!("CA organization {org:?} is not <cluster>.engram")))?;
        validate_cluster_name(cluster)?;
        Ok(CertAuthority { cluster: cluster.into(), cert_pem: cert_pem.into(), key })
    }

    pub fn key_pem(&self) -> zeroize::Zeroizing<String> {
        zeroize::Zeroizing::new(self.key.serialize_pem())
    }

    fn issuer(&self) -> Result<Issuer<'_, &KeyPair>, CertError> {
        Ok(Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?)
    }

    fn sign(&self, mut params: CertificateParams, days: u32) -> Result<Issued, CertError> {
        validity(&mut params, days);
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer()?)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: zeroize::Zeroizing::new(key.serialize_pem()) })
    }

    /// A certificate for node `id`; `hosts` (IP addresses or DNS names) are what clients may
    /// dial it by without naming a server name.
    pub fn issue_node(&self, id: NodeId, hosts: &[String], days: u32) -> Result<Issued, CertError> {
        if id == 0 {
            return Err(CertError::Invalid("node ids start at 1".into()));
        }
        let mut names = vec![node_dns_name(&self.cluster, id), cluster_dns_name(&self.cluster)];
        names.extend(hosts.iter().cloned());
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, node_dns_name(&self.cluster, id));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, days)
    }

    /// A client certificate (for API listeners that require one); `name` is its common name.
    pub fn issue_client(&self, name: &str, days: u32) -> Result<Issued, CertError> {
        crate::auth::records::validate_name("name", name).map_err(|e| CertError::Invalid(e.to_string()))?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, days)
    }
}

/// The DER of the first certificate in a PEM text.
pub fn first_der(pem: &str) -> Option<Vec<u8>> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()).next()?.ok().map(|c| c.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loaded_ca_issues_like_the_original() {
        let ca = CertAuthority::generate("blue-7", 2).unwrap();
        let back = CertAuthority::load(&ca.cert_pem, &ca.key_pem()).unwrap();
        assert_eq!(back.cluster, "blue-7");
        let node = back.issue_node(4, &["10.0.0.4".into()], 1).unwrap();
        let der = first_der(&node.cert_pem).unwrap();
        let names = super::super::identity::dns_names(&der).unwrap();
        assert!(names.contains(&"node-4.blue-7.engram".to_string()), "{names:?}");
        assert!(names.contains(&"blue-7.engram".to_string()), "{names:?}");
        assert!(CertAuthority::generate("Bad_Name", 1).is_err());
        assert!(ca.issue_node(0, &[], 1).is_err());
    }
}
