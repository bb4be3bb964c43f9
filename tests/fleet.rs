//! Fleet visibility end to end (issue 19, points 1 to 3), through real processes: a manager,
//! node A behind it, node B behind A, an agent behind each node.
//! - `GET /v1/admin/nodes` lists both nodes with their reports; A reports directly (`via`
//!   null), B through A (`via` = A's id); `gup admin nodes` shows the same.
//! - Client records say which node each client is behind (the nearest one) and when it sent
//!   its last heartbeat (`sent_at`, no later than `last_seen`); `client list --group` filters.
//! - Stopping B makes it overdue (no report for three of its 1 s sync intervals) and raises
//!   exactly one `node_overdue` notification, not repeated while it stays down.

mod common;
use common::*;

use reqwest::Method;

fn node_toml(name: &str) -> String {
    format!("sync_interval_s = 1\n[node]\nname = \"{name}\"\n")
}

/// The nodes of `GET /v1/admin/nodes`.
async fn nodes(manager: &str) -> Vec<serde_json::Value> {
    let (status, v) = admin_call(manager, Method::GET, "/v1/admin/nodes", None).await;
    assert_eq!(status, 200, "{v}");
    v["nodes"].as_array().cloned().unwrap_or_default()
}

fn named<'a>(nodes: &'a [serde_json::Value], name: &str) -> Option<&'a serde_json::Value> {
    nodes.iter().find(|n| n["name"] == name)
}

async fn node_overdue_notices(manager: &str) -> Vec<serde_json::Value> {
    let (status, v) = admin_call(manager, Method::GET, "/v1/admin/notifications", None).await;
    assert_eq!(status, 200, "{v}");
    v["notifications"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|n| n["kind"] == "node_overdue")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manager_sees_a_chain_of_nodes_and_the_one_that_stops() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let a = start_node_toml(
        &dir.path().join("a"),
        &[&manager.url],
        &node_toml("branch-a"),
        &[],
    );
    wait_ready(&a.url).await;
    let b = start_node_toml(
        &dir.path().join("b"),
        &[&a.url],
        &node_toml("branch-b"),
        &[],
    );
    wait_ready(&b.url).await;
    let _agent_a = start_agent(
        &dir.path().join("pa"),
        &[&a.url],
        "default",
        &["--client-id", "pc-a"],
    );
    let _agent_b = start_agent(
        &dir.path().join("pb"),
        &[&b.url],
        "default",
        &["--client-id", "pc-b"],
    );

    // Both nodes are listed, B through A.
    let listed = wait_for(30, "both nodes listed", || async {
        let all = nodes(&manager.url).await;
        (named(&all, "branch-a").is_some() && named(&all, "branch-b").is_some()).then_some(all)
    })
    .await;
    let na = named(&listed, "branch-a").unwrap().clone();
    let nb = named(&listed, "branch-b").unwrap().clone();
    let a_id = na["node_id"].as_str().unwrap().to_string();
    let b_id = nb["node_id"].as_str().unwrap().to_string();
    assert!(a_id.starts_with("node-") && b_id.starts_with("node-") && a_id != b_id);
    assert!(na["via"].is_null(), "{na}");
    assert_eq!(nb["via"], a_id.as_str(), "{nb}");
    for n in [&na, &nb] {
        assert_eq!(n["version"], env!("CARGO_PKG_VERSION"), "{n}");
        assert_eq!(n["sync_interval_s"], 1, "{n}");
        assert_eq!(n["overdue"], false, "{n}");
        assert_eq!(n["revisions_behind"], 0, "{n}");
        assert!(n["cache_budget_bytes"].as_u64().unwrap() > 0, "{n}");
        for key in [
            "catalog_revision",
            "cache_bytes",
            "blobs",
            "wan_bytes",
            "lan_bytes",
            "events_queued",
            "clients_last_interval",
            "uptime_s",
        ] {
            assert!(n[key].is_u64(), "{key} in {n}");
        }
        assert!(n["received_at"].is_string(), "{n}");
        assert!(n["stale_since"].is_null(), "{n}");
    }
    assert_eq!(nb["upstream"], format!("{}/", a.url), "{nb}");

    // Each client is behind its nearest node, with the time it sent its last heartbeat.
    let clients = wait_for(30, "both clients relayed", || async {
        let (_, v) = admin_call(&manager.url, Method::GET, "/v1/admin/clients", None).await;
        let list = v["clients"].as_array().cloned().unwrap_or_default();
        let via = |id: &str| {
            list.iter()
                .find(|c| c["client_id"] == id)
                .map(|c| c["via"].clone())
        };
        (via("pc-a") == Some(a_id.clone().into()) && via("pc-b") == Some(b_id.clone().into()))
            .then_some(list)
    })
    .await;
    for c in &clients {
        let sent: chrono::DateTime<chrono::Utc> = c["sent_at"].as_str().unwrap().parse().unwrap();
        let seen: chrono::DateTime<chrono::Utc> = c["last_seen"].as_str().unwrap().parse().unwrap();
        assert!(sent <= seen, "{c}");
        assert_eq!(c["os"], "windows", "{c}");
        assert!(c["client_version"].is_string(), "{c}");
    }
    let (code, out) = admin_cli(&manager.url, &["client", "list", "--group", "default"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("pc-a") && out.contains(&b_id), "{out}");
    let (code, out) = admin_cli(&manager.url, &["client", "list", "--group", "nowhere"]);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("pc-a"), "{out}");

    let (code, out) = admin_cli(&manager.url, &["nodes"]);
    assert_eq!(code, 0, "{out}");
    let row = |name: &str| {
        out.lines()
            .find(|l| l.contains(name))
            .unwrap_or("")
            .to_string()
    };
    assert!(row("branch-a").contains(&a_id), "{out}");
    assert!(row("branch-b").contains(&a_id), "B is listed via A: {out}");
    assert!(row("branch-b").trim_end().ends_with("no"), "{out}");

    // B stops: overdue, one notification.
    b.stop();
    wait_for(30, "branch-b overdue", || async {
        let all = nodes(&manager.url).await;
        (named(&all, "branch-b")?["overdue"] == true).then_some(())
    })
    .await;
    let notices = wait_for(10, "one node_overdue notification", || async {
        let n = node_overdue_notices(&manager.url).await;
        (!n.is_empty()).then_some(n)
    })
    .await;
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert_eq!(notices[0]["node_id"], b_id.as_str());
    // A keeps reporting; by the time it reported three more times B has been checked several
    // times, and staying down raised nothing new.
    let before = named(&nodes(&manager.url).await, "branch-a").unwrap()["received_at"].clone();
    let mut seen = vec![before];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while seen.len() < 4 {
        assert!(std::time::Instant::now() < deadline, "A stopped reporting");
        let at = named(&nodes(&manager.url).await, "branch-a").unwrap()["received_at"].clone();
        if !seen.contains(&at) {
            seen.push(at);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let all = nodes(&manager.url).await;
    assert_eq!(named(&all, "branch-a").unwrap()["overdue"], false);
    assert_eq!(node_overdue_notices(&manager.url).await.len(), 1);
    let (code, out) = admin_cli(&manager.url, &["nodes"]);
    assert_eq!(code, 0, "{out}");
    let b_row = out.lines().find(|l| l.contains("branch-b")).unwrap_or("");
    assert!(b_row.trim_end().ends_with("yes"), "{out}");
    let (code, json) = admin_cli(&manager.url, &["nodes", "--json"]);
    assert_eq!(code, 0, "{json}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["nodes"].as_array().unwrap().len(), 2);
}
