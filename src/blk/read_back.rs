// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Reads of written-back pages, run off the queue threads and completed back on them.
//!
//! A page on the backing file costs a file read (tens of microseconds with `O_DIRECT`, more on a
//! busy disk) where a page in RAM costs a decompression (about one). So that such a read holds
//! up neither its queue's other requests nor other pages, the queue thread hands a read that
//! touches a written-back page to a small pool of read-back threads ([`THREADS`]) and goes on
//! with the next chain. A read-back thread executes the read (file read, decompression, copy
//! into guest memory) and posts the finished request to its queue's mailbox, whose eventfd
//! wakes the queue's thread; that thread writes the status byte and the used entry and signals
//! the guest, as for any other request (the way cloud-hypervisor's block device completes
//! asynchronous I/O). No read-back thread touches a ring. virtio-blk lets requests complete in
//! any order.
//!
//! Every read handed over is counted per queue until its used entry is written. Stopping a
//! queue ([`ReadBack::stop_queue`]: `GET_VRING_BASE`, a virtio reset, a memory table change)
//! first waits, at most the stop timeout, until that count is zero, so the ring the frontend
//! takes back is complete; reads that outlive the wait (a hung file) are cancelled: the queue
//! starts a new generation, and a read-back thread asks a gate before every write into guest
//! memory, which refuses requests of an old generation. When `stop_queue` returns, no thread
//! writes guest memory for the requests it gave up. A disconnect or shutdown cancels at once.
//!
//! Bounds: the hand-over queue holds [`MAX_QUEUED`] reads; when it is full the queue thread
//! serves the read itself (slower, never lost). Shutdown closes the hand-over queue and joins
//! the threads for a bounded time, naming any that is still stuck in the file.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{error, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::GuestMap;
use super::config::DeviceConfig;
use super::ratelimit::RateLimiter;
use super::request::{GuestGate, Request, RequestRunner};
use super::BlockBackend;
use crate::stop::{Threads, Unjoined};

/// Read-back threads: file reads run in parallel, so the storage sees more than one at a time.
pub const THREADS: usize = 4;
/// Reads waiting for a read-back thread, at most.
pub const MAX_QUEUED: usize = 256;
/// How long stopping a queue waits for its reads by default.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long cancelling waits for a write into guest memory already under way (a copy of at
/// most a page; only a frontend that made guest memory fault could make it slow).
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// A read on its way to a read-back thread.
struct ReadBackJob<E: std::error::Error + 'static> {
    request: Request<E>,
    queue: usize,
    generation: u64,
    /// The guest memory the request was parsed against (kept mapped until it is done).
    mem: Arc<GuestMap>,
}

/// A read that a read-back thread finished, waiting in its queue's mailbox.
struct Finished<E: std::error::Error + 'static> {
    request: Request<E>,
    generation: u64,
}

/// Per queue: the reads handed over and not yet on the used ring, and the mailbox through
/// which they come back.
struct QueueFlight<E: std::error::Error + 'static> {
    state: Mutex<FlightState>,
    changed: Condvar,
    mailbox: Mutex<VecDeque<Finished<E>>>,
    /// Readable while the mailbox has something: registered with the queue thread's epoll.
    wake: EventFd,
}

#[derive(Debug, Default)]
struct FlightState {
    /// Raised when the queue gives up on its outstanding reads.
    generation: u64,
    /// Reads of this generation handed over and not yet on the used ring.
    outstanding: usize,
    /// Writes into guest memory (data, status, used entry) under way for this generation.
    writing: usize,
    /// Whether new reads may be handed over (not while the queue is being stopped).
    accepting: bool,
}

struct Shared<S: BlockBackend> {
    store: Arc<S>,
    device: DeviceConfig,
    log_limiter: Arc<Mutex<RateLimiter>>,
    queues: Vec<QueueFlight<S::Error>>,
}

/// The read-back threads of one backend.
pub struct ReadBack<S: BlockBackend> {
    shared: Arc<Shared<S>>,
    sender: Mutex<Option<SyncSender<ReadBackJob<S::Error>>>>,
    threads: Mutex<Threads>,
    /// Set once every queue's mailbox is registered with its queue thread: before that,
    /// nothing would bring a finished read back, so nothing is handed over.
    attached: AtomicBool,
}

impl<S: BlockBackend + 'static> ReadBack<S> {
    /// Starts the threads for a device with `device.num_queues` queues.
    pub fn start(
        store: Arc<S>,
        device: DeviceConfig,
        log_limiter: Arc<Mutex<RateLimiter>>,
    ) -> std::io::Result<ReadBack<S>> {
        let queues = (0..device.num_queues)
            .map(|_| {
                Ok(QueueFlight {
                    state: Mutex::new(FlightState {
                        accepting: true,
                        ..FlightState::default()
                    }),
                    changed: Condvar::new(),
                    mailbox: Mutex::new(VecDeque::with_capacity(MAX_QUEUED)),
                    wake: EventFd::new(EFD_NONBLOCK)?,
                })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        let shared = Arc::new(Shared {
            store,
            device,
            log_limiter,
            queues,
        });
        let (sender, receiver) = sync_channel(MAX_QUEUED);
        let receiver = Arc::new(Mutex::new(receiver));
        // The threads stop when the hand-over queue closes (`shutdown`), not on the group's
        // signal: each is either waiting on the queue or in a read that nothing can interrupt.
        let mut threads = Threads::new();
        for i in 0..THREADS {
            let shared = Arc::clone(&shared);
            let receiver = Arc::clone(&receiver);
            threads.spawn(format!("read-back-{i}"), move |_| run(&shared, &receiver))?;
        }
        Ok(ReadBack {
            shared,
            sender: Mutex::new(Some(sender)),
            threads: Mutex::new(threads),
            attached: AtomicBool::new(false),
        })
    }

    /// The eventfd that becomes readable when queue `queue` has finished reads to complete.
    pub fn mailbox_fd(&self, queue: usize) -> Option<RawFd> {
        self.shared.queues.get(queue).map(|q| q.wake.as_raw_fd())
    }

    /// Says that every queue's mailbox is now watched by its queue thread: reads may be
    /// handed over from now on.
    pub fn attached(&self) {
        self.attached.store(true, Ordering::Release);
    }

    /// Hands `request` of queue `queue` to a read-back thread, or gives it back when that
    /// cannot be done now (the threads are busy and the hand-over queue is full, the queue is
    /// being stopped, or nothing watches the mailboxes).
    pub fn submit(
        &self,
        request: Request<S::Error>,
        queue: usize,
        mem: Arc<GuestMap>,
    ) -> Result<(), Request<S::Error>> {
        if !self.attached.load(Ordering::Acquire) {
            return Err(request);
        }
        let sender = lock(&self.sender);
        let Some(sender) = sender.as_ref() else {
            return Err(request);
        };
        let Some(flight) = self.shared.queues.get(queue) else {
            return Err(request);
        };
        let mut state = lock(&flight.state);
        if !state.accepting {
            return Err(request);
        }
        let job = ReadBackJob {
            request,
            queue,
            generation: state.generation,
            mem,
        };
        match sender.try_send(job) {
            Ok(()) => {
                state.outstanding += 1;
                Ok(())
            }
            Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => Err(job.request),
        }
    }

    /// On the thread of queue `queue`: takes every finished read out of its mailbox and calls
    /// `complete` for each the queue still waits for (which puts it on the used ring), or
    /// `discard` for each it gave up. Returns how many were completed.
    pub fn land(
        &self,
        queue: usize,
        mut complete: impl FnMut(Request<S::Error>),
        mut discard: impl FnMut(Request<S::Error>),
    ) -> usize {
        let Some(flight) = self.shared.queues.get(queue) else {
            return 0;
        };
        // Reset the wake-up first: a read posted after this is seen by the loop or wakes the
        // thread again.
        let _ = flight.wake.read();
        let mut completed = 0;
        loop {
            let Some(finished) = lock(&flight.mailbox).pop_front() else {
                return completed;
            };
            let mut state = lock(&flight.state);
            if state.generation != finished.generation {
                drop(state);
                discard(finished.request);
                continue;
            }
            state.writing += 1;
            drop(state);
            complete(finished.request);
            completed += 1;
            let mut state = lock(&flight.state);
            state.writing -= 1;
            state.outstanding = state.outstanding.saturating_sub(1);
            drop(state);
            flight.changed.notify_all();
        }
    }

    /// Stops queue `queue`'s reads: waits until every read handed over is on the used ring,
    /// at most `timeout`, then cancels those still running. When this returns, no read of the
    /// queue writes guest memory any more. Returns whether everything landed.
    pub fn stop_queue(&self, queue: usize, timeout: Duration) -> bool {
        let Some(flight) = self.shared.queues.get(queue) else {
            return true;
        };
        let deadline = Instant::now() + timeout;
        let mut state = lock(&flight.state);
        state.accepting = false;
        let (mut state, landed) = wait_while(flight, state, deadline, |s| s.outstanding > 0);
        if !landed {
            error!(
                "{} read(s) of written-back pages on queue {queue} did not finish within {} ms; \
                 they are cancelled and will not be completed",
                state.outstanding,
                timeout.as_millis()
            );
            state = cancel(flight, state, queue);
        }
        state.accepting = true;
        landed
    }

    /// Cancels every queue's outstanding reads at once (the frontend is gone). When this
    /// returns, no read writes guest memory any more.
    pub fn cancel_all(&self) {
        for (queue, flight) in self.shared.queues.iter().enumerate() {
            let state = lock(&flight.state);
            drop(cancel(flight, state, queue));
        }
    }

    /// Cancels every read, closes the hand-over queue and joins the threads within `bound`;
    /// returns the names of those that did not stop by then (stuck in a file read: they are
    /// left behind and exit when the read returns) or panicked, and logs them.
    pub fn shutdown(&self, bound: Duration) -> Unjoined {
        lock(&self.sender).take();
        for flight in &self.shared.queues {
            lock(&flight.state).accepting = false;
        }
        self.cancel_all();
        lock(&self.threads).stop_within(bound)
    }
}

/// Starts a new generation of `flight`, forgetting its outstanding reads, and waits for
/// writes into guest memory already under way.
fn cancel<'g, E: std::error::Error + 'static>(
    flight: &'g QueueFlight<E>,
    mut state: MutexGuard<'g, FlightState>,
    queue: usize,
) -> MutexGuard<'g, FlightState> {
    state.generation += 1;
    state.outstanding = 0;
    let (state, done) = wait_while(flight, state, Instant::now() + WRITE_TIMEOUT, |s| {
        s.writing > 0
    });
    if !done {
        error!(
            "a write into guest memory for queue {queue} did not finish within {} ms",
            WRITE_TIMEOUT.as_millis()
        );
    }
    state
}

/// Waits on `flight`'s condvar while `busy` holds, until `deadline`; returns the guard and
/// whether `busy` ended.
fn wait_while<'g, E: std::error::Error + 'static>(
    flight: &'g QueueFlight<E>,
    mut state: MutexGuard<'g, FlightState>,
    deadline: Instant,
    busy: impl Fn(&FlightState) -> bool,
) -> (MutexGuard<'g, FlightState>, bool) {
    loop {
        if !busy(&state) {
            return (state, true);
        }
        let now = Instant::now();
        if now >= deadline {
            return (state, false);
        }
        state = flight
            .changed
            .wait_timeout(state, deadline - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// The gate of a read running on a read-back thread: a write into guest memory goes ahead
/// only while the request's generation is the queue's, and is counted while it runs so that
/// cancelling can wait for it.
struct FlightGate<'f, E: std::error::Error + 'static> {
    flight: &'f QueueFlight<E>,
    generation: u64,
}

impl<E: std::error::Error + 'static> GuestGate for FlightGate<'_, E> {
    // A lent page would be written for the whole decompression, outside the gate's count.
    const LENDS_GUEST_MEMORY: bool = false;

    fn pass<R>(&self, write: impl FnOnce() -> R) -> Option<R> {
        let mut state = lock(&self.flight.state);
        if state.generation != self.generation {
            return None;
        }
        state.writing += 1;
        drop(state);
        let result = write();
        lock(&self.flight.state).writing -= 1;
        self.flight.changed.notify_all();
        Some(result)
    }
}

fn run<S: BlockBackend>(shared: &Shared<S>, receiver: &Mutex<Receiver<ReadBackJob<S::Error>>>) {
    let mut runner = RequestRunner::new(&shared.device, Arc::clone(&shared.log_limiter));
    loop {
        let job = match lock(receiver).recv() {
            Ok(job) => job,
            Err(_) => return, // shut down
        };
        let ReadBackJob {
            mut request,
            queue,
            generation,
            mem,
        } = job;
        let Some(flight) = shared.queues.get(queue) else {
            continue;
        };
        let gate = FlightGate { flight, generation };
        runner.execute(&mut request, &*mem, &*shared.store, &shared.device, &gate);
        drop(mem);
        lock(&flight.mailbox).push_back(Finished {
            request,
            generation,
        });
        if let Err(error) = flight.wake.write(1) {
            warn!("cannot wake the thread of queue {queue}: {error}");
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| {
        warn!("a read-back lock was poisoned; going on");
        e.into_inner()
    })
}
