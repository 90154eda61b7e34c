// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The engine: batches of pages through one work queue, with every failure recovered in
//! software.
//!
//! A batch of up to [`MAX_BATCH`] pages is submitted whole before any completion is polled
//! (the zswap batching series' `IAA_CRYPTO_MAX_BATCH_SIZE`), then the completion records are
//! swept round-robin until all are written. Per page:
//! - success: the CRC the device reports is checked against the page's own CRC-32, then the
//!   output is copied out of the engine's DMA buffer;
//! - a compress that does not fit (status 0x0A with error 0x19, or 0x0B): the page is
//!   incompressible and the caller stores it raw, as iaa_crypto returns `-E2BIG`;
//! - busy beyond the retry budget, a page fault, the watchdog, a wrong CRC, any other error:
//!   the page is done in software, in the same format, so the result does not depend on
//!   where it was made (iaa_crypto falls back to software deflate the same way);
//! - no status within the timeout (after a bounded spin, as iaa_crypto's
//!   `IAA_COMPLETION_TIMEOUT` polls): the device is declared broken and the engine works in
//!   software for good. The batch's DMA memory is leaked, never reused, since the device may
//!   still write it.
//!
//! Descriptor errors that can only come from a wrong descriptor (bad opcode, invalid flags
//! or size, misaligned record or AECS) also declare the device broken: they would recur on
//! every page.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::aecs::{CompressAecs, COMPRESS_AECS_SIZE};
use crate::deflate::{self, InflateError};
use crate::dma::{CompletionRecords, DmaBuffer};
use crate::hw::{
    compression_flags, error_code, opcode, status, CompletionRecord, Descriptor,
    COMPRESS_DESCRIPTOR_FLAGS, COMPRESS_DYNAMIC_DESCRIPTOR_FLAGS, COMPRESS_FLAGS_FIXED,
    DECOMPRESS_DESCRIPTOR_FLAGS, DECOMPRESS_FLAGS,
};
use crate::portal::{submit_with_retry, Portal, RetryPolicy, Submitted};
use crate::PAGE_SIZE;

const PAGE_SIZE_U32: u32 = 4096;
const AECS_SIZE: u32 = 1568;
const _: () =
    assert!(PAGE_SIZE_U32 as usize == PAGE_SIZE && AECS_SIZE as usize == COMPRESS_AECS_SIZE);

/// The most pages one batch submits before polling.
pub const MAX_BATCH: usize = 8;
/// Each destination buffer holds two pages, as iaa_crypto's batching allocates.
pub const DST_CAPACITY: usize = 2 * PAGE_SIZE;

/// Which Huffman coding the device uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum HuffmanMode {
    /// The RFC 1951 fixed code through the AECS: every IAA generation.
    #[default]
    Fixed,
    /// Per-page dynamic Huffman tables built by the device: IAA generation 2, better ratio.
    Dynamic,
}

impl HuffmanMode {
    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            HuffmanMode::Fixed => "fixed",
            HuffmanMode::Dynamic => "dynamic",
        }
    }
}

/// Tuning of an engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// The Huffman mode.
    pub mode: HuffmanMode,
    /// Retrying a busy queue.
    pub retry: RetryPolicy,
    /// Sweeps over the pending status bytes with only a spin hint in between, before the
    /// waiter starts yielding the CPU.
    pub spin_sweeps: u32,
    /// How long a batch waits for its completions before the device is declared broken.
    pub completion_timeout: Duration,
    /// Whether decompression goes to the device; otherwise straight to the software
    /// inflater (the software queue would only add a thread hop).
    pub decompress_on_device: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            mode: HuffmanMode::Fixed,
            retry: RetryPolicy::default(),
            spin_sweeps: 100_000,
            completion_timeout: Duration::from_secs(1),
            decompress_on_device: true,
        }
    }
}

/// The page does not compress into the destination: store it raw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the page does not compress into {limit} bytes")]
pub struct Incompressible {
    /// The destination's size.
    pub limit: usize,
}

/// What one page's compression gave: the compressed length, or [`Incompressible`].
pub type CompressResult = Result<usize, Incompressible>;

/// A status byte, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceStatus {
    /// Not written yet.
    Pending,
    /// Success.
    Success,
    /// A page fault; `write` when it was on the destination.
    PageFault {
        /// Bit 7 of the status.
        write: bool,
    },
    /// An analytics error with this error code.
    AnalyticsError(u8),
    /// The output did not fit.
    OutputOverflow,
    /// The device's watchdog stopped the operation.
    Watchdog,
    /// A status only a malformed descriptor causes.
    DescriptorError(u8),
    /// A status this crate does not know.
    Unknown(u8),
}

impl DeviceStatus {
    /// Decodes the status byte (bit 7 is the write bit of a page fault).
    pub fn from_byte(byte: u8) -> DeviceStatus {
        match byte & crate::hw::STATUS_MASK {
            status::PENDING => DeviceStatus::Pending,
            status::SUCCESS => DeviceStatus::Success,
            status::PAGE_FAULT => DeviceStatus::PageFault {
                write: byte & 0x80 != 0,
            },
            status::ANALYTICS_ERROR => DeviceStatus::AnalyticsError(0),
            status::OUTPUT_OVERFLOW => DeviceStatus::OutputOverflow,
            status::WATCHDOG => DeviceStatus::Watchdog,
            code @ (status::BAD_OPCODE
            | status::INVALID_FLAGS
            | status::INVALID_SIZE
            | status::COMPLETION_MISALIGNED
            | status::AECS_MISALIGNED) => DeviceStatus::DescriptorError(code),
            code => DeviceStatus::Unknown(code),
        }
    }

    /// Decodes a whole record's status and error code.
    pub fn of(record: &CompletionRecord) -> DeviceStatus {
        match DeviceStatus::from_byte(record.status) {
            DeviceStatus::AnalyticsError(_) => DeviceStatus::AnalyticsError(record.error_code),
            other => other,
        }
    }
}

/// Why a page was done in software.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FallbackReason {
    Busy,
    PageFault,
    Watchdog,
    BadCrc,
    DeviceError,
    Broken,
}

/// Counters of an engine's work.
#[derive(Debug, Default)]
struct Counters {
    submitted: AtomicU64,
    device_compressed: AtomicU64,
    device_incompressible: AtomicU64,
    device_decompressed: AtomicU64,
    busy_retries: AtomicU64,
    fallback_busy: AtomicU64,
    fallback_page_fault: AtomicU64,
    fallback_watchdog: AtomicU64,
    fallback_bad_crc: AtomicU64,
    fallback_device_error: AtomicU64,
    fallback_broken: AtomicU64,
    fallback_decompress: AtomicU64,
    timeouts: AtomicU64,
}

/// A snapshot of an engine's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Descriptors the queue accepted.
    pub submitted: u64,
    /// Pages the device compressed.
    pub device_compressed: u64,
    /// Pages the device found incompressible.
    pub device_incompressible: u64,
    /// Pages the device decompressed.
    pub device_decompressed: u64,
    /// Busy answers retried.
    pub busy_retries: u64,
    /// Pages done in software because the queue stayed busy.
    pub fallback_busy: u64,
    /// Pages done in software after a page fault.
    pub fallback_page_fault: u64,
    /// Pages done in software after the watchdog fired.
    pub fallback_watchdog: u64,
    /// Pages done in software after a wrong CRC.
    pub fallback_bad_crc: u64,
    /// Pages done in software after another device error.
    pub fallback_device_error: u64,
    /// Pages done in software because the device was declared broken.
    pub fallback_broken: u64,
    /// Decompressions the device was asked for but the software inflater did.
    pub fallback_decompress: u64,
    /// Completions that never arrived.
    pub timeouts: u64,
    /// Whether the device was declared broken.
    pub broken: bool,
}

/// DMA memory for one batch: completion records, sources and destinations. Everything a
/// descriptor names lives here (or is the process-wide AECS), so a batch whose completion
/// never arrives leaks only this, and the device never touches the caller's memory after the
/// call returns. Moving this value does not move the memory (each part is its own
/// allocation).
#[derive(Debug)]
struct BatchMemory {
    records: CompletionRecords,
    src: Vec<DmaBuffer>,
    dst: Vec<DmaBuffer>,
}

/// The largest compressed object the device is asked to decompress (larger ones are
/// inflated in software; the store keeps pages that compress worse than this raw anyway).
const SRC_CAPACITY: usize = 2 * PAGE_SIZE;

impl BatchMemory {
    fn new() -> BatchMemory {
        let buffers = |len| {
            (0..MAX_BATCH)
                .map(|_| DmaBuffer::new(len, PAGE_SIZE))
                .collect()
        };
        BatchMemory {
            records: CompletionRecords::new(MAX_BATCH),
            src: buffers(SRC_CAPACITY),
            dst: buffers(DST_CAPACITY),
        }
    }

    /// Copies `data` into source buffer `index` and returns its address.
    fn load_source(&mut self, index: usize, data: &[u8]) -> u64 {
        // SAFETY: this memory is not in flight: it came from the pool (returned only after
        // every operation naming it completed) or was just allocated.
        let buffer = unsafe { self.src[index].bytes_mut() };
        buffer[..data.len()].copy_from_slice(data);
        self.src[index].addr()
    }

    /// Gives the memory up for good: the device may still read or write it.
    fn leak(self) {
        let BatchMemory { records, src, dst } = self;
        records.leak();
        src.into_iter().chain(dst).for_each(DmaBuffer::leak);
    }
}

/// Where one page of a batch stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Submitted; its status is not written yet.
    Waiting,
    /// Finished (by the device or decided incompressible).
    Done,
    /// To be done in software.
    Software(FallbackReason),
}

/// The completion sweep gave up.
#[derive(Debug)]
struct TimedOut;

/// Pages through one work queue (hardware or software), with software fallback.
#[derive(Debug)]
pub struct Engine {
    portal: Box<dyn Portal>,
    config: EngineConfig,
    aecs: &'static CompressAecs,
    memory: Mutex<Vec<BatchMemory>>,
    /// Descriptors that may still be put in flight (a dedicated WQ gives no feedback).
    credits: AtomicUsize,
    broken: AtomicBool,
    counters: Counters,
}

impl Engine {
    /// An engine submitting to `portal`.
    pub fn new(portal: Box<dyn Portal>, config: EngineConfig) -> Engine {
        let credits = portal.capacity().max(1);
        Engine {
            portal,
            config,
            aecs: CompressAecs::fixed_shared(),
            memory: Mutex::new(Vec::new()),
            credits: AtomicUsize::new(credits),
            broken: AtomicBool::new(false),
            counters: Counters::default(),
        }
    }

    /// The queue this engine submits to.
    pub fn describe(&self) -> String {
        self.portal.describe()
    }

    /// The Huffman mode.
    pub fn mode(&self) -> HuffmanMode {
        self.config.mode
    }

    /// The queue, for fault injection in tests.
    pub fn portal(&self) -> &dyn Portal {
        &*self.portal
    }

    /// Whether the device was declared broken (everything runs in software since).
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> EngineStats {
        let c = &self.counters;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        EngineStats {
            submitted: get(&c.submitted),
            device_compressed: get(&c.device_compressed),
            device_incompressible: get(&c.device_incompressible),
            device_decompressed: get(&c.device_decompressed),
            busy_retries: get(&c.busy_retries),
            fallback_busy: get(&c.fallback_busy),
            fallback_page_fault: get(&c.fallback_page_fault),
            fallback_watchdog: get(&c.fallback_watchdog),
            fallback_bad_crc: get(&c.fallback_bad_crc),
            fallback_device_error: get(&c.fallback_device_error),
            fallback_broken: get(&c.fallback_broken),
            fallback_decompress: get(&c.fallback_decompress),
            timeouts: get(&c.timeouts),
            broken: self.is_broken(),
        }
    }

    fn count_fallback(&self, reason: FallbackReason) {
        let c = &self.counters;
        let counter = match reason {
            FallbackReason::Busy => &c.fallback_busy,
            FallbackReason::PageFault => &c.fallback_page_fault,
            FallbackReason::Watchdog => &c.fallback_watchdog,
            FallbackReason::BadCrc => &c.fallback_bad_crc,
            FallbackReason::DeviceError => &c.fallback_device_error,
            FallbackReason::Broken => &c.fallback_broken,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn declare_broken(&self, why: &str) {
        if !self.broken.swap(true, Ordering::AcqRel) {
            log::error!(
                "IAA: {why} on {}; the device is considered broken and every page is \
                 compressed in software from now on",
                self.portal.describe()
            );
        }
    }

    fn take_memory(&self) -> BatchMemory {
        let pooled = self
            .memory
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        pooled.unwrap_or_else(BatchMemory::new)
    }

    fn return_memory(&self, memory: BatchMemory) {
        self.memory
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(memory);
    }

    fn take_credit(&self) -> bool {
        self.credits
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| c.checked_sub(1))
            .is_ok()
    }

    fn return_credit(&self) {
        self.credits.fetch_add(1, Ordering::AcqRel);
    }

    /// Compresses `page` in software, in this engine's format.
    pub fn compress_in_software(&self, page: &[u8; PAGE_SIZE], dst: &mut [u8]) -> CompressResult {
        let limit = dst.len();
        match self.config.mode {
            HuffmanMode::Fixed => deflate::compress_with_aecs(self.aecs, page, dst),
            HuffmanMode::Dynamic => deflate::compress_dynamic(page, dst),
        }
        .map_err(|_| Incompressible { limit })
    }

    /// The descriptor compressing the page at `src` into `dst` (`max_dst` bytes); `submit`
    /// fills in the completion record.
    fn compress_descriptor(&self, src: u64, dst: u64, max_dst: usize) -> Descriptor {
        let (flags, op_flags, src2_addr, src2_size) = match self.config.mode {
            HuffmanMode::Fixed => (
                COMPRESS_DESCRIPTOR_FLAGS,
                COMPRESS_FLAGS_FIXED,
                self.aecs as *const CompressAecs as u64,
                AECS_SIZE,
            ),
            HuffmanMode::Dynamic => (
                COMPRESS_DYNAMIC_DESCRIPTOR_FLAGS,
                COMPRESS_FLAGS_FIXED | compression_flags::DYNAMIC_HUFFMAN,
                0,
                0,
            ),
        };
        Descriptor {
            pasid_priv: 0,
            flags_opcode: Descriptor::pack_flags_opcode(flags, opcode::COMPRESS),
            completion_addr: 0,
            src1_addr: src,
            dst_addr: dst,
            src1_size: PAGE_SIZE_U32,
            int_handle: 0,
            op_flags,
            src2_addr,
            max_dst_size: u32::try_from(max_dst).unwrap_or(u32::MAX),
            src2_size,
            filter_flags: 0,
            num_inputs: 0,
        }
    }

    /// Submits `descs[i]` with completion record `i` of `memory`, setting `slots[i]`: the
    /// whole batch in one [`Portal::submit_many`] call where the portal can (one `write()`),
    /// then the descriptors the queue refused one by one with retries.
    fn submit_all(&self, memory: &mut BatchMemory, descs: &[Descriptor], slots: &mut [Slot]) {
        if self.is_broken() {
            slots.fill(Slot::Software(FallbackReason::Broken));
            return;
        }
        let mut ready = [Descriptor::default(); MAX_BATCH];
        let mut owner = [0usize; MAX_BATCH];
        let mut count = 0;
        for (index, desc) in descs.iter().enumerate() {
            if !self.take_credit() {
                slots[index] = Slot::Software(FallbackReason::Busy);
                continue;
            }
            // SAFETY: this memory is not in flight: it came from the pool (returned only
            // after every record it holds completed) or was just allocated.
            unsafe { memory.records.reset(index) };
            ready[count] = Descriptor {
                completion_addr: memory.records.addr(index),
                ..*desc
            };
            owner[count] = index;
            count += 1;
        }
        // SAFETY: the descriptors name only this batch's sources, destinations and completion
        // records (owned by `memory`, which is returned to the pool only after every record
        // completed, and leaked if one never does) and the process-wide AECS (never freed).
        let taken = match unsafe { self.portal.submit_many(&ready[..count]) } {
            Ok(taken) => taken.min(count),
            Err(error) => {
                self.declare_broken(&format!("submitting descriptors failed ({error})"));
                for &index in &owner[..count] {
                    self.return_credit();
                    slots[index] = Slot::Software(FallbackReason::Broken);
                }
                return;
            }
        };
        self.counters
            .submitted
            .fetch_add(taken as u64, Ordering::Relaxed);
        if taken < count {
            // The queue refused descriptor `taken`: one busy answer.
            self.counters.busy_retries.fetch_add(1, Ordering::Relaxed);
        }
        for &index in &owner[..taken] {
            slots[index] = Slot::Waiting;
        }
        for (desc, &index) in ready[taken..count].iter().zip(&owner[taken..count]) {
            slots[index] = self.submit_retrying(desc);
        }
    }

    /// Submits one descriptor the queue refused at first, retrying while it is busy; a credit
    /// is already held for it.
    fn submit_retrying(&self, desc: &Descriptor) -> Slot {
        if self.is_broken() {
            self.return_credit();
            return Slot::Software(FallbackReason::Broken);
        }
        // SAFETY: as in `submit_all`, which built `desc`.
        let submitted = unsafe { submit_with_retry(&*self.portal, desc, self.config.retry) };
        match submitted {
            Ok((Submitted::Accepted, busy)) => {
                self.counters.submitted.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .busy_retries
                    .fetch_add(u64::from(busy), Ordering::Relaxed);
                Slot::Waiting
            }
            Ok((Submitted::Busy, busy)) => {
                self.return_credit();
                self.counters
                    .busy_retries
                    .fetch_add(u64::from(busy), Ordering::Relaxed);
                Slot::Software(FallbackReason::Busy)
            }
            Err(error) => {
                self.return_credit();
                self.declare_broken(&format!("submitting a descriptor failed ({error})"));
                Slot::Software(FallbackReason::Broken)
            }
        }
    }

    /// Sweeps the waiting slots' status bytes until every one is written, calling `done` with
    /// each record. Spins first, then yields, then gives up at the timeout.
    fn wait_all(
        &self,
        memory: &BatchMemory,
        slots: &mut [Slot],
        mut done: impl FnMut(usize, CompletionRecord) -> Slot,
    ) -> Result<(), TimedOut> {
        let start = Instant::now();
        let mut idle_sweeps = 0u32;
        loop {
            let mut waiting = false;
            let mut progressed = false;
            for (index, slot) in slots.iter_mut().enumerate() {
                if *slot != Slot::Waiting {
                    continue;
                }
                if memory.records.status(index) == status::PENDING {
                    waiting = true;
                    continue;
                }
                // SAFETY: the status is nonzero: the writer is done with the record.
                let record = unsafe { memory.records.read(index) };
                self.return_credit();
                *slot = done(index, record);
                progressed = true;
            }
            if !waiting {
                return Ok(());
            }
            if progressed {
                idle_sweeps = 0;
                continue;
            }
            idle_sweeps = idle_sweeps.saturating_add(1);
            if idle_sweeps < self.config.spin_sweeps {
                std::hint::spin_loop();
            } else if start.elapsed() >= self.config.completion_timeout {
                return Err(TimedOut);
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// What a compress record means for the page: done, incompressible, or software.
    fn finish_compress(
        &self,
        record: &CompletionRecord,
        page: &[u8; PAGE_SIZE],
        memory: &BatchMemory,
        index: usize,
        dst: &mut [u8],
        result: &mut CompressResult,
    ) -> Slot {
        match DeviceStatus::of(record) {
            DeviceStatus::Success => {
                let size = record.output_size as usize;
                if size > dst.len() || size > DST_CAPACITY {
                    self.declare_broken(&format!("the device reported {size} output bytes"));
                    return Slot::Software(FallbackReason::DeviceError);
                }
                if record.crc != deflate::crc32(page) {
                    return Slot::Software(FallbackReason::BadCrc);
                }
                // SAFETY: the record's status is nonzero: the device is done with the buffer.
                dst[..size].copy_from_slice(unsafe { memory.dst[index].bytes(size) });
                *result = Ok(size);
                self.counters
                    .device_compressed
                    .fetch_add(1, Ordering::Relaxed);
                Slot::Done
            }
            DeviceStatus::AnalyticsError(error_code::COMPRESS_OUTPUT_OVERFLOW)
            | DeviceStatus::OutputOverflow => {
                *result = Err(Incompressible { limit: dst.len() });
                self.counters
                    .device_incompressible
                    .fetch_add(1, Ordering::Relaxed);
                Slot::Done
            }
            DeviceStatus::PageFault { .. } => Slot::Software(FallbackReason::PageFault),
            DeviceStatus::Watchdog => Slot::Software(FallbackReason::Watchdog),
            DeviceStatus::AnalyticsError(_) | DeviceStatus::Unknown(_) => {
                Slot::Software(FallbackReason::DeviceError)
            }
            DeviceStatus::DescriptorError(code) => {
                self.declare_broken(&format!(
                    "a compress descriptor was refused with status {code:#04x}"
                ));
                Slot::Software(FallbackReason::DeviceError)
            }
            // Not reached: only written records are finished.
            DeviceStatus::Pending => Slot::Software(FallbackReason::DeviceError),
        }
    }

    /// Compresses up to [`MAX_BATCH`] pages at a time: `results[i]` receives page `i`'s
    /// compressed length in `dsts[i]`, or [`Incompressible`]. Longer slices are done in
    /// batches of [`MAX_BATCH`].
    pub fn compress_batch(
        &self,
        pages: &[&[u8; PAGE_SIZE]],
        dsts: &mut [&mut [u8]],
        results: &mut [CompressResult],
    ) {
        let n = pages.len().min(dsts.len()).min(results.len());
        let mut start = 0;
        while start < n {
            let end = (start + MAX_BATCH).min(n);
            self.compress_up_to_8(
                &pages[start..end],
                &mut dsts[start..end],
                &mut results[start..end],
            );
            start = end;
        }
    }

    fn compress_up_to_8(
        &self,
        pages: &[&[u8; PAGE_SIZE]],
        dsts: &mut [&mut [u8]],
        results: &mut [CompressResult],
    ) {
        let n = pages.len();
        let mut slots = [Slot::Software(FallbackReason::Broken); MAX_BATCH];
        let mut memory = self.take_memory();
        let mut descs = [Descriptor::default(); MAX_BATCH];
        for index in 0..n {
            let max_dst = dsts[index].len().min(DST_CAPACITY);
            let src = memory.load_source(index, pages[index]);
            descs[index] = self.compress_descriptor(src, memory.dst[index].addr(), max_dst);
        }
        self.submit_all(&mut memory, &descs[..n], &mut slots[..n]);
        let waited = self.wait_all(&memory, &mut slots[..n], |index, record| {
            self.finish_compress(
                &record,
                pages[index],
                &memory,
                index,
                dsts[index],
                &mut results[index],
            )
        });
        match waited {
            Ok(()) => self.return_memory(memory),
            Err(TimedOut) => {
                self.counters.timeouts.fetch_add(1, Ordering::Relaxed);
                self.declare_broken(&format!(
                    "no completion within {:?}",
                    self.config.completion_timeout
                ));
                memory.leak();
                for slot in &mut slots[..n] {
                    if *slot == Slot::Waiting {
                        *slot = Slot::Software(FallbackReason::Broken);
                    }
                }
            }
        }
        for index in 0..n {
            if let Slot::Software(reason) = slots[index] {
                self.count_fallback(reason);
                results[index] = self.compress_in_software(pages[index], dsts[index]);
            }
        }
    }

    /// Decompresses `src`, which must decode to exactly one page, into `page`: on the device
    /// when configured and healthy, in software otherwise or when the device fails.
    pub fn decompress(&self, src: &[u8], page: &mut [u8; PAGE_SIZE]) -> Result<(), InflateError> {
        let src_len = match u32::try_from(src.len()) {
            Ok(len)
                if self.config.decompress_on_device
                    && !self.is_broken()
                    && src.len() <= SRC_CAPACITY =>
            {
                len
            }
            Ok(_) | Err(_) => return deflate::inflate_page(src, page),
        };
        let mut memory = self.take_memory();
        let src_addr = memory.load_source(0, src);
        let desc = Descriptor {
            pasid_priv: 0,
            flags_opcode: Descriptor::pack_flags_opcode(
                DECOMPRESS_DESCRIPTOR_FLAGS,
                opcode::DECOMPRESS,
            ),
            completion_addr: 0,
            src1_addr: src_addr,
            dst_addr: memory.dst[0].addr(),
            src1_size: src_len,
            int_handle: 0,
            op_flags: DECOMPRESS_FLAGS,
            src2_addr: 0,
            max_dst_size: PAGE_SIZE_U32,
            src2_size: 0,
            filter_flags: 0,
            num_inputs: 0,
        };
        let mut slots = [Slot::Waiting];
        self.submit_all(&mut memory, &[desc], &mut slots);
        let mut decoded = false;
        let waited = self.wait_all(&memory, &mut slots, |_, record| {
            match DeviceStatus::of(&record) {
                DeviceStatus::Success if record.output_size as usize == PAGE_SIZE => {
                    // SAFETY: the status is nonzero: the device is done with the buffer.
                    page.copy_from_slice(unsafe { memory.dst[0].bytes(PAGE_SIZE) });
                    decoded = true;
                    Slot::Done
                }
                DeviceStatus::DescriptorError(code) => {
                    self.declare_broken(&format!(
                        "a decompress descriptor was refused with status {code:#04x}"
                    ));
                    Slot::Software(FallbackReason::DeviceError)
                }
                // Anything else (a short or overflowing stream, a page fault, the
                // watchdog): the software inflater decides, as iaa_crypto falls back.
                DeviceStatus::Success
                | DeviceStatus::PageFault { .. }
                | DeviceStatus::AnalyticsError(_)
                | DeviceStatus::OutputOverflow
                | DeviceStatus::Watchdog
                | DeviceStatus::Unknown(_)
                | DeviceStatus::Pending => Slot::Software(FallbackReason::DeviceError),
            }
        });
        match waited {
            Ok(()) => self.return_memory(memory),
            Err(TimedOut) => {
                self.counters.timeouts.fetch_add(1, Ordering::Relaxed);
                self.declare_broken(&format!(
                    "no completion within {:?}",
                    self.config.completion_timeout
                ));
                memory.leak();
            }
        }
        if decoded {
            self.counters
                .device_decompressed
                .fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.counters
            .fallback_decompress
            .fetch_add(1, Ordering::Relaxed);
        deflate::inflate_page(src, page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_bytes_decode_with_the_kernel_mask() {
        assert_eq!(DeviceStatus::from_byte(0x00), DeviceStatus::Pending);
        assert_eq!(DeviceStatus::from_byte(0x01), DeviceStatus::Success);
        assert_eq!(
            DeviceStatus::from_byte(0x03),
            DeviceStatus::PageFault { write: false }
        );
        assert_eq!(
            DeviceStatus::from_byte(0x83),
            DeviceStatus::PageFault { write: true }
        );
        assert_eq!(DeviceStatus::from_byte(0x0b), DeviceStatus::OutputOverflow);
        assert_eq!(DeviceStatus::from_byte(0x24), DeviceStatus::Watchdog);
        for code in [0x10, 0x11, 0x13, 0x1b, 0x1c] {
            assert_eq!(
                DeviceStatus::from_byte(code),
                DeviceStatus::DescriptorError(code)
            );
        }
        assert_eq!(DeviceStatus::from_byte(0x7e), DeviceStatus::Unknown(0x7e));
        let record = CompletionRecord {
            status: 0x0a,
            error_code: 0x19,
            ..CompletionRecord::default()
        };
        assert_eq!(
            DeviceStatus::of(&record),
            DeviceStatus::AnalyticsError(error_code::COMPRESS_OUTPUT_OVERFLOW)
        );
    }
}
