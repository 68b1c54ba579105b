//! How the SDK reaches a node: TLS (a CA to trust, the name the server certificate must hold,
//! optionally a client certificate) and the credential sent with every call.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::ClientError;

/// TLS to the API port.
#[derive(Clone, Debug, Default)]
pub struct ClientTls {
    /// The CA that signed the nodes' certificates (PEM).
    pub ca_pem: Vec<u8>,
    /// The name the server certificate must hold; default: the endpoint's host. Every node's
    /// certificate from `engramctl certs node` holds `<cluster>.engram`.
    pub server_name: Option<String>,
    /// A client certificate and key (PEM), for nodes that require one.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl ClientTls {
    /// Reads the CA (and, if given, the client certificate and its 0600 key) from files.
    pub fn from_files(
        ca: &Path,
        server_name: Option<String>,
        cert_and_key: Option<(&Path, &Path)>,
    ) -> Result<ClientTls, ClientError> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| ClientError::config(format!("{}: {e}", p.display())));
        let identity = match cert_and_key {
            Some((cert, key)) => Some((
                read(cert)?,
                crate::secrets::read_private(key).map_err(|e| ClientError::config(e.to_string()))?.to_vec(),
            )),
            None => None,
        };
        Ok(ClientTls { ca_pem: read(ca)?, server_name, identity })
    }
}

/// How a [`super::Client`] connects and who it says it is.
#[derive(Clone, Debug, Default)]
pub struct ClientOptions {
    pub retry: super::RetryPolicy,
    /// `None`: plaintext (an `--insecure` node).
    pub tls: Option<ClientTls>,
    /// An API key (`egk_…`) or a JWT, sent as `authorization: Bearer …`.
    pub credential: Option<String>,
    /// Puts create an unknown namespace (cosine, default policy) on first write. Off: a put to
    /// a namespace nobody created fails with NOT_FOUND, so a typo never makes a new one.
    pub create_namespaces: bool,
}

/// Adds the credential to every request.
#[derive(Clone, Default)]
pub struct Credential(Option<Arc<MetadataValue<Ascii>>>);

impl Credential {
    pub(super) fn new(token: Option<&str>) -> Result<Credential, ClientError> {
        match token {
            None => Ok(Credential(None)),
            Some(t) => {
                let v: MetadataValue<Ascii> = format!("Bearer {}", t.trim())
                    .parse()
                    .map_err(|_| ClientError::config("the credential holds characters a header cannot"))?;
                Ok(Credential(Some(Arc::new(v))))
            }
        }
    }
}

impl Interceptor for Credential {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.as_ref().clone());
        }
        Ok(req)
    }
}

/// A channel with the credential attached.
pub type Svc = InterceptedService<Channel, Credential>;

/// A lazily connected channel to `addr` (`host:port`).
pub(super) fn channel(addr: &str, tls: Option<&ClientTls>, credential: &Credential) -> Result<Svc, ClientError> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut e = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| ClientError::config(format!("bad endpoint {addr:?}: {e}")))?;
    if let Some(t) = tls {
        let mut cfg = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&t.ca_pem));
        if let Some(name) = &t.server_name {
            cfg = cfg.domain_name(name.clone());
        }
        if let Some((cert, key)) = &t.identity {
            cfg = cfg.identity(Identity::from_pem(cert, key));
        }
        e = e.tls_config(cfg).map_err(|e| ClientError::config(format!("TLS: {e}")))?;
    }
    // Pings only while a call is in flight: a node closes connections that go silent, and a
    // busy one must not look silent during a long call.
    let ch = e
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(false)
        .connect_lazy();
    Ok(InterceptedService::new(ch, credential.clone()))
}
