#!/usr/bin/env bash
# Starts, stops and inspects the config-examples deployment as local
# processes on this machine (127.0.0.1 only).
#
#   deploy/local-cluster.sh start    # certificates on first start, then every node
#   deploy/local-cluster.sh status   # each node's link state and lag
#   deploy/local-cluster.sh stop     # SIGTERM every node (clean shutdown)
#
# Data lives in config-examples/data/, certificates in config-examples/certs/,
# logs and pid files in config-examples/run/. TIERSYNC_BIN overrides the binary.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
examples=config-examples
run="$examples/run"
nodes=(national zhejiang jiangsu hangzhou ningbo nanjing suzhou)
bin="${TIERSYNC_BIN:-$CARGO_TARGET_DIR/release/tiersync}"

build() {
    if [ ! -x "$bin" ]; then
        tiersync_ensure_build_deps
        cargo build --release -p tiersync
    fi
}

certs() {
    if [ ! -f "$examples/certs/ca.pem" ]; then
        "$bin" certs init --dir "$examples/certs"
    fi
    for n in "${nodes[@]}"; do
        [ -f "$examples/certs/$n.pem" ] || "$bin" certs issue --dir "$examples/certs" "$n"
    done
}

api_of() {
    sed -n 's/^api *= *"\(.*\)"/\1/p' "$examples/$1.toml" | head -n 1
}

start() {
    build
    certs
    mkdir -p "$run"
    local files=()
    for n in "${nodes[@]}"; do files+=("$examples/$n.toml"); done
    "$bin" config check "${files[@]}"
    for n in "${nodes[@]}"; do
        if [ -f "$run/$n.pid" ] && kill -0 "$(cat "$run/$n.pid")" 2>/dev/null; then
            echo "$n already running (pid $(cat "$run/$n.pid"))"
            continue
        fi
        "$bin" run --config "$examples/$n.toml" >"$run/$n.out" 2>"$run/$n.log" &
        echo $! >"$run/$n.pid"
        for _ in $(seq 1 100); do
            grep -q '^ready ' "$run/$n.out" 2>/dev/null && break
            kill -0 "$(cat "$run/$n.pid")" 2>/dev/null || { echo "$n failed to start; see $run/$n.log" >&2; exit 1; }
            sleep 0.1
        done
        echo "started $n (pid $(cat "$run/$n.pid")), API http://$(api_of "$n")"
    done
}

stop() {
    for n in "${nodes[@]}"; do
        [ -f "$run/$n.pid" ] || continue
        pid=$(cat "$run/$n.pid")
        if kill -TERM "$pid" 2>/dev/null; then
            for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            echo "stopped $n"
        fi
        rm -f "$run/$n.pid"
    done
}

status() {
    for n in "${nodes[@]}"; do
        echo "== $n"
        # The node's first admin token (see the README, Security).
        "$bin" status --config "$examples/$n.toml" \
            --token-file "$examples/data/$n/admin.token" 2>/dev/null || echo "not running"
    done
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
