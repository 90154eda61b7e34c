// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The metrics of a running daemon binary: `ctl metrics` over the control socket and
//! `--metrics-listen` over HTTP give the same series; a non-loopback address needs the opt-in.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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
    for (family, kind) in [
        ("units_stored", "gauge"),
        ("unit_members", "gauge"),
        ("unit_bytes", "gauge"),
        ("unit_partial_rewrites_total", "counter"),
        ("unit_read_bytes_total", "counter"),
        ("unit_decompressed_bytes_total", "counter"),
        ("unit_cache_hits_total", "counter"),
    ] {
        let declared = format!("# TYPE vhost_user_zram_{family} {kind}\n");
        let sample = format!("vhost_user_zram_{family}{{serial=\"metrics-test\"}} 0\n");
        assert!(ctl_text.contains(&declared), "no {declared:?}");
        assert!(ctl_text.contains(&sample), "no {sample:?}");
    }
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

/// A client that sends a byte of a request head every 2 s and reconnects whenever the daemon
/// closes the connection, until `stop`.
fn slow_client(address: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let Ok(mut stream) = TcpStream::connect(&address) else {
                continue;
            };
            for byte in b"GET /metrics HTTP/1.1\r\n".iter().cycle() {
                if stop.load(Ordering::Relaxed) || stream.write_all(&[*byte]).is_err() {
                    break;
                }
                // Two seconds in steps, so that the test's end is not held up.
                for _ in 0..20 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    })
}

/// One scrape's status line, or what went wrong (a refused client may see its connection
/// reset before it has sent its request).
fn scrape(address: &str) -> String {
    let attempt = || -> std::io::Result<String> {
        let mut stream = TcpStream::connect(address)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response.lines().next().unwrap_or("").to_owned())
    };
    attempt().unwrap_or_else(|error| format!("failed: {error}"))
}

#[test]
fn sixteen_slow_clients_do_not_deny_a_scrape() {
    // Arrange: sixteen clients each send a byte every 2 s (on main they held all 8 client
    // threads, and 66 of 80 scrapes answered 503).
    let (daemon, address) = start();
    let stop = Arc::new(AtomicBool::new(false));
    let slow: Vec<_> = (0..16)
        .map(|_| slow_client(address.clone(), stop.clone()))
        .collect();
    std::thread::sleep(Duration::from_millis(500));

    // Act: 80 scrapes from four scrapers over about 6 s, past the 5 s deadline at which the
    // slow clients are cut off and reconnect.
    let statuses: Vec<String> = std::thread::scope(|scope| {
        let scrapers: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    (0..20)
                        .map(|_| {
                            let status = scrape(&address);
                            std::thread::sleep(Duration::from_millis(300));
                            status
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        scrapers
            .into_iter()
            .flat_map(|scraper| scraper.join().unwrap())
            .collect()
    });
    stop.store(true, Ordering::Relaxed);
    for client in slow {
        client.join().unwrap();
    }

    // Assert: every scrape answered.
    let ok = statuses
        .iter()
        .filter(|status| status.starts_with("HTTP/1.1 200 OK"))
        .count();
    assert_eq!(ok, 80, "{ok} of 80 scrapes answered 200: {statuses:?}");
    drop(daemon);
}
