// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! An LZ4 block decoder in safe Rust that stops once it has decoded a prefix of the block: a
//! read of page 2 of a 16-page unit decodes 8 KiB, not 64 KiB.
//!
//! Neither of the decoders we ship can stop early: `lz4_flex` 0.14 always decodes the whole
//! block, and `lz4-sys` 1.11 does not bind `LZ4_decompress_safe_partial`. This one is used only
//! for partial decodes (see `lz4::PREFIX_LIMIT` for which); a full decode still goes through
//! the build's library decoder, as a page's does.
//!
//! It has no `unsafe` and indexes only through checked slices, so no input can make it read or
//! write outside the buffers it is given; a malformed sequence before the stop point is an
//! error. It accepts exactly what `lz4_flex`'s decoder accepts (the same checks, in the same
//! order: a literal run or match past the end of the input or the output, a match offset of 0
//! or before the start of the output), so the bytes it returns are the bytes `lz4_flex` would
//! write there; the fuzz target `lz4_prefix` holds the two against each other.
//!
//! The block format (lz4's `doc/lz4_Block_format.md`): a sequence of
//! `token, [literal length bytes], literals, offset (u16 LE), [match length bytes]`, where the
//! token's high nibble is the literal length and its low nibble the match length minus 4, 15 in
//! either meaning "add the following bytes up to and including the first that is not 255". The
//! last sequence has literals only and ends the input.

use std::fmt;

/// The shortest match the format encodes.
const MIN_MATCH: usize = 4;

/// A sequence whose token holds both lengths (at most 14 literals, a match of at most 18) is
/// decoded with fixed-size copies when at least this many input bytes follow the token: 16
/// of literals copied whole whatever their length, then the 2-byte offset. Such a sequence is
/// never the last, which ends the input with its literals.
const FAST_INPUT: usize = 16 + 2;

/// ... and this many output bytes are free: 16 literal bytes copied whole, then an 18-byte
/// match copied whole from at most 14 bytes further. What lies past a sequence's true end is
/// overwritten by the next sequence, or left past the prefix returned. Because the fast path
/// stops short of the end of the output, reaching it (`out == dst.len()`) is always the slow
/// path's.
const FAST_OUTPUT: usize = 16 + 18;

/// Why a block does not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefixError {
    /// The input ended inside a sequence.
    Truncated,
    /// A literal run or a match would write past the end of the output.
    OutputOverrun,
    /// A match offset of 0, or one reaching before the start of the output.
    BadOffset,
    /// The block ended after this many bytes, before the prefix asked for.
    Short(usize),
}

impl fmt::Display for PrefixError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PrefixError::Truncated => f.write_str("the lz4 block ends inside a sequence"),
            PrefixError::OutputOverrun => {
                f.write_str("the lz4 block decodes to more than its destination holds")
            }
            PrefixError::BadOffset => {
                f.write_str("an lz4 match refers to bytes before the start of the block")
            }
            PrefixError::Short(n) => write!(f, "the lz4 block ends after {n} bytes"),
        }
    }
}

impl std::error::Error for PrefixError {}

/// Decodes the LZ4 block `src` into `dst` until at least `needed` bytes are out, and returns how
/// many are (at least `needed`, at most `dst.len()`: the sequence that crosses `needed` is
/// finished). Bytes of `dst` past the returned length may have been written.
///
/// When the decoded length reaches `dst.len()`, it decodes to the end of the block as a full
/// decoder does and fails unless the block ends there. A prefix shorter than `dst.len()` says
/// nothing of the rest of the block, which is not read. `needed` above `dst.len()` is treated
/// as `dst.len()`.
pub fn decompress(src: &[u8], dst: &mut [u8], needed: usize) -> Result<usize, PrefixError> {
    let needed = needed.min(dst.len());
    let mut input = Input { src, pos: 0 };
    let mut out = 0;
    loop {
        let token = input.byte()?;
        if token & 0xf0 != 0xf0
            && token & 0x0f != 0x0f
            && input.pos + FAST_INPUT <= src.len()
            && out + FAST_OUTPUT <= dst.len()
        {
            // The common short sequence, far from both ends: see FAST_INPUT.
            let literals = usize::from(token >> 4);
            dst[out..out + 16].copy_from_slice(&src[input.pos..input.pos + 16]);
            out += literals;
            input.pos += literals;
            if out >= needed {
                return Ok(out);
            }
            let offset = usize::from(u16::from_le_bytes([src[input.pos], src[input.pos + 1]]));
            input.pos += 2;
            let length = usize::from(token & 0xf) + MIN_MATCH;
            if offset == 0 || offset > out {
                return Err(PrefixError::BadOffset);
            }
            if offset >= length {
                // Bytes past `length` are overwritten by what follows.
                dst.copy_within(out - offset..out - offset + 18, out);
            } else {
                copy_match(dst, out, offset, length);
            }
            out += length;
            if out >= needed {
                return Ok(out);
            }
            continue;
        }
        let literals = input.length(usize::from(token >> 4))?;
        if literals > 0 {
            let from = input.take(literals)?;
            dst.get_mut(out..out + literals)
                .ok_or(PrefixError::OutputOverrun)?
                .copy_from_slice(from);
            out += literals;
        }
        if input.is_empty() {
            // The last sequence: literals only.
            return if out >= needed {
                Ok(out)
            } else {
                Err(PrefixError::Short(out))
            };
        }
        if out >= needed && out < dst.len() {
            return Ok(out);
        }
        let offset = usize::from(u16::from_le_bytes([input.byte()?, input.byte()?]));
        let length = input.length(usize::from(token & 0xf))? + MIN_MATCH;
        if length > dst.len() - out {
            return Err(PrefixError::OutputOverrun);
        }
        if offset == 0 || offset > out {
            return Err(PrefixError::BadOffset);
        }
        copy_match(dst, out, offset, length);
        out += length;
        if out >= needed && out < dst.len() {
            return Ok(out);
        }
    }
}

/// Copies the `length` bytes `offset` back from `at` to `at` (`offset` ≤ `at`, `at + length`
/// ≤ `dst.len()`, both checked by the caller). When the two overlap the bytes repeat with
/// period `offset`, so the copy doubles: each round copies from the match's start everything
/// written since, a whole number of periods.
fn copy_match(dst: &mut [u8], at: usize, offset: usize, length: usize) {
    let start = at - offset;
    if offset == 1 {
        let byte = dst[start];
        dst[at..at + length].fill(byte);
        return;
    }
    let mut copied = 0;
    while copied < length {
        let n = (offset + copied).min(length - copied);
        dst.copy_within(start..start + n, at + copied);
        copied += n;
    }
}

/// The undecoded rest of a block.
struct Input<'a> {
    src: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    fn is_empty(&self) -> bool {
        self.pos >= self.src.len()
    }

    fn byte(&mut self) -> Result<u8, PrefixError> {
        let byte = *self.src.get(self.pos).ok_or(PrefixError::Truncated)?;
        self.pos += 1;
        Ok(byte)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], PrefixError> {
        let src: &'a [u8] = self.src;
        let bytes = src
            .get(self.pos..self.pos.saturating_add(n))
            .ok_or(PrefixError::Truncated)?;
        self.pos += n;
        Ok(bytes)
    }

    /// A length whose nibble is `nibble`: 15 continues in the bytes that follow.
    fn length(&mut self, nibble: usize) -> Result<usize, PrefixError> {
        let mut length = nibble;
        if nibble == 15 {
            loop {
                let more = self.byte()?;
                // Every byte read is one of the input's, so the sum stays below 255 times its
                // length: no overflow.
                length += usize::from(more);
                if more != 0xff {
                    break;
                }
            }
        }
        Ok(length)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compress(data: &[u8]) -> Vec<u8> {
        lz4_flex::block::compress(data)
    }

    #[test]
    fn a_full_decode_equals_lz4_flex() {
        let mut data = Vec::new();
        for i in 0..20_000u32 {
            data.extend_from_slice(&(i % 97).to_le_bytes());
            if i % 13 == 0 {
                data.extend_from_slice(b"literal run of text, ");
            }
        }
        let block = compress(&data);
        let mut out = vec![0u8; data.len()];
        assert_eq!(decompress(&block, &mut out, data.len()), Ok(data.len()));
        assert!(out == data);
    }

    #[test]
    fn it_stops_at_the_first_sequence_past_the_prefix() {
        let mut gen = crate::pagegen::PageGen::new(4);
        let data: Vec<u8> = (0..16)
            .flat_map(|_| gen.page_of(crate::pagegen::PageKind::Text).into_iter())
            .collect();
        let block = compress(&data);
        let mut out = vec![0u8; data.len()];
        let n = decompress(&block, &mut out, 4096).unwrap();
        // Text makes short sequences: the one that crosses the first page ends soon after it.
        assert!((4096..4096 + 1024).contains(&n), "{n}");
        assert_eq!(out[..n], data[..n]);
        assert!(
            out[n + FAST_OUTPUT..].iter().all(|&b| b == 0),
            "nothing written past the last sequence's copies"
        );
    }

    #[test]
    fn overlapping_matches_repeat_their_period() {
        // Runs with periods 1, 2, 3 and 5, each long enough to need several doublings.
        let mut data = Vec::new();
        for period in [1u8, 2, 3, 5, 17] {
            let pattern: Vec<u8> = (0..period).map(|i| 10 + i).collect();
            for _ in 0..300 {
                data.extend_from_slice(&pattern);
            }
            data.extend_from_slice(b"separator");
        }
        let block = compress(&data);
        let mut out = vec![0u8; data.len()];
        assert_eq!(decompress(&block, &mut out, data.len()), Ok(data.len()));
        assert!(out == data);
    }

    #[test]
    fn malformed_blocks_are_errors() {
        let mut out = [0u8; 64];
        // Nothing at all; a literal run past the input; past the output; offset 0; an offset
        // before the start; a length continuation cut off; a block shorter than asked for.
        assert_eq!(decompress(b"", &mut out, 1), Err(PrefixError::Truncated));
        assert_eq!(
            decompress(b"\x50abc", &mut out, 1),
            Err(PrefixError::Truncated)
        );
        let long = [&[0xf0u8, 0xff, 0xff][..], &[0u8; 600][..]].concat();
        assert_eq!(
            decompress(&long, &mut out, 1),
            Err(PrefixError::OutputOverrun)
        );
        assert_eq!(
            decompress(b"\x10a\x00\x00", &mut out, 64),
            Err(PrefixError::BadOffset)
        );
        assert_eq!(
            decompress(b"\x10a\x02\x00", &mut out, 64),
            Err(PrefixError::BadOffset)
        );
        assert_eq!(
            decompress(b"\x1fa\x01\x00\xff", &mut out, 64),
            Err(PrefixError::Truncated)
        );
        assert_eq!(
            decompress(b"\x30abc", &mut out, 4),
            Err(PrefixError::Short(3))
        );
        // A match that fills the output exactly, with nothing after it, is not a block end.
        let mut four = [0u8; 5];
        assert_eq!(
            decompress(b"\x10a\x01\x00", &mut four, 5),
            Err(PrefixError::Truncated)
        );
        assert_eq!(decompress(b"\x10a\x01\x00\x00", &mut four, 5), Ok(5));
        assert_eq!(four, *b"aaaaa");
    }

    /// What the fuzz target `lz4_prefix` checks, on one input: the prefix decoder writes
    /// `lz4_flex`'s bytes, decodes the whole destination only when `lz4_flex` does, and fails
    /// only when `lz4_flex` does or decodes fewer bytes than needed.
    fn agrees_with_lz4_flex(block: &[u8], length: usize, needed: usize) {
        let mut ours = vec![0u8; length];
        let mut theirs = vec![0u8; length];
        match (
            decompress(block, &mut ours, needed),
            lz4_flex::block::decompress_into(block, &mut theirs),
        ) {
            (Ok(n), Ok(m)) => {
                assert!(
                    n >= needed.min(length) && n <= m,
                    "{n} of {m}, {needed} needed"
                );
                assert!(ours[..n] == theirs[..n]);
                assert!(n < length || m == length);
            }
            (Ok(n), Err(_)) => assert!(n < length),
            (Err(e), Ok(m)) => assert!(m < needed, "{e}; lz4_flex decoded {m}"),
            (Err(_), Err(_)) => {}
        }
    }

    #[test]
    fn mutated_blocks_decode_as_lz4_flex_decodes_them() {
        let mut rng = crate::pagegen::SplitMix64::new(0x1a4);
        let mut page = [0u8; crate::PAGE_SIZE];
        for index in 0..300 {
            let mut data = Vec::new();
            for i in 0..1 + rng.below(4) {
                crate::pagegen::fill_page(3, index * 4 + i, &mut page);
                data.extend_from_slice(&page);
            }
            let block = compress(&data);
            let mut bad = block.clone();
            for _ in 0..1 + rng.below(3) {
                let at = usize::try_from(rng.below(bad.len() as u64)).unwrap();
                bad[at] ^= 1 << rng.below(8);
            }
            let cut = usize::try_from(rng.below(block.len() as u64)).unwrap();
            let needed = usize::try_from(rng.below(data.len() as u64 + 1)).unwrap();
            for src in [&block[..], &bad[..], &block[..cut]] {
                for length in [data.len(), data.len() - 1, data.len() + 7] {
                    agrees_with_lz4_flex(src, length, needed);
                }
            }
        }
    }
}
