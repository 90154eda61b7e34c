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
