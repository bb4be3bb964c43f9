//! The node's status page (`GET /`) as plain data, and its HTML.
//!
//! Owns what the page shows and in which order: the upstreams and their state, the mirror's
//! freshness, each catalog item with its cached state, cache use against the budget, WAN
//! against LAN bytes over the last hour, the download starts of the current revision over
//! its window, and the clients heard from in the last heartbeat interval. It must never show
//! a secret (no token or credential is in a [`NodeView`]) and never read a node's state: the
//! node gathers a view (`node::status_page`), this renders it.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};

use super::history::Point;
use super::svg::{self, Axes, Bar, Series};
use super::{bytes, cell, cell_class, escape, escape_into, frame, num, table, time};
use crate::core::starts::StartCount;

/// Bars of the download-start histogram at most: cells are summed into this many.
pub const HISTOGRAM_BARS: usize = 60;

/// How a node's upstream is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamState {
    /// Never called yet (a lower-priority upstream while a higher one answers).
    NotTried,
    Up,
    Down,
}

/// One upstream in priority order.
#[derive(Debug, Clone)]
pub struct UpstreamRow {
    pub url: String,
    pub state: UpstreamState,
}

/// One item of the mirrored catalog and whether its blob is here.
#[derive(Debug, Clone)]
pub struct ItemRow {
    pub name: String,
    pub version: String,
    pub sha256: String,
    pub size: u64,
    pub urgent: bool,
    pub cached: bool,
}

/// Everything the node page shows.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub node_id: String,
    pub version: String,
    pub now: DateTime<Utc>,
    pub upstreams: Vec<UpstreamRow>,
    /// The outbound proxy the upstream calls go through, credentials redacted (None: direct).
    pub proxy: Option<String>,
    /// Synced at least once (or restored from an earlier run).
    pub ready: bool,
    pub stale_since: Option<DateTime<Utc>>,
    pub revision: u64,
    /// When the current revision became available here.
    pub revision_at: Option<DateTime<Utc>>,
    pub items: Vec<ItemRow>,
    pub cache_bytes: u64,
    /// `cache.max_bytes`.
    pub cache_budget: u64,
    pub blobs: usize,
    /// Bytes per second fetched upstream (WAN) and served to clients (LAN), a point a minute.
    pub wan: Vec<Point>,
    pub lan: Vec<Point>,
    /// Download starts of the current revision (None before its first).
    pub starts: Option<StartCount>,
    /// The `default` group's heartbeat interval.
    pub heartbeat_interval_s: u64,
    /// Heartbeats received over about the last heartbeat interval (each client sends one an
    /// interval, so this reads as clients).
    pub recent_heartbeats: u64,
    /// Open push connections.
    pub stream_clients: i64,
}

/// `x` minutes ago, for the hour plots' axis.
pub const HOUR_TICKS: [(f64, &str); 5] = [
    (-60.0, "-60 min"),
    (-45.0, "-45"),
    (-30.0, "-30"),
    (-15.0, "-15"),
    (0.0, "now"),
];

fn per_second(v: f64) -> String {
    format!("{}/s", bytes(v.round() as u64))
}

fn count(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v}")
    } else {
        format!("{v:.1}")
    }
}

/// A duration in s, min or h.
pub fn duration(s: u64) -> String {
    match s {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s => format!("{:.1} h", s as f64 / 3600.0),
    }
}

/// The node page, whole.
pub fn render(v: &NodeView) -> String {
    let mut out = String::with_capacity(16 * 1024 + v.items.len() * 256);
    out.push_str("<h1>gup node ");
    escape_into(&mut out, &v.node_id);
    let _ = writeln!(
        out,
        "</h1><p class=\"meta\">gup {} &middot; {} &middot; refreshed every {} s</p>",
        escape(&v.version),
        time(v.now),
        super::REFRESH_S
    );

    out.push_str("<h2>Upstream</h2>\n");
    let mirror = match (v.ready, v.stale_since) {
        (false, _) => ("bad", "not synced yet".to_string()),
        (true, Some(t)) => ("bad", format!("stale since {}", time(t))),
        (true, None) => ("ok", "fresh".to_string()),
    };
    let _ = write!(
        out,
        "<p id=\"mirror\">Mirror: <span class=\"{}\">",
        mirror.0
    );
    escape_into(&mut out, &mirror.1);
    out.push_str("</span></p>\n");
    if let Some(proxy) = &v.proxy {
        out.push_str("<p id=\"proxy\">Through proxy: ");
        escape_into(&mut out, proxy);
        out.push_str("</p>\n");
    }
    let rows: Vec<Vec<String>> = v
        .upstreams
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let (class, state) = match u.state {
                UpstreamState::Up => ("ok", "up"),
                UpstreamState::Down => ("bad", "down"),
                UpstreamState::NotTried => ("dim", "not tried yet"),
            };
            vec![num(i + 1), cell(&u.url), cell_class(class, state)]
        })
        .collect();
    table(
        &mut out,
        "upstreams",
        &["priority", "server", "state"],
        &rows,
        "no upstream configured",
    );

    let _ = write!(out, "<h2>Catalog revision {}</h2>\n<p>", v.revision);
    if let Some(t) = v.revision_at {
        let _ = write!(out, "available here since {}; ", time(t));
    }
    let cached = v.items.iter().filter(|i| i.cached).count();
    let _ = writeln!(out, "{cached} of {} items in the store.</p>", v.items.len());
    let rows: Vec<Vec<String>> = v
        .items
        .iter()
        .map(|i| {
            vec![
                cell(&i.name),
                cell(&i.version),
                format!(
                    "<td class=\"dim\" title=\"{}\">{}</td>",
                    escape(&i.sha256),
                    escape(i.sha256.get(..12).unwrap_or(&i.sha256))
                ),
                num(bytes(i.size)),
                cell(if i.urgent { "urgent" } else { "" }),
                if i.cached {
                    cell_class("ok", "in store")
                } else {
                    cell_class("dim", "not in store")
                },
            ]
        })
        .collect();
    table(
        &mut out,
        "catalog",
        &["name", "version", "sha256", "size", "", "cached"],
        &rows,
        "the catalog is empty",
    );

    out.push_str("<h2>Cache</h2>\n");
    let share = if v.cache_budget > 0 {
        format!(
            " ({:.1}%)",
            v.cache_bytes as f64 * 100.0 / v.cache_budget as f64
        )
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        "<p id=\"cache\">{} of {}{share} in {} blobs</p>",
        bytes(v.cache_bytes),
        if v.cache_budget > 0 {
            bytes(v.cache_budget)
        } else {
            "no budget".to_string()
        },
        v.blobs
    );
    let _ = writeln!(
        out,
        "<meter min=\"0\" max=\"{}\" value=\"{}\"></meter>",
        v.cache_budget.max(1),
        v.cache_bytes.min(v.cache_budget.max(1))
    );

    out.push_str("<h2>Clients</h2>\n");
    let _ = writeln!(
        out,
        "<p id=\"clients\">{} heartbeats in the last {} (one a client an interval); {} push connections open</p>",
        v.recent_heartbeats,
        duration(v.heartbeat_interval_s),
        v.stream_clients
    );

    out.push_str("<h2>Traffic</h2>\n");
    let axes = Axes {
        x_range: (-60.0, 0.0),
        x_ticks: &HOUR_TICKS,
        y_format: per_second,
    };
    svg::line_plot(
        &mut out,
        "traffic",
        "WAN (from upstream) and LAN (to clients), bytes per second",
        &axes,
        &[
            Series {
                name: "WAN",
                color: "#c0392b",
                points: &v.wan,
            },
            Series {
                name: "LAN",
                color: "#2471a3",
                points: &v.lan,
            },
        ],
    );

    let _ = writeln!(out, "<h2>Download starts of revision {}</h2>", v.revision);
    match &v.starts {
        None => out.push_str(
            "<p id=\"starts\" class=\"dim\">no download of this revision started here yet</p>\n",
        ),
        Some(s) => starts_histogram(&mut out, s),
    }
    frame(&format!("gup node {}", v.node_id), true, &out)
}

/// The download starts binned into at most [`HISTOGRAM_BARS`] bars over the window.
fn starts_histogram(out: &mut String, s: &StartCount) {
    let per_bar = s.cells.len().div_ceil(HISTOGRAM_BARS).max(1);
    let bar_s = (per_bar as u64 * s.cell_s) as f64;
    let bars: Vec<Bar> = s
        .cells
        .chunks(per_bar)
        .enumerate()
        .map(|(i, c)| Bar {
            x0: i as f64 * bar_s,
            x1: ((i + 1) as f64 * bar_s).min(s.window_s as f64),
            value: c.iter().map(|n| *n as f64).sum(),
        })
        .collect();
    let w = s.window_s;
    let labels = [duration(0), duration(w / 2), duration(w)];
    let ticks = [
        (0.0, labels[0].as_str()),
        ((w / 2) as f64, labels[1].as_str()),
        (w as f64, labels[2].as_str()),
    ];
    let axes = Axes {
        x_range: (0.0, w as f64),
        x_ticks: &ticks,
        y_format: count,
    };
    let title = format!(
        "starts per {} over the {} window",
        duration(bar_s as u64),
        duration(w)
    );
    svg::bar_plot(out, "starts", &title, &axes, &bars, "#7d3c98");
    let _ = writeln!(
        out,
        "<p>{} starts since {}; {} after the window.</p>",
        s.total(),
        time(s.available_at),
        s.after
    );
}
