//! End to end: the Debian package and what its systemd units rely on.
//! - `cargo deb` packages the binary this test run built (`--no-build`, the test's own
//!   profile, stripped) into a temp dir; cargo-deb missing is a failure that says how to
//!   install it, never a skip;
//! - the package holds `/usr/bin/gup` (runnable), `/etc/gup/manager.toml` and
//!   `/etc/gup/node.toml` (the shipped configs, byte for byte, valid for `check-config`) as
//!   conffiles, both units and the sysusers.d entry for the `gup` user; its postinst creates
//!   the user and neither enables nor starts a unit;
//! - each unit is `Type=notify`, runs as `gup` with its `StateDirectory`, passes `--config`
//!   and `--data-dir`, reloads with SIGHUP, restarts on failure, and carries the hardening
//!   keys (empty capability sets, a read-only system, a high `LimitNOFILE`);
//! - `systemd-analyze verify` reports nothing on either unit, in a root made of the extracted
//!   package and this machine's own systemd units (so `ExecStart=/usr/bin/gup` is the packaged
//!   binary), while a broken unit in the same root is reported (the check is not vacuous);
//!   `systemd-analyze security --offline` rates both units' exposure at most 2.0 (1.4 on systemd 252);
//! - sd_notify: a node and a manager started with `NOTIFY_SOCKET` send READY=1 once they
//!   listen (a request made the moment it arrives is served) and STOPPING=1 on SIGTERM, then
//!   exit 0; a `NOTIFY_SOCKET` nobody listens on is logged and changes nothing else.

mod common;

use std::collections::BTreeSet;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

const UNITS: [(&str, &str); 2] = [("gup-manager", "manager"), ("gup-node", "node")];

// === the package ===

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn run(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {shown}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Fails (never skips) without cargo-deb: CI installs it, and a package test that passes
/// without building a package proves nothing.
fn require_cargo_deb() {
    let found = Command::new(cargo())
        .args(["deb", "--version"])
        .stdin(Stdio::null())
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "cargo-deb is not installed, so the Debian package cannot be built: run \
         `cargo install cargo-deb --locked` (.ci/run installs it when missing)"
    );
}

/// The Cargo profile that built the `gup` this test runs (`target/debug` is `dev`).
fn profile() -> String {
    let dir = Path::new(gup())
        .parent()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("debug");
    match dir {
        "debug" => "dev".into(),
        other => other.into(),
    }
}

/// Packages the binary this test run built, into `out/gup.deb`.
fn build_deb(out: &Path) -> PathBuf {
    require_cargo_deb();
    let deb = out.join("gup.deb");
    let started = Instant::now();
    // --no-build: `cargo test` has built the binary already, and a second (release) build
    // would double CI's time. --strip keeps a debug build's symbols out of the package.
    // -q: cargo-deb warns that dev profiles are meant for testing, which this is.
    let done = run(Command::new(cargo())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["deb", "--no-build", "--strip", "--fast", "-q", "--profile"])
        .arg(profile())
        .arg("--output")
        .arg(&deb));
    assert!(done.status.success(), "cargo deb failed:\n{}", text(&done));
    assert!(deb.is_file(), "cargo deb made no {}", deb.display());
    eprintln!("cargo deb took {:?}", started.elapsed());
    deb
}

fn dpkg_deb(args: &[&str], deb: &Path, to: Option<&Path>) -> String {
    let mut cmd = Command::new("dpkg-deb");
    cmd.args(args).arg(deb);
    if let Some(to) = to {
        cmd.arg(to);
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("dpkg-deb (apt-get install dpkg): {e}"));
    assert!(out.status.success(), "dpkg-deb {args:?}:\n{}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A unit file's settings in order, `(key, value)`, comments and section lines left out.
fn settings(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn value<'a>(all: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    all.iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

#[test]
fn the_package_holds_binary_conffiles_units_and_user_and_verify_is_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let deb = build_deb(tmp.path());

    // The files, with their modes.
    let listing = dpkg_deb(&["-c"], &deb, None);
    let files: Vec<(&str, &str)> = listing
        .lines()
        .filter_map(|l| {
            let mode = l.split_whitespace().next()?;
            let path = l.split_whitespace().last()?;
            Some((mode, path.trim_start_matches('.')))
        })
        .collect();
    let mode_of = |path: &str| {
        files
            .iter()
            .find(|(_, p)| *p == path)
            .map(|(m, _)| *m)
            .unwrap_or_else(|| panic!("{path} is not in the package:\n{listing}"))
    };
    assert_eq!(mode_of("/usr/bin/gup"), "-rwxr-xr-x");
    for path in [
        "/etc/gup/manager.toml",
        "/etc/gup/node.toml",
        "/usr/lib/systemd/system/gup-manager.service",
        "/usr/lib/systemd/system/gup-node.service",
        "/usr/lib/sysusers.d/gup.conf",
        "/usr/share/doc/gup/README.md",
    ] {
        assert_eq!(mode_of(path), "-rw-r--r--", "{path}");
    }

    // The control files: conffiles, the dependency that brings systemd-sysusers, and a
    // postinst that makes the user but enables and starts nothing.
    let control = tmp.path().join("control");
    dpkg_deb(&["-e"], &deb, Some(&control));
    let conffiles: BTreeSet<String> = std::fs::read_to_string(control.join("conffiles"))
        .expect("the package has a conffiles list")
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(
        conffiles,
        BTreeSet::from(["/etc/gup/manager.toml".into(), "/etc/gup/node.toml".into()])
    );
    let fields = std::fs::read_to_string(control.join("control")).unwrap();
    assert!(fields.contains("Package: gup\n"), "{fields}");
    assert!(
        fields.contains("systemd | systemd-standalone-sysusers | systemd-sysusers"),
        "{fields}"
    );
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    assert!(
        postinst.contains("systemd-sysusers") && postinst.contains("gup.conf"),
        "the postinst does not create the gup user:\n{postinst}"
    );
    assert!(!postinst.contains("#DEBHELPER#"), "{postinst}");
    assert!(
        !postinst.contains("deb-systemd-invoke start"),
        "the postinst starts a unit:\n{postinst}"
    );
    for unit in ["gup-manager.service", "gup-node.service"] {
        assert!(
            postinst.contains(unit),
            "{unit} is not registered:\n{postinst}"
        );
    }

    // The files themselves.
    let root = tmp.path().join("root");
    dpkg_deb(&["-x"], &deb, Some(&root));
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    for role in ["manager", "node"] {
        let shipped = std::fs::read(root.join(format!("etc/gup/{role}.toml"))).unwrap();
        let source = std::fs::read(repo.join(format!("config/{role}.toml"))).unwrap();
        assert!(
            shipped == source,
            "etc/gup/{role}.toml is not config/{role}.toml"
        );
    }
    let sysusers = std::fs::read_to_string(root.join("usr/lib/sysusers.d/gup.conf")).unwrap();
    assert!(
        sysusers
            .lines()
            .any(|l| l.split_whitespace().take(2).eq(["u", "gup"])),
        "{sysusers}"
    );
    let packaged = root.join("usr/bin/gup");
    let version = run(Command::new(&packaged).arg("--version"));
    assert!(version.status.success(), "{}", text(&version));
    for role in ["manager", "node"] {
        let check = run(Command::new(&packaged)
            .arg("check-config")
            .arg(root.join(format!("etc/gup/{role}.toml"))));
        assert!(
            check.status.success() && text(&check).contains(role),
            "check-config on the shipped {role}.toml:\n{}",
            text(&check)
        );
    }

    // The units.
    for (unit, role) in UNITS {
        let path = root.join(format!("usr/lib/systemd/system/{unit}.service"));
        let all = settings(&std::fs::read_to_string(&path).unwrap());
        let one = |key: &str| -> &str {
            match value(&all, key).as_slice() {
                [v] => v,
                other => panic!("{unit}: {key} is set {} times", other.len()),
            }
        };
        assert_eq!(one("Type"), "notify", "{unit}");
        assert_eq!(one("User"), "gup", "{unit}");
        assert_eq!(one("Group"), "gup", "{unit}");
        assert_eq!(one("StateDirectory"), format!("gup/{role}"), "{unit}");
        assert_eq!(
            one("ExecStart"),
            format!(
                "/usr/bin/gup {role} --config /etc/gup/{role}.toml --data-dir /var/lib/gup/{role}"
            ),
            "{unit}"
        );
        assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID", "{unit}");
        assert_eq!(one("Restart"), "on-failure", "{unit}");
        assert_eq!(one("WantedBy"), "multi-user.target", "{unit}");
        // An empty value is the empty set: no capability at all, none inherited.
        assert_eq!(one("CapabilityBoundingSet"), "", "{unit}");
        assert_eq!(one("AmbientCapabilities"), "", "{unit}");
        assert_eq!(one("ProtectSystem"), "strict", "{unit}");
        for key in [
            "NoNewPrivileges",
            "ProtectHome",
            "PrivateTmp",
            "PrivateDevices",
            "ProtectKernelTunables",
            "ProtectKernelModules",
            "ProtectControlGroups",
            "RestrictSUIDSGID",
            "RestrictNamespaces",
            "LockPersonality",
        ] {
            assert_eq!(one(key), "yes", "{unit}: {key}");
        }
        assert_eq!(one("SystemCallArchitectures"), "native", "{unit}");
        assert_eq!(
            value(&all, "SystemCallFilter"),
            ["@system-service", "~@privileged"],
            "{unit}"
        );
        assert_eq!(one("SystemCallErrorNumber"), "EPERM", "{unit}");
        let files: u64 = one("LimitNOFILE").parse().expect("LimitNOFILE is a number");
        assert!(files >= 65_536, "{unit}: LimitNOFILE={files}");
    }

    // systemd-analyze verify, in a root that is the package plus this machine's systemd
    // units (the targets a unit pulls in) and the kill(1) of ExecReload, as on a Debian
    // machine: with --root, ExecStart=/usr/bin/gup must be the packaged binary.
    let units_dir = root.join("usr/lib/systemd/system");
    let copied = run(Command::new("cp")
        .args(["-a", "--no-clobber", "/usr/lib/systemd/system/."])
        .arg(&units_dir));
    assert!(copied.status.success(), "{}", text(&copied));
    std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
    std::fs::copy("/usr/bin/kill", root.join("usr/bin/kill")).unwrap();
    let verify = |units: &[&str]| {
        run(Command::new("systemd-analyze")
            .args(["verify", "--recursive-errors=yes", "--root"])
            .arg(&root)
            .args(units))
    };
    let clean = verify(&["gup-manager.service", "gup-node.service"]);
    assert!(
        clean.status.success() && text(&clean).trim().is_empty(),
        "systemd-analyze verify reported (exit {:?}):\n{}",
        clean.status.code(),
        text(&clean)
    );
    // The same check sees a broken unit: a binary that is not there.
    let node_unit = std::fs::read_to_string(units_dir.join("gup-node.service")).unwrap();
    std::fs::write(
        units_dir.join("gup-broken.service"),
        node_unit.replace("ExecStart=/usr/bin/gup ", "ExecStart=/usr/bin/gup-missing "),
    )
    .unwrap();
    let broken = verify(&["gup-broken.service"]);
    assert!(
        !broken.status.success() && text(&broken).contains("/usr/bin/gup-missing"),
        "systemd-analyze verify did not report a missing binary:\n{}",
        text(&broken)
    );
    for (unit, _) in UNITS {
        let security = run(Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--root"])
            .arg(&root)
            .arg(format!("{unit}.service")));
        let report = text(&security);
        let level: f64 = report
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|r| r.split(": ").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level for {unit}:\n{report}"));
        assert!(level <= 2.0, "{unit}: exposure {level}:\n{report}");
    }
}

// === sd_notify ===

/// A `gup` server started by the test with its own environment; killed if the test fails.
struct Server {
    child: std::process::Child,
    log: PathBuf,
}

impl Server {
    fn start(args: &[&str], log: PathBuf, notify_socket: &Path) -> Server {
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(gup())
            .args(args)
            .env("NOTIFY_SOCKET", notify_socket)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn gup");
        Server { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn terminate(&self) {
        // SAFETY: sending a signal to our own child, which has not been reaped yet.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
    }

    /// Waits for the exit (after `terminate`) and returns the exit code.
    fn wait_exit(&mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "gup did not stop on SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The next datagram on `sock`, as systemd would read it.
fn next_notification(sock: &UnixDatagram, server: &Server, waiting_for: &str) -> String {
    let mut buf = [0u8; 4096];
    match sock.recv(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) => panic!("no notification ({waiting_for}): {e}\n{}", server.log()),
    }
}

/// Starts `args` under a notify socket of the test's own, and checks READY=1 comes when the
/// server serves, then STOPPING=1 on SIGTERM, then a clean exit.
fn ready_then_stopping(role: &str, args: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let data = tmp.path().join("data");
    let mut all: Vec<&str> = vec![role, "--listen", "127.0.0.1:0", "--data-dir"];
    all.push(data.to_str().unwrap());
    all.extend_from_slice(args);
    let mut server = Server::start(&all, tmp.path().join("server.log"), &path);

    let ready = next_notification(&sock, &server, "READY=1");
    let lines: Vec<&str> = ready.lines().collect();
    assert!(lines.contains(&"READY=1"), "{ready:?}");
    let addr = lines
        .iter()
        .find_map(|l| l.strip_prefix(&format!("STATUS={role} serving on ")))
        .unwrap_or_else(|| panic!("no STATUS with the address: {ready:?}"));
    // Ready means serving: a request made the moment READY=1 arrives is answered.
    let (status, body) = blocking_request(&format!("http://{addr}"), "GET", "/healthz", &[], "");
    assert_eq!(status, 200, "{body}\n{}", server.log());

    server.terminate();
    let stopping = next_notification(&sock, &server, "STOPPING=1");
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    assert_eq!(server.wait_exit(), Some(0), "{}", server.log());
    sock.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    if let Ok(n) = sock.recv(&mut buf) {
        panic!(
            "a notification after STOPPING=1: {:?}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
}

#[test]
fn node_sends_ready_once_serving_and_stopping_on_sigterm() {
    ready_then_stopping(
        "node",
        &[
            // No upstream answers there: a node serves what it has without one.
            "--upstream",
            "http://127.0.0.1:1",
            "--upstream-token",
            NODE_TOKEN,
            "--node-token",
            NODE_TOKEN,
        ],
    );
}

#[test]
fn manager_sends_ready_once_serving_and_stopping_on_sigterm() {
    ready_then_stopping(
        "manager",
        &["--admin-token", ADMIN_TOKEN, "--node-token", NODE_TOKEN],
    );
}

#[test]
fn a_notify_socket_nobody_listens_on_is_logged_and_the_node_serves() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let missing = tmp.path().join("nobody.sock");
    let args = [
        "node",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--upstream",
        "http://127.0.0.1:1",
        "--upstream-token",
        NODE_TOKEN,
        "--node-token",
        NODE_TOKEN,
    ];
    let mut server = Server::start(&args, tmp.path().join("server.log"), &missing);
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = loop {
        let log = server.log();
        if let Some(addr) = log
            .lines()
            .find(|l| l.contains("node listening"))
            .and_then(|l| l.split("addr=").nth(1))
            .and_then(|r| r.split_whitespace().next())
        {
            break addr.to_string();
        }
        assert!(Instant::now() < deadline, "the node did not listen:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let (status, _) = blocking_request(&format!("http://{addr}"), "GET", "/healthz", &[], "");
    assert_eq!(status, 200, "{}", server.log());
    assert!(
        server
            .log()
            .contains("could not tell the service manager READY=1"),
        "{}",
        server.log()
    );
    server.terminate();
    assert_eq!(server.wait_exit(), Some(0), "{}", server.log());
}
