//! End to end through real processes: the node as a cache.
//! - one upstream fetch per blob however many clients ask at once, with the bytes streamed to
//!   every waiting client while they arrive (first byte out before the fetch is done);
//! - RFC 9110 §14.2 Range on a blob that is still arriving (206 with Content-Range);
//! - a digest that does not match cuts every response fed from the fetch (no complete 200 of
//!   wrong bytes) and the next upstream is used (a tiny hostile upstream flips one byte).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_one_fetch_streamed_while_it_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let data = random_bytes(64 << 20, 11);
    let sha = sha256_hex(&data);
    let file = dir.path().join("big.bin");
    std::fs::write(&file, &data).unwrap();
    let (code, out) = publish(&manager.url, &file, "engine", "1");
    assert_eq!(code, 0, "{out}");

    // A slow WAN (16 MiB/s: about 4 s for the blob) and no prefetch: the first client's
    // request starts the fetch.
    let node = start_node_toml(
        &dir.path().join("n"),
        &[&manager.url],
        "max_bytes_per_sec = 16777216\n[cache]\nprefetch = false\n",
        &[],
    );
    let client = reqwest::Client::new();
    let (nu, s2) = (node.url.clone(), sha.clone());
    wait_for(20, "node mirrors the catalog", || {
        let (c, u, s) = (client.clone(), nu.clone(), s2.clone());
        async move { catalog_has(&c, &u, &s).await.then_some(()) }
    })
    .await;
    assert_eq!(
        metric(&client, &node.url, "gup_upstream_fetches_total").await,
        0.0
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
        assert_eq!(n, data.len());
        assert_eq!(digest, sha);
    }
    assert_eq!(
        metric(&client, &node.url, "gup_upstream_fetches_total").await,
        1.0
    );
    let at_first = upstream_bytes_at_first_byte.lock().await.unwrap();
    assert!(
        at_first < data.len() as f64,
        "the first client byte left the node after the whole fetch ({at_first} bytes upstream)"
    );
    // Cached now: a range is served from the store.
    let r = client
        .get(&url)
        .header("range", "bytes=-10")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(&r.bytes().await.unwrap()[..], &data[data.len() - 10..]);
    assert_eq!(
        metric(&client, &node.url, "gup_upstream_fetches_total").await,
        1.0
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
    let sha = sha256_hex(&data);
    let file = dir.path().join("defs.bin");
    std::fs::write(&file, &data).unwrap();
    let (code, out) = publish(&manager.url, &file, "defs", "1");
    assert_eq!(code, 0, "{out}");
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
    let (nu, s2) = (node.url.clone(), sha.clone());
    wait_for(20, "node mirrors the catalog", || {
        let (c, u, s) = (client.clone(), nu.clone(), s2.clone());
        async move { catalog_has(&c, &u, &s).await.then_some(()) }
    })
    .await;

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
    assert!(body[..] == data[..]);
    assert!(metric(&client, &node.url, "gup_upstream_fetches_total").await >= 2.0);
    assert!(
        node.log_text().contains("digest mismatch"),
        "{}",
        node.log_text()
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_keeps_the_store_within_max_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    // 8 MiB of disk, three retained revisions, five 3 MiB releases.
    let node = start_node_toml(
        &dir.path().join("n"),
        &[&manager.url],
        "[cache]\nmax_bytes = 8388608\nretain_revisions = 3\n",
        &[],
    );
    let client = reqwest::Client::new();
    let mut shas = Vec::new();
    for v in 1..=5u64 {
        let data = random_bytes(3 << 20, 1000 + 2 * v);
        let sha = sha256_hex(&data);
        let file = dir.path().join(format!("defs-{v}.bin"));
        std::fs::write(&file, &data).unwrap();
        let (code, out) = publish(&manager.url, &file, "defs", &v.to_string());
        assert_eq!(code, 0, "{out}");
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
    let nu = node.url.clone();
    wait_for(30, "the store shrinks within max_bytes", || {
        let (c, u) = (client.clone(), nu.clone());
        async move { (metric(&c, &u, "gup_cache_bytes").await <= 8388608.0).then_some(()) }
    })
    .await;
    // The current release is served; one that left the retained revisions is not in the
    // catalog any more.
    let r = client
        .get(format!("{}/v1/content/{}", node.url, shas[4]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .get(format!("{}/v1/content/{}", node.url, shas[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(node.log_text().contains("evicted"), "{}", node.log_text());
}
