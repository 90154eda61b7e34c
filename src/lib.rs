// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vhost-user-zram: a compressed-RAM block device for virtual machines.
//!
//! The crate is zram's engine as a library plus a vhost-user-blk daemon around it:
//!
//! - [`store`]: the compressed page store — the slot table, same-filled page detection, the
//!   size-class slab allocator (our zsmalloc), the memory limit and zram's statistics.
//! - [`codec`]: the page compressors (lz4, zstd, raw DEFLATE) behind one trait.
//! - [`workers`]: the compression workers (kcompressd) that compress queued writes.
//! - [`recompress`]: the background recompressor that moves idle pages to a stronger algorithm.
//! - [`blk`]: the virtio-blk request path and the vhost-user backend.
//! - [`pagegen`]: a deterministic generator of swap-like pages for tests and benchmarks.

pub mod blk;
pub mod cli;
pub mod codec;
pub mod control;
pub mod daemon;
pub mod metrics;
pub mod observed;
pub mod pagegen;
pub mod recompress;
pub mod server;
pub mod stop;
pub mod store;
pub mod workers;
pub mod writeback;

/// The store's unit: one 4 KiB page, as zram uses on x86-64.
pub const PAGE_SIZE: usize = 4096;

/// The virtio-blk unit: one 512-byte sector.
pub const SECTOR_SIZE: usize = 512;

/// Sectors per page.
pub const SECTORS_PER_PAGE: u64 = (PAGE_SIZE / SECTOR_SIZE) as u64;

/// [`PAGE_SIZE`] as `u64`, for byte-offset arithmetic.
pub const PAGE_BYTES: u64 = PAGE_SIZE as u64;

/// [`SECTOR_SIZE`] as `u64`, for byte-offset arithmetic.
pub const SECTOR_BYTES: u64 = SECTOR_SIZE as u64;
