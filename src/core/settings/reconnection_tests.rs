//! Unit tests of group resolution for heartbeating clients, rule by rule: the install group
//! for new clients, reconnects and `use_last_group`, users and `use_last_mode`, and the result
//! always being an existing group.

use serde_json::json;

use super::{resolve_client_group, ClientHistory, HeartbeatFacts};
use crate::core::settings::test_support::tree;
use crate::core::settings::{Directory, LoginMode, Os};

fn hb(install: &str, os: Os, reconnect: bool) -> HeartbeatFacts<'_> {
    HeartbeatFacts {
        install_group: install,
        os,
        login_mode: LoginMode::Computer,
        user: None,
        reconnect,
    }
}

fn hist(install: &str, group: &str) -> ClientHistory {
    ClientHistory {
        install_group: install.into(),
        group: group.into(),
        last_moved_group: Some(group.into()),
        login_mode: LoginMode::Computer,
        last_user: None,
        admin_hold: false,
    }
}

fn no_users(_: &str) -> Option<String> {
    None
}

fn users(u: &str) -> Option<String> {
    match u {
        "alice" => Some("a".into()),
        "bob" => Some("c".into()),
        "ghost" => Some("deleted-group".into()),
        _ => None,
    }
}

#[test]
fn rule1_new_client_uses_install_group() {
    let d = tree();
    assert_eq!(
        resolve_client_group(&d, None, &hb("b", Os::Windows, true), no_users),
        "b"
    );
    assert_eq!(
        resolve_client_group(&d, None, &hb("nope", Os::Windows, true), no_users),
        "default"
    );
    // reconnect flag does not matter without a record
    assert_eq!(
        resolve_client_group(&d, None, &hb("c", Os::Linux, false), no_users),
        "c"
    );
}

#[test]
fn rule1_moved_client_keeping_heartbeats_stays() {
    let d = tree();
    let p = hist("a", "c");
    for os in [Os::Windows, Os::Mac, Os::Linux] {
        assert_eq!(
            resolve_client_group(&d, Some(&p), &hb("a", os, false), no_users),
            "c"
        );
    }
}

#[test]
fn rule2_reconnect_returns_to_install_group() {
    let d = tree();
    let p = hist("a", "c");
    for os in [Os::Windows, Os::Mac, Os::Linux] {
        assert_eq!(
            resolve_client_group(&d, Some(&p), &hb("a", os, true), no_users),
            "a"
        );
    }
    // The record's install group wins over the heartbeat's.
    assert_eq!(
        resolve_client_group(&d, Some(&p), &hb("b", Os::Windows, true), no_users),
        "a"
    );
    // A deleted recorded install group falls back to the heartbeat's.
    let p = hist("gone", "c");
    assert_eq!(
        resolve_client_group(&d, Some(&p), &hb("b", Os::Windows, true), no_users),
        "b"
    );
    let p = hist("", "c");
    assert_eq!(
        resolve_client_group(&d, Some(&p), &hb("nope", Os::Windows, true), no_users),
        "default"
    );
}

#[test]
fn rule2_use_last_group_windows_and_mac_only() {
    let mut d = tree();
    d.put_settings(
        "c",
        None,
        &json!({"reconnection": {"use_last_group": true}}),
    )
    .unwrap();
    let p = hist("a", "c");
    assert_eq!(
        resolve_client_group(&d, Some(&p), &hb("a", Os::Windows, true), no_users),
        "c"
    );
    assert_eq!(
        resolve_client_group(&d, Some(&p), &hb("a", Os::Mac, true), no_users),
        "c"
    );
    assert_eq!(
        resolve_client_group(&d, Some(&p), &hb("a", Os::Linux, true), no_users),
        "a"
    );
    // Read on the last group, not the install group.
    let mut d2 = tree();
    d2.put_settings("a", None, &json!({"reconnection.use_last_group": true}))
        .unwrap();
    assert_eq!(
        resolve_client_group(&d2, Some(&p), &hb("a", Os::Windows, true), no_users),
        "a"
    );
    // Inherited from an ancestor counts.
    let mut d3 = tree();
    d3.put_settings(
        "default",
        None,
        &json!({"reconnection.use_last_group": true}),
    )
    .unwrap();
    assert_eq!(
        resolve_client_group(&d3, Some(&p), &hb("a", Os::Mac, true), no_users),
        "c"
    );
    // A last group that no longer exists cannot be stayed in.
    let p = hist("a", "gone");
    assert_eq!(
        resolve_client_group(&d3, Some(&p), &hb("a", Os::Windows, true), no_users),
        "a"
    );
}

fn user_hb<'a>(install: &'a str, os: Os, reconnect: bool, user: &'a str) -> HeartbeatFacts<'a> {
    HeartbeatFacts {
        install_group: install,
        os,
        login_mode: LoginMode::User,
        user: Some(user),
        reconnect,
    }
}

#[test]
fn rule3_new_user_moves_to_users_group() {
    let d = tree();
    // First user, no record.
    assert_eq!(
        resolve_client_group(&d, None, &user_hb("b", Os::Linux, true, "alice"), users),
        "a"
    );
    // New user replacing alice.
    let mut p = hist("b", "a");
    p.last_user = Some("alice".into());
    assert_eq!(
        resolve_client_group(
            &d,
            Some(&p),
            &user_hb("b", Os::Windows, false, "bob"),
            users
        ),
        "c"
    );
    // Unmapped new user keeps the current group.
    assert_eq!(
        resolve_client_group(
            &d,
            Some(&p),
            &user_hb("b", Os::Windows, false, "carol"),
            users
        ),
        "a"
    );
    // Mapping to a deleted group counts as no mapping.
    assert_eq!(
        resolve_client_group(
            &d,
            Some(&p),
            &user_hb("b", Os::Windows, false, "ghost"),
            users
        ),
        "a"
    );
    // Computer mode ignores users; user mode without a user too.
    let mut h = user_hb("b", Os::Windows, false, "bob");
    h.login_mode = LoginMode::Computer;
    assert_eq!(resolve_client_group(&d, Some(&p), &h, users), "a");
    let mut h = user_hb("b", Os::Windows, false, "");
    h.user = None;
    assert_eq!(resolve_client_group(&d, Some(&p), &h, users), "a");
    let h = user_hb("b", Os::Windows, false, "");
    assert_eq!(resolve_client_group(&d, Some(&p), &h, users), "a");
}

#[test]
fn rule3_same_user_is_stable() {
    let d = tree();
    let mut p = hist("b", "a");
    p.last_user = Some("alice".into());
    p.login_mode = LoginMode::User;
    assert_eq!(
        resolve_client_group(
            &d,
            Some(&p),
            &user_hb("b", Os::Windows, false, "alice"),
            users
        ),
        "a"
    );
    // Same unmapped user: current group.
    let mut p = hist("b", "c");
    p.last_user = Some("carol".into());
    assert_eq!(
        resolve_client_group(
            &d,
            Some(&p),
            &user_hb("b", Os::Windows, false, "carol"),
            users
        ),
        "c"
    );
    // Same user, moved by an admin, still heartbeating: the move sticks.
    let mut p = hist("b", "c");
    p.last_user = Some("alice".into());
    assert_eq!(
        resolve_client_group(
            &d,
            Some(&p),
            &user_hb("b", Os::Windows, false, "alice"),
            users
        ),
        "c"
    );
    // Same user after a reconnect still lands in the user's group.
    let mut p = hist("b", "c");
    p.last_user = Some("alice".into());
    assert_eq!(
        resolve_client_group(&d, Some(&p), &user_hb("b", Os::Mac, true, "alice"), users),
        "a"
    );
}

#[test]
fn rule3_use_last_mode_windows_only_read_on_current_group() {
    let mut d = tree();
    d.put_settings("a", None, &json!({"reconnection.use_last_mode": true}))
        .unwrap();
    let mut p = hist("b", "a");
    p.last_user = Some("alice".into());
    // Windows: stays in the previous user's group.
    assert_eq!(
        resolve_client_group(
            &d,
            Some(&p),
            &user_hb("b", Os::Windows, false, "bob"),
            users
        ),
        "a"
    );
    // Mac and Linux: no effect.
    assert_eq!(
        resolve_client_group(&d, Some(&p), &user_hb("b", Os::Mac, false, "bob"), users),
        "c"
    );
    assert_eq!(
        resolve_client_group(&d, Some(&p), &user_hb("b", Os::Linux, false, "bob"), users),
        "c"
    );
    // Read on the current group (after steps 1-2), not on the user's target group.
    let mut d2 = tree();
    d2.put_settings("c", None, &json!({"reconnection.use_last_mode": true}))
        .unwrap();
    assert_eq!(
        resolve_client_group(
            &d2,
            Some(&p),
            &user_hb("b", Os::Windows, false, "bob"),
            users
        ),
        "c"
    );
    // After a reconnect the current group is the install group b (child of a): inherited on.
    let mut p2 = hist("b", "c");
    p2.last_user = Some("alice".into());
    assert_eq!(
        resolve_client_group(
            &d,
            Some(&p2),
            &user_hb("b", Os::Windows, true, "bob"),
            users
        ),
        "b"
    );
}

#[test]
fn rules_combined_use_last_group_then_user() {
    let mut d = tree();
    d.put_settings(
        "c",
        None,
        &json!({"reconnection": {"use_last_group": true, "use_last_mode": true}}),
    )
    .unwrap();
    let mut p = hist("b", "c");
    p.last_user = Some("bob".into());
    // Reconnect on Windows: stays in c (use_last_group), new user alice, use_last_mode on c -> stays.
    assert_eq!(
        resolve_client_group(
            &d,
            Some(&p),
            &user_hb("b", Os::Windows, true, "alice"),
            users
        ),
        "c"
    );
    // Mac: stays in c by use_last_group, but use_last_mode has no effect -> alice's group a.
    assert_eq!(
        resolve_client_group(&d, Some(&p), &user_hb("b", Os::Mac, true, "alice"), users),
        "a"
    );
    // Linux: back to b, then alice's group a.
    assert_eq!(
        resolve_client_group(&d, Some(&p), &user_hb("b", Os::Linux, true, "alice"), users),
        "a"
    );
}

#[test]
fn rule4_result_always_exists() {
    let d = tree();
    let p = hist("gone1", "gone2");
    let g = resolve_client_group(&d, Some(&p), &hb("gone3", Os::Windows, false), no_users);
    assert_eq!(g, "default");
    let g = resolve_client_group(&d, Some(&p), &hb("gone3", Os::Windows, true), no_users);
    assert_eq!(g, "default");
    let empty: Directory = serde_json::from_value(json!({"groups": {}, "counter": 0})).unwrap();
    assert_eq!(
        resolve_client_group(&empty, None, &hb("x", Os::Windows, true), users),
        "default"
    );
}
