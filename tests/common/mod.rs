// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the in-process protocol tests share: memfd-backed guest memory, as a VMM shares it
//! with a vhost-user backend, and setting a queue up through the vhost crate's frontend.

// Each test binary uses its own subset.
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::FromRawFd;

use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
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
                used_ring_addr: host_base + vq.used_addr().0,
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
