// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Page codecs: one small trait that every compressor implements.
//!
//! A codec turns one 4 KiB page into a compressed object and back. The store calls it on the
//! request thread (or, later, on compression workers), so implementations keep their heavy state
//! (zstd contexts, libdeflate compressors) per thread, the way zram keeps one stream per CPU.
//!
//! The batch call exists for accelerators (Intel IAA compresses up to 8 pages in one submission);
//! the software codecs loop, `deflate-iaa` submits the batch whole.

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

/// Errors a codec reports.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    /// The compressed form would not fit in the destination buffer: store the page raw.
    #[error("the page does not compress into {limit} bytes")]
    Incompressible {
        /// The size of the destination buffer that was too small.
        limit: usize,
    },
    /// The compressed object is corrupt or does not decode to exactly one page.
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
