//! End to end through real processes: groups, communications settings with inheritance and
//! location overrides, policies with serials and 304, heartbeats with the contract's
//! reconnection rules, persistence across restarts, push to a node and to a stream client,
//! and heartbeats relayed by a node.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};

struct Api {
    c: reqwest::Client,
    base: String,
}

impl Api {
    fn new(base: &str) -> Api {
        Api {
            c: reqwest::Client::new(),
            base: base.to_string(),
        }
    }

    async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self
            .c
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(reqwest::Method::PUT, path, Some(body)).await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.send(reqwest::Method::GET, path, None).await
    }

    async fn heartbeat(&self, body: Value) -> Value {
        let (status, v) = self.post("/v1/heartbeat", body).await;
        assert_eq!(status, 200, "{v}");
        v
    }
}

fn admin_cli(manager: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(gup())
        .args(["admin", "--manager", manager, "--token", ADMIN_TOKEN])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_inheritance_locations_policies_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let m_dir = dir.path().join("m");
    let manager = start_manager(&m_dir, &[]);
    let api = Api::new(&manager.url);

    // Defaults of the contract's table.
    let (s, v) = api.get("/v1/groups/default/settings").await;
    assert_eq!(s, 200);
    assert_eq!(v["communication_enabled"], true);
    assert_eq!(v["management_servers"], json!([]));
    assert_eq!(v["download_policies_and_content"], true);
    assert_eq!(v["mode"], "pull");
    assert_eq!(v["heartbeat_interval_s"], 300);
    assert_eq!(v["learn_applications"], false);
    assert_eq!(v["upload_critical_events_immediately"], true);
    assert_eq!(
        v["randomization"],
        json!({"enabled": true, "window_s": 3600})
    );
    assert_eq!(
        v["reconnection"],
        json!({"use_last_group": false, "use_last_mode": false})
    );
    assert!(v["serial"].is_u64());

    // A tree three levels deep, through the CLI.
    let (code, out) = admin_cli(&manager.url, &["group", "set", "emea"]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = admin_cli(&manager.url, &["group", "set", "paris", "--parent", "emea"]);
    assert_eq!(code, 0, "{out}");
    let (s, _) = api
        .put("/v1/admin/groups/paris-lab", json!({"parent": "paris"}))
        .await;
    assert_eq!(s, 201);
    let (s, _) = api
        .put("/v1/admin/groups/paris-lab", json!({"parent": "paris"}))
        .await;
    assert_eq!(s, 200);
    let (code, out) = admin_cli(
        &manager.url,
        &["settings", "set", "default", "heartbeat_interval_s=120"],
    );
    assert_eq!(code, 0, "{out}");
    let (code, out) = admin_cli(
        &manager.url,
        &[
            "settings",
            "set",
            "emea",
            "mode=push",
            "randomization.window_s=600",
        ],
    );
    assert_eq!(code, 0, "{out}");
    let (s, _) = api
        .put(
            "/v1/admin/groups/paris/settings",
            json!({"randomization": {"enabled": false}}),
        )
        .await;
    assert_eq!(s, 200);
    let (_, v) = api.get("/v1/groups/paris-lab/settings").await;
    assert_eq!(v["heartbeat_interval_s"], 120, "from default");
    assert_eq!(v["mode"], "push", "from emea");
    assert_eq!(
        v["randomization"],
        json!({"enabled": false, "window_s": 600})
    );
    // null goes back to inheriting.
    let (s, _) = api
        .put("/v1/admin/groups/emea/settings", json!({"mode": null}))
        .await;
    assert_eq!(s, 200);
    let (_, v) = api.get("/v1/groups/paris-lab/settings").await;
    assert_eq!(v["mode"], "pull");
    // A cycle is refused.
    let (s, v) = api
        .put("/v1/admin/groups/emea", json!({"parent": "paris-lab"}))
        .await;
    assert_eq!(s, 409, "{v}");
    // A group with children cannot be deleted.
    let (s, _) = api
        .send(reqwest::Method::DELETE, "/v1/admin/groups/paris", None)
        .await;
    assert_eq!(s, 409);

    // Location override, and a group-only key on a location is 400 naming the key.
    let (s, v) = api
        .put(
            "/v1/admin/groups/paris/settings?location=remote",
            json!({"heartbeat_interval_s": 900}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (_, v) = api
        .get("/v1/groups/paris-lab/settings?location=remote")
        .await;
    assert_eq!(
        v["heartbeat_interval_s"], 900,
        "parent@L beats the group's inherited value"
    );
    let (_, v) = api
        .get("/v1/groups/paris-lab/settings?location=office")
        .await;
    assert_eq!(v["heartbeat_interval_s"], 120);
    let (s, v) = api
        .put(
            "/v1/admin/groups/paris/settings?location=remote",
            json!({"reconnection": {"use_last_group": true}}),
        )
        .await;
    assert_eq!(s, 400);
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("reconnection.use_last_group"),
        "{v}"
    );
    // Validation names the key and the rule.
    for (body, key) in [
        (json!({"heartbeat_interval_s": 0}), "heartbeat_interval_s"),
        (
            json!({"randomization": {"window_s": 604801}}),
            "randomization.window_s",
        ),
        (json!({"mode": "sometimes"}), "mode"),
        (
            json!({"management_servers": [{"url": "not a url", "priority": 1}]}),
            "management_servers",
        ),
        (
            json!({"management_servers": [{"url": "http://a", "priority": 0}]}),
            "management_servers",
        ),
        (json!({"no_such_key": 1}), "no_such_key"),
    ] {
        let (s, v) = api
            .put("/v1/admin/groups/emea/settings", body.clone())
            .await;
        assert_eq!(s, 400, "{body}");
        assert_eq!(v["error"], "bad_setting");
        assert!(v["message"].as_str().unwrap().contains(key), "{body}: {v}");
    }
    // Malformed JSON: 400 with our JSON error.
    let r = api
        .c
        .put(format!("{}/v1/admin/groups/emea/settings", manager.url))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "bad_json");

    // Policies: inherited, serials from one counter, ETag and 304.
    let (_, p1) = api
        .put("/v1/admin/groups/emea/policy", json!({"scan": "daily"}))
        .await;
    let (_, v) = api.get("/v1/groups/paris-lab/policy").await;
    assert_eq!(v["policy"], json!({"scan": "daily"}));
    assert_eq!(v["serial"], p1["serial"]);
    let r = api
        .c
        .get(format!("{}/v1/groups/paris-lab/policy", manager.url))
        .send()
        .await
        .unwrap();
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    let r = api
        .c
        .get(format!("{}/v1/groups/paris-lab/policy", manager.url))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    let (_, p2) = api
        .put("/v1/admin/groups/paris/policy", json!({"scan": "hourly"}))
        .await;
    assert!(p2["serial"].as_u64() > p1["serial"].as_u64());
    let r = api
        .c
        .get(format!("{}/v1/groups/paris-lab/policy", manager.url))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Heartbeat: answer with effective settings and serials.
    let v = api
        .heartbeat(
            json!({"client_id": "pc-1", "install_group": "paris-lab", "location": "remote",
                          "os": "windows", "client_version": "12.1.5", "mode": "computer"}),
        )
        .await;
    assert_eq!(v["group"], "paris-lab");
    assert_eq!(v["next_heartbeat_s"], 900);
    assert_eq!(v["policy_serial"], p2["serial"]);
    assert_eq!(v["download_slot"], Value::Null);
    let (s, v) = api
        .post("/v1/heartbeat", json!({"install_group": "x"}))
        .await;
    assert_eq!(s, 400, "{v}");
    let (code, out) = admin_cli(&manager.url, &["client", "list"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("pc-1") && out.contains("paris-lab"), "{out}");
    let (code, out) = admin_cli(
        &manager.url,
        &["settings", "get", "paris-lab", "--location", "remote"],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("heartbeat_interval_s") && out.contains("900"),
        "{out}"
    );

    // Everything survives a restart.
    assert_eq!(manager.stop(), Some(0));
    let manager = start_manager(&m_dir, &[]);
    let api = Api::new(&manager.url);
    let (_, v) = api
        .get("/v1/groups/paris-lab/settings?location=remote")
        .await;
    assert_eq!(v["heartbeat_interval_s"], 900);
    assert_eq!(
        v["randomization"],
        json!({"enabled": false, "window_s": 600})
    );
    let (_, v) = api.get("/v1/groups/paris-lab/policy").await;
    assert_eq!(v["policy"], json!({"scan": "hourly"}));
    let (_, v) = api.get("/v1/admin/clients").await;
    assert_eq!(v["clients"][0]["client_id"], "pc-1");
    let (_, v) = api
        .put("/v1/admin/groups/emea/policy", json!({"x": 1}))
        .await;
    assert!(
        v["serial"].as_u64() > p2["serial"].as_u64(),
        "serials never repeat after restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnection_preferences() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let api = Api::new(&manager.url);
    for g in ["install", "moved", "sticky", "alice-group", "bob-group"] {
        let (s, _) = api
            .put(
                &format!("/v1/admin/groups/{g}"),
                json!({"parent": "default"}),
            )
            .await;
        assert_eq!(s, 201);
    }
    let hb = |id: &str, os: &str| json!({"client_id": id, "install_group": "install", "os": os});

    // 1. A new client lands in its install group; a moved one that keeps heartbeating stays.
    assert_eq!(api.heartbeat(hb("c1", "windows")).await["group"], "install");
    let (code, out) = admin_cli(&manager.url, &["client", "move", "c1", "moved"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(api.heartbeat(hb("c1", "windows")).await["group"], "moved");
    // ...and after its record is deleted it reconnects to the install group.
    let (s, _) = api
        .send(reqwest::Method::DELETE, "/v1/admin/clients/c1", None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(api.heartbeat(hb("c1", "windows")).await["group"], "install");

    // 2. use_last_group on the last group: a deleted Windows/Mac client comes back there;
    //    Linux ignores it.
    let (s, _) = api
        .put(
            "/v1/admin/groups/sticky/settings",
            json!({"reconnection": {"use_last_group": true}}),
        )
        .await;
    assert_eq!(s, 200);
    for (id, os, expect) in [
        ("c2", "windows", "sticky"),
        ("c3", "mac", "sticky"),
        ("c4", "linux", "install"),
    ] {
        api.heartbeat(hb(id, os)).await;
        let (s, _) = api
            .post(
                &format!("/v1/admin/clients/{id}/move"),
                json!({"group": "sticky"}),
            )
            .await;
        assert_eq!(s, 200);
        let (s, _) = api
            .send(
                reqwest::Method::DELETE,
                &format!("/v1/admin/clients/{id}"),
                None,
            )
            .await;
        assert_eq!(s, 200);
        assert_eq!(
            api.heartbeat(hb(id, os)).await["group"],
            expect,
            "{id} {os}"
        );
    }
    // A group with clients cannot be deleted.
    let (s, _) = api
        .send(reqwest::Method::DELETE, "/v1/admin/groups/sticky", None)
        .await;
    assert_eq!(s, 409);

    // 3. User mode: a new user moves the client to that user's group.
    let (code, out) = admin_cli(&manager.url, &["user", "set", "alice", "alice-group"]);
    assert_eq!(code, 0, "{out}");
    let (s, _) = api
        .put("/v1/admin/users/bob", json!({"group": "bob-group"}))
        .await;
    assert_eq!(s, 200);
    let user = |id: &str, u: &str| json!({"client_id": id, "install_group": "install", "os": "windows", "mode": "user", "user": u});
    assert_eq!(
        api.heartbeat(user("u1", "alice")).await["group"],
        "alice-group"
    );
    assert_eq!(api.heartbeat(user("u1", "bob")).await["group"], "bob-group");
    // A user with no mapping keeps the current group.
    assert_eq!(
        api.heartbeat(user("u1", "carol")).await["group"],
        "bob-group"
    );

    // 4. use_last_mode on the current group: a new user does not move the client.
    let (s, _) = api
        .put(
            "/v1/admin/groups/bob-group/settings",
            json!({"reconnection.use_last_mode": true}),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        api.heartbeat(user("u1", "alice")).await["group"],
        "bob-group"
    );
    // ...but only for Windows clients.
    let mut mac = user("u2", "bob");
    mac["os"] = json!("mac");
    assert_eq!(api.heartbeat(mac.clone()).await["group"], "bob-group");
    mac["user"] = json!("alice");
    assert_eq!(api.heartbeat(mac).await["group"], "alice-group");
}

/// Reads SSE events from a response until `want` is seen or the deadline passes.
async fn wait_event(
    body: &mut (impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    parser: &mut gup::core::proto::EventParser,
    want: impl Fn(&str, &Value) -> bool,
    secs: u64,
) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let chunk = match tokio::time::timeout_at(deadline, body.next()).await {
            Ok(Some(Ok(c))) => c,
            _ => return false,
        };
        for (name, data) in parser.feed(&chunk).unwrap_or_default() {
            let v: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
            if want(&name, &v) {
                return true;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_reaches_node_and_stream_clients_pull_waits_for_heartbeat() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let api = Api::new(&manager.url);
    api.put("/v1/admin/groups/branch", json!({"parent": "default"}))
        .await;

    // In push mode the node re-polls only every 300 s (a safety net): within this test only
    // its push stream can bring changes. It relays heartbeats every 2 s.
    let node = start_node_toml(
        &dir.path().join("n"),
        &[&manager.url],
        "mode = \"push\"
sync_interval_s = 2
",
        &[],
    );
    let napi = Api::new(&node.url);
    wait_for(20, "node ready", || {
        let c = napi.c.clone();
        let u = node.url.clone();
        async move {
            let r = c
                .get(format!("{u}/v1/groups/branch/settings"))
                .send()
                .await
                .ok()?;
            (r.status() == 200).then_some(())
        }
    })
    .await;

    // A client of the node registers (pull mode) and another holds the node's stream.
    let hb = json!({"client_id": "pc-9", "install_group": "branch", "os": "windows"});
    let first = napi.heartbeat(hb.clone()).await;
    assert_eq!(first["group"], "branch");
    let serial0 = first["settings"]["serial"].as_u64().unwrap();
    let resp = napi
        .c
        .get(format!("{}/v1/stream?client_id=pc-9", node.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.bytes_stream();
    let mut parser = gup::core::proto::EventParser::default();
    // The current state arrives on connect.
    assert!(
        wait_event(
            &mut body,
            &mut parser,
            |n, v| n == "catalog" && v["revision"].is_u64(),
            10
        )
        .await
    );
    let started = std::time::Instant::now();
    let (s, _) = api
        .put(
            "/v1/admin/groups/branch/settings",
            json!({"heartbeat_interval_s": 77}),
        )
        .await;
    assert_eq!(s, 200);
    let heard = wait_event(
        &mut body,
        &mut parser,
        |n, v| n == "settings" && v["group"] == "branch" && v["serial"].as_u64() > Some(serial0),
        20,
    )
    .await;
    assert!(heard, "the stream client heard of the change");
    // Pushed well before any poll (300 s) could have brought it.
    assert!(started.elapsed() < Duration::from_secs(60));
    let (_, v) = napi.get("/v1/groups/branch/settings").await;
    assert_eq!(v["heartbeat_interval_s"], 77);
    // The pull client learns at its next heartbeat.
    let next = napi.heartbeat(hb.clone()).await;
    assert_eq!(next["next_heartbeat_s"], 77);
    assert!(next["settings"]["serial"].as_u64() > Some(serial0));

    // The node relays its clients' heartbeats: the manager's registry knows pc-9.
    wait_registered(&manager.url, "pc-9", Some("branch")).await;

    // With the manager gone, the node still answers heartbeats from its mirror.
    drop(body);
    assert_eq!(manager.stop(), Some(0));
    let v = napi.heartbeat(hb).await;
    assert_eq!(v["group"], "branch");
    assert_eq!(v["next_heartbeat_s"], 77);
    assert_eq!(node.stop(), Some(0));
}
