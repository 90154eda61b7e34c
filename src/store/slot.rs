// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The slot table: one 8-byte entry per page of the device.
//!
//! zram spends 16 bytes a slot (a handle, a word of flags, size and lock bit, an access time);
//! we pack the same facts into one `AtomicU64`, which is also the slot's lock:
//!
//! ```text
//!  63                                            8 7 6 5 4 3     1 0
//! +-----------------------------------------------+-+-+-+-+-------+-+
//! |                  payload (56 bits)            | P |I|D| state |L|
//! +-----------------------------------------------+-+-+-+-+-------+-+
//! L  lock bit (bit 0): held while a thread reads or changes the slot
//! state (bits 1-3): Empty, SameFilled, Compressed, Huge, WrittenBack, Pending, Unit
//! D  idle (bit 4): set by `idle all` or `idle --age`, cleared when the page is read or written
//! I  incompressible (bit 5): no secondary algorithm shrank the page; recompression skips it
//! P  priority (bits 6-7): the algorithm holding a Compressed page, 0 the primary, 1-3 a
//!    secondary (recompression) algorithm
//!
//! payload by state:
//!   Empty        0
//!   SameFilled   the fill word's encoding (see same_fill.rs)
//!   Compressed   size (bits 8-19, 1..=4095 bytes) | age (bits 20-26) | handle (bits 27-63)
//!   Huge         0 (bits 8-19)                     | age (bits 20-26) | handle (bits 27-63)
//!                the object is a raw 4 KiB page
//!   WrittenBack  length - 1 (bits 8-19, 1..=4096 bytes) | byte offset in the backing file
//!                (bits 20-63, 44 bits); 4096 bytes is a raw page, fewer a compressed object
//!                of the algorithm P names
//!   Pending      pool buffer (bits 8-31, 24 bits) | buffer generation << 24 (bits 32-63)
//!   Unit         head class (bits 8-15) | member index (bits 16-19) | age (bits 20-26) |
//!                head handle (bits 27-63): a member of a multi-page unit (see unit.rs)
//! ```
//!
//! The *age* (7 bits, Compressed, Huge and Unit only) counts ticks of the idle clock since the page
//! was last read or written, saturating at [`MAX_AGE`]: the idle clock adds one to every stored
//! page each tick and an access sets it back to 0. It is how `idle --age SECS` and the
//! automatic writeback find cold pages without an access time in the slot.
//!
//! State value 7 is not used; an entry holding it reads as [`SlotState::Invalid`] and every
//! operation refuses it rather than guessing.
//!
//! Locking: a thread takes a slot's lock bit with a compare-and-swap, spinning briefly and then
//! yielding. Different slots proceed in parallel; the same slot is serialised. A thread holds at
//! most one slot lock at a time (but for [`SlotTable::give_back_empty_pages`], which takes a
//! table page's 512 locks without ever waiting for one, and nothing else meanwhile), and takes the allocator's class locks only inside a slot lock
//! (never the other way round), so the lock order is slot, then class: no deadlock.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

const _: () = assert!(
    std::mem::align_of::<AtomicU64>() == std::mem::align_of::<u64>(),
    "the slot table reinterprets zeroed u64s as AtomicU64s"
);
const _: () = assert!(SLOTS_PER_TABLE_PAGE == 512);

const LOCK: u64 = 1;
const STATE_SHIFT: u32 = 1;
const STATE_MASK: u64 = 0b111 << STATE_SHIFT;
const IDLE: u64 = 1 << 4;
const INCOMPRESSIBLE: u64 = 1 << 5;
const PRIORITY_SHIFT: u32 = 6;
const PRIORITY_MASK: u64 = 0b11 << PRIORITY_SHIFT;

/// The most secondary algorithms a slot can name (priorities 1 to 3), as zram allows.
pub const MAX_SECONDARY: usize = 3;
const PAYLOAD_SHIFT: u32 = 8;
const SIZE_BITS: u32 = 12;
const AGE_BITS: u32 = 7;
/// Where a Compressed or Huge payload keeps its age.
const AGE_SHIFT: u32 = SIZE_BITS;
/// Where a Compressed or Huge payload keeps its handle.
const HANDLE_SHIFT: u32 = SIZE_BITS + AGE_BITS;

/// Bits of a Unit payload that name the head's size class (the 12 bits a Compressed entry
/// keeps its size in hold the class, then the member index).
const UNIT_CLASS_BITS: u32 = 8;
/// The most members a unit can have: a Unit entry names its index in 4 bits.
pub const MAX_UNIT_MEMBERS: usize = 1 << (SIZE_BITS - UNIT_CLASS_BITS);

/// The largest handle a slot can hold (37 bits).
pub const MAX_HANDLE: u64 = (1 << (64 - PAYLOAD_SHIFT - HANDLE_SHIFT)) - 1;
/// The oldest age a slot records, in ticks of the idle clock.
pub const MAX_AGE: u8 = (1 << AGE_BITS) - 1;
/// The largest byte offset a WrittenBack entry can hold (44 bits: 16 TiB).
pub const MAX_BACKING_OFFSET: u64 = (1 << (64 - PAYLOAD_SHIFT - SIZE_BITS)) - 1;
/// The largest payload a slot can hold.
pub const MAX_PAYLOAD: u64 = (1 << (64 - PAYLOAD_SHIFT)) - 1;

/// What a slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// Never written, or discarded: reads as zeros.
    Empty = 0,
    /// A page of one repeated 8-byte word, kept in the entry itself.
    SameFilled = 1,
    /// A compressed object in the allocator.
    Compressed = 2,
    /// A raw page in the allocator's huge class (it did not compress well).
    Huge = 3,
    /// Written back to the backing file: the object (compressed, or a raw page) lies there.
    WrittenBack = 4,
    /// Written by the guest and waiting for a compression worker: the page is held
    /// uncompressed in a buffer of the pending pool.
    Pending = 5,
    /// A member of a multi-page unit: the page is one of the pages a single compressed
    /// object (the unit's head and its pieces) holds.
    Unit = 6,
    /// A state value no version of the store writes (7): corruption, or a damaged entry
    /// recovery found. Never created on purpose but by recovery; refused by every read.
    Invalid = 7,
}

impl SlotState {
    fn from_bits(bits: u64) -> SlotState {
        match bits {
            0 => SlotState::Empty,
            1 => SlotState::SameFilled,
            2 => SlotState::Compressed,
            3 => SlotState::Huge,
            4 => SlotState::WrittenBack,
            5 => SlotState::Pending,
            6 => SlotState::Unit,
            _ => SlotState::Invalid,
        }
    }
}

/// Bits of a Pending payload that name the pool buffer.
const PENDING_BUFFER_BITS: u32 = 24;

/// The most buffers the pending pool may have: a Pending entry names one in 24 bits.
pub const MAX_PENDING_BUFFERS: usize = 1 << PENDING_BUFFER_BITS;

/// A decoded slot entry (without its lock bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotEntry(u64);

impl SlotEntry {
    /// The empty entry.
    pub const EMPTY: SlotEntry = SlotEntry(0);

    /// An entry in `state` with `payload` (at most [`MAX_PAYLOAD`]).
    pub fn new(state: SlotState, payload: u64) -> SlotEntry {
        debug_assert!(payload <= MAX_PAYLOAD);
        SlotEntry(((state as u64) << STATE_SHIFT) | (payload << PAYLOAD_SHIFT))
    }

    /// A compressed object of `size` bytes (1..=4095) at `handle`.
    pub fn compressed(handle: u64, size: usize) -> SlotEntry {
        debug_assert!(handle <= MAX_HANDLE && (1..1 << SIZE_BITS).contains(&size));
        SlotEntry::new(
            SlotState::Compressed,
            (handle << HANDLE_SHIFT) | size as u64,
        )
    }

    /// A raw page at `handle`.
    pub fn huge(handle: u64) -> SlotEntry {
        debug_assert!(handle <= MAX_HANDLE);
        SlotEntry::new(SlotState::Huge, handle << HANDLE_SHIFT)
    }

    /// An object of `len` bytes (1..=4096) at byte `offset` (at most [`MAX_BACKING_OFFSET`])
    /// of the backing file.
    pub fn written_back(offset: u64, len: usize) -> SlotEntry {
        debug_assert!(offset <= MAX_BACKING_OFFSET && (1..=1 << SIZE_BITS).contains(&len));
        SlotEntry::new(
            SlotState::WrittenBack,
            (offset << SIZE_BITS) | (len as u64 - 1),
        )
    }

    /// The byte offset and length of a WrittenBack entry's object in the backing file.
    pub fn backing_object(self) -> (u64, usize) {
        // The mask keeps 12 bits, which always fit.
        #[allow(clippy::cast_possible_truncation)]
        let len = (self.payload() & ((1 << SIZE_BITS) - 1)) as usize + 1;
        (self.payload() >> SIZE_BITS, len)
    }

    /// The age of a Compressed, Huge or Unit entry in idle-clock ticks (0 in other states).
    pub fn age(self) -> u8 {
        match self.state() {
            SlotState::Compressed | SlotState::Huge | SlotState::Unit => {
                // The mask keeps 7 bits.
                #[allow(clippy::cast_possible_truncation)]
                let age = ((self.payload() >> AGE_SHIFT) & u64::from(MAX_AGE)) as u8;
                age
            }
            SlotState::Empty
            | SlotState::SameFilled
            | SlotState::WrittenBack
            | SlotState::Pending
            | SlotState::Invalid => 0,
        }
    }

    /// This entry with age `age` (at most [`MAX_AGE`]); other states have no age and come
    /// back unchanged.
    pub fn with_age(self, age: u8) -> SlotEntry {
        match self.state() {
            SlotState::Compressed | SlotState::Huge | SlotState::Unit => {
                let mask = u64::from(MAX_AGE) << (AGE_SHIFT + PAYLOAD_SHIFT);
                let age = u64::from(age.min(MAX_AGE)) << (AGE_SHIFT + PAYLOAD_SHIFT);
                SlotEntry((self.0 & !mask) | age)
            }
            SlotState::Empty
            | SlotState::SameFilled
            | SlotState::WrittenBack
            | SlotState::Pending
            | SlotState::Invalid => self,
        }
    }

    /// This entry as an access leaves it: idle flag clear, age 0.
    pub fn accessed(self) -> SlotEntry {
        self.with_idle(false).with_age(0)
    }

    /// Whether `self` and `other` name the same stored object: the same state, handle, size and
    /// algorithm, whatever their idle, incompressible and age bits say.
    pub fn same_object(self, other: SlotEntry) -> bool {
        self.with_age(0).same_content(other.with_age(0)) && self.priority() == other.priority()
    }

    /// A page waiting in pending-pool buffer `buffer` (below [`MAX_PENDING_BUFFERS`]) whose
    /// current use is `generation`.
    pub fn pending(buffer: u32, generation: u32) -> SlotEntry {
        debug_assert!((buffer as usize) < MAX_PENDING_BUFFERS);
        SlotEntry::new(
            SlotState::Pending,
            u64::from(buffer) | (u64::from(generation) << PENDING_BUFFER_BITS),
        )
    }

    /// The pool buffer and generation of a Pending entry.
    pub fn pending_buffer(self) -> (u32, u32) {
        let payload = self.payload();
        // Both fields are masked/shifted to at most 32 bits.
        #[allow(clippy::cast_possible_truncation)]
        let fields = (
            (payload & ((1 << PENDING_BUFFER_BITS) - 1)) as u32,
            (payload >> PENDING_BUFFER_BITS) as u32,
        );
        fields
    }

    /// Whether `self` and `other` hold the same content (state and payload), whatever their
    /// idle, incompressible and priority bits say (used on Pending entries, whose priority is
    /// always 0).
    pub fn same_content(self, other: SlotEntry) -> bool {
        let content = !((1u64 << PAYLOAD_SHIFT) - 1) | STATE_MASK;
        self.0 & content == other.0 & content
    }

    /// The state.
    pub fn state(self) -> SlotState {
        SlotState::from_bits((self.0 & STATE_MASK) >> STATE_SHIFT)
    }

    /// The 56-bit payload.
    pub fn payload(self) -> u64 {
        self.0 >> PAYLOAD_SHIFT
    }

    /// The allocator handle of a Compressed or Huge entry, or of a Unit entry's head.
    pub fn handle(self) -> u64 {
        self.payload() >> HANDLE_SHIFT
    }

    /// This Compressed or Huge entry pointing at `handle` instead, its size and flags kept (a
    /// Unit entry: its head moved, its class and index kept).
    pub fn with_handle(self, handle: u64) -> SlotEntry {
        debug_assert!(handle <= MAX_HANDLE);
        let keep = (1u64 << (PAYLOAD_SHIFT + HANDLE_SHIFT)) - 1;
        SlotEntry((self.0 & keep) | (handle << (PAYLOAD_SHIFT + HANDLE_SHIFT)))
    }

    /// The compressed size of a Compressed entry.
    pub fn compressed_size(self) -> usize {
        // The mask keeps 12 bits, which always fit.
        #[allow(clippy::cast_possible_truncation)]
        let size = (self.payload() & ((1 << SIZE_BITS) - 1)) as usize;
        size
    }

    /// Whether the idle flag is set.
    pub fn is_idle(self) -> bool {
        self.0 & IDLE != 0
    }

    /// This entry with the idle flag set or cleared.
    pub fn with_idle(self, idle: bool) -> SlotEntry {
        SlotEntry(if idle { self.0 | IDLE } else { self.0 & !IDLE })
    }

    /// Whether the incompressible flag is set.
    pub fn is_incompressible(self) -> bool {
        self.0 & INCOMPRESSIBLE != 0
    }

    /// This entry with the incompressible flag set or cleared.
    pub fn with_incompressible(self, flag: bool) -> SlotEntry {
        SlotEntry(if flag {
            self.0 | INCOMPRESSIBLE
        } else {
            self.0 & !INCOMPRESSIBLE
        })
    }

    /// The priority of the algorithm that holds a Compressed page: 0 the primary, 1 to
    /// [`MAX_SECONDARY`] a secondary one. Always 0 in other states.
    pub fn priority(self) -> usize {
        // Two bits.
        #[allow(clippy::cast_possible_truncation)]
        let priority = ((self.0 & PRIORITY_MASK) >> PRIORITY_SHIFT) as usize;
        priority
    }

    /// This entry held by the algorithm of `priority` (at most [`MAX_SECONDARY`]).
    pub fn with_priority(self, priority: usize) -> SlotEntry {
        debug_assert!(priority <= MAX_SECONDARY);
        SlotEntry((self.0 & !PRIORITY_MASK) | ((priority as u64 & 0b11) << PRIORITY_SHIFT))
    }

    /// Member `member` (below [`MAX_UNIT_MEMBERS`]) of the unit whose head is object
    /// `handle` of size class `class` (below 256).
    pub fn unit_member(class: usize, handle: u64, member: usize) -> SlotEntry {
        debug_assert!(handle <= MAX_HANDLE && class < 1 << UNIT_CLASS_BITS);
        debug_assert!(member < MAX_UNIT_MEMBERS);
        SlotEntry::new(
            SlotState::Unit,
            (handle << HANDLE_SHIFT) | ((member as u64) << UNIT_CLASS_BITS) | class as u64,
        )
    }

    /// The size class of a Unit entry's head object.
    pub fn unit_class(self) -> usize {
        // Eight bits.
        #[allow(clippy::cast_possible_truncation)]
        let class = (self.payload() & ((1 << UNIT_CLASS_BITS) - 1)) as usize;
        class
    }

    /// The index of a Unit entry's page in its unit.
    pub fn unit_index(self) -> usize {
        // Four bits.
        #[allow(clippy::cast_possible_truncation)]
        let member = ((self.payload() >> UNIT_CLASS_BITS)
            & ((1 << (SIZE_BITS - UNIT_CLASS_BITS)) - 1)) as usize;
        member
    }

    /// The raw bits (lock bit clear).
    #[cfg(test)]
    pub fn bits(self) -> u64 {
        self.0
    }
}

/// Slots on one page of the table (4096 / 8).
pub const SLOTS_PER_TABLE_PAGE: usize = crate::PAGE_SIZE / 8;

/// The table of slots, one per page of the device.
///
/// The table is reserved address space (an anonymous `MAP_NORESERVE` mapping, or a state
/// file's sparse slot-table region) whose pages the kernel supplies only when first written,
/// and a *touched* bitmap with one bit per table page. Invariant: every slot holding a
/// non-Empty entry lies on a touched page. A page becomes touched when a slot on it is given a
/// non-Empty entry, under that slot's lock and before the lock is released
/// ([`SlotGuard::swap`], and recovery); it stops being touched only in
/// [`SlotTable::give_back_empty_pages`], which holds all the page's slot locks while it clears
/// the bit and gives the page back. Scans visit touched pages only
/// ([`SlotTable::touched_slots`]), so an idle clock tick or a compaction on a large, mostly
/// empty device costs what is stored, not the device's size; a read of a slot on an untouched
/// page reads zeros without touching the table at all.
#[derive(Debug)]
pub struct SlotTable {
    /// The mapping the entries live in, at least `len` eight-byte entries long.
    memory: super::alloc::Segment,
    len: usize,
    /// One bit per table page: set while a slot on the page may be non-Empty.
    touched: Box<[AtomicU64]>,
    /// Table pages whose touched bit is set.
    touched_pages: AtomicUsize,
}

impl SlotTable {
    /// A table of `pages` slots in `memory`, a state file's slot-table region (its entries
    /// kept as they are: recovery reads them, after marking the populated parts touched with
    /// [`SlotTable::mark_populated`]).
    pub(crate) fn in_memory(pages: usize, memory: super::alloc::Segment) -> Option<SlotTable> {
        (memory.len() >= pages * 8).then(|| SlotTable::on(memory, pages))
    }

    fn on(memory: super::alloc::Segment, len: usize) -> SlotTable {
        let words = len.div_ceil(SLOTS_PER_TABLE_PAGE).div_ceil(64);
        SlotTable {
            memory,
            len,
            touched: (0..words).map(|_| AtomicU64::new(0)).collect(),
            touched_pages: AtomicUsize::new(0),
        }
    }

    fn slots(&self) -> &[AtomicU64] {
        // SAFETY: the mapping is page-aligned, at least `len` eight-byte entries long, and
        // lives as long as `self`; AtomicU64 has u64's size and alignment and every bit
        // pattern is valid; the mapping's other users (the kernel zeroing a page we give back,
        // other mappings of the same state file) never tear an aligned eight-byte word.
        unsafe { std::slice::from_raw_parts(self.memory.base().cast::<AtomicU64>(), self.len) }
    }

    /// Recovery: clears the lock bit a killed process left in slot `index` and returns the
    /// entry. Only for a table no other thread uses yet, on a touched page.
    pub(crate) fn recover_entry(&self, index: usize) -> Option<SlotEntry> {
        let slot = self.slots().get(index)?;
        let bits = slot.load(Ordering::Relaxed);
        if bits & LOCK != 0 {
            slot.store(bits & !LOCK, Ordering::Relaxed);
        }
        Some(SlotEntry(bits & !LOCK))
    }

    /// Recovery: replaces slot `index`'s entry (no other thread uses the table yet).
    pub(crate) fn recover_set(&self, index: usize, entry: SlotEntry) {
        if let Some(slot) = self.slots().get(index) {
            if entry != SlotEntry::EMPTY {
                self.touch(index);
            }
            slot.store(entry.0, Ordering::Release);
        }
    }

    /// Recovery: marks touched every table page overlapping the byte ranges of the table
    /// (offsets from its start) that hold data, as `SEEK_DATA` finds them in the state file.
    /// Only for a table no other thread uses yet.
    pub(crate) fn mark_populated(&self, ranges: &[Range<u64>]) {
        let page_bytes = (SLOTS_PER_TABLE_PAGE * 8) as u64;
        let pages = self.len.div_ceil(SLOTS_PER_TABLE_PAGE) as u64;
        for range in ranges {
            let first = range.start / page_bytes;
            let end = range.end.div_ceil(page_bytes).min(pages);
            for page in first..end {
                // Below `pages`, which fits a usize.
                #[allow(clippy::cast_possible_truncation)]
                self.touch(page as usize * SLOTS_PER_TABLE_PAGE);
            }
        }
    }

    /// A table of `pages` empty slots; panics if the address space cannot be reserved.
    #[cfg(test)]
    pub fn new(pages: usize) -> SlotTable {
        SlotTable::reserve(pages).expect("the slot table's address space")
    }

    /// A table of `pages` empty slots, or the error the OS gave for its reservation.
    pub(crate) fn reserve(pages: usize) -> Result<SlotTable, super::alloc::AllocError> {
        let bytes = pages
            .max(1)
            .checked_mul(8)
            .and_then(|b| b.checked_next_multiple_of(crate::PAGE_SIZE))
            .ok_or(super::alloc::AllocError::OutOfMemory { bytes: usize::MAX })?;
        // A reservation, not memory: the kernel supplies each page of the table when a slot
        // on it is first written, and takes it back when `give_back_empty_pages` does.
        let memory = super::alloc::Segment::map(bytes)?;
        Ok(SlotTable::on(memory, pages))
    }

    /// Marks the table page of slot `index` touched (the slot is about to hold a non-Empty
    /// entry). Reads the bit first: the shared word is written once per page, not per write.
    fn touch(&self, index: usize) {
        let page = index / SLOTS_PER_TABLE_PAGE;
        let (word, bit) = (&self.touched[page / 64], 1u64 << (page % 64));
        // Acquire: see "Giving back" in `give_back_empty_pages` for why a stale set bit is
        // never read here.
        if word.load(Ordering::Acquire) & bit == 0
            && word.fetch_or(bit, Ordering::AcqRel) & bit == 0
        {
            self.touched_pages.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether slot `index`'s table page is touched (if not, the slot is Empty).
    pub fn is_touched(&self, index: usize) -> bool {
        let page = index / SLOTS_PER_TABLE_PAGE;
        self.touched
            .get(page / 64)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (page % 64)) != 0)
    }

    /// The slots of `range` that lie on touched table pages, in order, as one range per page:
    /// every slot of `range` that holds a non-Empty entry is in one (a slot filled while the
    /// iteration runs may be missed, as any scan may miss a concurrent write).
    pub fn touched_ranges(&self, range: Range<usize>) -> TouchedRanges<'_> {
        let end = range.end.min(self.len);
        TouchedRanges {
            table: self,
            page: range.start / SLOTS_PER_TABLE_PAGE,
            end_page: end.div_ceil(SLOTS_PER_TABLE_PAGE),
            range: range.start..end,
        }
    }

    /// Every slot index of `range` on a touched table page, in order (see
    /// [`SlotTable::touched_ranges`]).
    pub fn touched_slots(&self, range: Range<usize>) -> impl Iterator<Item = usize> + '_ {
        self.touched_ranges(range).flatten()
    }

    /// Checks the table's invariant where it can be broken unseen: every resident page that
    /// is not touched holds only Empty, unlocked entries. (Pages that are not resident read
    /// as zeros; `mincore` finds the resident ones, so a state file's holes are not read.)
    pub fn check_untouched_empty(&self) -> Result<(), String> {
        const BATCH: usize = 1 << 16;
        let slots = self.slots();
        let pages = self.len.div_ceil(SLOTS_PER_TABLE_PAGE);
        let mut resident = vec![0u8; BATCH.min(pages)];
        for first in (0..pages).step_by(BATCH) {
            let count = BATCH.min(pages - first);
            // SAFETY: the range is `count` whole pages inside the mapping (rounded up to a
            // page), page-aligned; `resident` has a byte for each.
            let ok = unsafe {
                libc::mincore(
                    slots
                        .as_ptr()
                        .add(first * SLOTS_PER_TABLE_PAGE)
                        .cast_mut()
                        .cast(),
                    count * crate::PAGE_SIZE,
                    resident.as_mut_ptr(),
                )
            } == 0;
            if !ok {
                return Err(format!(
                    "mincore failed on the slot table: {}",
                    std::io::Error::last_os_error()
                ));
            }
            for (i, &r) in resident[..count].iter().enumerate() {
                let page = first + i;
                if r & 1 == 0 || self.is_touched(page * SLOTS_PER_TABLE_PAGE) {
                    continue;
                }
                let start = page * SLOTS_PER_TABLE_PAGE;
                let end = (start + SLOTS_PER_TABLE_PAGE).min(self.len);
                if let Some(slot) = (start..end).find(|&s| slots[s].load(Ordering::Relaxed) != 0) {
                    return Err(format!(
                        "slot {slot} holds {:#x} on table page {page}, which is not touched",
                        slots[slot].load(Ordering::Relaxed)
                    ));
                }
            }
        }
        Ok(())
    }

    /// Gives back every touched table page whose entries are all Empty and unlocked: clears
    /// its touched bit and returns its memory to the OS (`MADV_DONTNEED`; out of the state
    /// file with `MADV_REMOVE`). A page with a locked or non-Empty slot is kept. Returns the
    /// pages given back. Runs concurrently with every other use of the table.
    ///
    /// Giving back: the page's 512 slot locks are taken (compare-and-swap 0 → LOCK, so only
    /// Empty unlocked slots; one failure releases those taken and skips the page), then the
    /// touched bit is cleared, then the page is zapped. Zapping zeroes the entries, which
    /// also releases the locks we hold: a thread spinning for one of them next reads 0 (Empty,
    /// unlocked) and takes it, which is correct, since the slot is Empty. Such a thread reaches
    /// the zeroed word only through a page fault on the page table entry the zap removed; the
    /// kernel installs the new page under the page-table lock the zap took after our
    /// `fetch_and`, so the thread's later Acquire load of the touched bit in `touch` sees it
    /// clear, and sets it again before it publishes a non-Empty entry. A page that could not be
    /// zapped (hugetlbfs refuses 4 KiB) keeps its touched bit and is unlocked by hand.
    pub fn give_back_empty_pages(&self) -> u64 {
        let slots = self.slots();
        let mut given = 0;
        let pages = self
            .touched_ranges(0..self.len)
            .map(|r| r.start / SLOTS_PER_TABLE_PAGE);
        for page in pages {
            let first = page * SLOTS_PER_TABLE_PAGE;
            // Only whole pages of the mapping: the last one may be partly past `len`, and
            // the bytes past `len` are never written, so they are zero too.
            let entries = &slots[first..(first + SLOTS_PER_TABLE_PAGE).min(self.len)];
            if entries.iter().any(|e| e.load(Ordering::Relaxed) != 0) {
                continue;
            }
            let locked = entries
                .iter()
                .take_while(|e| {
                    e.compare_exchange(0, LOCK, Ordering::Acquire, Ordering::Relaxed)
                        .is_ok()
                })
                .count();
            if locked < entries.len() {
                for e in &entries[..locked] {
                    e.store(0, Ordering::Release);
                }
                continue;
            }
            let (word, bit) = (&self.touched[page / 64], 1u64 << (page % 64));
            word.fetch_and(!bit, Ordering::SeqCst);
            // SAFETY: the page lies inside the mapping (pages are whole: the mapping is
            // rounded up to a page, and a state file's region to 2 MiB), and every entry on it
            // is ours: we hold all its locks and each is Empty, so zeroing it loses nothing.
            let zapped = unsafe {
                self.memory.discard_checked(
                    slots.as_ptr().add(first).cast_mut().cast(),
                    crate::PAGE_SIZE,
                )
            };
            if zapped {
                self.touched_pages.fetch_sub(1, Ordering::Relaxed);
                given += 1;
            } else {
                word.fetch_or(bit, Ordering::SeqCst);
                for e in entries {
                    e.store(0, Ordering::Release);
                }
            }
        }
        given
    }

    /// The number of slots.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The bytes the table holds from the OS: its touched pages and the bitmap. (A page can
    /// be resident and untouched only while its touch is in flight, or after a read of a
    /// state file's hole; a touched page is always resident.)
    pub fn bytes(&self) -> usize {
        self.touched_pages.load(Ordering::Relaxed) * crate::PAGE_SIZE
            + std::mem::size_of_val(&*self.touched)
    }

    /// The bytes reserved for the table (8 a slot): what it holds when every page is used.
    #[cfg(test)]
    pub fn reserved_bytes(&self) -> usize {
        self.len * 8
    }

    /// Reads slot `index` without locking it (a snapshot that may change at once). A slot on
    /// an untouched page is Empty and is not read (reading a state file's hole would
    /// allocate it).
    pub fn peek(&self, index: usize) -> Option<SlotEntry> {
        let slot = self.slots().get(index)?;
        if !self.is_touched(index) {
            return Some(SlotEntry::EMPTY);
        }
        Some(SlotEntry(slot.load(Ordering::Relaxed) & !LOCK))
    }

    /// One tick of the idle clock for slot `index`: adds one to the age of a Compressed or
    /// Huge entry (saturating at [`MAX_AGE`]) with one compare-and-swap, without taking the
    /// lock. A slot that is locked or changes meanwhile is left alone (it is being accessed,
    /// so it is not getting older). Returns the new age, if it aged.
    pub fn age(&self, index: usize) -> Option<u8> {
        let slot = self.slots().get(index)?;
        if !self.is_touched(index) {
            return None;
        }
        let current = slot.load(Ordering::Relaxed);
        if current & LOCK != 0 {
            return None;
        }
        let entry = SlotEntry(current);
        let age = entry.age();
        let ages = matches!(
            entry.state(),
            SlotState::Compressed | SlotState::Huge | SlotState::Unit
        );
        if !ages || age == MAX_AGE {
            return None;
        }
        let older = entry.with_age(age + 1);
        slot.compare_exchange(current, older.0, Ordering::Relaxed, Ordering::Relaxed)
            .ok()
            .map(|_| age + 1)
    }

    /// Locks slot `index`, or returns `None` when it is out of range.
    pub fn lock(&self, index: usize) -> Option<SlotGuard<'_>> {
        let slot = self.slots().get(index)?;
        let mut spins = 0u32;
        loop {
            let current = slot.load(Ordering::Relaxed);
            if current & LOCK == 0
                && slot
                    .compare_exchange_weak(
                        current,
                        current | LOCK,
                        Ordering::Acquire,
                        Ordering::Relaxed,
                    )
                    .is_ok()
            {
                return Some(SlotGuard {
                    table: self,
                    index,
                    slot,
                    entry: SlotEntry(current),
                });
            }
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// A locked slot; dropping it stores the (possibly changed) entry and releases the lock.
#[derive(Debug)]
pub struct SlotGuard<'a> {
    table: &'a SlotTable,
    index: usize,
    slot: &'a AtomicU64,
    entry: SlotEntry,
}

impl SlotGuard<'_> {
    /// The entry as of now.
    pub fn entry(&self) -> SlotEntry {
        self.entry
    }

    /// Changes the entry's flags (idle, incompressible, age) and nothing else: the entry keeps
    /// referencing what it did. Published when the guard drops.
    pub fn set_flags(&mut self, entry: SlotEntry) {
        debug_assert!(
            self.entry.same_object(entry) || self.entry.same_content(entry),
            "set_flags changed what slot entry {:?} references (to {entry:?})",
            self.entry
        );
        self.entry = entry;
    }

    /// Marks the slot's table page touched although the slot may stay Empty: taking the lock
    /// wrote to the page, so it may be resident now, and a touched page is one compaction
    /// looks at and gives back once it is all Empty (the invariant only needs non-Empty slots
    /// on touched pages, so marking more is always allowed).
    pub fn touch_page(&self) {
        self.table.touch(self.index);
    }

    /// Swaps in `new` (published when the guard drops) and returns the old entry, with the
    /// allocator object it referenced as a [`StaleObject`] when `new` does not reference the
    /// same one: the only place a safely made `StaleObject` comes from.
    pub fn swap(&mut self, new: SlotEntry) -> Swapped {
        if new != SlotEntry::EMPTY {
            // Under the lock, before the unlock publishes `new` (SlotTable's invariant).
            self.table.touch(self.index);
        }
        let old = std::mem::replace(&mut self.entry, new);
        let stale = super::object_class(old)
            .filter(|&class| {
                super::object_class(new) != Some(class) || new.handle() != old.handle()
            })
            .map(|class| StaleObject {
                class,
                handle: old.handle(),
            });
        Swapped { old, stale }
    }
}

/// What [`SlotGuard::swap`] took out of the slot.
#[derive(Debug)]
#[must_use = "the old entry must be accounted for and its stale object freed"]
pub struct Swapped {
    /// The entry the slot held before.
    pub old: SlotEntry,
    /// `old`'s allocator object, if the new entry no longer references it.
    pub stale: Option<StaleObject>,
}

/// An allocator object that no slot references any more (the slot swap that orphaned it
/// made this token), waiting to be freed: by
/// [`SlabAllocator::free_stale`](super::alloc::SlabAllocator::free_stale), which consumes it.
///
/// The token is the object's ownership: it is neither `Clone` nor `Copy`, so it is freed at
/// most once, and a slot swap hands out each object it removes once. It may travel (in a
/// worker's job, past a slot lock) before it is freed; nothing may read the object
/// meanwhile, and nothing does: every reader of an object holds the lock of the slot naming
/// it. Dropping a token without freeing it leaks the object (a debug build panics).
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a stale object leaks unless it is freed with SlabAllocator::free_stale"]
pub struct StaleObject {
    class: usize,
    handle: u64,
}

impl StaleObject {
    /// The token for the object of `entry`, an entry that was never published in a slot
    /// (its object was allocated for a slot that no longer wanted it); `None` if the entry
    /// references no allocator object.
    ///
    /// # Safety
    /// `entry`'s object must be owned by the caller: allocated by it, never published in a
    /// slot, and not turned into a token before.
    pub unsafe fn unpublished(entry: SlotEntry) -> Option<StaleObject> {
        super::object_class(entry).map(|class| StaleObject {
            class,
            handle: entry.handle(),
        })
    }

    /// The token for object `handle` of `class`, a part (head or piece) of a multi-page unit
    /// whose last member has left it.
    ///
    /// # Safety
    /// The object must be owned by the caller: no slot names the unit any more, and no other
    /// token for it exists or will be made.
    pub unsafe fn unit_part(class: usize, handle: u64) -> StaleObject {
        StaleObject { class, handle }
    }

    /// The object's size class and handle, giving the token up (its consumer frees it).
    pub(super) fn into_parts(self) -> (usize, u64) {
        let parts = (self.class, self.handle);
        std::mem::forget(self);
        parts
    }
}

impl Drop for StaleObject {
    fn drop(&mut self) {
        // A token is consumed by `into_parts`; dropping one leaks its object.
        if !std::thread::panicking() {
            debug_assert!(
                false,
                "stale object {} of class {} dropped without being freed",
                self.handle, self.class
            );
            log::error!(
                "stale object {} of class {} was dropped without being freed: its memory leaks",
                self.handle,
                self.class
            );
        }
    }
}

/// The touched table pages of a range, as ranges of slot indices (see
/// [`SlotTable::touched_ranges`]).
#[derive(Debug)]
pub struct TouchedRanges<'a> {
    table: &'a SlotTable,
    /// The next table page to look at.
    page: usize,
    end_page: usize,
    range: Range<usize>,
}

impl Iterator for TouchedRanges<'_> {
    type Item = Range<usize>;

    fn next(&mut self) -> Option<Range<usize>> {
        while self.page < self.end_page {
            let word = self.page / 64;
            let bits = self.table.touched[word].load(Ordering::Acquire) >> (self.page % 64);
            if bits == 0 {
                self.page = (word + 1) * 64;
                continue;
            }
            let page = self.page + bits.trailing_zeros() as usize;
            if page >= self.end_page {
                break;
            }
            self.page = page + 1;
            let start = (page * SLOTS_PER_TABLE_PAGE).max(self.range.start);
            let end = ((page + 1) * SLOTS_PER_TABLE_PAGE).min(self.range.end);
            return Some(start..end);
        }
        self.page = self.end_page;
        None
    }
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.slot.store(self.entry.0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::alloc::{class_of, SlabAllocator, HUGE_CLASS};
    use std::sync::Arc;

    #[test]
    fn a_swap_hands_out_each_orphaned_object_once_and_freeing_consumes_it() {
        let alloc = SlabAllocator::new();
        let table = SlotTable::new(1);
        let class = class_of(100);
        let used = |a: &SlabAllocator| {
            let stats = a.class_stats();
            (stats[class].used_objects, stats[HUGE_CLASS].used_objects)
        };
        let first = alloc.store(class, &[1; 100], None).unwrap();
        let second = alloc.store(HUGE_CLASS, &[2; 4096], None).unwrap();
        assert_eq!(used(&alloc), (1, 1));

        let mut guard = table.lock(0).unwrap();
        let swapped = guard.swap(SlotEntry::compressed(first, 100));
        assert_eq!(swapped.old, SlotEntry::EMPTY);
        assert!(swapped.stale.is_none(), "an empty slot orphans nothing");
        let aged = guard.entry().with_idle(true).with_age(5);
        guard.set_flags(aged);
        let swapped = guard.swap(aged.accessed());
        assert!(
            swapped.stale.is_none(),
            "a swap to the same object orphans nothing"
        );
        let swapped = guard.swap(SlotEntry::huge(second));
        drop(guard);
        assert_eq!(swapped.old.handle(), first);
        let stale = swapped.stale.expect("the first object is orphaned");
        assert_eq!(
            used(&alloc),
            (1, 1),
            "nothing is freed before the token is consumed"
        );
        assert!(alloc.free_stale(stale) > 0, "its chunk emptied");
        assert_eq!(
            used(&alloc),
            (0, 1),
            "the orphaned object is freed, and only it"
        );

        let swapped = table.lock(0).unwrap().swap(SlotEntry::EMPTY);
        let stale = swapped.stale.expect("a discard orphans the huge object");
        alloc.free_stale(stale);
        assert_eq!(used(&alloc), (0, 0));
        alloc.check_consistency(&|_| Vec::new()).unwrap();

        let third = alloc.store(class, &[3; 100], None).unwrap();
        // SAFETY: `third` was allocated above and never published.
        let stale = unsafe { StaleObject::unpublished(SlotEntry::compressed(third, 100)) };
        alloc.free_stale(stale.expect("a compressed entry has an object"));
        assert_eq!(used(&alloc), (0, 0));
        let same = SlotEntry::new(SlotState::SameFilled, 1);
        // SAFETY: a same-filled entry has no object to own.
        let none = unsafe { StaleObject::unpublished(same) };
        assert!(none.is_none());
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "dropped without being freed")]
    fn a_stale_object_dropped_unfreed_is_caught_in_debug_builds() {
        let table = SlotTable::new(1);
        drop(table.lock(0).unwrap().swap(SlotEntry::huge(7)));
        let swapped = table.lock(0).unwrap().swap(SlotEntry::EMPTY);
        drop(swapped);
    }

    #[test]
    fn compressed_entry_roundtrips_handle_and_size() {
        let e = SlotEntry::compressed(MAX_HANDLE, 4095);
        assert_eq!(e.state(), SlotState::Compressed);
        assert_eq!(e.handle(), MAX_HANDLE);
        assert_eq!(e.compressed_size(), 4095);
        let e = e.with_idle(true).with_incompressible(true);
        assert!(e.is_idle() && e.is_incompressible());
        assert_eq!((e.handle(), e.compressed_size()), (MAX_HANDLE, 4095));
        assert_eq!(e.with_idle(false).state(), SlotState::Compressed);
        let e = e.with_priority(3);
        assert_eq!(
            (e.priority(), e.handle(), e.compressed_size()),
            (3, MAX_HANDLE, 4095)
        );
        assert!(e.is_idle() && e.is_incompressible());
        let moved = e.with_handle(7);
        assert_eq!((moved.handle(), moved.compressed_size()), (7, 4095));
        assert!(moved.is_idle() && moved.is_incompressible());
        assert_eq!(moved.priority(), 3);
        assert_eq!(moved.with_priority(1).priority(), 1);
        assert!(moved.with_idle(false).same_content(moved.with_priority(0)));
        assert_eq!(SlotEntry::huge(9).with_handle(3), SlotEntry::huge(3));
    }

    #[test]
    fn age_is_kept_apart_from_handle_size_and_flags() {
        let e = SlotEntry::compressed(MAX_HANDLE, 3632)
            .with_priority(2)
            .with_idle(true);
        let old = e.with_age(MAX_AGE);
        assert_eq!(old.age(), MAX_AGE);
        assert_eq!((old.handle(), old.compressed_size()), (MAX_HANDLE, 3632));
        assert_eq!((old.priority(), old.is_idle()), (2, true));
        assert!(old.same_object(e) && !old.same_content(e));
        assert!(!old.same_object(e.with_priority(1)));
        assert!(!old.same_object(e.with_handle(1)));
        assert_eq!(old.accessed().age(), 0);
        assert!(!old.accessed().is_idle());
        assert_eq!(e.with_age(200).age(), MAX_AGE, "ages saturate");
        let huge = SlotEntry::huge(MAX_HANDLE).with_age(5);
        assert_eq!((huge.handle(), huge.age()), (MAX_HANDLE, 5));
        assert_eq!(huge.with_handle(3).age(), 5, "compaction keeps the age");
        // States without an age ignore it.
        let same = SlotEntry::new(SlotState::SameFilled, 77);
        assert_eq!(same.with_age(9), same);
        assert_eq!(same.age(), 0);
    }

    #[test]
    fn written_back_entry_roundtrips_offset_and_length() {
        for (offset, len) in [
            (0, 1),
            (4095, 4096),
            (MAX_BACKING_OFFSET, 4096),
            (12345, 3632),
        ] {
            let e = SlotEntry::written_back(offset, len).with_priority(3);
            assert_eq!(e.state(), SlotState::WrittenBack);
            assert_eq!(e.backing_object(), (offset, len));
            assert_eq!(e.priority(), 3);
            assert_eq!(e.age(), 0);
        }
    }

    /// Fills empty slot `index` (with an entry naming no real object: it is never freed).
    fn put(table: &SlotTable, index: usize, entry: SlotEntry) {
        let swapped = table.lock(index).unwrap().swap(entry);
        assert_eq!(swapped.old, SlotEntry::EMPTY);
        assert!(swapped.stale.is_none());
    }

    #[test]
    fn the_idle_clock_ages_only_stored_unlocked_slots() {
        let table = SlotTable::new(4);
        let stored = SlotEntry::compressed(5, 100);
        put(&table, 0, stored);
        put(&table, 1, SlotEntry::new(SlotState::SameFilled, 1));
        put(&table, 2, SlotEntry::huge(7).with_age(MAX_AGE));
        assert_eq!(table.age(0), Some(1));
        assert_eq!(table.age(0), Some(2));
        assert_eq!(table.peek(0).unwrap().age(), 2);
        assert!(table.peek(0).unwrap().same_object(stored));
        assert_eq!(table.age(1), None, "same-filled pages have no age");
        assert_eq!(table.age(2), None, "saturated");
        assert_eq!(table.age(3), None, "empty");
        assert_eq!(table.age(4), None, "out of range");
        let guard = table.lock(0).unwrap();
        assert_eq!(table.age(0), None, "a locked slot is being accessed");
        drop(guard);
    }

    #[test]
    fn every_state_survives_encoding() {
        for state in [
            SlotState::Empty,
            SlotState::SameFilled,
            SlotState::Compressed,
            SlotState::Huge,
            SlotState::WrittenBack,
            SlotState::Pending,
            SlotState::Unit,
            SlotState::Invalid,
        ] {
            let e = SlotEntry::new(state, MAX_PAYLOAD);
            assert_eq!(e.state(), state);
            assert_eq!(e.payload(), MAX_PAYLOAD);
            assert_eq!(e.bits() & LOCK, 0);
        }
    }

    #[test]
    fn the_unknown_state_value_reads_as_invalid_never_as_empty() {
        let e = SlotEntry(7 << STATE_SHIFT);
        assert_eq!(e.state(), SlotState::Invalid);
    }

    #[test]
    fn unit_member_entry_roundtrips_head_index_and_age() {
        let e = SlotEntry::unit_member(227, MAX_HANDLE, MAX_UNIT_MEMBERS - 1)
            .with_priority(2)
            .with_idle(true);
        assert_eq!(e.state(), SlotState::Unit);
        assert_eq!(
            (e.unit_class(), e.handle(), e.unit_index(), e.priority()),
            (227, MAX_HANDLE, MAX_UNIT_MEMBERS - 1, 2)
        );
        let older = e.with_age(MAX_AGE);
        assert_eq!(
            (older.age(), older.unit_index(), older.unit_class()),
            (MAX_AGE, 15, 227)
        );
        let moved = older.with_handle(5);
        assert_eq!(
            (moved.handle(), moved.age(), moved.unit_index()),
            (5, MAX_AGE, 15)
        );
        assert!(moved.is_idle());
    }

    #[test]
    fn pending_entry_roundtrips_buffer_and_generation() {
        let last = u32::try_from(MAX_PENDING_BUFFERS - 1).unwrap();
        let e = SlotEntry::pending(last, u32::MAX);
        assert_eq!(e.state(), SlotState::Pending);
        assert_eq!(e.pending_buffer(), (last, u32::MAX));
        assert!(e.with_idle(true).same_content(e));
        assert!(!SlotEntry::pending(last, 1).same_content(e));
        assert!(!SlotEntry::pending(0, u32::MAX).same_content(e));
    }

    fn resident_bytes() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * 4096
    }

    #[test]
    fn a_1_tib_table_costs_memory_only_where_used() {
        let before = resident_bytes();
        let pages = 1usize << 28; // a 1 TiB device: a 2 GiB table
        let table = SlotTable::new(pages);
        assert_eq!(table.reserved_bytes(), 2 << 30);
        assert_eq!(
            table.bytes(),
            64 << 10,
            "the bitmap only: 1 bit a table page"
        );
        for index in [0, pages / 2, pages - 1] {
            put(&table, index, SlotEntry::new(SlotState::SameFilled, 1));
        }
        assert_eq!(table.bytes(), (64 << 10) + 3 * 4096);
        let ranges: Vec<_> = table.touched_ranges(0..pages).collect();
        assert_eq!(
            ranges,
            [0..512, pages / 2..pages / 2 + 512, pages - 512..pages]
        );
        // The idle clock's whole walk visits the three pages only.
        let started = std::time::Instant::now();
        let visited = table
            .touched_slots(0..pages)
            .filter(|&s| table.age(s).is_some())
            .count();
        assert_eq!(visited, 0, "same-filled pages have no age");
        assert!(started.elapsed() < std::time::Duration::from_millis(100));
        table.check_untouched_empty().unwrap();
        let grown = resident_bytes().saturating_sub(before);
        assert!(grown < 4 << 20, "a 1 TiB table made {grown} bytes resident");
    }

    #[test]
    // Test data: the generator's values are reduced below a usize bound.
    #[allow(clippy::cast_possible_truncation, clippy::needless_range_loop)]
    fn touched_ranges_cover_every_stored_slot_and_skip_the_rest() {
        // A deterministic sweep against a model: slots filled at pseudo-random places, ranges
        // of every alignment.
        let len = 512 * 300 + 77;
        let table = SlotTable::new(len);
        let mut model = vec![false; len];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = |below: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % below as u64) as usize
        };
        for _ in 0..200 {
            // Clustered: a run of a few slots, as swap writes come.
            let start = next(len);
            for index in start..(start + next(8)).min(len) {
                if !model[index] {
                    put(&table, index, SlotEntry::new(SlotState::SameFilled, 1));
                    model[index] = true;
                }
            }
        }
        put(&table, len - 1, SlotEntry::huge(3));
        model[len - 1] = true;
        for _ in 0..500 {
            let a = next(len + 1);
            let b = next(len + 1);
            let range = a.min(b)..a.max(b);
            let visited: Vec<usize> = table.touched_slots(range.clone()).collect();
            assert!(
                visited.windows(2).all(|w| w[0] < w[1]),
                "in order, once each"
            );
            assert!(visited.iter().all(|s| range.contains(s)));
            let stored: Vec<usize> = range.clone().filter(|&s| model[s]).collect();
            for s in &stored {
                assert!(
                    visited.binary_search(s).is_ok(),
                    "stored slot {s} missed in {range:?}"
                );
            }
            // Untouched pages are skipped: what is visited lies on pages that hold data.
            for &s in &visited {
                let page = s / SLOTS_PER_TABLE_PAGE;
                let on_page =
                    page * SLOTS_PER_TABLE_PAGE..((page + 1) * SLOTS_PER_TABLE_PAGE).min(len);
                assert!(
                    on_page.clone().any(|p| model[p]),
                    "slot {s} on an empty page"
                );
            }
        }
        let touched = model
            .chunks(SLOTS_PER_TABLE_PAGE)
            .filter(|c| c.contains(&true))
            .count();
        assert_eq!(table.touched_ranges(0..len).count(), touched);
        assert_eq!(
            table.bytes(),
            touched * 4096 + 8 * len.div_ceil(512).div_ceil(64)
        );
        table.check_untouched_empty().unwrap();
    }

    #[test]
    fn an_emptied_table_page_is_given_back_and_its_slots_still_work() {
        let table = SlotTable::new(3 * SLOTS_PER_TABLE_PAGE);
        let page_of = |i: usize| i / SLOTS_PER_TABLE_PAGE;
        let entry = SlotEntry::new(SlotState::SameFilled, 9);
        for index in [5, 700, 701, 1100] {
            put(&table, index, entry);
        }
        assert_eq!(
            table.give_back_empty_pages(),
            0,
            "every touched page holds an entry"
        );
        // Empty page 1; keep page 0 and 2.
        for index in [700, 701] {
            assert_eq!(table.lock(index).unwrap().swap(SlotEntry::EMPTY).old, entry);
        }
        assert!(table.is_touched(700), "emptied, not yet given back");
        let bytes = table.bytes();
        assert_eq!(table.give_back_empty_pages(), 1);
        assert_eq!(table.bytes(), bytes - 4096);
        assert!(!table.is_touched(700) && table.is_touched(5) && table.is_touched(1100));
        assert_eq!(
            table
                .touched_ranges(0..table.len())
                .map(|r| page_of(r.start))
                .collect::<Vec<_>>(),
            [0, 2]
        );
        table.check_untouched_empty().unwrap();
        // The given-back page reads as Empty, unlocked, and takes new entries.
        for index in 512..1024 {
            assert_eq!(table.peek(index), Some(SlotEntry::EMPTY));
        }
        put(&table, 900, entry);
        assert!(table.is_touched(900));
        assert_eq!(table.peek(900), Some(entry));
        assert_eq!(table.peek(5), Some(entry), "other pages keep their entries");
        table.check_untouched_empty().unwrap();
    }

    #[test]
    fn a_table_page_with_a_locked_slot_is_not_given_back() {
        let table = SlotTable::new(2 * SLOTS_PER_TABLE_PAGE);
        put(&table, 600, SlotEntry::new(SlotState::SameFilled, 9));
        drop(table.lock(600).unwrap().swap(SlotEntry::EMPTY));
        let guard = table.lock(1000).unwrap();
        assert_eq!(table.give_back_empty_pages(), 0, "slot 1000 is locked");
        assert!(table.is_touched(600));
        // The locks the attempt took on the page's other slots were released.
        for index in (512..1024).filter(|&i| i != 1000) {
            drop(table.lock(index).unwrap());
        }
        drop(guard);
        assert_eq!(table.give_back_empty_pages(), 1);
        assert!(!table.is_touched(600));
    }

    #[test]
    fn a_slot_locked_while_its_page_is_given_back_comes_out_empty_and_unlocked() {
        let table = Arc::new(SlotTable::new(SLOTS_PER_TABLE_PAGE));
        let entry = SlotEntry::new(SlotState::SameFilled, 1);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (table, stop) = (Arc::clone(&table), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut rounds = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let index = (rounds * 7) % SLOTS_PER_TABLE_PAGE;
                    let swapped = table.lock(index).unwrap().swap(entry);
                    assert_eq!(swapped.old, SlotEntry::EMPTY, "slot {index}");
                    let swapped = table.lock(index).unwrap().swap(SlotEntry::EMPTY);
                    assert_eq!(swapped.old, entry, "slot {index} lost its entry");
                    rounds += 1;
                }
                rounds
            })
        };
        let mut given = 0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(300);
        while std::time::Instant::now() < deadline {
            given += table.give_back_empty_pages();
        }
        stop.store(true, Ordering::Relaxed);
        let rounds = writer.join().unwrap();
        assert!(
            rounds > 0 && given > 0,
            "{rounds} rounds, {given} give-backs"
        );
        table.check_untouched_empty().unwrap();
        eprintln!("{rounds} rounds, the page given back {given} times");
    }

    #[test]
    fn lock_serialises_one_slot() {
        let table = Arc::new(SlotTable::new(4));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let table = Arc::clone(&table);
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        let mut guard = table.lock(2).unwrap();
                        let next = guard.entry().payload() + 1;
                        let swapped = guard.swap(SlotEntry::new(SlotState::WrittenBack, next));
                        assert!(swapped.stale.is_none());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(table.peek(2).unwrap().payload(), 40_000);
        assert!(table.lock(4).is_none());
        assert_eq!(table.reserved_bytes(), 32);
        assert_eq!(
            table.bytes(),
            4096 + 8,
            "one touched page and the bitmap's word"
        );
    }
}
