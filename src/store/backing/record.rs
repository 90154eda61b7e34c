// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The record an object is stored in on the backing file: a 16-byte header, then the object's
//! bytes. The header proves, at read-back, that the bytes are the ones the slot wrote, for the
//! page the slot belongs to, in this run of the daemon:
//!
//! ```text
//! byte  0..4   magic "VZO\x01" (56 5a 4f 01): never all zeros, so a hole never verifies
//! byte  4..8   CRC-32 (little-endian) of: the run key (8 bytes, LE), bytes 8..16 of this
//!              header, the object's bytes
//! byte  8..12  page index (u32, LE)
//! byte 12..14  object length in bytes (u16, LE), 1..=4096
//! byte 14..16  zero (reserved)
//! byte 16..    the object (16 + length bytes in all)
//! ```
//!
//! The run key is a random number drawn when the [`BackingFile`](super::BackingFile) is made
//! and never stored: a record left by an earlier run (on a block device, whose contents are
//! not truncated) fails its checksum in this one. The CRC is `crc32fast`'s (the IEEE
//! polynomial, folded with PCLMULQDQ on x86-64 and the CRC instructions on AArch64): on this
//! project's machine it was the fastest of the three measured (crc32fast, crc32c, xxh3) at
//! 1.5 KiB and 4 KiB, a few hundred nanoseconds a page, and a 32-bit CRC detects every burst
//! error up to 32 bits and lets through one random change in 2^32 — on top of the magic,
//! page and length checks, which catch zeroed, truncated and misplaced ranges outright.

use super::MAX_OBJECT;

/// Bytes of header before each object on the file.
pub const RECORD_HEADER: usize = 16;
/// The largest record: a raw page and its header.
pub const MAX_RECORD: usize = RECORD_HEADER + MAX_OBJECT;
/// The first bytes of every record.
pub const RECORD_MAGIC: [u8; 4] = *b"VZO\x01";

/// Bytes a record of an object of `len` bytes takes on the file.
pub(super) const fn record_len(len: usize) -> usize {
    RECORD_HEADER + len
}

/// Why a record read from the file is not the object the slot wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mismatch {
    /// The bytes do not start with a record header: a hole, zeros, or data written over it.
    NoHeader,
    /// The header names another page.
    OtherPage(u32),
    /// The header names another length (or its reserved bytes are not zero).
    OtherLength(u16),
    /// The checksum does not match: the bytes changed, or the record is an earlier run's.
    Checksum,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mismatch::NoHeader => {
                f.write_str("no record starts there (the range was zeroed, punched or overwritten)")
            }
            Mismatch::OtherPage(page) => write!(f, "the record there belongs to page {page}"),
            Mismatch::OtherLength(len) => {
                write!(
                    f,
                    "the record there holds {len} bytes, not the slot's length"
                )
            }
            Mismatch::Checksum => f.write_str(
                "the record's checksum does not match its bytes (changed, or left by an \
                 earlier run)",
            ),
        }
    }
}

/// The checksum of a record: the run key, the header's page/length/reserved bytes, the object.
fn checksum(key: u64, fields: &[u8], object: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&key.to_le_bytes());
    crc.update(fields);
    crc.update(object);
    crc.finalize()
}

/// Writes the record of `object` (1..=4096 bytes) of page `page` into `out`, which is
/// exactly [`record_len`]`(object.len())` bytes.
pub(super) fn seal(key: u64, page: u32, object: &[u8], out: &mut [u8]) {
    debug_assert_eq!(out.len(), record_len(object.len()));
    let (header, body) = out.split_at_mut(RECORD_HEADER);
    // The caller checked 1..=MAX_OBJECT, which fits a u16.
    let len = u16::try_from(object.len()).unwrap_or(u16::MAX);
    header[0..4].copy_from_slice(&RECORD_MAGIC);
    header[8..12].copy_from_slice(&page.to_le_bytes());
    header[12..14].copy_from_slice(&len.to_le_bytes());
    header[14..16].fill(0);
    let crc = checksum(key, &header[8..16], object);
    header[4..8].copy_from_slice(&crc.to_le_bytes());
    body.copy_from_slice(object);
}

/// Checks `record` (the [`record_len`]`(len)` bytes read where the slot says its object is)
/// and returns the object's bytes if it is page `page`'s object of `len` bytes, written in the
/// run of `key`.
pub(super) fn open(key: u64, page: u32, len: usize, record: &[u8]) -> Result<&[u8], Mismatch> {
    if record.len() != record_len(len) || record[0..4] != RECORD_MAGIC {
        return Err(Mismatch::NoHeader);
    }
    let field = |range: std::ops::Range<usize>| &record[range];
    let found_page = u32::from_le_bytes([record[8], record[9], record[10], record[11]]);
    if found_page != page {
        return Err(Mismatch::OtherPage(found_page));
    }
    let found_len = u16::from_le_bytes([record[12], record[13]]);
    if usize::from(found_len) != len || field(14..16) != [0, 0] {
        return Err(Mismatch::OtherLength(found_len));
    }
    let stored = u32::from_le_bytes([record[4], record[5], record[6], record[7]]);
    let object = &record[RECORD_HEADER..];
    if checksum(key, field(8..16), object) != stored {
        return Err(Mismatch::Checksum);
    }
    Ok(object)
}
