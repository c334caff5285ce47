#!/usr/bin/env bash
# Builds tiersync and runs the local demo. Installs build dependencies first
# when missing. Extra arguments go to `tiersync demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
tiersync_ensure_build_deps
cargo build --release -p tiersync
bin="$CARGO_TARGET_DIR/release/tiersync"
if "$bin" demo --help >/dev/null 2>&1; then
    exec "$bin" demo "$@"
fi
# Until `tiersync demo` exists: check the example deployment, show its
# topology, and run its first city node in the foreground (Ctrl-C stops it).
"$bin" config check config-examples/national.toml config-examples/zhejiang.toml \
    config-examples/jiangsu.toml config-examples/hangzhou.toml config-examples/ningbo.toml \
    config-examples/nanjing.toml config-examples/suzhou.toml
"$bin" topology config-examples/national.toml config-examples/zhejiang.toml \
    config-examples/jiangsu.toml config-examples/hangzhou.toml config-examples/ningbo.toml \
    config-examples/nanjing.toml config-examples/suzhou.toml
exec "$bin" run --config config-examples/hangzhou.toml
