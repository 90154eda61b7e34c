// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control socket: zram's sysfs knobs for a running daemon.
//!
//! # Protocol
//!
//! A Unix stream socket. The client connects, sends **one line** naming a command, and reads
//! the response until the daemon closes the connection:
//!
//! ```text
//! request:   <command>\n
//! response:  [progress <text>\n]... ok\n<body>             on success
//!            [progress <text>\n]... error <sentence>\n     on failure
//! ```
//!
//! A long command ([`Command::is_long`]) sends a progress line every [`PROGRESS_EVERY`] while
//! it runs, so the client can tell a busy daemon from a hung one: [`request`] waits as long as
//! lines come, and gives up after [`RESPONSE_TIMEOUT`] (or [`TIMEOUT_ENV`]) of silence.
//!
//! Commands ([`Command`]):
//!
//! | request      | body                                                            |
//! |--------------|-----------------------------------------------------------------|
//! | `stats`      | a readable table of every statistic, with units                 |
//! | `stats-json` | the same statistics as one JSON object                          |
//! | `mm_stat`    | one line, byte for byte zram's `/sys/block/zramN/mm_stat`       |
//! | `io_stat`    | one line, byte for byte zram's `/sys/block/zramN/io_stat`       |
//! | `metrics`    | every figure in the Prometheus text format ([`crate::metrics`]) |
//! | `compact`    | `compacted N pages`, after compacting the allocator             |
//! | `idle [all]` | `marked N pages idle` (zram's `echo all > idle`)                 |
//! | `train-dict [samples=N] [size=BYTES]` | `trained zstd dictionary ID of N bytes from N pages; ...` |
//! | `recompress [type=idle\|huge\|huge_idle] [threshold=BYTES] [max_pages=N] [algo=NAME\|priority=N]` | `tried N pages, recompressed N, saved N bytes, N incompressible, gave back N pages` (zram's `recompress`, then compaction) |
//! | `migrate unix:PATH\|tcp:HOST:PORT` | `migrating to ...` once the stream to the destination daemon is connected and authenticated ([`crate::migrating`]) |
//! | `reclaim BYTES [min_age=SECS] [mode=writeback\|recompress\|any]` | `freed N of N bytes asked: N pages written back, N recompressed; mem_used_total A -> B` ([`crate::store::reclaim`]) |
//! | `migrate-status` | `key value` lines: role, state, peer, rounds, pages, wire and stored bytes, dirty pages, elapsed time, error |
//! | `migrate-cancel` | what was cancelled; the pages stay |
//! | `mem-limit [BYTES\|off]` | `mem_limit N bytes (…)` or `mem_limit off`, after setting or lifting it (zram's `mem_limit`) |
//! | `mem-used-max reset` | `mem_used_max N bytes (…)`, reset to `mem_used_total` (zram's `echo 0 > mem_used_max`) |
//!
//! One request per connection keeps the server trivial and lets `socat` or `nc -U` drive it.
//!
//! This module is the protocol: the commands, their request lines, running them, the server
//! and the client. What the statistics commands print is rendered in [`render`].
//!
//! # Hostile clients
//!
//! The control socket and the metrics over HTTP both run on [`crate::server::BoundedServer`]:
//! a connection waits for its request line without a thread (at most [`MAX_WAITING`]; a new one
//! pushes out the oldest), each within [`CLIENT_DEADLINE`] in total however slowly it sends,
//! and a complete request is answered on a thread of its own, at most [`MAX_CLIENTS`] at once
//! (more get `error busy`). A request line longer than [`MAX_REQUEST_LEN`] bytes is refused.

pub mod render;

use std::fmt;
use std::io::{self, BufRead, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::str::FromStr;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::debug;

pub use self::render::stats_table;
use crate::metrics;
use crate::migrate::Endpoint;
use crate::observed::Observed;
use crate::server::{BoundedServer, Client, Handler, ReadError, ServerLimits};
pub use crate::server::{CLIENT_DEADLINE, MAX_CLIENTS, MAX_WAITING};
use crate::store::reclaim::ReclaimRequest;
use crate::store::{
    BadWritebackRequest, RecompressError, RecompressRequest, TrainRequest, WritebackError,
    WritebackMode, WritebackRequest,
};

/// The longest request line the server reads.
pub const MAX_REQUEST_LEN: usize = 256;

/// How long [`request`] waits for the daemon to send something (a progress line or the
/// answer) before it gives up, unless [`TIMEOUT_ENV`] says otherwise. A long command sends a
/// progress line every [`PROGRESS_EVERY`], so this bounds the wait for a hung daemon, never the
/// length of a command.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);

/// The environment variable that sets how many seconds [`request`] waits for the daemon to
/// send something (decimals allowed), instead of [`RESPONSE_TIMEOUT`].
pub const TIMEOUT_ENV: &str = "VHOST_USER_ZRAM_CTL_TIMEOUT";

/// How often a long command sends a progress line while it runs.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// A control command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// All statistics as a readable table.
    Stats,
    /// All statistics as JSON.
    StatsJson,
    /// zram's `mm_stat` line.
    MmStat,
    /// zram's `io_stat` line.
    IoStat,
    /// Every figure in the Prometheus text exposition format.
    Metrics,
    /// Compact the allocator.
    Compact,
    /// Mark every stored page idle (zram's `echo all > idle`).
    MarkIdle,
    /// Recompress pages with the secondary algorithms (zram's `recompress`).
    Recompress(RecompressRequest),
    /// Train a zstd dictionary on a sample of the stored pages and use it from now on.
    TrainDict(TrainRequest),
    /// Mark idle the pages not accessed for at least this many seconds (zram's
    /// `echo SECS > idle`).
    MarkIdleAge(u64),
    /// Write pages back to the backing file (zram's `writeback`).
    Writeback(WritebackRequest),
    /// zram's `bd_stat` line.
    BdStat,
    /// Show, set (`N` pages, enabling it) or lift (`off`) zram's `writeback_limit`.
    WritebackLimit(LimitChange),
    /// Migrate the device's pages to the daemon receiving them there (`--incoming`).
    Migrate(Endpoint),
    /// The migration's progress.
    MigrateStatus,
    /// Cancel the migration.
    MigrateCancel,
    /// Show, set (bytes) or lift (`off`) the memory limit (zram's `mem_limit`). A limit below
    /// what the store already uses, or at or below `--writeback-above`, is refused: see
    /// [`ControlError::MemLimitBelowUse`] and [`ControlError::MemLimitNotAboveWriteback`].
    MemLimit(LimitChange),
    /// Reset `mem_used_max` to the current `mem_used_total` (zram's `echo 0 > mem_used_max`).
    MemUsedMaxReset,
    /// Free up to N bytes of mem_used_total from idle pages, and give the memory back.
    Reclaim(ReclaimRequest),
}

/// What a limit command (`writeback-limit`, `mem-limit`) does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitChange {
    /// Print the limit.
    Show,
    /// Set it: for `writeback-limit` allow this many more pages (zram's `writeback_limit` with
    /// `writeback_limit_enable` 1), for `mem-limit` this many bytes.
    Set(u64),
    /// Lift the limit (`writeback_limit_enable` 0; `mem_limit` 0).
    Off,
}

impl Command {
    /// Every command (with default arguments).
    /// (`migrate` is not here: it has no default destination.)
    pub const ALL: [Command; 17] = [
        Command::Stats,
        Command::StatsJson,
        Command::MmStat,
        Command::IoStat,
        Command::Metrics,
        Command::Compact,
        Command::MarkIdle,
        Command::Recompress(RecompressRequest {
            mode: crate::store::RecompressMode::All,
            threshold: 0,
            max_pages: None,
            target: None,
        }),
        Command::TrainDict(TrainRequest {
            samples: 8192,
            size: 16 << 10,
        }),
        Command::MarkIdleAge(0),
        Command::Writeback(WritebackRequest {
            mode: WritebackMode::Idle,
            pages: None,
            max_pages: None,
        }),
        Command::BdStat,
        Command::WritebackLimit(LimitChange::Show),
        Command::MigrateStatus,
        Command::MigrateCancel,
        Command::MemLimit(LimitChange::Show),
        Command::MemUsedMaxReset,
    ];

    /// The request line's word for this command.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Stats => "stats",
            Command::StatsJson => "stats-json",
            Command::MmStat => "mm_stat",
            Command::IoStat => "io_stat",
            Command::Metrics => "metrics",
            Command::Compact => "compact",
            Command::MarkIdle | Command::MarkIdleAge(_) => "idle",
            Command::Recompress(_) => "recompress",
            Command::TrainDict(_) => "train-dict",
            Command::Writeback(_) => "writeback",
            Command::BdStat => "bd_stat",
            Command::WritebackLimit(_) => "writeback-limit",
            Command::Migrate(_) => "migrate",
            Command::MigrateStatus => "migrate-status",
            Command::MigrateCancel => "migrate-cancel",
            Command::MemLimit(_) => "mem-limit",
            Command::MemUsedMaxReset => "mem-used-max",
            Command::Reclaim(_) => "reclaim",
        }
    }

    /// Whether the command may run for long (it walks the device, or trains): such a command
    /// sends progress lines while it runs.
    pub fn is_long(&self) -> bool {
        match self {
            Command::Compact
            | Command::MarkIdle
            | Command::MarkIdleAge(_)
            | Command::Recompress(_)
            | Command::TrainDict(_)
            | Command::Writeback(_)
            | Command::Reclaim(_) => true,
            Command::Stats
            | Command::StatsJson
            | Command::MmStat
            | Command::IoStat
            | Command::Metrics
            | Command::BdStat
            | Command::WritebackLimit(_)
            | Command::Migrate(_)
            | Command::MigrateStatus
            | Command::MigrateCancel
            | Command::MemLimit(_)
            | Command::MemUsedMaxReset => false,
        }
    }

    /// The count a progress line of this command gives, from the statistics.
    fn progress_count(&self, stats: &crate::store::Stats) -> Option<(u64, &'static str)> {
        match self {
            Command::Recompress(_) => Some((stats.recompression.pages_tried, "pages tried")),
            Command::Writeback(_) | Command::Reclaim(_) => {
                Some((stats.writeback.pages_written_back, "pages written back"))
            }
            Command::Compact
            | Command::MarkIdle
            | Command::MarkIdleAge(_)
            | Command::TrainDict(_)
            | Command::Stats
            | Command::StatsJson
            | Command::MmStat
            | Command::IoStat
            | Command::Metrics
            | Command::BdStat
            | Command::WritebackLimit(_)
            | Command::Migrate(_)
            | Command::MigrateStatus
            | Command::MigrateCancel
            | Command::MemLimit(_)
            | Command::MemUsedMaxReset => None,
        }
    }

    /// Runs the command against the observed device and returns the response body.
    pub fn execute(self, observed: &Observed) -> Result<String, ControlError> {
        let store = &observed.store;
        Ok(match self {
            Command::Stats => {
                let mut table = render::stats_table(&store.stats());
                table.push_str(&render::pressure_rows(&observed.pressure.stats()));
                table
            }
            Command::StatsJson => render::stats_json(&store.stats(), &observed.pressure.stats())
                .map_err(ControlError::Json)?,
            Command::MmStat => store.stats().mm_stat_line(),
            Command::IoStat => store.stats().io_stat_line(),
            Command::Metrics => metrics::render(observed),
            Command::Compact => format!("compacted {} pages\n", store.compact()),
            Command::MarkIdle => format!("marked {} pages idle\n", store.mark_idle()),
            Command::Recompress(request) => format!("{}\n", store.recompress(&request)?),
            Command::TrainDict(request) => {
                format!("{}\n", store.train_zstd_dictionary(&request)?)
            }
            Command::MarkIdleAge(secs) => format!(
                "marked {} pages idle\n",
                store.mark_idle_older_than(Duration::from_secs(secs))?
            ),
            Command::Writeback(request) => format!("{}\n", store.writeback(&request)?),
            Command::BdStat => store.stats().bd_stat_line(),
            Command::WritebackLimit(change) => {
                let limit = match change {
                    LimitChange::Show => None,
                    LimitChange::Set(pages) => Some(Some(pages)),
                    LimitChange::Off => Some(None),
                };
                if let Some(limit) = limit {
                    // A limit on a device that cannot write back would be accepted and mean
                    // nothing: refuse it, as `writeback` is refused.
                    if !store.has_backing_file() {
                        return Err(WritebackError::NoBackingFile.into());
                    }
                    store.set_writeback_limit(limit);
                }
                render::writeback_limit(&store.stats().writeback)
            }
            Command::Migrate(to) => migrations(observed)?
                .start(&to)
                .map_err(ControlError::Migration)?,
            Command::MigrateStatus => migrations(observed)?.status().render(),
            Command::MigrateCancel => migrations(observed)?
                .cancel()
                .map_err(ControlError::Migration)?,
            Command::MemLimit(change) => {
                match change {
                    LimitChange::Show => {}
                    LimitChange::Set(limit) => {
                        check_mem_limit(observed, limit)?;
                        observed.pressure.set_user_limit(store, Some(limit));
                    }
                    LimitChange::Off => observed.pressure.set_user_limit(store, None),
                }
                // The user's limit, and the store's when a memory cgroup makes it lower.
                let user = observed.pressure.user_limit();
                let mut answer = render::mem_limit(user);
                if let Some(effective) = store.mem_limit().filter(|&e| Some(e) != user) {
                    answer.push_str(&render::store_limit(effective));
                }
                answer
            }
            Command::MemUsedMaxReset => render::mem_used_max(store.reset_mem_used_max()),
            Command::Reclaim(request) => {
                observed.pressure.count_ctl_reclaim();
                format!(
                    "{}\n",
                    store
                        .reclaim(&request)
                        .map_err(|e| ControlError::BadArgument(e.to_string()))?
                )
            }
        })
    }
}

/// Refuses a memory limit set at run time that is at or below `--writeback-above` (writes
/// would be refused before the writeback thread ever made room, the rule the start enforces
/// between `--writeback-above` and `--mem-limit`) or below what the store already uses. zram
/// takes any `mem_limit` and fails every new write above it; here, as `--mem-limit` below the
/// empty store's needs is refused at start, such a limit is refused (a mistyped unit would
/// otherwise fail the guest's swap-outs at once): free memory first (`writeback`, `compact`).
/// The check and the setting are not atomic with the guest's writes: the limit is compared
/// with the memory in use when the command runs.
fn check_mem_limit(observed: &Observed, limit: u64) -> Result<(), ControlError> {
    if let Some(above) = observed.writeback_above.filter(|&above| limit <= above) {
        return Err(ControlError::MemLimitNotAboveWriteback { limit, above });
    }
    let used = observed.store.mem_used_total();
    if limit < used {
        return Err(ControlError::MemLimitBelowUse { limit, used });
    }
    Ok(())
}

/// The daemon's migrations, which every daemon has (a store observed without a daemon does
/// not).
fn migrations(observed: &Observed) -> Result<&crate::migrating::Migrations, ControlError> {
    observed
        .migrations
        .as_deref()
        .ok_or_else(|| ControlError::Migration("this device cannot be migrated".into()))
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Recompress(request) => write!(f, "{} {request}", self.name()),
            Command::TrainDict(request) => write!(f, "{} {request}", self.name()),
            Command::MarkIdleAge(secs) => write!(f, "idle --age {secs}"),
            Command::Writeback(request) => write!(f, "{} {request}", self.name()),
            Command::WritebackLimit(LimitChange::Set(pages)) => {
                write!(f, "{} {pages}", self.name())
            }
            Command::WritebackLimit(LimitChange::Off) => write!(f, "{} off", self.name()),
            Command::Migrate(to) => write!(f, "{} {to}", self.name()),
            Command::MemLimit(LimitChange::Set(bytes)) => write!(f, "{} {bytes}", self.name()),
            Command::MemLimit(LimitChange::Off) => write!(f, "{} off", self.name()),
            Command::MemUsedMaxReset => write!(f, "{} reset", self.name()),
            Command::Reclaim(request) => write!(f, "{} {request}", self.name()),
            Command::MemLimit(LimitChange::Show)
            | Command::WritebackLimit(LimitChange::Show)
            | Command::BdStat
            | Command::Stats
            | Command::StatsJson
            | Command::MmStat
            | Command::IoStat
            | Command::Metrics
            | Command::Compact
            | Command::MarkIdle
            | Command::MigrateStatus
            | Command::MigrateCancel => f.write_str(self.name()),
        }
    }
}

impl FromStr for Command {
    type Err = ControlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Commands with arguments: `recompress key=value...`, `idle all`.
        let (name, arguments) = s
            .split_once(char::is_whitespace)
            .map_or((s, ""), |(name, rest)| (name, rest.trim()));
        match (name, arguments) {
            ("recompress", arguments) => return Ok(Command::Recompress(arguments.parse()?)),
            ("train-dict", arguments) => return Ok(Command::TrainDict(arguments.parse()?)),
            ("idle", "" | "all") => return Ok(Command::MarkIdle),
            ("idle", other) => {
                let age = other
                    .strip_prefix("--age")
                    .map(str::trim)
                    .and_then(|secs| secs.parse::<u64>().ok());
                return match age {
                    Some(secs) => Ok(Command::MarkIdleAge(secs)),
                    None => Err(ControlError::BadArgument(format!(
                        "idle takes 'all' or '--age SECS', not '{}'",
                        other.chars().take(64).collect::<String>()
                    ))),
                };
            }
            ("reclaim", arguments) => {
                return arguments
                    .parse()
                    .map(Command::Reclaim)
                    .map_err(ControlError::BadArgument)
            }
            ("writeback", arguments) => {
                return arguments
                    .parse()
                    .map(Command::Writeback)
                    .map_err(|e: BadWritebackRequest| ControlError::BadArgument(e.to_string()))
            }
            ("migrate", "") => {
                return Err(ControlError::BadArgument(
                    "migrate takes the destination: unix:PATH or tcp:HOST:PORT".into(),
                ))
            }
            ("migrate", to) => {
                return to.parse().map(Command::Migrate).map_err(
                    |e: crate::migrate::MigrateError| ControlError::BadArgument(e.to_string()),
                )
            }
            ("writeback-limit", "") => return Ok(Command::WritebackLimit(LimitChange::Show)),
            ("writeback-limit", "off") => return Ok(Command::WritebackLimit(LimitChange::Off)),
            ("writeback-limit", pages) => {
                return pages
                    .parse()
                    .map(|pages| Command::WritebackLimit(LimitChange::Set(pages)))
                    .map_err(|_| {
                        ControlError::BadArgument(format!(
                            "writeback-limit takes a number of pages or 'off', not '{}'",
                            pages.chars().take(64).collect::<String>()
                        ))
                    })
            }
            ("mem-limit", "") => return Ok(Command::MemLimit(LimitChange::Show)),
            ("mem-limit", "off") => return Ok(Command::MemLimit(LimitChange::Off)),
            ("mem-limit", bytes) => {
                return match bytes.parse::<u64>() {
                    Ok(bytes @ 1..) => Ok(Command::MemLimit(LimitChange::Set(bytes))),
                    Ok(0) | Err(_) => Err(ControlError::BadArgument(format!(
                        "mem-limit takes a number of bytes above 0, or 'off', not '{}'",
                        bytes.chars().take(64).collect::<String>()
                    ))),
                }
            }
            ("mem-used-max", "reset") => return Ok(Command::MemUsedMaxReset),
            ("mem-used-max", other) => {
                return Err(ControlError::BadArgument(format!(
                    "mem-used-max takes 'reset' (zram's echo 0 > mem_used_max), not '{}'",
                    other.chars().take(64).collect::<String>()
                )))
            }
            (_, "") => {}
            (name, _) => {
                return Err(ControlError::BadArgument(format!(
                    "{} takes no arguments",
                    name.chars().take(64).collect::<String>()
                )))
            }
        }
        Command::ALL
            .into_iter()
            .find(|command| command.name() == s)
            .ok_or_else(|| ControlError::UnknownCommand(s.chars().take(64).collect()))
    }
}

/// Errors of the control socket, on either side.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The request names no command.
    #[error(
        "unknown command '{0}'; the commands are stats, stats-json, mm_stat, io_stat, metrics, \
         compact, idle, recompress, train-dict, writeback, reclaim, bd_stat, writeback-limit, migrate, \
         migrate-status, migrate-cancel, mem-limit and mem-used-max"
    )]
    UnknownCommand(String),
    /// A command's arguments are wrong.
    #[error("{0}")]
    BadArgument(String),
    /// A recompression request is wrong or cannot run.
    #[error(transparent)]
    Recompress(#[from] RecompressError),
    /// A writeback request cannot run, or failed.
    #[error(transparent)]
    Writeback(#[from] WritebackError),
    /// A migration command was refused or failed.
    #[error("{0}")]
    Migration(String),
    /// `mem-limit` at or below `--writeback-above`.
    #[error(
        "mem-limit {} is at or below --writeback-above {}: writes would be refused before \
         writeback made room; give a limit above the --writeback-above mark, or off",
        render::bytes(*.limit),
        render::bytes(*.above)
    )]
    MemLimitNotAboveWriteback {
        /// The limit asked for, bytes.
        limit: u64,
        /// The daemon's `--writeback-above`, bytes.
        above: u64,
    },
    /// `mem-limit` below what the store already uses.
    #[error(
        "mem-limit {} is below the {} the store already uses (mem_used_total); free memory \
         first (writeback, compact) or give at least that",
        render::bytes(*.limit),
        render::bytes(*.used)
    )]
    MemLimitBelowUse {
        /// The limit asked for, bytes.
        limit: u64,
        /// `mem_used_total` when the command ran, bytes.
        used: u64,
    },
    /// The request line is too long or not UTF-8.
    #[error("the request is not one line of at most {MAX_REQUEST_LEN} bytes of text")]
    BadRequest,
    /// The request line did not arrive in time.
    #[error("the request line did not arrive within {} s", CLIENT_DEADLINE.as_secs())]
    Deadline,
    /// Serializing statistics failed.
    #[error("cannot serialize the statistics")]
    Json(#[source] serde_json::Error),
    /// The client cannot reach the daemon.
    #[error("cannot connect to the control socket {path}")]
    Connect {
        /// The socket path.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Talking over the socket failed.
    #[error("the control connection failed")]
    Io(#[source] io::Error),
    /// The daemon answered with an error.
    #[error("the daemon refused the command: {0}")]
    Refused(String),
    /// The daemon's answer is not in the protocol's form.
    #[error("the daemon sent a malformed response")]
    MalformedResponse,
    /// The daemon sent nothing, not even a progress line, for the whole timeout.
    #[error(
        "the daemon sent nothing for {} s, not even progress; it may be stopped or hung \
         (set {TIMEOUT_ENV} to wait longer)",
        .0.as_secs_f64()
    )]
    Silent(Duration),
    /// The daemon closed the connection before it answered.
    #[error("the daemon closed the connection without an answer; it may have exited")]
    NoAnswer,
    /// The timeout in the environment is not a number of seconds.
    #[error("{TIMEOUT_ENV}='{0}' is not a number of seconds")]
    BadTimeout(String),
}

/// Sends `command` to the daemon listening on `path` and returns the response body. Waits
/// for as long as the daemon keeps sending progress lines; gives up when it sends nothing for
/// [`RESPONSE_TIMEOUT`] (or the seconds [`TIMEOUT_ENV`] gives).
pub fn request(path: &Path, command: Command) -> Result<String, ControlError> {
    request_within(path, command, response_timeout()?, &mut |_| {})
}

/// The timeout [`request`] uses: [`TIMEOUT_ENV`]'s seconds, or [`RESPONSE_TIMEOUT`].
pub fn response_timeout() -> Result<Duration, ControlError> {
    let Some(text) = std::env::var_os(TIMEOUT_ENV) else {
        return Ok(RESPONSE_TIMEOUT);
    };
    let text = text.to_string_lossy();
    text.trim()
        .parse::<f64>()
        .ok()
        .filter(|secs| secs.is_finite() && *secs >= 0.001 && *secs <= 1e9)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| ControlError::BadTimeout(text.chars().take(64).collect()))
}

/// Like [`request`], waiting at most `timeout` for each line the daemon sends, and passing each
/// progress line's text to `on_progress`.
pub fn request_within(
    path: &Path,
    command: Command,
    timeout: Duration,
    on_progress: &mut dyn FnMut(&str),
) -> Result<String, ControlError> {
    let mut stream = UnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: path.display().to_string(),
        source,
    })?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(ControlError::Io)?;
    let failed = |error: io::Error| match error.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ControlError::Silent(timeout),
        io::ErrorKind::InvalidData => ControlError::MalformedResponse,
        // The daemon closed the connection with our request unread: it exited, or refused.
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => ControlError::NoAnswer,
        _ => ControlError::Io(error),
    };
    stream
        .write_all(format!("{command}\n").as_bytes())
        .map_err(failed)?;
    let mut reader = io::BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).map_err(failed)? == 0 {
            return Err(ControlError::NoAnswer);
        }
        if let Some(progress) = line.strip_prefix(PROGRESS_PREFIX) {
            on_progress(progress.trim_end());
        } else if line == "ok\n" {
            let mut body = String::new();
            reader.read_to_string(&mut body).map_err(failed)?;
            return Ok(body);
        } else if let Some(message) = line.strip_prefix("error ") {
            return Err(ControlError::Refused(message.trim_end().to_owned()));
        } else {
            return Err(ControlError::MalformedResponse);
        }
    }
}

/// What begins a progress line.
const PROGRESS_PREFIX: &str = "progress ";

/// The control protocol as a [`Handler`].
struct ControlHandler {
    observed: Arc<Observed>,
    progress_every: Duration,
}

impl ControlHandler {
    /// Runs a long command, writing a progress line to `stream` every `progress_every` until
    /// it ends, so that the client knows the daemon is at work and keeps waiting. A client that
    /// stops reading or goes away ends the progress lines, never the command.
    fn execute_reporting(
        &self,
        command: Command,
        stream: &UnixStream,
    ) -> Result<String, ControlError> {
        let (done, finished) = mpsc::channel::<()>();
        let observed = &self.observed;
        let every = self.progress_every;
        let command = &command;
        std::thread::scope(|scope| {
            let reporter = std::thread::Builder::new()
                .name("control-progress".to_owned())
                .spawn_scoped(scope, move || {
                    let started = Instant::now();
                    let count =
                        |observed: &Observed| command.progress_count(&observed.store.stats());
                    let before = count(observed).map_or(0, |(n, _)| n);
                    let mut stream = stream;
                    while let Err(RecvTimeoutError::Timeout) = finished.recv_timeout(every) {
                        let mut line = format!(
                            "{PROGRESS_PREFIX}{}: running for {} s",
                            command.name(),
                            started.elapsed().as_secs()
                        );
                        if let Some((now, what)) = count(observed) {
                            line.push_str(&format!(", {} {what}", now.saturating_sub(before)));
                        }
                        line.push('\n');
                        if let Err(error) = stream.write_all(line.as_bytes()) {
                            debug!("control connection: progress: {error}");
                            return;
                        }
                    }
                });
            if let Err(error) = &reporter {
                debug!("control: no progress lines: cannot start a thread: {error}");
            }
            let result = command.clone().execute(observed);
            drop(done);
            give_back_freed_memory();
            result
        })
    }
}

/// Gives the OS back what a long command freed and malloc would keep: this thread's zstd
/// contexts, and the free memory of every malloc arena (glibc keeps freed memory in its
/// arenas, where it stays resident: a compaction, recompression, writeback or training frees
/// much at once, and without this the daemon's resident memory stayed tens of MiB above
/// `mem_used_total`).
fn give_back_freed_memory() {
    crate::codec::Zstd::release_thread_contexts();
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes no pointers; it only returns free memory of malloc's arenas to
    // the OS, which no live allocation uses.
    unsafe {
        libc::malloc_trim(0);
    }
}

impl Handler<UnixStream> for ControlHandler {
    fn terminator(&self) -> &'static [u8] {
        b"\n"
    }

    fn max_request_len(&self) -> usize {
        MAX_REQUEST_LEN
    }

    fn serve(&self, line: &[u8], client: &mut Client<UnixStream>) {
        let result = parse_request(line).and_then(|command| {
            if command.is_long() {
                self.execute_reporting(command, &client.stream)
            } else {
                command.execute(&self.observed)
            }
        });
        let response = match result {
            Ok(body) => format!("ok\n{body}"),
            Err(error) => format!("error {error}\n"),
        };
        if let Err(error) = client.respond(response.as_bytes()) {
            debug!("control connection: {error}");
        }
    }

    fn refusal(&self, error: &ReadError) -> Option<Vec<u8>> {
        let error = match error {
            ReadError::Deadline => ControlError::Deadline,
            ReadError::TooLong => ControlError::BadRequest,
        };
        Some(format!("error {error}\n").into_bytes())
    }

    fn busy_response(&self) -> &'static [u8] {
        b"error busy: too many control clients at once; try again\n"
    }
}

/// The control server: answers one request per connection, clients served concurrently.
#[derive(Debug)]
pub struct ControlServer {
    server: BoundedServer,
}

impl ControlServer {
    /// Serves `listener` for the observed device on new threads until [`ControlServer::stop`].
    pub fn spawn(listener: UnixListener, observed: Arc<Observed>) -> io::Result<Self> {
        Self::spawn_with_limits(listener, observed, ServerLimits::default())
    }

    /// [`ControlServer::spawn`] with other limits than the defaults.
    pub fn spawn_with_limits(
        listener: UnixListener,
        observed: Arc<Observed>,
        limits: ServerLimits,
    ) -> io::Result<Self> {
        Self::spawn_reporting_every(listener, observed, limits, PROGRESS_EVERY)
    }

    /// [`ControlServer::spawn_with_limits`], with long commands sending a progress line every
    /// `progress_every` instead of every [`PROGRESS_EVERY`].
    pub fn spawn_reporting_every(
        listener: UnixListener,
        observed: Arc<Observed>,
        limits: ServerLimits,
        progress_every: Duration,
    ) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        let handler = ControlHandler {
            observed,
            progress_every,
        };
        let server = BoundedServer::spawn("control", listener, handler, limits)?;
        Ok(ControlServer { server })
    }

    /// How many requests are being answered now.
    pub fn active_clients(&self) -> usize {
        self.server.active_clients()
    }

    /// How many connections are still sending their request.
    pub fn waiting_clients(&self) -> usize {
        self.server.waiting_clients()
    }

    /// Stops the server and waits for its threads.
    pub fn stop(self) {
        self.server.stop();
    }

    /// The server's threads, for an owner that stops them with others.
    pub fn into_threads(self) -> crate::stop::Threads {
        self.server.into_threads()
    }
}

fn parse_request(line: &[u8]) -> Result<Command, ControlError> {
    if line.len() > MAX_REQUEST_LEN {
        return Err(ControlError::BadRequest);
    }
    let text = std::str::from_utf8(line).map_err(|_| ControlError::BadRequest)?;
    text.trim().parse()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blk::request_stats::RequestStats;
    use crate::codec::Algorithm;
    use crate::store::{PageStore, StoreConfig};
    use std::sync::atomic::AtomicBool;
    use std::time::Instant;

    fn observed() -> Arc<Observed> {
        let store = PageStore::new(StoreConfig {
            capacity_pages: 64,
            algorithm: Algorithm::Lz4,
            level: None,
            mem_limit: None,
        })
        .unwrap();
        Arc::new(Observed::new(
            Arc::new(store),
            Arc::new(RequestStats::new(1)),
            Arc::new(AtomicBool::new(false)),
            "control-test",
        ))
    }

    #[test]
    fn migration_commands_report_refuse_and_cancel_in_sentences() {
        let plain = observed();
        assert!(matches!(
            Command::MigrateStatus.execute(&plain),
            Err(ControlError::Migration(why)) if why.contains("cannot be migrated")
        ));
        let mut with = Observed::new(
            Arc::clone(&plain.store),
            Arc::new(RequestStats::new(1)),
            Arc::new(AtomicBool::new(false)),
            "control-test",
        );
        with.migrations = Some(Arc::new(
            crate::migrating::Migrations::new(Arc::clone(&plain.store), None, None).unwrap(),
        ));
        let status = Command::MigrateStatus.execute(&with).unwrap();
        assert!(status.starts_with("role source\nstate idle\n"), "{status}");
        let cancel = Command::MigrateCancel
            .execute(&with)
            .unwrap_err()
            .to_string();
        assert_eq!(cancel, "no migration is running");
        let dir = tempfile::tempdir().unwrap();
        let nobody = Endpoint::Unix(dir.path().join("nobody.sock"));
        let failed = Command::Migrate(nobody)
            .execute(&with)
            .unwrap_err()
            .to_string();
        assert!(failed.contains("nobody.sock"), "{failed}");
        let status = Command::MigrateStatus.execute(&with).unwrap();
        assert!(status.contains("state failed\n"), "{status}");
        // TCP needs a token; none was given to this daemon.
        let tcp = Command::Migrate(Endpoint::Tcp("127.0.0.1:9".into()))
            .execute(&with)
            .unwrap_err()
            .to_string();
        assert!(tcp.contains("needs a token"), "{tcp}");
    }

    #[test]
    fn mem_limit_at_run_time_is_shown_set_lifted_and_refused_in_sentences() {
        // Arrange: a daemon's view with --writeback-above 1 MiB, and one without.
        let plain = observed();
        let mut with_above = Observed::new(
            Arc::clone(&plain.store),
            Arc::new(RequestStats::new(1)),
            Arc::new(AtomicBool::new(false)),
            "control-test",
        );
        with_above.writeback_above = Some(1 << 20);
        let set = |observed: &Observed, limit: u64| {
            Command::MemLimit(LimitChange::Set(limit)).execute(observed)
        };

        // Act and assert: no limit at first.
        let shown = Command::MemLimit(LimitChange::Show).execute(&plain);
        assert_eq!(shown.unwrap(), "mem_limit off\n");

        // At or below the writeback mark: refused, naming both.
        for limit in [1 << 20, 4096] {
            let refused = set(&with_above, limit).unwrap_err().to_string();
            assert!(
                refused.starts_with("mem-limit ")
                    && refused.contains("at or below --writeback-above 1048576 bytes (1.0 MiB)"),
                "{refused}"
            );
        }
        // Below what the store uses: refused, naming the use.
        let used = plain.store.mem_used_total();
        let refused = set(&plain, used - 1).unwrap_err().to_string();
        assert!(
            refused.contains(&format!("is below the {used} bytes")),
            "{refused}"
        );
        assert!(refused.contains("already uses"), "{refused}");
        assert_eq!(plain.store.mem_limit(), None, "a refusal changes nothing");

        // Above both: set; `off` lifts it.
        assert_eq!(
            set(&with_above, 2 << 20).unwrap(),
            "mem_limit 2097152 bytes (2.0 MiB)\n"
        );
        assert_eq!(plain.store.mem_limit(), Some(2 << 20));
        let at_use = set(&plain, used).unwrap();
        assert!(
            at_use.starts_with(&format!("mem_limit {used} bytes")),
            "{at_use}"
        );
        let off = Command::MemLimit(LimitChange::Off).execute(&with_above);
        assert_eq!(off.unwrap(), "mem_limit off\n");
        assert_eq!(plain.store.mem_limit(), None);
    }

    #[test]
    fn mem_used_max_reset_answers_with_the_new_mark() {
        // Arrange: fill the store, then free it: the mark stays at the peak.
        let observed = observed();
        let store = &observed.store;
        let mut page = [0u8; crate::PAGE_SIZE];
        for index in 0..64 {
            crate::pagegen::fill_page(0x51, index, &mut page);
            store.write(index, &page).unwrap();
        }
        store.discard(0..64).unwrap();
        let peak = store.stats().mm.mem_used_max;
        assert!(peak > store.mem_used_total());

        // Act
        let answer = Command::MemUsedMaxReset.execute(&observed).unwrap();

        // Assert
        let now = store.stats().mm.mem_used_max;
        assert_eq!(now, store.mem_used_total());
        assert!(
            answer.starts_with(&format!("mem_used_max {now} bytes")),
            "{answer}"
        );
    }

    struct Running {
        server: ControlServer,
        path: std::path::PathBuf,
        _dir: tempfile::TempDir,
    }

    fn start(limits: ServerLimits) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = ControlServer::spawn_with_limits(listener, observed(), limits).unwrap();
        Running {
            server,
            path,
            _dir: dir,
        }
    }

    fn client_threads() -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .filter(|name| name.trim() == "control-client")
            .count()
    }

    fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn every_command_parses_from_its_request_line() {
        for command in Command::ALL {
            assert_eq!(command.to_string().parse::<Command>().unwrap(), command);
        }
        for (line, command) in [
            ("idle --age 600", Command::MarkIdleAge(600)),
            (
                "writeback-limit 12",
                Command::WritebackLimit(LimitChange::Set(12)),
            ),
            (
                "writeback-limit off",
                Command::WritebackLimit(LimitChange::Off),
            ),
            (
                "writeback huge",
                Command::Writeback(WritebackRequest::new(WritebackMode::Huge)),
            ),
            (
                "migrate unix:/run/vm1.incoming.sock",
                Command::Migrate(Endpoint::Unix("/run/vm1.incoming.sock".into())),
            ),
            (
                "migrate tcp:dest.example:4444",
                Command::Migrate(Endpoint::Tcp("dest.example:4444".into())),
            ),
            (
                "mem-limit 8388608",
                Command::MemLimit(LimitChange::Set(8 << 20)),
            ),
            ("mem-limit off", Command::MemLimit(LimitChange::Off)),
            ("mem-used-max reset", Command::MemUsedMaxReset),
            (
                "reclaim 67108864 min_age=600 mode=writeback",
                Command::Reclaim("67108864 min_age=600 mode=writeback".parse().unwrap()),
            ),
        ] {
            assert_eq!(
                command.to_string().parse::<Command>().unwrap(),
                command,
                "{command}"
            );
            assert_eq!(line.parse::<Command>().unwrap(), command, "{line}");
        }
        for bad in [
            "writeback",
            "writeback cold",
            "idle --age x",
            "writeback-limit -1",
            "bd_stat x",
            "migrate",
            "migrate ftp:x",
            "migrate tcp:noport",
            "migrate-status now",
            "reclaim",
            "reclaim 64M",
            "reclaim 4096 mode=cold",
            "mem-limit 0",
            "mem-limit 8M",
            "mem-limit -1",
            "mem-used-max",
            "mem-used-max 0",
        ] {
            assert!(
                matches!(bad.parse::<Command>(), Err(ControlError::BadArgument(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_request(b"frobnicate\n"),
            Err(ControlError::UnknownCommand(_))
        ));
        assert!(matches!(
            parse_request(&[b'a'; 300]),
            Err(ControlError::BadRequest)
        ));
        assert!(matches!(
            parse_request(b"\xff\n"),
            Err(ControlError::BadRequest)
        ));
    }

    /// A client that sends `s` every `every` and never a newline, until the server closes
    /// the connection or `give_up` passes; returns how long it was served and what it got.
    fn drip(
        mut stream: UnixStream,
        every: Duration,
        give_up: Duration,
    ) -> std::thread::JoinHandle<(Duration, String)> {
        let started = Instant::now();
        std::thread::spawn(move || {
            let mut response = String::new();
            stream.set_nonblocking(true).unwrap();
            while started.elapsed() < give_up {
                if stream.write_all(b"s").is_err() {
                    break;
                }
                std::thread::sleep(every);
                let mut buffer = [0u8; 256];
                match stream.read(&mut buffer) {
                    Ok(0) => break,
                    Ok(n) => response.push_str(&String::from_utf8_lossy(&buffer[..n])),
                    Err(_) => {}
                }
            }
            (started.elapsed(), response)
        })
    }

    #[test]
    fn a_slow_drip_client_neither_delays_another_nor_outlives_its_deadline() {
        // Arrange: a 1 s deadline; one client sends a byte every 100 ms and never a newline.
        let limits = ServerLimits {
            deadline: Duration::from_secs(1),
            ..ServerLimits::default()
        };
        let running = start(limits);
        let dripper = UnixStream::connect(&running.path).unwrap();
        let drip = drip(dripper, Duration::from_millis(100), Duration::from_secs(10));
        wait_until("the dripper waits", || {
            running.server.waiting_clients() == 1
        });

        // Act: a second client asks for stats meanwhile.
        let asked = Instant::now();
        let stats = request(&running.path, Command::Stats).unwrap();
        let answered_in = asked.elapsed();
        let (dripped_for, drip_response) = drip.join().unwrap();

        // Assert
        assert!(stats.contains("mem_used_total"));
        assert!(
            answered_in < Duration::from_secs(1),
            "stats took {answered_in:?}"
        );
        assert!(
            drip_response.starts_with("error the request line did not arrive"),
            "the dripper got {drip_response:?}"
        );
        assert!(
            dripped_for < Duration::from_millis(2500),
            "the dripper was served for {dripped_for:?} against a 1 s deadline"
        );
    }

    #[test]
    fn slow_clients_hold_no_thread_and_never_deny_a_complete_request() {
        // Arrange: sixteen clients drip a byte every 200 ms against a bound of four answering
        // threads and a 10 s deadline: on main they took every thread and `ctl` got busy.
        let running = start(ServerLimits {
            deadline: Duration::from_secs(10),
            max_clients: 4,
            max_waiting: MAX_WAITING,
        });
        let drippers: Vec<_> = (0..16)
            .map(|_| {
                let stream = UnixStream::connect(&running.path).unwrap();
                drip(stream, Duration::from_millis(200), Duration::from_secs(4))
            })
            .collect();
        wait_until("sixteen clients wait", || {
            running.server.waiting_clients() == 16
        });

        // Act: forty requests meanwhile.
        let answers: Vec<_> = (0..40)
            .map(|_| request(&running.path, Command::MmStat))
            .collect();

        // Assert
        for answer in &answers {
            assert!(answer.is_ok(), "{answer:?}");
        }
        // The last answering thread may still be ending; the sixteen hold none.
        wait_until("no thread answers", || client_threads() == 0);
        assert_eq!(running.server.waiting_clients(), 16);
        for dripper in drippers {
            let (_, response) = dripper.join().unwrap();
            assert_eq!(response, "", "a dripper was answered");
        }
    }

    #[test]
    fn a_full_waiting_table_pushes_out_its_oldest_client() {
        // Arrange: four clients connect and send nothing, filling a table of four.
        let running = start(ServerLimits {
            deadline: Duration::from_secs(10),
            max_clients: 4,
            max_waiting: 4,
        });
        let mut idle: Vec<UnixStream> = (0..4)
            .map(|_| UnixStream::connect(&running.path).unwrap())
            .collect();
        wait_until("four clients wait", || {
            running.server.waiting_clients() == 4
        });

        // Act: a real request comes.
        let answer = request(&running.path, Command::MmStat);

        // Assert: it was answered, and the oldest idle client was told busy and closed.
        assert!(answer.is_ok(), "{answer:?}");
        let mut oldest = idle.remove(0);
        oldest
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut response = String::new();
        oldest.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("error busy"), "got {response:?}");
        wait_until("no thread answers", || client_threads() == 0);
        drop(idle);
        wait_until("the idle clients are gone", || {
            running.server.waiting_clients() == 0
        });
    }

    #[test]
    fn stopping_the_server_ends_clients_still_sending() {
        let running = start(ServerLimits {
            deadline: Duration::from_secs(30),
            max_clients: 2,
            max_waiting: 2,
        });
        let _idle = UnixStream::connect(&running.path).unwrap();
        wait_until("the client waits", || running.server.waiting_clients() == 1);
        let stopping = Instant::now();
        running.server.stop();
        assert!(stopping.elapsed() < Duration::from_secs(2));
    }

    /// An lz4 store of `pages` swap-like pages with zstd at level 19 to recompress with: a
    /// pass over it takes seconds.
    fn slow_to_recompress(pages: u64) -> Arc<Observed> {
        let store = PageStore::new(StoreConfig {
            capacity_pages: pages,
            algorithm: Algorithm::Lz4,
            level: None,
            mem_limit: None,
        })
        .unwrap()
        .with_secondary_algorithms(&["zstd:level=19".parse().unwrap()])
        .unwrap();
        let mut page = [0u8; crate::PAGE_SIZE];
        for index in 0..pages {
            crate::pagegen::fill_page(0x51, index, &mut page);
            store.write(index, &page).unwrap();
        }
        Arc::new(Observed::new(
            Arc::new(store),
            Arc::new(RequestStats::new(1)),
            Arc::new(AtomicBool::new(false)),
            "control-test",
        ))
    }

    #[test]
    fn a_long_command_outlasting_the_client_timeout_reports_progress_and_succeeds() {
        // Arrange: progress every 50 ms; the client waits 400 ms at most for each line (on
        // main it read with one timeout and failed with "Resource temporarily unavailable"
        // while the daemon went on).
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let observed = slow_to_recompress(4096);
        let server = ControlServer::spawn_reporting_every(
            UnixListener::bind(&path).unwrap(),
            observed.clone(),
            ServerLimits::default(),
            Duration::from_millis(50),
        )
        .unwrap();
        let timeout = Duration::from_millis(400);
        let mut progress = Vec::new();

        // Act
        let started = Instant::now();
        let answer = request_within(&path, "recompress".parse().unwrap(), timeout, &mut |line| {
            progress.push(line.to_owned())
        });
        let took = started.elapsed();

        // Assert
        let answer = answer.unwrap();
        assert!(answer.starts_with("tried "), "{answer}");
        assert!(
            took > timeout,
            "the pass took {took:?}: too fast to outlast the timeout"
        );
        assert!(progress.len() >= 2, "{progress:?}");
        assert!(
            progress[0].starts_with("recompress: running for "),
            "{progress:?}"
        );
        assert!(
            progress.last().unwrap().ends_with("pages tried"),
            "{progress:?}"
        );
        server.stop();
    }

    #[test]
    fn a_silent_or_vanished_daemon_fails_the_request_with_a_sentence_instead_of_hanging() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let hung = std::thread::spawn(move || {
            // The first client is never answered; the second is closed at once.
            let (first, _) = listener.accept().unwrap();
            let (second, _) = listener.accept().unwrap();
            drop(second);
            std::thread::sleep(Duration::from_millis(500));
            drop(first);
        });

        let silent = request_within(
            &path,
            Command::Compact,
            Duration::from_millis(200),
            &mut |_| {},
        );
        let vanished = request_within(&path, Command::Compact, Duration::from_secs(5), &mut |_| {});
        hung.join().unwrap();

        let silent = silent.unwrap_err().to_string();
        assert!(
            silent.starts_with("the daemon sent nothing for 0.2 s"),
            "{silent}"
        );
        assert!(
            matches!(vanished, Err(ControlError::NoAnswer)),
            "{vanished:?}"
        );
    }

    #[test]
    fn writeback_limit_without_a_backing_file_is_refused_like_writeback() {
        let observed = observed();

        let set = Command::WritebackLimit(LimitChange::Set(100)).execute(&observed);
        let off = Command::WritebackLimit(LimitChange::Off).execute(&observed);
        let writeback =
            Command::Writeback(WritebackRequest::new(WritebackMode::Idle)).execute(&observed);
        let shown = Command::WritebackLimit(LimitChange::Show).execute(&observed);

        let writeback = writeback.unwrap_err().to_string();
        assert!(writeback.contains("needs a backing file"), "{writeback}");
        assert_eq!(set.unwrap_err().to_string(), writeback);
        assert_eq!(off.unwrap_err().to_string(), writeback);
        assert_eq!(shown.unwrap(), "writeback_limit off\n");
        assert!(!observed.store.stats().writeback.limit_enabled);
    }

    #[test]
    fn commands_with_arguments_roundtrip_through_their_request_line() {
        let line = "recompress type=huge_idle threshold=1000 max_pages=7 algo=zstd";
        let command = parse_request(line.as_bytes()).unwrap();
        assert_eq!(command.to_string(), line);
        assert_eq!(parse_request(b"idle all\n").unwrap(), Command::MarkIdle);
        let line = "train-dict samples=100 size=4096";
        assert_eq!(parse_request(line.as_bytes()).unwrap().to_string(), line);
        for bad in [
            &b"idle 3600"[..],
            b"stats now",
            b"recompress type=cold",
            b"train-dict size=1",
        ] {
            let error = parse_request(bad).unwrap_err();
            assert!(
                matches!(
                    error,
                    ControlError::BadArgument(_) | ControlError::Recompress(_)
                ),
                "{error}"
            );
        }
    }
}
