//! The manager's event store at scale: how long a start and the admin's queries take.
//!
//! Fills a fresh store with `EVENTS` events (default 3,000,000) through the real
//! `EventStore::add_events`, in uploads of 100 events of one client, spread over 10,000
//! clients, 50 groups (a client's group is fixed) and 5 kinds, their times spread over 30
//! days in arrival order (with a few hours of jitter). Then it starts a second process
//! (this binary again) that opens the store as a starting manager does and times, each as
//! the first (cold) run and the median of 5 after it: the open, an unfiltered first page,
//! pages by client, group, kind and since, and a few combinations. It prints a table, the
//! open's resident memory and the machine (CPU model from /proc/cpuinfo).
//!
//! Run with `cargo bench --bench events` (or `EVENTS=300000 cargo bench --bench events`;
//! `EVENTS_NOTIFY=1` fills through the manager's intake with notifications instead).
//! `EVENTS_DIR=DIR` keeps the filled store in DIR and reuses it when it is already there.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use gup::core::proto::{Event, EventUpload, Placement};
use gup::manager::events::{EventQuery, EventStore, SCAN_LIMIT};
use gup::store::Store;

const CLIENTS: u64 = 10_000;
const GROUPS: u64 = 50;
const KINDS: [&str; 5] = ["risk", "scan", "system_change", "intrusion", "update"];
const PER_UPLOAD: u64 = 100;
const SPAN_S: i64 = 30 * 86_400;
const WARM_RUNS: usize = 5;
/// Set in the child process: the store to query.
const CHILD_ENV: &str = "GUP_EVENTS_BENCH_QUERY";

fn base() -> DateTime<Utc> {
    "2026-11-01T00:00:00Z".parse().expect("a time")
}

/// A cheap reproducible spread (splitmix64).
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn group_of(client: u64) -> String {
    format!("group-{}", client % GROUPS)
}

fn fill(dir: &Path, n: u64) -> Duration {
    let store = Store::open(dir).expect("store");
    let es = EventStore::open(&store).expect("event store");
    // `EVENTS_NOTIFY=1`: fill as the manager's intake does, raising and counting the
    // notifications of the critical events (damper 3600 s) as it goes.
    let notify = std::env::var("EVENTS_NOTIFY").is_ok_and(|v| v == "1");
    let started = Instant::now();
    let mut i = 0u64;
    let uploads = n.div_ceil(PER_UPLOAD);
    for u in 0..uploads {
        let client = mix(u) % CLIENTS;
        let origin = Placement {
            group: group_of(client),
            location: None,
        };
        let count = PER_UPLOAD.min(n - i);
        let events = (0..count)
            .map(|k| {
                let seq = i + k;
                let jitter = (mix(seq) % 14_400) as i64 - 7_200;
                let at = (seq as i64 * SPAN_S) / n as i64 + jitter;
                Event {
                    id: format!("ev-{seq}"),
                    kind: KINDS[(mix(seq ^ 0xabc) % 5) as usize].to_string(),
                    subkind: Some("virus".into()),
                    time: (base() + chrono::Duration::seconds(at)).to_rfc3339(),
                    data: serde_json::json!({
                        "file": format!("C:\\Users\\user{client}\\Downloads\\setup-{seq}.exe"),
                        "action": "quarantined",
                    }),
                }
            })
            .collect();
        let upload = EventUpload {
            client_id: format!("pc-{client:05}"),
            events,
        };
        if notify {
            // The manager's intake: the events and their notifications in one step.
            es.accept(&upload, &origin, 3600, Utc::now())
                .expect("accept");
        } else {
            es.add_events(&upload, &origin, Utc::now()).expect("add");
        }
        i += count;
        if u % 5000 == 4999 {
            eprintln!("  filled {i} of {n} events");
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(es.flush()).expect("flush");
    started.elapsed()
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// Runs `f` once cold and `WARM_RUNS` times after; (cold, warm median, what it answered).
fn timed(mut f: impl FnMut() -> String) -> (Duration, Duration, String) {
    let t = Instant::now();
    let what = f();
    let cold = t.elapsed();
    let mut warm: Vec<Duration> = (0..WARM_RUNS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    warm.sort();
    (cold, warm[WARM_RUNS / 2], what)
}

/// The child: opens the store as a starting manager does and times the queries.
fn query(dir: &Path, n: u64) {
    let t = Instant::now();
    let store = Store::open(dir).expect("store");
    let opened_store = t.elapsed();
    let t = Instant::now();
    let es = EventStore::open(&store).expect("event store");
    let opened_events = t.elapsed();
    let rss = rss_mib();
    println!(
        "| open the store (sled's own start) | {} | | resident {rss:.0} MiB after both |",
        ms(opened_store)
    );
    println!(
        "| open the event records (the next seq, no scan) | {} | | |",
        ms(opened_events)
    );
    // The client of the first upload, which exists however few events were filled.
    let client = format!("pc-{:05}", mix(0) % CLIENTS);
    let at = |frac: f64| base() + chrono::Duration::seconds((SPAN_S as f64 * frac) as i64);
    let q = |client: Option<&str>,
             group: Option<&str>,
             kind: Option<&str>,
             since: Option<f64>,
             after: Option<u64>| EventQuery {
        client: client.map(str::to_string),
        group: group.map(str::to_string),
        kind: kind.map(str::to_string),
        since: since.map(at),
        limit: Some(1000),
        after,
    };
    let c = Some(client.as_str());
    let rows: Vec<(&str, EventQuery)> = vec![
        ("unfiltered, first page", q(None, None, None, None, None)),
        (
            "unfiltered, a page from the middle",
            q(None, None, None, None, Some(n / 2)),
        ),
        (
            "by client (to the end of its events)",
            q(c, None, None, None, None),
        ),
        (
            "by group (1 in 50)",
            q(None, Some("group-17"), None, None, None),
        ),
        (
            "by kind (1 in 5)",
            q(None, None, Some("intrusion"), None, None),
        ),
        (
            "by since, every event matches",
            q(None, None, None, Some(-1.0), None),
        ),
        (
            "by since, the last 10% match (scan bound)",
            q(None, None, None, Some(0.9), None),
        ),
        (
            "by since, the last 10%, from a page at 90%",
            q(None, None, None, Some(0.9), Some(n * 9 / 10)),
        ),
        (
            "by group and kind",
            q(None, Some("group-3"), Some("risk"), None, None),
        ),
        (
            "by client and kind",
            q(c, None, Some("intrusion"), None, None),
        ),
        (
            "by group and since (last 10%)",
            q(None, Some("group-9"), None, Some(0.9), None),
        ),
        (
            "by kind and since (last 10%; scan bound)",
            q(None, None, Some("scan"), Some(0.9), None),
        ),
        (
            "by kind nothing has",
            q(None, None, Some("none"), None, None),
        ),
    ];
    for (name, query) in rows {
        let (cold, warm, what) = timed(|| {
            let page = es.query(&query).expect("query");
            format!(
                "{} events, next {}",
                page.events.len(),
                page.next.map_or("null".to_string(), |n| n.to_string())
            )
        });
        println!("| {name} | {} | {} | {what} |", ms(cold), ms(warm));
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpu
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown CPU".to_string(), |m| m.trim().to_string());
    let cores = cpu.lines().filter(|l| l.starts_with("processor")).count();
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let gib = mem
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    format!("{model}, {cores} cores, {gib:.0} GiB")
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match entry.metadata() {
                Ok(m) if m.is_dir() => stack.push(entry.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

fn main() {
    let n: u64 = std::env::var("EVENTS")
        .ok()
        .and_then(|v| v.replace(['_', ','], "").parse().ok())
        .unwrap_or(3_000_000);
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        query(Path::new(&dir), n);
        return;
    }
    let temp = tempfile::tempdir_in(std::env::temp_dir()).expect("temp dir");
    let dir: PathBuf = std::env::var("EVENTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| temp.path().join("manager"));
    let reuse = dir.join("db").exists();
    println!("events bench: {n} events, {CLIENTS} clients, {GROUPS} groups, {} kinds; scan bound {SCAN_LIMIT} entries", KINDS.len());
    println!("machine: {}", machine());
    if reuse {
        println!("reusing the filled store in {}", dir.display());
    } else {
        let took = fill(&dir, n);
        println!(
            "filled through EventStore::add_events in {:.1} s ({:.0} events/s); store on disk {:.2} GiB",
            took.as_secs_f64(),
            n as f64 / took.as_secs_f64(),
            dir_bytes(&dir) as f64 / f64::from(1u32 << 30)
        );
    }
    println!();
    println!("| what (limit 1000) | first run, ms | median of {WARM_RUNS} after, ms | answer |");
    println!("|---|---|---|---|");
    let status = std::process::Command::new(std::env::current_exe().expect("this binary"))
        .env(CHILD_ENV, &dir)
        .env("EVENTS", n.to_string())
        .status()
        .expect("the query process");
    assert!(status.success(), "the query process failed: {status}");
}
