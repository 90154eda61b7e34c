// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vhost-user inflight I/O tracking, end to end: a daemon that dies with requests taken from
//! its ring and not completed, and the daemon the frontend reconnects to.
//!
//! Each test plays QEMU (7.2, `-chardev socket,reconnect=1`) with the vhost crate's `Frontend`
//! over a Unix socket: negotiate `INFLIGHT_SHMFD`, `GET_INFLIGHT_FD` then `SET_INFLIGHT_FD`,
//! memfd-backed shared guest memory with one split queue. The first backend's store blocks
//! its reads (served by read-back threads) and one write (on the queue thread), so it takes
//! requests it never completes; the frontend then hangs up on it, as on a daemon that died,
//! and connects to a second backend over the same page data. QEMU's reconnect sends
//! `SET_INFLIGHT_FD` with the region it kept (no `GET`), the memory table, and
//! `SET_VRING_BASE` with the ring's used index (its `GET_VRING_BASE` to the dead daemon
//! failed). The first backend's blocked threads never return, so nothing of it writes guest
//! memory afterwards.

// Descriptor indexes and lengths here are small constants.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, Listener, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_user_backend::VhostUserDaemon;
use vhost_user_zram::blk::backend::{GuestMap, GuestMemory};
use vhost_user_zram::blk::inflight::queue_region_len;
use vhost_user_zram::blk::{BlkBackend, BlockBackend, Continuity, DeviceConfig};
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
const HEADERS: u64 = 0x10_0000;
const STATUSES: u64 = 0x11_0000;
const DATA: u64 = 0x20_0000;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// What a status byte holds before the device answers.
const UNANSWERED: u8 = 0xff;

/// Page data that outlives a backend: the "state file" two daemons share.
type Pages = Arc<Mutex<HashMap<u64, Box<[u8; PAGE_SIZE]>>>>;

/// One store operation, as the store saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read(u64),
    Write(u64),
}

/// A page store over shared [`Pages`] that records its operations and can block some of them
/// for good (a daemon that is about to die).
struct TestStore {
    pages: Pages,
    ops: Mutex<Vec<Op>>,
    /// Every read blocks, and reads are served off the queue thread (as reads of written-back
    /// pages are), so the queue thread goes on taking requests.
    block_reads: bool,
    /// Writes of this page block, on the queue thread.
    block_write_of: Option<u64>,
    /// Operations blocked so far.
    blocked: AtomicUsize,
}

impl TestStore {
    fn new(pages: &Pages) -> Self {
        TestStore {
            pages: Arc::clone(pages),
            ops: Mutex::new(Vec::new()),
            block_reads: false,
            block_write_of: None,
            blocked: AtomicUsize::new(0),
        }
    }

    /// A store whose reads and whose writes of page `page` never return.
    fn dying(pages: &Pages, page: u64) -> Self {
        TestStore {
            block_reads: true,
            block_write_of: Some(page),
            ..TestStore::new(pages)
        }
    }

    fn block_forever(&self) -> ! {
        self.blocked.fetch_add(1, Ordering::AcqRel);
        loop {
            thread::park();
        }
    }

    fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap().clone()
    }
}

/// What the test store never fails with.
#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

// SAFETY: `read_page` only copies a stored page (or zeros) into the page it is given, keeps no
// reference to it and never reads it back.
unsafe impl BlockBackend for TestStore {
    type Error = Never;

    fn capacity_pages(&self) -> u64 {
        PAGES
    }

    fn read_page(&self, index: u64, page: &mut [u8; PAGE_SIZE]) -> Result<(), Never> {
        if self.block_reads {
            self.block_forever();
        }
        self.ops.lock().unwrap().push(Op::Read(index));
        match self.pages.lock().unwrap().get(&index) {
            Some(stored) => page.copy_from_slice(&stored[..]),
            None => page.fill(0),
        }
        Ok(())
    }

    fn write_page(&self, index: u64, page: &[u8; PAGE_SIZE]) -> Result<(), Never> {
        if self.block_write_of == Some(index) {
            self.block_forever();
        }
        self.ops.lock().unwrap().push(Op::Write(index));
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
        let mut stored = self.pages.lock().unwrap();
        for index in pages {
            stored.remove(&index);
        }
        Ok(())
    }

    fn count_invalid_io(&self) {}

    fn reads_slowly(&self, _pages: Range<u64>) -> bool {
        self.block_reads
    }

    fn may_read_slowly(&self) -> bool {
        self.block_reads
    }
}

/// A backend served on its own socket, as the daemon serves one connection.
struct Served {
    socket: PathBuf,
    backend: Arc<BlkBackend<TestStore>>,
    store: Arc<TestStore>,
    thread: thread::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

fn serve(store: TestStore, continuity: Continuity) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("zram.sock");
    let mut device = DeviceConfig::new(PAGES);
    device.queue_size = QUEUE_SIZE;
    let mem = GuestMemory::new(GuestMap::new());
    let store = Arc::new(store);
    let backend = Arc::new(BlkBackend::new(Arc::clone(&store), device, mem.clone()));
    backend.set_continuity(continuity);
    let mut listener = Listener::new(&socket, true).unwrap();
    let served = Arc::clone(&backend);
    let thread = thread::spawn(move || {
        let mut daemon = VhostUserDaemon::new("inflight".into(), served.clone(), mem).unwrap();
        served.attach(&daemon).unwrap();
        daemon.start(&mut listener).unwrap();
        let _ = daemon.wait();
        served.disconnected();
        let _ = served.stop(Duration::from_millis(100));
        for handler in daemon.get_epoll_handlers() {
            handler.send_exit_event();
        }
    });
    Served {
        socket,
        backend,
        store,
        thread,
        _dir: dir,
    }
}

/// Connects and negotiates every feature the backend offers, with `NEED_REPLY` on every
/// message (QEMU does with `REPLY_ACK`), so a refused message is an error here.
fn connect(served: &Served) -> Frontend {
    let mut frontend = Frontend::connect(&served.socket, 1).unwrap();
    frontend.set_owner().unwrap();
    let features = frontend.get_features().unwrap();
    frontend.set_features(features).unwrap();
    let protocol = frontend.get_protocol_features().unwrap();
    assert!(protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
    frontend.set_protocol_features(protocol).unwrap();
    frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    frontend
}

fn memory_region(mem: &GuestMemoryMmap<()>) -> VhostUserMemoryRegionInfo {
    VhostUserMemoryRegionInfo::from_guest_region(mem.find_region(GuestAddress(0)).unwrap()).unwrap()
}

/// The region QEMU's `vhost_dev_get_inflight` asks for: one queue of `QUEUE_SIZE`.
fn asked_region() -> VhostUserInflight {
    VhostUserInflight {
        mmap_size: 0,
        mmap_offset: 0,
        num_queues: 1,
        queue_size: QUEUE_SIZE,
    }
}

/// The guest: shared memory, one split queue and its eventfds.
struct Guest<'m> {
    mem: &'m GuestMemoryMmap<()>,
    vq: MockSplitQueue<'m, GuestMemoryMmap<()>>,
    kick: EventFd,
    call: EventFd,
    avail_idx: u16,
}

impl<'m> Guest<'m> {
    fn new(mem: &'m GuestMemoryMmap<()>) -> Self {
        Guest {
            mem,
            vq: MockSplitQueue::new(mem, QUEUE_SIZE),
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            avail_idx: 0,
        }
    }

    /// The vring messages of QEMU's `vhost_virtqueue_start`, with `base` as the avail index.
    fn start_queue(&self, frontend: &mut Frontend, base: u16) {
        let host = |gpa: GuestAddress| self.mem.get_host_address(gpa).unwrap() as u64;
        frontend.set_vring_num(0, QUEUE_SIZE).unwrap();
        frontend.set_vring_base(0, base).unwrap();
        frontend
            .set_vring_addr(
                0,
                &VringConfigData {
                    queue_max_size: QUEUE_SIZE,
                    queue_size: QUEUE_SIZE,
                    flags: 0,
                    desc_table_addr: host(self.vq.desc_table_addr()),
                    used_ring_addr: host(self.vq.used_addr()),
                    avail_ring_addr: host(self.vq.avail_addr()),
                    log_addr: None,
                },
            )
            .unwrap();
        frontend.set_vring_kick(0, &self.kick).unwrap();
        frontend.set_vring_call(0, &self.call).unwrap();
        frontend.set_vring_enable(0, true).unwrap();
    }

    /// Posts a one-page request in slot `slot` (descriptors `3 * slot ..`, its own header,
    /// status byte and data page); a write carries `pattern(seed)`. Returns the head.
    fn post(&mut self, slot: u16, kind: u32, page: u64, seed: u8) -> u16 {
        let header_at = HEADERS + 16 * u64::from(slot);
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&kind.to_le_bytes());
        header[8..16].copy_from_slice(&(page * 8).to_le_bytes());
        self.mem
            .write_slice(&header, GuestAddress(header_at))
            .unwrap();
        let data = data_of(slot);
        let fill = if kind == VIRTIO_BLK_T_OUT {
            pattern(seed)
        } else {
            vec![0xee; PAGE_SIZE]
        };
        self.mem.write_slice(&fill, GuestAddress(data)).unwrap();
        self.mem
            .write_obj(UNANSWERED, GuestAddress(STATUSES + u64::from(slot)))
            .unwrap();
        let (next, write) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
        let data_flags = if kind == VIRTIO_BLK_T_IN { write } else { 0 };
        let head = 3 * slot;
        let descs = [
            Descriptor::new(header_at, 16, next, head + 1),
            Descriptor::new(data, PAGE_SIZE as u32, data_flags | next, head + 2),
            Descriptor::new(STATUSES + u64::from(slot), 1, write, 0),
        ];
        self.avail_idx = common::publish_chain(&self.vq, QUEUE_SIZE, self.avail_idx, head, &descs);
        head
    }

    fn status(&self, slot: u16) -> u8 {
        self.mem
            .read_obj(GuestAddress(STATUSES + u64::from(slot)))
            .unwrap()
    }

    fn data(&self, slot: u16) -> Vec<u8> {
        let mut page = vec![0u8; PAGE_SIZE];
        self.mem
            .read_slice(&mut page, GuestAddress(data_of(slot)))
            .unwrap();
        page
    }

    fn used_idx(&self) -> u16 {
        self.vq.used().idx().load()
    }

    /// The heads of the used ring's entries `range`, in order.
    fn used_heads(&self, range: Range<u16>) -> Vec<u16> {
        range
            .map(|i| {
                let elem = self
                    .vq
                    .used()
                    .ring()
                    .ref_at(usize::from(i % QUEUE_SIZE))
                    .unwrap()
                    .load();
                elem.id() as u16
            })
            .collect()
    }

    fn wait_used(&self, target: u16) {
        poll_until(&format!("used index {target}"), || {
            self.used_idx() == target
        });
    }
}

fn data_of(slot: u16) -> u64 {
    DATA + PAGE_SIZE as u64 * u64::from(slot)
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..PAGE_SIZE as u32)
        .map(|i| (i % 251) as u8 ^ seed.wrapping_mul(37))
        .collect()
}

fn poll_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(2));
    }
}

/// The test's own mapping of the inflight region, to look at (and, for the "last batch" case,
/// to set up) what the backends wrote. Offsets are those of vhost-user.rst's split layout.
struct RegionView {
    base: *mut u8,
    len: usize,
}

impl RegionView {
    fn map(file: &File, len: u64) -> Self {
        let len = len as usize;
        // SAFETY: a new shared mapping of `len` bytes of the region's memfd, which is that
        // long and sealed against shrinking; it aliases no Rust object.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        RegionView {
            base: base.cast(),
            len,
        }
    }

    fn ptr(&self, offset: usize) -> *mut u8 {
        assert!(offset < self.len);
        // SAFETY: inside the mapping (checked above).
        unsafe { self.base.add(offset) }
    }

    fn u16_at(&self, offset: usize) -> u16 {
        // SAFETY: an aligned u16 inside the mapping; volatile, since a backend writes it too.
        unsafe { self.ptr(offset).cast::<u16>().read_volatile() }
    }

    fn set_u16(&self, offset: usize, value: u16) {
        // SAFETY: as `u16_at`.
        unsafe { self.ptr(offset).cast::<u16>().write_volatile(value) }
    }

    fn version(&self) -> u16 {
        self.u16_at(8)
    }

    fn set_desc_num(&self, value: u16) {
        self.set_u16(10, value);
    }

    fn set_version(&self, value: u16) {
        self.set_u16(8, value);
    }

    fn used_idx(&self) -> u16 {
        self.u16_at(14)
    }

    fn flag(&self, head: u16) -> u8 {
        // SAFETY: a byte inside the mapping (`ptr` checks); volatile, as `u16_at`.
        unsafe { self.ptr(16 + 16 * usize::from(head)).read_volatile() }
    }

    fn set_flag(&self, head: u16, value: u8) {
        // SAFETY: as `flag`.
        unsafe { self.ptr(16 + 16 * usize::from(head)).write_volatile(value) }
    }

    fn counter(&self, head: u16) -> u64 {
        // SAFETY: an aligned u64 inside the mapping; volatile, as `u16_at`.
        unsafe {
            self.ptr(16 + 16 * usize::from(head) + 8)
                .cast::<u64>()
                .read_volatile()
        }
    }
}

impl Drop for RegionView {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping `map` made, unmapped once.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// Slots of the requests the first daemon is given, which are also their avail ring positions
/// and, for writes, their pages: two writes it completes, two reads and a write it takes and
/// never completes, and a read it never takes. R1 comes before W2 in the ring but is still in
/// flight when W2 completes, so the requests to resubmit are not the ring's entries from the
/// used index on: a backend that went on from the vring base alone would serve W2 twice and
/// R1 never.
const W1: u16 = 0;
const R1: u16 = 1;
const W2: u16 = 2;
const R2: u16 = 3;
const W3: u16 = 4;
const R3: u16 = 5;

/// What the first daemon left behind when it "died".
struct Crashed {
    region: File,
    info: VhostUserInflight,
    pages: Pages,
}

/// The first daemon's life: GET and SET the region, then in ring order W1 (completed), R1 of
/// W1's page (stuck), W2 (completed), R2 of W2's page (stuck), W3 (stuck), R3 of W3's page
/// (never taken); then the frontend hangs up. Returns the region, with the used index at 2.
fn first_daemon_dies(guest: &mut Guest<'_>) -> Crashed {
    let pages: Pages = Arc::default();
    let first = serve(TestStore::dying(&pages, u64::from(W3)), Continuity::Fresh);
    let mut frontend = connect(&first);
    frontend.set_mem_table(&[memory_region(guest.mem)]).unwrap();
    let (info, region) = frontend.get_inflight_fd(&asked_region()).unwrap();
    assert_eq!(info.mmap_size, queue_region_len(QUEUE_SIZE));
    frontend.set_inflight_fd(&info, region.as_raw_fd()).unwrap();
    guest.start_queue(&mut frontend, 0);

    guest.post(W1, VIRTIO_BLK_T_OUT, u64::from(W1), 1);
    guest.post(R1, VIRTIO_BLK_T_IN, u64::from(W1), 0);
    guest.post(W2, VIRTIO_BLK_T_OUT, u64::from(W2), 2);
    guest.post(R2, VIRTIO_BLK_T_IN, u64::from(W2), 0);
    guest.post(W3, VIRTIO_BLK_T_OUT, u64::from(W3), 3);
    guest.post(R3, VIRTIO_BLK_T_IN, u64::from(W3), 0);
    guest.kick.write(1).unwrap();
    poll_until("three requests stuck in the store", || {
        first.store.blocked.load(Ordering::Acquire) == 3
    });
    guest.wait_used(2);
    thread::sleep(Duration::from_millis(50));
    assert_eq!(guest.used_heads(0..2), vec![3 * W1, 3 * W2]);
    assert_eq!(guest.used_idx(), 2, "the stuck requests were not completed");
    assert!(
        !first.backend.frontend_returned(),
        "it asked for its region"
    );
    assert!(!first.backend.is_refusing());

    // The daemon dies: the frontend sees the socket close and keeps the region. (Its stuck
    // threads never return, so nothing of it touches guest memory again; it is not joined.)
    drop(frontend);
    Crashed {
        region,
        info,
        pages,
    }
}

/// QEMU's reconnect: negotiation, the memory table, `SET_INFLIGHT_FD` with the kept region
/// (no `GET_INFLIGHT_FD`), and the vrings with the used index as their base.
fn reconnect(served: &Served, guest: &Guest<'_>, crashed: &Crashed) -> Frontend {
    let mut frontend = connect(served);
    frontend.set_mem_table(&[memory_region(guest.mem)]).unwrap();
    frontend
        .set_inflight_fd(&crashed.info, crashed.region.as_raw_fd())
        .unwrap();
    guest.start_queue(&mut frontend, guest.used_idx());
    frontend
}

#[test]
fn requests_taken_and_not_completed_are_resubmitted_once_in_order_after_a_reconnect() {
    let mem = common::guest_memory_over(MEM_SIZE, MEM_SIZE as u64);
    let mut guest = Guest::new(&mem);
    let crashed = first_daemon_dies(&mut guest);
    let view = RegionView::map(&crashed.region, crashed.info.mmap_size);
    let stuck = [R1, R2, W3].map(|slot| 3 * slot);
    for head in stuck {
        assert_eq!(view.flag(head), 1, "head {head} is in flight in the region");
    }
    assert!(view.counter(3 * R1) < view.counter(3 * R2));
    assert!(view.counter(3 * R2) < view.counter(3 * W3));
    assert_eq!(view.flag(3 * W1), 0);
    assert_eq!(view.used_idx(), 2);

    let second = serve(TestStore::new(&crashed.pages), Continuity::Recovered);
    let frontend = reconnect(&second, &guest, &crashed);
    guest.wait_used(6);

    // Resubmitted first, in the order the first daemon took them, then R3 from the ring.
    assert_eq!(guest.used_heads(2..6), vec![3 * R1, 3 * R2, 3 * W3, 3 * R3]);
    assert_eq!(
        second.store.ops(),
        vec![
            Op::Read(u64::from(W1)),
            Op::Read(u64::from(W2)),
            Op::Write(u64::from(W3)),
            Op::Read(u64::from(W3)),
        ],
        "R1, R2 and W3 resubmitted in the order they were taken, then R3"
    );
    assert_eq!(
        view.counter(3 * R3),
        9,
        "counters go on after the earlier daemon's last (5), through R1, R2, W3 again"
    );
    for slot in [R1, R2, W3, R3] {
        assert_eq!(guest.status(slot), OK, "slot {slot}");
    }
    assert!(guest.data(R1) == pattern(1), "R1 reads W1's page");
    assert!(guest.data(R2) == pattern(2), "R2 reads W2's page");
    assert!(guest.data(R3) == pattern(3), "R3 reads the resubmitted W3");
    assert!(second.backend.frontend_returned());
    assert!(!second.backend.is_refusing());
    for head in stuck {
        assert_eq!(view.flag(head), 0, "head {head} completed");
    }
    assert_eq!(view.used_idx(), 6);

    // Nothing comes twice, and new requests are served after them.
    thread::sleep(Duration::from_millis(50));
    assert_eq!(guest.used_idx(), 6);
    guest.post(6, VIRTIO_BLK_T_OUT, 9, 9);
    guest.post(7, VIRTIO_BLK_T_IN, 9, 0);
    guest.kick.write(1).unwrap();
    guest.wait_used(8);
    assert_eq!(guest.used_heads(6..8), vec![18, 21]);
    assert_eq!((guest.status(6), guest.status(7)), (OK, OK));
    assert!(guest.data(7) == pattern(9));
    let heads = guest.used_heads(0..8);
    let mut unique = heads.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), heads.len(), "used ring: {heads:?}");

    drop(frontend);
    second.thread.join().unwrap();
}

#[test]
fn a_request_whose_used_entry_was_written_before_the_crash_is_not_resubmitted() {
    let mem = common::guest_memory_over(MEM_SIZE, MEM_SIZE as u64);
    let mut guest = Guest::new(&mem);
    let crashed = first_daemon_dies(&mut guest);
    // The daemon died between W2's used index and clearing its flag (libvhost-user's
    // pre_put / post_put): W2 is still marked, the region's used index is one behind.
    let view = RegionView::map(&crashed.region, crashed.info.mmap_size);
    view.set_flag(3 * W2, 1);
    view.set_u16(12, 3 * W2);
    view.set_u16(14, 1);

    let second = serve(TestStore::new(&crashed.pages), Continuity::Recovered);
    let frontend = reconnect(&second, &guest, &crashed);
    guest.wait_used(6);
    thread::sleep(Duration::from_millis(50));
    assert_eq!(guest.used_idx(), 6, "W2 was not completed a second time");
    assert_eq!(
        guest.used_heads(0..6),
        vec![3 * W1, 3 * W2, 3 * R1, 3 * R2, 3 * W3, 3 * R3],
        "W2 once, before the crash"
    );
    assert!(!second.store.ops().contains(&Op::Write(u64::from(W2))));
    assert_eq!(view.flag(3 * W2), 0);
    assert_eq!(view.used_idx(), 6);

    drop(frontend);
    second.thread.join().unwrap();
}

/// A frontend that returns to a daemon that does not hold its pages: every request, the
/// resubmitted ones and new ones, fails with an I/O error and the store is never touched.
fn returning_frontend_is_refused(
    refuse: impl FnOnce(&BlkBackend<TestStore>),
    continuity: Continuity,
) {
    let mem = common::guest_memory_over(MEM_SIZE, MEM_SIZE as u64);
    let mut guest = Guest::new(&mem);
    let crashed = first_daemon_dies(&mut guest);

    let second = serve(TestStore::new(&crashed.pages), continuity);
    refuse(&second.backend);
    let frontend = reconnect(&second, &guest, &crashed);
    guest.wait_used(6);
    guest.post(6, VIRTIO_BLK_T_OUT, 9, 9);
    guest.post(7, VIRTIO_BLK_T_IN, 9, 0);
    guest.kick.write(1).unwrap();
    guest.wait_used(8);
    for slot in [R1, R2, W3, R3, 6, 7] {
        assert_eq!(guest.status(slot), IOERR, "slot {slot}");
    }
    assert!(second.store.ops().is_empty(), "{:?}", second.store.ops());
    assert!(!crashed.pages.lock().unwrap().contains_key(&9));
    assert!(second.backend.frontend_returned());
    assert!(second.backend.is_refusing());

    drop(frontend);
    second.thread.join().unwrap();
}

#[test]
fn a_frontend_returning_to_a_fresh_store_gets_ioerr_for_everything() {
    returning_frontend_is_refused(|_| {}, Continuity::Fresh);
}

#[test]
fn a_refused_device_gets_ioerr_for_everything_even_with_its_pages() {
    returning_frontend_is_refused(
        |backend| backend.refuse("test: the frontend's identity matches a lost state".into()),
        Continuity::Recovered,
    );
}

#[test]
fn a_first_start_with_get_and_set_is_not_a_returning_frontend() {
    let pages: Pages = Arc::default();
    let served = serve(TestStore::new(&pages), Continuity::Fresh);
    let mem = common::guest_memory_over(MEM_SIZE, MEM_SIZE as u64);
    let mut guest = Guest::new(&mem);
    let mut frontend = connect(&served);
    frontend.set_mem_table(&[memory_region(&mem)]).unwrap();
    let (info, region) = frontend.get_inflight_fd(&asked_region()).unwrap();
    frontend.set_inflight_fd(&info, region.as_raw_fd()).unwrap();
    guest.start_queue(&mut frontend, 0);
    guest.post(0, VIRTIO_BLK_T_OUT, 1, 5);
    guest.kick.write(1).unwrap();
    guest.wait_used(1);
    assert_eq!(guest.status(0), OK);
    assert!(!served.backend.frontend_returned());
    let view = RegionView::map(&region, info.mmap_size);
    assert_eq!(view.version(), 1, "stamped when the queue started");
    assert_eq!((view.flag(0), view.used_idx()), (0, 1));
    drop(frontend);
    served.thread.join().unwrap();
}

/// Sends `SET_INFLIGHT_FD` with `info` and `fd` to a fresh backend and checks it is refused
/// without harm: the frontend gets an error, the connection ends, nothing panicked.
fn set_is_refused(what: &str, info: &VhostUserInflight, fd: &impl AsRawFd) {
    let pages: Pages = Arc::default();
    let served = serve(TestStore::new(&pages), Continuity::Recovered);
    let mut frontend = connect(&served);
    assert!(
        frontend.set_inflight_fd(info, fd.as_raw_fd()).is_err(),
        "{what}: accepted"
    );
    drop(frontend);
    served
        .thread
        .join()
        .unwrap_or_else(|_| panic!("{what}: the backend panicked"));
    assert!(!served.backend.frontend_returned(), "{what}");
}

#[test]
fn hostile_inflight_regions_are_refused() {
    // A good region to start from, made by a backend.
    let pages: Pages = Arc::default();
    let maker = serve(TestStore::new(&pages), Continuity::Fresh);
    let mut frontend = connect(&maker);
    let (info, region) = frontend.get_inflight_fd(&asked_region()).unwrap();
    drop(frontend);
    maker.thread.join().unwrap();

    let too_small = VhostUserInflight {
        mmap_size: info.mmap_size - 1,
        ..info
    };
    set_is_refused("a region too small", &too_small, &region);
    let past_the_file = VhostUserInflight {
        mmap_offset: 4096,
        ..info
    };
    set_is_refused("a region past its file", &past_the_file, &region);
    let more_queues = VhostUserInflight {
        num_queues: 2,
        mmap_size: 2 * info.mmap_size,
        ..info
    };
    set_is_refused("more queues than the device", &more_queues, &region);
    let bigger_queues = VhostUserInflight {
        queue_size: 2 * QUEUE_SIZE,
        mmap_size: queue_region_len(2 * QUEUE_SIZE),
        ..info
    };
    set_is_refused("queues larger than the device's", &bigger_queues, &region);
    let eventfd = EventFd::new(0).unwrap();
    set_is_refused("an eventfd", &info, &eventfd);
    let unsealed = common::memfd(info.mmap_size);
    set_is_refused("a file that can shrink", &info, &unsealed);

    // A region a backend used, as the frontend tampered with it.
    let view = RegionView::map(&region, info.mmap_size);
    view.set_version(1);
    view.set_desc_num(QUEUE_SIZE / 2);
    set_is_refused("desc_num unlike the queue size", &info, &region);
    view.set_desc_num(QUEUE_SIZE);
    view.set_u16(12, QUEUE_SIZE);
    set_is_refused("a last batch head past the ring", &info, &region);
    view.set_u16(12, 0);
    view.set_flag(7, 0x80);
    set_is_refused("a flag that is neither 0 nor 1", &info, &region);
    view.set_version(7);
    view.set_flag(7, 0);
    set_is_refused("an unknown version", &info, &region);
}
