//! The client-facing gRPC services and everything between them and the domain:
//!
//! * [`status`] — the only place errors become `tonic::Status`.
//! * [`convert`] — proto ↔ domain conversions, destructuring messages exhaustively.
//! * [`memory_service`] — `MemoryService`: writes through Raft, reads at a chosen consistency.
//! * [`admin_service`] — `AdminService`: bootstrap, membership, leadership, status.

pub mod admin_service;
pub mod convert;
pub mod memory_service;
pub mod status;

pub use admin_service::AdminApi;
pub use memory_service::MemoryApi;

/// Records one RPC's outcome and latency.
pub(crate) fn observe<T>(method: &'static str, started: std::time::Instant, res: &Result<T, tonic::Status>) {
    let code = match res {
        Ok(_) => "ok",
        Err(s) => status::code_name(s.code()),
    };
    metrics::counter!("engram_api_requests_total", "method" => method, "code" => code).increment(1);
    metrics::histogram!("engram_api_request_duration_seconds", "method" => method)
        .record(started.elapsed().as_secs_f64());
}
