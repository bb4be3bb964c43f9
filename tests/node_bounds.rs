//! End to end through real processes: a node stays bounded under abuse and never gets stuck.
//! - With no upstream, a 1 MiB outbox refuses uploads without a critical event (503,
//!   `outbox_full`, Retry-After) once three quarters full while a critical upload is still
//!   accepted, and never holds more than its bound; when a manager comes up on the upstream's
//!   address every queued event arrives exactly once, the critical one first, and uploads
//!   are accepted again.
//! - The outbox's counts (`gup_events_queued`, `gup_outbox_bytes`) are the same after a
//!   restart and after a SIGKILL.
//! - 30,000 heartbeats whose JSON is over 16 MiB in all (the manager's batch limit) all reach
//!   the manager's registry: the relay splits them into batches.
//! - An upstream that answers 413 to one heartbeat batch: that batch is dropped and counted,
//!   the batches after it in the same pass and later heartbeats still arrive.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};

const SMALL_OUTBOX: &str = "\n[events]\noutbox_max_bytes = 1048576\n";
const MIB: f64 = 1048576.0;

/// A loopback port held bound but not listening: connections to it are refused, and no
/// other server (of a test running beside this one) can take it until it is released, just
/// before the upstream meant for it starts. (`free_port` releases its port at once, and two
/// tests that got the same one would feed each other's upstreams.)
struct Reserved {
    socket: Option<socket2::Socket>,
    addr: String,
}

impl Reserved {
    fn new() -> Reserved {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
        socket.bind(&any.into()).unwrap();
        let addr = socket
            .local_addr()
            .unwrap()
            .as_socket()
            .unwrap()
            .to_string();
        Reserved {
            socket: Some(socket),
            addr,
        }
    }

    /// Frees the port for the server that is to listen on it now.
    fn release(&mut self) -> String {
        self.socket = None;
        self.addr.clone()
    }
}

/// An HTTP client that drops idle connections long before the node closes them (10 s):
/// reusing one the node is closing at that moment would be reset.
fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_idle_timeout(std::time::Duration::from_secs(2))
        .build()
        .unwrap()
}

fn event(id: &str, kind: &str) -> Value {
    json!({"id": id, "kind": kind, "subkind": "x", "time": "2026-11-24T10:00:00Z",
           "data": {"pad": "p".repeat(900)}})
}

/// POSTs an upload of events; (status, Retry-After, JSON body).
async fn upload(
    client: &reqwest::Client,
    node: &str,
    client_id: &str,
    events: &[Value],
) -> (u16, Option<String>, Value) {
    let r = client
        .post(format!("{node}/v1/events"))
        .json(&json!({"client_id": client_id, "events": events}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (status, retry, r.json().await.unwrap_or(Value::Null))
}

/// Every event the manager stored, in the order it stored them (following the cursor).
async fn all_events(manager: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut path = "/v1/admin/events?limit=1000".to_string();
    for _ in 0..1000 {
        let (status, v) = admin_call(manager, reqwest::Method::GET, &path, None).await;
        assert_eq!(status, 200, "{v}");
        out.extend(v["events"].as_array().cloned().unwrap_or_default());
        match v["next"].as_u64() {
            Some(n) => path = format!("/v1/admin/events?limit=1000&after={n}"),
            None => return out,
        }
    }
    panic!("more than 1000 pages of events");
}

async fn outbox_bytes(client: &reqwest::Client, node: &str) -> (f64, f64) {
    (
        metric(client, node, "gup_outbox_bytes{lane=\"critical\"}").await,
        metric(client, node, "gup_outbox_bytes{lane=\"normal\"}").await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_refuses_routine_uploads_keeps_room_for_critical_ones_and_drains_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut upstream = Reserved::new();
    // One sync first (a node that never synced cannot check who its clients are), then no
    // upstream answers until the manager comes back on the same address.
    let listen = upstream.release();
    let first = start_manager_on(&dir.path().join("m"), &listen, &[]);
    let node = start_node_toml(&dir.path().join("n"), &[&first.url], SMALL_OUTBOX, &[]);
    wait_ready(&node.url).await;
    first.kill9();
    let client = http();
    assert_eq!(
        metric(&client, &node.url, "gup_outbox_max_bytes").await,
        MIB
    );

    // Routine uploads of about 10 KB until the node refuses one.
    let mut accepted: Vec<(String, String)> = Vec::new();
    let mut refused = None;
    for u in 0..200 {
        let cid = format!("pc-{u}");
        let events: Vec<Value> = (0..10)
            .map(|i| event(&format!("e{i}"), "system_change"))
            .collect();
        let (status, retry, body) = upload(&client, &node.url, &cid, &events).await;
        if status == 503 {
            refused = Some((retry, body));
            break;
        }
        assert_eq!(status, 202, "{body}");
        accepted.extend((0..10).map(|i| (cid.clone(), format!("e{i}"))));
    }
    let (retry, body) = refused.expect("the outbox refused routine uploads");
    assert_eq!(body["error"], "outbox_full", "{body}");
    assert!(retry
        .and_then(|r| r.parse::<u64>().ok())
        .is_some_and(|s| s >= 1));
    assert!(accepted.len() >= 500, "{} accepted", accepted.len());
    let (critical, normal) = outbox_bytes(&client, &node.url).await;
    assert_eq!(critical, 0.0);
    assert!(normal <= 0.75 * MIB, "{normal}");
    assert!(normal > 0.70 * MIB, "{normal}");

    // A critical upload still goes in, into the reserve; the bound holds.
    let (status, _, body) = upload(
        &client,
        &node.url,
        "pc-alarm",
        &[event("alarm", "intrusion")],
    )
    .await;
    assert_eq!(status, 202, "{body}");
    accepted.push(("pc-alarm".into(), "alarm".into()));
    // Routine uploads are still refused.
    let routine: Vec<Value> = (0..10)
        .map(|i| event(&format!("late{i}"), "system_change"))
        .collect();
    let (status, _, _) = upload(&client, &node.url, "pc-late", &routine).await;
    assert_eq!(status, 503);
    let (critical, normal) = outbox_bytes(&client, &node.url).await;
    assert!(critical > 0.0);
    assert!(critical + normal <= MIB, "{critical} + {normal}");
    assert!(metric(&client, &node.url, "gup_outbox_refused_total").await >= 2.0);
    assert_eq!(
        metric(&client, &node.url, "gup_events_queued").await,
        accepted.len() as f64
    );

    // The upstream comes up: everything queued arrives once, the critical event first.
    let manager = start_manager_on(&dir.path().join("m"), &listen, &[]);
    let nu = node.url.clone();
    wait_for(60, "the outbox drains", || {
        let (c, u) = (client.clone(), nu.clone());
        async move { (metric(&c, &u, "gup_events_queued").await == 0.0).then_some(()) }
    })
    .await;
    let events = all_events(&manager.url).await;
    assert_eq!(events.len(), accepted.len());
    let stored: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            (
                e["client_id"].as_str().unwrap_or("").to_string(),
                e["id"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let unique: HashSet<&(String, String)> = stored.iter().collect();
    assert_eq!(unique.len(), stored.len(), "an event was stored twice");
    assert_eq!(unique, accepted.iter().collect::<HashSet<_>>());
    assert_eq!(events[0]["id"], "alarm", "the critical event went first");
    assert_eq!(outbox_bytes(&client, &node.url).await, (0.0, 0.0));
    assert_eq!(
        metric(&client, &node.url, "gup_events_forwarded_total").await,
        accepted.len() as f64
    );

    // Room again.
    let (status, _, body) = upload(
        &client,
        &node.url,
        "pc-late",
        &[event("late", "system_change")],
    )
    .await;
    assert_eq!(status, 202, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_counts_are_the_same_after_a_restart_and_after_a_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    // One sync from a manager that then goes away: its address answers nobody after.
    let first = start_manager(&dir.path().join("m"), &[]);
    let nobody = first.url.clone();
    let n_dir = dir.path().join("n");
    let node = start_node_toml(&n_dir, &[&nobody], SMALL_OUTBOX, &[]);
    wait_ready(&node.url).await;
    first.kill9();
    let client = http();
    let mut queued = 0;
    for u in 0..30 {
        let kind = if u % 7 == 0 { "risk" } else { "system_change" };
        let events: Vec<Value> = (0..1 + u % 4)
            .map(|i| event(&format!("e{i}"), kind))
            .collect();
        queued += events.len();
        let (status, _, body) = upload(&client, &node.url, &format!("pc-{u}"), &events).await;
        assert_eq!(status, 202, "{body}");
    }
    let counts = |url: String| {
        let c = client.clone();
        async move {
            let (critical, normal) = outbox_bytes(&c, &url).await;
            (
                metric(&c, &url, "gup_events_queued").await,
                critical,
                normal,
            )
        }
    };
    let before = counts(node.url.clone()).await;
    assert_eq!(before.0, queued as f64);
    assert!(before.1 > 0.0 && before.2 > 0.0);
    assert_eq!(node.stop(), Some(0));

    let node = start_node_toml(&n_dir, &[&nobody], SMALL_OUTBOX, &[]);
    assert_eq!(counts(node.url.clone()).await, before);
    node.kill9();
    let node = start_node_toml(&n_dir, &[&nobody], SMALL_OUTBOX, &[]);
    assert_eq!(counts(node.url.clone()).await, before);
}

/// A heartbeat with every text field long, within the validation limits.
fn long_heartbeat(id: &str) -> Value {
    json!({"client_id": format!("{id}-{}", "i".repeat(100)), "client_version": "9".repeat(64),
           "user": "u".repeat(256), "os": "windows", "mode": "computer"})
}

/// Sends `n` long heartbeats `{prefix}{i}` to the node, 64 at a time; returns the bytes of
/// their JSON as the node relays them.
async fn heartbeat_burst(node: &str, prefix: &str, n: usize) -> usize {
    let client = http();
    let sizes: Vec<usize> = futures_util::stream::iter(0..n)
        .map(|i| {
            let (c, url) = (client.clone(), format!("{node}/v1/heartbeat"));
            let body = long_heartbeat(&format!("{prefix}{i:05}"));
            async move {
                let relayed = gup::core::proto::RelayedHeartbeat {
                    heartbeat: serde_json::from_value(body.clone()).unwrap(),
                    address: Some("127.0.0.1".into()),
                    // As the node stamps them: its id and the time it received the heartbeat.
                    via: Some("node-0123456789abcdef".into()),
                    received_at: Some(chrono::Utc::now()),
                };
                let len = serde_json::to_vec(&relayed).unwrap().len();
                let r = c.post(url).json(&body).send().await.unwrap();
                assert_eq!(r.status(), 200);
                len
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    sizes.into_iter().sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_over_the_batch_limit_in_all_reach_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let mut upstream = Reserved::new();
    let listen = upstream.release();
    let manager = start_manager_on(&dir.path().join("m"), &listen, &[]);
    // Many new clients from one address: the test's own, so no per-address bound here.
    let node = start_node_toml(
        &dir.path().join("n"),
        &[&manager.url],
        UNBOUNDED_NEWCOMERS,
        &[],
    );
    wait_ready(&node.url).await;
    assert_eq!(manager.stop(), Some(0));
    let client = http();
    // Queued while the upstream is away, so that the first relay carries all of them.
    let bytes = heartbeat_burst(&node.url, "hb-", 30_000).await;
    assert!(bytes > 16 << 20, "{bytes} bytes of heartbeats");
    assert_eq!(
        metric(&client, &node.url, "gup_relay_pending").await,
        30_000.0
    );

    let manager = start_manager_on(&dir.path().join("m"), &listen, &[]);
    let nu = node.url.clone();
    wait_for(120, "every heartbeat is relayed", || {
        let (c, u) = (client.clone(), nu.clone());
        async move { (metric(&c, &u, "gup_relay_pending").await == 0.0).then_some(()) }
    })
    .await;
    assert_eq!(
        metric(&client, &node.url, "gup_relay_dropped_total").await,
        0.0
    );
    // The registry a page at a time (bounded: 30,000 clients are 3 pages of 10,000).
    let mut ids: HashSet<String> = HashSet::new();
    let mut after: Option<String> = None;
    for _ in 0..10 {
        let path = match &after {
            Some(a) => format!("/v1/admin/clients?limit=10000&after={a}"),
            None => "/v1/admin/clients?limit=10000".to_string(),
        };
        let (status, v) = admin_call(&manager.url, reqwest::Method::GET, &path, None).await;
        assert_eq!(status, 200, "{v}");
        ids.extend(
            v["clients"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|c| c["client_id"].as_str())
                .filter(|id| id.starts_with("hb-"))
                .map(str::to_string),
        );
        match v["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
    }
    assert_eq!(ids.len(), 30_000);
}

/// A node config tail that lets one address introduce any number of client ids.
const UNBOUNDED_NEWCOMERS: &str = "\n[limits]\nnew_clients_per_minute = 0\n";

/// An empty but valid `/v1/sync` snapshot, so that the node behind the hostile upstream is
/// ready (an unsynced node answers heartbeats 503).
async fn empty_snapshot() -> Response {
    let mut directory = gup::core::settings::Directory::default();
    // Its clients speak without credentials.
    directory.site.client_auth = gup::core::settings::ClientAuth::Open;
    axum::Json(gup::core::proto::Snapshot {
        directory,
        catalog: gup::core::catalog::Catalog::default(),
        catalog_signature: None,
        stale_since: None,
    })
    .into_response()
}

/// What the hostile upstream saw of heartbeat batches.
#[derive(Default)]
struct Seen {
    /// Until set, every batch is answered 503 (a failure that may pass).
    open: bool,
    /// The clients of the batches answered 413.
    refused: Vec<Vec<String>>,
    /// The clients of the batches answered 200.
    accepted: HashSet<String>,
}

async fn heartbeats(State(seen): State<Arc<Mutex<Seen>>>, body: bytes::Bytes) -> Response {
    let batch: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let ids: Vec<String> = batch["heartbeats"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|h| h["heartbeat"]["client_id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let mut s = seen.lock().unwrap();
    if !s.open {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    if s.refused.is_empty() {
        s.refused.push(ids);
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            axum::Json(json!({"error": "body_too_large", "message": "no"})),
        )
            .into_response();
    }
    s.accepted.extend(ids);
    axum::Json(json!({"assignments": [], "rejected": []})).into_response()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_heartbeat_batch_is_dropped_and_the_rest_still_arrive() {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let app = axum::Router::new()
        .route("/v1/sync", get(empty_snapshot))
        .route("/v1/node/heartbeats", post(heartbeats))
        .layer(DefaultBodyLimit::disable())
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hostile = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().unwrap();
    let toml = format!("mode = \"pull\"\n{UNBOUNDED_NEWCOMERS}");
    let node = start_node_toml(&dir.path().join("n"), &[&hostile], &toml, &[]);
    wait_ready(&node.url).await;
    let client = http();
    // More than one batch (8 MiB) of heartbeats, pending while the upstream answers 503.
    let bytes = heartbeat_burst(&node.url, "w1-", 15_000).await;
    assert!(bytes > 8 << 20, "{bytes} bytes of heartbeats");
    assert_eq!(
        metric(&client, &node.url, "gup_relay_pending").await,
        15_000.0
    );
    assert!(seen.lock().unwrap().accepted.is_empty());

    // Now the first batch is refused for good and the later ones are taken.
    seen.lock().unwrap().open = true;
    let nu = node.url.clone();
    wait_for(60, "the relay gets past the refused batch", || {
        let (c, u) = (client.clone(), nu.clone());
        async move { (metric(&c, &u, "gup_relay_pending").await == 0.0).then_some(()) }
    })
    .await;
    let (refused, accepted) = {
        let s = seen.lock().unwrap();
        (s.refused.clone(), s.accepted.clone())
    };
    assert_eq!(refused.len(), 1, "one batch refused");
    let first: HashSet<String> = refused[0].iter().cloned().collect();
    assert!(!first.is_empty() && !accepted.is_empty());
    assert!(
        first.is_disjoint(&accepted),
        "a refused batch is not sent again"
    );
    assert_eq!(first.len() + accepted.len(), 15_000);
    assert_eq!(
        metric(&client, &node.url, "gup_relay_dropped_total").await,
        first.len() as f64
    );

    // Heartbeats after it still go, including a dropped client's next one.
    heartbeat_burst(&node.url, "w2-", 20).await;
    let dropped = first.iter().next().cloned().unwrap_or_default();
    let id = dropped
        .trim_end_matches(&"i".repeat(100))
        .trim_end_matches('-')
        .to_string();
    let body = long_heartbeat(&id);
    let r = client
        .post(format!("{}/v1/heartbeat", node.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen2 = seen.clone();
    wait_for(30, "later heartbeats arrive", || {
        let s = seen2.clone();
        let dropped = dropped.clone();
        async move {
            let s = s.lock().unwrap();
            let w2 = s.accepted.iter().filter(|c| c.starts_with("w2-")).count();
            (w2 == 20 && s.accepted.contains(&dropped)).then_some(())
        }
    })
    .await;
}
