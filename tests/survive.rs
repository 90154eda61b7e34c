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
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use vhost_user_zram::pagegen::fill_page;
use vhost_user_zram::PAGE_SIZE;

use common::child::{DaemonOptions, DaemonProcess};

/// Pages the frontend writes.
const PAGES: u64 = 512;
/// Requests in flight.
const DEPTH: usize = 32;
/// The environment variable that makes `reader_child` read a device.
const CHILD_SOCKET: &str = "VUZ_SURVIVE_CHILD_SOCKET";

/// A libblkio frontend with one queue and a buffer of `DEPTH` pages.
struct Frontend {
    queue: Option<Blkioq>,
    blkio: Blkio,
    region: MemoryRegion,
}

impl Frontend {
    fn connect(socket: &Path) -> Frontend {
        let mut blkio = Blkio::new("virtio-blk-vhost-user").unwrap();
        blkio.set_str("path", socket.to_str().unwrap()).unwrap();
        blkio.connect().unwrap();
        blkio.set_i32("num-queues", 1).unwrap();
        let mut started = blkio.start().unwrap();
        let region = blkio.alloc_mem_region(DEPTH * PAGE_SIZE).unwrap();
        blkio.map_mem_region(&region).unwrap();
        Frontend {
            queue: started.queues.pop(),
            blkio,
            region,
        }
    }

    /// Waits for `n` completions; returns how many failed.
    fn complete(&mut self, n: usize) -> usize {
        let queue = self.queue.as_mut().unwrap();
        let mut completions: Vec<MaybeUninit<Completion>> =
            (0..n).map(|_| MaybeUninit::uninit()).collect();
        let (mut done, mut failed) = (0, 0);
        while done < n {
            let mut timeout = Duration::from_secs(30);
            let got = queue
                .do_io(&mut completions[done..], 1, Some(&mut timeout), None)
                .unwrap();
            for completion in &completions[done..done + got] {
                // SAFETY: do_io initialised the entries it reported.
                let completion = unsafe { completion.assume_init_read() };
                failed += usize::from(completion.ret != 0);
            }
            done += got;
        }
        failed
    }

    fn buffer(&mut self, slot: usize) -> &mut [u8; PAGE_SIZE] {
        assert!(slot < DEPTH);
        // SAFETY: slot < DEPTH, so the page lies inside the mapped region; the callers use a
        // slot only while no request on it is in flight.
        unsafe {
            &mut *(self.region.addr as *mut u8)
                .add(slot * PAGE_SIZE)
                .cast::<[u8; PAGE_SIZE]>()
        }
    }

    /// Writes swap-like pages `0..PAGES` seeded by `seed`.
    fn write_all(&mut self, seed: u64) {
        for batch in (0..PAGES).collect::<Vec<_>>().chunks(DEPTH) {
            for (slot, &page) in batch.iter().enumerate() {
                fill_page(seed, page, self.buffer(slot));
                let ptr = self.buffer(slot).as_ptr();
                self.queue.as_mut().unwrap().write(
                    page * PAGE_SIZE as u64,
                    ptr,
                    PAGE_SIZE,
                    slot,
                    ReqFlags::empty(),
                );
            }
            assert_eq!(self.complete(batch.len()), 0, "a write failed");
        }
    }

    /// Reads pages `0..PAGES`, calling `check(page, data)` on each; returns the failed reads.
    fn read_all(&mut self, mut check: impl FnMut(u64, &[u8; PAGE_SIZE])) -> usize {
        let mut failed = 0;
        for batch in (0..PAGES).collect::<Vec<_>>().chunks(DEPTH) {
            for (slot, &page) in batch.iter().enumerate() {
                self.buffer(slot).fill(0xee);
                let ptr = self.buffer(slot).as_mut_ptr();
                self.queue.as_mut().unwrap().read(
                    page * PAGE_SIZE as u64,
                    ptr,
                    PAGE_SIZE,
                    slot,
                    ReqFlags::empty(),
                );
            }
            let batch_failed = self.complete(batch.len());
            failed += batch_failed;
            if batch_failed == 0 {
                for (slot, &page) in batch.iter().enumerate() {
                    let data = *self.buffer(slot);
                    check(page, &data);
                }
            }
        }
        failed
    }

    /// Reads every page and asserts each is what `write_all(seed)` wrote.
    fn assert_holds(&mut self, seed: u64) {
        let mut expected = [0u8; PAGE_SIZE];
        let failed = self.read_all(|page, data| {
            fill_page(seed, page, &mut expected);
            assert!(
                data == &expected,
                "page {page} differs from what was written"
            );
        });
        assert_eq!(failed, 0, "reads failed");
    }
}

impl Drop for Frontend {
    fn drop(&mut self) {
        self.queue = None;
        self.blkio.unmap_mem_region(&self.region);
        self.blkio.free_mem_region(&self.region);
    }
}

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
    frontend.write_all(7);
    daemon.signal(libc::SIGKILL);
    daemon.wait_exit();
    drop(frontend);
    assert!(state.0.exists(), "the state outlives the killed daemon");

    let started = Instant::now();
    let mut second = restart(&daemon, &state);
    let serving = started.elapsed();
    second.wait_for_log("recovered");
    let mut frontend = Frontend::connect(&second.socket);
    frontend.assert_holds(7);
    println!("a restarted daemon served {PAGES} recovered pages {serving:?} after its start");
    drop(frontend);
    assert!(second.wait_exit().status.success());
}

#[test]
fn sigterm_with_the_frontend_connected_keeps_the_state_for_the_upgrade() {
    let state = StatePath::new("upgrade");
    let mut daemon = options(&state).start();
    let mut frontend = Frontend::connect(&daemon.socket);
    frontend.write_all(11);
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
    frontend.assert_holds(11);
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
    let failed = frontend.read_all(|_, data| nonzero += usize::from(data.iter().any(|&b| b != 0)));
    assert_eq!(failed, 0, "reads failed");
    assert_eq!(nonzero, 0, "another frontend's pages were visible");
}

#[test]
fn another_process_reads_zeros_and_the_old_pages_are_destroyed() {
    let state = StatePath::new("identity");
    let mut daemon = options(&state).start();
    let mut frontend = Frontend::connect(&daemon.socket);
    frontend.write_all(13);
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
    frontend.write_all(17);
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
