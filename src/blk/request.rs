// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! virtio-blk requests: from a descriptor chain to an executed request and a status byte.
//!
//! A chain becomes one [`Request`] value, which lives from the moment the chain is taken from
//! the ring until its used entry is written. The guest is untrusted; every request goes through
//! the same steps, all in [`RequestRunner`]:
//!
//! 1. **Take** ([`RequestRunner::take`]): walk the chain once, check each descriptor (no zero
//!    lengths, inside guest memory, device-readable ones before device-writable ones, at most
//!    `seg_max + 2` of them) and keep them in a descriptor table from the runner's pool. The
//!    status byte is the last byte of the last descriptor, which must be device-writable; a
//!    chain without one cannot be answered and is returned with a used length of 0. Then parse
//!    the 16-byte header, which is the start of the device-readable bytes (it may span
//!    descriptors: virtio 1.x frames messages independently of descriptors); the data is the
//!    rest of the readable bytes (writes) or the writable bytes before the status byte (reads).
//!    A request carrying data in the direction its type does not use is refused. The runner
//!    tracks the request as in flight from here on.
//! 2. **Execute** ([`RequestRunner::execute`]) against a [`BlockBackend`], page by page (a
//!    write hands each run of whole pages to the store in one call, a multi-page unit),
//!    through one per-thread page buffer; on the queue thread a read of a whole page whose
//!    destination is one contiguous piece of one guest memory region is decompressed straight
//!    into guest memory instead ([`lend_guest_page`]). A read of written-back pages may run on
//!    another thread; there every write into guest memory asks a [`GuestGate`] first, which
//!    says no once the queue was stopped and gave the request up.
//! 3. **Complete** ([`RequestRunner::complete`]): write the status byte and the used entry.
//!    This is the one place a used entry is written, and only the thread that owns the queue
//!    calls it.
//!
//! Every failure is a [`RequestError`]; [`RequestError::status`] is the one place that maps
//! failures to `VIRTIO_BLK_S_*`, and [`RequestError::is_invalid_io`] decides what counts in zram's
//! `invalid_io` (the store counts its own failed reads and writes). Nothing
//! here allocates per request or in proportion to a guest-chosen length: data is copied in
//! page-sized pieces while walking the descriptors, and a completed request's descriptor
//! table goes back to the runner's pool for the next one.
//!
//! This module holds the one `unsafe` block of the request path, [`lend_guest_page`]; DESIGN.md
//! ("Zero-copy reads") argues why it is sound enough when the guest writes the same memory.

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::bitmap::{BitmapSlice, MS};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, VolatileSlice,
};

use super::config::{DeviceConfig, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG};
use super::inflight::{InflightError, InflightQueue, QueueStart};
use super::ratelimit::{RateLimiter, WARNINGS_PER_SECOND};
use super::request_stats::{RequestKind, RequestStats};
use super::BlockBackend;
use crate::{PAGE_BYTES, PAGE_SIZE, SECTOR_BYTES};

/// The size of the request header (`struct virtio_blk_outhdr`).
pub const HEADER_LEN: usize = 16;

/// The size of one discard or write-zeroes segment (`struct virtio_blk_discard_write_zeroes`).
pub const DISCARD_SEGMENT_LEN: usize = 16;

// The statuses are 0, 1 and 2, so the narrowing casts are exact.
#[allow(clippy::cast_possible_truncation)]
const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
#[allow(clippy::cast_possible_truncation)]
const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
#[allow(clippy::cast_possible_truncation)]
const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// The request types the device knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// `VIRTIO_BLK_T_IN`: read sectors.
    In,
    /// `VIRTIO_BLK_T_OUT`: write sectors.
    Out,
    /// `VIRTIO_BLK_T_FLUSH`.
    Flush,
    /// `VIRTIO_BLK_T_GET_ID`: read the serial number.
    GetId,
    /// `VIRTIO_BLK_T_DISCARD`.
    Discard,
    /// `VIRTIO_BLK_T_WRITE_ZEROES`.
    WriteZeroes,
    /// Anything else.
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(value: u32) -> Self {
        match value {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }
}

impl From<RequestType> for RequestKind {
    fn from(kind: RequestType) -> Self {
        match kind {
            RequestType::In => RequestKind::Read,
            RequestType::Out => RequestKind::Write,
            RequestType::Flush => RequestKind::Flush,
            RequestType::GetId => RequestKind::GetId,
            RequestType::Discard => RequestKind::Discard,
            RequestType::WriteZeroes => RequestKind::WriteZeroes,
            RequestType::Unsupported(_) => RequestKind::Unsupported,
        }
    }
}

/// Which data direction a request type uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Data flows from the guest to the device.
    ToDevice,
    /// Data flows from the device to the guest.
    FromDevice,
    /// No data.
    None,
}

/// A failure while copying between guest memory and the page buffer.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// Guest memory refused the access.
    #[error("guest memory access failed")]
    Memory(#[source] GuestMemoryError),
    /// The descriptors ended before the copy did.
    #[error("the descriptors hold fewer bytes than the request needs")]
    Exhausted,
}

/// Why a request failed. `E` is the backend's error.
#[derive(Debug, thiserror::Error)]
pub enum RequestError<E: std::error::Error + 'static> {
    /// A descriptor of length zero.
    #[error("descriptor {index} of the chain has length zero")]
    EmptyDescriptor {
        /// Position in the chain.
        index: usize,
    },
    /// A descriptor that points outside guest memory.
    #[error("descriptor {index} of the chain ({addr:#x}, {len} bytes) lies outside guest memory")]
    OutsideGuestMemory {
        /// Position in the chain.
        index: usize,
        /// Guest physical address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// A device-readable descriptor after a device-writable one.
    #[error("descriptor {index} is device-readable but follows a device-writable descriptor")]
    ReadableAfterWritable {
        /// Position in the chain.
        index: usize,
    },
    /// More descriptors than `seg_max` allows.
    #[error("the chain has more than {max} descriptors")]
    TooManyDescriptors {
        /// The limit: `seg_max` plus header and status.
        max: usize,
    },
    /// Fewer than 16 device-readable bytes.
    #[error("the request header needs {HEADER_LEN} device-readable bytes, the chain has {len}")]
    ShortHeader {
        /// Device-readable bytes present.
        len: u64,
    },
    /// A request type that carries no data, or data in one direction only, came with data in the
    /// other direction.
    #[error("a {kind:?} request carries {len} bytes of {what} data, which it does not take")]
    UnexpectedData {
        /// The request type.
        kind: RequestType,
        /// Which kind of data was present.
        what: &'static str,
        /// How many bytes.
        len: u64,
    },
    /// A read or write whose length is not a multiple of 512.
    #[error("the data length {len} is not a multiple of 512 bytes")]
    UnalignedLength {
        /// The data length.
        len: u64,
    },
    /// Sectors past the end of the device, or a range that overflows.
    #[error("sectors {sector}..+{sectors} lie beyond the device's {capacity} sectors")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        sectors: u64,
        /// Device capacity in sectors.
        capacity: u64,
    },
    /// A request type the device does not support.
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    /// A write-type request on a read-only device.
    #[error("the device is read-only")]
    ReadOnly,
    /// A discard or write-zeroes payload that is not whole segments.
    #[error("the {len}-byte discard/write-zeroes payload is not a non-zero multiple of {DISCARD_SEGMENT_LEN} bytes")]
    BadSegmentPayload {
        /// Payload length.
        len: u64,
    },
    /// More discard or write-zeroes segments than `max_discard_seg`.
    #[error("{count} discard/write-zeroes segments exceed the limit of {MAX_DISCARD_SEG}")]
    TooManySegments {
        /// Segments present.
        count: u64,
    },
    /// A discard or write-zeroes segment longer than the announced maximum.
    #[error("a discard/write-zeroes segment of {sectors} sectors exceeds the limit of {MAX_DISCARD_SECTORS}")]
    SegmentTooLong {
        /// Sectors requested.
        sectors: u32,
    },
    /// Unknown flags in a discard or write-zeroes segment, or `UNMAP` on a discard.
    #[error("flags {flags:#x} are not valid for a {kind:?} segment")]
    BadSegmentFlags {
        /// The request type.
        kind: RequestType,
        /// The flags given.
        flags: u32,
    },
    /// Copying between guest memory and the device failed.
    #[error("copying request data failed")]
    Copy(#[source] CopyError),
    /// The store could not read a page.
    #[error("reading page {index} failed")]
    ReadFailed {
        /// Page index.
        index: u64,
        /// The store's error.
        #[source]
        source: E,
    },
    /// The request's queue was stopped while it ran off the queue thread, and gave it up; it
    /// is never completed, so the guest never sees this.
    #[error("the queue was stopped while the request ran")]
    Cancelled,
    /// A request was completed without being executed (a bug in the caller).
    #[error("the request was completed without being executed")]
    NotExecuted,
    /// The backend refuses the device (a frontend that came back to a daemon without its
    /// pages, or [`super::BlkBackend::refuse`]): nothing is read or written.
    #[error("the device is refused: this daemon does not hold the frontend's pages")]
    DeviceRefused,
    /// The store could not write, modify or discard a page.
    #[error("writing page {index} failed")]
    WriteFailed {
        /// Page index.
        index: u64,
        /// The store's error.
        #[source]
        source: E,
    },
}

impl<E: std::error::Error + 'static> RequestError<E> {
    /// The `VIRTIO_BLK_S_*` status this failure reports to the guest.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) | RequestError::BadSegmentFlags { .. } => STATUS_UNSUPP,
            RequestError::EmptyDescriptor { .. }
            | RequestError::OutsideGuestMemory { .. }
            | RequestError::ReadableAfterWritable { .. }
            | RequestError::TooManyDescriptors { .. }
            | RequestError::ShortHeader { .. }
            | RequestError::UnexpectedData { .. }
            | RequestError::UnalignedLength { .. }
            | RequestError::OutOfRange { .. }
            | RequestError::ReadOnly
            | RequestError::BadSegmentPayload { .. }
            | RequestError::TooManySegments { .. }
            | RequestError::SegmentTooLong { .. }
            | RequestError::Copy(_)
            | RequestError::Cancelled
            | RequestError::NotExecuted
            | RequestError::DeviceRefused
            | RequestError::ReadFailed { .. }
            | RequestError::WriteFailed { .. } => STATUS_IOERR,
        }
    }

    /// Whether this failure counts in zram's `invalid_io`: every failure but the store's own,
    /// which the store counts in `failed_reads` / `failed_writes` itself, as zram counts them
    /// in its own I/O path.
    pub fn is_invalid_io(&self) -> bool {
        match self {
            RequestError::ReadFailed { .. }
            | RequestError::WriteFailed { .. }
            | RequestError::Cancelled
            | RequestError::NotExecuted
            | RequestError::DeviceRefused => false,
            RequestError::EmptyDescriptor { .. }
            | RequestError::OutsideGuestMemory { .. }
            | RequestError::ReadableAfterWritable { .. }
            | RequestError::TooManyDescriptors { .. }
            | RequestError::ShortHeader { .. }
            | RequestError::UnexpectedData { .. }
            | RequestError::UnalignedLength { .. }
            | RequestError::OutOfRange { .. }
            | RequestError::Unsupported(_)
            | RequestError::ReadOnly
            | RequestError::BadSegmentPayload { .. }
            | RequestError::TooManySegments { .. }
            | RequestError::SegmentTooLong { .. }
            | RequestError::BadSegmentFlags { .. }
            | RequestError::Copy(_) => true,
        }
    }
}

/// One device-visible piece of a descriptor chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    addr: GuestAddress,
    len: u32,
}

/// Walks a run of segments as one byte stream.
struct Cursor<'s> {
    segments: &'s [Segment],
    index: usize,
    offset: u32,
    remaining: u64,
}

impl<'s> Cursor<'s> {
    fn new(segments: &'s [Segment]) -> Self {
        let remaining = segments.iter().map(|s| u64::from(s.len)).sum();
        Cursor {
            segments,
            index: 0,
            offset: 0,
            remaining,
        }
    }

    /// Visits the next `len` bytes as (address, length) pieces.
    fn advance(
        &mut self,
        len: usize,
        mut visit: impl FnMut(GuestAddress, Range<usize>) -> Result<(), CopyError>,
    ) -> Result<(), CopyError> {
        if (len as u64) > self.remaining {
            return Err(CopyError::Exhausted);
        }
        let mut done = 0usize;
        while done < len {
            let segment = self.segments.get(self.index).ok_or(CopyError::Exhausted)?;
            let available = segment.len - self.offset;
            if available == 0 {
                self.index += 1;
                self.offset = 0;
                continue;
            }
            let wanted = u32::try_from(len - done).unwrap_or(u32::MAX);
            let n32 = available.min(wanted);
            let n = n32 as usize;
            let addr = segment
                .addr
                .checked_add(u64::from(self.offset))
                .ok_or(CopyError::Exhausted)?;
            visit(addr, done..done + n)?;
            done += n;
            self.offset += n32;
            self.remaining -= u64::from(n32);
        }
        Ok(())
    }

    /// The next `len` bytes as one slice of guest memory, when they lie in one segment and in
    /// one memory region; `None` when they straddle segments or regions (or lie outside guest
    /// memory). Does not advance: [`Cursor::skip`] does once the bytes are used.
    fn contiguous<'m, M: GuestMemoryBackend>(
        &mut self,
        mem: &'m M,
        len: usize,
    ) -> Option<VolatileSlice<'m, MS<'m, M>>> {
        if (len as u64) > self.remaining {
            return None;
        }
        // Step over used-up segments first, as `advance` would.
        while self
            .segments
            .get(self.index)
            .is_some_and(|segment| segment.len == self.offset)
        {
            self.index += 1;
            self.offset = 0;
        }
        let segment = self.segments.get(self.index)?;
        if ((segment.len - self.offset) as usize) < len {
            return None;
        }
        let addr = segment.addr.checked_add(u64::from(self.offset))?;
        // vm-memory hands out a slice only when the range lies inside one region's mapping.
        mem.get_slice(addr, len).ok()
    }

    /// Moves past the next `len` bytes without touching them.
    fn skip(&mut self, len: usize) -> Result<(), CopyError> {
        self.advance(len, |_, _| Ok(()))
    }

    /// Copies the next `buf.len()` bytes of guest memory into `buf`.
    fn read_into<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        buf: &mut [u8],
    ) -> Result<(), CopyError> {
        self.advance(buf.len(), |addr, range| {
            mem.read_slice(&mut buf[range], addr)
                .map_err(CopyError::Memory)
        })
    }

    /// Copies `buf` into the next `buf.len()` bytes of guest memory.
    fn write_from<M: GuestMemoryBackend>(&mut self, mem: &M, buf: &[u8]) -> Result<(), CopyError> {
        self.advance(buf.len(), |addr, range| {
            mem.write_slice(&buf[range], addr)
                .map_err(CopyError::Memory)
        })
    }
}

/// What became of the next chain of a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// The queue had no chain.
    Empty,
    /// A chain was served and put on the used ring.
    Completed,
    /// A slow read was handed over to another thread; it comes back to the queue thread to be
    /// completed ([`RequestRunner::complete`]).
    Deferred,
}

/// Who may write guest memory while a request executes, and how.
///
/// On the queue thread, everything a request writes is ordered before its used entry by the
/// thread itself, so writes need no permission and whole pages may be decompressed straight
/// into guest memory. Off the queue thread (reads of written-back pages), the queue may be
/// stopped while the request runs: every write into guest memory then asks the gate first, and
/// a gate that says no (the queue was stopped and gave the request up) cancels the request.
pub trait GuestGate {
    /// Whether whole pages may be decompressed straight into guest memory. Only a gate that
    /// never closes may allow it: a lent page is written for as long as the decompression runs.
    const LENDS_GUEST_MEMORY: bool;

    /// Runs `write` (a write into guest memory) if the request may still write, and returns
    /// its result; `None` when the request was cancelled.
    fn pass<R>(&self, write: impl FnOnce() -> R) -> Option<R>;
}

/// The gate of the queue thread: always open.
#[derive(Debug, Clone, Copy, Default)]
pub struct OnQueueThread;

impl GuestGate for OnQueueThread {
    const LENDS_GUEST_MEMORY: bool = true;

    fn pass<R>(&self, write: impl FnOnce() -> R) -> Option<R> {
        Some(write())
    }
}

/// One request: everything about one descriptor chain, from the moment it is taken from the
/// ring until its used entry is written.
///
/// [`RequestRunner::take`] collects and parses the chain into this value;
/// [`RequestRunner::execute`] runs it (on the queue thread, or on a read-back thread for a
/// read of written-back pages); [`RequestRunner::complete`], on the queue thread, writes the
/// status byte and the used entry. `E` is the backend's error.
#[derive(Debug)]
pub struct Request<E: std::error::Error + 'static> {
    /// The chain's head index: what the used entry names.
    head: u16,
    /// Where the status byte goes; `None` when the chain has no device-writable last byte, so
    /// nothing can be reported and the chain is returned with a used length of 0.
    status_addr: Option<GuestAddress>,
    /// The chain's checked descriptors, status byte excluded. The buffer comes from the
    /// runner's pool and goes back to it at completion, so no request allocates.
    segments: Vec<Segment>,
    stage: Stage<E>,
    /// Bytes written into device-writable buffers (the used length, less the status byte).
    written: u64,
    kind: RequestKind,
    started: Instant,
}

/// Where a request is in its life.
#[derive(Debug)]
enum Stage<E: std::error::Error + 'static> {
    /// Parsed and checked; not executed yet.
    Parsed { command: Command, layout: Layout },
    /// Executed, or refused while parsing: the status to report.
    Done(Result<(), RequestError<E>>),
}

impl<E: std::error::Error + 'static> Request<E> {
    /// Whether this is a parsed read of a page `backend` reads slowly (on the backing file).
    pub fn reads_slowly<B: BlockBackend<Error = E>>(&self, backend: &B) -> bool {
        match &self.stage {
            Stage::Parsed { command, layout } => {
                let data = RequestData::new(&self.segments, layout);
                command.reads_slowly(&data, backend)
            }
            Stage::Done(_) => false,
        }
    }

    /// Whether the request has been executed (or refused), so completing it reports a result.
    pub fn is_done(&self) -> bool {
        match self.stage {
            Stage::Parsed { .. } => false,
            Stage::Done(_) => true,
        }
    }

    /// Why the executed request failed, if it did: what the guest only sees as a status byte.
    #[cfg(test)]
    pub(super) fn error(&self) -> Option<&RequestError<E>> {
        match &self.stage {
            Stage::Done(Err(error)) => Some(error),
            Stage::Parsed { .. } | Stage::Done(Ok(())) => None,
        }
    }
}

/// Where [`RequestRunner::process_next`] offers a slow read: it takes the request (`Ok`) or
/// hands it back to be served on the queue thread (`Err`).
pub type Defer<'d, E> = &'d mut dyn FnMut(Request<E>) -> Result<(), Request<E>>;

/// The shape of a collected chain: which segments are readable and which writable.
#[derive(Debug)]
struct Layout {
    readable: Range<usize>,
    writable: Range<usize>,
}

/// Per-thread request state: the page buffer, the pool of descriptor tables and the table
/// of requests taken from the ring and not completed yet, all allocated when the thread starts.
pub struct RequestRunner {
    /// The page buffer for reads that cannot go straight into guest memory: partial pages,
    /// pages whose destination is split across descriptors or memory regions, and every read
    /// executed off the queue thread. Whole contiguous pages read on the queue thread are
    /// decompressed into the guest's buffer itself; writes are copied once into a buffer the
    /// store provides (the compressor and the same-filled check must see one stable page,
    /// which guest memory is not).
    page: Box<[u8; PAGE_SIZE]>,
    /// Descriptor tables of completed requests, for the next ones.
    spare_segments: Vec<Vec<Segment>>,
    max_descriptors: usize,
    in_flight: InFlight,
    log_limiter: Arc<Mutex<RateLimiter>>,
    /// Where completed requests are counted, and as which queue.
    request_stats: Option<(Arc<RequestStats>, usize)>,
    /// The queue's part of the vhost-user inflight region, when the frontend set one.
    inflight_region: Option<InflightQueue>,
    /// Heads an earlier backend took and did not complete, to serve before the ring's next
    /// chain; the oldest is last. Sized for a whole ring when the runner is made.
    resubmit: Vec<u16>,
    /// Whether every request is answered with an I/O error without touching the store.
    refusing: bool,
}

/// The requests of one queue taken from its ring whose used entries are not written yet, by
/// head index, in the order they were taken (what vhost-user's inflight tracking records).
#[derive(Debug)]
struct InFlight {
    /// Per head index: the order number it was taken with, or 0 when not in flight.
    taken: Vec<u64>,
    count: usize,
    counter: u64,
}

impl InFlight {
    fn new(queue_size: u16) -> Self {
        InFlight {
            taken: vec![0; usize::from(queue_size)],
            count: 0,
            counter: 0,
        }
    }

    /// Records `head` as taken and returns its order number.
    fn take(&mut self, head: u16) -> u64 {
        if let Some(slot) = self.taken.get_mut(usize::from(head)) {
            if *slot == 0 {
                self.count += 1;
            }
            self.counter += 1;
            *slot = self.counter;
        }
        self.counter
    }

    fn release(&mut self, head: u16) {
        if let Some(slot) = self.taken.get_mut(usize::from(head)) {
            if *slot != 0 {
                self.count -= 1;
                *slot = 0;
            }
        }
    }

    fn clear(&mut self) {
        self.taken.fill(0);
        self.count = 0;
    }
}

impl RequestRunner {
    /// A runner for a device described by `device`, sharing `log_limiter` with the other
    /// runners.
    pub fn new(device: &DeviceConfig, log_limiter: Arc<Mutex<RateLimiter>>) -> Self {
        let max_descriptors = device.seg_max() as usize + 2;
        RequestRunner {
            page: Box::new([0; PAGE_SIZE]),
            spare_segments: vec![Vec::with_capacity(max_descriptors)],
            max_descriptors,
            in_flight: InFlight::new(device.queue_size),
            log_limiter,
            request_stats: None,
            inflight_region: None,
            resubmit: Vec::with_capacity(usize::from(device.queue_size)),
            refusing: false,
        }
    }

    /// Records every request taken and completed from now on in `region`, the queue's part
    /// of the vhost-user inflight region (`None`: no region).
    pub fn track_inflight(&mut self, region: Option<InflightQueue>) {
        self.inflight_region = region;
        self.resubmit.clear();
    }

    /// Answers every request from now on with `VIRTIO_BLK_S_IOERR` without reading or
    /// writing the store (`true`), or serves them again (`false`).
    pub fn set_refusing(&mut self, refusing: bool) {
        self.refusing = refusing;
    }

    /// The queue `queue` starts (its first kick after it was set up): with an inflight region,
    /// does what libvhost-user's `vu_check_queue_inflights` does. The heads an earlier backend
    /// took and did not complete are queued to be served before the ring's next chain, in the
    /// order they were taken, and the queue's next avail index is set past every head taken
    /// so far, so none is taken twice. Returns what the region said (`None`: no region).
    pub fn start_queue<Q, M>(
        &mut self,
        queue: &mut Q,
        mem: &M,
    ) -> Result<Option<QueueStart>, StartError>
    where
        Q: QueueT,
        M: GuestMemoryBackend,
    {
        self.resubmit.clear();
        let Some(region) = &self.inflight_region else {
            return Ok(None);
        };
        let used = queue
            .used_idx(mem, std::sync::atomic::Ordering::Acquire)
            .map_err(StartError::Ring)?;
        let start = region
            .start(queue.size(), used.0, &mut self.resubmit)
            .map_err(StartError::Region)?;
        match start {
            QueueStart::Fresh | QueueStart::Cleared { .. } => {}
            QueueStart::Resumed {
                next_avail,
                last_counter,
                ..
            } => {
                queue.set_next_avail(next_avail);
                queue.set_next_used(used.0);
                self.in_flight.counter = self.in_flight.counter.max(last_counter);
            }
        }
        Ok(Some(start))
    }

    /// How many heads wait to be resubmitted.
    pub fn resubmit_pending(&self) -> usize {
        self.resubmit.len()
    }

    /// A runner with its own log limiter (tests, single-queue use).
    pub fn standalone(device: &DeviceConfig) -> Self {
        Self::new(
            device,
            Arc::new(Mutex::new(RateLimiter::new(WARNINGS_PER_SECOND))),
        )
    }

    /// Records every request this runner completes into `stats`, as queue `queue`.
    pub fn record_into(&mut self, stats: Arc<RequestStats>, queue: usize) {
        self.request_stats = Some((stats, queue));
    }

    /// How many requests taken from the ring have no used entry yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.count
    }

    /// Forgets every request in flight: the queue was stopped and gave them up (they were
    /// cancelled and are never completed).
    pub fn forget_in_flight(&mut self) {
        self.in_flight.clear();
    }

    /// Serves every available chain of `queue` here and returns how many it completed.
    /// Signalling the guest is the caller's business.
    pub fn process_queue<Q, M, B>(
        &mut self,
        queue: &mut Q,
        mem: &M,
        backend: &B,
        device: &DeviceConfig,
    ) -> Result<usize, virtio_queue::Error>
    where
        Q: QueueT,
        M: GuestMemoryBackend,
        B: BlockBackend,
    {
        let mut completed = 0;
        while self.process_next(queue, mem, backend, device, None)? == Next::Completed {
            completed += 1;
        }
        Ok(completed)
    }

    /// Takes the next available chain of `queue`, if there is one, and serves it: executes it
    /// and completes it, unless it is a read of pages `backend` reads slowly (written back to
    /// the backing file) and `defer` takes it, to run it on another thread and hand it back
    /// for [`complete`](Self::complete) later. `defer` returns the request when it cannot take
    /// it; it is then served here. The daemon calls this with a fresh guest memory snapshot
    /// for every request, so memory the frontend adds while a queue is busy is usable at once.
    pub fn process_next<Q, M, B>(
        &mut self,
        queue: &mut Q,
        mem: &M,
        backend: &B,
        device: &DeviceConfig,
        defer: Option<Defer<'_, B::Error>>,
    ) -> Result<Next, virtio_queue::Error>
    where
        Q: QueueT,
        M: GuestMemoryBackend,
        B: BlockBackend,
    {
        let mut request = if let Some(head) = self.resubmit.pop() {
            let chain = ResubmitChain::new(mem, queue.desc_table(), queue.size(), head);
            self.take(chain, mem, device)
        } else {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                return Ok(Next::Empty);
            };
            self.take(chain, mem, device)
        };
        if let Some(defer) = defer.filter(|_| request.reads_slowly(backend)) {
            match defer(request) {
                Ok(()) => return Ok(Next::Deferred),
                // Handed back when the read-back queue is full or stopping: served here.
                Err(back) => request = back,
            }
        }
        self.execute(&mut request, mem, backend, device, &OnQueueThread);
        self.complete(queue, mem, backend, request)?;
        Ok(Next::Completed)
    }

    /// Collects and parses `chain` into a request, and tracks it as in flight until
    /// [`complete`](Self::complete) writes its used entry: in the runner's table, and in the
    /// inflight region when there is one, before anything of the request is executed. While
    /// the runner refuses, the request is answered with an I/O error whatever it asks.
    pub fn take<M, E, C>(&mut self, chain: C, mem: &M, device: &DeviceConfig) -> Request<E>
    where
        M: GuestMemoryBackend,
        E: std::error::Error + 'static,
        C: Chain,
    {
        let head = chain.head_index();
        let counter = self.in_flight.take(head);
        if let Some(region) = &self.inflight_region {
            region.take(head, counter);
        }
        let mut segments = self
            .spare_segments
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.max_descriptors));
        let Collected {
            status_addr,
            layout,
        } = collect(chain, mem, &mut segments, self.max_descriptors);
        let mut kind = RequestKind::Unsupported;
        let stage = match layout {
            Err(error) => Stage::Done(Err(error)),
            Ok(layout) => {
                let mut data = RequestData::new(&segments, &layout);
                match Command::parse(&mut data, mem, device) {
                    Ok(command) => {
                        kind = RequestKind::from(command.kind);
                        Stage::Parsed { command, layout }
                    }
                    Err(error) => Stage::Done(Err(error)),
                }
            }
        };
        let stage = if self.refusing {
            Stage::Done(Err(RequestError::DeviceRefused))
        } else {
            stage
        };
        Request {
            head,
            status_addr,
            segments,
            stage,
            written: 0,
            kind,
            started: Instant::now(),
        }
    }

    /// Executes a parsed request against `backend`; every write into guest memory passes
    /// `gate`. A request already done (refused while parsing) is left as it is. The header
    /// was parsed when the request was taken; a guest that changed it since gets the request
    /// as it was parsed.
    pub fn execute<M, B, G>(
        &mut self,
        request: &mut Request<B::Error>,
        mem: &M,
        backend: &B,
        device: &DeviceConfig,
        gate: &G,
    ) where
        M: GuestMemoryBackend,
        B: BlockBackend,
        G: GuestGate,
    {
        let (command, layout) = match &request.stage {
            Stage::Parsed { command, layout } => (*command, layout),
            Stage::Done(_) => return,
        };
        let mut data = RequestData::new(&request.segments, layout);
        let result = data
            .readable
            .skip(HEADER_LEN)
            .map_err(RequestError::Copy)
            .and_then(|()| command.execute(&mut data, mem, backend, device, &mut self.page, gate));
        request.written = data.written;
        request.stage = Stage::Done(result);
    }

    /// Completes `request` on `queue`: writes its status byte and its used entry, counts it,
    /// and keeps its descriptor table for the next request. This is the one place a used
    /// entry is written; only the thread that owns the queue calls it. Signalling the guest
    /// is the caller's business.
    pub fn complete<Q, M, B>(
        &mut self,
        queue: &mut Q,
        mem: &M,
        backend: &B,
        request: Request<B::Error>,
    ) -> Result<(), virtio_queue::Error>
    where
        Q: QueueT,
        M: GuestMemoryBackend,
        B: BlockBackend,
    {
        let Request {
            head,
            status_addr,
            segments,
            stage,
            written,
            kind,
            started,
        } = request;
        let result = match stage {
            Stage::Done(result) => result,
            // Completing a request nobody executed would report success for nothing.
            Stage::Parsed { .. } => Err(RequestError::NotExecuted),
        };
        let ok = result.is_ok();
        let used = match status_addr {
            Some(status_addr) => self.write_status(mem, backend, status_addr, written, result),
            None => {
                backend.count_invalid_io();
                self.warn(format_args!(
                    "dropping a request without a device-writable status byte"
                ));
                0
            }
        };
        self.recycle(segments);
        self.in_flight.release(head);
        if let Some((stats, queue)) = &self.request_stats {
            stats.record(*queue, kind, started.elapsed(), ok);
        }
        let Some(region) = &self.inflight_region else {
            return queue.add_used(mem, head, used);
        };
        region.pre_put(head);
        queue.add_used(mem, head, used)?;
        region.post_put(head, queue.next_used());
        Ok(())
    }

    /// Drops `request` without completing it: its queue was stopped and gave it up. Only its
    /// descriptor table is kept.
    pub fn discard(&mut self, request: Request<impl std::error::Error + 'static>) {
        self.recycle(request.segments);
    }

    fn recycle(&mut self, mut segments: Vec<Segment>) {
        // At most a ring's worth of requests is in flight, so the pool stays that small.
        if self.spare_segments.len() < self.in_flight.taken.len().max(1) {
            segments.clear();
            self.spare_segments.push(segments);
        }
    }

    /// Writes the status byte for `result` and returns the used length: every byte written
    /// to device-writable buffers, status included.
    fn write_status<M, B>(
        &self,
        mem: &M,
        backend: &B,
        status_addr: GuestAddress,
        written: u64,
        result: Result<(), RequestError<B::Error>>,
    ) -> u32
    where
        M: GuestMemoryBackend,
        B: BlockBackend,
    {
        let status = match result {
            Ok(()) => STATUS_OK,
            Err(error) => {
                if error.is_invalid_io() {
                    backend.count_invalid_io();
                }
                self.warn(format_args!("request failed: {}", ErrorChain(&error)));
                error.status()
            }
        };
        if let Err(error) = mem.write_obj(status, status_addr) {
            self.warn(format_args!("cannot write the status byte: {error}"));
            return used_len(written);
        }
        used_len(written + 1)
    }

    fn warn(&self, message: std::fmt::Arguments<'_>) {
        super::ratelimit::warn_limited(&self.log_limiter, message);
    }
}

/// A walked chain: where its status byte is, if it has one, and its shape or what is wrong
/// with it.
struct Collected<E: std::error::Error + 'static> {
    status_addr: Option<GuestAddress>,
    layout: Result<Layout, RequestError<E>>,
}

/// Walks the chain, fills `segments` and finds the status byte. The status address is
/// returned even when the layout is bad, so the failure can be reported.
fn collect<M, E, C>(
    chain: C,
    mem: &M,
    segments: &mut Vec<Segment>,
    max_descriptors: usize,
) -> Collected<E>
where
    M: GuestMemoryBackend,
    E: std::error::Error + 'static,
    C: Chain,
{
    segments.clear();
    let mut error: Option<RequestError<E>> = None;
    let mut first_writable: Option<usize> = None;
    let mut last = None;
    for (index, desc) in chain.enumerate() {
        last = Some(desc);
        if error.is_some() {
            // Keep walking (the chain is bounded by the queue size) to find the status byte.
            continue;
        }
        if desc.len() == 0 {
            error = Some(RequestError::EmptyDescriptor { index });
        } else if !mem.check_range(desc.addr(), desc.len() as usize) {
            error = Some(RequestError::OutsideGuestMemory {
                index,
                addr: desc.addr().0,
                len: desc.len(),
            });
        } else if !desc.is_write_only() && first_writable.is_some() {
            error = Some(RequestError::ReadableAfterWritable { index });
        } else if segments.len() == max_descriptors {
            error = Some(RequestError::TooManyDescriptors {
                max: max_descriptors,
            });
        } else {
            if desc.is_write_only() && first_writable.is_none() {
                first_writable = Some(segments.len());
            }
            segments.push(Segment {
                addr: desc.addr(),
                len: desc.len(),
            });
        }
    }
    let status_addr = last
        .filter(|desc| desc.is_write_only() && desc.len() > 0)
        .and_then(|desc| desc.addr().checked_add(u64::from(desc.len()) - 1))
        .filter(|addr| mem.check_range(*addr, 1));
    let Some(status_addr) = status_addr else {
        // Nowhere to report anything: the chain is returned unanswered; the error is not used.
        return Collected {
            status_addr: None,
            layout: Err(error.unwrap_or(RequestError::ShortHeader { len: 0 })),
        };
    };
    if let Some(error) = error {
        return Collected {
            status_addr: Some(status_addr),
            layout: Err(error),
        };
    }
    // The last descriptor is writable (it holds the status byte), so it was pushed and
    // `first_writable` is set.
    let first_writable = first_writable.unwrap_or(segments.len());
    // The status byte is not data: take it off the last segment.
    if let Some(last) = segments.last_mut() {
        last.len -= 1;
    }
    let count = segments.len();
    Collected {
        status_addr: Some(status_addr),
        layout: Ok(Layout {
            readable: 0..first_writable,
            writable: first_writable..count,
        }),
    }
}

/// The data of a collected chain as two byte streams, and what the device wrote so far.
struct RequestData<'s> {
    /// Device-readable bytes: the header, then write data or discard segments.
    readable: Cursor<'s>,
    /// Device-writable bytes before the status byte: read data or the serial.
    writable: Cursor<'s>,
    /// Bytes written into device-writable buffers (the used length, less the status byte).
    written: u64,
}

impl<'s> RequestData<'s> {
    fn new(segments: &'s [Segment], layout: &Layout) -> Self {
        RequestData {
            readable: Cursor::new(&segments[layout.readable.clone()]),
            writable: Cursor::new(&segments[layout.writable.clone()]),
            written: 0,
        }
    }
}

/// A parsed header: the request's type and first sector, checked against the chain's shape
/// and the device. Executing it reads or writes the data that follows the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Command {
    kind: RequestType,
    sector: u64,
}

impl Command {
    /// Reads the header and checks what can be checked before touching the store: the data
    /// directions, the read-only flag, and for reads and writes the sector range.
    fn parse<M, E>(
        data: &mut RequestData<'_>,
        mem: &M,
        device: &DeviceConfig,
    ) -> Result<Command, RequestError<E>>
    where
        M: GuestMemoryBackend,
        E: std::error::Error + 'static,
    {
        let readable = &mut data.readable;
        let writable = &data.writable;
        if readable.remaining < HEADER_LEN as u64 {
            return Err(RequestError::ShortHeader {
                len: readable.remaining,
            });
        }
        let mut header = [0u8; HEADER_LEN];
        readable
            .read_into(mem, &mut header)
            .map_err(RequestError::Copy)?;
        let kind = RequestType::from(u32::from_le_bytes([
            header[0], header[1], header[2], header[3],
        ]));
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);

        let direction = match kind {
            RequestType::In | RequestType::GetId => Direction::FromDevice,
            RequestType::Out | RequestType::Discard | RequestType::WriteZeroes => {
                Direction::ToDevice
            }
            RequestType::Flush => Direction::None,
            RequestType::Unsupported(value) => return Err(RequestError::Unsupported(value)),
        };
        if direction != Direction::ToDevice && readable.remaining > 0 {
            return Err(RequestError::UnexpectedData {
                kind,
                what: "device-readable",
                len: readable.remaining,
            });
        }
        if direction != Direction::FromDevice && writable.remaining > 0 {
            return Err(RequestError::UnexpectedData {
                kind,
                what: "device-writable",
                len: writable.remaining,
            });
        }
        if device.read_only {
            match kind {
                RequestType::Out => return Err(RequestError::ReadOnly),
                // A read-only device does not offer these; a guest sending them anyway gets
                // UNSUPP.
                RequestType::Discard => {
                    return Err(RequestError::Unsupported(VIRTIO_BLK_T_DISCARD))
                }
                RequestType::WriteZeroes => {
                    return Err(RequestError::Unsupported(VIRTIO_BLK_T_WRITE_ZEROES))
                }
                RequestType::In
                | RequestType::Flush
                | RequestType::GetId
                | RequestType::Unsupported(_) => {}
            }
        }
        match kind {
            RequestType::In => check_sectors(sector, writable.remaining, device)?,
            RequestType::Out => check_sectors(sector, readable.remaining, device)?,
            // Their ranges are in the payload, checked segment by segment.
            RequestType::Discard
            | RequestType::WriteZeroes
            | RequestType::Flush
            | RequestType::GetId
            | RequestType::Unsupported(_) => {}
        }
        Ok(Command { kind, sector })
    }

    /// Whether this is a read of a page `backend` reads slowly (on the backing file).
    fn reads_slowly<B: BlockBackend>(&self, data: &RequestData<'_>, backend: &B) -> bool {
        if self.kind != RequestType::In {
            return false;
        }
        let start = self.sector * SECTOR_BYTES;
        let end = start + data.writable.remaining;
        backend.reads_slowly(start / PAGE_BYTES..end.div_ceil(PAGE_BYTES))
    }

    /// Executes the request against `backend`, moving data through `page`; writes into
    /// guest memory pass `gate`.
    fn execute<M, B, G>(
        self,
        data: &mut RequestData<'_>,
        mem: &M,
        backend: &B,
        device: &DeviceConfig,
        page: &mut [u8; PAGE_SIZE],
        gate: &G,
    ) -> Result<(), RequestError<B::Error>>
    where
        M: GuestMemoryBackend,
        B: BlockBackend,
        G: GuestGate,
    {
        match self.kind {
            RequestType::In => self.read(data, mem, backend, page, gate),
            RequestType::Out => self.write(data, mem, backend),
            RequestType::Flush => Ok(()),
            RequestType::GetId => {
                let len = usize::try_from(data.writable.remaining)
                    .unwrap_or(usize::MAX)
                    .min(device.serial.len());
                gate.pass(|| data.writable.write_from(mem, &device.serial[..len]))
                    .ok_or(RequestError::Cancelled)?
                    .map_err(RequestError::Copy)?;
                data.written += len as u64;
                Ok(())
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                execute_ranges(self.kind, &mut data.readable, mem, backend, device)
            }
            RequestType::Unsupported(value) => Err(RequestError::Unsupported(value)),
        }
    }

    /// Reads the sectors into the device-writable buffers. A whole page whose destination is
    /// one contiguous piece of guest memory is read straight into it when `gate` allows; any
    /// other page (partial, split across descriptors or memory regions, or read off the queue
    /// thread) goes through `page` and is copied.
    fn read<M, B, G>(
        self,
        data: &mut RequestData<'_>,
        mem: &M,
        backend: &B,
        page: &mut [u8; PAGE_SIZE],
        gate: &G,
    ) -> Result<(), RequestError<B::Error>>
    where
        M: GuestMemoryBackend,
        B: BlockBackend,
        G: GuestGate,
    {
        let start = self.sector * SECTOR_BYTES;
        let end = start + data.writable.remaining;
        backend.read_ahead(start / PAGE_BYTES..end.div_ceil(PAGE_BYTES));
        for_each_page(self.sector, data.writable.remaining, |index, in_page| {
            let direct = if G::LENDS_GUEST_MEMORY && in_page.len() == PAGE_SIZE {
                data.writable.contiguous(mem, PAGE_SIZE)
            } else {
                None
            };
            if let Some(destination) = direct {
                // SAFETY: `destination` is guest memory of the snapshot `mem`, which this call
                // borrows; the request path makes no other reference to guest memory, and
                // `BlockBackend` is an unsafe trait whose implementations promise that
                // `read_page` touches only the page it is given, keeps no reference to it and
                // never lets what it reads back from it steer bounds or control flow.
                let read = unsafe {
                    lend_guest_page(&destination, |guest_page| {
                        backend.read_page(index, guest_page)
                    })
                };
                read.map_err(|source| RequestError::ReadFailed { index, source })?;
                data.writable.skip(PAGE_SIZE).map_err(RequestError::Copy)?;
            } else {
                backend
                    .read_page(index, page)
                    .map_err(|source| RequestError::ReadFailed { index, source })?;
                gate.pass(|| data.writable.write_from(mem, &page[in_page.clone()]))
                    .ok_or(RequestError::Cancelled)?
                    .map_err(RequestError::Copy)?;
            }
            data.written += in_page.len() as u64;
            Ok(())
        })
    }

    /// Stores the device-readable data: each run of whole pages goes to the store in one call
    /// (which may compress them together), every page copied once, straight into a buffer the
    /// store provides; a partial page at either end is merged with the stored page under its
    /// lock.
    fn write<M, B>(
        self,
        data: &mut RequestData<'_>,
        mem: &M,
        backend: &B,
    ) -> Result<(), RequestError<B::Error>>
    where
        M: GuestMemoryBackend,
        B: BlockBackend,
    {
        let readable = &mut data.readable;
        for_each_piece(self.sector, readable.remaining, |piece| match piece {
            PagePiece::Whole { first, count } => {
                let mut next = 0;
                backend
                    .write_pages_with(first, count, |i, page| {
                        // The guest's bytes come off the cursor in order: page i is the next
                        // page of it only when the pages are filled in order.
                        debug_assert_eq!(i, next, "write_pages_with filled a page out of order");
                        next += 1;
                        readable.read_into(mem, page)
                    })
                    .map_err(|(index, source)| RequestError::WriteFailed { index, source })?
                    .map_err(RequestError::Copy)
            }
            PagePiece::Partial { index, in_page } => backend
                .modify_page(index, |stored| {
                    readable.read_into(mem, &mut stored[in_page])
                })
                .map_err(|source| RequestError::WriteFailed { index, source })?
                .map_err(RequestError::Copy),
        })
    }
}

/// Lends the page of guest memory `slice` covers to `f` as a Rust page, and marks it dirty
/// afterwards. This is how a read decompresses straight into the guest's buffer; DESIGN.md
/// ("Zero-copy reads") explains why it is sound enough although the guest may write the same
/// memory meanwhile.
///
/// # Safety
///
/// While this runs, nothing else in this process may hold a Rust reference to the memory
/// `slice` covers, and `f` must neither reach guest memory by another way nor let the page
/// escape. (The guest, and volatile accesses through vm-memory, may write it: that changes
/// the page's bytes but cannot make `f` access anything outside it, provided that what `f`
/// does with the page — bounds, control flow — never depends on bytes it reads back from it.)
///
/// # Panics
///
/// When `slice` is not exactly one page long.
unsafe fn lend_guest_page<S: BitmapSlice, R>(
    slice: &VolatileSlice<'_, S>,
    f: impl FnOnce(&mut [u8; PAGE_SIZE]) -> R,
) -> R {
    assert_eq!(slice.len(), PAGE_SIZE, "a guest page is lent whole");
    let guard = slice.ptr_guard_mut();
    // SAFETY: the slice's pointer is valid for reads and writes of `slice.len()` (= PAGE_SIZE)
    // bytes for the slice's lifetime, which outlives this call: vm-memory only builds a
    // VolatileSlice inside one region's mapping, and the mapping is kept by the memory
    // snapshot the slice borrows. `[u8; N]` needs no alignment and every bit pattern is a
    // valid value. The caller guarantees that no other Rust reference to these bytes exists
    // while `f` runs, and the reference does not outlive `f`.
    let page = unsafe { &mut *guard.as_ptr().cast::<[u8; PAGE_SIZE]>() };
    let result = f(page);
    slice.bitmap().mark_dirty(0, PAGE_SIZE);
    result
}

/// A used length: a chain holds at most 2^32 - 1 bytes (virtio-queue stops walking it
/// otherwise), so this never saturates in practice.
fn used_len(bytes: u64) -> u32 {
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

/// Checks that `len` bytes from `sector` are whole sectors inside the device.
fn check_sectors<E: std::error::Error>(
    sector: u64,
    len: u64,
    device: &DeviceConfig,
) -> Result<(), RequestError<E>> {
    if !len.is_multiple_of(SECTOR_BYTES) {
        return Err(RequestError::UnalignedLength { len });
    }
    let sectors = len / SECTOR_BYTES;
    let capacity = device.capacity_sectors();
    match sector.checked_add(sectors) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(RequestError::OutOfRange {
            sector,
            sectors,
            capacity,
        }),
    }
}

/// Calls `f(page_index, byte_range_in_page)` for each page the byte range
/// `[sector * 512, sector * 512 + len)` touches, in order. The range must have been checked.
// `offset` and `offset + n` are at most PAGE_SIZE, so the casts to usize are exact.
#[allow(clippy::cast_possible_truncation)]
fn for_each_page<E>(
    sector: u64,
    len: u64,
    mut f: impl FnMut(u64, Range<usize>) -> Result<(), E>,
) -> Result<(), E> {
    let mut position = sector * SECTOR_BYTES;
    let end = position + len;
    while position < end {
        let index = position / PAGE_BYTES;
        let offset = position % PAGE_BYTES;
        let n = (PAGE_BYTES - offset).min(end - position);
        f(index, offset as usize..(offset + n) as usize)?;
        position += n;
    }
    Ok(())
}

/// What [`for_each_piece`] hands on: part of one page, or a run of whole pages.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PagePiece {
    /// Bytes `in_page` of page `index`, less than the whole page.
    Partial { index: u64, in_page: Range<usize> },
    /// Pages `first..first + count`, whole; `count` is at least 1.
    Whole { first: u64, count: usize },
}

/// Calls `f` for the pieces of the byte range `[sector * 512, sector * 512 + len)`, in order:
/// each maximal run of whole pages as one [`PagePiece::Whole`], and each page the range covers
/// only in part (at most one at either end) as a [`PagePiece::Partial`]. The range must have
/// been checked.
fn for_each_piece<E>(
    sector: u64,
    len: u64,
    mut f: impl FnMut(PagePiece) -> Result<(), E>,
) -> Result<(), E> {
    let mut run: Option<(u64, usize)> = None;
    for_each_page(sector, len, |index, in_page| {
        if in_page.len() == PAGE_SIZE {
            match &mut run {
                Some((_, count)) => *count += 1,
                None => run = Some((index, 1)),
            }
            return Ok(());
        }
        if let Some((first, count)) = run.take() {
            f(PagePiece::Whole { first, count })?;
        }
        f(PagePiece::Partial { index, in_page })
    })?;
    match run {
        Some((first, count)) => f(PagePiece::Whole { first, count }),
        None => Ok(()),
    }
}

/// One segment of a discard or write-zeroes request.
#[derive(Debug, Clone, Copy)]
struct RangeSegment {
    sector: u64,
    sectors: u32,
    flags: u32,
}

impl RangeSegment {
    fn read<M: GuestMemoryBackend>(cursor: &mut Cursor<'_>, mem: &M) -> Result<Self, CopyError> {
        let mut raw = [0u8; DISCARD_SEGMENT_LEN];
        cursor.read_into(mem, &mut raw)?;
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&raw[0..8]);
        Ok(RangeSegment {
            sector: u64::from_le_bytes(sector),
            sectors: u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]),
            flags: u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]),
        })
    }

    fn check<E: std::error::Error>(
        &self,
        kind: RequestType,
        device: &DeviceConfig,
    ) -> Result<(), RequestError<E>> {
        let allowed = match kind {
            RequestType::WriteZeroes => VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
            _ => 0,
        };
        if self.flags & !allowed != 0 {
            return Err(RequestError::BadSegmentFlags {
                kind,
                flags: self.flags,
            });
        }
        if self.sectors > MAX_DISCARD_SECTORS {
            return Err(RequestError::SegmentTooLong {
                sectors: self.sectors,
            });
        }
        check_sectors(self.sector, u64::from(self.sectors) * SECTOR_BYTES, device)
    }
}

/// Executes a discard or write-zeroes request whose segments follow the header in `payload`.
/// Every segment is checked before any is executed.
fn execute_ranges<M, B>(
    kind: RequestType,
    payload: &mut Cursor<'_>,
    mem: &M,
    backend: &B,
    device: &DeviceConfig,
) -> Result<(), RequestError<B::Error>>
where
    M: GuestMemoryBackend,
    B: BlockBackend,
{
    let len = payload.remaining;
    if len == 0 || !len.is_multiple_of(DISCARD_SEGMENT_LEN as u64) {
        return Err(RequestError::BadSegmentPayload { len });
    }
    let count = len / DISCARD_SEGMENT_LEN as u64;
    if count > u64::from(MAX_DISCARD_SEG) {
        return Err(RequestError::TooManySegments { count });
    }
    // Two passes over the same guest bytes; the second re-checks, so a guest that changes the
    // payload in between only gets an error, never an out-of-range operation.
    let mut check_pass = Cursor {
        segments: payload.segments,
        index: payload.index,
        offset: payload.offset,
        remaining: payload.remaining,
    };
    for _ in 0..count {
        RangeSegment::read(&mut check_pass, mem)
            .map_err(RequestError::Copy)?
            .check(kind, device)?;
    }
    for _ in 0..count {
        let segment = RangeSegment::read(payload, mem).map_err(RequestError::Copy)?;
        segment.check(kind, device)?;
        let start = segment.sector * SECTOR_BYTES;
        let end = start + u64::from(segment.sectors) * SECTOR_BYTES;
        let unmap =
            kind == RequestType::Discard || segment.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        let whole_pages = start.div_ceil(PAGE_BYTES)..end / PAGE_BYTES;
        if kind == RequestType::WriteZeroes {
            // Zero the partial pages at either end; whole pages are handled below.
            for_each_page(segment.sector, end - start, |index, in_page| {
                if in_page.len() == PAGE_SIZE {
                    return Ok(());
                }
                backend
                    .modify_page(index, |page| page[in_page].fill(0))
                    .map_err(|source| RequestError::WriteFailed { index, source })
            })?;
        }
        if whole_pages.is_empty() {
            // A discard smaller than a page frees nothing, as in zram.
            continue;
        }
        if unmap {
            let index = whole_pages.start;
            backend
                .discard_pages(whole_pages)
                .map_err(|source| RequestError::WriteFailed { index, source })?;
        } else {
            for index in whole_pages {
                backend
                    .write_page(index, &ZERO_PAGE)
                    .map_err(|source| RequestError::WriteFailed { index, source })?;
            }
        }
    }
    Ok(())
}

/// Why a queue's inflight region could not be used when the queue started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The ring's used index could not be read.
    #[error("cannot read the ring's used index")]
    Ring(#[source] virtio_queue::Error),
    /// The region does not fit the ring.
    #[error("the inflight region does not fit the ring")]
    Region(#[source] InflightError),
}

/// A descriptor chain as [`RequestRunner::take`] walks it: the head it starts at and its
/// descriptors in order (indirect tables followed).
pub trait Chain: Iterator<Item = Descriptor> {
    /// The chain's head index: what the used entry names.
    fn head_index(&self) -> u16;
}

impl<M> Chain for DescriptorChain<&M>
where
    M: GuestMemoryBackend,
{
    fn head_index(&self) -> u16 {
        DescriptorChain::head_index(self)
    }
}

/// The chain that starts at a given head of a queue's descriptor table: how a head an earlier
/// backend took is walked again when it is resubmitted (virtio-queue builds chains only for
/// heads it pops from the avail ring). It follows virtio-queue's `DescriptorChain` step by
/// step: at most as many descriptors as the table holds, an index past the table ends the
/// chain, one level of indirect table (a multiple of 16 bytes, at most 65535 entries), and
/// no more than 2^32 - 1 bytes in all.
pub struct ResubmitChain<'m, M> {
    mem: &'m M,
    desc_table: GuestAddress,
    table_size: u16,
    head_index: u16,
    next_index: u16,
    ttl: u16,
    is_indirect: bool,
    yielded_bytes: u32,
}

impl<'m, M: GuestMemoryBackend> ResubmitChain<'m, M> {
    /// The chain of `head` in the descriptor table at `desc_table` of a queue of
    /// `queue_size` entries.
    pub fn new(mem: &'m M, desc_table: u64, queue_size: u16, head: u16) -> Self {
        ResubmitChain {
            mem,
            desc_table: GuestAddress(desc_table),
            table_size: queue_size,
            head_index: head,
            next_index: head,
            ttl: queue_size,
            is_indirect: false,
            yielded_bytes: 0,
        }
    }

    fn switch_to_indirect_table(&mut self, desc: &Descriptor) -> Option<()> {
        const DESC_SIZE: u32 = 16;
        if self.is_indirect || !desc.len().is_multiple_of(DESC_SIZE) {
            return None;
        }
        let entries = u16::try_from(desc.len() / DESC_SIZE).ok()?;
        self.desc_table = desc.addr();
        self.table_size = entries;
        self.next_index = 0;
        self.ttl = entries;
        self.is_indirect = true;
        Some(())
    }
}

impl<M: GuestMemoryBackend> Iterator for ResubmitChain<'_, M> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        loop {
            if self.ttl == 0 || self.next_index >= self.table_size {
                return None;
            }
            let addr = self
                .desc_table
                .checked_add(u64::from(self.next_index) * 16)?;
            let desc = self.mem.read_obj::<Descriptor>(addr).ok()?;
            if desc.refers_to_indirect_table() {
                self.switch_to_indirect_table(&desc)?;
                continue;
            }
            self.yielded_bytes = self.yielded_bytes.checked_add(desc.len())?;
            if desc.has_next() {
                self.next_index = desc.next();
                self.ttl -= 1;
            } else {
                self.ttl = 0;
            }
            return Some(desc);
        }
    }
}

impl<M: GuestMemoryBackend> Chain for ResubmitChain<'_, M> {
    fn head_index(&self) -> u16 {
        self.head_index
    }
}

/// Formats an error with its sources, `outer: inner: innermost`.
pub(crate) struct ErrorChain<'e>(pub(crate) &'e dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(error) = source {
            write!(f, ": {error}")?;
            source = error.source();
        }
        Ok(())
    }
}
