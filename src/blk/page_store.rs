// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! [`BlockBackend`] for the compressed page store: the device's pages are the store's slots.

use std::ops::Range;

use super::BlockBackend;
use crate::store::{PageStore, StoreError};
use crate::PAGE_SIZE;

// SAFETY: `PageStore::read` writes the page it is given by decompressing or copying into it
// (or filling it with a same-filled word) and keeps no reference to it. What it reads back
// from the page is only match bytes a decompressor copies forward; every offset, length and
// branch comes from the slot table and the stored object, never from `page`. It touches no
// guest memory.
unsafe impl BlockBackend for PageStore {
    type Error = StoreError;

    fn capacity_pages(&self) -> u64 {
        PageStore::capacity_pages(self)
    }

    fn read_page(&self, index: u64, page: &mut [u8; PAGE_SIZE]) -> Result<(), StoreError> {
        self.read(index, page)
    }

    fn write_page(&self, index: u64, page: &[u8; PAGE_SIZE]) -> Result<(), StoreError> {
        self.write(index, page)
    }

    fn write_page_with<R>(
        &self,
        index: u64,
        fill: impl FnOnce(&mut [u8; PAGE_SIZE]) -> Result<(), R>,
    ) -> Result<Result<(), R>, StoreError> {
        self.write_with(index, fill)
    }

    fn write_pages_with<R>(
        &self,
        first: u64,
        count: usize,
        fill: impl FnMut(usize, &mut [u8; PAGE_SIZE]) -> Result<(), R>,
    ) -> Result<Result<(), R>, (u64, StoreError)> {
        PageStore::write_pages_with(self, first, count, fill)
    }

    fn modify_page<R>(
        &self,
        index: u64,
        f: impl FnOnce(&mut [u8; PAGE_SIZE]) -> R,
    ) -> Result<R, StoreError> {
        self.modify(index, f)
    }

    fn read_ahead(&self, pages: Range<u64>) {
        PageStore::read_ahead(self, pages);
    }

    fn discard_pages(&self, pages: Range<u64>) -> Result<(), StoreError> {
        self.discard(pages)
    }

    fn count_invalid_io(&self) {
        PageStore::count_invalid_io(self)
    }

    fn reads_slowly(&self, pages: Range<u64>) -> bool {
        self.any_written_back(pages)
    }

    fn may_read_slowly(&self) -> bool {
        self.has_backing_file()
    }

    fn begin_round(&self) {
        PageStore::begin_round(self);
    }

    fn end_round(&self) {
        PageStore::end_round(self);
    }

    fn busy_threads(&self) -> usize {
        self.busy_workers()
    }
}
