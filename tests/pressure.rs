// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A good host citizen, with the real daemon in a real v1 memory cgroup:
//!
//! - with a backing file, a guest writing 512 MiB of swap-like pages into a daemon whose cgroup
//!   is limited to 96 MiB (where the daemon of issue 19 was OOM-killed) sees no write error, the cgroup never hits its limit, the daemon is
//!   never OOM-killed, and every page reads back;
//! - without one, writes are refused at the limit with an I/O error, as with `--mem-limit`, the
//!   daemon lives, and every page written before reads back;
//! - with `--reclaim-on-pressure`, a page-cache thrash in a small cgroup of its own makes host
//!   memory stall, the PSI trigger fires, and the daemon sheds pages.
//!
//! These need root and the v1 memory controller (this project's test machines and CI have
//! both); without them each test says why and returns.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::blkio::Frontend;
use common::child::DaemonProcess;
use vhost_user_zram::pressure::MemoryCgroup;

const MIB: u64 = 1 << 20;
/// Pages in 256 MiB.
const PAGES_256M: u64 = 65536;
/// Pages in 512 MiB.
const PAGES_512M: u64 = 131072;

/// A v1 memory cgroup made for one test, under the test process's own; removed on drop once
/// its processes are gone.
struct TestCgroup {
    dir: PathBuf,
}

impl TestCgroup {
    /// A new cgroup named for `name` with `limit` bytes, or why there cannot be one.
    fn create(name: &str, limit: u64) -> Result<TestCgroup, String> {
        let own = MemoryCgroup::discover().map_err(|e| format!("no memory cgroup: {e}"))?;
        if own.version != vhost_user_zram::pressure::CgroupVersion::V1 {
            return Err(format!(
                "the test process is in a {} memory cgroup, not the v1 one these tests drive",
                own.version.name()
            ));
        }
        let dir = own.dir.join(format!("vuz-{name}-{}", std::process::id()));
        fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let cgroup = TestCgroup { dir };
        fs::write(cgroup.file("memory.limit_in_bytes"), limit.to_string())
            .map_err(|e| format!("cannot set the limit: {e}"))?;
        Ok(cgroup)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn read(&self, name: &str) -> String {
        fs::read_to_string(self.file(name)).unwrap()
    }

    fn number(&self, name: &str) -> u64 {
        self.read(name).trim().parse().unwrap()
    }

    /// A figure of `memory.oom_control` (`oom_kill`, `under_oom`).
    fn oom_control(&self, key: &str) -> u64 {
        vhost_user_zram::pressure::cgroup::stat_value(&self.read("memory.oom_control"), key)
            .unwrap_or(0)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // The test stopped its processes; wait for the kernel to let go of them, then remove.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match fs::remove_dir(&self.dir) {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => {
                    eprintln!("cannot remove cgroup {}: {e}", self.dir.display());
                    return;
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// A cgroup for the test, or `None` after saying why the test cannot run here.
fn cgroup_or_skip(name: &str, limit: u64) -> Option<TestCgroup> {
    match TestCgroup::create(name, limit) {
        Ok(cgroup) => Some(cgroup),
        Err(why) => {
            eprintln!("SKIPPED: {why} (these tests need root and the v1 memory controller)");
            None
        }
    }
}

/// A directory on a disk filesystem: files on tmpfs are shared memory, charged to the cgroup.
fn disk_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    // SAFETY: an all-zero statfs is a valid value for statfs(2) to fill.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    let path = std::ffi::CString::new(dir.path().to_str().unwrap()).unwrap();
    // SAFETY: `path` is a NUL-terminated string and `fs` a writable statfs, both live for the
    // call.
    assert_eq!(unsafe { libc::statfs(path.as_ptr(), &mut fs) }, 0);
    assert_ne!(
        fs.f_type,
        libc::TMPFS_MAGIC,
        "{} is on tmpfs",
        dir.path().display()
    );
    dir
}

/// The value of the metric line starting with `name{` whose labels contain `label`.
fn metric(metrics: &str, name: &str, label: &str) -> u64 {
    metrics
        .lines()
        .find(|line| line.starts_with(&format!("vhost_user_zram_{name}{{")) && line.contains(label))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no {name} {label} in:\n{metrics}"))
}

#[test]
fn with_a_backing_file_512m_of_writes_fit_a_96m_cgroup_and_every_page_verifies() {
    let Some(cgroup) = cgroup_or_skip("backing", 96 * MIB) else {
        return;
    };
    let files = disk_dir();
    let backing = files.path().join("backing");
    let mut daemon = DaemonProcess::options()
        .size(PAGES_512M * 4096)
        .args(["--backing-file", backing.to_str().unwrap()])
        .in_cgroup(&cgroup.file("cgroup.procs"))
        .start();
    daemon.wait_for_log("keeping the store within the limit");
    let mut frontend = Frontend::connect(&daemon.socket);

    let failed = frontend.try_write_pages(0..PAGES_512M, 11);

    assert_eq!(failed, None, "a write failed; stderr:\n{}", daemon.stderr());
    frontend.assert_holds(0..PAGES_512M, 11);
    assert!(daemon.try_exit().is_none(), "the daemon died");
    let max_usage = cgroup.number("memory.max_usage_in_bytes");
    let failcnt = cgroup.number("memory.failcnt");
    let metrics = daemon.ctl(&["metrics"]);
    eprintln!(
        "cgroup: max usage {} MiB of {} MiB, failcnt {failcnt}; {}",
        max_usage / MIB,
        96,
        daemon.ctl(&["stats"])
    );
    assert!(max_usage <= 96 * MIB);
    assert_eq!(cgroup.oom_control("oom_kill"), 0, "the OOM killer ran");
    assert_eq!(failcnt, 0, "the cgroup met its limit");
    assert_eq!(metric(&metrics, "cgroup_memory_limit_bytes", ""), 96 * MIB);
    assert!(metric(&metrics, "shed_pages_total", "mode=\"writeback\"") > 0);
    assert!(
        metric(
            &metrics,
            "reclaim_requests_total",
            "source=\"cgroup_limit\""
        ) > 0
    );
    // The JSON statistics carry the same figures, and `mem-limit` says the cgroup's budget
    // binds though the user set no limit.
    let json: serde_json::Value = serde_json::from_str(&daemon.ctl(&["stats", "--json"])).unwrap();
    assert_eq!(json["pressure"]["cgroup_limit"].as_u64(), Some(96 * MIB));
    assert!(
        json["pressure"]["shed_pages"][0].as_u64().unwrap() > 0,
        "{json}"
    );
    let limit = daemon.ctl(&["mem-limit"]);
    assert!(
        limit.starts_with("mem_limit off\nstore_limit ") && limit.contains("memory cgroup"),
        "{limit}"
    );
    drop(frontend);
    daemon.stop();
}

#[test]
fn without_a_backing_file_writes_are_refused_at_the_cgroup_limit_and_nothing_is_lost() {
    let limit = 48 * MIB;
    let Some(cgroup) = cgroup_or_skip("refuse", limit) else {
        return;
    };
    let mut daemon = DaemonProcess::options()
        .size(PAGES_256M * 4096)
        .in_cgroup(&cgroup.file("cgroup.procs"))
        .start();
    daemon.wait_for_log("writes are refused at the limit");
    let mut frontend = Frontend::connect(&daemon.socket);

    let refused_at = frontend.try_write_pages(0..PAGES_256M, 12);

    let refused_at = refused_at.expect("every write succeeded: the limit never bound");
    assert!(refused_at > 0, "the first write was refused");
    assert!(daemon.try_exit().is_none(), "the daemon died");
    assert!(daemon.io_stat().failed_writes > 0);
    frontend.assert_holds(0..refused_at, 12);
    // Still refusing, still alive.
    assert!(frontend
        .try_write_pages(refused_at..refused_at + 4096, 12)
        .is_some());
    assert_eq!(cgroup.oom_control("oom_kill"), 0, "the OOM killer ran");
    assert_eq!(
        cgroup.number("memory.failcnt"),
        0,
        "the cgroup met its limit"
    );
    eprintln!(
        "refused from page {refused_at}; cgroup max usage {} MiB of {} MiB",
        cgroup.number("memory.max_usage_in_bytes") / MIB,
        limit / MIB
    );
    drop(frontend);
    daemon.stop();
}

/// A process thrashing the page cache in `cgroup`: it writes a file larger than the cgroup's
/// limit (so its pages are charged there), then reads it over and over. Its process group is
/// killed and reaped on drop.
struct Thrash(Child);

impl Thrash {
    fn start(cgroup: &TestCgroup, file: &Path, mib: u64) -> Thrash {
        use std::os::unix::process::CommandExt;
        let script = format!(
            "echo 0 > '{procs}' && dd if=/dev/zero of='{file}' bs=1M count={mib} status=none && \
             while :; do cat '{file}' > /dev/null; done",
            procs = cgroup.file("cgroup.procs").display(),
            file = file.display()
        );
        Thrash(
            Command::new("sh")
                .args(["-c", &script])
                .stdin(Stdio::null())
                .process_group(0)
                .spawn()
                .unwrap(),
        )
    }
}

impl Drop for Thrash {
    fn drop(&mut self) {
        let group = libc::pid_t::try_from(self.0.id()).unwrap();
        // SAFETY: kill(2) takes no pointers; the group is the shell's own (process_group(0)),
        // which is not reaped yet, so its id was not reused.
        unsafe { libc::kill(-group, libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

#[test]
fn memory_pressure_fires_the_psi_trigger_and_pages_are_shed() {
    let Some(hog) = cgroup_or_skip("thrash", 16 * MIB) else {
        return;
    };
    if !Path::new("/proc/pressure/memory").exists() {
        eprintln!("SKIPPED: this kernel has no /proc/pressure/memory (PSI is off)");
        return;
    }
    let files = disk_dir();
    let backing = files.path().join("backing");
    let daemon = DaemonProcess::options()
        .size(64 * MIB)
        .args(["--backing-file", backing.to_str().unwrap()])
        .args(["--reclaim-on-pressure=some 1ms/2s"])
        .start();
    daemon.wait_for_log("on memory pressure (some 1ms/2s on /proc/pressure/memory)");
    let mut frontend = Frontend::connect(&daemon.socket);
    frontend.write_pages(0..16384, 13);

    let thrash = Thrash::start(&hog, &files.path().join("big"), 64);
    let deadline = Instant::now() + Duration::from_secs(20);
    let shed = loop {
        let metrics = daemon.ctl(&["metrics"]);
        let events = metric(&metrics, "memory_pressure_events_total", "");
        let shed = metric(&metrics, "shed_pages_total", "mode=\"writeback\"");
        if events > 0 && shed > 0 {
            break shed;
        }
        assert!(
            Instant::now() < deadline,
            "no pressure event and shedding within 20 s: {events} events, {shed} pages shed"
        );
        thread::sleep(Duration::from_millis(100));
    };
    drop(thrash);

    assert!(
        shed < 16384,
        "a round sheds an eighth, not everything: {shed}"
    );
    assert!(daemon.stats().writeback.pages_on_file > 0);
    frontend.assert_holds(0..16384, 13);
    drop(frontend);
}
