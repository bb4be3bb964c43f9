//! Ctrl-C stops `gup demo` in every phase of its story within 2 s, with exit 0: SIGINT is
//! sent the moment the demo prints the line that opens the phase. The demo binds ephemeral
//! loopback ports here (`GUP_TEST_DEMO_EPHEMERAL_PORTS`), never 8014 or 2967.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What the issue asks for. Measured here (debug build, 2 shared cores): 0.04 to 0.2 s.
const STOP_BOUND: Duration = Duration::from_secs(2);

/// Starts a demo, waits for the line containing `marker`, sends SIGINT, and checks the stop.
fn ctrl_c_after(marker: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(common::gup())
        .args(["demo", "--clients", "10", "--window", "2", "--data-dir"])
        .arg(dir.path().join("demo"))
        .env("GUP_TEST_DEMO_EPHEMERAL_PORTS", "1")
        .env("RUST_LOG", "info,gup::agent=warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let hit = line.contains(marker);
                seen.push(line);
                if hit {
                    break;
                }
            }
            Err(_) => {
                let _ = child.kill();
                panic!("the demo never printed {marker:?}:\n{}", seen.join("\n"));
            }
        }
    }
    let sent = Instant::now();
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if sent.elapsed() > Duration::from_secs(20) {
            let stacks = Command::new("gdb")
                .args([
                    "-p",
                    &child.id().to_string(),
                    "-batch",
                    "-ex",
                    "thread apply all bt 20",
                ])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let _ = child.kill();
            seen.extend(rx.try_iter());
            let log = std::fs::read_to_string(dir.path().join("demo/demo.log")).unwrap_or_default();
            panic!(
                "the demo did not stop within 20 s of Ctrl-C after {marker:?}:\n{}\n--- log:\n{log}\n--- stacks:\n{stacks}",
                seen.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let took = sent.elapsed();
    // The rest of its output, up to the end of the pipe (the reader thread may lag).
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(10)) {
        seen.push(line);
    }
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
    }
    let story = seen.join("\n");
    assert_eq!(
        status.code(),
        Some(0),
        "Ctrl-C after {marker:?}: {status}\n{story}\nstderr:\n{stderr}"
    );
    assert!(
        took < STOP_BOUND,
        "Ctrl-C after {marker:?} took {took:?} (bound {STOP_BOUND:?})\n{story}"
    );
    assert!(
        seen.last().is_some_and(|l| l == "demo stopped"),
        "Ctrl-C after {marker:?}:\n{story}"
    );
    assert!(!story.contains("demo failed"), "{story}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    eprintln!("Ctrl-C after {marker:?}: stopped in {took:?}");
}

#[test]
fn ctrl_c_while_starting() {
    ctrl_c_after("gup demo: starting");
}

#[test]
fn ctrl_c_once_the_servers_run() {
    ctrl_c_after("a management server, a branch-office node");
}

#[test]
fn ctrl_c_while_setting_and_publishing() {
    ctrl_c_after("settings: push mode");
}

#[test]
fn ctrl_c_while_the_node_mirrors() {
    ctrl_c_after("published sample-definitions");
}

#[test]
fn ctrl_c_while_the_agents_start() {
    ctrl_c_after("node mirrored catalog revision");
}

#[test]
fn ctrl_c_while_the_agents_download() {
    ctrl_c_after("then each uploads two events");
}

#[test]
fn ctrl_c_while_reading_the_results() {
    ctrl_c_after("gup loadtest report");
}

#[test]
fn ctrl_c_while_serving() {
    ctrl_c_after("serving until Ctrl-C");
}
