//! End to end through real processes: the node as a cache.
//! - one upstream fetch per blob however many clients ask at once, with the bytes streamed to
//!   every waiting client while they arrive (first byte out before the fetch is done);
//! - a cached blob's range is served from the store without a new fetch;
//! - a digest that does not match cuts every response fed from the fetch (no complete 200 of
//!   wrong bytes) and the next upstream is used (a tiny hostile upstream flips one byte);
//! - eviction keeps the store within `cache.max_bytes`, and a release that left the retained
//!   revisions is 404 `not_in_catalog`.

mod common;

use std::sync::Arc;
use std::time::Instant;

use common::*;
use futures_util::StreamExt;

/// A manager and a node that fetches on demand only (no prefetch), over a WAN of
/// `bytes_per_sec`.
fn on_demand_node(dir: &std::path::Path, bytes_per_sec: u64) -> (Proc, Proc) {
    let manager = start_manager(&dir.join("m"), &[]);
    let node = start_node_toml(
        &dir.join("n"),
        &[&manager.url],
        &format!("max_bytes_per_sec = {bytes_per_sec}\n[cache]\nprefetch = false\n"),
        &[],
    );
    (manager, node)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_at_once_cause_one_upstream_fetch_and_get_the_bytes_while_it_arrives() {
    let dir = tempfile::tempdir().unwrap();
    // A slow WAN (16 MiB/s: about 4 s for the blob): the first client's request starts the
    // fetch.
    let (manager, node) = on_demand_node(dir.path(), 16 << 20);
    let data = random_bytes(64 << 20, 11);
    let sha = publish_and_wait(&manager.url, &[&node.url], "engine", "1", &data).await;
    let client = reqwest::Client::new();
    assert_eq!(
        metric(&client, &node.url, "gup_upstream_fetches_total").await,
        0.0,
        "before: nothing fetched"
    );

    let url = format!("{}/v1/content/{sha}", node.url);
    let upstream_bytes_at_first_byte = Arc::new(tokio::sync::Mutex::new(None::<f64>));
    let mut tasks = Vec::new();
    for i in 0..50 {
        let (c, url, node_url) = (client.clone(), url.clone(), node.url.clone());
        let first = upstream_bytes_at_first_byte.clone();
        tasks.push(tokio::spawn(async move {
            let resp = c.get(&url).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            let mut body = resp.bytes_stream();
            let mut hasher = sha2::Sha256::default();
            let mut n = 0usize;
            let mut first_at = None;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.expect("body cut");
                if first_at.is_none() {
                    first_at = Some(Instant::now());
                    if i == 0 {
                        let bytes = metric(&c, &node_url, "gup_upstream_bytes_total").await;
                        *first.lock().await = Some(bytes);
                    }
                }
                sha2::Digest::update(&mut hasher, &chunk);
                n += chunk.len();
            }
            (n, hex::encode(sha2::Digest::finalize(hasher)))
        }));
    }
    for t in tasks {
        let (n, digest) = t.await.unwrap();
        assert_eq!(n, data.len(), "every client got every byte");
        assert_eq!(digest, sha, "every client got the right bytes");
    }
    assert_eq!(
        metric(&client, &node.url, "gup_upstream_fetches_total").await,
        1.0,
        "one upstream fetch for the fifty"
    );
    let at_first = upstream_bytes_at_first_byte.lock().await.unwrap();
    assert!(
        at_first < data.len() as f64,
        "the first client byte left the node after the whole fetch ({at_first} bytes upstream)"
    );
    // Metrics by source: the first client (at least) streamed the blob while it arrived, and
    // the bytes by source add up to the bytes served.
    let source = |s: &str| format!("gup_served_source_bytes_total{{source=\"{s}\"}}");
    let arriving = metric(&client, &node.url, &source("arriving")).await;
    assert!(arriving > 0.0, "bytes served from the arriving blob");
    let mut by_source = arriving;
    for s in ["memory", "disk"] {
        by_source += metric(&client, &node.url, &source(s)).await;
    }
    assert_eq!(
        by_source,
        (50 * data.len()) as f64,
        "every byte has a source"
    );
    assert_eq!(
        metric(&client, &node.url, "gup_served_bytes_total").await,
        by_source
    );
    assert!(
        metric(
            &client,
            &node.url,
            "gup_served_responses_total{source=\"arriving\"}"
        )
        .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_blobs_range_is_served_from_the_store_without_a_new_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let (manager, node) = on_demand_node(dir.path(), 64 << 20);
    let data = random_bytes(1 << 20, 12);
    let sha = publish_and_wait(&manager.url, &[&node.url], "engine", "1", &data).await;
    let body = wait_served(&node.url, &sha, 20, "the node fetches the blob").await;
    assert!(body == data);
    let client = reqwest::Client::new();
    assert_eq!(
        metric(&client, &node.url, "gup_upstream_fetches_total").await,
        1.0
    );
    let r = client
        .get(format!("{}/v1/content/{sha}", node.url))
        .header("range", "bytes=-10")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(&r.bytes().await.unwrap()[..], &data[data.len() - 10..]);
    assert_eq!(
        metric(&client, &node.url, "gup_upstream_fetches_total").await,
        1.0,
        "no new fetch for the range"
    );
    // The range came from the store: memory (the hot cache) or disk, never "arriving".
    let responses = |s: &str| format!("gup_served_responses_total{{source=\"{s}\"}}");
    let stored = metric(&client, &node.url, &responses("memory")).await
        + metric(&client, &node.url, &responses("disk")).await;
    assert!(
        stored >= 1.0,
        "the range is counted as served from the store"
    );
    // Each request's time is in the histogram of its route template.
    let content = "gup_request_duration_seconds_count{route=\"/v1/content/{sha256}\"}";
    assert!(metric(&client, &node.url, content).await >= 2.0);
    // The node has synced (seconds since, from 0); a manager never mirrors (-1).
    let age = metric(&client, &node.url, "gup_mirror_age_seconds").await;
    assert!(
        (0.0..120.0).contains(&age),
        "seconds since the last sync: {age}"
    );
    assert_eq!(
        metric(&client, &manager.url, "gup_mirror_age_seconds").await,
        -1.0
    );
}

/// A hostile upstream: proxies the manager but flips one byte of every blob body.
async fn corrupting_upstream(manager: String) -> String {
    use axum::extract::{Path, State};
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/v1/content/{sha}",
            get(
                |State(m): State<String>, Path(sha): Path<String>| async move {
                    let mut bytes = reqwest::get(format!("{m}/v1/content/{sha}"))
                        .await
                        .unwrap()
                        .bytes()
                        .await
                        .unwrap()
                        .to_vec();
                    let mid = bytes.len() / 2;
                    bytes[mid] ^= 0xff;
                    bytes
                },
            ),
        )
        .route(
            "/v1/sync",
            get(|State(m): State<String>| async move {
                reqwest::Client::new()
                    .get(format!("{m}/v1/sync"))
                    .bearer_auth(NODE_TOKEN)
                    .send()
                    .await
                    .unwrap()
                    .bytes()
                    .await
                    .unwrap()
            }),
        )
        .with_state(manager);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_bytes_are_never_served_complete_and_the_next_upstream_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let data = random_bytes(8 << 20, 5);
    let sha = publish_and_wait(&manager.url, &[], "defs", "1", &data).await;
    let bad = corrupting_upstream(manager.url.clone()).await;

    // The corrupting upstream has the highest priority; pull mode (it has no stream).
    let node = start_node_toml(
        &dir.path().join("n"),
        &[&bad, &manager.url],
        "mode = \"pull\"
[cache]
prefetch = false
",
        &[],
    );
    let client = reqwest::Client::new();
    wait_mirrored(&node.url, &sha).await;

    let url = format!("{}/v1/content/{sha}", node.url);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (c, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let Ok(resp) = c.get(&url).send().await else {
                return None;
            };
            if resp.status() != 200 {
                return None;
            }
            // A cut body is an error here; a complete one must be the right bytes.
            resp.bytes().await.ok().map(|b| b.to_vec())
        }));
    }
    for t in tasks {
        if let Some(body) = t.await.unwrap() {
            assert_eq!(body.len(), data.len());
            assert!(
                body == data,
                "a client received a complete response with wrong bytes"
            );
        }
    }
    // The next upstream was used: the node has the right blob now.
    let body = client
        .get(&url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(
        body[..] == data[..],
        "the right bytes from the next upstream"
    );
    assert!(
        metric(&client, &node.url, "gup_upstream_fetches_total").await >= 2.0,
        "fetched again"
    );
    assert!(
        node.log_text().contains("digest mismatch"),
        "{}",
        node.log_text()
    );
}

/// A node with 8 MiB of disk and three retained revisions, after five 3 MiB releases of
/// `defs`; returns the releases' digests, oldest first.
async fn five_releases(dir: &std::path::Path) -> (Proc, Proc, Vec<String>) {
    let manager = start_manager(&dir.join("m"), &[]);
    let node = start_node_toml(
        &dir.join("n"),
        &[&manager.url],
        "[cache]\nmax_bytes = 8388608\nretain_revisions = 3\n",
        &[],
    );
    let client = reqwest::Client::new();
    let mut shas = Vec::new();
    for v in 1..=5u64 {
        let data = random_bytes(3 << 20, 1000 + 2 * v);
        let sha = publish_and_wait(&manager.url, &[&node.url], "defs", &v.to_string(), &data).await;
        let (nu, s2) = (node.url.clone(), sha.clone());
        wait_for(30, "the node stores the new release", || {
            let (c, u, s) = (client.clone(), nu.clone(), s2.clone());
            async move {
                let r = c.head(format!("{u}/v1/content/{s}")).send().await.ok()?;
                (r.status() == 200
                    && metric(&c, &u, "gup_upstream_fetches_total").await >= v as f64)
                    .then_some(())
            }
        })
        .await;
        shas.push(sha);
    }
    (manager, node, shas)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_keeps_the_store_within_max_bytes_and_serves_the_current_release() {
    let dir = tempfile::tempdir().unwrap();
    let (_manager, node, shas) = five_releases(dir.path()).await;
    let client = reqwest::Client::new();
    let nu = node.url.clone();
    wait_for(30, "the store shrinks within max_bytes", || {
        let (c, u) = (client.clone(), nu.clone());
        async move { (metric(&c, &u, "gup_cache_bytes").await <= 8388608.0).then_some(()) }
    })
    .await;
    assert!(node.log_text().contains("evicted"), "{}", node.log_text());
    let r = client
        .get(format!("{}/v1/content/{}", node.url, shas[4]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the current release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_left_the_retained_revisions_is_404_not_in_catalog() {
    let dir = tempfile::tempdir().unwrap();
    let (_manager, node, shas) = five_releases(dir.path()).await;
    let r = reqwest::get(format!("{}/v1/content/{}", node.url, shas[0]))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "not_in_catalog", "{v}");
}
