// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! End-to-end tests: the built `vhost-user-zram` binary, driven as a guest's virtio-blk driver
//! would drive it, through libblkio's `virtio-blk-vhost-user` driver.
//!
//! Every test launches its own daemon on a socket in a fresh temporary directory, waits for the
//! socket to appear, runs its I/O with many requests in flight, and ends by disconnecting and
//! checking that the daemon exits with status 0 (a guard kills it if the test fails first).
//!
//! Not covered here, because libblkio cannot express it, and covered by the in-process protocol
//! tests instead:
//! - VIRTIO_BLK_T_GET_ID (the serial): libblkio has no request for it.
//! - The daemon refusing a write on a read-only device: libblkio refuses to start on a device
//!   that offers VIRTIO_BLK_F_RO unless it is opened read-only, and then fails writes itself
//!   without sending them. The test below checks both halves of that contract: that the daemon
//!   offers VIRTIO_BLK_F_RO, and that reads work.

mod common;

use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use vhost_user_zram::pagegen::{fill_page, PageKind};
use vhost_user_zram::PAGE_SIZE;

use common::child::DaemonProcess;

/// Seed of the swap-like pages the tests write.
const SEED: u64 = 0x7e57;
/// Requests in flight per batch.
const DEPTH: usize = 32;
/// Bytes of I/O buffer per queue: one page per request in flight, and two extra pages for
/// requests that span a page boundary.
const LANE_BUFFER: usize = (DEPTH + 2) * PAGE_SIZE;
const PAGE: u64 = PAGE_SIZE as u64;
const MIB: u64 = 1 << 20;

/// The swap-like content of page `index`.
fn swap_page(index: u64) -> (PageKind, [u8; PAGE_SIZE]) {
    let mut page = [0u8; PAGE_SIZE];
    let kind = fill_page(SEED, index, &mut page);
    (kind, page)
}

/// One request of a batch; buffers are byte offsets into the lane's buffer.
#[derive(Debug, Clone, Copy)]
enum Op {
    Read {
        offset: u64,
        len: usize,
        buffer: usize,
    },
    Write {
        offset: u64,
        len: usize,
        buffer: usize,
    },
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        unmap: bool,
    },
    Flush,
}

/// One queue and its I/O buffer.
struct Lane {
    queue: Blkioq,
    buffer: *mut u8,
}

// SAFETY: `buffer` points to LANE_BUFFER bytes of a region the owning `Client` keeps mapped while
// the lane exists, and no other lane uses those bytes.
unsafe impl Send for Lane {}

impl Lane {
    /// The lane's buffer. Only called between batches, when no request uses it.
    fn buffer(&mut self) -> &mut [u8] {
        // SAFETY: see `unsafe impl Send`; `&mut self` and the synchronous `run` mean that no
        // request is in flight on it.
        unsafe { std::slice::from_raw_parts_mut(self.buffer, LANE_BUFFER) }
    }

    /// Puts every op in flight at once, waits for all of them, and returns each one's result
    /// (0 or a negative errno), in the order given.
    fn run(&mut self, ops: &[Op]) -> Vec<i32> {
        for (index, op) in ops.iter().enumerate() {
            let check = |buffer: usize, len: usize| {
                assert!(
                    buffer + len <= LANE_BUFFER,
                    "{op:?} overruns the lane buffer"
                );
                // SAFETY: just checked to stay inside the lane's buffer.
                unsafe { self.buffer.add(buffer) }
            };
            match *op {
                Op::Read {
                    offset,
                    len,
                    buffer,
                } => {
                    let ptr = check(buffer, len);
                    self.queue.read(offset, ptr, len, index, ReqFlags::empty());
                }
                Op::Write {
                    offset,
                    len,
                    buffer,
                } => {
                    let ptr = check(buffer, len);
                    self.queue.write(offset, ptr, len, index, ReqFlags::empty());
                }
                Op::Discard { offset, len } => {
                    self.queue.discard(offset, len, index, ReqFlags::empty())
                }
                Op::WriteZeroes { offset, len, unmap } => {
                    let flags = if unmap {
                        ReqFlags::empty()
                    } else {
                        ReqFlags::NO_UNMAP
                    };
                    self.queue.write_zeroes(offset, len, index, flags);
                }
                Op::Flush => self.queue.flush(index, ReqFlags::empty()),
            }
        }
        let mut results = vec![None; ops.len()];
        let mut completions: Vec<MaybeUninit<Completion>> =
            (0..ops.len()).map(|_| MaybeUninit::uninit()).collect();
        let mut done = 0;
        while done < ops.len() {
            let mut timeout = Duration::from_secs(10);
            let n = self
                .queue
                .do_io(&mut completions, 1, Some(&mut timeout), None)
                .unwrap_or_else(|e| panic!("do_io: {e:?} with {done} of {} done", ops.len()));
            for completion in &completions[..n] {
                // SAFETY: do_io initialized the first `n` entries.
                let completion = unsafe { completion.assume_init_read() };
                assert!(results[completion.user_data].is_none(), "completed twice");
                results[completion.user_data] = Some(completion.ret);
                done += 1;
            }
        }
        results.into_iter().map(|r| r.expect("completed")).collect()
    }

    /// Writes the swap-like pages `pages`, `DEPTH` requests in flight at a time.
    fn write_swap_pages(&mut self, pages: impl Iterator<Item = u64>) {
        let pages: Vec<u64> = pages.collect();
        for batch in pages.chunks(DEPTH) {
            let mut ops = Vec::with_capacity(batch.len());
            for (slot, &page) in batch.iter().enumerate() {
                let (_, content) = swap_page(page);
                self.buffer()[slot * PAGE_SIZE..][..PAGE_SIZE].copy_from_slice(&content);
                ops.push(Op::Write {
                    offset: page * PAGE,
                    len: PAGE_SIZE,
                    buffer: slot * PAGE_SIZE,
                });
            }
            let results = self.run(&ops);
            assert!(
                results.iter().all(|&r| r == 0),
                "writes of {batch:?} returned {results:?}"
            );
        }
    }

    /// Reads pages `pages`, `DEPTH` at a time, and checks each against `expected(page)`.
    fn verify_pages(
        &mut self,
        pages: impl Iterator<Item = u64>,
        expected: impl Fn(u64) -> [u8; PAGE_SIZE],
    ) {
        let pages: Vec<u64> = pages.collect();
        for batch in pages.chunks(DEPTH) {
            let ops: Vec<Op> = (0..batch.len())
                .map(|slot| Op::Read {
                    offset: batch[slot] * PAGE,
                    len: PAGE_SIZE,
                    buffer: slot * PAGE_SIZE,
                })
                .collect();
            self.buffer().fill(0xEE);
            let results = self.run(&ops);
            assert!(
                results.iter().all(|&r| r == 0),
                "reads of {batch:?} returned {results:?}"
            );
            for (slot, &page) in batch.iter().enumerate() {
                let got = &self.buffer()[slot * PAGE_SIZE..][..PAGE_SIZE];
                let want = expected(page);
                if got != want {
                    let first = got.iter().zip(want).position(|(a, b)| *a != b).unwrap_or(0);
                    panic!("page {page} differs from what was written, first at byte {first}");
                }
            }
        }
    }
}

/// A libblkio connection to the daemon.
struct Client {
    /// Declared first: queues are dropped before the connection.
    lanes: Vec<Lane>,
    blkio: Blkio,
    region: MemoryRegion,
}

impl Client {
    /// Connects with `queues` queues; `read_only` opens the device read-only.
    fn connect(
        daemon: &DaemonProcess,
        queues: usize,
        read_only: bool,
    ) -> Result<Client, blkio::Error> {
        let mut blkio = Self::connected(daemon, read_only)?;
        blkio.set_i32("num-queues", i32::try_from(queues).expect("few queues"))?;
        blkio.set_i32("queue-size", 128)?;
        let outcome = blkio.start()?;
        let region_len = LANE_BUFFER * queues;
        let region = blkio.alloc_mem_region(region_len)?;
        blkio.map_mem_region(&region)?;
        let lanes = outcome
            .queues
            .into_iter()
            .enumerate()
            .map(|(index, queue)| Lane {
                queue,
                // SAFETY: lane `index` < `queues` owns LANE_BUFFER bytes inside the region of
                // `LANE_BUFFER * queues` bytes.
                buffer: unsafe { (region.addr as *mut u8).add(index * LANE_BUFFER) },
            })
            .collect();
        Ok(Client {
            lanes,
            blkio,
            region,
        })
    }

    /// A connected (not started) libblkio instance; retries while the socket is not yet
    /// accepting connections.
    fn connected(daemon: &DaemonProcess, read_only: bool) -> Result<Blkio, blkio::Error> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut blkio = Blkio::new("virtio-blk-vhost-user")?;
            blkio.set_str("path", daemon.socket.to_str().expect("UTF-8 path"))?;
            blkio.set_bool("read-only", read_only)?;
            match blkio.connect() {
                Ok(()) => return Ok(blkio),
                Err(e) if Instant::now() < deadline && e.errno() == blkio::Errno::CONNREFUSED => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn lane(&mut self) -> &mut Lane {
        &mut self.lanes[0]
    }

    fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").expect("capacity")
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.lanes.clear();
        self.blkio.unmap_mem_region(&self.region);
        self.blkio.free_mem_region(&self.region);
    }
}

/// Disconnects `client` and asserts that the daemon then exits with status 0 by itself.
fn expect_clean_exit_after_disconnect(mut daemon: DaemonProcess, client: Client) {
    drop(client);
    daemon.expect_clean_exit();
}

fn connect(daemon: &DaemonProcess, queues: usize) -> Client {
    Client::connect(daemon, queues, false).expect("connect and start")
}

/// Writes 4096 swap-like pages with `queues` queues working at once (queue q takes the pages
/// congruent to q), then reads them all back on every queue and compares.
fn write_and_verify_swap_pages(queues: usize, extra: &[&str]) {
    let pages = 4096u64;
    let queues_arg = queues.to_string();
    let mut args = vec!["--num-queues", &queues_arg];
    args.extend_from_slice(extra);
    let daemon = DaemonProcess::start(64 * MIB, &args);
    let mut client = connect(&daemon, queues);
    assert_eq!(client.lanes.len(), queues);
    assert_eq!(client.capacity(), 64 * MIB);
    let stride = queues as u64;
    std::thread::scope(|scope| {
        for (q, lane) in client.lanes.iter_mut().enumerate() {
            scope.spawn(move || {
                lane.write_swap_pages((q as u64..pages).step_by(queues));
            });
        }
    });
    std::thread::scope(|scope| {
        for (q, lane) in client.lanes.iter_mut().enumerate() {
            // Each queue reads the pages another queue wrote.
            let first = (q as u64 + 1) % stride;
            scope.spawn(move || {
                lane.verify_pages((first..pages).step_by(queues), |p| swap_page(p).1);
            });
        }
    });
    // Pages never written read as zeros.
    client
        .lane()
        .verify_pages(pages..pages + 64, |_| [0; PAGE_SIZE]);
    expect_clean_exit_after_disconnect(daemon, client);
}

#[test]
fn swap_pages_written_at_depth_32_read_back_intact_on_one_queue() {
    write_and_verify_swap_pages(1, &[]);
}

#[test]
fn swap_pages_written_at_depth_32_read_back_intact_on_two_queues() {
    write_and_verify_swap_pages(2, &[]);
}

#[test]
fn swap_pages_read_back_intact_when_the_queue_thread_compresses() {
    write_and_verify_swap_pages(1, &["--workers", "0"]);
}

#[test]
fn swap_pages_read_back_intact_with_adaptive_polling() {
    write_and_verify_swap_pages(2, &["--poll-max-us", "500"]);
}

/// CPU time (user + system) the process has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    // The fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf only reads a system constant.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap();
    Duration::from_millis(ticks * 1000 / hz)
}

#[test]
fn a_polling_daemon_sleeps_while_its_guest_is_idle() {
    let daemon = DaemonProcess::start(16 * MIB, &["--poll-max-us", "1000"]);
    let mut client = connect(&daemon, 1);
    // Busy first, so that the polling window has grown to its maximum.
    client.lane().write_swap_pages(0..2048);
    client.lane().verify_pages(0..2048, |p| swap_page(p).1);
    let pid = daemon.pid();
    std::thread::sleep(Duration::from_millis(200));
    let before = cpu_time(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_time(pid) - before;
    assert!(
        used < Duration::from_millis(40),
        "an idle, connected daemon used {used:?} of CPU in 2 s"
    );
    expect_clean_exit_after_disconnect(daemon, client);
}

#[test]
fn swap_pages_read_back_intact_through_a_tiny_pending_pool() {
    // Eight pages of pool: most writes fall back to inline compression, the rest wait for
    // two workers; both paths interleave on every page.
    write_and_verify_swap_pages(2, &["--workers", "2", "--max-pending", "32K"]);
}

#[test]
fn mm_stat_reflects_what_was_written() {
    let pages = 2048u64;
    let daemon = DaemonProcess::start(64 * MIB, &[]);
    let mut client = connect(&daemon, 1);
    let empty = daemon.mm_stat();
    assert_eq!(
        empty.orig_data_size, 0,
        "a new device stores nothing: {empty:?}"
    );
    assert_eq!(empty.same_pages, 0);

    client.lane().write_swap_pages(0..pages);
    let kinds: Vec<PageKind> = (0..pages).map(|p| swap_page(p).0).collect();
    let same = kinds
        .iter()
        .filter(|k| matches!(k, PageKind::Zero | PageKind::SameFilled))
        .count() as u64;
    let random = kinds.iter().filter(|k| **k == PageKind::Random).count() as u64;
    assert!(
        same > 0 && random > 0,
        "the mix has same-filled and random pages"
    );

    let mm = daemon.mm_stat();
    assert_eq!(mm.orig_data_size, pages * PAGE, "{mm:?}");
    assert_eq!(mm.same_pages, same, "zero and same-filled pages: {mm:?}");
    // Same-filled pages need no compressed data; random pages do not compress at all.
    let compressed_pages = pages - same;
    assert!(mm.compr_data_size > 0, "{mm:?}");
    assert!(
        mm.compr_data_size < compressed_pages * PAGE,
        "swap-like data compresses: {mm:?}"
    );
    assert!(
        mm.compr_data_size >= random * PAGE,
        "random pages are stored whole: {mm:?}"
    );
    assert!(
        mm.huge_pages >= random && mm.huge_pages <= compressed_pages,
        "{mm:?}"
    );
    assert!(mm.huge_pages_since >= mm.huge_pages, "{mm:?}");
    assert!(mm.mem_used_total >= mm.compr_data_size, "{mm:?}");
    assert!(mm.mem_used_max >= mm.mem_used_total, "{mm:?}");
    assert_eq!(mm.mem_limit, 0, "no --mem-limit given: {mm:?}");

    // Overwriting the same pages with the same data changes no count.
    client.lane().write_swap_pages(0..pages);
    let again = daemon.mm_stat();
    assert_eq!(again.orig_data_size, mm.orig_data_size, "{again:?}");
    assert_eq!(again.same_pages, mm.same_pages, "{again:?}");
    assert_eq!(again.compr_data_size, mm.compr_data_size, "{again:?}");

    let stats = daemon.ctl(&["stats", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&stats).expect("stats --json is JSON");
    for (name, value) in [
        ("orig_data_size", again.orig_data_size),
        ("compr_data_size", again.compr_data_size),
        ("same_pages", again.same_pages),
        ("huge_pages", again.huge_pages),
    ] {
        assert_eq!(
            json["mm"][name].as_u64(),
            Some(value),
            "stats --json agrees on {name}: {stats}"
        );
    }

    client.lane().verify_pages(0..pages, |p| swap_page(p).1);
    expect_clean_exit_after_disconnect(daemon, client);
}

#[test]
fn discarded_pages_read_as_zeros_and_leave_the_store() {
    let daemon = DaemonProcess::start(16 * MIB, &[]);
    let mut client = connect(&daemon, 1);
    let lane = client.lane();
    lane.write_swap_pages(0..128);
    let before = daemon.mm_stat();
    assert_eq!(before.orig_data_size, 128 * PAGE);

    // Two discards in flight at once, plus one of a range that was never written.
    let results = client.lane().run(&[
        Op::Discard {
            offset: 16 * PAGE,
            len: 32 * PAGE,
        },
        Op::Discard {
            offset: 100 * PAGE,
            len: 4 * PAGE,
        },
        Op::Discard {
            offset: 1000 * PAGE,
            len: 64 * PAGE,
        },
    ]);
    assert_eq!(results, [0, 0, 0]);
    let discarded = |p: u64| (16..48).contains(&p) || (100..104).contains(&p);
    client.lane().verify_pages(0..128, |p| {
        if discarded(p) {
            [0; PAGE_SIZE]
        } else {
            swap_page(p).1
        }
    });
    let after = daemon.mm_stat();
    assert_eq!(
        after.orig_data_size,
        before.orig_data_size - 36 * PAGE,
        "discarded pages leave the store: {after:?}"
    );
    let discarded_same = (0..128)
        .filter(|&p| {
            discarded(p) && matches!(swap_page(p).0, PageKind::Zero | PageKind::SameFilled)
        })
        .count() as u64;
    assert_eq!(
        after.same_pages,
        before.same_pages - discarded_same,
        "{after:?}"
    );
    assert!(after.compr_data_size < before.compr_data_size, "{after:?}");
    expect_clean_exit_after_disconnect(daemon, client);
}

#[test]
fn write_zeroes_with_and_without_unmap_read_as_zeros() {
    let daemon = DaemonProcess::start(16 * MIB, &[]);
    let mut client = connect(&daemon, 1);
    client.lane().write_swap_pages(0..64);
    let before = daemon.mm_stat();
    assert_eq!(before.orig_data_size, 64 * PAGE, "{before:?}");
    let results = client.lane().run(&[
        Op::WriteZeroes {
            offset: 8 * PAGE,
            len: 16 * PAGE,
            unmap: true,
        },
        Op::WriteZeroes {
            offset: 40 * PAGE,
            len: 16 * PAGE,
            unmap: false,
        },
        // A sub-page range: the rest of the page keeps its data.
        Op::WriteZeroes {
            offset: 60 * PAGE + 1024,
            len: 1024,
            unmap: true,
        },
    ]);
    assert_eq!(results, [0, 0, 0]);
    client.lane().verify_pages(0..64, |p| {
        if (8..24).contains(&p) || (40..56).contains(&p) {
            [0; PAGE_SIZE]
        } else if p == 60 {
            let mut page = swap_page(p).1;
            page[1024..2048].fill(0);
            page
        } else {
            swap_page(p).1
        }
    });
    let after = daemon.mm_stat();
    // Unmapped zeroes free their pages; zeroes without unmap may be kept as zero-filled pages
    // or freed, but they never take more room than before.
    assert!(
        after.orig_data_size <= before.orig_data_size - 16 * PAGE,
        "write-zeroes with unmap frees its pages: {before:?} -> {after:?}"
    );
    assert!(
        after.orig_data_size >= before.orig_data_size - 32 * PAGE,
        "only the zeroed pages left: {before:?} -> {after:?}"
    );
    assert!(after.compr_data_size < before.compr_data_size, "{after:?}");
    expect_clean_exit_after_disconnect(daemon, client);
}

#[test]
fn flush_completes_and_data_stays() {
    let daemon = DaemonProcess::start(16 * MIB, &[]);
    let mut client = connect(&daemon, 1);
    client.lane().write_swap_pages(0..32);
    // Flushes alone, and mixed in with writes in one batch.
    assert_eq!(client.lane().run(&[Op::Flush, Op::Flush]), [0, 0]);
    client.lane().buffer()[..PAGE_SIZE].copy_from_slice(&swap_page(40).1);
    let results = client.lane().run(&[
        Op::Write {
            offset: 40 * PAGE,
            len: PAGE_SIZE,
            buffer: 0,
        },
        Op::Flush,
    ]);
    assert_eq!(results, [0, 0]);
    client
        .lane()
        .verify_pages((0..32).chain([40]), |p| swap_page(p).1);
    expect_clean_exit_after_disconnect(daemon, client);
}

#[test]
fn sub_page_and_unaligned_512_byte_io() {
    let daemon = DaemonProcess::start(16 * MIB, &[]);
    let mut client = connect(&daemon, 1);
    let lane = client.lane();
    lane.write_swap_pages(0..8);
    // The model of the first 8 pages.
    let mut model: Vec<u8> = (0..8).flat_map(|p| swap_page(p).1).collect();

    // Sector writes: inside a page, straddling a page boundary, and a sector at odd offsets,
    // all in flight at once.
    let writes = [
        (PAGE + 3 * 512, 512usize, 0xA5u8),
        (3 * PAGE - 512, 1024, 0x5A),
        (5 * PAGE + 7 * 512, 512, 0x3C),
        (6 * PAGE + 512, 2048, 0x00),
    ];
    let mut ops = Vec::new();
    let mut buffer_at = 0;
    for &(offset, len, byte) in &writes {
        lane.buffer()[buffer_at..buffer_at + len].fill(byte);
        let start = usize::try_from(offset).expect("small offset");
        model[start..start + len].fill(byte);
        ops.push(Op::Write {
            offset,
            len,
            buffer: buffer_at,
        });
        buffer_at += len;
    }
    let results = lane.run(&ops);
    assert!(results.iter().all(|&r| r == 0), "{results:?}");

    // Sector reads: one sector, a run across a boundary, and an unaligned multi-page read.
    let reads = [
        (3 * PAGE + 7 * 512, 512usize),
        (2 * PAGE + 5 * 512, 3 * 512),
        (512, 2 * PAGE_SIZE),
        (PAGE + 3 * 512, 512),
    ];
    lane.buffer().fill(0xEE);
    let mut ops = Vec::new();
    let mut buffer_at = 0;
    for &(offset, len) in &reads {
        ops.push(Op::Read {
            offset,
            len,
            buffer: buffer_at,
        });
        buffer_at += len;
    }
    let results = lane.run(&ops);
    assert!(results.iter().all(|&r| r == 0), "{results:?}");
    let mut buffer_at = 0;
    for &(offset, len) in &reads {
        let start = usize::try_from(offset).expect("small offset");
        assert!(
            lane.buffer()[buffer_at..buffer_at + len] == model[start..start + len],
            "{len} bytes at {offset} differ from the model"
        );
        buffer_at += len;
    }
    // And the whole pages agree with the model.
    lane.verify_pages(0..8, |p| {
        let start = usize::try_from(p * PAGE).expect("small offset");
        model[start..start + PAGE_SIZE]
            .try_into()
            .expect("one page")
    });
    expect_clean_exit_after_disconnect(daemon, client);
}

#[test]
fn io_past_the_end_fails_and_the_daemon_keeps_serving() {
    let size = 8 * MIB;
    let daemon = DaemonProcess::start(size, &[]);
    let mut client = connect(&daemon, 1);
    assert_eq!(client.capacity(), size);
    let io_before = daemon.io_stat();
    client
        .lane()
        .write_swap_pages([0, size / PAGE - 1].into_iter());
    let results = client.lane().run(&[
        Op::Read {
            offset: size,
            len: PAGE_SIZE,
            buffer: 0,
        },
        Op::Read {
            offset: size - 512,
            len: 1024,
            buffer: PAGE_SIZE,
        },
        Op::Write {
            offset: size + 64 * PAGE,
            len: PAGE_SIZE,
            buffer: 2 * PAGE_SIZE,
        },
        Op::Discard {
            offset: size - PAGE,
            len: 2 * PAGE,
        },
        Op::Read {
            offset: 0,
            len: PAGE_SIZE,
            buffer: 3 * PAGE_SIZE,
        },
    ]);
    assert!(
        results[..4].iter().all(|&r| r < 0),
        "I/O beyond the end fails: {results:?}"
    );
    assert_eq!(
        results[4], 0,
        "a valid read in the same batch succeeds: {results:?}"
    );
    assert!(
        client.lane().buffer()[3 * PAGE_SIZE..4 * PAGE_SIZE] == swap_page(0).1,
        "the valid read returned page 0"
    );
    // The device still works, the last page included, and the failed discard freed nothing.
    client.lane().write_swap_pages(1..64);
    client
        .lane()
        .verify_pages((0..64).chain([size / PAGE - 1]), |p| swap_page(p).1);
    let io_after = daemon.io_stat();
    assert!(
        io_after.invalid_io >= io_before.invalid_io + 4,
        "out-of-range requests count as invalid_io: {io_before:?} -> {io_after:?}"
    );
    expect_clean_exit_after_disconnect(daemon, client);
}

#[test]
fn read_only_device_offers_ro_and_serves_reads() {
    let daemon = DaemonProcess::start(8 * MIB, &["--read-only"]);
    // libblkio refuses to start a read-write session on a device that offers
    // VIRTIO_BLK_F_RO: that is the daemon telling the driver it refuses writes.
    let refused = Client::connect(&daemon, 1, false)
        .err()
        .expect("a read-write session on a read-only device must not start");
    assert_eq!(refused.errno(), blkio::Errno::ROFS, "{refused:?}");
    // A refused session disconnects too, and the daemon exits cleanly then; start a new one.
    drop(daemon);

    let daemon = DaemonProcess::start(8 * MIB, &["--read-only"]);
    let mut client = Client::connect(&daemon, 1, true).expect("read-only session");
    client.lane().verify_pages(0..64, |_| [0; PAGE_SIZE]);
    let results = client.lane().run(&[Op::Write {
        offset: 0,
        len: PAGE_SIZE,
        buffer: 0,
    }]);
    assert!(
        results[0] < 0,
        "a write on a read-only device fails: {results:?}"
    );
    expect_clean_exit_after_disconnect(daemon, client);
}

/// The backing file of a writeback test, in a directory of its own.
fn backing_dir() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("backing").to_str().unwrap().to_owned();
    (dir, path)
}

/// zram's `bd_stat` columns: bd_count, bd_reads, bd_writes.
fn bd_stat(daemon: &DaemonProcess) -> [u64; 3] {
    daemon.ctl_columns("bd_stat")
}

#[test]
fn idle_pages_written_back_read_back_intact_and_leave_ram() {
    let pages = 4096u64;
    let (_dir, backing) = backing_dir();
    let daemon = DaemonProcess::start(64 * MIB, &["--backing-file", &backing]);
    let mut client = connect(&daemon, 1);
    client.lane().write_swap_pages(0..pages);
    let before = daemon.mm_stat();
    assert_eq!(bd_stat(&daemon), [0, 0, 0]);

    let idle = daemon.ctl(&["idle", "all"]);
    let written = daemon.ctl(&["writeback", "idle"]);

    assert_eq!(idle, format!("marked {pages} pages idle\n"));
    assert!(written.starts_with("wrote back "), "{written}");
    // The objects left RAM at once; the pending pool gives its buffers back after a second
    // with nothing pending.
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let after = daemon.mm_stat();
        if after.mem_used_total < before.mem_used_total / 4 || Instant::now() > deadline {
            break after;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        after.mem_used_total < before.mem_used_total / 4,
        "mem_used_total {} -> {}",
        before.mem_used_total,
        after.mem_used_total
    );
    assert_eq!(after.orig_data_size, before.orig_data_size);
    let [count, reads, writes] = bd_stat(&daemon);
    assert!(
        count > 0 && writes >= count && reads == 0,
        "{count} {reads} {writes}"
    );
    // The file holds about what RAM held: packed compressed objects, not a page each.
    assert!(
        count * PAGE < before.compr_data_size * 11 / 10,
        "{count} blocks for {before:?}"
    );

    client.lane().verify_pages(0..pages, |p| swap_page(p).1);
    let [_, reads, _] = bd_stat(&daemon);
    assert!(
        reads >= count,
        "the pages came from the file: {reads} reads"
    );
    let stats = daemon.stats();
    assert_eq!(stats.io.failed_reads, 0);
    assert!(
        stats.writeback.pages_on_file > pages / 2,
        "{:?}",
        stats.writeback
    );
    expect_clean_exit_after_disconnect(daemon, client);
}

/// Reads of written-back pages run on the read-back threads and come back through the
/// mailbox of the queue that took them; on every queue, not only the first (queue 1's mailbox
/// event used to end its thread, and its guest waited for ever).
#[test]
fn written_back_pages_read_back_on_every_queue() {
    let pages = 2048u64;
    let (_dir, backing) = backing_dir();
    let daemon = DaemonProcess::start(64 * MIB, &["--num-queues", "2", "--backing-file", &backing]);
    let mut client = connect(&daemon, 2);
    client.lanes[0].write_swap_pages((0..pages).step_by(2));
    client.lanes[1].write_swap_pages((1..pages).step_by(2));
    daemon.ctl(&["idle", "all"]);
    let written = daemon.ctl(&["writeback", "idle"]);
    assert!(written.starts_with("wrote back "), "{written}");

    // Each queue reads the pages the other wrote, then its own, all from the file.
    std::thread::scope(|scope| {
        for (q, lane) in client.lanes.iter_mut().enumerate() {
            scope.spawn(move || {
                lane.verify_pages((((q + 1) % 2) as u64..pages).step_by(2), |p| swap_page(p).1);
                lane.verify_pages((q as u64..pages).step_by(2), |p| swap_page(p).1);
            });
        }
    });

    let [count, reads, _] = bd_stat(&daemon);
    assert!(count > 0 && reads >= count, "bd_stat {count} {reads}");
    assert_eq!(daemon.stats().io.failed_reads, 0);
    expect_clean_exit_after_disconnect(daemon, client);
}

#[test]
fn writeback_above_keeps_ram_below_the_mark_and_every_page_reads_back() {
    let pages = 8192u64;
    let (_dir, backing) = backing_dir();
    let daemon = DaemonProcess::start(
        64 * MIB,
        &[
            "--backing-file",
            &backing,
            "--writeback-above",
            "4M",
            "--idle-tick",
            "1",
        ],
    );
    let mut client = connect(&daemon, 1);
    client.lane().write_swap_pages(0..pages);
    let full = daemon.mm_stat();
    assert!(
        full.mem_used_total > 8 * MIB,
        "the data needs more than the mark: {full:?}"
    );

    let deadline = Instant::now() + Duration::from_secs(20);
    while daemon.mm_stat().mem_used_total > 4 * MIB {
        assert!(
            Instant::now() < deadline,
            "still above 4 MiB after 20 s: {:?} {:?}",
            daemon.mm_stat(),
            daemon.stats().writeback
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let [count, _, _] = bd_stat(&daemon);
    assert!(count > 0);

    client.lane().verify_pages(0..pages, |p| swap_page(p).1);
    assert_eq!(daemon.io_stat().failed_reads, 0);
    expect_clean_exit_after_disconnect(daemon, client);
}

#[test]
fn a_second_daemon_on_the_same_backing_file_is_refused() {
    let (_dir, backing) = backing_dir();
    let _first = DaemonProcess::start(16 * MIB, &["--backing-file", &backing]);
    let mut second = DaemonProcess::options()
        .size(16 * MIB)
        .args(["--backing-file", &backing])
        .spawn();
    let exited = second.wait_exit();
    assert_eq!(exited.status.code(), Some(1), "{exited:?}");
    let stderr = exited.stderr;
    assert!(
        stderr.contains(&backing) && stderr.contains("in use"),
        "{stderr}"
    );
}

/// With `--mem-limit` and `--writeback-above` below it, a guest writing four times the limit
/// gets no I/O error: writes that meet the limit wake the writeback thread and wait for the
/// room it makes. Every page reads back, both with the compression workers and without.
#[test]
fn writeback_above_makes_room_under_a_memory_limit() {
    for workers in ["1", "0"] {
        let pages = 16384u64; // 64 MiB of swap-like pages, about 28 MiB compressed
        let (_dir, backing) = backing_dir();
        let daemon = DaemonProcess::start(
            64 * MIB,
            &[
                "--backing-file",
                &backing,
                "--mem-limit",
                "8M",
                "--writeback-above",
                "4M",
                "--workers",
                workers,
            ],
        );
        let mut client = connect(&daemon, 1);
        client.lane().write_swap_pages(0..pages);
        client.lane().verify_pages(0..pages, |p| swap_page(p).1);
        let io = daemon.io_stat();
        let mm = daemon.mm_stat();
        assert_eq!(
            (io.failed_writes, io.failed_reads),
            (0, 0),
            "--workers {workers}: {io:?} {mm:?}"
        );
        // The allocator never passes the limit; the same-fill word table may, by a few
        // entries (same-filled pages are stored even at the limit, as in zram).
        assert!(mm.mem_used_max <= 8 * MIB + 64 * 1024, "{mm:?}");
        assert!(bd_stat(&daemon)[0] > 0);
        expect_clean_exit_after_disconnect(daemon, client);
    }
}
