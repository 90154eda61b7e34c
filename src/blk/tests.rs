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

use super::request::Worker;
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

/// A plain in-memory page store with zram's counters and failure injection.
#[derive(Default)]
struct TestStore {
    capacity: u64,
    pages: Mutex<HashMap<u64, Box<[u8; PAGE_SIZE]>>>,
    discarded: Mutex<Vec<Range<u64>>>,
    fail_writes: bool,
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
}

impl BlockBackend for TestStore {
    type Error = InjectedFailure;

    fn capacity_pages(&self) -> u64 {
        self.capacity
    }

    fn read_page(&self, index: u64, page: &mut [u8; PAGE_SIZE]) -> Result<(), InjectedFailure> {
        assert!(
            index < self.capacity,
            "read past capacity reached the store"
        );
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
        if self.fail_writes {
            return Err(InjectedFailure);
        }
        self.pages.lock().unwrap().insert(index, Box::new(*page));
        Ok(())
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
        if self.fail_writes {
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

    fn count_failed_read(&self) {
        self.failed_reads.fetch_add(1, Ordering::Relaxed);
    }

    fn count_failed_write(&self) {
        self.failed_writes.fetch_add(1, Ordering::Relaxed);
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

/// A queue, a worker and a store, plus helpers to submit chains.
struct Harness<'m> {
    mem: &'m GuestMemoryMmap<()>,
    vq: MockSplitQueue<'m, GuestMemoryMmap<()>>,
    queue: Queue,
    next_desc: u16,
    submitted: u16,
    store: TestStore,
    device: DeviceConfig,
    worker: Worker,
}

impl<'m> Harness<'m> {
    fn new(mem: &'m GuestMemoryMmap<()>, device: DeviceConfig) -> Self {
        let vq = MockSplitQueue::new(mem, QUEUE_SIZE);
        let queue = vq.create_queue().unwrap();
        Harness {
            mem,
            vq,
            queue,
            next_desc: 0,
            submitted: 0,
            store: TestStore::new(device.capacity_pages),
            worker: Worker::standalone(&device),
            device,
        }
    }

    fn with_pages(mem: &'m GuestMemoryMmap<()>, pages: u64) -> Self {
        Self::new(mem, DeviceConfig::new(pages))
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
            .worker
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
    h.worker
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
    h.worker
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
    h.worker
        .process_queue(&mut h.queue, &mem, &h.store, &h.device)
        .unwrap();
    assert_eq!(h.queue.next_used(), 1, "the looping chain was completed");
    h.assert_still_works();
}
