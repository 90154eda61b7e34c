// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One way to stop a thread: the [`StopSignal`] every thread the daemon starts watches, and
//! [`Threads`], which starts named threads and joins them within a bound.
//!
//! A thread waits in one of four ways, and the signal serves each:
//!
//! - it **sleeps** between rounds of work: [`StopSignal::sleep_until`] and [`StopSignal::sleep`]
//!   return `false` at once when the signal stops (or was stopped), and [`StopSignal::poke`]
//!   ends one sleep early without stopping anything;
//! - it **works in steps** and looks between them: [`StopSignal::is_stopped`] is one atomic
//!   load;
//! - it **polls a descriptor**: [`StopSignal::wait_readable`] waits for the descriptor or the
//!   stop, whichever comes first, through an eventfd ([`StopSignal::event_fd`]) that becomes
//!   readable at the stop and stays so;
//! - it is **blocked somewhere the signal cannot see** (a condvar of its own, another crate's
//!   event loop): [`StopSignal::on_stop`] registers a waker that runs at the stop — it notifies
//!   that condvar or calls that crate's shutdown.
//!
//! [`Threads`] owns a group of threads that watch one signal. Each thread carries a guard that
//! records, as the thread ends (returning or unwinding), how it ended, and wakes whoever waits
//! for it, so [`Threads::join_within`] waits without polling and never past its deadline: it
//! joins the threads that end in time and names the others, which are left running (a thread
//! stuck in a write to a hung file must not hold the process up). A thread that panicked is
//! named too. Groups combine ([`Threads::adopt`]), so a daemon stops everything it started with
//! one signal and one bound.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::warn;
use vmm_sys_util::eventfd::EventFd;

/// How long a group of threads is given to stop when it is dropped, or when a caller has no
/// bound of its own.
pub const STOP_BOUND: Duration = Duration::from_secs(5);

/// Code run once, at the stop.
type Waker = Box<dyn FnOnce() + Send>;

/// A stop request that any number of threads watch; clones share it. Stopping is final and
/// idempotent.
#[derive(Clone, Default)]
pub struct StopSignal {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    /// The lock-free copy of `WakeState::stopped`, for [`StopSignal::is_stopped`].
    stopped: AtomicBool,
    state: Mutex<WakeState>,
    /// Notified at the stop and at each poke.
    wake: Condvar,
}

#[derive(Default)]
struct WakeState {
    stopped: bool,
    /// A poke not yet taken by a sleep.
    poked: bool,
    /// Pokes ever.
    pokes: u64,
    /// Run at the stop; empty afterwards.
    wakers: Vec<Waker>,
    /// Written at the stop, once created.
    event: Option<Arc<EventFd>>,
}

/// What [`StopSignal::wait_readable`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// The descriptor is readable (or at end of file, or in error: a read tells which).
    Readable,
    /// The signal stopped.
    Stopped,
    /// The deadline passed first.
    TimedOut,
}

impl StopSignal {
    /// A signal not stopped yet.
    pub fn new() -> StopSignal {
        StopSignal::default()
    }

    fn lock(&self) -> MutexGuard<'_, WakeState> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops: every sleep and wait on the signal ends, the event fd becomes readable, and the
    /// wakers run, on the calling thread, after the signal's lock is released. Calling it again
    /// does nothing.
    pub fn stop(&self) {
        self.shared.stopped.store(true, Ordering::Release);
        let wakers = {
            let mut state = self.lock();
            if state.stopped {
                return;
            }
            state.stopped = true;
            if let Some(event) = &state.event {
                // An eventfd write fails only when the counter would overflow, which one write
                // of 1 on a fresh eventfd never does.
                let _ = event.write(1);
            }
            std::mem::take(&mut state.wakers)
        };
        self.shared.wake.notify_all();
        for waker in wakers {
            waker();
        }
    }

    /// Whether the signal stopped; one atomic load.
    pub fn is_stopped(&self) -> bool {
        self.shared.stopped.load(Ordering::Acquire)
    }

    /// Sleeps until `deadline`, the stop or a poke. Returns `false` when stopped (then at
    /// once, without sleeping), `true` otherwise: the thread should go on.
    pub fn sleep_until(&self, deadline: Instant) -> bool {
        let mut state = self.lock();
        loop {
            if state.stopped {
                return false;
            }
            if state.poked {
                state.poked = false;
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            state = self
                .shared
                .wake
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// [`StopSignal::sleep_until`] `duration` from now.
    pub fn sleep(&self, duration: Duration) -> bool {
        self.sleep_until(Instant::now() + duration)
    }

    /// Blocks until the signal stops.
    pub fn wait(&self) {
        let mut state = self.lock();
        while !state.stopped {
            state = self
                .shared
                .wake
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Ends the current sleep early, or the next one if no thread sleeps now; once, however
    /// many threads sleep on the signal.
    pub fn poke(&self) {
        let mut state = self.lock();
        state.poked = true;
        state.pokes += 1;
        drop(state);
        self.shared.wake.notify_all();
    }

    /// How many pokes there have been: a thread that compares it with what it saw last knows
    /// whether someone asked for it meanwhile.
    pub fn pokes(&self) -> u64 {
        self.lock().pokes
    }

    /// Runs `waker` at the stop, on the thread that stops the signal; at once, on the calling
    /// thread, when the signal stopped already. For a thread blocked where the signal cannot
    /// reach it: the waker notifies that thread's condvar, or calls the shutdown of the crate
    /// whose loop it runs. A waker must not block.
    pub fn on_stop(&self, waker: impl FnOnce() + Send + 'static) {
        let mut state = self.lock();
        if state.stopped {
            drop(state);
            waker();
        } else {
            state.wakers.push(Box::new(waker));
        }
    }

    /// Stops `child` when this signal stops (at once if it has): a group of threads with a
    /// signal of its own stops with the daemon's.
    pub fn propagate_to(&self, child: &StopSignal) {
        let child = child.clone();
        self.on_stop(move || child.stop());
    }

    /// An eventfd that becomes readable at the stop and stays readable (it is never read), for
    /// a thread that waits in `poll` or `epoll`. Every call returns the same one; it is created
    /// on the first.
    pub fn event_fd(&self) -> io::Result<Arc<EventFd>> {
        let mut state = self.lock();
        if let Some(event) = &state.event {
            return Ok(Arc::clone(event));
        }
        let event = Arc::new(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?);
        if state.stopped {
            // As in `stop`: one write of 1 on a fresh eventfd cannot fail.
            let _ = event.write(1);
        }
        state.event = Some(Arc::clone(&event));
        Ok(event)
    }

    /// Waits until `fd` is readable, the signal stops, or `deadline` (if any) passes. A stop
    /// wins over a readable `fd`.
    pub fn wait_readable(&self, fd: RawFd, deadline: Option<Instant>) -> io::Result<Readiness> {
        let event = self.event_fd()?;
        let mut fds = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: event.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            let timeout_ms = match deadline {
                // Rounded up, so that a sub-millisecond remainder does not spin.
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
                }
                None => -1,
            };
            // SAFETY: `fds` is a valid, writable array of two `pollfd` that outlives the call,
            // and its length is passed exactly; both descriptors stay open meanwhile (`event`
            // is held, `fd` is the caller's).
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
            if ready < 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(error);
            }
            if fds[1].revents != 0 {
                return Ok(Readiness::Stopped);
            }
            if fds[0].revents != 0 {
                return Ok(Readiness::Readable);
            }
            return Ok(Readiness::TimedOut);
        }
    }
}

impl fmt::Debug for StopSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("StopSignal")
            .field("stopped", &state.stopped)
            .field("pokes", &state.pokes)
            .field("wakers", &state.wakers.len())
            .finish()
    }
}

/// How a thread of a [`Threads`] group ended, as far as its exit guard knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExitState {
    Running,
    Returned,
    Panicked,
}

/// A thread's exit state and the condvar its guard notifies.
struct Exit {
    state: Mutex<ExitState>,
    ended: Condvar,
}

impl Exit {
    /// Waits until the thread ends or `deadline` passes; returns its state then.
    fn wait_until(&self, deadline: Instant) -> ExitState {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let now = Instant::now();
            match *state {
                ExitState::Returned | ExitState::Panicked => return *state,
                ExitState::Running if now >= deadline => return *state,
                ExitState::Running => {}
            }
            state = self
                .ended
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn has_ended(&self) -> bool {
        let state = *self.state.lock().unwrap_or_else(|e| e.into_inner());
        match state {
            ExitState::Running => false,
            ExitState::Returned | ExitState::Panicked => true,
        }
    }
}

/// Records how its thread ended when dropped: at the end of the thread's body, or while the
/// thread unwinds from a panic.
struct ExitGuard(Arc<Exit>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        let ended = if std::thread::panicking() {
            ExitState::Panicked
        } else {
            ExitState::Returned
        };
        *self.0.state.lock().unwrap_or_else(|e| e.into_inner()) = ended;
        self.0.ended.notify_all();
    }
}

/// One started thread of a group.
struct Started {
    name: String,
    handle: JoinHandle<()>,
    exit: Arc<Exit>,
}

/// The threads [`Threads::join_within`] could not join cleanly, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use]
pub struct Unjoined {
    /// Threads still running at the deadline, left running.
    pub stuck: Vec<String>,
    /// Threads that ended by a panic.
    pub panicked: Vec<String>,
}

impl Unjoined {
    /// Whether every thread ended in time, without a panic.
    pub fn is_clean(&self) -> bool {
        self.stuck.is_empty() && self.panicked.is_empty()
    }

    /// Adds the names in `other`.
    pub fn extend(&mut self, other: Unjoined) {
        self.stuck.extend(other.stuck);
        self.panicked.extend(other.panicked);
    }

    /// Logs a warning per thread: "thread `writeback` did not stop within 5 s; leaving it",
    /// "thread `kcompressd-0` panicked".
    pub fn log(&self, bound: Duration) {
        for name in &self.stuck {
            warn!(
                "thread `{name}` did not stop within {} s; leaving it",
                seconds(bound)
            );
        }
        for name in &self.panicked {
            warn!("thread `{name}` panicked");
        }
    }
}

/// `5` for 5 s, `0.25` for 250 ms.
fn seconds(duration: Duration) -> String {
    if duration.subsec_nanos() == 0 {
        duration.as_secs().to_string()
    } else {
        duration.as_secs_f64().to_string()
    }
}

/// A group of named threads that watch one [`StopSignal`]. Dropping the group stops it and
/// joins its threads within [`STOP_BOUND`], naming in the log those that did not stop.
pub struct Threads {
    signal: StopSignal,
    started: Vec<Started>,
}

impl Threads {
    /// An empty group with a signal of its own.
    pub fn new() -> Threads {
        Threads::watching(StopSignal::new())
    }

    /// An empty group whose threads watch `signal`.
    pub fn watching(signal: StopSignal) -> Threads {
        Threads {
            signal,
            started: Vec::new(),
        }
    }

    /// The signal the group's threads watch.
    pub fn signal(&self) -> &StopSignal {
        &self.signal
    }

    /// Starts `body` on a thread named `name` (the name the log and `/proc` show; Linux keeps
    /// its first 15 bytes), giving it the group's signal.
    pub fn spawn<F>(&mut self, name: impl Into<String>, body: F) -> io::Result<()>
    where
        F: FnOnce(StopSignal) + Send + 'static,
    {
        let name = name.into();
        let exit = Arc::new(Exit {
            state: Mutex::new(ExitState::Running),
            ended: Condvar::new(),
        });
        let guard = ExitGuard(Arc::clone(&exit));
        let signal = self.signal.clone();
        let handle = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let _guard = guard;
                body(signal);
            })?;
        self.started.push(Started { name, handle, exit });
        Ok(())
    }

    /// Takes over the threads of `group`, whose signal from now on stops with this group's.
    pub fn adopt(&mut self, mut group: Threads) {
        self.signal.propagate_to(&group.signal);
        self.started.append(&mut group.started);
    }

    /// How many threads the group holds (running, or ended and not yet joined).
    pub fn len(&self) -> usize {
        self.started.len()
    }

    /// Whether the group holds no thread.
    pub fn is_empty(&self) -> bool {
        self.started.is_empty()
    }

    /// Joins the threads that have ended, without waiting for the others; returns those that
    /// panicked.
    pub fn join_ended(&mut self) -> Unjoined {
        let mut unjoined = Unjoined::default();
        let (ended, running): (Vec<Started>, Vec<Started>) = self
            .started
            .drain(..)
            .partition(|thread| thread.exit.has_ended());
        self.started = running;
        for thread in ended {
            if thread.handle.join().is_err() {
                unjoined.panicked.push(thread.name);
            }
        }
        unjoined
    }

    /// Joins every thread that ends by `deadline` and leaves the others running; returns the
    /// names of those left and of those that panicked. It does not stop the signal.
    pub fn join_within(&mut self, deadline: Instant) -> Unjoined {
        let mut unjoined = Unjoined::default();
        for thread in self.started.drain(..) {
            match thread.exit.wait_until(deadline) {
                ExitState::Running => unjoined.stuck.push(thread.name),
                ExitState::Returned | ExitState::Panicked => {
                    // The guard has run: what is left of the thread is its exit.
                    if thread.handle.join().is_err() {
                        unjoined.panicked.push(thread.name);
                    }
                }
            }
        }
        unjoined
    }

    /// Stops the signal, joins the threads within `bound`, and logs those that did not stop in
    /// time or panicked.
    pub fn stop_within(&mut self, bound: Duration) -> Unjoined {
        self.signal.stop();
        let unjoined = self.join_within(Instant::now() + bound);
        unjoined.log(bound);
        unjoined
    }
}

impl Default for Threads {
    fn default() -> Self {
        Threads::new()
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        if !self.started.is_empty() {
            let _ = self.stop_within(STOP_BOUND);
        }
    }
}

impl fmt::Debug for Threads {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Threads")
            .field("signal", &self.signal)
            .field(
                "threads",
                &self
                    .started
                    .iter()
                    .map(|thread| thread.name.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_ends_a_sleep_at_once_and_every_later_one() {
        let signal = StopSignal::new();
        let sleeper = signal.clone();
        let started = Instant::now();
        let thread = std::thread::spawn(move || sleeper.sleep(Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(20));

        signal.stop();

        assert!(!thread.join().unwrap());
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(signal.is_stopped());
        assert!(!signal.sleep(Duration::from_secs(30)));
    }

    #[test]
    fn a_poke_ends_one_sleep_early_and_is_counted() {
        let signal = StopSignal::new();
        signal.poke();
        let started = Instant::now();

        assert!(signal.sleep(Duration::from_secs(30)));
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(signal.pokes(), 1);
        assert!(
            signal.sleep(Duration::from_millis(10)),
            "a deadline is no stop"
        );
    }

    #[test]
    fn wakers_run_at_the_stop_or_at_once_after_it() {
        let signal = StopSignal::new();
        let ran = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&ran);
        signal.on_stop(move || flag.store(true, Ordering::Release));
        assert!(!ran.load(Ordering::Acquire));

        signal.stop();
        signal.stop();

        assert!(ran.load(Ordering::Acquire));
        let late = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&late);
        signal.on_stop(move || flag.store(true, Ordering::Release));
        assert!(late.load(Ordering::Acquire));
    }

    #[test]
    fn the_event_fd_wakes_a_poll_at_the_stop_even_when_created_after_it() {
        let (reader, _writer) = std::os::unix::net::UnixStream::pair().unwrap();
        let signal = StopSignal::new();
        let waiter = signal.clone();
        let fd = reader.as_raw_fd();
        let thread = std::thread::spawn(move || waiter.wait_readable(fd, None).unwrap());
        std::thread::sleep(Duration::from_millis(20));

        signal.stop();

        assert_eq!(thread.join().unwrap(), Readiness::Stopped);
        let late = StopSignal::new();
        late.stop();
        assert_eq!(late.wait_readable(fd, None).unwrap(), Readiness::Stopped);
        let deadline = Instant::now() + Duration::from_millis(10);
        assert_eq!(
            StopSignal::new().wait_readable(fd, Some(deadline)).unwrap(),
            Readiness::TimedOut
        );
    }

    #[test]
    fn join_within_names_a_stuck_thread_and_a_panicked_one_and_never_hangs() {
        let mut threads = Threads::new();
        threads
            .spawn(
                "obedient",
                |signal| while signal.sleep(Duration::from_secs(30)) {},
            )
            .unwrap();
        let release = StopSignal::new();
        let held = release.clone();
        threads.spawn("stuck", move |_| held.wait()).unwrap();
        threads.spawn("panicky", |_| panic!("on purpose")).unwrap();
        // The panic hook may take a while to print a backtrace before the thread unwinds.
        let unwound = threads.started[2]
            .exit
            .wait_until(Instant::now() + Duration::from_secs(30));
        assert_eq!(unwound, ExitState::Panicked);
        let started = Instant::now();

        let unjoined = threads.stop_within(Duration::from_millis(200));

        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(unjoined.stuck, ["stuck"]);
        assert_eq!(unjoined.panicked, ["panicky"]);
        assert!(threads.is_empty());
        release.stop();
    }

    #[test]
    fn an_adopted_group_stops_with_its_new_owner() {
        let mut owner = Threads::new();
        let mut group = Threads::new();
        group
            .spawn(
                "adopted",
                |signal| while signal.sleep(Duration::from_secs(30)) {},
            )
            .unwrap();
        let group_signal = group.signal().clone();

        owner.adopt(group);
        let unjoined = owner.stop_within(Duration::from_secs(5));

        assert!(unjoined.is_clean(), "{unjoined:?}");
        assert!(group_signal.is_stopped());
    }

    #[test]
    fn join_ended_joins_only_the_threads_that_ended() {
        let mut threads = Threads::new();
        threads.spawn("quick", |_| {}).unwrap();
        threads.spawn("waiting", |signal| signal.wait()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        assert_eq!(
            threads.started[0].exit.wait_until(deadline),
            ExitState::Returned
        );

        assert!(threads.join_ended().is_clean());

        assert_eq!(threads.len(), 1);
        assert!(threads.stop_within(STOP_BOUND).is_clean());
    }
}
