// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A buggy or hostile frontend must not hurt the daemon: impossible ring indices, memory
//! regions larger than their files, and a call fd that blocks. Each test drives the in-process
//! daemon with the vhost crate's `Frontend` and memfd-backed guest memory, as a VMM would, and
//! then shows the daemon still serves (or shuts down in bounded time).

// Descriptor indexes, flags and lengths here are small constants.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::os::fd::FromRawFd;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use vhost_user_zram::blk::DeviceConfig;

use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use common::in_process::InProcessDaemon;

const PAGES: u64 = 256;
const MEM_SIZE: usize = 4 << 20;
const QUEUE_SIZE: u16 = 256;

fn start_daemon() -> InProcessDaemon {
    let mut device = DeviceConfig::new(PAGES);
    device.queue_size = QUEUE_SIZE;
    InProcessDaemon::start(|socket| common::daemon_config(socket, device, 16))
}

/// Guest memory of `MEM_SIZE` bytes over a memfd of `file_len` bytes.
fn guest_memory(file_len: u64) -> GuestMemoryMmap<()> {
    common::guest_memory_over(MEM_SIZE, file_len)
}

fn connect(socket: &Path) -> Frontend {
    let mut frontend = Frontend::connect(socket, 1).unwrap();
    frontend.set_owner().unwrap();
    let features = frontend.get_features().unwrap();
    frontend.set_features(features).unwrap();
    let protocol = frontend.get_protocol_features().unwrap();
    assert!(protocol.contains(VhostUserProtocolFeatures::REPLY_ACK));
    frontend.set_protocol_features(protocol).unwrap();
    // As QEMU does with REPLY_ACK: every request is answered, so a refusal is seen.
    frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    frontend
}

fn memory_region(mem: &GuestMemoryMmap<()>) -> VhostUserMemoryRegionInfo {
    VhostUserMemoryRegionInfo::from_guest_region(mem.find_region(GuestAddress(0)).unwrap()).unwrap()
}

fn start_queue(
    frontend: &mut Frontend,
    mem: &GuestMemoryMmap<()>,
    vq: &MockSplitQueue<'_, GuestMemoryMmap<()>>,
    kick: &EventFd,
    call: &EventFd,
) {
    common::start_queue(frontend, mem, vq, QUEUE_SIZE, kick, call);
}

/// Puts a one-page write of `fill` to page 3 at `avail_idx` and kicks; does not wait.
fn submit_write(
    mem: &GuestMemoryMmap<()>,
    vq: &MockSplitQueue<'_, GuestMemoryMmap<()>>,
    kick: &EventFd,
    avail_idx: u16,
    fill: u8,
) {
    common::post_page_write(mem, vq, QUEUE_SIZE, avail_idx, 24, fill);
    kick.write(1).unwrap();
}

/// Polls the used index (not the call fd, which a test may have broken) until `target`.
fn wait_used(vq: &MockSplitQueue<'_, GuestMemoryMmap<()>>, target: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while vq.used().idx().load() != target {
        assert!(Instant::now() < deadline, "request not completed in time");
        thread::sleep(Duration::from_millis(2));
    }
}

fn poll_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn an_avail_index_far_ahead_is_refused_once_and_the_queue_serves_again_after_a_restart() {
    let daemon = start_daemon();
    let mut frontend = connect(&daemon.socket);
    let mem = guest_memory(MEM_SIZE as u64);
    frontend.set_mem_table(&[memory_region(&mem)]).unwrap();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let kick = EventFd::new(0).unwrap();
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    start_queue(&mut frontend, &mem, &vq, &kick, &call);

    // The guest claims 1000 requests in a ring of 256 and keeps kicking.
    vq.avail().idx().store(1000);
    for _ in 0..200 {
        kick.write(1).unwrap();
        thread::sleep(Duration::from_micros(200));
    }
    poll_until("invalid_io", || daemon.store.stats().io.invalid_io >= 1);
    thread::sleep(Duration::from_millis(100));
    assert_eq!(
        daemon.store.stats().io.invalid_io,
        1,
        "a broken queue is refused once, not at every kick"
    );
    assert_eq!(
        vq.used().idx().load(),
        0,
        "nothing in a broken queue is served"
    );

    // The frontend stops the queue and starts it again (as on a guest reset): it serves.
    frontend.get_vring_base(0).unwrap();
    vq.avail().idx().store(0);
    start_queue(&mut frontend, &mem, &vq, &kick, &call);
    submit_write(&mem, &vq, &kick, 0, 0x5a);
    wait_used(&vq, 1);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(common::STATUS)).unwrap(), 0);

    drop(frontend);
    daemon.join_within(Duration::from_secs(10)).unwrap();
}

#[test]
fn a_memory_region_larger_than_its_file_is_refused_before_it_can_fault() {
    let daemon = start_daemon();
    let frontend = connect(&daemon.socket);
    // A 4 MiB region over a 1 MiB memfd: touching past 1 MiB would raise SIGBUS.
    let short = guest_memory(1 << 20);
    let refused = frontend.set_mem_table(&[memory_region(&short)]);
    assert!(
        refused.is_err(),
        "SET_MEM_TABLE with a short file was accepted"
    );
    // vhost-user-backend ends a connection whose request failed; the daemon then stops with
    // an error that names the region, and removes its socket: it never touches the region.
    let socket = daemon.socket.clone();
    let error = daemon
        .join_within(Duration::from_secs(10))
        .expect_err("the refused table ends the connection with an error");
    let message = format!("{error}");
    assert!(
        message.contains("reaches past the end of its 1048576-byte file"),
        "{message}"
    );
    assert!(!socket.exists(), "the socket file is removed");
}

#[test]
fn a_call_fd_that_would_block_neither_stalls_the_queue_nor_the_shutdown() {
    let daemon = start_daemon();
    let mut frontend = connect(&daemon.socket);
    let mem = guest_memory(MEM_SIZE as u64);
    frontend.set_mem_table(&[memory_region(&mem)]).unwrap();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let kick = EventFd::new(0).unwrap();

    // A pipe, filled up, handed over as the call fd in blocking mode.
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let [read_end, write_end] = fds;
    // SAFETY: fcntl on descriptors we own; only their status flags change.
    unsafe { libc::fcntl(write_end, libc::F_SETFL, libc::O_NONBLOCK) };
    let chunk = [0u8; 4096];
    // SAFETY: writes from a valid buffer to our own pipe until it is full.
    while unsafe { libc::write(write_end, chunk.as_ptr().cast(), chunk.len()) } > 0 {}
    // SAFETY: as above.
    unsafe { libc::fcntl(write_end, libc::F_SETFL, 0) };
    // SAFETY: `write_end` is ours and is owned by the EventFd from here on.
    let call = unsafe { EventFd::from_raw_fd(write_end) };
    start_queue(&mut frontend, &mem, &vq, &kick, &call);

    submit_write(&mem, &vq, &kick, 0, 0x11);
    wait_used(&vq, 1);
    submit_write(&mem, &vq, &kick, 1, 0x22);
    wait_used(&vq, 2);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(common::STATUS)).unwrap(), 0);

    drop(frontend);
    daemon.join_within(Duration::from_secs(10)).unwrap();
    // SAFETY: closing our read end.
    unsafe { libc::close(read_end) };
}

/// Region `i` of a churn: page `i` of `mem`'s memfd, at its own guest address far above the
/// guest memory.
fn one_page_region(mem: &GuestMemoryMmap<()>, i: u64) -> VhostUserMemoryRegionInfo {
    let whole = memory_region(mem);
    VhostUserMemoryRegionInfo {
        guest_phys_addr: (1 << 32) + i * 4096,
        memory_size: 4096,
        userspace_addr: whole.userspace_addr + i * 4096,
        mmap_offset: whole.mmap_offset + i * 4096,
        mmap_handle: whole.mmap_handle,
    }
}

/// `ADD_MEM_REG` past the 509 memory slots the device advertises is refused: a frontend
/// cannot make the daemon map (and hold an fd for) as many regions as it likes.
#[test]
fn a_region_past_the_advertised_memory_slots_is_refused() {
    let daemon = start_daemon();
    let mut frontend = connect(&daemon.socket);
    let mem = guest_memory(MEM_SIZE as u64);

    for i in 0..509 {
        frontend
            .add_mem_region(&one_page_region(&mem, i))
            .unwrap_or_else(|e| panic!("region {i} of 509 was refused: {e}"));
    }
    let refused = frontend.add_mem_region(&one_page_region(&mem, 509));

    assert!(refused.is_err(), "the 510th region was accepted");
    drop(frontend);
    let ended = daemon.join_within(Duration::from_secs(10));
    let error = ended.expect_err("the refused region ends the connection with an error");
    assert!(
        error.to_string().contains("509 memory slots"),
        "the error names the limit: {error}"
    );
}

/// A frontend that adds and removes a region over and over does not flood the log: the
/// memory map is logged at info level at most once a second, with the changes in between
/// counted.
#[test]
fn region_churn_is_logged_at_most_once_a_second() {
    use common::child::DaemonProcess;
    let mut daemon = DaemonProcess::start("1M", &[]);
    let mut frontend = connect(&daemon.socket);
    let mem = guest_memory(MEM_SIZE as u64);
    let region = one_page_region(&mem, 0);

    let started = Instant::now();
    for _ in 0..500 {
        frontend.add_mem_region(&region).unwrap();
        frontend.remove_mem_region(&region).unwrap();
    }
    let seconds = started.elapsed().as_secs() + 1;
    drop(frontend);
    let exited = daemon.stop();

    let lines = exited.stderr.matches("guest memory:").count() as u64;
    assert!(
        lines <= 2 * seconds + 2,
        "{lines} memory map lines for 1000 changes in {seconds} s"
    );
}
