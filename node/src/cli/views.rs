//! The human views of the API's answers (`--json` prints the answers as
//! they are).

use std::collections::BTreeSet;

use serde_json::{Value as Json, json};

use super::output::{cell, str_of, table};

/// `2024-04-05T19:34:38.901Z by hangzhou` from a stamp view.
pub(super) fn stamp_text(stamp: &Json) -> String {
    if stamp.is_null() {
        return "-".to_string();
    }
    format!("{} by {}", str_of(stamp, "time"), str_of(stamp, "origin"))
}

/// The fields of an item view with their origin and time.
pub(super) fn fields_table(item: &Json) -> String {
    let Some(fields) = item["fields"].as_object().filter(|f| !f.is_empty()) else {
        return "(no fields)\n".to_string();
    };
    let mut t = table(&["field", "value", "origin", "written"]);
    for (name, value) in fields {
        let stamp = &item["meta"]["fields"][name];
        t.add_row(vec![
            name.clone(),
            cell(value),
            str_of(stamp, "origin").to_string(),
            str_of(stamp, "time").to_string(),
        ]);
    }
    format!("{t}\n")
}

/// `tiersync get`: the item's key, kind, last change and fields.
pub(super) fn item_text(item: &Json) -> String {
    let mut out = format!(
        "{}/{} ({})\nupdated {}\n",
        str_of(item, "category"),
        str_of(item, "key"),
        str_of(item, "kind"),
        stamp_text(&item["meta"]["updated"]),
    );
    let base = &item["meta"]["base"];
    if !base.is_null() {
        out += &format!("last {} {}\n", str_of(base, "op"), stamp_text(base));
    }
    out + &fields_table(item)
}

/// `tiersync put/patch/delete`: what happened.
pub(super) fn write_result_text(r: &Json) -> String {
    let target = format!("{}/{}", str_of(r, "category"), str_of(r, "key"));
    let op = str_of(r, "op");
    if r["changed"] == json!(false) {
        return format!(
            "{op} {target}: unchanged (the same entry exists, {})\n",
            stamp_text(&r["stamp"])
        );
    }
    format!(
        "{op} {target}: done, seq {} (hlc {}, {})\n",
        cell(&r["seq"]),
        str_of(&r["stamp"], "hlc"),
        stamp_text(&r["stamp"])
    )
}

/// Items as a table: key, every field seen (sorted), origin of the last
/// change.
pub(super) fn items_table(items: &[Json]) -> String {
    let names: BTreeSet<&str> = items
        .iter()
        .filter_map(|i| i["fields"].as_object())
        .flat_map(|f| f.keys().map(String::as_str))
        .collect();
    let mut header = vec!["key"];
    header.extend(names.iter().copied());
    header.push("origin");
    let mut t = table(&header);
    for item in items {
        let mut row = vec![str_of(item, "key").to_string()];
        row.extend(names.iter().map(|n| match item["fields"].get(*n) {
            Some(v) => cell(v),
            None => String::new(),
        }));
        row.push(str_of(&item["meta"]["updated"], "origin").to_string());
        t.add_row(row);
    }
    format!("{t}\n")
}

pub(super) fn scan_text(category: &str, items: &[Json], next: &Json) -> String {
    if items.is_empty() {
        return format!("{category}: no items\n");
    }
    let mut out = items_table(items);
    out += &format!("{} item(s)", items.len());
    if let Some(next) = next.as_str() {
        out += &format!("; more after {next:?} (--after {next:?}, or --all)");
    }
    out + "\n"
}

/// `tiersync customer`: the customer record, then each linked category.
pub(super) fn customer_text(view: &Json) -> String {
    let id = str_of(view, "id");
    let mut out = format!("customer {id}\n");
    let customer = &view["customer"];
    if customer.is_null() {
        out += "no customer record on this node\n";
    } else {
        out += &format!("updated {}\n", stamp_text(&customer["meta"]["updated"]));
        out += &fields_table(customer);
    }
    if let Some(related) = view["related"].as_object() {
        for (category, rel) in related {
            let items = rel["items"].as_array().cloned().unwrap_or_default();
            let link = match (
                rel["link"]["field"].as_str(),
                rel["link"]["key_prefix"].as_str(),
            ) {
                (Some(f), _) => format!("field {f}"),
                (_, Some(sep)) => format!("key prefix \"{id}{sep}\""),
                _ => rel["link"].to_string(),
            };
            out += &format!("\n{category}: {} item(s), linked by {link}", items.len());
            if rel["truncated"] == json!(true) {
                out += " (only the first are listed)";
            }
            out += "\n";
            if !items.is_empty() {
                out += &items_table(&items);
            }
        }
    }
    out
}

/// `tiersync status`.
pub(super) fn status_text(s: &Json) -> String {
    let digest = str_of(s, "policy_digest");
    let mut out = format!(
        "node        {} ({})\nversion     tiersync {}\npolicy      {}\nlast seq    {}\n",
        str_of(s, "node_id"),
        str_of(s, "tier"),
        str_of(s, "version"),
        &digest[..digest.len().min(12)],
        cell(&s["last_seq"]),
    );
    let links = &s["links"];
    let parent = &links["parent"];
    if parent.is_null() {
        out += "parent      none\n";
    } else {
        out += &format!(
            "parent      {} at {}: {}, lag {} record(s) / {:.1} s, acked seq {}, last error: {}\n",
            str_of(parent, "parent"),
            str_of(parent, "addr"),
            str_of(parent, "state"),
            cell(&parent["lag_records"]),
            parent["lag_seconds"].as_f64().unwrap_or(0.0),
            cell(&parent["acked_seq"]),
            parent["last_error"].as_str().unwrap_or("none"),
        );
    }
    match links["children"].as_object().filter(|c| !c.is_empty()) {
        None => out += "children    none\n",
        Some(children) => {
            let mut t = table(&["child", "connected", "cursor", "items", "last error"]);
            for (id, c) in children {
                t.add_row(vec![
                    id.clone(),
                    if c["connected"] == json!(true) {
                        "yes"
                    } else {
                        "no"
                    }
                    .to_string(),
                    cell(&c["cursor"]),
                    cell(&c["items"]),
                    c["last_error"].as_str().unwrap_or("").to_string(),
                ]);
            }
            out += &format!("children\n{t}\n");
        }
    }
    let mut t = table(&["category", "kind", "replicate", "items"]);
    if let Some(categories) = s["categories"].as_object() {
        for (name, c) in categories {
            t.add_row(vec![
                name.clone(),
                str_of(c, "kind").to_string(),
                str_of(c, "replicate").to_string(),
                cell(&c["items"]),
            ]);
        }
    }
    out += &format!("categories\n{t}\n");
    match links["watermarks"].as_object().filter(|w| !w.is_empty()) {
        None => out += "watermarks  none\n",
        Some(marks) => {
            let mut t = table(&["origin", "seq", "complete up to"]);
            for (origin, w) in marks {
                let upto = w["complete_up_to_ms"]
                    .as_u64()
                    .map_or_else(|| "-".to_string(), crate::json::format_time_ms);
                t.add_row(vec![origin.clone(), cell(&w["seq"]), upto]);
            }
            out += &format!("watermarks\n{t}\n");
        }
    }
    out
}
