//! Named fail points for the fault tests, with the `fail` crate.
//!
//! They are compiled into every build and do nothing unless the
//! `FAILPOINTS` environment variable activates them when `tiersync run`
//! starts: `FAILPOINTS="NAME=ACTIONS;NAME=ACTIONS"`, with the `fail` crate's
//! action syntax (`return`, `panic`, `off`, `N*` counts, `P%` chances,
//! `->` sequences). At every point below, `return` means *crash*: the
//! process aborts at once (SIGABRT, no clean-up), like a power cut there.
//! E.g. `FAILPOINTS="store-after-sync=20*off->return"` crashes at the 21st
//! synced write group.
//!
//! | name | where the node crashes |
//! |---|---|
//! | `store-after-append` | a write group is in the WAL but not yet synced, nothing acknowledged |
//! | `store-after-sync` | a write group is synced, not yet acknowledged |
//! | `store-mid-merge` | a parent validated a child's batch and built its WriteBatch, not yet committed |
//! | `link-mid-frame` | half of a `Batch`/`SnapshotChunk` frame is sent, the rest never |
//!
//! One point does not crash: at `store-sync-error`, `return` makes the WAL
//! sync of a write group (or of a merge) fail as a disk reporting EIO on
//! fsync would; the store must then stop taking writes (fail-stop).
//! E.g. `FAILPOINTS="store-sync-error=3*off->1*return->off"` fails the 4th sync only.

use anyhow::{Context, Result, bail};

/// The environment variable that activates fail points.
pub const ENV: &str = "FAILPOINTS";

/// Every fail point of the node.
pub const NAMES: [&str; 5] = [
    "store-after-append",
    "store-sync-error",
    "store-after-sync",
    "store-mid-merge",
    "link-mid-frame",
];

/// Activates the fail points named in `FAILPOINTS`, if set. An unknown
/// name or a malformed action is an error (naming the variable), never a
/// panic.
pub fn setup_from_env() -> Result<()> {
    let Ok(spec) = std::env::var(ENV) else {
        return Ok(());
    };
    setup(&spec)
}

fn setup(spec: &str) -> Result<()> {
    for part in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((name, actions)) = part.split_once('=') else {
            bail!("{ENV}: {part:?} is not NAME=ACTIONS");
        };
        let name = name.trim();
        if !NAMES.contains(&name) {
            bail!(
                "{ENV}: unknown fail point {name:?} (known: {})",
                NAMES.join(", ")
            );
        }
        fail::cfg(name, actions.trim())
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("{ENV}: fail point {name}"))?;
        tracing::warn!(
            fail_point = name,
            actions = actions.trim(),
            "fail point active"
        );
    }
    Ok(())
}

/// Ends the process at fail point `name`, as abruptly as a crash.
pub fn crash(name: &str) -> ! {
    eprintln!("fail point {name}: crashing");
    std::process::abort()
}

/// Whether fail point `name` fires now.
pub fn fires(name: &str) -> bool {
    fail::fail_point!(name, |_| true);
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_specs_are_errors() {
        assert!(setup("nonsense").is_err());
        assert!(setup("no-such-point=return").is_err());
        assert!(setup("store-mid-merge=bogus(").is_err());
        assert!(setup("").is_ok());
        assert!(setup("store-mid-merge=off").is_ok());
        assert!(!fires("store-mid-merge"));
        fail::remove("store-mid-merge");
    }
}
