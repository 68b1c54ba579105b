#!/usr/bin/env bash
# Cluster load benchmark (release): 3 engram processes on loopback with fsync on.
# Usage: scripts/bench.sh [--duration-secs N] [--dim D] [--failover-trials K]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo build --release --locked --bins
cargo bench --locked --bench cluster_load -- "$@"
