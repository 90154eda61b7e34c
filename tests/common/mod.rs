// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the tests share: the daemon binary as a child process ([`child`]), a libblkio frontend
//! for it ([`blkio`]), and the daemon in
//! the test process ([`in_process`]); for the in-process protocol tests, memfd-backed guest
//! memory, as a VMM shares it with a vhost-user backend, and setting a queue up through the
//! vhost crate's frontend.

// Each test binary uses its own subset.
#![allow(dead_code)]

pub mod blkio;
pub mod child;
pub mod in_process;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};
use vhost_user_zram::blk::DeviceConfig;
use vhost_user_zram::codec::Algorithm;
use vhost_user_zram::daemon::{DaemonConfig, ListenOn};
use vhost_user_zram::store::{PendingConfig, StoreConfig};
use virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_T_OUT;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// A memfd of `len` bytes.
pub fn memfd(len: u64) -> File {
    // SAFETY: memfd_create takes a valid NUL-terminated name and flags; the result is checked.
    let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len).unwrap();
    file
}

/// Guest memory of `size` bytes at guest address 0 over a memfd of `file_len` bytes.
pub fn guest_memory_over(size: usize, file_len: u64) -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges_with_files(&[(
        GuestAddress(0),
        size,
        Some(FileOffset::new(memfd(file_len), 0)),
    )])
    .unwrap()
}

/// Sets queue 0 of `size` entries up on the frontend's side, rings in `vq`, and enables it.
pub fn start_queue(
    frontend: &mut Frontend,
    mem: &GuestMemoryMmap<()>,
    vq: &MockSplitQueue<'_, GuestMemoryMmap<()>>,
    size: u16,
    kick: &EventFd,
    call: &EventFd,
) {
    let used = vq.used_addr();
    start_queue_with_used_ring(frontend, mem, vq, size, used, kick, call);
}

/// Like [`start_queue`], with the used ring at `used` instead of where `vq` puts it. (The
/// virtio-queue 0.18 mock puts its used ring `size` bytes after the avail ring's start, over
/// the upper half of the avail ring: a test that goes past avail index `size / 2` needs its
/// own used ring.)
pub fn start_queue_with_used_ring(
    frontend: &mut Frontend,
    mem: &GuestMemoryMmap<()>,
    vq: &MockSplitQueue<'_, GuestMemoryMmap<()>>,
    size: u16,
    used: GuestAddress,
    kick: &EventFd,
    call: &EventFd,
) {
    let host_base = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
    frontend.set_vring_num(0, size).unwrap();
    frontend
        .set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: size,
                queue_size: size,
                flags: 0,
                desc_table_addr: host_base + vq.desc_table_addr().0,
                used_ring_addr: host_base + used.0,
                avail_ring_addr: host_base + vq.avail_addr().0,
                log_addr: None,
            },
        )
        .unwrap();
    frontend.set_vring_base(0, 0).unwrap();
    frontend.set_vring_kick(0, kick).unwrap();
    frontend.set_vring_call(0, call).unwrap();
    frontend.set_vring_enable(0, true).unwrap();
}

/// Where the tests' requests live in guest memory: the header, one page of data, the status.
pub const HEADER: u64 = 0x10_0000;
/// See [`HEADER`].
pub const DATA: u64 = 0x20_0000;
/// See [`HEADER`].
pub const STATUS: u64 = 0x30_0000;

/// Puts a one-page write of `fill` bytes to `sector` in descriptors 0-2 and in the avail ring
/// (of `size` entries) at `avail_idx`, and publishes it; the caller kicks.
pub fn post_page_write(
    mem: &GuestMemoryMmap<()>,
    vq: &MockSplitQueue<'_, GuestMemoryMmap<()>>,
    size: u16,
    avail_idx: u16,
    sector: u64,
    fill: u8,
) {
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    header[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
    mem.write_slice(&[fill; 4096], GuestAddress(DATA)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    // The flags are small constants.
    #[allow(clippy::cast_possible_truncation)]
    let (next, write) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
    let descs = [
        Descriptor::new(HEADER, 16, next, 1),
        Descriptor::new(DATA, 4096, next, 2),
        Descriptor::new(STATUS, 1, write, 0),
    ];
    publish_chain(vq, size, avail_idx, 0, &descs);
}

/// Stores `descs` in the descriptor table from index `head` on, puts `head` in the avail ring
/// (of `size` entries) at `avail_idx` and publishes it; returns the next avail index. The
/// caller links the descriptors (their `next` fields) and kicks.
pub fn publish_chain(
    vq: &MockSplitQueue<'_, GuestMemoryMmap<()>>,
    size: u16,
    avail_idx: u16,
    head: u16,
    descs: &[Descriptor],
) -> u16 {
    for (i, desc) in (head..).zip(descs) {
        vq.desc_table()
            .store(i, RawDescriptor::from(*desc))
            .unwrap();
    }
    vq.avail()
        .ring()
        .ref_at(usize::from(avail_idx % size))
        .unwrap()
        .store(head);
    let next = avail_idx.wrapping_add(1);
    vq.avail().idx().store(next);
    next
}

/// Waits (on the call eventfd, with a deadline) until the used index reaches `target`.
pub fn wait_for_used(vq: &MockSplitQueue<'_, GuestMemoryMmap<()>>, call: &EventFd, target: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while vq.used().idx().load() != target {
        assert!(Instant::now() < deadline, "request not completed in time");
        let mut fds = [libc::pollfd {
            fd: call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd, length passed exactly.
        unsafe { libc::poll(fds.as_mut_ptr(), 1, 100) };
        let _ = call.read();
    }
}

/// The configuration the in-process daemon tests run: `device` on a socket at `socket`, lz4,
/// one compression worker with a pending pool of `pending_pages` (so writes go through the pool
/// and the worker), no multi-page units, no polling, no control socket, no metrics, no
/// recompression or writeback.
pub fn daemon_config(socket: &Path, device: DeviceConfig, pending_pages: usize) -> DaemonConfig {
    DaemonConfig {
        listen: ListenOn::Path(socket.to_owned()),
        socket_mode: 0o600,
        control_socket_mode: 0o600,
        store: StoreConfig {
            capacity_pages: device.capacity_pages,
            algorithm: Algorithm::Lz4,
            level: None,
            mem_limit: None,
        },
        pending: PendingConfig {
            workers: 1,
            max_pending_pages: pending_pages,
        },
        unit_max_pages: 1,
        worker_cpus: Vec::new(),
        poll_max: Duration::ZERO,
        device,
        control_socket: None,
        metrics_listen: None,
        recompress: Default::default(),
        writeback: Default::default(),
        pressure: Default::default(),
        state: None,
        migration: Default::default(),
    }
}
