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
fn times_read_as_dates() {
    assert_eq!(human_time(1_796_218_166_571), "2026-12-02 13:29:26.571 UTC");
}
