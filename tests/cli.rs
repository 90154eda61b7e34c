// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Command-line tests: the built binary's errors, capabilities, sockets and the `ctl` tool,
//! and the contrib files' agreement with the binary.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use vhost_user_zram::cli::Cli;

const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-zram");

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

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

/// A daemon process, killed with SIGTERM when dropped.
struct Running {
    child: Child,
}

impl Running {
    fn start(args: &[&str], wait_for: &Path) -> Self {
        let child = Command::new(BIN)
            .args(args)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let running = Running { child };
        wait_for_socket(wait_for);
        running
    }

    fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) with a pid we spawned and a valid signal; no memory involved.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        self.child.wait().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls until `path` is a socket that accepts connections (no fixed sleeps). A connection
/// that closes without a message is a liveness probe the daemon ignores.
fn wait_for_socket(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
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
        (&["--socket-path", s, "--size", "4097"], "multiple of 4 KiB"),
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
            &["--socket-path", s, "--size", "128G"],
            "more than the largest device, 64 GiB",
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
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir, "mode.sock");
    let daemon = Running::start(
        &["--socket-path", path.to_str().unwrap(), "--size", "1M"],
        &path,
    );
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(daemon.terminate().success(), "SIGTERM exits 0");
    assert!(!path.exists(), "the socket file is removed");
}

#[test]
fn socket_mode_option_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir, "mode.sock");
    let args = [
        "--socket-path",
        path.to_str().unwrap(),
        "--size",
        "1M",
        "--socket-mode",
        "0660",
    ];
    let daemon = Running::start(&args, &path);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    assert!(daemon.terminate().success());
}

#[test]
fn stale_socket_is_reused_and_live_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir, "stale.sock");
    // A socket file nobody listens on.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let p = path.to_str().unwrap();
    let daemon = Running::start(&["--socket-path", p, "--size", "1M"], &path);
    // The path is live now: a second daemon is refused, and the first keeps running.
    assert_one_sentence_error_exit(
        &run(&["--socket-path", p, "--size", "1M"]),
        "in use by a running daemon",
        EXIT_FAILURE,
    );
    assert!(
        daemon.terminate().success(),
        "the probe did not end the first daemon"
    );
}

#[test]
fn ctl_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir, "d.sock");
    let control = sock(&dir, "d.ctl");
    let c = control.to_str().unwrap();
    let daemon = Running::start(
        &[
            "--socket-path",
            path.to_str().unwrap(),
            "--size",
            "1M",
            "--control-socket",
            c,
        ],
        &control,
    );
    let ctl = |args: &[&str]| {
        let mut all = vec!["ctl", "--control-socket", c];
        all.extend_from_slice(args);
        let output = run(&all);
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    let mm_stat = ctl(&["mm_stat"]);
    assert_eq!(mm_stat.lines().count(), 1);
    assert_eq!(mm_stat.split_whitespace().count(), 9, "{mm_stat:?}");
    let io_stat = ctl(&["io_stat"]);
    assert_eq!(io_stat.split_whitespace().count(), 4, "{io_stat:?}");
    assert!(!ctl(&["stats"]).is_empty());
    let json: serde_json::Value = serde_json::from_str(&ctl(&["stats", "--json"])).unwrap();
    assert!(json.is_object());
    assert!(ctl(&["compact"]).starts_with("compacted "));
    assert!(daemon.terminate().success());
    assert!(!control.exists(), "the control socket is removed");

    let output = run(&["ctl", "--control-socket", c, "stats"]);
    assert_one_sentence_error(&output, "cannot connect");
}

#[test]
fn the_daemon_serves_socket_path_dot_ctl_by_default_and_ctl_finds_it_through_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir, "d.sock");
    let control = sock(&dir, "d.sock.ctl");
    let daemon = Running::start(
        &["--socket-path", path.to_str().unwrap(), "--size", "1M"],
        &control,
    );

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
    assert!(daemon.terminate().success());
    assert!(!control.exists(), "the default control socket is removed");
}

#[test]
fn control_socket_flag_wins_over_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir, "d.sock");
    let control = sock(&dir, "d.sock.ctl");
    let daemon = Running::start(
        &["--socket-path", path.to_str().unwrap(), "--size", "1M"],
        &control,
    );

    let output = Command::new(BIN)
        .args([
            "ctl",
            "--control-socket",
            control.to_str().unwrap(),
            "io_stat",
        ])
        .env("VHOST_USER_ZRAM_CTL", dir.path().join("nothing-here"))
        .output()
        .unwrap();

    assert!(output.status.success(), "{output:?}");
    assert!(daemon.terminate().success());
}

#[test]
fn control_socket_none_serves_no_control_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = sock(&dir, "d.sock");
    let daemon = Running::start(
        &[
            "--socket-path",
            path.to_str().unwrap(),
            "--size",
            "1M",
            "--control-socket",
            "none",
        ],
        &path,
    );

    let entries: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();

    assert_eq!(entries, vec![std::ffi::OsString::from("d.sock")]);
    assert!(daemon.terminate().success());
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
