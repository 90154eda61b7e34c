// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The background recompressor: cold pages move to a stronger algorithm without anyone asking.
//!
//! zram recompresses only when someone writes to its `recompress` file (zram-generator #164,
//! #178). With `--recompress-idle-after SECS`, a thread does it here, in sweeps `SECS` apart:
//!
//! 1. **mark**: set the idle flag on every stored page (reads and writes clear it);
//! 2. **wait** `SECS`;
//! 3. **recompress** the pages still flagged (`type=idle`): untouched for at least `SECS`;
//!    then mark again and wait again.
//!
//! The slot has no access time, so the age is measured by two sweeps: a page is recompressed
//! after it has been idle for between `SECS` and `2 × SECS` (plus a pass's duration). A manual
//! `ctl idle` marks pages early, so the next sweep may take pages idle for less.
//!
//! Rate: at most `--recompress-rate` pages a second are tried; the thread sleeps between pages,
//! never holding a slot lock while it sleeps, and holds one slot lock at a time while it
//! recompresses (tens of microseconds), so the request queues never wait on it for longer.
//!
//! Stopping is bounded: the thread checks its [`StopSignal`] between pages and sleeps on it, so
//! it ends within one page's recompression, or one walk of the slot table when it is marking (a
//! few milliseconds per million pages).

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::stop::{StopSignal, Threads, STOP_BOUND};
use crate::store::{AlgorithmSpec, PageStore, RecompressMode, RecompressRequest};

/// `--recompress-rate` when not given: pages tried per second.
pub const DEFAULT_RATE: u64 = 5000;

/// Recompression settings of a daemon.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecompressConfig {
    /// Secondary algorithms by priority (`--recompress-algorithm`, at most 3).
    pub algorithms: Vec<AlgorithmSpec>,
    /// Recompress pages idle this long in the background (`--recompress-idle-after`).
    pub idle_after: Option<Duration>,
    /// Pages tried per second by the background recompressor (0: [`DEFAULT_RATE`]).
    pub rate: u64,
    /// A zstd dictionary file to load at start (`--zstd-dict`).
    pub zstd_dict: Option<std::path::PathBuf>,
}

/// The running background recompressor; dropping it stops and joins the thread.
#[derive(Debug)]
pub struct BackgroundRecompressor {
    threads: Threads,
}

impl BackgroundRecompressor {
    /// Starts recompressing the pages of `store` idle for `idle_after`, trying at most `rate`
    /// pages a second (0: [`DEFAULT_RATE`]). The store must have a secondary algorithm.
    pub fn start(
        store: Arc<PageStore>,
        idle_after: Duration,
        rate: u64,
    ) -> io::Result<BackgroundRecompressor> {
        let rate = if rate == 0 { DEFAULT_RATE } else { rate };
        let mut threads = Threads::new();
        threads.spawn("recompress", move |signal| {
            run(&store, &signal, idle_after, rate);
        })?;
        Ok(BackgroundRecompressor { threads })
    }

    /// Stops the thread and waits for it (at most [`STOP_BOUND`]).
    pub fn stop(mut self) {
        let _ = self.threads.stop_within(STOP_BOUND);
    }

    /// The thread, for an owner that stops it with others.
    pub fn into_threads(self) -> Threads {
        self.threads
    }
}

fn run(store: &PageStore, signal: &StopSignal, idle_after: Duration, rate: u64) {
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let request = RecompressRequest {
        mode: RecompressMode::Idle,
        ..RecompressRequest::default()
    };
    info!(
        "recompressing pages idle for {} s in the background, at most {rate} pages/s",
        idle_after.as_secs_f64()
    );
    loop {
        store.mark_idle();
        if !signal.sleep_until(Instant::now() + idle_after) {
            break;
        }
        let mut next = Instant::now();
        let mut pace = || {
            if !signal.sleep_until(next) {
                return false;
            }
            next = next.max(Instant::now()) + interval;
            true
        };
        match store.recompress_paced(&request, &mut pace) {
            Ok(outcome) => debug!("background recompression: {outcome}"),
            Err(error) => {
                warn!("background recompression stops: {error}");
                break;
            }
        }
        if signal.is_stopped() {
            break;
        }
    }
    debug!("the background recompressor stopped");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Algorithm;
    use crate::pagegen::fill_page;
    use crate::store::StoreConfig;
    use crate::PAGE_SIZE;

    fn store() -> Arc<PageStore> {
        let store = PageStore::new(StoreConfig {
            capacity_pages: 1024,
            algorithm: Algorithm::Lz4,
            level: None,
            mem_limit: None,
        })
        .unwrap()
        .with_secondary_algorithms(&["zstd:level=3".parse().unwrap()])
        .unwrap();
        let mut page = [0u8; PAGE_SIZE];
        for i in 0..1024 {
            fill_page(3, i, &mut page);
            store.write(i, &page).unwrap();
        }
        Arc::new(store)
    }

    /// Polls `done` for up to ten seconds.
    fn eventually(done: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if done() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn idle_pages_are_recompressed_and_hot_pages_are_not() {
        let store = store();
        let recompressor =
            BackgroundRecompressor::start(Arc::clone(&store), Duration::from_millis(300), 100_000)
                .unwrap();
        let mut page = [0u8; PAGE_SIZE];
        let hot_until = Instant::now() + Duration::from_millis(900);

        while Instant::now() < hot_until {
            store.read(7, &mut page).unwrap(); // page 7 stays hot
            std::thread::sleep(Duration::from_millis(20));
        }
        let recompressed = eventually(|| store.stats().recompression.pages_recompressed > 300);
        recompressor.stop();

        assert!(recompressed, "{:?}", store.stats().recompression);
        let mut expect = [0u8; PAGE_SIZE];
        fill_page(3, 7, &mut expect);
        store.read(7, &mut page).unwrap();
        assert_eq!(page[..], expect[..]);
        assert_eq!(
            store.stats().recompression.algorithms[1].name,
            "zstd:level=3"
        );
        store.check_consistency().unwrap();
    }

    #[test]
    fn a_slow_rate_is_kept_and_stopping_is_prompt() {
        let store = store();
        let recompressor =
            BackgroundRecompressor::start(Arc::clone(&store), Duration::from_millis(50), 20)
                .unwrap();
        assert!(eventually(|| store.stats().recompression.pages_tried > 0));
        std::thread::sleep(Duration::from_millis(500));

        let started = Instant::now();
        recompressor.stop();

        let stopped_in = started.elapsed();
        let tried = store.stats().recompression.pages_tried;
        assert!(stopped_in < Duration::from_millis(200), "{stopped_in:?}");
        assert!(
            tried <= 20,
            "{tried} pages tried in about half a second at 20/s"
        );
    }
}
