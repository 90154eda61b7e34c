// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The bench's results: serializable as JSON, and rendered as plain-text tables — one per
//! backend, and with several backends a side-by-side comparison.

use std::fmt::Write as _;

use crate::backends::{BackendKind, MmStat};
use crate::workload::{Phase, PhaseResult};

/// Everything one run measured.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    /// The workload.
    pub workload: WorkloadDescription,
    /// One entry per backend, in the order they ran.
    pub backends: Vec<BackendReport>,
}

/// The workload's parameters.
#[derive(Debug, serde::Serialize)]
pub struct WorkloadDescription {
    /// Device size.
    pub size_bytes: u64,
    /// Device size in 4 KiB pages.
    pub pages: u64,
    /// Queues.
    pub queues: u32,
    /// Requests in flight per queue.
    pub queue_depth: u32,
    /// Virtqueue size.
    pub queue_size: u32,
    /// Request size.
    pub block_size: usize,
    /// Length of each timed phase.
    pub seconds_per_phase: f64,
    /// Page generator seed.
    pub seed: u64,
    /// Distinct pages the contents are drawn from.
    pub pool_pages: u32,
    /// Compression algorithm.
    pub algorithm: String,
    /// Compression level given to vhost-user-zram.
    pub algorithm_level: Option<i32>,
    /// Whether reads were verified.
    pub verify: bool,
}

/// One backend's results.
#[derive(Debug, serde::Serialize)]
pub struct BackendReport {
    /// The backend.
    pub backend: BackendKind,
    /// The kernel device used, for kernel zram.
    pub device: Option<String>,
    /// Why the backend did not run, when it was skipped.
    pub skipped: Option<String>,
    /// What went wrong, when it failed.
    pub error: Option<String>,
    /// Remarks.
    pub notes: Vec<String>,
    /// Per-phase results.
    pub phases: Vec<PhaseReport>,
    /// zram statistics right after the fill.
    pub mm_stat_after_fill: Option<MmStat>,
    /// zram statistics after the last phase.
    pub mm_stat_at_end: Option<MmStat>,
}

/// One phase's results.
#[derive(Debug, serde::Serialize)]
pub struct PhaseReport {
    /// The phase.
    pub phase: Phase,
    /// Requests completed.
    pub requests: u64,
    /// Reads among them.
    pub reads: u64,
    /// Reads whose data was verified.
    pub verified_reads: u64,
    /// Elapsed seconds.
    pub seconds: f64,
    /// Requests per second.
    pub iops: f64,
    /// Payload MB/s (10^6 bytes).
    pub megabytes_per_second: f64,
    /// Median latency in microseconds.
    pub p50_us: f64,
    /// 99th-percentile latency in microseconds.
    pub p99_us: f64,
}

impl From<&PhaseResult> for PhaseReport {
    fn from(result: &PhaseResult) -> Self {
        PhaseReport {
            phase: result.phase,
            requests: result.requests,
            reads: result.reads,
            verified_reads: result.verified_reads,
            seconds: result.elapsed.as_secs_f64(),
            iops: result.iops(),
            megabytes_per_second: result.megabytes_per_second(),
            p50_us: result.latency.percentile(50.0).as_secs_f64() * 1e6,
            p99_us: result.latency.percentile(99.0).as_secs_f64() * 1e6,
        }
    }
}

impl BackendReport {
    /// An empty report for a backend about to run.
    pub fn new(backend: BackendKind, device: Option<String>) -> Self {
        BackendReport {
            backend,
            device,
            skipped: None,
            error: None,
            notes: Vec::new(),
            phases: Vec::new(),
            mm_stat_after_fill: None,
            mm_stat_at_end: None,
        }
    }

    /// A backend that was not run, and why.
    pub fn skipped(backend: BackendKind, why: String) -> Self {
        BackendReport {
            skipped: Some(why),
            ..BackendReport::new(backend, None)
        }
    }

    /// A backend that could not be started.
    pub fn failed(backend: BackendKind, error: String) -> Self {
        BackendReport {
            error: Some(error),
            ..BackendReport::new(backend, None)
        }
    }

    /// One line for stderr when the backend is done.
    pub fn progress_line(&self) -> String {
        match (&self.skipped, &self.error) {
            (Some(why), _) => format!("{}: skipped: {why}", self.backend.label()),
            (_, Some(error)) => format!("{}: FAILED: {error}", self.backend.label()),
            _ => format!("{}: done", self.backend.label()),
        }
    }

    fn phase(&self, phase: Phase) -> Option<&PhaseReport> {
        self.phases.iter().find(|p| p.phase == phase)
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

fn iops(value: f64) -> String {
    if value >= 1e6 {
        format!("{:.2}M", value / 1e6)
    } else if value >= 1e3 {
        format!("{:.1}k", value / 1e3)
    } else {
        format!("{value:.0}")
    }
}

fn mm_stat_line(mm: &MmStat) -> String {
    let ratio = if mm.compr_data_size > 0 {
        format!(
            "{:.2}",
            (mm.orig_data_size as f64) / (mm.mem_used_total.max(1) as f64)
        )
    } else {
        "-".into()
    };
    format!(
        "orig_data_size {}, compr_data_size {}, mem_used_total {}, same_pages {}, huge_pages {}, pages_compacted {} (orig/mem_used {ratio})",
        mib(mm.orig_data_size),
        mib(mm.compr_data_size),
        mib(mm.mem_used_total),
        mm.same_pages,
        mm.huge_pages,
        mm.pages_compacted,
    )
}

impl Report {
    /// The plain-text tables.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let w = &self.workload;
        let _ = writeln!(
            out,
            "workload: {} device ({} pages), 4 KiB requests, {} queue(s) x depth {}, {} s per timed phase, swap-like pages (seed {}, pool of {}), algorithm {}{}{}",
            mib(w.size_bytes),
            w.pages,
            w.queues,
            w.queue_depth,
            w.seconds_per_phase,
            w.seed,
            w.pool_pages,
            w.algorithm,
            w.algorithm_level.map(|l| format!(" level {l}")).unwrap_or_default(),
            if w.verify { ", reads verified" } else { "" },
        );
        for backend in &self.backends {
            let device = backend
                .device
                .as_ref()
                .map(|d| format!(" ({d})"))
                .unwrap_or_default();
            let _ = writeln!(out, "\n== {}{device} ==", backend.backend.label());
            if let Some(why) = &backend.skipped {
                let _ = writeln!(out, "skipped: {why}");
                continue;
            }
            if !backend.phases.is_empty() {
                let _ = writeln!(
                    out,
                    "{:<15} {:>10} {:>9} {:>9} {:>9} {:>10} {:>8}",
                    "phase", "IOPS", "MB/s", "p50 us", "p99 us", "requests", "verified"
                );
                for p in &backend.phases {
                    let _ = writeln!(
                        out,
                        "{:<15} {:>10} {:>9.1} {:>9.1} {:>9.1} {:>10} {:>8}",
                        p.phase.name(),
                        iops(p.iops),
                        p.megabytes_per_second,
                        p.p50_us,
                        p.p99_us,
                        p.requests,
                        p.verified_reads
                    );
                }
            }
            if let Some(mm) = &backend.mm_stat_after_fill {
                let _ = writeln!(out, "mm_stat after fill: {}", mm_stat_line(mm));
            }
            if let Some(mm) = &backend.mm_stat_at_end {
                let _ = writeln!(out, "mm_stat at end:     {}", mm_stat_line(mm));
            }
            for note in &backend.notes {
                let _ = writeln!(out, "note: {note}");
            }
            if let Some(error) = &backend.error {
                let _ = writeln!(out, "FAILED: {error}");
            }
        }
        if self.backends.len() > 1 {
            out.push_str(&self.render_comparison());
        }
        out
    }

    fn render_comparison(&self) -> String {
        let mut out = String::new();
        let find = |kind| self.backends.iter().find(|b| b.backend == kind);
        let ours = find(BackendKind::VhostUserZram).or_else(|| find(BackendKind::External));
        let kernel = find(BackendKind::KernelZram);
        let kernel_note = kernel.and_then(|k| k.skipped.clone().or(k.error.clone()));
        let _ = writeln!(
            out,
            "\n== comparison (IOPS; ratio = vhost-user-zram / kernel-zram) =="
        );
        let mut header = format!("{:<18}", "phase");
        for backend in &self.backends {
            let _ = write!(header, " {:>16}", backend.backend.label());
        }
        let _ = write!(header, " {:>10}", "ratio");
        let _ = writeln!(out, "{header}");
        let phases: Vec<Phase> = Phase::ALL
            .into_iter()
            .filter(|&phase| self.backends.iter().any(|b| b.phase(phase).is_some()))
            .collect();
        let cell = |backend: &BackendReport, phase| -> String {
            match (backend.phase(phase), &backend.skipped, &backend.error) {
                (Some(p), _, _) => iops(p.iops),
                (None, Some(_), _) => "n/a".into(),
                (None, _, Some(_)) => "failed".into(),
                _ => "-".into(),
            }
        };
        for &phase in &phases {
            let mut line = format!("{:<18}", phase.name());
            for backend in &self.backends {
                let _ = write!(line, " {:>16}", cell(backend, phase));
            }
            let ratio = match (
                ours.and_then(|b| b.phase(phase)),
                kernel.and_then(|b| b.phase(phase)),
            ) {
                (Some(a), Some(b)) if b.iops > 0.0 => format!("{:.2}x", a.iops / b.iops),
                _ => "n/a".into(),
            };
            let _ = writeln!(out, "{line} {ratio:>10}");
        }
        let mem = |b: Option<&BackendReport>| {
            b.and_then(|b| b.mm_stat_after_fill)
                .map(|m| m.mem_used_total)
        };
        let mut line = format!("{:<18}", "mem_used (fill)");
        for backend in &self.backends {
            let text = match backend.mm_stat_after_fill {
                Some(mm) => mib(mm.mem_used_total),
                None if backend.skipped.is_some() => "n/a".into(),
                None => "-".into(),
            };
            let _ = write!(line, " {text:>16}");
        }
        let ratio = match (mem(ours), mem(kernel)) {
            (Some(a), Some(b)) if b > 0 => format!("{:.2}x", a as f64 / b as f64),
            _ => "n/a".into(),
        };
        let _ = writeln!(out, "{line} {ratio:>10}");
        if let Some(why) = kernel_note {
            let _ = writeln!(out, "kernel-zram: {why}");
        }
        out
    }
}
