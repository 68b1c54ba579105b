#!/usr/bin/env bash
# Installs what building Engram needs on a fresh Debian machine. Idempotent.
# protoc is vendored (protoc-bin-vendored). FAISS is built from source by faiss-sys (static
# feature): it needs cmake, a C++ compiler and OpenBLAS/LAPACK.
set -euo pipefail

need=()
command -v cc >/dev/null 2>&1 || need+=(build-essential)
command -v g++ >/dev/null 2>&1 || need+=(g++)
command -v cmake >/dev/null 2>&1 || need+=(cmake)
dpkg -s libopenblas-dev >/dev/null 2>&1 || need+=(libopenblas-dev)
# libfiu's fsync fault injection, for tests/disk_faults.rs.
dpkg -s fiu-utils >/dev/null 2>&1 || need+=(fiu-utils)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v curl >/dev/null 2>&1 || need+=(curl)
# The Python SDK's tests (scripts/test-python.sh) build a virtualenv.
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3 python3-venv)
if ((${#need[@]})); then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "setup: installing ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found. Install Rust >= 1.90 (https://rustup.rs) and rerun." >&2
  exit 1
fi
