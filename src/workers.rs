// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Compression workers: kcompressd for a vhost-user device.
//!
//! The queue threads copy a written page into the store's pending pool and complete the
//! request; these threads compress the pool's pages in batches of up to
//! [`WORKER_BATCH`](crate::store::WORKER_BATCH) through [`Codec::compress_batch`] (where an
//! accelerator submits one batch) and install the objects. The store holds the pool, the job
//! queue and the install rule (see `store/pending.rs` and DESIGN.md); this module owns the
//! threads: starting them (optionally pinned to CPUs), and stopping and joining them, which is
//! bounded by one batch. The workers wait on the store's job queue, so their group's
//! [`StopSignal`](crate::stop::StopSignal) stops the queue (`PageStore::stop_workers`) when it
//! stops.
//!
//! [`Codec::compress_batch`]: crate::codec::Codec::compress_batch

use std::io;
use std::sync::Arc;

use log::{debug, warn};

use crate::stop::{Threads, STOP_BOUND};
use crate::store::{PageStore, WorkerScratch};

/// The running compression workers of one store. Dropping it stops and joins them; pages still
/// pending stay readable in the store (and are dropped with it).
#[derive(Debug)]
pub struct CompressWorkers {
    store: Arc<PageStore>,
    threads: Threads,
}

impl CompressWorkers {
    /// Starts the workers `store` was built for ([`PageStore::with_pending`]); worker `i` is
    /// pinned to `cpus[i % cpus.len()]` when `cpus` is not empty.
    pub fn start(store: Arc<PageStore>, cpus: &[usize]) -> io::Result<CompressWorkers> {
        let mut threads = Threads::new();
        // The workers wait on the store's job queue, not on the signal: the stop wakes them
        // there.
        let queue = Arc::clone(&store);
        threads.signal().on_stop(move || queue.stop_workers());
        for id in 0..store.workers() {
            let store = Arc::clone(&store);
            let cpu = (!cpus.is_empty()).then(|| cpus[id % cpus.len()]);
            threads.spawn(format!("kcompressd-{id}"), move |_| {
                if let Some(cpu) = cpu {
                    if let Err(error) = pin_to_cpu(cpu) {
                        warn!("compression worker {id}: cannot pin to CPU {cpu}: {error}");
                    }
                }
                if let Err(error) = lower_priority() {
                    warn!(
                        "compression worker {id}: cannot lower its priority ({error}); it \
                         competes with the queue threads for the CPU"
                    );
                }
                let mut scratch = WorkerScratch::default();
                while store.run_worker_batch(id, &mut scratch) {}
                debug!("compression worker {id} stopped");
            })?;
        }
        Ok(CompressWorkers { store, threads })
    }

    /// The store the workers serve.
    pub fn store(&self) -> &Arc<PageStore> {
        &self.store
    }

    /// Stops the workers and waits for them (each finishes at most its current batch).
    pub fn stop(mut self) {
        let _ = self.threads.stop_within(STOP_BOUND);
    }

    /// The worker threads, for an owner that stops them with others.
    pub fn into_threads(self) -> Threads {
        self.threads
    }
}

/// How many nice steps below the daemon the workers run (capped at 19, the lowest).
///
/// A worker takes compression off the queue threads while a CPU is spare; when every CPU is
/// busy it only competes with them, and a queue thread it preempts holds up its guest for a
/// scheduler slice (milliseconds). At nice 19 a queue thread that wakes preempts the worker at
/// once and the worker gets what the queue threads leave (the pool still absorbs bursts, and
/// a full or filling pool makes the queue threads compress themselves). Measured with the
/// bench tool, random 4 KiB writes at depth 32 with one worker on 2 CPUs: two queues' p99 went
/// from 1.4-1.8 ms to 0.46-0.75 ms at the same IOPS; one queue ran the same.
pub const WORKER_NICE_STEPS: i32 = 19;

/// Lowers the calling thread's priority by [`WORKER_NICE_STEPS`] (Linux keeps a nice value
/// per thread).
fn lower_priority() -> io::Result<()> {
    // SAFETY: gettid takes no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    let tid = libc::id_t::try_from(tid).map_err(|_| io::Error::other("negative thread id"))?;
    // getpriority returns the nice value, which may be -1: errno tells an error apart.
    // SAFETY: errno is this thread's; getpriority only reads the thread's priority.
    let nice = unsafe {
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, tid)
    };
    // SAFETY: reads this thread's errno.
    if nice == -1 && unsafe { *libc::__errno_location() } != 0 {
        return Err(io::Error::last_os_error());
    }
    let lowered = nice.saturating_add(WORKER_NICE_STEPS).min(19);
    // SAFETY: sets the nice value of this thread only.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, lowered) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Pins the calling thread to `cpu`.
fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("CPU {cpu} is past the largest CPU number this system supports"),
        ));
    }
    // SAFETY: cpu_set_t is a plain bit array for which all zeros is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE (checked above), so CPU_SET stays inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Algorithm;
    use crate::store::{PendingConfig, StoreConfig};

    /// The nice value of thread `tid` of this process, from its `stat` (field 19).
    fn nice_of(tid: &str) -> i32 {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        // The command name may hold spaces; the fields after its closing parenthesis don't.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        after.split(' ').nth(16).unwrap().parse().unwrap()
    }

    #[test]
    fn workers_run_nineteen_nice_steps_below_the_daemon_at_most_at_nineteen() {
        // Arrange
        let store = Arc::new(
            PageStore::with_pending(
                StoreConfig {
                    capacity_pages: 16,
                    algorithm: Algorithm::Lz4,
                    level: None,
                    mem_limit: None,
                },
                PendingConfig {
                    workers: 2,
                    max_pending_pages: 16,
                },
            )
            .unwrap(),
        );
        // SAFETY: gettid takes no arguments and cannot fail.
        let own = nice_of(&unsafe { libc::gettid() }.to_string());

        // Act
        let workers = CompressWorkers::start(Arc::clone(&store), &[]).unwrap();

        // Assert: every kcompressd thread of this test (the process may hold other tests').
        let expected = (own + WORKER_NICE_STEPS).min(19);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let nices: Vec<i32> = std::fs::read_dir("/proc/self/task")
                .unwrap()
                .filter_map(|task| {
                    let tid = task.unwrap().file_name().into_string().unwrap();
                    let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
                        .unwrap_or_default();
                    comm.starts_with("kcompressd-").then(|| nice_of(&tid))
                })
                .collect();
            if nices.len() >= 2 && nices.iter().all(|&n| n == expected) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "worker nice values {nices:?}, expected {expected}"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        workers.stop();
    }
}
