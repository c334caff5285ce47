//! Disk full: a city's data directory lives on a small tmpfs, which a
//! ballast file fills while the city is stopped. After a restart on the
//! nearly full disk the city keeps writing until RocksDB gets ENOSPC; from
//! then on every write gets HTTP 507 `storage_full` with the reason (never a
//! 500, never a hang) while reads and the status go on. When the ballast is
//! deleted RocksDB recovers by itself and writes succeed again; replication
//! resumes; after a clean stop the store opens clean and holds every write
//! ever acknowledged, at the city and at national.
//!
//! Needs root (to mount the tmpfs); without it the test prints why and
//! passes without running.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is the test failure report

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use tiersync::deploygen::Spec;
use tiersync_tests::cluster::{Cluster, Reply, assert_acked_present};
use tiersync_tests::wait_for;

/// Size of the tmpfs. RocksDB resumes after ENOSPC only once the free
/// space is at least its write buffer size (64 MiB by default).
const TMPFS_MB: u64 = 256;
/// Free space left beside the ballast: what the city can still write.
const HEADROOM: u64 = 512 * 1024;
/// Most writes tried before the disk must have filled.
const MAX_WRITES: usize = 20_000;

/// A mounted tmpfs, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `mb` MiB on `dir`; `None` (with the reason
    /// printed) when not root.
    fn mount(dir: &Path, mb: u64) -> Option<Self> {
        let uid = Command::new("id").arg("-u").output().expect("run id -u");
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            eprintln!("diskfull: SKIPPED: mounting a tmpfs needs root");
            return None;
        }
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount -t tmpfs failed as root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(Self(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Still busy (a test failed with the node running): detach it.
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Fills the file system of `path` with a ballast file, leaving
/// [`HEADROOM`] bytes free.
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).expect("create ballast");
    let chunk = vec![0xa5u8; 1 << 20];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) => panic!("writing the ballast: {e}"),
        }
    }
    f.set_len(written.saturating_sub(HEADROOM))
        .expect("shrink ballast");
    f.sync_all().expect("sync ballast");
}

fn put(c: &Cluster, key: &str, n: i64) -> Reply {
    c.send(
        "PUT",
        "hangzhou",
        &format!("/v1/records/customer/{key}"),
        &json!({ "n": n }),
    )
}

/// Asserts a refused write is a 507 `storage_full` naming the reason.
fn assert_storage_full(r: &Reply, key: &str) {
    assert_eq!(r.status, 507, "{key}: {:?}", r.body);
    assert_eq!(r.body["error"]["code"], "storage_full", "{:?}", r.body);
    let msg = r.body["error"]["message"].as_str().unwrap_or("");
    assert!(msg.contains("No space left on device"), "{msg}");
}

#[test]
fn a_full_disk_refuses_writes_with_507_and_recovers_when_space_returns() {
    let mnt = tempfile::tempdir().unwrap();
    let Some(_fs) = Tmpfs::mount(mnt.path(), TMPFS_MB) else {
        return;
    };
    let mut c = Cluster::new(&Spec {
        provinces: 1,
        cities_per_province: 1,
        ..Spec::default()
    });
    c.set_data_dir("hangzhou", &mnt.path().join("hangzhou"));
    c.start_all();
    let mut acked: Vec<(String, i64)> = Vec::new();
    for i in 0..100 {
        let key = format!("before-{i}");
        assert_eq!(put(&c, &key, i).status, 200);
        acked.push((key, i));
    }

    // The disk fills while the city is down; it restarts on what is left.
    c.stop("hangzhou");
    let ballast = mnt.path().join("ballast");
    fill(&ballast);
    c.start("hangzhou");
    let mut first_full = None;
    for i in 0..MAX_WRITES as i64 {
        let key = format!("full-{i}");
        let r = put(&c, &key, i);
        if r.status == 200 {
            acked.push((key, i));
        } else {
            assert_storage_full(&r, &key);
            first_full = Some(i);
            break;
        }
    }
    let first_full = first_full
        .unwrap_or_else(|| panic!("{MAX_WRITES} writes on a full disk were all accepted"));
    // Every write now fails at once, the same way; reads and status go on.
    for i in 0..20 {
        let key = format!("refused-{i}");
        assert_storage_full(&put(&c, &key, i), &key);
    }
    let bulk = c.bulk(
        "hangzhou",
        "customer",
        &[json!({"key": "bulk-refused", "fields": {"n": 1}})],
    );
    assert_eq!(bulk.status, 507, "{:?}", bulk.body);
    assert_eq!(bulk.body["error"]["code"], "storage_full");
    assert_eq!(
        c.get("hangzhou", "/v1/records/customer/before-7").status,
        200
    );
    assert_eq!(c.get("hangzhou", "/v1/status").status, 200);

    // Space returns: RocksDB resumes by itself, new writes succeed.
    std::fs::remove_file(&ballast).expect("delete ballast");
    let freed = Instant::now();
    let mut attempt = 0i64;
    let back = wait_for(Duration::from_secs(60), || {
        attempt += 1;
        let key = format!("retry-{attempt}");
        let r = put(&c, &key, attempt);
        if r.status == 200 {
            acked.push((key, attempt));
            Some(())
        } else {
            assert_storage_full(&r, &key);
            None
        }
    });
    assert!(
        back.is_some(),
        "writes did not resume within 60 s of freeing space; log: {}",
        c.log("hangzhou")
    );
    let recovery = freed.elapsed();
    for i in 0..100 {
        let key = format!("after-{i}");
        assert_eq!(put(&c, &key, i).status, 200, "{key}");
        acked.push((key, i));
    }
    assert!(
        c.wait_complete_at("national", Duration::from_secs(60))
            .is_some(),
        "replication did not resume after the disk recovered"
    );

    // Clean stop, then the stores open clean and hold every acknowledged write.
    let stores = c.assert_tiers_hold_merge_of_subtree();
    for id in ["hangzhou", "zhejiang", "national"] {
        assert_acked_present(&stores[id], &acked, id);
    }
    eprintln!(
        "diskfull: {} writes acknowledged, disk full after {first_full} writes on {} KiB of headroom, \
         every refusal 507 storage_full, writes back {} ms after freeing space, none lost",
        acked.len(),
        HEADROOM / 1024,
        recovery.as_millis()
    );
}
