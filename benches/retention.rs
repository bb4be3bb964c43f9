//! Event intake while retention deletes a backlog beside it (issue 20.3: "intake of 10,000
//! events per second is not slowed by the cleanup").
//!
//! Fills a fresh store with `OLD` events (default 1,000,000) received 100 days ago, in
//! uploads of 100 of one client (10,000 clients, 50 groups, 5 kinds, one conflict per
//! upload), so that with `retain_days = 90` every one of them is due. Then:
//!
//! 1. criterion: one upload of 100 new events through `EventStore::accept` (the manager's
//!    intake step: dedupe, records, index entries and notifications in one atomic write,
//!    damper 3600 s) with nothing else running (`idle`) and with the cleanup running in a
//!    thread beside it (`cleanup`) as `Manager::expire_loop` runs it: `expire_step` of
//!    `EXPIRE_BATCH` events, paced by `retention::Pacer`. The ratio of the means (cleanup
//!    over idle) is printed after, read from criterion's estimates.
//!    Then one step alone, of 100 and of 1,000 events: how long a step holds sled's write
//!    lock (every other write waits for it) and what deleting an event costs.
//! 2. rounds, as the manager takes uploads (accept on a blocking thread, then the flush the
//!    202 waits for, shared by concurrent uploads; a 2-thread runtime): paced at 10,000
//!    events per second (an upload of 100 every 10 ms, each its own task as a request is),
//!    then flat out (8 uploaders one after the other). `ROUNDS` pairs (default 4) of
//!    `ROUND_S`-second rounds (default 3), idle and with the cleanup in turns (A B B A ...),
//!    so that a shared machine whose load drifts weighs on both alike; it prints each
//!    round, then the medians and their ratio: events per second reached and the latency
//!    of an upload (from when it was due, paced; from its start, flat out).
//!
//! Each cleanup run prints how many events it deleted, how fast, and how many old ones were
//! left: a run that ran out of work would measure nothing. Prints the CPU model, the
//! transparent huge pages setting and the load average (the machine may be shared).
//! `BATCH=N` runs the cleanup with steps of N events instead of `EXPIRE_BATCH` (to compare).
//!
//! Run with `cargo bench --bench retention -- --warm-up-time 1 --measurement-time 5`
//! (`OLD=300000` for a quicker fill).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use gup::core::proto::{Event, EventUpload, Placement};
use gup::manager::events::{EventQuery, EventStore};
use gup::manager::retention::{Pacer, Retention, EXPIRE_BATCH};
use gup::store::Store;

const PER_UPLOAD: u64 = 100;
const CLIENTS: u64 = 10_000;
const KINDS: [&str; 5] = ["risk", "scan", "system_change", "intrusion", "update"];
const RETENTION: Retention = Retention {
    retain_days: 90,
    max_count: 1_000_000_000,
};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A cheap reproducible spread (splitmix64).
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Upload number `n` (ids unique across the run; `tag` keeps the fill and the runs apart):
/// its client, its placement and 100 events, the last a conflict of the first's id.
fn upload(tag: &str, n: u64) -> (EventUpload, Placement) {
    let client = mix(n) % CLIENTS;
    let mut events: Vec<Event> = (0..PER_UPLOAD)
        .map(|k| {
            let seq = n * PER_UPLOAD + k;
            Event {
                id: format!("{tag}-{seq}"),
                kind: KINDS[(mix(seq ^ 0xabc) % 5) as usize].to_string(),
                subkind: Some("virus".into()),
                time: "2026-11-24T10:00:00Z".into(),
                data: serde_json::json!({
                    "file": format!("C:\\Users\\user{client}\\Downloads\\setup-{seq}.exe"),
                    "action": "quarantined",
                }),
            }
        })
        .collect();
    if let Some(last) = events.last_mut() {
        last.id = format!("{tag}-{}", n * PER_UPLOAD);
        last.data = serde_json::json!({"variant": n});
    }
    let origin = Placement {
        group: format!("group-{}", client % 50),
        location: None,
    };
    (
        EventUpload {
            client_id: format!("pc-{client:05}"),
            events,
        },
        origin,
    )
}

fn fill(es: &EventStore, n: u64) -> Duration {
    let old = Utc::now() - chrono::Duration::days(100);
    let started = Instant::now();
    for u in 0..n.div_ceil(PER_UPLOAD) {
        let (up, origin) = upload("old", u);
        es.add_events(&up, &origin, old).expect("fill");
        if u % 2000 == 1999 {
            eprintln!("  filled {} of {n} events", (u + 1) * PER_UPLOAD);
        }
    }
    started.elapsed()
}

/// The cleanup as the manager runs it, in a thread, until stopped.
struct Cleanup {
    stop: Arc<AtomicBool>,
    deleted: Arc<AtomicU64>,
    ran_out: Arc<AtomicBool>,
    started: Instant,
    thread: std::thread::JoinHandle<()>,
}

impl Cleanup {
    fn start(es: &EventStore) -> Cleanup {
        let stop = Arc::new(AtomicBool::new(false));
        let deleted = Arc::new(AtomicU64::new(0));
        let ran_out = Arc::new(AtomicBool::new(false));
        let (s, d, r, es) = (stop.clone(), deleted.clone(), ran_out.clone(), es.clone());
        let thread = std::thread::spawn(move || {
            let mut pacer = Pacer::new(&es);
            while !s.load(Ordering::Relaxed) {
                let t = Instant::now();
                let x = es
                    .expire_step(&RETENTION, Utc::now(), step_batch())
                    .expect("expire");
                d.fetch_add(x.events, Ordering::Relaxed);
                if !x.more {
                    r.store(true, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(10));
                } else {
                    std::thread::sleep(pacer.pause_after(&es, &RETENTION, &x, t.elapsed()));
                }
            }
        });
        Cleanup {
            stop,
            deleted,
            ran_out,
            started: Instant::now(),
            thread,
        }
    }

    fn finish(self, what: &str, es: &EventStore) {
        self.stop.store(true, Ordering::Relaxed);
        let took = self.started.elapsed();
        self.thread.join().expect("cleanup thread");
        let n = self.deleted.load(Ordering::Relaxed);
        let left = old_left(es);
        println!(
            "cleanup during {what}: deleted {n} old events in {:.1} s ({:.0}/s); {left} old events left{}",
            took.as_secs_f64(),
            n as f64 / took.as_secs_f64(),
            if self.ran_out.load(Ordering::Relaxed) {
                " (RAN OUT OF WORK: the run measured less than it claims)"
            } else {
                ""
            }
        );
    }
}

/// Events one cleanup step deletes: `EXPIRE_BATCH` unless `BATCH` says otherwise.
fn step_batch() -> usize {
    env_u64("BATCH", EXPIRE_BATCH as u64) as usize
}

/// Old events still stored: the oldest record's seq tells where the backlog starts, the
/// fill's size where it ends.
fn old_left(es: &EventStore) -> u64 {
    let filled = env_u64("OLD", 1_000_000);
    let first = es
        .query(&EventQuery {
            limit: Some(1),
            ..Default::default()
        })
        .ok()
        .and_then(|p| p.events.first().map(|e| e.seq))
        .unwrap_or(u64::MAX);
    (filled + 1).saturating_sub(first)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// The store the benches share, filled once.
fn store() -> (tempfile::TempDir, Store, EventStore) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path()).expect("store");
    let es = EventStore::open(&store).expect("event store");
    let n = env_u64("OLD", 1_000_000);
    eprintln!("filling {n} events received 100 days ago...");
    let took = fill(&es, n);
    runtime().block_on(es.flush()).expect("flush");
    eprintln!(
        "filled in {:.1} s ({:.0} events/s); {} MiB on disk",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64(),
        dir_bytes(dir.path()) >> 20
    );
    (dir, store, es)
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

fn intake(c: &mut Criterion) {
    let (_dir, _store, es) = store();
    let rt = runtime();
    let next = AtomicU64::new(0);
    let up = || upload("new", next.fetch_add(1, Ordering::Relaxed));
    println!(
        "cleanup steps of {} events; load average {}",
        step_batch(),
        loadavg()
    );
    let mut g = c.benchmark_group("intake");
    g.throughput(Throughput::Elements(PER_UPLOAD));
    for which in ["idle", "cleanup"] {
        let running = (which == "cleanup").then(|| Cleanup::start(&es));
        g.bench_function(BenchmarkId::new("accept", which), |b| {
            b.iter_batched(
                up,
                |(u, origin)| es.accept(&u, &origin, 3600, Utc::now()).expect("accept"),
                BatchSize::SmallInput,
            )
        });
        if let Some(c) = running {
            c.finish(&format!("accept/{which}"), &es);
        }
    }
    g.finish();
    // One step alone, at two sizes: how long it holds sled's write lock (which every other
    // write waits for) and what an event costs to delete.
    let mut g = c.benchmark_group("expire");
    for batch in [100u64, 1000] {
        g.throughput(Throughput::Elements(batch));
        g.bench_function(BenchmarkId::new("step", batch), |b| {
            b.iter(|| {
                es.expire_step(&RETENTION, Utc::now(), batch as usize)
                    .expect("expire")
            })
        });
    }
    g.finish();
    let mean = |which: &str| estimate(&format!("intake/accept/{which}"));
    if let (Some(idle), Some(busy)) = (mean("idle"), mean("cleanup")) {
        println!(
            "accept: {:.0} events/s idle, {:.0} events/s with the cleanup; ratio (time per upload, cleanup/idle) {:.2}",
            PER_UPLOAD as f64 / idle,
            PER_UPLOAD as f64 / busy,
            busy / idle
        );
    }
    drop(rt);
    rounds(&es, &next);
    println!("load average {}", loadavg());
    machine();
}

/// What one round of intake measured.
struct Round {
    /// Events per second stored (and flushed).
    rate: f64,
    /// Upload latency from when it was due (paced) or started (flat out), ms.
    p50: f64,
    p99: f64,
    max: f64,
}

/// One upload of 100 new events as the manager takes a request: accept on a blocking
/// thread, then the flush the 202 waits for (shared by concurrent uploads).
async fn take(es: EventStore, n: u64) {
    let (u, origin) = upload("round", n);
    let intake = es.clone();
    tokio::task::spawn_blocking(move || intake.accept(&u, &origin, 3600, Utc::now()).map(|_| ()))
        .await
        .expect("accept task")
        .expect("accept");
    es.flush().await.expect("flush");
}

/// One round of `secs` seconds on `rt`: paced (an upload every 10 ms, each its own task as
/// a request is; latency from when it was due) or flat out ([`FLAT_OUT_TASKS`] tasks each
/// uploading one after the other; latency from its start).
fn round(
    rt: &tokio::runtime::Runtime,
    es: &EventStore,
    next: &AtomicU64,
    paced: bool,
    secs: u64,
) -> Round {
    let (took, latencies) = rt.block_on(async {
        let start = tokio::time::Instant::now();
        let end = start + Duration::from_secs(secs);
        let mut tasks = Vec::new();
        if paced {
            let mut due = start;
            while due < end {
                tokio::time::sleep_until(due).await;
                let (es, n) = (es.clone(), next.fetch_add(1, Ordering::Relaxed));
                tasks.push(tokio::spawn(async move {
                    take(es, n).await;
                    vec![due.elapsed()]
                }));
                due += Duration::from_millis(10);
            }
        } else {
            for _ in 0..FLAT_OUT_TASKS {
                let es = es.clone();
                // Each task numbers its uploads apart from the others'.
                let first = next.fetch_add(1_000_000, Ordering::Relaxed);
                tasks.push(tokio::spawn(async move {
                    let mut out = Vec::new();
                    for n in first.. {
                        let t = tokio::time::Instant::now();
                        if t >= end {
                            break;
                        }
                        take(es.clone(), n).await;
                        out.push(t.elapsed());
                    }
                    out
                }));
            }
        }
        let mut latencies = Vec::new();
        for t in tasks {
            latencies.extend(t.await.expect("upload task"));
        }
        (start.elapsed(), latencies)
    });
    let mut h = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
    for l in &latencies {
        let _ = h.record(l.as_micros() as u64);
    }
    Round {
        rate: (latencies.len() as u64 * PER_UPLOAD) as f64 / took.as_secs_f64(),
        p50: h.value_at_quantile(0.5) as f64 / 1000.0,
        p99: h.value_at_quantile(0.99) as f64 / 1000.0,
        max: h.max() as f64 / 1000.0,
    }
}

/// Concurrent uploaders of a flat-out round (as many nodes sending at once).
const FLAT_OUT_TASKS: usize = 8;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// `ROUNDS` pairs (default 4) of `ROUND_S`-second rounds (default 3), idle and with the
/// cleanup in turns (A B B A ...), so that a machine whose load drifts weighs on both
/// alike: paced 10,000 events/s, then flat out. Prints each round and the medians.
fn rounds(es: &EventStore, next: &AtomicU64) {
    let pairs = env_u64("ROUNDS", 4);
    let secs = env_u64("ROUND_S", 3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    for paced in [true, false] {
        let what = if paced {
            "paced 10,000 events/s"
        } else {
            "flat out"
        };
        let mut idle = Vec::new();
        let mut busy = Vec::new();
        for i in 0..pairs * 2 {
            let cleanup = matches!(i % 4, 1 | 2);
            let running = cleanup.then(|| Cleanup::start(es));
            let r = round(&rt, es, next, paced, secs);
            let mode = if cleanup { "cleanup" } else { "idle" };
            println!(
                "  {what}, {mode}: {:.0} events/s, upload p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (load {})",
                r.rate, r.p50, r.p99, r.max, loadavg()
            );
            if let Some(c) = running {
                c.finish(&format!("{what} round {i}"), es);
            }
            if cleanup {
                busy.push(r)
            } else {
                idle.push(r)
            }
        }
        let m = |v: &[Round], f: fn(&Round) -> f64| median(v.iter().map(f).collect());
        let (ri, rb) = (m(&idle, |r| r.rate), m(&busy, |r| r.rate));
        let (pi, pb) = (m(&idle, |r| r.p99), m(&busy, |r| r.p99));
        println!(
            "{what}, medians of {pairs} rounds each: idle {ri:.0} events/s (p50 {:.1} ms, p99 {pi:.1} ms), with the cleanup {rb:.0} events/s (p50 {:.1} ms, p99 {pb:.1} ms); rate ratio (cleanup/idle) {:.2}, p99 ratio {:.2}",
            m(&idle, |r| r.p50),
            m(&busy, |r| r.p50),
            rb / ri,
            pb / pi
        );
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// The mean time of one iteration of criterion benchmark `id` in seconds, from its saved
/// estimates.
fn estimate(id: &str) -> Option<f64> {
    let dir = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let path = dir
        .join("criterion")
        .join(id.replace('/', std::path::MAIN_SEPARATOR_STR))
        .join("new")
        .join("estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["mean"]["point_estimate"].as_f64().map(|ns| ns / 1e9)
}

fn machine() {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .unwrap_or_else(|_| "unknown".into());
    println!(
        "machine: {cpu}, {} CPUs; transparent huge pages: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        thp.trim()
    );
}

criterion_group!(benches, intake);
criterion_main!(benches);
