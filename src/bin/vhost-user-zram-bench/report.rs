// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The bench's results: serializable as JSON, and rendered as plain-text tables — one per
//! backend, and with several backends a side-by-side comparison.

use std::fmt::Write as _;

use vhost_user_zram::store::UnitStats;

use crate::backends::{BackendKind, MemorySnapshot};
use crate::codec_floor::CodecFloor;
use crate::workload::{Phase, PhaseResult};

/// Everything one run measured.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    /// The workload.
    pub workload: WorkloadDescription,
    /// The codec floor: the run's algorithm on the workload's pages, in this process.
    pub codec_floor: Option<CodecFloor>,
    /// Why the codec floor was not measured, when it was not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub codec_floor_error: Option<String>,
    /// One entry per backend, in the order they ran.
    pub backends: Vec<BackendReport>,
    /// The live-migration benchmark (`--migrate`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration: Option<crate::migrate::MigrateReport>,
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
    /// Rounds over all backends; each phase reports its median round.
    pub rounds: u32,
    /// Page generator seed.
    pub seed: u64,
    /// Distinct pages the contents are drawn from.
    pub pool_pages: u32,
    /// The corpus of real memory written instead of the swap-like mix (`--corpus`): its
    /// file, pages and sources.
    pub corpus: Option<String>,
    /// Compression algorithm.
    pub algorithm: String,
    /// Compression level given to vhost-user-zram.
    pub algorithm_level: Option<i32>,
    /// Whether reads were verified.
    pub verify: bool,
    /// The polling window of the `vuz --poll N` backend in `--compare` (`--compare-poll-us`);
    /// `None` when it did not run.
    pub compare_poll_max_us: Option<u32>,
}

/// One backend's results.
#[derive(Debug, Clone, serde::Serialize)]
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
    /// Per-phase results (with several rounds: the round with the median IOPS).
    pub phases: Vec<PhaseReport>,
    /// Each phase's IOPS in every round, in round order.
    pub iops_by_round: Vec<(Phase, Vec<f64>)>,
    /// zram statistics right after the fill.
    pub mm_stat_after_fill: Option<MemorySnapshot>,
    /// zram statistics after the last phase.
    pub mm_stat_at_end: Option<MemorySnapshot>,
    /// The crash-and-restart measurement, for vhost-user-zram with a state file.
    pub restart: Option<RestartReport>,
}

/// vhost-user-zram with a state file, killed with SIGKILL after the last phase and started
/// again on the same state file and socket; the bench reconnects from the same process.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestartReport {
    /// Pages the store held when it was killed (orig_data_size / 4 KiB at the end).
    pub pages_at_kill: Option<u64>,
    /// Spawn of the new daemon to its socket accepting a connection, in milliseconds.
    pub socket_accepting_ms: f64,
    /// Spawn of the new daemon to the first read served with the data last written (a new
    /// libblkio instance connected, started, one page read and checked), in milliseconds.
    pub first_read_ms: f64,
    /// Random written pages read back after the restart.
    pub sample_pages: u64,
    /// Of those, pages holding what was last written.
    pub verified_pages: u64,
    /// How long reading the sample took, in milliseconds.
    pub sample_ms: f64,
    /// The pages the new daemon's log says it recovered.
    pub recovered_pages: Option<u64>,
    /// The recovery scan's time, from the new daemon's log, in milliseconds.
    pub recovery_ms: Option<f64>,
    /// The new daemon's memory figures once the sample was read.
    pub mm_stat_after_restart: Option<MemorySnapshot>,
}

/// One phase's results.
#[derive(Debug, Clone, serde::Serialize)]
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
    /// Payload MiB/s (2^20 bytes, the unit of every byte figure the bench prints).
    pub mib_per_second: f64,
    /// Pages a request of the phase moves (its reads' for a phase that only reads).
    pub request_pages: u64,
    /// Median latency in microseconds.
    pub p50_us: f64,
    /// 99th-percentile latency in microseconds.
    pub p99_us: f64,
    /// 99.9th-percentile latency in microseconds.
    pub p999_us: f64,
    /// CPU time the backend's process (every thread) used during the phase, in seconds; `None`
    /// for a backend that is not a process the bench launched (kernel zram, `--socket`).
    pub daemon_cpu_seconds: Option<f64>,
    /// `daemon_cpu_seconds` per request, in microseconds.
    pub daemon_cpu_us_per_request: Option<f64>,
    /// CPU per request of the daemon's queue threads, in microseconds.
    pub queue_cpu_us_per_request: Option<f64>,
    /// CPU per request of the daemon's compression workers, in microseconds.
    pub worker_cpu_us_per_request: Option<f64>,
    /// The codec floor of one request of this phase, in microseconds (vhost-user-zram
    /// backends): compression for writes, decompression for reads, 70/30 for mixed.
    pub codec_floor_us_per_request: Option<f64>,
    /// `daemon_cpu_us_per_request` minus `codec_floor_us_per_request`: what the daemon spends
    /// on a request besides the codec.
    pub cpu_us_above_floor: Option<f64>,
    /// The fill: the daemon's CPU time (every thread) from the phase's start until its
    /// compression workers drained, per page written, in microseconds: what storing a page
    /// costs, wherever and whenever the daemon compresses it.
    pub drained_cpu_us_per_page: Option<f64>,
    /// What vhost-user-zram's unit counters moved by during the phase (a daemon with units).
    pub unit_reads: Option<UnitReads>,
}

/// Reads from members of multi-page units during one phase: `ctl stats --json`'s `units`
/// counters after the phase less before it.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct UnitReads {
    /// Bytes read from members of units.
    pub read_bytes: u64,
    /// Bytes decompressed to serve them.
    pub decompressed_bytes: u64,
    /// Reads served from a reading thread's decoded units.
    pub cache_hits: u64,
}

impl UnitReads {
    /// The counters' growth from `before` to `after`.
    pub fn between(before: &UnitStats, after: &UnitStats) -> UnitReads {
        UnitReads {
            read_bytes: after.read_bytes.saturating_sub(before.read_bytes),
            decompressed_bytes: after
                .decompressed_bytes
                .saturating_sub(before.decompressed_bytes),
            cache_hits: after.cache_hits.saturating_sub(before.cache_hits),
        }
    }

    /// Bytes decompressed per byte read; `None` when nothing was read from units.
    pub fn amplification(&self) -> Option<f64> {
        (self.read_bytes > 0).then(|| self.decompressed_bytes as f64 / self.read_bytes as f64)
    }
}

impl PhaseReport {
    /// Records the CPU time the backend's process used during the phase.
    pub fn set_daemon_cpu(&mut self, spent: std::time::Duration) {
        let seconds = spent.as_secs_f64();
        self.daemon_cpu_seconds = Some(seconds);
        self.daemon_cpu_us_per_request =
            (self.requests > 0).then(|| seconds * 1e6 / self.requests as f64);
    }

    /// Records the CPU time the daemon's queue threads and workers used during the phase.
    pub fn set_thread_cpu(&mut self, spent: crate::backends::ThreadCpu) {
        let per_request = |d: std::time::Duration| {
            (self.requests > 0).then(|| d.as_secs_f64() * 1e6 / self.requests as f64)
        };
        self.queue_cpu_us_per_request = per_request(spent.queue);
        self.worker_cpu_us_per_request = per_request(spent.worker);
    }

    /// Records the codec floor of one request of this phase, and the CPU above it when the
    /// daemon's CPU was measured.
    pub fn set_codec_floor(&mut self, floor: &CodecFloor, pages_per_request: u64) {
        let floor_us = floor.us_per_request(self.phase, pages_per_request);
        self.codec_floor_us_per_request = Some(floor_us);
        self.cpu_us_above_floor = self.daemon_cpu_us_per_request.map(|cpu| cpu - floor_us);
    }
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
            mib_per_second: result.mib_per_second(),
            request_pages: result.request_pages,
            p50_us: result.latency.percentile(50.0).as_secs_f64() * 1e6,
            p99_us: result.latency.percentile(99.0).as_secs_f64() * 1e6,
            p999_us: result.latency.percentile(99.9).as_secs_f64() * 1e6,
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
            iops_by_round: Vec::new(),
            mm_stat_after_fill: None,
            mm_stat_at_end: None,
            restart: None,
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

    /// Merges one backend's rounds: each phase from its median round, memory from the first
    /// round that has it, every note and the first error.
    pub fn median_of(rounds: Vec<&BackendReport>) -> BackendReport {
        let first = rounds[0];
        let mut merged = BackendReport {
            phases: Vec::new(),
            notes: Vec::new(),
            ..first.clone()
        };
        merged.error = rounds.iter().find_map(|r| r.error.clone());
        merged.mm_stat_after_fill = rounds.iter().find_map(|r| r.mm_stat_after_fill);
        merged.mm_stat_at_end = rounds.iter().find_map(|r| r.mm_stat_at_end);
        merged.restart = rounds.iter().find_map(|r| r.restart.clone());
        for round in &rounds {
            for note in &round.notes {
                if !merged.notes.contains(note) {
                    merged.notes.push(note.clone());
                }
            }
        }
        for phase in Phase::ALL {
            let mut runs: Vec<&PhaseReport> =
                rounds.iter().filter_map(|r| r.phase(phase)).collect();
            if runs.is_empty() {
                continue;
            }
            merged
                .iops_by_round
                .push((phase, runs.iter().map(|p| p.iops).collect()));
            runs.sort_by(|a, b| a.iops.total_cmp(&b.iops));
            merged.phases.push(runs[runs.len() / 2].clone());
        }
        merged
    }

    /// One line for stderr when the backend is done.
    pub fn progress_line(&self) -> String {
        match (&self.skipped, &self.error) {
            (Some(why), _) => format!("{}: skipped: {why}", self.backend.label()),
            (_, Some(error)) => format!("{}: FAILED: {error}", self.backend.label()),
            _ => format!("{}: done", self.backend.label()),
        }
    }

    pub(crate) fn phase(&self, phase: Phase) -> Option<&PhaseReport> {
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

/// The restart figures, a few lines.
fn restart_lines(restart: &RestartReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "restart after SIGKILL{}: socket accepting {:.1} ms after the spawn, first read served \
         and verified {:.1} ms after the spawn",
        restart
            .pages_at_kill
            .map(|pages| format!(" ({pages} pages stored)"))
            .unwrap_or_default(),
        restart.socket_accepting_ms,
        restart.first_read_ms
    );
    let _ = writeln!(
        out,
        "restart: {} of {} sampled pages verified (read in {:.1} ms); daemon log: {}",
        restart.verified_pages,
        restart.sample_pages,
        restart.sample_ms,
        match (restart.recovered_pages, restart.recovery_ms) {
            (Some(pages), Some(ms)) => format!("recovered {pages} pages in {ms:.1} ms"),
            _ => "no recovery line".into(),
        }
    );
    if let Some(mm) = &restart.mm_stat_after_restart {
        let _ = writeln!(out, "mm_stat after restart: {}", mm_stat_line(mm));
    }
    out
}

fn mm_stat_line(snapshot: &MemorySnapshot) -> String {
    let mm = &snapshot.mm;
    let ratio = if mm.compr_data_size > 0 {
        format!(
            "{:.2}",
            (mm.orig_data_size as f64) / (mm.mem_used_total.max(1) as f64)
        )
    } else {
        "-".into()
    };
    format!(
        "orig_data_size {}, compr_data_size {}, mem_used_total {}{}, same_pages {}, huge_pages {}, pages_compacted {} (orig/mem_used {ratio})",
        mib(mm.orig_data_size),
        mib(mm.compr_data_size),
        mib(mm.mem_used_total),
        snapshot
            .slot_table_bytes
            .map(|table| format!(" (slot table {})", mib(table)))
            .unwrap_or_default(),
        mm.same_pages,
        mm.huge_pages,
        mm.pages_compacted,
    )
}

/// The daemon's CPU time per request, or `-` when the backend is not a process the bench
/// launched.
fn cpu_per_request(phase: &PhaseReport) -> String {
    micros_or_dash(phase.daemon_cpu_us_per_request)
}

/// A figure in µs with two decimals, or `-` when it was not measured.
fn micros_or_dash(us: Option<f64>) -> String {
    us.map_or_else(|| "-".into(), |us| format!("{us:.2}"))
}

/// Quotes a CSV field when it needs it (RFC 4180).
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

/// The CSV header; units are in the column names.
pub const CSV_HEADER: &str = "backend,device,status,phase,iops,mib_per_second,p50_us,p99_us,p999_us,requests,reads,verified_reads,seconds,daemon_cpu_seconds,daemon_cpu_us_per_request,queue_cpu_us_per_request,worker_cpu_us_per_request,codec_floor_compress_us_per_page,codec_floor_decompress_us_per_page,codec_floor_us_per_request,cpu_us_above_floor,message";

impl Report {
    /// Puts the codec floor of each phase, and the CPU above it, into the phases of every
    /// vhost-user-zram backend the bench launched (requests of each phase's `request_pages`).
    pub fn apply_codec_floor(&mut self) {
        let Some(floor) = &self.codec_floor else {
            return;
        };
        for backend in &mut self.backends {
            if backend.backend.runs_the_codec() {
                for phase in &mut backend.phases {
                    let pages = phase.request_pages;
                    phase.set_codec_floor(floor, pages);
                }
            }
        }
    }

    /// One CSV row per backend and phase; a backend that was skipped or failed before any phase
    /// gets one row with its status and the reason.
    pub fn render_csv(&self) -> String {
        let mut out = String::from(CSV_HEADER);
        out.push('\n');
        let two_decimals = |us: Option<f64>| us.map(|us| format!("{us:.2}")).unwrap_or_default();
        let floor = format!(
            "{},{}",
            two_decimals(self.codec_floor.as_ref().map(|f| f.compress_us_per_page)),
            two_decimals(self.codec_floor.as_ref().map(|f| f.decompress_us_per_page)),
        );
        for backend in &self.backends {
            let device = backend.device.as_deref().unwrap_or("");
            let (status, message) = match (&backend.skipped, &backend.error) {
                (Some(why), _) => ("skipped", why.as_str()),
                (None, Some(error)) => ("failed", error.as_str()),
                (None, None) => ("ok", ""),
            };
            let head = format!(
                "{},{}",
                csv_field(&backend.backend.label()),
                csv_field(device)
            );
            if backend.phases.is_empty() {
                let _ = writeln!(
                    out,
                    "{head},{status},,,,,,,,,,,,,,,{floor},,,{}",
                    csv_field(message)
                );
            }
            for p in &backend.phases {
                let _ = writeln!(
                    out,
                    "{head},{status},{},{:.0},{:.2},{:.1},{:.1},{:.1},{},{},{},{:.3},{},{},{},{},{floor},{},{},{}",
                    p.phase.name(),
                    p.iops,
                    p.mib_per_second,
                    p.p50_us,
                    p.p99_us,
                    p.p999_us,
                    p.requests,
                    p.reads,
                    p.verified_reads,
                    p.seconds,
                    p.daemon_cpu_seconds
                        .map(|s| format!("{s:.3}"))
                        .unwrap_or_default(),
                    p.daemon_cpu_us_per_request
                        .map(|us| format!("{us:.2}"))
                        .unwrap_or_default(),
                    p.queue_cpu_us_per_request
                        .map(|us| format!("{us:.2}"))
                        .unwrap_or_default(),
                    p.worker_cpu_us_per_request
                        .map(|us| format!("{us:.2}"))
                        .unwrap_or_default(),
                    two_decimals(p.codec_floor_us_per_request),
                    two_decimals(p.cpu_us_above_floor),
                    csv_field(message)
                );
            }
        }
        out
    }

    /// The plain-text tables.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let w = &self.workload;
        let _ = writeln!(
            out,
            "workload: {} device ({} pages), {} KiB requests, {} queue(s) x depth {}, {} s per timed phase, {}, algorithm {}{}{}{}",
            mib(w.size_bytes),
            w.pages,
            w.block_size / 1024,
            w.queues,
            w.queue_depth,
            w.seconds_per_phase,
            match &w.corpus {
                Some(corpus) => format!("real memory in order (corpus {corpus})"),
                None => format!("swap-like pages (seed {}, pool of {})", w.seed, w.pool_pages),
            },
            w.algorithm,
            w.algorithm_level.map(|l| format!(" level {l}")).unwrap_or_default(),
            if w.verify { ", reads verified" } else { "" },
            if w.rounds > 1 {
                format!(", median of {} rounds", w.rounds)
            } else {
                String::new()
            },
        );
        match (&self.codec_floor, &self.codec_floor_error) {
            (Some(floor), _) => {
                let _ = writeln!(out, "{}", floor.line());
                let _ = writeln!(
                    out,
                    "(over floor: the daemon's CPU µs/req less the codec floor of a request: \
                     compression for writes, decompression for random reads, 70/30 for mixed)"
                );
            }
            (None, Some(why)) => {
                let _ = writeln!(out, "codec floor: not measured: {why}");
            }
            (None, None) => {}
        }
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
                    "{:<15} {:>10} {:>9} {:>9} {:>9} {:>9} {:>10} {:>8} {:>12} {:>9} {:>9} {:>11}",
                    "phase",
                    "IOPS",
                    "MiB/s",
                    "p50 µs",
                    "p99 µs",
                    "p99.9 µs",
                    "requests",
                    "verified",
                    "CPU µs/req",
                    "queue µs",
                    "worker µs",
                    "over floor"
                );
                for p in &backend.phases {
                    let _ = writeln!(
                        out,
                        "{:<15} {:>10} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10} {:>8} {:>12} {:>9} {:>9} {:>11}",
                        p.phase.name(),
                        iops(p.iops),
                        p.mib_per_second,
                        p.p50_us,
                        p.p99_us,
                        p.p999_us,
                        p.requests,
                        p.verified_reads,
                        cpu_per_request(p),
                        micros_or_dash(p.queue_cpu_us_per_request),
                        micros_or_dash(p.worker_cpu_us_per_request),
                        micros_or_dash(p.cpu_us_above_floor)
                    );
                }
            }
            if w.rounds > 1 {
                for (phase, iops_list) in &backend.iops_by_round {
                    let list: Vec<String> = iops_list.iter().map(|&v| iops(v)).collect();
                    let _ = writeln!(
                        out,
                        "{:<15} IOPS by round: {}",
                        phase.name(),
                        list.join(" ")
                    );
                }
            }
            if let Some(mm) = &backend.mm_stat_after_fill {
                let _ = writeln!(out, "mm_stat after fill: {}", mm_stat_line(mm));
            }
            if let Some(mm) = &backend.mm_stat_at_end {
                let _ = writeln!(out, "mm_stat at end:     {}", mm_stat_line(mm));
            }
            if let Some(restart) = &backend.restart {
                out.push_str(&restart_lines(restart));
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
            out.push_str(&self.render_state_comparison());
            out.push_str(&crate::pressure::render(self));
            out.push_str(&crate::units::render_text(self));
        }
        if let Some(migration) = &self.migration {
            out.push_str(&crate::migrate::render(migration));
        }
        out
    }

    /// vhost-user-zram with its store in a state file on /dev/shm against the same daemon with
    /// anonymous memory: IOPS per phase and their ratio, memory, and the restart figures.
    fn render_state_comparison(&self) -> String {
        let find = |kind| self.backends.iter().find(|b| b.backend == kind);
        let (Some(anonymous), Some(state)) = (
            find(BackendKind::VhostUserZram),
            find(BackendKind::VhostUserZramState),
        ) else {
            return String::new();
        };
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\n== state file (--state on /dev/shm) against anonymous memory =="
        );
        let _ = writeln!(
            out,
            "{:<18} {:>16} {:>16} {:>12} {:>10}",
            "phase", "anonymous", "state", "ratio", ">= 0.95"
        );
        for phase in self.phases_run() {
            let (Some(a), Some(s)) = (anonymous.phase(phase), state.phase(phase)) else {
                continue;
            };
            let (ratio, verdict) = if a.iops > 0.0 {
                let ratio = s.iops / a.iops;
                (
                    format!("{ratio:.3}x"),
                    if ratio >= 0.95 { "met" } else { "missed" },
                )
            } else {
                ("n/a".into(), "n/a")
            };
            let _ = writeln!(
                out,
                "{:<18} {:>16} {:>16} {ratio:>12} {verdict:>10}",
                phase.name(),
                iops(a.iops),
                iops(s.iops)
            );
        }
        let memory = |label: &str, of: &dyn Fn(&BackendReport) -> Option<MemorySnapshot>| {
            let (a, s) = (of(anonymous), of(state));
            let text =
                |m: Option<MemorySnapshot>| m.map_or("-".into(), |m| mib(m.mm.mem_used_total));
            let verdict = match (a, s) {
                (Some(a), Some(s)) if a.mm.mem_used_total == s.mm.mem_used_total => {
                    "equal".to_owned()
                }
                (Some(a), Some(s)) => {
                    let difference = s.mm.mem_used_total as f64 - a.mm.mem_used_total as f64;
                    format!(
                        "{difference:+.0} B ({:+.2} %)",
                        difference * 100.0 / (a.mm.mem_used_total.max(1) as f64)
                    )
                }
                _ => "n/a".into(),
            };
            format!(
                "{label:<18} {:>16} {:>16} {:>12}\n",
                text(a),
                text(s),
                verdict
            )
        };
        out.push_str(&memory("mem_used_total", &|b| b.mm_stat_after_fill));
        out.push_str(&memory("  at end", &|b| b.mm_stat_at_end));
        let _ = writeln!(
            out,
            "(IOPS ratio = state / anonymous; mem_used_total after the fill, once the workers had \
             drained, and after the last phase, pending pages included)"
        );
        match &state.restart {
            Some(restart) => out.push_str(&restart_lines(restart)),
            None => {
                let _ = writeln!(out, "restart: not measured");
            }
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
        let memory_row = |label: &str, of: &dyn Fn(&MemorySnapshot) -> u64| {
            let mut line = format!("{label:<18}");
            for backend in &self.backends {
                let text = match &backend.mm_stat_after_fill {
                    Some(snapshot) => mib(of(snapshot)),
                    None if backend.skipped.is_some() => "n/a".into(),
                    None => "-".into(),
                };
                let _ = write!(line, " {text:>16}");
            }
            let value =
                |b: Option<&BackendReport>| b.and_then(|b| b.mm_stat_after_fill.as_ref()).map(of);
            let ratio = match (value(ours), value(kernel)) {
                (Some(a), Some(b)) if b > 0 => format!("{:.3}x", a as f64 / b as f64),
                _ => "n/a".into(),
            };
            format!("{line} {ratio:>10}\n")
        };
        out.push_str(&memory_row("mem_used_total", &|s| s.mm.mem_used_total));
        if ours.is_some_and(|b| {
            b.mm_stat_after_fill
                .is_some_and(|s| s.slot_table_bytes.is_some())
        }) {
            out.push_str(&memory_row("  minus slot table", &|s| {
                s.mm.mem_used_total - s.slot_table_bytes.unwrap_or(0)
            }));
        }
        let _ = writeln!(
            out,
            "(memory after the fill, same data on every backend; kernel zram's mem_used_total \
             excludes its slot table, vhost-user-zram's includes it)"
        );
        if let Some(why) = kernel_note {
            let _ = writeln!(out, "kernel-zram: {why}");
        }
        out.push_str(&self.render_latency_and_workers());
        out.push_str(&self.render_daemon_cpu());
        if self
            .backends
            .iter()
            .any(|b| matches!(b.backend, BackendKind::KernelZram | BackendKind::QsdNull))
        {
            out.push_str(&self.render_goals());
        }
        out
    }

    /// The phases any backend ran, in the order of [`Phase::ALL`].
    pub(crate) fn phases_run(&self) -> Vec<Phase> {
        Phase::ALL
            .into_iter()
            .filter(|&phase| self.backends.iter().any(|b| b.phase(phase).is_some()))
            .collect()
    }

    /// The CPU time per request of every backend that is a process the bench launched.
    fn render_daemon_cpu(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "\n== daemon CPU per request (µs) ==");
        let mut header = format!("{:<18}", "phase");
        for backend in &self.backends {
            let _ = write!(header, " {:>16}", backend.backend.label());
        }
        let _ = writeln!(out, "{header}");
        for phase in self.phases_run() {
            let mut line = format!("{:<18}", phase.name());
            for backend in &self.backends {
                let text = match backend.phase(phase) {
                    Some(p) => cpu_per_request(p),
                    None if backend.skipped.is_some() => "n/a".into(),
                    None => "-".into(),
                };
                let _ = write!(line, " {text:>16}");
            }
            let _ = writeln!(out, "{line}");
        }
        let _ = writeln!(
            out,
            "(user + system time of the backend's process, all its threads, over the phase, per \
             request, counted in clock ticks (usually 10 ms a phase); `-` for kernel zram, whose \
             work runs in the bench's own context; pages a write phase leaves pending for the \
             compression workers are not counted)"
        );
        out
    }

    /// vhost-user-zram, polling off and on, measured against kernel zram and null-co: each
    /// ratio with the goal it is held to, met or missed.
    fn render_goals(&self) -> String {
        let variants: Vec<&BackendReport> = self
            .backends
            .iter()
            .filter(|b| {
                matches!(
                    b.backend,
                    BackendKind::VhostUserZram | BackendKind::VhostUserZramPolling(_)
                )
            })
            .collect();
        if variants.is_empty() {
            return String::new();
        }
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\n== vhost-user-zram against kernel zram and null-co: measured, and the goal =="
        );
        let mut header = format!("{:<48}", "measured (goal)");
        for variant in &variants {
            let _ = write!(header, " {:>24}", variant.backend.label());
        }
        let _ = writeln!(out, "{header}");
        for goal in GOALS {
            let reference = match goal.reference {
                Reference::Backend(kind) => self.backends.iter().find(|b| b.backend == kind),
                Reference::CodecFloor => None,
            };
            let mut line = format!("{:<48}", goal.description);
            for variant in &variants {
                let _ = write!(line, " {:>24}", goal.judge(variant, reference));
            }
            let _ = writeln!(out, "{line}");
        }
        for (kind, phases) in [
            (
                BackendKind::KernelZram,
                [Phase::RandWrite, Phase::RandRead, Phase::Mixed].as_slice(),
            ),
            (BackendKind::QsdNull, [Phase::RandRead].as_slice()),
            (
                BackendKind::VhostUserZramInline,
                [Phase::RandWrite].as_slice(),
            ),
        ] {
            let label = kind.label();
            match self.backends.iter().find(|b| b.backend == kind) {
                None => {
                    let _ = writeln!(
                        out,
                        "{label}: not in this run (the comparisons with it are n/a)"
                    );
                }
                Some(b) if b.skipped.is_some() || b.phases.is_empty() => {
                    let why = b.skipped.as_ref().or(b.error.as_ref());
                    let _ = writeln!(
                        out,
                        "{label}: did not run{} (the comparisons with it are n/a)",
                        why.map(|w| format!(": {w}")).unwrap_or_default()
                    );
                }
                Some(b) => {
                    for &phase in phases {
                        if b.phase(phase).is_none() {
                            let _ = writeln!(
                                out,
                                "{label}: no {} phase (the comparisons on it are n/a)",
                                phase.name()
                            );
                        }
                    }
                }
            }
        }
        if self.codec_floor.is_none() {
            let _ = writeln!(
                out,
                "codec floor: not measured (the comparison with it is n/a)"
            );
        }
        let _ = writeln!(
            out,
            "(CPU: the daemon's CPU µs/req of the phase, against the codec floor of a request or \
             the --workers 0 variant's; mem_used_total after the fill, against the default \
             variant's)"
        );
        out
    }

    /// p50/p99 latency per phase and backend, and the compression workers against the queue
    /// thread compressing (`--workers 0`) when both ran.
    fn render_latency_and_workers(&self) -> String {
        let mut out = String::new();
        let find = |kind| self.backends.iter().find(|b| b.backend == kind);
        let phases: Vec<Phase> = Phase::ALL
            .into_iter()
            .filter(|&phase| self.backends.iter().any(|b| b.phase(phase).is_some()))
            .collect();
        let _ = writeln!(out, "\n== latency (µs, p50 / p99) ==");
        let mut header = format!("{:<18}", "phase");
        for backend in &self.backends {
            let _ = write!(header, " {:>16}", backend.backend.label());
        }
        let _ = writeln!(out, "{header}");
        for &phase in &phases {
            let mut line = format!("{:<18}", phase.name());
            for backend in &self.backends {
                let text = match backend.phase(phase) {
                    Some(p) => format!("{:.0} / {:.0}", p.p50_us, p.p99_us),
                    None => "-".into(),
                };
                let _ = write!(line, " {text:>16}");
            }
            let _ = writeln!(out, "{line}");
        }
        let (Some(workers), Some(inline)) = (
            find(BackendKind::VhostUserZram),
            find(BackendKind::VhostUserZramInline),
        ) else {
            return out;
        };
        let _ = writeln!(
            out,
            "\n== compression workers (vhost-user-zram) against --workers 0 =="
        );
        let _ = writeln!(
            out,
            "{:<18} {:>12} {:>12} {:>14}",
            "phase", "IOPS ratio", "p99 ratio", "elapsed ratio"
        );
        for &phase in &phases {
            if let (Some(a), Some(b)) = (workers.phase(phase), inline.phase(phase)) {
                let ratio = |x: f64, y: f64| {
                    if y > 0.0 {
                        format!("{:.2}x", x / y)
                    } else {
                        "n/a".into()
                    }
                };
                let _ = writeln!(
                    out,
                    "{:<18} {:>12} {:>12} {:>14}",
                    phase.name(),
                    ratio(a.iops, b.iops),
                    ratio(a.p99_us, b.p99_us),
                    ratio(a.seconds, b.seconds)
                );
            }
        }
        let _ = writeln!(
            out,
            "(IOPS ratio > 1: workers faster; p99 and elapsed ratios < 1: workers faster; the \
             burst's elapsed time is the time to its last completion)"
        );
        out
    }
}

/// A goal vhost-user-zram is held to: a figure of one phase measured against the same figure
/// of a reference.
struct Goal {
    description: &'static str,
    phase: Phase,
    reference: Reference,
    test: GoalTest,
}

/// What a goal measures a variant against.
#[derive(Clone, Copy)]
enum Reference {
    /// Another backend of the run; a variant is never held against itself (`n/a`).
    Backend(BackendKind),
    /// The codec floor of the phase's requests.
    CodecFloor,
}

/// How a goal compares the two.
enum GoalTest {
    /// IOPS at least this multiple of the reference's.
    IopsRatio(f64),
    /// IOPS at least this percentage of the reference's.
    IopsShare(f64),
    /// p99 latency no higher than the reference's.
    P99NotAbove,
    /// p99.9 latency no higher than the reference's.
    P999NotAbove,
    /// The daemon's CPU per request at most the reference's plus this many microseconds.
    CpuAtMostPlus(f64),
    /// The daemon's CPU per request at most the codec floor plus this many microseconds.
    CpuAtMostFloorPlus(f64),
    /// mem_used_total after the fill at most this percentage above the reference's.
    MemoryAtMostPercentAbove(f64),
}

/// The goals: random reads faster than kernel zram and at least half what the transport
/// allows (null-co stores nothing), mixed I/O faster than kernel zram, and a random-read tail
/// latency no worse than kernel zram's; per-core efficiency: random reads within a microsecond
/// of the codec, the compression workers within 0.3 µs of the queue thread compressing
/// (`--workers 0`), twice and two and a half times kernel zram's random reads and writes, tails
/// no worse than its, and no variant costing memory.
const GOALS: [Goal; 11] = [
    Goal {
        description: "randread IOPS / kernel-zram's (>= 1.3x)",
        phase: Phase::RandRead,
        reference: Reference::Backend(BackendKind::KernelZram),
        test: GoalTest::IopsRatio(1.3),
    },
    Goal {
        description: "randread IOPS / qsd-null-co's (>= 50 %)",
        phase: Phase::RandRead,
        reference: Reference::Backend(BackendKind::QsdNull),
        test: GoalTest::IopsShare(50.0),
    },
    Goal {
        description: "mixed IOPS / kernel-zram's (>= 1.2x)",
        phase: Phase::Mixed,
        reference: Reference::Backend(BackendKind::KernelZram),
        test: GoalTest::IopsRatio(1.2),
    },
    Goal {
        description: "randread p99 latency vs kernel-zram's (<=)",
        phase: Phase::RandRead,
        reference: Reference::Backend(BackendKind::KernelZram),
        test: GoalTest::P99NotAbove,
    },
    Goal {
        description: "randread CPU µs/req vs codec floor (<= +1.0)",
        phase: Phase::RandRead,
        reference: Reference::CodecFloor,
        test: GoalTest::CpuAtMostFloorPlus(1.0),
    },
    Goal {
        description: "randwrite CPU µs/req vs --workers 0 (<= +0.3)",
        phase: Phase::RandWrite,
        reference: Reference::Backend(BackendKind::VhostUserZramInline),
        test: GoalTest::CpuAtMostPlus(0.3),
    },
    Goal {
        description: "randread IOPS / kernel-zram's (>= 2.0x)",
        phase: Phase::RandRead,
        reference: Reference::Backend(BackendKind::KernelZram),
        test: GoalTest::IopsRatio(2.0),
    },
    Goal {
        description: "randwrite IOPS / kernel-zram's (>= 2.5x)",
        phase: Phase::RandWrite,
        reference: Reference::Backend(BackendKind::KernelZram),
        test: GoalTest::IopsRatio(2.5),
    },
    Goal {
        description: "randread p99.9 latency vs kernel-zram's (<=)",
        phase: Phase::RandRead,
        reference: Reference::Backend(BackendKind::KernelZram),
        test: GoalTest::P999NotAbove,
    },
    Goal {
        description: "randwrite p99 latency vs kernel-zram's (<=)",
        phase: Phase::RandWrite,
        reference: Reference::Backend(BackendKind::KernelZram),
        test: GoalTest::P99NotAbove,
    },
    Goal {
        description: "mem_used_total vs vhost-user-zram's (<= +1 %)",
        phase: Phase::Fill,
        reference: Reference::Backend(BackendKind::VhostUserZram),
        test: GoalTest::MemoryAtMostPercentAbove(1.0),
    },
];

impl Goal {
    /// The measured figure and `met` or `missed`; `n/a` when either side lacks the phase or
    /// the figure, or when the variant is the reference itself.
    fn judge(&self, ours: &BackendReport, reference: Option<&BackendReport>) -> String {
        let verdict = |met: bool| if met { "met" } else { "missed" };
        let Some(a) = ours.phase(self.phase) else {
            return "n/a".into();
        };
        let reference = reference.filter(|r| r.backend != ours.backend);
        let b = reference.and_then(|r| r.phase(self.phase));
        match (&self.test, b) {
            (GoalTest::CpuAtMostFloorPlus(margin), _) => {
                match (a.daemon_cpu_us_per_request, a.codec_floor_us_per_request) {
                    (Some(cpu), Some(floor)) => format!(
                        "{cpu:.2} vs {floor:.2} µs {}",
                        verdict(cpu <= floor + margin)
                    ),
                    _ => "n/a".into(),
                }
            }
            (_, None) => "n/a".into(),
            (GoalTest::IopsRatio(_) | GoalTest::IopsShare(_), Some(b)) if b.iops <= 0.0 => {
                "n/a".into()
            }
            (GoalTest::IopsRatio(minimum), Some(b)) => {
                let ratio = a.iops / b.iops;
                format!("{ratio:.2}x {}", verdict(ratio >= *minimum))
            }
            (GoalTest::IopsShare(minimum), Some(b)) => {
                let share = a.iops / b.iops * 100.0;
                format!("{share:.0} % {}", verdict(share >= *minimum))
            }
            (GoalTest::P99NotAbove, Some(b)) => format!(
                "{:.0} vs {:.0} µs {}",
                a.p99_us,
                b.p99_us,
                verdict(a.p99_us <= b.p99_us)
            ),
            (GoalTest::P999NotAbove, Some(b)) => format!(
                "{:.0} vs {:.0} µs {}",
                a.p999_us,
                b.p999_us,
                verdict(a.p999_us <= b.p999_us)
            ),
            (GoalTest::CpuAtMostPlus(margin), Some(b)) => {
                match (a.daemon_cpu_us_per_request, b.daemon_cpu_us_per_request) {
                    (Some(ours), Some(theirs)) => format!(
                        "{ours:.2} vs {theirs:.2} µs {}",
                        verdict(ours <= theirs + margin)
                    ),
                    _ => "n/a".into(),
                }
            }
            (GoalTest::MemoryAtMostPercentAbove(percent), Some(_)) => {
                let used = |r: &BackendReport| r.mm_stat_after_fill.map(|m| m.mm.mem_used_total);
                match (used(ours), reference.and_then(used)) {
                    (Some(ours), Some(theirs)) if theirs > 0 => {
                        let above = (ours as f64 - theirs as f64) * 100.0 / theirs as f64;
                        format!("{above:+.2} % {}", verdict(above <= *percent))
                    }
                    _ => "n/a".into(),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phase(phase: Phase, iops: f64) -> PhaseReport {
        PhaseReport {
            phase,
            requests: 10,
            reads: 0,
            verified_reads: 0,
            seconds: 1.0,
            iops,
            mib_per_second: iops * 4096.0 / 1048576.0,
            request_pages: 1,
            p50_us: 12.5,
            p99_us: 80.0,
            p999_us: 150.0,
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

    fn with_p99(mut report: PhaseReport, p99_us: f64) -> PhaseReport {
        report.p99_us = p99_us;
        report
    }

    fn with_cpu(mut report: PhaseReport, us_per_request: f64) -> PhaseReport {
        report.daemon_cpu_us_per_request = Some(us_per_request);
        report
    }

    fn floor(compress_us_per_page: f64, decompress_us_per_page: f64) -> CodecFloor {
        CodecFloor {
            algorithm: "lz4".into(),
            algorithm_level: None,
            pages: 3,
            passes: 3,
            compress_us_per_page,
            decompress_us_per_page,
            same_filled_percent: 33.3,
            raw_percent: 33.3,
        }
    }

    fn with_memory(mut report: BackendReport, mem_used_total: u64) -> BackendReport {
        report.mm_stat_after_fill = Some(MemorySnapshot {
            mm: vhost_user_zram::store::MmStat {
                mem_used_total,
                ..Default::default()
            },
            slot_table_bytes: None,
            units: None,
        });
        report
    }

    /// The verdict cells of the goal row that starts with `start`, one per variant column.
    fn goal_cells(text: &str, start: &str) -> Vec<String> {
        let block = &text[text
            .find("== vhost-user-zram against kernel zram and null-co")
            .unwrap()..];
        let row = block
            .lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no {start:?} row in {block}"));
        let cells: Vec<char> = row.chars().skip(48).collect();
        cells
            .chunks(25)
            .map(|cell| cell.iter().collect::<String>().trim().to_owned())
            .collect()
    }

    fn goal(description: &str) -> &'static Goal {
        GOALS
            .iter()
            .find(|g| g.description.starts_with(description))
            .unwrap()
    }

    fn backend(kind: BackendKind, phases: Vec<PhaseReport>) -> BackendReport {
        BackendReport {
            phases,
            ..BackendReport::new(kind, None)
        }
    }

    fn report_of(backends: Vec<BackendReport>) -> Report {
        Report {
            workload: WorkloadDescription {
                size_bytes: 1 << 20,
                pages: 256,
                queues: 1,
                queue_depth: 1,
                queue_size: 4,
                block_size: 4096,
                seconds_per_phase: 1.0,
                rounds: 1,
                seed: 1,
                pool_pages: 1,
                corpus: None,
                algorithm: "lz4".into(),
                algorithm_level: None,
                verify: true,
                compare_poll_max_us: None,
            },
            backends,
            codec_floor: None,
            codec_floor_error: None,
            migration: None,
        }
    }

    #[test]
    fn csv_has_a_row_per_phase_and_one_per_backend_without_phases() {
        let mut fill = phase(Phase::Fill, 1000.0);
        fill.set_daemon_cpu(std::time::Duration::from_millis(5));
        fill.set_thread_cpu(crate::backends::ThreadCpu {
            queue: std::time::Duration::from_millis(3),
            worker: std::time::Duration::from_millis(1),
            other: std::time::Duration::from_millis(1),
        });
        let ours = backend(
            BackendKind::VhostUserZram,
            vec![fill, phase(Phase::RandRead, 2000.0)],
        );
        let skipped = BackendReport::skipped(BackendKind::KernelZram, "no zram, \"really\"".into());
        let mut report = report_of(vec![ours, skipped]);
        report.codec_floor = Some(floor(2.0, 1.0));
        report.apply_codec_floor();
        let csv = report.render_csv();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], CSV_HEADER);
        assert_eq!(lines.len(), 4);
        assert_eq!(
            lines[1],
            "vhost-user-zram,,ok,fill,1000,3.91,12.5,80.0,150.0,10,0,0,1.000,0.005,500.00,300.00,100.00,2.00,1.00,2.00,498.00,"
        );
        assert_eq!(
            lines[2],
            "vhost-user-zram,,ok,randread,2000,7.81,12.5,80.0,150.0,10,0,0,1.000,,,,,2.00,1.00,1.00,,"
        );
        assert_eq!(
            lines[3],
            "kernel-zram,,skipped,,,,,,,,,,,,,,,2.00,1.00,,,\"no zram, \"\"really\"\"\""
        );
        let columns = CSV_HEADER.split(',').count();
        assert_eq!(lines[1].split(',').count(), columns);
        assert_eq!(lines[3].split(',').count(), columns + 1, "the quoted comma");
    }

    #[test]
    fn json_names_backends_by_kind_and_gives_cpu_per_request() {
        let mut read = phase(Phase::RandRead, 1000.0);
        read.set_daemon_cpu(std::time::Duration::from_micros(30));
        let report = report_of(vec![backend(
            BackendKind::VhostUserZramPolling(50),
            vec![read],
        )]);
        let json: serde_json::Value = serde_json::to_value(&report).unwrap();
        let entry = &json["backends"][0];
        assert_eq!(entry["backend"], "vhost-user-zram-polling");
        assert_eq!(entry["phases"][0]["daemon_cpu_us_per_request"], 3.0);
        assert_eq!(
            json["workload"]["compare_poll_max_us"],
            serde_json::Value::Null
        );
    }

    #[test]
    fn daemon_cpu_table_shows_a_dash_for_kernel_zram() {
        let mut ours = phase(Phase::RandRead, 1000.0);
        ours.set_daemon_cpu(std::time::Duration::from_micros(25));
        let report = report_of(vec![
            backend(BackendKind::VhostUserZram, vec![ours]),
            backend(BackendKind::KernelZram, vec![phase(Phase::RandRead, 900.0)]),
        ]);
        let text = report.render();
        let table = &text[text.find("== daemon CPU per request (µs) ==").unwrap()..];
        let row = table.lines().find(|l| l.starts_with("randread")).unwrap();
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells, ["randread", "2.50", "-"]);
    }

    #[test]
    fn goals_are_judged_for_polling_off_and_on() {
        let report = report_of(vec![
            backend(
                BackendKind::VhostUserZram,
                vec![
                    with_p99(phase(Phase::RandRead, 200_000.0), 100.0),
                    phase(Phase::Mixed, 100_000.0),
                ],
            ),
            backend(
                BackendKind::VhostUserZramPolling(50),
                vec![
                    with_p99(phase(Phase::RandRead, 150_000.0), 200.0),
                    phase(Phase::Mixed, 130_000.0),
                ],
            ),
            backend(
                BackendKind::KernelZram,
                vec![
                    with_p99(phase(Phase::RandRead, 140_000.0), 150.0),
                    phase(Phase::Mixed, 100_000.0),
                ],
            ),
            backend(
                BackendKind::QsdNull,
                vec![phase(Phase::RandRead, 360_000.0)],
            ),
        ]);
        let text = report.render();
        let block = &text[text
            .find("== vhost-user-zram against kernel zram and null-co")
            .unwrap()..];
        let row = |start: &str| block.lines().find(|l| l.starts_with(start)).unwrap();
        assert!(
            row("measured").contains("vhost-user-zram")
                && row("measured").contains("vuz --poll 50")
        );
        assert!(row("randread IOPS / kernel").contains("1.43x met"));
        assert!(row("randread IOPS / kernel").contains("1.07x missed"));
        assert!(row("randread IOPS / qsd").contains("56 % met"));
        assert!(row("randread IOPS / qsd").contains("42 % missed"));
        assert!(row("mixed IOPS").contains("1.00x missed"));
        assert!(row("mixed IOPS").contains("1.30x met"));
        assert!(row("randread p99 latency").contains("100 vs 150 µs met"));
        assert!(row("randread p99 latency").contains("200 vs 150 µs missed"));
        for goal in [
            "randread IOPS / kernel",
            "randread IOPS / qsd",
            "mixed IOPS",
            "randread p99 ",
        ] {
            assert!(!row(goal).contains("n/a"), "{}", row(goal));
        }
        // The report says what it measured, not where a goal came from.
        assert!(!text.to_lowercase().contains("issue"), "{text}");
    }

    #[test]
    fn goals_say_which_reference_is_missing() {
        let report = report_of(vec![
            backend(
                BackendKind::VhostUserZram,
                vec![phase(Phase::RandRead, 200_000.0)],
            ),
            BackendReport::skipped(BackendKind::KernelZram, "no zram here".into()),
        ]);
        let text = report.render();
        let block = &text[text
            .find("== vhost-user-zram against kernel zram and null-co")
            .unwrap()..];
        assert!(block.contains("kernel-zram: did not run: no zram here"));
        assert!(block.contains("qsd-null-co: not in this run"));
        let row = block
            .lines()
            .find(|l| l.starts_with("randread IOPS / kernel"))
            .unwrap();
        assert!(row.ends_with("n/a"), "{row}");
    }

    #[test]
    fn the_state_block_gives_ratios_memory_and_the_restart() {
        let memory = |used| MemorySnapshot {
            mm: vhost_user_zram::store::MmStat {
                mem_used_total: used,
                ..Default::default()
            },
            slot_table_bytes: None,
            units: None,
        };
        let mut anonymous = backend(
            BackendKind::VhostUserZram,
            vec![
                phase(Phase::Fill, 100_000.0),
                phase(Phase::RandWrite, 200_000.0),
            ],
        );
        anonymous.mm_stat_after_fill = Some(memory(1 << 20));
        let mut state = backend(
            BackendKind::VhostUserZramState,
            vec![
                phase(Phase::Fill, 99_000.0),
                phase(Phase::RandWrite, 180_000.0),
            ],
        );
        state.mm_stat_after_fill = Some(memory(1 << 20));
        state.restart = Some(RestartReport {
            pages_at_kill: Some(256),
            socket_accepting_ms: 12.25,
            first_read_ms: 20.5,
            sample_pages: 256,
            verified_pages: 256,
            sample_ms: 3.0,
            recovered_pages: Some(256),
            recovery_ms: Some(1.5),
            mm_stat_after_restart: None,
        });
        let text = report_of(vec![anonymous, state]).render();
        let block = &text[text
            .find("== state file (--state on /dev/shm) against anonymous memory ==")
            .unwrap()..];
        let row = |start: &str| block.lines().find(|l| l.starts_with(start)).unwrap();
        assert!(row("fill").ends_with("0.990x        met"), "{block}");
        assert!(row("randwrite").ends_with("0.900x     missed"), "{block}");
        assert!(row("mem_used_total").ends_with("equal"), "{block}");
        assert!(
            block.contains(
                "socket accepting 12.2 ms after the spawn, first read served and verified 20.5 ms"
            ),
            "{block}"
        );
        assert!(
            block.contains("256 of 256 sampled pages verified"),
            "{block}"
        );
        assert!(block.contains("recovered 256 pages in 1.5 ms"), "{block}");
    }

    #[test]
    fn the_floor_opens_the_tables_and_each_vuz_phase_shows_its_cpu_over_the_floor() {
        // Arrange: 64 KiB requests, 16 pages each.
        let mut report = report_of(vec![
            backend(
                BackendKind::VhostUserZram,
                vec![
                    with_cpu(phase(Phase::RandWrite, 1000.0), 40.0),
                    with_cpu(phase(Phase::RandRead, 1000.0), 20.0),
                    with_cpu(phase(Phase::Mixed, 1000.0), 30.0),
                ],
            ),
            backend(
                BackendKind::QsdNull,
                vec![with_cpu(phase(Phase::RandRead, 1000.0), 5.0)],
            ),
        ]);
        report.workload.block_size = 65536;
        for phase in report.backends.iter_mut().flat_map(|b| b.phases.iter_mut()) {
            phase.request_pages = 16;
        }
        report.codec_floor = Some(floor(2.0, 1.0));

        // Act
        report.apply_codec_floor();
        let text = report.render();

        // Assert
        let ours = &report.backends[0];
        let above = |p| ours.phase(p).unwrap().cpu_us_above_floor.unwrap();
        assert!((above(Phase::RandWrite) - (40.0 - 32.0)).abs() < 1e-9);
        assert!((above(Phase::RandRead) - (20.0 - 16.0)).abs() < 1e-9);
        assert!((above(Phase::Mixed) - (30.0 - 16.0 * 1.3)).abs() < 1e-9);
        let null = report.backends[1].phase(Phase::RandRead).unwrap();
        assert_eq!(null.cpu_us_above_floor, None, "null-co runs no codec");
        assert_eq!(
            text.lines().nth(1).unwrap(),
            "codec floor (lz4, this page mix): compress 2.00 µs/page, decompress 1.00 µs/page \
             (same-filled 33.3 %, raw 33.3 %; best of 3 passes over 3 pages)"
        );
        let row = text.lines().find(|l| l.starts_with("randread")).unwrap();
        assert!(row.ends_with(" 4.00"), "{row}");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["codec_floor"]["compress_us_per_page"], 2.0);
        assert_eq!(json["codec_floor"]["decompress_us_per_page"], 1.0);
        assert_eq!(
            json["backends"][0]["phases"][1]["codec_floor_us_per_request"],
            16.0
        );
    }

    #[test]
    fn randread_cpu_is_held_to_the_decompress_floor_plus_a_microsecond() {
        let ours = |kind, cpu| backend(kind, vec![with_cpu(phase(Phase::RandRead, 1000.0), cpu)]);
        let mut report = report_of(vec![
            ours(BackendKind::VhostUserZram, 1.9),
            ours(BackendKind::VhostUserZramPolling(50), 2.5),
            backend(
                BackendKind::KernelZram,
                vec![phase(Phase::RandRead, 1000.0)],
            ),
        ]);
        let start = "randread CPU µs/req vs codec floor";
        assert_eq!(
            goal_cells(&report.render(), start),
            ["n/a", "n/a"],
            "no floor"
        );
        assert!(report.render().contains("codec floor: not measured"));

        report.codec_floor = Some(floor(3.0, 1.0));
        report.apply_codec_floor();

        assert_eq!(
            goal_cells(&report.render(), start),
            ["1.90 vs 1.00 µs met", "2.50 vs 1.00 µs missed"]
        );
    }

    #[test]
    fn randwrite_cpu_with_workers_is_held_to_the_inline_variants_plus_0_3_us() {
        let ours = |kind, cpu| backend(kind, vec![with_cpu(phase(Phase::RandWrite, 1000.0), cpu)]);
        let inline = ours(BackendKind::VhostUserZramInline, 3.0);
        let kernel = backend(BackendKind::KernelZram, vec![]);
        let start = "randwrite CPU µs/req vs --workers 0";
        let report = report_of(vec![
            ours(BackendKind::VhostUserZram, 3.2),
            ours(BackendKind::VhostUserZramPolling(50), 3.5),
            inline.clone(),
            kernel.clone(),
        ]);
        assert_eq!(
            goal_cells(&report.render(), start),
            ["3.20 vs 3.00 µs met", "3.50 vs 3.00 µs missed"]
        );
        assert_eq!(
            goal(start).judge(&inline, Some(&inline)),
            "n/a",
            "not itself"
        );
        let without_inline = report_of(vec![ours(BackendKind::VhostUserZram, 3.2), kernel]);
        let text = without_inline.render();
        assert_eq!(goal_cells(&text, start), ["n/a"]);
        assert!(text.contains("vuz --workers 0: not in this run"), "{text}");
    }

    #[test]
    fn random_iops_are_held_to_two_and_two_and_a_half_times_kernel_zrams() {
        let ours = |kind, read, write| {
            backend(
                kind,
                vec![phase(Phase::RandRead, read), phase(Phase::RandWrite, write)],
            )
        };
        let report = report_of(vec![
            ours(BackendKind::VhostUserZram, 200_000.0, 250_000.0),
            ours(BackendKind::VhostUserZramPolling(50), 150_000.0, 200_000.0),
            ours(BackendKind::KernelZram, 100_000.0, 100_000.0),
        ]);
        let text = report.render();
        assert_eq!(
            goal_cells(&text, "randread IOPS / kernel-zram's (>= 2.0x)"),
            ["2.00x met", "1.50x missed"]
        );
        assert_eq!(
            goal_cells(&text, "randwrite IOPS / kernel-zram's (>= 2.5x)"),
            ["2.50x met", "2.00x missed"]
        );
        let skipped = report_of(vec![
            ours(BackendKind::VhostUserZram, 200_000.0, 250_000.0),
            BackendReport::skipped(BackendKind::KernelZram, "no zram".into()),
        ]);
        let text = skipped.render();
        assert_eq!(goal_cells(&text, "randwrite IOPS / kernel"), ["n/a"]);
    }

    #[test]
    fn tails_are_held_to_kernel_zrams_p99_9_for_reads_and_p99_for_writes() {
        let ours = |kind, p999, p99| {
            let mut read = phase(Phase::RandRead, 1000.0);
            read.p999_us = p999;
            backend(
                kind,
                vec![read, with_p99(phase(Phase::RandWrite, 1000.0), p99)],
            )
        };
        let report = report_of(vec![
            ours(BackendKind::VhostUserZram, 200.0, 90.0),
            ours(BackendKind::VhostUserZramPolling(50), 301.0, 121.0),
            ours(BackendKind::KernelZram, 300.0, 120.0),
        ]);
        let text = report.render();
        assert_eq!(
            goal_cells(&text, "randread p99.9 latency"),
            ["200 vs 300 µs met", "301 vs 300 µs missed"]
        );
        assert_eq!(
            goal_cells(&text, "randwrite p99 latency"),
            ["90 vs 120 µs met", "121 vs 120 µs missed"]
        );
        let without_randwrite = report_of(vec![
            backend(
                BackendKind::VhostUserZram,
                vec![phase(Phase::RandRead, 1.0)],
            ),
            backend(BackendKind::KernelZram, vec![phase(Phase::RandRead, 1.0)]),
        ]);
        let text = without_randwrite.render();
        assert_eq!(goal_cells(&text, "randwrite p99 latency"), ["n/a"]);
        assert!(text.contains("kernel-zram: no randwrite phase"), "{text}");
        let kernel_skipped = report_of(vec![
            backend(
                BackendKind::VhostUserZram,
                vec![phase(Phase::RandRead, 1.0)],
            ),
            BackendReport::skipped(BackendKind::KernelZram, "no zram".into()),
        ]);
        assert_eq!(
            goal_cells(&kernel_skipped.render(), "randread p99.9 latency"),
            ["n/a"]
        );
    }

    #[test]
    fn a_variant_may_use_at_most_1_percent_more_memory_than_the_default() {
        let filled = |kind, used| with_memory(backend(kind, vec![phase(Phase::Fill, 1.0)]), used);
        let start = "mem_used_total vs vhost-user-zram's";
        let report = report_of(vec![
            filled(BackendKind::VhostUserZram, 1_000_000),
            filled(BackendKind::VhostUserZramPolling(50), 1_005_000),
            backend(BackendKind::KernelZram, vec![]),
        ]);
        assert_eq!(
            goal_cells(&report.render(), start),
            ["n/a", "+0.50 % met"],
            "the default is not held against itself"
        );
        let costly = report_of(vec![
            filled(BackendKind::VhostUserZram, 1_000_000),
            filled(BackendKind::VhostUserZramPolling(50), 1_020_000),
            backend(BackendKind::KernelZram, vec![]),
        ]);
        assert_eq!(
            goal_cells(&costly.render(), start),
            ["n/a", "+2.00 % missed"]
        );
        let unmeasured = backend(
            BackendKind::VhostUserZramPolling(50),
            vec![phase(Phase::Fill, 1.0)],
        );
        let default = filled(BackendKind::VhostUserZram, 1_000_000);
        assert_eq!(goal(start).judge(&unmeasured, Some(&default)), "n/a");
    }
}
