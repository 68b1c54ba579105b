#!/usr/bin/env bash
# Operator tooling, checked for real: the alert rules (promtool check + unit tests), the
# Grafana dashboard and the rules against a live node's /metrics (promtool check metrics, and
# every metric they name must exist), /status and `engramctl status --json`, `config
# show|validate` on the example configs, the systemd unit (systemd-analyze verify), backup
# create/verify/restore through engramctl (progress bars on a terminal, none on a pipe), shell
# completions and man pages. Usage: scripts/test-ops.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v jq >/dev/null 2>&1 || need+=(jq)
if ((${#need[@]})); then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
cargo build --locked --bin engram --bin engramctl
BIN="$(cd "${CARGO_TARGET_DIR:-target}/debug" && pwd)"
CTL="$BIN/engramctl"
WORK="$(mktemp -d)"
pid=""
cleanup() { if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi; rm -rf "$WORK"; }
trap cleanup EXIT
fail() { echo "test-ops: FAILED: $*" >&2; exit 1; }

echo "== alert rules"
promtool check rules scripts/observability/engram-alerts.yml
(cd scripts/observability && promtool test rules engram-alerts.test.yml)
jq -e '.panels | length > 0' scripts/observability/engram-dashboard.json >/dev/null || fail "dashboard JSON"

echo "== systemd unit"
sed "s|/usr/local/bin/engram|$BIN/engram|" scripts/packaging/engram.service > "$WORK/engram.service"
systemd-analyze verify "$WORK/engram.service"

echo "== example configs"
for f in scripts/packaging/examples/*/*.toml; do
  "$CTL" config show -- --config "$f" >/dev/null || fail "$f does not resolve"
done
"$CTL" config show --json -- --config scripts/packaging/examples/3-node/node-2.toml \
  | jq -e '.[] | select(.name == "node_id") | .value == 2 and .source == "file"' >/dev/null || fail "config show sources"
if "$CTL" config validate -- --node-id 1 2>/dev/null; then fail "a config without data_dir validated"; fi

echo "== a live node"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
API="127.0.0.1:$(port)"; RAFT="127.0.0.1:$(port)"; HTTP="127.0.0.1:$(port)"
"$CTL" keys generate --key-file "$WORK/keys.toml" 2>/dev/null >/dev/null
"$BIN/engram" --insecure --node-id 1 --data-dir "$WORK/n1" --listen-api "$API" --listen-raft "$RAFT" \
  --listen-http "$HTTP" --backup-key-file "$WORK/keys.toml" >"$WORK/n1.log" 2>&1 &
pid=$!
for _ in $(seq 100); do curl -sf "http://$HTTP/healthz" >/dev/null && break; sleep 0.1; done
"$CTL" --insecure --endpoints "$API" cluster init --member "1=$RAFT,$API" >/dev/null
for _ in $(seq 100); do curl -sf "http://$HTTP/readyz" >/dev/null && break; sleep 0.1; done
"$CTL" --insecure --endpoints "$API" namespace create ops/check --dimension 3 >/dev/null
"$CTL" --insecure --endpoints "$API" memory put ops/check --text "hello" --embedding 0.1,0.2,0.3 >/dev/null
"$CTL" --insecure --endpoints "$API" memory search ops/check --vector 0.1,0.2,0.3 --k 1 >/dev/null
"$CTL" --insecure --endpoints "$API" memory put ops/typo --text "x" --embedding 0.1,0.2,0.3 2>/dev/null \
  && fail "a put created a namespace by accident"
curl -sf "http://$HTTP/metrics" > "$WORK/metrics.txt"
promtool check metrics < "$WORK/metrics.txt"
# Every metric the dashboard and the rules name exists, except those that appear with their
# first event (a backup, a forwarded write, a memory-model action).
event_driven='engram_backup_last_success_timestamp_seconds|engram_backup_last_failure_timestamp_seconds|engram_forwarded_writes_total|engram_memory_dedup_hits_total|engram_memory_merges_total|engram_memory_purged_total'
names=$( (grep -o 'engram_[a-z_]*' scripts/observability/engram-alerts.yml; jq -r '.panels[].targets[].expr' scripts/observability/engram-dashboard.json | grep -o 'engram_[a-z_]*') | sort -u)
for n in $names; do
  grep -q "^$n[{ ]" "$WORK/metrics.txt" || [[ "$n" =~ ^($event_driven)$ ]] || fail "metric $n is named but not exported"
done
curl -sf "http://$HTTP/status" > "$WORK/status.json"
jq -e '.status == "ok" and .raft.status == "ok" and .storage.status == "ok" and .vectors.namespaces == 1 and .backups.status == "disabled"' \
  "$WORK/status.json" >/dev/null || fail "/status: $(cat "$WORK/status.json")"
"$CTL" --insecure --endpoints "$API" status --json | jq -e '.reachable and .state == "leader" and .node_id == 1' >/dev/null \
  || fail "engramctl status --json"

echo "== backups through engramctl: progress bars on a terminal only"
CTLN=("$CTL" --insecure --endpoints "$API")
"${CTLN[@]}" backup create "$WORK/b1.engram" >"$WORK/create.out" 2>"$WORK/create.err" \
  || fail "backup create: $(cat "$WORK/create.out" "$WORK/create.err")"
grep -q "^backup .* written to $WORK/b1.engram" "$WORK/create.out" || fail "backup create: $(cat "$WORK/create.out")"
[ ! -s "$WORK/create.err" ] || fail "backup create drew on a pipe: $(cat "$WORK/create.err")"
"$CTL" backup verify "$WORK/b1.engram" --key-file "$WORK/keys.toml" >"$WORK/verify.out" 2>"$WORK/verify.err"
grep -q "^OK: " "$WORK/verify.out" && [ ! -s "$WORK/verify.err" ] || fail "backup verify: $(cat "$WORK/verify.out" "$WORK/verify.err")"
"$CTL" backup restore "$WORK/b1.engram" --key-file "$WORK/keys.toml" --data-dir "$WORK/r1" --node-id 1 \
  --member "1=$RAFT,$API" >"$WORK/restore.out" 2>&1 || fail "backup restore: $(cat "$WORK/restore.out")"
grep -q "^restored: " "$WORK/restore.out" || fail "backup restore: $(cat "$WORK/restore.out")"
# On a terminal (script(1) gives one) each command draws a bar with its rate and ETA.
script -qec "${CTLN[*]} backup create $WORK/b2.engram" /dev/null >"$WORK/create.tty"
grep -q "backing up" "$WORK/create.tty" && grep -q "B/s" "$WORK/create.tty" && grep -q "ETA" "$WORK/create.tty" \
  || fail "no progress bar on a terminal: $(cat -v "$WORK/create.tty")"
script -qec "$CTL backup verify $WORK/b2.engram --key-file $WORK/keys.toml" /dev/null >"$WORK/verify.tty"
grep -q "verifying" "$WORK/verify.tty" && grep -q "ETA" "$WORK/verify.tty" && grep -q "OK: backup" "$WORK/verify.tty" \
  || fail "no verify progress on a terminal: $(cat -v "$WORK/verify.tty")"

echo "== completions and man pages"
"$CTL" completions bash > "$WORK/engramctl.bash"
grep -q "_engramctl()" "$WORK/engramctl.bash" || fail "bash completions"
"$CTL" man "$WORK/man" >/dev/null
[ -s "$WORK/man/engramctl.1" ] && [ -s "$WORK/man/engram.1" ] || fail "man pages"
echo "test-ops: all checks passed"
