//! End to end through real processes: hostile upstreams. A small test server proxies the
//! manager but misbehaves in one way; it is the node's first upstream, the real manager its
//! second. Each misbehaviour is refused cleanly, the next upstream is used, and nothing wrong
//! is ever served:
//! - truncated blob bodies, a slow drip (idle timeout), a redirect;
//! - a catalog with a duplicate name, an invalid digest, or too many items.

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
    Truncate,
    Drip,
    Redirect,
    DuplicateName,
    InvalidDigest,
    HugeCatalog,
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
    let items = v["catalog"]["items"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    match h.how {
        Misbehave::DuplicateName if !items.is_empty() => {
            let mut twice = items.clone();
            twice.push(items[0].clone());
            v["catalog"]["items"] = json!(twice);
            v["catalog"]["revision"] = json!(1000);
        }
        Misbehave::InvalidDigest if !items.is_empty() => {
            v["catalog"]["items"][0]["sha256"] = json!("NOT-A-DIGEST");
            v["catalog"]["revision"] = json!(1000);
        }
        Misbehave::HugeCatalog => {
            let many: Vec<Value> = (0..100_001)
                .map(|i| json!({"name": format!("n{i}"), "version": "1", "sha256": sha256_hex(&(i as u64).to_le_bytes()), "size": 1, "published_at": "2026-11-24T10:00:00Z", "urgent": false}))
                .collect();
            v["catalog"]["items"] = json!(many);
            v["catalog"]["revision"] = json!(1000);
        }
        _ => {}
    }
    axum::Json(v).into_response()
}

async fn content(State(h): State<Hostile>, Path(sha): Path<String>) -> Response {
    let url = format!("{}/v1/content/{sha}", h.manager);
    if h.how == Misbehave::Redirect {
        return (axum::http::StatusCode::FOUND, [("location", url)]).into_response();
    }
    let bytes = reqwest::get(&url).await.unwrap().bytes().await.unwrap();
    let len = bytes.len();
    let stream: futures_util::stream::BoxStream<'static, Result<bytes::Bytes, std::io::Error>> =
        match h.how {
            Misbehave::Truncate => {
                let half = bytes.slice(..len / 2);
                Box::pin(futures_util::stream::iter(vec![
                    Ok(half),
                    Err(std::io::Error::other("cut")),
                ]))
            }
            Misbehave::Drip => Box::pin(futures_util::stream::unfold(0usize, move |i| {
                let bytes = bytes.clone();
                async move {
                    if i >= bytes.len() {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    Some((Ok(bytes.slice(i..i + 1)), i + 1))
                }
            })),
            _ => Box::pin(futures_util::stream::iter(vec![Ok(bytes)])),
        };
    Response::builder()
        .header("content-length", len)
        .body(Body::from_stream(stream))
        .unwrap()
}

async fn hostile(manager: &str, how: Misbehave) -> String {
    let app = axum::Router::new()
        .route("/v1/sync", get(sync))
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

async fn check(how: Misbehave) {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let data = random_bytes(300_000, 31);
    let sha = publish_and_wait(&manager.url, &[], "defs", "1", &data).await;
    let bad = hostile(&manager.url, how).await;
    let node = start_node_toml(
        &dir.path().join("n"),
        &[&bad, &manager.url],
        "mode = \"pull\"\nidle_timeout_s = 1\n[cache]\nprefetch = false\n",
        &[],
    );
    let client = reqwest::Client::new();
    // The good catalog (from the next upstream, or what the hostile one passed on intact).
    wait_mirrored(&node.url, &sha).await;
    // Never a complete 200 with wrong bytes; a cut response may happen while the bad fetch
    // fails, then the next upstream serves the right bytes.
    let mut good = false;
    for _ in 0..10 {
        let Ok(r) = client
            .get(format!("{}/v1/content/{sha}", node.url))
            .send()
            .await
        else {
            continue;
        };
        if r.status() != 200 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        }
        if let Ok(body) = r.bytes().await {
            assert_eq!(
                body.len(),
                data.len(),
                "{how:?}: a complete response has every byte"
            );
            assert!(
                body[..] == data[..],
                "{how:?}: a complete response has the right bytes"
            );
            good = true;
            break;
        }
    }
    assert!(good, "{how:?}: the next upstream served the blob");
    let cat: Value = client
        .get(format!("{}/v1/catalog", node.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cat["items"].as_array().unwrap().len(), 1, "{how:?}: {cat}");
    assert!(
        cat["revision"].as_u64().unwrap() < 1000,
        "{how:?}: the hostile catalog was refused"
    );
    let log = node.log_text();
    assert!(
        log.contains("upstream failed; trying the next one"),
        "{how:?}:\n{log}"
    );
    assert_eq!(
        reqwest::get(format!("{}/healthz", node.url))
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_body() {
    check(Misbehave::Truncate).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_drip() {
    check(Misbehave::Drip).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect() {
    check(Misbehave::Redirect).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_names_in_the_catalog() {
    check(Misbehave::DuplicateName).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_digest_in_the_catalog() {
    check(Misbehave::InvalidDigest).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_catalog() {
    check(Misbehave::HugeCatalog).await;
}
