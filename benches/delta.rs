//! Deltas between versions (issue 22's measure), outside criterion: each step takes about a
//! second, so a few timed rounds say more than criterion's sampling would.
//!
//! The versions: 100 MiB of pseudo-random bytes (nothing in them compresses), then a new
//! version with 1% of its 4 KiB blocks (256 of 25,600, at random places) rewritten with random
//! bytes and 1 MiB of random bytes appended: 2 MiB changed. Printed, each the median of
//! `ROUNDS` (and the fastest):
//! - `compute`: `core::delta::compute` from the old version to the new one in memory, with the
//!   bound the servers use (half the new version). The delta's size against the changed bytes
//!   (target: at most 1.2x), and the time (target: under 2 s on this machine);
//! - `compute_at_the_server`: the same through the server's delta engine
//!   (`serve::delta::Deltas`): both versions mapped from a store, the delta hashed, written,
//!   fsynced and recorded, as the manager does after a publish and a node at the edge;
//! - `rebuild`: `core::delta::apply`, as an agent rebuilds the new version (the SHA-256 of
//!   the result, which the agent checks, timed apart).
//!
//! Run with `cargo bench --bench delta` (about half a minute on 2 cores). The stores are made
//! by `tempfile::tempdir()`, so `TMPDIR` picks the disk.

use std::sync::Arc;
use std::time::{Duration, Instant};

use gup::core::config::DeltaLimits;
use gup::core::delta;
use gup::core::digest::Digest;
use gup::serve::delta::{Asker, Deltas, Outcome};
use gup::serve::metrics::Metrics;
use gup::store::Store;

const SIZE: usize = 100 << 20;
const BLOCK: usize = 4096;
/// 1% of the blocks.
const REWRITTEN: usize = SIZE / BLOCK / 100;
const APPENDED: usize = 1 << 20;
const ROUNDS: usize = 5;

/// Deterministic pseudo-random bytes (xorshift64*) from `seed`.
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state: u64 = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The old version and the new one, and how many bytes changed.
fn versions() -> (Vec<u8>, Vec<u8>, usize) {
    let old = pseudo_random(SIZE, 1);
    let mut new = old.clone();
    // Distinct random blocks, from a generator of their own.
    let mut picks = pseudo_random(REWRITTEN * 64, 2)
        .chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as usize % (SIZE / BLOCK))
        .collect::<Vec<_>>();
    picks.sort_unstable();
    picks.dedup();
    let mut order = pseudo_random(picks.len() * 8, 3)
        .chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .zip(picks)
        .collect::<Vec<_>>();
    order.sort_unstable();
    let blocks: Vec<usize> = order.into_iter().map(|(_, b)| b).take(REWRITTEN).collect();
    assert_eq!(blocks.len(), REWRITTEN);
    for (k, b) in blocks.iter().enumerate() {
        let at = b * BLOCK;
        new[at..at + BLOCK].copy_from_slice(&pseudo_random(BLOCK, 1000 + k as u64));
    }
    new.extend_from_slice(&pseudo_random(APPENDED, 4));
    (old, new, REWRITTEN * BLOCK + APPENDED)
}

fn median(times: &mut [Duration]) -> (Duration, Duration) {
    times.sort();
    (times[times.len() / 2], times[0])
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Peak resident memory of this process so far (`VmHWM`), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken.
    let (old, new, changed) = versions();
    println!(
        "delta: {} MiB, {REWRITTEN} of {} blocks of {BLOCK} B rewritten + {} MiB appended = {changed} bytes changed; level {}; {ROUNDS} rounds",
        SIZE >> 20,
        SIZE / BLOCK,
        APPENDED >> 20,
        delta::LEVEL
    );
    let rss_before = peak_rss_mib();

    let mut times = Vec::new();
    let mut bytes = Vec::new();
    for _ in 0..ROUNDS {
        let started = Instant::now();
        bytes = delta::compute(&old, &new, new.len() / 2)
            .expect("compute")
            .expect("a delta worth having");
        times.push(started.elapsed());
    }
    let (m, best) = median(&mut times);
    let ratio = bytes.len() as f64 / changed as f64;
    println!(
        "compute                 {:>8.3} s median, {:.3} s best; delta {} bytes = {ratio:.3}x the changed bytes (target <= 1.2x, < 2 s)",
        secs(m),
        secs(best),
        bytes.len()
    );
    if let (Some(before), Some(after)) = (rss_before, peak_rss_mib()) {
        println!(
            "                        peak RSS {after:.0} MiB (the two versions held in memory: {before:.0} MiB)"
        );
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut times = Vec::new();
    for _ in 0..ROUNDS {
        let elapsed = runtime.block_on(async {
            let dir = tempfile::tempdir().expect("temp dir");
            let store = Store::open(dir.path()).expect("store");
            let (a, b) = (put(&store, &old).await, put(&store, &new).await);
            let engine = Arc::new(
                Deltas::new(store, DeltaLimits::default(), Arc::new(Metrics::new()))
                    .expect("engine"),
            );
            let started = Instant::now();
            let made = engine.get_or_compute(a, b, Asker::Listing).await;
            let elapsed = started.elapsed();
            match made {
                Ok(Outcome::Delta(blob)) => assert_eq!(blob.size, bytes.len() as u64),
                other => panic!("{other:?}"),
            }
            elapsed
        });
        times.push(elapsed);
    }
    let (m, best) = median(&mut times);
    println!(
        "compute_at_the_server   {:>8.3} s median, {:.3} s best (mapped from the store, stored and recorded)",
        secs(m),
        secs(best)
    );

    let mut times = Vec::new();
    let mut hashing = Vec::new();
    let mut out = vec![0u8; new.len()];
    for _ in 0..ROUNDS {
        out.fill(0);
        let started = Instant::now();
        delta::apply(&old, &bytes, &mut out).expect("apply");
        times.push(started.elapsed());
        let started = Instant::now();
        let digest = Digest::of(&out);
        hashing.push(started.elapsed());
        assert!(
            digest == Digest::of(&new),
            "the rebuilt version is the new one"
        );
    }
    let (m, best) = median(&mut times);
    let (h, _) = median(&mut hashing);
    println!(
        "rebuild                 {:>8.3} s median, {:.3} s best; then its SHA-256 {:.3} s",
        secs(m),
        secs(best),
        secs(h)
    );
}

async fn put(store: &Store, bytes: &[u8]) -> Digest {
    let mut w = store.writer().await.expect("writer");
    for chunk in bytes.chunks(1 << 20) {
        w.write(chunk).await.expect("write");
    }
    w.finish(None).await.expect("finish").0
}
