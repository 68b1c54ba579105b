//! A node's TLS material, reloadable without a restart (SIGHUP, or
//! [`NodeTls::reload`]): the peer listener (mutual TLS, client certificate from the cluster CA
//! required), the API listener (server certificate; a client certificate only when
//! `api_client_ca` is set) and the peer client side (its identity for mutual TLS, the CA, and
//! the name of the node it dials).
//!
//! New connections use the newest material; established ones keep what they were made with.
//! A reload that fails (unreadable file, a key that does not fit the certificate, a
//! certificate for another node) keeps the old material and reports why.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::auth::identity::{cluster_dns_name, node_dns_name, node_identity, NodeIdentity};
use crate::raft::NodeId;

/// Where a node's certificates live. The key files must be mode 0600.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TlsPaths {
    /// The cluster CA: signs every node certificate.
    pub ca: PathBuf,
    /// This node's certificate (`node-<id>.<cluster>.engram`) and key.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// A separate certificate for the API listener (default: the node certificate).
    pub api_cert: Option<PathBuf>,
    pub api_key: Option<PathBuf>,
    /// Clients of the API listener must present a certificate signed by this CA.
    pub api_client_ca: Option<PathBuf>,
}

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{what}: {reason}")]
    Pem { what: String, reason: String },
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(String),
    #[error("{0}")]
    Identity(String),
}

/// PEM material as read from files.
struct Material {
    ca: Vec<CertificateDer<'static>>,
    ca_pem: Vec<u8>,
    chain: Vec<CertificateDer<'static>>,
    cert_pem: Vec<u8>,
    key_pem: zeroize::Zeroizing<Vec<u8>>,
    api_chain: Vec<CertificateDer<'static>>,
    api_key_pem: zeroize::Zeroizing<Vec<u8>>,
    api_client_ca: Option<Vec<CertificateDer<'static>>>,
}

fn certs(what: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |reason: String| TlsError::Pem { what: what.into(), reason };
    let certs = CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no certificate".into()));
    }
    Ok(certs)
}

fn key(what: &str, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::Pem { what: what.into(), reason: e.to_string() })
}

fn read(path: &PathBuf) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Io(std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))))
}

impl Material {
    fn load(p: &TlsPaths) -> Result<Material, TlsError> {
        let ca_pem = read(&p.ca)?;
        let cert_pem = read(&p.cert)?;
        let key_pem = crate::secrets::read_private(&p.key)?;
        let (api_chain, api_key_pem) = match (&p.api_cert, &p.api_key) {
            (Some(c), Some(k)) => (certs("api certificate", &read(c)?)?, crate::secrets::read_private(k)?),
            (None, None) => (certs("node certificate", &cert_pem)?, key_pem.clone()),
            _ => return Err(TlsError::Identity("api_tls_cert and api_tls_key go together".into())),
        };
        let api_client_ca = match &p.api_client_ca {
            Some(path) => Some(certs("api client CA", &read(path)?)?),
            None => None,
        };
        Ok(Material {
            ca: certs("cluster CA", &ca_pem)?,
            chain: certs("node certificate", &cert_pem)?,
            ca_pem,
            cert_pem,
            key_pem,
            api_chain,
            api_key_pem,
            api_client_ca,
        })
    }

    fn roots(certs: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        for c in certs {
            roots.add(c.clone())?;
        }
        Ok(Arc::new(roots))
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn server(
        chain: &[CertificateDer<'static>],
        key_pem: &[u8],
        client_ca: Option<&[CertificateDer<'static>]>,
    ) -> Result<Arc<ServerConfig>, TlsError> {
        let builder = ServerConfig::builder_with_provider(Self::provider()).with_safe_default_protocol_versions()?;
        let builder = match client_ca {
            Some(ca) => {
                let verifier = WebPkiClientVerifier::builder_with_provider(Self::roots(ca)?, Self::provider())
                    .build()
                    .map_err(|e| TlsError::Verifier(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut cfg = builder.with_single_cert(chain.to_vec(), key("private key", key_pem)?)?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }
}

struct Configs {
    peer: Arc<ServerConfig>,
    api: Arc<ServerConfig>,
    material: Arc<Material>,
}

/// A node's TLS state.
pub struct NodeTls {
    paths: TlsPaths,
    identity: NodeIdentity,
    current: RwLock<Configs>,
    generation: AtomicU64,
}

impl NodeTls {
    /// Loads and checks the material: this node's certificate must name node `node_id`.
    pub fn load(paths: TlsPaths, node_id: NodeId) -> Result<NodeTls, TlsError> {
        let (configs, identity) = Self::build(&paths, node_id, None)?;
        Ok(NodeTls { paths, identity, current: RwLock::new(configs), generation: AtomicU64::new(0) })
    }

    fn build(paths: &TlsPaths, node_id: NodeId, cluster: Option<&str>) -> Result<(Configs, NodeIdentity), TlsError> {
        let m = Material::load(paths)?;
        let identity = node_identity(&m.chain[0]).map_err(|e| TlsError::Identity(format!("node certificate: {e}")))?;
        if identity.node_id != node_id {
            return Err(TlsError::Identity(format!(
                "the node certificate is for node {}, not node {node_id}",
                identity.node_id
            )));
        }
        if let Some(c) = cluster {
            if identity.cluster != c {
                return Err(TlsError::Identity(format!(
                    "the new certificate is for cluster {:?}, not {c:?}",
                    identity.cluster
                )));
            }
        }
        let peer = Material::server(&m.chain, &m.key_pem, Some(&m.ca))?;
        let api = Material::server(&m.api_chain, &m.api_key_pem, m.api_client_ca.as_deref())?;
        Ok((Configs { peer, api, material: Arc::new(m) }, identity))
    }

    /// Re-reads every file; on failure the current material stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let (configs, _) = Self::build(&self.paths, self.identity.node_id, Some(&self.identity.cluster))?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = configs;
        self.generation.fetch_add(1, Ordering::SeqCst);
        metrics::counter!("engram_tls_reloads_total").increment(1);
        tracing::info!(node = self.identity.node_id, "TLS certificates reloaded");
        Ok(())
    }

    /// The cluster this node's certificate belongs to.
    pub fn cluster(&self) -> &str {
        &self.identity.cluster
    }

    /// Bumped by every successful reload.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    pub fn peer_acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.read().unwrap_or_else(|p| p.into_inner()).peer.clone())
    }

    pub fn api_acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.read().unwrap_or_else(|p| p.into_inner()).api.clone())
    }

    /// Client TLS for dialling peer `target`: our node certificate as identity, the cluster CA
    /// as the only root, and the target's node name as the name its certificate must hold.
    pub fn peer_client(&self, target: NodeId) -> ClientTlsConfig {
        let m = self.current.read().unwrap_or_else(|p| p.into_inner()).material.clone();
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&m.ca_pem))
            .identity(Identity::from_pem(&m.cert_pem, &m.key_pem[..]))
            .domain_name(node_dns_name(&self.identity.cluster, target))
    }

    /// The name every node of this cluster answers to on the API port.
    pub fn cluster_name(&self) -> String {
        cluster_dns_name(&self.identity.cluster)
    }
}
