//! Synthetic benchmark items: ~300-byte customer records, the same for
//! tiersync, the raw RocksDB ceiling and the PostgreSQL baseline.

use serde_json::{Value as Json, json};

/// The fields of customer number `i` of `city` (deterministic).
pub fn customer_fields(city: &str, i: u64) -> Json {
    // A cheap deterministic mix: the data only needs realistic sizes.
    let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i >> 7);
    let pick = |n: u64, shift: u32| ((h >> shift) % n) as usize;
    const SEGMENTS: [&str; 4] = ["platinum", "gold", "silver", "bronze"];
    const PLANS: [&str; 4] = ["basic-38", "family-88", "business-128", "premium-199"];
    const STREETS: [&str; 4] = [
        "Wensan Road",
        "Jiefang Road",
        "Zhongshan Road",
        "Binjiang Ave",
    ];
    json!({
        "name": format!("Customer {i:08}"),
        "phone": format!("1{:010}", h % 10_000_000_000),
        "email": format!("customer{i:08}@mail.example.cn"),
        "segment": SEGMENTS[pick(4, 3)],
        "plan": PLANS[pick(4, 9)],
        "city": city,
        "address": format!("{} No. {}, {} district", STREETS[pick(4, 15)], h % 999 + 1, city),
        "opened": format!("20{:02}-{:02}-{:02}", 15 + pick(11, 20), 1 + pick(12, 24), 1 + pick(28, 28)),
        "status": if pick(10, 33) == 0 { "suspended" } else { "active" },
        "credit_limit": 500 + (h % 20) * 250,
        "monthly_spend": ((h >> 40) % 30_000) as f64 / 100.0,
        "channel": if pick(2, 45) == 0 { "store" } else { "online" },
    })
}

/// The key of customer number `i` of `city`.
pub fn customer_key(city: &str, i: u64) -> String {
    format!("{city}-c{i:09}")
}

/// NDJSON lines (`{"key":…,"fields":…}`) of customers `from..to` of `city`.
pub fn ndjson(city: &str, from: u64, to: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(((to - from) * 360) as usize);
    for i in from..to {
        let line = json!({"key": customer_key(city, i), "fields": customer_fields(city, i)});
        out.extend_from_slice(line.to_string().as_bytes());
        out.push(b'\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn records_are_about_300_bytes_and_deterministic() {
        let a = ndjson("hangzhou", 0, 100);
        assert_eq!(a, ndjson("hangzhou", 0, 100));
        let per_line = a.len() / 100;
        assert!((250..450).contains(&per_line), "{per_line} bytes per line");
        let doc = customer_fields("hangzhou", 7).to_string();
        assert!(
            (250..400).contains(&doc.len()),
            "{} bytes: {doc}",
            doc.len()
        );
    }
}
