// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! LZ4 block format through `lz4_flex`.

use super::{Algorithm, Codec, CodecError};
use crate::PAGE_SIZE;

/// The LZ4 codec. It is stateless: `lz4_flex` keeps its hash table on the stack.
#[derive(Debug, Default, Clone, Copy)]
pub struct Lz4;

impl Codec for Lz4 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::Lz4
    }

    fn compress(&self, page: &[u8; PAGE_SIZE], dst: &mut [u8]) -> Result<usize, CodecError> {
        // lz4_flex insists on a worst-case-sized output; compress through a stack buffer when
        // the caller's is smaller (the store passes a large enough one on its hot path).
        const WORST: usize = super::COMPRESS_BUFFER;
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

    fn decompress(&self, src: &[u8], page: &mut [u8; PAGE_SIZE]) -> Result<(), CodecError> {
        match lz4_flex::block::decompress_into(src, page) {
            Ok(PAGE_SIZE) => Ok(()),
            Ok(n) => Err(CodecError::Corrupt(format!(
                "lz4 decoded {n} bytes, not a page"
            ))),
            Err(e) => Err(CodecError::Corrupt(e.to_string())),
        }
    }
}
