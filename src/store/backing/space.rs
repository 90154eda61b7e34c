// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The backing file's block allocator: a count per block of the live objects (and pins)
//! touching it, and the free blocks as coalesced extents. Pure bookkeeping: no I/O; the
//! caller punches freed blocks out of the file.

use std::collections::BTreeMap;

/// Block allocation state.
#[derive(Default)]
pub(super) struct Space {
    /// Objects touching each block, plus the open block's pin; `len()` is the high-water
    /// mark in blocks.
    pub(super) counts: Vec<u16>,
    /// Free extents inside the file: start block -> length, coalesced.
    pub(super) free: BTreeMap<u64, u64>,
    pub(super) free_blocks: u64,
    pub(super) used_blocks: u64,
    pub(super) live_bytes: u64,
    pub(super) objects: u64,
}

impl Space {
    pub(super) fn file_blocks(&self) -> u64 {
        self.counts.len() as u64
    }

    pub(super) fn count(&self, block: u64) -> u16 {
        usize::try_from(block)
            .ok()
            .and_then(|b| self.counts.get(b))
            .copied()
            .unwrap_or(0)
    }

    /// The free extent holding `block`, if any.
    pub(super) fn extent_at(&self, block: u64) -> Option<(u64, u64)> {
        let (&start, &len) = self.free.range(..=block).next_back()?;
        (block < start + len).then_some((start, len))
    }

    /// Whether `[start, start + n)` is free (in an extent or past the end), and below `limit`.
    pub(super) fn run_is_free(&self, start: u64, n: u64, limit: u64) -> bool {
        if start + n > limit {
            return false;
        }
        let file = self.file_blocks();
        if start >= file || n == 0 {
            return true;
        }
        match self.extent_at(start) {
            Some((s, l)) => s + l >= start + n || s + l == file,
            None => false,
        }
    }

    /// The first place a fresh run of `n` blocks fits: the first extent long enough, else an
    /// extent ending at the end of the file (extended by appending), else the end.
    pub(super) fn first_fit(&self, n: u64) -> u64 {
        if let Some(start) = self.first_extent(n) {
            return start;
        }
        match self.free.iter().next_back() {
            Some((&start, &len)) if start + len == self.file_blocks() => start,
            _ => self.file_blocks(),
        }
    }

    /// The first extent that holds `n` blocks.
    pub(super) fn first_extent(&self, n: u64) -> Option<u64> {
        self.free
            .iter()
            .find(|(_, &len)| len >= n)
            .map(|(&start, _)| start)
    }

    /// Allocates `[start, start + n)`, which [`Space::run_is_free`] accepted: removes it
    /// from its extent and grows the file past its end.
    pub(super) fn take(&mut self, start: u64, n: u64) {
        let file = self.file_blocks();
        let inside_end = (start + n).min(file);
        if start < inside_end {
            if let Some((s, l)) = self.extent_at(start) {
                debug_assert!(s + l >= inside_end, "allocated blocks were not free");
                self.free.remove(&s);
                if s < start {
                    self.free.insert(s, start - s);
                }
                if s + l > inside_end {
                    self.free.insert(inside_end, s + l - inside_end);
                }
                self.free_blocks -= inside_end - start;
            } else {
                debug_assert!(false, "allocated blocks were not free");
            }
        }
        if start + n > file {
            self.counts
                .resize(usize::try_from(start + n).unwrap_or(usize::MAX), 0);
        }
    }

    /// Returns `[start, start + n)` to the free extents, coalescing with its neighbours.
    pub(super) fn insert_free(&mut self, mut start: u64, mut n: u64) {
        self.free_blocks += n;
        if let Some((&s, &l)) = self.free.range(..start).next_back() {
            if s + l == start {
                self.free.remove(&s);
                start = s;
                n += l;
            }
        }
        if let Some(l) = self.free.remove(&(start + n)) {
            n += l;
        }
        self.free.insert(start, n);
    }

    pub(super) fn add_ref(&mut self, block: u64) {
        if let Some(c) = usize::try_from(block)
            .ok()
            .and_then(|b| self.counts.get_mut(b))
        {
            if *c == 0 {
                self.used_blocks += 1;
            }
            *c = c.saturating_add(1);
        }
    }

    /// Drops one reference; true if the block is now unused (the caller frees it).
    pub(super) fn drop_ref(&mut self, block: u64) -> bool {
        match usize::try_from(block)
            .ok()
            .and_then(|b| self.counts.get_mut(b))
        {
            Some(c) if *c > 0 => {
                *c -= 1;
                if *c == 0 {
                    self.used_blocks -= 1;
                }
                *c == 0
            }
            _ => false,
        }
    }
}
