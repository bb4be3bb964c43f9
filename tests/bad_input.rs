//! End to end through real processes: bad input on every endpoint of manager and node. Every
//! case states the status and the `error` code of the contract's JSON body
//! (`{"error": code, "message": why}`, with a message), and the process carries on:
//! - client endpoints of the manager and of a node, the same answers on both: malformed JSON,
//!   wrong types, missing fields and unknown enum values -> 400 `bad_json`; an empty or
//!   oversized `client_id` -> 400 `bad_request`; applications while learning is off -> 403
//!   `learning_off`;
//! - their paths, queries and methods: a digest that is not 64 lower-case hex -> 400
//!   `bad_digest`, one not in the catalog -> 404 `not_in_catalog` (with a `Range` too); an
//!   unknown group or endpoint -> 404 `not_found`; a bad location -> 400 `bad_request`; a
//!   malformed or repeated query key -> 400 `bad_query`; a wrong method -> 405
//!   `method_not_allowed` with `Allow`;
//! - node-token batch endpoints (`/v1/node/*`, `/v1/sync`): 401 `unauthorized` without the
//!   node token or with another token, 400 `bad_json` for bad bodies;
//! - a node has no admin API (404 `not_found`);
//! - admin auth: 401 `unauthorized` without a token, with a wrong one, or with the node token;
//! - admin bodies and names: `bad_json` for what does not parse, `bad_setting` for settings,
//!   site keys and group names, 404 `not_found` for unknown groups, clients and content, 409
//!   `conflict` for the root group;
//! - admin query strings (events, settings locations, applications, backup): `bad_query` for what
//!   does not parse, `bad_request` or `bad_setting` for values out of range;
//! - publish query strings (`POST /v1/admin/content`): `bad_request` for a missing or invalid
//!   name, version or `urgent`, `bad_query` for a repeated key, 409 `conflict` for other bytes
//!   under a published version;
//! - bodies over the limit (1 MiB; 16 MiB on node-token endpoints) -> 413 `body_too_large`,
//!   bodies cut short of their `Content-Length` -> 400 `body_incomplete`;
//! - a range outside a blob -> 416 `range_not_satisfiable` on both roles.

mod common;

use std::io::{Read, Write};

use common::*;
use reqwest::Method;
use serde_json::Value;

/// One bad request and the answer it must get. In `path` or `body`, `{long}` stands for 300
/// `x`s (longer than any name or id may be) and `{unpublished}` for [`UNPUBLISHED`].
struct Case {
    method: &'static str,
    path: &'static str,
    body: Option<&'static str>,
    token: Option<&'static str>,
    status: u16,
    code: &'static str,
}

const fn case(
    method: &'static str,
    path: &'static str,
    body: Option<&'static str>,
    token: Option<&'static str>,
    status: u16,
    code: &'static str,
) -> Case {
    Case {
        method,
        path,
        body,
        token,
        status,
        code,
    }
}

const ADMIN: Option<&str> = Some(ADMIN_TOKEN);
const NODE: Option<&str> = Some(NODE_TOKEN);
/// SHA-256 of `x`: well formed, never published.
const UNPUBLISHED: &str = "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881";

/// Sends `method base path` with `body` (as JSON) and a bearer `token`; (status, headers,
/// JSON body or Null).
async fn send(
    base: &str,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    token: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = reqwest::Client::new().request(
        Method::from_bytes(method.as_bytes()).unwrap(),
        format!("{base}{path}"),
    );
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b);
    }
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.unwrap_or_default();
    (
        status,
        headers,
        serde_json::from_str(&text).unwrap_or(Value::Null),
    )
}

/// Whether an answer is the expected error: the status, the code, and some message.
fn is_error(status: u16, v: &Value, want_status: u16, want_code: &str) -> bool {
    status == want_status
        && v["error"] == want_code
        && v["message"].as_str().is_some_and(|m| !m.is_empty())
}

/// Runs every case against `base`, then checks that `base` is still healthy. Reports every
/// case that answered otherwise, not only the first.
async fn expect(base: &str, cases: &[Case]) {
    let long = "x".repeat(300);
    let mut wrong = Vec::new();
    for c in cases {
        let path = c
            .path
            .replace("{long}", &long)
            .replace("{unpublished}", UNPUBLISHED);
        let body = c.body.map(|b| b.replace("{long}", &long).into_bytes());
        let (status, _, v) = send(base, c.method, &path, body, c.token).await;
        if !is_error(status, &v, c.status, c.code) {
            wrong.push(format!(
                "{} {} body={:?} token={:?}: want {} {}, got {status} {v}",
                c.method, c.path, c.body, c.token, c.status, c.code
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} cases on {base} answered otherwise:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );
    let (status, _) = get_json(base, "/healthz").await;
    assert_eq!(status, 200, "{base} carries on after bad input");
}

/// Bodies sent to the client endpoints of both roles.
#[rustfmt::skip]
const CLIENT_BODIES: &[Case] = &[
    case("POST", "/v1/heartbeat", Some("{not json"), None, 400, "bad_json"),
    case("POST", "/v1/heartbeat", Some("[]"), None, 400, "bad_json"),
    case("POST", "/v1/heartbeat", Some("\"just a string\""), None, 400, "bad_json"),
    case("POST", "/v1/heartbeat", Some("null"), None, 400, "bad_json"),
    case("POST", "/v1/heartbeat", Some("{\"client_id\": 42}"), None, 400, "bad_json"),
    // `client_id` is required: missing it is 400.
    case("POST", "/v1/heartbeat", Some("{}"), None, 400, "bad_json"),
    case("POST", "/v1/heartbeat", Some("{\"install_group\": \"x\"}"), None, 400, "bad_json"),
    case("POST", "/v1/heartbeat", Some("{\"client_id\": \"\"}"), None, 400, "bad_request"),
    case("POST", "/v1/heartbeat", Some("{\"client_id\": \"{long}\"}"), None, 400, "bad_request"),
    case("POST", "/v1/heartbeat", Some("{\"client_id\": \"x\", \"os\": \"plan9\"}"), None, 400, "bad_json"),
    case("POST", "/v1/heartbeat", Some("{\"client_id\": \"x\", \"mode\": \"robot\"}"), None, 400, "bad_json"),
    case("POST", "/v1/heartbeat", Some("{\"client_id\": \"x\", \"catalog_revision\": -1}"), None, 400, "bad_json"),
    case("POST", "/v1/events", Some("{not json"), None, 400, "bad_json"),
    case("POST", "/v1/events", Some("[]"), None, 400, "bad_json"),
    case("POST", "/v1/events", Some("\"just a string\""), None, 400, "bad_json"),
    case("POST", "/v1/events", Some("null"), None, 400, "bad_json"),
    case("POST", "/v1/events", Some("{\"client_id\": 42}"), None, 400, "bad_json"),
    case("POST", "/v1/events", Some("{}"), None, 400, "bad_json"),
    // Without `events` the body does not parse before `client_id` is looked at.
    case("POST", "/v1/events", Some("{\"client_id\": \"\"}"), None, 400, "bad_json"),
    case("POST", "/v1/events", Some("{\"client_id\": \"{long}\"}"), None, 400, "bad_json"),
    case("POST", "/v1/events", Some("{\"client_id\": \"\", \"events\": []}"), None, 400, "bad_request"),
    case("POST", "/v1/events", Some("{\"client_id\": \"{long}\", \"events\": []}"), None, 400, "bad_request"),
    case("POST", "/v1/applications", Some("{not json"), None, 400, "bad_json"),
    case("POST", "/v1/applications", Some("[]"), None, 400, "bad_json"),
    case("POST", "/v1/applications", Some("\"just a string\""), None, 400, "bad_json"),
    case("POST", "/v1/applications", Some("null"), None, 400, "bad_json"),
    case("POST", "/v1/applications", Some("{\"client_id\": 42}"), None, 400, "bad_json"),
    case("POST", "/v1/applications", Some("{}"), None, 400, "bad_json"),
    case("POST", "/v1/applications", Some("{\"client_id\": \"\"}"), None, 400, "bad_json"),
    case("POST", "/v1/applications", Some("{\"client_id\": \"{long}\"}"), None, 400, "bad_json"),
    case("POST", "/v1/applications", Some("{\"client_id\": \"\", \"applications\": []}"), None, 400, "bad_request"),
    case("POST", "/v1/applications", Some("{\"client_id\": \"{long}\", \"applications\": []}"), None, 400, "bad_request"),
    // A valid upload while the site's application learning is off (the default).
    case("POST", "/v1/applications", Some("{\"client_id\": \"x\", \"applications\": [{\"name\": \"a\"}]}"), None, 403, "learning_off"),
];

/// Paths, queries and methods on the client endpoints of both roles.
#[rustfmt::skip]
const CLIENT_PATHS: &[Case] = &[
    case("GET", "/v1/content/..%2F..%2Fetc%2Fpasswd", None, None, 400, "bad_digest"),
    // The client resolves the dot segments: this asks for `/etc/passwd`.
    case("GET", "/v1/content/../../etc/passwd", None, None, 404, "not_found"),
    case("GET", "/v1/content/ABCDEF", None, None, 400, "bad_digest"),
    case("GET", "/v1/content/%00", None, None, 400, "bad_digest"),
    case("GET", "/v1/content/{unpublished}", None, None, 404, "not_in_catalog"),
    case("GET", "/v1/groups/..%2F..%2Fetc/settings", None, None, 400, "bad_request"),
    case("GET", "/v1/groups/nope/settings", None, None, 404, "not_found"),
    case("GET", "/v1/groups/nope/policy", None, None, 404, "not_found"),
    case("GET", "/v1/groups/default/settings?location=%FF%FE", None, None, 400, "bad_request"),
    case("GET", "/v1/groups/default/settings?location=a&location=b", None, None, 400, "bad_query"),
    case("GET", "/v1/stream?client_id=a&client_id=b&x=%ZZ", None, None, 400, "bad_query"),
    case("GET", "/v1/nope", None, None, 404, "not_found"),
    case("GET", "/nope", None, None, 404, "not_found"),
    case("DELETE", "/v1/catalog", None, None, 405, "method_not_allowed"),
    case("GET", "/v1/heartbeat", None, None, 405, "method_not_allowed"),
    case("POST", "/v1/content/{unpublished}", None, None, 405, "method_not_allowed"),
];

/// The endpoints nodes call on their upstream with the node token, on both roles.
#[rustfmt::skip]
const NODE_TOKEN_ENDPOINTS: &[Case] = &[
    case("POST", "/v1/node/heartbeats", Some("{\"heartbeats\": []}"), None, 401, "unauthorized"),
    case("POST", "/v1/node/heartbeats", Some("{\"heartbeats\": []}"), Some("wrong"), 401, "unauthorized"),
    case("POST", "/v1/node/heartbeats", Some("{\"heartbeats\": []}"), ADMIN, 401, "unauthorized"),
    case("POST", "/v1/node/events", Some("{\"uploads\": []}"), None, 401, "unauthorized"),
    case("POST", "/v1/node/events", Some("{\"uploads\": []}"), Some("wrong"), 401, "unauthorized"),
    case("GET", "/v1/sync", None, None, 401, "unauthorized"),
    case("GET", "/v1/sync", None, Some("wrong"), 401, "unauthorized"),
    case("GET", "/v1/sync", None, ADMIN, 401, "unauthorized"),
    case("POST", "/v1/node/heartbeats", Some("{not json"), NODE, 400, "bad_json"),
    case("POST", "/v1/node/heartbeats", Some("[]"), NODE, 400, "bad_json"),
    case("POST", "/v1/node/heartbeats", Some("\"just a string\""), NODE, 400, "bad_json"),
    case("POST", "/v1/node/heartbeats", Some("null"), NODE, 400, "bad_json"),
    case("POST", "/v1/node/heartbeats", Some("{\"client_id\": 42}"), NODE, 400, "bad_json"),
    case("POST", "/v1/node/heartbeats", Some("{}"), NODE, 400, "bad_json"),
    case("POST", "/v1/node/heartbeats", Some("{\"client_id\": \"\"}"), NODE, 400, "bad_json"),
    case("POST", "/v1/node/events", Some("{not json"), NODE, 400, "bad_json"),
    case("POST", "/v1/node/events", Some("[]"), NODE, 400, "bad_json"),
    case("POST", "/v1/node/events", Some("\"just a string\""), NODE, 400, "bad_json"),
    case("POST", "/v1/node/events", Some("null"), NODE, 400, "bad_json"),
    case("POST", "/v1/node/events", Some("{\"client_id\": 42}"), NODE, 400, "bad_json"),
    case("POST", "/v1/node/events", Some("{}"), NODE, 400, "bad_json"),
    case("POST", "/v1/node/events", Some("{\"client_id\": \"\"}"), NODE, 400, "bad_json"),
];

/// The admin API asked of a node, with the admin token.
#[rustfmt::skip]
const NODE_ADMIN: &[Case] = &[
    case("GET", "/v1/admin/clients", None, ADMIN, 404, "not_found"),
    case("POST", "/v1/admin/content?name=x", Some("{}"), ADMIN, 404, "not_found"),
    case("PUT", "/v1/admin/site", Some("{}"), ADMIN, 404, "not_found"),
];

#[rustfmt::skip]
const ADMIN_AUTH: &[Case] = &[
    case("GET", "/v1/admin/clients", None, None, 401, "unauthorized"),
    case("GET", "/v1/admin/clients", None, Some("wrong"), 401, "unauthorized"),
    case("GET", "/v1/admin/clients", None, NODE, 401, "unauthorized"),
    case("POST", "/v1/admin/content?name=x", Some("bytes"), None, 401, "unauthorized"),
    case("POST", "/v1/admin/content?name=x", Some("bytes"), Some("wrong"), 401, "unauthorized"),
    case("PUT", "/v1/admin/site", Some("{\"application_learning\": true}"), None, 401, "unauthorized"),
    case("PUT", "/v1/admin/groups/g1", Some("{\"parent\": \"default\"}"), Some("wrong"), 401, "unauthorized"),
    case("DELETE", "/v1/admin/content/x", None, None, 401, "unauthorized"),
    case("GET", "/v1/admin/events", None, NODE, 401, "unauthorized"),
    case("GET", "/v1/admin/backup", None, None, 401, "unauthorized"),
    case("GET", "/v1/admin/backup?content=true", None, NODE, 401, "unauthorized"),
    // With the token: an unknown admin endpoint and a wrong method.
    case("GET", "/v1/admin/nope", None, ADMIN, 404, "not_found"),
    case("DELETE", "/v1/admin/site", None, ADMIN, 405, "method_not_allowed"),
];

#[rustfmt::skip]
const ADMIN_BODIES_AND_NAMES: &[Case] = &[
    // Site settings (`{}` is a valid, empty change).
    case("PUT", "/v1/admin/site", Some("{not json"), ADMIN, 400, "bad_json"),
    case("PUT", "/v1/admin/site", Some("[]"), ADMIN, 400, "bad_setting"),
    case("PUT", "/v1/admin/site", Some("\"just a string\""), ADMIN, 400, "bad_setting"),
    case("PUT", "/v1/admin/site", Some("null"), ADMIN, 400, "bad_setting"),
    case("PUT", "/v1/admin/site", Some("{\"client_id\": 42}"), ADMIN, 400, "bad_setting"),
    case("PUT", "/v1/admin/site", Some("{\"client_id\": \"\"}"), ADMIN, 400, "bad_setting"),
    case("PUT", "/v1/admin/site", Some("{\"application_learning\": \"yes\"}"), ADMIN, 400, "bad_setting"),
    case("PUT", "/v1/admin/site", Some("{\"notification_damper_s\": -1}"), ADMIN, 400, "bad_setting"),
    // Groups: the body, then the name.
    case("PUT", "/v1/admin/groups/g1", Some("{not json"), ADMIN, 400, "bad_json"),
    case("PUT", "/v1/admin/groups/g1", Some("{\"parent\": 7}"), ADMIN, 400, "bad_json"),
    case("PUT", "/v1/admin/groups/g1", Some("{\"parent\": \"default\", \"x\": 1}"), ADMIN, 400, "bad_json"),
    case("PUT", "/v1/admin/groups/g1", Some("{\"parent\": \"missing\"}"), ADMIN, 400, "bad_setting"),
    // The client resolves the dot segment: this asks for `/v1/admin/` (sent raw, see below).
    case("PUT", "/v1/admin/groups/..", Some("{\"parent\": \"default\"}"), ADMIN, 404, "not_found"),
    case("PUT", "/v1/admin/groups/a%2Fb", Some("{\"parent\": \"default\"}"), ADMIN, 400, "bad_setting"),
    case("PUT", "/v1/admin/groups/a%20b", Some("{\"parent\": \"default\"}"), ADMIN, 400, "bad_setting"),
    case("PUT", "/v1/admin/groups/{long}", Some("{\"parent\": \"default\"}"), ADMIN, 400, "bad_setting"),
    case("PUT", "/v1/admin/groups/default", Some("{\"parent\": \"default\"}"), ADMIN, 409, "conflict"),
    case("DELETE", "/v1/admin/groups/default", None, ADMIN, 409, "conflict"),
    case("DELETE", "/v1/admin/groups/missing", None, ADMIN, 404, "not_found"),
    // Group settings.
    case("PUT", "/v1/admin/groups/default/settings", Some("{not json"), ADMIN, 400, "bad_json"),
    case("PUT", "/v1/admin/groups/default/settings", Some("[]"), ADMIN, 400, "bad_setting"),
    case("PUT", "/v1/admin/groups/default/settings", Some("null"), ADMIN, 400, "bad_setting"),
    case("PUT", "/v1/admin/groups/default/settings", Some("{\"mode\": 3}"), ADMIN, 400, "bad_setting"),
    case("PUT", "/v1/admin/groups/default/settings", Some("{\"heartbeat_interval_s\": \"fast\"}"), ADMIN, 400, "bad_setting"),
    case("PUT", "/v1/admin/groups/default/settings", Some("{\"randomization\": []}"), ADMIN, 400, "bad_setting"),
    case("PUT", "/v1/admin/groups/default/settings", Some("{\"management_servers\": [{\"url\": 1}]}"), ADMIN, 400, "bad_setting"),
    case("PUT", "/v1/admin/groups/default/settings", Some("{\"use_group_settings\": true}"), ADMIN, 400, "bad_setting"),
    case("PUT", "/v1/admin/groups/nope/settings", Some("{}"), ADMIN, 404, "not_found"),
    // Policies.
    case("PUT", "/v1/admin/groups/default/policy", Some("{not json"), ADMIN, 400, "bad_json"),
    case("PUT", "/v1/admin/groups/nope/policy", Some("{}"), ADMIN, 404, "not_found"),
    // Clients and users.
    case("POST", "/v1/admin/clients/nobody/move", Some("{\"group\": \"default\"}"), ADMIN, 404, "not_found"),
    case("POST", "/v1/admin/clients/nobody/move", Some("{\"grp\": 1}"), ADMIN, 400, "bad_json"),
    case("POST", "/v1/admin/clients/nobody/move", Some("{not json"), ADMIN, 400, "bad_json"),
    case("DELETE", "/v1/admin/clients/nobody", None, ADMIN, 404, "not_found"),
    case("PUT", "/v1/admin/users/alice", Some("{\"group\": \"missing\"}"), ADMIN, 404, "not_found"),
    case("PUT", "/v1/admin/users/alice", Some("{\"grp\": \"default\"}"), ADMIN, 400, "bad_json"),
    // Content.
    case("DELETE", "/v1/admin/content/missing", None, ADMIN, 404, "not_found"),
];

#[rustfmt::skip]
const ADMIN_QUERIES: &[Case] = &[
    case("GET", "/v1/admin/events?limit=abc", None, ADMIN, 400, "bad_query"),
    case("GET", "/v1/admin/events?limit=0", None, ADMIN, 400, "bad_request"),
    case("GET", "/v1/admin/events?limit=10001", None, ADMIN, 400, "bad_request"),
    case("GET", "/v1/admin/events?limit=5&limit=6", None, ADMIN, 400, "bad_query"),
    case("GET", "/v1/admin/events?since=yesterday", None, ADMIN, 400, "bad_query"),
    case("GET", "/v1/admin/events?since=2026-13-01T00:00:00Z", None, ADMIN, 400, "bad_query"),
    case("GET", "/v1/admin/events?after=-1", None, ADMIN, 400, "bad_query"),
    case("GET", "/v1/admin/events?after=abc", None, ADMIN, 400, "bad_query"),
    case("GET", "/v1/admin/applications?q=a&q=b", None, ADMIN, 400, "bad_query"),
    case("GET", "/v1/admin/backup?content=maybe", None, ADMIN, 400, "bad_request"),
    case("GET", "/v1/admin/backup?content=true&content=false", None, ADMIN, 400, "bad_query"),
    case("PUT", "/v1/admin/groups/default/settings?location=a%2Fb", Some("{\"mode\": \"push\"}"), ADMIN, 400, "bad_setting"),
    case("PUT", "/v1/admin/groups/default/settings?location=a&location=b", Some("{\"mode\": \"push\"}"), ADMIN, 400, "bad_query"),
    case("PUT", "/v1/admin/groups/default/settings?location=remote", Some("{\"use_group_settings\": \"yes\"}"), ADMIN, 400, "bad_setting"),
    case("PUT", "/v1/admin/groups/default/settings?location=remote", Some("{\"download_policies_and_content\": false}"), ADMIN, 400, "bad_setting"),
];

#[rustfmt::skip]
const PUBLISH_QUERIES: &[Case] = &[
    case("POST", "/v1/admin/content?", Some("bytes"), ADMIN, 400, "bad_request"),
    case("POST", "/v1/admin/content?name=", Some("bytes"), ADMIN, 400, "bad_request"),
    case("POST", "/v1/admin/content?name=a%2Fb", Some("bytes"), ADMIN, 400, "bad_request"),
    case("POST", "/v1/admin/content?name=../x", Some("bytes"), ADMIN, 400, "bad_request"),
    case("POST", "/v1/admin/content?name=..", Some("bytes"), ADMIN, 400, "bad_request"),
    case("POST", "/v1/admin/content?name={long}", Some("bytes"), ADMIN, 400, "bad_request"),
    case("POST", "/v1/admin/content?name=ok&version=..", Some("bytes"), ADMIN, 400, "bad_request"),
    case("POST", "/v1/admin/content?name=ok&version=a%2Fb", Some("bytes"), ADMIN, 400, "bad_request"),
    case("POST", "/v1/admin/content?name=ok&version={long}", Some("bytes"), ADMIN, 400, "bad_request"),
    case("POST", "/v1/admin/content?name=ok&urgent=maybe", Some("bytes"), ADMIN, 400, "bad_request"),
    case("POST", "/v1/admin/content?name=a&name=b", Some("bytes"), ADMIN, 400, "bad_query"),
    // `taken 1` is published with other bytes by the test.
    case("POST", "/v1/admin/content?name=taken&version=1", Some("bytes"), ADMIN, 409, "conflict"),
];

/// A manager and a node that has synced with it.
async fn manager_and_node(dir: &std::path::Path) -> (Proc, Proc) {
    let manager = start_manager(&dir.join("m"), &[]);
    let node = start_node(&dir.join("n"), &[&manager.url], &[]);
    wait_ready(&node.url).await;
    (manager, node)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_client_endpoints_refuse_bad_bodies_with_exact_codes() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    expect(&manager.url, CLIENT_BODIES).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_client_endpoints_refuse_bad_paths_queries_and_methods_with_exact_codes() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    expect(&manager.url, CLIENT_PATHS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_client_endpoints_refuse_bad_bodies_with_the_managers_codes() {
    let dir = tempfile::tempdir().unwrap();
    let (_manager, node) = manager_and_node(dir.path()).await;
    expect(&node.url, CLIENT_BODIES).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_client_endpoints_refuse_bad_paths_queries_and_methods_with_the_managers_codes() {
    let dir = tempfile::tempdir().unwrap();
    let (_manager, node) = manager_and_node(dir.path()).await;
    expect(&node.url, CLIENT_PATHS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_method_is_405_with_allow_naming_the_methods_taken() {
    let dir = tempfile::tempdir().unwrap();
    let (manager, node) = manager_and_node(dir.path()).await;
    for base in [&manager.url, &node.url] {
        for (method, path, allow) in [
            ("DELETE", "/v1/catalog", "GET,HEAD"),
            ("PUT", "/v1/heartbeat", "POST"),
        ] {
            let (status, headers, v) = send(base, method, path, None, None).await;
            assert!(
                is_error(status, &v, 405, "method_not_allowed"),
                "{method} {base}{path}: {status} {v}"
            );
            assert_eq!(headers["allow"], allow, "{method} {base}{path}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_token_batch_endpoints_need_the_node_token_and_a_valid_body() {
    let dir = tempfile::tempdir().unwrap();
    let (manager, node) = manager_and_node(dir.path()).await;
    expect(&manager.url, NODE_TOKEN_ENDPOINTS).await;
    expect(&node.url, NODE_TOKEN_ENDPOINTS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_has_no_admin_api() {
    let dir = tempfile::tempdir().unwrap();
    let (_manager, node) = manager_and_node(dir.path()).await;
    expect(&node.url, NODE_ADMIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_answer_401_without_the_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    expect(&manager.url, ADMIN_AUTH).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_bodies_and_names_are_refused_with_exact_codes() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    expect(&manager.url, ADMIN_BODIES_AND_NAMES).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_query_strings_are_refused_with_exact_codes() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    expect(&manager.url, ADMIN_QUERIES).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_query_strings_are_refused_with_exact_codes() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    publish_and_wait(&manager.url, &[], "taken", "1", b"other bytes").await;
    expect(&manager.url, PUBLISH_QUERIES).await;
}

/// A JSON object of about `len` bytes.
fn padded(prefix: &str, len: usize) -> Vec<u8> {
    format!("{{{prefix}\"pad\": \"{}\"}}", "x".repeat(len)).into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_are_413_body_too_large() {
    let dir = tempfile::tempdir().unwrap();
    let (manager, node) = manager_and_node(dir.path()).await;
    let over_1_mib = padded("\"client_id\": \"x\", ", 1_100_000);
    let over_16_mib = padded("\"heartbeats\": [], ", 17 << 20);
    for base in [&manager.url, &node.url] {
        for path in ["/v1/heartbeat", "/v1/events", "/v1/applications"] {
            let (status, _, v) = send(base, "POST", path, Some(over_1_mib.clone()), None).await;
            assert!(
                is_error(status, &v, 413, "body_too_large"),
                "1.1 MB to {base}{path}: {status} {v}"
            );
        }
        for path in ["/v1/node/heartbeats", "/v1/node/events"] {
            let (status, _, v) = send(base, "POST", path, Some(over_16_mib.clone()), NODE).await;
            assert!(
                is_error(status, &v, 413, "body_too_large"),
                "17 MiB to {base}{path}: {status} {v}"
            );
        }
        // Node-token endpoints take more than 1 MiB.
        let two_mib = padded("\"heartbeats\": [], ", 2 << 20);
        let (status, _, v) = send(base, "POST", "/v1/node/heartbeats", Some(two_mib), NODE).await;
        assert_eq!(status, 200, "2 MiB of heartbeats to {base}: {v}");
    }
    let (status, _, v) = send(
        &manager.url,
        "PUT",
        "/v1/admin/groups/default/policy",
        Some(padded("", 2 << 20)),
        ADMIN,
    )
    .await;
    assert!(
        is_error(status, &v, 413, "policy_too_large"),
        "2 MiB policy: {status} {v}"
    );
    assert!(
        v["message"].as_str().unwrap_or("").contains("default"),
        "names the group: {v}"
    );
}

/// Sends `request` as it is on a new connection, closing the sending side after it when
/// `half_close` (to end a body early), and returns the status and the JSON body of the
/// answer. (A half-closed connection gets no answer to a complete request: hyper's default.)
fn raw(base: &str, request: &str, half_close: bool) -> (u16, Value) {
    let mut s = std::net::TcpStream::connect(base.trim_start_matches("http://")).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    s.write_all(request.as_bytes()).unwrap();
    if half_close {
        s.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Sends a request head announcing 100 bytes of body, then 9 of them, and closes the
/// sending side.
fn cut_short(base: &str, head: &str) -> (u16, Value) {
    raw(
        base,
        &format!(
            "{head}\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"client"
        ),
        true,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_sent_raw_never_leave_their_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (manager, node) = manager_and_node(dir.path()).await;
    let admin = format!("Authorization: Bearer {ADMIN_TOKEN}");
    let body = "{\"parent\": \"default\"}";
    let group = format!(
        "PUT /v1/admin/groups/.. HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{admin}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (status, v) = raw(&manager.url, &group, false);
    assert!(
        is_error(status, &v, 400, "bad_setting"),
        "PUT /v1/admin/groups/..: {status} {v}"
    );
    for base in [&manager.url, &node.url] {
        let (status, v) = raw(
            base,
            "GET /v1/content/../../etc/passwd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            false,
        );
        assert!(
            is_error(status, &v, 404, "not_found"),
            "GET /v1/content/../../etc/passwd on {base}: {status} {v}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_cut_short_of_their_length_are_400_body_incomplete() {
    let dir = tempfile::tempdir().unwrap();
    let (manager, node) = manager_and_node(dir.path()).await;
    let admin = format!("Authorization: Bearer {ADMIN_TOKEN}");
    let node_auth = format!("Authorization: Bearer {NODE_TOKEN}");
    let mut cases = vec![
        (
            manager.url.clone(),
            format!("POST /v1/admin/content?name=cut HTTP/1.1\r\n{admin}"),
        ),
        (
            manager.url.clone(),
            format!("PUT /v1/admin/groups/default/policy HTTP/1.1\r\n{admin}"),
        ),
    ];
    for base in [&manager.url, &node.url] {
        cases.push((base.clone(), "POST /v1/heartbeat HTTP/1.1".to_string()));
        cases.push((
            base.clone(),
            format!("POST /v1/node/events HTTP/1.1\r\n{node_auth}"),
        ));
    }
    for (base, head) in cases {
        let (status, v) = cut_short(&base, &head);
        let first = head.lines().next().unwrap();
        assert!(
            is_error(status, &v, 400, "body_incomplete"),
            "{first} to {base}: {status} {v}"
        );
    }
    for base in [&manager.url, &node.url] {
        assert_eq!(get_json(base, "/healthz").await.0, 200, "{base} carries on");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_outside_a_blob_is_416_and_one_on_a_digest_not_in_the_catalog_404() {
    let dir = tempfile::tempdir().unwrap();
    let (manager, node) = manager_and_node(dir.path()).await;
    let data = random_bytes(1000, 1);
    let sha = publish_and_wait(&manager.url, &[&node.url], "small", "1", &data).await;
    let c = reqwest::Client::new();
    for base in [&manager.url, &node.url] {
        let r = c
            .get(format!("{base}/v1/content/{sha}"))
            .header("range", "bytes=1000-")
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        assert_eq!(r.headers()["content-range"], "bytes */1000", "{base}");
        let v: Value = r.json().await.unwrap_or(Value::Null);
        assert!(
            is_error(status, &v, 416, "range_not_satisfiable"),
            "{base}: {status} {v}"
        );
        let r = c
            .get(format!("{base}/v1/content/{UNPUBLISHED}"))
            .header("range", "bytes=999999-")
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        assert!(
            is_error(status, &v, 404, "not_in_catalog"),
            "{base}: {status} {v}"
        );
    }
}
