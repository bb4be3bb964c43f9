//! Backup and restore of the manager (issue 21.4), through real processes:
//!
//! - `gup admin backup --out FILE --with-content`, taken while a publish loop and an event
//!   stream run, restores (`gup manager restore --data-dir DIR FILE`) to a manager whose
//!   catalog is one the original served (same JSON, same signature in the header and in
//!   `/v1/sync`), whose blobs are all there with the same bytes, and whose settings, groups,
//!   site, registry and events match: every event acknowledged before the backup started is
//!   in it, and nothing that was never stored;
//! - the backup file is written with mode 0600 and holds the signing key and the tokens the
//!   data dir keeps, restored with mode 0600;
//! - a restore refuses a non-empty dir, a damaged file and a cut file with one line and exit
//!   2, writing nothing; a wrong admin token leaves no file behind;
//! - a start on a dir whose restore did not finish is refused with one line and exit 2;
//! - a backup read slowly keeps every blob of the catalog it captured while later publishes
//!   push that catalog out of the retained revisions (the collection would remove them).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use common::*;

/// An event's (client, id) and when its 202 came.
type Acked = ((String, String), Instant);

fn run(args: &[&str]) -> Output {
    Command::new(gup())
        .args(args)
        .env_remove("GUP_ADMIN_TOKEN")
        .output()
        .expect("run gup")
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// `GET /v1/catalog`: (body, signature header).
async fn catalog(base: &str) -> (String, String) {
    let r = reqwest::get(format!("{base}/v1/catalog")).await.unwrap();
    assert_eq!(r.status(), 200);
    let sig = r
        .headers()
        .get("x-gup-catalog-signature")
        .expect("a signed catalog")
        .to_str()
        .unwrap()
        .to_string();
    (r.text().await.unwrap(), sig)
}

async fn content(base: &str, sha: &str) -> (u16, Vec<u8>) {
    let r = reqwest::get(format!("{base}/v1/content/{sha}"))
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.bytes().await.unwrap().to_vec())
}

async fn admin_get(base: &str, path: &str) -> serde_json::Value {
    let (status, v) = admin_call(base, reqwest::Method::GET, path, None).await;
    assert_eq!(status, 200, "GET {path}: {v}");
    v
}

/// Every client's lasting fields, by id.
async fn clients(base: &str) -> BTreeMap<String, serde_json::Value> {
    let v = admin_get(base, "/v1/admin/clients?limit=10000").await;
    v["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let id = c["client_id"].as_str().unwrap().to_string();
            let kept = serde_json::json!({
                "group": c["group"], "install_group": c["install_group"], "os": c["os"],
                "client_version": c["client_version"], "location": c["location"],
                "first_seen": c["first_seen"], "last_seen": c["last_seen"],
            });
            (id, kept)
        })
        .collect()
}

/// Every stored event by (client, id).
async fn events(base: &str) -> HashMap<(String, String), serde_json::Value> {
    all_events(base)
        .await
        .into_iter()
        .map(|e| {
            let key = (
                e["client_id"].as_str().unwrap().to_string(),
                e["id"].as_str().unwrap().to_string(),
            );
            (key, e)
        })
        .collect()
}

fn event_upload(client: &str, ids: &[String], critical: bool) -> serde_json::Value {
    let events: Vec<serde_json::Value> = ids
        .iter()
        .map(|id| {
            serde_json::json!({
                "id": id,
                "kind": if critical { "risk" } else { "system_change" },
                "subkind": if critical { "virus" } else { "config" },
                "time": "2026-03-04T05:06:07Z",
                "data": {"n": id},
            })
        })
        .collect();
    serde_json::json!({ "client_id": client, "events": events })
}

fn heartbeat(client: &str, group: &str, os: &str) -> serde_json::Value {
    serde_json::json!({
        "client_id": client, "install_group": group, "location": "office", "os": os,
        "client_version": "12.1.5", "mode": "computer", "user": "",
        "policy_serial": 0, "catalog_revision": 0,
    })
}

/// Publishes `bytes` as `name` `version` over the admin API; returns the revision.
async fn publish_bytes(
    client: &reqwest::Client,
    base: &str,
    name: &str,
    version: &str,
    bytes: Vec<u8>,
) -> u64 {
    let r = client
        .post(format!("{base}/v1/admin/content"))
        .query(&[("name", name), ("version", version)])
        .bearer_auth(ADMIN_TOKEN)
        .body(bytes)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "publishing {name} {version}");
    let v: serde_json::Value = r.json().await.unwrap();
    v["revision"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_during_a_publish_and_an_event_stream_restores_the_same_manager() {
    let dir = tempfile::tempdir().unwrap();
    let mdir = dir.path().join("m");
    let m = start_manager(&mdir, &[]);
    let base = m.url.clone();
    let http = reqwest::Client::new();

    // Settings, a policy, a published item, clients and events, before the backup.
    let (s, v) = admin_call(
        &base,
        reqwest::Method::PUT,
        "/v1/admin/groups/branch",
        Some(serde_json::json!({"parent": "default"})),
    )
    .await;
    assert!(s == 201 || s == 200, "{v}");
    let (s, v) = admin_call(
        &base,
        reqwest::Method::PUT,
        "/v1/admin/groups/branch/settings",
        Some(serde_json::json!({"heartbeat_interval_s": 120, "mode": "push"})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = admin_call(
        &base,
        reqwest::Method::PUT,
        "/v1/admin/groups/branch/policy",
        Some(serde_json::json!({"firewall": "on"})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    // Every blob published, by digest.
    let published: Arc<Mutex<HashMap<String, Vec<u8>>>> = Default::default();
    // What the original served for each revision: (catalog body, signature).
    let served: Arc<Mutex<HashMap<u64, (String, String)>>> = Default::default();
    let defs = random_bytes(3 << 20, 1);
    let rev = publish_bytes(&http, &base, "defs", "1", defs.clone()).await;
    published.lock().unwrap().insert(sha256_hex(&defs), defs);
    let first = catalog(&base).await;
    served.lock().unwrap().insert(rev, first);
    for i in 0..6 {
        let os = ["windows", "mac", "linux"][i % 3];
        heartbeat_ok(&base, heartbeat(&format!("c{i}"), "branch", os)).await;
    }
    let acked: Arc<Mutex<Vec<Acked>>> = Default::default();
    for i in 0..10u32 {
        let client = format!("c{}", i % 6);
        let ids: Vec<String> = (0..5).map(|k| format!("pre-{i}-{k}")).collect();
        let (s, v) = post_json(
            &base,
            "/v1/events",
            event_upload(&client, &ids, i.is_multiple_of(4)),
        )
        .await;
        assert_eq!(s, 202, "{v}");
        let now = Instant::now();
        acked
            .lock()
            .unwrap()
            .extend(ids.into_iter().map(|id| ((client.clone(), id), now)));
    }

    // The publish loop and the event stream, bounded in count, stopped after the backup.
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (stop, base, http) = (stop.clone(), base.clone(), http.clone());
        let (published, served) = (published.clone(), served.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && n < 25 {
                n += 1;
                let bytes = random_bytes(2 << 20, 100 + n);
                let sha = sha256_hex(&bytes);
                published.lock().unwrap().insert(sha, bytes.clone());
                let rev = publish_bytes(&http, &base, "pack", &format!("{n}"), bytes).await;
                // Only this loop changes the catalog: what it serves now is revision `rev`.
                let (body, sig) = catalog(&base).await;
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                assert_eq!(v["revision"].as_u64(), Some(rev));
                served.lock().unwrap().insert(rev, (body, sig));
            }
            n
        })
    };
    let streamer = {
        let (stop, base, acked) = (stop.clone(), base.clone(), acked.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && n < 3000 {
                n += 1;
                let client = format!("c{}", n % 6);
                let ids: Vec<String> = (0..3).map(|k| format!("loop-{n}-{k}")).collect();
                let (s, v) = post_json(
                    &base,
                    "/v1/events",
                    event_upload(&client, &ids, n.is_multiple_of(50)),
                )
                .await;
                assert_eq!(s, 202, "{v}");
                let now = Instant::now();
                acked
                    .lock()
                    .unwrap()
                    .extend(ids.into_iter().map(|id| ((client.clone(), id), now)));
            }
            n
        })
    };
    // Both loops are under way before the backup starts.
    wait_for(30, "the loops to get going", || {
        let (served, acked) = (served.clone(), acked.clone());
        async move {
            (served.lock().unwrap().len() >= 2 && acked.lock().unwrap().len() >= 80).then_some(())
        }
    })
    .await;

    let file = dir.path().join("backup.tar");
    let started = Instant::now();
    let out = {
        let (base, file) = (base.clone(), file.clone());
        tokio::task::spawn_blocking(move || {
            run(&[
                "admin",
                "--manager",
                &base,
                "--token",
                ADMIN_TOKEN,
                "backup",
                "--out",
                file.to_str().unwrap(),
                "--with-content",
            ])
        })
        .await
        .unwrap()
    };
    stop.store(true, Ordering::Relaxed);
    let publishes = publisher.await.unwrap();
    let uploads = streamer.await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("backup written to"),
        "{}",
        text(&out)
    );
    assert!(stderr(&out).contains("keep it secret"), "{}", text(&out));
    assert_eq!(mode(&file), 0o600, "a backup holds secrets");
    assert!(publishes >= 1 && uploads >= 10, "{publishes} {uploads}");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".part"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");

    // The original, as it is now (it kept serving meanwhile).
    let groups_before = admin_get(&base, "/v1/admin/groups").await;
    let site_before = admin_get(&base, "/v1/admin/site").await;
    let settings_before = admin_get(&base, "/v1/admin/groups/branch/settings").await;
    let clients_before = clients(&base).await;
    let events_before = events(&base).await;

    // Restore and start a manager on it.
    let rdir = dir.path().join("restored");
    let out = run(&[
        "manager",
        "restore",
        "--data-dir",
        rdir.to_str().unwrap(),
        file.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("restored"), "{}", text(&out));
    let r = start_manager_strict(&rdir, &[]);
    let rbase = r.url.clone();

    // The catalog is one the original served, with the same signature.
    let (body, sig) = catalog(&rbase).await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let revision = v["revision"].as_u64().unwrap();
    let seen = served.lock().unwrap().get(&revision).cloned();
    let (want_body, want_sig) =
        seen.unwrap_or_else(|| panic!("the restored revision {revision} was never served"));
    assert_eq!(body, want_body, "same catalog JSON");
    assert_eq!(sig, want_sig, "same signature");
    let sync: serde_json::Value = reqwest::Client::new()
        .get(format!("{rbase}/v1/sync"))
        .bearer_auth(NODE_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(sync["catalog"], v, "/v1/sync carries the same catalog");
    assert_eq!(
        sync["catalog_signature"],
        want_sig.as_str(),
        "and signature"
    );

    // Every blob of the retained revisions is there, with its bytes.
    let published = published.lock().unwrap().clone();
    let mut checked = 0;
    for rev in revision.saturating_sub(2)..=revision {
        let Some((b, _)) = served.lock().unwrap().get(&rev).cloned() else {
            continue;
        };
        let c: serde_json::Value = serde_json::from_str(&b).unwrap();
        for item in c["items"].as_array().unwrap() {
            let sha = item["sha256"].as_str().unwrap();
            let (status, bytes) = content(&rbase, sha).await;
            assert_eq!(status, 200, "blob {sha} of revision {rev}");
            assert!(bytes == published[sha], "blob {sha} has its bytes");
            checked += 1;
        }
    }
    assert!(checked >= 2, "{checked}");

    // Settings, groups, site and registry match.
    assert_eq!(admin_get(&rbase, "/v1/admin/groups").await, groups_before);
    assert_eq!(admin_get(&rbase, "/v1/admin/site").await, site_before);
    assert_eq!(
        admin_get(&rbase, "/v1/admin/groups/branch/settings").await,
        settings_before
    );
    assert_eq!(clients(&rbase).await, clients_before);

    // Events: all acknowledged before the backup started, and none never stored.
    let restored = events(&rbase).await;
    let acked = acked.lock().unwrap().clone();
    let before: Vec<_> = acked.iter().filter(|(_, at)| *at < started).collect();
    assert!(before.len() >= 80, "{}", before.len());
    for (key, _) in &before {
        assert!(
            restored.contains_key(key),
            "event {key:?} acknowledged before the backup"
        );
    }
    for (key, e) in &restored {
        assert_eq!(events_before.get(key), Some(e), "event {key:?} as stored");
    }
    let during = acked
        .iter()
        .filter(|(k, at)| *at >= started && restored.contains_key(k))
        .count();
    eprintln!(
        "publishes {publishes}, uploads {uploads}, restored revision {revision} of {}, events {} ({during} acknowledged after the backup started)",
        served.lock().unwrap().keys().max().unwrap(),
        restored.len()
    );
    let seqs: HashSet<u64> = restored
        .values()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs.len(), restored.len(), "each event stored once");
    let notices = admin_get(&rbase, "/v1/admin/notifications").await;
    assert!(
        !notices["notifications"].as_array().unwrap().is_empty(),
        "{notices}"
    );

    assert_eq!(r.stop(), Some(0));
    assert_eq!(m.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keys_and_tokens_come_back_and_bad_restores_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mdir = dir.path().join("m");
    // A manager that makes its own tokens, as a real one does.
    let m = Proc::start(
        &[
            "manager",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            mdir.to_str().unwrap(),
        ],
        dir.path().join("m.log"),
    );
    let admin_token = std::fs::read_to_string(mdir.join("admin.token")).unwrap();
    let admin_token = admin_token.trim();

    // A wrong token: 401, and no file.
    let file = dir.path().join("b.tar");
    let out = run(&[
        "admin",
        "--manager",
        &m.url,
        "--token",
        "wrong",
        "backup",
        "--out",
        file.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(stderr(&out).contains("401"), "{}", text(&out));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", text(&out));
    assert!(!file.exists());

    let out = run(&[
        "admin",
        "--manager",
        &m.url,
        "--token",
        admin_token,
        "backup",
        "--out",
        file.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("without content"), "{}", text(&out));
    assert_eq!(mode(&file), 0o600);

    // Into a new dir: the key and the tokens come back, private.
    let rdir = dir.path().join("r");
    let out = run(&[
        "manager",
        "restore",
        "--data-dir",
        rdir.to_str().unwrap(),
        file.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    for name in ["catalog.key", "admin.token", "node.token"] {
        assert_eq!(
            std::fs::read(rdir.join(name)).unwrap(),
            std::fs::read(mdir.join(name)).unwrap(),
            "{name}"
        );
        assert_eq!(mode(&rdir.join(name)), 0o600, "{name}");
    }
    assert!(!rdir.join("restore.incomplete").exists());
    let key = |d: &Path| {
        let o = run(&[
            "manager",
            "--data-dir",
            d.to_str().unwrap(),
            "--print-public-key",
        ]);
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert_eq!(key(&rdir), key(&mdir), "the same signing key");

    // A non-empty dir, a damaged file, a cut file: one line, exit 2, nothing written.
    let out = run(&[
        "manager",
        "restore",
        "--data-dir",
        rdir.to_str().unwrap(),
        file.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(stderr(&out).contains("not empty"), "{}", text(&out));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", text(&out));

    let good = std::fs::read(&file).unwrap();
    let mut damaged = good.clone();
    // A byte of `catalog.json`'s data: `"retain":3` says 2.
    let at = good
        .windows(10)
        .position(|w| w == b"\"retain\":3")
        .expect("the catalog's retain in the file");
    damaged[at + 9] = b'2';
    let cut = &good[..good.len() - 2048];
    for (what, bytes) in [("damaged", damaged.as_slice()), ("cut", cut)] {
        let f = dir.path().join(format!("{what}.tar"));
        std::fs::write(&f, bytes).unwrap();
        let target = dir.path().join(format!("into-{what}"));
        let out = run(&[
            "manager",
            "restore",
            "--data-dir",
            target.to_str().unwrap(),
            f.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(2), "{what}: {}", text(&out));
        assert_eq!(stderr(&out).lines().count(), 1, "{what}: {}", text(&out));
        assert!(!target.exists(), "{what}: nothing written");
    }

    // A dir whose restore did not finish is refused at start.
    std::fs::write(rdir.join("restore.incomplete"), b"").unwrap();
    let out = run(&[
        "manager",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        rdir.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let t = stderr(&out);
    assert!(t.contains("did not finish"), "{t}");
    assert_eq!(
        t.lines().filter(|l| l.starts_with("gup:")).count(),
        1,
        "{t}"
    );

    assert_eq!(m.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_backup_keeps_the_blobs_it_captured_while_later_publishes_collect_them() {
    let dir = tempfile::tempdir().unwrap();
    let m = start_manager(&dir.path().join("m"), &[]);
    let base = m.url.clone();
    let http = reqwest::Client::new();
    // `defs` is large, so the stream stalls in it; `pack` 1 sorts after it (blobs stream in
    // digest order), so it is still to come while the stream waits.
    let defs = random_bytes(16 << 20, 7);
    let pack = (1..1000)
        .map(|seed| random_bytes(1 << 20, 1000 + seed))
        .find(|p| sha256_hex(p) > sha256_hex(&defs))
        .unwrap();
    publish_bytes(&http, &base, "defs", "1", defs.clone()).await;
    publish_bytes(&http, &base, "pack", "1", pack.clone()).await;

    let mut resp = http
        .get(format!("{base}/v1/admin/backup?content=true"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/x-tar");
    let mut file = resp.chunk().await.unwrap().unwrap().to_vec();
    // The snapshot is taken (the answer has begun): pack 1 leaves the retained revisions.
    for v in 2..=5 {
        let bytes = random_bytes(1 << 20, 5000 + v);
        publish_bytes(&http, &base, "pack", &v.to_string(), bytes).await;
    }
    let old = sha256_hex(&pack);
    wait_for(30, "pack 1 to leave the catalog", || {
        let base = base.clone();
        let old = old.clone();
        async move { (content(&base, &old).await.0 == 404).then_some(()) }
    })
    .await;
    // Read on, slowly; bounded by the stream's end (about 17 MiB).
    let started = Instant::now();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        file.extend_from_slice(&chunk);
        assert!(file.len() < 64 << 20, "the stream ends");
        assert!(started.elapsed().as_secs() < 60, "the stream ends in time");
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let manifest = gup::core::backup::verify(&file[..]).expect("a whole, good backup");
    let blobs: HashSet<String> = manifest.blobs().map(|(d, _)| d.to_hex()).collect();
    assert!(blobs.contains(&old), "pack 1 is in the backup: {blobs:?}");
    assert!(blobs.contains(&sha256_hex(&defs)));
    assert_eq!(manifest.catalog_revision, 2);
    assert_eq!(m.stop(), Some(0));
}
