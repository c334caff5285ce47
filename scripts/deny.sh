#!/usr/bin/env bash
# Dependency hygiene with cargo-deny (.ci/deny.toml): licences, bans,
# sources, and RustSec advisories. Installs cargo-deny from crates.io when
# missing (a few minutes of compiling, once).
#
# Advisories need the RustSec advisory database, a git repository that
# cargo-deny fetches from GitHub. Where that is unreachable (no network but
# the package registries), point TIERSYNC_ADVISORY_DB at a clone of
# github.com/rustsec/advisory-db and the check runs offline against it (a
# copy cargo-deny fetched before, under ~/.cargo/advisory-dbs, serves too);
# with neither, the script says that advisories were not checked.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
if ! command -v cargo-deny >/dev/null 2>&1; then
    echo "deny: installing cargo-deny" >&2
    cargo install --locked cargo-deny
fi
checks=(bans licenses sources)
# cargo-deny keeps the default database in this directory of its db-path
# (.ci/deny.toml reads the db-path from TIERSYNC_ADVISORY_DBS).
db_dir=advisory-db-3157b0e258782691
if [ -n "${TIERSYNC_ADVISORY_DB:-}" ]; then
    [ -d "$TIERSYNC_ADVISORY_DB/crates" ] || {
        echo "deny: TIERSYNC_ADVISORY_DB=$TIERSYNC_ADVISORY_DB is not a clone of the RustSec advisory-db (no crates/)" >&2
        exit 1
    }
    TIERSYNC_ADVISORY_DBS=$(mktemp -d)
    export TIERSYNC_ADVISORY_DBS
    trap 'rm -rf "$TIERSYNC_ADVISORY_DBS"' EXIT
    ln -s "$(realpath "$TIERSYNC_ADVISORY_DB")" "$TIERSYNC_ADVISORY_DBS/$db_dir"
fi
db="${TIERSYNC_ADVISORY_DBS:-${CARGO_HOME:-$HOME/.cargo}/advisory-dbs}/$db_dir"
[ -d "$db" ] || db=
for manifest in Cargo.toml tests/fuzz/Cargo.toml; do
    echo "deny: $manifest: ${checks[*]}" >&2
    deny=(cargo deny --manifest-path "$manifest" --config .ci/deny.toml)
    "${deny[@]}" --offline check "${checks[@]}"
    if [ -n "$db" ]; then
        echo "deny: $manifest: advisories (offline; database as of $(git -C "$db" log -1 --format=%cs))" >&2
        "${deny[@]}" --offline check advisories
    elif [ -z "${no_db:-}" ] && timeout 30 "${deny[@]}" fetch db >/dev/null 2>&1; then
        db="${TIERSYNC_ADVISORY_DBS:-${CARGO_HOME:-$HOME/.cargo}/advisory-dbs}/$db_dir"
        "${deny[@]}" check advisories
    else
        no_db=1
        echo "deny: $manifest: advisories NOT checked: the RustSec database cannot be fetched here and no local copy exists (TIERSYNC_ADVISORY_DB)" >&2
    fi
done
