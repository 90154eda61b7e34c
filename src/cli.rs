// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The command line: `vhost-user-zram --socket-path PATH --size SIZE [options]` serves a
//! device; `vhost-user-zram ctl --control-socket PATH <command>` talks to a running one.
//!
//! Every wrong value is reported as one sentence on stderr with a non-zero exit status
//! ([`EXIT_USAGE`] for bad arguments, [`EXIT_FAILURE`] for failures while starting or
//! running), never as a panic.

use std::ffi::OsString;
use std::io::Write;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::blk::config::{DeviceConfig, MAX_QUEUES, MAX_QUEUE_SIZE, SERIAL_LEN};
use crate::codec::Algorithm;
use crate::control::{self, Command};
use crate::daemon::{self, Daemon, DaemonConfig, ListenOn};
use crate::store::StoreConfig;
use crate::PAGE_SIZE;

/// Exit status for arguments that make no sense.
pub const EXIT_USAGE: u8 = 2;
/// Exit status for failures while starting or running.
pub const EXIT_FAILURE: u8 = 1;

/// The vhost-user backend program capabilities (`--print-capabilities`), as the vhost-user
/// specification's "Backend program conventions" define them. Only `read-only` applies: the
/// device has no backing file, so `blk-file` is not offered.
pub const CAPABILITIES: &str =
    "{\n  \"type\": \"block\",\n  \"features\": [\n    \"read-only\"\n  ]\n}\n";

/// vhost-user-zram: a compressed-RAM block device for virtual machines, over vhost-user-blk.
#[derive(Debug, Parser)]
#[command(
    name = "vhost-user-zram",
    version,
    about,
    args_conflicts_with_subcommands = true
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
}

/// `ctl` arguments.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH")]
    pub control_socket: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// `ctl` commands.
#[derive(Debug, Clone, Copy, Subcommand)]
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
}

impl CtlCommand {
    /// The control-protocol command.
    pub fn command(self) -> Command {
        match self {
            CtlCommand::Stats { json: false } => Command::Stats,
            CtlCommand::Stats { json: true } => Command::StatsJson,
            CtlCommand::MmStat => Command::MmStat,
            CtlCommand::IoStat => Command::IoStat,
            CtlCommand::Metrics => Command::Metrics,
            CtlCommand::Compact => Command::Compact,
        }
    }
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
    #[arg(long, value_name = "N")]
    pub fd: Option<RawFd>,
    /// Device size in bytes, with an optional K, M, G or T suffix (powers of 1024); a non-zero
    /// multiple of 4 KiB.
    #[arg(long, value_name = "SIZE", value_parser = parse_device_size)]
    pub size: Option<u64>,
    /// Compression algorithm: lz4, zstd or deflate.
    #[arg(long, value_name = "NAME", default_value = "lz4", value_parser = parse_algorithm)]
    pub algorithm: Algorithm,
    /// Compression level, for algorithms that have levels (zstd 1-22, deflate 1-12).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub algorithm_level: Option<i32>,
    /// Number of request queues, each served by its own thread.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = parse_num_queues)]
    pub num_queues: u16,
    /// The largest queue size offered: a power of two up to 32768.
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = parse_queue_size)]
    pub queue_size: u16,
    /// Stop storing new pages once the store uses this much memory (same suffixes as --size).
    #[arg(long, value_name = "SIZE", value_parser = parse_mem_limit)]
    pub mem_limit: Option<u64>,
    /// Present the device read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Serial number the guest reads with GET_ID (at most 20 bytes).
    #[arg(long, value_name = "STRING", value_parser = parse_serial)]
    pub serial: Option<[u8; SERIAL_LEN]>,
    /// Serve the control protocol (statistics, compaction) on a socket at PATH.
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// Serve the metrics over HTTP at http://ADDR/metrics, for Prometheus: IP:PORT, or a port
    /// on 127.0.0.1.
    #[arg(long, value_name = "ADDR", value_parser = crate::metrics::parse_listen_address)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Allow a --metrics-listen address other than loopback (the metrics have no
    /// authentication).
    #[arg(long, requires = "metrics_listen")]
    pub metrics_allow_remote: bool,
    /// Permissions of the sockets the daemon creates, in octal.
    #[arg(long, value_name = "OCTAL", default_value = "0600", value_parser = parse_mode)]
    pub socket_mode: u32,
    /// Log level.
    #[arg(long, value_name = "LEVEL", value_enum, default_value = "info")]
    pub log_level: LogLevel,
    /// Print the vhost-user backend capabilities as JSON and exit.
    #[arg(long)]
    pub print_capabilities: bool,
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
    /// The level does not suit the algorithm.
    #[error("{0}")]
    Level(#[from] crate::codec::UnknownCodec),
    /// The metrics address is not loopback and not allowed.
    #[error("{0}")]
    MetricsAddress(#[from] crate::metrics::MetricsAddressError),
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
        self.algorithm.codec(self.algorithm_level)?;
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
        Ok(DaemonConfig {
            listen,
            socket_mode: self.socket_mode,
            store: StoreConfig {
                capacity_pages,
                algorithm: self.algorithm,
                level: self.algorithm_level,
                mem_limit: self.mem_limit,
            },
            device,
            control_socket: self.control_socket.clone(),
            metrics_listen: self.metrics_listen,
        })
    }
}

/// Parses a size: bytes, or a number with a K, M, G or T suffix (powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let (digits, shift) = match trimmed.char_indices().last() {
        Some((at, suffix)) if suffix.is_ascii_alphabetic() => {
            let shift = match suffix.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("'{text}' has an unknown suffix; use K, M, G or T")),
            };
            (&trimmed[..at], shift)
        }
        _ => (trimmed, 0),
    };
    let number: u64 = digits.parse().map_err(|_| {
        format!("'{text}' is not a size; give bytes, optionally with a K, M, G or T suffix")
    })?;
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("'{text}' is too large"))
}

fn parse_device_size(text: &str) -> Result<u64, String> {
    let size = parse_size(text)?;
    if size == 0 {
        return Err("the device size must not be zero".into());
    }
    if size % PAGE_SIZE as u64 != 0 {
        return Err(format!(
            "the device size {size} is not a multiple of 4 KiB (4096 bytes)"
        ));
    }
    Ok(size)
}

fn parse_mem_limit(text: &str) -> Result<u64, String> {
    match parse_size(text)? {
        0 => Err("the memory limit must not be zero; leave --mem-limit out for no limit".into()),
        limit => Ok(limit),
    }
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
pub fn run<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
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
            // clap's first line is the sentence; the rest is usage boilerplate.
            let rendered = error.render().to_string();
            let sentence = rendered
                .lines()
                .next()
                .unwrap_or("error: invalid arguments");
            eprintln!("{sentence}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match cli.command {
        Some(Tool::Ctl(ctl)) => run_ctl(&ctl),
        None => run_daemon(&cli.serve),
    }
}

fn run_ctl(ctl: &CtlArgs) -> ExitCode {
    match control::request(&ctl.control_socket, ctl.command.command()) {
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
    // Before any thread exists, so that every thread inherits the blocked mask and only the
    // signal thread receives SIGTERM and SIGINT.
    if let Err(error) = daemon::block_termination_signals() {
        eprintln!("error: cannot block termination signals: {error}");
        return ExitCode::from(EXIT_FAILURE);
    }
    let daemon = match Daemon::new(config) {
        Ok(daemon) => daemon,
        Err(error) => return fail(&error),
    };
    if let Err(error) = daemon::stop_on_termination_signals(daemon.stop_handle()) {
        eprintln!("error: cannot start the signal thread: {error}");
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
    fn device_size_must_be_a_non_zero_page_multiple() {
        assert!(parse_device_size("0").unwrap_err().contains("zero"));
        assert!(parse_device_size("4097")
            .unwrap_err()
            .contains("multiple of 4 KiB"));
        assert_eq!(parse_device_size("1M"), Ok(1 << 20));
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

    #[test]
    fn capabilities_are_valid_json() {
        let value: serde_json::Value = serde_json::from_str(CAPABILITIES).unwrap();
        assert_eq!(value["type"], "block");
        assert_eq!(value["features"], serde_json::json!(["read-only"]));
    }
}
