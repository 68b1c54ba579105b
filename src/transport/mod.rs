//! How bytes reach the gRPC services: every listener runs [`listener::incoming`] (connection
//! limit, handshake and idle deadlines, TLS from [`tls::NodeTls`]) and hands [`conn::Conn`]s
//! to tonic. Connection facts (remote address, the client's verified certificate chain) reach
//! the auth layers as [`conn::ConnInfo`] in each request's extensions.

pub mod conn;
pub mod listener;
pub mod tls;

pub use conn::ConnInfo;
pub use listener::Limits;
pub use tls::{NodeTls, TlsPaths};
