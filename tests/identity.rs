//! Client identity end to end: enrolment tokens, credentials a node checks offline,
//! revocation through the next sync, and an admin's move that holds against user mode.
//! Real manager, node and agent processes on 127.0.0.1; the manager starts as a new site
//! does, with `client_auth = "required"`.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const CRED: &str = "X-Gup-Credential";

async fn call(
    base: &str,
    path: &str,
    body: Value,
    credential: Option<&str>,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut req = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(&body);
    if let Some(c) = credential {
        req = req.header(CRED, c);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, r.json().await.unwrap_or(Value::Null), headers)
}

async fn heartbeat(base: &str, body: Value, credential: Option<&str>) -> (u16, Value) {
    let (s, v, _) = call(base, "/v1/heartbeat", body, credential).await;
    (s, v)
}

/// A token for `group` (made if missing), from the admin API.
async fn token(manager: &str, group: &str, uses: Option<u64>) -> String {
    let (s, _) = admin_call(
        manager,
        reqwest::Method::PUT,
        &format!("/v1/admin/groups/{group}"),
        Some(json!({"parent": "default"})),
    )
    .await;
    assert!(s == 200 || s == 201, "group {group}: {s}");
    let mut body = json!({"group": group});
    if let Some(n) = uses {
        body["uses"] = json!(n);
    }
    let (s, v) = admin_call(
        manager,
        reqwest::Method::POST,
        "/v1/admin/enroll",
        Some(body),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    v["token"].as_str().unwrap().to_string()
}

/// Enrols `id` at `base` with `token`: its credential.
async fn enrol(base: &str, id: &str, token: &str) -> String {
    let (s, v) = heartbeat(
        base,
        json!({"client_id": id, "install_group": "default", "enroll_token": token}),
        None,
    )
    .await;
    assert_eq!(s, 200, "enrolling {id}: {v}");
    v["credential"].as_str().expect("a credential").to_string()
}

async fn stream_status(base: &str, id: &str, credential: Option<&str>) -> u16 {
    let mut req = reqwest::Client::new()
        .get(format!("{base}/v1/stream"))
        .query(&[("client_id", id)]);
    if let Some(c) = credential {
        req = req.header(CRED, c);
    }
    let r = tokio::time::timeout(Duration::from_secs(10), req.send())
        .await
        .unwrap()
        .unwrap();
    r.status().as_u16()
}

fn event(id: &str, kind: &str) -> Value {
    json!({"id": id, "kind": kind, "subkind": "test", "time": "2026-12-03T12:00:00Z", "data": {}})
}

#[tokio::test]
async fn forged_heartbeats_events_and_streams_for_an_enrolled_client_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager_strict(&dir.path().join("m"), &[]);
    let node = start_node(&dir.path().join("n"), &[&manager.url], &[]);
    wait_ready(&node.url).await;
    let t = token(&manager.url, "branch", None).await;
    // Enrolment through the node is relayed to the manager; the token's group is the
    // install group whatever the body says.
    let victim = enrol(&node.url, "victim", &t).await;
    let attacker = enrol(&node.url, "attacker", &t).await;
    wait_registered(&manager.url, "victim", Some("branch")).await;
    for base in [&node.url, &manager.url] {
        let hb = json!({"client_id": "victim", "install_group": "default", "os": "linux"});
        // No credential, another client's credential, a made-up one: 401 each.
        let (s, v) = heartbeat(base, hb.clone(), None).await;
        assert_eq!(
            (s, v["error"].as_str()),
            (401, Some("credential_required")),
            "{base}"
        );
        let (s, v) = heartbeat(base, hb.clone(), Some(&attacker)).await;
        assert_eq!(
            (s, v["error"].as_str()),
            (401, Some("bad_credential")),
            "{base}: {v}"
        );
        let (s, _) = heartbeat(base, hb.clone(), Some("gupc1.e30.AAAA")).await;
        assert_eq!(s, 401);
        let forged = json!({"client_id": "victim", "events": [event("42", "intrusion")]});
        let (s, _, _) = call(base, "/v1/events", forged.clone(), None).await;
        assert_eq!(s, 401, "{base}: a forged intrusion event");
        let (s, _, _) = call(base, "/v1/events", forged, Some(&attacker)).await;
        assert_eq!(s, 401);
        let apps = json!({"client_id": "victim", "applications": []});
        let (s, _, _) = call(base, "/v1/applications", apps, None).await;
        assert_eq!(s, 401);
        assert_eq!(stream_status(base, "victim", None).await, 401);
        assert_eq!(stream_status(base, "victim", Some(&attacker)).await, 401);
        // The victim's own calls pass, placed in its enrolled group.
        let (s, v) = heartbeat(base, hb, Some(&victim)).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["group"], "branch");
        assert!(v.get("credential").is_none(), "issued only on enrolment");
        assert_eq!(stream_status(base, "victim", Some(&victim)).await, 200);
    }
    let real = json!({"client_id": "victim", "events": [event("42", "intrusion")]});
    let (s, _, _) = call(&node.url, "/v1/events", real, Some(&victim)).await;
    assert_eq!(s, 202);
    // The manager saw no forged heartbeat: the record still says linux from the victim's
    // own heartbeat, and only the victim's one event arrives.
    let events = wait_for(30, "the victim's event upstream", || {
        let m = manager.url.clone();
        async move {
            let all = all_events(&m).await;
            (!all.is_empty()).then_some(all)
        }
    })
    .await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["group"], "branch");
    // An enrolled id does not enrol again; a bad token is refused as the manager says.
    let again = json!({"client_id": "victim", "enroll_token": t});
    let (s, v) = heartbeat(&node.url, again, None).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (409, Some("already_enrolled")),
        "{v}"
    );
    let bad = json!({"client_id": "newcomer", "enroll_token": "gupe1.0011223344556677.nope"});
    let (s, v) = heartbeat(&node.url, bad, None).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (401, Some("bad_enroll_token")),
        "{v}"
    );
}

#[tokio::test]
async fn a_node_in_an_outage_checks_credentials_and_refuses_new_enrolments_with_503() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager_strict(&dir.path().join("m"), &[]);
    let node = start_node(&dir.path().join("n"), &[&manager.url], &[]);
    wait_ready(&node.url).await;
    let t = token(&manager.url, "branch", None).await;
    let cred = enrol(&node.url, "laptop", &t).await;
    manager.kill9();
    let hb = json!({"client_id": "laptop"});
    let (s, v) = heartbeat(&node.url, hb.clone(), Some(&cred)).await;
    assert_eq!(s, 200, "checked offline: {v}");
    let (s, _) = heartbeat(&node.url, hb.clone(), None).await;
    assert_eq!(s, 401, "and a forged one is still refused");
    let (s, v, headers) = call(
        &node.url,
        "/v1/heartbeat",
        json!({"client_id": "new-laptop", "enroll_token": t}),
        None,
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (503, Some("upstream_unavailable")),
        "{v}"
    );
    assert!(headers.contains_key("retry-after"));
    // A node restarted during the outage checks with the key its mirror kept.
    node.stop();
    let node = start_node(&dir.path().join("n"), &[&manager_url_gone()], &[]);
    let (s, v) = heartbeat(&node.url, hb, Some(&cred)).await;
    assert_eq!(s, 200, "after a restart in the outage: {v}");
}

/// An upstream address nothing listens on.
fn manager_url_gone() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

#[tokio::test]
async fn a_revoked_client_is_refused_by_the_node_after_its_next_sync_and_may_enrol_again() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager_strict(&dir.path().join("m"), &[]);
    // Pull mode and a 1 s sync: the revocation arrives with the next sync, no push needed.
    let node = start_node_toml(
        &dir.path().join("n"),
        &[&manager.url],
        "mode = \"pull\"\n",
        &[],
    );
    wait_ready(&node.url).await;
    let t = token(&manager.url, "branch", None).await;
    let cred = enrol(&node.url, "stolen", &t).await;
    let hb = json!({"client_id": "stolen"});
    assert_eq!(heartbeat(&node.url, hb.clone(), Some(&cred)).await.0, 200);
    let (code, out) = admin_cli(&manager.url, &["client", "revoke", "stolen"]);
    assert_eq!(code, 0, "{out}");
    let (s, v) = heartbeat(&manager.url, hb.clone(), Some(&cred)).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (401, Some("credential_revoked")),
        "at once upstream"
    );
    wait_for(30, "the node refuses the revoked credential", || {
        let (n, hb, c) = (node.url.clone(), hb.clone(), cred.clone());
        async move {
            let (s, v) = heartbeat(&n, hb, Some(&c)).await;
            (s == 401 && v["error"] == "credential_revoked").then_some(())
        }
    })
    .await;
    assert_eq!(stream_status(&node.url, "stolen", Some(&cred)).await, 401);
    // Enrolled again (the admin gave the machine a token): a new credential works.
    let fresh = enrol(&node.url, "stolen", &t).await;
    assert_ne!(fresh, cred);
    assert_eq!(heartbeat(&node.url, hb.clone(), Some(&fresh)).await.0, 200);
    assert_eq!(heartbeat(&node.url, hb, Some(&cred)).await.0, 401);
    let (code, out) = admin_cli(&manager.url, &["client", "revoke", "never-enrolled"]);
    assert_ne!(code, 0, "{out}");
}

#[tokio::test]
async fn an_admin_moved_client_stays_put_through_a_user_mode_heartbeat() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager_strict(&dir.path().join("m"), &[]);
    let t = token(&manager.url, "office", None).await;
    token(&manager.url, "quarantine", None).await;
    let m = &manager.url;
    let put = reqwest::Method::PUT;
    for (user, group) in [("alice", "office"), ("bob", "default")] {
        let (s, v) = admin_call(
            m,
            put.clone(),
            &format!("/v1/admin/users/{user}"),
            Some(json!({"group": group})),
        )
        .await;
        assert_eq!(s, 200, "{v}");
    }
    let cred = enrol(m, "laptop", &t).await;
    let hb = |user: &str| json!({"client_id": "laptop", "mode": "user", "user": user});
    assert_eq!(
        heartbeat(m, hb("alice"), Some(&cred)).await.1["group"],
        "office"
    );
    let (code, out) = admin_cli(m, &["client", "move", "laptop", "quarantine"]);
    assert_eq!(code, 0, "{out}");
    for user in ["bob", "alice", "bob"] {
        let (s, v) = heartbeat(m, hb(user), Some(&cred)).await;
        assert_eq!(
            (s, v["group"].as_str()),
            (200, Some("quarantine")),
            "user {user}"
        );
    }
    let (_, v) = admin_call(m, reqwest::Method::GET, "/v1/admin/clients", None).await;
    let rec = v["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["client_id"] == "laptop")
        .cloned()
        .unwrap();
    assert_eq!(rec["group"], "quarantine");
    assert_eq!(rec["admin_hold"], true);
}

#[tokio::test]
async fn enrolment_tokens_from_the_cli_and_an_agent_that_enrols() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager_strict(&dir.path().join("m"), &[]);
    let node = start_node(&dir.path().join("n"), &[&manager.url], &[]);
    wait_ready(&node.url).await;
    let m = &manager.url;
    let (code, out) = admin_cli(m, &["group", "set", "branch"]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = admin_cli(
        m,
        &[
            "enroll",
            "create",
            "--group",
            "branch",
            "--uses",
            "1",
            "--expires",
            "1h",
        ],
    );
    assert_eq!(code, 0, "{out}");
    let token = out
        .split_whitespace()
        .find(|w| w.starts_with("gupe1."))
        .unwrap_or_else(|| panic!("no token in {out:?}"))
        .to_string();
    let (code, out) = admin_cli(m, &["enroll", "create", "--group", "nowhere"]);
    assert_ne!(code, 0, "{out}");
    let (code, out) = admin_cli(
        m,
        &[
            "enroll",
            "create",
            "--group",
            "branch",
            "--expires",
            "yesterday",
        ],
    );
    assert_ne!(code, 0, "{out}");
    // The agent reads the token from a file and keeps the credential it brings.
    let token_file = dir.path().join("enroll.token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let a_dir = dir.path().join("agent");
    let agent = Proc::start_until(
        &[
            "agent",
            "--data-dir",
            a_dir.to_str().unwrap(),
            "--server",
            &node.url,
            "--enroll-token-file",
            token_file.to_str().unwrap(),
        ],
        a_dir.with_extension("log"),
        "agent starting",
    );
    wait_registered(m, &read_id(&a_dir), Some("branch")).await;
    wait_for(30, "the agent's status says enrolled", || {
        let d = a_dir.clone();
        async move { (agent_status(&d)["enrolled"] == true).then_some(()) }
    })
    .await;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(a_dir.join("credential"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // The token had one use: listed as used up, then revoked.
    let (code, out) = admin_cli(m, &["enroll", "list"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("branch"), "{out}");
    let id = token.split('.').nth(1).unwrap();
    assert!(out.contains(id), "{out}");
    assert!(
        !out.contains(token.rsplit('.').next().unwrap()),
        "no secret in the list: {out}"
    );
    let (code, out) = admin_cli(m, &["enroll", "revoke", id]);
    assert_eq!(code, 0, "{out}");
    // A restarted agent heartbeats with its credential, no token needed.
    assert_eq!(agent.stop(), Some(0));
    let restarted_at = chrono::Utc::now();
    let log = a_dir.with_extension("log2");
    let again = Proc::start_until(
        &[
            "agent",
            "--data-dir",
            a_dir.to_str().unwrap(),
            "--server",
            &node.url,
            "--install-group",
            "default",
        ],
        log.clone(),
        "agent starting",
    );
    let id = read_id(&a_dir);
    wait_for(
        30,
        "the restarted agent's heartbeat reaches the manager",
        || {
            let (m, id, t) = (m.clone(), id.clone(), restarted_at);
            async move {
                let (_, v) = admin_call(&m, reqwest::Method::GET, "/v1/admin/clients", None).await;
                let seen = v["clients"]
                    .as_array()?
                    .iter()
                    .find(|c| c["client_id"] == id.as_str())?["last_seen"]
                    .as_str()?
                    .parse::<chrono::DateTime<chrono::Utc>>()
                    .ok()?;
                (seen > t).then_some(())
            }
        },
    )
    .await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!text.contains("refused"), "{text}");
    drop(again);
}

fn read_id(dir: &std::path::Path) -> String {
    std::fs::read_to_string(dir.join("client_id"))
        .unwrap()
        .trim()
        .to_string()
}
