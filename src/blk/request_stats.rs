// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Request counts and latencies by request type, for `ctl metrics`.
//!
//! Every queue thread records into its own slot, padded to a cache line pair, so the request
//! path never writes a counter another thread writes: no shared hot cache line, no lock.
//! Counters are relaxed atomics; [`RequestStats::snapshot`] sums every slot. A snapshot taken
//! while requests complete may count a request in `count` but not yet in its bucket (or the
//! other way round) for an instant; each figure on its own only ever grows.
//!
//! Latencies go into fixed log2 buckets: bucket `i` counts latencies up to `2^i` µs, from 1 µs
//! to 2^20 µs (about 1.05 s), and one last bucket takes everything slower. These are the
//! cumulative histogram buckets Prometheus expects (`le="..."`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The kinds of requests a queue serves, as virtio-blk names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestKind {
    /// `VIRTIO_BLK_T_IN`.
    Read,
    /// `VIRTIO_BLK_T_OUT`.
    Write,
    /// `VIRTIO_BLK_T_FLUSH`.
    Flush,
    /// `VIRTIO_BLK_T_GET_ID`.
    GetId,
    /// `VIRTIO_BLK_T_DISCARD`.
    Discard,
    /// `VIRTIO_BLK_T_WRITE_ZEROES`.
    WriteZeroes,
    /// Any other type, or a request too malformed to have one.
    Unsupported,
}

impl RequestKind {
    /// Every kind, in a fixed order (the order of [`RequestStatsSnapshot::kinds`]).
    pub const ALL: [RequestKind; 7] = [
        RequestKind::Read,
        RequestKind::Write,
        RequestKind::Flush,
        RequestKind::GetId,
        RequestKind::Discard,
        RequestKind::WriteZeroes,
        RequestKind::Unsupported,
    ];

    /// The kind's name in metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            RequestKind::Read => "read",
            RequestKind::Write => "write",
            RequestKind::Flush => "flush",
            RequestKind::GetId => "get_id",
            RequestKind::Discard => "discard",
            RequestKind::WriteZeroes => "write_zeroes",
            RequestKind::Unsupported => "unsupported",
        }
    }

    fn index(self) -> usize {
        match self {
            RequestKind::Read => 0,
            RequestKind::Write => 1,
            RequestKind::Flush => 2,
            RequestKind::GetId => 3,
            RequestKind::Discard => 4,
            RequestKind::WriteZeroes => 5,
            RequestKind::Unsupported => 6,
        }
    }
}

const KINDS: usize = RequestKind::ALL.len();

/// Finite latency buckets: bucket `i` holds latencies of at most `2^i` µs, `i` in `0..=20`.
pub const LATENCY_BUCKETS: usize = 21;

/// The upper bound of finite bucket `bucket`, in microseconds.
pub fn bucket_bound_us(bucket: usize) -> u64 {
    1 << bucket
}

/// The bucket of a latency: the first whose bound it does not exceed, or
/// [`LATENCY_BUCKETS`] (the overflow bucket) for anything above 2^20 µs.
fn bucket_of(latency: Duration) -> usize {
    let micros = latency.as_micros();
    if micros <= 1 {
        return 0;
    }
    // ceil(log2(micros)): the smallest i with 2^i >= micros.
    let bucket = (u128::BITS - (micros - 1).leading_zeros()) as usize;
    bucket.min(LATENCY_BUCKETS)
}

/// One kind's counters in one slot.
#[derive(Debug, Default)]
struct KindCounters {
    count: AtomicU64,
    errors: AtomicU64,
    latency_sum_ns: AtomicU64,
    /// Non-cumulative: `buckets[i]` counts latencies that fall in bucket `i` alone; the last
    /// entry is the overflow bucket.
    buckets: [AtomicU64; LATENCY_BUCKETS + 1],
}

/// One queue's counters, aligned so that two queues never share a cache line (128 bytes covers
/// the adjacent-line prefetcher of x86 as well).
#[derive(Debug, Default)]
#[repr(align(128))]
struct QueueSlot {
    kinds: [KindCounters; KINDS],
}

/// Request counters shared by every queue thread of a device.
#[derive(Debug)]
pub struct RequestStats {
    slots: Box<[QueueSlot]>,
}

/// One kind's totals over every queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindSnapshot {
    /// Requests completed (with success or failure).
    pub count: u64,
    /// Requests among them that failed (any status but OK).
    pub errors: u64,
    /// The sum of every latency, nanoseconds.
    pub latency_sum_ns: u64,
    /// Requests per latency bucket (not cumulative); the last entry counts latencies above the
    /// last finite bound.
    pub buckets: [u64; LATENCY_BUCKETS + 1],
}

/// Every kind's totals, in [`RequestKind::ALL`] order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestStatsSnapshot {
    /// One entry per kind.
    pub kinds: [KindSnapshot; KINDS],
}

impl RequestStatsSnapshot {
    /// The totals of `kind`.
    pub fn kind(&self, kind: RequestKind) -> &KindSnapshot {
        &self.kinds[kind.index()]
    }
}

impl RequestStats {
    /// Counters for `queues` queues (at least one slot).
    pub fn new(queues: usize) -> Self {
        RequestStats {
            slots: (0..queues.max(1)).map(|_| QueueSlot::default()).collect(),
        }
    }

    /// The number of queue slots.
    pub fn queues(&self) -> usize {
        self.slots.len()
    }

    /// Counts one completed request of `kind` on `queue` that took `latency`. A queue index
    /// beyond the slots made is folded into them (`queue % queues`), so a miscount can never
    /// panic the request path.
    pub fn record(&self, queue: usize, kind: RequestKind, latency: Duration, ok: bool) {
        let slot = &self.slots[queue % self.slots.len()];
        let counters = &slot.kinds[kind.index()];
        counters.count.fetch_add(1, Ordering::Relaxed);
        if !ok {
            counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        counters.latency_sum_ns.fetch_add(nanos, Ordering::Relaxed);
        counters.buckets[bucket_of(latency)].fetch_add(1, Ordering::Relaxed);
    }

    /// The totals over every queue.
    pub fn snapshot(&self) -> RequestStatsSnapshot {
        let mut snapshot = RequestStatsSnapshot::default();
        for slot in self.slots.iter() {
            for (total, counters) in snapshot.kinds.iter_mut().zip(slot.kinds.iter()) {
                total.count += counters.count.load(Ordering::Relaxed);
                total.errors += counters.errors.load(Ordering::Relaxed);
                total.latency_sum_ns = total
                    .latency_sum_ns
                    .wrapping_add(counters.latency_sum_ns.load(Ordering::Relaxed));
                for (bucket, counter) in total.buckets.iter_mut().zip(counters.buckets.iter()) {
                    *bucket += counter.load(Ordering::Relaxed);
                }
            }
        }
        snapshot
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn latencies_fall_in_the_first_bucket_whose_bound_holds_them() {
        assert_eq!(bucket_of(Duration::ZERO), 0);
        assert_eq!(
            bucket_of(Duration::from_nanos(1500)),
            0,
            "1.5 µs counts as 1"
        );
        assert_eq!(bucket_of(Duration::from_micros(2)), 1);
        assert_eq!(bucket_of(Duration::from_micros(3)), 2);
        assert_eq!(bucket_of(Duration::from_micros(4)), 2);
        assert_eq!(bucket_of(Duration::from_micros(5)), 3);
        assert_eq!(bucket_of(Duration::from_micros(1 << 20)), 20);
        assert_eq!(
            bucket_of(Duration::from_micros((1 << 20) + 1)),
            LATENCY_BUCKETS
        );
        assert_eq!(bucket_of(Duration::from_secs(3600)), LATENCY_BUCKETS);
        for bucket in 0..LATENCY_BUCKETS {
            let bound = Duration::from_micros(bucket_bound_us(bucket));
            assert_eq!(bucket_of(bound), bucket, "the bound {bound:?} is inclusive");
        }
    }

    #[test]
    fn concurrent_recording_from_every_queue_sums_exactly() {
        // Arrange
        const QUEUES: usize = 4;
        const PER_THREAD: u64 = 20_000;
        let stats = Arc::new(RequestStats::new(QUEUES));

        // Act: two threads per queue slot, each a different mix of kinds and outcomes.
        let threads: Vec<_> = (0..QUEUES * 2)
            .map(|thread| {
                let stats = stats.clone();
                std::thread::spawn(move || {
                    for i in 0..PER_THREAD {
                        let kind = RequestKind::ALL[(i % 7) as usize];
                        let ok = i % 10 != 0;
                        stats.record(thread % QUEUES, kind, Duration::from_micros(i % 5000), ok);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let snapshot = stats.snapshot();

        // Assert
        let threads = (QUEUES * 2) as u64;
        for kind in RequestKind::ALL {
            let k = kind.index() as u64;
            let per_thread = (0..PER_THREAD).filter(|i| i % 7 == k).count() as u64;
            let errors = (0..PER_THREAD)
                .filter(|i| i % 7 == k && i % 10 == 0)
                .count() as u64;
            let sum_ns: u64 = (0..PER_THREAD)
                .filter(|i| i % 7 == k)
                .map(|i| (i % 5000) * 1000)
                .sum();
            let totals = snapshot.kind(kind);
            assert_eq!(totals.count, per_thread * threads, "{kind:?} count");
            assert_eq!(totals.errors, errors * threads, "{kind:?} errors");
            assert_eq!(totals.latency_sum_ns, sum_ns * threads, "{kind:?} sum");
            assert_eq!(totals.buckets.iter().sum::<u64>(), totals.count);
        }
    }

    #[test]
    fn a_queue_index_beyond_the_slots_is_counted_not_lost() {
        let stats = RequestStats::new(2);
        stats.record(5, RequestKind::Flush, Duration::from_micros(10), true);
        assert_eq!(stats.snapshot().kind(RequestKind::Flush).count, 1);
        assert_eq!(RequestStats::new(0).queues(), 1);
    }

    #[test]
    fn queue_slots_do_not_share_cache_lines() {
        assert_eq!(std::mem::align_of::<QueueSlot>(), 128);
        assert_eq!(std::mem::size_of::<QueueSlot>() % 128, 0);
    }
}
