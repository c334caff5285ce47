//! Every refusal of the replication handshake and of a batch, each on its
//! own: a real parent process, and a real child process or a hostile
//! in-process QUIC client that speaks the wire protocol directly.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is the test failure report

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value as Json;
use tiersync::certs;
use tiersync::config::TlsSection;
use tiersync::deploygen::{Spec, free_port};
use tiersync::link::{read_frame, write_frame};
use tiersync_protocol::frame::{Frame, PROTOCOL_VERSION, RefuseReason, WireItem};
use tiersync_protocol::{Hlc, Item, NodeId, Record, Stamp, Tier, Value};
use tiersync_tests::cluster::Cluster;
use tiersync_tests::{env_count, example_policy, wait_for};

fn cluster() -> Cluster {
    let mut c = Cluster::new(&Spec {
        provinces: 1,
        cities_per_province: 2,
        ..Spec::default()
    });
    c.start("zhejiang");
    c
}

/// Writes a node file for a child of zhejiang.
fn child_config(
    c: &Cluster,
    name: &str,
    id: &str,
    tier: &str,
    cert: &str,
    ca: &Path,
    policy: &str,
) -> PathBuf {
    let parent = tiersync::config::load(&c.config("zhejiang")).expect("parent config");
    let dir = c.dir.path();
    let text = format!(
        "[node]\nid = {id:?}\ntier = {tier:?}\npolicy = {policy:?}\ndata_dir = \"data/{name}\"\n\n\
         [listen]\npeer = \"127.0.0.1:{}\"\napi = \"127.0.0.1:{}\"\n\n\
         [parent]\nid = \"zhejiang\"\naddr = \"{}\"\n\n\
         [tls]\nca = {:?}\ncert = \"certs/{cert}.pem\"\nkey = \"certs/{cert}.key\"\n",
        free_port().expect("port"),
        free_port().expect("port"),
        parent
            .config
            .listen
            .peer
            .expect("the parent's peer address"),
        ca.display().to_string(),
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("write config");
    path
}

/// Starts the child and waits until its uplink reports an error containing `needle`.
fn assert_uplink_error(c: &mut Cluster, name: &str, config: PathBuf, needle: &str) -> String {
    c.start_with(name, config.clone());
    let api = tiersync::config::load(&config)
        .expect("config")
        .config
        .listen
        .api;
    c.wait_uplink_error(name, api, needle)
}

fn child_status(c: &Cluster, child: &str) -> Json {
    c.get("zhejiang", "/v1/status").body["links"]["children"][child].clone()
}

#[test]
fn unknown_child_is_refused() {
    let mut c = cluster();
    let cert_dir = c.dir.path().join("certs");
    certs::issue(
        &cert_dir,
        &NodeId::new("intruder").unwrap(),
        Some(Tier::City),
        30,
    )
    .unwrap();
    let cfg = child_config(
        &c,
        "intruder",
        "intruder",
        "city",
        "intruder",
        &cert_dir.join("ca.pem"),
        "policy.toml",
    );
    let err = assert_uplink_error(&mut c, "intruder", cfg, "UnknownChild");
    assert!(err.contains("not a configured child"), "{err}");
    assert!(
        child_status(&c, "intruder")["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("UnknownChild")
    );
}

/// Writes `certs/rogue.{pem,key}`: a certificate for hangzhou signed by a
/// CA the deployment does not trust.
fn rogue_certificate(c: &Cluster) {
    let other = c.dir.path().join("other-ca");
    certs::init_ca(&other).unwrap();
    certs::issue(
        &other,
        &NodeId::new("hangzhou").unwrap(),
        Some(Tier::City),
        30,
    )
    .unwrap();
    for ext in ["pem", "key"] {
        std::fs::copy(
            other.join(format!("hangzhou.{ext}")),
            c.dir.path().join(format!("certs/rogue.{ext}")),
        )
        .unwrap();
    }
}

#[test]
fn certificate_from_another_ca_is_refused() {
    let mut c = cluster();
    rogue_certificate(&c);
    // Trusts the real CA (so the parent's certificate verifies) but presents
    // a certificate the parent's CA never signed.
    let cfg = child_config(
        &c,
        "rogue",
        "hangzhou",
        "city",
        "rogue",
        &c.dir.path().join("certs/ca.pem"),
        "policy.toml",
    );
    assert_uplink_error(&mut c, "rogue", cfg, "connect");
    assert!(
        child_status(&c, "hangzhou").is_null(),
        "a link was opened for an unverified certificate"
    );
}

#[test]
fn certificate_of_another_node_is_refused() {
    let mut c = cluster();
    // Claims to be ningbo while presenting hangzhou's certificate.
    let cfg = child_config(
        &c,
        "liar",
        "ningbo",
        "city",
        "hangzhou",
        &c.dir.path().join("certs/ca.pem"),
        "policy.toml",
    );
    // `tiersync run` itself refuses a certificate that is not its node's …
    let out = std::process::Command::new(tiersync_tests::workspace_bin("tiersync"))
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .expect("run tiersync");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tls.cert") && err.contains("is the certificate of node hangzhou, not ningbo"),
        "{err}"
    );
    // … so the liar speaks the protocol directly, and the parent refuses it.
    runtime().block_on(async {
        let mut h = hostile(&c, "hangzhou").await;
        h.send(&hello_frame("ningbo", PROTOCOL_VERSION, 7)).await;
        match h.recv().await {
            Some(Frame::Refuse { reason, message }) => {
                assert!(matches!(reason, RefuseReason::IdMismatch), "{reason:?}");
                assert!(message.contains("certificate is for hangzhou"), "{message}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    });
    c.stop_all();
}

#[test]
fn tier_not_below_parent_is_refused() {
    let mut c = cluster();
    let cfg = child_config(
        &c,
        "upstart",
        "hangzhou",
        "province",
        "hangzhou",
        &c.dir.path().join("certs/ca.pem"),
        "policy.toml",
    );
    assert_uplink_error(&mut c, "upstart", cfg, "TierNotBelow");
}

#[test]
fn different_policy_is_refused() {
    let mut c = cluster();
    let policy = std::fs::read_to_string(c.dir.path().join("policy.toml")).unwrap();
    std::fs::write(
        c.dir.path().join("policy-v2.toml"),
        policy.replace("max_fields = 256", "max_fields = 100"),
    )
    .unwrap();
    let cfg = child_config(
        &c,
        "drifted",
        "hangzhou",
        "city",
        "hangzhou",
        &c.dir.path().join("certs/ca.pem"),
        "policy-v2.toml",
    );
    let err = assert_uplink_error(&mut c, "drifted", cfg, "PolicyMismatch");
    assert!(err.contains("policy digest"), "{err}");
}

// ---- a hostile child speaking the wire protocol directly ----

struct Hostile {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

async fn hostile(c: &Cluster, as_node: &str) -> Hostile {
    hostile_to(c, "zhejiang", as_node).await
}

/// Connects to `parent` with `as_node`'s certificate and opens the stream.
async fn hostile_to(c: &Cluster, parent: &str, as_node: &str) -> Hostile {
    let (endpoint, conn) = connect_to(c, parent, as_node).await;
    let (send, recv) = conn.open_bi().await.unwrap();
    Hostile {
        _endpoint: endpoint,
        conn,
        send,
        recv,
    }
}

/// A connection to `parent` with `as_node`'s certificate, past the TLS
/// handshake (the parent may still close it at once).
async fn connect_to(
    c: &Cluster,
    parent: &str,
    as_node: &str,
) -> (quinn::Endpoint, quinn::Connection) {
    let certs = c.dir.path().join("certs");
    let tls = TlsSection {
        ca: certs.join("ca.pem"),
        cert: certs.join(format!("{as_node}.pem")),
        key: certs.join(format!("{as_node}.key")),
        crl: Some(certs.join("crl.pem")),
    };
    let client = tiersync::tls::quinn_client_config(&tls).unwrap();
    let endpoint = tiersync::tls::client_endpoint("127.0.0.1:0".parse().unwrap(), client).unwrap();
    let addr = c.peer_addr(parent);
    let conn = tiersync::tls::connect(&endpoint, addr, &NodeId::new(parent).unwrap())
        .await
        .unwrap();
    (endpoint, conn)
}

impl Hostile {
    async fn send(&mut self, f: &Frame) {
        write_frame(&mut self.send, f, 1 << 22).await.unwrap();
    }
    async fn recv(&mut self) -> Option<Frame> {
        tokio::time::timeout(Duration::from_secs(10), read_frame(&mut self.recv, 1 << 22))
            .await
            .ok()?
            .ok()?
            .map(|(f, _)| f)
    }
    /// Sends the link's first batch, one customer record of hangzhou's, and
    /// expects its acknowledgement.
    async fn first_record_acked(&mut self, key: &str) {
        self.first_record_of_acked(key, "hangzhou").await;
    }

    /// Sends the link's first batch, one customer record of `origin`'s, and
    /// expects its acknowledgement.
    async fn first_record_of_acked(&mut self, key: &str, origin: &str) {
        self.send(&Frame::Batch {
            after: 0,
            last_seq: 1,
            upto_hlc: Hlc::ZERO,
            items: vec![record("customer", key, origin, tiersync::now_ms())],
            watermarks: vec![],
        })
        .await;
        assert!(matches!(
            self.recv().await,
            Some(Frame::Ack { last_seq: 1 })
        ));
    }

    /// Expects a refusal for `reason` whose message holds `needle`.
    async fn expect_refused(&mut self, reason: RefuseReason, needle: &str) {
        match self.recv().await {
            Some(Frame::Refuse { reason: r, message }) if r == reason => {
                assert!(message.contains(needle), "{message}")
            }
            other => panic!("expected a {reason:?} refusal, got {other:?}"),
        }
    }

    async fn hello(&mut self, node: &str) {
        self.send(&hello_frame(node, PROTOCOL_VERSION, 7)).await;
        assert!(matches!(self.recv().await, Some(Frame::Welcome { .. })));
    }
}

/// A city's Hello claiming to be `node`.
fn hello_frame(node: &str, protocol: u32, incarnation: u64) -> Frame {
    Frame::Hello {
        protocol,
        node: NodeId::new(node).unwrap(),
        tier: Tier::City,
        policy_digest: example_policy().digest(),
        incarnation,
        subtree: vec![],
    }
}

fn record(category: &str, key: &str, origin: &str, ms: u64) -> WireItem {
    let mut r = Record::default();
    r.put(
        BTreeMap::from([("name".to_string(), Value::Str("forged".into()))]),
        Stamp {
            hlc: Hlc {
                physical_ms: ms,
                logical: 0,
            },
            origin: NodeId::new(origin).unwrap(),
        },
    );
    WireItem {
        category: category.into(),
        key: key.into(),
        item: Item::Record(r),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

/// Connects as hangzhou, says hello and sends `items` as its first batch.
async fn first_batch_as_hangzhou(c: &Cluster, items: Vec<WireItem>) -> Hostile {
    let mut h = hostile(c, "hangzhou").await;
    h.hello("hangzhou").await;
    h.send(&Frame::Batch {
        after: 0,
        last_seq: 1,
        upto_hlc: Hlc::ZERO,
        items,
        watermarks: vec![],
    })
    .await;
    h
}

/// Sends one batch holding `item` and expects a Violation refusal, and that
/// the parent stored nothing.
fn assert_batch_refused(item: WireItem, why: &str) {
    let c = cluster();
    let (category, key) = (item.category.clone(), item.key.clone());
    runtime().block_on(async {
        let mut h = first_batch_as_hangzhou(&c, vec![item]).await;
        match h.recv().await {
            Some(Frame::Refuse {
                reason: RefuseReason::Violation,
                message,
            }) => {
                assert!(message.contains(why), "{message}");
            }
            other => panic!("expected a Violation refusal, got {other:?}"),
        }
        h.conn.close(0u32.into(), b"done");
    });
    assert_eq!(
        c.get("zhejiang", &format!("/v1/records/{category}/{key}"))
            .status,
        404
    );
}

#[test]
fn private_category_frame_is_refused() {
    assert_batch_refused(
        record("opportunity", "opp-1", "hangzhou", tiersync::now_ms()),
        "private",
    );
}

#[test]
fn far_future_stamp_is_refused() {
    assert_batch_refused(
        record("customer", "c-9999", "hangzhou", 253_402_300_799_000),
        "ahead of this node's clock",
    );
}

/// Writes under another city's name are dropped, not stored (the link
/// stays up: a city that moved away leaves such writes at its old parent,
/// and they must not stop it).
#[test]
fn forged_origin_stores_nothing() {
    let c = cluster();
    runtime().block_on(async {
        let mut h = first_batch_as_hangzhou(
            &c,
            vec![
                record("customer", "c-forged", "ningbo", tiersync::now_ms()),
                record("customer", "c-honest", "hangzhou", tiersync::now_ms()),
            ],
        )
        .await;
        assert!(
            matches!(h.recv().await, Some(Frame::Ack { last_seq: 1 })),
            "the rest of the batch is merged"
        );
        h.conn.close(0u32.into(), b"done");
    });
    assert_eq!(
        c.get("zhejiang", "/v1/records/customer/c-forged").status,
        404,
        "nothing forged is stored"
    );
    assert_eq!(
        c.get("zhejiang", "/v1/records/customer/c-honest").status,
        200
    );
    let metrics = c.get_text("zhejiang", "/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("tiersync_link_foreign_dropped_total") && !l.ends_with(" 0")),
        "the dropped writes are counted"
    );
}

#[test]
fn garbage_and_oversized_frames_drop_only_that_link() {
    let c = cluster();
    runtime().block_on(async {
        let mut h = hostile(&c, "hangzhou").await;
        // A length prefix of 2 GiB: refused before anything is allocated.
        h.send
            .write_all(&[0x7f, 0xff, 0xff, 0xff, 1])
            .await
            .unwrap();
        // The parent closes the connection (not merely stays silent).
        let closed = tokio::time::timeout(Duration::from_secs(10), h.conn.closed()).await;
        assert!(closed.is_ok(), "the link must be dropped");
        let mut g = hostile(&c, "ningbo").await;
        g.send
            .write_all(&[0, 0, 0, 4, 1, 0xde, 0xad, 0xbe])
            .await
            .unwrap();
        // The parent closes the connection (not merely stays silent).
        let closed = tokio::time::timeout(Duration::from_secs(10), g.conn.closed()).await;
        assert!(closed.is_ok(), "the link must be dropped");
        // Another child is unaffected.
        let mut ok = hostile(&c, "hangzhou").await;
        ok.hello("hangzhou").await;
    });
    assert_eq!(c.get("zhejiang", "/v1/status").status, 200);
}

#[test]
fn unsupported_protocol_version_is_refused() {
    let c = cluster();
    runtime().block_on(async {
        let mut h = hostile(&c, "hangzhou").await;
        h.send(&hello_frame("hangzhou", PROTOCOL_VERSION + 1, 1))
            .await;
        assert!(matches!(
            h.recv().await,
            Some(Frame::Refuse {
                reason: RefuseReason::UnsupportedVersion,
                ..
            })
        ));
    });
}

#[test]
fn a_flood_of_idle_connections_does_not_block_a_real_child() {
    let c = cluster();
    runtime().block_on(async {
        // 100 authenticated connections that never say Hello (all but
        // MAX_LINKS_PER_IDENTITY of them closed by the parent at once).
        let mut idle = Vec::new();
        for _ in 0..100 {
            idle.push(connect_to(&c, "zhejiang", "ningbo").await);
        }
        let mut real = hostile(&c, "hangzhou").await;
        real.hello("hangzhou").await;
        real.first_record_acked("c-during-flood").await;
        drop(idle);
    });
    assert_eq!(
        c.get("zhejiang", "/v1/records/customer/c-during-flood")
            .status,
        200
    );
}

#[test]
fn a_peer_stalling_mid_frame_is_dropped_and_others_go_on() {
    let c = cluster();
    runtime().block_on(async {
        let mut h = hostile(&c, "hangzhou").await;
        h.hello("hangzhou").await;
        // A frame that announces 100 bytes, sends 6 of them, then nothing.
        h.send
            .write_all(&[0, 0, 0, 100, 1, 0, 0, 0, 0, 0])
            .await
            .unwrap();
        // Meanwhile another child is served.
        let mut other = hostile(&c, "ningbo").await;
        other.hello("ningbo").await;
        // The parent gives up on the stalled frame and closes that link.
        let wait = tiersync::link::FRAME_BODY_TIMEOUT + Duration::from_secs(15);
        let closed = tokio::time::timeout(wait, h.conn.closed()).await;
        assert!(closed.is_ok(), "a stalled frame must drop the link");
    });
    assert_eq!(c.get("zhejiang", "/v1/status").status, 200);
}

/// Resident memory of process `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The admin token `refused` reads the metrics with.
/// The admin token of each node whose `/metrics` a test reads, by API
/// address (tests run in parallel, each with its own cluster).
static METRICS_TOKENS: std::sync::Mutex<std::collections::BTreeMap<std::net::SocketAddr, String>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// Lets [`refused`] and [`metrics_client`] read `id`'s metrics.
fn metrics_of(c: &Cluster, id: &str) -> std::net::SocketAddr {
    let api = c.api(id);
    METRICS_TOKENS
        .lock()
        .unwrap()
        .insert(api, c.tokens(id).admin);
    api
}

/// A client of the API at `api` with its admin token ([`metrics_of`]).
fn metrics_client(api: std::net::SocketAddr) -> tiersync::client::Client {
    let token = METRICS_TOKENS
        .lock()
        .unwrap()
        .get(&api)
        .cloned()
        .unwrap_or_default();
    tiersync::client::Client::with_credentials(
        &api.to_string(),
        Duration::from_secs(10),
        &tiersync::client::Credentials::token(token),
    )
    .unwrap()
}

/// How many connections the parent at `api` refused for `reason`.
fn refused(api: std::net::SocketAddr, reason: &str) -> usize {
    let text = metrics_client(api).metrics().unwrap();
    tiersync::client::metric_value(&text, "tiersync_link_refused_total", &[("reason", reason)])
        .unwrap_or(0.0) as usize
}

#[test]
fn a_flood_of_connection_attempts_is_refused_while_real_children_are_served() {
    // 200 flooders on another loopback address (127.0.0.2) connect again and
    // again with a foreign CA's certificate, far more at once than the
    // parent's caps of pending handshakes (64, and 8 per address), until at
    // least TIERSYNC_FLOOD attempts were made and a new child was admitted
    // during the flood.
    const FLOODERS: usize = 200;
    let flood = env_count("TIERSYNC_FLOOD", 500);
    let c = cluster();
    rogue_certificate(&c);
    let pid = c.pid("zhejiang").unwrap();
    let api = metrics_of(&c, "zhejiang");
    let rss_before = rss_kib(pid);
    let certs = c.dir.path().join("certs");
    let tls = TlsSection {
        ca: certs.join("ca.pem"),
        cert: certs.join("rogue.pem"),
        key: certs.join("rogue.key"),
        crl: None,
    };
    let parent = c.peer_addr("zhejiang");
    let zhejiang = NodeId::new("zhejiang").unwrap();
    let made = Arc::new(AtomicUsize::new(0));
    let left_open = Arc::new(AtomicUsize::new(0));
    let peak_kib = Arc::new(AtomicU64::new(rss_before));
    runtime().block_on(async {
        let client = tiersync::tls::quinn_client_config(&tls).unwrap();
        let endpoint =
            tiersync::tls::client_endpoint("127.0.0.2:0".parse().unwrap(), client).unwrap();
        // A real child is connected before the flood starts.
        let mut real = hostile(&c, "hangzhou").await;
        real.hello("hangzhou").await;
        let done = Arc::new(AtomicBool::new(false));
        let mut flooders = tokio::task::JoinSet::new();
        for _ in 0..FLOODERS {
            let (endpoint, zhejiang) = (endpoint.clone(), zhejiang.clone());
            let (made, left_open, peak_kib, done) = (
                made.clone(),
                left_open.clone(),
                peak_kib.clone(),
                done.clone(),
            );
            flooders.spawn(async move {
                while !(done.load(Ordering::SeqCst) && made.load(Ordering::SeqCst) >= flood) {
                    made.fetch_add(1, Ordering::SeqCst);
                    // TLS 1.3 lets the client finish its side before the
                    // server checks the client certificate: a refusal may
                    // come as the handshake failing or as the connection
                    // being closed.
                    let refused = match tiersync::tls::connect(&endpoint, parent, &zhejiang).await {
                        Err(_) => true,
                        Ok(conn) => tokio::time::timeout(Duration::from_secs(20), conn.closed())
                            .await
                            .is_ok(),
                    };
                    if !refused {
                        left_open.fetch_add(1, Ordering::SeqCst);
                    }
                    peak_kib.fetch_max(rss_kib(pid), Ordering::SeqCst);
                }
            });
        }
        // The flood is on once the parent refuses the flooders' address.
        let saturated = tokio::task::spawn_blocking(move || {
            wait_for(Duration::from_secs(30), || {
                (refused(api, "address_overload") > 0).then_some(())
            })
        })
        .await
        .unwrap();
        assert!(
            saturated.is_some(),
            "the flood never reached the per-address cap ({} attempts made; {:?})",
            made.load(Ordering::SeqCst),
            metrics_client(api)
                .metrics()
                .unwrap()
                .lines()
                .filter(|l| l.contains("refused"))
                .collect::<Vec<_>>()
        );
        // Meanwhile the connected child's link goes on, and a new child
        // (from 127.0.0.1) is admitted.
        real.first_record_acked("c-during-handshake-flood").await;
        let mut late = hostile(&c, "ningbo").await;
        late.hello("ningbo").await;
        done.store(true, Ordering::SeqCst);
        while let Some(r) = flooders.join_next().await {
            r.unwrap();
        }
    });
    let (made, left_open, peak_kib) = (
        made.load(Ordering::SeqCst),
        left_open.load(Ordering::SeqCst),
        peak_kib.load(Ordering::SeqCst),
    );
    assert_eq!(
        left_open, 0,
        "connections with a foreign certificate stayed open"
    );
    assert_eq!(
        c.get("zhejiang", "/v1/records/customer/c-during-handshake-flood")
            .status,
        200
    );
    let reasons = ["address_overload", "overload", "handshake", "timeout"];
    // The parent counts a refusal as its handshake task ends, which may be
    // just after the client saw the connection close. (An attempt may count
    // twice: a client that resends its first packet after a refusal is a
    // new incoming connection to the parent.)
    let by_reason = wait_for(Duration::from_secs(10), || {
        let by_reason: Vec<(&str, usize)> = reasons.iter().map(|r| (*r, refused(api, r))).collect();
        (by_reason.iter().map(|(_, n)| n).sum::<usize>() >= made).then_some(by_reason)
    })
    .unwrap_or_else(|| panic!("the parent counted fewer refusals than the {made} attempts"));
    // Memory stays bounded: refused attempts leave nothing behind.
    let grew_mib = peak_kib.saturating_sub(rss_before) / 1024;
    assert!(
        grew_mib < 64,
        "the parent's RSS grew by {grew_mib} MiB during a flood of {made} attempts"
    );
    eprintln!(
        "refusals flood: {made} connection attempts from {FLOODERS} flooders with a foreign \
         certificate, all refused (by reason: {}); a connected child served and a new child \
         admitted during the flood; parent RSS {} MiB -> peak {} MiB",
        by_reason
            .iter()
            .map(|(r, n)| format!("{r} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        rss_before / 1024,
        peak_kib / 1024
    );
}

// ---- issue 15: a hostile child holding a valid certificate ----

/// Case 1: a record just under the frame limit (once stored, it would have
/// made every later batch of the province too large to send) is refused,
/// nothing of it is stored, and another child is served.
#[test]
fn an_item_over_the_policy_limits_is_refused_and_stores_nothing() {
    let c = cluster();
    let mut r = Record::default();
    r.put(
        BTreeMap::from([(
            "name".to_string(),
            Value::Str("x".repeat(example_policy().limits.max_frame_bytes - 4096)),
        )]),
        Stamp {
            hlc: Hlc {
                physical_ms: tiersync::now_ms(),
                logical: 0,
            },
            origin: NodeId::new("hangzhou").unwrap(),
        },
    );
    let item = WireItem {
        category: "customer".into(),
        key: "c-huge".into(),
        item: Item::Record(r),
    };
    runtime().block_on(async {
        let mut h = first_batch_as_hangzhou(&c, vec![item]).await;
        h.expect_refused(RefuseReason::Violation, "max_item_bytes")
            .await;
        // The honest sibling is served.
        let mut ok = hostile(&c, "ningbo").await;
        ok.hello("ningbo").await;
        ok.first_record_of_acked("c-ningbo", "ningbo").await;
    });
    assert_eq!(c.get("zhejiang", "/v1/records/customer/c-huge").status, 404);
    assert_eq!(
        c.get("zhejiang", "/v1/records/customer/c-ningbo").status,
        200
    );
}

/// Case 7: before its Hello a peer can announce no more than a Hello-sized
/// frame (the parent closes at once instead of waiting for a full data
/// frame), must send its Hello in time, and one identity holds at most
/// `MAX_LINKS_PER_IDENTITY` connections; another child is served meanwhile.
#[test]
fn before_the_hello_a_peer_holds_little_and_one_identity_few_links() {
    use tiersync::link::downlink::{HELLO_MAX_BYTES, HELLO_TIMEOUT, MAX_LINKS_PER_IDENTITY};
    let c = cluster();
    let api = metrics_of(&c, "zhejiang");
    runtime().block_on(async {
        // A first frame announced larger than a Hello: closed without
        // waiting for its body (which would take FRAME_BODY_TIMEOUT).
        let mut big = hostile(&c, "hangzhou").await;
        let len = u32::try_from(HELLO_MAX_BYTES + 1).unwrap();
        // (The parent may close before the bytes after the prefix arrive.)
        let mut prefix = len.to_be_bytes().to_vec();
        prefix.extend([1, 0, 0]);
        big.send.write_all(&prefix).await.unwrap();
        let closed =
            tokio::time::timeout(tiersync::link::FRAME_BODY_TIMEOUT / 2, big.conn.closed()).await;
        assert!(
            closed.is_ok(),
            "an oversized first frame must drop the link at once"
        );

        // More connections of one identity than allowed: the extra one is
        // closed; those within the cap (each past its Hello) stay.
        let mut held = Vec::new();
        for _ in 0..MAX_LINKS_PER_IDENTITY {
            let mut h = hostile(&c, "hangzhou").await;
            h.hello("hangzhou").await;
            held.push(h);
        }
        let (_extra_endpoint, extra) = connect_to(&c, "zhejiang", "hangzhou").await;
        let closed = tokio::time::timeout(Duration::from_secs(10), extra.closed()).await;
        assert!(
            closed.is_ok(),
            "a connection beyond the identity's cap must be closed"
        );
        assert!(held.iter().all(|h| h.conn.close_reason().is_none()));

        // Another child is served meanwhile.
        let mut ok = hostile(&c, "ningbo").await;
        ok.hello("ningbo").await;

        // A connection that never says Hello is closed after HELLO_TIMEOUT.
        let silent = hostile(&c, "ningbo").await;
        let closed = tokio::time::timeout(
            HELLO_TIMEOUT + Duration::from_secs(10),
            silent.conn.closed(),
        )
        .await;
        assert!(closed.is_ok(), "a peer without a Hello must be dropped");
        assert!(ok.conn.close_reason().is_none());

        // Once a link is gone, its identity's slot is free again.
        drop(held.pop());
        let mut again = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let (endpoint, conn) = connect_to(&c, "zhejiang", "hangzhou").await;
                let Ok((send, recv)) = conn.open_bi().await else {
                    continue;
                };
                let mut h = Hostile {
                    _endpoint: endpoint,
                    conn,
                    send,
                    recv,
                };
                let hello = hello_frame("hangzhou", PROTOCOL_VERSION, 7);
                if write_frame(&mut h.send, &hello, 1 << 22).await.is_err() {
                    continue;
                }
                if let Some(Frame::Welcome { .. }) = h.recv().await {
                    return h;
                }
            }
        })
        .await
        .expect("the freed slot is taken again");
        again.first_record_acked("c-after-cap").await;
    });
    assert!(refused(api, "identity_overload") >= 1);
    assert!(refused(api, "hello_timeout") >= 1);
}

/// The rows of aggregate `name` at zhejiang.
fn aggregate_rows(c: &Cluster, name: &str) -> Vec<Json> {
    let r = c.get("zhejiang", &format!("/v1/aggregates/{name}"));
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body["rows"].as_array().cloned().unwrap_or_default()
}

/// Counters of the example policy's private opportunity aggregate: a share
/// of `actor` in the group of origin `group_origin`.
fn opportunity_counters(group_origin: &str, actor: &str, count: i128) -> WireItem {
    use tiersync_protocol::aggregate::{COUNTERS_CATEGORY, Compiled, Counters};
    let policy = example_policy();
    let agg = Compiled::all(&policy)
        .into_iter()
        .find(|a| a.name == "opportunities_by_city_stage_month")
        .unwrap();
    let group = vec![
        Some(group_origin.to_string()),
        Some("won".to_string()),
        Some("2026-09".to_string()),
    ];
    let mut c = Counters::new(&agg.name, group.clone(), agg.measures.len());
    c.set(
        &NodeId::new(actor).unwrap(),
        vec![count, count * 1_000_000],
        Hlc {
            physical_ms: tiersync::now_ms(),
            logical: 0,
        },
        7,
    );
    WireItem {
        category: COUNTERS_CATEGORY.into(),
        key: agg.counters_key(&group),
        item: Item::Counters(c),
    }
}

/// Case 2: a city's counters in another city's group (origin ≠ actor) are
/// refused; another city's share is dropped; nothing forged is counted, and
/// the honest city's own counters are.
#[test]
fn forged_private_counters_are_refused_and_count_nothing() {
    let c = cluster();
    runtime().block_on(async {
        let mut h =
            first_batch_as_hangzhou(&c, vec![opportunity_counters("ningbo", "hangzhou", 1000)])
                .await;
        h.expect_refused(RefuseReason::Violation, "group of origin ningbo")
            .await;
        // Another city's share under its own origin: dropped, the link
        // goes on with hangzhou's own counters.
        let mut h = first_batch_as_hangzhou(
            &c,
            vec![
                opportunity_counters("ningbo", "ningbo", 1000),
                opportunity_counters("hangzhou", "hangzhou", 5),
            ],
        )
        .await;
        assert!(matches!(h.recv().await, Some(Frame::Ack { last_seq: 1 })));
    });
    let rows = aggregate_rows(&c, "opportunities_by_city_stage_month");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["group"]["origin"], "hangzhou", "{rows:?}");
    assert_eq!(rows[0]["values"]["count"], 5, "{rows:?}");
}

/// Case 8: bill lines whose amounts would overflow the aggregate's total
/// (1e33) are refused, not stored, and the totals stay exact.
#[test]
fn out_of_range_amounts_are_refused_and_totals_stay_exact() {
    let c = cluster();
    let bill = |key: &str, amount: Value| WireItem {
        category: "billing".into(),
        key: key.into(),
        item: Item::Log(tiersync_protocol::LogEntry {
            fields: BTreeMap::from([
                ("amount".to_string(), amount),
                ("billed_at".to_string(), Value::Str("2026-09-01".into())),
                ("customer_id".to_string(), Value::Str("c-1".into())),
            ]),
            stamp: Stamp {
                hlc: Hlc {
                    physical_ms: tiersync::now_ms(),
                    logical: 0,
                },
                origin: NodeId::new("hangzhou").unwrap(),
            },
        }),
    };
    runtime().block_on(async {
        let mut h = first_batch_as_hangzhou(
            &c,
            vec![
                bill("b-huge-1", Value::Float(1e33)),
                bill("b-huge-2", Value::Float(1e33)),
            ],
        )
        .await;
        h.expect_refused(RefuseReason::Violation, "largest summed value")
            .await;
        let mut h = first_batch_as_hangzhou(&c, vec![bill("b-ok", Value::Float(12.5))]).await;
        assert!(matches!(h.recv().await, Some(Frame::Ack { last_seq: 1 })));
    });
    assert_eq!(
        c.get("zhejiang", "/v1/records/billing/b-huge-1").status,
        404
    );
    let rows = aggregate_rows(&c, "billing_by_city_month");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["values"]["sum(amount)"], 12.5, "{rows:?}");
}

/// Case 4: `certs revoke` and a reload: the revoked child's live link is
/// closed, its new connections are refused, nothing it sends after is
/// stored, and its sibling is unaffected.
#[test]
fn a_revoked_certificate_is_refused_after_a_reload() {
    let c = cluster();
    let api = metrics_of(&c, "zhejiang");
    let certs_dir = c.dir.path().join("certs");
    runtime().block_on(async {
        let mut h = hostile(&c, "hangzhou").await;
        h.hello("hangzhou").await;
        h.first_record_acked("c-before-revocation").await;
        let mut sibling = hostile(&c, "ningbo").await;
        sibling.hello("ningbo").await;

        certs::revoke(&certs_dir, &NodeId::new("hangzhou").unwrap()).unwrap();
        let out = std::process::Command::new(tiersync_tests::workspace_bin("tiersync"))
            .args(["reload", "--timeout", "30", "--token"])
            .arg(c.token("zhejiang"))
            .arg("--config")
            .arg(c.config("zhejiang"))
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{said} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(said.contains("revocation list"), "{said}");

        // The live link is closed …
        let closed = tokio::time::timeout(Duration::from_secs(10), h.conn.closed()).await;
        assert!(
            closed.is_ok(),
            "the revoked child's live link must be closed"
        );
        // … and a new connection with the revoked certificate is refused.
        let certs = c.dir.path().join("certs");
        let tls = TlsSection {
            ca: certs.join("ca.pem"),
            cert: certs.join("hangzhou.pem"),
            key: certs.join("hangzhou.key"),
            crl: None,
        };
        let client = tiersync::tls::quinn_client_config(&tls).unwrap();
        let endpoint =
            tiersync::tls::client_endpoint("127.0.0.1:0".parse().unwrap(), client).unwrap();
        let refused = match tiersync::tls::connect(
            &endpoint,
            c.peer_addr("zhejiang"),
            &NodeId::new("zhejiang").unwrap(),
        )
        .await
        {
            Err(_) => true,
            // TLS 1.3: the client may finish before the server checked its
            // certificate; then the server closes the connection.
            Ok(conn) => match conn.open_bi().await {
                Err(_) => true,
                Ok((mut send, mut recv)) => {
                    let hello = hello_frame("hangzhou", PROTOCOL_VERSION, 7);
                    let _ = write_frame(&mut send, &hello, 1 << 22).await;
                    let answer = tokio::time::timeout(
                        Duration::from_secs(10),
                        read_frame(&mut recv, 1 << 22),
                    )
                    .await;
                    !matches!(answer, Ok(Ok(Some((Frame::Welcome { .. }, _)))))
                }
            },
        };
        assert!(refused, "a revoked certificate must not get a link");
        // The sibling goes on.
        sibling
            .first_record_of_acked("c-sibling-after-revocation", "ningbo")
            .await;
    });
    assert_eq!(
        c.get(
            "zhejiang",
            "/v1/records/customer/c-sibling-after-revocation"
        )
        .status,
        200
    );
    assert!(refused(api, "revoked") >= 1);
}

/// Case 3: the tree comes from national's configuration (`[subtree]`), the
/// tier from the certificate: a province (valid certificate) claiming its
/// sibling's city, or saying it is a city, is refused; nothing it sends is
/// stored; the sibling province is accepted with its own cities.
#[test]
fn a_province_cannot_claim_another_provinces_cities() {
    let mut c = Cluster::new(&Spec {
        provinces: 2,
        cities_per_province: 1,
        ..Spec::default()
    });
    c.start("national");
    let (zhejiang, jiangsu) = ("zhejiang", "jiangsu");
    let (theirs, mine) = (
        c.cities_below(jiangsu)[0].clone(),
        c.cities_below(zhejiang)[0].clone(),
    );
    let hello = |node: &str, tier: Tier, subtree: Vec<&str>| Frame::Hello {
        protocol: PROTOCOL_VERSION,
        node: NodeId::new(node).unwrap(),
        tier,
        policy_digest: example_policy().digest(),
        incarnation: 7,
        subtree: subtree
            .into_iter()
            .map(|n| NodeId::new(n).unwrap())
            .collect(),
    };
    runtime().block_on(async {
        // While jiangsu is down, zhejiang claims jiangsu's city.
        let mut h = hostile_to(&c, "national", zhejiang).await;
        h.send(&hello(zhejiang, Tier::Province, vec![&mine, &theirs]))
            .await;
        h.expect_refused(RefuseReason::Violation, "does not place below it")
            .await;
        // The tier is the certificate's, not the Hello's.
        let mut h = hostile_to(&c, "national", zhejiang).await;
        h.send(&hello(zhejiang, Tier::City, vec![])).await;
        match h.recv().await {
            Some(Frame::Refuse {
                reason: RefuseReason::IdMismatch,
                message,
            }) => assert!(
                message.contains("certificate is for a province"),
                "{message}"
            ),
            other => panic!("expected an IdMismatch refusal, got {other:?}"),
        }
        // jiangsu, with its own city, is accepted and what it relays stored.
        let mut ok = hostile_to(&c, "national", jiangsu).await;
        ok.send(&hello(jiangsu, Tier::Province, vec![&theirs]))
            .await;
        assert!(matches!(ok.recv().await, Some(Frame::Welcome { .. })));
        ok.send(&Frame::Batch {
            after: 0,
            last_seq: 1,
            upto_hlc: Hlc::ZERO,
            items: vec![record(
                "customer",
                "c-of-their-city",
                &theirs,
                tiersync::now_ms(),
            )],
            watermarks: vec![],
        })
        .await;
        assert!(matches!(ok.recv().await, Some(Frame::Ack { last_seq: 1 })));
    });
    assert_eq!(
        c.get("national", "/v1/records/customer/c-of-their-city")
            .status,
        200
    );
}
