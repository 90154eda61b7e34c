// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! LZ4 block format, through the pure-Rust `lz4_flex` (the release build) or C liblz4
//! (`lz4-sys`, the `lz4-c` cargo feature).
//!
//! Both write and read the same LZ4 block format, so a page compressed by one decodes with the
//! other: a state file or a migration stream does not care which build made it. Which one the
//! release build uses, and the measurements behind the choice, are in DESIGN.md ("The lz4
//! implementation"): compression is level (`lz4_flex` with its unsafe encoder, the
//! `safe-encode` feature off, is within 4 % of C; with `safe-encode` it was 8-15 % slower),
//! and C decompresses 5-14 % faster depending on the harness.
//!
//! Decoding is safe against any input in both: `LZ4_decompress_safe` and `lz4_flex`'s
//! decoder never read or write outside the buffers they are given (both are fuzzed upstream,
//! and so are we: `fuzz/`), and a block that does not decode to exactly one page is an error.

pub mod prefix;

use super::{Algorithm, Codec, CodecError};
use crate::PAGE_SIZE;

/// The LZ4 codec. It is stateless: both implementations keep their hash table on the stack.
#[derive(Debug, Default, Clone, Copy)]
pub struct Lz4;

impl Codec for Lz4 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::Lz4
    }

    fn compress(&self, page: &[u8; PAGE_SIZE], dst: &mut [u8]) -> Result<usize, CodecError> {
        #[cfg(feature = "lz4-c")]
        {
            c::compress(page, dst)
        }
        #[cfg(not(feature = "lz4-c"))]
        {
            rust::compress(page, dst)
        }
    }

    fn decompress(&self, src: &[u8], page: &mut [u8; PAGE_SIZE]) -> Result<(), CodecError> {
        #[cfg(feature = "lz4-c")]
        {
            c::decompress(src, page)
        }
        #[cfg(not(feature = "lz4-c"))]
        {
            rust::decompress(src, page)
        }
    }
}

/// Which implementation this build's [`Lz4`] uses, for the log and `--version`-like reports.
pub const IMPLEMENTATION: &str = if cfg!(feature = "lz4-c") {
    "C liblz4 (lz4-sys)"
} else {
    "lz4_flex"
};

/// The pure-Rust implementation (always built: the tests hold the two against each other).
pub mod rust {
    use super::CodecError;
    use crate::PAGE_SIZE;

    /// Compresses `page` into `dst`; `Incompressible` when it does not fit.
    pub fn compress(page: &[u8; PAGE_SIZE], dst: &mut [u8]) -> Result<usize, CodecError> {
        // lz4_flex insists on a worst-case-sized output; compress through a stack buffer when
        // the caller's is smaller (the store passes a large enough one on its hot path).
        const WORST: usize = super::super::COMPRESS_BUFFER;
        let limit = dst.len();
        if limit >= WORST {
            return lz4_flex::block::compress_into(page, dst)
                .map_err(|_| CodecError::Incompressible { limit });
        }
        let mut scratch = [0u8; WORST];
        match lz4_flex::block::compress_into(page, &mut scratch) {
            Ok(n) if n <= limit => {
                dst[..n].copy_from_slice(&scratch[..n]);
                Ok(n)
            }
            _ => Err(CodecError::Incompressible { limit }),
        }
    }

    /// Decodes `src` into `page`; it must decode to exactly one page.
    pub fn decompress(src: &[u8], page: &mut [u8; PAGE_SIZE]) -> Result<(), CodecError> {
        match lz4_flex::block::decompress_into(src, page) {
            Ok(PAGE_SIZE) => Ok(()),
            Ok(n) => Err(CodecError::Corrupt(format!(
                "lz4 decoded {n} bytes, not a page"
            ))),
            Err(e) => Err(CodecError::Corrupt(e.to_string())),
        }
    }
}

/// C liblz4 through `lz4-sys` (also built for the unit tests, which hold it against
/// `lz4_flex` in every build).
#[cfg(any(feature = "lz4-c", test))]
pub mod c {
    use std::os::raw::{c_char, c_int};

    use super::CodecError;
    use crate::PAGE_SIZE;

    /// A page's length as liblz4 takes it.
    #[allow(clippy::cast_possible_truncation)] // 4096 fits every C int
    const PAGE: c_int = PAGE_SIZE as c_int;

    /// Compresses `page` into `dst`; `Incompressible` when it does not fit.
    pub fn compress(page: &[u8; PAGE_SIZE], dst: &mut [u8]) -> Result<usize, CodecError> {
        let limit = dst.len();
        let capacity = c_int::try_from(limit).unwrap_or(c_int::MAX);
        // SAFETY: `page` is PAGE_SIZE readable bytes and `dst` `capacity` (≤ its length)
        // writable ones; LZ4_compress_default reads and writes only within those bounds and
        // returns 0 when the result does not fit, writing nothing past `capacity`. The two do
        // not overlap (a shared and a mutable borrow).
        let written = unsafe {
            lz4_sys::LZ4_compress_default(
                page.as_ptr().cast::<c_char>(),
                dst.as_mut_ptr().cast::<c_char>(),
                PAGE,
                capacity,
            )
        };
        match usize::try_from(written) {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(CodecError::Incompressible { limit }),
        }
    }

    /// Decodes `src` into `page`; it must decode to exactly one page.
    pub fn decompress(src: &[u8], page: &mut [u8; PAGE_SIZE]) -> Result<(), CodecError> {
        let Ok(len) = c_int::try_from(src.len()) else {
            return Err(CodecError::Corrupt(format!(
                "an lz4 block of {} bytes is larger than any page's",
                src.len()
            )));
        };
        // SAFETY: `src` is `len` readable bytes and `page` PAGE_SIZE writable ones, not
        // overlapping; LZ4_decompress_safe is the decoder for untrusted input: it never reads
        // past `len` bytes nor writes past PAGE_SIZE, whatever the bytes, and returns a
        // negative number for a malformed block.
        let decoded = unsafe {
            lz4_sys::LZ4_decompress_safe(
                src.as_ptr().cast::<c_char>(),
                page.as_mut_ptr().cast::<c_char>(),
                len,
                PAGE,
            )
        };
        match decoded {
            PAGE => Ok(()),
            n if n >= 0 => Err(CodecError::Corrupt(format!(
                "lz4 decoded {n} bytes, not a page"
            ))),
            n => Err(CodecError::Corrupt(format!(
                "the lz4 block is malformed (liblz4 says {n})"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pagegen::fill_page;

    fn pages() -> Vec<[u8; PAGE_SIZE]> {
        (0..512)
            .map(|i| {
                let mut page = [0u8; PAGE_SIZE];
                fill_page(0x1a4, i, &mut page);
                page
            })
            .collect()
    }

    /// The implementations this build has, by name.
    type Pair = (
        &'static str,
        fn(&[u8; PAGE_SIZE], &mut [u8]) -> Result<usize, CodecError>,
        fn(&[u8], &mut [u8; PAGE_SIZE]) -> Result<(), CodecError>,
    );

    fn implementations() -> Vec<Pair> {
        vec![
            ("lz4_flex", rust::compress, rust::decompress),
            ("liblz4", c::compress, c::decompress),
        ]
    }

    #[test]
    fn every_implementation_reads_what_every_one_wrote() {
        let mut buffer = vec![0u8; crate::codec::COMPRESS_BUFFER];
        let mut out = [0u8; PAGE_SIZE];
        for page in pages() {
            for (writer, compress, _) in implementations() {
                let n = compress(&page, &mut buffer).unwrap();
                for (reader, _, decompress) in implementations() {
                    decompress(&buffer[..n], &mut out).unwrap();
                    assert!(out == page, "{writer} -> {reader}");
                }
            }
        }
    }

    #[test]
    fn a_page_that_does_not_fit_is_incompressible() {
        let mut random = [0u8; PAGE_SIZE];
        let mut rng = crate::pagegen::SplitMix64::new(9);
        for chunk in random.chunks_exact_mut(8) {
            chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
        }
        let mut small = [0u8; 3000];
        for (name, compress, _) in implementations() {
            assert!(
                matches!(
                    compress(&random, &mut small),
                    Err(CodecError::Incompressible { limit: 3000 })
                ),
                "{name}"
            );
        }
        assert!(Lz4.compress(&random, &mut small).is_err());
    }

    #[test]
    fn truncated_or_oversized_blocks_are_refused() {
        let mut buffer = vec![0u8; crate::codec::COMPRESS_BUFFER];
        let mut out = [0u8; PAGE_SIZE];
        for page in pages().iter().take(64) {
            let n = Lz4.compress(page, &mut buffer).unwrap();
            for cut in [0, 1, n / 2, n - 1] {
                for (name, _, decompress) in implementations() {
                    assert!(
                        decompress(&buffer[..cut], &mut out).is_err(),
                        "{name}: a block cut to {cut} of {n} decoded"
                    );
                }
            }
            // A block that decodes to more than a page is refused, never written past it.
            let mut two = [0u8; 2 * PAGE_SIZE];
            two[..PAGE_SIZE].copy_from_slice(page);
            two[PAGE_SIZE..].copy_from_slice(page);
            let mut big = vec![0u8; lz4_flex::block::get_maximum_output_size(2 * PAGE_SIZE)];
            let n = lz4_flex::block::compress_into(&two, &mut big).unwrap();
            for (name, _, decompress) in implementations() {
                assert!(decompress(&big[..n], &mut out).is_err(), "{name}");
            }
        }
    }
}
