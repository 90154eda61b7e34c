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

/// The chart's least width; it grows when the value labels need more room.
const MIN_WIDTH: f64 = 1000.0;
const LEFT: f64 = 90.0;
const RIGHT: f64 = 30.0;
/// Where the legend's first row sits, and the height of each row.
const LEGEND_TOP: f64 = 76.0;
const LEGEND_ROW: f64 = 20.0;
/// The room between the end of the legend and the top of the IOPS panel's plotting area
/// (for the panel's title and the labels of the tallest bars).
const ABOVE_PANEL: f64 = 48.0;
/// Height of each panel's plotting area.
const IOPS_HEIGHT: f64 = 220.0;
const LATENCY_HEIGHT: f64 = 220.0;
/// From the bottom of the IOPS panel to the top of the latency panel (phase names, the
/// latency panel's title and its labels), and below the latency panel (phase names).
const BETWEEN_PANELS: f64 = 90.0;
const BELOW_PANELS: f64 = 40.0;
/// Font sizes of the legend and of the value labels on the bars.
const LEGEND_FONT: f64 = 12.0;
const IOPS_LABEL_FONT: f64 = 11.0;
const LATENCY_LABEL_FONT: f64 = 10.0;
/// The least room between the labels of two neighbouring bars, and between a bar and the
/// next (a bar is drawn this much narrower than its slot).
const LABEL_GAP: f64 = 4.0;
const BAR_GAP: f64 = 4.0;
/// The share of a phase's group the bars take; the rest separates the phases.
const GROUP_FILL: f64 = 0.8;
/// The widest a bar gets when few backends ran.
const MAX_BAR_WIDTH: f64 = 90.0;

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

/// How wide `text` is drawn at `size` px, erring wide: advances of DejaVu Sans (the chart's
/// first font, and the widest of its fallbacks) by character class, rounded up.
fn text_width(text: &str, size: f64) -> f64 {
    let ems: f64 = text
        .chars()
        .map(|c| match c {
            'i' | 'j' | 'l' | '.' | ',' | ':' | ';' | '\'' | '|' | '!' | ' ' => 0.34,
            'f' | 't' | 'r' | '(' | ')' | '-' | '/' | '"' | 'I' => 0.44,
            's' | 'c' | 'z' => 0.57,
            'm' | 'w' | 'M' | 'W' | '%' | '×' | '@' => 1.0,
            c if c.is_ascii_uppercase() || c == '&' => 0.8,
            _ => 0.66,
        })
        .sum();
    ems * size
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

/// Where everything goes: computed once from what the chart holds, so that the legend wraps
/// inside the chart and no two value labels of neighbouring bars overlap.
struct Layout {
    phases: Vec<Phase>,
    /// Backends that have at least one phase, with their colour.
    plotted: Vec<(usize, &'static str)>,
    /// Each legend entry's text and colour, with its row and left edge.
    legend: Vec<LegendEntry>,
    width: f64,
    height: f64,
    group_width: f64,
    /// The slot of one bar in its group: the bar, then `BAR_GAP`.
    bar_width: f64,
    /// Top of the IOPS and latency panels' plotting areas.
    iops_top: f64,
    latency_top: f64,
}

struct LegendEntry {
    label: String,
    colour: &'static str,
    x: f64,
    y: f64,
}

impl Layout {
    fn new(report: &Report) -> Layout {
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
        // Each bar's slot is at least as wide as its widest label and a gap, so labels of
        // neighbouring bars never touch; the chart grows to hold that, never shrinks.
        let bars = plotted.len().max(1) as f64;
        let groups = phases.len().max(1) as f64;
        let widest_label = value_labels(report)
            .map(|(text, size)| text_width(&text, size))
            .fold(0.0, f64::max);
        let least_bar = (widest_label + LABEL_GAP).max(BAR_GAP + 8.0);
        let fitting_bar = (MIN_WIDTH - LEFT - RIGHT) / groups * GROUP_FILL / bars;
        let bar_width = fitting_bar.min(MAX_BAR_WIDTH).max(least_bar);
        let group_width = (bar_width * bars / GROUP_FILL).max((MIN_WIDTH - LEFT - RIGHT) / groups);
        let width = (LEFT + RIGHT + group_width * groups).ceil();
        let legend = legend_entries(report, &plotted, width);
        let legend_bottom = legend.last().map_or(LEGEND_TOP, |entry| entry.y);
        let iops_top = legend_bottom + ABOVE_PANEL;
        let latency_top = iops_top + IOPS_HEIGHT + BETWEEN_PANELS;
        Layout {
            phases,
            plotted,
            legend,
            width,
            height: latency_top + LATENCY_HEIGHT + BELOW_PANELS,
            group_width,
            bar_width,
            iops_top,
            latency_top,
        }
    }

    fn plot_right(&self) -> f64 {
        self.width - RIGHT
    }

    fn bar_x(&self, phase_index: usize, slot: usize) -> f64 {
        let group_left = LEFT + phase_index as f64 * self.group_width;
        let bars_width = self.bar_width * self.plotted.len() as f64;
        group_left + (self.group_width - bars_width) / 2.0 + slot as f64 * self.bar_width
    }
}

/// Every value label the panels draw over a bar, with its font size.
fn value_labels(report: &Report) -> impl Iterator<Item = (String, f64)> + '_ {
    report
        .backends
        .iter()
        .flat_map(|b| &b.phases)
        .flat_map(|p| {
            [
                (short_count(p.iops), IOPS_LABEL_FONT),
                (short_micros(p.p50_us), LATENCY_LABEL_FONT),
                (short_micros(p.p99_us), LATENCY_LABEL_FONT),
            ]
        })
}

/// The legend: one entry per backend in the order they ran, wrapped onto a new row where the
/// next entry would pass the chart's right edge.
fn legend_entries(
    report: &Report,
    plotted: &[(usize, &'static str)],
    width: f64,
) -> Vec<LegendEntry> {
    let mut entries = Vec::new();
    let (mut x, mut y) = (LEFT, LEGEND_TOP);
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
            let colour = plotted[slot].1;
            slot += 1;
            let note = if backend.error.is_some() {
                " (failed part way)"
            } else {
                ""
            };
            (colour, note)
        };
        let role = if backend.backend == BackendKind::QsdNull {
            " (stores nothing: the transport's ceiling)"
        } else {
            ""
        };
        let label = format!("{}{role}{note}", backend.backend.label());
        // The swatch, a gap, the text.
        let entry_width = 20.0 + text_width(&label, LEGEND_FONT);
        if x > LEFT && x + entry_width > width - RIGHT {
            x = LEFT;
            y += LEGEND_ROW;
        }
        entries.push(LegendEntry {
            label,
            colour,
            x,
            y,
        });
        x += entry_width + 16.0;
    }
    entries
}

/// The chart.
pub fn render_svg(report: &Report) -> String {
    let layout = Layout::new(report);
    let (width, height) = (layout.width, layout.height);

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">"#
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
    legend(&mut svg, &layout);
    if layout.phases.is_empty() {
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" font-size="16" text-anchor="middle">no phase completed on any backend</text>"#,
            width / 2.0,
            height / 2.0
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

fn legend(svg: &mut String, layout: &Layout) {
    for entry in &layout.legend {
        let _ = writeln!(
            svg,
            r#"<rect x="{}" y="{}" width="14" height="14" fill="{}"/><text x="{}" y="{}" font-size="{LEGEND_FONT}">{}</text>"#,
            entry.x,
            entry.y - 11.0,
            entry.colour,
            entry.x + 20.0,
            entry.y,
            escape(&entry.label)
        );
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

fn gridline(svg: &mut String, layout: &Layout, y: f64, label: &str) {
    let _ = writeln!(
        svg,
        r##"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#e0e0e0"/><text x="{}" y="{:.1}" text-anchor="end" fill="#555">{}</text>"##,
        layout.plot_right(),
        LEFT - 8.0,
        y + 4.0,
        escape(label)
    );
}

fn iops_panel(svg: &mut String, report: &Report, layout: &Layout) {
    panel_title(
        svg,
        layout.iops_top,
        "IOPS (requests per second; higher is better)",
    );
    let max = report
        .backends
        .iter()
        .flat_map(|b| b.phases.iter().map(|p| p.iops))
        .fold(0.0f64, f64::max);
    let step = nice_step(max);
    let top_value = (max / step).ceil().max(1.0) * step;
    let y_of = |value: f64| layout.iops_top + IOPS_HEIGHT * (1.0 - value / top_value);
    let mut tick = 0.0;
    while tick <= top_value * 1.0001 {
        gridline(svg, layout, y_of(tick), &short_count(tick));
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
                layout.bar_width - BAR_GAP,
                layout.iops_top + IOPS_HEIGHT - y,
                backend.backend.label(),
                p.iops.round()
            );
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="{IOPS_LABEL_FONT}">{}</text>"#,
                x + (layout.bar_width - BAR_GAP) / 2.0,
                y - 4.0,
                short_count(p.iops)
            );
        }
    }
    let baseline = layout.iops_top + IOPS_HEIGHT;
    let _ = writeln!(
        svg,
        r##"<line x1="{LEFT}" x2="{}" y1="{baseline}" y2="{baseline}" stroke="#333"/>"##,
        layout.plot_right()
    );
    phase_labels(svg, layout, baseline);
}

fn latency_panel(svg: &mut String, report: &Report, layout: &Layout) {
    panel_title(
        svg,
        layout.latency_top,
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
        layout.latency_top + LATENCY_HEIGHT * (1.0 - position)
    };
    let mut decade = low_decade;
    while decade <= high_decade {
        gridline(
            svg,
            layout,
            y_of(10f64.powf(decade)),
            &short_micros(10f64.powf(decade)),
        );
        decade += 1.0;
    }
    let baseline = layout.latency_top + LATENCY_HEIGHT;
    for (slot, &(index, colour)) in layout.plotted.iter().enumerate() {
        let backend = &report.backends[index];
        for (phase_index, &phase) in layout.phases.iter().enumerate() {
            let Some(p) = phase_of(backend, phase) else {
                continue;
            };
            let x = layout.bar_x(phase_index, slot);
            let width = layout.bar_width - BAR_GAP;
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
                r#"<text x="{centre:.1}" y="{:.1}" text-anchor="middle" font-size="{LATENCY_LABEL_FONT}">{}</text>"#,
                y99 - 5.0,
                short_micros(p.p99_us)
            );
            if baseline - y50 > 16.0 {
                let _ = writeln!(
                    svg,
                    r#"<text x="{centre:.1}" y="{:.1}" text-anchor="middle" font-size="{LATENCY_LABEL_FONT}" fill="white">{}</text>"#,
                    baseline - 5.0,
                    short_micros(p.p50_us)
                );
            }
        }
    }
    let _ = writeln!(
        svg,
        r##"<line x1="{LEFT}" x2="{}" y1="{baseline}" y2="{baseline}" stroke="#333"/>"##,
        layout.plot_right()
    );
    phase_labels(svg, layout, baseline);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{PhaseReport, WorkloadDescription};

    #[test]
    fn steps_are_round_numbers() {
        assert_eq!(nice_step(1000.0), 200.0);
        assert_eq!(nice_step(412_000.0), 100_000.0);
        assert_eq!(nice_step(12.0), 2.5);
        assert_eq!(short_count(412_345.0), "412k");
        assert_eq!(short_micros(1234.0), "1.2 ms");
        assert_eq!(escape("a<b & \"c\""), "a&lt;b &amp; &quot;c&quot;");
    }

    /// What `--compare` runs (`vuz --workers 1` when the default is more workers), in its
    /// order, the widest legend entry among them.
    const COMPARE: [BackendKind; 7] = [
        BackendKind::VhostUserZram,
        BackendKind::VhostUserZramPolling(50),
        BackendKind::VhostUserZramInline,
        BackendKind::VhostUserZramOneWorker,
        BackendKind::KernelZram,
        BackendKind::QsdNull,
        BackendKind::QsdShmFile,
    ];

    /// A phase whose labels are as wide as they come: six-digit IOPS close to each other (the
    /// "346k358k" of a real run), millisecond p99s.
    fn phase(phase: Phase, slot: usize) -> PhaseReport {
        let iops = 346_000.0 + 12_000.0 * slot as f64;
        PhaseReport {
            phase,
            requests: 1000,
            reads: 0,
            verified_reads: 0,
            seconds: 1.0,
            iops,
            mib_per_second: iops * 4096.0 / 1048576.0,
            request_pages: 1,
            p50_us: 88.8 + slot as f64,
            p99_us: 1234.0 + 10.0 * slot as f64,
            p999_us: 2345.0 + 10.0 * slot as f64,
            daemon_cpu_seconds: None,
            daemon_cpu_us_per_request: None,
            queue_cpu_us_per_request: None,
            worker_cpu_us_per_request: None,
            codec_floor_us_per_request: None,
            cpu_us_above_floor: None,
            drained_cpu_us_per_page: None,
            unit_reads: None,
        }
    }

    fn report(backends: &[BackendKind]) -> Report {
        Report {
            workload: WorkloadDescription {
                size_bytes: 1 << 30,
                pages: 1 << 18,
                queues: 1,
                queue_depth: 32,
                queue_size: 256,
                block_size: 4096,
                seconds_per_phase: 10.0,
                rounds: 3,
                seed: 1,
                pool_pages: 1024,
                corpus: None,
                algorithm: "lz4".into(),
                algorithm_level: None,
                verify: true,
                compare_poll_max_us: Some(50),
            },
            backends: backends
                .iter()
                .enumerate()
                .map(|(slot, &kind)| BackendReport {
                    phases: Phase::ALL.iter().map(|&p| phase(p, slot)).collect(),
                    ..BackendReport::new(kind, None)
                })
                .collect(),
            codec_floor: None,
            codec_floor_error: None,
            migration: None,
        }
    }

    /// One `<text>` of the chart: its box, estimated as a renderer would draw it.
    #[derive(Debug)]
    struct TextBox {
        text: String,
        left: f64,
        right: f64,
        top: f64,
        bottom: f64,
    }

    fn attribute(element: &str, name: &str) -> Option<String> {
        let start = element.find(&format!(" {name}=\""))? + name.len() + 3;
        let len = element[start..].find('"')?;
        Some(element[start..start + len].to_owned())
    }

    fn unescape(text: &str) -> String {
        text.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
    }

    /// The viewBox's width and height and every text's box.
    fn texts(svg: &str) -> (f64, f64, Vec<TextBox>) {
        let view_box = attribute(svg, "viewBox").unwrap();
        let numbers: Vec<f64> = view_box
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect();
        let mut boxes = Vec::new();
        for piece in svg.split("<text").skip(1) {
            let (element, rest) = piece.split_once('>').unwrap();
            let text = unescape(&rest[..rest.find("</text>").unwrap()]);
            let number = |name: &str| attribute(element, name).map(|v| v.parse::<f64>().unwrap());
            let (x, y) = (number("x").unwrap(), number("y").unwrap());
            let size = number("font-size").unwrap_or(12.0);
            let width = text_width(&text, size);
            let left = match attribute(element, "text-anchor").as_deref() {
                Some("middle") => x - width / 2.0,
                Some("end") => x - width,
                _ => x,
            };
            boxes.push(TextBox {
                text,
                left,
                right: left + width,
                top: y - 0.76 * size,
                bottom: y + 0.24 * size,
            });
        }
        (numbers[2], numbers[3], boxes)
    }

    #[test]
    fn text_width_is_not_underestimated() {
        // DejaVu Sans advances at 12 px, from its metrics (2048 units per em): digits 7.6 px,
        // `m` 11.7 px, a space 3.8 px.
        assert!(text_width("358k", 12.0) >= 3.0 * 7.6 + 7.0);
        assert!(text_width("mmmm", 12.0) >= 4.0 * 11.6);
        assert!(text_width("1.2 ms", 10.0) >= 30.0);
    }

    #[test]
    fn every_legend_entry_is_inside_the_view_box() {
        for count in 1..=COMPARE.len() {
            let mut report = report(&COMPARE[..count]);
            // A failed backend's note makes its entry longer still.
            if count == COMPARE.len() {
                report.backends[4] =
                    BackendReport::skipped(BackendKind::KernelZram, "no zram module".into());
            }
            let svg = render_svg(&report);
            let (width, height, boxes) = texts(&svg);
            for kind in &COMPARE[..count] {
                let entry = boxes
                    .iter()
                    .find(|b| {
                        let label = kind.label();
                        b.text == label || b.text.starts_with(&format!("{label} ("))
                    })
                    .unwrap_or_else(|| panic!("no legend entry for {}", kind.label()));
                assert!(
                    entry.left >= 0.0
                        && entry.right <= width
                        && entry.top >= 0.0
                        && entry.bottom <= height,
                    "{count} backends: legend entry {entry:?} is outside 0 0 {width} {height}"
                );
            }
        }
    }

    #[test]
    fn no_two_texts_overlap() {
        for count in 1..=COMPARE.len() {
            let svg = render_svg(&report(&COMPARE[..count]));
            let (width, height, boxes) = texts(&svg);
            for (i, a) in boxes.iter().enumerate() {
                assert!(
                    a.left >= 0.0 && a.right <= width && a.top >= 0.0 && a.bottom <= height,
                    "{count} backends: {a:?} is outside 0 0 {width} {height}"
                );
                for b in &boxes[i + 1..] {
                    let apart = a.right <= b.left
                        || b.right <= a.left
                        || a.bottom <= b.top
                        || b.bottom <= a.top;
                    assert!(apart, "{count} backends: {a:?} overlaps {b:?}");
                }
            }
        }
    }
}
