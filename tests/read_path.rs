// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The read path through the in-process daemon, driven by the vhost crate's `Frontend` over
//! memfd-backed guest memory as a VMM would drive it: interrupts for a driver that does not
//! negotiate EVENT_IDX (and one that does), and zero-copy reads into a guest's own rings.

// Descriptor indexes, flags and lengths here are small constants.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use vhost_user_zram::blk::DeviceConfig;
use vhost_user_zram::codec::Algorithm;
use vhost_user_zram::daemon::DaemonConfig;
use vhost_user_zram::store::{PageStore, StoreConfig};
use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use common::in_process::InProcessDaemon;

const PAGES: u64 = 256;
const MEM_SIZE: usize = 4 << 20;
const QUEUE_SIZE: u16 = 256;
/// Requests in flight at once: each takes three descriptors.
const MAX_BATCH: u16 = 64;

const HEADERS: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUSES: u64 = 0x30_0000;
/// The used ring: away from the mock's avail ring (see `common::start_queue_with_used_ring`).
const USED_RING: u64 = 0x8000;

fn start_daemon(poll_max: Duration) -> InProcessDaemon {
    let mut device = DeviceConfig::new(PAGES);
    device.queue_size = QUEUE_SIZE;
    InProcessDaemon::start(|socket| DaemonConfig {
        poll_max,
        ..common::daemon_config(socket, device, 16)
    })
}

/// Connects and acknowledges every feature the daemon offers, less EVENT_IDX unless
/// `event_idx`; returns the frontend with guest memory and queue 0 set up.
fn connect(
    socket: &Path,
    mem: &GuestMemoryMmap<()>,
    vq: &MockSplitQueue<'_, GuestMemoryMmap<()>>,
    event_idx: bool,
    kick: &EventFd,
    call: &EventFd,
) -> Frontend {
    let mut frontend = Frontend::connect(socket, 1).unwrap();
    frontend.set_owner().unwrap();
    let mut features = frontend.get_features().unwrap();
    if !event_idx {
        features &= !(1u64 << VIRTIO_RING_F_EVENT_IDX);
    }
    frontend.set_features(features).unwrap();
    let protocol = frontend.get_protocol_features().unwrap();
    frontend.set_protocol_features(protocol).unwrap();
    let region =
        VhostUserMemoryRegionInfo::from_guest_region(mem.find_region(GuestAddress(0)).unwrap())
            .unwrap();
    frontend.set_mem_table(&[region]).unwrap();
    start_queue(&mut frontend, mem, vq, kick, call);
    frontend
}

fn start_queue(
    frontend: &mut Frontend,
    mem: &GuestMemoryMmap<()>,
    vq: &MockSplitQueue<'_, GuestMemoryMmap<()>>,
    kick: &EventFd,
    call: &EventFd,
) {
    let used = GuestAddress(USED_RING);
    common::start_queue_with_used_ring(frontend, mem, vq, QUEUE_SIZE, used, kick, call);
}

/// A guest driver's view of queue 0: it posts chains and counts what it published.
struct Driver<'a> {
    mem: &'a GuestMemoryMmap<()>,
    vq: &'a MockSplitQueue<'a, GuestMemoryMmap<()>>,
    avail_idx: u16,
}

impl<'a> Driver<'a> {
    /// Puts a request into slot `slot` (descriptors `3 * slot ..`, its own header and status)
    /// with `data` as its one data descriptor, and publishes it; the caller kicks.
    fn post(&mut self, slot: u16, kind: u32, sector: u64, data: (u64, u32)) {
        let header_at = HEADERS + 16 * u64::from(slot);
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&kind.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem
            .write_slice(&header, GuestAddress(header_at))
            .unwrap();
        self.mem
            .write_obj(0xffu8, GuestAddress(STATUSES + u64::from(slot)))
            .unwrap();
        let (next, write) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
        let data_flags = if kind == VIRTIO_BLK_T_IN { write } else { 0 };
        let first = 3 * slot;
        let descs = [
            Descriptor::new(header_at, 16, next, first + 1),
            Descriptor::new(data.0, data.1, data_flags | next, first + 2),
            Descriptor::new(STATUSES + u64::from(slot), 1, write, 0),
        ];
        self.avail_idx = common::publish_chain(self.vq, QUEUE_SIZE, self.avail_idx, first, &descs);
    }

    fn status(&self, slot: u16) -> u8 {
        self.mem
            .read_obj(GuestAddress(STATUSES + u64::from(slot)))
            .unwrap()
    }

    fn used_idx(&self) -> u16 {
        u16::from_le(self.mem.read_obj(GuestAddress(USED_RING + 2)).unwrap())
    }

    fn reset_used_idx(&self) {
        self.mem
            .write_obj(0u16, GuestAddress(USED_RING + 2))
            .unwrap();
    }

    /// With EVENT_IDX, asks for an interrupt at the next completion, as Linux's
    /// `virtqueue_enable_cb` does: `used_event` = the used index seen last.
    fn want_interrupt_after(&self, seen: u16) {
        let used_event = self.vq.avail_addr().0 + 4 + 2 * u64::from(QUEUE_SIZE);
        self.mem.write_obj(seen, GuestAddress(used_event)).unwrap();
    }
}

/// Waits up to `limit` for the call eventfd and consumes it; returns whether it fired.
fn interrupted_within(call: &EventFd, limit: Duration) -> bool {
    let mut fds = [libc::pollfd {
        fd: call.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: one valid pollfd, length passed exactly.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), 1, limit.as_millis() as i32) };
    ready == 1 && call.read().is_ok()
}

/// Polls the used index (not the call fd) until it reaches `target`.
fn wait_used(driver: &Driver<'_>, target: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while driver.used_idx() != target {
        assert!(Instant::now() < deadline, "request not completed in time");
        thread::sleep(Duration::from_millis(1));
    }
}

/// Batches of 1 to `MAX_BATCH` requests, each posted at once and kicked once. The guest
/// sleeps on the call eventfd like a driver waiting for its interrupt (with EVENT_IDX it first
/// asks for one at the next completion, as Linux's `virtqueue_enable_cb` does): every time it
/// wakes it reads the used index, and it must never wait in vain while completions it has
/// not seen are outstanding. Every round gets at least one interrupt, and a batch kicked once
/// is answered with few interrupts, not one per request.
fn every_batch_ends_with_an_interrupt(event_idx: bool, poll_max: Duration) {
    let daemon = start_daemon(poll_max);
    let mem = common::guest_memory_over(MEM_SIZE, MEM_SIZE as u64);
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let kick = EventFd::new(0).unwrap();
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let frontend = connect(&daemon.socket, &mem, &vq, event_idx, &kick, &call);
    let mut driver = Driver {
        mem: &mem,
        vq: &vq,
        avail_idx: 0,
    };
    let batches = [1u16, 2, 7, 1, 32, 3, MAX_BATCH, 1, 16, 5, 1, 1, 48, 2];
    for (round, &batch) in batches.iter().enumerate() {
        let seen = driver.used_idx();
        if event_idx {
            driver.want_interrupt_after(seen);
        }
        for slot in 0..batch {
            let page = u64::from(slot) + (round as u64 % 4) * 64;
            let data = DATA + u64::from(slot) * 4096;
            let kind = if round % 2 == 0 {
                mem.write_slice(&[round as u8; 4096], GuestAddress(data))
                    .unwrap();
                VIRTIO_BLK_T_OUT
            } else {
                VIRTIO_BLK_T_IN
            };
            driver.post(slot, kind, page * 8, (data, 4096));
        }
        kick.write(1).unwrap();
        let target = seen.wrapping_add(batch);
        let mut interrupts = 0u16;
        loop {
            let now = driver.used_idx();
            if now == target {
                break;
            }
            if event_idx {
                driver.want_interrupt_after(now);
                // As Linux's `virtqueue_enable_cb` (with its `virtio_mb`): completions that
                // arrived while `used_event` was written may have been judged against its
                // old value; take them before sleeping instead of waiting for an interrupt
                // that is not owed.
                std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
                if driver.used_idx() != now {
                    continue;
                }
            }
            assert!(
                interrupted_within(&call, Duration::from_secs(5)),
                "round {round} ({batch} requests): no interrupt while the used index is {} of {target}",
                driver.used_idx()
            );
            interrupts += 1;
        }
        // The daemon may complete the batch before the guest looks; its interrupt follows.
        if interrupts == 0 {
            assert!(
                interrupted_within(&call, Duration::from_secs(5)),
                "round {round} ({batch} requests) completed without an interrupt"
            );
            interrupts = 1;
        }
        if batch == MAX_BATCH {
            assert!(
                interrupts <= batch / 4,
                "{interrupts} interrupts for {batch} requests kicked at once"
            );
        }
        for slot in 0..batch {
            assert_eq!(driver.status(slot), 0, "round {round} slot {slot}");
        }
        // An interrupt left over for completions already seen is harmless; drop it so the
        // next round counts only its own.
        let _ = call.read();
    }
    assert_eq!(daemon.store.stats().io.invalid_io, 0);
    drop(frontend);
    daemon.join_within(Duration::from_secs(10)).unwrap();
}

#[test]
fn without_event_idx_every_batch_gets_an_interrupt() {
    every_batch_ends_with_an_interrupt(false, Duration::ZERO);
}

#[test]
fn without_event_idx_and_with_polling_every_batch_gets_an_interrupt() {
    every_batch_ends_with_an_interrupt(false, Duration::from_micros(50));
}

#[test]
fn with_event_idx_every_batch_gets_an_interrupt() {
    every_batch_ends_with_an_interrupt(true, Duration::ZERO);
}

/// A round of 64 reads kicked at once is signalled every 8 completions when the daemon has a
/// CPU to spare for the guest (one queue thread serving, no worker busy), so the guest can
/// take the first completions while the rest are served; on one CPU, once at the end.
#[test]
fn a_long_round_is_signalled_early_when_a_cpu_is_spare() {
    // Arrange
    let daemon = start_daemon(Duration::ZERO);
    let mem = common::guest_memory_over(MEM_SIZE, MEM_SIZE as u64);
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let kick = EventFd::new(0).unwrap();
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let frontend = connect(&daemon.socket, &mem, &vq, false, &kick, &call);
    let mut driver = Driver {
        mem: &mem,
        vq: &vq,
        avail_idx: 0,
    };
    let cpus = thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);

    // Act: 64 reads of pages never written (no compression worker has anything to do).
    for slot in 0..MAX_BATCH {
        let data = DATA + u64::from(slot) * 4096;
        driver.post(slot, VIRTIO_BLK_T_IN, u64::from(slot) * 8, (data, 4096));
    }
    kick.write(1).unwrap();
    wait_used(&driver, MAX_BATCH);

    // Assert: the call eventfd counts every signal (the guest read none meanwhile).
    let signals = call.read().unwrap();
    let expected = if cpus >= 2 {
        u64::from(MAX_BATCH) / 8
    } else {
        1
    };
    assert_eq!(
        signals, expected,
        "signals for {MAX_BATCH} reads on {cpus} CPUs"
    );
    for slot in 0..MAX_BATCH {
        assert_eq!(driver.status(slot), 0, "slot {slot}");
    }
    drop(frontend);
    daemon.join_within(Duration::from_secs(10)).unwrap();
}

/// A page whose bytes 2..4 (`avail->idx` when the page lands on the avail ring) are `idx`
/// and bytes 0..2 (`avail->flags`) zero.
fn ring_page(idx: u16) -> [u8; 4096] {
    let mut page = [0u8; 4096];
    for (i, byte) in page.iter_mut().enumerate() {
        *byte = (i as u8).wrapping_mul(37).wrapping_add(5);
    }
    page[0..2].copy_from_slice(&[0, 0]);
    page[2..4].copy_from_slice(&idx.to_le_bytes());
    page
}

/// A read whose data buffer is the guest's own avail ring (and the used ring after it) is
/// served like any other: the page lands there and the status says OK. With an `avail->idx`
/// in the page that keeps the queue consistent, the queue goes on serving; with one that
/// breaks it, only this queue is refused until the guest restarts it, the daemon serves on.
#[test]
fn a_read_into_the_avail_ring_completes_and_the_daemon_serves_on() {
    let daemon = start_daemon(Duration::ZERO);
    let mem = common::guest_memory_over(MEM_SIZE, MEM_SIZE as u64);
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let kick = EventFd::new(0).unwrap();
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut frontend = connect(&daemon.socket, &mem, &vq, false, &kick, &call);
    let mut driver = Driver {
        mem: &mem,
        vq: &vq,
        avail_idx: 0,
    };
    let avail = vq.avail_addr().0;
    let avail_len = 4 + 2 * usize::from(QUEUE_SIZE) + 2;

    // Consistent: after the write (1) and the read (2), avail->idx stays 2.
    let page = ring_page(2);
    mem.write_slice(&page, GuestAddress(DATA)).unwrap();
    driver.post(0, VIRTIO_BLK_T_OUT, 8, (DATA, 4096));
    kick.write(1).unwrap();
    wait_used(&driver, 1);
    driver.post(1, VIRTIO_BLK_T_IN, 8, (avail, 4096));
    kick.write(1).unwrap();
    wait_used(&driver, 2);
    assert_eq!(driver.status(1), 0);
    let mut ring = vec![0u8; avail_len];
    mem.read_slice(&mut ring, GuestAddress(avail)).unwrap();
    assert_eq!(ring, page[..avail_len], "the page landed on the avail ring");
    mem.write_slice(&[0u8; 4096], GuestAddress(DATA)).unwrap();
    driver.post(2, VIRTIO_BLK_T_IN, 8, (DATA, 4096));
    kick.write(1).unwrap();
    wait_used(&driver, 3);
    assert_eq!(
        (
            driver.status(2),
            mem.read_obj::<[u8; 4]>(GuestAddress(DATA + 4)).unwrap()
        ),
        (0, [page[4], page[5], page[6], page[7]]),
        "the queue serves on"
    );

    // Broken: avail->idx 100 ahead of the device (inside the ring: garbage chains are served
    // and fail one by one) and then far ahead (the queue is refused). Either way the read
    // itself completes, and after a restart the queue serves again.
    for ahead in [100u16, 1000] {
        let page = ring_page(driver.avail_idx.wrapping_add(1).wrapping_add(ahead));
        mem.write_slice(&page, GuestAddress(DATA)).unwrap();
        driver.post(0, VIRTIO_BLK_T_OUT, 16, (DATA, 4096));
        kick.write(1).unwrap();
        wait_used(&driver, driver.avail_idx);
        driver.post(1, VIRTIO_BLK_T_IN, 16, (avail, 4096));
        let used_before = driver.used_idx();
        kick.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while driver.status(1) == 0xff {
            assert!(
                Instant::now() < deadline,
                "the read into the ring never completed"
            );
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            driver.status(1),
            0,
            "{ahead} ahead: the read itself succeeded"
        );
        assert_ne!(driver.used_idx(), used_before);
        thread::sleep(Duration::from_millis(50));
        assert!(daemon.is_running(), "the daemon is still running");

        // The guest resets its queue.
        frontend.get_vring_base(0).unwrap();
        vq.avail().idx().store(0);
        driver.reset_used_idx();
        driver.avail_idx = 0;
        start_queue(&mut frontend, &mem, &vq, &kick, &call);
        mem.write_slice(&[0u8; 4096], GuestAddress(DATA)).unwrap();
        driver.post(2, VIRTIO_BLK_T_IN, 16, (DATA, 4096));
        kick.write(1).unwrap();
        wait_used(&driver, 1);
        assert_eq!(
            (
                driver.status(2),
                mem.read_obj::<[u8; 4]>(GuestAddress(DATA + 4)).unwrap()
            ),
            (0, [page[4], page[5], page[6], page[7]]),
            "{ahead} ahead: the queue serves again after the restart"
        );
    }
    drop(frontend);
    daemon.join_within(Duration::from_secs(10)).unwrap();
}

/// A store with a backing file that takes `delay` for every read, pages `0..slow` written back
/// to it and pages `slow..on` in RAM, each filled by the page generator.
fn slow_store(delay: Duration, slow: u64, on: u64) -> (tempfile::TempDir, Arc<PageStore>) {
    use vhost_user_zram::store::backing::{BackingFile, FaultyIo};
    let dir = tempfile::tempdir().unwrap();
    let mut faults = None;
    let file = BackingFile::open_wrapped(&dir.path().join("backing"), |io| {
        let slow = Arc::new(FaultyIo::new(io));
        faults = Some(Arc::clone(&slow));
        Box::new(slow)
    })
    .unwrap();
    let store = PageStore::new(StoreConfig {
        capacity_pages: PAGES,
        algorithm: Algorithm::Lz4,
        level: None,
        mem_limit: None,
    })
    .unwrap()
    .with_backing_file(file);
    for index in 0..on {
        store.write(index, &generated(index)).unwrap();
    }
    let request = format!("--pages 0-{}", slow - 1).parse().unwrap();
    assert_eq!(store.writeback(&request).unwrap().written, slow);
    faults.unwrap().set_read_delay(delay);
    (dir, Arc::new(store))
}

/// Page `index` as the page generator makes it (text-like, compressible).
fn generated(index: u64) -> [u8; 4096] {
    let mut page = [0u8; 4096];
    vhost_user_zram::pagegen::fill_kind(
        vhost_user_zram::pagegen::PageKind::Text,
        &mut vhost_user_zram::pagegen::SplitMix64::new(index + 1),
        &mut page,
    );
    page
}

/// Serves `store` with the real backend on a socket in `dir`, as the daemon does; stopping a
/// queue waits `stop_timeout` for requests still running.
fn serve(
    dir: &Path,
    store: &Arc<PageStore>,
    stop_timeout: Duration,
) -> (std::path::PathBuf, thread::JoinHandle<()>) {
    use vhost_user_backend::VhostUserDaemon;
    use vhost_user_zram::blk::backend::{GuestMap, GuestMemory};
    use vhost_user_zram::blk::BlkBackend;
    let socket = dir.join("slow.sock");
    let mut device = DeviceConfig::new(PAGES);
    device.queue_size = QUEUE_SIZE;
    let mem = GuestMemory::new(GuestMap::new());
    let backend = Arc::new(BlkBackend::new(Arc::clone(store), device, mem.clone()));
    backend.set_stop_timeout(stop_timeout);
    let mut listener = vhost::vhost_user::Listener::new(&socket, true).unwrap();
    let runner = thread::spawn(move || {
        let mut daemon = VhostUserDaemon::new("slow".into(), backend.clone(), mem).unwrap();
        backend.attach(&daemon).unwrap();
        daemon.start(&mut listener).unwrap();
        let _ = daemon.wait();
        backend.disconnected();
        let _ = backend.stop(Duration::from_secs(5));
        for handler in daemon.get_epoll_handlers() {
            handler.send_exit_event();
        }
    });
    (socket, runner)
}

/// What the guest's buffer and status byte hold before the device answers.
const UNTOUCHED: u8 = 0xee;

/// Posts a read of page 0 (on the slow file) into slot 0, with the buffer and status marked
/// untouched, and kicks.
fn post_slow_read(driver: &mut Driver<'_>, kick: &EventFd) {
    driver
        .mem
        .write_slice(&[UNTOUCHED; 4096], GuestAddress(DATA))
        .unwrap();
    driver.post(0, VIRTIO_BLK_T_IN, 0, (DATA, 4096));
    driver
        .mem
        .write_obj(UNTOUCHED, GuestAddress(STATUSES))
        .unwrap();
    kick.write(1).unwrap();
    // Let the queue thread hand it to a read-back thread, which is then in the slow file.
    thread::sleep(Duration::from_millis(100));
}

/// Waits past the file's delay, then checks that nothing wrote the request's buffer, status
/// byte or used ring: the stop gave it up, and it stays given up.
fn assert_never_written(driver: &Driver<'_>, delay: Duration, what: &str) {
    thread::sleep(delay + Duration::from_millis(500));
    let mut data = [0u8; 4096];
    driver
        .mem
        .read_slice(&mut data, GuestAddress(DATA))
        .unwrap();
    assert!(
        data.iter().all(|&b| b == UNTOUCHED),
        "{what}: the cancelled read wrote the guest's buffer afterwards"
    );
    assert_eq!(
        driver.status(0),
        UNTOUCHED,
        "{what}: the cancelled read wrote its status byte afterwards"
    );
    assert_eq!(
        driver.used_idx(),
        0,
        "{what}: a used entry was written afterwards"
    );
}

/// How long every file read takes in the stop tests: longer than any stop timeout they set.
const HUNG_READ: Duration = Duration::from_millis(1500);

/// A frontend with queue 0 running over a store whose file reads take [`HUNG_READ`], and a
/// read of a page on that file posted and in the file.
struct ReadInTheFile<'a> {
    frontend: Frontend,
    driver: Driver<'a>,
    runner: thread::JoinHandle<()>,
}

/// Serves a slow store with `stop_timeout`, connects, posts a read of a page on the file and
/// runs `test` while that read is in the file; the backend must have ended when `test`
/// returns (it drops the frontend).
fn with_a_read_in_the_file(stop_timeout: Duration, test: impl FnOnce(ReadInTheFile<'_>)) {
    let (dir, store) = slow_store(HUNG_READ, 4, 8);
    let (socket, runner) = serve(dir.path(), &store, stop_timeout);
    let mem = common::guest_memory_over(MEM_SIZE, MEM_SIZE as u64);
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let (kick, call) = (
        EventFd::new(0).unwrap(),
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    );
    let frontend = connect(&socket, &mem, &vq, true, &kick, &call);
    let mut driver = Driver {
        mem: &mem,
        vq: &vq,
        avail_idx: 0,
    };
    post_slow_read(&mut driver, &kick);
    test(ReadInTheFile {
        frontend,
        driver,
        runner,
    });
}

/// The frontend stops the queue (`GET_VRING_BASE`) while a read is stuck in a hung backing
/// file: after the stop timeout the read is cancelled, and when the file read finally returns
/// it writes nothing into guest memory — the frontend may already have given it to someone
/// else.
#[test]
fn a_read_cancelled_by_get_vring_base_never_writes_guest_memory() {
    with_a_read_in_the_file(Duration::from_millis(100), |t| {
        let started = Instant::now();
        assert_eq!(t.frontend.get_vring_base(0).unwrap(), 1);

        assert!(
            started.elapsed() < HUNG_READ,
            "GET_VRING_BASE waited for the hung read instead of cancelling it"
        );
        assert_never_written(&t.driver, HUNG_READ, "GET_VRING_BASE");
        drop(t.frontend);
        t.runner.join().unwrap();
    });
}

/// The frontend changes the memory table while a read is in the file. With time to finish,
/// the read lands before the change is answered; stuck past the stop timeout, it is cancelled
/// and never writes the old memory afterwards.
#[test]
fn a_memory_table_change_waits_for_or_cancels_reads_in_flight() {
    for (stop_timeout, lands) in [
        (Duration::from_secs(10), true),
        (Duration::from_millis(100), false),
    ] {
        with_a_read_in_the_file(stop_timeout, |t| {
            let mem = t.driver.mem;
            let region = VhostUserMemoryRegionInfo::from_guest_region(
                mem.find_region(GuestAddress(0)).unwrap(),
            )
            .unwrap();
            // As QEMU does with REPLY_ACK: the answer comes once the backend has applied it.
            t.frontend
                .set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
            t.frontend.set_mem_table(&[region]).unwrap();

            if lands {
                assert_eq!(t.driver.used_idx(), 1, "the read landed before the answer");
                assert_eq!(t.driver.status(0), 0);
                let mut data = [0u8; 4096];
                mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
                assert!(data == generated(0), "page 0 read back wrong");
            } else {
                assert_never_written(&t.driver, HUNG_READ, "SET_MEM_TABLE");
            }
            drop(t.frontend);
            t.runner.join().unwrap();
        });
    }
}

/// A virtio reset (`RESET_DEVICE`) and a disconnect while a read is stuck in the file: both
/// cancel it, and it never writes guest memory afterwards.
#[test]
fn a_reset_or_a_disconnect_cancels_reads_in_flight() {
    for reset in [true, false] {
        let what = if reset { "RESET_DEVICE" } else { "disconnect" };
        with_a_read_in_the_file(Duration::from_millis(100), |mut t| {
            let started = Instant::now();
            if reset {
                t.frontend
                    .set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
                t.frontend.reset_device().unwrap();
                assert!(
                    started.elapsed() < HUNG_READ,
                    "{what} waited for the hung read"
                );
                drop(t.frontend);
            } else {
                drop(t.frontend);
                // The backend's connection ends; `serve` then cancels and shuts down.
                while !t.runner.is_finished() {
                    assert!(
                        started.elapsed() < Duration::from_secs(10),
                        "the backend did not stop"
                    );
                    thread::sleep(Duration::from_millis(5));
                }
            }
            assert_never_written(&t.driver, HUNG_READ, what);
            t.runner.join().unwrap();
        });
    }
}

/// A read of a page on a slow backing file is served off the queue thread: a read of a page in
/// RAM posted after it, in the same kick, completes first; the slow one completes later with
/// the right data; and stopping the queue waits for it, so the ring the frontend takes back
/// is complete.
#[test]
fn a_slow_read_from_the_backing_file_holds_up_no_other_request() {
    let delay = Duration::from_millis(400);
    let (dir, store) = slow_store(delay, 4, 8);
    let (socket, runner) = serve(dir.path(), &store, Duration::from_secs(10));
    let mem = common::guest_memory_over(MEM_SIZE, MEM_SIZE as u64);
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let kick = EventFd::new(0).unwrap();
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let frontend = connect(&socket, &mem, &vq, true, &kick, &call);
    let mut driver = Driver {
        mem: &mem,
        vq: &vq,
        avail_idx: 0,
    };

    let started = Instant::now();
    driver.post(0, VIRTIO_BLK_T_IN, 0, (DATA, 4096)); // page 0: on the slow file
    driver.post(1, VIRTIO_BLK_T_IN, 5 * 8, (DATA + 4096, 4096)); // page 5: in RAM
    kick.write(1).unwrap();
    while driver.status(1) == 0xff {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the RAM read never completed"
        );
        thread::sleep(Duration::from_millis(1));
    }
    let fast = started.elapsed();
    assert_eq!(driver.status(0), 0xff, "the file read is still running");
    assert!(
        fast < delay / 2,
        "the RAM read waited {fast:?} behind the file read"
    );
    wait_used(&driver, 2);
    assert!(started.elapsed() >= delay);
    let mut data = [0u8; 4096];
    for (slot, page) in [(0u16, 0u64), (1, 5)] {
        assert_eq!(driver.status(slot), 0);
        mem.read_slice(&mut data, GuestAddress(DATA + 4096 * u64::from(slot)))
            .unwrap();
        assert!(
            data == generated(page),
            "slot {slot}: page {page} read back wrong"
        );
    }

    // A slow read still running when the frontend stops the queue is on the ring before
    // GET_VRING_BASE answers.
    driver.post(2, VIRTIO_BLK_T_IN, 2 * 8, (DATA + 2 * 4096, 4096));
    kick.write(1).unwrap();
    thread::sleep(Duration::from_millis(50));
    let base = frontend.get_vring_base(0).unwrap();
    assert_eq!(base, 3);
    assert_eq!(
        driver.used_idx(),
        3,
        "the deferred read landed before the queue stopped"
    );
    assert_eq!(driver.status(2), 0);
    let stats = store.stats();
    assert_eq!((stats.io.failed_reads, stats.io.invalid_io), (0, 0));
    assert!(stats.writeback.bd_reads >= 2);
    drop(frontend);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !runner.is_finished() {
        assert!(Instant::now() < deadline, "the backend did not stop");
        thread::sleep(Duration::from_millis(10));
    }
}
