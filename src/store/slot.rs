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
//! state (bits 1-3): Empty, SameFilled, Compressed, Huge, WrittenBack, Pending
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
//! ```
//!
//! The *age* (7 bits, Compressed and Huge only) counts ticks of the idle clock since the page
//! was last read or written, saturating at [`MAX_AGE`]: the idle clock adds one to every stored
//! page each tick and an access sets it back to 0. It is how `idle --age SECS` and the
//! automatic writeback find cold pages without an access time in the slot.
//!
//! State values 6 and 7 are not used; an entry holding one reads as [`SlotState::Invalid`] and
//! every operation refuses it rather than guessing.
//!
//! Locking: a thread takes a slot's lock bit with a compare-and-swap, spinning briefly and then
//! yielding. Different slots proceed in parallel; the same slot is serialised. A thread holds at
//! most one slot lock at a time, and takes the allocator's class locks only inside a slot lock
//! (never the other way round), so the lock order is slot, then class: no deadlock.

use std::sync::atomic::{AtomicU64, Ordering};

const _: () = assert!(
    std::mem::align_of::<AtomicU64>() == std::mem::align_of::<u64>(),
    "the slot table reinterprets zeroed u64s as AtomicU64s"
);

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
    /// A state value no version of the store writes (6 or 7): corruption or a bug. Never
    /// created on purpose; refused by every operation.
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

    /// The age of a Compressed or Huge entry in idle-clock ticks (0 in other states).
    pub fn age(self) -> u8 {
        match self.state() {
            SlotState::Compressed | SlotState::Huge => {
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
            SlotState::Compressed | SlotState::Huge => {
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

    /// The allocator handle of a Compressed or Huge entry.
    pub fn handle(self) -> u64 {
        self.payload() >> HANDLE_SHIFT
    }

    /// This Compressed or Huge entry pointing at `handle` instead, its size and flags kept.
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

    /// The raw bits (lock bit clear).
    #[cfg(test)]
    pub fn bits(self) -> u64 {
        self.0
    }
}

/// The table of slots, one per page.
#[derive(Debug)]
pub struct SlotTable {
    slots: Box<[AtomicU64]>,
    /// With a state file: the mapping the slots live in (`slots` is then empty, and
    /// `mapped` points into it).
    mapped: Option<(super::alloc::Segment, usize)>,
}

impl SlotTable {
    /// A table of `pages` slots in `memory`, a state file's slot-table region (its entries
    /// kept as they are: recovery reads them).
    pub(crate) fn in_memory(pages: usize, memory: super::alloc::Segment) -> Option<SlotTable> {
        (memory.len() >= pages * 8).then_some(SlotTable {
            slots: Box::new([]),
            mapped: Some((memory, pages)),
        })
    }

    fn slots(&self) -> &[AtomicU64] {
        match &self.mapped {
            None => &self.slots,
            // SAFETY: the mapping is page-aligned, at least `pages` eight-byte entries long,
            // and lives as long as `self`; AtomicU64 has u64's size and alignment and every
            // bit pattern is valid; the file's other users are only other mappings of the
            // same state, which reach these bytes atomically too.
            Some((memory, pages)) => unsafe {
                std::slice::from_raw_parts(memory.base().cast::<AtomicU64>(), *pages)
            },
        }
    }

    /// Recovery: clears the lock bit a killed process left in slot `index` and returns the
    /// entry. Only for a table no other thread uses yet.
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
            slot.store(entry.0, Ordering::Release);
        }
    }

    /// A table of `pages` empty slots.
    pub fn new(pages: usize) -> SlotTable {
        // `vec![0; n]` comes from calloc, which for a large table maps fresh zero pages: the
        // kernel supplies each page of the table only when a slot on it is first written, so a
        // large, mostly unused device costs little until the guest fills it.
        let zeroed: Box<[u64]> = vec![0u64; pages].into_boxed_slice();
        // SAFETY: AtomicU64 has the same size and bit validity as u64 and, as the assertion
        // above the type checks, the same alignment; zero is a valid AtomicU64. The pointer
        // comes from a Box of exactly this length, so the new Box owns the same allocation
        // with the same layout.
        let slots = unsafe { Box::from_raw(Box::into_raw(zeroed) as *mut [AtomicU64]) };
        SlotTable {
            slots,
            mapped: None,
        }
    }

    /// The number of slots.
    pub fn len(&self) -> usize {
        self.slots().len()
    }

    /// The bytes the table occupies.
    pub fn bytes(&self) -> usize {
        std::mem::size_of_val(self.slots())
    }

    /// Reads slot `index` without locking it (a snapshot that may change at once).
    pub fn peek(&self, index: usize) -> Option<SlotEntry> {
        self.slots()
            .get(index)
            .map(|s| SlotEntry(s.load(Ordering::Relaxed) & !LOCK))
    }

    /// One tick of the idle clock for slot `index`: adds one to the age of a Compressed or
    /// Huge entry (saturating at [`MAX_AGE`]) with one compare-and-swap, without taking the
    /// lock. A slot that is locked or changes meanwhile is left alone (it is being accessed,
    /// so it is not getting older). Returns the new age, if it aged.
    pub fn age(&self, index: usize) -> Option<u8> {
        let slot = self.slots().get(index)?;
        let current = slot.load(Ordering::Relaxed);
        if current & LOCK != 0 {
            return None;
        }
        let entry = SlotEntry(current);
        let age = entry.age();
        let ages = matches!(entry.state(), SlotState::Compressed | SlotState::Huge);
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

    /// Swaps in `new` (published when the guard drops) and returns the old entry, with the
    /// allocator object it referenced as a [`StaleObject`] when `new` does not reference the
    /// same one: the only place a safely made `StaleObject` comes from.
    pub fn swap(&mut self, new: SlotEntry) -> Swapped {
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
            SlotState::Invalid,
        ] {
            let e = SlotEntry::new(state, MAX_PAYLOAD);
            assert_eq!(e.state(), state);
            assert_eq!(e.payload(), MAX_PAYLOAD);
            assert_eq!(e.bits() & LOCK, 0);
        }
    }

    #[test]
    fn unknown_state_values_read_as_invalid_never_as_empty() {
        for bits in [6u64, 7] {
            let e = SlotEntry(bits << STATE_SHIFT);
            assert_eq!(e.state(), SlotState::Invalid);
        }
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

    #[test]
    fn a_large_table_costs_memory_only_where_used() {
        fn resident_bytes() -> u64 {
            let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
            let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
            pages * 4096
        }
        let before = resident_bytes();
        let table = SlotTable::new(1 << 24); // a 64 GiB device: a 128 MiB table
        assert_eq!(table.bytes(), 128 << 20);
        drop(table.lock(12345).unwrap());
        let grown = resident_bytes().saturating_sub(before);
        assert!(
            grown < 32 << 20,
            "creating the table made {grown} bytes resident"
        );
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
        assert_eq!(table.bytes(), 32);
    }
}
