// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Memory shared with the device, and every access to it.
//!
//! The device reaches buffers by their (shared virtual) address, outside Rust's view, so the
//! rules are kept here in one place:
//! - A [`DmaBuffer`] has a fixed, aligned address from allocation to drop (it is never moved or
//!   reallocated), so a descriptor may name it.
//! - While an operation that writes a buffer is in flight, nothing reads or writes that buffer
//!   but the device; the owner reads it only after the operation's completion status is
//!   nonzero. If the status never arrives the owner leaks the buffer ([`DmaBuffer::leak`]):
//!   the device may still write it later, so it must never be reused or freed.
//! - The status byte of a completion record is the only byte both sides touch concurrently.
//!   It is read with an acquire load; the software device writes the other 63 bytes first and
//!   the status last with a release store. The hardware writes the record by DMA, with the
//!   status byte written last (the IAA specification's completion-record rule), and x86's
//!   ordering makes the acquire load sufficient.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::aecs::CompressAecs;
use crate::hw::{CompletionRecord, COMPLETION_ALIGN};

/// A zeroed, aligned allocation the device may read or write.
#[derive(Debug)]
pub struct DmaBuffer {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the buffer is plain memory owned by this value; the accessors below state what each
// thread may do with it.
unsafe impl Send for DmaBuffer {}
// SAFETY: as above: shared access only reads the address or the status byte atomically.
unsafe impl Sync for DmaBuffer {}

impl DmaBuffer {
    /// Allocates `len` zeroed bytes aligned to `align` (a power of two).
    ///
    /// # Panics
    /// If `len` is 0 or `align` is not a power of two (programming errors), or on allocation
    /// failure (as `Box` does).
    pub fn new(len: usize, align: usize) -> DmaBuffer {
        assert!(len > 0, "a DMA buffer must not be empty");
        let layout = Layout::from_size_align(len, align).expect("a valid DMA buffer layout");
        // SAFETY: `layout` has a non-zero size (checked above).
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        // Touch every page now, so the device does not meet a page the kernel has not backed
        // yet (a page fault it would report, on a WQ without block-on-fault).
        for offset in (0..len).step_by(4096) {
            // SAFETY: `offset < len`, inside the allocation, which nothing else uses yet.
            unsafe { ptr.as_ptr().add(offset).write_volatile(0) };
        }
        DmaBuffer { ptr, layout }
    }

    /// The address a descriptor names.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// The buffer's size.
    pub fn len(&self) -> usize {
        self.layout.size()
    }

    /// Always false: buffers are never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The first `len` bytes.
    ///
    /// # Safety
    /// No operation that writes this buffer may be in flight: its completion status was read
    /// nonzero, or it was never submitted.
    pub unsafe fn bytes(&self, len: usize) -> &[u8] {
        assert!(len <= self.len());
        // SAFETY: the pointer is valid for `self.len()` initialised (zeroed at allocation)
        // bytes; the caller guarantees no concurrent writer.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), len) }
    }

    /// The whole buffer, writable.
    ///
    /// # Safety
    /// As [`DmaBuffer::bytes`]: no operation that reads or writes this buffer is in flight.
    pub unsafe fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: valid for `self.len()` bytes, uniquely borrowed through `&mut self`, and the
        // caller guarantees the device does not access it now.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len()) }
    }

    /// Gives the memory up for good: the device may still write it.
    pub fn leak(self) {
        std::mem::forget(self);
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout and not freed before; owners leak
        // instead of dropping a buffer an operation may still write.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// `count` completion records, each 64-byte aligned, at fixed addresses.
#[derive(Debug)]
pub struct CompletionRecords {
    buffer: DmaBuffer,
}

const RECORD: usize = std::mem::size_of::<CompletionRecord>();

impl CompletionRecords {
    /// `count` zeroed records.
    pub fn new(count: usize) -> CompletionRecords {
        CompletionRecords {
            buffer: DmaBuffer::new(count * RECORD, COMPLETION_ALIGN),
        }
    }

    /// The number of records.
    pub fn count(&self) -> usize {
        self.buffer.len() / RECORD
    }

    /// The address of record `index`.
    pub fn addr(&self, index: usize) -> u64 {
        assert!(index < self.count());
        self.buffer.addr() + (index * RECORD) as u64
    }

    fn status_byte(&self, index: usize) -> &AtomicU8 {
        assert!(index < self.count());
        // SAFETY: the byte lies inside the live allocation; `AtomicU8` has the size and
        // alignment of `u8`; every access to a status byte, here and in
        // `write_completion`, is atomic (the device's DMA write aside, see the module docs).
        unsafe { AtomicU8::from_ptr(self.buffer.ptr.as_ptr().add(index * RECORD)) }
    }

    /// Record `index`'s status byte: 0 while the operation runs. An acquire load, so the rest
    /// of the record may be read once it is nonzero.
    pub fn status(&self, index: usize) -> u8 {
        self.status_byte(index).load(Ordering::Acquire)
    }

    /// A copy of record `index`.
    ///
    /// # Safety
    /// The record's status was read nonzero (so the writer is done), or no operation naming
    /// it is in flight.
    pub unsafe fn read(&self, index: usize) -> CompletionRecord {
        assert!(index < self.count());
        // SAFETY: aligned (64-byte records in a 64-byte aligned buffer), initialised, and not
        // written concurrently (the caller's guarantee); volatile because a device wrote it.
        unsafe {
            std::ptr::read_volatile(
                self.buffer
                    .ptr
                    .as_ptr()
                    .add(index * RECORD)
                    .cast::<CompletionRecord>(),
            )
        }
    }

    /// Zeroes record `index` before it is named by a new descriptor.
    ///
    /// # Safety
    /// No operation naming this record is in flight.
    pub unsafe fn reset(&mut self, index: usize) {
        assert!(index < self.count());
        // SAFETY: in bounds, exclusively borrowed, and no device writes it (the caller's
        // guarantee).
        unsafe {
            std::ptr::write_bytes(self.buffer.ptr.as_ptr().add(index * RECORD), 0, RECORD);
        }
    }

    /// Gives the records up for good: a device may still write them.
    pub fn leak(self) {
        self.buffer.leak();
    }
}

/// The device side: writes `record` to the completion record at `addr`, status last with
/// release ordering.
///
/// # Safety
/// `addr` is the address of a live, 64-byte aligned completion record that a descriptor
/// submitted by its owner named, and the operation has not completed yet (so nothing else
/// writes it, and its owner reads only the status byte until it is nonzero).
pub(crate) unsafe fn write_completion(addr: u64, record: &CompletionRecord) {
    let dst = addr as *mut u8;
    let src = (record as *const CompletionRecord).cast::<u8>();
    // SAFETY: the caller guarantees `dst` is a live 64-byte record no one else writes; bytes
    // 1..64 are not read by the owner until the status is nonzero.
    unsafe { std::ptr::copy_nonoverlapping(src.add(1), dst.add(1), RECORD - 1) };
    // SAFETY: byte 0 of the live record; the owner reads it atomically.
    unsafe { AtomicU8::from_ptr(dst) }.store(record.status, Ordering::Release);
}

/// The device side: the `len` bytes at `addr`, read.
///
/// # Safety
/// `addr..addr + len` is memory a submitted descriptor names as a source, which its owner keeps
/// alive and does not write until the operation completes.
pub(crate) unsafe fn device_source<'a>(addr: u64, len: usize) -> &'a [u8] {
    if len == 0 {
        return &[];
    }
    // SAFETY: the caller's guarantee.
    unsafe { std::slice::from_raw_parts(addr as *const u8, len) }
}

/// The device side: the `len` bytes at `addr`, written.
///
/// # Safety
/// `addr..addr + len` is memory a submitted descriptor names as its destination, which its
/// owner keeps alive and does not access until the operation completes.
pub(crate) unsafe fn device_destination<'a>(addr: u64, len: usize) -> &'a mut [u8] {
    if len == 0 {
        return &mut [];
    }
    // SAFETY: the caller's guarantee.
    unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) }
}

/// The device side: the compress AECS at `addr`.
///
/// # Safety
/// `addr` is a [`crate::hw::AECS_ALIGN`]-aligned address of a live [`CompressAecs`] that a
/// submitted descriptor names, which its owner does not write until the operation completes.
pub(crate) unsafe fn device_aecs<'a>(addr: u64) -> &'a CompressAecs {
    // SAFETY: the caller's guarantee; every bit pattern is a valid `CompressAecs` (integers).
    unsafe { &*(addr as *const CompressAecs) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_64_byte_aligned_and_start_pending() {
        let records = CompletionRecords::new(8);
        for i in 0..8 {
            assert_eq!(records.addr(i) % 64, 0);
            assert_eq!(records.status(i), 0);
        }
        assert_eq!(records.addr(1) - records.addr(0), 64);
    }

    #[test]
    fn a_completion_written_on_another_thread_is_seen_whole() {
        let records = CompletionRecords::new(1);
        let addr = records.addr(0);
        let writer = std::thread::spawn(move || {
            let record = CompletionRecord {
                status: 1,
                output_size: 1234,
                crc: 0xabcd_ef01,
                ..CompletionRecord::default()
            };
            // SAFETY: the record is live until the reader below has seen the status, and no
            // one else writes it.
            unsafe { write_completion(addr, &record) };
        });
        while records.status(0) == 0 {
            std::hint::spin_loop();
        }
        // SAFETY: the status is nonzero, so the writer is done.
        let record = unsafe { records.read(0) };
        writer.join().unwrap();
        assert_eq!(record.output_size, 1234);
        assert_eq!(record.crc, 0xabcd_ef01);
    }
}
