// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! cloud-hypervisor's side of the vhost-user protocol, replayed in-process.
//!
//! cloud-hypervisor cannot run on the CI machine (it needs KVM), so these tests play its
//! vhost-user-blk frontend instead: the same `vhost` crate `Frontend` it uses, the same
//! virtio and protocol feature masks, the same messages in the same order, then real I/O
//! through virtqueues in shared memfd-backed guest memory, the way a Linux guest drives them.
//!
//! Mirrored from cloud-hypervisor (`cloud-hypervisor/cloud-hypervisor`, `virtio-devices/src/`):
//!
//! - `vhost_user/blk.rs`, `Blk::new`: the device's `avail_features` (`VIRTIO_BLK_F_*` bits,
//!   `MQ` only with more than one queue, plus `DEFAULT_VIRTIO_FEATURES` of `vhost_user/mod.rs`)
//!   and `avail_protocol_features`; `negotiate_features_vhost_user`; `GET_QUEUE_NUM` when `MQ`
//!   was acked, refusing a backend with fewer queues (`Error::BadQueueNum`); `GET_CONFIG` at
//!   `VHOST_USER_CONFIG_OFFSET` for `size_of::<VirtioBlockConfig>()` (60) bytes.
//! - `vhost_user/vu_common_ctrl.rs`, `negotiate_features_vhost_user`: `SET_OWNER`,
//!   `GET_FEATURES`, acked = ours & theirs, `GET_PROTOCOL_FEATURES`, `SET_PROTOCOL_FEATURES`
//!   (no `SET_FEATURES` yet), then `NEED_REPLY` on every later message when `REPLY_ACK` was
//!   acked.
//! - `vhost_user/vu_common_ctrl.rs`, `setup_vhost_user` (on the guest's DRIVER_OK):
//!   `SET_FEATURES`, `SET_MEM_TABLE` (one region per guest RAM region, by memfd), `SET_VRING_NUM`
//!   for every queue, then per queue `SET_VRING_ADDR` (host virtual addresses, flags 0, no log),
//!   `SET_VRING_BASE` (the avail index), `SET_VRING_CALL`, `SET_VRING_KICK`; then
//!   `SET_VRING_ENABLE` for every queue. Between `SET_VRING_NUM` and `SET_VRING_ADDR`, since
//!   `INFLIGHT_SHMFD` is acked: `GET_INFLIGHT_FD` (num_queues, the first queue's size) the first
//!   time, then `SET_INFLIGHT_FD` with the region it got. No `SET_BACKEND_REQ_FD` (the block
//!   device has no backend request handler).
//! - `vhost_user/mod.rs`, `VhostUserCommon::add_memory_region`: memory hotplug is
//!   `ADD_MEM_REG` when `CONFIGURE_MEM_SLOTS` was acked.
//! - `vhost_user/vu_common_ctrl.rs`, `reset_vhost_user` (guest reset): per queue
//!   `SET_VRING_ENABLE 0` then `GET_VRING_BASE`.

// Descriptor indexes, flags and lengths here are small constants.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures, VHOST_USER_CONFIG_OFFSET,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_user_zram::blk::DeviceConfig;
use vhost_user_zram::daemon::DaemonConfig;
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_GEOMETRY, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::bindings::virtio_config::{
    VIRTIO_F_IN_ORDER, VIRTIO_F_NOTIFICATION_DATA, VIRTIO_F_ORDER_PLATFORM, VIRTIO_F_VERSION_1,
};
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion,
};
use vmm_sys_util::eventfd::EventFd;

use common::in_process::InProcessDaemon;

/// Device capacity in 4 KiB pages.
const PAGES: u64 = 256;
/// The daemon's largest queue size (its `--queue-size` default).
const DAEMON_QUEUE_SIZE: u16 = 256;
/// cloud-hypervisor `vmm/src/config.rs`: `DEFAULT_QUEUE_SIZE_VUBLK`, what `--disk
/// vhost_user=true,socket=...` uses without `queue_size=`.
const CH_DEFAULT_QUEUE_SIZE_VUBLK: u16 = 128;
const SERIAL: &str = "ch-zram-serial";
/// How long the daemon gets to return from `run` after the frontend hangs up.
const JOIN_LIMIT: Duration = Duration::from_secs(10);

/// Guest RAM as cloud-hypervisor lays it out for a VM larger than the 32-bit hole: one region
/// at 0 and one above 4 GiB, each its own shared memfd (`--memory shared=on`). A third region
/// is hot-plugged later. Sizes are small: only the addresses matter.
const RAM_LOW: (u64, usize) = (0, 4 << 20);
const RAM_HIGH: (u64, usize) = (0x1_0000_0000, 2 << 20);
const RAM_HOTPLUG: (u64, usize) = (0x2_0000_0000, 2 << 20);

/// `VhostUserVirtioFeatures::PROTOCOL_FEATURES` (bit 30).
const PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// cloud-hypervisor `virtio-devices/src/vhost_user/mod.rs`: `DEFAULT_VIRTIO_FEATURES`.
const CH_DEFAULT_VIRTIO_FEATURES: u64 = 1 << VIRTIO_RING_F_INDIRECT_DESC
    | 1 << VIRTIO_RING_F_EVENT_IDX
    | 1 << VIRTIO_F_VERSION_1
    | 1 << VIRTIO_F_IN_ORDER
    | 1 << VIRTIO_F_ORDER_PLATFORM
    | 1 << VIRTIO_F_NOTIFICATION_DATA
    | PROTOCOL_FEATURES;

/// cloud-hypervisor `virtio-devices/src/vhost_user/blk.rs`, `Blk::new`: `avail_features`.
fn ch_avail_features(num_queues: usize) -> u64 {
    let mut features = 1 << VIRTIO_BLK_F_SIZE_MAX
        | 1 << VIRTIO_BLK_F_SEG_MAX
        | 1 << VIRTIO_BLK_F_GEOMETRY
        | 1 << VIRTIO_BLK_F_RO
        | 1 << VIRTIO_BLK_F_BLK_SIZE
        | 1 << VIRTIO_BLK_F_FLUSH
        | 1 << VIRTIO_BLK_F_TOPOLOGY
        | 1 << VIRTIO_BLK_F_CONFIG_WCE
        | 1 << VIRTIO_BLK_F_DISCARD
        | 1 << VIRTIO_BLK_F_WRITE_ZEROES
        | CH_DEFAULT_VIRTIO_FEATURES;
    if num_queues > 1 {
        features |= 1 << VIRTIO_BLK_F_MQ;
    }
    features
}

/// cloud-hypervisor `virtio-devices/src/vhost_user/blk.rs`, `Blk::new`:
/// `avail_protocol_features`.
fn ch_avail_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::LOG_SHMFD
}

/// The features cloud-hypervisor ends up with against this daemon, spelled out bit by bit.
fn expected_acked_features(num_queues: usize) -> u64 {
    let mut bits = vec![
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ];
    if num_queues > 1 {
        bits.push(VIRTIO_BLK_F_MQ);
    }
    bits.iter()
        .fold(PROTOCOL_FEATURES, |acc, bit| acc | 1 << bit)
}

fn config(socket: &Path, num_queues: u16) -> DaemonConfig {
    let mut device = DeviceConfig::new(PAGES);
    device.num_queues = num_queues;
    device.queue_size = DAEMON_QUEUE_SIZE;
    device.serial = DeviceConfig::serial_from_str(SERIAL).unwrap();
    common::daemon_config(socket, device, 64)
}

fn memfd(name: &std::ffi::CStr, len: usize) -> File {
    // SAFETY: memfd_create takes a valid NUL-terminated name and flags; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len as u64).unwrap();
    file
}

/// The guest's RAM, all three regions mapped on our side; the backend learns of the third
/// only when it is hot-plugged.
fn guest_memory() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges_with_files(&[
        (
            GuestAddress(RAM_LOW.0),
            RAM_LOW.1,
            Some(FileOffset::new(memfd(c"ram-low", RAM_LOW.1), 0)),
        ),
        (
            GuestAddress(RAM_HIGH.0),
            RAM_HIGH.1,
            Some(FileOffset::new(memfd(c"ram-high", RAM_HIGH.1), 0)),
        ),
        (
            GuestAddress(RAM_HOTPLUG.0),
            RAM_HOTPLUG.1,
            Some(FileOffset::new(memfd(c"ram-hotplug", RAM_HOTPLUG.1), 0)),
        ),
    ])
    .unwrap()
}

/// cloud-hypervisor `vu_common_ctrl.rs`, `update_mem_table` / `add_memory_region`: the region
/// as a `VhostUserMemoryRegionInfo`, field by field.
fn region_info(mem: &GuestMemoryMmap<()>, start: u64) -> VhostUserMemoryRegionInfo {
    let region = mem.find_region(GuestAddress(start)).unwrap();
    let file_offset = region.file_offset().unwrap();
    VhostUserMemoryRegionInfo {
        guest_phys_addr: region.start_addr().raw_value(),
        memory_size: region.len(),
        userspace_addr: region.as_ptr() as u64,
        mmap_offset: file_offset.start(),
        mmap_handle: file_offset.file().as_raw_fd(),
    }
}

/// What `Blk::new` learned from the backend.
struct Negotiated {
    acked_features: u64,
    acked_protocol_features: VhostUserProtocolFeatures,
    backend_num_queues: u64,
    config_space: Vec<u8>,
}

/// cloud-hypervisor `Blk::new` for a device with `num_queues` queues: connect, negotiate
/// (`negotiate_features_vhost_user`), check the queue count, read the configuration space.
/// Returns `Err` with the backend's queue count where cloud-hypervisor fails with
/// `BadQueueNum`.
fn ch_blk_new(socket: &Path, num_queues: usize) -> (Frontend, Result<Negotiated, u64>) {
    let mut vu = Frontend::connect(socket, num_queues as u64).unwrap();

    // negotiate_features_vhost_user
    vu.set_owner().unwrap();
    let backend_features = vu.get_features().unwrap();
    let acked_features = ch_avail_features(num_queues) & backend_features;
    let acked_protocol_features = if acked_features & PROTOCOL_FEATURES != 0 {
        let backend_protocol_features = vu.get_protocol_features().unwrap();
        let acked = ch_avail_protocol_features() & backend_protocol_features;
        vu.set_protocol_features(acked).unwrap();
        acked
    } else {
        VhostUserProtocolFeatures::empty()
    };
    if ch_avail_protocol_features().contains(VhostUserProtocolFeatures::REPLY_ACK)
        && acked_protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK)
    {
        vu.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    }

    // Back in Blk::new.
    let backend_num_queues = if acked_protocol_features.contains(VhostUserProtocolFeatures::MQ) {
        vu.get_queue_num().unwrap()
    } else {
        1 // DEFAULT_QUEUE_NUMBER
    };
    if num_queues as u64 > backend_num_queues {
        return (vu, Err(backend_num_queues));
    }

    let config_len = 60; // size_of::<VirtioBlockConfig>()
    let (_, config_space) = vu
        .get_config(
            VHOST_USER_CONFIG_OFFSET,
            config_len,
            VhostUserConfigFlags::WRITABLE,
            &vec![0u8; config_len as usize],
        )
        .unwrap();
    assert_eq!(config_space.len(), config_len as usize);

    (
        vu,
        Ok(Negotiated {
            acked_features,
            acked_protocol_features,
            backend_num_queues,
            config_space,
        }),
    )
}

/// What cloud-hypervisor must have concluded from negotiating with this daemon.
fn assert_negotiated_as_expected(negotiated: &Negotiated, num_queues: usize) {
    assert_eq!(
        negotiated.acked_features,
        expected_acked_features(num_queues),
        "acked virtio features: {:#x}",
        negotiated.acked_features
    );
    for (bit, name) in [
        (VIRTIO_BLK_F_CONFIG_WCE, "CONFIG_WCE"),
        (VIRTIO_BLK_F_GEOMETRY, "GEOMETRY"),
        (VIRTIO_BLK_F_RO, "RO"),
        (VIRTIO_F_IN_ORDER, "IN_ORDER"),
        (VIRTIO_F_ORDER_PLATFORM, "ORDER_PLATFORM"),
        (VIRTIO_F_NOTIFICATION_DATA, "NOTIFICATION_DATA"),
    ] {
        assert_eq!(
            negotiated.acked_features & 1 << bit,
            0,
            "{name} is offered by cloud-hypervisor but not by us"
        );
    }
    assert_eq!(
        negotiated.acked_protocol_features,
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::LOG_SHMFD
    );
    // With INFLIGHT_SHMFD cloud-hypervisor's `VhostUserCommon::activate` creates an `Inflight`
    // and sends GET/SET_INFLIGHT_FD; with LOG_SHMFD `update_supports_migration` turns
    // migration on: it acknowledges `LOG_ALL` and sends `SET_LOG_BASE` only when it migrates.
    assert_eq!(
        negotiated.acked_features & VhostUserVirtioFeatures::LOG_ALL.bits(),
        0
    );
    assert!(negotiated.backend_num_queues >= num_queues as u64);
    assert_eq!(negotiated.backend_num_queues, num_queues as u64);
}

/// One virtqueue as the guest driver sees it, plus the eventfds cloud-hypervisor hands the
/// backend for it (the ioeventfd it kicks, the irqfd the backend calls).
struct GuestQueue<'a> {
    index: usize,
    vq: MockSplitQueue<'a, GuestMemoryMmap<()>>,
    kick: EventFd,
    call: EventFd,
    /// Per-request scratch in low RAM: header, status, indirect table.
    scratch: u64,
    size: u16,
    next_head: u16,
    avail_idx: u16,
}

/// A buffer of one request after the 16-byte header.
struct Segment {
    addr: u64,
    len: u32,
    device_writes: bool,
}

impl<'a> GuestQueue<'a> {
    fn new(mem: &'a GuestMemoryMmap<()>, index: usize, size: u16) -> Self {
        let base = RAM_LOW.0 + 0x1_0000 * (index as u64 + 1);
        GuestQueue {
            index,
            vq: MockSplitQueue::create(mem, GuestAddress(base), size),
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            scratch: RAM_LOW.0 + 0x10_0000 * (index as u64 + 1),
            size,
            next_head: 0,
            avail_idx: 0,
        }
    }

    /// cloud-hypervisor `setup_vhost_user`: the vring addresses as host virtual addresses.
    fn config_data(&self, mem: &GuestMemoryMmap<()>, max_size: u16, size: u16) -> VringConfigData {
        let host = |gpa: GuestAddress| mem.get_host_address(gpa).unwrap() as u64;
        VringConfigData {
            queue_max_size: max_size,
            queue_size: size,
            flags: 0,
            desc_table_addr: host(self.vq.desc_table_addr()),
            used_ring_addr: host(self.vq.used_addr()),
            avail_ring_addr: host(self.vq.avail_addr()),
            log_addr: None,
        }
    }

    /// Submits one request the way Linux's virtio_ring does with `INDIRECT_DESC` negotiated
    /// (every request has at least two buffers, so each goes in an indirect table), with
    /// `used_event` set so the device interrupts; waits for the completion and its interrupt.
    /// Returns the status byte and the used length.
    fn request(
        &mut self,
        mem: &GuestMemoryMmap<()>,
        request_type: u32,
        sector: u64,
        segments: &[Segment],
    ) -> (u8, u32) {
        let header = self.scratch;
        let status = self.scratch + 0x100;
        let table = self.scratch + 0x200;
        let mut bytes = [0u8; 16];
        bytes[0..4].copy_from_slice(&request_type.to_le_bytes());
        bytes[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&bytes, GuestAddress(header)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(status)).unwrap();

        let next = VRING_DESC_F_NEXT as u16;
        let mut entries = vec![Descriptor::new(header, 16, next, 1)];
        for (i, segment) in segments.iter().enumerate() {
            let write = if segment.device_writes {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            entries.push(Descriptor::new(
                segment.addr,
                segment.len,
                next | write,
                i as u16 + 2,
            ));
        }
        entries.push(Descriptor::new(status, 1, VRING_DESC_F_WRITE as u16, 0));
        for (i, entry) in entries.iter().enumerate() {
            mem.write_obj(
                RawDescriptor::from(*entry),
                GuestAddress(table + 16 * i as u64),
            )
            .unwrap();
        }

        let head = self.next_head;
        self.next_head = (self.next_head + 1) % self.size;
        let indirect = Descriptor::new(
            table,
            16 * entries.len() as u32,
            VRING_DESC_F_INDIRECT as u16,
            0,
        );
        self.vq
            .desc_table()
            .store(head, RawDescriptor::from(indirect))
            .unwrap();
        let ring_len = self.size;
        self.vq
            .avail()
            .ring()
            .ref_at(usize::from(self.avail_idx % ring_len))
            .unwrap()
            .store(head);
        // used_event: interrupt once the device has used the entry at our current used index
        // (virtqueue_enable_cb sets it to the last index seen).
        let used_event = self
            .vq
            .avail_addr()
            .unchecked_add(4 + 2 * u64::from(ring_len));
        mem.write_obj(self.avail_idx, used_event).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.vq.avail().idx().store(self.avail_idx);
        self.kick.write(1).unwrap();

        self.wait_for_used_and_interrupt();
        let used = self
            .vq
            .used()
            .ring()
            .ref_at(usize::from((self.avail_idx - 1) % ring_len))
            .unwrap()
            .load();
        assert_eq!(used.id(), u32::from(head), "queue {}: used id", self.index);
        (
            mem.read_obj::<u8>(GuestAddress(status)).unwrap(),
            used.len(),
        )
    }

    /// Waits, with a deadline, until the used index reaches the avail index and the backend
    /// has signalled the call eventfd.
    fn wait_for_used_and_interrupt(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut interrupted = false;
        loop {
            interrupted |= self.call.read().is_ok();
            if interrupted && self.vq.used().idx().load() == self.avail_idx {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "queue {}: no completion with interrupt in time (used idx {}, interrupted {})",
                self.index,
                self.vq.used().idx().load(),
                interrupted
            );
            let mut fds = [libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: one valid pollfd, length passed exactly.
            unsafe { libc::poll(fds.as_mut_ptr(), 1, 100) };
        }
    }
}

/// cloud-hypervisor `setup_vhost_user` (`VhostUserCommon::activate` on DRIVER_OK), message by
/// message, for `queues` of size `size` (cloud-hypervisor's `queue_size`, which the guest
/// keeps as the ring size).
fn ch_setup_vhost_user(
    vu: &mut Frontend,
    mem: &GuestMemoryMmap<()>,
    queues: &[GuestQueue<'_>],
    acked_features: u64,
    size: u16,
) {
    vu.set_features(acked_features).unwrap();
    // update_mem_table: every region of the guest's RAM (hot-plugged memory comes later).
    vu.set_mem_table(&[region_info(mem, RAM_LOW.0), region_info(mem, RAM_HIGH.0)])
        .unwrap();
    for queue in queues {
        vu.set_vring_num(queue.index, size).unwrap();
    }
    // INFLIGHT_SHMFD was acked: GET_INFLIGHT_FD for a new region, then SET_INFLIGHT_FD.
    let asked = VhostUserInflight {
        mmap_size: 0,
        mmap_offset: 0,
        num_queues: queues.len() as u16,
        queue_size: size,
    };
    let (info, region) = vu.get_inflight_fd(&asked).unwrap();
    assert_eq!(info.mmap_offset, 0);
    assert_eq!(region.metadata().unwrap().len(), info.mmap_size);
    vu.set_inflight_fd(&info, region.as_raw_fd()).unwrap();
    for queue in queues {
        vu.set_vring_addr(queue.index, &queue.config_data(mem, size, size))
            .unwrap();
        // queue.avail_idx(): nothing was submitted before DRIVER_OK.
        vu.set_vring_base(queue.index, 0).unwrap();
        vu.set_vring_call(queue.index, &queue.call).unwrap();
        vu.set_vring_kick(queue.index, &queue.kick).unwrap();
    }
    for queue in queues {
        vu.set_vring_enable(queue.index, true).unwrap();
    }
    // The block device passes no backend request handler: no SET_BACKEND_REQ_FD.
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..4096u32)
        .map(|i| (i % 251) as u8 ^ seed.wrapping_mul(37))
        .collect()
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;

/// The whole life of a cloud-hypervisor vhost-user-blk device with `num_queues` queues of
/// `queue_size`: `Blk::new`, activation, I/O on every queue, memory hotplug, guest reset,
/// shutdown.
fn cloud_hypervisor_drives_the_device(num_queues: usize, queue_size: u16) {
    let daemon = InProcessDaemon::start(|socket| config(socket, num_queues as u16));
    let (mut vu, negotiated) = ch_blk_new(&daemon.socket, num_queues);
    let negotiated = negotiated.unwrap_or_else(|backend| {
        panic!("cloud-hypervisor would refuse: backend has {backend} queues")
    });
    assert_negotiated_as_expected(&negotiated, num_queues);

    // The guest driver acks what cloud-hypervisor offers it (the negotiated set; Linux's
    // virtio-blk knows every one of these bits but not the vhost-user bit 30); cloud-hypervisor
    // adds PROTOCOL_FEATURES back before SET_FEATURES (`Blk::new` keeps it in `acked_features`).
    let guest_acked = negotiated.acked_features & !PROTOCOL_FEATURES;
    let acked_features = (negotiated.acked_features & PROTOCOL_FEATURES) | guest_acked;

    let mem = guest_memory();
    let mut queues: Vec<GuestQueue<'_>> = (0..num_queues)
        .map(|index| GuestQueue::new(&mem, index, queue_size))
        .collect();
    ch_setup_vhost_user(&mut vu, &mem, &queues, acked_features, queue_size);

    // Memory hotplug: CONFIGURE_MEM_SLOTS was acked, so cloud-hypervisor sends ADD_MEM_REG
    // (`VhostUserCommon::add_memory_region`); the guest uses the new memory further down.
    // It is sent before the first kick on purpose: a queue worker already inside its serve loop
    // keeps the memory map it took when it woke, so a request into memory added while the
    // worker is busy can still fail; that race is not what this test is about.
    vu.add_mem_region(&region_info(&mem, RAM_HOTPLUG.0))
        .unwrap();

    // On every queue: write a page (data in the high RAM region), read it back into a zeroed
    // buffer, flush, GET_ID.
    let mut expected_avail = Vec::new();
    for queue in &mut queues {
        let q = queue.index as u64;
        let data = RAM_HIGH.0 + 0x1_0000 * q;
        let sector = 8 * (3 * q + 5);
        let page = pattern(q as u8 + 1);
        mem.write_slice(&page, GuestAddress(data)).unwrap();
        let out = [Segment {
            addr: data,
            len: 4096,
            device_writes: false,
        }];
        assert_eq!(queue.request(&mem, VIRTIO_BLK_T_OUT, sector, &out), (OK, 1));

        mem.write_slice(&[0u8; 4096], GuestAddress(data)).unwrap();
        let read = [Segment {
            addr: data,
            len: 4096,
            device_writes: true,
        }];
        assert_eq!(
            queue.request(&mem, VIRTIO_BLK_T_IN, sector, &read),
            (OK, 4097)
        );
        let mut back = vec![0u8; 4096];
        mem.read_slice(&mut back, GuestAddress(data)).unwrap();
        assert!(back == page, "queue {q}: the page read back differs");

        assert_eq!(queue.request(&mem, VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));

        let id = RAM_HIGH.0 + 0x8_0000 + 0x100 * q;
        mem.write_slice(&[0xaa; VIRTIO_BLK_ID_BYTES as usize], GuestAddress(id))
            .unwrap();
        let get_id = [Segment {
            addr: id,
            len: VIRTIO_BLK_ID_BYTES,
            device_writes: true,
        }];
        assert_eq!(
            queue.request(&mem, VIRTIO_BLK_T_GET_ID, 0, &get_id),
            (OK, VIRTIO_BLK_ID_BYTES + 1)
        );
        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        mem.read_slice(&mut serial, GuestAddress(id)).unwrap();
        assert_eq!(serial, DeviceConfig::serial_from_str(SERIAL).unwrap());
        expected_avail.push(4);
    }

    // Every queue serves the same disk: the last queue reads the first queue's page.
    if num_queues > 1 {
        let last = queues.last_mut().unwrap();
        let data = RAM_HIGH.0 + 0x4_0000;
        let read = [Segment {
            addr: data,
            len: 4096,
            device_writes: true,
        }];
        assert_eq!(
            last.request(&mem, VIRTIO_BLK_T_IN, 8 * 5, &read),
            (OK, 4097)
        );
        let mut back = vec![0u8; 4096];
        mem.read_slice(&mut back, GuestAddress(data)).unwrap();
        assert!(
            back == pattern(1),
            "queue 0's page read through the last queue"
        );
        *expected_avail.last_mut().unwrap() += 1;
    }

    // I/O into the hot-plugged memory, on a queue that has served requests already.
    let hot = RAM_HOTPLUG.0 + 0x1000;
    let page = pattern(0x77);
    mem.write_slice(&page, GuestAddress(hot)).unwrap();
    let first = &mut queues[0];
    let out = [Segment {
        addr: hot,
        len: 4096,
        device_writes: false,
    }];
    assert_eq!(
        first.request(&mem, VIRTIO_BLK_T_OUT, 8 * 100, &out),
        (OK, 1)
    );
    mem.write_slice(&[0u8; 4096], GuestAddress(hot)).unwrap();
    let read = [Segment {
        addr: hot,
        len: 4096,
        device_writes: true,
    }];
    assert_eq!(
        first.request(&mem, VIRTIO_BLK_T_IN, 8 * 100, &read),
        (OK, 4097)
    );
    let mut back = vec![0u8; 4096];
    mem.read_slice(&mut back, GuestAddress(hot)).unwrap();
    assert!(
        back == page,
        "the page read into hot-plugged memory differs"
    );
    expected_avail[0] += 2;

    // Guest reset, cloud-hypervisor `reset_vhost_user`: disable each ring, then GET_VRING_BASE,
    // which reports how far the backend got in each avail ring.
    for (queue, expected) in queues.iter().zip(&expected_avail) {
        vu.set_vring_enable(queue.index, false).unwrap();
        assert_eq!(
            vu.get_vring_base(queue.index).unwrap(),
            *expected,
            "queue {}: next avail index",
            queue.index
        );
    }

    // VM shutdown closes the socket; the daemon's run then returns Ok.
    drop(queues);
    drop(vu);
    daemon.join_within(JOIN_LIMIT).unwrap();
}

/// `--disk vhost_user=true,socket=...` with cloud-hypervisor's defaults: one queue of 128.
#[test]
fn one_queue_with_cloud_hypervisor_defaults() {
    cloud_hypervisor_drives_the_device(1, CH_DEFAULT_QUEUE_SIZE_VUBLK);
}

/// `--disk vhost_user=true,socket=...,num_queues=2,queue_size=256`.
#[test]
fn two_queues() {
    cloud_hypervisor_drives_the_device(2, 256);
}

/// The configuration space as cloud-hypervisor reads it: `GET_CONFIG` at
/// `VHOST_USER_CONFIG_OFFSET` (0x100), `size_of::<VirtioBlockConfig>()` bytes; `Blk::new`
/// takes it whole as `VirtioBlockConfig` (overriding only `num_queues`) and the guest sees
/// those bytes at offset 0 of the virtio-blk configuration space.
///
/// QEMU sends offset 0 for the same read; the `vhost` crate passes either through unchanged,
/// so the backend has to take offset 0x100 as the start of the device's configuration space
/// (the `vhost` crate's dummy backend expects 0x100; cloud-hypervisor's own vhost-user-block
/// backend ignores the offset and returns the whole space). Otherwise cloud-hypervisor's guest
/// sees a zeroed configuration space: a disk of 0 sectors.
#[test]
fn config_space_as_cloud_hypervisor_reads_it() {
    for num_queues in [1, 2] {
        let daemon = InProcessDaemon::start(|socket| config(socket, num_queues as u16));
        let (vu, negotiated) = ch_blk_new(&daemon.socket, num_queues);
        let space = negotiated.unwrap().config_space;
        let le32 = |at: usize| u32::from_le_bytes(space[at..at + 4].try_into().unwrap());
        assert_eq!(
            u64::from_le_bytes(space[0..8].try_into().unwrap()),
            PAGES * 8,
            "capacity, in 512-byte sectors"
        );
        assert_eq!(le32(8), 1 << 20, "size_max");
        assert_eq!(le32(12), u32::from(DAEMON_QUEUE_SIZE) - 2, "seg_max");
        assert_eq!(le32(20), 4096, "blk_size");
        assert_eq!(space[24], 0, "physical_block_exp");
        assert_eq!(u16::from_le_bytes([space[26], space[27]]), 1, "min_io_size");
        assert_eq!(le32(28), 1, "opt_io_size");
        assert_eq!(
            u16::from_le_bytes([space[34], space[35]]),
            num_queues as u16,
            "num_queues"
        );
        assert_eq!(le32(44), 8, "discard_sector_alignment");
        assert_eq!(space[56], 1, "write_zeroes_may_unmap");
        drop(vu);
        // A frontend that only read the configuration never used the device: the daemon
        // keeps listening for the next one until it is stopped.
        daemon.stop();
        daemon.join_within(JOIN_LIMIT).unwrap();
    }
}

/// cloud-hypervisor asks for more queues than the daemon serves: `GET_QUEUE_NUM` reports the
/// daemon's count, so `Blk::new` fails with `BadQueueNum` instead of driving a missing queue.
#[test]
fn cloud_hypervisor_refuses_a_daemon_with_fewer_queues() {
    let daemon = InProcessDaemon::start(|socket| config(socket, 1));
    let (vu, negotiated) = ch_blk_new(&daemon.socket, 2);
    assert_eq!(negotiated.err(), Some(1));
    drop(vu);
    // The refused frontend never used the device, so the daemon waits for the next one (a
    // VMM retrying with the right queue count) instead of ending.
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(
        daemon.is_running(),
        "the daemon ended after a refused frontend"
    );
    daemon.stop();
    daemon.join_within(JOIN_LIMIT).unwrap();
}
