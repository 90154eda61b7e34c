// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The largest device: `--size 1T` starts, serves the first, middle and last pages, and
//! costs little memory while it is (nearly) empty: the slot table is reserved, not populated
//! (DESIGN.md, "The slot table's memory").

mod common;

use std::time::{Duration, Instant};

use common::blkio::Frontend;
use common::child::DaemonProcess;

/// 1 TiB in pages.
const PAGES: u64 = 1 << 28;
/// The most resident memory an empty 1 TiB device may cost.
const EMPTY_RSS: u64 = 16 << 20;

/// The daemon's `VmRSS`, in bytes.
fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib << 10
}

#[test]
fn a_1_tib_device_starts_serves_its_first_and_last_pages_and_stays_small() {
    let mut daemon = DaemonProcess::options().size("1T").start();
    let pid = daemon.pid();
    let idle = resident_bytes(pid);
    eprintln!("empty 1 TiB device: VmRSS {} KiB", idle >> 10);
    assert!(
        idle <= EMPTY_RSS,
        "an empty 1 TiB device holds {} KiB resident",
        idle >> 10
    );
    assert_eq!(daemon.stats().info.disksize, PAGES * 4096);

    let mut frontend = Frontend::connect(&daemon.socket);
    let served = resident_bytes(pid);
    let places = [0..4, PAGES / 2 - 2..PAGES / 2 + 2, PAGES - 4..PAGES];
    for (seed, pages) in places.iter().enumerate() {
        frontend.write_pages(pages.clone(), seed as u64 + 1);
    }
    for (seed, pages) in places.iter().enumerate() {
        frontend.assert_holds(pages.clone(), seed as u64 + 1);
    }
    // Pages never written read as zeros, anywhere.
    let failed = frontend.read_pages(PAGES - 40..PAGES - 8, |page, data| {
        assert!(
            data.iter().all(|&b| b == 0),
            "page {page} was never written"
        );
    });
    assert_eq!(failed, 0);
    let stats = daemon.stats();
    assert_eq!(stats.mm.orig_data_size, 12 * 4096);
    // Four table pages (the middle run straddles two) of 4 KiB and the 64 KiB bitmap.
    assert_eq!(stats.info.slot_table_bytes, 4 * 4096 + (64 << 10));
    let written = resident_bytes(pid);
    eprintln!(
        "after the frontend connected: {} KiB; after writes and reads: {} KiB",
        served >> 10,
        written >> 10
    );
    assert!(
        written <= served + (4 << 20),
        "twelve pages cost {} KiB",
        (written - served) >> 10
    );

    // Discarding the whole device (as swapon does) is quick and gives the table back.
    let started = Instant::now();
    frontend.discard(0..PAGES);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a whole-device discard took {:?}",
        started.elapsed()
    );
    let failed = frontend.read_pages(PAGES - 4..PAGES, |page, data| {
        assert!(data.iter().all(|&b| b == 0), "page {page} was discarded");
    });
    assert_eq!(failed, 0);
    assert_eq!(daemon.stats().mm.orig_data_size, 0);
    daemon.ctl(&["compact"]);
    assert_eq!(daemon.stats().info.slot_table_bytes, 64 << 10);
    drop(frontend);
    daemon.expect_clean_exit();
}
