// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vhost-user-zram: a compressed-RAM block device for virtual machines.
//!
//! The crate is zram's engine as a library plus a vhost-user-blk daemon around it. Its modules,
//! from the command line down:
//!
//! - [`cli`]: the command line: serving a device, and `ctl` for a running one.
//! - [`daemon`]: the daemon's lifecycle: sockets, the frontend connection, signals, shutdown.
//! - [`frontend`]: who the frontend is (its pid and start time), for the state file.
//! - [`systemd`]: readiness and the file descriptor store, spoken to systemd directly.
//! - [`control`]: the control socket's protocol (zram's sysfs knobs), its rendering apart.
//! - [`metrics`]: the statistics in the Prometheus text format, also served over HTTP.
//! - [`server`]: the bounded one-request server the control socket and the metrics run on.
//! - [`observed`]: what the control socket and the metrics report on, in one value.
//! - [`blk`]: the virtio-blk request path and the vhost-user backend.
//! - [`workers`]: the compression workers (kcompressd) that compress queued writes.
//! - [`writeback`]: the idle clock and the automatic writeback policies.
//! - [`pressure`]: the memory cgroup's limit and host memory pressure, honoured by shedding.
//! - [`recompress`]: the background recompressor that moves idle pages to a stronger algorithm.
//! - [`migrating`]: the daemon's migrations: `--incoming`, `ctl migrate`, the queue hooks.
//! - [`migrate`]: live migration of the pages, daemon to daemon.
//! - [`stop`]: the one way to stop a thread, and the groups of threads joined within a bound.
//! - [`store`]: the compressed page store: slots, allocator, writeback, limit and statistics.
//! - [`codec`]: the page compressors (lz4, zstd, raw DEFLATE, IAA) behind one trait.
//! - [`pagegen`]: a deterministic generator of swap-like pages for tests and benchmarks.

pub mod blk;
pub mod cli;
pub mod codec;
pub mod control;
pub mod daemon;
pub mod frontend;
pub mod metrics;
pub mod migrate;
pub mod migrating;
pub mod observed;
pub mod pagegen;
pub mod pressure;
pub mod recompress;
pub mod server;
pub mod stop;
pub mod store;
pub mod systemd;
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
