// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A tiny rate limiter for warnings a guest can trigger at will.
//!
//! A misbehaving guest can submit millions of bad requests a second; logging each one would
//! turn the guest into a log flooder. [`RateLimiter`] lets at most `burst` messages through per
//! one-second window and reports how many it swallowed when the next window opens.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use log::warn;

/// At most this many guest-triggered warnings per second are logged.
pub const WARNINGS_PER_SECOND: u32 = 10;

/// Counts messages in fixed one-second windows.
#[derive(Debug)]
pub struct RateLimiter {
    burst: u32,
    window_start: Option<Instant>,
    allowed_in_window: u32,
    suppressed: u64,
}

/// What to do with one message.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `suppressed_before` messages were dropped since the last one logged.
    Log {
        /// Messages dropped in earlier windows.
        suppressed_before: u64,
    },
    /// Drop it.
    Suppress,
}

impl RateLimiter {
    /// A limiter letting `burst` messages through per second.
    pub fn new(burst: u32) -> Self {
        RateLimiter {
            burst,
            window_start: None,
            allowed_in_window: 0,
            suppressed: 0,
        }
    }

    /// Decides about one message arriving at `now`.
    pub fn check(&mut self, now: Instant) -> Verdict {
        let window_over = self
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= Duration::from_secs(1));
        if window_over {
            self.window_start = Some(now);
            self.allowed_in_window = 0;
        }
        if self.allowed_in_window < self.burst {
            self.allowed_in_window += 1;
            Verdict::Log {
                suppressed_before: std::mem::take(&mut self.suppressed),
            }
        } else {
            self.suppressed += 1;
            Verdict::Suppress
        }
    }
}

/// Logs `message` as a warning unless `limiter` says too many came this second; the first
/// message of a new window also says how many were dropped before it. Returns whether it
/// logged.
pub fn warn_limited(limiter: &Mutex<RateLimiter>, message: std::fmt::Arguments<'_>) -> bool {
    let verdict = match limiter.lock() {
        Ok(mut limiter) => limiter.check(Instant::now()),
        Err(_) => Verdict::Log {
            suppressed_before: 0,
        },
    };
    if let Verdict::Log { suppressed_before } = verdict {
        if suppressed_before > 0 {
            warn!("{suppressed_before} similar warnings suppressed");
        }
        warn!("{message}");
        return true;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_passes_then_the_rest_of_the_window_is_suppressed() {
        let mut limiter = RateLimiter::new(3);
        let start = Instant::now();
        for _ in 0..3 {
            assert!(matches!(limiter.check(start), Verdict::Log { .. }));
        }
        assert_eq!(limiter.check(start), Verdict::Suppress);
        assert_eq!(
            limiter.check(start + Duration::from_millis(999)),
            Verdict::Suppress
        );
        assert_eq!(
            limiter.check(start + Duration::from_secs(1)),
            Verdict::Log {
                suppressed_before: 2
            }
        );
    }
}
