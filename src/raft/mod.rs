//! Consensus: openraft wired to redb storage and a tonic peer transport.
//!
//! * [`types`] — type config, [`Command`] (log entry payload) and [`CommandResult`].
//! * [`log_store`] — the durable Raft log (redb, fsync before ack).
//! * [`state_machine`] / `apply` — the redb state machine and snapshots.
//! * [`network`] / [`service`] — peer client and server.
//! * [`node`] — [`RaftNode`]: what the API layer calls to write and to linearize reads.

mod apply;
mod apply_auth;
mod apply_memory;
#[cfg(feature = "canary")]
mod canary_backend;
pub mod cluster_verify;
pub mod compaction;
pub mod disk;
pub mod guard;
pub mod log_store;
pub mod marks;
pub mod network;
pub mod node;
mod read_batch;
pub mod service;
pub mod snapshot;
pub mod state_machine;
pub mod types;

pub use log_store::LogStore;
pub use node::RaftNode;
pub use state_machine::StateMachineStore;
pub use types::*;
