// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Page codecs: one small trait that every compressor implements.
//!
//! A codec turns one 4 KiB page into a compressed object and back. The store calls it on the
//! request thread (or, later, on compression workers), so implementations keep their heavy state
//! (zstd contexts, libdeflate compressors) per thread, the way zram keeps one stream per CPU.
//!
//! The batch call exists for accelerators (Intel IAA compresses up to 8 pages in one submission);
//! the software codecs loop, `deflate-iaa` submits the batch whole.
//!
//! A *unit* is 2 to [`MAX_UNIT_PAGES`] contiguous pages that a guest wrote together, compressed
//! as one object: the pages share one history, so the object is smaller than the pages'
//! separate objects. Reading one page of a unit decodes the unit's start up to that page; lz4,
//! the codec that can stop there, does (`lz4::prefix`), the others decode the whole unit.

mod deflate;
mod deflate_iaa;
pub mod lz4;
mod zstd;

use std::fmt;
use std::str::FromStr;

pub use self::deflate::Deflate;
pub use self::deflate_iaa::{DeflateIaa, IaaBackend, IaaMode, IaaOptions};
pub use self::lz4::Lz4;
pub use self::zstd::{
    DictionaryError, Zstd, ZstdDictionaries, MAX_DICTIONARIES, MAX_DICTIONARY_BYTES,
};

use crate::PAGE_SIZE;

/// The largest number of pages a batch call takes at once (an IAA descriptor batch).
pub const MAX_BATCH: usize = 8;

/// A destination buffer of this size never makes a software codec report
/// [`CodecError::Incompressible`]: zram, too, compresses into a two-page buffer.
pub const COMPRESS_BUFFER: usize = 2 * PAGE_SIZE;

/// The most pages one unit holds (64 KiB).
pub const MAX_UNIT_PAGES: usize = 16;

/// The largest object a software codec makes of `pages` pages: a destination buffer this large
/// never makes one report [`CodecError::Incompressible`] for a unit of that many pages.
///
/// It is `lz4_flex`'s bound (the input plus 10 % and 20 bytes), the loosest of the four and the
/// size `lz4_flex` compresses into without a scratch buffer; the true worst cases are below it:
/// liblz4's `n + n/255 + 16`, zstd's `n + n/256` plus up to 64 bytes, libdeflate's 5 bytes per
/// 5000-byte block (a test holds them against it).
pub const fn unit_compress_bound(pages: usize) -> usize {
    let bytes = pages * PAGE_SIZE;
    bytes + bytes / 10 + 20
}

/// A destination buffer of this size never makes a software codec report
/// [`CodecError::Incompressible`] for a unit of [`MAX_UNIT_PAGES`] pages (the unit's
/// [`COMPRESS_BUFFER`]).
pub const UNIT_COMPRESS_BUFFER: usize = unit_compress_bound(MAX_UNIT_PAGES);

/// Errors a codec reports.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    /// The compressed form would not fit in the destination buffer: store the page raw.
    #[error("the page does not compress into {limit} bytes")]
    Incompressible {
        /// The size of the destination buffer that was too small.
        limit: usize,
    },
    /// The compressed object is corrupt or does not decode to exactly one page (for a unit:
    /// to exactly its pages).
    #[error("the compressed object is corrupt: {0}")]
    Corrupt(String),
}

/// A page compressor.
pub trait Codec: Send + Sync + fmt::Debug {
    /// The algorithm this codec implements.
    fn algorithm(&self) -> Algorithm;

    /// Compresses `page` into `dst` and returns the compressed length. When the result would be
    /// longer than `dst`, returns [`CodecError::Incompressible`]; `dst`'s content is then
    /// unspecified.
    fn compress(&self, page: &[u8; PAGE_SIZE], dst: &mut [u8]) -> Result<usize, CodecError>;

    /// Decompresses `src`, which must decode to exactly one page, into `page`.
    fn decompress(&self, src: &[u8], page: &mut [u8; PAGE_SIZE]) -> Result<(), CodecError>;

    /// Compresses up to [`MAX_BATCH`] pages; `results[i]` receives what `compress(pages[i],
    /// dsts[i])` would return. Software codecs loop; an accelerator submits one batch.
    fn compress_batch(
        &self,
        pages: &[&[u8; PAGE_SIZE]],
        dsts: &mut [&mut [u8]],
        results: &mut [Result<usize, CodecError>],
    ) {
        for ((page, dst), result) in pages.iter().zip(dsts.iter_mut()).zip(results.iter_mut()) {
            *result = self.compress(page, dst);
        }
    }

    /// Compresses `src` — 2 to [`MAX_UNIT_PAGES`] whole pages — as one object into `dst` and
    /// returns the compressed length; [`CodecError::Incompressible`] when it does not fit in
    /// `dst` (whose content is then unspecified). [`unit_compress_bound`] gives a `dst` that
    /// always fits.
    fn compress_unit(&self, src: &[u8], dst: &mut [u8]) -> Result<usize, CodecError>;

    /// Decodes `src`, which must decode to exactly `dst.len()` bytes (whole pages), into `dst`.
    /// A codec that can stop early stops once at least `needed` bytes (`1..=dst.len()`) are
    /// decoded; returns how many bytes it decoded (`needed..=dst.len()`). Only a full decode
    /// (returned `== dst.len()`) checks the object's length; a partial one guarantees
    /// `dst[..returned]` equals what a full decode gives, and leaves the rest unspecified.
    fn decompress_unit(
        &self,
        src: &[u8],
        dst: &mut [u8],
        needed: usize,
    ) -> Result<usize, CodecError>;
}

/// Checks, in debug builds, that `unit` is 2 to [`MAX_UNIT_PAGES`] whole pages: a caller's
/// bug, not the data's. (Every codec handles other lengths as well, so release builds go on.)
fn debug_check_unit(unit: &[u8]) {
    debug_assert!(
        unit.len().is_multiple_of(PAGE_SIZE)
            && (2..=MAX_UNIT_PAGES).contains(&(unit.len() / PAGE_SIZE)),
        "a unit of {} bytes is not 2 to {MAX_UNIT_PAGES} pages",
        unit.len()
    );
}

/// Checks, in debug builds, a unit decode's arguments (see [`debug_check_unit`]) and that
/// `needed` is in `1..=dst.len()`.
fn debug_check_unit_decode(dst: &[u8], needed: usize) {
    debug_check_unit(dst);
    debug_assert!(
        (1..=dst.len()).contains(&needed),
        "{needed} bytes needed of a {}-byte unit",
        dst.len()
    );
}

/// The result of a codec's full decode of a unit of `expected` bytes that produced `decoded`.
fn full_unit(algorithm: &str, decoded: usize, expected: usize) -> Result<usize, CodecError> {
    if decoded == expected {
        Ok(decoded)
    } else {
        Err(CodecError::Corrupt(format!(
            "{algorithm} decoded {decoded} bytes, not the unit's {expected}"
        )))
    }
}

/// The compression algorithms the store offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// LZ4 (block format), via C liblz4 or `lz4_flex` (see `codec::lz4`). zram's fast default.
    Lz4,
    /// Zstandard, with a level (default 1).
    Zstd,
    /// Raw DEFLATE (RFC 1951), the format an Intel IAA accelerator produces, via libdeflate.
    Deflate,
    /// Raw DEFLATE through an Intel IAA accelerator (or its software work queue), in batches.
    #[serde(rename = "deflate-iaa")]
    DeflateIaa(IaaOptions),
}

impl Algorithm {
    /// Every algorithm, in the order `--help` lists them.
    pub const ALL: [Algorithm; 4] = [
        Algorithm::Lz4,
        Algorithm::Zstd,
        Algorithm::Deflate,
        Algorithm::DeflateIaa(IaaOptions::DEFAULT),
    ];

    /// The name used on the command line and in zram's `comp_algorithm`.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Lz4 => "lz4",
            Algorithm::Zstd => "zstd",
            Algorithm::Deflate => "deflate",
            Algorithm::DeflateIaa(_) => "deflate-iaa",
        }
    }

    /// The levels this algorithm accepts, or `None` when it has no levels.
    pub fn levels(self) -> Option<std::ops::RangeInclusive<i32>> {
        match self {
            Algorithm::Lz4 => None,
            Algorithm::Zstd => Some(1..=22),
            Algorithm::Deflate => Some(1..=12),
            Algorithm::DeflateIaa(_) => None,
        }
    }

    /// The level used when none is given.
    pub fn default_level(self) -> Option<i32> {
        match self {
            Algorithm::Lz4 => None,
            Algorithm::Zstd => Some(1),
            Algorithm::Deflate => Some(1),
            Algorithm::DeflateIaa(_) => None,
        }
    }

    /// The same algorithm with `options` when it is `deflate-iaa`; `None` for the others,
    /// which take no IAA options.
    pub fn with_iaa(self, options: IaaOptions) -> Option<Algorithm> {
        match self {
            Algorithm::DeflateIaa(_) => Some(Algorithm::DeflateIaa(options)),
            Algorithm::Lz4 | Algorithm::Zstd | Algorithm::Deflate => None,
        }
    }

    /// Checks `level` against this algorithm and returns the level to use (the default when
    /// `None`), without building a codec.
    pub fn check_level(self, level: Option<i32>) -> Result<Option<i32>, UnknownCodec> {
        Ok(match (self.levels(), level) {
            (None, None) => None,
            (None, Some(level)) => {
                return Err(UnknownCodec::NoLevels {
                    algorithm: self.name(),
                    level,
                })
            }
            (Some(range), Some(level)) if !range.contains(&level) => {
                return Err(UnknownCodec::BadLevel {
                    algorithm: self.name(),
                    level,
                    min: *range.start(),
                    max: *range.end(),
                })
            }
            (Some(_), level) => level.or(self.default_level()),
        })
    }

    /// Builds a codec for this algorithm at `level` (the default when `None`).
    pub fn codec(self, level: Option<i32>) -> Result<Box<dyn Codec>, UnknownCodec> {
        let level = self.check_level(level)?;
        Ok(match self {
            Algorithm::Lz4 => Box::new(Lz4),
            Algorithm::Zstd => Box::new(Zstd::new(level.unwrap_or(1))),
            Algorithm::Deflate => Box::new(Deflate::new(level.unwrap_or(1))),
            Algorithm::DeflateIaa(options) => Box::new(DeflateIaa::open(options)?),
        })
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A codec name or level that does not exist.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UnknownCodec {
    /// The name is not one of [`Algorithm::ALL`].
    #[error("unknown compression algorithm '{0}'; choose one of lz4, zstd, deflate, deflate-iaa")]
    Name(String),
    /// A level was given for an algorithm that has none.
    #[error("{algorithm} takes no level, but level {level} was given")]
    NoLevels {
        /// The algorithm.
        algorithm: &'static str,
        /// The level given.
        level: i32,
    },
    /// The level is outside the algorithm's range.
    #[error("{algorithm} level {level} is out of range {min}..={max}")]
    BadLevel {
        /// The algorithm.
        algorithm: &'static str,
        /// The level given.
        level: i32,
        /// The lowest level.
        min: i32,
        /// The highest level.
        max: i32,
    },
    /// The algorithm cannot run here (`deflate-iaa` with `--iaa hardware` and no device).
    #[error("{0}")]
    Unavailable(String),
}

impl FromStr for Algorithm {
    type Err = UnknownCodec;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Algorithm::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| UnknownCodec::Name(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pagegen::{PageGen, PageKind};

    fn roundtrip(codec: &dyn Codec) {
        let mut gen = PageGen::new(7);
        let mut dst = vec![0u8; PAGE_SIZE];
        let mut out = [0u8; PAGE_SIZE];
        for _ in 0..500 {
            let (kind, page) = gen.next_page();
            match codec.compress(&page, &mut dst) {
                Ok(n) => {
                    assert!(n <= dst.len());
                    codec.decompress(&dst[..n], &mut out).unwrap();
                    assert_eq!(
                        out[..],
                        page[..],
                        "{:?} roundtrip of {kind:?}",
                        codec.algorithm()
                    );
                }
                Err(CodecError::Incompressible { .. }) => {
                    assert_eq!(kind, PageKind::Random, "only random pages should fail")
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn every_codec_roundtrips_swap_like_pages() {
        for alg in Algorithm::ALL {
            roundtrip(&*alg.codec(None).unwrap());
        }
        roundtrip(&*Algorithm::Zstd.codec(Some(9)).unwrap());
        roundtrip(&*Algorithm::Deflate.codec(Some(6)).unwrap());
        roundtrip(
            &*Algorithm::DeflateIaa(IaaOptions {
                backend: IaaBackend::Software,
                mode: IaaMode::Dynamic,
            })
            .codec(None)
            .unwrap(),
        );
    }

    #[test]
    fn small_destination_reports_incompressible() {
        let mut gen = PageGen::new(1);
        let page = gen.page_of(PageKind::Text);
        for alg in Algorithm::ALL {
            let codec = alg.codec(None).unwrap();
            let mut dst = [0u8; 16];
            assert_eq!(
                codec.compress(&page, &mut dst),
                Err(CodecError::Incompressible { limit: 16 }),
                "{alg}"
            );
        }
    }

    #[test]
    fn corrupt_input_is_an_error_not_a_panic() {
        let mut out = [0u8; PAGE_SIZE];
        for alg in Algorithm::ALL {
            let codec = alg.codec(None).unwrap();
            for junk in [
                &b""[..],
                &b"\xff\xff\xff\xff\x00\x01"[..],
                &[0x1fu8; 64][..],
            ] {
                assert!(
                    codec.decompress(junk, &mut out).is_err(),
                    "{alg} accepted junk"
                );
            }
        }
    }

    /// Every codec this build has, with the levels and modes worth holding apart.
    fn every_codec() -> Vec<Box<dyn Codec>> {
        let mut codecs: Vec<Box<dyn Codec>> = Algorithm::ALL
            .into_iter()
            .map(|alg| alg.codec(None).unwrap())
            .collect();
        codecs.push(Algorithm::Zstd.codec(Some(9)).unwrap());
        codecs.push(Algorithm::Deflate.codec(Some(6)).unwrap());
        codecs.push(
            Algorithm::DeflateIaa(IaaOptions {
                backend: IaaBackend::Software,
                mode: IaaMode::Dynamic,
            })
            .codec(None)
            .unwrap(),
        );
        codecs
    }

    /// `count` units of `pages` swap-like pages each.
    fn units(seed: u64, pages: usize, count: usize) -> Vec<Vec<u8>> {
        let mut gen = PageGen::new(seed);
        (0..count)
            .map(|_| {
                (0..pages)
                    .flat_map(|_| gen.next_page().1.into_iter())
                    .collect()
            })
            .collect()
    }

    /// A unit of `pages` pages of random bytes.
    fn random_unit(pages: usize) -> Vec<u8> {
        let mut gen = PageGen::new(pages as u64);
        (0..pages)
            .flat_map(|_| gen.page_of(PageKind::Random).into_iter())
            .collect()
    }

    /// A byte the decoders never write in these tests' checks: what is left of it in a
    /// destination shows where a partial decode stopped.
    const POISON: u8 = 0xa5;

    #[test]
    fn every_codec_roundtrips_units_of_swap_like_pages() {
        let mut dst = vec![0u8; UNIT_COMPRESS_BUFFER];
        for codec in every_codec() {
            for pages in [2, 4, 8, 16] {
                for unit in units(pages as u64, pages, 8) {
                    let n = codec.compress_unit(&unit, &mut dst).unwrap();
                    let mut out = vec![POISON; unit.len()];
                    assert_eq!(
                        codec.decompress_unit(&dst[..n], &mut out, unit.len()),
                        Ok(unit.len()),
                        "{:?}, {pages} pages",
                        codec.algorithm()
                    );
                    assert!(out == unit, "{:?}, {pages} pages", codec.algorithm());
                }
            }
        }
    }

    #[test]
    fn a_partial_decode_at_every_page_equals_the_full_decode_prefix() {
        let mut dst = vec![0u8; UNIT_COMPRESS_BUFFER];
        for codec in every_codec() {
            for pages in [2, 4, 8, 16] {
                for unit in units(100 + pages as u64, pages, 4) {
                    let n = codec.compress_unit(&unit, &mut dst).unwrap();
                    for page in 1..=pages {
                        let needed = page * PAGE_SIZE;
                        let mut out = vec![POISON; unit.len()];
                        let decoded = codec.decompress_unit(&dst[..n], &mut out, needed).unwrap();
                        assert!(
                            (needed..=unit.len()).contains(&decoded),
                            "{:?}: {decoded} decoded for {needed} needed",
                            codec.algorithm()
                        );
                        assert!(
                            out[..decoded] == unit[..decoded],
                            "{:?}, {pages} pages, {needed} needed",
                            codec.algorithm()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_unit_bound_covers_every_software_codecs_worst_case() {
        for pages in 2..=MAX_UNIT_PAGES {
            let bytes = pages * PAGE_SIZE;
            let bound = unit_compress_bound(pages);
            assert!(bound >= bytes + bytes / 255 + 16, "liblz4");
            assert!(bound >= lz4_flex::block::get_maximum_output_size(bytes));
            assert!(bound >= ::zstd::zstd_safe::compress_bound(bytes), "zstd");
            let mut deflate = libdeflater::Compressor::new(libdeflater::CompressionLvl::best());
            assert!(bound >= deflate.deflate_compress_bound(bytes), "libdeflate");
        }
        // And random bytes, the worst input, fit in it.
        for codec in every_codec() {
            for pages in [2, 16] {
                let unit = random_unit(pages);
                let mut dst = vec![0u8; unit_compress_bound(pages)];
                let n = codec.compress_unit(&unit, &mut dst).unwrap();
                let mut out = vec![0u8; unit.len()];
                codec
                    .decompress_unit(&dst[..n], &mut out, unit.len())
                    .unwrap();
                assert!(out == unit, "{:?}", codec.algorithm());
            }
        }
        assert_eq!(UNIT_COMPRESS_BUFFER, unit_compress_bound(MAX_UNIT_PAGES));
    }

    #[test]
    fn a_random_unit_into_a_small_buffer_is_incompressible() {
        for codec in every_codec() {
            for pages in [2, 16] {
                let unit = random_unit(pages);
                let mut dst = vec![0u8; unit.len() / 2];
                assert_eq!(
                    codec.compress_unit(&unit, &mut dst),
                    Err(CodecError::Incompressible { limit: dst.len() }),
                    "{:?}",
                    codec.algorithm()
                );
            }
        }
    }

    #[test]
    fn corrupt_or_truncated_units_are_errors_not_panics() {
        let mut dst = vec![0u8; UNIT_COMPRESS_BUFFER];
        for codec in every_codec() {
            let name = codec.algorithm();
            let mut out = vec![0u8; 4 * PAGE_SIZE];
            for junk in [
                &b""[..],
                &b"\xff\xff\xff\xff\x00\x01"[..],
                &[0x1fu8; 64][..],
            ] {
                for needed in [PAGE_SIZE, out.len()] {
                    assert!(
                        codec.decompress_unit(junk, &mut out, needed).is_err(),
                        "{name:?} accepted junk for {needed} bytes"
                    );
                }
            }
            for unit in units(5, 4, 8) {
                let n = codec.compress_unit(&unit, &mut dst).unwrap();
                // Cut short: a full decode fails; a partial one fails or gives the true prefix
                // (what it needs may all be before the cut).
                for cut in [0, 1, n / 2, n - 1] {
                    let src = &dst[..cut];
                    assert!(
                        codec.decompress_unit(src, &mut out, unit.len()).is_err(),
                        "{name:?}: a unit cut to {cut} of {n} decoded"
                    );
                    for page in 1..4 {
                        if let Ok(decoded) = codec.decompress_unit(src, &mut out, page * PAGE_SIZE)
                        {
                            assert!(out[..decoded] == unit[..decoded], "{name:?}");
                        }
                    }
                }
                // Bytes flipped: no panic, and a full decode that succeeds has the unit's length.
                let mut flipped = dst[..n].to_vec();
                for at in (0..n).step_by(7) {
                    flipped[at] ^= 0x5a;
                    for needed in [PAGE_SIZE, unit.len()] {
                        if let Ok(decoded) = codec.decompress_unit(&flipped, &mut out, needed) {
                            assert!((needed..=unit.len()).contains(&decoded), "{name:?}");
                        }
                    }
                    flipped[at] ^= 0x5a;
                }
                // A destination a page too small or too large is refused by a full decode.
                for len in [unit.len() - PAGE_SIZE, unit.len() + PAGE_SIZE] {
                    let mut wrong = vec![0u8; len];
                    assert!(
                        codec.decompress_unit(&dst[..n], &mut wrong, len).is_err(),
                        "{name:?}: a {}-byte unit decoded into {len} bytes",
                        unit.len()
                    );
                }
            }
        }
    }

    #[test]
    fn names_and_levels_are_checked() {
        assert_eq!("zstd".parse::<Algorithm>(), Ok(Algorithm::Zstd));
        assert!(matches!(
            "lzo".parse::<Algorithm>(),
            Err(UnknownCodec::Name(_))
        ));
        assert!(Algorithm::Lz4.codec(Some(3)).is_err());
        assert!(Algorithm::Zstd.codec(Some(23)).is_err());
        assert!(Algorithm::Deflate.codec(Some(0)).is_err());
        let batch_codec = Algorithm::Lz4.codec(None).unwrap();
        let page = PageGen::new(3).page_of(PageKind::Text);
        let pages: [&[u8; PAGE_SIZE]; 2] = [&page, &page];
        let mut a = vec![0u8; PAGE_SIZE];
        let mut b = vec![0u8; 8];
        let mut dsts: [&mut [u8]; 2] = [&mut a, &mut b];
        let mut results = [Ok(0), Ok(0)];
        batch_codec.compress_batch(&pages, &mut dsts, &mut results);
        assert!(matches!(results[0], Ok(n) if n > 0));
        assert_eq!(results[1], Err(CodecError::Incompressible { limit: 8 }));
    }
}
