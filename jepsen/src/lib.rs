//! Engram's Jepsen-style chaos harness: real `engram` processes in network namespaces, real
//! faults (nftables partitions and loss, kill -9, SIGSTOP, membership changes, libfaketime
//! clock skew, libfiu fsync errors, full disks, un-fsynced writes lost or torn at a crash,
//! slow fsync), recorded histories and checkers. See jepsen/README.md.

pub mod checker;
pub mod cluster;
pub mod disk;
pub mod history;
pub mod nemesis;
pub mod net;
pub mod report;
pub mod run;
pub mod workload;
