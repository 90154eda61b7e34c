// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The virtio-blk device description: the features offered and the configuration space.
//!
//! Decisions where the specification leaves room:
//!
//! - `blk_size` is 4096, as zram's logical block size: the guest then issues page-aligned
//!   I/O, which the store handles without read-modify-write. The topology fields are in units of
//!   `blk_size` (virtio 1.2, 5.2.4), so `physical_block_exp` is 0 and `min_io_size` and
//!   `opt_io_size` are 1 block (zram's `io_min` and `io_opt` are one page too). Requests are
//!   still addressed in 512-byte sectors, and sub-page requests from other drivers still work.
//! - `VIRTIO_BLK_F_CONFIG_WCE` is not offered: data lives in RAM, so there is no volatile
//!   cache whose mode could change anything. `VIRTIO_BLK_F_FLUSH` is offered so that guests that
//!   insist on flushing get an immediate success.
//! - A read-only device offers neither `DISCARD` nor `WRITE_ZEROES`.
//! - `seg_max` is the announced queue size minus the header and status descriptors, capped at
//!   [`MAX_SEG_MAX`] so the per-thread descriptor table stays small; `size_max` is
//!   [`SIZE_MAX`].

use std::mem::offset_of;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

use crate::{PAGE_SIZE, SECTORS_PER_PAGE};

/// The largest number of queues the device offers.
pub const MAX_QUEUES: u16 = 64;

/// The largest queue size (split virtqueues cap it at 32768).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// The upper bound of `seg_max`, whatever the queue size.
pub const MAX_SEG_MAX: u32 = 1022;

/// The largest data segment announced in `size_max` (1 MiB).
pub const SIZE_MAX: u32 = 1 << 20;

/// The largest discard or write-zeroes range of one segment, in sectors: the largest page
/// multiple that fits the 32-bit field.
pub const MAX_DISCARD_SECTORS: u32 = !(PAGE_SECTORS - 1);

/// Sectors per page, as the 32-bit configuration fields want it (8: the cast is exact).
#[allow(clippy::cast_possible_truncation)]
const PAGE_SECTORS: u32 = SECTORS_PER_PAGE as u32;

/// `blk_size`: one page (4096: the cast is exact).
#[allow(clippy::cast_possible_truncation)]
const BLK_SIZE: u32 = PAGE_SIZE as u32;

/// The largest number of segments in one discard or write-zeroes request (Linux takes at most
/// 256).
pub const MAX_DISCARD_SEG: u32 = 256;

/// The length of the serial number `VIRTIO_BLK_T_GET_ID` returns.
pub const SERIAL_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

/// The bytes of the configuration space the device fills: everything up to and including
/// `write_zeroes_may_unmap` and its padding. Later fields (secure erase, zoned) belong to
/// features the device does not offer and read as zeros.
pub const CONFIG_SPACE_LEN: usize = offset_of!(virtio_blk_config, max_secure_erase_sectors);

/// A serial number longer than the 20 bytes virtio-blk has room for.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the serial number is {len} bytes long; virtio-blk allows at most {SERIAL_LEN}")]
pub struct SerialTooLong {
    /// The length given.
    pub len: usize,
}

/// Everything that describes the device to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Capacity in 4 KiB pages.
    pub capacity_pages: u64,
    /// Number of request queues.
    pub num_queues: u16,
    /// The largest queue size the device accepts.
    pub queue_size: u16,
    /// Whether the device rejects writes.
    pub read_only: bool,
    /// The serial number, NUL-padded.
    pub serial: [u8; SERIAL_LEN],
}

impl DeviceConfig {
    /// A device of `capacity_pages` pages with one queue of 256 entries, writable, no serial.
    pub fn new(capacity_pages: u64) -> Self {
        DeviceConfig {
            capacity_pages,
            num_queues: 1,
            queue_size: 256,
            read_only: false,
            serial: [0; SERIAL_LEN],
        }
    }

    /// Turns `serial` into the NUL-padded 20-byte form `GET_ID` returns.
    pub fn serial_from_str(serial: &str) -> Result<[u8; SERIAL_LEN], SerialTooLong> {
        let bytes = serial.as_bytes();
        if bytes.len() > SERIAL_LEN {
            return Err(SerialTooLong { len: bytes.len() });
        }
        let mut out = [0; SERIAL_LEN];
        out[..bytes.len()].copy_from_slice(bytes);
        Ok(out)
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_pages.saturating_mul(SECTORS_PER_PAGE)
    }

    /// The largest number of data descriptors in one request.
    pub fn seg_max(&self) -> u32 {
        (u32::from(self.queue_size).saturating_sub(2)).clamp(1, MAX_SEG_MAX)
    }

    /// The virtio features the device offers, including the vhost-user protocol-features bit
    /// and `VHOST_F_LOG_ALL` (dirty logging of guest memory, which live migration needs).
    pub fn features(&self) -> u64 {
        let mut bits = [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_MQ,
        ]
        .iter()
        .fold(0u64, |acc, bit| acc | 1 << bit);
        if self.read_only {
            bits |= 1 << VIRTIO_BLK_F_RO;
        } else {
            bits |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        bits | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits()
    }

    /// The vhost-user protocol features the device offers. `LOG_SHMFD` takes the dirty log
    /// of a live migration (`SET_LOG_BASE`); QEMU refuses to migrate a VM whose backend lacks it.
    pub fn protocol_features() -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    /// The configuration space, little-endian, as the guest reads it.
    pub fn config_space(&self) -> [u8; CONFIG_SPACE_LEN] {
        let mut space = [0u8; CONFIG_SPACE_LEN];
        let mut put = |offset: usize, bytes: &[u8]| {
            space[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        put(
            offset_of!(virtio_blk_config, capacity),
            &self.capacity_sectors().to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, size_max),
            &SIZE_MAX.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, seg_max),
            &self.seg_max().to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, blk_size),
            &BLK_SIZE.to_le_bytes(),
        );
        // Topology, in units of blk_size: one physical block per logical block, I/O of one page.
        put(offset_of!(virtio_blk_config, physical_block_exp), &[0]);
        put(offset_of!(virtio_blk_config, alignment_offset), &[0]);
        put(
            offset_of!(virtio_blk_config, min_io_size),
            &1u16.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, opt_io_size),
            &1u32.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, num_queues),
            &self.num_queues.to_le_bytes(),
        );
        if !self.read_only {
            put(
                offset_of!(virtio_blk_config, max_discard_sectors),
                &MAX_DISCARD_SECTORS.to_le_bytes(),
            );
            put(
                offset_of!(virtio_blk_config, max_discard_seg),
                &MAX_DISCARD_SEG.to_le_bytes(),
            );
            put(
                offset_of!(virtio_blk_config, discard_sector_alignment),
                &PAGE_SECTORS.to_le_bytes(),
            );
            put(
                offset_of!(virtio_blk_config, max_write_zeroes_sectors),
                &MAX_DISCARD_SECTORS.to_le_bytes(),
            );
            put(
                offset_of!(virtio_blk_config, max_write_zeroes_seg),
                &MAX_DISCARD_SEG.to_le_bytes(),
            );
            put(offset_of!(virtio_blk_config, write_zeroes_may_unmap), &[1]);
        }
        space
    }

    /// `size` bytes of the configuration space from `offset`; bytes past the filled part read
    /// as zeros, as they do on a device without the features that define them.
    pub fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = self.config_space();
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(CONFIG_SPACE_LEN);
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(CONFIG_SPACE_LEN);
        out[..end - start].copy_from_slice(&space[start..end]);
        out
    }
}

/// The names of the virtio feature bits set in `features` (`bit N` for ones without a name).
pub fn feature_names(features: u64) -> String {
    use virtio_bindings::bindings::virtio_blk::{
        VIRTIO_BLK_F_BARRIER, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_GEOMETRY, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
        VIRTIO_BLK_F_SCSI, VIRTIO_BLK_F_SECURE_ERASE, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_F_ZONED,
    };
    use virtio_bindings::bindings::virtio_config::{
        VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_IN_ORDER, VIRTIO_F_NOTIFICATION_DATA,
        VIRTIO_F_ORDER_PLATFORM, VIRTIO_F_RING_PACKED, VIRTIO_F_SR_IOV, VIRTIO_F_VERSION_1,
    };
    use virtio_bindings::bindings::virtio_ring::{
        VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
    };
    /// `VHOST_USER_F_PROTOCOL_FEATURES`.
    const PROTOCOL_FEATURES: u32 = 30;
    /// `VHOST_F_LOG_ALL`.
    const LOG_ALL: u32 = 26;
    const NAMES: [(u32, &str); 25] = [
        (VIRTIO_BLK_F_BARRIER, "BARRIER"),
        (VIRTIO_BLK_F_SIZE_MAX, "SIZE_MAX"),
        (VIRTIO_BLK_F_SEG_MAX, "SEG_MAX"),
        (VIRTIO_BLK_F_GEOMETRY, "GEOMETRY"),
        (VIRTIO_BLK_F_RO, "RO"),
        (VIRTIO_BLK_F_BLK_SIZE, "BLK_SIZE"),
        (VIRTIO_BLK_F_SCSI, "SCSI"),
        (VIRTIO_BLK_F_FLUSH, "FLUSH"),
        (VIRTIO_BLK_F_TOPOLOGY, "TOPOLOGY"),
        (VIRTIO_BLK_F_CONFIG_WCE, "CONFIG_WCE"),
        (VIRTIO_BLK_F_MQ, "MQ"),
        (VIRTIO_BLK_F_DISCARD, "DISCARD"),
        (VIRTIO_BLK_F_WRITE_ZEROES, "WRITE_ZEROES"),
        (VIRTIO_BLK_F_SECURE_ERASE, "SECURE_ERASE"),
        (VIRTIO_BLK_F_ZONED, "ZONED"),
        (VIRTIO_RING_F_INDIRECT_DESC, "INDIRECT_DESC"),
        (VIRTIO_RING_F_EVENT_IDX, "EVENT_IDX"),
        (LOG_ALL, "LOG_ALL"),
        (PROTOCOL_FEATURES, "PROTOCOL_FEATURES"),
        (VIRTIO_F_VERSION_1, "VERSION_1"),
        (VIRTIO_F_ACCESS_PLATFORM, "ACCESS_PLATFORM"),
        (VIRTIO_F_RING_PACKED, "RING_PACKED"),
        (VIRTIO_F_IN_ORDER, "IN_ORDER"),
        (VIRTIO_F_ORDER_PLATFORM, "ORDER_PLATFORM"),
        (VIRTIO_F_SR_IOV, "SR_IOV"),
    ];
    if features == 0 {
        return "none".to_owned();
    }
    let mut names = Vec::new();
    for bit in 0..64u32 {
        if features & (1u64 << bit) == 0 {
            continue;
        }
        match NAMES.iter().find(|(named, _)| *named == bit) {
            Some((_, name)) => names.push((*name).to_owned()),
            None if bit == VIRTIO_F_NOTIFICATION_DATA => names.push("NOTIFICATION_DATA".into()),
            None => names.push(format!("bit {bit}")),
        }
    }
    names.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn le32(space: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes(space[offset..offset + 4].try_into().unwrap())
    }

    #[test]
    fn config_space_describes_the_device() {
        let mut config = DeviceConfig::new(1024);
        config.num_queues = 4;
        let space = config.config_space();
        let capacity = u64::from_le_bytes(space[0..8].try_into().unwrap());
        assert_eq!(capacity, 1024 * 8);
        assert_eq!(le32(&space, offset_of!(virtio_blk_config, blk_size)), 4096);
        assert_eq!(le32(&space, offset_of!(virtio_blk_config, seg_max)), 254);
        assert_eq!(
            le32(&space, offset_of!(virtio_blk_config, size_max)),
            SIZE_MAX
        );
        let nq = offset_of!(virtio_blk_config, num_queues);
        assert_eq!(u16::from_le_bytes([space[nq], space[nq + 1]]), 4);
        assert_eq!(
            le32(
                &space,
                offset_of!(virtio_blk_config, discard_sector_alignment)
            ),
            8
        );
        assert_eq!(
            space[offset_of!(virtio_blk_config, write_zeroes_may_unmap)],
            1
        );
        assert_eq!(CONFIG_SPACE_LEN, 60);
    }

    #[test]
    fn read_only_device_offers_no_discard() {
        let mut config = DeviceConfig::new(1);
        config.read_only = true;
        let features = config.features();
        assert_ne!(features & 1 << VIRTIO_BLK_F_RO, 0);
        let names = feature_names(features);
        assert!(names.contains("RO") && names.contains("EVENT_IDX"));
        assert!(!names.contains("DISCARD"));
        assert_eq!(features & 1 << VIRTIO_BLK_F_DISCARD, 0);
        assert_eq!(features & 1 << VIRTIO_BLK_F_WRITE_ZEROES, 0);
    }

    #[test]
    fn config_reads_past_the_end_are_zero() {
        let config = DeviceConfig::new(1);
        assert_eq!(config.read_config(1000, 8), vec![0; 8]);
        assert_eq!(config.read_config(u32::MAX, 4), vec![0; 4]);
        assert_eq!(config.read_config(0, 8), 8u64.to_le_bytes().to_vec());
    }

    #[test]
    fn serial_longer_than_twenty_bytes_is_refused() {
        assert_eq!(
            DeviceConfig::serial_from_str("123456789012345678901"),
            Err(SerialTooLong { len: 21 })
        );
        let serial = DeviceConfig::serial_from_str("zram0").unwrap();
        assert_eq!(&serial[..6], b"zram0\0");
    }

    #[test]
    fn features_are_named_and_unknown_bits_numbered() {
        assert_eq!(feature_names(0), "none");
        assert_eq!(
            feature_names(1 << 32 | 1 << 29 | 1 << 13 | 1 << 1),
            "SIZE_MAX DISCARD EVENT_IDX VERSION_1"
        );
        assert_eq!(feature_names(1 << 63), "bit 63");
    }
}
