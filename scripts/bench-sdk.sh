#!/usr/bin/env bash
# Python SDK next to the Rust SDK on the same cluster, in one run: a 3-node cluster of release
# binaries on loopback (--insecure: TLS costs are measured by benches/security_overhead.rs),
# then ROUNDS rounds alternating Rust and Python, each round with its own namespace. Prints
# every round's JSON and the medians with Python/Rust ratios.
# Usage: scripts/bench-sdk.sh [--ops N] [--concurrency C] [--dim D] [--rounds R]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
OPS=2000 CONC=8 DIM=384 ROUNDS=3
while [ $# -gt 0 ]; do
  case "$1" in
    --ops) OPS=$2; shift 2 ;; --concurrency) CONC=$2; shift 2 ;;
    --dim) DIM=$2; shift 2 ;; --rounds) ROUNDS=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
TARGET="$(mkdir -p "${CARGO_TARGET_DIR:-target}" && cd "${CARGO_TARGET_DIR:-target}" && pwd)"
cargo build --release --locked --bin engram --bin engramctl
cargo bench --locked --bench sdk_compare --no-run
RUST_BENCH=$(ls -t "$TARGET"/release/deps/sdk_compare-* | grep -v '\.d$' | head -1)
VENV="$TARGET/python-venv"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q ./sdk/python && rm -rf sdk/python/build
WORK="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
members=() eps=()
for i in 1 2 3; do
  api="127.0.0.1:$(port)" raft="127.0.0.1:$(port)" http="127.0.0.1:$(port)"
  "$TARGET/release/engram" --insecure --node-id "$i" --data-dir "$WORK/n$i" --listen-api "$api" \
    --listen-raft "$raft" --listen-http "$http" >"$WORK/n$i.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do curl -sf "http://$http/healthz" >/dev/null && break; sleep 0.1; done
  members+=(--member "$i=$raft,$api") eps+=("$api")
  [ "$i" = 1 ] && READY="http://$http/readyz"
done
EPS=$(IFS=,; echo "${eps[*]}")
"$TARGET/release/engramctl" --insecure --endpoints "${eps[0]}" cluster init "${members[@]}" >/dev/null
for _ in $(seq 100); do curl -sf "$READY" >/dev/null && break; sleep 0.1; done
: > "$WORK/results.jsonl"
for r in $(seq "$ROUNDS"); do
  "$RUST_BENCH" --endpoints "$EPS" --namespace "bench/rust-$r" --ops "$OPS" --concurrency "$CONC" --dim "$DIM" \
    | tee -a "$WORK/results.jsonl"
  "$VENV/bin/python" sdk/python/bench/bench_sdk.py --endpoints "$EPS" --namespace "bench/python-$r" --ops "$OPS" \
    --concurrency "$CONC" --dim "$DIM" | tee -a "$WORK/results.jsonl"
done
python3 - "$WORK/results.jsonl" "$OPS" "$CONC" "$DIM" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"\nmedians of {len(rows)//2} rounds ({sys.argv[2]} ops, {sys.argv[3]} concurrent, {sys.argv[4]}-d, 3 nodes):")
print(f"{'':8} {'rust ops/s':>11} {'python ops/s':>13} {'py/rust':>8} {'rust p50':>9} {'py p50':>8} {'rust p99':>9} {'py p99':>8}")
for op in ("put", "search"):
    m = {sdk: {k: statistics.median(r[op][k] for r in rows if r["sdk"] == sdk) for k in ("ops_per_sec", "p50_ms", "p99_ms")}
         for sdk in ("rust", "python")}
    r, p = m["rust"], m["python"]
    print(f"{op:8} {r['ops_per_sec']:11.0f} {p['ops_per_sec']:13.0f} {p['ops_per_sec']/r['ops_per_sec']:8.2f} "
          f"{r['p50_ms']:8.2f}ms {p['p50_ms']:6.2f}ms {r['p99_ms']:8.2f}ms {p['p99_ms']:6.2f}ms")
PY
