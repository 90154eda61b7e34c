// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon binary with `--state`: killed (SIGKILL) or stopped for an upgrade (SIGTERM with
//! the frontend connected), a new daemon on the same state gives the pages back to the same
//! frontend process; another process gets an empty device and the old pages are destroyed
//! first; a normal end removes the state; bad states and a second daemon are refused.
//!
//! The frontend is libblkio in this test process, so "the same frontend" is this process; a
//! different one is this test binary run again as a child (`reader_child`).

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vhost_user_zram::systemd::receive_notification;

use common::blkio::Frontend;
use common::child::{DaemonOptions, DaemonProcess};

/// Pages the frontend writes.
const PAGES: u64 = 512;
/// The environment variable that makes `reader_child` read a device.
const CHILD_SOCKET: &str = "VUZ_SURVIVE_CHILD_SOCKET";

/// A state file path in /dev/shm (tmpfs), removed on drop.
struct StatePath(PathBuf);

impl StatePath {
    fn new(test: &str) -> StatePath {
        let path = PathBuf::from(format!(
            "/dev/shm/vuz-survive-{test}-{}.state",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        StatePath(path)
    }
}

impl Drop for StatePath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Daemon options with `--state STATE` on a socket in `dir` (the same socket across restarts).
fn options(state: &StatePath) -> DaemonOptions {
    DaemonProcess::options()
        .size("16M")
        .args([OsStr::new("--state"), state.0.as_os_str()])
}

/// Starts a daemon on `state` at the socket of `first`, as a restart would: the same arguments.
fn restart(first: &DaemonProcess, state: &StatePath) -> DaemonProcess {
    options(state).socket_at(&first.socket).start()
}

#[test]
fn a_killed_daemon_gives_the_pages_back_to_the_same_frontend() {
    let state = StatePath::new("kill");
    let mut daemon = options(&state).start();
    let mut frontend = Frontend::connect(&daemon.socket);
    frontend.write_pages(0..PAGES, 7);
    daemon.signal(libc::SIGKILL);
    daemon.wait_exit();
    drop(frontend);
    assert!(state.0.exists(), "the state outlives the killed daemon");

    let started = Instant::now();
    let mut second = restart(&daemon, &state);
    let serving = started.elapsed();
    second.wait_for_log("recovered");
    let mut frontend = Frontend::connect(&second.socket);
    frontend.assert_holds(0..PAGES, 7);
    println!("a restarted daemon served {PAGES} recovered pages {serving:?} after its start");
    drop(frontend);
    assert!(second.wait_exit().status.success());
}

#[test]
fn sigterm_with_the_frontend_connected_keeps_the_state_for_the_upgrade() {
    let state = StatePath::new("upgrade");
    let mut daemon = options(&state).start();
    let mut frontend = Frontend::connect(&daemon.socket);
    frontend.write_pages(0..PAGES, 11);
    let exited = daemon.stop();
    assert!(exited.status.success(), "{}", exited.stderr);
    assert!(
        exited.stderr.contains("kept"),
        "the log says the state is kept: {}",
        exited.stderr
    );
    drop(frontend);
    assert!(state.0.exists(), "the state is kept for the next daemon");

    let mut second = restart(&daemon, &state);
    let mut frontend = Frontend::connect(&second.socket);
    frontend.assert_holds(0..PAGES, 11);
    drop(frontend);
    assert!(second.wait_exit().status.success());
    assert!(!state.0.exists(), "a normal end removes the state");
}

/// Run as a child by `another_process_reads_zeros_and_the_old_pages_are_destroyed`: connects
/// to the socket in `CHILD_SOCKET` and reads every page; exits 0 when all are zeros.
#[test]
fn reader_child() {
    let Some(socket) = std::env::var_os(CHILD_SOCKET) else {
        return;
    };
    let mut frontend = Frontend::connect(Path::new(&socket));
    let mut nonzero = 0;
    let failed = frontend.read_pages(0..PAGES, |_, data| {
        nonzero += usize::from(data.iter().any(|&b| b != 0))
    });
    assert_eq!(failed, 0, "reads failed");
    assert_eq!(nonzero, 0, "another frontend's pages were visible");
}

#[test]
fn another_process_reads_zeros_and_the_old_pages_are_destroyed() {
    let state = StatePath::new("identity");
    let mut daemon = options(&state).start();
    let mut frontend = Frontend::connect(&daemon.socket);
    frontend.write_pages(0..PAGES, 13);
    daemon.signal(libc::SIGKILL);
    daemon.wait_exit();
    drop(frontend);

    let mut second = restart(&daemon, &state);
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "reader_child", "--nocapture"])
        .env(CHILD_SOCKET, &second.socket)
        .output()
        .unwrap();
    assert!(
        child.status.success(),
        "the other process: {}{}",
        String::from_utf8_lossy(&child.stdout),
        String::from_utf8_lossy(&child.stderr)
    );
    let exited = second.wait_exit();
    assert!(
        exited.stderr.contains("destroy"),
        "the log says the old pages were destroyed: {}",
        exited.stderr
    );
    assert!(
        !state.0.exists(),
        "the child's normal end removed the state"
    );
}

#[test]
fn a_daemon_stopped_without_a_frontend_removes_its_state() {
    let state = StatePath::new("idle");
    let mut daemon = options(&state).start();
    assert!(state.0.exists());
    assert!(daemon.stop().status.success());
    assert!(!state.0.exists());
}

#[test]
fn a_state_outside_tmpfs_is_refused() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("vm.state");
    let mut daemon = DaemonProcess::options()
        .args([OsStr::new("--state"), path.as_os_str()])
        .spawn();
    let exited = daemon.wait_exit();
    assert!(!exited.status.success());
    assert!(exited.stderr.contains("tmpfs"), "{}", exited.stderr);
}

#[test]
fn a_second_daemon_on_the_same_state_is_refused() {
    let state = StatePath::new("twice");
    let _first = options(&state).start();
    let mut second = options(&state).spawn();
    let exited = second.wait_exit();
    assert!(!exited.status.success());
    assert!(
        exited.stderr.contains("another daemon"),
        "{}",
        exited.stderr
    );
}

#[test]
fn a_state_of_another_size_is_refused_and_left_untouched() {
    let state = StatePath::new("size");
    let mut daemon = options(&state).start();
    let mut frontend = Frontend::connect(&daemon.socket);
    frontend.write_pages(0..PAGES, 17);
    daemon.signal(libc::SIGKILL);
    daemon.wait_exit();
    drop(frontend);
    let before = std::fs::read(&state.0).unwrap();

    let mut other = DaemonProcess::options()
        .size("32M")
        .args([OsStr::new("--state"), state.0.as_os_str()])
        .spawn();
    let exited = other.wait_exit();
    assert!(!exited.status.success());
    assert!(
        exited.stderr.contains("size") || exited.stderr.contains("pages"),
        "{}",
        exited.stderr
    );
    assert!(
        std::fs::read(&state.0).unwrap() == before,
        "the refused state was changed"
    );
}

/// A stand-in for systemd's notification socket: receives datagrams and the fds they carry.
struct ServiceManager {
    socket: std::os::unix::net::UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl ServiceManager {
    fn new() -> ServiceManager {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        ServiceManager {
            socket,
            path,
            _dir: dir,
        }
    }

    /// Receives notifications until one contains `needle`; returns it and its fd, if any.
    fn wait_for(&self, needle: &str) -> (String, Option<std::os::fd::OwnedFd>) {
        loop {
            let (text, fd) = receive_notification(&self.socket).expect("a notification");
            if text.contains(needle) {
                return (text, fd);
            }
        }
    }
}

#[test]
fn the_fd_store_keeps_the_state_memfd_across_a_restart() {
    let manager = ServiceManager::new();
    let mut daemon = DaemonProcess::options()
        .args(["--state-fdstore", "state"])
        .env("NOTIFY_SOCKET", &manager.path)
        .start();
    let (stored, memfd) = manager.wait_for("FDSTORE=1");
    assert!(stored.contains("FDNAME=state"), "{stored}");
    let memfd = memfd.expect("the state memfd came with FDSTORE=1");
    manager.wait_for("READY=1");
    let mut frontend = Frontend::connect(&daemon.socket);
    frontend.write_pages(0..PAGES, 19);
    daemon.signal(libc::SIGKILL);
    daemon.wait_exit();
    drop(frontend);

    // systemd's restart: the stored memfd comes back as fd 3, named in LISTEN_FDNAMES.
    let mut second = DaemonProcess::options()
        .socket_at(&daemon.socket)
        .args(["--state-fdstore", "state"])
        .env("NOTIFY_SOCKET", &manager.path)
        .pass_fd(memfd, "state")
        .start();
    second.wait_for_log("recovered 512 pages");
    let mut frontend = Frontend::connect(&second.socket);
    frontend.assert_holds(0..PAGES, 19);
    drop(frontend);
    assert!(second.wait_exit().status.success());
    let (removed, _) = manager.wait_for("FDSTOREREMOVE=1");
    assert!(removed.contains("FDNAME=state"), "{removed}");
}

#[test]
fn state_fdstore_outside_systemd_is_refused() {
    let mut daemon = DaemonProcess::options()
        .args(["--state-fdstore", "state"])
        .env("NOTIFY_SOCKET", "")
        .spawn();
    let exited = daemon.wait_exit();
    assert_eq!(exited.status.code(), Some(2), "{}", exited.stderr);
    assert!(exited.stderr.contains("--state PATH"), "{}", exited.stderr);
}

#[test]
fn a_state_whose_header_is_damaged_refuses_every_frontend_and_is_left_untouched() {
    let state = StatePath::new("damaged");
    let mut daemon = options(&state).start();
    let mut frontend = Frontend::connect(&daemon.socket);
    frontend.write_pages(0..PAGES, 23);
    daemon.signal(libc::SIGKILL);
    daemon.wait_exit();
    drop(frontend);
    // Flip a byte in both header copies (at 0 and 4096): neither checksum holds.
    let mut bytes = std::fs::read(&state.0).unwrap();
    for copy in [0, 4096] {
        bytes[copy + 100] ^= 0x5a;
    }
    std::fs::write(&state.0, &bytes).unwrap();

    let mut second = restart(&daemon, &state);
    let mut frontend = Frontend::connect(&second.socket);
    let failed = frontend.read_pages(0..PAGES, |page, data| {
        panic!(
            "page {page} was served from a damaged state: {:?}",
            &data[..8]
        )
    });
    assert_eq!(failed as u64, PAGES, "every read fails with an I/O error");
    drop(frontend);
    let exited = second.wait_exit();
    assert!(exited.status.success(), "{}", exited.stderr);
    assert!(exited.stderr.contains("corrupt"), "{}", exited.stderr);
    assert!(
        exited.stderr.contains("refusing the device"),
        "{}",
        exited.stderr
    );
    assert!(
        std::fs::read(&state.0).unwrap() == bytes,
        "the damaged state was changed"
    );
}
