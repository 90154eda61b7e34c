// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A log-bucketed latency histogram: 16 linear sub-buckets per power of two of nanoseconds,
//! so every reported percentile is within 1/16 (6.25 %) of the true value, in a fixed 8 KiB of
//! counters and without any allocation on the I/O path.

use std::time::Duration;

/// Sub-buckets per power of two (must be a power of two).
const SUB_BUCKETS: usize = 16;
const SUB_BUCKET_BITS: u32 = SUB_BUCKETS.trailing_zeros();
/// Octaves covered: values up to 2^63 ns land in a bucket; that is far beyond any latency.
const OCTAVES: usize = 64;
const BUCKETS: usize = OCTAVES * SUB_BUCKETS;

/// Counts of latencies, in log-linear buckets.
#[derive(Clone)]
pub struct LatencyHistogram {
    counts: Box<[u64; BUCKETS]>,
    total: u64,
    max_ns: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            counts: Box::new([0; BUCKETS]),
            total: 0,
            max_ns: 0,
        }
    }
}

impl std::fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyHistogram")
            .field("total", &self.total)
            .field("p50", &self.percentile(50.0))
            .field("p99", &self.percentile(99.0))
            .finish()
    }
}

/// The bucket that holds `ns`. Values below `SUB_BUCKETS` have a bucket each; above that, the
/// octave is the position of the highest set bit and the sub-bucket the next 4 bits.
fn bucket_of(ns: u64) -> usize {
    let sub_buckets = SUB_BUCKETS as u64;
    if ns < sub_buckets {
        return usize::try_from(ns).expect("below 16");
    }
    let top_bit = 63 - ns.leading_zeros();
    let shift = top_bit - SUB_BUCKET_BITS;
    let sub = usize::try_from((ns >> shift) & (sub_buckets - 1)).expect("below 16");
    let octave = shift as usize + 1;
    octave * SUB_BUCKETS + sub
}

/// The largest value that falls in `bucket` (the bucket's inclusive upper bound).
fn bucket_upper_bound(bucket: usize) -> u64 {
    let octave = bucket / SUB_BUCKETS;
    let sub = (bucket % SUB_BUCKETS) as u64;
    if octave == 0 {
        return sub;
    }
    let shift = octave - 1;
    let low = (SUB_BUCKETS as u64 | sub) << shift;
    low + ((1u64 << shift) - 1)
}

impl LatencyHistogram {
    /// Counts one latency.
    pub fn record(&mut self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.counts[bucket_of(ns)] += 1;
        self.total += 1;
        self.max_ns = self.max_ns.max(ns);
    }

    /// Adds every count of `other` into `self`.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts.iter()) {
            *mine += theirs;
        }
        self.total += other.total;
        self.max_ns = self.max_ns.max(other.max_ns);
    }

    /// How many latencies were recorded.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The latency below which `percent` % of the recorded latencies fall, as the upper bound of
    /// the bucket that holds it (never above the largest recorded value). Zero when empty.
    pub fn percentile(&self, percent: f64) -> Duration {
        if self.total == 0 {
            return Duration::ZERO;
        }
        // The rank of the wanted sample, 1-based: ceil(total * percent / 100), at least 1.
        let rank = (self.total as f64 * percent.clamp(0.0, 100.0) / 100.0).ceil();
        // `rank` is a whole number in 0..=total, so the conversion is exact.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let rank = (rank as u64).clamp(1, self.total);
        let mut seen = 0;
        for (bucket, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Duration::from_nanos(bucket_upper_bound(bucket).min(self.max_ns));
            }
        }
        Duration::from_nanos(self.max_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_lands_in_a_bucket_whose_bound_is_within_one_sixteenth() {
        for ns in (0..100_000u64).chain([1 << 20, (1 << 20) + 12345, 1 << 40, u64::MAX >> 1]) {
            let bucket = bucket_of(ns);
            let upper = bucket_upper_bound(bucket);
            assert!(upper >= ns, "{ns} above its bucket's bound {upper}");
            assert!(
                upper - ns <= ns / SUB_BUCKETS as u64,
                "{ns}: bound {upper} too loose"
            );
            if bucket > 0 {
                assert!(
                    bucket_upper_bound(bucket - 1) < ns,
                    "{ns} fits an earlier bucket"
                );
            }
        }
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut histogram = LatencyHistogram::default();
        for us in 1..=1000u64 {
            histogram.record(Duration::from_micros(us));
        }
        let p50 = histogram.percentile(50.0).as_micros() as f64;
        let p99 = histogram.percentile(99.0).as_micros() as f64;
        assert!((500.0..=500.0 * 1.07).contains(&p50), "p50 {p50}");
        assert!((990.0..=1000.0).contains(&p99), "p99 {p99}");
        assert_eq!(histogram.percentile(100.0), Duration::from_micros(1000));
        assert_eq!(histogram.count(), 1000);
    }

    #[test]
    fn merging_adds_counts() {
        let mut a = LatencyHistogram::default();
        let mut b = LatencyHistogram::default();
        a.record(Duration::from_micros(10));
        b.record(Duration::from_micros(1000));
        b.record(Duration::from_micros(1000));
        a.merge(&b);
        assert_eq!(a.count(), 3);
        assert!(a.percentile(50.0) >= Duration::from_micros(990));
    }
}
