// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Reads of written-back pages, served off the queue threads.
//!
//! A page on the backing file costs a file read (tens of microseconds with `O_DIRECT`, more on a
//! busy disk) where a page in RAM costs a decompression (about one). So that such a read holds
//! up neither its queue's other requests nor other pages, the queue thread hands a read that
//! touches a written-back page to a small pool of read-back threads ([`THREADS`]) and goes on
//! with the next chain; a read-back thread executes the read (file read, decompression, copy
//! into guest memory, status byte), then takes the queue's lock, puts the chain on the used
//! ring and signals the guest if the ring's notification rules ask for it — exactly what the
//! queue thread would have done, only later. virtio-blk lets requests complete in any order.
//!
//! Bounds: the hand-over queue holds [`MAX_QUEUED`] reads; when it is full the queue thread
//! serves the read itself (slower, never lost). Stopping a queue (`GET_VRING_BASE`, a virtio
//! reset) waits until its deferred reads are on the used ring, at most [`DRAIN_TIMEOUT`], so
//! the ring the frontend takes back is complete; reads that outlive that wait (a hung file)
//! are dropped when they finish instead of touching a ring that has been reset. Shutdown
//! closes the hand-over queue and does not wait for a read stuck in the file.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{error, warn};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};

use super::backend::{signal_without_blocking, GuestMemory};
use super::config::DeviceConfig;
use super::ratelimit::RateLimiter;
use super::request::{DeferredRead, Worker};
use super::request_stats::RequestStats;
use super::BlockBackend;

/// Read-back threads: file reads run in parallel, so the storage sees more than one at a time.
pub const THREADS: usize = 4;
/// Reads waiting for a read-back thread, at most.
pub const MAX_QUEUED: usize = 256;
/// How long stopping a queue waits for its deferred reads.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// A deferred read on its way to a read-back thread.
struct Job {
    read: DeferredRead,
    vring: VringRwLock,
    queue: usize,
    generation: u64,
    /// The guest memory the request was parsed against (kept mapped until it is done).
    mem: Arc<GuestMemoryMmap<()>>,
}

/// Per queue: deferred reads not yet on the used ring, and the ring's generation (raised
/// when the queue is stopped, so that a late read does not touch the restarted ring).
#[derive(Debug, Default, Clone, Copy)]
struct Flight {
    in_flight: usize,
    generation: u64,
}

struct Shared<S> {
    store: Arc<S>,
    device: DeviceConfig,
    mem: GuestMemory,
    log_limiter: Arc<Mutex<RateLimiter>>,
    stats: Mutex<Option<Arc<RequestStats>>>,
    flights: Mutex<Vec<Flight>>,
    landed: Condvar,
}

/// The read-back threads of one backend.
pub struct ReadBack<S: BlockBackend> {
    shared: Arc<Shared<S>>,
    sender: Mutex<Option<SyncSender<Job>>>,
}

impl<S: BlockBackend + 'static> ReadBack<S> {
    /// Starts the threads for a device with `device.num_queues` queues.
    pub fn start(
        store: Arc<S>,
        device: DeviceConfig,
        mem: GuestMemory,
        log_limiter: Arc<Mutex<RateLimiter>>,
    ) -> std::io::Result<ReadBack<S>> {
        let queues = usize::from(device.num_queues);
        let shared = Arc::new(Shared {
            store,
            device,
            mem,
            log_limiter,
            stats: Mutex::new(None),
            flights: Mutex::new(vec![Flight::default(); queues]),
            landed: Condvar::new(),
        });
        let (sender, receiver) = sync_channel(MAX_QUEUED);
        let receiver = Arc::new(Mutex::new(receiver));
        for i in 0..THREADS {
            let shared = Arc::clone(&shared);
            let receiver = Arc::clone(&receiver);
            std::thread::Builder::new()
                .name(format!("read-back-{i}"))
                .spawn(move || run(&shared, &receiver))?;
        }
        Ok(ReadBack {
            shared,
            sender: Mutex::new(Some(sender)),
        })
    }

    /// Counts the reads it completes into `stats`, as their queues.
    pub fn observe(&self, stats: &Arc<RequestStats>) {
        *lock(&self.shared.stats) = Some(Arc::clone(stats));
    }

    /// Hands `read` of queue `queue` (whose ring is `vring`) to a read-back thread, or gives
    /// it back when they are all busy and the hand-over queue is full (or shut down).
    pub fn submit(
        &self,
        read: DeferredRead,
        vring: &VringRwLock,
        queue: usize,
    ) -> Result<(), DeferredRead> {
        let sender = lock(&self.sender);
        let Some(sender) = sender.as_ref() else {
            return Err(read);
        };
        let mut flights = lock(&self.shared.flights);
        let Some(flight) = flights.get_mut(queue) else {
            return Err(read);
        };
        let job = Job {
            read,
            vring: vring.clone(),
            queue,
            generation: flight.generation,
            mem: self.shared.mem.memory().into_inner(),
        };
        match sender.try_send(job) {
            Ok(()) => {
                flight.in_flight += 1;
                Ok(())
            }
            Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => Err(job.read),
        }
    }

    /// Waits until every read deferred from queue `queue` is on its used ring (at most
    /// [`DRAIN_TIMEOUT`]), then starts a new generation: reads still running are dropped when
    /// they finish. Returns whether everything landed.
    pub fn drain(&self, queue: usize) -> bool {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        let mut flights = lock(&self.shared.flights);
        let landed = loop {
            let Some(flight) = flights.get(queue) else {
                return true;
            };
            if flight.in_flight == 0 {
                break true;
            }
            let now = Instant::now();
            if now >= deadline {
                break false;
            }
            flights = self
                .shared
                .landed
                .wait_timeout(flights, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        };
        if let Some(flight) = flights.get_mut(queue) {
            if !landed {
                error!(
                    "{} reads of written-back pages on queue {queue} did not finish within {} s; \
                     they will not be completed",
                    flight.in_flight,
                    DRAIN_TIMEOUT.as_secs()
                );
                flight.in_flight = 0;
            }
            flight.generation += 1;
        }
        landed
    }

    /// Closes the hand-over queue: the threads finish what they hold and exit. Does not wait.
    pub fn shutdown(&self) {
        lock(&self.sender).take();
    }
}

fn run<S: BlockBackend>(shared: &Shared<S>, receiver: &Mutex<Receiver<Job>>) {
    let mut worker = Worker::new(&shared.device, Arc::clone(&shared.log_limiter));
    loop {
        let job = match lock(receiver).recv() {
            Ok(job) => job,
            Err(_) => return, // shut down
        };
        if let Some(stats) = lock(&shared.stats).as_ref() {
            worker.record_into(Arc::clone(stats), job.queue);
        }
        let used = worker.run_deferred(&job.read, &*job.mem, &*shared.store, &shared.device);
        complete(shared, &job, used);
    }
}

/// Puts a finished read on its used ring and signals the guest, unless its queue was stopped
/// meanwhile.
fn complete<S: BlockBackend>(shared: &Shared<S>, job: &Job, used: u32) {
    let mut state = job.vring.get_mut();
    let mut flights = lock(&shared.flights);
    let Some(flight) = flights.get_mut(job.queue) else {
        return;
    };
    if flight.generation != job.generation {
        return; // the queue was stopped and gave up on this read
    }
    drop(flights);
    let mem = shared.mem.memory();
    let added = state.get_queue_mut().add_used(&*mem, job.read.head(), used);
    match added.and_then(|()| state.needs_notification()) {
        Ok(true) => {
            if let Err(error) = signal_without_blocking(&state) {
                super::ratelimit::warn_limited(
                    &shared.log_limiter,
                    format_args!("cannot signal queue {}: {error}", job.queue),
                );
            }
        }
        Ok(false) => {}
        Err(error) => super::ratelimit::warn_limited(
            &shared.log_limiter,
            format_args!(
                "cannot complete a read of queue {}: {}",
                job.queue,
                super::request::ErrorChain(&error)
            ),
        ),
    }
    // Counted as landed only once it is on the ring (a drain meanwhile may have started a
    // new generation, whose reads are not this one's to count).
    let mut flights = lock(&shared.flights);
    if let Some(flight) = flights.get_mut(job.queue) {
        if flight.generation == job.generation {
            flight.in_flight = flight.in_flight.saturating_sub(1);
        }
    }
    drop(flights);
    drop(state);
    shared.landed.notify_all();
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| {
        warn!("a read-back lock was poisoned; going on");
        e.into_inner()
    })
}
