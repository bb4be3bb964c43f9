//! The README's "first run by hand" block, run as written: extracted from README.md itself (so
//! the two cannot drift apart), fed line by line to a fresh `bash` in an empty temp dir, with
//! `gup` on the PATH. Only its ports change: 8014 and 2967 become free loopback ports chosen
//! here, so that the test never takes a port someone else on this machine uses.

mod common;

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MARKER: &str = "<!-- hand-run:";

/// The ```sh block right after the hand-run marker.
fn hand_run_block() -> String {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let at = readme
        .find(MARKER)
        .expect("README.md has the hand-run marker");
    let rest = &readme[at..];
    let start = rest
        .find("```sh\n")
        .expect("a ```sh block after the marker")
        + "```sh\n".len();
    let len = rest[start..].find("```").expect("the block ends");
    rest[start..start + len].to_string()
}

#[test]
fn the_readme_hand_run_block_runs_as_written_and_its_download_checks() {
    let block = hand_run_block();
    // What it relies on, so that a rewrite keeps the test meaningful.
    for needed in [
        "127.0.0.1:8014",
        "127.0.0.1:2967",
        "--upstream-token-file",
        "--token-file",
        "sha256sum",
    ] {
        assert!(block.contains(needed), "the block uses {needed}:\n{block}");
    }
    // Loopback only: every URL and listen address is 127.0.0.1.
    for (i, _) in block.match_indices("://") {
        assert!(
            block[i + 3..].starts_with("127.0.0.1:"),
            "a non-loopback URL in the block:\n{block}"
        );
    }
    let (mport, nport) = loop {
        let (a, b) = (common::free_port(), common::free_port());
        if a != b {
            break (a, b);
        }
    };
    let script = block
        .replace("127.0.0.1:8014", &format!("127.0.0.1:{mport}"))
        .replace("127.0.0.1:2967", &format!("127.0.0.1:{nport}"))
        // The test's own epilogue: stop what the block started, gracefully, and wait for it.
        + "\nkill $(jobs -p) 2>/dev/null; wait\n";

    let dir = tempfile::tempdir().unwrap();
    let bin_dir = Path::new(common::gup()).parent().unwrap().to_path_buf();
    let path = format!("{}:/usr/local/bin:/usr/bin:/bin", bin_dir.display());
    let mut child = Command::new("bash")
        .args(["--norc", "--noprofile"])
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", path)
        .env("HOME", dir.path())
        .env("LANG", "C")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: on a timeout, everything the block started is killed.
        .process_group(0)
        .spawn()
        .expect("bash");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGKILL);
            }
            let _ = child.wait();
            panic!("the block did not finish in 180 s:\n{script}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let try_dir = dir.path().join("gup-try");
    let logs = ["manager.log", "node.log"]
        .map(|f| {
            format!(
                "--- {f}:\n{}",
                std::fs::read_to_string(try_dir.join(f)).unwrap_or_default()
            )
        })
        .join("\n");
    let context = format!("stdout:\n{stdout}\nstderr:\n{stderr}\n{logs}");
    assert!(stdout.contains("got.bin: OK"), "{context}");
    let sent = std::fs::read(try_dir.join("defs.bin")).expect("defs.bin");
    let got = std::fs::read(try_dir.join("got.bin")).expect("got.bin");
    assert_eq!(sent.len(), 4_000_000, "{context}");
    assert_eq!(
        common::sha256_hex(&got),
        common::sha256_hex(&sent),
        "{context}"
    );
    assert!(!stderr.contains("panicked"), "{context}");
}
