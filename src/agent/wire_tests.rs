use super::*;

#[test]
fn versions_compare_as_dotted_numbers() {
    let min = CRITICAL_MIN_VERSION;
    for v in [
        "12.1.4", "12.1.5", "12.2", "13", "12.10.0", "12.1.4.1", "012.1.4",
    ] {
        assert!(version_at_least(v, &min), "{v}");
    }
    for v in [
        "12.1.3",
        "12.1",
        "12",
        "11.9.9",
        "",
        "abc",
        "12.1.4-beta",
        "12..4",
        " 12.1.4",
    ] {
        assert!(!version_at_least(v, &min), "{v}");
    }
}

#[test]
fn critical_events_go_at_once_only_for_windows_at_12_1_4_with_the_setting() {
    assert!(critical_at_once(true, "windows", "12.1.4"));
    assert!(critical_at_once(true, "windows", "12.2.0"));
    assert!(!critical_at_once(false, "windows", "12.1.4"));
    assert!(!critical_at_once(true, "windows", "12.1.3"));
    assert!(!critical_at_once(true, "windows", "twelve"));
    assert!(!critical_at_once(true, "mac", "12.1.5"));
    assert!(!critical_at_once(true, "linux", "13.0"));
}

#[test]
fn critical_kinds_follow_the_contract() {
    assert!(is_critical("risk", "virus"));
    assert!(!is_critical("risk", "cookie"));
    assert!(is_critical("intrusion", "port_scan"));
    assert!(!is_critical("system_change", "virus"));
}

#[test]
fn slot_delay_prefers_a_consistent_not_before() {
    let now = chrono::DateTime::parse_from_rfc3339("2030-01-01T00:00:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let slot = |nb: Option<&str>, delay_s: f64| DownloadSlot {
        catalog_revision: 1,
        not_before: nb.map(str::to_string),
        delay_s,
        window_s: Some(20),
        window_start: Some("2029-12-31T23:59:55Z".to_string()),
    };
    let precise = slot(Some("2030-01-01T00:00:15.250Z"), 16.0);
    assert_eq!(slot_delay(&precise, now), Duration::from_millis(15_270));
    // A skewed clock: not_before far from delay_s, so delay_s wins.
    let skewed = slot(Some("2030-01-01T01:00:00Z"), 16.0);
    assert_eq!(slot_delay(&skewed, now), Duration::from_secs(16));
    assert_eq!(slot_delay(&slot(None, 3.0), now), Duration::from_secs(3));
    assert_eq!(slot_delay(&slot(Some("junk"), 0.0), now), Duration::ZERO);
    let past = slot(Some("2029-12-31T23:59:59.500Z"), 0.0);
    assert_eq!(slot_delay(&past, now), Duration::from_millis(20));
}

#[test]
fn window_age_counts_from_the_servers_opening_either_side_of_now() {
    let now = chrono::DateTime::parse_from_rfc3339("2030-01-01T00:00:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let slot = |start: Option<&str>| DownloadSlot {
        catalog_revision: 1,
        not_before: None,
        delay_s: 0.0,
        window_s: Some(60),
        window_start: start.map(str::to_string),
    };
    let opened = slot(Some("2029-12-31T23:59:45.500Z"));
    assert_eq!(window_age(&opened, now), Some(14.5));
    // A node announces a revision before its prefetch slot opens the window.
    let opens_later = slot(Some("2030-01-01T00:00:01.500Z"));
    assert_eq!(window_age(&opens_later, now), Some(-1.5));
    // Beyond the window or a day ahead: a skewed clock, not an answer.
    assert_eq!(window_age(&slot(Some("2029-12-31T23:58:00Z")), now), None);
    assert_eq!(window_age(&slot(Some("2030-01-03T00:00:00Z")), now), None);
    assert_eq!(window_age(&slot(None), now), None);
    assert_eq!(window_age(&slot(Some("junk")), now), None);
}

#[test]
fn metrics_text_is_read() {
    let text = "# HELP gup_upstream_fetches Blob fetches.\n# TYPE gup_upstream_fetches counter\n\
                gup_upstream_fetches_total 7\ngup_upstream_fetches_total_other 100\n\
                gup_upstream_bytes_total 12345\n";
    assert_eq!(parse_metric(text, "gup_upstream_fetches_total"), Some(7));
    let labelled = "gup_upstream_fetches_total{upstream=\"a\"} 2\ngup_upstream_fetches_total{upstream=\"b\"} 3.0\n";
    assert_eq!(
        parse_metric(labelled, "gup_upstream_fetches_total"),
        Some(5)
    );
    assert_eq!(parse_metric("", "gup_upstream_fetches_total"), None);
}

#[test]
fn sse_is_parsed_across_chunks() {
    let mut p = SseParser::default();
    assert!(p.feed(b": keep-alive\n\nevent: cata").is_empty());
    let got = p.feed(b"log\r\ndata: {\"revision\":3}\r\n\r\nevent: settings\ndata: {}\n\n");
    assert_eq!(
        got,
        vec![
            ("catalog".to_string(), "{\"revision\":3}".to_string()),
            ("settings".to_string(), "{}".to_string())
        ]
    );
}

#[test]
fn targets_are_checked() {
    assert_eq!(
        normalize_target("http://127.0.0.1:2967/").unwrap(),
        "http://127.0.0.1:2967"
    );
    assert_eq!(
        normalize_target("https://gup.example/prefix/").unwrap(),
        "https://gup.example/prefix"
    );
    assert!(normalize_target("ftp://x").is_err());
    assert!(normalize_target("not a url").is_err());
    assert!(normalize_target("http://x/?a=b").is_err());
}
