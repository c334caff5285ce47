#!/usr/bin/env bash
# Runs every test of the workspace (unit, property, multi-process) in the one
# release profile. Installs build dependencies first when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
tiersync_ensure_build_deps
tiersync_ensure_test_deps
cargo build --release --workspace --bins
cargo test --release --workspace "$@"
