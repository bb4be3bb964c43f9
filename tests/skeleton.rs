//! End to end through real processes: a manager and a node on loopback, content published
//! with `gup admin publish`, read back through the node byte-exact, across restarts; the CLI's
//! exit codes; and the demo.

mod common;

use std::process::Command;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_then_read_through_node_and_again_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let m_dir = dir.path().join("manager");
    let n_dir = dir.path().join("node");
    let manager = start_manager(&m_dir, &[]);
    let node = start_node(&n_dir, &[&manager.url], &[]);
    let client = reqwest::Client::new();

    let data = random_bytes(3_000_000, 7);
    let sha = sha256_hex(&data);
    let file = dir.path().join("defs.bin");
    std::fs::write(&file, &data).unwrap();
    let (code, out) = publish(&manager.url, &file, "defs", "1");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&sha), "{out}");

    let node_url = node.url.clone();
    wait_for(20, "node mirrors the catalog", || {
        let c = client.clone();
        let u = node_url.clone();
        let s = sha.clone();
        async move { catalog_has(&c, &u, &s).await.then_some(()) }
    })
    .await;
    let got = client
        .get(format!("{}/v1/content/{sha}", node.url))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.headers()["etag"], format!("\"{sha}\"").as_str());
    let body = got.bytes().await.unwrap();
    assert!(body[..] == data[..], "bytes through the node differ");

    // Bad digests: 400 with the JSON error, not-in-catalog: 404 without an upstream fetch.
    let fetches_before = metric(&client, &node.url, "gup_upstream_fetches_total").await;
    let r = client
        .get(format!("{}/v1/content/{}", node.url, sha.to_uppercase()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "bad_digest");
    assert!(v["message"].as_str().unwrap().contains("lower-case hex"));
    let unknown = sha256_hex(b"never published");
    let r = client
        .get(format!("{}/v1/content/{unknown}", node.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "not_in_catalog");
    assert_eq!(
        metric(&client, &node.url, "gup_upstream_fetches_total").await,
        fetches_before
    );

    // Same bytes again: 200 and the same revision; other bytes under the same version: 409.
    let (code, out) = publish(&manager.url, &file, "defs", "1");
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("already published"), "{out}");
    let other = dir.path().join("other.bin");
    std::fs::write(&other, b"other bytes").unwrap();
    let (code, out) = publish(&manager.url, &other, "defs", "1");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("409"), "{out}");

    // Graceful stop: exit 0. Then restart both and read again.
    assert_eq!(node.stop(), Some(0));
    assert_eq!(manager.stop(), Some(0));

    // The node alone serves what it mirrored, before any upstream answers.
    let node = start_node(&n_dir, &["http://127.0.0.1:9"], &[]);
    let r = client
        .get(format!("{}/readyz", node.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(v["stale_since"].is_string(), "{v}");
    let body = client
        .get(format!("{}/v1/content/{sha}", node.url))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(body[..] == data[..]);
    assert_eq!(node.stop(), Some(0));

    let manager = start_manager(&m_dir, &[]);
    let node = start_node(&n_dir, &[&manager.url], &[]);
    let cat: serde_json::Value = client
        .get(format!("{}/v1/catalog", manager.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cat["revision"], 1);
    let body = client
        .get(format!("{}/v1/content/{sha}", node.url))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(body[..] == data[..]);
    let body = client
        .get(format!("{}/v1/content/{sha}", manager.url))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(body[..] == data[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_etag_and_admin_auth() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let client = reqwest::Client::new();
    let r = client
        .get(format!("{}/v1/catalog", manager.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    let r = client
        .get(format!("{}/v1/catalog", manager.url))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);

    let r = client
        .post(format!("{}/v1/admin/content?name=x", manager.url))
        .body("bytes")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "unauthorized");
    let r = client
        .post(format!("{}/v1/admin/content?name=x", manager.url))
        .bearer_auth("wrong")
        .body("bytes")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client
        .post(format!("{}/v1/admin/content?name=../x", manager.url))
        .bearer_auth(ADMIN_TOKEN)
        .body("bytes")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = client
        .post(format!(
            "{}/v1/admin/content?name=x&urgent=true",
            manager.url
        ))
        .bearer_auth(ADMIN_TOKEN)
        .body("bytes")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["revision"], 1);
    assert_eq!(v["sha256"], sha256_hex(b"bytes"));
    let r = client
        .get(format!("{}/v1/catalog", manager.url))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["items"][0]["urgent"], true);
    // /v1/sync needs the node token.
    let r = client
        .get(format!("{}/v1/sync", manager.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client
        .delete(format!("{}/v1/admin/content/x", manager.url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .delete(format!("{}/v1/admin/content/x", manager.url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = client
        .get(format!("{}/nope", manager.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "not_found");
}

#[test]
fn check_config_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    for f in ["config/manager.toml", "config/node.toml"] {
        let out = Command::new(gup())
            .args(["check-config", &format!("{root}/{f}")])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{f}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let role = if f.contains("manager") {
            "manager"
        } else {
            "node"
        };
        assert!(stdout.contains(&format!("valid {role} config")), "{stdout}");
    }
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[upstream]\nsync_interval_s = 0\n").unwrap();
    let out = Command::new(gup())
        .args(["check-config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("upstream.sync_interval_s"), "{err}");

    std::fs::write(&bad, "[cache]\nprefetch = true\nretain = 3\n").unwrap();
    let out = Command::new(gup())
        .args(["check-config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cache.retain"));

    // A bad flag value is a usage error too.
    let out = Command::new(gup())
        .args(["node", "--upstream", "ftp://example", "--data-dir"])
        .arg(dir.path().join("n"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--upstream"), "{err}");
}

#[test]
fn demo_publishes_and_verifies_through_the_node() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(gup())
        .args(["demo", "--clients", "20", "--window", "3", "--data-dir"])
        .arg(dir.path().join("demo"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let done = line.contains("serving until Ctrl-C");
                seen.push(line);
                if done {
                    break;
                }
            }
            Err(_) => {
                let _ = child.kill();
                panic!("demo did not finish its showcase:\n{}", seen.join("\n"));
            }
        }
    }
    let text = seen.join("\n");
    assert!(text.contains("every sha256 verified"), "{text}");
    assert!(text.contains("peak/mean"), "{text}");
    assert!(text.contains("manager  http://127.0.0.1:"), "{text}");
    assert!(text.contains("node     http://127.0.0.1:"), "{text}");
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}
