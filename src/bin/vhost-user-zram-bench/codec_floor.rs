// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The codec floor: the CPU time the run's algorithm needs per page, measured in this process
//! on the pages the workload writes, through the crate's own codec, counted the way the
//! daemon spends it. The daemon's CPU per request can only come down to this figure; what it
//! spends above it is the request path (virtqueue, slot table, allocator, threads).
//!
//! Each page is classified once, as the store does in `PageStore::encode`:
//!
//! - *same-filled* (one 8-byte word repeated): the write costs the detection scan and no codec
//!   call; the read regenerates the page from the word (a 4 KiB fill);
//! - *raw* (compressed above [`HUGE_THRESHOLD`] bytes, or not compressible into the store's
//!   two-page buffer): the write costs the detection and the compression attempt; the read
//!   is a 4 KiB copy;
//! - *compressed*: detection and compression; the read decompresses.
//!
//! A compress pass runs detection and, where the store would, the codec over every page; a
//! decompress pass regenerates every page from what the store would keep. Passes are timed
//! with this thread's CPU clock (so time the scheduler gives other processes does not count),
//! as many in a row as make a sample of at least a millisecond (the clock may not move over
//! one short pass); samples alternate until together they take [`TARGET_CPU`] (at least
//! [`MIN_PASSES`] passes each), and the best sample of each kind, per pass, is the floor: the
//! least the codec needed for this page mix.

use std::hint::black_box;
use std::str::FromStr;
use std::time::Duration;

use vhost_user_zram::codec::{Algorithm, Codec, COMPRESS_BUFFER};
use vhost_user_zram::store::{same_fill, HUGE_THRESHOLD};
use vhost_user_zram::PAGE_SIZE;

use crate::workload::Phase;

/// CPU time the passes take together before the floor is taken.
pub const TARGET_CPU: Duration = Duration::from_millis(200);
/// Passes of each kind at least, however long they take.
pub const MIN_PASSES: u32 = 3;
/// Pages measured at most: a larger corpus is sampled evenly, so the measurement stays well
/// under a second (the default pool is this size).
pub const MAX_PAGES: usize = 16384;
/// Passes of each kind at most, for a small page set that takes far less than the target.
const MAX_PASSES: u32 = 100_000;

/// The floor, per 4 KiB page, averaged over the page mix the workload writes.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CodecFloor {
    /// The algorithm measured (`--algorithm`).
    pub algorithm: String,
    /// Its level (`--algorithm-level`; `None`: the algorithm's default).
    pub algorithm_level: Option<i32>,
    /// Pages measured (the pool or corpus, sampled evenly above [`MAX_PAGES`]).
    pub pages: usize,
    /// Passes of each kind timed.
    pub passes: u32,
    /// The best compress pass's CPU time per page, in microseconds: same-filled detection for
    /// every page, compression for every page that is not same-filled.
    pub compress_us_per_page: f64,
    /// The best decompress pass's CPU time per page, in microseconds: a fill for same-filled
    /// pages, a 4 KiB copy for raw ones, decompression for the rest.
    pub decompress_us_per_page: f64,
    /// Same-filled pages among those measured, in percent.
    pub same_filled_percent: f64,
    /// Pages stored raw (huge), in percent.
    pub raw_percent: f64,
}

/// What the store keeps of one page.
enum Stored {
    /// One word, repeated.
    SameFilled(u64),
    /// The page itself: it compressed above the huge threshold, or not at all.
    Raw,
    /// The compressed object.
    Compressed(Vec<u8>),
}

impl CodecFloor {
    /// Measures `algorithm` at `level` on `pages`: [`MIN_PASSES`] passes of each kind at least,
    /// until they take `target` CPU time together.
    pub fn measure(
        algorithm: &str,
        level: Option<i32>,
        pages: &[[u8; PAGE_SIZE]],
        target: Duration,
    ) -> Result<CodecFloor, String> {
        let codec = Algorithm::from_str(algorithm)
            .and_then(|a| a.codec(level))
            .map_err(|e| format!("codec floor: {e}"))?;
        let sample = sample(pages);
        if sample.is_empty() {
            return Err("codec floor: no pages to measure".into());
        }
        let stored: Vec<Stored> = sample.iter().map(|page| store(&*codec, page)).collect();
        let mut scratch = vec![0u8; COMPRESS_BUFFER];
        let mut out = [0u8; PAGE_SIZE];
        // A timed sample repeats a pass until it lasts MIN_SAMPLE: the thread CPU clock may
        // not move over a pass of a few pages (seen: a best pass of 0 ns over 3 pages).
        let mut compress_sample = |reps: u32| {
            thread_cpu(|| {
                for _ in 0..reps {
                    compress_pass(&*codec, &sample, &mut scratch);
                }
            })
            .map(|((), spent)| spent)
        };
        let compress_reps = calibrate(&mut compress_sample)?;
        let mut decompress_sample = |reps: u32| {
            let (decoded, spent) = thread_cpu(|| {
                (0..reps).try_for_each(|_| decompress_pass(&*codec, &sample, &stored, &mut out))
            })?;
            decoded.map(|()| spent)
        };
        let decompress_reps = calibrate(&mut decompress_sample)?;
        let mut best_compress = Duration::MAX;
        let mut best_decompress = Duration::MAX;
        let mut spent = Duration::ZERO;
        let mut passes = 0;
        while passes < MIN_PASSES || (spent < target && passes < MAX_PASSES) {
            let compress = compress_sample(compress_reps)?;
            let decompress = decompress_sample(decompress_reps)?;
            best_compress = best_compress.min(compress / compress_reps);
            best_decompress = best_decompress.min(decompress / decompress_reps);
            spent += compress + decompress;
            passes += compress_reps.min(decompress_reps);
        }
        let count = sample.len() as f64;
        let share =
            |f: fn(&Stored) -> bool| stored.iter().filter(|s| f(s)).count() as f64 * 100.0 / count;
        Ok(CodecFloor {
            algorithm: algorithm.to_owned(),
            algorithm_level: level,
            pages: sample.len(),
            passes,
            compress_us_per_page: best_compress.as_secs_f64() * 1e6 / count,
            decompress_us_per_page: best_decompress.as_secs_f64() * 1e6 / count,
            same_filled_percent: share(|s| matches!(s, Stored::SameFilled(_))),
            raw_percent: share(|s| matches!(s, Stored::Raw)),
        })
    }

    /// The floor of one request of `pages_per_request` pages in `phase`: compression for the
    /// write phases, decompression for reads, 70 % / 30 % of the two for the mixed
    /// phase (its read share).
    pub fn us_per_request(&self, phase: Phase, pages_per_request: u64) -> f64 {
        let per_page = match phase {
            Phase::Fill | Phase::RandWrite | Phase::Burst => self.compress_us_per_page,
            Phase::RandRead | Phase::SeqRead => self.decompress_us_per_page,
            Phase::Mixed => 0.7 * self.decompress_us_per_page + 0.3 * self.compress_us_per_page,
        };
        per_page * pages_per_request as f64
    }

    /// The line the tables open with.
    pub fn line(&self) -> String {
        format!(
            "codec floor ({}{}, this page mix): compress {:.2} µs/page, decompress {:.2} µs/page \
             (same-filled {:.1} %, raw {:.1} %; best of {} passes over {} pages)",
            self.algorithm,
            self.algorithm_level
                .map(|l| format!(" level {l}"))
                .unwrap_or_default(),
            self.compress_us_per_page,
            self.decompress_us_per_page,
            self.same_filled_percent,
            self.raw_percent,
            self.passes,
            self.pages,
        )
    }
}

/// Every page, or [`MAX_PAGES`] of them taken at an even stride.
fn sample(pages: &[[u8; PAGE_SIZE]]) -> Vec<&[u8; PAGE_SIZE]> {
    let stride = pages.len().div_ceil(MAX_PAGES).max(1);
    pages.iter().step_by(stride).collect()
}

/// What the store would keep of `page` (`PageStore::encode` and `store_object`).
fn store(codec: &dyn Codec, page: &[u8; PAGE_SIZE]) -> Stored {
    if let Some(word) = same_fill::detect(page) {
        return Stored::SameFilled(word);
    }
    let mut scratch = vec![0u8; COMPRESS_BUFFER];
    match codec.compress(page, &mut scratch) {
        Ok(len) if (1..=HUGE_THRESHOLD).contains(&len) => {
            scratch.truncate(len);
            Stored::Compressed(scratch)
        }
        Ok(_) | Err(_) => Stored::Raw,
    }
}

/// Detection for every page, and the codec for every page that is not same-filled.
fn compress_pass(codec: &dyn Codec, pages: &[&[u8; PAGE_SIZE]], scratch: &mut [u8]) {
    for &page in pages {
        if black_box(same_fill::detect(black_box(page))).is_none() {
            let _ = black_box(codec.compress(page, scratch));
        }
    }
}

/// Every page regenerated from what the store keeps of it.
fn decompress_pass(
    codec: &dyn Codec,
    pages: &[&[u8; PAGE_SIZE]],
    stored: &[Stored],
    out: &mut [u8; PAGE_SIZE],
) -> Result<(), String> {
    for (&page, stored) in pages.iter().zip(stored) {
        match stored {
            Stored::SameFilled(word) => same_fill::fill(out, black_box(*word)),
            Stored::Raw => out.copy_from_slice(black_box(page)),
            Stored::Compressed(object) => codec
                .decompress(object, out)
                .map_err(|e| format!("codec floor: {e}"))?,
        }
        black_box(&mut *out);
    }
    Ok(())
}

/// Runs `work` and returns its result with the CPU time this thread spent on it.
fn thread_cpu<T>(work: impl FnOnce() -> T) -> Result<(T, Duration), String> {
    let before = thread_cpu_now()?;
    let result = work();
    let after = thread_cpu_now()?;
    Ok((result, after.saturating_sub(before)))
}

/// The shortest timed sample: long enough for the thread CPU clock to measure.
const MIN_SAMPLE: Duration = Duration::from_millis(1);

/// How many passes a timed sample repeats so that it lasts [`MIN_SAMPLE`] (doubling from one;
/// at most [`MAX_PASSES`]).
fn calibrate(sample: &mut impl FnMut(u32) -> Result<Duration, String>) -> Result<u32, String> {
    let mut reps = 1;
    while reps < MAX_PASSES && sample(reps)? < MIN_SAMPLE {
        reps *= 2;
    }
    Ok(reps)
}

/// This thread's CPU clock.
fn thread_cpu_now() -> Result<Duration, String> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec for the duration of the call.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) } != 0 {
        return Err(format!(
            "codec floor: the thread CPU clock: {}",
            std::io::Error::last_os_error()
        ));
    }
    let seconds = u64::try_from(now.tv_sec).unwrap_or(0);
    let nanos = u32::try_from(now.tv_nsec).unwrap_or(0);
    Ok(Duration::new(seconds, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One zero page, one of random bytes (stored raw), one of text (compressed).
    fn three_pages() -> Vec<[u8; PAGE_SIZE]> {
        let zero = [0u8; PAGE_SIZE];
        let mut random = [0u8; PAGE_SIZE];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for byte in &mut random {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *byte = state.to_le_bytes()[3];
        }
        let mut text = [0u8; PAGE_SIZE];
        let words = b"the quick brown fox jumps over the lazy dog; swap pages compress well. ";
        for (i, byte) in text.iter_mut().enumerate() {
            *byte = words[(i * 7 + i / 64) % words.len()];
        }
        vec![zero, random, text]
    }

    #[test]
    fn the_floor_of_a_zero_a_random_and_a_text_page_counts_each_as_the_store_keeps_it() {
        // Arrange
        let pages = three_pages();

        // Act
        let floor = CodecFloor::measure("lz4", None, &pages, Duration::from_millis(20)).unwrap();

        // Assert
        assert_eq!(floor.pages, 3);
        assert!(floor.passes >= MIN_PASSES);
        assert!(
            (floor.same_filled_percent - 100.0 / 3.0).abs() < 1e-9,
            "{floor:?}"
        );
        assert!((floor.raw_percent - 100.0 / 3.0).abs() < 1e-9, "{floor:?}");
        for us in [floor.compress_us_per_page, floor.decompress_us_per_page] {
            assert!(us.is_finite() && us > 0.0, "{floor:?}");
            assert!(us < 1000.0, "{floor:?}");
        }
    }

    #[test]
    fn a_page_set_of_zero_pages_is_all_same_filled_and_none_raw() {
        let pages = vec![[0u8; PAGE_SIZE]; 4];
        let floor = CodecFloor::measure("zstd", Some(3), &pages, Duration::from_millis(5)).unwrap();
        assert_eq!((floor.same_filled_percent, floor.raw_percent), (100.0, 0.0));
        assert!(floor.compress_us_per_page.is_finite());
        assert!(floor
            .line()
            .starts_with("codec floor (zstd level 3, this page mix): compress "));
    }

    #[test]
    fn an_unknown_algorithm_or_level_is_refused_with_a_sentence() {
        let pages = three_pages();
        let said = CodecFloor::measure("lzo", None, &pages, Duration::ZERO).unwrap_err();
        assert!(
            said.contains("unknown compression algorithm 'lzo'"),
            "{said}"
        );
        let said = CodecFloor::measure("lz4", Some(3), &pages, Duration::ZERO).unwrap_err();
        assert!(said.contains("takes no level"), "{said}");
        assert!(CodecFloor::measure("lz4", None, &[], Duration::ZERO).is_err());
    }

    #[test]
    fn a_request_costs_its_phase_floor_per_page_times_its_pages() {
        let floor = CodecFloor {
            algorithm: "lz4".into(),
            algorithm_level: None,
            pages: 3,
            passes: 3,
            compress_us_per_page: 2.0,
            decompress_us_per_page: 1.0,
            same_filled_percent: 0.0,
            raw_percent: 0.0,
        };
        for phase in [Phase::Fill, Phase::RandWrite, Phase::Burst] {
            assert_eq!(floor.us_per_request(phase, 1), 2.0);
        }
        assert_eq!(floor.us_per_request(Phase::RandRead, 1), 1.0);
        assert!((floor.us_per_request(Phase::Mixed, 1) - 1.3).abs() < 1e-9);
        assert_eq!(
            floor.us_per_request(Phase::RandRead, 16),
            16.0,
            "64 KiB requests"
        );
    }

    #[test]
    fn a_large_corpus_is_sampled_evenly_down_to_the_cap() {
        let pages = vec![[1u8; PAGE_SIZE]; MAX_PAGES + 10];
        let taken = sample(&pages);
        assert!(taken.len() <= MAX_PAGES && taken.len() >= MAX_PAGES / 2);
        assert_eq!(sample(&pages[..5]).len(), 5);
    }
}
