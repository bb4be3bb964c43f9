//! End to end through real processes, a manager, a node and a `gup agent` (issue 22):
//! - an agent holding version 1 reaches version 2 through the delta the manager computed and
//!   listed, fetched through its node, never downloading the full version 2;
//! - an agent holding a version older than any listed delta (`deltas.from_versions = 1`, and
//!   it still holds version 1 when version 3 is out) gets an edge delta its node computes, and
//!   reaches version 3 without the full blob.
//!
//! The agent is stopped while the new versions are published and listed, so that it meets the
//! catalog with its deltas already there (it would otherwise be free to take an edge delta or
//! the full blob in the moment between a publication and its listing).

mod common;

use std::path::Path;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};

const NAME: &str = "defs.bin";
const NODE_TOML: &str = "prefetch_window_s = 0\n[cache]\nmin_free_bytes = 0\n";

/// `old` with `blocks` of its 4 KiB blocks rewritten, spread over it.
fn changed(old: &[u8], blocks: usize, seed: u64) -> Vec<u8> {
    let mut new = old.to_vec();
    let stride = old.len() / blocks;
    for k in 0..blocks {
        let at = k * stride / 4096 * 4096;
        new[at..at + 4096].copy_from_slice(&random_bytes(4096, seed + k as u64));
    }
    new
}

async fn settings(manager: &str) {
    let (status, v) = admin_call(
        manager,
        Method::PUT,
        "/v1/admin/groups/default/settings",
        Some(
            json!({"mode": "push", "heartbeat_interval_s": 1, "randomization": {"enabled": false}}),
        ),
    )
    .await;
    assert_eq!(status, 200, "{v}");
}

/// Waits until `base`'s catalog lists, on the item with bytes `to`, a delta from `from`.
async fn wait_listed(base: &str, from: &str, to: &str) {
    let client = reqwest::Client::new();
    wait_for(
        60,
        &format!("{base} lists a delta from {from} on {to}"),
        || {
            let (c, url) = (client.clone(), format!("{base}/v1/catalog"));
            async move {
                let v: Value = c.get(url).send().await.ok()?.json().await.ok()?;
                v["items"].as_array()?.iter().find(|i| i["sha256"] == to)?["deltas"]
                    .as_array()?
                    .iter()
                    .any(|d| d["from_sha256"] == from)
                    .then_some(())
            }
        },
    )
    .await;
}

/// Waits until the agent of `dir` holds `data` under [`NAME`].
async fn wait_content(dir: &Path, data: &[u8]) {
    let path = dir.join("content").join(NAME);
    wait_for(60, &format!("{} holds the version", path.display()), || {
        let ok = std::fs::read(&path).is_ok_and(|b| b == data);
        async move { ok.then_some(()) }
    })
    .await;
}

/// Waits until the agent of `dir` has counted `n` installs (its counters are saved just after
/// the file is in place) and returns its status.
async fn wait_installs(dir: &Path, n: u64) -> Value {
    wait_for(30, &format!("the agent counted {n} installs"), || {
        let status = agent_status(dir);
        let d = &status["deltas"];
        let count: u64 = ["via_full", "via_delta", "via_edge_delta"]
            .iter()
            .map(|k| d[*k].as_u64().unwrap_or(0))
            .sum();
        async move { (count >= n).then_some(status) }
    })
    .await
}

/// Starts an agent on `node` that installs `v1`, and stops it.
async fn agent_holding(dir: &Path, node: &str, v1: &[u8]) {
    let agent = start_agent(dir, &[node], "default", &["--client-id", "pc-delta-e2e"]);
    wait_content(dir, v1).await;
    wait_installs(dir, 1).await;
    agent.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_version_1_reaches_version_2_through_the_managers_delta() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    settings(&manager.url).await;
    let node = start_node_toml(&dir.path().join("n"), &[&manager.url], NODE_TOML, &[]);
    wait_ready(&node.url).await;
    let v1 = random_bytes(1 << 20, 31);
    let v2 = changed(&v1, 4, 400);
    let s1 = publish_and_wait(&manager.url, &[&node.url], NAME, "1", &v1).await;
    let a = dir.path().join("a");
    agent_holding(&a, &node.url, &v1).await;

    let s2 = publish_and_wait(&manager.url, &[&node.url], NAME, "2", &v2).await;
    wait_listed(&node.url, &s1, &s2).await;
    let client = reqwest::Client::new();
    let served_before = metric(&client, &node.url, "gup_served_bytes_total").await;
    let agent = start_agent(
        &a,
        &[&node.url],
        "default",
        &["--client-id", "pc-delta-e2e"],
    );
    wait_content(&a, &v2).await;
    let status = wait_installs(&a, 2).await;
    let d = &status["deltas"];
    assert_eq!(d["via_delta"], 1, "{status}");
    assert_eq!(d["via_full"], 1, "version 1 only came full: {status}");
    assert_eq!(d["fallbacks"], 0, "{status}");
    assert!(
        agent.log_text().contains("via=\"delta\""),
        "{}",
        agent.log_text()
    );
    // The LAN carried the delta, not the version: well under a tenth of it.
    let lan = metric(&client, &node.url, "gup_served_bytes_total").await - served_before;
    assert!(
        lan > 0.0 && lan < v2.len() as f64 / 10.0,
        "{lan} bytes served"
    );
    agent.stop();
    node.stop();
    manager.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_older_than_every_listed_delta_gets_an_edge_delta_from_its_node() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("manager.toml");
    std::fs::write(
        &cfg,
        "[manager]\nretain_revisions = 10\n[deltas]\nfrom_versions = 1\n",
    )
    .unwrap();
    let manager = start_manager(&dir.path().join("m"), &["--config", cfg.to_str().unwrap()]);
    settings(&manager.url).await;
    let node = start_node_toml(&dir.path().join("n"), &[&manager.url], NODE_TOML, &[]);
    wait_ready(&node.url).await;
    let v1 = random_bytes(1 << 20, 41);
    let v2 = changed(&v1, 4, 500);
    let v3 = changed(&v2, 4, 600);
    let s1 = publish_and_wait(&manager.url, &[&node.url], NAME, "1", &v1).await;
    let a = dir.path().join("a");
    agent_holding(&a, &node.url, &v1).await;

    let s2 = publish_and_wait(&manager.url, &[&node.url], NAME, "2", &v2).await;
    wait_listed(&node.url, &s1, &s2).await;
    let s3 = publish_and_wait(&manager.url, &[&node.url], NAME, "3", &v3).await;
    wait_listed(&node.url, &s2, &s3).await;
    wait_served(&node.url, &s3, 30, "the node holds v3").await;
    let client = reqwest::Client::new();
    let agent = start_agent(
        &a,
        &[&node.url],
        "default",
        &["--client-id", "pc-delta-e2e"],
    );
    wait_content(&a, &v3).await;
    let status = wait_installs(&a, 2).await;
    let d = &status["deltas"];
    assert_eq!(d["via_edge_delta"], 1, "{status}");
    assert_eq!(d["via_delta"], 0, "no delta from v1 is listed: {status}");
    assert_eq!(d["via_full"], 1, "version 1 only came full: {status}");
    assert!(
        agent.log_text().contains("via=\"edge delta\""),
        "{}",
        agent.log_text()
    );
    // The node computed it (the manager was never asked for it).
    assert_eq!(
        metric(&client, &node.url, "gup_deltas_computed_total").await,
        1.0
    );
    agent.stop();
    node.stop();
    manager.stop();
}
