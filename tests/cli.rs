// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Command-line tests: the built binary's errors, capabilities, sockets and the `ctl` tool,
//! and the contrib files' agreement with the binary.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use clap::Parser;
use vhost_user_zram::cli::Cli;

use common::child::{run, ControlSocket, DaemonProcess, BIN};

/// Asserts a failed run with exactly one line on stderr, starting with "error: ", and the exit
/// status `code`.
fn assert_one_sentence_error_exit(output: &Output, needle: &str, code: i32) {
    assert_one_sentence_error(output, needle);
    assert_eq!(output.status.code(), Some(code), "{needle}: {output:?}");
}

/// Asserts a failed run with exactly one line on stderr, starting with "error: ".
fn assert_one_sentence_error(output: &Output, needle: &str) {
    assert!(!output.status.success(), "expected failure: {output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<_> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected, got {stderr:?}");
    assert!(lines[0].starts_with("error: "), "{stderr:?}");
    assert!(lines[0].contains(needle), "{stderr:?} lacks {needle:?}");
    assert!(!stderr.contains("panicked"), "{stderr:?}");
}

/// A daemon with a 1 MiB device and, unless told otherwise, its default control socket.
fn daemon_1m() -> common::child::DaemonOptions {
    DaemonProcess::options()
        .size("1M")
        .control_socket(ControlSocket::Implied)
}

fn sock(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// Exit status when the command line itself is wrong: nothing was tried.
const EXIT_USAGE: i32 = 2;
/// Exit status when a well-formed command failed against the system.
const EXIT_FAILURE: i32 = 1;

#[test]
fn wrong_values_give_one_sentence_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let s = sock(&dir, "a.sock");
    let s = s.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--socket-path", s, "--size", "0"], "must not be zero"),
        (&["--socket-path", s, "--size", "12Q"], "suffix"),
        (
            &["--socket-path", s, "--size", "1M", "--algorithm", "lzo"],
            "unknown compression algorithm",
        ),
        (
            &[
                "--socket-path",
                s,
                "--size",
                "1M",
                "--algorithm",
                "zstd",
                "--algorithm-level",
                "40",
            ],
            "out of range",
        ),
        (
            &["--socket-path", s, "--size", "1M", "--algorithm-level", "3"],
            "takes no level",
        ),
        (
            &[
                "--socket-path",
                s,
                "--size",
                "1M",
                "--serial",
                "a-serial-longer-than-20",
            ],
            "at most 20",
        ),
        (
            &["--socket-path", s, "--size", "1M", "--queue-size", "100"],
            "power of two",
        ),
        (
            &["--socket-path", s, "--size", "1M", "--num-queues", "0"],
            "between 1 and 64",
        ),
        (
            &["--socket-path", s, "--size", "1M", "--socket-mode", "999"],
            "permission mode",
        ),
        (&["--size", "1M"], "--socket-path or --fd"),
        (&["--socket-path", s], "--size is required"),
        (
            &["--socket-path", s, "--size", "1M", "--bogus"],
            "'--bogus'",
        ),
        (
            &["--socket-path", s, "--size", "1M", "--control-socket", ""],
            "the control socket path is empty",
        ),
        (
            &[
                "--socket-path",
                s,
                "--size",
                "1M",
                "--writeback-above",
                "4M",
            ],
            "--writeback-above needs a --backing-file",
        ),
        (
            &[
                "--socket-path",
                s,
                "--size",
                "1M",
                "--writeback-limit",
                "10",
            ],
            "--writeback-limit needs a --backing-file",
        ),
        (
            &["--socket-path", s, "--size", "1025G"],
            "more than the largest device, 1024 GiB",
        ),
        (
            &["--socket-path", s, "--size", "1M", "--idle-tick", "0"],
            "not an idle tick",
        ),
        (
            &["--socket-path", s, "--size", "1M", "--writeback-batch", "0"],
            "not a writeback batch",
        ),
        (
            &[
                "--socket-path",
                s,
                "--size",
                "1M",
                "--backing-file",
                "/tmp/b",
                "--writeback-idle-after",
                "200",
                "--idle-tick",
                "1",
            ],
            "more than the idle clock counts",
        ),
        (
            &["ctl", "--control-socket", s, "writeback", "cold"],
            "bad writeback request 'cold'",
        ),
        (
            &["ctl", "--control-socket", s, "writeback-limit", "lots"],
            "not a number of pages or 'off'",
        ),
        // Writes would be refused before writeback ever ran.
        (
            &[
                "--socket-path",
                s,
                "--size",
                "1M",
                "--backing-file",
                "/tmp/b",
                "--writeback-above",
                "8M",
                "--mem-limit",
                "8M",
            ],
            "--writeback-above 8.0 MiB is at or above --mem-limit 8.0 MiB",
        ),
        (
            &[
                "--socket-path",
                s,
                "--size",
                "1M",
                "--backing-file",
                "/tmp/b",
                "--writeback-above",
                "1G",
                "--mem-limit",
                "64M",
            ],
            "--writeback-above 1.0 GiB is at or above --mem-limit 64.0 MiB",
        ),
        (
            &[
                "--socket-path",
                s,
                "--size",
                "1M",
                "--reclaim-on-pressure=most 1s/2s",
            ],
            "'most 1s/2s' is not a pressure threshold: give some|full STALL/WINDOW",
        ),
        (
            &[
                "--socket-path",
                s,
                "--size",
                "1M",
                "--reclaim-on-pressure=some 1ms/20s",
            ],
            "the window must be from 500ms to 10s",
        ),
        (
            &[
                "--socket-path",
                s,
                "--size",
                "1M",
                "--reclaim-on-pressure=full:3s/2s",
            ],
            "the stall must be above 0 and at most the window",
        ),
        (
            &["ctl", "--control-socket", s, "mem-limit", "0"],
            "the memory limit must not be zero; 'off' lifts it",
        ),
        (
            &["ctl", "--control-socket", s, "mem-limit", "12Q"],
            "unknown suffix",
        ),
        (&["ctl", "--control-socket", s, "mem-used-max", "0"], "'0'"),
        // Each word is well formed; together they repeat a key: refused, not run as a
        // recompression of every page.
        (
            &[
                "ctl",
                "--control-socket",
                s,
                "recompress",
                "type=idle",
                "type=huge",
            ],
            "type",
        ),
        (
            &[
                "--socket-path",
                s,
                "--size",
                "1M",
                "--recompress-algorithm",
                "zstd",
                "--recompress-algorithm",
                "zstd",
            ],
            "--recompress-algorithm",
        ),
        (
            &[
                "--socket-path",
                s,
                "--size",
                "1M",
                "--algorithm",
                "zstd",
                "--recompress-algorithm",
                "zstd",
            ],
            "--recompress-algorithm",
        ),
        (
            &[
                "--socket-path",
                s,
                "--size",
                "1M",
                "--incoming",
                "tcp:0.0.0.0:4444",
            ],
            "--incoming tcp:0.0.0.0:4444 needs --migrate-token",
        ),
        (
            &["--socket-path", s, "--size", "1M", "--incoming", "udp:x"],
            "is neither unix:PATH nor tcp:HOST:PORT",
        ),
        (
            &[
                "--socket-path",
                s,
                "--size",
                "1M",
                "--incoming",
                "tcp:nohost",
            ],
            "is not HOST:PORT",
        ),
        (
            &[
                "--socket-path",
                s,
                "--size",
                "1M",
                "--incoming-timeout",
                "5",
            ],
            "--incoming",
        ),
        (
            &[
                "--socket-path",
                s,
                "--size",
                "1M",
                "--incoming",
                "unix:/tmp/x.sock",
                "--incoming-timeout",
                "0",
            ],
            "is not a number of seconds from 1 to 86400",
        ),
        (
            &["--socket-path", s, "--size", "1M", "--unit-max", "12K"],
            "'12K' is not a unit size; give 4K, 8K, 16K, 32K or 64K (4K: units off)",
        ),
        (
            &["--socket-path", s, "--size", "1M", "--unit-max", "128K"],
            "'128K' is not a unit size; give 4K, 8K, 16K, 32K or 64K",
        ),
        (
            &["--socket-path", s, "--size", "1M", "--unit-max", "0"],
            "'0' is not a unit size; give 4K, 8K, 16K, 32K or 64K",
        ),
    ];
    for (args, needle) in cases {
        assert_one_sentence_error_exit(&run(args), needle, EXIT_USAGE);
    }
}

#[test]
fn failures_of_a_well_formed_command_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let missing = sock(&dir, "missing.ctl");
    let cases: &[(&[&str], &str)] = &[
        (
            &["--socket-path", "/nonexistent-dir/x.sock", "--size", "1M"],
            "does not exist",
        ),
        (
            &["--fd", "99", "--size", "1M"],
            "not a listening Unix socket",
        ),
        (
            &[
                "ctl",
                "--control-socket",
                missing.to_str().unwrap(),
                "stats",
            ],
            "cannot connect to the control socket",
        ),
    ];
    for (args, needle) in cases {
        assert_one_sentence_error_exit(&run(args), needle, EXIT_FAILURE);
    }
}

#[test]
fn a_socket_path_too_long_for_its_default_control_socket_names_the_way_out() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().display().to_string();
    // 105 bytes: the socket fits the 107 a Unix address holds, the socket plus ".ctl" does not.
    let socket = format!("{base}/{}", "s".repeat(105 - base.len() - 1));

    let output = run(&["--socket-path", &socket, "--size", "1M"]);

    assert_one_sentence_error_exit(&output, "pass --control-socket PATH, or none", EXIT_USAGE);
    assert!(!Path::new(&socket).exists(), "nothing was created");
}

#[test]
fn negative_numbers_are_refused_by_the_option_not_as_unknown_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let s = sock(&dir, "a.sock");
    let s = s.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--socket-path", s, "--size", "-1"], "'-1' is not a size"),
        (
            &["--socket-path", s, "--size", "1M", "--mem-limit", "-4K"],
            "'-4K' is not a size",
        ),
        (
            &["--socket-path", s, "--size", "1M", "--num-queues", "-1"],
            "between 1 and 64",
        ),
        (
            &["--socket-path", s, "--size", "1M", "--queue-size", "-256"],
            "power of two",
        ),
        (
            &["--socket-path", s, "--size", "1M", "--socket-mode", "-600"],
            "permission mode",
        ),
        (
            &["--fd", "-1", "--size", "1M"],
            "not a file descriptor number",
        ),
    ];
    for (args, needle) in cases {
        let output = run(args);
        assert_one_sentence_error_exit(&output, needle, EXIT_USAGE);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!stderr.contains("unexpected argument"), "{stderr}");
    }
}

#[test]
fn an_unknown_log_level_lists_the_levels() {
    let dir = tempfile::tempdir().unwrap();
    let s = sock(&dir, "a.sock");

    let output = run(&[
        "--socket-path",
        s.to_str().unwrap(),
        "--size",
        "1M",
        "--log-level",
        "loud",
    ]);

    assert_one_sentence_error_exit(
        &output,
        "the possible values are error, warn, info, debug, trace",
        EXIT_USAGE,
    );
}

#[test]
fn one_path_for_both_sockets_is_a_usage_error_naming_both_options() {
    let dir = tempfile::tempdir().unwrap();
    let s = sock(&dir, "same.sock");
    let s = s.to_str().unwrap();
    let dotted = format!("{}/./same.sock", dir.path().display());

    for control in [s, dotted.as_str()] {
        let output = run(&[
            "--socket-path",
            s,
            "--size",
            "1M",
            "--control-socket",
            control,
        ]);

        assert_one_sentence_error_exit(
            &output,
            "--socket-path and --control-socket both name",
            EXIT_USAGE,
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!stderr.contains("running daemon"), "{stderr}");
    }
    assert!(!Path::new(s).exists(), "nothing was created");
}

#[test]
fn ctl_without_a_control_socket_names_the_option_and_the_variable() {
    let output = Command::new(BIN)
        .args(["ctl", "stats"])
        .env_remove("VHOST_USER_ZRAM_CTL")
        .output()
        .unwrap();

    assert_one_sentence_error_exit(&output, "--control-socket PATH", EXIT_USAGE);
    assert!(String::from_utf8_lossy(&output.stderr).contains("VHOST_USER_ZRAM_CTL"));
}

#[test]
fn ctl_without_a_command_or_with_an_unknown_one_lists_the_commands() {
    for args in [&["ctl"][..], &["ctl", "--control-socket", "/x", "bogus"]] {
        let output = run(args);

        assert_one_sentence_error_exit(
            &output,
            "the commands are stats, mm_stat, io_stat, metrics, compact",
            EXIT_USAGE,
        );
    }
}

#[test]
fn print_capabilities_prints_the_block_type_json() {
    let output = run(&["--print-capabilities"]);
    assert!(output.status.success());
    let value: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(value["type"], "block");
    assert_eq!(value["features"], serde_json::json!(["read-only"]));
}

#[test]
fn socket_is_created_with_mode_0600_and_removed_on_sigterm() {
    let mut daemon = daemon_1m().start();
    let path = daemon.socket.clone();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(daemon.stop().status.success(), "SIGTERM exits 0");
    assert!(!path.exists(), "the socket file is removed");
}

#[test]
fn socket_mode_option_is_honoured() {
    let mut daemon = daemon_1m().args(["--socket-mode", "0660"]).start();
    let mode = std::fs::metadata(&daemon.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660);
    assert!(daemon.stop().status.success());
}

#[test]
fn stale_socket_is_reused_and_live_one_refused() {
    let options = daemon_1m();
    let path = options.socket().to_owned();
    // A socket file nobody listens on.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let p = path.to_str().unwrap();
    let mut daemon = options.start();
    // The path is live now: a second daemon is refused, and the first keeps running.
    assert_one_sentence_error_exit(
        &run(&["--socket-path", p, "--size", "1M"]),
        "in use by a running daemon",
        EXIT_FAILURE,
    );
    assert!(
        daemon.stop().status.success(),
        "the probe did not end the first daemon"
    );
}

#[test]
fn ctl_round_trip() {
    let mut daemon = DaemonProcess::options().size("1M").start();
    let control = daemon.control().to_owned();
    let ctl = |args: &[&str]| daemon.ctl(args);
    let mm_stat = ctl(&["mm_stat"]);
    assert_eq!(mm_stat.lines().count(), 1);
    assert_eq!(mm_stat.split_whitespace().count(), 9, "{mm_stat:?}");
    let io_stat = ctl(&["io_stat"]);
    assert_eq!(io_stat.split_whitespace().count(), 4, "{io_stat:?}");
    assert!(!ctl(&["stats"]).is_empty());
    let json: serde_json::Value = serde_json::from_str(&ctl(&["stats", "--json"])).unwrap();
    assert!(json.is_object());
    assert!(ctl(&["compact"]).starts_with("compacted "));
    assert!(daemon.stop().status.success());
    assert!(!control.exists(), "the control socket is removed");

    let output = daemon.ctl_output(&["stats"]);
    assert_one_sentence_error(&output, "cannot connect");
}

#[test]
fn reclaim_on_pressure_alone_takes_the_default_threshold_and_stats_show_the_pressure_rows() {
    let mut daemon = DaemonProcess::options()
        .size("1M")
        .args(["--reclaim-on-pressure"])
        .start();

    let stats = daemon.ctl(&["stats"]);

    // Registered, or refused with the reason: either way the log says which, with the default.
    daemon.wait_for_log("some 300ms/2s");
    for row in [
        "cgroup memory limit",
        "pressure events",
        "reclaim requests",
        "shed by writeback",
        "shed by recompression",
        "shed by compaction",
    ] {
        assert!(stats.contains(row), "no {row:?} in:\n{stats}");
    }
    assert!(daemon.stop().status.success());
}

#[test]
fn unit_max_is_logged_at_start_and_stats_show_the_units_rows() {
    let mut daemon = DaemonProcess::options()
        .size("1M")
        .args(["--unit-max", "16KiB"])
        .start();

    let stats = daemon.ctl(&["stats"]);

    daemon.wait_for_log("multi-page units of up to 16.0 KiB (4 pages)");
    for row in [
        "multi-page units           16384 bytes (16.0 KiB)\n",
        "  units stored             0\n",
        "  member pages             0 pages\n",
        "  read amplification       — (nothing read from units)\n",
    ] {
        assert!(stats.contains(row), "no {row:?} in:\n{stats}");
    }
    assert!(daemon.stop().status.success());
}

#[test]
fn ctl_mem_limit_sets_shows_lifts_and_refuses_a_limit_at_the_writeback_mark() {
    // Arrange: a daemon that writes back above 4 MiB, limited to 8 MiB.
    let files = tempfile::tempdir().unwrap();
    let backing = files.path().join("backing");
    let mut daemon = DaemonProcess::options()
        .size("16M")
        .args([
            "--backing-file",
            backing.to_str().unwrap(),
            "--writeback-above",
            "4M",
            "--mem-limit",
            "8M",
        ])
        .start();

    // Act and assert: the limit as started.
    assert_eq!(
        daemon.ctl(&["mem-limit"]),
        "mem_limit 8388608 bytes (8.0 MiB)\n"
    );
    // At the writeback mark: refused, naming both, and the limit stays.
    let refused = daemon.ctl_output(&["mem-limit", "4M"]);
    assert_one_sentence_error_exit(
        &refused,
        "mem-limit 4194304 bytes (4.0 MiB) is at or below --writeback-above 4194304 bytes",
        EXIT_FAILURE,
    );
    assert_eq!(daemon.mm_stat().mem_limit, 8 << 20);
    // Raised (suffixes as --mem-limit), then lifted.
    assert_eq!(
        daemon.ctl(&["mem-limit", "1GiB"]),
        "mem_limit 1073741824 bytes (1.0 GiB)\n"
    );
    assert_eq!(daemon.mm_stat().mem_limit, 1 << 30);
    assert_eq!(daemon.ctl(&["mem-limit", "off"]), "mem_limit off\n");
    assert_eq!(daemon.mm_stat().mem_limit, 0);
    // mem_used_max comes down to mem_used_total (nothing stored: they are equal already).
    let reset = daemon.ctl(&["mem-used-max", "reset"]);
    let mm = daemon.mm_stat();
    assert_eq!(mm.mem_used_max, mm.mem_used_total);
    assert!(reset.starts_with("mem_used_max "), "{reset}");
    assert!(daemon.stop().status.success());
}

#[test]
fn the_daemon_serves_socket_path_dot_ctl_by_default_and_ctl_finds_it_through_the_variable() {
    let mut daemon = daemon_1m().start();
    let control = daemon.control().to_owned();
    assert_eq!(control, daemon.dir().join("vhost-user.sock.ctl"));

    let output = Command::new(BIN)
        .args(["ctl", "mm_stat"])
        .env("VHOST_USER_ZRAM_CTL", &control)
        .output()
        .unwrap();

    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout)
            .split_whitespace()
            .count(),
        9
    );
    let mode = std::fs::metadata(&control).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the control socket has the socket mode");
    assert!(daemon.stop().status.success());
    assert!(!control.exists(), "the default control socket is removed");
}

#[test]
fn control_socket_flag_wins_over_the_variable() {
    let mut daemon = daemon_1m().start();

    let output = Command::new(BIN)
        .args([
            "ctl",
            "--control-socket",
            daemon.control().to_str().unwrap(),
            "io_stat",
        ])
        .env("VHOST_USER_ZRAM_CTL", daemon.dir().join("nothing-here"))
        .output()
        .unwrap();

    assert!(output.status.success(), "{output:?}");
    assert!(daemon.stop().status.success());
}

#[test]
fn control_socket_none_serves_no_control_socket() {
    let mut daemon = daemon_1m().control_socket(ControlSocket::Off).start();

    let entries: Vec<_> = std::fs::read_dir(daemon.dir())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();

    assert_eq!(entries, vec![std::ffi::OsString::from("vhost-user.sock")]);
    assert!(daemon.stop().status.success());
}

#[test]
fn readme_first_command_is_a_valid_cargo_run_of_the_daemon() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let first = readme
        .lines()
        .find(|line| line.starts_with("cargo run"))
        .expect("the README has a cargo run command");
    let (cargo, daemon_args) = first.split_once(" -- ").expect("cargo run ... -- ARGS");

    // `cargo run` without --bin needs `default-run`, since the package has two binaries.
    assert_eq!(cargo.trim(), "cargo run --release");
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    assert!(
        manifest.contains("\ndefault-run = \"vhost-user-zram\"\n"),
        "Cargo.toml [package] needs default-run = \"vhost-user-zram\""
    );
    let args: Vec<&str> = std::iter::once("vhost-user-zram")
        .chain(daemon_args.split_whitespace())
        .collect();
    let cli = Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{first}: {e}"));
    cli.serve.daemon_config().unwrap();
}

#[test]
fn contrib_json_matches_print_capabilities() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let description: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("contrib/50-vhost-user-zram.json")).unwrap(),
    )
    .unwrap();
    let capabilities: serde_json::Value =
        serde_json::from_slice(&run(&["--print-capabilities"]).stdout).unwrap();
    assert_eq!(description["type"], capabilities["type"]);
    assert_eq!(description["binary"], "/usr/bin/vhost-user-zram");
    assert!(description["description"].is_string());
}

#[test]
fn systemd_unit_exec_start_uses_accepted_flags() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(root.join("contrib/vhost-user-zram@.service")).unwrap();
    let exec = unit
        .lines()
        .find_map(|line| line.strip_prefix("ExecStart="))
        .expect("the unit has ExecStart");
    let args: Vec<String> = exec
        .split_whitespace()
        .map(|word| word.replace("%i", "instance"))
        .collect();
    assert_eq!(args[0], "/usr/bin/vhost-user-zram");
    let cli = Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{exec}: {e}"));
    assert_eq!(cli.serve.fd, Some(3), "socket activation passes fd 3");
    cli.serve.daemon_config().unwrap();
    let socket = std::fs::read_to_string(root.join("contrib/vhost-user-zram@.socket")).unwrap();
    assert!(socket.contains("ListenStream="));
    assert!(socket.contains("SocketMode=0600"));
}

#[test]
fn help_states_the_exit_status_rule_and_exits_0() {
    let output = run(&["--help"]);

    assert_eq!(output.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("2 when the command line is wrong; 1 when a well-formed command failed"),
        "{stdout}"
    );
}

/// `path` in `dir` made a FIFO.
fn fifo(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let c_path = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) with a valid NUL-terminated path; the result is checked.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    path
}

#[test]
fn a_zstd_dict_that_is_a_fifo_is_refused_at_once() {
    let options = daemon_1m();
    let dict = fifo(options.socket().parent().unwrap(), "dict");
    let started = std::time::Instant::now();

    let mut daemon = options
        .args(["--algorithm", "zstd", "--zstd-dict", dict.to_str().unwrap()])
        .spawn();
    let exited = daemon.wait_exit();

    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(exited.status.code(), Some(EXIT_USAGE), "{}", exited.stderr);
    assert!(
        exited.stderr.contains("--zstd-dict") && exited.stderr.contains("is a FIFO"),
        "{}",
        exited.stderr
    );
    assert!(!daemon.socket.exists(), "no socket is left behind");
}

#[test]
fn configuration_errors_found_while_starting_exit_2_and_name_their_flag() {
    let dir = tempfile::tempdir().unwrap();
    let s = sock(&dir, "a.sock");
    let s = s.to_str().unwrap();
    let empty = dir.path().join("empty.dict");
    std::fs::write(&empty, b"").unwrap();
    let no_token = dir.path().join("no-such-token");
    let cases: &[(&[&str], &str)] = &[
        (
            // The empty store's allocator classes alone need more (its slot table is
            // counted only as pages are stored).
            &["--socket-path", s, "--size", "1G", "--mem-limit", "16K"],
            "--mem-limit 16.0 KiB is below the",
        ),
        (
            &["--socket-path", s, "--size", "1M", "--worker-cpus", "1000"],
            "--worker-cpus names CPU 1000",
        ),
        (
            &[
                "--socket-path",
                s,
                "--size",
                "1M",
                "--zstd-dict",
                dir.path().to_str().unwrap(),
            ],
            "is a directory",
        ),
        (
            &[
                "--socket-path",
                s,
                "--size",
                "1M",
                "--algorithm",
                "zstd",
                "--zstd-dict",
                empty.to_str().unwrap(),
            ],
            "is empty",
        ),
        (
            &[
                "--socket-path",
                s,
                "--size",
                "1M",
                "--migrate-token",
                empty.to_str().unwrap(),
            ],
            "--migrate-token: the token in",
        ),
        (
            &[
                "--socket-path",
                s,
                "--size",
                "1M",
                "--migrate-token",
                no_token.to_str().unwrap(),
            ],
            "--migrate-token: the token file",
        ),
    ];
    for (args, needle) in cases {
        let mut command = Command::new(BIN);
        command.args(*args);
        let output = common::child::output_within(command, std::time::Duration::from_secs(20));
        assert_one_sentence_error_exit(&output, needle, EXIT_USAGE);
    }
    assert!(!Path::new(s).exists(), "nothing was left behind");
}

#[test]
fn a_missing_directory_names_which_socket() {
    let dir = tempfile::tempdir().unwrap();
    let s = sock(&dir, "a.sock");

    let output = run(&[
        "--socket-path",
        s.to_str().unwrap(),
        "--size",
        "1M",
        "--control-socket",
        "/nonexistent-dir/ctl",
    ]);

    assert_one_sentence_error_exit(
        &output,
        "the directory /nonexistent-dir of the control socket --control-socket /nonexistent-dir/ctl does not exist",
        EXIT_FAILURE,
    );
    assert!(!s.exists(), "the vhost-user socket was removed again");
}

#[test]
fn the_control_socket_has_its_own_mode() {
    let mut wide = daemon_1m().args(["--socket-mode", "0666"]).start();
    let mut group = daemon_1m().args(["--control-socket-mode", "0660"]).start();
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;

    assert_eq!(mode(&wide.socket), 0o666);
    assert_eq!(
        mode(wide.control()),
        0o600,
        "--socket-mode leaves ctl alone"
    );
    assert_eq!(mode(&group.socket), 0o600);
    assert_eq!(mode(group.control()), 0o660);
    assert!(wide.stop().status.success());
    assert!(group.stop().status.success());
}

#[test]
fn sizes_take_the_suffixes_zramctl_takes_and_metrics_take_localhost() {
    let zramctl_sizes = [
        ("4GiB", 4 << 30),
        ("4G", 4 << 30),
        ("4g", 4 << 30),
        ("4gib", 4 << 30),
        ("4096M", 4 << 30),
        ("4194304KiB", 4 << 30),
        // Powers of 1000, rounded up to whole pages as zram rounds its disksize.
        ("4GB", 976_563 * 4096),
    ];
    for (size, bytes) in zramctl_sizes {
        let cli = Cli::try_parse_from([
            "vhost-user-zram",
            "--socket-path",
            "/tmp/x",
            "--size",
            size,
            "--metrics-listen",
            "localhost:9112",
        ])
        .unwrap_or_else(|e| panic!("{size}: {e}"));
        assert_eq!(cli.serve.size, Some(bytes), "{size}");
        let config = cli.serve.daemon_config().unwrap();
        assert_eq!(
            config.metrics_listen,
            Some("127.0.0.1:9112".parse().unwrap())
        );
    }
}

#[test]
fn generate_prints_a_man_page_and_completions_from_the_command_line() {
    let man = run(&["generate", "man"]);
    let bash = run(&["generate", "completion", "bash"]);
    let zsh = run(&["generate", "completion", "zsh"]);

    assert!(man.status.success(), "{man:?}");
    let man = String::from_utf8(man.stdout).unwrap();
    assert!(man.starts_with(".ie") || man.starts_with(".TH"), "{man}");
    assert!(man.contains(".TH vhost-user-zram 1"), "{man}");
    assert!(man.contains("control\\-socket\\-mode"), "{man}");
    for (shell, output) in [("bash", bash), ("zsh", zsh)] {
        assert!(output.status.success(), "{shell}: {output:?}");
        let script = String::from_utf8(output.stdout).unwrap();
        assert!(script.contains("--worker-cpus"), "{shell}: {script}");
    }
    let help = String::from_utf8(run(&["--help"]).stdout).unwrap();
    assert!(
        !help.contains("generate"),
        "generate is for packagers: {help}"
    );
}
