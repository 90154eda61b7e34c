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
//! response:  ok\n<body>             on success
//!            error <sentence>\n     on failure
//! ```
//!
//! Commands ([`Command`]):
//!
//! | request      | body                                                            |
//! |--------------|-----------------------------------------------------------------|
//! | `stats`      | a readable table of every statistic                             |
//! | `stats-json` | the same statistics as one JSON object                          |
//! | `mm_stat`    | one line, byte for byte zram's `/sys/block/zramN/mm_stat`       |
//! | `io_stat`    | one line, byte for byte zram's `/sys/block/zramN/io_stat`       |
//! | `compact`    | `compacted N pages`, after compacting the allocator             |
//! | `idle [all]` | `marked N pages idle` (zram's `echo all > idle`)                 |
//! | `train-dict [samples=N] [size=BYTES]` | `trained zstd dictionary ID of N bytes from N pages; ...` |
//! | `recompress [type=idle\|huge\|huge_idle] [threshold=BYTES] [max_pages=N] [algo=NAME\|priority=N]` | `tried N pages, recompressed N, saved N bytes, N incompressible` (zram's `recompress`) |
//!
//! One request per connection keeps the server trivial and lets `socat` or `nc -U` drive it.
//! Requests longer than [`MAX_REQUEST_LEN`] bytes are refused, and a client gets
//! [`CLIENT_TIMEOUT`] to send its line, so a stuck client cannot block the next one.

use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use log::{debug, warn};
use vmm_sys_util::eventfd::EventFd;

use crate::daemon::wait_readable;
use crate::store::{PageStore, RecompressError, RecompressRequest, TrainRequest};

/// The longest request line the server reads.
pub const MAX_REQUEST_LEN: usize = 256;

/// How long a client may take to send its request.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// A control command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// All statistics as a readable table.
    Stats,
    /// All statistics as JSON.
    StatsJson,
    /// zram's `mm_stat` line.
    MmStat,
    /// zram's `io_stat` line.
    IoStat,
    /// Compact the allocator.
    Compact,
    /// Mark every stored page idle (zram's `echo all > idle`).
    MarkIdle,
    /// Recompress pages with the secondary algorithms (zram's `recompress`).
    Recompress(RecompressRequest),
    /// Train a zstd dictionary on a sample of the stored pages and use it from now on.
    TrainDict(TrainRequest),
}

impl Command {
    /// Every command (with default arguments).
    pub const ALL: [Command; 8] = [
        Command::Stats,
        Command::StatsJson,
        Command::MmStat,
        Command::IoStat,
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
    ];

    /// The request line's word for this command.
    pub fn name(self) -> &'static str {
        match self {
            Command::Stats => "stats",
            Command::StatsJson => "stats-json",
            Command::MmStat => "mm_stat",
            Command::IoStat => "io_stat",
            Command::Compact => "compact",
            Command::MarkIdle => "idle",
            Command::Recompress(_) => "recompress",
            Command::TrainDict(_) => "train-dict",
        }
    }

    /// Runs the command against `store` and returns the response body.
    pub fn execute(self, store: &PageStore) -> Result<String, ControlError> {
        Ok(match self {
            Command::Stats => store.stats().table(),
            Command::StatsJson => {
                let mut json = serde_json::to_string(&store.stats()).map_err(ControlError::Json)?;
                json.push('\n');
                json
            }
            Command::MmStat => store.stats().mm_stat_line(),
            Command::IoStat => store.stats().io_stat_line(),
            Command::Compact => format!("compacted {} pages\n", store.compact()),
            Command::MarkIdle => format!("marked {} pages idle\n", store.mark_idle()),
            Command::Recompress(request) => format!("{}\n", store.recompress(&request)?),
            Command::TrainDict(request) => {
                format!("{}\n", store.train_zstd_dictionary(&request)?)
            }
        })
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Recompress(request) => write!(f, "{} {request}", self.name()),
            Command::TrainDict(request) => write!(f, "{} {request}", self.name()),
            Command::Stats
            | Command::StatsJson
            | Command::MmStat
            | Command::IoStat
            | Command::Compact
            | Command::MarkIdle => f.write_str(self.name()),
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
                return Err(ControlError::BadArgument(format!(
                    "idle takes 'all', not '{}'",
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
        "unknown command '{0}'; the commands are stats, stats-json, mm_stat, io_stat, compact, \
         idle, recompress and train-dict"
    )]
    UnknownCommand(String),
    /// A command's arguments are wrong.
    #[error("{0}")]
    BadArgument(String),
    /// A recompression request is wrong or cannot run.
    #[error(transparent)]
    Recompress(#[from] RecompressError),
    /// The request line is too long or not UTF-8.
    #[error("the request is not one line of at most {MAX_REQUEST_LEN} bytes of text")]
    BadRequest,
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
}

/// Sends `command` to the daemon listening on `path` and returns the response body.
pub fn request(path: &Path, command: Command) -> Result<String, ControlError> {
    let mut stream = UnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: path.display().to_string(),
        source,
    })?;
    stream
        .write_all(format!("{command}\n").as_bytes())
        .map_err(ControlError::Io)?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(ControlError::Io)?;
    if let Some(body) = response.strip_prefix("ok\n") {
        Ok(body.to_owned())
    } else if let Some(message) = response.strip_prefix("error ") {
        Err(ControlError::Refused(message.trim_end().to_owned()))
    } else {
        Err(ControlError::MalformedResponse)
    }
}

/// The control server: a thread answering one request per connection.
pub struct ControlServer {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Serves `listener` for `store` on a new thread until [`ControlServer::stop`].
    pub fn spawn(listener: UnixListener, store: Arc<PageStore>) -> io::Result<Self> {
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || serve(&listener, &store, &thread_stop))?;
        Ok(ControlServer {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the server and waits for its thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn serve(listener: &UnixListener, store: &PageStore, stop: &EventFd) {
    loop {
        match wait_readable(listener.as_raw_fd(), stop.as_raw_fd()) {
            Ok(true) => {}
            Ok(false) => return,
            Err(error) => {
                warn!("control socket: {error}");
                return;
            }
        }
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(error) = answer(stream, store) {
                    debug!("control connection: {error}");
                }
            }
            Err(error) => debug!("control socket accept: {error}"),
        }
    }
}

fn answer(mut stream: UnixStream, store: &PageStore) -> io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut line = Vec::with_capacity(MAX_REQUEST_LEN);
    BufReader::new((&stream).take(MAX_REQUEST_LEN as u64 + 1)).read_until(b'\n', &mut line)?;
    let response = match parse_request(&line).and_then(|command| command.execute(store)) {
        Ok(body) => format!("ok\n{body}"),
        Err(error) => format!("error {error}\n"),
    };
    stream.write_all(response.as_bytes())
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

    #[test]
    fn every_command_parses_from_its_name() {
        for command in Command::ALL {
            assert_eq!(command.name().parse::<Command>().unwrap(), command);
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
