//! Download slots: balance and speed.
//!
//! First, balance (printed, not timed): 3,000 clients given slots in a 60 s window, the most
//! starts in any one-second interval (sliding, not aligned to buckets) over the mean per
//! second, median and worst of 100 runs, in two cases: every client asks at once (in the
//! first half second, as a push fan-out does), and the clients arrive evenly over the first
//! 20 s (pull clients learning of the revision over a 20 s heartbeat interval). gup's slots
//! (with the server's census of the clients it expects, and without) against the peers, in
//! the same run: each client picking a uniform random second itself (what Symantec-style
//! clients, ACME ARI and Omaha do), and gup's previous balancer (the less loaded of two
//! random buckets ahead, a random moment inside it). Then a criterion group: assigning slots
//! to 100,000 clients of one revision (in a fresh temp store each iteration, persisted as the
//! server does).
//!
//! Run with `cargo bench --bench slots`.

use std::time::{Duration, Instant};

use chrono::Utc;
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use gup::core::slots::{sliding_peak_to_mean, Slots};
use gup::serve::KvSlotLog;
use gup::store::Store;
use rand::Rng;

const CLIENTS: usize = 3000;
const WINDOW_S: u64 = 60;
const RUNS: usize = 100;

/// When each client asks, in seconds into the window, in the order they ask.
fn arrivals(rng: &mut impl Rng, over_s: f64) -> Vec<f64> {
    let mut a: Vec<f64> = (0..CLIENTS)
        .map(|_| rng.random_range(0.0..over_s))
        .collect();
    a.sort_by(f64::total_cmp);
    a
}

/// gup's slots for clients asking at `arrivals`, with or without the census.
fn gup_run(arrivals: &[f64], census: bool) -> f64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path()).expect("store");
    let slots = Slots::new(Box::new(KvSlotLog(store.kv("slots").expect("kv"))));
    let start = Utc::now();
    if census {
        for i in 0..arrivals.len() {
            slots.note(
                &format!("c{i}"),
                WINDOW_S,
                start + chrono::Duration::seconds(600),
                start,
            );
        }
    }
    let offsets: Vec<f64> = arrivals
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let now = start + chrono::Duration::microseconds((a * 1e6) as i64);
            let t = slots
                .slot(&format!("c{i}"), 1, start, WINDOW_S, now)
                .expect("slot")
                .expect("inside the window");
            (t - start).num_microseconds().unwrap_or(0) as f64 / 1e6
        })
        .collect();
    sliding_peak_to_mean(&offsets, WINDOW_S as f64)
}

/// Each client picks a uniform random moment in what remains of the window.
fn uniform_run(arrivals: &[f64], rng: &mut impl Rng) -> f64 {
    let w = WINDOW_S as f64;
    let offsets: Vec<f64> = arrivals.iter().map(|a| rng.random_range(*a..w)).collect();
    sliding_peak_to_mean(&offsets, w)
}

/// The previous balancer: the less loaded of two random one-second buckets ahead, then a
/// random moment inside it.
fn two_choices_run(arrivals: &[f64], rng: &mut impl Rng) -> f64 {
    let n = WINDOW_S as usize;
    let mut counts = vec![0u32; n];
    let offsets: Vec<f64> = arrivals
        .iter()
        .map(|a| {
            let first = (*a as usize).min(n - 1);
            let mut best = rng.random_range(first..n);
            let other = rng.random_range(first..n);
            if counts[other] < counts[best] {
                best = other;
            }
            counts[best] += 1;
            (best as f64 + rng.random_range(0.0..1.0)).max(*a)
        })
        .collect();
    sliding_peak_to_mean(&offsets, WINDOW_S as f64)
}

fn summary(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[v.len() - 1])
}

fn balance_report() {
    let mut rng = rand::rng();
    println!(
        "most starts in any 1 s interval (sliding) over the mean per second, {CLIENTS} clients, {WINDOW_S} s window, {RUNS} runs"
    );
    for (case, over_s) in [("all ask at once", 0.5), ("arriving over 20 s", 20.0)] {
        let mut rows: Vec<(&str, Vec<f64>)> = vec![
            ("gup slots (census)", Vec::new()),
            ("gup slots (no census)", Vec::new()),
            ("previous: 2 choices, random moment", Vec::new()),
            ("uniform random per client", Vec::new()),
        ];
        for _ in 0..RUNS {
            let a = arrivals(&mut rng, over_s);
            rows[0].1.push(gup_run(&a, true));
            rows[1].1.push(gup_run(&a, false));
            rows[2].1.push(two_choices_run(&a, &mut rng));
            rows[3].1.push(uniform_run(&a, &mut rng));
        }
        println!("{case}:");
        println!("  {:<36} {:>8} {:>8}", "", "median", "worst");
        for (name, v) in rows {
            let (m, w) = summary(v);
            println!("  {name:<36} {m:>8.3} {w:>8.3}");
        }
    }
}

fn assign_100k(c: &mut Criterion) {
    let mut group = c.benchmark_group("slots");
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.bench_function("assign_100000_clients", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dir = tempfile::tempdir().expect("temp dir");
                let store = Store::open(dir.path()).expect("store");
                let slots = Slots::new(Box::new(KvSlotLog(store.kv("slots").expect("kv"))));
                let start = Utc::now();
                let t = Instant::now();
                for i in 0..100_000 {
                    let _ = slots.slot(&format!("c{i}"), 1, start, 3600, start);
                }
                total += t.elapsed();
            }
            total
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    balance_report();
    assign_100k(c);
}

criterion_group!(slot_benches, benches);
criterion_main!(slot_benches);
