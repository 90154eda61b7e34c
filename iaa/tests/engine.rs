// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The engine and the software work queue together: batches round-trip, every injected fault
//! is recovered, the queue behaves like a device queue (bounded, out of order), and the
//! stream format is interchangeable with independent DEFLATE implementations.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use iaa::aecs::{CompressAecs, COMPRESS_AECS_SIZE};
use iaa::dma::{CompletionRecords, DmaBuffer};
use iaa::hw::{opcode, status, Descriptor, DECOMPRESS_DESCRIPTOR_FLAGS, DECOMPRESS_FLAGS};
use iaa::portal::{Portal, RetryPolicy, Submitted};
use iaa::soft::{Fault, SoftwareQueue, SoftwareQueueConfig};
use iaa::{
    CompressResult, Engine, EngineConfig, HuffmanMode, Incompressible, MAX_BATCH, PAGE_SIZE,
};

type Page = [u8; PAGE_SIZE];

/// Deterministic pages: text, pointer-like records, zeros with a little data, random.
fn page(kind: usize, seed: u64) -> Box<Page> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut page = Box::new([0u8; PAGE_SIZE]);
    match kind % 4 {
        0 => {
            let words: [&[u8]; 8] = [
                b"swap ", b"page ", b"the ", b"memory ", b"of ", b"a ", b"guest ", b"zram, ",
            ];
            let mut at = 0;
            while at < PAGE_SIZE {
                let word = words[(next() % 8) as usize];
                let n = word.len().min(PAGE_SIZE - at);
                page[at..at + n].copy_from_slice(&word[..n]);
                at += n;
            }
        }
        1 => {
            for record in page.chunks_mut(32) {
                record[..8]
                    .copy_from_slice(&(0x7f00_0000_0000u64 + (next() % 4096) * 64).to_le_bytes());
                record[8..12].copy_from_slice(&((next() % 100) as u32).to_le_bytes());
            }
        }
        2 => {
            for byte in page[100..300].iter_mut() {
                *byte = next().to_le_bytes()[0];
            }
        }
        _ => {
            for chunk in page.chunks_mut(8) {
                chunk.copy_from_slice(&next().to_le_bytes());
            }
        }
    }
    page
}

fn software_engine(mode: HuffmanMode, config: EngineConfig) -> (Engine, *const SoftwareQueue) {
    let queue = Box::new(
        SoftwareQueue::new(SoftwareQueueConfig {
            depth: 32,
            workers: 2,
        })
        .unwrap(),
    );
    let queue_ptr: *const SoftwareQueue = &*queue;
    let engine = Engine::new(queue, EngineConfig { mode, ..config });
    (engine, queue_ptr)
}

/// The engine's software queue, for fault injection.
fn queue_of(engine: &Engine, queue: *const SoftwareQueue) -> &SoftwareQueue {
    assert_eq!(
        engine.portal() as *const dyn Portal as *const SoftwareQueue,
        queue
    );
    // SAFETY: `queue` points into the box the engine owns (checked just above), which lives
    // as long as the engine, and the returned reference borrows the engine.
    unsafe { &*queue }
}

struct Batch {
    pages: Vec<Box<Page>>,
    dsts: Vec<Vec<u8>>,
    results: Vec<CompressResult>,
}

fn run_batch(engine: &Engine, kinds: &[usize], seed: u64) -> Batch {
    let pages: Vec<Box<Page>> = kinds
        .iter()
        .enumerate()
        .map(|(i, &k)| page(k, seed + i as u64))
        .collect();
    let mut dsts: Vec<Vec<u8>> = pages.iter().map(|_| vec![0u8; 2 * PAGE_SIZE]).collect();
    let mut results: Vec<CompressResult> = vec![Ok(0); pages.len()];
    let page_refs: Vec<&Page> = pages.iter().map(|p| &**p).collect();
    let mut dst_refs: Vec<&mut [u8]> = dsts.iter_mut().map(|d| &mut d[..]).collect();
    engine.compress_batch(&page_refs, &mut dst_refs, &mut results);
    Batch {
        pages,
        dsts,
        results,
    }
}

/// Every compressed page decodes, with an independent inflater, to exactly the original.
/// A stream that decodes to exactly one page cannot reach back further than 4095 bytes (a
/// reference before the start of the output is invalid), so it is also within IAA's 4 KiB
/// decompression history: the device decodes whatever passes this check.
fn assert_round_trips(batch: &Batch) {
    for (i, result) in batch.results.iter().enumerate() {
        let n = result.unwrap_or_else(|e| panic!("page {i}: {e}"));
        let decoded = miniz_oxide::inflate::decompress_to_vec(&batch.dsts[i][..n]).unwrap();
        assert_eq!(decoded.len(), PAGE_SIZE, "page {i}");
        assert!(decoded[..] == batch.pages[i][..], "page {i} differs");
    }
}

const MIX: [usize; 8] = [0, 1, 2, 3, 0, 1, 2, 0];

#[test]
fn a_batch_of_8_round_trips_through_the_software_queue_in_both_modes() {
    for mode in [HuffmanMode::Fixed, HuffmanMode::Dynamic] {
        let (engine, _) = software_engine(mode, EngineConfig::default());
        let batch = run_batch(&engine, &MIX, 1);
        assert_round_trips(&batch);
        let stats = engine.stats();
        assert_eq!(stats.submitted, 8, "{mode:?}");
        assert_eq!(stats.device_compressed, 8, "{mode:?}");
        // Decompression through the queue, too.
        for (i, result) in batch.results.iter().enumerate() {
            let mut out = [0u8; PAGE_SIZE];
            engine
                .decompress(&batch.dsts[i][..result.unwrap()], &mut out)
                .unwrap();
            assert!(out[..] == batch.pages[i][..]);
        }
        assert_eq!(engine.stats().device_decompressed, 8);
    }
}

#[test]
fn fixed_mode_writes_one_final_fixed_huffman_block() {
    let (engine, _) = software_engine(HuffmanMode::Fixed, EngineConfig::default());
    let batch = run_batch(&engine, &[0], 2);
    // BFINAL = 1, BTYPE = 01 in the first three bits, as the AECS's accumulator says.
    assert_eq!(batch.dsts[0][0] & 0b111, 0b011);
}

#[test]
fn dynamic_mode_compresses_better_than_fixed() {
    let kinds: Vec<usize> = (0..64).map(|i| [0, 1, 2][i % 3]).collect();
    let total = |mode| {
        let (engine, _) = software_engine(mode, EngineConfig::default());
        let batch = run_batch(&engine, &kinds, 3);
        assert_round_trips(&batch);
        batch.results.iter().map(|r| r.unwrap()).sum::<usize>()
    };
    let (fixed, dynamic) = (total(HuffmanMode::Fixed), total(HuffmanMode::Dynamic));
    assert!(dynamic < fixed, "dynamic {dynamic} vs fixed {fixed}");
}

#[test]
fn more_than_8_pages_go_in_batches_of_8() {
    let (engine, _) = software_engine(HuffmanMode::Fixed, EngineConfig::default());
    let kinds: Vec<usize> = (0..19).map(|i| i % 3).collect();
    let batch = run_batch(&engine, &kinds, 4);
    assert_round_trips(&batch);
    assert_eq!(engine.stats().device_compressed, 19);
    assert_eq!(MAX_BATCH, 8);
}

#[test]
fn an_incompressible_page_is_reported_not_stored() {
    let (engine, _) = software_engine(HuffmanMode::Fixed, EngineConfig::default());
    let random = page(3, 5);
    let mut dst = vec![0u8; PAGE_SIZE];
    let mut results = [Ok(0)];
    engine.compress_batch(&[&random], &mut [&mut dst[..]], &mut results);
    assert_eq!(results[0], Err(Incompressible { limit: PAGE_SIZE }));
    assert_eq!(engine.stats().device_incompressible, 1);
}

#[test]
fn injected_output_overflow_makes_the_page_incompressible() {
    let (engine, queue) = software_engine(HuffmanMode::Fixed, EngineConfig::default());
    queue_of(&engine, queue).inject(Fault::OutputOverflow);
    let batch = run_batch(&engine, &[0, 1], 6);
    assert_eq!(
        batch.results[0],
        Err(Incompressible {
            limit: 2 * PAGE_SIZE
        })
    );
    assert!(batch.results[1].is_ok());
    assert_eq!(engine.stats().device_incompressible, 1);
}

/// Injects `fault` into the first page of a batch and checks that every page still comes out
/// right and that `counter` counted exactly one fallback.
fn fault_is_recovered_in_software(fault: Fault, counter: fn(&iaa::EngineStats) -> u64) {
    let (engine, queue) = software_engine(HuffmanMode::Fixed, EngineConfig::default());
    queue_of(&engine, queue).inject(fault);
    let batch = run_batch(&engine, &MIX, 7);
    assert_round_trips(&batch);
    let stats = engine.stats();
    assert_eq!(counter(&stats), 1, "{fault:?}: {stats:?}");
    assert_eq!(stats.device_compressed, 7, "{fault:?}");
    assert!(!stats.broken);
}

#[test]
fn a_page_fault_part_way_is_redone_in_software() {
    fault_is_recovered_in_software(
        Fault::PageFault {
            bytes_completed: 1024,
        },
        |s| s.fallback_page_fault,
    );
}

#[test]
fn a_watchdog_timeout_is_redone_in_software() {
    fault_is_recovered_in_software(Fault::Watchdog, |s| s.fallback_watchdog);
}

#[test]
fn a_wrong_crc_is_caught_and_redone_in_software() {
    fault_is_recovered_in_software(Fault::BadCrc, |s| s.fallback_bad_crc);
}

#[test]
fn a_briefly_busy_queue_is_retried() {
    let (engine, queue) = software_engine(HuffmanMode::Fixed, EngineConfig::default());
    queue_of(&engine, queue).inject(Fault::Busy { times: 5 });
    let batch = run_batch(&engine, &MIX, 8);
    assert_round_trips(&batch);
    let stats = engine.stats();
    assert_eq!(stats.busy_retries, 5);
    assert_eq!(stats.device_compressed, 8);
}

#[test]
fn a_queue_that_stays_busy_sends_pages_to_software() {
    let config = EngineConfig {
        retry: RetryPolicy {
            spins: 2,
            deadline: Duration::from_millis(1),
        },
        ..EngineConfig::default()
    };
    let (engine, queue) = software_engine(HuffmanMode::Fixed, config);
    queue_of(&engine, queue).inject(Fault::Busy { times: u32::MAX });
    let batch = run_batch(&engine, &MIX, 9);
    assert_round_trips(&batch);
    let stats = engine.stats();
    assert_eq!(stats.fallback_busy, 8);
    assert_eq!(stats.submitted, 0);
    assert!(!stats.broken, "a busy queue is not a broken one");
}

#[test]
fn a_status_that_never_arrives_breaks_the_device_for_good() {
    let config = EngineConfig {
        spin_sweeps: 1000,
        completion_timeout: Duration::from_millis(50),
        ..EngineConfig::default()
    };
    let (engine, queue) = software_engine(HuffmanMode::Fixed, config);
    queue_of(&engine, queue).inject(Fault::NeverComplete);
    let start = Instant::now();
    let batch = run_batch(&engine, &MIX, 10);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "the wait is bounded"
    );
    assert_round_trips(&batch);
    let stats = engine.stats();
    assert!(stats.broken);
    assert_eq!(stats.timeouts, 1);
    assert_eq!(stats.fallback_broken, 1, "only the lost page: {stats:?}");
    // From now on nothing goes to the device, and everything still works.
    let again = run_batch(&engine, &MIX, 11);
    assert_round_trips(&again);
    assert_eq!(engine.stats().submitted, stats.submitted);
    let mut out = [0u8; PAGE_SIZE];
    engine
        .decompress(&again.dsts[0][..again.results[0].unwrap()], &mut out)
        .unwrap();
    assert!(out[..] == again.pages[0][..]);
}

#[test]
fn a_decompress_fault_falls_back_to_the_software_inflater() {
    let (engine, queue) = software_engine(HuffmanMode::Fixed, EngineConfig::default());
    let batch = run_batch(&engine, &[0], 12);
    let stream = &batch.dsts[0][..batch.results[0].unwrap()];
    for fault in [
        Fault::PageFault {
            bytes_completed: 10,
        },
        Fault::Watchdog,
        Fault::OutputOverflow,
    ] {
        queue_of(&engine, queue).inject(fault);
        let mut out = [0u8; PAGE_SIZE];
        engine.decompress(stream, &mut out).unwrap();
        assert!(out[..] == batch.pages[0][..], "{fault:?}");
    }
    assert_eq!(engine.stats().fallback_decompress, 3);
}

#[test]
fn a_decompress_that_never_completes_breaks_the_device_and_still_decodes() {
    let config = EngineConfig {
        spin_sweeps: 100,
        completion_timeout: Duration::from_millis(20),
        ..EngineConfig::default()
    };
    let (engine, queue) = software_engine(HuffmanMode::Fixed, config);
    let batch = run_batch(&engine, &[1], 33);
    queue_of(&engine, queue).inject(Fault::NeverComplete);
    let mut out = [0u8; PAGE_SIZE];
    engine
        .decompress(&batch.dsts[0][..batch.results[0].unwrap()], &mut out)
        .unwrap();
    assert!(out[..] == batch.pages[0][..]);
    let stats = engine.stats();
    assert!(stats.broken);
    assert_eq!(stats.timeouts, 1);
}

#[test]
fn corrupt_or_short_streams_are_errors_not_panics() {
    let (engine, _) = software_engine(HuffmanMode::Fixed, EngineConfig::default());
    let mut out = [0u8; PAGE_SIZE];
    for junk in [&b""[..], &[0xffu8; 32][..], &[0x03, 0x00][..]] {
        assert!(engine.decompress(junk, &mut out).is_err(), "{junk:?}");
    }
}

#[test]
fn streams_from_independent_encoders_decode() {
    // Any valid raw DEFLATE: miniz_oxide at several levels (stored, fixed and dynamic
    // blocks) and a hand-made stored block.
    let (engine, _) = software_engine(HuffmanMode::Fixed, EngineConfig::default());
    for kind in 0..4 {
        let original = page(kind, 13);
        for level in [0u8, 1, 6, 10] {
            let stream = miniz_oxide::deflate::compress_to_vec(&original[..], level);
            let mut out = [0u8; PAGE_SIZE];
            engine.decompress(&stream, &mut out).unwrap();
            assert!(out[..] == original[..], "kind {kind} level {level}");
        }
    }
    let mut stored = vec![0x01, 0x00, 0x10, 0xff, 0xef];
    stored.extend_from_slice(&[0x5a; PAGE_SIZE]);
    let mut out = [0u8; PAGE_SIZE];
    engine.decompress(&stored, &mut out).unwrap();
    assert!(out.iter().all(|&b| b == 0x5a));
}

/// A portal whose every submission fails: the device is gone.
#[derive(Debug)]
struct GonePortal;

impl Portal for GonePortal {
    unsafe fn submit(&self, _: &Descriptor) -> io::Result<Submitted> {
        Err(io::Error::from_raw_os_error(libc_enodev()))
    }
    fn describe(&self) -> String {
        "a work queue that went away".into()
    }
    fn capacity(&self) -> usize {
        8
    }
}

fn libc_enodev() -> i32 {
    19
}

/// A portal that accepts everything and never completes anything.
#[derive(Debug, Default)]
struct SilentPortal {
    accepted: AtomicU32,
}

impl Portal for SilentPortal {
    unsafe fn submit(&self, _: &Descriptor) -> io::Result<Submitted> {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        Ok(Submitted::Accepted)
    }
    fn describe(&self) -> String {
        "a silent work queue".into()
    }
    fn capacity(&self) -> usize {
        128
    }
}

#[test]
fn a_submission_error_breaks_the_device_and_pages_still_compress() {
    let engine = Engine::new(Box::new(GonePortal), EngineConfig::default());
    let batch = run_batch(&engine, &MIX, 14);
    assert_round_trips(&batch);
    let stats = engine.stats();
    assert!(stats.broken);
    assert_eq!(stats.fallback_broken, 8);
}

#[test]
fn a_device_that_never_answers_times_out_once_then_is_bypassed() {
    let config = EngineConfig {
        spin_sweeps: 100,
        completion_timeout: Duration::from_millis(20),
        ..EngineConfig::default()
    };
    let engine = Engine::new(Box::new(SilentPortal::default()), config);
    let start = Instant::now();
    let batch = run_batch(&engine, &MIX, 15);
    assert_round_trips(&batch);
    let again = run_batch(&engine, &MIX, 16);
    assert_round_trips(&again);
    assert!(start.elapsed() < Duration::from_secs(5));
    let stats = engine.stats();
    assert_eq!(stats.timeouts, 1);
    assert_eq!(
        stats.submitted, 8,
        "the second batch never reached the device"
    );
    assert_eq!(stats.fallback_broken, 16);
}

#[test]
fn credits_bound_what_is_in_flight_on_a_queue_without_feedback() {
    // A silent queue of capacity 3: the first 3 pages are submitted, the others are done in
    // software at once rather than overrunning a dedicated WQ.
    #[derive(Debug, Default)]
    struct SmallSilent(SilentPortal);
    impl Portal for SmallSilent {
        unsafe fn submit(&self, desc: &Descriptor) -> io::Result<Submitted> {
            // SAFETY: forwarded; the inner portal touches nothing.
            unsafe { self.0.submit(desc) }
        }
        fn describe(&self) -> String {
            "small".into()
        }
        fn capacity(&self) -> usize {
            3
        }
    }
    let config = EngineConfig {
        spin_sweeps: 10,
        completion_timeout: Duration::from_millis(10),
        ..EngineConfig::default()
    };
    let engine = Engine::new(Box::new(SmallSilent::default()), config);
    let batch = run_batch(&engine, &MIX, 17);
    assert_round_trips(&batch);
    let stats = engine.stats();
    assert_eq!(stats.submitted, 3);
    assert_eq!(stats.fallback_busy, 5);
    assert_eq!(stats.fallback_broken, 3);
}

#[test]
fn the_software_queue_is_bounded_and_completes_out_of_order() {
    let queue = SoftwareQueue::new(SoftwareQueueConfig {
        depth: 8,
        workers: 1,
    })
    .unwrap();
    let records = CompletionRecords::new(8);
    let streams: Vec<Vec<u8>> = (0..8)
        .map(|k| miniz_oxide::deflate::compress_to_vec(&page(k % 3, 20 + k as u64)[..], 1))
        .collect();
    let dsts: Vec<DmaBuffer> = (0..8)
        .map(|_| DmaBuffer::new(PAGE_SIZE, PAGE_SIZE))
        .collect();
    queue.pause();
    for i in 0..8 {
        let desc = Descriptor {
            flags_opcode: Descriptor::pack_flags_opcode(
                DECOMPRESS_DESCRIPTOR_FLAGS,
                opcode::DECOMPRESS,
            ),
            completion_addr: records.addr(i),
            src1_addr: streams[i].as_ptr() as u64,
            src1_size: u32::try_from(streams[i].len()).unwrap(),
            dst_addr: dsts[i].addr(),
            max_dst_size: 4096,
            op_flags: DECOMPRESS_FLAGS,
            ..Descriptor::default()
        };
        // SAFETY: the streams, buffers and records outlive the queue's work: this test waits
        // for every status below before dropping anything.
        assert_eq!(unsafe { queue.submit(&desc) }.unwrap(), Submitted::Accepted);
    }
    // Full: the ninth is refused, as a full shared WQ refuses ENQCMD.
    let extra = Descriptor {
        completion_addr: records.addr(0),
        ..Descriptor::default()
    };
    // SAFETY: refused, so never executed.
    assert_eq!(unsafe { queue.submit(&extra) }.unwrap(), Submitted::Busy);
    assert!((0..8).all(|i| records.status(i) == status::PENDING));
    queue.resume();
    let deadline = Instant::now() + Duration::from_secs(10);
    while queue.in_flight() > 0 {
        assert!(Instant::now() < deadline);
        std::thread::yield_now();
    }
    for (i, dst) in dsts.iter().enumerate() {
        assert_eq!(records.status(i), status::SUCCESS);
        // SAFETY: the status is nonzero.
        let record = unsafe { records.read(i) };
        assert_eq!(record.output_size as usize, PAGE_SIZE);
        // SAFETY: completed.
        let out = unsafe { dst.bytes(PAGE_SIZE) };
        assert!(out[..] == page(i % 3, 20 + i as u64)[..]);
        assert_eq!(record.crc, iaa::deflate::crc32(out));
    }
    let order = queue.completion_order();
    let expected: Vec<u64> = (0..8).rev().map(|i| records.addr(i)).collect();
    assert_eq!(order, expected, "newest first: out of submission order");
}

#[test]
fn the_software_queue_refuses_a_misaligned_completion_record() {
    let queue = SoftwareQueue::new(SoftwareQueueConfig {
        depth: 4,
        workers: 1,
    })
    .unwrap();
    let desc = Descriptor {
        completion_addr: 0x1008,
        ..Descriptor::default()
    };
    // SAFETY: refused before anything is read.
    let error = unsafe { queue.submit(&desc) }.unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
}

/// A portal that records what it is given and refuses everything as busy.
#[derive(Debug, Default)]
struct RecordingPortal {
    calls: Mutex<Vec<Vec<Descriptor>>>,
}

impl Portal for RecordingPortal {
    unsafe fn submit(&self, desc: &Descriptor) -> io::Result<Submitted> {
        self.calls.lock().unwrap().push(vec![*desc]);
        Ok(Submitted::Busy)
    }
    unsafe fn submit_many(&self, descs: &[Descriptor]) -> io::Result<usize> {
        self.calls.lock().unwrap().push(descs.to_vec());
        Ok(0)
    }
    fn describe(&self) -> String {
        "recording".into()
    }
    fn capacity(&self) -> usize {
        64
    }
}

/// Runs `act` on an engine over a recording portal and returns the calls it made.
fn recorded(mode: HuffmanMode, act: impl FnOnce(&Engine)) -> Vec<Vec<Descriptor>> {
    let portal = Box::new(RecordingPortal::default());
    let calls: *const RecordingPortal = &*portal;
    let config = EngineConfig {
        mode,
        retry: RetryPolicy {
            spins: 0,
            deadline: Duration::ZERO,
        },
        ..EngineConfig::default()
    };
    let engine = Engine::new(portal, config);
    act(&engine);
    // SAFETY: the portal lives in the engine, which is still alive here.
    let calls = unsafe { &*calls }.calls.lock().unwrap().clone();
    calls
}

fn assert_batch_memory(batch: &[Descriptor]) {
    for (i, desc) in batch.iter().enumerate() {
        assert_eq!(desc.completion_addr % 64, 0, "completion record alignment");
        assert_eq!(desc.dst_addr % 4096, 0);
        assert_eq!(desc.pasid_priv, 0);
        assert_eq!(desc.int_handle, 0);
        for other in &batch[i + 1..] {
            assert_ne!(desc.completion_addr, other.completion_addr);
            assert_ne!(desc.dst_addr, other.dst_addr);
            assert_ne!(desc.src1_addr, other.src1_addr);
        }
    }
}

#[test]
fn fixed_mode_submits_the_batch_at_once_with_iaa_crypto_flags_and_the_aecs() {
    let calls = recorded(HuffmanMode::Fixed, |engine| {
        let batch = run_batch(engine, &MIX, 30);
        assert_round_trips(&batch);
        assert_eq!(engine.stats().fallback_busy, 8);
    });
    assert_eq!(calls[0].len(), 8, "one call for the whole batch");
    assert_batch_memory(&calls[0]);
    let aecs = CompressAecs::fixed_shared() as *const CompressAecs as u64;
    for desc in &calls[0] {
        assert_eq!(desc.opcode(), opcode::COMPRESS);
        assert_eq!(desc.flags(), 0x1010c);
        assert_eq!(desc.op_flags, 0x0006);
        assert_eq!(desc.src1_size, 4096);
        assert_eq!(desc.max_dst_size, 8192);
        assert_eq!(desc.src2_addr, aecs);
        assert_eq!(desc.src2_addr % 32, 0);
        assert_eq!(desc.src2_size as usize, COMPRESS_AECS_SIZE);
    }
    // Then each refused descriptor was retried once on its own.
    assert_eq!(calls.len(), 9);
    assert!(calls[1..].iter().all(|call| call.len() == 1));
}

#[test]
fn dynamic_mode_sets_the_dynamic_flags_and_no_aecs() {
    let calls = recorded(HuffmanMode::Dynamic, |engine| {
        assert_round_trips(&run_batch(engine, &MIX[..3], 31));
    });
    assert_eq!(calls[0].len(), 3);
    for desc in &calls[0] {
        assert_eq!(desc.opcode(), opcode::COMPRESS);
        assert_eq!(desc.flags(), 0x10c);
        assert_eq!(desc.op_flags, 0x3006);
        assert_eq!((desc.src2_addr, desc.src2_size), (0, 0));
    }
}

#[test]
fn decompress_descriptors_carry_iaa_crypto_flags() {
    let stream = miniz_oxide::deflate::compress_to_vec(&page(0, 32)[..], 6);
    let calls = recorded(HuffmanMode::Fixed, |engine| {
        let mut out = [0u8; PAGE_SIZE];
        engine.decompress(&stream, &mut out).unwrap();
        assert!(out[..] == page(0, 32)[..]);
        assert_eq!(engine.stats().fallback_decompress, 1);
    });
    let desc = calls[0][0];
    assert_eq!(desc.opcode(), opcode::DECOMPRESS);
    assert_eq!(desc.flags(), 0x10c);
    assert_eq!(desc.op_flags, 0x000f);
    assert_eq!(desc.src1_size as usize, stream.len());
    assert_eq!(desc.max_dst_size, 4096);
    assert_eq!((desc.src2_addr, desc.src2_size), (0, 0));
    assert_ne!(
        desc.src1_addr,
        stream.as_ptr() as u64,
        "the device reads a copy"
    );
}
