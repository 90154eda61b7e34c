// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Tests of recompression and idle marking: zram's selection rules, the slot's priority bits,
//! a model-based property test, and threads racing recompression against writes.

#![allow(clippy::cast_possible_truncation)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::pagegen::{fill_page, PageGen, PageKind, SplitMix64};
use crate::store::{PageStore, PendingConfig, StoreConfig};

fn spec(text: &str) -> AlgorithmSpec {
    text.parse().unwrap()
}

fn config(pages: u64) -> StoreConfig {
    StoreConfig {
        capacity_pages: pages,
        algorithm: Algorithm::Lz4,
        level: None,
        mem_limit: None,
    }
}

/// An lz4 store with `secondary` as its recompression algorithms.
fn store(pages: u64, secondary: &[&str]) -> PageStore {
    let specs: Vec<_> = secondary.iter().map(|s| spec(s)).collect();
    PageStore::new(config(pages))
        .unwrap()
        .with_secondary_algorithms(&specs)
        .unwrap()
}

fn swap_page(index: u64) -> [u8; PAGE_SIZE] {
    let mut page = [0u8; PAGE_SIZE];
    fill_page(0x1d1e, index, &mut page);
    page
}

fn request(text: &str) -> RecompressRequest {
    text.parse().unwrap()
}

fn read(s: &PageStore, index: u64) -> [u8; PAGE_SIZE] {
    let mut out = [0u8; PAGE_SIZE];
    s.read(index, &mut out).unwrap();
    out
}

#[test]
fn idle_all_marks_stored_pages_and_reads_writes_discards_clear_it() {
    let s = store(64, &[]);
    for i in 0..32 {
        s.write(i, &swap_page(i)).unwrap();
    }
    let stored = (0..64)
        .filter(|&i| holds_page(s.slots.peek(i).unwrap()))
        .count() as u64;

    let marked = s.mark_idle();
    read(&s, 0);
    s.write(1, &swap_page(100)).unwrap();
    s.discard(2..3).unwrap();

    assert_eq!(marked, stored);
    assert_eq!(
        s.mark_idle(),
        2,
        "only the read and rewritten pages were unmarked"
    );
    read(&s, 3);
    assert_eq!(
        s.idle_pages(),
        stored - 2,
        "the discarded page is gone, page 3 was read"
    );
    assert!(!s.slots.peek(3).unwrap().is_idle());
    assert_eq!(s.stats().recompression.pages_marked_idle, stored + 2);
    s.check_consistency().unwrap();
}

#[test]
fn recompress_idle_moves_only_idle_pages_to_the_secondary_and_they_read_back() {
    let s = store(2048, &["zstd:level=9"]);
    for i in 0..2048 {
        s.write(i, &swap_page(i)).unwrap();
    }
    let before = s.stats();
    s.mark_idle();
    for i in 0..256 {
        read(&s, i); // hot again
    }

    let outcome = s.recompress(&request("type=idle")).unwrap();

    let after = s.stats();
    assert!(outcome.recompressed > 500, "{outcome}");
    assert_eq!(after.recompression.pages_recompressed, outcome.recompressed);
    assert_eq!(
        before.mm.compr_data_size - after.mm.compr_data_size,
        outcome.bytes_saved
    );
    assert!(outcome.bytes_saved > 0);
    for i in 0..256usize {
        assert_eq!(s.slots.peek(i).unwrap().priority(), 0, "page {i} was hot");
    }
    let algorithms = &after.recompression.algorithms;
    assert_eq!(algorithms.len(), 2);
    assert_eq!(algorithms[1].name, "zstd:level=9");
    assert_eq!(algorithms[1].pages, outcome.recompressed);
    for i in 0..2048 {
        assert_eq!(read(&s, i)[..], swap_page(i)[..], "page {i}");
    }
    s.check_consistency().unwrap();
    let again = s.recompress(&request("type=idle")).unwrap();
    assert_eq!(
        again.recompressed, 0,
        "reads cleared the idle flags: {again}"
    );
}

#[test]
fn huge_pages_no_secondary_shrinks_are_marked_and_never_tried_again() {
    let s = store(64, &["zstd", "deflate:level=6"]);
    let mut gen = PageGen::new(5);
    for i in 0..32 {
        s.write(i, &gen.page_of(PageKind::Random)).unwrap();
    }
    s.write(40, &gen.page_of(PageKind::Text)).unwrap();

    let first = s.recompress(&request("type=huge")).unwrap();
    let second = s.recompress(&request("type=huge")).unwrap();

    assert_eq!(
        (first.tried, first.incompressible, first.recompressed),
        (32, 32, 0)
    );
    assert_eq!(second.tried, 0);
    assert!(s.slots.peek(0).unwrap().is_incompressible());
    assert_eq!(
        s.slots.peek(40).unwrap().priority(),
        0,
        "not huge, not selected"
    );
    s.write(0, &gen.page_of(PageKind::Random)).unwrap();
    assert!(
        !s.slots.peek(0).unwrap().is_incompressible(),
        "a write clears the flag"
    );
    assert_eq!(s.stats().recompression.pages_incompressible, 32);
    s.check_consistency().unwrap();
}

#[test]
fn a_page_only_some_secondaries_tried_is_not_marked() {
    let s = store(8, &["zstd", "deflate"]);
    s.write(0, &PageGen::new(9).page_of(PageKind::Random))
        .unwrap();

    let outcome = s.recompress(&request("algo=zstd")).unwrap();

    assert_eq!((outcome.tried, outcome.incompressible), (1, 0));
    assert!(!s.slots.peek(0).unwrap().is_incompressible());
}

#[test]
fn threshold_and_max_pages_limit_the_pass_as_in_zram() {
    let s = store(512, &["zstd:level=19"]);
    let mut gen = PageGen::new(11);
    for i in 0..512 {
        s.write(i, &gen.page_of(PageKind::Text)).unwrap();
    }
    let sizes: Vec<usize> = (0..512)
        .map(|i| s.slots.peek(i).unwrap().compressed_size())
        .collect();
    let threshold = {
        let mut sorted = sizes.clone();
        sorted.sort_unstable();
        sorted[256]
    };

    let limited = s.recompress(&request("max_pages=10")).unwrap();
    let rest = s
        .recompress(&request(&format!("threshold={threshold}")))
        .unwrap();

    assert_eq!(limited.tried, 10);
    let big = sizes.iter().skip(10).filter(|&&n| n >= threshold).count() as u64;
    assert_eq!(rest.tried, big, "only objects of at least the threshold");
    for (i, &old) in sizes.iter().enumerate().skip(10) {
        let entry = s.slots.peek(i).unwrap();
        if entry.priority() == 1 {
            assert!(old >= threshold && entry.compressed_size() < threshold);
        }
    }
    s.check_consistency().unwrap();
}

#[test]
fn pages_move_up_the_priorities_and_never_down() {
    let s = store(256, &["zstd:level=1", "zstd:level=19"]);
    for i in 0..256 {
        s.write(i, &swap_page(i)).unwrap();
    }

    let first = s.recompress(&request("priority=1")).unwrap();
    let second = s.recompress(&request("priority=2")).unwrap();
    let priorities: Vec<usize> = (0..256)
        .map(|i| s.slots.peek(i).unwrap().priority())
        .collect();
    let at_primary = (0..256)
        .filter(|&i| selected(s.slots.peek(i).unwrap(), &request("priority=1"), 2))
        .count() as u64;
    let back = s.recompress(&request("priority=1")).unwrap();

    assert!(first.recompressed > 0 && second.recompressed > 0);
    assert_eq!(
        back.tried, at_primary,
        "only pages below priority 1 are tried"
    );
    for (i, &before) in priorities.iter().enumerate() {
        assert!(
            s.slots.peek(i).unwrap().priority() >= before,
            "page {i} moved down"
        );
    }
    for i in 0..256 {
        assert_eq!(read(&s, i)[..], swap_page(i)[..]);
    }
    s.check_consistency().unwrap();
}

#[test]
fn bad_requests_are_refused_with_a_sentence() {
    let none = store(4, &[]);
    let one = store(4, &["zstd"]);

    assert_eq!(
        none.recompress(&RecompressRequest::default()),
        Err(RecompressError::NoSecondary)
    );
    assert_eq!(
        one.recompress(&request("algo=deflate")),
        Err(RecompressError::NotSecondary(Algorithm::Deflate))
    );
    assert_eq!(
        one.recompress(&request("priority=2")),
        Err(RecompressError::NoSuchPriority(2))
    );
    for bad in [
        "type=cold",
        "threshold=x",
        "max_pages=0",
        "priority=4",
        "frob",
        "x=1",
    ] {
        let error = bad.parse::<RecompressRequest>().unwrap_err();
        assert!(error.to_string().contains('\''), "{bad}: {error}");
    }
    assert!(PageStore::new(config(4))
        .unwrap()
        .with_secondary_algorithms(&[spec("zstd"); 4])
        .is_err());
    assert!("zstd:level=30".parse::<AlgorithmSpec>().is_err());
    assert!("lz4:level=1".parse::<AlgorithmSpec>().is_err());
    assert!("zstd:dict=x".parse::<AlgorithmSpec>().is_err());
}

#[test]
fn requests_and_specs_print_as_they_parse() {
    for text in [
        "type=all",
        "type=idle threshold=3000",
        "type=huge_idle max_pages=5 algo=zstd",
        "type=huge priority=2",
    ] {
        assert_eq!(request(text).to_string(), text);
    }
    assert_eq!(spec("zstd").to_string(), "zstd:level=1");
    assert_eq!(spec("deflate:level=9").to_string(), "deflate:level=9");
    assert_eq!(spec("lz4").to_string(), "lz4");
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        index: u64,
        seed: u64,
    },
    Read {
        index: u64,
    },
    Discard {
        index: u64,
    },
    MarkIdle,
    Recompress {
        mode: RecompressMode,
        threshold: usize,
    },
    Compact,
}

const MODEL_PAGES: u64 = 32;

fn op() -> impl Strategy<Value = Op> {
    let mode = prop_oneof![
        Just(RecompressMode::All),
        Just(RecompressMode::Idle),
        Just(RecompressMode::Huge),
        Just(RecompressMode::HugeIdle),
    ];
    prop_oneof![
        6 => (0..MODEL_PAGES, any::<u64>()).prop_map(|(index, seed)| Op::Write { index, seed }),
        4 => (0..MODEL_PAGES).prop_map(|index| Op::Read { index }),
        1 => (0..MODEL_PAGES).prop_map(|index| Op::Discard { index }),
        2 => Just(Op::MarkIdle),
        2 => (mode, prop_oneof![Just(0usize), 0..4096usize])
            .prop_map(|(mode, threshold)| Op::Recompress { mode, threshold }),
        1 => Just(Op::Compact),
    ]
}

/// Runs `ops` against the store and a model of page contents and idle flags: every read is
/// checked, idle flags must match the model exactly, and a page held by a secondary algorithm
/// must have been selected by some pass since it was last written.
fn run_model(s: &PageStore, ops: &[Op]) {
    let mut pages = vec![[0u8; PAGE_SIZE]; MODEL_PAGES as usize];
    let mut idle = [false; MODEL_PAGES as usize];
    let mut selected_since_write = [false; MODEL_PAGES as usize];
    for op in ops {
        match *op {
            Op::Write { index, seed } => {
                let i = index as usize;
                fill_page(seed, index, &mut pages[i]);
                s.write(index, &pages[i]).unwrap();
                (idle[i], selected_since_write[i]) = (false, false);
            }
            Op::Read { index } => {
                assert_eq!(
                    read(s, index)[..],
                    pages[index as usize][..],
                    "page {index}"
                );
                idle[index as usize] = false;
            }
            Op::Discard { index } => {
                s.discard(index..index + 1).unwrap();
                let i = index as usize;
                (pages[i], idle[i], selected_since_write[i]) = ([0; PAGE_SIZE], false, false);
            }
            Op::MarkIdle => {
                s.mark_idle();
                for (i, flag) in idle.iter_mut().enumerate() {
                    *flag = holds_page(s.slots.peek(i).unwrap());
                }
            }
            Op::Recompress { mode, threshold } => {
                let request = RecompressRequest {
                    mode,
                    threshold,
                    ..RecompressRequest::default()
                };
                for (i, flag) in selected_since_write.iter_mut().enumerate() {
                    *flag |= selected(s.slots.peek(i).unwrap(), &request, 3);
                }
                s.recompress(&request).unwrap();
            }
            Op::Compact => {
                s.compact();
            }
        }
        for i in 0..MODEL_PAGES as usize {
            let entry = s.slots.peek(i).unwrap();
            assert_eq!(entry.is_idle(), idle[i], "idle flag of page {i}");
            assert!(
                entry.priority() == 0 || selected_since_write[i],
                "page {i} was recompressed without being selected"
            );
        }
    }
    for index in 0..MODEL_PAGES {
        assert_eq!(
            read(s, index)[..],
            pages[index as usize][..],
            "page {index}"
        );
    }
    s.check_consistency().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn recompression_matches_a_model_of_contents_and_idle_flags(
        ops in prop::collection::vec(op(), 1..200)
    ) {
        run_model(&store(MODEL_PAGES, &["zstd", "deflate:level=9"]), &ops);
    }
}

/// A page that names its writer, so a reader can tell a whole page from a torn or stale one.
fn signed_page(seed: u64, index: u64) -> [u8; PAGE_SIZE] {
    let mut page = [0u8; PAGE_SIZE];
    fill_page(seed, index, &mut page);
    page[..8].copy_from_slice(&seed.to_le_bytes());
    page[8..16].copy_from_slice(&index.to_le_bytes());
    page
}

/// Threads write, read and discard their own pages (each checked against its own model) while
/// other threads mark idle and recompress every page in a loop, with compression workers
/// installing pending pages meanwhile.
#[test]
fn concurrent_writes_reads_discards_recompression_and_idle_marks_lose_nothing() {
    const THREADS: u64 = 3;
    const OWN: u64 = 24;
    let pages = THREADS * OWN;
    let s = Arc::new(
        PageStore::with_pending(
            config(pages),
            PendingConfig {
                workers: 1,
                max_pending_pages: 8,
            },
        )
        .unwrap()
        .with_secondary_algorithms(&[spec("zstd"), spec("deflate:level=6")])
        .unwrap(),
    );
    let workers = crate::store::tests::TestWorkers::start(&s);
    let done = Arc::new(AtomicBool::new(false));
    let recompressors: Vec<_> = (0..2)
        .map(|r| {
            let (s, done) = (Arc::clone(&s), Arc::clone(&done));
            std::thread::spawn(move || {
                let modes = ["type=idle", "", "type=huge", "type=huge_idle", "priority=2"];
                let mut round = 0;
                while !done.load(Ordering::Relaxed) {
                    s.mark_idle();
                    s.recompress(&request(modes[(round + r) % modes.len()]))
                        .unwrap();
                    round += 1;
                }
                round
            })
        })
        .collect();
    let writers: Vec<_> = (0..THREADS)
        .map(|t| {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                let mut rng = SplitMix64::new(t);
                let mut model = vec![[0u8; PAGE_SIZE]; OWN as usize];
                let mut out = [0u8; PAGE_SIZE];
                for step in 0..4000u64 {
                    let own = rng.below(OWN);
                    let index = t * OWN + own;
                    match rng.below(8) {
                        0..3 => {
                            model[own as usize] = signed_page(t << 32 | step, index);
                            s.write_with(index, |b| {
                                b.copy_from_slice(&model[own as usize]);
                                Ok::<(), ()>(())
                            })
                            .unwrap()
                            .unwrap();
                        }
                        3 => {
                            s.discard(index..index + 1).unwrap();
                            model[own as usize] = [0; PAGE_SIZE];
                        }
                        _ => {
                            s.read(index, &mut out).unwrap();
                            assert_eq!(out[..], model[own as usize][..], "page {index}");
                        }
                    }
                }
                model
            })
        })
        .collect();
    let models: Vec<_> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    done.store(true, Ordering::Relaxed);
    let rounds: usize = recompressors.into_iter().map(|r| r.join().unwrap()).sum();
    assert!(s.wait_drained(std::time::Duration::from_secs(10)));
    workers.stop();

    for (t, model) in models.iter().enumerate() {
        for (own, page) in model.iter().enumerate() {
            let index = t as u64 * OWN + own as u64;
            assert_eq!(read(&s, index)[..], page[..], "page {index}");
        }
    }
    assert!(rounds > 2, "the recompressors ran {rounds} passes");
    assert!(s.stats().recompression.pages_recompressed > 0);
    s.check_consistency().unwrap();
}

/// One page, rewritten over and over, while another thread recompresses it over and over:
/// every write must be the page's content afterwards (the write that raced a recompression
/// of the previous version is not lost).
#[test]
fn a_recompression_racing_a_write_of_the_same_page_never_loses_the_write() {
    let s = Arc::new(store(1, &["zstd:level=3"]));
    let done = Arc::new(AtomicBool::new(false));
    let replaced = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let recompressor = {
        let (s, done, replaced) = (Arc::clone(&s), Arc::clone(&done), Arc::clone(&replaced));
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                s.mark_idle();
                let outcome = s.recompress(&request("type=idle")).unwrap();
                replaced.fetch_add(outcome.recompressed, Ordering::Relaxed);
            }
        })
    };
    let mut out = [0u8; PAGE_SIZE];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut step = 0u64;
    // At least 20000 rounds, and on until the recompressor has replaced the page at least
    // once (a loaded machine may starve it for a while), within a bound.
    while step < 20_000
        || (replaced.load(Ordering::Relaxed) == 0 && std::time::Instant::now() < deadline)
    {
        let page = signed_page(step, 0);
        s.write(0, &page).unwrap();
        s.read(0, &mut out).unwrap();
        assert_eq!(out[..], page[..], "write {step} was lost");
        step += 1;
    }
    done.store(true, Ordering::Relaxed);
    recompressor.join().unwrap();
    assert!(
        replaced.load(Ordering::Relaxed) > 0,
        "the recompressor never won a race"
    );
    s.check_consistency().unwrap();
}

#[test]
fn a_trained_dictionary_shrinks_recompressed_pages_and_older_pages_keep_decoding() {
    let plain = store(4096, &["zstd:level=3"]);
    let with_dict = store(4096, &["zstd:level=3"]);
    for s in [&plain, &with_dict] {
        for i in 0..4096 {
            s.write(i, &swap_page(i)).unwrap();
        }
    }
    plain.recompress(&request("max_pages=1000")).unwrap();
    with_dict.recompress(&request("max_pages=1000")).unwrap(); // under no dictionary

    let trained = with_dict
        .train_zstd_dictionary(&TrainRequest {
            samples: 1024,
            size: 16 << 10,
        })
        .unwrap();
    let rest_plain = plain.recompress(&RecompressRequest::default()).unwrap();
    let rest_dict = with_dict.recompress(&RecompressRequest::default()).unwrap();
    let again = with_dict
        .train_zstd_dictionary(&TrainRequest {
            samples: 512,
            size: 8 << 10,
        })
        .unwrap();

    assert!(trained.samples >= 1000, "{trained}");
    assert!(
        rest_dict.bytes_saved > rest_plain.bytes_saved,
        "with the dictionary {rest_dict}, without {rest_plain}"
    );
    let r = with_dict.stats().recompression;
    assert_eq!(r.zstd_dictionaries, vec![trained.id, again.id]);
    assert_eq!(r.zstd_dictionary, Some(again.id));
    assert_eq!(r.dictionary_bytes, (trained.bytes + again.bytes) as u64);
    for i in 0..4096 {
        assert_eq!(read(&with_dict, i)[..], swap_page(i)[..], "page {i}");
    }
    with_dict.check_consistency().unwrap();
    assert_eq!(
        store(4, &["deflate"]).load_zstd_dictionary(b"x"),
        Err(RecompressError::NoZstd)
    );
    assert!(matches!(
        store(4, &["zstd"]).train_zstd_dictionary(&TrainRequest::default()),
        Err(RecompressError::TooFewSamples(0))
    ));
}

#[test]
fn at_the_memory_limit_a_page_is_kept_and_not_marked_incompressible() {
    let s = PageStore::new(StoreConfig {
        mem_limit: Some(1 << 20),
        ..config(256)
    })
    .unwrap()
    .with_secondary_algorithms(&[spec("zstd:level=9")])
    .unwrap();
    let mut gen = PageGen::new(21);
    let mut written = Vec::new();
    for i in 0..256 {
        let page = gen.page_of(PageKind::Text);
        if s.write(i, &page).is_err() {
            break;
        }
        written.push(page);
    }
    // Fill what is left of the limit so that no new object fits.
    s.set_mem_limit(Some(s.mem_used_total()));

    let outcome = s.recompress(&RecompressRequest::default()).unwrap();

    assert!(
        outcome.recompressed < outcome.tried,
        "the limit refused none: {outcome}"
    );
    assert_eq!(outcome.incompressible, 0, "{outcome}");
    for (i, page) in written.iter().enumerate() {
        assert_eq!(read(&s, i as u64)[..], page[..]);
    }
    s.check_consistency().unwrap();
}

#[test]
fn repeated_parameters_algorithms_and_levels_are_refused_with_sentences() {
    let refused = |text: &str| text.parse::<RecompressRequest>().unwrap_err().to_string();
    assert_eq!(
        refused("type=idle type=huge"),
        "'type=' is given more than once; give each parameter once"
    );
    assert!(refused("max_pages=5 max_pages=6").contains("'max_pages=' is given more than once"));
    assert!(refused("algo=zstd priority=1").contains("not both"));
    assert!(refused("priority=1 algo=zstd").contains("not both"));
    assert!("samples=32 samples=64"
        .parse::<TrainRequest>()
        .unwrap_err()
        .to_string()
        .contains("'samples=' is given more than once"));
    assert_eq!(
        "zstd:level=3:level=4"
            .parse::<AlgorithmSpec>()
            .unwrap_err()
            .to_string(),
        "'zstd:level=3:level=4' gives the level more than once; give level=N once"
    );

    let lz4 = spec("lz4");
    let secondaries = |texts: &[&str]| texts.iter().map(|t| spec(t)).collect::<Vec<_>>();
    let three_zstd = secondaries(&["zstd", "zstd", "zstd"]);
    assert_eq!(
        validate_secondaries(lz4, &three_zstd)
            .unwrap_err()
            .to_string(),
        "the recompression algorithm zstd:level=1 is given more than once; give each once"
    );
    // A level left out is the default level: `zstd` and `zstd:level=1` are the same.
    assert!(validate_secondaries(lz4, &secondaries(&["zstd", "zstd:level=1"])).is_err());
    assert!(validate_secondaries(lz4, &secondaries(&["lz4"]))
        .unwrap_err()
        .to_string()
        .contains("lz4 is the device's own algorithm"));
    assert!(validate_secondaries(spec("zstd:level=3"), &secondaries(&["zstd:level=3"])).is_err());
    assert!(validate_secondaries(lz4, &secondaries(&["zstd", "deflate", "zstd:level=9"])).is_ok());
    assert!(validate_secondaries(spec("zstd"), &secondaries(&["zstd:level=19"])).is_ok());
    assert_eq!(
        PageStore::new(config(4))
            .unwrap()
            .with_secondary_algorithms(&three_zstd)
            .err(),
        Some(RecompressError::RepeatedSecondary(spec("zstd")))
    );
    assert_eq!(
        PageStore::new(config(4))
            .unwrap()
            .with_secondary_algorithms(&[lz4])
            .err(),
        Some(RecompressError::SameAsPrimary(lz4))
    );
}

#[test]
fn algo_naming_two_levels_of_one_algorithm_asks_for_a_priority() {
    let s = store(4, &["zstd:level=1", "zstd:level=19"]);

    let ambiguous = s.recompress(&request("algo=zstd")).unwrap_err();

    assert_eq!(
        ambiguous,
        RecompressError::AmbiguousAlgorithm(Algorithm::Zstd, vec![1, 2])
    );
    assert!(ambiguous
        .to_string()
        .contains("give priority= to choose one"));
    assert!(s.recompress(&request("priority=2")).is_ok());
}

#[test]
fn training_memory_is_bounded_and_checked_against_the_memory_limit() {
    let too_many = format!("samples={}", MAX_TRAIN_SAMPLES + 1);
    assert!(too_many.parse::<TrainRequest>().is_err());
    let s = PageStore::new(StoreConfig {
        mem_limit: Some(1 << 20),
        ..config(512)
    })
    .unwrap()
    .with_secondary_algorithms(&[spec("zstd")])
    .unwrap();
    for i in 0..64 {
        s.write(i, &swap_page(i)).unwrap();
    }

    let refused = s.train_zstd_dictionary(&TrainRequest {
        samples: 1024,
        size: 4096,
    });
    let trained = s.train_zstd_dictionary(&TrainRequest {
        samples: 64,
        size: 4096,
    });

    assert_eq!(
        refused,
        Err(RecompressError::TrainingMemory {
            samples: 1024,
            bytes: 4 << 20
        })
    );
    let trained = trained.unwrap();
    assert!(trained.samples >= 16, "{trained:?}");
    // The samples are no longer counted; the dictionary is.
    assert_eq!(s.recompression.dictionary_bytes(), trained.bytes as u64);
}

#[test]
fn a_recompression_pass_gives_its_memory_back_and_never_raises_mem_used_max() {
    let s = store(4096, &["zstd:level=9"]);
    for i in 0..4096 {
        s.write(i, &swap_page(i)).unwrap();
    }
    let before = s.stats().mm;
    s.mark_idle();

    let outcome = s.recompress(&request("type=idle")).unwrap();

    let after = s.stats().mm;
    assert!(outcome.recompressed > 1000, "{outcome}");
    assert!(outcome.pages_given_back > 0, "{outcome}");
    assert!(
        after.mem_used_total < before.mem_used_total,
        "mem_used_total {} after the pass, {} before ({outcome})",
        after.mem_used_total,
        before.mem_used_total
    );
    assert_eq!(after.mem_used_max, before.mem_used_max, "{outcome}");
    assert!(outcome
        .to_string()
        .ends_with(&format!("gave back {} pages", outcome.pages_given_back)));
    for i in 0..4096 {
        assert_eq!(read(&s, i)[..], swap_page(i)[..], "page {i}");
    }
    s.check_consistency().unwrap();
}
