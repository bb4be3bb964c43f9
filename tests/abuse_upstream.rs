//! End to end through real processes: a hostile or broken upstream cannot grow a node
//! without bound or keep it from serving. A small test server (127.0.0.1:0) passes the real
//! manager's snapshot on but misbehaves in one way:
//! - a push stream of `data:` lines that never ends an event, or of bytes without a newline:
//!   the node refuses the stream (64 KiB bounds), stays small and keeps serving;
//! - a blob body that runs past its declared size: cut at the size and refused, the right
//!   bytes come from the next upstream, and the temp file never grows past the bound;
//! - a snapshot with a 100,000-deep group chain, or a policy over 1 MiB: refused, and the
//!   node mirrors the next upstream instead.
//!
//! The node's peak memory is read from /proc (VmHWM). Loopback only, every load bounded in
//! time.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use common::*;
use serde_json::{json, Value};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Misbehave {
    EndlessEvent,
    NoNewline,
    OverlongBlob,
    DeepChain,
    BigPolicy,
}

#[derive(Clone)]
struct Hostile {
    manager: String,
    how: Misbehave,
}

async fn sync(State(h): State<Hostile>) -> Response {
    let mut v: Value = reqwest::Client::new()
        .get(format!("{}/v1/sync", h.manager))
        .bearer_auth(NODE_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    match h.how {
        Misbehave::DeepChain => {
            let groups = v["directory"]["groups"].as_object_mut().unwrap();
            for i in 1..=100_000u32 {
                let parent = if i == 1 {
                    "default".to_string()
                } else {
                    format!("g{}", i - 1)
                };
                groups.insert(format!("g{i}"), json!({"parent": parent}));
            }
        }
        Misbehave::BigPolicy => {
            let groups = v["directory"]["groups"].as_object_mut().unwrap();
            groups.insert(
                "huge".into(),
                json!({"parent": "default", "policy": {"serial": 7, "document": {"blob": "x".repeat(2 << 20)}}}),
            );
        }
        _ => {}
    }
    axum::Json(v).into_response()
}

/// A push stream that never ends an event, or never ends a line, as fast as it can send.
async fn stream(State(h): State<Hostile>) -> Response {
    let chunk = match h.how {
        Misbehave::EndlessEvent => bytes::Bytes::from(format!("data: {}\n", "y".repeat(1000))),
        _ => bytes::Bytes::from(vec![b'x'; 16 << 10]),
    };
    let endless = futures_util::stream::repeat_with(move || Ok::<_, std::io::Error>(chunk.clone()));
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(endless))
        .unwrap()
}

/// The real blob, then bytes without end.
async fn content(State(h): State<Hostile>, Path(sha): Path<String>) -> Response {
    let real = reqwest::get(format!("{}/v1/content/{sha}", h.manager))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let garbage = bytes::Bytes::from(vec![0u8; 64 << 10]);
    let tail = futures_util::stream::repeat_with(move || Ok::<_, std::io::Error>(garbage.clone()));
    let body = futures_util::stream::once(async move { Ok::<_, std::io::Error>(real) });
    use futures_util::StreamExt;
    Body::from_stream(body.chain(tail)).into_response()
}

async fn hostile(manager: &str, how: Misbehave) -> String {
    let app = axum::Router::new()
        .route("/v1/sync", get(sync))
        .route("/v1/stream", get(stream))
        .route("/v1/content/{sha}", get(content))
        .with_state(Hostile {
            manager: manager.to_string(),
            how,
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// The peak resident memory of process `pid`, in bytes.
fn peak_memory(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// A node whose only upstream is hostile in the push stream: it refuses the stream, keeps
/// serving, and stays within 256 MiB while the stream pours.
async fn a_pouring_push_stream_is_refused(how: Misbehave, refusal: &str) {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let bad = hostile(&manager.url, how).await;
    let node = start_node(&dir.path().join("n"), &[&bad], &[]);
    wait_ready(&node.url).await;
    let log = node.log.clone();
    let refusal = refusal.to_string();
    wait_for(30, "the node refuses the push stream", || {
        let (log, refusal) = (log.clone(), refusal.clone());
        async move {
            std::fs::read_to_string(log)
                .ok()?
                .contains(&refusal)
                .then_some(())
        }
    })
    .await;
    // Let it pour (and be refused again after each backoff) for a few seconds.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (status, v) = post_json(&node.url, "/v1/heartbeat", json!({"client_id": "pc"})).await;
    assert_eq!(status, 200, "the node keeps serving: {v}");
    let peak = peak_memory(node.pid());
    assert!(peak < 256 << 20, "peak memory {peak} bytes");
    assert_eq!(node.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_stream_whose_event_never_ends_is_refused() {
    a_pouring_push_stream_is_refused(Misbehave::EndlessEvent, "an event of more than").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_stream_without_a_newline_is_refused() {
    a_pouring_push_stream_is_refused(Misbehave::NoNewline, "a line of more than").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_longer_than_declared_is_cut_and_fetched_from_the_next_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let data = random_bytes(1000, 71);
    let sha = publish_and_wait(&manager.url, &[], "defs", "1", &data).await;
    let bad = hostile(&manager.url, Misbehave::OverlongBlob).await;
    let n_dir = dir.path().join("n");
    // Pull mode: the hostile push stream must not mark the hostile server down first.
    let toml = "mode = \"pull\"\n[cache]\nprefetch = false\n";
    let node = start_node_toml(&n_dir, &[&bad, &manager.url], toml, &[]);
    wait_ready(&node.url).await;
    let client = reqwest::Client::new();
    let (c, u, s) = (client.clone(), node.url.clone(), sha.clone());
    wait_for(20, "the node mirrors the catalog", || {
        let (c, u, s) = (c.clone(), u.clone(), s.clone());
        async move { catalog_has(&c, &u, &s).await.then_some(()) }
    })
    .await;
    // A response fed from the hostile fetch is cut when the body runs long (never complete
    // with wrong bytes); the fetch from the next upstream then serves the right ones.
    let url = format!("{}/v1/content/{sha}", node.url);
    let body = wait_for(20, "the right bytes from the next upstream", || {
        let (c, url) = (client.clone(), url.clone());
        async move {
            let r = c.get(&url).send().await.ok()?;
            (r.status() == 200).then_some(())?;
            r.bytes().await.ok()
        }
    })
    .await;
    assert!(body[..] == data[..], "the right bytes");
    let log = std::fs::read_to_string(&node.log).unwrap();
    assert!(
        log.contains("size mismatch"),
        "the long body was refused:\n{log}"
    );
    assert_eq!(
        std::fs::read_dir(n_dir.join("tmp")).unwrap().count(),
        0,
        "no temp file is left"
    );
    assert_eq!(node.stop(), Some(0));
}

/// A node whose first upstream sends a snapshot it must refuse mirrors the second instead.
async fn a_bad_snapshot_is_refused_and_the_next_upstream_mirrored(how: Misbehave, group: &str) {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let bad = hostile(&manager.url, how).await;
    let node = start_node(&dir.path().join("n"), &[&bad, &manager.url], &[]);
    wait_ready(&node.url).await;
    let r = reqwest::get(format!("{}/v1/groups/{group}/settings", node.url))
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "the hostile directory was not mirrored");
    let r = reqwest::get(format!("{}/v1/groups/default/settings", node.url))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(peak_memory(node.pid()) < 512 << 20);
    assert_eq!(node.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_deep_group_chain_is_refused() {
    a_bad_snapshot_is_refused_and_the_next_upstream_mirrored(Misbehave::DeepChain, "g1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_over_its_bound_from_upstream_is_refused() {
    a_bad_snapshot_is_refused_and_the_next_upstream_mirrored(Misbehave::BigPolicy, "huge").await;
}
