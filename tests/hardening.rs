//! End to end through real processes: connection limits and TLS.
//! - a request head over `limits.max_header_bytes` gets 431 and the server carries on;
//! - a client that does not finish its request head within `limits.header_read_timeout_s`
//!   is disconnected, and so is a kept-alive connection idle that long;
//! - beyond `limits.max_connections` new connections are closed at once while the open ones
//!   carry on, and there is room again once they close;
//! - `--tls-cert/--tls-key`: the manager's port speaks only TLS; a node without the
//!   certificate's CA refuses the upstream, and one trusting it through `--upstream-ca`
//!   mirrors and serves its content (certificates made here with rcgen; no key is
//!   committed);
//! - a signed catalog: a forged one is refused and the next upstream used, the node passes
//!   the signature on over the exact body it serves, and a node holding another key never
//!   becomes ready;
//! - push connections (`GET /v1/stream` served without hyper): chunked SSE with the current
//!   state and `connection: close`; they end at once when the client hangs up; a bad query
//!   gets the router's JSON 400; a head over the limit 431, a malformed head 400, and a head
//!   not finished in time is cut while the server carries on.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

fn manager_with(dir: &std::path::Path, toml: &str, extra: &[&str]) -> Proc {
    let cfg = dir.join("manager.toml");
    std::fs::write(&cfg, toml).unwrap();
    let mut args = vec!["--config", cfg.to_str().unwrap()];
    args.extend_from_slice(extra);
    start_manager(&dir.join("m"), &args)
}

fn addr(url: &str) -> String {
    url.trim_start_matches("http://")
        .trim_start_matches("https://")
        .to_string()
}

/// Sends one keep-alive GET /healthz on `s` and reads the response head and body.
fn healthz(s: &mut TcpStream) -> String {
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// A manager with a 4096-byte head limit, a 1 s head timeout and room for 3 connections.
fn limited(dir: &std::path::Path) -> (Proc, String) {
    let manager = manager_with(
        dir,
        "[manager]\n[limits]\nmax_header_bytes = 4096\nheader_read_timeout_s = 1\nmax_connections = 3\n",
        &[],
    );
    let a = addr(&manager.url);
    (manager, a)
}

#[test]
fn a_request_head_over_max_header_bytes_gets_431_and_the_server_carries_on() {
    let dir = tempfile::tempdir().unwrap();
    let (manager, a) = limited(dir.path());
    let mut s = TcpStream::connect(&a).unwrap();
    let big = "x".repeat(20_000);
    let req = format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
    let _ = s.write_all(req.as_bytes());
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let head = String::from_utf8_lossy(&buf);
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");
    let mut s = TcpStream::connect(&a).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(healthz(&mut s).starts_with("HTTP/1.1 200"), "carries on");
    assert_eq!(manager.stop(), Some(0));
}

#[test]
fn a_half_sent_request_head_is_cut_after_the_header_read_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (_manager, a) = limited(dir.path());
    let mut slow = TcpStream::connect(&a).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "closed by the header timeout"
    );
}

#[test]
fn an_idle_kept_alive_connection_is_closed_after_the_header_read_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (_manager, a) = limited(dir.path());
    let mut idle = TcpStream::connect(&a).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(healthz(&mut idle).starts_with("HTTP/1.1 200"));
    let started = Instant::now();
    let mut buf = [0u8; 64];
    assert_eq!(
        idle.read(&mut buf).unwrap_or(0),
        0,
        "the idle connection is closed"
    );
    assert!(started.elapsed() < Duration::from_secs(8));
}

#[test]
fn beyond_max_connections_new_ones_are_closed_while_open_ones_carry_on_until_they_close() {
    let dir = tempfile::tempdir().unwrap();
    let (manager, a) = limited(dir.path());
    // Three connections fit; a fourth is closed at once while the three carry on.
    let mut open: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(&a).unwrap()).collect();
    for s in open.iter_mut() {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert!(healthz(s).starts_with("HTTP/1.1 200"), "within the limit");
    }
    let mut extra = TcpStream::connect(&a).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = extra.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut buf = [0u8; 64];
    let n = extra.read(&mut buf).unwrap_or(0);
    assert_eq!(
        n, 0,
        "over the limit: the connection is closed without an answer"
    );
    for s in open.iter_mut() {
        assert!(
            healthz(s).starts_with("HTTP/1.1 200"),
            "over the limit: open connections carry on"
        );
    }
    drop(open);
    // Room again once they close.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut s = TcpStream::connect(&a).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut buf = [0u8; 64];
        if s.read(&mut buf).unwrap_or(0) > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after they close: room comes back"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(manager.stop(), Some(0));
}

struct Tls {
    dir: tempfile::TempDir,
    _manager: Proc,
    cert_pem: std::path::PathBuf,
    port: String,
    /// `https://localhost:PORT`, which `client` resolves to 127.0.0.1.
    https: String,
    client: reqwest::Client,
}

/// A manager serving TLS with a fresh self-signed certificate for `localhost`, and a client
/// that trusts it.
fn tls_manager() -> Tls {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_pem = dir.path().join("cert.pem");
    let key_pem = dir.path().join("key.pem");
    std::fs::write(&cert_pem, cert.cert.pem()).unwrap();
    std::fs::write(&key_pem, cert.key_pair.serialize_pem()).unwrap();
    let manager = start_manager_strict(
        &dir.path().join("m"),
        &[
            "--tls-cert",
            cert_pem.to_str().unwrap(),
            "--tls-key",
            key_pem.to_str().unwrap(),
        ],
    );
    let port = manager.url.rsplit(':').next().unwrap().to_string();
    let https = format!("https://localhost:{port}");
    let ca = reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(ca)
        .resolve("localhost", format!("127.0.0.1:{port}").parse().unwrap())
        .build()
        .unwrap();
    Tls {
        dir,
        _manager: manager,
        cert_pem,
        port,
        https,
        client,
    }
}

/// Waits until the log of `p` contains `line`.
async fn wait_log(p: &Proc, line: &str) {
    wait_for(20, &format!("the log says {line:?}"), || {
        let log = p.log_text();
        async move { log.contains(line).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_port_gives_plain_http_no_http_answer() {
    let t = tls_manager();
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/healthz", t.port))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err() || plain.unwrap().status() != 200);
    let r = t
        .client
        .get(format!("{}/healthz", t.https))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the same port over TLS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_ca_refuses_a_tls_upstream() {
    let t = tls_manager();
    let untrusting = start_node(&t.dir.path().join("n0"), &[&t.https], &[]);
    wait_log(&untrusting, "no upstream answered").await;
    let (status, v) = get_json(&untrusting.url, "/readyz").await;
    assert_eq!(status, 503, "an untrusted certificate is refused: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_trusting_the_ca_mirrors_and_serves_over_tls() {
    let t = tls_manager();
    let data = random_bytes(500_000, 5);
    let sha = sha256_hex(&data);
    let r = t
        .client
        .post(format!("{}/v1/admin/content?name=defs&version=1", t.https))
        .bearer_auth(ADMIN_TOKEN)
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let node = start_node(
        &t.dir.path().join("n"),
        &[&t.https],
        &["--upstream-ca", t.cert_pem.to_str().unwrap()],
    );
    wait_mirrored(&node.url, &sha).await;
    let body = reqwest::get(format!("{}/v1/content/{sha}", node.url))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(body[..] == data[..]);
}

/// An upstream that relays the manager's snapshot but changes one item's digest, keeping the
/// manager's signature: what a compromised node in the chain would try.
async fn forging_upstream(manager: String) -> String {
    use axum::extract::State;
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/v1/sync",
            get(|State(m): State<String>| async move {
                let mut v: serde_json::Value = reqwest::Client::new()
                    .get(format!("{m}/v1/sync"))
                    .bearer_auth(NODE_TOKEN)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                if let Some(item) = v["catalog"]["items"].get_mut(0) {
                    item["sha256"] = serde_json::json!(sha256_hex(b"invented content"));
                }
                axum::Json(v)
            }),
        )
        .with_state(manager);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

struct Signed {
    dir: tempfile::TempDir,
    manager: Proc,
    /// The manager's catalog public key, hex.
    key: String,
    sha: String,
}

/// A manager with one release published, and its catalog public key.
async fn signed() -> Signed {
    let dir = tempfile::tempdir().unwrap();
    let m_dir = dir.path().join("m");
    let manager = start_manager(&m_dir, &[]);
    let out = std::process::Command::new(gup())
        .args([
            "manager",
            "--data-dir",
            m_dir.to_str().unwrap(),
            "--print-public-key",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(key.len(), 64, "{key}");
    let data = random_bytes(100_000, 9);
    let sha = publish_and_wait(&manager.url, &[], "defs", "1", &data).await;
    Signed {
        dir,
        manager,
        key,
        sha,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_catalog_is_refused_and_the_next_upstream_used() {
    let s = signed().await;
    // The forging upstream comes first; the node refuses it and mirrors from the manager.
    let forger = forging_upstream(s.manager.url.clone()).await;
    let node = start_node_toml(
        &s.dir.path().join("n"),
        &[&forger, &s.manager.url],
        "mode = \"pull\"\n",
        &["--catalog-public-key", &s.key],
    );
    wait_mirrored(&node.url, &s.sha).await;
    assert!(
        node.log_text().contains("signature does not verify"),
        "{}",
        node.log_text()
    );
    let client = reqwest::Client::new();
    assert!(!catalog_has(&client, &node.url, &sha256_hex(b"invented content")).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_passes_the_catalog_signature_on_over_the_exact_body_it_serves() {
    let s = signed().await;
    let node = start_node(
        &s.dir.path().join("n"),
        &[&s.manager.url],
        &["--catalog-public-key", &s.key],
    );
    wait_mirrored(&node.url, &s.sha).await;
    let r = reqwest::get(format!("{}/v1/catalog", node.url))
        .await
        .unwrap();
    let sig = r.headers()["x-gup-catalog-signature"]
        .to_str()
        .unwrap()
        .to_string();
    let body = r.bytes().await.unwrap();
    let catalog: gup::core::catalog::Catalog = serde_json::from_slice(&body).unwrap();
    assert_eq!(gup::core::signing::catalog_bytes(&catalog), body.to_vec());
    let public = gup::core::signing::PublicKey::parse(&s.key).unwrap();
    assert!(public.verify(&catalog, Some(&sig)).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_holding_another_key_refuses_every_catalog_and_never_becomes_ready() {
    let s = signed().await;
    let other = tempfile::tempdir().unwrap();
    let wrong = gup::core::signing::CatalogKey::load_or_create(other.path())
        .unwrap()
        .public_hex();
    let doubting = start_node(
        &s.dir.path().join("n2"),
        &[&s.manager.url],
        &["--catalog-public-key", &wrong],
    );
    wait_log(&doubting, "signature does not verify").await;
    let (status, v) = get_json(&doubting.url, "/readyz").await;
    assert_eq!(status, 503, "{v}");
    let client = reqwest::Client::new();
    assert!(!catalog_has(&client, &doubting.url, &s.sha).await);
}

/// A manager with a 4096-byte head limit and a 1 s head timeout, for push connections.
fn push_manager(dir: &std::path::Path) -> (Proc, String) {
    let manager = manager_with(
        dir,
        "[manager]\n[limits]\nmax_header_bytes = 4096\nheader_read_timeout_s = 1\n",
        &[],
    );
    let a = addr(&manager.url);
    (manager, a)
}

/// Reads from `s` until `end` is seen, the peer closes, or 5 s pass without a byte.
fn read_until(s: &mut TcpStream, end: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    while !String::from_utf8_lossy(&got).contains(end) {
        let n = s.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

async fn stream_clients(manager: &str) -> f64 {
    metric(&reqwest::Client::new(), manager, "gup_stream_clients").await
}

// `GET /v1/stream` on a fresh connection is served without hyper (`pushconn`): the same
// answer as any request (SSE, or the router's JSON error), its limits, and a prompt end when
// the client hangs up.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_stream_is_chunked_sse_with_the_current_state_and_connection_close() {
    let dir = tempfile::tempdir().unwrap();
    let (_manager, a) = push_manager(dir.path());
    let mut s = TcpStream::connect(&a).unwrap();
    s.write_all(b"GET /v1/stream?client_id=pc-1 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let got = read_until(&mut s, "event: catalog");
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    assert!(got.contains("content-type: text/event-stream"), "{got}");
    assert!(got.contains("transfer-encoding: chunked"), "{got}");
    assert!(got.contains("connection: close"), "{got}");
    assert!(got.contains("event: catalog"), "{got}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_stream_ends_at_once_when_the_client_hangs_up() {
    let dir = tempfile::tempdir().unwrap();
    let (manager, a) = push_manager(dir.path());
    let mut s = TcpStream::connect(&a).unwrap();
    s.write_all(b"GET /v1/stream?client_id=pc-1 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    read_until(&mut s, "event: catalog");
    wait_for(10, "the stream counted", || {
        let url = manager.url.clone();
        async move { (stream_clients(&url).await == 1.0).then_some(()) }
    })
    .await;
    // The client hangs up: the stream ends at once, not at the next keep-alive (15 s).
    drop(s);
    wait_for(5, "the stream gone", || {
        let url = manager.url.clone();
        async move { (stream_clients(&url).await == 0.0).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_stream_with_a_bad_query_gets_the_routers_json_400() {
    let dir = tempfile::tempdir().unwrap();
    let (_manager, a) = push_manager(dir.path());
    let mut s = TcpStream::connect(&a).unwrap();
    s.write_all(b"GET /v1/stream?client_id=a&client_id=b HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let got = read_until(&mut s, "}");
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    assert!(got.contains("content-length: "), "{got}");
    assert!(got.contains("\"error\":\"bad_query\""), "{got}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_stream_head_over_max_header_bytes_gets_431_json() {
    let dir = tempfile::tempdir().unwrap();
    let (_manager, a) = push_manager(dir.path());
    let mut s = TcpStream::connect(&a).unwrap();
    let big = "x".repeat(8_000);
    let _ = s.write_all(format!("GET /v1/stream?a=b HTTP/1.1\r\nX-Big: {big}\r\n\r\n").as_bytes());
    let got = read_until(&mut s, "}");
    assert!(got.starts_with("HTTP/1.1 431"), "{got}");
    assert!(got.contains("\"error\":\"headers_too_large\""), "{got}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_push_stream_head_gets_400_json() {
    let dir = tempfile::tempdir().unwrap();
    let (_manager, a) = push_manager(dir.path());
    let mut s = TcpStream::connect(&a).unwrap();
    s.write_all(b"GET /v1/stream?a=b HTTP/1.1\r\nBad Header\r\n\r\n")
        .unwrap();
    let got = read_until(&mut s, "}");
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    assert!(got.contains("\"error\":\"bad_request\""), "{got}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_stream_head_not_finished_in_time_is_cut_and_the_server_carries_on() {
    let dir = tempfile::tempdir().unwrap();
    let (_manager, a) = push_manager(dir.path());
    let mut s = TcpStream::connect(&a).unwrap();
    s.write_all(b"GET /v1/stream?client_id=slow HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let started = Instant::now();
    let got = read_until(&mut s, "never");
    assert!(got.is_empty(), "{got}");
    assert!(started.elapsed() < Duration::from_secs(5), "cut in time");
    let mut s = TcpStream::connect(&a).unwrap();
    assert!(healthz(&mut s).starts_with("HTTP/1.1 200"), "carries on");
}
