// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The recompression options and `ctl` commands through the built binary: flags reach the
//! store, the control commands answer, and wrong values are one-sentence errors.

mod common;

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
