#!/usr/bin/env bash
# Fuzzes a node's HTTP API from its own OpenAPI document with schemathesis
# (PyPI): every response must be documented, match its schema, and no
# request may get a 5xx. Runs one city node on 127.0.0.1 in a temporary
# directory, with an operator token (the role that reaches most routes).
#
#   bash scripts/schemathesis.sh [MAX_EXAMPLES]     # default 50 per operation
#
# Installs schemathesis with pip when it is missing. Stops the node at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
tiersync_ensure_build_deps
examples="${1:-50}"
bin="$CARGO_TARGET_DIR/release/tiersync"
[ -x "$bin" ] || cargo build --release -p tiersync
command -v st >/dev/null 2>&1 || python3 -m pip install -q schemathesis

work="$(mktemp -d)"
node_pid=""
cleanup() {
    [ -n "$node_pid" ] && kill "$node_pid" 2>/dev/null && wait "$node_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

port=$((20000 + RANDOM % 20000))
"$bin" certs init --dir "$work/certs" >/dev/null
"$bin" certs issue --dir "$work/certs" --tier city --api-host 127.0.0.1 hangzhou >/dev/null
cp config-examples/policy.toml "$work/policy.toml"
cat >"$work/hangzhou.toml" <<EOF
[node]
id = "hangzhou"
tier = "city"
policy = "policy.toml"
data_dir = "data"

[listen]
api = "127.0.0.1:$port"

[tls]
ca = "certs/ca.pem"
cert = "certs/hangzhou.pem"
key = "certs/hangzhou.key"
crl = "certs/crl.pem"
EOF
"$bin" run --config "$work/hangzhou.toml" 2>"$work/node.log" &
node_pid=$!
for _ in $(seq 100); do
    [ -f "$work/data/admin.token" ] && curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
    sleep 0.1
done
admin="$(cat "$work/data/admin.token")"
token="$("$bin" token create --node "http://127.0.0.1:$port" --token "$admin" \
    --role operator --name schemathesis | grep -o 'tst_[0-9a-f_]*' | head -1)"
[ -n "$token" ] || { echo "schemathesis.sh: could not create a token" >&2; cat "$work/node.log" >&2; exit 1; }

st run "http://127.0.0.1:$port/v1/openapi.json" \
    --header "Authorization: Bearer $token" \
    --checks all \
    --max-examples "$examples" \
    --seed 1
