// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The idle clock's tick on large devices (`cargo bench --bench idle_tick`): what one tick
//! (`PageStore::tick_idle_clock`, one walk of the slot table's touched pages) costs when a
//! 1 TiB device holds 1 GiB, next to the same 1 GiB on a 64 GiB device and on a dense 1 GiB
//! device; and the resident memory an empty 1 TiB store costs.
//!
//! The 1 GiB (262,144 swap-like pages from `pagegen`) is written in runs of 64 pages at
//! random places (swap allocates in clusters), and, for the worst case, one page at each of
//! 262,144 random places (every page on a table page of its own). Each tick is timed 9 times
//! and the median printed; the first ticks age every page, the later ones too (ages saturate
//! only after 127 ticks). `IDLE_TICK_BENCH_PAGES` changes the 262,144.

use std::time::{Duration, Instant};

use vhost_user_zram::codec::Algorithm;
use vhost_user_zram::pagegen::{fill_page, SplitMix64};
use vhost_user_zram::store::{PageStore, StoreConfig};
use vhost_user_zram::PAGE_SIZE;

const TIB_PAGES: u64 = 1 << 28;
const GIB64_PAGES: u64 = 1 << 24;
const TICKS: usize = 9;
const RUN: u64 = 64;
const SEED: u64 = 0x71c;

fn store(pages: u64) -> PageStore {
    PageStore::new(StoreConfig {
        capacity_pages: pages,
        algorithm: Algorithm::Lz4,
        level: None,
        mem_limit: None,
    })
    .expect("a store")
}

/// This process's resident bytes.
fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("statm's resident field");
    pages * PAGE_SIZE as u64
}

/// Where the pages go.
#[derive(Clone, Copy)]
enum Placement {
    /// Pages 0..n.
    Dense,
    /// Runs of [`RUN`] pages at random run-aligned places.
    Clustered,
    /// Each page at a random place.
    Scattered,
}

/// `count` distinct page indices below `capacity`, placed as `placement` says.
fn positions(capacity: u64, count: u64, placement: Placement) -> Vec<u64> {
    let mut rng = SplitMix64::new(SEED);
    let mut chosen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    match placement {
        Placement::Dense => out.extend(0..count),
        Placement::Clustered => {
            let runs = capacity / RUN;
            while (out.len() as u64) < count {
                let run = rng.next_u64() % runs;
                if chosen.insert(run) {
                    out.extend(
                        run * RUN..(run * RUN + RUN).min(run * RUN + count - out.len() as u64),
                    );
                }
            }
        }
        Placement::Scattered => {
            while (out.len() as u64) < count {
                let page = rng.next_u64() % capacity;
                if chosen.insert(page) {
                    out.push(page);
                }
            }
        }
    }
    out
}

/// Fills a store of `capacity` pages with `count` pages placed as `placement` says, then
/// times [`TICKS`] ticks; prints the median.
fn measure(label: &str, capacity: u64, count: u64, placement: Placement) {
    let s = store(capacity);
    let mut page = [0u8; PAGE_SIZE];
    let places = positions(capacity, count, placement);
    let started = Instant::now();
    for &index in &places {
        fill_page(SEED, index, &mut page);
        s.write(index, &page).expect("a write");
    }
    let filled = started.elapsed();
    let mut times: Vec<Duration> = (0..TICKS)
        .map(|_| {
            let started = Instant::now();
            let aged = s.tick_idle_clock();
            let took = started.elapsed();
            assert!(aged > 0 && aged <= count, "aged {aged} of {count}");
            took
        })
        .collect();
    times.sort();
    let stats = s.stats();
    println!(
        "{label:<44} tick median {:>9.3} ms (min {:.3}, max {:.3}); slot table {:>8} KiB \
         resident; filled in {:.1?}",
        times[TICKS / 2].as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3,
        times[TICKS - 1].as_secs_f64() * 1e3,
        stats.info.slot_table_bytes >> 10,
        filled
    );
}

fn main() {
    let count = std::env::var("IDLE_TICK_BENCH_PAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(262_144u64);
    let before = resident_bytes();
    let empty = store(TIB_PAGES);
    let started = Instant::now();
    let aged = empty.tick_idle_clock();
    let tick = started.elapsed();
    assert_eq!(aged, 0);
    println!(
        "empty 1 TiB store: {} KiB resident (mem_used_total {} KiB), a tick takes {:.1?}",
        resident_bytes().saturating_sub(before) >> 10,
        empty.mem_used_total() >> 10,
        tick
    );
    drop(empty);
    let mib = (count * PAGE_SIZE as u64) >> 20;
    measure(
        &format!("{mib} MiB on a dense {mib} MiB device"),
        count,
        count,
        Placement::Dense,
    );
    measure(
        &format!("{mib} MiB in runs of {RUN} on 64 GiB"),
        GIB64_PAGES,
        count,
        Placement::Clustered,
    );
    measure(
        &format!("{mib} MiB in runs of {RUN} on 1 TiB"),
        TIB_PAGES,
        count,
        Placement::Clustered,
    );
    measure(
        &format!("{mib} MiB scattered page by page on 1 TiB"),
        TIB_PAGES,
        count,
        Placement::Scattered,
    );
}
