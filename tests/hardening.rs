//! End to end through real processes: connection limits and TLS.
//! - a request head over `limits.max_header_bytes` gets 431 and the server carries on;
//! - a client that does not finish its request head within `limits.header_read_timeout_s`
//!   is disconnected, and so is a kept-alive connection idle that long;
//! - beyond `limits.max_connections` new connections are closed at once while the open ones
//!   carry on;
//! - `--tls-cert/--tls-key`: the manager's port speaks only TLS, and a node trusting the
//!   certificate through `--upstream-ca` mirrors and serves its content (certificates made
//!   here with rcgen; no key is committed);
//! - push connections (`GET /v1/stream` served without hyper) keep the same answers and
//!   limits, and end at once when the client hangs up.

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

#[test]
fn header_size_read_timeout_and_max_connections() {
    let dir = tempfile::tempdir().unwrap();
    let manager = manager_with(
        dir.path(),
        "[manager]\n[limits]\nmax_header_bytes = 4096\nheader_read_timeout_s = 1\nmax_connections = 3\n",
        &[],
    );
    let a = addr(&manager.url);

    // 431 for a head over the limit; the server is fine afterwards.
    let mut s = TcpStream::connect(&a).unwrap();
    let big = "x".repeat(20_000);
    let req = format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
    let _ = s.write_all(req.as_bytes());
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let head = String::from_utf8_lossy(&buf);
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");

    // A half-sent head is cut after the read timeout.
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
    drop(slow);

    // An idle kept-alive connection is closed by the same timeout.
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

    // Three connections fit; a fourth is closed at once while the three carry on.
    let mut open: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(&a).unwrap()).collect();
    for s in open.iter_mut() {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert!(healthz(s).starts_with("HTTP/1.1 200"));
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
        "the connection over the limit is closed without an answer"
    );
    for s in open.iter_mut() {
        assert!(
            healthz(s).starts_with("HTTP/1.1 200"),
            "open connections carry on"
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
            "room comes back when connections close"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(manager.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_manager_and_a_node_that_trusts_it() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_pem = dir.path().join("cert.pem");
    let key_pem = dir.path().join("key.pem");
    std::fs::write(&cert_pem, cert.cert.pem()).unwrap();
    std::fs::write(&key_pem, cert.key_pair.serialize_pem()).unwrap();

    let manager = start_manager(
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

    // Plain HTTP to the TLS port gets no HTTP answer.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err() || plain.unwrap().status() != 200);

    let ca = reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(ca)
        .resolve("localhost", format!("127.0.0.1:{port}").parse().unwrap())
        .build()
        .unwrap();
    let data = random_bytes(500_000, 5);
    let sha = sha256_hex(&data);
    let r = client
        .post(format!("{https}/v1/admin/content?name=defs&version=1"))
        .bearer_auth(ADMIN_TOKEN)
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    // A node without the CA refuses the upstream; with it, it mirrors and serves.
    let untrusting = start_node(&dir.path().join("n0"), &[&https], &[]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = reqwest::get(format!("{}/readyz", untrusting.url))
        .await
        .unwrap();
    assert_eq!(r.status(), 503, "an untrusted certificate is refused");
    let node = start_node(
        &dir.path().join("n"),
        &[&https],
        &["--upstream-ca", cert_pem.to_str().unwrap()],
    );
    let plain = reqwest::Client::new();
    let (nu, s2) = (node.url.clone(), sha.clone());
    wait_for(20, "the node mirrors over TLS", || {
        let (c, u, s) = (plain.clone(), nu.clone(), s2.clone());
        async move { catalog_has(&c, &u, &s).await.then_some(()) }
    })
    .await;
    let body = plain
        .get(format!("{}/v1/content/{sha}", node.url))
        .send()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_catalog_is_verified_passed_on_and_forgeries_refused() {
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
    assert_eq!(key.len(), 64);

    let data = random_bytes(100_000, 9);
    let sha = sha256_hex(&data);
    let file = dir.path().join("defs.bin");
    std::fs::write(&file, &data).unwrap();
    let (code, out) = publish(&manager.url, &file, "defs", "1");
    assert_eq!(code, 0, "{out}");

    // The forging upstream comes first; the node refuses it and mirrors from the manager.
    let forger = forging_upstream(manager.url.clone()).await;
    let node = start_node_toml(
        &dir.path().join("n"),
        &[&forger, &manager.url],
        "mode = \"pull\"\n",
        &["--catalog-public-key", &key],
    );
    let client = reqwest::Client::new();
    let (nu, s2) = (node.url.clone(), sha.clone());
    wait_for(20, "the node mirrors the genuine catalog", || {
        let (c, u, s) = (client.clone(), nu.clone(), s2.clone());
        async move { catalog_has(&c, &u, &s).await.then_some(()) }
    })
    .await;
    assert!(
        node.log_text().contains("signature does not verify"),
        "{}",
        node.log_text()
    );
    assert!(!catalog_has(&client, &node.url, &sha256_hex(b"invented content")).await);

    // The node passes the signature on: it verifies over the exact body it serves.
    let r = client
        .get(format!("{}/v1/catalog", node.url))
        .send()
        .await
        .unwrap();
    let sig = r.headers()["x-gup-catalog-signature"]
        .to_str()
        .unwrap()
        .to_string();
    let body = r.bytes().await.unwrap();
    let catalog: gup::core::catalog::Catalog = serde_json::from_slice(&body).unwrap();
    assert_eq!(gup::core::signing::catalog_bytes(&catalog), body.to_vec());
    let public = gup::core::signing::PublicKey::parse(&key).unwrap();
    assert!(public.verify(&catalog, Some(&sig)).is_ok());

    // A node holding another key refuses every catalog and never becomes ready.
    let other = tempfile::tempdir().unwrap();
    let wrong = gup::core::signing::CatalogKey::load_or_create(other.path())
        .unwrap()
        .public_hex();
    let doubting = start_node(
        &dir.path().join("n2"),
        &[&manager.url],
        &["--catalog-public-key", &wrong],
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = client
        .get(format!("{}/readyz", doubting.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(!catalog_has(&client, &doubting.url, &sha).await);
}

/// `GET /v1/stream` on a fresh connection is served without hyper (`pushconn`): the same
/// answer as any request (SSE, or the router's JSON error), its limits, and a prompt end when
/// the client hangs up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_connections_keep_the_contract_and_the_limits() {
    let dir = tempfile::tempdir().unwrap();
    let manager = manager_with(
        dir.path(),
        "[manager]\n[limits]\nmax_header_bytes = 4096\nheader_read_timeout_s = 1\n",
        &[],
    );
    let a = addr(&manager.url);
    let http = reqwest::Client::new();
    let read_until = |s: &mut TcpStream, end: &str| {
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
    };

    // The stream: chunked SSE with the current state first, then closed after the one
    // response.
    let mut s = TcpStream::connect(&a).unwrap();
    s.write_all(b"GET /v1/stream?client_id=pc-1 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let got = read_until(&mut s, "event: catalog");
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    assert!(got.contains("content-type: text/event-stream"), "{got}");
    assert!(got.contains("transfer-encoding: chunked"), "{got}");
    assert!(got.contains("connection: close"), "{got}");
    assert!(got.contains("event: catalog"), "{got}");
    let open = |http: reqwest::Client, url: String| async move {
        metric(&http, &url, "gup_stream_clients").await
    };
    wait_for(10, "the stream counted", || {
        let (http, url) = (http.clone(), manager.url.clone());
        async move { (open(http, url).await == 1.0).then_some(()) }
    })
    .await;
    // The client hangs up: the stream ends at once, not at the next keep-alive (15 s).
    drop(s);
    wait_for(5, "the stream gone", || {
        let (http, url) = (http.clone(), manager.url.clone());
        async move { (open(http, url).await == 0.0).then_some(()) }
    })
    .await;

    // The router's own errors come through: a bad query is the same JSON 400.
    let mut s = TcpStream::connect(&a).unwrap();
    s.write_all(b"GET /v1/stream?client_id=a&client_id=b HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let got = read_until(&mut s, "}");
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    assert!(got.contains("content-length: "), "{got}");
    assert!(got.contains("\"error\""), "{got}");

    // Limits: a head over max_header_bytes gets 431 JSON, a malformed head 400, a head not
    // finished within header_read_timeout is cut; the server carries on.
    let mut s = TcpStream::connect(&a).unwrap();
    let big = "x".repeat(8_000);
    let _ = s.write_all(format!("GET /v1/stream?a=b HTTP/1.1\r\nX-Big: {big}\r\n\r\n").as_bytes());
    let got = read_until(&mut s, "}");
    assert!(got.starts_with("HTTP/1.1 431"), "{got}");
    let mut s = TcpStream::connect(&a).unwrap();
    s.write_all(b"GET /v1/stream?a=b HTTP/1.1\r\nBad Header\r\n\r\n")
        .unwrap();
    let got = read_until(&mut s, "}");
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    let mut s = TcpStream::connect(&a).unwrap();
    s.write_all(b"GET /v1/stream?client_id=slow HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let started = Instant::now();
    let got = read_until(&mut s, "never");
    assert!(got.is_empty(), "{got}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let mut s = TcpStream::connect(&a).unwrap();
    assert!(healthz(&mut s).starts_with("HTTP/1.1 200"));
}
