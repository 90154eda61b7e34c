// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! In-process vhost-user protocol tests: the vhost crate's `Frontend` against the daemon over a
//! Unix socket, with memfd-backed guest memory shared between the two, as a VMM would.

// Descriptor indexes, flags and lengths here are small constants.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::path::Path;
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use vhost_user_zram::blk::DeviceConfig;
use vhost_user_zram::daemon::{Daemon, DaemonConfig, DaemonError};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use common::in_process::InProcessDaemon;

const PAGES: u64 = 256;
const MEM_SIZE: usize = 4 << 20;
const QUEUE_SIZE: u16 = 256;
const HEADER: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;
/// `VHOST_F_LOG_ALL`: dirty logging for live migration.
const LOG_ALL_BIT: u64 = 1 << 26;
/// How long the daemon gets to return from `run` after the frontend hangs up or a stop.
const JOIN_LIMIT: Duration = Duration::from_secs(10);

fn config(socket: &Path, num_queues: u16) -> DaemonConfig {
    let mut device = DeviceConfig::new(PAGES);
    device.num_queues = num_queues;
    device.queue_size = QUEUE_SIZE;
    common::daemon_config(socket, device, 64)
}

/// Starts a daemon serving `num_queues` queues, on a thread.
fn start_daemon(num_queues: u16) -> InProcessDaemon {
    InProcessDaemon::start(|socket| config(socket, num_queues))
}

fn guest_memory() -> GuestMemoryMmap<()> {
    common::guest_memory_over(MEM_SIZE, MEM_SIZE as u64)
}

fn expected_features() -> u64 {
    [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ]
    .iter()
    .fold(PROTOCOL_FEATURES_BIT | LOG_ALL_BIT, |acc, bit| {
        acc | 1 << bit
    })
}

fn negotiate(frontend: &mut Frontend) {
    frontend.set_owner().unwrap();
    let features = frontend.get_features().unwrap();
    assert_eq!(features, expected_features());
    frontend.set_features(features).unwrap();
    let protocol = frontend.get_protocol_features().unwrap();
    assert_eq!(
        protocol,
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::LOG_SHMFD
    );
    frontend.set_protocol_features(protocol).unwrap();
}

fn le32(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
}

#[test]
fn negotiation_and_config_space_describe_the_device() {
    let daemon = start_daemon(4);
    let mut frontend = Frontend::connect(&daemon.socket, 4).unwrap();
    negotiate(&mut frontend);
    assert_eq!(frontend.get_queue_num().unwrap(), 4);
    let (_, space) = frontend
        .get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0; 60])
        .unwrap();
    assert_eq!(
        u64::from_le_bytes(space[0..8].try_into().unwrap()),
        PAGES * 8,
        "capacity"
    );
    assert_eq!(le32(&space, 8), 1 << 20, "size_max");
    assert_eq!(le32(&space, 12), 254, "seg_max");
    assert_eq!(le32(&space, 20), 4096, "blk_size");
    assert_eq!(space[24], 0, "physical_block_exp");
    assert_eq!(u16::from_le_bytes([space[34], space[35]]), 4, "num_queues");
    assert_eq!(le32(&space, 44), 8, "discard_sector_alignment");
    assert_eq!(space[56], 1, "write_zeroes_may_unmap");
    drop(frontend);
    // It only looked: the daemon waits for the frontend that will use the device.
    std::thread::sleep(Duration::from_millis(200));
    assert!(daemon.is_running());
    daemon.stop();
    daemon.join_within(JOIN_LIMIT).unwrap();
}

/// Plays QEMU's side of a failed negotiation: `-device vhost-user-blk-pci,num-queues=4`
/// against a daemon of 2 queues reads the features, the protocol features, the queue count
/// and the configuration space, then gives up and closes the connection.
fn refuse_like_qemu(socket: &Path) {
    let mut frontend = Frontend::connect(socket, 4).unwrap();
    frontend.get_features().unwrap();
    let protocol = frontend.get_protocol_features().unwrap();
    frontend.set_protocol_features(protocol).unwrap();
    assert_eq!(frontend.get_queue_num().unwrap(), 2);
    frontend.set_owner().unwrap();
    frontend
        .get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0; 60])
        .unwrap();
}

#[test]
fn a_frontend_that_leaves_before_using_the_device_leaves_the_daemon_listening() {
    let daemon = start_daemon(2);

    refuse_like_qemu(&daemon.socket);
    std::thread::sleep(Duration::from_millis(200));

    assert!(
        daemon.is_running(),
        "the daemon ended after a failed negotiation"
    );
    assert_eq!(daemon.store.stats().mm.orig_data_size, 0);
    // The retry (QEMU with num-queues=2) finds the daemon, negotiates from the start
    // (SET_OWNER is not refused as "already claimed") and uses the device; its leaving ends
    // the daemon.
    let mut frontend = Frontend::connect(&daemon.socket, 2).unwrap();
    negotiate(&mut frontend);
    let mem = guest_memory();
    let region = mem.find_region(GuestAddress(0)).unwrap();
    let info = VhostUserMemoryRegionInfo::from_guest_region(region).unwrap();
    frontend.set_mem_table(&[info]).unwrap();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let kick = EventFd::new(0).unwrap();
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    common::start_queue(&mut frontend, &mem, &vq, QUEUE_SIZE, &kick, &call);
    common::post_page_write(&mem, &vq, QUEUE_SIZE, 0, 8, 0x77);
    kick.write(1).unwrap();
    common::wait_for_used(&vq, &call, 1);
    drop(frontend);
    daemon.join_within(JOIN_LIMIT).unwrap();
}

#[test]
fn a_frontend_that_gave_its_memory_ends_the_daemon_even_without_a_request() {
    let daemon = start_daemon(1);
    let mut frontend = Frontend::connect(&daemon.socket, 1).unwrap();
    negotiate(&mut frontend);
    let mem = guest_memory();
    let region = mem.find_region(GuestAddress(0)).unwrap();
    let info = VhostUserMemoryRegionInfo::from_guest_region(region).unwrap();
    frontend.set_mem_table(&[info]).unwrap();

    drop(frontend);

    daemon.join_within(JOIN_LIMIT).unwrap();
}

#[test]
fn a_daemon_holding_data_is_never_offered_to_the_next_frontend() {
    let daemon = start_daemon(1);
    daemon.store.write(5, &[0x42; 4096]).unwrap();
    let mut frontend = Frontend::connect(&daemon.socket, 1).unwrap();
    negotiate(&mut frontend);

    drop(frontend);

    daemon.join_within(JOIN_LIMIT).unwrap();
}

#[test]
fn a_queue_in_memory_the_frontend_did_not_share_names_share_on() {
    // QEMU 7.2 without a share=on memory backend: guest RAM has no file descriptor, so the
    // memory table it sends holds no region, and the ring addresses translate to nothing.
    let daemon = start_daemon(1);
    let mut frontend = Frontend::connect(&daemon.socket, 1).unwrap();
    negotiate(&mut frontend);
    frontend.set_vring_num(0, QUEUE_SIZE).unwrap();
    let _ = frontend.set_vring_addr(
        0,
        &vhost::VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: 0,
            desc_table_addr: 0x7f00_0000_0000,
            used_ring_addr: 0x7f00_0000_2000,
            avail_ring_addr: 0x7f00_0000_1000,
            log_addr: None,
        },
    );

    let error = daemon.join_within(JOIN_LIMIT).unwrap_err();

    let message = error.to_string();
    assert!(
        message.contains("the guest's memory is not shared: use a memory backend with share=on"),
        "{message}"
    );
}

/// Drives one queue through real shared memory: a write, then a read of the same page.
#[test]
fn request_completes_through_shared_memory_and_disconnect_ends_the_daemon() {
    let daemon = start_daemon(1);
    let mut frontend = Frontend::connect(&daemon.socket, 1).unwrap();
    negotiate(&mut frontend);

    let mem = guest_memory();
    let region = mem.find_region(GuestAddress(0)).unwrap();
    let info = VhostUserMemoryRegionInfo::from_guest_region(region).unwrap();
    frontend.set_mem_table(&[info]).unwrap();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let kick = EventFd::new(0).unwrap();
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    common::start_queue(&mut frontend, &mem, &vq, QUEUE_SIZE, &kick, &call);

    let page: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    mem.write_slice(&page, GuestAddress(DATA)).unwrap();
    let submit = |head: u16, request_type: u32, data_flags: u32, avail_idx: u16| {
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&request_type.to_le_bytes());
        header[8..16].copy_from_slice(&3u64.to_le_bytes());
        mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let next = VRING_DESC_F_NEXT as u16;
        let descs = [
            Descriptor::new(HEADER, 16, next, head + 1),
            Descriptor::new(DATA, 4096, next | data_flags as u16, head + 2),
            Descriptor::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0),
        ];
        for (i, desc) in descs.into_iter().enumerate() {
            vq.desc_table()
                .store(head + i as u16, RawDescriptor::from(desc))
                .unwrap();
        }
        vq.avail()
            .ring()
            .ref_at(usize::from(avail_idx))
            .unwrap()
            .store(head);
        vq.avail().idx().store(avail_idx + 1);
        kick.write(1).unwrap();
        common::wait_for_used(&vq, &call, avail_idx + 1);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
    };

    submit(0, VIRTIO_BLK_T_OUT, 0, 0);
    mem.write_slice(&[0u8; 4096], GuestAddress(DATA)).unwrap();
    submit(3, VIRTIO_BLK_T_IN, VRING_DESC_F_WRITE, 1);
    let used = vq.used().ring().ref_at(1).unwrap().load();
    assert_eq!((used.id(), used.len()), (3, 4097));
    let mut back = vec![0u8; 4096];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, page);

    drop(frontend);
    daemon.join_within(JOIN_LIMIT).unwrap();
}

#[test]
fn virtio_reset_keeps_the_connection_and_data() {
    let daemon = start_daemon(1);
    let store = daemon.store.clone();
    let mut frontend = Frontend::connect(&daemon.socket, 1).unwrap();
    negotiate(&mut frontend);
    let page = [0x5a; 4096];
    store.write(7, &page).unwrap();
    frontend.reset_device().unwrap();
    let mut back = [0; 4096];
    store.read(7, &mut back).unwrap();
    assert_eq!(back, page, "a virtio reset keeps the data");
    // A rebooted guest negotiates again on the same connection.
    negotiate_again(&mut frontend);
    drop(frontend);
    daemon.join_within(JOIN_LIMIT).unwrap();
}

fn negotiate_again(frontend: &mut Frontend) {
    let features = frontend.get_features().unwrap();
    frontend.set_features(features).unwrap();
}

#[test]
fn stop_handle_ends_a_daemon_waiting_for_its_frontend() {
    let daemon = start_daemon(1);
    let socket = daemon.socket.clone();
    daemon.stop();
    daemon.join_within(JOIN_LIMIT).unwrap();
    assert!(!socket.exists(), "the socket file is removed");
}

#[test]
fn stop_handle_ends_a_connected_daemon() {
    let daemon = start_daemon(1);
    let socket = daemon.socket.clone();
    let mut frontend = Frontend::connect(&socket, 1).unwrap();
    negotiate(&mut frontend);
    daemon.stop();
    daemon.join_within(JOIN_LIMIT).unwrap();
    assert!(!socket.exists());
}

#[test]
fn a_stop_during_the_start_ends_it_and_leaves_no_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("zram.sock");
    let mut config = config(&socket, 1);
    config.control_socket = Some(dir.path().join("zram.ctl"));
    let signals = vhost_user_zram::daemon::SignalHandling::start().unwrap();
    signals.stop_handle().stop();

    let started = Daemon::with_signals(config, signals);

    assert!(matches!(started, Err(DaemonError::Stopped)));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
