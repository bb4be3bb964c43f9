//! End to end through a real manager process: SIGHUP re-reads the config file.
//! - the TLS certificate is swapped while a download is in flight: the download completes
//!   with the right bytes on the certificate it started with, and new connections get the new
//!   one; a certificate renewed in place on disk is picked up without a signal;
//! - a bad file on SIGHUP keeps the running config and logs one line naming the key;
//! - a rotated node token: with `node_token_previous` both are accepted, after it is removed
//!   only the new one is.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use futures_util::StreamExt;

struct Pair {
    pem: String,
    cert: PathBuf,
    key: PathBuf,
}

/// A fresh self-signed certificate for `localhost`, written as `NAME.pem` and `NAME.key`.
fn pair(dir: &Path, name: &str) -> Pair {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert, c.cert.pem()).unwrap();
    std::fs::write(&key, c.key_pair.serialize_pem()).unwrap();
    Pair {
        pem: c.cert.pem(),
        cert,
        key,
    }
}

/// A client that trusts only `pem` and reaches `localhost` at 127.0.0.1:`port`, with no
/// pooled connections (each request shakes hands anew).
fn trusting(pem: &str, port: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
        .resolve("localhost", format!("127.0.0.1:{port}").parse().unwrap())
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

fn write_config(path: &Path, tls: &Pair, extra: &str) {
    std::fs::write(
        path,
        format!(
            "[manager]\ntls_cert = {:?}\ntls_key = {:?}\n{extra}",
            tls.cert.display().to_string(),
            tls.key.display().to_string()
        ),
    )
    .unwrap();
}

fn hangup(p: &Proc) {
    // SAFETY: kill has no memory preconditions; the pid is our own child's.
    unsafe {
        libc::kill(p.pid(), libc::SIGHUP);
    }
}

/// Waits until the log of `p` holds `needle` at least `times` times.
async fn logged(p: &Proc, needle: &str, times: usize) {
    wait_for(
        30,
        &format!("the log says {needle:?} {times} times"),
        || {
            let n = p.log_text().matches(needle).count();
            async move { (n >= times).then_some(()) }
        },
    )
    .await;
}

async fn sync_status(client: &reqwest::Client, https: &str, token: &str) -> u16 {
    client
        .get(format!("{https}/v1/sync"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_swaps_the_certificate_keeps_a_bad_file_out_and_rotates_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (pair(tmp.path(), "a"), pair(tmp.path(), "b"));
    let config = tmp.path().join("manager.toml");
    write_config(&config, &a, "node_token = \"t1\"\n");
    let data_dir = tmp.path().join("m");
    let manager = Proc::start(
        &[
            "manager",
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--admin-token",
            ADMIN_TOKEN,
        ],
        data_dir.with_extension("log"),
    );
    let port = manager.url.rsplit(':').next().unwrap().to_string();
    let https = format!("https://localhost:{port}");
    let (with_a, with_b) = (trusting(&a.pem, &port), trusting(&b.pem, &port));

    // A blob big enough that a slow reader keeps its download in flight.
    let data = random_bytes(24 << 20, 21);
    let r = with_a
        .post(format!("{https}/v1/admin/content?name=defs&version=1"))
        .bearer_auth(ADMIN_TOKEN)
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let sha = sha256_hex(&data);
    let download = with_a
        .get(format!("{https}/v1/content/{sha}"))
        .send()
        .await
        .unwrap();
    assert_eq!(download.status(), 200);
    let mut body = download.bytes_stream();
    let mut got = Vec::new();
    got.extend_from_slice(&body.next().await.unwrap().unwrap());
    assert!(got.len() < data.len(), "the download is in flight");

    // === The certificate swapped by SIGHUP ===
    write_config(&config, &b, "node_token = \"t1\"\n");
    hangup(&manager);
    logged(&manager, "key=manager.tls_cert", 1).await;
    let r = with_b.get(format!("{https}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200, "a new connection gets the new certificate");
    // (A client that spoke TLS before may resume its session without a certificate; a new
    // client must shake hands in full.)
    assert!(
        trusting(&a.pem, &port)
            .get(format!("{https}/healthz"))
            .send()
            .await
            .is_err(),
        "and no longer the old one"
    );
    // The download under way finishes on the connection it started on, every byte right.
    while let Some(chunk) = body.next().await {
        got.extend_from_slice(&chunk.unwrap());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(got == data, "the in-flight download completed intact");

    // === A bad file keeps the running config ===
    write_config(&config, &b, "node_token = \"t9\"\nretain_revisions = 0\n");
    hangup(&manager);
    logged(&manager, "reload refused", 1).await;
    let log = manager.log_text();
    let refused = log.lines().find(|l| l.contains("reload refused")).unwrap();
    assert!(refused.contains("manager.retain_revisions"), "{refused}");
    assert_eq!(sync_status(&with_b, &https, "t1").await, 200);
    assert_eq!(sync_status(&with_b, &https, "t9").await, 401);

    // === Token rotation: the previous token stays accepted until it is removed ===
    write_config(
        &config,
        &b,
        "node_token = \"t2\"\nnode_token_previous = \"t1\"\n",
    );
    hangup(&manager);
    logged(&manager, "key=manager.node_token_previous", 1).await;
    assert_eq!(sync_status(&with_b, &https, "t2").await, 200);
    assert_eq!(sync_status(&with_b, &https, "t1").await, 200);
    assert_eq!(sync_status(&with_b, &https, "t3").await, 401);
    write_config(&config, &b, "node_token = \"t2\"\n");
    hangup(&manager);
    logged(&manager, "key=manager.node_token_previous", 2).await;
    assert_eq!(sync_status(&with_b, &https, "t2").await, 200);
    assert_eq!(sync_status(&with_b, &https, "t1").await, 401);

    // === A renewal in place on disk, no signal ===
    let c = pair(tmp.path(), "c");
    std::fs::copy(&c.key, &b.key).unwrap();
    std::fs::copy(&c.cert, &b.cert).unwrap();
    let with_c = trusting(&c.pem, &port);
    wait_for(30, "the renewed certificate in use", || {
        let (client, url) = (with_c.clone(), format!("{https}/healthz"));
        async move {
            let r = client.get(url).send().await.ok()?;
            (r.status() == 200).then_some(())
        }
    })
    .await;
    // A restart-only key is named as such.
    write_config(&config, &b, "node_token = \"t2\"\nretain_revisions = 5\n");
    std::fs::copy(&c.key, &b.key).unwrap();
    hangup(&manager);
    logged(&manager, "key=manager.retain_revisions", 1).await;
    assert!(manager
        .log_text()
        .lines()
        .any(|l| l.contains("key=manager.retain_revisions") && l.contains("next restart")));
    assert_eq!(manager.stop(), Some(0));
}
