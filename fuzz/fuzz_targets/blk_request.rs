// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Fuzz target: request parsing and execution of the virtio-blk path against the real page
//! store, with descriptor chains and guest memory chosen by the fuzzer.
//!
//! Input layout: the first 2 bytes give the length of a blob copied to guest address 0 (so that
//! descriptors pointing there see fuzzer-chosen headers, data and discard segments); the rest
//! is a list of 16-byte descriptor records `(addr u32, len u32, flags u8, next u8, head u8,
//! _pad[5])`. Addresses span both guest memory regions, the hole between them and the space
//! past the end. For inputs whose first byte is odd, the store has an in-memory backing file
//! with some pages written back to it, so reads of those are deferred as the daemon defers them
//! (every other one is handed back and served inline, as when the read-back queue is full) and
//! completed afterwards. After every run the store must still be self-consistent.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_user_zram::blk::request::{Next, OnQueueThread, Request, RequestRunner};
use vhost_user_zram::blk::DeviceConfig;
use vhost_user_zram::codec::Algorithm;
use vhost_user_zram::store::backing::{BackingFile, MemIo};
use vhost_user_zram::store::{PageStore, StoreConfig, WritebackMode, WritebackRequest};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const QUEUE_SIZE: u16 = 64;
/// Where the mock queue's rings live (inside the first region, above the fuzzer's blob).
const RINGS: u64 = 0x6_0000;
const REGION_LEN: usize = 0x8_0000;
/// The second region starts after a hole.
const SECOND_REGION: u64 = 0x10_0000;
const CAPACITY_PAGES: u64 = 32;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let blob_len = usize::from(u16::from_le_bytes([data[0], data[1]])).min(data.len() - 2);
    let (blob, records) = data[2..].split_at(blob_len);

    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), REGION_LEN),
        (GuestAddress(SECOND_REGION), REGION_LEN),
    ])
    .expect("guest memory");
    mem.write_slice(blob, GuestAddress(0))
        .expect("blob fits the first region");

    let vq = MockSplitQueue::create(&mem, GuestAddress(RINGS), QUEUE_SIZE);
    let mut queue: Queue = vq.create_queue().expect("queue");
    let mut heads = Vec::new();
    for (i, r) in records
        .chunks_exact(16)
        .take(usize::from(QUEUE_SIZE))
        .enumerate()
    {
        let addr = u64::from(u32::from_le_bytes([r[0], r[1], r[2], r[3]]));
        let len = u32::from_le_bytes([r[4], r[5], r[6], r[7]]);
        // Keep the flags the device looks at: NEXT, WRITE and INDIRECT.
        let flags = u16::from(r[8] & 0b111);
        let next = u16::from(r[9]) % QUEUE_SIZE;
        let raw = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
        let index = u16::try_from(i).expect("at most QUEUE_SIZE records");
        vq.desc_table().store(index, raw).expect("descriptor table");
        if r[10] & 1 == 1 {
            heads.push(index);
        }
    }
    let avail = vq.avail();
    for (i, head) in heads.iter().enumerate() {
        avail
            .ring()
            .ref_at(i)
            .expect("avail slot")
            .store(head.to_le());
    }
    avail
        .idx()
        .store(u16::try_from(heads.len()).expect("few heads").to_le());

    let store = PageStore::new(StoreConfig {
        capacity_pages: CAPACITY_PAGES,
        algorithm: Algorithm::Lz4,
        level: None,
        mem_limit: None,
    })
    .expect("store");
    // When the first byte is odd, the store has an in-memory backing file and pages 0..4 (text
    // -like data) are on it, so reads of them are slow and deferred. (Half the inputs only:
    // setting it up costs more than the rest of a run.)
    let store = if data[0] & 1 == 1 {
        let store = store.with_backing_file(BackingFile::with_io(Box::new(MemIo::new()), None));
        let mut page = [0u8; 4096];
        for index in 0..4u8 {
            page.iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = (i / 3) as u8 ^ index);
            store.write(u64::from(index), &page).expect("write");
        }
        store.set_writeback_batch(4);
        store
            .writeback(&WritebackRequest {
                mode: WritebackMode::All,
                pages: Some((0, 4)),
                max_pages: None,
            })
            .expect("writeback to memory");
        store
    } else {
        store
    };
    // Small enough that a few incompressible pages reach it.
    store.set_mem_limit(Some(64 * 1024));
    let mut device = DeviceConfig::new(CAPACITY_PAGES);
    device.queue_size = QUEUE_SIZE;
    let mut runner = RequestRunner::standalone(&device);
    // Errors are statuses for the guest; the only failure here is a panic or a hang.
    // Half the slow reads are taken off the queue, as the daemon's read-back threads take
    // them, and completed after the queue is empty; the other half are handed back.
    let mut deferred: Vec<Request<_>> = Vec::new();
    let mut offered = 0u32;
    let mut defer = |request| {
        offered += 1;
        if offered % 2 == 0 {
            return Err(request);
        }
        deferred.push(request);
        Ok(())
    };
    while let Ok(next) = runner.process_next(&mut queue, &mem, &store, &device, Some(&mut defer)) {
        if next == Next::Empty {
            break;
        }
    }
    for mut request in deferred {
        runner.execute(&mut request, &mem, &store, &device, &OnQueueThread);
        let _ = runner.complete(&mut queue, &mem, &store, request);
    }
    store
        .check_consistency()
        .expect("the store stays consistent");
});
