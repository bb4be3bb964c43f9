//! Prometheus metrics of one server (manager or node), rendered at `GET /metrics`.
//!
//! Owns the metric names of the contract and their registry. It must never hold logic: modules
//! increment what they did, this file only counts and renders.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The counters and gauges of one server.
pub struct Metrics {
    registry: Registry,
    /// Blob fetches started upstream.
    pub upstream_fetches: Counter,
    pub upstream_bytes: Counter,
    pub served_bytes: Counter,
    pub cache_hits: Counter,
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
    /// Per upstream server: 1 when its last call succeeded, 0 when it failed.
    upstream_up: Family<Vec<(String, String)>, Gauge>,
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
    /// Requests and connections refused by a per-address limit, by reason.
    refused: Family<Vec<(String, String)>, Counter>,
    /// Conflicts stored by the manager (an event id re-sent with other content); it starts
    /// from the count stored, so it agrees with the records across restarts.
    pub event_conflicts: Counter,
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
        let upstream_up = Family::<Vec<(String, String)>, Gauge>::default();
        registry.register(
            "gup_upstream_up",
            "Per upstream server: 1 if its last call succeeded, else 0",
            upstream_up.clone(),
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
            "gup_cache_misses",
            "Content requests that needed an upstream fetch",
            cache_misses.clone(),
        );
        registry.register(
            "gup_cache_bytes",
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
            stream_clients,
            slot_deferrals,
            events_queued,
            events_forwarded,
            heartbeats_received,
            events_received,
            upstream_up,
            upstream_fetches,
            upstream_bytes,
            served_bytes,
            cache_hits,
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

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
