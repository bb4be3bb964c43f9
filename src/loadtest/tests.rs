use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use sha2::{Digest as _, Sha256};

use super::stats::lock;
use super::*;

#[test]
fn options_are_checked() {
    let ok = Options::new("http://127.0.0.1:1", 1);
    assert!(validate(&ok).is_ok());
    let mut o = ok.clone();
    o.time_scale = 0.5;
    assert!(matches!(
        validate(&o),
        Err(LoadtestError::BadOption {
            option: "time_scale",
            ..
        })
    ));
    let mut o = ok.clone();
    o.clients = 0;
    assert!(validate(&o).is_err());
    let mut o = ok.clone();
    o.os = "beos".into();
    assert!(validate(&o).is_err());
    let mut o = ok;
    o.rebuilds = Some(0);
    assert!(matches!(
        validate(&o),
        Err(LoadtestError::BadOption {
            option: "rebuilds",
            ..
        })
    ));
    assert_eq!("push".parse::<Mode>(), Ok(Mode::Push));
    assert!("both".parse::<Mode>().is_err());
}

#[test]
fn the_holding_file_is_read_whole_under_its_name_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("defs.bin");
    std::fs::write(&path, b"version one").unwrap();
    let h = holding_from_file(&path, None).unwrap();
    assert_eq!(h.name, "defs.bin");
    assert_eq!(h.sha256, hex::encode(Sha256::digest(b"version one")));
    assert_eq!(&h.bytes[..], b"version one");
    assert_eq!(
        holding_from_file(&path, Some("other".into())).unwrap().name,
        "other"
    );
    for bad in [
        holding_from_file(&dir.path().join("missing"), None),
        holding_from_file(&path, Some("../escape".into())),
    ] {
        assert!(matches!(
            bad,
            Err(LoadtestError::BadOption {
                option: "holding",
                ..
            })
        ));
    }
}

/// Event batches a fake target received: (client id, ["id:kind"]).
type Batches = Arc<Mutex<Vec<(String, Vec<String>)>>>;

/// A tiny HTTP/1.1 server (one request per connection) that plays a target: slot 0,
/// one good blob answered with a 429 first, one blob whose bytes do not match.
async fn fake_target() -> (String, Batches) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let good = b"hello".to_vec();
    let good_digest = hex::encode(Sha256::digest(&good));
    let bad_digest = hex::encode(Sha256::digest(b"world"));
    let batches: Batches = Arc::default();
    let deferred: Arc<Mutex<HashSet<String>>> = Arc::default();
    let metrics_reads: Arc<std::sync::atomic::AtomicU64> = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let b2 = batches.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let (good, gd, bd) = (good.clone(), good_digest.clone(), bad_digest.clone());
            let (batches, deferred) = (b2.clone(), deferred.clone());
            let metrics_reads = metrics_reads.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let head_end = loop {
                    if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break p + 4;
                    }
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                while buf.len() < head_end + len {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let body: serde_json::Value =
                    serde_json::from_slice(&buf[head_end..head_end + len]).unwrap_or_default();
                let line = head.lines().next().unwrap_or("").to_string();
                let client = head
                    .lines()
                    .find_map(|l| l.strip_prefix("x-gup-client-id:"))
                    .map(|v| v.trim().to_string());
                let json = |v: serde_json::Value| (200, v.to_string().into_bytes(), "");
                let (status, bytes, extra): (u16, Vec<u8>, &str) =
                    if line.starts_with("get /healthz") {
                        json(serde_json::json!({}))
                    } else if line.starts_with("post /v1/heartbeat") {
                        assert_eq!(body["os"], "windows");
                        assert_eq!(body["mode"], "computer");
                        json(serde_json::json!({
                            "client_id": body["client_id"], "group": "default",
                            "settings": {"upload_critical_events_immediately": true,
                                         "randomization": {"enabled": true, "window_s": 4}},
                            "policy_serial": 0, "catalog_revision": 1, "next_heartbeat_s": 1,
                            "download_slot": {"catalog_revision": 1, "delay_s": 0, "window_s": 4,
                                              "not_before": "2020-01-01T00:00:00Z"}
                        }))
                    } else if line.starts_with("get /v1/catalog") {
                        json(serde_json::json!({"revision": 1, "items": [
                            {"name": "a", "version": "1", "sha256": gd, "size": 5, "urgent": false},
                            {"name": "b", "version": "1", "sha256": bd, "size": 5, "urgent": false}
                        ]}))
                    } else if line.starts_with(&format!("get /v1/content/{gd}")) {
                        let c = client.unwrap_or_default();
                        if lock(&deferred).insert(c) {
                            (429, b"{}".to_vec(), "Retry-After: 0\r\n")
                        } else {
                            (200, good, "")
                        }
                    } else if line.starts_with(&format!("get /v1/content/{bd}")) {
                        (200, b"WORLD".to_vec(), "")
                    } else if line.starts_with("post /v1/events") {
                        let ids = body["events"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|e| {
                                format!(
                                    "{}:{}",
                                    e["id"].as_str().unwrap(),
                                    e["kind"].as_str().unwrap()
                                )
                            })
                            .collect();
                        lock(&batches).push((body["client_id"].as_str().unwrap().to_string(), ids));
                        (202, b"{\"accepted\":1}".to_vec(), "")
                    } else if line.starts_with("get /metrics") {
                        // 4 fetches before the run, 5 after: the run caused 1.
                        let n = 4 + metrics_reads
                            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                            .min(1);
                        (
                            200,
                            format!(
                            "# TYPE gup_upstream_fetches counter\ngup_upstream_fetches_total {n}\n"
                        )
                            .into_bytes(),
                            "",
                        )
                    } else {
                        (404, b"{\"error\":\"not_found\"}".to_vec(), "")
                    };
                let head = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n{extra}\r\n",
                    bytes.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(&bytes).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    (format!("http://{addr}"), batches)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_download_verify_defer_and_upload_events() {
    let (target, batches) = fake_target().await;
    let mut o = Options::new(target, 3);
    o.duration = Duration::from_secs(15);
    o.ramp = Some(Duration::from_millis(300));
    let r = run(o).await.unwrap();
    assert_eq!(r.clients, 3);
    assert_eq!(r.downloads_ok, 3, "{r:?}");
    assert_eq!(r.bytes, 15);
    // The bad blob is tried in MAX_ITEM_ROUNDS rounds by each client.
    assert_eq!(r.digest_mismatches, 3 * MAX_ITEM_ROUNDS as u64, "{r:?}");
    assert_eq!(r.downloads_failed, r.digest_mismatches);
    assert_eq!(r.deferrals, 3);
    assert_eq!(
        r.upstream_fetches, 1,
        "this run's fetches, not the target's lifetime"
    );
    assert_eq!(r.events_sent, 6);
    assert!(r.ended_early, "{r:?}");
    assert_eq!(r.clients_done, 3);
    assert_eq!(r.window_s, 4.0);
    assert_eq!(r.start_histogram.len(), 4);
    assert_eq!(r.download_starts, 3 + 3 * MAX_ITEM_ROUNDS as u64);
    assert!(r.latency_ms.max >= r.latency_ms.p50 && r.latency_samples > 0);
    // The critical event went at once, on its own; the other with the next heartbeat.
    let batches = lock(&batches).clone();
    assert_eq!(batches.len(), 6);
    for n in 1..=3 {
        let id = format!("lt-{n:06}");
        let mine: Vec<_> = batches.iter().filter(|(c, _)| *c == id).collect();
        assert_eq!(mine[0].1, vec![format!("{id}-0:risk")]);
        assert_eq!(mine[1].1, vec![format!("{id}-1:system_change")]);
    }
}

#[tokio::test]
async fn an_unreachable_target_is_an_error() {
    // Bind then drop a listener: a loopback port that refuses connections.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut o = Options::new(format!("http://127.0.0.1:{port}"), 2);
    o.duration = Duration::from_secs(1);
    assert!(matches!(
        run(o).await,
        Err(LoadtestError::Unreachable { .. })
    ));
}
