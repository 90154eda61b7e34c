// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A backing file changed behind the daemon's back: every written-back page either reads back
//! exactly as written or fails with an I/O error (counted in `failed_reads`), never as other
//! bytes. The file is truncated and grown back sparse, zeroed, corrupted, re-extended and has
//! records copied over one another, at random, while threads read and check every page, a
//! writer rewrites pages and writeback runs.

// Offsets and lengths here are small.
#![allow(clippy::cast_possible_truncation)]

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vhost_user_zram::codec::Algorithm;
use vhost_user_zram::pagegen::{fill_page, SplitMix64};
use vhost_user_zram::store::backing::{BackingFile, RECORD_HEADER};
use vhost_user_zram::store::{PageStore, StoreConfig, StoreError, WritebackMode, WritebackRequest};
use vhost_user_zram::PAGE_SIZE;

/// How long the random test damages the file.
const CHAOS: Duration = Duration::from_secs(3);

/// Page `index` at `version`: the index and the version in its first 16 bytes, then the
/// swap-like generator's page for them (some compressible, some raw).
fn content(index: u64, version: u64) -> [u8; PAGE_SIZE] {
    let mut page = [0u8; PAGE_SIZE];
    fill_page(version.wrapping_mul(0x9e37_79b9) ^ 0x5eed, index, &mut page);
    page[..8].copy_from_slice(&index.to_le_bytes());
    page[8..16].copy_from_slice(&version.to_le_bytes());
    page
}

fn store_on(path: &Path, pages: u64) -> PageStore {
    PageStore::new(StoreConfig {
        capacity_pages: pages,
        algorithm: Algorithm::Lz4,
        level: None,
        mem_limit: None,
    })
    .unwrap()
    .with_backing_file(BackingFile::open(path).unwrap())
}

/// The file as a saboteur sees it: opened a second time, buffered.
fn saboteur(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap()
}

fn punch(file: &File, offset: u64, len: u64) {
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate takes an open fd and plain integers; no memory is passed.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    // A filesystem without hole punching: write zeros instead.
    if rc != 0 {
        file.write_all_at(&vec![0u8; len as usize], offset).unwrap();
    }
}

/// Checks one read of page `index`, whose version was `before` when the read started and
/// `after` when it ended (a write in flight may be seen one version early): the exact page of
/// one of those versions, or an I/O error from the backing file. Returns whether it failed.
fn check_read(
    index: u64,
    result: Result<(), StoreError>,
    page: &[u8; PAGE_SIZE],
    before: u64,
    after: u64,
) -> bool {
    match result {
        Ok(()) => {
            let found_index = u64::from_le_bytes(page[..8].try_into().unwrap());
            let version = u64::from_le_bytes(page[8..16].try_into().unwrap());
            assert_eq!(
                found_index, index,
                "page {index} read back with another page's bytes (version {version})"
            );
            assert!(
                (before..=after + 1).contains(&version),
                "page {index} read back at version {version}, not {before}..={}",
                after + 1
            );
            assert!(
                *page == content(index, version),
                "page {index} version {version} read back with wrong bytes"
            );
            false
        }
        Err(StoreError::Backing { index: failed, .. }) => {
            assert_eq!(failed, index);
            true
        }
        Err(other) => panic!("page {index}: unexpected error {other:?}"),
    }
}

#[test]
fn a_file_truncated_and_grown_back_sparse_reads_as_io_errors_not_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("backing");
    let store = store_on(&path, 64);
    // Incompressible pages, as in the report: 32 raw pages on the file.
    let mut rng = SplitMix64::new(9);
    let pages: Vec<[u8; PAGE_SIZE]> = (0..32)
        .map(|_| {
            let mut page = [0u8; PAGE_SIZE];
            page.iter_mut().for_each(|b| *b = rng.next_u64() as u8);
            page
        })
        .collect();
    for (index, page) in pages.iter().enumerate() {
        store.write(index as u64, page).unwrap();
    }
    store.mark_idle();
    let outcome = store
        .writeback(&WritebackRequest::new(WritebackMode::Idle))
        .unwrap();
    assert_eq!(outcome.written, 32);
    let file = saboteur(&path);
    let len = file.metadata().unwrap().len();
    file.set_len(0).unwrap();
    file.set_len(len).unwrap();
    let mut out = [0u8; PAGE_SIZE];
    for index in 0..32 {
        let result = store.read(index, &mut out);
        assert!(
            matches!(result, Err(StoreError::Backing { .. })),
            "page {index} of a truncated file read back as {:?} with {} zero bytes",
            result,
            out.iter().filter(|&&b| b == 0).count()
        );
    }
    assert_eq!(store.stats().io.failed_reads, 32, "each failed read counts");
    store.check_consistency().unwrap();
}

#[test]
fn random_damage_under_a_verifying_load_never_returns_wrong_bytes() {
    const PAGES: u64 = 2048;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("backing");
    let store = Arc::new(store_on(&path, PAGES));
    let versions: Arc<Vec<AtomicU64>> = Arc::new((0..PAGES).map(|_| AtomicU64::new(0)).collect());
    for index in 0..PAGES {
        store.write(index, &content(index, 0)).unwrap();
    }
    store.mark_idle();
    store
        .writeback(&WritebackRequest::new(WritebackMode::Idle))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let verified = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for seed in 0..2u64 {
        let (store, versions, stop) = (store.clone(), versions.clone(), stop.clone());
        let (failed, verified) = (failed.clone(), verified.clone());
        threads.push(thread::spawn(move || {
            let mut rng = SplitMix64::new(seed);
            let mut page = [0u8; PAGE_SIZE];
            while !stop.load(Ordering::Relaxed) {
                let index = rng.below(PAGES);
                let before = versions[index as usize].load(Ordering::Acquire);
                let result = store.read(index, &mut page);
                let after = versions[index as usize].load(Ordering::Acquire);
                if check_read(index, result, &page, before, after) {
                    failed.fetch_add(1, Ordering::Relaxed);
                } else {
                    verified.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    {
        // Rewrites pages (bringing them back to RAM) and writes them back again.
        let (store, versions, stop) = (store.clone(), versions.clone(), stop.clone());
        threads.push(thread::spawn(move || {
            let mut rng = SplitMix64::new(77);
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..64 {
                    let index = rng.below(PAGES);
                    let version = versions[index as usize].load(Ordering::Acquire) + 1;
                    store.write(index, &content(index, version)).unwrap();
                    versions[index as usize].store(version, Ordering::Release);
                }
                store.mark_idle();
                // The saboteur may make a write fail (a full filesystem is not simulated,
                // but a truncation races the batch): the pages then stay in RAM.
                let _ = store.writeback(&WritebackRequest::new(WritebackMode::Idle));
                thread::sleep(Duration::from_millis(5));
            }
        }));
    }
    let file = saboteur(&path);
    let mut rng = SplitMix64::new(1234);
    let mut actions = [0u64; 6];
    let started = Instant::now();
    while started.elapsed() < CHAOS {
        let len = file.metadata().unwrap().len().max(1);
        let at = rng.below(len);
        let span = 1 + rng.below(3 * PAGE_SIZE as u64);
        let action = rng.below(6) as usize;
        match action {
            // Zero a range.
            0 => file.write_all_at(&vec![0u8; span as usize], at).unwrap(),
            // Flip bits in a few bytes.
            1 => {
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(len);
                    let mut byte = [0u8];
                    if file.read_at(&mut byte, at).unwrap() == 1 {
                        byte[0] ^= 1 << rng.below(8);
                        file.write_all_at(&byte, at).unwrap();
                    }
                }
            }
            // Truncate, then grow back sparse a moment later.
            2 => {
                // Within the last eighth, so that most pages outlive the test.
                file.set_len(len - rng.below(len / 8 + 1)).unwrap();
                thread::sleep(Duration::from_millis(1));
                file.set_len(len).unwrap();
            }
            // Punch a hole.
            3 => punch(&file, at, span),
            // Copy a range over another (another page's record where this one's was).
            4 => {
                let from = rng.below(len);
                let mut buf = vec![0u8; span as usize];
                let n = file.read_at(&mut buf, from).unwrap();
                file.write_all_at(&buf[..n], at).unwrap();
            }
            // Extend the file past its end with garbage.
            _ => file
                .write_all_at(&vec![0xa5u8; span as usize], len + rng.below(8192))
                .unwrap(),
        }
        actions[action] += 1;
        thread::sleep(Duration::from_millis(2));
    }
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        thread.join().expect("a reader saw wrong bytes");
    }
    let failed = failed.load(Ordering::Relaxed);
    let verified = verified.load(Ordering::Relaxed);
    println!("{verified} reads verified, {failed} failed, actions {actions:?}");
    assert!(failed > 0, "the damage was never noticed");
    assert!(verified > 1000, "the readers verified pages too");
    assert_eq!(
        store.stats().io.failed_reads,
        failed,
        "every failure counts"
    );
    store.check_consistency().unwrap();
}

#[test]
fn damage_fails_exactly_the_pages_whose_records_it_touches() {
    const PAGES: u64 = 512;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("backing");
    let store = store_on(&path, PAGES);
    for index in 0..PAGES {
        store.write(index, &content(index, 0)).unwrap();
    }
    store.mark_idle();
    store
        .writeback(&WritebackRequest::new(WritebackMode::Idle))
        .unwrap();
    let records: Vec<(u64, u64, u64)> = (0..PAGES)
        .filter_map(|index| {
            let (offset, len) = store.backing_object(index)?;
            Some((index, offset, offset + (RECORD_HEADER + len) as u64))
        })
        .collect();
    assert!(records.len() > 400, "most pages are on the file");
    let file = saboteur(&path);
    let len = file.metadata().unwrap().len();
    let mut rng = SplitMix64::new(5);
    let mut broken = std::collections::BTreeSet::new();
    // Zero one range, flip one byte, and cut the tail off and grow it back sparse.
    let zero_at = rng.below(len / 2);
    file.write_all_at(&[0u8; 3000], zero_at).unwrap();
    let flip_at = len / 2 + rng.below(len / 4);
    let mut byte = [0u8];
    file.read_at(&mut byte, flip_at).unwrap();
    file.write_all_at(&[byte[0] ^ 0x10], flip_at).unwrap();
    let cut = len - len / 8;
    file.set_len(cut).unwrap();
    file.set_len(len).unwrap();
    for &(index, start, end) in &records {
        let touches = |at: u64, n: u64| start < at + n && at < end;
        if touches(zero_at, 3000) || touches(flip_at, 1) || end > cut {
            broken.insert(index);
        }
    }
    let mut page = [0u8; PAGE_SIZE];
    let mut failed = std::collections::BTreeSet::new();
    for index in 0..PAGES {
        if check_read(index, store.read(index, &mut page), &page, 0, 0) {
            failed.insert(index);
        }
    }
    assert_eq!(failed, broken, "exactly the damaged pages fail");
    assert_eq!(store.stats().io.failed_reads, failed.len() as u64);
}
