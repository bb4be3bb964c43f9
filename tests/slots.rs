//! End to end through real processes: download slots and admission control.
//! - heartbeats through a node carry a stable `download_slot` inside the window;
//! - a named content request (`X-Gup-Client-Id`) before its slot gets 429 with `Retry-After`
//!   and `not_before`; unnamed requests are not slot-checked; urgent items never wait;
//! - `serve.max_concurrent_downloads` answers 503 with a short `Retry-After` when full.

mod common;

use std::process::Command;

use common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_are_given_kept_and_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let client = reqwest::Client::new();
    let r = client
        .put(format!("{}/v1/admin/groups/default/settings", manager.url))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"randomization": {"window_s": 60}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let node = start_node(&dir.path().join("n"), &[&manager.url], &[]);
    let data = random_bytes(200_000, 77);
    let sha = sha256_hex(&data);
    let file = dir.path().join("defs.bin");
    std::fs::write(&file, &data).unwrap();
    let (code, out) = publish(&manager.url, &file, "defs", "1");
    assert_eq!(code, 0, "{out}");
    let (nu, s2) = (node.url.clone(), sha.clone());
    wait_for(20, "node mirrors", || {
        let (c, u, s) = (client.clone(), nu.clone(), s2.clone());
        async move { catalog_has(&c, &u, &s).await.then_some(()) }
    })
    .await;

    let heartbeat = |id: String| {
        let (c, u) = (client.clone(), node.url.clone());
        async move {
            let v: Value = c
                .post(format!("{u}/v1/heartbeat"))
                .json(&json!({"client_id": id, "catalog_revision": 0}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v
        }
    };
    // Find a client whose slot is a few seconds away.
    let mut waiting = None;
    for i in 0..60 {
        let id = format!("pc-{i}");
        let v = heartbeat(id.clone()).await;
        let slot = &v["download_slot"];
        assert_eq!(slot["catalog_revision"], 1, "{v}");
        assert_eq!(slot["window_s"], 60);
        if slot["delay_s"].as_u64().unwrap() >= 5 {
            waiting = Some((id, slot.clone()));
            break;
        }
    }
    let (id, slot) = waiting.expect("some slot at least 5 s away");
    // Stable at the next heartbeat.
    let again = heartbeat(id.clone()).await;
    assert_eq!(again["download_slot"]["not_before"], slot["not_before"]);

    let url = format!("{}/v1/content/{sha}", node.url);
    let r = client
        .get(&url)
        .header("x-gup-client-id", &id)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "before_slot");
    assert_eq!(v["not_before"], slot["not_before"]);
    assert_eq!(
        metric(&client, &node.url, "gup_slot_deferrals_total").await,
        1.0
    );
    // Unnamed requests are not slot-checked.
    let r = client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);

    // An urgent release goes out at once, even to a named client.
    let fix = random_bytes(10_000, 78);
    let fix_sha = sha256_hex(&fix);
    let fix_file = dir.path().join("fix.bin");
    std::fs::write(&fix_file, &fix).unwrap();
    let out = Command::new(gup())
        .args([
            "admin",
            "--manager",
            &manager.url,
            "--token",
            ADMIN_TOKEN,
            "publish",
        ])
        .arg(&fix_file)
        .args(["--name", "outbreak-fix", "--urgent"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (nu, s2) = (node.url.clone(), fix_sha.clone());
    wait_for(20, "node mirrors the urgent item", || {
        let (c, u, s) = (client.clone(), nu.clone(), s2.clone());
        async move { catalog_has(&c, &u, &s).await.then_some(()) }
    })
    .await;
    let r = client
        .get(format!("{}/v1/content/{fix_sha}", node.url))
        .header("x-gup-client-id", &id)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap()[..] == fix[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_downloads_answers_503_when_full() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    // One download at a time, at 1 MiB/s: a 3 MiB download holds the only place ~3 s.
    let node = start_node_toml(
        &dir.path().join("n"),
        &[&manager.url],
        "[serve]\nmax_concurrent_downloads = 1\nmax_bytes_per_sec = 1048576\n",
        &[],
    );
    let client = reqwest::Client::new();
    let data = random_bytes(3 << 20, 79);
    let sha = sha256_hex(&data);
    let file = dir.path().join("big.bin");
    std::fs::write(&file, &data).unwrap();
    let (code, out) = publish(&manager.url, &file, "big", "1");
    assert_eq!(code, 0, "{out}");
    let url = format!("{}/v1/content/{sha}", node.url);
    let u2 = url.clone();
    wait_for(20, "node has the blob", || {
        let (c, u) = (client.clone(), u2.clone());
        async move { (c.head(&u).send().await.ok()?.status() == 200).then_some(()) }
    })
    .await;
    let first = client.get(&url).send().await.unwrap();
    assert_eq!(first.status(), 200);
    let second = client.get(&url).send().await.unwrap();
    assert_eq!(second.status(), 503);
    let retry: u64 = second.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=5).contains(&retry), "{retry}");
    let v: Value = second.json().await.unwrap();
    assert_eq!(v["error"], "unavailable");
    // When the first finishes, the place is free again.
    assert!(first.bytes().await.unwrap()[..] == data[..]);
    let third = client.get(&url).send().await.unwrap();
    assert_eq!(third.status(), 200);
}
