// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The virtio-blk device: request parsing and execution, the vhost-user backend and the
//! device's configuration space.
//!
//! - [`config`]: the features the device offers and the virtio-blk configuration space.
//! - [`request`]: turns one descriptor chain into one executed request and a status byte. This is
//!   where untrusted guest input is checked; every failure maps to a `VIRTIO_BLK_S_*` status in one
//!   place, [`request::RequestError::status`].
//! - [`backend`]: the [`vhost_user_backend::VhostUserBackend`] implementation, one thread per
//!   queue over one shared store; the thread that owns a queue is the only one that writes its
//!   used ring.
//! - [`inflight`]: the vhost-user inflight region, which records the requests taken from each
//!   ring and not completed, so that a daemon started after a crash resubmits them.
//! - `read_back`: the threads that run reads of written-back pages off the queue threads and
//!   hand them back to their queue's thread through a completion mailbox.
//! - [`ratelimit`] and [`request_stats`]: rate-limited warnings about guest input, and the
//!   per-queue request counters.
//!
//! The device speaks 512-byte sectors; the store speaks 4 KiB pages. [`BlockBackend`] is the
//! narrow page interface the request code needs; the page store implements it, and tests use
//! small doubles.

pub mod backend;
pub mod config;
pub mod inflight;
mod page_store;
pub mod ratelimit;
mod read_back;
pub mod request;
pub mod request_stats;

use std::ops::Range;

use crate::PAGE_SIZE;

pub use self::backend::{BlkBackend, Continuity, QueueHooks};
pub use self::config::DeviceConfig;

/// The page interface the virtio-blk request code runs against.
///
/// Pages are addressed by index (`sector / 8`). Implementations are shared by all queue threads.
/// An implementation counts its own failed reads and writes (zram's `failed_reads` and
/// `failed_writes`); the request code counts only what it refuses itself (`invalid_io`).
///
/// # Safety
///
/// The request path hands [`read_page`](Self::read_page) a page that may be guest memory
/// (a zero-copy read), which the guest can write at any moment. An implementation must:
///
/// - write only into the `page` it is given, and keep no reference or pointer to it after it
///   returns;
/// - never let what it reads back from `page` decide a bound, an index or which code runs
///   (decompress into it, copy into it, fill it; never parse it);
/// - reach no other guest memory.
///
/// Under those rules a guest that scribbles over its own buffer meanwhile can only change the
/// bytes it will read, never make the daemon touch anything else (DESIGN.md, "Zero-copy
/// reads").
pub unsafe trait BlockBackend: Send + Sync {
    /// The error a page operation reports.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The number of pages the device holds.
    fn capacity_pages(&self) -> u64;

    /// Reads page `index` into `page`; a page never written reads as zeros.
    fn read_page(&self, index: u64, page: &mut [u8; PAGE_SIZE]) -> Result<(), Self::Error>;

    /// Replaces page `index` with `page`.
    fn write_page(&self, index: u64, page: &[u8; PAGE_SIZE]) -> Result<(), Self::Error>;

    /// Replaces page `index` with what `fill` writes into a page buffer the backend provides
    /// (so the data is copied once). When `fill` fails nothing is stored and its error comes
    /// back inside `Ok`.
    fn write_page_with<R>(
        &self,
        index: u64,
        fill: impl FnOnce(&mut [u8; PAGE_SIZE]) -> Result<(), R>,
    ) -> Result<Result<(), R>, Self::Error> {
        let mut page = [0u8; PAGE_SIZE];
        if let Err(error) = fill(&mut page) {
            return Ok(Err(error));
        }
        self.write_page(index, &page).map(Ok)
    }

    /// Replaces pages `first..first + count` with what `fill` writes: `fill(i, page)` fills the
    /// i-th page, called in order, once per page, until it fails. A backend may store the pages
    /// together (a multi-page unit). When `fill` fails at page i, pages before i hold their old or
    /// their new content, page i and after are unchanged, and the error comes back inside `Ok`;
    /// a store error names the page it failed on.
    ///
    /// By default the pages are written one by one through
    /// [`write_page_with`](Self::write_page_with), so pages before a failure hold their new
    /// content.
    fn write_pages_with<R>(
        &self,
        first: u64,
        count: usize,
        mut fill: impl FnMut(usize, &mut [u8; PAGE_SIZE]) -> Result<(), R>,
    ) -> Result<Result<(), R>, (u64, Self::Error)> {
        for (i, index) in (first..).take(count).enumerate() {
            match self.write_page_with(index, |page| fill(i, page)) {
                Ok(Ok(())) => {}
                Ok(Err(error)) => return Ok(Err(error)),
                Err(error) => return Err((index, error)),
            }
        }
        Ok(Ok(()))
    }

    /// Reads page `index`, lets `f` change it and stores the result, atomically with respect to
    /// other operations on the same page. Used for writes that cover part of a page.
    fn modify_page<R>(
        &self,
        index: u64,
        f: impl FnOnce(&mut [u8; PAGE_SIZE]) -> R,
    ) -> Result<R, Self::Error>;

    /// A read request of `pages` starts on the calling thread: its pages are read next, in
    /// order (`read_page`), so a backend that decodes several pages at once may decode as far
    /// as they go. A hint only; nothing by default.
    fn read_ahead(&self, pages: Range<u64>) {
        let _ = pages;
    }

    /// Frees the pages in `pages`; they then read as zeros.
    fn discard_pages(&self, pages: Range<u64>) -> Result<(), Self::Error>;

    /// Counts a malformed or out-of-range request (zram's `invalid_io`).
    fn count_invalid_io(&self);

    /// Whether reading some page of `pages` waits on slow storage (a page written back to a
    /// backing file): such reads are served off the queue thread. No page does by default.
    fn reads_slowly(&self, pages: Range<u64>) -> bool {
        let _ = pages;
        false
    }

    /// Whether any page may ever read slowly (the store has a backing file): only then does
    /// the request path look for slow reads, and the backend start its read-back threads.
    fn may_read_slowly(&self) -> bool {
        false
    }

    /// The calling thread starts a round of requests: it drains its ring before it signals
    /// the guest, and work the round hands to other threads may wait for the round's end
    /// ([`end_round`](Self::end_round)) to be announced. Nothing by default.
    fn begin_round(&self) {}

    /// The calling thread's round ends: work it handed to other threads must start now.
    /// Nothing by default.
    fn end_round(&self) {}

    /// Threads of the backend's own (not queue threads) busy on the CPU now, e.g. compressing
    /// what writes queued: the queue threads count them when they judge whether a CPU is
    /// spare. None by default.
    fn busy_threads(&self) -> usize {
        0
    }
}

#[cfg(test)]
mod tests;
