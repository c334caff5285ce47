//! Peak resident memory of node processes, sampled from `/proc`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Current resident set of `pid` in bytes (`VmRSS`), if it is running.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Samples the RSS of named processes every 20 ms until finished.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<BTreeMap<String, u64>>,
}

impl Sampler {
    /// Starts sampling `procs` (name, pid).
    pub fn start(procs: Vec<(String, u32)>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peak: BTreeMap<String, u64> = BTreeMap::new();
            loop {
                for (name, pid) in &procs {
                    if let Some(b) = rss_bytes(*pid) {
                        let p = peak.entry(name.clone()).or_default();
                        *p = (*p).max(b);
                    }
                }
                if flag.load(Ordering::Relaxed) {
                    return peak;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Self { stop, handle }
    }

    /// Stops sampling; the peak RSS in bytes of each process seen.
    pub fn finish(self) -> BTreeMap<String, u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn samples_this_process() {
        let me = std::process::id();
        assert!(rss_bytes(me).unwrap() > 0);
        let s = Sampler::start(vec![("me".into(), me)]);
        let peak = s.finish();
        assert!(peak["me"] > 0);
    }
}
