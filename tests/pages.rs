//! End to end: the status pages, loaded in headless Chromium (through ChromeDriver's
//! WebDriver API) from a real manager and a real node with real agents behind the node.
//! - the node's `GET /` (no token) shows its upstream up, the published item in the store,
//!   the WAN/LAN plot with its points and the download-start histogram with its bars, and
//!   no token anywhere in the page;
//! - the manager's `GET /admin` without a credential is the login form (401); a wrong token
//!   is refused (401), a form without a token is a 400 with a JSON error; `Authorization:
//!   Bearer` shows the page; the browser logs in through the form, gets an HttpOnly,
//!   SameSite=Strict session cookie, and sees the node reporting and current, the group
//!   tree with its clients, the
//!   notification raised, the catalog, and the heartbeat and event plots with their points;
//!   logging out brings the form back.
//!
//! With `GUP_SCREENSHOTS=DIR` the test writes `node-page.png` and `manager-page.png` there
//! (the README's pictures come from `GUP_SCREENSHOTS=docs`).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::browser::Browser;
use common::*;
use reqwest::Method;
use serde_json::json;

/// Loads `url` until `check` holds of the page (it refreshes itself every 10 s; reloading
/// is quicker), or panics after `secs` saying what was awaited.
async fn until(b: &Browser, url: &str, secs: u64, what: &str, css: &str, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        b.goto(url).await;
        let text = b.text(css).await;
        if text.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {css} reads {text:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn save(png: &[u8], name: &str) {
    if let Ok(dir) = std::env::var("GUP_SCREENSHOTS") {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(Path::new(&dir).join(name), png).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_status_pages_render_their_state_and_plots_in_a_browser() {
    let browser = Browser::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let manager = start_manager(&tmp.path().join("m"), &[]);
    let m = manager.url.clone();
    let (status, v) = admin_call(
        &m,
        Method::PUT,
        "/v1/admin/groups/lab",
        Some(json!({"parent": "default"})),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    let (status, v) = admin_call(
        &m,
        Method::PUT,
        "/v1/admin/groups/default/settings",
        Some(json!({"heartbeat_interval_s": 1, "randomization": {"enabled": true, "window_s": 5}})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let node = start_node_toml(
        &tmp.path().join("n"),
        &[&m],
        "sync_interval_s = 1\n[node]\nname = \"branch-a\"\n",
        &[],
    );
    let n = node.url.clone();
    wait_ready(&n).await;
    let data = random_bytes(300_000, 19);
    publish_and_wait(&m, &[&n], "defs", "1.0", &data).await;
    let mut agents = Vec::new();
    for (i, group) in ["default", "default", "lab"].iter().enumerate() {
        let dir = tmp.path().join(format!("a{i}"));
        let id = format!("pc-{i}");
        agents.push((start_agent(&dir, &[&n], group, &["--client-id", &id]), dir));
    }
    for (_, dir) in &agents {
        let file = dir.join("content").join("defs");
        wait_for(60, "an agent downloads defs", || {
            let (f, want) = (file.clone(), sha256_hex(&data));
            async move {
                std::fs::read(&f)
                    .ok()
                    .filter(|b| sha256_hex(b) == want)
                    .map(|_| ())
            }
        })
        .await;
    }
    // A critical event raises a notification for the manager page.
    let (status, v) = post_json(
        &m,
        "/v1/events",
        json!({"client_id": "pc-0", "events": [{"id": "e1", "kind": "intrusion",
            "subkind": "port_scan", "time": chrono::Utc::now(), "data": {}}]}),
    )
    .await;
    assert_eq!(status, 202, "{v}");

    // === The node page ===
    let raw = reqwest::get(format!("{n}/")).await.unwrap();
    assert_eq!(raw.status(), 200);
    assert!(raw.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let html = raw.text().await.unwrap();
    assert!(
        !html.contains(NODE_TOKEN) && !html.contains(ADMIN_TOKEN),
        "a token on the page:\n{html}"
    );
    assert!(!html.contains("<script"), "the page needs no script");
    browser.goto(&format!("{n}/")).await;
    let catalog = browser.text("#catalog").await;
    assert!(
        catalog.contains("defs") && catalog.contains("1.0"),
        "{catalog}"
    );
    assert!(catalog.contains("in store"), "{catalog}");
    let upstreams = browser.text("#upstreams").await;
    assert!(upstreams.contains(" up"), "{upstreams}");
    let mirror = browser.text("#mirror").await;
    assert!(mirror.contains("fresh"), "{mirror}");
    // WAN and LAN: a point each for the minute running at least.
    let wan = browser
        .count("#traffic g[data-series=WAN] circle.point")
        .await;
    let lan = browser
        .count("#traffic g[data-series=LAN] circle.point")
        .await;
    assert!(wan >= 1 && lan >= 1, "points: WAN {wan}, LAN {lan}");
    // The 5 s window in 5 bars of a second, three starts among them.
    assert_eq!(browser.count("svg#starts rect.bar").await, 5);
    assert!(
        browser.text("body").await.contains("3 starts since"),
        "{}",
        browser.text("body").await
    );
    save(&browser.screenshot().await, "node-page.png");

    // === The manager page, without a browser first ===
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = http.get(format!("{m}/admin")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let body = r.text().await.unwrap();
    assert!(body.contains("id=\"login\"") && !body.contains("id=\"groups\""));
    let r = http
        .get(format!("{m}/admin"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("id=\"groups\""));
    let r = http
        .get(format!("{m}/admin"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post(format!("{m}/admin/login"))
        .body("token=wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    let r = http
        .post(format!("{m}/admin/login"))
        .body("nothing=here")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "bad_form", "{v}");

    // === The manager page in the browser: log in through the form ===
    let admin = format!("{m}/admin");
    browser.goto(&admin).await;
    assert_eq!(browser.count("form#login").await, 1);
    assert_eq!(browser.count("#groups").await, 0);
    browser.type_into("#token", ADMIN_TOKEN).await;
    browser.click("#submit").await;
    browser.wait_for("#groups", 20).await;
    let cookies = browser.cookies().await;
    let session = cookies
        .iter()
        .find(|c| c["name"] == "gup_session")
        .unwrap_or_else(|| panic!("no session cookie: {cookies:?}"));
    assert_eq!(session["httpOnly"], true, "{session}");
    assert_eq!(session["sameSite"], "Strict", "{session}");
    assert!(!session["value"].as_str().unwrap().contains(ADMIN_TOKEN));
    // Heartbeats relayed by the node reach the registry; the client count follows within
    // its interval.
    until(
        &browser,
        &admin,
        60,
        "the lab client counted",
        "#groups",
        "lab 1 0",
    )
    .await;
    let groups = browser.text("#groups").await;
    assert!(groups.contains("default 2 0"), "{groups}");
    // The node reports itself each sync interval: its row says it is current and reporting.
    until(
        &browser,
        &admin,
        30,
        "the node listed",
        "#nodes",
        "branch-a",
    )
    .await;
    let nodes = browser.text("#nodes").await;
    assert!(
        nodes.contains("direct") && nodes.contains("current") && nodes.contains("reporting"),
        "{nodes}"
    );
    assert!(browser.text("#notifications").await.contains("intrusion"));
    assert!(browser.text("#catalog").await.contains("defs"));
    assert!(browser.text("#revisions").await.contains('1'));
    let hb = browser.count("svg#heartbeats circle.point").await;
    let ev = browser.count("svg#events circle.point").await;
    assert!(hb >= 1 && ev >= 1, "points: heartbeats {hb}, events {ev}");
    assert!(!browser.text("body").await.contains(ADMIN_TOKEN));
    save(&browser.screenshot().await, "manager-page.png");

    browser.click("#logout").await;
    browser.wait_for("form#login", 20).await;
    assert_eq!(browser.count("#groups").await, 0, "logged out");
    browser.goto(&admin).await;
    assert_eq!(browser.count("#groups").await, 0, "the session is gone");
    drop(agents);
}
