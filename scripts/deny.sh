#!/usr/bin/env bash
# Dependency hygiene with cargo-deny (.ci/deny.toml): licences, bans,
# sources, and RustSec advisories. Installs cargo-deny from crates.io when
# missing (a few minutes of compiling, once).
#
# Advisories need the RustSec advisory database, a git repository that
# cargo-deny fetches from GitHub. Where that is unreachable (no network but
# the package registries), the check runs offline against a local copy
# (TIERSYNC_ADVISORY_DB, or cargo-deny's cache under ~/.cargo/advisory-dbs)
# when there is one, and otherwise says that advisories were not checked.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
if ! command -v cargo-deny >/dev/null 2>&1; then
    echo "deny: installing cargo-deny" >&2
    cargo install --locked cargo-deny
fi
checks=(bans licenses sources)
db="${TIERSYNC_ADVISORY_DB:-}"
[ -n "$db" ] || db=$(compgen -G "$HOME/.cargo/advisory-dbs/*/" | head -n 1 || true)
for manifest in Cargo.toml tests/fuzz/Cargo.toml; do
    echo "deny: $manifest: ${checks[*]}" >&2
    deny=(cargo deny --manifest-path "$manifest" --config .ci/deny.toml)
    "${deny[@]}" --offline check "${checks[@]}"
    if [ -n "$db" ]; then
        echo "deny: $manifest: advisories (offline, $db)" >&2
        "${deny[@]}" --offline check advisories
    elif [ -z "${no_db:-}" ] && timeout 30 "${deny[@]}" fetch db >/dev/null 2>&1; then
        "${deny[@]}" check advisories
    else
        no_db=1
        echo "deny: $manifest: advisories NOT checked: the RustSec database cannot be fetched here and no local copy exists" >&2
    fi
done
