//! Layer 4: the status pages' HTML, beside `serve`.
//!
//! Owns how a status page looks: HTML escaping of everything that comes from data, the page
//! frame (inline style, `<meta http-equiv="refresh">` every [`REFRESH_S`] seconds, no script
//! and no external asset), tables, byte and time formatting, the server-made SVG plots
//! (`svg`), the per-minute history they plot (`history`), and the two pages as plain data
//! rendered to a string (`node_page`, `manager_page`). It must never read a server's state
//! itself nor decide who may see a page: the roles gather plain views (`node::status_page`,
//! `manager::status_page`) and check credentials; this module only renders what it is given,
//! and imports only `core`, `store` and `http`.

pub mod history;
pub mod manager_page;
pub mod node_page;
pub mod svg;

use std::fmt::Write as _;

use chrono::{DateTime, Utc};

/// How often a status page reloads itself (a wall screen left open).
pub const REFRESH_S: u64 = 10;

/// The page style: inline, so the page needs nothing but itself.
const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}\
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em;border-bottom:1px solid #ddd}\
table{border-collapse:collapse;margin:.3em 0}td,th{padding:.2em .7em;border-bottom:1px solid #e4e4e4;text-align:left}\
th{background:#f0f0f0}td.n{text-align:right;font-variant-numeric:tabular-nums}\
.ok{color:#1a7f37}.bad{color:#c0392b}.dim{color:#777}.meta{color:#555;margin:0 0 1em}\
svg{background:#fff;border:1px solid #ddd;margin:.3em 1em .3em 0}\
form.inline{display:inline}button,input{font:inherit}";

/// `text` with `& < > " '` escaped, safe inside element content and quoted attributes.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    escape_into(&mut out, text);
    out
}

/// Appends `text` escaped to `out`.
pub fn escape_into(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
}

/// A whole page: `title` (escaped), refreshed every [`REFRESH_S`] seconds when `refresh`,
/// around `body` (already HTML).
pub fn frame(title: &str, refresh: bool, body: &str) -> String {
    let mut out = String::with_capacity(body.len() + 1024);
    out.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">");
    if refresh {
        let _ = write!(out, "<meta http-equiv=\"refresh\" content=\"{REFRESH_S}\">");
    }
    out.push_str("<meta name=\"viewport\" content=\"width=device-width\"><title>");
    escape_into(&mut out, title);
    out.push_str("</title><style>");
    out.push_str(STYLE);
    out.push_str("</style></head><body>\n");
    out.push_str(body);
    out.push_str("\n</body></html>\n");
    out
}

/// A table with `id`, a header row (`head`, escaped) and rows of cells already HTML (each
/// made with [`cell`] or [`num`]); `empty` (escaped) stands in for no rows.
pub fn table(out: &mut String, id: &str, head: &[&str], rows: &[Vec<String>], empty: &str) {
    if rows.is_empty() {
        let _ = write!(out, "<p id=\"{id}\" class=\"dim\">");
        escape_into(out, empty);
        out.push_str("</p>\n");
        return;
    }
    let _ = write!(out, "<table id=\"{id}\"><tr>");
    for h in head {
        out.push_str("<th>");
        escape_into(out, h);
        out.push_str("</th>");
    }
    out.push_str("</tr>\n");
    for row in rows {
        out.push_str("<tr>");
        for c in row {
            out.push_str(c);
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</table>\n");
}

/// A cell holding `text`, escaped.
pub fn cell(text: &str) -> String {
    let mut out = String::from("<td>");
    escape_into(&mut out, text);
    out.push_str("</td>");
    out
}

/// A cell holding `text`, escaped, with a class (`ok`, `bad`, `dim`).
pub fn cell_class(class: &str, text: &str) -> String {
    let mut out = format!("<td class=\"{class}\">");
    escape_into(&mut out, text);
    out.push_str("</td>");
    out
}

/// A right-aligned number cell.
pub fn num(n: impl std::fmt::Display) -> String {
    format!("<td class=\"n\">{n}</td>")
}

/// `bytes` in binary units (`1.5 MiB`).
pub fn bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A moment as `2026-01-02 03:04:05 UTC`.
pub fn time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_leaves_no_markup_from_data() {
        assert_eq!(
            escape("<script>alert('x')&\"</script>"),
            "&lt;script&gt;alert(&#39;x&#39;)&amp;&quot;&lt;/script&gt;"
        );
        let page = frame("a<b", true, "");
        assert!(page.contains("<title>a&lt;b</title>"));
        assert!(page.contains("http-equiv=\"refresh\" content=\"10\""));
        assert!(!frame("t", false, "").contains("refresh"));
    }

    #[test]
    fn a_table_escapes_its_head_and_says_when_it_is_empty() {
        let mut out = String::new();
        table(&mut out, "t", &["<h>"], &[], "nothing <yet>");
        assert_eq!(out, "<p id=\"t\" class=\"dim\">nothing &lt;yet&gt;</p>\n");
        out.clear();
        table(&mut out, "t", &["<h>"], &[vec![cell("<x>"), num(3)]], "");
        assert!(out.contains("<th>&lt;h&gt;</th>"));
        assert!(out.contains("<td>&lt;x&gt;</td><td class=\"n\">3</td>"));
    }

    #[test]
    fn bytes_read_in_binary_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(5 << 30), "5.0 GiB");
    }
}
