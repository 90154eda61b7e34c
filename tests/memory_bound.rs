// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon's resident memory stays within `mem_used_total` plus the headroom README
//! documents, through a churn of every `ctl` command on a device a libblkio frontend filled;
//! and `ctl` outlasts its read timeout on a long command without reporting a failure.

mod common;

use std::process::Output;

use common::blkio::Frontend;
use common::child::{DaemonProcess, BIN};

/// README's headroom: what the daemon may hold beyond `mem_used_total` (its threads' stacks
/// and buffers, the zstd contexts, training while it runs, the binary itself).
const HEADROOM: u64 = 64 << 20;
/// The device and how much of it the frontend writes.
const DEVICE: u64 = 256 << 20;
const WRITTEN_PAGES: u64 = 24576;

/// `ctl ARGS` giving up after 3 s of silence: longer commands must keep it waiting with their
/// progress lines (one a second).
fn ctl(daemon: &DaemonProcess, args: &[&str]) -> Output {
    std::process::Command::new(BIN)
        .arg("ctl")
        .arg("--control-socket")
        .arg(daemon.control())
        .args(args)
        .env("VHOST_USER_ZRAM_CTL_TIMEOUT", "3")
        .output()
        .unwrap()
}

/// A `/proc/PID/status` figure in bytes.
fn status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap();
    kib << 10
}

#[test]
fn resident_memory_stays_within_mem_used_total_and_the_headroom_through_every_command() {
    // Arrange: a 256 MiB device, a backing file and two recompression algorithms; 96 MiB of
    // swap-like pages written by a frontend.
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing");
    let daemon = DaemonProcess::options()
        .size(DEVICE)
        .args(["--backing-file", backing.to_str().unwrap()])
        .args(["--recompress-algorithm", "zstd:level=3"])
        .args(["--recompress-algorithm", "deflate:level=6"])
        .start();
    let mut frontend = Frontend::connect(&daemon.socket);
    frontend.write_pages(0..WRITTEN_PAGES, 1);
    let pid = daemon.pid();

    // Act: every command, twice, with rewrites and discards between the rounds.
    let commands: [&[&str]; 17] = [
        &["stats"],
        &["stats", "--json"],
        &["mm_stat"],
        &["io_stat"],
        &["metrics"],
        &["bd_stat"],
        &["train-dict", "--samples", "16384", "--size", "65536"],
        &["idle"],
        &["recompress", "type=idle"],
        &["train-dict"],
        &["recompress"],
        &["compact"],
        &["writeback-limit", "100000"],
        &["writeback", "huge"],
        &["writeback", "idle"],
        &["writeback-limit", "off"],
        &["compact"],
    ];
    let mut worst = (0u64, String::new());
    let mut report = String::new();
    for round in 0..2u64 {
        for args in commands {
            let started = std::time::Instant::now();
            let output = ctl(&daemon, args);
            let took = started.elapsed();
            assert!(
                output.status.success(),
                "ctl {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            let used = daemon.mm_stat().mem_used_total;
            let rss = status_bytes(pid, "VmRSS:");
            let anon = status_bytes(pid, "RssAnon:");
            let line = format!(
                "round {round} {args:?} ({took:.1?}): VmRSS {} MiB, RssAnon {} MiB, \
                 mem_used_total {} MiB\n",
                rss >> 20,
                anon >> 20,
                used >> 20
            );
            eprint!("{line}");
            report.push_str(&line);
            let over = rss.saturating_sub(used);
            if over > worst.0 {
                worst = (over, format!("{args:?} in round {round}"));
            }
        }
        frontend.discard(0..WRITTEN_PAGES / 2);
        frontend.write_pages(WRITTEN_PAGES / 4..WRITTEN_PAGES / 2, round + 2);
    }

    // Assert: within the headroom throughout (on main: 68 MiB past it after the churn, of
    // which 60 MiB were the samples of one training kept by malloc), and, with every page
    // written back, little more than mem_used_total of the daemon's own memory left.
    let used = daemon.mm_stat().mem_used_total;
    let anon = status_bytes(pid, "RssAnon:");
    assert!(
        anon <= used + (16 << 20),
        "RssAnon {} MiB against mem_used_total {} MiB at the end:\n{report}",
        anon >> 20,
        used >> 20
    );
    assert!(
        worst.0 <= HEADROOM,
        "VmRSS went {} MiB past mem_used_total after {}; the headroom is {} MiB:\n{report}",
        worst.0 >> 20,
        worst.1,
        HEADROOM >> 20
    );
    drop(frontend);
}
