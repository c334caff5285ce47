//! Scenarios 2–6 on real `tiersync run` processes on loopback: one city
//! (hangzhou) under one province (zhejiang) under national, every node with
//! `durability = "fsync"`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tiersync::client::{Client, ClientError, metric_value};
use tiersync::config::Durability;
use tiersync::deploygen::Spec;
use tiersync_tests::cluster::Cluster;

use crate::data::{customer_fields, ndjson};
use crate::rss::Sampler;
use crate::{Latency, Throughput};

const CITY: &str = "hangzhou";
const PROVINCE: &str = "zhejiang";
const NATIONAL: &str = "national";

/// Knobs of the node scenarios.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Options {
    /// Items per NDJSON request (one durable group at the city).
    pub chunk: usize,
    /// Concurrent bulk clients.
    pub ingest_clients: usize,
    /// Single writes of the convergence-latency scenario.
    pub latency_writes: usize,
    /// Their rate, writes per second.
    pub latency_rate: f64,
}

/// Backlog replication (scenario 3) or catch-up (scenario 5).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Propagation {
    /// Items in the backlog.
    pub items: u64,
    /// From the start of the measured phase until the city's link to the
    /// province is up again (reconnect backoff; catch-up only).
    pub reconnect_s: Option<f64>,
    /// Until the city reports zero lag to the province.
    pub city_zero_lag_s: f64,
    /// Until the province holds all (its watermark of the city).
    pub province_s: f64,
    /// Until national holds all.
    pub national_s: f64,
    /// `items / national_s`.
    pub items_per_s: f64,
    /// Peak RSS of each node during the phase, bytes.
    pub peak_rss: BTreeMap<String, u64>,
}

/// Everything measured at one backlog size.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SizeRun {
    /// Backlog size.
    pub n: u64,
    /// Scenario 2: NDJSON bulk ingest at the city.
    pub ingest: Throughput,
    /// Scenario 3.
    pub replication: Propagation,
    /// Scenario 4 (at the first size only).
    pub convergence: Option<Convergence>,
    /// Scenario 5.
    pub catchup: Propagation,
}

/// Scenario 4.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Convergence {
    /// Writes per second offered.
    pub rate: f64,
    /// From sending the PUT at the city until a GET at the province finds it.
    pub province: Latency,
    /// Until a GET at national finds it.
    pub national: Latency,
}

fn client(c: &Cluster, id: &str) -> Result<Client> {
    Ok(Client::with_credentials(
        &format!("http://{}", c.api(id)),
        Duration::from_secs(120),
        &tiersync::client::Credentials::token(c.token(id)),
    )?)
}

fn pids(c: &Cluster) -> Vec<(String, u32)> {
    [CITY, PROVINCE, NATIONAL]
        .iter()
        .filter_map(|id| c.pid(id).map(|p| (id.to_string(), p)))
        .collect()
}

/// The city's last changelog sequence number (what a watermark must reach).
fn last_seq(city: &Client) -> Result<u64> {
    city.status()?["last_seq"]
        .as_u64()
        .context("status has no last_seq")
}

/// Polls a node's `/metrics` until `series` reaches `target`.
fn wait_metric(
    cl: &Client,
    name: &str,
    labels: &[(&str, &str)],
    done: impl Fn(f64) -> bool,
    deadline: Instant,
) -> Result<Instant> {
    loop {
        let text = cl.metrics()?;
        if metric_value(&text, name, labels).is_some_and(&done) {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!(
                "{name}{labels:?} at {} did not reach its target in time",
                cl.base_url()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Times, from `t0`, the city's link to the province coming up (if asked),
/// the city's lag reaching zero, and the province's and national's
/// watermarks of the city reaching `seq`.
fn propagation(
    c: &Cluster,
    items: u64,
    seq: u64,
    t0: Instant,
    reconnect: bool,
) -> Result<Propagation> {
    let deadline = t0 + Duration::from_secs(600 + items / 500);
    let sampler = Sampler::start(pids(c));
    let (city, prov, nat) = (client(c, CITY)?, client(c, PROVINCE)?, client(c, NATIONAL)?);
    let reached = |v: f64| v >= seq as f64;
    let reconnect_s = if reconnect {
        let up = wait_metric(
            &city,
            "tiersync_link_up",
            &[("link", "parent")],
            |v| v >= 1.0,
            deadline,
        )?;
        Some((up - t0).as_secs_f64())
    } else {
        None
    };
    // The three conditions are monotonic: waiting for them in turn times
    // each one (to the polling interval).
    let p = wait_metric(
        &prov,
        "tiersync_origin_watermark_seq",
        &[("origin", CITY)],
        reached,
        deadline,
    )?;
    let z = wait_metric(
        &city,
        "tiersync_uplink_lag_records",
        &[("peer", PROVINCE)],
        |v| v == 0.0,
        deadline,
    )?;
    let n = wait_metric(
        &nat,
        "tiersync_origin_watermark_seq",
        &[("origin", CITY)],
        reached,
        deadline,
    )?;
    let national_s = (n - t0).as_secs_f64();
    Ok(Propagation {
        items,
        reconnect_s,
        city_zero_lag_s: (z - t0).as_secs_f64(),
        province_s: (p - t0).as_secs_f64(),
        national_s,
        items_per_s: items as f64 / national_s.max(1e-9),
        peak_rss: sampler.finish(),
    })
}

/// Scenario 2: posts customers `from..from+n` to the city in NDJSON
/// requests of `chunk` lines from `clients` threads.
fn bulk_ingest(city: &Client, from: u64, n: u64, o: &Options) -> Result<Throughput> {
    let bodies: Vec<Vec<u8>> = (from..from + n)
        .step_by(o.chunk.max(1))
        .map(|a| ndjson(CITY, a, (a + o.chunk as u64).min(from + n)))
        .collect();
    let bytes: u64 = bodies.iter().map(|b| b.len() as u64).sum();
    let next = AtomicUsize::new(0);
    let t0 = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = (0..o.ingest_clients.max(1))
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(body) = bodies.get(i) else {
                            return Ok(());
                        };
                        let r = city.bulk("customer", body)?;
                        if r.rejected > 0 {
                            bail!(
                                "bulk request {i}: {} lines rejected: {:?}",
                                r.rejected,
                                r.errors.first()
                            );
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("an ingest thread panicked"))??;
        }
        Ok(())
    })?;
    Ok(Throughput::new(n, bytes, t0.elapsed()))
}

/// Scenario 4: single PUTs at the city at `rate`; two threads poll the
/// province and national for each key in write order.
fn convergence(c: &Cluster, o: &Options) -> Result<Convergence> {
    let city = client(c, CITY)?;
    let watch = |id: &str, rx: mpsc::Receiver<(String, Instant)>| -> Result<_> {
        let cl = client(c, id)?;
        Ok(std::thread::spawn(move || -> Result<Vec<Duration>> {
            let mut lat = Vec::new();
            for (key, t0) in rx {
                let deadline = t0 + Duration::from_secs(60);
                loop {
                    match cl.get("customer", &key) {
                        Ok(_) => break,
                        Err(ClientError::Api { status: 404, .. }) if Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_micros(500));
                        }
                        Err(e) => bail!("{key} at {}: {e}", cl.base_url()),
                    }
                }
                lat.push(t0.elapsed());
            }
            Ok(lat)
        }))
    };
    let (ptx, prx) = mpsc::channel();
    let (ntx, nrx) = mpsc::channel();
    let pw = watch(PROVINCE, prx)?;
    let nw = watch(NATIONAL, nrx)?;
    let interval = Duration::from_secs_f64(1.0 / o.latency_rate.max(0.001));
    let start = Instant::now();
    for i in 0..o.latency_writes {
        let key = format!("latency-{i:06}");
        let doc = serde_json::json!({"fields": customer_fields(CITY, i as u64)}).to_string();
        let t0 = Instant::now();
        city.put("customer", &key, &doc)?;
        let _ = ptx.send((key.clone(), t0));
        let _ = ntx.send((key, t0));
        let next = start + interval * (i as u32 + 1);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    drop((ptx, ntx));
    let join = |h: std::thread::JoinHandle<Result<Vec<Duration>>>| {
        h.join()
            .map_err(|_| anyhow::anyhow!("a latency watcher panicked"))?
    };
    Ok(Convergence {
        rate: o.latency_rate,
        province: Latency::of(join(pw)?),
        national: Latency::of(join(nw)?),
    })
}

/// Scenarios 2–5 at backlog size `n`, on a fresh deployment.
pub fn run_size(n: u64, o: &Options, with_convergence: bool) -> Result<SizeRun> {
    let mut c = Cluster::new(&Spec {
        provinces: 1,
        cities_per_province: 1,
        durability: Durability::Fsync,
    });
    // Per-batch debug lines would cost more than the benchmark measures.
    c.log_filter = "info".into();

    // 2. Ingest at the city while it has no parent: the backlog of 3.
    c.start(CITY);
    let city = client(&c, CITY)?;
    let ingest = bulk_ingest(&city, 0, n, o)?;
    let seq = last_seq(&city)?;

    // 3. Parents up, then the city with its backlog.
    c.stop(CITY);
    c.start(NATIONAL);
    c.start(PROVINCE);
    let t0 = Instant::now();
    c.start(CITY);
    let replication = propagation(&c, n, seq, t0, false)?;

    // 4. Steady single writes.
    let convergence = if with_convergence {
        Some(convergence(&c, o)?)
    } else {
        None
    };

    // 5. The province offline while the city writes n more; then back.
    c.stop(PROVINCE);
    let city = client(&c, CITY)?;
    bulk_ingest(&city, n, n, o)?;
    let seq = last_seq(&city)?;
    let t0 = Instant::now();
    c.start(PROVINCE);
    let catchup = propagation(&c, n, seq, t0, true)?;
    c.stop_all();
    Ok(SizeRun {
        n,
        ingest,
        replication,
        convergence,
        catchup,
    })
}
