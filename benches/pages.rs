//! What a status page load costs the server: rendering each page from a full state.
//!
//! The node page with 50 catalog items, a full hour of WAN and LAN history (61 points each)
//! and the download starts of a one-hour window (3,600 one-second cells binned into 60
//! bars); the manager page with 200 nodes, 500 groups in a tree (laid out by the page's own
//! `group_tree` from a directory), 10 notifications, 3 revisions of 50 items and a full hour
//! of heartbeats and events. Both through the renderers the handlers call
//! (`page::node_page::render`, `page::manager_page::render`); what the handlers add is
//! reading in-memory state (the catalog, the store's index, the cached client counts).
//!
//! Run with `cargo bench --bench pages`.

use std::collections::BTreeMap;

use chrono::{Duration, Utc};
use criterion::{criterion_group, criterion_main, Criterion};
use gup::core::settings::Directory;
use gup::core::starts::Starts;
use gup::manager::status_page::group_tree;
use gup::page::history::History;
use gup::page::manager_page::{self, CatalogRow, ManagerView, NodeRow, NoticeRow, RevisionRow};
use gup::page::node_page::{self, ItemRow, NodeView, UpstreamRow, UpstreamState};

fn hour<const K: usize>() -> [Vec<(f64, f64)>; K] {
    let mut h = History::<K>::default();
    let t0 = 1_700_000_000i64;
    for m in 0..=61i64 {
        h.observe(
            t0 + m * 60,
            std::array::from_fn(|k| (m * 1000 * (k as i64 + 1)) as u64),
        );
    }
    h.rates(t0 + 61 * 60 + 30, [70_000; K])
}

fn node_view() -> NodeView {
    let now = Utc::now();
    let starts = Starts::default();
    let at = now - Duration::seconds(1800);
    for i in 0..5000 {
        starts.record(7, at, || 3600, at + Duration::milliseconds(i * 700));
    }
    let [wan, lan] = hour::<2>();
    NodeView {
        node_id: "node-0123456789abcdef".into(),
        version: "0.1.0".into(),
        now,
        upstreams: vec![
            UpstreamRow {
                url: "https://manager.example:8443/".into(),
                state: UpstreamState::Up,
            },
            UpstreamRow {
                url: "https://backup.example:8443/".into(),
                state: UpstreamState::NotTried,
            },
        ],
        proxy: None,
        ready: true,
        stale_since: None,
        revision: 7,
        revision_at: Some(at),
        items: (0..50)
            .map(|i| ItemRow {
                name: format!("definitions-{i}"),
                version: format!("2026.12.{i}"),
                sha256: format!("{i:064x}"),
                size: 10_000_000 + i,
                urgent: i % 10 == 0,
                cached: i % 3 != 0,
            })
            .collect(),
        cache_bytes: 3 << 30,
        cache_budget: 10 << 30,
        blobs: 120,
        wan,
        lan,
        starts: starts.of(7),
        heartbeat_interval_s: 300,
        recent_heartbeats: 4000,
        stream_clients: 1200,
    }
}

fn manager_view() -> ManagerView {
    let now = Utc::now();
    let mut dir = Directory::default();
    let mut counts = BTreeMap::new();
    for i in 0..500 {
        let parent = if i < 20 {
            "default".to_string()
        } else {
            format!("g{}", i % 20)
        };
        let name = format!("g{i}");
        dir.put_group(&name, &parent).unwrap();
        counts.insert(name, (100 + i as u64, (i % 7) as u64));
    }
    let [heartbeats, events] = hour::<2>();
    let items: Vec<CatalogRow> = (0..50)
        .map(|i| CatalogRow {
            name: format!("definitions-{i}"),
            version: format!("2026.12.{i}"),
            size: 10_000_000,
            urgent: false,
            published_at: now,
        })
        .collect();
    ManagerView {
        version: "0.1.0".into(),
        now,
        nodes: (0..200)
            .map(|i| NodeRow {
                id: format!("node-{i:016x}"),
                name: format!("branch-{i}"),
                url: format!("http://10.0.{}.{}:8080/", i / 250, i % 250),
                revision: 7,
                revisions_behind: (i % 5 == 0) as u64,
                via: (i % 4 == 0).then(|| format!("node-{:016x}", i + 1)),
                overdue: i % 50 == 0,
                stale_since: None,
                clients: 150,
                events_queued: i,
                last_report: now,
            })
            .collect(),
        groups: group_tree(&dir, &counts),
        counted_at: Some(now),
        counts_partial: false,
        notices: (0..10)
            .map(|i| NoticeRow {
                group: format!("g{i}"),
                kind: "intrusion".into(),
                first_at: now,
                last_at: now,
                count: 3,
                client_id: format!("pc-{i}"),
                acked_at: (i % 2 == 0).then_some(now),
            })
            .collect(),
        revisions: (5..8)
            .map(|r| RevisionRow {
                revision: r,
                available_at: now,
                items: 50,
                bytes: 500_000_000,
            })
            .collect(),
        catalog: items,
        heartbeats,
        events,
        session: true,
    }
}

fn pages(c: &mut Criterion) {
    let node = node_view();
    let manager = manager_view();
    let mut g = c.benchmark_group("pages");
    g.bench_function("node page render", |b| {
        b.iter(|| node_page::render(std::hint::black_box(&node)))
    });
    g.bench_function("manager page render", |b| {
        b.iter(|| manager_page::render(std::hint::black_box(&manager)))
    });
    g.finish();
}

criterion_group!(benches, pages);
criterion_main!(benches);
