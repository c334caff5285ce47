//! Child processes of the demo (and of the tests): start a node, stop it
//! cleanly.

/// SIGHUP: a node re-reads its configuration.
pub const SIGHUP: i32 = libc::SIGHUP;
/// SIGKILL.
pub const SIGKILL: i32 = libc::SIGKILL;
/// SIGTERM: a clean stop.
pub const SIGTERM: i32 = libc::SIGTERM;

/// Sends SIGTERM to `pid`: the node closes its links, drains its writer and
/// flushes RocksDB before it exits.
pub fn terminate(pid: u32) -> std::io::Result<()> {
    signal(pid, libc::SIGTERM)
}

/// Sends signal `sig` to process `pid`.
pub fn signal(pid: u32, sig: i32) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| std::io::Error::other("pid out of range"))?;
    signal_raw(pid, sig)
}

/// kill(2): a positive `pid` is a process, a negative one a process group.
#[allow(unsafe_code)] // std can only SIGKILL a child; other signals need kill(2)
fn signal_raw(pid: libc::pid_t, sig: i32) -> std::io::Result<()> {
    if pid == 0 || pid == -1 {
        // 0 and -1 would signal this process's own group or every process.
        return Err(std::io::Error::other("refusing to signal pid 0 or -1"));
    }
    // SAFETY: kill(2) has no memory-safety preconditions; it only sends a
    // signal to the given process id.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Sends signal `sig` to every process of the process group `pgid` (a node
/// started by [`spawn_node`] leads its own group, with any wrapper such as
/// `faketime` and what it started).
pub fn signal_group(pgid: u32, sig: i32) -> std::io::Result<()> {
    let pgid = i32::try_from(pgid).map_err(|_| std::io::Error::other("pid out of range"))?;
    signal_raw(-pgid, sig)
}

/// Starts `exe run --config CONFIG` with stderr to `log`, and waits (up to
/// `timeout`) for the `ready api=… peer=…` line it prints once it serves.
pub fn spawn_node(
    exe: &std::path::Path,
    config: &std::path::Path,
    log: std::fs::File,
    envs: &[(&str, &str)],
    timeout: std::time::Duration,
) -> std::io::Result<std::process::Child> {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let mut child = std::process::Command::new(exe)
        // Its own process group, so whoever started it can stop all of it.
        .process_group(0)
        .arg("run")
        .arg("--config")
        .arg(config)
        .envs(envs.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| std::io::Error::other("no stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    // Keeps draining stdout so the node never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    match rx.recv_timeout(timeout) {
        Ok(line) if line.starts_with("ready ") => Ok(child),
        other => {
            let _ = signal_group(child.id(), SIGKILL);
            let _ = child.wait();
            Err(std::io::Error::other(format!(
                "{} did not report ready within {timeout:?} (got {other:?})",
                config.display()
            )))
        }
    }
}
