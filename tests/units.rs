// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The systemd units in `contrib/`, checked by systemd's own tools where they are installed:
//! `systemd-analyze verify` on an instance of the socket and service pair (with the built
//! binary in place of `/usr/bin/vhost-user-zram`), and `systemd-analyze security` on the
//! service, which must stay rated SAFE; both alone and with each drop-in of
//! `contrib/drop-ins/` installed where its header says. Without systemd-analyze those tests
//! print a SKIP line and pass; what the drop-ins must say is checked without it too.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-zram");
const INSTALLED_BIN: &str = "/usr/bin/vhost-user-zram";
const SERVICE: &str = "vhost-user-zram@.service";
const SOCKET: &str = "vhost-user-zram@.socket";

/// The highest `systemd-analyze security` exposure the service may have (SAFE is below 2.0;
/// the unit is at 0.5 with systemd 252: 0.2 of it is `ProtectProc=default`, which lets the
/// daemon read the connecting QEMU's start time so the state goes back only to that process,
/// and 0.1 allowing `setpriority`, with which the compression workers lower their own
/// priority; the metrics drop-in, which opens loopback networking, adds 0.7).
const MAX_EXPOSURE: f64 = 1.2;

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

/// A drop-in of `contrib/drop-ins/` and the directory it is installed in (as its header says).
struct DropIn {
    name: &'static str,
    directory: &'static str,
}

/// Metrics on loopback: one port per VM, so an instance's drop-in.
const METRICS: DropIn = DropIn {
    name: "metrics-loopback.conf",
    directory: "vhost-user-zram@vm1.service.d",
};

/// A backing-file directory: every VM's daemon, so the template's drop-in.
const BACKING_FILE: DropIn = DropIn {
    name: "backing-file.conf",
    directory: "vhost-user-zram@.service.d",
};

/// Live migration: every VM's daemon, so the template's drop-in.
const MIGRATION: DropIn = DropIn {
    name: "migration.conf",
    directory: "vhost-user-zram@.service.d",
};

/// The socket for QEMU under libvirt: every VM's, so the socket template's drop-in.
const SOCKET_FOR_LIBVIRT: DropIn = DropIn {
    name: "socket-for-libvirt.conf",
    directory: "vhost-user-zram@.socket.d",
};

/// Copies the unit templates into `dir`, with the built binary in ExecStart=, installs the
/// drop-ins where their headers say, and returns the paths of the `vm1` instances (systemd
/// finds the templates and drop-in directories next to them).
fn instance_units(dir: &Path, drop_ins: &[&DropIn]) -> (PathBuf, PathBuf) {
    let service = contrib(SERVICE);
    assert!(
        service.contains(INSTALLED_BIN),
        "ExecStart= names {INSTALLED_BIN}"
    );
    std::fs::write(dir.join(SERVICE), service.replace(INSTALLED_BIN, BIN)).unwrap();
    std::fs::write(dir.join(SOCKET), contrib(SOCKET)).unwrap();
    for drop_in in drop_ins {
        let text = contrib(&format!("drop-ins/{}", drop_in.name));
        let directory = dir.join(drop_in.directory);
        std::fs::create_dir_all(&directory).unwrap();
        std::fs::write(
            directory.join(drop_in.name),
            text.replace(INSTALLED_BIN, BIN),
        )
        .unwrap();
    }
    (
        dir.join("vhost-user-zram@vm1.socket"),
        dir.join("vhost-user-zram@vm1.service"),
    )
}

/// `systemd-analyze verify` of the vm1 instances with these drop-ins: no error, no warning.
fn assert_verifies(test: &str, drop_ins: &[&DropIn]) {
    let dir = tempfile::tempdir().unwrap();
    let (socket, service) = instance_units(dir.path(), drop_ins);

    let Some(output) = systemd_analyze(
        test,
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

/// The overall exposure `systemd-analyze security --offline` gives the vm1 service with these
/// drop-ins, or `None` when the tool is missing or too old (a SKIP line is printed).
fn exposure(test: &str, drop_ins: &[&DropIn]) -> Option<f64> {
    let dir = tempfile::tempdir().unwrap();
    let (_, service) = instance_units(dir.path(), drop_ins);

    let output = systemd_analyze(
        test,
        &[
            "security".as_ref(),
            "--offline=yes".as_ref(),
            "--no-pager".as_ref(),
            service.as_os_str(),
        ],
    )?;

    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() && stderr.contains("--offline") {
        eprintln!("SKIP {test}: this systemd-analyze has no --offline ({stderr})");
        return None;
    }
    let exposure = stdout
        .lines()
        .find_map(|line| line.split_once("Overall exposure level for "))
        .and_then(|(_, rest)| rest.split_once(": "))
        .and_then(|(_, rating)| rating.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure in: {stdout}{stderr}"));
    Some(exposure)
}

/// The value of the first `KEY=VALUE` line of a unit text that sets KEY to something (an
/// empty `ExecStart=` resets the list and is skipped).
fn setting(unit: &str, key: &str) -> Option<String> {
    unit.lines()
        .filter_map(|line| line.strip_prefix(key)?.strip_prefix('='))
        .find(|value| !value.is_empty())
        .map(str::to_owned)
}

/// The value after `flag` on a command line.
fn flag_value<'a>(command: &'a str, flag: &str) -> Option<&'a str> {
    command
        .split_whitespace()
        .skip_while(|word| *word != flag)
        .nth(1)
}

#[test]
fn units_pass_systemd_analyze_verify() {
    assert_verifies("units_pass_systemd_analyze_verify", &[]);
}

#[test]
fn units_with_the_metrics_drop_in_pass_systemd_analyze_verify() {
    assert_verifies(
        "units_with_the_metrics_drop_in_pass_systemd_analyze_verify",
        &[&METRICS],
    );
}

#[test]
fn units_with_the_backing_file_drop_in_pass_systemd_analyze_verify() {
    assert_verifies(
        "units_with_the_backing_file_drop_in_pass_systemd_analyze_verify",
        &[&BACKING_FILE],
    );
}

#[test]
fn units_with_the_migration_drop_in_pass_systemd_analyze_verify() {
    assert_verifies(
        "units_with_the_migration_drop_in_pass_systemd_analyze_verify",
        &[&MIGRATION],
    );
}

#[test]
fn units_with_the_libvirt_socket_drop_in_pass_systemd_analyze_verify() {
    assert_verifies(
        "units_with_the_libvirt_socket_drop_in_pass_systemd_analyze_verify",
        &[&SOCKET_FOR_LIBVIRT],
    );
}

#[test]
fn libvirt_socket_drop_in_gives_the_socket_to_qemus_group_only() {
    let text = contrib(&format!("drop-ins/{}", SOCKET_FOR_LIBVIRT.name));
    assert_eq!(setting(&text, "SocketGroup").as_deref(), Some("kvm"));
    assert_eq!(setting(&text, "SocketMode").as_deref(), Some("0660"));
}

#[test]
fn service_is_rated_safe_by_systemd_analyze_security() {
    let test = "service_is_rated_safe_by_systemd_analyze_security";
    let Some(alone) = exposure(test, &[]) else {
        return;
    };
    assert!(
        alone <= MAX_EXPOSURE,
        "the service's exposure is {alone}, more than {MAX_EXPOSURE}"
    );
}

#[test]
fn drop_ins_keep_the_service_rated_safe() {
    let test = "drop_ins_keep_the_service_rated_safe";
    let Some(alone) = exposure(test, &[]) else {
        return;
    };
    // A backing file changes who the daemon runs as and one writable directory: no exposure.
    let backing = exposure(test, &[&BACKING_FILE]).unwrap();
    assert!(
        backing <= alone,
        "with the backing-file drop-in the exposure is {backing}, was {alone}"
    );
    // Migration adds a credential and an environment file, and keeps the network closed.
    let migration = exposure(test, &[&MIGRATION]).unwrap();
    assert!(
        migration <= alone,
        "with the migration drop-in the exposure is {migration}, was {alone}"
    );
    // Metrics need the host's network (loopback only): more exposed, still SAFE.
    let metrics = exposure(test, &[&METRICS]).unwrap();
    assert!(
        metrics <= MAX_EXPOSURE,
        "with the metrics drop-in the exposure is {metrics}, more than {MAX_EXPOSURE}"
    );
}

#[test]
fn drop_ins_run_the_shipped_command_with_their_option_added() {
    let base = setting(&contrib(SERVICE), "ExecStart").unwrap();
    for (drop_in, added) in [
        (&METRICS, "--metrics-listen"),
        (&BACKING_FILE, "--backing-file"),
        (&MIGRATION, "--migrate-token"),
    ] {
        let text = contrib(&format!("drop-ins/{}", drop_in.name));
        assert!(
            text.contains("\nExecStart=\n"),
            "{} resets ExecStart= before setting it",
            drop_in.name
        );
        let command = setting(&text, "ExecStart").unwrap();
        assert!(
            command.starts_with(&base) && flag_value(&command, added).is_some(),
            "{}: ExecStart= is not the shipped one ({base}) with {added} added: {command}",
            drop_in.name
        );
    }
}

#[test]
fn migration_drop_in_takes_the_incoming_argument_the_libvirt_hook_writes() {
    let text = contrib(&format!("drop-ins/{}", MIGRATION.name));
    let command = setting(&text, "ExecStart").unwrap();
    // The token comes as a credential: the daemon (a dynamic user) cannot read /etc itself.
    assert_eq!(
        flag_value(&command, "--migrate-token"),
        Some("%d/migrate-token")
    );
    assert!(setting(&text, "LoadCredential")
        .unwrap()
        .starts_with("migrate-token:"));
    assert!(command.ends_with(" $VUZ_MIGRATE_ARGS"), "{command}");
    let environment = setting(&text, "EnvironmentFile").unwrap();
    let file = environment
        .strip_prefix('-')
        .expect("optional: absent when not migrating");
    let hook = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/libvirt/qemu-hook"),
    )
    .unwrap();
    let dir = Path::new(file).parent().unwrap().to_str().unwrap();
    assert_eq!(file, format!("{dir}/%i.env"));
    assert!(
        hook.contains(&format!("dir={dir}\n")),
        "the hook writes into {dir}"
    );
    assert!(hook.contains("VUZ_MIGRATE_ARGS=--incoming unix:"));
    // No network: the stream is a Unix socket, carried between hosts over SSH.
    assert_eq!(setting(&text, "PrivateNetwork"), None);
}

#[test]
fn libvirt_hook_writes_incoming_for_its_domain_only_and_removes_it_after() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let hook_text = std::fs::read_to_string(root.join("contrib/libvirt/qemu-hook")).unwrap();
    let env_dir = dir.path().join("migrate");
    let hook = dir.path().join("hook");
    std::fs::write(
        &hook,
        hook_text.replace(
            "dir=/run/vhost-user-zram-migrate",
            &format!("dir={}", env_dir.display()),
        ),
    )
    .unwrap();
    let run = |args: &[&str], xml: &str| {
        use std::io::Write;
        let mut child = Command::new("sh")
            .arg(&hook)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A hook that has nothing to do exits without reading the XML: a broken pipe here is
        // not a failure.
        let _ = child.stdin.take().unwrap().write_all(xml.as_bytes());
        assert!(child.wait().unwrap().success(), "{args:?}");
    };
    let ours =
        "<disk type='vhostuser'><source type='unix' path='/run/vhost-user-zram/vm1.sock'/></disk>";
    run(&["vm2", "migrate", "begin", "-"], ours);
    assert!(
        !env_dir.join("vm2.env").exists(),
        "vm2 does not use vm1's socket"
    );
    run(&["vm1", "migrate", "begin", "-"], ours);
    let env = std::fs::read_to_string(env_dir.join("vm1.env")).unwrap();
    assert_eq!(
        env,
        "VUZ_MIGRATE_ARGS=--incoming unix:/run/vhost-user-zram/vm1/incoming.sock\n"
    );
    run(&["vm1", "started", "begin", "-"], "");
    assert!(env_dir.join("vm1.env").exists(), "kept while the VM runs");
    run(&["vm1", "release", "end", "-"], "");
    assert!(
        !env_dir.join("vm1.env").exists(),
        "removed when the VM ends"
    );
    run(&["../x", "migrate", "begin", "-"], ours);
    assert!(std::fs::read_dir(&env_dir).unwrap().next().is_none());
}

#[test]
fn metrics_drop_in_opens_the_network_to_loopback_only() {
    let text = contrib(&format!("drop-ins/{}", METRICS.name));
    let command = setting(&text, "ExecStart").unwrap();
    let listen: std::net::SocketAddr = flag_value(&command, "--metrics-listen")
        .unwrap()
        .parse()
        .unwrap();
    assert!(listen.ip().is_loopback(), "metrics listen on {listen}");
    assert!(listen.is_ipv4(), "only AF_INET is allowed");
    // The service's PrivateNetwork=yes would hide the port in a namespace of its own, and
    // RestrictAddressFamilies=AF_UNIX would refuse the socket.
    assert_eq!(setting(&text, "PrivateNetwork").as_deref(), Some("no"));
    assert_eq!(
        setting(&text, "RestrictAddressFamilies").as_deref(),
        Some("AF_INET")
    );
    // The service's IPAddressDeny=any stays; loopback is let through.
    assert_eq!(setting(&text, "IPAddressDeny"), None);
    assert_eq!(
        setting(&text, "IPAddressAllow").as_deref(),
        Some("localhost")
    );
}

#[test]
fn backing_file_drop_in_makes_the_files_directory_writable() {
    let text = contrib(&format!("drop-ins/{}", BACKING_FILE.name));
    let command = setting(&text, "ExecStart").unwrap();
    let backing = Path::new(flag_value(&command, "--backing-file").unwrap());
    let writable = setting(&text, "ReadWritePaths").unwrap();
    // ProtectSystem=strict leaves only ReadWritePaths= (and the runtime directory) writable.
    assert_eq!(backing.parent().unwrap(), Path::new(&writable));
    assert!(
        !writable.starts_with("/run"),
        "the point is a place outside /run"
    );
    // One file per VM, so two daemons never share one.
    assert!(backing.to_str().unwrap().contains("%i"));
    // A static user that owns the directory, so the next start opens the file again.
    assert_eq!(setting(&text, "DynamicUser").as_deref(), Some("no"));
    let user = setting(&text, "User").unwrap();
    assert!(
        text.contains(&format!(
            "install -d -o {user} -g {user} -m 0700 {writable}"
        )),
        "the header creates {writable} for {user}"
    );
}

#[test]
fn control_socket_lives_in_the_services_runtime_directory() {
    let service = contrib(SERVICE);
    let runtime_directory = setting(&service, "RuntimeDirectory").unwrap();
    let exec_start = setting(&service, "ExecStart").unwrap();
    let control =
        flag_value(&exec_start, "--control-socket").expect("ExecStart= passes --control-socket");

    // ProtectSystem=strict leaves only the runtime directory writable.
    assert_eq!(
        Path::new(control).parent().unwrap(),
        Path::new("/run").join(runtime_directory)
    );
    assert!(service.contains("\nProtectSystem=strict\n"));
}

#[test]
fn service_keeps_the_guests_pages_across_a_crash_or_restart() {
    let service = contrib(SERVICE);
    let exec_start = setting(&service, "ExecStart").unwrap();
    let name = flag_value(&exec_start, "--state-fdstore")
        .expect("ExecStart= keeps the state in the fd store (--state-fdstore)");
    assert!(!name.is_empty());
    let kept: u32 = setting(&service, "FileDescriptorStoreMax")
        .expect("FileDescriptorStoreMax= is set")
        .parse()
        .unwrap();
    assert!(kept >= 1, "the fd store must hold the state memfd");
    assert_eq!(setting(&service, "Restart").as_deref(), Some("on-failure"));
    // FDSTORE=1 is only heard from a service that may notify.
    assert_eq!(setting(&service, "Type").as_deref(), Some("notify"));
    // The daemon must see the connecting QEMU's /proc/PID/stat to know it.
    assert_ne!(
        setting(&service, "ProtectProc").as_deref(),
        Some("invisible")
    );
    assert_ne!(
        setting(&service, "ProtectProc").as_deref(),
        Some("noaccess")
    );
    assert_ne!(
        setting(&service, "ProtectProc").as_deref(),
        Some("ptraceable")
    );
}
