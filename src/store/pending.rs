// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The pending pool: guest pages waiting for a compression worker (kcompressd).
//!
//! A write that is not same-filled copies the guest's page into a pool *buffer*, makes the slot
//! `Pending` (naming the buffer and its generation) and completes; a worker later compresses
//! the buffer and installs the object if the slot still holds that exact pending entry.
//!
//! # Buffer ownership
//!
//! A buffer in use has up to two *holders*, counted in `holders[buffer]`:
//!
//! - the **slot** whose entry is `Pending(buffer, generation)` — released by whoever replaces
//!   that entry (a later write, a discard, or the worker installing the compressed object);
//! - the **job** in the work queue — released by the worker once it has compressed the buffer
//!   and installed (or dropped) the result.
//!
//! The content is written once, by the writer, before the buffer is published (slot entry
//! stored with release ordering, job pushed under the queue mutex) and never changes while a
//! holder remains. Readers read it under the slot lock (which the slot's hold keeps valid); the
//! worker reads it under the job's hold. The buffer returns to the free list when the last
//! holder lets go, and only then can it be taken again: so a slot can never name a buffer that
//! holds someone else's page (no ABA), and the generation — bumped at every take — only
//! double-checks this.
//!
//! # Memory
//!
//! The buffers live in one `MAP_NORESERVE` mapping: a buffer costs memory once it is first
//! written (*resident*). `resident_bytes` counts those and is part of the store's
//! `mem_used_total`; taking a buffer that is not resident yet is refused when it would pass the
//! memory limit. [`PendingPool::trim`] gives free resident buffers back to the OS (the workers
//! call it when the pool has drained, and when a memory limit stalls them).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::alloc::Segment;
use super::slot::{StaleObject, MAX_PENDING_BUFFERS};
use crate::PAGE_SIZE;

/// The most pages a worker takes from the queue at once (an IAA batch).
pub const WORKER_BATCH: usize = crate::codec::MAX_BATCH;

/// A buffer the caller has taken and may write, not yet published.
#[derive(Debug)]
pub(crate) struct TakenBuffer {
    pub(crate) index: u32,
    pub(crate) generation: u32,
    /// Whether taking it made the pool's memory grow (a cold buffer became resident).
    pub(crate) grew: bool,
}

/// A page waiting for a worker: slot `slot` was made `Pending(buffer, generation)`. Not
/// `Clone`: it owns its hold on the buffer and the object it frees.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Job {
    pub(crate) slot: usize,
    pub(crate) buffer: u32,
    pub(crate) generation: u32,
    /// The allocator object the write replaced, for the worker to free off the request path.
    pub(crate) stale: Option<StaleObject>,
    /// The pages of the unit the page was written in (1: a page on its own). The unit starts
    /// at `slot` rounded down to a multiple of it.
    pub(crate) unit_pages: u8,
    /// On the first job of a unit's group: the jobs in the group, which follow it in the
    /// queue and go to one worker together; 0 on the others; 1 on a page on its own.
    pub(crate) group: u8,
}

impl Job {
    /// A job for a page on its own.
    pub(crate) fn single(
        slot: usize,
        buffer: u32,
        generation: u32,
        stale: Option<StaleObject>,
    ) -> Job {
        Job {
            slot,
            buffer,
            generation,
            stale,
            unit_pages: 1,
            group: 1,
        }
    }
}

/// The most jobs [`JobQueue::next_batch`] hands out at once: a batch and a whole unit's group.
pub(crate) const MAX_TAKEN: usize = WORKER_BATCH + crate::store::MAX_UNIT_MEMBERS;

#[derive(Debug)]
struct FreeLists {
    /// Free buffers whose pages are resident (taken first: no fault, no new memory).
    resident: Vec<u32>,
    /// Free buffers that were never written or were trimmed.
    cold: Vec<u32>,
}

/// The pool of page buffers. `Send + Sync`.
#[derive(Debug)]
pub(crate) struct PendingPool {
    memory: Segment,
    capacity: usize,
    holders: Box<[AtomicU8]>,
    generations: Box<[AtomicU32]>,
    free: Mutex<FreeLists>,
    /// Buffers in use (taken and not yet returned).
    in_use: AtomicU64,
    /// Buffers whose pages are resident.
    resident: AtomicU64,
}

impl PendingPool {
    /// A pool of `capacity` buffers (1 to [`MAX_PENDING_BUFFERS`]); memory is reserved, not
    /// committed.
    #[cfg(test)]
    pub(crate) fn new(capacity: usize) -> std::io::Result<PendingPool> {
        PendingPool::with_memory(capacity, None)
    }

    /// A pool of `capacity` buffers in `memory` (a state file's pool region, at least
    /// `capacity` pages), or in fresh anonymous memory when `None`.
    pub(crate) fn with_memory(
        capacity: usize,
        memory: Option<Segment>,
    ) -> std::io::Result<PendingPool> {
        if capacity == 0 || capacity > MAX_PENDING_BUFFERS {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("a pending pool holds 1 to {MAX_PENDING_BUFFERS} pages, not {capacity}"),
            ));
        }
        let memory = match memory {
            Some(memory) if memory.len() >= capacity * PAGE_SIZE => memory,
            Some(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "the state file's pool region is smaller than the pool",
                ))
            }
            None => Segment::map(capacity * PAGE_SIZE).map_err(std::io::Error::other)?,
        };
        // Buffer numbers fit 24 bits (checked above); hand out low numbers first.
        #[allow(clippy::cast_possible_truncation)]
        let cold = (0..capacity as u32).rev().collect();
        Ok(PendingPool {
            memory,
            capacity,
            holders: (0..capacity).map(|_| AtomicU8::new(0)).collect(),
            generations: (0..capacity).map(|_| AtomicU32::new(0)).collect(),
            free: Mutex::new(FreeLists {
                resident: Vec::with_capacity(capacity),
                cold,
            }),
            in_use: AtomicU64::new(0),
            resident: AtomicU64::new(0),
        })
    }

    /// The number of buffers.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes of resident buffers (part of `mem_used_total`).
    pub(crate) fn resident_bytes(&self) -> u64 {
        self.resident.load(Ordering::Relaxed) * PAGE_SIZE as u64
    }

    /// Buffers in use.
    pub(crate) fn in_use(&self) -> u64 {
        self.in_use.load(Ordering::Relaxed)
    }

    /// Takes a free buffer, or `None` when all are in use or only a buffer that would grow
    /// memory is left and `may_grow` refuses `PAGE_SIZE` more bytes.
    pub(crate) fn take(&self, may_grow: impl FnOnce(u64) -> bool) -> Option<TakenBuffer> {
        let mut free = self.lock_free();
        let (index, grew) = match free.resident.pop() {
            Some(index) => (index, false),
            None => {
                let index = *free.cold.last()?;
                if !may_grow(PAGE_SIZE as u64) {
                    return None;
                }
                free.cold.pop();
                self.resident.fetch_add(1, Ordering::Relaxed);
                (index, true)
            }
        };
        drop(free);
        self.in_use.fetch_add(1, Ordering::Relaxed);
        let generation = self.generations[index as usize]
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(1);
        Some(TakenBuffer {
            index,
            generation,
            grew,
        })
    }

    /// The page of a buffer the caller has taken and not yet published; the borrow of
    /// `buffer` keeps it from being published or given back while the page is in use.
    ///
    /// # Safety
    /// `buffer` must have been taken from this pool (not another one).
    pub(crate) unsafe fn page_mut<'a>(
        &'a self,
        buffer: &'a mut TakenBuffer,
    ) -> &'a mut [u8; PAGE_SIZE] {
        // SAFETY: the index is below capacity (it came from this pool's free lists, by this
        // function's contract); a taken buffer is owned by the one `TakenBuffer`, which is
        // borrowed mutably for the page's lifetime, so no other reference to the page exists;
        // the mapping lives as long as `self`.
        unsafe { &mut *self.page_ptr(buffer.index).cast::<[u8; PAGE_SIZE]>() }
    }

    /// The page of a published buffer.
    ///
    /// # Safety
    /// The caller must keep a hold on `buffer` (hold the lock of the slot whose entry names it,
    /// or own its job) for as long as the returned reference lives.
    pub(crate) unsafe fn page(&self, buffer: u32) -> &[u8; PAGE_SIZE] {
        assert!(
            (buffer as usize) < self.capacity,
            "pending buffer out of range"
        );
        // SAFETY: in range (asserted); a held, published buffer is written by no one (module
        // documentation), and the mapping lives as long as `self`.
        unsafe { &*self.page_ptr(buffer).cast::<[u8; PAGE_SIZE]>() }
    }

    /// Publishes a taken buffer with its two holders (the slot and the job).
    pub(crate) fn publish(&self, buffer: TakenBuffer) -> (u32, u32) {
        self.holders[buffer.index as usize].store(2, Ordering::Relaxed);
        (buffer.index, buffer.generation)
    }

    /// Returns a taken, unpublished buffer to the free list.
    pub(crate) fn give_back(&self, buffer: TakenBuffer) {
        self.free_buffer(buffer.index);
    }

    /// Drops one holder of a published buffer; the last one returns it to the free list.
    pub(crate) fn release(&self, buffer: u32) {
        let Some(holders) = self.holders.get(buffer as usize) else {
            debug_assert!(false, "released pending buffer {buffer} out of range");
            return;
        };
        let before = holders.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(before > 0, "pending buffer {buffer} released too often");
        if before == 1 {
            self.free_buffer(buffer);
        }
    }

    /// The generation a buffer was last taken with, and its holders (consistency checks).
    pub(crate) fn buffer_state(&self, buffer: u32) -> Option<(u32, u8)> {
        let i = buffer as usize;
        Some((
            self.generations.get(i)?.load(Ordering::Relaxed),
            self.holders.get(i)?.load(Ordering::Relaxed),
        ))
    }

    /// Gives the pages of every free resident buffer back to the OS. Returns how many.
    pub(crate) fn trim(&self) -> usize {
        let mut free = self.lock_free();
        let n = free.resident.len();
        for index in std::mem::take(&mut free.resident) {
            // SAFETY: a free buffer has no holder and no writer: no reference to its page
            // exists, so its content may be discarded (it reads as zeros afterwards); the
            // page lies inside the pool's mapping.
            unsafe { self.memory.discard(self.page_ptr(index), PAGE_SIZE) };
            free.cold.push(index);
        }
        free.resident = Vec::with_capacity(self.capacity);
        self.resident.fetch_sub(n as u64, Ordering::Relaxed);
        n
    }

    /// Recovery: the buffers `held` names (by Pending slots of a state file, each once, in
    /// range) are in use by their slot and a job again, with the generation the slot names;
    /// every other buffer is free and its memory given back.
    pub(crate) fn recover(&self, held: &[(u32, u32)]) {
        let mut is_held = vec![false; self.capacity];
        for &(buffer, generation) in held {
            is_held[buffer as usize] = true;
            self.generations[buffer as usize].store(generation, Ordering::Relaxed);
            self.holders[buffer as usize].store(2, Ordering::Relaxed);
        }
        let mut free = self.lock_free();
        free.resident.clear();
        free.cold.clear();
        for index in (0..self.capacity).rev() {
            if is_held[index] {
                continue;
            }
            // Below capacity, which fits 24 bits.
            #[allow(clippy::cast_possible_truncation)]
            let index = index as u32;
            self.holders[index as usize].store(0, Ordering::Relaxed);
            // SAFETY: no slot names this buffer and no job exists yet: nothing reads it, and
            // the page lies inside the pool's mapping.
            unsafe { self.memory.discard(self.page_ptr(index), PAGE_SIZE) };
            free.cold.push(index);
        }
        self.in_use.store(held.len() as u64, Ordering::Relaxed);
        self.resident.store(held.len() as u64, Ordering::Relaxed);
    }

    fn free_buffer(&self, index: u32) {
        self.lock_free().resident.push(index);
        self.in_use.fetch_sub(1, Ordering::Relaxed);
    }

    fn lock_free(&self) -> MutexGuard<'_, FreeLists> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn page_ptr(&self, index: u32) -> *mut u8 {
        debug_assert!((index as usize) < self.capacity);
        // In range of the mapping: index < capacity.
        self.memory.base().wrapping_add(index as usize * PAGE_SIZE)
    }
}

/// Hooks that tests use to pause or slow the workers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WorkerHooks {
    /// Workers take no job while set.
    pub paused: bool,
    /// Workers sleep this long before each batch.
    pub delay: Duration,
}

#[derive(Debug)]
struct QueueState {
    jobs: VecDeque<Job>,
    /// Units whose live members fell below the rewrite share, to rewrite page by page.
    rewrites: Vec<UnitRewrite>,
    /// Jobs whose object could not be allocated (memory limit): retried later.
    stalled: Vec<Job>,
    sleepers: usize,
    /// Wake-ups sent to sleeping workers (tests count them).
    wakes: u64,
    stopping: bool,
    hooks: WorkerHooks,
}

/// The queue of jobs from the writers to the workers.
#[derive(Debug)]
pub(crate) struct JobQueue {
    state: Mutex<QueueState>,
    ready: Condvar,
}

/// A unit for a worker to rewrite page by page (`unit.rs`, "partial units"): the unit of
/// `pages` pages at slot `first` whose head is object `handle` of class `class`, as long as it
/// still holds the content `nonce` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UnitRewrite {
    pub(crate) first: usize,
    pub(crate) pages: usize,
    pub(crate) class: usize,
    pub(crate) handle: u64,
    pub(crate) nonce: u64,
}

/// What a worker got from [`JobQueue::next_batch`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Batch {
    /// Rewrite this unit page by page (there were no jobs).
    Rewrite(UnitRewrite),
    /// Compress these jobs (fresh ones, or stalled ones to retry).
    Jobs(usize),
    /// The queue is stopping.
    Stop,
}

/// How long stalled jobs wait before a worker retries them.
const STALL_RETRY: Duration = Duration::from_millis(50);

/// How long a worker waits with nothing to do before it runs its idle work (giving the
/// drained pool's memory back): long enough that a burst's gaps do not trim and re-fault the
/// pool over and over.
const IDLE_AFTER: Duration = Duration::from_secs(1);

impl JobQueue {
    /// A queue that never holds more than `capacity` jobs (one per pool buffer).
    pub(crate) fn new(capacity: usize) -> JobQueue {
        JobQueue {
            state: Mutex::new(QueueState {
                jobs: VecDeque::with_capacity(capacity),
                rewrites: Vec::new(),
                stalled: Vec::with_capacity(capacity),
                sleepers: 0,
                wakes: 0,
                stopping: false,
                hooks: WorkerHooks::default(),
            }),
            ready: Condvar::new(),
        }
    }

    /// Queues a job and wakes a sleeping worker, if any.
    pub(crate) fn push(&self, job: Job) {
        self.push_group(std::iter::once(job));
    }

    /// Queues a job from a queue thread in the middle of a round of requests: a sleeping
    /// worker is woken only once a whole batch ([`WORKER_BATCH`] jobs) waits, so that a round
    /// of writes costs one wake-up a batch, not one a write. Returns whether a worker may still
    /// be asleep with jobs waiting: the caller then owes a [`kick`](Self::kick) when its round
    /// ends.
    pub(crate) fn push_in_round(&self, job: Job) -> bool {
        self.push_group_in_round(std::iter::once(job))
    }

    /// [`push`](Self::push) for the jobs of one write, queued together (a unit's group stays
    /// in one piece).
    pub(crate) fn push_group(&self, jobs: impl IntoIterator<Item = Job>) {
        let mut state = self.lock();
        state.jobs.extend(jobs);
        let wake = state.sleepers > 0;
        state.wakes += u64::from(wake);
        drop(state);
        if wake {
            self.ready.notify_one();
        }
    }

    /// [`push_in_round`](Self::push_in_round) for the jobs of one write, queued together.
    pub(crate) fn push_group_in_round(&self, jobs: impl IntoIterator<Item = Job>) -> bool {
        let mut state = self.lock();
        state.jobs.extend(jobs);
        let sleeping = state.sleepers > 0;
        let wake = sleeping && state.jobs.len() >= WORKER_BATCH;
        state.wakes += u64::from(wake);
        drop(state);
        if wake {
            self.ready.notify_one();
        }
        sleeping && !wake
    }

    /// Wakes a sleeping worker when jobs wait: the end of a round that queued jobs with
    /// [`push_in_round`](Self::push_in_round).
    pub(crate) fn kick(&self) {
        let mut state = self.lock();
        // One worker a batch waiting, as many as sleep.
        let wake = state.sleepers.min(state.jobs.len().div_ceil(WORKER_BATCH));
        state.wakes += wake as u64;
        drop(state);
        for _ in 0..wake {
            self.ready.notify_one();
        }
    }

    /// Waits for work and moves up to `out.len()` jobs into `out`. Stalled jobs are handed out
    /// again after [`STALL_RETRY`]; `idle` runs (without the lock) once the worker has had
    /// nothing to do for [`IDLE_AFTER`], before it sleeps for good.
    pub(crate) fn next_batch(&self, out: &mut [Job], mut idle: impl FnMut()) -> Batch {
        let mut state = self.lock();
        let mut idle_ran = false;
        loop {
            if state.stopping {
                return Batch::Stop;
            }
            let delay = state.hooks.delay;
            if !state.hooks.paused && !state.jobs.is_empty() {
                // A batch of WORKER_BATCH jobs, never splitting a unit's group.
                let mut n = 0;
                while let Some(front) = state.jobs.front() {
                    let group = usize::from(front.group);
                    if group != 0 && (n >= WORKER_BATCH.min(out.len()) || n + group > out.len()) {
                        break;
                    }
                    if let Some(job) = state.jobs.pop_front() {
                        out[n] = job;
                        n += 1;
                    }
                }
                drop(state);
                if !delay.is_zero() {
                    std::thread::sleep(delay);
                }
                return Batch::Jobs(n);
            }
            if !state.hooks.paused {
                if let Some(rewrite) = state.rewrites.pop() {
                    return Batch::Rewrite(rewrite);
                }
            }
            state.sleepers += 1;
            let paused = state.hooks.paused;
            let (guard, timed_out) = if !paused && !state.stalled.is_empty() {
                let (guard, result) = self
                    .ready
                    .wait_timeout(state, STALL_RETRY)
                    .unwrap_or_else(|e| e.into_inner());
                (guard, result.timed_out())
            } else if !paused && !idle_ran {
                let (guard, result) = self
                    .ready
                    .wait_timeout(state, IDLE_AFTER)
                    .unwrap_or_else(|e| e.into_inner());
                (guard, result.timed_out())
            } else {
                (
                    self.ready.wait(state).unwrap_or_else(|e| e.into_inner()),
                    false,
                )
            };
            state = guard;
            state.sleepers -= 1;
            if !timed_out || state.hooks.paused || state.stopping || !state.jobs.is_empty() {
                continue;
            }
            if !state.stalled.is_empty() {
                let n = out.len().min(state.stalled.len());
                let start = state.stalled.len() - n;
                for (slot, job) in out.iter_mut().zip(state.stalled.drain(start..)) {
                    *slot = job;
                }
                return Batch::Jobs(n);
            }
            // Nothing to do for IDLE_AFTER: run the idle work once, then sleep until woken.
            idle_ran = true;
            drop(state);
            idle();
            state = self.lock();
        }
    }

    /// Asks the workers to rewrite a unit page by page; wakes one.
    pub(crate) fn push_rewrite(&self, rewrite: UnitRewrite) {
        let mut state = self.lock();
        state.rewrites.push(rewrite);
        let wake = state.sleepers > 0;
        state.wakes += u64::from(wake);
        drop(state);
        if wake {
            self.ready.notify_one();
        }
    }

    /// Parks a job that could not be installed (memory limit) for a later retry, as a page
    /// on its own.
    pub(crate) fn stall(&self, mut job: Job) {
        job.unit_pages = 1;
        job.group = 1;
        self.lock().stalled.push(job);
    }

    /// Takes every queued and stalled job out (the store being dropped frees what they own).
    pub(crate) fn drain(&self) -> Vec<Job> {
        let mut state = self.lock();
        let mut jobs: Vec<Job> = state.jobs.drain(..).collect();
        jobs.append(&mut state.stalled);
        jobs
    }

    /// Jobs queued and stalled.
    pub(crate) fn len(&self) -> (usize, usize) {
        let state = self.lock();
        (state.jobs.len(), state.stalled.len())
    }

    /// Workers asleep, and the wake-ups sent so far.
    #[cfg(test)]
    fn sleepers_and_wakes(&self) -> (usize, u64) {
        let state = self.lock();
        (state.sleepers, state.wakes)
    }

    /// Sets the test hooks and wakes every worker.
    pub(crate) fn set_hooks(&self, hooks: WorkerHooks) {
        self.lock().hooks = hooks;
        self.ready.notify_all();
    }

    /// Makes every worker return [`Batch::Stop`].
    pub(crate) fn stop(&self) {
        self.lock().stopping = true;
        self.ready.notify_all();
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_returns_only_after_both_holders_let_go() {
        let pool = PendingPool::new(1).unwrap();
        let taken = pool.take(|_| true).unwrap();
        let (index, generation) = pool.publish(taken);
        assert!(pool.take(|_| true).is_none(), "the only buffer is in use");
        pool.release(index);
        assert!(pool.take(|_| true).is_none(), "the job still holds it");
        pool.release(index);
        let again = pool.take(|_| true).unwrap();
        assert_eq!(again.index, index);
        assert_ne!(again.generation, generation);
        pool.give_back(again);
        assert_eq!(pool.in_use(), 0);
    }

    #[test]
    fn growing_past_the_limit_is_refused_and_trim_gives_memory_back() {
        let pool = PendingPool::new(4).unwrap();
        let a = pool.take(|_| true).unwrap();
        assert_eq!(pool.resident_bytes(), PAGE_SIZE as u64);
        assert!(
            pool.take(|_| false).is_none(),
            "a cold buffer would grow memory"
        );
        pool.give_back(a);
        // A resident free buffer needs no new memory.
        let b = pool.take(|_| false).unwrap();
        pool.give_back(b);
        assert_eq!(pool.trim(), 1);
        assert_eq!(pool.resident_bytes(), 0);
        assert!(pool.take(|_| false).is_none());
    }

    #[test]
    fn the_pool_refuses_absurd_sizes() {
        assert!(PendingPool::new(0).is_err());
        assert!(PendingPool::new(MAX_PENDING_BUFFERS + 1).is_err());
    }

    #[test]
    fn a_paused_queue_hands_out_nothing_until_resumed() {
        let queue = std::sync::Arc::new(JobQueue::new(4));
        queue.set_hooks(WorkerHooks {
            paused: true,
            delay: Duration::ZERO,
        });
        queue.push(job(1));
        let worker = {
            let queue = queue.clone();
            std::thread::spawn(move || {
                let mut out: [Job; 8] = std::array::from_fn(|_| Job::single(0, 0, 0, None));
                let batch = queue.next_batch(&mut out, || {});
                let [first, ..] = out;
                (batch, first)
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!worker.is_finished(), "a paused worker took a job");
        queue.set_hooks(WorkerHooks::default());
        let (batch, job) = worker.join().unwrap();
        assert_eq!(batch, Batch::Jobs(1));
        assert_eq!(job.slot, 1);
        queue.stop();
        let mut out = [job];
        assert_eq!(queue.next_batch(&mut out, || {}), Batch::Stop);
    }

    fn job(slot: usize) -> Job {
        Job::single(slot, 0, 1, None)
    }

    #[test]
    fn a_batch_never_splits_a_units_group() {
        let queue = JobQueue::new(64);
        queue.push_group((0..6).map(job));
        let mut group: Vec<Job> = (16..32).map(job).collect();
        for (i, job) in group.iter_mut().enumerate() {
            job.unit_pages = 16;
            job.group = if i == 0 { 16 } else { 0 };
        }
        queue.push_group(group);
        queue.push(job(40));
        let mut out: [Job; MAX_TAKEN] = std::array::from_fn(|_| Job::single(0, 0, 0, None));
        // Six singles, then the whole group of sixteen: under a batch when it starts.
        assert_eq!(queue.next_batch(&mut out, || {}), Batch::Jobs(22));
        assert_eq!((out[6].slot, out[6].group, out[21].slot), (16, 16, 31));
        assert_eq!(queue.next_batch(&mut out, || {}), Batch::Jobs(1));
        assert_eq!(out[0].slot, 40);
    }

    /// Waits until `n` workers sleep in `next_batch`.
    fn wait_for_sleepers(queue: &JobQueue, n: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while queue.sleepers_and_wakes().0 != n {
            assert!(
                std::time::Instant::now() < deadline,
                "no worker went to sleep"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_round_wakes_a_sleeping_worker_once_a_batch_not_once_a_job() {
        // Arrange: one worker asleep on an empty queue.
        let queue = std::sync::Arc::new(JobQueue::new(64));
        let (taken_tx, taken_rx) = std::sync::mpsc::channel();
        let worker = {
            let queue = queue.clone();
            std::thread::spawn(move || {
                let mut out: [Job; WORKER_BATCH] = std::array::from_fn(job);
                while let Batch::Jobs(n) = queue.next_batch(&mut out, || {}) {
                    taken_tx.send(n).unwrap();
                }
            })
        };
        wait_for_sleepers(&queue, 1);

        // Act and assert: jobs short of a batch wake nobody, and are owed a kick.
        for slot in 0..WORKER_BATCH - 1 {
            assert!(queue.push_in_round(job(slot)), "a kick is owed");
        }
        assert_eq!(queue.sleepers_and_wakes(), (1, 0));
        assert_eq!(queue.len().0, WORKER_BATCH - 1);
        // The batch's last job wakes the worker, which takes the whole batch.
        assert!(!queue.push_in_round(job(WORKER_BATCH)), "woken already");
        assert_eq!(queue.sleepers_and_wakes().1, 1);
        assert_eq!(
            taken_rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            WORKER_BATCH
        );
        // A round's remainder waits for the kick at the round's end.
        wait_for_sleepers(&queue, 1);
        for slot in 0..3 {
            assert!(queue.push_in_round(job(slot)));
        }
        assert_eq!(queue.sleepers_and_wakes().1, 1);
        queue.kick();
        assert_eq!(queue.sleepers_and_wakes().1, 2);
        assert_eq!(taken_rx.recv_timeout(Duration::from_secs(10)).unwrap(), 3);
        // Outside a round every job wakes a sleeping worker at once, as before.
        wait_for_sleepers(&queue, 1);
        queue.push(job(9));
        assert_eq!(queue.sleepers_and_wakes().1, 3);
        assert_eq!(taken_rx.recv_timeout(Duration::from_secs(10)).unwrap(), 1);
        // A kick with nothing queued wakes nobody.
        wait_for_sleepers(&queue, 1);
        queue.kick();
        assert_eq!(queue.sleepers_and_wakes().1, 3);
        queue.stop();
        worker.join().unwrap();
    }

    #[test]
    fn with_no_worker_asleep_a_round_owes_no_kick() {
        let queue = JobQueue::new(4);
        assert!(!queue.push_in_round(job(1)));
        queue.kick();
        assert_eq!(queue.sleepers_and_wakes(), (0, 0));
        assert_eq!(queue.len().0, 1);
    }
}
