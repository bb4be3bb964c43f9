//! RFC 9110 behaviours of `GET|HEAD /v1/content/{sha256}` on a node, for a blob already
//! cached and for one still arriving from upstream:
//! - §8.8.3 strong `ETag` carrying the SHA-256; `Accept-Ranges: bytes`;
//!   `Cache-Control: public, max-age=31536000, immutable`;
//! - §13.1.2 `If-None-Match` (weak comparison, lists, `*`) -> 304 with the ETag, no body;
//! - §14.2 a single `Range` -> 206 with `Content-Range`; §14.1.2 suffix ranges, including one
//!   longer than the blob; an open-ended range; a last position past the end is clamped;
//! - §15.5.17 an unsatisfiable range -> 416 with `Content-Range: bytes */len`;
//! - several ranges -> the whole blob (200), which §14.2 allows;
//! - §13.1.5 `If-Range`: a matching strong ETag applies the range, another ETag or a date
//!   gives the whole blob;
//! - §9.3.2 `HEAD`: the headers of GET, no body;
//! - a syntactically invalid `Range` is ignored (200).

mod common;

use common::*;

struct Fixture {
    _dir: tempfile::TempDir,
    _manager: Proc,
    node: Proc,
    data: Vec<u8>,
    sha: String,
}

/// A manager with one published blob and a node that has mirrored the catalog; with
/// `slow_wan` the node fetches on demand at 4 MiB/s, so requests meet the blob mid-arrival.
async fn fixture(slow_wan: bool) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let data = random_bytes(if slow_wan { 16 << 20 } else { 300_000 }, 21);
    let sha = publish_and_wait(&manager.url, &[], "blob", "1", &data).await;
    let toml = if slow_wan {
        "max_bytes_per_sec = 4194304\n[cache]\nprefetch = false\n"
    } else {
        ""
    };
    let node = start_node_toml(&dir.path().join("n"), &[&manager.url], toml, &[]);
    wait_mirrored(&node.url, &sha).await;
    Fixture {
        _dir: dir,
        _manager: manager,
        node,
        data,
        sha,
    }
}

async fn get(f: &Fixture, method: reqwest::Method, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req =
        reqwest::Client::new().request(method, format!("{}/v1/content/{}", f.node.url, f.sha));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

async fn check_ranges(f: &Fixture) {
    let len = f.data.len();
    let etag = format!("\"{}\"", f.sha);

    let r = get(f, reqwest::Method::GET, &[("range", "bytes=0-99")]).await;
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes 0-99/{len}").as_str()
    );
    assert_eq!(r.headers()["etag"], etag.as_str());
    assert_eq!(&r.bytes().await.unwrap()[..], &f.data[..100]);

    let r = get(f, reqwest::Method::GET, &[("range", "bytes=1000-")]).await;
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap().len(), len - 1000);

    let r = get(f, reqwest::Method::GET, &[("range", "bytes=-500")]).await;
    assert_eq!(r.status(), 206);
    assert_eq!(&r.bytes().await.unwrap()[..], &f.data[len - 500..]);

    let big_suffix = format!("bytes=-{}", len * 2);
    let r = get(f, reqwest::Method::GET, &[("range", &big_suffix)]).await;
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes 0-{}/{len}", len - 1).as_str()
    );

    let past_end = format!("bytes={}-{}", len - 10, len + 1000);
    let r = get(f, reqwest::Method::GET, &[("range", &past_end)]).await;
    assert_eq!(r.status(), 206);
    assert_eq!(&r.bytes().await.unwrap()[..], &f.data[len - 10..]);

    let unsatisfiable = format!("bytes={len}-");
    let r = get(f, reqwest::Method::GET, &[("range", &unsatisfiable)]).await;
    assert_eq!(r.status(), 416);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes */{len}").as_str()
    );
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "range_not_satisfiable");

    let r = get(f, reqwest::Method::GET, &[("range", "bytes=0-1,5-6")]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().len(), len);

    let r = get(f, reqwest::Method::GET, &[("range", "lines=1-2")]).await;
    assert_eq!(r.status(), 200);

    let r = get(
        f,
        reqwest::Method::GET,
        &[("range", "bytes=10-19"), ("if-range", &etag)],
    )
    .await;
    assert_eq!(r.status(), 206);
    assert_eq!(&r.bytes().await.unwrap()[..], &f.data[10..20]);
    let r = get(
        f,
        reqwest::Method::GET,
        &[("range", "bytes=10-19"), ("if-range", "\"other\"")],
    )
    .await;
    assert_eq!(r.status(), 200);
    let r = get(
        f,
        reqwest::Method::GET,
        &[
            ("range", "bytes=10-19"),
            ("if-range", "Tue, 24 Nov 2026 08:00:00 GMT"),
        ],
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap()[..] == f.data[..]);
}

async fn check_conditionals_and_head(f: &Fixture) {
    let etag = format!("\"{}\"", f.sha);
    for inm in [
        etag.clone(),
        format!("W/{etag}"),
        format!("\"x\", {etag}"),
        "*".to_string(),
    ] {
        let r = get(f, reqwest::Method::GET, &[("if-none-match", &inm)]).await;
        assert_eq!(r.status(), 304, "{inm}");
        assert_eq!(r.headers()["etag"], etag.as_str());
        assert!(r.bytes().await.unwrap().is_empty());
    }
    let r = get(f, reqwest::Method::GET, &[("if-none-match", "\"other\"")]).await;
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap()[..] == f.data[..]);

    let r = get(f, reqwest::Method::HEAD, &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-length"],
        f.data.len().to_string().as_str()
    );
    assert_eq!(r.headers()["etag"], etag.as_str());
    assert_eq!(r.headers()["accept-ranges"], "bytes");
    assert_eq!(
        r.headers()["cache-control"],
        "public, max-age=31536000, immutable"
    );
    assert!(r.bytes().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_blob() {
    let f = fixture(false).await;
    // Make sure it is cached first.
    let r = get(&f, reqwest::Method::GET, &[]).await;
    assert!(r.bytes().await.unwrap()[..] == f.data[..]);
    check_conditionals_and_head(&f).await;
    check_ranges(&f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_still_arriving() {
    let f = fixture(true).await;
    let client = reqwest::Client::new();
    // A conditional request for the blob needs no byte of it: 304 before any fetch.
    let etag = format!("\"{}\"", f.sha);
    let r = get(&f, reqwest::Method::GET, &[("if-none-match", &etag)]).await;
    assert_eq!(r.status(), 304);
    assert_eq!(
        metric(&client, &f.node.url, "gup_upstream_fetches_total").await,
        0.0
    );
    // HEAD starts the fetch and answers from what is known; ranges are answered while the
    // fetch runs (16 MiB at 4 MiB/s).
    let r = get(&f, reqwest::Method::HEAD, &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-length"],
        f.data.len().to_string().as_str()
    );
    let arriving = metric(&client, &f.node.url, "gup_upstream_bytes_total").await;
    assert!(arriving < f.data.len() as f64, "the blob is still arriving");
    let r = get(&f, reqwest::Method::GET, &[("range", "bytes=0-99")]).await;
    assert_eq!(r.status(), 206);
    assert_eq!(&r.bytes().await.unwrap()[..], &f.data[..100]);
    assert!(
        metric(&client, &f.node.url, "gup_upstream_bytes_total").await < f.data.len() as f64,
        "a range at the start was served before the fetch ended"
    );
    check_ranges(&f).await;
    assert_eq!(
        metric(&client, &f.node.url, "gup_upstream_fetches_total").await,
        1.0
    );
}
