//! End to end through real processes: a hostile machine on the branch LAN cannot take a
//! server away from the others, and its oversized input is refused.
//! - one address holds at most `limits.max_connections_per_address` connections: beyond,
//!   its new connections are closed at once, while another address (127.0.0.2) is served;
//! - one address holds at most `limits.max_streams_per_address` push streams (503
//!   `too_many_streams` beyond), and another address still gets one;
//! - one address introduces at most `limits.new_clients_per_minute` client ids (429
//!   `too_many_new_clients` with a Retry-After beyond); known clients and other addresses
//!   carry on;
//! - a request body that stalls is cut after `limits.body_read_timeout_s`;
//! - an `X-Gup-Client-Id` over 128 characters, and heartbeat fields over their bounds, are
//!   refused with 400 naming the field;
//! - a notification damper beyond a year is refused with 400 naming the key.
//!
//! Loopback only (127.0.0.1 and 127.0.0.2), every loop bounded.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::json;

/// A manager with these `[limits]`.
fn manager_with_limits(dir: &std::path::Path, limits: &str) -> Proc {
    let cfg = dir.join("manager.toml");
    std::fs::write(&cfg, format!("[manager]\n[limits]\n{limits}")).unwrap();
    start_manager(&dir.join("m"), &["--config", cfg.to_str().unwrap()])
}

fn addr_of(url: &str) -> SocketAddr {
    url.trim_start_matches("http://").parse().unwrap()
}

/// A TCP connection to `to` from the loopback address `from`.
fn connect_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::from((from, 0)).into()).unwrap();
    socket.connect(&to.into()).unwrap();
    let s: TcpStream = socket.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// One keep-alive GET of `path` on `s`; the response head and what came with it.
fn get_on(s: &mut TcpStream, path: &str) -> String {
    let _ = s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn one_address_cannot_take_every_connection() {
    let dir = tempfile::tempdir().unwrap();
    let manager = manager_with_limits(dir.path(), "max_connections_per_address = 4\n");
    let to = addr_of(&manager.url);
    let mut held: Vec<TcpStream> = (0..4).map(|_| connect_from([127, 0, 0, 1], to)).collect();
    for s in held.iter_mut() {
        assert!(get_on(s, "/healthz").starts_with("HTTP/1.1 200"));
    }
    let mut fifth = connect_from([127, 0, 0, 1], to);
    assert_eq!(
        get_on(&mut fifth, "/healthz"),
        "",
        "the fifth connection from one address is closed without an answer"
    );
    let mut other = connect_from([127, 0, 0, 2], to);
    assert!(
        get_on(&mut other, "/healthz").starts_with("HTTP/1.1 200"),
        "another address is served"
    );
    for s in held.iter_mut() {
        assert!(
            get_on(s, "/healthz").starts_with("HTTP/1.1 200"),
            "the held ones carry on"
        );
    }
    assert_eq!(manager.stop(), Some(0));
}

#[test]
fn one_address_holds_a_bounded_number_of_push_streams() {
    let dir = tempfile::tempdir().unwrap();
    let manager = manager_with_limits(dir.path(), "max_streams_per_address = 3\n");
    let to = addr_of(&manager.url);
    let mut streams: Vec<TcpStream> = (0..3).map(|_| connect_from([127, 0, 0, 1], to)).collect();
    for s in streams.iter_mut() {
        let head = get_on(s, "/v1/stream");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    let mut fourth = connect_from([127, 0, 0, 1], to);
    fourth
        .write_all(b"GET /v1/stream HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    // The refusal is a whole answer, and the connection closes after it.
    let mut answer = Vec::new();
    fourth.read_to_end(&mut answer).unwrap();
    let head = String::from_utf8_lossy(&answer);
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(head.contains("too_many_streams"), "{head}");
    assert!(head.to_ascii_lowercase().contains("retry-after"), "{head}");
    let mut other = connect_from([127, 0, 0, 2], to);
    let head = get_on(&mut other, "/v1/stream");
    assert!(head.starts_with("HTTP/1.1 200"), "another address: {head}");
    // A stream that ends gives its place back.
    drop(streams.pop());
    let mut again = None;
    for _ in 0..50 {
        let mut s = connect_from([127, 0, 0, 1], to);
        if get_on(&mut s, "/v1/stream").starts_with("HTTP/1.1 200") {
            again = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(again.is_some(), "a closed stream's place is free again");
    assert_eq!(manager.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_introduces_a_bounded_number_of_client_ids_per_minute() {
    let dir = tempfile::tempdir().unwrap();
    let manager = manager_with_limits(dir.path(), "new_clients_per_minute = 5\n");
    for i in 0..5 {
        let (status, v) = post_json(
            &manager.url,
            "/v1/heartbeat",
            json!({"client_id": format!("new-{i}")}),
        )
        .await;
        assert_eq!(status, 200, "{v}");
    }
    let r = reqwest::Client::new()
        .post(format!("{}/v1/heartbeat", manager.url))
        .json(&json!({"client_id": "new-5"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "too_many_new_clients");
    // A client already known carries on, and so do its uploads.
    let (status, _) = post_json(&manager.url, "/v1/heartbeat", json!({"client_id": "new-0"})).await;
    assert_eq!(status, 200);
    let events = json!({"client_id": "new-1", "events": [
        {"id": "1", "kind": "system_change", "time": "2026-12-03T10:00:00Z"}]});
    let (status, _) = post_json(&manager.url, "/v1/events", events).await;
    assert_eq!(status, 202);
    // Another address introduces its own.
    let other = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let r = other
        .post(format!("{}/v1/heartbeat", manager.url))
        .json(&json!({"client_id": "elsewhere"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(manager.stop(), Some(0));
}

#[test]
fn a_stalled_request_body_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let manager = manager_with_limits(dir.path(), "body_read_timeout_s = 1\n");
    let mut s = connect_from([127, 0, 0, 1], addr_of(&manager.url));
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(
        b"POST /v1/heartbeat HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"client_id\"",
    )
    .unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).expect("an answer before the read timeout");
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("body_incomplete"), "{text}");
    assert_eq!(manager.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_client_ids_and_fields_are_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let sha = publish_and_wait(&manager.url, &[], "defs", "1", &random_bytes(1000, 3)).await;
    let r = reqwest::Client::new()
        .get(format!("{}/v1/content/{sha}", manager.url))
        .header("x-gup-client-id", "x".repeat(129))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "bad_request");
    assert!(
        v["message"].as_str().unwrap().contains("x-gup-client-id"),
        "{v}"
    );
    for (field, body) in [
        ("client_id", json!({"client_id": "c".repeat(129)})),
        ("user", json!({"client_id": "c", "user": "u".repeat(257)})),
        (
            "location",
            json!({"client_id": "c", "location": "l".repeat(65)}),
        ),
        (
            "install_group",
            json!({"client_id": "c", "install_group": "g".repeat(65)}),
        ),
        (
            "client_version",
            json!({"client_id": "c", "client_version": "1".repeat(65)}),
        ),
    ] {
        let (status, v) = post_json(&manager.url, "/v1/heartbeat", body).await;
        assert_eq!(status, 400, "{field}: {v}");
        assert_eq!(v["error"], "bad_request", "{field}: {v}");
        assert!(
            v["message"].as_str().unwrap().starts_with(field),
            "{field}: {v}"
        );
    }
    let (status, v) = post_json(
        &manager.url,
        "/v1/events",
        json!({"client_id": "c", "events": [{"id": "1", "kind": "risk", "subkind": "s".repeat(65),
            "time": "2026-12-03T10:00:00Z"}]}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .starts_with("events[0].subkind"),
        "{v}"
    );
    assert_eq!(manager.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damper_beyond_a_year_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let (status, v) = admin_call(
        &manager.url,
        Method::PUT,
        "/v1/admin/site",
        Some(json!({"notification_damper_s": 9_223_372_036_854_775_808u64})),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"], "bad_setting");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("notification_damper_s"),
        "{v}"
    );
    assert_eq!(manager.stop(), Some(0));
}
