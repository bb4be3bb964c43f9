//! End to end through real processes: nodes take their prefetch slots from their upstream.
//! - 20 nodes on one manager with `upstream.prefetch_window_s = 20`: each fetches a new item
//!   at the slot the manager gave it, not before; the 20 fetches start spread over the 20 s,
//!   no one-second interval (sliding) holding more than 3;
//! - a client asking one of them for the item before that node's slot is served at once,
//!   with the one upstream fetch the node makes, and the slot brings no second one.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;

const NODES: usize = 20;
const WINDOW_S: f64 = 20.0;

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The most of `times` (seconds) in any one-second interval.
fn most_in_a_second(times: &[f64]) -> usize {
    times
        .iter()
        .map(|a| times.iter().filter(|t| **t >= *a && **t < a + 1.0).count())
        .max()
        .unwrap_or(0)
}

/// A metric that may not be rendered yet (a node still starting) reads as 0.
async fn metric_or_zero(client: &reqwest::Client, base: &str, name: &str) -> f64 {
    let Ok(resp) = client.get(format!("{base}/metrics")).send().await else {
        return 0.0;
    };
    let text = resp.text().await.unwrap_or_default();
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_prefetch_at_their_slots_spread_over_the_window_and_a_client_beats_the_slot() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let nodes: Vec<Proc> = (0..NODES)
        .map(|i| {
            start_node_toml(
                &dir.path().join(format!("n{i}")),
                &[&manager.url],
                "prefetch_window_s = 20\n",
                &[],
            )
        })
        .collect();
    for n in &nodes {
        wait_ready(&n.url).await;
    }
    let client = reqwest::Client::new();
    let data = random_bytes(300_000, 18);
    let sha = sha256_hex(&data);
    let mut file = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut file, &data).unwrap();
    let published = unix_now();
    let (code, out) = publish(&manager.url, file.path(), "defs", "1");
    assert_eq!(code, 0, "{out}");

    // Each node's slot (from its gauge) and the moment its one upstream fetch started (its
    // counter, polled every 100 ms), until every node has fetched.
    let mut slots = vec![None::<f64>; NODES];
    let mut starts = vec![None::<f64>; NODES];
    let mut asked: Option<(usize, f64)> = None;
    let deadline = published + WINDOW_S + 20.0;
    while starts.iter().any(Option::is_none) {
        assert!(
            unix_now() < deadline,
            "slots {slots:?}, fetch starts {starts:?}"
        );
        for (i, n) in nodes.iter().enumerate() {
            if slots[i].is_none() {
                let s =
                    metric_or_zero(&client, &n.url, "gup_prefetch_slot_timestamp_seconds").await;
                if s > 0.0 {
                    slots[i] = Some(s);
                }
            }
            if starts[i].is_none()
                && metric_or_zero(&client, &n.url, "gup_upstream_fetches_total").await >= 1.0
            {
                starts[i] = Some(unix_now());
            }
        }
        // Once every slot is known: a client asks the node with the latest slot, well before
        // it, half way between two other nodes' slots.
        if asked.is_none() && slots.iter().all(Option::is_some) {
            let mut sorted: Vec<f64> = slots.iter().flatten().copied().collect();
            sorted.sort_by(f64::total_cmp);
            let (x, last) = slots
                .iter()
                .enumerate()
                .map(|(i, s)| (i, s.unwrap()))
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .unwrap();
            assert!(
                last - published > 10.0,
                "the latest of 20 slots in 20 s: {sorted:?}"
            );
            let now = unix_now();
            let at = sorted
                .windows(2)
                .map(|w| (w[0] + w[1]) / 2.0)
                .find(|m| *m > now + 0.3)
                .unwrap();
            assert!(at < last - 3.0, "{sorted:?}");
            tokio::time::sleep(Duration::from_secs_f64(at - unix_now())).await;
            let resp = client
                .get(format!("{}/v1/content/{sha}", nodes[x].url))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.bytes().await.unwrap(), data, "the right bytes");
            let done = unix_now();
            assert!(done < last, "served at once, before the node's slot");
            asked = Some((x, at));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (x, asked_at) = asked.expect("a client asked before the last slot");

    let starts: Vec<f64> = starts.iter().map(|s| s.unwrap() - published).collect();
    let slots: Vec<f64> = slots.iter().map(|s| s.unwrap() - published).collect();
    for i in 0..NODES {
        assert!(
            slots[i] < WINDOW_S + 1.0,
            "node {i}'s slot at {} s",
            slots[i]
        );
        if i == x {
            assert!(
                starts[i] < slots[i] - 2.0,
                "the asked node fetched at once ({} s, asked at {} s), not at its slot ({} s)",
                starts[i],
                asked_at - published,
                slots[i]
            );
        } else {
            // Seen within a poll of the slot (100 ms a round of 40 requests, loaded machine).
            assert!(
                starts[i] >= slots[i] - 0.05 && starts[i] < slots[i] + 3.0,
                "node {i} fetched at {} s, its slot at {} s",
                starts[i],
                slots[i]
            );
        }
    }
    eprintln!("slots (s after publishing): {slots:.2?}\nfetch starts: {starts:.2?}");
    let most = most_in_a_second(&starts);
    assert!(most <= 3, "{most} fetch starts in one second: {starts:?}");

    // The asked node's slot passes without a second upstream fetch.
    let wait = (slots[x] + 1.5 - (unix_now() - published)).max(0.0);
    tokio::time::sleep(Duration::from_secs_f64(wait)).await;
    let fetches = metric(&client, &nodes[x].url, "gup_upstream_fetches_total").await;
    assert_eq!(fetches, 1.0, "one upstream fetch at the asked node");
    for n in nodes {
        n.stop();
    }
    manager.stop();
}
