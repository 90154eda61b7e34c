// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Writeback and the idle clock, on a real backing file in a temporary directory.
#![allow(clippy::cast_possible_truncation)]

use std::sync::Arc;
use std::time::Duration;

use super::tests::backing_file;
use super::*;
use crate::pagegen::fill_page;

const PAGES: u64 = 512;

fn store_with_file(pages: u64) -> (tempfile::TempDir, PageStore) {
    let (dir, backing) = backing_file();
    let store = PageStore::new(StoreConfig {
        capacity_pages: pages,
        algorithm: Algorithm::Lz4,
        level: None,
        mem_limit: None,
    })
    .unwrap()
    .with_backing_file(backing);
    (dir, store)
}

fn page(seed: u64, index: u64) -> [u8; PAGE_SIZE] {
    let mut page = [0u8; PAGE_SIZE];
    fill_page(seed, index, &mut page);
    page
}

fn fill(store: &PageStore, seed: u64) {
    for index in 0..store.capacity_pages() {
        store.write(index, &page(seed, index)).unwrap();
    }
}

fn verify(store: &PageStore, seed: u64) {
    let mut out = [0u8; PAGE_SIZE];
    for index in 0..store.capacity_pages() {
        store.read(index, &mut out).unwrap();
        assert!(out == page(seed, index), "page {index} differs");
    }
}

/// Pages that hold an allocator object (neither empty nor same-filled).
fn object_pages(store: &PageStore) -> u64 {
    let mm = store.stats().mm;
    mm.orig_data_size / PAGE_SIZE as u64 - mm.same_pages
}

#[test]
fn idle_pages_go_to_the_file_and_read_back() {
    let (_dir, s) = store_with_file(PAGES);
    fill(&s, 1);
    let objects = object_pages(&s);
    let before = s.stats();
    assert!(
        objects > PAGES / 2,
        "the generator makes mostly compressible pages"
    );

    assert_eq!(s.mark_idle(), PAGES);
    let outcome = s
        .writeback(&WritebackRequest::new(WritebackMode::Idle))
        .unwrap();

    assert_eq!(outcome.written, objects, "{outcome}");
    assert_eq!(outcome.bytes, before.mm.compr_data_size);
    let after = s.stats();
    assert!(
        after.mm.mem_used_total < before.mm.mem_used_total / 4,
        "mem_used_total {} -> {}",
        before.mm.mem_used_total,
        after.mm.mem_used_total
    );
    assert_eq!(after.mm.compr_data_size, 0);
    assert_eq!(after.mm.huge_pages, 0);
    assert_eq!(after.mm.orig_data_size, before.mm.orig_data_size);
    let w = &after.writeback;
    assert_eq!((w.pages_on_file, w.pages_written_back), (objects, objects));
    assert!(w.bd_count > 0 && w.bd_writes >= w.bd_count, "{w:?}");
    assert_eq!(w.live_bytes, outcome.bytes);
    assert_eq!(after.bd_stat_line().split_whitespace().count(), 3);
    s.check_consistency().unwrap();

    verify(&s, 1);
    let w = s.stats().writeback;
    assert!(
        w.bd_reads >= objects,
        "every page came from the file: {w:?}"
    );
    assert_eq!(
        w.pages_on_file, objects,
        "a page read back stays on the file"
    );
    // Writeback again finds nothing: reading cleared the idle flags, and the pages are gone.
    s.mark_idle();
    let again = s
        .writeback(&WritebackRequest::new(WritebackMode::Idle))
        .unwrap();
    assert_eq!(again.written, 0);
}

#[test]
fn rewriting_and_discarding_give_file_space_back() {
    let (_dir, s) = store_with_file(PAGES);
    fill(&s, 2);
    s.writeback(&WritebackRequest {
        mode: WritebackMode::All,
        pages: Some((0, PAGES)),
        max_pages: None,
    })
    .unwrap();
    let on_file = s.stats().writeback;
    assert!(on_file.pages_on_file > 0);

    for index in 0..PAGES / 2 {
        s.write(index, &page(3, index)).unwrap();
    }
    s.discard(PAGES / 2..PAGES).unwrap();

    let w = s.stats().writeback;
    assert_eq!((w.pages_on_file, w.live_bytes), (0, 0), "{w:?}");
    // Only the open block (kept for the next batch to continue in) stays on disk.
    assert!(w.bd_count <= 1 && w.file_disk_bytes <= 4096, "{w:?}");
    assert!(w.punched_blocks + 1 >= on_file.bd_count, "{w:?}");
    s.check_consistency().unwrap();
    let mut out = [0u8; PAGE_SIZE];
    for index in 0..PAGES / 2 {
        s.read(index, &mut out).unwrap();
        assert!(out == page(3, index));
    }
    s.read(PAGES - 1, &mut out).unwrap();
    assert!(out.iter().all(|&b| b == 0));
}

#[test]
fn modes_pick_huge_incompressible_and_ranges() {
    let (_dir, s) = store_with_file(64);
    let mut rng = crate::pagegen::PageGen::new(9);
    for index in 0..64 {
        let kind = if index % 4 == 0 {
            crate::pagegen::PageKind::Random
        } else {
            crate::pagegen::PageKind::Text
        };
        s.write(index, &rng.page_of(kind)).unwrap();
    }
    assert_eq!(s.stats().mm.huge_pages, 16);

    let huge = s
        .writeback(&WritebackRequest::new(WritebackMode::Huge))
        .unwrap();
    assert_eq!(huge.written, 16);
    assert_eq!(s.stats().mm.huge_pages, 0);

    // huge_idle and incompressible find nothing left to take.
    s.mark_idle();
    for mode in [WritebackMode::HugeIdle, WritebackMode::Incompressible] {
        assert_eq!(
            s.writeback(&WritebackRequest::new(mode)).unwrap().written,
            0
        );
    }
    // A range takes only its pages (1-3 and 5-7 are compressed; 4 is on the file already).
    let range: WritebackRequest = "--pages 1-7".parse().unwrap();
    assert_eq!(range.pages, Some((1, 8)));
    assert_eq!(s.writeback(&range).unwrap().written, 6);
    let w = s.stats().writeback;
    assert_eq!(w.pages_on_file, 22);
    let past: WritebackRequest = "idle --pages 60-64".parse().unwrap();
    assert!(matches!(
        s.writeback(&past),
        Err(WritebackError::OutOfRange { capacity: 64, .. })
    ));
    s.check_consistency().unwrap();
}

#[test]
fn requests_parse_as_zram_writes_them() {
    for (text, mode, pages) in [
        ("idle", WritebackMode::Idle, None),
        ("type=huge_idle", WritebackMode::HugeIdle, None),
        (
            "incompressible --pages 5",
            WritebackMode::Incompressible,
            Some((5, 6)),
        ),
        ("page_indexes=10-19", WritebackMode::All, Some((10, 20))),
        ("page_index=7 type=huge", WritebackMode::Huge, Some((7, 8))),
    ] {
        let request: WritebackRequest = text.parse().unwrap();
        assert_eq!((request.mode, request.pages), (mode, pages), "{text}");
        let again: WritebackRequest = request.to_string().parse().unwrap();
        assert_eq!(again, request, "{text} prints as {request}");
    }
    for bad in [
        "",
        "cold",
        "idle huge",
        "--pages",
        "--pages 9-3",
        "page_index=x",
        "idle x=1",
    ] {
        assert!(bad.parse::<WritebackRequest>().is_err(), "'{bad}' parsed");
    }
}

#[test]
fn the_limit_caps_the_pages_written() {
    let (_dir, s) = store_with_file(PAGES);
    fill(&s, 4);
    s.mark_idle();
    s.set_writeback_limit(Some(10));
    let outcome = s
        .writeback(&WritebackRequest::new(WritebackMode::Idle))
        .unwrap();
    assert_eq!(outcome.written, 10);
    assert!(outcome.stopped);
    assert_eq!(s.stats().writeback.limit_pages, 0);
    assert!(matches!(
        s.writeback(&WritebackRequest::new(WritebackMode::Idle)),
        Err(WritebackError::LimitReached)
    ));
    s.set_writeback_limit(None);
    let rest = s
        .writeback(&WritebackRequest::new(WritebackMode::Idle))
        .unwrap();
    assert_eq!(rest.written + 10, object_pages(&s));
    s.check_consistency().unwrap();
}

#[test]
fn the_idle_clock_ages_pages_and_access_makes_them_young() {
    let (_dir, s) = store_with_file(PAGES);
    fill(&s, 5);
    let objects = object_pages(&s);
    assert_eq!(
        s.tick_idle_clock(),
        objects,
        "same-filled pages have no age"
    );
    s.tick_idle_clock();
    let mut out = [0u8; PAGE_SIZE];
    // Page 0 read and page 1 rewritten (if they hold objects, they are young again).
    s.read(0, &mut out).unwrap();
    s.write(1, &page(6, 1)).unwrap();
    s.tick_idle_clock();
    // Pages aged 3 ticks are idle for at least 2 ticks; 0 and 1 are 1 tick old.
    s.set_idle_tick(Duration::from_secs(10));
    let marked = s.mark_idle_older_than(Duration::from_secs(20)).unwrap();
    let young = [0, 1]
        .iter()
        .filter(|&&i| s.slots.peek(i).is_some_and(|e| object_class(e).is_some()))
        .count() as u64;
    assert_eq!(marked, objects - young);
    assert!(!s.slots.peek(0).unwrap().is_idle());
    assert!(matches!(
        s.mark_idle_older_than(Duration::from_secs(10 * 127)),
        Err(WritebackError::AgeTooLong { .. })
    ));
    let bytes = s.bytes_by_age();
    assert_eq!(bytes[3] + bytes[1], s.stats().mm.compr_data_size);
    // Aged writeback takes exactly the old pages.
    let aged = s
        .writeback(&WritebackRequest::new(WritebackMode::Aged(3)))
        .unwrap();
    assert_eq!(aged.written, objects - young);
    s.check_consistency().unwrap();
}

#[test]
fn without_a_backing_file_writeback_says_so() {
    let s = PageStore::new(StoreConfig {
        capacity_pages: 8,
        algorithm: Algorithm::Lz4,
        level: None,
        mem_limit: None,
    })
    .unwrap();
    assert!(matches!(
        s.writeback(&WritebackRequest::new(WritebackMode::Idle)),
        Err(WritebackError::NoBackingFile)
    ));
    assert!(!s.stats().writeback.enabled);
}

/// Pages rewritten and discarded by another thread while writeback passes run keep the
/// content of their last write; nothing stale comes back from the file.
#[test]
fn pages_rewritten_during_writeback_keep_their_new_content() {
    let (_dir, s) = store_with_file(256);
    let s = Arc::new(s);
    fill(&s, 0);
    let writer = {
        let s = Arc::clone(&s);
        std::thread::spawn(move || {
            let mut last = vec![Some(0u64); 256];
            let mut rng = crate::pagegen::SplitMix64::new(11);
            for round in 1..4000u64 {
                let index = rng.below(256);
                if round % 16 == 0 {
                    s.discard(index..index + 1).unwrap();
                    last[index as usize] = None;
                } else {
                    s.write(index, &page(round, index)).unwrap();
                    last[index as usize] = Some(round);
                }
            }
            last
        })
    };
    let all = WritebackRequest {
        mode: WritebackMode::All,
        pages: Some((0, 256)),
        max_pages: None,
    };
    s.set_writeback_batch(8);
    while !writer.is_finished() {
        s.writeback(&all).unwrap();
    }
    let last = writer.join().unwrap();
    s.writeback(&all).unwrap();
    s.check_consistency().unwrap();
    let mut out = [0u8; PAGE_SIZE];
    for (index, seed) in last.iter().enumerate() {
        s.read(index as u64, &mut out).unwrap();
        match seed {
            Some(seed) => assert!(out == page(*seed, index as u64), "page {index}"),
            None => assert!(out.iter().all(|&b| b == 0), "discarded page {index}"),
        }
    }
    let w = s.stats().writeback;
    assert!(w.pages_written_back > 256, "{w:?}");
}

/// A store whose backing file (a real file) fails as the returned handle says.
fn store_with_faults(pages: u64) -> (tempfile::TempDir, PageStore, Arc<super::backing::FaultyIo>) {
    let dir = tempfile::tempdir().unwrap();
    let mut handle = None;
    let file = super::backing::BackingFile::open_wrapped(&dir.path().join("backing"), |io| {
        let faults = Arc::new(super::backing::FaultyIo::new(io));
        handle = Some(Arc::clone(&faults));
        Box::new(faults)
    })
    .unwrap();
    let store = PageStore::new(StoreConfig {
        capacity_pages: pages,
        algorithm: Algorithm::Lz4,
        level: None,
        mem_limit: None,
    })
    .unwrap()
    .with_backing_file(file);
    (dir, store, handle.unwrap())
}

#[test]
fn a_failed_writeback_keeps_every_page_in_ram_and_a_retry_succeeds() {
    let (_dir, s, faults) = store_with_faults(PAGES);
    fill(&s, 7);
    let objects = object_pages(&s);
    let before = s.stats();
    s.mark_idle();
    s.set_writeback_batch(64);
    for fail in [
        |f: &super::backing::FaultyIo| f.set_write_error(Some(libc::EIO)),
        |f: &super::backing::FaultyIo| f.set_write_error(Some(libc::ENOSPC)),
        |f: &super::backing::FaultyIo| f.set_stalled_writes(true),
        // The third write call fails: two batches are on the file, the rest stays in RAM.
        |f: &super::backing::FaultyIo| f.fail_nth_write(3, libc::EIO),
    ] {
        fail(&faults);
        let error = s
            .writeback(&WritebackRequest::new(WritebackMode::Idle))
            .unwrap_err();
        assert!(matches!(error, WritebackError::Write { .. }), "{error}");
        faults.clear();
        s.check_consistency().unwrap();
        verify(&s, 7);
        s.mark_idle();
    }
    let failed = s.stats().writeback.failed_writebacks;
    assert!(failed >= 4 * 64, "{failed}");
    assert_eq!(s.stats().mm.orig_data_size, before.mm.orig_data_size);

    faults.set_short_writes(true);
    let outcome = s
        .writeback(&WritebackRequest::new(WritebackMode::Idle))
        .unwrap();
    assert!(outcome.written > 0 && outcome.failed == 0, "{outcome}");
    assert_eq!(
        s.stats().writeback.pages_on_file,
        objects,
        "all of them, after the retry"
    );
    s.check_consistency().unwrap();
    verify(&s, 7);
}

#[test]
fn a_failed_read_back_fails_that_read_only_and_keeps_the_page() {
    let (_dir, s, faults) = store_with_faults(64);
    fill(&s, 8);
    s.writeback(&"--pages 0-31".parse().unwrap()).unwrap();
    let on_file = (0..32u64)
        .find(|&i| s.slots.peek(i as usize).unwrap().state() == SlotState::WrittenBack)
        .expect("a page on the file");
    let in_ram = (32..64u64)
        .find(|&i| object_class(s.slots.peek(i as usize).unwrap()).is_some())
        .expect("a page in RAM");
    let entry = s.slots.peek(on_file as usize).unwrap();

    let mut out = [0u8; PAGE_SIZE];
    for fail in [
        |f: &super::backing::FaultyIo| f.set_read_error(Some(libc::EIO)),
        |f: &super::backing::FaultyIo| f.set_read_eof(true),
    ] {
        fail(&faults);
        let error = s.read(on_file, &mut out).unwrap_err();
        assert!(
            matches!(error, StoreError::Backing { index, .. } if index == on_file),
            "{error}"
        );
        // Other pages are not affected.
        s.read(in_ram, &mut out).unwrap();
        assert!(out == page(8, in_ram));
        faults.clear();
    }
    assert_eq!(s.stats().io.failed_reads, 2);
    assert_eq!(
        s.slots.peek(on_file as usize).unwrap(),
        entry,
        "the slot is kept"
    );
    s.read(on_file, &mut out).unwrap();
    assert!(out == page(8, on_file));
    s.check_consistency().unwrap();
}

/// A real full filesystem: a 1 MiB tmpfs (when mounting is permitted). Writeback stops with
/// NoSpace; the pages that fit are on the file, the rest in RAM, all intact.
#[test]
fn a_full_filesystem_stops_writeback_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let _mount = match super::backing::tests::Mount::new("tmpfs", "size=1m", dir.path()) {
        Ok(mount) => mount,
        Err(why) => {
            println!("SKIPPED: {why}");
            return;
        }
    };
    let file = super::backing::BackingFile::open(&dir.path().join("backing")).unwrap();
    let s = PageStore::new(StoreConfig {
        capacity_pages: 1024,
        algorithm: Algorithm::Lz4,
        level: None,
        mem_limit: None,
    })
    .unwrap()
    .with_backing_file(file);
    let mut rng = crate::pagegen::PageGen::new(12);
    let pages: Vec<_> = (0..1024)
        .map(|_| rng.page_of(crate::pagegen::PageKind::Random))
        .collect();
    for (index, page) in pages.iter().enumerate() {
        s.write(index as u64, page).unwrap();
    }
    let all = WritebackRequest::new(WritebackMode::Huge);
    // Batches small enough that some fit (256 raw pages' records are more than the 1 MiB).
    s.set_writeback_batch(64);

    let error = s.writeback(&all).unwrap_err();

    assert!(error.to_string().contains("no space"), "{error}");
    let w = s.stats().writeback;
    assert!(w.pages_on_file > 0 && w.pages_on_file < 1024, "{w:?}");
    assert!(w.failed_writebacks > 0);
    s.check_consistency().unwrap();
    let mut out = [0u8; PAGE_SIZE];
    for (index, page) in pages.iter().enumerate() {
        s.read(index as u64, &mut out).unwrap();
        assert!(out == **page, "page {index}");
    }
    // Freeing pages on the file makes room again.
    s.discard(0..1024).unwrap();
    s.check_consistency().unwrap();
}

/// A store over an in-memory backing file whose reads the returned handle can slow down.
fn store_in_memory(pages: u64) -> (Arc<PageStore>, Arc<super::backing::FaultyIo>) {
    let faults = Arc::new(super::backing::FaultyIo::in_memory());
    let file = super::backing::BackingFile::with_io(Box::new(Arc::clone(&faults)), None);
    let store = PageStore::new(StoreConfig {
        capacity_pages: pages,
        algorithm: Algorithm::Lz4,
        level: None,
        mem_limit: None,
    })
    .unwrap()
    .with_backing_file(file);
    (Arc::new(store), faults)
}

/// A page that compresses to an object (half noise, half zeros), different for each seed.
fn object_page(seed: u64) -> [u8; PAGE_SIZE] {
    let mut page = [0u8; PAGE_SIZE];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for byte in &mut page[..PAGE_SIZE / 2] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *byte = x as u8;
    }
    page
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// What another thread does to a written-back page while a read of it is in the file.
#[derive(Debug, Clone, Copy)]
enum Meanwhile {
    Rewrite,
    Discard,
    RewriteAndWriteBack,
}

#[test]
fn a_slow_file_read_holds_no_slot_lock_and_returns_the_old_or_the_new_page() {
    const SLOW: Duration = Duration::from_millis(400);
    for meanwhile in [
        Meanwhile::Rewrite,
        Meanwhile::Discard,
        Meanwhile::RewriteAndWriteBack,
    ] {
        let (store, faults) = store_in_memory(4);
        let old = object_page(1);
        store.write(0, &old).unwrap();
        store.write(1, &object_page(2)).unwrap();
        store
            .writeback(&WritebackRequest::new(WritebackMode::All))
            .unwrap();
        assert_eq!(store.slots_state(0), SlotState::WrittenBack);
        faults.set_read_delay(SLOW);

        let reader = {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                let mut out = [0u8; PAGE_SIZE];
                store.read(0, &mut out).map(|()| out)
            })
        };
        wait_until("the read is in the file", || faults.reads_in_flight() == 1);
        let new = match meanwhile {
            Meanwhile::Rewrite => {
                store.write(0, &object_page(3)).unwrap();
                object_page(3)
            }
            Meanwhile::Discard => {
                store.discard(0..1).unwrap();
                [0u8; PAGE_SIZE]
            }
            Meanwhile::RewriteAndWriteBack => {
                store.write(0, &object_page(4)).unwrap();
                let outcome = store
                    .writeback(&WritebackRequest::new(WritebackMode::All))
                    .unwrap();
                assert_eq!(outcome.written, 1, "{meanwhile:?}");
                object_page(4)
            }
        };
        // Another page's write never waited for the read; it must not start to.
        store.write(1, &object_page(5)).unwrap();
        assert_eq!(
            faults.reads_in_flight(),
            1,
            "{meanwhile:?}: the writes waited for the file read to finish"
        );

        let got = reader.join().unwrap().unwrap();
        assert!(
            got == old || got == new,
            "{meanwhile:?}: the read returned neither the old nor the new page"
        );
        faults.set_read_delay(Duration::ZERO);
        let mut out = [0u8; PAGE_SIZE];
        store.read(0, &mut out).unwrap();
        assert!(out == new, "{meanwhile:?}: page 0 lost its new content");
        store.read(1, &mut out).unwrap();
        assert!(out == object_page(5), "{meanwhile:?}: page 1");
        store.check_consistency().unwrap();
    }
}

#[test]
fn a_partial_write_to_a_page_being_read_from_the_file_is_not_lost() {
    let (store, faults) = store_in_memory(2);
    store.write(0, &object_page(1)).unwrap();
    store
        .writeback(&WritebackRequest::new(WritebackMode::All))
        .unwrap();
    faults.set_read_delay(Duration::from_millis(200));
    // Two read-modify-writes of the same written-back page race; each reads the file with
    // the slot unlocked, and the one that finds the slot changed starts again.
    let writers: Vec<_> = [(0usize, 0xaa), (PAGE_SIZE - 1, 0x55)]
        .into_iter()
        .map(|(at, byte)| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || store.modify(0, |page| page[at] = byte).unwrap())
        })
        .collect();
    for writer in writers {
        writer.join().unwrap();
    }
    faults.set_read_delay(Duration::ZERO);
    let mut expect = object_page(1);
    expect[0] = 0xaa;
    expect[PAGE_SIZE - 1] = 0x55;
    let mut out = [0u8; PAGE_SIZE];
    store.read(0, &mut out).unwrap();
    assert!(out == expect, "a partial write was lost");
    store.check_consistency().unwrap();
}

#[test]
fn a_writeback_pass_gives_its_memory_back_and_never_raises_mem_used_max() {
    let (_dir, s) = store_with_file(PAGES);
    fill(&s, 7);
    // Every other page idle: the pass leaves half of each chunk's objects behind, so only
    // compaction can give the memory back.
    s.mark_idle();
    let mut out = [0u8; PAGE_SIZE];
    for index in (0..PAGES).step_by(2) {
        s.read(index, &mut out).unwrap();
    }
    let before = s.stats().mm;

    let outcome = s
        .writeback(&WritebackRequest::new(WritebackMode::Idle))
        .unwrap();

    let after = s.stats().mm;
    assert!(outcome.written > PAGES / 4, "{outcome}");
    assert!(outcome.pages_given_back > 0, "{outcome}");
    assert!(
        before.mem_used_total - after.mem_used_total >= outcome.bytes / 2,
        "mem_used_total fell by {} for {} bytes written back ({outcome})",
        before.mem_used_total - after.mem_used_total,
        outcome.bytes
    );
    assert_eq!(after.mem_used_max, before.mem_used_max, "{outcome}");
    verify(&s, 7);
    s.check_consistency().unwrap();
}
