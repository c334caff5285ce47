//! `tiersync demo`: a whole deployment on this machine.
//!
//! Writes a deployment (certificates, one config per node, the CRM policy),
//! starts every node as its own `tiersync run` process on free loopback
//! ports, loads reproducible synthetic CRM data at every city through the
//! HTTP API, waits until every link reports zero lag, and shows what HQ sees.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value as Json, json};
use tiersync_protocol::Tier;

use crate::client::Client;
use crate::config::Durability;
use crate::deploygen::{self, GenNode, Generated, Spec};

/// Options of `tiersync demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Where to write the deployment (default: a new directory under the
    /// system temp dir, printed at start). Must not exist or be empty.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Provinces under the national node.
    #[arg(long, default_value_t = 2)]
    pub provinces: usize,
    /// Cities under each province.
    #[arg(long, default_value_t = 2)]
    pub cities: usize,
    /// Customers per city (each with 3 monthly bills, and some
    /// opportunities and service activities).
    #[arg(long, default_value_t = 1000)]
    pub customers: usize,
    /// Seed of the synthetic data (same seed, same data).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Stop the nodes and exit once every link reports zero lag (exit
    /// status 1 if that does not happen within --timeout).
    #[arg(long)]
    pub exit_when_converged: bool,
    /// Seconds to wait for convergence.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// Print the summary as JSON (for scripts).
    #[arg(long)]
    pub json: bool,
}

/// The node processes; terminated (SIGTERM, then SIGKILL) when dropped.
struct Nodes {
    procs: Vec<(String, Child)>,
}

impl Nodes {
    fn stop(&mut self) {
        for (_, c) in &self.procs {
            let _ = crate::process::terminate(c.id());
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        for (id, c) in &mut self.procs {
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        eprintln!("demo: {id} did not stop in time; killing it");
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
        }
        self.procs.clear();
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        self.stop();
    }
}

fn start_node(exe: &Path, node: &GenNode, logs: &Path) -> Result<Child> {
    let log_path = logs.join(format!("{}.log", node.id));
    let log = std::fs::File::create(&log_path).context("creating a log file")?;
    crate::process::spawn_node(exe, &node.config, log, &[], Duration::from_secs(30))
        .with_context(|| format!("starting {}; see {}", node.id, log_path.display()))
}

/// The API of `node` (one place for HTTP: `crate::client`), with an
/// operator token of that node.
struct Apis(BTreeMap<String, Client>);

/// Writes `token` to `file`, readable by this user only.
fn write_token(file: &Path, token: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)
        .with_context(|| format!("creating {}", file.display()))?;
    f.write_all(format!("{token}\n").as_bytes())
        .with_context(|| format!("writing {}", file.display()))
}

/// The token file of `role` at `node` in the demo's `tokens/` directory.
fn token_file(d: &Generated, node: &GenNode, role: &str) -> std::path::PathBuf {
    d.dir.join("tokens").join(format!("{}.{role}", node.id))
}

impl Apis {
    /// With each node's first admin token (`<data_dir>/admin.token`),
    /// creates an operator and an analyst token there, writes them to
    /// `tokens/<node>.<role>` (0600) and keeps an operator client.
    fn new(d: &Generated) -> Result<Self> {
        let mut m = BTreeMap::new();
        std::fs::create_dir_all(d.dir.join("tokens"))?;
        for n in &d.nodes {
            let base = format!("http://{}", n.api);
            let admin_file = n.data_dir.join(crate::api::auth::BOOTSTRAP_FILE);
            let creds = crate::client::Credentials::resolve(None, Some(&admin_file), None)?;
            let admin = Client::with_credentials(&base, Duration::from_secs(60), &creds)?;
            let mut operator = None;
            for role in ["operator", "analyst"] {
                let created = admin
                    .token_create(&format!("demo-{role}"), role, None)
                    .with_context(|| format!("creating the demo's {role} token at {}", n.id))?;
                let token = created["token"].as_str().unwrap_or_default().to_string();
                write_token(&token_file(d, n, role), &token)?;
                if role == "operator" {
                    operator = Some(token);
                }
            }
            let creds = crate::client::Credentials {
                token: operator,
                ca: None,
            };
            m.insert(
                n.id.to_string(),
                Client::with_credentials(&base, Duration::from_secs(60), &creds)?,
            );
        }
        Ok(Self(m))
    }

    fn of(&self, node: &GenNode) -> Result<&Client> {
        self.0
            .get(node.id.as_str())
            .with_context(|| format!("no client for {}", node.id))
    }
}

fn get_json(apis: &Apis, node: &GenNode, path: &str) -> Result<Json> {
    apis.of(node)?
        .get_json(path)
        .with_context(|| format!("GET {path} at {}", node.id))
}

const SURNAMES: [&str; 12] = [
    "Wang", "Li", "Zhang", "Liu", "Chen", "Yang", "Huang", "Zhao", "Wu", "Zhou", "Xu", "Sun",
];
const GIVEN: [&str; 12] = [
    "Wei", "Fang", "Na", "Min", "Jing", "Lei", "Qiang", "Yan", "Jun", "Hui", "Tao", "Ying",
];
const PLANS: [(&str, f64); 4] = [
    ("basic-38", 38.0),
    ("family-88", 88.0),
    ("business-128", 128.0),
    ("premium-199", 199.0),
];
const STAGES: [&str; 6] = [
    "lead",
    "qualified",
    "proposal",
    "negotiation",
    "won",
    "lost",
];
const ACTIVITY: [&str; 4] = ["visit", "call", "repair", "install"];

/// The synthetic data of one city, as `(category, NDJSON lines)`.
pub fn city_data(city: &str, customers: usize, seed: u64) -> Vec<(&'static str, Vec<Json>)> {
    let mut rng = StdRng::seed_from_u64(
        seed ^ city.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        }),
    );
    let (mut cust, mut bills, mut opps, mut acts) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..customers {
        let id = format!("{city}-c{i:06}");
        let (plan, fee) = PLANS[rng.random_range(0..PLANS.len())];
        let segment = match rng.random_range(0..100) {
            0..=9 => "platinum",
            10..=34 => "gold",
            35..=69 => "silver",
            _ => "bronze",
        };
        cust.push(json!({"key": id, "fields": {
            "name": format!("{} {}", SURNAMES[rng.random_range(0..SURNAMES.len())], GIVEN[rng.random_range(0..GIVEN.len())]),
            "phone": format!("1{}", rng.random_range(3_000_000_000u64..9_999_999_999)),
            "segment": segment,
            "plan": plan,
            "city": city,
            "opened": format!("20{:02}-{:02}-{:02}", rng.random_range(15..26), rng.random_range(1..13), rng.random_range(1..29)),
        }}));
        for month in 8..=10 {
            let usage = (rng.random_range(0.0..60.0f64) * 100.0).round() / 100.0;
            bills.push(json!({"key": format!("{id}-2026{month:02}"), "fields": {
                "customer_id": id, "plan": plan, "amount": fee + usage, "billed_at": format!("2026-{month:02}-01"),
            }}));
        }
        if rng.random_range(0..100) < 30 {
            opps.push(json!({"key": format!("{id}-o1"), "fields": {
                "customer_id": id,
                "stage": STAGES[rng.random_range(0..STAGES.len())],
                "expected_value": rng.random_range(1..50) * 1000,
                "expected_close": format!("2026-{:02}-15", rng.random_range(11..13)),
            }}));
        }
        if rng.random_range(0..100) < 50 {
            acts.push(json!({"key": format!("{id}-s1"), "fields": {
                "customer_id": id,
                "type": ACTIVITY[rng.random_range(0..ACTIVITY.len())],
                "started_at": format!("2026-{:02}-{:02}", rng.random_range(8..12), rng.random_range(1..29)),
                "status": if rng.random_bool(0.8) { "done" } else { "open" },
            }}));
        }
    }
    vec![
        ("customer", cust),
        ("billing", bills),
        ("opportunity", opps),
        ("service_activity", acts),
    ]
}

fn load_city(
    apis: &Apis,
    node: &GenNode,
    data: &[(&str, Vec<Json>)],
    done: &AtomicU64,
) -> Result<()> {
    for (category, lines) in data {
        for chunk in lines.chunks(1000) {
            let body: String = chunk.iter().map(|l| format!("{l}\n")).collect();
            let report = apis
                .of(node)?
                .bulk(category, body.as_bytes())
                .with_context(|| format!("loading {category} at {}", node.id))?;
            if report.rejected > 0 {
                bail!(
                    "loading {category} at {}: {} line(s) rejected: {:?}",
                    node.id,
                    report.rejected,
                    report.errors.first()
                );
            }
            done.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
    }
    Ok(())
}

fn counts(status: &Json) -> BTreeMap<String, u64> {
    status["categories"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v["items"].as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether every link reports zero lag and the national node holds every
/// shared item the cities hold.
fn converged(apis: &Apis, d: &Generated, shared_expected: u64) -> Result<(bool, u64)> {
    let mut national_shared = 0;
    let mut all_zero = true;
    for n in &d.nodes {
        let s = get_json(apis, n, "/v1/status")?;
        let p = &s["links"]["parent"];
        let caught_up = p.is_null() || (p["lag_records"] == 0 && p["state"] == "streaming");
        if !caught_up {
            all_zero = false;
        }
        if n.tier == Tier::National {
            let c = counts(&s);
            national_shared =
                c.get("customer").copied().unwrap_or(0) + c.get("billing").copied().unwrap_or(0);
        }
    }
    Ok((
        all_zero && national_shared == shared_expected,
        national_shared,
    ))
}

fn bar(len: u64, msg: &'static str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len).with_message(msg);
    if let Ok(style) = ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} ({per_sec})")
    {
        pb.set_style(style.progress_chars("=> "));
    }
    pb
}

/// Runs the demo; returns whether it converged.
pub fn run(args: &DemoArgs) -> Result<bool> {
    let dir = match &args.dir {
        Some(d) => {
            if d.exists() && d.read_dir().map(|mut r| r.next().is_some()).unwrap_or(true) {
                bail!(
                    "--dir {}: the directory exists and is not empty",
                    d.display()
                );
            }
            d.clone()
        }
        None => std::env::temp_dir().join(format!(
            "tiersync-demo-{}-{}",
            std::process::id(),
            crate::now_ms()
        )),
    };
    if args.provinces == 0 || args.cities == 0 {
        bail!("--provinces and --cities must be at least 1");
    }
    let spec = Spec {
        provinces: args.provinces,
        cities_per_province: args.cities,
        durability: Durability::Fsync,
    };
    let d = deploygen::generate(&dir, &spec).context("writing the deployment")?;
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    eprintln!(
        "demo: deployment written to {} ({} nodes)",
        dir.display(),
        d.nodes.len()
    );
    let exe = std::env::current_exe().context("locating the tiersync binary")?;
    let mut nodes = Nodes { procs: Vec::new() };
    for n in &d.nodes {
        let child = start_node(&exe, n, &logs)?;
        nodes.procs.push((n.id.to_string(), child));
        eprintln!(
            "demo: started {:<10} {:<9} api http://{}",
            n.id, n.tier, n.api
        );
    }

    let apis = Apis::new(&d)?;
    let cities: Vec<&GenNode> = d.nodes.iter().filter(|n| n.tier == Tier::City).collect();
    let data: Vec<_> = cities
        .iter()
        .map(|c| city_data(c.id.as_str(), args.customers, args.seed))
        .collect();
    let total: u64 = data.iter().flatten().map(|(_, l)| l.len() as u64).sum();
    let shared_expected: u64 = data
        .iter()
        .flatten()
        .filter(|(c, _)| *c == "customer" || *c == "billing")
        .map(|(_, l)| l.len() as u64)
        .sum();
    let start = Instant::now();
    let done = AtomicU64::new(0);
    let loading = bar(total, "loading");
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = cities
            .iter()
            .zip(&data)
            .map(|(c, data)| {
                let (apis, done) = (&apis, &done);
                s.spawn(move || load_city(apis, c, data, done))
            })
            .collect();
        while handles.iter().any(|h| !h.is_finished()) {
            loading.set_position(done.load(Ordering::Relaxed));
            std::thread::sleep(Duration::from_millis(100));
        }
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a loader thread panicked"))??;
        }
        Ok(())
    })?;
    loading.finish_with_message("loaded");
    let loaded_in = start.elapsed();
    eprintln!(
        "demo: {total} items written at {} cities in {:.1} s",
        cities.len(),
        loaded_in.as_secs_f64()
    );

    let replicating = bar(shared_expected, "replicating");
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let mut streak = 0;
    let mut ok = false;
    let mut last_print = Instant::now();
    while Instant::now() < deadline {
        let (all, at_national) = converged(&apis, &d, shared_expected)?;
        replicating.set_position(at_national);
        if !std::io::stderr().is_terminal() && last_print.elapsed() > Duration::from_secs(2) {
            eprintln!("demo: national holds {at_national}/{shared_expected} shared items");
            last_print = Instant::now();
        }
        streak = if all { streak + 1 } else { 0 };
        if streak >= 2 {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    replicating.finish_with_message(if ok { "converged" } else { "timed out" });
    let converge_s = start.elapsed().as_secs_f64();

    let summary = summary(
        &apis,
        &d,
        ok,
        converge_s,
        loaded_in.as_secs_f64(),
        total,
        shared_expected,
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        show(&apis, &d, &summary)?;
    }
    if !ok {
        eprintln!(
            "demo: did not converge within {} s; logs in {}",
            args.timeout,
            logs.display()
        );
    }
    if args.exit_when_converged || !ok {
        nodes.stop();
        return Ok(ok);
    }
    eprintln!(
        "\ndemo: nodes keep running; press Ctrl-C to stop them. Afterwards each node starts again with:"
    );
    if let Some(n) = d.nodes.first() {
        eprintln!("  tiersync run --config {}", n.config.display());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(crate::cli::shutdown_signal())?;
    eprintln!("demo: stopping the nodes");
    nodes.stop();
    Ok(true)
}

fn summary(
    apis: &Apis,
    d: &Generated,
    ok: bool,
    converge_s: f64,
    load_s: f64,
    written: u64,
    shared: u64,
) -> Result<Json> {
    let mut nodes = Vec::new();
    let mut per_tier: BTreeMap<&str, BTreeMap<String, u64>> = BTreeMap::new();
    let mut private_above = 0;
    for n in &d.nodes {
        let s = get_json(apis, n, "/v1/status")?;
        let c = counts(&s);
        if n.tier != Tier::City {
            private_above += c.get("opportunity").copied().unwrap_or(0)
                + c.get("service_activity").copied().unwrap_or(0);
        }
        let tier = per_tier.entry(n.tier.as_str()).or_default();
        for (k, v) in &c {
            *tier.entry(k.clone()).or_default() += v;
        }
        nodes.push(json!({
            "id": n.id.as_str(),
            "tier": n.tier.as_str(),
            "parent": n.parent.as_ref().map(|p| p.as_str()),
            "api": format!("http://{}", n.api),
            "config": n.config.display().to_string(),
            "operator_token_file": token_file(d, n, "operator").display().to_string(),
            "analyst_token_file": token_file(d, n, "analyst").display().to_string(),
            "items": c,
            "lag_records": s["links"]["parent"]["lag_records"],
        }));
    }
    let national = d.nodes.iter().find(|n| n.tier == Tier::National);
    let mut aggregates = serde_json::Map::new();
    if let Some(n) = national {
        for a in ["billing_by_city_month", "opportunities_by_city_stage_month"] {
            aggregates.insert(
                a.to_string(),
                get_json(apis, n, &format!("/v1/aggregates/{a}?group_by=origin"))?["rows"].clone(),
            );
        }
    }
    Ok(json!({
        "national_aggregates_by_city": aggregates,
        "converged": ok,
        "seconds_to_converge": (converge_s * 10.0).round() / 10.0,
        "seconds_to_load": (load_s * 10.0).round() / 10.0,
        "dir": d.dir.display().to_string(),
        "items_written": written,
        "shared_items_written": shared,
        "nodes": nodes,
        "items_per_tier": per_tier,
        "private_items_above_cities": private_above,
    }))
}

fn show(apis: &Apis, d: &Generated, summary: &Json) -> Result<()> {
    let mut t = comfy_table::Table::new();
    t.set_header([
        "node",
        "tier",
        "customer",
        "billing",
        "opportunity",
        "service_activity",
        "lag",
    ]);
    for n in summary["nodes"].as_array().into_iter().flatten() {
        let items = &n["items"];
        t.add_row([
            format!(
                "{}{}",
                if n["tier"] == "city" {
                    "    "
                } else if n["tier"] == "province" {
                    "  "
                } else {
                    ""
                },
                n["id"].as_str().unwrap_or("")
            ),
            n["tier"].as_str().unwrap_or("").to_string(),
            items["customer"].to_string(),
            items["billing"].to_string(),
            items["opportunity"].to_string(),
            items["service_activity"].to_string(),
            if n["lag_records"].is_null() {
                "-".into()
            } else {
                n["lag_records"].to_string()
            },
        ]);
    }
    println!("\nWhat every tier holds (private categories stay at their city):\n{t}");
    println!(
        "converged: {} in {} s (load {} s); private items above cities: {}",
        summary["converged"],
        summary["seconds_to_converge"],
        summary["seconds_to_load"],
        summary["private_items_above_cities"]
    );
    if let Some(national) = d.nodes.iter().find(|n| n.tier == Tier::National) {
        for (title, path) in [
            (
                "Billing at national, by city (shared bills, merged)",
                "/v1/aggregates/billing_by_city_month?group_by=origin",
            ),
            (
                "Open pipeline at national, by stage (counts only: the opportunities stay in the cities)",
                "/v1/aggregates/opportunities_by_city_stage_month?group_by=stage",
            ),
        ] {
            println!(
                "\n{title}:\n{}",
                aggregate_table(&get_json(apis, national, path)?)
            );
        }
        if let Some(province) = d.nodes.iter().find(|n| n.tier == Tier::Province) {
            let path = format!(
                "/v1/aggregates/service_activities_by_city_type_month?group_by=origin,type&drill={}",
                province.id
            );
            println!(
                "\nService activities, drilled down from national to {} (by city and type):\n{}",
                province.id,
                aggregate_table(&get_json(apis, national, &path)?)
            );
        }
        let s = get_json(apis, national, "/v1/status")?;
        println!(
            "\nCompleteness at national (everything each node wrote up to this time is here):"
        );
        for (origin, w) in s["links"]["watermarks"].as_object().into_iter().flatten() {
            let ms = w["complete_up_to_ms"].as_u64().unwrap_or(0);
            println!(
                "  {origin:<10} seq {:>6}  up to {}",
                w["seq"],
                crate::json::format_time_ms(ms)
            );
        }
        if let Some(city) = d.nodes.iter().find(|n| n.tier == Tier::City) {
            let id = format!("{}-c000000", city.id);
            let at_national = get_json(apis, national, &format!("/v1/customers/{id}"))?;
            let at_city = get_json(apis, city, &format!("/v1/customers/{id}"))?;
            println!("\nUnified customer view of {id} at national (shared data only):");
            println!(
                "{}",
                serde_json::to_string_pretty(&compact_view(&at_national))?
            );
            println!(
                "\n… and at {} (with its private opportunities and service activities):",
                city.id
            );
            println!("{}", serde_json::to_string_pretty(&compact_view(&at_city))?);
        }
    }
    println!(
        "\nNode APIs (each needs a token; operator and analyst tokens are in {}, mode 0600):",
        d.dir.join("tokens").display()
    );
    for n in &d.nodes {
        println!("  {:<10} http://{}", n.id, n.api);
    }
    if let Some(national) = d.nodes.first() {
        let analyst = token_file(d, national, "analyst");
        println!("\nTry, as an HQ analyst at {}:", national.id);
        println!(
            "  curl -H \"Authorization: Bearer $(cat {})\" http://{}/v1/aggregates/billing_by_city_month",
            analyst.display(),
            national.api
        );
        println!(
            "  tiersync query billing_by_city_month --node http://{} --token-file {}",
            national.api,
            analyst.display()
        );
        println!(
            "  (or export TIERSYNC_TOKEN=$(cat {}) and drop --token-file)",
            analyst.display()
        );
    }
    Ok(())
}

/// An aggregate query result as a table.
fn aggregate_table(r: &Json) -> comfy_table::Table {
    let mut t = comfy_table::Table::new();
    let dims: Vec<String> = r["group_by"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    let measures: Vec<String> = r["measures"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    t.set_header(dims.iter().chain(&measures).cloned().collect::<Vec<_>>());
    for row in r["rows"].as_array().into_iter().flatten() {
        let mut cells: Vec<String> = dims
            .iter()
            .map(|d| row["group"][d].as_str().unwrap_or("-").to_string())
            .collect();
        cells.extend(measures.iter().map(|m| match &row["values"][m] {
            Json::Number(n) if n.is_f64() => format!("{:.2}", n.as_f64().unwrap_or(0.0)),
            other => other.to_string(),
        }));
        t.add_row(cells);
    }
    t
}

/// The customer view without the per-field metadata, for a readable demo.
fn compact_view(v: &Json) -> Json {
    let fields = |item: &Json| item["fields"].clone();
    let related: BTreeMap<String, Vec<Json>> = v["related"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(cat, r)| {
                    (
                        cat.clone(),
                        r["items"]
                            .as_array()
                            .map(|a| a.iter().map(fields).collect())
                            .unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    json!({"customer": fields(&v["customer"]), "related": related})
}
