// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `--compare-units`: vhost-user-zram per page against multi-page units (`--unit-max`) and
//! kernel zram, on the same pages, with the same algorithm, back to back. The markdown table
//! gives every column's figure and its ratio to per-page, and holds each unit size to the
//! targets of the units issue (on a real-memory corpus written in 64 KiB requests):
//! `mem_used_total` after the fill ≤ 0.85× per-page, write CPU per page ≤ 0.7×, random-read
//! IOPS ≥ 0.7×, sequential-read throughput ≥ 1.0×.
//!
//! Write CPU per page is the daemon's CPU time (utime + stime of every thread, from
//! `/proc/PID/stat`) from the start of the fill until its compression workers have drained,
//! divided by the pages written: compression that the workers finish after the last request
//! completed counts too. Kernel zram compresses in the bench's own context, so it has none.

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::backends::BackendKind;
use crate::report::{BackendReport, PhaseReport, Report};
use crate::workload::Phase;

/// `mem_used_total` after the fill, units / per-page.
pub const MEMORY_TARGET: f64 = 0.85;
/// Write CPU per page, units / per-page.
pub const WRITE_CPU_TARGET: f64 = 0.7;
/// Random-read IOPS, units / per-page.
pub const RANDOM_READ_TARGET: f64 = 0.7;
/// Sequential-read throughput, units / per-page.
pub const SEQUENTIAL_READ_TARGET: f64 = 1.0;

/// Whether `binary` takes `--unit-max` (its `--help` mentions it).
pub fn daemon_has_unit_max(binary: &Path) -> Result<bool, String> {
    let output = Command::new(binary)
        .arg("--help")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run {} --help: {e}", binary.display()))?;
    Ok(String::from_utf8_lossy(&output.stdout).contains("--unit-max"))
}

/// What the bench says when the daemon has no `--unit-max`.
pub fn no_unit_max_warning(binary: &Path) -> String {
    format!(
        "{} has no --unit-max (a build from before the units flag): per-page runs without it, \
         the unit sizes are skipped",
        binary.display()
    )
}

/// Which way a ratio to per-page must go to meet its target.
#[derive(Clone, Copy)]
enum Target {
    /// No target: the ratio only.
    None,
    /// At most this.
    AtMost(f64),
    /// At least this.
    AtLeast(f64),
}

impl Target {
    /// `met` or `missed` for `ratio`, with the bound.
    fn verdict(self, ratio: f64) -> Option<String> {
        match self {
            Target::None => None,
            Target::AtMost(bound) => Some(format!(
                "{} (≤ {bound:.2}×)",
                if ratio <= bound { "met" } else { "missed" }
            )),
            Target::AtLeast(bound) => Some(format!(
                "{} (≥ {bound:.2}×)",
                if ratio >= bound { "met" } else { "missed" }
            )),
        }
    }
}

/// The columns, in order: per-page, each unit size, kernel zram (those the run has).
fn columns(report: &Report) -> Vec<&BackendReport> {
    let per_page = report.backends.iter().find(|b| {
        matches!(
            b.backend,
            BackendKind::VhostUserZramUnits(1) | BackendKind::VhostUserZram
        )
    });
    let units = report
        .backends
        .iter()
        .filter(|b| matches!(b.backend, BackendKind::VhostUserZramUnits(pages) if pages > 1));
    let kernel = report
        .backends
        .iter()
        .find(|b| b.backend == BackendKind::KernelZram);
    per_page.into_iter().chain(units).chain(kernel).collect()
}

/// A column's header.
fn header(backend: &BackendReport) -> String {
    match backend.backend {
        BackendKind::VhostUserZram => "per-page".into(),
        BackendKind::KernelZram => "kernel zram".into(),
        other => other.label(),
    }
}

/// One figure of a backend, `None` when it was not measured.
type Figure = fn(&BackendReport) -> Option<f64>;

/// A row with a figure per column and its ratio to per-page.
struct Row {
    label: String,
    figure: Figure,
    format: fn(f64) -> String,
    target: Target,
}

fn phase_figure(backend: &BackendReport, phase: Phase) -> Option<&PhaseReport> {
    backend.phase(phase)
}

fn memory(b: &BackendReport) -> Option<f64> {
    b.mm_stat_after_fill.map(|m| m.mm.mem_used_total as f64)
}

fn write_cpu(b: &BackendReport) -> Option<f64> {
    phase_figure(b, Phase::Fill)?.drained_cpu_us_per_page
}

fn random_iops(b: &BackendReport) -> Option<f64> {
    phase_figure(b, Phase::RandRead).map(|p| p.iops)
}

fn random_p99(b: &BackendReport) -> Option<f64> {
    phase_figure(b, Phase::RandRead).map(|p| p.p99_us)
}

fn sequential_mib(b: &BackendReport) -> Option<f64> {
    phase_figure(b, Phase::SeqRead).map(|p| p.mib_per_second)
}

fn format_mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / f64::from(1 << 20))
}

fn format_us(us: f64) -> String {
    format!("{us:.2} µs")
}

fn format_p99(us: f64) -> String {
    format!("{us:.0} µs")
}

fn format_iops(iops: f64) -> String {
    if iops >= 1e3 {
        format!("{:.1}k", iops / 1e3)
    } else {
        format!("{iops:.0}")
    }
}

fn format_mib_per_second(mib: f64) -> String {
    format!("{mib:.0} MiB/s")
}

/// The KiB a request of `phase` moved in the run (the first backend that ran it).
fn request_kib(report: &Report, phase: Phase) -> Option<u64> {
    report
        .backends
        .iter()
        .find_map(|b| b.phase(phase))
        .map(|p| p.request_pages * 4)
}

/// The rows of the table, for the run's algorithm.
fn rows(report: &Report) -> Vec<Row> {
    let algorithm = &report.workload.algorithm;
    let fill_kib = request_kib(report, Phase::Fill).unwrap_or(0);
    let random_kib = request_kib(report, Phase::RandRead).unwrap_or(0);
    let sequential_kib = request_kib(report, Phase::SeqRead).unwrap_or(0);
    vec![
        Row {
            label: format!("memory after a {fill_kib} KiB fill, mem_used_total ({algorithm})"),
            figure: memory,
            format: format_mib,
            target: Target::AtMost(MEMORY_TARGET),
        },
        Row {
            label: format!("write CPU per page ({algorithm})"),
            figure: write_cpu,
            format: format_us,
            target: Target::AtMost(WRITE_CPU_TARGET),
        },
        Row {
            label: format!("random {random_kib} KiB read IOPS ({algorithm})"),
            figure: random_iops,
            format: format_iops,
            target: Target::AtLeast(RANDOM_READ_TARGET),
        },
        Row {
            label: format!("random {random_kib} KiB read p99 ({algorithm})"),
            figure: random_p99,
            format: format_p99,
            target: Target::None,
        },
        Row {
            label: format!("{sequential_kib} KiB sequential reads ({algorithm})"),
            figure: sequential_mib,
            format: format_mib_per_second,
            target: Target::AtLeast(SEQUENTIAL_READ_TARGET),
        },
    ]
}

/// Whether the column is a unit size (held to the targets).
fn is_unit_column(backend: &BackendReport) -> bool {
    matches!(backend.backend, BackendKind::VhostUserZramUnits(pages) if pages > 1)
}

/// `skipped` or `failed` for a column without figures, else `None`.
fn missing(backend: &BackendReport) -> Option<String> {
    if backend.skipped.is_some() {
        Some("skipped".into())
    } else if backend.error.is_some() && backend.phases.is_empty() {
        Some("failed".into())
    } else {
        None
    }
}

/// A cell of a figure row: the figure, its ratio to per-page, and the verdict of a unit column.
fn cell(row: &Row, backend: &BackendReport, per_page: Option<f64>) -> String {
    if let Some(why) = missing(backend) {
        return why;
    }
    let Some(value) = (row.figure)(backend) else {
        return if backend.error.is_some() {
            "failed".into()
        } else {
            "–".into()
        };
    };
    let mut text = (row.format)(value);
    let is_per_page = matches!(
        backend.backend,
        BackendKind::VhostUserZramUnits(1) | BackendKind::VhostUserZram
    );
    if let (false, Some(reference)) = (is_per_page, per_page.filter(|r| *r > 0.0)) {
        let ratio = value / reference;
        let _ = write!(text, " · {ratio:.2}×");
        if is_unit_column(backend) {
            if let Some(verdict) = row.target.verdict(ratio) {
                let _ = write!(text, " {verdict}");
            }
        }
    }
    text
}

/// Units stored and their member pages after the fill, for a unit column.
fn units_cell(backend: &BackendReport) -> String {
    if let Some(why) = missing(backend) {
        return why;
    }
    match backend.mm_stat_after_fill.and_then(|m| m.units) {
        Some(units) if is_unit_column(backend) => {
            format!("{} / {}", units.units_stored, units.unit_members)
        }
        _ => "–".into(),
    }
}

/// Read amplification (bytes decompressed per byte read from units) of the random and the
/// sequential reads, with the share of reads served from decoded units.
fn amplification_cell(backend: &BackendReport) -> String {
    if let Some(why) = missing(backend) {
        return why;
    }
    if !is_unit_column(backend) {
        return "–".into();
    }
    let one = |phase| {
        let reads = backend.phase(phase).and_then(|p| p.unit_reads);
        match reads.and_then(|r| r.amplification().map(|a| (a, r))) {
            Some((amplification, reads)) => {
                let pages_read = reads.read_bytes / vhost_user_zram::PAGE_SIZE as u64;
                let hits = 100.0 * reads.cache_hits as f64 / pages_read.max(1) as f64;
                format!("{amplification:.2}× ({hits:.0} % hits)")
            }
            None => "–".into(),
        }
    };
    format!("{} / {}", one(Phase::RandRead), one(Phase::SeqRead))
}

/// The data set in the header: the corpus or the swap-like mix.
fn data_set(report: &Report) -> String {
    match &report.workload.corpus {
        Some(corpus) => format!(
            "real memory ({})",
            corpus.split(':').next().unwrap_or(corpus)
        ),
        None => "swap-like mix".into(),
    }
}

/// The markdown table: a header, a figure row per measurement, then units stored and read
/// amplification; then one line per column that was skipped or failed.
pub fn render_markdown(report: &Report) -> String {
    let columns = columns(report);
    let mut out = String::new();
    let _ = write!(out, "| {} |", data_set(report));
    for column in &columns {
        let _ = write!(out, " {} |", header(column));
    }
    out.push('\n');
    out.push('|');
    out.push_str(&"---|".repeat(columns.len() + 1));
    out.push('\n');
    let per_page = columns.first().filter(|c| {
        matches!(
            c.backend,
            BackendKind::VhostUserZramUnits(1) | BackendKind::VhostUserZram
        )
    });
    for row in rows(report) {
        let reference = per_page.and_then(|p| (row.figure)(p));
        let _ = write!(out, "| {} |", row.label);
        for column in &columns {
            let _ = write!(out, " {} |", cell(&row, column, reference));
        }
        out.push('\n');
    }
    let algorithm = &report.workload.algorithm;
    let _ = write!(
        out,
        "| units stored / pages in units after the fill ({algorithm}) |"
    );
    for column in &columns {
        let _ = write!(out, " {} |", units_cell(column));
    }
    out.push('\n');
    let _ = write!(
        out,
        "| read amplification, random / sequential ({algorithm}) |"
    );
    for column in &columns {
        let _ = write!(out, " {} |", amplification_cell(column));
    }
    out.push('\n');
    for column in &columns {
        if let Some(why) = &column.skipped {
            let _ = writeln!(out, "- {} ({algorithm}) skipped: {why}", header(column));
        } else if let Some(error) = &column.error {
            let _ = writeln!(out, "- {} ({algorithm}) failed: {error}", header(column));
        }
    }
    out
}

/// The table under a heading in the plain-text output, when the run compared units.
pub fn render_text(report: &Report) -> String {
    let compared = report
        .backends
        .iter()
        .any(|b| matches!(b.backend, BackendKind::VhostUserZramUnits(pages) if pages > 1));
    if !compared {
        return String::new();
    }
    format!(
        "\n== multi-page units against per-page (ratios to per-page; write CPU: the daemon's \
         utime + stime from the fill's start until its workers drained, per page) ==\n{}",
        render_markdown(report)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::MemorySnapshot;
    use crate::report::{UnitReads, WorkloadDescription};
    use vhost_user_zram::store::{MmStat, UnitStats};

    fn phase(phase: Phase, iops: f64, request_pages: u64) -> PhaseReport {
        PhaseReport {
            phase,
            requests: 100,
            reads: 0,
            verified_reads: 0,
            seconds: 1.0,
            iops,
            mib_per_second: iops * request_pages as f64 * 4096.0 / 1048576.0,
            request_pages,
            p50_us: 10.0,
            p99_us: 100.0,
            p999_us: 200.0,
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

    /// A backend with memory `mib`, write CPU `cpu` µs/page, random-read IOPS `random`,
    /// sequential-read IOPS `sequential`.
    fn backend(
        kind: BackendKind,
        mib: u64,
        cpu: f64,
        random: f64,
        sequential: f64,
    ) -> BackendReport {
        let mut b = BackendReport::new(kind, None);
        let mut fill = phase(Phase::Fill, 1000.0, 16);
        fill.drained_cpu_us_per_page = (kind != BackendKind::KernelZram).then_some(cpu);
        let mut randread = phase(Phase::RandRead, random, 1);
        let mut seqread = phase(Phase::SeqRead, sequential, 8);
        let units = matches!(kind, BackendKind::VhostUserZramUnits(pages) if pages > 1);
        if units {
            randread.unit_reads = Some(UnitReads {
                read_bytes: 4096 * 100,
                decompressed_bytes: 4096 * 400,
                cache_hits: 10,
            });
            seqread.unit_reads = Some(UnitReads {
                read_bytes: 4096 * 100,
                decompressed_bytes: 4096 * 100,
                cache_hits: 75,
            });
        }
        b.phases = vec![fill, randread, seqread];
        b.mm_stat_after_fill = Some(MemorySnapshot {
            mm: MmStat {
                mem_used_total: mib << 20,
                ..Default::default()
            },
            slot_table_bytes: None,
            units: units.then_some(UnitStats {
                unit_max_bytes: 16384,
                units_stored: 10,
                unit_members: 40,
                ..Default::default()
            }),
        });
        b
    }

    fn report(backends: Vec<BackendReport>) -> Report {
        Report {
            workload: WorkloadDescription {
                size_bytes: 1 << 30,
                pages: 1 << 18,
                queues: 1,
                queue_depth: 32,
                queue_size: 256,
                block_size: 65536,
                seconds_per_phase: 1.0,
                rounds: 1,
                seed: 1,
                pool_pages: 16,
                corpus: Some("/work/corpus/real.corpus: 1000 pages".into()),
                algorithm: "zstd".into(),
                algorithm_level: None,
                verify: true,
                compare_poll_max_us: None,
            },
            codec_floor: None,
            codec_floor_error: None,
            backends,
            migration: None,
        }
    }

    fn row<'a>(table: &'a str, start: &str) -> Vec<&'a str> {
        let line = table
            .lines()
            .find(|l| l.starts_with(&format!("| {start}")))
            .unwrap_or_else(|| panic!("no row '{start}' in\n{table}"));
        line.trim_matches('|').split(" | ").map(str::trim).collect()
    }

    #[test]
    fn units_are_held_to_the_targets_against_per_page_of_the_same_algorithm() {
        let table = render_markdown(&report(vec![
            backend(
                BackendKind::VhostUserZramUnits(1),
                100,
                4.0,
                10_000.0,
                1_000.0,
            ),
            backend(
                BackendKind::VhostUserZramUnits(4),
                80,
                2.0,
                8_000.0,
                1_200.0,
            ),
            backend(BackendKind::VhostUserZramUnits(16), 90, 3.0, 6_000.0, 900.0),
            backend(BackendKind::KernelZram, 120, 0.0, 5_000.0, 500.0),
        ]));
        let header = row(&table, "real memory");
        assert_eq!(
            header,
            [
                "real memory (/work/corpus/real.corpus)",
                "per-page",
                "units 16K",
                "units 64K",
                "kernel zram"
            ]
        );
        let memory = row(&table, "memory after a 64 KiB fill");
        assert_eq!(memory[1], "100.0 MiB");
        assert_eq!(memory[2], "80.0 MiB · 0.80× met (≤ 0.85×)");
        assert_eq!(memory[3], "90.0 MiB · 0.90× missed (≤ 0.85×)");
        assert_eq!(
            memory[4], "120.0 MiB · 1.20×",
            "kernel zram: a ratio, no target"
        );
        let cpu = row(&table, "write CPU per page (zstd)");
        assert_eq!(cpu[2], "2.00 µs · 0.50× met (≤ 0.70×)");
        assert_eq!(cpu[4], "–", "kernel zram compresses in the bench's context");
        let random = row(&table, "random 4 KiB read IOPS");
        assert_eq!(random[2], "8.0k · 0.80× met (≥ 0.70×)");
        assert_eq!(random[3], "6.0k · 0.60× missed (≥ 0.70×)");
        let sequential = row(&table, "32 KiB sequential reads");
        assert!(
            sequential[2].ends_with("1.20× met (≥ 1.00×)"),
            "{sequential:?}"
        );
        assert!(
            sequential[3].ends_with("0.90× missed (≥ 1.00×)"),
            "{sequential:?}"
        );
        assert_eq!(row(&table, "units stored")[2], "10 / 40");
        assert_eq!(row(&table, "units stored")[1], "–");
        assert_eq!(
            row(&table, "read amplification")[2],
            "4.00× (10 % hits) / 1.00× (75 % hits)"
        );
    }

    #[test]
    fn a_daemon_without_units_leaves_per_page_and_kernel_zram_and_says_why() {
        let skipped = BackendReport::skipped(
            BackendKind::VhostUserZramUnits(4),
            "vhost-user-zram has no --unit-max".into(),
        );
        let table = render_markdown(&report(vec![
            backend(BackendKind::VhostUserZram, 100, 4.0, 10_000.0, 1_000.0),
            skipped,
            backend(BackendKind::KernelZram, 120, 0.0, 5_000.0, 500.0),
        ]));
        let memory = row(&table, "memory after");
        assert_eq!(memory[1..], ["100.0 MiB", "skipped", "120.0 MiB · 1.20×"]);
        assert!(
            table.contains("- units 16K (zstd) skipped: vhost-user-zram has no --unit-max"),
            "{table}"
        );
    }

    #[test]
    fn the_text_output_has_the_table_only_when_units_were_compared() {
        let plain = report(vec![backend(BackendKind::VhostUserZram, 1, 1.0, 1.0, 1.0)]);
        assert_eq!(render_text(&plain), "");
    }
}
