// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Signals and shutdown, against the real binary: every signal the daemon handles leaves no
//! socket file behind and exits with the documented status (0 for SIGTERM, 1 for SIGBUS);
//! SIGHUP and SIGUSR1 do not end it; stopping it under a connected frontend warns that the
//! guest's data is lost; a frontend's disconnect logs what it negotiated and what was stored;
//! the backing file holds no block of the guest's data after an end that does not keep a
//! state, and keeps its blocks with a kept state until that state is destroyed.

// Descriptor indexes, flags and lengths here are small constants.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::fs::File;
use std::path::Path;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};

use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use common::child::{ControlSocket, DaemonProcess, Exited};

const MEM_SIZE: usize = 4 << 20;
const QUEUE_SIZE: u16 = 256;

/// Starts the daemon with a 1 MiB device, its default control socket and `extra` arguments,
/// and waits until both sockets accept connections.
fn start_with(extra: &[&str]) -> DaemonProcess {
    DaemonProcess::options()
        .size("1M")
        .control_socket(ControlSocket::Implied)
        .args(extra)
        .start()
}

fn start() -> DaemonProcess {
    start_with(&[])
}

fn assert_sockets_removed(daemon: &DaemonProcess) {
    assert!(
        !daemon.socket.exists(),
        "{:?} was left behind",
        daemon.socket
    );
    let control = daemon.control();
    assert!(!control.exists(), "{control:?} was left behind");
}

/// Whether the daemon still runs: it answers on its control socket.
fn answers(daemon: &DaemonProcess) -> bool {
    daemon.ctl_output(&["io_stat"]).status.success()
}

#[test]
fn sighup_is_logged_and_ignored_then_sigterm_exits_0_without_debris() {
    let mut daemon = start();

    daemon.signal(libc::SIGHUP);
    assert!(answers(&daemon), "the daemon survives SIGHUP");
    daemon.signal(libc::SIGTERM);
    let Exited { status, stderr } = daemon.wait_exit();

    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("received SIGHUP; ignored"), "{stderr}");
    assert!(stderr.contains("received SIGTERM; stopping"), "{stderr}");
    assert_sockets_removed(&daemon);
}

#[test]
fn sigusr1_logs_a_statistics_summary_and_sigint_exits_0_without_debris() {
    let mut daemon = start();

    daemon.signal(libc::SIGUSR1);
    assert!(answers(&daemon), "the daemon survives SIGUSR1");
    daemon.signal(libc::SIGINT);
    let Exited { status, stderr } = daemon.wait_exit();

    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("statistics: 0 pages stored (0 B of data in"),
        "{stderr}"
    );
    assert_sockets_removed(&daemon);
}

#[test]
fn sigbus_from_kill_says_so_removes_the_sockets_and_exits_1() {
    let mut daemon = start();

    daemon.signal(libc::SIGBUS);
    let Exited { status, stderr } = daemon.wait_exit();

    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error: SIGBUS: sent by process"),
        "{stderr}"
    );
    assert!(stderr.contains("removing the sockets"), "{stderr}");
    assert_sockets_removed(&daemon);
}

/// Guest memory backed by a memfd the test can shrink afterwards.
fn guest_memory() -> (GuestMemoryMmap<()>, File) {
    let file = common::memfd(MEM_SIZE as u64);
    let mem = GuestMemoryMmap::from_ranges_with_files(&[(
        GuestAddress(0),
        MEM_SIZE,
        Some(FileOffset::new(file.try_clone().unwrap(), 0)),
    )])
    .unwrap();
    (mem, file)
}

/// A frontend with one queue set up on shared memory, as a VMM would leave it.
struct Guest {
    frontend: Frontend,
    mem: GuestMemoryMmap<()>,
    memfd: File,
    kick: EventFd,
    call: EventFd,
}

impl Guest {
    fn connect(socket: &Path) -> Guest {
        let mut frontend = Frontend::connect(socket, 1).unwrap();
        frontend.set_owner().unwrap();
        let features = frontend.get_features().unwrap();
        frontend.set_features(features).unwrap();
        let protocol = frontend.get_protocol_features().unwrap();
        frontend
            .set_protocol_features(protocol & VhostUserProtocolFeatures::REPLY_ACK)
            .unwrap();
        let (mem, memfd) = guest_memory();
        let region = mem.find_region(GuestAddress(0)).unwrap();
        let info = VhostUserMemoryRegionInfo::from_guest_region(region).unwrap();
        frontend.set_mem_table(&[info]).unwrap();
        let kick = EventFd::new(0).unwrap();
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        Guest {
            frontend,
            mem,
            memfd,
            kick,
            call,
        }
    }

    /// Sets up queue 0 and queues one 4 KiB write of `fill` at page 3; with `complete`, kicks
    /// and waits until the daemon has completed it with status OK.
    fn queue_write(&mut self, fill: u8, complete: bool) {
        let Guest {
            frontend,
            mem,
            kick,
            call,
            ..
        } = self;
        let vq = MockSplitQueue::new(mem, QUEUE_SIZE);
        common::start_queue(frontend, mem, &vq, QUEUE_SIZE, kick, call);

        common::post_page_write(mem, &vq, QUEUE_SIZE, 0, 3 * 8, fill);
        if complete {
            kick.write(1).unwrap();
            common::wait_for_used(&vq, call, 1);
            assert_eq!(mem.read_obj::<u8>(GuestAddress(common::STATUS)).unwrap(), 0);
        }
    }
}

impl Guest {
    /// Sets up queue 0 and writes one 4 KiB page of text (compressible, not same-filled: a
    /// page writeback takes) at page 3, waiting for its completion.
    fn write_text_page(&mut self) {
        let Guest {
            frontend,
            mem,
            kick,
            call,
            ..
        } = self;
        let vq = MockSplitQueue::new(mem, QUEUE_SIZE);
        common::start_queue(frontend, mem, &vq, QUEUE_SIZE, kick, call);
        common::post_page_write(mem, &vq, QUEUE_SIZE, 0, 3 * 8, 0);
        let text: Vec<u8> = b"a page of the guest's swap, "
            .iter()
            .copied()
            .cycle()
            .take(4096)
            .collect();
        mem.write_slice(&text, GuestAddress(common::DATA)).unwrap();
        kick.write(1).unwrap();
        common::wait_for_used(&vq, call, 1);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(common::STATUS)).unwrap(), 0);
    }
}

/// Bytes the file at `path` occupies on disk (`st_blocks` × 512).
fn disk_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// A daemon with a backing file next to its socket and `extra` arguments, the file's path,
/// and a guest that wrote one page the daemon then wrote back.
fn daemon_with_a_page_on_its_backing_file(
    extra: &[&std::ffi::OsStr],
) -> (DaemonProcess, std::path::PathBuf, Guest) {
    let options = DaemonProcess::options()
        .size("1M")
        .control_socket(ControlSocket::Implied);
    let backing = options.socket().with_file_name("backing");
    let daemon = options
        .args([std::ffi::OsStr::new("--backing-file"), backing.as_os_str()])
        .args(extra)
        .start();
    let mut guest = Guest::connect(&daemon.socket);
    guest.write_text_page();
    // A page still pending in the pool is not written back: let the worker compress it.
    daemon.mm_stat();
    daemon.ctl(&["idle", "all"]);
    let written = daemon.ctl(&["writeback", "idle"]);
    assert!(written.starts_with("wrote back 1 "), "{written}");
    assert!(disk_bytes(&backing) > 0, "the page is on the file");
    (daemon, backing, guest)
}

#[test]
fn a_frontend_that_ends_leaves_no_guest_data_on_the_backing_file() {
    let (mut daemon, backing, guest) = daemon_with_a_page_on_its_backing_file(&[]);

    drop(guest);
    let Exited { status, stderr } = daemon.wait_exit();

    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_eq!(disk_bytes(&backing), 0, "{stderr}");
    assert!(stderr.contains("no guest data stays on it"), "{stderr}");
}

#[test]
fn sigterm_under_a_frontend_without_state_leaves_no_guest_data_on_the_backing_file() {
    let (mut daemon, backing, _guest) = daemon_with_a_page_on_its_backing_file(&[]);

    daemon.signal(libc::SIGTERM);
    let Exited { status, stderr } = daemon.wait_exit();

    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_eq!(disk_bytes(&backing), 0, "{stderr}");
}

#[test]
fn sigterm_under_a_frontend_keeps_the_backing_files_blocks_with_the_state() {
    let state = std::path::PathBuf::from(format!(
        "/dev/shm/vuz-signals-kept-{}.state",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&state);
    let (mut daemon, backing, _guest) = daemon_with_a_page_on_its_backing_file(&[
        std::ffi::OsStr::new("--state"),
        state.as_os_str(),
    ]);

    daemon.signal(libc::SIGTERM);
    let Exited { status, stderr } = daemon.wait_exit();

    let _ = std::fs::remove_file(&state);
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("is kept with the guest's"), "{stderr}");
    assert!(
        disk_bytes(&backing) > 0,
        "the state's page stays on the file: {stderr}"
    );
    assert!(!stderr.contains("no guest data stays"), "{stderr}");
}

#[test]
fn a_kept_states_backing_file_is_erased_once_its_frontend_ends() {
    let state = std::path::PathBuf::from(format!(
        "/dev/shm/vuz-signals-destroyed-{}.state",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&state);
    let state_args = [std::ffi::OsStr::new("--state"), state.as_os_str()];
    let (mut first, backing, guest) = daemon_with_a_page_on_its_backing_file(&state_args);
    first.signal(libc::SIGTERM);
    let Exited { stderr, .. } = first.wait_exit();
    drop(guest);
    assert!(disk_bytes(&backing) > 0, "kept with the state: {stderr}");
    let mut second = DaemonProcess::options()
        .size("1M")
        .control_socket(ControlSocket::Implied)
        .socket_at(&first.socket)
        .args([std::ffi::OsStr::new("--backing-file"), backing.as_os_str()])
        .args(state_args)
        .start();
    // The same frontend comes back: its page is given back, then rewritten.
    let mut guest = Guest::connect(&second.socket);
    guest.write_text_page();

    drop(guest);
    let Exited { status, stderr } = second.wait_exit();

    let _ = std::fs::remove_file(&state);
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("is destroyed"), "{stderr}");
    assert_eq!(disk_bytes(&backing), 0, "{stderr}");
    assert!(stderr.contains("no guest data stays on it"), "{stderr}");
}

#[test]
fn sigbus_from_guest_memory_the_frontend_shrank_removes_the_sockets_and_exits_1() {
    let mut daemon = start();
    let mut guest = Guest::connect(&daemon.socket);
    guest.queue_write(0x5a, false);

    // A request with a reply: the daemon has handled SET_MEM_TABLE (and checked the region
    // against its file) before the file shrinks.
    guest.frontend.get_features().unwrap();
    // The frontend shrinks the file behind guest memory it shared, then kicks: the daemon's
    // first read of the descriptor table faults. The test never touches that memory again.
    guest.memfd.set_len(0).unwrap();
    guest.kick.write(1).unwrap();
    let Exited { status, stderr } = daemon.wait_exit();

    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error: SIGBUS: a memory access at 0x"),
        "{stderr}"
    );
    assert_sockets_removed(&daemon);
    drop(guest.frontend);
}

#[test]
fn sigterm_under_a_connected_frontend_warns_that_the_stored_data_is_lost() {
    let mut daemon = start();
    let mut guest = Guest::connect(&daemon.socket);
    guest.queue_write(0x5a, true);

    daemon.signal(libc::SIGTERM);
    let Exited { status, stderr } = daemon.wait_exit();

    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("WARN")
            && stderr.contains("the guest's 1 pages (4096 bytes, 4.0 KiB) are lost"),
        "{stderr}"
    );
    assert_sockets_removed(&daemon);
}

#[test]
fn frontend_disconnect_logs_the_negotiated_features_and_what_was_stored() {
    let mut daemon = start();
    let mut guest = Guest::connect(&daemon.socket);
    guest.queue_write(0x5a, true);

    drop(guest);
    let Exited { status, stderr } = daemon.wait_exit();

    assert_eq!(status.code(), Some(0), "{stderr}");
    let line = stderr
        .lines()
        .find(|line| line.contains("the frontend disconnected"))
        .unwrap_or_else(|| panic!("no disconnect line in {stderr}"));
    assert!(line.contains("1 pages stored (4.0 KiB of data"), "{line}");
    let negotiated: Vec<_> = stderr
        .lines()
        .filter(|line| line.contains("VERSION_1"))
        .collect();
    assert_eq!(negotiated.len(), 1, "features logged once: {stderr}");
    assert!(
        negotiated[0].contains("the frontend negotiated virtio features")
            && negotiated[0].contains("DISCARD"),
        "{stderr}"
    );
    assert!(!stderr.contains("are lost"), "{stderr}");
    assert_sockets_removed(&daemon);
}

#[test]
fn start_logs_the_configuration_at_info() {
    let mut daemon = start_with(&["--algorithm", "zstd", "--mem-limit", "2M"]);

    daemon.signal(libc::SIGTERM);
    let Exited { status, stderr } = daemon.wait_exit();

    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains(
            "device: 1.0 MiB (256 pages), zstd level 1, memory limit 2.0 MiB, 1 queue(s) of up to 256 descriptors, read-write"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("control socket {}", daemon.control().display())),
        "{stderr}"
    );
    assert!(!stderr.contains("DEBUG"), "{stderr}");
}

#[test]
fn debug_level_logs_the_offered_features_and_each_connection() {
    let mut daemon = start_with(&["--log-level", "debug"]);

    // start's readiness probe is a connection without a message.
    daemon.wait_for_log("a connection closed without a vhost-user message");
    daemon.signal(libc::SIGTERM);
    let Exited { status, stderr } = daemon.wait_exit();

    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("offering virtio features SIZE_MAX SEG_MAX BLK_SIZE"),
        "{stderr}"
    );
    assert!(
        stderr.contains("accepted a connection on the vhost-user socket"),
        "{stderr}"
    );
}

#[test]
fn features_a_frontend_sets_twice_are_logged_once() {
    // QEMU 7.2 sends SET_FEATURES twice with the same bits when it starts the device.
    let mut daemon = start();
    let mut guest = Guest::connect(&daemon.socket);
    let features = guest.frontend.get_features().unwrap();
    guest.frontend.set_features(features).unwrap();
    guest.queue_write(0x11, true);

    drop(guest);
    let Exited { status, stderr } = daemon.wait_exit();

    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_eq!(
        stderr.matches("VERSION_1").count(),
        1,
        "features logged once per connection: {stderr}"
    );
}

#[test]
fn start_logs_the_recompression_and_writeback_settings_in_seconds() {
    let options = DaemonProcess::options()
        .size("1M")
        .control_socket(ControlSocket::Implied);
    let backing = options.socket().with_file_name("backing");
    let mut daemon = options
        .args([
            "--algorithm",
            "lz4",
            "--recompress-algorithm",
            "zstd:level=9",
            "--backing-file",
            backing.to_str().unwrap(),
            "--writeback-idle-after",
            "3",
            "--idle-tick",
            "1",
        ])
        .start();

    daemon.signal(libc::SIGTERM);
    let Exited { status, stderr } = daemon.wait_exit();

    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains(
            "recompression: secondary algorithm(s) zstd:level=9 by priority; on request only"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("pages idle for at least 3 s are written back (idle-clock age 4 or more: idle for more than 3 s)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("writing back pages idle for more than 3 s"),
        "{stderr}"
    );
    assert!(!stderr.contains("4 ticks"), "{stderr}");
}

#[test]
fn the_exit_summary_gives_the_backing_file_figures() {
    let options = DaemonProcess::options()
        .size("1M")
        .control_socket(ControlSocket::Implied);
    let backing = options.socket().with_file_name("backing");
    let mut daemon = options
        .args(["--backing-file", backing.to_str().unwrap()])
        .start();
    let mut guest = Guest::connect(&daemon.socket);
    guest.queue_write(0x5a, true);

    drop(guest);
    let Exited { status, stderr } = daemon.wait_exit();

    assert_eq!(status.code(), Some(0), "{stderr}");
    let line = stderr
        .lines()
        .find(|line| line.contains("the frontend disconnected"))
        .unwrap_or_else(|| panic!("no disconnect line in {stderr}"));
    assert!(
        line.contains("backing file: ") && line.contains("bd_stat "),
        "{line}"
    );
}

#[test]
fn sigterm_at_any_point_of_the_start_exits_promptly_without_debris() {
    for delay_us in [0u64, 200, 500, 1000, 2000, 4000, 8000, 16000] {
        let mut daemon = DaemonProcess::options()
            .size("1G")
            .control_socket(ControlSocket::Implied)
            .args(["--workers", "2"])
            .spawn();
        std::thread::sleep(std::time::Duration::from_micros(delay_us));
        daemon.signal(libc::SIGTERM);
        let Exited { status, stderr } = daemon.wait_exit();

        // Before the first instruction of `run` the default action ends it (nothing exists
        // yet); from then on the daemon stops itself with status 0.
        use std::os::unix::process::ExitStatusExt;
        assert!(
            status.code() == Some(0) || status.signal() == Some(libc::SIGTERM),
            "after {delay_us} µs: {status}: {stderr}"
        );
        assert_sockets_removed(&daemon);
    }
}
