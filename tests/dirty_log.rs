// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Dirty logging of guest memory for live migration, end to end: the vhost crate's `Frontend`
//! plays QEMU against the daemon in this process — negotiates `VHOST_F_LOG_ALL` and
//! `LOG_SHMFD`, hands over a log with `SET_LOG_BASE` (a memfd with one bit per 4 KiB page of
//! guest memory, as QEMU's `vhost_log` is) — and checks, request by request, that the log marks
//! exactly the guest pages the daemon wrote: the data buffers of reads, the status byte and the
//! used ring. Between requests the test reads and clears the log, as QEMU's migration does.

// Lengths, offsets and status codes here are small constants.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo};
use vhost_user_zram::blk::DeviceConfig;
use vhost_user_zram::PAGE_SIZE;
use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use common::in_process::InProcessDaemon;

const PAGES: u64 = 64;
const QUEUE_SIZE: u16 = 256;
const MEM_SIZE: usize = 4 << 20;
/// The log: one bit per 4 KiB page of guest memory.
const LOG_LEN: u64 = (MEM_SIZE / PAGE_SIZE / 8) as u64;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
/// The used ring, on a page of its own (see `common::start_queue_with_used_ring`).
const USED_RING: u64 = 0x8000;
/// The two halves of a read split over two descriptors on two pages.
const SPLIT_LOW: u64 = 0x28_0000;
const SPLIT_HIGH: u64 = 0x29_0000;

/// The guest pages a request writes besides its data: its status byte and the used ring.
fn completion_pages() -> BTreeSet<u64> {
    BTreeSet::from([page_of(common::STATUS), page_of(USED_RING)])
}

fn page_of(addr: u64) -> u64 {
    addr / PAGE_SIZE as u64
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
    /// Connects, acknowledges every feature the daemon offers (which must include `LOG_ALL`
    /// and `LOG_SHMFD`) and starts queue 0.
    fn connect(daemon: &InProcessDaemon, mem: &'m GuestMemoryMmap<()>) -> Self {
        let mut frontend = Frontend::connect(&daemon.socket, 1).unwrap();
        frontend.set_owner().unwrap();
        let features = frontend.get_features().unwrap();
        assert_ne!(features & VhostUserVirtioFeatures::LOG_ALL.bits(), 0);
        frontend.set_features(features).unwrap();
        let protocol = frontend.get_protocol_features().unwrap();
        assert!(protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD));
        frontend.set_protocol_features(protocol).unwrap();
        let region =
            VhostUserMemoryRegionInfo::from_guest_region(mem.find_region(GuestAddress(0)).unwrap())
                .unwrap();
        frontend.set_mem_table(&[region]).unwrap();
        let vq = MockSplitQueue::new(mem, QUEUE_SIZE);
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        common::start_queue_with_used_ring(
            &mut frontend,
            mem,
            &vq,
            QUEUE_SIZE,
            GuestAddress(USED_RING),
            &kick,
            &call,
        );
        Guest {
            mem,
            vq,
            kick,
            call,
            avail_idx: 0,
            frontend,
        }
    }

    /// Hands a fresh log to the daemon (`SET_LOG_BASE`) and returns it.
    fn hand_over_log(&mut self) -> File {
        let log = common::memfd(LOG_LEN);
        self.frontend
            .set_log_base(
                0,
                Some(VhostUserDirtyLogRegion {
                    mmap_size: LOG_LEN,
                    mmap_offset: 0,
                    mmap_handle: log.as_raw_fd(),
                }),
            )
            .unwrap();
        log
    }

    /// Runs one request of `kind` on `page` whose data descriptors are `data` (address,
    /// length), and waits until it is on the used ring; returns its status.
    fn request(&mut self, kind: u32, page: u64, data: &[(u64, u32)]) -> u8 {
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&kind.to_le_bytes());
        header[8..16].copy_from_slice(&(page * 8).to_le_bytes());
        self.mem
            .write_slice(&header, GuestAddress(common::HEADER))
            .unwrap();
        self.mem
            .write_obj(0xffu8, GuestAddress(common::STATUS))
            .unwrap();
        let (next, write) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
        let data_flags = if kind == VIRTIO_BLK_T_IN { write } else { 0 };
        let mut descs = vec![Descriptor::new(common::HEADER, 16, next, 1)];
        for (i, &(addr, len)) in (2u16..).zip(data) {
            descs.push(Descriptor::new(addr, len, data_flags | next, i));
        }
        descs.push(Descriptor::new(common::STATUS, 1, write, 0));
        self.avail_idx = common::publish_chain(&self.vq, QUEUE_SIZE, self.avail_idx, 0, &descs);
        self.kick.write(1).unwrap();
        self.wait_for_used();
        self.mem.read_obj(GuestAddress(common::STATUS)).unwrap()
    }

    /// Writes `content` to `page` from the page at [`common::DATA`].
    fn write_page(&mut self, page: u64, content: &[u8; PAGE_SIZE]) -> u8 {
        self.mem
            .write_slice(content, GuestAddress(common::DATA))
            .unwrap();
        self.request(VIRTIO_BLK_T_OUT, page, &[(common::DATA, PAGE_SIZE as u32)])
    }

    /// Reads `page` into the page at [`common::DATA`] (one descriptor: the daemon decompresses
    /// straight into it) and returns what it holds.
    fn read_page(&mut self, page: u64) -> (u8, Vec<u8>) {
        self.mem
            .write_slice(&[0xee; PAGE_SIZE], GuestAddress(common::DATA))
            .unwrap();
        let status = self.request(VIRTIO_BLK_T_IN, page, &[(common::DATA, PAGE_SIZE as u32)]);
        let mut data = vec![0u8; PAGE_SIZE];
        self.mem
            .read_slice(&mut data, GuestAddress(common::DATA))
            .unwrap();
        (status, data)
    }

    fn wait_for_used(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let used: u16 = self.mem.read_obj(GuestAddress(USED_RING + 2)).unwrap();
            if used == self.avail_idx {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "request not completed in time"
            );
            std::thread::sleep(Duration::from_millis(1));
            let _ = self.call.read();
        }
    }
}

/// The pages the log marks, and clears it (QEMU's migration reads and clears it each round).
fn take_dirty(log: &File) -> BTreeSet<u64> {
    let mut bits = vec![0u8; LOG_LEN as usize];
    log.read_exact_at(&mut bits, 0).unwrap();
    log.write_all_at(&vec![0u8; LOG_LEN as usize], 0).unwrap();
    let mut pages = BTreeSet::new();
    for (byte, &value) in (0u64..).zip(&bits) {
        for bit in 0..8 {
            if value & (1 << bit) != 0 {
                pages.insert(byte * 8 + bit);
            }
        }
    }
    pages
}

fn start_daemon() -> InProcessDaemon {
    let mut device = DeviceConfig::new(PAGES);
    device.queue_size = QUEUE_SIZE;
    InProcessDaemon::start(|socket| common::daemon_config(socket, device, 16))
}

/// Text-like, compressible page content.
fn text_page(seed: u64) -> [u8; PAGE_SIZE] {
    let mut page = [0u8; PAGE_SIZE];
    vhost_user_zram::pagegen::fill_kind(
        vhost_user_zram::pagegen::PageKind::Text,
        &mut vhost_user_zram::pagegen::SplitMix64::new(seed),
        &mut page,
    );
    page
}

#[test]
fn the_log_marks_exactly_the_guest_pages_the_daemon_writes() {
    let daemon = start_daemon();
    let mem = common::guest_memory_over(MEM_SIZE, MEM_SIZE as u64);
    let mut guest = Guest::connect(&daemon, &mem);
    let log = guest.hand_over_log();
    let data = BTreeSet::from([page_of(common::DATA)]);
    let with_data: BTreeSet<u64> = completion_pages().union(&data).copied().collect();

    // A write reads guest memory: only its status byte and the used ring are written.
    let content = text_page(3);
    assert_eq!(guest.write_page(3, &content), OK);
    assert_eq!(take_dirty(&log), completion_pages());
    assert_eq!(guest.write_page(9, &[0x11; PAGE_SIZE]), OK);
    assert!(daemon.store.wait_drained(Duration::from_secs(10)));
    take_dirty(&log);

    // A compressed page, decompressed straight into the guest's buffer.
    let (status, read) = guest.read_page(3);
    assert_eq!((status, &read[..]), (OK, &content[..]));
    assert_eq!(take_dirty(&log), with_data);
    // A page never written (zeros) and a same-filled page: the store fills the buffer.
    let (status, read) = guest.read_page(7);
    assert_eq!((status, read), (OK, vec![0; PAGE_SIZE]));
    assert_eq!(take_dirty(&log), with_data);
    let (status, read) = guest.read_page(9);
    assert_eq!((status, read), (OK, vec![0x11; PAGE_SIZE]));
    assert_eq!(take_dirty(&log), with_data);

    // A page split over two descriptors is copied through vm-memory: both halves are marked.
    let status = guest.request(VIRTIO_BLK_T_IN, 3, &[(SPLIT_LOW, 2048), (SPLIT_HIGH, 2048)]);
    assert_eq!(status, OK);
    let mut halves = completion_pages();
    halves.extend([page_of(SPLIT_LOW), page_of(SPLIT_HIGH)]);
    assert_eq!(take_dirty(&log), halves);
    let mut high = [0u8; 2048];
    mem.read_slice(&mut high, GuestAddress(SPLIT_HIGH)).unwrap();
    assert_eq!(&high[..], &content[2048..]);
}

#[test]
fn log_all_without_a_log_base_serves_as_before() {
    let daemon = start_daemon();
    let mem = common::guest_memory_over(MEM_SIZE, MEM_SIZE as u64);
    let mut guest = Guest::connect(&daemon, &mem);

    let content = text_page(5);
    assert_eq!(guest.write_page(5, &content), OK);
    assert!(daemon.store.wait_drained(Duration::from_secs(10)));
    let (status, read) = guest.read_page(5);

    assert_eq!((status, &read[..]), (OK, &content[..]));
    let (status, read) = guest.read_page(6);
    assert_eq!((status, read), (OK, vec![0; PAGE_SIZE]));
}
