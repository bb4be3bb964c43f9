//! The content fast path (issue 23) answers exactly as the router does, through a real node:
//! for a hot blob, each answer of the fast path is compared with the router's answer to the
//! same request (status, every header field in order but `date`, body). The router's answer
//! is the same request plus `If-Modified-Since`, which the content handler ignores
//! (RFC 9110 §13.1.3 lets a server without modification dates ignore it) and the fast path
//! declines, on a connection of its own. `gup_fast_responses_total` tells which path answered.
//! Covered: GET, HEAD (§9.3.2: GET's fields, no body), keep-alive with several requests on
//! one connection, pipelined requests answered in order (also when one in the middle goes to
//! the router), `Connection: close` (§9.6), HTTP/1.0 with and without keep-alive, a request
//! split across several TCP writes, an oversized head, and the cases that go to the router:
//! `Range` (206), `If-None-Match` (304), a digest not in the catalog (the same 404 JSON).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

/// An answer as seen on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    status_line: String,
    /// Every field but `date`, in order, names lower-case.
    fields: Vec<(String, String)>,
    body: Vec<u8>,
}

struct Fixture {
    _dir: tempfile::TempDir,
    _manager: Proc,
    node: Proc,
    addr: String,
    sha: String,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let data = random_bytes(1024, 23);
    let sha = publish_and_wait(&manager.url, &[], "small", "1", &data).await;
    let node = start_node(&dir.path().join("n"), &[&manager.url], &[]);
    wait_mirrored(&node.url, &sha).await;
    let addr = node.url.trim_start_matches("http://").to_string();
    // Stored on the node and read from the store once, it is hot: wait until a GET is
    // answered by the fast path (each on a new connection: one whose first request went to
    // the router stays with it).
    let metrics = format!("{}/metrics", node.url);
    wait_for(30, "the node answers the blob from its hot cache", || {
        let (c, u, m) = (
            reqwest::Client::new(),
            format!("{}/v1/content/{sha}", node.url),
            metrics.clone(),
        );
        async move {
            let r = c.get(&u).send().await.ok()?;
            if r.status() != 200 {
                return None;
            }
            let text = c.get(&m).send().await.ok()?.text().await.ok()?;
            text.lines()
                .any(|l| l.starts_with("gup_fast_responses_total ") && !l.ends_with(" 0"))
                .then_some(())
        }
    })
    .await;
    Fixture {
        _dir: dir,
        _manager: manager,
        node,
        addr,
        sha,
    }
}

/// Parses one answer at the front of `buf`; None until it is complete. `head` says whether
/// it answers a HEAD (no body whatever `content-length` says).
fn parse(buf: &[u8], head: bool) -> Option<(Answer, usize)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let text = String::from_utf8_lossy(&buf[..end - 4]).to_string();
    let mut lines = text.split("\r\n");
    let status_line = lines.next()?.to_string();
    let mut fields = Vec::new();
    let mut length = 0usize;
    for line in lines {
        let (name, value) = line.split_once(':')?;
        let (name, value) = (name.to_ascii_lowercase(), value.trim().to_string());
        if name == "content-length" {
            length = value.parse().ok()?;
        }
        if name != "date" {
            fields.push((name, value));
        }
    }
    if head {
        length = 0;
    }
    if buf.len() < end + length {
        return None;
    }
    let body = buf[end..end + length].to_vec();
    Some((
        Answer {
            status_line,
            fields,
            body,
        },
        end + length,
    ))
}

/// Sends `chunks` on a new connection (a pause between them), reads one answer per entry of
/// `heads` (true: a HEAD's), then whether the server closed the connection within `linger`.
fn exchange(addr: &str, chunks: &[&[u8]], heads: &[bool], linger: Duration) -> (Vec<Answer>, bool) {
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_nodelay(true).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    for (i, chunk) in chunks.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(30));
        }
        conn.write_all(chunk).unwrap();
    }
    let mut buf = Vec::new();
    let mut answers = Vec::new();
    let mut closed = false;
    while answers.len() < heads.len() {
        if let Some((a, n)) = parse(&buf, heads[answers.len()]) {
            answers.push(a);
            buf.drain(..n);
            continue;
        }
        let mut chunk = [0u8; 16384];
        match conn.read(&mut chunk) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("no whole answer within 10 s: {e}; got {answers:?}"),
        }
    }
    if !closed {
        conn.set_read_timeout(Some(linger)).unwrap();
        let mut rest = [0u8; 1024];
        closed = matches!(conn.read(&mut rest), Ok(0));
    }
    (answers, closed)
}

/// `method target version` with `extra` header lines, for the blob or another target.
fn request(method: &str, target: &str, version: &str, extra: &[&str]) -> Vec<u8> {
    let mut r = format!("{method} {target} {version}\r\nhost: t\r\n");
    for e in extra {
        r.push_str(e);
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    r.into_bytes()
}

const ROUTER: &str = "If-Modified-Since: Thu, 01 Jan 1970 00:00:00 GMT";

impl Fixture {
    fn target(&self) -> String {
        format!("/v1/content/{}", self.sha)
    }

    async fn fast_count(&self) -> f64 {
        metric(
            &reqwest::Client::new(),
            &self.node.url,
            "gup_fast_responses_total",
        )
        .await
    }

    /// The router's answer to `method version extra` for the blob, on its own connection.
    fn router_answer(&self, method: &str, version: &str, extra: &[&str]) -> (Answer, bool) {
        let mut with = extra.to_vec();
        with.push(ROUTER);
        let req = request(method, &self.target(), version, &with);
        let (mut a, closed) = exchange(
            &self.addr,
            &[&req],
            &[method == "HEAD"],
            Duration::from_millis(300),
        );
        assert_eq!(a.len(), 1, "the router answers");
        (a.remove(0), closed)
    }
}

#[tokio::test]
async fn fast_answers_are_the_routers_answers() {
    let f = fixture().await;
    let t = f.target();
    let linger = Duration::from_millis(300);

    // GET and HEAD, kept alive.
    for method in ["GET", "HEAD"] {
        let before = f.fast_count().await;
        let (a, closed) = exchange(
            &f.addr,
            &[&request(method, &t, "HTTP/1.1", &[])],
            &[method == "HEAD"],
            linger,
        );
        let (r, router_closed) = f.router_answer(method, "HTTP/1.1", &[]);
        assert_eq!(a[0], r, "{method}");
        assert_eq!(a[0].status_line, "HTTP/1.1 200 OK");
        assert!(!closed && !router_closed, "{method}: kept alive");
        assert_eq!(
            f.fast_count().await - before,
            1.0,
            "{method} took the fast path"
        );
    }
    let (get, _) = f.router_answer("GET", "HTTP/1.1", &[]);
    assert_eq!(get.body.len(), 1024);
    assert!(get
        .fields
        .contains(&("etag".to_string(), format!("\"{}\"", f.sha))));

    // Five requests one after another on one connection; then three pipelined in one write.
    let before = f.fast_count().await;
    let mut conn = TcpStream::connect(&f.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    for _ in 0..5 {
        conn.write_all(&request("GET", &t, "HTTP/1.1", &[]))
            .unwrap();
        let mut buf = Vec::new();
        let answer = loop {
            if let Some((a, _)) = parse(&buf, false) {
                break a;
            }
            let mut chunk = [0u8; 4096];
            let n = conn.read(&mut chunk).unwrap();
            assert!(n > 0, "closed while kept alive");
            buf.extend_from_slice(&chunk[..n]);
        };
        assert_eq!(answer, get);
    }
    drop(conn);
    let (head, _) = f.router_answer("HEAD", "HTTP/1.1", &[]);
    let pipelined = [
        request("GET", &t, "HTTP/1.1", &[]),
        request("HEAD", &t, "HTTP/1.1", &[]),
        request("GET", &t, "HTTP/1.1", &[]),
    ]
    .concat();
    let (a, closed) = exchange(&f.addr, &[&pipelined], &[false, true, false], linger);
    assert_eq!(a, vec![get.clone(), head, get.clone()]);
    assert!(!closed);
    assert_eq!(f.fast_count().await - before, 8.0);

    // Connection: close, and HTTP/1.0 with and without keep-alive.
    for (version, extra, keep) in [
        ("HTTP/1.1", &["Connection: close"][..], false),
        ("HTTP/1.0", &[][..], false),
        ("HTTP/1.0", &["Connection: keep-alive"][..], true),
    ] {
        let before = f.fast_count().await;
        let (a, closed) = exchange(
            &f.addr,
            &[&request("GET", &t, version, extra)],
            &[false],
            Duration::from_secs(5),
        );
        let (r, router_closed) = f.router_answer("GET", version, extra);
        assert_eq!(a[0], r, "{version} {extra:?}");
        assert_eq!(
            closed, !keep,
            "{version} {extra:?}: closed after the answer"
        );
        assert_eq!(router_closed, !keep, "{version} {extra:?}: as the router");
        assert_eq!(f.fast_count().await - before, 1.0, "{version} {extra:?}");
    }

    // A request split across three writes.
    let before = f.fast_count().await;
    let whole = request("GET", &t, "HTTP/1.1", &["user-agent: split"]);
    let (one, rest) = whole.split_at(7);
    let (two, three) = rest.split_at(40);
    let (a, _) = exchange(&f.addr, &[one, two, three], &[false], linger);
    assert_eq!(a[0], get);
    assert_eq!(f.fast_count().await - before, 1.0);
}

#[tokio::test]
async fn requests_the_fast_path_does_not_answer_get_the_routers_answer() {
    let f = fixture().await;
    let t = f.target();
    let linger = Duration::from_millis(300);
    let before = f.fast_count().await;

    // Range -> 206; If-None-Match -> 304: as the router answers them on their own.
    for extra in ["Range: bytes=0-9", "If-None-Match: \"nope\""] {
        let (a, _) = exchange(
            &f.addr,
            &[&request("GET", &t, "HTTP/1.1", &[extra])],
            &[false],
            linger,
        );
        let (r, _) = f.router_answer("GET", "HTTP/1.1", &[extra]);
        assert_eq!(a[0], r, "{extra}");
    }
    let (ranged, _) = f.router_answer("GET", "HTTP/1.1", &["Range: bytes=0-9"]);
    assert!(ranged.status_line.starts_with("HTTP/1.1 206"), "{ranged:?}");
    assert_eq!(ranged.body.len(), 10);
    let etag = format!("If-None-Match: \"{}\"", f.sha);
    let (a, _) = exchange(
        &f.addr,
        &[&request("GET", &t, "HTTP/1.1", &[&etag])],
        &[true],
        linger,
    );
    assert!(a[0].status_line.starts_with("HTTP/1.1 304"), "{:?}", a[0]);

    // A digest not in the catalog: the same 404 JSON.
    let unknown = format!("/v1/content/{}", "0".repeat(64));
    let (a, _) = exchange(
        &f.addr,
        &[&request("GET", &unknown, "HTTP/1.1", &[])],
        &[false],
        linger,
    );
    let (b, _) = exchange(
        &f.addr,
        &[&request("GET", &unknown, "HTTP/1.1", &[ROUTER])],
        &[false],
        linger,
    );
    assert_eq!(a[0], b[0]);
    assert!(a[0].status_line.starts_with("HTTP/1.1 404"), "{:?}", a[0]);
    let body: serde_json::Value = serde_json::from_slice(&a[0].body).unwrap();
    assert_eq!(body["error"], "not_in_catalog");
    assert_eq!(
        f.fast_count().await,
        before,
        "none of these took the fast path"
    );

    // Pipelined: fast, then one for the router, then one the fast path would take: all
    // answered in order (the connection stays with the router after the second).
    let (get, _) = f.router_answer("GET", "HTTP/1.1", &[]);
    let pipelined = [
        request("GET", &t, "HTTP/1.1", &[]),
        request("GET", &t, "HTTP/1.1", &["Range: bytes=0-9"]),
        request("GET", &t, "HTTP/1.1", &[]),
    ]
    .concat();
    let (a, _) = exchange(&f.addr, &[&pipelined], &[false, false, false], linger);
    assert_eq!(a, vec![get.clone(), ranged, get]);

    // An oversized head (over limits.max_header_bytes, 16 KiB by default) gets what the
    // router's connection gets for it.
    let big = format!("x-big: {}", "a".repeat(20 << 10));
    let outcome = |extra: &[&str]| {
        let mut conn = TcpStream::connect(&f.addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let _ = conn.write_all(&request("GET", &t, "HTTP/1.1", extra));
        let mut got = Vec::new();
        let _ = conn.read_to_end(&mut got);
        let text = String::from_utf8_lossy(&got).to_string();
        text.split("\r\n").next().unwrap_or("").to_string()
    };
    let fast = outcome(&[&big]);
    let router = outcome(&[&big, ROUTER]);
    assert_eq!(fast, router);
    assert!(
        fast.is_empty() || fast.starts_with("HTTP/1.1 431"),
        "{fast}"
    );
}

/// The fields of a reqwest answer but `date`, in order, and its body.
async fn seen(r: reqwest::Response) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let status = r.status().as_u16();
    let fields = r
        .headers()
        .iter()
        .filter(|(n, _)| n.as_str() != "date")
        .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("?").to_string()))
        .collect();
    (status, fields, r.bytes().await.unwrap().to_vec())
}

#[tokio::test]
async fn over_tls_the_fast_path_answers_inside_the_session_as_the_router_does() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let data = random_bytes(1024, 29);
    let sha = publish_and_wait(&manager.url, &[], "small", "1", &data).await;
    let tls = pair(dir.path(), "node");
    let toml = format!(
        "\n[node]\ntls_cert = {:?}\ntls_key = {:?}\n",
        tls.cert.display().to_string(),
        tls.key.display().to_string()
    );
    let node = start_node_toml(&dir.path().join("n"), &[&manager.url], &toml, &[]);
    let port = node.url.rsplit(':').next().unwrap().to_string();
    let base = format!("https://localhost:{port}");
    let url = format!("{base}/v1/content/{sha}");
    // One session for everything: the pool keeps one connection.
    let client = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(tls.pem.as_bytes()).unwrap())
        .resolve("localhost", format!("127.0.0.1:{port}").parse().unwrap())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let fresh = trusting(&tls.pem, &port);
    wait_for(
        30,
        "the TLS node answers the blob from its hot cache",
        || {
            let (c, u, b) = (fresh.clone(), url.clone(), base.clone());
            async move {
                let r = c.get(&u).send().await.ok()?;
                if r.status() != 200 {
                    return None;
                }
                (metric(&c, &b, "gup_fast_responses_total").await > 0.0).then_some(())
            }
        },
    )
    .await;

    // Kept alive: each GET answered by the fast path, with the router's fields and the bytes.
    let before = metric(&fresh, &base, "gup_fast_responses_total").await;
    let fast = seen(client.get(&url).send().await.unwrap()).await;
    let again = seen(client.get(&url).send().await.unwrap()).await;
    let after = metric(&fresh, &base, "gup_fast_responses_total").await;
    assert_eq!(after - before, 2.0, "both GETs took the fast path");
    assert_eq!(fast, again);
    assert_eq!(fast.2, data);
    let router = seen(
        client
            .get(&url)
            .header("if-modified-since", "Thu, 01 Jan 1970 00:00:00 GMT")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(fast, router, "the fast answer differs from the router's");

    // The same session then goes to the router for a range, and stays correct.
    let ranged = client
        .get(&url)
        .header("range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(ranged.status(), 206);
    assert_eq!(ranged.bytes().await.unwrap(), data[10..20]);
    assert_eq!(seen(client.get(&url).send().await.unwrap()).await.2, data);

    // `Connection: close` on a fresh session: the whole answer, then a clean end.
    let before = metric(&fresh, &base, "gup_fast_responses_total").await;
    let closed = fresh
        .get(&url)
        .header("connection", "close")
        .send()
        .await
        .unwrap();
    assert_eq!(closed.headers()["connection"], "close");
    assert_eq!(closed.bytes().await.unwrap(), data);
    let after = metric(&fresh, &base, "gup_fast_responses_total").await;
    assert_eq!(after - before, 1.0, "the closing GET took the fast path");
    drop((node, manager));
}
