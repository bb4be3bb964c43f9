//! The outbox: lanes, the bound with its critical reserve, counts across a reopen, the move
//! from the previous format, and pages that never read past themselves.

use super::*;
use crate::core::proto::{Event, EventUpload, Upload};

const MIB: u64 = 1 << 20;

fn ev(id: &str, kind: &str) -> Event {
    Event {
        id: id.into(),
        kind: kind.into(),
        subkind: None,
        time: "2026-11-24T10:00:00Z".into(),
        data: serde_json::json!({"pad": "x".repeat(100)}),
    }
}

fn upload(client: &str, kind: &str, events: usize) -> Placed {
    Placed {
        upload: Upload::Events(EventUpload {
            client_id: client.into(),
            events: (0..events).map(|i| ev(&format!("e{i}"), kind)).collect(),
        }),
        placement: None,
    }
}

fn open(store: &Store, max: u64) -> (Outbox, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    (Outbox::open(store, max, metrics.clone()).unwrap(), metrics)
}

fn clients(page: &[Queued]) -> Vec<&str> {
    page.iter().map(|q| q.placed.upload.client_id()).collect()
}

fn tickets(page: &[Queued]) -> Vec<Ticket> {
    page.iter().map(|q| q.ticket.clone()).collect()
}

#[tokio::test]
async fn uploads_go_to_their_lane_in_order_and_leave_when_removed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (outbox, metrics) = open(&store, 256 * MIB);
    outbox
        .push_all(&[upload("n0", "system_change", 2)])
        .await
        .unwrap();
    outbox
        .push_all(&[upload("c0", "intrusion", 1)])
        .await
        .unwrap();
    outbox
        .push_all(&[upload("n1", "system_change", 3), upload("c1", "risk", 1)])
        .await
        .unwrap();
    assert!(outbox.has(Lane::Critical));
    let critical = outbox.peek(Lane::Critical, MIB as usize).unwrap();
    assert_eq!(clients(&critical), ["c0", "c1"]);
    let normal = outbox.peek(Lane::Normal, MIB as usize).unwrap();
    assert_eq!(clients(&normal), ["n0", "n1"]);
    assert_eq!(outbox.queued().unwrap(), 7);
    assert_eq!(metrics.events_queued.get(), 7);
    let fill = outbox.fill(Lane::Normal).unwrap();
    assert_eq!((fill.records, fill.events), (2, 5));
    let bytes: u64 = normal.iter().map(|q| q.ticket.bytes()).sum();
    assert_eq!(fill.bytes, bytes);
    assert_eq!(metrics.outbox_bytes("normal").get() as u64, bytes);
    // A ticket's bytes are the upload's JSON as it goes upstream.
    assert_eq!(
        bytes,
        normal
            .iter()
            .map(|q| serde_json::to_vec(&q.placed).unwrap().len() as u64)
            .sum::<u64>()
    );

    outbox
        .remove(Lane::Critical, &tickets(&critical))
        .await
        .unwrap();
    assert!(!outbox.has(Lane::Critical));
    assert_eq!(outbox.fill(Lane::Critical).unwrap(), Fill::default());
    assert_eq!(metrics.outbox_bytes("critical").get(), 0);
    // Removing the same again (a second forwarder) counts nothing twice.
    outbox
        .remove(Lane::Normal, &tickets(&normal[..1]))
        .await
        .unwrap();
    outbox
        .remove(Lane::Normal, &tickets(&normal[..1]))
        .await
        .unwrap();
    assert_eq!(outbox.fill(Lane::Normal).unwrap().events, 3);
    assert_eq!(
        clients(&outbox.peek(Lane::Normal, MIB as usize).unwrap()),
        ["n1"]
    );
    assert_eq!(metrics.events_queued.get(), 3);
}

#[tokio::test]
async fn normal_uploads_stop_at_three_quarters_and_critical_ones_use_the_reserve() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (outbox, metrics) = open(&store, MIB);
    assert_eq!(metrics.outbox_max_bytes.get() as u64, MIB);
    let held =
        |o: &Outbox| o.fill(Lane::Critical).unwrap().bytes + o.fill(Lane::Normal).unwrap().bytes;
    let mut accepted = 0;
    let refusal = loop {
        match outbox
            .push_all(&[upload(&format!("n{accepted}"), "system_change", 10)])
            .await
        {
            Ok(()) => accepted += 1,
            Err(e) => break e,
        }
        assert!(accepted < 10_000, "never refused");
    };
    assert!(
        matches!(refusal, OutboxError::Full { lane: "normal", .. }),
        "{refusal}"
    );
    assert_eq!(
        refusal.kind(),
        Kind::Unavailable {
            retry_after_s: FULL_RETRY_AFTER_S
        }
    );
    assert_eq!(refusal.code(), "outbox_full");
    let normal_full = held(&outbox);
    assert!(normal_full <= MIB * 3 / 4);
    // Within one upload of the three quarters.
    assert!(normal_full > MIB * 3 / 4 - 2048, "{normal_full}");
    // A critical upload still fits, until the whole bound.
    let mut critical = 0;
    while outbox
        .push_all(&[upload("c", "intrusion", 10)])
        .await
        .is_ok()
    {
        critical += 1;
        assert!(critical < 10_000, "never refused");
    }
    assert!(critical > 100, "{critical} critical uploads in the reserve");
    assert!(held(&outbox) <= MIB);
    assert!(held(&outbox) > MIB - 2048);
    // A batch with both kinds counts as normal: refused while over three quarters.
    let mixed = [upload("m", "intrusion", 1), upload("m", "system_change", 1)];
    assert!(matches!(
        outbox.push_all(&mixed).await,
        Err(OutboxError::Full { lane: "normal", .. })
    ));
    assert_eq!(metrics.outbox_refused.get(), 3);
    // Room again once the upstream took some.
    let page = outbox.peek(Lane::Critical, MIB as usize).unwrap();
    outbox
        .remove(Lane::Critical, &tickets(&page))
        .await
        .unwrap();
    assert!(held(&outbox) <= MIB * 3 / 4);
    outbox
        .push_all(&[upload("late", "system_change", 1)])
        .await
        .unwrap();
}

#[tokio::test]
async fn counts_and_order_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (fills, next_page) = {
        let store = Store::open(dir.path()).unwrap();
        let (outbox, _) = open(&store, 256 * MIB);
        for i in 0..50 {
            let kind = if i % 10 == 0 { "risk" } else { "system_change" };
            outbox
                .push_all(&[upload(&format!("p{i}"), kind, 1 + i % 3)])
                .await
                .unwrap();
        }
        let page = outbox.peek(Lane::Normal, 2000).unwrap();
        assert!(!page.is_empty() && page.len() < 45);
        outbox.remove(Lane::Normal, &tickets(&page)).await.unwrap();
        let fills = [
            outbox.fill(Lane::Critical).unwrap(),
            outbox.fill(Lane::Normal).unwrap(),
        ];
        let next: Vec<String> = clients(&outbox.peek(Lane::Normal, 1).unwrap())
            .into_iter()
            .map(str::to_string)
            .collect();
        (fills, next)
    };
    let store = Store::open(dir.path()).unwrap();
    let (outbox, metrics) = open(&store, 256 * MIB);
    assert_eq!(outbox.fill(Lane::Critical).unwrap(), fills[0]);
    assert_eq!(outbox.fill(Lane::Normal).unwrap(), fills[1]);
    assert_eq!(fills[0].records, 5);
    assert_eq!(
        metrics.events_queued.get() as u64,
        fills[0].events + fills[1].events
    );
    assert_eq!(
        metrics.outbox_bytes("critical").get() as u64,
        fills[0].bytes
    );
    assert_eq!(clients(&outbox.peek(Lane::Normal, 1).unwrap()), next_page);
    // New pushes go after what is there.
    outbox
        .push_all(&[upload("after", "system_change", 1)])
        .await
        .unwrap();
    let all = outbox.peek(Lane::Normal, 16 * MIB as usize).unwrap();
    assert_eq!(all.len() as u64, fills[1].records + 1);
    assert_eq!(
        all.last().map(|q| q.placed.upload.client_id()),
        Some("after")
    );
}

#[tokio::test]
async fn the_previous_format_moves_into_the_lanes_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let total = MIGRATE_RECORDS + 25;
    {
        let store = Store::open(dir.path()).unwrap();
        let old = store.kv(OLD_TREE).unwrap();
        let mut batch = Batch::default();
        for i in 0..total {
            let kind = if i % 1000 == 7 {
                "intrusion"
            } else {
                "system_change"
            };
            batch
                .put(&format!("{i:020}"), &upload(&format!("o{i}"), kind, 1))
                .unwrap();
        }
        // One record that no version can read stays behind; the rest still move.
        batch
            .put(&format!("{total:020}"), &serde_json::json!({"nonsense": 1}))
            .unwrap();
        old.apply(batch).unwrap();
        store.flush().await.unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let (outbox, metrics) = open(&store, 256 * MIB);
    let critical = outbox.fill(Lane::Critical).unwrap();
    let normal = outbox.fill(Lane::Normal).unwrap();
    assert_eq!(critical.records, 11);
    assert_eq!(normal.records as usize, total - 11);
    assert_eq!(metrics.events_queued.get() as usize, total);
    let first = outbox.peek(Lane::Critical, 16 * MIB as usize).unwrap();
    assert_eq!(clients(&first)[..2], ["o7", "o1007"]);
    let normal_page = outbox.peek(Lane::Normal, 2000).unwrap();
    assert_eq!(clients(&normal_page)[..3], ["o0", "o1", "o2"]);
    let old = store.kv(OLD_TREE).unwrap();
    assert_eq!(old.scan::<serde_json::Value>("").unwrap().len(), 1);
    drop(outbox);
    // Opening again moves nothing twice.
    let (outbox, _) = open(&store, 256 * MIB);
    assert_eq!(outbox.fill(Lane::Normal).unwrap(), normal);
    assert_eq!(outbox.fill(Lane::Critical).unwrap(), critical);
}

#[tokio::test]
async fn a_page_of_a_huge_lane_reads_only_the_page() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (outbox, _) = open(&store, 1 << 40);
    let uploads: Vec<Placed> = (0..20_000)
        .map(|i| upload(&format!("h{i}"), "system_change", 1))
        .collect();
    for chunk in uploads.chunks(1000) {
        outbox.push_all(chunk).await.unwrap();
    }
    let one = serde_json::to_vec(&uploads[0]).unwrap().len();
    // Records past the page that no one can read: a peek that decoded past its page would
    // fail on them (the one record right after the page is looked at, not decoded).
    let kv = &outbox.lanes[Lane::Normal.index()];
    for seq in [12, 100, 19_000] {
        kv.put(&record_key(seq), &serde_json::json!({"not": "an upload"}))
            .unwrap();
    }
    let started = std::time::Instant::now();
    let page = outbox.peek(Lane::Normal, one * 10).unwrap();
    assert_eq!(page.len(), 10);
    assert_eq!(clients(&page)[0], "h0");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // Draining page by page reaches an unreadable record at the head: it is set aside
    // under `bad/` and the pages after it still come.
    // (Sequence numbers start at 1: `h{i}` is record i + 1.)
    outbox.remove(Lane::Normal, &tickets(&page)).await.unwrap();
    let short = outbox.peek(Lane::Normal, one * 10).unwrap();
    assert_eq!(clients(&short), ["h10"]);
    outbox.remove(Lane::Normal, &tickets(&short)).await.unwrap();
    let next = outbox.peek(Lane::Normal, one * 10).unwrap();
    assert_eq!(clients(&next)[0], "h12");
    let aside = kv.scan::<serde_json::Value>(UNREADABLE).unwrap();
    assert_eq!(aside.len(), 1);
    assert!(aside[0]
        .0
        .starts_with(&format!("{UNREADABLE}{}/", record_key(12))));
    assert!(!kv.contains(&record_key(12)).unwrap());
}
