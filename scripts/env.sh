# Sourced by the project's scripts: installs what the build needs when it is
# missing, and points cargo at one shared target directory.
#
# The rocksdb crate needs libclang (bindgen) and a C++ compiler. On a fresh
# Debian machine, as root, they are installed with apt-get; otherwise the
# script says what to install and stops.

# libclang itself (libclang.so / libclang-14.so.1), not libclang-cpp, which
# some images ship alone and which bindgen cannot load; plus clang's own
# headers (stddef.h), which bindgen needs to parse RocksDB's C header.
_tiersync_have_libclang() {
    compgen -G '/usr/lib/llvm-*/lib/libclang.so*' >/dev/null ||
        compgen -G '/usr/lib/llvm-*/lib/libclang-[0-9]*.so*' >/dev/null ||
        compgen -G '/usr/lib/*-linux-gnu/libclang-[0-9]*.so*' >/dev/null ||
        return 1
    compgen -G '/usr/lib/llvm-*/lib/clang/*/include/stddef.h' >/dev/null
}

_tiersync_install() {
    if [ "$(id -u)" != 0 ]; then
        echo "tiersync: missing build dependencies: $*" >&2
        echo "tiersync: install them with: sudo apt-get install -y $*" >&2
        return 1
    fi
    echo "tiersync: installing build dependencies: $*" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 && apt-get install -y -qq "$@" >&2
}

tiersync_ensure_build_deps() {
    local missing=()
    _tiersync_have_libclang || missing+=(libclang-dev)
    command -v c++ >/dev/null 2>&1 || missing+=(g++)
    command -v make >/dev/null 2>&1 || missing+=(make)
    if [ ${#missing[@]} -gt 0 ]; then
        _tiersync_install "${missing[@]}" || return 1
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        # rustup's default location, for shells that did not source ~/.cargo/env
        [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
    fi
    command -v cargo >/dev/null 2>&1 || { echo "tiersync: cargo (the Rust toolchain) is required" >&2; return 1; }
}

# What the tests need beyond the build: the clock-skew and config-check
# tests run tiersync under faketime; the metrics test runs promtool (Debian
# package prometheus); the power-loss tests mount powerfs (FUSE) through
# fusermount3.
tiersync_ensure_test_deps() {
    local missing=()
    command -v faketime >/dev/null 2>&1 || missing+=(faketime)
    command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
    command -v fusermount3 >/dev/null 2>&1 || missing+=(fuse3)
    if [ ${#missing[@]} -gt 0 ]; then
        _tiersync_install "${missing[@]}" || return 1
    fi
}

# One target directory outside the clone, so a fresh clone on the same
# machine reuses the (expensive) RocksDB build. Override with CARGO_TARGET_DIR.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tiersync/target}"
# The single build profile used for tests, binaries and benches.
export TIERSYNC_PROFILE=release

# What the benchmark runner's PostgreSQL baseline needs.
tiersync_ensure_bench_deps() {
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || _tiersync_install postgresql
    command -v runuser >/dev/null 2>&1 || _tiersync_install util-linux
}
