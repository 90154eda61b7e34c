// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The read-path benchmark (`cargo bench --bench read_request`): what one 4 KiB virtio-blk read
//! costs the queue thread, with no transport around it — a [`Worker`] serving read chains from
//! a split queue in guest memory against a `PageStore` (lz4) holding the swap-like page mix.
//!
//! Three layouts of the data buffer:
//!
//! - `one descriptor`: the page in one descriptor inside one region — the common case, read
//!   straight into guest memory (zero-copy);
//! - `two descriptors`: the same page in two 2 KiB descriptors — always copied through the
//!   thread's page buffer;
//! - `store only`: `PageStore::read` into a private page, for the decompression floor.
//!
//! and `one descriptor, inflight`: the first layout with a vhost-user inflight region attached
//! to the runner, as when the frontend negotiated `INFLIGHT_SHMFD` (a few stores into the
//! shared region per request). The `log type` rows run the first two layouts over guest memory
//! as the daemon maps it (`blk::backend::GuestMap`: every region carries a dirty-log bitmap, none set, as
//! when no migration runs) instead of memory without a bitmap: what offering `LOG_ALL` costs.
//!
//! Prints ns per read (best of `ROUNDS` runs, to keep other processes on a shared machine out
//! of it) and the request path's cost above the store's read. Built against an older tree the
//! same file measures the copying path in both rows, which is how before/after is compared.
//! `READ_BENCH_PAGES` sets the stored pages (default 16384 = 64 MiB).

// Ring addresses and lengths are small constants.
#![allow(clippy::cast_possible_truncation)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use std::sync::Arc;

use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_zram::blk::inflight::{create_region, InflightRegion};
use vhost_user_zram::blk::request::RequestRunner;
use vhost_user_zram::blk::DeviceConfig;
use vhost_user_zram::codec::Algorithm;
use vhost_user_zram::pagegen::{fill_page, SplitMix64};
use vhost_user_zram::store::{PageStore, StoreConfig};
use vhost_user_zram::PAGE_SIZE;
use virtio_queue::{Queue, QueueT};
use vm_memory::mmap::NewBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const DEFAULT_PAGES: u64 = 16384;
const ROUNDS: usize = 5;
const READS_PER_ROUND: usize = 400_000;
/// Chains posted per round of `process_queue`, like a queue depth.
const BATCH: u16 = 32;
const QUEUE_SIZE: u16 = 256;

const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x1_0000;
const USED_RING: u64 = 0x2_0000;
const HEADERS: u64 = 0x3_0000;
const STATUSES: u64 = 0x4_0000;
const DATA: u64 = 0x10_0000;
const MEM_SIZE: usize = 0x40_0000;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// A split queue with its rings placed by hand, and a driver that posts read chains.
struct Bench<B: NewBitmap> {
    mem: GuestMemoryMmap<B>,
    queue: Queue,
    avail_idx: u16,
}

impl<B: NewBitmap> Bench<B> {
    fn new() -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mut queue = Queue::new(QUEUE_SIZE).unwrap();
        queue.set_size(QUEUE_SIZE);
        queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
        queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
        queue.set_ready(true);
        Bench {
            mem,
            queue,
            avail_idx: 0,
        }
    }

    fn store_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = DESC_TABLE + 16 * u64::from(index);
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&raw, GuestAddress(at)).unwrap();
    }

    /// Writes the descriptors of `BATCH` read chains once: slot `s` uses descriptors
    /// `4 s ..`, its own header and status, and page `s` of the data area, in one descriptor
    /// or split in two.
    fn lay_out(&self, split: bool) {
        for slot in 0..BATCH {
            let first = 4 * slot;
            let header = HEADERS + 16 * u64::from(slot);
            let data = DATA + u64::from(slot) * PAGE_SIZE as u64;
            let status = STATUSES + u64::from(slot);
            self.store_desc(first, header, 16, F_NEXT, first + 1);
            if split {
                self.store_desc(first + 1, data, 2048, F_WRITE | F_NEXT, first + 2);
                self.store_desc(first + 2, data + 2048, 2048, F_WRITE | F_NEXT, first + 3);
                self.store_desc(first + 3, status, 1, F_WRITE, 0);
            } else {
                self.store_desc(
                    first + 1,
                    data,
                    PAGE_SIZE as u32,
                    F_WRITE | F_NEXT,
                    first + 2,
                );
                self.store_desc(first + 2, status, 1, F_WRITE, 0);
            }
        }
    }

    /// Posts `BATCH` reads of the pages in `pages`.
    fn post(&mut self, pages: &[u64]) {
        for (slot, &page) in (0..BATCH).zip(pages) {
            let mut header = [0u8; 16];
            header[0..4].copy_from_slice(&0u32.to_le_bytes()); // VIRTIO_BLK_T_IN
            header[8..16].copy_from_slice(&(page * 8).to_le_bytes());
            self.mem
                .write_slice(&header, GuestAddress(HEADERS + 16 * u64::from(slot)))
                .unwrap();
            let ring_at = AVAIL_RING + 4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE);
            self.mem.write_obj(4 * slot, GuestAddress(ring_at)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL_RING + 2))
            .unwrap();
    }
}

/// Random page indexes, drawn once so every layout reads the same sequence.
fn page_sequence(pages: u64) -> Vec<u64> {
    let mut rng = SplitMix64::new(0x7ead);
    (0..READS_PER_ROUND)
        .map(|_| rng.next_u64() % pages)
        .collect()
}

/// Times the reads of `sequence` over guest memory whose regions carry bitmap `B`.
fn time_reads<B: NewBitmap>(
    store: &PageStore,
    pages: u64,
    sequence: &[u64],
    split: bool,
    inflight: bool,
) -> Duration {
    let mut device = DeviceConfig::new(pages);
    device.queue_size = QUEUE_SIZE;
    let mut bench = Bench::<B>::new();
    let mut worker = RequestRunner::standalone(&device);
    if inflight {
        let (file, len) = create_region(1, QUEUE_SIZE, 1, QUEUE_SIZE).unwrap();
        let region = InflightRegion::map(&file, len, 0, 1, QUEUE_SIZE, 1, QUEUE_SIZE).unwrap();
        worker.track_inflight(Arc::new(region).queue(0));
        worker.start_queue(&mut bench.queue, &bench.mem).unwrap();
    }
    bench.lay_out(split);
    let start = Instant::now();
    for chunk in sequence.chunks(usize::from(BATCH)) {
        bench.post(chunk);
        let served = worker
            .process_queue(&mut bench.queue, &bench.mem, store, &device)
            .unwrap();
        assert_eq!(served, chunk.len());
    }
    let elapsed = start.elapsed();
    // Every status OK, and the last batch's data right (outside the timed loop).
    let mut expected = [0u8; PAGE_SIZE];
    let last = sequence.chunks(usize::from(BATCH)).last().unwrap();
    for (slot, &page) in (0..BATCH).zip(last) {
        let status: u8 = bench
            .mem
            .read_obj(GuestAddress(STATUSES + u64::from(slot)))
            .unwrap();
        assert_eq!(status, 0);
        store.read(page, &mut expected).unwrap();
        let mut got = vec![0u8; PAGE_SIZE];
        bench
            .mem
            .read_slice(
                &mut got,
                GuestAddress(DATA + u64::from(slot) * PAGE_SIZE as u64),
            )
            .unwrap();
        assert!(got[..] == expected[..], "page {page} read back wrong");
    }
    elapsed
}

fn time_store_reads(store: &PageStore, sequence: &[u64]) -> Duration {
    let mut page = Box::new([0u8; PAGE_SIZE]);
    let start = Instant::now();
    for &index in sequence {
        store.read(index, &mut page).unwrap();
        black_box(&page);
    }
    start.elapsed()
}

fn main() {
    let pages = std::env::var("READ_BENCH_PAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_PAGES);
    let store = PageStore::new(StoreConfig {
        capacity_pages: pages,
        algorithm: Algorithm::Lz4,
        level: None,
        mem_limit: None,
    })
    .unwrap();
    let mut page = Box::new([0u8; PAGE_SIZE]);
    for index in 0..pages {
        fill_page(1, index, &mut page);
        store.write(index, &page).unwrap();
    }
    let sequence = page_sequence(pages);
    // Alternate the layouts inside each round so machine load hits them alike.
    let mut one = Vec::new();
    let mut two = Vec::new();
    let mut bare = Vec::new();
    let mut tracked = Vec::new();
    let mut one_log = Vec::new();
    let mut two_log = Vec::new();
    for _ in 0..ROUNDS {
        one.push(ns_per_read(|| {
            time_reads::<()>(&store, pages, &sequence, false, false)
        }));
        one_log.push(ns_per_read(|| {
            time_reads::<LogBitmap>(&store, pages, &sequence, false, false)
        }));
        two.push(ns_per_read(|| {
            time_reads::<()>(&store, pages, &sequence, true, false)
        }));
        two_log.push(ns_per_read(|| {
            time_reads::<LogBitmap>(&store, pages, &sequence, true, false)
        }));
        bare.push(ns_per_read(|| time_store_reads(&store, &sequence)));
        tracked.push(ns_per_read(|| {
            time_reads::<()>(&store, pages, &sequence, false, true)
        }));
    }
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let (one, two, bare, tracked) = (min(&one), min(&two), min(&bare), min(&tracked));
    let (one_log, two_log) = (min(&one_log), min(&two_log));
    println!(
        "read path, lz4, {pages} swap-like pages, {READS_PER_ROUND} random 4 KiB reads in batches of {BATCH}, best of {ROUNDS}"
    );
    println!("layout              ns/read   reads/s   above store read");
    for (name, ns) in [
        ("one descriptor", one),
        ("two descriptors", two),
        ("store only", bare),
        ("one desc, inflight", tracked),
        ("one desc, log type", one_log),
        ("two desc, log type", two_log),
    ] {
        println!(
            "{name:<18} {ns:>8.0} {:>8.0}k {:>10.0} ns",
            1e6 / ns,
            ns - bare
        );
    }
}

/// The bitmap of every region of the daemon's guest memory (`blk::backend::GuestMap`).
type LogBitmap = BitmapMmapRegion;

fn ns_per_read(run: impl FnOnce() -> Duration) -> f64 {
    run().as_nanos() as f64 / READS_PER_ROUND as f64
}
