// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Progress on stderr while a phase runs.
//!
//! On a terminal: one line rewritten in place — backend, phase, percent, ETA and IOPS so far —
//! ended by the phase's result. Anywhere else (a log file, CI): one line when a phase starts and
//! one when it ends, so logs stay readable and still show where a run stopped.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::workload::{Phase, Progress};

/// How often the terminal line is redrawn.
const REDRAW_INTERVAL: Duration = Duration::from_millis(500);

/// Reports one phase of one backend.
pub struct ProgressReporter {
    label: String,
    phase: Phase,
    terminal: bool,
    state: Mutex<ReporterState>,
}

struct ReporterState {
    last_drawn: Option<Instant>,
    last: Option<Progress>,
}

impl ProgressReporter {
    /// Starts reporting `phase` of the backend `label`.
    pub fn new(label: String, phase: Phase) -> Self {
        let terminal = std::io::stderr().is_terminal();
        if !terminal {
            eprintln!("{label}: {} started", phase.name());
        }
        ProgressReporter {
            label,
            phase,
            terminal,
            state: Mutex::new(ReporterState {
                last_drawn: None,
                last: None,
            }),
        }
    }

    /// Takes the latest progress; redraws the terminal line now and then.
    pub fn update(&self, progress: Progress) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        state.last = Some(progress);
        if !self.terminal
            || state
                .last_drawn
                .is_some_and(|at| at.elapsed() < REDRAW_INTERVAL)
        {
            return;
        }
        state.last_drawn = Some(Instant::now());
        let mut stderr = std::io::stderr().lock();
        let _ = write!(stderr, "\r\x1b[K{}", self.line(&progress));
        let _ = stderr.flush();
    }

    /// Ends the phase's line with its outcome.
    pub fn finish(&self, error: Option<&String>) {
        let last = self.state.lock().ok().and_then(|state| state.last);
        let outcome = match (error, last) {
            (Some(error), _) => format!("FAILED: {error}"),
            (None, Some(progress)) => format!(
                "done: {} requests in {:.1} s",
                progress.requests,
                progress.elapsed.as_secs_f64()
            ),
            (None, None) => "done".to_owned(),
        };
        let prefix = if self.terminal { "\r\x1b[K" } else { "" };
        eprintln!("{prefix}{}: {} {outcome}", self.label, self.phase.name());
    }

    fn line(&self, progress: &Progress) -> String {
        let eta = progress
            .eta()
            .map_or_else(|| "--".to_owned(), format_duration);
        let seconds = progress.elapsed.as_secs_f64();
        let iops = if seconds > 0.0 {
            progress.requests as f64 / seconds
        } else {
            0.0
        };
        format!(
            "{}: {:<14} {:>3.0}%  ETA {eta:>6}  {:>8.0} IOPS",
            self.label,
            self.phase.name(),
            progress.fraction * 100.0,
            iops
        )
    }
}

/// `42 s`, `3 m 05 s`.
fn format_duration(duration: Duration) -> String {
    let seconds = duration.as_secs();
    if seconds < 60 {
        format!("{seconds} s")
    } else {
        format!("{} m {:02} s", seconds / 60, seconds % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_eta_follows_the_fraction_done() {
        let progress = Progress {
            fraction: 0.25,
            elapsed: Duration::from_secs(10),
            requests: 100,
        };
        assert_eq!(progress.eta(), Some(Duration::from_secs(30)));
        let done = Progress {
            fraction: 1.0,
            ..progress
        };
        assert_eq!(done.eta(), None);
        assert_eq!(format_duration(Duration::from_secs(185)), "3 m 05 s");
        assert_eq!(format_duration(Duration::from_secs(7)), "7 s");
    }
}
