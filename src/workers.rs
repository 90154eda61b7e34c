// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Compression workers: kcompressd for a vhost-user device.
//!
//! The queue threads copy a written page into the store's pending pool and complete the
//! request; these threads compress the pool's pages in batches of up to
//! [`WORKER_BATCH`](crate::store::WORKER_BATCH) through [`Codec::compress_batch`] (where an
//! accelerator submits one batch) and install the objects. The store holds the pool, the job
//! queue and the install rule (see `store/pending.rs` and DESIGN.md); this module owns the
//! threads: starting them (optionally pinned to CPUs), and stopping and joining them, which is
//! bounded by one batch.
//!
//! [`Codec::compress_batch`]: crate::codec::Codec::compress_batch

use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;

use log::{debug, warn};

use crate::store::{PageStore, WorkerScratch};

/// The running compression workers of one store. Dropping it stops and joins them; pages still
/// pending stay readable in the store (and are dropped with it).
#[derive(Debug)]
pub struct CompressWorkers {
    store: Arc<PageStore>,
    threads: Vec<JoinHandle<()>>,
}

impl CompressWorkers {
    /// Starts the workers `store` was built for ([`PageStore::with_pending`]); worker `i` is
    /// pinned to `cpus[i % cpus.len()]` when `cpus` is not empty.
    pub fn start(store: Arc<PageStore>, cpus: &[usize]) -> io::Result<CompressWorkers> {
        let mut workers = CompressWorkers {
            store,
            threads: Vec::new(),
        };
        for id in 0..workers.store.workers() {
            let store = Arc::clone(&workers.store);
            let cpu = (!cpus.is_empty()).then(|| cpus[id % cpus.len()]);
            let thread = std::thread::Builder::new()
                .name(format!("kcompressd-{id}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        if let Err(error) = pin_to_cpu(cpu) {
                            warn!("compression worker {id}: cannot pin to CPU {cpu}: {error}");
                        }
                    }
                    let mut scratch = WorkerScratch::default();
                    while store.run_worker_batch(id, &mut scratch) {}
                    debug!("compression worker {id} stopped");
                })?;
            workers.threads.push(thread);
        }
        Ok(workers)
    }

    /// The store the workers serve.
    pub fn store(&self) -> &Arc<PageStore> {
        &self.store
    }

    /// Stops the workers and waits for them (each finishes at most its current batch).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.store.stop_workers();
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                warn!("a compression worker panicked");
            }
        }
    }
}

impl Drop for CompressWorkers {
    fn drop(&mut self) {
        self.shutdown();
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
