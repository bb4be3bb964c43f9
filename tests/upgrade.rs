//! A versioned data dir (issue 21.5), through real processes:
//!
//! - a copy of the data dirs gup 0.1.0 made (`tests/fixtures/release-0.1.0`, made by its
//!   `make.sh`: a manager with a published item, settings, a policy, clients, events, a
//!   notification and an application; a node that mirrored and fetched the item) opens
//!   with this gup, is upgraded in place once (its `format` file written), and serves the
//!   same catalog (same JSON and signature), content, settings, policy, clients, events,
//!   notifications and applications; the node serves its catalog and content with its
//!   upstream down;
//! - a data dir of a format newer than this gup's is refused with one line naming both
//!   versions and exit 2, by the manager and the node, and is left as it was;
//! - a data dir in use by another process: see `first_run.rs`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/release-0.1.0")
}

fn expected(name: &str) -> Vec<u8> {
    std::fs::read(fixture().join("expected").join(name)).unwrap()
}

fn expected_json(name: &str) -> serde_json::Value {
    serde_json::from_slice(&expected(name)).unwrap()
}

/// A header's value from a saved `curl -D` dump.
fn expected_header(file: &str, name: &str) -> String {
    let text = String::from_utf8(expected(file)).unwrap();
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no {name} in {file}"))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(gup())
        .args(args)
        .env_remove("GUP_ADMIN_TOKEN")
        .env_remove("GUP_NODE_TOKEN")
        .output()
        .expect("run gup")
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

/// `GET path` with `token` (none: no header): (status, headers, body).
async fn get(
    base: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let mut req = reqwest::Client::new().get(format!("{base}{path}"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.bytes().await.unwrap().to_vec())
}

/// The parts of a client record that do not depend on the clock of the request.
fn lasting(clients: &serde_json::Value) -> Vec<serde_json::Value> {
    clients["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let mut c = c.clone();
            c.as_object_mut().unwrap().remove("overdue");
            c
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_of_release_0_1_0_is_upgraded_and_serves_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let mdir = dir.path().join("manager");
    copy_dir(&fixture().join("manager"), &mdir);
    assert!(!mdir.join("format").exists(), "0.1.0 recorded no format");
    let token = std::fs::read_to_string(mdir.join("admin.token")).unwrap();
    let token = token.trim().to_string();
    let args = [
        "manager",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        mdir.to_str().unwrap(),
    ];
    let m = Proc::start(&args, dir.path().join("m.log"));
    let log = m.log_text();
    assert!(log.contains("upgraded the data dir"), "{log}");
    assert_eq!(
        std::fs::read_to_string(mdir.join("format")).unwrap().trim(),
        "2"
    );

    let (status, headers, body) = get(&m.url, "/v1/catalog", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        expected("manager-catalog.json"),
        "the same catalog JSON"
    );
    assert_eq!(
        headers["x-gup-catalog-signature"].to_str().unwrap(),
        expected_header("manager-catalog.headers", "x-gup-catalog-signature"),
        "the same signature"
    );
    assert_eq!(
        headers["etag"].to_str().unwrap(),
        expected_header("manager-catalog.headers", "etag")
    );
    let defs = expected("defs.bin");
    let sha = sha256_hex(&defs);
    let (status, _, bytes) = get(&m.url, &format!("/v1/content/{sha}"), None).await;
    assert_eq!(status, 200);
    assert_eq!(bytes, defs, "the same content");
    let (_, _, body) = get(&m.url, "/v1/groups/branch/settings?location=remote", None).await;
    assert_eq!(body, expected("settings-branch-remote.json"));
    let (_, _, body) = get(&m.url, "/v1/groups/branch/policy", None).await;
    assert_eq!(body, expected("policy-branch.json"));
    for (path, file) in [
        ("/v1/admin/events", "events.json"),
        ("/v1/admin/notifications", "notifications.json"),
        ("/v1/admin/applications?q=editor", "applications.json"),
    ] {
        let (status, _, body) = get(&m.url, path, Some(&token)).await;
        assert_eq!(status, 200, "{path}");
        let mut got: serde_json::Value = serde_json::from_slice(&body).unwrap();
        if file == "notifications.json" {
            // Fields added since 0.1.0 read as their defaults on an old record (issue 20:
            // notifications an admin can ack, with the ids of the events they count).
            for n in got["notifications"].as_array_mut().unwrap() {
                let n = n.as_object_mut().unwrap();
                assert_eq!(
                    n.remove("acked_at"),
                    Some(serde_json::Value::Null),
                    "{path}"
                );
                assert_eq!(n.remove("event_ids"), Some(serde_json::json!([])), "{path}");
            }
        }
        assert_eq!(got, expected_json(file), "{path}");
    }
    let (_, _, body) = get(&m.url, "/v1/admin/clients", Some(&token)).await;
    let got: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(lasting(&got), lasting(&expected_json("clients.json")));
    let key = run(&[
        "manager",
        "--data-dir",
        mdir.to_str().unwrap(),
        "--print-public-key",
    ]);
    assert_eq!(key.stdout, expected("public.key"), "the same signing key");

    // Upgraded once: the next start finds the current format.
    assert_eq!(m.stop(), Some(0));
    let again = Proc::start(&args, dir.path().join("m2.log"));
    assert!(!again.log_text().contains("upgrad"), "{}", again.log_text());
    let (_, _, body) = get(&again.url, "/v1/catalog", None).await;
    assert_eq!(body, expected("manager-catalog.json"));
    assert_eq!(again.stop(), Some(0));

    // The node serves what it had, its upstream down.
    let ndir = dir.path().join("node");
    copy_dir(&fixture().join("node"), &ndir);
    let down = format!("http://127.0.0.1:{}", free_port());
    let n = start_node(&ndir, &[&down], &[]);
    assert!(
        n.log_text().contains("upgraded the data dir"),
        "{}",
        n.log_text()
    );
    wait_ready(&n.url).await;
    let (status, headers, body) = get(&n.url, "/v1/catalog", None).await;
    assert_eq!(status, 200);
    assert_eq!(body, expected("node-catalog.json"));
    assert_eq!(
        headers["x-gup-catalog-signature"].to_str().unwrap(),
        expected_header("node-catalog.headers", "x-gup-catalog-signature")
    );
    let (status, _, bytes) = get(&n.url, &format!("/v1/content/{sha}"), None).await;
    assert_eq!(status, 200);
    assert_eq!(bytes, defs);
    assert_eq!(
        std::fs::read_to_string(ndir.join("format")).unwrap().trim(),
        "2"
    );
    assert_eq!(n.stop(), Some(0));
}

#[test]
fn a_data_dir_of_a_newer_format_is_refused_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    for role in ["manager", "node"] {
        let d = dir.path().join(role);
        copy_dir(&fixture().join(role), &d);
        std::fs::write(d.join("format"), "3\n").unwrap();
        let db_before = std::fs::read(d.join("db/db")).unwrap();
        let out = run(&[
            role,
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            d.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(2), "{role}: {}", text(&out));
        let t = text(&out);
        assert_eq!(t.lines().count(), 1, "{role}: one line: {t}");
        assert!(
            t.contains("format 3") && t.contains("up to 2"),
            "{role}: {t}"
        );
        assert!(
            t.contains(d.to_str().unwrap()),
            "{role}: names the dir: {t}"
        );
        assert_eq!(
            std::fs::read_to_string(d.join("format")).unwrap(),
            "3\n",
            "{role}: not downgraded"
        );
        assert_eq!(
            std::fs::read(d.join("db/db")).unwrap(),
            db_before,
            "{role}: the database is not touched"
        );
    }
}
