#!/usr/bin/env bash
# One comparison run on this box: Engram beside etcd (replicated puts, same load generator)
# and beside FAISS in-process and chromadb (search on the same vectors and queries).
# Installs what it needs: Debian's etcd-server, and chromadb in its own virtualenv
# (target/compare-venv, apart from the SDK's test environment).
#   scripts/compare.sh --dataset ../shared/datasets/debian-minilm
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v etcd >/dev/null; then
  apt-get update && apt-get install -y etcd-server
fi
# etcd-server's package starts a node on the default ports; the benchmark runs its own.
systemctl disable --now etcd 2>/dev/null || pkill -x etcd || true
VENV=target/compare-venv
if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import chromadb' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q chromadb numpy
fi
cargo build --release --locked --bins
cargo bench --locked --bench compare -- --python "$VENV/bin/python" "$@"
