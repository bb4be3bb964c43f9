//! What checking client credentials costs a node: its heartbeat throughput with a credential
//! on every heartbeat, against the same heartbeats without one, in the same run.
//!
//! Starts a real manager and a real node (the `gup` binary, on 127.0.0.1 ephemeral ports,
//! temp data dirs), enrols `CLIENTS` clients (default 2,000) through the node, then runs
//! rounds of `SECS` seconds (default 5) in which `CONC` connections (default 64) send
//! heartbeats round-robin over the clients: rounds without a credential (the site is open)
//! and rounds where every heartbeat carries its client's credential (checked as under
//! `client_auth = "required"`: a presented credential is always checked), interleaved,
//! `ROUNDS` of each (default 3). It prints each round, the medians and their ratio, and the
//! cost of one uncached signature check measured in this process. Printed, not asserted:
//! the target is a ratio of at least 0.95 (credential checks cost under 5%).
//!
//! Run with `cargo bench --bench credentials`.

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ADMIN: &str = "bench-admin-token";
const NODE: &str = "bench-node-token";

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `gup ARGS` and returns it with the address it logged.
fn start(args: &[&str], log: &Path) -> (Proc, String) {
    let file = std::fs::File::create(log).expect("log file");
    let child = Proc(
        Command::new(env!("CARGO_BIN_EXE_gup"))
            .args(args)
            .env("RUST_LOG", "warn,gup=info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn gup"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(addr) = text
            .lines()
            .find(|l| l.contains("listening"))
            .and_then(|l| l.split("addr=").nth(1))
            .and_then(|r| r.split_whitespace().next())
        {
            return (child, format!("http://{addr}"));
        }
        assert!(
            Instant::now() < deadline,
            "gup {args:?} did not listen:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// One round: `conc` connections heartbeating for `secs`; heartbeats answered 200 per second.
async fn round(
    http: &reqwest::Client,
    node: &str,
    clients: &Arc<Vec<(String, String)>>,
    with_credential: bool,
    conc: usize,
    secs: u64,
) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for t in 0..conc {
        let (http, node, clients) = (http.clone(), node.to_string(), clients.clone());
        let (done, failed) = (done.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = t;
            while Instant::now() < end {
                let (id, cred) = &clients[i % clients.len()];
                i += conc;
                let mut req = http
                    .post(format!("{node}/v1/heartbeat"))
                    .json(&serde_json::json!({"client_id": id, "policy_serial": 0, "catalog_revision": 0}));
                if with_credential {
                    req = req.header("X-Gup-Credential", cred);
                }
                match req.send().await {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let t0 = Instant::now();
    for t in tasks {
        let _ = t.await;
    }
    let n = done.load(Ordering::Relaxed);
    assert_eq!(failed.load(Ordering::Relaxed), 0, "heartbeats failed");
    n as f64 / t0.elapsed().as_secs_f64()
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into())
}

fn main() {
    let clients_n = env_or("CLIENTS", 2000);
    let conc = env_or("CONC", 64);
    let secs = env_or("SECS", 5) as u64;
    let rounds = env_or("ROUNDS", 3);
    let dir = tempfile::tempdir().expect("temp dir");
    let m_dir = dir.path().join("m");
    let (_manager, manager) = start(
        &[
            "manager",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            m_dir.to_str().unwrap(),
            "--admin-token",
            ADMIN,
            "--node-token",
            NODE,
        ],
        &dir.path().join("m.log"),
    );
    let cfg = dir.path().join("node.toml");
    let mut f = std::fs::File::create(&cfg).unwrap();
    writeln!(
        f,
        "[upstream]\nsync_interval_s = 10\n[limits]\nnew_clients_per_minute = 0"
    )
    .unwrap();
    let n_dir = dir.path().join("n");
    let (_node, node) = start(
        &[
            "node",
            "--config",
            cfg.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            n_dir.to_str().unwrap(),
            "--upstream",
            &manager,
            "--upstream-token",
            NODE,
        ],
        &dir.path().join("n.log"),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(conc)
            .build()
            .unwrap();
        // Open: the rounds without a credential must be admitted too.
        let site = http
            .put(format!("{manager}/v1/admin/site"))
            .bearer_auth(ADMIN)
            .json(&serde_json::json!({"client_auth": "open"}))
            .send()
            .await
            .unwrap();
        assert!(site.status().is_success());
        let token: serde_json::Value = http
            .post(format!("{manager}/v1/admin/enroll"))
            .bearer_auth(ADMIN)
            .json(&serde_json::json!({"group": "default"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let token = token["token"].as_str().unwrap().to_string();
        for _ in 0..300 {
            let ready = http.get(format!("{node}/readyz")).send().await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let t0 = Instant::now();
        let mut clients = Vec::with_capacity(clients_n);
        for i in 0..clients_n {
            let id = format!("bench-{i:06}");
            let v: serde_json::Value = http
                .post(format!("{node}/v1/heartbeat"))
                .json(&serde_json::json!({"client_id": id, "enroll_token": token}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let cred = v["credential"].as_str().expect("enrolled").to_string();
            clients.push((id, cred));
        }
        println!(
            "enrolled {clients_n} clients through the node in {:.2} s",
            t0.elapsed().as_secs_f64()
        );
        let clients = Arc::new(clients);
        // Warm-up: connections made, every credential verified once.
        round(&http, &node, &clients, true, conc, 2).await;
        let (mut open, mut checked) = (Vec::new(), Vec::new());
        for r in 0..rounds {
            let a = round(&http, &node, &clients, false, conc, secs).await;
            let b = round(&http, &node, &clients, true, conc, secs).await;
            println!(
                "round {}: no credential {a:>9.0} hb/s   credential checked {b:>9.0} hb/s",
                r + 1
            );
            open.push(a);
            checked.push(b);
        }
        let (a, b) = (median(open), median(checked));
        println!(
            "median: no credential {a:.0} hb/s, credential checked {b:.0} hb/s, ratio {:.3}",
            b / a
        );
    });
    // One uncached check, in this process: what a cache miss costs.
    let key_dir = tempfile::tempdir().unwrap();
    let key = gup::core::signing::CatalogKey::load_or_create(key_dir.path()).unwrap();
    let public = key.public();
    let creds: Vec<String> = (0..2000)
        .map(|i| {
            gup::core::credential::Credential {
                client_id: format!("c{i}"),
                group: "default".into(),
                serial: i,
                issued_at: 0,
            }
            .issue(&key)
        })
        .collect();
    let t0 = Instant::now();
    for c in &creds {
        gup::core::credential::Credential::verify(c, &public).unwrap();
    }
    let each = t0.elapsed().as_secs_f64() / creds.len() as f64;
    println!(
        "an uncached credential check: {:.1} us; {} ({clients_n} clients, {conc} connections, {secs} s rounds)",
        each * 1e6,
        cpu_model()
    );
}
