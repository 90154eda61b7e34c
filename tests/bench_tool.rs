// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The bench tool against a daemon that dies mid-run: it must fail with a message within a
//! bound, never hang (issue 8, hostile item 6); and `--compare`'s tables for issue 9: polling
//! off against on, the daemon's CPU time per request, the targets block; the codec floor (issue
//! 22).
#![cfg(feature = "bench-tool")]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::child::DaemonProcess;

const BENCH: &str = env!("CARGO_BIN_EXE_vhost-user-zram-bench");
const DAEMON: &str = common::child::BIN;

/// The bench, its stderr lines as they come, and a kill on drop.
struct RunningBench {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl RunningBench {
    fn start(args: &[&str]) -> RunningBench {
        let mut child = Command::new(BENCH)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        RunningBench {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a stderr line containing `text`.
    fn wait_for_line(&mut self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(text);
                    self.seen.push(line);
                    if found {
                        return;
                    }
                }
                Err(_) => panic!("no stderr line with {text:?}; saw {:?}", self.seen),
            }
        }
    }

    /// Waits up to `bound` for the bench to exit; returns its status and all of stderr.
    fn wait_exit(&mut self, bound: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + bound;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "the bench still runs {bound:?} after the daemon died; stderr so far: {:?}",
                self.seen
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(line);
        }
        (status, self.seen.join("\n"))
    }
}

impl Drop for RunningBench {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pids of `pid`'s children.
fn children_of(pid: u32) -> Vec<i32> {
    let mut children = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let path = task.unwrap().path().join("children");
        let text = std::fs::read_to_string(path).unwrap_or_default();
        children.extend(
            text.split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok()),
        );
    }
    children
}

fn kill(pid: i32) {
    // SAFETY: kill(2) takes no pointers; `pid` is our child's or grandchild's.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
}

#[test]
fn the_bench_fails_with_a_message_when_the_daemon_it_launched_dies() {
    // Arrange: the bench launches the daemon and runs a long random-write phase.
    let mut bench = RunningBench::start(&[
        "--daemon-bin",
        DAEMON,
        "--size",
        "16M",
        "--phases",
        "randwrite",
        "--duration",
        "120",
        "--pool-pages",
        "64",
    ]);
    bench.wait_for_line("randwrite started");
    let daemons = children_of(bench.child.id());
    assert_eq!(daemons.len(), 1, "the bench has one child, the daemon");

    // Act
    kill(daemons[0]);
    let (status, stderr) = bench.wait_exit(Duration::from_secs(10));

    // Assert
    assert!(!status.success(), "the bench succeeded; stderr: {stderr}");
    assert!(
        stderr.contains("exited by signal 9 during the run"),
        "stderr: {stderr}"
    );
}

#[test]
fn the_bench_fails_with_a_message_when_an_external_backend_dies() {
    // Arrange: a daemon the bench did not launch, so only the completion timeout can tell.
    let mut daemon = DaemonProcess::start("16M", &["--log-level", "error"]);
    let socket_text = daemon.socket.to_str().unwrap();
    let mut bench = RunningBench::start(&[
        "--socket",
        socket_text,
        "--size",
        "16M",
        "--phases",
        "randwrite",
        "--duration",
        "120",
        "--pool-pages",
        "64",
        "--io-timeout",
        "2",
    ]);
    bench.wait_for_line("randwrite started");

    // Act
    daemon.signal(libc::SIGKILL);
    daemon.wait_exit();
    let (status, stderr) = bench.wait_exit(Duration::from_secs(10));

    // Assert
    assert!(!status.success(), "the bench succeeded; stderr: {stderr}");
    assert!(
        stderr.contains("no request completed for") && stderr.contains("--io-timeout"),
        "stderr: {stderr}"
    );
}

/// The cell of `column` (a backend's label) in `row` of a comparison table: a first column of
/// 18 characters, then one of 17 (a space and 16) per backend.
fn comparison_cell<'a>(header: &str, row: &'a str, column: &str) -> &'a str {
    let index = header.as_bytes()[18..]
        .chunks(17)
        .position(|cell| std::str::from_utf8(cell).unwrap().trim() == column)
        .unwrap_or_else(|| panic!("no column {column:?} in {header:?}"));
    let start = 18 + 17 * index;
    row[start..(start + 17).min(row.len())].trim()
}

#[test]
fn compare_puts_polling_beside_the_default_with_cpu_per_request_and_the_targets() {
    // Arrange
    let dir = tempfile::tempdir().unwrap();
    let csv_path = dir.path().join("out.csv");

    // Act: qemu-storage-daemon or kernel zram may be missing; the vhost-user-zram variants not.
    let output = Command::new(BENCH)
        .args([
            "--compare",
            "--daemon-bin",
            DAEMON,
            "--size",
            "16M",
            "--duration",
            "0.3",
        ])
        .args(["--phases", "fill,randread,mixed", "--pool-pages", "64"])
        .args(["--compare-poll-us", "50", "--csv"])
        .arg(&csv_path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);

    // Assert
    for label in ["vhost-user-zram", "vuz --poll 50"] {
        assert!(
            stderr.contains(&format!("{label}: done")),
            "{label} did not finish; stderr: {stderr}"
        );
    }
    let table = &stdout[stdout
        .find("== daemon CPU per request (µs) ==")
        .unwrap_or_else(|| panic!("no CPU table; stdout: {stdout}"))..];
    let mut lines = table.lines().skip(1);
    let header = lines.next().unwrap();
    let randread = lines.find(|l| l.starts_with("randread")).unwrap();
    for label in ["vhost-user-zram", "vuz --poll 50"] {
        let cell = comparison_cell(header, randread, label);
        let us: f64 = cell
            .parse()
            .unwrap_or_else(|_| panic!("{label}: {cell:?} in {table}"));
        assert!((0.0..1e6).contains(&us), "{label}: {us} µs per request");
    }
    if stderr.contains("kernel-zram: done") {
        assert_eq!(comparison_cell(header, randread, "kernel-zram"), "-");
    }
    if stderr.contains("qsd-null-co: done") {
        let cell = comparison_cell(header, randread, "qsd-null-co");
        assert!(cell.parse::<f64>().is_ok(), "qsd-null-co: {cell:?}");
    }
    let targets = &stdout[stdout
        .find("== vhost-user-zram against kernel zram and null-co: measured, and the goal ==")
        .unwrap_or_else(|| panic!("no goals block; stdout: {stdout}"))..];
    let target_header = targets.lines().nth(1).unwrap();
    assert!(target_header.contains("vhost-user-zram") && target_header.contains("vuz --poll 50"));
    for target in [
        "randread IOPS / kernel-zram's (>= 1.3x)",
        "randread IOPS / qsd-null-co's (>= 50 %)",
        "mixed IOPS / kernel-zram's (>= 1.2x)",
        "randread p99 latency vs kernel-zram's (<=)",
    ] {
        let row = targets
            .lines()
            .find(|l| l.starts_with(target))
            .unwrap_or_else(|| panic!("no {target:?} in {targets}"));
        let verdicts = row.matches(" met").count()
            + row.matches(" missed").count()
            + row.matches("n/a").count();
        assert_eq!(verdicts, 2, "one verdict per variant: {row}");
    }
    let csv = std::fs::read_to_string(&csv_path).unwrap();
    let mut rows = csv.lines();
    let columns: Vec<&str> = rows.next().unwrap().split(',').collect();
    let cpu = columns
        .iter()
        .position(|&c| c == "daemon_cpu_us_per_request")
        .expect("a CPU column");
    let polling_randread = rows
        .map(|r| r.split(',').collect::<Vec<_>>())
        .find(|r| r[0] == "vuz --poll 50" && r[3] == "randread")
        .expect("a CSV row for polling's randread");
    assert!(
        polling_randread[cpu].parse::<f64>().is_ok(),
        "{polling_randread:?}"
    );
}

#[test]
fn compare_state_puts_the_state_file_beside_anonymous_memory_and_measures_a_restart() {
    // Arrange
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("out.json");

    // Act
    let output = Command::new(BENCH)
        .args([
            "--compare-state",
            "--daemon-bin",
            DAEMON,
            "--size",
            "16M",
            "--duration",
            "0.2",
        ])
        .args(["--phases", "fill,randwrite,randread", "--pool-pages", "64"])
        .args(["--restart-sample-pages", "512", "--json"])
        .arg(&json_path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let state_file = format!("/dev/shm/vhost-user-zram-bench.{}.state", output.id());
    let output = output.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);

    // Assert: both ran, side by side, with a ratio per phase and the memory of each.
    assert!(
        output.status.success(),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    let block = &stdout[stdout
        .find("== state file (--state on /dev/shm) against anonymous memory ==")
        .unwrap_or_else(|| panic!("no state block; stdout: {stdout}"))..];
    for phase in ["fill", "randwrite", "randread"] {
        let row = block
            .lines()
            .find(|l| l.starts_with(phase))
            .unwrap_or_else(|| panic!("no {phase} row in {block}"));
        assert!(row.contains('x'), "no ratio: {row}");
    }
    assert!(
        block.lines().any(|l| l.starts_with("mem_used_total")),
        "{block}"
    );
    assert!(block.contains("socket accepting"), "{block}");
    // The restart: the same process reconnected and read back what it wrote.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let state = json["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["backend"] == "vhost-user-zram-state")
        .expect("a state backend in the JSON");
    let restart = &state["restart"];
    assert_eq!(restart["sample_pages"], 512, "{restart}");
    assert_eq!(restart["verified_pages"], 512, "{restart}");
    let accepting = restart["socket_accepting_ms"].as_f64().unwrap();
    let first_read = restart["first_read_ms"].as_f64().unwrap();
    assert!(0.0 < accepting && accepting <= first_read, "{restart}");
    assert_eq!(
        restart["recovered_pages"], restart["pages_at_kill"],
        "{restart}"
    );
    assert!(restart["recovery_ms"].as_f64().is_some(), "{restart}");
    // The state file is gone once the run is over.
    assert!(
        !std::path::Path::new(&state_file).exists(),
        "{state_file} is left"
    );
}

#[test]
fn migrate_copies_an_idle_device_near_its_compressed_size_and_the_destination_verifies() {
    // Arrange
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("out.json");

    // Act: a 64 MiB source, 2 MiB rewritten during pre-copy, then the switchover.
    let output = Command::new(BENCH)
        .args(["--migrate", "--daemon-bin", DAEMON, "--size", "64M"])
        .args(["--migrate-dirty", "2M", "--json"])
        .arg(&json_path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);

    // Assert: the table, every page on the destination, and the idle copy's wire bytes within
    // issue 18's bound (an idle guest's first round is deterministic: every stored page once).
    assert!(
        output.status.success(),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    let block = &stdout[stdout
        .find("== live migration (--migrate)")
        .unwrap_or_else(|| panic!("no migration block; stdout: {stdout}"))..];
    let row = |start: &str| {
        block
            .lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no {start} row in {block}"))
    };
    assert!(row("wire / compr_data_size").ends_with(" met"), "{block}");
    assert!(
        row("destination pages verified").ends_with(" passed"),
        "{block}"
    );
    assert!(row("switchover, 2.0 MiB dirty").contains(" ms"), "{block}");
    assert!(block.contains("GET_VRING_BASE"), "{block}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let migration = &json["migration"];
    let ratio = migration["idle"]["wire_per_compr"].as_f64().unwrap();
    assert!(0.5 < ratio && ratio <= 1.05, "{migration}");
    assert_eq!(
        migration["verify"]["verified_pages"].as_u64(),
        Some(16384),
        "{migration}"
    );
    assert_eq!(
        migration["switchover"]["destination_state"], "completed",
        "{migration}"
    );
    assert_eq!(
        migration["switchover"]["dirty_pages_written"].as_u64(),
        Some(512),
        "{migration}"
    );
}

#[test]
fn a_corpus_of_this_process_memory_is_captured_and_written_in_64k_requests() {
    // Arrange: capture this test process's own resident anonymous memory (issue 21's corpus
    // tool; CI captures a small one).
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus");
    let capture = Command::new(BENCH)
        .arg("--capture-corpus")
        .arg(&corpus)
        .args(["--capture-pid", &std::process::id().to_string()])
        .args(["--capture-max", "8M"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&capture.stdout);
    assert!(
        capture.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&capture.stderr)
    );
    assert!(said.contains(") of bench_tool"), "{said}");
    let pages = std::fs::metadata(&corpus).unwrap().len() / 4096 - 1;
    assert!((16..=2048).contains(&pages), "{pages} pages captured");

    // Act: the corpus, in order, in 64 KiB requests, every read verified, through a daemon
    // that stores them as multi-page units.
    let json_path = dir.path().join("out.json");
    let output = Command::new(BENCH)
        .args(["--daemon-bin", DAEMON, "--size", "16M", "--duration", "1"])
        .arg("--daemon-arg=--unit-max=64K")
        .args([
            "--phases",
            "fill,randwrite,randread",
            "--request-size",
            "64K",
        ])
        .arg("--corpus")
        .arg(&corpus)
        .arg("--json")
        .arg(&json_path)
        .stdin(Stdio::null())
        .output()
        .unwrap();

    // Assert
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "stderr: {stderr}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(json["workload"]["block_size"].as_u64(), Some(65536));
    let described = json["workload"]["corpus"].as_str().unwrap();
    assert!(described.contains("bench_tool"), "{described}");
    let phases = json["backends"][0]["phases"].as_array().unwrap();
    let fill = phases.iter().find(|p| p["phase"] == "fill").unwrap();
    assert_eq!(
        fill["requests"].as_u64(),
        Some(256),
        "16 MiB in 64 KiB requests"
    );
    let read = phases.iter().find(|p| p["phase"] == "randread").unwrap();
    assert!(read["verified_reads"].as_u64().unwrap() > 0, "{read}");
    assert_eq!(read["verified_reads"], read["reads"], "{read}");
    let units = &json["backends"][0]["mm_stat_after_fill"]["units"];
    assert!(units["units_stored"].as_u64().unwrap() > 0, "{units}");
    assert_eq!(units["unit_max_bytes"].as_u64(), Some(65536), "{units}");
}

#[test]
fn a_bad_corpus_or_request_size_is_refused_with_a_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("bogus");
    std::fs::write(&bogus, b"not pages").unwrap();
    let run = |args: &[&std::ffi::OsStr]| {
        let output = Command::new(BENCH)
            .args(["--daemon-bin", DAEMON, "--size", "16M"])
            .args(args)
            .output()
            .unwrap();
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let said = run(&["--corpus".as_ref(), bogus.as_os_str()]);
    assert!(said.contains("is not a corpus"), "{said}");
    let said = run(&["--request-size".as_ref(), "6K".as_ref()]);
    assert!(said.contains("not a positive multiple of 4 KiB"), "{said}");
    let said = run(&["--request-size".as_ref(), "2M".as_ref()]);
    assert!(said.contains("more than 1M"), "{said}");
}

#[test]
fn a_run_measures_the_codec_floor_and_reports_each_phase_above_it() {
    // Arrange
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("out.json");

    // Act: tables on stdout and JSON in a file, from one tiny run.
    let output = Command::new(BENCH)
        .args(["--daemon-bin", DAEMON, "--size", "16M", "--duration", "0.3"])
        .args(["--phases", "fill,randread", "--pool-pages", "256", "--json"])
        .arg(&json_path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);

    // Assert: the floor line, with positive figures, and the same figures in the JSON.
    assert!(
        output.status.success(),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("codec floor (lz4, this page mix): compress "))
        .unwrap_or_else(|| panic!("no floor line; stdout: {stdout}"));
    assert!(line.contains(" µs/page, decompress "), "{line}");
    assert!(
        line.contains("same-filled ") && line.contains("raw "),
        "{line}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let floor = &json["codec_floor"];
    for field in ["compress_us_per_page", "decompress_us_per_page"] {
        let us = floor[field].as_f64().unwrap_or_else(|| panic!("{floor}"));
        assert!(us > 0.0 && us.is_finite(), "{field}: {floor}");
    }
    assert_eq!(floor["pages"], 256, "{floor}");
    let same = floor["same_filled_percent"].as_f64().unwrap();
    let raw = floor["raw_percent"].as_f64().unwrap();
    assert!(same > 0.0 && raw > 0.0 && same + raw < 100.0, "{floor}");
    let read = json["backends"][0]["phases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["phase"] == "randread")
        .unwrap();
    let floor_per_request = read["codec_floor_us_per_request"].as_f64().unwrap();
    assert_eq!(
        floor_per_request,
        floor["decompress_us_per_page"].as_f64().unwrap()
    );
    let cpu = read["daemon_cpu_us_per_request"].as_f64().unwrap();
    let above = read["cpu_us_above_floor"].as_f64().unwrap();
    assert!((cpu - floor_per_request - above).abs() < 1e-6, "{read}");
}
