// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Tests of a store on a state file: every slot state survives a restart, damaged entries
//! fail only their own pages, a file of another configuration is refused, and freed memory
//! leaves the file.

// Test data: truncating casts pick bytes and indices on purpose.
#![allow(clippy::cast_possible_truncation)]

use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::Arc;
use std::time::Duration;

use super::tests::TestWorkers;
use super::*;
use crate::pagegen::fill_page;

const PAGES: u64 = 512;

fn shm_file() -> tempfile::NamedTempFile {
    tempfile::Builder::new()
        .prefix("vuz-store-state")
        .tempfile_in("/dev/shm")
        .unwrap()
}

fn config(pages: u64) -> StoreConfig {
    StoreConfig {
        capacity_pages: pages,
        algorithm: Algorithm::Lz4,
        level: None,
        mem_limit: None,
    }
}

const POOL: PendingConfig = PendingConfig {
    workers: 2,
    max_pending_pages: 64,
};

fn zstd9() -> AlgorithmSpec {
    AlgorithmSpec {
        algorithm: Algorithm::Zstd,
        level: Some(9),
    }
}

/// Opens the store on `path` (with workers' pool, zstd:9 as its secondary) and recovers it.
fn open(path: &std::path::Path, pages: u64) -> (PageStore, StateStart) {
    let file = StateFile::open(path).unwrap();
    let mut store = PageStore::with_memory(config(pages), POOL, StoreMemory::State(file))
        .unwrap()
        .with_secondary_algorithms(&[zstd9()])
        .unwrap();
    let start = store.recover().unwrap();
    (store, start)
}

fn read(s: &PageStore, index: u64) -> Result<[u8; PAGE_SIZE], StoreError> {
    let mut page = [0u8; PAGE_SIZE];
    s.read(index, &mut page).map(|()| page)
}

/// Page `i`'s content for round `seed`: every kind the store keeps differently.
fn content(seed: u64, i: u64) -> [u8; PAGE_SIZE] {
    let mut page = [0u8; PAGE_SIZE];
    match (i + seed) % 7 {
        // A word that needs the FillWords table.
        0 => same_fill::fill(&mut page, 0x0123_4567_89ab_cdef ^ seed),
        1 => same_fill::fill(&mut page, 0x1111_1111 * (seed % 9)),
        // Incompressible: a huge page.
        2 => {
            let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i;
            for b in page.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
        }
        _ => {
            fill_page(seed, i, &mut page);
        }
    }
    page
}

fn model_of(s: &PageStore) -> Vec<[u8; PAGE_SIZE]> {
    (0..s.capacity_pages())
        .map(|i| read(s, i).unwrap())
        .collect()
}

#[test]
fn every_slot_state_survives_a_restart() {
    let tmp = shm_file();
    let (store, start) = open(tmp.path(), PAGES);
    assert_eq!(start, StateStart::Created);
    let store = Arc::new(store);
    let workers = TestWorkers::start(&store);
    for i in 0..PAGES {
        store
            .write_with(i, |p| {
                *p = content(1, i);
                Ok::<(), ()>(())
            })
            .unwrap()
            .unwrap();
    }
    assert!(store.wait_drained(Duration::from_secs(10)));
    let trained = store
        .train_zstd_dictionary(&TrainRequest::default())
        .unwrap();
    let outcome = store.recompress(&RecompressRequest::default()).unwrap();
    assert!(outcome.recompressed > 0, "some pages moved to zstd:9");
    for i in (0..PAGES).step_by(3) {
        store.write(i, &content(2, i)).unwrap();
    }
    store.discard(100..180).unwrap();
    store.compact();
    // Leave pages pending: workers paused, writes go to the pool.
    store.set_worker_hooks(WorkerHooks {
        paused: true,
        delay: Duration::ZERO,
    });
    for i in 200..230 {
        store
            .write_with(i, |p| {
                *p = content(3, i);
                Ok::<(), ()>(())
            })
            .unwrap()
            .unwrap();
    }
    let expect = model_of(&store);
    let stats = store.stats();
    assert!(stats.workers.pending_pages > 0, "pages are pending");
    assert!(stats.recompression.algorithms[1].pages > 0);
    drop(workers);
    drop(Arc::into_inner(store).unwrap());

    let (store, start) = open(tmp.path(), PAGES);
    let StateStart::Recovered(recovered) = start else {
        panic!("recovered, not {start:?}");
    };
    assert_eq!(recovered.damaged_pages, 0);
    assert_eq!(recovered.pages, stats.mm.orig_data_size / PAGE_SIZE as u64);
    let after = store.stats();
    assert_eq!(after.mm.orig_data_size, stats.mm.orig_data_size);
    assert_eq!(after.mm.compr_data_size, stats.mm.compr_data_size);
    assert_eq!(after.mm.same_pages, stats.mm.same_pages);
    assert_eq!(after.mm.huge_pages, stats.mm.huge_pages);
    assert_eq!(after.workers.pending_pages, stats.workers.pending_pages);
    assert_eq!(
        after.recompression.algorithms,
        stats.recompression.algorithms
    );
    assert_eq!(after.recompression.zstd_dictionaries, vec![trained.id]);
    assert_eq!(model_of(&store), expect, "every page reads back");
    store.check_consistency().unwrap();
    // The re-queued jobs finish in the new process.
    let store = Arc::new(store);
    let workers = TestWorkers::start(&store);
    assert!(store.wait_drained(Duration::from_secs(10)));
    assert_eq!(store.stats().workers.pending_pages, 0);
    assert_eq!(model_of(&store), expect);
    store.check_consistency().unwrap();
    drop(workers);
}

/// Page `i` of the table-word tests: one of five words the table holds, one inline word, or
/// compressible data.
fn table_page(i: u64) -> [u8; PAGE_SIZE] {
    let mut page = [0u8; PAGE_SIZE];
    match i % 7 {
        0..=4 => same_fill::fill(&mut page, 0x0123_4567_89ab_cdef ^ ((i % 7) << 60)),
        5 => same_fill::fill(&mut page, 0x4141_4141),
        _ => {
            fill_page(9, i, &mut page);
        }
    }
    page
}

#[test]
fn table_words_are_same_filled_with_or_without_a_state_file() {
    let anonymous = PageStore::new(config(64)).unwrap();
    let tmp = shm_file();
    let file = StateFile::open(tmp.path()).unwrap();
    let mut on_file =
        PageStore::with_memory(config(64), PendingConfig::INLINE, StoreMemory::State(file))
            .unwrap();
    assert_eq!(on_file.recover().unwrap(), StateStart::Created);
    for s in [&anonymous, &on_file] {
        for i in 0..64 {
            s.write(i, &table_page(i)).unwrap();
        }
    }
    let (a, f) = (anonymous.stats().mm, on_file.stats().mm);
    assert!(
        a.same_pages > 40,
        "{} same-filled pages of 64",
        a.same_pages
    );
    assert_eq!(f.same_pages, a.same_pages);
    assert_eq!(f.compr_data_size, a.compr_data_size);
    assert_eq!(
        f.mem_used_total,
        a.mem_used_total + PAGE_SIZE as u64,
        "the same, plus the fill-word region's one touched page"
    );
    for i in 0..64 {
        assert_eq!(read(&on_file, i).unwrap(), table_page(i), "page {i}");
    }
    on_file.check_consistency().unwrap();
}

#[test]
fn table_words_survive_a_restart_and_freed_entries_are_reused() {
    let tmp = shm_file();
    let (store, _) = open(tmp.path(), 64);
    for i in 0..64 {
        store.write(i, &table_page(i)).unwrap();
    }
    // Free one entry (its word stays in the region, stale): every page of word 4 goes.
    for i in (0..64).filter(|i| i % 7 == 4) {
        store.discard(i..i + 1).unwrap();
    }
    let expect = model_of(&store);
    let before = store.stats().mm;
    assert_eq!(store.fill_words.len(), 4);
    drop(store);

    let (store, start) = open(tmp.path(), 64);
    let StateStart::Recovered(recovered) = start else {
        panic!("{start:?}");
    };
    assert_eq!(recovered.damaged_pages, 0);
    assert_eq!(store.stats().mm.same_pages, before.same_pages);
    assert_eq!(
        store.fill_words.len(),
        4,
        "the stale word is not the table's"
    );
    assert_eq!(model_of(&store), expect, "every page reads back");
    store.check_consistency().unwrap();
    // New words take the freed entry first, then grow the table; all survive again.
    let mut page = [0u8; PAGE_SIZE];
    same_fill::fill(&mut page, 0x7777_0000_1234_5678);
    store.write(4, &page).unwrap();
    same_fill::fill(&mut page, 0x7777_0000_1234_5679);
    store.write(11, &page).unwrap();
    assert_eq!(store.fill_words.len(), 6);
    let expect = model_of(&store);
    let same = store.stats().mm.same_pages;
    drop(store);
    let (store, _) = open(tmp.path(), 64);
    assert_eq!(model_of(&store), expect);
    assert_eq!(store.stats().mm.same_pages, same);
    store.check_consistency().unwrap();
}

#[test]
fn a_full_fill_word_region_stores_the_page_as_an_object() {
    // One page: its region holds 2 MiB of words, more than any store can name at once, so
    // fill the table through the FillWords the store holds.
    let tmp = shm_file();
    let (store, _) = open(tmp.path(), 1);
    let words = state::Layout::new(1, POOL.max_pending_pages as u64)
        .fill_words
        .1
        / 8;
    let held: Vec<u64> = (0..words)
        .map(|w| store.fill_words.encode((1 << 62) | w).unwrap())
        .collect();
    let mut page = [0u8; PAGE_SIZE];
    same_fill::fill(&mut page, 0x0123_4567_89ab_cdef);
    store.write(0, &page).unwrap();
    assert_eq!(store.stats().mm.same_pages, 0, "a compressed object");
    assert_eq!(read(&store, 0).unwrap(), page);
    for p in held {
        store.fill_words.release(p);
    }
    store.write(0, &page).unwrap();
    assert_eq!(store.stats().mm.same_pages, 1, "room again: same-filled");
    assert_eq!(read(&store, 0).unwrap(), page);
    store.check_consistency().unwrap();
}

#[test]
fn damaged_entries_fail_only_their_own_pages() {
    let tmp = shm_file();
    let (store, _) = open(tmp.path(), 64);
    for i in 0..64 {
        store.write(i, &content(5, i)).unwrap();
    }
    store.write(7, &content(2, 7)).unwrap(); // a huge page
    let expect = model_of(&store);
    let slots = StateFile::open(tmp.path()).err(); // locked: the store holds it
    assert!(slots.is_some());
    drop(store);
    let layout = state::Layout::new(64, POOL.max_pending_pages as u64);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(tmp.path())
        .unwrap();
    let entry = |i: u64| {
        let mut b = [0u8; 8];
        file.read_exact_at(&mut b, layout.slots.0 + i * 8).unwrap();
        u64::from_le_bytes(b)
    };
    let put = |i: u64, v: u64| {
        file.write_all_at(&v.to_le_bytes(), layout.slots.0 + i * 8)
            .unwrap();
    };
    // Page 3: state 7, which no build writes. Page 5: a handle far past the slab.
    put(3, (entry(3) & !0b1110) | (7 << 1));
    let big = SlotEntry::huge(slot::MAX_HANDLE).bits();
    put(5, big);
    // Pages 7 and 8 name one object. Page 9 holds a stale lock bit.
    let (seven, nine) = (entry(7), entry(9));
    assert!(
        matches!((seven >> 1) & 0b111, 2 | 3),
        "page 7 holds an object"
    );
    put(8, seven);
    put(9, nine | 1);
    // Page 10: a pending buffer past the pool. Page 11: a table index whose region word was
    // never written (zero, an inline word). Page 12: an index past the region. Page 13: an
    // index whose region word fits an inline form. Page 14: a free index whose region word is
    // a table word (written before a killed write could publish it): a valid page.
    put(10, SlotEntry::pending(60_000, 1).bits());
    let table = |index: u64| SlotEntry::new(SlotState::SameFilled, (index << 2) | 0b11).bits();
    assert_eq!(entry(2), table(0), "page 2's word is the table's entry 0");
    put(11, table(1));
    put(12, table(layout.fill_words.1 / 8));
    put(13, table(5));
    put(14, table(6));
    let region = |index: u64, word: u64| {
        file.write_all_at(&word.to_le_bytes(), layout.fill_words.0 + index * 8)
            .unwrap();
    };
    region(5, 0x4141_4141_4141_4141);
    region(6, 0x0bad_c0de_1234_5678);
    let mut expect = expect;
    same_fill::fill(&mut expect[14], 0x0bad_c0de_1234_5678);

    let (store, start) = open(tmp.path(), 64);
    let StateStart::Recovered(recovered) = start else {
        panic!("{start:?}");
    };
    assert_eq!(recovered.damaged_pages, 8);
    assert_eq!(store.damaged_pages(), 8);
    for i in 0..64 {
        let got = read(&store, i);
        if [3, 5, 7, 8, 10, 11, 12, 13].contains(&i) {
            assert!(
                matches!(got, Err(StoreError::UnsupportedState { .. })),
                "page {i}"
            );
        } else {
            assert_eq!(got.unwrap(), expect[i as usize], "page {i}");
        }
    }
    store.check_consistency().unwrap();
    // A damaged page is replaced by a write or a discard.
    store.write(3, &content(6, 3)).unwrap();
    store.discard(5..6).unwrap();
    assert_eq!(read(&store, 3).unwrap(), content(6, 3));
    assert_eq!(read(&store, 5).unwrap(), [0; PAGE_SIZE]);
    assert_eq!(store.stats().info.damaged_pages, 6);
    store.check_consistency().unwrap();
}

#[test]
fn a_state_file_of_another_size_is_refused_untouched() {
    let tmp = shm_file();
    let (store, _) = open(tmp.path(), 64);
    store.write(1, &content(1, 1)).unwrap();
    drop(store);
    let before = std::fs::read(tmp.path()).unwrap();
    let file = StateFile::open(tmp.path()).unwrap();
    let error = PageStore::with_memory(config(128), POOL, StoreMemory::State(file)).unwrap_err();
    assert!(
        error.to_string().contains("64 pages") && error.to_string().contains("128 pages"),
        "{error}"
    );
    let file = StateFile::open(tmp.path()).unwrap();
    let mut store = PageStore::with_memory(config(64), POOL, StoreMemory::State(file)).unwrap();
    let error = store.recover().unwrap_err();
    assert!(
        error.to_string().contains("recompression algorithms"),
        "{error}"
    );
    drop(store);
    assert!(
        std::fs::read(tmp.path()).unwrap() == before,
        "the file is untouched"
    );
}

#[test]
fn recovery_reads_only_the_populated_parts_of_a_large_table() {
    let tmp = shm_file();
    let pages = super::MAX_CAPACITY_PAGES; // 1 TiB: a 2 GiB table region, sparse
    let blocks = || std::fs::metadata(tmp.path()).unwrap().blocks() * 512;
    let (store, _) = open(tmp.path(), pages);
    let at = [0, 1, pages / 2, pages / 2 + 700, pages - 1];
    for &i in &at {
        store.write(i, &content(3, i)).unwrap();
    }
    // A table page that held an entry, emptied without compaction: recovery gives it back.
    store.write(pages / 4, &content(3, 9)).unwrap();
    store.discard(pages / 4..pages / 4 + 1).unwrap();
    assert!(store.wait_drained(Duration::from_secs(10)));
    drop(store);
    let written = blocks();
    assert!(written < 16 << 20, "{written} bytes allocated");

    let (store, start) = open(tmp.path(), pages);
    let StateStart::Recovered(recovered) = start else {
        panic!("{start:?}");
    };
    assert_eq!(recovered.pages, at.len() as u64);
    assert!(
        recovered.elapsed < Duration::from_secs(1),
        "the scan skipped the holes: {:?}",
        recovered.elapsed
    );
    assert!(
        blocks() <= written,
        "recovery read no hole: {written} -> {}",
        blocks()
    );
    // Four table pages hold entries (0 and 1 share one).
    assert_eq!(store.slots.touched_ranges(0..pages as usize).count(), 4);
    for &i in &at {
        assert_eq!(read(&store, i).unwrap(), content(3, i), "page {i}");
    }
    assert_eq!(read(&store, pages / 4).unwrap(), [0; PAGE_SIZE]);
    assert_eq!(read(&store, pages / 2 + 1).unwrap(), [0; PAGE_SIZE]);
    store.check_consistency().unwrap();
    store.destroy_state().unwrap();
    assert_eq!(store.slots.touched_ranges(0..pages as usize).count(), 0);
}

#[test]
fn freed_memory_leaves_the_state_file() {
    let tmp = shm_file();
    let (store, _) = open(tmp.path(), 4096);
    let blocks = || std::fs::metadata(tmp.path()).unwrap().blocks() * 512;
    let empty = blocks();
    for i in 0..4096 {
        store.write(i, &content(7, i | 2)).unwrap(); // mostly compressible, some huge
    }
    let full = blocks();
    assert!(full > empty + (4 << 20), "{empty} -> {full}");
    let used = store.stats().info.state_file_bytes;
    assert_eq!(used, full);
    // Discard three quarters, scattered, then compact.
    for i in (0..4096).filter(|i| i % 4 != 0) {
        store.discard(i..i + 1).unwrap();
    }
    store.compact();
    let compacted = blocks();
    assert!(
        compacted < full / 2,
        "discard and compaction gave back {full} -> {compacted}"
    );
    store.check_consistency().unwrap();
    store.destroy_state().unwrap();
    let destroyed = blocks();
    assert!(destroyed <= empty + (64 << 10), "{empty} -> {destroyed}");
    assert_eq!(store.stats().mm.orig_data_size, 0);
}

#[test]
fn the_frontend_identity_survives_and_destroy_clears_it() {
    let tmp = shm_file();
    let (store, _) = open(tmp.path(), 16);
    assert!(store.has_state() && store.state_fd().is_some());
    assert_eq!(store.state_identity(), None);
    let id = FrontendIdentity {
        pid: 77,
        start_time: 123_456,
    };
    store.set_state_identity(Some(id)).unwrap();
    store.write(0, &content(1, 3)).unwrap();
    drop(store);
    let (store, start) = open(tmp.path(), 16);
    let StateStart::Recovered(r) = start else {
        panic!("{start:?}")
    };
    assert_eq!((r.identity, r.pages), (Some(id), 1));
    store.destroy_state().unwrap();
    drop(store);
    let (_, start) = open(tmp.path(), 16);
    let StateStart::Recovered(r) = start else {
        panic!("{start:?}")
    };
    assert_eq!((r.identity, r.pages), (None, 0));
    let anonymous = PageStore::new(config(4)).unwrap();
    assert!(!anonymous.has_state());
}

/// Opens the store on `state` with the backing file at `backing`: reopened as the header
/// records it, or opened anew when the header records none (what the daemon does).
fn open_with_backing(state: &std::path::Path, backing: &std::path::Path) -> PageStore {
    let file = StateFile::open(state).unwrap();
    let backing_file = match file.backing() {
        Some(r) => backing::BackingFile::reopen(&r.path, r.key, (r.dev, r.ino)).unwrap(),
        None => backing::BackingFile::open(backing).unwrap(),
    };
    let mut store = PageStore::with_memory(config(PAGES), POOL, StoreMemory::State(file))
        .unwrap()
        .with_secondary_algorithms(&[zstd9()])
        .unwrap()
        .with_backing_file(backing_file);
    store.recover().unwrap();
    store
}

#[test]
fn written_back_pages_survive_a_restart_on_the_same_backing_file() {
    let tmp = shm_file();
    let backing_path = shm_file();
    let store = open_with_backing(tmp.path(), backing_path.path());
    for i in 0..PAGES {
        store.write(i, &content(4, i)).unwrap();
    }
    store.mark_idle();
    let outcome = store
        .writeback(&WritebackRequest::new(WritebackMode::Idle))
        .unwrap();
    assert!(outcome.written > 100, "{outcome:?}");
    // Rewrite and discard some written-back pages: their file ranges are released.
    for i in (0..PAGES).step_by(5) {
        store.write(i, &content(8, i)).unwrap();
    }
    store.discard(10..20).unwrap();
    let expect = model_of(&store);
    let on_file = store.stats().writeback.pages_on_file;
    assert!(on_file > 0);
    drop(store);

    let store = open_with_backing(tmp.path(), backing_path.path());
    assert_eq!(store.stats().writeback.pages_on_file, on_file);
    assert_eq!(model_of(&store), expect, "every page reads back");
    store.check_consistency().unwrap();
    // The file keeps working: more writeback, then another restart.
    store.mark_idle();
    store
        .writeback(&WritebackRequest::new(WritebackMode::Idle))
        .unwrap();
    let expect = model_of(&store);
    drop(store);
    let store = open_with_backing(tmp.path(), backing_path.path());
    assert_eq!(model_of(&store), expect);
    store.check_consistency().unwrap();
}

#[test]
fn a_recorded_backing_file_opened_anew_is_refused() {
    let tmp = shm_file();
    let backing_path = shm_file();
    let store = open_with_backing(tmp.path(), backing_path.path());
    store.write(1, &content(4, 1)).unwrap();
    store.mark_idle();
    store
        .writeback(&WritebackRequest::new(WritebackMode::Idle))
        .unwrap();
    drop(store);
    // Opened anew (emptied): its pages are gone, and recovery says so.
    let file = StateFile::open(tmp.path()).unwrap();
    let fresh = backing::BackingFile::open(backing_path.path()).unwrap();
    let mut store = PageStore::with_memory(config(PAGES), POOL, StoreMemory::State(file))
        .unwrap()
        .with_secondary_algorithms(&[zstd9()])
        .unwrap()
        .with_backing_file(fresh);
    let error = store.recover().unwrap_err();
    assert!(
        error.to_string().contains("not reopened as it was"),
        "{error}"
    );
    drop(store);
    // Without a backing file at all: refused too.
    let file = StateFile::open(tmp.path()).unwrap();
    let mut store = PageStore::with_memory(config(PAGES), POOL, StoreMemory::State(file))
        .unwrap()
        .with_secondary_algorithms(&[zstd9()])
        .unwrap();
    let error = store.recover().unwrap_err();
    assert!(
        error.to_string().contains("start with that backing file"),
        "{error}"
    );
    // Another file at the recorded path is not the recorded one.
    let r = StateFile::open(tmp.path()).err();
    assert!(r.is_some(), "still held by the store above");
    drop(store);
    let recorded = StateFile::open(tmp.path()).unwrap().backing().unwrap();
    let other = shm_file();
    let error =
        backing::BackingFile::reopen(other.path(), recorded.key, (recorded.dev, recorded.ino))
            .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("is not the backing file the state file records"),
        "{error}"
    );
}

/// `pages` pages of text-like content for a unit at `first`.
fn unit_content(seed: u64, first: u64, pages: u64) -> Vec<[u8; PAGE_SIZE]> {
    (first..first + pages)
        .map(|i| {
            let mut page = [0u8; PAGE_SIZE];
            let mut n = seed;
            while fill_page(n, i, &mut page) != crate::pagegen::PageKind::Text {
                n += 1;
            }
            page
        })
        .collect()
}

fn write_unit(s: &PageStore, first: u64, pages: &[[u8; PAGE_SIZE]]) {
    s.write_pages_with(first, pages.len(), |i, p| {
        *p = pages[i];
        Ok::<(), ()>(())
    })
    .unwrap()
    .unwrap();
}

#[test]
fn units_survive_a_restart_and_a_damaged_head_fails_only_its_members() {
    let tmp = shm_file();
    let (store, _) = open(tmp.path(), PAGES);
    store.set_unit_max_pages(16).unwrap();
    let store = Arc::new(store);
    let workers = TestWorkers::start(&store);
    for k in 0..8u64 {
        write_unit(&store, k * 16, &unit_content(k, k * 16, 16));
    }
    assert!(store.wait_drained(Duration::from_secs(10)));
    // Partial units, a compaction that moves heads, a rewrite below half live.
    store.discard(3..5).unwrap();
    store.write(20, &content(9, 20)).unwrap();
    store.discard(32..42).unwrap();
    for k in 4..8u64 {
        store.discard(k * 16 + 1..k * 16 + 2).unwrap();
    }
    store.compact();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.stats().units.partial_rewrites == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(store.wait_drained(Duration::from_secs(10)));
    let expect = model_of(&store);
    let stats = store.stats();
    assert_eq!(stats.units.units_stored, 7, "{:?}", stats.units);
    store.check_consistency().unwrap();
    drop(workers);
    drop(Arc::into_inner(store).unwrap());

    let (store, start) = open(tmp.path(), PAGES);
    let StateStart::Recovered(recovered) = start else {
        panic!("recovered, not {start:?}");
    };
    assert_eq!(recovered.damaged_pages, 0);
    let after = store.stats();
    assert_eq!(after.units.units_stored, stats.units.units_stored);
    assert_eq!(after.units.unit_members, stats.units.unit_members);
    assert_eq!(after.mm.compr_data_size, stats.mm.compr_data_size);
    assert_eq!(model_of(&store), expect, "every page reads back");
    store.check_consistency().unwrap();
    // A unit written after the restart never takes a recovered unit's nonce (the readers'
    // caches name units by it).
    write_unit(&store, 128, &unit_content(20, 128, 16));
    let mut expect = expect;
    expect[128..144].copy_from_slice(&unit_content(20, 128, 16));
    assert_eq!(model_of(&store), expect);

    // Damage the head of the unit at 96: its pages count byte says 3.
    let entry96 = store.slots.peek(96).unwrap();
    assert_eq!(entry96.state(), SlotState::Unit);
    // SAFETY: we hold nothing, but no other thread uses the store: the head is live.
    let head = unsafe {
        store
            .alloc
            .object_start(entry96.unit_class(), entry96.handle())
    };
    // SAFETY: as above; byte 4 of the head is its page count.
    unsafe { head.add(4).write(3) };
    drop(store);
    let (store, start) = open(tmp.path(), PAGES);
    let StateStart::Recovered(recovered) = start else {
        panic!("recovered, not {start:?}");
    };
    assert_eq!(
        recovered.damaged_pages, 15,
        "the unit at 96 lost page 97 before"
    );
    for i in 0..PAGES {
        let got = read(&store, i);
        if (96..112).contains(&i) && i != 97 {
            assert!(
                matches!(got, Err(StoreError::UnsupportedState { .. })),
                "page {i}"
            );
        } else {
            assert!(got.unwrap() == expect[i as usize], "page {i}");
        }
    }
    store.check_consistency().unwrap();
}
