#!/usr/bin/env bash
# Fault-tolerance soak (issue #8): the fault tests with soak-sized counts,
# one test binary at a time, then each test's one-line summary. Every count
# can be lowered (or raised) through the environment:
#
#   PARTITION_CYCLES (100)   partition/heal cycles        tests/partition.rs
#   PARTITION_BACKLOG (100000) items written per partition
#   KILLS (1000)             SIGKILLs of real nodes        tests/kill.rs
#   FAILPOINT_ROUNDS (250)   rounds of the 4 fail points   tests/kill.rs
#   CRASH_CYCLES (1000)      SIGKILLs of the crash writer  tests/crash.rs
#   POWER_CUTS (200)         power cuts per power-loss test tests/powerloss.rs
#   FLOOD (5000)             hostile connection attempts   tests/refusals.rs
#   RESTART_LOOPS (200)      failing starts (0 crashes)    tests/ops.rs
#   SIM_SEEDS (1000)         deterministic simulation seeds (protocol topology)
#   FUZZ_RUNS (1000000)      fuzz runs (scripts/fuzz.sh, when present)
#   SEED                     RNG seed of the fault tests (TIERSYNC_SEED)
#
# Logs go to target/soak-logs/ under CARGO_TARGET_DIR; the exit status is
# non-zero if any part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
tiersync_ensure_build_deps || exit 1
tiersync_ensure_test_deps || exit 1
cargo build --release --workspace --bins || exit 1

logs="$CARGO_TARGET_DIR/soak-logs"
mkdir -p "$logs"
[ -n "${SEED:-}" ] && export TIERSYNC_SEED="$SEED"
failed=()

# run NAME COMMAND…: runs one part, its output to $logs/NAME.log.
run() {
    local name=$1
    shift
    echo "soak: $name: $*" >&2
    local start=$SECONDS
    if "$@" >"$logs/$name.log" 2>&1; then
        echo "soak: $name passed in $((SECONDS - start)) s" >&2
    else
        echo "soak: $name FAILED after $((SECONDS - start)) s (log: $logs/$name.log)" >&2
        failed+=("$name")
    fi
}

test_bin() {
    cargo test --release -p tiersync-tests --test "$1" -- --nocapture --test-threads=1
}

TIERSYNC_PARTITION_CYCLES="${PARTITION_CYCLES:-100}" \
    TIERSYNC_PARTITION_BACKLOG="${PARTITION_BACKLOG:-100000}" \
    run partition test_bin partition
TIERSYNC_KILLS="${KILLS:-1000}" TIERSYNC_FAILPOINT_ROUNDS="${FAILPOINT_ROUNDS:-250}" \
    run kill test_bin kill
TIERSYNC_CRASH_CYCLES="${CRASH_CYCLES:-1000}" run crash test_bin crash
TIERSYNC_POWER_CUTS="${POWER_CUTS:-200}" run powerloss test_bin powerloss
run diskfull test_bin diskfull
TIERSYNC_FLOOD="${FLOOD:-5000}" run refusals test_bin refusals
run skew test_bin skew
TIERSYNC_RESTART_LOOPS="${RESTART_LOOPS:-200}" run ops test_bin ops
TIERSYNC_SIM_SEEDS="${SIM_SEEDS:-1000}" \
    run simulation cargo test --release -p tiersync-protocol topology -- --nocapture
if [ -f scripts/fuzz.sh ]; then
    run fuzz bash scripts/fuzz.sh "${FUZZ_RUNS:-1000000}"
fi

echo "soak: summaries" >&2
# With --nocapture a summary may follow "test NAME ... " on its line.
grep -hE '(^|\.\.\. )(partition|diskfull|kill|failpoints|crash test|powerfs|powerloss [a-z]+|refusals|skew|restart loop|simulation|sim|fuzz)[ :]' "$logs"/*.log |
    sed -E 's/^test .* \.\.\. //' || true
if [ ${#failed[@]} -gt 0 ]; then
    echo "soak: FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "soak: all parts passed" >&2
