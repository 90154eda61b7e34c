// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The system calls of a backing file, behind a trait so tests can put faults between the
//! file and its user, and the real file's implementation.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// The system calls a [`BackingFile`](super::BackingFile) makes, so tests can put faults between it and the file.
pub trait BackingIo: Send + Sync {
    /// Writes `buf` at byte `off`, returning how many bytes were written (`pwrite`).
    fn pwrite(&self, buf: &[u8], off: u64) -> io::Result<usize>;
    /// Reads into `buf` from byte `off`, returning how many bytes were read, 0 at the end
    /// (`pread`).
    fn pread(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;
    /// Deallocates `len` bytes at `off`, keeping the file size; they read as zeros after.
    fn punch(&self, off: u64, len: u64) -> io::Result<()>;
    /// Tells the storage that `len` bytes at `off` hold nothing, where [`BackingIo::punch`]
    /// is refused: `BLKDISCARD` on a block device; a regular file is cut at `off` (for a
    /// range that reaches its end). Unsupported (`EOPNOTSUPP`) unless implemented.
    fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        let _ = (off, len);
        Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }
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
    fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        (**self).discard(off, len)
    }
}

fn off_t(value: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(value).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))
}

/// The real file.
pub(super) struct FileIo {
    pub(super) file: File,
    pub(super) direct: bool,
    /// Where the backing file's byte 0 is in `file`: after the device header on a block
    /// device, 0 in a regular file.
    pub(super) base: u64,
    /// Whether `file` is a block device.
    pub(super) device: bool,
}

/// `BLKDISCARD`, `_IO(0x12, 119)`.
const BLKDISCARD: u64 = (0x12 << 8) | 119;

impl FileIo {
    /// The offset in `file` of the backing file's byte `off`.
    fn at(&self, off: u64) -> io::Result<u64> {
        off.checked_add(self.base)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))
    }

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
        let off = self.at(off)?;
        let written = self.file.write_at(buf, off)?;
        if !self.direct && written > 0 {
            self.drop_cache(off, written, true)?;
        }
        Ok(written)
    }

    fn pread(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let off = self.at(off)?;
        let read = self.file.read_at(buf, off)?;
        if !self.direct && read > 0 {
            self.drop_cache(off, read, false)?;
        }
        Ok(read)
    }

    fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate takes an open fd and plain integers; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                off_t(self.at(off)?)?,
                off_t(len)?,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        let start = self.at(off)?;
        if !self.device {
            return self.file.set_len(start);
        }
        let range: [u64; 2] = [start, len];
        // BLKDISCARD fits every libc's ioctl request type (u32 bits).
        #[allow(clippy::cast_possible_truncation)]
        let request = BLKDISCARD as libc::Ioctl;
        // SAFETY: BLKDISCARD reads two u64 (start, length) through the pointer, which points
        // at a live local array of two u64; the fd is open.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), request, range.as_ptr()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
