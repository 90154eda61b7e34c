// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The size-class slab allocator: our zsmalloc.
//!
//! Compressed objects are rounded up to a multiple of [`CLASS_STEP`] bytes and kept in the class
//! of that size. A class packs its objects back to back into *chunks* of one to
//! [`MAX_CHUNK_PAGES`] pages; unlike the kernel we run in user space, where a chunk is contiguous
//! virtual memory, so an object may span a page boundary and the chunk size is chosen per class
//! to waste least (see [`chunk_pages_for`]). Chunks live in *segments*: one anonymous mapping of
//! several chunks, reserved with `MAP_NORESERVE`, so the kernel supplies a chunk's pages only
//! when they are touched and takes them back (`MADV_DONTNEED`) when the chunk empties.
//!
//! There is no per-object header. An object is named by its *object number* within its class
//! (`chunk * objects_per_chunk + index`); the slot entry keeps that number and the compressed
//! size, from which the class follows. A free object holds the index of the next free object of
//! its chunk in its first two bytes (an embedded free list), and objects past a chunk's *bump*
//! mark have never been used.
//!
//! A chunk that empties is not always given back at once: each class keeps a small *reserve*
//! of empty chunks (at most [`RESERVE_CHUNKS`] a class, [`RESERVE_MAX_BYTES`] in all, and no
//! more than 1/[`RESERVE_FRACTION`] of the bytes in live chunks), still populated, and takes a
//! new chunk from it first. Steady overwrites empty a chunk in a class and need one again
//! moments later; the reserve saves the `madvise` pair (give back, populate) that would cost,
//! which with a state file means punching the chunk out of the file and allocating it again.
//! Compaction, a memory limit being hit and [`SlabAllocator::release_reserve`] give the
//! reserve back.
//!
//! Invariants (checked by [`SlabAllocator::check_consistency`]):
//! - every chunk is exactly one of: *live* (holds at least one object), *reserved* (holds no
//!   object, keeps its memory, is on its class's reserve list) or *dead* (holds no memory);
//! - a reserved chunk has used = 0, bump = 0, an empty free list, is neither a victim nor on
//!   the partial list, and is on the reserve list exactly once; a class reserves at most
//!   [`RESERVE_CHUNKS`], and `reserved_bytes` = Σ reserved chunks × chunk bytes
//!   ≤ [`RESERVE_MAX_BYTES`];
//! - a live chunk is on its class's partial list iff it has a free object and is not a
//!   compaction victim; the list is exact (each chunk at most once, `partial_pos` is its index);
//! - free-list length + (objects per chunk − bump) = objects per chunk − used;
//! - `live_bytes` = Σ (live + reserved chunks) × chunk bytes: a reserved chunk's memory is
//!   held from the OS, so it counts in [`SlabAllocator::bytes`] and `mem_used_total`.
//!
//! Concurrency: each class has one mutex over its chunk metadata. Object *contents* are read
//! and written without it: the owner of an object (the thread holding the slot lock that
//! references it) is the only one that touches it, and a segment's mapping never moves while
//! the allocator lives.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock};

use super::slot::{StaleObject, MAX_HANDLE};
use crate::PAGE_SIZE;

/// Object sizes are rounded up to a multiple of this.
pub const CLASS_STEP: usize = 16;
/// The largest chunk, in pages.
pub const MAX_CHUNK_PAGES: usize = 16;
/// The chain length used to derive the huge threshold, as zsmalloc's default chain size.
const HUGE_CHAIN_PAGES: usize = 8;
/// The largest compressed size worth keeping compressed: the biggest class of which a chunk of
/// [`HUGE_CHAIN_PAGES`] pages still holds one object more than it has pages (3632 bytes with
/// 4 KiB pages, zsmalloc's `huge_class_size` with its default chain). Larger results are stored
/// raw, as huge pages.
pub const HUGE_THRESHOLD: usize =
    HUGE_CHAIN_PAGES * PAGE_SIZE / (HUGE_CHAIN_PAGES + 1) / CLASS_STEP * CLASS_STEP;
/// The classes for compressed objects: 16, 32, ..., [`HUGE_THRESHOLD`] bytes.
pub const COMPRESSED_CLASSES: usize = HUGE_THRESHOLD / CLASS_STEP;
/// The class of raw pages.
pub const HUGE_CLASS: usize = COMPRESSED_CLASSES;
/// Segments are this large (or one chunk, if a chunk is larger).
const SEGMENT_BYTES: usize = 2 << 20;
/// The most empty chunks a class keeps in its reserve. Measured with the bench tool's
/// `--compare-state` on 1 GiB of swap-like random writes: 2 a class (and 1 MiB, 1/128) left the
/// state file's random writes at 0.92× anonymous memory, 8 (8 MiB, 1/64) at 0.97×, and raised
/// both by about 10 %.
pub const RESERVE_CHUNKS: usize = 8;
/// The most bytes all reserves hold together.
pub const RESERVE_MAX_BYTES: u64 = 8 << 20;
/// A chunk is reserved only while the reserves stay within 1/this of the bytes of live chunks
/// (so a small store keeps next to nothing in reserve).
pub const RESERVE_FRACTION: u64 = 64;

/// The most objects a chunk of any class holds: the 16-byte class's one-page chunk (256), and
/// every odd multiple of 16 bytes gets a chunk of as many pages, so 256 again (checked where
/// the classes are built and by a test). It bounds object numbers, and so the largest device
/// (see `MAX_CAPACITY_PAGES` in the store and DESIGN.md, "The object number").
pub const MAX_OBJECTS_PER_CHUNK: usize = 256;

/// Linux's `MADV_POPULATE_WRITE` (5.14).
const MADV_POPULATE_WRITE: libc::c_int = 23;

const NONE16: u16 = u16::MAX;
const NONE32: u32 = u32::MAX;

/// Errors from the allocator.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AllocError {
    /// A new chunk would take the store past its memory limit.
    #[error("the memory limit of {limit} bytes is reached")]
    MemoryLimit {
        /// The limit for the allocator's own memory.
        limit: u64,
    },
    /// The operating system refused memory.
    #[error("the operating system refused {bytes} bytes of memory")]
    OutOfMemory {
        /// The size of the refused mapping.
        bytes: usize,
    },
}

/// The class for an object of `len` bytes (1..=[`HUGE_THRESHOLD`]), or [`HUGE_CLASS`] for a raw
/// page.
pub fn class_of(len: usize) -> usize {
    if len > HUGE_THRESHOLD {
        HUGE_CLASS
    } else {
        len.max(1).div_ceil(CLASS_STEP) - 1
    }
}

/// The object size of `class`.
pub fn class_size(class: usize) -> usize {
    if class >= HUGE_CLASS {
        PAGE_SIZE
    } else {
        (class + 1) * CLASS_STEP
    }
}

/// The chunk size, in pages, for objects of `size` bytes: the smallest chunk whose unusable tail
/// is under 0.25% of it, or else the one with the least waste. Small chunks keep the
/// partly-filled chunk of each class small and make compaction fine-grained; the 0.25% bound
/// was chosen by measuring the store benchmark at 1%, 0.5%, 0.25% and 0.1% (the total overhead
/// stops falling at 0.25%).
pub fn chunk_pages_for(size: usize) -> usize {
    let waste = |pages: usize| (pages * PAGE_SIZE) % size;
    let tolerable = (1..=MAX_CHUNK_PAGES).find(|&p| waste(p) * 400 < p * PAGE_SIZE);
    tolerable.unwrap_or_else(|| {
        (1..=MAX_CHUNK_PAGES)
            .min_by(|&a, &b| (waste(a) * b).cmp(&(waste(b) * a)))
            .unwrap_or(MAX_CHUNK_PAGES)
    })
}

/// What a chunk's memory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// No memory: given back to the OS (or never populated).
    Dead,
    /// At least one object.
    Live,
    /// No object, but the chunk keeps its (populated) memory, on its class's reserve list.
    Reserved,
}

#[derive(Debug, Clone, Copy)]
struct ChunkMeta {
    /// Objects in use.
    used: u16,
    /// First free object below `bump`, or [`NONE16`].
    free_head: u16,
    /// Objects at and past this index have never been handed out.
    bump: u16,
    /// Whether the chunk holds objects, or memory without objects, or nothing.
    held: Held,
    /// Whether compaction is emptying the chunk (it takes no new objects).
    victim: bool,
    /// Index in the class's partial list, or [`NONE32`].
    partial_pos: u32,
}

impl ChunkMeta {
    const DEAD: ChunkMeta = ChunkMeta {
        used: 0,
        free_head: NONE16,
        bump: 0,
        held: Held::Dead,
        victim: false,
        partial_pos: NONE32,
    };
    const RESERVED: ChunkMeta = ChunkMeta {
        held: Held::Reserved,
        ..ChunkMeta::DEAD
    };

    fn is_live(&self) -> bool {
        self.held == Held::Live
    }
}

/// One anonymous mapping holding several chunks of a class.
/// An anonymous `MAP_NORESERVE` mapping, unmapped on drop: memory is reserved, and costs
/// only where it is touched. Chunks live in segments; the pending pool is one.
#[derive(Debug)]
pub(crate) struct Segment {
    base: NonNull<u8>,
    bytes: usize,
    /// Whether this is a shared mapping of a state file (freed memory is removed from the
    /// file with `MADV_REMOVE`) rather than anonymous memory (`MADV_DONTNEED`).
    shared: bool,
}

// SAFETY: a Segment is an owned anonymous mapping; its pointer is only dereferenced under the
// allocator's ownership rules (module doc), never through shared mutable aliasing.
unsafe impl Send for Segment {}
// SAFETY: as above; &Segment only exposes the base address.
unsafe impl Sync for Segment {}

impl Segment {
    /// Maps `bytes` of fresh, zero-filled memory.
    pub(crate) fn map(bytes: usize) -> Result<Segment, AllocError> {
        // SAFETY: an anonymous private mapping with no address hint touches no existing memory;
        // the result is checked for MAP_FAILED before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(AllocError::OutOfMemory { bytes });
        }
        let base = NonNull::new(ptr.cast::<u8>()).ok_or(AllocError::OutOfMemory { bytes })?;
        Ok(Segment {
            base,
            bytes,
            shared: false,
        })
    }

    /// Maps `bytes` of the file `fd` at `offset`, shared and read-write.
    pub(crate) fn map_shared(
        fd: std::os::fd::BorrowedFd<'_>,
        offset: u64,
        bytes: usize,
    ) -> std::io::Result<Segment> {
        use std::os::fd::AsRawFd;
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: a shared file mapping with no address hint touches no existing memory; the
        // result is checked for MAP_FAILED before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                // No reservation: on hugetlbfs the regions are far larger than what is used.
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let base = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::OutOfMemory))?;
        Ok(Segment {
            base,
            bytes,
            shared: true,
        })
    }

    /// Gives the memory of `len` bytes at `ptr` (inside this segment) back to the OS; they
    /// read as zeros afterwards. For a state file the pages leave the file too.
    ///
    /// # Safety
    /// The range must lie inside this segment and hold nothing anyone still uses.
    pub(crate) unsafe fn discard(&self, ptr: *mut u8, len: usize) {
        let advice = if self.shared {
            libc::MADV_REMOVE
        } else {
            libc::MADV_DONTNEED
        };
        // SAFETY: by this function's contract the range is inside our mapping and unused.
        unsafe { libc::madvise(ptr.cast(), len, advice) };
    }

    /// [`discard`](Self::discard), saying whether the OS took the range back (hugetlbfs
    /// refuses ranges smaller than its page; the bytes then stay as they were).
    ///
    /// # Safety
    /// As for [`discard`](Self::discard).
    pub(crate) unsafe fn discard_checked(&self, ptr: *mut u8, len: usize) -> bool {
        let advice = if self.shared {
            libc::MADV_REMOVE
        } else {
            libc::MADV_DONTNEED
        };
        // SAFETY: by this function's contract the range is inside our mapping and unused.
        unsafe { libc::madvise(ptr.cast(), len, advice) == 0 }
    }

    /// The mapping's length.
    pub(crate) fn len(&self) -> usize {
        self.bytes
    }

    /// The first byte of the mapping.
    pub(crate) fn base(&self) -> *mut u8 {
        self.base.as_ptr()
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        // SAFETY: base/bytes are exactly the mapping made in `map`, and no object reference
        // outlives the allocator that owns the segment.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}

#[derive(Debug, Default)]
struct ClassInner {
    chunks: Vec<ChunkMeta>,
    /// Live, non-victim chunks with a free object.
    partial: Vec<u32>,
    /// Ids of dead chunks, for reuse.
    dead: Vec<u32>,
    /// Ids of reserved chunks (empty, still populated), taken before dead ones.
    reserve: Vec<u32>,
    live_chunks: u64,
    used_objects: u64,
    victims: Vec<u32>,
}

/// One size class.
#[derive(Debug)]
struct SizeClass {
    size: usize,
    chunk_bytes: usize,
    objects_per_chunk: usize,
    chunks_per_segment: usize,
    inner: Mutex<ClassInner>,
    segments: RwLock<Vec<Segment>>,
    has_victims: AtomicBool,
}

/// A snapshot of one class, for statistics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ClassStats {
    /// Object size in bytes.
    pub size: usize,
    /// Pages per chunk.
    pub chunk_pages: usize,
    /// Objects per chunk.
    pub objects_per_chunk: usize,
    /// Live chunks.
    pub live_chunks: u64,
    /// Objects in use.
    pub used_objects: u64,
}

/// The allocator: all size classes and the memory they hold.
#[derive(Debug)]
pub struct SlabAllocator {
    classes: Box<[SizeClass]>,
    /// Bytes of live and reserved chunks.
    live_bytes: AtomicU64,
    /// Bytes of reserved chunks (part of `live_bytes`).
    reserved_bytes: AtomicU64,
    /// Chunks given back to the OS (`madvise`), for tests and measurements.
    discards: AtomicU64,
    /// Bytes of metadata (chunk tables, lists, segment tables).
    meta_bytes: AtomicU64,
    /// Where segments come from with a state file (`None`: anonymous memory).
    extents: Option<Extents>,
    /// The largest object number a slot can name ([`MAX_HANDLE`]; lower in tests of the
    /// guard that refuses a chunk past it).
    max_object: u64,
}

/// A directory entry names a used extent: this bit, the class (bits 32-47) and the segment's
/// index in its class (bits 0-31).
const EXTENT_USED: u64 = 1 << 63;

/// The slab area of a state file: extents of [`super::state::EXTENT_BYTES`], each mapped as
/// one segment, and the directory that says which class and segment each one is.
#[derive(Debug)]
pub(crate) struct Extents {
    state: std::sync::Arc<super::state::StateFile>,
    directory: Segment,
    /// The directory's offset in the file.
    directory_offset: u64,
    slab: u64,
    max: u64,
    /// The next unused extent.
    next: Mutex<u64>,
}

impl Extents {
    /// The slab area of `state` as its header's layout places it.
    pub(crate) fn new(
        state: std::sync::Arc<super::state::StateFile>,
        layout: &super::state::Layout,
    ) -> std::io::Result<Extents> {
        let bytes = usize::try_from(layout.directory.1)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        let directory = state.map(layout.directory.0, bytes)?;
        Ok(Extents {
            state,
            directory,
            directory_offset: layout.directory.0,
            slab: layout.slab,
            max: layout.max_extents,
            next: Mutex::new(0),
        })
    }

    // `extent` < max, and max entries are mapped in this process: it fits a usize.
    #[allow(clippy::cast_possible_truncation)]
    fn entry(&self, extent: u64) -> &AtomicU64 {
        debug_assert!(extent < self.max);
        // SAFETY: the directory maps `max` eight-byte entries, page-aligned, so entry
        // `extent` (< max) is an aligned u64 inside it; AtomicU64 has u64's layout, and every
        // access to the directory is atomic.
        unsafe {
            &*self
                .directory
                .base()
                .cast::<AtomicU64>()
                .add(extent as usize)
        }
    }

    /// Maps a new extent for segment `index` of `class` and records it in the directory
    /// before anything can be stored in it.
    fn take(&self, class: usize, index: usize, bytes: usize) -> Result<Segment, AllocError> {
        let mut next = lock(&self.next);
        if *next >= self.max {
            log::error!(
                "the state file {} has no free slab extent left ({} in all)",
                self.state.name(),
                self.max
            );
            return Err(AllocError::OutOfMemory { bytes });
        }
        let extent = *next;
        let offset = self.slab + extent * super::state::EXTENT_BYTES;
        let segment = self
            .state
            .map(offset, bytes)
            .map_err(|_| AllocError::OutOfMemory { bytes })?;
        self.entry(extent).store(
            EXTENT_USED | ((class as u64) << 32) | index as u64,
            Ordering::Release,
        );
        *next += 1;
        Ok(segment)
    }
}

impl Default for SlabAllocator {
    fn default() -> Self {
        Self::new()
    }
}

impl SlabAllocator {
    /// An empty allocator (it holds no memory until the first object).
    pub fn new() -> SlabAllocator {
        SlabAllocator::with_extents(None)
    }

    /// An empty allocator whose segments come from `extents` (a state file), or anonymous
    /// memory when `None`.
    pub(crate) fn with_extents(extents: Option<Extents>) -> SlabAllocator {
        let classes: Box<[SizeClass]> = (0..=HUGE_CLASS)
            .map(|class| {
                let size = class_size(class);
                let chunk_pages = if class == HUGE_CLASS {
                    1
                } else {
                    chunk_pages_for(size)
                };
                let chunk_bytes = chunk_pages * PAGE_SIZE;
                assert!(
                    chunk_bytes / size <= MAX_OBJECTS_PER_CHUNK,
                    "class {class} would hold more than MAX_OBJECTS_PER_CHUNK objects a chunk"
                );
                SizeClass {
                    size,
                    chunk_bytes,
                    objects_per_chunk: chunk_bytes / size,
                    chunks_per_segment: (SEGMENT_BYTES / chunk_bytes).max(1),
                    inner: Mutex::new(ClassInner::default()),
                    segments: RwLock::new(Vec::new()),
                    has_victims: AtomicBool::new(false),
                }
            })
            .collect();
        let classes: Box<[SizeClass]> = classes;
        let fixed = std::mem::size_of_val(&*classes) as u64;
        SlabAllocator {
            classes,
            live_bytes: AtomicU64::new(0),
            reserved_bytes: AtomicU64::new(0),
            discards: AtomicU64::new(0),
            meta_bytes: AtomicU64::new(fixed),
            extents,
            max_object: MAX_HANDLE,
        }
    }

    /// An anonymous allocator whose object numbers stop at `max_object` (tests of the guard
    /// in `take_from_new_chunk`).
    #[cfg(test)]
    fn with_max_object(max_object: u64) -> SlabAllocator {
        SlabAllocator {
            max_object,
            ..SlabAllocator::new()
        }
    }

    /// A new segment of `bytes` for segment `index` of `class`.
    fn new_segment(&self, class: usize, index: usize, bytes: usize) -> Result<Segment, AllocError> {
        match &self.extents {
            None => Segment::map(bytes),
            Some(extents) => extents.take(class, index, bytes),
        }
    }

    /// Bytes the allocator holds from the OS: live chunks plus metadata.
    pub fn bytes(&self) -> u64 {
        self.live_bytes.load(Ordering::Relaxed) + self.meta_bytes.load(Ordering::Relaxed)
    }

    /// Bytes of chunks alone: live ones and the reserve.
    pub fn chunk_bytes(&self) -> u64 {
        self.live_bytes.load(Ordering::Relaxed)
    }

    /// Bytes of the reserved (empty but populated) chunks, part of [`chunk_bytes`](Self::chunk_bytes).
    pub fn reserved_bytes(&self) -> u64 {
        self.reserved_bytes.load(Ordering::Relaxed)
    }

    /// How many chunks have been given back to the OS since the allocator was made.
    #[cfg(test)]
    pub fn discarded_chunks(&self) -> u64 {
        self.discards.load(Ordering::Relaxed)
    }

    /// Gives every reserved chunk back to the OS. Returns the pages given back.
    pub fn release_reserve(&self) -> u64 {
        let mut pages = 0;
        for c in self.classes.iter() {
            let mut inner = lock(&c.inner);
            while let Some(chunk) = inner.reserve.pop() {
                let chunk = chunk as usize;
                inner.chunks[chunk] = ChunkMeta::DEAD;
                // `dead` has room for every chunk id (take_from_new_chunk reserves it).
                let before = inner.dead.capacity();
                inner.dead.push(u32::try_from(chunk).unwrap_or(NONE32));
                self.grew(before, inner.dead.capacity(), 4);
                self.reserved_bytes
                    .fetch_sub(c.chunk_bytes as u64, Ordering::Relaxed);
                self.live_bytes
                    .fetch_sub(c.chunk_bytes as u64, Ordering::Relaxed);
                self.discard_chunk(c, chunk);
                pages += (c.chunk_bytes / PAGE_SIZE) as u64;
            }
        }
        pages
    }

    /// Allocates an object in `class` and copies `data` (at most the class size) into it.
    /// A new chunk is only taken while `bytes()` stays within `limit`; before the limit
    /// refuses one, the reserves of every class are given back and the chunk tried again.
    pub fn store(&self, class: usize, data: &[u8], limit: Option<u64>) -> Result<u64, AllocError> {
        let c = &self.classes[class];
        debug_assert!(data.len() <= c.size);
        let take = || {
            let mut inner = lock(&c.inner);
            match take_from_partial(c, &mut inner) {
                Some(object) => Ok(object),
                None => self.take_from_new_chunk(c, &mut inner, limit),
            }
        };
        let object = match take() {
            // Without the class lock: release_reserve locks every class in turn.
            Err(AllocError::MemoryLimit { .. }) if self.release_reserve() > 0 => take()?,
            taken => taken?,
        };
        // SAFETY: the object was just handed out, so no one else references it, and it lies in
        // a live chunk of a mapped segment (object_ptr's contract); data fits the class size.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), object_ptr(c, object), data.len());
        }
        Ok(object)
    }

    /// The first `len` bytes of `object` in `class`.
    ///
    /// # Safety
    /// `object` must be live (returned by [`store`](Self::store) and not yet freed) and the
    /// caller must own it — hold the slot lock of the slot that references it — for as long as
    /// the returned slice lives, so that it is neither freed nor moved meanwhile.
    pub unsafe fn object(&self, class: usize, object: u64, len: usize) -> &[u8] {
        let c = &self.classes[class];
        debug_assert!(len <= c.size);
        // SAFETY: by this function's contract the object is live and owned by the caller, so
        // its `len` (≤ class size) bytes are mapped, initialised by `store` and not written by
        // anyone else while the slice lives.
        unsafe { std::slice::from_raw_parts(object_ptr(c, object), len) }
    }

    /// Frees `object` of `class`. Returns the pages given back to the OS (a chunk that emptied).
    /// The store frees through [`free_stale`](Self::free_stale), whose token makes the
    /// contract below hold.
    ///
    /// # Safety
    /// `object` must be live in `class` and owned by the caller (see [`object`](Self::object)):
    /// no slot references it any more, and neither the caller nor anyone else uses it again.
    /// Freeing an object twice, or one a slot still names, corrupts the chunk's free list and
    /// hands the same memory to two pages.
    pub unsafe fn free(&self, class: usize, object: u64) -> u64 {
        let c = &self.classes[class];
        let mut inner = lock(&c.inner);
        self.free_locked(c, &mut inner, object)
    }

    fn free_locked(&self, c: &SizeClass, inner: &mut ClassInner, object: u64) -> u64 {
        let (chunk, index) = split(c, object);
        let meta = inner.chunks[chunk];
        debug_assert!(meta.is_live() && meta.used > 0 && index < meta.bump);
        // SAFETY: the caller owns the object and gives it up; writing the free-list link into
        // its first two bytes (every object is at least 16 bytes) touches nothing else, and the
        // class lock we hold serialises free-list updates of this chunk.
        unsafe {
            object_ptr(c, object)
                .cast::<u16>()
                .write_unaligned(meta.free_head)
        };
        let meta = &mut inner.chunks[chunk];
        meta.free_head = index;
        meta.used -= 1;
        inner.used_objects -= 1;
        if inner.chunks[chunk].used == 0 {
            return self.release_chunk(c, inner, chunk);
        }
        if !inner.chunks[chunk].victim && inner.chunks[chunk].partial_pos == NONE32 {
            self.list_partial(inner, chunk);
        }
        0
    }

    fn take_from_new_chunk(
        &self,
        c: &SizeClass,
        inner: &mut ClassInner,
        limit: Option<u64>,
    ) -> Result<u64, AllocError> {
        // Grow the metadata first, so that the limit check below sees every byte this chunk
        // will cost and nothing grows after it.
        self.reserve(&mut inner.chunks, 1, std::mem::size_of::<ChunkMeta>());
        self.reserve(&mut inner.partial, 1, 4);
        // The dead list can come to hold every chunk id.
        let dead_room = inner.chunks.len() + 1 - inner.dead.len();
        self.reserve(&mut inner.dead, dead_room, 4);
        self.reserve(&mut *write(&c.segments), 1, std::mem::size_of::<Segment>());
        if let Some(chunk) = inner.reserve.pop() {
            // Already populated and counted in `live_bytes`: no limit check, no madvise. Its
            // metadata is a fresh chunk's (bump 0, no free list), so none of its stale bytes
            // is ever handed out as an object's.
            let chunk = chunk as usize;
            debug_assert!(
                inner.chunks[chunk].held == Held::Reserved && inner.chunks[chunk].used == 0
            );
            self.reserved_bytes
                .fetch_sub(c.chunk_bytes as u64, Ordering::Relaxed);
            inner.chunks[chunk] = ChunkMeta {
                held: Held::Live,
                ..ChunkMeta::DEAD
            };
            inner.live_chunks += 1;
            self.list_partial(inner, chunk);
            return take_from_partial(c, inner).ok_or(AllocError::OutOfMemory {
                bytes: c.chunk_bytes,
            });
        }
        if let Some(limit) = limit {
            if self.bytes() + c.chunk_bytes as u64 > limit {
                return Err(AllocError::MemoryLimit { limit });
            }
        }
        let chunk = match inner.dead.pop() {
            Some(chunk) => chunk as usize,
            None => {
                let chunk = inner.chunks.len();
                // Unreachable within MAX_CAPACITY_PAGES (DESIGN.md, "The object number"), but
                // a slot must never be handed an object number it cannot hold: refuse the
                // chunk (the write fails, its slot keeps its old content) rather than wrap.
                let last = ((chunk + 1) * c.objects_per_chunk - 1) as u64;
                if last > self.max_object {
                    log::error!(
                        "size class {} has no object number left for chunk {chunk} (the \
                         largest a slot holds is {})",
                        c.size,
                        self.max_object
                    );
                    return Err(AllocError::OutOfMemory {
                        bytes: c.chunk_bytes,
                    });
                }
                let index = chunk / c.chunks_per_segment;
                if index >= read(&c.segments).len() {
                    let bytes = c.chunk_bytes * c.chunks_per_segment;
                    let segment = self.new_segment(class_of(c.size), index, bytes)?;
                    let mut segments = write(&c.segments);
                    let before = segments.capacity();
                    segments.push(segment);
                    self.grew(before, segments.capacity(), std::mem::size_of::<Segment>());
                }
                let before = inner.chunks.capacity();
                inner.chunks.push(ChunkMeta::DEAD);
                self.grew(
                    before,
                    inner.chunks.capacity(),
                    std::mem::size_of::<ChunkMeta>(),
                );
                chunk
            }
        };
        // Fault the chunk's pages in with one call rather than one fault a page; a kernel
        // without MADV_POPULATE_WRITE (before 5.14) says EINVAL and the pages fault on use.
        // SAFETY: the chunk lies inside a mapped segment and holds no object yet.
        unsafe {
            libc::madvise(
                chunk_ptr(c, chunk).cast(),
                c.chunk_bytes,
                MADV_POPULATE_WRITE,
            );
        }
        inner.chunks[chunk] = ChunkMeta {
            held: Held::Live,
            ..ChunkMeta::DEAD
        };
        inner.live_chunks += 1;
        self.live_bytes
            .fetch_add(c.chunk_bytes as u64, Ordering::Relaxed);
        self.list_partial(inner, chunk);
        take_from_partial(c, inner).ok_or(AllocError::OutOfMemory {
            bytes: c.chunk_bytes,
        })
    }

    /// Takes an emptied chunk out of use: into its class's reserve if there is room (a
    /// compaction victim never goes there: compaction is giving memory back), else back to
    /// the OS. Returns the pages given back.
    fn release_chunk(&self, c: &SizeClass, inner: &mut ClassInner, chunk: usize) -> u64 {
        unlist_partial(inner, chunk);
        let victim = inner.chunks[chunk].victim;
        inner.live_chunks -= 1;
        if !victim && inner.reserve.len() < RESERVE_CHUNKS && self.take_reserve_room(c) {
            inner.chunks[chunk] = ChunkMeta::RESERVED;
            let before = inner.reserve.capacity();
            inner.reserve.push(u32::try_from(chunk).unwrap_or(NONE32));
            self.grew(before, inner.reserve.capacity(), 4);
            return 0;
        }
        inner.chunks[chunk] = ChunkMeta::DEAD;
        let before = inner.dead.capacity();
        inner.dead.push(u32::try_from(chunk).unwrap_or(NONE32));
        self.grew(before, inner.dead.capacity(), 4);
        self.live_bytes
            .fetch_sub(c.chunk_bytes as u64, Ordering::Relaxed);
        self.discard_chunk(c, chunk);
        (c.chunk_bytes / PAGE_SIZE) as u64
    }

    /// Counts one more chunk of `c` in `reserved_bytes` if the reserves' byte bounds allow
    /// it; returns whether they did.
    fn take_reserve_room(&self, c: &SizeClass) -> bool {
        let bytes = c.chunk_bytes as u64;
        self.reserved_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |reserved| {
                let in_use = self
                    .live_bytes
                    .load(Ordering::Relaxed)
                    .saturating_sub(reserved + bytes);
                let total = reserved + bytes;
                (total <= RESERVE_MAX_BYTES && total <= in_use / RESERVE_FRACTION).then_some(total)
            })
            .is_ok()
    }

    /// Gives a dead chunk's memory back to the OS (and, in a state file, to the file system).
    fn discard_chunk(&self, c: &SizeClass, chunk: usize) {
        self.discards.fetch_add(1, Ordering::Relaxed);
        discard_chunk(c, chunk);
    }

    fn list_partial(&self, inner: &mut ClassInner, chunk: usize) {
        let before = inner.partial.capacity();
        inner.chunks[chunk].partial_pos = u32::try_from(inner.partial.len()).unwrap_or(NONE32);
        inner.partial.push(u32::try_from(chunk).unwrap_or(NONE32));
        self.grew(before, inner.partial.capacity(), 4);
    }

    fn reserve<T>(&self, v: &mut Vec<T>, additional: usize, elem: usize) {
        let before = v.capacity();
        v.reserve(additional);
        self.grew(before, v.capacity(), elem);
    }

    fn grew(&self, before: usize, after: usize, elem: usize) {
        if after > before {
            self.meta_bytes
                .fetch_add(((after - before) * elem) as u64, Ordering::Relaxed);
        }
    }

    /// Starts a compaction: in every class, marks the sparsest chunks whose objects fit in the
    /// free space of the others as victims; they take no new objects. Returns whether any class
    /// has victims.
    pub fn begin_compaction(&self) -> bool {
        let mut any = false;
        for c in self.classes.iter() {
            let mut inner = lock(&c.inner);
            let per_chunk = c.objects_per_chunk as u64;
            let needed = inner.used_objects.div_ceil(per_chunk);
            let spare = inner.live_chunks.saturating_sub(needed);
            if spare == 0 {
                continue;
            }
            let mut candidates: Vec<(u16, u32)> = inner
                .chunks
                .iter()
                .enumerate()
                .filter(|(_, m)| m.is_live())
                .map(|(i, m)| (m.used, u32::try_from(i).unwrap_or(NONE32)))
                .collect();
            candidates.sort_unstable();
            let spare = usize::try_from(spare).unwrap_or(usize::MAX);
            inner.victims = candidates.iter().take(spare).map(|&(_, i)| i).collect();
            for v in inner.victims.clone() {
                unlist_partial(&mut inner, v as usize);
                inner.chunks[v as usize].victim = true;
            }
            c.has_victims.store(true, Ordering::Relaxed);
            any = true;
        }
        any
    }

    /// Whether `class` has compaction victims (a cheap check before taking a slot lock).
    pub fn class_has_victims(&self, class: usize) -> bool {
        self.classes[class].has_victims.load(Ordering::Relaxed)
    }

    /// Copies `object` (of `len` bytes) out of a victim chunk into a new object of its class,
    /// without taking a new chunk. Returns the new object's number, or `None` when the object
    /// is not in a victim or no room is left. The old object stays live: the caller points its
    /// slot at the new one, and frees the old one with the [`StaleObject`] that swap gives.
    ///
    /// # Safety
    /// `object` must be live in `class`, hold at least `len` bytes of data, and be owned by the
    /// caller (see [`object`](Self::object)) for the duration of the call.
    pub unsafe fn relocate(&self, class: usize, object: u64, len: usize) -> Option<u64> {
        let c = &self.classes[class];
        self.relocate_into(class, object, |moved| {
            // SAFETY: the old object is owned by the caller (by contract), the new one was
            // just handed out; they are distinct, live and at least `len` bytes long.
            unsafe { std::ptr::copy_nonoverlapping(object_ptr(c, object), moved, len) };
        })
    }

    /// Takes a new object of `class` from a partial chunk when `object` lies in a victim
    /// chunk, lets `fill` write it (given its first byte; the class size long) and returns
    /// it; `None` otherwise.
    fn relocate_into(&self, class: usize, object: u64, fill: impl FnOnce(*mut u8)) -> Option<u64> {
        let c = &self.classes[class];
        let mut inner = lock(&c.inner);
        let (chunk, _) = split(c, object);
        if !inner
            .chunks
            .get(chunk)
            .is_some_and(|m| m.is_live() && m.victim)
        {
            return None;
        }
        let moved = take_from_partial(c, &mut inner)?;
        fill(object_ptr(c, moved));
        Some(moved)
    }

    /// [`relocate`](Self::relocate) for an object whose bytes the caller supplies: when
    /// `object` lies in a victim chunk, takes a new object of its class from a partial chunk
    /// (never a new chunk), copies `data` (at most the class size) into it and returns it;
    /// `None` otherwise. The old object stays live. Used for a unit's head, whose shared
    /// header other threads may update with atomics while it is copied.
    ///
    /// # Safety
    /// `object` must be live in `class` (see [`object`](Self::object)) for the duration of
    /// the call.
    pub(crate) unsafe fn relocate_from(
        &self,
        class: usize,
        object: u64,
        data: &[u8],
    ) -> Option<u64> {
        assert!(
            data.len() <= self.classes[class].size,
            "a relocated object fits its class"
        );
        self.relocate_into(class, object, |moved| {
            // SAFETY: `moved` was just handed out to us, live and at least the class size
            // long; `data` is a distinct slice of at most that many bytes.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), moved, data.len()) };
        })
    }

    /// The first byte of `object` in `class`, for the unit heads' header, which several
    /// threads read and update (with atomics) at once.
    ///
    /// # Safety
    /// `object` must be live in `class` while the pointer is used (see
    /// [`object`](Self::object)).
    pub(crate) unsafe fn object_start(&self, class: usize, object: u64) -> *mut u8 {
        object_ptr(&self.classes[class], object)
    }

    /// Frees the object a slot swap orphaned, consuming its token. Returns the pages given
    /// back to the OS (a chunk that emptied).
    pub fn free_stale(&self, stale: StaleObject) -> u64 {
        let (class, object) = stale.into_parts();
        // SAFETY: a `StaleObject` is made once per object that left its slot (or was never
        // published), is neither `Clone` nor `Copy`, and was consumed above: this is the
        // object's one free, and no slot references it, so no one reads it any more.
        unsafe { self.free(class, object) }
    }

    /// Ends a compaction: victims that still hold objects take new ones again, and the
    /// reserves are given back (compaction is for returning memory). Returns the pages the
    /// reserves gave back.
    pub fn end_compaction(&self) -> u64 {
        for c in self.classes.iter() {
            let mut inner = lock(&c.inner);
            for v in std::mem::take(&mut inner.victims) {
                let meta = inner.chunks[v as usize];
                if meta.is_live() && meta.victim {
                    inner.chunks[v as usize].victim = false;
                    if usize::from(meta.used) < c.objects_per_chunk {
                        self.list_partial(&mut inner, v as usize);
                    }
                }
            }
            c.has_victims.store(false, Ordering::Relaxed);
        }
        self.release_reserve()
    }

    /// Recovery, first step: maps every extent the state file's directory records as the
    /// segment it was, in its class. A segment index the directory skips (never written by
    /// this allocator, which records an extent before using it) gets a fresh extent; it is
    /// returned, and no object in it is trusted. An entry naming no class is left out (its
    /// extent punched).
    pub(crate) fn adopt_extents(&self) -> std::io::Result<Vec<(usize, usize)>> {
        let Some(extents) = &self.extents else {
            return Ok(Vec::new());
        };
        let mut found: Vec<Vec<Option<u64>>> = vec![Vec::new(); self.classes.len()];
        let mut used = 0;
        // Only the directory's populated pages can hold entries; reading its holes through
        // the shared mapping would allocate them (64 MiB for a 1 TiB device).
        let populated = extents
            .state
            .data_ranges(extents.directory_offset, extents.directory.len() as u64)?;
        let entries = populated
            .into_iter()
            .flat_map(|r| r.start / 8..r.end.div_ceil(8).min(extents.max));
        for extent in entries {
            let e = extents.entry(extent).load(Ordering::Acquire);
            if e == 0 {
                continue;
            }
            used = extent + 1;
            // Masked to 16 and 32 bits.
            #[allow(clippy::cast_possible_truncation)]
            let (class, index) = (((e >> 32) & 0xffff) as usize, (e & 0xffff_ffff) as usize);
            let known =
                e & EXTENT_USED != 0 && class < self.classes.len() && (index as u64) < extents.max;
            let slot = known.then(|| &mut found[class]);
            match slot {
                Some(list) if list.get(index).is_none_or(Option::is_none) => {
                    if list.len() <= index {
                        list.resize(index + 1, None);
                    }
                    list[index] = Some(extent);
                }
                Some(_) | None => {
                    log::warn!(
                        "the state file {}: slab extent {extent} has a damaged directory entry \
                         ({e:#x}); its memory is given back",
                        extents.state.name()
                    );
                    extents.entry(extent).store(0, Ordering::Release);
                    extents.state.punch(
                        extents.slab + extent * super::state::EXTENT_BYTES,
                        super::state::EXTENT_BYTES,
                    );
                }
            }
        }
        *lock(&extents.next) = used;
        let mut fresh = Vec::new();
        for (class, list) in found.into_iter().enumerate() {
            let c = &self.classes[class];
            let bytes = c.chunk_bytes * c.chunks_per_segment;
            let mut segments = write(&c.segments);
            let before = segments.capacity();
            for (index, extent) in list.into_iter().enumerate() {
                let segment = match extent {
                    Some(extent) => extents
                        .state
                        .map(extents.slab + extent * super::state::EXTENT_BYTES, bytes)?,
                    None => {
                        fresh.push((class, index));
                        extents
                            .take(class, index, bytes)
                            .map_err(std::io::Error::other)?
                    }
                };
                segments.push(segment);
            }
            self.grew(before, segments.capacity(), std::mem::size_of::<Segment>());
        }
        Ok(fresh)
    }

    /// Whether `object` of `class` lies in a segment this allocator has, outside `fresh`.
    pub(crate) fn object_in_range(
        &self,
        class: usize,
        object: u64,
        fresh: &[(usize, usize)],
    ) -> bool {
        let Some(c) = self.classes.get(class) else {
            return false;
        };
        let (chunk, _) = split(c, object);
        let segment = chunk / c.chunks_per_segment;
        segment < read(&c.segments).len() && !fresh.contains(&(class, segment))
    }

    /// Recovery, second step: rebuilds every class's chunk metadata from the objects the slot
    /// table references (`by_class[class]`: in range, each named once): a chunk is live iff
    /// it holds one, its free list links the unreferenced objects below its highest one, and
    /// every chunk nothing references is given back to the OS (punched).
    pub(crate) fn rebuild(&self, by_class: &[Vec<u64>]) {
        for (class, c) in self.classes.iter().enumerate() {
            let segments = read(&c.segments).len();
            let mut inner = lock(&c.inner);
            let chunks = segments * c.chunks_per_segment;
            let mut referenced = vec![Vec::<u16>::new(); chunks];
            for &object in by_class.get(class).map_or(&[][..], |v| &v[..]) {
                let (chunk, index) = split(c, object);
                if let Some(list) = referenced.get_mut(chunk) {
                    list.push(index);
                }
            }
            let before = (inner.chunks.capacity(), inner.dead.capacity());
            // Reserved chunks hold nothing referenced: the loop below punches them like any
            // other unreferenced chunk.
            for _ in inner.reserve.drain(..) {
                self.reserved_bytes
                    .fetch_sub(c.chunk_bytes as u64, Ordering::Relaxed);
                self.live_bytes
                    .fetch_sub(c.chunk_bytes as u64, Ordering::Relaxed);
            }
            inner.chunks = vec![ChunkMeta::DEAD; chunks];
            inner.partial.clear();
            inner.dead.clear();
            inner.dead.reserve(chunks + 1);
            inner.live_chunks = 0;
            inner.used_objects = 0;
            for (chunk, mut indices) in referenced.into_iter().enumerate().rev() {
                if indices.is_empty() {
                    discard_chunk(c, chunk);
                    inner.dead.push(u32::try_from(chunk).unwrap_or(NONE32));
                    continue;
                }
                indices.sort_unstable();
                let bump = indices[indices.len() - 1] + 1;
                let mut free_head = NONE16;
                let mut next_used = indices.len();
                for index in (0..bump).rev() {
                    if next_used > 0 && indices[next_used - 1] == index {
                        next_used -= 1;
                        continue;
                    }
                    let object = (chunk * c.objects_per_chunk + usize::from(index)) as u64;
                    // SAFETY: the object lies below bump in a chunk of a mapped segment and no
                    // slot references it, so its first two bytes are ours to link.
                    unsafe {
                        object_ptr(c, object)
                            .cast::<u16>()
                            .write_unaligned(free_head)
                    };
                    free_head = index;
                }
                let used = u16::try_from(indices.len()).unwrap_or(u16::MAX);
                inner.chunks[chunk] = ChunkMeta {
                    used,
                    free_head,
                    bump,
                    held: Held::Live,
                    victim: false,
                    partial_pos: NONE32,
                };
                inner.live_chunks += 1;
                inner.used_objects += u64::from(used);
                self.live_bytes
                    .fetch_add(c.chunk_bytes as u64, Ordering::Relaxed);
                if usize::from(used) < c.objects_per_chunk {
                    self.list_partial(&mut inner, chunk);
                }
            }
            self.grew(
                before.0,
                inner.chunks.capacity(),
                std::mem::size_of::<ChunkMeta>(),
            );
            self.grew(before.1, inner.dead.capacity(), 4);
        }
    }

    /// A snapshot of every class.
    pub fn class_stats(&self) -> Vec<ClassStats> {
        self.classes
            .iter()
            .map(|c| {
                let inner = lock(&c.inner);
                ClassStats {
                    size: c.size,
                    chunk_pages: c.chunk_bytes / PAGE_SIZE,
                    objects_per_chunk: c.objects_per_chunk,
                    live_chunks: inner.live_chunks,
                    used_objects: inner.used_objects,
                }
            })
            .collect()
    }

    #[cfg(test)]
    /// The chunk that holds `object` of `class` and its address (for tests and the checker).
    pub fn chunk_of(&self, class: usize, object: u64) -> (usize, *const u8) {
        let c = &self.classes[class];
        let (chunk, _) = split(c, object);
        (chunk, chunk_ptr(c, chunk).cast_const())
    }

    /// Walks every class and checks the invariants in the module doc. `referenced(class)` lists
    /// the object numbers the slot table references in that class. Debug aid: it locks one class
    /// at a time and is slow.
    pub fn check_consistency(&self, referenced: &dyn Fn(usize) -> Vec<u64>) -> Result<(), String> {
        let mut live_bytes = 0u64;
        let mut reserved_bytes = 0u64;
        for (class, c) in self.classes.iter().enumerate() {
            let inner = lock(&c.inner);
            if inner.reserve.len() > RESERVE_CHUNKS {
                return Err(format!(
                    "class {class}: {} chunks reserved",
                    inner.reserve.len()
                ));
            }
            let mut on_reserve = std::collections::HashSet::new();
            for &chunk in &inner.reserve {
                let listed = inner
                    .chunks
                    .get(chunk as usize)
                    .is_some_and(|m| m.held == Held::Reserved);
                if !listed || !on_reserve.insert(chunk) {
                    return Err(format!(
                        "class {class}: reserve entry {chunk} is not a reserved chunk, or twice"
                    ));
                }
            }
            if let Some(chunk) = inner.dead.iter().find(|d| on_reserve.contains(d)) {
                return Err(format!("class {class}: chunk {chunk} is dead and reserved"));
            }
            let mut used_by_chunk = vec![0usize; inner.chunks.len()];
            let mut seen = std::collections::HashSet::new();
            for object in referenced(class) {
                let (chunk, index) = split(c, object);
                let meta = inner
                    .chunks
                    .get(chunk)
                    .ok_or(format!("class {class}: {object} past the chunks"))?;
                if !meta.is_live() || index >= meta.bump {
                    return Err(format!("class {class}: object {object} is not allocated"));
                }
                if !seen.insert(object) {
                    return Err(format!("class {class}: object {object} referenced twice"));
                }
                used_by_chunk[chunk] += 1;
            }
            let mut live = 0;
            for (i, meta) in inner.chunks.iter().enumerate() {
                if usize::from(meta.used) != used_by_chunk[i] {
                    return Err(format!(
                        "class {class} chunk {i}: used {} but {} referenced",
                        meta.used, used_by_chunk[i]
                    ));
                }
                if meta.is_live() != (meta.used > 0) {
                    return Err(format!(
                        "class {class} chunk {i}: live={} used={}",
                        meta.is_live(),
                        meta.used
                    ));
                }
                if meta.held == Held::Reserved {
                    let fresh = meta.bump == 0
                        && meta.free_head == NONE16
                        && !meta.victim
                        && meta.partial_pos == NONE32;
                    if !fresh || !on_reserve.contains(&u32::try_from(i).unwrap_or(NONE32)) {
                        return Err(format!(
                            "class {class} chunk {i}: reserved but not an empty, listed chunk \
                             ({meta:?})"
                        ));
                    }
                    reserved_bytes += c.chunk_bytes as u64;
                    continue;
                }
                if !meta.is_live() {
                    continue;
                }
                live += 1;
                let mut free = 0usize;
                let mut next = meta.free_head;
                while next != NONE16 {
                    if next >= meta.bump || free > c.objects_per_chunk {
                        return Err(format!("class {class} chunk {i}: free list is broken"));
                    }
                    free += 1;
                    let object = (i * c.objects_per_chunk + usize::from(next)) as u64;
                    // SAFETY: `next` is below bump in a live chunk, so the object is mapped; it
                    // is free, so only its link (written under this class lock) is read.
                    next = unsafe { object_ptr(c, object).cast::<u16>().read_unaligned() };
                }
                let unused = c.objects_per_chunk - usize::from(meta.bump);
                if free + unused != c.objects_per_chunk - usize::from(meta.used) {
                    return Err(format!("class {class} chunk {i}: free objects miscounted"));
                }
                let should_list = !meta.victim && usize::from(meta.used) < c.objects_per_chunk;
                let listed = meta.partial_pos != NONE32
                    && inner.partial.get(meta.partial_pos as usize)
                        == u32::try_from(i).ok().as_ref();
                if should_list != listed {
                    return Err(format!(
                        "class {class} chunk {i}: partial list membership wrong"
                    ));
                }
            }
            if inner.partial.len()
                != inner
                    .chunks
                    .iter()
                    .filter(|m| m.partial_pos != NONE32)
                    .count()
            {
                return Err(format!("class {class}: partial list has stale entries"));
            }
            if live != inner.live_chunks {
                return Err(format!(
                    "class {class}: live_chunks {} but {live} live",
                    inner.live_chunks
                ));
            }
            live_bytes += live * c.chunk_bytes as u64;
        }
        live_bytes += reserved_bytes;
        if reserved_bytes != self.reserved_bytes() || reserved_bytes > RESERVE_MAX_BYTES {
            return Err(format!(
                "reserved bytes {} but reserved chunks hold {reserved_bytes}",
                self.reserved_bytes()
            ));
        }
        if live_bytes != self.chunk_bytes() {
            return Err(format!(
                "live bytes {} but chunks hold {live_bytes}",
                self.chunk_bytes()
            ));
        }
        Ok(())
    }
}

fn split(c: &SizeClass, object: u64) -> (usize, u16) {
    let object = usize::try_from(object).unwrap_or(usize::MAX);
    // An index is below objects_per_chunk ≤ MAX_OBJECTS_PER_CHUNK, so it fits u16.
    #[allow(clippy::cast_possible_truncation)]
    let index = (object % c.objects_per_chunk) as u16;
    (object / c.objects_per_chunk, index)
}

fn take_from_partial(c: &SizeClass, inner: &mut ClassInner) -> Option<u64> {
    let chunk = *inner.partial.last()? as usize;
    let meta = &mut inner.chunks[chunk];
    let index = if meta.free_head != NONE16 {
        let index = meta.free_head;
        let object = (chunk * c.objects_per_chunk + usize::from(index)) as u64;
        // SAFETY: a free object below bump in a live chunk is mapped; its link was written by
        // free_locked under the class lock, which we hold.
        meta.free_head = unsafe { object_ptr(c, object).cast::<u16>().read_unaligned() };
        index
    } else {
        meta.bump += 1;
        meta.bump - 1
    };
    meta.used += 1;
    inner.used_objects += 1;
    if usize::from(meta.used) == c.objects_per_chunk {
        unlist_partial(inner, chunk);
    }
    Some((chunk * c.objects_per_chunk + usize::from(index)) as u64)
}

fn unlist_partial(inner: &mut ClassInner, chunk: usize) {
    let pos = inner.chunks[chunk].partial_pos;
    if pos == NONE32 {
        return;
    }
    inner.partial.swap_remove(pos as usize);
    if let Some(&moved) = inner.partial.get(pos as usize) {
        inner.chunks[moved as usize].partial_pos = pos;
    }
    inner.chunks[chunk].partial_pos = NONE32;
}

/// Gives a dead chunk's memory back to the OS (and, in a state file, to the file system).
fn discard_chunk(c: &SizeClass, chunk: usize) {
    let segments = read(&c.segments);
    let segment = &segments[chunk / c.chunks_per_segment];
    // SAFETY: the chunk is dead: no object in it is referenced, so discarding its pages (they
    // read back as zeros) loses nothing; its range lies inside its segment.
    unsafe {
        let ptr = segment
            .base
            .as_ptr()
            .add((chunk % c.chunks_per_segment) * c.chunk_bytes);
        segment.discard(ptr, c.chunk_bytes);
    }
}

fn chunk_ptr(c: &SizeClass, chunk: usize) -> *mut u8 {
    let segments = read(&c.segments);
    let segment = &segments[chunk / c.chunks_per_segment];
    // SAFETY: the offset of a chunk inside its segment is below the segment's size.
    unsafe {
        segment
            .base
            .as_ptr()
            .add((chunk % c.chunks_per_segment) * c.chunk_bytes)
    }
}

/// The address of `object`.
///
/// The object's chunk must have been created (its segment is mapped): true for every object
/// number the allocator handed out.
fn object_ptr(c: &SizeClass, object: u64) -> *mut u8 {
    let (chunk, index) = split(c, object);
    // SAFETY: index < objects_per_chunk, so the object lies inside its chunk.
    unsafe { chunk_ptr(c, chunk).add(usize::from(index) * c.size) }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the metadata consistent before it can panic, so a poisoned
    // lock's data is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn huge_threshold_matches_zsmalloc() {
        assert_eq!(HUGE_THRESHOLD, 3632);
        assert_eq!(class_of(1), 0);
        assert_eq!(class_of(16), 0);
        assert_eq!(class_of(17), 1);
        assert_eq!(class_of(3632), COMPRESSED_CLASSES - 1);
        assert_eq!(class_of(3633), HUGE_CLASS);
        assert_eq!(class_size(HUGE_CLASS), PAGE_SIZE);
    }

    #[test]
    fn no_class_holds_more_than_max_objects_per_chunk() {
        let mut most = 0;
        for class in 0..=HUGE_CLASS {
            let pages = if class == HUGE_CLASS {
                1
            } else {
                chunk_pages_for(class_size(class))
            };
            most = most.max(pages * PAGE_SIZE / class_size(class));
        }
        assert_eq!(most, MAX_OBJECTS_PER_CHUNK, "the bound is tight");
        let stats = SlabAllocator::new().class_stats();
        assert!(stats
            .iter()
            .all(|c| c.objects_per_chunk <= MAX_OBJECTS_PER_CHUNK));
    }

    #[test]
    fn a_chunk_past_the_largest_object_number_is_refused() {
        // Two chunks of the 16-byte class (256 objects each) fit below 512.
        let a = SlabAllocator::with_max_object(2 * MAX_OBJECTS_PER_CHUNK as u64 - 1);
        let class = class_of(16);
        let mut objects = Vec::new();
        for _ in 0..2 * MAX_OBJECTS_PER_CHUNK {
            let handle = a.store(class, &[7; 16], None).unwrap();
            assert!(handle < 2 * MAX_OBJECTS_PER_CHUNK as u64);
            objects.push((class, handle));
        }
        let refused = a.store(class, &[7; 16], None);
        assert!(
            matches!(refused, Err(AllocError::OutOfMemory { .. })),
            "a third chunk would pass the ceiling: {refused:?}"
        );
        a.check_consistency(&referenced(&objects)).unwrap();
        // A freed object's number is reused, so the class goes on working below the ceiling.
        let (_, first) = objects.swap_remove(0);
        // SAFETY: `first` was stored above and nothing else refers to it.
        unsafe { a.free(class, first) };
        let again = a.store(class, &[8; 16], None).unwrap();
        assert_eq!(again, first);
        objects.push((class, again));
        a.check_consistency(&referenced(&objects)).unwrap();
        for (class, handle) in objects {
            // SAFETY: each was stored above and is freed once.
            unsafe { a.free(class, handle) };
        }
    }

    #[test]
    fn chunk_sizes_waste_little() {
        let mut worst = 0.0f64;
        for class in 0..COMPRESSED_CLASSES {
            let size = class_size(class);
            let pages = chunk_pages_for(size);
            let waste = ((pages * PAGE_SIZE) % size) as f64 / (pages * PAGE_SIZE) as f64;
            worst = worst.max(waste);
        }
        assert!(worst < 0.03, "worst tail waste {worst}");
    }

    fn referenced(objects: &[(usize, u64)]) -> impl Fn(usize) -> Vec<u64> + '_ {
        move |class| {
            objects
                .iter()
                .filter(|o| o.0 == class)
                .map(|o| o.1)
                .collect()
        }
    }

    #[test]
    fn store_read_free_reuse() {
        let a = SlabAllocator::new();
        let class = class_of(100);
        let data: Vec<u8> = (0..100u8).collect();
        let objects: Vec<u64> = (0..1000)
            .map(|_| a.store(class, &data, None).unwrap())
            .collect();
        let held: Vec<_> = objects.iter().map(|&o| (class, o)).collect();
        a.check_consistency(&referenced(&held)).unwrap();
        for &o in &objects {
            // SAFETY: the test owns every object it stored.
            assert_eq!(unsafe { a.object(class, o, 100) }, &data[..]);
        }
        let per_chunk = class_size(class);
        assert!(a.chunk_bytes() as usize >= 1000 * per_chunk);
        for &o in &objects[..500] {
            // SAFETY: the test owns every object it stored and frees or moves each once.
            unsafe { a.free(class, o) };
        }
        a.check_consistency(&referenced(&held[500..])).unwrap();
        let again = a.store(class, &data, None).unwrap();
        assert!(objects[..500].contains(&again), "a freed object is reused");
    }

    #[test]
    fn empty_chunks_are_given_back() {
        let a = SlabAllocator::new();
        let class = class_of(2000);
        let objects: Vec<u64> = (0..100)
            .map(|_| a.store(class, &[7u8; 2000], None).unwrap())
            .collect();
        assert!(a.chunk_bytes() > 0);
        let mut pages = 0;
        for o in objects {
            // SAFETY: the test owns every object it stored and frees or moves each once.
            pages += unsafe { a.free(class, o) };
        }
        assert_eq!(a.chunk_bytes(), a.reserved_bytes());
        assert!(pages > 0);
        a.check_consistency(&|_| Vec::new()).unwrap();
        a.release_reserve();
        assert_eq!(a.chunk_bytes(), 0);
        a.check_consistency(&|_| Vec::new()).unwrap();
    }

    #[test]
    fn limit_refuses_new_chunks() {
        let a = SlabAllocator::new();
        let class = class_of(1000);
        let limit = 256 * 1024;
        let mut stored = 0;
        loop {
            match a.store(class, &[1u8; 1000], Some(limit)) {
                Ok(_) => stored += 1,
                Err(e) => {
                    assert_eq!(e, AllocError::MemoryLimit { limit });
                    break;
                }
            }
            assert!(stored < 1000, "the limit never bit");
        }
        assert!(a.bytes() <= limit);
        assert!(stored >= 190, "stored only {stored}");
    }

    #[test]
    fn compaction_empties_sparse_chunks() {
        let a = SlabAllocator::new();
        let class = class_of(512);
        let mut objects: Vec<(usize, u64)> = (0..2000u32)
            .map(|i| {
                (
                    class,
                    a.store(class, &i.to_le_bytes().repeat(128), None).unwrap(),
                )
            })
            .collect();
        // Free three of every four objects: every chunk stays live but sparse.
        let mut kept = Vec::new();
        for (i, o) in objects.drain(..).enumerate() {
            if i % 4 == 0 {
                kept.push((i, o));
            } else {
                // SAFETY: the test owns every object it stored and frees or moves each once.
                unsafe { a.free(o.0, o.1) };
            }
        }
        let before = a.chunk_bytes();
        assert!(a.begin_compaction());
        let mut freed_pages = 0;
        for (i, o) in kept.iter_mut() {
            // SAFETY: the test owns every object it stored and frees or moves each once.
            if let Some(moved) = unsafe { a.relocate(class, o.1, 512) } {
                // SAFETY: as above: the old object is the test's, and is freed once, here.
                freed_pages += unsafe { a.free(class, o.1) };
                o.1 = moved;
            }
            // SAFETY: the test owns the object.
            let bytes = unsafe { a.object(class, o.1, 512) };
            let expect = u32::try_from(*i).unwrap().to_le_bytes().repeat(128);
            assert_eq!(bytes, &expect[..], "object {i} survived the move");
        }
        freed_pages += a.end_compaction();
        assert_eq!(a.reserved_bytes(), 0, "compaction gives the reserve back");
        let held: Vec<_> = kept.iter().map(|k| k.1).collect();
        a.check_consistency(&referenced(&held)).unwrap();
        let after = a.chunk_bytes();
        assert!(after * 3 < before, "compaction freed {before} -> {after}");
        assert_eq!(freed_pages * PAGE_SIZE as u64, before - after);
    }

    #[test]
    fn freed_chunk_pages_leave_memory() {
        let a = SlabAllocator::new();
        let class = HUGE_CLASS;
        let object = a.store(class, &[0xa5; PAGE_SIZE], None).unwrap();
        let (_, addr) = a.chunk_of(class, object);
        let resident = |addr: *const u8| {
            let mut vec = 0u8;
            // SAFETY: addr is page-aligned inside a live mapping of the allocator, and mincore
            // writes one byte for one page into `vec`.
            let rc = unsafe { libc::mincore(addr as *mut libc::c_void, PAGE_SIZE, &mut vec) };
            assert_eq!(rc, 0);
            vec & 1 == 1
        };
        assert!(resident(addr));
        // SAFETY: the test owns every object it stored and frees or moves each once.
        unsafe { a.free(class, object) };
        assert!(
            !resident(addr),
            "the freed chunk's page went back to the OS"
        );
    }

    /// Stores `count` raw pages of ballast, so that the reserve's fraction bound allows a few
    /// chunks.
    fn ballast(a: &SlabAllocator, count: usize) -> Vec<(usize, u64)> {
        (0..count)
            .map(|_| {
                (
                    HUGE_CLASS,
                    a.store(HUGE_CLASS, &[3u8; PAGE_SIZE], None).unwrap(),
                )
            })
            .collect()
    }

    /// Objects of 256 bytes in one more one-page chunk than a class's reserve holds.
    const CHURN_OBJECTS: u8 = ((RESERVE_CHUNKS + 1) * PAGE_SIZE / 256) as u8;

    /// Fills one more one-page chunk of the 256-byte class than the reserve holds, checks the
    /// data and frees it all.
    fn churn_round(a: &SlabAllocator, round: u8) {
        let class = class_of(256);
        let objects: Vec<u64> = (0..CHURN_OBJECTS)
            .map(|i| a.store(class, &[round ^ i; 256], None).unwrap())
            .collect();
        for (i, &o) in (0..CHURN_OBJECTS).zip(&objects) {
            // SAFETY: the test owns every object it stored.
            assert_eq!(unsafe { a.object(class, o, 256) }, &[round ^ i; 256][..]);
        }
        for o in objects {
            // SAFETY: the test owns every object it stored and frees each once.
            unsafe { a.free(class, o) };
        }
    }

    #[test]
    fn churn_reuses_a_bounded_reserve() {
        let a = SlabAllocator::new();
        let held = ballast(&a, 1024);
        let class = class_of(256);
        assert_eq!(chunk_pages_for(class_size(class)), 1);
        let base = a.chunk_bytes();
        let discards = a.discarded_chunks();
        for round in 0..50 {
            churn_round(&a, round);
            // All but one of the emptied chunks stay in reserve, counted; the last goes back.
            assert_eq!(a.reserved_bytes(), (RESERVE_CHUNKS * PAGE_SIZE) as u64);
            assert_eq!(a.chunk_bytes(), base + a.reserved_bytes());
            a.check_consistency(&referenced(&held)).unwrap();
        }
        // Without the reserve each round would give back RESERVE_CHUNKS + 1 chunks.
        assert_eq!(a.discarded_chunks() - discards, 50);
        assert_eq!(a.release_reserve(), RESERVE_CHUNKS as u64);
        assert_eq!((a.reserved_bytes(), a.chunk_bytes()), (0, base));
        assert_eq!(a.discarded_chunks() - discards, 50 + RESERVE_CHUNKS as u64);
        a.check_consistency(&referenced(&held)).unwrap();
    }

    #[test]
    fn the_reserve_stays_within_its_fraction_of_live_memory() {
        let a = SlabAllocator::new();
        // 32 pages of ballast allow half a page of reserve: nothing is kept.
        let held = ballast(&a, 32);
        churn_round(&a, 1);
        assert_eq!(a.reserved_bytes(), 0);
        a.check_consistency(&referenced(&held)).unwrap();
    }

    #[test]
    fn compaction_gives_the_reserve_back() {
        let a = SlabAllocator::new();
        let held = ballast(&a, 1024);
        churn_round(&a, 7);
        assert_eq!(a.reserved_bytes(), (RESERVE_CHUNKS * PAGE_SIZE) as u64);
        let discards = a.discarded_chunks();
        a.begin_compaction();
        assert_eq!(a.end_compaction(), RESERVE_CHUNKS as u64);
        assert_eq!(a.reserved_bytes(), 0);
        assert_eq!(a.discarded_chunks() - discards, RESERVE_CHUNKS as u64);
        a.check_consistency(&referenced(&held)).unwrap();
    }

    #[test]
    fn the_memory_limit_takes_the_reserve_before_refusing() {
        let a = SlabAllocator::new();
        let mut held = ballast(&a, 1024);
        churn_round(&a, 9);
        assert_eq!(a.reserved_bytes(), (RESERVE_CHUNKS * PAGE_SIZE) as u64);
        // Fill one chunk of another one-page class, so its next object needs a new chunk.
        let class = class_of(512);
        for _ in 0..PAGE_SIZE / 512 {
            held.push((class, a.store(class, &[5u8; 512], None).unwrap()));
        }
        // Less than a chunk of room: only the reserve can make it.
        let limit = a.bytes() + PAGE_SIZE as u64 / 2;
        let object = a.store(class, &[6u8; 512], Some(limit)).unwrap();
        held.push((class, object));
        assert_eq!(a.reserved_bytes(), 0);
        assert!(a.bytes() <= limit, "{} > {limit}", a.bytes());
        a.check_consistency(&referenced(&held)).unwrap();
        // With the reserve gone, the limit refuses.
        let mut refused = false;
        for _ in 0..(RESERVE_CHUNKS + 2) * PAGE_SIZE / 512 {
            match a.store(class, &[6u8; 512], Some(limit)) {
                Ok(object) => held.push((class, object)),
                Err(e) => {
                    assert_eq!(e, AllocError::MemoryLimit { limit });
                    refused = true;
                    break;
                }
            }
        }
        assert!(refused, "the limit never bit");
        assert!(a.bytes() <= limit);
        a.check_consistency(&referenced(&held)).unwrap();
    }

    #[test]
    fn the_checker_catches_a_corrupt_reserve() {
        let a = SlabAllocator::new();
        let held = ballast(&a, 1024);
        churn_round(&a, 2);
        a.check_consistency(&referenced(&held)).unwrap();
        let c = &a.classes[class_of(256)];
        let reserved = lock(&c.inner).reserve[0] as usize;
        let corrupt = |change: &dyn Fn(&mut ClassInner)| {
            let saved = {
                let mut inner = lock(&c.inner);
                let saved = (
                    inner.chunks.clone(),
                    inner.reserve.clone(),
                    inner.dead.clone(),
                );
                change(&mut inner);
                saved
            };
            let found = a.check_consistency(&referenced(&held));
            let mut inner = lock(&c.inner);
            (inner.chunks, inner.reserve, inner.dead) = saved;
            found
        };
        let used = corrupt(&|inner| inner.chunks[reserved].used = 1);
        assert!(used.is_err(), "a reserved chunk with used > 0");
        let bump = corrupt(&|inner| inner.chunks[reserved].bump = 3);
        assert!(bump.is_err(), "a reserved chunk with a bump mark");
        let unlisted = corrupt(&|inner| {
            inner.reserve.pop();
        });
        assert!(unlisted.is_err(), "a reserved chunk off the reserve list");
        let twice = corrupt(&|inner| inner.reserve.push(inner.reserve[0]));
        assert!(twice.is_err(), "a chunk on the reserve twice");
        let dead = corrupt(&|inner| inner.dead.push(inner.reserve[0]));
        assert!(dead.is_err(), "a reserved chunk on the dead list");
        let not_reserved = corrupt(&|inner| inner.chunks[reserved] = ChunkMeta::DEAD);
        assert!(not_reserved.is_err(), "a dead chunk on the reserve list");
        a.check_consistency(&referenced(&held)).unwrap();
    }
}
