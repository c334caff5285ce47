//! Config files: every kind of bad file is refused with a message that names
//! the file, the key and the reason; cross-file problems are found by
//! `deployment::check`; the shipped `config-examples/` deployment is clean.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use tempfile::TempDir;
use tiersync::config::{self, ConfigError, Loaded};
use tiersync::deployment::{self, Problem};

const POLICY: &str = r#"
[categories.customer]
kind = "record"
replicate = "up"

[categories.billing]
kind = "log"
replicate = "up"
customer_link = { field = "customer_id" }

[categories.opportunity]
kind = "record"
replicate = "local"
customer_link = { field = "customer_id" }

[aggregates.billing_by_city_month]
source = "billing"
group_by = ["origin", "month(billed_at)"]
measures = ["count", "sum(amount)"]
"#;

/// A temporary deployment directory holding a valid `policy.toml`.
struct Dir {
    tmp: TempDir,
}

impl Dir {
    fn new() -> Self {
        let d = Dir {
            tmp: TempDir::new().unwrap(),
        };
        d.write("policy.toml", POLICY);
        d
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Writes a node file and loads it (with its policy).
    fn load(&self, name: &str, text: &str) -> Result<Loaded, ConfigError> {
        config::load(&self.write(name, text))
    }

    /// Writes a node file, expects it to be refused, returns the message.
    fn refused(&self, name: &str, text: &str) -> String {
        match self.load(name, text) {
            Ok(_) => panic!("{name} was accepted:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    /// Writes a policy file, expects it to be refused, returns the message.
    fn policy_refused(&self, name: &str, text: &str) -> String {
        match config::load_policy(&self.write(name, text)) {
            Ok(_) => panic!("{name} was accepted:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    /// Writes and loads every node file, then checks them as one deployment.
    fn check(&self, files: &[(&str, String)]) -> Vec<Problem> {
        let loaded: Vec<Loaded> = files
            .iter()
            .map(|(name, text)| {
                self.load(name, text)
                    .unwrap_or_else(|e| panic!("{name} refused: {e}\n{text}"))
            })
            .collect();
        deployment::check(&loaded)
    }
}

/// A node file. `n` makes the ports distinct within a deployment.
fn node(id: &str, tier: &str, parent: Option<&str>, children: &[&str], n: u16) -> String {
    let mut s = String::new();
    if !children.is_empty() {
        let list: Vec<String> = children.iter().map(|c| format!("{c:?}")).collect();
        s += &format!("children = [{}]\n\n", list.join(", "));
    }
    s += &format!(
        "[node]\nid = {id:?}\ntier = {tier:?}\npolicy = \"policy.toml\"\ndata_dir = \"data/{id}\"\n\n\
         [listen]\npeer = \"127.0.0.1:{}\"\napi = \"127.0.0.1:{}\"\n\n",
        17400 + n,
        18400 + n
    );
    if let Some(p) = parent {
        s += &format!("[parent]\nid = {p:?}\naddr = \"127.0.0.1:7400\"\n\n");
    }
    s += &format!(
        "[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/{id}.pem\"\nkey = \"certs/{id}.key\"\n\n\
         [storage]\ndurability = \"fsync\"\n"
    );
    s
}

/// A valid city file with one line replaced.
fn city_with(from: &str, to: &str) -> String {
    let text = node("hangzhou", "city", Some("zhejiang"), &[], 1);
    assert!(text.contains(from), "{from:?} not in\n{text}");
    text.replacen(from, to, 1)
}

/// Asserts `msg` is `FILE: KEY: REASON` with REASON containing `reason`.
#[track_caller]
fn assert_names(msg: &str, file: &Path, key: &str, reason: &str) {
    let prefix = format!("{}: {key}: ", file.display());
    assert!(
        msg.starts_with(&prefix),
        "expected a message starting with {prefix:?}, got {msg:?}"
    );
    assert!(
        msg[prefix.len()..].contains(reason),
        "expected the reason to contain {reason:?}, got {msg:?}"
    );
}

/// Asserts one of `problems` is reported against `file` at `key` with a
/// reason containing `reason`.
#[track_caller]
fn assert_problem(problems: &[Problem], file: &Path, key: &str, reason: &str) {
    let found = problems
        .iter()
        .any(|p| p.file == file && p.key == key && p.reason.contains(reason));
    let all: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert!(
        found,
        "expected a problem {}: {key}: …{reason}…, got:\n{}",
        file.display(),
        all.join("\n")
    );
    // The printed form names the file and the key too.
    let p = problems
        .iter()
        .find(|p| p.file == file && p.key == key && p.reason.contains(reason))
        .unwrap();
    assert!(
        p.to_string()
            .starts_with(&format!("{}: {key}: ", file.display()))
    );
}

// ---------------------------------------------------------------- node files

#[test]
fn a_valid_city_file_loads() {
    let d = Dir::new();
    let l = d.load("hangzhou.toml", &city_with("", "")).unwrap();
    assert_eq!(l.config.node.id.as_str(), "hangzhou");
    assert_eq!(l.config.node.policy, d.path("policy.toml"));
    assert_eq!(l.config.node.data_dir, d.path("data/hangzhou"));
    assert!(l.policy.categories.contains_key("billing"));
}

#[test]
fn unknown_key_in_node_file() {
    let d = Dir::new();
    let msg = d.refused(
        "hangzhou.toml",
        &city_with("durability = \"fsync\"", "durabilty = \"fsync\""),
    );
    assert_names(
        &msg,
        &d.path("hangzhou.toml"),
        "storage.durabilty",
        "unknown field",
    );
}

#[test]
fn unknown_top_level_key_in_node_file() {
    let d = Dir::new();
    let msg = d.refused(
        "hangzhou.toml",
        &format!("childs = []\n{}", city_with("", "")),
    );
    assert_names(&msg, &d.path("hangzhou.toml"), "childs", "unknown field");
}

#[test]
fn missing_key_in_node_file() {
    let d = Dir::new();
    let msg = d.refused("hangzhou.toml", &city_with("id = \"hangzhou\"\n", ""));
    assert_names(&msg, &d.path("hangzhou.toml"), "node.id", "missing");
}

#[test]
fn missing_section_in_node_file() {
    let d = Dir::new();
    let text = city_with("", "");
    let start = text.find("[listen]").unwrap();
    let end = text.find("[parent]").unwrap();
    let text = format!("{}{}", &text[..start], &text[end..]);
    let msg = d.refused("hangzhou.toml", &text);
    assert_names(&msg, &d.path("hangzhou.toml"), "listen", "missing");
}

#[test]
fn bad_tier() {
    let d = Dir::new();
    let msg = d.refused(
        "hangzhou.toml",
        &city_with("tier = \"city\"", "tier = \"county\""),
    );
    assert_names(&msg, &d.path("hangzhou.toml"), "node.tier", "county");
}

#[test]
fn bad_socket_address() {
    let d = Dir::new();
    let msg = d.refused(
        "hangzhou.toml",
        &city_with("peer = \"127.0.0.1:17401\"", "peer = \"localhost:99999\""),
    );
    assert_names(&msg, &d.path("hangzhou.toml"), "listen.peer", "address");
}

#[test]
fn bad_node_id() {
    let d = Dir::new();
    let msg = d.refused(
        "hangzhou.toml",
        &city_with("id = \"hangzhou\"", "id = \"HangZhou\""),
    );
    assert_names(&msg, &d.path("hangzhou.toml"), "node.id", "lowercase");
}

#[test]
fn bad_parent_id() {
    let d = Dir::new();
    let msg = d.refused(
        "hangzhou.toml",
        &city_with("id = \"zhejiang\"", "id = \"zhe jiang\""),
    );
    assert_names(&msg, &d.path("hangzhou.toml"), "parent.id", "lowercase");
}

#[test]
fn bad_durability() {
    let d = Dir::new();
    let msg = d.refused(
        "hangzhou.toml",
        &city_with("durability = \"fsync\"", "durability = \"sometimes\""),
    );
    assert_names(
        &msg,
        &d.path("hangzhou.toml"),
        "storage.durability",
        "sometimes",
    );
}

#[test]
fn toml_syntax_error_names_line_and_column() {
    let d = Dir::new();
    // Line 3, column 8: a bare word where a value is expected.
    let msg = d.refused("hangzhou.toml", "[node]\nid = \"hangzhou\"\ntier = city\n");
    let prefix = format!(
        "{}:3:8: TOML syntax error",
        d.path("hangzhou.toml").display()
    );
    assert!(msg.starts_with(&prefix), "expected {prefix:?}, got {msg:?}");
}

#[test]
fn national_with_a_parent() {
    let d = Dir::new();
    let msg = d.refused(
        "national.toml",
        &node("national", "national", Some("earth"), &[], 0),
    );
    assert_names(
        &msg,
        &d.path("national.toml"),
        "parent",
        "national node has no parent",
    );
}

#[test]
fn city_with_children() {
    let d = Dir::new();
    let msg = d.refused(
        "hangzhou.toml",
        &node("hangzhou", "city", Some("zhejiang"), &["xihu"], 1),
    );
    assert_names(
        &msg,
        &d.path("hangzhou.toml"),
        "children",
        "city node has no children",
    );
}

#[test]
fn missing_tls_with_a_parent() {
    let d = Dir::new();
    let text = city_with("", "");
    let start = text.find("[tls]").unwrap();
    let end = text.find("[storage]").unwrap();
    let text = format!("{}{}", &text[..start], &text[end..]);
    let msg = d.refused("hangzhou.toml", &text);
    assert_names(&msg, &d.path("hangzhou.toml"), "tls", "missing");
}

#[test]
fn own_parent() {
    let d = Dir::new();
    let msg = d.refused(
        "hangzhou.toml",
        &city_with("id = \"zhejiang\"", "id = \"hangzhou\""),
    );
    assert_names(
        &msg,
        &d.path("hangzhou.toml"),
        "parent.id",
        "its own parent",
    );
}

#[test]
fn child_listed_twice() {
    let d = Dir::new();
    let msg = d.refused(
        "zhejiang.toml",
        &node(
            "zhejiang",
            "province",
            Some("national"),
            &["hangzhou", "hangzhou"],
            2,
        ),
    );
    assert_names(
        &msg,
        &d.path("zhejiang.toml"),
        "children[1]",
        "listed twice",
    );
}

#[test]
fn missing_policy_file_names_the_path() {
    let d = Dir::new();
    let msg = d.refused(
        "hangzhou.toml",
        &city_with(
            "policy = \"policy.toml\"",
            "policy = \"no-such-policy.toml\"",
        ),
    );
    let missing = d.path("no-such-policy.toml");
    assert!(
        msg.contains(&missing.display().to_string()),
        "expected the policy path {} in {msg:?}",
        missing.display()
    );
    assert_names(&msg, &d.path("hangzhou.toml"), "node.policy", "cannot read");
}

#[test]
fn a_bad_policy_is_reported_against_the_policy_file() {
    let d = Dir::new();
    d.write(
        "bad-policy.toml",
        "[categories.customer]\nkind = \"record\"\n",
    );
    let msg = d.refused(
        "hangzhou.toml",
        &city_with("policy = \"policy.toml\"", "policy = \"bad-policy.toml\""),
    );
    assert_names(
        &msg,
        &d.path("bad-policy.toml"),
        "categories.customer.replicate",
        "missing",
    );
}

// ------------------------------------------------------------------ policies

#[test]
fn the_test_policy_is_valid() {
    let d = Dir::new();
    config::load_policy(&d.path("policy.toml")).unwrap();
}

#[test]
fn unknown_key_in_policy() {
    let d = Dir::new();
    let msg = d.policy_refused(
        "p.toml",
        &POLICY.replacen("replicate = \"up\"", "replicates = \"up\"", 1),
    );
    assert_names(
        &msg,
        &d.path("p.toml"),
        "categories.customer.replicates",
        "unknown field",
    );
}

#[test]
fn unknown_top_level_section_in_policy() {
    let d = Dir::new();
    let msg = d.policy_refused("p.toml", &format!("{POLICY}\n[limit]\nmax_fields = 10\n"));
    assert_names(&msg, &d.path("p.toml"), "limit", "unknown field");
}

#[test]
fn unknown_category_kind() {
    let d = Dir::new();
    let msg = d.policy_refused(
        "p.toml",
        &POLICY.replacen("kind = \"record\"", "kind = \"document\"", 1),
    );
    assert_names(
        &msg,
        &d.path("p.toml"),
        "categories.customer.kind",
        "document",
    );
}

#[test]
fn unknown_replicate_mode() {
    let d = Dir::new();
    let msg = d.policy_refused(
        "p.toml",
        &POLICY.replacen("replicate = \"local\"", "replicate = \"down\"", 1),
    );
    assert_names(
        &msg,
        &d.path("p.toml"),
        "categories.opportunity.replicate",
        "down",
    );
}

#[test]
fn bad_category_name() {
    let d = Dir::new();
    let msg = d.policy_refused(
        "p.toml",
        &POLICY.replacen("[categories.customer]", "[categories.Customer]", 1),
    );
    assert_names(&msg, &d.path("p.toml"), "categories.Customer", "lowercase");
}

#[test]
fn aggregate_with_unknown_source() {
    let d = Dir::new();
    let msg = d.policy_refused(
        "p.toml",
        &POLICY.replacen("source = \"billing\"", "source = \"bills\"", 1),
    );
    assert_names(
        &msg,
        &d.path("p.toml"),
        "aggregates.billing_by_city_month.source",
        "no category named \"bills\"",
    );
}

#[test]
fn aggregate_with_bad_group_by_function() {
    let d = Dir::new();
    let msg = d.policy_refused(
        "p.toml",
        &POLICY.replacen("month(billed_at)", "week(billed_at)", 1),
    );
    assert_names(
        &msg,
        &d.path("p.toml"),
        "aggregates.billing_by_city_month.group_by[1]",
        "unknown function \"week\"",
    );
}

#[test]
fn aggregate_with_bad_measure() {
    let d = Dir::new();
    let msg = d.policy_refused("p.toml", &POLICY.replacen("sum(amount)", "avg(amount)", 1));
    assert_names(
        &msg,
        &d.path("p.toml"),
        "aggregates.billing_by_city_month.measures[1]",
        "unknown measure",
    );
}

#[test]
fn max_frame_bytes_too_large() {
    let d = Dir::new();
    let msg = d.policy_refused(
        "p.toml",
        &format!("[limits]\nmax_frame_bytes = 100000000\n{POLICY}"),
    );
    assert_names(
        &msg,
        &d.path("p.toml"),
        "limits.max_frame_bytes",
        "100000000 is outside",
    );
}

#[test]
fn max_item_bytes_over_half_a_frame() {
    let d = Dir::new();
    let msg = d.policy_refused(
        "p.toml",
        &format!("[limits]\nmax_frame_bytes = 4096\nmax_item_bytes = 4096\n{POLICY}"),
    );
    assert_names(&msg, &d.path("p.toml"), "limits.max_item_bytes", "half");
}

#[test]
fn negative_limit() {
    let d = Dir::new();
    let msg = d.policy_refused("p.toml", &format!("[limits]\nmax_fields = -1\n{POLICY}"));
    assert_names(&msg, &d.path("p.toml"), "limits.max_fields", "");
}

#[test]
fn policy_without_categories() {
    let d = Dir::new();
    let msg = d.policy_refused("p.toml", "[limits]\nmax_fields = 10\n");
    assert_names(&msg, &d.path("p.toml"), "categories", "missing");
}

#[test]
fn policy_syntax_error() {
    let d = Dir::new();
    let msg = d.policy_refused("p.toml", "[categories.customer\nkind = \"record\"\n");
    let prefix = format!("{}:1:", d.path("p.toml").display());
    assert!(msg.starts_with(&prefix), "expected {prefix:?}, got {msg:?}");
    assert!(msg.contains("TOML syntax error"), "{msg}");
}

// ---------------------------------------------------------------- deployment

/// national → zhejiang → hangzhou, valid.
fn small() -> Vec<(&'static str, String)> {
    vec![
        (
            "national.toml",
            node("national", "national", None, &["zhejiang"], 0),
        ),
        (
            "zhejiang.toml",
            node("zhejiang", "province", Some("national"), &["hangzhou"], 2),
        ),
        (
            "hangzhou.toml",
            node("hangzhou", "city", Some("zhejiang"), &[], 1),
        ),
    ]
}

#[test]
fn a_small_valid_deployment_has_no_problems() {
    let d = Dir::new();
    assert_eq!(d.check(&small()), vec![]);
}

#[test]
fn duplicate_id() {
    let d = Dir::new();
    let mut files = small();
    files.push((
        "hangzhou-copy.toml",
        node("hangzhou", "city", Some("zhejiang"), &[], 3),
    ));
    let problems = d.check(&files);
    assert_problem(
        &problems,
        &d.path("hangzhou-copy.toml"),
        "node.id",
        "hangzhou is also the id in",
    );
    assert!(problems[0].reason.contains("hangzhou.toml"), "{problems:?}");
}

#[test]
fn duplicate_address() {
    let d = Dir::new();
    let mut files = small();
    files[2].1 = files[2].1.replace("127.0.0.1:18401", "127.0.0.1:18402");
    let problems = d.check(&files);
    assert_problem(
        &problems,
        &d.path("hangzhou.toml"),
        "listen.api",
        "127.0.0.1:18402 is also used by",
    );
}

#[test]
fn parent_does_not_list_child() {
    let d = Dir::new();
    let mut files = small();
    files.push((
        "ningbo.toml",
        node("ningbo", "city", Some("zhejiang"), &[], 3),
    ));
    let problems = d.check(&files);
    assert_problem(
        &problems,
        &d.path("ningbo.toml"),
        "parent.id",
        "zhejiang does not list ningbo in its children",
    );
    assert_eq!(problems.len(), 1, "{problems:?}");
}

#[test]
fn child_does_not_name_parent() {
    let d = Dir::new();
    let mut files = small();
    files[1].1 = node(
        "zhejiang",
        "province",
        Some("national"),
        &["hangzhou", "ningbo"],
        2,
    );
    files.push((
        "ningbo.toml",
        node("ningbo", "city", Some("jiangsu"), &[], 3),
    ));
    files.push((
        "jiangsu.toml",
        node("jiangsu", "province", None, &["ningbo"], 4),
    ));
    let problems = d.check(&files);
    assert_problem(
        &problems,
        &d.path("zhejiang.toml"),
        "children[1]",
        "ningbo does not name zhejiang as its parent",
    );
}

#[test]
fn parent_not_in_the_deployment() {
    let d = Dir::new();
    let files = vec![(
        "hangzhou.toml",
        node("hangzhou", "city", Some("zhejiang"), &[], 1),
    )];
    // One node's file checks on its own: the missing parent is a warning.
    assert_eq!(d.check(&files), vec![]);
    let loaded = vec![tiersync::config::load(&d.path("hangzhou.toml")).expect("loads")];
    assert_problem(
        &deployment::outside(&loaded),
        &d.path("hangzhou.toml"),
        "parent.id",
        "node zhejiang's file was not given",
    );
}

#[test]
fn tier_inversion() {
    let d = Dir::new();
    // A province whose parent is a city (which cannot list it as a child).
    let files = vec![
        ("hangzhou.toml", node("hangzhou", "city", None, &[], 1)),
        (
            "zhejiang.toml",
            node("zhejiang", "province", Some("hangzhou"), &[], 2),
        ),
    ];
    let problems = d.check(&files);
    assert_problem(
        &problems,
        &d.path("zhejiang.toml"),
        "node.tier",
        "zhejiang is a province but its parent hangzhou is a city",
    );
}

#[test]
fn same_tier_parent() {
    let d = Dir::new();
    let files = vec![
        (
            "zhejiang.toml",
            node("zhejiang", "province", None, &["jiangsu"], 2),
        ),
        (
            "jiangsu.toml",
            node("jiangsu", "province", Some("zhejiang"), &[], 4),
        ),
    ];
    let problems = d.check(&files);
    assert_problem(
        &problems,
        &d.path("jiangsu.toml"),
        "node.tier",
        "parent's tier is above",
    );
}

#[test]
fn policy_digest_mismatch() {
    let d = Dir::new();
    d.write(
        "other-policy.toml",
        &POLICY.replacen("replicate = \"local\"", "replicate = \"up\"", 1),
    );
    let mut files = small();
    files[2].1 = files[2]
        .1
        .replace("policy = \"policy.toml\"", "policy = \"other-policy.toml\"");
    let problems = d.check(&files);
    assert_problem(
        &problems,
        &d.path("hangzhou.toml"),
        "node.policy",
        "policy digest",
    );
    assert!(problems[0].reason.contains("national.toml"), "{problems:?}");
    assert_eq!(problems.len(), 1, "{problems:?}");
}

#[test]
fn same_policy_in_another_layout_has_the_same_digest() {
    let d = Dir::new();
    // Reordered sections and extra comments: same content, same digest.
    let (head, tail) = POLICY.split_at(POLICY.find("[aggregates").unwrap());
    d.write("reordered.toml", &format!("# a comment\n{tail}\n{head}"));
    let mut files = small();
    files[2].1 = files[2]
        .1
        .replace("policy = \"policy.toml\"", "policy = \"reordered.toml\"");
    assert_eq!(d.check(&files), vec![]);
}

#[test]
fn parent_cycle() {
    let d = Dir::new();
    // a → b → c → a, each listing its child so that only the loop (and the
    // tiers, all equal) are wrong.
    let files = vec![
        ("a.toml", node("a", "province", Some("b"), &["c"], 1)),
        ("b.toml", node("b", "province", Some("c"), &["a"], 2)),
        ("c.toml", node("c", "province", Some("a"), &["b"], 3)),
    ];
    let problems = d.check(&files);
    for id in ["a", "b", "c"] {
        assert_problem(
            &problems,
            &d.path(&format!("{id}.toml")),
            "parent.id",
            &format!("the parent chain from {id} loops back"),
        );
    }
}

#[test]
fn certificate_of_another_node() {
    let d = Dir::new();
    let certs = d.path("certs");
    tiersync::certs::init_ca(&certs).unwrap();
    for id in ["national", "zhejiang", "hangzhou"] {
        let id = tiersync_protocol::NodeId::new(id).unwrap();
        tiersync::certs::issue(&certs, &id, None, 30).unwrap();
    }
    // Each node's own certificate: no problem.
    assert_eq!(d.check(&small()), vec![]);

    // Hangzhou's file holds Zhejiang's certificate; the CA certificate
    // stands in for Zhejiang's; national's is unreadable.
    std::fs::copy(certs.join("zhejiang.pem"), certs.join("hangzhou.pem")).unwrap();
    std::fs::copy(certs.join("ca.pem"), certs.join("zhejiang.pem")).unwrap();
    std::fs::write(certs.join("national.pem"), "-----BEGIN NOTHING-----\n").unwrap();
    let problems = d.check(&small());
    assert_problem(
        &problems,
        &d.path("hangzhou.toml"),
        "tls.cert",
        "hangzhou.pem is the certificate of node zhejiang, not hangzhou",
    );
    assert_problem(
        &problems,
        &d.path("zhejiang.toml"),
        "tls.cert",
        "names no node id (it is a CA certificate)",
    );
    assert_problem(
        &problems,
        &d.path("national.toml"),
        "tls.cert",
        "cannot read the certificate: ",
    );
    assert!(
        problems.iter().any(|p| p.reason.contains("national.pem")),
        "{problems:?}"
    );
    assert_eq!(problems.len(), 3, "{problems:#?}");

    // A missing certificate file is left to `tiersync run`.
    std::fs::remove_file(certs.join("hangzhou.pem")).unwrap();
    std::fs::remove_file(certs.join("zhejiang.pem")).unwrap();
    std::fs::remove_file(certs.join("national.pem")).unwrap();
    assert_eq!(d.check(&small()), vec![]);
}

// ----------------------------------------------------------------- examples

#[test]
fn config_examples_load_and_pass_the_deployment_check() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config-examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .filter(|p| p.file_name().is_some_and(|n| n != "policy.toml"))
        .collect();
    files.sort();
    let loaded: Vec<Loaded> = files
        .iter()
        .map(|f| config::load(f).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    let ids: Vec<&str> = loaded.iter().map(|l| l.config.node.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "hangzhou", "jiangsu", "nanjing", "national", "ningbo", "suzhou", "zhejiang"
        ]
    );
    let problems = deployment::check(&loaded);
    assert!(problems.is_empty(), "{problems:#?}");

    let policy = &loaded[0].policy;
    for (name, replicate) in [
        ("customer", "Up"),
        ("billing", "Up"),
        ("opportunity", "Local"),
        ("service_activity", "Local"),
    ] {
        let c = policy.category(name).unwrap();
        assert_eq!(format!("{:?}", c.replicate), replicate, "{name}");
    }
    let agg = &policy.aggregates["billing_by_city_month"];
    assert_eq!(agg.source, "billing");
    assert_eq!(agg.group_by, ["origin", "month(billed_at)"]);
    assert_eq!(agg.measures, ["count", "sum(amount)"]);
    assert_eq!(policy.aggregates.len(), 4);

    // The tree: national at the root, provinces under it, cities under those.
    let tree: Vec<(usize, &str)> = deployment::tree(&loaded)
        .into_iter()
        .map(|(depth, l)| (depth, l.config.node.id.as_str()))
        .collect();
    assert_eq!(
        tree,
        [
            (0, "national"),
            (1, "zhejiang"),
            (2, "hangzhou"),
            (2, "ningbo"),
            (1, "jiangsu"),
            (2, "nanjing"),
            (2, "suzhou"),
        ]
    );
}

/// `[moved.CHILD]` records a node that left CHILD's subtree and when; it
/// must name a child, not a node still configured below it, and a time in
/// the past.
#[test]
fn moved_nodes_are_checked() {
    let d = Dir::new();
    let national = node("national", "national", None, &["zhejiang", "jiangsu"], 0);
    let ok = format!("{national}\n[moved.zhejiang]\nningbo = \"2026-01-05T08:00:00Z\"\n");
    let loaded = d.load("national.toml", &ok).unwrap();
    let moved = loaded.config.moved();
    let ningbo = tiersync_protocol::NodeId::new("ningbo").unwrap();
    let zhejiang = tiersync_protocol::NodeId::new("zhejiang").unwrap();
    assert_eq!(moved[&zhejiang][&ningbo], 1_767_600_000_000);

    let not_child = format!("{national}\n[moved.anhui]\nningbo = \"2026-01-05T08:00:00Z\"\n");
    let msg = d.refused("national.toml", &not_child);
    assert_names(
        &msg,
        &d.path("national.toml"),
        "moved.anhui.ningbo",
        "not in children",
    );

    let future = format!("{national}\n[moved.zhejiang]\nningbo = \"2999-01-01T00:00:00Z\"\n");
    let msg = d.refused("national.toml", &future);
    assert_names(
        &msg,
        &d.path("national.toml"),
        "moved.zhejiang.ningbo",
        "in the future",
    );

    let still = format!(
        "{national}\n[subtree]\nzhejiang = [\"ningbo\"]\njiangsu = []\n\n[moved.zhejiang]\nningbo = \"2026-01-05T08:00:00Z\"\n"
    );
    let msg = d.refused("national.toml", &still);
    assert_names(
        &msg,
        &d.path("national.toml"),
        "moved.zhejiang.ningbo",
        "still placed below zhejiang",
    );

    let garbage = format!("{national}\n[moved.zhejiang]\nningbo = \"last tuesday\"\n");
    let msg = d.refused("national.toml", &garbage);
    assert!(msg.contains("moved.zhejiang.ningbo"), "{msg}");
}
