// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The backing file: where writeback puts idle and incompressible pages.
//!
//! A [`BackingFile`] is a regular file (created if missing, sparse, never preallocated) or a
//! block device. It stores *objects*: compressed pages (1..=3632 bytes) or raw pages (4096
//! bytes), named by their byte offset in the file and their length, which the slot table
//! keeps. The file holds no index: its contents mean nothing without the slot table, and a
//! file left by an earlier run is emptied when it is opened (a regular file truncated, a block
//! device's blocks after its header erased; whatever of them stays, this run never reads as
//! its own, below) — unless a store recovered from a state file holds that slot table: then
//! [`BackingFile::reopen`] keeps it, with the recorded key, and [`BackingFile::rebuild`]
//! rebuilds the free space from the recovered slots. At the end of a run whose pages are not
//! kept, [`BackingFile::erase`] releases every block (`erase.rs`): no guest data stays on
//! disk.
//!
//! # Records: what proves an object is the slot's
//! Each object is stored in a *record*: a 16-byte header (a magic, the page index, the length,
//! a CRC-32 over them, the object and a random key of this run; `record.rs` gives the bytes),
//! then the object. The slot keeps the record's offset and the object's length. A read checks
//! the header against the page and length it expects and the checksum against the bytes: a
//! range that was zeroed, punched, truncated and grown back, overwritten, or holds another
//! page's record or an earlier run's, is an error for that page
//! ([`BackingError::Corrupt`], counted in `failed_reads`), never wrong bytes.
//!
//! # Block devices
//! A block device must be empty (its first MiB all zeros) or carry our *device header* in its
//! first block, unless the operator says to overwrite it ([`ForeignData::Overwrite`]); a
//! device holding a filesystem, a partition table, a swap area or any other data is refused,
//! naming what was found. The header block (`open.rs`: a magic and a format version) is
//! written at open and the file's offsets start after it: offset 0 of the allocator is byte
//! 4096 of the device.
//!
//! # Packing
//! [`BackingFile::write_batch`] packs a batch of records back to back (a record may span
//! 4 KiB block boundaries: a raw page's record, 4112 bytes, can touch three blocks) into one
//! contiguous run of blocks and writes the run with one
//! `pwrite` (looping only on short writes). The run's last block is usually partly filled: it
//! stays the *open block*, whose bytes are kept in memory, and the next batch starts in it
//! (rewriting its first bytes unchanged), so the file holds about what RAM held. If the blocks
//! after the open block are taken, the open block is abandoned, partly filled, and the batch
//! starts a fresh run.
//!
//! # Free space
//! Each block has a count of the live objects whose records touch it (a record spanning two
//! or three blocks counts in each), plus one *pin* while it is the open block, so the open block is never
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
//! is saving. Every write is whole blocks from a 4096-aligned buffer, every read the one to
//! three blocks covering a record, into an aligned buffer, checked and copied out. Where the filesystem
//! refuses `O_DIRECT` (`EINVAL`, e.g. ramfs or an older tmpfs) the file falls back to buffered
//! I/O: each written range is synced (`sync_file_range`) and dropped from the page cache
//! (`POSIX_FADV_DONTNEED`), and each read range dropped after reading.
//!
//! # Invariants (checked by [`BackingFile::check_consistency`])
//! - `counts[b]` = the live objects touching block `b`, plus one if `b` is the open block,
//!   plus one per read pin on an object touching it (none while nothing reads: the check runs
//!   quiescent);
//! - a block is in exactly one free extent iff its count is zero; extents are coalesced and
//!   lie inside the file (below the high-water mark `counts.len()`);
//! - live records do not overlap, lie inside the file, and those in the open block end within
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
//! takes no lock: the caller owns the object (holds its slot), or pins it, so the blocks it
//! touches stay allocated, and a batch rewriting the open block writes the same bytes over the
//! object.
//!
//! # Read pins
//! The store reads a written-back page without holding its slot lock across the `pread` (a
//! write to the page must not wait for the disk). Under the slot lock it takes a
//! [`PinnedObject`] ([`BackingFile::pin`]): one more count on each block the object touches,
//! under `space`. Then it unlocks and reads. If the slot is rewritten or discarded meanwhile,
//! the object is released, but its blocks keep a count until the pin drops: they are neither
//! punched nor reused, and an open block still counted by a pin is continued, never started
//! afresh. So the bytes a pinned read returns are the object's, whatever the slot did
//! meanwhile. Dropping the pin drops the counts (freeing, and punching, blocks that reach
//! zero).
//!
//! # Files
//! - `space.rs`: the block allocator (per-block counts, free extents);
//! - `io.rs`: the [`BackingIo`] system-call trait and the real file's implementation;
//! - `record.rs`: the record header (magic, page, length, checksum);
//! - `erase.rs`: releasing every block (punch, else discard) at the end and for a device at
//!   the start;
//! - `open.rs`: opening a path: what it may name (checked before any open that could block),
//!   the device header and the foreign-data rule, `O_DIRECT` probing, `flock`, the owner mark;
//! - `testing.rs` (tests and the `testing` feature only): `MemIo` and `FaultyIo`;
//! - `tests.rs`: the unit and property tests.

mod erase;
mod io;
mod open;
mod record;
mod space;
#[cfg(any(test, feature = "testing"))]
mod testing;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

pub use self::erase::Erasure;
pub use self::io::BackingIo;
pub use self::open::{
    low_space_threshold, BackingKind, EarlierRun, ForeignData, Opened, DEVICE_HEADER_BYTES,
    LOW_SPACE_FLOOR,
};
use self::record::record_len;
pub use self::record::{Mismatch, MAX_RECORD, RECORD_HEADER, RECORD_MAGIC};
use self::space::Space;
#[cfg(any(test, feature = "testing"))]
pub use self::testing::{FaultyIo, MemIo};

/// The unit of allocation, and of every read and write.
pub const BLOCK_SIZE: usize = 4096;
const BLOCK: u64 = BLOCK_SIZE as u64;
/// The largest object: a raw page.
pub const MAX_OBJECT: usize = BLOCK_SIZE;
/// Objects lie below this byte offset: a slot records offsets in 44 bits.
pub const MAX_FILE_BYTES: u64 = 1 << 44;

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
        "{path} already holds {len} bytes of {found}, not a vhost-user-zram backing file; \
         give a new path, remove the file if its data is not needed, or pass \
         --backing-file-overwrite to overwrite it"
    )]
    NotOurs {
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
        /// What its first bytes look like ("an ext4 filesystem", "data").
        found: String,
    },
    /// The file at the path is not the backing file a state file recorded.
    #[error(
        "{path} is not the backing file the state file records (device {}, inode {}); it is \
         device {}, inode {}: its pages cannot be recovered from another file",
        recorded.0, recorded.1, found.0, found.1
    )]
    NotRecorded {
        /// The path.
        path: PathBuf,
        /// The recorded (st_dev, st_ino).
        recorded: (u64, u64),
        /// The file's.
        found: (u64, u64),
    },
    /// A block device holds data vhost-user-zram did not write: it is not overwritten.
    #[error(
        "{path} holds {found}, not an empty device or a vhost-user-zram backing device; \
         refusing to overwrite it: wipe it (wipefs -a) if its data is not needed, or pass \
         --backing-file-overwrite"
    )]
    ForeignDevice {
        /// The device.
        path: PathBuf,
        /// What was found ("an ext4 filesystem", "a swap area", "data at byte 512").
        found: String,
    },
    /// An object read back is not the one its slot wrote (see the module doc, "Records"): the
    /// page cannot be read.
    #[error(
        "backing file {path}: the object of page {page} at byte {offset} does not verify: {why}"
    )]
    Corrupt {
        /// The backing file.
        path: PathBuf,
        /// The record's offset.
        offset: u64,
        /// The page whose object was expected.
        page: u64,
        /// What did not match.
        why: Mismatch,
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
        source: std::io::Error,
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
    /// The path is neither a regular file nor a block device (or is a file of a kernel
    /// interface such as `/proc` or `/sys`, or a symbolic link to nothing).
    #[error("{path} is {kind}: a backing file must be a regular file or a block device")]
    NotSupported {
        /// The path.
        path: PathBuf,
        /// What it is ("a directory", "a FIFO", ...).
        kind: &'static str,
    },
    /// An object's offset or length is impossible: a length outside 1..=4096, a range past the
    /// file's end, a release of blocks holding no object, an output buffer too small, or a
    /// page index past 2^32.
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
    /// The sum of the live objects' lengths (their records take [`RECORD_HEADER`] more
    /// each).
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
    /// This run's key, mixed into every record's checksum (`record.rs`).
    key: u64,
    /// How the path was opened, for the start log ([`BackingFile::opened`]).
    opened: Option<Opened>,
    /// The file's (st_dev, st_ino), when opened from a path.
    identity: Option<(u64, u64)>,
    /// Whether it was reopened as it was ([`BackingFile::reopen`]) rather than emptied.
    kept: bool,
}

/// A read pin on an object of the backing file ([`BackingFile::pin`]): while it lives, the
/// object's blocks are neither freed nor rewritten with other bytes. Dropping it unpins.
#[must_use = "a pin protects a read; dropping it at once protects nothing"]
pub struct PinnedObject<'a> {
    file: &'a BackingFile,
    offset: u64,
    len: usize,
}

impl PinnedObject<'_> {
    /// The object's byte offset and length.
    pub fn object(&self) -> (u64, usize) {
        (self.offset, self.len)
    }

    /// Reads the pinned object, which must be page `page`'s, into `out[..len]`.
    pub fn read(&self, page: u64, out: &mut [u8]) -> Result<(), BackingError> {
        self.file.read(self.offset, self.len, page, out)
    }
}

impl std::fmt::Debug for PinnedObject<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedObject")
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish()
    }
}

impl Drop for PinnedObject<'_> {
    fn drop(&mut self) {
        self.file.unpin(self.offset, self.len);
    }
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

impl BackingFile {
    /// A backing file over `io` (an in-memory file or a fault injector in tests, ...) that may hold `capacity`
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
            key: run_key(),
            opened: None,
            identity: None,
            kept: false,
        }
    }

    /// The key this file's records are checksummed with (a state file records it, so that a
    /// restarted daemon can verify them: [`BackingFile::reopen`]).
    pub fn key(&self) -> u64 {
        self.key
    }

    /// The file's (st_dev, st_ino), when it was opened from a path.
    pub fn identity(&self) -> Option<(u64, u64)> {
        self.identity
    }

    /// Whether the file was reopened with its contents kept ([`BackingFile::reopen`]).
    pub fn is_kept(&self) -> bool {
        self.kept
    }

    /// Whether an object of `len` bytes at `offset` can lie in this file (inside its limit).
    pub fn may_hold(&self, offset: u64, len: usize) -> bool {
        valid_object(offset, len, self.limit_blocks * BLOCK)
    }

    /// Recovery: rebuilds the block counts and free extents from the live objects `live`
    /// (byte offset, length), which the caller checked to lie inside the file's limit and not
    /// to overlap. Blocks nothing touches below the last live one are free and punched; no
    /// block is open. Only before the file is used.
    pub fn rebuild(&self, live: &[(u64, usize)]) -> Result<(), BackingError> {
        let limit = self.limit_blocks * BLOCK;
        if let Some(&(offset, len)) = live.iter().find(|&&(o, l)| !valid_object(o, l, limit)) {
            return Err(self.invalid(offset, len));
        }
        let mut space = lock(&self.space);
        *space = Space::default();
        let end = live
            .iter()
            .map(|&(o, l)| o + record_len(l) as u64)
            .max()
            .unwrap_or(0)
            .div_ceil(BLOCK);
        space.counts = vec![0; usize::try_from(end).map_err(|_| self.invalid(end * BLOCK, 0))?];
        for &(offset, len) in live {
            for block in blocks_of(offset, len) {
                space.add_ref(block);
            }
            space.live_bytes += len as u64;
            space.objects += 1;
        }
        let mut run: Option<(u64, u64)> = None;
        for block in 0..end {
            if space.count(block) != 0 {
                if let Some((start, n)) = run.take() {
                    self.free_blocks(&mut space, start, n);
                }
                continue;
            }
            run = match run {
                Some((start, n)) => Some((start, n + 1)),
                None => Some((block, 1)),
            };
        }
        if let Some((start, n)) = run {
            self.free_blocks(&mut space, start, n);
        }
        self.file_bytes.store(end * BLOCK, Ordering::Release);
        lock(&self.writer).open = None;
        Ok(())
    }

    /// How [`BackingFile::open`] found and opened the path (`None` for [`BackingFile::with_io`]):
    /// what the daemon logs at start.
    pub fn opened(&self) -> Option<&Opened> {
        self.opened.as_ref()
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

    /// Writes `objects` (each a page index and 1..=4096 bytes) as records packed into one run
    /// of blocks with one write, and returns each record's byte offset (what a read of the
    /// object is given back). If a write that grows the file finds the filesystem full, the
    /// batch is tried once more in a free extent inside the file, if one is long enough. On
    /// error nothing is recorded: the caller keeps its pages.
    pub fn write_batch(&self, objects: &[(u64, &[u8])]) -> Result<Vec<u64>, BackingError> {
        if let Some(&(page, bad)) = objects
            .iter()
            .find(|(page, o)| o.is_empty() || o.len() > MAX_OBJECT || u32::try_from(*page).is_err())
        {
            return Err(self.invalid(page, bad.len()));
        }
        if objects.is_empty() {
            return Ok(Vec::new());
        }
        let total: u64 = objects
            .iter()
            .map(|(_, o)| record_len(o.len()) as u64)
            .sum();
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
        objects: &[(u64, &[u8])],
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
        objects: &[(u64, &[u8])],
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
        for &(page, object) in objects {
            offsets.push(base + pos as u64);
            let end = pos + record_len(object.len());
            // write_batch checked that the page fits a u32.
            let page = u32::try_from(page).unwrap_or(u32::MAX);
            record::seal(self.key, page, object, &mut bytes[pos..end]);
            pos = end;
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
        objects: &[(u64, &[u8])],
        end: usize,
    ) {
        let mut space = lock(&self.space);
        let new_start = plan.new_start();
        space.take(new_start, plan.start + plan.blocks - new_start);
        for (&offset, (_, object)) in offsets.iter().zip(objects) {
            for block in blocks_of(offset, object.len()) {
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
        space.live_bytes += objects.iter().map(|(_, o)| o.len() as u64).sum::<u64>();
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
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
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
        if blocks_of(offset, len).any(|b| space.count(b) == 0) {
            return Err(self.invalid(offset, len));
        }
        self.drop_refs(&mut space, offset, len);
        space.live_bytes -= len as u64;
        space.objects -= 1;
        Ok(())
    }

    /// Pins the object of `len` bytes at `offset` (see the module doc): its blocks stay
    /// allocated, and its bytes unchanged, until the returned pin drops, even if the object is
    /// released meanwhile. The caller must own the object when it pins it (hold the lock of
    /// the slot naming it); then it may let go and read through the pin.
    pub fn pin(&self, offset: u64, len: usize) -> Result<PinnedObject<'_>, BackingError> {
        let mut space = lock(&self.space);
        if !valid_object(offset, len, space.file_blocks() * BLOCK) {
            return Err(self.invalid(offset, len));
        }
        if blocks_of(offset, len).any(|b| space.count(b) == 0 || space.count(b) == u16::MAX) {
            return Err(self.invalid(offset, len));
        }
        for block in blocks_of(offset, len) {
            space.add_ref(block);
        }
        Ok(PinnedObject {
            file: self,
            offset,
            len,
        })
    }

    /// Drops a pin's counts, freeing the blocks that reach zero.
    fn unpin(&self, offset: u64, len: usize) {
        let mut space = lock(&self.space);
        self.drop_refs(&mut space, offset, len);
    }

    /// Drops one count on each block the record of the object of `len` bytes at `offset`
    /// touches, and frees (punches) each run of them that reaches zero.
    fn drop_refs(&self, space: &mut Space, offset: u64, len: usize) {
        let mut freed: Option<(u64, u64)> = None;
        for block in blocks_of(offset, len) {
            if !space.drop_ref(block) {
                continue;
            }
            freed = match freed {
                Some((start, n)) if start + n == block => Some((start, n + 1)),
                Some((start, n)) => {
                    self.free_blocks(space, start, n);
                    Some((block, 1))
                }
                None => Some((block, 1)),
            };
        }
        if let Some((start, n)) = freed {
            self.free_blocks(space, start, n);
        }
    }

    /// Reads the object of `len` bytes whose record is at `offset`, which must be page
    /// `page`'s, into `out[..len]`, after checking its record (see the module doc, "Records"):
    /// a record that does not verify is [`BackingError::Corrupt`], and `out` holds nothing of
    /// it. Safe to call while batches and releases run on other objects; the caller owns this
    /// one or pins it. A failed read counts in `failed_reads` (impossible arguments, refused
    /// before any I/O, do not).
    pub fn read(
        &self,
        offset: u64,
        len: usize,
        page: u64,
        out: &mut [u8],
    ) -> Result<(), BackingError> {
        let file_bytes = self.file_bytes.load(Ordering::Acquire);
        let Some(page32) = u32::try_from(page)
            .ok()
            .filter(|_| out.len() >= len && valid_object(offset, len, file_bytes))
        else {
            return Err(self.invalid(offset, len));
        };
        let first = offset / BLOCK;
        let blocks = blocks_of(offset, len).count();
        let mut buf = [ZERO_BLOCK; 3];
        let bytes = as_bytes_mut(&mut buf[..blocks]);
        if let Err(e) = self.read_all(bytes, first * BLOCK) {
            bump(&self.counters.failed_reads, 1);
            return Err(e);
        }
        bump(&self.counters.reads, blocks as u64);
        let within = usize::try_from(offset - first * BLOCK).unwrap_or(0);
        let record = &bytes[within..within + record_len(len)];
        match record::open(self.key, page32, len, record) {
            Ok(object) => {
                out[..len].copy_from_slice(object);
                Ok(())
            }
            Err(why) => {
                bump(&self.counters.failed_reads, 1);
                Err(BackingError::Corrupt {
                    path: self.path.clone(),
                    offset,
                    page,
                    why,
                })
            }
        }
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
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
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
            for block in blocks_of(offset, len) {
                counts[usize::try_from(block).map_err(|e| e.to_string())?] += 1;
            }
            live_bytes += len as u64;
            objects.push((offset, record_len(len)));
        }
        objects.sort_unstable();
        for pair in objects.windows(2) {
            if pair[0].0 + pair[0].1 as u64 > pair[1].0 {
                return Err(format!("records {:?} and {:?} overlap", pair[0], pair[1]));
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

/// Whether the record of an object of `len` bytes at `offset` can lie in a file of
/// `file_bytes` bytes.
fn valid_object(offset: u64, len: usize, file_bytes: u64) -> bool {
    (1..=MAX_OBJECT).contains(&len)
        && offset
            .checked_add(record_len(len) as u64)
            .is_some_and(|end| end <= file_bytes)
}

/// The blocks the record of an object of `len` (1..=4096) bytes at `offset` touches: one to
/// three. The caller checked the range with [`valid_object`].
fn blocks_of(offset: u64, len: usize) -> std::ops::RangeInclusive<u64> {
    offset / BLOCK..=(offset + record_len(len) as u64 - 1) / BLOCK
}

/// A key for this run's records: random (the standard library's per-process hash keys), with
/// the time and the process ID mixed in.
fn run_key() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    if let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        hasher.write_u128(now.as_nanos());
    }
    hasher.write_u32(std::process::id());
    hasher.finish()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the state consistent before it can panic, so a poisoned
    // lock's data is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
#[path = "tests.rs"]
pub(in crate::store) mod tests;
