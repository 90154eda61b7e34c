// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The vhost-user inflight I/O tracking region (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`).
//!
//! The frontend asks the backend for a shared memory region (`GET_INFLIGHT_FD`), keeps the
//! file, and hands it to every backend it connects to afterwards (`SET_INFLIGHT_FD`). The
//! backend records in it which descriptor heads it has taken from each ring and not yet put
//! on the used ring, so that a backend started after a crash resubmits exactly those requests.
//! The layout is the split-ring one of vhost-user.rst ("Inflight I/O tracking") and
//! libvhost-user; per queue, 64-byte aligned (libvhost-user's `vu_inflight_queue_size`):
//!
//! ```text
//! u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
//! DescStateSplit desc[desc_num];   // { u8 inflight; u8 padding[5]; u16 next; u64 counter; }
//! ```
//!
//! The device does not offer `VIRTIO_F_RING_PACKED`, so there is no packed layout here.
//!
//! The region is shared with the frontend, which may write it at any time: every field is
//! read and written through atomics on the mapping, every value read is checked before it is
//! used as an index, and nothing here panics on what the region holds.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{compiler_fence, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

/// Per-queue regions start on this boundary (libvhost-user's `INFLIGHT_ALIGNMENT`).
pub const INFLIGHT_ALIGNMENT: u64 = 64;
/// The region version this backend writes (libvhost-user's `INFLIGHT_VERSION`).
pub const INFLIGHT_VERSION: u16 = 1;
/// The per-queue header: features, version, desc_num, last_batch_head, used_idx.
const QUEUE_HEADER_LEN: usize = 16;
/// One `DescStateSplit`.
const DESC_STATE_LEN: usize = 16;

const VERSION_OFFSET: usize = 8;
const DESC_NUM_OFFSET: usize = 10;
const LAST_BATCH_HEAD_OFFSET: usize = 12;
const USED_IDX_OFFSET: usize = 14;
const DESC_INFLIGHT_OFFSET: usize = 0;
const DESC_COUNTER_OFFSET: usize = 8;

/// The bytes one queue of `queue_size` entries takes, as libvhost-user computes them (and so
/// QEMU and cloud-hypervisor, which only ever see the total): `desc_num` descriptor states
/// plus two bytes, rounded up to 64. The rounding always leaves room for the 16-byte header.
pub fn queue_region_len(queue_size: u16) -> u64 {
    let raw = DESC_STATE_LEN as u64 * u64::from(queue_size) + 2;
    raw.div_ceil(INFLIGHT_ALIGNMENT) * INFLIGHT_ALIGNMENT
}

/// Where queue `queue`'s part starts: below `region_len`, which the mapping's length (a
/// `usize`) was checked to hold, for every queue of the region.
#[allow(clippy::cast_possible_truncation)]
fn part_offset(queue_size: u16, queue: u16) -> usize {
    (queue_region_len(queue_size) * u64::from(queue)) as usize
}

/// The size of the whole region for `num_queues` queues of `queue_size` entries.
pub fn region_len(num_queues: u16, queue_size: u16) -> u64 {
    queue_region_len(queue_size) * u64::from(num_queues)
}

/// Why an inflight region was refused.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// The frontend asked for more queues than the device has, or none.
    #[error("the frontend's inflight region is for {asked} queue(s); the device has 1 to {ours}")]
    QueueCount {
        /// The number the frontend sent.
        asked: u16,
        /// The device's number of queues.
        ours: u16,
    },
    /// The frontend's queue size is zero or larger than the device's.
    #[error("the frontend's inflight region is for queues of {asked} entries; the device's hold 1 to {ours}")]
    QueueSize {
        /// The size the frontend sent.
        asked: u16,
        /// The device's largest queue size.
        ours: u16,
    },
    /// The region is smaller than the queues it is for need.
    #[error(
        "the inflight region of {len} bytes is smaller than the {needed} bytes its queues need"
    )]
    TooSmall {
        /// The size the frontend sent.
        len: u64,
        /// What the queues need.
        needed: u64,
    },
    /// The region's offset is not page-aligned or lies past the end of its file.
    #[error("the inflight region at offset {offset} ({len} bytes) does not fit a {file_len}-byte file at a page boundary")]
    BadPlacement {
        /// The offset the frontend sent.
        offset: u64,
        /// The bytes needed from there.
        len: u64,
        /// The file's size.
        file_len: u64,
    },
    /// The region's file could still be shrunk, which would fault the daemon when it writes.
    #[error("the inflight region's file is not sealed against shrinking")]
    NotSealed,
    /// The fd cannot be inspected or mapped.
    #[error("the inflight region cannot be mapped")]
    Map(#[source] io::Error),
    /// A memfd for a new region could not be made.
    #[error("cannot create the inflight region")]
    Create(#[source] io::Error),
    /// A queue's region names a version this backend does not know.
    #[error("queue {queue}'s inflight region has version {version}, not {INFLIGHT_VERSION}")]
    Version {
        /// The queue.
        queue: u16,
        /// The version found.
        version: u16,
    },
    /// A queue's region was written for another queue size.
    #[error(
        "queue {queue}'s inflight region holds {desc_num} entries, the frontend says {queue_size}"
    )]
    DescNum {
        /// The queue.
        queue: u16,
        /// The `desc_num` found.
        desc_num: u16,
        /// The queue size the frontend sent (or the ring's size at start).
        queue_size: u16,
    },
    /// A queue's last batch head is not a descriptor index.
    #[error("queue {queue}'s inflight region names head {head} as its last batch, past its {desc_num} entries")]
    HeadOutOfRange {
        /// The queue.
        queue: u16,
        /// The head found.
        head: u16,
        /// The region's entries.
        desc_num: u16,
    },
    /// An inflight flag that is neither 0 nor 1.
    #[error("queue {queue}'s inflight region marks head {head} with {flag}, neither 0 nor 1")]
    BadFlag {
        /// The queue.
        queue: u16,
        /// The descriptor head.
        head: u16,
        /// The flag found.
        flag: u8,
    },
    /// Two heads in flight with the same counter: their order is unknown.
    #[error("queue {queue}'s inflight region gives heads {first} and {second} the same counter {counter}")]
    DuplicateCounter {
        /// The queue.
        queue: u16,
        /// One head.
        first: u16,
        /// The other head.
        second: u16,
        /// Their counter.
        counter: u64,
    },
}

/// A mapped inflight region.
pub struct InflightRegion {
    base: NonNull<u8>,
    /// The bytes mapped: exactly what `num_queues` queues of `queue_size` entries need.
    len: usize,
    num_queues: u16,
    queue_size: u16,
}

// SAFETY: the region is a shared mapping that lives as long as this value; every access goes
// through atomics on it, so sharing it between threads is sound.
unsafe impl Send for InflightRegion {}
// SAFETY: as above: all accesses are atomic.
unsafe impl Sync for InflightRegion {}

impl std::fmt::Debug for InflightRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightRegion")
            .field("len", &self.len)
            .field("num_queues", &self.num_queues)
            .field("queue_size", &self.queue_size)
            .finish()
    }
}

impl Drop for InflightRegion {
    fn drop(&mut self) {
        // SAFETY: `base` and `len` are exactly the mapping `map` made, and it is unmapped
        // once, here; no `InflightQueue` outlives the region (each holds an `Arc` to it).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

/// The size the device allows: `num_queues` in `1..=max_queues`, `queue_size` in
/// `1..=max_queue_size`.
fn check_shape(
    num_queues: u16,
    queue_size: u16,
    max_queues: u16,
    max_queue_size: u16,
) -> Result<(), InflightError> {
    if num_queues == 0 || num_queues > max_queues {
        return Err(InflightError::QueueCount {
            asked: num_queues,
            ours: max_queues,
        });
    }
    if queue_size == 0 || queue_size > max_queue_size {
        return Err(InflightError::QueueSize {
            asked: queue_size,
            ours: max_queue_size,
        });
    }
    Ok(())
}

/// Makes a zero-filled region for `num_queues` queues of `queue_size` entries
/// (`GET_INFLIGHT_FD`): a memfd of the right size, sealed against growing, shrinking and
/// further sealing, as libvhost-user makes it. Returns the file and its size.
pub fn create_region(
    num_queues: u16,
    queue_size: u16,
    max_queues: u16,
    max_queue_size: u16,
) -> Result<(File, u64), InflightError> {
    check_shape(num_queues, queue_size, max_queues, max_queue_size)?;
    let len = region_len(num_queues, queue_size);
    // SAFETY: the name is a NUL-terminated literal; memfd_create only reads it.
    let fd = unsafe {
        libc::memfd_create(
            c"vhost-user-zram-inflight".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(InflightError::Create(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len).map_err(InflightError::Create)?;
    let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on a memfd this function owns; it only adds seals.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(InflightError::Create(io::Error::last_os_error()));
    }
    Ok((file, len))
}

impl InflightRegion {
    /// Maps the region the frontend hands over (`SET_INFLIGHT_FD`) after checking everything
    /// it says against the device and the file, and checks each queue's part: a part a
    /// backend used before must have version 1, `desc_num` equal to `queue_size`, a last batch
    /// head inside it and flags of 0 or 1; a part never used gets `desc_num`, as libvhost-user
    /// writes it. The file is closed afterwards; the mapping keeps the memory.
    pub fn map(
        file: &File,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
        max_queues: u16,
        max_queue_size: u16,
    ) -> Result<InflightRegion, InflightError> {
        check_shape(num_queues, queue_size, max_queues, max_queue_size)?;
        let needed = region_len(num_queues, queue_size);
        if mmap_size < needed {
            return Err(InflightError::TooSmall {
                len: mmap_size,
                needed,
            });
        }
        let file_len = file.metadata().map_err(InflightError::Map)?.len();
        // SAFETY: sysconf only reads a system constant.
        let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let fits = mmap_offset
            .checked_add(needed)
            .is_some_and(|end| end <= file_len);
        if !fits || !mmap_offset.is_multiple_of(page) {
            return Err(InflightError::BadPlacement {
                offset: mmap_offset,
                len: needed,
                file_len,
            });
        }
        // SAFETY: F_GET_SEALS only reads the file's seals.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(InflightError::NotSealed);
        }
        let len = usize::try_from(needed).map_err(|_| InflightError::TooSmall {
            len: mmap_size,
            needed,
        })?;
        let offset =
            libc::off_t::try_from(mmap_offset).map_err(|_| InflightError::BadPlacement {
                offset: mmap_offset,
                len: needed,
                file_len,
            })?;
        // SAFETY: a new shared mapping of `len` bytes of a file we checked holds them (and
        // cannot shrink: sealed); it aliases no Rust object, and is only accessed through
        // atomics.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(InflightError::Map(io::Error::last_os_error()));
        }
        let base = NonNull::new(addr.cast::<u8>())
            .ok_or_else(|| InflightError::Map(io::Error::other("mmap returned null")))?;
        let region = InflightRegion {
            base,
            len,
            num_queues,
            queue_size,
        };
        for queue in 0..num_queues {
            region.check_queue(queue)?;
        }
        Ok(region)
    }

    /// The queues the region is for.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Queue `queue`'s part, or `None` past the region's queues.
    pub fn queue(self: &Arc<Self>, queue: u16) -> Option<InflightQueue> {
        (queue < self.num_queues).then(|| InflightQueue {
            region: Arc::clone(self),
            offset: part_offset(self.queue_size, queue),
            index: queue,
            desc_num: self.queue_size,
        })
    }

    fn check_queue(&self, queue: u16) -> Result<(), InflightError> {
        let part = InflightQueue::unshared(self, queue);
        let version = part.version().load(Ordering::Acquire);
        if version == 0 {
            part.header_u16(DESC_NUM_OFFSET)
                .store(self.queue_size, Ordering::Relaxed);
            return Ok(());
        }
        if version != INFLIGHT_VERSION {
            return Err(InflightError::Version { queue, version });
        }
        let desc_num = part.header_u16(DESC_NUM_OFFSET).load(Ordering::Relaxed);
        if desc_num != self.queue_size {
            return Err(InflightError::DescNum {
                queue,
                desc_num,
                queue_size: self.queue_size,
            });
        }
        let head = part
            .header_u16(LAST_BATCH_HEAD_OFFSET)
            .load(Ordering::Relaxed);
        if head >= desc_num {
            return Err(InflightError::HeadOutOfRange {
                queue,
                head,
                desc_num,
            });
        }
        for head in 0..desc_num {
            let flag = part.flag(head).load(Ordering::Relaxed);
            if flag > 1 {
                return Err(InflightError::BadFlag { queue, head, flag });
            }
        }
        Ok(())
    }
}

/// One queue's part of an inflight region: what the queue thread writes as it takes and
/// completes requests.
///
/// The writes follow libvhost-user (`vu_queue_inflight_get/pre_put/post_put`): a head is
/// marked in flight, with the next counter, before its request is executed; before its used
/// entry is written the head becomes the "last batch head"; after the used index is
/// published its flag is cleared and the region's used index follows. What must survive is
/// the order of these stores as the crashed process issued them (the frontend reads the
/// region only after the backend is gone, and a killed process's stores all land), so a
/// compiler fence between the steps is what the ordering needs, as libvhost-user's
/// `barrier()`.
#[derive(Debug)]
pub struct InflightQueue {
    region: Arc<InflightRegion>,
    /// Where the queue's part starts in the mapping.
    offset: usize,
    index: u16,
    desc_num: u16,
}

/// What a queue's region says when the queue starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueStart {
    /// The region was never used: nothing to resubmit.
    Fresh,
    /// An earlier backend used it: the heads to resubmit were collected (oldest last), the
    /// queue's next avail index is `next_avail`, and counters go on after `last_counter`.
    Resumed {
        /// The avail index after every head taken so far.
        next_avail: u16,
        /// The largest counter of a head in flight (0 when none is).
        last_counter: u64,
        /// Whether the last batch head was found completed (its flag cleared).
        last_batch_completed: bool,
    },
    /// The region's used index is not the ring's, nor one behind it: the region does not
    /// belong to this ring (a frontend that reset the ring and kept the region). It was
    /// cleared and follows the ring from here; nothing is resubmitted.
    Cleared {
        /// The region's used index.
        region_used: u16,
        /// The ring's.
        ring_used: u16,
    },
}

impl InflightQueue {
    /// A view for checking a region before it is shared in an `Arc`.
    fn unshared(region: &InflightRegion, queue: u16) -> InflightQueueRef<'_> {
        InflightQueueRef {
            region,
            offset: part_offset(region.queue_size, queue),
        }
    }

    fn view(&self) -> InflightQueueRef<'_> {
        InflightQueueRef {
            region: &self.region,
            offset: self.offset,
        }
    }

    /// The queue's number.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Records that `head` was taken from the ring, as the `counter`-th request. Heads past
    /// the region are ignored (virtio-queue never yields one past the ring, and the ring's
    /// size was checked against the region when the queue started).
    pub fn take(&self, head: u16, counter: u64) {
        if head >= self.desc_num {
            return;
        }
        let view = self.view();
        view.counter(head).store(counter, Ordering::Relaxed);
        view.flag(head).store(1, Ordering::Relaxed);
        compiler_fence(Ordering::SeqCst);
    }

    /// Before the used entry of `head` is written: it is the last batch.
    pub fn pre_put(&self, head: u16) {
        if head >= self.desc_num {
            return;
        }
        self.view()
            .header_u16(LAST_BATCH_HEAD_OFFSET)
            .store(head, Ordering::Relaxed);
        compiler_fence(Ordering::SeqCst);
    }

    /// After the used index `used_idx` that includes `head` was published.
    pub fn post_put(&self, head: u16, used_idx: u16) {
        if head >= self.desc_num {
            return;
        }
        let view = self.view();
        compiler_fence(Ordering::SeqCst);
        view.flag(head).store(0, Ordering::Relaxed);
        compiler_fence(Ordering::SeqCst);
        view.header_u16(USED_IDX_OFFSET)
            .store(used_idx, Ordering::Relaxed);
    }

    /// Reads the region when the queue starts, as libvhost-user's `vu_check_queue_inflights`:
    /// a region never used is stamped with the version and resubmits nothing. Otherwise, when
    /// the ring's used index is one past the region's, the last batch head was completed
    /// before the crash: its flag is cleared. The heads still in flight are put in
    /// `resubmit`, newest first (so `pop` yields the oldest), and the avail index to go on
    /// from is the used index plus their number. `ring_size` may not exceed the region's
    /// entries, and no head in flight may lie past it. A used index further off means the region does not belong to this ring (a
    /// frontend that reset the ring without a new region): it is cleared and nothing is
    /// resubmitted ([`QueueStart::Cleared`]).
    pub fn start(
        &self,
        ring_size: u16,
        ring_used_idx: u16,
        resubmit: &mut Vec<u16>,
    ) -> Result<QueueStart, InflightError> {
        resubmit.clear();
        let view = self.view();
        let queue = self.index;
        let version = view.version().load(Ordering::Acquire);
        if version == 0 {
            view.header_u16(DESC_NUM_OFFSET)
                .store(self.desc_num, Ordering::Relaxed);
            view.version().store(INFLIGHT_VERSION, Ordering::Release);
            return Ok(QueueStart::Fresh);
        }
        if version != INFLIGHT_VERSION {
            return Err(InflightError::Version { queue, version });
        }
        // A driver may use a ring smaller than the queue size the frontend announced (a
        // firmware driver does); every head of it is then inside the region. A larger ring
        // would have heads the region cannot record.
        if ring_size > self.desc_num {
            return Err(InflightError::DescNum {
                queue,
                desc_num: self.desc_num,
                queue_size: ring_size,
            });
        }
        let region_used = view.header_u16(USED_IDX_OFFSET).load(Ordering::Relaxed);
        let mut last_batch_completed = false;
        if region_used != ring_used_idx {
            if ring_used_idx.wrapping_sub(region_used) == 1 {
                let head = view
                    .header_u16(LAST_BATCH_HEAD_OFFSET)
                    .load(Ordering::Relaxed);
                if head >= self.desc_num {
                    return Err(InflightError::HeadOutOfRange {
                        queue,
                        head,
                        desc_num: self.desc_num,
                    });
                }
                view.flag(head).store(0, Ordering::Relaxed);
                last_batch_completed = true;
            } else {
                for head in 0..self.desc_num {
                    view.flag(head).store(0, Ordering::Relaxed);
                }
                compiler_fence(Ordering::SeqCst);
                view.header_u16(USED_IDX_OFFSET)
                    .store(ring_used_idx, Ordering::Relaxed);
                return Ok(QueueStart::Cleared {
                    region_used,
                    ring_used: ring_used_idx,
                });
            }
            compiler_fence(Ordering::SeqCst);
            view.header_u16(USED_IDX_OFFSET)
                .store(ring_used_idx, Ordering::Relaxed);
        }
        // (counter, head) of every head in flight.
        let mut taken: Vec<(u64, u16)> = Vec::new();
        for head in 0..self.desc_num {
            match view.flag(head).load(Ordering::Relaxed) {
                0 => {}
                1 if head >= ring_size => {
                    return Err(InflightError::HeadOutOfRange {
                        queue,
                        head,
                        desc_num: ring_size,
                    })
                }
                1 => taken.push((view.counter(head).load(Ordering::Relaxed), head)),
                flag => return Err(InflightError::BadFlag { queue, head, flag }),
            }
        }
        taken.sort_unstable();
        if let Some(pair) = taken.windows(2).find(|pair| pair[0].0 == pair[1].0) {
            return Err(InflightError::DuplicateCounter {
                queue,
                first: pair[0].1,
                second: pair[1].1,
                counter: pair[0].0,
            });
        }
        let last_counter = taken.last().map_or(0, |&(counter, _)| counter);
        resubmit.extend(taken.iter().rev().map(|&(_, head)| head));
        // At most `desc_num` (a u16) heads are in flight.
        let inuse = u16::try_from(taken.len()).unwrap_or(u16::MAX);
        Ok(QueueStart::Resumed {
            next_avail: ring_used_idx.wrapping_add(inuse),
            last_counter,
            last_batch_completed,
        })
    }
}

/// Accessors for one queue's part; every offset is inside the mapping by construction
/// (`offset` is a whole number of queue parts below `num_queues`, heads are checked against
/// `desc_num`).
struct InflightQueueRef<'r> {
    region: &'r InflightRegion,
    offset: usize,
}

impl InflightQueueRef<'_> {
    /// The address of `at` bytes into the queue's part.
    fn at(&self, at: usize) -> *mut u8 {
        debug_assert!(self.offset + at < self.region.len);
        // SAFETY: callers pass offsets inside the queue's part, which lies inside the
        // mapping (see the struct's comment), so the pointer stays in the same allocation.
        unsafe { self.region.base.as_ptr().add(self.offset + at) }
    }

    fn header_u16(&self, field: usize) -> &AtomicU16 {
        // SAFETY: header fields are at even offsets of a 64-byte aligned part of a
        // page-aligned mapping, so aligned for u16; the mapping lives as long as `region`;
        // an atomic may alias memory another process writes.
        unsafe { &*self.at(field).cast::<AtomicU16>() }
    }

    fn version(&self) -> &AtomicU16 {
        self.header_u16(VERSION_OFFSET)
    }

    fn flag(&self, head: u16) -> &AtomicU8 {
        let at = QUEUE_HEADER_LEN + usize::from(head) * DESC_STATE_LEN + DESC_INFLIGHT_OFFSET;
        // SAFETY: `head` is below `desc_num` (checked by every caller), so the byte is inside
        // the part; u8 needs no alignment; the mapping lives as long as `region`.
        unsafe { &*self.at(at).cast::<AtomicU8>() }
    }

    fn counter(&self, head: u16) -> &AtomicU64 {
        let at = QUEUE_HEADER_LEN + usize::from(head) * DESC_STATE_LEN + DESC_COUNTER_OFFSET;
        // SAFETY: as `flag`; the counter is at offset 8 of a 16-byte state that starts 16
        // bytes into a 64-byte aligned part, so aligned for u64.
        unsafe { &*self.at(at).cast::<AtomicU64>() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// libvhost-user's `vu_inflight_queue_size`, written as in C:
    /// `ALIGN_UP(sizeof(VuDescStateSplit) * queue_size + sizeof(uint16_t), INFLIGHT_ALIGNMENT)`.
    fn libvhost_user_queue_size(queue_size: u64) -> u64 {
        let x = 16 * queue_size + 2;
        (x + 63) & !63
    }

    #[test]
    fn region_sizes_match_libvhost_user_for_common_queue_sizes() {
        for queue_size in [128u16, 256, 1024] {
            for queues in 1..=4u16 {
                assert_eq!(
                    region_len(queues, queue_size),
                    libvhost_user_queue_size(u64::from(queue_size)) * u64::from(queues),
                    "{queues} queue(s) of {queue_size}"
                );
            }
        }
        assert_eq!(queue_region_len(128), 2112);
        assert_eq!(queue_region_len(256), 4160);
        assert_eq!(queue_region_len(1024), 16448);
    }

    #[test]
    fn every_queue_part_holds_its_header_and_states() {
        for queue_size in 1..=1024u16 {
            let room = QUEUE_HEADER_LEN as u64 + DESC_STATE_LEN as u64 * u64::from(queue_size);
            assert!(queue_region_len(queue_size) >= room, "{queue_size}");
            assert_eq!(queue_region_len(queue_size) % INFLIGHT_ALIGNMENT, 0);
        }
    }

    fn mapped(queues: u16, size: u16) -> (File, Arc<InflightRegion>) {
        let (file, len) = create_region(queues, size, 4, 1024).unwrap();
        let region = InflightRegion::map(&file, len, 0, queues, size, 4, 1024).unwrap();
        (file, Arc::new(region))
    }

    #[test]
    fn a_new_region_is_zeroed_sealed_and_stamped_at_first_start() {
        let (file, region) = mapped(2, 128);
        assert_eq!(file.metadata().unwrap().len(), region_len(2, 128));
        assert!(file.set_len(16).is_err(), "sealed against shrinking");
        let queue = region.queue(1).unwrap();
        let mut resubmit = Vec::new();
        assert_eq!(
            queue.start(128, 0, &mut resubmit).unwrap(),
            QueueStart::Fresh
        );
        assert!(resubmit.is_empty());
        let view = queue.view();
        assert_eq!(view.version().load(Ordering::Relaxed), INFLIGHT_VERSION);
        assert_eq!(
            view.header_u16(DESC_NUM_OFFSET).load(Ordering::Relaxed),
            128
        );
    }

    #[test]
    fn start_resubmits_heads_in_counter_order_and_skips_the_completed_last_batch() {
        let (_file, region) = mapped(1, 8);
        let queue = region.queue(0).unwrap();
        let mut resubmit = Vec::new();
        queue.start(8, 0, &mut resubmit).unwrap();
        // Taken: 5 (1), 2 (2), 7 (3), 0 (4). Head 2 completed fully, head 7 completed up to
        // the used index (crash before its flag was cleared).
        for (counter, head) in [(1, 5), (2, 2), (3, 7), (4, 0)] {
            queue.take(head, counter);
        }
        queue.pre_put(2);
        queue.post_put(2, 1);
        queue.pre_put(7);
        let start = queue.start(8, 2, &mut resubmit).unwrap();
        assert_eq!(
            start,
            QueueStart::Resumed {
                next_avail: 4,
                last_counter: 4,
                last_batch_completed: true
            }
        );
        assert_eq!(resubmit, vec![0, 5], "popped oldest first: 5, then 0");
    }

    #[test]
    fn a_region_for_another_ring_is_cleared_not_resubmitted() {
        let (_file, region) = mapped(1, 8);
        let queue = region.queue(0).unwrap();
        let mut resubmit = Vec::new();
        queue.start(8, 0, &mut resubmit).unwrap();
        queue.take(3, 1);
        let start = queue.start(8, 40, &mut resubmit).unwrap();
        assert_eq!(
            start,
            QueueStart::Cleared {
                region_used: 0,
                ring_used: 40
            }
        );
        assert!(resubmit.is_empty());
        assert_eq!(queue.view().flag(3).load(Ordering::Relaxed), 0);
    }

    #[test]
    fn hostile_regions_are_refused() {
        let (file, len) = create_region(1, 128, 4, 1024).unwrap();
        assert!(matches!(
            InflightRegion::map(&file, len - 1, 0, 1, 128, 4, 1024),
            Err(InflightError::TooSmall { .. })
        ));
        assert!(matches!(
            InflightRegion::map(&file, len, 4096, 1, 128, 4, 1024),
            Err(InflightError::BadPlacement { .. })
        ));
        assert!(matches!(
            InflightRegion::map(&file, len, 0, 5, 128, 4, 1024),
            Err(InflightError::QueueCount { .. })
        ));
        assert!(matches!(
            InflightRegion::map(&file, len, 0, 1, 2048, 4, 1024),
            Err(InflightError::QueueSize { .. })
        ));
        let unsealed = tempfile::tempfile().unwrap();
        unsealed.set_len(len).unwrap();
        assert!(matches!(
            InflightRegion::map(&unsealed, len, 0, 1, 128, 4, 1024),
            Err(InflightError::NotSealed)
        ));

        let region = Arc::new(InflightRegion::map(&file, len, 0, 1, 128, 4, 1024).unwrap());
        let view = region.queue(0).unwrap();
        let mut resubmit = Vec::new();
        view.start(128, 0, &mut resubmit).unwrap();
        view.view().flag(9).store(7, Ordering::Relaxed);
        assert!(matches!(
            InflightRegion::map(&file, len, 0, 1, 128, 4, 1024),
            Err(InflightError::BadFlag {
                head: 9,
                flag: 7,
                ..
            })
        ));
        view.view().flag(9).store(0, Ordering::Relaxed);
        view.view()
            .header_u16(LAST_BATCH_HEAD_OFFSET)
            .store(128, Ordering::Relaxed);
        assert!(matches!(
            InflightRegion::map(&file, len, 0, 1, 128, 4, 1024),
            Err(InflightError::HeadOutOfRange { head: 128, .. })
        ));
        view.view()
            .header_u16(LAST_BATCH_HEAD_OFFSET)
            .store(0, Ordering::Relaxed);
        assert!(matches!(
            InflightRegion::map(&file, len, 0, 1, 64, 4, 1024),
            Err(InflightError::DescNum {
                desc_num: 128,
                queue_size: 64,
                ..
            })
        ));
        view.take(1, 5);
        view.take(2, 5);
        assert!(matches!(
            view.start(128, 0, &mut resubmit),
            Err(InflightError::DuplicateCounter { counter: 5, .. })
        ));
        assert!(matches!(
            view.start(256, 0, &mut resubmit),
            Err(InflightError::DescNum {
                desc_num: 128,
                queue_size: 256,
                ..
            })
        ));
    }

    #[test]
    fn a_ring_smaller_than_the_region_resumes_and_one_with_heads_past_it_is_refused() {
        let (_file, region) = mapped(1, 128);
        let queue = region.queue(0).unwrap();
        let mut resubmit = Vec::new();
        queue.start(64, 0, &mut resubmit).unwrap();
        queue.take(10, 1);
        let start = queue.start(64, 0, &mut resubmit).unwrap();
        assert!(matches!(start, QueueStart::Resumed { next_avail: 1, .. }));
        assert_eq!(resubmit, vec![10]);
        queue.take(100, 2);
        assert!(matches!(
            queue.start(64, 0, &mut resubmit),
            Err(InflightError::HeadOutOfRange {
                head: 100,
                desc_num: 64,
                ..
            })
        ));
    }
}
