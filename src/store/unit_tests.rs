// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Tests of multi-page units (`unit.rs`) through the store's API.

use super::tests::{backing_file, TestWorkers};
use super::writeback::{WritebackMode, WritebackRequest};
use super::*;
use crate::pagegen::fill_page;

fn store_with_units(pages: u64, unit_pages: usize) -> PageStore {
    let s = PageStore::new(StoreConfig {
        capacity_pages: pages,
        algorithm: Algorithm::Lz4,
        level: None,
        mem_limit: None,
    })
    .unwrap();
    s.set_unit_max_pages(unit_pages).unwrap();
    s
}

/// Text-like pages that compress (no same-filled ones).
fn text_pages(seed: u64, first: u64, count: usize) -> Vec<[u8; PAGE_SIZE]> {
    (first..first + count as u64)
        .map(|index| {
            let mut page = [0u8; PAGE_SIZE];
            let mut n = seed;
            loop {
                n += 1;
                if fill_page(n, index, &mut page) == crate::pagegen::PageKind::Text {
                    break;
                }
            }
            page
        })
        .collect()
}

fn write_run(s: &PageStore, first: u64, pages: &[[u8; PAGE_SIZE]]) {
    s.write_pages_with(first, pages.len(), |i, buffer| {
        buffer.copy_from_slice(&pages[i]);
        Ok::<(), ()>(())
    })
    .unwrap()
    .unwrap();
}

fn assert_reads(s: &PageStore, first: u64, pages: &[[u8; PAGE_SIZE]]) {
    let mut out = [0u8; PAGE_SIZE];
    for (i, page) in pages.iter().enumerate() {
        let index = first + i as u64;
        s.read(index, &mut out).unwrap();
        assert!(out == *page, "page {index} reads back wrong");
    }
}

#[test]
fn an_aligned_run_is_stored_as_one_unit_and_reads_back() {
    let s = store_with_units(64, 16);
    let pages = text_pages(1, 16, 16);
    write_run(&s, 16, &pages);
    let units = s.stats().units;
    assert_eq!(
        (units.units_stored, units.unit_members),
        (1, 16),
        "{units:?}"
    );
    s.check_consistency().unwrap();
    assert_reads(&s, 16, &pages);
}

#[test]
fn rewrites_and_discards_take_members_out_and_the_last_one_frees_the_unit() {
    let s = store_with_units(64, 16);
    let pages = text_pages(2, 0, 16);
    write_run(&s, 0, &pages);
    let other = text_pages(3, 3, 1);
    write_run(&s, 3, &other);
    s.discard(5..7).unwrap();
    let units = s.stats().units;
    assert_eq!(
        (units.units_stored, units.unit_members),
        (1, 13),
        "{units:?}"
    );
    s.check_consistency().unwrap();
    let mut expect = pages.clone();
    expect[3] = other[0];
    expect[5] = [0; PAGE_SIZE];
    expect[6] = [0; PAGE_SIZE];
    assert_reads(&s, 0, &expect);
    s.discard(0..16).unwrap();
    let units = s.stats().units;
    assert_eq!(
        (units.units_stored, units.unit_members, units.unit_bytes),
        (0, 0, 0)
    );
    s.check_consistency().unwrap();
    s.compact();
    assert_eq!(s.stats().info.chunk_bytes, 0, "the unit's memory went back");
}

#[test]
fn a_unit_below_half_live_is_rewritten_page_by_page() {
    let s = store_with_units(64, 16);
    let pages = text_pages(4, 16, 16);
    write_run(&s, 16, &pages);
    // Eight members leave: still half live, still a unit.
    s.discard(16..24).unwrap();
    assert_eq!(s.stats().units.units_stored, 1);
    // The ninth takes it below half: the rest are stored page by page.
    s.discard(24..25).unwrap();
    let units = s.stats().units;
    assert_eq!(
        (
            units.units_stored,
            units.unit_members,
            units.partial_rewrites
        ),
        (0, 0, 1),
        "{units:?}"
    );
    s.check_consistency().unwrap();
    let mut expect = pages.clone();
    for page in &mut expect[..9] {
        *page = [0; PAGE_SIZE];
    }
    assert_reads(&s, 16, &expect);
}

#[test]
fn same_filled_pages_of_a_run_are_not_members() {
    let s = store_with_units(64, 8);
    let mut pages = text_pages(5, 8, 8);
    pages[2] = [0; PAGE_SIZE];
    pages[5].fill(0xab);
    write_run(&s, 8, &pages);
    let stats = s.stats();
    assert_eq!((stats.units.units_stored, stats.units.unit_members), (1, 6));
    assert_eq!(stats.mm.same_pages, 2);
    s.check_consistency().unwrap();
    assert_reads(&s, 8, &pages);
}

#[test]
fn an_incompressible_run_is_stored_page_by_page() {
    let s = store_with_units(64, 16);
    let pages: Vec<[u8; PAGE_SIZE]> = (0..16u64)
        .map(|i| {
            let mut page = [0u8; PAGE_SIZE];
            fill_page_of(crate::pagegen::PageKind::Random, i, &mut page);
            page
        })
        .collect();
    write_run(&s, 0, &pages);
    let stats = s.stats();
    assert_eq!((stats.units.units_stored, stats.mm.huge_pages), (0, 16));
    assert_reads(&s, 0, &pages);
}

fn fill_page_of(kind: crate::pagegen::PageKind, seed: u64, page: &mut [u8; PAGE_SIZE]) {
    let mut rng = crate::pagegen::SplitMix64::new(seed);
    crate::pagegen::fill_kind(kind, &mut rng, page);
}

#[test]
fn a_read_of_a_neighbour_is_served_from_the_decoded_unit() {
    let s = store_with_units(64, 16);
    let pages = text_pages(6, 0, 16);
    write_run(&s, 0, &pages);
    assert_reads(&s, 0, &pages);
    let units = s.stats().units;
    assert_eq!(units.read_bytes, 16 * PAGE_SIZE as u64);
    // The first read decodes a prefix, the second the whole unit; the rest are hits.
    assert_eq!(units.cache_hits, 14, "{units:?}");
    assert!(
        units.decompressed_bytes <= 18 * PAGE_SIZE as u64,
        "{units:?}"
    );
    // A random read of one member decodes no further than its page (lz4 stops early).
    let s = store_with_units(64, 16);
    write_run(&s, 0, &pages);
    let mut out = [0u8; PAGE_SIZE];
    s.read(2, &mut out).unwrap();
    let units = s.stats().units;
    assert!(units.decompressed_bytes < 4 * PAGE_SIZE as u64, "{units:?}");
}

#[test]
fn compaction_moves_unit_heads_and_the_units_still_read() {
    let s = store_with_units(4096, 4);
    let runs: Vec<Vec<[u8; PAGE_SIZE]>> = (0..512u64).map(|k| text_pages(k, k * 4, 4)).collect();
    for (k, run) in runs.iter().enumerate() {
        write_run(&s, k as u64 * 4, run);
    }
    // Free three units in four: their heads leave sparse chunks behind.
    for k in (0..512u64).filter(|k| k % 4 != 0) {
        s.discard(k * 4..k * 4 + 4).unwrap();
    }
    let before = s.mem_used_total();
    let given = s.compact();
    assert!(
        given > 0 && s.mem_used_total() < before,
        "compaction gave back {given} pages"
    );
    s.check_consistency().unwrap();
    for (k, run) in runs.iter().enumerate().step_by(4) {
        assert_reads(&s, k as u64 * 4, run);
    }
}

#[test]
fn units_through_the_workers_install_and_read_back() {
    let s = std::sync::Arc::new(
        PageStore::with_pending(
            StoreConfig {
                capacity_pages: 256,
                algorithm: Algorithm::Lz4,
                level: None,
                mem_limit: None,
            },
            PendingConfig {
                workers: 1,
                max_pending_pages: 64,
            },
        )
        .unwrap(),
    );
    s.set_unit_max_pages(16).unwrap();
    let workers = TestWorkers::start(&s);
    let runs: Vec<Vec<[u8; PAGE_SIZE]>> = (0..8u64).map(|k| text_pages(k, k * 16, 16)).collect();
    for (k, run) in runs.iter().enumerate() {
        write_run(&s, k as u64 * 16, run);
    }
    assert!(s.wait_drained(std::time::Duration::from_secs(10)));
    let units = s.stats().units;
    assert_eq!(
        (units.units_stored, units.unit_members),
        (8, 128),
        "{units:?}"
    );
    s.check_consistency().unwrap();
    for (k, run) in runs.iter().enumerate() {
        assert_reads(&s, k as u64 * 16, run);
    }
    // Below half live: a worker rewrites the rest.
    s.discard(0..9).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while s.stats().units.partial_rewrites == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(s.stats().units.units_stored, 7);
    s.check_consistency().unwrap();
    assert_reads(&s, 9, &runs[0][9..]);
    workers.stop();
}

#[test]
fn writeback_takes_members_out_of_their_unit_to_the_file() {
    let (_dir, backing) = backing_file();
    let s = store_with_units(64, 16).with_backing_file(backing);
    let pages = text_pages(7, 0, 16);
    write_run(&s, 0, &pages);
    s.mark_idle();
    // Once half the members have left for the file, the rest are rewritten page by page
    // (still idle) and go with the next pass.
    let mut written = 0;
    for _ in 0..3 {
        written += s
            .writeback(&WritebackRequest::new(WritebackMode::Idle))
            .unwrap()
            .written;
    }
    assert_eq!(written, 16);
    let stats = s.stats();
    assert_eq!(
        (stats.units.units_stored, stats.writeback.pages_on_file),
        (0, 16)
    );
    s.check_consistency().unwrap();
    assert_reads(&s, 0, &pages);
}

#[test]
fn recompression_moves_a_whole_unit_to_the_secondary_algorithm() {
    let s = store_with_units(256, 16)
        .with_secondary_algorithms(&[AlgorithmSpec {
            algorithm: Algorithm::Zstd,
            level: Some(9),
        }])
        .unwrap();
    let runs: Vec<Vec<[u8; PAGE_SIZE]>> = (0..4u64).map(|k| text_pages(k, k * 16, 16)).collect();
    for (k, run) in runs.iter().enumerate() {
        write_run(&s, k as u64 * 16, run);
    }
    s.discard(18..19).unwrap();
    let before = s.stats();
    let outcome = s.recompress(&RecompressRequest::default()).unwrap();
    assert_eq!(outcome.recompressed, 63, "{outcome:?}");
    let after = s.stats();
    assert_eq!(after.units.units_stored, 4);
    assert!(
        after.units.unit_bytes < before.units.unit_bytes,
        "zstd:9 is smaller"
    );
    assert_eq!(after.recompression.algorithms[1].pages, 63);
    s.check_consistency().unwrap();
    let mut expect = runs.concat();
    expect[18] = [0; PAGE_SIZE];
    assert_reads(&s, 0, &expect);
    // Nothing left above the units' priority: a second pass tries nothing.
    assert_eq!(
        s.recompress(&RecompressRequest::default()).unwrap().tried,
        0
    );
}

#[test]
fn a_member_past_its_share_of_the_stream_still_reads_right() {
    // Random pages first: the text pages' bytes sit far past their share of the stream,
    // so the first, partial gather is short and the read gathers the rest.
    let s = store_with_units(64, 16);
    let mut pages = text_pages(8, 0, 16);
    for (i, page) in pages.iter_mut().enumerate().take(8) {
        fill_page_of(crate::pagegen::PageKind::Random, i as u64, page);
    }
    write_run(&s, 0, &pages);
    assert_eq!(s.stats().units.units_stored, 1);
    let mut out = [0u8; PAGE_SIZE];
    for member in [8, 9, 12, 3] {
        // A fresh store per read: no decoded unit in this thread's cache helps.
        let s = store_with_units(64, 16);
        write_run(&s, 0, &pages);
        s.read(member, &mut out).unwrap();
        assert!(
            out == pages[usize::try_from(member).unwrap()],
            "member {member}"
        );
    }
}

#[test]
fn a_member_migrates_as_a_page_of_its_own() {
    let source = store_with_units(64, 16);
    let pages = text_pages(9, 16, 16);
    write_run(&source, 16, &pages);
    source.discard(20..21).unwrap();
    let destination = store_with_units(64, 1);
    let mut scratch = super::migrate::ExportScratch::default();
    for index in 0..64 {
        let page = source.export_slot(index, &mut scratch).unwrap();
        assert!(
            !matches!(page, super::migrate::StoredPage::Damaged),
            "page {index}"
        );
        destination.import_slot(index, page).unwrap();
    }
    let mut expect = pages.clone();
    expect[4] = [0; PAGE_SIZE];
    assert_reads(&destination, 16, &expect);
    assert_eq!(destination.stats().units.units_stored, 0);
    destination.check_consistency().unwrap();
    source.check_consistency().unwrap();
}

#[test]
fn a_read_request_over_a_unit_decodes_it_once() {
    let s = store_with_units(64, 16);
    let pages = text_pages(10, 16, 16);
    write_run(&s, 16, &pages);
    // Two 32 KiB requests over the unit, in order, as readahead sends them.
    let mut out = [0u8; PAGE_SIZE];
    for request in [16..24u64, 24..32] {
        s.read_ahead(request.clone());
        for index in request {
            s.read(index, &mut out).unwrap();
            assert!(out == pages[usize::try_from(index - 16).unwrap()]);
        }
    }
    let units = s.stats().units;
    assert_eq!(units.decompressed_bytes, 16 * PAGE_SIZE as u64, "{units:?}");
    assert_eq!(units.cache_hits, 15, "{units:?}");
    // A request of one page in the middle decodes through that page only.
    let s = store_with_units(64, 16);
    write_run(&s, 16, &pages);
    s.read_ahead(20..21);
    s.read(20, &mut out).unwrap();
    assert!(s.stats().units.decompressed_bytes < 8 * PAGE_SIZE as u64);
}
