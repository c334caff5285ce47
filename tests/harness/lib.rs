//! Shared pieces of the multi-process tests: where the binaries are, the
//! shipped policy, and waiting on a condition with a deadline (never a fixed
//! sleep).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: a panic is the failure report

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tiersync_protocol::Policy;

pub mod cluster;
pub mod powerfs;
pub mod proxy;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// The CRM policy shipped in `config-examples/policy.toml`.
pub fn example_policy() -> Arc<Policy> {
    let path = repo_root().join("config-examples/policy.toml");
    match tiersync::config::load_policy(&path) {
        Ok(p) => Arc::new(p),
        Err(e) => panic!("the shipped policy must load: {e}"),
    }
}

/// Path of a binary built by the workspace into the same target directory as
/// the running test (`target/<profile>/NAME`).
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test>-<hash>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    profile_dir.join(name)
}

/// Polls `cond` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut cond: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Median and 99th percentile of `samples` (nearest rank), in ms.
pub fn p50_p99_ms(samples: &[Duration]) -> (u128, u128) {
    let mut v: Vec<u128> = samples.iter().map(Duration::as_millis).collect();
    v.sort_unstable();
    let rank = |q: f64| -> u128 {
        if v.is_empty() {
            return 0;
        }
        let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        v[i]
    };
    (rank(0.50), rank(0.99))
}

/// The seed of a test's RNG: `TIERSYNC_SEED` if set, else `default`.
pub fn env_seed(default: u64) -> u64 {
    std::env::var("TIERSYNC_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// A count from the environment (for soak runs), or `default`.
pub fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A process started in a process group of its own (with whatever it
/// starts, e.g. a node under `faketime`): [`ProcessGroup::stop`] sends
/// SIGTERM to the whole group, and dropping it (a failed test too) SIGKILLs
/// the group, so no test leaves a process behind.
pub struct ProcessGroup {
    child: std::process::Child,
}

impl ProcessGroup {
    /// Spawns `cmd` as the leader of a new process group.
    pub fn spawn(cmd: &mut std::process::Command) -> std::io::Result<Self> {
        use std::os::unix::process::CommandExt;
        Ok(Self {
            child: cmd.process_group(0).spawn()?,
        })
    }

    /// The leader's process id (= the group id).
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM to the group, then waits (up to 30 s, else SIGKILL) for the
    /// leader; returns its exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let _ = tiersync::process::signal_group(self.id(), tiersync::process::SIGTERM);
        let child = &mut self.child;
        let status = wait_for(Duration::from_secs(30), || child.try_wait().ok().flatten());
        if status.is_none() {
            let _ = tiersync::process::signal_group(self.id(), tiersync::process::SIGKILL);
            let _ = self.child.wait();
        }
        status
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        let _ = tiersync::process::signal_group(self.id(), tiersync::process::SIGKILL);
        let _ = self.child.wait();
    }
}
