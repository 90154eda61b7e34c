// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The queue hooks ([`QueueHooks`]) a live migration's switchover uses, end to end: the vhost
//! crate's `Frontend` sets up one queue on a backend served over a Unix socket, and a recording
//! hook waits, refuses, or watches the queue stop.

// Lengths, offsets and status codes here are small constants.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use vhost::vhost_user::{Frontend, Listener, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use vhost_user_backend::VhostUserDaemon;
use vhost_user_zram::blk::backend::{GuestMap, GuestMemory};
use vhost_user_zram::blk::{BlkBackend, BlockBackend, DeviceConfig, QueueHooks};
use vhost_user_zram::PAGE_SIZE;
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const PAGES: u64 = 64;
const QUEUE_SIZE: u16 = 256;
const MEM_SIZE: usize = 4 << 20;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// The used ring: away from the mock's avail ring (see `common::start_queue_with_used_ring`).
const USED_RING: u64 = 0x8000;

/// A page store in a map that counts its operations; writes may take a while.
#[derive(Default)]
struct CountingStore {
    pages: Mutex<HashMap<u64, Box<[u8; PAGE_SIZE]>>>,
    operations: Mutex<usize>,
    write_delay: Duration,
}

impl CountingStore {
    fn operations(&self) -> usize {
        *self.operations.lock().unwrap()
    }

    fn count(&self) {
        *self.operations.lock().unwrap() += 1;
    }
}

/// What the counting store never fails with.
#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

// SAFETY: `read_page` only copies a stored page (or zeros) into the page it is given, keeps no
// reference to it and never reads it back.
unsafe impl BlockBackend for CountingStore {
    type Error = Never;

    fn capacity_pages(&self) -> u64 {
        PAGES
    }

    fn read_page(&self, index: u64, page: &mut [u8; PAGE_SIZE]) -> Result<(), Never> {
        self.count();
        match self.pages.lock().unwrap().get(&index) {
            Some(stored) => page.copy_from_slice(&stored[..]),
            None => page.fill(0),
        }
        Ok(())
    }

    fn write_page(&self, index: u64, page: &[u8; PAGE_SIZE]) -> Result<(), Never> {
        self.count();
        thread::sleep(self.write_delay);
        self.pages.lock().unwrap().insert(index, Box::new(*page));
        Ok(())
    }

    fn modify_page<R>(
        &self,
        index: u64,
        f: impl FnOnce(&mut [u8; PAGE_SIZE]) -> R,
    ) -> Result<R, Never> {
        let mut page = [0u8; PAGE_SIZE];
        self.read_page(index, &mut page)?;
        let result = f(&mut page);
        self.write_page(index, &page)?;
        Ok(result)
    }

    fn discard_pages(&self, pages: Range<u64>) -> Result<(), Never> {
        self.count();
        let mut stored = self.pages.lock().unwrap();
        for index in pages {
            stored.remove(&index);
        }
        Ok(())
    }

    fn count_invalid_io(&self) {}
}

/// What the recording hook saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    BeforeStart(usize),
    /// The queue, `all_stopped`, and the used index of queue 0 at that moment.
    AfterStop(usize, bool, u16),
}

/// A hook that records every call, waits `delay` in `before_start` and refuses when `refuse`
/// says so; it reads queue 0's used index from guest memory when a queue stops.
struct RecordingHooks {
    events: Mutex<Vec<Event>>,
    delay: Duration,
    refuse: Option<&'static str>,
    mem: GuestMemoryMmap<()>,
}

impl RecordingHooks {
    fn new(mem: &GuestMemoryMmap<()>) -> Self {
        RecordingHooks {
            events: Mutex::new(Vec::new()),
            delay: Duration::ZERO,
            refuse: None,
            mem: mem.clone(),
        }
    }

    fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }
}

impl QueueHooks for RecordingHooks {
    fn before_start(&self, queue: usize) -> Result<(), String> {
        self.events.lock().unwrap().push(Event::BeforeStart(queue));
        thread::sleep(self.delay);
        match self.refuse {
            Some(reason) => Err(reason.to_owned()),
            None => Ok(()),
        }
    }

    fn after_stop(&self, queue: usize, all_stopped: bool) {
        // The used index sits 2 bytes into the used ring.
        let used: u16 = self.mem.read_obj(GuestAddress(USED_RING + 2)).unwrap();
        self.events
            .lock()
            .unwrap()
            .push(Event::AfterStop(queue, all_stopped, used));
    }
}

/// A backend over `store` with `hooks`, served on its own socket as the daemon serves one
/// connection.
struct Served {
    socket: PathBuf,
    thread: thread::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

fn serve(store: &Arc<CountingStore>, hooks: Arc<RecordingHooks>) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("hooks.sock");
    let mut device = DeviceConfig::new(PAGES);
    device.queue_size = QUEUE_SIZE;
    let mem = GuestMemory::new(GuestMap::new());
    let backend = Arc::new(BlkBackend::new(Arc::clone(store), device, mem.clone()));
    backend.set_queue_hooks(Some(hooks));
    let mut listener = Listener::new(&socket, true).unwrap();
    let thread = thread::spawn(move || {
        let mut daemon = VhostUserDaemon::new("hooks".into(), backend.clone(), mem).unwrap();
        backend.attach(&daemon).unwrap();
        daemon.start(&mut listener).unwrap();
        let _ = daemon.wait();
        backend.disconnected();
        let _ = backend.stop(Duration::from_secs(5));
        for handler in daemon.get_epoll_handlers() {
            handler.send_exit_event();
        }
    });
    Served {
        socket,
        thread,
        _dir: dir,
    }
}

/// The guest: shared memory, queue 0 and its eventfds, and the frontend that set them up.
struct Guest<'m> {
    mem: &'m GuestMemoryMmap<()>,
    vq: MockSplitQueue<'m, GuestMemoryMmap<()>>,
    kick: EventFd,
    call: EventFd,
    avail_idx: u16,
    frontend: Frontend,
}

impl<'m> Guest<'m> {
    /// Connects to `served`, negotiates every feature and starts queue 0.
    fn connect(served: &Served, mem: &'m GuestMemoryMmap<()>) -> Self {
        let mut frontend = Frontend::connect(&served.socket, 1).unwrap();
        frontend.set_owner().unwrap();
        let features = frontend.get_features().unwrap();
        frontend.set_features(features).unwrap();
        let protocol = frontend.get_protocol_features().unwrap();
        frontend.set_protocol_features(protocol).unwrap();
        let region =
            VhostUserMemoryRegionInfo::from_guest_region(mem.find_region(GuestAddress(0)).unwrap())
                .unwrap();
        frontend.set_mem_table(&[region]).unwrap();
        let vq = MockSplitQueue::new(mem, QUEUE_SIZE);
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let used = GuestAddress(USED_RING);
        common::start_queue_with_used_ring(&mut frontend, mem, &vq, QUEUE_SIZE, used, &kick, &call);
        Guest {
            mem,
            vq,
            kick,
            call,
            avail_idx: 0,
            frontend,
        }
    }

    /// Posts a one-page request on page `page` in slot `slot` (its own header, data page and
    /// status byte) and kicks; a write carries `0x5a` bytes.
    fn post(&mut self, slot: u16, kind: u32, page: u64) {
        let header_at = common::HEADER + 16 * u64::from(slot);
        let data = common::DATA + PAGE_SIZE as u64 * u64::from(slot);
        let status = common::STATUS + u64::from(slot);
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&kind.to_le_bytes());
        header[8..16].copy_from_slice(&(page * 8).to_le_bytes());
        self.mem
            .write_slice(&header, GuestAddress(header_at))
            .unwrap();
        self.mem
            .write_slice(&[0x5a; PAGE_SIZE], GuestAddress(data))
            .unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let (next, write) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
        let data_flags = if kind == VIRTIO_BLK_T_IN { write } else { 0 };
        let head = 3 * slot;
        let descs = [
            Descriptor::new(header_at, 16, next, head + 1),
            Descriptor::new(data, PAGE_SIZE as u32, data_flags | next, head + 2),
            Descriptor::new(status, 1, write, 0),
        ];
        self.avail_idx = common::publish_chain(&self.vq, QUEUE_SIZE, self.avail_idx, head, &descs);
        self.kick.write(1).unwrap();
    }

    fn wait_for_used(&self) {
        wait_for_used_at(self.mem, &self.call, self.avail_idx);
    }

    fn status(&self, slot: u16) -> u8 {
        self.mem
            .read_obj(GuestAddress(common::STATUS + u64::from(slot)))
            .unwrap()
    }
}

/// Waits (on the call eventfd, with a deadline) until the used index at [`USED_RING`] reaches
/// `target`.
fn wait_for_used_at(mem: &GuestMemoryMmap<()>, call: &EventFd, target: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let used: u16 = mem.read_obj(GuestAddress(USED_RING + 2)).unwrap();
        if used == target {
            return;
        }
        assert!(Instant::now() < deadline, "request not completed in time");
        thread::sleep(Duration::from_millis(2));
        let _ = call.read();
    }
}

fn guest_memory() -> GuestMemoryMmap<()> {
    common::guest_memory_over(MEM_SIZE, MEM_SIZE as u64)
}

#[test]
fn a_waiting_before_start_delays_the_first_request() {
    let mem = guest_memory();
    let store = Arc::new(CountingStore::default());
    let hooks = Arc::new(RecordingHooks {
        delay: Duration::from_millis(300),
        ..RecordingHooks::new(&mem)
    });
    let served = serve(&store, Arc::clone(&hooks));
    let mut guest = Guest::connect(&served, &mem);

    let posted = Instant::now();
    guest.post(0, VIRTIO_BLK_T_OUT, 3);
    guest.wait_for_used();

    assert!(posted.elapsed() >= Duration::from_millis(300));
    assert_eq!(guest.status(0), OK);
    assert_eq!(hooks.events(), [Event::BeforeStart(0)]);
    // Only the first request after a start waits.
    let posted = Instant::now();
    guest.post(1, VIRTIO_BLK_T_IN, 3);
    guest.wait_for_used();
    assert!(posted.elapsed() < Duration::from_millis(300));
    assert_eq!(guest.status(1), OK);
    assert_eq!(hooks.events(), [Event::BeforeStart(0)]);
    drop(guest);
    served.thread.join().unwrap();
}

#[test]
fn a_failed_before_start_fails_every_request_and_touches_no_page() {
    let mem = guest_memory();
    let store = Arc::new(CountingStore::default());
    let hooks = Arc::new(RecordingHooks {
        refuse: Some("the migration stream is incomplete"),
        ..RecordingHooks::new(&mem)
    });
    let served = serve(&store, Arc::clone(&hooks));
    let mut guest = Guest::connect(&served, &mem);

    guest.post(0, VIRTIO_BLK_T_OUT, 3);
    guest.wait_for_used();
    guest.post(1, VIRTIO_BLK_T_IN, 3);
    guest.wait_for_used();

    assert_eq!(guest.status(0), IOERR);
    assert_eq!(guest.status(1), IOERR);
    assert_eq!(store.operations(), 0, "a refused queue reached the store");
    let mut data = [0u8; PAGE_SIZE];
    guest
        .mem
        .read_slice(&mut data, GuestAddress(common::DATA + PAGE_SIZE as u64))
        .unwrap();
    assert!(data.iter().all(|&b| b == 0x5a), "a refused read wrote data");
    assert_eq!(hooks.events(), [Event::BeforeStart(0)]);
    drop(guest);
    served.thread.join().unwrap();
}

#[test]
fn after_stop_follows_get_vring_base_with_every_request_complete() {
    let mem = guest_memory();
    let store = Arc::new(CountingStore {
        write_delay: Duration::from_millis(200),
        ..CountingStore::default()
    });
    let hooks = Arc::new(RecordingHooks::new(&mem));
    let served = serve(&store, Arc::clone(&hooks));
    let mut guest = Guest::connect(&served, &mem);

    guest.post(0, VIRTIO_BLK_T_OUT, 3);
    // Let the queue thread take the write, which then takes 200 ms in the store.
    thread::sleep(Duration::from_millis(50));
    let base = guest.frontend.get_vring_base(0).unwrap();

    assert_eq!(base, 1);
    assert_eq!(guest.status(0), OK);
    assert_eq!(
        hooks.events(),
        [Event::BeforeStart(0), Event::AfterStop(0, true, 1)]
    );
    drop(guest);
    served.thread.join().unwrap();
}
