// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `pressure`: a static guest program that puts a VM under memory pressure with data it can verify.
//!
//! It allocates N MiB of page-aligned anonymous memory, writes every 4 KiB page with a pattern
//! that is a pure function of `(seed, page index)`, then re-reads and verifies every page
//! (forward, then backward, so pages go out to swap and come back in a different order). The
//! mix of page kinds is what a swap device sees in practice and what exercises the compressed
//! store's special cases:
//!
//! | kind         | share  | content                                                   |
//! |--------------|--------|-----------------------------------------------------------|
//! | zero         | 4/16   | all zero bytes (zram stores these as `same_pages`)        |
//! | same-filled  | 1/16   | one repeated non-zero 8-byte word (also `same_pages`)     |
//! | compressible | 6/16   | a 64-byte record repeated with a per-record counter       |
//! | random       | 5/16   | incompressible pseudo-random words                        |
//!
//! With `--hold-marker TEXT` it prints `TEXT` after the first verification pass and waits for
//! one line on stdin before the next pass, so the host can inspect the device (its `mm_stat`)
//! while the pages are still out on swap.
//!
//! The last line is `PRESSURE-RESULT ok ...` or `PRESSURE-RESULT FAIL ...`; the exit status is 0
//! only when every page of every pass verified.

use std::ffi::c_void;
use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::time::Instant;

const PAGE_SIZE: usize = 4096;
const WORDS_PER_PAGE: usize = PAGE_SIZE / 8;
/// How many bad pages are described in detail before the rest are only counted.
const MAX_REPORTED_BAD_PAGES: u64 = 8;

/// SplitMix64 finaliser: a good 64-bit mixing function.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What a page holds; decided by a hash of the seed and the page index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PageKind {
    Zero,
    SameFilled,
    Compressible,
    Random,
}

impl PageKind {
    fn of(seed: u64, index: u64) -> PageKind {
        match mix(seed ^ mix(index)) % 16 {
            0..=3 => PageKind::Zero,
            4 => PageKind::SameFilled,
            5..=10 => PageKind::Compressible,
            _ => PageKind::Random,
        }
    }
}

/// The expected 8-byte word `w` of page `index`.
fn expected_word(seed: u64, index: u64, kind: PageKind, w: usize) -> u64 {
    let page_key = mix(seed.rotate_left(17) ^ index);
    match kind {
        PageKind::Zero => 0,
        // `| 1` keeps the word non-zero, so the page is same-filled but not a zero page.
        PageKind::SameFilled => page_key | 1,
        PageKind::Compressible => {
            // 8-word records: index, seed, a record counter and five constant words.
            let record = (w / 8) as u64;
            match w % 8 {
                0 => index,
                1 => seed,
                2 => record,
                3 => page_key,
                _ => 0x2020_2020_2020_2020,
            }
        }
        PageKind::Random => mix(page_key ^ (w as u64).wrapping_mul(0xa076_1d64_78bd_642f)),
    }
}

// mmap(2) and munmap(2) from the C library std links anyway (the program has no dependencies).
extern "C" {
    fn mmap(addr: *mut c_void, len: usize, prot: i32, flags: i32, fd: i32, off: i64)
        -> *mut c_void;
    fn munmap(addr: *mut c_void, len: usize) -> i32;
}
const PROT_READ: i32 = 0x1;
const PROT_WRITE: i32 = 0x2;
const MAP_PRIVATE: i32 = 0x02;
const MAP_ANONYMOUS: i32 = 0x20;
const MAP_FAILED: *mut c_void = !0usize as *mut c_void;

/// Page-aligned anonymous memory straight from mmap, unmapped on drop.
///
/// Not `alloc_zeroed`: for a page-aligned layout it is `malloc` and a `memset`, which faults
/// every page in before the fill does and swaps the zeroed pages out as such. A kernel that
/// keeps zero-filled pages out of swap I/O (6.12's zeromap) then swaps the pattern back in a
/// page at a time, and the large folios (mTHP) the first faults made never reach the disk.
struct PageBuffer {
    ptr: *mut u64,
    len: usize,
    pages: usize,
}

impl PageBuffer {
    fn new(pages: usize) -> Result<PageBuffer, String> {
        let len = pages
            .checked_mul(PAGE_SIZE)
            .filter(|&len| len > 0)
            .ok_or_else(|| format!("bad buffer size for {pages} pages"))?;
        // SAFETY: a new private anonymous mapping at an address of the kernel's choosing
        // touches no existing memory; the result is checked against MAP_FAILED.
        let ptr = unsafe {
            mmap(
                std::ptr::null_mut(),
                len,
                PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == MAP_FAILED {
            return Err(format!(
                "cannot map {len} bytes: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(PageBuffer {
            ptr: ptr.cast::<u64>(),
            len,
            pages,
        })
    }

    /// The words of page `index`.
    fn page_mut(&mut self, index: usize) -> &mut [u64] {
        assert!(index < self.pages);
        // SAFETY: `ptr` points to `pages * WORDS_PER_PAGE` u64s of a mapping owned by `self`
        // (anonymous memory reads as zeros until written, so they are initialised), `index < pages` so the range is in bounds, and `&mut self` makes it unique.
        unsafe {
            std::slice::from_raw_parts_mut(self.ptr.add(index * WORDS_PER_PAGE), WORDS_PER_PAGE)
        }
    }
}

impl Drop for PageBuffer {
    fn drop(&mut self) {
        // SAFETY: `ptr` and `len` are the mapping `new` made, unmapped only here; no reference
        // into it outlives `self`.
        unsafe { munmap(self.ptr.cast::<c_void>(), self.len) };
    }
}

#[derive(Default)]
struct KindCounts {
    zero: u64,
    same: u64,
    compressible: u64,
    random: u64,
}

fn fill(buf: &mut PageBuffer, seed: u64) -> KindCounts {
    let mut counts = KindCounts::default();
    for index in 0..buf.pages {
        let kind = PageKind::of(seed, index as u64);
        match kind {
            PageKind::Zero => counts.zero += 1,
            PageKind::SameFilled => counts.same += 1,
            PageKind::Compressible => counts.compressible += 1,
            PageKind::Random => counts.random += 1,
        }
        let page = buf.page_mut(index);
        for (w, word) in page.iter_mut().enumerate() {
            // Volatile, so zero pages are really written (and so faulted in), not skipped.
            // SAFETY: `word` is a valid, aligned, exclusive reference.
            unsafe { std::ptr::write_volatile(word, expected_word(seed, index as u64, kind, w)) };
        }
    }
    counts
}

/// Verifies every page, in the given order; returns the number of bad pages.
fn verify(buf: &mut PageBuffer, seed: u64, backward: bool) -> u64 {
    let mut bad = 0u64;
    let pages = buf.pages;
    for step in 0..pages {
        let index = if backward { pages - 1 - step } else { step };
        let kind = PageKind::of(seed, index as u64);
        let page = buf.page_mut(index);
        let first_bad = page.iter().enumerate().find(|&(w, word)| {
            // SAFETY: `word` is a valid, aligned reference.
            let got = unsafe { std::ptr::read_volatile(word) };
            got != expected_word(seed, index as u64, kind, w)
        });
        if let Some((w, got)) = first_bad {
            if bad < MAX_REPORTED_BAD_PAGES {
                println!(
                    "PRESSURE-BAD page={index} kind={kind:?} word={w} got={got:#018x} want={:#018x}",
                    expected_word(seed, index as u64, kind, w)
                );
            }
            bad += 1;
        }
    }
    bad
}

struct Args {
    mib: usize,
    seed: u64,
    passes: u32,
    hold_marker: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        mib: 64,
        seed: 1,
        passes: 2,
        hold_marker: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--mib" => args.mib = value()?.parse().map_err(|e| format!("--mib: {e}"))?,
            "--seed" => args.seed = value()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--passes" => args.passes = value()?.parse().map_err(|e| format!("--passes: {e}"))?,
            "--hold-marker" => args.hold_marker = Some(value()?),
            "-h" | "--help" => {
                return Err(
                    "usage: pressure [--mib N] [--seed S] [--passes P] [--hold-marker TEXT]"
                        .to_string(),
                )
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.mib == 0 || args.passes == 0 {
        return Err("--mib and --passes must be positive".to_string());
    }
    Ok(args)
}

fn run(args: &Args) -> Result<u64, String> {
    let pages = args.mib * 1024 * 1024 / PAGE_SIZE;
    let start = Instant::now();
    let mut buf = PageBuffer::new(pages)?;
    let counts = fill(&mut buf, args.seed);
    println!(
        "PRESSURE-FILLED pages={pages} zero={} same={} compressible={} random={} secs={:.1}",
        counts.zero,
        counts.same,
        counts.compressible,
        counts.random,
        start.elapsed().as_secs_f64()
    );
    let mut bad_total = 0;
    for pass in 0..args.passes {
        let backward = pass % 2 == 1;
        let bad = verify(&mut buf, args.seed, backward);
        println!(
            "PRESSURE-PASS pass={pass} order={} bad={bad} secs={:.1}",
            if backward { "backward" } else { "forward" },
            start.elapsed().as_secs_f64()
        );
        bad_total += bad;
        if pass == 0 {
            if let Some(marker) = &args.hold_marker {
                println!("{marker}");
                std::io::stdout()
                    .flush()
                    .map_err(|e| format!("stdout: {e}"))?;
                let mut line = String::new();
                std::io::stdin()
                    .lock()
                    .read_line(&mut line)
                    .map_err(|e| format!("reading the host's answer: {e}"))?;
            }
        }
    }
    Ok(bad_total)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("pressure: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(0) => {
            println!(
                "PRESSURE-RESULT ok mib={} seed={} passes={}",
                args.mib, args.seed, args.passes
            );
            ExitCode::SUCCESS
        }
        Ok(bad) => {
            println!(
                "PRESSURE-RESULT FAIL bad_pages={bad} mib={} seed={}",
                args.mib, args.seed
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            println!("PRESSURE-RESULT FAIL {e}");
            ExitCode::FAILURE
        }
    }
}
