#!/usr/bin/env bash
# Builds Engram, makes the cluster's certificates, starts a secured 3-node cluster on loopback
# (mutual TLS between nodes, TLS + API keys for clients), makes a tenant key, writes, reads and
# searches memories with it, shows what it may not do, takes a backup, shows the cluster
# status, then stops the cluster. Usage: scripts/demo.sh [--keep]
#   --keep   leave the cluster running (stop it with: pkill -f 'target/release/engram ')
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

echo "==> building (release)"
cargo build --release --locked --bins
BIN=target/release
DATA=demo-data
rm -rf "$DATA" && mkdir -p "$DATA"

pids=()
stop() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
[ "${1:-}" = "--keep" ] || trap stop EXIT

echo "==> a backup keyring (mode 0600; the nodes read it, the config never holds the key)"
"$BIN/engramctl" keys generate --key-file "$DATA/backup-keys.toml"

echo "==> certificates: a CA for cluster 'demo', one certificate per node (keys 0600)"
CERTS="$DATA/certs"
"$BIN/engramctl" certs init --dir "$CERTS" --cluster demo
for i in 1 2 3; do "$BIN/engramctl" certs node --dir "$CERTS" --id "$i" --host 127.0.0.1; done

echo "==> starting nodes 1..3 (logs in $DATA/n*.log)"
for i in 1 2 3; do
  "$BIN/engram" --node-id "$i" --data-dir "$DATA/n$i" --backup-key-file "$DATA/backup-keys.toml" \
    --tls-ca-file "$CERTS/ca.pem" --tls-cert-file "$CERTS/node-$i.pem" --tls-key-file "$CERTS/node-$i-key.pem" \
    --listen-api "127.0.0.1:700$i" --listen-raft "127.0.0.1:710$i" --listen-http "127.0.0.1:720$i" \
    >"$DATA/n$i.log" 2>&1 &
  pids+=($!)
done
for i in 1 2 3; do
  for _ in $(seq 50); do curl -sf "127.0.0.1:720$i/healthz" >/dev/null && break; sleep 0.1; done
done

export ENGRAM_ENDPOINTS=127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003
export ENGRAM_CA_FILE="$CERTS/ca.pem"
ctl() { echo "\$ engramctl $*"; "$BIN/engramctl" "$@"; }

echo "==> bootstrapping the cluster; the root key goes to $DATA/root.key (0600)"
ctl --endpoints 127.0.0.1:7001 cluster init --root-key-file "$DATA/root.key" \
  --member 1=127.0.0.1:7101,127.0.0.1:7001 \
  --member 2=127.0.0.1:7102,127.0.0.1:7002 \
  --member 3=127.0.0.1:7103,127.0.0.1:7003
for _ in $(seq 50); do curl -sf 127.0.0.1:7201/readyz >/dev/null && break; sleep 0.1; done

echo "==> as root: a role confined to acme/*, and a key for the tenant's app"
export ENGRAM_API_KEY_FILE="$DATA/root.key"
ctl auth role create acme-rw
ctl auth role grant acme-rw --namespace 'acme/*' --perm read,write,delete
ctl auth key create --name acme-app --role acme-rw --out "$DATA/acme.key"
ctl namespace create other/private --dimension 4

echo "==> from here on the tenant's key"
export ENGRAM_API_KEY_FILE="$DATA/acme.key"
ctl auth whoami
echo "==> no key, or another tenant's namespace: refused"
env -u ENGRAM_API_KEY_FILE "$BIN/engramctl" memory list acme/user-42 && exit 1 || true
ctl memory list other/private && exit 1 || true

echo "==> writing memories (any endpoint; the CLI follows the leader)"
ctl namespace create acme/user-42 --dimension 4 --metric cosine
ctl memory put acme/user-42 --id tea --text "Prefers green tea in the afternoon" --embedding 0.9,0.1,0.0,0.2 --tag kind=preference
ctl memory put acme/user-42 --id meetings --text "Dislikes meetings before 10am" --embedding 0.1,0.8,0.3,0.0 --tag kind=preference
ctl memory put acme/user-42 --id project --text "Working on the Q3 migration to Postgres 16" --embedding 0.0,0.2,0.9,0.4 --tag kind=fact --importance 0.9

echo "==> compare-and-set: a second create-if-absent is refused"
ctl memory put acme/user-42 --id tea --text "Prefers coffee" --embedding 0.9,0.1,0.0,0.2 --if-absent || true

echo "==> reading back: linearizable read from a follower, then a list"
ctl --endpoints 127.0.0.1:7003 memory get acme/user-42 tea
ctl memory list acme/user-42

echo "==> semantic search (linearizable, on a follower), then filtered by tag"
ctl --endpoints 127.0.0.1:7002 memory search acme/user-42 --vector 0.8,0.2,0.1,0.2 --k 2
ctl memory search acme/user-42 --vector 0.8,0.2,0.1,0.2 --k 2 --tag kind=fact
echo "==> two searches in one batch, behind one read barrier"
printf '0.8,0.2,0.1,0.2\n0.1,0.9,0.1,0.1\n' >"$DATA/queries.txt"
ctl memory search-batch acme/user-42 --file "$DATA/queries.txt" --k 2

echo "==> bad input is refused and names the field"
ctl memory put acme/user-42 --text "wrong dimension" --embedding 0.1,0.2 || true

echo "==> the memory model: a namespace with dedup, near-duplicate merging, a default TTL and a gate (a policy needs admin: the root key)"
export ENGRAM_API_KEY_FILE="$DATA/root.key"
cat > "$DATA/policy.json" <<'JSON'
{"dedup": "text",
 "near_duplicate": {"threshold": 0.97, "action": "merge", "keep": "longer"},
 "default_ttl_ms": 2592000000,
 "gate": {"required_tags": ["kind"], "deny_patterns": ["(?i)password"]}}
JSON
ctl namespace create acme/agent-notes --dimension 4 --policy "$DATA/policy.json"
ctl namespace show acme/agent-notes
export ENGRAM_API_KEY_FILE="$DATA/acme.key"
echo "==> the same fact twice: one memory (the second put answers with the first's id)"
ctl memory put acme/agent-notes --text "Deploys happen on Tuesdays" --embedding 0.9,0.1,0.0,0.2 --tag kind=fact
ctl memory put acme/agent-notes --text "Deploys happen on Tuesdays" --embedding 0.9,0.1,0.0,0.2 --tag kind=fact
echo "==> a near-duplicate (cosine 0.99+) is merged into it, keeping the longer text"
ctl memory put acme/agent-notes --text "Deploys happen on Tuesdays after the standup" --embedding 0.88,0.12,0.01,0.2 --tag kind=fact
ctl memory put acme/agent-notes --text "Lunch is at noon" --embedding 0.0,0.9,0.1,0.1 --tag kind=fact
echo "==> the verification gate: a missing tag and a denied pattern are refused, naming the rule"
ctl memory put acme/agent-notes --text "no tag here" --embedding 0.1,0.1,0.9,0.1 || true
ctl memory put acme/agent-notes --text "the admin password is hunter2" --embedding 0.1,0.1,0.9,0.1 --tag kind=fact || true
ctl memory list acme/agent-notes
export ENGRAM_API_KEY_FILE="$DATA/root.key"
ctl memory consolidate acme/agent-notes --threshold 0.1 --dry-run
ctl namespace stats acme/agent-notes

echo "==> an online, encrypted backup streamed from a follower (an admin call: the root key), then verified offline"
mkdir -p "$DATA/backups"
ctl --endpoints 127.0.0.1:7002 backup create "$DATA/backups"
ctl backup verify "$DATA"/backups/backup-*.engram --key-file "$DATA/backup-keys.toml"

echo "==> a DR drill: the backup restored into a scratch node, checked against it, timed (RTO, data age)"
ctl backup drill "$DATA/backups" --key-file "$DATA/backup-keys.toml" --scratch-dir "$DATA" \
  | grep -E '"(ok|rto_ms|data_age_ms|recall_at_10)"'

echo "==> cluster status"
ctl cluster status
echo "==> metrics sample"
curl -s 127.0.0.1:7201/metrics | grep -E '^engram_(raft_applied_index|api_requests_total)' | head -5
echo "demo done"
