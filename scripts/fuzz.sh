#!/usr/bin/env bash
# Builds the libFuzzer targets of tests/fuzz (frame_decode, handshake) and
# runs each for RUNS executions (default 20000: short enough for a soak),
# then prints per target: executions, crashes, peak RSS.
#
#   scripts/fuzz.sh [RUNS]
#
# Stable Rust: coverage comes from LLVM's sancov pass (the flags cargo-fuzz
# uses), without a sanitizer runtime; libFuzzer's C++ is built with the
# system C++ compiler. Everything goes to its own target directory so these
# RUSTFLAGS never invalidate the main build. Environment:
#   TIERSYNC_FUZZ_TARGET_DIR  target dir (~/.cache/tiersync/fuzz-target)
#   TIERSYNC_FUZZ_WORK        corpus and crash artifacts (~/.cache/tiersync/fuzz-work)
#   TIERSYNC_FUZZ_MAX_LEN     -max_len (4096)
#   TIERSYNC_FUZZ_RSS_MB      -rss_limit_mb (512): the process may not grow past it
#   TIERSYNC_FUZZ_MALLOC_MB   -malloc_limit_mb (32). libFuzzer enforces it only
#                             through a sanitizer runtime's malloc hooks, which
#                             a stable build has not: there the targets' own
#                             counting allocator fails any single allocation
#                             above the codec's 16 MiB limit instead
#   TIERSYNC_FUZZ_TARGETS     which targets ("frame_decode handshake")
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
tiersync_ensure_build_deps

runs="${1:-20000}"
target_dir="${TIERSYNC_FUZZ_TARGET_DIR:-$HOME/.cache/tiersync/fuzz-target}"
work="${TIERSYNC_FUZZ_WORK:-$HOME/.cache/tiersync/fuzz-work}"
max_len="${TIERSYNC_FUZZ_MAX_LEN:-4096}"
rss_mb="${TIERSYNC_FUZZ_RSS_MB:-512}"
malloc_mb="${TIERSYNC_FUZZ_MALLOC_MB:-32}"
targets="${TIERSYNC_FUZZ_TARGETS:-frame_decode handshake}"
host="$(rustc -vV | sed -n 's/^host: //p')"

# An explicit --target keeps RUSTFLAGS off build scripts and proc macros.
RUSTFLAGS="-Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
--cfg fuzzing" \
    CARGO_TARGET_DIR="$target_dir" \
    cargo build --release --manifest-path tests/fuzz/Cargo.toml --target "$host" --bins

status=0
for t in $targets; do
    bin="$target_dir/$host/release/$t"
    corpus="$work/corpus/$t"
    artifacts="$work/artifacts/$t/"
    mkdir -p "$corpus" "$artifacts"
    TIERSYNC_FUZZ_WRITE_CORPUS="$corpus" "$bin" >/dev/null 2>&1
    log="$work/$t.log"
    start=$(date +%s)
    rc=0
    "$bin" "$corpus" -runs="$runs" -max_len="$max_len" -rss_limit_mb="$rss_mb" \
        -malloc_limit_mb="$malloc_mb" -artifact_prefix="$artifacts" \
        -print_final_stats=1 -seed=1 >"$log" 2>&1 || rc=$?
    secs=$(( $(date +%s) - start ))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -1)
    crashes=$(find "$artifacts" -type f \( -name 'crash-*' -o -name 'oom-*' -o -name 'leak-*' -o -name 'timeout-*' \) | wc -l)
    echo "fuzz $t: ${execs:-?} executions in ${secs}s, $crashes crashes, peak RSS ${rss:-?} MB (rss limit $rss_mb MB, malloc limit $malloc_mb MB, max_len $max_len), exit $rc, log $log"
    if [ "$rc" != 0 ] || [ "$crashes" != 0 ]; then
        status=1
        tail -30 "$log" >&2
    fi
done
exit $status
