//! `gup demo`: a branch office on one machine, for a first look.
//!
//! Owns the embedded defaults of the demo: a manager and a node in one process on 127.0.0.1
//! (ports 8014 and 2967 when free, else ephemeral ones), data under one directory, push mode
//! and a short randomization window, a new sample package published, and `--clients`
//! agents (the `loadtest` crowd, the same code as `gup agent`) downloading it through the node
//! at their slots; then the spread, WAN against LAN bytes and latencies, the admin notification
//! their critical events raised; then a second version that changes a few percent of the first,
//! which the agents (holding the first) take as the manager's delta, with its WAN and LAN bytes
//! against full downloads; and three commands to paste next. The screen shows the story
//! only (the servers log to `DIR/demo.log`, see [`log_path`]); Ctrl-C at any moment stops it
//! within [`STOP_WITHIN`] with exit 0. It must never listen on or send to anything but
//! loopback, and it reuses the real roles: nothing here is a stand-in.

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

/// How long the servers get to stop after Ctrl-C before the demo leaves without them: the
/// whole stop must fit in 2 s (issue 17), on a busy machine too.
const STOP_WITHIN: Duration = Duration::from_millis(1500);

/// Where the demo's servers and agents log (the screen is for the story).
pub fn log_path(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("demo.log")
}

/// One line of the story on stdout. A reader that went away does not stop the demo.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

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
    #[error("talking to the node: {}", crate::core::fault::chain(.0))]
    Download(#[from] reqwest::Error),
    #[error("{0}")]
    Failed(String),
}

/// A testing knob, deliberately not a flag: set, the demo binds ephemeral ports only, so that
/// tests never take 8014 or 2967 on a shared machine.
const EPHEMERAL_PORTS_ENV: &str = "GUP_TEST_DEMO_EPHEMERAL_PORTS";

/// Binds 127.0.0.1:`port`, or an ephemeral port when it is taken.
async fn bind_loopback(port: u16) -> std::io::Result<TcpListener> {
    let port = if std::env::var_os(EPHEMERAL_PORTS_ENV).is_some() {
        0
    } else {
        port
    };
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

/// 4 KiB blocks of the sample that version 2 rewrites (of 1,024: 2%).
const REWRITTEN_BLOCKS: usize = 20;
/// Bytes version 2 appends.
const APPENDED_BYTES: usize = 64 << 10;

/// Version 2 of the sample: [`REWRITTEN_BLOCKS`] of its 4 KiB blocks rewritten at random
/// places and [`APPENDED_BYTES`] appended, as a day's definitions change.
fn second_version(v1: &[u8]) -> Vec<u8> {
    let mut v2 = v1.to_vec();
    let blocks = v1.len() / 4096;
    for _ in 0..REWRITTEN_BLOCKS {
        let at = rand::random_range(0..blocks) * 4096;
        rand::fill(&mut v2[at..at + 4096]);
    }
    let mut tail = vec![0u8; APPENDED_BYTES];
    rand::fill(&mut tail[..]);
    v2.extend_from_slice(&tail);
    v2
}

/// Runs the demo until `shutdown`; prints what happens on stdout.
pub async fn run(opts: &DemoOptions, shutdown: Shutdown) -> Result<(), DemoError> {
    let data_dir = &opts.data_dir;
    say!(
        "gup demo: starting; data under {}, log in {}",
        data_dir.display(),
        log_path(data_dir).display()
    );
    std::fs::create_dir_all(data_dir)?;
    let manager_listener = bind_loopback(MANAGER_PORT).await?;
    let node_listener = bind_loopback(NODE_PORT).await?;
    let manager_url = format!("http://{}", manager_listener.local_addr()?);
    let node_url = format!("http://{}", node_listener.local_addr()?);

    let mut mc = ManagerConfig::default();
    mc.manager.listen = manager_listener.local_addr()?;
    mc.manager.data_dir = data_dir.join("manager");
    let manager = Manager::open(&mc, shutdown.clone())?;
    let (admin_token, node_token) = manager::tokens(&mc).map_err(ManagerError::from)?;

    let mut nc = NodeConfig::default();
    nc.node.listen = node_listener.local_addr()?;
    nc.node.data_dir = data_dir.join("node");
    nc.upstream.servers = vec![manager_url.clone().into()];
    nc.upstream.token = node_token.secret().to_string();
    // Relay heartbeats and events every 2 s, so the manager's view is fresh in a short demo.
    nc.upstream.sync_interval_s = 2;
    let node = Node::open(&nc, shutdown.clone())?;

    let m_task = tokio::spawn(manager.run(manager_listener));
    let n_task = tokio::spawn(node.run(node_listener));

    say!(
        "a management server, a branch-office node and {} agents on this machine:",
        opts.clients
    );
    say!(
        "  manager  {manager_url}   data {}",
        mc.manager.data_dir.display()
    );
    say!(
        "  node     {node_url}   data {}",
        nc.node.data_dir.display()
    );
    say!("  (what they log goes to the log file; this screen tells the story)");

    let story = Story {
        opts,
        manager_url: &manager_url,
        node_url: &node_url,
    };
    // Ctrl-C ends the story wherever it is (dropping it stops the agents); then the servers.
    let outcome = tokio::select! {
        biased;
        _ = shutdown.clone().wait() => None,
        r = story.tell(admin_token) => Some(r),
    };
    // A step that failed because Ctrl-C just stopped the servers under it (in the moment
    // between the signal and this task seeing it) is the Ctrl-C, not a failure.
    let outcome = outcome.filter(|r| r.is_ok() || !shutdown.is_shutting_down());
    let outcome = match outcome {
        Some(Ok(sha256)) => {
            story.next_steps(&mc.manager.data_dir, &sha256);
            say!("serving until Ctrl-C");
            shutdown.clone().wait().await;
            Ok(())
        }
        Some(Err(e)) => {
            say!("demo failed: {e}");
            say!("serving what there is until Ctrl-C");
            shutdown.clone().wait().await;
            Err(e)
        }
        None => Ok(()),
    };
    say!("stopping (Ctrl-C)");
    let stopped = tokio::time::timeout(STOP_WITHIN, async {
        let _ = m_task.await;
        let _ = n_task.await;
    })
    .await;
    if stopped.is_err() {
        tracing::warn!("the demo's servers did not stop within {STOP_WITHIN:?}; leaving anyway");
    }
    say!("demo stopped");
    outcome
}

/// The part of the demo that can be cut short by Ctrl-C.
struct Story<'a> {
    opts: &'a DemoOptions,
    manager_url: &'a str,
    node_url: &'a str,
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

impl Story<'_> {
    /// Publishes the sample, waits for the node to mirror it and runs the agents; returns the
    /// sample's SHA-256 (hex).
    async fn tell(&self, admin_token: crate::http::auth::Token) -> Result<String, DemoError> {
        let (opts, manager_url, node_url) = (self.opts, self.manager_url, self.node_url);
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
        say!("settings: push mode, heartbeat every {DEMO_HEARTBEAT_S} s, randomization window {window} s");

        let bytes = sample_package();
        let digest = Digest::of(&bytes);
        let file: PathBuf = opts.data_dir.join("sample-definitions.bin");
        tokio::fs::write(&file, &bytes).await?;
        let version = chrono::Utc::now().format("%Y%m%d.%H%M%S").to_string();
        let (_, published) = admin
            .publish(&file, "sample-definitions", Some(&version), false)
            .await?;
        say!(
            "published {} {} ({} bytes, sha256 {}...) as catalog revision {}",
            published.name,
            published.version,
            published.size,
            &published.sha256.to_hex()[..12],
            published.revision
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
                say!(
                "node mirrored catalog revision {} after {} ms (pushed) and fetches the package once over the \"WAN\"",
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

        say!(
        "{} agents connect to the node; each downloads the release at its slot in the {window} s window and checks its sha256",
        opts.clients
    );
        say!(
        "then each uploads two events, as a real client reports what it finds: a critical one (kind risk, a virus found), at once, \
         and a routine one (system_change) with its next heartbeat; critical events raise an admin notification on the manager \
         (one per group and kind per hour, counting the rest)"
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
        let enroll_token = enrolment
            .get("token")
            .and_then(|t| t.as_str())
            .map(str::to_string);
        lt.enroll_token = enroll_token.clone();
        lt.progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let report = crate::loadtest::run(lt)
            .await
            .map_err(|e| DemoError::Failed(format!("agents: {e}")))?;
        say!("{}", report.summary());
        say!("{}", report.histogram_text());

        let wan = metric(&http, node_url, "gup_upstream_bytes_total").await?;
        let lan = metric(&http, node_url, "gup_served_bytes_total").await?;
        let fetches = metric(&http, node_url, "gup_upstream_fetches_total").await?;
        say!(
            "WAN (node <- manager): {:.1} MiB in {fetches} {};  LAN (node -> clients): {:.1} MiB",
            wan / 1048576.0,
            if fetches == 1.0 { "fetch" } else { "fetches" },
            lan / 1048576.0
        );
        say!(
        "download starts: most in any 1 s over the mean per second {:.2}; request latency p50 {:.1} ms, p99 {:.1} ms",
        report.peak_to_mean, report.latency_ms.p50, report.latency_ms.p99
    );
        if report.downloads_ok < opts.clients as u64 || report.digest_mismatches > 0 {
            return Err(DemoError::Failed(format!(
                "{} of {} clients verified the release ({} digest mismatches)",
                report.downloads_ok, opts.clients, report.digest_mismatches
            )));
        }
        say!(
            "all {} clients downloaded the release through the node, every sha256 verified",
            opts.clients
        );
        let notes = admin
            .call(
                reqwest::Method::GET,
                "/v1/admin/notifications",
                &[("limit", "10")],
                None,
            )
            .await?;
        match notes["notifications"].as_array().map(Vec::as_slice) {
            Some([]) | None => {
                say!("no admin notification yet (the critical events are on their way)")
            }
            Some(list) => {
                for n in list {
                    say!(
                    "admin notification: {} events in group {}, {} counted: the agents' critical events",
                    n["kind"].as_str().unwrap_or("?"),
                    n["group"].as_str().unwrap_or("?"),
                    n["count"]
                );
                }
            }
        }
        self.delta_round(&admin, bytes, &version, enroll_token)
            .await?;
        Ok(digest.to_hex())
    }

    /// The second act: a version 2 that changes a few percent of the first; the manager
    /// computes a delta, the node mirrors both, and a crowd of agents holding version 1 moves
    /// only the delta. Prints the bytes against full downloads.
    async fn delta_round(
        &self,
        admin: &AdminClient,
        v1: Vec<u8>,
        version: &str,
        enroll_token: Option<String>,
    ) -> Result<(), DemoError> {
        let (opts, node_url) = (self.opts, self.node_url);
        let v2 = second_version(&v1);
        let (d1, d2) = (Digest::of(&v1), Digest::of(&v2));
        let file: PathBuf = opts.data_dir.join("sample-definitions-2.bin");
        tokio::fs::write(&file, &v2).await?;
        let v2_version = format!("{version}.2");
        let http = reqwest::Client::new();
        let wan_before = metric(&http, node_url, "gup_upstream_bytes_total").await?;
        let (_, published) = admin
            .publish(&file, "sample-definitions", Some(&v2_version), false)
            .await?;
        say!(
            "deltas: published {} {} ({} bytes), {} of its 4 KiB blocks rewritten and {} KiB appended",
            published.name,
            published.version,
            published.size,
            REWRITTEN_BLOCKS,
            APPENDED_BYTES / 1024
        );
        let start = Instant::now();
        let delta_size = loop {
            let catalog: crate::core::catalog::Catalog = http
                .get(format!("{node_url}/v1/catalog"))
                .send()
                .await?
                .json()
                .await?;
            let listed = catalog
                .items
                .iter()
                .find(|i| i.sha256 == d2)
                .and_then(|i| i.deltas.iter().find(|d| d.from_sha256 == d1));
            if let Some(d) = listed {
                break d.size;
            }
            if start.elapsed() > Duration::from_secs(60) {
                return Err(DemoError::Failed(
                    "the manager listed no delta for version 2 in 60 s".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        say!(
            "the manager computed a delta from version 1 ({delta_size} bytes, {:.1}% of the version) and listed it; the node mirrored it after {} ms",
            delta_size as f64 * 100.0 / v2.len() as f64,
            start.elapsed().as_millis()
        );
        let mut lt = crate::loadtest::Options::new(node_url, opts.clients);
        lt.duration = Duration::from_secs(opts.window_s + 4 * DEMO_HEARTBEAT_S);
        lt.id_prefix = format!("demo-{version}-v2-");
        lt.enroll_token = enroll_token;
        lt.events_per_client = 0;
        lt.holding = Some(std::sync::Arc::new(crate::agent::home::Holding::new(
            "sample-definitions".into(),
            bytes::Bytes::from(v1),
        )));
        lt.progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
        say!(
            "{} agents holding version 1 update at their slots: each takes the delta, rebuilds version 2 and checks its sha256",
            opts.clients
        );
        let report = crate::loadtest::run(lt)
            .await
            .map_err(|e| DemoError::Failed(format!("agents: {e}")))?;
        let wan = metric(&http, node_url, "gup_upstream_bytes_total").await? - wan_before;
        let full = (v2.len() * opts.clients) as f64;
        let mib = |b: f64| b / 1048576.0;
        say!(
            "WAN (node <- manager): {:.1} MiB, version 2 once (for clients without version 1) and its delta once",
            mib(wan)
        );
        say!(
            "LAN (node -> clients): {:.2} MiB for {} clients ({} rebuilt from the delta, {} full), against {:.1} MiB had each downloaded version 2: {:.1}% of it",
            mib(report.lan_bytes as f64),
            opts.clients,
            report.installs.delta + report.installs.edge_delta,
            report.installs.full,
            mib(full),
            report.lan_bytes as f64 * 100.0 / full
        );
        if report.downloads_ok < opts.clients as u64 || report.digest_mismatches > 0 {
            return Err(DemoError::Failed(format!(
                "{} of {} clients verified version 2 ({} digest mismatches)",
                report.downloads_ok, opts.clients, report.digest_mismatches
            )));
        }
        Ok(())
    }

    /// Three commands to paste into another shell while the demo serves: the clients, the
    /// notifications, and a download checked against its digest.
    fn next_steps(&self, manager_data_dir: &std::path::Path, sha256: &str) {
        let gup = self_command();
        let manager = if self.manager_url == crate::core::config::DEFAULT_UPSTREAM {
            String::new()
        } else {
            format!(" --manager {}", self.manager_url)
        };
        let dir = shell_word(&manager_data_dir.display().to_string());
        say!("next, in another shell (from this directory):");
        say!("  {gup} admin{manager} --data-dir {dir} client list");
        say!("  {gup} admin{manager} --data-dir {dir} notifications");
        say!(
            "  curl -s {}/v1/content/{sha256} | sha256sum   # prints {sha256}",
            self.node_url
        );
    }
}

/// How to run this binary from the current directory: `gup` when the PATH finds this very
/// file, else its path (relative when under the current directory).
fn self_command() -> String {
    let Ok(me) = std::env::current_exe().and_then(|p| p.canonicalize()) else {
        return "gup".into();
    };
    let on_path = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths)
            .any(|d| d.join("gup").canonicalize().is_ok_and(|found| found == me))
    });
    if on_path {
        return "gup".into();
    }
    let shown = std::env::current_dir()
        .ok()
        .and_then(|cwd| {
            me.strip_prefix(cwd)
                .ok()
                .map(|p| format!("./{}", p.display()))
        })
        .unwrap_or_else(|| me.display().to_string());
    shell_word(&shown)
}

/// `s` as one shell word: bare when it is plain, else single-quoted.
fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+:=@".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}
