//! Prometheus metrics of one server (manager or node), rendered at `GET /metrics`.
//!
//! Owns the metric names of the contract and their registry. It must never hold logic: modules
//! increment what they did, this file only counts and renders.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// An upstream no call has gone to yet (a lower-priority server while a higher one answers).
pub const UPSTREAM_NOT_TRIED: &str = "not_tried";
/// An upstream whose last call succeeded.
pub const UPSTREAM_UP: &str = "up";
/// An upstream whose last call failed (backing off).
pub const UPSTREAM_DOWN: &str = "down";
/// An upstream that answered 429/503 with `Retry-After`: not asked again until then.
pub const UPSTREAM_HELD: &str = "held";
/// The states of `gup_upstream_state`.
pub const UPSTREAM_STATES: [&str; 4] = [
    UPSTREAM_NOT_TRIED,
    UPSTREAM_UP,
    UPSTREAM_DOWN,
    UPSTREAM_HELD,
];

/// Buckets of `gup_request_duration_seconds`: 100 µs doubling to about 3.3 s (16 buckets):
/// a heartbeat answered from memory is well under a millisecond, a content response's head
/// comes after at most one upstream round trip.
fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// Buckets of `gup_delta_seconds`: 10 ms doubling to about 80 s (14 buckets): a delta of a
/// few MiB takes milliseconds, one between two 1 GiB versions tens of seconds.
fn delta_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 14))
}

/// How `GET /v1/delta/{from}/{to}` was answered (`gup_delta_answers_total{answer}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeltaAnswer {
    /// With a delta the catalog lists.
    Listed = 0,
    /// With a delta this server computed (or had computed before) at the edge.
    Edge = 1,
    /// 404 `no_delta`.
    None = 2,
}

impl DeltaAnswer {
    const ALL: [DeltaAnswer; 3] = [DeltaAnswer::Listed, DeltaAnswer::Edge, DeltaAnswer::None];

    /// The `answer` label.
    pub fn as_str(self) -> &'static str {
        match self {
            DeltaAnswer::Listed => "listed",
            DeltaAnswer::Edge => "edge",
            DeltaAnswer::None => "none",
        }
    }
}

/// `gup_request_duration_seconds`: one histogram per route.
type Durations = Family<Vec<(String, String)>, Histogram, fn() -> Histogram>;

/// Where a content response's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServedFrom {
    /// The hot cache of small blobs in memory.
    Memory = 0,
    /// A stored blob, read or mapped from disk (also one fetched for this very request).
    Disk = 1,
    /// A blob still arriving from upstream, streamed from its growing temp file.
    Arriving = 2,
}

impl ServedFrom {
    const ALL: [ServedFrom; 3] = [ServedFrom::Memory, ServedFrom::Disk, ServedFrom::Arriving];

    /// The `source` label.
    pub fn as_str(self) -> &'static str {
        match self {
            ServedFrom::Memory => "memory",
            ServedFrom::Disk => "disk",
            ServedFrom::Arriving => "arriving",
        }
    }
}

/// The byte counters one content response adds to: the total and its source's.
#[derive(Clone)]
pub struct ServedBytes {
    total: Counter,
    source: Counter,
}

impl ServedBytes {
    pub fn inc_by(&self, n: u64) {
        self.total.inc_by(n);
        self.source.inc_by(n);
    }
}

/// The counters and gauges of one server.
pub struct Metrics {
    registry: Registry,
    /// Blob fetches started upstream.
    pub upstream_fetches: Counter,
    pub upstream_bytes: Counter,
    pub served_bytes: Counter,
    /// Content responses by [`ServedFrom`] (`gup_served_responses_total{source}`), made once.
    responses_from: [Counter; 3],
    /// Content bytes sent by [`ServedFrom`] (`gup_served_source_bytes_total{source}`).
    bytes_from: [Counter; 3],
    pub cache_hits: Counter,
    /// Content responses answered by the fast path (`serve::fast`), without the router:
    /// also counted in every other content metric, as the router's are.
    pub fast_responses: Counter,
    pub cache_misses: Counter,
    /// Bytes of blobs in the store.
    pub cache_bytes: Gauge,
    /// Open push connections.
    pub stream_clients: Gauge,
    /// 429s sent to named clients asking before their slot.
    pub slot_deferrals: Counter,
    /// Events (and applications) accepted by a node and not yet accepted upstream.
    pub events_queued: Gauge,
    /// Events (and applications) a node forwarded and its upstream accepted.
    pub events_forwarded: Counter,
    /// Heartbeats this server placed: from its own clients and relayed by nodes below it.
    pub heartbeats_received: Counter,
    /// Events (and applications) this server accepted: from its own clients and relayed.
    pub events_received: Counter,
    /// Per upstream server: 1 when its last call succeeded, 0 when it failed; absent until
    /// it is first called (see `upstream_state`).
    upstream_up: Family<Vec<(String, String)>, Gauge>,
    /// Per upstream server and state of [`UPSTREAM_STATES`]: 1 for the state it is in, 0
    /// for the others (so a server never called reads `not_tried`, not down).
    upstream_state: Family<Vec<(String, String)>, Gauge>,
    /// Bytes a node's outbox holds, per lane (`critical`, `normal`).
    outbox_bytes: Family<Vec<(String, String)>, Gauge>,
    /// `events.outbox_max_bytes`.
    pub outbox_max_bytes: Gauge,
    /// Uploads refused because the outbox was full.
    pub outbox_refused: Counter,
    /// Clients whose heartbeat waits to be relayed upstream.
    pub relay_pending: Gauge,
    /// Heartbeats not relayed: over `upstream.max_pending_heartbeats`, or refused upstream.
    pub relay_dropped: Counter,
    /// 1 while the store can write, 0 while it cannot (a full or failing disk).
    pub store_writable: Gauge,
    /// A node's prefetch slot of the current revision (Unix seconds, from its upstream), 0
    /// when it prefetches at once.
    pub prefetch_slot: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Time from a request's arrival to its response head, per route template (the route
    /// set is fixed, so the label's values are bounded; `unmatched` for the rest).
    request_duration: Durations,
    /// When a node last synced with an upstream (Unix ms; 0: never, and always on a manager).
    last_mirror_ms: std::sync::atomic::AtomicU64,
    /// Seconds since then, worked out from `last_mirror_ms` as `/metrics` is read; -1 before
    /// the first sync.
    mirror_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Requests and connections refused by a per-address limit, by reason.
    refused: Family<Vec<(String, String)>, Counter>,
    /// Conflicts stored by the manager (an event id re-sent with other content); it starts
    /// from the count stored, so it agrees with the records across restarts.
    pub event_conflicts: Counter,
    /// Events the manager deleted past `events.retain_days` or `events.max_count`.
    pub events_expired: Counter,
    /// Blobs the scrub found no longer matching their digest (quarantined).
    pub scrub_failures: Counter,
    /// Bytes the scrub read back and found matching.
    pub scrub_bytes: Counter,
    /// Deltas computed and stored (listed on the catalog by a manager, or at the edge).
    pub deltas_computed: Counter,
    /// Delta computations whose delta would have been larger than half the new version.
    pub deltas_unworthy: Counter,
    /// Seconds each delta computation took (its time waiting for a turn not counted).
    pub delta_seconds: Histogram,
    /// Delta computations waiting for a turn (`deltas.max_concurrent`).
    pub deltas_waiting: Gauge,
    /// Edge delta requests refused with 503 because `deltas.max_waiting` were waiting.
    pub deltas_busy: Counter,
    /// Deltas a manager listed on catalog items.
    pub deltas_listed: Counter,
    /// `GET /v1/delta` answers by [`DeltaAnswer`].
    delta_answers: [Counter; 3],
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let upstream_fetches = Counter::default();
        let upstream_bytes = Counter::default();
        let served_bytes = Counter::default();
        let cache_hits = Counter::default();
        let fast_responses = Counter::default();
        let cache_misses = Counter::default();
        let cache_bytes = Gauge::default();
        let stream_clients = Gauge::default();
        let slot_deferrals = Counter::default();
        let events_queued = Gauge::default();
        let events_forwarded = Counter::default();
        let heartbeats_received = Counter::default();
        registry.register(
            "gup_heartbeats_received",
            "Heartbeats placed: from this server's own clients and relayed by nodes below it",
            heartbeats_received.clone(),
        );
        let events_received = Counter::default();
        registry.register(
            "gup_events_received",
            "Events and applications accepted: from this server's own clients and relayed",
            events_received.clone(),
        );
        registry.register(
            "gup_events_queued",
            "Events accepted and not yet forwarded upstream",
            events_queued.clone(),
        );
        registry.register(
            "gup_events_forwarded",
            "Events forwarded upstream and accepted there",
            events_forwarded.clone(),
        );
        registry.register(
            "gup_slot_deferrals",
            "429s sent to clients asking before their download slot",
            slot_deferrals.clone(),
        );
        let outbox_bytes = Family::<Vec<(String, String)>, Gauge>::default();
        registry.register(
            "gup_outbox_bytes",
            "Bytes of uploads a node holds for its upstream, per lane",
            outbox_bytes.clone(),
        );
        let outbox_max_bytes = Gauge::default();
        registry.register(
            "gup_outbox_max_bytes",
            "The outbox bound (events.outbox_max_bytes)",
            outbox_max_bytes.clone(),
        );
        let outbox_refused = Counter::default();
        registry.register(
            "gup_outbox_refused",
            "Uploads refused because the outbox was full",
            outbox_refused.clone(),
        );
        let relay_pending = Gauge::default();
        registry.register(
            "gup_relay_pending",
            "Clients whose heartbeat waits to be relayed upstream",
            relay_pending.clone(),
        );
        let relay_dropped = Counter::default();
        registry.register(
            "gup_relay_dropped",
            "Heartbeats not relayed: over the pending bound, or refused upstream",
            relay_dropped.clone(),
        );
        let prefetch_slot = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "gup_prefetch_slot_timestamp_seconds",
            "When this node prefetches the current revision's non-urgent items (Unix seconds; 0: at once)",
            prefetch_slot.clone(),
        );
        let store_writable = Gauge::default();
        store_writable.set(1);
        registry.register(
            "gup_store_writable",
            "1 while the store can write, 0 while it cannot",
            store_writable.clone(),
        );
        let refused = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "gup_refused",
            "Requests and connections refused by a per-address limit, by reason",
            refused.clone(),
        );
        let event_conflicts = Counter::default();
        registry.register(
            "gup_event_conflicts",
            "Events stored as conflicts: an id re-sent with other content",
            event_conflicts.clone(),
        );
        let events_expired = Counter::default();
        registry.register(
            "gup_events_expired",
            "Events the manager deleted past events.retain_days or events.max_count",
            events_expired.clone(),
        );
        let scrub_failures = Counter::default();
        registry.register(
            "gup_scrub_failures",
            "Stored blobs the scrub found no longer matching their digest (quarantined)",
            scrub_failures.clone(),
        );
        let scrub_bytes = Counter::default();
        registry.register(
            "gup_scrub_bytes",
            "Bytes the scrub read back and found matching",
            scrub_bytes.clone(),
        );
        let deltas_computed = Counter::default();
        registry.register(
            "gup_deltas_computed",
            "Deltas computed and stored (listed on the catalog, or at the edge)",
            deltas_computed.clone(),
        );
        let deltas_unworthy = Counter::default();
        registry.register(
            "gup_deltas_unworthy",
            "Delta computations whose delta would have been larger than half the new version",
            deltas_unworthy.clone(),
        );
        let delta_seconds = delta_histogram();
        registry.register(
            "gup_delta_seconds",
            "Seconds each delta computation took",
            delta_seconds.clone(),
        );
        let deltas_waiting = Gauge::default();
        registry.register(
            "gup_deltas_waiting",
            "Delta computations waiting for a turn (deltas.max_concurrent)",
            deltas_waiting.clone(),
        );
        let deltas_busy = Counter::default();
        registry.register(
            "gup_deltas_busy",
            "Edge delta requests refused with 503: deltas.max_waiting were waiting",
            deltas_busy.clone(),
        );
        let deltas_listed = Counter::default();
        registry.register(
            "gup_deltas_listed",
            "Deltas the manager listed on catalog items",
            deltas_listed.clone(),
        );
        let answers = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "gup_delta_answers",
            "GET /v1/delta answers: with a listed delta, an edge delta, or none (404)",
            answers.clone(),
        );
        let delta_answers = DeltaAnswer::ALL.map(|a| {
            answers
                .get_or_create(&vec![("answer".to_string(), a.as_str().to_string())])
                .clone()
        });
        let upstream_up = Family::<Vec<(String, String)>, Gauge>::default();
        registry.register(
            "gup_upstream_up",
            "Per upstream server: 1 if its last call succeeded, else 0",
            upstream_up.clone(),
        );
        let upstream_state = Family::<Vec<(String, String)>, Gauge>::default();
        registry.register(
            "gup_upstream_state",
            "Per upstream server: 1 for the state it is in (not_tried, up, down, held), 0 for the others",
            upstream_state.clone(),
        );
        let source = |s: ServedFrom| vec![("source".to_string(), s.as_str().to_string())];
        let responses = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "gup_served_responses",
            "Content responses by where their bytes come from (memory, disk, arriving)",
            responses.clone(),
        );
        let responses_from = ServedFrom::ALL.map(|s| responses.get_or_create(&source(s)).clone());
        let bytes = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "gup_served_source_bytes",
            "Content bytes sent by where they come from (memory, disk, arriving)",
            bytes.clone(),
        );
        let bytes_from = ServedFrom::ALL.map(|s| bytes.get_or_create(&source(s)).clone());
        let request_duration = Durations::new_with_constructor(duration_histogram);
        registry.register(
            "gup_request_duration_seconds",
            "Time from a request's arrival to its response head, per route",
            request_duration.clone(),
        );
        let mirror_age = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        mirror_age.set(-1.0);
        registry.register(
            "gup_mirror_age_seconds",
            "Seconds since this node last synced with an upstream (-1: never; a manager: always -1)",
            mirror_age.clone(),
        );
        // prometheus-client appends `_total` to counters itself.
        registry.register(
            "gup_upstream_fetches",
            "Blob fetches started upstream",
            upstream_fetches.clone(),
        );
        registry.register(
            "gup_upstream_bytes",
            "Bytes received from upstream",
            upstream_bytes.clone(),
        );
        registry.register(
            "gup_served_bytes",
            "Content bytes sent to clients",
            served_bytes.clone(),
        );
        registry.register(
            "gup_cache_hits",
            "Content requests answered from the store",
            cache_hits.clone(),
        );
        registry.register(
            "gup_fast_responses",
            "Content responses of hot blobs answered without the router (also in the other content metrics)",
            fast_responses.clone(),
        );
        registry.register(
            "gup_cache_misses",
            "Content requests that needed an upstream fetch",
            cache_misses.clone(),
        );
        registry.register(
            "gup_cache_bytes",
            "Bytes of blobs in the store",
            cache_bytes.clone(),
        );
        // The same gauge under the name the manager's operators look for (issue 20); the
        // older name stays for the dashboards that read it.
        registry.register(
            "gup_store_bytes",
            "Bytes of blobs in the store",
            cache_bytes.clone(),
        );
        registry.register(
            "gup_stream_clients",
            "Open push (server-sent events) connections",
            stream_clients.clone(),
        );
        Metrics {
            registry,
            outbox_bytes,
            outbox_max_bytes,
            outbox_refused,
            relay_pending,
            relay_dropped,
            store_writable,
            prefetch_slot,
            refused,
            event_conflicts,
            events_expired,
            scrub_failures,
            scrub_bytes,
            deltas_computed,
            deltas_unworthy,
            delta_seconds,
            deltas_waiting,
            deltas_busy,
            deltas_listed,
            delta_answers,
            stream_clients,
            slot_deferrals,
            events_queued,
            events_forwarded,
            heartbeats_received,
            events_received,
            upstream_up,
            upstream_state,
            request_duration,
            last_mirror_ms: std::sync::atomic::AtomicU64::new(0),
            mirror_age,
            upstream_fetches,
            upstream_bytes,
            served_bytes,
            responses_from,
            bytes_from,
            cache_hits,
            fast_responses,
            cache_misses,
            cache_bytes,
        }
    }

    /// The `gup_upstream_up` gauge of one server.
    pub fn upstream_up(&self, server: &str) -> Gauge {
        self.upstream_up
            .get_or_create(&vec![("server".to_string(), server.to_string())])
            .clone()
    }

    /// Puts server `server` in `state` (one of [`UPSTREAM_STATES`]) in `gup_upstream_state`.
    pub fn upstream_state(&self, server: &str, state: &str) {
        for s in UPSTREAM_STATES {
            let labels = vec![
                ("server".to_string(), server.to_string()),
                ("state".to_string(), s.to_string()),
            ];
            self.upstream_state
                .get_or_create(&labels)
                .set(i64::from(s == state));
        }
    }

    /// Drops a server a reload took off the upstream list from `gup_upstream_up` and
    /// `gup_upstream_state`, so the metrics show only the list in force.
    pub fn forget_upstream(&self, server: &str) {
        self.upstream_up
            .remove(&vec![("server".to_string(), server.to_string())]);
        for s in UPSTREAM_STATES {
            self.upstream_state.remove(&vec![
                ("server".to_string(), server.to_string()),
                ("state".to_string(), s.to_string()),
            ]);
        }
    }

    /// Records one request to `route` (a route template) that took `seconds` to its head.
    pub fn request_took(&self, route: &str, seconds: f64) {
        self.request_duration
            .get_or_create(&vec![("route".to_string(), route.to_string())])
            .observe(seconds);
    }

    /// The histogram [`Metrics::request_took`] records `route` in, for a caller that records
    /// many requests of one route (one label lookup instead of one per request).
    pub fn route_duration(&self, route: &str) -> Histogram {
        self.request_duration
            .get_or_create(&vec![("route".to_string(), route.to_string())])
            .clone()
    }

    /// Counts a content response served from `from`; the counters its body's bytes go to.
    pub fn served(&self, from: ServedFrom) -> ServedBytes {
        self.responses_from[from as usize].inc();
        ServedBytes {
            total: self.served_bytes.clone(),
            source: self.bytes_from[from as usize].clone(),
        }
    }

    /// Counts one `GET /v1/delta` answer.
    pub fn delta_answered(&self, answer: DeltaAnswer) {
        self.delta_answers[answer as usize].inc();
    }

    /// The `gup_outbox_bytes` gauge of one lane.
    pub fn outbox_bytes(&self, lane: &str) -> Gauge {
        self.outbox_bytes
            .get_or_create(&vec![("lane".to_string(), lane.to_string())])
            .clone()
    }

    /// The `gup_refused_total` counter of one reason.
    pub fn refused(&self, reason: &str) -> Counter {
        self.refused
            .get_or_create(&vec![("reason".to_string(), reason.to_string())])
            .clone()
    }

    /// A node synced with an upstream at `at` (a 304 counts: the mirror is current).
    pub fn mirrored(&self, at: chrono::DateTime<chrono::Utc>) {
        let ms = u64::try_from(at.timestamp_millis()).unwrap_or(0);
        self.last_mirror_ms
            .store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Seconds since the last sync with an upstream at `now`; None before the first.
    pub fn mirror_age(&self, now: chrono::DateTime<chrono::Utc>) -> Option<f64> {
        let last = self
            .last_mirror_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        let now = u64::try_from(now.timestamp_millis()).unwrap_or(0);
        (last > 0).then(|| now.saturating_sub(last) as f64 / 1000.0)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.mirror_age
            .set(self.mirror_age(chrono::Utc::now()).unwrap_or(-1.0));
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
