// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Same-filled pages: a page that is one 8-byte word repeated 512 times is kept in its slot
//! entry, with no allocation, and regenerated on read (zram's `ZRAM_SAME`).
//!
//! A slot has 56 payload bits, one word has 64, so the word is encoded (low bits first):
//!
//! | low bits | payload                          | covers                                       |
//! |----------|----------------------------------|----------------------------------------------|
//! | `0`      | the word, sign-extended from 55 bits | zero, -1, small integers, canonical pointers |
//! | `01`     | the low 32 bits, repeated twice  | byte, 16-bit and 32-bit fill patterns         |
//! | `11`     | an index into [`FillWords`]       | every other word (rare; refcounted, shared)   |
//!
//! Only the third form allocates, once per distinct word rather than per page.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::PAGE_SIZE;

/// Returns the repeated word when `page` is same-filled.
pub fn detect(page: &[u8; PAGE_SIZE]) -> Option<u64> {
    let (words, _) = page.as_chunks::<8>();
    let first = words[0];
    // Comparing whole 8-byte arrays lets the compiler vectorise the scan.
    words
        .iter()
        .all(|w| *w == first)
        .then(|| u64::from_ne_bytes(first))
}

/// Fills `page` with `word` repeated.
pub fn fill(page: &mut [u8; PAGE_SIZE], word: u64) {
    let bytes = word.to_ne_bytes();
    let (words, _) = page.as_chunks_mut::<8>();
    words.fill(bytes);
}

fn fits_55_bits(word: u64) -> bool {
    // Reinterpreting the bits as signed is the point: the test is for sign extension.
    #[allow(clippy::cast_possible_wrap, clippy::cast_sign_loss)]
    let extended = (((word as i64) << 9) >> 9) as u64;
    extended == word
}

/// The payload of `word` when it fits a slot entry by itself (the first two encodings), or
/// `None` when it needs the [`FillWords`] table. A store on a state file stores the latter
/// pages as compressed objects, since the table lives in process memory only.
pub fn encode_inline(word: u64) -> Option<u64> {
    if fits_55_bits(word) {
        return Some((word << 1) & super::slot::MAX_PAYLOAD);
    }
    if word >> 32 == word & 0xffff_ffff {
        return Some(((word & 0xffff_ffff) << 2) | 0b01);
    }
    None
}

/// Whether a SameFilled payload names an entry of the [`FillWords`] table.
pub fn needs_table(payload: u64) -> bool {
    payload & 0b11 == 0b11
}

/// The table of fill words that do not fit a slot entry.
#[derive(Debug, Default)]
pub struct FillWords {
    inner: Mutex<FillWordsInner>,
    /// What `inner` holds, kept apart so the memory limit can read it without the lock.
    bytes: AtomicUsize,
}

impl FillWordsInner {
    fn bytes(&self) -> usize {
        self.entries.capacity() * 12 + self.free.capacity() * 4 + self.index_of.capacity() * 16
    }
}

#[derive(Debug, Default)]
struct FillWordsInner {
    index_of: HashMap<u64, u32>,
    /// (word, references); a free entry has zero references.
    entries: Vec<(u64, u32)>,
    free: Vec<u32>,
}

impl FillWords {
    /// Encodes `word` as a slot payload, taking a reference in the table when needed.
    pub fn encode(&self, word: u64) -> u64 {
        if let Some(payload) = encode_inline(word) {
            return payload;
        }
        let mut inner = self.lock();
        let inner = &mut *inner;
        let index = match inner.index_of.get(&word) {
            Some(&i) => i,
            None => {
                let i = match inner.free.pop() {
                    Some(i) => i,
                    None => {
                        inner.entries.push((0, 0));
                        u32::try_from(inner.entries.len() - 1).unwrap_or(u32::MAX)
                    }
                };
                inner.entries[i as usize] = (word, 0);
                inner.index_of.insert(word, i);
                i
            }
        };
        inner.entries[index as usize].1 += 1;
        self.bytes.store(inner.bytes(), Ordering::Relaxed);
        (u64::from(index) << 2) | 0b11
    }

    /// Decodes a payload made by [`FillWords::encode`].
    pub fn decode(&self, payload: u64) -> u64 {
        match payload & 0b11 {
            0b01 => {
                let low = (payload >> 2) & 0xffff_ffff;
                (low << 32) | low
            }
            0b11 => {
                let index = usize::try_from(payload >> 2).unwrap_or(usize::MAX);
                self.lock().entries.get(index).map_or(0, |e| e.0)
            }
            // Sign-extend the 55-bit value back to 64 bits.
            #[allow(clippy::cast_possible_wrap, clippy::cast_sign_loss)]
            _ => ((((payload >> 1) << 9) as i64) >> 9) as u64,
        }
    }

    /// Drops the reference a payload holds, if any.
    pub fn release(&self, payload: u64) {
        if payload & 0b11 != 0b11 {
            return;
        }
        let index = usize::try_from(payload >> 2).unwrap_or(usize::MAX);
        let mut inner = self.lock();
        let inner = &mut *inner;
        if let Some(entry) = inner.entries.get_mut(index) {
            entry.1 = entry.1.saturating_sub(1);
            if entry.1 == 0 {
                inner.index_of.remove(&entry.0);
                inner.free.push(u32::try_from(index).unwrap_or(u32::MAX));
                self.bytes.store(inner.bytes(), Ordering::Relaxed);
            }
        }
    }

    /// The bytes the table holds (the hash map's share estimated from its capacity).
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The number of distinct words in the table.
    pub fn len(&self) -> usize {
        self.lock().index_of.len()
    }

    /// Whether the table holds no word.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FillWordsInner> {
        // The table's invariants hold between statements, so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_any_repeated_word_and_nothing_else() {
        let mut page = [0u8; PAGE_SIZE];
        assert_eq!(detect(&page), Some(0));
        fill(&mut page, 0x0123_4567_89ab_cdef);
        assert_eq!(detect(&page), Some(0x0123_4567_89ab_cdef));
        page[PAGE_SIZE - 1] ^= 1;
        assert_eq!(detect(&page), None);
        let mut page = [0u8; PAGE_SIZE];
        page[0] = 1;
        assert_eq!(detect(&page), None);
    }

    #[test]
    fn every_kind_of_word_roundtrips() {
        let table = FillWords::default();
        let words = [
            0,
            u64::MAX,
            1,
            0x0000_7fff_dead_beef,
            0xffff_8000_0000_1000,
            0x4141_4141_4141_4141,
            0xdead_beef_dead_beef,
            0x0123_4567_89ab_cdef,
            0x8000_0000_0000_0001,
            0x7fff_ffff_ffff_fffe,
        ];
        let payloads: Vec<u64> = words.iter().map(|&w| table.encode(w)).collect();
        for (&w, &p) in words.iter().zip(&payloads) {
            assert!(p <= crate::store::slot::MAX_PAYLOAD);
            assert_eq!(table.decode(p), w, "{w:#x}");
        }
        assert_eq!(
            table.len(),
            3,
            "only words that fit no inline form use the table"
        );
        for p in payloads {
            table.release(p);
        }
        assert!(table.is_empty());
    }

    #[test]
    fn table_entries_are_shared_and_refcounted() {
        let table = FillWords::default();
        let a = table.encode(0x0123_4567_89ab_cdef);
        let b = table.encode(0x0123_4567_89ab_cdef);
        assert_eq!(a, b);
        table.release(a);
        assert_eq!(table.decode(b), 0x0123_4567_89ab_cdef);
        table.release(b);
        assert!(table.is_empty());
        let c = table.encode(0x1123_4567_89ab_cdef);
        assert_eq!(c, a, "a freed index is reused");
    }
}
