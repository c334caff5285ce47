//! Deployment commands: `config check`, `topology`, `certs`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use tiersync_protocol::{NodeId, Tier};

use super::output::{print_out, table};
use crate::certs;
use crate::config;
use crate::deployment;

/// `tiersync certs …`
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a deployment CA: DIR/ca.pem and DIR/ca.key (never overwritten).
    Init {
        /// Directory for the CA files (created if missing).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue node certificates signed by the CA in DIR: DIR/<id>.pem and
    /// DIR/<id>.key (existing ones are replaced only with --force).
    Issue {
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        dir: PathBuf,
        /// Validity in days, at most 397 (capped at the CA's own expiry).
        #[arg(long, default_value_t = certs::DEFAULT_NODE_VALIDITY_DAYS)]
        days: u32,
        /// Also name this tier in the certificates (`tier.<tier>.tiersync`).
        #[arg(long, value_parser = parse_tier)]
        tier: Option<Tier>,
        /// Replace existing certificates and keys (renewal; then
        /// `tiersync reload` on each node).
        #[arg(long)]
        force: bool,
        /// Also name this API host (an IP address, or a DNS name with a
        /// dot) for HTTPS clients; repeatable.
        #[arg(long = "api-host", value_name = "HOST", value_parser = parse_api_host)]
        api_hosts: Vec<String>,
        /// Node ids to issue certificates for.
        #[arg(required = true, value_parser = parse_node_id)]
        ids: Vec<NodeId>,
    },
    /// On a node: make its private key DIR/<id>.key (mode 0600; an existing
    /// one is kept unless --new-key) and a signing request DIR/<id>.csr,
    /// also printed on stdout. Only the request goes to the CA; the key
    /// never leaves the node.
    Request {
        /// The node's certificate directory (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Replace an existing key (after a compromise; revoke the old
        /// certificate too).
        #[arg(long)]
        new_key: bool,
        /// The node's id.
        #[arg(value_parser = parse_node_id)]
        id: NodeId,
    },
    /// At the CA: sign a node's request (from `certs request`) into
    /// DIR/<id>.pem; send that file (not secret) back to the node, then
    /// `tiersync reload` there. Also the renewal command.
    Sign {
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        dir: PathBuf,
        /// The node's signing request.
        #[arg(long)]
        csr: PathBuf,
        /// Validity in days, at most 397 (capped at the CA's own expiry).
        #[arg(long, default_value_t = certs::DEFAULT_NODE_VALIDITY_DAYS)]
        days: u32,
        /// Also name this tier in the certificate (`tier.<tier>.tiersync`).
        #[arg(long, value_parser = parse_tier)]
        tier: Option<Tier>,
        /// A host name (with a dot) or IP address clients reach the node's
        /// HTTPS API by; repeatable.
        #[arg(long = "api-host", value_name = "HOST", value_parser = parse_api_host)]
        api_hosts: Vec<String>,
        /// The node id the request must name.
        #[arg(value_parser = parse_node_id)]
        id: NodeId,
    },
    /// Revoke a node's certificate (DIR/<id>.pem): adds it to DIR/crl.pem,
    /// signed by the CA in DIR. Copy crl.pem to every node (the file its
    /// `[tls] crl` names) and run `tiersync reload` there: the node is
    /// refused from then on and its live links are closed.
    Revoke {
        /// Directory holding ca.pem, ca.key and the node's certificate.
        #[arg(long)]
        dir: PathBuf,
        /// Node ids whose certificates to revoke.
        #[arg(required = true, value_parser = parse_node_id)]
        ids: Vec<NodeId>,
    },
    /// List the certificates in DIR: node id, tier, expiry, days left.
    List {
        /// Directory holding the certificates (`*.pem`).
        #[arg(long)]
        dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a certificate's node id, tier, issuer and validity.
    Inspect {
        /// The certificate (PEM).
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn parse_node_id(s: &str) -> Result<NodeId, String> {
    NodeId::new(s).map_err(|e| e.to_string())
}

fn parse_tier(s: &str) -> Result<Tier, String> {
    [Tier::City, Tier::Province, Tier::National]
        .into_iter()
        .find(|t| t.as_str() == s)
        .ok_or_else(|| format!("{s:?} is not a tier (city, province, national)"))
}

/// `tiersync config …`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Check node files as `run` would (files, certificates, expiry), then
    /// the rules across the given files; policy files are recognised.
    Check {
        /// Node files (one, or a whole deployment) and policy files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

pub(super) fn certs_command(command: CertsCommand) -> Result<()> {
    match command {
        CertsCommand::Init { dir } => {
            let files = certs::init_ca(&dir)?;
            println!("wrote {} and {}", files.cert.display(), files.key.display());
            println!(
                "keep {} secret: it can issue certificates for any node",
                files.key.display()
            );
        }
        CertsCommand::Issue {
            dir,
            days,
            tier,
            force,
            api_hosts,
            ids,
        } => {
            if !force {
                // Refuse before writing any: a node's key is its identity.
                let existing: Vec<String> = ids
                    .iter()
                    .flat_map(|id| [dir.join(format!("{id}.pem")), dir.join(format!("{id}.key"))])
                    .filter(|f| f.exists())
                    .map(|f| f.display().to_string())
                    .collect();
                if !existing.is_empty() {
                    bail!(
                        "{} already exist(s); nothing was written. Pass --force to replace them (a renewal: then run `tiersync reload` on each node)",
                        existing.join(", ")
                    );
                }
            }
            for id in &ids {
                let files = certs::issue_with_hosts(&dir, id, tier, days, &api_hosts)?;
                let info = certs::inspect(&files.cert)?;
                println!(
                    "{id}: wrote {} and {} (valid until {})",
                    files.cert.display(),
                    files.key.display(),
                    crate::preflight::format_time(info.not_after)
                );
            }
        }
        CertsCommand::Request { dir, new_key, id } => {
            let files = certs::request(&dir, &id, new_key)?;
            // The request on stdout (`… > node.csr`, or a container's log),
            // what was done on stderr.
            let csr = std::fs::read_to_string(&files.csr)
                .with_context(|| format!("{}: cannot read", files.csr.display()))?;
            print_out(&csr)?;
            eprintln!(
                "{id}: key {} (mode 0600, it stays on this host); request {} (printed above) goes to the CA: `tiersync certs sign --csr FILE {id}`",
                files.key.display(),
                files.csr.display()
            );
        }
        CertsCommand::Sign {
            dir,
            csr,
            days,
            tier,
            api_hosts,
            id,
        } => {
            let cert = certs::sign(&dir, &csr, &id, tier, days, &api_hosts)?;
            let info = certs::inspect(&cert)?;
            println!(
                "{id}: wrote {} (valid until {}); install it as the node's [tls] cert, then `tiersync reload` there",
                cert.display(),
                crate::preflight::format_time(info.not_after)
            );
        }
        CertsCommand::Revoke { dir, ids } => {
            for id in &ids {
                let crl = certs::revoke(&dir, id)?;
                println!(
                    "{id}: certificate revoked in {}; copy it to every node and run `tiersync reload` there",
                    crl.display()
                );
            }
        }
        CertsCommand::List { dir, json } => certs_list(&dir, json)?,
        CertsCommand::Inspect { file, json } => {
            let info = certs::inspect(&file)?;
            let now = i64::try_from(crate::now_ms() / 1000).unwrap_or(i64::MAX);
            let days_left = (info.not_after - now).div_euclid(86_400);
            if json {
                let value = serde_json::json!({
                    "node_id": info.node_id.as_ref().map(NodeId::as_str),
                    "tier": info.tier.map(Tier::as_str),
                    "subject": info.subject,
                    "issuer": info.issuer,
                    "is_ca": info.is_ca,
                    "not_before": info.not_before,
                    "not_after": info.not_after,
                    "days_left": days_left,
                    "expired": info.not_after <= now,
                });
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                let id = info.node_id.as_ref().map_or("-", NodeId::as_str);
                println!(
                    "node id:    {id}{}",
                    if info.is_ca { " (CA certificate)" } else { "" }
                );
                println!("tier:       {}", info.tier.map_or("-", Tier::as_str));
                println!("subject:    {}", info.subject);
                println!("issuer:     {}", info.issuer);
                println!(
                    "not before: {}",
                    crate::preflight::format_time(info.not_before)
                );
                let state = if info.not_after <= now {
                    "EXPIRED".to_string()
                } else {
                    format!("{days_left} days left")
                };
                println!(
                    "not after:  {} ({state})",
                    crate::preflight::format_time(info.not_after)
                );
            }
        }
    }
    Ok(())
}

/// An `--api-host`: an IP address, or a DNS name with a dot (a bare name
/// would read as a second node id in the certificate).
fn parse_api_host(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.parse::<std::net::IpAddr>().is_ok() || (s.contains('.') && !s.starts_with('.')) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?}: give an IP address or a fully qualified name (with a dot)"
        ))
    }
}

fn load_all(files: &[PathBuf]) -> Result<Vec<config::Loaded>> {
    let mut loaded = Vec::new();
    let mut errors = Vec::new();
    for f in files {
        match config::load(f) {
            Ok(l) => loaded.push(l),
            Err(e) => errors.push(e.to_string()),
        }
    }
    if !errors.is_empty() {
        bail!(
            "{} file(s) refused:\n  {}",
            errors.len(),
            errors.join("\n  ")
        );
    }
    Ok(loaded)
}

/// Whether a TOML file is a policy file (categories, no `[node]`).
fn is_policy_file(file: &std::path::Path) -> bool {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .is_some_and(|t| !t.contains_key("node") && t.contains_key("categories"))
}

pub(super) fn check(files: &[PathBuf]) -> Result<()> {
    let (policies, nodes): (Vec<&PathBuf>, Vec<&PathBuf>) =
        files.iter().partition(|f| is_policy_file(f));
    let mut errors: Vec<String> = Vec::new();
    let mut digests = Vec::new();
    for p in &policies {
        match config::load_policy(p) {
            Ok(policy) => digests.push((p.display().to_string(), policy.digest_hex())),
            Err(e) => errors.push(e.to_string()),
        }
    }
    let mut loaded = Vec::new();
    for f in &nodes {
        match config::load(f) {
            Ok(l) => loaded.push(l),
            Err(e) => errors.push(e.to_string()),
        }
    }
    let now = crate::preflight::now_secs();
    let mut warnings = deployment::outside(&loaded);
    for l in &loaded {
        let found = crate::preflight::check_tls(l, now);
        errors.extend(found.errors.iter().map(ToString::to_string));
        errors.extend(found.validity.iter().map(ToString::to_string));
        warnings.extend(found.warnings);
    }
    // The certificate rules are preflight's; the rest are across files.
    errors.extend(
        deployment::check(&loaded)
            .iter()
            .filter(|p| p.key != "tls.cert")
            .map(ToString::to_string),
    );
    if let Some(first) = loaded.first() {
        let node_digest = first.policy.digest_hex();
        for (file, digest) in &digests {
            if *digest != node_digest {
                errors.push(format!(
                    "{file}: policy digest {} differs from {} loaded by {}",
                    &digest[..12],
                    &node_digest[..12],
                    first.path.display()
                ));
            }
        }
    }
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    if !errors.is_empty() {
        bail!(
            "{} problem(s) in the deployment:\n  {}",
            errors.len(),
            errors.join("\n  ")
        );
    }
    let digest = loaded
        .first()
        .map(|l| l.policy.digest_hex())
        .or_else(|| digests.first().map(|(_, d)| d.clone()))
        .unwrap_or_default();
    println!(
        "ok: {} node file(s), {} policy file(s), policy digest {}{}",
        loaded.len(),
        policies.len(),
        &digest[..digest.len().min(16)],
        if warnings.is_empty() {
            String::new()
        } else {
            format!(", {} warning(s)", warnings.len())
        }
    );
    Ok(())
}

/// `tiersync certs list`: every certificate in `dir`.
fn certs_list(dir: &std::path::Path, json: bool) -> Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "pem"))
        .filter(|p| p.file_name().is_none_or(|n| n != certs::CRL_FILE))
        .collect();
    files.sort();
    let now = crate::preflight::now_secs();
    let mut rows = Vec::new();
    for f in &files {
        let row = match certs::inspect(f) {
            Ok(info) => serde_json::json!({
                "file": f.display().to_string(),
                "node_id": info.node_id.as_ref().map(NodeId::as_str),
                "tier": info.tier.map(Tier::as_str),
                "is_ca": info.is_ca,
                "not_after": info.not_after,
                "days_left": (info.not_after - now).div_euclid(86_400),
                "expired": info.not_after <= now,
            }),
            Err(e) => serde_json::json!({"file": f.display().to_string(), "error": e.to_string()}),
        };
        rows.push(row);
    }
    if json {
        return print_out(&format!("{}\n", serde_json::to_string_pretty(&rows)?));
    }
    let mut t = table(&["file", "node id", "tier", "expires", "days left"]);
    for r in &rows {
        let name = std::path::Path::new(r["file"].as_str().unwrap_or(""))
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        if let Some(e) = r["error"].as_str() {
            t.add_row(vec![
                name,
                format!("unreadable: {e}"),
                String::new(),
                String::new(),
                String::new(),
            ]);
            continue;
        }
        let id = if r["is_ca"] == serde_json::json!(true) {
            "(CA)".to_string()
        } else {
            r["node_id"].as_str().unwrap_or("-").to_string()
        };
        let days = r["days_left"].as_i64().unwrap_or(0);
        t.add_row(vec![
            name,
            id,
            r["tier"].as_str().unwrap_or("-").to_string(),
            crate::preflight::format_time(r["not_after"].as_i64().unwrap_or(0)),
            if r["expired"] == serde_json::json!(true) {
                "EXPIRED".to_string()
            } else if days < crate::preflight::EXPIRY_WARNING_DAYS {
                format!("{days} (renew soon)")
            } else {
                days.to_string()
            },
        ]);
    }
    print_out(&format!(
        "{t}\n{} certificate(s) in {}\n",
        rows.len(),
        dir.display()
    ))
}

pub(super) fn topology(files: &[PathBuf], json: bool) -> Result<()> {
    let loaded = load_all(files)?;
    let tree = deployment::tree(&loaded);
    if json {
        let nodes: Vec<serde_json::Value> = tree
            .iter()
            .map(|(depth, l)| {
                serde_json::json!({
                    "id": l.config.node.id.as_str(),
                    "tier": l.config.node.tier.as_str(),
                    "depth": depth,
                    "parent": l.config.parent.as_ref().map(|p| p.id.as_str()),
                    "children": l.config.children.iter().map(|c| c.as_str()).collect::<Vec<_>>(),
                    "peer": l.config.listen.peer.map(|p| p.to_string()),
                    "api": l.config.listen.api.to_string(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&nodes)?);
    } else {
        for (depth, l) in tree {
            println!(
                "{}{} ({}) peer {} api {}",
                "  ".repeat(depth),
                l.config.node.id,
                l.config.node.tier,
                l.config
                    .listen
                    .peer
                    .map_or_else(|| "-".to_string(), |p| p.to_string()),
                l.config.listen.api
            );
        }
    }
    Ok(())
}
