//! Aggregates on a 3-tier topology: generated data at every city, updates,
//! deletes, concurrent edits of one record in two provinces, and batches
//! re-delivered after a province is killed mid-stream. Every aggregate at
//! every node must equal a from-scratch recomputation over the raw data its
//! subtree wrote; private items must stay at their city while their counts
//! are right at province and national.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is the test failure report

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value as Json, json};
use tiersync::deploygen::Spec;
use tiersync_protocol::aggregate::{Compiled, GroupKey, SCALE};
use tiersync_protocol::policy::{Measure, Replicate};
use tiersync_protocol::{Item, Tier};
use tiersync_tests::cluster::{Cluster, Items};
use tiersync_tests::example_policy;

/// The expected rows of `agg` at node `id`, from the cities' raw data.
fn expected(
    c: &Cluster,
    cities: &BTreeMap<String, Items>,
    agg: &Compiled,
    id: &str,
) -> BTreeMap<GroupKey, Vec<i128>> {
    let policy = example_policy();
    let private = policy.categories[&agg.source].replicate == Replicate::Local;
    let mut items: Vec<Item> = Vec::new();
    if private {
        // Each city's groups: all of them at the city itself, elsewhere
        // only those of at least privacy.min_group_size items.
        let count_at = agg.count_index().expect("a private aggregate counts");
        let k = i128::from(policy.privacy.min_group_size);
        let mut rows: BTreeMap<GroupKey, Vec<i128>> = BTreeMap::new();
        for city in c.cities_below(id) {
            let own: Vec<Item> = cities[&city]
                .iter()
                .filter(|(k, _)| k.0 == agg.source)
                .map(|(_, i)| i.clone())
                .collect();
            for (g, v) in sum_rows(agg, &own) {
                if city == id || v[count_at] >= k {
                    let acc = rows.entry(g).or_insert_with(|| vec![0; v.len()]);
                    acc.iter_mut().zip(&v).for_each(|(a, b)| *a += b);
                }
            }
        }
        rows.retain(|_, v| v.iter().any(|x| *x != 0));
        return rows;
    } else {
        let mut merged: Items = Items::new();
        for city in c.cities_below(id) {
            for (k, item) in cities[&city].iter().filter(|(k, _)| k.0 == agg.source) {
                match merged.get_mut(k) {
                    Some(m) => {
                        m.merge(item);
                    }
                    None => {
                        merged.insert(k.clone(), item.clone());
                    }
                }
            }
        }
        items.extend(merged.into_values());
    }
    let mut rows = sum_rows(agg, &items);
    rows.retain(|_, v| v.iter().any(|x| *x != 0));
    rows
}

/// `agg`'s rows over `items`.
fn sum_rows(agg: &Compiled, items: &[Item]) -> BTreeMap<GroupKey, Vec<i128>> {
    let mut rows: BTreeMap<GroupKey, Vec<i128>> = BTreeMap::new();
    for item in items {
        if let Some((g, v)) = agg.contribution(item).expect("every value within range") {
            let acc = rows.entry(g).or_insert_with(|| vec![0; v.len()]);
            acc.iter_mut().zip(&v).for_each(|(a, b)| *a += b);
        }
    }
    rows
}

fn as_json(agg: &Compiled, rows: &BTreeMap<GroupKey, Vec<i128>>) -> Vec<Json> {
    rows.iter()
        .map(|(g, v)| {
            let group: BTreeMap<&str, Option<&str>> = agg
                .dim_names
                .iter()
                .map(String::as_str)
                .zip(g.iter().map(|x| x.as_deref()))
                .collect();
            let values: BTreeMap<&str, Json> = agg
                .measure_names
                .iter()
                .map(String::as_str)
                .zip(agg.measures.iter().zip(v).map(|(m, v)| match m {
                    Measure::Count => json!(*v as i64),
                    Measure::Sum(_) => json!(*v as f64 / SCALE as f64),
                }))
                .collect();
            json!({"group": group, "values": values})
        })
        .collect()
}

fn load(c: &Cluster, city: &str, customers: usize) {
    for (category, lines) in tiersync::demo::city_data(city, customers, 7) {
        let r = c.bulk(city, category, &lines);
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
}

#[test]
fn aggregates_match_a_recomputation_at_every_node() {
    let mut c = Cluster::new(&Spec::default());
    c.start_all();
    let cities = c.cities();
    for city in &cities {
        load(&c, city, 30);
    }
    // Kill a province while its batches are in flight: unacknowledged batches
    // are delivered again after the restart.
    c.kill("zhejiang");
    load(&c, &cities[0], 35);
    c.start("zhejiang");
    for city in &cities {
        // Updates move items between groups; deletes take them out.
        for i in 0..5 {
            let key = format!("{city}-c{i:06}");
            assert_eq!(
                c.send(
                    "PATCH",
                    city,
                    &format!("/v1/records/customer/{key}"),
                    &json!({"segment": "diamond"})
                )
                .status,
                200
            );
        }
        for i in 5..8 {
            assert_eq!(
                c.send(
                    "DELETE",
                    city,
                    &format!("/v1/records/customer/{city}-c{i:06}"),
                    &json!(null)
                )
                .status,
                200
            );
        }
        let opps = c.get(city, "/v1/records/opportunity?limit=4").body;
        for item in opps["items"].as_array().unwrap() {
            let key = item["key"].as_str().unwrap();
            assert_eq!(
                c.send(
                    "PATCH",
                    city,
                    &format!("/v1/records/opportunity/{key}"),
                    &json!({"stage": "won"})
                )
                .status,
                200
            );
        }
        let acts = c.get(city, "/v1/records/service_activity?limit=2").body;
        for item in acts["items"].as_array().unwrap() {
            let key = item["key"].as_str().unwrap();
            assert_eq!(
                c.send(
                    "DELETE",
                    city,
                    &format!("/v1/records/service_activity/{key}"),
                    &json!(null)
                )
                .status,
                200
            );
        }
    }
    // One customer edited concurrently in two provinces counts once.
    let (a, b) = (&cities[0], &cities[2]);
    c.send(
        "PUT",
        a,
        "/v1/records/customer/shared-9",
        &json!({"segment": "gold"}),
    );
    c.send(
        "PUT",
        b,
        "/v1/records/customer/shared-9",
        &json!({"segment": "silver"}),
    );
    assert!(
        c.wait_converged(Duration::from_secs(60)),
        "did not converge"
    );

    let policy = example_policy();
    let aggs = Compiled::all(&policy);
    assert_eq!(aggs.len(), 4);
    let listed = c.get("national", "/v1/aggregates").body;
    assert_eq!(listed.as_array().unwrap().len(), 4);
    let mut seen: BTreeMap<(String, String), Json> = BTreeMap::new();
    for n in &c.deployment.nodes {
        for agg in &aggs {
            let r = c.get(n.id.as_str(), &format!("/v1/aggregates/{}", agg.name));
            assert_eq!(r.status, 200, "{:?}", r.body);
            seen.insert((n.id.to_string(), agg.name.clone()), r.body["rows"].clone());
        }
    }
    // Drill-down: national → zhejiang narrows to zhejiang's cities.
    let drilled = c
        .get(
            "national",
            "/v1/aggregates/billing_by_city_month?drill=zhejiang&group_by=origin",
        )
        .body;
    let origins: Vec<&str> = drilled["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["group"]["origin"].as_str().unwrap())
        .collect();
    assert!(
        !origins.is_empty()
            && origins
                .iter()
                .all(|o| c.cities_below("zhejiang").iter().any(|c| c == o)),
        "{drilled}"
    );
    let csv = c.get(
        "national",
        "/v1/aggregates/billing_by_city_month?format=csv",
    );
    assert_eq!(csv.status, 200);

    c.stop_all();
    let raw: BTreeMap<String, Items> = cities
        .iter()
        .map(|city| (city.clone(), c.read_store(city)))
        .collect();
    let mut checked = 0;
    for n in &c.deployment.nodes {
        for agg in &aggs {
            let want = as_json(agg, &expected(&c, &raw, agg, n.id.as_str()));
            let have = seen[&(n.id.to_string(), agg.name.clone())]
                .as_array()
                .unwrap()
                .clone();
            assert_eq!(have, want, "{} at {}", agg.name, n.id);
            checked += 1;
        }
        if n.tier != Tier::City {
            let items = c.read_store(n.id.as_str());
            assert!(
                items.keys().all(|k| policy
                    .categories
                    .get(&k.0)
                    .is_none_or(|cat| cat.replicate == Replicate::Up)),
                "a private item reached {}",
                n.id
            );
        }
    }
    assert_eq!(checked, 7 * 4);
    // The private counts are really there at the cities (above them only
    // the groups of at least privacy.min_group_size items, as compared;
    // `a_group_under_the_privacy_threshold_is_published_by_nobody` shows
    // them published).
    let city_opps = &seen[&(
        c.cities()[0].clone(),
        "opportunities_by_city_stage_month".to_string(),
    )];
    assert!(!city_opps.as_array().unwrap().is_empty());
}

/// A city whose data directory is wiped starts over: every tier's private
/// aggregates then equal what the city holds now, not a mix of its old and
/// new totals (its new shares replace the old ones everywhere).
#[test]
fn private_aggregates_follow_a_wiped_city() {
    let mut c = Cluster::new(&Spec {
        provinces: 1,
        cities_per_province: 2,
        ..Spec::default()
    });
    c.start_all();
    let cities = c.cities();
    for city in &cities {
        load(&c, city, 30);
    }
    assert!(
        c.wait_converged(Duration::from_secs(60)),
        "did not converge"
    );
    let wiped = &cities[0];
    c.stop(wiped);
    let dir = c.deployment.node(wiped).unwrap().data_dir.clone();
    std::fs::remove_dir_all(&dir).unwrap();
    c.start(wiped);
    // Fewer, different private items than before.
    for (category, lines) in tiersync::demo::city_data(wiped, 6, 11) {
        let r = c.bulk(wiped, category, &lines);
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    assert!(
        c.wait_converged(Duration::from_secs(60)),
        "did not converge"
    );
    let policy = example_policy();
    let private: Vec<Compiled> = Compiled::all(&policy)
        .into_iter()
        .filter(|a| policy.categories[&a.source].replicate == Replicate::Local)
        .collect();
    assert!(!private.is_empty());
    let mut seen = BTreeMap::new();
    for n in &c.deployment.nodes {
        for agg in &private {
            let r = c.get(n.id.as_str(), &format!("/v1/aggregates/{}", agg.name));
            assert_eq!(r.status, 200, "{:?}", r.body);
            seen.insert((n.id.to_string(), agg.name.clone()), r.body["rows"].clone());
        }
    }
    c.stop_all();
    let raw: BTreeMap<String, Items> = cities
        .iter()
        .map(|city| (city.clone(), c.read_store(city)))
        .collect();
    for n in &c.deployment.nodes {
        for agg in &private {
            let want = as_json(agg, &expected(&c, &raw, agg, n.id.as_str()));
            let have = seen[&(n.id.to_string(), agg.name.clone())].clone();
            assert_eq!(have, Json::Array(want), "{} at {}", agg.name, n.id);
        }
    }
}

/// Case 6 of issue 15, the governance test: a city with 3 opportunities in a
/// group publishes nothing for it; with 5 it publishes; the province's and
/// national's totals of the published groups equal the cities'.
#[test]
fn a_group_under_the_privacy_threshold_is_published_by_nobody() {
    let mut c = Cluster::new(&Spec {
        provinces: 1,
        cities_per_province: 2,
        ..Spec::default()
    });
    c.start_all();
    let cities = c.cities();
    let (small, big) = (&cities[0], &cities[1]);
    let policy = example_policy();
    assert_eq!(policy.privacy.min_group_size, 5);
    let opp = |city: &str, k: usize, stage: &str| {
        let r = c.send(
            "PUT",
            city,
            &format!("/v1/records/opportunity/{city}-{stage}-{k}"),
            &json!({"customer_id": "c-1", "stage": stage, "expected_value": 100, "expected_close": "2026-11-20"}),
        );
        assert_eq!(r.status, 200, "{:?}", r.body);
    };
    for k in 0..3 {
        opp(small, k, "won");
    }
    for k in 0..5 {
        opp(big, k, "won");
    }
    assert!(
        c.wait_converged(Duration::from_secs(60)),
        "did not converge"
    );
    let rows = |id: &str| {
        let r = c.get(id, "/v1/aggregates/opportunities_by_city_stage_month");
        assert_eq!(r.status, 200, "{:?}", r.body);
        r.body["rows"].as_array().cloned().unwrap_or_default()
    };
    let origins = |rows: &[Json]| -> Vec<(String, i64)> {
        rows.iter()
            .map(|r| {
                (
                    r["group"]["origin"].as_str().unwrap().to_string(),
                    r["values"]["count"].as_i64().unwrap(),
                )
            })
            .collect()
    };
    // The small city sees its own 3; above it, only the big city's 5.
    assert_eq!(origins(&rows(small)), vec![(small.clone(), 3)]);
    for top in ["zhejiang", "national"] {
        assert_eq!(origins(&rows(top)), vec![(big.clone(), 5)], "at {top}");
    }
    // Two more at the small city: 5, published, and the totals above equal
    // the cities' own.
    for k in 3..5 {
        opp(small, k, "won");
    }
    assert!(
        c.wait_converged(Duration::from_secs(60)),
        "did not converge"
    );
    for top in ["zhejiang", "national"] {
        let mut have = origins(&rows(top));
        have.sort();
        let mut want = vec![(small.clone(), 5), (big.clone(), 5)];
        want.sort();
        assert_eq!(have, want, "at {top}");
        let sums: f64 = rows(top)
            .iter()
            .map(|r| r["values"]["sum(expected_value)"].as_f64().unwrap())
            .sum();
        assert_eq!(sums, 1000.0, "at {top}");
    }
}
