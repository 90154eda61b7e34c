// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Raw DEFLATE (RFC 1951) in software, producing what the accelerator produces.
//!
//! - [`compress_with_aecs`] is the device's compress with an AECS: LZ77 over a 4 KiB history
//!   (the device's), then every symbol coded with the AECS's tables, starting from the AECS's
//!   output accumulator and ending with an end-of-block symbol and a flush, exactly as the
//!   compress descriptor asks (`APPEND_EOB | FLUSH_OUTPUT`). With [`CompressAecs::fixed`] the
//!   output is one final fixed-Huffman block: the stream the hardware writes in fixed mode.
//! - [`compress_dynamic`] stands in for generation 2's dynamic-Huffman mode: libdeflate's
//!   fastest level, a greedy hash matcher with per-page Huffman tables, the same class of
//!   encoder. One page's stream never reaches back more than 4 KiB, so the device decodes it.
//! - [`inflate_page`] decodes any valid raw DEFLATE stream (libdeflate): the software
//!   inflater iaa_crypto also falls back to.

use std::cell::RefCell;

use libdeflater::{CompressionLvl, Compressor, Decompressor};

use crate::aecs::{split_entry, CompressAecs};

/// The device's compression history: back-references reach at most this far.
pub const HISTORY: usize = 4096;

const MIN_MATCH: usize = 3;
const MAX_MATCH: usize = 258;
/// How many earlier positions the matcher tries per position.
const MAX_CHAIN: usize = 16;
/// A match this long ends the search.
const NICE_MATCH: usize = 64;
const HASH_BITS: u32 = 12;

const LENGTH_BASE: [u16; 29] = [
    3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131,
    163, 195, 227, 258,
];
const LENGTH_EXTRA: [u8; 29] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];
const DISTANCE_BASE: [u16; 30] = [
    1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537,
    2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
];
const DISTANCE_EXTRA: [u8; 30] = [
    0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13,
    13,
];
const END_OF_BLOCK: usize = 256;

/// The output did not fit the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the compressed stream does not fit in {limit} bytes")]
pub struct OutputOverflow {
    /// The destination's size.
    pub limit: usize,
}

/// A stream that does not decode to exactly the expected size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    /// Not valid DEFLATE, or more output than the destination holds.
    #[error("the stream is not valid raw DEFLATE or decodes to more than {limit} bytes")]
    Invalid {
        /// The destination's size.
        limit: usize,
    },
    /// Valid, but shorter than a page.
    #[error("the stream decodes to {got} bytes, not {expected}")]
    ShortOutput {
        /// Bytes decoded.
        got: usize,
        /// Bytes expected.
        expected: usize,
    },
}

/// An LSB-first bit writer into a fixed buffer.
struct BitWriter<'a> {
    dst: &'a mut [u8],
    len: usize,
    acc: u64,
    bits: u32,
}

impl<'a> BitWriter<'a> {
    fn new(dst: &'a mut [u8]) -> Self {
        BitWriter {
            dst,
            len: 0,
            acc: 0,
            bits: 0,
        }
    }

    /// Appends the low `count` bits of `value` (count ≤ 32).
    fn put(&mut self, value: u32, count: u32) -> Result<(), OutputOverflow> {
        self.acc |= u64::from(value & mask(count)) << self.bits;
        self.bits += count;
        while self.bits >= 8 {
            let limit = self.dst.len();
            let slot = self.dst.get_mut(self.len).ok_or(OutputOverflow { limit })?;
            *slot = self.acc.to_le_bytes()[0];
            self.len += 1;
            self.acc >>= 8;
            self.bits -= 8;
        }
        Ok(())
    }

    /// Appends a Huffman code from an AECS table entry (code stored most significant bit
    /// first, so it is reversed into the LSB-first stream, RFC 1951 §3.1.1).
    fn put_code(&mut self, entry: u32) -> Result<(), OutputOverflow> {
        let (length, code) = split_entry(entry);
        let reversed = code.reverse_bits() >> (32 - length);
        self.put(reversed, length)
    }

    /// Pads the last byte with zero bits and returns the stream's length.
    fn finish(mut self) -> Result<usize, OutputOverflow> {
        if self.bits > 0 {
            let pad = 8 - self.bits;
            self.put(0, pad)?;
        }
        Ok(self.len)
    }
}

const fn mask(count: u32) -> u32 {
    if count >= 32 {
        u32::MAX
    } else {
        (1u32 << count) - 1
    }
}

/// A length, distance or position of a page-sized stream as the `u32` the bit writer takes.
fn small(value: usize) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

fn length_symbol(length: usize) -> usize {
    LENGTH_BASE.partition_point(|&base| usize::from(base) <= length) - 1
}

fn distance_symbol(distance: usize) -> usize {
    DISTANCE_BASE.partition_point(|&base| usize::from(base) <= distance) - 1
}

fn hash3(bytes: &[u8]) -> usize {
    let word = u32::from(bytes[0]) | u32::from(bytes[1]) << 8 | u32::from(bytes[2]) << 16;
    (word.wrapping_mul(0x9e37_79b1) >> (32 - HASH_BITS)) as usize
}

/// How many leading bytes `a` and `b` share, up to `limit` (both at least `limit` long),
/// compared eight at a time.
fn common_prefix(a: &[u8], b: &[u8], limit: usize) -> usize {
    let mut n = 0;
    while n + 8 <= limit {
        let x = u64::from_le_bytes(a[n..n + 8].try_into().unwrap_or([0; 8]));
        let y = u64::from_le_bytes(b[n..n + 8].try_into().unwrap_or([0; 8]));
        let diff = x ^ y;
        if diff != 0 {
            return n + (diff.trailing_zeros() / 8) as usize;
        }
        n += 8;
    }
    while n < limit && a[n] == b[n] {
        n += 1;
    }
    n
}

/// The longest match for `pos` among earlier positions within [`HISTORY`], as (length,
/// distance). Stops looking once a match of [`NICE_MATCH`] bytes is found.
fn longest_match(src: &[u8], pos: usize, head: &[u32], prev: &[u32]) -> Option<(usize, usize)> {
    let limit = (src.len() - pos).min(MAX_MATCH);
    if limit < MIN_MATCH {
        return None;
    }
    let mut best: Option<(usize, usize)> = None;
    let mut best_len = MIN_MATCH - 1;
    let mut candidate = head[hash3(&src[pos..])];
    for _ in 0..MAX_CHAIN {
        let Some(cand) = candidate.checked_sub(1).map(|c| c as usize) else {
            break;
        };
        let distance = pos - cand;
        if distance > HISTORY {
            break;
        }
        // A longer match must also agree at the current best length.
        if src[cand + best_len.min(limit - 1)] == src[pos + best_len.min(limit - 1)] {
            let length = common_prefix(&src[cand..], &src[pos..], limit);
            if length > best_len {
                best_len = length;
                best = Some((length, distance));
                if length >= NICE_MATCH.min(limit) {
                    break;
                }
            }
        }
        candidate = prev[cand];
    }
    best
}

/// Compresses `src` the way the device does given `aecs`: see the module documentation.
/// Returns the stream's length; the tables must form a prefix code (the fixed ones do).
pub fn compress_with_aecs(
    aecs: &CompressAecs,
    src: &[u8],
    dst: &mut [u8],
) -> Result<usize, OutputOverflow> {
    let mut out = BitWriter::new(dst);
    // The output accumulator: the bits the device writes before the first symbol.
    let mut remaining = aecs.output_accumulator_bits.min(256 * 8);
    for &byte in &aecs.output_accumulator {
        if remaining == 0 {
            break;
        }
        let take = remaining.min(8);
        out.put(u32::from(byte), take)?;
        remaining -= take;
    }
    // Positions are stored plus one, so 0 means "none".
    let mut head = vec![0u32; 1 << HASH_BITS];
    let mut prev = vec![0u32; src.len()];
    let insert = |pos: usize, head: &mut [u32], prev: &mut [u32]| {
        if pos + MIN_MATCH <= src.len() {
            let h = hash3(&src[pos..]);
            prev[pos] = head[h];
            head[h] = small(pos + 1);
        }
    };
    let mut pos = 0;
    while pos < src.len() {
        match longest_match(src, pos, &head, &prev) {
            Some((length, distance)) => {
                let ls = length_symbol(length);
                out.put_code(aecs.literal_length[257 + ls])?;
                out.put(
                    small(length - usize::from(LENGTH_BASE[ls])),
                    u32::from(LENGTH_EXTRA[ls]),
                )?;
                let ds = distance_symbol(distance);
                out.put_code(aecs.distance[ds])?;
                out.put(
                    small(distance - usize::from(DISTANCE_BASE[ds])),
                    u32::from(DISTANCE_EXTRA[ds]),
                )?;
                for p in pos..pos + length {
                    insert(p, &mut head, &mut prev);
                }
                pos += length;
            }
            None => {
                out.put_code(aecs.literal_length[usize::from(src[pos])])?;
                insert(pos, &mut head, &mut prev);
                pos += 1;
            }
        }
    }
    out.put_code(aecs.literal_length[END_OF_BLOCK])?;
    out.finish()
}

struct Contexts {
    compressor: Compressor,
    decompressor: Decompressor,
}

thread_local! {
    static CONTEXTS: RefCell<Option<Contexts>> = const { RefCell::new(None) };
}

fn with_contexts<R>(f: impl FnOnce(&mut Contexts) -> R) -> R {
    CONTEXTS.with(|cell| {
        let mut slot = cell.borrow_mut();
        let contexts = slot.get_or_insert_with(|| Contexts {
            // Level 1: libdeflate's greedy matcher with dynamic Huffman blocks (its level 0
            // would store the page uncompressed).
            compressor: Compressor::new(CompressionLvl::new(1).unwrap_or_default()),
            decompressor: Decompressor::new(),
        });
        f(contexts)
    })
}

/// Compresses `src` with per-page dynamic Huffman tables (see the module documentation).
pub fn compress_dynamic(src: &[u8], dst: &mut [u8]) -> Result<usize, OutputOverflow> {
    with_contexts(|c| c.compressor.deflate_compress(src, dst))
        .map_err(|_| OutputOverflow { limit: dst.len() })
}

/// Decodes the raw DEFLATE stream `src` into `dst`, which it must fill exactly.
pub fn inflate_page(src: &[u8], dst: &mut [u8]) -> Result<(), InflateError> {
    let expected = dst.len();
    match with_contexts(|c| c.decompressor.deflate_decompress(src, dst)) {
        Ok(got) if got == expected => Ok(()),
        Ok(got) => Err(InflateError::ShortOutput { got, expected }),
        Err(_) => Err(InflateError::Invalid { limit: expected }),
    }
}

/// Why a device-style decompress failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecompressFailure {
    /// The output does not fit the destination.
    NoSpace,
    /// The stream is not valid DEFLATE.
    BadData,
}

/// Decodes `src` into `dst` and returns how many bytes it wrote (the device's decompress).
pub fn inflate(src: &[u8], dst: &mut [u8]) -> Result<usize, DecompressFailure> {
    use libdeflater::DecompressionError;
    with_contexts(|c| c.decompressor.deflate_decompress(src, dst)).map_err(|e| match e {
        DecompressionError::InsufficientSpace => DecompressFailure::NoSpace,
        DecompressionError::BadData => DecompressFailure::BadData,
    })
}

/// The CRC-32 (gzip polynomial) the device reports for the uncompressed data.
pub fn crc32(data: &[u8]) -> u32 {
    libdeflater::crc32(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_text() -> Vec<u8> {
        let words = [
            "the ",
            "page ",
            "store ",
            "compresses ",
            "swap ",
            "into ",
            "memory, ",
        ];
        let mut out = Vec::new();
        let mut i = 7usize;
        while out.len() < 4096 {
            i = i.wrapping_mul(1_103_515_245).wrapping_add(12345);
            out.extend_from_slice(words[(i >> 16) % words.len()].as_bytes());
        }
        out.truncate(4096);
        out
    }

    #[test]
    fn symbols_map_lengths_and_distances_per_rfc_1951() {
        assert_eq!(length_symbol(3), 0);
        assert_eq!(length_symbol(10), 7);
        assert_eq!(length_symbol(11), 8);
        assert_eq!(length_symbol(12), 8);
        assert_eq!(length_symbol(257), 27);
        assert_eq!(length_symbol(258), 28);
        assert_eq!(distance_symbol(1), 0);
        assert_eq!(distance_symbol(4), 3);
        assert_eq!(distance_symbol(5), 4);
        assert_eq!(distance_symbol(4096), 23);
    }

    #[test]
    fn empty_input_is_header_and_end_of_block() {
        // 3 header bits 0b011, then end-of-block (7 zero bits): 0x03, 0x00.
        let mut dst = [0u8; 8];
        let n = compress_with_aecs(&CompressAecs::fixed(), &[], &mut dst).unwrap();
        assert_eq!(&dst[..n], &[0x03, 0x00]);
    }

    #[test]
    fn single_literal_matches_a_hand_encoding() {
        // 'a' = 0x61 → fixed code 0x30 + 0x61 = 0x91 (8 bits), reversed 0x89.
        // Bits: 1,1,0 (header) then 1,0,0,0,1,0,0,1 then seven 0 bits.
        // Byte 0 = 0b0100_1011 = 0x4b, byte 1 = 0b0000_0100 = 0x04, byte 2 = 0.
        let mut dst = [0u8; 8];
        let n = compress_with_aecs(&CompressAecs::fixed(), b"a", &mut dst).unwrap();
        assert_eq!(&dst[..n], &[0x4b, 0x04, 0x00]);
    }

    #[test]
    fn fixed_output_decodes_with_an_independent_inflater() {
        let text = sample_text();
        let mut dst = vec![0u8; 8192];
        let n = compress_with_aecs(&CompressAecs::fixed(), &text, &mut dst).unwrap();
        assert!(n < text.len() / 2, "text compressed to {n}");
        let decoded = miniz_oxide::inflate::decompress_to_vec(&dst[..n]).unwrap();
        assert_eq!(decoded, text);
        // One final fixed block: BFINAL = 1, BTYPE = 01.
        assert_eq!(dst[0] & 0b111, 0b011);
    }

    #[test]
    fn streams_from_an_independent_deflater_inflate_here() {
        let text = sample_text();
        for level in [1u8, 6, 9] {
            let stream = miniz_oxide::deflate::compress_to_vec(&text, level);
            let mut page = vec![0u8; text.len()];
            inflate_page(&stream, &mut page).unwrap();
            assert_eq!(page, text, "level {level}");
        }
    }

    #[test]
    fn random_structured_inputs_round_trip_through_an_independent_inflater() {
        // Runs, literals and copies from every distance up to the history: every length and
        // distance code gets used across the 300 inputs.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            usize::try_from(state % n as u64).unwrap_or(0)
        };
        let aecs = CompressAecs::fixed();
        let mut dst = vec![0u8; 16384];
        for case in 0..300 {
            let len = 1 + next(4096);
            let mut data = Vec::with_capacity(len);
            while data.len() < len {
                match next(3) {
                    0 => data.push(next(256).to_le_bytes()[0]),
                    1 => {
                        let byte = next(256).to_le_bytes()[0];
                        data.extend(std::iter::repeat_n(byte, 1 + next(300)));
                    }
                    _ if !data.is_empty() => {
                        let distance = 1 + next(data.len().min(HISTORY));
                        for _ in 0..3 + next(256) {
                            data.push(data[data.len() - distance]);
                        }
                    }
                    _ => {}
                }
            }
            data.truncate(len);
            let n = compress_with_aecs(&aecs, &data, &mut dst).unwrap();
            let decoded = miniz_oxide::inflate::decompress_to_vec(&dst[..n]).unwrap();
            assert!(decoded == data, "case {case} ({len} bytes)");
        }
    }

    #[test]
    fn too_small_a_destination_overflows() {
        let text = sample_text();
        let mut dst = [0u8; 64];
        assert_eq!(
            compress_with_aecs(&CompressAecs::fixed(), &text, &mut dst),
            Err(OutputOverflow { limit: 64 })
        );
        assert_eq!(
            compress_dynamic(&text, &mut dst),
            Err(OutputOverflow { limit: 64 })
        );
    }

    #[test]
    fn inputs_longer_than_the_history_still_decode() {
        // 8 KiB whose second half repeats the first: the best match is 4096 bytes back, at the
        // edge of the history; the encoder must stay within it and the stream must decode.
        let mut data = sample_text();
        data.extend_from_within(..);
        let mut dst = vec![0u8; 16384];
        let n = compress_with_aecs(&CompressAecs::fixed(), &data, &mut dst).unwrap();
        let decoded = miniz_oxide::inflate::decompress_to_vec(&dst[..n]).unwrap();
        assert_eq!(decoded, data);
    }
}
