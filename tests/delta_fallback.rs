//! End to end through real processes: a `gup agent` (and the agents of `gup loadtest`) that
//! holds version 1 of an item reaches version 2 through a delta, and through the full blob
//! whenever the delta is bad. The server is a small test server on 127.0.0.1:0 that speaks
//! the client API (heartbeat, catalog, content, `GET /v1/delta/..`, metrics) and misbehaves
//! in one way per case; it first publishes only version 1, which the agent installs, then
//! version 2 with the deltas of the case. The deltas it serves are made with the servers'
//! own codec (`gup::core::delta::compute`), so the agent's decoder is checked against what
//! the manager and nodes compute. In every case the agent ends with exactly version 2's
//! bytes, and `gup agent status` says how they came:
//! - a good listed delta: rebuilt from it, the full blob never asked for;
//! - a listed delta served with one byte flipped (its SHA-256 fails), the same flipped
//!   delta listed under its own digest (zstd refuses the frame), and a valid delta for other
//!   content of the same size (the rebuilt SHA-256 fails): a fallback each, then the full
//!   blob, with why in the status;
//! - no listed delta: the agent asks `GET /v1/delta/{v1}/{v2}`; a 404 `no_delta` takes the
//!   full blob (not a fallback), a good edge delta rebuilds the version, an edge delta over
//!   half the item is cut off (a fallback);
//! - `--no-deltas`: the full blob, no delta asked for;
//! - `gup loadtest --holding v1`: every agent rebuilds from the listed delta, the report
//!   counts delta bytes and the target's LAN bytes (read from its `/metrics`); with the
//!   flipped delta every agent falls back; with `--no-deltas` every agent takes the full
//!   blob.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use common::*;
use serde_json::{json, Value};

const NAME: &str = "defs.bin";
const SIZE: usize = 2 << 20;

/// What the test server serves.
#[derive(Default)]
struct Served {
    revision: u64,
    items: Vec<Value>,
    blobs: HashMap<String, Vec<u8>>,
    /// The answer to `GET /v1/delta/{from}/{to}`: none is 404 `no_delta`.
    edge: Option<Vec<u8>>,
    /// Every path asked for, in order.
    asked: Vec<String>,
    /// Content and delta bytes sent (what `/metrics` says as `gup_served_bytes_total`).
    served_bytes: u64,
}

type Shared = Arc<Mutex<Served>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Served> {
    s.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn heartbeat(State(s): State<Shared>, axum::Json(body): axum::Json<Value>) -> Response {
    let revision = {
        let mut s = lock(&s);
        s.asked.push("/v1/heartbeat".into());
        s.revision
    };
    axum::Json(json!({
        "client_id": body["client_id"],
        "group": "default",
        "settings": {
            "serial": 1,
            "mode": "pull",
            "heartbeat_interval_s": 1,
            "randomization": {"enabled": false, "window_s": 0},
        },
        "policy_serial": 0,
        "catalog_revision": revision,
        "next_heartbeat_s": 1,
        "download_slot": null,
    }))
    .into_response()
}

async fn catalog(State(s): State<Shared>) -> Response {
    let s = lock(&s);
    axum::Json(json!({"revision": s.revision, "items": s.items})).into_response()
}

fn not_found(code: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({"error": code, "message": "not here"})),
    )
        .into_response()
}

async fn content(State(s): State<Shared>, UrlPath(sha): UrlPath<String>) -> Response {
    let mut s = lock(&s);
    s.asked.push(format!("/v1/content/{sha}"));
    match s.blobs.get(&sha).cloned() {
        Some(bytes) => {
            s.served_bytes += bytes.len() as u64;
            bytes.into_response()
        }
        None => not_found("not_found"),
    }
}

async fn delta(
    State(s): State<Shared>,
    UrlPath((from, to)): UrlPath<(String, String)>,
) -> Response {
    let mut s = lock(&s);
    s.asked.push(format!("/v1/delta/{from}/{to}"));
    match s.edge.clone() {
        Some(bytes) => {
            s.served_bytes += bytes.len() as u64;
            bytes.into_response()
        }
        None => not_found("no_delta"),
    }
}

async fn metrics(State(s): State<Shared>) -> Response {
    let s = lock(&s);
    format!(
        "# TYPE gup_served_bytes_total counter\ngup_served_bytes_total {}\ngup_upstream_bytes_total 0\ngup_upstream_fetches_total 0\n",
        s.served_bytes
    )
    .into_response()
}

/// The test server on 127.0.0.1:0.
async fn serve(shared: Shared) -> String {
    let app = axum::Router::new()
        .route("/v1/heartbeat", post(heartbeat))
        .route("/v1/catalog", get(catalog))
        .route("/v1/content/{sha}", get(content))
        .route("/v1/delta/{from}/{to}", get(delta))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(shared);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

fn item(version: &str, bytes: &[u8], deltas: Value) -> Value {
    json!({
        "name": NAME,
        "version": version,
        "sha256": sha256_hex(bytes),
        "size": bytes.len(),
        "published_at": "2026-12-01T10:00:00Z",
        "urgent": false,
        "deltas": deltas,
    })
}

/// Version 1, version 2 (a few 4 KiB blocks rewritten and 64 KiB appended), and other bytes
/// of version 2's size.
fn versions() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let v1 = random_bytes(SIZE, 1);
    let mut v2 = v1.clone();
    for (i, at) in [100_000usize, 900_000, 1_700_000].into_iter().enumerate() {
        v2[at..at + 4096].copy_from_slice(&random_bytes(4096, 10 + i as u64));
    }
    v2.extend_from_slice(&random_bytes(64 << 10, 20));
    let mut v3 = v2.clone();
    v3[1_300_000..1_304_096].copy_from_slice(&random_bytes(4096, 30));
    (v1, v2, v3)
}

fn make_delta(old: &[u8], new: &[u8]) -> Vec<u8> {
    gup::core::delta::compute(old, new, new.len() / 2)
        .unwrap()
        .expect("a small change makes a delta")
}

/// A test server publishing only version 1.
async fn publishing_v1(v1: &[u8]) -> (Shared, String) {
    let shared: Shared = Arc::default();
    {
        let mut s = lock(&shared);
        s.revision = 1;
        s.items = vec![item("1", v1, json!([]))];
        s.blobs.insert(sha256_hex(v1), v1.to_vec());
    }
    let url = serve(shared.clone()).await;
    (shared, url)
}

/// Publishes version 2 (its full blob) at revision 2, listing `deltas` (each served as a blob
/// under its listed digest).
fn publish_v2(shared: &Shared, v2: &[u8], deltas: &[(&[u8], String, Vec<u8>)]) {
    let mut s = lock(shared);
    let listed: Vec<Value> = deltas
        .iter()
        .map(|(from, sha, bytes)| {
            json!({"from_sha256": sha256_hex(from), "sha256": sha, "size": bytes.len()})
        })
        .collect();
    for (_, sha, bytes) in deltas {
        s.blobs.insert(sha.clone(), bytes.clone());
    }
    s.blobs.insert(sha256_hex(v2), v2.to_vec());
    s.items = vec![item("2", v2, json!(listed))];
    s.revision = 2;
}

/// The agent's saved state, read straight from `state.json` (cheaper than a process).
fn state(dir: &Path) -> Value {
    std::fs::read(dir.join("state.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

/// Waits until the agent of `dir` holds `bytes` as the current version at `revision`.
async fn wait_holds(dir: &Path, bytes: &[u8], revision: u64) {
    let sha = sha256_hex(bytes);
    let path = dir.join("content").join(NAME);
    wait_for(
        30,
        &format!("the agent holds {sha} at revision {revision}"),
        || {
            let st = state(dir);
            let ok = st["items"][NAME]["sha256"] == sha.as_str()
                && st["catalog_revision"] == revision
                && std::fs::read(&path).is_ok_and(|b| b == bytes);
            async move { ok.then_some(()) }
        },
    )
    .await;
}

/// An agent on `url` that installed version 1; the server then publishes version 2 by
/// `publish`, and the agent installs it. Returns the agent's status and its log.
async fn v1_then_v2(
    extra: &[&str],
    v1: &[u8],
    v2: &[u8],
    publish: impl FnOnce(&Shared),
) -> (Value, String, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let (shared, url) = publishing_v1(v1).await;
    let a = dir.path().join("a");
    let mut args = vec!["--client-id", "pc-delta"];
    args.extend_from_slice(extra);
    let agent = start_agent(&a, &[&url], "default", &args);
    wait_holds(&a, v1, 1).await;
    lock(&shared).asked.clear();
    publish(&shared);
    wait_holds(&a, v2, 2).await;
    let status = agent_status(&a);
    // Nothing half-done is left behind: no partial download, no rebuilt version, no delta.
    let left: Vec<_> = std::fs::read_dir(a.join("partial"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "partial/ holds {left:?}");
    // The previous version is kept beside the current one.
    assert!(
        std::fs::read(a.join("versions").join(NAME).join(sha256_hex(v1))).is_ok_and(|b| b == v1),
        "version 1 kept in versions/"
    );
    let log = agent.log_text();
    drop(agent);
    let asked = lock(&shared).asked.clone();
    (status, log, asked)
}

fn full_path(v: &[u8]) -> String {
    format!("/v1/content/{}", sha256_hex(v))
}

fn count(asked: &[String], path: &str) -> usize {
    asked.iter().filter(|p| *p == path).count()
}

fn asked_delta(asked: &[String]) -> usize {
    asked.iter().filter(|p| p.starts_with("/v1/delta/")).count()
}

/// The deltas part of `gup agent status --json`.
fn deltas(status: &Value) -> &Value {
    &status["deltas"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_delta_rebuilds_version_2_without_the_full_blob() {
    let (v1, v2, _) = versions();
    let d = make_delta(&v1, &v2);
    let d_sha = sha256_hex(&d);
    let (status, log, asked) = v1_then_v2(&[], &v1, &v2, |s| {
        publish_v2(s, &v2, &[(&v1, d_sha.clone(), d.clone())])
    })
    .await;
    let dl = deltas(&status);
    assert_eq!(dl["via_delta"], 1, "{status}");
    assert_eq!(dl["delta_bytes"], d.len(), "{status}");
    assert_eq!(dl["fallbacks"], 0, "{status}");
    assert_eq!(dl["via_full"], 1, "version 1 came full: {status}");
    assert_eq!(count(&asked, &full_path(&v2)), 0, "{asked:?}");
    assert_eq!(
        count(&asked, &format!("/v1/content/{d_sha}")),
        1,
        "{asked:?}"
    );
    assert_eq!(asked_delta(&asked), 0, "{asked:?}");
    assert!(log.contains("via=\"delta\""), "{log}");
}

/// A case whose delta is bad: the agent falls back once, takes the full blob once, and
/// says why.
async fn falls_back(deltas_of: impl FnOnce(&[u8], &[u8], &[u8]) -> (String, Vec<u8>), why: &str) {
    let (v1, v2, v3) = versions();
    let (sha, bytes) = deltas_of(&v1, &v2, &v3);
    let (status, log, asked) = v1_then_v2(&[], &v1, &v2, |s| {
        publish_v2(s, &v2, &[(&v1, sha.clone(), bytes.clone())])
    })
    .await;
    let dl = deltas(&status);
    assert_eq!(dl["fallbacks"], 1, "{status}");
    assert_eq!(dl["via_delta"], 0, "{status}");
    assert_eq!(dl["via_full"], 2, "{status}");
    assert_eq!(dl["full_bytes"], v1.len() + v2.len(), "{status}");
    assert_eq!(dl["wasted_delta_bytes"], bytes.len(), "{status}");
    let last = dl["last_fallback"].as_str().unwrap_or("");
    assert!(last.contains(why), "{why:?} in {last:?}");
    assert_eq!(count(&asked, &format!("/v1/content/{sha}")), 1, "{asked:?}");
    assert_eq!(count(&asked, &full_path(&v2)), 1, "{asked:?}");
    assert!(
        log.contains("the delta did not give the new version; taking the full blob"),
        "{log}"
    );
    assert!(log.contains("via=\"full\""), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_delta_with_a_flipped_byte_fails_its_digest_and_the_full_blob_follows() {
    falls_back(
        |v1, v2, _| {
            let good = make_delta(v1, v2);
            let mut bad = good.clone();
            let mid = bad.len() / 2;
            bad[mid] ^= 0x01;
            (sha256_hex(&good), bad)
        },
        "do not match its SHA-256",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_delta_listed_under_its_own_digest_is_refused_by_zstd_and_the_full_blob_follows()
{
    falls_back(
        |v1, v2, _| {
            let mut bad = make_delta(v1, v2);
            let mid = bad.len() / 2;
            bad[mid] ^= 0x01;
            (sha256_hex(&bad), bad)
        },
        "zstd",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_delta_for_other_content_fails_the_rebuilt_digest_and_the_full_blob_follows() {
    falls_back(
        |v1, _, v3| {
            let other = make_delta(v1, v3);
            (sha256_hex(&other), other)
        },
        "the rebuilt version's SHA-256",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_listed_delta_and_a_404_no_delta_from_the_server_takes_the_full_blob() {
    let (v1, v2, _) = versions();
    let (status, log, asked) = v1_then_v2(&[], &v1, &v2, |s| publish_v2(s, &v2, &[])).await;
    let dl = deltas(&status);
    assert_eq!(dl["no_delta"], 1, "{status}");
    assert_eq!(dl["fallbacks"], 0, "a 404 is no fallback: {status}");
    assert_eq!(dl["via_full"], 2, "{status}");
    let edge = format!("/v1/delta/{}/{}", sha256_hex(&v1), sha256_hex(&v2));
    assert_eq!(count(&asked, &edge), 1, "{asked:?}");
    assert_eq!(count(&asked, &full_path(&v2)), 1, "{asked:?}");
    assert!(log.contains("the server has no delta"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_listed_delta_and_an_edge_delta_from_the_server_rebuilds_version_2() {
    let (v1, v2, _) = versions();
    let d = make_delta(&v1, &v2);
    let (status, log, asked) = v1_then_v2(&[], &v1, &v2, |s| {
        // The edge delta is there before version 2 is announced.
        lock(s).edge = Some(d.clone());
        publish_v2(s, &v2, &[]);
    })
    .await;
    let dl = deltas(&status);
    assert_eq!(dl["via_edge_delta"], 1, "{status}");
    assert_eq!(dl["edge_delta_bytes"], d.len(), "{status}");
    assert_eq!(dl["fallbacks"], 0, "{status}");
    assert_eq!(count(&asked, &full_path(&v2)), 0, "{asked:?}");
    assert_eq!(asked_delta(&asked), 1, "{asked:?}");
    assert!(log.contains("via=\"edge delta\""), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_delta_over_half_the_item_is_cut_off_and_the_full_blob_follows() {
    let (v1, v2, _) = versions();
    let (status, _, asked) = v1_then_v2(&[], &v1, &v2, |s| {
        lock(s).edge = Some(random_bytes(v2.len() / 2 + 1, 99));
        publish_v2(s, &v2, &[]);
    })
    .await;
    let dl = deltas(&status);
    assert_eq!(dl["fallbacks"], 1, "{status}");
    assert_eq!(dl["via_full"], 2, "{status}");
    assert!(
        dl["last_fallback"]
            .as_str()
            .unwrap_or("")
            .contains("half the item"),
        "{status}"
    );
    assert_eq!(count(&asked, &full_path(&v2)), 1, "{asked:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_deltas_the_agent_takes_the_full_blob_and_asks_for_no_delta() {
    let (v1, v2, _) = versions();
    let d = make_delta(&v1, &v2);
    let d_sha = sha256_hex(&d);
    let (status, _, asked) = v1_then_v2(&["--no-deltas"], &v1, &v2, |s| {
        lock(s).edge = Some(d.clone());
        publish_v2(s, &v2, &[(&v1, d_sha.clone(), d.clone())]);
    })
    .await;
    let dl = deltas(&status);
    assert_eq!(dl["via_full"], 2, "{status}");
    assert_eq!(dl["via_delta"], 0, "{status}");
    assert_eq!(
        count(&asked, &format!("/v1/content/{d_sha}")),
        0,
        "{asked:?}"
    );
    assert_eq!(asked_delta(&asked), 0, "{asked:?}");
    assert_eq!(count(&asked, &full_path(&v2)), 1, "{asked:?}");
}

/// `gup loadtest` of `clients` agents holding `v1` (from a file) against `url`; its JSON
/// report.
fn loadtest(url: &str, dir: &Path, v1: &[u8], clients: usize, extra: &[&str]) -> Value {
    let held = dir.join("v1.bin");
    std::fs::write(&held, v1).unwrap();
    let report = dir.join(format!("report-{}.json", rand_suffix()));
    let clients = clients.to_string();
    let mut args = vec![
        "loadtest",
        "--target",
        url,
        "--clients",
        &clients,
        "--holding",
        held.to_str().unwrap(),
        "--holding-name",
        NAME,
        "--ramp-s",
        "0",
        "--events",
        "0",
        "--duration",
        "60",
        "--report",
        report.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = std::process::Command::new(gup())
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "gup loadtest: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap()
}

fn rand_suffix() -> String {
    format!(
        "{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadtest_agents_holding_version_1_rebuild_version_2_from_the_delta_or_fall_back() {
    const CLIENTS: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let (v1, v2, _) = versions();
    let d = make_delta(&v1, &v2);
    let d_sha = sha256_hex(&d);
    let (shared, url) = publishing_v1(&v1).await;
    publish_v2(&shared, &v2, &[(&v1, d_sha.clone(), d.clone())]);

    // Deltas: every agent rebuilds from the listed delta.
    let r = tokio::task::spawn_blocking({
        let (url, path, v1) = (url.clone(), dir.path().to_path_buf(), v1.clone());
        move || loadtest(&url, &path, &v1, CLIENTS, &[])
    })
    .await
    .unwrap();
    let n = CLIENTS as u64;
    assert_eq!(r["clients_done"], CLIENTS, "{r}");
    assert_eq!(r["installs"]["delta"], n, "{r}");
    assert_eq!(r["installs"]["full"], 0, "{r}");
    assert_eq!(r["downloads_ok"], n, "{r}");
    assert_eq!(r["delta_bytes"], n * d.len() as u64, "{r}");
    assert_eq!(r["full_bytes"], 0, "{r}");
    assert_eq!(r["rebuilds"], n, "{r}");
    assert!(r["rebuild_ms"]["p99"].as_f64().unwrap() > 0.0, "{r}");
    assert_eq!(
        r["lan_bytes"],
        n * d.len() as u64,
        "read from /metrics: {r}"
    );
    assert_eq!(r["use_deltas"], true, "{r}");
    assert_eq!(r["holding_sha256"], sha256_hex(&v1).as_str(), "{r}");

    // The same run with deltas off: every agent takes the full blob.
    let r = tokio::task::spawn_blocking({
        let (url, path, v1) = (url.clone(), dir.path().to_path_buf(), v1.clone());
        move || loadtest(&url, &path, &v1, CLIENTS, &["--no-deltas"])
    })
    .await
    .unwrap();
    assert_eq!(r["installs"]["full"], n, "{r}");
    assert_eq!(r["installs"]["delta"], 0, "{r}");
    assert_eq!(r["full_bytes"], n * v2.len() as u64, "{r}");
    assert_eq!(r["lan_bytes"], n * v2.len() as u64, "{r}");
    assert_eq!(r["use_deltas"], false, "{r}");

    // A flipped byte in the delta: every agent falls back to the full blob, counted by why.
    {
        let mut s = lock(&shared);
        let bad = s.blobs.get_mut(&d_sha).unwrap();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x01;
    }
    let r = tokio::task::spawn_blocking({
        let (url, path, v1) = (url.clone(), dir.path().to_path_buf(), v1.clone());
        move || loadtest(&url, &path, &v1, CLIENTS, &[])
    })
    .await
    .unwrap();
    assert_eq!(r["installs"]["full"], n, "{r}");
    assert_eq!(r["installs"]["delta"], 0, "{r}");
    assert_eq!(r["delta_fallbacks"]["delta_digest"], n, "{r}");
    assert_eq!(r["digest_mismatches"], 0, "a bad delta is no bad blob: {r}");
    assert_eq!(r["downloads_failed"], 0, "{r}");
    assert_eq!(r["full_bytes"], n * v2.len() as u64, "{r}");
    assert_eq!(r["wasted_delta_bytes"], n * d.len() as u64, "{r}");
}
