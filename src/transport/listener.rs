//! The accept loop in front of every gRPC listener: a connection limit (connections past it are
//! closed at once), TCP_NODELAY, a deadline for the TLS handshake (or, in plaintext, for the
//! first bytes), an idle deadline, and TLS from the node's current certificates. The gRPC
//! server consumes the resulting stream of [`Conn`]s.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

use super::conn::{Conn, IdleIo};

/// Limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
}

/// Where TLS acceptors come from: asked once per connection, so a reload applies to the next.
pub type Acceptors = Arc<dyn Fn() -> TlsAcceptor + Send + Sync>;

/// Starts accepting on `listener`; the stream ends when the consumer drops it.
pub fn incoming(
    listener: TcpListener,
    name: &'static str,
    limits: Limits,
    tls: Option<Acceptors>,
) -> ReceiverStream<Result<Conn, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                a = listener.accept() => a,
            };
            let (tcp, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors or a reset before accept: back off, keep serving.
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                metrics::counter!("engram_connections_refused_total", "listener" => name).increment(1);
                tracing::debug!(listener = name, %remote, "connection limit reached; closing");
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            metrics::counter!("engram_connections_accepted_total", "listener" => name).increment(1);
            let io = IdleIo::new(tcp, limits.handshake_timeout, limits.idle_timeout);
            let tx = tx.clone();
            match &tls {
                None => {
                    let _ = tx.send(Ok(Conn::plain(io, Some(remote), permit))).await;
                }
                Some(acceptors) => {
                    let acceptor = acceptors();
                    tokio::spawn(async move {
                        match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(io)).await {
                            Ok(Ok(stream)) => {
                                let _ = tx.send(Ok(Conn::tls(stream, Some(remote), permit))).await;
                            }
                            Ok(Err(e)) => {
                                metrics::counter!("engram_tls_handshake_failures_total", "listener" => name)
                                    .increment(1);
                                tracing::debug!(listener = name, %remote, error = %e, "TLS handshake refused");
                            }
                            Err(_) => {
                                metrics::counter!("engram_tls_handshake_failures_total", "listener" => name)
                                    .increment(1);
                                tracing::debug!(listener = name, %remote, "TLS handshake timed out");
                            }
                        }
                    });
                }
            }
        }
    });
    ReceiverStream::new(rx)
}
