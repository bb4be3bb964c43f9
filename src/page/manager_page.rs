//! The manager's status page (`GET /admin`) and its login form, as plain data and HTML.
//!
//! Owns what the page shows: the nodes with their health ([`nodes_table`]), the group tree with client and overdue counts, recent
//! notifications, the retained catalog revisions and the current items, and heartbeats and
//! events per second over the last hour. It must never show a token (the login form posts
//! one and is never filled back) and never read the manager's state or check a credential:
//! `manager::status_page` does both and hands a [`ManagerView`] here.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};

use super::history::Point;
use super::node_page::HOUR_TICKS;
use super::svg::{self, Axes, Series};
use super::{bytes, cell, cell_class, escape, escape_into, frame, num, table, time};

/// One group in tree order, `depth` below `default`.
#[derive(Debug, Clone)]
pub struct GroupRow {
    pub name: String,
    pub depth: usize,
    pub clients: u64,
    pub overdue: u64,
}

/// One admin notification.
#[derive(Debug, Clone)]
pub struct NoticeRow {
    pub group: String,
    pub kind: String,
    pub first_at: DateTime<Utc>,
    pub last_at: DateTime<Utc>,
    pub count: u64,
    pub client_id: String,
    /// When an admin acknowledged it; None while open.
    pub acked_at: Option<DateTime<Utc>>,
}

/// One retained catalog revision.
#[derive(Debug, Clone)]
pub struct RevisionRow {
    pub revision: u64,
    pub available_at: DateTime<Utc>,
    pub items: usize,
    pub bytes: u64,
}

/// One item of the current catalog.
#[derive(Debug, Clone)]
pub struct CatalogRow {
    pub name: String,
    pub version: String,
    pub size: u64,
    pub urgent: bool,
    pub published_at: DateTime<Utc>,
}

/// One node as the manager last heard of it.
#[derive(Debug, Clone)]
pub struct NodeRow {
    pub id: String,
    pub name: String,
    pub url: String,
    pub revision: u64,
    pub revisions_behind: u64,
    /// The node it reports through, None when directly.
    pub via: Option<String>,
    pub overdue: bool,
    /// No upstream has answered the node since then.
    pub stale_since: Option<DateTime<Utc>>,
    /// Clients whose heartbeats it relayed in its last round.
    pub clients: u64,
    pub events_queued: u64,
    pub last_report: DateTime<Utc>,
}

/// Everything the manager page shows.
#[derive(Debug, Clone)]
pub struct ManagerView {
    pub version: String,
    pub now: DateTime<Utc>,
    /// Every node that reported, in id order.
    pub nodes: Vec<NodeRow>,
    pub groups: Vec<GroupRow>,
    /// When the client counts were taken (None: not counted yet), and whether the count
    /// stopped at its bound before the end of the registry.
    pub counted_at: Option<DateTime<Utc>>,
    pub counts_partial: bool,
    pub notices: Vec<NoticeRow>,
    pub revisions: Vec<RevisionRow>,
    pub catalog: Vec<CatalogRow>,
    pub heartbeats: Vec<Point>,
    pub events: Vec<Point>,
    /// Whether this view came with a session cookie (a logout button makes sense).
    pub session: bool,
}

fn rate(v: f64) -> String {
    if v >= 10.0 || v == 0.0 {
        format!("{v:.0}/s")
    } else {
        format!("{v:.2}/s")
    }
}

/// The table of nodes with their health; `rows` plain, in the order to show.
pub fn nodes_table(out: &mut String, rows: &[NodeRow]) {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|n| {
            vec![
                cell(&n.name),
                cell_class("dim", &n.id),
                cell(&n.url),
                cell(n.via.as_deref().unwrap_or("direct")),
                num(n.revision),
                if n.revisions_behind == 0 {
                    cell_class("ok", "current")
                } else {
                    cell_class("bad", &format!("{} behind", n.revisions_behind))
                },
                match (n.overdue, n.stale_since) {
                    (true, _) => cell_class("bad", "overdue"),
                    (false, Some(since)) => {
                        cell_class("bad", &format!("stale since {}", time(since)))
                    }
                    (false, None) => cell_class("ok", "reporting"),
                },
                num(n.clients),
                num(n.events_queued),
                cell(&time(n.last_report)),
            ]
        })
        .collect();
    table(
        out,
        "nodes",
        &[
            "name",
            "id",
            "url",
            "via",
            "revision",
            "catalog",
            "health",
            "clients",
            "events queued",
            "last report",
        ],
        &rows,
        "no node has reported yet",
    );
}

/// The manager page, whole.
pub fn render(v: &ManagerView) -> String {
    let mut out = String::with_capacity(32 * 1024 + v.groups.len() * 128);
    out.push_str("<h1>gup manager</h1>");
    let _ = write!(
        out,
        "<p class=\"meta\">gup {} &middot; {} &middot; refreshed every {} s",
        escape(&v.version),
        time(v.now),
        super::REFRESH_S
    );
    if v.session {
        out.push_str(
            " &middot; <form class=\"inline\" method=\"post\" action=\"/admin/logout\">\
             <button type=\"submit\" id=\"logout\">Log out</button></form>",
        );
    }
    out.push_str("</p>\n<h2>Nodes</h2>\n");
    nodes_table(&mut out, &v.nodes);

    out.push_str("<h2>Activity</h2>\n");
    let axes = Axes {
        x_range: (-60.0, 0.0),
        x_ticks: &HOUR_TICKS,
        y_format: rate,
    };
    svg::line_plot(
        &mut out,
        "heartbeats",
        "Heartbeats per second",
        &axes,
        &[Series {
            name: "heartbeats",
            color: "#2471a3",
            points: &v.heartbeats,
        }],
    );
    svg::line_plot(
        &mut out,
        "events",
        "Events per second",
        &axes,
        &[Series {
            name: "events",
            color: "#c0392b",
            points: &v.events,
        }],
    );

    out.push_str("<h2>Groups</h2>\n<p class=\"dim\">");
    match v.counted_at {
        Some(t) => {
            let _ = write!(out, "clients counted at {}", time(t));
            if v.counts_partial {
                out.push_str(" (the count stopped at its bound: figures are low)");
            }
        }
        None => out.push_str("clients not counted yet"),
    }
    out.push_str("</p>\n");
    let rows: Vec<Vec<String>> = v
        .groups
        .iter()
        .map(|g| {
            let mut name = String::from("<td>");
            for _ in 0..g.depth {
                name.push_str("&nbsp;&nbsp;&nbsp;&nbsp;");
            }
            escape_into(&mut name, &g.name);
            name.push_str("</td>");
            let overdue = if g.overdue > 0 {
                format!("<td class=\"n bad\">{}</td>", g.overdue)
            } else {
                num(0)
            };
            vec![name, num(g.clients), overdue]
        })
        .collect();
    table(
        &mut out,
        "groups",
        &["group", "clients", "overdue"],
        &rows,
        "no group",
    );

    out.push_str("<h2>Recent notifications</h2>\n");
    let rows: Vec<Vec<String>> = v
        .notices
        .iter()
        .map(|n| {
            vec![
                cell(&time(n.first_at)),
                cell(&n.group),
                cell_class("bad", &n.kind),
                num(n.count),
                cell(&time(n.last_at)),
                cell(&n.client_id),
                match n.acked_at {
                    Some(at) => cell(&time(at)),
                    None => cell_class("bad", "open"),
                },
            ]
        })
        .collect();
    table(
        &mut out,
        "notifications",
        &[
            "first",
            "group",
            "kind",
            "count",
            "last",
            "first client",
            "acknowledged",
        ],
        &rows,
        "no notification",
    );

    out.push_str("<h2>Catalog</h2>\n");
    let rows: Vec<Vec<String>> = v
        .revisions
        .iter()
        .rev()
        .map(|r| {
            vec![
                num(r.revision),
                cell(&time(r.available_at)),
                num(r.items),
                num(bytes(r.bytes)),
            ]
        })
        .collect();
    table(
        &mut out,
        "revisions",
        &["revision", "published", "items", "size"],
        &rows,
        "nothing published yet",
    );
    let rows: Vec<Vec<String>> = v
        .catalog
        .iter()
        .map(|i| {
            vec![
                cell(&i.name),
                cell(&i.version),
                num(bytes(i.size)),
                cell(if i.urgent { "urgent" } else { "" }),
                cell(&time(i.published_at)),
            ]
        })
        .collect();
    table(
        &mut out,
        "catalog",
        &["name", "version", "size", "", "published"],
        &rows,
        "the current catalog is empty",
    );
    frame("gup manager", true, &out)
}

/// The login form; `problem` (escaped) says why the last try failed. It never refreshes
/// itself (a half-typed token must not vanish).
pub fn login(problem: Option<&str>) -> String {
    let mut out = String::from("<h1>gup manager</h1>\n");
    if let Some(p) = problem {
        out.push_str("<p id=\"problem\" class=\"bad\">");
        escape_into(&mut out, p);
        out.push_str("</p>\n");
    }
    out.push_str(
        "<form id=\"login\" method=\"post\" action=\"/admin/login\">\
         <label>Admin token <input type=\"password\" name=\"token\" id=\"token\" autocomplete=\"current-password\" required></label> \
         <button type=\"submit\" id=\"submit\">Log in</button></form>\n\
         <p class=\"dim\">Or send <code>Authorization: Bearer &lt;admin token&gt;</code>.</p>",
    );
    frame("gup manager: log in", false, &out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> ManagerView {
        ManagerView {
            version: "0.1.0".into(),
            now: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            nodes: vec![],
            groups: vec![
                GroupRow {
                    name: "default".into(),
                    depth: 0,
                    clients: 2,
                    overdue: 0,
                },
                GroupRow {
                    name: "<lab>".into(),
                    depth: 1,
                    clients: 1,
                    overdue: 1,
                },
            ],
            counted_at: None,
            counts_partial: false,
            notices: vec![],
            revisions: vec![],
            catalog: vec![],
            heartbeats: vec![(-1.0, 2.0), (0.0, 3.0)],
            events: vec![(0.0, 0.5)],
            session: true,
        }
    }

    #[test]
    fn the_page_escapes_group_names_and_plots_each_point() {
        let html = render(&view());
        assert!(html.contains("&lt;lab&gt;") && !html.contains("<lab>"));
        assert_eq!(html.matches("<circle class=\"point\"").count(), 3);
        assert!(html.contains("id=\"logout\""));
        assert!(html.contains("no node has reported yet"));
        let mut v = view();
        v.nodes = vec![NodeRow {
            id: "node-1".into(),
            name: "branch <1>".into(),
            url: "http://10.0.0.1".into(),
            revision: 3,
            revisions_behind: 1,
            via: None,
            overdue: true,
            stale_since: None,
            clients: 12,
            events_queued: 0,
            last_report: v.now,
        }];
        let html = render(&v);
        assert!(html.contains("branch &lt;1&gt;") && html.contains("1 behind"));
        assert!(html.contains("overdue") && html.contains("direct"));
    }

    #[test]
    fn each_notification_says_whether_it_is_open_or_when_it_was_acknowledged() {
        let mut v = view();
        let row = |acked_at| NoticeRow {
            group: "lab".into(),
            kind: "intrusion".into(),
            first_at: v.now,
            last_at: v.now,
            count: 2,
            client_id: "pc-1".into(),
            acked_at,
        };
        v.notices = vec![row(None), row(Some(v.now))];
        let html = render(&v);
        assert!(html.contains("<th>acknowledged</th>"), "{html}");
        assert_eq!(html.matches("<td class=\"bad\">open</td>").count(), 1);
        assert!(html.contains(&format!("<td>{}</td>", time(v.now))));
    }

    #[test]
    fn the_login_form_never_refreshes_and_escapes_its_problem() {
        let html = login(Some("bad <token>"));
        assert!(html.contains("bad &lt;token&gt;"));
        assert!(!html.contains("http-equiv"));
        assert!(html.contains("action=\"/admin/login\""));
    }
}
