// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The backing file: where writeback puts idle and incompressible pages.
//!
//! A [`BackingFile`] is a regular file (created if missing, sparse, never preallocated) or a
//! block device. It stores *objects*: compressed pages (1..=3632 bytes) or raw pages (4096
//! bytes), named by their byte offset in the file and their length, which the slot table
//! keeps. There is no header and no on-disk metadata: the file's contents mean nothing
//! without the slot table, and a file left by an earlier run is truncated when it is opened.
//!
//! # Packing
//! [`BackingFile::write_batch`] packs a batch of objects back to back (an object may span a
//! 4 KiB block boundary) into one contiguous run of blocks and writes the run with one
//! `pwrite` (looping only on short writes). The run's last block is usually partly filled: it
//! stays the *open block*, whose bytes are kept in memory, and the next batch starts in it
//! (rewriting its first bytes unchanged), so the file holds about what RAM held. If the blocks
//! after the open block are taken, the open block is abandoned, partly filled, and the batch
//! starts a fresh run.
//!
//! # Free space
//! Each block has a count of the live objects that touch it (an object spanning two blocks
//! counts in both), plus one *pin* while it is the open block, so the open block is never
//! freed under a batch that is writing into it. [`BackingFile::release`] decrements the counts;
//! a block reaching zero is freed and its range punched out of the file
//! (`FALLOC_FL_PUNCH_HOLE`), so the file's disk usage shrinks. Free blocks are kept as
//! coalesced extents (a `BTreeMap` of start to length). A batch that cannot continue in the
//! open block takes the first extent that holds its whole run (first fit, a scan in offset
//! order), else an extent that ends at the end of the file, extended by appending, else
//! appends. When a write that grows the file fails for lack of space, the batch is tried
//! once more in the first free extent inside the file that holds it, if any.
//!
//! The honest limitations: a block that still holds one live object stays allocated, since
//! nothing compacts partly dead blocks, so scattered releases can leave the file holding up
//! to two blocks per live object (one that spans a boundary touches two); and first fit is a
//! linear scan of the extents.
//!
//! # Direct I/O
//! The file is opened with `O_DIRECT` so the page cache does not double the memory writeback
//! is saving. Every write is whole blocks from a 4096-aligned buffer, every read the one or
//! two blocks covering an object, into an aligned buffer, copied out. Where the filesystem
//! refuses `O_DIRECT` (`EINVAL`, e.g. ramfs or an older tmpfs) the file falls back to buffered
//! I/O: each written range is synced (`sync_file_range`) and dropped from the page cache
//! (`POSIX_FADV_DONTNEED`), and each read range dropped after reading.
//!
//! # Invariants (checked by [`BackingFile::check_consistency`])
//! - `counts[b]` = the live objects touching block `b`, plus one if `b` is the open block;
//! - a block is in exactly one free extent iff its count is zero; extents are coalesced and
//!   lie inside the file (below the high-water mark `counts.len()`);
//! - live objects do not overlap, lie inside the file, and those in the open block end within
//!   its filled part;
//! - `live_bytes`, `objects`, `used_blocks` and `free_blocks` are the sums they name.
//!
//! # Concurrency
//! Two locks, taken in this order: `writer` (the open block and the batch buffer; held for a
//! whole batch, so batches are serialised) and `space` (the counts and extents; held briefly,
//! never across a write). A batch plans its run under `space`, writes without it, and commits
//! (or, on error, changes nothing) under it again: only a batch allocates, so the run's blocks
//! stay free meanwhile, and the open block is pinned. [`BackingFile::release`] takes `space`
//! and punches under it, so a block is punched before it can be reused. [`BackingFile::read`]
//! takes no lock: the caller owns the object (holds its slot), so the blocks it touches stay
//! allocated, and a batch rewriting the open block writes the same bytes over the object.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// The unit of allocation, and of every read and write.
pub const BLOCK_SIZE: usize = 4096;
const BLOCK: u64 = BLOCK_SIZE as u64;
/// The largest object: a raw page.
pub const MAX_OBJECT: usize = BLOCK_SIZE;
/// Objects lie below this byte offset: a slot records offsets in 44 bits.
pub const MAX_FILE_BYTES: u64 = 1 << 44;

/// `BLKGETSIZE64`, `_IOR(0x12, 114, u64)` in the asm-generic ioctl layout (x86, arm, riscv).
const BLKGETSIZE64: u64 = (2 << 30) | (8 << 16) | (0x12 << 8) | 114;

/// One block of a buffer for `O_DIRECT`: aligned to, and as large as, a block.
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Block([u8; BLOCK_SIZE]);

const ZERO_BLOCK: Block = Block([0; BLOCK_SIZE]);

fn as_bytes_mut(blocks: &mut [Block]) -> &mut [u8] {
    // SAFETY: Block is repr(C) over [u8; BLOCK_SIZE] with size == align == BLOCK_SIZE, so it
    // has no padding and `blocks` is blocks.len() * BLOCK_SIZE initialised contiguous bytes;
    // they are borrowed exclusively for the returned lifetime, and any byte pattern is a
    // valid Block.
    unsafe {
        std::slice::from_raw_parts_mut(blocks.as_mut_ptr().cast::<u8>(), blocks.len() * BLOCK_SIZE)
    }
}

/// Errors from the backing file.
#[derive(Debug, thiserror::Error)]
pub enum BackingError {
    /// Another process holds the file's lock (or, for a block device, has it open
    /// exclusively).
    #[error(
        "{path} is in use: another vhost-user-zram (or another program) holds it as its \
         backing file"
    )]
    Locked {
        /// The backing file.
        path: PathBuf,
    },
    /// An existing regular file holds data vhost-user-zram did not write: it is not truncated.
    #[error(
        "{path} already holds {len} bytes that are not a vhost-user-zram backing file; give a new \
         path, or remove the file if its data is not needed"
    )]
    NotOurs {
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
    },
    /// The filesystem is full, or the write would pass the end of the block device or
    /// [`MAX_FILE_BYTES`]. Nothing was recorded; the caller keeps its pages.
    #[error("no space in backing file {path} for {len} bytes at byte {offset}")]
    NoSpace {
        /// The backing file.
        path: PathBuf,
        /// Where the refused write started.
        offset: u64,
        /// How many bytes it had left to write.
        len: u64,
    },
    /// A system call failed.
    #[error("backing file {path}: {op} at byte {offset} failed")]
    Io {
        /// The operation (`open`, `write`, `read`, ...).
        op: &'static str,
        /// The backing file.
        path: PathBuf,
        /// The byte offset involved (0 where none is).
        offset: u64,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// A write made no progress (the system wrote 0 bytes).
    #[error(
        "backing file {path}: a write at byte {offset} stopped after {written} of {expected} bytes"
    )]
    ShortWrite {
        /// The backing file.
        path: PathBuf,
        /// Where the write started.
        offset: u64,
        /// Bytes written before it stopped.
        written: u64,
        /// Bytes it should have written.
        expected: u64,
    },
    /// A read reached the end of the file early.
    #[error("backing file {path}: a read at byte {offset} ended after {read} of {expected} bytes")]
    ShortRead {
        /// The backing file.
        path: PathBuf,
        /// Where the read started.
        offset: u64,
        /// Bytes read before the end.
        read: u64,
        /// Bytes it should have read.
        expected: u64,
    },
    /// The path is neither a regular file nor a block device.
    #[error("{path} is {kind}: a backing file must be a regular file or a block device")]
    NotSupported {
        /// The path.
        path: PathBuf,
        /// What it is ("a directory", "a FIFO", ...).
        kind: &'static str,
    },
    /// An object's offset or length is impossible: a length outside 1..=4096, a range past the
    /// file's end, a release of blocks holding no object, or an output buffer too small.
    #[error("backing file {path}: no object of {len} bytes can be at byte {offset}")]
    InvalidObject {
        /// The backing file.
        path: PathBuf,
        /// The offset given.
        offset: u64,
        /// The length given.
        len: usize,
    },
}

/// Counters of a backing file, as zram's `bd_stat` and more.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackingStats {
    /// Blocks holding a live object (or pinned as the open block).
    pub blocks_used: u64,
    /// Free blocks inside the file, reusable by later batches.
    pub blocks_free: u64,
    /// The file's high-water mark, in blocks.
    pub file_blocks: u64,
    /// The sum of the live objects' lengths.
    pub live_bytes: u64,
    /// Live objects.
    pub objects: u64,
    /// Blocks written (zram's `bd_writes`).
    pub writes: u64,
    /// 4 KiB units read (zram's `bd_reads`).
    pub reads: u64,
    /// `pwrite` calls made (one a batch, more after short writes).
    pub write_calls: u64,
    /// Batches that failed and recorded nothing (a batch that found the filesystem full and
    /// then fitted inside the file did not fail).
    pub failed_writes: u64,
    /// Reads that failed.
    pub failed_reads: u64,
    /// Blocks freed and punched out of the file.
    pub punched_blocks: u64,
    /// Punches the filesystem does not support (`EOPNOTSUPP`); the blocks are still reused.
    pub punch_unsupported: u64,
    /// Punches that failed otherwise; the blocks are still reused.
    pub failed_punches: u64,
}

/// The system calls a [`BackingFile`] makes, so tests can put faults between it and the file.
pub trait BackingIo: Send + Sync {
    /// Writes `buf` at byte `off`, returning how many bytes were written (`pwrite`).
    fn pwrite(&self, buf: &[u8], off: u64) -> io::Result<usize>;
    /// Reads into `buf` from byte `off`, returning how many bytes were read, 0 at the end
    /// (`pread`).
    fn pread(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;
    /// Deallocates `len` bytes at `off`, keeping the file size; they read as zeros after.
    fn punch(&self, off: u64, len: u64) -> io::Result<()>;
}

impl<T: BackingIo + ?Sized> BackingIo for Arc<T> {
    fn pwrite(&self, buf: &[u8], off: u64) -> io::Result<usize> {
        (**self).pwrite(buf, off)
    }
    fn pread(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        (**self).pread(buf, off)
    }
    fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        (**self).punch(off, len)
    }
}

fn off_t(value: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(value).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))
}

/// The real file.
struct FileIo {
    file: File,
    direct: bool,
}

impl FileIo {
    /// Drops `len` bytes at `off` from the page cache (buffered mode only); written bytes are
    /// synced first, since `POSIX_FADV_DONTNEED` leaves dirty pages in the cache.
    fn drop_cache(&self, off: u64, len: usize, written: bool) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        let (off, len) = (off_t(off)?, off_t(len as u64)?);
        if written {
            let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER;
            // SAFETY: sync_file_range takes an open fd and plain integers; no memory is passed.
            if unsafe { libc::sync_file_range(fd, off, len, flags) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // Advisory: a failure leaves pages in the cache, which costs memory, not data.
        // SAFETY: posix_fadvise takes an open fd and plain integers; no memory is passed.
        unsafe { libc::posix_fadvise(fd, off, len, libc::POSIX_FADV_DONTNEED) };
        Ok(())
    }
}

impl BackingIo for FileIo {
    fn pwrite(&self, buf: &[u8], off: u64) -> io::Result<usize> {
        let written = self.file.write_at(buf, off)?;
        if !self.direct && written > 0 {
            self.drop_cache(off, written, true)?;
        }
        Ok(written)
    }

    fn pread(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let read = self.file.read_at(buf, off)?;
        if !self.direct && read > 0 {
            self.drop_cache(off, read, false)?;
        }
        Ok(read)
    }

    fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate takes an open fd and plain integers; no memory is passed.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off_t(off)?, off_t(len)?) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// A sparse in-memory file, for tests of code that uses a [`BackingFile`].
#[derive(Default)]
pub struct MemIo {
    inner: Mutex<MemFile>,
}

#[derive(Default)]
struct MemFile {
    blocks: BTreeMap<u64, Box<Block>>,
    len: u64,
}

impl MemIo {
    /// An empty file.
    pub fn new() -> MemIo {
        MemIo::default()
    }

    /// Blocks that hold memory (written and not punched): the analogue of `st_blocks`.
    pub fn allocated_blocks(&self) -> u64 {
        lock(&self.inner).blocks.len() as u64
    }

    /// The file size in bytes.
    pub fn len(&self) -> u64 {
        lock(&self.inner).len
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for MemIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemIo")
            .field("len", &self.len())
            .field("allocated_blocks", &self.allocated_blocks())
            .finish()
    }
}

/// Splits `[off, off + len)` into (block, offset in block, length) pieces.
fn pieces(off: u64, len: usize) -> impl Iterator<Item = (u64, usize, usize)> {
    let mut pos = off;
    let end = off + len as u64;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let block = pos / BLOCK;
        let within = usize::try_from(pos % BLOCK).unwrap_or(0);
        let n = usize::try_from((end - pos).min(BLOCK - pos % BLOCK)).unwrap_or(0);
        pos += n as u64;
        Some((block, within, n))
    })
}

impl BackingIo for MemIo {
    fn pwrite(&self, buf: &[u8], off: u64) -> io::Result<usize> {
        let mut file = lock(&self.inner);
        let mut done = 0;
        for (block, within, n) in pieces(off, buf.len()) {
            let data = file
                .blocks
                .entry(block)
                .or_insert_with(|| Box::new(ZERO_BLOCK));
            data.0[within..within + n].copy_from_slice(&buf[done..done + n]);
            done += n;
        }
        file.len = file.len.max(off + buf.len() as u64);
        Ok(buf.len())
    }

    fn pread(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let file = lock(&self.inner);
        let len = usize::try_from(file.len.saturating_sub(off).min(buf.len() as u64)).unwrap_or(0);
        let mut done = 0;
        for (block, within, n) in pieces(off, len) {
            match file.blocks.get(&block) {
                Some(data) => buf[done..done + n].copy_from_slice(&data.0[within..within + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
        }
        Ok(len)
    }

    fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        let mut file = lock(&self.inner);
        let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        for (block, within, n) in pieces(off, len) {
            if within == 0 && n == BLOCK_SIZE {
                file.blocks.remove(&block);
            } else if let Some(data) = file.blocks.get_mut(&block) {
                data.0[within..within + n].fill(0);
            }
        }
        Ok(())
    }
}

/// A [`BackingIo`] that passes calls to another one and injects faults, switchable at any time
/// from any thread. Errors are given as errno values (`libc::EIO`, `libc::ENOSPC`, ...).
pub struct FaultyIo {
    inner: Box<dyn BackingIo>,
    /// Every write fails with this errno (0: off).
    write_errno: AtomicI32,
    /// Writes left before the failing one (0: off).
    nth_write: AtomicU64,
    nth_errno: AtomicI32,
    /// Writes write about half of what they are given.
    short_writes: AtomicBool,
    /// Writes return 0.
    stalled_writes: AtomicBool,
    /// Every read fails with this errno (0: off).
    read_errno: AtomicI32,
    /// Reads return 0, as at the end of the file.
    read_eof: AtomicBool,
    /// Every punch fails with this errno (0: off).
    punch_errno: AtomicI32,
    /// Every read first sleeps this long, nanoseconds (a slow disk).
    read_delay_ns: AtomicU64,
    writes: AtomicU64,
}

impl std::fmt::Debug for FaultyIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyIo")
            .field("writes", &self.writes.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl FaultyIo {
    /// Wraps `inner`, with no faults switched on.
    pub fn new(inner: Box<dyn BackingIo>) -> FaultyIo {
        FaultyIo {
            inner,
            write_errno: AtomicI32::new(0),
            nth_write: AtomicU64::new(0),
            nth_errno: AtomicI32::new(0),
            short_writes: AtomicBool::new(false),
            stalled_writes: AtomicBool::new(false),
            read_errno: AtomicI32::new(0),
            read_eof: AtomicBool::new(false),
            punch_errno: AtomicI32::new(0),
            read_delay_ns: AtomicU64::new(0),
            writes: AtomicU64::new(0),
        }
    }

    /// Wraps a fresh [`MemIo`].
    pub fn in_memory() -> FaultyIo {
        FaultyIo::new(Box::new(MemIo::new()))
    }

    /// Makes every write fail with `errno` (`None`: off).
    pub fn set_write_error(&self, errno: Option<i32>) {
        self.write_errno.store(errno.unwrap_or(0), Ordering::SeqCst);
    }

    /// Makes the `n`th write from now (1: the next) fail with `errno`, once (0: off).
    pub fn fail_nth_write(&self, n: u64, errno: i32) {
        self.nth_errno.store(errno, Ordering::SeqCst);
        self.nth_write.store(n, Ordering::SeqCst);
    }

    /// Makes writes write only part of their buffer (about half, in 512-byte units).
    pub fn set_short_writes(&self, on: bool) {
        self.short_writes.store(on, Ordering::SeqCst);
    }

    /// Makes writes return 0 bytes written.
    pub fn set_stalled_writes(&self, on: bool) {
        self.stalled_writes.store(on, Ordering::SeqCst);
    }

    /// Makes every read fail with `errno` (`None`: off).
    pub fn set_read_error(&self, errno: Option<i32>) {
        self.read_errno.store(errno.unwrap_or(0), Ordering::SeqCst);
    }

    /// Makes reads return 0 bytes, as at the end of the file.
    pub fn set_read_eof(&self, on: bool) {
        self.read_eof.store(on, Ordering::SeqCst);
    }

    /// Makes every punch fail with `errno` (`None`: off).
    pub fn set_punch_error(&self, errno: Option<i32>) {
        self.punch_errno.store(errno.unwrap_or(0), Ordering::SeqCst);
    }

    /// Makes every read take at least `delay` (a slow or busy disk).
    pub fn set_read_delay(&self, delay: std::time::Duration) {
        let ns = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
        self.read_delay_ns.store(ns, Ordering::SeqCst);
    }

    /// Switches every fault off.
    pub fn clear(&self) {
        self.read_delay_ns.store(0, Ordering::SeqCst);
        self.set_write_error(None);
        self.nth_write.store(0, Ordering::SeqCst);
        self.set_short_writes(false);
        self.set_stalled_writes(false);
        self.set_read_error(None);
        self.set_read_eof(false);
        self.set_punch_error(None);
    }

    /// Writes attempted so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }
}

fn errno_result(errno: &AtomicI32) -> io::Result<()> {
    match errno.load(Ordering::SeqCst) {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

impl BackingIo for FaultyIo {
    fn pwrite(&self, buf: &[u8], off: u64) -> io::Result<usize> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        let countdown = self
            .nth_write
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if countdown == Ok(1) {
            return Err(io::Error::from_raw_os_error(
                self.nth_errno.load(Ordering::SeqCst),
            ));
        }
        errno_result(&self.write_errno)?;
        if self.stalled_writes.load(Ordering::SeqCst) {
            return Ok(0);
        }
        let len = if self.short_writes.load(Ordering::SeqCst) && buf.len() >= 1024 {
            (buf.len() / 2) & !511
        } else {
            buf.len()
        };
        self.inner.pwrite(&buf[..len], off)
    }

    fn pread(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let delay = self.read_delay_ns.load(Ordering::SeqCst);
        if delay > 0 {
            std::thread::sleep(std::time::Duration::from_nanos(delay));
        }
        errno_result(&self.read_errno)?;
        if self.read_eof.load(Ordering::SeqCst) {
            return Ok(0);
        }
        self.inner.pread(buf, off)
    }

    fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        errno_result(&self.punch_errno)?;
        self.inner.punch(off, len)
    }
}

/// The partly filled last block of the latest batch.
struct OpenBlock {
    block: u64,
    /// Bytes in use, 1..BLOCK_SIZE.
    fill: usize,
    bytes: Box<Block>,
}

/// State of the (single) batch writer.
struct Writer {
    open: Option<OpenBlock>,
    /// The batch buffer, grown to the largest batch seen.
    buf: Vec<Block>,
}

/// Block allocation state.
#[derive(Default)]
struct Space {
    /// Objects touching each block, plus the open block's pin; `len()` is the high-water
    /// mark in blocks.
    counts: Vec<u16>,
    /// Free extents inside the file: start block -> length, coalesced.
    free: BTreeMap<u64, u64>,
    free_blocks: u64,
    used_blocks: u64,
    live_bytes: u64,
    objects: u64,
}

impl Space {
    fn file_blocks(&self) -> u64 {
        self.counts.len() as u64
    }

    fn count(&self, block: u64) -> u16 {
        usize::try_from(block)
            .ok()
            .and_then(|b| self.counts.get(b))
            .copied()
            .unwrap_or(0)
    }

    /// The free extent holding `block`, if any.
    fn extent_at(&self, block: u64) -> Option<(u64, u64)> {
        let (&start, &len) = self.free.range(..=block).next_back()?;
        (block < start + len).then_some((start, len))
    }

    /// Whether `[start, start + n)` is free (in an extent or past the end), and below `limit`.
    fn run_is_free(&self, start: u64, n: u64, limit: u64) -> bool {
        if start + n > limit {
            return false;
        }
        let file = self.file_blocks();
        if start >= file || n == 0 {
            return true;
        }
        match self.extent_at(start) {
            Some((s, l)) => s + l >= start + n || s + l == file,
            None => false,
        }
    }

    /// The first place a fresh run of `n` blocks fits: the first extent long enough, else an
    /// extent ending at the end of the file (extended by appending), else the end.
    fn first_fit(&self, n: u64) -> u64 {
        if let Some(start) = self.first_extent(n) {
            return start;
        }
        match self.free.iter().next_back() {
            Some((&start, &len)) if start + len == self.file_blocks() => start,
            _ => self.file_blocks(),
        }
    }

    /// The first extent that holds `n` blocks.
    fn first_extent(&self, n: u64) -> Option<u64> {
        self.free
            .iter()
            .find(|(_, &len)| len >= n)
            .map(|(&start, _)| start)
    }

    /// Allocates `[start, start + n)`, which [`Space::run_is_free`] accepted: removes it
    /// from its extent and grows the file past its end.
    fn take(&mut self, start: u64, n: u64) {
        let file = self.file_blocks();
        let inside_end = (start + n).min(file);
        if start < inside_end {
            if let Some((s, l)) = self.extent_at(start) {
                debug_assert!(s + l >= inside_end, "allocated blocks were not free");
                self.free.remove(&s);
                if s < start {
                    self.free.insert(s, start - s);
                }
                if s + l > inside_end {
                    self.free.insert(inside_end, s + l - inside_end);
                }
                self.free_blocks -= inside_end - start;
            } else {
                debug_assert!(false, "allocated blocks were not free");
            }
        }
        if start + n > file {
            self.counts
                .resize(usize::try_from(start + n).unwrap_or(usize::MAX), 0);
        }
    }

    /// Returns `[start, start + n)` to the free extents, coalescing with its neighbours.
    fn insert_free(&mut self, mut start: u64, mut n: u64) {
        self.free_blocks += n;
        if let Some((&s, &l)) = self.free.range(..start).next_back() {
            if s + l == start {
                self.free.remove(&s);
                start = s;
                n += l;
            }
        }
        if let Some(l) = self.free.remove(&(start + n)) {
            n += l;
        }
        self.free.insert(start, n);
    }

    fn add_ref(&mut self, block: u64) {
        if let Some(c) = usize::try_from(block)
            .ok()
            .and_then(|b| self.counts.get_mut(b))
        {
            if *c == 0 {
                self.used_blocks += 1;
            }
            *c = c.saturating_add(1);
        }
    }

    /// Drops one reference; true if the block is now unused (the caller frees it).
    fn drop_ref(&mut self, block: u64) -> bool {
        match usize::try_from(block)
            .ok()
            .and_then(|b| self.counts.get_mut(b))
        {
            Some(c) if *c > 0 => {
                *c -= 1;
                if *c == 0 {
                    self.used_blocks -= 1;
                }
                *c == 0
            }
            _ => false,
        }
    }
}

/// Where a batch goes.
struct Plan {
    /// The run's first block.
    start: u64,
    /// The run's length in blocks.
    blocks: u64,
    /// Whether the first block is the open block (already allocated).
    continues: bool,
    /// Bytes of the open block kept before the batch.
    fill: usize,
    /// Whether the run reaches past the end of the file.
    grows: bool,
}

impl Plan {
    /// The run's first block that is not allocated yet.
    fn new_start(&self) -> u64 {
        if self.continues {
            self.start + 1
        } else {
            self.start
        }
    }
}

#[derive(Default)]
struct Counters {
    writes: AtomicU64,
    reads: AtomicU64,
    write_calls: AtomicU64,
    failed_writes: AtomicU64,
    failed_reads: AtomicU64,
    punched_blocks: AtomicU64,
    punch_unsupported: AtomicU64,
    failed_punches: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// The file pages are written back to (see the module doc).
///
/// Memory: two bytes a block up to the file's high-water mark (the counts), a map entry a
/// free extent, the open block's copy, and the batch buffer (as large as the largest batch).
pub struct BackingFile {
    path: PathBuf,
    io: Box<dyn BackingIo>,
    direct: bool,
    /// The file may not grow past this many blocks.
    limit_blocks: u64,
    writer: Mutex<Writer>,
    space: Mutex<Space>,
    /// `space.counts.len() * BLOCK`, readable without the lock (for [`BackingFile::read`]).
    file_bytes: AtomicU64,
    counters: Counters,
}

const _: () = {
    const fn shared_between_threads<T: Send + Sync>() {}
    shared_between_threads::<BackingFile>();
};

impl std::fmt::Debug for BackingFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackingFile")
            .field("path", &self.path)
            .field("direct", &self.direct)
            .field("limit_blocks", &self.limit_blocks)
            .finish_non_exhaustive()
    }
}

/// The kind of file a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PathKind {
    Regular,
    BlockDevice,
}

fn path_kind(path: &Path, file_type: std::fs::FileType) -> Result<PathKind, BackingError> {
    let kind = if file_type.is_file() {
        return Ok(PathKind::Regular);
    } else if file_type.is_block_device() {
        return Ok(PathKind::BlockDevice);
    } else if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_char_device() {
        "a character device"
    } else {
        "neither a file nor a device"
    };
    Err(BackingError::NotSupported {
        path: path.to_owned(),
        kind,
    })
}

/// The extended attribute that marks a regular file as a vhost-user-zram backing file.
const OWNER_MARK: &std::ffi::CStr = c"user.vhost-user-zram";

/// Whether `file` carries [`OWNER_MARK`].
fn has_owner_mark(file: &File) -> bool {
    // SAFETY: fgetxattr with a null buffer and size 0 only reports the value's size; the name
    // is a NUL-terminated string that outlives the call.
    let size = unsafe {
        libc::fgetxattr(
            file.as_raw_fd(),
            OWNER_MARK.as_ptr(),
            std::ptr::null_mut(),
            0,
        )
    };
    size >= 0
}

/// Marks `file` with [`OWNER_MARK`]; a filesystem without user extended attributes leaves it
/// unmarked (the file is then refused if it is found non-empty at the next start).
fn set_owner_mark(file: &File) {
    const VALUE: &[u8] = b"1";
    // SAFETY: fsetxattr reads VALUE.len() bytes from VALUE and the NUL-terminated name.
    let done = unsafe {
        libc::fsetxattr(
            file.as_raw_fd(),
            OWNER_MARK.as_ptr(),
            VALUE.as_ptr().cast(),
            VALUE.len(),
            0,
        )
    };
    if done != 0 {
        log::debug!(
            "cannot mark the backing file (no user extended attributes?): {}",
            io::Error::last_os_error()
        );
    }
}

impl BackingFile {
    /// Opens (creating if missing, mode 0600) the regular file or block device at `path`,
    /// locks it against other processes, and truncates a regular file (its contents are
    /// meaningless without the slot table that referenced them). A non-empty regular file is
    /// taken only if it carries the mark (an extended attribute) an earlier vhost-user-zram set
    /// on its backing file; any other is refused ([`BackingError::NotOurs`]), never clobbered.
    pub fn open(path: &Path) -> Result<BackingFile, BackingError> {
        BackingFile::open_with(path, true, |io| io)
    }

    /// As [`BackingFile::open`], with the file's I/O passed through `wrap`: tests put a
    /// [`FaultyIo`] between the backing file and a real file this way.
    pub fn open_wrapped(
        path: &Path,
        wrap: impl FnOnce(Box<dyn BackingIo>) -> Box<dyn BackingIo>,
    ) -> Result<BackingFile, BackingError> {
        BackingFile::open_with(path, true, wrap)
    }

    /// As [`BackingFile::open_wrapped`]; `try_direct: false` skips `O_DIRECT` (tests of the
    /// fallback).
    fn open_with(
        path: &Path,
        try_direct: bool,
        wrap: impl FnOnce(Box<dyn BackingIo>) -> Box<dyn BackingIo>,
    ) -> Result<BackingFile, BackingError> {
        let io_error = |op, source| BackingError::Io {
            op,
            path: path.to_owned(),
            offset: 0,
            source,
        };
        let kind = match std::fs::metadata(path) {
            Ok(meta) => path_kind(path, meta.file_type())?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => PathKind::Regular,
            Err(e) => return Err(io_error("stat", e)),
        };
        let (file, direct) = if try_direct {
            match open_file(path, kind, libc::O_DIRECT) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    (open_file(path, kind, 0), false)
                }
                result => (result, true),
            }
        } else {
            (open_file(path, kind, 0), false)
        };
        let file = file.map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => BackingError::Locked {
                path: path.to_owned(),
            },
            _ => io_error("open", e),
        })?;
        let meta = file.metadata().map_err(|e| io_error("stat", e))?;
        if path_kind(path, meta.file_type())? != kind {
            return Err(io_error(
                "open",
                io::Error::other("the path changed kind while it was opened"),
            ));
        }
        // SAFETY: flock takes a file descriptor we own and plain flags; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                BackingError::Locked {
                    path: path.to_owned(),
                }
            } else {
                io_error("flock", e)
            });
        }
        let capacity = match kind {
            PathKind::Regular => {
                // Never clobber someone else's file: a non-empty file is taken only if an
                // earlier vhost-user-zram marked it as its backing file.
                if meta.len() > 0 && !has_owner_mark(&file) {
                    return Err(BackingError::NotOurs {
                        path: path.to_owned(),
                        len: meta.len(),
                    });
                }
                file.set_len(0).map_err(|e| io_error("truncate", e))?;
                set_owner_mark(&file);
                None
            }
            PathKind::BlockDevice => {
                let mut size = 0u64;
                // BLKGETSIZE64 fits every libc's ioctl request type (u32 bits).
                #[allow(clippy::cast_possible_truncation)]
                let request = BLKGETSIZE64 as libc::Ioctl;
                // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at a
                // live local u64; the fd is open.
                let rc = unsafe { libc::ioctl(file.as_raw_fd(), request, &mut size as *mut u64) };
                if rc != 0 {
                    return Err(io_error("BLKGETSIZE64", io::Error::last_os_error()));
                }
                Some(size)
            }
        };
        let mut backing = BackingFile::with_io(wrap(Box::new(FileIo { file, direct })), capacity);
        backing.path = path.to_owned();
        backing.direct = direct;
        Ok(backing)
    }

    /// A backing file over `io` (a [`MemIo`], a [`FaultyIo`], ...) that may hold `capacity`
    /// bytes (rounded down to blocks; `None`: [`MAX_FILE_BYTES`]).
    pub fn with_io(io: Box<dyn BackingIo>, capacity: Option<u64>) -> BackingFile {
        let limit = capacity.unwrap_or(MAX_FILE_BYTES).min(MAX_FILE_BYTES);
        BackingFile {
            path: PathBuf::from("(backing I/O)"),
            io,
            direct: false,
            limit_blocks: limit / BLOCK,
            writer: Mutex::new(Writer {
                open: None,
                buf: Vec::new(),
            }),
            space: Mutex::new(Space::default()),
            file_bytes: AtomicU64::new(0),
            counters: Counters::default(),
        }
    }

    /// The path the file was opened at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether I/O bypasses the page cache (`O_DIRECT`).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    fn invalid(&self, offset: u64, len: usize) -> BackingError {
        BackingError::InvalidObject {
            path: self.path.clone(),
            offset,
            len,
        }
    }

    /// Writes `objects` (each 1..=4096 bytes) packed into one run of blocks with one write,
    /// and returns each object's byte offset. If a write that grows the file finds the
    /// filesystem full, the batch is tried once more in a free extent inside the file, if one
    /// is long enough. On error nothing is recorded: the caller keeps its pages.
    pub fn write_batch(&self, objects: &[&[u8]]) -> Result<Vec<u64>, BackingError> {
        if let Some(bad) = objects
            .iter()
            .find(|o| o.is_empty() || o.len() > MAX_OBJECT)
        {
            return Err(self.invalid(0, bad.len()));
        }
        if objects.is_empty() {
            return Ok(Vec::new());
        }
        let total: u64 = objects.iter().map(|o| o.len() as u64).sum();
        let mut writer = lock(&self.writer);
        let written = self.place_and_write(&mut writer, objects, total);
        match written {
            Ok((plan, offsets, end)) => {
                self.commit(&mut writer, &plan, &offsets, objects, end);
                Ok(offsets)
            }
            Err(e) => {
                bump(&self.counters.failed_writes, 1);
                Err(e)
            }
        }
    }

    /// Plans and writes a batch of `total` bytes, retrying once inside the file if a write
    /// that grows it finds no space.
    fn place_and_write(
        &self,
        writer: &mut Writer,
        objects: &[&[u8]],
        total: u64,
    ) -> Result<(Plan, Vec<u64>, usize), BackingError> {
        let plan = self.plan(&lock(&self.space), writer.open.as_ref(), total, true)?;
        match self.write_run(writer, &plan, objects) {
            Ok((offsets, end)) => Ok((plan, offsets, end)),
            Err(BackingError::NoSpace { .. }) if plan.grows => {
                let inside = self.plan(&lock(&self.space), writer.open.as_ref(), total, false)?;
                let (offsets, end) = self.write_run(writer, &inside, objects)?;
                Ok((inside, offsets, end))
            }
            Err(e) => Err(e),
        }
    }

    /// Fills the batch buffer for `plan` (the open block's kept bytes, the objects, zeros to
    /// the run's end) and writes it. Returns the objects' offsets and the batch's end (byte
    /// offset in the run). On error, gives back disk space a partial write took.
    fn write_run(
        &self,
        writer: &mut Writer,
        plan: &Plan,
        objects: &[&[u8]],
    ) -> Result<(Vec<u64>, usize), BackingError> {
        let Writer { open, buf } = writer;
        let run_blocks = usize::try_from(plan.blocks).unwrap_or(usize::MAX);
        if buf.len() < run_blocks {
            buf.resize(run_blocks, ZERO_BLOCK);
        }
        let bytes = as_bytes_mut(&mut buf[..run_blocks]);
        if let Some(o) = open.as_ref().filter(|_| plan.continues) {
            bytes[..plan.fill].copy_from_slice(&o.bytes.0[..plan.fill]);
        }
        let base = plan.start * BLOCK;
        let mut pos = plan.fill;
        let mut offsets = Vec::with_capacity(objects.len());
        for object in objects {
            offsets.push(base + pos as u64);
            bytes[pos..pos + object.len()].copy_from_slice(object);
            pos += object.len();
        }
        bytes[pos..].fill(0);
        if let Err(e) = self.write_all(bytes, base) {
            let new_start = plan.new_start();
            let new_blocks = plan.start + plan.blocks - new_start;
            if new_blocks > 0 {
                // Best effort: the new blocks hold nothing live, and the write may have
                // allocated some of them on disk.
                let _ = self.io.punch(new_start * BLOCK, new_blocks * BLOCK);
            }
            return Err(e);
        }
        Ok((offsets, pos))
    }

    /// Records a written batch: allocates its new blocks, counts its objects, and moves the
    /// pin to the new open block (freeing the old one if the pin was all it held).
    fn commit(
        &self,
        writer: &mut Writer,
        plan: &Plan,
        offsets: &[u64],
        objects: &[&[u8]],
        end: usize,
    ) {
        let mut space = lock(&self.space);
        let new_start = plan.new_start();
        space.take(new_start, plan.start + plan.blocks - new_start);
        for (&offset, object) in offsets.iter().zip(objects) {
            for block in offset / BLOCK..=(offset + object.len() as u64 - 1) / BLOCK {
                space.add_ref(block);
            }
        }
        let end = plan.start * BLOCK + end as u64;
        let new_open = (!end.is_multiple_of(BLOCK)).then(|| {
            let block = end / BLOCK;
            let index = usize::try_from(block - plan.start).unwrap_or(0);
            space.add_ref(block);
            OpenBlock {
                block,
                fill: usize::try_from(end % BLOCK).unwrap_or(0),
                bytes: Box::new(writer.buf[index]),
            }
        });
        if let Some(old) = std::mem::replace(&mut writer.open, new_open) {
            if space.drop_ref(old.block) {
                self.free_blocks(&mut space, old.block, 1);
            }
        }
        space.live_bytes += objects.iter().map(|o| o.len() as u64).sum::<u64>();
        space.objects += objects.len() as u64;
        self.file_bytes
            .store(space.file_blocks() * BLOCK, Ordering::Release);
        bump(&self.counters.writes, plan.blocks);
    }

    /// Chooses the run for a batch of `total` bytes: continue in the open block if the blocks
    /// after it are free, else first fit (see the module doc). With `grow` false the run must
    /// lie in a free extent inside the file.
    fn plan(
        &self,
        space: &Space,
        open: Option<&OpenBlock>,
        total: u64,
        grow: bool,
    ) -> Result<Plan, BackingError> {
        let file_blocks = space.file_blocks();
        if let Some(o) = open {
            // Only the pin left: nothing live in the block, start it afresh.
            let fill = if space.count(o.block) <= 1 { 0 } else { o.fill };
            let blocks = (fill as u64 + total).div_ceil(BLOCK);
            let grows = o.block + blocks > file_blocks;
            if (grow || !grows) && space.run_is_free(o.block + 1, blocks - 1, self.limit_blocks) {
                return Ok(Plan {
                    start: o.block,
                    blocks,
                    continues: true,
                    fill,
                    grows,
                });
            }
        }
        let blocks = total.div_ceil(BLOCK);
        let start = if grow {
            Some(space.first_fit(blocks))
        } else {
            space.first_extent(blocks)
        };
        match start {
            Some(start) if start + blocks <= self.limit_blocks => Ok(Plan {
                start,
                blocks,
                continues: false,
                fill: 0,
                grows: start + blocks > file_blocks,
            }),
            _ => Err(BackingError::NoSpace {
                path: self.path.clone(),
                offset: start.unwrap_or(file_blocks) * BLOCK,
                len: blocks * BLOCK,
            }),
        }
    }

    /// Writes all of `buf` at `offset`, looping on short writes.
    fn write_all(&self, buf: &[u8], offset: u64) -> Result<(), BackingError> {
        let mut done = 0;
        while done < buf.len() {
            bump(&self.counters.write_calls, 1);
            let at = offset + done as u64;
            match self.io.pwrite(&buf[done..], at) {
                Ok(0) => {
                    return Err(BackingError::ShortWrite {
                        path: self.path.clone(),
                        offset,
                        written: done as u64,
                        expected: buf.len() as u64,
                    })
                }
                Ok(n) => done += n.min(buf.len() - done),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(match e.raw_os_error() {
                        Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => BackingError::NoSpace {
                            path: self.path.clone(),
                            offset: at,
                            len: (buf.len() - done) as u64,
                        },
                        _ => BackingError::Io {
                            op: "write",
                            path: self.path.clone(),
                            offset: at,
                            source: e,
                        },
                    })
                }
            }
        }
        Ok(())
    }

    /// Frees `[start, start + n)`, whose counts just reached zero: punches it out of the file,
    /// then makes it reusable. Called with `space` held, so no batch can take the blocks
    /// before the punch.
    fn free_blocks(&self, space: &mut Space, start: u64, n: u64) {
        match self.io.punch(start * BLOCK, n * BLOCK) {
            Ok(()) => bump(&self.counters.punched_blocks, n),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                bump(&self.counters.punch_unsupported, 1);
            }
            Err(e) => {
                bump(&self.counters.failed_punches, 1);
                log::warn!(
                    "backing file {}: punching {} blocks at byte {} failed: {e}",
                    self.path.display(),
                    n,
                    start * BLOCK
                );
            }
        }
        space.insert_free(start, n);
    }

    /// Releases the object of `len` bytes at `offset` (overwritten, discarded, or read back
    /// and dropped): blocks it leaves empty are punched out and reused. Refuses (changing
    /// nothing) a range that is not inside the file or touches a block holding no object; a
    /// second release of an object in a block that still holds others cannot be told from a
    /// first and corrupts the counts, which [`BackingFile::check_consistency`] reports.
    pub fn release(&self, offset: u64, len: usize) -> Result<(), BackingError> {
        let mut space = lock(&self.space);
        if !valid_object(offset, len, space.file_blocks() * BLOCK) {
            return Err(self.invalid(offset, len));
        }
        let (first, last) = (offset / BLOCK, (offset + len as u64 - 1) / BLOCK);
        if (first..=last).any(|b| space.count(b) == 0) {
            return Err(self.invalid(offset, len));
        }
        // An object touches one block or two adjacent ones.
        let first_freed = space.drop_ref(first);
        let last_freed = last != first && space.drop_ref(last);
        match (first_freed, last_freed) {
            (true, true) => self.free_blocks(&mut space, first, 2),
            (true, false) => self.free_blocks(&mut space, first, 1),
            (false, true) => self.free_blocks(&mut space, last, 1),
            (false, false) => {}
        }
        space.live_bytes -= len as u64;
        space.objects -= 1;
        Ok(())
    }

    /// Reads the object of `len` bytes at `offset` into `out[..len]`. Safe to call while
    /// batches and releases run on other objects; the caller owns this one.
    pub fn read(&self, offset: u64, len: usize, out: &mut [u8]) -> Result<(), BackingError> {
        let file_bytes = self.file_bytes.load(Ordering::Acquire);
        if out.len() < len || !valid_object(offset, len, file_bytes) {
            return Err(self.invalid(offset, len));
        }
        let first = offset / BLOCK;
        let blocks = usize::try_from((offset + len as u64 - 1) / BLOCK - first + 1).unwrap_or(2);
        let mut buf = [ZERO_BLOCK; 2];
        let bytes = as_bytes_mut(&mut buf[..blocks]);
        if let Err(e) = self.read_all(bytes, first * BLOCK) {
            bump(&self.counters.failed_reads, 1);
            return Err(e);
        }
        let within = usize::try_from(offset - first * BLOCK).unwrap_or(0);
        out[..len].copy_from_slice(&bytes[within..within + len]);
        bump(&self.counters.reads, blocks as u64);
        Ok(())
    }

    fn read_all(&self, buf: &mut [u8], offset: u64) -> Result<(), BackingError> {
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            match self.io.pread(&mut buf[done..], at) {
                Ok(0) => {
                    return Err(BackingError::ShortRead {
                        path: self.path.clone(),
                        offset,
                        read: done as u64,
                        expected: buf.len() as u64,
                    })
                }
                Ok(n) => done += n.min(buf.len() - done),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(BackingError::Io {
                        op: "read",
                        path: self.path.clone(),
                        offset: at,
                        source: e,
                    })
                }
            }
        }
        Ok(())
    }

    /// Bytes the file occupies on its filesystem (`st_blocks` × 512); for a block device, the
    /// blocks in use.
    pub fn disk_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata(&self.path) {
            Ok(meta) if meta.file_type().is_file() => meta.blocks() * 512,
            // A block device (or an I/O given to `with_io`): the blocks in use.
            Ok(_) | Err(_) => self.stats().blocks_used * BLOCK_SIZE as u64,
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> BackingStats {
        let space = lock(&self.space);
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BackingStats {
            blocks_used: space.used_blocks,
            blocks_free: space.free_blocks,
            file_blocks: space.file_blocks(),
            live_bytes: space.live_bytes,
            objects: space.objects,
            writes: get(&c.writes),
            reads: get(&c.reads),
            write_calls: get(&c.write_calls),
            failed_writes: get(&c.failed_writes),
            failed_reads: get(&c.failed_reads),
            punched_blocks: get(&c.punched_blocks),
            punch_unsupported: get(&c.punch_unsupported),
            failed_punches: get(&c.failed_punches),
        }
    }

    /// Rebuilds the per-block counts from `live`, the `(offset, len)` of every object the slot
    /// table says is written back, and checks the invariants in the module doc against the
    /// allocator. Debug aid: it waits for a batch in flight and is linear in the file size.
    pub fn check_consistency(
        &self,
        live: &mut dyn Iterator<Item = (u64, usize)>,
    ) -> Result<(), String> {
        let writer = lock(&self.writer);
        let space = lock(&self.space);
        let file_blocks = space.file_blocks();
        let mut counts = vec![0u32; space.counts.len()];
        let mut objects: Vec<(u64, usize)> = Vec::new();
        let mut live_bytes = 0u64;
        for (offset, len) in live {
            if !valid_object(offset, len, file_blocks * BLOCK) {
                return Err(format!(
                    "object of {len} bytes at {offset} is not inside the file ({file_blocks} blocks)"
                ));
            }
            for block in offset / BLOCK..=(offset + len as u64 - 1) / BLOCK {
                counts[usize::try_from(block).map_err(|e| e.to_string())?] += 1;
            }
            live_bytes += len as u64;
            objects.push((offset, len));
        }
        objects.sort_unstable();
        for pair in objects.windows(2) {
            if pair[0].0 + pair[0].1 as u64 > pair[1].0 {
                return Err(format!("objects {:?} and {:?} overlap", pair[0], pair[1]));
            }
        }
        if let Some(o) = &writer.open {
            if o.block >= file_blocks || o.fill == 0 || o.fill >= BLOCK_SIZE {
                return Err(format!(
                    "open block {} (fill {}) is not a partly filled block of the file",
                    o.block, o.fill
                ));
            }
            let filled_end = o.block * BLOCK + o.fill as u64;
            if let Some(&(offset, len)) = objects
                .iter()
                .find(|&&(off, len)| off < (o.block + 1) * BLOCK && off + len as u64 > filled_end)
            {
                return Err(format!(
                    "object of {len} bytes at {offset} ends past the open block's fill ({filled_end})"
                ));
            }
            counts[usize::try_from(o.block).map_err(|e| e.to_string())?] += 1;
        }
        let mut used = 0u64;
        for (block, (&expected, &actual)) in counts.iter().zip(&space.counts).enumerate() {
            if expected != u32::from(actual) {
                return Err(format!(
                    "block {block}: count {actual} but {expected} objects and pins touch it"
                ));
            }
            used += u64::from(actual > 0);
        }
        if used != space.used_blocks {
            return Err(format!(
                "used_blocks {} but {used} blocks are used",
                space.used_blocks
            ));
        }
        let mut free = 0u64;
        let mut previous_end: Option<u64> = None;
        for (&start, &len) in &space.free {
            if len == 0 || start + len > file_blocks {
                return Err(format!(
                    "free extent {start}+{len} is empty or past the file"
                ));
            }
            if previous_end.is_some_and(|end| start <= end) {
                return Err(format!(
                    "free extent {start}+{len} overlaps or touches the previous"
                ));
            }
            if let Some(b) = (start..start + len).find(|&b| space.count(b) != 0) {
                return Err(format!(
                    "block {b} is in free extent {start}+{len} but used"
                ));
            }
            free += len;
            previous_end = Some(start + len);
        }
        let zero = file_blocks - used;
        if free != space.free_blocks || free != zero {
            return Err(format!(
                "free_blocks {} but extents hold {free} and {zero} blocks are unused",
                space.free_blocks
            ));
        }
        if live_bytes != space.live_bytes || objects.len() as u64 != space.objects {
            return Err(format!(
                "{} objects of {} bytes recorded but {} of {live_bytes} live",
                space.objects,
                space.live_bytes,
                objects.len()
            ));
        }
        if self.file_bytes.load(Ordering::Acquire) != file_blocks * BLOCK {
            return Err("file_bytes disagrees with the high-water mark".into());
        }
        Ok(())
    }
}

/// Whether an object of `len` bytes at `offset` can lie in a file of `file_bytes` bytes.
fn valid_object(offset: u64, len: usize, file_bytes: u64) -> bool {
    (1..=MAX_OBJECT).contains(&len)
        && offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= file_bytes)
}

fn open_file(path: &Path, kind: PathKind, flags: libc::c_int) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(true);
    match kind {
        PathKind::Regular => {
            options.create(true).truncate(false).mode(0o600);
            options.custom_flags(flags | libc::O_CLOEXEC);
        }
        PathKind::BlockDevice => {
            // O_EXCL on a block device: refused (EBUSY) while it is mounted or held.
            options.custom_flags(flags | libc::O_CLOEXEC | libc::O_EXCL);
        }
    }
    options.open(path)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the state consistent before it can panic, so a poisoned
    // lock's data is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
pub(in crate::store) mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::fs::MetadataExt;
    use std::process::Command;

    /// The objects written and not released: offset -> contents.
    #[derive(Default)]
    struct Model(BTreeMap<u64, Vec<u8>>);

    impl Model {
        fn write(
            &mut self,
            file: &BackingFile,
            objects: &[Vec<u8>],
        ) -> Result<Vec<u64>, BackingError> {
            let refs: Vec<&[u8]> = objects.iter().map(Vec::as_slice).collect();
            let offsets = file.write_batch(&refs)?;
            for (&offset, object) in offsets.iter().zip(objects) {
                assert!(self.0.insert(offset, object.clone()).is_none());
            }
            Ok(offsets)
        }

        fn release(&mut self, file: &BackingFile, offset: u64) {
            let object = self.0.remove(&offset).expect("a live object");
            file.release(offset, object.len()).unwrap();
        }

        /// The offset of the `i`th live object (modulo their number).
        fn nth(&self, i: usize) -> Option<u64> {
            (!self.0.is_empty()).then(|| *self.0.keys().nth(i % self.0.len()).unwrap())
        }

        fn consistent(&self, file: &BackingFile) {
            file.check_consistency(&mut self.0.iter().map(|(&o, v)| (o, v.len())))
                .unwrap();
        }

        /// Checks the allocator and reads every object back.
        fn check(&self, file: &BackingFile) {
            self.consistent(file);
            let mut out = [0u8; BLOCK_SIZE];
            for (&offset, object) in &self.0 {
                file.read(offset, object.len(), &mut out).unwrap();
                assert!(out[..object.len()] == object[..], "object at {offset}");
            }
        }

        fn live_bytes(&self) -> u64 {
            self.0.values().map(|v| v.len() as u64).sum()
        }
    }

    /// A deterministic generator (xorshift64*) for the long, non-shrinking tests.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        /// An object of `len` bytes with no zero byte, so punched-out data cannot pass.
        fn object(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| (self.next() as u8) | 1).collect()
        }

        /// The size of a written-back page: one in eight raw, the rest compressed.
        fn page_size(&mut self) -> usize {
            if self.below(8) == 0 {
                BLOCK_SIZE
            } else {
                1 + self.below(3632) as usize
            }
        }

        fn batch(&mut self, max: u64) -> Vec<Vec<u8>> {
            let n = 1 + self.below(max);
            (0..n)
                .map(|_| {
                    let len = self.page_size();
                    self.object(len)
                })
                .collect()
        }
    }

    /// A file in memory, with its fault switches and its memory.
    fn memory_file(capacity: Option<u64>) -> (BackingFile, Arc<FaultyIo>, Arc<MemIo>) {
        let mem = Arc::new(MemIo::new());
        let faults = Arc::new(FaultyIo::new(Box::new(mem.clone())));
        (
            BackingFile::with_io(Box::new(faults.clone()), capacity),
            faults,
            mem,
        )
    }

    /// `batches` random batches, releasing about one object in three as it goes.
    fn random_run(file: &BackingFile, rng: &mut Rng, model: &mut Model, batches: usize) {
        for i in 0..batches {
            let batch = rng.batch(16);
            model.write(file, &batch).unwrap();
            for _ in 0..rng.below(batch.len() as u64 + 1) {
                if let Some(offset) = model.nth(rng.next() as usize) {
                    model.release(file, offset);
                }
            }
            if i % 50 == 0 {
                model.consistent(file);
            }
        }
        model.check(file);
    }

    /// Whether files in `dir` can be opened with O_DIRECT.
    fn o_direct_works(dir: &Path) -> bool {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_DIRECT)
            .open(dir.join("probe"))
            .is_ok()
    }

    /// A filesystem mounted for a test, unmounted on drop (also when the test panics).
    pub(in crate::store) struct Mount(PathBuf);

    impl Mount {
        pub(in crate::store) fn new(
            fstype: &str,
            options: &str,
            dir: &Path,
        ) -> Result<Mount, String> {
            let output = Command::new("mount")
                .args(["-t", fstype, "-o", options, fstype])
                .arg(dir)
                .output()
                .map_err(|e| format!("cannot run mount: {e}"))?;
            if !output.status.success() {
                return Err(format!(
                    "mount -t {fstype} is not permitted here: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                ));
            }
            Ok(Mount(dir.to_owned()))
        }
    }

    impl Drop for Mount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }

    /// A loop device over a file, detached on drop (also when the test panics).
    struct LoopDevice(PathBuf);

    impl LoopDevice {
        fn new(image: &Path) -> Result<LoopDevice, String> {
            let output = Command::new("losetup")
                .args(["--find", "--show"])
                .arg(image)
                .output()
                .map_err(|e| format!("cannot run losetup: {e}"))?;
            if !output.status.success() {
                return Err(format!(
                    "losetup is not permitted here: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                ));
            }
            let device = String::from_utf8_lossy(&output.stdout).trim().to_owned();
            Ok(LoopDevice(PathBuf::from(device)))
        }
    }

    impl Drop for LoopDevice {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Objects as (length, seed of their contents).
        Batch(Vec<(usize, u8)>),
        Release(usize),
        Read(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        let len = prop_oneof![1usize..=3632, Just(BLOCK_SIZE), 1usize..=64];
        prop_oneof![
            3 => prop::collection::vec((len, any::<u8>()), 1..12).prop_map(Op::Batch),
            2 => any::<usize>().prop_map(Op::Release),
            1 => any::<usize>().prop_map(Op::Read),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn batches_and_releases_match_the_model(ops in prop::collection::vec(op(), 1..80)) {
            let (file, _, mem) = memory_file(None);
            let mut model = Model::default();
            let mut out = [0u8; BLOCK_SIZE];
            for op in ops {
                match op {
                    Op::Batch(spec) => {
                        let objects: Vec<Vec<u8>> = spec
                            .iter()
                            .map(|&(len, seed)| {
                                (0..len).map(|i| seed.wrapping_add((i as u8).wrapping_mul(7)) | 1).collect()
                            })
                            .collect();
                        model.write(&file, &objects).unwrap();
                    }
                    Op::Release(i) => {
                        if let Some(offset) = model.nth(i) {
                            model.release(&file, offset);
                        }
                    }
                    Op::Read(i) => {
                        if let Some(offset) = model.nth(i) {
                            let object = &model.0[&offset];
                            file.read(offset, object.len(), &mut out).unwrap();
                            prop_assert!(out[..object.len()] == object[..]);
                        }
                    }
                }
                model.consistent(&file);
                let stats = file.stats();
                // Every unused block was punched; every used one was written.
                prop_assert_eq!(mem.allocated_blocks(), stats.blocks_used);
                prop_assert_eq!(stats.live_bytes, model.live_bytes());
            }
            model.check(&file);
        }
    }

    #[test]
    fn real_files_round_trip_with_direct_and_buffered_io() {
        let tmp = tempfile::tempdir().unwrap();
        let shm = tempfile::tempdir_in("/dev/shm").ok();
        let mut cases = vec![(tmp.path(), true), (tmp.path(), false)];
        if let Some(shm) = &shm {
            cases.push((shm.path(), true));
        }
        for (i, (dir, try_direct)) in cases.into_iter().enumerate() {
            let path = dir.join(format!("backing{i}"));
            let file = BackingFile::open_with(&path, try_direct, |io| io).unwrap();
            assert_eq!(
                file.is_direct(),
                try_direct && o_direct_works(dir),
                "{path:?}"
            );
            let mut model = Model::default();
            random_run(&file, &mut Rng(0x9e37_79b9 + i as u64), &mut model, 300);
            let stats = file.stats();
            assert_eq!(stats.failed_writes + stats.failed_reads, 0);
            assert!(stats.punched_blocks > 0, "{stats:?}");
            assert_eq!(stats.punch_unsupported, 0);
        }
    }

    #[test]
    fn freed_extents_are_reused_first_fit() {
        let (file, _, _) = memory_file(None);
        let mut rng = Rng(7);
        let mut model = Model::default();
        let pages = |rng: &mut Rng, n: usize| -> Vec<Vec<u8>> {
            (0..n).map(|_| rng.object(BLOCK_SIZE)).collect()
        };
        let a = model.write(&file, &pages(&mut rng, 8)).unwrap();
        let b = model.write(&file, &pages(&mut rng, 8)).unwrap();
        assert_eq!(b[0], 8 * BLOCK, "whole pages leave no open block");
        for &offset in &a {
            model.release(&file, offset);
        }
        assert_eq!(file.stats().blocks_free, 8);
        let c = model.write(&file, &pages(&mut rng, 3)).unwrap();
        assert_eq!(c[0], 0, "the first free extent is reused");
        // [3, 8) is free but too short for 6 blocks: append.
        let d = model.write(&file, &pages(&mut rng, 6)).unwrap();
        assert_eq!(d[0], 16 * BLOCK);
        for &offset in &b {
            model.release(&file, offset);
        }
        let stats = file.stats();
        assert_eq!((stats.blocks_free, stats.file_blocks), (13, 22));
        model.consistent(&file);
        // The coalesced extent [3, 16) takes a batch of 13 blocks.
        let e = model.write(&file, &pages(&mut rng, 13)).unwrap();
        assert_eq!(e[0], 3 * BLOCK);
        assert_eq!(file.stats().file_blocks, 22);
        model.check(&file);
    }

    #[test]
    fn an_open_block_boxed_in_by_used_blocks_is_left_behind() {
        let (file, _, _) = memory_file(None);
        let mut rng = Rng(61);
        let mut model = Model::default();
        let pages = |rng: &mut Rng, n: usize| -> Vec<Vec<u8>> {
            (0..n).map(|_| rng.object(BLOCK_SIZE)).collect()
        };
        let a = model.write(&file, &pages(&mut rng, 8)).unwrap();
        model.write(&file, &pages(&mut rng, 8)).unwrap();
        for &offset in &a {
            model.release(&file, offset);
        }
        let mut batch = pages(&mut rng, 2);
        batch.push(rng.object(100));
        let b = model.write(&file, &batch).unwrap();
        assert_eq!(b, [0, BLOCK, 2 * BLOCK], "first fit; block 2 is open");
        // Continuing in block 2 needs blocks 3..9, but 8 is used: a fresh run is appended.
        let c = model.write(&file, &pages(&mut rng, 6)).unwrap();
        assert_eq!(c[0], 16 * BLOCK);
        let stats = file.stats();
        assert_eq!((stats.blocks_used, stats.blocks_free), (17, 5));
        model.check(&file);
    }

    #[test]
    fn an_emptied_open_block_is_started_afresh() {
        let (file, _, _) = memory_file(None);
        let mut rng = Rng(11);
        let mut model = Model::default();
        let first = model.write(&file, &[rng.object(100)]).unwrap();
        model.release(&file, first[0]);
        let stats = file.stats();
        assert_eq!(stats.blocks_used, 1, "the open block stays pinned");
        assert_eq!(stats.punched_blocks, 0);
        let second = model.write(&file, &[rng.object(200)]).unwrap();
        assert_eq!(
            second[0], 0,
            "the batch starts at the empty open block's start"
        );
        model.check(&file);
        // A block that is no longer open is freed when its last object goes.
        let third = model.write(&file, &[rng.object(BLOCK_SIZE)]).unwrap();
        assert_eq!(third[0], 200);
        model.release(&file, second[0]);
        model.release(&file, third[0]);
        model.check(&file);
        assert_eq!(file.stats().punched_blocks, 1);
    }

    #[test]
    fn releasing_objects_punches_their_blocks_out_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backing");
        let file = BackingFile::open(&path).unwrap();
        let mut rng = Rng(3);
        let mut model = Model::default();
        let pages: Vec<Vec<u8>> = (0..64).map(|_| rng.object(BLOCK_SIZE)).collect();
        let offsets = model.write(&file, &pages).unwrap();
        let disk = || std::fs::metadata(&path).unwrap().blocks() * 512;
        let before = disk();
        assert!(before >= 64 * BLOCK, "{before}");
        for &offset in &offsets[..32] {
            model.release(&file, offset);
        }
        let after = disk();
        assert!(before - after >= 32 * BLOCK, "{before} -> {after}");
        assert_eq!(file.stats().punched_blocks, 32);
        // Objects sharing a block: the block stays until both are gone.
        let halves = model
            .write(&file, &[rng.object(2048), rng.object(2048)])
            .unwrap();
        let shared = disk();
        model.release(&file, halves[0]);
        assert_eq!(disk(), shared);
        assert_eq!(file.stats().punched_blocks, 32);
        model.check(&file);
    }

    #[test]
    fn packing_keeps_the_file_within_a_tenth_of_the_live_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Rng(5);
        // (objects a batch at most, object sizes, batches)
        let mixes: [(u64, SizeOf, usize); 2] = [
            (16, Rng::page_size, 400),
            (4, |rng: &mut Rng| 16 + rng.below(200) as usize, 2000),
        ];
        for (i, (max, size, batches)) in mixes.into_iter().enumerate() {
            let path = dir.path().join(format!("packed{i}"));
            let file = BackingFile::open(&path).unwrap();
            let mut model = Model::default();
            for _ in 0..batches {
                let n = 1 + rng.below(max);
                let batch: Vec<Vec<u8>> = (0..n)
                    .map(|_| {
                        let len = size(&mut rng);
                        rng.object(len)
                    })
                    .collect();
                model.write(&file, &batch).unwrap();
            }
            let stats = file.stats();
            let live = model.live_bytes();
            assert_eq!(stats.live_bytes, live);
            assert_eq!(stats.write_calls, batches as u64, "one write a batch");
            assert!(
                stats.file_blocks * BLOCK * 10 <= live * 11,
                "{} blocks for {live} bytes",
                stats.file_blocks
            );
            let disk = std::fs::metadata(&path).unwrap().blocks() * 512;
            assert!(disk * 10 <= live * 11, "{disk} bytes on disk for {live}");
            model.check(&file);
        }
    }

    #[test]
    fn a_second_open_of_the_same_path_is_locked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backing");
        let first = BackingFile::open(&path).unwrap();
        let err = BackingFile::open(&path).unwrap_err();
        assert!(matches!(err, BackingError::Locked { .. }), "{err:?}");
        assert!(err.to_string().contains("another vhost-user-zram"), "{err}");
        drop(first);
        BackingFile::open(&path).unwrap();
    }

    #[test]
    fn files_are_created_sparse_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backing");
        let file = BackingFile::open(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!((meta.len(), meta.blocks()), (0, 0));
        drop(file);
        std::fs::write(&path, vec![1u8; 65536]).unwrap();
        let _file = BackingFile::open(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            0,
            "stale contents go"
        );
    }

    #[test]
    fn a_file_with_someone_elses_data_is_refused_not_clobbered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, b"precious").unwrap();
        let err = BackingFile::open(&path).unwrap_err();
        assert!(
            matches!(err, BackingError::NotOurs { len: 8, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("give a new path"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
        // An empty file is taken (and marked: the next start takes it again, full or not).
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        let file = BackingFile::open(&empty).unwrap();
        file.write_batch(&[&[7u8; 100]]).unwrap();
        drop(file);
        assert!(std::fs::metadata(&empty).unwrap().len() > 0);
        BackingFile::open(&empty).unwrap();
    }

    #[test]
    fn directories_and_fifos_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = BackingFile::open(dir.path()).unwrap_err();
        assert!(
            matches!(
                err,
                BackingError::NotSupported {
                    kind: "a directory",
                    ..
                }
            ),
            "{err:?}"
        );
        let fifo = dir.path().join("fifo");
        let status = Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(status.success());
        let err = BackingFile::open(&fifo).unwrap_err();
        assert!(
            matches!(err, BackingError::NotSupported { kind: "a FIFO", .. }),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("regular file or a block device"),
            "{err}"
        );
    }

    /// Switches a fault on.
    type Arm = fn(&FaultyIo);
    /// Says whether an error is the one a fault should cause.
    type Expect = fn(&BackingError) -> bool;
    /// Draws an object size.
    type SizeOf = fn(&mut Rng) -> usize;

    #[test]
    fn write_faults_leave_the_allocator_as_before_and_a_retry_succeeds() {
        let (file, faults, _) = memory_file(None);
        let mut rng = Rng(13);
        let mut model = Model::default();
        random_run(&file, &mut rng, &mut model, 40);
        // End on a partly filled block, so the failing batches continue in an open block.
        model.write(&file, &[rng.object(1000)]).unwrap();
        let cases: [(&str, Arm, Expect); 5] = [
            (
                "EIO",
                |f| f.set_write_error(Some(libc::EIO)),
                |e| matches!(e, BackingError::Io { op: "write", .. }),
            ),
            (
                "ENOSPC",
                |f| f.set_write_error(Some(libc::ENOSPC)),
                |e| matches!(e, BackingError::NoSpace { .. }),
            ),
            (
                "no progress",
                |f| f.set_stalled_writes(true),
                |e| matches!(e, BackingError::ShortWrite { written: 0, .. }),
            ),
            (
                "first write",
                |f| f.fail_nth_write(1, libc::EIO),
                |e| matches!(e, BackingError::Io { op: "write", .. }),
            ),
            (
                "after a short write",
                |f| {
                    f.set_short_writes(true);
                    f.fail_nth_write(2, libc::EIO);
                },
                |e| matches!(e, BackingError::Io { op: "write", .. }),
            ),
        ];
        for (name, arm, expected) in cases {
            let before = file.stats();
            arm(&faults);
            let batch: Vec<Vec<u8>> = (0..5).map(|_| rng.object(3000)).collect();
            let err = model.write(&file, &batch).unwrap_err();
            assert!(expected(&err), "{name}: {err:?}");
            let after = file.stats();
            assert_eq!(
                after,
                BackingStats {
                    failed_writes: before.failed_writes + 1,
                    write_calls: after.write_calls,
                    ..before
                },
                "{name}"
            );
            model.check(&file);
            faults.clear();
            model.write(&file, &batch).unwrap();
            model.check(&file);
        }
    }

    #[test]
    fn a_full_filesystem_sends_the_batch_into_a_free_extent() {
        let (file, faults, _) = memory_file(None);
        let mut rng = Rng(47);
        let mut model = Model::default();
        let pages = |rng: &mut Rng, n: usize| -> Vec<Vec<u8>> {
            (0..n).map(|_| rng.object(BLOCK_SIZE)).collect()
        };
        let a = model.write(&file, &pages(&mut rng, 8)).unwrap();
        model.write(&file, &pages(&mut rng, 8)).unwrap();
        model.write(&file, &[rng.object(100)]).unwrap();
        for &offset in &a {
            model.release(&file, offset);
        }
        // The next batch would continue in the open block at the end of the file: make that
        // write find the filesystem full.
        faults.fail_nth_write(1, libc::ENOSPC);
        let offsets = model.write(&file, &pages(&mut rng, 2)).unwrap();
        assert_eq!(offsets[0], 0);
        let stats = file.stats();
        assert_eq!((stats.failed_writes, stats.file_blocks), (0, 17));
        model.check(&file);
        // No extent is long enough: the batch fails, recording nothing.
        faults.set_write_error(Some(libc::ENOSPC));
        let err = model.write(&file, &pages(&mut rng, 7)).unwrap_err();
        assert!(matches!(err, BackingError::NoSpace { .. }), "{err:?}");
        assert_eq!(file.stats().failed_writes, 1);
        model.check(&file);
    }

    #[test]
    fn faults_between_the_backing_file_and_a_real_file() {
        let dir = tempfile::tempdir().unwrap();
        let faults = std::sync::OnceLock::new();
        let wrap = |io: Box<dyn BackingIo>| -> Box<dyn BackingIo> {
            let faulty = Arc::new(FaultyIo::new(io));
            faults.set(faulty.clone()).unwrap();
            Box::new(faulty)
        };
        let file = BackingFile::open_wrapped(&dir.path().join("backing"), wrap).unwrap();
        let faults = faults.get().unwrap();
        let mut rng = Rng(59);
        let mut model = Model::default();
        random_run(&file, &mut rng, &mut model, 20);
        faults.set_short_writes(true);
        faults.fail_nth_write(2, libc::EIO);
        let batch = rng.batch(16);
        assert!(model.write(&file, &batch).is_err());
        model.check(&file);
        faults.clear();
        model.write(&file, &batch).unwrap();
        faults.set_read_error(Some(libc::EIO));
        let offset = model.nth(0).unwrap();
        let mut out = [0u8; BLOCK_SIZE];
        assert!(file.read(offset, model.0[&offset].len(), &mut out).is_err());
        faults.clear();
        model.check(&file);
    }

    #[test]
    fn short_writes_are_completed_by_looping() {
        let (file, faults, _) = memory_file(None);
        let mut rng = Rng(17);
        let mut model = Model::default();
        faults.set_short_writes(true);
        model.write(&file, &rng.batch(16)).unwrap();
        let batch: Vec<Vec<u8>> = (0..8).map(|_| rng.object(BLOCK_SIZE)).collect();
        model.write(&file, &batch).unwrap();
        assert!(file.stats().write_calls > 2);
        model.check(&file);
    }

    #[test]
    fn writes_past_the_capacity_are_no_space_without_io() {
        let (file, faults, _) = memory_file(Some(10 * BLOCK + 100));
        let mut rng = Rng(19);
        let mut model = Model::default();
        let pages: Vec<Vec<u8>> = (0..10).map(|_| rng.object(BLOCK_SIZE)).collect();
        model.write(&file, &pages).unwrap();
        let writes = faults.writes();
        let err = model.write(&file, &[rng.object(1)]).unwrap_err();
        assert!(matches!(err, BackingError::NoSpace { offset, .. } if offset == 10 * BLOCK));
        assert_eq!(faults.writes(), writes);
        assert_eq!(file.stats().failed_writes, 1);
        model.release(&file, pages[4].len() as u64 * 4);
        model.write(&file, &[rng.object(1)]).unwrap();
        model.check(&file);
        assert_eq!(
            BackingFile::with_io(Box::new(MemIo::new()), None).limit_blocks,
            1 << 32
        );
        let huge = BackingFile::with_io(Box::new(MemIo::new()), Some(1 << 50));
        assert_eq!(huge.limit_blocks, MAX_FILE_BYTES / BLOCK);
    }

    #[test]
    fn read_faults_are_errors_never_garbage() {
        let (file, faults, _) = memory_file(None);
        let mut rng = Rng(23);
        let mut model = Model::default();
        let offsets = model.write(&file, &rng.batch(16)).unwrap();
        let len = model.0[&offsets[0]].len();
        let mut out = [0xaa_u8; BLOCK_SIZE];
        faults.set_read_error(Some(libc::EIO));
        let err = file.read(offsets[0], len, &mut out).unwrap_err();
        assert!(
            matches!(err, BackingError::Io { op: "read", .. }),
            "{err:?}"
        );
        faults.set_read_error(None);
        faults.set_read_eof(true);
        let err = file.read(offsets[0], len, &mut out).unwrap_err();
        assert!(
            matches!(err, BackingError::ShortRead { read: 0, .. }),
            "{err:?}"
        );
        assert!(
            out.iter().all(|&b| b == 0xaa),
            "a failed read leaves the buffer alone"
        );
        let stats = file.stats();
        assert_eq!((stats.failed_reads, stats.reads), (2, 0));
        faults.clear();
        model.check(&file);
    }

    #[test]
    fn punch_failures_are_counted_and_the_blocks_still_reused() {
        let (file, faults, _) = memory_file(None);
        let mut rng = Rng(29);
        let mut model = Model::default();
        let pages: Vec<Vec<u8>> = (0..4).map(|_| rng.object(BLOCK_SIZE)).collect();
        let offsets = model.write(&file, &pages).unwrap();
        faults.set_punch_error(Some(libc::EOPNOTSUPP));
        model.release(&file, offsets[0]);
        faults.set_punch_error(Some(libc::EIO));
        model.release(&file, offsets[1]);
        let stats = file.stats();
        assert_eq!(
            (
                stats.punch_unsupported,
                stats.failed_punches,
                stats.punched_blocks
            ),
            (1, 1, 0)
        );
        assert_eq!(stats.blocks_free, 2);
        faults.clear();
        let again = model.write(&file, &[rng.object(BLOCK_SIZE), rng.object(BLOCK_SIZE)]);
        assert_eq!(again.unwrap()[0], 0);
        model.check(&file);
    }

    #[test]
    fn bad_arguments_are_refused_and_change_nothing() {
        let (file, _, _) = memory_file(None);
        let mut rng = Rng(31);
        let mut model = Model::default();
        let offsets = model
            .write(&file, &[rng.object(100), rng.object(100)])
            .unwrap();
        let before = file.stats();
        let invalid =
            |r: Result<_, BackingError>| matches!(r, Err(BackingError::InvalidObject { .. }));
        assert!(invalid(file.write_batch(&[&[]]).map(|_| ())));
        assert!(invalid(
            file.write_batch(&[&[1; BLOCK_SIZE + 1]]).map(|_| ())
        ));
        let mut out = [0u8; BLOCK_SIZE];
        assert!(invalid(file.read(0, 0, &mut out)));
        assert!(invalid(file.read(0, BLOCK_SIZE + 1, &mut out)));
        assert!(invalid(file.read(0, 100, &mut out[..99])));
        assert!(invalid(file.read(BLOCK, 1, &mut out)));
        assert!(invalid(file.release(BLOCK, 1)));
        assert!(invalid(file.release(0, 0)));
        assert!(invalid(file.read(u64::MAX, 1, &mut out)));
        assert!(invalid(file.release(u64::MAX - 10, 100)));
        assert!(file.write_batch(&[]).unwrap().is_empty());
        assert_eq!(file.stats(), before);
        model.check(&file);
        assert_eq!(offsets, [0, 100]);
    }

    #[test]
    fn reads_run_concurrently_with_batches_and_releases() {
        let dir = tempfile::tempdir().unwrap();
        let file = Arc::new(BackingFile::open(&dir.path().join("backing")).unwrap());
        let mut rng = Rng(37);
        let mut stable = Model::default();
        stable.write(&file, &rng.batch(16)).unwrap();
        // The last stable object sits in the open block that the next batches rewrite.
        stable.write(&file, &[rng.object(700)]).unwrap();
        let stable = Arc::new(stable);
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (file, stable, stop) = (file.clone(), stable.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut out = [0u8; BLOCK_SIZE];
                    let mut rounds = 0u64;
                    while !stop.load(Ordering::Relaxed) || rounds == 0 {
                        for (&offset, object) in &stable.0 {
                            file.read(offset, object.len(), &mut out).unwrap();
                            assert!(out[..object.len()] == object[..], "object at {offset}");
                        }
                        rounds += 1;
                    }
                    rounds
                })
            })
            .collect();
        let mut churn = Model::default();
        for _ in 0..300 {
            churn.write(&file, &rng.batch(8)).unwrap();
            for _ in 0..rng.below(6) {
                if let Some(offset) = churn.nth(rng.next() as usize) {
                    churn.release(&file, offset);
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        for reader in readers {
            assert!(reader.join().unwrap() > 0);
        }
        let mut all = stable.0.clone();
        all.extend(churn.0);
        Model(all).check(&file);
    }

    #[test]
    fn a_full_tmpfs_gives_no_space_and_records_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let _mount = match Mount::new("tmpfs", "size=1m", dir.path()) {
            Ok(mount) => mount,
            Err(why) => {
                println!("SKIPPED: {why}");
                return;
            }
        };
        let file = BackingFile::open(&dir.path().join("backing")).unwrap();
        let mut rng = Rng(41);
        let mut model = Model::default();
        let mut batches = Vec::new();
        let err = loop {
            assert!(batches.len() < 1000, "a 1 MiB tmpfs never filled up");
            let batch = vec![
                rng.object(BLOCK_SIZE),
                rng.object(BLOCK_SIZE),
                rng.object(BLOCK_SIZE),
                rng.object(2000),
            ];
            let before = file.stats();
            match model.write(&file, &batch) {
                Ok(offsets) => batches.push(offsets),
                Err(err) => {
                    let after = file.stats();
                    assert_eq!(after.failed_writes, before.failed_writes + 1);
                    assert_eq!(
                        after,
                        BackingStats {
                            failed_writes: after.failed_writes,
                            write_calls: after.write_calls,
                            ..before
                        }
                    );
                    break err;
                }
            }
        };
        assert!(matches!(err, BackingError::NoSpace { .. }), "{err:?}");
        assert!(batches.len() > 10, "only {} batches fit", batches.len());
        model.check(&file);
        // Freed blocks are punched, so the filesystem has room again for a batch that fits
        // in them.
        for offsets in &batches[..4] {
            for &offset in offsets {
                model.release(&file, offset);
            }
        }
        model
            .write(&file, &[rng.object(BLOCK_SIZE), rng.object(BLOCK_SIZE)])
            .unwrap();
        model.check(&file);
        drop(file);
    }

    #[test]
    fn a_block_device_is_used_up_to_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image");
        std::fs::write(&image, vec![0xee_u8; 16 * BLOCK_SIZE]).unwrap();
        let device = match LoopDevice::new(&image) {
            Ok(device) => device,
            Err(why) => {
                println!("SKIPPED: {why}");
                return;
            }
        };
        let file = BackingFile::open(&device.0).unwrap();
        assert!(file.is_direct());
        assert_eq!(file.limit_blocks, 16);
        let err = BackingFile::open(&device.0).unwrap_err();
        assert!(matches!(err, BackingError::Locked { .. }), "{err:?}");
        let mut rng = Rng(53);
        let mut model = Model::default();
        let pages: Vec<Vec<u8>> = (0..15).map(|_| rng.object(BLOCK_SIZE)).collect();
        model.write(&file, &pages).unwrap();
        model.write(&file, &[rng.object(3000)]).unwrap();
        let err = model.write(&file, &[rng.object(2000)]).unwrap_err();
        assert!(matches!(err, BackingError::NoSpace { .. }), "{err:?}");
        model.check(&file);
        let first = model.nth(0).unwrap();
        model.release(&file, first);
        model.write(&file, &[rng.object(2000)]).unwrap();
        model.check(&file);
        let stats = file.stats();
        assert_eq!(
            stats.punched_blocks + stats.punch_unsupported,
            1,
            "{stats:?}"
        );
        drop(file);
    }

    #[test]
    fn buffered_fallback_when_the_filesystem_refuses_o_direct() {
        let dir = tempfile::tempdir().unwrap();
        let _mount = match Mount::new("ramfs", "mode=0700", dir.path()) {
            Ok(mount) => mount,
            Err(why) => {
                println!("SKIPPED: {why}");
                return;
            }
        };
        assert!(!o_direct_works(dir.path()), "ramfs takes O_DIRECT now");
        let file = BackingFile::open(&dir.path().join("backing")).unwrap();
        assert!(!file.is_direct());
        let mut model = Model::default();
        random_run(&file, &mut Rng(43), &mut model, 100);
        // ramfs cannot punch holes: counted, and the blocks are reused all the same.
        let stats = file.stats();
        assert_eq!(stats.punched_blocks + stats.failed_punches, 0, "{stats:?}");
        assert!(stats.punch_unsupported > 0, "{stats:?}");
        drop(file);
    }
}
