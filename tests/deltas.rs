//! End to end through real processes: deltas between versions on the servers (issue 22).
//! - the manager lists a delta from v1 on v2 in a new revision soon after v2 is published;
//!   the node prefetches it with the item and serves it at `/v1/content/{delta}`, and the
//!   delta applied to v1 rebuilds v2;
//! - with `deltas.from_versions = 1`, v3 lists a delta from v2 only; the node, which holds
//!   v1 and v3, answers `GET /v1/delta/{v1}/{v3}` with a delta it computes once however many
//!   ask at the same time (`gup_deltas_computed_total`), and a listed pair with the listed
//!   delta; the manager answers the same endpoint;
//! - 404 `no_delta` for a `from` the node does not hold, a `to` that is not an item of its
//!   catalog, and the same version twice; 400 `bad_digest` for a malformed digest;
//! - a manager started again with deltas on lists the deltas its current items lack.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use gup::core::delta;

/// `len` random bytes with `blocks` of their 4 KiB blocks rewritten (every `len / blocks`).
fn changed(old: &[u8], blocks: usize, seed: u64) -> Vec<u8> {
    let mut new = old.to_vec();
    let stride = old.len() / blocks;
    for k in 0..blocks {
        let at = (k * stride + 4096 * (k % 3)) / 4096 * 4096;
        new[at..at + 4096].copy_from_slice(&random_bytes(4096, seed + k as u64));
    }
    new
}

fn manager_config(dir: &Path, toml: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("manager.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

/// The deltas `base`'s current catalog lists on the item with bytes `sha`.
async fn deltas_of(client: &reqwest::Client, base: &str, sha: &str) -> Vec<serde_json::Value> {
    let Ok(r) = client.get(format!("{base}/v1/catalog")).send().await else {
        return Vec::new();
    };
    let v: serde_json::Value = r.json().await.unwrap_or_default();
    v["items"]
        .as_array()
        .and_then(|items| items.iter().find(|i| i["sha256"] == sha))
        .and_then(|i| i["deltas"].as_array().cloned())
        .unwrap_or_default()
}

/// Waits until `base` lists a delta on `to` from `from`; returns it.
async fn wait_listed(base: &str, from: &str, to: &str) -> serde_json::Value {
    let client = reqwest::Client::new();
    wait_for(60, &format!("{base} lists a delta from {from}"), || {
        let (c, b) = (client.clone(), base.to_string());
        async move {
            deltas_of(&c, &b, to)
                .await
                .into_iter()
                .find(|d| d["from_sha256"] == from)
        }
    })
    .await
}

/// `GET url`: (status, body bytes).
async fn get(client: &reqwest::Client, url: &str) -> (u16, Vec<u8>) {
    let r = client.get(url).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.bytes().await.unwrap().to_vec())
}

/// Applies `delta` to `old` into a buffer of `len` bytes.
fn rebuild(old: &[u8], delta_bytes: &[u8], len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    delta::apply(old, delta_bytes, &mut out).expect("the delta applies");
    out
}

/// `gup_delta_answers_total{answer}` of `base`.
async fn answers(client: &reqwest::Client, base: &str, answer: &str) -> f64 {
    metric(
        client,
        base,
        &format!("gup_delta_answers_total{{answer=\"{answer}\"}}"),
    )
    .await
}

const NODE_TOML: &str = "prefetch_window_s = 0\n[cache]\nmin_free_bytes = 0\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manager_lists_a_delta_the_node_prefetches_and_serves_and_it_rebuilds_v2() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let node = start_node_toml(&dir.path().join("n"), &[&manager.url], NODE_TOML, &[]);
    wait_ready(&node.url).await;
    let client = reqwest::Client::new();
    let v1 = random_bytes(1 << 20, 1);
    let v2 = changed(&v1, 4, 100);
    let s1 = publish_and_wait(&manager.url, &[&node.url], "defs", "1", &v1).await;
    let s2 = publish_and_wait(&manager.url, &[&node.url], "defs", "2", &v2).await;
    let listed = wait_listed(&manager.url, &s1, &s2).await;
    let sha = listed["sha256"].as_str().unwrap().to_string();
    let size = listed["size"].as_u64().unwrap();
    assert!(
        size < 4 * 4096 * 2,
        "a delta of {size} bytes for 16 KiB changed"
    );
    assert_eq!(
        metric(&client, &manager.url, "gup_deltas_listed_total").await,
        1.0
    );
    // The node mirrors the revision that lists it and prefetches it with the items: three
    // upstream fetches (v1, v2, the delta) before any client asks.
    wait_listed(&node.url, &s1, &s2).await;
    wait_for(60, "the node prefetches the delta", || {
        let (c, n) = (client.clone(), node.url.clone());
        async move { (metric(&c, &n, "gup_upstream_fetches_total").await >= 3.0).then_some(()) }
    })
    .await;
    let (status, bytes) = get(&client, &format!("{}/v1/content/{sha}", node.url)).await;
    assert_eq!(status, 200);
    assert_eq!(bytes.len() as u64, size);
    assert_eq!(sha256_hex(&bytes), sha, "the blob the catalog names");
    assert!(rebuild(&v1, &bytes, v2.len()) == v2, "v1 + delta = v2");
    assert_eq!(
        metric(&client, &node.url, "gup_upstream_fetches_total").await,
        3.0,
        "served from the store: prefetched"
    );
    // A range of it, like any blob.
    let r = client
        .get(format!("{}/v1/content/{sha}", node.url))
        .header("range", "bytes=0-9")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(&r.bytes().await.unwrap()[..], &bytes[..10]);
    assert_eq!(node.stop(), Some(0));
    assert_eq!(manager.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_holding_v1_and_v3_computes_the_edge_delta_once_and_refuses_what_it_cannot() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = manager_config(
        dir.path(),
        "[manager]\nretain_revisions = 10\n[deltas]\nfrom_versions = 1\n",
    );
    let manager = start_manager(&dir.path().join("m"), &["--config", cfg.to_str().unwrap()]);
    let node = start_node_toml(&dir.path().join("n"), &[&manager.url], NODE_TOML, &[]);
    wait_ready(&node.url).await;
    let client = reqwest::Client::new();
    let v1 = random_bytes(1 << 20, 7);
    let v2 = changed(&v1, 4, 200);
    let v3 = changed(&v2, 4, 300);
    let s1 = publish_and_wait(&manager.url, &[&node.url], "defs", "1", &v1).await;
    wait_served(&node.url, &s1, 30, "the node holds v1").await;
    let s2 = publish_and_wait(&manager.url, &[&node.url], "defs", "2", &v2).await;
    wait_listed(&manager.url, &s1, &s2).await;
    let s3 = publish_and_wait(&manager.url, &[&node.url], "defs", "3", &v3).await;
    let d23 = wait_listed(&manager.url, &s2, &s3).await;
    let on_v3 = deltas_of(&client, &manager.url, &s3).await;
    assert_eq!(
        on_v3.len(),
        1,
        "from_versions = 1: only v2 -> v3: {on_v3:?}"
    );
    wait_listed(&node.url, &s2, &s3).await;
    wait_served(&node.url, &s3, 30, "the node holds v3").await;

    // Asked twice at once: one computation, the same bytes for both, and they rebuild v3.
    let url = format!("{}/v1/delta/{s1}/{s3}", node.url);
    let (a, b) = tokio::join!(get(&client, &url), get(&client, &url));
    assert_eq!((a.0, b.0), (200, 200), "{}", String::from_utf8_lossy(&a.1));
    assert!(a.1 == b.1);
    assert!(a.1.len() < v3.len() / 10, "{} bytes", a.1.len());
    assert!(rebuild(&v1, &a.1, v3.len()) == v3, "v1 + edge delta = v3");
    assert_eq!(
        metric(&client, &node.url, "gup_deltas_computed_total").await,
        1.0
    );
    assert_eq!(answers(&client, &node.url, "edge").await, 2.0);
    // Asked again: from the store, not computed again; the ETag names the delta blob.
    let r = client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    assert_eq!(etag, format!("\"{}\"", sha256_hex(&a.1)));
    assert_eq!(
        metric(&client, &node.url, "gup_deltas_computed_total").await,
        1.0
    );
    let r = client
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    // A pair the catalog lists: the listed delta.
    let (status, listed) = get(&client, &format!("{}/v1/delta/{s2}/{s3}", node.url)).await;
    assert_eq!(status, 200);
    assert_eq!(sha256_hex(&listed), d23["sha256"].as_str().unwrap());
    assert!(rebuild(&v2, &listed, v3.len()) == v3);
    assert_eq!(answers(&client, &node.url, "listed").await, 1.0);
    // The manager answers the same endpoint (it holds every retained version).
    let (status, from_manager) = get(&client, &format!("{}/v1/delta/{s1}/{s3}", manager.url)).await;
    assert_eq!(status, 200);
    assert!(rebuild(&v1, &from_manager, v3.len()) == v3);

    // What it cannot: 404 no_delta, naming why.
    let absent = sha256_hex(b"a version nobody holds");
    for (path, why) in [
        (format!("/v1/delta/{absent}/{s3}"), "does not hold"),
        (format!("/v1/delta/{s1}/{absent}"), "not an item"),
        (
            format!("/v1/delta/{s1}/{}", d23["sha256"].as_str().unwrap()),
            "not an item",
        ),
        (format!("/v1/delta/{s3}/{s3}"), "same version"),
    ] {
        let (status, v) = get_json(&node.url, &path).await;
        assert_eq!(status, 404, "{path}: {v}");
        assert_eq!(v["error"], "no_delta", "{path}: {v}");
        assert!(v["message"].as_str().unwrap().contains(why), "{path}: {v}");
    }
    assert_eq!(answers(&client, &node.url, "none").await, 4.0);
    // Malformed digests: 400, as on /v1/content.
    for path in [
        format!("/v1/delta/xyz/{s3}"),
        format!("/v1/delta/{s1}/{}", s3.to_uppercase()),
    ] {
        let (status, v) = get_json(&node.url, &path).await;
        assert_eq!(status, 400, "{path}: {v}");
        assert_eq!(v["error"], "bad_digest", "{path}: {v}");
    }
    // The node never fetched anything for all this: v1, v2, v3 and the listed deltas only.
    assert!(metric(&client, &node.url, "gup_upstream_fetches_total").await <= 5.0);
    assert_eq!(node.stop(), Some(0));
    assert_eq!(manager.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manager_started_with_deltas_on_lists_what_its_current_items_lack() {
    let dir = tempfile::tempdir().unwrap();
    let mdir = dir.path().join("m");
    let off = manager_config(&dir.path().join("off"), "[deltas]\nfrom_versions = 0\n");
    let manager = start_manager(&mdir, &["--config", off.to_str().unwrap()]);
    let client = reqwest::Client::new();
    let v1 = random_bytes(512 << 10, 11);
    let v2 = changed(&v1, 2, 400);
    let s1 = publish_and_wait(&manager.url, &[], "defs", "1", &v1).await;
    let s2 = publish_and_wait(&manager.url, &[], "defs", "2", &v2).await;
    assert!(deltas_of(&client, &manager.url, &s2).await.is_empty());
    assert_eq!(manager.stop(), Some(0));
    // Started again on the defaults (from_versions = 3): v2 gets its delta from v1.
    let manager = start_manager(&mdir, &[]);
    let listed = wait_listed(&manager.url, &s1, &s2).await;
    let sha = listed["sha256"].as_str().unwrap();
    let (status, bytes) = get(&client, &format!("{}/v1/content/{sha}", manager.url)).await;
    assert_eq!(status, 200);
    assert!(rebuild(&v1, &bytes, v2.len()) == v2);
    assert_eq!(manager.stop(), Some(0));
}
