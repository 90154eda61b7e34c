// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! LZ4 block format, through the pure-Rust `lz4_flex` (the release build) or C liblz4
//! (`lz4-sys`, the `lz4-c` cargo feature).
//!
//! Both write and read the same LZ4 block format, so a page compressed by one decodes with the
//! other: a state file or a migration stream does not care which build made it. A unit (see
//! `codec`) is one LZ4 block of all its pages, in both. Which one the
//! release build uses, and the measurements behind the choice, are in DESIGN.md ("The lz4
//! implementation"): compression is level (`lz4_flex` with its unsafe encoder, the
//! `safe-encode` feature off, is within 4 % of C; with `safe-encode` it was 8-15 % slower),
//! and C decompresses 5-14 % faster depending on the harness.
//!
//! Decoding is safe against any input in both: `LZ4_decompress_safe` and `lz4_flex`'s
//! decoder never read or write outside the buffers they are given (both are fuzzed upstream,
//! and so are we: `fuzz/`), and a block that does not decode to exactly one page is an error.
//!
//! A partial decode of a unit (the pages up to the one a read wants) goes through [`prefix`],
//! our own safe decoder that stops there; neither library can. With `lz4_flex` a full decode
//! goes through [`prefix`] too (it is faster); with liblz4 a decode that needs most of the unit
//! goes through the library: see [`PREFIX_LIMIT`].

pub mod prefix;

use super::{debug_check_unit, debug_check_unit_decode, Algorithm, Codec, CodecError};
use crate::PAGE_SIZE;

/// A unit decode that needs at most this many sixteenths of the unit goes through [`prefix`];
/// one that needs more decodes the unit whole through the library, when that is faster than
/// decoding the prefix with [`prefix`].
///
/// The lz4 codec's test `prefix_decoder_speed` (run with `--ignored`; optimised, on 64 16-page
/// swap-like units, the best of 5 runs on a loaded 2-core machine) measured a whole unit in
/// 38 us with `lz4_flex` and 14.5 us with liblz4, and [`prefix`] at 0.9 us for 1 page, 2.0 us
/// for 2, 9.1 us for 8 and 20 us for all 16. So with `lz4_flex` every decode goes through
/// [`prefix`], a full one too (which checks the unit's length as a library does: a later run
/// on a quieter machine gave `lz4_flex` 27 us, liblz4 11.6 us and [`prefix`] 18.2 us for a
/// whole unit), and with liblz4 those of up to 11 pages of 16.
pub const PREFIX_LIMIT: usize = if cfg!(feature = "lz4-c") { 11 } else { 17 };

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

    fn compress_unit(&self, src: &[u8], dst: &mut [u8]) -> Result<usize, CodecError> {
        debug_check_unit(src);
        #[cfg(feature = "lz4-c")]
        {
            c::compress_unit(src, dst)
        }
        #[cfg(not(feature = "lz4-c"))]
        {
            rust::compress_unit(src, dst)
        }
    }

    fn decompress_unit(
        &self,
        src: &[u8],
        dst: &mut [u8],
        needed: usize,
    ) -> Result<usize, CodecError> {
        debug_check_unit_decode(dst, needed);
        if needed.saturating_mul(16) <= dst.len().saturating_mul(PREFIX_LIMIT)
            && (needed < dst.len() || PREFIX_LIMIT > 16)
        {
            return prefix::decompress(src, dst, needed)
                .map_err(|e| CodecError::Corrupt(e.to_string()));
        }
        #[cfg(feature = "lz4-c")]
        {
            c::decompress_unit(src, dst)
        }
        #[cfg(not(feature = "lz4-c"))]
        {
            rust::decompress_unit(src, dst)
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
    use std::cell::RefCell;

    use super::super::full_unit;
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

    thread_local! {
        /// Where a unit is compressed when the caller's buffer is smaller than `lz4_flex`
        /// insists on; made on a thread's first such unit and kept.
        static UNIT_SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }

    /// Compresses the unit `src` into `dst` as one block; `Incompressible` when it does not
    /// fit.
    pub fn compress_unit(src: &[u8], dst: &mut [u8]) -> Result<usize, CodecError> {
        let limit = dst.len();
        let worst = lz4_flex::block::get_maximum_output_size(src.len());
        if limit >= worst {
            return lz4_flex::block::compress_into(src, dst)
                .map_err(|_| CodecError::Incompressible { limit });
        }
        UNIT_SCRATCH.with(|cell| {
            let mut scratch = cell.borrow_mut();
            if scratch.len() < worst {
                scratch.resize(worst, 0);
            }
            match lz4_flex::block::compress_into(src, &mut scratch) {
                Ok(n) if n <= limit => {
                    dst[..n].copy_from_slice(&scratch[..n]);
                    Ok(n)
                }
                _ => Err(CodecError::Incompressible { limit }),
            }
        })
    }

    /// Decodes the whole unit `src` into `dst`; it must decode to exactly `dst.len()` bytes.
    pub fn decompress_unit(src: &[u8], dst: &mut [u8]) -> Result<usize, CodecError> {
        match lz4_flex::block::decompress_into(src, dst) {
            Ok(n) => full_unit("lz4", n, dst.len()),
            Err(e) => Err(CodecError::Corrupt(e.to_string())),
        }
    }
}

/// C liblz4 through `lz4-sys` (also built for the unit tests, which hold it against
/// `lz4_flex` in every build).
#[cfg(any(feature = "lz4-c", test))]
pub mod c {
    use std::os::raw::{c_char, c_int};

    use super::super::full_unit;
    use super::CodecError;
    use crate::PAGE_SIZE;

    /// A page's length as liblz4 takes it.
    #[allow(clippy::cast_possible_truncation)] // 4096 fits every C int
    const PAGE: c_int = PAGE_SIZE as c_int;

    /// Compresses `page` into `dst`; `Incompressible` when it does not fit.
    pub fn compress(page: &[u8; PAGE_SIZE], dst: &mut [u8]) -> Result<usize, CodecError> {
        compress_unit(page, dst)
    }

    /// Decodes `src` into `page`; it must decode to exactly one page.
    pub fn decompress(src: &[u8], page: &mut [u8; PAGE_SIZE]) -> Result<(), CodecError> {
        match decode(src, page)? {
            PAGE => Ok(()),
            n => Err(CodecError::Corrupt(format!(
                "lz4 decoded {n} bytes, not a page"
            ))),
        }
    }

    /// Compresses `src` (a page or a unit) into `dst` as one block; `Incompressible` when it
    /// does not fit.
    pub fn compress_unit(src: &[u8], dst: &mut [u8]) -> Result<usize, CodecError> {
        let limit = dst.len();
        let Ok(len) = c_int::try_from(src.len()) else {
            return Err(CodecError::Incompressible { limit });
        };
        let capacity = c_int::try_from(limit).unwrap_or(c_int::MAX);
        // SAFETY: `src` is `len` readable bytes and `dst` `capacity` (≤ its length) writable
        // ones; LZ4_compress_default reads and writes only within those bounds and returns 0
        // when the result does not fit, writing nothing past `capacity`. The two do not overlap
        // (a shared and a mutable borrow).
        let written = unsafe {
            lz4_sys::LZ4_compress_default(
                src.as_ptr().cast::<c_char>(),
                dst.as_mut_ptr().cast::<c_char>(),
                len,
                capacity,
            )
        };
        match usize::try_from(written) {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(CodecError::Incompressible { limit }),
        }
    }

    /// Decodes the whole unit `src` into `dst`; it must decode to exactly `dst.len()` bytes.
    pub fn decompress_unit(src: &[u8], dst: &mut [u8]) -> Result<usize, CodecError> {
        let decoded = decode(src, dst)?;
        full_unit("lz4", usize::try_from(decoded).unwrap_or(0), dst.len())
    }

    /// Decodes the block `src` into `dst` and returns the decoded length (at most
    /// `dst.len()`).
    fn decode(src: &[u8], dst: &mut [u8]) -> Result<c_int, CodecError> {
        let Ok(len) = c_int::try_from(src.len()) else {
            return Err(CodecError::Corrupt(format!(
                "an lz4 block of {} bytes is larger than any unit's",
                src.len()
            )));
        };
        let Ok(capacity) = c_int::try_from(dst.len()) else {
            return Err(CodecError::Corrupt(format!(
                "an lz4 destination of {} bytes is larger than any unit's",
                dst.len()
            )));
        };
        // SAFETY: `src` is `len` readable bytes and `dst` `capacity` writable ones, not
        // overlapping; LZ4_decompress_safe is the decoder for untrusted input: it never reads
        // past `len` bytes nor writes past `capacity`, whatever the bytes, and returns a
        // negative number for a malformed block.
        let decoded = unsafe {
            lz4_sys::LZ4_decompress_safe(
                src.as_ptr().cast::<c_char>(),
                dst.as_mut_ptr().cast::<c_char>(),
                len,
                capacity,
            )
        };
        if decoded < 0 {
            return Err(CodecError::Corrupt(format!(
                "the lz4 block is malformed (liblz4 says {decoded})"
            )));
        }
        Ok(decoded)
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

    /// Units of 2 to 16 swap-like pages.
    fn units() -> Vec<Vec<u8>> {
        let mut index = 0;
        [2, 3, 4, 8, 16, 16, 16]
            .into_iter()
            .map(|pages| {
                let mut unit = vec![0u8; pages * PAGE_SIZE];
                for page in unit.chunks_exact_mut(PAGE_SIZE) {
                    let page: &mut [u8; PAGE_SIZE] = page.try_into().unwrap();
                    fill_page(0x0417, index, page);
                    index += 1;
                }
                unit
            })
            .collect()
    }

    /// The unit implementations, by name.
    type UnitPair = (
        &'static str,
        fn(&[u8], &mut [u8]) -> Result<usize, CodecError>,
        fn(&[u8], &mut [u8]) -> Result<usize, CodecError>,
    );

    fn unit_implementations() -> Vec<UnitPair> {
        vec![
            ("lz4_flex", rust::compress_unit, rust::decompress_unit),
            ("liblz4", c::compress_unit, c::decompress_unit),
        ]
    }

    #[test]
    fn every_implementation_and_the_prefix_decoder_read_every_ones_units() {
        let mut buffer = vec![0u8; crate::codec::UNIT_COMPRESS_BUFFER];
        for unit in units() {
            for (writer, compress, _) in unit_implementations() {
                let n = compress(&unit, &mut buffer).unwrap();
                for (reader, _, decompress) in unit_implementations() {
                    let mut out = vec![0u8; unit.len()];
                    assert_eq!(decompress(&buffer[..n], &mut out), Ok(unit.len()));
                    assert!(out == unit, "{writer} -> {reader}");
                }
                for page in 1..=unit.len() / PAGE_SIZE {
                    let mut out = vec![0u8; unit.len()];
                    let decoded = prefix::decompress(&buffer[..n], &mut out, page * PAGE_SIZE)
                        .unwrap_or_else(|e| panic!("{writer} -> prefix: {e}"));
                    assert!(decoded >= page * PAGE_SIZE);
                    assert!(out[..decoded] == unit[..decoded], "{writer} -> prefix");
                }
            }
        }
    }

    #[test]
    fn a_short_read_decodes_little_more_than_it_needs() {
        let mut buffer = vec![0u8; crate::codec::UNIT_COMPRESS_BUFFER];
        let unit = units().pop().unwrap();
        let n = Lz4.compress_unit(&unit, &mut buffer).unwrap();
        let mut out = vec![0u8; unit.len()];
        let decoded = Lz4
            .decompress_unit(&buffer[..n], &mut out, 2 * PAGE_SIZE)
            .unwrap();
        // One sequence past the page at most: a match is at most the unit.
        assert!(decoded < unit.len(), "{decoded}");
        assert!(out[..decoded] == unit[..decoded]);
    }

    #[test]
    fn units_too_long_for_their_destination_are_refused() {
        let mut buffer = vec![0u8; crate::codec::UNIT_COMPRESS_BUFFER];
        let unit = units().pop().unwrap();
        let n = Lz4.compress_unit(&unit, &mut buffer).unwrap();
        let mut short = vec![0u8; unit.len() - PAGE_SIZE];
        for (name, _, decompress) in unit_implementations() {
            assert!(decompress(&buffer[..n], &mut short).is_err(), "{name}");
        }
        let length = short.len();
        assert!(prefix::decompress(&buffer[..n], &mut short, length).is_err());
    }

    /// Times `prefix` against `lz4_flex` on 16-page units: `cargo nextest run --release
    /// --run-ignored only prefix_decoder_speed --no-capture` (a few seconds).
    #[test]
    #[ignore = "a measurement, not a test"]
    fn prefix_decoder_speed() {
        use std::time::Instant;
        let units: Vec<Vec<u8>> = (0..64u64)
            .map(|u| {
                let mut unit = vec![0u8; 16 * PAGE_SIZE];
                for (i, page) in unit.chunks_exact_mut(PAGE_SIZE).enumerate() {
                    let page: &mut [u8; PAGE_SIZE] = page.try_into().unwrap();
                    fill_page(0x5eed, u * 16 + i as u64, page);
                }
                unit
            })
            .collect();
        let blocks: Vec<Vec<u8>> = units.iter().map(|u| lz4_flex::block::compress(u)).collect();
        let bytes: usize = units.iter().map(Vec::len).sum();
        let packed: usize = blocks.iter().map(Vec::len).sum();
        let mut out = vec![0u8; 16 * PAGE_SIZE];
        let rounds = 200;
        let mut time = |name: &str, decode: &mut dyn FnMut(&[u8], &mut [u8]) -> usize| {
            let start = Instant::now();
            let mut decoded = 0;
            for _ in 0..rounds {
                for block in &blocks {
                    decoded += decode(block, &mut out);
                }
            }
            let elapsed = start.elapsed();
            let per_unit = elapsed.as_nanos() / (rounds * blocks.len()) as u128;
            let rate = decoded as f64 / elapsed.as_secs_f64() / 1e9;
            println!("{name}: {per_unit} ns per unit, {rate:.2} GB/s of output");
        };
        println!("16-page units, {bytes} bytes in {packed} compressed");
        time("lz4_flex, whole unit", &mut |b, o| {
            lz4_flex::block::decompress_into(b, o).unwrap()
        });
        time("liblz4, whole unit", &mut |b, o| {
            c::decompress_unit(b, o).unwrap()
        });
        for pages in [16, 8, 2, 1] {
            time(&format!("prefix, {pages} pages"), &mut |b, o| {
                prefix::decompress(b, o, pages * PAGE_SIZE).unwrap()
            });
        }
    }
}
