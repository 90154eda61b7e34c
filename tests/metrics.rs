// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The metrics of a running daemon binary: `ctl metrics` over the control socket and
//! `--metrics-listen` over HTTP give the same series; a non-loopback address needs the opt-in.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-zram");

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the daemon with metrics on a kernel-chosen loopback port; returns it and the address
/// it logged.
fn start(dir: &Path) -> (Daemon, String) {
    let mut child = Command::new(BIN)
        .arg("--socket-path")
        .arg(dir.join("vhost-user.sock"))
        .arg("--control-socket")
        .arg(dir.join("ctl.sock"))
        .args(["--size", "8M", "--serial", "metrics-test"])
        .args(["--metrics-listen", "127.0.0.1:0", "--log-level", "info"])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let daemon = Daemon(child);
    let (sender, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = sender.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let address = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .expect("the daemon logs its metrics address");
        if let Some(rest) = line.split("serving metrics on http://").nth(1) {
            break rest.trim_end_matches("/metrics").to_owned();
        }
    };
    let control = dir.join("ctl.sock");
    while !control.exists() {
        assert!(Instant::now() < deadline, "no control socket");
        std::thread::sleep(Duration::from_millis(10));
    }
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
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, address) = start(dir.path());

    // Act
    let ctl = Command::new(BIN)
        .arg("ctl")
        .arg("--control-socket")
        .arg(dir.path().join("ctl.sock"))
        .arg("metrics")
        .output()
        .unwrap();
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
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(BIN)
        .arg("--socket-path")
        .arg(dir.path().join("vhost-user.sock"))
        .args(["--size", "8M", "--metrics-listen", "0.0.0.0:9"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--metrics-allow-remote"), "{stderr}");
    assert!(!dir.path().join("vhost-user.sock").exists());
}
