//! Engram: a self-hosted, Raft-replicated memory store for AI agents.
//!
//! # Layout
//!
//! * [`memory`] — the memory model and input validation.
//! * [`auth`] — keys, JWTs, replicated grants and quotas, certificates, the auth layers, limits.
//! * [`transport`] — the accept loop of every listener: TLS, connection limits, deadlines.
//! * [`secrets`] — files that hold secrets (0600, never the config).
//! * [`storage`] — redb tables, record codec, the read handle.
//! * [`raft`] — openraft with a redb log and state machine, peer transport, [`raft::RaftNode`].
//! * [`api`] — gRPC services (memory, admin), proto conversions, the one error→status map.
//! * [`server`] — [`server::start`]/[`server::run`]: an embeddable node (tests start real nodes).
//! * [`http`] — `/metrics`, `/healthz`, `/readyz`.
//! * [`config`] — flags, env vars, TOML file, validation.
//! * [`progress`] — progress bars for engramctl, rate/ETA log lines for a node's long jobs.
//! * [`telemetry`] — the log and opt-in OpenTelemetry traces (OTLP).
//! * [`client`] — the Rust SDK: leader discovery, retries with idempotency keys.
//! * [`vector`] — the `VectorIndex` trait: FAISS and an exact pure-Rust oracle, filters.
//! * [`backup`] — encrypted, verifiable backup archives, restore, keys, scheduled backups.
//! * [`error`] — error families.
#![doc = include_str!("../docs/errors.md")]
#![doc = include_str!("../docs/security.md")]

pub mod api;
pub mod auth;
pub mod backup;
pub mod client;

pub mod config;
pub mod error;
pub mod http;
pub mod memory;
pub mod progress;
pub mod raft;
pub mod secrets;
pub mod server;
pub mod storage;
pub mod telemetry;
pub mod transport;
pub mod upkeep;
pub mod vector;

/// Generated protobuf types and gRPC stubs (`proto/engram/v1`).
pub mod proto {
    #![allow(clippy::all)]
    tonic::include_proto!("engram.v1");

    /// Encoded file descriptors, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("engram_descriptor");
}
