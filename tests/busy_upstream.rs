//! End to end through real processes: a node obeys its upstream's `Retry-After`. A small
//! test server in front of the real manager passes `/v1/sync` on, has no `/v1/node/slot`
//! (an older upstream: the node prefetches at once), and answers the first blob request
//! 503 with `Retry-After: 4`:
//! - the node asks for the blob again no sooner than 4 s later (its prefetch retries every
//!   second otherwise), and then stores it;
//! - a client asking the node meanwhile gets 503 `upstream_busy` with a `Retry-After`, and
//!   its request does not reach the upstream.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use common::*;

const HOLD_S: u64 = 4;

#[derive(Clone)]
struct Busy {
    manager: String,
    /// When each blob request arrived.
    asked: Arc<Mutex<Vec<Instant>>>,
}

async fn sync(State(b): State<Busy>) -> Response {
    let resp = reqwest::Client::new()
        .get(format!("{}/v1/sync", b.manager))
        .bearer_auth(NODE_TOKEN)
        .send()
        .await
        .unwrap();
    let body = resp.bytes().await.unwrap();
    ([("content-type", "application/json")], body).into_response()
}

async fn content(State(b): State<Busy>, Path(sha): Path<String>) -> Response {
    let first = {
        let mut asked = b.asked.lock().unwrap();
        asked.push(Instant::now());
        asked.len() == 1
    };
    if first {
        return (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            [("retry-after", HOLD_S.to_string())],
            "busy",
        )
            .into_response();
    }
    let real = reqwest::get(format!("{}/v1/content/{sha}", b.manager))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    real.into_response()
}

async fn busy_upstream(manager: &str) -> (String, Arc<Mutex<Vec<Instant>>>) {
    let asked = Arc::new(Mutex::new(Vec::new()));
    let app = axum::Router::new()
        .route("/v1/sync", get(sync))
        .route("/v1/content/{sha}", get(content))
        .with_state(Busy {
            manager: manager.to_string(),
            asked: asked.clone(),
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), asked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_waits_out_its_upstreams_retry_after_and_tells_its_clients_so() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let data = random_bytes(100_000, 503);
    let sha = publish_and_wait(&manager.url, &[], "defs", "1", &data).await;
    let (upstream, asked) = busy_upstream(&manager.url).await;
    let node = start_node_toml(
        &dir.path().join("n"),
        &[&upstream],
        "mode = \"pull\"\n",
        &[],
    );
    let count = || asked.lock().unwrap().len();
    wait_for(30, "the node's first blob request", || async {
        (count() >= 1).then_some(())
    })
    .await;

    // Held: the client is told to come back, and nothing reaches the upstream.
    let r = reqwest::get(format!("{}/v1/content/{sha}", node.url))
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=HOLD_S).contains(&retry), "Retry-After {retry}");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "upstream_busy", "{v}");
    assert_eq!(
        count(),
        1,
        "the client's request did not reach the upstream"
    );

    // The prefetch comes back once the hold is over, and stores the blob.
    let body = wait_served(&node.url, &sha, 30, "the blob after the hold").await;
    assert_eq!(body, data);
    let asked = asked.lock().unwrap().clone();
    assert_eq!(
        asked.len(),
        2,
        "one refused request, one that brought the blob"
    );
    let gap = asked[1] - asked[0];
    assert!(
        gap >= Duration::from_secs(HOLD_S) - Duration::from_millis(50),
        "asked again after {gap:?}, before the {HOLD_S} s it was told"
    );
    node.stop();
    manager.stop();
}
