// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Pressure stall information (PSI) triggers: the kernel wakes the daemon when tasks stalled
//! on memory for more than a threshold within a window, so it never polls the pressure files.
//!
//! A trigger is registered by writing `some|full STALL_US WINDOW_US` to `/proc/pressure/memory`
//! (the host), or to a v2 cgroup's `memory.pressure` (that cgroup only), opened read-write and
//! kept open; the file descriptor then reports `POLLPRI` at most once per window while the
//! threshold is crossed (Documentation/accounting/psi.rst). The kernel takes windows from
//! 500 ms to 10 s; a process without `CAP_SYS_RESOURCE` only multiples of 2 s.
//!
//! On the command line a threshold is `KIND STALL/WINDOW`, written with a space or a colon:
//! `some 300ms/2s` (the default), `full:100ms/2s` ([`PsiThreshold`]).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// The host's memory pressure file.
pub const HOST_PRESSURE: &str = "/proc/pressure/memory";

/// The shortest window the kernel takes.
pub const MIN_WINDOW: Duration = Duration::from_millis(500);
/// The longest window the kernel takes.
pub const MAX_WINDOW: Duration = Duration::from_secs(10);

/// When a PSI trigger fires: tasks stalled on memory for `stall` within `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PsiThreshold {
    /// `full` (every non-idle task stalled at once) rather than `some` (at least one).
    pub full: bool,
    /// Stall time that fires the trigger.
    pub stall: Duration,
    /// The window it is measured over.
    pub window: Duration,
}

impl PsiThreshold {
    /// `some 300ms/2s`: at least one task stalled on memory 15% of the time, the proportion
    /// of the kernel's documentation example (150ms/1s): high enough that a host serving a
    /// page fault now and then does not fire it, low enough that a host starting to thrash
    /// does within seconds. The window is 2 s because a daemon without `CAP_SYS_RESOURCE`
    /// (containers, systemd units that drop it) may only register multiples of 2 s.
    pub const DEFAULT: PsiThreshold = PsiThreshold {
        full: false,
        stall: Duration::from_millis(300),
        window: Duration::from_secs(2),
    };

    /// The line the kernel takes: `some 150000 1000000` (microseconds).
    fn trigger_line(&self) -> String {
        format!(
            "{} {} {}",
            if self.full { "full" } else { "some" },
            self.stall.as_micros(),
            self.window.as_micros()
        )
    }
}

impl Default for PsiThreshold {
    fn default() -> Self {
        PsiThreshold::DEFAULT
    }
}

impl fmt::Display for PsiThreshold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}/{}",
            if self.full { "full" } else { "some" },
            duration_text(self.stall),
            duration_text(self.window)
        )
    }
}

fn duration_text(duration: Duration) -> String {
    if !duration.subsec_micros().is_multiple_of(1000) {
        format!("{}us", duration.as_micros())
    } else if duration.subsec_millis() != 0 {
        format!("{}ms", duration.as_millis())
    } else {
        format!("{}s", duration.as_secs())
    }
}

/// `150ms`, `1s`, `500000us`.
fn parse_duration(text: &str) -> Option<Duration> {
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit())?);
    let number: u64 = number.parse().ok()?;
    match unit {
        "us" => Some(Duration::from_micros(number)),
        "ms" => Some(Duration::from_millis(number)),
        "s" => Some(Duration::from_secs(number)),
        _ => None,
    }
}

impl FromStr for PsiThreshold {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let usage = || {
            format!(
                "'{text}' is not a pressure threshold: give some|full STALL/WINDOW, such as \
                 'some 300ms/2s' or 'full:100ms/2s' (units us, ms, s)"
            )
        };
        let (kind, times) = text.split_once([' ', ':']).ok_or_else(usage)?;
        let full = match kind {
            "some" => false,
            "full" => true,
            _ => return Err(usage()),
        };
        let (stall, window) = times.trim().split_once('/').ok_or_else(usage)?;
        let stall = parse_duration(stall).ok_or_else(usage)?;
        let window = parse_duration(window).ok_or_else(usage)?;
        if !(MIN_WINDOW..=MAX_WINDOW).contains(&window) {
            return Err(format!(
                "pressure threshold '{text}': the window must be from 500ms to 10s, as the kernel \
                 takes it"
            ));
        }
        if stall.is_zero() || stall > window {
            return Err(format!(
                "pressure threshold '{text}': the stall must be above 0 and at most the window"
            ));
        }
        Ok(PsiThreshold {
            full,
            stall,
            window,
        })
    }
}

/// Why a PSI trigger could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum PsiError {
    /// The pressure file cannot be opened (no PSI in this kernel, `psi=0`, no permission).
    #[error("cannot open {path} for a PSI trigger")]
    Open {
        /// The pressure file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The kernel refused the trigger.
    #[error("{path} refused the PSI trigger '{line}'{hint}")]
    Register {
        /// The pressure file.
        path: PathBuf,
        /// The trigger line written.
        line: String,
        /// What may be wrong.
        hint: &'static str,
        /// Why (`EINVAL`: a window the kernel does not take; `EPERM`: unprivileged and not a
        /// multiple of 2 s; `EOPNOTSUPP`: PSI disabled).
        #[source]
        source: io::Error,
    },
}

/// A registered PSI trigger; closing it (dropping) unregisters it.
#[derive(Debug)]
pub struct PsiTrigger {
    file: File,
    path: PathBuf,
    threshold: PsiThreshold,
}

impl PsiTrigger {
    /// Registers `threshold` on the pressure file `path`.
    pub fn register(path: &Path, threshold: PsiThreshold) -> Result<PsiTrigger, PsiError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| PsiError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let line = threshold.trigger_line();
        // The kernel overwrites the last byte written with a NUL: send one, as its example.
        let mut bytes = line.clone().into_bytes();
        bytes.push(0);
        file.write_all(&bytes).map_err(|source| {
            let unprivileged = source.raw_os_error() == Some(libc::EINVAL)
                && !threshold.window.as_micros().is_multiple_of(2_000_000);
            PsiError::Register {
                path: path.to_path_buf(),
                line,
                hint: if unprivileged {
                    " (without CAP_SYS_RESOURCE the kernel takes only windows that are \
                     multiples of 2 s)"
                } else {
                    ""
                },
                source,
            }
        })?;
        Ok(PsiTrigger {
            file,
            path: path.to_path_buf(),
            threshold,
        })
    }

    /// The pressure file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The threshold registered.
    pub fn threshold(&self) -> PsiThreshold {
        self.threshold
    }
}

impl AsRawFd for PsiTrigger {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_parse_with_a_space_or_a_colon_and_print_back() {
        let some: PsiThreshold = "some 300ms/2s".parse().unwrap();
        assert_eq!(some, PsiThreshold::DEFAULT);
        assert_eq!(some.to_string(), "some 300ms/2s");
        assert_eq!(some.trigger_line(), "some 300000 2000000");
        let full: PsiThreshold = "full:1ms/500ms".parse().unwrap();
        assert!(full.full);
        assert_eq!(full.trigger_line(), "full 1000 500000");
        assert_eq!(full.to_string().parse::<PsiThreshold>(), Ok(full));
        let micro: PsiThreshold = "some 1500us/2s".parse().unwrap();
        assert_eq!(micro.to_string(), "some 1500us/2s");
    }

    #[test]
    fn bad_thresholds_are_refused_in_sentences() {
        for (bad, says) in [
            ("150ms/1s", "not a pressure threshold"),
            ("most 150ms/1s", "not a pressure threshold"),
            ("some 150/1s", "not a pressure threshold"),
            ("some 150ms", "not a pressure threshold"),
            ("some 1ms/100ms", "from 500ms to 10s"),
            ("some 1ms/11s", "from 500ms to 10s"),
            ("some 2s/1s", "at most the window"),
            ("some 0ms/1s", "above 0"),
        ] {
            let error = bad.parse::<PsiThreshold>().unwrap_err();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    #[test]
    fn a_missing_pressure_file_says_which() {
        let error = PsiTrigger::register(Path::new("/nonexistent/memory"), PsiThreshold::DEFAULT)
            .unwrap_err();
        assert!(error.to_string().contains("/nonexistent/memory"), "{error}");
    }
}
