//! Certificates and a root key for secured test clusters, made the way `engramctl certs`
//! makes them (`engram::auth::certs`) and written to a temp dir.

use std::path::PathBuf;
use std::sync::Arc;

use engram::auth::certs::CertAuthority;
use engram::auth::token::ApiKey;
use engram::client::ClientTls;
use engram::transport::TlsPaths;
use tempfile::TempDir;

pub struct Secure {
    pub dir: TempDir,
    pub ca: CertAuthority,
    pub root: ApiKey,
}

impl Secure {
    pub fn new(cluster: &str) -> Secure {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertAuthority::generate(cluster, 1).unwrap();
        std::fs::write(dir.path().join("ca.pem"), &ca.cert_pem).unwrap();
        Secure { dir, ca, root: ApiKey::generate() }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Node `id`'s certificate files (issued on first use).
    pub fn node_paths(&self, id: u64) -> TlsPaths {
        let cert = self.dir.path().join(format!("node-{id}.pem"));
        let key = self.dir.path().join(format!("node-{id}-key.pem"));
        if !cert.exists() {
            self.write_node(id, &["127.0.0.1".to_string()]);
        }
        TlsPaths { ca: self.ca_path(), cert, key, api_cert: None, api_key: None, api_client_ca: None }
    }

    /// (Re)issues node `id`'s certificate into its files.
    pub fn write_node(&self, id: u64, hosts: &[String]) {
        let issued = self.ca.issue_node(id, hosts, 1).unwrap();
        let key = self.dir.path().join(format!("node-{id}-key.pem"));
        engram::secrets::write_private(&key, issued.key_pem.as_bytes(), true).unwrap();
        std::fs::write(self.dir.path().join(format!("node-{id}.pem")), &issued.cert_pem).unwrap();
    }

    /// What a client needs: the CA, and the name every node's certificate holds.
    pub fn client_tls(&self) -> ClientTls {
        ClientTls {
            ca_pem: self.ca.cert_pem.clone().into_bytes(),
            server_name: Some(engram::auth::identity::cluster_dns_name(&self.ca.cluster)),
            identity: None,
        }
    }
}

/// The certificate a TLS port serves to a new connection that verifies it as `name`.
pub async fn served_cert(addr: &str, ca_pem: &str, name: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from(name.to_string()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}
