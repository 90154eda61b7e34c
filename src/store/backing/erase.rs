// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Erasing a backing file: every block given back, so that none of the guest's pages stays on
//! disk once they are gone from the store. [`BackingFile::erase`] does it at the end of a run
//! whose pages are not kept; [`BackingFile::open`] does it at the start for a block device an
//! earlier run wrote (a regular file is truncated there).
//!
//! A range is punched out first (`fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`): a
//! regular file's blocks go back to its filesystem and read as zeros; on a block device the
//! kernel turns the punch into a write-zeroes that unmaps, which the device must support.
//! Where punching is refused, a block device is discarded (`BLKDISCARD`: the device is told
//! the blocks hold nothing; whether it still returns the old bytes when read directly is up
//! to the device) and a regular file is truncated. Where that fails too, the bytes stay, and
//! [`Erasure::Failed`] says why: the start and exit logs repeat it.

use std::sync::atomic::Ordering;

use super::space::Space;
use super::{lock, BackingFile, BLOCK};

/// What erasing a backing file did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Erasure {
    /// Nothing had been written: there was nothing to erase.
    Nothing,
    /// `bytes` were punched out (`fallocate` `PUNCH_HOLE`): they read as zeros.
    Punched {
        /// Bytes punched.
        bytes: u64,
    },
    /// Punching was refused; `bytes` were discarded instead (`BLKDISCARD` on a block device,
    /// truncation of a regular file).
    Discarded {
        /// Bytes discarded.
        bytes: u64,
    },
    /// Neither worked: the bytes stay until they are overwritten.
    Failed {
        /// Bytes that should have been erased.
        bytes: u64,
        /// What `fallocate` said (an `errno`).
        punch: i32,
        /// What the discard (or truncation) said.
        discard: i32,
    },
}

impl Erasure {
    /// Whether the bytes are gone (or there were none).
    pub fn erased(self) -> bool {
        match self {
            Erasure::Nothing | Erasure::Punched { .. } | Erasure::Discarded { .. } => true,
            Erasure::Failed { .. } => false,
        }
    }
}

impl std::fmt::Display for Erasure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let errno = |e: i32| std::io::Error::from_raw_os_error(e);
        match *self {
            Erasure::Nothing => f.write_str("nothing was written to it"),
            Erasure::Punched { bytes } => {
                write!(f, "punched out {bytes} bytes (fallocate PUNCH_HOLE)")
            }
            Erasure::Discarded { bytes } => write!(
                f,
                "discarded {bytes} bytes (BLKDISCARD, or truncation of a file; punching was refused)"
            ),
            Erasure::Failed {
                bytes,
                punch,
                discard,
            } => write!(
                f,
                "could not erase {bytes} bytes: fallocate PUNCH_HOLE failed ({}) and the \
                 discard failed ({}); the data stays there until it is overwritten",
                errno(punch),
                errno(discard)
            ),
        }
    }
}

impl BackingFile {
    /// Releases every block of the file (see the module doc) and forgets them: afterwards the
    /// file is empty, as if just opened. Objects a slot still names are gone: reading or
    /// releasing one fails ([`super::BackingError::InvalidObject`]), never returns other
    /// bytes. For the end of a run whose pages are not kept (no state, or the state
    /// destroyed); waits for a batch in flight.
    pub fn erase(&self) -> Erasure {
        let mut writer = lock(&self.writer);
        let mut space = lock(&self.space);
        let bytes = space.file_blocks() * BLOCK;
        writer.open = None;
        *space = Space::default();
        self.file_bytes.store(0, Ordering::Release);
        self.erase_range(bytes)
    }

    /// Punches (or else discards) the first `bytes` of the file.
    pub(super) fn erase_range(&self, bytes: u64) -> Erasure {
        if bytes == 0 {
            return Erasure::Nothing;
        }
        let errno = |e: std::io::Error| e.raw_os_error().unwrap_or(libc::EIO);
        let punch = match self.io.punch(0, bytes) {
            Ok(()) => return Erasure::Punched { bytes },
            Err(e) => errno(e),
        };
        match self.io.discard(0, bytes) {
            Ok(()) => Erasure::Discarded { bytes },
            Err(e) => Erasure::Failed {
                bytes,
                punch,
                discard: errno(e),
            },
        }
    }
}
