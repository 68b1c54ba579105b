#!/usr/bin/env bash
# Runs every test: unit tests, proptests and in-process cluster tests (real gRPC on
# loopback, real redb files), then the chaos harness's CI tier (jepsen/README.md: real
# engram processes in network namespaces under partitions, kill -9, pauses, crashes and full
# disks, plus the canaries that must be caught; needs root). Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo test --workspace --locked "$@"
# The Python SDK against clusters of the built binaries (sdk/python/tests).
bash scripts/test-python.sh
# Operator tooling against a live node: promtool on the rules and /metrics, /status, the
# systemd unit, example configs, completions and man pages.
bash scripts/test-ops.sh
# The `gpu` feature needs CUDA FAISS to link, which CI machines lack; make sure it compiles.
# (scripts/gpu/selftest.sh runs it on a GPU machine.)
cargo check --locked --lib --no-default-features --features gpu
# The chaos harness's CI tier: about 6 minutes, prints `N passed, N failed`.
# ENGRAM_SKIP_JEPSEN=1 skips it (for machines without root or network namespaces).
if [ "${ENGRAM_SKIP_JEPSEN:-0}" = "1" ]; then
  echo "test.sh: ENGRAM_SKIP_JEPSEN=1: skipping the jepsen CI tier"
else
  # The canary's flag exists only in builds with the `canary` feature: build one as
  # engram-canary, then the normal binaries (which never have the flag).
  cargo build --locked --bin engram --features canary
  cp "${CARGO_TARGET_DIR:-target}/debug/engram" "${CARGO_TARGET_DIR:-target}/debug/engram-canary"
  cargo build --locked --bins --workspace
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO "${CARGO_TARGET_DIR:-target}/debug/engram-jepsen" ci
fi
