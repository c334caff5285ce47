#!/usr/bin/env bash
# Runs the benchmark runner (benches/runner.rs): real nodes on loopback, the
# raw RocksDB ceiling and the PostgreSQL logical-replication baseline in the
# same run. Writes benches/results.json and the tables of benches/RESULTS.md.
# Installs build dependencies and PostgreSQL first when missing. Arguments go
# to the runner (--help lists them; --no-pg skips PostgreSQL).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
tiersync_ensure_build_deps
case " $* " in
    *" --no-pg "* | *" --help "* | *" -h "*) ;;
    *) tiersync_ensure_bench_deps ;;
esac
# The runner starts the `tiersync` binary of the same target directory.
cargo build --release -p tiersync
# `--profile release`: the bench profile would build RocksDB a second time.
exec cargo bench --profile release -p tiersync-benches --bench runner -- "$@"
