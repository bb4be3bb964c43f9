//! End to end through a real manager process: SIGHUP re-reads the config file.
//! - the TLS certificate is swapped while a download is in flight: the download completes
//!   with the right bytes on the certificate it started with, and new connections get the new
//!   one; a certificate renewed in place on disk is picked up without a signal;
//! - a bad file on SIGHUP keeps the running config and logs one line naming the key;
//! - a rotated node token: with `node_token_previous` both are accepted, after it is removed
//!   only the new one is;
//! - `[limits]` is live: `max_connections_per_address` lowered below what an address holds
//!   closes none of its connections (each still answers) and refuses new ones until enough
//!   have closed, raised admits again; a bad `[limits]` value keeps the running limits, and
//!   `limits.threads` is named as taking effect at the next restart.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn write_config(path: &Path, tls: &Pair, extra: &str) {
    std::fs::write(
        path,
        format!(
            "[manager]\ntls_cert = {:?}\ntls_key = {:?}\n{extra}",
            tls.cert.display().to_string(),
            tls.key.display().to_string()
        ),
    )
    .unwrap();
}

async fn sync_status(client: &reqwest::Client, https: &str, token: &str) -> u16 {
    client
        .get(format!("{https}/v1/sync"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_swaps_the_certificate_keeps_a_bad_file_out_and_rotates_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (pair(tmp.path(), "a"), pair(tmp.path(), "b"));
    let config = tmp.path().join("manager.toml");
    write_config(&config, &a, "node_token = \"t1\"\n");
    let data_dir = tmp.path().join("m");
    let manager = Proc::start(
        &[
            "manager",
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--admin-token",
            ADMIN_TOKEN,
        ],
        data_dir.with_extension("log"),
    );
    let port = manager.url.rsplit(':').next().unwrap().to_string();
    let https = format!("https://localhost:{port}");
    let (with_a, with_b) = (trusting(&a.pem, &port), trusting(&b.pem, &port));

    // A blob big enough that a slow reader keeps its download in flight.
    let data = random_bytes(24 << 20, 21);
    let r = with_a
        .post(format!("{https}/v1/admin/content?name=defs&version=1"))
        .bearer_auth(ADMIN_TOKEN)
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let sha = sha256_hex(&data);
    let download = with_a
        .get(format!("{https}/v1/content/{sha}"))
        .send()
        .await
        .unwrap();
    assert_eq!(download.status(), 200);
    let mut body = download.bytes_stream();
    let mut got = Vec::new();
    got.extend_from_slice(&body.next().await.unwrap().unwrap());
    assert!(got.len() < data.len(), "the download is in flight");

    // === The certificate swapped by SIGHUP ===
    write_config(&config, &b, "node_token = \"t1\"\n");
    hangup(&manager);
    logged(&manager, "key=manager.tls_cert", 1).await;
    let r = with_b.get(format!("{https}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200, "a new connection gets the new certificate");
    // (A client that spoke TLS before may resume its session without a certificate; a new
    // client must shake hands in full.)
    assert!(
        trusting(&a.pem, &port)
            .get(format!("{https}/healthz"))
            .send()
            .await
            .is_err(),
        "and no longer the old one"
    );
    // The download under way finishes on the connection it started on, every byte right.
    while let Some(chunk) = body.next().await {
        got.extend_from_slice(&chunk.unwrap());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(got == data, "the in-flight download completed intact");

    // === A bad file keeps the running config ===
    write_config(&config, &b, "node_token = \"t9\"\nretain_revisions = 0\n");
    hangup(&manager);
    logged(&manager, "reload refused", 1).await;
    let log = manager.log_text();
    let refused = log.lines().find(|l| l.contains("reload refused")).unwrap();
    assert!(refused.contains("manager.retain_revisions"), "{refused}");
    assert_eq!(sync_status(&with_b, &https, "t1").await, 200);
    assert_eq!(sync_status(&with_b, &https, "t9").await, 401);

    // === Token rotation: the previous token stays accepted until it is removed ===
    write_config(
        &config,
        &b,
        "node_token = \"t2\"\nnode_token_previous = \"t1\"\n",
    );
    hangup(&manager);
    logged(&manager, "key=manager.node_token_previous", 1).await;
    assert_eq!(sync_status(&with_b, &https, "t2").await, 200);
    assert_eq!(sync_status(&with_b, &https, "t1").await, 200);
    assert_eq!(sync_status(&with_b, &https, "t3").await, 401);
    write_config(&config, &b, "node_token = \"t2\"\n");
    hangup(&manager);
    logged(&manager, "key=manager.node_token_previous", 2).await;
    assert_eq!(sync_status(&with_b, &https, "t2").await, 200);
    assert_eq!(sync_status(&with_b, &https, "t1").await, 401);

    // === A renewal in place on disk, no signal ===
    let c = pair(tmp.path(), "c");
    std::fs::copy(&c.key, &b.key).unwrap();
    std::fs::copy(&c.cert, &b.cert).unwrap();
    let with_c = trusting(&c.pem, &port);
    wait_for(30, "the renewed certificate in use", || {
        let (client, url) = (with_c.clone(), format!("{https}/healthz"));
        async move {
            let r = client.get(url).send().await.ok()?;
            (r.status() == 200).then_some(())
        }
    })
    .await;
    // A restart-only key is named as such.
    write_config(&config, &b, "node_token = \"t2\"\nretain_revisions = 5\n");
    std::fs::copy(&c.key, &b.key).unwrap();
    hangup(&manager);
    logged(&manager, "key=manager.retain_revisions", 1).await;
    assert!(manager
        .log_text()
        .lines()
        .any(|l| l.contains("key=manager.retain_revisions") && l.contains("next restart")));
    assert_eq!(manager.stop(), Some(0));
}

/// One kept-alive `GET /healthz` on `conn`: the answer's head, or None when the server closed
/// the connection without answering (a refused connection). Panics when neither comes within
/// 10 s: a refusal is a close at once, never a silence.
async fn ask(conn: &mut TcpStream) -> Option<String> {
    // A refused connection may be reset before the request is written: its read says so.
    let _ = conn
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n")
        .await;
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 1024];
        let read = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut chunk)).await;
        match read.expect("neither an answer nor a close within 10 s") {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        let text = String::from_utf8_lossy(&buf).to_string();
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        let length = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            })
            .expect("a content-length");
        if body.len() >= length {
            return Some(head.to_string());
        }
    }
}

/// A new connection to `addr` that the server serves, retried for at most 10 s: a connection
/// its client closed counts as gone once the server has read the close.
async fn admitted(addr: &str) -> TcpStream {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut conn = TcpStream::connect(addr).await.unwrap();
        if let Some(head) = ask(&mut conn).await {
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            return conn;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no new connection served within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A new connection to `addr` is closed without an answer.
async fn refused(addr: &str, why: &str) {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    assert_eq!(ask(&mut conn).await, None, "{why}");
}

/// The lines of `p`'s log naming `key`.
fn lines_naming(p: &Proc, key: &str) -> Vec<String> {
    p.log_text()
        .lines()
        .filter(|l| l.contains(&format!("key={key}")))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_lowers_max_connections_per_address_without_closing_open_ones_and_raises_it() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("manager.toml");
    // A long head timeout: the kept-alive connections idle between their requests.
    let limits = |extra: &str| {
        std::fs::write(
            &config,
            format!("[manager]\n[limits]\nheader_read_timeout_s = 120\n{extra}"),
        )
        .unwrap();
    };
    limits("max_connections_per_address = 4\n");
    let manager = start_manager(
        &tmp.path().join("m"),
        &["--config", config.to_str().unwrap()],
    );
    let addr = manager.url.trim_start_matches("http://").to_string();
    let mut open = Vec::new();
    for _ in 0..4 {
        open.push(admitted(&addr).await);
    }
    refused(&addr, "a fifth is over the bound of 4").await;

    // === Lowered to 2 with 4 open ===
    limits("max_connections_per_address = 2\n");
    hangup(&manager);
    logged(&manager, "key=limits.max_connections_per_address", 1).await;
    let applied = lines_naming(&manager, "limits.max_connections_per_address");
    assert!(
        applied[0].contains("the new value is in force"),
        "{applied:?}"
    );
    for conn in &mut open {
        let head = ask(conn).await.expect("an open connection carries on");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    refused(&addr, "four held, bound 2: a new one is closed at once").await;
    drop(open);
    let mut open = vec![admitted(&addr).await, admitted(&addr).await];
    refused(&addr, "two held, bound 2").await;

    // === A bad value keeps the running limits ===
    limits("max_connections_per_address = 8\nheader_read_timeout_s = 0\n");
    hangup(&manager);
    logged(&manager, "reload refused", 1).await;
    let log = manager.log_text();
    let line = log.lines().find(|l| l.contains("reload refused")).unwrap();
    assert!(line.contains("limits.header_read_timeout_s"), "{line}");
    refused(&addr, "the refused file's bound of 8 is not in force").await;

    // === Raised to 8; threads changed too, which takes a restart ===
    limits("max_connections_per_address = 8\nthreads = 3\n");
    hangup(&manager);
    logged(&manager, "key=limits.max_connections_per_address", 2).await;
    logged(&manager, "key=limits.threads", 1).await;
    let threads = lines_naming(&manager, "limits.threads");
    assert!(
        threads.len() == 1 && threads[0].contains("next restart"),
        "{threads:?}"
    );
    for _ in 0..6 {
        open.push(admitted(&addr).await);
    }
    refused(&addr, "eight held, bound 8").await;
    for conn in &mut open {
        assert!(ask(conn).await.is_some(), "all eight answer");
    }
    drop(open);
    assert_eq!(manager.stop(), Some(0));
}
