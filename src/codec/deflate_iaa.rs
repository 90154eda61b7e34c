// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `deflate-iaa`: raw DEFLATE through an Intel IAA work queue (the [`iaa`] crate), in batches
//! of up to 8 pages, or through its software work queue when there is no device.
//!
//! Pages compressed here are plain raw DEFLATE with a 4 KiB history: the software inflater
//! reads them back whether or not the device is there, and the device reads back pages the
//! software fallback compressed, so a store never depends on the accelerator being present.
//!
//! Units (see `codec`) are compressed and decoded in software, by libdeflate (the plain
//! [`Deflate`] codec at [`UNIT_LEVEL`]): the accelerator's page path works on single 4 KiB pages
//! with a 4 KiB history, and a unit needs its own 64 KiB history. A unit is the same raw
//! DEFLATE either way, so the accelerator could decode one and libdeflate decodes what the
//! accelerator makes; the page path is unchanged.

use std::fmt;
use std::str::FromStr;

use iaa::{Backend, Engine, HuffmanMode};

use super::{Algorithm, Codec, CodecError, Deflate, UnknownCodec, MAX_BATCH};
use crate::blk::request::ErrorChain;
use crate::PAGE_SIZE;

/// Where `deflate-iaa` does its work (`--iaa`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IaaBackend {
    /// The accelerator when a usable work queue exists, else the software queue.
    Auto,
    /// The accelerator only: refuse to start without a usable work queue.
    Hardware,
    /// The software work queue only.
    Software,
}

/// The Huffman coding `deflate-iaa` asks for (`--iaa-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IaaMode {
    /// The RFC 1951 fixed code: every IAA generation.
    Fixed,
    /// Per-page dynamic Huffman tables: IAA generation 2, better ratio.
    Dynamic,
}

/// The options of `deflate-iaa`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct IaaOptions {
    /// Where the work is done.
    pub backend: IaaBackend,
    /// The Huffman mode.
    pub mode: IaaMode,
}

impl IaaOptions {
    /// `auto`, `fixed`.
    pub const DEFAULT: IaaOptions = IaaOptions {
        backend: IaaBackend::Auto,
        mode: IaaMode::Fixed,
    };
}

impl Default for IaaOptions {
    fn default() -> Self {
        IaaOptions::DEFAULT
    }
}

impl IaaBackend {
    fn iaa(self) -> Backend {
        match self {
            IaaBackend::Auto => Backend::Auto,
            IaaBackend::Hardware => Backend::Hardware,
            IaaBackend::Software => Backend::Software,
        }
    }
}

impl IaaMode {
    fn iaa(self) -> HuffmanMode {
        match self {
            IaaMode::Fixed => HuffmanMode::Fixed,
            IaaMode::Dynamic => HuffmanMode::Dynamic,
        }
    }
}

impl FromStr for IaaBackend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(IaaBackend::Auto),
            "hardware" => Ok(IaaBackend::Hardware),
            "software" => Ok(IaaBackend::Software),
            _ => Err(format!(
                "unknown IAA backend '{s}'; choose one of auto, hardware, software"
            )),
        }
    }
}

impl FromStr for IaaMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fixed" => Ok(IaaMode::Fixed),
            "dynamic" => Ok(IaaMode::Dynamic),
            _ => Err(format!(
                "unknown IAA Huffman mode '{s}'; choose fixed or dynamic"
            )),
        }
    }
}

/// The libdeflate level `deflate-iaa` compresses units at: the fastest, closest to the
/// accelerator's speed and ratio.
const UNIT_LEVEL: i32 = 1;

/// The `deflate-iaa` codec: one engine (one work queue), shared by every thread.
pub struct DeflateIaa {
    engine: Engine,
    options: IaaOptions,
    hardware: bool,
}

impl fmt::Debug for DeflateIaa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeflateIaa")
            .field("queue", &self.engine.describe())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl DeflateIaa {
    /// Opens the work queue `options` asks for: see [`iaa::open`].
    pub fn open(options: IaaOptions) -> Result<DeflateIaa, UnknownCodec> {
        let opened = iaa::open(options.backend.iaa(), options.mode.iaa())
            .map_err(|error| UnknownCodec::Unavailable(ErrorChain(&error).to_string()))?;
        if let Some(why) = &opened.fallback {
            log::warn!(
                "{why}; deflate-iaa compresses on its software work queue instead (the same \
                 format; --iaa hardware would refuse to start)"
            );
        }
        Ok(DeflateIaa {
            engine: opened.engine,
            options,
            hardware: opened.hardware,
        })
    }

    /// Whether the codec drives the accelerator (rather than the software queue).
    pub fn uses_hardware(&self) -> bool {
        self.hardware
    }

    /// The engine's counters (device work, fallbacks, timeouts).
    pub fn stats(&self) -> iaa::EngineStats {
        self.engine.stats()
    }
}

impl Codec for DeflateIaa {
    fn algorithm(&self) -> Algorithm {
        Algorithm::DeflateIaa(self.options)
    }

    fn compress(&self, page: &[u8; PAGE_SIZE], dst: &mut [u8]) -> Result<usize, CodecError> {
        let mut result = [Ok(0)];
        self.engine.compress_batch(&[page], &mut [dst], &mut result);
        result[0].map_err(|e| CodecError::Incompressible { limit: e.limit })
    }

    fn decompress(&self, src: &[u8], page: &mut [u8; PAGE_SIZE]) -> Result<(), CodecError> {
        self.engine
            .decompress(src, page)
            .map_err(|e| CodecError::Corrupt(e.to_string()))
    }

    fn compress_batch(
        &self,
        pages: &[&[u8; PAGE_SIZE]],
        dsts: &mut [&mut [u8]],
        results: &mut [Result<usize, CodecError>],
    ) {
        let n = pages.len().min(dsts.len()).min(results.len());
        let mut start = 0;
        while start < n {
            let end = (start + MAX_BATCH).min(n);
            let mut batch = [Ok(0); MAX_BATCH];
            let batch = &mut batch[..end - start];
            self.engine
                .compress_batch(&pages[start..end], &mut dsts[start..end], batch);
            for (result, outcome) in results[start..end].iter_mut().zip(batch.iter()) {
                *result = outcome.map_err(|e| CodecError::Incompressible { limit: e.limit });
            }
            start = end;
        }
    }

    /// In software, through libdeflate: see the module's comment.
    fn compress_unit(&self, src: &[u8], dst: &mut [u8]) -> Result<usize, CodecError> {
        Deflate::new(UNIT_LEVEL).compress_unit(src, dst)
    }

    /// In software, through libdeflate, always whole: see the module's comment.
    fn decompress_unit(
        &self,
        src: &[u8],
        dst: &mut [u8],
        needed: usize,
    ) -> Result<usize, CodecError> {
        Deflate::new(UNIT_LEVEL).decompress_unit(src, dst, needed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pagegen::{PageGen, PageKind};

    fn software(mode: IaaMode) -> DeflateIaa {
        DeflateIaa::open(IaaOptions {
            backend: IaaBackend::Software,
            mode,
        })
        .unwrap()
    }

    #[test]
    fn a_batch_of_swap_pages_round_trips_and_reads_back_with_plain_deflate() {
        for mode in [IaaMode::Fixed, IaaMode::Dynamic] {
            let codec = software(mode);
            assert!(!codec.uses_hardware());
            let mut gen = PageGen::new(11);
            let pages: Vec<(Box<[u8; PAGE_SIZE]>, PageKind)> = (0..8)
                .map(|_| {
                    let (kind, page) = gen.next_page();
                    (page, kind)
                })
                .collect();
            let page_refs: Vec<&[u8; PAGE_SIZE]> = pages.iter().map(|(p, _)| &**p).collect();
            let mut buffers = vec![vec![0u8; 2 * PAGE_SIZE]; 8];
            let mut dsts: Vec<&mut [u8]> = buffers.iter_mut().map(|b| &mut b[..]).collect();
            let mut results: Vec<Result<usize, CodecError>> = (0..8).map(|_| Ok(0)).collect();
            codec.compress_batch(&page_refs, &mut dsts, &mut results);
            // The plain libdeflate codec reads every page back: the format is just DEFLATE.
            let plain = super::super::Deflate::new(1);
            for (i, result) in results.iter().enumerate() {
                let n = *result.as_ref().unwrap();
                let mut out = [0u8; PAGE_SIZE];
                plain.decompress(&buffers[i][..n], &mut out).unwrap();
                assert_eq!(out, *pages[i].0, "{mode:?} page {i} ({:?})", pages[i].1);
            }
            assert_eq!(codec.stats().device_compressed, 8);
            assert_eq!(
                codec.algorithm(),
                Algorithm::DeflateIaa(IaaOptions {
                    backend: IaaBackend::Software,
                    mode
                })
            );
        }
    }

    #[test]
    fn pages_from_the_plain_deflate_codec_decode_here() {
        let codec = software(IaaMode::Fixed);
        let plain = super::super::Deflate::new(9);
        let page = PageGen::new(5).page_of(PageKind::Text);
        let mut dst = vec![0u8; 2 * PAGE_SIZE];
        let n = plain.compress(&page, &mut dst).unwrap();
        let mut out = [0u8; PAGE_SIZE];
        codec.decompress(&dst[..n], &mut out).unwrap();
        assert_eq!(out, *page);
    }

    #[test]
    fn option_names_parse() {
        assert_eq!("software".parse(), Ok(IaaBackend::Software));
        assert_eq!("dynamic".parse(), Ok(IaaMode::Dynamic));
        assert!("gpu"
            .parse::<IaaBackend>()
            .unwrap_err()
            .contains("auto, hardware, software"));
        assert!("static".parse::<IaaMode>().is_err());
    }

    #[test]
    fn units_are_plain_deflate_both_ways() {
        let codec = software(IaaMode::Dynamic);
        let plain = super::super::Deflate::new(6);
        let mut gen = PageGen::new(21);
        let unit: Vec<u8> = (0..8).flat_map(|_| gen.next_page().1.into_iter()).collect();
        let mut dst = vec![0u8; crate::codec::UNIT_COMPRESS_BUFFER];
        let mut out = vec![0u8; unit.len()];
        for (writer, reader) in [
            (&codec as &dyn Codec, &plain as &dyn Codec),
            (&plain, &codec),
        ] {
            let n = writer.compress_unit(&unit, &mut dst).unwrap();
            out.fill(0);
            assert_eq!(
                reader.decompress_unit(&dst[..n], &mut out, PAGE_SIZE),
                Ok(unit.len())
            );
            assert!(out == unit);
        }
        // Units never reach the work queue.
        assert_eq!(codec.stats().device_compressed, 0);
    }
}
