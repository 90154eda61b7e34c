// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Proactive reclaim (`ctl reclaim SIZE [min_age=SECS] [mode=writeback|recompress|any]`):
//! free up to SIZE of `mem_used_total` from pages idle at least SECS, coldest first, and give
//! the memory back to the host before answering — the per-device form of zswap's proactive
//! writeback (`memory.reclaim` with `zswap_writeback_only`).
//!
//! - `writeback`: pages go to the backing file, oldest age first, down to the pages idle
//!   `min_age`; each pass is bounded to about the pages the remaining bytes need.
//! - `recompress`: the pages idle `min_age` are marked idle (as `ctl idle --age` does) and
//!   recompressed with the secondary algorithms, bounded the same way.
//! - `any` (the default): writeback first when there is a backing file, then recompression
//!   when there is a secondary algorithm.
//!
//! Every pass ends with a compaction ([`PageStore::writeback_paced`],
//! [`PageStore::recompress_paced`]), so what the request freed is back with the host when it
//! answers. It never writes more than the bytes asked for by more than one pass's rounding.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use super::recompress::{RecompressMode, RecompressRequest};
use super::slot::MAX_AGE;
use super::writeback::{min_age_for, WritebackMode, WritebackRequest};
use super::PageStore;

/// What a reclaim may shed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReclaimMode {
    /// Write pages back to the backing file.
    Writeback,
    /// Recompress pages with the secondary algorithms.
    Recompress,
    /// Writeback, then recompression, as the device has them.
    #[default]
    Any,
}

impl ReclaimMode {
    fn name(self) -> &'static str {
        match self {
            ReclaimMode::Writeback => "writeback",
            ReclaimMode::Recompress => "recompress",
            ReclaimMode::Any => "any",
        }
    }
}

/// A reclaim request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReclaimRequest {
    /// Bytes of `mem_used_total` to free, at most.
    pub bytes: u64,
    /// Only pages not read or written for this long (in ticks of the idle clock).
    pub min_age: Duration,
    /// What may be shed.
    pub mode: ReclaimMode,
}

impl fmt::Display for ReclaimRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} min_age={} mode={}",
            self.bytes,
            self.min_age.as_secs(),
            self.mode.name()
        )
    }
}

impl FromStr for ReclaimRequest {
    type Err = String;

    /// `BYTES [min_age=SECS] [mode=writeback|recompress|any]`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut words = text.split_whitespace();
        let bytes = words
            .next()
            .ok_or("reclaim takes the bytes to free, then min_age=SECS and mode=MODE")?;
        let bytes: u64 = bytes.parse().ok().filter(|&b| b > 0).ok_or_else(|| {
            format!(
                "reclaim: '{}' is not a number of bytes above 0",
                clip(bytes)
            )
        })?;
        let mut request = ReclaimRequest {
            bytes,
            min_age: Duration::ZERO,
            mode: ReclaimMode::Any,
        };
        let (mut age_given, mut mode_given) = (false, false);
        for word in words {
            match word.split_once('=') {
                Some(("min_age", secs)) if !age_given => {
                    let secs: u64 = secs.parse().map_err(|_| {
                        format!(
                            "reclaim: min_age='{}' is not a number of seconds",
                            clip(secs)
                        )
                    })?;
                    request.min_age = Duration::from_secs(secs);
                    age_given = true;
                }
                Some(("mode", mode)) if !mode_given => {
                    request.mode = match mode {
                        "writeback" => ReclaimMode::Writeback,
                        "recompress" => ReclaimMode::Recompress,
                        "any" => ReclaimMode::Any,
                        other => {
                            return Err(format!(
                                "reclaim: mode='{}' is not writeback, recompress or any",
                                clip(other)
                            ))
                        }
                    };
                    mode_given = true;
                }
                Some(("min_age" | "mode", _)) => {
                    return Err(format!("reclaim: '{}' is given twice", clip(word)))
                }
                _ => {
                    return Err(format!(
                        "reclaim takes min_age=SECS and mode=writeback|recompress|any, not '{}'",
                        clip(word)
                    ))
                }
            }
        }
        Ok(request)
    }
}

fn clip(text: &str) -> String {
    text.chars().take(64).collect()
}

/// What a reclaim did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReclaimOutcome {
    /// Bytes asked for.
    pub asked: u64,
    /// `mem_used_total` before and after.
    pub before: u64,
    /// `mem_used_total` after (the memory is back with the host).
    pub after: u64,
    /// Pages written back.
    pub written_back: u64,
    /// Pages recompressed.
    pub recompressed: u64,
}

impl ReclaimOutcome {
    /// Bytes of `mem_used_total` freed.
    pub fn freed(&self) -> u64 {
        self.before.saturating_sub(self.after)
    }
}

impl fmt::Display for ReclaimOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "freed {} of {} bytes asked: {} pages written back, {} recompressed; mem_used_total \
             {} -> {}",
            self.freed(),
            self.asked,
            self.written_back,
            self.recompressed,
            self.before,
            self.after
        )
    }
}

/// Why a reclaim cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReclaimError {
    /// The mode needs what the device does not have.
    #[error("reclaim mode={mode} needs {needs}")]
    Unsupported {
        /// The mode asked for.
        mode: &'static str,
        /// What it needs.
        needs: &'static str,
    },
    /// The idle clock cannot count that age.
    #[error(
        "reclaim: min_age={0} s is more than the idle clock counts (126 ticks of --idle-tick)"
    )]
    AgeTooLong(u64),
}

impl PageStore {
    /// Frees up to `request.bytes` of `mem_used_total` from pages idle at least
    /// `request.min_age`, coldest first; the memory is back with the host when it returns.
    pub fn reclaim(&self, request: &ReclaimRequest) -> Result<ReclaimOutcome, ReclaimError> {
        let can_write_back = self.has_backing_file();
        let can_recompress = self.secondary_count() > 0;
        let (write_back, recompress) = match request.mode {
            ReclaimMode::Writeback if !can_write_back => {
                return Err(ReclaimError::Unsupported {
                    mode: "writeback",
                    needs: "a --backing-file",
                })
            }
            ReclaimMode::Recompress if !can_recompress => {
                return Err(ReclaimError::Unsupported {
                    mode: "recompress",
                    needs: "a --recompress-algorithm",
                })
            }
            ReclaimMode::Any if !can_write_back && !can_recompress => {
                return Err(ReclaimError::Unsupported {
                    mode: "any",
                    needs: "a --backing-file or a --recompress-algorithm",
                })
            }
            ReclaimMode::Writeback => (true, false),
            ReclaimMode::Recompress => (false, true),
            ReclaimMode::Any => (can_write_back, can_recompress),
        };
        let min_age = if request.min_age.is_zero() {
            0
        } else {
            min_age_for(request.min_age, self.idle_tick())
                .ok_or(ReclaimError::AgeTooLong(request.min_age.as_secs()))?
        };
        let before = self.mem_used_total();
        let target = before.saturating_sub(request.bytes);
        let mut outcome = ReclaimOutcome {
            asked: request.bytes,
            before,
            ..ReclaimOutcome::default()
        };
        if write_back {
            // Oldest first: each age down to min_age, as long as memory is above the target.
            // One walk of the table finds the ages that hold pages; the others cost nothing.
            let by_age = self.bytes_by_age();
            for age in (min_age..=MAX_AGE).rev() {
                if by_age[usize::from(age)] == 0 {
                    continue;
                }
                while self.mem_used_total() > target {
                    let Some(pages) = self.pages_for(self.mem_used_total() - target) else {
                        break;
                    };
                    let mut pass = WritebackRequest::new(WritebackMode::Aged(age));
                    pass.max_pages = Some(pages);
                    let written = match self.writeback(&pass) {
                        Ok(done) => done.written,
                        Err(error) => {
                            log::warn!("reclaim: writeback stopped: {error}");
                            break;
                        }
                    };
                    outcome.written_back += written;
                    if written == 0 {
                        break;
                    }
                }
                if self.mem_used_total() <= target {
                    break;
                }
            }
        }
        if recompress && self.mem_used_total() > target {
            if min_age == 0 {
                self.mark_idle();
            } else {
                self.mark_idle_aged(min_age);
            }
            while self.mem_used_total() > target {
                let Some(pages) = self.pages_for(self.mem_used_total() - target) else {
                    break;
                };
                let pass = RecompressRequest {
                    mode: RecompressMode::Idle,
                    threshold: 0,
                    max_pages: Some(pages),
                    target: None,
                };
                let done = match self.recompress(&pass) {
                    Ok(done) => done,
                    Err(error) => {
                        log::warn!("reclaim: recompression stopped: {error}");
                        break;
                    }
                };
                outcome.recompressed += done.recompressed;
                if done.tried == 0 {
                    break;
                }
            }
        }
        self.compact();
        outcome.after = self.mem_used_total();
        Ok(outcome)
    }

    /// About how many stored pages hold `bytes` of memory, by the average object; `None` when
    /// nothing is stored. A pass of that many frees a little less than `bytes` (objects leave
    /// holes in chunks that stay), so the caller runs passes until the target is reached
    /// rather than overshooting it in one.
    fn pages_for(&self, bytes: u64) -> Option<u64> {
        let mm = self.stats().mm;
        let pages = mm.orig_data_size / crate::PAGE_BYTES;
        let objects = pages.saturating_sub(mm.same_pages);
        if objects == 0 || mm.compr_data_size == 0 {
            return None;
        }
        let per_page = (mm.compr_data_size / objects).max(1);
        Some(bytes / per_page + 16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Algorithm;
    use crate::pagegen::fill_page;
    use crate::store::recompress::AlgorithmSpec;
    use crate::store::StoreConfig;
    use crate::PAGE_SIZE;

    /// 256 MiB.
    const PAGES: u64 = 65536;

    fn page(index: u64) -> [u8; PAGE_SIZE] {
        let mut page = [0u8; PAGE_SIZE];
        fill_page(0x5eed, index, &mut page);
        page
    }

    fn filled(with_file: bool, secondary: &[&str]) -> (Option<tempfile::TempDir>, PageStore) {
        let specs: Vec<AlgorithmSpec> = secondary.iter().map(|s| s.parse().unwrap()).collect();
        let mut store = PageStore::new(StoreConfig {
            capacity_pages: PAGES,
            algorithm: Algorithm::Lz4,
            level: None,
            mem_limit: None,
        })
        .unwrap()
        .with_secondary_algorithms(&specs)
        .unwrap();
        let mut dir = None;
        if with_file {
            let (d, backing) = crate::store::tests::backing_file();
            store = store.with_backing_file(backing);
            dir = Some(d);
        }
        for index in 0..PAGES {
            store.write(index, &page(index)).unwrap();
        }
        (dir, store)
    }

    fn verify(store: &PageStore) {
        let mut out = [0u8; PAGE_SIZE];
        for index in 0..PAGES {
            store.read(index, &mut out).unwrap();
            assert!(out == page(index), "page {index} differs");
        }
    }

    #[test]
    fn reclaim_64m_by_writeback_frees_at_least_64m_before_it_answers() {
        let (_dir, store) = filled(true, &[]);
        let request: ReclaimRequest = format!("{} min_age=0", 64u64 << 20).parse().unwrap();

        let outcome = store.reclaim(&request).unwrap();

        assert!(outcome.freed() >= 64 << 20, "{outcome}");
        assert_eq!(outcome.after, store.mem_used_total(), "{outcome}");
        // Bounded: it wrote back about what was asked, not the whole device.
        assert!(outcome.written_back < PAGES / 2, "{outcome}");
        assert_eq!(outcome.recompressed, 0);
        verify(&store);
        store.check_consistency().unwrap();
    }

    #[test]
    fn reclaim_by_recompression_frees_memory_and_loses_nothing() {
        let (_dir, store) = filled(false, &["zstd:level=9"]);
        let request: ReclaimRequest = format!("{} mode=recompress", 16u64 << 20).parse().unwrap();

        let outcome = store.reclaim(&request).unwrap();

        assert!(outcome.freed() > 0 && outcome.recompressed > 0, "{outcome}");
        assert_eq!(outcome.written_back, 0);
        verify(&store);
        store.check_consistency().unwrap();
    }

    #[test]
    fn reclaim_refuses_a_mode_the_device_cannot_do() {
        let (_dir, store) = filled(false, &[]);
        for (text, says) in [
            ("4096 mode=writeback", "needs a --backing-file"),
            ("4096 mode=recompress", "needs a --recompress-algorithm"),
            ("4096", "a --backing-file or a --recompress-algorithm"),
        ] {
            let error = store.reclaim(&text.parse().unwrap()).unwrap_err();
            assert!(error.to_string().contains(says), "{text}: {error}");
        }
    }

    #[test]
    fn requests_parse_print_and_refuse_in_sentences() {
        let request: ReclaimRequest = "67108864 min_age=30 mode=writeback".parse().unwrap();
        assert_eq!(
            request,
            ReclaimRequest {
                bytes: 64 << 20,
                min_age: Duration::from_secs(30),
                mode: ReclaimMode::Writeback
            }
        );
        assert_eq!(request.to_string().parse::<ReclaimRequest>(), Ok(request));
        assert_eq!(
            "4096".parse::<ReclaimRequest>().unwrap().mode,
            ReclaimMode::Any
        );
        for (bad, says) in [
            ("", "takes the bytes"),
            ("0", "not a number of bytes above 0"),
            ("64M", "not a number of bytes"),
            ("4096 min_age=x", "not a number of seconds"),
            ("4096 mode=swap", "not writeback, recompress or any"),
            ("4096 mode=any mode=any", "given twice"),
            ("4096 type=idle", "not 'type=idle'"),
        ] {
            let error = bad.parse::<ReclaimRequest>().unwrap_err();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }
}
