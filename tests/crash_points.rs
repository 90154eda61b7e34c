// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Crash points: a store on a state file survives SIGKILL at any moment.
//!
//! A child (this test binary run again with `VUZ_CRASH_CHILD` set) opens a state file in
//! /dev/shm, recovers it, starts compression workers and runs random writes through the
//! pending pool and inline, rewrites, discards, compactions, recompressions (zstd:9 with a
//! trained dictionary) and writebacks to a backing file in /dev/shm, logging an "about to"
//! record before each operation and a "done" record after it. The parent SIGKILLs it after a random 0–30 ms, recovers the state
//! in-process, checks that every page equals its last completed write (the one operation in
//! flight may show the old or the new page), that `check_consistency` passes (recover runs
//! it), and lets a new child continue on the same state.
//!
//! `VUZ_CRASH_KILLS` sets the number of kills (default 200).

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost_user_zram::codec::Algorithm;
use vhost_user_zram::pagegen::{fill_page, SplitMix64};
use vhost_user_zram::store::backing::BackingFile;
use vhost_user_zram::store::{
    same_fill, AlgorithmSpec, PageStore, PendingConfig, RecompressRequest, StateFile, StateStart,
    StoreConfig, StoreMemory, TrainRequest, WritebackMode, WritebackRequest,
};
use vhost_user_zram::workers::CompressWorkers;
use vhost_user_zram::PAGE_SIZE;

const PAGES: u64 = 1024;
const CHILD_ENV: &str = "VUZ_CRASH_CHILD";
const TEST_NAME: &str = "a_store_on_a_state_file_survives_sigkill_at_random_moments";

fn config() -> StoreConfig {
    StoreConfig {
        capacity_pages: PAGES,
        algorithm: Algorithm::Lz4,
        level: None,
        mem_limit: None,
    }
}

const POOL: PendingConfig = PendingConfig {
    workers: 2,
    max_pending_pages: 64,
};

/// Opens and recovers the store on `path` with its backing file, as the daemon should: the
/// backing file the state records is reopened as it was, else `backing` is opened anew.
/// Retries while the last holder's lock goes away.
fn open(path: &Path, backing: &Path) -> (PageStore, StateStart) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let file = loop {
        match StateFile::open(path) {
            Ok(file) => break file,
            Err(error) if Instant::now() < deadline => {
                let _ = error;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(error) => panic!("{error}"),
        }
    };
    let backing = match file.backing() {
        Some(r) => BackingFile::reopen(&r.path, r.key, (r.dev, r.ino)),
        None => BackingFile::open(backing),
    }
    .unwrap_or_else(|e| panic!("{e}"));
    let mut store = PageStore::with_memory(config(), POOL, StoreMemory::State(file))
        .unwrap()
        .with_secondary_algorithms(&[AlgorithmSpec {
            algorithm: Algorithm::Zstd,
            level: Some(9),
        }])
        .unwrap()
        .with_backing_file(backing);
    let start = store
        .recover()
        .unwrap_or_else(|e| panic!("recovery failed: {e}"));
    (store, start)
}

/// The page a write with `seed` stores at `index` (seed 0: zeros, a discarded page).
fn content(seed: u64, index: u64) -> [u8; PAGE_SIZE] {
    let mut page = [0u8; PAGE_SIZE];
    if seed == 0 {
        return page;
    }
    match seed % 8 {
        0 => same_fill::fill(&mut page, seed.wrapping_mul(0x0123_4567_89ab_cdef)),
        1 => same_fill::fill(&mut page, seed & 0xff),
        2 => {
            let mut rng = SplitMix64::new(seed ^ index);
            for chunk in page.chunks_mut(8) {
                chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
            }
        }
        _ => {
            fill_page(seed, index, &mut page);
        }
    }
    page
}

/// One logged operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// Page `.0` now holds `content(.1, .0)`.
    Write(u64, u64),
    /// Pages `.0 .. .0 + .1` now hold `content(.2, page)`: one request, a multi-page unit
    /// where it is aligned.
    WriteRun(u64, u64, u64),
    Discard(u64),
    Compact,
    Recompress,
    Train,
    Writeback,
}

fn encode(op: Op) -> String {
    match op {
        Op::Write(p, s) => format!("W {p} {s}"),
        Op::WriteRun(p, n, s) => format!("U {p} {n} {s}"),
        Op::Discard(p) => format!("D {p}"),
        Op::Compact => "C".into(),
        Op::Recompress => "R".into(),
        Op::Train => "T".into(),
        Op::Writeback => "B".into(),
    }
}

fn decode(text: &str) -> Op {
    let mut words = text.split(' ');
    let kind = words.next().unwrap();
    let mut num = || words.next().unwrap().parse::<u64>().unwrap();
    match kind {
        "W" => Op::Write(num(), num()),
        "U" => Op::WriteRun(num(), num(), num()),
        "D" => Op::Discard(num()),
        "C" => Op::Compact,
        "R" => Op::Recompress,
        "T" => Op::Train,
        "B" => Op::Writeback,
        other => panic!("unknown log record {other}"),
    }
}

/// The child: runs random operations on the state until it is killed.
fn child(spec: &str) {
    let mut parts = spec.split('|');
    let state = PathBuf::from(parts.next().unwrap());
    let log_path = PathBuf::from(parts.next().unwrap());
    let backing = PathBuf::from(parts.next().unwrap());
    let seed: u64 = parts.next().unwrap().parse().unwrap();
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(&log_path)
        .unwrap();
    let mut record = |line: String| {
        // One write(2) per record: a kill never leaves half a line.
        log.write_all(format!("{line}\n").as_bytes()).unwrap();
    };
    let (store, _) = open(&state, &backing);
    store.set_unit_max_pages(16).unwrap();
    let store = Arc::new(store);
    let workers = CompressWorkers::start(Arc::clone(&store), &[]).unwrap();
    let mut rng = SplitMix64::new(seed);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        let page = rng.below(PAGES);
        let op = match rng.below(100) {
            0..=19 => {
                // Mostly aligned runs: units of 2 to 16 pages.
                let len = 1 + rng.below(24);
                let first = if rng.below(4) == 0 { page } else { page & !15 };
                let len = len.min(PAGES - first);
                Op::WriteRun(first, len, rng.next_u64() | 1 << 40)
            }
            20..=59 => Op::Write(page, rng.next_u64() | 1 << 40),
            60..=74 => Op::Write(page, (rng.next_u64() | 1 << 40) & !7 | 3),
            75..=89 => Op::Discard(page),
            90..=93 => Op::Compact,
            94..=96 => Op::Writeback,
            97..=98 => Op::Recompress,
            // Training takes long; a few a child are enough.
            _ if rng.below(8) == 0 => Op::Train,
            _ => Op::Compact,
        };
        record(format!("B {}", encode(op)));
        match op {
            // Odd seeds above go through the pending pool, the rest inline.
            Op::Write(p, s) if s % 2 == 1 => store
                .write_with(p, |buf| {
                    *buf = content(s, p);
                    Ok::<(), ()>(())
                })
                .unwrap()
                .unwrap(),
            Op::Write(p, s) => store.write(p, &content(s, p)).unwrap(),
            Op::WriteRun(p, n, s) => store
                .write_pages_with(p, usize::try_from(n).unwrap(), |i, buf| {
                    *buf = content(s, p + i as u64);
                    Ok::<(), ()>(())
                })
                .unwrap()
                .unwrap(),
            Op::Discard(p) => store.discard(p..p + 1).unwrap(),
            Op::Compact => {
                store.compact();
            }
            Op::Recompress => {
                store
                    .recompress(&RecompressRequest {
                        max_pages: Some(16),
                        ..RecompressRequest::default()
                    })
                    .unwrap();
            }
            Op::Writeback => {
                store.mark_idle();
                store
                    .writeback(&WritebackRequest {
                        max_pages: Some(32),
                        ..WritebackRequest::new(WritebackMode::Idle)
                    })
                    .unwrap();
            }
            Op::Train => {
                // Too few samples early on, or the dictionary slots full: not a failure.
                let _ = store.train_zstd_dictionary(&TrainRequest {
                    samples: 64,
                    size: 4096,
                });
            }
        }
        record(format!("E {}", encode(op)));
    }
    workers.stop();
}

#[test]
fn a_store_on_a_state_file_survives_sigkill_at_random_moments() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        child(&spec);
        return;
    }
    let kills: usize = std::env::var("VUZ_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let dir = tempfile::Builder::new()
        .prefix("vuz-crash")
        .tempdir_in("/dev/shm")
        .unwrap();
    let state = dir.path().join("state");
    let log_path = dir.path().join("log");
    let backing = dir.path().join("backing");
    std::fs::write(&log_path, b"").unwrap();
    let mut model: HashMap<u64, u64> = HashMap::new();
    let mut read_offset = 0;
    let mut rng = SplitMix64::new(0x000c_4a54);
    let mut in_flight_kinds: HashMap<&'static str, usize> = HashMap::new();
    let started = Instant::now();
    let mut ops_done = 0usize;
    let mut on_file = 0;
    let mut units = 0;
    let exe = std::env::current_exe().unwrap();
    for round in 0..kills {
        let mut child = Command::new(&exe)
            .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
            .env(
                CHILD_ENV,
                format!(
                    "{}|{}|{}|{}",
                    state.display(),
                    log_path.display(),
                    backing.display(),
                    rng.next_u64()
                ),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        // Most kills land while operations run (the child's start takes a few ms).
        std::thread::sleep(Duration::from_micros(5000 + rng.below(30_000)));
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "round {round}: the child ended before the kill ({status})"
        );

        // Replay what the child logged since the last round. A kill can cut a record short
        // after all: a write(2) that crosses a page of the file is copied a page at a time,
        // and a fatal signal between the two ends it early. A cut `B` record's operation never
        // began (the record is written first); a cut `E` record's operation is in flight. The
        // cut piece is dropped from the file, so the next child's records start on a line.
        let mut log = std::fs::read_to_string(&log_path).unwrap();
        let whole = log.rfind('\n').map_or(0, |newline| newline + 1);
        if whole < log.len() {
            log.truncate(whole);
            std::fs::OpenOptions::new()
                .write(true)
                .open(&log_path)
                .unwrap()
                .set_len(whole as u64)
                .unwrap();
        }
        let mut in_flight = None;
        for line in log[read_offset..].lines() {
            let (mark, op) = line.split_at(2);
            let op = decode(op);
            match mark {
                "B " => in_flight = Some(op),
                "E " => {
                    assert_eq!(in_flight, Some(op), "the log pairs its records");
                    in_flight = None;
                    ops_done += 1;
                    match op {
                        Op::Write(p, s) => {
                            model.insert(p, s);
                        }
                        Op::WriteRun(p, n, s) => {
                            for page in p..p + n {
                                model.insert(page, s);
                            }
                        }
                        Op::Discard(p) => {
                            model.remove(&p);
                        }
                        Op::Compact | Op::Recompress | Op::Train | Op::Writeback => {}
                    }
                }
                other => panic!("unknown mark {other:?}"),
            }
        }
        read_offset = log.len();
        let kind = match in_flight {
            None => "between operations",
            Some(Op::Write(..)) => "write",
            Some(Op::WriteRun(..)) => "multi-page write",
            Some(Op::Discard(_)) => "discard",
            Some(Op::Compact) => "compaction",
            Some(Op::Recompress) => "recompression",
            Some(Op::Train) => "dictionary training",
            Some(Op::Writeback) => "writeback",
        };
        *in_flight_kinds.entry(kind).or_default() += 1;

        // Recover (recover runs check_consistency) and check every page.
        let (store, _) = open(&state, &backing);
        let changing = match in_flight {
            Some(Op::Write(p, s)) => Some((p..p + 1, s)),
            Some(Op::WriteRun(p, n, s)) => Some((p..p + n, s)),
            Some(Op::Discard(p)) => Some((p..p + 1, 0)),
            _ => None,
        };
        let mut page = [0u8; PAGE_SIZE];
        for index in 0..PAGES {
            let result = store.read(index, &mut page);
            let old = content(model.get(&index).copied().unwrap_or(0), index);
            match (result, changing.clone()) {
                (Ok(()), _) if page == old => {}
                (Ok(()), Some((pages, s)))
                    if pages.contains(&index) && page == content(s, index) =>
                {
                    // The operation in flight had committed for this page: it is the new one.
                    if s == 0 {
                        model.remove(&index);
                    } else {
                        model.insert(index, s);
                    }
                }
                (Ok(()), _) => panic!(
                    "round {round}: page {index} holds neither its last write nor the one in \
                     flight ({in_flight:?})"
                ),
                (Err(error), _) => {
                    panic!("round {round}: page {index} fails after recovery: {error}")
                }
            }
        }
        assert_eq!(store.stats().info.damaged_pages, 0, "round {round}");
        on_file = on_file.max(store.stats().writeback.pages_on_file);
        units = units.max(store.stats().units.units_stored);
        drop(store);
    }
    let elapsed = started.elapsed();
    let mut kinds: Vec<_> = in_flight_kinds.into_iter().collect();
    kinds.sort();
    println!(
        "crash points: {kills} kills, {ops_done} operations completed, in {:.1} s; killed \
         during: {kinds:?}",
        elapsed.as_secs_f64()
    );
    assert!(ops_done > kills, "the children got work done between kills");
    assert!(on_file > 0, "pages were on the backing file at some kill");
    assert!(units > 0, "multi-page units were stored at some kill");
}
