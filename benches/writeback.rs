// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The writeback benchmark (`cargo bench --bench writeback`), one run:
//!
//! 1. fill a store with the swap-like mix (`pagegen`; 256 MiB = 65536 pages by default, set
//!    `WRITEBACK_BENCH_PAGES` to change it), lz4, and random-read pages from RAM;
//! 2. `idle all` and `writeback idle` to a backing file in a temporary directory (under
//!    `WRITEBACK_BENCH_DIR`, default the system's temporary directory): pages/s and MB/s of
//!    writeback, `mem_used_total` before and after, the file's bytes on disk per written-back
//!    page against the pages' compressed size (target ≤ 1.1×);
//! 3. random-read the same pages, now from the file, and verify every page.
//!
//! One thread throughout; the reads are 4 KiB random reads of whole pages, as a swapping guest
//! makes them.

use std::time::{Duration, Instant};

use vhost_user_zram::codec::Algorithm;
use vhost_user_zram::pagegen::{fill_page, SplitMix64};
use vhost_user_zram::store::backing::BackingFile;
use vhost_user_zram::store::{PageStore, StoreConfig, WritebackMode, WritebackRequest};
use vhost_user_zram::PAGE_SIZE;

const DEFAULT_PAGES: u64 = 65_536;
const SEED: u64 = 0xb4c6;
/// Random reads measured per phase.
const READS: usize = 50_000;

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn page(index: u64) -> [u8; PAGE_SIZE] {
    let mut page = [0u8; PAGE_SIZE];
    fill_page(SEED, index, &mut page);
    page
}

/// Random reads of `READS` pages; returns reads/s.
fn random_reads(store: &PageStore, pages: u64, seed: u64) -> f64 {
    let mut rng = SplitMix64::new(seed);
    let order: Vec<u64> = (0..READS).map(|_| rng.below(pages)).collect();
    let mut out = [0u8; PAGE_SIZE];
    let started = Instant::now();
    for &index in &order {
        store.read(index, &mut out).expect("read");
        std::hint::black_box(&out);
    }
    READS as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let pages = std::env::var("WRITEBACK_BENCH_PAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_PAGES);
    let dir = match std::env::var_os("WRITEBACK_BENCH_DIR") {
        Some(dir) => tempfile::tempdir_in(dir),
        None => tempfile::tempdir(),
    }
    .expect("temporary directory");
    let backing = BackingFile::open(&dir.path().join("backing")).expect("backing file");
    let direct = backing.is_direct();
    let store = PageStore::new(StoreConfig {
        capacity_pages: pages,
        algorithm: Algorithm::Lz4,
        level: None,
        mem_limit: None,
    })
    .expect("store")
    .with_backing_file(backing);

    for index in 0..pages {
        store.write(index, &page(index)).expect("write");
    }
    let before = store.stats();
    let ram_reads = random_reads(&store, pages, 1);

    store.mark_idle();
    let started = Instant::now();
    let outcome = store
        .writeback(&WritebackRequest::new(WritebackMode::Idle))
        .expect("writeback");
    let elapsed = started.elapsed();
    let after = store.stats();
    let file_reads = random_reads(&store, pages, 2);
    let mut out = [0u8; PAGE_SIZE];
    for index in 0..pages {
        store.read(index, &mut out).expect("read back");
        assert!(out == page(index), "page {index} read back wrong");
    }
    store.check_consistency().expect("consistent");

    let w = &after.writeback;
    let secs = elapsed.max(Duration::from_nanos(1)).as_secs_f64();
    println!(
        "writeback of {} MiB of swap-like pages ({pages} pages, lz4), backing file {} ({})",
        (pages * PAGE_SIZE as u64) >> 20,
        dir.path().display(),
        if direct { "O_DIRECT" } else { "buffered" }
    );
    println!(
        "written back     {} pages, {:.1} MiB of objects, in {} write calls",
        outcome.written,
        mib(outcome.bytes),
        w.write_calls
    );
    println!(
        "throughput       {:.0} pages/s, {:.1} MB/s of page data, {:.1} MB/s to the file",
        outcome.written as f64 / secs,
        outcome.written as f64 * PAGE_SIZE as f64 / secs / 1e6,
        outcome.bytes as f64 / secs / 1e6
    );
    println!(
        "mem_used_total   {:.1} MiB before, {:.1} MiB after ({:.3}x)",
        mib(before.mm.mem_used_total),
        mib(after.mm.mem_used_total),
        after.mm.mem_used_total as f64 / before.mm.mem_used_total as f64
    );
    println!(
        "file on disk     {:.1} MiB for {:.1} MiB of objects: {:.3}x their compressed size \
         (target <= 1.1x), {:.0} bytes per page",
        mib(w.file_disk_bytes),
        mib(w.live_bytes),
        w.file_disk_bytes as f64 / w.live_bytes.max(1) as f64,
        w.file_disk_bytes as f64 / w.pages_on_file.max(1) as f64
    );
    println!(
        "random 4k reads  {:.0}/s from RAM, {:.0}/s from the file ({:.2}x)",
        ram_reads,
        file_reads,
        file_reads / ram_reads
    );
}
