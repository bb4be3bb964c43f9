//! End to end through real processes: a manager and a node on loopback.
//! - `gup admin publish` prints the digest; the node mirrors the catalog and serves the
//!   bytes exactly, with the digest as `ETag`;
//! - an upper-case digest is 400 `bad_digest`; a digest not in the catalog is 404
//!   `not_in_catalog` and is never fetched upstream;
//! - publishing the same bytes again says "already published"; other bytes under the same
//!   version fail with 409;
//! - both roles exit 0 on SIGTERM; a node restarted with no upstream answering serves what it
//!   mirrored and says it is stale; the catalog and content survive a restart of both;
//! - the catalog's `ETag` answers 304 until a publish changes it; an urgent publish answers
//!   201 with its digest and revision and is marked urgent; unpublishing answers 200, then
//!   404;
//! - the CLI's exit codes: `check-config` names the role of a valid file, and a bad key or a
//!   bad flag is exit 2 with one line naming it; and the demo.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

struct Published {
    dir: tempfile::TempDir,
    manager: Proc,
    node: Proc,
    data: Vec<u8>,
    sha: String,
}

impl Published {
    fn m_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("manager")
    }

    fn n_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("node")
    }
}

/// A manager and a node with 3 MB published as `defs 1` and mirrored by the node.
async fn published() -> Published {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("manager"), &[]);
    let node = start_node(&dir.path().join("node"), &[&manager.url], &[]);
    let data = random_bytes(3_000_000, 7);
    let sha = publish_and_wait(&manager.url, &[&node.url], "defs", "1", &data).await;
    Published {
        dir,
        manager,
        node,
        data,
        sha,
    }
}

async fn content(base: &str, sha: &str) -> reqwest::Response {
    reqwest::get(format!("{base}/v1/content/{sha}"))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gup_admin_publish_prints_the_digest() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let data = random_bytes(1000, 7);
    let file = dir.path().join("defs.bin");
    std::fs::write(&file, &data).unwrap();
    let (code, out) = publish(&manager.url, &file, "defs", "1");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&sha256_hex(&data)), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_serves_published_bytes_exactly_with_the_digest_as_etag() {
    let p = published().await;
    let got = content(&p.node.url, &p.sha).await;
    assert_eq!(got.status(), 200);
    assert_eq!(got.headers()["etag"], format!("\"{}\"", p.sha).as_str());
    let body = got.bytes().await.unwrap();
    assert!(body[..] == p.data[..], "bytes through the node differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upper_case_digest_is_400_bad_digest() {
    let p = published().await;
    let r = content(&p.node.url, &p.sha.to_uppercase()).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "bad_digest");
    assert!(
        v["message"].as_str().unwrap().contains("lower-case hex"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_not_in_the_catalog_is_404_and_never_fetched_upstream() {
    let p = published().await;
    let client = reqwest::Client::new();
    let fetches_before = metric(&client, &p.node.url, "gup_upstream_fetches_total").await;
    let r = content(&p.node.url, &sha256_hex(b"never published")).await;
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "not_in_catalog");
    assert_eq!(
        metric(&client, &p.node.url, "gup_upstream_fetches_total").await,
        fetches_before,
        "no upstream fetch for a digest not in the catalog"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_the_same_bytes_again_says_already_published() {
    let p = published().await;
    let file = p.dir.path().join("defs.bin");
    std::fs::write(&file, &p.data).unwrap();
    let (code, out) = publish(&p.manager.url, &file, "defs", "1");
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("already published"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_other_bytes_under_a_published_version_fails_with_409() {
    let p = published().await;
    let other = p.dir.path().join("other.bin");
    std::fs::write(&other, b"other bytes").unwrap();
    let (code, out) = publish(&p.manager.url, &other, "defs", "1");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("409"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_and_node_exit_0_on_sigterm() {
    let p = published().await;
    assert_eq!(p.node.stop(), Some(0), "the node");
    assert_eq!(p.manager.stop(), Some(0), "the manager");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_with_no_upstream_answering_serves_what_it_mirrored() {
    let p = published().await;
    // The node fetches the blob on this first request (or has prefetched it).
    let body = content(&p.node.url, &p.sha).await.bytes().await.unwrap();
    assert!(body[..] == p.data[..]);
    let (n_dir, data, sha) = (p.n_dir(), p.data.clone(), p.sha.clone());
    let Published {
        dir: _dir,
        manager,
        node,
        ..
    } = p;
    assert_eq!(node.stop(), Some(0));
    assert_eq!(manager.stop(), Some(0));

    // Port 9 (discard) answers nothing on loopback.
    let node = start_node(&n_dir, &["http://127.0.0.1:9"], &[]);
    let (status, v) = get_json(&node.url, "/readyz").await;
    assert_eq!(status, 200, "ready from what it mirrored: {v}");
    assert!(v["stale_since"].is_string(), "and says it is stale: {v}");
    let body = content(&node.url, &sha).await.bytes().await.unwrap();
    assert!(body[..] == data[..], "the mirrored bytes are served");
    assert_eq!(node.stop(), Some(0), "and it stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalog_and_content_survive_a_restart_of_both() {
    let p = published().await;
    let body = content(&p.node.url, &p.sha).await.bytes().await.unwrap();
    assert!(body[..] == p.data[..]);
    let (m_dir, n_dir, data, sha) = (p.m_dir(), p.n_dir(), p.data.clone(), p.sha.clone());
    let Published {
        dir: _dir,
        manager,
        node,
        ..
    } = p;
    assert_eq!(node.stop(), Some(0));
    assert_eq!(manager.stop(), Some(0));

    let manager = start_manager(&m_dir, &[]);
    let node = start_node(&n_dir, &[&manager.url], &[]);
    let (_, cat) = get_json(&manager.url, "/v1/catalog").await;
    assert_eq!(cat["revision"], 1, "{cat}");
    let body = content(&node.url, &sha).await.bytes().await.unwrap();
    assert!(
        body[..] == data[..],
        "the node serves the bytes after the restart"
    );
    let body = content(&manager.url, &sha).await.bytes().await.unwrap();
    assert!(
        body[..] == data[..],
        "the manager serves the bytes after the restart"
    );
}

/// `POST /v1/admin/content?QUERY` with `body` and the admin token.
async fn publish_raw(manager: &str, query: &str, body: &'static str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{manager}/v1/admin/content?{query}"))
        .bearer_auth(ADMIN_TOKEN)
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn catalog(base: &str, if_none_match: Option<&str>) -> reqwest::Response {
    let mut req = reqwest::Client::new().get(format!("{base}/v1/catalog"));
    if let Some(etag) = if_none_match {
        req = req.header("if-none-match", etag);
    }
    req.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalog_etag_answers_304_until_a_publish_changes_it() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let r = catalog(&manager.url, None).await;
    assert_eq!(r.status(), 200);
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    let r = catalog(&manager.url, Some(&etag)).await;
    assert_eq!(r.status(), 304, "unchanged");
    let r = publish_raw(&manager.url, "name=x", "bytes").await;
    assert_eq!(r.status(), 201);
    let r = catalog(&manager.url, Some(&etag)).await;
    assert_eq!(r.status(), 200, "changed by the publish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_urgent_publish_answers_201_with_digest_and_revision_and_is_marked_urgent() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let r = publish_raw(&manager.url, "name=x&urgent=true", "bytes").await;
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["revision"], 1);
    assert_eq!(v["sha256"], sha256_hex(b"bytes"));
    let (_, cat) = get_json(&manager.url, "/v1/catalog").await;
    assert_eq!(cat["items"][0]["urgent"], true, "{cat}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpublishing_a_name_answers_200_then_404() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let r = publish_raw(&manager.url, "name=x", "bytes").await;
    assert_eq!(r.status(), 201);
    let (status, v) = admin_call(
        &manager.url,
        reqwest::Method::DELETE,
        "/v1/admin/content/x",
        None,
    )
    .await;
    assert_eq!(status, 200, "the first time: {v}");
    let (status, v) = admin_call(
        &manager.url,
        reqwest::Method::DELETE,
        "/v1/admin/content/x",
        None,
    )
    .await;
    assert_eq!(status, 404, "the second time: {v}");
    assert_eq!(v["error"], "not_found");
}

fn check_config(file: &std::path::Path) -> std::process::Output {
    Command::new(gup())
        .arg("check-config")
        .arg(file)
        .output()
        .unwrap()
}

#[test]
fn check_config_names_the_role_of_a_valid_file() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for (f, role) in [
        ("config/manager.toml", "manager"),
        ("config/node.toml", "node"),
    ] {
        let out = check_config(&root.join(f));
        assert_eq!(out.status.code(), Some(0), "{f}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(&format!("valid {role} config")),
            "{f}: {stdout}"
        );
    }
}

#[test]
fn check_config_exits_2_with_one_line_naming_a_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    for (toml, key) in [
        (
            "[upstream]\nsync_interval_s = 0\n",
            "upstream.sync_interval_s",
        ),
        ("[cache]\nprefetch = true\nretain = 3\n", "cache.retain"),
    ] {
        std::fs::write(&bad, toml).unwrap();
        let out = check_config(&bad);
        assert_eq!(out.status.code(), Some(2), "{toml}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{toml}: {err}");
        assert!(err.contains(key), "{toml}: {err}");
    }
}

#[test]
fn a_bad_flag_value_exits_2_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
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
        .env("GUP_TEST_DEMO_EPHEMERAL_PORTS", "1")
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
