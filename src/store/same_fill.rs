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
//!
//! With a state file the table keeps each entry's word in the file's fill-word region too
//! ([`FillWords::in_region`]): entry i's word is written to the region's word i before
//! [`FillWords::encode`] returns index i, so before any slot can publish it (the commit rule:
//! bytes first, then the slot). Reference counts and the free list stay in process memory;
//! recovery rebuilds them from the slots ([`FillWords::recover`]). A free entry's word in the
//! region may be stale: only indices that slots name count.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::alloc::Segment;
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
/// `None` when it needs the [`FillWords`] table.
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
    /// What `inner` holds (and the region pages it touched), kept apart so the memory limit
    /// can read it without the lock.
    bytes: AtomicUsize,
    /// The state file's fill-word region, if the store has one.
    region: Option<Region>,
}

/// The fill-word region of a state file, mapped shared: word i is entry i's word.
#[derive(Debug)]
struct Region {
    segment: Segment,
    /// How many words the region holds (the table never grows past them).
    words: usize,
}

impl Region {
    fn word(&self, index: usize) -> *mut u64 {
        debug_assert!(index < self.words);
        // The segment is page-aligned, so every 8-byte word in it is aligned.
        self.segment.base().cast::<u64>().wrapping_add(index)
    }

    fn read(&self, index: usize) -> u64 {
        // SAFETY: `index < words` (checked by every caller), and `words * 8` bytes lie inside
        // the mapping, which lives as long as `self`; a word is aligned (above). The region
        // is written only under the table's lock, which the caller holds.
        unsafe { self.word(index).read_volatile() }
    }

    fn write(&self, index: usize, word: u64) {
        // SAFETY: as in `read`; the caller holds the table's lock, so no other thread of this
        // process touches the word, and no slot names a free index yet.
        unsafe { self.word(index).write_volatile(word) }
    }

    /// The bytes of the region's pages that entries below `len` touch.
    fn touched_bytes(len: usize) -> usize {
        (len * 8).div_ceil(PAGE_SIZE) * PAGE_SIZE
    }
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
    /// A table that keeps its words in `segment` too, a state file's fill-word region of
    /// `words` words (DESIGN.md, "State file").
    pub(crate) fn in_region(segment: Segment, words: usize) -> FillWords {
        let words = words.min(segment.len() / 8);
        FillWords {
            region: Some(Region { segment, words }),
            ..FillWords::default()
        }
    }

    /// Encodes `word` as a slot payload, taking a reference in the table when needed. `None`
    /// only when the table is in a state file's region and that is full (more distinct words
    /// than pages, while writes are in flight): the caller stores the page another way.
    pub fn encode(&self, word: u64) -> Option<u64> {
        if let Some(payload) = encode_inline(word) {
            return Some(payload);
        }
        let mut inner = self.lock();
        let inner = &mut *inner;
        let index = match inner.index_of.get(&word) {
            Some(&i) => i,
            None => {
                let i = match inner.free.pop() {
                    Some(i) => i,
                    None => {
                        let next = inner.entries.len();
                        let limit = self.region.as_ref().map_or(usize::MAX, |r| r.words);
                        let i = u32::try_from(next).ok().filter(|_| next < limit)?;
                        inner.entries.push((0, 0));
                        i
                    }
                };
                // The commit rule: the word is in the file before any slot names `i`.
                if let Some(region) = &self.region {
                    region.write(i as usize, word);
                }
                inner.entries[i as usize] = (word, 0);
                inner.index_of.insert(word, i);
                i
            }
        };
        inner.entries[index as usize].1 += 1;
        self.store_bytes(inner);
        Some((u64::from(index) << 2) | 0b11)
    }

    /// Rebuilds the table from the table indices the slots of a recovered state file name
    /// (`named[k]` is one slot's index), reading their words from the region: each named
    /// entry gets one reference per slot, every other entry is free. Returns the positions in
    /// `named` that are damaged — past the region, or holding a word the table never holds
    /// (one the inline forms cover) — and take no reference. Gives the region's pages past
    /// the last entry back to the file. Runs once, on an empty table.
    pub(crate) fn recover(&self, named: &[u64]) -> Vec<usize> {
        let Some(region) = &self.region else {
            return (0..named.len()).collect();
        };
        let mut damaged = Vec::new();
        let mut inner = self.lock();
        let inner = &mut *inner;
        debug_assert!(inner.entries.is_empty(), "recover runs on an empty table");
        for (k, &index) in named.iter().enumerate() {
            let Some(i) = usize::try_from(index)
                .ok()
                .filter(|&i| i < region.words && u32::try_from(i).is_ok())
            else {
                damaged.push(k);
                continue;
            };
            let word = region.read(i);
            if encode_inline(word).is_some() {
                damaged.push(k);
                continue;
            }
            if inner.entries.len() <= i {
                inner.entries.resize(i + 1, (0, 0));
            }
            let entry = &mut inner.entries[i];
            entry.0 = word;
            entry.1 += 1;
        }
        for (i, entry) in inner.entries.iter_mut().enumerate() {
            // Below the region's length, so below u32::MAX (checked above).
            #[allow(clippy::cast_possible_truncation)]
            let i = i as u32;
            if entry.1 == 0 {
                // A free entry's word is not the table's: forget the stale one.
                entry.0 = 0;
                inner.free.push(i);
            } else {
                // Two live entries with one word (only a damaged file has them) both read
                // right; new pages use the first.
                inner.index_of.entry(entry.0).or_insert(i);
            }
        }
        // Reused last-in first-out: the lowest free index first.
        inner.free.reverse();
        let used = Region::touched_bytes(inner.entries.len());
        if used < region.segment.len() {
            // SAFETY: the range lies inside the segment, and no entry lies in it (every
            // entry's word is below `used`), so nothing reads it; it reads as zeros after.
            unsafe {
                region
                    .segment
                    .discard(region.segment.base().add(used), region.segment.len() - used);
            }
        }
        self.store_bytes(inner);
        damaged
    }

    /// Checks the table against the table indices the slots name (`named`, one per slot):
    /// each entry's references are the slots that name it, an entry is free (and in the free
    /// list once) exactly when none does, a live entry's word is a table word (and in the
    /// region, with a state file), and the word map names only live entries. Meaningful only
    /// with no write in flight (an encoded entry not yet published holds a reference).
    pub(crate) fn check(&self, named: &[u64]) -> Result<(), String> {
        let inner = self.lock();
        let mut refs = vec![0u32; inner.entries.len()];
        for &index in named {
            let i = usize::try_from(index)
                .ok()
                .filter(|&i| i < refs.len())
                .ok_or_else(|| {
                    format!(
                        "a slot names fill-word entry {index}, past the table's {}",
                        refs.len()
                    )
                })?;
            refs[i] += 1;
        }
        let mut free = inner.free.clone();
        free.sort_unstable();
        if free.windows(2).any(|w| w[0] == w[1]) {
            return Err("a fill-word entry is twice in the free list".into());
        }
        for (i, (&(word, count), &slots)) in inner.entries.iter().zip(&refs).enumerate() {
            if count != slots {
                return Err(format!(
                    "fill-word entry {i} counts {count} references, but {slots} slots name it"
                ));
            }
            let is_free = u32::try_from(i).is_ok_and(|i| free.binary_search(&i).is_ok());
            if is_free != (count == 0) {
                return Err(format!(
                    "fill-word entry {i} has {count} references and is free: {is_free}"
                ));
            }
            if count == 0 {
                continue;
            }
            if encode_inline(word).is_some() {
                return Err(format!(
                    "fill-word entry {i} holds an inline word {word:#x}"
                ));
            }
            if let Some(region) = &self.region {
                if i >= region.words || region.read(i) != word {
                    return Err(format!(
                        "fill-word entry {i}'s word {word:#x} is not in the state file"
                    ));
                }
            }
        }
        for (&word, &i) in &inner.index_of {
            match inner.entries.get(i as usize) {
                Some(&(w, count)) if w == word && count > 0 => {}
                _ => return Err(format!("the word {word:#x} maps to entry {i}, not its own")),
            }
        }
        Ok(())
    }

    fn store_bytes(&self, inner: &FillWordsInner) {
        let region = self
            .region
            .as_ref()
            .map_or(0, |_| Region::touched_bytes(inner.entries.len()));
        self.bytes.store(inner.bytes() + region, Ordering::Relaxed);
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
                let i = u32::try_from(index).unwrap_or(u32::MAX);
                if inner.index_of.get(&entry.0) == Some(&i) {
                    inner.index_of.remove(&entry.0);
                }
                inner.free.push(i);
                self.store_bytes(inner);
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
        let payloads: Vec<u64> = words.iter().map(|&w| table.encode(w).unwrap()).collect();
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
        let a = table.encode(0x0123_4567_89ab_cdef).unwrap();
        let b = table.encode(0x0123_4567_89ab_cdef).unwrap();
        assert_eq!(a, b);
        table.release(a);
        assert_eq!(table.decode(b), 0x0123_4567_89ab_cdef);
        table.release(b);
        assert!(table.is_empty());
        let c = table.encode(0x1123_4567_89ab_cdef).unwrap();
        assert_eq!(c, a, "a freed index is reused");
    }

    #[test]
    fn the_check_counts_references_against_the_slots() {
        let table = FillWords::default();
        let a = table.encode(0x0123_4567_89ab_cdef).unwrap() >> 2;
        let b = table.encode(0x1123_4567_89ab_cdef).unwrap() >> 2;
        table.encode(0x0123_4567_89ab_cdef).unwrap();
        table.check(&[a, b, a]).unwrap();
        assert!(table.check(&[a, b]).is_err(), "a reference no slot holds");
        assert!(
            table.check(&[a, b, a, b]).is_err(),
            "a slot with no reference"
        );
        assert!(
            table.check(&[a, b, a, 2]).is_err(),
            "an index past the table"
        );
        table.release((b << 2) | 0b11);
        table.check(&[a, a]).unwrap();
    }

    #[test]
    fn a_table_in_a_region_never_grows_past_it() {
        let table = FillWords::in_region(Segment::map(PAGE_SIZE).unwrap(), 2);
        let a = table.encode(0x0123_4567_89ab_cdef).unwrap();
        let b = table.encode(0x1123_4567_89ab_cdef).unwrap();
        assert_eq!(
            table.encode(0x2123_4567_89ab_cdef),
            None,
            "the region is full"
        );
        assert_eq!(
            table.encode(0x4141),
            Some(0x4141 << 1),
            "inline words need no entry"
        );
        let anonymous = FillWords::default();
        anonymous.encode(0x0123_4567_89ab_cdef).unwrap();
        anonymous.encode(0x1123_4567_89ab_cdef).unwrap();
        assert_eq!(
            table.bytes(),
            anonymous.bytes() + PAGE_SIZE,
            "the region's touched page is counted"
        );
        table.release(a);
        let c = table.encode(0x2123_4567_89ab_cdef).unwrap();
        assert_eq!(c, a, "a freed entry makes room");
        assert_eq!(table.decode(b), 0x1123_4567_89ab_cdef);
        assert_eq!(table.decode(c), 0x2123_4567_89ab_cdef);
    }
}
