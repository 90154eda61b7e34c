// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Statistics with zram's names and meanings (Documentation/admin-guide/blockdev/zram.rst).
//!
//! `mm_stat` and `io_stat` print byte for byte what zram's sysfs files print, so scripts written
//! for zram read them unchanged.

use std::sync::atomic::{AtomicU64, Ordering};

use super::slot::MAX_SECONDARY;

/// zram's `mm_stat`: memory use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MmStat {
    /// Uncompressed size of the data stored (same-filled pages included), bytes.
    pub orig_data_size: u64,
    /// Compressed size of the data stored (a huge page counts as a full page), bytes.
    pub compr_data_size: u64,
    /// Every byte the store holds from the OS: chunks, slot table, metadata.
    pub mem_used_total: u64,
    /// The memory limit in bytes; 0 when there is none.
    pub mem_limit: u64,
    /// The most memory the store has held, bytes.
    pub mem_used_max: u64,
    /// Pages stored as one repeated word, with no allocation.
    pub same_pages: u64,
    /// Pages given back to the OS by compaction.
    pub pages_compacted: u64,
    /// Pages stored raw because they did not compress enough.
    pub huge_pages: u64,
    /// Huge pages ever stored.
    pub huge_pages_since: u64,
}

/// zram's `io_stat`: failures and frees.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct IoStat {
    /// Reads that failed.
    pub failed_reads: u64,
    /// Writes that failed (memory limit included).
    pub failed_writes: u64,
    /// Requests refused as malformed or out of range.
    pub invalid_io: u64,
    /// Pages freed by discard (the guest's swap-slot frees arrive as discards).
    pub notify_free: u64,
}

/// Facts about the store that zram keeps in other sysfs files.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct StoreInfo {
    /// The device size in bytes (zram's `disksize`).
    pub disksize: u64,
    /// The compression algorithm (zram's `comp_algorithm`).
    pub algorithm: String,
    /// Bytes of the slot table.
    pub slot_table_bytes: u64,
    /// Bytes of the allocator's live chunks.
    pub chunk_bytes: u64,
    /// Bytes of allocator and same-fill metadata.
    pub metadata_bytes: u64,
    /// Bytes the state file occupies in memory (`st_blocks` × 512; 0 without one).
    pub state_file_bytes: u64,
    /// Pages whose slot entry recovery found damaged: they read as I/O errors until written
    /// or discarded.
    pub damaged_pages: u64,
}

/// The compression workers (kcompressd) and their pending pool.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct WorkerStats {
    /// Compression worker threads (0: writes compress on the queue threads).
    pub workers: u64,
    /// Pages the pending pool holds at most (`--max-pending`).
    pub pool_pages: u64,
    /// Pages written by the guest and not yet compressed.
    pub pending_pages: u64,
    /// Their bytes (`pending_pages` × 4096), part of `mem_used_total`.
    pub pending_bytes: u64,
    /// Bytes of pool memory held from the OS (part of `mem_used_total`).
    pub pool_resident_bytes: u64,
    /// Writes compressed on the queue thread because the pool was full.
    pub inline_fallbacks: u64,
    /// Writes compressed on the queue thread because the pool was filling and every CPU was
    /// busy (queue threads serving, workers compressing).
    pub inline_busy: u64,
    /// Pages waiting because the memory limit refused their compressed object.
    pub stalled_pages: u64,
    /// Per worker: pages compressed, batches and busy time.
    pub per_worker: Vec<WorkerStat>,
}

/// One compression worker's figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct WorkerStat {
    /// Pages compressed (installed or dropped because a later write superseded them).
    pub pages: u64,
    /// Batches taken from the queue.
    pub batches: u64,
    /// Time spent compressing and installing, microseconds.
    pub busy_us: u64,
}

/// Recompression (zram's `recomp_algorithm` and `recompress`) and idle marking.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RecompressStats {
    /// Per algorithm, by priority: the primary first, then each secondary algorithm.
    pub algorithms: Vec<AlgorithmStat>,
    /// Pages a secondary algorithm tried to shrink (zram counts `num_recomp_pages` this way).
    pub pages_tried: u64,
    /// Pages replaced by a smaller object from a secondary algorithm.
    pub pages_recompressed: u64,
    /// Bytes of compressed data those replacements saved (`compr_data_size` before − after).
    pub bytes_saved: u64,
    /// Pages no secondary algorithm shrank, marked so that they are not tried again.
    pub pages_incompressible: u64,
    /// Recompression passes run (by `recompress` or the background recompressor).
    pub passes: u64,
    /// Pages marked idle by `idle` commands and the background recompressor's sweeps.
    pub pages_marked_idle: u64,
    /// IDs of the zstd dictionaries kept, oldest first (pages made with any still decode).
    pub zstd_dictionaries: Vec<u32>,
    /// The dictionary new zstd pages use, if any.
    pub zstd_dictionary: Option<u32>,
    /// Bytes of the dictionaries (part of `mem_used_total`).
    pub dictionary_bytes: u64,
}

/// The pages one algorithm holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct AlgorithmStat {
    /// 0 for the primary algorithm, 1 to 3 for the secondary ones (zram's priority).
    pub priority: u64,
    /// The algorithm's name, with its level when it has one (`zstd:level=9`).
    pub name: String,
    /// Compressed pages it holds (same-filled and huge pages hold no algorithm).
    pub pages: u64,
    /// Their compressed bytes.
    pub compr_bytes: u64,
}

/// Writeback to the backing file (zram's `bd_stat` and more).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct WritebackStats {
    /// Whether the store has a backing file.
    pub enabled: bool,
    /// zram's `bd_count`: 4 KiB blocks of the file holding written-back data.
    pub bd_count: u64,
    /// zram's `bd_reads`: 4 KiB units read back from the file.
    pub bd_reads: u64,
    /// zram's `bd_writes`: 4 KiB blocks written to the file.
    pub bd_writes: u64,
    /// Pages whose data lies on the file now.
    pub pages_on_file: u64,
    /// Bytes of those pages' objects (what RAM held for them).
    pub live_bytes: u64,
    /// Bytes the file occupies on its filesystem (`st_blocks` × 512).
    pub file_disk_bytes: u64,
    /// Pages written back since start.
    pub pages_written_back: u64,
    /// Pages whose writeback failed (they stay in RAM).
    pub failed_writebacks: u64,
    /// Writes to the backing file that failed (one a batch; their pages are in
    /// `failed_writebacks`).
    pub failed_file_writes: u64,
    /// Pages rewritten or discarded while their writeback was in flight (their new content
    /// stays; the file copy is dropped).
    pub superseded: u64,
    /// Write system calls made.
    pub write_calls: u64,
    /// Blocks given back to the filesystem (hole punching).
    pub punched_blocks: u64,
    /// Writeback passes run.
    pub passes: u64,
    /// Whether the writeback limit is enforced (zram's `writeback_limit_enable`).
    pub limit_enabled: bool,
    /// Pages writeback may still write (zram's `writeback_limit`).
    pub limit_pages: u64,
}

/// Everything `stats` reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    /// Memory use.
    pub mm: MmStat,
    /// Failures and frees.
    #[serde(default)]
    pub io: IoStat,
    /// Device facts.
    #[serde(default)]
    pub info: StoreInfo,
    /// Compression workers.
    #[serde(default)]
    pub workers: WorkerStats,
    /// Recompression and idle marking.
    #[serde(default)]
    pub recompression: RecompressStats,
    /// Writeback to the backing file.
    #[serde(default)]
    pub writeback: WritebackStats,
    /// Multi-page units.
    #[serde(default)]
    pub units: UnitStats,
}

/// Multi-page units: writes of several aligned pages compressed as one object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct UnitStats {
    /// The largest unit, bytes (`--unit-max`; 4096: units are off).
    pub unit_max_bytes: u64,
    /// Units stored (each one compressed object).
    pub units_stored: u64,
    /// Pages stored as members of a unit.
    pub unit_members: u64,
    /// Bytes of the units' compressed streams (part of `compr_data_size`).
    pub unit_bytes: u64,
    /// Units the workers rewrote page by page because too few of their members were left.
    pub partial_rewrites: u64,
    /// Bytes read from members of units.
    pub read_bytes: u64,
    /// Bytes decompressed to serve those reads (a reading thread keeps its last units
    /// decoded, so neighbouring reads decompress nothing).
    pub decompressed_bytes: u64,
    /// Reads of a member served from a reading thread's decoded units.
    pub cache_hits: u64,
}

impl UnitStats {
    /// Bytes decompressed per byte read from units (1.0: no amplification; 0 before any read).
    pub fn read_amplification(&self) -> f64 {
        if self.read_bytes == 0 {
            0.0
        } else {
            // Display only.
            #[allow(clippy::cast_precision_loss)]
            let ratio = self.decompressed_bytes as f64 / self.read_bytes as f64;
            ratio
        }
    }
}

/// An `mm_stat` line that is not nine numbers.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("'{line}' is not an mm_stat line of nine numbers")]
pub struct BadMmStatLine {
    /// The line, trimmed.
    pub line: String,
}

impl std::str::FromStr for MmStat {
    type Err = BadMmStatLine;

    /// Parses an `mm_stat` line as zram (or [`Stats::mm_stat_line`]) prints it.
    fn from_str(line: &str) -> Result<MmStat, BadMmStatLine> {
        let bad = || BadMmStatLine {
            line: line.trim().to_owned(),
        };
        let numbers: Vec<u64> = line
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map_err(|_| bad())?;
        let [orig_data_size, compr_data_size, mem_used_total, mem_limit, mem_used_max, same_pages, pages_compacted, huge_pages, huge_pages_since] =
            numbers[..]
        else {
            return Err(bad());
        };
        Ok(MmStat {
            orig_data_size,
            compr_data_size,
            mem_used_total,
            mem_limit,
            mem_used_max,
            same_pages,
            pages_compacted,
            huge_pages,
            huge_pages_since,
        })
    }
}

impl Stats {
    /// The `mm_stat` line, exactly as zram prints it (with its trailing newline).
    pub fn mm_stat_line(&self) -> String {
        let m = &self.mm;
        format!(
            "{:8} {:8} {:8} {:8} {:8} {:8} {:8} {:8} {:8}\n",
            m.orig_data_size,
            m.compr_data_size,
            m.mem_used_total,
            m.mem_limit,
            m.mem_used_max,
            m.same_pages,
            m.pages_compacted,
            m.huge_pages,
            m.huge_pages_since
        )
    }

    /// The `bd_stat` line, exactly as zram prints it (with its trailing newline).
    pub fn bd_stat_line(&self) -> String {
        let w = &self.writeback;
        format!("{:8} {:8} {:8}\n", w.bd_count, w.bd_reads, w.bd_writes)
    }

    /// The `io_stat` line, exactly as zram prints it (with its trailing newline).
    pub fn io_stat_line(&self) -> String {
        let i = &self.io;
        format!(
            "{:8} {:8} {:8} {:8}\n",
            i.failed_reads, i.failed_writes, i.invalid_io, i.notify_free
        )
    }
}

/// Shards of the counters: each thread updates its own cache line, so queue threads and
/// workers do not contend on shared counters; readers sum the shards.
const SHARDS: usize = 16;

/// One shard of the store's counters. Gauges (pages stored, bytes) go up in one shard and down
/// in another, so a shard's value alone is meaningless; the wrapping sum over all shards is
/// exact.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct CounterShard {
    pub pages_stored: AtomicU64,
    pub compr_data_size: AtomicU64,
    pub same_pages: AtomicU64,
    pub pages_compacted: AtomicU64,
    pub huge_pages: AtomicU64,
    pub huge_pages_since: AtomicU64,
    pub failed_reads: AtomicU64,
    pub failed_writes: AtomicU64,
    pub invalid_io: AtomicU64,
    pub notify_free: AtomicU64,
    pub pending_pages: AtomicU64,
    pub inline_fallbacks: AtomicU64,
    pub inline_busy: AtomicU64,
    /// Compressed pages and their bytes, by the priority of the algorithm holding them.
    pub algorithm_pages: [AtomicU64; MAX_SECONDARY + 1],
    pub algorithm_bytes: [AtomicU64; MAX_SECONDARY + 1],
    pub recompress_tried: AtomicU64,
    pub recompressed: AtomicU64,
    pub recompress_saved: AtomicU64,
    pub recompress_incompressible: AtomicU64,
    pub recompress_passes: AtomicU64,
    pub marked_idle: AtomicU64,
    /// Pages whose data lies on the backing file.
    pub pages_on_file: AtomicU64,
    pub written_back: AtomicU64,
    pub writeback_failed: AtomicU64,
    pub writeback_superseded: AtomicU64,
    pub writeback_passes: AtomicU64,
    /// Slots in the Invalid state (damaged entries recovery found).
    pub damaged_pages: AtomicU64,
    pub units_stored: AtomicU64,
    pub unit_members: AtomicU64,
    pub unit_bytes: AtomicU64,
    pub unit_rewrites: AtomicU64,
    pub unit_read_bytes: AtomicU64,
    pub unit_decompressed_bytes: AtomicU64,
    pub unit_cache_hits: AtomicU64,
}

/// The store's live counters.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    shards: [CounterShard; SHARDS],
    /// The high-water mark of `mem_used_total` (updated only when it rises).
    pub mem_used_max: AtomicU64,
}

thread_local! {
    static SHARD: usize = next_shard();
}

fn next_shard() -> usize {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS
}

impl Counters {
    /// The calling thread's shard.
    pub fn local(&self) -> &CounterShard {
        &self.shards[SHARD.with(|s| *s)]
    }

    /// The sum of one counter over every shard.
    pub fn sum(&self, counter: impl Fn(&CounterShard) -> &AtomicU64) -> u64 {
        self.shards
            .iter()
            .fold(0u64, |total, shard| total.wrapping_add(get(counter(shard))))
    }

    /// Raises `mem_used_max` to `value` if it is higher; a plain load when it is not, so the
    /// common case writes no shared cache line.
    pub fn note_mem_used(&self, value: u64) {
        if value > self.mem_used_max.load(Ordering::Relaxed) {
            self.mem_used_max.fetch_max(value, Ordering::Relaxed);
        }
    }
}

/// Adds `value` to a counter.
pub(crate) fn add(counter: &AtomicU64, value: u64) {
    if value != 0 {
        counter.fetch_add(value, Ordering::Relaxed);
    }
}

/// Subtracts `value` from a counter (wrapping: a shard of a gauge may go below zero).
pub(crate) fn sub(counter: &AtomicU64, value: u64) {
    if value != 0 {
        counter.fetch_sub(value, Ordering::Relaxed);
    }
}

/// Reads a counter.
pub(crate) fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_match_zram_sysfs_format() {
        let mut stats = Stats::default();
        stats.mm.orig_data_size = 4096;
        stats.mm.mem_used_total = 123456789;
        stats.io.notify_free = 3;
        assert_eq!(
            stats.mm_stat_line(),
            "    4096        0 123456789        0        0        0        0        0        0\n"
        );
        assert_eq!(
            stats.io_stat_line(),
            "       0        0        0        3\n"
        );
        assert_eq!(stats.mm_stat_line().split_whitespace().count(), 9);
        assert_eq!(stats.mm_stat_line().parse::<MmStat>(), Ok(stats.mm));
    }

    #[test]
    fn mm_stat_lines_parse_as_zram_prints_them() {
        let line =
            "  4096000  1024000  1200000        0  1300000      250        3       40       41\n";
        let mm: MmStat = line.parse().unwrap();
        assert_eq!(mm.orig_data_size, 4_096_000);
        assert_eq!(mm.mem_used_total, 1_200_000);
        assert_eq!(mm.same_pages, 250);
        assert_eq!(mm.huge_pages_since, 41);
        assert!("1 2 3".parse::<MmStat>().is_err());
        assert!("1 2 3 4 5 6 7 8 x".parse::<MmStat>().is_err());
    }
}
