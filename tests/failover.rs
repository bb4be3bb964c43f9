//! End to end through real processes: the upstream list.
//! - failover then fail-back (one sequence): with its first upstream gone, a node mirrors
//!   and fetches from the next one; when the higher-priority upstream answers again, the
//!   node moves back to it (its push stream too);
//! - outage: with no upstream answering, the node keeps serving settings, policies, catalog,
//!   content and heartbeats, and `readyz` says since when it is stale;
//! - after an outage the node catches up when an upstream returns, relays the heartbeats it
//!   answered meanwhile, and `readyz` is fresh again.

mod common;

use common::*;
use serde_json::{json, Value};

/// Publishes 1 MiB as `name` version `seed`, waiting for no node; returns (sha, bytes).
async fn publish_new(manager: &str, name: &str, seed: u64) -> (String, Vec<u8>) {
    let data = random_bytes(1 << 20, seed);
    let sha = publish_and_wait(manager, &[], name, &seed.to_string(), &data).await;
    (sha, data)
}

/// Waits until `node` serves `sha` and checks the bytes.
async fn served(node: &str, sha: &str, data: &[u8], what: &str) {
    let body = wait_served(node, sha, 40, what).await;
    assert!(body[..] == data[..], "{what}: wrong bytes");
}

/// A manager and a primary node on fixed addresses (so they can come back on them), and a
/// node `x` with the upstream list [primary, manager]. The manager's default policy is
/// `{"scan": "daily"}`.
struct Upstreams {
    dir: tempfile::TempDir,
    m_addr: String,
    p_addr: String,
    m_url: String,
    p_url: String,
    manager: Proc,
    primary: Proc,
    x: Proc,
}

async fn upstreams() -> Upstreams {
    let dir = tempfile::tempdir().unwrap();
    let m_addr = format!("127.0.0.1:{}", free_port());
    let p_addr = format!("127.0.0.1:{}", free_port());
    let m_url = format!("http://{m_addr}");
    let p_url = format!("http://{p_addr}");
    let manager = start_manager_on(&dir.path().join("m"), &m_addr, &[]);
    let primary = start_node_on(&dir.path().join("p"), &p_addr, &[&m_url], "", &[]);
    let x = start_node_toml(&dir.path().join("x"), &[&p_url, &m_url], "", &[]);
    let (status, v) = admin_call(
        &m_url,
        reqwest::Method::PUT,
        "/v1/admin/groups/default/policy",
        Some(json!({"scan": "daily"})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    Upstreams {
        dir,
        m_addr,
        p_addr,
        m_url,
        p_url,
        manager,
        primary,
        x,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_fails_over_to_the_next_upstream_and_fails_back_when_the_first_returns() {
    let u = upstreams().await;
    let client = reqwest::Client::new();
    let (a, a_data) = publish_new(&u.m_url, "a", 1).await;
    served(&u.x.url, &a, &a_data, "content through the primary").await;
    assert_eq!(
        upstream_up(&client, &u.x.url, &u.p_url).await,
        Some(1.0),
        "before: the primary is up"
    );
    // The second upstream was never called: it reads as not tried, not as down.
    assert_eq!(
        upstream_state(&client, &u.x.url, &u.m_url).await.as_deref(),
        Some("not_tried"),
        "before: the second upstream is not tried yet"
    );
    assert_eq!(
        upstream_up(&client, &u.x.url, &u.m_url).await,
        None,
        "before: no up/down for an upstream never called"
    );

    // Failover: the primary dies; new content arrives through the manager.
    let Upstreams {
        dir,
        p_addr,
        m_url,
        p_url,
        manager: _manager,
        primary,
        x,
        ..
    } = u;
    primary.kill9();
    let (b, b_data) = publish_new(&m_url, "b", 2).await;
    served(
        &x.url,
        &b,
        &b_data,
        "failover: content through the second upstream",
    )
    .await;
    assert_eq!(
        upstream_up(&client, &x.url, &p_url).await,
        Some(0.0),
        "failover: the primary is down"
    );
    assert_eq!(
        upstream_state(&client, &x.url, &p_url).await.as_deref(),
        Some("down"),
        "failover: the primary's state is down"
    );
    assert_eq!(
        upstream_up(&client, &x.url, &m_url).await,
        Some(1.0),
        "failover: the second upstream is up"
    );

    // Fail-back: the primary returns on its address; the node moves back to it.
    let _primary = start_node_on(&dir.path().join("p"), &p_addr, &[&m_url], "", &[]);
    let (xu, pu) = (x.url.clone(), p_url.clone());
    wait_for(40, "fail-back: the node moves back to its primary", || {
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
}

/// A node `x` whose upstreams (the primary and the manager) have both stopped, after it
/// mirrored two releases and fetched the first.
struct Outage {
    dir: tempfile::TempDir,
    m_addr: String,
    m_url: String,
    x: Proc,
    a: (String, Vec<u8>),
}

async fn outage() -> Outage {
    let u = upstreams().await;
    let a = publish_new(&u.m_url, "a", 1).await;
    let (b, _) = publish_new(&u.m_url, "b", 2).await;
    wait_mirrored(&u.x.url, &b).await;
    served(&u.x.url, &a.0, &a.1, "content before the outage").await;
    let Upstreams {
        dir,
        m_addr,
        m_url,
        manager,
        primary,
        x,
        ..
    } = u;
    assert_eq!(primary.stop(), Some(0));
    assert_eq!(manager.stop(), Some(0));
    Outage {
        dir,
        m_addr,
        m_url,
        x,
        a,
    }
}

/// Waits until `readyz` of `node` is 200 with `stale_since` set; returns the answer.
async fn stale(node: &str) -> Value {
    wait_for(40, "readyz reports stale", || {
        let u = node.to_string();
        async move {
            let (status, v) = get_json(&u, "/readyz").await;
            (status == 200 && v["stale_since"].is_string()).then_some(v)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_an_outage_readyz_stays_ready_and_says_since_when_the_node_is_stale() {
    let o = outage().await;
    let ready = stale(&o.x.url).await;
    assert_eq!(ready["ready"], true, "{ready}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_an_outage_a_node_keeps_serving_content_catalog_policies_and_settings() {
    let o = outage().await;
    stale(&o.x.url).await;
    served(&o.x.url, &o.a.0, &o.a.1, "content during the outage").await;
    let (_, cat) = get_json(&o.x.url, "/v1/catalog").await;
    assert_eq!(
        cat["items"].as_array().unwrap().len(),
        2,
        "the catalog: {cat}"
    );
    let (_, pol) = get_json(&o.x.url, "/v1/groups/default/policy").await;
    assert_eq!(pol["policy"], json!({"scan": "daily"}), "the policy: {pol}");
    let (status, v) = get_json(&o.x.url, "/v1/groups/default/settings").await;
    assert_eq!(status, 200, "the settings: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_an_outage_a_node_answers_heartbeats_from_what_it_knows() {
    let o = outage().await;
    stale(&o.x.url).await;
    let hb = heartbeat_ok(&o.x.url, json!({"client_id": "during-outage"})).await;
    assert_eq!(hb["group"], "default");
    assert_eq!(hb["next_heartbeat_s"], 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_outage_a_node_catches_up_and_relays_the_heartbeats_it_answered() {
    let o = outage().await;
    stale(&o.x.url).await;
    heartbeat_ok(&o.x.url, json!({"client_id": "during-outage"})).await;

    // The manager returns on its address (the primary stays down).
    let manager = start_manager_on(&o.dir.path().join("m"), &o.m_addr, &[]);
    let (c, c_data) = publish_new(&o.m_url, "c", 3).await;
    served(
        &o.x.url,
        &c,
        &c_data,
        "catch-up: content published after the outage",
    )
    .await;
    wait_registered(&manager.url, "during-outage", None).await;
    let xu = o.x.url.clone();
    wait_for(20, "catch-up: readyz fresh again", || {
        let u = xu.clone();
        async move {
            let (_, v) = get_json(&u, "/readyz").await;
            v["stale_since"].is_null().then_some(())
        }
    })
    .await;
}
