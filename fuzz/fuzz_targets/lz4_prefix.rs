// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Fuzz target: the lz4 codec's prefix decoder (`codec::lz4::prefix`, for partial decodes of
//! units) against `lz4_flex`'s decoder, on blocks chosen by the fuzzer.
//!
//! Input layout: `mode u8, needed u16 LE, length u16 LE`, then a payload. For an even mode the
//! payload is the block itself (mostly malformed); for an odd mode it is data that `lz4_flex`
//! compresses into a well-formed block, in which, when bit 1 of the mode is set, one byte is
//! then flipped. The destination holds `length` bytes (0 means 65,536, a whole unit) and the
//! prefix decoder is asked for `needed` of them.
//!
//! The prefix decoder must never panic or touch memory outside its buffers, and where both
//! decoders succeed it must have written exactly `lz4_flex`'s bytes. It decodes the whole
//! destination only when `lz4_flex` does, and fails only when `lz4_flex` does or decodes
//! fewer bytes than were needed.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_user_zram::codec::lz4::prefix;

fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        return;
    }
    let mode = data[0];
    let needed = usize::from(u16::from_le_bytes([data[1], data[2]]));
    let length = match u16::from_le_bytes([data[3], data[4]]) {
        0 => 65_536,
        n => usize::from(n),
    };
    let payload = &data[5..];
    let block = if mode & 1 == 1 {
        let mut block = lz4_flex::block::compress(payload);
        if mode & 2 == 2 && !block.is_empty() {
            let at = needed % block.len();
            block[at] ^= mode | 1;
        }
        block
    } else {
        payload.to_vec()
    };

    let mut ours = vec![0u8; length];
    let mut theirs = vec![0u8; length];
    let got = prefix::decompress(&block, &mut ours, needed);
    let want = lz4_flex::block::decompress_into(&block, &mut theirs);
    match (got, want) {
        (Ok(n), Ok(m)) => {
            assert!(n >= needed.min(length), "{n} decoded, {needed} needed");
            assert!(n <= m, "the prefix decoder wrote {n} bytes, lz4_flex {m}");
            assert!(ours[..n] == theirs[..n], "the decoded bytes differ");
            assert!(n < length || m == length);
        }
        (Ok(n), Err(e)) => assert!(
            n < length,
            "a whole decode of a block lz4_flex refuses: {e}"
        ),
        (Err(e), Ok(m)) => assert!(m < needed, "{e}, but lz4_flex decoded {m} bytes"),
        (Err(_), Err(_)) => {}
    }
});
