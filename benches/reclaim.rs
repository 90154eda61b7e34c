// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The proactive reclaim benchmark (`cargo bench --bench reclaim`): how fast `ctl reclaim`
//! gives memory back, in MiB of `mem_used_total` freed a second, by writeback and by
//! recompression.
//!
//! Each round fills a fresh store with the swap-like mix (`pagegen`; 256 MiB = 65536 pages by
//! default, `RECLAIM_BENCH_PAGES` to change it), lz4, then asks `reclaim` for 16 MiB at a time, four times, `min_age=0`, and times each request from
//! the call to its answer (compaction included: the memory is back with the host when it
//! returns). It reports the median request's MiB freed a second over three rounds, the bytes
//! freed against those asked, and verifies every page afterwards.
//!
//! - writeback: a backing file in a temporary directory (under `RECLAIM_BENCH_DIR`, default
//!   the system's temporary directory; `O_DIRECT` where the filesystem takes it);
//! - recompress: zstd as the secondary algorithm, no backing file.
//!
//! One thread throughout, as `ctl reclaim` runs on the control thread.

use std::time::Instant;

use vhost_user_zram::codec::Algorithm;
use vhost_user_zram::pagegen::fill_page;
use vhost_user_zram::store::backing::BackingFile;
use vhost_user_zram::store::reclaim::{ReclaimMode, ReclaimRequest};
use vhost_user_zram::store::{PageStore, StoreConfig};
use vhost_user_zram::PAGE_SIZE;

const DEFAULT_PAGES: u64 = 65_536;
const SEED: u64 = 0x7ec1;
/// Each request asks for 1/this of the filled store's `mem_used_total`: writeback can free
/// nearly all of it, recompression from lz4 to zstd only about a fifth, so its requests are
/// smaller (four of them free an eighth).
fn ask_fraction(mode: ReclaimMode) -> u64 {
    match mode {
        ReclaimMode::Writeback => 8,
        ReclaimMode::Recompress => 32,
        ReclaimMode::Any => unreachable!("the benchmark measures one mode at a time"),
    }
}

/// Requests a round.
const REQUESTS: usize = 4;
const ROUNDS: usize = 3;

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn page(index: u64) -> [u8; PAGE_SIZE] {
    let mut page = [0u8; PAGE_SIZE];
    fill_page(SEED, index, &mut page);
    page
}

/// One request's result.
#[derive(Debug, Clone, Copy)]
struct Request {
    asked: u64,
    freed: u64,
    secs: f64,
    pages: u64,
}

impl Request {
    fn mib_per_s(self) -> f64 {
        mib(self.freed) / self.secs
    }
}

fn filled_store(pages: u64, mode: ReclaimMode, dir: &std::path::Path) -> PageStore {
    let store = PageStore::new(StoreConfig {
        capacity_pages: pages,
        algorithm: Algorithm::Lz4,
        level: None,
        mem_limit: None,
    })
    .expect("store");
    let store = match mode {
        ReclaimMode::Writeback => {
            let backing = BackingFile::open(&dir.join("backing")).expect("backing file");
            store.with_backing_file(backing)
        }
        ReclaimMode::Recompress => store
            .with_secondary_algorithms(&["zstd".parse().expect("algorithm")])
            .expect("secondary"),
        ReclaimMode::Any => unreachable!("the benchmark measures one mode at a time"),
    };
    for index in 0..pages {
        store.write(index, &page(index)).expect("write");
    }
    store
}

fn round(pages: u64, mode: ReclaimMode, dir: &std::path::Path) -> Vec<Request> {
    let store = filled_store(pages, mode, dir);
    let request = ReclaimRequest {
        bytes: store.mem_used_total() / ask_fraction(mode),
        min_age: std::time::Duration::ZERO,
        mode,
    };
    let mut requests = Vec::with_capacity(REQUESTS);
    for _ in 0..REQUESTS {
        let started = Instant::now();
        let outcome = store.reclaim(&request).expect("reclaim");
        let secs = started.elapsed().as_secs_f64();
        assert!(
            outcome.after < outcome.before,
            "a reclaim freed nothing: {outcome}"
        );
        requests.push(Request {
            asked: request.bytes,
            freed: outcome.freed(),
            secs,
            pages: outcome.written_back + outcome.recompressed,
        });
    }
    let mut out = [0u8; PAGE_SIZE];
    for index in 0..pages {
        store.read(index, &mut out).expect("read back");
        assert!(out == page(index), "page {index} read back wrong");
    }
    store.check_consistency().expect("consistent");
    requests
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let pages = std::env::var("RECLAIM_BENCH_PAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_PAGES);
    println!(
        "reclaim of {} MiB of swap-like pages ({pages} pages, lz4): {REQUESTS} requests each, \
         min_age=0, {ROUNDS} rounds",
        (pages * PAGE_SIZE as u64) >> 20
    );
    for mode in [ReclaimMode::Writeback, ReclaimMode::Recompress] {
        let mut rates = Vec::new();
        let (mut freed, mut asked, mut shed, mut secs) = (0u64, 0u64, 0u64, 0f64);
        for _ in 0..ROUNDS {
            let dir = match std::env::var_os("RECLAIM_BENCH_DIR") {
                Some(dir) => tempfile::tempdir_in(dir),
                None => tempfile::tempdir(),
            }
            .expect("temporary directory");
            for request in round(pages, mode, dir.path()) {
                rates.push(request.mib_per_s());
                freed += request.freed;
                asked += request.asked;
                shed += request.pages;
                secs += request.secs;
            }
        }
        let name = match mode {
            ReclaimMode::Writeback => "writeback",
            ReclaimMode::Recompress => "recompress (zstd)",
            ReclaimMode::Any => unreachable!("not measured"),
        };
        println!(
            "{name:<18} asks 1/{:<2} median {:>7.1} MiB freed/s; mean {:.1} MiB/s; freed {:.2}x \
             the bytes asked; {:.0} pages shed a second",
            ask_fraction(mode),
            median(rates),
            mib(freed) / secs,
            freed as f64 / asked as f64,
            shed as f64 / secs
        );
    }
}
