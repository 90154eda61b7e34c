// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! End-to-end tests of `--algorithm deflate-iaa`: the built daemon, driven through libblkio's
//! `virtio-blk-vhost-user` driver as in `blkio_e2e.rs`, filled with swap-like pages and read
//! back, with the IAA software work queue (`--iaa software`) doing the compression. On a
//! machine with an IAA work queue, `iaa_hardware_*` also runs the same fill on the device;
//! without one it says so on stderr and passes (fails under `IAA_REQUIRE_HARDWARE=1`).

mod common;

use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use vhost_user_zram::pagegen::fill_page;
use vhost_user_zram::PAGE_SIZE;

use common::child::DaemonProcess;

const SEED: u64 = 0x1aa;
const DEPTH: usize = 32;
const PAGE: u64 = PAGE_SIZE as u64;
const MIB: u64 = 1 << 20;

fn swap_page(index: u64) -> [u8; PAGE_SIZE] {
    let mut page = [0u8; PAGE_SIZE];
    fill_page(SEED, index, &mut page);
    page
}

/// One libblkio connection with one queue and a buffer of `DEPTH` pages.
struct Client {
    queue: Option<Blkioq>,
    blkio: Blkio,
    region: MemoryRegion,
}

impl Client {
    fn connect(daemon: &DaemonProcess) -> Client {
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
    let mut daemon = DaemonProcess::start(64 * MIB, extra);
    let mut client = Client::connect(&daemon);
    let all: Vec<u64> = (0..pages).collect();
    client.write_pages(&all);
    // Read back in another order than written.
    let mut shuffled = all.clone();
    shuffled.reverse();
    client.verify_pages(&shuffled);
    let mm = daemon.mm_stat();
    let (orig, compr) = (mm.orig_data_size, mm.compr_data_size);
    assert!(orig > 0 && compr > 0 && compr < orig, "mm_stat {mm:?}");
    drop(client);
    daemon.expect_clean_exit()
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
    let mut daemon = DaemonProcess::options()
        .size(64 * MIB)
        .args(["--algorithm", "deflate-iaa", "--iaa", "hardware"])
        .spawn();
    let exited = daemon.wait_exit();
    assert_eq!(exited.status.code(), Some(1));
    let stderr = exited.stderr;
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
