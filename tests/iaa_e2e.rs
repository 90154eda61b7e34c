// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! End-to-end tests of `--algorithm deflate-iaa`: the built daemon, driven through libblkio's
//! `virtio-blk-vhost-user` driver as in `blkio_e2e.rs`, filled with swap-like pages and read
//! back, with the IAA software work queue (`--iaa software`) doing the compression. On a
//! machine with an IAA work queue, `iaa_hardware_*` also runs the same fill on the device;
//! without one it says so on stderr and passes (fails under `IAA_REQUIRE_HARDWARE=1`).

use std::fs::File;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use vhost_user_zram::pagegen::fill_page;
use vhost_user_zram::PAGE_SIZE;

const SEED: u64 = 0x1aa;
const DEPTH: usize = 32;
const PAGE: u64 = PAGE_SIZE as u64;
const MIB: u64 = 1 << 20;

fn swap_page(index: u64) -> [u8; PAGE_SIZE] {
    let mut page = [0u8; PAGE_SIZE];
    fill_page(SEED, index, &mut page);
    page
}

/// A running daemon, its stderr captured to a file; killed on drop unless it exited.
struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
    control: PathBuf,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// Launches the daemon with `extra` arguments; does not wait for anything.
    fn launch(size: u64, extra: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("blk.sock");
        let control = dir.path().join("control.sock");
        let stderr = dir.path().join("stderr");
        let child = Command::new(env!("CARGO_BIN_EXE_vhost-user-zram"))
            .arg("--socket-path")
            .arg(&socket)
            .arg("--size")
            .arg(size.to_string())
            .arg("--control-socket")
            .arg(&control)
            .args(extra)
            .stdin(Stdio::null())
            .stderr(File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawn vhost-user-zram");
        Daemon {
            child: Some(child),
            socket,
            control,
            stderr,
            _dir: dir,
        }
    }

    /// Launches the daemon and waits for its socket.
    fn start(size: u64, extra: &[&str]) -> Daemon {
        let mut daemon = Daemon::launch(size, extra);
        daemon.wait_for(&daemon.socket.clone());
        daemon
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Polls until `path` exists; panics if the daemon exits first or 10 s pass.
    fn wait_for(&mut self, path: &Path) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !path.exists() {
            if let Some(status) = self.try_exit() {
                panic!(
                    "the daemon exited with {status} before creating {}: {}",
                    path.display(),
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {} after 10 s",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn try_exit(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().expect("try_wait")?;
        self.child = None;
        Some(status)
    }

    /// Waits up to 10 s for the daemon to exit by itself.
    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.try_exit() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not exit within 10 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// zram's mm_stat columns, through `ctl`.
    fn mm_stat(&mut self) -> Vec<u64> {
        let control = self.control.clone();
        self.wait_for(&control);
        let output = Command::new(env!("CARGO_BIN_EXE_vhost-user-zram"))
            .arg("ctl")
            .arg("--control-socket")
            .arg(&control)
            .arg("mm_stat")
            .output()
            .expect("run ctl");
        assert!(output.status.success(), "ctl mm_stat failed");
        String::from_utf8(output.stdout)
            .expect("UTF-8")
            .split_whitespace()
            .map(|n| n.parse().expect("a number"))
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One libblkio connection with one queue and a buffer of `DEPTH` pages.
struct Client {
    queue: Option<Blkioq>,
    blkio: Blkio,
    region: MemoryRegion,
}

impl Client {
    fn connect(daemon: &Daemon) -> Client {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut blkio = loop {
            let mut blkio = Blkio::new("virtio-blk-vhost-user").expect("libblkio");
            blkio
                .set_str("path", daemon.socket.to_str().expect("UTF-8 path"))
                .expect("path");
            match blkio.connect() {
                Ok(()) => break blkio,
                Err(e) if Instant::now() < deadline && e.errno() == blkio::Errno::CONNREFUSED => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("connect: {e:?}"),
            }
        };
        blkio.set_i32("num-queues", 1).expect("num-queues");
        blkio.set_i32("queue-size", 128).expect("queue-size");
        let mut outcome = blkio.start().expect("start");
        let region = blkio.alloc_mem_region(DEPTH * PAGE_SIZE).expect("region");
        blkio.map_mem_region(&region).expect("map region");
        Client {
            queue: outcome.queues.pop(),
            blkio,
            region,
        }
    }

    fn buffer(&mut self) -> &mut [u8] {
        // SAFETY: the region holds DEPTH pages, stays mapped while `self` lives, and is only
        // touched between batches (`run` waits for every request), through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, DEPTH * PAGE_SIZE) }
    }

    /// Writes (`write`) or reads the pages `batch` (at most DEPTH), all in flight at once.
    fn run(&mut self, batch: &[u64], write: bool) {
        let base = self.region.addr as *mut u8;
        let queue = self.queue.as_mut().expect("queue");
        for (slot, &page) in batch.iter().enumerate() {
            // SAFETY: slot < DEPTH, so the page lies inside the region.
            let buffer = unsafe { base.add(slot * PAGE_SIZE) };
            if write {
                queue.write(page * PAGE, buffer, PAGE_SIZE, slot, ReqFlags::empty());
            } else {
                queue.read(page * PAGE, buffer, PAGE_SIZE, slot, ReqFlags::empty());
            }
        }
        let mut completions: Vec<MaybeUninit<Completion>> =
            (0..batch.len()).map(|_| MaybeUninit::uninit()).collect();
        let mut done = 0;
        while done < batch.len() {
            let mut timeout = Duration::from_secs(10);
            let n = queue
                .do_io(&mut completions, 1, Some(&mut timeout), None)
                .expect("do_io");
            for completion in &completions[..n] {
                // SAFETY: do_io initialised the first `n` entries.
                let completion = unsafe { completion.assume_init_read() };
                assert_eq!(completion.ret, 0, "request {} failed", completion.user_data);
                done += 1;
            }
        }
    }

    fn write_pages(&mut self, pages: &[u64]) {
        for batch in pages.chunks(DEPTH) {
            for (slot, &page) in batch.iter().enumerate() {
                self.buffer()[slot * PAGE_SIZE..][..PAGE_SIZE].copy_from_slice(&swap_page(page));
            }
            self.run(batch, true);
        }
    }

    fn verify_pages(&mut self, pages: &[u64]) {
        for batch in pages.chunks(DEPTH) {
            self.buffer().fill(0xee);
            self.run(batch, false);
            for (slot, &page) in batch.iter().enumerate() {
                let got = &self.buffer()[slot * PAGE_SIZE..][..PAGE_SIZE];
                assert!(
                    got == swap_page(page),
                    "page {page} differs from what was written"
                );
            }
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.queue = None;
        self.blkio.unmap_mem_region(&self.region);
        self.blkio.free_mem_region(&self.region);
    }
}

/// Fills `pages` swap-like pages through a daemon started with `extra`, reads them back,
/// checks that the store compressed them, and that the daemon exits cleanly on disconnect.
/// Returns the daemon's stderr.
fn fill_and_verify(pages: u64, extra: &[&str]) -> String {
    let mut daemon = Daemon::start(64 * MIB, extra);
    let mut client = Client::connect(&daemon);
    let all: Vec<u64> = (0..pages).collect();
    client.write_pages(&all);
    // Read back in another order than written.
    let mut shuffled = all.clone();
    shuffled.reverse();
    client.verify_pages(&shuffled);
    let mm = daemon.mm_stat();
    let (orig, compr) = (mm[0], mm[1]);
    assert!(orig > 0 && compr > 0 && compr < orig, "mm_stat {mm:?}");
    drop(client);
    let status = daemon.wait_exit();
    assert!(status.success(), "exit {status}: {}", daemon.stderr());
    daemon.stderr()
}

#[test]
fn deflate_iaa_on_the_software_queue_fills_and_verifies_swap_pages() {
    fill_and_verify(4096, &["--algorithm", "deflate-iaa", "--iaa", "software"]);
}

#[test]
fn deflate_iaa_dynamic_mode_fills_and_verifies_swap_pages() {
    fill_and_verify(
        2048,
        &[
            "--algorithm",
            "deflate-iaa",
            "--iaa",
            "software",
            "--iaa-mode",
            "dynamic",
        ],
    );
}

fn hardware_present() -> Option<String> {
    let discovery = iaa::discover::discover();
    if discovery.usable.is_empty() {
        None
    } else {
        Some(discovery.to_string())
    }
}

#[test]
fn auto_without_a_device_warns_once_and_serves() {
    if let Some(found) = hardware_present() {
        eprintln!("SKIPPED: this machine has IAA ({found}), so auto does not fall back");
        return;
    }
    let stderr = fill_and_verify(512, &["--algorithm", "deflate-iaa"]);
    let warnings = stderr
        .matches("deflate-iaa compresses on its software work queue instead")
        .count();
    assert_eq!(warnings, 1, "stderr: {stderr}");
}

#[test]
fn hardware_without_a_device_refuses_to_start_and_names_accel_config() {
    if let Some(found) = hardware_present() {
        eprintln!("SKIPPED: this machine has IAA ({found})");
        return;
    }
    let mut daemon = Daemon::launch(
        64 * MIB,
        &["--algorithm", "deflate-iaa", "--iaa", "hardware"],
    );
    let status = daemon.wait_exit();
    assert_eq!(status.code(), Some(1));
    let stderr = daemon.stderr();
    assert!(stderr.contains("no usable IAA work queue"), "{stderr}");
    assert!(stderr.contains("accel-config enable-wq"), "{stderr}");
    assert!(!daemon.socket.exists(), "no socket without a codec");
}

#[test]
fn iaa_hardware_fills_and_verifies_swap_pages_when_present() {
    let Some(found) = hardware_present() else {
        assert!(
            std::env::var("IAA_REQUIRE_HARDWARE").as_deref() != Ok("1"),
            "IAA_REQUIRE_HARDWARE=1 but {}",
            iaa::discover::discover()
        );
        eprintln!(
            "SKIPPED: no usable IAA work queue ({}); see iaa/README.md",
            iaa::discover::discover()
        );
        return;
    };
    eprintln!("IAA: {found}");
    fill_and_verify(4096, &["--algorithm", "deflate-iaa", "--iaa", "hardware"]);
    fill_and_verify(
        4096,
        &[
            "--algorithm",
            "deflate-iaa",
            "--iaa",
            "hardware",
            "--iaa-mode",
            "dynamic",
        ],
    );
}
