// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The vhost-user backend: queues, features and configuration space for the frontend.
//!
//! vhost-user-backend runs one worker thread per entry of
//! [`VhostUserBackend::queues_per_thread`]; we give each queue its own thread, so `N` queues are
//! served by `N` threads in parallel over the one shared store. Each thread owns a
//! [`Worker`] (page buffer and descriptor table, allocated once), found by its thread index.
//!
//! A virtio reset (the guest reboots: `GET_VRING_BASE`, `RESET_DEVICE`, a new `SET_FEATURES`)
//! only forgets negotiated state; the store, and so the guest's data, stays.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use log::{debug, error};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::config::DeviceConfig;
use super::ratelimit::{RateLimiter, WARNINGS_PER_SECOND};
use super::request::Worker;
use super::BlockBackend;

/// Guest memory as vhost-user-backend hands it over (no dirty-page bitmap: the device does
/// not offer `LOG_ALL`).
pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// The virtio-blk vhost-user backend over a [`BlockBackend`].
pub struct BlkBackend<S: BlockBackend> {
    store: Arc<S>,
    device: DeviceConfig,
    mem: RwLock<GuestMemory>,
    event_idx: AtomicBool,
    acked_features: AtomicU64,
    frontend_spoke: AtomicBool,
    workers: Vec<Mutex<Worker>>,
}

impl<S: BlockBackend> BlkBackend<S> {
    /// A backend serving `store` as the device `device` describes.
    pub fn new(store: Arc<S>, device: DeviceConfig, mem: GuestMemory) -> Self {
        let limiter = Arc::new(Mutex::new(RateLimiter::new(WARNINGS_PER_SECOND)));
        let workers = (0..device.num_queues)
            .map(|_| Mutex::new(Worker::new(&device, limiter.clone())))
            .collect();
        BlkBackend {
            store,
            device,
            mem: RwLock::new(mem),
            event_idx: AtomicBool::new(false),
            acked_features: AtomicU64::new(0),
            frontend_spoke: AtomicBool::new(false),
            workers,
        }
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
    fn serve_queue(&self, vring: &VringRwLock, thread_id: usize) -> Result<(), ServeError> {
        let mem = self.mem.read().map_err(|_| ServeError::Poisoned)?.memory();
        let mut worker = self
            .workers
            .get(thread_id)
            .ok_or(ServeError::NoWorker(thread_id))?
            .lock()
            .map_err(|_| ServeError::Poisoned)?;
        let event_idx = self.event_idx.load(Ordering::Acquire);
        let mut state = vring.get_mut();
        loop {
            if event_idx {
                state.disable_notification().map_err(ServeError::Queue)?;
            }
            let completed = worker
                .process_queue(state.get_queue_mut(), &*mem, &*self.store, &self.device)
                .map_err(ServeError::Queue)?;
            if completed > 0 && state.needs_notification().map_err(ServeError::Queue)? {
                state.signal_used_queue().map_err(ServeError::Signal)?;
            }
            // With EVENT_IDX, re-enabling notifications reports whether the guest added
            // requests meanwhile; serve those before sleeping.
            if !event_idx || !state.enable_notification().map_err(ServeError::Queue)? {
                return Ok(());
            }
        }
    }
}

/// Why a queue could not be served.
#[derive(Debug, thiserror::Error)]
enum ServeError {
    /// The guest's queue structures are inconsistent.
    #[error("the virtqueue is broken")]
    Queue(#[source] virtio_queue::Error),
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
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.device.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.device.queue_size)
    }

    fn features(&self) -> u64 {
        self.frontend_spoke.store(true, Ordering::Release);
        self.device.features()
    }

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Release);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.frontend_spoke.store(true, Ordering::Release);
        DeviceConfig::protocol_features()
    }

    fn reset_device(&self) {
        debug!("virtio reset: forgetting negotiated features, keeping the data");
        self.acked_features.store(0, Ordering::Release);
        self.event_idx.store(false, Ordering::Release);
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.device.read_config(offset, size)
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the virtio-blk configuration space of this device is read-only",
        ))
    }

    fn update_memory(&self, mem: GuestMemory) -> io::Result<()> {
        let mut current = self
            .mem
            .write()
            .map_err(|_| io::Error::other("the guest memory lock is poisoned"))?;
        *current = mem;
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
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unexpected event set {evset:?}"),
            ));
        }
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("event {device_event} names no queue of thread {thread_id}"),
            ));
        };
        if let Err(serve_error) = self.serve_queue(vring, thread_id) {
            // Keep the worker alive: a guest that broke its queue can still reset it.
            error!(
                "queue of thread {thread_id}: {}",
                super::request::ErrorChain(&serve_error)
            );
        }
        Ok(())
    }
}

/// Whether `features` include EVENT_IDX.
pub fn has_event_idx(features: u64) -> bool {
    features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0
}
