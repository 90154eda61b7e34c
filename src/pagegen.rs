// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A deterministic generator of pages that look like real swap, for tests and benchmarks.
//!
//! Every page is a pure function of `(seed, index)`, so a verifier can regenerate what it wrote
//! without keeping a copy. The mix, chosen after what anonymous memory of desktop and server
//! workloads looks like when zram sees it:
//!
//! | kind        | share | what it is                                                        |
//! |-------------|-------|-------------------------------------------------------------------|
//! | `Zero`      | 25 %  | untouched or cleared heap pages                                   |
//! | `SameFilled`| 5 %   | one repeated non-zero 8-byte word (memset patterns, poison words) |
//! | `Text`      | 20 %  | English-like words and punctuation (strings, logs, source)        |
//! | `Pointers`  | 35 %  | 64-byte records: heap pointers, small integers, flags, padding    |
//! | `Random`    | 15 %  | incompressible bytes (already-compressed or encrypted data)       |
//!
//! With lz4 this mix compresses to about 2:1, near what kernel zram reports on swap.

use crate::PAGE_SIZE;

/// The kinds of page the generator makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageKind {
    /// All zero bytes.
    Zero,
    /// One repeated non-zero 8-byte word.
    SameFilled,
    /// English-like text.
    Text,
    /// Pointer-heavy records.
    Pointers,
    /// Incompressible random bytes.
    Random,
}

impl PageKind {
    /// Every kind, in the order of the table above.
    pub const ALL: [PageKind; 5] = [
        PageKind::Zero,
        PageKind::SameFilled,
        PageKind::Text,
        PageKind::Pointers,
        PageKind::Random,
    ];

    fn from_roll(roll: u64) -> PageKind {
        match roll % 100 {
            0..25 => PageKind::Zero,
            25..30 => PageKind::SameFilled,
            30..50 => PageKind::Text,
            50..85 => PageKind::Pointers,
            _ => PageKind::Random,
        }
    }
}

/// SplitMix64: a tiny, good-enough deterministic generator.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "had",
    "they",
    "you",
    "were",
    "their",
    "one",
    "all",
    "we",
    "can",
    "her",
    "has",
    "there",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "memory",
    "page",
    "swap",
    "kernel",
    "device",
    "virtual",
    "machine",
    "compressed",
    "request",
    "queue",
    "error",
    "value",
    "function",
    "return",
    "struct",
    "buffer",
    "thread",
    "process",
    "file",
    "system",
    "data",
];

/// Fills `page` with the page for `(seed, index)` and returns its kind.
pub fn fill_page(seed: u64, index: u64, page: &mut [u8; PAGE_SIZE]) -> PageKind {
    let mut rng = SplitMix64::new(seed ^ index.wrapping_mul(0x2545_f491_4f6c_dd1d));
    let kind = PageKind::from_roll(rng.next_u64());
    fill_kind(kind, &mut rng, page);
    kind
}

/// Fills `page` with a page of `kind`, drawing randomness from `rng`.
pub fn fill_kind(kind: PageKind, rng: &mut SplitMix64, page: &mut [u8; PAGE_SIZE]) {
    match kind {
        PageKind::Zero => page.fill(0),
        PageKind::SameFilled => {
            let word = rng.next_u64() | 1;
            for chunk in page.chunks_exact_mut(8) {
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
        }
        PageKind::Text => {
            let mut pos = 0;
            while pos < PAGE_SIZE {
                let roll = rng.below(WORDS.len() as u64 + 8);
                let word: &[u8] = match usize::try_from(roll).ok().and_then(|i| WORDS.get(i)) {
                    Some(w) => w.as_bytes(),
                    None if roll.is_multiple_of(2) => b". ",
                    None => b", ",
                };
                for &b in word.iter().chain(b" ") {
                    if pos < PAGE_SIZE {
                        page[pos] = b;
                        pos += 1;
                    }
                }
            }
        }
        PageKind::Pointers => {
            // A heap of 64-byte records: next/prev pointers into one arena, a length, a small
            // id, flags and zero padding, as a malloc'd linked structure looks.
            let arena = 0x0000_5600_0000_0000u64 | (rng.below(1 << 20) << 12);
            for record in page.chunks_exact_mut(64) {
                let words = [
                    arena + rng.below(1 << 16) * 64,
                    arena + rng.below(1 << 16) * 64,
                    rng.below(4096),
                    rng.below(64),
                    if rng.below(4) == 0 { 0xffff_ffff } else { 0 },
                    0,
                    arena + rng.below(1 << 10) * 64,
                    0,
                ];
                for (dst, w) in record.chunks_exact_mut(8).zip(words) {
                    dst.copy_from_slice(&w.to_le_bytes());
                }
            }
        }
        PageKind::Random => {
            for chunk in page.chunks_exact_mut(8) {
                chunk.copy_from_slice(&rng.next_u64().to_ne_bytes());
            }
        }
    }
}

/// A stream of swap-like pages.
#[derive(Debug, Clone)]
pub struct PageGen {
    seed: u64,
    next: u64,
}

impl PageGen {
    /// A stream starting at index 0 of `seed`.
    pub fn new(seed: u64) -> Self {
        PageGen { seed, next: 0 }
    }

    /// The next page of the stream and its kind.
    pub fn next_page(&mut self) -> (PageKind, Box<[u8; PAGE_SIZE]>) {
        let mut page = Box::new([0u8; PAGE_SIZE]);
        let kind = fill_page(self.seed, self.next, &mut page);
        self.next += 1;
        (kind, page)
    }

    /// A page of the given kind (advances the stream).
    pub fn page_of(&mut self, kind: PageKind) -> Box<[u8; PAGE_SIZE]> {
        let mut page = Box::new([0u8; PAGE_SIZE]);
        let mut rng = SplitMix64::new(self.seed ^ self.next.rotate_left(17));
        self.next += 1;
        fill_kind(kind, &mut rng, &mut page);
        page
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_a_function_of_seed_and_index() {
        let mut a = [0u8; PAGE_SIZE];
        let mut b = [0u8; PAGE_SIZE];
        for i in 0..200 {
            let ka = fill_page(5, i, &mut a);
            let kb = fill_page(5, i, &mut b);
            assert_eq!(ka, kb);
            assert_eq!(a, b);
        }
        fill_page(6, 3, &mut b);
        fill_page(5, 3, &mut a);
        assert_ne!(a, b, "another seed gives other pages");
    }

    #[test]
    fn the_mix_matches_the_documented_shares() {
        let mut counts = std::collections::HashMap::new();
        let mut page = [0u8; PAGE_SIZE];
        for i in 0..10_000 {
            *counts.entry(fill_page(1, i, &mut page)).or_insert(0u32) += 1;
        }
        let share = |k| counts.get(&k).copied().unwrap_or(0) as f64 / 100.0;
        assert!((share(PageKind::Zero) - 25.0).abs() < 2.0);
        assert!((share(PageKind::SameFilled) - 5.0).abs() < 1.0);
        assert!((share(PageKind::Text) - 20.0).abs() < 2.0);
        assert!((share(PageKind::Pointers) - 35.0).abs() < 2.0);
        assert!((share(PageKind::Random) - 15.0).abs() < 2.0);
    }

    #[test]
    fn same_filled_pages_are_one_repeated_word() {
        let page = PageGen::new(9).page_of(PageKind::SameFilled);
        let first = &page[..8];
        assert!(page.chunks_exact(8).all(|w| w == first));
        assert_ne!(first, &[0u8; 8]);
    }
}
