// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Backing I/O for tests: a sparse in-memory file and a fault injector. Built for the crate's
//! own tests and, with the `testing` feature, for integration tests and the fuzz targets; not
//! part of the shipped library.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Mutex;

use super::{lock, BackingIo, Block, BLOCK, BLOCK_SIZE, ZERO_BLOCK};

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
    /// Reads that have started and not returned.
    reads_in_flight: AtomicU64,
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
            reads_in_flight: AtomicU64::new(0),
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

    /// Reads that have started and not yet returned (a slow read is in the file).
    pub fn reads_in_flight(&self) -> u64 {
        self.reads_in_flight.load(Ordering::SeqCst)
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
        self.reads_in_flight.fetch_add(1, Ordering::SeqCst);
        let result = self.pread_with_faults(buf, off);
        self.reads_in_flight.fetch_sub(1, Ordering::SeqCst);
        result
    }

    fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        errno_result(&self.punch_errno)?;
        self.inner.punch(off, len)
    }
}

impl FaultyIo {
    fn pread_with_faults(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
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
}
