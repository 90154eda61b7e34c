// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A good host citizen: the daemon keeps itself below its memory cgroup's limit, and gives
//! memory back when the host is under memory pressure.
//!
//! One thread, `pressure`, does both:
//!
//! - **The cgroup limit** ([`cgroup`]), honoured whenever one is set: every [`CHECK`] (and at
//!   once when a write meets the store's limit) it reads the cgroup's limit and usage and gives
//!   the store the [`Budget`] left: `limit - headroom - (usage - mem_used_total)`, the limit
//!   less [`headroom`] less what the rest of the cgroup holds (the daemon's own heap and
//!   stacks, other processes, file cache not yet reclaimable). The store's memory limit becomes
//!   the lower of that and `--mem-limit` (or `ctl mem-limit`); above [`Budget::shed_above`], a
//!   margin below it, the coldest pages are shed down to [`Budget::shed_to`], so writes find
//!   room before they meet the limit. With neither a backing file nor a secondary algorithm
//!   there is nothing to shed: writes are refused at the limit exactly as with `--mem-limit`.
//! - **Host memory pressure** (`--reclaim-on-pressure[=THRESHOLD]`, [`psi`]): a PSI trigger on
//!   `/proc/pressure/memory` (or the v2 cgroup's `memory.pressure`) wakes the thread when tasks
//!   stall on memory; each event sheds an eighth of `mem_used_total`, coldest first, at most
//!   one round every [`PRESSURE_ROUND_EVERY`].
//!
//! Shedding ([`shed`]) is `ctl reclaim` with `min_age=0`: write back when there is a backing
//! file, recompress when there is a secondary algorithm, and compact, so the memory is back with
//! the host when the round ends. What was done is counted in [`PressureState`] (`ctl stats`,
//! the metrics).
//!
//! The thread waits in `poll` on the trigger, the stop signal's eventfd and an eventfd that a
//! write meeting the limit writes; stopping it is bounded by one shedding round.

pub mod cgroup;
pub mod psi;

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use vmm_sys_util::eventfd::EventFd;

use crate::blk::ratelimit::{warn_limited, RateLimiter};
use crate::blk::request::ErrorChain;
use crate::stop::{StopSignal, Threads, STOP_BOUND};
use crate::store::reclaim::{ReclaimMode, ReclaimRequest};
use crate::store::PageStore;

pub use self::cgroup::{CgroupSample, CgroupVersion, MemoryCgroup};
pub use self::psi::{PsiThreshold, PsiTrigger};

/// How often the cgroup's limit and usage are read (as `--writeback-above` checks).
pub const CHECK: Duration = crate::writeback::ABOVE_CHECK;
/// At most one shedding round for memory pressure this often.
pub const PRESSURE_ROUND_EVERY: Duration = Duration::from_secs(1);
/// Each pressure round sheds `mem_used_total / PRESSURE_SHARE`.
pub const PRESSURE_SHARE: u64 = 8;
/// The least headroom left below a cgroup limit.
pub const MIN_HEADROOM: u64 = 8 << 20;
/// The least margin between the point where shedding starts and the store's limit.
pub const MIN_MARGIN: u64 = 2 << 20;
const MIB: u64 = 1 << 20;

/// The pressure settings of a daemon.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PressureConfig {
    /// Shed memory when host (or v2 cgroup) memory pressure crosses this
    /// (`--reclaim-on-pressure`); `None`: pressure is not watched.
    pub reclaim_on_pressure: Option<PsiThreshold>,
}

/// The headroom left below a cgroup limit: the larger of 8 MiB and a sixteenth of the limit.
/// It covers what moves between two checks: a burst of writes allocating chunks for 200 ms
/// before the thread sees them is bounded by the store's limit itself, so what remains is the
/// daemon's own allocations (request buffers, a migration's stream, a new queue thread's stack),
/// the kernel's per-CPU charge batching (v1 charges in batches of 64 pages per CPU) and page
/// tables. Measured: in a 96 MiB v1 cgroup with 512 MiB written (tests/pressure.rs), the
/// peak usage was 89 MiB, 7 MiB below the limit (1 MiB into the 8 MiB headroom: what the
/// rest of the cgroup grew by between checks), `failcnt` 0. A smaller headroom
/// would leave the kernel's reclaim (and, with no file cache to drop, the OOM killer) the
/// daemon's own allocations between two checks; a larger one wastes memory on large limits,
/// hence a sixteenth above 128 MiB.
pub fn headroom(limit: u64) -> u64 {
    (limit / 16).max(MIN_HEADROOM)
}

/// What the store may use under a cgroup limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// The store's memory limit: writes that would go above are refused.
    pub store_limit: u64,
    /// Shedding starts above this `mem_used_total`.
    pub shed_above: u64,
    /// ... and goes down to this.
    pub shed_to: u64,
}

impl Budget {
    /// The budget under cgroup `limit`, with the cgroup using `cgroup_used` (less inactive file
    /// cache) of which the store holds `store_used`. The store's limit is at least a page, so
    /// that it is a limit (0 means none to the store) that refuses every write.
    pub fn under(limit: u64, cgroup_used: u64, store_used: u64) -> Budget {
        let others = cgroup_used.saturating_sub(store_used);
        let store_limit = limit
            .saturating_sub(headroom(limit))
            .saturating_sub(others)
            .max(crate::PAGE_BYTES);
        let margin = (store_limit / 16).max(MIN_MARGIN);
        Budget {
            store_limit,
            shed_above: store_limit.saturating_sub(margin),
            shed_to: store_limit.saturating_sub(2 * margin),
        }
    }
}

impl Budget {
    /// The bytes to shed with the store at `used`: down to [`Budget::shed_to`] once above
    /// [`Budget::shed_above`]; nothing at or below the mark, nor while memory has not grown
    /// past `futile_at`, where the last round that could not get below the mark ended.
    pub fn to_shed(&self, used: u64, futile_at: Option<u64>) -> Option<u64> {
        let futile = futile_at.is_some_and(|at| used <= at);
        (used > self.shed_above && !futile).then(|| used - self.shed_to)
    }
}

/// What shedding may do on a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedMeans {
    /// Write back (a backing file), recompress (a secondary algorithm), or both.
    Reclaim {
        /// There is a backing file.
        write_back: bool,
        /// There is a secondary algorithm.
        recompress: bool,
    },
    /// Only compaction: the limit refuses writes.
    CompactOnly,
}

impl ShedMeans {
    /// What `store` can shed with.
    pub fn of(store: &PageStore) -> ShedMeans {
        match (store.has_backing_file(), store.secondary_count() > 0) {
            (false, false) => ShedMeans::CompactOnly,
            (write_back, recompress) => ShedMeans::Reclaim {
                write_back,
                recompress,
            },
        }
    }

    fn describe(self) -> &'static str {
        match self {
            ShedMeans::Reclaim {
                write_back: true,
                recompress: true,
            } => "writing the coldest pages back, then recompressing them, then compacting",
            ShedMeans::Reclaim {
                write_back: true,
                recompress: false,
            } => "writing the coldest pages back to the backing file, then compacting",
            ShedMeans::Reclaim {
                write_back: false,
                recompress: _,
            } => "recompressing the coldest pages with the secondary algorithm, then compacting",
            ShedMeans::CompactOnly => {
                "compacting only (no backing file, no secondary algorithm): writes are refused at \
                 the limit"
            }
        }
    }
}

/// Why a round sheds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedCause {
    /// The store went above the cgroup budget's mark.
    CgroupLimit,
    /// A PSI trigger fired.
    Pressure,
}

/// A shedding mode, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedMode {
    /// Pages written back to the backing file.
    Writeback,
    /// Pages recompressed with a secondary algorithm.
    Recompress,
    /// Allocator chunks given back by compaction.
    Compact,
}

impl ShedMode {
    /// Every mode, in the order shedding uses them.
    pub const ALL: [ShedMode; 3] = [ShedMode::Writeback, ShedMode::Recompress, ShedMode::Compact];

    /// `writeback`, `recompress`, `compact`.
    pub fn name(self) -> &'static str {
        match self {
            ShedMode::Writeback => "writeback",
            ShedMode::Recompress => "recompress",
            ShedMode::Compact => "compact",
        }
    }

    fn index(self) -> usize {
        match self {
            ShedMode::Writeback => 0,
            ShedMode::Recompress => 1,
            ShedMode::Compact => 2,
        }
    }
}

/// The daemon's pressure figures and the memory limit the user set; shared by the pressure
/// thread, the control socket and the metrics.
#[derive(Debug, Default)]
pub struct PressureState {
    /// The cgroup limit found at the last check, bytes; 0: none.
    cgroup_limit: AtomicU64,
    /// The store's limit under the cgroup at the last check, bytes; 0: none.
    cgroup_budget: AtomicU64,
    /// The limit `--mem-limit` or `ctl mem-limit` set, bytes; 0: none.
    user_limit: AtomicU64,
    pressure_events: AtomicU64,
    requests_ctl: AtomicU64,
    rounds_cgroup: AtomicU64,
    rounds_pressure: AtomicU64,
    shed_pages: [AtomicU64; 3],
    shed_bytes: [AtomicU64; 3],
}

/// A copy of [`PressureState`]'s figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PressureStats {
    /// The cgroup limit found, bytes (0: none, or no memory cgroup).
    pub cgroup_limit: u64,
    /// The store's memory limit that the cgroup limit leaves, bytes (0: none).
    pub cgroup_budget: u64,
    /// PSI trigger events.
    pub pressure_events: u64,
    /// `ctl reclaim` requests.
    pub reclaim_requests_ctl: u64,
    /// Shedding rounds for the cgroup limit.
    pub reclaim_rounds_cgroup: u64,
    /// Shedding rounds for memory pressure.
    pub reclaim_rounds_pressure: u64,
    /// Pages shed by the pressure thread: written back, recompressed, and compaction's pages
    /// given back.
    pub shed_pages: [u64; 3],
    /// `mem_used_total` bytes shed by the pressure thread, by the same modes.
    pub shed_bytes: [u64; 3],
}

impl PressureStats {
    /// Pages shed in `mode`.
    pub fn pages(&self, mode: ShedMode) -> u64 {
        self.shed_pages[mode.index()]
    }

    /// Bytes shed in `mode`.
    pub fn bytes(&self, mode: ShedMode) -> u64 {
        self.shed_bytes[mode.index()]
    }

    /// Reclaim requests: `ctl reclaim` and the pressure thread's rounds.
    pub fn reclaim_requests(&self) -> u64 {
        self.reclaim_requests_ctl + self.reclaim_rounds_cgroup + self.reclaim_rounds_pressure
    }
}

impl PressureState {
    /// No cgroup seen, no event, the user's limit `user_limit`.
    pub fn new(user_limit: Option<u64>) -> PressureState {
        let state = PressureState::default();
        state
            .user_limit
            .store(user_limit.unwrap_or(0), Ordering::Relaxed);
        state
    }

    /// The figures now.
    pub fn stats(&self) -> PressureStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        PressureStats {
            cgroup_limit: load(&self.cgroup_limit),
            cgroup_budget: load(&self.cgroup_budget),
            pressure_events: load(&self.pressure_events),
            reclaim_requests_ctl: load(&self.requests_ctl),
            reclaim_rounds_cgroup: load(&self.rounds_cgroup),
            reclaim_rounds_pressure: load(&self.rounds_pressure),
            shed_pages: self.shed_pages.each_ref().map(load),
            shed_bytes: self.shed_bytes.each_ref().map(load),
        }
    }

    /// Counts a `ctl reclaim`.
    pub fn count_ctl_reclaim(&self) {
        self.requests_ctl.fetch_add(1, Ordering::Relaxed);
    }

    /// Sets the user's memory limit (`ctl mem-limit`) and gives the store the lower of it and
    /// the cgroup's budget.
    pub fn set_user_limit(&self, store: &PageStore, limit: Option<u64>) {
        self.user_limit.store(limit.unwrap_or(0), Ordering::Relaxed);
        self.apply_limit(store);
    }

    /// The user's memory limit.
    pub fn user_limit(&self) -> Option<u64> {
        nonzero(self.user_limit.load(Ordering::Relaxed))
    }

    /// Gives the store the lower of the user's limit and the cgroup's budget.
    fn apply_limit(&self, store: &PageStore) {
        let budget = nonzero(self.cgroup_budget.load(Ordering::Relaxed));
        let limit = match (self.user_limit(), budget) {
            (Some(user), Some(budget)) => Some(user.min(budget)),
            (user, None) => user,
            (None, budget) => budget,
        };
        if store.mem_limit() != limit {
            store.set_mem_limit(limit);
        }
    }

    fn count_shed(&self, mode: ShedMode, pages: u64, bytes: u64) {
        self.shed_pages[mode.index()].fetch_add(pages, Ordering::Relaxed);
        self.shed_bytes[mode.index()].fetch_add(bytes, Ordering::Relaxed);
    }
}

fn nonzero(value: u64) -> Option<u64> {
    (value != 0).then_some(value)
}

/// What one shedding round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShedOutcome {
    /// `mem_used_total` before.
    pub before: u64,
    /// `mem_used_total` after.
    pub after: u64,
    /// Pages written back, recompressed, and given back by compaction.
    pub pages: [u64; 3],
    /// Bytes of `mem_used_total` each mode freed.
    pub bytes: [u64; 3],
}

/// Sheds up to `bytes` of `mem_used_total` from the coldest pages of `store` with what it
/// has (`means`), and counts it in `state` as a round for `cause`: write back, then recompress
/// what is still to shed, then compact.
pub fn shed(
    store: &PageStore,
    means: ShedMeans,
    bytes: u64,
    cause: ShedCause,
    state: &PressureState,
) -> ShedOutcome {
    match cause {
        ShedCause::CgroupLimit => state.rounds_cgroup.fetch_add(1, Ordering::Relaxed),
        ShedCause::Pressure => state.rounds_pressure.fetch_add(1, Ordering::Relaxed),
    };
    let before = store.mem_used_total();
    let target = before.saturating_sub(bytes);
    let mut outcome = ShedOutcome {
        before,
        ..ShedOutcome::default()
    };
    let (write_back, recompress) = match means {
        ShedMeans::Reclaim {
            write_back,
            recompress,
        } => (write_back, recompress),
        ShedMeans::CompactOnly => (false, false),
    };
    let passes = [
        (ShedMode::Writeback, ReclaimMode::Writeback, write_back),
        (ShedMode::Recompress, ReclaimMode::Recompress, recompress),
    ];
    for (mode, reclaim_mode, available) in passes {
        let used = store.mem_used_total();
        if !available || used <= target {
            continue;
        }
        let request = ReclaimRequest {
            bytes: used - target,
            min_age: Duration::ZERO,
            mode: reclaim_mode,
        };
        match store.reclaim(&request) {
            Ok(done) => {
                let pages = match mode {
                    ShedMode::Writeback => done.written_back,
                    ShedMode::Recompress | ShedMode::Compact => done.recompressed,
                };
                outcome.pages[mode.index()] += pages;
                outcome.bytes[mode.index()] += done.freed();
            }
            Err(error) => debug!("shedding by {}: {error}", mode.name()),
        }
    }
    // Reclaim compacted after each pass; this gives back what is left (and is all a store
    // with nothing to shed can do).
    let used = store.mem_used_total();
    let compacted = store.compact();
    outcome.pages[ShedMode::Compact.index()] = compacted;
    outcome.bytes[ShedMode::Compact.index()] = used.saturating_sub(store.mem_used_total());
    outcome.after = store.mem_used_total();
    for mode in ShedMode::ALL {
        state.count_shed(
            mode,
            outcome.pages[mode.index()],
            outcome.bytes[mode.index()],
        );
    }
    outcome
}

/// The running pressure thread; dropping it stops and joins it.
#[derive(Debug)]
pub struct PressureDaemon {
    threads: Threads,
}

/// What [`PressureDaemon::start`] found and will do, for the start log and the tests.
#[derive(Debug)]
pub struct Findings {
    /// The memory cgroup, or why there is none.
    pub cgroup: Result<MemoryCgroup, String>,
    /// Its first sample, if it could be read.
    pub sample: Option<CgroupSample>,
    /// The PSI trigger, or why there is none (`None`: not asked for).
    pub trigger: Option<Result<PsiTrigger, String>>,
    /// What shedding can do.
    pub means: ShedMeans,
}

impl Findings {
    /// Looks at the process's memory cgroup and registers the PSI trigger `config` asks for.
    pub fn look(store: &PageStore, config: &PressureConfig) -> Findings {
        let cgroup = MemoryCgroup::discover().map_err(|e| ErrorChain(&e).to_string());
        let sample = cgroup.as_ref().ok().and_then(|c| c.sample().ok());
        let trigger = config.reclaim_on_pressure.map(|threshold| {
            let path = cgroup
                .as_ref()
                .ok()
                .and_then(MemoryCgroup::pressure_file)
                .unwrap_or_else(|| psi::HOST_PRESSURE.into());
            PsiTrigger::register(&path, threshold).map_err(|e| ErrorChain(&e).to_string())
        });
        Findings {
            cgroup,
            sample,
            trigger,
            means: ShedMeans::of(store),
        }
    }

    /// Says in the log what was found and what will be done.
    pub fn log(&self) {
        match (&self.cgroup, self.sample) {
            (Ok(cgroup), Some(sample)) => match sample.limit {
                Some(limit) => info!(
                    "memory cgroup {} {}: limit {} MiB, {} MiB in use; keeping the store within \
                     the limit less {} MiB headroom less what the rest of the cgroup uses, \
                     re-read every {} ms, by {}",
                    cgroup.version.name(),
                    cgroup.path,
                    limit / MIB,
                    sample.used / MIB,
                    headroom(limit) / MIB,
                    CHECK.as_millis(),
                    self.means.describe()
                ),
                None => info!(
                    "memory cgroup {} {}: no limit (one set later is honoured within {} ms)",
                    cgroup.version.name(),
                    cgroup.path,
                    CHECK.as_millis()
                ),
            },
            (Ok(cgroup), None) => warn!(
                "memory cgroup {} {}: its limit and usage cannot be read; no cgroup limit is \
                 honoured",
                cgroup.version.name(),
                cgroup.path
            ),
            (Err(why), _) => info!("no memory cgroup limit to honour: {why}"),
        }
        match &self.trigger {
            None => info!("memory pressure is not watched (--reclaim-on-pressure turns it on)"),
            Some(Ok(trigger)) => info!(
                "on memory pressure ({} on {}): shedding 1/{PRESSURE_SHARE} of mem_used_total, \
                 at most once a second, by {}",
                trigger.threshold(),
                trigger.path().display(),
                self.means.describe()
            ),
            Some(Err(why)) => warn!("--reclaim-on-pressure: {why}; memory pressure is not watched"),
        }
    }
}

impl PressureDaemon {
    /// Starts the thread on `store` with what `findings` found; `None` when there is nothing
    /// to watch (no memory cgroup, no PSI trigger). The user's limit is in `state`. A write
    /// that meets the store's limit wakes this thread, and pokes `also_poke` (the writeback
    /// thread of `--writeback-above`, whose relief this one replaces).
    pub fn start(
        store: Arc<PageStore>,
        findings: Findings,
        state: Arc<PressureState>,
        also_poke: Option<StopSignal>,
    ) -> io::Result<Option<PressureDaemon>> {
        let cgroup = findings.cgroup.ok().filter(|_| findings.sample.is_some());
        let trigger = findings.trigger.and_then(Result::ok);
        if cgroup.is_none() && trigger.is_none() {
            return Ok(None);
        }
        let poke = Arc::new(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?);
        if cgroup.is_some() && findings.means != ShedMeans::CompactOnly {
            let poke = Arc::clone(&poke);
            // A write that meets the limit wakes the thread, and waits a little for the room.
            store.set_pressure_relief(Arc::new(move || {
                let _ = poke.write(1);
                if let Some(writeback) = &also_poke {
                    writeback.poke();
                }
            }));
        }
        let mut threads = Threads::new();
        let watch = Watch {
            store,
            state,
            cgroup,
            trigger,
            poke,
            means: findings.means,
        };
        threads.spawn("pressure", move |signal| watch.run(&signal))?;
        Ok(Some(PressureDaemon { threads }))
    }

    /// Stops the thread and waits for it, [`STOP_BOUND`] at most.
    pub fn stop(mut self) {
        let _ = self.threads.stop_within(STOP_BOUND);
    }

    /// The thread, for an owner that stops it with others.
    pub fn into_threads(self) -> Threads {
        self.threads
    }
}

/// What woke the thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    Stopped,
    Pressure,
    /// The trigger's file reported an error (its cgroup went away).
    TriggerGone,
    Poked,
    Timeout,
}

struct Watch {
    store: Arc<PageStore>,
    state: Arc<PressureState>,
    cgroup: Option<MemoryCgroup>,
    trigger: Option<PsiTrigger>,
    poke: Arc<EventFd>,
    means: ShedMeans,
}

impl Watch {
    fn run(mut self, signal: &StopSignal) {
        let stop = match signal.event_fd() {
            Ok(stop) => stop,
            Err(error) => {
                warn!("the pressure thread cannot wait for its stop: {error}; it ends");
                return;
            }
        };
        let failures = Mutex::new(RateLimiter::new(1));
        let mut last_round: Option<Instant> = None;
        // After a round that could not get below the mark, wait for memory to grow past what
        // it was then, or for a write to meet the limit, before the next.
        let mut futile_at: Option<u64> = None;
        // The budget binds from the start, not from the first check.
        self.check_cgroup(&failures, &mut futile_at);
        loop {
            let wake = match self.wait(stop.as_raw_fd(), Instant::now() + CHECK) {
                Ok(wake) => wake,
                Err(error) => {
                    warn!("the pressure thread cannot poll: {error}; it ends");
                    return;
                }
            };
            match wake {
                Wake::Stopped => break,
                Wake::Pressure => {
                    self.state.pressure_events.fetch_add(1, Ordering::Relaxed);
                    if last_round.is_none_or(|at| at.elapsed() >= PRESSURE_ROUND_EVERY) {
                        last_round = Some(Instant::now());
                        let bytes = self.store.mem_used_total() / PRESSURE_SHARE;
                        let done = shed(
                            &self.store,
                            self.means,
                            bytes,
                            ShedCause::Pressure,
                            &self.state,
                        );
                        // The first round is news; the next ones are in the statistics
                        // (sustained pressure would log a line a second).
                        let level = if self.state.rounds_pressure.load(Ordering::Relaxed) == 1 {
                            log::Level::Info
                        } else {
                            log::Level::Debug
                        };
                        log::log!(
                            level,
                            "memory pressure: shed {} of {bytes} bytes asked (mem_used_total {} \
                             -> {}); later rounds are counted in ctl stats",
                            done.before.saturating_sub(done.after),
                            done.before,
                            done.after
                        );
                    }
                }
                Wake::TriggerGone => {
                    warn!(
                        "the PSI trigger reported an error; memory pressure is no longer watched"
                    );
                    self.trigger = None;
                }
                Wake::Poked => {
                    let _ = self.poke.read();
                    futile_at = None;
                }
                Wake::Timeout => {}
            }
            if signal.is_stopped() {
                break;
            }
            self.check_cgroup(&failures, &mut futile_at);
        }
        debug!("the pressure thread stopped");
    }

    /// Waits for the trigger, the stop, a poke or `deadline`.
    fn wait(&self, stop: i32, deadline: Instant) -> io::Result<Wake> {
        let mut fds = [
            libc::pollfd {
                fd: stop,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.poke.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.trigger.as_ref().map_or(-1, AsRawFd::as_raw_fd),
                events: libc::POLLPRI,
                revents: 0,
            },
        ];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let timeout = i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
            // SAFETY: `fds` is a valid, writable array of three `pollfd` that outlives the
            // call and its length is passed exactly; the descriptors stay open meanwhile (the
            // stop eventfd is held by the signal, the poke eventfd and the trigger by `self`),
            // and a negative fd is ignored by poll.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), 3, timeout) };
            if ready < 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(error);
            }
            return Ok(if fds[0].revents != 0 {
                Wake::Stopped
            } else if fds[2].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
                Wake::TriggerGone
            } else if fds[2].revents & libc::POLLPRI != 0 {
                Wake::Pressure
            } else if fds[1].revents != 0 {
                Wake::Poked
            } else {
                Wake::Timeout
            });
        }
    }

    /// Reads the cgroup, gives the store its budget, and sheds above the mark.
    fn check_cgroup(&self, failures: &Mutex<RateLimiter>, futile_at: &mut Option<u64>) {
        let Some(cgroup) = &self.cgroup else {
            return;
        };
        let sample = match cgroup.sample() {
            Ok(sample) => sample,
            Err(error) => {
                let _ = warn_limited(
                    failures,
                    format_args!(
                        "cannot read memory cgroup {}: {error}",
                        cgroup.dir.display()
                    ),
                );
                return;
            }
        };
        let used = self.store.mem_used_total();
        let budget = sample
            .limit
            .map(|limit| Budget::under(limit, sample.used, used));
        self.state
            .cgroup_limit
            .store(sample.limit.unwrap_or(0), Ordering::Relaxed);
        self.state
            .cgroup_budget
            .store(budget.map_or(0, |b| b.store_limit), Ordering::Relaxed);
        self.state.apply_limit(&self.store);
        let Some(budget) = budget else {
            return;
        };
        let Some(bytes) = budget.to_shed(used, *futile_at) else {
            return;
        };
        let done = shed(
            &self.store,
            self.means,
            bytes,
            ShedCause::CgroupLimit,
            &self.state,
        );
        debug!(
            "cgroup limit {}, {} in use: shed mem_used_total {} -> {} (mark {}, store limit {})",
            sample.limit.unwrap_or(0),
            sample.used,
            done.before,
            done.after,
            budget.shed_above,
            budget.store_limit
        );
        *futile_at = (done.after > budget.shed_above).then_some(done.after);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Algorithm;
    use crate::store::StoreConfig;

    #[test]
    fn the_budget_leaves_headroom_and_what_others_use() {
        let limit = 96 * MIB;
        // The store holds 40 MiB of the cgroup's 50: others hold 10.
        let budget = Budget::under(limit, 50 * MIB, 40 * MIB);
        assert_eq!(budget.store_limit, 96 * MIB - 8 * MIB - 10 * MIB);
        assert!(budget.shed_to < budget.shed_above && budget.shed_above < budget.store_limit);
        assert!(budget.store_limit - budget.shed_above >= MIN_MARGIN);
        // A large limit leaves a sixteenth.
        assert_eq!(headroom(16 << 30), 1 << 30);
        // Usage below what the store counts (untouched memory) is no negative "others".
        assert_eq!(Budget::under(limit, MIB, 40 * MIB).store_limit, 88 * MIB);
        // A cgroup full of others leaves a one-page limit, which refuses every write.
        assert_eq!(
            Budget::under(limit, 200 * MIB, MIB).store_limit,
            crate::PAGE_BYTES
        );
    }

    #[test]
    fn shedding_starts_above_the_mark_goes_below_it_and_skips_a_futile_repeat() {
        let budget = Budget::under(96 * MIB, 0, 0);
        assert_eq!(budget.to_shed(budget.shed_above, None), None);
        let above = budget.shed_above + 1;
        assert_eq!(above - budget.to_shed(above, None).unwrap(), budget.shed_to);
        // The last round ended above the mark at `above`: not again until memory grows.
        assert_eq!(budget.to_shed(above, Some(above)), None);
        assert!(budget.to_shed(above + 1, Some(above)).is_some());
    }

    fn store(pages: u64) -> PageStore {
        let store = PageStore::new(StoreConfig {
            capacity_pages: pages,
            algorithm: Algorithm::Lz4,
            level: None,
            mem_limit: None,
        })
        .unwrap();
        let mut page = [0u8; crate::PAGE_SIZE];
        for index in 0..pages {
            crate::pagegen::fill_page(7, index, &mut page);
            store.write(index, &page).unwrap();
        }
        store
    }

    #[test]
    fn shedding_writes_back_the_asked_bytes_counts_them_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(16384).with_backing_file(
            crate::store::backing::BackingFile::open(&dir.path().join("backing")).unwrap(),
        );
        let state = PressureState::new(None);
        let before = store.mem_used_total();
        let means = ShedMeans::of(&store);
        assert_eq!(
            means,
            ShedMeans::Reclaim {
                write_back: true,
                recompress: false
            }
        );

        let done = shed(&store, means, before / 8, ShedCause::Pressure, &state);

        assert!(done.before - done.after >= before / 8, "{done:?}");
        assert!(done.pages[0] > 0 && done.pages[0] < 16384 / 2, "{done:?}");
        let stats = state.stats();
        assert_eq!(stats.reclaim_rounds_pressure, 1);
        assert_eq!(stats.pages(ShedMode::Writeback), done.pages[0]);
        assert!(stats.bytes(ShedMode::Writeback) > 0);
        let mut page = [0u8; crate::PAGE_SIZE];
        let mut out = [0u8; crate::PAGE_SIZE];
        for index in 0..16384 {
            crate::pagegen::fill_page(7, index, &mut page);
            store.read(index, &mut out).unwrap();
            assert!(out == page, "page {index}");
        }
        store.check_consistency().unwrap();
    }

    #[test]
    fn with_nothing_to_shed_only_compaction_runs() {
        let store = store(1024);
        let state = PressureState::new(None);
        assert_eq!(ShedMeans::of(&store), ShedMeans::CompactOnly);
        let done = shed(
            &store,
            ShedMeans::CompactOnly,
            1 << 20,
            ShedCause::CgroupLimit,
            &state,
        );
        assert_eq!(done.pages[0] + done.pages[1], 0);
        assert_eq!(state.stats().reclaim_rounds_cgroup, 1);
    }

    #[test]
    fn the_store_gets_the_lower_of_the_user_limit_and_the_cgroup_budget() {
        let store = store(16);
        let state = PressureState::new(Some(64 * MIB));
        state.apply_limit(&store);
        assert_eq!(store.mem_limit(), Some(64 * MIB));
        state.cgroup_budget.store(32 * MIB, Ordering::Relaxed);
        state.apply_limit(&store);
        assert_eq!(store.mem_limit(), Some(32 * MIB));
        state.set_user_limit(&store, Some(16 * MIB));
        assert_eq!(store.mem_limit(), Some(16 * MIB));
        state.set_user_limit(&store, None);
        assert_eq!(store.mem_limit(), Some(32 * MIB));
        state.cgroup_budget.store(0, Ordering::Relaxed);
        state.apply_limit(&store);
        assert_eq!(store.mem_limit(), None);
    }
}
