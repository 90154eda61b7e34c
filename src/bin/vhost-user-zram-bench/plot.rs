// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `--plot`: the results as one SVG chart, every backend side by side in each phase.
//!
//! Two panels share the phase axis: IOPS as grouped bars (linear, from zero), and latency as a
//! bar to the median with a whisker to the 99th percentile (log scale, since backends differ by
//! orders of magnitude). Each bar is labelled with its value, so the chart reads without the
//! table. Hand-written SVG: no plotting dependency for two bar charts.

use std::fmt::Write as _;

use crate::backends::BackendKind;
use crate::report::{BackendReport, Report};
use crate::workload::Phase;

const WIDTH: f64 = 1000.0;
const HEIGHT: f64 = 700.0;
const LEFT: f64 = 90.0;
const RIGHT: f64 = 30.0;
const PLOT_WIDTH: f64 = WIDTH - LEFT - RIGHT;
/// Top and height of the IOPS panel's plotting area.
const IOPS_TOP: f64 = 120.0;
const IOPS_HEIGHT: f64 = 220.0;
/// Top and height of the latency panel's plotting area.
const LATENCY_TOP: f64 = 420.0;
const LATENCY_HEIGHT: f64 = 220.0;

/// One colour per backend, in the order they ran (vhost-user-zram first).
const COLOURS: [&str; 8] = [
    "#1f77b4", "#17becf", "#ff7f0e", "#2ca02c", "#9467bd", "#d62728", "#8c564b", "#e377c2",
];

/// Escapes text for SVG.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `412k`, `1.25M`, `950`.
fn short_count(value: f64) -> String {
    if value >= 1e6 {
        format!("{:.2}M", value / 1e6)
    } else if value >= 1e4 {
        format!("{:.0}k", value / 1e3)
    } else if value >= 1e3 {
        format!("{:.1}k", value / 1e3)
    } else {
        format!("{value:.0}")
    }
}

/// A latency in µs, short: `12`, `1.2k`... written with its unit.
fn short_micros(value: f64) -> String {
    if value >= 1e3 {
        format!("{:.1} ms", value / 1e3)
    } else if value >= 10.0 {
        format!("{value:.0} µs")
    } else {
        format!("{value:.1} µs")
    }
}

/// A step of 1, 2, 2.5 or 5 times a power of ten, giving about five ticks up to `max`.
fn nice_step(max: f64) -> f64 {
    let raw = (max / 5.0).max(f64::MIN_POSITIVE);
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|&step| step >= raw)
        .unwrap_or(10.0 * magnitude)
}

struct Layout {
    phases: Vec<Phase>,
    /// Backends that have at least one phase, with their colour.
    plotted: Vec<(usize, &'static str)>,
    group_width: f64,
    bar_width: f64,
}

impl Layout {
    fn bar_x(&self, phase_index: usize, slot: usize) -> f64 {
        let group_left = LEFT + phase_index as f64 * self.group_width;
        let bars_width = self.bar_width * self.plotted.len() as f64;
        group_left + (self.group_width - bars_width) / 2.0 + slot as f64 * self.bar_width
    }
}

/// The chart.
pub fn render_svg(report: &Report) -> String {
    let phases: Vec<Phase> = Phase::ALL
        .into_iter()
        .filter(|&phase| report.backends.iter().any(|b| phase_of(b, phase).is_some()))
        .collect();
    let plotted: Vec<(usize, &'static str)> = report
        .backends
        .iter()
        .enumerate()
        .filter(|(_, b)| !b.phases.is_empty())
        .enumerate()
        .map(|(slot, (index, _))| (index, COLOURS[slot % COLOURS.len()]))
        .collect();
    let group_width = PLOT_WIDTH / phases.len().max(1) as f64;
    let bar_width = (group_width * 0.8 / plotted.len().max(1) as f64).min(90.0);
    let layout = Layout {
        phases,
        plotted,
        group_width,
        bar_width,
    };

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r##"<rect width="100%" height="100%" fill="#ffffff"/>"##
    );
    let w = &report.workload;
    let title = format!(
        "{} MiB device, 4 KiB requests, {} queue(s) × depth {}, {} s per timed phase, {}{}",
        w.size_bytes >> 20,
        w.queues,
        w.queue_depth,
        w.seconds_per_phase,
        w.algorithm,
        if w.rounds > 1 {
            format!(", median of {} rounds", w.rounds)
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="28" font-size="18" font-weight="bold">vhost-user-zram-bench</text>"#
    );
    let _ = writeln!(
        svg,
        r##"<text x="{LEFT}" y="50" font-size="13" fill="#444">{}</text>"##,
        escape(&title)
    );
    legend(&mut svg, report, &layout);
    if layout.phases.is_empty() {
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" font-size="16" text-anchor="middle">no phase completed on any backend</text>"#,
            WIDTH / 2.0,
            HEIGHT / 2.0
        );
    } else {
        iops_panel(&mut svg, report, &layout);
        latency_panel(&mut svg, report, &layout);
    }
    svg.push_str("</svg>\n");
    svg
}

fn phase_of(backend: &BackendReport, phase: Phase) -> Option<&crate::report::PhaseReport> {
    backend.phases.iter().find(|p| p.phase == phase)
}

fn legend(svg: &mut String, report: &Report, layout: &Layout) {
    let mut x = LEFT;
    let y = 76.0;
    let mut slot = 0;
    for backend in &report.backends {
        let (colour, note) = if backend.phases.is_empty() {
            let note = match (&backend.skipped, &backend.error) {
                (Some(_), _) => " (skipped)",
                (None, Some(_)) => " (failed)",
                (None, None) => " (no data)",
            };
            ("#cccccc", note)
        } else {
            let colour = layout.plotted[slot].1;
            slot += 1;
            (
                colour,
                if backend.error.is_some() {
                    " (failed part way)"
                } else {
                    ""
                },
            )
        };
        let role = if backend.backend == BackendKind::QsdNull {
            " (stores nothing: the transport's ceiling)"
        } else {
            ""
        };
        let label = format!("{}{role}{note}", backend.backend.label());
        let _ = writeln!(
            svg,
            r#"<rect x="{x}" y="{}" width="14" height="14" fill="{colour}"/><text x="{}" y="{}">{}</text>"#,
            y - 11.0,
            x + 20.0,
            y,
            escape(&label)
        );
        x += 34.0 + 6.2 * label.chars().count() as f64;
    }
}

fn phase_labels(svg: &mut String, layout: &Layout, baseline: f64) {
    for (index, phase) in layout.phases.iter().enumerate() {
        let centre = LEFT + (index as f64 + 0.5) * layout.group_width;
        let _ = writeln!(
            svg,
            r#"<text x="{centre}" y="{}" text-anchor="middle" font-size="13">{}</text>"#,
            baseline + 18.0,
            phase.name()
        );
    }
}

fn panel_title(svg: &mut String, top: f64, title: &str) {
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="{}" font-size="14" font-weight="bold">{}</text>"#,
        top - 14.0,
        escape(title)
    );
}

fn gridline(svg: &mut String, y: f64, label: &str) {
    let _ = writeln!(
        svg,
        r##"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#e0e0e0"/><text x="{}" y="{:.1}" text-anchor="end" fill="#555">{}</text>"##,
        LEFT + PLOT_WIDTH,
        LEFT - 8.0,
        y + 4.0,
        escape(label)
    );
}

fn iops_panel(svg: &mut String, report: &Report, layout: &Layout) {
    panel_title(
        svg,
        IOPS_TOP,
        "IOPS (requests per second; higher is better)",
    );
    let max = report
        .backends
        .iter()
        .flat_map(|b| b.phases.iter().map(|p| p.iops))
        .fold(0.0f64, f64::max);
    let step = nice_step(max);
    let top_value = (max / step).ceil().max(1.0) * step;
    let y_of = |value: f64| IOPS_TOP + IOPS_HEIGHT * (1.0 - value / top_value);
    let mut tick = 0.0;
    while tick <= top_value * 1.0001 {
        gridline(svg, y_of(tick), &short_count(tick));
        tick += step;
    }
    for (slot, &(index, colour)) in layout.plotted.iter().enumerate() {
        let backend = &report.backends[index];
        for (phase_index, &phase) in layout.phases.iter().enumerate() {
            let Some(p) = phase_of(backend, phase) else {
                continue;
            };
            let x = layout.bar_x(phase_index, slot);
            let y = y_of(p.iops);
            let _ = writeln!(
                svg,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{colour}"><title>{}: {} IOPS</title></rect>"#,
                layout.bar_width - 4.0,
                IOPS_TOP + IOPS_HEIGHT - y,
                backend.backend.label(),
                p.iops.round()
            );
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="11">{}</text>"#,
                x + (layout.bar_width - 4.0) / 2.0,
                y - 4.0,
                short_count(p.iops)
            );
        }
    }
    let baseline = IOPS_TOP + IOPS_HEIGHT;
    let _ = writeln!(
        svg,
        r##"<line x1="{LEFT}" x2="{}" y1="{baseline}" y2="{baseline}" stroke="#333"/>"##,
        LEFT + PLOT_WIDTH
    );
    phase_labels(svg, layout, baseline);
}

fn latency_panel(svg: &mut String, report: &Report, layout: &Layout) {
    panel_title(
        svg,
        LATENCY_TOP,
        "latency per request (log scale; bar = p50, whisker = p99; lower is better)",
    );
    let values: Vec<f64> = report
        .backends
        .iter()
        .flat_map(|b| b.phases.iter().flat_map(|p| [p.p50_us, p.p99_us]))
        .filter(|v| *v > 0.0)
        .collect();
    let low = values.iter().copied().fold(f64::INFINITY, f64::min);
    let high = values.iter().copied().fold(0.0f64, f64::max);
    let (low_decade, high_decade) = if values.is_empty() {
        (0.0, 1.0)
    } else {
        let low_decade = low.log10().floor();
        (low_decade, high.log10().ceil().max(low_decade + 1.0))
    };
    let y_of = |value: f64| {
        let position =
            (value.max(10f64.powf(low_decade)).log10() - low_decade) / (high_decade - low_decade);
        LATENCY_TOP + LATENCY_HEIGHT * (1.0 - position)
    };
    let mut decade = low_decade;
    while decade <= high_decade {
        gridline(
            svg,
            y_of(10f64.powf(decade)),
            &short_micros(10f64.powf(decade)),
        );
        decade += 1.0;
    }
    let baseline = LATENCY_TOP + LATENCY_HEIGHT;
    for (slot, &(index, colour)) in layout.plotted.iter().enumerate() {
        let backend = &report.backends[index];
        for (phase_index, &phase) in layout.phases.iter().enumerate() {
            let Some(p) = phase_of(backend, phase) else {
                continue;
            };
            let x = layout.bar_x(phase_index, slot);
            let width = layout.bar_width - 4.0;
            let centre = x + width / 2.0;
            let (y50, y99) = (y_of(p.p50_us), y_of(p.p99_us));
            let _ = writeln!(
                svg,
                r#"<rect x="{x:.1}" y="{y50:.1}" width="{width:.1}" height="{:.1}" fill="{colour}" fill-opacity="0.85"><title>{}: p50 {:.1} µs, p99 {:.1} µs</title></rect>"#,
                baseline - y50,
                backend.backend.label(),
                p.p50_us,
                p.p99_us
            );
            let _ = writeln!(
                svg,
                r##"<line x1="{centre:.1}" x2="{centre:.1}" y1="{y50:.1}" y2="{y99:.1}" stroke="#222" stroke-width="1.5"/><line x1="{:.1}" x2="{:.1}" y1="{y99:.1}" y2="{y99:.1}" stroke="#222" stroke-width="1.5"/>"##,
                centre - width / 4.0,
                centre + width / 4.0
            );
            let _ = writeln!(
                svg,
                r#"<text x="{centre:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}</text>"#,
                y99 - 5.0,
                short_micros(p.p99_us)
            );
            if baseline - y50 > 16.0 {
                let _ = writeln!(
                    svg,
                    r#"<text x="{centre:.1}" y="{:.1}" text-anchor="middle" font-size="10" fill="white">{}</text>"#,
                    baseline - 5.0,
                    short_micros(p.p50_us)
                );
            }
        }
    }
    let _ = writeln!(
        svg,
        r##"<line x1="{LEFT}" x2="{}" y1="{baseline}" y2="{baseline}" stroke="#333"/>"##,
        LEFT + PLOT_WIDTH
    );
    phase_labels(svg, layout, baseline);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_round_numbers() {
        assert_eq!(nice_step(1000.0), 200.0);
        assert_eq!(nice_step(412_000.0), 100_000.0);
        assert_eq!(nice_step(12.0), 2.5);
        assert_eq!(short_count(412_345.0), "412k");
        assert_eq!(short_micros(1234.0), "1.2 ms");
        assert_eq!(escape("a<b & \"c\""), "a&lt;b &amp; &quot;c&quot;");
    }
}
