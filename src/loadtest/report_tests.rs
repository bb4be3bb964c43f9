use super::*;

#[test]
fn layout_covers_the_window() {
    assert_eq!(layout(3600.0), (60.0, 60));
    assert_eq!(layout(60.0), (1.0, 60));
    assert_eq!(layout(20.0), (1.0, 20));
    assert_eq!(layout(20.5), (1.0, 21));
    assert_eq!(layout(0.0), (1.0, 60));
    assert_eq!(layout(90.0), (1.5, 60));
}

#[test]
fn bucketing_and_peak_to_mean() {
    // Even: one start per bucket.
    let even: Vec<f64> = (0..60).map(|i| i as f64 + 0.5).collect();
    let h = bucketize(&even, 1.0, 60);
    assert!(h.iter().all(|n| *n == 1));
    assert!((peak_to_mean(&h) - 1.0).abs() < 1e-9);
    // All at once: the peak is 60 times the mean.
    let h = bucketize(&[0.1; 30], 1.0, 60);
    assert_eq!(h[0], 30);
    assert!((peak_to_mean(&h) - 60.0).abs() < 1e-9);
    // After the window: the last bucket; before it: the first.
    let h = bucketize(&[500.0, -3.0, f64::NAN, 59.99], 1.0, 60);
    assert_eq!((h[0], h[59]), (2, 2));
    // Nothing started.
    assert_eq!(peak_to_mean(&bucketize(&[], 1.0, 60)), 0.0);
    assert_eq!(peak_to_mean(&[]), 0.0);
    // Bucket width scales.
    let h = bucketize(&[0.0, 59.9, 60.0, 3599.0], 60.0, 60);
    assert_eq!((h[0], h[1], h[59]), (2, 1, 1));
}

#[test]
fn report_json_has_every_contract_key() {
    let r = Report {
        clients: 3,
        start_histogram: vec![1, 2, 0],
        peak_to_mean: 2.5,
        bucket_peak_to_mean: 2.0,
        bucket_s: 1.0,
        ..Report::default()
    };
    let v = serde_json::to_value(&r).unwrap();
    for key in [
        "clients",
        "downloads_ok",
        "downloads_failed",
        "digest_mismatches",
        "bytes",
        "start_histogram",
        "peak_to_mean",
        "latency_ms",
        "upstream_fetches",
        "errors",
    ] {
        assert!(v.get(key).is_some(), "{key}");
    }
    for key in ["p50", "p99", "max"] {
        assert!(v["latency_ms"].get(key).is_some(), "latency_ms.{key}");
    }
    assert!(v["errors"].is_object());
    assert!(v["start_histogram"].is_array());
    assert_eq!(v["mode"], "pull");
    let back: Report = serde_json::from_value(v).unwrap();
    assert_eq!(back, r);
    // The text forms.
    let text = r.histogram_text();
    assert_eq!(
        text.lines().count(),
        6,
        "a header, column names, 3 buckets, peak/mean"
    );
    assert!(text.starts_with("download starts per "), "{text}");
    assert!(text.lines().nth(1).unwrap().contains("starts"), "{text}");
    assert!(text.lines().nth(3).unwrap().ends_with(&"#".repeat(50)));
    assert!(text.contains("mean bucket 2.00"), "{text}");
    assert!(text.contains("mean per second 2.50"), "{text}");
    assert!(r.summary().contains("downloads ok"));
}

#[test]
fn the_delta_figures_are_in_the_json_and_the_summary() {
    let r = Report {
        clients: 4,
        use_deltas: true,
        full_bytes: 4000,
        delta_bytes: 300,
        edge_delta_bytes: 100,
        wasted_delta_bytes: 7,
        installs: Installs {
            full: 1,
            delta: 2,
            edge_delta: 1,
        },
        delta_fallbacks: [("delta_digest".to_string(), 1)].into(),
        no_delta: 2,
        rebuild_ms: Latency {
            p50: 1.5,
            p99: 9.0,
            max: 9.5,
        },
        rebuilds: 3,
        wan_bytes: 123,
        lan_bytes: 4400,
        ..Report::default()
    };
    let v = serde_json::to_value(&r).unwrap();
    for key in [
        "use_deltas",
        "holding_sha256",
        "full_bytes",
        "delta_bytes",
        "edge_delta_bytes",
        "wasted_delta_bytes",
        "installs",
        "delta_fallbacks",
        "no_delta",
        "rebuild_ms",
        "rebuilds",
        "wan_bytes",
        "lan_bytes",
    ] {
        assert!(v.get(key).is_some(), "{key}");
    }
    assert_eq!(v["installs"]["edge_delta"], 1);
    assert_eq!(v["delta_fallbacks"]["delta_digest"], 1);
    let back: Report = serde_json::from_value(v).unwrap();
    assert_eq!(back, r);
    // A report of an older gup (no delta figures) still reads.
    let old: Report = serde_json::from_str(r#"{"clients": 1, "downloads_ok": 1, "downloads_failed": 0, "digest_mismatches": 0, "bytes": 5, "start_histogram": [], "peak_to_mean": 0.0, "latency_ms": {"p50": 0.0, "p99": 0.0, "max": 0.0}, "upstream_fetches": 0, "errors": {}}"#).unwrap();
    assert_eq!(old.installs, Installs::default());
    let text = r.summary();
    for want in [
        "installed via        full 1, delta 2, edge delta 1 (deltas on)",
        "full bytes           4000 (0.0 MiB); per client 1000 (0.0 MiB)",
        "delta bytes          400 (0.0 MiB), edge 100; per client 100 (0.0 MiB); wasted 7",
        "delta fallbacks      delta_digest=1; no edge delta 2",
        "rebuild ms           p50 1.50  p99 9.00  max 9.50  (3 rebuilds)",
        "target WAN bytes     123 (0.0 MiB)",
        "target LAN bytes     4400 (0.0 MiB)",
    ] {
        assert!(text.contains(want), "{want:?} in\n{text}");
    }
}

#[test]
fn times_read_as_dates() {
    assert_eq!(human_time(1_796_218_166_571), "2026-12-02 13:29:26.571 UTC");
}
