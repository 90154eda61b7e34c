// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A block device opened through libblkio: a vhost-user-blk socket (`virtio-blk-vhost-user`) or a
//! kernel block device (`io_uring`, O_DIRECT), with its queues and one shared I/O buffer region.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, MemoryRegion};

/// How to reach the device.
#[derive(Debug, Clone)]
pub enum Transport {
    /// A vhost-user-blk backend listening on this UNIX socket.
    VhostUser(PathBuf),
    /// A kernel block device, driven with io_uring and O_DIRECT.
    IoUring(PathBuf),
}

impl Transport {
    fn driver_name(&self) -> &'static str {
        match self {
            Transport::VhostUser(_) => "virtio-blk-vhost-user",
            Transport::IoUring(_) => "io_uring",
        }
    }

    fn path(&self) -> &Path {
        match self {
            Transport::VhostUser(path) | Transport::IoUring(path) => path,
        }
    }
}

/// One queue and the part of the buffer region that belongs to it.
pub struct Lane {
    /// The libblkio queue.
    pub queue: Blkioq,
    /// The first byte of this lane's buffers inside the mapped region.
    buffers: *mut u8,
    /// How many bytes of buffers this lane owns.
    buffers_len: usize,
}

// SAFETY: `buffers` points into a memory region that the owning `Device` keeps mapped for as long
// as the lane exists, and no two lanes share bytes, so moving a lane to another thread moves
// exclusive access to its buffers along with it.
unsafe impl Send for Lane {}

impl Lane {
    /// The address of this lane's buffer `slot` of `slot_len` bytes.
    pub fn buffer(&self, slot: usize, slot_len: usize) -> *mut u8 {
        assert!(
            (slot + 1) * slot_len <= self.buffers_len,
            "slot beyond the lane's buffers"
        );
        // SAFETY: the assertion keeps the offset inside this lane's part of the region.
        unsafe { self.buffers.add(slot * slot_len) }
    }
}

/// An open, started device.
pub struct Device {
    /// Queues, declared before `blkio` so that they are dropped first.
    pub lanes: Vec<Lane>,
    blkio: Blkio,
    region: MemoryRegion,
    /// Capacity in bytes.
    pub capacity: u64,
}

impl Device {
    /// Connects to `transport` with `queues` queues of `queue_size` entries and allocates
    /// `buffer_bytes_per_lane` bytes of I/O buffers per queue. A vhost-user socket that is not yet
    /// accepting connections is retried until `connect_timeout`.
    pub fn open(
        transport: &Transport,
        queues: usize,
        queue_size: usize,
        buffer_bytes_per_lane: usize,
        connect_timeout: Duration,
    ) -> Result<Device, String> {
        let deadline = Instant::now() + connect_timeout;
        let mut blkio = loop {
            match Self::connect(transport, queues, queue_size) {
                Ok(blkio) => break blkio,
                Err(err) if Instant::now() < deadline => {
                    log::debug!("connect to {}: {err}; retrying", transport.path().display());
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(err) => return Err(err),
            }
        };
        let outcome = blkio.start().map_err(|e| format!("blkio start: {e:?}"))?;
        let capacity = blkio
            .get_u64("capacity")
            .map_err(|e| format!("blkio capacity: {e:?}"))?;
        let alignment = blkio
            .get_u64("mem-region-alignment")
            .ok()
            .and_then(|a| usize::try_from(a).ok())
            .unwrap_or(4096)
            .max(4096);
        let region_len = (buffer_bytes_per_lane * queues).next_multiple_of(alignment);
        let region = blkio
            .alloc_mem_region(region_len)
            .map_err(|e| format!("blkio alloc_mem_region: {e:?}"))?;
        blkio
            .map_mem_region(&region)
            .map_err(|e| format!("blkio map_mem_region: {e:?}"))?;
        let lanes = outcome
            .queues
            .into_iter()
            .enumerate()
            .map(|(index, queue)| Lane {
                queue,
                // SAFETY: lane `index` < `queues` owns bytes
                // `[index * buffer_bytes_per_lane, (index + 1) * buffer_bytes_per_lane)`, which
                // lie inside the region of `region_len` ≥ `queues * buffer_bytes_per_lane` bytes.
                buffers: unsafe { (region.addr as *mut u8).add(index * buffer_bytes_per_lane) },
                buffers_len: buffer_bytes_per_lane,
            })
            .collect();
        Ok(Device {
            lanes,
            blkio,
            region,
            capacity,
        })
    }

    fn connect(transport: &Transport, queues: usize, queue_size: usize) -> Result<Blkio, String> {
        let fail = |what: &str, e: blkio::Error| format!("blkio {what}: {e:?}");
        let mut blkio = Blkio::new(transport.driver_name()).map_err(|e| fail("new", e))?;
        let path = transport.path().to_str().ok_or("the path is not UTF-8")?;
        blkio.set_str("path", path).map_err(|e| fail("path", e))?;
        if let Transport::IoUring(_) = transport {
            blkio
                .set_bool("direct", true)
                .map_err(|e| fail("direct", e))?;
        }
        blkio.connect().map_err(|e| fail("connect", e))?;
        let queues = i32::try_from(queues).map_err(|_| "too many queues")?;
        blkio
            .set_i32("num-queues", queues)
            .map_err(|e| fail("num-queues", e))?;
        if let Transport::VhostUser(_) = transport {
            let queue_size = i32::try_from(queue_size).map_err(|_| "queue size too large")?;
            blkio
                .set_i32("queue-size", queue_size)
                .map_err(|e| fail("queue-size", e))?;
        } else {
            let entries = i32::try_from(queue_size).map_err(|_| "queue size too large")?;
            blkio
                .set_i32("num-entries", entries)
                .map_err(|e| fail("num-entries", e))?;
        }
        Ok(blkio)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // Queues go first, then the region, then the connection (field order drops `blkio`).
        self.lanes.clear();
        self.blkio.unmap_mem_region(&self.region);
        self.blkio.free_mem_region(&self.region);
    }
}
