// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The compressed page store: zram's engine as a library.
//!
//! A [`PageStore`] holds a fixed number of 4 KiB pages. Each page has one slot in the
//! [`slot::SlotTable`]; a written page is kept in the slot itself when it is one repeated word
//! ([`same_fill`]), as a compressed object in the [`alloc::SlabAllocator`] otherwise, or raw (a
//! *huge* page) when it compresses to more than [`alloc::HUGE_THRESHOLD`] bytes.
//!
//! Data path of a write: detect a same-filled page → else compress into a per-thread buffer →
//! allocate an object in the size class and copy the result in (no slot lock held yet) → lock
//! the slot, swap the new entry in, unlock → free the old object. A read locks the slot and
//! decompresses straight from the object into the caller's page; a page on the backing file is
//! read with the slot unlocked ([`PageStore::read`]). See DESIGN.md for the slot states, the
//! lock order and the memory accounting.

pub(crate) mod alloc;
pub mod backing;
pub mod migrate;
pub(crate) mod pending;
pub mod reclaim;
pub mod recompress;
pub mod same_fill;
pub(crate) mod slot;
pub mod state;
pub mod stats;
pub(crate) mod unit;
pub mod writeback;

mod recovery;

use std::cell::{Cell, RefCell};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use self::alloc::{class_of, AllocError, SlabAllocator, HUGE_CLASS};
pub use self::alloc::{ClassStats, HUGE_THRESHOLD};
use self::pending::{Batch, Job, JobQueue, PendingPool, MAX_TAKEN};
pub use self::pending::{WorkerHooks, WORKER_BATCH};
pub use self::recompress::{
    AlgorithmSpec, RecompressError, RecompressMode, RecompressOutcome, RecompressRequest,
    RecompressTarget, TrainRequest, TrainedDictionary,
};
pub use self::recovery::{Recovered, StateStart, StoreMemory};
use self::same_fill::FillWords;
pub use self::slot::MAX_AGE;
pub use self::slot::MAX_UNIT_MEMBERS;
use self::slot::{SlotEntry, SlotTable, StaleObject, Swapped, MAX_HANDLE};
pub use self::slot::{SlotState, MAX_PENDING_BUFFERS, MAX_SECONDARY};
pub use self::state::{FrontendIdentity, StateError, StateFile};
use self::stats::{add, get, sub, CounterShard, Counters};
pub use self::stats::{
    AlgorithmStat, IoStat, MmStat, RecompressStats, Stats, StoreInfo, UnitStats, WorkerStat,
    WorkerStats, WritebackStats,
};
pub use self::writeback::{
    BadWritebackRequest, WritebackError, WritebackMode, WritebackOutcome, WritebackRequest,
    DEFAULT_BATCH_PAGES,
};
use crate::codec::{
    Algorithm, Codec, CodecError, UnknownCodec, COMPRESS_BUFFER, MAX_BATCH, UNIT_COMPRESS_BUFFER,
};
use crate::PAGE_SIZE;

/// How many times a read of a written-back page reads the file with the slot unlocked, each
/// time finding the slot changed when it locks it again, before it reads under the lock.
const UNLOCKED_FILE_READS: usize = 3;

/// The largest device (1 TiB, 2^28 pages). A slot's 37-bit handle is an object number,
/// `chunk × objects per chunk + index`, with at most [`alloc::MAX_OBJECTS_PER_CHUNK`] (2^8)
/// objects a chunk, so it names 2^29 chunks of a class. Chunk ids are reused, so a class
/// never has more chunks than it once had live or reserved at the same time: at worst one
/// object each, that is the device's pages plus the objects in flight (a page's new object
/// before its old one is freed, compaction's and recompression's copies) plus the reserve,
/// well within twice the device (DESIGN.md, "The object number").
pub const MAX_CAPACITY_PAGES: u64 = (MAX_HANDLE + 1) / alloc::MAX_OBJECTS_PER_CHUNK as u64 / 2;

const _: () = assert!(MAX_CAPACITY_PAGES == 1 << 28, "1 TiB of 4 KiB pages");

/// How to build a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// The number of 4 KiB pages.
    pub capacity_pages: u64,
    /// The compression algorithm.
    pub algorithm: Algorithm,
    /// The algorithm's level, where it has levels (`None`: its default).
    pub level: Option<i32>,
    /// The most bytes the store may hold from the OS (`mem_used_total`), if limited.
    pub mem_limit: Option<u64>,
}

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The page index is past the end of the device.
    #[error("page {index} is past the end of the device ({capacity} pages)")]
    OutOfRange {
        /// The index asked for.
        index: u64,
        /// The device's size in pages.
        capacity: u64,
    },
    /// Storing the page would exceed the memory limit; the slot keeps its old content.
    #[error("the memory limit of {limit} bytes is reached")]
    MemoryLimit {
        /// The limit, in bytes.
        limit: u64,
    },
    /// The operating system refused memory; the slot keeps its old content.
    #[error("the operating system refused memory for the store")]
    OutOfMemory(#[source] AllocError),
    /// A stored object did not decode: a bug or memory corruption.
    #[error("page {index} could not be decompressed")]
    Corrupt {
        /// The page.
        index: u64,
        /// What the codec said.
        #[source]
        source: CodecError,
    },
    /// The slot is in a state this build cannot read.
    #[error("page {index} is in state {state:?}, which this store cannot serve")]
    UnsupportedState {
        /// The page.
        index: u64,
        /// Its state.
        state: SlotState,
    },
    /// Reading a written-back page from the backing file failed; the slot keeps its entry.
    #[error("page {index} could not be read back from the backing file")]
    Backing {
        /// The page.
        index: u64,
        /// What the file said.
        #[source]
        source: backing::BackingError,
    },
    /// The configuration is not valid.
    #[error("invalid store configuration: {0}")]
    Config(String),
    /// The algorithm or level is not valid.
    #[error(transparent)]
    Codec(#[from] UnknownCodec),
    /// The state file could not be opened, checked or updated.
    #[error(transparent)]
    State(#[from] StateError),
    /// Recovery found the state inconsistent; the daemon must not serve it.
    #[error("the state recovered from {path} is inconsistent ({reason}); it is not served")]
    Recovery {
        /// The state file.
        path: String,
        /// What the consistency check found.
        reason: String,
    },
}

thread_local! {
    /// Each thread's compression buffer, as zram keeps one per CPU stream.
    static COMPRESS_SCRATCH: RefCell<Box<[u8; COMPRESS_BUFFER]>> =
        RefCell::new(Box::new([0; COMPRESS_BUFFER]));
    /// Each thread's page for writes that do not go through the pending pool.
    static INLINE_PAGE: RefCell<Box<[u8; PAGE_SIZE]>> = RefCell::new(Box::new([0; PAGE_SIZE]));
    /// Whether this thread is serving a round of requests ([`PageStore::begin_round`]): its
    /// writes then wake the workers a batch at a time.
    static IN_ROUND: Cell<bool> = const { Cell::new(false) };
    /// Whether this thread's round queued jobs a sleeping worker has not been woken for.
    static WAKE_OWED: Cell<bool> = const { Cell::new(false) };
}

/// How writes reach the compressor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingConfig {
    /// Compression worker threads; 0 compresses every write on the thread that writes it.
    pub workers: usize,
    /// The most pages the pending pool holds (at least 1 when there are workers).
    pub max_pending_pages: usize,
}

impl PendingConfig {
    /// Every write compressed on the writing thread (`--workers 0`).
    pub const INLINE: PendingConfig = PendingConfig {
        workers: 0,
        max_pending_pages: 0,
    };
}

/// The pending pool and the queue to the workers, when there are workers.
#[derive(Debug)]
struct Deferred {
    pool: PendingPool,
    queue: JobQueue,
    per_worker: Box<[WorkerCounters]>,
    /// Workers compressing a batch now.
    busy: AtomicUsize,
    /// Queue threads in a round of requests now ([`PageStore::begin_round`]).
    in_rounds: AtomicUsize,
    /// The CPUs the daemon may run on (tests set it).
    cpus: AtomicUsize,
    /// Unit rewrites queued or running (`unit.rs`, partial units).
    rewrites: AtomicUsize,
}

/// A write compresses on its queue thread, not in the pending pool, once the pool is at least
/// 1/this full and no CPU is spare for a worker (DESIGN.md, "Where a write is compressed").
const INLINE_FILL_SHARE: usize = 8;

impl Deferred {
    /// Whether a write should be compressed on the calling thread rather than queued: the
    /// pool is filling (a worker is behind) and every CPU is already busy with a queue thread
    /// serving or a worker compressing, so a queued page would only wait for a CPU the queue
    /// threads hold. Below the fill level the pool absorbs bursts whatever the CPUs do.
    fn compress_here(&self) -> bool {
        let in_use = usize::try_from(self.pool.in_use()).unwrap_or(usize::MAX);
        in_use.saturating_mul(INLINE_FILL_SHARE) >= self.pool.capacity()
            && self.in_rounds.load(Ordering::Relaxed) + self.busy.load(Ordering::Relaxed)
                >= self.cpus.load(Ordering::Relaxed)
    }
}

/// One worker's counters, on a cache line of its own.
#[derive(Debug, Default)]
#[repr(align(128))]
struct WorkerCounters {
    pages: AtomicU64,
    batches: AtomicU64,
    busy_ns: AtomicU64,
}

/// A worker's reusable buffers: the compressed output of one batch, and a unit's pages and
/// compressed stream.
pub struct WorkerScratch {
    outputs: Box<[[u8; COMPRESS_BUFFER]; MAX_BATCH]>,
    jobs: [Job; MAX_TAKEN],
    unit_input: Box<[u8; MAX_UNIT_MEMBERS * PAGE_SIZE]>,
    unit_output: Box<[u8; UNIT_COMPRESS_BUFFER]>,
}

impl Default for WorkerScratch {
    fn default() -> Self {
        WorkerScratch {
            outputs: Box::new([[0; COMPRESS_BUFFER]; MAX_BATCH]),
            jobs: std::array::from_fn(|_| Job::single(0, 0, 0, None)),
            unit_input: Box::new([0; MAX_UNIT_MEMBERS * PAGE_SIZE]),
            unit_output: Box::new([0; UNIT_COMPRESS_BUFFER]),
        }
    }
}

impl std::fmt::Debug for WorkerScratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerScratch").finish_non_exhaustive()
    }
}

/// The compressed page store. `Send + Sync`: share it behind an `Arc`.
#[derive(Debug)]
pub struct PageStore {
    slots: SlotTable,
    alloc: SlabAllocator,
    fill_words: FillWords,
    codec: Box<dyn Codec>,
    /// The secondary algorithms and their names.
    recompression: recompress::Recompression,
    counters: Counters,
    /// 0 when there is no limit.
    mem_limit: AtomicU64,
    compaction: Mutex<()>,
    deferred: Option<Deferred>,
    /// The backing file for writeback, if any.
    backing: Option<backing::BackingFile>,
    /// zram's `writeback_limit` when `writeback_limit_enable` is set: pages left to write.
    writeback_limit: Mutex<Option<u64>>,
    /// Pages per writeback write call.
    writeback_batch: AtomicUsize,
    /// The idle clock's tick, milliseconds.
    idle_tick_ms: AtomicU64,
    /// Wakes the writeback thread when a write meets the memory limit (`--writeback-above`).
    pressure_relief: Mutex<Option<writeback::Relief>>,
    /// The state file the store's memory lives in, if any (DESIGN.md, "State file").
    state: Option<Arc<StateFile>>,
    /// Whether the state file was created by this process, and whether `recover` has run.
    state_created: bool,
    recovered: bool,
    /// A migration's dirty log (DESIGN.md, "Live migration").
    dirty: migrate::DirtyLog,
    /// Multi-page units (`unit.rs`).
    units: unit::Units,
}

impl PageStore {
    /// Creates an empty store that compresses every write on the writing thread.
    pub fn new(config: StoreConfig) -> Result<PageStore, StoreError> {
        PageStore::with_pending(config, PendingConfig::INLINE)
    }

    /// Creates an empty store whose writes go through a pending pool to `pending.workers`
    /// compression workers (start them with [`crate::workers::CompressWorkers`]). With no
    /// workers, this is [`PageStore::new`].
    pub fn with_pending(
        config: StoreConfig,
        pending: PendingConfig,
    ) -> Result<PageStore, StoreError> {
        PageStore::with_memory(config, pending, StoreMemory::Anonymous)
    }

    /// Creates a store whose memory is `memory`: anonymous memory (as
    /// [`PageStore::with_pending`]), or a state file, whose header is checked against
    /// `config` and `pending` here (a mismatch is refused and the file left untouched).
    /// A store on a state file must run [`PageStore::recover`] once, after the other builder
    /// steps and before it serves.
    pub fn with_memory(
        config: StoreConfig,
        pending: PendingConfig,
        memory: StoreMemory,
    ) -> Result<PageStore, StoreError> {
        let regions = match memory {
            StoreMemory::Anonymous => None,
            StoreMemory::State(file) => Some(recovery::StateRegions::open(file, &config, pending)?),
        };
        let (state, state_created, slot_memory, pool_memory, extents, fill_words) = match regions {
            None => (None, false, None, None, None, FillWords::default()),
            Some(r) => (
                Some(r.file),
                r.created,
                Some(r.slots),
                r.pool,
                Some(r.extents),
                FillWords::in_region(r.fill_words.0, r.fill_words.1),
            ),
        };
        let deferred = match pending.workers {
            0 => None,
            workers => {
                let pool = PendingPool::with_memory(pending.max_pending_pages, pool_memory)
                    .map_err(|e| StoreError::Config(e.to_string()))?;
                Some(Deferred {
                    queue: JobQueue::new(pool.capacity()),
                    pool,
                    per_worker: (0..workers).map(|_| WorkerCounters::default()).collect(),
                    busy: AtomicUsize::new(0),
                    in_rounds: AtomicUsize::new(0),
                    cpus: AtomicUsize::new(
                        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
                    ),
                    rewrites: AtomicUsize::new(0),
                })
            }
        };
        if config.capacity_pages == 0 || config.capacity_pages > MAX_CAPACITY_PAGES {
            return Err(StoreError::Config(format!(
                "the capacity must be 1 to {MAX_CAPACITY_PAGES} pages, not {}",
                config.capacity_pages
            )));
        }
        let primary = AlgorithmSpec {
            algorithm: config.algorithm,
            level: config.level,
        };
        let dictionaries = std::sync::Arc::new(crate::codec::ZstdDictionaries::default());
        let codec = recompress::build_codec(primary, &dictionaries)?;
        let pages = usize::try_from(config.capacity_pages)
            .map_err(|_| StoreError::Config("the capacity does not fit in memory".into()))?;
        let slots = match slot_memory {
            None => SlotTable::reserve(pages).map_err(StoreError::OutOfMemory)?,
            Some(memory) => SlotTable::in_memory(pages, memory).ok_or_else(|| {
                StoreError::Config("the state file's slot table is too small".into())
            })?,
        };
        let store = PageStore {
            slots,
            alloc: SlabAllocator::with_extents(extents),
            fill_words,
            codec,
            recompression: recompress::Recompression::new(primary, dictionaries),
            counters: Counters::default(),
            mem_limit: AtomicU64::new(config.mem_limit.unwrap_or(0)),
            compaction: Mutex::new(()),
            deferred,
            backing: None,
            writeback_limit: Mutex::new(None),
            writeback_batch: AtomicUsize::new(DEFAULT_BATCH_PAGES),
            idle_tick_ms: AtomicU64::new(60_000),
            pressure_relief: Mutex::new(None),
            state,
            state_created,
            recovered: false,
            dirty: migrate::DirtyLog::default(),
            units: unit::Units::default(),
        };
        if let Some(limit) = config.mem_limit {
            if store.mem_used_total() > limit {
                return Err(StoreError::Config(format!(
                    "a memory limit of {limit} bytes is below the {} bytes the empty store needs",
                    store.mem_used_total()
                )));
            }
        }
        store.counters.note_mem_used(store.mem_used_total());
        Ok(store)
    }

    /// The number of compression workers this store was built for (0: inline).
    pub fn workers(&self) -> usize {
        self.deferred.as_ref().map_or(0, |d| d.per_worker.len())
    }

    /// The number of pages.
    pub fn capacity_pages(&self) -> u64 {
        self.slots.len() as u64
    }

    /// The algorithm pages are compressed with.
    pub fn algorithm(&self) -> Algorithm {
        self.codec.algorithm()
    }

    /// Stores `page` at `index`, compressing it on this thread. On error the slot keeps its
    /// old content.
    pub fn write(&self, index: u64, page: &[u8; PAGE_SIZE]) -> Result<(), StoreError> {
        let slot = self.slot_index(index)?;
        let result = self.encode(page).map(|new| self.publish(slot, new));
        if result.is_err() {
            add(&self.counters.local().failed_writes, 1);
        }
        result
    }

    /// Stores at `index` the page that `fill` writes into a buffer the store provides, so the
    /// caller's data is copied once. With workers, a page that is not same-filled is queued
    /// for compression and this returns at once (a full pool compresses it here instead).
    /// When `fill` fails nothing is stored and its error is returned inside `Ok`; on a store
    /// error the slot keeps its old content.
    pub fn write_with<E>(
        &self,
        index: u64,
        fill: impl FnOnce(&mut [u8; PAGE_SIZE]) -> Result<(), E>,
    ) -> Result<Result<(), E>, StoreError> {
        let slot = self.slot_index(index)?;
        let Some(deferred) = &self.deferred else {
            return self.write_inline(index, fill);
        };
        if deferred.compress_here() {
            add(&self.counters.local().inline_busy, 1);
            return self.write_inline(index, fill);
        }
        let Some(mut buffer) = deferred.pool.take(|grow| self.may_grow(grow)) else {
            add(&self.counters.local().inline_fallbacks, 1);
            return self.write_inline(index, fill);
        };
        // SAFETY: the buffer was taken from this pool.
        let page = unsafe { deferred.pool.page_mut(&mut buffer) };
        if let Err(error) = fill(page) {
            deferred.pool.give_back(buffer);
            return Ok(Err(error));
        }
        if let Some(entry) = same_fill::detect(page).and_then(|word| self.same_filled(word)) {
            // Same-filled pages never wait: they cost no compression and no memory.
            deferred.pool.give_back(buffer);
            self.publish(slot, entry);
            return Ok(Ok(()));
        }
        let grew = buffer.grew;
        let (buffer, generation) = deferred.pool.publish(buffer);
        if grew {
            // Only a buffer new to memory can raise the peak; the rest of mem_used_total is
            // the workers' to note (reading it here would pull their counters' cache lines
            // to this CPU at every write).
            self.counters.note_mem_used(self.mem_used_total());
        }
        let new = SlotEntry::pending(buffer, generation);
        let swapped = self.lock(slot).swap(new);
        self.dirty.mark(slot);
        // The object the write replaced is freed by the worker, off the request path (freeing
        // can empty a chunk, whose return to the OS costs a TLB shootdown).
        let stale = self.account_swap_keeping_object(swapped, new);
        let job = Job::single(slot, buffer, generation, stale);
        if IN_ROUND.get() {
            if deferred.queue.push_in_round(job) {
                WAKE_OWED.set(true);
            }
        } else {
            deferred.queue.push(job);
        }
        Ok(Ok(()))
    }

    /// Sets the largest multi-page unit, in pages: a power of two from 1 (units off) to
    /// [`MAX_UNIT_MEMBERS`] (`--unit-max`). Units already stored stay as they are.
    pub fn set_unit_max_pages(&self, pages: usize) -> Result<(), StoreError> {
        if !pages.is_power_of_two() || pages > MAX_UNIT_MEMBERS {
            return Err(StoreError::Config(format!(
                "a unit is a power of two from 1 to {MAX_UNIT_MEMBERS} pages, not {pages}"
            )));
        }
        self.units.set_max_pages(pages);
        Ok(())
    }

    /// The largest multi-page unit, in pages (1: units are off).
    pub fn unit_max_pages(&self) -> usize {
        self.units.max_pages()
    }

    /// Stores pages `first..first + count` from what `fill(i, page)` writes into buffers the
    /// store provides, called in order, once per page, until it fails. Each aligned run that
    /// makes a unit ([`unit::Units::split`]) is compressed as one object; the other pages are
    /// stored one by one, as [`write_with`](Self::write_with) does. When `fill` fails at page
    /// `i`, pages before `i` hold their old or their new content, page `i` and after are
    /// unchanged, and the error comes back inside `Ok`; a store error names its page.
    pub fn write_pages_with<E>(
        &self,
        first: u64,
        count: usize,
        mut fill: impl FnMut(usize, &mut [u8; PAGE_SIZE]) -> Result<(), E>,
    ) -> Result<Result<(), E>, (u64, StoreError)> {
        let end = first.saturating_add(count as u64);
        if end > self.capacity_pages() {
            let index = first.max(self.capacity_pages());
            return Err((
                index,
                StoreError::OutOfRange {
                    index,
                    capacity: self.capacity_pages(),
                },
            ));
        }
        for (at, pages) in self.units.split(first, count) {
            // Below `count`.
            #[allow(clippy::cast_possible_truncation)]
            let offset = (at - first) as usize;
            let written = if pages == 1 {
                self.write_with(at, |page| fill(offset, page))
            } else {
                self.write_unit(at, pages, |i, page| fill(offset + i, page))
            };
            match written {
                Ok(Ok(())) => {}
                Ok(Err(error)) => return Ok(Err(error)),
                Err(error) => return Err((at, error)),
            }
        }
        Ok(Ok(()))
    }

    /// Stores the unit of `pages` pages at `first` (aligned to `pages`, inside the device):
    /// through the pending pool to the workers, or compressed here as
    /// [`write_with`](Self::write_with) decides for a page.
    fn write_unit<E>(
        &self,
        first: u64,
        pages: usize,
        mut fill: impl FnMut(usize, &mut [u8; PAGE_SIZE]) -> Result<(), E>,
    ) -> Result<Result<(), E>, StoreError> {
        let slot = self.slot_index(first)?;
        if let Some(deferred) = &self.deferred {
            if deferred.compress_here() {
                add(&self.counters.local().inline_busy, pages as u64);
            } else {
                match self.queue_unit(deferred, slot, pages, &mut fill) {
                    Some(done) => return Ok(done),
                    None => add(&self.counters.local().inline_fallbacks, pages as u64),
                }
            }
        }
        UNIT_INPUT.with(|input| {
            let mut input = input.borrow_mut();
            let input = &mut input[..pages * PAGE_SIZE];
            for (i, page) in input.chunks_exact_mut(PAGE_SIZE).enumerate() {
                if let Err(error) = fill(i, as_page_mut(page)) {
                    return Ok(Err(error));
                }
            }
            let result = self.store_unit_here(slot, input);
            if result.is_err() {
                add(&self.counters.local().failed_writes, 1);
            }
            result.map(Ok)
        })
    }

    /// Stores the unit `pages` (whole pages) at `slot`, compressing it on this thread: its
    /// same-filled pages as today, the rest as one object, or page by page when fewer than two
    /// are left or they do not compress as a unit.
    fn store_unit_here(&self, slot: usize, pages: &[u8]) -> Result<(), StoreError> {
        let count = pages.len() / PAGE_SIZE;
        let mut members = 0u32;
        for (i, page) in pages.chunks_exact(PAGE_SIZE).enumerate() {
            match same_fill::detect(as_page(page)).and_then(|word| self.same_filled(word)) {
                Some(entry) => self.publish(slot + i, entry),
                None => members |= 1 << i,
            }
        }
        let stored = (members.count_ones() >= 2)
            .then(|| {
                UNIT_OUTPUT.with(|output| {
                    let mut output = output.borrow_mut();
                    let len = self.codec.compress_unit(pages, &mut output[..]).ok()?;
                    unit::worth_a_unit(len, members.count_ones() as usize).then(|| {
                        self.store_unit(slot, &output[..len], count, members, None)
                            .map(|h| (h, len))
                    })
                })
            })
            .flatten();
        match stored {
            Some(Ok((head, len))) => {
                self.counters.note_mem_used(self.mem_used_total());
                self.count_new_unit(len, 0);
                let span = self.lock_span(slot, count);
                self.publish_unit(span, head, members, 0, |_, _| false);
                Ok(())
            }
            Some(Err(error)) => Err(self.alloc_error(error)),
            None => {
                for (i, page) in pages.chunks_exact(PAGE_SIZE).enumerate() {
                    if members & (1 << i) != 0 {
                        let entry = self.encode(as_page(page))?;
                        self.publish(slot + i, entry);
                    }
                }
                Ok(())
            }
        }
    }

    /// Queues the unit of `pages` pages at `slot` for the workers: each page that is not
    /// same-filled waits in a buffer of the pending pool, and one group of jobs carries them
    /// to a worker together. `None` (nothing filled, nothing stored) when the pool has not
    /// that many buffers free.
    fn queue_unit<E>(
        &self,
        deferred: &Deferred,
        slot: usize,
        pages: usize,
        fill: &mut impl FnMut(usize, &mut [u8; PAGE_SIZE]) -> Result<(), E>,
    ) -> Option<Result<(), E>> {
        let mut buffers: [Option<pending::TakenBuffer>; MAX_UNIT_MEMBERS] =
            std::array::from_fn(|_| None);
        let give_back = |buffers: [Option<pending::TakenBuffer>; MAX_UNIT_MEMBERS]| {
            for buffer in buffers.into_iter().flatten() {
                deferred.pool.give_back(buffer);
            }
        };
        for taken in buffers.iter_mut().take(pages) {
            *taken = deferred.pool.take(|grow| self.may_grow(grow));
            if taken.is_none() {
                give_back(buffers);
                return None;
            }
        }
        for (i, buffer) in buffers.iter_mut().flatten().enumerate() {
            // SAFETY: the buffer was taken from this pool.
            let page = unsafe { deferred.pool.page_mut(buffer) };
            if let Err(error) = fill(i, page) {
                give_back(buffers);
                return Some(Err(error));
            }
        }
        let mut jobs: [Option<Job>; MAX_UNIT_MEMBERS] = std::array::from_fn(|_| None);
        let mut count = 0;
        let mut grew = false;
        for (i, mut buffer) in buffers.into_iter().flatten().enumerate() {
            // SAFETY: the buffer was taken from this pool.
            let page = unsafe { deferred.pool.page_mut(&mut buffer) };
            if let Some(entry) = same_fill::detect(page).and_then(|word| self.same_filled(word)) {
                deferred.pool.give_back(buffer);
                self.publish(slot + i, entry);
                continue;
            }
            grew |= buffer.grew;
            let (buffer, generation) = deferred.pool.publish(buffer);
            let new = SlotEntry::pending(buffer, generation);
            let swapped = self.lock(slot + i).swap(new);
            self.dirty.mark(slot + i);
            let stale = self.account_swap_keeping_object(swapped, new);
            jobs[count] = Some(Job::single(slot + i, buffer, generation, stale));
            count += 1;
        }
        if grew {
            self.counters.note_mem_used(self.mem_used_total());
        }
        if count >= 2 {
            // Pages and jobs are at most MAX_UNIT_MEMBERS.
            #[allow(clippy::cast_possible_truncation)]
            for (i, job) in jobs.iter_mut().flatten().enumerate() {
                job.unit_pages = pages as u8;
                job.group = if i == 0 { count as u8 } else { 0 };
            }
        }
        let jobs = jobs.into_iter().flatten();
        if IN_ROUND.get() {
            if deferred.queue.push_group_in_round(jobs) {
                WAKE_OWED.set(true);
            }
        } else {
            deferred.queue.push_group(jobs);
        }
        Some(Ok(()))
    }

    /// A read request of `pages` starts on the calling thread (a hint): a read of a unit's
    /// member inside it decodes the unit as far as the request goes, and a request that
    /// starts at or before a unit's first page and goes past it decodes that unit whole, so
    /// its next pages are served from the decoded unit.
    pub fn read_ahead(&self, pages: Range<u64>) {
        unit::READ_AHEAD.set(Some((pages.start, pages.end)));
    }

    /// The calling thread starts serving a round of requests (a queue thread draining its
    /// ring): until [`end_round`](Self::end_round), its writes wake a sleeping worker once a
    /// batch is queued rather than at every write.
    pub fn begin_round(&self) {
        if !IN_ROUND.replace(true) {
            if let Some(deferred) = &self.deferred {
                deferred.in_rounds.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Makes the store judge spare CPUs as if the daemon had `cpus` (tests).
    #[cfg(test)]
    pub(crate) fn set_cpus(&self, cpus: usize) {
        if let Some(deferred) = &self.deferred {
            deferred.cpus.store(cpus, Ordering::Relaxed);
        }
    }

    /// Compression workers busy with a batch now.
    pub fn busy_workers(&self) -> usize {
        self.deferred
            .as_ref()
            .map_or(0, |deferred| deferred.busy.load(Ordering::Relaxed))
    }

    /// The calling thread's round ends: a worker still asleep with jobs of the round waiting
    /// is woken now.
    pub fn end_round(&self) {
        let Some(deferred) = &self.deferred else {
            IN_ROUND.set(false);
            return;
        };
        if IN_ROUND.replace(false) {
            deferred.in_rounds.fetch_sub(1, Ordering::Relaxed);
        }
        if WAKE_OWED.replace(false) {
            deferred.queue.kick();
        }
    }

    fn write_inline<E>(
        &self,
        index: u64,
        fill: impl FnOnce(&mut [u8; PAGE_SIZE]) -> Result<(), E>,
    ) -> Result<Result<(), E>, StoreError> {
        INLINE_PAGE.with(|page| {
            let mut page = page.borrow_mut();
            if let Err(error) = fill(&mut page) {
                return Ok(Err(error));
            }
            self.write(index, &page).map(Ok)
        })
    }

    /// Publishes `new` in `slot` (a guest's write) and accounts for the entry it replaced.
    fn publish(&self, slot: usize, new: SlotEntry) {
        let swapped = self.lock(slot).swap(new);
        self.dirty.mark(slot);
        self.account_swap(swapped, new);
    }

    /// Reads the page at `index` into `page`; a page never written reads as zeros. Reading
    /// clears the page's idle flag and age. A written-back page is read from the backing file
    /// with its slot unlocked (the file read holds no lock a write waits for; DESIGN.md, "Data
    /// path") and stays on the file.
    pub fn read(&self, index: u64, page: &mut [u8; PAGE_SIZE]) -> Result<(), StoreError> {
        let slot = self.slot_index(index)?;
        if !self.slots.is_touched(slot) {
            // Empty (SlotTable's invariant): no lock, so the table page stays untouched.
            page.fill(0);
            return Ok(());
        }
        match self.read_locked(index, slot, page) {
            Ok(mut guard) => {
                let entry = guard.entry();
                if entry.accessed() != entry {
                    // Free: the unlock stores the entry anyway.
                    guard.set_flags(entry.accessed());
                }
                Ok(())
            }
            Err(error) => {
                add(&self.counters.local().failed_reads, 1);
                Err(error)
            }
        }
    }

    /// Regenerates page `index` (slot `slot`) into `page` and returns the slot locked, holding
    /// the entry whose content `page` now is.
    ///
    /// Every state but `WrittenBack` is decoded under the lock. A `WrittenBack` page is read
    /// as zram does, without holding the lock across the file read: under the lock, note the
    /// entry (the object's offset and length) and pin the object's blocks; unlock; read and
    /// decode into `page`; lock again. If the slot still names the same object, `page` is its
    /// content; otherwise (rewritten, discarded, written back anew) start again with the new
    /// entry. The pin keeps the bytes read the object's own even if the slot changed
    /// meanwhile. After [`UNLOCKED_FILE_READS`] changed attempts (a page rewritten and written
    /// back over and over), the file is read under the lock, which always finishes.
    fn read_locked(
        &self,
        index: u64,
        slot: usize,
        page: &mut [u8; PAGE_SIZE],
    ) -> Result<slot::SlotGuard<'_>, StoreError> {
        for _ in 0..UNLOCKED_FILE_READS {
            let guard = self.lock(slot);
            let entry = guard.entry();
            let Some(backing) = self
                .backing
                .as_ref()
                .filter(|_| entry.state() == SlotState::WrittenBack)
            else {
                self.decode(index, entry, page)?;
                return Ok(guard);
            };
            let (offset, len) = entry.backing_object();
            let pin = backing
                .pin(offset, len)
                .map_err(|source| StoreError::Backing { index, source });
            drop(guard);
            let result = pin.and_then(|pin| self.read_back_pinned(index, entry, &pin, page));
            let guard = self.lock(slot);
            if guard.entry().same_object(entry) {
                return result.map(|()| guard);
            }
        }
        let guard = self.lock(slot);
        self.decode(index, guard.entry(), page)?;
        Ok(guard)
    }

    /// Reads the page at `index`, lets `f` change it and stores the result, all under the
    /// slot's lock (a written-back page's file read excepted: it runs unlocked and the slot is
    /// checked afterwards, as in [`PageStore::read`]), so concurrent partial writes to one page
    /// are not lost. On error the slot
    /// keeps its old content (and `f` may not have run).
    pub fn modify<R>(
        &self,
        index: u64,
        f: impl FnOnce(&mut [u8; PAGE_SIZE]) -> R,
    ) -> Result<R, StoreError> {
        let slot = self.slot_index(index)?;
        let mut page = [0u8; PAGE_SIZE];
        let mut guard = match self.read_locked(index, slot, &mut page) {
            Ok(guard) => guard,
            Err(e) => {
                add(&self.counters.local().failed_reads, 1);
                return Err(e);
            }
        };
        let result = f(&mut page);
        match self.encode(&page) {
            Ok(new) => {
                let swapped = guard.swap(new);
                drop(guard);
                self.dirty.mark(slot);
                self.account_swap(swapped, new);
                Ok(result)
            }
            Err(e) => {
                // Taking the lock wrote to the table: if that populated an untouched page,
                // mark it, so the next compaction gives it back.
                guard.touch_page();
                drop(guard);
                add(&self.counters.local().failed_writes, 1);
                Err(e)
            }
        }
    }

    /// Frees the pages in `pages`; they read as zeros afterwards. Each page that held data
    /// counts in `notify_free`.
    pub fn discard(&self, pages: Range<u64>) -> Result<(), StoreError> {
        if pages.end > self.capacity_pages() {
            return Err(StoreError::OutOfRange {
                index: pages.end.saturating_sub(1).max(pages.start),
                capacity: self.capacity_pages(),
            });
        }
        // Both bounds are at most the capacity, which fits a usize.
        #[allow(clippy::cast_possible_truncation)]
        let slots = pages.start as usize..pages.end as usize;
        // Only touched table pages can hold data: discarding a whole large device costs what
        // it stores.
        for slot in self.slots.touched_slots(slots) {
            if self.slots.peek(slot) == Some(SlotEntry::EMPTY) {
                continue;
            }
            let swapped = self.lock(slot).swap(SlotEntry::EMPTY);
            self.dirty.mark(slot);
            if swapped.old.state() != SlotState::Empty {
                add(&self.counters.local().notify_free, 1);
            }
            self.account_swap(swapped, SlotEntry::EMPTY);
        }
        Ok(())
    }

    /// Moves objects out of sparse chunks and gives the emptied chunks back to the OS.
    /// Returns the pages given back. Runs concurrently with reads and writes; one compaction
    /// at a time.
    pub fn compact(&self) -> u64 {
        let _one_at_a_time = self.compaction.lock().unwrap_or_else(|e| e.into_inner());
        let mut pages = 0;
        if self.alloc.begin_compaction() {
            for slot in self.slots.touched_slots(0..self.slots.len()) {
                let Some(entry) = self.slots.peek(slot) else {
                    break;
                };
                if entry.state() == SlotState::Unit {
                    if self.alloc.class_has_victims(entry.unit_class()) {
                        pages += self.move_unit_head(slot, entry);
                    }
                    continue;
                }
                let Some(class) = object_class(entry) else {
                    continue;
                };
                if !self.alloc.class_has_victims(class) {
                    continue;
                }
                let mut guard = self.lock(slot);
                let entry = guard.entry();
                if object_class(entry) != Some(class) {
                    continue;
                }
                // SAFETY: we hold the lock of the slot that references the object, so we own
                // it while it is copied.
                let relocated = unsafe {
                    self.alloc
                        .relocate(class, entry.handle(), object_len(entry))
                };
                if let Some(moved) = relocated {
                    let swapped = guard.swap(entry.with_handle(moved));
                    drop(guard);
                    if let Some(stale) = swapped.stale {
                        pages += self.alloc.free_stale(stale);
                    }
                }
            }
        }
        // The allocator's reserve of empty chunks goes back too, and the slot table's pages
        // that hold no entry any more.
        pages += self.alloc.end_compaction();
        pages += self.slots.give_back_empty_pages();
        add(&self.counters.local().pages_compacted, pages);
        pages
    }

    /// Sets or clears the memory limit. Data already stored stays even above a lower limit.
    pub fn set_mem_limit(&self, limit: Option<u64>) {
        self.mem_limit.store(limit.unwrap_or(0), Ordering::Relaxed);
    }

    /// The memory limit in bytes, if there is one.
    pub fn mem_limit(&self) -> Option<u64> {
        match self.mem_limit.load(Ordering::Relaxed) {
            0 => None,
            limit => Some(limit),
        }
    }

    /// Resets `mem_used_max` to the current `mem_used_total` and returns it (zram's
    /// `echo 0 > mem_used_max`). A store growing meanwhile may raise it again at once; one that
    /// grew between the reading and the reset loses that rise, as in zram.
    pub fn reset_mem_used_max(&self) -> u64 {
        let used = self.mem_used_total();
        self.counters.mem_used_max.store(used, Ordering::Relaxed);
        used
    }

    /// Bytes held from the OS: slot table, chunks, allocator and same-fill metadata, and the
    /// pending pool's resident buffers.
    pub fn mem_used_total(&self) -> u64 {
        self.slots.bytes() as u64
            + self.alloc.bytes()
            + self.fill_words.bytes() as u64
            + self.pool_bytes()
            + self.recompression.dictionary_bytes()
    }

    fn pool_bytes(&self) -> u64 {
        self.deferred
            .as_ref()
            .map_or(0, |d| d.pool.resident_bytes())
    }

    /// Whether `grow` more bytes stay within the memory limit.
    fn may_grow(&self, grow: u64) -> bool {
        match self.mem_limit.load(Ordering::Relaxed) {
            0 => true,
            limit => self.mem_used_total() + grow <= limit,
        }
    }

    /// Counts a request refused as malformed or out of range.
    pub fn count_invalid_io(&self) {
        add(&self.counters.local().invalid_io, 1);
    }

    /// Pages written and not yet compressed by a worker.
    pub fn pending_pages(&self) -> u64 {
        self.counters.sum(|c| &c.pending_pages)
    }

    /// Waits until the pending pool is empty — no page pending, no job in a worker's hands —
    /// and no unit rewrite is queued or running, or `timeout` passes; returns whether it is.
    pub fn wait_drained(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if self
                .deferred
                .as_ref()
                .is_none_or(|d| d.pool.in_use() == 0 && d.rewrites.load(Ordering::Acquire) == 0)
            {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Makes the compression workers stop after their current batch.
    pub(crate) fn stop_workers(&self) {
        if let Some(deferred) = &self.deferred {
            deferred.queue.stop();
        }
    }

    /// Pauses or slows the compression workers (tests of forward progress).
    #[doc(hidden)]
    pub fn set_worker_hooks(&self, hooks: WorkerHooks) {
        if let Some(deferred) = &self.deferred {
            deferred.queue.set_hooks(hooks);
        }
    }

    /// A snapshot of the statistics.
    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        let get = |counter: fn(&CounterShard) -> &AtomicU64| c.sum(counter);
        let mem_used_total = self.mem_used_total();
        let metadata = self.alloc.bytes() - self.alloc.chunk_bytes()
            + self.fill_words.bytes() as u64
            + self.recompression.dictionary_bytes();
        Stats {
            mm: MmStat {
                orig_data_size: get(|c| &c.pages_stored) * PAGE_SIZE as u64,
                compr_data_size: get(|c| &c.compr_data_size),
                mem_used_total,
                mem_limit: self.mem_limit.load(Ordering::Relaxed),
                mem_used_max: c.mem_used_max.load(Ordering::Relaxed).max(mem_used_total),
                same_pages: get(|c| &c.same_pages),
                pages_compacted: get(|c| &c.pages_compacted),
                huge_pages: get(|c| &c.huge_pages),
                huge_pages_since: get(|c| &c.huge_pages_since),
            },
            io: IoStat {
                failed_reads: get(|c| &c.failed_reads),
                failed_writes: get(|c| &c.failed_writes),
                invalid_io: get(|c| &c.invalid_io),
                notify_free: get(|c| &c.notify_free),
            },
            info: StoreInfo {
                disksize: self.capacity_pages() * PAGE_SIZE as u64,
                algorithm: self.algorithm().name().to_owned(),
                slot_table_bytes: self.slots.bytes() as u64,
                chunk_bytes: self.alloc.chunk_bytes(),
                metadata_bytes: metadata,
                state_file_bytes: self.state.as_ref().map_or(0, |s| s.allocated_bytes()),
                damaged_pages: get(|c| &c.damaged_pages),
            },
            workers: self.worker_stats(),
            recompression: self.recompress_stats(),
            writeback: self.writeback_stats(),
            units: UnitStats {
                unit_max_bytes: (self.units.max_pages() * PAGE_SIZE) as u64,
                units_stored: get(|c| &c.units_stored),
                unit_members: get(|c| &c.unit_members),
                unit_bytes: get(|c| &c.unit_bytes),
                partial_rewrites: get(|c| &c.unit_rewrites),
                read_bytes: get(|c| &c.unit_read_bytes),
                decompressed_bytes: get(|c| &c.unit_decompressed_bytes),
                cache_hits: get(|c| &c.unit_cache_hits),
            },
        }
    }

    fn worker_stats(&self) -> WorkerStats {
        let pending_pages = self.pending_pages();
        let Some(deferred) = &self.deferred else {
            return WorkerStats {
                inline_fallbacks: self.counters.sum(|c| &c.inline_fallbacks),
                ..WorkerStats::default()
            };
        };
        WorkerStats {
            workers: deferred.per_worker.len() as u64,
            pool_pages: deferred.pool.capacity() as u64,
            pending_pages,
            pending_bytes: pending_pages * PAGE_SIZE as u64,
            pool_resident_bytes: deferred.pool.resident_bytes(),
            inline_fallbacks: self.counters.sum(|c| &c.inline_fallbacks),
            inline_busy: self.counters.sum(|c| &c.inline_busy),
            stalled_pages: deferred.queue.len().1 as u64,
            per_worker: deferred
                .per_worker
                .iter()
                .map(|w| WorkerStat {
                    pages: get(&w.pages),
                    batches: get(&w.batches),
                    busy_us: get(&w.busy_ns) / 1000,
                })
                .collect(),
        }
    }

    /// Per-class allocator figures, for benchmarks and debugging.
    pub fn class_stats(&self) -> Vec<ClassStats> {
        self.alloc.class_stats()
    }

    /// Walks the slot table, the pending pool, the fill-word table and every size class and
    /// checks that they agree with each other and with the counters. Debug aid: slow, and
    /// only meaningful while no other thread writes and no page is pending in a worker's hands
    /// (see [`PageStore::wait_drained`]).
    pub fn check_consistency(&self) -> Result<(), String> {
        let mut by_class: Vec<Vec<u64>> = vec![Vec::new(); HUGE_CLASS + 1];
        let (mut stored, mut compr, mut same, mut huge) = (0u64, 0u64, 0u64, 0u64);
        let mut damaged = 0u64;
        let mut by_priority = [(0u64, 0u64); MAX_SECONDARY + 1];
        let mut pending_buffers = Vec::new();
        let mut written_back = Vec::new();
        let mut table_words = Vec::new();
        let mut units: std::collections::BTreeMap<(usize, u64), Vec<(usize, SlotEntry)>> =
            std::collections::BTreeMap::new();
        self.slots.check_untouched_empty()?;
        for slot in self.slots.touched_slots(0..self.slots.len()) {
            let entry = self.slots.peek(slot).unwrap_or(SlotEntry::EMPTY);
            self.check_priority(slot, entry)?;
            if entry.state() == SlotState::Compressed {
                let counts = &mut by_priority[entry.priority()];
                counts.0 += 1;
                counts.1 += entry.compressed_size() as u64;
            }
            compr += compressed_bytes(entry);
            stored += u64::from(holds_page(entry));
            match entry.state() {
                SlotState::Empty | SlotState::Compressed => {}
                SlotState::SameFilled => {
                    same += 1;
                    if same_fill::needs_table(entry.payload()) {
                        table_words.push(entry.payload() >> 2);
                    }
                }
                SlotState::Huge => huge += 1,
                SlotState::Pending => pending_buffers.push((slot, entry.pending_buffer())),
                SlotState::WrittenBack => written_back.push(entry.backing_object()),
                SlotState::Unit => {
                    by_priority[entry.priority()].0 += 1;
                    units
                        .entry((entry.unit_class(), entry.handle()))
                        .or_default()
                        .push((slot, entry));
                }
                // Only recovery makes Invalid entries (damaged ones), and counts them.
                SlotState::Invalid => damaged += 1,
            }
            if let Some(class) = object_class(entry) {
                by_class[class].push(entry.handle());
            }
        }
        let (unit_count, unit_members) = (
            units.len() as u64,
            units.values().map(Vec::len).sum::<usize>() as u64,
        );
        let mut unit_bytes = 0;
        for ((class, handle), members) in &units {
            let (stream_len, priority) =
                self.check_unit(*class, *handle, members, &mut by_class)?;
            compr += stream_len;
            unit_bytes += stream_len;
            by_priority[priority].1 += stream_len;
        }
        self.check_pending(&pending_buffers)?;
        self.check_backing(&written_back)?;
        self.fill_words.check(&table_words)?;
        let c = &self.counters;
        let expect = [
            ("pages_stored", stored, c.sum(|c| &c.pages_stored)),
            ("compr_data_size", compr, c.sum(|c| &c.compr_data_size)),
            ("same_pages", same, c.sum(|c| &c.same_pages)),
            ("huge_pages", huge, c.sum(|c| &c.huge_pages)),
            (
                "pending_pages",
                pending_buffers.len() as u64,
                c.sum(|c| &c.pending_pages),
            ),
            (
                "pages_on_file",
                written_back.len() as u64,
                c.sum(|c| &c.pages_on_file),
            ),
            ("damaged_pages", damaged, c.sum(|c| &c.damaged_pages)),
            ("units_stored", unit_count, c.sum(|c| &c.units_stored)),
            ("unit_members", unit_members, c.sum(|c| &c.unit_members)),
            ("unit_bytes", unit_bytes, c.sum(|c| &c.unit_bytes)),
        ];
        for (name, walked, counted) in expect {
            if walked != counted {
                return Err(format!(
                    "{name}: the table says {walked}, the counter {counted}"
                ));
            }
        }
        for (priority, (pages, bytes)) in by_priority.into_iter().enumerate() {
            let counted = (
                c.sum(|c| &c.algorithm_pages[priority]),
                c.sum(|c| &c.algorithm_bytes[priority]),
            );
            if (pages, bytes) != counted {
                return Err(format!(
                    "priority {priority}: the table holds {pages} pages of {bytes} bytes, the \
                     counters say {} pages of {} bytes",
                    counted.0, counted.1
                ));
            }
        }
        self.alloc
            .check_consistency(&|class| by_class[class].clone())
    }

    /// One unit's head and members agree: the head is sound and not superseded, its members
    /// lie in one aligned span at their own indices with one priority, and its live mask is
    /// exactly them. Adds the head and its pieces to the referenced objects; returns the
    /// stream's length and the members' priority.
    fn check_unit(
        &self,
        class: usize,
        handle: u64,
        members: &[(usize, SlotEntry)],
        by_class: &mut [Vec<u64>],
    ) -> Result<(u64, usize), String> {
        let (slot, entry) = members[0];
        // SAFETY: the checker runs with no other thread changing the store (its contract),
        // and a slot names the head, so it is live.
        let head = unsafe { self.unit_head(entry) }
            .ok_or_else(|| format!("slot {slot} names a damaged unit head ({class}, {handle})"))?;
        let first = slot - entry.unit_index();
        let mut expect = 0u32;
        for &(slot, member) in members {
            if slot - member.unit_index() != first || member.priority() != entry.priority() {
                return Err(format!(
                    "slot {slot} is member {} of the unit at slot {first}, which does not match                      its other members",
                    member.unit_index()
                ));
            }
            expect |= 1 << member.unit_index();
        }
        if first != head.first {
            return Err(format!(
                "the unit at slot {first} says it starts at {}",
                head.first
            ));
        }
        // SAFETY: as above.
        let (mask, flags) = unsafe { self.unit_live(entry) };
        if mask != expect || flags != 0 {
            return Err(format!(
                "the unit at slot {first} has live mask {mask:#x} and flags {flags}, but its                  members are {expect:#x}"
            ));
        }
        by_class[class].push(handle);
        // SAFETY: as above.
        let pieces = unsafe { self.unit_pieces(entry, &head) };
        by_class[HUGE_CLASS].extend_from_slice(&pieces[..head.pieces]);
        Ok((head.stream_len as u64, entry.priority()))
    }

    /// Each pending slot names a live buffer of the pool, with its current generation, that no
    /// other slot names; with no job in flight, the pool's buffers in use are exactly these.
    fn check_pending(&self, pending: &[(usize, (u32, u32))]) -> Result<(), String> {
        let Some(deferred) = &self.deferred else {
            return match pending.first() {
                None => Ok(()),
                Some((slot, _)) => {
                    Err(format!("slot {slot} is pending in a store without workers"))
                }
            };
        };
        let mut seen = std::collections::HashSet::new();
        for &(slot, (buffer, generation)) in pending {
            let Some((current, holders)) = deferred.pool.buffer_state(buffer) else {
                return Err(format!(
                    "slot {slot} names pending buffer {buffer}, past the pool"
                ));
            };
            if current != generation || holders == 0 {
                return Err(format!(
                    "slot {slot} names buffer {buffer} generation {generation}, which is at \
                     generation {current} with {holders} holders"
                ));
            }
            if !seen.insert(buffer) {
                return Err(format!("buffer {buffer} is named by two slots"));
            }
        }
        // Jobs a worker holds may keep superseded buffers in use a little longer, so only
        // "at least" holds at every moment.
        let in_use = deferred.pool.in_use();
        if in_use < pending.len() as u64 {
            return Err(format!(
                "the pool has {in_use} buffers in use but {} slots are pending",
                pending.len()
            ));
        }
        Ok(())
    }

    /// Takes the next batch for worker `worker`, compresses it and installs what is still
    /// wanted. Returns `false` when the workers are stopping. Called by
    /// [`crate::workers::CompressWorkers`] threads only.
    pub(crate) fn run_worker_batch(&self, worker: usize, scratch: &mut WorkerScratch) -> bool {
        let Some(deferred) = &self.deferred else {
            return false;
        };
        let n = match deferred.queue.next_batch(&mut scratch.jobs, || {
            // Idle for a while: give the pool's memory back once nothing is pending, and the
            // allocator's reserve of empty chunks (kept for churn, which has stopped).
            if deferred.pool.in_use() == 0 {
                deferred.pool.trim();
                self.alloc.release_reserve();
            }
        }) {
            Batch::Stop => return false,
            Batch::Rewrite(rewrite) => {
                deferred.busy.fetch_add(1, Ordering::Relaxed);
                self.rewrite_unit(rewrite);
                deferred.busy.fetch_sub(1, Ordering::Relaxed);
                deferred.rewrites.fetch_sub(1, Ordering::Release);
                return true;
            }
            Batch::Jobs(n) => n,
        };
        let started = std::time::Instant::now();
        deferred.busy.fetch_add(1, Ordering::Relaxed);
        self.compress_jobs(
            deferred,
            &mut scratch.jobs[..n],
            &mut scratch.outputs,
            &mut scratch.unit_input,
            &mut scratch.unit_output,
        );
        deferred.busy.fetch_sub(1, Ordering::Relaxed);
        if let Some(counters) = deferred.per_worker.get(worker) {
            add(&counters.pages, n as u64);
            add(&counters.batches, 1);
            let busy = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            add(&counters.busy_ns, busy);
        }
        true
    }

    /// Compresses what `jobs` carry: each unit's group as one object, the other pages in
    /// batches of up to [`MAX_BATCH`].
    fn compress_jobs(
        &self,
        deferred: &Deferred,
        jobs: &mut [Job],
        outputs: &mut [[u8; COMPRESS_BUFFER]; MAX_BATCH],
        unit_input: &mut [u8; MAX_UNIT_MEMBERS * PAGE_SIZE],
        unit_output: &mut [u8; UNIT_COMPRESS_BUFFER],
    ) {
        for job in jobs.iter_mut() {
            // The object the job's write replaced (a stalled job comes back without one).
            if let Some(stale) = job.stale.take() {
                self.alloc.free_stale(stale);
            }
        }
        let mut at = 0;
        while at < jobs.len() {
            let group = usize::from(jobs[at].group);
            if group >= 2 && at + group <= jobs.len() {
                let group = &mut jobs[at..at + group];
                if !self.compress_unit_group(deferred, group, unit_input, unit_output) {
                    for singles in group.chunks_mut(MAX_BATCH) {
                        self.compress_singles(deferred, singles, outputs);
                    }
                }
                at += group.len();
            } else {
                let start = at;
                at += 1;
                while at < jobs.len() && at - start < MAX_BATCH && jobs[at].group < 2 {
                    at += 1;
                }
                self.compress_singles(deferred, &mut jobs[start..at], outputs);
            }
        }
    }

    /// Compresses the pages of a unit's group of jobs as one object and installs it in the
    /// slots that still hold their job's pending entry, each slot of the unit's span locked.
    /// Returns `false`, having done nothing, when fewer than two pages are still wanted or
    /// they do not compress as a unit: the caller compresses them page by page. A unit the
    /// memory limit refuses stalls its jobs as pages on their own.
    fn compress_unit_group(
        &self,
        deferred: &Deferred,
        group: &mut [Job],
        input: &mut [u8; MAX_UNIT_MEMBERS * PAGE_SIZE],
        output: &mut [u8; UNIT_COMPRESS_BUFFER],
    ) -> bool {
        let pages = usize::from(group[0].unit_pages);
        let first = group[0].slot - group[0].slot % pages.max(1);
        let in_span = |job: &Job| job.slot >= first && job.slot - first < pages;
        if !(2..=MAX_UNIT_MEMBERS).contains(&pages) || !group.iter().all(in_span) {
            return false;
        }
        let input = &mut input[..pages * PAGE_SIZE];
        input.fill(0);
        let mut wanted = 0u32;
        for job in group.iter() {
            let still_wanted = self.slots.peek(job.slot).is_some_and(|entry| {
                entry.same_content(SlotEntry::pending(job.buffer, job.generation))
            });
            if still_wanted {
                let at = (job.slot - first) * PAGE_SIZE;
                // SAFETY: the job holds the buffer until its release below.
                input[at..at + PAGE_SIZE]
                    .copy_from_slice(unsafe { deferred.pool.page(job.buffer) });
                wanted |= 1 << (job.slot - first);
            }
        }
        if wanted.count_ones() < 2 {
            return false;
        }
        let Some(len) = self
            .codec
            .compress_unit(input, &mut output[..])
            .ok()
            .filter(|&len| unit::worth_a_unit(len, wanted.count_ones() as usize))
        else {
            return false;
        };
        let mut stored = self.store_unit(first, &output[..len], pages, 0, None);
        if stored.is_err() && deferred.pool.trim() > 0 {
            stored = self.store_unit(first, &output[..len], pages, 0, None);
        }
        let Ok(head) = stored else {
            self.ask_for_room();
            for job in group.iter() {
                deferred
                    .queue
                    .stall(Job::single(job.slot, job.buffer, job.generation, None));
            }
            return true;
        };
        self.counters.note_mem_used(self.mem_used_total());
        self.count_new_unit(len, 0);
        let span = self.lock_span(first, pages);
        let mut members = 0u32;
        for job in group.iter() {
            let current = span.entry(job.slot - first);
            if current
                .is_some_and(|c| c.same_content(SlotEntry::pending(job.buffer, job.generation)))
            {
                members |= 1 << (job.slot - first);
            }
        }
        let key = SlotEntry::unit_member(head.0, head.1, 0);
        // SAFETY: the unit is ours (no slot names it yet), so its head is live.
        unsafe { self.set_unit_members(key, members) };
        if members == 0 {
            drop(span);
            // SAFETY: every page was superseded: no slot names the unit, which we own.
            unsafe { self.free_unit(key) };
        } else {
            // A page marked idle while pending stays idle: the worker is not an access.
            self.publish_unit(span, head, members, 0, |_, current| current.is_idle());
        }
        for job in group.iter() {
            deferred.pool.release(job.buffer);
        }
        true
    }

    /// Compresses the pages of `jobs` (at most [`MAX_BATCH`]) as one batch and installs each
    /// result in its slot if the slot still holds that job's pending entry; a later write,
    /// discard or write-zeroes superseded it otherwise, and the result is dropped.
    fn compress_singles(
        &self,
        deferred: &Deferred,
        jobs: &mut [Job],
        outputs: &mut [[u8; COMPRESS_BUFFER]; MAX_BATCH],
    ) {
        let mut live = [false; MAX_BATCH];
        let mut pages: [&[u8; PAGE_SIZE]; MAX_BATCH] = [&ZERO_PAGE; MAX_BATCH];
        let mut count = 0;
        for (i, job) in jobs.iter().enumerate() {
            let still_wanted = self.slots.peek(job.slot).is_some_and(|entry| {
                entry.same_content(SlotEntry::pending(job.buffer, job.generation))
            });
            if still_wanted {
                // SAFETY: the job holds the buffer until `release` below.
                pages[count] = unsafe { deferred.pool.page(job.buffer) };
                live[i] = true;
                count += 1;
            }
        }
        let mut results: [Result<usize, CodecError>; MAX_BATCH] = std::array::from_fn(|_| Ok(0));
        {
            let mut dsts: [&mut [u8]; MAX_BATCH] = Default::default();
            for (dst, output) in dsts.iter_mut().zip(outputs.iter_mut()) {
                *dst = &mut output[..];
            }
            self.codec
                .compress_batch(&pages[..count], &mut dsts[..count], &mut results[..count]);
        }
        let mut next = 0;
        for (i, job) in jobs.iter().enumerate() {
            if live[i] {
                let (page, output, len) =
                    (pages[next], &outputs[next], results[next].as_ref().ok());
                next += 1;
                if !self.install(deferred, job, page, output, len.copied()) {
                    // Keep the job (and its hold on the buffer) for a retry; its old object
                    // was freed above.
                    deferred
                        .queue
                        .stall(Job::single(job.slot, job.buffer, job.generation, None));
                    continue;
                }
            }
            deferred.pool.release(job.buffer);
        }
    }

    /// Allocates the compressed object for `job` and swaps it in if the slot still holds the
    /// job's pending entry. Returns `false` when the memory limit (or the OS) refused the
    /// object: the page stays pending, readable, and is retried later.
    fn install(
        &self,
        deferred: &Deferred,
        job: &Job,
        page: &[u8; PAGE_SIZE],
        compressed: &[u8],
        compressed_len: Option<usize>,
    ) -> bool {
        let mut stored = self.store_object(page, compressed, compressed_len);
        if stored.is_err() && deferred.pool.trim() > 0 {
            // Free pool buffers were holding memory the limit counts: retry without them.
            stored = self.store_object(page, compressed, compressed_len);
        }
        let Ok(new) = stored else {
            self.ask_for_room();
            return false;
        };
        self.counters.note_mem_used(self.mem_used_total());
        let mut guard = self.lock(job.slot);
        let current = guard.entry();
        if current.same_content(SlotEntry::pending(job.buffer, job.generation)) {
            // A page marked idle while pending stays idle: the worker is not an access.
            let swapped = guard.swap(new.with_idle(current.is_idle()));
            drop(guard);
            self.account_swap(swapped, new);
        } else {
            drop(guard);
            // Superseded while we compressed.
            // SAFETY: `new`'s object was allocated above and never published.
            if let Some(stale) = unsafe { StaleObject::unpublished(new) } {
                self.alloc.free_stale(stale);
            }
        }
        true
    }

    fn slot_index(&self, index: u64) -> Result<usize, StoreError> {
        usize::try_from(index)
            .ok()
            .filter(|&i| i < self.slots.len())
            .ok_or(StoreError::OutOfRange {
                index,
                capacity: self.capacity_pages(),
            })
    }

    fn lock(&self, slot: usize) -> slot::SlotGuard<'_> {
        // slot_index checked the range.
        match self.slots.lock(slot) {
            Some(guard) => guard,
            None => unreachable!("slot {slot} was range-checked"),
        }
    }

    /// Turns a page into a slot entry, allocating its object (owned by the caller until the
    /// entry is published).
    fn encode(&self, page: &[u8; PAGE_SIZE]) -> Result<SlotEntry, StoreError> {
        if let Some(entry) = same_fill::detect(page).and_then(|word| self.same_filled(word)) {
            return Ok(entry);
        }
        let stored = COMPRESS_SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let len = self.codec.compress(page, &mut scratch[..]).ok();
            let mut stored = self.store_object(page, &scratch[..], len);
            if matches!(stored, Err(AllocError::MemoryLimit { .. })) && self.ask_for_room() {
                // The writeback thread makes room; wait for it a little, as a write to a
                // full disk cache waits for the flusher, then fail as zram would.
                let deadline = std::time::Instant::now() + writeback::ROOM_WAIT;
                while matches!(stored, Err(AllocError::MemoryLimit { .. }))
                    && std::time::Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(1));
                    stored = self.store_object(page, &scratch[..], len);
                }
            }
            stored
        });
        let entry = stored.map_err(|e| self.alloc_error(e))?;
        self.counters.note_mem_used(self.mem_used_total());
        Ok(entry)
    }

    /// The store error a write reports for an allocation the allocator refused.
    fn alloc_error(&self, error: AllocError) -> StoreError {
        match (error, self.mem_limit.load(Ordering::Relaxed)) {
            (AllocError::MemoryLimit { .. }, limit @ 1..) => StoreError::MemoryLimit { limit },
            (error, _) => StoreError::OutOfMemory(error),
        }
    }

    /// The entry of a page filled with `word`, or `None` when the word needs a new entry in
    /// the [`FillWords`] table and a state file's fill-word region has no room for it (more
    /// distinct words than pages, only while writes are in flight): such a page is stored as
    /// an ordinary compressed object instead.
    fn same_filled(&self, word: u64) -> Option<SlotEntry> {
        let payload = self.fill_words.encode(word)?;
        Some(SlotEntry::new(SlotState::SameFilled, payload))
    }

    /// Allocates the object for a page that compressed into `compressed[..len]` (`None`:
    /// it did not compress): a compressed object, or the raw page in the huge class.
    fn store_object(
        &self,
        page: &[u8; PAGE_SIZE],
        compressed: &[u8],
        compressed_len: Option<usize>,
    ) -> Result<SlotEntry, AllocError> {
        let alloc_limit = self.alloc_limit();
        match compressed_len {
            Some(len) if (1..=HUGE_THRESHOLD).contains(&len) && len <= compressed.len() => self
                .alloc
                .store(class_of(len), &compressed[..len], alloc_limit)
                .map(|handle| SlotEntry::compressed(handle, len)),
            // Too big or incompressible: keep the page raw.
            Some(_) | None => self
                .alloc
                .store(HUGE_CLASS, page, alloc_limit)
                .map(SlotEntry::huge),
        }
    }

    /// The allocator's share of the memory limit: what the table, the fill words, the pending
    /// pool and the dictionaries leave (`None`: no limit).
    fn alloc_limit(&self) -> Option<u64> {
        match self.mem_limit.load(Ordering::Relaxed) {
            0 => None,
            limit => Some(limit.saturating_sub(
                self.slots.bytes() as u64
                    + self.fill_words.bytes() as u64
                    + self.pool_bytes()
                    + self.recompression.dictionary_bytes(),
            )),
        }
    }

    /// Regenerates the page an entry holds. The caller holds the slot lock.
    fn decode(
        &self,
        index: u64,
        entry: SlotEntry,
        page: &mut [u8; PAGE_SIZE],
    ) -> Result<(), StoreError> {
        match entry.state() {
            SlotState::Empty => page.fill(0),
            SlotState::SameFilled => same_fill::fill(page, self.fill_words.decode(entry.payload())),
            SlotState::Compressed => {
                let len = entry.compressed_size();
                let codec = self
                    .codec_of(entry.priority())
                    .map_err(|source| StoreError::Corrupt { index, source })?;
                // SAFETY: the caller holds the slot lock of the slot that references this
                // object, so it is live and neither freed nor moved while we read it.
                let object = unsafe { self.alloc.object(class_of(len), entry.handle(), len) };
                codec
                    .decompress(object, page)
                    .map_err(|source| StoreError::Corrupt { index, source })?;
            }
            SlotState::Huge => {
                // SAFETY: as above; a huge object is one raw page.
                let object = unsafe { self.alloc.object(HUGE_CLASS, entry.handle(), PAGE_SIZE) };
                page.copy_from_slice(object);
            }
            SlotState::Pending => {
                let (buffer, _generation) = entry.pending_buffer();
                let Some(deferred) = self
                    .deferred
                    .as_ref()
                    .filter(|d| (buffer as usize) < d.pool.capacity())
                else {
                    return Err(StoreError::UnsupportedState {
                        index,
                        state: SlotState::Pending,
                    });
                };
                // SAFETY: the caller holds the lock of the slot whose entry names the buffer,
                // so the slot's hold keeps it published and unchanged while we copy it.
                page.copy_from_slice(unsafe { deferred.pool.page(buffer) });
            }
            SlotState::WrittenBack => self.read_back(index, entry, page)?,
            SlotState::Unit => self.read_unit_member(index, entry, page)?,
            SlotState::Invalid => {
                return Err(StoreError::UnsupportedState {
                    index,
                    state: SlotState::Invalid,
                })
            }
        }
        Ok(())
    }

    /// Updates the counters for a slot that went from `swapped.old` to `new`, and frees what
    /// the old entry held. The caller has published `new` and released the slot lock.
    fn account_swap(&self, swapped: Swapped, new: SlotEntry) {
        if let Some(stale) = self.account_swap_keeping_object(swapped, new) {
            self.alloc.free_stale(stale);
        }
    }

    /// [`account_swap`](Self::account_swap), except that the old entry's allocator object (if
    /// the swap orphaned one) is not freed but returned, for the caller to free later with
    /// [`SlabAllocator::free_stale`]. Everything else the old entry held is released.
    fn account_swap_keeping_object(&self, swapped: Swapped, new: SlotEntry) -> Option<StaleObject> {
        let Swapped { old, stale } = swapped;
        let c = self.counters.local();
        for (entry, change) in [(new, add as fn(&AtomicU64, u64)), (old, sub)] {
            change(&c.pages_stored, u64::from(holds_page(entry)));
            change(&c.compr_data_size, compressed_bytes(entry));
            let state = entry.state();
            change(&c.same_pages, u64::from(state == SlotState::SameFilled));
            change(&c.huge_pages, u64::from(state == SlotState::Huge));
            change(&c.pending_pages, u64::from(state == SlotState::Pending));
            change(&c.pages_on_file, u64::from(state == SlotState::WrittenBack));
            change(&c.damaged_pages, u64::from(state == SlotState::Invalid));
            change(&c.unit_members, u64::from(state == SlotState::Unit));
            match state {
                SlotState::Compressed => {
                    let priority = entry.priority();
                    change(&c.algorithm_pages[priority], 1);
                    change(&c.algorithm_bytes[priority], entry.compressed_size() as u64);
                }
                // A unit's bytes are counted with the unit (`count_new_unit`, `free_unit`).
                SlotState::Unit => change(&c.algorithm_pages[entry.priority()], 1),
                SlotState::Empty
                | SlotState::SameFilled
                | SlotState::Huge
                | SlotState::WrittenBack
                | SlotState::Pending
                | SlotState::Invalid => {}
            }
        }
        add(
            &c.huge_pages_since,
            u64::from(new.state() == SlotState::Huge),
        );
        match old.state() {
            SlotState::SameFilled => self.fill_words.release(old.payload()),
            // Its object, if the swap orphaned it, is `stale`.
            SlotState::Compressed | SlotState::Huge => {}
            SlotState::Pending => {
                if let Some(deferred) = &self.deferred {
                    deferred.pool.release(old.pending_buffer().0);
                }
            }
            SlotState::WrittenBack => self.release_written_back(old),
            SlotState::Unit => self.leave_unit(old),
            SlotState::Empty | SlotState::Invalid => {}
        }
        stale
    }
}

impl Drop for PageStore {
    fn drop(&mut self) {
        // Jobs no worker took still own the objects their writes replaced.
        if let Some(deferred) = &self.deferred {
            for job in deferred.queue.drain() {
                if let Some(stale) = job.stale {
                    self.alloc.free_stale(stale);
                }
            }
        }
    }
}

static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Whether an entry holds data (counts in `orig_data_size`).
fn holds_page(entry: SlotEntry) -> bool {
    match entry.state() {
        SlotState::Empty | SlotState::Invalid => false,
        SlotState::SameFilled
        | SlotState::Compressed
        | SlotState::Huge
        | SlotState::WrittenBack
        | SlotState::Pending
        | SlotState::Unit => true,
    }
}

/// The allocator class of the object an entry references and owns alone, if any (a Unit
/// entry shares its unit's objects with the other members: `unit.rs` frees them).
fn object_class(entry: SlotEntry) -> Option<usize> {
    match entry.state() {
        SlotState::Compressed => Some(class_of(entry.compressed_size())),
        SlotState::Huge => Some(HUGE_CLASS),
        SlotState::Empty
        | SlotState::SameFilled
        | SlotState::WrittenBack
        | SlotState::Pending
        | SlotState::Unit
        | SlotState::Invalid => None,
    }
}

/// The bytes of an entry's object that hold data.
fn object_len(entry: SlotEntry) -> usize {
    match entry.state() {
        SlotState::Compressed => entry.compressed_size(),
        SlotState::Huge => PAGE_SIZE,
        SlotState::Empty
        | SlotState::SameFilled
        | SlotState::WrittenBack
        | SlotState::Pending
        | SlotState::Unit
        | SlotState::Invalid => 0,
    }
}

/// What an entry adds to `compr_data_size`: zram counts a huge page as a full page, and a
/// pending page is held uncompressed, so it counts a full page too until a worker compresses
/// it. A unit's stream is counted once, with the unit, not per member.
fn compressed_bytes(entry: SlotEntry) -> u64 {
    match entry.state() {
        SlotState::Compressed => entry.compressed_size() as u64,
        SlotState::Huge | SlotState::Pending => PAGE_SIZE as u64,
        SlotState::Empty
        | SlotState::SameFilled
        | SlotState::WrittenBack
        | SlotState::Unit
        | SlotState::Invalid => 0,
    }
}

thread_local! {
    /// A unit's pages, filled by the guest's write, on a thread that compresses it inline.
    static UNIT_INPUT: RefCell<Box<[u8; MAX_UNIT_MEMBERS * PAGE_SIZE]>> =
        RefCell::new(Box::new([0; MAX_UNIT_MEMBERS * PAGE_SIZE]));
    /// Its compressed stream.
    static UNIT_OUTPUT: RefCell<Box<[u8; UNIT_COMPRESS_BUFFER]>> =
        RefCell::new(Box::new([0; UNIT_COMPRESS_BUFFER]));
}

/// A page-long slice as a page.
fn as_page(bytes: &[u8]) -> &[u8; PAGE_SIZE] {
    bytes
        .try_into()
        .unwrap_or_else(|_| unreachable!("chunks of PAGE_SIZE"))
}

/// A page-long slice as a mutable page.
fn as_page_mut(bytes: &mut [u8]) -> &mut [u8; PAGE_SIZE] {
    bytes
        .try_into()
        .unwrap_or_else(|_| unreachable!("chunks of PAGE_SIZE"))
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod state_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
#[path = "unit_tests.rs"]
mod unit_tests;
#[cfg(test)]
#[path = "writeback_tests.rs"]
mod writeback_tests;
