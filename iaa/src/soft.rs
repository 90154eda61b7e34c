// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A software work queue with the device's submit/poll semantics.
//!
//! It takes the same 64-byte descriptors through the same [`Portal`] trait, reads the source
//! and the AECS at the addresses they name, writes the destination and then the completion
//! record (status last, release ordering) from its own worker threads. Its depth is bounded:
//! a full queue answers [`Submitted::Busy`] as a full shared WQ answers ENQCMD. Workers take
//! the most recently queued descriptor first, so a batch completes out of order, as it may on
//! the device (whose engines run descriptors in parallel).
//!
//! The work is real: compress with an AECS runs [`crate::deflate::compress_with_aecs`] over
//! the AECS's own tables (so the fixed-mode output is what the hardware writes), dynamic
//! compress runs [`crate::deflate::compress_dynamic`], decompress inflates any raw DEFLATE.
//!
//! Faults can be injected ([`SoftwareQueue::inject`]) to exercise every recovery path of the
//! engine: a busy queue, an output overflow, a page fault part way, the device watchdog, a
//! wrong CRC, and a status that never arrives.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::aecs::COMPRESS_AECS_SIZE;
use crate::deflate::{self, DecompressFailure};
use crate::dma::{device_aecs, device_destination, device_source, write_completion};
use crate::hw::{
    compression_flags, error_code, flags, opcode, status, CompletionRecord, Descriptor, AECS_ALIGN,
    COMPLETION_ALIGN,
};
use crate::portal::{Portal, Submitted};

/// A fault the software queue injects instead of doing the work right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The next `times` submissions are refused as busy (a full shared WQ).
    Busy {
        /// How many submissions to refuse.
        times: u32,
    },
    /// The next operation overflows its destination: status 0x0A with error 0x19 for a
    /// compress, status 0x0B for a decompress.
    OutputOverflow,
    /// The next operation stops on a page fault after `bytes_completed` source bytes
    /// (status 0x03, the fault address inside the source).
    PageFault {
        /// Source bytes processed before the fault.
        bytes_completed: u32,
    },
    /// The next operation is stopped by the device watchdog (status 0x24).
    Watchdog,
    /// The next operation succeeds but reports a wrong CRC.
    BadCrc,
    /// The next operation's completion record is never written.
    NeverComplete,
}

/// Size and threads of a software queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SoftwareQueueConfig {
    /// The most descriptors queued or running at once.
    pub depth: usize,
    /// Worker threads (the device's engines).
    pub workers: usize,
}

impl Default for SoftwareQueueConfig {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        SoftwareQueueConfig {
            depth: 64,
            workers: cpus.clamp(1, 4),
        }
    }
}

#[derive(Debug)]
struct Job {
    desc: Descriptor,
    fault: Option<Fault>,
}

#[derive(Debug, Default)]
struct State {
    /// Queued jobs; workers take from the back.
    queued: Vec<Job>,
    /// Queued plus running.
    in_flight: usize,
    busy_left: u32,
    faults: VecDeque<Fault>,
    stopping: bool,
    paused: bool,
    /// Completion record addresses of the last [`COMPLETION_LOG`] completions, oldest first.
    completed: VecDeque<u64>,
}

/// How many completions [`SoftwareQueue::completion_order`] remembers.
pub const COMPLETION_LOG: usize = 64;

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    work: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A worker panicking cannot leave the state inconsistent (every update is a single
        // assignment), so a poisoned lock is still usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The software work queue. Dropping it stops its workers after the running descriptors;
/// queued ones never complete (their owners time out, as with a device that went away).
#[derive(Debug)]
pub struct SoftwareQueue {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    depth: usize,
}

impl SoftwareQueue {
    /// Starts a queue with `config.workers` threads.
    pub fn new(config: SoftwareQueueConfig) -> io::Result<SoftwareQueue> {
        let shared = Arc::new(Shared::default());
        let mut queue = SoftwareQueue {
            shared,
            workers: Vec::new(),
            depth: config.depth.max(1),
        };
        for index in 0..config.workers.max(1) {
            let shared = Arc::clone(&queue.shared);
            let worker = std::thread::Builder::new()
                .name(format!("iaa-soft-{index}"))
                .spawn(move || run_worker(&shared))?;
            queue.workers.push(worker);
        }
        Ok(queue)
    }

    /// Injects `fault` into the next submission (busy) or the next accepted operation.
    pub fn inject(&self, fault: Fault) {
        let mut state = self.shared.lock();
        match fault {
            Fault::Busy { times } => state.busy_left = state.busy_left.saturating_add(times),
            Fault::OutputOverflow
            | Fault::PageFault { .. }
            | Fault::Watchdog
            | Fault::BadCrc
            | Fault::NeverComplete => state.faults.push_back(fault),
        }
    }

    /// Descriptors queued or running.
    pub fn in_flight(&self) -> usize {
        self.shared.lock().in_flight
    }

    /// Stops the workers from starting new descriptors (submissions are still queued), so a
    /// test can fill the queue.
    pub fn pause(&self) {
        self.shared.lock().paused = true;
    }

    /// Lets the workers run again.
    pub fn resume(&self) {
        self.shared.lock().paused = false;
        self.shared.work.notify_all();
    }

    /// The completion record addresses of the latest completions (at most
    /// [`COMPLETION_LOG`]), in the order they were written.
    pub fn completion_order(&self) -> Vec<u64> {
        self.shared.lock().completed.iter().copied().collect()
    }
}

impl Drop for SoftwareQueue {
    fn drop(&mut self) {
        self.shared.lock().stopping = true;
        self.shared.work.notify_all();
        for worker in self.workers.drain(..) {
            // Each worker finishes at most its current descriptor: a bounded wait.
            let _ = worker.join();
        }
    }
}

impl Portal for SoftwareQueue {
    unsafe fn submit(&self, desc: &Descriptor) -> io::Result<Submitted> {
        // The kernel's write() path refuses a misaligned completion record the same way
        // (idxd_submit_user_descriptor).
        if !desc.completion_addr.is_multiple_of(COMPLETION_ALIGN as u64)
            || desc.completion_addr == 0
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the completion record address is not 64-byte aligned",
            ));
        }
        let mut state = self.shared.lock();
        if state.stopping {
            return Err(io::Error::other("the software work queue is stopping"));
        }
        if state.busy_left > 0 {
            state.busy_left -= 1;
            return Ok(Submitted::Busy);
        }
        if state.in_flight >= self.depth {
            return Ok(Submitted::Busy);
        }
        let fault = state.faults.pop_front();
        state.queued.push(Job { desc: *desc, fault });
        state.in_flight += 1;
        drop(state);
        self.shared.work.notify_one();
        Ok(Submitted::Accepted)
    }

    fn describe(&self) -> String {
        format!(
            "software work queue ({} workers, depth {})",
            self.workers.len(),
            self.depth
        )
    }

    fn capacity(&self) -> usize {
        self.depth
    }
}

fn run_worker(shared: &Shared) {
    loop {
        let job = {
            let mut state = shared.lock();
            loop {
                if state.stopping {
                    return;
                }
                if !state.paused {
                    if let Some(job) = state.queued.pop() {
                        break job;
                    }
                }
                state = shared
                    .work
                    .wait(state)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
        };
        let record = execute(&job.desc, job.fault);
        if let Some(record) = record {
            // SAFETY: the submitter's contract (`Portal::submit`): the completion record is
            // live, aligned (checked at submit) and not complete yet.
            unsafe { write_completion(job.desc.completion_addr, &record) };
        }
        let mut state = shared.lock();
        state.in_flight -= 1;
        if record.is_some() {
            if state.completed.len() == COMPLETION_LOG {
                state.completed.pop_front();
            }
            state.completed.push_back(job.desc.completion_addr);
        }
    }
}

/// Runs one descriptor; `None` when its completion must never arrive.
fn execute(desc: &Descriptor, fault: Option<Fault>) -> Option<CompletionRecord> {
    let failed = |status: u8| CompletionRecord {
        status,
        ..CompletionRecord::default()
    };
    match fault {
        // Busy faults are taken at submission and never queued with a job.
        None | Some(Fault::BadCrc) | Some(Fault::Busy { .. }) => {}
        Some(Fault::NeverComplete) => return None,
        Some(Fault::Watchdog) => return Some(failed(status::WATCHDOG)),
        Some(Fault::PageFault { bytes_completed }) => {
            return Some(CompletionRecord {
                status: status::PAGE_FAULT,
                bytes_completed,
                fault_addr: desc.src1_addr + u64::from(bytes_completed),
                ..CompletionRecord::default()
            })
        }
        Some(Fault::OutputOverflow) => {
            return Some(if desc.opcode() == opcode::COMPRESS {
                CompletionRecord {
                    status: status::ANALYTICS_ERROR,
                    error_code: error_code::COMPRESS_OUTPUT_OVERFLOW,
                    ..CompletionRecord::default()
                }
            } else {
                failed(status::OUTPUT_OVERFLOW)
            })
        }
    }
    let mut record = match desc.opcode() {
        opcode::COMPRESS => execute_compress(desc),
        opcode::DECOMPRESS => execute_decompress(desc),
        opcode::NOOP => failed(status::SUCCESS),
        _ => failed(status::BAD_OPCODE),
    };
    if fault == Some(Fault::BadCrc) {
        record.crc ^= 0xffff_ffff;
    }
    Some(record)
}

fn execute_compress(desc: &Descriptor) -> CompletionRecord {
    let mut record = CompletionRecord::default();
    let dynamic =
        desc.op_flags & compression_flags::DYNAMIC_HUFFMAN == compression_flags::DYNAMIC_HUFFMAN;
    let reads_aecs = desc.flags() & flags::RD_SRC2_AECS != 0;
    if !dynamic && !reads_aecs {
        record.status = status::INVALID_FLAGS;
        record.invalid_flags = flags::RD_SRC2_AECS;
        return record;
    }
    if reads_aecs && !desc.src2_addr.is_multiple_of(AECS_ALIGN as u64) {
        record.status = status::AECS_MISALIGNED;
        return record;
    }
    if reads_aecs && (desc.src2_size as usize) < COMPRESS_AECS_SIZE {
        record.status = status::INVALID_SIZE;
        return record;
    }
    // SAFETY: the submitter's contract: src1 names src1_size live bytes, dst names
    // max_dst_size bytes no one else touches, and src2 a live, aligned (checked above) AECS.
    let (src, dst) = unsafe {
        (
            device_source(desc.src1_addr, desc.src1_size as usize),
            device_destination(desc.dst_addr, desc.max_dst_size as usize),
        )
    };
    let compressed = if dynamic {
        deflate::compress_dynamic(src, dst)
    } else {
        // SAFETY: as above.
        let aecs = unsafe { device_aecs(desc.src2_addr) };
        deflate::compress_with_aecs(aecs, src, dst)
    };
    match compressed {
        Ok(n) => {
            record.status = status::SUCCESS;
            record.output_size = u32::try_from(n).unwrap_or(u32::MAX);
            record.crc = deflate::crc32(src);
            record.bytes_completed = desc.src1_size;
        }
        Err(_) => {
            record.status = status::ANALYTICS_ERROR;
            record.error_code = error_code::COMPRESS_OUTPUT_OVERFLOW;
        }
    }
    record
}

fn execute_decompress(desc: &Descriptor) -> CompletionRecord {
    let mut record = CompletionRecord::default();
    // SAFETY: the submitter's contract, as in `execute_compress`.
    let (src, dst) = unsafe {
        (
            device_source(desc.src1_addr, desc.src1_size as usize),
            device_destination(desc.dst_addr, desc.max_dst_size as usize),
        )
    };
    match deflate::inflate(src, dst) {
        Ok(n) => {
            record.status = status::SUCCESS;
            record.output_size = u32::try_from(n).unwrap_or(u32::MAX);
            record.crc = deflate::crc32(&dst[..n]);
            record.bytes_completed = desc.src1_size;
        }
        Err(DecompressFailure::NoSpace) => record.status = status::OUTPUT_OVERFLOW,
        Err(DecompressFailure::BadData) => {
            record.status = status::ANALYTICS_ERROR;
            record.error_code = error_code::BAD_LITERAL_LENGTH_CODE;
        }
    }
    record
}
