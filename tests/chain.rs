//! End to end through real processes: a chain manager -> node -> node. The second node uses
//! the first as its upstream (same client API, plus `/v1/sync`, `/v1/stream` and heartbeat
//! batches), mirrors content and settings through it, and its clients' heartbeats reach the
//! manager through both nodes.

mod common;

use common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_level_chain_mirrors_content_settings_and_relays_heartbeats() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let node1 = start_node(&dir.path().join("n1"), &[&manager.url], &[]);
    // The second node presents node1's node token (start_node gives every node NODE_TOKEN).
    let node2 = start_node(&dir.path().join("n2"), &[&node1.url], &[]);
    let client = reqwest::Client::new();

    let data = random_bytes(5_000_000, 3);
    let sha = sha256_hex(&data);
    let file = dir.path().join("defs.bin");
    std::fs::write(&file, &data).unwrap();
    let (code, out) = publish(&manager.url, &file, "defs", "7");
    assert_eq!(code, 0, "{out}");
    let (n2, s2) = (node2.url.clone(), sha.clone());
    wait_for(30, "the second node mirrors the catalog", || {
        let (c, u, s) = (client.clone(), n2.clone(), s2.clone());
        async move { catalog_has(&c, &u, &s).await.then_some(()) }
    })
    .await;
    let body = client
        .get(format!("{}/v1/content/{sha}", node2.url))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(body[..] == data[..], "bytes through two nodes differ");

    // A settings change on the manager reaches the end of the chain by push.
    let r = client
        .put(format!("{}/v1/admin/groups/default/settings", manager.url))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"heartbeat_interval_s": 42}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let n2 = node2.url.clone();
    wait_for(30, "the change reaches the second node", || {
        let (c, u) = (client.clone(), n2.clone());
        async move {
            let v: Value = c
                .get(format!("{u}/v1/groups/default/settings"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (v["heartbeat_interval_s"] == 42).then_some(())
        }
    })
    .await;

    // A client of the second node is registered at the manager through both nodes.
    let r = client
        .post(format!("{}/v1/heartbeat", node2.url))
        .json(&json!({"client_id": "far-away", "os": "linux"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    wait_registered(&manager.url, "far-away", None).await;
}
