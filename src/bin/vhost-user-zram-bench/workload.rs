// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The workload: requests of one *block* (`--request-size`, one 4 KiB page by default) kept
//! `queue_depth` deep on every queue, one thread per queue.
//!
//! Each queue owns the blocks `q, q + queues, q + 2 * queues, ...`, so no two threads ever touch
//! the same block, and a queue never has two requests for one block in flight; what a read must
//! return is therefore always known. The fill writes generation 0 of every block, every later
//! write of a block the next generation, and a read is verified by comparing a hash of each page
//! that came back with the hash of what was written last.
//!
//! Contents come from a pool of pages: by default made once with `pagegen::fill_page` (the
//! swap-like mix), where generation `g` of block `b` starts at pool page `mix(b, g) % pool_size`;
//! or a corpus of real memory (`--corpus`), written *in order*: generation 0 of block `b` is
//! corpus pages `b * block_pages ..`, so the fill writes the corpus as it was captured and
//! neighbouring pages stay neighbours, and each later generation shifts by
//! [`GENERATION_SHIFT`] pages. Generating every page on the fly costs the bench more CPU than
//! the backend it measures (the generator runs at about 160k pages/s per core); copying a pool
//! page costs a memcpy. The pool is far larger than the CPU caches, and zram-like stores do not
//! deduplicate, so the repetition changes nothing for the backend: every backend of a run sees
//! exactly the same data.

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use blkio::{Completion, ReqFlags};
use vhost_user_zram::pagegen::fill_page;
use vhost_user_zram::PAGE_SIZE;

use crate::device::{Device, Lane};
use crate::histogram::LatencyHistogram;

/// A benchmark phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Sequential writes of every page once (no time limit).
    Fill,
    /// Uniformly random page writes.
    RandWrite,
    /// Uniformly random page reads, verified.
    RandRead,
    /// Random requests, 70 % reads and 30 % writes.
    Mixed,
    /// A burst: `--burst-pages` sequential page writes as fast as the queue depth allows,
    /// after the device has gone quiet; no time limit, its elapsed time is the figure.
    Burst,
    /// Reads of the device in order (`--seqread-size` each, from the first block on; at the
    /// end it starts over), verified: what readahead asks of a swap device.
    SeqRead,
}

impl Phase {
    /// Every phase, in the order tables list them.
    pub const ALL: [Phase; 6] = [
        Phase::Fill,
        Phase::RandWrite,
        Phase::Burst,
        Phase::RandRead,
        Phase::SeqRead,
        Phase::Mixed,
    ];

    /// Whether the phase writes a set number of pages instead of running for a duration.
    pub fn is_counted(self) -> bool {
        match self {
            Phase::Fill | Phase::Burst => true,
            Phase::RandWrite | Phase::RandRead | Phase::SeqRead | Phase::Mixed => false,
        }
    }

    /// The name in tables and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Fill => "fill",
            Phase::RandWrite => "randwrite",
            Phase::RandRead => "randread",
            Phase::Mixed => "mixed-70r/30w",
            Phase::Burst => "burst",
            Phase::SeqRead => "seqread",
        }
    }

    /// The share of reads among the requests, in percent.
    fn read_percent(self) -> u64 {
        match self {
            Phase::Fill | Phase::RandWrite | Phase::Burst => 0,
            Phase::RandRead | Phase::SeqRead => 100,
            Phase::Mixed => 70,
        }
    }
}

/// How often a queue thread that waits for completions looks at the backend and the stop flag.
const WAIT_SLICE: Duration = Duration::from_millis(200);

/// How often the progress callback runs.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// How far each generation of a block moves through a corpus, in pages: a prime, so rewrites
/// of a block walk the whole corpus before they repeat.
const GENERATION_SHIFT: u64 = 7919;

/// A phase's progress, as the progress callback sees it.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// How far the phase is, from 0 to 1.
    pub fraction: f64,
    /// Time since the phase started.
    pub elapsed: Duration,
    /// Requests completed so far.
    pub requests: u64,
}

impl Progress {
    /// The estimated time left, once there is something to estimate from.
    pub fn eta(&self) -> Option<Duration> {
        (self.fraction > 0.0 && self.fraction < 1.0)
            .then(|| self.elapsed.mul_f64((1.0 - self.fraction) / self.fraction))
    }
}

/// How a phase is watched while it runs.
pub struct RunControl<'a> {
    /// Raised by SIGINT/SIGTERM: the phase stops early.
    pub stop: &'a AtomicBool,
    /// The longest a queue may wait for any completion before the phase fails.
    pub io_timeout: Duration,
    /// Whether the backend still runs: `Err` with a sentence once it has exited.
    pub backend_alive: &'a (dyn Fn() -> Result<(), String> + Sync),
    /// Called every [`PROGRESS_INTERVAL`] while the phase runs, and once at its end.
    pub progress: &'a (dyn Fn(Progress) + Sync),
}

/// What one phase measured.
#[derive(Debug, Clone)]
pub struct PhaseResult {
    /// The phase.
    pub phase: Phase,
    /// Requests completed.
    pub requests: u64,
    /// Reads among them.
    pub reads: u64,
    /// Reads whose data was checked against what was written.
    pub verified_reads: u64,
    /// Wall-clock time from the first submission to the last completion.
    pub elapsed: Duration,
    /// Submission-to-completion latency of every request.
    pub latency: LatencyHistogram,
    /// Pages a request of the phase moves: its reads' for a phase that only reads, else a
    /// whole block.
    pub request_pages: u64,
    /// Payload bytes moved, reads and writes.
    pub bytes: u64,
}

impl PhaseResult {
    /// Requests per second.
    pub fn iops(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    /// Payload MiB (2^20 bytes) per second.
    pub fn mib_per_second(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64() / (1 << 20) as f64
    }
}

/// The per-block state one queue keeps: whether it was written, and the generation last written.
#[derive(Clone, Copy, Default)]
struct PageState {
    written: bool,
    generation: u32,
}

/// The pages the workload writes, made once, and their hashes.
pub struct PagePool {
    pages: Vec<[u8; PAGE_SIZE]>,
    hashes: Vec<u64>,
    /// A corpus, written in order; else the synthetic mix, spread by a hash.
    in_order: bool,
}

impl PagePool {
    /// `size` swap-like pages: `fill_page(seed, 0..size)`.
    pub fn new(seed: u64, size: usize) -> PagePool {
        let mut pages = vec![[0u8; PAGE_SIZE]; size.max(1)];
        for (index, page) in pages.iter_mut().enumerate() {
            fill_page(seed, index as u64, page);
        }
        let hashes = pages.iter().map(|page| page_hash(page)).collect();
        PagePool {
            pages,
            hashes,
            in_order: false,
        }
    }

    /// A corpus of real memory (at least one page), written in order.
    pub fn from_corpus(pages: Vec<[u8; PAGE_SIZE]>) -> PagePool {
        assert!(!pages.is_empty(), "a corpus holds at least one page");
        let hashes = pages.iter().map(|page| page_hash(page)).collect();
        PagePool {
            pages,
            hashes,
            in_order: true,
        }
    }

    /// Every page of the pool (or corpus), in pool order.
    pub fn pages(&self) -> &[[u8; PAGE_SIZE]] {
        &self.pages
    }

    /// The pool index of page `page` (0-based, below `block_pages`) of generation
    /// `generation` of device block `block`.
    fn index_of(&self, block: u64, block_pages: u64, page: u64, generation: u32) -> usize {
        let len = self.pages.len() as u64;
        let start = if self.in_order {
            (block * block_pages + u64::from(generation) * GENERATION_SHIFT) % len
        } else {
            let mut mixed = block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(generation);
            mixed = (mixed ^ (mixed >> 31)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            mixed ^= mixed >> 29;
            mixed % len
        };
        to_index((start + page) % len)
    }

    /// Copies generation `generation` of `block` into `buffer` (`block_pages` pages).
    ///
    /// # Safety
    /// `buffer` must be valid for writes of `block_pages` pages and not overlap the pool.
    unsafe fn copy_block(&self, block: u64, block_pages: u64, generation: u32, buffer: *mut u8) {
        for page in 0..block_pages {
            let content = &self.pages[self.index_of(block, block_pages, page, generation)];
            // SAFETY: by the contract, page `page` (< block_pages) of the buffer is writable
            // and does not overlap the pool's page.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    content.as_ptr(),
                    buffer.add(to_index(page) * PAGE_SIZE),
                    PAGE_SIZE,
                );
            }
        }
    }

    /// Whether `data` (`block_pages` pages) is generation `generation` of `block`; `Err`
    /// names the first page that is not.
    fn verify_block(
        &self,
        block: u64,
        block_pages: u64,
        generation: u32,
        data: &[u8],
    ) -> Result<(), u64> {
        self.verify_pages(block, block_pages, 0, generation, data)
    }

    /// Whether `data` is pages `first_page..` of generation `generation` of `block`; `Err`
    /// names the first page (of the block) that is not.
    fn verify_pages(
        &self,
        block: u64,
        block_pages: u64,
        first_page: u64,
        generation: u32,
        data: &[u8],
    ) -> Result<(), u64> {
        for (offset, bytes) in data.chunks_exact(PAGE_SIZE).enumerate() {
            let page = first_page + offset as u64;
            let expected = self.index_of(block, block_pages, page, generation);
            if page_hash(bytes) != self.hashes[expected] {
                return Err(page);
            }
        }
        Ok(())
    }
}

/// A page number as a vector index (this bench targets 64-bit hosts).
fn to_index(page: u64) -> usize {
    usize::try_from(page).expect("page numbers fit in usize")
}

/// The state of the whole workload across phases.
pub struct Workload {
    seed: u64,
    pool: std::sync::Arc<PagePool>,
    /// Pages a request moves.
    block_pages: u64,
    /// Pages a random read moves (a divisor of `block_pages`).
    random_read_pages: u64,
    /// Pages a sequential read moves (a divisor of `block_pages`).
    seq_read_pages: u64,
    queue_depth: usize,
    /// Whether reads are checked. Off for backends that do not keep data (null-co).
    verify: bool,
    /// Per queue, per owned block (index `block / queues`).
    page_states: Vec<Vec<PageState>>,
    /// Whether the fill ran, i.e. whether the page states describe the device.
    filled: bool,
    /// Blocks a burst writes, over all queues.
    burst_pages: u64,
}

/// A fast 64-bit hash of a page, four lanes wide so it runs near memory speed. It only needs to
/// tell a correct page from a corrupt one, not to resist an adversary.
pub fn page_hash(page: &[u8]) -> u64 {
    const K: u64 = 0x9fb2_1c65_1e98_df25;
    let mut lanes = [0x243f_6a88_85a3_08d3u64, 1, 2, 3];
    for block in page.chunks_exact(32) {
        for (lane, word) in lanes.iter_mut().zip(block.chunks_exact(8)) {
            let word = u64::from_le_bytes(word.try_into().expect("8-byte chunk"));
            *lane = (*lane ^ word).wrapping_mul(K).rotate_left(29);
        }
    }
    lanes
        .iter()
        .fold(0u64, |h, &lane| (h ^ lane).wrapping_mul(K).rotate_left(31))
}

impl Workload {
    /// A workload over the first `pages` pages of a device with `queues` queues, in requests
    /// of `block_pages` pages (whole blocks only: a tail shorter than a block is not used),
    /// writing pages of `pool`.
    pub fn new(
        seed: u64,
        pool: std::sync::Arc<PagePool>,
        block_pages: u64,
        queues: usize,
        queue_depth: usize,
        pages: u64,
        verify: bool,
    ) -> Self {
        let block_pages = block_pages.max(1);
        let blocks = pages / block_pages;
        let page_states = (0..queues as u64)
            .map(|q| {
                vec![
                    PageState::default();
                    to_index(blocks.saturating_sub(q).div_ceil(queues as u64))
                ]
            })
            .collect();
        Workload {
            seed,
            pool,
            block_pages,
            queue_depth,
            verify,
            page_states,
            filled: false,
            burst_pages: 0,
            random_read_pages: block_pages,
            seq_read_pages: block_pages,
        }
    }

    /// Sets the pages of a random read (randread, mixed) and of a sequential read (seqread):
    /// part of a block, from its first page, its middle or its end (whole blocks by default).
    /// Each must divide the block.
    pub fn set_read_pages(&mut self, random: u64, sequential: u64) -> Result<(), String> {
        for (what, pages) in [("random", random), ("sequential", sequential)] {
            if pages == 0 || !self.block_pages.is_multiple_of(pages) {
                return Err(format!(
                    "a {what} read of {pages} page(s) does not divide a request of {} page(s)",
                    self.block_pages
                ));
            }
        }
        self.random_read_pages = random;
        self.seq_read_pages = sequential;
        Ok(())
    }

    /// Sets how many pages a burst writes (over all queues), in whole blocks.
    pub fn set_burst_pages(&mut self, pages: u64) {
        self.burst_pages = pages.div_ceil(self.block_pages);
    }

    /// The bytes of buffer each queue needs for requests of `block_pages` pages.
    pub fn buffer_bytes_per_lane(queue_depth: usize, block_pages: u64) -> usize {
        queue_depth * PAGE_SIZE * to_index(block_pages.max(1))
    }

    /// Bytes a request moves.
    fn block_bytes(&self) -> usize {
        to_index(self.block_pages) * PAGE_SIZE
    }

    /// Pages a request of `phase` moves: what its reads move when it only reads, else a block.
    fn request_pages(&self, phase: Phase) -> u64 {
        match phase {
            Phase::RandRead => self.random_read_pages,
            Phase::SeqRead => self.seq_read_pages,
            Phase::Fill | Phase::RandWrite | Phase::Burst | Phase::Mixed => self.block_pages,
        }
    }

    /// Runs `phase` on every queue of `device` until `duration` passes (the fill: until every page
    /// is written) or `control.stop` is raised. Fails when a queue waits longer than
    /// `control.io_timeout` for a completion, or as soon as the backend has exited.
    pub fn run(
        &mut self,
        device: &mut Device,
        phase: Phase,
        duration: Duration,
        control: &RunControl<'_>,
    ) -> Result<PhaseResult, String> {
        let stop = control.stop;
        let queues = device.lanes.len() as u64;
        let verify = self.verify && self.filled;
        let total_pages: u64 = self.page_states.iter().map(|s| s.len() as u64).sum();
        let started = Instant::now();
        let deadline = started + duration;
        let completed = AtomicU64::new(0);
        let finished_workers = AtomicUsize::new(0);
        let progress_at = |now: Instant| {
            let requests = completed.load(Ordering::Relaxed);
            let elapsed = now - started;
            let counted = match phase {
                Phase::Fill => Some(total_pages),
                Phase::Burst => Some(self.burst_pages.min(total_pages)),
                Phase::RandWrite | Phase::RandRead | Phase::SeqRead | Phase::Mixed => None,
            };
            let fraction = if let Some(count) = counted {
                requests as f64 / count.max(1) as f64
            } else {
                elapsed.as_secs_f64() / duration.as_secs_f64()
            };
            Progress {
                fraction: fraction.clamp(0.0, 1.0),
                elapsed,
                requests,
            }
        };
        // When the last queue finished: the phase's elapsed time, which must not include the
        // progress thread's wake-up (it matters for a burst of a few milliseconds).
        let last_finish = std::sync::Mutex::new(started);
        let results: Vec<Result<PhaseResult, String>> = std::thread::scope(|scope| {
            let worker_count = device.lanes.len();
            let (completed, finished_workers, progress_at) =
                (&completed, &finished_workers, &progress_at);
            scope.spawn(move || {
                while finished_workers.load(Ordering::Acquire) < worker_count {
                    let next = Instant::now() + PROGRESS_INTERVAL;
                    while Instant::now() < next
                        && finished_workers.load(Ordering::Acquire) < worker_count
                    {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    (control.progress)(progress_at(Instant::now()));
                }
            });
            let workers: Vec<_> = device
                .lanes
                .iter_mut()
                .zip(self.page_states.iter_mut())
                .enumerate()
                .map(|(queue, (lane, states))| {
                    let worker = QueueWorker {
                        lane,
                        states,
                        first_block: queue as u64,
                        block_stride: queues,
                        block_pages: self.block_pages,
                        random_read_pages: self.random_read_pages,
                        seq_read_pages: self.seq_read_pages,
                        burst_pages: self.burst_pages.div_ceil(queues),
                        pool: &self.pool,
                        queue_depth: self.queue_depth,
                        verify,
                        rng: vhost_user_zram::pagegen::SplitMix64::new(
                            self.seed ^ 0x5eed ^ ((queue as u64) << 32) ^ (phase as u64),
                        ),
                        completed,
                    };
                    let last_finish = &last_finish;
                    scope.spawn(move || {
                        let result = worker.run(phase, deadline, control);
                        if let Ok(mut last) = last_finish.lock() {
                            *last = (*last).max(Instant::now());
                        }
                        finished_workers.fetch_add(1, Ordering::AcqRel);
                        result
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| {
                    w.join()
                        .unwrap_or_else(|_| Err("a queue thread panicked".into()))
                })
                .collect()
        });
        let elapsed = last_finish
            .into_inner()
            .map_or_else(|_| started.elapsed(), |last| last - started);
        let mut total = PhaseResult {
            phase,
            requests: 0,
            reads: 0,
            verified_reads: 0,
            elapsed,
            latency: LatencyHistogram::default(),
            request_pages: self.request_pages(phase),
            bytes: 0,
        };
        for result in results {
            let result = result?;
            total.bytes += result.bytes;
            total.requests += result.requests;
            total.reads += result.reads;
            total.verified_reads += result.verified_reads;
            total.latency.merge(&result.latency);
        }
        debug_assert_eq!(total.latency.count(), total.requests);
        if phase == Phase::Fill && !stop.load(Ordering::Relaxed) {
            self.filled = true;
        }
        Ok(total)
    }
}

/// What reading a sample of pages back found.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadBack {
    /// Pages read.
    pub pages: u64,
    /// Pages whose data was what was last written.
    pub verified: u64,
}

impl Workload {
    /// Up to `count` distinct device blocks (pages, with the default one-page requests) that
    /// have been written, drawn at random with `seed` (every written block when there are
    /// fewer).
    pub fn written_page_sample(&self, count: usize, seed: u64) -> Vec<u64> {
        let queues = self.page_states.len() as u64;
        let written: Vec<u64> = self
            .page_states
            .iter()
            .enumerate()
            .flat_map(|(q, states)| {
                states
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.written)
                    .map(move |(i, _)| q as u64 + i as u64 * queues)
            })
            .collect();
        if written.len() <= count {
            return written;
        }
        let mut rng = vhost_user_zram::pagegen::SplitMix64::new(seed ^ 0x7e57_a7e0);
        let mut chosen = std::collections::HashSet::with_capacity(count);
        while chosen.len() < count {
            chosen.insert(written[to_index(rng.below(written.len() as u64))]);
        }
        let mut sample: Vec<u64> = chosen.into_iter().collect();
        sample.sort_unstable();
        // Random order, so the reads do not walk the device.
        for i in (1..sample.len()).rev() {
            sample.swap(i, to_index(rng.below(i as u64 + 1)));
        }
        sample
    }

    /// Reads `pages` (device block numbers: pages with the default one-page requests) on the
    /// device's first queue, up to the queue depth in flight, and checks each against what was
    /// last written. Fails on an I/O error, a wrong page, or `io_timeout` without a
    /// completion.
    pub fn read_back(
        &self,
        device: &mut Device,
        pages: &[u64],
        io_timeout: Duration,
    ) -> Result<ReadBack, String> {
        let queues = self.page_states.len() as u64;
        let bytes = self.block_bytes();
        let lane = device.lanes.first_mut().ok_or("the device has no queue")?;
        let mut slots: Vec<Option<u64>> = vec![None; self.queue_depth];
        let mut completions: Vec<MaybeUninit<Completion>> = (0..self.queue_depth)
            .map(|_| MaybeUninit::uninit())
            .collect();
        let mut result = ReadBack::default();
        let mut next = 0usize;
        let mut in_flight = 0usize;
        let mut last_completion = Instant::now();
        loop {
            for (slot, busy) in slots.iter_mut().enumerate() {
                if busy.is_none() && next < pages.len() {
                    let page = pages[next];
                    next += 1;
                    let buffer = lane.buffer(slot, bytes);
                    lane.queue
                        .read(page * bytes as u64, buffer, bytes, slot, ReqFlags::empty());
                    *busy = Some(page);
                    in_flight += 1;
                }
            }
            if in_flight == 0 {
                return Ok(result);
            }
            let mut slice = WAIT_SLICE;
            let done = match lane
                .queue
                .do_io(&mut completions, 1, Some(&mut slice), None)
            {
                Ok(done) => done,
                Err(e) if e.errno() == blkio::Errno::TIME => 0,
                Err(e) => return Err(format!("do_io: {e:?}")),
            };
            if done == 0 {
                if last_completion.elapsed() >= io_timeout {
                    return Err(format!(
                        "no read completed for {:.1} s with {in_flight} in flight",
                        io_timeout.as_secs_f64()
                    ));
                }
                continue;
            }
            last_completion = Instant::now();
            for completion in &completions[..done] {
                // SAFETY: do_io initialized the first `done` entries.
                let completion = unsafe { completion.assume_init_read() };
                let slot = completion.user_data;
                let page = slots
                    .get_mut(slot)
                    .and_then(Option::take)
                    .ok_or("a completion for an idle slot")?;
                in_flight -= 1;
                if completion.ret != 0 {
                    return Err(format!(
                        "read of page {page} failed: {}",
                        std::io::Error::from_raw_os_error(-completion.ret)
                    ));
                }
                result.pages += 1;
                let state = self.page_states[to_index(page % queues)][to_index(page / queues)];
                // SAFETY: the read into this slot's buffer has completed, and the slot is not
                // reused until after this check.
                let data = unsafe { std::slice::from_raw_parts(lane.buffer(slot, bytes), bytes) };
                let checked =
                    self.pool
                        .verify_block(page, self.block_pages, state.generation, data);
                if !state.written || checked.is_err() {
                    return Err(format!(
                        "data mismatch: block {page} does not hold generation {} of its content",
                        state.generation
                    ));
                }
                result.verified += 1;
            }
        }
    }

    /// Writes the next generation of each of `pages` (device block numbers, distinct: pages
    /// with the default one-page requests) on the device's first queue, up to the queue depth in flight, and records it, so that later
    /// reads expect it. Fails on an I/O error or `io_timeout` without a completion.
    pub fn write_pages(
        &mut self,
        device: &mut Device,
        pages: &[u64],
        io_timeout: Duration,
    ) -> Result<u64, String> {
        let queues = self.page_states.len() as u64;
        let bytes = self.block_bytes();
        let lane = device.lanes.first_mut().ok_or("the device has no queue")?;
        let mut slots: Vec<Option<u64>> = vec![None; self.queue_depth];
        let mut completions: Vec<MaybeUninit<Completion>> = (0..self.queue_depth)
            .map(|_| MaybeUninit::uninit())
            .collect();
        let mut written = 0u64;
        let mut next = 0usize;
        let mut in_flight = 0usize;
        let mut last_completion = Instant::now();
        loop {
            for (slot, busy) in slots.iter_mut().enumerate() {
                if busy.is_none() && next < pages.len() {
                    let page = pages[next];
                    next += 1;
                    let state =
                        &mut self.page_states[to_index(page % queues)][to_index(page / queues)];
                    let generation = if state.written {
                        state.generation.wrapping_add(1)
                    } else {
                        0
                    };
                    *state = PageState {
                        written: true,
                        generation,
                    };
                    let buffer = lane.buffer(slot, bytes);
                    // SAFETY: the slot's buffer is a block of the lane's mapped region with no
                    // request in flight; the pool does not overlap the region.
                    unsafe {
                        self.pool
                            .copy_block(page, self.block_pages, generation, buffer);
                    }
                    lane.queue
                        .write(page * bytes as u64, buffer, bytes, slot, ReqFlags::empty());
                    *busy = Some(page);
                    in_flight += 1;
                }
            }
            if in_flight == 0 {
                return Ok(written);
            }
            let mut slice = WAIT_SLICE;
            let done = match lane
                .queue
                .do_io(&mut completions, 1, Some(&mut slice), None)
            {
                Ok(done) => done,
                Err(e) if e.errno() == blkio::Errno::TIME => 0,
                Err(e) => return Err(format!("do_io: {e:?}")),
            };
            if done == 0 {
                if last_completion.elapsed() >= io_timeout {
                    return Err(format!(
                        "no write completed for {:.1} s with {in_flight} in flight",
                        io_timeout.as_secs_f64()
                    ));
                }
                continue;
            }
            last_completion = Instant::now();
            for completion in &completions[..done] {
                // SAFETY: do_io initialized the first `done` entries.
                let completion = unsafe { completion.assume_init_read() };
                let page = slots
                    .get_mut(completion.user_data)
                    .and_then(Option::take)
                    .ok_or("a completion for an idle slot")?;
                in_flight -= 1;
                if completion.ret != 0 {
                    return Err(format!(
                        "write of page {page} failed: {}",
                        std::io::Error::from_raw_os_error(-completion.ret)
                    ));
                }
                written += 1;
            }
        }
    }

    /// Whether the fill ran, so that every page's content is known.
    pub fn filled(&self) -> bool {
        self.filled
    }
}

/// What a buffer slot is doing.
#[derive(Clone, Copy)]
struct InFlight {
    /// The queue's own block (an index into its states).
    page: u64,
    /// The request's first page in the block, and its pages.
    span: Span,
    is_read: bool,
    submitted: Instant,
}

/// Pages `first..first + pages` of a block.
#[derive(Clone, Copy)]
struct Span {
    first: u64,
    pages: u64,
}

/// One request to make: which of the queue's blocks, which of its pages, read or write.
#[derive(Clone, Copy)]
struct Request {
    page: u64,
    span: Span,
    is_read: bool,
}

struct QueueWorker<'a> {
    lane: &'a mut Lane,
    states: &'a mut Vec<PageState>,
    first_block: u64,
    block_stride: u64,
    /// Pages a request moves.
    block_pages: u64,
    /// Pages a random read moves.
    random_read_pages: u64,
    /// Pages a sequential read moves.
    seq_read_pages: u64,
    pool: &'a PagePool,
    /// Blocks this queue writes in a burst.
    burst_pages: u64,
    queue_depth: usize,
    verify: bool,
    rng: vhost_user_zram::pagegen::SplitMix64,
    /// Requests completed by every queue, for progress.
    completed: &'a AtomicU64,
}

impl QueueWorker<'_> {
    fn run(
        mut self,
        phase: Phase,
        deadline: Instant,
        control: &RunControl<'_>,
    ) -> Result<PhaseResult, String> {
        let stop = control.stop;
        let mut result = PhaseResult {
            phase,
            requests: 0,
            reads: 0,
            verified_reads: 0,
            elapsed: Duration::ZERO,
            latency: LatencyHistogram::default(),
            request_pages: self.block_pages,
            bytes: 0,
        };
        let owned_pages = self.states.len() as u64;
        if owned_pages == 0 {
            return Ok(result);
        }
        let mut slots: Vec<Option<InFlight>> = vec![None; self.queue_depth];
        let mut completions: Vec<MaybeUninit<Completion>> = (0..self.queue_depth)
            .map(|_| MaybeUninit::uninit())
            .collect();
        let mut next_fill_page = 0u64;
        let mut in_flight = 0usize;
        let mut issuing = true;

        // Prime every slot.
        for slot in 0..self.queue_depth {
            match self.next_request(phase, &slots, &mut next_fill_page, owned_pages) {
                Some(request) => {
                    slots[slot] = Some(self.submit(slot, request));
                    in_flight += 1;
                }
                None => break,
            }
        }
        let started = Instant::now();
        let mut last_completion = started;
        while in_flight > 0 {
            let mut slice = WAIT_SLICE;
            let done = match self
                .lane
                .queue
                .do_io(&mut completions, 1, Some(&mut slice), None)
            {
                Ok(done) => done,
                Err(e) if e.errno() == blkio::Errno::TIME => 0,
                Err(e) => return Err(format!("do_io: {e:?}")),
            };
            let now = Instant::now();
            if done == 0 {
                (control.backend_alive)().map_err(|why| {
                    format!(
                        "{why}, with {in_flight} request(s) in flight in the {} phase",
                        phase.name()
                    )
                })?;
                let waited = now - last_completion;
                if waited >= control.io_timeout {
                    return Err(format!(
                        "no request completed for {:.1} s (--io-timeout) with {in_flight} in flight in the {} phase; the backend is hung or gone",
                        waited.as_secs_f64(),
                        phase.name()
                    ));
                }
                continue;
            }
            last_completion = now;
            self.completed.fetch_add(done as u64, Ordering::Relaxed);
            if issuing && (now >= deadline && !phase.is_counted() || stop.load(Ordering::Relaxed)) {
                issuing = false;
            }
            for completion in &completions[..done] {
                // SAFETY: do_io initialized the first `done` entries.
                let completion = unsafe { completion.assume_init_read() };
                let slot = completion.user_data;
                let request = slots[slot].take().ok_or("a completion for an idle slot")?;
                in_flight -= 1;
                if completion.ret != 0 {
                    return Err(format!(
                        "{} of block {} failed: {}",
                        if request.is_read { "read" } else { "write" },
                        self.device_block(request.page),
                        std::io::Error::from_raw_os_error(-completion.ret)
                    ));
                }
                result.latency.record(now - request.submitted);
                result.requests += 1;
                result.bytes += request.span.pages * PAGE_SIZE as u64;
                if request.is_read {
                    result.reads += 1;
                    if self.verify {
                        self.check(slot, request.page, request.span)?;
                        result.verified_reads += 1;
                    }
                }
                if issuing {
                    if let Some(next) =
                        self.next_request(phase, &slots, &mut next_fill_page, owned_pages)
                    {
                        slots[slot] = Some(self.submit(slot, next));
                        in_flight += 1;
                    }
                }
            }
        }
        result.elapsed = started.elapsed();
        Ok(result)
    }

    /// The next request: a page (an index into `states`), the span of it, and whether it is a
    /// read. `None` when the fill is complete.
    fn next_request(
        &mut self,
        phase: Phase,
        slots: &[Option<InFlight>],
        next_fill_page: &mut u64,
        owned_pages: u64,
    ) -> Option<Request> {
        let whole = Span {
            first: 0,
            pages: self.block_pages,
        };
        if phase.is_counted() {
            let limit = match phase {
                Phase::Burst => self.burst_pages.min(owned_pages),
                Phase::Fill
                | Phase::RandWrite
                | Phase::RandRead
                | Phase::SeqRead
                | Phase::Mixed => owned_pages,
            };
            let page = *next_fill_page;
            *next_fill_page += 1;
            return (page < limit).then_some(Request {
                page,
                span: whole,
                is_read: false,
            });
        }
        if phase == Phase::SeqRead {
            // Reads only: two reads of one block may be in flight. The counter walks the
            // queue's blocks read by read, and starts over at the end.
            let per_block = self.block_pages / self.seq_read_pages;
            let read = *next_fill_page % (owned_pages * per_block);
            *next_fill_page += 1;
            return Some(Request {
                page: read / per_block,
                span: Span {
                    first: read % per_block * self.seq_read_pages,
                    pages: self.seq_read_pages,
                },
                is_read: true,
            });
        }
        let is_read = self.rng.below(100) < phase.read_percent();
        let span = if is_read {
            let per_block = self.block_pages / self.random_read_pages;
            Span {
                first: self.rng.below(per_block) * self.random_read_pages,
                pages: self.random_read_pages,
            }
        } else {
            whole
        };
        // A queue never has two requests for one page in flight; with at most queue_depth busy
        // pages this loop ends quickly unless the device is tiny.
        for _ in 0..1000 {
            let page = self.rng.below(owned_pages);
            if !slots.iter().flatten().any(|r| r.page == page) {
                return Some(Request {
                    page,
                    span,
                    is_read,
                });
            }
        }
        None
    }

    /// The device block of this queue's `page`-th own block.
    fn device_block(&self, page: u64) -> u64 {
        self.first_block + page * self.block_stride
    }

    fn block_bytes(&self) -> usize {
        to_index(self.block_pages) * PAGE_SIZE
    }

    fn submit(&mut self, slot: usize, request: Request) -> InFlight {
        let Request {
            page,
            span,
            is_read,
        } = request;
        let block_bytes = self.block_bytes();
        let offset = self.device_block(page) * block_bytes as u64 + span.first * PAGE_SIZE as u64;
        if is_read {
            let bytes = to_index(span.pages) * PAGE_SIZE;
            // Slots of a whole block each, whatever the read: a slot is at the same place
            // for every request size.
            let buffer = self.lane.buffer(slot, block_bytes);
            self.lane
                .queue
                .read(offset, buffer, bytes, slot, ReqFlags::empty());
        } else {
            let bytes = block_bytes;
            let buffer = self.lane.buffer(slot, bytes);
            let state = &mut self.states[to_index(page)];
            // The fill writes generation 0; later writes the next one.
            let generation = if state.written {
                state.generation.wrapping_add(1)
            } else {
                0
            };
            *state = PageState {
                written: true,
                generation,
            };
            let block = self.device_block(page);
            // SAFETY: the slot's buffer is a block of the lane's mapped region and has no
            // request in flight (the slot is free), so nothing else reads or writes it now; the
            // pool is ordinary memory that does not overlap the region.
            unsafe {
                self.pool
                    .copy_block(block, self.block_pages, generation, buffer);
            }
            self.lane
                .queue
                .write(offset, buffer, bytes, slot, ReqFlags::empty());
        }
        InFlight {
            page,
            span,
            is_read,
            submitted: Instant::now(),
        }
    }

    fn check(&self, slot: usize, page: u64, span: Span) -> Result<(), String> {
        let buffer = self.lane.buffer(slot, self.block_bytes());
        // SAFETY: the read of `span` into this slot's buffer has completed and the slot is not
        // reused until after this check.
        let data = unsafe { std::slice::from_raw_parts(buffer, to_index(span.pages) * PAGE_SIZE) };
        let state = self.states[to_index(page)];
        let block = self.device_block(page);
        let checked =
            self.pool
                .verify_pages(block, self.block_pages, span.first, state.generation, data);
        if !state.written {
            return Err(format!("block {block} was read before it was written"));
        }
        if let Err(bad) = checked {
            return Err(format!(
                "data mismatch: page {} (page {bad} of block {block}) does not hold generation \
                 {} of its content",
                block * self.block_pages + bad,
                state.generation
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_hash_sees_a_one_byte_change_anywhere() {
        let pool = PagePool::new(3, 8);
        for page in &pool.pages {
            let base = page_hash(page);
            for at in [0, 1, 31, 32, 2048, PAGE_SIZE - 1] {
                let mut changed = *page;
                changed[at] ^= 0x10;
                assert_ne!(
                    page_hash(&changed),
                    base,
                    "a change at byte {at} went unseen"
                );
            }
        }
    }

    #[test]
    fn generations_of_a_page_map_to_varied_pool_pages() {
        let pool = PagePool::new(3, 1024);
        let indexes: std::collections::HashSet<usize> = (0..64)
            .map(|generation| pool.index_of(77, 1, 0, generation))
            .collect();
        assert!(
            indexes.len() > 48,
            "only {} distinct contents",
            indexes.len()
        );
        assert_eq!(
            pool.index_of(77, 1, 0, 5),
            pool.index_of(77, 1, 0, 5),
            "deterministic"
        );
    }

    #[test]
    fn a_corpus_is_written_in_order_and_later_generations_stay_contiguous() {
        let pages: Vec<[u8; PAGE_SIZE]> = (0..100u8).map(|i| [i; PAGE_SIZE]).collect();
        let pool = PagePool::from_corpus(pages);
        // Generation 0 of block 3 of 16-page blocks: corpus pages 48..64.
        for page in 0..16 {
            assert_eq!(pool.index_of(3, 16, page, 0), 48 + to_index(page));
        }
        // A later generation: still contiguous (modulo the corpus), elsewhere.
        let start = pool.index_of(3, 16, 0, 1);
        assert_ne!(start, 48);
        for page in 0..16 {
            assert_eq!(
                pool.index_of(3, 16, page, 1),
                (start + to_index(page)) % 100
            );
        }
        let mut block = vec![0u8; 16 * PAGE_SIZE];
        // SAFETY: the buffer holds 16 pages and is not the pool's.
        unsafe { pool.copy_block(3, 16, 1, block.as_mut_ptr()) };
        assert_eq!(pool.verify_block(3, 16, 1, &block), Ok(()));
        block[5 * PAGE_SIZE + 7] ^= 1;
        assert_eq!(pool.verify_block(3, 16, 1, &block), Err(5));
    }

    #[test]
    fn a_read_of_part_of_a_block_is_verified_against_that_part() {
        let pages: Vec<[u8; PAGE_SIZE]> = (0..100u8).map(|i| [i; PAGE_SIZE]).collect();
        let pool = PagePool::from_corpus(pages);
        let mut block = vec![0u8; 16 * PAGE_SIZE];
        // SAFETY: the buffer holds 16 pages and is not the pool's.
        unsafe { pool.copy_block(3, 16, 0, block.as_mut_ptr()) };
        // Pages 8..16 (a 32 KiB read of the second half), and page 5 alone.
        let second_half = &block[8 * PAGE_SIZE..];
        assert_eq!(pool.verify_pages(3, 16, 8, 0, second_half), Ok(()));
        assert_eq!(
            pool.verify_pages(3, 16, 0, 0, second_half),
            Err(0),
            "the wrong half"
        );
        let page_5 = &block[5 * PAGE_SIZE..6 * PAGE_SIZE];
        assert_eq!(pool.verify_pages(3, 16, 5, 0, page_5), Ok(()));
        assert_eq!(pool.verify_pages(3, 16, 6, 0, page_5), Err(6));
    }

    #[test]
    fn reads_must_be_a_divisor_of_the_block() {
        let pool = std::sync::Arc::new(PagePool::new(1, 4));
        let mut workload = Workload::new(1, pool, 16, 1, 4, 64, true);
        assert_eq!(workload.set_read_pages(1, 8), Ok(()));
        assert_eq!(workload.request_pages(Phase::RandRead), 1);
        assert_eq!(workload.request_pages(Phase::SeqRead), 8);
        assert_eq!(
            workload.request_pages(Phase::Mixed),
            16,
            "mixed writes whole blocks"
        );
        assert!(workload.set_read_pages(3, 8).is_err());
        assert!(workload.set_read_pages(1, 0).is_err());
        assert!(
            workload.set_read_pages(32, 16).is_err(),
            "more than a block"
        );
    }
}
