//! How `gup admin` shows the admin API's answers: pretty JSON, aligned tables, cells from
//! JSON values, the cursor of a next page, settings with where each key is set.
//!
//! It owns only formatting of values it is given; it must never call the admin API or decide
//! what a command asks for.

/// Under a table, the cursor of the next page when there is one: "more: --after N". A page
/// may be short (the manager's scan bound) while this still shows.
pub(super) fn print_more(v: &serde_json::Value, json: bool) {
    if !json && !v["next"].is_null() {
        outln!("more: --after {}", text(&v["next"]));
    }
}

pub(super) fn print_json(v: &serde_json::Value) {
    outln!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// A JSON value as a table cell: strings bare, null as "-".
pub(super) fn text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Prints `v` as JSON, or its array `key` as a table.
pub(super) fn show_list(
    v: &serde_json::Value,
    json: bool,
    key: &str,
    headers: &[&str],
    row: impl Fn(&serde_json::Value) -> Vec<String>,
) {
    if json {
        print_json(v);
    } else {
        print_table(headers, &table_rows(&v[key], row));
    }
}

/// One table row per element of a JSON array (none when it is not an array).
pub(super) fn table_rows(
    list: &serde_json::Value,
    row: impl Fn(&serde_json::Value) -> Vec<String>,
) -> Vec<Vec<String>> {
    list.as_array()
        .map(|items| items.iter().map(row).collect())
        .unwrap_or_default()
}

pub(super) fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        outln!("{}", parts.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

/// Effective settings as KEY / VALUE / WHERE rows ("own" when the group or location sets it).
pub(super) fn print_settings(
    effective: &serde_json::Value,
    own: &serde_json::Value,
    location: &serde_json::Value,
) {
    fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, serde_json::Value)>) {
        match v {
            serde_json::Value::Object(m) if prefix.is_empty() || !m.contains_key("url") => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&key, v, out);
                }
            }
            other => out.push((prefix.to_string(), other.clone())),
        }
    }
    let mut eff = Vec::new();
    flatten("", effective, &mut eff);
    let mut own_keys = Vec::new();
    flatten("", own, &mut own_keys);
    let mut loc_keys = Vec::new();
    flatten("", location, &mut loc_keys);
    let rows: Vec<Vec<String>> = eff
        .into_iter()
        .map(|(k, v)| {
            let source = if loc_keys.iter().any(|(lk, _)| *lk == k) {
                "location"
            } else if own_keys.iter().any(|(ok, _)| *ok == k) {
                "group"
            } else if k == "serial" {
                ""
            } else {
                "inherited"
            };
            vec![k, text(&v), source.to_string()]
        })
        .collect();
    print_table(&["KEY", "VALUE", "SET BY"], &rows);
}
