// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A libblkio frontend for the tests that drive the daemon binary: one queue, a buffer of
//! [`DEPTH`] pages, swap-like pages from the crate's generator.

use std::mem::MaybeUninit;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use vhost_user_zram::pagegen::fill_page;
use vhost_user_zram::PAGE_SIZE;

/// Requests in flight.
pub const DEPTH: usize = 32;

/// A libblkio frontend with one queue and a buffer of [`DEPTH`] pages.
pub struct Frontend {
    queue: Option<Blkioq>,
    blkio: Blkio,
    region: MemoryRegion,
}

impl Frontend {
    /// Connects to the vhost-user socket at `socket` and starts one queue.
    pub fn connect(socket: &Path) -> Frontend {
        let mut blkio = Blkio::new("virtio-blk-vhost-user").unwrap();
        blkio.set_str("path", socket.to_str().unwrap()).unwrap();
        blkio.connect().unwrap();
        blkio.set_i32("num-queues", 1).unwrap();
        let mut started = blkio.start().unwrap();
        let region = blkio.alloc_mem_region(DEPTH * PAGE_SIZE).unwrap();
        blkio.map_mem_region(&region).unwrap();
        Frontend {
            queue: started.queues.pop(),
            blkio,
            region,
        }
    }

    /// Waits for `n` completions; returns how many failed.
    pub fn complete(&mut self, n: usize) -> usize {
        let queue = self.queue.as_mut().unwrap();
        let mut completions: Vec<MaybeUninit<Completion>> =
            (0..n).map(|_| MaybeUninit::uninit()).collect();
        let (mut done, mut failed) = (0, 0);
        while done < n {
            let mut timeout = Duration::from_secs(30);
            let got = queue
                .do_io(&mut completions[done..], 1, Some(&mut timeout), None)
                .unwrap();
            for completion in &completions[done..done + got] {
                // SAFETY: do_io initialised the entries it reported.
                let completion = unsafe { completion.assume_init_read() };
                failed += usize::from(completion.ret != 0);
            }
            done += got;
        }
        failed
    }

    /// Buffer page `slot` (below [`DEPTH`]).
    fn buffer(&mut self, slot: usize) -> &mut [u8; PAGE_SIZE] {
        assert!(slot < DEPTH);
        // SAFETY: slot < DEPTH, so the page lies inside the mapped region; callers use a slot
        // only while no request on it is in flight.
        unsafe {
            &mut *(self.region.addr as *mut u8)
                .add(slot * PAGE_SIZE)
                .cast::<[u8; PAGE_SIZE]>()
        }
    }

    /// Writes swap-like pages `pages` seeded by `seed`, [`DEPTH`] at a time; asserts each
    /// write succeeded.
    pub fn write_pages(&mut self, pages: Range<u64>, seed: u64) {
        assert_eq!(self.try_write_pages(pages, seed), None, "a write failed");
    }

    /// Writes swap-like pages `pages` seeded by `seed`, [`DEPTH`] at a time, until a batch
    /// has a failed write; returns the first page of that batch (`None`: every write
    /// succeeded). Every page before it was written.
    pub fn try_write_pages(&mut self, pages: Range<u64>, seed: u64) -> Option<u64> {
        for batch in pages.collect::<Vec<_>>().chunks(DEPTH) {
            for (slot, &page) in batch.iter().enumerate() {
                fill_page(seed, page, self.buffer(slot));
                let ptr = self.buffer(slot).as_ptr();
                self.queue.as_mut().unwrap().write(
                    page * PAGE_SIZE as u64,
                    ptr,
                    PAGE_SIZE,
                    slot,
                    ReqFlags::empty(),
                );
            }
            if self.complete(batch.len()) > 0 {
                return Some(batch[0]);
            }
        }
        None
    }

    /// Reads pages `pages`, calling `check(page, data)` on each page of a batch that fully
    /// succeeded; returns the failed reads.
    pub fn read_pages(
        &mut self,
        pages: Range<u64>,
        mut check: impl FnMut(u64, &[u8; PAGE_SIZE]),
    ) -> usize {
        let mut failed = 0;
        for batch in pages.collect::<Vec<_>>().chunks(DEPTH) {
            for (slot, &page) in batch.iter().enumerate() {
                self.buffer(slot).fill(0xee);
                let ptr = self.buffer(slot).as_mut_ptr();
                self.queue.as_mut().unwrap().read(
                    page * PAGE_SIZE as u64,
                    ptr,
                    PAGE_SIZE,
                    slot,
                    ReqFlags::empty(),
                );
            }
            let batch_failed = self.complete(batch.len());
            failed += batch_failed;
            if batch_failed == 0 {
                for (slot, &page) in batch.iter().enumerate() {
                    let data = *self.buffer(slot);
                    check(page, &data);
                }
            }
        }
        failed
    }

    /// Reads `pages` and asserts each is what `write_pages(pages, seed)` wrote.
    pub fn assert_holds(&mut self, pages: Range<u64>, seed: u64) {
        let mut expected = [0u8; PAGE_SIZE];
        let failed = self.read_pages(pages, |page, data| {
            fill_page(seed, page, &mut expected);
            assert!(
                data == &expected,
                "page {page} differs from what was written"
            );
        });
        assert_eq!(failed, 0, "reads failed");
    }

    /// Discards pages `pages`; asserts it succeeded.
    pub fn discard(&mut self, pages: Range<u64>) {
        let offset = pages.start * PAGE_SIZE as u64;
        let len = (pages.end - pages.start) * PAGE_SIZE as u64;
        self.queue
            .as_mut()
            .unwrap()
            .discard(offset, len, 0, ReqFlags::empty());
        assert_eq!(self.complete(1), 0, "the discard failed");
    }
}

impl Drop for Frontend {
    fn drop(&mut self) {
        self.queue = None;
        self.blkio.unmap_mem_region(&self.region);
        self.blkio.free_mem_region(&self.region);
    }
}
