//! Rules that hold across the config files of a whole deployment.
//!
//! A node file can be valid on its own and still wrong in its deployment: a
//! parent that does not list its child, two nodes with one id, a cycle, a
//! policy that differs between nodes, a certificate issued to another node.
//! `tiersync config check` loads every file of a deployment and reports every
//! such problem at once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use tiersync_protocol::NodeId;

use crate::config::Loaded;

/// One problem found across files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file the problem is reported against.
    pub file: PathBuf,
    /// The key at fault.
    pub key: String,
    /// What is wrong.
    pub reason: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}: {}", self.file.display(), self.key, self.reason)
    }
}

/// Checks a set of loaded node files as one deployment.
pub fn check(nodes: &[Loaded]) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut by_id: BTreeMap<&NodeId, &Loaded> = BTreeMap::new();
    let mut problem = |l: &Loaded, key: &str, reason: String| {
        problems.push(Problem {
            file: l.path.clone(),
            key: key.to_string(),
            reason,
        })
    };
    for l in nodes {
        if let Some(prev) = by_id.insert(&l.config.node.id, l) {
            problem(
                l,
                "node.id",
                format!(
                    "{} is also the id in {}",
                    l.config.node.id,
                    prev.path.display()
                ),
            );
        }
    }
    let mut addrs: BTreeMap<std::net::SocketAddr, &Loaded> = BTreeMap::new();
    for l in nodes {
        let peer = l.config.listen.peer.map(|a| ("listen.peer", a));
        for (key, addr) in peer
            .into_iter()
            .chain([("listen.api", l.config.listen.api)])
        {
            // Port 0 picks a free port; 0.0.0.0 binds each node's own host (one pod each).
            if addr.port() == 0 || addr.ip().is_unspecified() {
                continue;
            }
            if let Some(prev) = addrs.insert(addr, l)
                && !std::ptr::eq(prev, l)
            {
                problem(
                    l,
                    key,
                    format!("{addr} is also used by {}", prev.path.display()),
                );
            }
        }
    }
    if let Some(first) = nodes.first() {
        let digest = first.policy.digest_hex();
        for l in &nodes[1..] {
            if l.policy.digest_hex() != digest {
                problem(
                    l,
                    "node.policy",
                    format!(
                        "policy digest {} differs from {} in {}: every node must load the same policy",
                        short(&l.policy.digest_hex()),
                        short(&digest),
                        first.path.display()
                    ),
                );
            }
        }
    }
    for l in nodes {
        let me = &l.config.node.id;
        // A parent or child whose file was not given is not checked here
        // (`outside` reports it), so one node's file checks on its own.
        if let Some(p) = &l.config.parent
            && let Some(parent) = by_id.get(&p.id)
        {
            if !parent.config.children.contains(me) {
                problem(
                    l,
                    "parent.id",
                    format!(
                        "{} does not list {me} in its children ({})",
                        p.id,
                        parent.path.display()
                    ),
                );
            }
            if parent.config.node.tier <= l.config.node.tier {
                problem(
                    l,
                    "node.tier",
                    format!(
                        "{me} is a {} but its parent {} is a {}: a parent's tier is above its child's",
                        l.config.node.tier, p.id, parent.config.node.tier
                    ),
                );
            }
        }
        // `[subtree]` must place below each child exactly the nodes the
        // given files put there (what is not given is not judged).
        if let Some(configured) = &l.config.subtree {
            for c in &l.config.children {
                let Some(child) = by_id.get(c) else { continue };
                let mut below = BTreeSet::new();
                let mut stack: Vec<&NodeId> = child.config.children.iter().collect();
                while let Some(n) = stack.pop() {
                    if below.insert(n)
                        && let Some(node) = by_id.get(n)
                    {
                        stack.extend(node.config.children.iter());
                    }
                }
                let listed: BTreeSet<&NodeId> = configured.get(c).into_iter().flatten().collect();
                let missing: Vec<&str> = below.difference(&listed).map(|n| n.as_str()).collect();
                if !missing.is_empty() {
                    problem(
                        l,
                        &format!("subtree.{c}"),
                        format!(
                            "does not list {} below {c}, as the deployment places them: {me} would refuse {c}'s link",
                            missing.join(", ")
                        ),
                    );
                }
                if child.config.node.tier != tiersync_protocol::Tier::City
                    && !configured.contains_key(c)
                {
                    problem(
                        l,
                        "subtree",
                        format!(
                            "{c} is a {} but has no entry: {me} would take it for a city",
                            child.config.node.tier
                        ),
                    );
                }
            }
        }
        for (i, c) in l.config.children.iter().enumerate() {
            if let Some(child) = by_id.get(c)
                && child.config.parent.as_ref().map(|p| &p.id) != Some(me)
            {
                problem(
                    l,
                    &format!("children[{i}]"),
                    format!(
                        "{c} does not name {me} as its parent ({})",
                        child.path.display()
                    ),
                );
            }
        }
        // Follow parents upward: more hops than nodes means a cycle.
        let mut seen = BTreeSet::new();
        let mut cur = l;
        while let Some(p) = &cur.config.parent {
            if !seen.insert(&cur.config.node.id) {
                problem(
                    l,
                    "parent.id",
                    format!("the parent chain from {me} loops back on itself"),
                );
                break;
            }
            match by_id.get(&p.id) {
                Some(next) => cur = next,
                None => break,
            }
        }
    }
    for l in nodes {
        if let Some(reason) = cert_problem(l) {
            problem(l, "tls.cert", reason);
        }
    }
    problems
}

/// Parents and children named by the given files whose own files were not
/// given: the rules across files were not checked for them. Warnings, so
/// one node's file can be checked on its own host.
pub fn outside(nodes: &[Loaded]) -> Vec<Problem> {
    let ids: BTreeSet<&NodeId> = nodes.iter().map(|l| &l.config.node.id).collect();
    let mut out = Vec::new();
    for l in nodes {
        let parent = l
            .config
            .parent
            .as_ref()
            .map(|p| ("parent.id".to_string(), &p.id));
        let children = l
            .config
            .children
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("children[{i}]"), c));
        for (key, id) in parent.into_iter().chain(children) {
            if !ids.contains(id) {
                out.push(Problem {
                    file: l.path.clone(),
                    key,
                    reason: format!(
                        "node {id}'s file was not given, so the rules between the two were not checked"
                    ),
                });
            }
        }
    }
    out
}

/// Whether the node's certificate (if its `[tls] cert` file exists) names
/// another node id than the node's, or cannot be read. A missing file is not
/// a problem here: certificates are often issued after the configs are
/// written, and `tiersync run` names the missing file.
fn cert_problem(l: &Loaded) -> Option<String> {
    let cert = &l.config.tls.as_ref()?.cert;
    if !cert.exists() {
        return None;
    }
    let me = &l.config.node.id;
    match crate::certs::inspect(cert) {
        Err(e) => Some(format!("cannot read the certificate: {e}")),
        Ok(info) => match info.node_id {
            Some(id) if &id == me => None,
            Some(id) => Some(format!(
                "{} is the certificate of node {id}, not {me}",
                cert.display()
            )),
            None => Some(format!(
                "{} names no node id{}: it must be the certificate of {me}",
                cert.display(),
                if info.is_ca {
                    " (it is a CA certificate)"
                } else {
                    ""
                }
            )),
        },
    }
}

fn short(hex: &str) -> &str {
    &hex[..hex.len().min(12)]
}

/// The deployment as a forest: each root and its descendants, depth first.
pub fn tree(nodes: &[Loaded]) -> Vec<(usize, &Loaded)> {
    let by_id: BTreeMap<&NodeId, &Loaded> = nodes.iter().map(|l| (&l.config.node.id, l)).collect();
    let mut out = Vec::new();
    fn walk<'a>(
        l: &'a Loaded,
        depth: usize,
        by_id: &BTreeMap<&NodeId, &'a Loaded>,
        out: &mut Vec<(usize, &'a Loaded)>,
    ) {
        if depth > by_id.len() {
            return; // a cycle; `check` reports it
        }
        out.push((depth, l));
        for c in &l.config.children {
            if let Some(child) = by_id.get(c) {
                walk(child, depth + 1, by_id, out);
            }
        }
    }
    for l in nodes {
        let parent_known = l
            .config
            .parent
            .as_ref()
            .is_some_and(|p| by_id.contains_key(&p.id));
        if !parent_known {
            walk(l, 0, &by_id, &mut out);
        }
    }
    out
}
