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
//! decompresses straight from the object into the caller's page. See DESIGN.md for the slot
//! states, the lock order and the memory accounting.

pub mod alloc;
pub mod same_fill;
pub mod slot;
pub mod stats;

use std::cell::RefCell;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use self::alloc::{class_of, AllocError, SlabAllocator, HUGE_CLASS, HUGE_THRESHOLD};
use self::same_fill::FillWords;
use self::slot::{SlotEntry, SlotState, SlotTable, MAX_HANDLE};
use self::stats::{add, get, sub, Counters};
pub use self::stats::{IoStat, MmStat, Stats, StoreInfo};
use crate::codec::{Algorithm, Codec, CodecError, UnknownCodec, COMPRESS_BUFFER};
use crate::PAGE_SIZE;

/// The largest device: object numbers must fit a slot's 44-bit handle even when every chunk
/// of a class holds a single object (at most 4096 objects a chunk).
pub const MAX_CAPACITY_PAGES: u64 = (MAX_HANDLE + 1) / 4096 / 2;

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
    /// The configuration is not valid.
    #[error("invalid store configuration: {0}")]
    Config(String),
    /// The algorithm or level is not valid.
    #[error(transparent)]
    Codec(#[from] UnknownCodec),
}

thread_local! {
    /// Each thread's compression buffer, as zram keeps one per CPU stream.
    static COMPRESS_SCRATCH: RefCell<Box<[u8; COMPRESS_BUFFER]>> =
        RefCell::new(Box::new([0; COMPRESS_BUFFER]));
}

/// The compressed page store. `Send + Sync`: share it behind an `Arc`.
#[derive(Debug)]
pub struct PageStore {
    slots: SlotTable,
    alloc: SlabAllocator,
    fill_words: FillWords,
    codec: Box<dyn Codec>,
    counters: Counters,
    /// 0 when there is no limit.
    mem_limit: AtomicU64,
    compaction: Mutex<()>,
}

impl PageStore {
    /// Creates an empty store.
    pub fn new(config: StoreConfig) -> Result<PageStore, StoreError> {
        if config.capacity_pages == 0 || config.capacity_pages > MAX_CAPACITY_PAGES {
            return Err(StoreError::Config(format!(
                "the capacity must be 1 to {MAX_CAPACITY_PAGES} pages, not {}",
                config.capacity_pages
            )));
        }
        let codec = config.algorithm.codec(config.level)?;
        let pages = usize::try_from(config.capacity_pages)
            .map_err(|_| StoreError::Config("the capacity does not fit in memory".into()))?;
        let store = PageStore {
            slots: SlotTable::new(pages),
            alloc: SlabAllocator::new(),
            fill_words: FillWords::default(),
            codec,
            counters: Counters::default(),
            mem_limit: AtomicU64::new(config.mem_limit.unwrap_or(0)),
            compaction: Mutex::new(()),
        };
        if let Some(limit) = config.mem_limit {
            if store.mem_used_total() > limit {
                return Err(StoreError::Config(format!(
                    "a memory limit of {limit} bytes is below the {} bytes the empty store needs",
                    store.mem_used_total()
                )));
            }
        }
        store
            .counters
            .mem_used_max
            .store(store.mem_used_total(), Ordering::Relaxed);
        Ok(store)
    }

    /// The number of pages.
    pub fn capacity_pages(&self) -> u64 {
        self.slots.len() as u64
    }

    /// The algorithm pages are compressed with.
    pub fn algorithm(&self) -> Algorithm {
        self.codec.algorithm()
    }

    /// Stores `page` at `index`. On error the slot keeps its old content.
    pub fn write(&self, index: u64, page: &[u8; PAGE_SIZE]) -> Result<(), StoreError> {
        let slot = self.slot_index(index)?;
        let result = self.encode(page).map(|new| {
            let old = self.lock(slot).replace(new);
            self.account_replace(old, new);
        });
        if result.is_err() {
            add(&self.counters.failed_writes, 1);
        }
        result
    }

    /// Reads the page at `index` into `page`; a page never written reads as zeros.
    pub fn read(&self, index: u64, page: &mut [u8; PAGE_SIZE]) -> Result<(), StoreError> {
        let slot = self.slot_index(index)?;
        let guard = self.lock(slot);
        let result = self.decode(index, guard.entry(), page);
        drop(guard);
        if result.is_err() {
            add(&self.counters.failed_reads, 1);
        }
        result
    }

    /// Reads the page at `index`, lets `f` change it and stores the result, all under the
    /// slot's lock, so concurrent partial writes to one page are not lost. On error the slot
    /// keeps its old content (and `f` may not have run).
    pub fn modify<R>(
        &self,
        index: u64,
        f: impl FnOnce(&mut [u8; PAGE_SIZE]) -> R,
    ) -> Result<R, StoreError> {
        let slot = self.slot_index(index)?;
        let mut page = [0u8; PAGE_SIZE];
        let mut guard = self.lock(slot);
        if let Err(e) = self.decode(index, guard.entry(), &mut page) {
            drop(guard);
            add(&self.counters.failed_reads, 1);
            return Err(e);
        }
        let result = f(&mut page);
        match self.encode(&page) {
            Ok(new) => {
                let old = guard.replace(new);
                drop(guard);
                self.account_replace(old, new);
                Ok(result)
            }
            Err(e) => {
                drop(guard);
                add(&self.counters.failed_writes, 1);
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
        for index in pages {
            let slot = self.slot_index(index)?;
            if self.slots.peek(slot) == Some(SlotEntry::EMPTY) {
                continue;
            }
            let old = self.lock(slot).replace(SlotEntry::EMPTY);
            if old.state() != SlotState::Empty {
                add(&self.counters.notify_free, 1);
            }
            self.account_replace(old, SlotEntry::EMPTY);
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
            for slot in 0..self.slots.len() {
                let Some(entry) = self.slots.peek(slot) else {
                    break;
                };
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
                if let Some((moved, freed)) =
                    self.alloc
                        .relocate(class, entry.handle(), object_len(entry))
                {
                    guard.replace(entry.with_handle(moved));
                    pages += freed;
                }
            }
        }
        self.alloc.end_compaction();
        add(&self.counters.pages_compacted, pages);
        pages
    }

    /// Sets or clears the memory limit. Data already stored stays even above a lower limit.
    pub fn set_mem_limit(&self, limit: Option<u64>) {
        self.mem_limit.store(limit.unwrap_or(0), Ordering::Relaxed);
    }

    /// Bytes held from the OS: slot table, chunks, allocator and same-fill metadata.
    pub fn mem_used_total(&self) -> u64 {
        self.slots.bytes() as u64 + self.alloc.bytes() + self.fill_words.bytes() as u64
    }

    /// Counts a read that failed outside the store (e.g. in guest memory).
    pub fn count_failed_read(&self) {
        add(&self.counters.failed_reads, 1);
    }

    /// Counts a write that failed outside the store.
    pub fn count_failed_write(&self) {
        add(&self.counters.failed_writes, 1);
    }

    /// Counts a request refused as malformed or out of range.
    pub fn count_invalid_io(&self) {
        add(&self.counters.invalid_io, 1);
    }

    /// A snapshot of the statistics.
    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        let mem_used_total = self.mem_used_total();
        let metadata =
            self.alloc.bytes() - self.alloc.chunk_bytes() + self.fill_words.bytes() as u64;
        Stats {
            mm: MmStat {
                orig_data_size: get(&c.pages_stored) * PAGE_SIZE as u64,
                compr_data_size: get(&c.compr_data_size),
                mem_used_total,
                mem_limit: self.mem_limit.load(Ordering::Relaxed),
                mem_used_max: get(&c.mem_used_max).max(mem_used_total),
                same_pages: get(&c.same_pages),
                pages_compacted: get(&c.pages_compacted),
                huge_pages: get(&c.huge_pages),
                huge_pages_since: get(&c.huge_pages_since),
            },
            io: IoStat {
                failed_reads: get(&c.failed_reads),
                failed_writes: get(&c.failed_writes),
                invalid_io: get(&c.invalid_io),
                notify_free: get(&c.notify_free),
            },
            info: StoreInfo {
                disksize: self.capacity_pages() * PAGE_SIZE as u64,
                algorithm: self.algorithm().name().to_owned(),
                slot_table_bytes: self.slots.bytes() as u64,
                chunk_bytes: self.alloc.chunk_bytes(),
                metadata_bytes: metadata,
            },
        }
    }

    /// Per-class allocator figures, for benchmarks and debugging.
    pub fn class_stats(&self) -> Vec<alloc::ClassStats> {
        self.alloc.class_stats()
    }

    /// Walks the slot table and every size class and checks that they agree with each other
    /// and with the counters. Debug aid: slow, and only meaningful while no other thread
    /// writes.
    pub fn check_consistency(&self) -> Result<(), String> {
        let mut by_class: Vec<Vec<u64>> = vec![Vec::new(); HUGE_CLASS + 1];
        let (mut stored, mut compr, mut same, mut huge) = (0u64, 0u64, 0u64, 0u64);
        for slot in 0..self.slots.len() {
            let entry = self.slots.peek(slot).unwrap_or(SlotEntry::EMPTY);
            if entry.state() != SlotState::Empty {
                stored += 1;
            }
            compr += compressed_bytes(entry);
            match entry.state() {
                SlotState::SameFilled => same += 1,
                SlotState::Huge => huge += 1,
                _ => {}
            }
            if let Some(class) = object_class(entry) {
                by_class[class].push(entry.handle());
            }
        }
        let c = &self.counters;
        let expect = [
            ("pages_stored", stored, get(&c.pages_stored)),
            ("compr_data_size", compr, get(&c.compr_data_size)),
            ("same_pages", same, get(&c.same_pages)),
            ("huge_pages", huge, get(&c.huge_pages)),
        ];
        for (name, walked, counted) in expect {
            if walked != counted {
                return Err(format!(
                    "{name}: the table says {walked}, the counter {counted}"
                ));
            }
        }
        self.alloc
            .check_consistency(&|class| by_class[class].clone())
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
        if let Some(word) = same_fill::detect(page) {
            return Ok(SlotEntry::new(
                SlotState::SameFilled,
                self.fill_words.encode(word),
            ));
        }
        let limit = match self.mem_limit.load(Ordering::Relaxed) {
            0 => None,
            limit => Some(limit),
        };
        // The allocator's share of the limit: what the table and the fill words leave.
        let alloc_limit = limit
            .map(|l| l.saturating_sub(self.slots.bytes() as u64 + self.fill_words.bytes() as u64));
        let stored = COMPRESS_SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            match self.codec.compress(page, &mut scratch[..]) {
                Ok(len) if len <= HUGE_THRESHOLD => {
                    let class = class_of(len);
                    self.alloc
                        .store(class, &scratch[..len], alloc_limit)
                        .map(|handle| SlotEntry::compressed(handle, len))
                }
                // Too big or incompressible: keep the page raw.
                Ok(_) | Err(_) => self
                    .alloc
                    .store(HUGE_CLASS, page, alloc_limit)
                    .map(SlotEntry::huge),
            }
        });
        let entry = stored.map_err(|e| match (e, limit) {
            (AllocError::MemoryLimit { .. }, Some(limit)) => StoreError::MemoryLimit { limit },
            (e, _) => StoreError::OutOfMemory(e),
        })?;
        self.counters
            .mem_used_max
            .fetch_max(self.mem_used_total(), Ordering::Relaxed);
        Ok(entry)
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
                // SAFETY: the caller holds the slot lock of the slot that references this
                // object, so it is live and neither freed nor moved while we read it.
                let object = unsafe { self.alloc.object(class_of(len), entry.handle(), len) };
                self.codec
                    .decompress(object, page)
                    .map_err(|source| StoreError::Corrupt { index, source })?;
            }
            SlotState::Huge => {
                // SAFETY: as above; a huge object is one raw page.
                let object = unsafe { self.alloc.object(HUGE_CLASS, entry.handle(), PAGE_SIZE) };
                page.copy_from_slice(object);
            }
            state @ (SlotState::WrittenBack | SlotState::Pending) => {
                return Err(StoreError::UnsupportedState { index, state })
            }
        }
        Ok(())
    }

    /// Updates the counters for a slot that went from `old` to `new`, and frees what `old`
    /// held. The caller has published `new` and released the slot lock, so `old`'s object is
    /// referenced by no slot and owned by the caller.
    fn account_replace(&self, old: SlotEntry, new: SlotEntry) {
        let c = &self.counters;
        for (entry, change) in [(new, add as fn(&AtomicU64, u64)), (old, sub)] {
            let present = u64::from(entry.state() != SlotState::Empty);
            change(&c.pages_stored, present);
            change(&c.compr_data_size, compressed_bytes(entry));
            change(
                &c.same_pages,
                u64::from(entry.state() == SlotState::SameFilled),
            );
            change(&c.huge_pages, u64::from(entry.state() == SlotState::Huge));
        }
        add(
            &c.huge_pages_since,
            u64::from(new.state() == SlotState::Huge),
        );
        match old.state() {
            SlotState::SameFilled => self.fill_words.release(old.payload()),
            SlotState::Compressed | SlotState::Huge => {
                if let Some(class) = object_class(old) {
                    self.alloc.free(class, old.handle());
                }
            }
            _ => {}
        }
    }
}

/// The allocator class of the object an entry references, if any.
fn object_class(entry: SlotEntry) -> Option<usize> {
    match entry.state() {
        SlotState::Compressed => Some(class_of(entry.compressed_size())),
        SlotState::Huge => Some(HUGE_CLASS),
        _ => None,
    }
}

/// The bytes of an entry's object that hold data.
fn object_len(entry: SlotEntry) -> usize {
    match entry.state() {
        SlotState::Compressed => entry.compressed_size(),
        _ => PAGE_SIZE,
    }
}

/// What an entry adds to `compr_data_size` (zram counts a huge page as a full page).
fn compressed_bytes(entry: SlotEntry) -> u64 {
    match entry.state() {
        SlotState::Compressed => entry.compressed_size() as u64,
        SlotState::Huge => PAGE_SIZE as u64,
        _ => 0,
    }
}

#[cfg(test)]
mod tests;
