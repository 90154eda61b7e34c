// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Live migration of the device's pages, daemon to daemon (DESIGN.md, "Live migration").
//!
//! The source ([`MigrationSource`]) connects to the destination ([`Incoming`]), both prove
//! the shared [`Token`] without sending it, and the source sends every stored page as it is
//! stored (compressed objects as they are), then, in rounds, the pages the guest changed
//! since they were sent. When the VM stops for switchover the source sends the last dirty
//! pages and a `Synced` mark. The destination serves only once the source has either
//! granted its `Started` or closed the stream after `Synced`: the source then never serves
//! again, so the two never both serve.
//!
//! - [`wire`]: endpoints, the token, frames, records.
//! - [`source`]: the sending side.
//! - [`dest`]: the receiving side.

pub mod dest;
pub mod source;
pub mod wire;

#[cfg(test)]
mod tests;

use std::fmt::{self, Write as _};
use std::time::{Duration, Instant};

pub use self::dest::Incoming;
pub use self::source::MigrationSource;
pub use self::wire::{Endpoint, Token};

/// Errors of a migration. Their text is a sentence for the operator.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// A socket or file operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The configuration, the peer or a check refused the migration.
    #[error("{0}")]
    Refused(String),
    /// The peer broke the stream's format.
    #[error("{0}")]
    Protocol(String),
    /// The migration was cancelled.
    #[error("{0}")]
    Cancelled(String),
}

impl MigrateError {
    /// The error with its sources, as one line.
    pub fn sentence(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(inner) = source {
            let _ = write!(text, ": {inner}");
            source = inner.source();
        }
        text
    }

    /// Whether this is a write that failed because the peer hung up (closed or shut down its
    /// side). What the peer sent before it hung up may still be waiting to be read.
    pub(crate) fn peer_hung_up(&self) -> bool {
        use std::io::ErrorKind;
        matches!(
            self,
            MigrateError::Io { source, .. } if matches!(
                source.kind(),
                ErrorKind::BrokenPipe
                    | ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::NotConnected
            )
        )
    }
}

/// Where a migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationState {
    /// No migration has run.
    Idle,
    /// Connecting and authenticating (the destination: waiting for its source).
    Connecting,
    /// Pages are copied while the guest runs.
    Precopy,
    /// The source's queues stopped and every page is across.
    Synced,
    /// The destination serves the device; the source no longer tracks it.
    Completed,
    /// The stream failed (the error says why).
    Failed,
    /// An operator or the peer cancelled the migration.
    Cancelled,
}

impl MigrationState {
    /// The state's name in the status lines.
    pub fn name(self) -> &'static str {
        match self {
            MigrationState::Idle => "idle",
            MigrationState::Connecting => "connecting",
            MigrationState::Precopy => "precopy",
            MigrationState::Synced => "synced",
            MigrationState::Completed => "completed",
            MigrationState::Failed => "failed",
            MigrationState::Cancelled => "cancelled",
        }
    }

    /// Whether the migration is over (completed, failed or cancelled).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            MigrationState::Completed | MigrationState::Failed | MigrationState::Cancelled
        )
    }
}

impl fmt::Display for MigrationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which side of a migration a status describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationRole {
    /// The daemon sends its pages.
    Source,
    /// The daemon receives pages.
    Destination,
}

/// A snapshot of a migration's progress.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationStatus {
    /// Which side.
    pub role: MigrationRole,
    /// Where it stands.
    pub state: MigrationState,
    /// The peer's endpoint.
    pub peer: String,
    /// Rounds of pages sent (or received): the first holds every stored page.
    pub rounds: u64,
    /// Page records sent (source) or received (destination), resends included.
    pub pages: u64,
    /// Bytes on the wire, sent (source) or received (destination).
    pub wire_bytes: u64,
    /// The stored bytes those pages carry (compressed objects and raw pages; same-filled and
    /// empty pages carry none).
    pub stored_bytes: u64,
    /// Pages changed since they were last sent (source; the last figure the source sent,
    /// on the destination).
    pub dirty_pages: u64,
    /// Why it failed or was cancelled.
    pub error: Option<String>,
    /// Time since it started.
    pub elapsed: Duration,
}

impl MigrationStatus {
    /// The status of a side where no migration ran.
    pub fn idle(role: MigrationRole) -> MigrationStatus {
        MigrationStatus {
            role,
            state: MigrationState::Idle,
            peer: String::new(),
            rounds: 0,
            pages: 0,
            wire_bytes: 0,
            stored_bytes: 0,
            dirty_pages: 0,
            error: None,
            elapsed: Duration::ZERO,
        }
    }

    /// Wire bytes per stored byte (0 before any stored byte moved).
    pub fn wire_per_stored(&self) -> f64 {
        if self.stored_bytes == 0 {
            return 0.0;
        }
        // Ratios of byte counts: precision loss past 2^52 bytes does not matter.
        #[allow(clippy::cast_precision_loss)]
        let ratio = self.wire_bytes as f64 / self.stored_bytes as f64;
        ratio
    }

    /// The status as `key value` lines (the `ctl migrate-status` output).
    pub fn render(&self) -> String {
        let role = match self.role {
            MigrationRole::Source => "source",
            MigrationRole::Destination => "destination",
        };
        let mut out = String::new();
        let _ = writeln!(out, "role {role}");
        let _ = writeln!(out, "state {}", self.state);
        let _ = writeln!(
            out,
            "peer {}",
            if self.peer.is_empty() {
                "-"
            } else {
                &self.peer
            }
        );
        let _ = writeln!(out, "rounds {}", self.rounds);
        let _ = writeln!(out, "pages {}", self.pages);
        let _ = writeln!(out, "wire_bytes {}", self.wire_bytes);
        let _ = writeln!(out, "stored_bytes {}", self.stored_bytes);
        let _ = writeln!(out, "wire_per_stored {:.3}", self.wire_per_stored());
        let _ = writeln!(out, "dirty_pages {}", self.dirty_pages);
        let _ = writeln!(out, "elapsed_ms {}", self.elapsed.as_millis());
        let error = self.error.as_deref().unwrap_or("-").replace('\n', " ");
        let _ = writeln!(out, "error {error}");
        out
    }
}

/// A fault the stream's writer injects (tests).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Shut the connection down instead of writing frame n (1-based).
    DropAfter(u64),
    /// Write half of frame n, then shut down.
    TruncateFrame(u64),
    /// Flip a bit in the body of frame n.
    CorruptFrame(u64),
    /// From frame n on, write nothing and keep the connection open.
    StallAfter(u64),
}

/// Bounds and pacing of a migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationOptions {
    /// No progress on the stream for this long fails the migration (default 10 s).
    pub stall_timeout: Duration,
    /// Heartbeats go at least this often while the stream is otherwise idle (default 1 s;
    /// keep it well below `stall_timeout`).
    pub heartbeat: Duration,
    /// How long `queues_started` waits for `Resumed` to be written (default 5 s).
    pub resume_wait: Duration,
    /// The destination gives up after this many refused peers (default 16).
    pub accept_attempts: u32,
    /// A fault for the source's writer to inject (tests only).
    #[doc(hidden)]
    pub fault: Option<Fault>,
}

impl Default for MigrationOptions {
    fn default() -> Self {
        MigrationOptions {
            stall_timeout: Duration::from_secs(10),
            heartbeat: Duration::from_secs(1),
            resume_wait: Duration::from_secs(5),
            accept_attempts: 16,
            fault: None,
        }
    }
}

/// Progress shared between a side's thread and its handle.
#[derive(Debug)]
pub(crate) struct Progress {
    pub(crate) state: MigrationState,
    pub(crate) rounds: u64,
    pub(crate) pages: u64,
    pub(crate) wire_bytes: u64,
    pub(crate) stored_bytes: u64,
    pub(crate) dirty_pages: u64,
    pub(crate) error: Option<String>,
    pub(crate) started: Instant,
    pub(crate) ended: Option<Instant>,
}

impl Progress {
    pub(crate) fn new() -> Progress {
        Progress {
            state: MigrationState::Connecting,
            rounds: 0,
            pages: 0,
            wire_bytes: 0,
            stored_bytes: 0,
            dirty_pages: 0,
            error: None,
            started: Instant::now(),
            ended: None,
        }
    }

    pub(crate) fn snapshot(&self, role: MigrationRole, peer: &str) -> MigrationStatus {
        MigrationStatus {
            role,
            state: self.state,
            peer: peer.to_owned(),
            rounds: self.rounds,
            pages: self.pages,
            wire_bytes: self.wire_bytes,
            stored_bytes: self.stored_bytes,
            dirty_pages: self.dirty_pages,
            error: self.error.clone(),
            elapsed: self.ended.unwrap_or_else(Instant::now) - self.started,
        }
    }

    /// Ends the migration in `state` if it has not ended; returns whether it ended now.
    pub(crate) fn finish(&mut self, state: MigrationState, error: Option<String>) -> bool {
        if self.state.is_final() {
            return false;
        }
        self.state = state;
        self.error = error;
        self.ended = Some(Instant::now());
        true
    }
}

/// Locks a mutex, taking it over from a thread that panicked holding it.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits up to `timeout` for a side's thread to end and reaps it; returns whether it ended
/// (also when it was reaped before).
pub(crate) fn join_within(
    thread: &std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    timeout: Duration,
) -> bool {
    let deadline = Instant::now() + timeout;
    let mut thread = lock(thread);
    let Some(handle) = thread.as_ref() else {
        return true;
    };
    while !handle.is_finished() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if let Some(handle) = thread.take() {
        if handle.join().is_err() {
            log::error!("the migration thread panicked");
        }
    }
    true
}
