//! End to end through real processes: the upstream list.
//! - failover: with its first upstream gone, a node mirrors and fetches from the next one;
//! - fail-back: when the higher-priority upstream answers again, the node moves back to it
//!   (its push stream too);
//! - outage: with no upstream answering, the node keeps serving settings, policies, catalog,
//!   content and heartbeats, `readyz` says since when it is stale, and it catches up when an
//!   upstream returns.

mod common;

use common::*;
use serde_json::{json, Value};

async fn publish_new(
    manager: &str,
    dir: &std::path::Path,
    name: &str,
    seed: u64,
) -> (String, Vec<u8>) {
    let data = random_bytes(1 << 20, seed);
    let file = dir.join(format!("{name}-{seed}.bin"));
    std::fs::write(&file, &data).unwrap();
    let (code, out) = publish(manager, &file, name, &seed.to_string());
    assert_eq!(code, 0, "{out}");
    (sha256_hex(&data), data)
}

async fn wait_content(client: &reqwest::Client, node: &str, sha: &str, data: &[u8], what: &str) {
    let body = wait_for(40, what, || {
        let (c, u, s) = (client.clone(), node.to_string(), sha.to_string());
        async move {
            let r = c.get(format!("{u}/v1/content/{s}")).send().await.ok()?;
            if r.status() != 200 {
                return None;
            }
            r.bytes().await.ok()
        }
    })
    .await;
    assert!(body[..] == data[..], "{what}: wrong bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_failback_and_outage() {
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let m_addr = format!("127.0.0.1:{}", free_port());
    let p_addr = format!("127.0.0.1:{}", free_port());
    let m_url = format!("http://{m_addr}");
    let p_url = format!("http://{p_addr}");
    let m_dir = dir.path().join("m");
    let p_dir = dir.path().join("p");
    let x_dir = dir.path().join("x");

    let manager = start_manager_on(&m_dir, &m_addr, &[]);
    let primary = start_node_on(&p_dir, &p_addr, &[&m_url], "", &[]);
    let x = start_node_toml(&x_dir, &[&p_url, &m_url], "", &[]);
    let r = client
        .put(format!("{m_url}/v1/admin/groups/default/policy"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"scan": "daily"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let (a, a_data) = publish_new(&m_url, dir.path(), "a", 1).await;
    wait_content(&client, &x.url, &a, &a_data, "content through the primary").await;
    assert_eq!(upstream_up(&client, &x.url, &p_url).await, Some(1.0));

    // Failover: the primary dies; new content arrives through the manager.
    primary.kill9();
    let (b, b_data) = publish_new(&m_url, dir.path(), "b", 2).await;
    wait_content(
        &client,
        &x.url,
        &b,
        &b_data,
        "content through the second upstream",
    )
    .await;
    assert_eq!(upstream_up(&client, &x.url, &p_url).await, Some(0.0));
    assert_eq!(upstream_up(&client, &x.url, &m_url).await, Some(1.0));

    // Fail-back: the primary returns on its address; the node moves back to it.
    let primary = start_node_on(&p_dir, &p_addr, &[&m_url], "", &[]);
    let (xu, pu) = (x.url.clone(), p_url.clone());
    wait_for(40, "the node moves back to its primary", || {
        let (c, xu, pu) = (client.clone(), xu.clone(), pu.clone());
        let log = x.log_text();
        async move {
            let back = log.contains(&format!("to={pu}/ "))
                || log
                    .matches(&format!("holding the upstream push stream server={pu}/"))
                    .count()
                    >= 2;
            (back && upstream_up(&c, &xu, &pu).await == Some(1.0)).then_some(())
        }
    })
    .await;

    // Outage: nothing upstream answers.
    assert_eq!(primary.stop(), Some(0));
    assert_eq!(manager.stop(), Some(0));
    let xu = x.url.clone();
    let ready: Value = wait_for(40, "readyz reports stale", || {
        let (c, u) = (client.clone(), xu.clone());
        async move {
            let r = c.get(format!("{u}/readyz")).send().await.ok()?;
            let status = r.status();
            let v: Value = r.json().await.ok()?;
            (status == 200 && v["stale_since"].is_string()).then_some(v)
        }
    })
    .await;
    assert_eq!(ready["ready"], true);
    wait_content(&client, &x.url, &a, &a_data, "content during the outage").await;
    let cat: Value = client
        .get(format!("{}/v1/catalog", x.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cat["items"].as_array().unwrap().len(), 2);
    let pol: Value = client
        .get(format!("{}/v1/groups/default/policy", x.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(pol["policy"], json!({"scan": "daily"}));
    let r = client
        .get(format!("{}/v1/groups/default/settings", x.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let hb: Value = client
        .post(format!("{}/v1/heartbeat", x.url))
        .json(&json!({"client_id": "during-outage"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(hb["group"], "default");
    assert_eq!(hb["next_heartbeat_s"], 300);

    // The manager returns: the node catches up, and the client queued during the outage is
    // registered.
    let manager = start_manager_on(&m_dir, &m_addr, &[]);
    let (c, c_data) = publish_new(&m_url, dir.path(), "c", 3).await;
    wait_content(&client, &x.url, &c, &c_data, "content after the outage").await;
    wait_registered(&manager.url, "during-outage", None).await;
    let xu = x.url.clone();
    wait_for(20, "readyz fresh again", || {
        let (c, u) = (client.clone(), xu.clone());
        async move {
            let v: Value = c
                .get(format!("{u}/readyz"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            v["stale_since"].is_null().then_some(())
        }
    })
    .await;
}
