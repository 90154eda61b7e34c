// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The idle clock and the automatic writeback policies zram lacks.
//!
//! One thread, `writeback`, does three things:
//!
//! - **the idle clock**: every `--idle-tick` seconds (default 60) it adds one tick to the age of
//!   every stored page (one lock-free walk of the slot table; a compare-and-swap per stored
//!   page, a few milliseconds per million pages). A read or write sets a page's age back to 0.
//!   Ages are whole ticks and saturate at [`MAX_AGE`] ticks, so `idle --age SECS` is as coarse
//!   as a tick: a page of age `a` has been idle for at least `(a - 1)` ticks, and the store's
//!   [`min_age_for`] turns seconds into the smallest age that guarantees them.
//! - **`--writeback-idle-after SECS`**: after each tick, pages idle that long go to the file.
//! - **`--writeback-above SIZE`**: every [`ABOVE_CHECK`], if `mem_used_total` is above SIZE, the
//!   coldest pages go first: the bytes held at each age are summed from the oldest down until
//!   they cover the excess (plus a margin for allocator fragmentation), the pages of those ages
//!   are written back, and the allocator is compacted so the freed memory really goes back to
//!   the OS. It repeats, taking younger pages, until the store is below SIZE or nothing is left
//!   to write. With `--mem-limit` above SIZE, this keeps room for new writes.
//!
//! Writeback never blocks the queues: it holds one slot lock at a time, for a memcpy, and
//! writes the file with no lock held (see `store::writeback`). Stopping is bounded: the thread
//! checks its [`StopSignal`] between batches and sleeps on it; a write stuck in a hung file is
//! waited for [`STOP_TIMEOUT`] at most, then left behind.
//!
//! A write that meets `--mem-limit` pokes the thread at once (and waits up to
//! [`crate::store::writeback::ROOM_WAIT`] for the room it makes), so a burst of writes does not
//! wait for the next 200 ms check to find memory full.
//!
//! A failed pass (the backing file's filesystem full, an I/O error) leaves its pages in RAM;
//! the thread tries again at its next occasion. Such failures repeat at the rate writes poke
//! the thread, so they are logged at most [`FAILURE_WARNINGS_PER_SECOND`] a second (the
//! request path's [`RateLimiter`]; the next line logged says how many were suppressed) and
//! counted in the statistics (`failed_writebacks` pages, `failed_file_writes` writes).
//!
//! A `--writeback-above` round that cannot get below the mark (what is left in RAM is the slot
//! table, pages still pending for a worker, or nothing at all) is not retried until
//! `mem_used_total` grows past what it was after that round.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{debug, info};

use crate::blk::ratelimit::{warn_limited, RateLimiter};

use crate::stop::{StopSignal, Threads, STOP_BOUND};
use crate::store::writeback::min_age_for;
use crate::store::{PageStore, WritebackError, WritebackMode, WritebackRequest, MAX_AGE};

/// `--idle-tick` when not given.
pub const DEFAULT_IDLE_TICK: Duration = Duration::from_secs(60);
/// How long stopping waits for the thread (it stops between batches).
pub const STOP_TIMEOUT: Duration = STOP_BOUND;
/// How often `--writeback-above` looks at `mem_used_total`.
pub const ABOVE_CHECK: Duration = Duration::from_millis(200);
/// At most this many failed passes are logged a second; the others are counted.
pub const FAILURE_WARNINGS_PER_SECOND: u32 = 1;

/// Writeback settings of a daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WritebackConfig {
    /// The backing file (`--backing-file`).
    pub backing_file: Option<PathBuf>,
    /// Overwrite data in the backing file that is not ours (`--backing-file-overwrite`).
    pub backing_file_overwrite: bool,
    /// zram's `writeback_limit` with `writeback_limit_enable` (`--writeback-limit`), pages.
    pub limit: Option<u64>,
    /// Pages per write call (`--writeback-batch`).
    pub batch_pages: usize,
    /// Write back pages idle this long (`--writeback-idle-after`).
    pub idle_after: Option<Duration>,
    /// Write back the coldest pages while `mem_used_total` is above this (`--writeback-above`).
    pub above: Option<u64>,
    /// The idle clock's tick (`--idle-tick`).
    pub idle_tick: Duration,
}

impl Default for WritebackConfig {
    fn default() -> Self {
        WritebackConfig {
            backing_file: None,
            backing_file_overwrite: false,
            limit: None,
            batch_pages: crate::store::DEFAULT_BATCH_PAGES,
            idle_after: None,
            above: None,
            idle_tick: DEFAULT_IDLE_TICK,
        }
    }
}

/// The running idle clock and writeback policies; dropping it stops and joins the thread
/// (within [`STOP_TIMEOUT`]).
#[derive(Debug)]
pub struct WritebackDaemon {
    threads: Threads,
}

impl WritebackDaemon {
    /// Starts the idle clock and the policies of `config` on `store`.
    pub fn start(store: Arc<PageStore>, config: &WritebackConfig) -> io::Result<WritebackDaemon> {
        let mut threads = Threads::new();
        let policy = Policy {
            tick: config.idle_tick,
            idle_age: config
                .idle_after
                .and_then(|idle| min_age_for(idle, config.idle_tick)),
            above: config.above.filter(|_| store.has_backing_file()),
        };
        if policy.above.is_some() {
            let poke = threads.signal().clone();
            store.set_pressure_relief(Arc::new(move || poke.poke()));
        }
        threads.spawn("writeback", move |signal| run(&store, &signal, &policy))?;
        Ok(WritebackDaemon { threads })
    }

    /// Stops the thread and waits for it; a write stuck in a hung backing file is waited for
    /// [`STOP_TIMEOUT`] at most, then left behind (and named in the log).
    pub fn stop(mut self) {
        let _ = self.threads.stop_within(STOP_TIMEOUT);
    }

    /// The thread's signal: a poke wakes it for a `--writeback-above` check at once (the
    /// pressure thread, which takes over the store's relief, passes a write's call on).
    pub fn signal(&self) -> StopSignal {
        self.threads.signal().clone()
    }

    /// The thread, for an owner that stops it with others.
    pub fn into_threads(self) -> Threads {
        self.threads
    }
}

#[derive(Debug)]
struct Policy {
    tick: Duration,
    idle_age: Option<u8>,
    above: Option<u64>,
}

fn run(store: &PageStore, signal: &StopSignal, policy: &Policy) {
    if let Some(age) = policy.idle_age {
        // A page of age `age` has been idle for more than `age - 1` ticks (min_age_for).
        info!(
            "writing back pages idle for more than {} s (idle-clock age {age} of {} s ticks)",
            policy.tick.as_secs_f64() * f64::from(age.saturating_sub(1)),
            policy.tick.as_secs_f64()
        );
    }
    if let Some(above) = policy.above {
        info!("writing back the coldest pages while mem_used_total is above {above} bytes");
    }
    let mut next_tick = Instant::now() + policy.tick;
    // After a round that could not bring memory below the mark (what is left is the slot
    // table, pending pages or same-filled metadata), the mark is looked at again only once
    // memory has grown past what it was then: no table walk every 200 ms for nothing.
    let mut futile_at: Option<u64> = None;
    let mut pokes = 0;
    let failures = Mutex::new(RateLimiter::new(FAILURE_WARNINGS_PER_SECOND));
    loop {
        let wake = match policy.above {
            Some(_) => next_tick.min(Instant::now() + ABOVE_CHECK),
            None => next_tick,
        };
        if !signal.sleep_until(wake) {
            break;
        }
        if Instant::now() >= next_tick {
            next_tick += policy.tick;
            let aged = store.tick_idle_clock();
            debug!("idle clock: {aged} pages aged");
            if let Some(age) = policy.idle_age.filter(|_| store.has_backing_file()) {
                let request = WritebackRequest::new(WritebackMode::Aged(age));
                if !write_back(store, signal, &request, &failures) {
                    break;
                }
            }
        }
        if let Some(above) = policy.above {
            let used = store.mem_used_total();
            // A write that met the memory limit asks again whatever the last round found.
            let asked = signal.pokes() != pokes;
            pokes = signal.pokes();
            if used > above && (asked || futile_at.is_none_or(|at| used > at)) {
                if !write_back_above(store, signal, above, &failures) {
                    break;
                }
                let after = store.mem_used_total();
                futile_at = (after > above).then_some(after);
            }
        }
    }
    debug!("the writeback thread stopped");
}

/// Runs one pass, logging a failure unless `failures` says too many came this second;
/// returns whether the thread should go on.
fn write_back(
    store: &PageStore,
    signal: &StopSignal,
    request: &WritebackRequest,
    failures: &Mutex<RateLimiter>,
) -> bool {
    match store.writeback_paced(request, &mut || !signal.is_stopped()) {
        Ok(outcome) if outcome.written > 0 => {
            debug!("writeback ({}): {outcome}", request.mode.name());
        }
        Ok(_) | Err(WritebackError::LimitReached) => {}
        Err(error) => {
            let _ = warn_limited(
                failures,
                format_args!("writeback ({}) failed: {error}", request.mode.name()),
            );
        }
    }
    !signal.is_stopped()
}

/// Writes back the coldest pages until `mem_used_total` is at most `above`, or nothing more can
/// go, logging a failure unless `failures` says too many came this second. Returns whether
/// the thread should go on.
fn write_back_above(
    store: &PageStore,
    signal: &StopSignal,
    above: u64,
    failures: &Mutex<RateLimiter>,
) -> bool {
    let mut youngest = usize::from(MAX_AGE) + 1;
    while store.mem_used_total() > above && youngest > 0 {
        let excess = store.mem_used_total() - above;
        // Fragmentation leaves some freed objects in chunks that stay: aim a quarter higher.
        let wanted = excess + excess / 4;
        let by_age = store.bytes_by_age();
        let mut bytes = 0;
        let mut age = youngest;
        while age > 0 && bytes < wanted {
            age -= 1;
            bytes += by_age[age];
        }
        if bytes == 0 {
            return true; // nothing in RAM that writeback can take
        }
        // `age` < youngest <= MAX_AGE + 1, so it fits a u8.
        #[allow(clippy::cast_possible_truncation)]
        let request = WritebackRequest::new(WritebackMode::Aged(age as u8));
        let failed = match store.writeback_paced(&request, &mut || {
            !signal.is_stopped() && store.mem_used_total() > above
        }) {
            Ok(outcome) => {
                debug!("writeback above {above}: {outcome}");
                false
            }
            Err(WritebackError::LimitReached) => true,
            Err(error) => {
                let _ = warn_limited(
                    failures,
                    format_args!("writeback above {above} bytes failed: {error}"),
                );
                true
            }
        };
        // The pass compacted before it returned: its memory is back with the host.
        if signal.is_stopped() {
            return false;
        }
        if failed {
            return true;
        }
        youngest = age;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::codec::Algorithm;
    use crate::store::backing::BackingFile;
    use crate::store::StoreConfig;

    /// A store of `pages` pages with a backing file, filled by the page generator (`seed`).
    fn filled_store(pages: u64, seed: u64) -> (tempfile::TempDir, Arc<PageStore>) {
        let dir = tempfile::tempdir().unwrap();
        let store = PageStore::new(StoreConfig {
            capacity_pages: pages,
            algorithm: Algorithm::Lz4,
            level: None,
            mem_limit: None,
        })
        .unwrap()
        .with_backing_file(BackingFile::open(&dir.path().join("backing")).unwrap());
        let mut page = [0u8; crate::PAGE_SIZE];
        for index in 0..pages {
            crate::pagegen::fill_page(seed, index, &mut page);
            store.write(index, &page).unwrap();
        }
        (dir, Arc::new(store))
    }

    #[test]
    fn many_failed_passes_log_one_warning_a_second_and_are_all_counted() {
        let dir = tempfile::tempdir().unwrap();
        let mut handle = None;
        let backing = BackingFile::open_wrapped(&dir.path().join("backing"), |io| {
            let faults = Arc::new(crate::store::backing::FaultyIo::new(io));
            handle = Some(Arc::clone(&faults));
            Box::new(faults)
        })
        .unwrap();
        let store = PageStore::new(StoreConfig {
            capacity_pages: 64,
            algorithm: Algorithm::Lz4,
            level: None,
            mem_limit: None,
        })
        .unwrap()
        .with_backing_file(backing);
        let mut page = [0u8; crate::PAGE_SIZE];
        for index in 0..64 {
            crate::pagegen::fill_page(9, index, &mut page);
            store.write(index, &page).unwrap();
        }
        handle.unwrap().set_write_error(Some(libc::ENOSPC));
        let signal = StopSignal::new();
        let failures = Mutex::new(RateLimiter::new(FAILURE_WARNINGS_PER_SECOND));
        let request = WritebackRequest::new(WritebackMode::Aged(0));
        let started = Instant::now();

        for _ in 0..50 {
            assert!(write_back(&store, &signal, &request, &failures));
        }

        let elapsed = started.elapsed();
        let wb = store.stats().writeback;
        assert_eq!(wb.failed_file_writes, 50, "{wb:?}");
        assert!(wb.failed_writebacks >= 50, "{wb:?}");
        assert_eq!(wb.pages_on_file, 0);
        let next = failures
            .lock()
            .unwrap()
            .check(Instant::now() + Duration::from_secs(1));
        if elapsed < Duration::from_millis(900) {
            // One window: the first failure was logged, the 49 others were not.
            assert_eq!(
                next,
                crate::blk::ratelimit::Verdict::Log {
                    suppressed_before: 49
                }
            );
        }
    }

    #[test]
    fn writeback_above_brings_memory_under_the_mark_and_stops_promptly() {
        let (_dir, store) = filled_store(8192, 5);
        let mut page = [0u8; crate::PAGE_SIZE];
        let above = 2 << 20;
        assert!(store.mem_used_total() > 4 * above);
        let daemon = WritebackDaemon::start(
            Arc::clone(&store),
            &WritebackConfig {
                above: Some(above),
                ..WritebackConfig::default()
            },
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.mem_used_total() > above {
            assert!(Instant::now() < deadline, "{:?}", store.stats().mm);
            std::thread::sleep(Duration::from_millis(20));
        }
        // It stopped once under the mark: not every page went.
        let w = store.stats().writeback;
        assert!(w.pages_on_file > 0 && w.pages_on_file < 8192, "{w:?}");
        let started = Instant::now();
        daemon.stop();
        assert!(started.elapsed() < Duration::from_secs(1));
        for index in 0..8192 {
            crate::pagegen::fill_page(5, index, &mut page);
            let mut out = [0u8; crate::PAGE_SIZE];
            store.read(index, &mut out).unwrap();
            assert!(out == page, "page {index}");
        }
        store.check_consistency().unwrap();
    }

    #[test]
    fn pages_idle_long_enough_go_to_the_file_and_a_hot_page_stays() {
        let (_dir, store) = filled_store(256, 6);
        let mut page = [0u8; crate::PAGE_SIZE];
        let hot = (0..256)
            .find(|&index| {
                crate::pagegen::fill_page(6, index, &mut page) == crate::pagegen::PageKind::Text
            })
            .unwrap();
        let objects = 256 - store.stats().mm.same_pages;
        let tick = Duration::from_millis(100);
        store.set_idle_tick(tick);
        let daemon = WritebackDaemon::start(
            Arc::clone(&store),
            &WritebackConfig {
                idle_after: Some(Duration::from_millis(500)),
                idle_tick: tick,
                ..WritebackConfig::default()
            },
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = [0u8; crate::PAGE_SIZE];
        while store.stats().writeback.pages_on_file < objects - 1 {
            assert!(Instant::now() < deadline, "{:?}", store.stats().writeback);
            store.read(hot, &mut out).unwrap(); // read every 20 ms: never idle for 500 ms
            std::thread::sleep(Duration::from_millis(20));
        }
        daemon.stop();
        let w = store.stats().writeback;
        assert_eq!(
            w.pages_on_file,
            objects - 1,
            "every page but the hot one: {w:?}"
        );
        assert_ne!(
            store.slots_state(hot),
            crate::store::SlotState::WrittenBack,
            "the hot page stayed in RAM"
        );
        store.check_consistency().unwrap();
    }

    #[test]
    fn ages_guarantee_the_idle_time_asked_for() {
        let minute = Duration::from_secs(60);
        assert_eq!(min_age_for(Duration::from_secs(60), minute), Some(2));
        assert_eq!(min_age_for(Duration::from_secs(61), minute), Some(3));
        assert_eq!(min_age_for(Duration::from_secs(1), minute), Some(2));
        assert_eq!(min_age_for(Duration::ZERO, minute), Some(1));
        assert_eq!(min_age_for(minute * 126, minute), Some(127));
        assert_eq!(min_age_for(minute * 127, minute), None);
    }
}
