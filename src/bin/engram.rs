//! `engram`: one Engram node. See `engram --help`; every flag also reads `ENGRAM_…` env vars.

use clap::Parser;
use engram::config::NodeArgs;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() {
    // Everything the node writes (log, state, snapshots, index files, backups) is its own.
    // SAFETY: umask only sets the process's file-mode mask; no memory is involved.
    unsafe {
        libc::umask(0o077);
    }
    let config = match NodeArgs::parse().resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("engram: {e}");
            std::process::exit(2);
        }
    };
    let filter = EnvFilter::try_from_env("ENGRAM_LOG").unwrap_or_else(|_| EnvFilter::new("info,openraft=warn"));
    let telemetry = match engram::telemetry::init(config.log_format, filter, config.tracing.as_ref(), config.node_id) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("engram: {e}");
            std::process::exit(2);
        }
    };
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    let result = engram::server::run(config, shutdown).await;
    telemetry.shutdown().await;
    if let Err(engram::error::ServerError::DiskFreed) = result {
        // Raft stopped on a full disk and space is back: start afresh as the same process (same
        // pid for supervisors, every file and socket reopened; nothing of the stopped run kept).
        use std::os::unix::process::CommandExt;
        let exe = std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into());
        let e = std::process::Command::new(exe).args(std::env::args_os().skip(1)).exec();
        eprintln!("engram: starting again after a full disk failed: {e}");
        std::process::exit(1);
    }
    if let Err(e) = result {
        eprintln!("engram: {e}");
        std::process::exit(1);
    }
}
