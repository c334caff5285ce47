//! The conflict ledger on real processes: two cities of one province write
//! one bill key with different amounts, a city of another province collides
//! with one of them on a second key; the province and national list the
//! versions that lost (with both origins), the CLI prints them, and
//! concurrent record edits by two cities are counted as overwrites.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is the test failure report

use std::process::Command;
use std::time::Duration;

use serde_json::{Value as Json, json};
use tiersync::deploygen::Spec;
use tiersync_protocol::Tier;
use tiersync_tests::cluster::Cluster;
use tiersync_tests::{wait_for, workspace_bin};

const CONVERGE: Duration = Duration::from_secs(60);

fn bill(c: &Cluster, city: &str, key: &str, amount: i64) {
    let r = c.send(
        "PUT",
        city,
        &format!("/v1/records/billing/{key}"),
        &json!({"customer_id": "c-1", "amount": amount, "billed_at": "2026-11-01"}),
    );
    assert_eq!(r.status, 200, "{:?}", r.body);
}

/// The conflicts `node` lists for `query`, once there are `n` of them.
fn wait_conflicts(c: &Cluster, node: &str, query: &str, n: usize) -> Vec<Json> {
    let path = format!("/v1/conflicts{query}");
    let got = wait_for(CONVERGE, || {
        let r = c.get_opt(node, &path)?;
        let list = r.body["conflicts"].as_array()?.clone();
        (r.status == 200 && list.len() == n).then_some(list)
    });
    got.unwrap_or_else(|| panic!("{node}: {path} never listed {n}: {:?}", c.get(node, &path)))
}

fn origin(v: &Json) -> &str {
    v["stamp"]["origin"].as_str().unwrap()
}

/// Checks one ledger entry against the two cities that wrote `key` with
/// `amounts`: the loser is one of them, the winner the other, and the
/// winner is what `node` holds (and counts) for the key.
fn check_entry(c: &Cluster, node: &str, e: &Json, key: &str, writers: [(&str, i64); 2]) {
    assert_eq!(
        (e["category"].as_str(), e["key"].as_str()),
        (Some("billing"), Some(key)),
        "{e}"
    );
    let (loser, winner) = (&e["loser"], &e["winner"]);
    let amount = |v: &Json| v["fields"]["amount"].as_i64().unwrap();
    let lost = writers
        .iter()
        .find(|w| w.0 == origin(loser))
        .expect("loser is a writer");
    let kept = writers
        .iter()
        .find(|w| w.0 == origin(winner))
        .expect("winner is a writer");
    assert_ne!(lost.0, kept.0, "{e}");
    assert_eq!((amount(loser), amount(winner)), (lost.1, kept.1), "{e}");
    let item = c.get(node, &format!("/v1/records/billing/{key}"));
    assert_eq!(
        item.body["fields"]["amount"].as_i64(),
        Some(kept.1),
        "{node}: {:?}",
        item.body
    );
}

#[test]
fn conflicts_are_kept_at_every_tier_and_replicate_up() {
    let mut c = Cluster::new(&Spec::default());
    c.start_all();
    let first_of = |tier| {
        let n = c.deployment.nodes.iter().find(|n| n.tier == tier);
        n.map(|n| n.id.to_string()).unwrap()
    };
    let (national, province) = (first_of(Tier::National), first_of(Tier::Province));
    let below = c.cities_below(&province);
    let (a, b) = (below[0].clone(), below[1].clone());
    let far = c.cities().into_iter().find(|x| !below.contains(x)).unwrap();

    // One province sees both versions of b-1; only national sees both of b-2.
    bill(&c, &a, "b-1", 10);
    bill(&c, &b, "b-1", 20);
    bill(&c, &a, "b-2", 30);
    bill(&c, &far, "b-2", 40);
    // Concurrent edits of one customer field: last writer wins, counted.
    for (city, seg) in [(&a, "gold"), (&b, "silver")] {
        let r = c.send(
            "PATCH",
            city,
            "/v1/records/customer/c-1",
            &json!({"seg": seg}),
        );
        assert_eq!(r.status, 200, "{:?}", r.body);
    }

    let at_province = wait_conflicts(&c, &province, "", 1);
    check_entry(&c, &province, &at_province[0], "b-1", [(&a, 10), (&b, 20)]);
    let at_national = wait_conflicts(&c, &national, "", 2);
    let by_key = |list: &[Json], key: &str| {
        list.iter()
            .find(|e| e["key"] == key)
            .cloned()
            .unwrap_or_else(|| panic!("{key} in {list:?}"))
    };
    // b-1 was found at the province and relayed: the same entry, one copy.
    check_entry(
        &c,
        &national,
        &by_key(&at_national, "b-1"),
        "b-1",
        [(&a, 10), (&b, 20)],
    );
    assert_eq!(by_key(&at_national, "b-1")["id"], at_province[0]["id"]);
    check_entry(
        &c,
        &national,
        &by_key(&at_national, "b-2"),
        "b-2",
        [(&a, 30), (&far, 40)],
    );

    // Filters and paging.
    let of_far = wait_conflicts(&c, &national, &format!("?category=billing&origin={far}"), 1);
    assert_eq!(of_far[0]["key"], "b-2");
    let first = c.get(&national, "/v1/conflicts?limit=1");
    let next = first.body["next"]
        .as_str()
        .expect("a next page")
        .to_string();
    let second = c.get(&national, &format!("/v1/conflicts?limit=1&after={next}"));
    assert_eq!(second.body["next"], Json::Null, "{:?}", second.body);
    assert_ne!(
        first.body["conflicts"][0]["id"],
        second.body["conflicts"][0]["id"]
    );
    for (query, status, code) in [
        ("?limit=0", 400, "invalid_query"),
        ("?origin=No%20Such", 400, "invalid_query"),
        ("?colour=red", 400, "invalid_query"),
        ("?category=nope", 404, "unknown_category"),
    ] {
        let r = c.get(&national, &format!("/v1/conflicts{query}"));
        assert_eq!(
            (r.status, r.body["error"]["code"].as_str()),
            (status, Some(code)),
            "{query}"
        );
    }

    // The province merged both customer edits: one overwrite between them.
    let overwrites = wait_for(CONVERGE, || {
        let r = c.get(&province, "/v1/conflicts?category=customer");
        let o = r.body["overwrites"].as_array()?.clone();
        (o.len() == 1).then_some(o)
    })
    .expect("an overwrite summary at the province");
    let o = &overwrites[0];
    let pair = [o["winner"].as_str().unwrap(), o["loser"].as_str().unwrap()];
    assert!(
        pair == [a.as_str(), b.as_str()] || pair == [b.as_str(), a.as_str()],
        "{o}"
    );
    assert_eq!(
        (o["count"].as_u64(), o["examples"][0]["field"].as_str()),
        (Some(1), Some("seg"))
    );
    // Counted in Prometheus just after the summary is durable.
    let counted = wait_for(CONVERGE, || {
        let m = c.get_text(&province, "/metrics");
        m.lines()
            .any(|l| l.starts_with("tiersync_lww_overwrites_total{") && l.ends_with(" 1"))
            .then_some(())
    });
    assert!(counted.is_some(), "{}", c.get_text(&province, "/metrics"));

    // The CLI prints the ledger: key, both origins, both amounts.
    let url = c.url(&national, "");
    let token = c.token(&national);
    let out = Command::new(workspace_bin("tiersync"))
        .args(["conflicts", "--category", "billing", "--node", &url])
        .args(["--token", &token])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run tiersync conflicts");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "b-1",
        "b-2",
        a.as_str(),
        b.as_str(),
        far.as_str(),
        "2 conflict(s)",
    ] {
        assert!(
            stdout.contains(needle),
            "{needle:?} missing from:\n{stdout}"
        );
    }
    let out = Command::new(workspace_bin("tiersync"))
        .args(["conflicts", "--origin", &far, "--json", "--node", &url])
        .args(["--token", &token])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run tiersync conflicts --json");
    let page: Json = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        page["conflicts"].as_array().map(Vec::len),
        Some(1),
        "{page}"
    );
    c.stop_all();
}
