//! Certificates and a root key for secured test clusters, made the way `engramctl certs`
//! makes them (`engram::auth::certs`) and written to a temp dir.

use std::path::PathBuf;

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
