//! `gup demo`: a branch office on one machine, for a first look.
//!
//! Owns the embedded defaults of the demo: a manager and a node in one process on 127.0.0.1
//! (ports 8014 and 2967 when free, else ephemeral ones), data under one directory, a sample
//! package published and downloaded through the node with its digest verified. It must never
//! listen on anything but loopback, and it reuses the real roles: nothing here is a stand-in.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;

use crate::admin::{AdminClient, AdminError};
use crate::config::{ManagerConfig, NodeConfig, MANAGER_PORT, NODE_PORT};
use crate::digest::Digest;
use crate::manager::{self, Manager, ManagerError};
use crate::node::{Node, NodeError};
use crate::server::Shutdown;

/// Size of the sample package.
const SAMPLE_BYTES: usize = 4 << 20;

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

/// Deterministic pseudo-random bytes (xorshift), so a second run republishes the same package.
fn sample_package() -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
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
pub async fn run(data_dir: &Path, shutdown: Shutdown) -> Result<(), DemoError> {
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
    let node = Node::open(&nc, shutdown.clone())?;

    let m_task = tokio::spawn(manager.run(manager_listener));
    let n_task = tokio::spawn(node.run(node_listener));

    println!("gup demo: a management server and a branch-office node on this machine");
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
        crate::auth::token_path(&mc.manager.data_dir, "admin").display()
    );

    let outcome = showcase(&manager_url, &node_url, admin_token, data_dir).await;
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

async fn showcase(
    manager_url: &str,
    node_url: &str,
    admin_token: crate::auth::Token,
    data_dir: &Path,
) -> Result<(), DemoError> {
    let bytes = sample_package();
    let digest = Digest::of(&bytes);
    let file: PathBuf = data_dir.join("sample-definitions.bin");
    tokio::fs::write(&file, &bytes).await?;
    let admin = AdminClient::new(manager_url, admin_token)?;
    let (status, published) = admin
        .publish(&file, "sample-definitions", Some("2026.11.24"), false)
        .await?;
    println!(
        "published {} {} ({} bytes, sha256 {}) as catalog revision {}{}",
        published.name,
        published.version,
        published.size,
        published.sha256,
        published.revision,
        if status == 200 {
            " (already there from an earlier run)"
        } else {
            ""
        }
    );

    let http = reqwest::Client::new();
    let start = Instant::now();
    loop {
        let catalog: crate::catalog::Catalog = http
            .get(format!("{node_url}/v1/catalog"))
            .send()
            .await?
            .json()
            .await?;
        if catalog.items.iter().any(|i| i.sha256 == digest) {
            println!(
                "node mirrored catalog revision {} after {} ms",
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
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let start = Instant::now();
    let resp = http
        .get(format!("{node_url}/v1/content/{digest}"))
        .send()
        .await?
        .error_for_status()?;
    let body = resp.bytes().await?;
    let got = Digest::of(&body);
    if got != digest {
        return Err(DemoError::Failed(format!(
            "downloaded bytes hash to {got}, expected {digest}"
        )));
    }
    println!(
        "downloaded through the node: {} bytes in {} ms, sha256 verified",
        body.len(),
        start.elapsed().as_millis()
    );
    Ok(())
}
