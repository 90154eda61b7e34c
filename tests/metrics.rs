// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The metrics of a running daemon binary: `ctl metrics` over the control socket and
//! `--metrics-listen` over HTTP give the same series; a non-loopback address needs the opt-in.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::child::DaemonProcess;

/// Starts the daemon with metrics on a kernel-chosen loopback port; returns it and the address
/// it logged.
fn start() -> (DaemonProcess, String) {
    let daemon = DaemonProcess::options()
        .size("8M")
        .args(["--serial", "metrics-test"])
        .args(["--metrics-listen", "127.0.0.1:0", "--log-level", "info"])
        .start();
    // The whole line: the address ends at "/metrics".
    daemon.wait_for_log("/metrics\n");
    let address = daemon
        .stderr()
        .lines()
        .find_map(|line| line.split("serving metrics on http://").nth(1))
        .expect("the daemon logs its metrics address")
        .trim_end_matches("/metrics")
        .to_owned();
    (daemon, address)
}

fn sample_names(exposition: &str) -> Vec<String> {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| line.split('{').next().unwrap().to_owned())
        .collect()
}

#[test]
fn ctl_metrics_and_http_serve_the_same_series_with_the_serial() {
    // Arrange
    let (daemon, address) = start();

    // Act
    let ctl = daemon.ctl_output(&["metrics"]);
    let mut stream = TcpStream::connect(&address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();

    // Assert
    assert!(ctl.status.success());
    let ctl_text = String::from_utf8(ctl.stdout).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert_eq!(sample_names(&ctl_text), sample_names(body));
    assert!(
        ctl_text.contains("vhost_user_zram_mm_orig_data_size_bytes{serial=\"metrics-test\"} 0\n")
    );
    assert!(ctl_text.contains("vhost_user_zram_disksize_bytes{serial=\"metrics-test\"} 8388608\n"));
    assert!(ctl_text.contains("vhost_user_zram_frontend_connected{serial=\"metrics-test\"} 0\n"));
}

#[test]
fn a_non_loopback_metrics_address_needs_the_opt_in() {
    let mut daemon = DaemonProcess::options()
        .size("8M")
        .args(["--metrics-listen", "0.0.0.0:9"])
        .spawn();

    let exited = daemon.wait_exit();

    assert_eq!(exited.status.code(), Some(2));
    assert!(
        exited.stderr.contains("--metrics-allow-remote"),
        "{}",
        exited.stderr
    );
    assert!(!daemon.socket.exists());
}
