// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Zstandard with a level; contexts are reused per thread, as zram reuses per-CPU streams.

use std::cell::RefCell;

use super::{Algorithm, Codec, CodecError};
use crate::PAGE_SIZE;

/// The zstd codec at one level.
#[derive(Debug, Clone, Copy)]
pub struct Zstd {
    level: i32,
}

struct Contexts {
    level: i32,
    compressor: zstd::bulk::Compressor<'static>,
    decompressor: zstd::bulk::Decompressor<'static>,
}

thread_local! {
    static CONTEXTS: RefCell<Option<Contexts>> = const { RefCell::new(None) };
}

impl Zstd {
    /// A zstd codec at `level` (1..=22).
    pub fn new(level: i32) -> Self {
        Zstd { level }
    }

    fn with_contexts<R>(&self, f: impl FnOnce(&mut Contexts) -> R) -> R {
        CONTEXTS.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.as_ref().is_none_or(|c| c.level != self.level) {
                // Creating a context only fails on allocation failure, which aborts anyway.
                #[allow(clippy::expect_used)]
                let contexts = Contexts {
                    level: self.level,
                    compressor: zstd::bulk::Compressor::new(self.level)
                        .expect("zstd compression context"),
                    decompressor: zstd::bulk::Decompressor::new()
                        .expect("zstd decompression context"),
                };
                *slot = Some(contexts);
            }
            match slot.as_mut() {
                Some(contexts) => f(contexts),
                None => unreachable!("contexts were just created"),
            }
        })
    }
}

impl Codec for Zstd {
    fn algorithm(&self) -> Algorithm {
        Algorithm::Zstd
    }

    fn compress(&self, page: &[u8; PAGE_SIZE], dst: &mut [u8]) -> Result<usize, CodecError> {
        self.with_contexts(|c| c.compressor.compress_to_buffer(page, dst))
            .map_err(|_| CodecError::Incompressible { limit: dst.len() })
    }

    fn decompress(&self, src: &[u8], page: &mut [u8; PAGE_SIZE]) -> Result<(), CodecError> {
        match self.with_contexts(|c| c.decompressor.decompress_to_buffer(src, &mut page[..])) {
            Ok(PAGE_SIZE) => Ok(()),
            Ok(n) => Err(CodecError::Corrupt(format!(
                "zstd decoded {n} bytes, not a page"
            ))),
            Err(e) => Err(CodecError::Corrupt(e.to_string())),
        }
    }
}
