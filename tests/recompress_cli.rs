// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The recompression options and `ctl` commands through the built binary: flags reach the
//! store, the control commands answer, and wrong values are one-sentence errors.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Output;

use common::child::{run, DaemonProcess};

fn one_sentence_error(output: &Output, needle: &str) {
    assert!(!output.status.success(), "expected failure: {output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<_> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected, got {stderr:?}");
    assert!(lines[0].contains(needle), "{stderr:?} lacks {needle:?}");
}

#[test]
fn ctl_idle_recompress_and_stats_reach_a_daemon_with_secondary_algorithms() {
    let daemon = DaemonProcess::start(
        "16M",
        &[
            "--recompress-algorithm",
            "zstd:level=5",
            "--recompress-algorithm",
            "deflate",
            "--recompress-idle-after",
            "3600",
        ],
    );

    let idle = daemon.ctl(&["idle"]);
    let recompress = daemon.ctl(&["recompress", "type=idle", "max_pages=5"]);
    let json = daemon.ctl(&["stats", "--json"]);
    let table = daemon.ctl(&["stats"]);

    assert_eq!(idle, "marked 0 pages idle\n");
    assert!(recompress.starts_with("tried 0 pages"), "{recompress}");
    let stats: serde_json::Value = serde_json::from_str(&json).unwrap();
    let names: Vec<_> = stats["recompression"]["algorithms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["lz4", "zstd:level=5", "deflate:level=1"]);
    assert!(table.contains("algorithm 1 zstd:level=5"), "{table}");
    one_sentence_error(
        &daemon.ctl_output(&["recompress", "algo=lz4"]),
        "lz4 is not a recompression algorithm of this device",
    );
    one_sentence_error(
        &daemon.ctl_output(&["recompress", "type=cold"]),
        "'cold' is not a valid value for type",
    );
    one_sentence_error(
        &daemon.ctl_output(&["train-dict"]),
        "at least 16 are needed to train a dictionary",
    );
}

#[test]
fn recompress_without_a_secondary_algorithm_is_refused() {
    let daemon = DaemonProcess::start("16M", &[]);

    one_sentence_error(
        &daemon.ctl_output(&["recompress"]),
        "start the daemon with --recompress-algorithm",
    );
}

#[test]
fn wrong_recompression_options_are_one_sentence_errors() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let dict = dir.path().join("not-a-dict");
    std::fs::write(&dict, b"just some bytes").unwrap();
    let base = ["--socket-path", socket.to_str().unwrap(), "--size", "1M"];
    let with = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        run(&args)
    };

    one_sentence_error(
        &with(&["--recompress-idle-after", "60"]),
        "--recompress-idle-after needs a --recompress-algorithm",
    );
    one_sentence_error(
        &with(&["--recompress-algorithm", "zstd:level=40"]),
        "zstd level 40 is out of range",
    );
    one_sentence_error(
        &with(&["--recompress-algorithm", "zstd:dict=/x"]),
        "'dict=/x' is not an algorithm parameter",
    );
    one_sentence_error(
        &with(&[
            "--recompress-algorithm",
            "zstd",
            "--zstd-dict",
            dict.to_str().unwrap(),
        ]),
        "not in zstd's format",
    );
    one_sentence_error(
        &with(&["--zstd-dict", dict.to_str().unwrap()]),
        "no algorithm of this device is zstd",
    );
}

#[test]
fn repeated_keys_algorithms_and_levels_are_one_sentence_errors() {
    // The daemon's side, over the socket (ctl's own word-by-word check is src/cli.rs's).
    let daemon = DaemonProcess::start("16M", &["--recompress-algorithm", "zstd"]);
    let ask = |line: &str| {
        let mut stream = UnixStream::connect(daemon.control()).unwrap();
        stream.write_all(line.as_bytes()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    };
    assert_eq!(
        ask("recompress type=idle type=huge\n"),
        "error 'type=' is given more than once; give each parameter once\n"
    );
    assert!(ask("recompress algo=zstd priority=1\n").contains("give algo= or priority=, not both"));
    assert!(ask("train-dict size=4096 size=8192\n").contains("'size=' is given more than once"));

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let base = ["--socket-path", socket.to_str().unwrap(), "--size", "1M"];
    let with = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        run(&args)
    };
    one_sentence_error(
        &with(&["--recompress-algorithm", "zstd:level=3:level=4"]),
        "gives the level more than once",
    );
    one_sentence_error(
        &with(&["--recompress-algorithm", "zstd"].repeat(3)),
        "the recompression algorithm zstd:level=1 is given more than once",
    );
    one_sentence_error(
        &with(&["--algorithm", "lz4", "--recompress-algorithm", "lz4"]),
        "lz4 is the device's own algorithm",
    );
    assert!(!socket.exists());
}
