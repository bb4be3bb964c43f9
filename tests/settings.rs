//! End to end through real processes: groups, communications settings, policies,
//! heartbeats, reconnection and push.
//! - the default group's settings are the contract's table;
//! - a group PUT answers 201 when it creates, 200 when it changes; the CLI sets groups and
//!   dotted settings; settings inherit through a tree three levels deep, key by key; a key
//!   set to `null` goes back to inheriting; a cycle is 409; a group with children or clients
//!   cannot be deleted (409);
//! - a parent's location override beats the group's inherited value; a group-only key on a
//!   location is 400 naming the key; invalid values are 400 `bad_setting` naming the key;
//!   malformed JSON is 400 `bad_json`;
//! - policies are inherited with their serial; the policy ETag answers 304 until a policy up
//!   the tree changes; serials come from one counter across groups and never repeat after a
//!   restart;
//! - a heartbeat answers the effective settings and serials; the CLI lists the client and
//!   shows effective settings at a location; settings, policies and clients survive a
//!   restart;
//! - reconnection: a new client lands in its install group; a moved client that keeps
//!   heartbeating stays; a deleted one reconnects to its install group, or to its last group
//!   with `use_last_group` (Windows and Mac only); in user mode a new user moves the client
//!   to that user's group, a user with no mapping keeps the current group, and
//!   `use_last_mode` keeps a Windows client in the previous user's group (not a Mac);
//! - push: a node's stream client gets the current state on connect and hears a change by
//!   push; a pull client learns it at its next heartbeat; a node relays its clients'
//!   heartbeats; with the manager down it answers heartbeats from its mirror and still stops
//!   cleanly.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use reqwest::Method;
use serde_json::{json, Value};

async fn put(manager: &str, path: &str, body: Value) -> (u16, Value) {
    admin_call(manager, Method::PUT, path, Some(body)).await
}

async fn put_ok(manager: &str, path: &str, body: Value) -> Value {
    let (status, v) = put(manager, path, body.clone()).await;
    assert_eq!(status, 200, "PUT {path} {body}: {v}");
    v
}

async fn delete(manager: &str, path: &str) -> (u16, Value) {
    admin_call(manager, Method::DELETE, path, None).await
}

async fn settings(base: &str, group: &str, location: Option<&str>) -> Value {
    let path = match location {
        Some(l) => format!("/v1/groups/{group}/settings?location={l}"),
        None => format!("/v1/groups/{group}/settings"),
    };
    let (status, v) = get_json(base, &path).await;
    assert_eq!(status, 200, "GET {path}: {v}");
    v
}

fn cli_ok(manager: &str, args: &[&str]) -> String {
    let (code, out) = admin_cli(manager, args);
    assert_eq!(code, 0, "gup admin {args:?}: {out}");
    out
}

/// A manager with the tree default > emea > paris > paris-lab:
/// default `heartbeat_interval_s = 120`; emea `mode = push`, `randomization.window_s = 600`;
/// paris `randomization.enabled = false`, and at location `remote`
/// `heartbeat_interval_s = 900`.
async fn tree(m_dir: &std::path::Path) -> Proc {
    let manager = start_manager(m_dir, &[]);
    let m = &manager.url;
    for (group, parent) in [
        ("emea", "default"),
        ("paris", "emea"),
        ("paris-lab", "paris"),
    ] {
        let (status, v) = put(
            m,
            &format!("/v1/admin/groups/{group}"),
            json!({"parent": parent}),
        )
        .await;
        assert_eq!(status, 201, "create {group}: {v}");
    }
    let m = &manager.url;
    put_ok(
        m,
        "/v1/admin/groups/default/settings",
        json!({"heartbeat_interval_s": 120}),
    )
    .await;
    put_ok(
        m,
        "/v1/admin/groups/emea/settings",
        json!({"mode": "push", "randomization": {"window_s": 600}}),
    )
    .await;
    put_ok(
        m,
        "/v1/admin/groups/paris/settings",
        json!({"randomization": {"enabled": false}}),
    )
    .await;
    put_ok(
        m,
        "/v1/admin/groups/paris/settings?location=remote",
        json!({"heartbeat_interval_s": 900}),
    )
    .await;
    manager
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_groups_settings_are_the_contracts_table() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let v = settings(&manager.url, "default", None).await;
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
    assert!(v["serial"].is_u64(), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_put_answers_201_when_it_creates_and_200_when_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let body = json!({"parent": "default"});
    let (status, v) = put(&manager.url, "/v1/admin/groups/lab", body.clone()).await;
    assert_eq!(status, 201, "created: {v}");
    let (status, v) = put(&manager.url, "/v1/admin/groups/lab", body).await;
    assert_eq!(status, 200, "changed: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sets_groups_and_dotted_settings() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let m = &manager.url;
    cli_ok(m, &["group", "set", "emea"]);
    cli_ok(m, &["group", "set", "paris", "--parent", "emea"]);
    cli_ok(
        m,
        &["settings", "set", "default", "heartbeat_interval_s=120"],
    );
    cli_ok(
        m,
        &[
            "settings",
            "set",
            "emea",
            "mode=push",
            "randomization.window_s=600",
        ],
    );
    let (_, groups) = admin_call(m, Method::GET, "/v1/admin/groups", None).await;
    let parent = |name: &str| {
        groups["groups"]
            .as_array()
            .and_then(|gs| gs.iter().find(|g| g["name"] == name))
            .map(|g| g["parent"].clone())
    };
    assert_eq!(parent("emea"), Some(json!("default")), "{groups}");
    assert_eq!(parent("paris"), Some(json!("emea")), "{groups}");
    let v = settings(m, "paris", None).await;
    assert_eq!(v["heartbeat_interval_s"], 120, "from default: {v}");
    assert_eq!(v["mode"], "push", "from emea, its parent: {v}");
    assert_eq!(v["randomization"]["window_s"], 600, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_inherit_key_by_key_through_a_three_level_tree() {
    let dir = tempfile::tempdir().unwrap();
    let manager = tree(&dir.path().join("m")).await;
    let v = settings(&manager.url, "paris-lab", None).await;
    assert_eq!(v["heartbeat_interval_s"], 120, "from default");
    assert_eq!(v["mode"], "push", "from emea");
    assert_eq!(
        v["randomization"],
        json!({"enabled": false, "window_s": 600}),
        "enabled from paris, window_s from emea"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_set_to_null_goes_back_to_inheriting() {
    let dir = tempfile::tempdir().unwrap();
    let manager = tree(&dir.path().join("m")).await;
    put_ok(
        &manager.url,
        "/v1/admin/groups/emea/settings",
        json!({"mode": null}),
    )
    .await;
    let v = settings(&manager.url, "paris-lab", None).await;
    assert_eq!(v["mode"], "pull", "the built-in default again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cycle_in_the_group_tree_is_409() {
    let dir = tempfile::tempdir().unwrap();
    let manager = tree(&dir.path().join("m")).await;
    let (status, v) = put(
        &manager.url,
        "/v1/admin/groups/emea",
        json!({"parent": "paris-lab"}),
    )
    .await;
    assert_eq!(status, 409, "{v}");
    assert_eq!(v["error"], "conflict");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_with_children_cannot_be_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let manager = tree(&dir.path().join("m")).await;
    let (status, v) = delete(&manager.url, "/v1/admin/groups/paris").await;
    assert_eq!(status, 409, "{v}");
    assert_eq!(v["error"], "conflict");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parents_location_override_beats_the_groups_inherited_value() {
    let dir = tempfile::tempdir().unwrap();
    let manager = tree(&dir.path().join("m")).await;
    let v = settings(&manager.url, "paris-lab", Some("remote")).await;
    assert_eq!(
        v["heartbeat_interval_s"], 900,
        "parent@L beats the group's inherited value"
    );
    let v = settings(&manager.url, "paris-lab", Some("office")).await;
    assert_eq!(v["heartbeat_interval_s"], 120, "another location inherits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_only_key_on_a_location_is_400_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let manager = tree(&dir.path().join("m")).await;
    let (status, v) = put(
        &manager.url,
        "/v1/admin/groups/paris/settings?location=remote",
        json!({"reconnection": {"use_last_group": true}}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"], "bad_setting");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("reconnection.use_last_group"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_settings_are_400_bad_setting_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let manager = tree(&dir.path().join("m")).await;
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
        let (status, v) = put(&manager.url, "/v1/admin/groups/emea/settings", body.clone()).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(v["error"], "bad_setting", "{body}");
        assert!(v["message"].as_str().unwrap().contains(key), "{body}: {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_settings_json_is_400_bad_json() {
    let dir = tempfile::tempdir().unwrap();
    let manager = tree(&dir.path().join("m")).await;
    let r = reqwest::Client::new()
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
}

async fn set_policy(manager: &str, group: &str, policy: Value) -> u64 {
    let v = put_ok(manager, &format!("/v1/admin/groups/{group}/policy"), policy).await;
    v["serial"].as_u64().unwrap_or_else(|| panic!("{v}"))
}

async fn policy_status(base: &str, group: &str, if_none_match: Option<&str>) -> (u16, String) {
    let mut req = reqwest::Client::new().get(format!("{base}/v1/groups/{group}/policy"));
    if let Some(e) = if_none_match {
        req = req.header("if-none-match", e);
    }
    let r = req.send().await.unwrap();
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    (r.status().as_u16(), etag)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_is_inherited_down_the_tree_with_its_serial() {
    let dir = tempfile::tempdir().unwrap();
    let manager = tree(&dir.path().join("m")).await;
    let serial = set_policy(&manager.url, "emea", json!({"scan": "daily"})).await;
    let (_, v) = get_json(&manager.url, "/v1/groups/paris-lab/policy").await;
    assert_eq!(v["policy"], json!({"scan": "daily"}), "{v}");
    assert_eq!(v["serial"], serial, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_etag_answers_304_until_a_policy_up_the_tree_changes() {
    let dir = tempfile::tempdir().unwrap();
    let manager = tree(&dir.path().join("m")).await;
    set_policy(&manager.url, "emea", json!({"scan": "daily"})).await;
    let (_, etag) = policy_status(&manager.url, "paris-lab", None).await;
    let (status, _) = policy_status(&manager.url, "paris-lab", Some(&etag)).await;
    assert_eq!(status, 304, "unchanged");
    set_policy(&manager.url, "paris", json!({"scan": "hourly"})).await;
    let (status, _) = policy_status(&manager.url, "paris-lab", Some(&etag)).await;
    assert_eq!(status, 200, "changed by the parent's policy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_serials_come_from_one_counter_across_groups() {
    let dir = tempfile::tempdir().unwrap();
    let manager = tree(&dir.path().join("m")).await;
    let emea = set_policy(&manager.url, "emea", json!({"scan": "daily"})).await;
    let paris = set_policy(&manager.url, "paris", json!({"scan": "hourly"})).await;
    assert!(paris > emea, "{paris} after {emea}");
}

fn pc1() -> Value {
    json!({"client_id": "pc-1", "install_group": "paris-lab", "location": "remote",
           "os": "windows", "client_version": "12.1.5", "mode": "computer"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_answers_the_effective_settings_and_serials() {
    let dir = tempfile::tempdir().unwrap();
    let manager = tree(&dir.path().join("m")).await;
    let serial = set_policy(&manager.url, "paris", json!({"scan": "hourly"})).await;
    let v = heartbeat_ok(&manager.url, pc1()).await;
    assert_eq!(v["group"], "paris-lab");
    assert_eq!(v["next_heartbeat_s"], 900, "paris@remote");
    assert_eq!(v["settings"]["heartbeat_interval_s"], 900, "{v}");
    assert_eq!(v["policy_serial"], serial);
    assert_eq!(
        v["download_slot"],
        Value::Null,
        "randomization is off in paris"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_clients_and_shows_effective_settings_at_a_location() {
    let dir = tempfile::tempdir().unwrap();
    let manager = tree(&dir.path().join("m")).await;
    heartbeat_ok(&manager.url, pc1()).await;
    let out = cli_ok(&manager.url, &["client", "list"]);
    assert!(out.contains("pc-1") && out.contains("paris-lab"), "{out}");
    let out = cli_ok(
        &manager.url,
        &["settings", "get", "paris-lab", "--location", "remote"],
    );
    assert!(
        out.contains("heartbeat_interval_s") && out.contains("900"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_policies_and_clients_survive_a_manager_restart() {
    let dir = tempfile::tempdir().unwrap();
    let m_dir = dir.path().join("m");
    let manager = tree(&m_dir).await;
    set_policy(&manager.url, "paris", json!({"scan": "hourly"})).await;
    heartbeat_ok(&manager.url, pc1()).await;
    assert_eq!(manager.stop(), Some(0));

    let manager = start_manager(&m_dir, &[]);
    let v = settings(&manager.url, "paris-lab", Some("remote")).await;
    assert_eq!(v["heartbeat_interval_s"], 900, "a location override");
    assert_eq!(
        v["randomization"],
        json!({"enabled": false, "window_s": 600}),
        "group settings"
    );
    let (_, v) = get_json(&manager.url, "/v1/groups/paris-lab/policy").await;
    assert_eq!(v["policy"], json!({"scan": "hourly"}), "the policy");
    let (_, v) = admin_call(&manager.url, Method::GET, "/v1/admin/clients", None).await;
    assert_eq!(v["clients"][0]["client_id"], "pc-1", "the client: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_serials_never_repeat_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let m_dir = dir.path().join("m");
    let manager = tree(&m_dir).await;
    let before = set_policy(&manager.url, "paris", json!({"scan": "hourly"})).await;
    assert_eq!(manager.stop(), Some(0));
    let manager = start_manager(&m_dir, &[]);
    let after = set_policy(&manager.url, "emea", json!({"x": 1})).await;
    assert!(after > before, "{after} after {before}");
}

/// A manager with the groups install, moved, sticky, alice-group and bob-group, and the users
/// alice (through the CLI) and bob mapped to theirs.
async fn reconnection() -> (tempfile::TempDir, Proc) {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    for g in ["install", "moved", "sticky", "alice-group", "bob-group"] {
        let (status, v) = put(
            &manager.url,
            &format!("/v1/admin/groups/{g}"),
            json!({"parent": "default"}),
        )
        .await;
        assert_eq!(status, 201, "create {g}: {v}");
    }
    cli_ok(&manager.url, &["user", "set", "alice", "alice-group"]);
    put_ok(
        &manager.url,
        "/v1/admin/users/bob",
        json!({"group": "bob-group"}),
    )
    .await;
    (dir, manager)
}

fn hb(id: &str, os: &str) -> Value {
    json!({"client_id": id, "install_group": "install", "os": os})
}

fn user_hb(id: &str, os: &str, user: &str) -> Value {
    json!({"client_id": id, "install_group": "install", "os": os, "mode": "user", "user": user})
}

async fn group_of(manager: &str, body: Value) -> String {
    heartbeat_ok(manager, body).await["group"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn move_client(manager: &str, id: &str, group: &str) {
    let (status, v) = admin_call(
        manager,
        Method::POST,
        &format!("/v1/admin/clients/{id}/move"),
        Some(json!({"group": group})),
    )
    .await;
    assert_eq!(status, 200, "move {id} to {group}: {v}");
}

async fn delete_client(manager: &str, id: &str) {
    let (status, v) = delete(manager, &format!("/v1/admin/clients/{id}")).await;
    assert_eq!(status, 200, "delete {id}: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_client_lands_in_its_install_group() {
    let (_dir, manager) = reconnection().await;
    assert_eq!(group_of(&manager.url, hb("c1", "windows")).await, "install");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_client_that_keeps_heartbeating_stays_where_it_was_moved() {
    let (_dir, manager) = reconnection().await;
    heartbeat_ok(&manager.url, hb("c1", "windows")).await;
    cli_ok(&manager.url, &["client", "move", "c1", "moved"]);
    assert_eq!(group_of(&manager.url, hb("c1", "windows")).await, "moved");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_client_reconnects_to_its_install_group() {
    let (_dir, manager) = reconnection().await;
    heartbeat_ok(&manager.url, hb("c1", "windows")).await;
    move_client(&manager.url, "c1", "moved").await;
    delete_client(&manager.url, "c1").await;
    assert_eq!(group_of(&manager.url, hb("c1", "windows")).await, "install");
}

/// Makes `sticky` a `use_last_group` group, and moves `id` there and deletes its record.
async fn moved_to_sticky_and_deleted(manager: &str, id: &str, os: &str) {
    put_ok(
        manager,
        "/v1/admin/groups/sticky/settings",
        json!({"reconnection": {"use_last_group": true}}),
    )
    .await;
    heartbeat_ok(manager, hb(id, os)).await;
    move_client(manager, id, "sticky").await;
    delete_client(manager, id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn use_last_group_brings_a_deleted_windows_or_mac_client_back_to_its_last_group() {
    let (_dir, manager) = reconnection().await;
    for (id, os) in [("c2", "windows"), ("c3", "mac")] {
        moved_to_sticky_and_deleted(&manager.url, id, os).await;
        assert_eq!(group_of(&manager.url, hb(id, os)).await, "sticky", "{os}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn use_last_group_has_no_effect_for_a_linux_client() {
    let (_dir, manager) = reconnection().await;
    moved_to_sticky_and_deleted(&manager.url, "c4", "linux").await;
    assert_eq!(group_of(&manager.url, hb("c4", "linux")).await, "install");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_with_clients_cannot_be_deleted() {
    let (_dir, manager) = reconnection().await;
    heartbeat_ok(&manager.url, hb("c2", "windows")).await;
    move_client(&manager.url, "c2", "sticky").await;
    let (status, v) = delete(&manager.url, "/v1/admin/groups/sticky").await;
    assert_eq!(status, 409, "{v}");
    assert_eq!(v["error"], "conflict");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_user_mode_a_new_user_moves_the_client_to_that_users_group() {
    let (_dir, manager) = reconnection().await;
    let m = &manager.url;
    assert_eq!(
        group_of(m, user_hb("u1", "windows", "alice")).await,
        "alice-group"
    );
    assert_eq!(
        group_of(m, user_hb("u1", "windows", "bob")).await,
        "bob-group"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_with_no_group_mapping_keeps_the_clients_current_group() {
    let (_dir, manager) = reconnection().await;
    let m = &manager.url;
    assert_eq!(
        group_of(m, user_hb("u1", "windows", "bob")).await,
        "bob-group"
    );
    assert_eq!(
        group_of(m, user_hb("u1", "windows", "carol")).await,
        "bob-group"
    );
}

/// Turns on `use_last_mode` in bob-group.
async fn bob_group_uses_last_mode(manager: &str) {
    put_ok(
        manager,
        "/v1/admin/groups/bob-group/settings",
        json!({"reconnection.use_last_mode": true}),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn use_last_mode_keeps_a_windows_client_in_the_previous_users_group() {
    let (_dir, manager) = reconnection().await;
    let m = &manager.url;
    bob_group_uses_last_mode(m).await;
    assert_eq!(
        group_of(m, user_hb("u1", "windows", "bob")).await,
        "bob-group"
    );
    assert_eq!(
        group_of(m, user_hb("u1", "windows", "alice")).await,
        "bob-group"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn use_last_mode_has_no_effect_for_a_mac_client() {
    let (_dir, manager) = reconnection().await;
    let m = &manager.url;
    bob_group_uses_last_mode(m).await;
    assert_eq!(group_of(m, user_hb("u2", "mac", "bob")).await, "bob-group");
    assert_eq!(
        group_of(m, user_hb("u2", "mac", "alice")).await,
        "alice-group"
    );
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

struct Branch {
    _dir: tempfile::TempDir,
    manager: Proc,
    node: Proc,
}

/// A manager with the group `branch` and a node in push mode that mirrors it. In push mode
/// the node re-polls only every 300 s (a safety net): within a test only its push stream can
/// bring changes. It relays heartbeats every 2 s.
async fn branch() -> Branch {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let (status, v) = put(
        &manager.url,
        "/v1/admin/groups/branch",
        json!({"parent": "default"}),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    let node = start_node_toml(
        &dir.path().join("n"),
        &[&manager.url],
        "mode = \"push\"\nsync_interval_s = 2\n",
        &[],
    );
    wait_ready(&node.url).await;
    Branch {
        _dir: dir,
        manager,
        node,
    }
}

fn pc9() -> Value {
    json!({"client_id": "pc-9", "install_group": "branch", "os": "windows"})
}

/// Sets branch's heartbeat interval to 77 on the manager and waits until the node serves it.
async fn change_branch_and_wait(b: &Branch) {
    put_ok(
        &b.manager.url,
        "/v1/admin/groups/branch/settings",
        json!({"heartbeat_interval_s": 77}),
    )
    .await;
    wait_for(20, "the node mirrors the change", || {
        let u = b.node.url.clone();
        async move {
            let (_, v) = get_json(&u, "/v1/groups/branch/settings").await;
            (v["heartbeat_interval_s"] == 77).then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_client_of_a_node_gets_the_current_state_on_connect() {
    let b = branch().await;
    let resp = reqwest::get(format!("{}/v1/stream?client_id=pc-9", b.node.url))
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.bytes_stream();
    let mut parser = gup::core::proto::EventParser::default();
    assert!(
        wait_event(
            &mut body,
            &mut parser,
            |n, v| n == "catalog" && v["revision"].is_u64(),
            10
        )
        .await,
        "a catalog event on connect"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settings_change_is_pushed_through_the_node_to_a_stream_client() {
    let b = branch().await;
    let serial0 = heartbeat_ok(&b.node.url, pc9()).await["settings"]["serial"]
        .as_u64()
        .unwrap();
    let resp = reqwest::get(format!("{}/v1/stream?client_id=pc-9", b.node.url))
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    let mut parser = gup::core::proto::EventParser::default();
    // Connected once the current state arrived.
    assert!(
        wait_event(&mut body, &mut parser, |n, _| n == "catalog", 10).await,
        "the current state on connect"
    );
    let started = std::time::Instant::now();
    put_ok(
        &b.manager.url,
        "/v1/admin/groups/branch/settings",
        json!({"heartbeat_interval_s": 77}),
    )
    .await;
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
    let v = settings(&b.node.url, "branch", None).await;
    assert_eq!(v["heartbeat_interval_s"], 77, "the node serves the change");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_client_learns_a_change_at_its_next_heartbeat() {
    let b = branch().await;
    let first = heartbeat_ok(&b.node.url, pc9()).await;
    assert_eq!(first["group"], "branch");
    let serial0 = first["settings"]["serial"].as_u64().unwrap();
    change_branch_and_wait(&b).await;
    let next = heartbeat_ok(&b.node.url, pc9()).await;
    assert_eq!(next["next_heartbeat_s"], 77);
    assert!(
        next["settings"]["serial"].as_u64() > Some(serial0),
        "{next}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_relays_its_clients_heartbeats_to_the_manager() {
    let b = branch().await;
    heartbeat_ok(&b.node.url, pc9()).await;
    wait_registered(&b.manager.url, "pc-9", Some("branch")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_manager_down_a_node_answers_heartbeats_from_its_mirror_and_stops_cleanly() {
    let b = branch().await;
    change_branch_and_wait(&b).await;
    let Branch {
        _dir,
        manager,
        node,
    } = b;
    assert_eq!(manager.stop(), Some(0));
    let v = heartbeat_ok(&node.url, pc9()).await;
    assert_eq!(v["group"], "branch");
    assert_eq!(v["next_heartbeat_s"], 77);
    assert_eq!(node.stop(), Some(0), "the node stops cleanly");
}
