//! A whole deployment of real `tiersync run` processes on loopback, in a
//! temp dir, with a small blocking HTTP client for their APIs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Child;
use std::time::Duration;

use serde_json::Value as Json;
use tiersync::deploygen::{self, Generated, Spec};

use crate::{wait_for, workspace_bin};

/// A generated deployment and its running processes.
pub struct Cluster {
    /// Keeps the directory alive.
    pub dir: tempfile::TempDir,
    /// What was generated.
    pub deployment: Generated,
    procs: BTreeMap<String, Child>,
    agent: ureq::Agent,
    /// `RUST_LOG` of the nodes started from now on.
    pub log_filter: String,
}

/// An HTTP answer: status and JSON body (`Null` if not JSON).
#[derive(Debug, Clone)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Parsed body.
    pub body: Json,
}

impl Cluster {
    /// Generates a deployment (nothing started).
    pub fn new(spec: &Spec) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let deployment = deploygen::generate(dir.path(), spec).expect("generate deployment");
        std::fs::create_dir_all(dir.path().join("logs")).expect("logs dir");
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .new_agent();
        Self {
            dir,
            deployment,
            procs: BTreeMap::new(),
            agent,
            log_filter: "info,tiersync=debug".to_string(),
        }
    }

    /// Starts every node, parents first.
    pub fn start_all(&mut self) {
        let ids: Vec<String> = self
            .deployment
            .nodes
            .iter()
            .map(|n| n.id.to_string())
            .collect();
        for id in ids {
            self.start(&id);
        }
    }

    /// The config file of a node.
    pub fn config(&self, id: &str) -> PathBuf {
        self.deployment
            .node(id)
            .map(|n| n.config.clone())
            .unwrap_or_else(|| self.dir.path().join(format!("{id}.toml")))
    }

    /// Starts a node from `DIR/<id>.toml` and waits until it serves.
    pub fn start(&mut self, id: &str) {
        let config = self.config(id);
        self.start_with(id, config);
    }

    /// Starts a node from any config file and waits until it serves.
    pub fn start_with(&mut self, id: &str, config: PathBuf) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("logs").join(format!("{id}.log")))
            .expect("log file");
        let child = tiersync::process::spawn_node(
            &workspace_bin("tiersync"),
            &config,
            log,
            &[("RUST_LOG", self.log_filter.as_str())],
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("{id} did not start: {e}; log: {}", self.log(id)));
        self.procs.insert(id.to_string(), child);
    }

    /// The node's log so far.
    pub fn log(&self, id: &str) -> String {
        std::fs::read_to_string(self.dir.path().join("logs").join(format!("{id}.log")))
            .unwrap_or_default()
    }

    /// The process id of a running node.
    pub fn pid(&self, id: &str) -> Option<u32> {
        self.procs.get(id).map(Child::id)
    }

    /// SIGKILL.
    pub fn kill(&mut self, id: &str) {
        if let Some(mut c) = self.procs.remove(id) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and wait for a clean exit.
    pub fn stop(&mut self, id: &str) {
        if let Some(mut c) = self.procs.remove(id) {
            let _ = tiersync::process::terminate(c.id());
            let exited = wait_for(Duration::from_secs(30), || c.try_wait().ok().flatten());
            match exited {
                Some(status) => assert!(
                    status.success(),
                    "{id} exited with {status} on SIGTERM; log: {}",
                    self.log(id)
                ),
                None => {
                    let _ = c.kill();
                    panic!("{id} did not stop within 30 s of SIGTERM");
                }
            }
        }
    }

    /// Stops every node cleanly.
    pub fn stop_all(&mut self) {
        let ids: Vec<String> = self.procs.keys().cloned().collect();
        for id in ids {
            self.stop(&id);
        }
    }

    /// The API base URL of a node.
    pub fn url(&self, id: &str, path: &str) -> String {
        let node = self
            .deployment
            .node(id)
            .unwrap_or_else(|| panic!("no node {id}"));
        format!("http://{}{path}", node.api)
    }

    fn reply(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Reply {
        let mut r = r.unwrap_or_else(|e| panic!("HTTP request failed: {e}"));
        let status = r.status().as_u16();
        let text = r.body_mut().read_to_string().unwrap_or_default();
        Reply {
            status,
            body: serde_json::from_str(&text).unwrap_or(Json::Null),
        }
    }

    /// Waits until the node serving its API at `api` reports an uplink error
    /// containing `needle` (then returns it); panics with `who`'s log if it
    /// does not within 30 s.
    pub fn wait_uplink_error(&self, who: &str, api: std::net::SocketAddr, needle: &str) -> String {
        let seen = wait_for(Duration::from_secs(30), || {
            let mut r = self
                .agent
                .get(&format!("http://{api}/v1/status"))
                .call()
                .ok()?;
            let s: Json = serde_json::from_str(&r.body_mut().read_to_string().ok()?).ok()?;
            let err = s["links"]["parent"]["last_error"].as_str()?.to_string();
            err.contains(needle).then_some(err)
        });
        seen.unwrap_or_else(|| {
            panic!(
                "{who}: uplink never reported {needle:?}; log: {}",
                self.log(who)
            )
        })
    }

    /// The API address of a node of the deployment.
    pub fn api(&self, id: &str) -> std::net::SocketAddr {
        self.deployment
            .node(id)
            .unwrap_or_else(|| panic!("no node {id}"))
            .api
    }

    /// GET a path; `None` if the node does not answer.
    pub fn get_opt(&self, id: &str, path: &str) -> Option<Reply> {
        let mut r = self.agent.get(&self.url(id, path)).call().ok()?;
        let status = r.status().as_u16();
        let text = r.body_mut().read_to_string().unwrap_or_default();
        Some(Reply {
            status,
            body: serde_json::from_str(&text).unwrap_or(Json::Null),
        })
    }

    /// GET a path.
    pub fn get(&self, id: &str, path: &str) -> Reply {
        Self::reply(self.agent.get(&self.url(id, path)).call())
    }

    /// Sends a JSON body with `method`.
    pub fn send(&self, method: &str, id: &str, path: &str, body: &Json) -> Reply {
        let url = self.url(id, path);
        let text = body.to_string();
        let r = match method {
            "PUT" => self
                .agent
                .put(&url)
                .content_type("application/json")
                .send(&text),
            "PATCH" => self
                .agent
                .patch(&url)
                .content_type("application/json")
                .send(&text),
            "POST" => self
                .agent
                .post(&url)
                .content_type("application/json")
                .send(&text),
            "DELETE" => self.agent.delete(&url).call(),
            other => panic!("unsupported method {other}"),
        };
        Self::reply(r)
    }

    /// POSTs an NDJSON body.
    pub fn bulk(&self, id: &str, category: &str, lines: &[Json]) -> Reply {
        let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
        let url = self.url(id, &format!("/v1/records/{category}"));
        Self::reply(
            self.agent
                .post(&url)
                .content_type("application/x-ndjson")
                .send(&body),
        )
    }

    /// Waits until every running node's uplink has everything acknowledged
    /// (checked twice in a row, since a province's lag depends on its
    /// children's).
    pub fn wait_converged(&self, timeout: Duration) -> bool {
        let mut streak = 0;
        wait_for(timeout, || {
            let all = self.procs.keys().all(|id| {
                let s = self.get(id, "/v1/status").body;
                let parent = &s["links"]["parent"];
                parent.is_null() || (parent["lag_records"] == 0 && parent["state"] == "streaming")
            });
            streak = if all { streak + 1 } else { 0 };
            (streak >= 3).then_some(())
        })
        .is_some()
    }
}

/// Items of a store: (category, key) → state.
pub type Items = BTreeMap<(String, String), tiersync_protocol::Item>;

impl Cluster {
    /// Every item of a node's store (the node must be stopped).
    pub fn read_store(&self, id: &str) -> Items {
        let node = self
            .deployment
            .node(id)
            .unwrap_or_else(|| panic!("no node {id}"));
        let store = tiersync::store::Store::open(
            &node.data_dir,
            node.id.clone(),
            crate::example_policy(),
            tiersync::config::Durability::Fsync,
        )
        .unwrap_or_else(|e| panic!("open the store of {id}: {e}"));
        let mut out = Items::new();
        store
            .for_each_item(|cat, key, item| {
                out.insert((cat.to_string(), key.to_string()), item);
            })
            .unwrap_or_else(|e| panic!("scan the store of {id}: {e}"));
        out
    }

    /// Every city of the deployment.
    pub fn cities(&self) -> Vec<String> {
        self.deployment
            .nodes
            .iter()
            .filter(|n| n.tier == tiersync_protocol::Tier::City)
            .map(|n| n.id.to_string())
            .collect()
    }

    /// The cities at or below node `id`.
    pub fn cities_below(&self, id: &str) -> Vec<String> {
        self.deployment
            .nodes
            .iter()
            .filter(|n| n.tier == tiersync_protocol::Tier::City)
            .filter(|n| {
                let mut up = Some(n.id.clone());
                while let Some(p) = up {
                    if p.as_str() == id {
                        return true;
                    }
                    up = self
                        .deployment
                        .node(p.as_str())
                        .and_then(|m| m.parent.clone());
                }
                false
            })
            .map(|n| n.id.to_string())
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, mut c) in std::mem::take(&mut self.procs) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
