//! End to end through real processes: one node token per upstream (issue 21.7). A manager M
//! checks node token T1; node A mirrors M and checks its own node token T2 for the nodes
//! behind it. Node B lists A first and M second, each with its token: once in the config
//! file (`servers = ["A", { url = "M", token_file = ... }]` with `token = T2` as the default),
//! once on the command line (`--upstream-token-for A=T2`, `--upstream-token-file-for M=FILE`,
//! no default at all).
//! - both Bs mirror and serve through A;
//! - A stops: both fail over to M, which takes their sync, blob fetch and heartbeat batch
//!   (T1, where one token for the list would get 401 and a stale node), and serve new
//!   content;
//! - A comes back on its address: both move back to it (their push stream too) and serve
//!   what is published next.

mod common;

use std::path::Path;

use common::*;
use serde_json::json;

const T2: &str = "token-of-node-a";

/// Node A: mirrors `manager` with the manager's node token, checks T2 itself.
fn start_a(dir: &Path, addr: &str, manager: &str) -> Proc {
    let data = dir.join("a");
    let config = node_config(&data, "");
    Proc::start(
        &[
            "node",
            "--config",
            config.to_str().unwrap(),
            "--listen",
            addr,
            "--data-dir",
            data.to_str().unwrap(),
            "--upstream",
            manager,
            "--upstream-token",
            NODE_TOKEN,
            "--node-token",
            T2,
        ],
        data.with_extension("log"),
    )
}

/// A node B named `name` with `toml` in its `[upstream]` section and `flags`.
fn start_b(dir: &Path, name: &str, toml: &str, flags: &[&str]) -> Proc {
    let data = dir.join(name);
    let config = node_config(&data, toml);
    let mut args = vec![
        "node",
        "--config",
        config.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    args.extend_from_slice(flags);
    Proc::start(&args, data.with_extension("log"))
}

/// Publishes 500 kB as `name` and waits until each of `nodes` serves it, byte for byte.
async fn release_reaches(manager: &str, nodes: &[&Proc], name: &str, seed: u64, what: &str) {
    let data = random_bytes(500_000, seed);
    let sha = publish_and_wait(manager, &[], name, "1", &data).await;
    for node in nodes {
        let body = wait_served(&node.url, &sha, 40, &format!("{what}: {}", node.url)).await;
        assert!(
            body[..] == data[..],
            "{what}: wrong bytes from {}",
            node.url
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_fails_over_from_a_node_to_the_manager_and_back_each_with_its_own_token() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let m = manager.url.clone();
    let a_addr = format!("127.0.0.1:{}", free_port());
    let a_url = format!("http://{a_addr}");
    let a = start_a(dir.path(), &a_addr, &m);
    wait_ready(&a.url).await;
    // The two tokens differ: the manager refuses A's.
    let refused = reqwest::Client::new()
        .get(format!("{m}/v1/sync"))
        .bearer_auth(T2)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401, "the manager does not take T2");

    let m_token = dir.path().join("m.token");
    std::fs::write(&m_token, format!("{NODE_TOKEN}\n")).unwrap();
    let m_token = m_token.to_str().unwrap();
    let from_file = start_b(
        dir.path(),
        "b-file",
        &format!(
            "token = \"{T2}\"\nservers = [\n  \"{a_url}\",\n  {{ url = \"{m}\", token_file = \"{m_token}\" }},\n]\n"
        ),
        &[],
    );
    let a_for = format!("{a_url}={T2}");
    let m_for = format!("{m}/={m_token}");
    let from_flags = start_b(
        dir.path(),
        "b-flags",
        "",
        &[
            "--upstream",
            &a_url,
            "--upstream",
            &m,
            "--upstream-token-for",
            &a_for,
            "--upstream-token-file-for",
            &m_for,
        ],
    );
    let bs = [&from_file, &from_flags];
    let client = reqwest::Client::new();

    release_reaches(&m, &bs, "one", 71, "through A").await;
    for b in bs {
        assert_eq!(upstream_up(&client, &b.url, &a_url).await, Some(1.0));
        assert_eq!(
            upstream_state(&client, &b.url, &m).await.as_deref(),
            Some("not_tried"),
            "{}: the manager is not needed while A answers",
            b.url
        );
    }

    // A stops: the manager takes over, with its own token.
    assert_eq!(a.stop(), Some(0));
    release_reaches(&m, &bs, "two", 72, "failover to the manager").await;
    for (i, b) in bs.iter().enumerate() {
        assert_eq!(
            upstream_up(&client, &b.url, &m).await,
            Some(1.0),
            "{}",
            b.url
        );
        assert_eq!(
            upstream_up(&client, &b.url, &a_url).await,
            Some(0.0),
            "{}",
            b.url
        );
        // Heartbeat batches go to the manager too, and are taken.
        let id = format!("pc-{i}");
        heartbeat_ok(&b.url, json!({"client_id": id, "install_group": "default"})).await;
        wait_registered(&m, &id, None).await;
    }
    for b in bs {
        assert!(
            !b.log_text().contains("answered 401"),
            "no upstream refused a token: {}",
            b.log_text()
        );
    }

    // A returns on its address: both move back to it.
    let _a = start_a(dir.path(), &a_addr, &m);
    for b in bs {
        let (bu, au) = (b.url.clone(), a_url.clone());
        wait_for(40, "fail-back: the node moves back to A", || {
            let (c, bu, au) = (client.clone(), bu.clone(), au.clone());
            let log = b.log_text();
            async move {
                let back = log.contains(&format!("to={au}/ "))
                    || log
                        .matches(&format!("holding the upstream push stream server={au}/"))
                        .count()
                        >= 2;
                (back && upstream_up(&c, &bu, &au).await == Some(1.0)).then_some(())
            }
        })
        .await;
    }
    release_reaches(&m, &bs, "three", 73, "back through A").await;
}
