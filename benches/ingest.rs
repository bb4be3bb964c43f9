//! Ingest speed of the content store, against its two floors.
//!
//! Group `ingest`, throughput in bytes, on a 64 MiB buffer of pseudo-random bytes in a fresh
//! temp directory:
//! - `store_ingest`: the real path, `Store::writer` fed 256 KiB chunks then
//!   `BlobWriter::finish` with the expected digest and size (hash + write + fsync + rename +
//!   directory fsync + index). Every iteration stores a new blob (the first 8 bytes carry a
//!   counter, its digest is computed outside the timed part) so that dedupe cannot
//!   short-circuit it, and the blob is removed afterwards, also outside the timed part.
//! - `write_fsync_only`: the baseline, the same bytes written with `std::fs` in 256 KiB
//!   chunks, `sync_all` and a rename, no hashing. The contract wants `store_ingest` within
//!   about 10% of it.
//! - `sha256_only`: `sha2::Sha256` over the buffer, no I/O; compare it with
//!   `openssl speed -evp sha256 -bytes 16384`.
//!
//! - then, outside criterion, the yardstick: the store's ingest of a 256 MiB file
//!   against `openssl dgst -sha256` on the same file, best of five each, with the ratio.
//!
//! Run with `cargo bench --bench ingest` (about a minute on 2 cores). The temp directory is
//! made by `tempfile::tempdir()`, so set `TMPDIR` to measure another disk: `TMPDIR=/dev/shm`
//! (tmpfs, where fsync costs nothing) shows what hashing costs on its own.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use gup::core::digest::Digest;
use gup::store::Store;
use sha2::{Digest as _, Sha256};

/// Size of the blob each iteration ingests.
const SIZE: usize = 64 << 20;
/// Size of the chunks handed to the writer, as an HTTP body would.
const CHUNK: usize = 256 << 10;

/// Deterministic pseudo-random bytes (xorshift64*), incompressible enough for any disk.
fn pseudo_random(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
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

/// Makes `buf` a blob never seen before by stamping `counter` into its first 8 bytes.
fn stamp(buf: &mut [u8], counter: &mut u64) {
    *counter += 1;
    buf[..8].copy_from_slice(&counter.to_le_bytes());
}

/// The baseline: create, write in chunks, fsync, rename into `dest`.
fn write_fsync_rename(buf: &[u8], tmp: &Path, dest: &Path) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)?;
    for chunk in buf.chunks(CHUNK) {
        file.write_all(chunk)?;
    }
    file.sync_all()?;
    drop(file);
    std::fs::rename(tmp, dest)
}

/// Stores `buf` as a new blob through the real path (`Store::writer` fed [`CHUNK`]-sized
/// chunks, then `finish` with the expected digest and size) and removes it again; the time
/// of the store only. Its digest is computed before the clock starts.
fn store_once(rt: &tokio::runtime::Runtime, store: &Store, buf: &[u8]) -> Duration {
    let digest = Digest::of(buf);
    rt.block_on(async {
        let start = Instant::now();
        let mut writer = store.writer().await.expect("writer");
        for chunk in buf.chunks(CHUNK) {
            writer.write(chunk).await.expect("write");
        }
        let (got, _) = writer
            .finish(Some((&digest, Some(buf.len() as u64))))
            .await
            .expect("finish");
        let elapsed = start.elapsed();
        assert_eq!(got, digest);
        store.remove(&digest).await.expect("remove");
        elapsed
    })
}

fn ingest(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(&dir.path().join("store")).expect("open store");
    let plain = dir.path().join("plain");
    std::fs::create_dir_all(&plain).expect("plain dir");
    let mut buf = pseudo_random(SIZE);
    let mut counter = 0u64;

    let mut group = c.benchmark_group("ingest");
    group
        .throughput(Throughput::Bytes(SIZE as u64))
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8));

    group.bench_function("store_ingest", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                stamp(&mut buf, &mut counter);
                total += store_once(&rt, &store, &buf);
            }
            total
        })
    });

    group.bench_function("write_fsync_only", |b| {
        let tmp = plain.join("blob.part");
        let dest = plain.join("blob");
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                stamp(&mut buf, &mut counter);
                let start = Instant::now();
                write_fsync_rename(&buf, &tmp, &dest).expect("write, fsync, rename");
                total += start.elapsed();
                std::fs::remove_file(&dest).expect("remove");
            }
            total
        })
    });

    group
        .measurement_time(Duration::from_secs(5))
        .bench_function("sha256_only", |b| {
            b.iter(|| {
                let mut hasher = Sha256::new();
                hasher.update(std::hint::black_box(&buf[..]));
                hasher.finalize()
            })
        });

    group.finish();
    versus_openssl(&rt, &store, dir.path());
}

/// The yardstick: store ingest against `openssl dgst -sha256` on the same file (256
/// MiB, in the page cache, so that openssl's start-up is noise), best of five each. Printed
/// after criterion's groups; skipped when openssl is missing.
fn versus_openssl(rt: &tokio::runtime::Runtime, store: &Store, dir: &Path) {
    const BIG: usize = 256 << 20;
    let mut buf = pseudo_random(BIG);
    let file = dir.join("openssl-input");
    std::fs::write(&file, &buf).expect("write the input file");
    let mut openssl = Duration::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        let out = std::process::Command::new("openssl")
            .args(["dgst", "-sha256"])
            .arg(&file)
            .output();
        match out {
            Ok(o) if o.status.success() => openssl = openssl.min(start.elapsed()),
            _ => {
                println!("ingest vs openssl: openssl not available; skipped");
                return;
            }
        }
    }
    let mut counter = 1u64 << 40;
    let mut ingest = Duration::MAX;
    for _ in 0..5 {
        stamp(&mut buf, &mut counter);
        ingest = ingest.min(store_once(rt, store, &buf));
    }
    let rate = |d: Duration| BIG as f64 / (1 << 20) as f64 / d.as_secs_f64();
    println!(
        "ingest vs openssl dgst -sha256, same 256 MiB, best of 5: store ingest {:.0} MiB/s, \
         openssl {:.0} MiB/s, ratio {:.2} (target >= 0.9)",
        rate(ingest),
        rate(openssl),
        openssl.as_secs_f64() / ingest.as_secs_f64()
    );
}

criterion_group!(benches, ingest);
criterion_main!(benches);
