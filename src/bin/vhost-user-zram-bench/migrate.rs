// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `--migrate`: the live-migration benchmark of issue 18. Two vhost-user-zram daemons, the
//! source and a destination started with `--incoming unix:RUNDIR/stream.sock`; the bench fills
//! the source with the swap-like workload, starts `ctl migrate` there and measures:
//!
//! - the idle guest's full copy: wire bytes against the source's `compr_data_size` (issue
//!   target ≤ 1.05) and the copy's time;
//! - the switchover with a writing guest: `--migrate-dirty` bytes of new pages written at random
//!   pages during pre-copy, then the bench's frontend disconnects from the source (its queues
//!   stop: the switchover signal, standing in for QEMU's `GET_VRING_BASE`) and a new frontend
//!   connects to the destination at once and reads one page; the time from the disconnect to
//!   that read completing (target ≤ 200 ms for ≤ 10 MiB of dirty pages);
//! - then every written page is read from the destination and checked against what was last
//!   written.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vhost_user_zram::control::{self, Command};
use vhost_user_zram::migrate::Endpoint;
use vhost_user_zram::PAGE_SIZE;

use crate::backends::{Backend, BackendKind, DaemonOptions, RunDir};
use crate::device::Device;
use crate::progress::ProgressReporter;
use crate::report::{BackendReport, PhaseReport};
use crate::workload::{PagePool, Phase, RunControl, Workload};
use crate::{Args, STOP};

/// Issue 18's bound on wire bytes per byte of `compr_data_size` for an idle guest.
pub const WIRE_PER_COMPR_TARGET: f64 = 1.05;
/// Issue 18's bound on the switchover, in milliseconds, for at most [`DIRTY_TARGET_BYTES`].
pub const SWITCHOVER_TARGET_MS: f64 = 200.0;
/// The dirty bytes the switchover target is stated for.
pub const DIRTY_TARGET_BYTES: u64 = 10 << 20;
/// How long the idle copy may take before the bench gives up.
const COPY_TIMEOUT: Duration = Duration::from_secs(600);
/// How often the bench polls `ctl migrate-status`.
const POLL: Duration = Duration::from_millis(2);

/// What `--migrate` measured; parts stay `None` when the run failed before them.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MigrateReport {
    /// The stream's endpoint.
    pub endpoint: String,
    /// The source's `orig_data_size` after the fill.
    pub orig_data_size: u64,
    /// The source's `compr_data_size` after the fill.
    pub compr_data_size: u64,
    /// The idle guest's full copy.
    pub idle: Option<IdleCopy>,
    /// The switchover with a writing guest.
    pub switchover: Option<Switchover>,
    /// Every written page read back from the destination.
    pub verify: Option<Verification>,
}

/// The first round of an idle guest: every stored page once.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IdleCopy {
    /// Page records sent.
    pub pages: u64,
    /// Rounds done when the bench saw no dirty page left.
    pub rounds: u64,
    /// Bytes on the wire (handshake and framing included).
    pub wire_bytes: u64,
    /// The stored bytes the records carry.
    pub stored_bytes: u64,
    /// `wire_bytes / compr_data_size`.
    pub wire_per_compr: f64,
    /// `ctl migrate` sent to round 1 seen done with no dirty page, in milliseconds (connect
    /// and handshake included; status polled every 2 ms).
    pub copy_ms: f64,
    /// `orig_data_size` per second of `copy_ms`, MiB/s.
    pub orig_mib_per_second: f64,
    /// `wire_bytes` per second of `copy_ms`, MiB/s.
    pub wire_mib_per_second: f64,
}

/// The switchover with a guest that wrote during pre-copy.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Switchover {
    /// Pages rewritten at random during pre-copy.
    pub dirty_pages_written: u64,
    /// How long writing them took, in milliseconds.
    pub dirty_write_ms: f64,
    /// The source's status read right before the disconnect: page records sent so far.
    pub source_pages_before_stop: u64,
    /// The source's status then: rounds done.
    pub source_rounds_before_stop: u64,
    /// The source's status then: pages dirty (changed since last sent).
    pub dirty_pages_at_stop: u64,
    /// The destination's status once it served: page records received in all.
    pub destination_pages: u64,
    /// The destination's status then: its state.
    pub destination_state: String,
    /// The destination's status then: wire bytes received.
    pub destination_wire_bytes: u64,
    /// Page records sent after that last source status (the pages sent after the stop, plus
    /// whatever the running round sent between the status and the stop): at most.
    pub pages_after_stop_at_most: u64,
    /// Disconnect from the source to the new frontend's `blkio_start` on the destination
    /// returning (its queue start waits for the stream), in milliseconds.
    pub destination_started_ms: f64,
    /// Disconnect from the source to the first read completed and verified on the
    /// destination, in milliseconds.
    pub switchover_ms: f64,
}

/// Every written page read from the destination.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Verification {
    /// Pages read.
    pub pages: u64,
    /// Pages holding what was last written.
    pub verified_pages: u64,
    /// How long the read took, in milliseconds.
    pub ms: f64,
    /// The first mismatch or I/O error, when there was one.
    pub error: Option<String>,
}

impl Verification {
    /// Whether every page read back as written.
    pub fn passed(&self) -> bool {
        self.error.is_none() && self.verified_pages == self.pages
    }
}

/// One `ctl migrate-status` answer.
#[derive(Debug, Clone, Default)]
struct Status {
    state: String,
    rounds: u64,
    pages: u64,
    wire_bytes: u64,
    stored_bytes: u64,
    dirty_pages: u64,
    error: String,
}

impl Status {
    fn parse(text: &str) -> Result<Status, String> {
        let fields: HashMap<&str, &str> = text
            .lines()
            .filter_map(|line| line.split_once(' '))
            .collect();
        let number = |key: &str| -> Result<u64, String> {
            fields
                .get(key)
                .ok_or_else(|| format!("migrate-status has no {key}: '{text}'"))?
                .trim()
                .parse()
                .map_err(|e| format!("migrate-status {key}: {e}"))
        };
        Ok(Status {
            state: fields
                .get("state")
                .ok_or_else(|| format!("migrate-status has no state: '{text}'"))?
                .trim()
                .to_owned(),
            rounds: number("rounds")?,
            pages: number("pages")?,
            wire_bytes: number("wire_bytes")?,
            stored_bytes: number("stored_bytes")?,
            dirty_pages: number("dirty_pages")?,
            error: fields.get("error").map_or("-", |e| e.trim()).to_owned(),
        })
    }

    fn failed(&self) -> bool {
        matches!(self.state.as_str(), "failed" | "cancelled")
    }
}

fn status(control_socket: &Path) -> Result<Status, String> {
    let text = control::request(control_socket, Command::MigrateStatus)
        .map_err(|e| format!("ctl migrate-status on {}: {e}", control_socket.display()))?;
    Status::parse(&text)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// Runs the benchmark: the source's entry (its fill phase and memory) and the migration's
/// figures. A failure, a mismatch on the destination included, is the entry's error.
pub fn run(
    args: &Args,
    dir: &RunDir,
    daemon: &DaemonOptions,
) -> (BackendReport, Option<MigrateReport>) {
    let kind = BackendKind::VhostUserZram;
    let mut entry = BackendReport::new(kind, None);
    entry
        .notes
        .push("the source of --migrate; the destination is the same daemon with --incoming".into());
    let stream = dir.join("stream.sock");
    let mut report = MigrateReport {
        endpoint: format!("unix:{}", stream.display()),
        ..MigrateReport::default()
    };
    let queues = args.queues as usize;
    let mut source = None;
    let mut destination = None;
    let result = (|| -> Result<(), String> {
        let source = source.insert(Backend::vhost_user_zram(
            dir, kind, daemon, args.size, queues,
        )?);
        let mut incoming = daemon.clone();
        incoming
            .extra_args
            .extend(["--incoming".to_owned(), report.endpoint.clone()]);
        let destination = destination.insert(Backend::launch_vhost_user_zram(
            dir,
            kind,
            "vhost-user-zram-dest",
            &incoming,
            args.size,
            queues,
        )?);
        measure(args, source, destination, &mut entry, &mut report)
    })();
    if let Err(e) = result {
        entry.error = Some(e);
    }
    // Both frontends are gone: each daemon exits by itself.
    for (name, backend) in [("source", &mut source), ("destination", &mut destination)] {
        let Some(process) = backend.as_mut().and_then(|b| b.process.as_mut()) else {
            continue;
        };
        match process.finish(Duration::from_secs(10)) {
            Some(status) if status.success() => {}
            Some(status) => entry
                .notes
                .push(format!("the {name} daemon exited with {status}")),
            None => entry.notes.push(format!(
                "the {name} daemon did not exit after its frontend left; killed"
            )),
        }
        if entry.error.is_some() {
            entry
                .notes
                .push(format!("{name} daemon log:\n{}", process.log_tail()));
        }
    }
    (entry, Some(report))
}

fn open(backend: &Backend, args: &Args) -> Result<Device, String> {
    let queues = args.queues as usize;
    let device = Device::open(
        &backend.transport,
        queues,
        args.queue_size as usize,
        Workload::buffer_bytes_per_lane(args.queue_depth as usize, 1),
        Duration::from_secs(10),
    )?;
    if device.lanes.len() != queues {
        return Err(format!(
            "asked for {queues} queues, got {}",
            device.lanes.len()
        ));
    }
    Ok(device)
}

fn measure(
    args: &Args,
    source: &mut Backend,
    destination: &mut Backend,
    entry: &mut BackendReport,
    report: &mut MigrateReport,
) -> Result<(), String> {
    let io_timeout = Duration::from_secs_f64(args.io_timeout);
    let source_control = source
        .control_socket()
        .ok_or("the source has no control socket")?
        .to_owned();
    let destination_control = destination
        .control_socket()
        .ok_or("the destination has no control socket")?
        .to_owned();

    // The fill: every page once.
    let mut device = open(source, args)?;
    let pages = device.capacity.min(args.size) / PAGE_SIZE as u64;
    let mut workload = Workload::new(
        args.seed,
        std::sync::Arc::new(PagePool::new(args.seed, args.pool_pages as usize)),
        1,
        args.queues as usize,
        args.queue_depth as usize,
        pages,
        true,
    );
    let exit_probe = source.exit_probe();
    let reporter = ProgressReporter::new(entry.backend.label(), Phase::Fill);
    let cpu_before = source.cpu_time().transpose()?;
    let control = RunControl {
        stop: &STOP,
        io_timeout,
        backend_alive: &|| exit_probe.check(),
        progress: &|progress| reporter.update(progress),
    };
    let result = workload.run(
        &mut device,
        Phase::Fill,
        Duration::from_secs_f64(args.duration),
        &control,
    );
    reporter.finish(result.as_ref().err());
    let mut phase = PhaseReport::from(&result?);
    if let (Some(before), Some(after)) = (cpu_before, source.cpu_time().transpose()?) {
        phase.set_daemon_cpu(after.saturating_sub(before));
    }
    entry.phases.push(phase);
    if STOP.load(Ordering::Relaxed) || !workload.filled() {
        return Err("interrupted".into());
    }
    source.wait_drained(Duration::from_secs(10))?;
    let mm = source
        .mm_stat()
        .transpose()?
        .ok_or("the source has no mm_stat")?;
    entry.mm_stat_after_fill = Some(mm);
    report.orig_data_size = mm.mm.orig_data_size;
    report.compr_data_size = mm.mm.compr_data_size;

    // The idle guest: every stored page once.
    eprintln!("migrate: ctl migrate {} on the source", report.endpoint);
    let endpoint: Endpoint = report
        .endpoint
        .parse()
        .map_err(|e| format!("{}: {e}", report.endpoint))?;
    let started = Instant::now();
    control::request(&source_control, Command::Migrate(endpoint))
        .map_err(|e| format!("ctl migrate: {e}"))?;
    let copied = loop {
        let now = status(&source_control)?;
        if now.failed() {
            return Err(format!(
                "the migration {} during the idle copy: {}",
                now.state, now.error
            ));
        }
        if now.rounds >= 1 && now.dirty_pages == 0 {
            break now;
        }
        if started.elapsed() > COPY_TIMEOUT || STOP.load(Ordering::Relaxed) {
            return Err(format!(
                "round 1 not done after {:.0} s: {now:?}",
                started.elapsed().as_secs_f64()
            ));
        }
        std::thread::sleep(POLL);
    };
    let copy = started.elapsed().as_secs_f64();
    report.idle = Some(IdleCopy {
        pages: copied.pages,
        rounds: copied.rounds,
        wire_bytes: copied.wire_bytes,
        stored_bytes: copied.stored_bytes,
        wire_per_compr: copied.wire_bytes as f64 / report.compr_data_size.max(1) as f64,
        copy_ms: copy * 1e3,
        orig_mib_per_second: mib(report.orig_data_size) / copy,
        wire_mib_per_second: mib(copied.wire_bytes) / copy,
    });

    // The writing guest: new pages at random during pre-copy, then the switchover.
    let dirty = workload.written_page_sample(
        usize::try_from(args.migrate_dirty / PAGE_SIZE as u64).unwrap_or(usize::MAX),
        args.seed ^ 0xd127,
    );
    let written_at = Instant::now();
    let dirty_pages_written = workload.write_pages(&mut device, &dirty, io_timeout)?;
    let dirty_write_ms = written_at.elapsed().as_secs_f64() * 1e3;
    let before_stop = status(&source_control)?;
    if before_stop.failed() {
        return Err(format!(
            "the migration {} during pre-copy: {}",
            before_stop.state, before_stop.error
        ));
    }
    // A written page, if any, is what the first read on the destination checks.
    let first = dirty
        .first()
        .copied()
        .or_else(|| workload.written_page_sample(1, args.seed).first().copied())
        .ok_or("no written page to read")?;
    eprintln!(
        "migrate: {dirty_pages_written} pages rewritten; disconnecting from the source, \
         reading from the destination"
    );
    let stopped = Instant::now();
    drop(device);
    let mut device = open(destination, args)?;
    let destination_started = stopped.elapsed();
    workload.read_back(&mut device, &[first], io_timeout)?;
    let switchover = stopped.elapsed();
    let after = status(&destination_control)?;
    report.switchover = Some(Switchover {
        dirty_pages_written,
        dirty_write_ms,
        source_pages_before_stop: before_stop.pages,
        source_rounds_before_stop: before_stop.rounds,
        dirty_pages_at_stop: before_stop.dirty_pages,
        destination_pages: after.pages,
        destination_state: after.state.clone(),
        destination_wire_bytes: after.wire_bytes,
        pages_after_stop_at_most: after.pages.saturating_sub(before_stop.pages),
        destination_started_ms: destination_started.as_secs_f64() * 1e3,
        switchover_ms: switchover.as_secs_f64() * 1e3,
    });

    // Every written page, from the destination.
    let all = workload.written_page_sample(usize::MAX, args.seed);
    eprintln!("migrate: verifying {} pages on the destination", all.len());
    let read_at = Instant::now();
    let read = workload.read_back(&mut device, &all, io_timeout);
    let ms = read_at.elapsed().as_secs_f64() * 1e3;
    let verification = match &read {
        Ok(read) => Verification {
            pages: all.len() as u64,
            verified_pages: read.verified,
            ms,
            error: None,
        },
        Err(e) => Verification {
            pages: all.len() as u64,
            verified_pages: 0,
            ms,
            error: Some(e.clone()),
        },
    };
    let passed = verification.passed();
    report.verify = Some(verification);
    entry.mm_stat_at_end = destination.mm_stat().transpose()?;
    entry
        .notes
        .push("mm_stat at end: the destination's, after the verification".into());
    drop(device);
    if !passed {
        return Err(format!(
            "the destination does not hold what was written: {}",
            read.err().unwrap_or_else(|| "pages missing".into())
        ));
    }
    Ok(())
}

/// The migration block of the text output.
pub fn render(report: &MigrateReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n== live migration (--migrate): source to destination over {} ==",
        report.endpoint
    );
    let _ = writeln!(
        out,
        "source after the fill: orig_data_size {:.1} MiB, compr_data_size {:.1} MiB",
        mib(report.orig_data_size),
        mib(report.compr_data_size)
    );
    if let Some(idle) = &report.idle {
        let _ = writeln!(
            out,
            "idle guest, full copy: {} page records, {} round(s), {:.1} MiB on the wire \
             ({:.1} MiB stored bytes) in {:.1} ms: {:.1} MiB/s of orig data, {:.1} MiB/s on the \
             wire",
            idle.pages,
            idle.rounds,
            mib(idle.wire_bytes),
            mib(idle.stored_bytes),
            idle.copy_ms,
            idle.orig_mib_per_second,
            idle.wire_mib_per_second
        );
    }
    if let Some(s) = &report.switchover {
        let _ = writeln!(
            out,
            "writing guest: {} pages ({:.1} MiB) rewritten at random during pre-copy in {:.1} \
             ms; at the disconnect the source had sent {} page records in {} round(s), {} \
             dirty; the destination received {} in all ({}), so at most {} after the stop; its \
             blkio_start returned {:.1} ms after the disconnect",
            s.dirty_pages_written,
            mib(s.dirty_pages_written * PAGE_SIZE as u64),
            s.dirty_write_ms,
            s.source_pages_before_stop,
            s.source_rounds_before_stop,
            s.dirty_pages_at_stop,
            s.destination_pages,
            s.destination_state,
            s.pages_after_stop_at_most,
            s.destination_started_ms
        );
    }
    let _ = writeln!(
        out,
        "{:<34} {:>14} {:>12} {:>10} {:>8}",
        "measure", "value", "target", "ratio", "verdict"
    );
    let row = |out: &mut String, name: &str, value: String, target: String, ratio: f64| {
        let verdict = if ratio <= 1.0 { "met" } else { "missed" };
        let _ = writeln!(
            out,
            "{name:<34} {value:>14} {target:>12} {:>10} {verdict:>8}",
            format!("{ratio:.3}x")
        );
    };
    match &report.idle {
        Some(idle) => row(
            &mut out,
            "wire / compr_data_size (idle)",
            format!("{:.4}", idle.wire_per_compr),
            format!("<= {WIRE_PER_COMPR_TARGET}"),
            idle.wire_per_compr / WIRE_PER_COMPR_TARGET,
        ),
        None => {
            let _ = writeln!(out, "{:<34} {:>14}", "wire / compr_data_size (idle)", "-");
        }
    }
    match &report.switchover {
        Some(s) => {
            let dirty = s.dirty_pages_written * PAGE_SIZE as u64;
            let name = format!("switchover, {:.1} MiB dirty", mib(dirty));
            let value = format!("{:.1} ms", s.switchover_ms);
            let target = format!("<= {SWITCHOVER_TARGET_MS:.0} ms");
            if dirty <= DIRTY_TARGET_BYTES {
                row(
                    &mut out,
                    &name,
                    value,
                    target,
                    s.switchover_ms / SWITCHOVER_TARGET_MS,
                );
            } else {
                let _ = writeln!(
                    out,
                    "{name:<34} {value:>14} {target:>12} {:>10} {:>8}",
                    "n/a", "n/a"
                );
            }
        }
        None => {
            let _ = writeln!(out, "{:<34} {:>14}", "switchover", "-");
        }
    }
    match &report.verify {
        Some(v) => {
            let _ = writeln!(
                out,
                "{:<34} {:>14} {:>12} {:>10} {:>8}",
                "destination pages verified",
                format!("{}/{}", v.verified_pages, v.pages),
                "all",
                "",
                if v.passed() { "passed" } else { "FAILED" }
            );
        }
        None => {
            let _ = writeln!(out, "{:<34} {:>14}", "destination pages verified", "-");
        }
    }
    let _ = writeln!(
        out,
        "(the bench's disconnect from the source stands in for QEMU's GET_VRING_BASE: it stops \
         the source's queues, the switchover signal; switchover = that disconnect to the first \
         read completed on the destination, through a new libblkio frontend)"
    );
    if let Some(v) = &report.verify {
        if let Some(error) = &v.error {
            let _ = writeln!(out, "verification: {error}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_lines_parse() {
        let text = "role source\nstate precopy\npeer unix:/x\nrounds 2\npages 10\n\
                    wire_bytes 5000\nstored_bytes 4000\nwire_per_stored 1.250\ndirty_pages 3\n\
                    elapsed_ms 17\nerror -\n";
        let status = Status::parse(text).unwrap();
        assert_eq!(status.state, "precopy");
        assert_eq!(
            (
                status.rounds,
                status.pages,
                status.wire_bytes,
                status.dirty_pages
            ),
            (2, 10, 5000, 3)
        );
        assert!(!status.failed());
        assert!(Status::parse("state idle\n").is_err());
    }

    #[test]
    fn the_table_gives_each_target_a_verdict() {
        let report = MigrateReport {
            endpoint: "unix:/run/stream.sock".into(),
            orig_data_size: 64 << 20,
            compr_data_size: 20 << 20,
            idle: Some(IdleCopy {
                pages: 16384,
                rounds: 1,
                wire_bytes: 21 << 20,
                stored_bytes: 20 << 20,
                wire_per_compr: 1.05,
                copy_ms: 100.0,
                orig_mib_per_second: 640.0,
                wire_mib_per_second: 210.0,
            }),
            switchover: Some(Switchover {
                dirty_pages_written: 2560,
                dirty_write_ms: 20.0,
                source_pages_before_stop: 17000,
                source_rounds_before_stop: 3,
                dirty_pages_at_stop: 100,
                destination_pages: 17100,
                destination_state: "completed".into(),
                destination_wire_bytes: 22 << 20,
                pages_after_stop_at_most: 100,
                destination_started_ms: 150.0,
                switchover_ms: 250.0,
            }),
            verify: Some(Verification {
                pages: 16384,
                verified_pages: 16384,
                ms: 50.0,
                error: None,
            }),
        };
        let text = render(&report);
        let line = |start: &str| {
            text.lines()
                .find(|l| l.starts_with(start))
                .unwrap_or_else(|| panic!("no {start} row in {text}"))
                .to_owned()
        };
        assert!(line("wire / compr_data_size").ends_with("met"), "{text}");
        assert!(
            line("switchover, 10.0 MiB dirty").ends_with("missed"),
            "{text}"
        );
        assert!(
            line("destination pages verified").ends_with("passed"),
            "{text}"
        );
        assert!(text.contains("GET_VRING_BASE"));
    }
}
