//! One accepted connection: TCP, optionally under TLS, with an idle deadline and a slot of its
//! listener's connection limit.
//!
//! The deadline counts bytes *received*: a connection that sends nothing for `idle` (or, before
//! its first bytes, for the handshake timeout) is closed. Clients with requests in flight ping
//! (the SDK sets HTTP/2 keep-alive while busy), so only idle or silent connections are cut.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};
use tonic::transport::server::Connected;

/// A stream that fails with `TimedOut` once nothing has been read from it for a while.
pub struct IdleIo<T> {
    inner: T,
    deadline: Pin<Box<Sleep>>,
    idle: Duration,
}

impl<T> IdleIo<T> {
    /// `first` bounds the wait for the first bytes, `idle` every later silence.
    pub fn new(inner: T, first: Duration, idle: Duration) -> Self {
        IdleIo { inner, deadline: Box::pin(tokio::time::sleep(first)), idle }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    let next = Instant::now() + self.idle;
                    self.deadline.as_mut().reset(next);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    metrics::counter!("engram_connections_idle_closed_total").increment(1);
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "connection idle")))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// What handlers and layers learn about the connection a request came on.
#[derive(Clone, Debug, Default)]
pub struct ConnInfo {
    pub remote: Option<SocketAddr>,
    /// The client's certificate chain, when it presented one (verified by TLS against the CA).
    pub peer_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

enum Io {
    Plain(IdleIo<TcpStream>),
    Tls(Box<tokio_rustls::server::TlsStream<IdleIo<TcpStream>>>),
}

/// An accepted connection, holding its place in the listener's limit until dropped.
pub struct Conn {
    io: Io,
    info: ConnInfo,
    _permit: OwnedSemaphorePermit,
}

impl Conn {
    pub(super) fn plain(io: IdleIo<TcpStream>, remote: Option<SocketAddr>, permit: OwnedSemaphorePermit) -> Conn {
        Conn { io: Io::Plain(io), info: ConnInfo { remote, peer_certs: None }, _permit: permit }
    }

    pub(super) fn tls(
        io: tokio_rustls::server::TlsStream<IdleIo<TcpStream>>,
        remote: Option<SocketAddr>,
        permit: OwnedSemaphorePermit,
    ) -> Conn {
        let peer_certs =
            io.get_ref().1.peer_certificates().map(|c| Arc::new(c.iter().map(|c| c.clone().into_owned()).collect()));
        Conn { io: Io::Tls(Box::new(io)), info: ConnInfo { remote, peer_certs }, _permit: permit }
    }
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

macro_rules! delegate {
    ($self:ident, $io:ident => $e:expr) => {
        match &mut $self.get_mut().io {
            Io::Plain($io) => {
                let $io = Pin::new($io);
                $e
            }
            Io::Tls($io) => {
                let $io = Pin::new($io.as_mut());
                $e
            }
        }
    };
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_read(cx, buf))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        delegate!(self, io => io.poll_write(cx, data))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => io.poll_shutdown(cx))
    }
}
