// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The store's side of a live migration: the dirty log, and each slot exported and imported
//! in its stored form (DESIGN.md, "Live migration").
//!
//! The **dirty log** has one bit per slot in atomic words. It costs the write path one
//! relaxed load while no migration runs. While one runs, every guest-visible change of a
//! slot's content (a write, a discard, a partial write through `modify`) sets the slot's bit
//! *after* the slot changed; internal moves that keep the content (compaction, recompression,
//! writeback, a worker's install) do not. The sender clears a bit *before* it locks and reads
//! the slot, so a change racing with a send is always sent again: either the read saw the new
//! content, or the change's unlock came after the read's lock and its bit is set after the
//! clear.
//!
//! **Export** copies one slot as it is stored: nothing, a fill word, a compressed object
//! with its algorithm's priority, or a raw page. A written-back page is read from the backing
//! file (as its stored bytes); a pending page is compressed with the primary algorithm on the
//! sending thread, so the wire carries what a worker would have stored and the destination
//! never holds raw what the source will hold compressed. An Invalid (damaged) slot, or a
//! written-back page the file cannot give back, exports as [`StoredPage::Damaged`]: the
//! destination answers I/O errors for it too, never zeros.
//!
//! **Import** replaces a slot's entry with a record, allocating under the memory limit as a
//! write does; the replaced entry is accounted for and freed as after a write.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

use super::alloc::{class_of, HUGE_CLASS};
use super::slot::SlotEntry;
use super::{same_fill, PageStore, SlotState, StoreError, HUGE_THRESHOLD, MAX_SECONDARY};
use crate::codec::COMPRESS_BUFFER;
use crate::PAGE_SIZE;

/// One slot's content in its stored form, borrowing its bytes from an [`ExportScratch`] (on
/// export) or a received batch (on import).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredPage<'a> {
    /// Never written or discarded: reads as zeros.
    Empty,
    /// Every 8-byte word of the page is these bytes (in memory order).
    SameFilled([u8; 8]),
    /// A compressed object (1 to [`HUGE_THRESHOLD`] bytes) of the algorithm of `priority`
    /// (0 the primary, 1 to [`MAX_SECONDARY`] a secondary).
    Compressed {
        /// The algorithm's priority.
        priority: u8,
        /// The object's bytes.
        object: &'a [u8],
    },
    /// The page itself, stored raw (a huge page).
    Raw(&'a [u8; PAGE_SIZE]),
    /// The source cannot read the page (a damaged slot): it reads as an I/O error.
    Damaged,
}

/// The buffers one exporting thread reuses.
pub struct ExportScratch {
    page: [u8; PAGE_SIZE],
    object: [u8; COMPRESS_BUFFER],
}

impl Default for ExportScratch {
    fn default() -> Self {
        ExportScratch {
            page: [0; PAGE_SIZE],
            object: [0; COMPRESS_BUFFER],
        }
    }
}

impl std::fmt::Debug for ExportScratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportScratch").finish_non_exhaustive()
    }
}

/// What the two sides of a migration must agree on, as the source describes its store.
/// (The zstd dictionaries are not compared: the source sends its own, and the destination
/// loads those it lacks.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreShape {
    /// The device's size in pages.
    pub capacity_pages: u64,
    /// The page (block) size in bytes.
    pub page_size: u32,
    /// The algorithms by priority, the primary's first, as `zstd:level=3` names them.
    pub algorithms: Vec<String>,
}

/// The dirty log: one bit per slot, live only while a migration runs.
#[derive(Debug, Default)]
pub(crate) struct DirtyLog {
    active: AtomicBool,
    bits: OnceLock<Box<[AtomicU64]>>,
}

impl DirtyLog {
    /// Marks `slot` changed, if a migration runs. Called after the slot changed.
    #[inline]
    pub(crate) fn mark(&self, slot: usize) {
        if self.active.load(Ordering::Relaxed) {
            self.mark_slow(slot);
        }
    }

    #[cold]
    fn mark_slow(&self, slot: usize) {
        if let Some(word) = self.bits.get().and_then(|bits| bits.get(slot / 64)) {
            word.fetch_or(1 << (slot % 64), Ordering::Release);
        }
    }
}

/// A running dirty log; dropping it turns the log off.
#[derive(Debug)]
pub struct DirtyTracking<'a> {
    store: &'a PageStore,
}

impl DirtyTracking<'_> {
    /// Takes every dirty slot from `from` on, clearing each bit before the slot is read, and
    /// calls `each` with its index; stops early (returning the next slot to look at) when
    /// `each` returns `false`. Returns `None` when it reached the end.
    pub fn drain_from(&self, from: u64, mut each: impl FnMut(u64) -> bool) -> Option<u64> {
        let bits = self.store.dirty.bits.get()?;
        let pages = self.store.capacity_pages();
        let first_word = usize::try_from(from / 64).ok()?;
        for (w, word) in bits.iter().enumerate().skip(first_word) {
            if word.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let taken = word.swap(0, Ordering::AcqRel);
            let mut rest = taken;
            while rest != 0 {
                let bit = rest.trailing_zeros();
                rest &= rest - 1;
                let index = w as u64 * 64 + u64::from(bit);
                if index >= pages || index < from {
                    // Before `from`: put it back for the next pass.
                    if index < from {
                        word.fetch_or(1 << bit, Ordering::Release);
                    }
                    continue;
                }
                if !each(index) {
                    // Give back the bits not yet handled.
                    if rest != 0 {
                        word.fetch_or(rest, Ordering::Release);
                    }
                    return Some(index + 1);
                }
            }
        }
        None
    }
}

impl Drop for DirtyTracking<'_> {
    fn drop(&mut self) {
        self.store.dirty.active.store(false, Ordering::SeqCst);
    }
}

impl PageStore {
    /// Starts the dirty log with every slot marked (the first round sends everything stored).
    /// Refused while another migration tracks this store.
    pub fn start_dirty_tracking(&self) -> Result<DirtyTracking<'_>, String> {
        let words = usize::try_from(self.capacity_pages().div_ceil(64)).unwrap_or(0);
        let bits = self
            .dirty
            .bits
            .get_or_init(|| (0..words).map(|_| AtomicU64::new(0)).collect());
        if self
            .dirty
            .active
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return Err("a migration of this device is already running".into());
        }
        for word in bits.iter() {
            word.store(u64::MAX, Ordering::Release);
        }
        Ok(DirtyTracking { store: self })
    }

    /// Pages changed since a running migration last sent them (0 when none runs).
    pub fn migration_dirty_pages(&self) -> u64 {
        if !self.dirty_tracking_active() {
            return 0;
        }
        self.dirty.bits.get().map_or(0, |bits| {
            bits.iter()
                .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
                .sum()
        })
    }

    /// Whether a migration's dirty log runs.
    pub fn dirty_tracking_active(&self) -> bool {
        self.dirty.active.load(Ordering::Relaxed)
    }

    /// What a migration's destination must agree with.
    pub fn store_shape(&self) -> StoreShape {
        StoreShape {
            capacity_pages: self.capacity_pages(),
            page_size: u32::try_from(PAGE_SIZE).unwrap_or(u32::MAX),
            algorithms: self.recompression.algorithm_names().to_vec(),
        }
    }

    /// The number of zstd dictionaries loaded (a migration sends the new ones).
    pub fn zstd_dictionary_count(&self) -> usize {
        self.recompression.dictionaries.count()
    }

    /// The zstd dictionaries from the `from`-th on, oldest first.
    pub fn zstd_dictionaries_from(&self, from: usize) -> Vec<Box<[u8]>> {
        let mut all = self.recompression.dictionaries.export();
        all.drain(..from.min(all.len()));
        all
    }

    /// Checks that this (destination) store can hold pages of a store of `shape`: same
    /// geometry and algorithms. Returns a sentence naming both values on a mismatch.
    pub fn check_shape(&self, shape: &StoreShape) -> Result<(), String> {
        let mine = self.store_shape();
        if shape.capacity_pages != mine.capacity_pages {
            return Err(format!(
                "the source device has {} pages, this one {}",
                shape.capacity_pages, mine.capacity_pages
            ));
        }
        if shape.page_size != mine.page_size {
            return Err(format!(
                "the source device's block size is {} bytes, this one's {}",
                shape.page_size, mine.page_size
            ));
        }
        if shape.algorithms != mine.algorithms {
            return Err(format!(
                "the source compresses with [{}] (by priority), this device with [{}]",
                shape.algorithms.join(", "),
                mine.algorithms.join(", ")
            ));
        }
        Ok(())
    }

    /// Loads a source's zstd dictionary (one this store lacks; a copy it has is skipped).
    pub fn import_zstd_dictionary(&self, raw: &[u8]) -> Result<(), String> {
        if self
            .recompression
            .dictionaries
            .export()
            .iter()
            .any(|d| &d[..] == raw)
        {
            return Ok(());
        }
        self.load_zstd_dictionary(raw)
            .map(|_| ())
            .map_err(|e| format!("the source's zstd dictionary was refused: {e}"))
    }

    /// Copies page `index` in its stored form into `scratch` (module doc, "Export"). Locks
    /// the slot once; a written-back page is read from the file under that lock.
    pub fn export_slot<'s>(
        &self,
        index: u64,
        scratch: &'s mut ExportScratch,
    ) -> Result<StoredPage<'s>, StoreError> {
        let slot = self.slot_index(index)?;
        if !self.slots.is_touched(slot) {
            // Empty, and left untouched (no lock written).
            return Ok(StoredPage::Empty);
        }
        let guard = self.lock(slot);
        let entry = guard.entry();
        match entry.state() {
            SlotState::Empty => Ok(StoredPage::Empty),
            SlotState::SameFilled => {
                let word = self.fill_words.decode(entry.payload());
                Ok(StoredPage::SameFilled(word.to_ne_bytes()))
            }
            SlotState::Compressed => {
                let len = entry.compressed_size();
                // SAFETY: we hold the lock of the slot that references this object, so it is
                // live and neither freed nor moved while we copy it.
                let object = unsafe { self.alloc.object(class_of(len), entry.handle(), len) };
                scratch.object[..len].copy_from_slice(object);
                drop(guard);
                Ok(compressed(entry.priority(), &scratch.object[..len]))
            }
            SlotState::Huge => {
                // SAFETY: as above; a huge object is one raw page.
                let object = unsafe { self.alloc.object(HUGE_CLASS, entry.handle(), PAGE_SIZE) };
                scratch.page.copy_from_slice(object);
                Ok(StoredPage::Raw(&scratch.page))
            }
            SlotState::WrittenBack => {
                let (offset, len) = entry.backing_object();
                let Some(backing) = &self.backing else {
                    return Ok(StoredPage::Damaged);
                };
                let out: &mut [u8] = if len == PAGE_SIZE {
                    &mut scratch.page
                } else {
                    &mut scratch.object[..len]
                };
                if let Err(e) = backing.read(offset, len, index, out) {
                    log::warn!(
                        "migration: page {index} could not be read from the backing file \
                         ({e}); it goes as damaged"
                    );
                    return Ok(StoredPage::Damaged);
                }
                drop(guard);
                Ok(if len == PAGE_SIZE {
                    StoredPage::Raw(&scratch.page)
                } else {
                    compressed(entry.priority(), &scratch.object[..len])
                })
            }
            // A pending page goes compressed; a unit's member goes as a page of its own
            // (the destination stores it page by page).
            SlotState::Pending | SlotState::Unit => {
                self.decode(index, entry, &mut scratch.page)?;
                drop(guard);
                let len = self
                    .codec
                    .compress(&scratch.page, &mut scratch.object[..])
                    .ok();
                Ok(match len {
                    Some(len @ 1..=HUGE_THRESHOLD) => compressed(0, &scratch.object[..len]),
                    Some(_) | None => StoredPage::Raw(&scratch.page),
                })
            }
            SlotState::Invalid => Ok(StoredPage::Damaged),
        }
    }

    /// Replaces page `index`'s content with `page` (module doc, "Import"). The memory limit
    /// applies as to a write; on error the slot keeps its old content.
    pub fn import_slot(&self, index: u64, page: StoredPage<'_>) -> Result<(), StoreError> {
        let slot = self.slot_index(index)?;
        let new = match page {
            StoredPage::Empty => SlotEntry::EMPTY,
            StoredPage::SameFilled(bytes) => {
                let word = u64::from_ne_bytes(bytes);
                match self.same_filled(word) {
                    Some(entry) => entry,
                    None => {
                        let mut raw = [0u8; PAGE_SIZE];
                        same_fill::fill(&mut raw, word);
                        self.encode(&raw)?
                    }
                }
            }
            StoredPage::Compressed { priority, object } => {
                let priority = usize::from(priority);
                if priority > self.secondary_count() || priority > MAX_SECONDARY {
                    return Err(StoreError::Config(format!(
                        "page {index} names algorithm priority {priority}, which this device \
                         lacks"
                    )));
                }
                if !(1..=HUGE_THRESHOLD).contains(&object.len()) {
                    return Err(StoreError::Config(format!(
                        "page {index} is a compressed object of {} bytes, past the 1 to \
                         {HUGE_THRESHOLD} a slot holds",
                        object.len()
                    )));
                }
                let handle = self
                    .alloc
                    .store(class_of(object.len()), object, self.alloc_limit())
                    .map_err(|e| self.alloc_error(e))?;
                SlotEntry::compressed(handle, object.len()).with_priority(priority)
            }
            StoredPage::Raw(raw) => {
                let handle = self
                    .alloc
                    .store(HUGE_CLASS, raw, self.alloc_limit())
                    .map_err(|e| self.alloc_error(e))?;
                SlotEntry::huge(handle)
            }
            StoredPage::Damaged => SlotEntry::new(SlotState::Invalid, 0),
        };
        if new == SlotEntry::EMPTY && !self.slots.is_touched(slot) {
            // Already Empty; the table page stays untouched.
            return Ok(());
        }
        self.counters.note_mem_used(self.mem_used_total());
        let swapped = self.lock(slot).swap(new);
        self.account_swap(swapped, new);
        Ok(())
    }
}

fn compressed(priority: usize, object: &[u8]) -> StoredPage<'_> {
    StoredPage::Compressed {
        // At most MAX_SECONDARY (two bits).
        #[allow(clippy::cast_possible_truncation)]
        priority: priority as u8,
        object,
    }
}
