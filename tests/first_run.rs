//! A newcomer's first ten minutes (issue 17): the CLI explains itself.
//!
//! - `gup admin ... | head -1` with a closed pipe ends without a panic;
//! - `gup admin` defaults `--manager` to http://127.0.0.1:8014 and reads the admin token from
//!   `--data-dir` (or the default data dir `gup-data/manager`) when none is given;
//! - an unreachable manager says "connection refused"; a data dir in use (by a manager or a
//!   node) names the holder's pid in one line, exit 2; a busy port fails before anything is written to the data dir; a missing token file
//!   is bad config (exit 2 naming the key and the file) in `check-config` and at start;
//! - two processes making a data dir's tokens at once agree on them;
//! - re-publishing identical bytes names the revision that published them.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::*;

fn run(args: &[&str], cwd: &Path) -> Output {
    Command::new(gup())
        .args(args)
        .current_dir(cwd)
        .env_remove("GUP_ADMIN_TOKEN")
        .output()
        .expect("run gup")
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

/// A manager that made its own tokens (no token flags), on an ephemeral port.
fn manager_making_tokens(dir: &Path) -> Proc {
    let dd = dir.to_str().unwrap();
    Proc::start(
        &["manager", "--listen", "127.0.0.1:0", "--data-dir", dd],
        dir.with_extension("log"),
    )
}

#[tokio::test]
async fn admin_output_into_a_closed_pipe_ends_without_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let m = start_manager(&dir.path().join("m"), &[]);
    // Enough groups that the table is far larger than a pipe's buffer (64 KiB): gup is
    // still writing when the reader goes away.
    let names: Vec<String> = (0..1500)
        .map(|i| format!("branch-office-with-a-long-name-{i:05}"))
        .collect();
    let client = reqwest::Client::new();
    for chunk in names.chunks(50) {
        let puts = chunk.iter().map(|g| {
            client
                .put(format!("{}/v1/admin/groups/{g}", m.url))
                .bearer_auth(ADMIN_TOKEN)
                .json(&serde_json::json!({"parent": "default"}))
                .send()
        });
        for r in futures_util::future::join_all(puts).await {
            assert!(r.unwrap().status().is_success());
        }
    }
    for args in [&["group", "list"][..], &["group", "list", "--json"][..]] {
        let mut child = Command::new(gup())
            .args(["admin", "--manager", &m.url, "--token", ADMIN_TOKEN])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // `| head -1`: read one line, then close the pipe.
        let mut stdout = child.stdout.take().unwrap();
        let mut first = Vec::new();
        let mut byte = [0u8; 1];
        while stdout.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
            first.push(byte[0]);
        }
        drop(stdout);
        let status = child.wait().unwrap();
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert!(!first.is_empty(), "{args:?}: a first line");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(status.code(), Some(0), "{args:?}: {status} {stderr}");
    }
}

#[test]
fn admin_finds_the_token_in_the_managers_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let mdir = dir.path().join("m");
    let m = manager_making_tokens(&mdir);
    let md = mdir.to_str().unwrap();
    let out = run(
        &[
            "admin",
            "--manager",
            &m.url,
            "--data-dir",
            md,
            "group",
            "list",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).starts_with("GROUP"), "{}", text(&out));
    // Without --data-dir: the default data dir, relative to where it runs.
    let cwd = dir.path().join("site");
    std::fs::create_dir_all(cwd.join("gup-data/manager")).unwrap();
    std::fs::copy(
        mdir.join("admin.token"),
        cwd.join("gup-data/manager/admin.token"),
    )
    .unwrap();
    let out = run(&["admin", "--manager", &m.url, "group", "list"], &cwd);
    assert!(out.status.success(), "{}", text(&out));
    // No token anywhere: exit 2 naming the ways to give one.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = run(&["admin", "--manager", &m.url, "group", "list"], &empty);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--data-dir"), "{}", text(&out));
    // A --data-dir without a token says which file it looked for.
    let out = run(
        &[
            "admin",
            "--manager",
            &m.url,
            "--data-dir",
            empty.to_str().unwrap(),
            "group",
            "list",
        ],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("admin.token"), "{}", text(&out));
}

#[test]
fn admin_defaults_to_the_local_manager_and_says_why_it_cannot_reach_one() {
    let dir = tempfile::tempdir().unwrap();
    // The default address (whatever listens there, the message names it).
    let out = run(&["admin", "--token", "x", "group", "list"], dir.path());
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("127.0.0.1:8014"),
        "the default --manager: {}",
        text(&out)
    );
    // Nothing listens on a free port: "connection refused", exit 1.
    let url = format!("http://127.0.0.1:{}", free_port());
    let out = run(
        &["admin", "--manager", &url, "--token", "x", "group", "list"],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("connection refused"), "{t}");
    assert!(t.contains(&url), "{t}");
    assert_eq!(t.lines().count(), 1, "one line: {t}");
}

#[test]
fn a_data_dir_in_use_names_the_process_holding_it() {
    let dir = tempfile::tempdir().unwrap();
    let mdir = dir.path().join("m");
    let first = start_manager(&mdir, &[]);
    let ndir = dir.path().join("n");
    let node = start_node(&ndir, &[&first.url], &[]);
    for (role, data_dir, holder) in [("manager", &mdir, &first), ("node", &ndir, &node)] {
        let out = run(
            &[
                role,
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                data_dir.to_str().unwrap(),
                "--node-token",
                NODE_TOKEN,
            ],
            dir.path(),
        );
        // The operator must act (stop the other, or pick another dir): bad usage.
        assert_eq!(out.status.code(), Some(2), "{role}: {}", text(&out));
        let t = text(&out);
        assert!(
            t.contains(&format!("in use by another process (pid {})", holder.pid())),
            "{role}: {t}"
        );
        assert!(
            !t.contains("could not acquire lock"),
            "{role}: not sled's raw error: {t}"
        );
        assert_eq!(t.lines().count(), 1, "{role}: one line: {t}");
    }
    assert_eq!(node.stop(), Some(0));
    assert_eq!(first.stop(), Some(0));
}

#[test]
fn a_busy_port_fails_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let first = start_manager(&dir.path().join("m"), &[]);
    let addr = first.url.trim_start_matches("http://").to_string();
    let fresh = dir.path().join("fresh");
    for role in ["manager", "node"] {
        let out = run(
            &[
                role,
                "--listen",
                &addr,
                "--data-dir",
                fresh.to_str().unwrap(),
            ],
            dir.path(),
        );
        assert_eq!(out.status.code(), Some(1), "{role}: {}", text(&out));
        let t = text(&out);
        assert!(t.contains(&addr) && t.contains("in use"), "{role}: {t}");
        assert!(!fresh.exists(), "{role} wrote its data dir before binding");
    }
}

#[test]
fn a_missing_token_file_is_bad_config_naming_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such.token");
    let cfg = dir.path().join("node.toml");
    std::fs::write(
        &cfg,
        format!("[upstream]\ntoken_file = \"{}\"\n", missing.display()),
    )
    .unwrap();
    let out = run(&["check-config", cfg.to_str().unwrap()], dir.path());
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("upstream.token_file"), "{t}");
    assert!(t.contains(missing.to_str().unwrap()), "{t}");
    // At start, from the file or from the flag.
    let nd = dir.path().join("n");
    for args in [
        vec!["node", "--config", cfg.to_str().unwrap()],
        vec!["node", "--upstream-token-file", missing.to_str().unwrap()],
    ] {
        let mut args = args;
        args.extend([
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            nd.to_str().unwrap(),
        ]);
        let out = run(&args, dir.path());
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        let t = text(&out);
        assert!(t.contains("upstream.token_file"), "{t}");
        assert!(t.contains(missing.to_str().unwrap()), "{t}");
    }
    let out = run(
        &[
            "manager",
            "--admin-token-file",
            missing.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            dir.path().join("m").to_str().unwrap(),
        ],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("manager.admin_token_file"),
        "{}",
        text(&out)
    );
}

#[test]
fn processes_making_the_tokens_at_once_agree_on_them() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..15 {
        let md = dir.path().join(format!("m{round}"));
        let md = md.to_str().unwrap().to_string();
        let children: Vec<_> = (0..3)
            .map(|_| {
                Command::new(gup())
                    .args([
                        "manager",
                        "--data-dir",
                        &md,
                        "--print-node-token",
                        "--print-admin-token",
                    ])
                    .env_remove("GUP_ADMIN_TOKEN")
                    .env_remove("GUP_NODE_TOKEN")
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let outs: Vec<Output> = children
            .into_iter()
            .map(|c| c.wait_with_output().unwrap())
            .collect();
        for o in &outs {
            assert!(o.status.success(), "round {round}: {}", text(o));
            assert_eq!(
                String::from_utf8_lossy(&o.stdout).lines().count(),
                2,
                "{}",
                text(o)
            );
        }
        assert!(
            outs.windows(2).all(|w| w[0].stdout == w[1].stdout),
            "round {round}: every process printed the same tokens"
        );
    }
}

#[tokio::test]
async fn republishing_the_same_bytes_names_the_revision_that_published_them() {
    let dir = tempfile::tempdir().unwrap();
    let m = start_manager(&dir.path().join("m"), &[]);
    let defs = dir.path().join("defs.bin");
    std::fs::write(&defs, random_bytes(10_000, 1)).unwrap();
    let engine = dir.path().join("engine.bin");
    std::fs::write(&engine, random_bytes(10_000, 2)).unwrap();
    let (code, out) = publish(&m.url, &defs, "defs", "1");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("revision=1"), "{out}");
    let (code, out) = publish(&m.url, &engine, "engine", "7");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("revision=2"), "{out}");
    let (code, out) = publish(&m.url, &defs, "defs", "1");
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("already published"), "{out}");
    assert!(out.contains("revision=1"), "defs 1 is revision 1's: {out}");
}
