//! Child processes of the demo (and of the tests): start a node, stop it
//! cleanly.

/// Sends SIGTERM to `pid`: the node closes its links, drains its writer and
/// flushes RocksDB before it exits.
#[allow(unsafe_code)] // std can only SIGKILL a child; a clean stop needs SIGTERM
pub fn terminate(pid: u32) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| std::io::Error::other("pid out of range"))?;
    // SAFETY: kill(2) has no memory-safety preconditions; it only sends a
    // signal to the given process id.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
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
    let mut child = std::process::Command::new(exe)
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
            let _ = child.kill();
            let _ = child.wait();
            Err(std::io::Error::other(format!(
                "{} did not report ready within {timeout:?} (got {other:?})",
                config.display()
            )))
        }
    }
}
