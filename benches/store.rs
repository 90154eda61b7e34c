// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The store benchmark (`cargo bench --bench store`): what `PageStore` costs on top of the bare
//! codec, and how much memory it holds per stored byte.
//!
//! Over the swap-like page mix (`pagegen`, 64k pages = 256 MiB by default; set
//! `STORE_BENCH_PAGES` to change it), on one thread, for lz4, zstd level 1 and deflate level 1:
//!
//! - store write and read throughput (pages/s) through `PageStore::write`/`read`;
//! - the bare codec's throughput over the same pages: the same-filled check, then compression
//!   into a reused `COMPRESS_BUFFER` for the pages that are not same-filled — the work zram does
//!   for a write, minus the store;
//! - write cost / bare cost (target ≤ 1.15×);
//! - mem_used_total per stored page, and the allocator overhead
//!   `mem_used_total / compr_data_size − 1` (target ≤ 2 %), with and without the slot table;
//! - compaction: after writing every page, discard a random quarter and overwrite another
//!   random quarter with other pages, then compact; pages_compacted and the overhead before and
//!   after.
//!
//! `STORE_BENCH_STATE=1` puts the store's memory in a state file (a memfd) instead of
//! anonymous memory.
//!
//! Every timing is the best of 3 runs, to keep other processes on a shared machine out of it.
//! Data read back is verified (outside the timed loop).

use std::hint::black_box;
use std::time::{Duration, Instant};

use vhost_user_zram::codec::{Algorithm, COMPRESS_BUFFER};
use vhost_user_zram::pagegen::{fill_page, SplitMix64};
use vhost_user_zram::store::{
    same_fill, PageStore, PendingConfig, StateFile, StoreConfig, StoreMemory,
};
use vhost_user_zram::PAGE_SIZE;

const DEFAULT_PAGES: usize = 65536;
const ROUNDS: usize = 3;
const SEED: u64 = 0x5704e;

/// What one codec measured.
struct CodecResult {
    name: String,
    write_pages_per_s: f64,
    read_pages_per_s: f64,
    bare_pages_per_s: f64,
    mm: vhost_user_zram::store::MmStat,
    slot_table_bytes: u64,
    compaction: CompactionResult,
}

struct CompactionResult {
    stored_pages: u64,
    overhead_before: f64,
    overhead_after: f64,
    mem_before: u64,
    mem_after: u64,
    pages_compacted: u64,
    compact_time: Duration,
}

/// `mem_used_total / compr_data_size − 1`, optionally without the slot table.
fn overhead(mem_used_total: u64, compr_data_size: u64, excluded: u64) -> f64 {
    if compr_data_size == 0 {
        return f64::NAN;
    }
    (mem_used_total - excluded) as f64 / compr_data_size as f64 - 1.0
}

/// The shortest of `ROUNDS` runs of `run`; `prepare` makes each run's input, untimed.
fn best_of<S>(mut prepare: impl FnMut() -> S, mut run: impl FnMut(&mut S)) -> Duration {
    (0..ROUNDS)
        .map(|_| {
            let mut state = prepare();
            let started = Instant::now();
            run(&mut state);
            started.elapsed()
        })
        .min()
        .expect("at least one round")
}

fn new_store(algorithm: Algorithm, level: Option<i32>, pages: usize) -> PageStore {
    let config = StoreConfig {
        capacity_pages: pages as u64,
        algorithm,
        level,
        mem_limit: None,
    };
    let on_state = std::env::var("STORE_BENCH_STATE").is_ok_and(|v| !v.is_empty() && v != "0");
    if !on_state {
        return PageStore::new(config).expect("store");
    }
    // The store's memory in a state file (a memfd: tmpfs).
    let file = StateFile::new_memfd("store-bench").expect("memfd");
    let mut store = PageStore::with_memory(config, PendingConfig::INLINE, StoreMemory::State(file))
        .expect("store");
    store.recover().expect("a new state file");
    store
}

fn bench_codec(algorithm: Algorithm, level: Option<i32>, pages: &[[u8; PAGE_SIZE]]) -> CodecResult {
    let count = pages.len();
    let per_second = |elapsed: Duration| count as f64 / elapsed.as_secs_f64();
    let name = match level {
        Some(level) => format!("{algorithm} {level}"),
        None => algorithm.to_string(),
    };

    // The bare codec: same-filled check, then compress into a reused buffer.
    let codec = algorithm.codec(level).expect("codec");
    let mut dst = vec![0u8; COMPRESS_BUFFER];
    let bare = best_of(
        || (),
        |_| {
            for page in pages {
                if same_fill::detect(page).is_none() {
                    black_box(codec.compress(page, &mut dst).expect("compress"));
                }
            }
        },
    );

    // Store writes into a fresh store each round.
    let write = best_of(
        || new_store(algorithm, level, count),
        |store| {
            for (index, page) in pages.iter().enumerate() {
                store.write(index as u64, page).expect("write");
            }
        },
    );

    // Reads from one full store; verified once, untimed.
    let store = new_store(algorithm, level, count);
    for (index, page) in pages.iter().enumerate() {
        store.write(index as u64, page).expect("write");
    }
    let stats = store.stats();
    let mut out = [0u8; PAGE_SIZE];
    for (index, page) in pages.iter().enumerate() {
        store.read(index as u64, &mut out).expect("read");
        assert!(out == *page, "{name}: page {index} read back wrong");
    }
    let read = best_of(
        || (),
        |_| {
            for index in 0..count {
                store.read(index as u64, &mut out).expect("read");
                black_box(&out);
            }
        },
    );

    let compaction = bench_compaction(&store, pages);
    CodecResult {
        name,
        write_pages_per_s: per_second(write),
        read_pages_per_s: per_second(read),
        bare_pages_per_s: per_second(bare),
        mm: stats.mm,
        slot_table_bytes: stats.info.slot_table_bytes,
        compaction,
    }
}

/// On a store holding every page: discards a random quarter, overwrites another random quarter
/// with other swap-like pages, compacts, and checks that every page still reads right.
fn bench_compaction(store: &PageStore, pages: &[[u8; PAGE_SIZE]]) -> CompactionResult {
    let mut rng = SplitMix64::new(SEED ^ 0xc0);
    let mut expected: Vec<Option<usize>> = (0..pages.len()).map(Some).collect();
    let mut replacement = [0u8; PAGE_SIZE];
    let mut replacements = Vec::new();
    for (index, expectation) in expected.iter_mut().enumerate() {
        match rng.below(4) {
            0 => {
                store
                    .discard(index as u64..index as u64 + 1)
                    .expect("discard");
                *expectation = None;
            }
            1 => {
                fill_page(SEED ^ 0xfeed, index as u64, &mut replacement);
                store.write(index as u64, &replacement).expect("overwrite");
                replacements.push(index);
            }
            _ => {}
        }
    }
    let before = store.stats();
    let table = before.info.slot_table_bytes;
    let started = Instant::now();
    let pages_compacted = store.compact();
    let compact_time = started.elapsed();
    let after = store.stats();
    assert_eq!(
        after.mm.pages_compacted,
        before.mm.pages_compacted + pages_compacted
    );
    let mut out = [0u8; PAGE_SIZE];
    for (index, want) in expected.iter().enumerate() {
        store.read(index as u64, &mut out).expect("read");
        match want {
            None => assert!(out == [0u8; PAGE_SIZE], "discarded page {index} not zero"),
            Some(_) if replacements.binary_search(&index).is_ok() => {
                fill_page(SEED ^ 0xfeed, index as u64, &mut replacement);
                assert!(
                    out == replacement,
                    "overwritten page {index} wrong after compaction"
                );
            }
            Some(source) => assert!(out == pages[*source], "page {index} wrong after compaction"),
        }
    }
    CompactionResult {
        stored_pages: before.mm.orig_data_size / PAGE_SIZE as u64,
        overhead_before: overhead(before.mm.mem_used_total, before.mm.compr_data_size, table),
        overhead_after: overhead(after.mm.mem_used_total, after.mm.compr_data_size, table),
        mem_before: before.mm.mem_used_total,
        mem_after: after.mm.mem_used_total,
        pages_compacted,
        compact_time,
    }
}

fn kpps(pages_per_s: f64) -> String {
    format!("{:.0}k", pages_per_s / 1e3)
}

fn percent(fraction: f64) -> String {
    format!("{:+.2}%", fraction * 100.0)
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1u64 << 20) as f64)
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not supported.
    let count = std::env::var("STORE_BENCH_PAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_PAGES);
    let mut pages = vec![[0u8; PAGE_SIZE]; count];
    for (index, page) in pages.iter_mut().enumerate() {
        fill_page(SEED, index as u64, page);
    }
    println!(
        "store bench: {count} swap-like pages ({} MiB), one thread, best of {ROUNDS} runs",
        mib((count * PAGE_SIZE) as u64)
    );
    let codecs = [
        (Algorithm::Lz4, None),
        (Algorithm::Zstd, Some(1)),
        (Algorithm::Deflate, Some(1)),
    ];
    let results: Vec<CodecResult> = codecs
        .into_iter()
        .map(|(algorithm, level)| bench_codec(algorithm, level, &pages))
        .collect();

    println!(
        "\n{:<10} {:>9} {:>9} {:>9} {:>11} {:>7} {:>9} {:>9} {:>10} {:>14}",
        "codec",
        "write p/s",
        "read p/s",
        "bare p/s",
        "write/bare",
        "ratio",
        "MiB used",
        "B/page",
        "overhead",
        "ovh. w/o table"
    );
    for r in &results {
        let mm = &r.mm;
        println!(
            "{:<10} {:>9} {:>9} {:>9} {:>10.3}x {:>7.2} {:>9} {:>9.0} {:>10} {:>14}",
            r.name,
            kpps(r.write_pages_per_s),
            kpps(r.read_pages_per_s),
            kpps(r.bare_pages_per_s),
            r.bare_pages_per_s / r.write_pages_per_s,
            mm.orig_data_size as f64 / mm.mem_used_total as f64,
            mib(mm.mem_used_total),
            mm.mem_used_total as f64 / count as f64,
            percent(overhead(mm.mem_used_total, mm.compr_data_size, 0)),
            percent(overhead(
                mm.mem_used_total,
                mm.compr_data_size,
                r.slot_table_bytes
            )),
        );
    }
    println!(
        "targets: write/bare <= 1.15x; overhead <= +2.00%. ratio = orig_data_size / mem_used_total; \
         same-filled pages: {} of {count}; huge pages: {}",
        results[0].mm.same_pages, results[0].mm.huge_pages
    );

    println!(
        "\ncompaction: discard a random 1/4, overwrite another random 1/4, compact (overhead w/o slot table)"
    );
    println!(
        "{:<10} {:>12} {:>13} {:>12} {:>15} {:>14} {:>15} {:>10}",
        "codec",
        "pages kept",
        "MiB before",
        "MiB after",
        "pages_compacted",
        "ovh. before",
        "ovh. after",
        "time ms"
    );
    for r in &results {
        let c = &r.compaction;
        println!(
            "{:<10} {:>12} {:>13} {:>12} {:>15} {:>14} {:>15} {:>10.1}",
            r.name,
            c.stored_pages,
            mib(c.mem_before),
            mib(c.mem_after),
            c.pages_compacted,
            percent(c.overhead_before),
            percent(c.overhead_after),
            c.compact_time.as_secs_f64() * 1e3
        );
    }
}
