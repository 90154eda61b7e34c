// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The structures the accelerator reads and writes, laid out byte for byte as the hardware
//! defines them: the 64-byte work descriptor and the 64-byte completion record, with the
//! opcodes, flags and status codes this crate uses.
//!
//! Sources: Linux `include/uapi/linux/idxd.h` (`struct iax_hw_desc`, `struct
//! iax_completion_record`, `IDXD_OP_FLAG_*`, `IAX_OPCODE_*`), `drivers/crypto/intel/iaa/
//! iaa_crypto.h` (`IAA_COMP_*`, `IAA_DECOMP_*`, `IAA_ANALYTICS_ERROR`,
//! `IAA_ERROR_COMP_BUF_OVERFLOW`) and Intel QPL `sources/core-iaa/include/
//! hw_completion_record_api.h`. The tests at the bottom check every offset against those
//! headers.

use std::mem::{align_of, offset_of, size_of};

/// Operation codes (`IAX_OPCODE_*` in `idxd.h`).
pub mod opcode {
    /// Does nothing but write a completion record.
    pub const NOOP: u8 = 0x00;
    /// Decompress a DEFLATE stream.
    pub const DECOMPRESS: u8 = 0x42;
    /// Compress into a DEFLATE stream.
    pub const COMPRESS: u8 = 0x43;
    /// CRC-64.
    pub const CRC64: u8 = 0x44;
}

/// Descriptor flags (`IDXD_OP_FLAG_*` in `idxd.h`), the 24-bit field at byte 4.
pub mod flags {
    /// Fence: wait for earlier descriptors of the batch.
    pub const FENCE: u32 = 0x1;
    /// Block on fault: the device waits for the kernel to resolve a page fault.
    pub const BOF: u32 = 0x2;
    /// Completion record address valid.
    pub const CRAV: u32 = 0x4;
    /// Request completion record.
    pub const RCR: u32 = 0x8;
    /// Request completion interrupt.
    pub const RCI: u32 = 0x10;
    /// Cache control for the completion record.
    pub const CR: u32 = 0x80;
    /// Cache control: write the destination into the cache.
    pub const CC: u32 = 0x100;
    /// Read the AECS at src2.
    pub const RD_SRC2_AECS: u32 = 0x10000;
    /// Write the AECS at src2 on completion.
    pub const WR_SRC2_AECS_COMP: u32 = 0x40000;
    /// Compute CRC-32C (RFC 3720) instead of the gzip CRC-32.
    pub const CRC_RFC3720: u32 = 0x200000;
    /// Which half of a double-buffered AECS to use.
    pub const AECS_RW_TGLS: u32 = 0x400000;
}

/// Compression flags (`IAA_COMP_*` in `iaa_crypto.h`), the 16-bit field at byte 38.
pub mod compression_flags {
    /// Write out every output bit at the end (pad the last byte).
    pub const FLUSH_OUTPUT: u16 = 1 << 1;
    /// Append an end-of-block symbol.
    pub const APPEND_EOB: u16 = 1 << 2;
    /// Generation-2 dynamic Huffman: the device builds the code table from the input itself
    /// (bits 12 and 13; from the 2024–2025 iaa_crypto "dynamic" series, not mainline).
    pub const DYNAMIC_HUFFMAN: u16 = 0x3000;
}

/// Decompression flags (`IAA_DECOMP_*` in `iaa_crypto.h`), the 16-bit field at byte 38.
pub mod decompression_flags {
    /// Enable decompression.
    pub const ENABLE: u16 = 1 << 0;
    /// Write out every output bit at the end.
    pub const FLUSH_OUTPUT: u16 = 1 << 1;
    /// Check for an end-of-block symbol (QPL names bits 2 and 3 the other way round; both
    /// are always set together here, so the naming does not matter).
    pub const CHECK_FOR_EOB: u16 = 1 << 2;
    /// Stop at the end-of-block symbol.
    pub const STOP_ON_EOB: u16 = 1 << 3;
    /// Compute the CRC without writing the output (iaa_crypto's verify pass).
    pub const SUPPRESS_OUTPUT: u16 = 1 << 9;
}

/// Completion status codes (byte 0 of the completion record, masked with [`STATUS_MASK`]).
pub mod status {
    /// Not written yet: the operation has not completed.
    pub const PENDING: u8 = 0x00;
    /// Success.
    pub const SUCCESS: u8 = 0x01;
    /// A page fault on an address the descriptor named; `bytes_completed` says how far it got.
    pub const PAGE_FAULT: u8 = 0x03;
    /// An analytics error: the error code says which.
    pub const ANALYTICS_ERROR: u8 = 0x0a;
    /// The decompressed output does not fit `max_dst_size`.
    pub const OUTPUT_OVERFLOW: u8 = 0x0b;
    /// Unknown opcode.
    pub const BAD_OPCODE: u8 = 0x10;
    /// Flags the operation does not accept.
    pub const INVALID_FLAGS: u8 = 0x11;
    /// A size out of range.
    pub const INVALID_SIZE: u8 = 0x13;
    /// The completion record address is not aligned.
    pub const COMPLETION_MISALIGNED: u8 = 0x1b;
    /// The AECS address is not aligned.
    pub const AECS_MISALIGNED: u8 = 0x1c;
    /// The operation ran longer than the device's watchdog allows.
    pub const WATCHDOG: u8 = 0x24;
}

/// The kernel masks the status with 0x7f; bit 7 says a page fault was on a write.
pub const STATUS_MASK: u8 = 0x7f;

/// Error codes that come with [`status::ANALYTICS_ERROR`] (QPL numbers them as
/// `QPL_HW_BASE_CODE - code`, `sources/include/qpl/c_api/status.h`).
pub mod error_code {
    /// An invalid literal/length code in the stream (`QPL_AD_ERROR_CODE_BAD_LL_CODE`): the
    /// software queue reports every undecodable stream with it.
    pub const BAD_LITERAL_LENGTH_CODE: u8 = 0x0b;
    /// A back-reference distance beyond the 4 KiB history.
    pub const DISTANCE_BEYOND_HISTORY: u8 = 0x11;
    /// A back-reference before the start of the output.
    pub const REFERENCE_BEFORE_START: u8 = 0x12;
    /// The AECS is malformed.
    pub const AECS_ERROR: u8 = 0x16;
    /// A compression whose output does not fit `max_dst_size`: iaa_crypto treats the page as
    /// incompressible (`IAA_ERROR_COMP_BUF_OVERFLOW`).
    pub const COMPRESS_OUTPUT_OVERFLOW: u8 = 0x19;
}

/// Flags iaa_crypto sets on every compress: completion record valid and requested, cache
/// control, read the AECS (`0x1010C`).
pub const COMPRESS_DESCRIPTOR_FLAGS: u32 =
    flags::CRAV | flags::RCR | flags::CC | flags::RD_SRC2_AECS;
/// Flags of a dynamic-Huffman compress: as [`COMPRESS_DESCRIPTOR_FLAGS`] without the AECS
/// (`0x10C`).
pub const COMPRESS_DYNAMIC_DESCRIPTOR_FLAGS: u32 = flags::CRAV | flags::RCR | flags::CC;
/// Flags iaa_crypto sets on every decompress (`0x10C`).
pub const DECOMPRESS_DESCRIPTOR_FLAGS: u32 = flags::CRAV | flags::RCR | flags::CC;
/// Compression flags for one self-contained page (`0x0006`).
pub const COMPRESS_FLAGS_FIXED: u16 =
    compression_flags::FLUSH_OUTPUT | compression_flags::APPEND_EOB;
/// Decompression flags for one self-contained page (`0x000F`).
pub const DECOMPRESS_FLAGS: u16 = decompression_flags::ENABLE
    | decompression_flags::FLUSH_OUTPUT
    | decompression_flags::CHECK_FOR_EOB
    | decompression_flags::STOP_ON_EOB;

/// The alignment the device requires of a completion record: the kernel's write() path
/// refuses anything else for IAA (`comp_addr_align = is_dsa_dev(..) ? 0x20 : 0x40` in
/// `drivers/dma/idxd/cdev.c`), and QPL's completion-record header says the same.
pub const COMPLETION_ALIGN: usize = 64;
/// The alignment the device requires of an AECS.
pub const AECS_ALIGN: usize = 32;

/// One work descriptor (`struct iax_hw_desc`): 64 bytes, little-endian, submitted whole.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C, align(64))]
pub struct Descriptor {
    /// PASID in bits 0–19, privilege in bit 31: 0 from user space (the kernel fills the PASID
    /// of a shared WQ on the write() path; ENQCMD takes it from the IA32_PASID MSR).
    pub pasid_priv: u32,
    /// Flags in bits 0–23, opcode in bits 24–31.
    pub flags_opcode: u32,
    /// Address of the completion record ([`COMPLETION_ALIGN`]-byte aligned).
    pub completion_addr: u64,
    /// Source address.
    pub src1_addr: u64,
    /// Destination address.
    pub dst_addr: u64,
    /// Source size in bytes.
    pub src1_size: u32,
    /// Interrupt handle: 0, completions are polled.
    pub int_handle: u16,
    /// Compression or decompression flags.
    pub op_flags: u16,
    /// Address of the AECS (compress) or second source.
    pub src2_addr: u64,
    /// Destination capacity in bytes.
    pub max_dst_size: u32,
    /// Size of the AECS (a multiple of 32).
    pub src2_size: u32,
    /// Filter flags (QPL: "compression_2_flags").
    pub filter_flags: u32,
    /// Number of input elements (filter operations only).
    pub num_inputs: u32,
}

impl Descriptor {
    /// Packs `flags` (24 bits) and `opcode` into the word at byte 4.
    pub const fn pack_flags_opcode(flags: u32, opcode: u8) -> u32 {
        (flags & 0x00ff_ffff) | ((opcode as u32) << 24)
    }

    /// The descriptor's flags.
    pub const fn flags(&self) -> u32 {
        self.flags_opcode & 0x00ff_ffff
    }

    /// The descriptor's opcode.
    pub const fn opcode(&self) -> u8 {
        (self.flags_opcode >> 24) as u8
    }

    /// The 64 bytes the device reads, little-endian.
    pub fn to_bytes(&self) -> [u8; 64] {
        let mut out = [0u8; 64];
        out[0..4].copy_from_slice(&self.pasid_priv.to_le_bytes());
        out[4..8].copy_from_slice(&self.flags_opcode.to_le_bytes());
        out[8..16].copy_from_slice(&self.completion_addr.to_le_bytes());
        out[16..24].copy_from_slice(&self.src1_addr.to_le_bytes());
        out[24..32].copy_from_slice(&self.dst_addr.to_le_bytes());
        out[32..36].copy_from_slice(&self.src1_size.to_le_bytes());
        out[36..38].copy_from_slice(&self.int_handle.to_le_bytes());
        out[38..40].copy_from_slice(&self.op_flags.to_le_bytes());
        out[40..48].copy_from_slice(&self.src2_addr.to_le_bytes());
        out[48..52].copy_from_slice(&self.max_dst_size.to_le_bytes());
        out[52..56].copy_from_slice(&self.src2_size.to_le_bytes());
        out[56..60].copy_from_slice(&self.filter_flags.to_le_bytes());
        out[60..64].copy_from_slice(&self.num_inputs.to_le_bytes());
        out
    }
}

/// The record the device writes when an operation ends (`struct iax_completion_record`).
/// Byte 0, the status, is 0 until then: poll it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C, align(64))]
pub struct CompletionRecord {
    /// Completion status (see [`status`]); 0 while the operation runs.
    pub status: u8,
    /// Error code for [`status::ANALYTICS_ERROR`].
    pub error_code: u8,
    /// Page-fault details.
    pub fault_info: u8,
    /// Reserved.
    pub reserved0: u8,
    /// Source bytes processed before an error or page fault.
    pub bytes_completed: u32,
    /// The faulting address.
    pub fault_addr: u64,
    /// Which flags were invalid, for [`status::INVALID_FLAGS`].
    pub invalid_flags: u32,
    /// Reserved.
    pub reserved1: u32,
    /// Bytes written to the destination.
    pub output_size: u32,
    /// Valid bits in the last output byte.
    pub output_bits: u8,
    /// Reserved.
    pub reserved2: u8,
    /// XOR checksum of the uncompressed data.
    pub xor_checksum: u16,
    /// CRC-32 (gzip polynomial) of the uncompressed data.
    pub crc: u32,
    /// Filter result: minimum.
    pub min: u32,
    /// Filter result: maximum.
    pub max: u32,
    /// Filter result: sum.
    pub sum: u32,
    /// Reserved.
    pub reserved3: [u64; 2],
}

impl CompletionRecord {
    /// The status with the page-fault write bit masked off.
    pub const fn masked_status(&self) -> u8 {
        self.status & STATUS_MASK
    }
}

const _: () = {
    assert!(size_of::<Descriptor>() == 64);
    assert!(align_of::<Descriptor>() == 64);
    assert!(offset_of!(Descriptor, flags_opcode) == 4);
    assert!(offset_of!(Descriptor, completion_addr) == 8);
    assert!(offset_of!(Descriptor, src1_addr) == 16);
    assert!(offset_of!(Descriptor, dst_addr) == 24);
    assert!(offset_of!(Descriptor, src1_size) == 32);
    assert!(offset_of!(Descriptor, int_handle) == 36);
    assert!(offset_of!(Descriptor, op_flags) == 38);
    assert!(offset_of!(Descriptor, src2_addr) == 40);
    assert!(offset_of!(Descriptor, max_dst_size) == 48);
    assert!(offset_of!(Descriptor, src2_size) == 52);
    assert!(offset_of!(Descriptor, filter_flags) == 56);
    assert!(offset_of!(Descriptor, num_inputs) == 60);

    assert!(size_of::<CompletionRecord>() == 64);
    assert!(align_of::<CompletionRecord>() == COMPLETION_ALIGN);
    assert!(offset_of!(CompletionRecord, status) == 0);
    assert!(offset_of!(CompletionRecord, error_code) == 1);
    assert!(offset_of!(CompletionRecord, fault_info) == 2);
    assert!(offset_of!(CompletionRecord, bytes_completed) == 4);
    assert!(offset_of!(CompletionRecord, fault_addr) == 8);
    assert!(offset_of!(CompletionRecord, invalid_flags) == 16);
    assert!(offset_of!(CompletionRecord, output_size) == 24);
    assert!(offset_of!(CompletionRecord, output_bits) == 28);
    assert!(offset_of!(CompletionRecord, xor_checksum) == 30);
    assert!(offset_of!(CompletionRecord, crc) == 32);
    assert!(offset_of!(CompletionRecord, min) == 36);
    assert!(offset_of!(CompletionRecord, max) == 40);
    assert!(offset_of!(CompletionRecord, sum) == 44);
    assert!(offset_of!(CompletionRecord, reserved3) == 48);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_words_match_what_iaa_crypto_submits() {
        assert_eq!(COMPRESS_DESCRIPTOR_FLAGS, 0x1010c);
        assert_eq!(DECOMPRESS_DESCRIPTOR_FLAGS, 0x10c);
        assert_eq!(COMPRESS_FLAGS_FIXED, 0x0006);
        assert_eq!(DECOMPRESS_FLAGS, 0x000f);
        assert_eq!(
            DECOMPRESS_FLAGS | decompression_flags::SUPPRESS_OUTPUT,
            0x020f
        );
        assert_eq!(
            COMPRESS_FLAGS_FIXED | compression_flags::DYNAMIC_HUFFMAN,
            0x3006
        );
    }

    #[test]
    fn descriptor_encodes_byte_exact_little_endian() {
        let desc = Descriptor {
            pasid_priv: 0,
            flags_opcode: Descriptor::pack_flags_opcode(
                COMPRESS_DESCRIPTOR_FLAGS,
                opcode::COMPRESS,
            ),
            completion_addr: 0x1122_3344_5566_7740,
            src1_addr: 0x0000_7f00_0000_1000,
            dst_addr: 0x0000_7f00_0000_3000,
            src1_size: 4096,
            int_handle: 0,
            op_flags: COMPRESS_FLAGS_FIXED,
            src2_addr: 0x0000_7f00_0000_0020,
            max_dst_size: 8192,
            src2_size: 1568,
            filter_flags: 0,
            num_inputs: 0,
        };
        let bytes = desc.to_bytes();
        #[rustfmt::skip]
        let expected: [u8; 64] = [
            0, 0, 0, 0,                 0x0c, 0x01, 0x01, 0x43,
            0x40, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11,
            0x00, 0x10, 0, 0, 0x00, 0x7f, 0, 0,
            0x00, 0x30, 0, 0, 0x00, 0x7f, 0, 0,
            0x00, 0x10, 0, 0,           0, 0,   0x06, 0x00,
            0x20, 0, 0, 0, 0x00, 0x7f, 0, 0,
            0x00, 0x20, 0, 0,           0x20, 0x06, 0, 0,
            0, 0, 0, 0,                 0, 0, 0, 0,
        ];
        assert_eq!(bytes, expected);
        // The in-memory form is the wire form: the device reads the struct as it lies.
        // SAFETY: `Descriptor` is `repr(C)`, 64 bytes, and has no padding (every offset is
        // asserted above), so all 64 bytes are initialised.
        let raw: [u8; 64] = unsafe { std::mem::transmute(desc) };
        assert_eq!(raw, expected);
        assert_eq!(desc.opcode(), opcode::COMPRESS);
        assert_eq!(desc.flags(), COMPRESS_DESCRIPTOR_FLAGS);
    }

    #[test]
    fn completion_record_reads_fields_at_the_kernel_offsets() {
        let mut raw = [0u8; 64];
        raw[0] = 0x83; // a page fault on a write
        raw[1] = 0x19;
        raw[4..8].copy_from_slice(&1234u32.to_le_bytes());
        raw[8..16].copy_from_slice(&0xdead_beef_0000u64.to_le_bytes());
        raw[24..28].copy_from_slice(&777u32.to_le_bytes());
        raw[28] = 5;
        raw[32..36].copy_from_slice(&0xcafe_f00du32.to_le_bytes());
        // SAFETY: every bit pattern is a valid `CompletionRecord` (integers only), and the
        // sizes are equal (asserted above).
        let record: CompletionRecord = unsafe { std::mem::transmute(raw) };
        assert_eq!(record.masked_status(), status::PAGE_FAULT);
        assert_eq!(record.error_code, error_code::COMPRESS_OUTPUT_OVERFLOW);
        assert_eq!(record.bytes_completed, 1234);
        assert_eq!(record.fault_addr, 0xdead_beef_0000);
        assert_eq!(record.output_size, 777);
        assert_eq!(record.output_bits, 5);
        assert_eq!(record.crc, 0xcafe_f00d);
    }
}
