// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Raw DEFLATE (RFC 1951) through libdeflate: the format an Intel IAA accelerator produces, so
//! pages compressed here and pages compressed by the accelerator decode alike.

use std::cell::RefCell;

use libdeflater::{CompressionLvl, Compressor, Decompressor};

use super::{debug_check_unit, debug_check_unit_decode, full_unit, Algorithm, Codec, CodecError};
use crate::PAGE_SIZE;

/// The raw DEFLATE codec at one level.
#[derive(Debug, Clone, Copy)]
pub struct Deflate {
    level: i32,
}

struct Contexts {
    level: i32,
    compressor: Compressor,
    decompressor: Decompressor,
}

thread_local! {
    static CONTEXTS: RefCell<Option<Contexts>> = const { RefCell::new(None) };
}

impl Deflate {
    /// A deflate codec at `level` (1..=12, libdeflate's range).
    pub fn new(level: i32) -> Self {
        Deflate { level }
    }

    fn with_contexts<R>(&self, f: impl FnOnce(&mut Contexts) -> R) -> R {
        CONTEXTS.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.as_ref().is_none_or(|c| c.level != self.level) {
                let lvl = CompressionLvl::new(self.level).unwrap_or_default();
                *slot = Some(Contexts {
                    level: self.level,
                    compressor: Compressor::new(lvl),
                    decompressor: Decompressor::new(),
                });
            }
            match slot.as_mut() {
                Some(contexts) => f(contexts),
                None => unreachable!("contexts were just created"),
            }
        })
    }
}

impl Codec for Deflate {
    fn algorithm(&self) -> Algorithm {
        Algorithm::Deflate
    }

    fn compress(&self, page: &[u8; PAGE_SIZE], dst: &mut [u8]) -> Result<usize, CodecError> {
        self.with_contexts(|c| c.compressor.deflate_compress(page, dst))
            .map_err(|_| CodecError::Incompressible { limit: dst.len() })
    }

    fn decompress(&self, src: &[u8], page: &mut [u8; PAGE_SIZE]) -> Result<(), CodecError> {
        match self.with_contexts(|c| c.decompressor.deflate_decompress(src, &mut page[..])) {
            Ok(PAGE_SIZE) => Ok(()),
            Ok(n) => Err(CodecError::Corrupt(format!(
                "deflate decoded {n} bytes, not a page"
            ))),
            Err(e) => Err(CodecError::Corrupt(e.to_string())),
        }
    }

    fn compress_unit(&self, src: &[u8], dst: &mut [u8]) -> Result<usize, CodecError> {
        debug_check_unit(src);
        self.with_contexts(|c| c.compressor.deflate_compress(src, dst))
            .map_err(|_| CodecError::Incompressible { limit: dst.len() })
    }

    /// Always decodes the whole unit: libdeflate decodes a buffer whole, it cannot stop early.
    fn decompress_unit(
        &self,
        src: &[u8],
        dst: &mut [u8],
        needed: usize,
    ) -> Result<usize, CodecError> {
        debug_check_unit_decode(dst, needed);
        match self.with_contexts(|c| c.decompressor.deflate_decompress(src, dst)) {
            Ok(n) => full_unit("deflate", n, dst.len()),
            Err(e) => Err(CodecError::Corrupt(e.to_string())),
        }
    }
}
