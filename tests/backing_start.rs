// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The backing file at start, against the real binary: the start log names it (path, kind,
//! size or free space, O_DIRECT or buffered) and says what an earlier run left and this one
//! released (no block of its data is left); a file holding someone else's data is refused, naming what it holds and the flag
//! that overrides the refusal, and taken with that flag, with a warning.

mod common;

use std::os::fd::AsRawFd;
use std::path::Path;

use common::child::DaemonProcess;

/// Marks `path` as an earlier vhost-user-zram's backing file (the extended attribute the
/// daemon sets); false where the filesystem has no user extended attributes.
fn mark_as_ours(path: &Path) -> bool {
    let file = std::fs::File::open(path).unwrap();
    // SAFETY: fsetxattr reads the NUL-terminated name and one byte of value, both static.
    let rc = unsafe {
        libc::fsetxattr(
            file.as_raw_fd(),
            c"user.vhost-user-zram".as_ptr(),
            b"1".as_ptr().cast(),
            1,
            0,
        )
    };
    rc == 0
}

#[test]
fn the_start_log_names_the_backing_file_and_what_an_earlier_run_left() {
    let options = DaemonProcess::options();
    let backing = options.socket().with_file_name("backing");
    // What a killed daemon leaves: 256 written blocks, marked ours.
    std::fs::write(&backing, vec![0x5a_u8; 256 * 4096]).unwrap();
    if !mark_as_ours(&backing) {
        println!("SKIPPED: no user extended attributes here");
        return;
    }
    let mut daemon = options
        .args([std::ffi::OsStr::new("--backing-file"), backing.as_os_str()])
        .start();
    let named = format!(
        "writing back to backing file {}: a regular file",
        backing.display()
    );
    // The daemon listens before its log lines have all reached the harness's reader: wait
    // for the lines this test reads.
    daemon.wait_for_log(&named);
    daemon.wait_for_log("from an earlier run");
    let log = daemon.stderr();
    assert!(
        log.contains("O_DIRECT") || log.contains("buffered"),
        "{log}"
    );
    assert!(log.contains("free on its filesystem"), "{log}");
    assert!(log.contains("held 256 blocks (1.0 MiB"), "{log}");
    assert!(log.contains("from an earlier run"), "{log}");
    let meta = std::fs::metadata(&backing).unwrap();
    assert_eq!(meta.len(), 0, "it was emptied");
    assert_eq!(
        std::os::unix::fs::MetadataExt::blocks(&meta),
        0,
        "no block of the earlier run's data is left"
    );
    assert!(daemon.stop().status.success());
}

#[test]
fn a_backing_file_holding_other_data_is_refused_unless_overwriting() {
    let options = DaemonProcess::options();
    let backing = options.socket().with_file_name("disk.img");
    std::fs::write(&backing, b"precious data").unwrap();
    let mut refused = DaemonProcess::options()
        .args([std::ffi::OsStr::new("--backing-file"), backing.as_os_str()])
        .spawn();
    let exited = refused.wait_exit();
    assert!(!exited.status.success());
    assert!(
        exited
            .stderr
            .contains("13 bytes of data of another program")
            && exited.stderr.contains("--backing-file-overwrite"),
        "{}",
        exited.stderr
    );
    assert_eq!(std::fs::read(&backing).unwrap(), b"precious data");
    let mut daemon = options
        .args([std::ffi::OsStr::new("--backing-file"), backing.as_os_str()])
        .args(["--backing-file-overwrite"])
        .start();
    daemon.wait_for_log("overwriting 13 bytes of data of another program");
    assert!(daemon.stop().status.success());
}
