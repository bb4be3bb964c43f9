//! End to end through real processes: bad input on every endpoint of manager and node.
//! Malformed JSON, wrong types, missing fields, oversized values, traversal attempts in
//! paths, invalid digests, ranges and query values each get a 4xx with the contract's JSON
//! error body (`{"error", "message"}`), and the process carries on. A node has no admin API.

mod common;

use common::*;
use reqwest::Method;
use serde_json::Value;

async fn expect_4xx(
    c: &reqwest::Client,
    method: Method,
    url: &str,
    body: Option<&str>,
    token: Option<&str>,
) {
    let mut req = c.request(method.clone(), url);
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    assert!(
        (400..500).contains(&status),
        "{method} {url} {body:?}: {status}"
    );
    let v: Value = r
        .json()
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: not a JSON error body: {e}"));
    assert!(
        v["error"].is_string() && v["message"].is_string(),
        "{method} {url}: {v}"
    );
}

const BAD_BODIES: &[&str] = &[
    "{not json",
    "[]",
    "\"just a string\"",
    "{\"client_id\": 42}",
    "{}",
    "{\"client_id\": \"\"}",
    "null",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_answers_bad_input_with_a_json_4xx() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let node = start_node(&dir.path().join("n"), &[&manager.url], &[]);
    let c = reqwest::Client::new();
    let long = "x".repeat(300);
    let m = &manager.url;

    for base in [&manager.url, &node.url] {
        for path in ["/v1/heartbeat", "/v1/events", "/v1/applications"] {
            for body in BAD_BODIES {
                expect_4xx(&c, Method::POST, &format!("{base}{path}"), Some(body), None).await;
            }
            let oversized = format!("{{\"client_id\": \"{long}\"}}");
            expect_4xx(
                &c,
                Method::POST,
                &format!("{base}{path}"),
                Some(&oversized),
                None,
            )
            .await;
        }
        for body in BAD_BODIES {
            expect_4xx(
                &c,
                Method::POST,
                &format!("{base}/v1/node/heartbeats"),
                Some(body),
                Some(NODE_TOKEN),
            )
            .await;
            expect_4xx(
                &c,
                Method::POST,
                &format!("{base}/v1/node/events"),
                Some(body),
                Some(NODE_TOKEN),
            )
            .await;
        }
        for path in [
            "/v1/content/..%2F..%2Fetc%2Fpasswd",
            "/v1/content/../../etc/passwd",
            "/v1/content/ABCDEF",
            "/v1/content/%00",
            "/v1/groups/..%2F..%2Fetc/settings",
            "/v1/groups/nope/policy",
            "/v1/groups/default/settings?location=%FF%FE",
            "/v1/nope",
            "/v1/stream?client_id=a&client_id=b&x=%ZZ",
        ] {
            expect_4xx(&c, Method::GET, &format!("{base}{path}"), None, None).await;
        }
        expect_4xx(
            &c,
            Method::DELETE,
            &format!("{base}/v1/catalog"),
            None,
            None,
        )
        .await;
        // Unsatisfiable range on nothing in the catalog: still a 4xx JSON.
        let r = c
            .get(format!("{base}/v1/content/{}", sha256_hex(b"x")))
            .header("range", "bytes=999999-")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        // The node exposes no admin API at all.
        if base == &node.url {
            expect_4xx(
                &c,
                Method::GET,
                &format!("{base}/v1/admin/clients"),
                None,
                Some(ADMIN_TOKEN),
            )
            .await;
            expect_4xx(
                &c,
                Method::POST,
                &format!("{base}/v1/admin/content?name=x"),
                Some("{}"),
                Some(ADMIN_TOKEN),
            )
            .await;
        }
    }

    // Admin endpoints: auth first, then bodies, types, names and query values.
    expect_4xx(
        &c,
        Method::GET,
        &format!("{m}/v1/admin/clients"),
        None,
        None,
    )
    .await;
    expect_4xx(
        &c,
        Method::GET,
        &format!("{m}/v1/admin/clients"),
        None,
        Some("wrong"),
    )
    .await;
    let t = Some(ADMIN_TOKEN);
    // (`{}` is a valid, empty change of the site settings.)
    for body in BAD_BODIES.iter().filter(|b| **b != "{}").chain(
        [
            "{\"application_learning\": \"yes\"}",
            "{\"notification_damper_s\": -1}",
        ]
        .iter(),
    ) {
        expect_4xx(
            &c,
            Method::PUT,
            &format!("{m}/v1/admin/site"),
            Some(body),
            t,
        )
        .await;
    }
    for body in [
        "{not json",
        "{\"parent\": 7}",
        "{\"parent\": \"missing\"}",
        "{\"parent\": \"default\", \"x\": 1}",
    ] {
        expect_4xx(
            &c,
            Method::PUT,
            &format!("{m}/v1/admin/groups/g1"),
            Some(body),
            t,
        )
        .await;
    }
    for name in ["..", "a%2Fb", "a%20b", &long] {
        expect_4xx(
            &c,
            Method::PUT,
            &format!("{m}/v1/admin/groups/{name}"),
            Some("{\"parent\": \"default\"}"),
            t,
        )
        .await;
    }
    for body in [
        "{not json",
        "{\"mode\": 3}",
        "{\"heartbeat_interval_s\": \"fast\"}",
        "{\"randomization\": []}",
        "{\"management_servers\": [{\"url\": 1}]}",
    ] {
        expect_4xx(
            &c,
            Method::PUT,
            &format!("{m}/v1/admin/groups/default/settings"),
            Some(body),
            t,
        )
        .await;
    }
    expect_4xx(
        &c,
        Method::PUT,
        &format!("{m}/v1/admin/groups/nope/settings"),
        Some("{}"),
        t,
    )
    .await;
    expect_4xx(
        &c,
        Method::PUT,
        &format!("{m}/v1/admin/groups/default/policy"),
        Some("{not json"),
        t,
    )
    .await;
    expect_4xx(
        &c,
        Method::PUT,
        &format!("{m}/v1/admin/groups/nope/policy"),
        Some("{}"),
        t,
    )
    .await;
    expect_4xx(
        &c,
        Method::POST,
        &format!("{m}/v1/admin/clients/nobody/move"),
        Some("{\"group\": \"default\"}"),
        t,
    )
    .await;
    expect_4xx(
        &c,
        Method::POST,
        &format!("{m}/v1/admin/clients/nobody/move"),
        Some("{\"grp\": 1}"),
        t,
    )
    .await;
    expect_4xx(
        &c,
        Method::DELETE,
        &format!("{m}/v1/admin/clients/nobody"),
        None,
        t,
    )
    .await;
    expect_4xx(
        &c,
        Method::PUT,
        &format!("{m}/v1/admin/users/alice"),
        Some("{\"group\": \"missing\"}"),
        t,
    )
    .await;
    expect_4xx(
        &c,
        Method::DELETE,
        &format!("{m}/v1/admin/groups/default"),
        None,
        t,
    )
    .await;
    expect_4xx(
        &c,
        Method::DELETE,
        &format!("{m}/v1/admin/groups/missing"),
        None,
        t,
    )
    .await;
    expect_4xx(
        &c,
        Method::DELETE,
        &format!("{m}/v1/admin/content/missing"),
        None,
        t,
    )
    .await;
    for q in [
        "limit=abc",
        "limit=0",
        "limit=10001",
        "since=yesterday",
        "after=-1",
    ] {
        expect_4xx(
            &c,
            Method::GET,
            &format!("{m}/v1/admin/events?{q}"),
            None,
            t,
        )
        .await;
    }
    for q in [
        "",
        "name=",
        "name=a%2Fb",
        "name=ok&version=..",
        "name=ok&urgent=maybe",
    ] {
        expect_4xx(
            &c,
            Method::POST,
            &format!("{m}/v1/admin/content?{q}"),
            Some("bytes"),
            t,
        )
        .await;
    }

    // Both processes are unaffected.
    for base in [&manager.url, &node.url] {
        let r = c.get(format!("{base}/healthz")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
}
