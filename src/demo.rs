//! `gup demo`: a branch office on one machine, for a first look.
//!
//! Owns the embedded defaults of the demo: a manager and a node in one process on 127.0.0.1
//! (ports 8014 and 2967 when free, else ephemeral ones), data under one directory, push mode
//! and a short randomization window, a new sample package published, and `--clients`
//! agents (the `loadtest` crowd, the same code as `gup agent`) downloading it through the node
//! at their slots; then the spread, WAN against LAN bytes and latencies. It must never listen on or
//! send to anything but loopback, and it reuses the real roles: nothing here is a stand-in.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;

use crate::admin::{AdminClient, AdminError};
use crate::core::config::{ManagerConfig, NodeConfig, MANAGER_PORT, NODE_PORT};
use crate::core::digest::Digest;
use crate::http::shutdown::Shutdown;
use crate::manager::{self, Manager, ManagerError};
use crate::node::{Node, NodeError};

/// Size of the sample package.
const SAMPLE_BYTES: usize = 4 << 20;

/// Heartbeat interval of the demo's clients: short, so the demo ends soon after the window.
const DEMO_HEARTBEAT_S: u64 = 5;

/// Why the demo stopped.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("manager: {0}")]
    Manager(#[from] ManagerError),
    #[error("node: {0}")]
    Node(#[from] NodeError),
    #[error("admin: {0}")]
    Admin(#[from] AdminError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("download through the node: {0}")]
    Download(#[from] reqwest::Error),
    #[error("{0}")]
    Failed(String),
}

/// Binds 127.0.0.1:`port`, or an ephemeral port when it is taken.
async fn bind_loopback(port: u16) -> std::io::Result<TcpListener> {
    match TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await {
        Ok(l) => Ok(l),
        Err(_) => TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await,
    }
}

/// What the demo runs.
pub struct DemoOptions {
    pub data_dir: PathBuf,
    /// Simulated clients behind the node.
    pub clients: usize,
    /// Randomization window in seconds.
    pub window_s: u64,
}

/// A new sample package for this run (so each run is a new release that spreads).
fn sample_package() -> Vec<u8> {
    let mut x: u64 = rand::random::<u64>() | 1;
    let mut out = Vec::with_capacity(SAMPLE_BYTES);
    while out.len() < SAMPLE_BYTES {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// Runs the demo until `shutdown`; prints what happens on stdout.
pub async fn run(opts: &DemoOptions, shutdown: Shutdown) -> Result<(), DemoError> {
    let data_dir = &opts.data_dir;
    std::fs::create_dir_all(data_dir)?;
    let manager_listener = bind_loopback(MANAGER_PORT).await?;
    let node_listener = bind_loopback(NODE_PORT).await?;
    let manager_url = format!("http://{}", manager_listener.local_addr()?);
    let node_url = format!("http://{}", node_listener.local_addr()?);

    let mut mc = ManagerConfig::default();
    mc.manager.listen = manager_listener.local_addr()?;
    mc.manager.data_dir = data_dir.join("manager");
    let (admin_token, node_token) = manager::tokens(&mc).map_err(ManagerError::from)?;
    let manager = Manager::open(&mc, shutdown.clone())?;

    let mut nc = NodeConfig::default();
    nc.node.listen = node_listener.local_addr()?;
    nc.node.data_dir = data_dir.join("node");
    nc.upstream.servers = vec![manager_url.clone()];
    nc.upstream.token = node_token.secret().to_string();
    // Relay heartbeats and events every 2 s, so the manager's view is fresh in a short demo.
    nc.upstream.sync_interval_s = 2;
    let node = Node::open(&nc, shutdown.clone())?;

    let m_task = tokio::spawn(manager.run(manager_listener));
    let n_task = tokio::spawn(node.run(node_listener));

    println!(
        "gup demo: a management server, a branch-office node and {} agents on this machine",
        opts.clients
    );
    println!(
        "  manager  {manager_url}   data {}",
        mc.manager.data_dir.display()
    );
    println!(
        "  node     {node_url}   data {}",
        nc.node.data_dir.display()
    );
    println!(
        "  admin token in {}",
        crate::http::auth::token_path(&mc.manager.data_dir, "admin").display()
    );

    let outcome = showcase(opts, &manager_url, &node_url, admin_token).await;
    match &outcome {
        Ok(()) => {
            println!("try:  curl -s {node_url}/v1/catalog");
            println!("      curl -s {node_url}/metrics | grep gup_");
            println!("serving until Ctrl-C");
        }
        Err(e) => println!("demo failed: {e}"),
    }
    shutdown.wait().await;
    let _ = m_task.await;
    let _ = n_task.await;
    println!("demo stopped");
    outcome
}

/// A metric of a server's `/metrics` (0 when absent).
async fn metric(http: &reqwest::Client, base: &str, name: &str) -> Result<f64, DemoError> {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0))
}

async fn showcase(
    opts: &DemoOptions,
    manager_url: &str,
    node_url: &str,
    admin_token: crate::http::auth::Token,
) -> Result<(), DemoError> {
    let admin = AdminClient::new(manager_url, admin_token)?;
    let window = opts.window_s;
    admin
        .call(
            reqwest::Method::PUT,
            "/v1/admin/groups/default/settings",
            &[],
            Some(&serde_json::json!({
                "mode": "push",
                "heartbeat_interval_s": DEMO_HEARTBEAT_S,
                "randomization": {"enabled": true, "window_s": window},
            })),
        )
        .await?;
    println!("settings: push mode, heartbeat every {DEMO_HEARTBEAT_S} s, randomization window {window} s");

    let bytes = sample_package();
    let digest = Digest::of(&bytes);
    let file: PathBuf = opts.data_dir.join("sample-definitions.bin");
    tokio::fs::write(&file, &bytes).await?;
    let version = chrono::Utc::now().format("%Y%m%d.%H%M%S").to_string();
    let (_, published) = admin
        .publish(&file, "sample-definitions", Some(&version), false)
        .await?;
    println!(
        "published {} {} ({} bytes, sha256 {}) as catalog revision {}",
        published.name, published.version, published.size, published.sha256, published.revision
    );

    let http = reqwest::Client::new();
    let start = Instant::now();
    loop {
        let catalog: crate::core::catalog::Catalog = http
            .get(format!("{node_url}/v1/catalog"))
            .send()
            .await?
            .json()
            .await?;
        if catalog.items.iter().any(|i| i.sha256 == digest) {
            println!(
                "node mirrored catalog revision {} after {} ms (pushed)",
                catalog.revision,
                start.elapsed().as_millis()
            );
            break;
        }
        if start.elapsed() > Duration::from_secs(30) {
            return Err(DemoError::Failed(
                "the node did not mirror the catalog in 30 s".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    println!(
        "{} agents connect to the node and each downloads the release at its slot in the {window} s window...",
        opts.clients
    );
    let mut lt = crate::loadtest::Options::new(node_url, opts.clients);
    // The run ends one heartbeat interval after every client is done, or at this cap.
    lt.duration = Duration::from_secs(window + 4 * DEMO_HEARTBEAT_S);
    lt.id_prefix = format!("demo-{version}-");
    // Each agent enrols with a token for the group, as a real installation would.
    let enrolment = admin
        .call(
            reqwest::Method::POST,
            "/v1/admin/enroll",
            &[],
            Some(&serde_json::json!({"group": "default", "expires": "1h"})),
        )
        .await?;
    lt.enroll_token = enrolment
        .get("token")
        .and_then(|t| t.as_str())
        .map(str::to_string);
    lt.progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let report = crate::loadtest::run(lt)
        .await
        .map_err(|e| DemoError::Failed(format!("agents: {e}")))?;
    println!("{}", report.summary());
    println!("{}", report.histogram_text());

    let wan = metric(&http, node_url, "gup_upstream_bytes_total").await?;
    let lan = metric(&http, node_url, "gup_served_bytes_total").await?;
    let fetches = metric(&http, node_url, "gup_upstream_fetches_total").await?;
    println!(
        "WAN (node <- manager): {:.1} MiB in {fetches} fetches;  LAN (node -> clients): {:.1} MiB",
        wan / 1048576.0,
        lan / 1048576.0
    );
    println!(
        "download starts peak/mean {:.2} over the window; request latency p50 {:.1} ms, p99 {:.1} ms",
        report.peak_to_mean, report.latency_ms.p50, report.latency_ms.p99
    );
    if report.downloads_ok < opts.clients as u64 || report.digest_mismatches > 0 {
        return Err(DemoError::Failed(format!(
            "{} of {} clients verified the release ({} digest mismatches)",
            report.downloads_ok, opts.clients, report.digest_mismatches
        )));
    }
    println!(
        "all {} clients downloaded the release through the node, every sha256 verified",
        opts.clients
    );
    Ok(())
}
