//! End to end through real processes: SIGHUP swaps a node's upstream list and its tokens.
//!
//! A node mirrors another node (N1) in front of the manager; its config file then names the
//! manager instead and it gets SIGHUP while a client's download is being fetched through N1:
//! - the download completes with the right bytes (the fetch finishes on the list it started
//!   with), and the log names `upstream.servers` as in force;
//! - the node now follows the manager: with N1 stopped and a sync interval of an hour, a new
//!   publication reaches it (its push stream reconnected to the new list), and its metrics
//!   show the manager and no longer N1;
//! - a reload with a CA file that holds no certificate is refused naming `upstream.ca_file`,
//!   and the list in force stays;
//! - a node token rotated through the node's token file (rewritten under the same path) is put
//!   in force by SIGHUP, with no outage while the manager moves from the old token to the new.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;

/// The node's config file: `servers`, a sync interval of an hour (only the push stream
/// brings news quickly), a WAN budget that makes a 16 MiB fetch take seconds, no prefetch.
fn write_config(path: &Path, servers: &[&str], extra: &str) {
    let list: Vec<String> = servers.iter().map(|s| format!("{s:?}")).collect();
    std::fs::write(
        path,
        format!(
            "[upstream]\nservers = [{}]\nsync_interval_s = 3600\nmax_bytes_per_sec = 4194304\n{extra}\n[cache]\nprefetch = false\n",
            list.join(", ")
        ),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_swaps_the_upstream_list_without_dropping_a_download() {
    let tmp = tempfile::tempdir().unwrap();
    let manager = start_manager(&tmp.path().join("m"), &[]);
    let n1 = start_node(&tmp.path().join("n1"), &[&manager.url], &[]);
    let data = random_bytes(16 << 20, 21);
    let sha = publish_and_wait(&manager.url, &[&n1.url], "defs", "1", &data).await;

    let config = tmp.path().join("node.toml");
    write_config(&config, &[&n1.url], "");
    let dd = tmp.path().join("node");
    let node = Proc::start(
        &[
            "node",
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            dd.to_str().unwrap(),
            "--upstream-token",
            NODE_TOKEN,
            "--node-token",
            NODE_TOKEN,
        ],
        tmp.path().join("node.log"),
    );
    wait_mirrored(&node.url, &sha).await;
    let client = reqwest::Client::new();

    // A client's miss: the node fetches through N1 at 4 MiB/s (about 4 s).
    let resp = client
        .get(format!("{}/v1/content/{sha}", node.url))
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut got = Vec::new();
    let first = body.next().await.expect("a first chunk").unwrap();
    got.extend_from_slice(&first);
    assert!(got.len() < data.len(), "the download is still under way");

    // The list swapped while the fetch is under way.
    write_config(&config, &[&manager.url], "");
    hangup(&node);
    logged(
        &node,
        "config reloaded: the new value is in force key=upstream.servers",
        1,
    )
    .await;
    while let Some(chunk) = body.next().await {
        got.extend_from_slice(&chunk.expect("the download goes on after the reload"));
    }
    assert_eq!(got.len(), data.len());
    assert!(got == data, "the download kept its bytes across the reload");

    // N1 gone: only the manager can bring news, and only the push stream brings it soon.
    let n1_url = n1.url.clone();
    n1.stop();
    let later = random_bytes(4096, 22);
    let sha2 = publish_and_wait(&manager.url, &[], "rules", "1", &later).await;
    wait_mirrored(&node.url, &sha2).await;
    let manager_state = upstream_state(&client, &node.url, &manager.url).await;
    assert_eq!(manager_state.as_deref(), Some("up"));
    let metrics = client
        .get(format!("{}/metrics", node.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let states: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("gup_upstream_state"))
        .collect();
    assert!(
        !states.iter().any(|l| l.contains(&n1_url)),
        "N1 left the metrics: {states:?}"
    );
    assert!(
        states.iter().any(|l| l.contains(&manager.url)),
        "{states:?}"
    );

    // A CA file that holds no certificate: the new list cannot be built, so the reload is
    // refused naming the key, and the manager stays in force.
    let ca = tmp.path().join("not-a-ca.pem");
    std::fs::write(&ca, "not a certificate\n").unwrap();
    write_config(
        &config,
        &[&manager.url],
        &format!("ca_file = {:?}", ca.to_str().unwrap()),
    );
    hangup(&node);
    logged(
        &node,
        "reload refused, the running config stays: upstream.ca_file",
        1,
    )
    .await;
    let third = random_bytes(4096, 23);
    let sha3 = publish_and_wait(&manager.url, &[], "extra", "1", &third).await;
    wait_mirrored(&node.url, &sha3).await;
    assert_eq!(
        upstream_state(&client, &node.url, &manager.url)
            .await
            .as_deref(),
        Some("up")
    );
    node.stop();
    manager.stop();
}

/// A token rotation through a token file: the manager accepts the new node token beside the
/// old, the node's token file is rewritten under the same path and SIGHUP puts it in force,
/// the manager drops the old one, and the node goes on syncing (with the old token refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_puts_a_rewritten_upstream_token_file_in_force() {
    let tmp = tempfile::tempdir().unwrap();
    let m_cfg = tmp.path().join("manager.toml");
    let manager_toml = |extra: &str| {
        std::fs::write(
            &m_cfg,
            format!("[manager]\nadmin_token = {ADMIN_TOKEN:?}\n{extra}\n"),
        )
        .unwrap()
    };
    manager_toml("node_token = \"old-node-token\"");
    let m_dir = tmp.path().join("m");
    let manager = Proc::start(
        &[
            "manager",
            "--config",
            m_cfg.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            m_dir.to_str().unwrap(),
        ],
        tmp.path().join("m.log"),
    );
    let token_file = tmp.path().join("upstream.token");
    std::fs::write(&token_file, "old-node-token\n").unwrap();
    let config = tmp.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "[upstream]\nservers = [{:?}]\ntoken_file = {:?}\nsync_interval_s = 1\n",
            manager.url,
            token_file.to_str().unwrap()
        ),
    )
    .unwrap();
    let dd = tmp.path().join("node");
    let node = Proc::start(
        &[
            "node",
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            dd.to_str().unwrap(),
        ],
        tmp.path().join("node.log"),
    );
    let first = random_bytes(4096, 31);
    publish_and_wait(&manager.url, &[&node.url], "one", "1", &first).await;

    // The manager takes the new token beside the old; then the node moves over.
    manager_toml("node_token = \"new-node-token\"\nnode_token_previous = \"old-node-token\"");
    hangup(&manager);
    logged(&manager, "in force key=manager.node_token_previous", 1).await;
    std::fs::write(&token_file, "new-node-token\n").unwrap();
    hangup(&node);
    logged(
        &node,
        "config reloaded: the new value is in force key=upstream token file contents",
        1,
    )
    .await;
    // The old token retired: the node still syncs, with the new one.
    manager_toml("node_token = \"new-node-token\"");
    hangup(&manager);
    logged(&manager, "in force key=manager.node_token_previous", 2).await;
    let client = reqwest::Client::new();
    let status = |token: &'static str| {
        let (c, url) = (client.clone(), format!("{}/v1/sync", manager.url));
        async move {
            c.get(url)
                .bearer_auth(token)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    assert_eq!(
        status("old-node-token").await,
        401,
        "the old token is refused"
    );
    assert_eq!(status("new-node-token").await, 200);
    let second = random_bytes(4096, 32);
    publish_and_wait(&manager.url, &[&node.url], "two", "1", &second).await;
    assert_eq!(
        upstream_state(&client, &node.url, &manager.url)
            .await
            .as_deref(),
        Some("up")
    );
    node.stop();
    manager.stop();
}
