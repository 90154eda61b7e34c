// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The systemd units in `contrib/`, checked by systemd's own tools where they are installed:
//! `systemd-analyze verify` on an instance of the socket and service pair (with the built
//! binary in place of `/usr/bin/vhost-user-zram`), and `systemd-analyze security` on the
//! service, which must stay rated SAFE. Without systemd-analyze the tests print a SKIP line
//! and pass.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-zram");
const INSTALLED_BIN: &str = "/usr/bin/vhost-user-zram";
const SERVICE: &str = "vhost-user-zram@.service";
const SOCKET: &str = "vhost-user-zram@.socket";

/// The highest `systemd-analyze security` exposure the service may have (SAFE is below 2.0;
/// the unit is at 0.2 with systemd 252).
const MAX_EXPOSURE: f64 = 1.0;

fn contrib(name: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(root.join("contrib").join(name)).unwrap()
}

/// Runs `systemd-analyze ARGS`, or returns `None` (after printing a SKIP line) when it is not
/// installed.
fn systemd_analyze(test: &str, args: &[&std::ffi::OsStr]) -> Option<Output> {
    match Command::new("systemd-analyze").args(args).output() {
        Ok(output) => Some(output),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("SKIP {test}: systemd-analyze is not installed, the units were not checked");
            None
        }
        Err(error) => panic!("cannot run systemd-analyze: {error}"),
    }
}

/// Copies the unit templates into `dir`, with the built binary in ExecStart=, and returns the
/// paths of the `vm1` instances (systemd finds the templates next to them).
fn instance_units(dir: &Path) -> (PathBuf, PathBuf) {
    let service = contrib(SERVICE);
    assert!(
        service.contains(INSTALLED_BIN),
        "ExecStart= names {INSTALLED_BIN}"
    );
    std::fs::write(dir.join(SERVICE), service.replace(INSTALLED_BIN, BIN)).unwrap();
    std::fs::write(dir.join(SOCKET), contrib(SOCKET)).unwrap();
    (
        dir.join("vhost-user-zram@vm1.socket"),
        dir.join("vhost-user-zram@vm1.service"),
    )
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let (socket, service) = instance_units(dir.path());

    let Some(output) = systemd_analyze(
        "units_pass_systemd_analyze_verify",
        &["verify".as_ref(), socket.as_os_str(), service.as_os_str()],
    ) else {
        return;
    };

    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "systemd-analyze verify: {said}");
    assert!(
        said.trim().is_empty(),
        "systemd-analyze verify warns: {said}"
    );
}

#[test]
fn service_is_rated_safe_by_systemd_analyze_security() {
    let dir = tempfile::tempdir().unwrap();
    let (_, service) = instance_units(dir.path());

    let Some(output) = systemd_analyze(
        "service_is_rated_safe_by_systemd_analyze_security",
        &[
            "security".as_ref(),
            "--offline=yes".as_ref(),
            "--no-pager".as_ref(),
            service.as_os_str(),
        ],
    ) else {
        return;
    };

    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() && stderr.contains("--offline") {
        eprintln!("SKIP service_is_rated_safe_by_systemd_analyze_security: this systemd-analyze has no --offline ({stderr})");
        return;
    }
    let exposure: f64 = stdout
        .lines()
        .find_map(|line| line.split_once("Overall exposure level for "))
        .and_then(|(_, rest)| rest.split_once(": "))
        .and_then(|(_, rating)| rating.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure in: {stdout}{stderr}"));
    assert!(
        exposure <= MAX_EXPOSURE,
        "the service's exposure is {exposure}, more than {MAX_EXPOSURE}:\n{stdout}"
    );
}

#[test]
fn control_socket_lives_in_the_services_runtime_directory() {
    let service = contrib(SERVICE);
    let setting = |key: &str| {
        service
            .lines()
            .find_map(|line| line.strip_prefix(key))
            .unwrap_or_else(|| panic!("the service has no {key}"))
            .to_owned()
    };

    let runtime_directory = setting("RuntimeDirectory=");
    let exec_start = setting("ExecStart=");
    let control = exec_start
        .split_whitespace()
        .skip_while(|word| *word != "--control-socket")
        .nth(1)
        .expect("ExecStart= passes --control-socket");

    // ProtectSystem=strict leaves only the runtime directory writable.
    assert_eq!(
        Path::new(control).parent().unwrap(),
        Path::new("/run").join(runtime_directory)
    );
    assert!(service.contains("\nProtectSystem=strict\n"));
}
