// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vhost-user-zram-bench`: drives a vhost-user-blk device through libblkio with a swap-like
//! workload and reports IOPS, throughput, latency percentiles and the backend's zram memory
//! statistics; with `--compare`, runs the same workload against vhost-user-zram, kernel zram,
//! qemu-storage-daemon null-co and a /dev/shm file, and prints them side by side.

mod backends;
mod codec_floor;
mod corpus;
mod device;
mod histogram;
mod migrate;
mod plot;
mod pressure;
mod progress;
mod report;
mod units;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Parser;
use vhost_user_zram::store::UnitStats;

use crate::backends::{
    parse_recovered, Backend, BackendKind, DaemonOptions, KernelZram, KernelZramError, RunDir,
};
use crate::device::Device;
use crate::progress::ProgressReporter;
use crate::report::{
    BackendReport, PhaseReport, Report, RestartReport, UnitReads, WorkloadDescription,
};
use crate::workload::{PagePool, Phase, RunControl, Workload};

/// Benchmark a vhost-user-blk device (vhost-user-zram by default) with a swap-like workload.
///
/// Phases, in order: fill (writes every page once, sequentially), randwrite, randread (every read
/// is verified against what was written), mixed (70 % reads, 30 % writes); all 4 KiB requests,
/// `--queue-depth` in flight on each of `--queues` queues. Pages come from the crate's swap-like
/// generator (zero, same-filled, text, pointer-heavy and random pages). Without `--socket` the
/// bench launches vhost-user-zram itself; `--compare` adds kernel zram (when
/// /sys/class/zram-control exists), qemu-storage-daemon null-co (the transport ceiling) and a
/// file on /dev/shm exported by qemu-storage-daemon.
#[derive(Debug, Parser)]
#[command(name = "vhost-user-zram-bench", version)]
struct Args {
    /// Benchmark the vhost-user-blk backend already listening on this socket instead of
    /// launching vhost-user-zram.
    #[arg(long, value_name = "PATH", conflicts_with = "compare")]
    socket: Option<PathBuf>,

    /// With --socket: the backend's vhost-user-zram control socket, to report its mm_stat.
    #[arg(long, value_name = "PATH", requires = "socket")]
    control_socket: Option<PathBuf>,

    /// The vhost-user-zram binary to launch (default: `vhost-user-zram` next to this program).
    #[arg(long, value_name = "PATH")]
    daemon_bin: Option<PathBuf>,

    /// Device size (bytes, or with a K/M/G/T suffix, binary units). Every page is written once by
    /// the fill phase.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,

    /// How long each timed phase (all but fill) runs, in seconds.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    duration: f64,

    /// Requests kept in flight on each queue.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1024))]
    queue_depth: u32,

    /// Virtqueues (threads in the bench; --num-queues of the daemon).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    queues: u32,

    /// Virtqueue size (a power of two ≥ the queue depth); passed to the daemon as --queue-size.
    #[arg(long, default_value_t = 256)]
    queue_size: u32,

    /// Compression algorithm of vhost-user-zram and of kernel zram in --compare (lz4, zstd,
    /// deflate; kernel zram may offer fewer).
    #[arg(long, default_value = "lz4")]
    algorithm: String,

    /// vhost-user-zram's --algorithm-level (kernel zram keeps its default level).
    #[arg(long)]
    algorithm_level: Option<i32>,

    /// Phases to run, comma-separated, from fill, randwrite, randread, seqread, mixed, burst.
    /// Reads are verified only when fill ran first. burst writes --burst-pages pages as fast as
    /// the queue depth allows, after the daemon's workers have caught up. seqread reads the
    /// device in order (--seqread-size each), starting over at its end, for --duration.
    #[arg(long, value_delimiter = ',', default_value = "fill,randwrite,burst,randread,mixed", value_parser = parse_phase)]
    phases: Vec<Phase>,

    /// Pages the burst phase writes (default: what vhost-user-zram's default pending pool
    /// holds on this machine).
    #[arg(long, value_name = "PAGES", value_parser = clap::value_parser!(u64).range(1..))]
    burst_pages: Option<u64>,

    /// Seed of the swap-like page generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,

    /// Distinct swap-like pages the bench makes up front and writes from (64 MiB at the
    /// default); see the workload's documentation for why it does not generate every page.
    #[arg(long, default_value_t = 16384, value_parser = clap::value_parser!(u32).range(1..))]
    pool_pages: u32,

    /// Write the pages of this corpus of real memory (made by --capture-corpus) instead of the
    /// swap-like mix, in order: the fill writes the corpus as it was captured, so pages that
    /// were neighbours in a process are neighbours on the device (see --request-size). Every
    /// backend of the run, kernel zram in --compare too, gets the same pages.
    #[arg(long, value_name = "FILE", conflicts_with = "capture_corpus")]
    corpus: Option<PathBuf>,

    /// Bytes each request moves: 4K (the default, one page, as a guest swaps a page) up to
    /// 1M, a multiple of 4K; 64K writes and reads whole 16-page blocks, as a guest swapping
    /// out 64 KiB folios does. The device's pages past its last whole block are not used.
    #[arg(long, default_value = "4K", value_name = "SIZE", value_parser = parse_request_size)]
    request_size: u64,

    /// Bytes each random read (randread, mixed) moves, a divisor of --request-size (default:
    /// --request-size): `--request-size 64K --read-size 4K` writes 64 KiB blocks and reads
    /// single pages of them at random.
    #[arg(long, value_name = "SIZE", value_parser = parse_request_size)]
    read_size: Option<u64>,

    /// Bytes each read of the seqread phase moves, a divisor of --request-size (default:
    /// --request-size): 32K reads as the guest's readahead does.
    #[arg(long, value_name = "SIZE", value_parser = parse_request_size)]
    seqread_size: Option<u64>,

    /// Capture a corpus of real memory into FILE and exit: the resident anonymous pages of the
    /// processes --capture-pid names, in address order (needs the right to read their memory,
    /// e.g. root). Nothing is benchmarked.
    #[arg(long, value_name = "FILE")]
    capture_corpus: Option<PathBuf>,

    /// With --capture-corpus: a process to capture (repeatable; in the order given).
    #[arg(long = "capture-pid", value_name = "PID", requires = "capture_corpus")]
    capture_pids: Vec<u32>,

    /// With --capture-corpus: the most memory to capture, over all processes.
    #[arg(long, default_value = "1G", value_name = "SIZE", requires = "capture_corpus", value_parser = parse_size)]
    capture_max: u64,

    /// Do not verify read data (verification hashes each page read; it costs bench CPU).
    #[arg(long)]
    no_verify: bool,

    /// Run the workload against vhost-user-zram, kernel zram, qemu-storage-daemon null-co and a
    /// /dev/shm file, and print one side-by-side table.
    #[arg(long)]
    compare: bool,

    /// Run vhost-user-zram a second time with `--state` on a file in /dev/shm (removed
    /// afterwards), beside the one with anonymous memory, and compare: IOPS per phase with the
    /// ratio state / anonymous, and mem_used_total. Then, unless --no-restart-check, kill the
    /// state daemon with SIGKILL, start it again on the same file and socket, and measure the
    /// time to its socket accepting and to the first read served, and verify a sample of pages.
    #[arg(long, conflicts_with = "socket")]
    compare_state: bool,

    /// Run vhost-user-zram a second time with `--reclaim-on-pressure`, beside the one without,
    /// on a host under no memory pressure, and compare IOPS per phase (held to a ratio
    /// on / off >= 0.98); with --rounds 3 the two alternate and the medians are compared.
    #[arg(long, conflicts_with = "socket")]
    compare_pressure: bool,

    /// Compare multi-page units (comma-separated unit sizes, e.g. 16K,64K): vhost-user-zram
    /// per page (`--unit-max=4K`), with `--unit-max=SIZE` for each size, and kernel zram (same
    /// algorithm, same pages), back to back (alternating with --rounds); then a markdown table
    /// with each one's ratio to per-page and the units' targets (see --units-table). With a
    /// daemon that has no --unit-max, per-page runs without it and the unit sizes are skipped.
    #[arg(long, value_name = "SIZES", value_delimiter = ',', value_parser = parse_unit_size, conflicts_with_all = ["socket", "compare", "compare_state", "compare_pressure"])]
    compare_units: Vec<u64>,

    /// With --compare-units: also write the markdown table alone to FILE (`-`: stdout, instead
    /// of the tables).
    #[arg(long, value_name = "FILE|-", requires = "compare_units")]
    units_table: Option<String>,

    /// With --compare-state: skip the kill-and-restart measurement.
    #[arg(long, requires = "compare_state")]
    no_restart_check: bool,

    /// Pages the restart check reads back and verifies after the restart (random written
    /// pages; every one when the device has fewer).
    #[arg(long, default_value_t = 4096, value_name = "PAGES", value_parser = clap::value_parser!(u64).range(1..))]
    restart_sample_pages: u64,

    /// Benchmark live migration (issue 18): launch a source and a destination vhost-user-zram
    /// (`--incoming unix:RUNDIR/stream.sock`), fill the source, `ctl migrate` it and measure
    /// the idle full copy (wire bytes against compr_data_size), then write --migrate-dirty bytes
    /// at random pages during pre-copy, disconnect from the source (standing in for QEMU's
    /// GET_VRING_BASE) and measure the time to the first read served by the destination; then
    /// verify every page on the destination. Only the fill phase runs.
    #[arg(long, conflicts_with_all = ["socket", "compare", "compare_state"])]
    migrate: bool,

    /// With --migrate: bytes of new swap-like pages written at random pages during pre-copy,
    /// before the switchover (K/M/G suffixes; 0 for none).
    #[arg(long, default_value = "10M", value_name = "SIZE", requires = "migrate", value_parser = parse_dirty_size)]
    migrate_dirty: u64,

    /// The polling window of the extra vhost-user-zram in --compare, `vuz --poll N`
    /// (--poll-max-us N), beside the default that does not poll; 0 leaves it out.
    #[arg(long, default_value_t = 50, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=10_000))]
    compare_poll_us: u32,

    /// Run the whole set of backends this many times, alternating, and report each phase's
    /// median round: on a shared machine, load from other processes then hits every backend
    /// alike instead of one.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=99))]
    rounds: u32,

    /// Write the results as JSON to FILE, or to stdout with `-` (the default when the flag has no
    /// value) instead of the tables.
    #[arg(long, value_name = "FILE|-", num_args = 0..=1, default_missing_value = "-")]
    json: Option<String>,

    /// Write one CSV row per backend and phase to FILE, or to stdout with `-` instead of the
    /// tables. Units: IOPS, MiB/s, microseconds, seconds.
    #[arg(long, value_name = "FILE|-")]
    csv: Option<String>,

    /// Draw IOPS and p50/p99 latency per phase, every backend side by side, as an SVG chart.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,

    /// Fail a phase when no request completes for this long, in seconds (a hung or dead
    /// backend); a backend the bench launched is also watched and fails the run as soon as it
    /// exits.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    io_timeout: f64,

    /// Extra argument for vhost-user-zram (repeatable), e.g. --daemon-arg=--mem-limit=2G.
    #[arg(long = "daemon-arg", value_name = "ARG", allow_hyphen_values = true)]
    daemon_args: Vec<String>,
}

fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = &text[digits.len()..];
    let number: u64 = digits
        .parse()
        .map_err(|e| format!("'{text}' is not a size: {e}"))?;
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(format!("unknown size suffix '{suffix}' (use K, M, G or T)")),
    };
    let bytes = number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("'{text}' is too large"))?;
    if bytes == 0 || bytes % vhost_user_zram::PAGE_SIZE as u64 != 0 {
        return Err(format!("'{text}' is not a positive multiple of 4 KiB"));
    }
    Ok(bytes)
}

/// `--request-size`: a size as `--size` takes it, at most 1 MiB.
fn parse_request_size(text: &str) -> Result<u64, String> {
    let bytes = parse_size(text)?;
    if bytes > 1 << 20 {
        return Err(format!("'{text}' is more than 1M"));
    }
    Ok(bytes)
}

/// `--compare-units`: a unit size as `--size` takes it, more than a page, at most 1 MiB.
fn parse_unit_size(text: &str) -> Result<u64, String> {
    let bytes = parse_request_size(text)?;
    if bytes == PAGE_BYTES {
        return Err("4K is per-page, which --compare-units always runs; give larger sizes".into());
    }
    Ok(bytes)
}

/// `--migrate-dirty`: a size as `--size` takes it, or 0.
fn parse_dirty_size(text: &str) -> Result<u64, String> {
    if text.trim() == "0" {
        return Ok(0);
    }
    parse_size(text)
}

fn parse_phase(text: &str) -> Result<Phase, String> {
    match text {
        "fill" => Ok(Phase::Fill),
        "randwrite" => Ok(Phase::RandWrite),
        "randread" => Ok(Phase::RandRead),
        "mixed" => Ok(Phase::Mixed),
        "burst" => Ok(Phase::Burst),
        "seqread" => Ok(Phase::SeqRead),
        _ => Err(format!(
            "unknown phase '{text}' (fill, randwrite, randread, seqread, mixed, burst)"
        )),
    }
}

/// Raised by SIGINT/SIGTERM: phases stop early and every backend is torn down normally.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_signal: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn install_signal_handlers() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: `on_signal` is async-signal-safe (one atomic store) and has the signature
        // `signal` expects.
        unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    install_signal_handlers();
    if let Some(path) = &args.capture_corpus {
        return capture_corpus(&args, path);
    }
    let result = check_outputs(&args).and_then(|()| run(&args));
    match result {
        Ok(report) => {
            if let Err(e) = write_outputs(&args, &report) {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
            let failures: Vec<String> = report
                .backends
                .iter()
                .filter_map(|b| {
                    b.error
                        .as_ref()
                        .map(|e| format!("{}: {e}", b.backend.label()))
                })
                .collect();
            if failures.is_empty() {
                ExitCode::SUCCESS
            } else {
                for failure in failures {
                    eprintln!("error: {failure}");
                }
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--capture-corpus`: captures and says what it took.
fn capture_corpus(args: &Args, path: &std::path::Path) -> ExitCode {
    if args.capture_pids.is_empty() {
        eprintln!("error: --capture-corpus needs at least one --capture-pid");
        return ExitCode::FAILURE;
    }
    let max_pages = args.capture_max / vhost_user_zram::PAGE_SIZE as u64;
    match corpus::capture(path, &args.capture_pids, max_pages) {
        Ok(sources) => {
            for source in &sources {
                println!(
                    "captured {} pages ({} MiB) of {} (pid {})",
                    source.pages,
                    source.pages >> 8,
                    source.comm,
                    source.pid
                );
            }
            let total: u64 = sources.iter().map(|s| s.pages).sum();
            println!("{}: {total} pages", path.display());
            if total == 0 {
                eprintln!("error: nothing was captured");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: capture: {e}");
            ExitCode::FAILURE
        }
    }
}

const PAGE_BYTES: u64 = vhost_user_zram::PAGE_SIZE as u64;

/// Pages a request moves (`--request-size`).
fn block_pages(args: &Args) -> u64 {
    args.request_size / PAGE_BYTES
}

/// Pages a random read and a sequential read move (`--read-size`, `--seqread-size`).
fn read_pages(args: &Args) -> (u64, u64) {
    (
        args.read_size.unwrap_or(args.request_size) / PAGE_BYTES,
        args.seqread_size.unwrap_or(args.request_size) / PAGE_BYTES,
    )
}

/// Bytes a request moves.
fn request_bytes(args: &Args) -> usize {
    usize::try_from(args.request_size).unwrap_or(vhost_user_zram::PAGE_SIZE)
}

/// The pages the workload writes: the corpus, or the swap-like mix.
fn page_pool(args: &Args) -> Result<(std::sync::Arc<PagePool>, Option<String>), String> {
    match &args.corpus {
        Some(path) => {
            let corpus = corpus::Corpus::load(path).map_err(|e| e.to_string())?;
            let described = format!("{}: {}", path.display(), corpus.describe());
            Ok((
                std::sync::Arc::new(PagePool::from_corpus(corpus.pages)),
                Some(described),
            ))
        }
        None => Ok((
            std::sync::Arc::new(PagePool::new(args.seed, args.pool_pages as usize)),
            None,
        )),
    }
}

/// Refuses output flags that cannot all be honoured, before anything runs.
fn check_outputs(args: &Args) -> Result<(), String> {
    let to_stdout = [&args.json, &args.csv, &args.units_table]
        .into_iter()
        .filter(|target| target.as_deref() == Some("-"))
        .count();
    if to_stdout > 1 {
        return Err(
            "two of --json, --csv and --units-table cannot both write to stdout (-); give one a file"
                .into(),
        );
    }
    let (random_read, seq_read) = read_pages(args);
    for (flag, pages) in [("--read-size", random_read), ("--seqread-size", seq_read)] {
        if !block_pages(args).is_multiple_of(pages) {
            return Err(format!("{flag} must divide --request-size"));
        }
    }
    if args
        .plot
        .as_ref()
        .is_some_and(|path| path.extension().is_none_or(|e| e != "svg"))
    {
        return Err("--plot writes SVG; give a file name ending in .svg".into());
    }
    if args.io_timeout.is_nan() || args.io_timeout <= 0.0 {
        return Err("--io-timeout must be positive".into());
    }
    Ok(())
}

/// Writes `text` to `target`: a file, or stdout for `-`.
fn write_to(target: &str, text: &str) -> Result<(), String> {
    if target == "-" {
        use std::io::Write as _;
        let mut stdout = std::io::stdout().lock();
        stdout
            .write_all(text.as_bytes())
            .and_then(|()| stdout.flush())
            .map_err(|e| format!("write to stdout: {e}"))
    } else {
        std::fs::write(target, text).map_err(|e| format!("write {target}: {e}"))
    }
}

/// The tables on stdout unless JSON or CSV go there, then every requested file.
fn write_outputs(args: &Args, report: &Report) -> Result<(), String> {
    let stdout_taken = [&args.json, &args.csv, &args.units_table]
        .into_iter()
        .any(|target| target.as_deref() == Some("-"));
    if !stdout_taken {
        print!("{}", report.render());
    }
    if let Some(target) = &args.json {
        let mut text = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
        text.push('\n');
        write_to(target, &text)?;
    }
    if let Some(target) = &args.csv {
        write_to(target, &report.render_csv())?;
    }
    if let Some(target) = &args.units_table {
        write_to(target, &units::render_markdown(report))?;
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, plot::render_svg(report))
            .map_err(|e| format!("write {}: {e}", path.display()))?;
    }
    Ok(())
}

/// What vhost-user-zram's default pending pool holds here: the burst it absorbs.
fn default_burst_pages() -> u64 {
    (vhost_user_zram::cli::default_workers()
        * vhost_user_zram::cli::DEFAULT_PENDING_PAGES_PER_WORKER) as u64
}

fn default_daemon_binary() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("locate this program: {e}"))?;
    Ok(exe.with_file_name("vhost-user-zram"))
}

fn run(args: &Args) -> Result<Report, String> {
    if args.queue_size < args.queue_depth || !args.queue_size.is_power_of_two() {
        return Err("--queue-size must be a power of two ≥ --queue-depth".into());
    }
    if args.duration.is_nan() || args.duration <= 0.0 {
        return Err("--duration must be positive".into());
    }
    let daemon = DaemonOptions {
        binary: match &args.daemon_bin {
            Some(path) => path.clone(),
            None => default_daemon_binary()?,
        },
        algorithm: args.algorithm.clone(),
        level: args.algorithm_level,
        queue_size: args.queue_size as usize,
        extra_args: args.daemon_args.clone(),
    };
    if args.migrate && (args.corpus.is_some() || args.request_size != PAGE_BYTES) {
        return Err(
            "--migrate writes the swap-like mix in 4K requests; drop --corpus and --request-size"
                .into(),
        );
    }
    let (pool, corpus) = page_pool(args)?;
    let dir = RunDir::create()?;
    let queues = args.queues as usize;
    let mut plan = vec![if args.socket.is_some() {
        BackendKind::External
    } else {
        BackendKind::VhostUserZram
    }];
    if args.compare_state {
        plan.push(BackendKind::VhostUserZramState);
    }
    if args.compare_pressure {
        plan.push(BackendKind::VhostUserZramPressure);
    }
    // Whether the daemon takes --unit-max; `None` unless units are compared.
    let units_supported = if args.compare_units.is_empty() {
        None
    } else {
        let supported = units::daemon_has_unit_max(&daemon.binary)?;
        if supported {
            // Per-page, said explicitly: the daemon's default may change.
            plan[0] = BackendKind::VhostUserZramUnits(1);
        } else {
            eprintln!("{}", units::no_unit_max_warning(&daemon.binary));
        }
        for &size in &args.compare_units {
            plan.push(BackendKind::VhostUserZramUnits(
                u32::try_from(size / PAGE_BYTES).unwrap_or(u32::MAX),
            ));
        }
        plan.push(BackendKind::KernelZram);
        Some(supported)
    };
    if args.compare {
        // Polling off (the default) against on, the compression workers against the queue
        // thread compressing (`--workers 0`), and against one worker when the default is
        // another number.
        if args.socket.is_none() {
            if args.compare_poll_us > 0 {
                plan.push(BackendKind::VhostUserZramPolling(args.compare_poll_us));
            }
            plan.push(BackendKind::VhostUserZramInline);
            if vhost_user_zram::cli::default_workers() != 1 {
                plan.push(BackendKind::VhostUserZramOneWorker);
            }
        }
        plan.extend([
            BackendKind::KernelZram,
            BackendKind::QsdNull,
            BackendKind::QsdShmFile,
        ]);
    }
    let mut report = Report {
        workload: WorkloadDescription {
            size_bytes: args.size,
            pages: args.size / vhost_user_zram::PAGE_SIZE as u64,
            queues: args.queues,
            queue_depth: args.queue_depth,
            queue_size: args.queue_size,
            block_size: request_bytes(args),
            seconds_per_phase: args.duration,
            rounds: args.rounds,
            seed: args.seed,
            pool_pages: args.pool_pages,
            corpus,
            algorithm: args.algorithm.clone(),
            algorithm_level: args.algorithm_level,
            verify: !args.no_verify,
            compare_poll_max_us: plan.iter().find_map(|kind| match kind {
                BackendKind::VhostUserZramPolling(max_us) => Some(*max_us),
                _ => None,
            }),
        },
        codec_floor: None,
        codec_floor_error: None,
        backends: Vec::new(),
        migration: None,
    };
    if args.migrate {
        let (entry, migration) = migrate::run(args, &dir, &daemon);
        eprintln!("{}", entry.progress_line());
        report.backends.push(entry);
        report.migration = migration;
        return Ok(report);
    }
    // Once, whatever the rounds: it does not depend on the backend.
    match codec_floor::CodecFloor::measure(
        &args.algorithm,
        args.algorithm_level,
        pool.pages(),
        codec_floor::TARGET_CPU,
    ) {
        Ok(floor) => {
            eprintln!("{}", floor.line());
            report.codec_floor = Some(floor);
        }
        Err(e) => report.codec_floor_error = Some(e),
    }
    let mut all_rounds: Vec<BackendReport> = Vec::new();
    for round in 0..args.rounds {
        // Every other round runs the plan backwards, so that no backend always runs first
        // (on a fresh machine) or last.
        let order: Vec<BackendKind> = if round % 2 == 0 {
            plan.clone()
        } else {
            plan.iter().rev().copied().collect()
        };
        for &kind in &order {
            if STOP.load(Ordering::Relaxed) {
                break;
            }
            if args.rounds > 1 {
                eprintln!("round {} of {}: {}", round + 1, args.rounds, kind.label());
            }
            let started = match kind {
                BackendKind::External => Ok(Backend::external(
                    args.socket.clone().expect("--socket"),
                    args.control_socket.clone(),
                    daemon.binary.clone(),
                )),
                BackendKind::VhostUserZram
                | BackendKind::VhostUserZramPolling(_)
                | BackendKind::VhostUserZramInline
                | BackendKind::VhostUserZramOneWorker
                | BackendKind::VhostUserZramState
                | BackendKind::VhostUserZramPressure => {
                    Backend::vhost_user_zram(&dir, kind, &daemon, args.size, queues)
                }
                BackendKind::VhostUserZramUnits(_) if units_supported == Some(false) => {
                    all_rounds.push(BackendReport::skipped(
                        kind,
                        units::no_unit_max_warning(&daemon.binary),
                    ));
                    continue;
                }
                BackendKind::VhostUserZramUnits(_) => {
                    Backend::vhost_user_zram(&dir, kind, &daemon, args.size, queues)
                }
                BackendKind::QsdNull | BackendKind::QsdShmFile => {
                    Backend::qemu_storage_daemon(&dir, kind, args.size, queues)
                }
                BackendKind::KernelZram => {
                    if !KernelZram::supported() {
                        all_rounds.push(BackendReport::skipped(
                            kind,
                            "no /sys/class/zram-control (zram module not loaded?)".into(),
                        ));
                        continue;
                    }
                    match Backend::kernel_zram(&args.algorithm, args.size) {
                        Ok(backend) => Ok(backend),
                        Err(KernelZramError::AlgorithmUnavailable(offered)) => {
                            all_rounds.push(BackendReport::skipped(
                                kind,
                                format!(
                                    "{} not available in this kernel's zram (offers: {offered})",
                                    args.algorithm
                                ),
                            ));
                            continue;
                        }
                        Err(KernelZramError::Failed(e)) => Err(e),
                    }
                }
            };
            let entry = match started {
                Ok(backend) => run_backend(args, backend, &pool),
                Err(e) => BackendReport::failed(kind, e),
            };
            eprintln!("{}", entry.progress_line());
            all_rounds.push(entry);
        }
    }
    report.backends = plan
        .iter()
        .map(|&kind| {
            BackendReport::median_of(
                all_rounds
                    .iter()
                    .filter(|entry| entry.backend == kind)
                    .collect(),
            )
        })
        .collect();
    report.apply_codec_floor();
    Ok(report)
}

/// Runs every phase against one backend and tears it down.
fn run_backend(
    args: &Args,
    mut backend: Backend,
    pool: &std::sync::Arc<PagePool>,
) -> BackendReport {
    let kind = backend.kind;
    let mut entry = BackendReport::new(kind, backend.kernel_zram.as_ref().map(|z| z.name()));
    let queues = args.queues as usize;
    let queue_depth = args.queue_depth as usize;
    let exit_probe = backend.exit_probe();
    let result = (|| -> Result<(), String> {
        let mut device = Device::open(
            &backend.transport,
            queues,
            args.queue_size as usize,
            Workload::buffer_bytes_per_lane(queue_depth, block_pages(args)),
            Duration::from_secs(10),
        )?;
        if device.lanes.len() != queues {
            return Err(format!(
                "asked for {queues} queues, got {}",
                device.lanes.len()
            ));
        }
        let pages = device.capacity.min(args.size) / vhost_user_zram::PAGE_SIZE as u64;
        if device.capacity < args.size {
            entry.notes.push(format!(
                "device capacity {} bytes is below --size; using {pages} pages",
                device.capacity
            ));
        }
        let verify = !args.no_verify && kind.keeps_data();
        if !kind.keeps_data() {
            entry
                .notes
                .push("reads not verified: null-co keeps no data".into());
        }
        let mut workload = Workload::new(
            args.seed,
            std::sync::Arc::clone(pool),
            block_pages(args),
            queues,
            queue_depth,
            pages,
            verify,
        );
        workload.set_burst_pages(args.burst_pages.unwrap_or_else(default_burst_pages));
        let (random_read, seq_read) = read_pages(args);
        workload.set_read_pages(random_read, seq_read)?;
        for &phase in &args.phases {
            if STOP.load(Ordering::Relaxed) {
                entry.notes.push("interrupted".into());
                break;
            }
            if phase == Phase::Burst {
                // A burst meets an empty pending pool, as after a quiet spell.
                backend.wait_drained(Duration::from_secs(10))?;
            }
            let reporter = ProgressReporter::new(kind.label(), phase);
            let units_before = unit_stats(&backend)?;
            let cpu_before = backend.cpu_time().transpose()?;
            let threads_before = backend.thread_cpu().transpose()?;
            let control = RunControl {
                stop: &STOP,
                io_timeout: Duration::from_secs_f64(args.io_timeout),
                backend_alive: &|| exit_probe.check(),
                progress: &|progress| reporter.update(progress),
            };
            let result = workload.run(
                &mut device,
                phase,
                Duration::from_secs_f64(args.duration),
                &control,
            );
            reporter.finish(result.as_ref().err());
            let result = result?;
            let mut report = PhaseReport::from(&result);
            if let (Some(before), Some(after)) = (cpu_before, backend.cpu_time().transpose()?) {
                report.set_daemon_cpu(after.saturating_sub(before));
            }
            if let (Some(before), Some(after)) = (threads_before, backend.thread_cpu().transpose()?)
            {
                report.set_thread_cpu(after.since(before));
            }
            if let (Some(before), Some(after)) = (units_before, unit_stats(&backend)?) {
                report.unit_reads = Some(UnitReads::between(&before, &after));
            }
            if phase == Phase::Fill {
                // Memory once the workers have caught up and the pool has drained.
                backend.wait_drained(Duration::from_secs(10))?;
                if let (Some(before), Some(after)) = (cpu_before, backend.cpu_time().transpose()?) {
                    let pages = result.requests * block_pages(args);
                    report.drained_cpu_us_per_page = (pages > 0)
                        .then(|| after.saturating_sub(before).as_secs_f64() * 1e6 / pages as f64);
                }
                entry.mm_stat_after_fill = backend.mm_stat().transpose()?;
            }
            entry.phases.push(report);
        }
        entry.mm_stat_at_end = backend.mm_stat().transpose()?;
        if kind == BackendKind::VhostUserZramState && !args.no_restart_check {
            if !workload.filled() {
                entry
                    .notes
                    .push("restart check skipped: it needs the fill phase".into());
            } else if !STOP.load(Ordering::Relaxed) {
                let pages_at_kill = entry
                    .mm_stat_at_end
                    .map(|m| m.mm.orig_data_size / vhost_user_zram::PAGE_SIZE as u64);
                let mut restart = restart_check(args, &mut backend, device, &workload)?;
                restart.pages_at_kill = pages_at_kill;
                entry.restart = Some(restart);
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        entry.error = Some(e);
    }
    // The device was dropped inside the closure: the frontend has disconnected. vhost-user-zram
    // exits by itself then; qemu-storage-daemon is killed.
    if let Some(process) = backend.process.as_mut() {
        let exits_by_itself = matches!(
            kind,
            BackendKind::VhostUserZram
                | BackendKind::VhostUserZramState
                | BackendKind::VhostUserZramPressure
                | BackendKind::VhostUserZramUnits(_)
        );
        let wait = if exits_by_itself {
            Duration::from_secs(10)
        } else {
            Duration::ZERO
        };
        let status = process.finish(wait);
        if exits_by_itself {
            match status {
                Some(status) if status.success() => {}
                Some(status) => entry.notes.push(format!("daemon exited with {status}")),
                None => entry
                    .notes
                    .push("daemon did not exit after the disconnect; killed".into()),
            }
            if entry.error.is_some() {
                entry
                    .notes
                    .push(format!("daemon log:\n{}", process.log_tail()));
            }
        }
    }
    entry
}

/// The unit counters of a vhost-user-zram with units, from `ctl stats --json`; `None` for any
/// other backend.
fn unit_stats(backend: &Backend) -> Result<Option<UnitStats>, String> {
    if !matches!(backend.kind, BackendKind::VhostUserZramUnits(_)) {
        return Ok(None);
    }
    Ok(backend.mm_stat().transpose()?.and_then(|m| m.units))
}

/// Kills the state daemon with SIGKILL while `device` is connected (a crash: the state keeps
/// the pages), starts it again on the same state file and socket, reconnects from this same
/// process with a new libblkio instance, and reads back a sample of pages.
fn restart_check(
    args: &Args,
    backend: &mut Backend,
    device: Device,
    workload: &Workload,
) -> Result<RestartReport, String> {
    let queues = args.queues as usize;
    let io_timeout = Duration::from_secs_f64(args.io_timeout);
    let sample = workload.written_page_sample(
        usize::try_from(args.restart_sample_pages).unwrap_or(usize::MAX),
        args.seed,
    );
    let (first, rest) = sample.split_first().ok_or("no written page to read back")?;
    eprintln!(
        "{}: restart check: SIGKILL, start again",
        backend.kind.label()
    );
    // Killed first, so the frontend's disconnect cannot be seen as the VM ending.
    backend.kill_daemon()?;
    drop(device);
    let restarted = backend.restart_daemon()?;
    let mut device = Device::open(
        &backend.transport,
        queues,
        args.queue_size as usize,
        Workload::buffer_bytes_per_lane(args.queue_depth as usize, block_pages(args)),
        Duration::from_secs(10),
    )?;
    let first_read = workload.read_back(&mut device, std::slice::from_ref(first), io_timeout)?;
    let first_read_ms = restarted.spawned.elapsed().as_secs_f64() * 1e3;
    let sample_started = std::time::Instant::now();
    let rest_read = workload.read_back(&mut device, rest, io_timeout)?;
    let sample_ms = sample_started.elapsed().as_secs_f64() * 1e3;
    let recovered = backend.daemon_log().as_deref().and_then(parse_recovered);
    Ok(RestartReport {
        pages_at_kill: None,
        socket_accepting_ms: restarted.accepting_after.as_secs_f64() * 1e3,
        first_read_ms,
        sample_pages: first_read.pages + rest_read.pages,
        verified_pages: first_read.verified + rest_read.verified,
        sample_ms,
        recovered_pages: recovered.map(|(pages, _)| pages),
        recovery_ms: recovered.map(|(_, ms)| ms),
        mm_stat_after_restart: backend.mm_stat().transpose()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_suffixes_and_must_be_whole_pages() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("8192"), Ok(8192));
        assert!(parse_size("1000").is_err(), "not a multiple of 4 KiB");
        assert!(parse_size("0").is_err());
        assert!(parse_size("5X").is_err());
        assert!(parse_size("99999999999T").is_err(), "overflow");
    }

    #[test]
    fn the_flags_parse() {
        let args = Args::try_parse_from([
            "vhost-user-zram-bench",
            "--compare",
            "--phases",
            "fill,randread",
            "--queues",
            "2",
        ])
        .expect("valid flags");
        assert_eq!(args.phases, [Phase::Fill, Phase::RandRead]);
        assert_eq!((args.queues, args.queue_depth, args.size), (2, 32, 1 << 30));
        assert_eq!(args.compare_poll_us, 50, "polling on beside off by default");
        let no_polling = Args::try_parse_from(["b", "--compare", "--compare-poll-us", "0"]);
        assert_eq!(no_polling.unwrap().compare_poll_us, 0);
        assert!(Args::try_parse_from(["b", "--compare-poll-us", "10001"]).is_err());
        assert!(Args::try_parse_from(["b", "--socket", "/s", "--compare"]).is_err());
        assert!(Args::try_parse_from(["b", "--phases", "fill,bogus"]).is_err());
    }

    #[test]
    fn compare_state_takes_its_restart_flags_and_not_an_external_socket() {
        let args = Args::try_parse_from(["b", "--compare-state"]).unwrap();
        assert!(args.compare_state && !args.no_restart_check);
        assert_eq!(args.restart_sample_pages, 4096);
        assert!(Args::try_parse_from(["b", "--compare-state", "--no-restart-check"]).is_ok());
        assert!(Args::try_parse_from(["b", "--no-restart-check"]).is_err());
        assert!(Args::try_parse_from(["b", "--compare-state", "--socket", "/s"]).is_err());
    }

    #[test]
    fn compare_units_takes_unit_sizes_above_a_page_and_runs_without_the_other_comparisons() {
        let args = Args::try_parse_from(["b", "--compare-units", "16K,64K"]).unwrap();
        assert_eq!(args.compare_units, [16 << 10, 64 << 10]);
        assert!(Args::try_parse_from(["b", "--compare-units", "4K,16K"]).is_err());
        assert!(Args::try_parse_from(["b", "--compare-units", "2M"]).is_err());
        assert!(Args::try_parse_from(["b", "--compare-units", "16K", "--compare"]).is_err());
        assert!(Args::try_parse_from(["b", "--units-table", "t.md"]).is_err());
        let both = [
            "b",
            "--compare-units",
            "16K",
            "--units-table",
            "-",
            "--json",
            "-",
        ];
        let both = Args::try_parse_from(both).unwrap();
        assert!(check_outputs(&both).unwrap_err().contains("stdout"));
    }

    #[test]
    fn reads_must_divide_the_request() {
        let ok = [
            "b",
            "--request-size",
            "64K",
            "--read-size",
            "4K",
            "--seqread-size",
            "32K",
        ];
        let ok = Args::try_parse_from(ok).unwrap();
        assert!(check_outputs(&ok).is_ok());
        assert_eq!(read_pages(&ok), (1, 8));
        let bad = ["b", "--request-size", "64K", "--seqread-size", "24K"];
        let bad = Args::try_parse_from(bad).unwrap();
        assert!(check_outputs(&bad).unwrap_err().contains("--seqread-size"));
        let default = Args::try_parse_from(["b", "--request-size", "16K"]).unwrap();
        assert_eq!(read_pages(&default), (4, 4), "whole requests by default");
    }

    #[test]
    fn migrate_takes_its_dirty_size_and_runs_alone() {
        let args = Args::try_parse_from(["b", "--migrate"]).unwrap();
        assert!(args.migrate);
        assert_eq!(args.migrate_dirty, 10 << 20);
        let none = Args::try_parse_from(["b", "--migrate", "--migrate-dirty", "0"]).unwrap();
        assert_eq!(none.migrate_dirty, 0);
        assert!(Args::try_parse_from(["b", "--migrate-dirty", "1M"]).is_err());
        for other in ["--compare", "--compare-state"] {
            assert!(Args::try_parse_from(["b", "--migrate", other]).is_err());
        }
        assert!(Args::try_parse_from(["b", "--migrate", "--socket", "/s"]).is_err());
    }

    #[test]
    fn json_and_csv_take_a_file_or_stdout_but_not_both_stdout() {
        let bare = Args::try_parse_from(["b", "--json", "--csv", "out.csv"]).unwrap();
        assert_eq!(bare.json.as_deref(), Some("-"));
        assert_eq!(bare.csv.as_deref(), Some("out.csv"));
        assert!(check_outputs(&bare).is_ok());
        let both = Args::try_parse_from(["b", "--json", "-", "--csv", "-"]).unwrap();
        assert!(check_outputs(&both).unwrap_err().contains("both"));
        let png = Args::try_parse_from(["b", "--plot", "chart.png"]).unwrap();
        assert!(check_outputs(&png).unwrap_err().contains(".svg"));
    }
}
