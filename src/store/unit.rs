// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Multi-page units: a guest write that covers several contiguous, aligned pages is compressed
//! as one object, the way zram's multi-page compression RFC compresses a 64 KiB folio.
//!
//! A unit of `n` pages (2 to [`MAX_UNIT_MEMBERS`], `n` a power of two, its first page a
//! multiple of `n`) is one compressed *stream* of `n × 4096` bytes, kept in the allocator as a
//! *head* object and up to [`MAX_PIECES`] *pieces*:
//!
//! ```text
//! head (in the size class its length needs):
//!   0..4    live mask (u32, atomic): bit i set while slot first + i names this head
//!   4       pages n
//!   5       pieces k
//!   6       flags (atomic u8): bit 0 superseded (compaction copied the head; the pieces are
//!           the copy's)
//!   7       zero
//!   8..12   stream length L
//!   12..16  the unit's first slot (its members are slots first .. first + n)
//!   16..24  nonce (u64): names the unit's content; a copy of the head keeps it
//!   24..    k piece handles (u64 each, huge class), then the stream's last bytes,
//!           4096·k .. L (none when they would not fit: the last piece holds them)
//! piece j (a 4096-byte huge-class object): stream bytes 4096·j .. min(4096·(j+1), L)
//! ```
//!
//! Every member's slot holds a [`SlotState::Unit`] entry naming the head (class, handle) and its
//! index; a page of the unit that is same-filled is not a member (it is stored as today), nor is
//! one rewritten or discarded since. The live mask is the set of members; a member leaves when
//! its slot is swapped to anything else, and the thread that clears the last bit frees the
//! head and its pieces. Huge-class chunks hold one object each, so compaction never moves a
//! piece; it moves a head by copying it with every member's slot locked (DESIGN.md, "Units").
//!
//! Locking: a thread that creates or moves a unit holds the locks of the unit's span of slots
//! at once, taken in ascending order; every other thread holds at most one slot lock and
//! never waits for a second, so there is no cycle.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};

use super::alloc::{class_of, AllocError, HUGE_CLASS};
use super::pending::UnitRewrite;
use super::slot::{SlotEntry, SlotGuard, StaleObject, MAX_UNIT_MEMBERS};
use super::stats::{add, sub};
use super::{PageStore, SlotState, StoreError, HUGE_THRESHOLD};
use crate::codec::CodecError;
use crate::PAGE_SIZE;

/// Bytes of a head before its piece handles.
pub(crate) const HEADER: usize = 24;
/// The most pieces a unit has: its stream is at most [`MAX_UNIT_MEMBERS`] ×
/// [`HUGE_THRESHOLD`] bytes ([`worth_a_unit`]).
pub(crate) const MAX_PIECES: usize = 14;
/// The longest stream a unit may have.
pub(crate) const MAX_STREAM: usize = MAX_UNIT_MEMBERS * HUGE_THRESHOLD;
const _: () = assert!(pieces_for(MAX_STREAM) <= MAX_PIECES);
const _: () = assert!(head_len(MAX_STREAM, pieces_for(MAX_STREAM)) <= PAGE_SIZE);
const _: () = assert!(
    HUGE_CLASS < 256,
    "a Unit entry names the head's class in 8 bits"
);

const FLAG_SUPERSEDED: u8 = 1;

/// Whether `entry` is a member of the unit whose head the Unit entry `key` names.
fn same_head(entry: SlotEntry, key: SlotEntry) -> bool {
    entry.state() == SlotState::Unit
        && entry.unit_class() == key.unit_class()
        && entry.handle() == key.handle()
}

/// The memory a unit's stream of `len` bytes takes: its pieces and its head's class.
fn unit_cost(len: usize) -> usize {
    let pieces = pieces_for(len);
    pieces * PAGE_SIZE + super::alloc::class_size(class_of(head_len(len, pieces)))
}

/// A unit is rewritten page by page once fewer than 1/this of its pages are live members.
pub(crate) const REWRITE_SHARE: usize = 2;

/// How many decoded units each reading thread keeps, so that readahead's neighbouring reads
/// of one unit decompress it once.
const CACHED_UNITS: usize = 2;

/// Whether a stream of `len` bytes for `members` pages is worth keeping as a unit: no larger
/// than the members would take as huge pages would be kept raw anyway (an incompressible unit
/// is stored page by page, as today).
pub(crate) fn worth_a_unit(len: usize, members: usize) -> bool {
    len <= members * HUGE_THRESHOLD
}

/// The pieces a stream of `len` bytes needs: a piece holds 4096 bytes of it and the head
/// what is left, unless that does not fit beside the header and the piece handles; then one
/// more piece holds the rest (a huge object partly used) and the head none.
pub(crate) const fn pieces_for(len: usize) -> usize {
    let full = len / PAGE_SIZE;
    if HEADER + 8 * full + len % PAGE_SIZE <= PAGE_SIZE {
        full
    } else {
        full + 1
    }
}

/// The stream bytes piece `j` of a stream of `len` bytes holds.
const fn piece_range(len: usize, j: usize) -> std::ops::Range<usize> {
    let start = j * PAGE_SIZE;
    let end = if (j + 1) * PAGE_SIZE < len {
        (j + 1) * PAGE_SIZE
    } else {
        len
    };
    start..end
}

/// The stream bytes the head holds after its piece handles.
const fn head_tail(len: usize, pieces: usize) -> usize {
    len.saturating_sub(pieces * PAGE_SIZE)
}

/// The length of the head of a stream of `len` bytes in `pieces` pieces.
pub(crate) const fn head_len(len: usize, pieces: usize) -> usize {
    HEADER + 8 * pieces + head_tail(len, pieces)
}

/// A unit's head, decoded (everything but the live mask and flags, which change).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Head {
    /// Pages the stream decodes to.
    pub(crate) pages: usize,
    /// Pieces (huge-class objects) before the head's own bytes.
    pub(crate) pieces: usize,
    /// The stream's length.
    pub(crate) stream_len: usize,
    /// The unit's first slot.
    pub(crate) first: usize,
    /// Names the content, for the readers' cache.
    pub(crate) nonce: u64,
}

impl Head {
    /// Checks the fields against each other and the head's class; `None` when they cannot be
    /// a unit this store wrote (a damaged state file, or a bug).
    fn checked(self, class: usize) -> Option<Head> {
        let ok = (2..=MAX_UNIT_MEMBERS).contains(&self.pages)
            && self.pages.is_power_of_two()
            && self.first.is_multiple_of(self.pages)
            && (1..=MAX_STREAM).contains(&self.stream_len)
            && self.pieces == pieces_for(self.stream_len)
            && class_of(head_len(self.stream_len, self.pieces)) == class;
        ok.then_some(self)
    }
}

/// The next unit nonce, for every store of the process: the readers' caches are per thread,
/// not per store, so a nonce must never name two units' contents anywhere in the process.
static NEXT_NONCE: AtomicU64 = AtomicU64::new(1);

/// A store's units: the configured largest unit.
#[derive(Debug)]
pub(crate) struct Units {
    /// The largest unit, in pages (1: units are off).
    max_pages: AtomicUsize,
}

impl Default for Units {
    fn default() -> Units {
        Units {
            max_pages: AtomicUsize::new(1),
        }
    }
}

impl Units {
    /// The largest unit, in pages (1: units are off).
    pub(crate) fn max_pages(&self) -> usize {
        self.max_pages.load(Ordering::Relaxed)
    }

    /// Sets the largest unit: a power of two from 1 (off) to [`MAX_UNIT_MEMBERS`] pages.
    pub(crate) fn set_max_pages(&self, pages: usize) {
        debug_assert!(pages.is_power_of_two() && pages <= MAX_UNIT_MEMBERS);
        self.max_pages
            .store(pages.clamp(1, MAX_UNIT_MEMBERS), Ordering::Relaxed);
    }

    /// Recovery: a recovered head holds nonce `seen`; later units get larger ones.
    pub(crate) fn nonces_after(&self, seen: u64) {
        NEXT_NONCE.fetch_max(seen.saturating_add(1), Ordering::Relaxed);
    }

    fn nonce(&self) -> u64 {
        NEXT_NONCE.fetch_add(1, Ordering::Relaxed)
    }

    /// Splits the pages `first..first + count` into units and single pages: each piece is the
    /// largest power of two, at most `max_pages`, that starts at a multiple of itself and fits.
    pub(crate) fn split(&self, first: u64, count: usize) -> impl Iterator<Item = (u64, usize)> {
        let max = self.max_pages();
        let end = first + count as u64;
        let mut at = first;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let mut n = max;
            while n > 1 && (!at.is_multiple_of(n as u64) || at + n as u64 > end) {
                n /= 2;
            }
            let piece = (at, n);
            at += n as u64;
            Some(piece)
        })
    }
}

/// A reading thread's last decoded units.
struct UnitCache {
    /// (nonce, bytes decoded) of each buffer; nonce 0 is empty.
    tags: [(u64, usize); CACHED_UNITS],
    buffers: Box<[[u8; MAX_UNIT_MEMBERS * PAGE_SIZE]; CACHED_UNITS]>,
    /// The stream gathered from head and pieces.
    stream: Box<[u8; MAX_STREAM]>,
    /// The buffer to replace next.
    next: usize,
}

thread_local! {
    static UNIT_CACHE: RefCell<Option<UnitCache>> = const { RefCell::new(None) };
    /// The pages of the read request this thread serves ([`PageStore::read_ahead`]).
    pub(crate) static READ_AHEAD: std::cell::Cell<Option<(u64, u64)>> =
        const { std::cell::Cell::new(None) };
}

/// The span of slots a unit covers, locked (in ascending order) by the thread creating or
/// moving it.
pub(crate) struct LockedSpan<'a> {
    pub(crate) first: usize,
    guards: [Option<SlotGuard<'a>>; MAX_UNIT_MEMBERS],
}

impl<'a> LockedSpan<'a> {
    /// The span's guards, in slot order.
    pub(crate) fn guards(&self) -> impl Iterator<Item = &SlotGuard<'a>> {
        self.guards.iter().flatten()
    }

    /// The span's guards, in slot order, to change.
    pub(crate) fn guards_mut(&mut self) -> impl Iterator<Item = &mut SlotGuard<'a>> {
        self.guards.iter_mut().flatten()
    }

    /// The entry of the span's `i`-th slot.
    pub(crate) fn entry(&self, i: usize) -> Option<SlotEntry> {
        self.guards.get(i)?.as_ref().map(SlotGuard::entry)
    }
}

impl PageStore {
    /// Locks slots `first..first + pages` in ascending order.
    pub(crate) fn lock_span(&self, first: usize, pages: usize) -> LockedSpan<'_> {
        LockedSpan {
            first,
            guards: std::array::from_fn(|i| (i < pages).then(|| self.lock(first + i))),
        }
    }

    /// Stores a unit's compressed `stream` of `pages` pages whose members are the bits of
    /// `members`: its pieces, then its head. Returns the head's class and handle; the caller
    /// owns the unit until a slot names it. On error nothing stays allocated.
    pub(crate) fn store_unit(
        &self,
        first: usize,
        stream: &[u8],
        pages: usize,
        members: u32,
        nonce: Option<u64>,
    ) -> Result<(usize, u64), AllocError> {
        debug_assert!(worth_a_unit(stream.len(), pages) && (2..=MAX_UNIT_MEMBERS).contains(&pages));
        let limit = self.alloc_limit();
        let pieces = pieces_for(stream.len());
        let mut handles = [0u64; MAX_PIECES];
        for j in 0..pieces {
            let bytes = &stream[piece_range(stream.len(), j)];
            match self.alloc.store(HUGE_CLASS, bytes, limit) {
                Ok(handle) => handles[j] = handle,
                Err(error) => {
                    self.free_pieces(&handles[..j]);
                    return Err(error);
                }
            }
        }
        let len = head_len(stream.len(), pieces);
        let mut head = [0u8; PAGE_SIZE];
        head[0..4].copy_from_slice(&members.to_le_bytes());
        // Both at most 16.
        #[allow(clippy::cast_possible_truncation)]
        {
            head[4] = pages as u8;
            head[5] = pieces as u8;
        }
        // At most MAX_STREAM.
        #[allow(clippy::cast_possible_truncation)]
        head[8..12].copy_from_slice(&(stream.len() as u32).to_le_bytes());
        // A slot index is below 2^28 (MAX_CAPACITY_PAGES).
        #[allow(clippy::cast_possible_truncation)]
        head[12..16].copy_from_slice(&(first as u32).to_le_bytes());
        let nonce = nonce.unwrap_or_else(|| self.units.nonce());
        head[16..24].copy_from_slice(&nonce.to_le_bytes());
        for (j, handle) in handles[..pieces].iter().enumerate() {
            head[HEADER + 8 * j..HEADER + 8 * (j + 1)].copy_from_slice(&handle.to_le_bytes());
        }
        head[HEADER + 8 * pieces..len]
            .copy_from_slice(&stream[stream.len() - head_tail(stream.len(), pieces)..]);
        let class = class_of(len);
        let stored = if class == HUGE_CLASS {
            self.alloc.store(class, &head, limit)
        } else {
            self.alloc.store(class, &head[..len], limit)
        };
        match stored {
            Ok(handle) => Ok((class, handle)),
            Err(error) => {
                self.free_pieces(&handles[..pieces]);
                Err(error)
            }
        }
    }

    fn free_pieces(&self, pieces: &[u64]) {
        for &piece in pieces {
            // SAFETY: the pieces were allocated by the caller's unit, which no slot names.
            self.alloc
                .free_stale(unsafe { StaleObject::unit_part(HUGE_CLASS, piece) });
        }
    }

    /// The head of the unit `entry` (a Unit entry) names, checked; `None` when it is damaged.
    ///
    /// # Safety
    /// The head must be live while this runs: the caller holds the lock of a slot naming it
    /// (or owns the unit).
    pub(crate) unsafe fn unit_head(&self, entry: SlotEntry) -> Option<Head> {
        let class = entry.unit_class();
        if class > HUGE_CLASS {
            return None;
        }
        // SAFETY: by this function's contract the head is live; its first HEADER bytes are
        // the header (every class holding a head is at least that long), and the fields read
        // here are written once, by `store_unit` or a copy, before any slot names the head.
        let (pages, pieces, len, first, nonce) = unsafe {
            let head = self.alloc.object_start(class, entry.handle());
            (
                head.add(4).read(),
                head.add(5).read(),
                head.add(8).cast::<u32>().read_unaligned(),
                head.add(12).cast::<u32>().read_unaligned(),
                head.add(16).cast::<u64>().read_unaligned(),
            )
        };
        Head {
            pages: usize::from(pages),
            pieces: usize::from(pieces),
            stream_len: len as usize,
            first: first as usize,
            nonce,
        }
        .checked(class)
        .filter(|head| entry.unit_index() < head.pages)
    }

    /// The live mask of the head `entry` names.
    ///
    /// # Safety
    /// As for [`unit_head`](Self::unit_head), for as long as the reference is used.
    unsafe fn unit_mask(&self, entry: SlotEntry) -> &AtomicU32 {
        // SAFETY: the head is live (contract) and 16-byte aligned (every class size is a
        // multiple of 16 and chunks are page-aligned), its first four bytes are the mask,
        // which is only ever accessed atomically once the head is stored.
        unsafe {
            &*self
                .alloc
                .object_start(entry.unit_class(), entry.handle())
                .cast::<AtomicU32>()
        }
    }

    /// The live mask and flags of the head `entry` names (for the consistency checker).
    ///
    /// # Safety
    /// As for [`unit_head`](Self::unit_head).
    pub(crate) unsafe fn unit_live(&self, entry: SlotEntry) -> (u32, u8) {
        // SAFETY: contract.
        unsafe {
            (
                self.unit_mask(entry).load(Ordering::Acquire),
                self.unit_flags(entry).load(Ordering::Acquire),
            )
        }
    }

    /// Recovery: sets a recovered unit's live mask to the members its slots name and clears
    /// its flags (a copy interrupted by the kill was merged into it).
    ///
    /// # Safety
    /// The head is live and no other thread uses the store yet.
    pub(crate) unsafe fn recover_unit(&self, entry: SlotEntry, members: u32) {
        // SAFETY: contract.
        unsafe {
            self.unit_mask(entry).store(members, Ordering::Release);
            self.unit_flags(entry).store(0, Ordering::Release);
        }
    }

    /// Sets the live mask of a unit the caller has stored and not yet published.
    ///
    /// # Safety
    /// The caller owns the unit (no slot names it yet).
    pub(crate) unsafe fn set_unit_members(&self, entry: SlotEntry, members: u32) {
        // SAFETY: owned by the caller, so live.
        unsafe { self.unit_mask(entry) }.store(members, Ordering::Release);
    }

    /// The flags byte of the head `entry` names.
    ///
    /// # Safety
    /// As for [`unit_mask`](Self::unit_mask).
    unsafe fn unit_flags(&self, entry: SlotEntry) -> &AtomicU8 {
        // SAFETY: as for the mask; byte 6 is only ever accessed atomically.
        unsafe {
            &*self
                .alloc
                .object_start(entry.unit_class(), entry.handle())
                .add(6)
                .cast::<AtomicU8>()
        }
    }

    /// The piece handles of the head `entry` names.
    ///
    /// # Safety
    /// As for [`unit_head`](Self::unit_head); `head` is what it returned.
    pub(crate) unsafe fn unit_pieces(&self, entry: SlotEntry, head: &Head) -> [u64; MAX_PIECES] {
        let mut pieces = [0u64; MAX_PIECES];
        // SAFETY: the head is live (contract) and holds `head.pieces` handles after the header
        // (its length was checked against its class).
        let start = unsafe {
            self.alloc
                .object_start(entry.unit_class(), entry.handle())
                .add(HEADER)
        };
        for (j, piece) in pieces.iter_mut().enumerate().take(head.pieces) {
            // SAFETY: inside the head, as above.
            *piece = unsafe { start.add(8 * j).cast::<u64>().read_unaligned() };
        }
        pieces
    }

    /// Copies the stream of the unit `entry` names into `stream` (recovery checked every
    /// piece a state file's heads name).
    ///
    /// # Safety
    /// As for [`unit_head`](Self::unit_head); `head` is what it returned.
    unsafe fn gather_stream(&self, entry: SlotEntry, head: &Head, stream: &mut [u8]) {
        // SAFETY: contract.
        unsafe { self.gather_stream_range(entry, head, stream, 0..head.stream_len) };
    }

    /// Copies bytes `range` of the stream of the unit `entry` names into the same range of
    /// `stream`.
    ///
    /// # Safety
    /// As for [`gather_stream`](Self::gather_stream).
    unsafe fn gather_stream_range(
        &self,
        entry: SlotEntry,
        head: &Head,
        stream: &mut [u8],
        range: std::ops::Range<usize>,
    ) {
        // SAFETY: contract.
        let pieces = unsafe { self.unit_pieces(entry, head) };
        let clip = |r: std::ops::Range<usize>| r.start.max(range.start)..r.end.min(range.end);
        for (j, &piece) in pieces[..head.pieces].iter().enumerate() {
            let whole = piece_range(head.stream_len, j);
            let wanted = clip(whole.clone());
            if wanted.is_empty() {
                continue;
            }
            // SAFETY: the unit owns its pieces, live while the head is (contract), and no
            // one writes them after `store_unit`.
            let bytes = unsafe { self.alloc.object(HUGE_CLASS, piece, whole.len()) };
            stream[wanted.clone()]
                .copy_from_slice(&bytes[wanted.start - whole.start..wanted.end - whole.start]);
        }
        let tail = head_tail(head.stream_len, head.pieces);
        let wanted = clip(head.stream_len - tail..head.stream_len);
        if wanted.is_empty() {
            return;
        }
        // SAFETY: the head holds `tail` stream bytes after its handles (its length was checked
        // against its class); they are written once before any slot names the head.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                self.alloc
                    .object_start(entry.unit_class(), entry.handle())
                    .add(HEADER + 8 * head.pieces),
                tail,
            )
        };
        let start = head.stream_len - tail;
        stream[wanted.clone()].copy_from_slice(&bytes[wanted.start - start..wanted.end - start]);
    }

    /// Regenerates member page `entry` of its unit into `page`. The caller holds the slot's
    /// lock. Decoded units are kept per thread ([`CACHED_UNITS`]), named by their nonce, so a
    /// neighbouring read decompresses nothing; a codec that can stop early decodes only up to
    /// the page's end.
    pub(crate) fn read_unit_member(
        &self,
        index: u64,
        entry: SlotEntry,
        page: &mut [u8; PAGE_SIZE],
    ) -> Result<(), StoreError> {
        let corrupt = |what: String| StoreError::Corrupt {
            index,
            source: CodecError::Corrupt(what),
        };
        // SAFETY: the caller holds the lock of the slot naming the head.
        let head = unsafe { self.unit_head(entry) }
            .ok_or_else(|| corrupt("the unit's head is damaged".to_owned()))?;
        let member = entry.unit_index();
        if usize::try_from(index).ok() != Some(head.first + member) {
            return Err(corrupt(format!(
                "the unit's head says it starts at page {}, not {}",
                head.first,
                index.saturating_sub(member as u64)
            )));
        }
        let needed = self.pages_to_decode(index, member, &head) * PAGE_SIZE;
        let codec = self
            .codec_of(entry.priority())
            .map_err(|source| StoreError::Corrupt { index, source })?;
        let counters = self.counters.local();
        add(&counters.unit_read_bytes, PAGE_SIZE as u64);
        UNIT_CACHE.with(|cache| {
            let mut cache = cache.borrow_mut();
            let cache = cache.get_or_insert_with(|| UnitCache {
                tags: [(0, 0); CACHED_UNITS],
                buffers: vec![[0u8; MAX_UNIT_MEMBERS * PAGE_SIZE]; CACHED_UNITS]
                    .into_boxed_slice()
                    .try_into()
                    .unwrap_or_else(|_| unreachable!("CACHED_UNITS buffers")),
                stream: vec![0u8; MAX_STREAM]
                    .into_boxed_slice()
                    .try_into()
                    .unwrap_or_else(|_| unreachable!("MAX_STREAM bytes")),
                next: 0,
            });
            let cached = cache
                .tags
                .iter()
                .position(|&(nonce, _)| nonce == head.nonce);
            let at = match cached {
                Some(at) if cache.tags[at].1 >= needed => {
                    add(&counters.unit_cache_hits, 1);
                    at
                }
                _ => {
                    // A second read of a unit decoded short of it (readahead, a sequential
                    // pass) decodes it whole, so the next ones hit.
                    let (at, needed) = match cached {
                        Some(at) => (at, head.pages * PAGE_SIZE),
                        None => {
                            let at = cache.next;
                            cache.next = (at + 1) % CACHED_UNITS;
                            (at, needed)
                        }
                    };
                    cache.tags[at] = (0, 0);
                    let UnitCache {
                        stream, buffers, ..
                    } = &mut *cache;
                    let stream = &mut stream[..head.stream_len];
                    let out = &mut buffers[at][..head.pages * PAGE_SIZE];
                    // A codec that stops early needs the stream only up to about the page's
                    // share of it: gather that much first, and the rest only if it was short.
                    let total = out.len();
                    let guess =
                        if needed < total && codec.algorithm() == crate::codec::Algorithm::Lz4 {
                            (head.stream_len * needed / total + head.stream_len / 4 + 256)
                                .min(head.stream_len)
                        } else {
                            head.stream_len
                        };
                    // SAFETY: the caller holds the lock of the slot naming the head.
                    unsafe { self.gather_stream_range(entry, &head, stream, 0..guess) };
                    let mut decoded = codec.decompress_unit(&stream[..guess], out, needed);
                    if guess < head.stream_len && decoded.as_ref().map_or(true, |&d| d < needed) {
                        // SAFETY: as above.
                        unsafe {
                            self.gather_stream_range(entry, &head, stream, guess..head.stream_len)
                        };
                        decoded = codec.decompress_unit(stream, out, needed);
                    }
                    let decoded =
                        decoded.map_err(|source| StoreError::Corrupt { index, source })?;
                    if decoded < needed || decoded > out.len() {
                        return Err(corrupt(format!(
                            "the unit decoded {decoded} bytes, short of {needed}"
                        )));
                    }
                    add(&counters.unit_decompressed_bytes, decoded as u64);
                    cache.tags[at] = (head.nonce, decoded);
                    at
                }
            };
            page.copy_from_slice(&cache.buffers[at][member * PAGE_SIZE..(member + 1) * PAGE_SIZE]);
            Ok(())
        })
    }

    /// How many pages of the unit `head` a read of its member `member` (page `index`) decodes:
    /// through the member, or as far as the thread's read request goes
    /// ([`PageStore::read_ahead`]), the whole unit when the request starts at or before it.
    fn pages_to_decode(&self, index: u64, member: usize, head: &Head) -> usize {
        let through = member + 1;
        let Some(request) = READ_AHEAD
            .get()
            .map(|(start, end)| start..end)
            .filter(|r| r.contains(&index))
        else {
            return through;
        };
        let first = head.first as u64;
        if request.start <= first && request.end > first + 1 {
            return head.pages;
        }
        let end = usize::try_from(request.end.saturating_sub(first)).unwrap_or(usize::MAX);
        through.max(end.min(head.pages))
    }

    /// The slot that held `old`, a Unit entry, names something else now: `old`'s member
    /// leaves the unit, and the last member out frees it (its head, and its pieces unless
    /// a copy of the head owns them). Called after the slot's unlock.
    pub(crate) fn leave_unit(&self, old: SlotEntry) {
        let bit = 1u32 << old.unit_index();
        // SAFETY: `old`'s bit is still set, so the unit is live (only the thread clearing the
        // last bit frees it, and ours is not cleared yet): its head can be read, and its mask
        // updated.
        let (head, before) = unsafe {
            (
                self.unit_head(old),
                self.unit_mask(old).fetch_and(!bit, Ordering::AcqRel),
            )
        };
        debug_assert!(before & bit != 0, "a member leaves its unit once");
        let after = before & !bit;
        if after == 0 {
            // SAFETY: we cleared the last bit: no slot names the unit and no one else will
            // free it, so we own it.
            unsafe { self.free_unit(old) };
            return;
        }
        // The unit's live share fell below the rewrite share: its last members are rewritten
        // page by page (by a worker, or here without workers), so that the stream's dead
        // pages stop costing memory.
        let Some(head) = head else {
            return;
        };
        let share = |mask: u32| mask.count_ones() as usize * REWRITE_SHARE;
        if share(before) >= head.pages && share(after) < head.pages {
            let rewrite = UnitRewrite {
                first: head.first,
                pages: head.pages,
                class: old.unit_class(),
                handle: old.handle(),
                nonce: head.nonce,
            };
            match &self.deferred {
                Some(deferred) => {
                    deferred.rewrites.fetch_add(1, Ordering::AcqRel);
                    deferred.queue.push_rewrite(rewrite);
                }
                None => self.rewrite_unit(rewrite),
            }
        }
    }

    /// Rewrites the members of a unit page by page, each under its own lock (DESIGN.md,
    /// "Units"): a member still naming the unit (the same head holding the same nonce) is
    /// decoded and stored on its own; the last one out frees the unit.
    pub(crate) fn rewrite_unit(&self, rewrite: UnitRewrite) {
        let mut page = [0u8; PAGE_SIZE];
        let mut rewrote = false;
        for i in 0..rewrite.pages {
            let slot = rewrite.first + i;
            let Some(mut guard) = self.slots.lock(slot) else {
                return;
            };
            let entry = guard.entry();
            let same_unit = entry.state() == SlotState::Unit
                && entry.unit_class() == rewrite.class
                && entry.handle() == rewrite.handle
                && entry.unit_index() == i
                // SAFETY: we hold the lock of a slot naming the head.
                && unsafe { self.unit_head(entry) }.is_some_and(|h| h.nonce == rewrite.nonce);
            if !same_unit {
                continue;
            }
            if self
                .read_unit_member(slot as u64, entry, &mut page)
                .is_err()
            {
                continue;
            }
            // What the page holds is unchanged: it keeps its idle bit and age.
            let Ok(new) = self.encode(&page) else {
                continue;
            };
            let new = new.with_idle(entry.is_idle()).with_age(entry.age());
            let swapped = guard.swap(new);
            drop(guard);
            self.account_swap(swapped, new);
            rewrote = true;
        }
        if rewrote {
            add(&self.counters.local().unit_rewrites, 1);
        }
    }

    /// Frees the unit `entry` names.
    ///
    /// # Safety
    /// The caller owns the unit: its live mask is empty and no slot names it.
    pub(crate) unsafe fn free_unit(&self, entry: SlotEntry) -> u64 {
        // SAFETY: owned by the caller.
        let superseded =
            unsafe { self.unit_flags(entry) }.load(Ordering::Acquire) & FLAG_SUPERSEDED != 0;
        if !superseded {
            // SAFETY: owned by the caller, so live.
            match unsafe { self.unit_head(entry) } {
                Some(head) => {
                    // SAFETY: as above.
                    let pieces = unsafe { self.unit_pieces(entry, &head) };
                    self.free_pieces(&pieces[..head.pieces]);
                    let c = self.counters.local();
                    sub(&c.units_stored, 1);
                    sub(&c.unit_bytes, head.stream_len as u64);
                    sub(&c.compr_data_size, head.stream_len as u64);
                    sub(&c.algorithm_bytes[entry.priority()], head.stream_len as u64);
                }
                None => log::error!(
                    "a unit's head (class {}, object {}) is damaged: its pieces leak",
                    entry.unit_class(),
                    entry.handle()
                ),
            }
        }
        // SAFETY: owned by the caller.
        self.alloc
            .free_stale(unsafe { StaleObject::unit_part(entry.unit_class(), entry.handle()) })
    }

    /// Counts a unit this thread stored and now publishes: it holds `stream_len` bytes of
    /// the algorithm of `priority`.
    pub(crate) fn count_new_unit(&self, stream_len: usize, priority: usize) {
        let c = self.counters.local();
        add(&c.units_stored, 1);
        add(&c.unit_bytes, stream_len as u64);
        add(&c.compr_data_size, stream_len as u64);
        add(&c.algorithm_bytes[priority], stream_len as u64);
    }

    /// Publishes a unit stored by [`store_unit`](Self::store_unit): each slot of `span` whose
    /// bit is in `members` gets its member entry (`flags(slot_offset)` gives the idle bit to
    /// keep). The members' old entries are accounted after the span's unlock.
    pub(crate) fn publish_unit(
        &self,
        mut span: LockedSpan<'_>,
        head: (usize, u64),
        members: u32,
        priority: usize,
        idle: impl Fn(usize, SlotEntry) -> bool,
    ) {
        let mut swapped: [Option<_>; MAX_UNIT_MEMBERS] = std::array::from_fn(|_| None);
        let first = span.first;
        for (i, guard) in span.guards_mut().enumerate() {
            if members & (1 << i) == 0 {
                continue;
            }
            let current = guard.entry();
            let new = SlotEntry::unit_member(head.0, head.1, i)
                .with_priority(priority)
                .with_idle(idle(i, current));
            swapped[i] = Some((guard.swap(new), new, first + i));
        }
        drop(span);
        for (swapped, new, slot) in swapped.into_iter().flatten() {
            self.dirty.mark(slot);
            self.account_swap(swapped, new);
        }
    }

    /// Recompression of the unit slot `slot` is the first live member of, whole: with its
    /// span locked, every member must still pass the pass's filter; the stream is decoded and
    /// compressed with each secondary algorithm above its priority (`lo..hi`), and the first
    /// result that takes less memory (pieces and head) replaces it, every member moving to
    /// the new head at once. When every secondary failed, the members are marked
    /// incompressible. Counts in `outcome` page by page.
    pub(crate) fn recompress_unit(
        &self,
        slot: usize,
        request: &super::RecompressRequest,
        lo: usize,
        hi: usize,
        outcome: &mut super::RecompressOutcome,
    ) {
        let Some((entry, head)) = self.locked_head(slot) else {
            return;
        };
        let mut span = self.lock_span(head.first, head.pages);
        let Some((members, entry, head)) = self.unit_in_span(&span, entry) else {
            return;
        };
        // Only from the first member, and only when every member passes the filter.
        if members.trailing_zeros() as usize != slot - head.first
            || !span
                .guards()
                .map(|g| g.entry())
                .filter(|&e| same_head(e, entry))
                .all(|e| super::recompress::selected_unit(e, request, hi))
        {
            return;
        }
        let count = u64::from(members.count_ones());
        // zram's threshold is per page: a unit's is its stream's share per member.
        let share = |len: usize| len / members.count_ones().max(1) as usize;
        if request.threshold != 0 && share(head.stream_len) < request.threshold {
            return;
        }
        let old_priority = entry.priority();
        let old_cost = unit_cost(head.stream_len);
        let unit = &mut [0u8; MAX_UNIT_MEMBERS * PAGE_SIZE][..head.pages * PAGE_SIZE];
        let mut stream = vec![0u8; crate::codec::UNIT_COMPRESS_BUFFER];
        // SAFETY: we hold the locks of the slots naming the head.
        unsafe { self.gather_stream(entry, &head, &mut stream[..head.stream_len]) };
        let decoded = self.codec_of(old_priority).ok().and_then(|codec| {
            codec
                .decompress_unit(&stream[..head.stream_len], unit, unit.len())
                .ok()
        });
        if decoded != Some(unit.len()) {
            log::warn!(
                "recompression skipped the unit at page {} it cannot read",
                head.first
            );
            return;
        }
        let c = self.counters.local();
        outcome.tried += count;
        add(&c.recompress_tried, count);
        let mut tried = 0;
        for priority in lo.max(old_priority + 1)..hi {
            let codec = &self.recompression.codecs[priority - 1];
            tried += 1;
            let Ok(len) = codec.compress_unit(unit, &mut stream) else {
                continue;
            };
            if !worth_a_unit(len, members.count_ones() as usize)
                || unit_cost(len) >= old_cost
                || (request.threshold != 0 && share(len) >= request.threshold)
            {
                continue;
            }
            let Ok(new_head) = self.store_unit(
                head.first,
                &stream[..len],
                head.pages,
                members,
                Some(head.nonce),
            ) else {
                return;
            };
            self.count_new_unit(len, priority);
            for (i, guard) in span.guards_mut().enumerate() {
                if members & (1 << i) != 0 {
                    let old = guard.entry();
                    // Recompression is not an access: idle bits and ages stay.
                    let new = SlotEntry::unit_member(new_head.0, new_head.1, i)
                        .with_priority(priority)
                        .with_idle(old.is_idle())
                        .with_age(old.age());
                    let swapped = guard.swap(new);
                    debug_assert!(swapped.stale.is_none());
                    drop(swapped.stale);
                    sub(&c.algorithm_pages[old_priority], 1);
                    add(&c.algorithm_pages[priority], 1);
                }
            }
            // SAFETY: the old head is live: its mask still holds our members' bits.
            let before = unsafe { self.unit_mask(entry) }.fetch_and(!members, Ordering::AcqRel);
            drop(span);
            if before & !members == 0 {
                // SAFETY: we cleared the last bit and no slot names the old unit.
                unsafe { self.free_unit(entry) };
            }
            let saved = head.stream_len.saturating_sub(len) as u64;
            outcome.recompressed += count;
            outcome.bytes_saved += saved;
            add(&c.recompressed, count);
            add(&c.recompress_saved, saved);
            return;
        }
        // zram marks a page only when every secondary algorithm failed on it.
        if tried == self.recompression.codecs.len() && tried > 0 {
            for (i, guard) in span.guards_mut().enumerate() {
                if members & (1 << i) != 0 {
                    let current = guard.entry();
                    guard.set_flags(current.with_incompressible(true));
                }
            }
            outcome.incompressible += count;
            add(&c.recompress_incompressible, count);
        }
    }

    /// The unit whose head `key` names, as `span` (locked) holds it: its members' bits, a
    /// member's entry and its head, read under the span's locks. `None` when no slot of the
    /// span names the head any more, or the head names another span: between the caller's
    /// first look and the span's locks the unit may have been freed and its head's object
    /// reused by another unit.
    fn unit_in_span(
        &self,
        span: &LockedSpan<'_>,
        key: SlotEntry,
    ) -> Option<(u32, SlotEntry, Head)> {
        let members: u32 = span
            .guards()
            .enumerate()
            .filter(|(_, g)| same_head(g.entry(), key))
            .fold(0, |m, (i, _)| m | 1 << i);
        let member = span
            .guards()
            .map(SlotGuard::entry)
            .find(|&e| same_head(e, key))?;
        // SAFETY: we hold the locks of the span, and a slot of it names the head.
        let head = unsafe { self.unit_head(member) }?;
        (head.first == span.first && head.pages == span.guards().count())
            .then_some((members, member, head))
    }

    /// Locks slot `slot` and reads the head of the unit it is a member of; `None` when it is
    /// not (any more) a member or its head is damaged.
    fn locked_head(&self, slot: usize) -> Option<(SlotEntry, Head)> {
        let guard = self.slots.lock(slot)?;
        let entry = guard.entry();
        if entry.state() != SlotState::Unit {
            return None;
        }
        // SAFETY: we hold the lock of a slot naming the head.
        let head = unsafe { self.unit_head(entry) }?;
        (head.first + head.pages <= self.slots.len()).then_some((entry, head))
    }

    /// Compaction: moves the head of the unit slot `slot` is a member of (`entry`) out of a
    /// victim chunk, with every member locked. Returns the pages the move gave back.
    pub(crate) fn move_unit_head(&self, slot: usize, entry: SlotEntry) -> u64 {
        let Some((_, head)) = self.locked_head(slot).filter(|&(e, _)| same_head(e, entry)) else {
            return 0;
        };
        let mut span = self.lock_span(head.first, head.pages);
        let Some((members, named, head)) = self.unit_in_span(&span, entry) else {
            return 0;
        };
        let len = head_len(head.stream_len, head.pieces);
        let mut bytes = [0u8; PAGE_SIZE];
        // SAFETY: the head is live (we hold its members' locks) and `len` long; its bytes past
        // the mask and flags never change. The mask and flags are read atomically below.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.alloc
                    .object_start(named.unit_class(), named.handle())
                    .add(8),
                bytes.as_mut_ptr().add(8),
                len - 8,
            );
        }
        bytes[0..4].copy_from_slice(&members.to_le_bytes());
        // Both at most 16.
        #[allow(clippy::cast_possible_truncation)]
        {
            bytes[4] = head.pages as u8;
            bytes[5] = head.pieces as u8;
        }
        let class = named.unit_class();
        let copy = if class == HUGE_CLASS {
            &bytes[..]
        } else {
            &bytes[..len]
        };
        // SAFETY: the head is live while we hold its members' locks.
        let Some(moved) = (unsafe { self.alloc.relocate_from(class, named.handle(), copy) }) else {
            return 0;
        };
        for (i, guard) in span.guards_mut().enumerate() {
            if members & (1 << i) != 0 {
                let current = guard.entry();
                let swapped = guard.swap(current.with_handle(moved));
                debug_assert!(swapped.stale.is_none());
                drop(swapped.stale);
            }
        }
        // The copy owns the pieces now; the old head keeps the bits of members whose
        // leaving is still in flight, and the last of them frees it alone.
        // SAFETY: the old head is live: its mask still holds our members' bits.
        unsafe { self.unit_flags(named) }.fetch_or(FLAG_SUPERSEDED, Ordering::AcqRel);
        // SAFETY: as above.
        let before = unsafe { self.unit_mask(named) }.fetch_and(!members, Ordering::AcqRel);
        drop(span);
        if before & !members == 0 {
            // SAFETY: we cleared the last bit and no slot names the old head any more.
            return unsafe { self.free_unit(named) };
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stream_length_splits_into_pieces_and_a_head_that_fits() {
        for len in 1..=MAX_STREAM {
            let pieces = pieces_for(len);
            assert!(pieces <= MAX_PIECES, "{len} bytes take {pieces} pieces");
            assert!(
                head_len(len, pieces) <= PAGE_SIZE,
                "{len} bytes: head too long"
            );
            let in_pieces: usize = (0..pieces).map(|j| piece_range(len, j).len()).sum();
            assert_eq!(in_pieces + head_tail(len, pieces), len, "{len} bytes");
            assert!((0..pieces).all(|j| !piece_range(len, j).is_empty()));
        }
    }

    #[test]
    fn a_write_splits_into_aligned_units_and_single_pages() {
        let units = Units::default();
        units.set_max_pages(16);
        let split: Vec<(u64, usize)> = units.split(3, 40).collect();
        assert_eq!(
            split,
            [(3, 1), (4, 4), (8, 8), (16, 16), (32, 8), (40, 2), (42, 1)]
        );
        units.set_max_pages(1);
        assert!(units.split(0, 4).all(|(_, n)| n == 1));
    }
}
