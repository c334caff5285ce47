//! Node and policy configuration files.
//!
//! One TOML file per node, one policy TOML shared by the deployment. Every
//! rejection names the file, the key and the reason: unknown keys, missing
//! keys and bad values alike. Relative paths in a node file are resolved
//! against the directory of that file, so a deployment directory can move.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tiersync_protocol::{NodeId, Policy, Tier};

/// Why a configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{file}:{line}:{column}: TOML syntax error: {message}")]
    Syntax {
        /// The file.
        file: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// The parser's message.
        message: String,
    },
    /// A key is missing, unknown, or has a bad value.
    #[error("{file}: {key}: {reason}")]
    Invalid {
        /// The file.
        file: PathBuf,
        /// The key (dotted path; `.` for the whole file).
        key: String,
        /// What is wrong.
        reason: String,
    },
}

/// How writes are made durable before they are acknowledged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// The WAL is fsynced before a write is acknowledged; concurrent writes
    /// share one fsync (group commit).
    #[default]
    Fsync,
    /// Acknowledged once in the OS page cache: survives a process crash, not a
    /// power loss.
    Buffered,
}

/// `[node]`: who this node is.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// This node's id (also its certificate's SAN).
    pub id: NodeId,
    /// `city`, `province` or `national`.
    pub tier: Tier,
    /// The shared policy file.
    pub policy: PathBuf,
    /// Where RocksDB keeps this node's data.
    pub data_dir: PathBuf,
}

/// `[listen]`: local addresses.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenSection {
    /// QUIC address children connect to; only a node with children binds it
    /// (a city needs none).
    #[serde(default)]
    pub peer: Option<SocketAddr>,
    /// HTTP API address.
    pub api: SocketAddr,
}

/// `[parent]`: the node this one replicates to.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParentSection {
    /// The parent's node id (checked against its certificate).
    pub id: NodeId,
    /// The parent's QUIC address, `host:port`.
    pub addr: String,
}

/// `[tls]`: this node's certificate and the deployment CA.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// The deployment CA certificate (PEM).
    pub ca: PathBuf,
    /// This node's certificate (PEM).
    pub cert: PathBuf,
    /// This node's private key (PEM). Refused at start when its file mode
    /// lets anyone but its owner read it.
    pub key: PathBuf,
    /// The deployment's certificate revocation list (PEM, `crl.pem` beside
    /// the CA, written by `tiersync certs init` and `certs revoke`): peers
    /// whose certificate it lists are refused, and their live links closed
    /// at the next reload. Optional; without it nothing is revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl: Option<PathBuf>,
}

/// `[storage]`: durability and storage knobs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    /// `fsync` (default) or `buffered`.
    #[serde(default)]
    pub durability: Durability,
    /// How long changelog entries are kept after the parent acknowledged
    /// them (at national, which has no parent: after they were written),
    /// e.g. `"10m"` (the default) or `"2h"`. A parent restored from a
    /// backup younger than this resumes from its cursor instead of asking
    /// for a snapshot of this node's whole data.
    #[serde(default = "default_retention", with = "humantime_serde")]
    pub changelog_retention: std::time::Duration,
}

fn default_retention() -> std::time::Duration {
    std::time::Duration::from_secs(600)
}

impl Default for StorageSection {
    fn default() -> Self {
        Self {
            durability: Durability::default(),
            changelog_retention: default_retention(),
        }
    }
}

/// `[api]`: HTTP API limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSection {
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Requests a second each API token may make on average (0: no limit);
    /// beyond it the API answers 429 `rate_limited` to that token only.
    pub rate_limit_per_second: u32,
    /// Requests a token may make at once above its average rate.
    pub rate_limit_burst: u32,
    /// Serve the API over TLS (HTTPS) with this node's `[tls]` certificate
    /// and key. Required unless `listen.api` is a loopback address.
    pub tls: bool,
    /// Host names (or addresses) clients may name in the `Host` header,
    /// besides `localhost`, loopback addresses, the `listen.api` address
    /// and the node id; `"*"` accepts any (turns the DNS-rebinding check
    /// off).
    pub hosts: Vec<String>,
    /// Time a client has to send a request's headers before its
    /// connection is dropped (e.g. `"10s"`).
    #[serde(with = "humantime_serde")]
    pub header_timeout: std::time::Duration,
    /// Time a request may take, reading its body included (408 after it).
    #[serde(with = "humantime_serde")]
    pub request_timeout: std::time::Duration,
    /// Most client connections open at once; more are closed at once.
    pub max_connections: usize,
}

impl Default for ApiSection {
    fn default() -> Self {
        Self {
            max_body_bytes: 16 * 1024 * 1024,
            rate_limit_per_second: 1000,
            rate_limit_burst: 2000,
            tls: false,
            hosts: Vec::new(),
            header_timeout: std::time::Duration::from_secs(10),
            request_timeout: std::time::Duration::from_secs(120),
            max_connections: 1024,
        }
    }
}

/// `[log]`: logging, changeable by a reload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// A `RUST_LOG`-style filter, e.g. `info` or `info,tiersync::link=debug`
    /// (default `info`; the `RUST_LOG` environment variable overrides it).
    #[serde(default)]
    pub level: Option<String>,
}

/// One node's configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Identity, tier, policy, data directory.
    pub node: NodeSection,
    /// Listen addresses.
    pub listen: ListenSection,
    /// The uplink, if any (not at national).
    #[serde(default)]
    pub parent: Option<ParentSection>,
    /// Ids of the nodes allowed to connect as children.
    #[serde(default)]
    pub children: Vec<NodeId>,
    /// `[subtree]`: for each child that relays others (a province), every
    /// node that may appear below it. A child's Hello may claim only those;
    /// a child listed here is not a city, one not listed is (unless its
    /// certificate names its tier). Without the table the claims of the
    /// Hellos are trusted (first come, first served).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subtree: Option<BTreeMap<NodeId, Vec<NodeId>>>,
    /// `[moved.CHILD]`: nodes that left CHILD's subtree (a city moved to
    /// another province, or removed), each with the RFC 3339 time it left.
    /// CHILD may still relay what they wrote before then. A parent learns
    /// departures from its children's Hellos by itself; this records the
    /// ones it could not see (CHILD never connected while the city was
    /// below it).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub moved: BTreeMap<NodeId, BTreeMap<NodeId, humantime_serde::Serde<std::time::SystemTime>>>,
    /// Certificates; required when the node has a parent or children.
    #[serde(default)]
    pub tls: Option<TlsSection>,
    /// Storage settings.
    #[serde(default)]
    pub storage: StorageSection,
    /// API settings.
    #[serde(default)]
    pub api: ApiSection,
    /// Logging.
    #[serde(default)]
    pub log: LogSection,
}

/// A node configuration together with the policy it names, both validated.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The node file, its paths made absolute.
    pub config: NodeConfig,
    /// Where it was read from.
    pub path: PathBuf,
    /// The policy it names.
    pub policy: Arc<Policy>,
}

fn invalid(file: &Path, key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        file: file.to_path_buf(),
        key: key.into(),
        reason: reason.into(),
    }
}

/// Parses TOML text into `T`, naming the key of any error.
pub fn parse_toml<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T, ConfigError> {
    let syntax = |e: toml::de::Error| {
        let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
        ConfigError::Syntax {
            file: file.to_path_buf(),
            line,
            column,
            message: e.message().to_string(),
        }
    };
    let de = toml::Deserializer::parse(text).map_err(syntax)?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let mut key = e.path().to_string();
        let reason = e.inner().message().to_string();
        // serde reports a missing field at its table: name the field itself.
        if let Some(field) = missing_field(&reason) {
            key = if key == "." {
                field.to_string()
            } else {
                format!("{key}.{field}")
            };
        }
        invalid(file, key, reason)
    })
}

/// The field named by serde's "missing field `x`" message.
fn missing_field(reason: &str) -> Option<&str> {
    reason
        .strip_prefix("missing field `")?
        .split_once('`')
        .map(|(f, _)| f)
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

fn read(file: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
        file: file.to_path_buf(),
        source,
    })
}

/// Reads and validates a policy file.
pub fn load_policy(file: &Path) -> Result<Policy, ConfigError> {
    let policy: Policy = parse_toml(file, &read(file)?)?;
    policy.validate().map_err(|e| match e {
        tiersync_protocol::PolicyError::Invalid { key, reason } => invalid(file, key, reason),
        other => invalid(file, ".", other.to_string()),
    })?;
    Ok(policy)
}

impl NodeConfig {
    /// `[subtree]` as sets, for the links.
    pub fn subtrees(&self) -> Option<BTreeMap<NodeId, BTreeSet<NodeId>>> {
        self.subtree.as_ref().map(|m| {
            m.iter()
                .map(|(c, below)| (c.clone(), below.iter().cloned().collect()))
                .collect()
        })
    }

    /// `[moved]` for the links: per child, node → until when (ms) its
    /// writes may come from that child.
    pub fn moved(&self) -> BTreeMap<NodeId, BTreeMap<NodeId, u64>> {
        self.moved
            .iter()
            .map(|(child, left)| {
                let left = left
                    .iter()
                    .map(|(n, at)| (n.clone(), crate::system_ms(**at)))
                    .collect();
                (child.clone(), left)
            })
            .collect()
    }

    /// Checks the rules a single node file must follow on its own.
    pub fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let id = &self.node.id;
        match (self.node.tier, &self.parent) {
            (Tier::National, Some(_)) => {
                return Err(invalid(file, "parent", "a national node has no parent"));
            }
            (_, Some(p)) if &p.id == id => {
                return Err(invalid(
                    file,
                    "parent.id",
                    "a node cannot be its own parent",
                ));
            }
            _ => {}
        }
        if self.node.tier == Tier::City && !self.children.is_empty() {
            return Err(invalid(file, "children", "a city node has no children"));
        }
        let mut seen = BTreeSet::new();
        for (i, c) in self.children.iter().enumerate() {
            if c == id {
                return Err(invalid(
                    file,
                    format!("children[{i}]"),
                    "a node cannot be its own child",
                ));
            }
            if !seen.insert(c) {
                return Err(invalid(
                    file,
                    format!("children[{i}]"),
                    format!("{c} is listed twice"),
                ));
            }
            if self.parent.as_ref().is_some_and(|p| &p.id == c) {
                return Err(invalid(
                    file,
                    format!("children[{i}]"),
                    format!("{c} is also this node's parent"),
                ));
            }
        }
        let mut placed: BTreeMap<&NodeId, &NodeId> = BTreeMap::new();
        for (child, below) in self.subtree.iter().flatten() {
            let key = format!("subtree.{child}");
            if !self.children.contains(child) {
                return Err(invalid(file, key, format!("{child} is not in children")));
            }
            for n in below {
                if n == id
                    || self.children.contains(n)
                    || self.parent.as_ref().is_some_and(|p| &p.id == n)
                {
                    return Err(invalid(
                        file,
                        key,
                        format!(
                            "{n} cannot be below {child}: it is this node, its parent or one of its children"
                        ),
                    ));
                }
                if let Some(other) = placed.insert(n, child) {
                    return Err(invalid(
                        file,
                        key,
                        format!("{n} is placed below both {other} and {child}"),
                    ));
                }
            }
        }
        let now = std::time::SystemTime::now();
        for (child, left) in &self.moved {
            for (n, at) in left {
                let key = format!("moved.{child}.{n}");
                if !self.children.contains(child) {
                    return Err(invalid(file, key, format!("{child} is not in children")));
                }
                if self
                    .subtrees()
                    .is_some_and(|s| s.get(child).is_some_and(|b| b.contains(n)))
                {
                    return Err(invalid(
                        file,
                        key,
                        format!("{n} is still placed below {child} in [subtree]"),
                    ));
                }
                if **at > now {
                    return Err(invalid(
                        file,
                        key,
                        "the time a node left is in the future: record a move after it happened",
                    ));
                }
            }
        }
        if let Some(p) = &self.parent
            && !p.addr.contains(':')
        {
            return Err(invalid(
                file,
                "parent.addr",
                format!("{:?} is not host:port", p.addr),
            ));
        }
        if self.tls.is_none() && (self.parent.is_some() || !self.children.is_empty()) {
            return Err(invalid(
                file,
                "tls",
                "missing: a node with a parent or children needs [tls] ca, cert and key",
            ));
        }
        if let Some(level) = &self.log.level
            && let Err(e) = tracing_subscriber::EnvFilter::builder().parse(level)
        {
            return Err(invalid(file, "log.level", format!("{level:?}: {e}")));
        }
        if self.listen.peer.is_none() && !self.children.is_empty() {
            return Err(invalid(
                file,
                "listen.peer",
                "missing: a node with children needs the QUIC address they connect to",
            ));
        }
        let api_ip = self.listen.api.ip();
        if !api_ip.is_loopback() && !self.api.tls {
            return Err(invalid(
                file,
                "api.tls",
                format!(
                    "api listens on {api_ip} without TLS: set [api] tls = true (served with the node's [tls] certificate), or listen on 127.0.0.1"
                ),
            ));
        }
        if self.api.tls && self.tls.is_none() {
            return Err(invalid(
                file,
                "tls",
                "missing: [api] tls = true serves the API with [tls] cert and key",
            ));
        }
        if self.api.header_timeout.is_zero() || self.api.request_timeout.is_zero() {
            return Err(invalid(
                file,
                "api",
                "header_timeout and request_timeout must be above 0",
            ));
        }
        if self.api.max_connections == 0 {
            return Err(invalid(file, "api.max_connections", "must be at least 1"));
        }
        if self.listen.peer == Some(self.listen.api) {
            return Err(invalid(
                file,
                "listen.api",
                "the API and peer addresses must differ",
            ));
        }
        Ok(())
    }

    fn resolve_paths(&mut self, base: &Path) {
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        abs(&mut self.node.policy);
        abs(&mut self.node.data_dir);
        if let Some(t) = &mut self.tls {
            abs(&mut t.ca);
            abs(&mut t.cert);
            abs(&mut t.key);
            if let Some(crl) = &mut t.crl {
                abs(crl);
            }
        }
    }
}

/// Reads a node file and the policy it names; validates both.
pub fn load(file: &Path) -> Result<Loaded, ConfigError> {
    let mut config: NodeConfig = parse_toml(file, &read(file)?)?;
    config.validate(file)?;
    let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
    config.resolve_paths(&base);
    let policy = load_policy(&config.node.policy).map_err(|e| match e {
        // Name the node file and key that point at the unreadable policy.
        ConfigError::Read {
            file: policy,
            source,
        } => invalid(
            file,
            "node.policy",
            format!("cannot read {}: {source}", policy.display()),
        ),
        other => other,
    })?;
    Ok(Loaded {
        config,
        path: file.to_path_buf(),
        policy: Arc::new(policy),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_are_one_based() {
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("x", 0), (1, 1));
    }

    #[test]
    fn missing_field_is_named() {
        assert_eq!(missing_field("missing field `id`"), Some("id"));
        assert_eq!(missing_field("unknown field `x`"), None);
    }
}
