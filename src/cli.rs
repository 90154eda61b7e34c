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
use crate::codec::{Algorithm, IaaBackend, IaaMode, IaaOptions};
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
    /// `--iaa` or `--iaa-mode` with another algorithm than deflate-iaa.
    #[error("--iaa and --iaa-mode apply only to --algorithm deflate-iaa, not {0}")]
    IaaOptionsWithoutIaa(Algorithm),
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
                algorithm,
                level: self.algorithm_level,
                mem_limit: self.mem_limit,
            },
            device,
            control_socket: self.control_socket.clone(),
        })
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
    fn capabilities_are_valid_json() {
        let value: serde_json::Value = serde_json::from_str(CAPABILITIES).unwrap();
        assert_eq!(value["type"], "block");
        assert_eq!(value["features"], serde_json::json!(["read-only"]));
    }
}
