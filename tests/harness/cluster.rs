//! A whole deployment of real `tiersync run` processes on loopback, in a
//! temp dir, with a small blocking HTTP client for their APIs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use tiersync::deploygen::{self, Generated, Spec};

use crate::powerfs::{CutReport, PowerFs};
use crate::{wait_for, workspace_bin};

/// A generated deployment and its running processes.
pub struct Cluster {
    /// Keeps the directory alive.
    pub dir: tempfile::TempDir,
    /// What was generated.
    pub deployment: Generated,
    procs: BTreeMap<String, Child>,
    /// Power-loss file systems holding nodes' data directories.
    powerfs: BTreeMap<String, PowerFs>,
    agent: ureq::Agent,
    /// `RUST_LOG` of the nodes started from now on.
    pub log_filter: String,
    /// API tokens of each node, from its first admin token.
    tokens: std::sync::Mutex<BTreeMap<String, NodeTokens>>,
}

/// The API tokens the harness holds for one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeTokens {
    /// The node's first admin token (`<data_dir>/admin.token`).
    pub admin: String,
    /// An operator token (every helper's data requests).
    pub operator: String,
    /// An analyst token.
    pub analyst: String,
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
            powerfs: BTreeMap::new(),
            agent,
            log_filter: "info,tiersync=debug".to_string(),
            tokens: std::sync::Mutex::default(),
        }
    }

    /// The tokens of node `id` (started at least once).
    pub fn tokens(&self, id: &str) -> NodeTokens {
        self.tokens
            .lock()
            .expect("tokens")
            .get(id)
            .cloned()
            .unwrap_or_else(|| panic!("no tokens for {id}: was it started by the harness?"))
    }

    /// The operator token of node `id`.
    pub fn token(&self, id: &str) -> String {
        self.tokens(id).operator
    }

    /// The token the helpers send to `id` for `path`: admin for `/metrics`
    /// and `/v1/tokens`, operator for the rest; for a node the harness did
    /// not start (e.g. under a wrapper), its first admin token if written.
    fn token_for(&self, id: &str, path: &str) -> Option<String> {
        match self.tokens.lock().expect("tokens").get(id) {
            Some(t) if path.starts_with("/metrics") || path.starts_with("/v1/tokens") => {
                Some(t.admin.clone())
            }
            Some(t) => Some(t.operator.clone()),
            None => {
                let loaded = tiersync::config::load(&self.config(id)).ok()?;
                let file = loaded
                    .config
                    .node
                    .data_dir
                    .join(tiersync::api::auth::BOOTSTRAP_FILE);
                Some(std::fs::read_to_string(file).ok()?.trim().to_string())
            }
        }
    }

    /// `Bearer <token>` for `id` and `path` (empty if there is none).
    fn bearer(&self, id: &str, path: &str) -> String {
        self.token_for(id, path)
            .map(|t| format!("Bearer {t}"))
            .unwrap_or_default()
    }

    /// For a node started outside the harness (e.g. under a wrapper), once
    /// it serves: its tokens, as after [`Cluster::start`].
    pub fn adopt(&self, id: &str) {
        self.learn_tokens(id, &self.config(id));
    }

    /// After a start: the node's admin token from its data directory (a
    /// new one after a wipe), and operator and analyst tokens made with it.
    fn learn_tokens(&self, id: &str, config: &std::path::Path) {
        let loaded = tiersync::config::load(config)
            .unwrap_or_else(|e| panic!("{id}: reading {}: {e}", config.display()));
        let file = loaded
            .config
            .node
            .data_dir
            .join(tiersync::api::auth::BOOTSTRAP_FILE);
        let known = self.tokens.lock().expect("tokens").get(id).cloned();
        let admin = match std::fs::read_to_string(&file) {
            Ok(t) => t.trim().to_string(),
            // Still valid in the store (e.g. the file's name was lost in a
            // power cut, the token's hash was not).
            Err(_) if known.is_some() => return,
            Err(e) => panic!("{id}: no admin token in {}: {e}", file.display()),
        };
        if known.as_ref().is_some_and(|t| t.admin == admin) {
            return;
        }
        let url = format!("http://{}/v1/tokens", loaded.config.listen.api);
        let create = |role: &str| {
            let r = Self::reply(
                self.agent
                    .post(&url)
                    .header("authorization", &format!("Bearer {admin}"))
                    .content_type("application/json")
                    .send(
                        &serde_json::json!({"name": format!("harness-{role}"), "role": role})
                            .to_string(),
                    ),
            );
            assert_eq!(r.status, 201, "{id}: creating a {role} token: {}", r.body);
            r.body["token"].as_str().expect("a token").to_string()
        };
        let tokens = NodeTokens {
            operator: create("operator"),
            analyst: create("analyst"),
            admin,
        };
        self.tokens
            .lock()
            .expect("tokens")
            .insert(id.to_string(), tokens);
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
        self.spawn(id, config, &[]);
    }

    /// Starts a node with extra environment variables (e.g. `FAILPOINTS`)
    /// and waits until it reports ready.
    pub fn start_env(&mut self, id: &str, envs: &[(&str, &str)]) {
        let config = self.config(id);
        self.spawn(id, config, envs);
    }

    /// Starts a node and returns the time from spawning the process to its
    /// API answering `GET /v1/status`.
    pub fn start_timed(&mut self, id: &str) -> Duration {
        let t = Instant::now();
        self.start(id);
        let up = wait_for(Duration::from_secs(30), || {
            (self.get_opt(id, "/v1/status")?.status == 200).then_some(())
        });
        assert!(
            up.is_some(),
            "{id} reported ready but its API does not answer"
        );
        t.elapsed()
    }

    /// Whether the harness started node `id` and it has not been reaped.
    pub fn is_running(&self, id: &str) -> bool {
        self.procs.contains_key(id)
    }

    /// Waits (up to `timeout`) for node `id` to exit by itself (a fail point
    /// aborting it); returns its exit status.
    pub fn wait_exit(&mut self, id: &str, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = self.procs.get_mut(id)?;
        let status = wait_for(timeout, || child.try_wait().ok().flatten())?;
        self.procs.remove(id);
        Some(status)
    }

    fn spawn(&mut self, id: &str, config: PathBuf, envs: &[(&str, &str)]) {
        let mut all = vec![("RUST_LOG", self.log_filter.as_str())];
        all.extend_from_slice(envs);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("logs").join(format!("{id}.log")))
            .expect("log file");
        let child = tiersync::process::spawn_node(
            &workspace_bin("tiersync"),
            &config,
            log,
            &all,
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("{id} did not start: {e}; log: {}", self.log(id)));
        self.procs.insert(id.to_string(), child);
        self.learn_tokens(id, &config);
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
            // The whole group: the node and anything it runs under.
            let _ = tiersync::process::signal_group(c.id(), tiersync::process::SIGKILL);
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
                    let _ = tiersync::process::signal_group(c.id(), tiersync::process::SIGKILL);
                    let _ = c.wait();
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
                .header("authorization", &format!("Bearer {}", self.token(who)))
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
        let mut r = self.get_request(id, path).call().ok()?;
        let status = r.status().as_u16();
        let text = r.body_mut().read_to_string().unwrap_or_default();
        Some(Reply {
            status,
            body: serde_json::from_str(&text).unwrap_or(Json::Null),
        })
    }

    /// GET a path as text (e.g. `/metrics`).
    pub fn get_text(&self, id: &str, path: &str) -> String {
        let mut r = self.get_request(id, path).call().expect("GET");
        r.body_mut().read_to_string().expect("a text body")
    }

    /// A GET of `path` at `id` with the harness's token for it.
    fn get_request(
        &self,
        id: &str,
        path: &str,
    ) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        self.agent
            .get(&self.url(id, path))
            .header("authorization", &self.bearer(id, path))
    }

    /// GET a path.
    pub fn get(&self, id: &str, path: &str) -> Reply {
        Self::reply(self.get_request(id, path).call())
    }

    /// GET a path with `token` (none if `None`).
    pub fn get_as(&self, token: Option<&str>, id: &str, path: &str) -> Reply {
        let mut req = self.agent.get(&self.url(id, path));
        if let Some(t) = token {
            req = req.header("authorization", &format!("Bearer {t}"));
        }
        Self::reply(req.call())
    }

    /// Sends a JSON body with `method`.
    pub fn send(&self, method: &str, id: &str, path: &str, body: &Json) -> Reply {
        let url = self.url(id, path);
        let auth = self.bearer(id, path);
        let text = body.to_string();
        let r = match method {
            "PUT" => self
                .agent
                .put(&url)
                .header("authorization", &auth)
                .content_type("application/json")
                .send(&text),
            "PATCH" => self
                .agent
                .patch(&url)
                .header("authorization", &auth)
                .content_type("application/json")
                .send(&text),
            "POST" => self
                .agent
                .post(&url)
                .header("authorization", &auth)
                .content_type("application/json")
                .send(&text),
            "DELETE" => self
                .agent
                .delete(&url)
                .header("authorization", &auth)
                .call(),
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
                .header("authorization", &format!("Bearer {}", self.token(id)))
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
                if parent.is_null() {
                    return true;
                }
                if parent["lag_records"] != 0 || parent["state"] != "streaming" {
                    return false;
                }
                // A child reports no lag once its snapshot is sent, before
                // the parent has merged it: the parent's cursor says.
                match parent["parent"].as_str() {
                    Some(p) if self.procs.contains_key(p) => {
                        let cursor =
                            &self.get(p, "/v1/status").body["links"]["children"][id]["cursor"];
                        *cursor == s["last_seq"]
                    }
                    _ => true,
                }
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

impl Cluster {
    /// The QUIC peer address node `id` listens on (from its config file).
    pub fn peer_addr(&self, id: &str) -> std::net::SocketAddr {
        tiersync::config::load(&self.config(id))
            .unwrap_or_else(|e| panic!("config of {id}: {e}"))
            .config
            .listen
            .peer
            .unwrap_or_else(|| panic!("{id} has no [listen] peer (a city binds none)"))
    }

    /// Moves city `city` from province `from` to province `to`, as an
    /// operator would (README, Operations): both provinces' `children` and
    /// the city's `[parent]`. Takes effect when the nodes (re)start.
    pub fn move_city(&mut self, city: &str, from: &str, to: &str) {
        for (province, add) in [(from, false), (to, true)] {
            let path = self.config(province);
            let text = std::fs::read_to_string(&path).expect("read node config");
            let out: Vec<String> = text
                .lines()
                .map(|line| {
                    if !line.starts_with("children = ") {
                        return line.to_string();
                    }
                    let list = line.trim_start_matches("children = ");
                    let mut names: Vec<String> =
                        serde_json::from_str(list).expect("a children list");
                    names.retain(|n| n != city);
                    if add {
                        names.push(city.to_string());
                    }
                    format!(
                        "children = {}",
                        serde_json::to_string(&names).expect("names")
                    )
                })
                .collect();
            std::fs::write(&path, out.join("\n") + "\n").expect("write node config");
        }
        self.set_config_value(city, "parent", "id", &format!("\"{to}\""));
        let addr = self.peer_addr(to);
        self.set_parent_addr(city, addr);
        // The provinces' parent places the city below its new province
        // (`[subtree]`), and re-reads that now if it runs.
        let grandparent = self
            .deployment
            .nodes
            .iter()
            .find(|n| n.id.as_str() == from)
            .and_then(|n| n.parent.clone());
        if let Some(top) = grandparent {
            self.move_in_subtree(top.as_str(), city, from, to);
            if self.is_running(top.as_str()) {
                self.reload(top.as_str());
            }
        }
        if let Some(n) = self
            .deployment
            .nodes
            .iter_mut()
            .find(|n| n.id.as_str() == city)
        {
            n.parent = tiersync_protocol::NodeId::new(to).ok();
        }
    }

    /// In node `id`'s `[subtree]`, moves `node` from below `from` to below
    /// `to` (nothing if it has no such table).
    pub fn move_in_subtree(&self, id: &str, node: &str, from: &str, to: &str) {
        let path = self.config(id);
        let text = std::fs::read_to_string(&path).expect("read node config");
        let mut inside = false;
        let out: Vec<String> = text
            .lines()
            .map(|line| {
                if line.starts_with('[') {
                    inside = line == "[subtree]";
                }
                let Some((key, list)) = line.split_once(" = ").filter(|_| inside) else {
                    return line.to_string();
                };
                let mut names: Vec<String> = serde_json::from_str(list).expect("a node list");
                names.retain(|n| n != node);
                if key == format!("{to:?}") {
                    names.push(node.to_string());
                } else if key != format!("{from:?}") {
                    return line.to_string();
                }
                format!("{key} = {}", serde_json::to_string(&names).expect("names"))
            })
            .collect();
        std::fs::write(&path, out.join("\n") + "\n").expect("write node config");
    }

    /// Makes running node `id` re-read its node file (SIGHUP) and waits
    /// until it did; panics if it refused the new file.
    pub fn reload(&self, id: &str) {
        let reloads = |c: &Self| c.get(id, "/v1/status").body["config"]["reloads"].as_u64();
        let before = reloads(self).unwrap_or(0);
        let pid = self.pid(id).expect("a running node");
        tiersync::process::signal(pid, tiersync::process::SIGHUP).expect("SIGHUP");
        let done = wait_for(Duration::from_secs(30), || {
            reloads(self).filter(|&n| n > before).map(|_| ())
        });
        assert!(done.is_some(), "{id} did not reload");
        let last = &self.get(id, "/v1/status").body["config"]["last"];
        assert_eq!(last["ok"], true, "{id} refused its new file: {last}");
    }

    /// Points node `id`'s uplink at `addr` (e.g. a fault proxy), as an
    /// operator would. Takes effect at the node's next start.
    pub fn set_parent_addr(&self, id: &str, addr: std::net::SocketAddr) {
        self.set_config_value(id, "parent", "addr", &format!("\"{addr}\""));
    }

    /// Moves node `id`'s data directory to `dir` (e.g. a small tmpfs).
    /// Takes effect at the node's next start.
    pub fn set_data_dir(&mut self, id: &str, dir: &std::path::Path) {
        self.set_config_value(
            id,
            "node",
            "data_dir",
            &format!("{:?}", dir.display().to_string()),
        );
        if let Some(n) = self
            .deployment
            .nodes
            .iter_mut()
            .find(|n| n.id.as_str() == id)
        {
            n.data_dir = dir.to_path_buf();
        }
    }

    /// Moves node `id`'s data directory onto a power-loss file system
    /// (`harness/powerfs.rs`) of its own, mounted now, whose backing
    /// directory is `DIR/<id>-disk`. Takes effect at the node's next start.
    /// Check [`crate::powerfs::unavailable`] first.
    pub fn put_on_powerfs(&mut self, id: &str) {
        let dir = self.dir.path();
        let fs = PowerFs::mount(
            &dir.join(format!("{id}-disk")),
            &dir.join(format!("{id}-powerfs")),
            &dir.join("logs").join(format!("{id}-powerfs.log")),
        );
        let mount = fs.path().to_path_buf();
        self.powerfs.insert(id.to_string(), fs);
        self.set_data_dir(id, &mount);
    }

    /// Cuts node `id`'s power: the node dies (SIGKILL) and its power-loss
    /// file system drops everything not fsynced, then mounts again. The
    /// node stays down.
    pub fn power_cut(&mut self, id: &str) -> CutReport {
        self.kill(id);
        self.powerfs
            .get_mut(id)
            .unwrap_or_else(|| panic!("{id} is not on powerfs"))
            .cut_and_remount()
    }

    /// Sets node `id`'s `[storage] durability` (`"fsync"` or `"buffered"`).
    /// Takes effect at the node's next start.
    pub fn set_durability(&self, id: &str, durability: &str) {
        self.set_config_value(id, "storage", "durability", &format!("{durability:?}"));
    }

    /// Replaces `key = …` in `[section]` of node `id`'s config file with
    /// `key = value` (`value` in TOML syntax).
    fn set_config_value(&self, id: &str, section: &str, key: &str, value: &str) {
        let path = self.config(id);
        let text = std::fs::read_to_string(&path).expect("read node config");
        let (header, prefix) = (format!("[{section}]"), format!("{key} = "));
        let mut out = String::new();
        let mut inside = false;
        let mut done = false;
        for line in text.lines() {
            if line.starts_with('[') {
                inside = line == header;
            }
            if inside && line.starts_with(&prefix) {
                out.push_str(&format!("{prefix}{value}"));
                done = true;
            } else {
                out.push_str(line);
            }
            out.push('\n');
        }
        assert!(done, "{id} has no {key} in [{section}] to override");
        std::fs::write(&path, out).expect("write node config");
    }

    /// Writes customers `{prefix}{from}` .. `{prefix}{from + n - 1}` at
    /// `city` through the NDJSON bulk endpoint (500 a request), each with a
    /// 200-byte pad; every line must be acknowledged.
    pub fn bulk_customers(&self, city: &str, prefix: &str, from: usize, n: usize) {
        self.bulk_customer_versions(city, prefix, from, n, 0);
    }

    /// As [`Cluster::bulk_customers`], with `version` in each record's
    /// `version` field: writing the same keys again with another version
    /// updates every record.
    pub fn bulk_customer_versions(
        &self,
        city: &str,
        prefix: &str,
        from: usize,
        n: usize,
        version: usize,
    ) {
        for chunk in (from..from + n).collect::<Vec<_>>().chunks(500) {
            let lines: Vec<_> = chunk
                .iter()
                .map(|i| serde_json::json!({"key": format!("{prefix}{i}"), "fields": {"name": format!("n{i}"), "version": version, "pad": "x".repeat(200)}}))
                .collect();
            let r = self.bulk(city, "customer", &lines);
            assert_eq!(r.status, 200, "{:?}", r.body);
            assert_eq!(
                r.body["written"].as_u64(),
                Some(chunk.len() as u64),
                "{:?}",
                r.body
            );
        }
    }

    /// Waits until node `top` holds everything each running city below it
    /// has written: its completeness watermark of the city equals the
    /// city's last sequence number, and every running node's uplink has
    /// nothing left to send. Returns how long that took, `None` on timeout.
    pub fn wait_complete_at(&self, top: &str, timeout: Duration) -> Option<Duration> {
        let t = Instant::now();
        let cities: Vec<String> = self
            .cities_below(top)
            .into_iter()
            .filter(|c| self.is_running(c))
            .collect();
        wait_for(timeout, || {
            let marks = self.get_opt(top, "/v1/status")?.body["links"]["watermarks"].clone();
            for city in &cities {
                let seq = self.get_opt(city, "/v1/status")?.body["last_seq"].as_u64()?;
                if marks[city.as_str()]["seq"].as_u64() != Some(seq) {
                    return None;
                }
            }
            let idle = self.procs.keys().all(|id| {
                self.get_opt(id, "/v1/status").is_some_and(|r| {
                    let parent = &r.body["links"]["parent"];
                    parent.is_null() || parent["lag_records"] == 0
                })
            });
            idle.then(|| t.elapsed())
        })
    }

    /// Stops every node, then checks each non-city node holds exactly the
    /// CRDT merge of the shared items of the cities below it, and no private
    /// item. Returns every node's store.
    pub fn assert_tiers_hold_merge_of_subtree(&mut self) -> BTreeMap<String, Items> {
        use tiersync_protocol::policy::Replicate;
        self.stop_all();
        let policy = crate::example_policy();
        let aggs = tiersync_protocol::aggregate::Compiled::all(&policy);
        let stores: BTreeMap<String, Items> = self
            .deployment
            .nodes
            .iter()
            .map(|n| (n.id.to_string(), self.read_store(n.id.as_str())))
            .collect();
        for n in &self.deployment.nodes {
            if n.tier == tiersync_protocol::Tier::City {
                continue;
            }
            let mut want = Items::new();
            for city in self.cities_below(n.id.as_str()) {
                for (k, item) in &stores[city.as_str()] {
                    if !policy.replicates_up(&k.0) {
                        continue;
                    }
                    // A city's counters travel as published: its share of a
                    // group under privacy.min_group_size as zeros.
                    let published = tiersync_protocol::aggregate::shipped(
                        &aggs,
                        &policy,
                        &tiersync_protocol::NodeId::new(city.as_str()).expect("a node id"),
                        item.clone(),
                    );
                    let item = &published;
                    want.entry(k.clone())
                        .and_modify(|m| {
                            m.merge(item);
                        })
                        .or_insert_with(|| item.clone());
                }
            }
            let have = &stores[n.id.as_str()];
            for k in have.keys() {
                assert_ne!(
                    policy
                        .categories
                        .get(&k.0)
                        .map(|c| c.replicate)
                        .unwrap_or(Replicate::Up),
                    Replicate::Local,
                    "private item {k:?} reached {}",
                    n.id
                );
            }
            assert_eq!(have.len(), want.len(), "item count at {}", n.id);
            for (k, item) in &want {
                assert_eq!(have.get(k), Some(item), "{k:?} at {}", n.id);
            }
        }
        stores
    }
}

/// Checks every write an [`AckedWriter`] saw acknowledged is in `items`
/// (a store read with [`Cluster::read_store`]) with the value written.
pub fn assert_acked_present(items: &Items, acked: &[(String, i64)], at: &str) {
    for (key, n) in acked {
        let k = ("customer".to_string(), key.clone());
        let doc = match items.get(&k) {
            Some(tiersync_protocol::Item::Record(r)) => r.document(),
            other => panic!("acknowledged customer/{key} is missing at {at}: {other:?}"),
        };
        assert_eq!(
            doc.get("n").copied(),
            Some(&tiersync_protocol::Value::Int(*n)),
            "content of acknowledged customer/{key} at {at}"
        );
    }
}

/// A thread that PUTs fresh customers (`{prefix}-{i}`, `{"n": i}`) at one
/// node's API, one at a time, and logs which were acknowledged (HTTP 200).
/// A refused or broken request (the node killed or restarting) is logged as
/// failed and the next key is tried after a short pause.
pub struct AckedWriter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    acked: std::sync::Arc<std::sync::Mutex<Vec<(String, i64)>>>,
    failed: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AckedWriter {
    /// Starts writing to the API at `api` with the operator `token`.
    pub fn start(api: std::net::SocketAddr, token: &str, prefix: &str) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let (s, a, f) = (stop.clone(), acked.clone(), failed.clone());
        let prefix = prefix.to_string();
        let auth = format!("Bearer {token}");
        let thread = std::thread::spawn(move || {
            let agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(10)))
                .build()
                .new_agent();
            let mut i: i64 = 0;
            while !s.load(Ordering::SeqCst) {
                let key = format!("{prefix}-{i}");
                let url = format!("http://{api}/v1/records/customer/{key}");
                let ok = agent
                    .put(&url)
                    .header("authorization", &auth)
                    .content_type("application/json")
                    .send(&serde_json::json!({ "n": i }).to_string())
                    .is_ok_and(|r| r.status() == 200);
                if ok {
                    a.lock().expect("log").push((key, i));
                } else {
                    f.lock().expect("log").push(key);
                    std::thread::sleep(Duration::from_millis(10));
                }
                i += 1;
            }
        });
        Self {
            stop,
            acked,
            failed,
            thread: Some(thread),
        }
    }

    /// Writes acknowledged so far.
    pub fn acked(&self) -> usize {
        self.acked.lock().expect("log").len()
    }

    /// The last write acknowledged so far.
    pub fn last_acked(&self) -> Option<(String, i64)> {
        self.acked.lock().expect("log").last().cloned()
    }

    /// Keys whose write failed so far, in order.
    pub fn failed_keys(&self) -> Vec<String> {
        self.failed.lock().expect("log").clone()
    }

    /// Waits until `n` more writes than `since` are acknowledged.
    pub fn wait_acked(&self, since: usize, n: usize, timeout: Duration) -> bool {
        wait_for(timeout, || (self.acked() >= since + n).then_some(())).is_some()
    }

    /// Stops the thread; returns (acknowledged, failed) writes.
    pub fn finish(mut self) -> (Vec<(String, i64)>, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("writer thread");
        }
        let acked = std::mem::take(&mut *self.acked.lock().expect("log"));
        let failed = std::mem::take(&mut *self.failed.lock().expect("log"));
        (acked, failed)
    }
}

impl Drop for AckedWriter {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, mut c) in std::mem::take(&mut self.procs) {
            let _ = tiersync::process::signal_group(c.id(), tiersync::process::SIGKILL);
            let _ = c.wait();
        }
        // Unmounted once nothing has files open on them, and before the
        // temp dir holding the mount points goes.
        self.powerfs.clear();
    }
}
