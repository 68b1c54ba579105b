#!/usr/bin/env bash
# Runs every test: unit tests, proptests and in-process cluster tests (real gRPC on
# loopback, real redb files). Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo test --workspace --locked "$@"
# The `gpu` feature needs CUDA FAISS to link, which CI machines lack; make sure it compiles.
# (scripts/gpu/selftest.sh runs it on a GPU machine.)
cargo check --locked --lib --no-default-features --features gpu
