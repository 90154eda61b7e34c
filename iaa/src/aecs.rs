// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The compress AECS (Analytics Engine Configuration and State): the 1568-byte record a
//! compress descriptor names as its second source, holding the Huffman tables the device
//! encodes with and the bits it starts the output with.
//!
//! Layout: `struct aecs_comp_table_record` in Linux `drivers/crypto/intel/iaa/iaa_crypto.h`.
//! Table entries are `(code_length << 15) | code`, the canonical code as RFC 1951 §3.2.2
//! assigns it (most significant bit first, not bit-reversed); iaa_crypto's fixed mode fills
//! them with the RFC 1951 §3.2.6 fixed code and starts the output with the 3-bit header of one
//! final fixed-Huffman block (`iaa_crypto_main.c`, `init_fixed_mode`).

use std::mem::{align_of, offset_of, size_of};

/// Literal/length symbols in the table (0–285; 286 and 287 never occur).
pub const LITERAL_LENGTH_SYMBOLS: usize = 286;
/// Distance symbols in the table (0–29).
pub const DISTANCE_SYMBOLS: usize = 30;
/// The size of the compress AECS in bytes, as the descriptor's src2 size.
pub const COMPRESS_AECS_SIZE: usize = 1568;

/// The compress AECS (`struct aecs_comp_table_record`), 32-byte aligned as the device requires.
#[derive(Clone, PartialEq, Eq)]
#[repr(C, align(32))]
pub struct CompressAecs {
    /// Running CRC (0 to start a stream).
    pub crc: u32,
    /// Running XOR checksum (0 to start a stream).
    pub xor_checksum: u32,
    /// Reserved.
    pub reserved0: [u32; 5],
    /// How many bits of `output_accumulator` the output starts with.
    pub output_accumulator_bits: u32,
    /// Bits written before the first symbol (least significant bit first).
    pub output_accumulator: [u8; 256],
    /// Literal/length code: `(length << 15) | code` per symbol.
    pub literal_length: [u32; LITERAL_LENGTH_SYMBOLS],
    /// Reserved.
    pub reserved1: [u32; 2],
    /// Distance code: `(length << 15) | code` per symbol.
    pub distance: [u32; DISTANCE_SYMBOLS],
    /// Padding to a multiple of 32 bytes.
    pub padding: [u32; 2],
}

const _: () = {
    assert!(size_of::<CompressAecs>() == COMPRESS_AECS_SIZE);
    assert!(COMPRESS_AECS_SIZE.is_multiple_of(32));
    assert!(align_of::<CompressAecs>() == crate::hw::AECS_ALIGN);
    assert!(offset_of!(CompressAecs, crc) == 0);
    assert!(offset_of!(CompressAecs, xor_checksum) == 4);
    assert!(offset_of!(CompressAecs, reserved0) == 8);
    assert!(offset_of!(CompressAecs, output_accumulator_bits) == 28);
    assert!(offset_of!(CompressAecs, output_accumulator) == 32);
    assert!(offset_of!(CompressAecs, literal_length) == 288);
    assert!(offset_of!(CompressAecs, reserved1) == 1432);
    assert!(offset_of!(CompressAecs, distance) == 1440);
    assert!(offset_of!(CompressAecs, padding) == 1560);
};

impl std::fmt::Debug for CompressAecs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompressAecs")
            .field("crc", &self.crc)
            .field("output_accumulator_bits", &self.output_accumulator_bits)
            .finish_non_exhaustive()
    }
}

/// One table entry: a code of `length` bits with value `code` (most significant bit first).
pub const fn table_entry(length: u32, code: u32) -> u32 {
    (length << 15) | code
}

/// The code length and code of a table entry.
pub const fn split_entry(entry: u32) -> (u32, u32) {
    (entry >> 15, entry & 0x7fff)
}

/// The RFC 1951 §3.2.6 fixed literal/length code length of `symbol`.
const fn fixed_literal_length_bits(symbol: usize) -> u32 {
    match symbol {
        0..=143 => 8,
        144..=255 => 9,
        256..=279 => 7,
        _ => 8,
    }
}

/// Canonical codes for `lengths` (RFC 1951 §3.2.2), as table entries.
fn canonical_entries<const N: usize>(lengths: &[u32; N]) -> [u32; N] {
    let mut count = [0u32; 16];
    for &len in lengths {
        count[len as usize] += 1;
    }
    count[0] = 0;
    let mut next = [0u32; 16];
    let mut code = 0u32;
    for bits in 1..16 {
        code = (code + count[bits - 1]) << 1;
        next[bits] = code;
    }
    let mut entries = [0u32; N];
    for (symbol, &len) in lengths.iter().enumerate() {
        if len != 0 {
            entries[symbol] = table_entry(len, next[len as usize]);
            next[len as usize] += 1;
        }
    }
    entries
}

impl CompressAecs {
    /// The AECS iaa_crypto's fixed mode uses: zeroed, the RFC 1951 fixed tables, CRC and XOR
    /// checksum 0, and the output starting with the 3 bits of a final fixed-Huffman block
    /// header (BFINAL = 1, BTYPE = 01, least significant bit first: 0b011).
    pub fn fixed() -> Box<CompressAecs> {
        // The fixed literal/length code covers 288 symbols; the table holds the first 286,
        // and the canonical codes are computed over all 288 so that 280–285 get theirs.
        let mut lengths = [0u32; 288];
        for (symbol, len) in lengths.iter_mut().enumerate() {
            *len = fixed_literal_length_bits(symbol);
        }
        let all = canonical_entries(&lengths);
        let mut literal_length = [0u32; LITERAL_LENGTH_SYMBOLS];
        literal_length.copy_from_slice(&all[..LITERAL_LENGTH_SYMBOLS]);
        let distance = canonical_entries(&[5u32; DISTANCE_SYMBOLS]);
        let mut output_accumulator = [0u8; 256];
        output_accumulator[0] = 0b011;
        Box::new(CompressAecs {
            crc: 0,
            xor_checksum: 0,
            reserved0: [0; 5],
            output_accumulator_bits: 3,
            output_accumulator,
            literal_length,
            reserved1: [0; 2],
            distance,
            padding: [0; 2],
        })
    }

    /// One fixed-mode AECS for the whole process, never freed: the device only reads it, so
    /// every engine shares it (iaa_crypto keeps one per device and mode), and a device that
    /// stopped answering can never be left holding a freed one.
    pub fn fixed_shared() -> &'static CompressAecs {
        static FIXED: std::sync::OnceLock<Box<CompressAecs>> = std::sync::OnceLock::new();
        FIXED.get_or_init(CompressAecs::fixed)
    }

    /// The 1568 bytes the device reads, little-endian.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(COMPRESS_AECS_SIZE);
        out.extend_from_slice(&self.crc.to_le_bytes());
        out.extend_from_slice(&self.xor_checksum.to_le_bytes());
        for word in self.reserved0 {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out.extend_from_slice(&self.output_accumulator_bits.to_le_bytes());
        out.extend_from_slice(&self.output_accumulator);
        for word in self
            .literal_length
            .iter()
            .chain(&self.reserved1)
            .chain(&self.distance)
            .chain(&self.padding)
        {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_tables_hold_the_values_worked_out_from_rfc_1951() {
        let aecs = CompressAecs::fixed();
        // Literal 0: 8 bits, code 0b0011_0000.
        assert_eq!(aecs.literal_length[0], 0x40030);
        // Literal 143: 8 bits, code 0b1011_1111.
        assert_eq!(aecs.literal_length[143], 0x400bf);
        // Literal 144: 9 bits, code 0b1_1001_0000.
        assert_eq!(aecs.literal_length[144], 0x48190);
        // Literal 255: 9 bits, code 0b1_1111_1111.
        assert_eq!(aecs.literal_length[255], 0x481ff);
        // End of block: 7 bits, code 0.
        assert_eq!(aecs.literal_length[256], 0x38000);
        // Length symbol 279: 7 bits, code 0b001_0111.
        assert_eq!(aecs.literal_length[279], 0x38017);
        // Length symbol 280: 8 bits, code 0b1100_0000.
        assert_eq!(aecs.literal_length[280], 0x400c0);
        // Length symbol 285: 8 bits, code 0b1100_0101.
        assert_eq!(aecs.literal_length[285], 0x400c5);
        // Distance 0: 5 bits, code 0; distance 29: code 29.
        assert_eq!(aecs.distance[0], 0x28000);
        assert_eq!(aecs.distance[29], 0x2801d);
        assert_eq!(aecs.output_accumulator_bits, 3);
        assert_eq!(aecs.output_accumulator[0], 0x03);
    }

    #[test]
    fn fixed_aecs_serialises_byte_exact() {
        let aecs = CompressAecs::fixed();
        let bytes = aecs.to_bytes();
        assert_eq!(bytes.len(), COMPRESS_AECS_SIZE);
        assert_eq!(&bytes[0..28], &[0u8; 28]);
        assert_eq!(&bytes[28..32], &[3, 0, 0, 0]);
        assert_eq!(bytes[32], 0x03);
        assert!(bytes[33..288].iter().all(|&b| b == 0));
        // Literal 0 at byte 288, literal 144 at 288 + 4 * 144, end of block at 288 + 1024.
        assert_eq!(&bytes[288..292], &[0x30, 0x00, 0x04, 0x00]);
        assert_eq!(&bytes[864..868], &[0x90, 0x81, 0x04, 0x00]);
        assert_eq!(&bytes[1312..1316], &[0x00, 0x80, 0x03, 0x00]);
        assert_eq!(&bytes[1432..1440], &[0u8; 8]);
        assert_eq!(&bytes[1440..1444], &[0x00, 0x80, 0x02, 0x00]);
        assert_eq!(&bytes[1560..1568], &[0u8; 8]);
        // The struct in memory is the same bytes.
        // SAFETY: `CompressAecs` is `repr(C)`, 1568 bytes, and has no padding (the offsets are
        // asserted above and sum to its size), so every byte is initialised.
        let raw = unsafe {
            std::slice::from_raw_parts(
                (&*aecs as *const CompressAecs).cast::<u8>(),
                COMPRESS_AECS_SIZE,
            )
        };
        assert_eq!(raw, &bytes[..]);
    }

    #[test]
    fn fixed_codes_form_a_complete_prefix_code() {
        // Kraft sum of the 288-symbol fixed code is exactly 1; of the 286 stored, just under.
        let aecs = CompressAecs::fixed();
        let kraft: f64 = aecs
            .literal_length
            .iter()
            .map(|&e| 0.5f64.powi(split_entry(e).0 as i32))
            .sum::<f64>()
            + 2.0 * 0.5f64.powi(8);
        assert!((kraft - 1.0).abs() < 1e-12);
    }
}
