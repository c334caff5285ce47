//! Writes a complete local deployment: CA and node certificates, one config
//! file per node, and the default CRM policy. Used by `tiersync demo` and by
//! the multi-node tests, so both run exactly what an operator would.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tiersync_protocol::{NodeId, Tier};

use crate::certs;
use crate::config::Durability;

/// The default CRM policy shipped in `config-examples/policy.toml`.
pub const DEFAULT_POLICY: &str = include_str!("../../config-examples/policy.toml");

const PROVINCES: [&str; 6] = [
    "zhejiang",
    "jiangsu",
    "guangdong",
    "sichuan",
    "hubei",
    "shandong",
];
const CITIES: [[&str; 4]; 6] = [
    ["hangzhou", "ningbo", "wenzhou", "shaoxing"],
    ["nanjing", "suzhou", "wuxi", "changzhou"],
    ["guangzhou", "shenzhen", "foshan", "dongguan"],
    ["chengdu", "mianyang", "deyang", "yibin"],
    ["wuhan", "yichang", "xiangyang", "jingzhou"],
    ["jinan", "qingdao", "yantai", "weifang"],
];

/// The shape of a generated deployment.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Provinces under the national node.
    pub provinces: usize,
    /// Cities under each province.
    pub cities_per_province: usize,
    /// Durability of every node.
    pub durability: Durability,
}

impl Default for Spec {
    fn default() -> Self {
        Self {
            provinces: 2,
            cities_per_province: 2,
            durability: Durability::Fsync,
        }
    }
}

/// One generated node.
#[derive(Debug, Clone)]
pub struct GenNode {
    /// Its id.
    pub id: NodeId,
    /// Its tier.
    pub tier: Tier,
    /// Its parent's id.
    pub parent: Option<NodeId>,
    /// Its config file.
    pub config: PathBuf,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its API address.
    pub api: std::net::SocketAddr,
}

/// A generated deployment.
#[derive(Debug, Clone)]
pub struct Generated {
    /// The directory it lives in.
    pub dir: PathBuf,
    /// Nodes, national first, then each province followed by its cities.
    pub nodes: Vec<GenNode>,
}

impl Generated {
    /// Config files of every node, for `tiersync config check`.
    pub fn config_files(&self) -> Vec<PathBuf> {
        self.nodes.iter().map(|n| n.config.clone()).collect()
    }

    /// A node by id.
    pub fn node(&self, id: &str) -> Option<&GenNode> {
        self.nodes.iter().find(|n| n.id.as_str() == id)
    }
}

fn province_name(i: usize) -> String {
    PROVINCES
        .get(i)
        .map_or_else(|| format!("province-{}", i + 1), |s| s.to_string())
}

fn city_name(p: usize, c: usize) -> String {
    CITIES
        .get(p)
        .and_then(|cs| cs.get(c))
        .map_or_else(|| format!("city-{}-{}", p + 1, c + 1), |s| s.to_string())
}

/// A free loopback port (TCP and UDP both free at the time of the call).
///
/// Chosen below the kernel's ephemeral range (32768+), so a port handed out
/// here is not taken meanwhile by an outgoing connection or a client socket
/// bound to port 0 (every uplink binds one). Ports are handed out in turn
/// from a random start, so deployments generated concurrently in one process
/// (tests run in parallel threads) never get the same port.
pub fn free_port() -> Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let start = {
        use rand::Rng;
        rand::rng().random_range(0..SPAN)
    };
    let _ = NEXT.compare_exchange(u32::MAX, start, Ordering::SeqCst, Ordering::SeqCst);
    for _ in 0..SPAN {
        let port = u16::try_from(LOW + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN).unwrap_or(0);
        if port != 0
            && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return Ok(port);
        }
    }
    anyhow::bail!("no free loopback port found in {LOW}..{}", LOW + SPAN)
}

/// Writes the deployment into `dir` (created if missing).
pub fn generate(dir: &Path, spec: &Spec) -> Result<Generated> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join("policy.toml"), DEFAULT_POLICY).context("writing policy.toml")?;
    let cert_dir = dir.join("certs");
    certs::init_ca(&cert_dir).context("creating the deployment CA")?;

    struct Plan {
        id: String,
        tier: Tier,
        parent: Option<usize>,
        children: Vec<usize>,
    }
    let mut plan = vec![Plan {
        id: "national".into(),
        tier: Tier::National,
        parent: None,
        children: vec![],
    }];
    for p in 0..spec.provinces {
        let pi = plan.len();
        plan.push(Plan {
            id: province_name(p),
            tier: Tier::Province,
            parent: Some(0),
            children: vec![],
        });
        plan[0].children.push(pi);
        for c in 0..spec.cities_per_province {
            let ci = plan.len();
            plan.push(Plan {
                id: city_name(p, c),
                tier: Tier::City,
                parent: Some(pi),
                children: vec![],
            });
            plan[pi].children.push(ci);
        }
    }
    let mut ports = std::collections::BTreeSet::new();
    while ports.len() < 2 * plan.len() {
        ports.insert(free_port()?);
    }
    let ports: Vec<u16> = ports.into_iter().collect();
    let (peers, apis) = ports.split_at(plan.len());

    let mut nodes = Vec::new();
    for (i, n) in plan.iter().enumerate() {
        let id = NodeId::new(n.id.clone()).context("generated node id")?;
        // 127.0.0.1: HTTPS clients of a local API (when `[api] tls` is on).
        certs::issue_with_hosts(
            &cert_dir,
            &id,
            Some(n.tier),
            certs::DEFAULT_NODE_VALIDITY_DAYS,
            &["127.0.0.1".to_string()],
        )
        .with_context(|| format!("issuing the certificate of {id}"))?;
        let mut toml = String::new();
        let _ = writeln!(toml, "# {} node of a generated tiersync deployment", n.tier);
        if !n.children.is_empty() {
            let kids: Vec<String> = n
                .children
                .iter()
                .map(|&c| format!("{:?}", plan[c].id))
                .collect();
            let _ = writeln!(toml, "children = [{}]", kids.join(", "));
            // Who may appear below each relaying child: the tree as planned,
            // so a province cannot claim another's cities.
            let relays: Vec<usize> = n
                .children
                .iter()
                .copied()
                .filter(|&c| plan[c].tier != Tier::City)
                .collect();
            if !relays.is_empty() {
                let _ = writeln!(
                    toml,
                    "
[subtree]"
                );
                for c in relays {
                    let below: Vec<String> = plan[c]
                        .children
                        .iter()
                        .map(|&g| format!("{:?}", plan[g].id))
                        .collect();
                    let _ = writeln!(toml, "{:?} = [{}]", plan[c].id, below.join(", "));
                }
            }
        }
        let _ = writeln!(
            toml,
            "\n[node]\nid = {:?}\ntier = {:?}\npolicy = \"policy.toml\"\ndata_dir = \"data/{}\"",
            n.id,
            n.tier.as_str(),
            n.id
        );
        // A city has no children, so it binds no peer address.
        if n.children.is_empty() {
            let _ = writeln!(toml, "\n[listen]\napi = \"127.0.0.1:{}\"", apis[i]);
        } else {
            let _ = writeln!(
                toml,
                "\n[listen]\npeer = \"127.0.0.1:{}\"\napi = \"127.0.0.1:{}\"",
                peers[i], apis[i]
            );
        }
        if let Some(p) = n.parent {
            let _ = writeln!(
                toml,
                "\n[parent]\nid = {:?}\naddr = \"127.0.0.1:{}\"",
                plan[p].id, peers[p]
            );
        }
        let _ = writeln!(
            toml,
            "\n[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/{0}.pem\"\nkey = \"certs/{0}.key\"\ncrl = \"certs/crl.pem\"",
            n.id
        );
        let durability = match spec.durability {
            Durability::Fsync => "fsync",
            Durability::Buffered => "buffered",
        };
        let _ = writeln!(toml, "\n[storage]\ndurability = \"{durability}\"");
        let config = dir.join(format!("{}.toml", n.id));
        std::fs::write(&config, toml).with_context(|| format!("writing {}", config.display()))?;
        nodes.push(GenNode {
            parent: n
                .parent
                .map(|p| NodeId::new(plan[p].id.clone()))
                .transpose()
                .context("parent id")?,
            id,
            tier: n.tier,
            config,
            data_dir: dir.join("data").join(&n.id),
            api: std::net::SocketAddr::from(([127, 0, 0, 1], apis[i])),
        });
    }
    Ok(Generated {
        dir: dir.to_path_buf(),
        nodes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_deployment_passes_config_check() {
        let dir = tempfile::tempdir().unwrap();
        let g = generate(
            dir.path(),
            &Spec {
                provinces: 2,
                cities_per_province: 3,
                ..Spec::default()
            },
        )
        .unwrap();
        assert_eq!(g.nodes.len(), 1 + 2 + 6);
        let loaded: Vec<_> = g
            .config_files()
            .iter()
            .map(|f| crate::config::load(f).unwrap())
            .collect();
        assert_eq!(crate::deployment::check(&loaded), vec![]);
    }
}
