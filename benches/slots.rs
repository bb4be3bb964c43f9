//! Download slots: balance and speed.
//!
//! First, balance (printed, not timed): 3,000 clients given slots in a 60 s window, starts
//! counted per one-second bucket, peak/mean over 100 runs for gup's slots against each client
//! picking a uniform random second itself (what Symantec-style clients, ACME ARI and Omaha
//! do). Then a criterion group: assigning slots to 100,000 clients of one revision (in a fresh
//! temp store each iteration, persisted as the server does).
//!
//! Run with `cargo bench --bench slots`.

use std::time::{Duration, Instant};

use chrono::Utc;
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use gup::core::slots::{peak_to_mean, Slots};
use gup::serve::KvSlotLog;
use gup::store::Store;
use rand::Rng;

const CLIENTS: usize = 3000;
const WINDOW_S: u64 = 60;
const RUNS: usize = 100;

fn gup_run() -> f64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path()).expect("store");
    let slots = Slots::new(Box::new(KvSlotLog(store.kv("slots").expect("kv"))));
    let start = Utc::now();
    let mut counts = vec![0u32; WINDOW_S as usize];
    for i in 0..CLIENTS {
        let t = slots
            .slot(&format!("c{i}"), 1, start, WINDOW_S, start)
            .expect("slot")
            .expect("inside the window");
        let b = ((t - start).num_milliseconds() / 1000) as usize;
        let last = counts.len() - 1;
        counts[b.min(last)] += 1;
    }
    peak_to_mean(&counts)
}

fn uniform_run(rng: &mut impl Rng) -> f64 {
    let mut counts = vec![0u32; WINDOW_S as usize];
    for _ in 0..CLIENTS {
        counts[rng.random_range(0..WINDOW_S as usize)] += 1;
    }
    peak_to_mean(&counts)
}

fn summary(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[v.len() - 1])
}

fn balance_report() {
    let mut rng = rand::rng();
    let gup: Vec<f64> = (0..RUNS).map(|_| gup_run()).collect();
    let uniform: Vec<f64> = (0..RUNS).map(|_| uniform_run(&mut rng)).collect();
    let (gm, gw) = summary(gup);
    let (um, uw) = summary(uniform);
    println!("download starts per 1 s bucket, {CLIENTS} clients, {WINDOW_S} s window, {RUNS} runs");
    println!(
        "{:<32} {:>14} {:>14}",
        "", "median peak/mean", "worst peak/mean"
    );
    println!("{:<32} {:>14.3} {:>14.3}", "gup slots (2 choices)", gm, gw);
    println!(
        "{:<32} {:>14.3} {:>14.3}",
        "uniform random per client", um, uw
    );
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
