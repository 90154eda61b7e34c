// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The command line: `vhost-user-zram --socket-path PATH --size SIZE [options]` serves a
//! device; `vhost-user-zram ctl [--control-socket PATH] <command>` talks to a running one.
//!
//! Every wrong value is reported as one sentence on stderr, never as a panic, with one rule for
//! the exit status: [`EXIT_USAGE`] (2) when the command line itself is wrong (a bad value, a
//! missing or conflicting option: nothing was tried), [`EXIT_FAILURE`] (1) when a well-formed
//! command failed against the system (a socket in use, a directory missing, a daemon not
//! answering, a fatal signal).
//!
//! The control socket has a default so that statistics are always there, as zram's sysfs files
//! are: a daemon started with `--socket-path S` serves `S.ctl` unless `--control-socket` names
//! another path or `none`; `ctl` takes `--control-socket`, else `$VHOST_USER_ZRAM_CTL`.

use std::ffi::OsString;
use std::io::Write;
use std::os::fd::RawFd;
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::blk::config::{DeviceConfig, MAX_QUEUES, MAX_QUEUE_SIZE, SERIAL_LEN};
use crate::codec::{Algorithm, IaaBackend, IaaMode, IaaOptions};
use crate::control::{self, Command, LimitChange};
use crate::daemon::{
    self, Daemon, DaemonConfig, DaemonError, ListenOn, MigrationConfig, StateSource,
};
use crate::migrate::{Endpoint, MigrateError};
use crate::pressure::{PressureConfig, PsiThreshold};
use crate::recompress::{RecompressConfig, DEFAULT_RATE};
use crate::store::writeback::min_age_for;
use crate::store::{
    AlgorithmSpec, PendingConfig, RecompressRequest, StoreConfig, TrainRequest, WritebackMode,
    WritebackRequest, DEFAULT_BATCH_PAGES, MAX_PENDING_BUFFERS, MAX_SECONDARY, MAX_UNIT_MEMBERS,
};
use crate::writeback::WritebackConfig;
use crate::PAGE_SIZE;

/// Exit status for a wrong command line: nothing was tried.
pub const EXIT_USAGE: u8 = 2;
/// Exit status for a well-formed command that failed while starting or running.
pub const EXIT_FAILURE: u8 = 1;

/// The exit-status rule, as `--help` prints it.
const EXIT_STATUS_HELP: &str = "Exit status: 0 when the frontend disconnected or SIGTERM/SIGINT \
stopped the daemon (or ctl succeeded); 2 when the command line is wrong; 1 when a well-formed \
command failed (a socket in use, a missing directory, a daemon not answering, a SIGBUS).";

/// The environment variable `ctl` reads the control socket's path from when
/// `--control-socket` is not given.
pub const CONTROL_SOCKET_ENV: &str = "VHOST_USER_ZRAM_CTL";

/// What `--control-socket` takes to serve no control socket.
pub const NO_CONTROL_SOCKET: &str = "none";

/// The suffix of the default control socket: `--socket-path S` serves `S.ctl`.
pub const CONTROL_SOCKET_SUFFIX: &str = ".ctl";

/// The vhost-user backend program capabilities (`--print-capabilities`), as the vhost-user
/// specification's "Backend program conventions" define them. Only `read-only` applies:
/// `blk-file` means serving an image file as the device, and this device's contents live in
/// compressed RAM (`--backing-file` only takes pages written back from RAM, it is no image),
/// so `blk-file` is not offered.
pub const CAPABILITIES: &str =
    "{\n  \"type\": \"block\",\n  \"features\": [\n    \"read-only\"\n  ]\n}\n";

/// vhost-user-zram: a compressed-RAM block device for virtual machines, over vhost-user-blk.
#[derive(Debug, Parser)]
#[command(
    name = "vhost-user-zram",
    version,
    about,
    args_conflicts_with_subcommands = true,
    after_help = EXIT_STATUS_HELP
)]
pub struct Cli {
    /// A tool to talk to a running daemon.
    #[command(subcommand)]
    pub command: Option<Tool>,
    /// The daemon's options.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Tool {
    /// Query or control a running daemon through its control socket.
    Ctl(CtlArgs),
    /// Print the man page or a shell's completion script, generated from this command line
    /// (for packaging: `generate man > vhost-user-zram.1`).
    #[command(hide = true)]
    Generate {
        /// What to print.
        #[command(subcommand)]
        what: Generated,
    },
}

/// What `generate` prints.
#[derive(Debug, Clone, Subcommand)]
pub enum Generated {
    /// The man page, in roff (section 1).
    Man,
    /// The completion script of SHELL.
    Completion {
        /// bash, elvish, fish, powershell or zsh.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Writes what `what` asks for, generated from [`Cli`]'s definition, to `out`.
pub fn generate(what: &Generated, out: &mut dyn Write) -> std::io::Result<()> {
    use clap::CommandFactory;
    let mut command = Cli::command();
    match what {
        Generated::Man => clap_mangen::Man::new(command).render(out),
        Generated::Completion { shell } => {
            let name = command.get_name().to_owned();
            clap_complete::generate(*shell, &mut command, name, out);
            Ok(())
        }
    }
}

/// `ctl` arguments.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The daemon's control socket [default: $VHOST_USER_ZRAM_CTL]; a daemon started with
    /// --socket-path S serves S.ctl.
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// `ctl` commands.
#[derive(Debug, Clone, Subcommand)]
pub enum CtlCommand {
    /// Print every statistic as a table.
    Stats {
        /// Print JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// Print zram's mm_stat line.
    #[command(name = "mm_stat")]
    MmStat,
    /// Print zram's io_stat line.
    #[command(name = "io_stat")]
    IoStat,
    /// Print every figure in the Prometheus text format.
    Metrics,
    /// Compact the allocator.
    Compact,
    /// Mark stored pages idle: every page (zram's `echo all > idle`), or with --age those not
    /// read or written for SECS seconds (zram's `echo SECS > idle`). Reads and writes clear it.
    Idle {
        /// Which pages: `all`.
        #[arg(default_value = "all", value_parser = ["all"], conflicts_with = "age")]
        which: String,
        /// Only pages idle for at least SECS seconds (measured in ticks of --idle-tick).
        #[arg(long, value_name = "SECS")]
        age: Option<u64>,
    },
    /// Write pages back to the --backing-file, as zram's `writeback`: e.g. `writeback idle`,
    /// `writeback huge_idle`, `writeback --pages 0-1023`.
    Writeback {
        /// idle|huge|huge_idle|incompressible (or type=...); every stored page of --pages when
        /// not given.
        #[arg(
            value_name = "TYPE",
            value_parser = parse_writeback_word,
            required_unless_present = "pages"
        )]
        params: Vec<String>,
        /// Only pages LOW to HIGH (inclusive), or one page N.
        #[arg(long, value_name = "LOW-HIGH", value_parser = parse_page_range)]
        pages: Option<String>,
    },
    /// Print zram's bd_stat line: bd_count, bd_reads, bd_writes in 4 KiB units.
    #[command(name = "bd_stat")]
    BdStat,
    /// Show the writeback limit, set it (N more pages; zram's writeback_limit with
    /// writeback_limit_enable), or lift it (`off`).
    #[command(name = "writeback-limit")]
    WritebackLimit {
        /// N pages, or `off`.
        #[arg(value_name = "N|off", value_parser = parse_limit_change)]
        value: Option<String>,
    },
    /// Recompress pages with the --recompress-algorithm algorithms, as zram's `recompress`:
    /// e.g. `recompress type=idle threshold=3000 max_pages=1000 algo=zstd`.
    Recompress {
        /// type=idle|huge|huge_idle (default: every page), threshold=BYTES, max_pages=N,
        /// algo=NAME or priority=N.
        #[arg(value_name = "KEY=VALUE", value_parser = parse_recompress_word)]
        params: Vec<String>,
    },
    /// Live-migrate the device's pages to the daemon started with `--incoming` at DESTINATION
    /// (unix:PATH or tcp:HOST:PORT), then QEMU's own `migrate`: pre-copy rounds while the guest
    /// runs, the last dirty pages when QEMU stops the VM. Returns once the stream is connected.
    Migrate {
        /// unix:PATH or tcp:HOST:PORT.
        #[arg(value_name = "DESTINATION", value_parser = parse_endpoint)]
        destination: Endpoint,
    },
    /// Print the migration's state, rounds, pages, bytes and dirty pages.
    #[command(name = "migrate-status")]
    MigrateStatus,
    /// Cancel the migration; the pages stay with this daemon.
    #[command(name = "migrate-cancel")]
    MigrateCancel,
    /// Show the memory limit, set it (SIZE, with the suffixes of --mem-limit) or lift it
    /// (`off`), as zram's mem_limit. A limit below what the store already uses (mem_used_total)
    /// is refused, where zram would take it and fail every new write; so is one at or below
    /// --writeback-above.
    #[command(name = "mem-limit")]
    MemLimit {
        /// SIZE, or `off`.
        #[arg(value_name = "SIZE|off", value_parser = parse_mem_limit_change)]
        value: Option<LimitChange>,
    },
    /// Free up to SIZE of mem_used_total from pages idle at least SECS, coldest first (write
    /// back, then recompress, as the device can), and give the memory back before answering:
    /// e.g. `reclaim 64M min_age=600 mode=writeback`.
    Reclaim {
        /// How much to free (the suffixes of --mem-limit).
        #[arg(value_name = "SIZE", value_parser = parse_size)]
        size: u64,
        /// min_age=SECS (default 0), mode=writeback|recompress|any (default any).
        #[arg(value_name = "KEY=VALUE")]
        params: Vec<String>,
    },
    /// Reset mem_used_max to the current mem_used_total (zram's `echo 0 > mem_used_max`).
    #[command(name = "mem-used-max")]
    MemUsedMax {
        /// `reset`.
        #[arg(value_name = "reset", value_parser = ["reset"])]
        action: String,
    },
    /// Train a zstd dictionary on a sample of the stored pages; new and recompressed zstd
    /// pages use it (pages made with older ones stay readable).
    #[command(name = "train-dict")]
    TrainDict {
        /// The most pages sampled.
        #[arg(long, default_value_t = TrainRequest::default().samples)]
        samples: usize,
        /// The dictionary's size in bytes.
        #[arg(long, default_value_t = TrainRequest::default().size)]
        size: usize,
    },
}

impl CtlArgs {
    /// The control socket to talk to: `--control-socket`, else `$VHOST_USER_ZRAM_CTL` (as
    /// `env_value`, so tests need not touch the process environment).
    pub fn control_socket_path(&self, env_value: Option<OsString>) -> Result<PathBuf, UsageError> {
        if let Some(path) = &self.control_socket {
            return Ok(path.clone());
        }
        match env_value {
            Some(value) if !value.is_empty() => Ok(PathBuf::from(value)),
            Some(_) | None => Err(UsageError::NoControlSocket),
        }
    }
}

impl CtlCommand {
    /// The control-protocol command, or why the words given do not make one (each word passed
    /// its own check, but together they may not: a key given twice, for one).
    pub fn command(&self) -> Result<Command, String> {
        Ok(match self {
            CtlCommand::Stats { json: false } => Command::Stats,
            CtlCommand::Stats { json: true } => Command::StatsJson,
            CtlCommand::MmStat => Command::MmStat,
            CtlCommand::IoStat => Command::IoStat,
            CtlCommand::Metrics => Command::Metrics,
            CtlCommand::Compact => Command::Compact,
            CtlCommand::Idle { age: None, .. } => Command::MarkIdle,
            CtlCommand::Idle {
                age: Some(secs), ..
            } => Command::MarkIdleAge(*secs),
            CtlCommand::Writeback { params, pages } => {
                let mut words = params.clone();
                if let Some(pages) = pages {
                    words.push(format!("--pages {pages}"));
                }
                // Without a type or pages it writes back idle pages, as zram's `writeback`.
                if words.is_empty() {
                    Command::Writeback(WritebackRequest::new(WritebackMode::Idle))
                } else {
                    Command::Writeback(
                        words.join(" ").parse().map_err(
                            |error: crate::store::BadWritebackRequest| error.to_string(),
                        )?,
                    )
                }
            }
            CtlCommand::BdStat => Command::BdStat,
            CtlCommand::WritebackLimit { value } => {
                Command::WritebackLimit(match value.as_deref() {
                    None => LimitChange::Show,
                    Some("off") => LimitChange::Off,
                    Some(pages) => LimitChange::Set(
                        pages
                            .parse()
                            .map_err(|_| format!("'{pages}' is not a number of pages or 'off'"))?,
                    ),
                })
            }
            CtlCommand::Recompress { params } => Command::Recompress(
                params
                    .join(" ")
                    .parse()
                    .map_err(|error: crate::store::RecompressError| error.to_string())?,
            ),
            CtlCommand::TrainDict { samples, size } => Command::TrainDict(TrainRequest {
                samples: *samples,
                size: *size,
            }),
            CtlCommand::Migrate { destination } => Command::Migrate(destination.clone()),
            CtlCommand::MigrateStatus => Command::MigrateStatus,
            CtlCommand::MigrateCancel => Command::MigrateCancel,
            CtlCommand::MemLimit { value } => Command::MemLimit(value.unwrap_or(LimitChange::Show)),
            CtlCommand::MemUsedMax { .. } => Command::MemUsedMaxReset,
            CtlCommand::Reclaim { size, params } => Command::Reclaim(
                std::iter::once(size.to_string())
                    .chain(params.iter().cloned())
                    .collect::<Vec<_>>()
                    .join(" ")
                    .parse()?,
            ),
        })
    }
}

fn parse_writeback_word(word: &str) -> Result<String, String> {
    word.parse::<WritebackRequest>()
        .map(|_| word.to_owned())
        .map_err(|error| error.to_string())
}

fn parse_page_range(text: &str) -> Result<String, String> {
    format!("--pages {text}")
        .parse::<WritebackRequest>()
        .map(|_| text.to_owned())
        .map_err(|_| format!("'{text}' is not a page range; give LOW-HIGH or N"))
}

fn parse_limit_change(text: &str) -> Result<String, String> {
    match text {
        "off" => Ok(text.to_owned()),
        _ => text
            .parse::<u64>()
            .map(|_| text.to_owned())
            .map_err(|_| format!("'{text}' is not a number of pages or 'off'")),
    }
}

/// `ctl mem-limit`: `off`, or a size as `--mem-limit` takes it.
fn parse_mem_limit_change(text: &str) -> Result<LimitChange, String> {
    match text {
        "off" => Ok(LimitChange::Off),
        _ => match parse_size(text)? {
            0 => Err("the memory limit must not be zero; 'off' lifts it".into()),
            limit => Ok(LimitChange::Set(limit)),
        },
    }
}

fn parse_recompress_word(word: &str) -> Result<String, String> {
    word.parse::<RecompressRequest>()
        .map(|_| word.to_owned())
        .map_err(|error| error.to_string())
}

/// Log levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warn,
    /// Lifecycle events.
    Info,
    /// Protocol details.
    Debug,
    /// Everything.
    Trace,
}

impl From<LogLevel> for log::LevelFilter {
    fn from(level: LogLevel) -> Self {
        match level {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

/// The daemon's options.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Listen for the frontend on a new socket at PATH.
    #[arg(long, value_name = "PATH", conflicts_with = "fd")]
    pub socket_path: Option<PathBuf>,
    /// Listen on an inherited, already-listening socket (systemd socket activation passes 3).
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = parse_fd)]
    pub fd: Option<RawFd>,
    /// Device size in bytes, with an optional suffix as zramctl takes them: K, M, G, T or KiB,
    /// MiB, GiB, TiB (powers of 1024), KB, MB, GB, TB (powers of 1000); rounded up to whole
    /// 4 KiB pages, as zram rounds `disksize`.
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true, value_parser = parse_device_size)]
    pub size: Option<u64>,
    /// Compression algorithm: lz4, zstd, deflate or deflate-iaa (Intel IAA, batched).
    #[arg(long, value_name = "NAME", default_value = "lz4", value_parser = parse_algorithm)]
    pub algorithm: Algorithm,
    /// Compression level, for algorithms that have levels (zstd 1-22, deflate 1-12).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub algorithm_level: Option<i32>,
    /// Where deflate-iaa compresses: auto (the IAA device when a usable work queue exists,
    /// else a software work queue), hardware (refuse to start without one) or software.
    /// [default: auto]
    #[arg(long, value_name = "WHERE", value_parser = parse_iaa_backend)]
    pub iaa: Option<IaaBackend>,
    /// deflate-iaa's Huffman coding: fixed (every IAA generation) or dynamic (IAA generation
    /// 2, better ratio). [default: fixed]
    #[arg(long, value_name = "MODE", value_parser = parse_iaa_mode)]
    pub iaa_mode: Option<IaaMode>,
    /// Number of request queues, each served by its own thread.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1,
        allow_negative_numbers = true,
        value_parser = parse_num_queues
    )]
    pub num_queues: u16,
    /// The largest queue size offered: a power of two up to 32768.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 256,
        allow_negative_numbers = true,
        value_parser = parse_queue_size
    )]
    pub queue_size: u16,
    /// Compression worker threads (kcompressd): writes complete once copied and are
    /// compressed on these. 0 compresses on the queue threads. Default: CPUs - 1, at least 1.
    #[arg(long, value_name = "N", value_parser = parse_workers)]
    pub workers: Option<usize>,
    /// Pin the compression workers to these CPUs, e.g. "2-3" or "1,3" (round robin).
    #[arg(long, value_name = "LIST", value_parser = parse_cpu_list)]
    pub worker_cpus: Option<CpuList>,
    /// The most written data waiting for the workers (same suffixes as --size); a full pool
    /// makes the queue thread compress instead of waiting. Default: 4 MiB per worker.
    #[arg(long, value_name = "SIZE", value_parser = parse_max_pending)]
    pub max_pending: Option<u64>,
    /// After serving, poll each queue for up to this many microseconds before sleeping
    /// (adaptive: the window shrinks while polling finds nothing). 0 never polls.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_POLL_MAX_US, value_parser = parse_poll_max)]
    pub poll_max_us: u64,
    /// A secondary algorithm for recompression, as ALGO or ALGO:level=N (e.g. zstd:level=9);
    /// repeat for up to three, in priority order (zram's recomp_algorithm).
    #[arg(long, value_name = "ALGO[:level=N]", value_parser = parse_algorithm_spec)]
    pub recompress_algorithm: Vec<AlgorithmSpec>,
    /// Recompress, in the background, pages not read or written for this many seconds (they
    /// go after between SECS and 2 x SECS). Needs --recompress-algorithm.
    #[arg(long, value_name = "SECS", value_parser = parse_idle_after)]
    pub recompress_idle_after: Option<u64>,
    /// A zstd dictionary (zstd's format, e.g. from `zstd --train`) for every zstd algorithm of
    /// the device, as zram's algorithm_params dict=.
    #[arg(long, value_name = "PATH")]
    pub zstd_dict: Option<PathBuf>,
    /// The most pages a second the background recompressor tries.
    #[arg(long, value_name = "PAGES", default_value_t = DEFAULT_RATE, value_parser = parse_recompress_rate)]
    pub recompress_rate: u64,
    /// A file or block device to write idle and incompressible pages back to (zram's
    /// backing_dev): created if missing, sparse, locked against a second daemon.
    #[arg(long, value_name = "PATH")]
    pub backing_file: Option<PathBuf>,
    /// Use the --backing-file even if it holds data that is not vhost-user-zram's (a
    /// filesystem, a partition table, a swap area, another program's file): that data is
    /// overwritten. Without it, such a file or device is refused.
    #[arg(long, requires = "backing_file")]
    pub backing_file_overwrite: bool,
    /// Keep the guest's pages in a state file at PATH on tmpfs or hugetlbfs (e.g.
    /// /dev/shm/vm1.state), so that a daemon killed, restarted or upgraded on the same file
    /// gives them back to the same frontend process. Created if missing; removed when the
    /// frontend ends normally.
    #[arg(long, value_name = "PATH", conflicts_with = "state_fdstore")]
    pub state: Option<PathBuf>,
    /// Under systemd: keep the state in a memfd the unit's file descriptor store holds under
    /// NAME (the unit needs FileDescriptorStoreMax=1 or more); a restart takes it back.
    #[arg(long, value_name = "NAME", value_parser = parse_fdstore_name)]
    pub state_fdstore: Option<String>,
    /// Receive the device's pages from a daemon migrating them (`ctl migrate` there) on
    /// unix:PATH or tcp:HOST:PORT. The store starts empty; the device serves once the stream
    /// is complete, and fails to start if it is not (see --incoming-timeout). Not with
    /// --state PATH (a file filled mid-stream could be taken for the guest's pages after a
    /// crash); with --state-fdstore the state goes to systemd once the migration is complete.
    #[arg(long, value_name = "unix:PATH|tcp:HOST:PORT", value_parser = parse_endpoint, conflicts_with = "state")]
    pub incoming: Option<Endpoint>,
    /// With --incoming: how long the device's start waits for the stream to be complete.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_INCOMING_TIMEOUT, requires = "incoming", value_parser = parse_incoming_timeout)]
    pub incoming_timeout: u64,
    /// A file holding the secret (at least 16 bytes) that both daemons of a migration prove to
    /// each other without sending it; required for tcp: endpoints.
    #[arg(long, value_name = "FILE")]
    pub migrate_token: Option<PathBuf>,
    /// Write back at most this many pages until the limit is raised with `ctl writeback-limit`
    /// (zram's writeback_limit with writeback_limit_enable).
    #[arg(long, value_name = "PAGES")]
    pub writeback_limit: Option<u64>,
    /// Pages written to the backing file per write call.
    #[arg(long, value_name = "PAGES", default_value_t = DEFAULT_BATCH_PAGES, value_parser = parse_writeback_batch)]
    pub writeback_batch: usize,
    /// Write back, automatically, pages not read or written for this many seconds (checked
    /// every --idle-tick).
    #[arg(long, value_name = "SECS", value_parser = parse_idle_after)]
    pub writeback_idle_after: Option<u64>,
    /// Write back the coldest pages whenever mem_used_total is above SIZE, until it is below
    /// (same suffixes as --size). Must be below --mem-limit.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub writeback_above: Option<u64>,
    /// Shed memory when the host (or the daemon's v2 cgroup) is under memory pressure: on each
    /// PSI trigger event, an eighth of mem_used_total, coldest pages first (write back, then
    /// recompress, then compact), at most once a second. THRESHOLD is `some|full STALL/WINDOW`
    /// (a space or a colon after the kind; window 500ms to 10s, a multiple of 2s without
    /// CAP_SYS_RESOURCE), by default `some 300ms/2s`.
    /// The memory cgroup's limit is honoured with or without it.
    #[arg(
        long,
        value_name = "THRESHOLD",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "some 300ms/2s",
        value_parser = parse_psi_threshold
    )]
    pub reclaim_on_pressure: Option<PsiThreshold>,
    /// The idle clock's tick in seconds: page ages (for `ctl idle --age` and
    /// --writeback-idle-after) count in these, up to 126 ticks.
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = parse_idle_tick)]
    pub idle_tick: u64,
    /// Compress a write of several contiguous, aligned 4 KiB pages as one object of up to
    /// SIZE: 4K (off: every page alone), 8K, 16K, 32K or 64K (K or KiB, or the bytes). Saves
    /// more memory on real data, for some more CPU on random reads.
    #[arg(long, value_name = "SIZE", default_value = DEFAULT_UNIT_MAX, value_parser = parse_unit_max)]
    pub unit_max: u64,
    /// Stop storing new pages once the store uses this much memory (same suffixes as --size);
    /// `ctl mem-limit` changes it at run time.
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true, value_parser = parse_mem_limit)]
    pub mem_limit: Option<u64>,
    /// Present the device read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Serial number the guest reads with GET_ID (at most 20 bytes).
    #[arg(long, value_name = "STRING", value_parser = parse_serial)]
    pub serial: Option<[u8; SERIAL_LEN]>,
    /// Serve the control protocol (statistics, compaction) on a socket at PATH, or `none`
    /// [default: the --socket-path with .ctl appended; none with --fd].
    #[arg(long, value_name = "PATH|none", value_parser = parse_control_socket)]
    pub control_socket: Option<ControlSocket>,
    /// Serve the metrics over HTTP at http://ADDR/metrics, for Prometheus: IP:PORT,
    /// localhost:PORT, or a port on 127.0.0.1.
    #[arg(long, value_name = "ADDR", value_parser = parse_metrics_listen)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Allow a --metrics-listen address other than loopback (the metrics have no
    /// authentication).
    #[arg(long, requires = "metrics_listen")]
    pub metrics_allow_remote: bool,
    /// Permissions of the vhost-user socket, in octal (0660 lets a group such as libvirt's
    /// QEMU user connect).
    #[arg(
        long,
        value_name = "OCTAL",
        default_value = "0600",
        allow_negative_numbers = true,
        value_parser = parse_mode
    )]
    pub socket_mode: u32,
    /// Permissions of the control socket, in octal: whoever can write to it can control the
    /// device (write pages back, change limits), so it has its own mode, apart from
    /// --socket-mode.
    #[arg(
        long,
        value_name = "OCTAL",
        default_value = "0600",
        allow_negative_numbers = true,
        value_parser = parse_mode
    )]
    pub control_socket_mode: u32,
    /// Log level.
    #[arg(long, value_name = "LEVEL", value_enum, default_value = "info")]
    pub log_level: LogLevel,
    /// Print the vhost-user backend capabilities as JSON and exit.
    #[arg(long)]
    pub print_capabilities: bool,
}

/// `--control-socket`'s value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlSocket {
    /// Serve the control protocol here.
    Path(PathBuf),
    /// Serve no control socket (`none`).
    Disabled,
}

/// A wrong value on the command line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UsageError {
    /// Neither `--socket-path` nor `--fd`.
    #[error("one of --socket-path or --fd is required")]
    NoSocket,
    /// No `--size`.
    #[error("--size is required")]
    NoSize,
    /// The vhost-user socket and the control socket are one path.
    #[error(
        "--socket-path and --control-socket both name {}; give the control socket another path (the default is the socket path with .ctl appended)",
        .0.display()
    )]
    SameSocketPath(PathBuf),
    /// The vhost-user socket's path fits a Unix socket address, but with `.ctl` appended it
    /// does not.
    #[error(
        "the default control socket {} is longer than the 107 bytes a Unix socket address holds; pass --control-socket PATH, or none",
        .0.display()
    )]
    DefaultControlSocketTooLong(PathBuf),
    /// `ctl` was given no control socket.
    #[error(
        "no control socket given: pass --control-socket PATH or set {CONTROL_SOCKET_ENV} (a daemon started with --socket-path S serves S.ctl)"
    )]
    NoControlSocket,
    /// The level does not suit the algorithm.
    #[error("{0}")]
    Level(#[from] crate::codec::UnknownCodec),
    /// A worker option without workers.
    #[error("{0} needs compression workers, but --workers is 0")]
    NoWorkers(&'static str),
    /// `--iaa` or `--iaa-mode` with another algorithm than deflate-iaa.
    #[error("--iaa and --iaa-mode apply only to --algorithm deflate-iaa, not {0}")]
    IaaOptionsWithoutIaa(Algorithm),
    /// The metrics address is not loopback and not allowed.
    #[error("{0}")]
    MetricsAddress(#[from] crate::metrics::MetricsAddressError),
    /// More than three secondary algorithms.
    #[error("--recompress-algorithm can be given at most {MAX_SECONDARY} times")]
    TooManyRecompressAlgorithms,
    /// Secondary algorithms that repeat one another or the primary.
    #[error("--recompress-algorithm: {0}")]
    RecompressAlgorithms(crate::store::RecompressError),
    /// Background recompression without a secondary algorithm.
    #[error("--recompress-idle-after needs a --recompress-algorithm")]
    NoRecompressAlgorithm,
    /// A writeback option without a backing file.
    #[error("{0} needs a --backing-file to write pages to")]
    NoBackingFile(&'static str),
    /// `--worker-cpus` names CPUs the daemon cannot run on.
    #[error(
        "--worker-cpus names CPU {missing}, which this host does not have or the daemon may not run on (it may run on {allowed})"
    )]
    WorkerCpusUnavailable {
        /// The CPUs asked for that are not available, as a list.
        missing: String,
        /// The CPUs the daemon may run on, as a list.
        allowed: String,
    },
    /// An idle age the idle clock cannot count.
    #[error(
        "--writeback-idle-after {idle} is more than the idle clock counts (126 ticks of \
         --idle-tick {tick}); raise --idle-tick"
    )]
    IdleAfterTooLong {
        /// The idle time asked for, seconds.
        idle: u64,
        /// The tick, seconds.
        tick: u64,
    },
    /// A TCP `--incoming` without a token: anyone who can reach the port could send pages.
    #[error(
        "--incoming {0} needs --migrate-token: over TCP the destination accepts only a source \
         that proves the token (unix: endpoints go without one)"
    )]
    IncomingTcpWithoutToken(Endpoint),
    /// `--writeback-above` at or above `--mem-limit`: writes would be refused before writeback
    /// ever ran.
    #[error(
        "--writeback-above {} is at or above --mem-limit {}: writes would be refused before \
         writeback ever ran; give a --writeback-above below the --mem-limit",
        daemon::bytes_human(*.above),
        daemon::bytes_human(*.limit)
    )]
    WritebackAboveNotBelowLimit {
        /// `--writeback-above`, bytes.
        above: u64,
        /// `--mem-limit`, bytes.
        limit: u64,
    },
}

/// `--incoming` and `ctl migrate`: `unix:PATH` or `tcp:HOST:PORT`.
fn parse_endpoint(text: &str) -> Result<Endpoint, String> {
    text.parse()
        .map_err(|error: MigrateError| error.to_string())
}

/// `--state-fdstore NAME`: a name systemd accepts for a stored file descriptor.
fn parse_fdstore_name(name: &str) -> Result<String, String> {
    crate::systemd::check_name(name)
        .map(|()| name.to_owned())
        .map_err(|error| error.to_string())
}

/// `--incoming-timeout` when not given, seconds.
pub const DEFAULT_INCOMING_TIMEOUT: u64 = 60;

/// `--incoming-timeout`: 1 s to a day.
fn parse_incoming_timeout(text: &str) -> Result<u64, String> {
    match text.parse::<u64>() {
        Ok(secs @ 1..=86_400) => Ok(secs),
        _ => Err(format!(
            "'{text}' is not a number of seconds from 1 to 86400"
        )),
    }
}

/// `--poll-max-us` when not given.
pub const DEFAULT_POLL_MAX_US: u64 = 0;

/// `--unit-max` when not given: the one place the default is chosen (4K: units off).
pub const DEFAULT_UNIT_MAX: &str = "4K";

/// The largest unit `--unit-max` accepts, bytes.
pub const MAX_UNIT_BYTES: u64 = (MAX_UNIT_MEMBERS * PAGE_SIZE) as u64;

/// The longest polling window `--poll-max-us` accepts: 10 ms.
pub const MAX_POLL_MAX_US: u64 = 10_000;

/// A list of CPU numbers (`--worker-cpus`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

/// The most compression workers `--workers` accepts.
pub const MAX_WORKERS: usize = 256;

/// Pending-pool pages per worker when `--max-pending` is not given: 4 MiB.
pub const DEFAULT_PENDING_PAGES_PER_WORKER: usize = 1024;

/// The default number of compression workers: one per CPU but one (the queue thread's), at
/// least one.
pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get().saturating_sub(1))
        .max(1)
}

impl ServeArgs {
    /// Turns the options into the daemon's configuration.
    pub fn daemon_config(&self) -> Result<DaemonConfig, UsageError> {
        let listen = match (&self.socket_path, self.fd) {
            (Some(path), _) => ListenOn::Path(path.clone()),
            (None, Some(fd)) => ListenOn::Fd(fd),
            (None, None) => return Err(UsageError::NoSocket),
        };
        let size = self.size.ok_or(UsageError::NoSize)?;
        // Only the level is checked here: building a deflate-iaa codec opens a work queue,
        // which the store does once.
        self.algorithm.check_level(self.algorithm_level)?;
        let algorithm = self.algorithm_with_iaa_options()?;
        if let Some(address) = self.metrics_listen {
            crate::metrics::check_listen_address(address, self.metrics_allow_remote)?;
        }
        let capacity_pages = size / PAGE_SIZE as u64;
        let mut device = DeviceConfig::new(capacity_pages);
        device.num_queues = self.num_queues;
        device.queue_size = self.queue_size;
        device.read_only = self.read_only;
        if let Some(serial) = self.serial {
            device.serial = serial;
        }
        let workers = self.workers.unwrap_or_else(default_workers);
        if workers == 0 {
            if self.max_pending.is_some() {
                return Err(UsageError::NoWorkers("--max-pending"));
            }
            if self.worker_cpus.is_some() {
                return Err(UsageError::NoWorkers("--worker-cpus"));
            }
        }
        if let Some(cpus) = &self.worker_cpus {
            check_worker_cpus(cpus, &allowed_cpus())?;
        }
        if self.recompress_algorithm.len() > MAX_SECONDARY {
            return Err(UsageError::TooManyRecompressAlgorithms);
        }
        let primary = crate::store::recompress::AlgorithmSpec {
            algorithm: self.algorithm,
            level: self.algorithm_level,
        };
        crate::store::recompress::validate_secondaries(primary, &self.recompress_algorithm)
            .map_err(UsageError::RecompressAlgorithms)?;
        if self.recompress_idle_after.is_some() && self.recompress_algorithm.is_empty() {
            return Err(UsageError::NoRecompressAlgorithm);
        }
        if self.backing_file.is_none() {
            for (flag, given) in [
                ("--writeback-limit", self.writeback_limit.is_some()),
                (
                    "--writeback-idle-after",
                    self.writeback_idle_after.is_some(),
                ),
                ("--writeback-above", self.writeback_above.is_some()),
            ] {
                if given {
                    return Err(UsageError::NoBackingFile(flag));
                }
            }
        }
        if let (Some(above), Some(limit)) = (self.writeback_above, self.mem_limit) {
            if above >= limit {
                return Err(UsageError::WritebackAboveNotBelowLimit { above, limit });
            }
        }
        if let (Some(at @ Endpoint::Tcp(_)), None) = (&self.incoming, &self.migrate_token) {
            return Err(UsageError::IncomingTcpWithoutToken(at.clone()));
        }
        let idle_tick = std::time::Duration::from_secs(self.idle_tick);
        if let Some(idle) = self.writeback_idle_after {
            if min_age_for(std::time::Duration::from_secs(idle), idle_tick).is_none() {
                return Err(UsageError::IdleAfterTooLong {
                    idle,
                    tick: self.idle_tick,
                });
            }
        }
        let max_pending_pages = match self.max_pending {
            // parse_max_pending bounds it to MAX_PENDING_BUFFERS pages.
            Some(bytes) => usize::try_from(bytes / PAGE_SIZE as u64).unwrap_or(usize::MAX),
            None => (workers * DEFAULT_PENDING_PAGES_PER_WORKER).min(MAX_PENDING_BUFFERS),
        };
        Ok(DaemonConfig {
            listen,
            socket_mode: self.socket_mode,
            control_socket_mode: self.control_socket_mode,
            store: StoreConfig {
                capacity_pages,
                algorithm,
                level: self.algorithm_level,
                mem_limit: self.mem_limit,
            },
            pending: PendingConfig {
                workers,
                max_pending_pages: if workers == 0 { 0 } else { max_pending_pages },
            },
            // parse_unit_max bounds it to MAX_UNIT_MEMBERS pages.
            unit_max_pages: usize::try_from(self.unit_max / PAGE_SIZE as u64).unwrap_or(1),
            worker_cpus: self.worker_cpus.clone().map(|l| l.0).unwrap_or_default(),
            poll_max: std::time::Duration::from_micros(self.poll_max_us),
            device,
            control_socket: self.control_socket_path()?,
            metrics_listen: self.metrics_listen,
            recompress: RecompressConfig {
                algorithms: self.recompress_algorithm.clone(),
                idle_after: self
                    .recompress_idle_after
                    .map(std::time::Duration::from_secs),
                rate: self.recompress_rate,
                zstd_dict: self.zstd_dict.clone(),
            },
            migration: MigrationConfig {
                incoming: self.incoming.clone(),
                incoming_timeout: std::time::Duration::from_secs(self.incoming_timeout),
                token: self.migrate_token.clone(),
            },
            state: match (&self.state, &self.state_fdstore) {
                (Some(path), _) => Some(StateSource::Path(path.clone())),
                (None, Some(name)) => Some(StateSource::FdStore(name.clone())),
                (None, None) => None,
            },
            pressure: PressureConfig {
                reclaim_on_pressure: self.reclaim_on_pressure,
            },
            writeback: WritebackConfig {
                backing_file: self.backing_file.clone(),
                backing_file_overwrite: self.backing_file_overwrite,
                limit: self.writeback_limit,
                batch_pages: self.writeback_batch,
                idle_after: self
                    .writeback_idle_after
                    .map(std::time::Duration::from_secs),
                above: self.writeback_above,
                idle_tick,
            },
        })
    }

    /// The control socket the daemon serves: `--control-socket PATH`, nothing for `none`, and
    /// by default the `--socket-path` with `.ctl` appended (nothing with `--fd`, whose path the
    /// daemon does not choose). Refuses a control socket at the vhost-user socket's path.
    fn control_socket_path(&self) -> Result<Option<PathBuf>, UsageError> {
        let control = match (&self.control_socket, &self.socket_path) {
            (Some(ControlSocket::Disabled), _) | (None, None) => return Ok(None),
            (Some(ControlSocket::Path(path)), _) => path.clone(),
            (None, Some(socket)) => {
                let control = default_control_socket(socket);
                if fits_socket_address(socket) && !fits_socket_address(&control) {
                    return Err(UsageError::DefaultControlSocketTooLong(control));
                }
                control
            }
        };
        if let Some(socket) = &self.socket_path {
            if same_path(socket, &control) {
                return Err(UsageError::SameSocketPath(control));
            }
        }
        Ok(Some(control))
    }
}

/// The default control socket of a daemon listening on `socket`: `socket` with `.ctl` appended.
pub fn default_control_socket(socket: &Path) -> PathBuf {
    let mut path = socket.as_os_str().to_owned();
    path.push(CONTROL_SOCKET_SUFFIX);
    PathBuf::from(path)
}

/// Whether `path` fits `sockaddr_un.sun_path` (108 bytes with the terminating NUL).
fn fits_socket_address(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    path.as_os_str().as_bytes().len() < 108
}

/// Whether `a` and `b` name one file: compared absolute, with `.` and `..` resolved and the
/// directory's symbolic links followed when it exists.
fn same_path(a: &Path, b: &Path) -> bool {
    normalize(a) == normalize(b)
}

fn normalize(path: &Path) -> PathBuf {
    let absolute = match std::env::current_dir() {
        Ok(cwd) => cwd.join(path),
        Err(_) => path.to_owned(),
    };
    let mut lexical = PathBuf::new();
    for component in absolute.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                lexical.pop();
            }
            Component::Prefix(_) | Component::RootDir | Component::Normal(_) => {
                lexical.push(component)
            }
        }
    }
    match (lexical.parent(), lexical.file_name()) {
        (Some(parent), Some(name)) => match std::fs::canonicalize(parent) {
            Ok(parent) => parent.join(name),
            Err(_) => lexical,
        },
        _ => lexical,
    }
}

impl ServeArgs {
    /// The algorithm with `--iaa` and `--iaa-mode` applied.
    fn algorithm_with_iaa_options(&self) -> Result<Algorithm, UsageError> {
        let options = IaaOptions {
            backend: self.iaa.unwrap_or(IaaOptions::DEFAULT.backend),
            mode: self.iaa_mode.unwrap_or(IaaOptions::DEFAULT.mode),
        };
        match self.algorithm.with_iaa(options) {
            Some(algorithm) => Ok(algorithm),
            None if self.iaa.is_none() && self.iaa_mode.is_none() => Ok(self.algorithm),
            None => Err(UsageError::IaaOptionsWithoutIaa(self.algorithm)),
        }
    }
}

fn parse_iaa_backend(text: &str) -> Result<IaaBackend, String> {
    text.parse()
}

fn parse_iaa_mode(text: &str) -> Result<IaaMode, String> {
    text.parse()
}

fn parse_algorithm_spec(text: &str) -> Result<AlgorithmSpec, String> {
    text.parse()
        .map_err(|error: crate::store::RecompressError| error.to_string())
}

fn parse_idle_after(text: &str) -> Result<u64, String> {
    match text.parse::<u64>() {
        Ok(secs) if (1..=365 * 24 * 3600).contains(&secs) => Ok(secs),
        _ => Err(format!(
            "'{text}' is not an idle time; give 1 to 31536000 seconds"
        )),
    }
}

fn parse_recompress_rate(text: &str) -> Result<u64, String> {
    match text.parse::<u64>() {
        Ok(rate) if (1..=10_000_000).contains(&rate) => Ok(rate),
        _ => Err(format!(
            "'{text}' is not a recompression rate; give 1 to 10000000 pages a second"
        )),
    }
}

fn parse_writeback_batch(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(pages) if (1..=4096).contains(&pages) => Ok(pages),
        _ => Err(format!(
            "'{text}' is not a writeback batch; give 1 to 4096 pages"
        )),
    }
}

fn parse_idle_tick(text: &str) -> Result<u64, String> {
    match text.parse::<u64>() {
        Ok(secs) if (1..=24 * 3600).contains(&secs) => Ok(secs),
        _ => Err(format!(
            "'{text}' is not an idle tick; give 1 to 86400 seconds"
        )),
    }
}

/// Parses a size as zramctl (util-linux) does: bytes, or a number with a suffix in either
/// case: `K`, `M`, `G`, `T` and `KiB`, `MiB`, `GiB`, `TiB` are powers of 1024 (`4G`, `4g`,
/// `4GiB`); `KB`, `MB`, `GB`, `TB` are powers of 1000 (`4GB` is 4,000,000,000 bytes).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, suffix) = trimmed.split_at(digits_end);
    let unit: u64 = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KIB" => 1 << 10,
        "M" | "MIB" => 1 << 20,
        "G" | "GIB" => 1 << 30,
        "T" | "TIB" => 1 << 40,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ if digits.is_empty() => {
            return Err(format!(
                "'{text}' is not a size; give bytes, optionally with a K, M, G or T suffix"
            ))
        }
        _ => {
            return Err(format!(
                "'{text}' has an unknown suffix; use K, M, G or T (or KiB, MiB, GiB, TiB: powers of 1024; KB, MB, GB, TB: powers of 1000)"
            ))
        }
    };
    let number: u64 = digits.parse().map_err(|_| {
        format!("'{text}' is not a size; give bytes, optionally with a K, M, G or T suffix")
    })?;
    number
        .checked_mul(unit)
        .ok_or_else(|| format!("'{text}' is too large"))
}

/// `--unit-max`: a power of two from 4K (units off) to [`MAX_UNIT_BYTES`], with the suffixes
/// of `--size` (`16K`, `16KiB`, `16384`); anything else is refused naming the sizes it takes.
fn parse_unit_max(text: &str) -> Result<u64, String> {
    match parse_size(text) {
        Ok(bytes)
            if bytes.is_power_of_two() && (PAGE_SIZE as u64..=MAX_UNIT_BYTES).contains(&bytes) =>
        {
            Ok(bytes)
        }
        _ => Err(format!(
            "'{text}' is not a unit size; give {} (4K: units off)",
            unit_sizes()
        )),
    }
}

/// The sizes `--unit-max` takes, for messages: `4K, 8K, 16K, 32K or 64K`.
fn unit_sizes() -> String {
    let sizes: Vec<String> = std::iter::successors(Some(PAGE_SIZE as u64), |size| Some(size * 2))
        .take_while(|&size| size <= MAX_UNIT_BYTES)
        .map(|size| format!("{}K", size >> 10))
        .collect();
    match sizes.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

fn parse_device_size(text: &str) -> Result<u64, String> {
    let size = parse_size(text)?;
    if size == 0 {
        return Err("the device size must not be zero".into());
    }
    // zram rounds its disksize up to whole pages; so does the device.
    let size = size
        .checked_next_multiple_of(PAGE_SIZE as u64)
        .ok_or_else(|| format!("'{text}' is too large"))?;
    let max = crate::store::MAX_CAPACITY_PAGES * PAGE_SIZE as u64;
    if size > max {
        return Err(format!(
            "the device size {size} is more than the largest device, {} GiB",
            max >> 30
        ));
    }
    Ok(size)
}

fn parse_psi_threshold(text: &str) -> Result<PsiThreshold, String> {
    text.parse()
}

fn parse_mem_limit(text: &str) -> Result<u64, String> {
    match parse_size(text)? {
        0 => Err("the memory limit must not be zero; leave --mem-limit out for no limit".into()),
        limit => Ok(limit),
    }
}

fn parse_poll_max(text: &str) -> Result<u64, String> {
    match text.parse::<u64>() {
        Ok(n) if n <= MAX_POLL_MAX_US => Ok(n),
        _ => Err(format!(
            "'{text}' is not a polling time; give 0 to {MAX_POLL_MAX_US} microseconds"
        )),
    }
}

fn parse_workers(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n <= MAX_WORKERS => Ok(n),
        _ => Err(format!(
            "'{text}' is not a number of compression workers; give 0 to {MAX_WORKERS}"
        )),
    }
}

/// The CPUs this process may run on (its affinity mask, which cgroups and `taskset` narrow);
/// empty when the mask cannot be read.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain old data, for which all-zero bytes are a valid (empty) set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is valid for writes of the size passed; pid 0 is the calling thread.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: CPU_ISSET reads bit `cpu` of the initialized `set`; `cpu` < CPU_SETSIZE.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

/// Refuses a `--worker-cpus` list with a CPU outside `allowed` (the workers could not be
/// pinned there). An empty `allowed` (the mask could not be read) refuses nothing.
fn check_worker_cpus(cpus: &CpuList, allowed: &[usize]) -> Result<(), UsageError> {
    if allowed.is_empty() {
        return Ok(());
    }
    let mut missing: Vec<usize> = cpus
        .0
        .iter()
        .copied()
        .filter(|cpu| !allowed.contains(cpu))
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    Err(UsageError::WorkerCpusUnavailable {
        missing: cpu_ranges(&missing),
        allowed: cpu_ranges(allowed),
    })
}

/// `cpus` (sorted) as a CPU list such as `0-3,6`.
fn cpu_ranges(cpus: &[usize]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut at = 0;
    while at < cpus.len() {
        let first = cpus[at];
        let mut last = first;
        while at + 1 < cpus.len() && cpus[at + 1] == last + 1 {
            at += 1;
            last = cpus[at];
        }
        parts.push(if first == last {
            first.to_string()
        } else {
            format!("{first}-{last}")
        });
        at += 1;
    }
    parts.join(",")
}

/// `--metrics-listen`: what [`crate::metrics::parse_listen_address`] takes, and
/// `localhost:PORT` for the IPv4 loopback address (the name is not looked up: the metrics
/// listen on loopback without asking a resolver).
fn parse_metrics_listen(text: &str) -> Result<std::net::SocketAddr, String> {
    match text.trim().strip_prefix("localhost:") {
        Some(port) => port
            .parse::<u16>()
            .map(|port| std::net::SocketAddr::from(([127, 0, 0, 1], port)))
            .map_err(|_| {
                format!("'{text}' is not an address to listen on; '{port}' is not a port")
            }),
        None => crate::metrics::parse_listen_address(text),
    }
}

fn parse_cpu_list(text: &str) -> Result<CpuList, String> {
    let bad = || format!("'{text}' is not a CPU list; give numbers and ranges such as 0-3,6");
    let mut cpus = Vec::new();
    for part in text.split(',') {
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (a.trim().parse::<usize>(), b.trim().parse::<usize>()),
            None => (part.trim().parse::<usize>(), part.trim().parse::<usize>()),
        };
        let (Ok(first), Ok(last)) = (first, last) else {
            return Err(bad());
        };
        if first > last || last >= libc::CPU_SETSIZE as usize {
            return Err(bad());
        }
        cpus.extend(first..=last);
    }
    Ok(CpuList(cpus))
}

fn parse_max_pending(text: &str) -> Result<u64, String> {
    let bytes = parse_size(text)?;
    let max = MAX_PENDING_BUFFERS as u64 * PAGE_SIZE as u64;
    if bytes < PAGE_SIZE as u64 || bytes > max {
        return Err(format!(
            "the pending pool must hold 4K to {}G, not '{text}'",
            max >> 30
        ));
    }
    Ok(bytes)
}

fn parse_algorithm(text: &str) -> Result<Algorithm, String> {
    text.parse()
        .map_err(|error: crate::codec::UnknownCodec| error.to_string())
}

fn parse_num_queues(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(n) if (1..=MAX_QUEUES).contains(&n) => Ok(n),
        _ => Err(format!(
            "the number of queues must be between 1 and {MAX_QUEUES}"
        )),
    }
}

fn parse_queue_size(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(n) if (4..=MAX_QUEUE_SIZE).contains(&n) && n.is_power_of_two() => Ok(n),
        _ => Err(format!(
            "the queue size must be a power of two between 4 and {MAX_QUEUE_SIZE}"
        )),
    }
}

fn parse_fd(text: &str) -> Result<RawFd, String> {
    match text.parse::<RawFd>() {
        Ok(fd) if fd >= 0 => Ok(fd),
        _ => Err(format!(
            "'{text}' is not a file descriptor number; give 0 or more (systemd passes 3)"
        )),
    }
}

fn parse_control_socket(text: &str) -> Result<ControlSocket, String> {
    match text {
        "" => Err(format!(
            "the control socket path is empty; give a path, or {NO_CONTROL_SOCKET} for no control socket"
        )),
        NO_CONTROL_SOCKET => Ok(ControlSocket::Disabled),
        path => Ok(ControlSocket::Path(PathBuf::from(path))),
    }
}

fn parse_serial(text: &str) -> Result<[u8; SERIAL_LEN], String> {
    DeviceConfig::serial_from_str(text).map_err(|error| error.to_string())
}

fn parse_mode(text: &str) -> Result<u32, String> {
    match u32::from_str_radix(text, 8) {
        Ok(mode) if mode <= 0o777 => Ok(mode),
        _ => Err(format!(
            "'{text}' is not a permission mode; give octal digits such as 0600"
        )),
    }
}

/// Runs the program with `args` (the first is the program name) and returns its exit code.
///
/// Its first act is to block the signals the daemon handles in the calling thread (see
/// [`daemon::block_handled_signals`]), so that a SIGTERM at any later point of a daemon's start
/// is read by its signal thread instead of killing it with its sockets left behind; `ctl` and
/// the other tools unblock them again. Call it from `main`, before any thread exists.
pub fn run<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    if let Err(error) = daemon::block_handled_signals() {
        eprintln!("error: cannot block the handled signals: {error}");
        return ExitCode::from(EXIT_FAILURE);
    }
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(error) => {
            use clap::error::ErrorKind;
            if matches!(
                error.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) {
                let _ = error.print();
                return ExitCode::SUCCESS;
            }
            eprintln!("{}", usage_sentence(&error));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match cli.command {
        Some(tool) => {
            // Only the daemon handles signals itself; a tool ends as a program does.
            if let Err(error) = daemon::unblock_handled_signals() {
                eprintln!("error: cannot unblock the signals: {error}");
                return ExitCode::from(EXIT_FAILURE);
            }
            match tool {
                Tool::Ctl(ctl) => run_ctl(&ctl),
                Tool::Generate { what } => {
                    let mut stdout = std::io::stdout().lock();
                    match generate(&what, &mut stdout).and_then(|()| stdout.flush()) {
                        Ok(()) => ExitCode::SUCCESS,
                        Err(error) => {
                            eprintln!("error: cannot write to standard output: {error}");
                            ExitCode::from(EXIT_FAILURE)
                        }
                    }
                }
            }
        }
        None => run_daemon(&cli.serve),
    }
}

/// clap's error as one line: its first line, with what clap prints on the following lines
/// when the first does not name it (the missing options, the accepted values).
fn usage_sentence(error: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let strings = |kind| match error.get(kind) {
        Some(ContextValue::Strings(values)) => Some(values.join(", ")),
        Some(ContextValue::String(value)) => Some(value.clone()),
        _ => None,
    };
    let rendered = error.render().to_string();
    let mut sentence = rendered
        .lines()
        .next()
        .unwrap_or("error: invalid arguments")
        .trim_end()
        .to_owned();
    if error.kind() == ErrorKind::MissingRequiredArgument {
        if let Some(missing) = strings(ContextKind::InvalidArg) {
            sentence = format!("error: missing required option {missing}");
        }
    }
    if let Some(values) = strings(ContextKind::ValidValue) {
        sentence.push_str(&format!("; the possible values are {values}"));
    }
    if matches!(
        error.kind(),
        ErrorKind::InvalidSubcommand | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        if error.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
            sentence = "error: ctl needs a command".to_owned();
        }
        sentence.push_str(&format!("; the commands are {}", ctl_commands()));
    }
    sentence
}

/// The names of `ctl`'s commands, for messages.
fn ctl_commands() -> String {
    use clap::CommandFactory;
    let cli = Cli::command();
    cli.find_subcommand("ctl")
        .map(|ctl| {
            ctl.get_subcommands()
                .map(|command| command.get_name().to_owned())
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

fn run_ctl(ctl: &CtlArgs) -> ExitCode {
    let path = match ctl.control_socket_path(std::env::var_os(CONTROL_SOCKET_ENV)) {
        Ok(path) => path,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let command = match ctl.command.command() {
        Ok(command) => command,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match control::request(&path, command) {
        Ok(body) => {
            let mut stdout = std::io::stdout().lock();
            if stdout
                .write_all(body.as_bytes())
                .and_then(|()| stdout.flush())
                .is_err()
            {
                return ExitCode::from(EXIT_FAILURE);
            }
            ExitCode::SUCCESS
        }
        Err(error) => fail(&error),
    }
}

fn run_daemon(args: &ServeArgs) -> ExitCode {
    if args.print_capabilities {
        print!("{CAPABILITIES}");
        return ExitCode::SUCCESS;
    }
    let config = match args.daemon_config() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let _ = env_logger::Builder::new()
        .filter_level(args.log_level.into())
        .try_init();
    // The signals were blocked when `run` began, before any thread existed: every thread
    // inherits the mask and only the signal thread receives them, from here on. A SIGTERM
    // that came earlier is pending and read now.
    let signals = match daemon::SignalHandling::start() {
        Ok(signals) => signals,
        Err(error) => {
            eprintln!("error: cannot start the signal thread: {error}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let daemon = match Daemon::with_signals(config, signals) {
        Ok(daemon) => daemon,
        Err(DaemonError::Stopped) => {
            log::info!("stopped by request while starting");
            return ExitCode::SUCCESS;
        }
        Err(error) if error.is_configuration() => {
            eprintln!("error: {}", crate::blk::request::ErrorChain(&error));
            return ExitCode::from(EXIT_USAGE);
        }
        Err(error) => return fail(&error),
    };
    if let Err(error) = daemon::exit_cleanly_on_sigbus(&daemon.socket_paths()) {
        eprintln!("error: cannot install the SIGBUS handler: {error}");
        return ExitCode::from(EXIT_FAILURE);
    }
    match daemon.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(&error),
    }
}

/// Prints `error` and its causes as one line and returns the failure exit code.
fn fail(error: &dyn std::error::Error) -> ExitCode {
    eprintln!("error: {}", crate::blk::request::ErrorChain(error));
    ExitCode::from(EXIT_FAILURE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999T")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn sizes_take_every_spelling_of_the_binary_suffixes() {
        for text in ["4G", "4g", "4GiB", "4gib"] {
            assert_eq!(parse_size(text), Ok(4 << 30), "{text}");
        }
        for text in ["4GB", "4gb"] {
            assert_eq!(parse_size(text), Ok(4_000_000_000), "{text}");
        }
        assert_eq!(parse_size("3KB"), Ok(3_000));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert!(parse_size("4GX").unwrap_err().contains("unknown suffix"));
        assert!(parse_size("GiB").unwrap_err().contains("not a size"));
    }

    #[test]
    fn metrics_listen_takes_localhost() {
        assert_eq!(
            parse_metrics_listen("localhost:9112"),
            Ok("127.0.0.1:9112".parse().unwrap())
        );
        assert!(parse_metrics_listen("localhost:http").is_err());
        assert_eq!(
            parse_metrics_listen("9112"),
            Ok("127.0.0.1:9112".parse().unwrap())
        );
    }

    #[test]
    fn worker_cpus_outside_the_allowed_set_are_refused() {
        let allowed = [0, 1];
        assert_eq!(check_worker_cpus(&CpuList(vec![1, 0]), &allowed), Ok(()));
        assert_eq!(
            check_worker_cpus(&CpuList(vec![5, 6, 7, 1]), &allowed),
            Err(UsageError::WorkerCpusUnavailable {
                missing: "5-7".into(),
                allowed: "0-1".into()
            })
        );
        assert_eq!(check_worker_cpus(&CpuList(vec![9]), &[]), Ok(()));
        assert_eq!(cpu_ranges(&[0, 1, 2, 4, 6, 7]), "0-2,4,6-7");
        assert!(!allowed_cpus().is_empty());
    }

    #[test]
    fn device_size_is_non_zero_and_rounded_up_to_whole_pages() {
        assert!(parse_device_size("0").unwrap_err().contains("zero"));
        assert_eq!(parse_device_size("4097"), Ok(8192));
        assert_eq!(parse_device_size("4GB"), Ok(976_563 * 4096));
        assert_eq!(parse_device_size("1M"), Ok(1 << 20));
    }

    #[test]
    fn unit_max_takes_4k_to_64k_in_the_suffixes_of_size() {
        for (text, bytes) in [
            ("4K", 4096),
            ("8k", 8192),
            ("16KiB", 16384),
            ("32kib", 32768),
            ("64K", 65536),
            ("4096", 4096),
            ("65536", 65536),
            ("8192B", 8192),
        ] {
            assert_eq!(parse_unit_max(text), Ok(bytes), "{text}");
        }
    }

    #[test]
    fn unit_max_refuses_other_sizes_naming_the_allowed_ones() {
        for text in [
            "12K",
            "128K",
            "0",
            "2K",
            "16KB",
            "1M",
            "",
            "64X",
            "99999999999T",
        ] {
            assert_eq!(
                parse_unit_max(text),
                Err(format!(
                    "'{text}' is not a unit size; give 4K, 8K, 16K, 32K or 64K (4K: units off)"
                )),
                "{text}"
            );
        }
    }

    #[test]
    fn unit_max_reaches_the_daemon_in_pages_and_defaults_to_the_constant() {
        let given = serve_args(&[
            "--socket-path",
            "/tmp/x",
            "--size",
            "1M",
            "--unit-max",
            "64K",
        ]);
        let default = serve_args(&["--socket-path", "/tmp/x", "--size", "1M"]);

        assert_eq!(given.daemon_config().unwrap().unit_max_pages, 16);
        let default_bytes = parse_unit_max(DEFAULT_UNIT_MAX).unwrap();
        assert_eq!(default.unit_max, default_bytes);
        assert_eq!(
            default.daemon_config().unwrap().unit_max_pages as u64,
            default_bytes / PAGE_SIZE as u64
        );
    }

    #[test]
    fn queue_size_must_be_a_power_of_two() {
        assert!(parse_queue_size("100").is_err());
        assert!(parse_queue_size("65536").is_err());
        assert_eq!(parse_queue_size("32768"), Ok(32768));
        assert!(parse_num_queues("0").is_err());
        assert!(parse_num_queues("65").is_err());
    }

    #[test]
    fn socket_mode_is_octal() {
        assert_eq!(parse_mode("0600"), Ok(0o600));
        assert_eq!(parse_mode("660"), Ok(0o660));
        assert!(parse_mode("0800").is_err());
        assert!(parse_mode("1777").is_err());
    }

    #[test]
    fn a_level_for_lz4_is_a_usage_error() {
        let cli = Cli::try_parse_from([
            "vhost-user-zram",
            "--socket-path",
            "/tmp/x",
            "--size",
            "1M",
            "--algorithm-level",
            "3",
        ])
        .unwrap();
        assert!(matches!(
            cli.serve.daemon_config(),
            Err(UsageError::Level(_))
        ));
    }

    fn ctl_args(args: &[&str]) -> CtlArgs {
        let all = ["vhost-user-zram", "ctl"].iter().chain(args);
        match Cli::try_parse_from(all).unwrap().command {
            Some(Tool::Ctl(ctl)) => ctl,
            _ => panic!("not a ctl command line"),
        }
    }

    #[test]
    fn ctl_takes_the_flag_then_the_variable_and_refuses_an_empty_variable() {
        let flag = ctl_args(&["--control-socket", "/run/a.ctl", "stats"]);
        let bare = ctl_args(&["stats"]);

        assert_eq!(
            flag.control_socket_path(Some("/run/b.ctl".into())),
            Ok(PathBuf::from("/run/a.ctl"))
        );
        assert_eq!(
            bare.control_socket_path(Some("/run/b.ctl".into())),
            Ok(PathBuf::from("/run/b.ctl"))
        );
        assert_eq!(
            bare.control_socket_path(Some("".into())),
            Err(UsageError::NoControlSocket)
        );
        assert_eq!(
            bare.control_socket_path(None),
            Err(UsageError::NoControlSocket)
        );
    }

    fn serve_args(args: &[&str]) -> ServeArgs {
        Cli::try_parse_from(["vhost-user-zram"].iter().chain(args))
            .unwrap()
            .serve
    }

    #[test]
    fn control_socket_defaults_to_the_socket_path_with_ctl_appended() {
        let default = serve_args(&["--socket-path", "/run/vm.sock", "--size", "1M"]);
        let disabled = serve_args(&[
            "--socket-path",
            "/run/vm.sock",
            "--size",
            "1M",
            "--control-socket",
            "none",
        ]);
        let inherited = serve_args(&["--fd", "3", "--size", "1M"]);

        assert_eq!(
            default.daemon_config().unwrap().control_socket,
            Some(PathBuf::from("/run/vm.sock.ctl"))
        );
        assert_eq!(disabled.daemon_config().unwrap().control_socket, None);
        assert_eq!(inherited.daemon_config().unwrap().control_socket, None);
    }

    #[test]
    fn iaa_options_reach_the_algorithm_and_need_deflate_iaa() {
        let parse = |extra: &[&str]| {
            let mut args = vec!["vhost-user-zram", "--socket-path", "/tmp/x", "--size", "1M"];
            args.extend_from_slice(extra);
            Cli::try_parse_from(args).unwrap().serve.daemon_config()
        };
        let config = parse(&[
            "--algorithm",
            "deflate-iaa",
            "--iaa",
            "software",
            "--iaa-mode",
            "dynamic",
        ])
        .unwrap();
        assert_eq!(
            config.store.algorithm,
            Algorithm::DeflateIaa(IaaOptions {
                backend: IaaBackend::Software,
                mode: IaaMode::Dynamic
            })
        );
        let default = parse(&["--algorithm", "deflate-iaa"]).unwrap();
        assert_eq!(
            default.store.algorithm,
            Algorithm::DeflateIaa(IaaOptions::DEFAULT)
        );
        assert!(matches!(
            parse(&["--iaa", "hardware"]),
            Err(UsageError::IaaOptionsWithoutIaa(Algorithm::Lz4))
        ));
        assert!(Cli::try_parse_from(["vhost-user-zram", "--iaa", "gpu"]).is_err());
    }

    #[test]
    fn recompression_flags_are_checked() {
        let parse = |extra: &[&str]| {
            let mut args = vec!["vhost-user-zram", "--socket-path", "/tmp/x", "--size", "1M"];
            args.extend_from_slice(extra);
            Cli::try_parse_from(args).map(|cli| cli.serve.daemon_config())
        };
        let config = parse(&[
            "--recompress-algorithm",
            "zstd:level=9",
            "--recompress-algorithm",
            "deflate",
            "--recompress-idle-after",
            "600",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(config.recompress.algorithms.len(), 2);
        assert_eq!(config.recompress.algorithms[0].to_string(), "zstd:level=9");
        assert_eq!(
            config.recompress.idle_after,
            Some(std::time::Duration::from_secs(600))
        );
        assert!(matches!(
            parse(&["--recompress-idle-after", "60"]).unwrap(),
            Err(UsageError::NoRecompressAlgorithm)
        ));
        let four = ["--recompress-algorithm", "zstd"].repeat(4);
        assert!(matches!(
            parse(&four).unwrap(),
            Err(UsageError::TooManyRecompressAlgorithms)
        ));
        assert!(parse(&["--recompress-algorithm", "zstd:level=99"]).is_err());
        assert!(parse(&["--recompress-rate", "0"]).is_err());
        let ctl = Cli::try_parse_from([
            "vhost-user-zram",
            "ctl",
            "--control-socket",
            "/tmp/c",
            "recompress",
            "type=idle",
            "max_pages=9",
        ])
        .unwrap();
        let Some(Tool::Ctl(ctl)) = ctl.command else {
            panic!("not a ctl command")
        };
        assert_eq!(
            ctl.command.command().unwrap().to_string(),
            "recompress type=idle max_pages=9"
        );
    }

    #[test]
    fn capabilities_are_valid_json() {
        let value: serde_json::Value = serde_json::from_str(CAPABILITIES).unwrap();
        assert_eq!(value["type"], "block");
        assert_eq!(value["features"], serde_json::json!(["read-only"]));
    }
}
