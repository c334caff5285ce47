//! Starts, cuts and stops the power-loss file system (`tests/bin/powerfs.rs`)
//! for the tests: a mount of a backing directory that drops everything not
//! fsynced when its power is cut.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::{wait_for, workspace_bin};

/// How long mounting, cutting or unmounting may take.
const DEADLINE: Duration = Duration::from_secs(60);

/// Why powerfs cannot run here (no `/dev/fuse`, not root, no
/// `fusermount3`), or `None` when it can.
pub fn unavailable() -> Option<String> {
    if !Path::new("/dev/fuse").exists() {
        return Some("no /dev/fuse".into());
    }
    let Ok(uid) = Command::new("id").arg("-u").output() else {
        return Some("cannot run id -u".into());
    };
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("mounting powerfs needs root".into());
    }
    let helper = Command::new("fusermount3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if helper.is_err() {
        return Some(
            "fusermount3 missing (Debian package fuse3; scripts/env.sh installs it)".into(),
        );
    }
    None
}

/// What a power cut dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Files whose data was rolled back to their last sync.
    pub files: u64,
    /// Bytes of unsynced data dropped.
    pub bytes: u64,
    /// Name operations (create, rename, unlink…) undone.
    pub names: u64,
    /// Roll-back steps that failed (must be 0).
    pub errors: u64,
}

impl CutReport {
    fn parse(line: &str) -> Option<Self> {
        let mut r = Self::default();
        let mut fields = line.split_whitespace();
        if fields.next()? != "cut" {
            return None;
        }
        for field in fields {
            let (k, v) = field.split_once('=')?;
            let v: u64 = v.parse().ok()?;
            match k {
                "files" => r.files = v,
                "bytes" => r.bytes = v,
                "names" => r.names = v,
                "errors" => r.errors = v,
                _ => return None,
            }
        }
        Some(r)
    }

    /// Adds another cut's figures.
    pub fn add(&mut self, other: CutReport) {
        self.files += other.files;
        self.bytes += other.bytes;
        self.names += other.names;
        self.errors += other.errors;
    }
}

struct Running {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

/// A powerfs mount of `backing` on `mountpoint`. Dropping it unmounts
/// (cleanly if it can, else by force), whatever state the test is in.
pub struct PowerFs {
    backing: PathBuf,
    mountpoint: PathBuf,
    running: Option<Running>,
    log: PathBuf,
}

impl PowerFs {
    /// Mounts `backing` (created if missing) on `mountpoint` (created if
    /// missing); powerfs's own messages go to `log`.
    pub fn mount(backing: &Path, mountpoint: &Path, log: &Path) -> Self {
        std::fs::create_dir_all(backing).expect("create the backing directory");
        std::fs::create_dir_all(mountpoint).expect("create the mount point");
        let mut fs = Self {
            backing: backing.to_path_buf(),
            mountpoint: mountpoint.to_path_buf(),
            running: None,
            log: log.to_path_buf(),
        };
        fs.remount();
        fs
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// Mounts again after a cut.
    pub fn remount(&mut self) {
        assert!(self.running.is_none(), "powerfs is already mounted");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("powerfs log file");
        let mut child = Command::new(workspace_bin("powerfs"))
            .arg(&self.backing)
            .arg(&self.mountpoint)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start powerfs");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        self.running = Some(Running {
            child,
            stdin,
            lines,
        });
        let first = self.answer();
        assert_eq!(
            first.as_deref(),
            Some("ready"),
            "powerfs did not mount {}; its log: {}",
            self.mountpoint.display(),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// The next line powerfs prints, `None` if it exits or stays silent
    /// past the deadline.
    fn answer(&self) -> Option<String> {
        self.running.as_ref()?.lines.recv_timeout(DEADLINE).ok()
    }

    /// Sends `command` and waits for powerfs's answer and exit.
    fn command(&mut self, command: &str) -> Option<String> {
        let r = self.running.as_mut()?;
        let stdin = r.stdin.as_mut()?;
        writeln!(stdin, "{command}").ok()?;
        stdin.flush().ok()?;
        let answer = self.answer();
        self.reap();
        answer
    }

    /// Waits for the process to exit (killing it past the deadline) and
    /// for the mount to be gone.
    fn reap(&mut self) {
        let Some(mut r) = self.running.take() else {
            return;
        };
        drop(r.stdin.take());
        let exited = wait_for(DEADLINE, || r.child.try_wait().ok().flatten());
        if exited.is_none() {
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
        if wait_for(DEADLINE, || (!self.is_mounted()).then_some(())).is_none() {
            // Still there (the process died without unmounting): detach it.
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&self.mountpoint)
                .status();
        }
    }

    /// Whether the mount point is mounted (per `/proc/self/mountinfo`).
    pub fn is_mounted(&self) -> bool {
        let Ok(canon) = self.mountpoint.canonicalize() else {
            return false;
        };
        let target = canon.to_string_lossy().to_string();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(target.as_str()))
    }

    /// Cuts the power: every byte and name not fsynced is dropped, then
    /// the file system is unmounted (so the kernel's cache of it goes
    /// too). Whatever had files open on it must be dead already.
    pub fn cut(&mut self) -> CutReport {
        let answer = self.command("cut");
        let report = answer.as_deref().and_then(CutReport::parse);
        let report = report.unwrap_or_else(|| {
            panic!(
                "powerfs answered {answer:?} to cut; its log: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            )
        });
        assert_eq!(
            report.errors,
            0,
            "powerfs could not roll everything back; its log: {}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
        assert!(!self.is_mounted(), "still mounted after the cut");
        report
    }

    /// Cuts the power and mounts again.
    pub fn cut_and_remount(&mut self) -> CutReport {
        let report = self.cut();
        self.remount();
        report
    }

    /// Unmounts cleanly, keeping everything written.
    pub fn unmount(&mut self) {
        let answer = self.command("unmount");
        assert_eq!(answer.as_deref(), Some("unmounted"), "powerfs unmount");
    }
}

impl Drop for PowerFs {
    fn drop(&mut self) {
        // End of input is a clean unmount; `reap` forces it past the
        // deadline.
        self.reap();
    }
}
