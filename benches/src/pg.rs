//! Scenario 8, the peer baseline: PostgreSQL logical replication of the same
//! rows between two local clusters on loopback (publication/subscription),
//! measured like scenario 3: a backlog accumulated while the subscription
//! is disabled, then the time from `ENABLE` until the subscriber holds every
//! row. Both clusters run with PostgreSQL's durable defaults (`fsync`,
//! `synchronous_commit = on`).
//!
//! PostgreSQL comes from Debian's packages (`scripts/bench.sh` installs
//! them); as root, its programs run as the `postgres` user.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::Throughput;
use crate::data::{customer_fields, customer_key};

/// What the baseline measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Baseline {
    /// PostgreSQL's version line.
    pub version: String,
    /// Loading the backlog at the publisher (COPY, one transaction per chunk).
    pub load: Throughput,
    /// From `ALTER SUBSCRIPTION … ENABLE` until the subscriber holds every row.
    pub replication: Throughput,
}

/// The newest `/usr/lib/postgresql/*/bin` with `initdb`.
pub fn bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, b)| b)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// One local PostgreSQL cluster; stopped when dropped.
struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
}

fn command(bin: &Path, program: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(program));
        c
    } else {
        Command::new(bin.join(program))
    }
}

fn checked(what: &str, out: std::io::Result<Output>) -> Result<Output> {
    let out = out.with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

impl Cluster {
    fn create(bin: &Path, root: &Path, name: &str, port: u16) -> Result<Self> {
        let dir = root.join(name);
        checked(
            "initdb",
            command(bin, "initdb")
                .args([
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--no-instructions",
                ])
                .arg("-D")
                .arg(&dir)
                .output(),
        )?;
        let c = Self {
            bin: bin.to_path_buf(),
            dir,
            port,
        };
        let opts = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} \
             -c wal_level=logical -c max_wal_size=8GB -c shared_buffers=256MB",
            root.display()
        );
        checked(
            "pg_ctl start",
            command(bin, "pg_ctl")
                .arg("-D")
                .arg(&c.dir)
                .arg("-l")
                .arg(root.join(format!("{name}.log")))
                .args(["-o", &opts, "-w", "start"])
                .output(),
        )?;
        Ok(c)
    }

    fn psql(&self) -> Command {
        let mut c = command(&self.bin, "psql");
        c.args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
        ])
        .args(["-U", "postgres", "-d", "postgres", "-p"])
        .arg(self.port.to_string());
        c
    }

    fn sql(&self, sql: &str) -> Result<String> {
        let out = checked(
            &format!("psql -c {sql:?}"),
            self.psql().args(["-c", sql]).output(),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn run_file(&self, file: &Path) -> Result<()> {
        checked("psql -f", self.psql().arg("-f").arg(file).output()).map(|_| ())
    }

    fn wait(&self, sql: &str, want: &str, timeout: Duration, poll: Duration) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.sql(sql)? == want {
                return Ok(Instant::now());
            }
            if Instant::now() > deadline {
                bail!(
                    "PostgreSQL on port {}: {sql:?} did not become {want:?}",
                    self.port
                );
            }
            std::thread::sleep(poll);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = command(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(&self.dir)
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

/// Writes `n` rows as one `COPY` per `chunk` rows (each its own transaction,
/// like tiersync's one durable group per NDJSON request).
fn copy_script(path: &Path, n: u64, chunk: usize) -> Result<u64> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut bytes = 0u64;
    for from in (0..n).step_by(chunk.max(1)) {
        writeln!(f, "COPY customer (key, doc) FROM STDIN;")?;
        for i in from..(from + chunk as u64).min(n) {
            let key = customer_key("hangzhou", i);
            // COPY text format: backslash is the only escape our JSON needs.
            let doc = customer_fields("hangzhou", i)
                .to_string()
                .replace('\\', "\\\\");
            bytes += (key.len() + doc.len()) as u64;
            writeln!(f, "{key}\t{doc}")?;
        }
        writeln!(f, "\\.")?;
    }
    f.flush()?;
    Ok(bytes)
}

/// Runs the baseline with `n` rows.
pub fn run(n: u64, chunk: usize) -> Result<Baseline> {
    let bin = bin_dir().context(
        "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb); \
         scripts/bench.sh installs it, or pass --no-pg",
    )?;
    let root = tempfile::Builder::new().prefix("tiersync-pg-").tempdir()?;
    if is_root() {
        checked(
            "chown",
            Command::new("chown")
                .args(["postgres:postgres"])
                .arg(root.path())
                .output(),
        )?;
    }
    let (p1, p2) = (
        tiersync::deploygen::free_port()?,
        tiersync::deploygen::free_port()?,
    );
    let publisher = Cluster::create(&bin, root.path(), "publisher", p1)?;
    let subscriber = Cluster::create(&bin, root.path(), "subscriber", p2)?;
    let version = publisher.sql("SELECT version()")?;
    let table = "CREATE TABLE customer (key text PRIMARY KEY, doc jsonb NOT NULL)";
    publisher.sql(table)?;
    subscriber.sql(table)?;
    publisher.sql("CREATE PUBLICATION bench FOR TABLE customer")?;
    subscriber.sql(&format!(
        "CREATE SUBSCRIPTION bench CONNECTION 'host=127.0.0.1 port={p1} user=postgres dbname=postgres' PUBLICATION bench"
    ))?;
    // The (empty) initial table copy done, stop applying: what the
    // publisher writes now is the backlog.
    let long = Duration::from_secs(120);
    subscriber.wait(
        "SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'",
        "0",
        long,
        Duration::from_millis(50),
    )?;
    subscriber.sql("ALTER SUBSCRIPTION bench DISABLE")?;
    subscriber.wait(
        "SELECT count(*) FROM pg_stat_subscription WHERE pid IS NOT NULL",
        "0",
        long,
        Duration::from_millis(50),
    )?;

    let script = root.path().join("load.sql");
    let bytes = copy_script(&script, n, chunk)?;
    if is_root() {
        checked(
            "chown",
            Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&script)
                .output(),
        )?;
    }
    let t0 = Instant::now();
    publisher.run_file(&script)?;
    let load = Throughput::new(n, bytes, t0.elapsed());

    let t0 = Instant::now();
    subscriber.sql("ALTER SUBSCRIPTION bench ENABLE")?;
    let done = subscriber.wait(
        "SELECT count(*) FROM customer",
        &n.to_string(),
        Duration::from_secs(600 + n / 500),
        Duration::from_millis(20),
    )?;
    Ok(Baseline {
        version,
        load,
        replication: Throughput::new(n, bytes, done - t0),
    })
}
