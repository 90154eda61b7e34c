// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Request parsing and execution tests over virtio-queue's mock split queue.
//!
//! Each test builds descriptor chains in mock guest memory, lets a [`Worker`] serve the queue
//! and checks the status byte, the used length, the data and zram's counters. Every bad-input
//! test ends with a good request to show the queue still works.

// Test lengths and offsets are small constants.
#![allow(clippy::cast_possible_truncation)]

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::request::{Next, OnQueueThread, Request, RequestError, RequestRunner};
use super::{BlockBackend, DeviceConfig};
use crate::PAGE_SIZE;

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

const HEADER: u64 = 0x1_0000;
const STATUS: u64 = 0x2_0000;
const DATA: u64 = 0x10_0000;
const MEM_SIZE: usize = 0x40_0000;
const QUEUE_SIZE: u16 = 256;

/// An error the test store reports.
#[derive(Debug, thiserror::Error)]
#[error("injected store failure")]
struct InjectedFailure;

/// A call the request path made to the store's write operations.
#[derive(Debug, Clone, PartialEq, Eq)]
enum StoreCall {
    /// `modify_page(index)`: part of a page.
    Modify(u64),
    /// `write_pages_with(first, count)`: a run of whole pages.
    Pages { first: u64, count: usize },
}

/// A plain in-memory page store with zram's counters and failure injection. It stores a run
/// of whole pages as a multi-page unit would: it fills every page first and stores nothing
/// when a fill fails.
#[derive(Default)]
struct TestStore {
    capacity: u64,
    pages: Mutex<HashMap<u64, Box<[u8; PAGE_SIZE]>>>,
    discarded: Mutex<Vec<Range<u64>>>,
    /// The write calls, in order.
    calls: Mutex<Vec<StoreCall>>,
    /// Where each `read_page` was asked to put its page: guest memory (zero-copy) or the
    /// worker's page buffer.
    read_targets: Mutex<Vec<usize>>,
    fail_reads: bool,
    fail_writes: bool,
    /// Writing this page fails, alone or in a run.
    fail_write_at: Option<u64>,
    /// Pages below this index read slowly (as if written back to a file).
    slow_below: u64,
    failed_reads: AtomicU64,
    failed_writes: AtomicU64,
    invalid_io: AtomicU64,
}

impl TestStore {
    fn new(capacity: u64) -> Self {
        TestStore {
            capacity,
            ..Default::default()
        }
    }

    fn counters(&self) -> (u64, u64, u64) {
        (
            self.failed_reads.load(Ordering::Relaxed),
            self.failed_writes.load(Ordering::Relaxed),
            self.invalid_io.load(Ordering::Relaxed),
        )
    }

    fn stored(&self, index: u64) -> bool {
        self.pages.lock().unwrap().contains_key(&index)
    }

    /// The write calls since the last call.
    fn take_calls(&self) -> Vec<StoreCall> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
}

// SAFETY: `read_page` copies a stored page into the page it is given, zeros it, or scribbles
// a fixed pattern on it; it keeps only the page's address as a number (to tell zero-copy reads
// from buffered ones), never reads the page back and touches no guest memory.
unsafe impl BlockBackend for TestStore {
    type Error = InjectedFailure;

    fn capacity_pages(&self) -> u64 {
        self.capacity
    }

    fn read_page(&self, index: u64, page: &mut [u8; PAGE_SIZE]) -> Result<(), InjectedFailure> {
        assert!(
            index < self.capacity,
            "read past capacity reached the store"
        );
        self.read_targets
            .lock()
            .unwrap()
            .push(page.as_ptr() as usize);
        if self.fail_reads {
            // Scribble first, as a decompressor that fails half-way would.
            page[..100].fill(0x5a);
            self.failed_reads.fetch_add(1, Ordering::Relaxed);
            return Err(InjectedFailure);
        }
        match self.pages.lock().unwrap().get(&index) {
            Some(stored) => page.copy_from_slice(&stored[..]),
            None => page.fill(0),
        }
        Ok(())
    }

    fn write_page(&self, index: u64, page: &[u8; PAGE_SIZE]) -> Result<(), InjectedFailure> {
        assert!(
            index < self.capacity,
            "write past capacity reached the store"
        );
        if self.fail_writes || self.fail_write_at == Some(index) {
            // Like the page store, the test store counts its own failures.
            self.failed_writes.fetch_add(1, Ordering::Relaxed);
            return Err(InjectedFailure);
        }
        self.pages.lock().unwrap().insert(index, Box::new(*page));
        Ok(())
    }

    fn write_pages_with<R>(
        &self,
        first: u64,
        count: usize,
        mut fill: impl FnMut(usize, &mut [u8; PAGE_SIZE]) -> Result<(), R>,
    ) -> Result<Result<(), R>, (u64, InjectedFailure)> {
        assert!(
            first + count as u64 <= self.capacity,
            "write past capacity reached the store"
        );
        self.calls
            .lock()
            .unwrap()
            .push(StoreCall::Pages { first, count });
        let mut unit = vec![[0u8; PAGE_SIZE]; count];
        for (i, page) in unit.iter_mut().enumerate() {
            if let Err(error) = fill(i, page) {
                return Ok(Err(error));
            }
        }
        for (index, page) in (first..).zip(&unit) {
            self.write_page(index, page)
                .map_err(|error| (index, error))?;
        }
        Ok(Ok(()))
    }

    fn modify_page<R>(
        &self,
        index: u64,
        f: impl FnOnce(&mut [u8; PAGE_SIZE]) -> R,
    ) -> Result<R, InjectedFailure> {
        assert!(
            index < self.capacity,
            "modify past capacity reached the store"
        );
        self.calls.lock().unwrap().push(StoreCall::Modify(index));
        if self.fail_writes || self.fail_write_at == Some(index) {
            // Like the page store, the test store counts its own failures.
            self.failed_writes.fetch_add(1, Ordering::Relaxed);
            return Err(InjectedFailure);
        }
        let mut pages = self.pages.lock().unwrap();
        let page = pages
            .entry(index)
            .or_insert_with(|| Box::new([0; PAGE_SIZE]));
        Ok(f(page))
    }

    fn discard_pages(&self, pages: Range<u64>) -> Result<(), InjectedFailure> {
        assert!(
            pages.end <= self.capacity,
            "discard past capacity reached the store"
        );
        let mut stored = self.pages.lock().unwrap();
        for index in pages.clone() {
            stored.remove(&index);
        }
        self.discarded.lock().unwrap().push(pages);
        Ok(())
    }

    fn reads_slowly(&self, pages: Range<u64>) -> bool {
        pages.start < self.slow_below
    }

    fn may_read_slowly(&self) -> bool {
        self.slow_below > 0
    }

    fn count_invalid_io(&self) {
        self.invalid_io.fetch_add(1, Ordering::Relaxed);
    }
}

/// One descriptor of a chain under construction.
#[derive(Clone, Copy)]
struct D {
    addr: u64,
    len: u32,
    writable: bool,
}

fn readable(addr: u64, len: u32) -> D {
    D {
        addr,
        len,
        writable: false,
    }
}

fn writable(addr: u64, len: u32) -> D {
    D {
        addr,
        len,
        writable: true,
    }
}

fn header() -> D {
    readable(HEADER, 16)
}

fn status_desc() -> D {
    writable(STATUS, 1)
}

fn guest_memory() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// A queue, a request runner and a store, plus helpers to submit chains.
struct Harness<'m, S = TestStore> {
    mem: &'m GuestMemoryMmap<()>,
    vq: MockSplitQueue<'m, GuestMemoryMmap<()>>,
    queue: Queue,
    next_desc: u16,
    submitted: u16,
    store: S,
    device: DeviceConfig,
    runner: RequestRunner,
}

impl<'m> Harness<'m, TestStore> {
    fn new(mem: &'m GuestMemoryMmap<()>, device: DeviceConfig) -> Self {
        let store = TestStore::new(device.capacity_pages);
        Harness::with_store(mem, device, store)
    }

    fn with_pages(mem: &'m GuestMemoryMmap<()>, pages: u64) -> Self {
        Self::new(mem, DeviceConfig::new(pages))
    }
}

impl<'m, S: BlockBackend> Harness<'m, S> {
    fn with_store(mem: &'m GuestMemoryMmap<()>, device: DeviceConfig, store: S) -> Self {
        let vq = MockSplitQueue::new(mem, QUEUE_SIZE);
        let queue = vq.create_queue().unwrap();
        Harness {
            mem,
            vq,
            queue,
            next_desc: 0,
            submitted: 0,
            store,
            runner: RequestRunner::standalone(&device),
            device,
        }
    }

    fn write_header(&self, request_type: u32, sector: u64) {
        let mut raw = [0u8; 16];
        raw[0..4].copy_from_slice(&request_type.to_le_bytes());
        raw[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&raw, GuestAddress(HEADER)).unwrap();
    }

    /// Puts `descs` in the descriptor table as one chain and makes it available.
    fn add_chain(&mut self, descs: &[D]) -> u16 {
        let head = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            let index = self.next_desc;
            self.next_desc = (self.next_desc + 1) % QUEUE_SIZE;
            let mut flags = if d.writable { VRING_DESC_F_WRITE } else { 0 } as u16;
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let raw =
                RawDescriptor::from(SplitDescriptor::new(d.addr, d.len, flags, self.next_desc));
            self.vq.desc_table().store(index, raw).unwrap();
        }
        self.publish(head);
        head
    }

    fn publish(&mut self, head: u16) {
        let avail = self.vq.avail();
        avail
            .ring()
            .ref_at(usize::from(self.submitted % QUEUE_SIZE))
            .unwrap()
            .store(head.to_le());
        self.submitted = self.submitted.wrapping_add(1);
        avail.idx().store(self.submitted.to_le());
    }

    /// Submits one chain, serves the queue and returns (used length, status byte).
    fn run(&mut self, descs: &[D]) -> (u32, u8) {
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let head = self.add_chain(descs);
        let completed = self
            .runner
            .process_queue(&mut self.queue, self.mem, &self.store, &self.device)
            .unwrap();
        assert_eq!(completed, 1);
        let used_index = self.queue.next_used().wrapping_sub(1);
        let elem = self
            .vq
            .used()
            .ring()
            .ref_at(usize::from(used_index % QUEUE_SIZE))
            .unwrap()
            .load();
        assert_eq!(elem.id(), u32::from(head));
        (elem.len(), self.mem.read_obj(GuestAddress(STATUS)).unwrap())
    }

    fn request(&mut self, request_type: u32, sector: u64, descs: &[D]) -> (u32, u8) {
        self.write_header(request_type, sector);
        self.run(descs)
    }

    fn write(&mut self, sector: u64, data: &[u8]) -> (u32, u8) {
        self.mem.write_slice(data, GuestAddress(DATA)).unwrap();
        let len = data.len() as u32;
        self.request(
            VIRTIO_BLK_T_OUT,
            sector,
            &[header(), readable(DATA, len), status_desc()],
        )
    }

    fn read(&mut self, sector: u64, len: usize) -> Vec<u8> {
        self.mem
            .write_slice(&vec![0xee; len], GuestAddress(DATA))
            .unwrap();
        let (used, status) = self.request(
            VIRTIO_BLK_T_IN,
            sector,
            &[header(), writable(DATA, len as u32), status_desc()],
        );
        assert_eq!(
            (used, status),
            (len as u32 + 1, OK),
            "read of {len} at {sector}"
        );
        let mut out = vec![0; len];
        self.mem.read_slice(&mut out, GuestAddress(DATA)).unwrap();
        out
    }

    fn range_request(&mut self, request_type: u32, segments: &[(u64, u32, u32)]) -> (u32, u8) {
        let mut raw = Vec::new();
        for (sector, sectors, flags) in segments {
            raw.extend_from_slice(&sector.to_le_bytes());
            raw.extend_from_slice(&sectors.to_le_bytes());
            raw.extend_from_slice(&flags.to_le_bytes());
        }
        self.mem.write_slice(&raw, GuestAddress(DATA)).unwrap();
        let mut descs = vec![header()];
        if !raw.is_empty() {
            descs.push(readable(DATA, raw.len() as u32));
        }
        descs.push(status_desc());
        self.request(request_type, 0, &descs)
    }

    /// A good request after a bad one still works.
    fn assert_still_works(&mut self) {
        let page = pattern(PAGE_SIZE, 99);
        assert_eq!(self.write(8, &page), (1, OK));
        assert_eq!(self.read(8, PAGE_SIZE), page);
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn write_then_read_round_trips_pages() {
    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 16);
    let data = pattern(3 * PAGE_SIZE, 1);
    assert_eq!(h.write(16, &data), (1, OK));
    assert_eq!(h.read(16, 3 * PAGE_SIZE), data);
    assert_eq!(
        h.read(0, PAGE_SIZE),
        vec![0; PAGE_SIZE],
        "unwritten pages read zeros"
    );
    assert_eq!(h.store.counters(), (0, 0, 0));
}

#[test]
fn unaligned_sub_page_write_keeps_the_rest_of_the_page() {
    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 4);
    let page = pattern(2 * PAGE_SIZE, 2);
    h.write(0, &page);
    // Three sectors from sector 7: the last sector of page 0 and the first two of page 1.
    let patch = vec![0xab; 3 * 512];
    assert_eq!(h.write(7, &patch), (1, OK));
    let mut expected = page.clone();
    expected[7 * 512..10 * 512].copy_from_slice(&patch);
    assert_eq!(h.read(0, 2 * PAGE_SIZE), expected);
    // A single-sector read from the middle of a page.
    assert_eq!(h.read(9, 512), expected[9 * 512..10 * 512].to_vec());
}

#[test]
fn page_straddling_descriptors_is_copied_in_pieces() {
    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 4);
    let data = pattern(2 * PAGE_SIZE, 3);
    mem.write_slice(&data[..1000], GuestAddress(DATA)).unwrap();
    mem.write_slice(&data[1000..5000], GuestAddress(DATA + 0x10000))
        .unwrap();
    mem.write_slice(&data[5000..], GuestAddress(DATA + 0x20000))
        .unwrap();
    h.write_header(VIRTIO_BLK_T_OUT, 0);
    let descs = [
        readable(HEADER, 8),
        readable(HEADER + 8, 8),
        readable(DATA, 1000),
        readable(DATA + 0x10000, 4000),
        readable(DATA + 0x20000, (2 * PAGE_SIZE - 5000) as u32),
        status_desc(),
    ];
    assert_eq!(h.run(&descs), (1, OK), "header split in two, data in three");
    assert_eq!(h.read(0, 2 * PAGE_SIZE), data);

    // Read back into two descriptors, the status byte at the end of the second one.
    h.write_header(VIRTIO_BLK_T_IN, 0);
    let status_in_data = DATA + 0x30000 + 3 * 512;
    let descs = [
        header(),
        writable(DATA + 0x30000, 3 * 512 + 1 - 1),
        writable(status_in_data, (PAGE_SIZE - 3 * 512) as u32 + 1),
    ];
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let head = h.add_chain(&descs);
    h.runner
        .process_queue(&mut h.queue, &mem, &h.store, &h.device)
        .unwrap();
    let elem =
        h.vq.used()
            .ring()
            .ref_at(usize::from(h.queue.next_used() - 1))
            .unwrap()
            .load();
    assert_eq!(
        (elem.id(), elem.len()),
        (u32::from(head), PAGE_SIZE as u32 + 1)
    );
    let mut back = vec![0; PAGE_SIZE];
    mem.read_slice(&mut back[..3 * 512], GuestAddress(DATA + 0x30000))
        .unwrap();
    mem.read_slice(&mut back[3 * 512..], GuestAddress(status_in_data))
        .unwrap();
    assert_eq!(back, data[..PAGE_SIZE]);
    let status: u8 = mem
        .read_obj(GuestAddress(status_in_data + (PAGE_SIZE - 3 * 512) as u64))
        .unwrap();
    assert_eq!(status, OK);
}

#[test]
fn indirect_descriptor_table_is_followed() {
    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 4);
    let data = pattern(PAGE_SIZE, 4);
    mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    h.write_header(VIRTIO_BLK_T_OUT, 0);
    let table = 0x3_0000u64;
    let entries = [
        SplitDescriptor::new(HEADER, 16, VRING_DESC_F_NEXT as u16, 1),
        SplitDescriptor::new(DATA, PAGE_SIZE as u32, VRING_DESC_F_NEXT as u16, 2),
        SplitDescriptor::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0),
    ];
    for (i, entry) in entries.iter().enumerate() {
        mem.write_obj(
            RawDescriptor::from(*entry),
            GuestAddress(table + 16 * i as u64),
        )
        .unwrap();
    }
    let head = h.next_desc;
    h.next_desc += 1;
    let indirect = SplitDescriptor::new(table, 48, VRING_DESC_F_INDIRECT as u16, 0);
    h.vq.desc_table()
        .store(head, RawDescriptor::from(indirect))
        .unwrap();
    h.publish(head);
    h.runner
        .process_queue(&mut h.queue, &mem, &h.store, &h.device)
        .unwrap();
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), OK);
    assert_eq!(h.read(0, PAGE_SIZE), data);
}

#[test]
fn flush_succeeds_without_data() {
    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 4);
    assert_eq!(
        h.request(VIRTIO_BLK_T_FLUSH, 0, &[header(), status_desc()]),
        (1, OK)
    );
}

#[test]
fn get_id_returns_the_serial() {
    let mem = guest_memory();
    let mut device = DeviceConfig::new(4);
    device.serial = DeviceConfig::serial_from_str("zram-serial").unwrap();
    let mut h = Harness::new(&mem, device);
    mem.write_slice(&[0xee; 20], GuestAddress(DATA)).unwrap();
    let (used, status) = h.request(
        VIRTIO_BLK_T_GET_ID,
        0,
        &[header(), writable(DATA, 20), status_desc()],
    );
    assert_eq!((used, status), (21, OK));
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..12], b"zram-serial\0");
    assert_eq!(id[12..], [0; 8]);
    // A shorter buffer gets a truncated serial.
    let (used, status) = h.request(
        VIRTIO_BLK_T_GET_ID,
        0,
        &[header(), writable(DATA, 4), status_desc()],
    );
    assert_eq!((used, status), (5, OK));
}

#[test]
fn discard_frees_whole_pages_and_they_read_zeros() {
    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 8);
    let data = pattern(4 * PAGE_SIZE, 5);
    h.write(0, &data);
    // Sectors 4..28: page 0 and 3 partially, pages 1 and 2 wholly.
    assert_eq!(
        h.range_request(VIRTIO_BLK_T_DISCARD, &[(4, 24, 0)]),
        (1, OK)
    );
    assert_eq!(*h.store.discarded.lock().unwrap(), vec![1..3]);
    assert!(
        h.store.stored(0) && h.store.stored(3),
        "partial pages stay, as in zram"
    );
    assert_eq!(h.read(8, 2 * PAGE_SIZE), vec![0; 2 * PAGE_SIZE]);
}

#[test]
fn write_zeroes_reads_back_zeros_with_and_without_unmap() {
    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 8);
    let data = pattern(8 * PAGE_SIZE, 6);
    h.write(0, &data);
    // Without UNMAP: sectors 4..20 (half of page 0, page 1, half of page 2) become zero pages.
    assert_eq!(
        h.range_request(VIRTIO_BLK_T_WRITE_ZEROES, &[(4, 16, 0)]),
        (1, OK)
    );
    assert!(h.store.discarded.lock().unwrap().is_empty());
    assert!(
        h.store.stored(1),
        "without UNMAP the page is stored as zeros"
    );
    // With UNMAP: pages 4 and 5 are freed.
    let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    assert_eq!(
        h.range_request(VIRTIO_BLK_T_WRITE_ZEROES, &[(32, 16, unmap)]),
        (1, OK)
    );
    assert_eq!(*h.store.discarded.lock().unwrap(), vec![4..6]);
    let mut expected = data.clone();
    expected[4 * 512..20 * 512].fill(0);
    expected[32 * 512..48 * 512].fill(0);
    assert_eq!(h.read(0, 8 * PAGE_SIZE), expected);
}

#[test]
fn discard_with_several_segments_frees_each() {
    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 8);
    assert_eq!(
        h.range_request(VIRTIO_BLK_T_DISCARD, &[(0, 8, 0), (40, 16, 0)]),
        (1, OK)
    );
    assert_eq!(*h.store.discarded.lock().unwrap(), vec![0..1, 5..7]);
}

// Bad input from the guest.

#[test]
fn data_out_descriptor_that_is_device_writable_returns_ioerr() {
    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 4);
    let (used, status) = h.request(
        VIRTIO_BLK_T_OUT,
        0,
        &[header(), writable(DATA, 4096), status_desc()],
    );
    assert_eq!((used, status), (1, IOERR));
    assert!(!h.store.stored(0));
    assert_eq!(h.store.counters(), (0, 0, 1));
    h.assert_still_works();
}

#[test]
fn read_with_device_readable_data_returns_ioerr() {
    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 4);
    let (used, status) = h.request(
        VIRTIO_BLK_T_IN,
        0,
        &[header(), readable(DATA, 4096), status_desc()],
    );
    assert_eq!((used, status), (1, IOERR));
    h.assert_still_works();
}

#[test]
fn status_descriptor_that_is_not_writable_is_dropped() {
    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 4);
    let (used, status) = h.request(
        VIRTIO_BLK_T_IN,
        0,
        &[header(), writable(DATA, 4096), readable(STATUS, 1)],
    );
    assert_eq!((used, status), (0, 0xff), "nothing written, used length 0");
    assert_eq!(h.store.counters(), (0, 0, 1));
    h.assert_still_works();
}

#[test]
fn zero_length_status_descriptor_is_dropped() {
    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 4);
    let (used, status) = h.request(
        VIRTIO_BLK_T_IN,
        0,
        &[header(), writable(DATA, 4096), writable(STATUS, 0)],
    );
    assert_eq!((used, status), (0, 0xff));
    h.assert_still_works();
}

#[test]
fn chain_without_status_descriptor_is_dropped() {
    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 4);
    assert_eq!(h.request(VIRTIO_BLK_T_FLUSH, 0, &[header()]), (0, 0xff));
    assert_eq!(h.store.counters(), (0, 0, 1));
    h.assert_still_works();
}

#[test]
fn zero_length_data_descriptor_returns_ioerr() {
    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 4);
    let descs = [
        header(),
        readable(DATA, 0),
        readable(DATA, 4096),
        status_desc(),
    ];
    assert_eq!(h.request(VIRTIO_BLK_T_OUT, 0, &descs), (1, IOERR));
    assert!(!h.store.stored(0));
    h.assert_still_works();
}

#[test]
fn descriptor_outside_guest_memory_returns_ioerr() {
    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 4);
    let outside = MEM_SIZE as u64 - 100;
    let (used, status) = h.request(
        VIRTIO_BLK_T_IN,
        0,
        &[header(), writable(outside, 4096), status_desc()],
    );
    assert_eq!((used, status), (1, IOERR));
    let huge = readable(u64::MAX - 10, 4096);
    assert_eq!(
        h.request(VIRTIO_BLK_T_OUT, 0, &[header(), huge, status_desc()]),
        (1, IOERR)
    );
    assert_eq!(h.store.counters(), (0, 0, 2));
    h.assert_still_works();
}

#[test]
fn status_outside_guest_memory_is_dropped() {
    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 4);
    let bad_status = writable(MEM_SIZE as u64 + 0x1000, 1);
    assert_eq!(
        h.request(VIRTIO_BLK_T_FLUSH, 0, &[header(), bad_status]),
        (0, 0xff)
    );
    h.assert_still_works();
}

#[test]
fn more_segments_than_seg_max_returns_ioerr() {
    let mem = guest_memory();
    let mut device = DeviceConfig::new(4);
    device.queue_size = 8; // seg_max 6
    let mut h = Harness::new(&mem, device);
    let mut descs = vec![header()];
    descs.extend((0..7).map(|i| readable(DATA + 512 * i, 512)));
    descs.push(status_desc());
    assert_eq!(h.request(VIRTIO_BLK_T_OUT, 0, &descs), (1, IOERR));
    // Exactly seg_max segments is fine.
    descs.remove(1);
    assert_eq!(h.request(VIRTIO_BLK_T_OUT, 0, &descs), (1, OK));
    h.assert_still_works();
}

#[test]
fn readable_descriptor_after_writable_returns_ioerr() {
    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 4);
    let descs = [
        header(),
        writable(DATA, 512),
        readable(DATA + 512, 512),
        status_desc(),
    ];
    assert_eq!(h.request(VIRTIO_BLK_T_IN, 0, &descs), (1, IOERR));
    h.assert_still_works();
}

#[test]
fn short_header_returns_ioerr() {
    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 4);
    assert_eq!(
        h.request(VIRTIO_BLK_T_FLUSH, 0, &[readable(HEADER, 8), status_desc()]),
        (1, IOERR)
    );
    assert_eq!(
        h.request(VIRTIO_BLK_T_FLUSH, 0, &[status_desc()]),
        (1, IOERR)
    );
    h.assert_still_works();
}

#[test]
fn write_past_capacity_returns_ioerr() {
    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 4);
    let page = pattern(PAGE_SIZE, 7);
    assert_eq!(h.write(4 * 8, &page), (1, IOERR), "starts at the end");
    assert_eq!(h.write(4 * 8 - 1, &page), (1, IOERR), "ends past the end");
    assert_eq!(
        h.write(u64::MAX - 1, &page),
        (1, IOERR),
        "sector + length overflows"
    );
    assert_eq!(h.store.counters(), (0, 0, 3));
    h.assert_still_works();
}

#[test]
fn read_past_capacity_returns_ioerr_and_writes_no_data() {
    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 4);
    let (used, status) = h.request(
        VIRTIO_BLK_T_IN,
        u64::MAX,
        &[header(), writable(DATA, 512), status_desc()],
    );
    assert_eq!((used, status), (1, IOERR));
    h.assert_still_works();
}

#[test]
fn length_not_a_multiple_of_512_returns_ioerr() {
    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 4);
    assert_eq!(h.write(0, &[1; 100]), (1, IOERR));
    let (used, status) = h.request(
        VIRTIO_BLK_T_IN,
        0,
        &[header(), writable(DATA, 513), status_desc()],
    );
    assert_eq!((used, status), (1, IOERR));
    h.assert_still_works();
}

#[test]
fn unknown_request_type_returns_unsupp() {
    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 4);
    for request_type in [2, 14, 15, 0x8000_0000, u32::MAX] {
        assert_eq!(
            h.request(request_type, 0, &[header(), status_desc()]),
            (1, UNSUPP)
        );
    }
    assert_eq!(h.store.counters(), (0, 0, 5));
    h.assert_still_works();
}

#[test]
fn discard_with_unmap_or_unknown_flags_returns_unsupp() {
    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 4);
    let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    assert_eq!(
        h.range_request(VIRTIO_BLK_T_DISCARD, &[(0, 8, unmap)]),
        (1, UNSUPP)
    );
    assert_eq!(
        h.range_request(VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 8, 2)]),
        (1, UNSUPP)
    );
    assert!(h.store.discarded.lock().unwrap().is_empty());
    h.assert_still_works();
}

#[test]
fn malformed_discard_payloads_return_ioerr() {
    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 4);
    assert_eq!(
        h.range_request(VIRTIO_BLK_T_DISCARD, &[]),
        (1, IOERR),
        "no segment"
    );
    assert_eq!(
        h.range_request(VIRTIO_BLK_T_DISCARD, &[(0, 8, 0), (32, 8, 0)]),
        (1, IOERR),
        "second segment past capacity: nothing is discarded"
    );
    assert!(h.store.discarded.lock().unwrap().is_empty());
    let too_many = vec![(0, 8, 0); 257];
    assert_eq!(h.range_request(VIRTIO_BLK_T_DISCARD, &too_many), (1, IOERR));
    // A payload that is not whole segments.
    h.write_header(VIRTIO_BLK_T_DISCARD, 0);
    assert_eq!(
        h.run(&[header(), readable(DATA, 20), status_desc()]),
        (1, IOERR)
    );
    assert_eq!(
        h.range_request(VIRTIO_BLK_T_WRITE_ZEROES, &[(0, u32::MAX, 0)]),
        (1, IOERR),
        "longer than max_write_zeroes_sectors"
    );
    h.assert_still_works();
}

#[test]
fn read_only_device_refuses_writes_with_ioerr() {
    let mem = guest_memory();
    let mut device = DeviceConfig::new(4);
    device.read_only = true;
    let mut h = Harness::new(&mem, device);
    assert_eq!(h.write(0, &pattern(PAGE_SIZE, 8)), (1, IOERR));
    assert!(!h.store.stored(0));
    assert_eq!(
        h.range_request(VIRTIO_BLK_T_DISCARD, &[(0, 8, 0)]),
        (1, UNSUPP)
    );
    assert_eq!(h.read(0, PAGE_SIZE), vec![0; PAGE_SIZE]);
}

#[test]
fn store_failure_returns_ioerr_and_counts_failed_write() {
    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 4);
    h.store.fail_writes = true;
    assert_eq!(h.write(0, &pattern(PAGE_SIZE, 9)), (1, IOERR));
    assert_eq!(
        h.write(1, &[1; 512]),
        (1, IOERR),
        "sub-page write goes through modify"
    );
    assert_eq!(h.store.counters(), (0, 2, 0));
    h.store.fail_writes = false;
    h.assert_still_works();
}

#[test]
fn descriptor_loop_terminates() {
    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 4);
    h.write_header(VIRTIO_BLK_T_FLUSH, 0);
    // Two descriptors pointing at each other.
    let head = h.next_desc;
    let a = SplitDescriptor::new(HEADER, 16, VRING_DESC_F_NEXT as u16, head + 1);
    let b = SplitDescriptor::new(
        STATUS,
        1,
        (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
        head,
    );
    h.vq.desc_table()
        .store(head, RawDescriptor::from(a))
        .unwrap();
    h.vq.desc_table()
        .store(head + 1, RawDescriptor::from(b))
        .unwrap();
    h.next_desc += 2;
    h.publish(head);
    h.runner
        .process_queue(&mut h.queue, &mem, &h.store, &h.device)
        .unwrap();
    assert_eq!(h.queue.next_used(), 1, "the looping chain was completed");
    h.assert_still_works();
}

#[test]
fn page_store_failures_count_once_and_leave_old_data() {
    use crate::codec::Algorithm;
    use crate::pagegen::{PageGen, PageKind};
    use crate::store::{PageStore, StoreConfig};

    let mem = guest_memory();
    let store = PageStore::new(StoreConfig {
        capacity_pages: 256,
        algorithm: Algorithm::Lz4,
        level: None,
        mem_limit: Some(96 * 1024),
    })
    .unwrap();
    let mut h = Harness::with_store(&mem, DeviceConfig::new(256), store);
    let first = PageGen::new(1).page_of(PageKind::Random);
    assert_eq!(h.write(0, &first[..]), (1, OK));
    // Fill up to the limit with incompressible pages until the store refuses one.
    let mut gen = PageGen::new(2);
    let refused = (1..256u64)
        .find(|&page| h.write(page * 8, &gen.page_of(PageKind::Random)[..]).1 == IOERR)
        .expect("the memory limit was never reached");
    let io = h.store.stats().io;
    assert_eq!((io.failed_writes, io.invalid_io), (1, 0), "page {refused}");
    // Overwriting page 0 now fails too, and page 0 keeps its data.
    assert_eq!(h.write(0, &gen.page_of(PageKind::Random)[..]), (1, IOERR));
    assert_eq!(h.read(0, PAGE_SIZE), first.to_vec());
    // A request past the end is the guest's error: invalid_io, not a failed write.
    assert_eq!(h.write(256 * 8, &[0; 512]), (1, IOERR));
    let io = h.store.stats().io;
    assert_eq!(
        (io.failed_reads, io.failed_writes, io.invalid_io),
        (0, 2, 1)
    );
}

// Zero-copy reads: a whole page whose destination is one contiguous piece of one memory region
// is read straight into guest memory; everything else takes the copying path. These tests give
// the direct path the copying path's bad inputs and check every byte against a model.

/// Guest memory of `MEM_SIZE` bytes as two regions (two mappings) that meet at `REGION_SPLIT`.
const REGION_SPLIT: u64 = (MEM_SIZE / 2) as u64;

fn two_region_memory() -> GuestMemoryMmap<()> {
    let half = MEM_SIZE / 2;
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), half), (GuestAddress(REGION_SPLIT), half)])
        .unwrap()
}

fn host_address(mem: &GuestMemoryMmap<()>, addr: u64) -> usize {
    use vm_memory::GuestMemoryBackend;
    mem.get_host_address(GuestAddress(addr)).unwrap() as usize
}

impl<S: BlockBackend> Harness<'_, S> {
    /// Reads `len` bytes from `sector` into the writable `pieces`, in order, and returns (used
    /// length, status byte).
    fn read_into(&mut self, sector: u64, pieces: &[(u64, u32)]) -> (u32, u8) {
        let mut descs = vec![header()];
        descs.extend(pieces.iter().map(|&(addr, len)| writable(addr, len)));
        descs.push(status_desc());
        self.request(VIRTIO_BLK_T_IN, sector, &descs)
    }
}

impl Harness<'_, TestStore> {
    /// Where the store was asked to put each page since the last call.
    fn take_read_targets(&self) -> Vec<usize> {
        std::mem::take(&mut *self.store.read_targets.lock().unwrap())
    }
}

/// What guest memory should hold after reading `data` into `pieces` in order: later pieces
/// win where pieces overlap.
fn expected_guest_bytes(pieces: &[(u64, u32)], data: &[u8]) -> HashMap<u64, u8> {
    let mut expected = HashMap::new();
    let mut at = 0usize;
    for &(addr, len) in pieces {
        for i in 0..len as usize {
            expected.insert(addr + i as u64, data[at + i]);
        }
        at += len as usize;
    }
    expected
}

/// The 64 bytes on either side of each piece that no piece covers, with what they hold now:
/// a read must leave them alone.
fn guard_bytes(mem: &GuestMemoryMmap<()>, pieces: &[(u64, u32)]) -> HashMap<u64, u8> {
    let covered = |addr: u64| {
        pieces
            .iter()
            .any(|&(start, len)| (start..start + u64::from(len)).contains(&addr))
    };
    let mut guard = HashMap::new();
    for &(start, len) in pieces {
        let end = start + u64::from(len);
        for addr in (start.saturating_sub(64)..start).chain(end..(end + 64).min(MEM_SIZE as u64)) {
            if !covered(addr) {
                guard.insert(addr, mem.read_obj(GuestAddress(addr)).unwrap());
            }
        }
    }
    guard
}

fn assert_guest_holds(mem: &GuestMemoryMmap<()>, expected: &HashMap<u64, u8>) {
    for (&addr, &byte) in expected {
        let got: u8 = mem.read_obj(GuestAddress(addr)).unwrap();
        assert_eq!(got, byte, "guest byte at {addr:#x}");
    }
}

#[test]
fn whole_contiguous_pages_are_read_straight_into_guest_memory() {
    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 16);
    let data = pattern(3 * PAGE_SIZE, 11);
    h.write(8, &data);
    h.take_read_targets();
    assert_eq!(h.read(8, 3 * PAGE_SIZE), data);
    let guest: Vec<usize> = (0..3)
        .map(|i| host_address(&mem, DATA + (i * PAGE_SIZE) as u64))
        .collect();
    assert_eq!(h.take_read_targets(), guest, "each page went to its place");
    assert_eq!(h.store.counters(), (0, 0, 0));
}

#[test]
fn partial_and_split_pages_take_the_copying_path() {
    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 16);
    let data = pattern(2 * PAGE_SIZE, 12);
    h.write(0, &data);
    h.take_read_targets();
    // Sectors 1..9: the end of page 0 and the start of page 1, both partial.
    assert_eq!(h.read(1, PAGE_SIZE), data[512..512 + PAGE_SIZE]);
    // Page 0 split across two descriptors, page 1 whole in the second.
    let pieces = [(DATA + 0x8000, 1000), (DATA, (2 * PAGE_SIZE - 1000) as u32)];
    assert_eq!(h.read_into(0, &pieces), (2 * PAGE_SIZE as u32 + 1, OK));
    assert_guest_holds(&mem, &expected_guest_bytes(&pieces, &data));
    let targets = h.take_read_targets();
    let guest_start = host_address(&mem, 0);
    let in_guest = |p: &usize| (guest_start..guest_start + MEM_SIZE).contains(p);
    // Two partial pages, one split page: copied. The whole page at DATA + 3096: direct.
    assert_eq!(targets.len(), 4);
    assert!(!targets[..3].iter().any(in_guest), "{targets:x?}");
    assert_eq!(targets[3], host_address(&mem, DATA + 3096));
    h.assert_still_works();
}

#[test]
fn a_page_split_across_two_memory_regions_is_copied_and_reads_back_right() {
    let mem = two_region_memory();
    let mut h = Harness::with_pages(&mem, 16);
    let data = pattern(3 * PAGE_SIZE, 13);
    h.write(0, &data);
    h.take_read_targets();
    // One descriptor that starts 0x800 bytes before the regions meet: page 0 straddles them,
    // pages 1 and 2 lie in the second region.
    let start = REGION_SPLIT - 0x800;
    let pieces = [(start, 3 * PAGE_SIZE as u32)];
    mem.write_slice(&[0xee; 3 * PAGE_SIZE], GuestAddress(start))
        .unwrap();
    assert_eq!(h.read_into(0, &pieces), (3 * PAGE_SIZE as u32 + 1, OK));
    assert_guest_holds(&mem, &expected_guest_bytes(&pieces, &data));
    let targets = h.take_read_targets();
    assert_ne!(
        targets[0],
        host_address(&mem, start),
        "straddling page copied"
    );
    assert_eq!(
        targets[1..],
        [
            host_address(&mem, start + PAGE_SIZE as u64),
            host_address(&mem, start + 2 * PAGE_SIZE as u64)
        ]
    );
    assert_eq!(h.store.counters(), (0, 0, 0));
    h.assert_still_works();
}

#[test]
fn overlapping_read_buffers_hold_what_was_read_last() {
    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 16);
    let data = pattern(3 * PAGE_SIZE, 14);
    h.write(0, &data);
    // Three descriptors over the same page, then one that half-overlaps it.
    let same = [(DATA, PAGE_SIZE as u32); 3];
    assert_eq!(h.read_into(0, &same), (3 * PAGE_SIZE as u32 + 1, OK));
    let mut held = vec![0; PAGE_SIZE];
    mem.read_slice(&mut held, GuestAddress(DATA)).unwrap();
    assert_eq!(held, data[2 * PAGE_SIZE..]);
    let half = [
        (DATA, PAGE_SIZE as u32),
        (DATA + 2048, 2 * PAGE_SIZE as u32),
    ];
    assert_eq!(h.read_into(0, &half), (3 * PAGE_SIZE as u32 + 1, OK));
    assert_guest_holds(&mem, &expected_guest_bytes(&half, &data));
    // A data buffer over the request's own header and status byte: the header was parsed
    // before, and the status byte is written after the data.
    let over_header = [(HEADER, PAGE_SIZE as u32)];
    assert_eq!(h.read_into(0, &over_header), (PAGE_SIZE as u32 + 1, OK));
    let over_status = [(STATUS - 100, PAGE_SIZE as u32)];
    assert_eq!(h.read_into(0, &over_status), (PAGE_SIZE as u32 + 1, OK));
    assert_eq!(h.store.counters(), (0, 0, 0));
    h.assert_still_works();
}

/// Reads into a buffer that covers the avail ring and the used ring (the mock queue puts its
/// descriptor table at 0 and the rings right after it). The guest's queue holds the page then;
/// its `avail->idx` is set so the queue stays consistent, to show the device keeps serving.
#[test]
fn a_read_buffer_over_the_rings_completes_and_the_queue_keeps_serving() {
    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 16);
    let avail = h.vq.avail_addr().0;
    let used = h.vq.used_addr().0;
    let mut page = pattern(PAGE_SIZE, 15);
    // avail->flags = 0 and avail->idx = what it will be once this read is published.
    page[0..2].copy_from_slice(&0u16.to_le_bytes());
    page[2..4].copy_from_slice(&2u16.to_le_bytes());
    assert_eq!(h.write(0, &page), (1, OK));
    assert_eq!(
        h.read_into(0, &[(avail, PAGE_SIZE as u32)]),
        (PAGE_SIZE as u32 + 1, OK)
    );
    let mut avail_now = vec![0; (used - avail) as usize];
    mem.read_slice(&mut avail_now, GuestAddress(avail)).unwrap();
    assert_eq!(
        avail_now,
        page[..avail_now.len()],
        "the avail ring holds the data"
    );
    h.assert_still_works();
}

/// The same with data that makes `avail->idx` nonsense: the request still completes with a
/// status, and nothing outside the guest's queue is touched (the worker may then serve
/// nonsense chains, each of which fails cleanly).
#[test]
fn a_read_buffer_over_the_rings_with_a_nonsense_index_fails_only_the_guests_queue() {
    for avail_idx in [0x0003u16, 0x00ff, 0x8000, 0xffff] {
        let mem = guest_memory();
        let mut h = Harness::with_pages(&mem, 16);
        let avail = h.vq.avail_addr().0;
        let mut page = pattern(PAGE_SIZE, 16);
        page[2..4].copy_from_slice(&avail_idx.to_le_bytes());
        assert_eq!(h.write(0, &page), (1, OK));
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        h.write_header(VIRTIO_BLK_T_IN, 0);
        h.add_chain(&[header(), writable(avail, PAGE_SIZE as u32), status_desc()]);
        // Serving may go on into whatever the ring now says; it must end, without panicking.
        let _ = h
            .runner
            .process_queue(&mut h.queue, &mem, &h.store, &h.device);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), OK);
        assert_eq!(
            mem.read_obj::<[u8; 2]>(GuestAddress(avail + 2)).unwrap(),
            avail_idx.to_le_bytes()
        );
        assert_eq!(
            h.store.read_targets.lock().unwrap()[0],
            host_address(&mem, avail)
        );
    }
}

#[test]
fn a_read_buffer_at_the_end_of_guest_memory_is_direct_and_one_past_it_fails() {
    let mem = two_region_memory();
    let mut h = Harness::with_pages(&mem, 16);
    let data = pattern(PAGE_SIZE, 17);
    h.write(0, &data);
    h.take_read_targets();
    let last = MEM_SIZE as u64 - PAGE_SIZE as u64;
    assert_eq!(
        h.read_into(0, &[(last, PAGE_SIZE as u32)]),
        (PAGE_SIZE as u32 + 1, OK)
    );
    assert_eq!(h.take_read_targets(), [host_address(&mem, last)]);
    assert_guest_holds(
        &mem,
        &expected_guest_bytes(&[(last, PAGE_SIZE as u32)], &data),
    );
    // One byte further: refused before the store is asked.
    assert_eq!(
        h.read_into(0, &[(last + 512, PAGE_SIZE as u32)]),
        (1, IOERR)
    );
    assert!(h.take_read_targets().is_empty());
    assert_eq!(h.store.counters(), (0, 0, 1));
    h.assert_still_works();
}

#[test]
fn a_failed_direct_read_returns_ioerr_and_counts_once() {
    let mem = guest_memory();
    let store = TestStore {
        fail_reads: true,
        ..TestStore::new(16)
    };
    let mut h = Harness::with_store(&mem, DeviceConfig::new(16), store);
    let (used, status) = h.read_into(0, &[(DATA, 2 * PAGE_SIZE as u32)]);
    assert_eq!((used, status), (1, IOERR), "no data is reported written");
    assert_eq!(
        h.take_read_targets(),
        [host_address(&mem, DATA)],
        "stopped at the first page"
    );
    assert_eq!(h.store.counters(), (1, 0, 0));
}

#[test]
fn direct_reads_from_the_page_store_match_every_page_kind() {
    use crate::codec::Algorithm;
    use crate::pagegen::{PageGen, PageKind};
    use crate::store::{PageStore, StoreConfig};

    let mem = two_region_memory();
    let store = PageStore::new(StoreConfig {
        capacity_pages: 64,
        algorithm: Algorithm::Lz4,
        level: None,
        mem_limit: None,
    })
    .unwrap();
    let mut h = Harness::with_store(&mem, DeviceConfig::new(64), store);
    let mut gen = PageGen::new(5);
    let kinds = [
        PageKind::Random,
        PageKind::Zero,
        PageKind::SameFilled,
        PageKind::Text,
    ];
    let mut model = Vec::new();
    for (i, kind) in kinds.iter().cycle().take(8).enumerate() {
        let page = gen.page_of(*kind);
        assert_eq!(h.write(i as u64 * 8, &page[..]), (1, OK));
        model.extend_from_slice(&page[..]);
    }
    // All eight pages in one descriptor across the region boundary (one page straddles it),
    // then at an aligned place inside one region.
    for start in [REGION_SPLIT - 0x1800, DATA] {
        let pieces = [(start, 8 * PAGE_SIZE as u32)];
        assert_eq!(h.read_into(0, &pieces), (8 * PAGE_SIZE as u32 + 1, OK));
        assert_guest_holds(&mem, &expected_guest_bytes(&pieces, &model));
    }
}

/// One step of the zero-copy model test.
#[derive(Debug, Clone)]
enum ModelOp {
    /// Write `pages` pages of kind `seed` at page `page`.
    Write { page: u64, pages: usize, seed: u8 },
    /// Read `sectors` sectors from `sector` into pieces of the given lengths (the last takes
    /// the rest) at the given places.
    Read {
        sector: u64,
        sectors: usize,
        cuts: Vec<usize>,
        places: Vec<u64>,
    },
}

fn model_op() -> impl proptest::strategy::Strategy<Value = ModelOp> {
    use proptest::prelude::*;
    // Places near the region boundary, at page-aligned spots, at odd offsets and over the
    // same memory twice (overlaps).
    let place = prop_oneof![
        (0u64..0x3000).prop_map(|d| REGION_SPLIT - d),
        (0u64..16).prop_map(|p| DATA + p * PAGE_SIZE as u64),
        (0u64..0x4000).prop_map(|d| 0x30_0000 + d),
        Just(DATA),
    ];
    prop_oneof![
        (0u64..16, 1usize..4, any::<u8>()).prop_map(|(page, pages, seed)| ModelOp::Write {
            page: page.min(16 - pages as u64),
            pages,
            seed
        }),
        (
            0u64..120,
            1usize..33,
            proptest::collection::vec(1usize..9000, 0..3),
            proptest::collection::vec(place, 4),
        )
            .prop_map(|(sector, sectors, cuts, places)| ModelOp::Read {
                sector: sector.min(128 - sectors as u64),
                sectors,
                cuts,
                places,
            }),
    ]
}

/// The pieces a read of `len` bytes is cut into: `cuts` are piece lengths, clipped so every
/// piece is non-empty and the last takes the rest.
fn cut_pieces(len: usize, cuts: &[usize], places: &[u64]) -> Vec<(u64, u32)> {
    let mut pieces = Vec::new();
    let mut left = len;
    for (cut, place) in cuts.iter().zip(places) {
        if *cut >= left {
            break;
        }
        pieces.push((*place, *cut as u32));
        left -= cut;
    }
    pieces.push((places[pieces.len()], left as u32));
    pieces
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

    /// Any mix of writes and reads, reads cut into pieces anywhere (across regions, over one
    /// another), leaves guest memory holding exactly what a model says, and the bytes around
    /// the pieces untouched.
    #[test]
    fn reads_into_any_layout_match_a_model(ops in proptest::collection::vec(model_op(), 1..24)) {
        let mem = two_region_memory();
        let mut h = Harness::with_pages(&mem, 16);
        let mut model = vec![0u8; 16 * PAGE_SIZE];
        for op in ops {
            match op {
                ModelOp::Write { page, pages, seed } => {
                    let data = pattern(pages * PAGE_SIZE, seed);
                    proptest::prop_assert_eq!(h.write(page * 8, &data), (1, OK));
                    let at = page as usize * PAGE_SIZE;
                    model[at..at + data.len()].copy_from_slice(&data);
                }
                ModelOp::Read { sector, sectors, cuts, places } => {
                    let len = sectors * 512;
                    let pieces = cut_pieces(len, &cuts, &places);
                    for &(addr, len) in &pieces {
                        mem.write_slice(&vec![0xee; len as usize], GuestAddress(addr)).unwrap();
                    }
                    let guard = guard_bytes(&mem, &pieces);
                    proptest::prop_assert_eq!(h.read_into(sector, &pieces), (len as u32 + 1, OK));
                    let at = sector as usize * 512;
                    assert_guest_holds(&mem, &expected_guest_bytes(&pieces, &model[at..at + len]));
                    assert_guest_holds(&mem, &guard);
                }
            }
        }
        proptest::prop_assert_eq!(h.store.counters(), (0, 0, 0));
    }
}

/// Posts a one-page read of page 0, which the store reads slowly, and serves the queue with a
/// `defer` that takes it; returns what `process_next` said and the request taken.
fn take_a_slow_read(h: &mut Harness<'_, TestStore>) -> (Next, Option<Request<InjectedFailure>>) {
    h.store.slow_below = 4;
    h.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    h.write_header(VIRTIO_BLK_T_IN, 0);
    h.add_chain(&[header(), writable(DATA, PAGE_SIZE as u32), status_desc()]);
    let mut taken = None;
    let next = h
        .runner
        .process_next(
            &mut h.queue,
            h.mem,
            &h.store,
            &h.device,
            Some(&mut |request| {
                taken = Some(request);
                Ok(())
            }),
        )
        .unwrap();
    (next, taken)
}

/// A slow read taken off the queue stays in flight — no status, no used entry — until it is
/// executed and completed on the queue, and then lands like any other request.
#[test]
fn a_deferred_read_is_in_flight_until_completed_on_its_queue() {
    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 16);
    let page = pattern(PAGE_SIZE, 7);
    assert_eq!(h.write(0, &page), (1, OK));
    h.mem
        .write_slice(&[0xee; PAGE_SIZE], GuestAddress(DATA))
        .unwrap();
    let used_before = h.queue.next_used();

    let (next, taken) = take_a_slow_read(&mut h);

    assert_eq!(next, Next::Deferred);
    assert_eq!(h.runner.in_flight(), 1, "taken and not completed");
    assert_eq!(h.queue.next_used(), used_before, "no used entry yet");
    assert_eq!(h.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0xff);
    let mut request = taken.expect("the slow read was offered");
    assert!(!request.is_done());

    h.runner
        .execute(&mut request, h.mem, &h.store, &h.device, &OnQueueThread);
    h.runner
        .complete(&mut h.queue, h.mem, &h.store, request)
        .unwrap();

    assert_eq!(h.runner.in_flight(), 0);
    assert_eq!(h.queue.next_used(), used_before + 1);
    assert_eq!(h.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), OK);
    let mut out = vec![0; PAGE_SIZE];
    h.mem.read_slice(&mut out, GuestAddress(DATA)).unwrap();
    assert_eq!(out, page);
}

/// A request completed without being executed reports an I/O error, never success for
/// nothing; a request `defer` hands back is served on the queue.
#[test]
fn a_request_completed_without_execution_reports_ioerr() {
    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 16);
    let (_, taken) = take_a_slow_read(&mut h);

    h.runner
        .complete(&mut h.queue, h.mem, &h.store, taken.unwrap())
        .unwrap();

    assert_eq!(h.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), IOERR);
    assert_eq!(h.runner.in_flight(), 0);
    // Handed back: served on the queue at once.
    let page = pattern(PAGE_SIZE, 3);
    assert_eq!(h.write(0, &page), (1, OK));
    h.write_header(VIRTIO_BLK_T_IN, 0);
    h.add_chain(&[header(), writable(DATA, PAGE_SIZE as u32), status_desc()]);
    let next = h
        .runner
        .process_next(&mut h.queue, h.mem, &h.store, &h.device, Some(&mut Err))
        .unwrap();
    assert_eq!(next, Next::Completed);
    let mut out = vec![0; PAGE_SIZE];
    h.mem.read_slice(&mut out, GuestAddress(DATA)).unwrap();
    assert_eq!(out, page);
}

/// A head an earlier daemon took is walked again by [`ResubmitChain`] and goes through the
/// same `take` as a popped chain: an indirect chain is followed and served, a malformed one is
/// refused with IOERR, in the order they were taken, and the ring goes on after both.
#[test]
fn resubmitted_chains_are_parsed_like_fresh_ones() {
    use super::inflight::{create_region, InflightRegion, QueueStart};
    use std::sync::Arc;

    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 4);
    let size = h.device.queue_size;
    let (file, len) = create_region(1, size, 1, size).unwrap();
    let region = Arc::new(InflightRegion::map(&file, len, 0, 1, size, 1, size).unwrap());
    h.runner.track_inflight(region.queue(0));
    assert_eq!(
        h.runner.start_queue(&mut h.queue, &mem).unwrap(),
        Some(QueueStart::Fresh)
    );

    // Chain A: a write of page 0 through an indirect table. Chain B: a zero-length data
    // descriptor. Each has its own header and status byte.
    let (header_a, status_a, table) = (0x3_0000u64, 0x3_1000u64, 0x3_2000u64);
    let (header_b, status_b) = (0x3_3000u64, 0x3_4000u64);
    let mut raw = [0u8; 16];
    raw[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    mem.write_slice(&raw, GuestAddress(header_a)).unwrap();
    mem.write_slice(&raw, GuestAddress(header_b)).unwrap();
    let data = pattern(PAGE_SIZE, 7);
    mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    let (next, write) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
    let entries = [
        SplitDescriptor::new(header_a, 16, next, 1),
        SplitDescriptor::new(DATA, PAGE_SIZE as u32, next, 2),
        SplitDescriptor::new(status_a, 1, write, 0),
    ];
    for (i, entry) in entries.iter().enumerate() {
        mem.write_obj(
            RawDescriptor::from(*entry),
            GuestAddress(table + 16 * i as u64),
        )
        .unwrap();
    }
    let descs = [
        SplitDescriptor::new(table, 48, VRING_DESC_F_INDIRECT as u16, 0),
        SplitDescriptor::new(header_b, 16, next, 2),
        SplitDescriptor::new(DATA, 0, next, 3),
        SplitDescriptor::new(status_b, 1, write, 0),
    ];
    for (i, desc) in (0u16..).zip(descs) {
        h.vq.desc_table()
            .store(i, RawDescriptor::from(desc))
            .unwrap();
    }
    for status in [status_a, status_b] {
        mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
    }
    h.publish(0);
    h.publish(1);

    // The first daemon takes both and dies before executing them.
    for _ in 0..2 {
        let chain = h.queue.pop_descriptor_chain(&mem).unwrap();
        let request: Request<InjectedFailure> = h.runner.take(chain, &mem, &h.device);
        h.runner.discard(request);
    }

    // A new daemon: a fresh runner over the same region, the vring base at the used index 0.
    let mut runner = RequestRunner::standalone(&h.device);
    runner.track_inflight(region.queue(0));
    let mut queue: Queue = h.vq.create_queue().unwrap();
    let start = runner.start_queue(&mut queue, &mem).unwrap();
    assert!(
        matches!(start, Some(QueueStart::Resumed { next_avail: 2, .. })),
        "{start:?}"
    );
    assert_eq!(runner.resubmit_pending(), 2);
    let served = runner
        .process_queue(&mut queue, &mem, &h.store, &h.device)
        .unwrap();
    assert_eq!(served, 2);
    let used: Vec<u32> = (0..2)
        .map(|i| h.vq.used().ring().ref_at(i).unwrap().load().id())
        .collect();
    assert_eq!(used, vec![0, 1], "in the order they were taken");
    assert_eq!(mem.read_obj::<u8>(GuestAddress(status_a)).unwrap(), OK);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(status_b)).unwrap(), IOERR);
    assert_eq!(queue.next_avail(), 2);
    h.queue = queue;
    h.runner = runner;
    assert_eq!(h.read(0, PAGE_SIZE), data);
}

#[test]
fn a_read_into_a_lent_guest_page_marks_it_dirty() {
    use vm_memory::bitmap::{AtomicBitmap, Bitmap};
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    // Guest memory whose region carries a dirty bitmap, as it does while a migration logs it.
    let mem: GuestMemoryMmap<AtomicBitmap> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let mut queue: Queue = vq.create_queue().unwrap();
    let device = DeviceConfig::new(16);
    let store = TestStore::new(device.capacity_pages);
    store
        .pages
        .lock()
        .unwrap()
        .insert(2, Box::new([0x33; PAGE_SIZE]));
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    header[8..16].copy_from_slice(&16u64.to_le_bytes());
    mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
    let (next, write) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
    let descs = [
        SplitDescriptor::new(HEADER, 16, next, 1),
        SplitDescriptor::new(DATA, PAGE_SIZE as u32, write | next, 2),
        SplitDescriptor::new(STATUS, 1, write, 0),
    ];
    for (index, desc) in (0u16..).zip(descs) {
        vq.desc_table()
            .store(index, RawDescriptor::from(desc))
            .unwrap();
    }
    vq.avail().ring().ref_at(0).unwrap().store(0);
    vq.avail().idx().store(1);
    let bitmap = mem.find_region(GuestAddress(0)).unwrap().bitmap();
    let dirty = |addr: u64| bitmap.dirty_at(addr as usize);
    assert!(!dirty(DATA) && !dirty(STATUS));

    let mut runner = RequestRunner::standalone(&device);
    let completed = runner
        .process_queue(&mut queue, &mem, &store, &device)
        .unwrap();

    assert_eq!(completed, 1);
    let lent = mem.get_host_address(GuestAddress(DATA)).unwrap() as usize;
    assert_eq!(
        *store.read_targets.lock().unwrap(),
        [lent],
        "the page was lent"
    );
    assert!(dirty(DATA) && dirty(DATA + PAGE_SIZE as u64 - 1));
    assert!(dirty(STATUS));
    assert!(!dirty(DATA + PAGE_SIZE as u64));
}

// Multi-page units: a write hands each run of whole pages to the store in one
// `write_pages_with` call, and partial pages at either end to `modify_page`. `TestStore` takes a
// run as a multi-page unit would (everything filled, then stored); `PageByPage` takes the
// trait's default, page by page through `write_page_with`.

/// The test store without its own `write_pages_with`: runs go through the trait's default.
struct PageByPage(TestStore);

// SAFETY: every method hands on to `TestStore`, whose `read_page` keeps the rules.
unsafe impl BlockBackend for PageByPage {
    type Error = InjectedFailure;

    fn capacity_pages(&self) -> u64 {
        self.0.capacity_pages()
    }

    fn read_page(&self, index: u64, page: &mut [u8; PAGE_SIZE]) -> Result<(), InjectedFailure> {
        self.0.read_page(index, page)
    }

    fn write_page(&self, index: u64, page: &[u8; PAGE_SIZE]) -> Result<(), InjectedFailure> {
        self.0.write_page(index, page)
    }

    fn modify_page<R>(
        &self,
        index: u64,
        f: impl FnOnce(&mut [u8; PAGE_SIZE]) -> R,
    ) -> Result<R, InjectedFailure> {
        self.0.modify_page(index, f)
    }

    fn discard_pages(&self, pages: Range<u64>) -> Result<(), InjectedFailure> {
        self.0.discard_pages(pages)
    }

    fn count_invalid_io(&self) {
        self.0.count_invalid_io();
    }
}

/// Page `index` as the store holds it (zeros when never written).
fn stored_page(store: &TestStore, index: u64) -> Vec<u8> {
    store
        .pages
        .lock()
        .unwrap()
        .get(&index)
        .map_or_else(|| vec![0; PAGE_SIZE], |page| page.to_vec())
}

#[test]
fn a_64k_write_reaches_the_store_as_one_run_of_16_pages() {
    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 64);
    let data = pattern(64 * 1024, 11);

    assert_eq!(h.write(8 * 8, &data), (1, OK));

    assert_eq!(
        h.store.take_calls(),
        [StoreCall::Pages {
            first: 8,
            count: 16
        }]
    );
    assert_eq!(h.read(8 * 8, data.len()), data);
    assert_eq!(h.store.counters(), (0, 0, 0));
}

#[test]
fn a_write_with_partial_end_pages_is_modify_then_one_run_then_modify() {
    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 16);
    let old = pattern(6 * PAGE_SIZE, 12);
    assert_eq!(h.write(0, &old), (1, OK));
    h.store.take_calls();
    // From sector 3 (inside page 0) to 3 sectors into page 4: pages 1..4 are whole.
    let data = pattern(4 * PAGE_SIZE, 13);

    assert_eq!(h.write(3, &data), (1, OK));

    assert_eq!(
        h.store.take_calls(),
        [
            StoreCall::Modify(0),
            StoreCall::Pages { first: 1, count: 3 },
            StoreCall::Modify(4),
        ]
    );
    let mut expected = old;
    expected[3 * 512..3 * 512 + data.len()].copy_from_slice(&data);
    assert_eq!(h.read(0, 6 * PAGE_SIZE), expected);
}

#[test]
fn a_write_inside_one_page_or_across_one_boundary_makes_no_run() {
    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 16);

    assert_eq!(h.write(1, &[0x21; 3 * 512]), (1, OK));
    assert_eq!(h.store.take_calls(), [StoreCall::Modify(0)]);
    assert_eq!(h.write(7, &[0x22; 2 * 512]), (1, OK));
    assert_eq!(
        h.store.take_calls(),
        [StoreCall::Modify(0), StoreCall::Modify(1)]
    );
}

#[test]
fn a_run_from_several_descriptors_fills_its_pages_in_order() {
    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 16);
    let data = pattern(6 * PAGE_SIZE, 14);
    // Cuts inside pages and on a page boundary, pieces spread over guest memory.
    let pieces = [
        (DATA, 1000u32),
        (DATA + 0x2_0000, 7000),
        (DATA + 0x5_0000 + 8, 4 * PAGE_SIZE as u32 - 8000),
        (DATA + 0x8_0000, 2 * PAGE_SIZE as u32),
    ];
    let mut descs = vec![header()];
    let mut at = 0;
    for (addr, len) in pieces {
        mem.write_slice(&data[at..at + len as usize], GuestAddress(addr))
            .unwrap();
        descs.push(readable(addr, len));
        at += len as usize;
    }
    assert_eq!(at, data.len());
    descs.push(status_desc());

    assert_eq!(h.request(VIRTIO_BLK_T_OUT, 8, &descs), (1, OK));

    assert_eq!(
        h.store.take_calls(),
        [StoreCall::Pages { first: 1, count: 6 }]
    );
    for (index, expected) in (1..).zip(data.chunks(PAGE_SIZE)) {
        assert_eq!(stored_page(&h.store, index), expected, "page {index}");
    }
}

/// Posts a write of `new` (8 pages) at page 0 from two descriptors, the first 3 pages in the
/// first memory region of `mem` and the rest in the second, takes it with all of `mem` and
/// executes and completes it with the second region gone: the fill fails at page 3. Returns
/// the status byte and the request's used length.
fn write_losing_memory_at_page_3<S: BlockBackend>(
    h: &mut Harness<'_, S>,
    mem: &GuestMemoryMmap<()>,
    new: &[u8],
) -> (u32, u8) {
    let second = REGION_SPLIT + 0x1_0000;
    mem.write_slice(&new[..3 * PAGE_SIZE], GuestAddress(DATA))
        .unwrap();
    mem.write_slice(&new[3 * PAGE_SIZE..], GuestAddress(second))
        .unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    h.write_header(VIRTIO_BLK_T_OUT, 0);
    let head = h.add_chain(&[
        header(),
        readable(DATA, 3 * PAGE_SIZE as u32),
        readable(second, 5 * PAGE_SIZE as u32),
        status_desc(),
    ]);
    let chain = h.queue.pop_descriptor_chain(mem).unwrap();
    let mut request = h.runner.take(chain, mem, &h.device);
    let (shrunk, _) = mem
        .remove_region(GuestAddress(REGION_SPLIT), MEM_SIZE as u64 / 2)
        .unwrap();

    h.runner
        .execute(&mut request, &shrunk, &h.store, &h.device, &OnQueueThread);
    assert!(
        matches!(request.error(), Some(RequestError::Copy(_))),
        "{:?}",
        request.error()
    );
    h.runner
        .complete(&mut h.queue, &shrunk, &h.store, request)
        .unwrap();

    let elem =
        h.vq.used()
            .ring()
            .ref_at(usize::from(
                h.queue.next_used().wrapping_sub(1) % QUEUE_SIZE,
            ))
            .unwrap()
            .load();
    assert_eq!(elem.id(), u32::from(head));
    (elem.len(), mem.read_obj(GuestAddress(STATUS)).unwrap())
}

#[test]
fn a_fill_failure_mid_run_returns_ioerr_and_leaves_later_pages_alone() {
    let mem = two_region_memory();
    let mut h = Harness::with_pages(&mem, 16);
    let old = pattern(8 * PAGE_SIZE, 15);
    assert_eq!(h.write(0, &old), (1, OK));
    h.store.take_calls();
    let new = pattern(8 * PAGE_SIZE, 16);

    let (used, status) = write_losing_memory_at_page_3(&mut h, &mem, &new);

    // What the guest got when pages went to the store one by one: an I/O error, counted as
    // the guest's (invalid_io), not the store's.
    assert_eq!((used, status), (1, IOERR));
    assert_eq!(h.store.counters(), (0, 0, 1));
    assert_eq!(
        h.store.take_calls(),
        [StoreCall::Pages { first: 0, count: 8 }]
    );
    // This store stores the unit only once every page is filled: nothing changed.
    for (index, page) in (0..).zip(old.chunks(PAGE_SIZE)) {
        assert_eq!(stored_page(&h.store, index), page, "page {index}");
    }
    h.assert_still_works();
}

#[test]
fn a_fill_failure_mid_run_page_by_page_keeps_the_pages_before_it() {
    let mem = two_region_memory();
    let device = DeviceConfig::new(16);
    let store = PageByPage(TestStore::new(device.capacity_pages));
    let mut h = Harness::with_store(&mem, device, store);
    let old = pattern(8 * PAGE_SIZE, 17);
    assert_eq!(h.write(0, &old), (1, OK));
    let new = pattern(8 * PAGE_SIZE, 18);

    let (used, status) = write_losing_memory_at_page_3(&mut h, &mem, &new);

    assert_eq!((used, status), (1, IOERR));
    assert_eq!(h.store.0.counters(), (0, 0, 1));
    for (index, page) in (0..3).zip(new.chunks(PAGE_SIZE)) {
        assert_eq!(stored_page(&h.store.0, index), page, "page {index} is new");
    }
    for (index, page) in (3..8).zip(old.chunks(PAGE_SIZE).skip(3)) {
        assert_eq!(stored_page(&h.store.0, index), page, "page {index} is old");
    }
    h.assert_still_works();
}

/// Writes 8 pages at page 0 whose page 5 the store refuses; returns the request's error.
fn write_refused_at_page_5<S: BlockBackend>(
    h: &mut Harness<'_, S>,
    mem: &GuestMemoryMmap<()>,
    new: &[u8],
) -> String {
    mem.write_slice(new, GuestAddress(DATA)).unwrap();
    h.write_header(VIRTIO_BLK_T_OUT, 0);
    h.add_chain(&[header(), readable(DATA, new.len() as u32), status_desc()]);
    let chain = h.queue.pop_descriptor_chain(mem).unwrap();
    let mut request = h.runner.take(chain, mem, &h.device);
    h.runner
        .execute(&mut request, mem, &h.store, &h.device, &OnQueueThread);
    let error = match request.error() {
        Some(error @ RequestError::WriteFailed { index: 5, .. }) => error.to_string(),
        other => panic!("expected page 5 to fail, got {other:?}"),
    };
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    h.runner
        .complete(&mut h.queue, mem, &h.store, request)
        .unwrap();
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), IOERR);
    error
}

#[test]
fn a_store_error_inside_a_run_names_the_page_it_failed_on() {
    let mem = guest_memory();
    let mut h = Harness::with_pages(&mem, 16);
    let old = pattern(8 * PAGE_SIZE, 19);
    assert_eq!(h.write(0, &old), (1, OK));
    h.store.fail_write_at = Some(5);

    let error = write_refused_at_page_5(&mut h, &mem, &pattern(8 * PAGE_SIZE, 20));

    assert_eq!(error, "writing page 5 failed");
    assert_eq!(h.store.counters(), (0, 1, 0), "the store's failure, once");
    for (index, page) in (5..8).zip(old.chunks(PAGE_SIZE).skip(5)) {
        assert_eq!(stored_page(&h.store, index), page, "page {index} is old");
    }
    h.store.fail_write_at = None;
    h.assert_still_works();
}

#[test]
fn a_store_error_page_by_page_names_the_page_it_failed_on() {
    let mem = guest_memory();
    let device = DeviceConfig::new(16);
    let mut store = TestStore::new(device.capacity_pages);
    store.fail_write_at = Some(5);
    let mut h = Harness::with_store(&mem, device, PageByPage(store));

    write_refused_at_page_5(&mut h, &mem, &pattern(8 * PAGE_SIZE, 21));

    assert_eq!(h.store.0.counters(), (0, 1, 0));
    assert!((0..5).all(|index| h.store.0.stored(index)));
    assert!((5..8).all(|index| !h.store.0.stored(index)));
}

#[test]
fn the_default_write_pages_with_fills_each_page_once_in_order() {
    let store = PageByPage(TestStore::new(16));
    let mut filled = Vec::new();

    let result = store.write_pages_with(4, 3, |i, page| {
        filled.push(i);
        page.fill(i as u8 + 1);
        Ok::<(), ()>(())
    });

    assert!(matches!(result, Ok(Ok(()))));
    assert_eq!(filled, [0, 1, 2]);
    for index in 4..7u64 {
        assert_eq!(
            stored_page(&store.0, index),
            vec![index as u8 - 3; PAGE_SIZE]
        );
    }

    // A fill that fails at page 1 comes back inside Ok; page 1 and after are unchanged.
    let result = store.write_pages_with(4, 3, |i, page| match i {
        0 => {
            page.fill(0x77);
            Ok(())
        }
        _ => Err(i),
    });

    assert!(matches!(result, Ok(Err(1))));
    assert_eq!(stored_page(&store.0, 4), vec![0x77; PAGE_SIZE]);
    assert_eq!(stored_page(&store.0, 5), vec![2; PAGE_SIZE]);
    assert_eq!(stored_page(&store.0, 6), vec![3; PAGE_SIZE]);
}
