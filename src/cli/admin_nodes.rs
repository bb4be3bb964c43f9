//! `gup admin nodes`: the manager's node list (`GET /v1/admin/nodes`) as a table or JSON.
//!
//! Owns how a node's last report is shown: its id and name, the node it reports through,
//! the revisions it is behind, its staleness, cache use, queued events, clients and whether
//! it is overdue. It must never call anything but the manager's admin API.

use reqwest::Method;

use super::admin_print::{show_list, text};
use super::{runtime, Failure};
use crate::admin::AdminClient;

/// Bytes as a short human figure (KiB, MiB, GiB).
fn bytes(v: &serde_json::Value) -> String {
    let Some(n) = v.as_u64() else {
        return text(v);
    };
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut x = n as f64;
    let mut unit = 0;
    while x >= 1024.0 && unit < UNITS.len() - 1 {
        x /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{x:.1} {}", UNITS[unit])
    }
}

/// Prints the node list.
pub(super) fn run(
    client: &AdminClient,
    rt: &tokio::runtime::Runtime,
    json: bool,
) -> Result<(), Failure> {
    let v = rt
        .block_on(client.call(Method::GET, "/v1/admin/nodes", &[], None))
        .map_err(runtime)?;
    show_list(
        &v,
        json,
        "nodes",
        &[
            "NODE",
            "NAME",
            "VIA",
            "REVISION",
            "BEHIND",
            "STALE SINCE",
            "CACHE",
            "EVENTS",
            "CLIENTS",
            "LAST REPORT",
            "OVERDUE",
        ],
        |n| {
            vec![
                text(&n["node_id"]),
                text(&n["name"]),
                text(&n["via"]),
                text(&n["catalog_revision"]),
                text(&n["revisions_behind"]),
                text(&n["stale_since"]),
                format!(
                    "{} / {}",
                    bytes(&n["cache_bytes"]),
                    bytes(&n["cache_budget_bytes"])
                ),
                text(&n["events_queued"]),
                text(&n["clients_last_interval"]),
                text(&n["received_at"]),
                if n["overdue"] == true { "yes" } else { "no" }.into(),
            ]
        },
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_figures_read_as_units() {
        assert_eq!(bytes(&serde_json::json!(512)), "512 B");
        assert_eq!(bytes(&serde_json::json!(1536)), "1.5 KiB");
        assert_eq!(bytes(&serde_json::json!(3u64 << 30)), "3.0 GiB");
        assert_eq!(bytes(&serde_json::Value::Null), "-");
    }
}
