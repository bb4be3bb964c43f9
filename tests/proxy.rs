//! End to end through real processes: a node behind an outbound proxy (issue 21.6). The
//! proxies are started here, on 127.0.0.1, as tokio tasks: each handles absolute-form
//! requests (`GET http://host/...`, forwarded with `Connection: close`, so it sees every
//! request) and `CONNECT` tunnels, records each request line, and checks
//! `Proxy-Authorization` when it was given credentials (407 otherwise).
//! - `upstream.proxy` with credentials carries the sync, the push stream (a release arrives
//!   through it with polling an hour apart), a blob fetch and a critical event's relay; a
//!   proxy in the environment (`HTTP_PROXY`) sees nothing, since the configured one wins; the
//!   password shows neither in the log nor on the status page, which show the proxy redacted;
//! - with no `upstream.proxy`, `HTTPS_PROXY` from the environment tunnels (CONNECT) a node's
//!   calls to a TLS upstream on a loopback name (reqwest skips no loopback host by itself),
//!   and a node whose `NO_PROXY` lists that host goes direct;
//! - a bad `upstream.proxy` is refused at start with one line naming the key, and without the
//!   password.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PROXY_USER: &str = "branch7";
const PROXY_PASSWORD: &str = "pr0xy-s3cret";

/// What a test proxy saw.
#[derive(Default)]
struct Seen {
    /// Request lines, in order: `GET http://127.0.0.1:1/v1/sync HTTP/1.1`, `CONNECT
    /// localhost:1 HTTP/1.1`.
    requests: Vec<String>,
    /// Requests answered 407 (no or wrong `Proxy-Authorization`).
    refused: usize,
}

/// A forward proxy on 127.0.0.1; it stops when dropped.
struct ForwardProxy {
    port: u16,
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ForwardProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ForwardProxy {
    /// Starts a proxy; with `credentials` (`user:password`) it wants them in
    /// `Proxy-Authorization: Basic`.
    async fn start(credentials: Option<&str>) -> ForwardProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let expected = credentials.map(|c| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(c)
            )
        });
        let s = seen.clone();
        let task = tokio::spawn(async move {
            // Bounded: no test makes this many connections.
            for _ in 0..10_000 {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve(conn, expected.clone(), s.clone()));
            }
        });
        ForwardProxy { port, seen, task }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn requests(&self) -> Vec<String> {
        self.seen.lock().unwrap().requests.clone()
    }

    fn refused(&self) -> usize {
        self.seen.lock().unwrap().refused
    }

    /// Whether a request line starts with `prefix` (e.g. `GET http://127.0.0.1:1/v1/sync`).
    fn saw(&self, prefix: &str) -> bool {
        self.requests().iter().any(|r| r.starts_with(prefix))
    }
}

/// One client connection: one request (absolute-form or CONNECT), then bytes both ways.
async fn serve(mut conn: TcpStream, expected: Option<String>, seen: Arc<Mutex<Seen>>) {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if buf.len() > 64 * 1024 {
            return;
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(Duration::from_secs(30), conn.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return,
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let early_body = buf[head_end..].to_vec();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or("").to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    if let Some(want) = &expected {
        let given = headers
            .iter()
            .find(|(k, _)| k == "proxy-authorization")
            .map(|(_, v)| v.as_str());
        if given != Some(want.as_str()) {
            seen.lock().unwrap().refused += 1;
            let _ = conn
                .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"test\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .await;
            return;
        }
    }
    seen.lock().unwrap().requests.push(request_line.clone());
    let mut parts = request_line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return;
    };
    // Only loopback: a test never sends anywhere else.
    let port_of = |authority: &str| -> Option<u16> {
        let (host, port) = authority.rsplit_once(':')?;
        matches!(host, "127.0.0.1" | "localhost")
            .then(|| port.parse().ok())
            .flatten()
    };
    if method == "CONNECT" {
        let Some(port) = port_of(target) else {
            let _ = conn.write_all(b"HTTP/1.1 403 Forbidden\r\n\r\n").await;
            return;
        };
        let Ok(mut upstream) = TcpStream::connect(("127.0.0.1", port)).await else {
            let _ = conn.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
            return;
        };
        if conn
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await
            .is_err()
            || upstream.write_all(&early_body).await.is_err()
        {
            return;
        }
        let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
        return;
    }
    let Some(rest) = target.strip_prefix("http://") else {
        let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        return;
    };
    let (authority, path) = match rest.find('/') {
        Some(at) => rest.split_at(at),
        None => (rest, "/"),
    };
    let Some(port) = port_of(authority) else {
        let _ = conn.write_all(b"HTTP/1.1 403 Forbidden\r\n\r\n").await;
        return;
    };
    let Ok(mut upstream) = TcpStream::connect(("127.0.0.1", port)).await else {
        let _ = conn.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
        return;
    };
    let mut forward = format!("{method} {path} HTTP/1.1\r\n");
    for (k, v) in &headers {
        if !matches!(
            k.as_str(),
            "proxy-authorization" | "proxy-connection" | "connection" | "keep-alive"
        ) {
            forward.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    forward.push_str("connection: close\r\n\r\n");
    if upstream.write_all(forward.as_bytes()).await.is_err()
        || upstream.write_all(&early_body).await.is_err()
    {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
}

/// The proxy variables a node process gets: `set` ones, and every other one emptied, so that
/// whatever the test runner's environment holds does not leak in (an empty upper-case
/// variable also hides its lower-case form from reqwest).
fn proxy_env<'a>(set: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut env: Vec<(&str, &str)> = ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"]
        .into_iter()
        .filter(|name| !set.iter().any(|(n, _)| n == name))
        .map(|name| (name, ""))
        .collect();
    env.extend_from_slice(set);
    env
}

/// A node with `[upstream]` `toml`, the upstream list `upstreams` and `extra` flags, in the
/// environment `env`.
fn start_node_env(
    data_dir: &std::path::Path,
    upstreams: &[&str],
    toml: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Proc {
    let config = node_config(data_dir, toml);
    let mut args = vec![
        "node",
        "--config",
        config.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--upstream-token",
        NODE_TOKEN,
        "--node-token",
        NODE_TOKEN,
    ];
    for u in upstreams {
        args.extend(["--upstream", u]);
    }
    args.extend_from_slice(extra);
    Proc::start_env(&args, data_dir.with_extension("log"), env)
}

/// Waits until the log of `p` contains `line`.
async fn wait_log(p: &Proc, line: &str) {
    wait_for(30, &format!("the log says {line:?}"), || {
        let log = p.log_text();
        async move { log.contains(line).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configured_proxy_carries_every_upstream_call_and_wins_over_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let m = manager.url.clone();
    let proxy = ForwardProxy::start(Some(&format!("{PROXY_USER}:{PROXY_PASSWORD}"))).await;
    let decoy = ForwardProxy::start(None).await;
    // Polls an hour apart: a release that arrives in time came through the push stream.
    let toml = format!(
        "sync_interval_s = 3600\nproxy = \"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{}\"\n",
        proxy.port
    );
    let decoy_url = decoy.url();
    let node = start_node_env(
        &dir.path().join("n"),
        &[&m],
        &toml,
        &[],
        &proxy_env(&[("HTTP_PROXY", &decoy_url), ("HTTPS_PROXY", &decoy_url)]),
    );
    wait_ready(&node.url).await;
    wait_log(&node, "holding the upstream push stream").await;

    let data = random_bytes(700_000, 61);
    let sha = publish_and_wait(&m, &[&node.url], "defs", "1", &data).await;
    let body = wait_served(&node.url, &sha, 30, "the blob through the proxy").await;
    assert!(body[..] == data[..], "the node serves the right bytes");
    // A critical event goes up at once (not with the hourly batch).
    let (status, v) = post_json(
        &node.url,
        "/v1/events",
        json!({"client_id": "pc-1", "events": [{"id": "e1", "kind": "intrusion", "subkind": "", "time": "2026-11-24T10:00:00Z", "data": {}}]}),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    let mu = m.clone();
    wait_for(30, "the critical event reaches the manager", || {
        let u = mu.clone();
        async move { (!all_events(&u).await.is_empty()).then_some(()) }
    })
    .await;

    // The manager's URL is http://127.0.0.1:PORT: absolute-form targets start with it.
    let via = m.clone();
    for path in [
        "/v1/sync".to_string(),
        "/v1/stream".to_string(),
        format!("/v1/content/{sha}"),
    ] {
        assert!(
            proxy.saw(&format!("GET {via}{path}")),
            "the proxy saw GET {path}: {:?}",
            proxy.requests()
        );
    }
    assert!(
        proxy.saw(&format!("POST {via}/v1/node/events")),
        "the proxy saw the event relay: {:?}",
        proxy.requests()
    );
    assert!(
        proxy
            .requests()
            .iter()
            .filter(|r| r.contains("/v1/sync"))
            .count()
            >= 2,
        "the start-up sync and the one the pushed event set off: {:?}",
        proxy.requests()
    );
    assert_eq!(proxy.refused(), 0, "every call carried the credentials");
    assert!(
        decoy.requests().is_empty(),
        "the environment's proxy is not used when upstream.proxy is set: {:?}",
        decoy.requests()
    );
    // The proxy does check: a call without the credentials is refused.
    let bare = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(proxy.url()).unwrap())
        .build()
        .unwrap();
    let r = bare.get(format!("{m}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 407);

    // The credentials show nowhere; the proxy does, redacted.
    let shown = format!("http://***@127.0.0.1:{}", proxy.port);
    let page = reqwest::get(format!("{}/", node.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains(&format!("Through proxy: {shown}")), "{page}");
    let log = node.log_text();
    assert!(log.contains(&format!("proxy={shown}")), "{log}");
    for text in [&page, &log] {
        assert!(
            !text.contains(PROXY_PASSWORD),
            "the password leaked: {text}"
        );
        assert!(!text.contains(PROXY_USER), "the user name leaked: {text}");
    }
}

/// A manager serving TLS with a fresh self-signed certificate for `localhost`, as a new site
/// is; its CA file and the client that trusts it.
struct TlsManager {
    _manager: Proc,
    cert_pem: std::path::PathBuf,
    port: String,
    client: reqwest::Client,
}

fn tls_manager(dir: &std::path::Path) -> TlsManager {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_pem = dir.join("cert.pem");
    let key_pem = dir.join("key.pem");
    std::fs::write(&cert_pem, cert.cert.pem()).unwrap();
    std::fs::write(&key_pem, cert.key_pair.serialize_pem()).unwrap();
    let manager = start_manager_strict(
        &dir.join("m"),
        &[
            "--tls-cert",
            cert_pem.to_str().unwrap(),
            "--tls-key",
            key_pem.to_str().unwrap(),
        ],
    );
    let port = manager.url.rsplit(':').next().unwrap().to_string();
    let ca = reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(ca)
        .resolve("localhost", format!("127.0.0.1:{port}").parse().unwrap())
        .no_proxy()
        .build()
        .unwrap();
    TlsManager {
        _manager: manager,
        cert_pem,
        port,
        client,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_environment_proxy_tunnels_calls_to_a_tls_upstream_and_no_proxy_goes_direct() {
    let dir = tempfile::tempdir().unwrap();
    let t = tls_manager(dir.path());
    let https = format!("https://localhost:{}", t.port);
    let data = random_bytes(400_000, 62);
    let sha = sha256_hex(&data);
    let r = t
        .client
        .post(format!("{https}/v1/admin/content?name=defs&version=1"))
        .bearer_auth(ADMIN_TOKEN)
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let ca = t.cert_pem.to_str().unwrap();

    let tunnel = ForwardProxy::start(None).await;
    let tunnel_url = tunnel.url();
    let node = start_node_env(
        &dir.path().join("n"),
        &[&https],
        "",
        &["--upstream-ca", ca],
        &proxy_env(&[("HTTPS_PROXY", &tunnel_url)]),
    );
    wait_mirrored(&node.url, &sha).await;
    let body = wait_served(&node.url, &sha, 30, "the blob through the tunnel").await;
    assert!(body[..] == data[..], "the node serves the right bytes");
    assert!(
        tunnel.saw(&format!("CONNECT localhost:{} ", t.port)),
        "the calls were tunnelled: {:?}",
        tunnel.requests()
    );
    assert!(
        node.log_text()
            .contains(&format!("proxy=environment: HTTPS_PROXY={tunnel_url}")),
        "{}",
        node.log_text()
    );

    // NO_PROXY names the upstream: straight there, the proxy sees nothing.
    let bypassed = ForwardProxy::start(None).await;
    let bypassed_url = bypassed.url();
    let direct = start_node_env(
        &dir.path().join("d"),
        &[&https],
        "",
        &["--upstream-ca", ca],
        &proxy_env(&[("HTTPS_PROXY", &bypassed_url), ("NO_PROXY", "localhost")]),
    );
    wait_mirrored(&direct.url, &sha).await;
    let body = wait_served(&direct.url, &sha, 30, "the blob fetched directly").await;
    assert!(body[..] == data[..]);
    assert!(
        bypassed.requests().is_empty(),
        "NO_PROXY bypasses the proxy: {:?}",
        bypassed.requests()
    );
}

#[test]
fn a_bad_proxy_is_refused_naming_the_key_and_not_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("node.toml");
    std::fs::write(
        &file,
        format!("[upstream]\nproxy = \"ftp://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:21\"\n"),
    )
    .unwrap();
    let check = std::process::Command::new(gup())
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    let start = std::process::Command::new(gup())
        .args(["node", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("n"))
        .args([
            "--upstream-proxy",
            &format!("http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:3128/some/path"),
        ])
        .output()
        .unwrap();
    for out in [check, start] {
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains("upstream.proxy"), "{err}");
        assert!(
            !err.contains(PROXY_PASSWORD) && !err.contains(PROXY_USER),
            "{err}"
        );
    }
}
