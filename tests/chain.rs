//! End to end through real processes: a chain manager -> node -> node. The second node uses
//! the first as its upstream (same client API, plus `/v1/sync`, `/v1/stream` and heartbeat
//! batches):
//! - the end of the chain mirrors the catalog and serves content byte-exact;
//! - a settings change on the manager reaches the end of the chain by push;
//! - a client of the end of the chain is registered at the manager through both nodes.

mod common;

use common::*;
use serde_json::json;

struct Chain {
    _dir: tempfile::TempDir,
    manager: Proc,
    _node1: Proc,
    node2: Proc,
}

/// A manager, a node on it, and a second node on the first, synced. (The second node
/// presents the first one's node token: `start_node` gives every node `NODE_TOKEN`.)
async fn chain() -> Chain {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let node1 = start_node(&dir.path().join("n1"), &[&manager.url], &[]);
    let node2 = start_node(&dir.path().join("n2"), &[&node1.url], &[]);
    wait_ready(&node2.url).await;
    Chain {
        _dir: dir,
        manager,
        _node1: node1,
        node2,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_end_of_a_chain_mirrors_and_serves_content_byte_exact() {
    let c = chain().await;
    let data = random_bytes(5_000_000, 3);
    let sha = publish_and_wait(&c.manager.url, &[&c.node2.url], "defs", "7", &data).await;
    let body = reqwest::get(format!("{}/v1/content/{sha}", c.node2.url))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(body[..] == data[..], "bytes through two nodes differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settings_change_reaches_the_end_of_the_chain() {
    let c = chain().await;
    let (status, v) = admin_call(
        &c.manager.url,
        reqwest::Method::PUT,
        "/v1/admin/groups/default/settings",
        Some(json!({"heartbeat_interval_s": 42})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let n2 = c.node2.url.clone();
    wait_for(30, "the change reaches the second node", || {
        let u = n2.clone();
        async move {
            let (_, v) = get_json(&u, "/v1/groups/default/settings").await;
            (v["heartbeat_interval_s"] == 42).then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_the_end_of_the_chain_is_registered_at_the_manager() {
    let c = chain().await;
    heartbeat_ok(
        &c.node2.url,
        json!({"client_id": "far-away", "os": "linux"}),
    )
    .await;
    wait_registered(&c.manager.url, "far-away", None).await;
}
