// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A store on a state file: building it on the file's regions, recovering it after a crash,
//! restart or upgrade, and the header updates the daemon makes (the frontend's identity).
//!
//! Recovery is one scan of the slot table (DESIGN.md, "Crash rules"): the slot entry is the
//! commit point of every change, so whatever a slot names is the page, and whatever no slot
//! names is free. The scan clears stale lock bits, checks each entry against the regions it
//! points into (entries that point outside them, or hold a state no build writes, become
//! `Invalid`: those pages read as I/O errors until they are written or discarded), and from
//! the rest rebuilds the allocator, the pending pool and its jobs, and the statistics.

use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::alloc::{class_of, Extents, Segment, HUGE_CLASS, HUGE_THRESHOLD};
use super::pending::Job;
use super::same_fill;
use super::slot::{SlotEntry, SlotState, Swapped};
use super::state::{AlgorithmRecord, FrontendIdentity, Header, Layout, StateError, StateFile};
use super::{PageStore, PendingConfig, StoreConfig, StoreError};
use crate::PAGE_SIZE;

/// Where a store takes its memory from.
// Made once per store and consumed at once: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum StoreMemory {
    /// Anonymous memory of this process: the store ends with it.
    Anonymous,
    /// A state file: the store outlives the process (DESIGN.md, "State file").
    State(StateFile),
}

/// What [`PageStore::recover`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateStart {
    /// The store has no state file.
    Anonymous,
    /// The state file was new: the store starts empty.
    Created,
    /// The state file held a store, now recovered.
    Recovered(Recovered),
}

/// A recovered store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// The frontend the state belonged to, if one was recorded.
    pub identity: Option<FrontendIdentity>,
    /// Pages that hold data.
    pub pages: u64,
    /// Pages whose slot entry was damaged: they read as I/O errors until rewritten.
    pub damaged_pages: u64,
    /// How long recovery took.
    pub elapsed: Duration,
}

/// The regions of a state file, mapped for a new store.
pub(super) struct StateRegions {
    pub(super) file: Arc<StateFile>,
    pub(super) created: bool,
    pub(super) slots: Segment,
    pub(super) pool: Option<Segment>,
    pub(super) extents: Extents,
    /// The fill-word region and how many words it holds.
    pub(super) fill_words: (Segment, usize),
}

impl StateRegions {
    /// Checks (or writes) `file`'s header for this configuration and maps its regions.
    pub(super) fn open(
        file: StateFile,
        config: &StoreConfig,
        pending: PendingConfig,
    ) -> Result<StateRegions, StoreError> {
        let pool_pages = match pending.workers {
            0 => 0,
            _ => pending.max_pending_pages as u64,
        };
        let ours = Header {
            seq: 0,
            capacity_pages: config.capacity_pages,
            primary: AlgorithmRecord {
                name: config.algorithm.name().to_owned(),
                level: config.level,
            },
            secondaries: Vec::new(),
            configured: false,
            pool_pages,
            layout: Layout::new(config.capacity_pages, pool_pages),
            identity: None,
            backing: None,
        };
        if config.capacity_pages == 0 || config.capacity_pages > super::MAX_CAPACITY_PAGES {
            return Err(StoreError::Config(format!(
                "the capacity must be 1 to {} pages, not {}",
                super::MAX_CAPACITY_PAGES,
                config.capacity_pages
            )));
        }
        let created = file.prepare(&ours)?;
        let layout = ours.layout;
        let file = Arc::new(file);
        let map = |(offset, len): (u64, u64)| {
            let len = usize::try_from(len.div_ceil(PAGE_SIZE as u64) * PAGE_SIZE as u64)
                .map_err(|_| StoreError::Config("the state file does not fit in memory".into()))?;
            file.map(offset, len).map_err(|source| {
                StoreError::State(StateError::Io {
                    path: file.name().to_owned(),
                    action: "mapped",
                    source,
                })
            })
        };
        let slots = map(layout.slots)?;
        let pool = match layout.pool.1 {
            0 => None,
            _ => Some(map(layout.pool)?),
        };
        let fill_words = (
            map(layout.fill_words)?,
            usize::try_from(layout.fill_words.1 / 8)
                .map_err(|_| StoreError::Config("the state file does not fit in memory".into()))?,
        );
        let extents = Extents::new(Arc::clone(&file), &layout).map_err(|source| {
            StoreError::State(StateError::Io {
                path: file.name().to_owned(),
                action: "mapped",
                source,
            })
        })?;
        Ok(StateRegions {
            file,
            created,
            slots,
            pool,
            extents,
            fill_words,
        })
    }
}

/// The dictionary region: a committed count (u64) at its start, then records of a length
/// (u32), a CRC-32 (u32) and the dictionary's bytes, each padded to 8 bytes.
const DICTIONARY_RECORDS: u64 = 8;

/// Reads the committed dictionary records of `state`: (bytes, where the next one goes).
fn read_dictionaries(state: &StateFile) -> Result<(Vec<Vec<u8>>, u64), StoreError> {
    let Some(header) = state.header() else {
        return Ok((Vec::new(), DICTIONARY_RECORDS));
    };
    let (start, len) = header.layout.dictionaries;
    let mut count = [0u8; 8];
    state.read_at(&mut count, start)?;
    let count = u64::from_le_bytes(count);
    let mut at = DICTIONARY_RECORDS;
    let mut all = Vec::new();
    let damaged = || StoreError::Recovery {
        path: state.name().to_owned(),
        reason: "a zstd dictionary record is damaged".into(),
    };
    for _ in 0..count {
        let mut head = [0u8; 8];
        if at + 8 > len {
            return Err(damaged());
        }
        state.read_at(&mut head, start + at)?;
        let bytes = u64::from(u32::from_le_bytes([head[0], head[1], head[2], head[3]]));
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if at + 8 + bytes > len {
            return Err(damaged());
        }
        let mut raw = vec![0u8; usize::try_from(bytes).map_err(|_| damaged())?];
        state.read_at(&mut raw, start + at + 8)?;
        if crc32fast::hash(&raw) != crc {
            return Err(damaged());
        }
        all.push(raw);
        at += 8 + bytes.div_ceil(8) * 8;
    }
    Ok((all, at))
}

impl PageStore {
    /// Writes `raw` into the state file's dictionary region (unless it is there already)
    /// before the store may use it: record first, then the committed count. Nothing without
    /// a state file.
    pub(super) fn persist_dictionary(&self, raw: &[u8]) -> Result<(), StateError> {
        let Some(state) = &self.state else {
            return Ok(());
        };
        let Some(header) = state.header() else {
            return Ok(());
        };
        let (existing, end) = read_dictionaries(state).map_err(|e| match e {
            StoreError::State(e) => e,
            _ => StateError::Corrupt {
                path: state.name().to_owned(),
            },
        })?;
        if existing.iter().any(|d| d == raw) {
            return Ok(());
        }
        let (start, len) = header.layout.dictionaries;
        let bytes = raw.len() as u64;
        if end + 8 + bytes > len {
            return Err(StateError::Full {
                path: state.name().to_owned(),
                region: "dictionary",
            });
        }
        let mut record = Vec::with_capacity(raw.len() + 8);
        record.extend_from_slice(&u32::try_from(raw.len()).unwrap_or(u32::MAX).to_le_bytes());
        record.extend_from_slice(&crc32fast::hash(raw).to_le_bytes());
        record.extend_from_slice(raw);
        state.write_at(&record, start + end)?;
        let count = existing.len() as u64 + 1;
        state.write_at(&count.to_le_bytes(), start)
    }

    /// Brings the store to the state its file holds, or starts it on a new file; must run
    /// once, after the builder steps (secondary algorithms, dictionary) and before the store
    /// serves. Checks the secondary algorithms against the header, scans the slot table once,
    /// rebuilds the allocator, the pending pool (re-queueing its jobs) and the statistics, and
    /// runs [`PageStore::check_consistency`]: a store that fails it is refused.
    ///
    /// Cumulative counters (failed reads and writes, notify_free, recompression and compaction
    /// counts, mem_used_max) start again from zero.
    pub fn recover(&mut self) -> Result<StateStart, StoreError> {
        let Some(state) = self.state.clone() else {
            return Ok(StateStart::Anonymous);
        };
        if self.recovered {
            return Err(StoreError::Config(
                "the store's state was recovered already; recover runs once".into(),
            ));
        }
        self.check_backing_record(&state)?;
        let secondaries: Vec<AlgorithmRecord> = self
            .recompression
            .specs
            .iter()
            .map(|spec| AlgorithmRecord {
                name: spec.algorithm.name().to_owned(),
                level: spec.level,
            })
            .collect();
        state.configure(&secondaries)?;
        self.recovered = true;
        if self.state_created {
            return Ok(StateStart::Created);
        }
        let started = Instant::now();
        self.reload_dictionaries(&state)?;
        let fresh = self
            .alloc
            .adopt_extents()
            .map_err(|source| StateError::Io {
                path: state.name().to_owned(),
                action: "mapped",
                source,
            })?;
        // Only the table's pages that hold data can hold entries: mark them touched, and
        // scan only them (a 1 TiB table is 2 GiB of mostly holes).
        if let Some(header) = state.header() {
            let (offset, len) = header.layout.slots;
            let populated = state
                .data_ranges(offset, len)
                .map_err(|source| StateError::Io {
                    path: state.name().to_owned(),
                    action: "read",
                    source,
                })?;
            self.slots.mark_populated(&populated);
        }
        let scan = self.scan_slots(&fresh);
        for &slot in &scan.damaged {
            self.slots
                .recover_set(slot, SlotEntry::new(SlotState::Invalid, 0));
        }
        if let Some(&first) = scan.damaged.first() {
            log::error!(
                "the state file {}: {} pages have damaged slot entries (the first is page \
                 {first}); they read as I/O errors until the guest writes them",
                state.name(),
                scan.damaged.len()
            );
        }
        let mut by_class: Vec<Vec<u64>> = vec![Vec::new(); HUGE_CLASS + 1];
        for &(class, handle, _) in &scan.objects {
            by_class[class].push(handle);
        }
        self.alloc.rebuild(&by_class);
        for unit in &scan.units {
            // SAFETY: the unit was found sound, its objects are allocated again, and no other
            // thread uses the store yet.
            unsafe { self.recover_unit(unit.key, unit.mask) };
            self.count_new_unit(unit.head.stream_len, unit.key.priority());
            self.units.nonces_after(unit.head.nonce);
        }
        if let Some(backing) = &self.backing {
            let live: Vec<(u64, usize)> = scan.on_file.iter().map(|&(o, l, _)| (o, l)).collect();
            backing.rebuild(&live).map_err(|e| StoreError::Recovery {
                path: state.name().to_owned(),
                reason: e.to_string(),
            })?;
        }
        if let Some(deferred) = &self.deferred {
            let held: Vec<(u32, u32)> = scan.pending.iter().map(|&(_, b, g)| (b, g)).collect();
            deferred.pool.recover(&held);
            for &(slot, buffer, generation) in &scan.pending {
                deferred
                    .queue
                    .push(Job::single(slot, buffer, generation, None));
            }
        }
        let mut pages = 0;
        for slot in self.slots.touched_slots(0..self.slots.len()) {
            let entry = self.slots.peek(slot).unwrap_or(SlotEntry::EMPTY);
            pages += u64::from(super::holds_page(entry));
            let swapped = Swapped {
                old: SlotEntry::EMPTY,
                stale: None,
            };
            if self.account_swap_keeping_object(swapped, entry).is_some() {
                unreachable!("a swap from an empty entry orphans nothing");
            }
        }
        // Table pages the file held that are all Empty now (discarded before the crash, or
        // data all zeros) go back.
        self.slots.give_back_empty_pages();
        self.counters.note_mem_used(self.mem_used_total());
        if let Err(reason) = self.check_consistency() {
            return Err(StoreError::Recovery {
                path: state.name().to_owned(),
                reason,
            });
        }
        Ok(StateStart::Recovered(Recovered {
            identity: state.header().and_then(|h| h.identity),
            pages,
            damaged_pages: scan.damaged.len() as u64,
            elapsed: started.elapsed(),
        }))
    }

    /// Checks the backing file against the one the header records, or records it (before
    /// any page can be written back to it). A recorded file must have been reopened as it
    /// was, with its key ([`BackingFile::reopen`](super::backing::BackingFile::reopen)):
    /// one opened anew was emptied, and its pages are gone.
    fn check_backing_record(&self, state: &StateFile) -> Result<(), StoreError> {
        let recorded = state.backing();
        let refuse = |reason: String| {
            Err(StoreError::Config(format!(
                "the state file {} {reason}",
                state.name()
            )))
        };
        match (&self.backing, recorded) {
            (None, None) => Ok(()),
            (None, Some(_)) if self.state_created => Ok(()),
            (None, Some(r)) => refuse(format!(
                "holds pages written back to {}; start with that backing file",
                r.path.display()
            )),
            (Some(backing), Some(r)) if !self.state_created => {
                let same = backing.is_kept()
                    && backing.key() == r.key
                    && backing.identity().unwrap_or((0, 0)) == (r.dev, r.ino);
                if same {
                    Ok(())
                } else {
                    refuse(format!(
                        "holds pages written back to {}, which was not reopened as it was \
                         (it must be reopened with its recorded key, not opened anew)",
                        r.path.display()
                    ))
                }
            }
            (Some(backing), _) => {
                let path = backing.path().to_owned();
                if path.as_os_str().len() > super::state::MAX_BACKING_PATH {
                    return refuse(format!(
                        "cannot record the backing file's path {}: it is longer than {} bytes",
                        path.display(),
                        super::state::MAX_BACKING_PATH
                    ));
                }
                let (dev, ino) = backing.identity().unwrap_or((0, 0));
                state.set_backing(Some(super::state::BackingRecord {
                    path,
                    key: backing.key(),
                    dev,
                    ino,
                }))?;
                Ok(())
            }
        }
    }

    fn reload_dictionaries(&self, state: &StateFile) -> Result<(), StoreError> {
        let (all, _) = read_dictionaries(state)?;
        let loaded = self.recompression.dictionaries.ids();
        for raw in all {
            let id = zstd::zstd_safe::get_dict_id_from_dict(&raw).map(|id| id.get());
            if id.is_some_and(|id| loaded.contains(&id)) {
                continue;
            }
            if let Err(error) = self.recompression.dictionaries.add(&raw) {
                log::warn!(
                    "the state file {}: a zstd dictionary it holds was not loaded: {error}",
                    state.name()
                );
            }
        }
        Ok(())
    }

    /// The one scan: every entry, its lock bit cleared, checked against the regions it
    /// names.
    fn scan_slots(&self, fresh: &[(usize, usize)]) -> Scan {
        let mut scan = Scan::default();
        let secondaries = self.recompression.specs.len();
        let pool = self.deferred.as_ref().map_or(0, |d| d.pool.capacity());
        for slot in self.slots.touched_slots(0..self.slots.len()) {
            let Some(entry) = self.slots.recover_entry(slot) else {
                break;
            };
            let valid = match entry.state() {
                SlotState::Empty => true,
                SlotState::SameFilled => {
                    // A table index is checked against the fill-word region below.
                    if same_fill::needs_table(entry.payload()) {
                        scan.table.push((entry.payload() >> 2, slot));
                    }
                    true
                }
                SlotState::Compressed => {
                    let len = entry.compressed_size();
                    let ok = (1..=HUGE_THRESHOLD).contains(&len)
                        && entry.priority() <= secondaries
                        && self
                            .alloc
                            .object_in_range(class_of(len), entry.handle(), fresh);
                    if ok {
                        scan.objects.push((class_of(len), entry.handle(), slot));
                    }
                    ok
                }
                SlotState::Huge => {
                    let ok = entry.compressed_size() == 0
                        && entry.priority() == 0
                        && self
                            .alloc
                            .object_in_range(HUGE_CLASS, entry.handle(), fresh);
                    if ok {
                        scan.objects.push((HUGE_CLASS, entry.handle(), slot));
                    }
                    ok
                }
                SlotState::Pending => {
                    let (buffer, generation) = entry.pending_buffer();
                    let ok = (buffer as usize) < pool && entry.priority() == 0;
                    if ok {
                        scan.pending.push((slot, buffer, generation));
                    }
                    ok
                }
                SlotState::WrittenBack => {
                    let (offset, len) = entry.backing_object();
                    let priority_ok = match len {
                        PAGE_SIZE => entry.priority() == 0,
                        _ => entry.priority() <= secondaries,
                    };
                    let ok = priority_ok
                        && self
                            .backing
                            .as_ref()
                            .is_some_and(|b| b.may_hold(offset, len));
                    if ok {
                        scan.on_file.push((offset, len, slot));
                    }
                    ok
                }
                SlotState::Unit => {
                    // Checked with the unit's other members below.
                    scan.unit_members
                        .push((entry.unit_class(), entry.handle(), slot));
                    true
                }
                SlotState::Invalid => false,
            };
            if !valid {
                scan.damaged.push(slot);
            }
        }
        self.scan_units(&mut scan, fresh);
        // Table-encoded same-filled pages: the table is rebuilt from the indices they name;
        // an index past the region, or whose word is not a table word, is damaged.
        let named: Vec<u64> = scan.table.iter().map(|&(index, _)| index).collect();
        let bad = self.fill_words.recover(&named);
        if !bad.is_empty() {
            scan.damaged
                .extend(bad.into_iter().map(|k| scan.table[k].1));
            scan.damaged.sort_unstable();
        }
        // Two slots naming one object or one buffer: neither can be trusted.
        scan.objects.sort_unstable();
        let mut twice = Vec::new();
        for pair in scan.objects.windows(2) {
            if pair[0].0 == pair[1].0 && pair[0].1 == pair[1].1 {
                twice.push(pair[0].2);
                twice.push(pair[1].2);
            }
        }
        scan.pending.sort_unstable_by_key(|p| p.1);
        for pair in scan.pending.windows(2) {
            if pair[0].1 == pair[1].1 {
                twice.push(pair[0].0);
                twice.push(pair[1].0);
            }
        }
        // Overlapping records on the backing file: neither is trusted.
        scan.on_file.sort_unstable();
        let mut reach: Option<(u64, usize)> = None;
        for &(offset, len, slot) in &scan.on_file {
            let end = offset + super::backing::RECORD_HEADER as u64 + len as u64;
            if let Some((until, owner)) = reach {
                if offset < until {
                    twice.push(owner);
                    twice.push(slot);
                }
            }
            if reach.is_none_or(|(until, _)| end > until) {
                reach = Some((end, slot));
            }
        }
        if !twice.is_empty() {
            // A unit's objects are recorded under its first member: distrust all its members.
            twice.sort_unstable();
            let mut members = Vec::new();
            for unit in &scan.units {
                if twice.binary_search(&unit.members[0]).is_ok() {
                    members.extend_from_slice(&unit.members);
                }
            }
            twice.extend(members);
            scan.units
                .retain(|u| twice.binary_search(&u.members[0]).is_err());
            twice.sort_unstable();
            twice.dedup();
            scan.objects.retain(|o| twice.binary_search(&o.2).is_err());
            scan.pending.retain(|p| twice.binary_search(&p.0).is_err());
            scan.on_file.retain(|f| twice.binary_search(&f.2).is_err());
            scan.damaged.extend(twice);
            scan.damaged.sort_unstable();
        }
        scan
    }

    /// Checks the units the scan's Unit entries name: each head lies in a segment the file
    /// holds and is sound, its pieces too, and its members lie in one aligned span at their
    /// own indices with one priority. A head copied by a compaction the kill interrupted (the
    /// same nonce, pieces and span) is merged with its original. Every member of a unit that
    /// fails is damaged.
    fn scan_units(&self, scan: &mut Scan, fresh: &[(usize, usize)]) {
        let secondaries = self.recompression.specs.len();
        scan.unit_members.sort_unstable();
        let mut found: Vec<FoundUnit> = Vec::new();
        for group in scan.unit_members.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)) {
            let (class, handle, slot) = group[0];
            let Some(key) = self.slots.peek(slot) else {
                continue;
            };
            let members: Vec<usize> = group.iter().map(|m| m.2).collect();
            let sound = self.sound_unit(key, &members, secondaries, fresh);
            match sound {
                Some((head, mask)) => found.push(FoundUnit {
                    key,
                    head,
                    members,
                    mask,
                }),
                None => {
                    log::warn!("recovery: the unit whose head is object {handle} of class {class} is damaged");
                    scan.damaged.extend(members);
                }
            }
        }
        // Merge a head's interrupted copy into the original: same content, same pieces.
        found.sort_by_key(|u| (u.head.nonce, u.members[0]));
        let mut merged: Vec<FoundUnit> = Vec::new();
        for unit in found {
            let first = unit.members[0] - unit.key.unit_index();
            if let Some(last) = merged.last_mut().filter(|last| {
                last.head == unit.head
                    && last.members[0] - last.key.unit_index() == first
                    && last.mask & unit.mask == 0
                    && last.key.priority() == unit.key.priority()
                    // SAFETY: both heads were found sound (live in the file's segments).
                    && unsafe { self.unit_pieces(last.key, &last.head) == self.unit_pieces(unit.key, &unit.head) }
            }) {
                for &slot in &unit.members {
                    if let Some(entry) = self.slots.peek(slot) {
                        let moved = SlotEntry::unit_member(last.key.unit_class(), last.key.handle(), entry.unit_index())
                            .with_priority(entry.priority())
                            .with_idle(entry.is_idle())
                            .with_incompressible(entry.is_incompressible())
                            .with_age(entry.age());
                        self.slots.recover_set(slot, moved);
                    }
                }
                last.mask |= unit.mask;
                last.members.extend(unit.members);
                last.members.sort_unstable();
                continue;
            }
            merged.push(unit);
        }
        for unit in &merged {
            let owner = unit.members[0];
            scan.objects
                .push((unit.key.unit_class(), unit.key.handle(), owner));
            // SAFETY: the head was found sound.
            let pieces = unsafe { self.unit_pieces(unit.key, &unit.head) };
            for &piece in &pieces[..unit.head.pieces] {
                scan.objects.push((HUGE_CLASS, piece, owner));
            }
        }
        scan.units = merged;
    }

    /// Whether the unit `key` (a member's entry) names is sound with `members` (its members'
    /// slots, sorted): its head and mask if so.
    fn sound_unit(
        &self,
        key: SlotEntry,
        members: &[usize],
        secondaries: usize,
        fresh: &[(usize, usize)],
    ) -> Option<(super::unit::Head, u32)> {
        let class = key.unit_class();
        if class > HUGE_CLASS || !self.alloc.object_in_range(class, key.handle(), fresh) {
            return None;
        }
        // SAFETY: the head lies in a segment the file holds (mapped); a damaged one reads as
        // bytes that fail the checks.
        let head = unsafe { self.unit_head(key) }?;
        let first = members[0].checked_sub(key.unit_index())?;
        if first != head.first {
            return None;
        }
        let mut mask = 0u32;
        for &slot in members {
            let entry = self.slots.peek(slot)?;
            if slot - first != entry.unit_index()
                || entry.unit_index() >= head.pages
                || entry.priority() != key.priority()
                || entry.priority() > secondaries
            {
                return None;
            }
            mask |= 1 << entry.unit_index();
        }
        // SAFETY: as above.
        let pieces = unsafe { self.unit_pieces(key, &head) };
        pieces[..head.pieces]
            .iter()
            .all(|&piece| self.alloc.object_in_range(HUGE_CLASS, piece, fresh))
            .then_some((head, mask))
    }

    /// The frontend the state file records, if any.
    pub fn state_identity(&self) -> Option<FrontendIdentity> {
        self.state
            .as_ref()
            .and_then(|s| s.header())
            .and_then(|h| h.identity)
    }

    /// Records the frontend the state belongs to (`None`: no one) in the state file's header,
    /// crash-safe (the older header copy is written). Nothing without a state file.
    pub fn set_state_identity(&self, identity: Option<FrontendIdentity>) -> Result<(), StoreError> {
        match &self.state {
            Some(state) => Ok(state.set_identity(identity)?),
            None => Ok(()),
        }
    }

    /// Clears the recorded frontend, then drops every page and gives its memory back (to the
    /// host and, with a state file, out of the file): before a different frontend is served,
    /// and at a normal end. The configuration in the header stays valid.
    ///
    /// The frontend is forgotten first: a daemon killed half-way through leaves a state that
    /// belongs to no one (a later daemon destroys the rest before serving anybody), never one
    /// that would give its old frontend a device with some of its pages gone.
    pub fn destroy_state(&self) -> Result<(), StoreError> {
        self.set_state_identity(None)?;
        self.discard(0..self.capacity_pages())?;
        if let Some(deferred) = &self.deferred {
            deferred.pool.trim();
        }
        self.compact();
        Ok(())
    }

    /// The state file's descriptor (for systemd's fd store), if the store has one.
    pub fn state_fd(&self) -> Option<BorrowedFd<'_>> {
        self.state.as_ref().map(|s| s.as_fd())
    }

    /// Whether the store's memory is a state file.
    pub fn has_state(&self) -> bool {
        self.state.is_some()
    }

    /// Counts a page recovery found damaged (tests).
    #[cfg(test)]
    pub(super) fn damaged_pages(&self) -> u64 {
        self.counters.sum(|c| &c.damaged_pages)
    }
}

/// A unit the scan found sound.
#[derive(Debug)]
struct FoundUnit {
    /// A member's entry (names the head).
    key: SlotEntry,
    head: super::unit::Head,
    /// Its members' slots, the first one first.
    members: Vec<usize>,
    /// Their bits.
    mask: u32,
}

/// What the slot scan found.
#[derive(Debug, Default)]
struct Scan {
    /// (head class, head handle, slot) of every Unit entry.
    unit_members: Vec<(usize, u64, usize)>,
    /// The sound units (their head and pieces are in `objects`, under their first member).
    units: Vec<FoundUnit>,
    /// (class, handle, slot) of every object a valid entry names.
    objects: Vec<(usize, u64, usize)>,
    /// (slot, buffer, generation) of every valid Pending entry.
    pending: Vec<(usize, u32, u32)>,
    /// (offset, length, slot) of every valid WrittenBack entry.
    on_file: Vec<(u64, usize, usize)>,
    /// (table index, slot) of every same-filled entry in the table form.
    table: Vec<(u64, usize)>,
    /// Slots whose entries are damaged.
    damaged: Vec<usize>,
}
