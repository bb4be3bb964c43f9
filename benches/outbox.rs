//! The node's event outbox under a flood: fill, reopen, drain.
//!
//! Fills an outbox in a temp store with `EVENTS` events (default 1,000,000) in uploads of
//! four events (about 270 bytes of JSON each, the size of the events of the flood that was
//! measured: 13.4 million in 3.7 GB), pushed 100 uploads per flush, the critical lane
//! getting one upload in a thousand. Then it times reopening the outbox (what a node's
//! start-up does) and draining it as forwarding does: a page of at most `FORWARD_BATCH`
//! bytes from the head of a lane, critical lane first, removed in one batch. It prints
//! events per second, the bytes on disk, the peak resident memory and the CPU model.
//! Printed, not asserted: the reference is the previous outbox, which reopened 13.4 million
//! events in 21 s and drained 2,700 events/s.
//!
//! Run with `cargo bench --bench outbox` (`EVENTS=13400000` for the measured flood).

use std::sync::Arc;
use std::time::Instant;

use gup::core::proto::{Event, EventUpload, Placed, Upload, FORWARD_BATCH};
use gup::node::outbox::{Lane, Outbox};
use gup::serve::metrics::Metrics;
use gup::store::Store;

const EVENTS_PER_UPLOAD: usize = 4;
const UPLOADS_PER_PUSH: usize = 100;

fn upload(n: usize) -> Placed {
    let critical = n % 1000 == 999;
    let events = (0..EVENTS_PER_UPLOAD)
        .map(|i| Event {
            id: format!("{n:010}-{i}"),
            kind: if critical && i == 0 {
                "intrusion"
            } else {
                "system_change"
            }
            .into(),
            subkind: Some("registry".into()),
            time: "2026-11-24T10:00:00Z".into(),
            data: serde_json::json!({
                "path": format!("HKLM\\Software\\Vendor\\Product\\Key{n}\\Value{i}"),
                "action": "modified",
                "process": "C:\\Windows\\System32\\svchost.exe",
            }),
        })
        .collect();
    Placed {
        upload: Upload::Events(EventUpload {
            client_id: format!("client-{:06}", n % 100_000),
            events,
        }),
        placement: None,
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn dir_bytes(path: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn open(store: &Store) -> Outbox {
    Outbox::open(store, u64::MAX / 2, Arc::new(Metrics::new())).expect("open the outbox")
}

async fn run(events: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let uploads = events.div_ceil(EVENTS_PER_UPLOAD);
    let started = Instant::now();
    {
        let store = Store::open(dir.path()).expect("store");
        let outbox = open(&store);
        let mut n = 0;
        while n < uploads {
            let batch: Vec<Placed> = (n..uploads.min(n + UPLOADS_PER_PUSH)).map(upload).collect();
            outbox.push_all(&batch).await.expect("push");
            n += batch.len();
        }
        store.flush().await.expect("flush");
    }
    let fill = started.elapsed();
    let on_disk = dir_bytes(dir.path());
    println!(
        "fill:   {events} events in {uploads} uploads, {:.1} s ({:.0} events/s), {:.0} MiB on disk",
        fill.as_secs_f64(),
        events as f64 / fill.as_secs_f64(),
        on_disk as f64 / (1 << 20) as f64
    );

    let started = Instant::now();
    let store = Store::open(dir.path()).expect("store");
    let outbox = open(&store);
    let reopen = started.elapsed();
    let queued = outbox.queued().expect("count");
    println!(
        "reopen: {:.3} s, {queued} events counted",
        reopen.as_secs_f64()
    );

    let started = Instant::now();
    let (mut drained, mut pages, mut first_critical) = (0u64, 0u64, None);
    for lane in Lane::ALL {
        loop {
            let page = outbox.peek(lane, FORWARD_BATCH).expect("peek");
            if page.is_empty() {
                break;
            }
            if lane == Lane::Critical && first_critical.is_none() {
                first_critical = Some(started.elapsed());
            }
            let tickets: Vec<_> = page.iter().map(|q| q.ticket.clone()).collect();
            drained += tickets.iter().map(|t| t.events()).sum::<u64>();
            pages += 1;
            outbox.remove(lane, &tickets).await.expect("remove");
        }
    }
    let drain = started.elapsed();
    println!(
        "drain:  {drained} events in {pages} pages of at most {} MiB, {:.1} s ({:.0} events/s); first critical page after {:.1} ms",
        FORWARD_BATCH >> 20,
        drain.as_secs_f64(),
        drained as f64 / drain.as_secs_f64(),
        first_critical.map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    );
    assert_eq!(drained, queued, "every queued event drained once");
    println!(
        "peak resident memory of this process: {:.0} MiB",
        peak_rss_mib()
    );
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken.
    let events = std::env::var("EVENTS")
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(1_000_000usize);
    println!("outbox bench on {} ({} CPUs)", cpu_model(), num_cpus());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(events));
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
