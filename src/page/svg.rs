//! Plots as SVG made by the server: a line plot with axes, and a bar plot (a histogram).
//!
//! Owns the geometry of a plot (margins, scales, "nice" axis maxima, tick labels) and the SVG
//! text. Every plotted point is one element a test or a reader can count: a
//! `<circle class="point">` per line point, a `<rect class="bar">` per bar, each carrying its
//! value in a `<title>`. It must never read a server's state nor decide what is plotted: the
//! pages hand it numbers.
//!
//! Why our own writer and not a crate: `plotters` (the well-kept Rust plotting crate) with its
//! SVG backend pulls in a font stack and draws text as paths or needs system fonts, renders
//! into a whole document per chart, and gives no hook to mark each point with a class; the
//! two shapes needed here are about 150 lines of string formatting, and rendering them costs
//! microseconds (`cargo bench --bench pages`).

use std::fmt::Write as _;

use super::escape_into;

/// Width of every plot, in SVG user units (pixels at 100%).
pub const WIDTH: f64 = 600.0;
/// Height of every plot.
pub const HEIGHT: f64 = 200.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 26.0;
const BOTTOM: f64 = 26.0;

/// One line of a line plot.
pub struct Series<'a> {
    pub name: &'a str,
    /// A CSS colour (a constant of the caller's, not data).
    pub color: &'a str,
    /// `(x, y)` in data units, in x order.
    pub points: &'a [(f64, f64)],
}

/// The x axis of a plot and how the y values read.
pub struct Axes<'a> {
    /// The x range shown, left to right.
    pub x_range: (f64, f64),
    /// Labels under the x axis at these x values.
    pub x_ticks: &'a [(f64, &'a str)],
    /// How a y value (an axis label or a point's title) reads.
    pub y_format: fn(f64) -> String,
}

/// The smallest of 1, 2 or 5 times a power of ten at or above `v` (1 for nothing to show).
pub fn nice_max(v: f64) -> f64 {
    if !v.is_finite() || v <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * p >= v {
            return m * p;
        }
    }
    10.0 * p
}

struct Frame {
    x0: f64,
    x1: f64,
    y_max: f64,
}

impl Frame {
    fn x(&self, x: f64) -> f64 {
        let span = (self.x1 - self.x0).max(f64::MIN_POSITIVE);
        LEFT + (x - self.x0) / span * (WIDTH - LEFT - RIGHT)
    }

    fn y(&self, y: f64) -> f64 {
        let h = HEIGHT - TOP - BOTTOM;
        TOP + h - (y.max(0.0) / self.y_max).min(1.0) * h
    }
}

/// Opens the `<svg>` with its title, axes, y labels (0, half, max) and x ticks.
fn open(out: &mut String, id: &str, title: &str, axes: &Axes, y_max: f64) -> Frame {
    let f = Frame {
        x0: axes.x_range.0,
        x1: axes.x_range.1,
        y_max,
    };
    let _ = write!(
        out,
        "<svg id=\"{id}\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\"><title>"
    );
    escape_into(out, title);
    out.push_str("</title><text x=\"8\" y=\"16\" font-size=\"13\" font-weight=\"bold\">");
    escape_into(out, title);
    out.push_str("</text>");
    let (bottom, right) = (HEIGHT - BOTTOM, WIDTH - RIGHT);
    let _ = write!(
        out,
        "<g class=\"axes\" stroke=\"#888\" stroke-width=\"1\"><line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{bottom}\"/>\
         <line x1=\"{LEFT}\" y1=\"{bottom}\" x2=\"{right}\" y2=\"{bottom}\"/></g><g font-size=\"10\" fill=\"#555\">"
    );
    for v in [0.0, y_max / 2.0, y_max] {
        let y = f.y(v);
        let _ = write!(
            out,
            "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{right}\" y2=\"{y:.1}\" stroke=\"#eee\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">",
            LEFT - 4.0,
            y + 3.0
        );
        escape_into(out, &(axes.y_format)(v));
        out.push_str("</text>");
    }
    for (x, label) in axes.x_ticks {
        let _ = write!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">",
            f.x(*x),
            bottom + 14.0
        );
        escape_into(out, label);
        out.push_str("</text>");
    }
    out.push_str("</g>");
    f
}

/// A line plot of `series` (each point a `<circle class="point">`, its line a polyline), with
/// a legend naming the series.
pub fn line_plot(out: &mut String, id: &str, title: &str, axes: &Axes, series: &[Series]) {
    let top = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0.0, f64::max);
    let f = open(out, id, title, axes, nice_max(top));
    let mut legend_x = WIDTH - RIGHT;
    for s in series.iter().rev() {
        legend_x -= 8.0 + 7.0 * s.name.chars().count() as f64;
        let _ = write!(
            out,
            "<text x=\"{legend_x:.1}\" y=\"16\" font-size=\"11\" fill=\""
        );
        escape_into(out, s.color);
        out.push_str("\">");
        escape_into(out, s.name);
        out.push_str("</text>");
    }
    for s in series {
        out.push_str("<g class=\"series\" data-series=\"");
        escape_into(out, s.name);
        out.push_str("\" fill=\"");
        escape_into(out, s.color);
        out.push_str("\" stroke=\"");
        escape_into(out, s.color);
        out.push_str("\"><polyline fill=\"none\" stroke-width=\"1.5\" points=\"");
        for (x, y) in s.points {
            let _ = write!(out, "{:.1},{:.1} ", f.x(*x), f.y(*y));
        }
        out.push_str("\"/>");
        for (x, y) in s.points {
            let _ = write!(
                out,
                "<circle class=\"point\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\" stroke=\"none\"><title>",
                f.x(*x),
                f.y(*y)
            );
            escape_into(out, &(axes.y_format)(*y));
            out.push_str("</title></circle>");
        }
        out.push_str("</g>");
    }
    out.push_str("</svg>\n");
}

/// One bar: it spans `[x0, x1)` and stands `value` high.
pub struct Bar {
    pub x0: f64,
    pub x1: f64,
    pub value: f64,
}

/// A bar plot (a histogram): each bar a `<rect class="bar">`.
pub fn bar_plot(out: &mut String, id: &str, title: &str, axes: &Axes, bars: &[Bar], color: &str) {
    let top = bars.iter().map(|b| b.value).fold(0.0, f64::max);
    let f = open(out, id, title, axes, nice_max(top));
    out.push_str("<g class=\"bars\" fill=\"");
    escape_into(out, color);
    out.push_str("\">");
    let base = f.y(0.0);
    for b in bars {
        let (x0, x1, y) = (f.x(b.x0), f.x(b.x1), f.y(b.value));
        let _ = write!(
            out,
            "<rect class=\"bar\" x=\"{x0:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\"><title>",
            (x1 - x0 - 0.5).max(0.5),
            base - y
        );
        escape_into(out, &(axes.y_format)(b.value));
        out.push_str("</title></rect>");
    }
    out.push_str("</g></svg>\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(v: f64) -> String {
        format!("{v}")
    }

    #[test]
    fn axis_maxima_are_one_two_or_five_times_a_power_of_ten() {
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(f64::NAN), 1.0);
        assert_eq!(nice_max(0.3), 0.5);
        assert_eq!(nice_max(1.0), 1.0);
        assert_eq!(nice_max(1.1), 2.0);
        assert_eq!(nice_max(3.0), 5.0);
        assert_eq!(nice_max(700.0), 1000.0);
    }

    #[test]
    fn every_point_and_bar_is_an_element_with_its_value() {
        let axes = Axes {
            x_range: (0.0, 3.0),
            x_ticks: &[(0.0, "start"), (3.0, "now")],
            y_format: plain,
        };
        let a = [(0.0, 1.0), (1.0, 4.0), (2.0, 2.0)];
        let b = [(0.0, 0.0), (2.0, 3.0)];
        let mut out = String::new();
        line_plot(
            &mut out,
            "p",
            "A & B",
            &axes,
            &[
                Series {
                    name: "a<",
                    color: "red",
                    points: &a,
                },
                Series {
                    name: "b",
                    color: "blue",
                    points: &b,
                },
            ],
        );
        assert_eq!(out.matches("<circle class=\"point\"").count(), 5);
        assert!(out.contains("<title>A &amp; B</title>"));
        assert!(out.contains("data-series=\"a&lt;\""));
        assert!(out.contains("<title>4</title>"));
        // The highest point (4) sits on the top of a 5-high axis: 4/5 of the way up.
        let h = HEIGHT - TOP - BOTTOM;
        assert!(out.contains(&format!("cy=\"{:.1}\"", TOP + h - 0.8 * h)));
        let mut out = String::new();
        let bars = [
            Bar {
                x0: 0.0,
                x1: 1.0,
                value: 2.0,
            },
            Bar {
                x0: 1.0,
                x1: 2.0,
                value: 0.0,
            },
        ];
        bar_plot(&mut out, "h", "hist", &axes, &bars, "green");
        assert_eq!(out.matches("<rect class=\"bar\"").count(), 2);
        assert!(out.starts_with("<svg id=\"h\""));
        assert!(out.trim_end().ends_with("</svg>"));
    }
}
