// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Writeback: cold or incompressible pages move from RAM to the backing file (zram's
//! `CONFIG_ZRAM_WRITEBACK`), and the idle clock that finds cold pages.
//!
//! A pass walks the slot table and takes the pages its [`WritebackRequest`] selects, a batch at
//! a time:
//!
//! 1. **copy**: under each page's slot lock (one at a time), copy its object — compressed bytes
//!    or a raw huge page — into the batch buffer and remember the entry;
//! 2. **write**: [`BackingFile::write_batch`] packs the batch into 4 KiB blocks of the file with
//!    one write call; no slot lock is held meanwhile, so the queues read and write on;
//! 3. **install**: under each slot lock again, if the slot still holds the *same object with the
//!    same bytes*, point it at the file ([`SlotState::WrittenBack`]) and free the RAM object;
//!    otherwise the page was rewritten, discarded or moved meanwhile: its new content stays and
//!    the file copy is released at once. Comparing the bytes as well as the handle makes a
//!    handle reused by a new object of the same size (ABA) harmless: identical bytes are a
//!    faithful copy of what the slot holds.
//!
//! A failed write leaves every page of the batch in RAM, untouched, and counts them in
//! `failed_writebacks`; the pass stops there and reports the error.
//!
//! The objects go to the file as they are in RAM (compressed with the algorithm the slot's
//! priority names), so a read-back decompresses the file's bytes directly. A page read back
//! stays on the file until it is rewritten or discarded, as in zram: reading it again costs one
//! more file read, but a cold page that is only read never costs RAM again.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use super::backing::{BackingError, BackingFile, PinnedObject};
use super::slot::{SlotEntry, SlotState, MAX_AGE, MAX_BACKING_OFFSET};
use super::stats::{add, WritebackStats};
use super::{object_class, object_len, PageStore, StoreError, HUGE_THRESHOLD};
use crate::codec::COMPRESS_BUFFER;
use crate::PAGE_SIZE;

/// How long a write that meets the memory limit waits for the writeback thread to make room
/// (with `--writeback-above`) before it fails.
pub const ROOM_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// Pages per batch (one write call each) when not configured.
pub const DEFAULT_BATCH_PAGES: usize = 256;

/// The smallest age, in ticks of `tick`, that guarantees a page has been idle for at least
/// `idle`, or `None` if the slot's age cannot count that far (ages saturate at [`MAX_AGE`]).
pub fn min_age_for(idle: std::time::Duration, tick: std::time::Duration) -> Option<u8> {
    let tick = tick.as_secs_f64().max(f64::MIN_POSITIVE);
    // A page of age `a` was last touched before the `a`-th most recent tick: idle for more
    // than (a - 1) ticks.
    let ticks = (idle.as_secs_f64() / tick).ceil() + 1.0;
    // `ticks` is at least 1 and compared with MAX_AGE before the cast.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    (ticks <= f64::from(MAX_AGE)).then_some(ticks as u8)
}

/// Which pages a writeback pass takes (zram's `type=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WritebackMode {
    /// Every stored page (only with a page range, as zram's `page_index=` without `type=`).
    All,
    /// Pages marked idle.
    Idle,
    /// Huge (incompressible at store time) pages.
    Huge,
    /// Pages both huge and idle.
    HugeIdle,
    /// Pages recompression marked incompressible.
    Incompressible,
    /// Pages whose age is at least this many idle-clock ticks (the automatic policies).
    Aged(u8),
}

impl WritebackMode {
    /// The mode's name on the control socket.
    pub fn name(self) -> &'static str {
        match self {
            WritebackMode::All => "all",
            WritebackMode::Idle => "idle",
            WritebackMode::Huge => "huge",
            WritebackMode::HugeIdle => "huge_idle",
            WritebackMode::Incompressible => "incompressible",
            WritebackMode::Aged(_) => "aged",
        }
    }

    fn selects(self, entry: SlotEntry) -> bool {
        let huge = entry.state() == SlotState::Huge;
        match self {
            WritebackMode::All => true,
            WritebackMode::Idle => entry.is_idle(),
            WritebackMode::Huge => huge,
            WritebackMode::HugeIdle => huge && entry.is_idle(),
            WritebackMode::Incompressible => entry.is_incompressible(),
            WritebackMode::Aged(age) => entry.age() >= age,
        }
    }
}

/// One writeback pass: which pages, and how many at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WritebackRequest {
    /// Which pages.
    pub mode: WritebackMode,
    /// Only pages `start..end` (`--pages LOW-HIGH` is inclusive on the command line; this is
    /// half-open).
    pub pages: Option<(u64, u64)>,
    /// Write at most this many pages.
    pub max_pages: Option<u64>,
}

impl WritebackRequest {
    /// A pass over the whole device in `mode`.
    pub fn new(mode: WritebackMode) -> WritebackRequest {
        WritebackRequest {
            mode,
            pages: None,
            max_pages: None,
        }
    }
}

/// A writeback request that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "bad writeback request '{0}': expected idle|huge|huge_idle|incompressible (or type=...), \
     optionally --pages LOW-HIGH (or page_index=N, page_indexes=LOW-HIGH), and at least one \
     of the two"
)]
pub struct BadWritebackRequest(pub String);

impl FromStr for WritebackRequest {
    type Err = BadWritebackRequest;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || BadWritebackRequest(text.to_owned());
        let mut mode = None;
        let mut pages: Option<(u64, u64)> = None;
        let mut words = text.split_whitespace();
        while let Some(word) = words.next() {
            let (key, value) = match word.split_once('=') {
                Some((key, value)) => (key, value),
                None if word == "--pages" => ("page_indexes", words.next().ok_or_else(bad)?),
                None => ("type", word),
            };
            match key {
                "type" if mode.is_none() => {
                    mode = Some(match value {
                        "idle" => WritebackMode::Idle,
                        "huge" => WritebackMode::Huge,
                        "huge_idle" => WritebackMode::HugeIdle,
                        "incompressible" => WritebackMode::Incompressible,
                        _ => return Err(bad()),
                    });
                }
                "page_index" | "page_indexes" | "--pages" if pages.is_none() => {
                    let (low, high) = value.split_once('-').unwrap_or((value, value));
                    let low: u64 = low.parse().map_err(|_| bad())?;
                    let high: u64 = high.parse().map_err(|_| bad())?;
                    if high < low || high == u64::MAX {
                        return Err(bad());
                    }
                    pages = Some((low, high + 1));
                }
                _ => return Err(bad()),
            }
        }
        if mode.is_none() && pages.is_none() {
            return Err(bad());
        }
        Ok(WritebackRequest {
            mode: mode.unwrap_or(WritebackMode::All),
            pages,
            max_pages: None,
        })
    }
}

impl fmt::Display for WritebackRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        if self.mode != WritebackMode::All {
            f.write_str(self.mode.name())?;
            sep = " ";
        }
        if let Some((start, end)) = self.pages {
            write!(f, "{sep}--pages {start}-{}", end.saturating_sub(1))?;
        }
        Ok(())
    }
}

/// What a writeback pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WritebackOutcome {
    /// Pages now on the file.
    pub written: u64,
    /// Their object bytes (the RAM they held).
    pub bytes: u64,
    /// Pages rewritten or discarded while in flight (their new content kept).
    pub superseded: u64,
    /// Pages that stay in RAM because the write failed.
    pub failed: u64,
    /// Pages of memory given back to the host by the compaction that ends a pass that wrote
    /// pages back (their objects leave holes in chunks that still hold others).
    pub pages_given_back: u64,
    /// The pass stopped early (the limit ran out or the caller's pace said stop).
    pub stopped: bool,
}

impl fmt::Display for WritebackOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "wrote back {} pages ({} bytes), {} superseded, {} failed, gave back {} pages{}",
            self.written,
            self.bytes,
            self.superseded,
            self.failed,
            self.pages_given_back,
            if self.stopped { ", stopped early" } else { "" }
        )
    }
}

/// Why a writeback pass could not run or stopped.
#[derive(Debug, thiserror::Error)]
pub enum WritebackError {
    /// The daemon has no `--backing-file`.
    #[error("writeback needs a backing file (--backing-file)")]
    NoBackingFile,
    /// The idle clock cannot count that far.
    #[error(
        "an idle age of {} s is more than the idle clock counts ({MAX_AGE} - 1 ticks of {} s); \
         start the daemon with a longer --idle-tick",
        idle.as_secs(),
        tick.as_secs_f64()
    )]
    AgeTooLong {
        /// The age asked for.
        idle: std::time::Duration,
        /// The clock's tick.
        tick: std::time::Duration,
    },
    /// The writeback limit is enabled and used up.
    #[error("the writeback limit is used up (writeback_limit 0)")]
    LimitReached,
    /// The page range is past the device.
    #[error("pages {start}-{end} are past the end of the device ({capacity} pages)")]
    OutOfRange {
        /// First page asked for.
        start: u64,
        /// Last page asked for.
        end: u64,
        /// The device's size in pages.
        capacity: u64,
    },
    /// Writing to the file failed; the pages stay in RAM.
    #[error("writeback failed after {outcome}: {source}")]
    Write {
        /// What the pass did before the failure.
        outcome: WritebackOutcome,
        /// The file's error.
        #[source]
        source: BackingError,
    },
}

/// What a write that meets the memory limit calls to wake the writeback thread.
#[derive(Clone)]
pub(super) struct Relief(std::sync::Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for Relief {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Relief")
    }
}

/// One page of a batch in flight.
struct InFlight {
    slot: usize,
    entry: SlotEntry,
    range: Range<usize>,
    /// For a member of a unit: the unit's nonce (the page was compressed on its own for the
    /// file, so its bytes cannot be compared with the unit's).
    unit_nonce: Option<u64>,
}

impl PageStore {
    /// Gives the store a backing file for writeback. Call before sharing the store. A file
    /// with less room than the device may need ([`super::backing::low_space_threshold`]) is
    /// warned about in the log.
    pub fn with_backing_file(mut self, backing: BackingFile) -> PageStore {
        let device_bytes = self.capacity_pages() * PAGE_SIZE as u64;
        if let Some(warning) = backing
            .opened()
            .and_then(|opened| opened.low_space_warning(device_bytes))
        {
            log::warn!("{warning}");
        }
        self.backing = Some(backing);
        self
    }

    /// Lets writes that meet the memory limit call `relief` (which wakes the writeback
    /// thread) and wait up to [`ROOM_WAIT`] for the room it makes.
    pub fn set_pressure_relief(&self, relief: std::sync::Arc<dyn Fn() + Send + Sync>) {
        *self
            .pressure_relief
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Relief(relief));
    }

    /// Asks the writeback thread for room, if one is there to ask; returns whether it was.
    pub(super) fn ask_for_room(&self) -> bool {
        let relief = self
            .pressure_relief
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        relief.is_some_and(|relief| {
            (relief.0)();
            true
        })
    }

    /// The backing file, if the store has one (its path, statistics, and
    /// [`BackingFile::erase`] at the end of a run whose pages are not kept).
    pub fn backing_file(&self) -> Option<&BackingFile> {
        self.backing.as_ref()
    }

    /// Whether the store has a backing file.
    pub fn has_backing_file(&self) -> bool {
        self.backing.is_some()
    }

    /// Whether some page of `pages` lies on the backing file now (a peek: it may change at
    /// once). Bounded by the device; pages past it are not.
    pub fn any_written_back(&self, pages: Range<u64>) -> bool {
        self.backing.is_some()
            && pages
                .take_while(|&index| index < self.capacity_pages())
                .any(|index| {
                    usize::try_from(index)
                        .ok()
                        .and_then(|slot| self.slots.peek(slot))
                        .is_some_and(|entry| entry.state() == SlotState::WrittenBack)
                })
    }

    /// Where page `index`'s object is on the backing file, if it is written back: its
    /// record's byte offset and the object's length (a peek; tests and debugging).
    #[doc(hidden)]
    pub fn backing_object(&self, index: u64) -> Option<(u64, usize)> {
        usize::try_from(index)
            .ok()
            .and_then(|slot| self.slots.peek(slot))
            .filter(|entry| entry.state() == SlotState::WrittenBack)
            .map(SlotEntry::backing_object)
    }

    /// The state of page `index`'s slot (a peek; tests and debugging).
    #[doc(hidden)]
    pub fn slots_state(&self, index: u64) -> SlotState {
        usize::try_from(index)
            .ok()
            .and_then(|slot| self.slots.peek(slot))
            .map_or(SlotState::Invalid, SlotEntry::state)
    }

    /// Sets the idle clock's tick (the daemon's `--idle-tick`), which turns ages into time.
    pub fn set_idle_tick(&self, tick: std::time::Duration) {
        let millis = u64::try_from(tick.as_millis()).unwrap_or(u64::MAX).max(1);
        self.idle_tick_ms
            .store(millis, std::sync::atomic::Ordering::Relaxed);
    }

    /// The idle clock's tick.
    pub fn idle_tick(&self) -> std::time::Duration {
        std::time::Duration::from_millis(
            self.idle_tick_ms.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Marks idle every stored page not read or written for at least `idle` (zram's
    /// `echo SECS > idle`), as far as the idle clock can tell: ages are whole ticks, so pages
    /// idle for up to one tick longer may be left unmarked. Returns the pages newly marked.
    pub fn mark_idle_older_than(&self, idle: std::time::Duration) -> Result<u64, WritebackError> {
        let tick = self.idle_tick();
        let age = min_age_for(idle, tick).ok_or(WritebackError::AgeTooLong { idle, tick })?;
        Ok(self.mark_idle_aged(age))
    }

    /// Sets zram's `writeback_limit` (pages) and `writeback_limit_enable`: with `Some(n)`,
    /// writeback writes at most `n` more pages; `None` lifts the limit.
    pub fn set_writeback_limit(&self, limit: Option<u64>) {
        let mut state = self
            .writeback_limit
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *state = limit;
    }

    /// Pages per write call.
    pub fn set_writeback_batch(&self, pages: usize) {
        self.writeback_batch
            .store(pages.clamp(1, 4096), std::sync::atomic::Ordering::Relaxed);
    }

    /// One tick of the idle clock: every stored page not accessed since the last tick gets one
    /// tick older (up to [`MAX_AGE`]). One walk of the slot table without locks, a
    /// compare-and-swap per stored page. Returns the pages that aged.
    pub fn tick_idle_clock(&self) -> u64 {
        self.slots
            .touched_slots(0..self.slots.len())
            .filter(|&slot| self.slots.age(slot).is_some())
            .count() as u64
    }

    /// Marks idle every stored page at least `min_age` ticks old (`idle --age`; at least 1,
    /// since only Compressed, Huge and Unit pages have an age). Returns the pages newly marked.
    pub fn mark_idle_aged(&self, min_age: u8) -> u64 {
        let min_age = min_age.max(1);
        let mut marked = 0;
        for slot in self.slots.touched_slots(0..self.slots.len()) {
            let Some(entry) = self.slots.peek(slot) else {
                break;
            };
            if entry.is_idle() || entry.age() < min_age {
                continue;
            }
            let mut guard = self.lock(slot);
            let entry = guard.entry();
            if !entry.is_idle() && entry.age() >= min_age {
                guard.set_flags(entry.with_idle(true));
                marked += 1;
            }
        }
        add(&self.counters.local().marked_idle, marked);
        marked
    }

    /// Bytes of RAM objects by age (index = age in ticks): what writing back the pages of each
    /// age would take out of the allocator. Pending and same-filled pages are not counted.
    pub fn bytes_by_age(&self) -> [u64; MAX_AGE as usize + 1] {
        let mut bytes = [0u64; MAX_AGE as usize + 1];
        let unit_share =
            self.counters.sum(|c| &c.unit_bytes) / self.counters.sum(|c| &c.unit_members).max(1);
        for slot in self.slots.touched_slots(0..self.slots.len()) {
            let Some(entry) = self.slots.peek(slot) else {
                break;
            };
            if object_class(entry).is_some() {
                bytes[usize::from(entry.age())] += object_len(entry) as u64;
            } else if entry.state() == SlotState::Unit {
                // A member's share of its unit's stream: what writing it back frees, once
                // its unit's other members go too.
                bytes[usize::from(entry.age())] += unit_share;
            }
        }
        bytes
    }

    /// Runs one writeback pass.
    pub fn writeback(
        &self,
        request: &WritebackRequest,
    ) -> Result<WritebackOutcome, WritebackError> {
        self.writeback_paced(request, &mut || true)
    }

    /// Runs one writeback pass, calling `pace` before each batch (never with a slot locked);
    /// the pass stops when it returns `false`.
    pub fn writeback_paced(
        &self,
        request: &WritebackRequest,
        pace: &mut dyn FnMut() -> bool,
    ) -> Result<WritebackOutcome, WritebackError> {
        let backing = self.backing.as_ref().ok_or(WritebackError::NoBackingFile)?;
        let capacity = self.capacity_pages();
        let range = request.pages.map_or(0..capacity, |(start, end)| start..end);
        if range.end > capacity {
            return Err(WritebackError::OutOfRange {
                start: range.start,
                end: range.end - 1,
                capacity,
            });
        }
        if self.writeback_allowance() == Some(0) {
            return Err(WritebackError::LimitReached);
        }
        add(&self.counters.local().writeback_passes, 1);
        let batch_pages = self
            .writeback_batch
            .load(std::sync::atomic::Ordering::Relaxed);
        let mut outcome = WritebackOutcome::default();
        let mut budget = request.max_pages;
        let mut buffer: Vec<u8> = Vec::with_capacity(batch_pages * PAGE_SIZE);
        let mut batch: Vec<InFlight> = Vec::with_capacity(batch_pages);
        // Both bounds are at most the capacity, which fits a usize.
        #[allow(clippy::cast_possible_truncation)]
        let mut slots = self
            .slots
            .touched_slots((range.start as usize)..(range.end as usize));
        loop {
            if !pace() {
                outcome.stopped = true;
                break;
            }
            let mut room = batch_pages as u64;
            if let Some(left) = budget {
                room = room.min(left);
            }
            if let Some(left) = self.writeback_allowance() {
                room = room.min(left);
            }
            if room == 0 {
                outcome.stopped = true;
                break;
            }
            buffer.clear();
            batch.clear();
            for slot in slots.by_ref() {
                if self.copy_for_writeback(slot, request.mode, &mut buffer, &mut batch) {
                    // `room` is at most the batch size, a usize.
                    #[allow(clippy::cast_possible_truncation)]
                    if batch.len() == room as usize {
                        break;
                    }
                }
            }
            if batch.is_empty() {
                break;
            }
            let objects: Vec<(u64, &[u8])> = batch
                .iter()
                .map(|p| (p.slot as u64, &buffer[p.range.clone()]))
                .collect();
            let offsets = match backing.write_batch(&objects) {
                Ok(offsets) => offsets,
                Err(source) => {
                    outcome.failed += batch.len() as u64;
                    add(&self.counters.local().writeback_failed, batch.len() as u64);
                    self.give_back_after_writeback(&mut outcome);
                    return Err(WritebackError::Write { outcome, source });
                }
            };
            let written =
                self.install_written_back(backing, &batch, &buffer, &offsets, &mut outcome);
            self.charge_writeback_limit(written);
            budget = budget.map(|b| b.saturating_sub(batch.len() as u64));
        }
        self.give_back_after_writeback(&mut outcome);
        Ok(outcome)
    }

    /// Ends a writeback pass: the memory its pages held goes back to the host (compaction)
    /// before the pass returns. The pass never raises mem_used_max: it only moves the guest's
    /// data out of memory.
    fn give_back_after_writeback(&self, outcome: &mut WritebackOutcome) {
        if outcome.written > 0 {
            outcome.pages_given_back = self.compact();
        }
    }

    /// Copies slot `slot`'s object into `buffer` if `mode` selects it; returns whether it did.
    fn copy_for_writeback(
        &self,
        slot: usize,
        mode: WritebackMode,
        buffer: &mut Vec<u8>,
        batch: &mut Vec<InFlight>,
    ) -> bool {
        let wanted = |entry: SlotEntry| {
            (object_class(entry).is_some() || entry.state() == SlotState::Unit)
                && mode.selects(entry)
        };
        // A peek first, so a pass over a mostly unselected table takes no locks.
        if !self.slots.peek(slot).is_some_and(wanted) {
            return false;
        }
        let guard = self.lock(slot);
        let entry = guard.entry();
        if entry.state() == SlotState::Unit && wanted(entry) {
            return self.gather_unit_member(slot, guard, buffer, batch);
        }
        let Some(class) = object_class(entry).filter(|_| wanted(entry)) else {
            return false;
        };
        let len = object_len(entry);
        // SAFETY: we hold the lock of the slot that references the object, so it is live and
        // neither freed nor moved while we copy it.
        let object = unsafe { self.alloc.object(class, entry.handle(), len) };
        let start = buffer.len();
        buffer.extend_from_slice(object);
        drop(guard);
        batch.push(InFlight {
            slot,
            entry,
            range: start..start + len,
            unit_nonce: None,
        });
        true
    }

    /// [`copy_for_writeback`](Self::copy_for_writeback) for a member of a unit: the page leaves its unit for the
    /// file, compressed on its own with the primary algorithm (raw when it does not shrink),
    /// so that reading it back needs nothing but its record.
    fn gather_unit_member(
        &self,
        slot: usize,
        guard: super::slot::SlotGuard<'_>,
        buffer: &mut Vec<u8>,
        batch: &mut Vec<InFlight>,
    ) -> bool {
        let entry = guard.entry();
        let mut page = [0u8; PAGE_SIZE];
        if self
            .read_unit_member(slot as u64, entry, &mut page)
            .is_err()
        {
            return false;
        }
        // SAFETY: we hold the lock of a slot naming the head.
        let Some(nonce) = (unsafe { self.unit_head(entry) }).map(|head| head.nonce) else {
            return false;
        };
        drop(guard);
        let start = buffer.len();
        buffer.resize(start + COMPRESS_BUFFER, 0);
        let len = match self.codec.compress(&page, &mut buffer[start..]) {
            Ok(len @ 1..=HUGE_THRESHOLD) => len,
            Ok(_) | Err(_) => {
                buffer[start..start + PAGE_SIZE].copy_from_slice(&page);
                PAGE_SIZE
            }
        };
        buffer.truncate(start + len);
        batch.push(InFlight {
            slot,
            entry,
            range: start..start + len,
            unit_nonce: Some(nonce),
        });
        true
    }

    /// Points each page of a written batch at the file if it still holds the object that was
    /// written; releases the file copy of the others. Returns the pages installed.
    fn install_written_back(
        &self,
        backing: &BackingFile,
        batch: &[InFlight],
        buffer: &[u8],
        offsets: &[u64],
        outcome: &mut WritebackOutcome,
    ) -> u64 {
        let c = self.counters.local();
        let mut installed = 0;
        for (page, &offset) in batch.iter().zip(offsets) {
            let len = page.range.len();
            let mut guard = self.lock(page.slot);
            let current = guard.entry();
            let unchanged = current.same_object(page.entry)
                && offset <= MAX_BACKING_OFFSET
                && match page.unit_nonce {
                    // The same head holding the same unit (a nonce names one unit's content).
                    Some(nonce) => {
                        // SAFETY: we hold the lock of a slot naming the head.
                        let head = unsafe { self.unit_head(current) };
                        head.is_some_and(|head| head.nonce == nonce)
                    }
                    None => object_class(current).is_some_and(|class| {
                        // SAFETY: we hold the slot lock of the slot referencing the object.
                        let object = unsafe { self.alloc.object(class, current.handle(), len) };
                        object == &buffer[page.range.clone()]
                    }),
                };
            if !unchanged {
                drop(guard);
                release(backing, offset, len);
                outcome.superseded += 1;
                add(&c.writeback_superseded, 1);
                continue;
            }
            let priority = match current.state() {
                SlotState::Compressed => current.priority(),
                // A unit's member went compressed by the primary algorithm, or raw.
                SlotState::Unit
                | SlotState::Empty
                | SlotState::SameFilled
                | SlotState::Huge
                | SlotState::WrittenBack
                | SlotState::Pending
                | SlotState::Invalid => 0,
            };
            let new = SlotEntry::written_back(offset, len).with_priority(priority);
            let swapped = guard.swap(new);
            drop(guard);
            self.account_swap(swapped, new);
            outcome.written += 1;
            outcome.bytes += len as u64;
            installed += 1;
        }
        add(&c.written_back, installed);
        installed
    }

    /// Pages writeback may still write, if limited.
    fn writeback_allowance(&self) -> Option<u64> {
        *self
            .writeback_limit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn charge_writeback_limit(&self, pages: u64) {
        let mut state = self
            .writeback_limit
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(left) = state.as_mut() {
            *left = left.saturating_sub(pages);
        }
    }

    /// Reads a written-back page's object from the file and regenerates the page, with the
    /// slot locked: the fallback of [`PageStore::read_locked`], whose caller holds the lock,
    /// so the object's file range stays allocated meanwhile.
    pub(super) fn read_back(
        &self,
        index: u64,
        entry: SlotEntry,
        page: &mut [u8; PAGE_SIZE],
    ) -> Result<(), StoreError> {
        let Some(backing) = &self.backing else {
            return Err(StoreError::UnsupportedState {
                index,
                state: SlotState::WrittenBack,
            });
        };
        let (offset, len) = entry.backing_object();
        self.regenerate(index, entry, page, |object| {
            backing.read(offset, len, index, object)
        })
    }

    /// Reads a written-back page's pinned object from the file and regenerates the page; no
    /// slot lock is needed (see [`PageStore::read_locked`]).
    pub(super) fn read_back_pinned(
        &self,
        index: u64,
        entry: SlotEntry,
        pin: &PinnedObject<'_>,
        page: &mut [u8; PAGE_SIZE],
    ) -> Result<(), StoreError> {
        self.regenerate(index, entry, page, |object| pin.read(index, object))
    }

    /// Reads the object of WrittenBack `entry` with `read` and regenerates its page: a raw
    /// page is read straight into `page`, a compressed object into a per-thread buffer and
    /// decompressed with the algorithm the entry's priority names.
    fn regenerate(
        &self,
        index: u64,
        entry: SlotEntry,
        page: &mut [u8; PAGE_SIZE],
        read: impl FnOnce(&mut [u8]) -> Result<(), BackingError>,
    ) -> Result<(), StoreError> {
        let (_, len) = entry.backing_object();
        if len == PAGE_SIZE {
            return read(page).map_err(|source| StoreError::Backing { index, source });
        }
        READ_SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let object = &mut scratch[..len];
            read(object).map_err(|source| StoreError::Backing { index, source })?;
            let codec = self
                .codec_of(entry.priority())
                .map_err(|source| StoreError::Corrupt { index, source })?;
            codec
                .decompress(object, page)
                .map_err(|source| StoreError::Corrupt { index, source })
        })
    }

    /// Releases the file range of a WrittenBack entry no slot references any more.
    pub(super) fn release_written_back(&self, entry: SlotEntry) {
        if let Some(backing) = &self.backing {
            let (offset, len) = entry.backing_object();
            release(backing, offset, len);
        }
    }

    /// The writeback section of the statistics.
    pub(super) fn writeback_stats(&self) -> WritebackStats {
        let c = &self.counters;
        let limit = self.writeback_allowance();
        let Some(backing) = &self.backing else {
            return WritebackStats::default();
        };
        let file = backing.stats();
        WritebackStats {
            enabled: true,
            bd_count: file.blocks_used,
            bd_reads: file.reads,
            bd_writes: file.writes,
            pages_on_file: c.sum(|c| &c.pages_on_file),
            live_bytes: file.live_bytes,
            file_disk_bytes: backing.disk_bytes(),
            pages_written_back: c.sum(|c| &c.written_back),
            failed_writebacks: c.sum(|c| &c.writeback_failed),
            failed_file_writes: file.failed_writes,
            superseded: c.sum(|c| &c.writeback_superseded),
            write_calls: file.write_calls,
            punched_blocks: file.punched_blocks,
            passes: c.sum(|c| &c.writeback_passes),
            limit_enabled: limit.is_some(),
            limit_pages: limit.unwrap_or(0),
        }
    }

    /// Checks the file's allocator against the WrittenBack entries of the table.
    pub(super) fn check_backing(&self, written_back: &[(u64, usize)]) -> Result<(), String> {
        match &self.backing {
            Some(backing) => backing.check_consistency(&mut written_back.iter().copied()),
            None if written_back.is_empty() => Ok(()),
            None => Err(format!(
                "{} pages are written back in a store without a backing file",
                written_back.len()
            )),
        }
    }
}

/// Releases an object's file range. The store releases only ranges it got from the file and
/// still owns, so a refusal is a bug: it is logged, and the blocks stay allocated (space is
/// lost, never data).
fn release(backing: &BackingFile, offset: u64, len: usize) {
    if let Err(error) = backing.release(offset, len) {
        log::error!("the backing file refused to release {len} bytes at {offset}: {error}");
    }
}

thread_local! {
    /// Each thread's buffer for objects read back from the file.
    static READ_SCRATCH: std::cell::RefCell<Box<[u8; PAGE_SIZE]>> =
        std::cell::RefCell::new(Box::new([0; PAGE_SIZE]));
}
