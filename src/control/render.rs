// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the control socket's statistics commands print: the readable `stats` table, the
//! `stats-json` object and the `writeback-limit`, `mem-limit` and `mem-used-max` lines. zram's
//! one-line files (`mm_stat`, `io_stat`, `bd_stat`) are rendered by the store's [`Stats`], byte
//! for byte as the kernel writes them, so the same lines serve the control socket and any other
//! reader.

use crate::pressure::{PressureStats, ShedMode};
use crate::store::{Stats, UnitStats, WritebackStats};
use crate::PAGE_SIZE;

/// The readable `stats` table: every figure with its unit, byte figures also in KiB/MiB/GiB.
pub fn stats_table(stats: &Stats) -> String {
    let m = &stats.mm;
    let i = &stats.io;
    let ratio = if m.compr_data_size == 0 {
        "n/a (nothing compressed)".to_owned()
    } else {
        format!(
            "{:.2} (orig_data_size / compr_data_size)",
            m.orig_data_size as f64 / m.compr_data_size as f64
        )
    };
    let limit = if m.mem_limit == 0 {
        "none".to_owned()
    } else {
        bytes(m.mem_limit)
    };
    let rows: [(&str, String); 18] = [
        ("disksize", bytes(stats.info.disksize)),
        ("comp_algorithm", stats.info.algorithm.clone()),
        ("orig_data_size", bytes(m.orig_data_size)),
        ("compr_data_size", bytes(m.compr_data_size)),
        ("compression ratio", ratio),
        ("mem_used_total", bytes(m.mem_used_total)),
        ("  slot table", bytes(stats.info.slot_table_bytes)),
        ("  chunks", bytes(stats.info.chunk_bytes)),
        ("  metadata", bytes(stats.info.metadata_bytes)),
        ("mem_limit", limit),
        ("mem_used_max", bytes(m.mem_used_max)),
        ("same_pages", pages(m.same_pages)),
        ("pages_compacted", pages(m.pages_compacted)),
        ("huge_pages", pages(m.huge_pages)),
        ("huge_pages_since", pages(m.huge_pages_since)),
        ("failed_reads", requests(i.failed_reads)),
        ("failed_writes", requests(i.failed_writes)),
        (
            "invalid_io / notify_free",
            format!("{} requests / {}", i.invalid_io, pages(i.notify_free)),
        ),
    ];
    let mut out = String::new();
    for (name, value) in rows {
        out.push_str(&format!("{name:<26} {value}\n"));
    }
    // Only a store on a state file has these.
    if stats.info.state_file_bytes > 0 || stats.info.damaged_pages > 0 {
        let state_rows = [
            ("state file", bytes(stats.info.state_file_bytes)),
            ("damaged pages", pages(stats.info.damaged_pages)),
        ];
        for (name, value) in state_rows {
            out.push_str(&format!("{name:<26} {value}\n"));
        }
    }
    let w = &stats.workers;
    let worker_rows = [
        ("workers", w.workers.to_string()),
        ("  pool size", pages(w.pool_pages)),
        ("  pending", pages(w.pending_pages)),
        ("  pending bytes", bytes(w.pending_bytes)),
        ("  pool memory", bytes(w.pool_resident_bytes)),
        ("  inline fallbacks", pages(w.inline_fallbacks)),
        ("  inline, CPUs busy", pages(w.inline_busy)),
        ("  stalled at the limit", pages(w.stalled_pages)),
    ];
    for (name, value) in worker_rows {
        out.push_str(&format!("{name:<26} {value}\n"));
    }
    for (i, worker) in w.per_worker.iter().enumerate() {
        out.push_str(&format!(
            "{:<26} {} in {} batches, busy {:.1} s\n",
            format!("  worker {i}"),
            pages(worker.pages),
            worker.batches,
            worker.busy_us as f64 / 1e6
        ));
    }
    let r = &stats.recompression;
    for algorithm in &r.algorithms {
        out.push_str(&format!(
            "{:<26} {}, {} compressed\n",
            format!("algorithm {} {}", algorithm.priority, algorithm.name),
            pages(algorithm.pages),
            bytes(algorithm.compr_bytes)
        ));
    }
    let recompress_rows = [
        ("recompression passes", r.passes.to_string()),
        ("  pages tried", pages(r.pages_tried)),
        ("  pages recompressed", pages(r.pages_recompressed)),
        ("  bytes saved", bytes(r.bytes_saved)),
        ("  pages incompressible", pages(r.pages_incompressible)),
        ("pages marked idle", pages(r.pages_marked_idle)),
        (
            "zstd dictionary / kept",
            format!(
                "{} / {}",
                r.zstd_dictionary.map_or("none".into(), |id| id.to_string()),
                r.zstd_dictionaries.len()
            ),
        ),
        ("  dictionary memory", bytes(r.dictionary_bytes)),
    ];
    for (name, value) in recompress_rows {
        out.push_str(&format!("{name:<26} {value}\n"));
    }
    out.push_str(&unit_rows(&stats.units));
    let wb = &stats.writeback;
    if !wb.enabled {
        out.push_str(&format!("{:<26} none\n", "backing file"));
        return out;
    }
    let writeback_rows = [
        (
            "bd_count / reads / writes",
            format!(
                "{} / {} / {} (4 KiB units)",
                wb.bd_count, wb.bd_reads, wb.bd_writes
            ),
        ),
        ("pages on the file", pages(wb.pages_on_file)),
        ("  their objects", bytes(wb.live_bytes)),
        ("  file on disk", bytes(wb.file_disk_bytes)),
        ("pages written back", pages(wb.pages_written_back)),
        ("  failed", pages(wb.failed_writebacks)),
        (
            "  failed writes to the file",
            wb.failed_file_writes.to_string(),
        ),
        ("  superseded in flight", pages(wb.superseded)),
        (
            "writeback passes / writes",
            format!("{} / {}", wb.passes, wb.write_calls),
        ),
        (
            "writeback_limit",
            if wb.limit_enabled {
                pages(wb.limit_pages)
            } else {
                "off".to_owned()
            },
        ),
    ];
    for (name, value) in writeback_rows {
        out.push_str(&format!("{name:<26} {value}\n"));
    }
    out
}

/// The `stats` table's rows on multi-page units: one line while they are off and none is
/// stored.
fn unit_rows(u: &UnitStats) -> String {
    let off = u.unit_max_bytes <= PAGE_SIZE as u64;
    if off && u.units_stored == 0 && u.read_bytes == 0 {
        return format!("{:<26} off (--unit-max 4K)\n", "multi-page units");
    }
    let max = if off {
        "off (--unit-max 4K; the units stored stay)".to_owned()
    } else {
        bytes(u.unit_max_bytes)
    };
    let amplification = if u.read_bytes == 0 {
        "— (nothing read from units)".to_owned()
    } else {
        format!("{:.1}× (decompressed / read)", u.read_amplification())
    };
    let rows = [
        ("multi-page units", max),
        ("  units stored", u.units_stored.to_string()),
        ("  member pages", pages(u.unit_members)),
        ("  compressed", bytes(u.unit_bytes)),
        ("  partial rewrites", u.partial_rewrites.to_string()),
        ("  read amplification", amplification),
        ("  cache hits", reads(u.cache_hits)),
    ];
    let mut out = String::new();
    for (name, value) in rows {
        out.push_str(&format!("{name:<26} {value}\n"));
    }
    out
}

/// The `stats` table's rows on the memory cgroup and memory pressure
/// ([`crate::pressure`]).
pub fn pressure_rows(stats: &PressureStats) -> String {
    let limit = |value: u64| {
        if value == 0 {
            "none".to_owned()
        } else {
            bytes(value)
        }
    };
    let mut rows = vec![
        ("cgroup memory limit", limit(stats.cgroup_limit)),
        ("  store's share of it", limit(stats.cgroup_budget)),
        ("pressure events", stats.pressure_events.to_string()),
        (
            "reclaim requests",
            format!(
                "{} ({} ctl reclaim, {} for the cgroup limit, {} for pressure)",
                stats.reclaim_requests(),
                stats.reclaim_requests_ctl,
                stats.reclaim_rounds_cgroup,
                stats.reclaim_rounds_pressure
            ),
        ),
    ];
    for mode in ShedMode::ALL {
        let name = match mode {
            ShedMode::Writeback => "shed by writeback",
            ShedMode::Recompress => "shed by recompression",
            ShedMode::Compact => "shed by compaction",
        };
        rows.push((
            name,
            format!("{}, {}", pages(stats.pages(mode)), bytes(stats.bytes(mode))),
        ));
    }
    let mut out = String::new();
    for (name, value) in rows {
        out.push_str(&format!("{name:<26} {value}\n"));
    }
    out
}

/// `1234567 bytes (1.2 MiB)`: the raw figure, and a readable one when it is 1 KiB or more.
pub(crate) fn bytes(value: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    match UNITS.iter().find(|(_, size)| value >= *size) {
        Some((unit, size)) => format!("{value} bytes ({:.1} {unit})", value as f64 / *size as f64),
        None => format!("{value} bytes"),
    }
}

fn pages(value: u64) -> String {
    if value == 1 {
        "1 page".to_owned()
    } else {
        format!("{value} pages")
    }
}

fn reads(value: u64) -> String {
    if value == 1 {
        "1 read".to_owned()
    } else {
        format!("{value} reads")
    }
}

fn requests(value: u64) -> String {
    if value == 1 {
        "1 request".to_owned()
    } else {
        format!("{value} requests")
    }
}

/// The `stats-json` body: every statistic as one JSON object, on one line.
pub fn stats_json(
    stats: &Stats,
    pressure: &crate::pressure::PressureStats,
) -> Result<String, serde_json::Error> {
    let mut value = serde_json::to_value(stats)?;
    if let Some(object) = value.as_object_mut() {
        object.insert("pressure".into(), serde_json::to_value(pressure)?);
    }
    let mut json = serde_json::to_string(&value)?;
    json.push('\n');
    Ok(json)
}

/// The `writeback-limit` body: `writeback_limit N pages`, or `writeback_limit off`.
pub fn writeback_limit(writeback: &WritebackStats) -> String {
    if writeback.limit_enabled {
        format!("writeback_limit {} pages\n", writeback.limit_pages)
    } else {
        "writeback_limit off\n".to_owned()
    }
}

/// The `mem-limit` line: `mem_limit 8388608 bytes (8.0 MiB)`, or `mem_limit off`.
pub fn mem_limit(limit: Option<u64>) -> String {
    match limit {
        Some(limit) => format!("mem_limit {}\n", bytes(limit)),
        None => "mem_limit off\n".to_owned(),
    }
}

/// The second `mem-limit` line when the memory cgroup's budget is below the user's limit:
/// `store_limit 8388608 bytes (8.0 MiB) under the memory cgroup's limit`.
pub fn store_limit(limit: u64) -> String {
    format!(
        "store_limit {} under the memory cgroup's limit\n",
        bytes(limit)
    )
}

/// The `mem-used-max reset` line: `mem_used_max 1234567 bytes (1.2 MiB)`.
pub fn mem_used_max(value: u64) -> String {
    format!("mem_used_max {}\n", bytes(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stats_table_gives_units_and_no_ratio_when_empty() {
        let empty = stats_table(&Stats::default());
        assert!(empty.contains("compression ratio          n/a"), "{empty}");
        assert!(!empty.contains("0.00"), "{empty}");
        assert!(empty.contains("mem_limit                  none"), "{empty}");

        let mut stats = Stats::default();
        stats.mm.orig_data_size = 3 << 20;
        stats.mm.compr_data_size = 1 << 20;
        stats.mm.same_pages = 1;
        let table = stats_table(&stats);
        assert!(table.contains("3145728 bytes (3.0 MiB)"), "{table}");
        assert!(
            table.contains("3.00 (orig_data_size / compr_data_size)"),
            "{table}"
        );
        assert!(table.contains("1 page\n"), "{table}");
        assert_eq!(bytes(1023), "1023 bytes");
        assert_eq!(bytes(1536), "1536 bytes (1.5 KiB)");
    }

    #[test]
    fn the_stats_table_gives_one_units_line_while_units_are_off() {
        let mut stats = Stats::default();
        stats.units.unit_max_bytes = 4096;

        let table = stats_table(&stats);

        assert!(
            table.contains("multi-page units           off (--unit-max 4K)\n"),
            "{table}"
        );
        assert!(!table.contains("units stored"), "{table}");
    }

    #[test]
    fn the_stats_table_has_the_units_rows_with_the_read_amplification() {
        let stats = Stats {
            units: UnitStats {
                unit_max_bytes: 64 << 10,
                units_stored: 3,
                unit_members: 40,
                unit_bytes: 50_000,
                partial_rewrites: 2,
                read_bytes: 10 * 4096,
                decompressed_bytes: 18 * 4096,
                cache_hits: 7,
            },
            ..Stats::default()
        };

        let table = stats_table(&stats);

        for row in [
            "multi-page units           65536 bytes (64.0 KiB)\n",
            "  units stored             3\n",
            "  member pages             40 pages\n",
            "  compressed               50000 bytes (48.8 KiB)\n",
            "  partial rewrites         2\n",
            "  read amplification       1.8× (decompressed / read)\n",
            "  cache hits               7 reads\n",
        ] {
            assert!(table.contains(row), "no {row:?} in:\n{table}");
        }
    }

    #[test]
    fn the_units_read_amplification_is_a_dash_before_any_read_and_units_kept_show_when_off() {
        let mut stats = Stats::default();
        stats.units.unit_max_bytes = 4096;
        stats.units.units_stored = 1;
        stats.units.unit_members = 2;

        let table = stats_table(&stats);

        assert!(
            table.contains("multi-page units           off (--unit-max 4K; the units stored stay)"),
            "{table}"
        );
        assert!(
            table.contains("  read amplification       — (nothing read from units)\n"),
            "{table}"
        );
    }

    #[test]
    fn stats_json_has_the_units_object() {
        let mut stats = Stats::default();
        stats.units.units_stored = 5;

        let json: serde_json::Value =
            serde_json::from_str(&stats_json(&stats, &PressureStats::default()).unwrap()).unwrap();

        assert_eq!(json["units"]["units_stored"], 5);
        for key in [
            "unit_max_bytes",
            "unit_members",
            "unit_bytes",
            "partial_rewrites",
            "read_bytes",
            "decompressed_bytes",
            "cache_hits",
        ] {
            assert!(json["units"].get(key).is_some(), "no units.{key} in {json}");
        }
    }

    #[test]
    fn the_stats_table_shows_the_state_file_only_when_there_is_one() {
        let anonymous = stats_table(&Stats::default());
        assert!(!anonymous.contains("state file"), "{anonymous}");
        let mut stats = Stats::default();
        stats.info.state_file_bytes = 3 << 20;
        stats.info.damaged_pages = 2;
        let table = stats_table(&stats);
        assert!(
            table.contains("state file                 3145728 bytes (3.0 MiB)"),
            "{table}"
        );
        assert!(
            table.contains("damaged pages              2 pages"),
            "{table}"
        );
    }
}
