//! The benchmark runner's scenarios at tiny sizes on real nodes: every
//! figure is produced, and every item of the backlogs reached national (the
//! scenarios wait for national's watermark of the city, and fail if it does
//! not come). Speed is not checked here: that is what the runner reports.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use tiersync_benches::report::{self, Machine, Report};
use tiersync_benches::scenarios::{self, Options};
use tiersync_benches::{aggregate, raw};

#[test]
fn runner_scenarios_produce_every_figure() {
    let options = Options {
        chunk: 100,
        ingest_clients: 2,
        latency_writes: 20,
        latency_rate: 200.0,
    };
    let sizes = [300u64, 600];
    let mut r = Report {
        machine: Machine::here(),
        command: "smoke".into(),
        options: options.clone(),
        raw: sizes.iter().map(|&n| raw::run(n, 100).unwrap()).collect(),
        sizes: sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| scenarios::run_size(n, &options, i == 0).unwrap())
            .collect(),
        aggregate: aggregate::run(3000, 10).unwrap(),
        postgres: None,
        postgres_skipped: Some("smoke test".into()),
        targets: Vec::new(),
    };
    for (s, raw) in r.sizes.iter().zip(&r.raw) {
        assert_eq!(raw.items, s.n);
        assert_eq!(s.ingest.items, s.n);
        assert!(
            s.ingest.bytes > 250 * s.n,
            "~300-byte records: {:?}",
            s.ingest
        );
        for p in [&s.replication, &s.catchup] {
            assert_eq!(p.items, s.n);
            for node in ["hangzhou", "zhejiang", "national"] {
                assert!(
                    p.peak_rss.get(node).is_some_and(|b| *b > 0),
                    "{node}: {p:?}"
                );
            }
        }
    }
    let c = r.sizes[0]
        .convergence
        .as_ref()
        .expect("first size measures convergence");
    assert_eq!((c.province.count, c.national.count), (20, 20));
    assert!(c.province.p50_ms > 0.0 && c.national.p50_ms > 0.0);
    assert!(r.sizes[1].convergence.is_none());
    let agg = r.aggregate.last().unwrap();
    assert_eq!(agg.items, 3000);
    assert_eq!(agg.query.count, 10);
    assert!(agg.rows > 0);

    r.targets = report::targets(&r);
    let names: Vec<&str> = r.targets.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names.len(), 6, "{names:?}");
    // Too few items for the 10 M target, and PostgreSQL was not run.
    assert!(r.targets[4].pass.is_none() && r.targets[5].pass.is_none());
    let md = report::markdown(&r);
    assert!(md.starts_with(report::BEGIN) && md.trim_end().ends_with(report::END));
    assert!(md.contains("| 600 |"), "{md}");
    serde_json::to_string(&r).unwrap();
}
