//! Shared harness for end-to-end tests: real `gup` processes on 127.0.0.1 ephemeral ports,
//! real data dirs in temp dirs. Each process listens on port 0 and the harness reads the bound
//! address from its log, so tests never race for ports.
#![allow(dead_code)]

pub mod browser;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ADMIN_TOKEN: &str = "test-admin-token";
pub const NODE_TOKEN: &str = "test-node-token";

pub fn gup() -> &'static str {
    env!("CARGO_BIN_EXE_gup")
}

/// A running `gup` process.
pub struct Proc {
    child: Option<Child>,
    pub url: String,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `gup ARGS` with stderr to `log`, waits for its "listening" line and /healthz.
    pub fn start(args: &[&str], log: PathBuf) -> Proc {
        Proc::start_env(args, log, &[])
    }

    /// [`Proc::start`] with extra environment variables for the process.
    pub fn start_env(args: &[&str], log: PathBuf, env: &[(&str, &str)]) -> Proc {
        let mut p = Proc::spawn(args, log, env);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = std::fs::read_to_string(&p.log).unwrap_or_default();
            if let Some(addr) = text
                .lines()
                .find(|l| l.contains("listening"))
                .and_then(|l| l.split("addr=").nth(1))
                .and_then(|r| r.split_whitespace().next())
            {
                p.url = format!("http://{addr}");
                break;
            }
            if let Some(status) = p.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("gup {args:?} exited with {status} before listening:\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "gup {args:?} did not listen:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    /// Starts `gup ARGS` (a process that listens on nothing, such as `gup agent`) with
    /// stderr to `log`, and waits until its log says `ready` (a line containing it).
    pub fn start_until(args: &[&str], log: PathBuf, ready: &str) -> Proc {
        let mut p = Proc::spawn(args, log, &[]);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = std::fs::read_to_string(&p.log).unwrap_or_default();
            if text.contains(ready) {
                return p;
            }
            if let Some(status) = p.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("gup {args:?} exited with {status}:\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "gup {args:?} never logged {ready:?}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Spawns `gup ARGS` with stderr to `log` (`RUST_LOG` from `GUP_TEST_LOG`, default info).
    fn spawn(args: &[&str], log: PathBuf, env: &[(&str, &str)]) -> Proc {
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(gup())
            .args(args)
            .envs(env.iter().copied())
            .env(
                "RUST_LOG",
                std::env::var("GUP_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn gup");
        Proc {
            child: Some(child),
            url: String::new(),
            log,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// SIGTERM, then waits; returns the exit code.
    pub fn stop(mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("process did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: a crash.
    pub fn kill9(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `gup agent --data-dir DIR --server S... --install-group G EXTRA...`, logging next to DIR,
/// once it has logged that it is starting.
pub fn start_agent(dir: &Path, servers: &[&str], group: &str, extra: &[&str]) -> Proc {
    let mut args = vec!["agent", "--data-dir", dir.to_str().unwrap()];
    for s in servers {
        args.extend(["--server", s]);
    }
    args.extend(["--install-group", group]);
    args.extend_from_slice(extra);
    Proc::start_until(&args, dir.with_extension("log"), "agent starting")
}

/// `gup agent status --data-dir DIR --json`.
pub fn agent_status(dir: &Path) -> serde_json::Value {
    let out = Command::new(gup())
        .args([
            "agent",
            "status",
            "--json",
            "--data-dir",
            dir.to_str().unwrap(),
        ])
        .output()
        .expect("run gup agent status");
    assert!(
        out.status.success(),
        "agent status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

/// A manager on 127.0.0.1:0 with the test tokens.
pub fn start_manager(data_dir: &Path, extra: &[&str]) -> Proc {
    start_manager_on(data_dir, "127.0.0.1:0", extra)
}

/// SIGHUP to `p`: a config reload.
pub fn hangup(p: &Proc) {
    // SAFETY: kill has no memory preconditions; the pid is our own child's.
    unsafe {
        libc::kill(p.pid(), libc::SIGHUP);
    }
}

/// Waits until the log of `p` holds `needle` at least `times` times.
pub async fn logged(p: &Proc, needle: &str, times: usize) {
    wait_for(
        30,
        &format!("the log says {needle:?} {times} times"),
        || {
            let n = p.log_text().matches(needle).count();
            async move { (n >= times).then_some(()) }
        },
    )
    .await;
}

/// A free loopback port (for a server that must come back on the same address).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A manager on 127.0.0.1:0 with the test tokens and extra environment variables.
pub fn start_manager_env(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Proc {
    let dd = data_dir.to_str().unwrap();
    let mut args = vec![
        "manager",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        dd,
        "--admin-token",
        ADMIN_TOKEN,
        "--node-token",
        NODE_TOKEN,
    ];
    args.extend_from_slice(extra);
    let p = Proc::start_env(&args, data_dir.with_extension("log"), env);
    open_site(&p.url);
    p
}

/// A manager on `listen` with the test tokens.
pub fn start_manager_on(data_dir: &Path, listen: &str, extra: &[&str]) -> Proc {
    let dd = data_dir.to_str().unwrap();
    let mut args = vec![
        "manager",
        "--listen",
        listen,
        "--data-dir",
        dd,
        "--admin-token",
        ADMIN_TOKEN,
        "--node-token",
        NODE_TOKEN,
    ];
    args.extend_from_slice(extra);
    let p = Proc::start(&args, data_dir.with_extension("log"));
    open_site(&p.url);
    p
}

/// A manager on 127.0.0.1:0 with the test tokens, left as a new site is: `client_auth` is
/// `required`, so every client must enrol.
pub fn start_manager_strict(data_dir: &Path, extra: &[&str]) -> Proc {
    let dd = data_dir.to_str().unwrap();
    let mut args = vec![
        "manager",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        dd,
        "--admin-token",
        ADMIN_TOKEN,
        "--node-token",
        NODE_TOKEN,
    ];
    args.extend_from_slice(extra);
    Proc::start(&args, data_dir.with_extension("log"))
}

/// Sets the site's `client_auth` to `open` (most tests speak for made-up client ids; the
/// tests of enrolment start with [`start_manager_strict`]). Plain blocking HTTP, so that the
/// synchronous start functions can do it before they return.
pub fn open_site(base: &str) {
    let body = r#"{"client_auth":"open"}"#;
    let (status, answer) = blocking_request(
        base,
        "PUT",
        "/v1/admin/site",
        &[("Authorization", &format!("Bearer {ADMIN_TOKEN}"))],
        body,
    );
    assert_eq!(status, 200, "opening the site: {answer}");
}

/// One HTTP/1.1 request over a plain socket: (status, body).
pub fn blocking_request(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    use std::io::Read;
    let addr = base.trim_start_matches("http://");
    let mut conn = std::net::TcpStream::connect(addr).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    conn.write_all(req.as_bytes()).unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Writes a node config with a short sync interval and returns its path.
pub fn node_config(data_dir: &Path, extra_toml: &str) -> PathBuf {
    let path = data_dir.with_extension("toml");
    let mut f = std::fs::File::create(&path).unwrap();
    let interval = if extra_toml.contains("sync_interval_s") {
        ""
    } else {
        "sync_interval_s = 1\n"
    };
    writeln!(f, "[upstream]\n{interval}{extra_toml}").unwrap();
    path
}

/// A node on 127.0.0.1:0 using `upstreams` in order, with a 1 s sync interval.
pub fn start_node(data_dir: &Path, upstreams: &[&str], extra: &[&str]) -> Proc {
    start_node_toml(data_dir, upstreams, "", extra)
}

/// A node whose config file's `[upstream]` section gets `toml` appended (which may open
/// further sections).
pub fn start_node_toml(data_dir: &Path, upstreams: &[&str], toml: &str, extra: &[&str]) -> Proc {
    start_node_on(data_dir, "127.0.0.1:0", upstreams, toml, extra)
}

/// A node on `listen`.
pub fn start_node_on(
    data_dir: &Path,
    listen: &str,
    upstreams: &[&str],
    toml: &str,
    extra: &[&str],
) -> Proc {
    let config = node_config(data_dir, toml);
    let dd = data_dir.to_str().unwrap().to_string();
    let cfg = config.to_str().unwrap().to_string();
    let mut args: Vec<String> = vec![
        "node".into(),
        "--config".into(),
        cfg,
        "--listen".into(),
        listen.into(),
        "--data-dir".into(),
        dd,
        "--upstream-token".into(),
        NODE_TOKEN.into(),
        "--node-token".into(),
        NODE_TOKEN.into(),
    ];
    for u in upstreams {
        args.push("--upstream".into());
        args.push((*u).into());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Proc::start(&refs, data_dir.with_extension("log"))
}

/// Runs `gup admin ... publish FILE --name NAME --version V`; returns (exit code, stdout).
pub fn publish(manager: &str, file: &Path, name: &str, version: &str) -> (i32, String) {
    let out = Command::new(gup())
        .args([
            "admin",
            "--manager",
            manager,
            "--token",
            ADMIN_TOKEN,
            "publish",
            file.to_str().unwrap(),
            "--name",
            name,
            "--version",
            version,
        ])
        .output()
        .expect("run gup admin");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Pseudo-random bytes from a seed (xorshift), cheap and reproducible.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    // Spread the seed so that neighbouring seeds give different streams (seed | 1 would not).
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    gup::core::digest::Digest::of(bytes).to_hex()
}

/// Polls `f` every 50 ms until it returns Some, or panics after `secs`.
pub async fn wait_for<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The node's catalog contains `sha256`.
pub async fn catalog_has(client: &reqwest::Client, base: &str, sha256: &str) -> bool {
    let Ok(resp) = client.get(format!("{base}/v1/catalog")).send().await else {
        return false;
    };
    let Ok(v) = resp.json::<serde_json::Value>().await else {
        return false;
    };
    v["items"]
        .as_array()
        .map(|items| items.iter().any(|i| i["sha256"] == sha256))
        .unwrap_or(false)
}

/// `gup_upstream_up` of one upstream as a node reports it (None before it was tried).
pub async fn upstream_up(client: &reqwest::Client, node: &str, upstream: &str) -> Option<f64> {
    let text = client
        .get(format!("{node}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let key = format!(
        "gup_upstream_up{{server=\"{}/\"}}",
        upstream.trim_end_matches('/')
    );
    text.lines()
        .find(|l| l.starts_with(&key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// The state `gup_upstream_state` puts one upstream in (`not_tried`, `up`, `down`, `held`).
pub async fn upstream_state(
    client: &reqwest::Client,
    node: &str,
    upstream: &str,
) -> Option<String> {
    let text = client
        .get(format!("{node}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let key = format!(
        "gup_upstream_state{{server=\"{}/\",state=\"",
        upstream.trim_end_matches('/')
    );
    text.lines()
        .filter_map(|l| l.strip_prefix(&key))
        .filter_map(|rest| rest.split_once("\"} "))
        .find(|(_, v)| v.trim() == "1")
        .map(|(state, _)| state.to_string())
}

/// A metric's value from `/metrics`.
pub async fn metric(client: &reqwest::Client, base: &str, name: &str) -> f64 {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} not found in:\n{text}"))
}

/// Waits until the manager's registry lists `client_id` (optionally in `group`).
pub async fn wait_registered(manager: &str, client_id: &str, group: Option<&str>) {
    let client = reqwest::Client::new();
    wait_for(30, "the manager registers the client", || {
        let (c, u) = (client.clone(), manager.to_string());
        async move {
            let v: serde_json::Value = c
                .get(format!("{u}/v1/admin/clients"))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            v["clients"]
                .as_array()?
                .iter()
                .any(|c| c["client_id"] == client_id && group.is_none_or(|g| c["group"] == g))
                .then_some(())
        }
    })
    .await;
}

/// Publishes `data` as `name` `version` through `gup admin publish`, then waits until every
/// server in `mirrors` (nodes) lists it in its catalog. Returns the blob's SHA-256.
pub async fn publish_and_wait(
    manager: &str,
    mirrors: &[&str],
    name: &str,
    version: &str,
    data: &[u8],
) -> String {
    let sha = sha256_hex(data);
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(data).unwrap();
    let (code, out) = publish(manager, file.path(), name, version);
    assert_eq!(code, 0, "publishing {name} {version}: {out}");
    let client = reqwest::Client::new();
    for base in mirrors {
        let (c, u, s) = (client.clone(), base.to_string(), sha.clone());
        wait_for(30, &format!("{base} mirrors {name} {version}"), || {
            let (c, u, s) = (c.clone(), u.clone(), s.clone());
            async move { catalog_has(&c, &u, &s).await.then_some(()) }
        })
        .await;
    }
    sha
}

/// `method path` on the manager's admin API with the test token; (status, JSON body).
pub async fn admin_call(
    manager: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut req = reqwest::Client::new()
        .request(method, format!("{manager}{path}"))
        .bearer_auth(ADMIN_TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// POSTs `body` as JSON to `base path` (no token); (status, JSON body).
pub async fn post_json(
    base: &str,
    path: &str,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// Waits until `base/readyz` answers 200 (a node has synced with its upstream).
pub async fn wait_ready(base: &str) {
    let client = reqwest::Client::new();
    let url = format!("{base}/readyz");
    wait_for(30, &format!("{base} is ready"), || {
        let (c, u) = (client.clone(), url.clone());
        async move {
            let r = c.get(&u).send().await.ok()?;
            (r.status() == 200).then_some(())
        }
    })
    .await;
}

/// Runs `gup admin --manager MANAGER --token ADMIN_TOKEN ARGS...`; returns (exit code,
/// stdout followed by stderr).
pub fn admin_cli(manager: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(gup())
        .args(["admin", "--manager", manager, "--token", ADMIN_TOKEN])
        .args(args)
        .output()
        .expect("run gup admin");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// `GET base path` with no token; (status, JSON body or Null).
pub async fn get_json(base: &str, path: &str) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .get(format!("{base}{path}"))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// POSTs `body` to `base/v1/heartbeat`, asserts 200 and returns the answer.
pub async fn heartbeat_ok(base: &str, body: serde_json::Value) -> serde_json::Value {
    let (status, v) = post_json(base, "/v1/heartbeat", body.clone()).await;
    assert_eq!(status, 200, "heartbeat {body} to {base}: {v}");
    v
}

/// Waits until `base` lists `sha256` in its catalog (a node started after the publish).
pub async fn wait_mirrored(base: &str, sha256: &str) {
    let client = reqwest::Client::new();
    wait_for(30, &format!("{base} mirrors {sha256}"), || {
        let (c, u, s) = (client.clone(), base.to_string(), sha256.to_string());
        async move { catalog_has(&c, &u, &s).await.then_some(()) }
    })
    .await;
}

/// Waits until `GET base/v1/content/sha256` answers 200 with a whole body, and returns it.
pub async fn wait_served(base: &str, sha256: &str, secs: u64, what: &str) -> Vec<u8> {
    let client = reqwest::Client::new();
    wait_for(secs, what, || {
        let (c, u, s) = (client.clone(), base.to_string(), sha256.to_string());
        async move {
            let r = c.get(format!("{u}/v1/content/{s}")).send().await.ok()?;
            if r.status() != 200 {
                return None;
            }
            r.bytes().await.ok().map(|b| b.to_vec())
        }
    })
    .await
}

/// Every event the manager stores, following the `next` cursor (pages of 1000).
pub async fn all_events(manager: &str) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut after: Option<u64> = None;
    // Bounded: 1000 pages of 1000 is far more than any test stores.
    for _ in 0..1000 {
        let path = match after {
            Some(a) => format!("/v1/admin/events?limit=1000&after={a}"),
            None => "/v1/admin/events?limit=1000".to_string(),
        };
        let (status, v) = admin_call(manager, reqwest::Method::GET, &path, None).await;
        assert_eq!(status, 200, "GET {path}: {v}");
        out.extend(v["events"].as_array().unwrap().iter().cloned());
        match v["next"].as_u64() {
            Some(n) => after = Some(n),
            None => return out,
        }
    }
    panic!("more than 1000 pages of events");
}

/// A certificate and its key, as PEM text and as files.
pub struct Pair {
    pub pem: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A fresh self-signed certificate for `localhost`, written as `NAME.pem` and `NAME.key`.
pub fn pair(dir: &Path, name: &str) -> Pair {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert, c.cert.pem()).unwrap();
    std::fs::write(&key, c.key_pair.serialize_pem()).unwrap();
    Pair {
        pem: c.cert.pem(),
        cert,
        key,
    }
}

/// A client that trusts only `pem` and reaches `localhost` at 127.0.0.1:`port`, with no
/// pooled connections (each request shakes hands anew).
pub fn trusting(pem: &str, port: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
        .resolve("localhost", format!("127.0.0.1:{port}").parse().unwrap())
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}
