// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The vhost-user backend: queues, features and configuration space for the frontend.
//!
//! vhost-user-backend runs one thread per entry of [`VhostUserBackend::queues_per_thread`]; we
//! give each queue its own thread, so `N` queues are served by `N` threads in parallel over the
//! one shared store. Each thread owns a [`RequestRunner`] (page buffer, descriptor tables and
//! the table of requests in flight, allocated once), found by its thread index.
//!
//! The thread of a queue is the only one that writes the queue's used ring. Reads of
//! written-back pages run on read-back threads and come back through the queue's mailbox, an
//! eventfd registered with the queue thread's epoll loop ([`BlkBackend::attach`]); the queue
//! thread completes them like any other request.
//!
//! Stopping a queue — `GET_VRING_BASE`, `RESET_DEVICE`, a memory table change, a disconnect,
//! shutdown — first waits, bounded, until every request taken from its ring is on the used
//! ring or cancelled; when the message returns, nothing writes that queue's guest memory.
//!
//! A virtio reset (the guest reboots: `GET_VRING_BASE`, `RESET_DEVICE`, a new `SET_FEATURES`)
//! only forgets negotiated state; the store, and so the guest's data, stays.
//!
//! With `INFLIGHT_SHMFD` the frontend's inflight region ([`super::inflight`]) is shared by the
//! queue threads, each writing its queue's part; when a queue starts, the requests an earlier
//! daemon took and did not complete are served first. A frontend that hands over a region it
//! did not ask this daemon for comes back from an earlier daemon: unless the daemon said the
//! store is the one it had ([`Continuity::Recovered`]), every request fails with an I/O error.
//!
//! Queue hooks ([`QueueHooks`], [`BlkBackend::set_queue_hooks`]) let the daemon act when queues
//! start and stop, as a live migration's switchover needs. A queue starts at the first kick
//! its thread serves after the frontend set it up (the inflight region's resubmission
//! included): `before_start` runs there, on the queue's thread, before the queue's vring lock
//! is taken, and may wait; the frontend's messages that stop this queue wait with it. When it
//! fails, the start is refused for this queue only: the sentence is logged at error level, and
//! every request on the queue, resubmitted or new, completes with `VIRTIO_BLK_S_IOERR` without
//! reaching the store (as [`BlkBackend::refuse`] does for the device) until the frontend stops
//! the queue; the next start asks again. The frontend sees a device that answers every
//! request with an I/O error, never stale or zeroed data. `after_stop` runs once a stop is
//! complete — in `GET_VRING_BASE` just before the answer, in `RESET_DEVICE` for every queue, and
//! at a disconnect for every queue that was running — with every request taken from the queue
//! on the used ring or cancelled. `all_stopped` says no queue is running (started and not
//! stopped since); a frontend that stops queues that never ran gets it more than once.
//!
//! Dirty logging: the device offers `VHOST_F_LOG_ALL` and `LOG_SHMFD`, so a frontend can
//! live-migrate the VM. Guest memory carries vhost-user-backend's [`BitmapMmapRegion`] per
//! region ([`GuestMap`]); it marks nothing until the frontend hands over its log with
//! `SET_LOG_BASE`, then every write the daemon makes through vm-memory marks its 4 KiB pages:
//! copied read data (on the queue threads and the read-back threads alike), status bytes and
//! used rings (virtio-queue writes them through the same map). Pages decompressed straight into
//! guest memory bypass vm-memory and are marked by `request::lend_guest_page` once written.
//! Without a log the mark costs one uncontended read lock per write. vhost-user-backend keeps
//! marking after the frontend drops `LOG_ALL` (into a log nobody reads any more) until the
//! next `SET_LOG_BASE` or a new memory map.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserProtocolFeatures, VHOST_USER_CONFIG_OFFSET,
};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::config::DeviceConfig;
use super::inflight::{self, InflightRegion, QueueStart};
use super::ratelimit::{RateLimiter, WARNINGS_PER_SECOND};
use super::read_back::{ReadBack, STOP_TIMEOUT};
use super::request::{Next, RequestRunner};
use super::request_stats::RequestStats;
use super::BlockBackend;
use crate::stop::Unjoined;

/// One map of guest memory, each region carrying the dirty log of a live migration: a
/// [`BitmapMmapRegion`] marks nothing until the frontend hands over a log (`SET_LOG_BASE`),
/// then marks every page the daemon writes through vm-memory.
pub type GuestMap = GuestMemoryMmap<BitmapMmapRegion>;

/// Guest memory as vhost-user-backend hands it over, with the dirty log ([`GuestMap`]).
pub type GuestMemory = GuestMemoryAtomic<GuestMap>;

/// A queue as vhost-user-backend hands it to the queue threads, over [`GuestMemory`].
type Vring = VringRwLock<GuestMemory>;

/// The virtio-blk vhost-user backend over a [`BlockBackend`].
pub struct BlkBackend<S: BlockBackend> {
    store: Arc<S>,
    device: DeviceConfig,
    /// The same `GuestMemoryAtomic` the vhost-user handler swaps new maps into, so a queue
    /// thread's `memory()` is one atomic load and never waits for a lock.
    mem: GuestMemory,
    acked_features: AtomicU64,
    frontend_spoke: AtomicBool,
    stopping: AtomicBool,
    /// Set while a frontend is connected (the metrics' `connected` gauge).
    connected: Mutex<Option<Arc<AtomicBool>>>,
    /// The longest a queue thread polls its ring after serving, nanoseconds (0: never).
    poll_max_ns: AtomicU64,
    /// Queue threads in a round of requests now.
    serving: AtomicUsize,
    /// The CPUs the daemon may run on.
    cpus: usize,
    log_limiter: Arc<Mutex<RateLimiter>>,
    queues: Vec<Mutex<QueueThread>>,
    /// Threads that serve reads of written-back pages off the queue threads (only when the
    /// store has a backing file).
    read_back: Option<ReadBack<S>>,
    /// How long stopping a queue waits for its requests, milliseconds.
    stop_timeout_ms: AtomicU64,
    /// The last memory map the backend accepted, to go back to when a change is refused.
    accepted_map: Mutex<GuestMap>,
    /// When the memory map was last logged at info level, and the changes since then.
    map_log: Mutex<MapLog>,
    /// Whether this connection's frontend asked for a new region (`GET_INFLIGHT_FD`).
    inflight_requested: AtomicBool,
    /// Whether the frontend handed over a region without asking for one first: it comes back
    /// from an earlier daemon.
    frontend_returned: AtomicBool,
    /// Whether the store holds the pages of the frontend's device ([`Continuity`]).
    recovered: AtomicBool,
    /// Whether every request is answered with an I/O error ([`BlkBackend::refuse`]).
    refusing: AtomicBool,
    /// The daemon's decision on whose pages the store holds, made once, when the frontend
    /// first uses the device ([`BlkBackend::set_admission`]).
    admission: Mutex<Option<Admission>>,
    /// Told when a queue starts and stops ([`BlkBackend::set_queue_hooks`]).
    hooks: Mutex<Option<Arc<dyn QueueHooks>>>,
    /// Per queue: started (its first kick served) and not stopped since.
    running: Vec<AtomicBool>,
}

/// Decides, when the frontend first uses the device, whether the store holds its pages; `Err`
/// refuses the device with the reason given.
type Admission = Box<dyn FnOnce() -> Result<Continuity, String> + Send>;

/// Whether the store a backend serves is the one the frontend used before, which the daemon
/// tells the backend before it serves a connection ([`BlkBackend::set_continuity`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Continuity {
    /// The store is new: a frontend coming back from an earlier daemon would find none of its
    /// pages, so its requests are refused.
    #[default]
    Fresh,
    /// The store holds the pages the frontend's device had: requests an earlier daemon took
    /// and did not complete are resubmitted.
    Recovered,
}

/// The memory slots the device advertises (`GET_MAX_MEM_SLOTS`, answered by
/// vhost-user-backend): a frontend may hold at most this many regions at once.
pub const MAX_MEM_SLOTS: usize = 509;

/// At most one info line about the guest memory map per this interval; a frontend that
/// churns regions is summarised, not logged change by change.
const MAP_LOG_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
struct MapLog {
    logged_at: Option<Instant>,
    unlogged_changes: u64,
}

/// A queue thread's state: its request runner, its polling window, and whether the guest
/// broke its queue.
struct QueueThread {
    runner: RequestRunner,
    poll: AdaptivePoll,
    /// Set when the guest's ring indices are impossible; the queue is not served again until
    /// the frontend stops it (`GET_VRING_BASE`, as on every virtio reset) or resets the device.
    broken: bool,
    /// Whether the queue's first kick since it was (re)started has been logged.
    announced: bool,
    /// Set when [`QueueHooks::before_start`] failed for this start: every request on the queue
    /// fails with an I/O error until the frontend stops it.
    start_refused: bool,
}

impl QueueThread {
    /// Forgets the queue's start: the next kick starts it afresh (hooks, inflight region).
    fn stopped(&mut self) {
        self.broken = false;
        self.announced = false;
        self.start_refused = false;
    }
}

/// Called by the backend around its queues' lifetime; the daemon's migration uses it
/// ([`BlkBackend::set_queue_hooks`]).
pub trait QueueHooks: Send + Sync {
    /// Before queue `queue` serves its first request after a start (the frontend's
    /// `SET_VRING_KICK` / enable, including restarts after `GET_VRING_BASE`), on the queue's
    /// thread, at the first kick it serves. May block (bounded by the implementation); a stop
    /// of this queue waits for it. `Err(sentence)`: the queue must not serve at all —
    /// the start fails: the sentence is logged, and every request on that queue fails
    /// (`VIRTIO_BLK_S_IOERR`) rather than being served; nothing is read from or written to
    /// the store.
    fn before_start(&self, queue: usize) -> Result<(), String>;
    /// After a queue stopped (`GET_VRING_BASE`, just before the answer goes out;
    /// `RESET_DEVICE`; disconnect): every request taken from it is complete (on the used ring,
    /// or cancelled when the bounded wait ran out). `all_stopped` is true when no queue is
    /// running any more; a frontend that stops queues that never ran may make it true more
    /// than once. Runs on the frontend's message thread: the answer waits for it.
    fn after_stop(&self, queue: usize, all_stopped: bool);
}

impl<S: BlockBackend + 'static> BlkBackend<S> {
    /// A backend serving `store` as the device `device` describes.
    pub fn new(store: Arc<S>, device: DeviceConfig, mem: GuestMemory) -> Self {
        let log_limiter = Arc::new(Mutex::new(RateLimiter::new(WARNINGS_PER_SECOND)));
        let device_queues = device.num_queues;
        let queues = (0..device.num_queues)
            .map(|_| {
                Mutex::new(QueueThread {
                    runner: RequestRunner::new(&device, log_limiter.clone()),
                    poll: AdaptivePoll::default(),
                    broken: false,
                    announced: false,
                    start_refused: false,
                })
            })
            .collect();
        let read_back = if store.may_read_slowly() {
            ReadBack::start(Arc::clone(&store), device.clone(), log_limiter.clone())
                .map_err(|e| {
                    error!("cannot start the read-back threads, reading on the queues: {e}")
                })
                .ok()
        } else {
            None
        };
        BlkBackend {
            store,
            device,
            mem,
            read_back,
            acked_features: AtomicU64::new(0),
            frontend_spoke: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            connected: Mutex::new(None),
            poll_max_ns: AtomicU64::new(0),
            serving: AtomicUsize::new(0),
            cpus: std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            log_limiter,
            queues,
            stop_timeout_ms: AtomicU64::new(duration_ms(STOP_TIMEOUT)),
            accepted_map: Mutex::new(GuestMap::new()),
            map_log: Mutex::new(MapLog::default()),
            inflight_requested: AtomicBool::new(false),
            frontend_returned: AtomicBool::new(false),
            recovered: AtomicBool::new(false),
            refusing: AtomicBool::new(false),
            admission: Mutex::new(None),
            hooks: Mutex::new(None),
            running: (0..device_queues).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// Sets the decision the daemon makes about the next frontend (see [`Continuity`]). It
    /// runs once, at the first message that uses the device — `SET_FEATURES`,
    /// `GET_INFLIGHT_FD`, `SET_INFLIGHT_FD` or a memory table —, before any request can be
    /// served: a connection that only probes the socket, or only asks what the device offers,
    /// decides nothing (and so destroys nothing). `Err(reason)` refuses the device.
    pub fn set_admission(
        &self,
        decide: impl FnOnce() -> Result<Continuity, String> + Send + 'static,
    ) {
        if let Ok(mut slot) = self.admission.lock() {
            *slot = Some(Box::new(decide));
        }
    }

    /// Sets the hooks told when a queue starts and stops (`None`: none). Queues started before
    /// the call are not announced again.
    pub fn set_queue_hooks(&self, hooks: Option<Arc<dyn QueueHooks>>) {
        if let Ok(mut slot) = self.hooks.lock() {
            *slot = hooks;
        }
    }

    fn queue_hooks(&self) -> Option<Arc<dyn QueueHooks>> {
        self.hooks.lock().ok().and_then(|hooks| hooks.clone())
    }

    /// Marks queue `queue` as started and asks the hooks whether it may serve; returns whether
    /// its start is refused.
    fn start_hooks(&self, queue: usize) -> bool {
        if let Some(running) = self.running.get(queue) {
            running.store(true, Ordering::Release);
        }
        let Some(hooks) = self.queue_hooks() else {
            return false;
        };
        match hooks.before_start(queue) {
            Ok(()) => false,
            Err(reason) => {
                error!(
                    "queue {queue} cannot start: {reason}; every request on it fails with an \
                     I/O error until the frontend stops it"
                );
                true
            }
        }
    }

    /// Tells the hooks that queue `queue` stopped (its requests are complete or cancelled).
    fn stop_hooks(&self, queue: usize) {
        let Some(running) = self.running.get(queue) else {
            return;
        };
        running.store(false, Ordering::Release);
        if let Some(hooks) = self.queue_hooks() {
            let all_stopped = !self
                .running
                .iter()
                .any(|running| running.load(Ordering::Acquire));
            hooks.after_stop(queue, all_stopped);
        }
    }

    /// Runs the admission decision if it has not run yet.
    fn admit(&self) {
        let decide = match self.admission.lock() {
            Ok(mut slot) => slot.take(),
            Err(_) => None,
        };
        if let Some(decide) = decide {
            match decide() {
                Ok(continuity) => self.set_continuity(continuity),
                Err(reason) => self.refuse(reason),
            }
        }
    }

    /// Says whether the store is the one the next frontend used before (default
    /// [`Continuity::Fresh`]). The daemon calls this before it serves a connection.
    pub fn set_continuity(&self, continuity: Continuity) {
        let recovered = match continuity {
            Continuity::Fresh => false,
            Continuity::Recovered => true,
        };
        self.recovered.store(recovered, Ordering::Release);
    }

    /// Refuses the device at once: from now on every request, resubmitted or new, completes
    /// with `VIRTIO_BLK_S_IOERR` and nothing is read from or written to the store. The daemon
    /// calls this when the frontend is one whose state it could not recover; `reason` says
    /// why, in the one error line this logs.
    pub fn refuse(&self, reason: String) {
        if !self.refusing.swap(true, Ordering::AcqRel) {
            error!(
                "refusing the device: {reason}; every request fails with an I/O error so the \
                 guest reports it instead of reading zeros"
            );
        }
    }

    /// Whether the frontend handed over an inflight region it did not ask this daemon for
    /// (`SET_INFLIGHT_FD` without `GET_INFLIGHT_FD`): it comes back from an earlier daemon.
    pub fn frontend_returned(&self) -> bool {
        self.frontend_returned.load(Ordering::Acquire)
    }

    /// Whether the device is refused ([`refuse`](Self::refuse), or a frontend that returned
    /// to a fresh store).
    pub fn is_refusing(&self) -> bool {
        self.refusing.load(Ordering::Acquire)
    }

    /// Registers each queue's mailbox with the epoll loop of the thread that serves the queue,
    /// so that reads of written-back pages can be served off the queue threads. Until this is
    /// called every read runs on its queue thread. Call it once, after creating the daemon
    /// and before serving.
    pub fn attach(&self, daemon: &VhostUserDaemon<Arc<Self>>) -> io::Result<()> {
        let Some(read_back) = &self.read_back else {
            return Ok(());
        };
        let handlers = daemon.get_epoll_handlers();
        for queue in 0..usize::from(self.device.num_queues) {
            // Queue i is served by thread i (`queues_per_thread`).
            let (Some(handler), Some(fd)) = (handlers.get(queue), read_back.mailbox_fd(queue))
            else {
                return Err(io::Error::other(format!(
                    "no epoll thread for queue {queue}"
                )));
            };
            handler.register_listener(fd, EventSet::IN, self.mailbox_event(queue))?;
        }
        read_back.attached();
        Ok(())
    }

    /// The epoll event number of queue `queue`'s mailbox: past the queues and the exit event,
    /// which vhost-user-backend reserves.
    fn mailbox_event(&self, queue: usize) -> u64 {
        u64::from(self.device.num_queues) + 1 + queue as u64
    }

    /// Sets how long stopping a queue waits for requests still running before it cancels them
    /// (default [`STOP_TIMEOUT`]).
    pub fn set_stop_timeout(&self, timeout: Duration) {
        self.stop_timeout_ms
            .store(duration_ms(timeout), Ordering::Relaxed);
    }

    fn stop_timeout(&self) -> Duration {
        Duration::from_millis(self.stop_timeout_ms.load(Ordering::Relaxed))
    }

    /// Stops queue `queue`: waits until every request taken from its ring is on the used ring
    /// (bounded), cancels the rest and forgets them. Afterwards nothing writes the queue's
    /// guest memory until it is served again.
    fn stop_queue(&self, queue: usize) {
        if let Some(read_back) = &self.read_back {
            read_back.stop_queue(queue, self.stop_timeout());
        }
        if let Some(Ok(mut thread)) = self.queues.get(queue).map(Mutex::lock) {
            let cancelled = thread.runner.in_flight();
            if cancelled > 0 {
                warn!("queue {queue} stopped with {cancelled} request(s) cancelled");
                thread.runner.forget_in_flight();
            }
        }
    }

    /// Counts every request into `requests` (queue `i` in slot `i`) and reports whether a
    /// frontend is connected in `connected`, for the control socket and the metrics.
    pub fn observe(&self, requests: &Arc<RequestStats>, connected: Arc<AtomicBool>) {
        for (queue, thread) in self.queues.iter().enumerate() {
            if let Ok(mut thread) = thread.lock() {
                thread.runner.record_into(requests.clone(), queue);
            }
        }
        if let Ok(mut slot) = self.connected.lock() {
            *slot = Some(connected);
        }
    }

    /// Lets each queue thread poll its ring for up to `max` after serving before it sleeps
    /// (adaptively: the window shrinks while polling finds nothing). Zero disables polling.
    pub fn set_poll_max(&self, max: Duration) {
        let ns = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
        self.poll_max_ns.store(ns, Ordering::Relaxed);
    }

    /// Makes every queue thread return from serving at its next request, so that shutdown
    /// never waits for a guest that keeps its queues full; cancels every read still running
    /// off the queue threads (nothing writes guest memory afterwards) and joins the read-back
    /// threads within `bound`. Returns (and logs) the threads that did not stop by then.
    pub fn stop(&self, bound: Duration) -> Unjoined {
        self.stopping.store(true, Ordering::Release);
        match &self.read_back {
            Some(read_back) => read_back.shutdown(bound),
            None => Unjoined::default(),
        }
    }

    /// The frontend went away: cancels every read still running off the queue threads at once,
    /// so nothing writes its guest memory afterwards.
    pub fn disconnected(&self) {
        if let Some(read_back) = &self.read_back {
            read_back.cancel_all();
        }
        // A queue thread still busy (a frontend that keeps its rings moving after it closed
        // the socket) is not waited for: its table goes with the connection anyway.
        for queue in &self.queues {
            if let Ok(mut thread) = queue.try_lock() {
                thread.runner.forget_in_flight();
            }
        }
        for queue in 0..self.queues.len() {
            if self
                .running
                .get(queue)
                .is_some_and(|r| r.load(Ordering::Acquire))
            {
                self.stop_hooks(queue);
            }
        }
        // The next connection is another frontend: it asks for its own region.
        self.inflight_requested.store(false, Ordering::Release);
    }

    /// The device description.
    pub fn device(&self) -> &DeviceConfig {
        &self.device
    }

    /// Whether a frontend has sent a vhost-user message (every frontend starts with
    /// `GET_FEATURES`). A connection that closes without one was a liveness probe.
    pub fn frontend_spoke(&self) -> bool {
        self.frontend_spoke.load(Ordering::Acquire)
    }

    /// The features the frontend acknowledged last (0 after a reset).
    pub fn acked_features(&self) -> u64 {
        self.acked_features.load(Ordering::Acquire)
    }

    /// Serves the queue `vring` on worker `thread_id` until it is empty, with notifications
    /// suppressed while we work when EVENT_IDX is on.
    fn serve_queue(&self, vring: &Vring, thread_id: usize) -> Result<(), ServeError> {
        let mut queue_thread = self
            .queues
            .get(thread_id)
            .ok_or(ServeError::NoWorker(thread_id))?
            .lock()
            .map_err(|_| ServeError::Poisoned)?;
        let QueueThread {
            runner,
            poll,
            broken,
            announced,
            start_refused,
        } = &mut *queue_thread;
        if *broken {
            return Ok(());
        }
        if !*announced {
            // Before the vring lock: a hook that waits must not hold up the frontend's other
            // queues' messages.
            *start_refused = self.start_hooks(thread_id);
        }
        let poll_max = self.poll_max_ns.load(Ordering::Relaxed);
        poll.woke(poll_max);
        runner.set_refusing(self.refusing.load(Ordering::Acquire) || *start_refused);
        let mut state = vring.get_mut();
        if !*announced {
            *announced = true;
            let mem = self.mem.memory();
            match runner.start_queue(state.get_queue_mut(), &*mem) {
                Ok(None | Some(QueueStart::Fresh)) => {}
                Ok(Some(QueueStart::Cleared {
                    region_used,
                    ring_used,
                })) => info!(
                    "queue {thread_id}: the inflight region's used index {region_used} does not \
                     follow the ring's {ring_used} (the ring was reset); the region is cleared \
                     and nothing is resubmitted"
                ),
                Ok(Some(QueueStart::Resumed {
                    next_avail,
                    last_batch_completed,
                    ..
                })) => {
                    let pending = runner.resubmit_pending();
                    let last = if last_batch_completed {
                        " (its last completion had reached the used ring)"
                    } else {
                        ""
                    };
                    if pending > 0 {
                        info!(
                            "queue {thread_id}: resubmitting {pending} request(s) an earlier \
                             daemon took and did not complete{last}; the ring goes on at avail \
                             index {next_avail}"
                        );
                    } else {
                        debug!(
                            "queue {thread_id}: no request in flight in the inflight region{last}"
                        );
                    }
                }
                Err(start_error) => {
                    error!(
                        "queue {thread_id}: {}; the queue is not served until the frontend \
                         sets it up again",
                        super::request::ErrorChain(&start_error)
                    );
                    *broken = true;
                    return Ok(());
                }
            }
            let queue = state.get_queue();
            info!(
                "queue {thread_id} started: {} entries, event index {}",
                queue.size(),
                if queue.event_idx_enabled() {
                    "on"
                } else {
                    "off"
                }
            );
        }
        loop {
            // Suppressed while we serve and poll: the used flags without EVENT_IDX, the avail
            // event with it.
            state.disable_notification().map_err(ServeError::Queue)?;
            // Completed and not yet signalled.
            let mut unsignalled = 0usize;
            // Ends (waking the workers for what the round queued) after the guest is signalled,
            // or on any early return.
            let round = Round::begin(&*self.store, &self.serving, self.cpus);
            loop {
                if self.stopping.load(Ordering::Acquire) {
                    return Ok(());
                }
                // `refuse` takes effect at the next request.
                runner.set_refusing(self.refusing.load(Ordering::Acquire) || *start_refused);
                // A fresh memory snapshot for every request (one atomic load): a region the
                // frontend adds while this queue is busy serves the very next request.
                let mem = self.mem.memory();
                let queue = state.get_queue_mut();
                if let Err(error) = check_avail_index(queue, &*mem) {
                    // Checked here so that a guest that sets avail->idx far ahead is refused
                    // once, not logged by virtio-queue at every kick.
                    *broken = true;
                    self.store.count_invalid_io();
                    return Err(error);
                }
                let next = match &self.read_back {
                    Some(read_back) => runner.process_next(
                        queue,
                        &*mem,
                        &*self.store,
                        &self.device,
                        Some(&mut |request| {
                            read_back.submit(request, thread_id, mem.clone().into_inner())
                        }),
                    ),
                    None => runner.process_next(queue, &*mem, &*self.store, &self.device, None),
                }
                .map_err(ServeError::Queue)?;
                match next {
                    Next::Empty => break,
                    Next::Completed => {
                        unsignalled += 1;
                        // Signal early in a long round when the guest has a CPU to act on it
                        // while we go on (DESIGN.md, "Signalling the guest").
                        if unsignalled >= EARLY_SIGNAL_AFTER
                            && round.spare_cpu()
                            && state.needs_notification().map_err(ServeError::Queue)?
                        {
                            signal_without_blocking(&state)?;
                            unsignalled = 0;
                        }
                    }
                    // Comes back through the mailbox; completed and signalled then.
                    Next::Deferred => {}
                }
            }
            // One interrupt for everything this round completed since the last.
            if unsignalled > 0 && state.needs_notification().map_err(ServeError::Queue)? {
                signal_without_blocking(&state)?;
            }
            drop(round);
            if poll.window_ns > 0 {
                let mem = self.mem.memory();
                let queue = state.get_queue();
                let found = poll.spin(|| {
                    self.stopping.load(Ordering::Relaxed)
                        || queue
                            .avail_idx(&*mem, Ordering::Acquire)
                            .is_ok_and(|idx| idx.0 != queue.next_avail())
                });
                poll.adapt(found, poll_max);
                if found {
                    continue;
                }
            }
            // Re-enabling notifications reports whether the guest added requests meanwhile;
            // serve those before sleeping.
            if !state.enable_notification().map_err(ServeError::Queue)? {
                poll.sleeping();
                return Ok(());
            }
        }
    }

    /// On the thread of queue `queue`: completes the reads that came back from the read-back
    /// threads, and signals the guest once for all of them.
    fn land_finished_reads(&self, vring: &Vring, queue: usize) -> Result<(), ServeError> {
        let Some(read_back) = &self.read_back else {
            return Ok(());
        };
        let mut queue_thread = self
            .queues
            .get(queue)
            .ok_or(ServeError::NoWorker(queue))?
            .lock()
            .map_err(|_| ServeError::Poisoned)?;
        let runner = &mut queue_thread.runner;
        let mut state = vring.get_mut();
        let mem = self.mem.memory();
        let mut failure = None;
        // Both closures need the runner; they never run at the same time.
        let runner = std::cell::RefCell::new(runner);
        let completed = read_back.land(
            queue,
            |request| {
                let added = runner.borrow_mut().complete(
                    state.get_queue_mut(),
                    &*mem,
                    &*self.store,
                    request,
                );
                if let Err(error) = added {
                    failure = Some(error);
                }
            },
            |request| runner.borrow_mut().discard(request),
        );
        if let Some(error) = failure {
            return Err(ServeError::Queue(error));
        }
        if completed > 0 && state.needs_notification().map_err(ServeError::Queue)? {
            signal_without_blocking(&state)?;
        }
        Ok(())
    }

    fn warn_limited(&self, message: std::fmt::Arguments<'_>) {
        let _ = super::ratelimit::warn_limited(&self.log_limiter, message);
    }

    /// Logs the new memory map: its totals at info level at most once per
    /// [`MAP_LOG_INTERVAL`] (with the number of changes in between), every region at debug.
    fn log_map_change(&self) {
        let Ok(mut log) = self.map_log.lock() else {
            return;
        };
        let now = Instant::now();
        let due = log
            .logged_at
            .is_none_or(|at| now.duration_since(at) >= MAP_LOG_INTERVAL);
        let changes = std::mem::take(&mut log.unlogged_changes);
        if due {
            log.logged_at = Some(now);
        } else {
            log.unlogged_changes = changes + 1;
        }
        drop(log);
        log_regions(&self.mem, due.then_some(changes));
    }
}

/// Where queue `queue` is among the vrings of thread `thread_id`, as vhost-user-backend hands
/// them to `handle_event`: with one queue a thread ([`BlkBackend::queues_per_thread`]) queue
/// `q` is the first (and only) vring of thread `q`; `None` for another thread's queue.
fn local_index(queue: usize, thread_id: usize) -> Option<usize> {
    (queue == thread_id).then_some(0)
}

fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Completions in one round after which a queue thread signals the guest without waiting for
/// the round's end, when a CPU is spare. Measured with the bench tool (1 GiB swap-like, random
/// 4 KiB reads, queue depth 32, 2 CPUs): one queue went from 163-193k IOPS signalling only at
/// the end of a round to 261-307k signalling every 8 (4 and 16 did as well; 1 cost CPU), p50
/// from 156-188 µs to 102-115 µs; with two queues busy on two CPUs, signalling early every 16
/// cost 8-17 % of the IOPS, hence the spare-CPU condition.
const EARLY_SIGNAL_AFTER: usize = 8;

/// A round of requests on a queue thread: [`BlockBackend::begin_round`] and one more queue
/// thread serving when made, [`BlockBackend::end_round`] and one fewer when dropped, however
/// the round ends.
struct Round<'a, S: BlockBackend> {
    store: &'a S,
    serving: &'a AtomicUsize,
    cpus: usize,
}

impl<'a, S: BlockBackend> Round<'a, S> {
    fn begin(store: &'a S, serving: &'a AtomicUsize, cpus: usize) -> Self {
        store.begin_round();
        serving.fetch_add(1, Ordering::Relaxed);
        Round {
            store,
            serving,
            cpus,
        }
    }

    /// Whether a CPU is left for the guest to act on an interrupt while this thread goes on
    /// serving: fewer queue threads are serving, and the backend's own threads busy, than the
    /// daemon may run on.
    fn spare_cpu(&self) -> bool {
        self.serving.load(Ordering::Relaxed) + self.store.busy_threads() < self.cpus
    }
}

impl<S: BlockBackend> Drop for Round<'_, S> {
    fn drop(&mut self) {
        self.serving.fetch_sub(1, Ordering::Relaxed);
        self.store.end_round();
    }
}

/// Adaptive polling of one queue, as QEMU's iothreads (`poll-max-ns`) do it: after serving,
/// the queue thread keeps reading the avail index for up to `window_ns` before it re-enables
/// notifications and sleeps. The window doubles (up to the maximum) when polling found work
/// or when the thread was woken sooner than the maximum after it went to sleep — polling would
/// have caught that request without the wake-up — and halves when a whole window passed in
/// vain, so an idle or slow guest costs no polling at all.
#[derive(Debug, Default)]
struct AdaptivePoll {
    window_ns: u64,
    asleep_since: Option<Instant>,
}

/// The first window after polling was off: long enough to catch a request in flight.
const POLL_START_NS: u64 = 4_000;

impl AdaptivePoll {
    /// Called when a kick wakes the thread.
    fn woke(&mut self, max_ns: u64) {
        if max_ns == 0 {
            self.window_ns = 0;
            return;
        }
        if let Some(since) = self.asleep_since.take() {
            let slept = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
            if slept < max_ns {
                self.window_ns = (self.window_ns.max(POLL_START_NS / 2) * 2).min(max_ns);
            }
        }
    }

    /// Spins until `ready` says so or the window passes; returns whether it did.
    fn spin(&self, mut ready: impl FnMut() -> bool) -> bool {
        let start = Instant::now();
        let window = Duration::from_nanos(self.window_ns);
        loop {
            if ready() {
                return true;
            }
            if start.elapsed() >= window {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    fn adapt(&mut self, found: bool, max_ns: u64) {
        self.window_ns = if found {
            (self.window_ns * 2).min(max_ns)
        } else {
            self.window_ns / 2
        };
        if self.window_ns < POLL_START_NS / 4 {
            self.window_ns = 0;
        }
    }

    fn sleeping(&mut self) {
        self.asleep_since = Some(Instant::now());
    }
}

/// Refuses a queue whose avail index is more than a ring ahead of the device's: the guest
/// (or frontend) broke it, and nothing in it can be trusted until it is set up again.
fn check_avail_index<M: GuestMemoryBackend>(
    queue: &virtio_queue::Queue,
    mem: &M,
) -> Result<(), ServeError> {
    let avail = queue
        .avail_idx(mem, Ordering::Acquire)
        .map_err(ServeError::Queue)?;
    let pending = avail - std::num::Wrapping(queue.next_avail());
    if pending.0 > queue.size() {
        return Err(ServeError::AvailAhead {
            avail: avail.0,
            next: queue.next_avail(),
            size: queue.size(),
        });
    }
    Ok(())
}

/// Signals the guest through the call eventfd without ever blocking on it: the frontend may
/// hand over any fd (a full pipe blocks a write forever), so the fd is made non-blocking first
/// and a write that would block is dropped (the guest misses one interrupt; its own timeout
/// or the next completion recovers it).
fn signal_without_blocking(
    state: &vhost_user_backend::VringState<GuestMemory>,
) -> Result<(), ServeError> {
    if let Some(call) = state.get_call() {
        let fd = call.as_raw_fd();
        // SAFETY: F_GETFL/F_SETFL on an fd the vring owns for the duration of this call; they
        // read and change only the open file's status flags.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags >= 0 && flags & libc::O_NONBLOCK == 0 {
                libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
            }
        }
    }
    state.signal_used_queue().map_err(ServeError::Signal)
}

/// Why a queue could not be served.
#[derive(Debug, thiserror::Error)]
pub(super) enum ServeError {
    /// The guest's queue structures are inconsistent.
    #[error("the virtqueue is broken")]
    Queue(#[source] virtio_queue::Error),
    /// The guest published more requests than the ring holds.
    #[error(
        "the guest's avail index {avail} is more than the queue size {size} ahead of the \
         device's {next}; the queue is ignored until the frontend sets it up again"
    )]
    AvailAhead {
        /// The avail index the guest wrote.
        avail: u16,
        /// The next index the device would serve.
        next: u16,
        /// The queue size.
        size: u16,
    },
    /// The call eventfd failed.
    #[error("cannot notify the guest")]
    Signal(#[source] io::Error),
    /// An event for a thread we did not create.
    #[error("no worker for thread {0}")]
    NoWorker(usize),
    /// A worker panicked earlier.
    #[error("a lock was poisoned by a panicked worker")]
    Poisoned,
}

impl<S: BlockBackend + 'static> VhostUserBackend for BlkBackend<S> {
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.device.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.device.queue_size)
    }

    fn features(&self) -> u64 {
        if !self.frontend_spoke.swap(true, Ordering::AcqRel) {
            info!("a frontend connected");
            if let Ok(Some(connected)) = self.connected.lock().as_deref() {
                connected.store(true, Ordering::Release);
            }
        }
        self.device.features()
    }

    fn acked_features(&self, features: u64) {
        self.admit();
        // Logged once per negotiation: a frontend may repeat SET_FEATURES with the same bits
        // (QEMU does when it starts the device); a reset clears them, so a rebooted guest's
        // negotiation is logged again.
        let previous = self.acked_features.swap(features, Ordering::AcqRel);
        let names = super::config::feature_names(features);
        if previous == features {
            debug!("the frontend set the same virtio features again: {names}");
        } else {
            info!("the frontend negotiated virtio features {names}");
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.frontend_spoke.store(true, Ordering::Release);
        DeviceConfig::protocol_features()
    }

    fn get_inflight_fd(&self, asked: &VhostUserInflight) -> io::Result<(VhostUserInflight, File)> {
        self.admit();
        let (file, len) = inflight::create_region(
            asked.num_queues,
            asked.queue_size,
            self.device.num_queues,
            self.device.queue_size,
        )
        .map_err(|error| refused_region(&error))?;
        self.inflight_requested.store(true, Ordering::Release);
        debug!(
            "made an inflight region of {len} bytes for {} queue(s) of {} entries",
            asked.num_queues, asked.queue_size
        );
        let answer = VhostUserInflight {
            mmap_size: len,
            mmap_offset: 0,
            num_queues: asked.num_queues,
            queue_size: asked.queue_size,
        };
        Ok((answer, file))
    }

    fn set_inflight_fd(&self, given: &VhostUserInflight, file: File) -> io::Result<()> {
        self.admit();
        let region = InflightRegion::map(
            &file,
            given.mmap_size,
            given.mmap_offset,
            given.num_queues,
            given.queue_size,
            self.device.num_queues,
            self.device.queue_size,
        )
        .map_err(|error| refused_region(&error))?;
        drop(file);
        let region = Arc::new(region);
        for (index, thread) in (0u16..).zip(&self.queues) {
            let mut thread = thread
                .lock()
                .map_err(|_| io::Error::other("a queue thread panicked; its lock is poisoned"))?;
            thread.runner.track_inflight(region.queue(index));
        }
        if self.inflight_requested.load(Ordering::Acquire) {
            return Ok(());
        }
        self.frontend_returned.store(true, Ordering::Release);
        if self.recovered.load(Ordering::Acquire) {
            info!(
                "the frontend comes back with the inflight region of an earlier daemon; its \
                 requests are resubmitted when the queues start"
            );
        } else if !self.refusing.swap(true, Ordering::AcqRel) {
            error!(
                "the frontend comes back with requests from an earlier daemon, but this daemon \
                 does not hold that device's pages (it started with a fresh store); every \
                 request fails with an I/O error so the guest reports it instead of reading \
                 zeros"
            );
        }
        Ok(())
    }

    fn reset_device(&self) {
        debug!("virtio reset: forgetting negotiated features, keeping the data");
        for queue in 0..self.queues.len() {
            self.stop_queue(queue);
        }
        self.acked_features.store(0, Ordering::Release);
        for thread in &self.queues {
            if let Ok(mut thread) = thread.lock() {
                thread.stopped();
            }
        }
        for queue in 0..self.queues.len() {
            self.stop_hooks(queue);
        }
    }

    fn stop_vring(&self, index: u32) -> io::Result<()> {
        // The frontend stops a queue before it sets it up again (a virtio reset, a reboot):
        // a queue the guest broke gets a fresh start. Queue i is served by thread i.
        // The ring the frontend takes back must hold every completion: wait for reads still
        // being served from the backing file (bounded; the rest are cancelled).
        let Ok(queue) = usize::try_from(index) else {
            return Ok(());
        };
        self.stop_queue(queue);
        if let Some(Ok(mut thread)) = self.queues.get(queue).map(Mutex::lock) {
            if thread.broken {
                debug!("queue {index} was stopped by the frontend; it will be served again");
            }
            thread.stopped();
        }
        self.stop_hooks(queue);
        Ok(())
    }

    fn set_event_idx(&self, _enabled: bool) {
        // vhost-user-backend sets EVENT_IDX on each queue itself; the queue's notification
        // calls then do the right thing for either mode.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // QEMU asks for the device's config space from offset 0; cloud-hypervisor adds
        // VHOST_USER_CONFIG_OFFSET (0x100, where virtio-pci places it) to every offset. The
        // space is 60 bytes long, so an offset at or past 0x100 can only mean the latter.
        let offset = offset
            .checked_sub(VHOST_USER_CONFIG_OFFSET)
            .unwrap_or(offset);
        self.device.read_config(offset, size)
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the virtio-blk configuration space of this device is read-only",
        ))
    }

    fn update_memory(&self, _mem: GuestMemory) -> io::Result<()> {
        self.admit();
        // The handler has already swapped the new map into the GuestMemoryAtomic we share.
        // Requests still running off the queue threads write through the old map, which the
        // frontend may be reusing: let them land (bounded) or cancel them before answering.
        // Then refuse regions that would fault when touched.
        for queue in 0..self.queues.len() {
            if let Some(read_back) = &self.read_back {
                read_back.stop_queue(queue, self.stop_timeout());
            }
        }
        let regions = self.mem.memory().num_regions();
        if regions > MAX_MEM_SLOTS {
            let previous = self
                .accepted_map
                .lock()
                .map_err(|_| io::Error::other("the memory map lock is poisoned"))?
                .clone();
            self.mem
                .lock()
                .map_err(|_| io::Error::other("the guest memory lock is poisoned"))?
                .replace(previous);
            self.warn_limited(format_args!(
                "refusing a memory region: the frontend would hold {regions} regions, more than \
                 the {MAX_MEM_SLOTS} memory slots the device advertises"
            ));
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{regions} memory regions exceed the {MAX_MEM_SLOTS} memory slots the device \
                     advertises"
                ),
            ));
        }
        check_regions(&self.mem)?;
        if let Ok(mut accepted) = self.accepted_map.lock() {
            *accepted = GuestMap::clone(&self.mem.memory());
        }
        self.log_map_change();
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.device.num_queues)
            .map(|queue| 1u64 << queue)
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => Some(pair),
            Err(error) => {
                error!("cannot create a worker exit event: {error}");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unexpected event set {evset:?}"),
            ));
        }
        let queues = usize::from(self.device.num_queues);
        let event = usize::from(device_event);
        // `vrings` are this thread's queues only, and vhost-user-backend numbers a kick event
        // by its queue's place among them; a mailbox event names the queue (of the device:
        // its read-back threads serve every queue), whose place here follows from
        // `queues_per_thread`: queue q is thread q's only queue.
        let (local, mailbox_queue) = if event < queues {
            (Some(event), None)
        } else if event > queues {
            let queue = event - queues - 1;
            (local_index(queue, thread_id), Some(queue))
        } else {
            // The exit event: vhost-user-backend handles it and never passes it on.
            return Ok(());
        };
        let Some(vring) = local.and_then(|local| vrings.get(local)) else {
            // A bug, not the guest: say so, and keep the thread (an error would end it, and
            // with it the service of its queue).
            error!("event {device_event} names no queue of thread {thread_id}; ignored");
            return Ok(());
        };
        let served = match mailbox_queue {
            Some(queue) => self.land_finished_reads(vring, queue),
            None => self.serve_queue(vring, thread_id),
        };
        if let Err(serve_error) = served {
            // Keep the worker alive: a guest that broke its queue can still reset it. The
            // guest causes these, so they are rate-limited like every guest-caused warning.
            self.warn_limited(format_args!(
                "queue of thread {thread_id}: {}",
                super::request::ErrorChain(&serve_error)
            ));
        }
        Ok(())
    }
}

/// Logs why an inflight region was refused and turns it into the error the frontend gets.
fn refused_region(error: &inflight::InflightError) -> io::Error {
    let chain = super::request::ErrorChain(error);
    error!("refusing the frontend's inflight region: {chain}");
    io::Error::new(io::ErrorKind::InvalidInput, chain.to_string())
}

/// Logs the guest memory map: one line with the totals (at info level when `info` says how
/// many changes went unlogged before this one, else at debug), one per region at debug.
fn log_regions(mem: &GuestMemory, info: Option<u64>) {
    use vm_memory::GuestMemoryRegion;
    let map = mem.memory();
    let total: u64 = map.iter().map(|r| r.len()).sum();
    let (regions, kib) = (map.num_regions(), total >> 10);
    match info {
        Some(0) => info!("guest memory: {regions} region(s), {kib} KiB"),
        Some(skipped) => info!(
            "guest memory: {regions} region(s), {kib} KiB ({skipped} earlier change(s) not \
             logged)"
        ),
        None => debug!("guest memory: {regions} region(s), {kib} KiB"),
    }
    for region in map.iter() {
        debug!(
            "  region {:#x}..{:#x} ({} KiB){}",
            region.start_addr().0,
            region.start_addr().0 + region.len(),
            region.len() >> 10,
            region
                .file_offset()
                .map(|f| format!(", file offset {:#x}", f.start()))
                .unwrap_or_default()
        );
    }
}

/// Checks every region of the current guest memory map against the file that backs it: a
/// region that reaches past the end of its file would raise SIGBUS when touched. Such regions
/// are taken out of the map again and the frontend is told which. A region whose file can
/// still shrink (a memfd without `F_SEAL_SHRINK`, any plain file) is accepted with a warning,
/// since QEMU's file and hugetlbfs backends cannot be sealed.
fn check_regions(mem: &GuestMemory) -> io::Result<()> {
    use vm_memory::{GuestAddress, GuestMemoryRegion};
    let map = mem.memory();
    let mut bad = Vec::new();
    for region in map.iter() {
        let Some(file_offset) = region.file_offset() else {
            continue;
        };
        let file = file_offset.file();
        let end = file_offset.start().checked_add(region.len());
        let size = file.metadata()?.len();
        if end.is_none_or(|end| end > size) {
            bad.push((
                region.start_addr().0,
                region.len(),
                file_offset.start(),
                size,
            ));
            continue;
        }
        // SAFETY: F_GET_SEALS on an fd the region owns; it only reads the seals.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            debug!(
                "guest memory region at {:#x} is backed by a file that can shrink: if the \
                 frontend shrinks it, the daemon stops with SIGBUS",
                region.start_addr().0
            );
        }
    }
    if bad.is_empty() {
        return Ok(());
    }
    let mut filtered = GuestMap::clone(&map);
    for &(addr, len, _, _) in &bad {
        filtered = filtered
            .remove_region(GuestAddress(addr), len)
            .map_err(io::Error::other)?
            .0;
    }
    mem.lock()
        .map_err(|_| io::Error::other("the guest memory lock is poisoned"))?
        .replace(filtered);
    let (addr, len, offset, size) = bad[0];
    warn!(
        "refusing {} guest memory region(s): the region at {addr:#x} of {len} bytes at file \
         offset {offset} reaches past the end of its {size}-byte file",
        bad.len()
    );
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "guest memory region at {addr:#x} ({len} bytes at file offset {offset}) reaches \
             past the end of its {size}-byte file"
        ),
    ))
}
