// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The backends the bench drives, and the guards that tear each one down whatever happens:
//! vhost-user-zram itself, qemu-storage-daemon exporting null-co or a file on /dev/shm, and a
//! kernel zram device made with `hot_add` and always removed with `hot_remove`.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use vhost_user_zram::store::{MmStat, Stats, UnitStats};

use crate::device::Transport;

/// How long a backend may take to create its socket.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// A scratch directory for sockets and logs, removed on drop.
pub struct RunDir(PathBuf);

impl RunDir {
    /// Creates a fresh directory under the system temp dir.
    pub fn create() -> Result<RunDir, String> {
        let base = std::env::temp_dir();
        for attempt in 0..100u32 {
            let path = base.join(format!(
                "vhost-user-zram-bench.{}.{attempt}",
                std::process::id()
            ));
            match fs::create_dir(&path) {
                Ok(()) => return Ok(RunDir(path)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(format!("create {}: {e}", path.display())),
            }
        }
        Err("could not create a scratch directory".into())
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A child process that is killed and reaped when dropped, unless it was already waited for.
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl ChildGuard {
    /// Spawns `command` with stdout and stderr going to `log`.
    pub fn spawn(name: &str, mut command: Command, log: PathBuf) -> Result<ChildGuard, String> {
        let log_file =
            fs::File::create(&log).map_err(|e| format!("create {}: {e}", log.display()))?;
        let log_clone = log_file.try_clone().map_err(|e| e.to_string())?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log_clone)
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("spawn {name} ({:?}): {e}", command.get_program()))?;
        Ok(ChildGuard {
            name: name.to_owned(),
            child: Some(child),
            log,
        })
    }

    /// A probe that tells, from any thread and without reaping it, whether the child has
    /// exited.
    pub fn exit_probe(&self) -> ExitProbe {
        ExitProbe {
            name: self.name.clone(),
            pid: self.child.as_ref().map(Child::id),
        }
    }

    /// The CPU time the child has used so far, all its threads (live and exited) together.
    /// `None` once it has been reaped.
    pub fn cpu_time(&self) -> Option<Result<Duration, String>> {
        self.child
            .as_ref()
            .map(|child| process_cpu_time(child.id()))
    }

    /// The CPU time of the child's live threads, by kind.
    pub fn thread_cpu(&self) -> Option<Result<ThreadCpu, String>> {
        self.child
            .as_ref()
            .map(|child| thread_cpu_times(child.id()))
    }

    /// The last lines the child printed.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Everything the child printed so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `socket` accepts a connection (a stale socket file left by a killed
    /// process refuses it), failing early if the child exits first. The probe connects and
    /// closes at once, before using the device, which vhost-user-zram takes as a liveness
    /// probe.
    pub fn wait_accepting(&mut self, socket: &Path) -> Result<(), String> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                return Ok(());
            }
            let child = self.child.as_mut().ok_or("the child was already reaped")?;
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                self.child = None;
                return Err(format!(
                    "{} exited with {status} before accepting on {}:\n{}",
                    self.name,
                    socket.display(),
                    self.log_tail()
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} did not accept on {} in time",
                    self.name,
                    socket.display()
                ));
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    /// Waits until `socket` exists, failing early if the child exits first.
    pub fn wait_for_socket(&mut self, socket: &Path) -> Result<(), String> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if socket.exists() {
                return Ok(());
            }
            let child = self.child.as_mut().ok_or("the child was already reaped")?;
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                self.child = None;
                return Err(format!(
                    "{} exited with {status} before creating {}:\n{}",
                    self.name,
                    socket.display(),
                    self.log_tail()
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} did not create {} in time",
                    self.name,
                    socket.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits up to `timeout` for the child to exit by itself, and kills it after that. Returns
    /// its exit status, or `None` when it had to be killed.
    pub fn finish(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return None;
                }
            }
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Tells whether a child process has exited, leaving it for [`ChildGuard`] to reap.
#[derive(Debug, Clone)]
pub struct ExitProbe {
    name: String,
    pid: Option<u32>,
}

impl ExitProbe {
    /// A probe for a backend the bench did not launch: it is always taken to be running.
    pub fn none() -> ExitProbe {
        ExitProbe {
            name: String::new(),
            pid: None,
        }
    }

    /// `Err` with a sentence once the process has exited.
    pub fn check(&self) -> Result<(), String> {
        let Some(pid) = self.pid.and_then(|pid| libc::id_t::try_from(pid).ok()) else {
            return Ok(());
        };
        // SAFETY: siginfo_t is plain data; all zeroes is a valid value, and waitid fills it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid, writable siginfo_t that outlives the call. WNOWAIT leaves
        // the child unreaped, so the ChildGuard that owns it still waits for it itself, and
        // the pid cannot be reused while it is unreaped.
        let result = unsafe {
            libc::waitid(
                libc::P_PID,
                pid,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: waitid filled `info`; si_pid is valid for the SIGCHLD it reports, and stays
        // 0 (from the zeroing) when no child changed state.
        let exited_pid = unsafe { info.si_pid() };
        if result != 0 || exited_pid == 0 {
            return Ok(());
        }
        // SAFETY: as above, si_status and si_code are valid for a SIGCHLD siginfo.
        let (code, status) = unsafe { (info.si_code, info.si_status()) };
        let how = if code == libc::CLD_EXITED {
            format!("with status {status}")
        } else {
            format!("by signal {status}")
        };
        Err(format!(
            "{} (pid {pid}) exited {how} during the run",
            self.name
        ))
    }
}

/// A process's user plus system CPU time from `/proc/<pid>/stat` (utime and stime, which sum
/// the thread group: every live thread, and the threads that have exited). Clock-tick
/// resolution, usually 10 ms.
pub fn process_cpu_time(pid: u32) -> Result<Duration, String> {
    let path = format!("/proc/{pid}/stat");
    let text = fs::read_to_string(&path).map_err(|e| format!("read {path}: {e}"))?;
    let ticks = stat_cpu_ticks(&text).ok_or_else(|| format!("{path}: no utime/stime in it"))?;
    // SAFETY: sysconf takes no pointers and only reads configuration.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks_per_second <= 0 {
        return Err("sysconf(_SC_CLK_TCK) failed".into());
    }
    Ok(Duration::from_secs_f64(
        ticks as f64 / ticks_per_second as f64,
    ))
}

/// CPU time of a process's threads by what they do, for CPU per request per thread kind.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ThreadCpu {
    /// The queue threads (vhost-user-backend's `vring_worker`s): parse, copy, publish.
    pub queue: Duration,
    /// The compression workers (`kcompressd-N`).
    pub worker: Duration,
    /// Every other thread (the control socket, writeback, the main thread, ...).
    pub other: Duration,
}

impl ThreadCpu {
    /// What was spent between `earlier` and `self`, kind by kind.
    pub fn since(self, earlier: ThreadCpu) -> ThreadCpu {
        ThreadCpu {
            queue: self.queue.saturating_sub(earlier.queue),
            worker: self.worker.saturating_sub(earlier.worker),
            other: self.other.saturating_sub(earlier.other),
        }
    }
}

/// The thread kind of a thread named `comm`.
fn thread_kind<'a>(cpu: &'a mut ThreadCpu, comm: &str) -> &'a mut Duration {
    if comm == "vring_worker" {
        &mut cpu.queue
    } else if comm.starts_with("kcompressd-") {
        &mut cpu.worker
    } else {
        &mut cpu.other
    }
}

/// utime + stime of every live thread of `pid` (`/proc/PID/task/TID/stat`), by kind. A thread
/// that exits between listing and reading is skipped; threads that exited earlier are not
/// counted (the kinds measured live as long as the device).
pub fn thread_cpu_times(pid: u32) -> Result<ThreadCpu, String> {
    let dir = format!("/proc/{pid}/task");
    // SAFETY: sysconf takes no pointers and only reads configuration.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks_per_second <= 0 {
        return Err("sysconf(_SC_CLK_TCK) failed".into());
    }
    let mut cpu = ThreadCpu::default();
    for entry in fs::read_dir(&dir).map_err(|e| format!("read {dir}: {e}"))? {
        let Ok(entry) = entry else { continue };
        let Ok(text) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (text.find('('), text.rfind(')')) else {
            continue;
        };
        let Some(ticks) = stat_cpu_ticks(&text) else {
            continue;
        };
        *thread_kind(&mut cpu, &text[open + 1..close]) +=
            Duration::from_secs_f64(ticks as f64 / ticks_per_second as f64);
    }
    Ok(cpu)
}

/// utime + stime, in clock ticks, from the text of `/proc/<pid>/stat`: fields 14 and 15,
/// counted after the command name, which is in parentheses and may itself hold spaces or ')'.
fn stat_cpu_ticks(text: &str) -> Option<u64> {
    let after_name = &text[text.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// A file that is deleted on drop.
pub struct FileGuard(PathBuf);

impl Drop for FileGuard {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// A kernel zram device this run made with `hot_add`; dropping it removes it with `hot_remove`.
pub struct KernelZram {
    id: u32,
}

/// Why a kernel zram device could not be set up.
#[derive(Debug)]
pub enum KernelZramError {
    /// The kernel's zram does not offer the algorithm; the list it offers.
    AlgorithmUnavailable(String),
    /// Something else failed.
    Failed(String),
}

const ZRAM_CONTROL: &str = "/sys/class/zram-control";

impl KernelZram {
    /// Whether this kernel can make zram devices.
    pub fn supported() -> bool {
        Path::new(ZRAM_CONTROL).join("hot_add").exists()
    }

    /// Adds a zram device with `algorithm` and `disksize` bytes.
    pub fn create(algorithm: &str, disksize: u64) -> Result<KernelZram, KernelZramError> {
        let failed = KernelZramError::Failed;
        let id_text = fs::read_to_string(Path::new(ZRAM_CONTROL).join("hot_add"))
            .map_err(|e| failed(format!("zram hot_add: {e}")))?;
        let id: u32 = id_text
            .trim()
            .parse()
            .map_err(|e| failed(format!("zram hot_add returned '{}': {e}", id_text.trim())))?;
        if id == 0 {
            // hot_add never hands out a device that exists, but zram0 belongs to the system:
            // neither use it nor remove it.
            return Err(failed(
                "zram hot_add returned zram0; refusing to touch it".into(),
            ));
        }
        // From here on the guard removes the device, whatever fails next.
        let device = KernelZram { id };
        let offered = fs::read_to_string(device.sysfs("comp_algorithm"))
            .map_err(|e| failed(format!("read comp_algorithm: {e}")))?;
        let available = offered
            .split_whitespace()
            .any(|name| name.trim_matches(|c| c == '[' || c == ']') == algorithm);
        if !available {
            return Err(KernelZramError::AlgorithmUnavailable(
                offered.trim().to_owned(),
            ));
        }
        device
            .write_sysfs("comp_algorithm", algorithm)
            .map_err(failed)?;
        device
            .write_sysfs("disksize", &disksize.to_string())
            .map_err(failed)?;
        Ok(device)
    }

    /// The device node.
    pub fn device_path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/zram{}", self.id))
    }

    /// The device's name, `zramN`.
    pub fn name(&self) -> String {
        format!("zram{}", self.id)
    }

    fn sysfs(&self, attribute: &str) -> PathBuf {
        PathBuf::from(format!("/sys/block/zram{}/{attribute}", self.id))
    }

    fn write_sysfs(&self, attribute: &str, value: &str) -> Result<(), String> {
        let path = self.sysfs(attribute);
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|mut file| file.write_all(value.as_bytes()))
            .map_err(|e| format!("write '{value}' to {}: {e}", path.display()))
    }

    /// The device's current `mm_stat`.
    pub fn mm_stat(&self) -> Result<MmStat, String> {
        let text =
            fs::read_to_string(self.sysfs("mm_stat")).map_err(|e| format!("mm_stat: {e}"))?;
        text.parse::<MmStat>().map_err(|e| e.to_string())
    }
}

impl Drop for KernelZram {
    fn drop(&mut self) {
        // The device may still be closing (an io_uring instance releases it asynchronously):
        // retry EBUSY for a while.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let result = fs::OpenOptions::new()
                .write(true)
                .open(Path::new(ZRAM_CONTROL).join("hot_remove"))
                .and_then(|mut file| file.write_all(self.id.to_string().as_bytes()));
            match result {
                Ok(()) => return,
                Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    eprintln!("warning: could not hot_remove zram{}: {e}", self.id);
                    return;
                }
            }
        }
    }
}

/// Which backend to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// vhost-user-zram, launched by the bench (its default compression workers).
    VhostUserZram,
    /// vhost-user-zram polling its queues for up to this many microseconds after serving
    /// (`--poll-max-us`), beside the default that does not poll.
    VhostUserZramPolling(u32),
    /// vhost-user-zram with `--workers 0`: the queue thread compresses every write.
    VhostUserZramInline,
    /// vhost-user-zram with `--workers 1` (in `--compare` when that is not the default).
    VhostUserZramOneWorker,
    /// vhost-user-zram with `--state` on a file in /dev/shm (`--compare-state`), beside the
    /// default that keeps its store in anonymous memory.
    VhostUserZramState,
    /// vhost-user-zram with `--reclaim-on-pressure` (`--compare-pressure`), beside the
    /// default without it: what watching memory pressure costs when there is none.
    VhostUserZramPressure,
    /// vhost-user-zram with `--unit-max` of this many pages (`--compare-units`; 1 is
    /// per-page, units off).
    VhostUserZramUnits(u32),
    /// A vhost-user-blk backend that was already running (`--socket`).
    External,
    /// The kernel's zram, through io_uring with O_DIRECT.
    KernelZram,
    /// qemu-storage-daemon's null-co driver: the transport ceiling.
    QsdNull,
    /// qemu-storage-daemon serving a file on /dev/shm.
    QsdShmFile,
}

impl BackendKind {
    /// The column header.
    pub fn label(self) -> String {
        match self {
            BackendKind::VhostUserZramInline => "vuz --workers 0".into(),
            BackendKind::VhostUserZramOneWorker => "vuz --workers 1".into(),
            BackendKind::VhostUserZramState => "vuz --state".into(),
            BackendKind::VhostUserZramPressure => "vuz --reclaim-on-pressure".into(),
            BackendKind::VhostUserZramUnits(1) => "per-page".into(),
            BackendKind::VhostUserZramUnits(pages) => format!("units {}K", pages * 4),
            BackendKind::VhostUserZram => "vhost-user-zram".into(),
            BackendKind::VhostUserZramPolling(max_us) => format!("vuz --poll {max_us}"),
            BackendKind::External => "socket".into(),
            BackendKind::KernelZram => "kernel-zram".into(),
            BackendKind::QsdNull => "qsd-null-co".into(),
            BackendKind::QsdShmFile => "qsd-shm-file".into(),
        }
    }

    /// The name in JSON output: the variant's name in kebab case (the polling window is the
    /// workload's `compare_poll_max_us`).
    pub fn json_name(self) -> &'static str {
        match self {
            BackendKind::VhostUserZram => "vhost-user-zram",
            BackendKind::VhostUserZramPolling(_) => "vhost-user-zram-polling",
            BackendKind::VhostUserZramInline => "vhost-user-zram-inline",
            BackendKind::VhostUserZramOneWorker => "vhost-user-zram-one-worker",
            BackendKind::VhostUserZramState => "vhost-user-zram-state",
            BackendKind::VhostUserZramPressure => "vhost-user-zram-pressure",
            BackendKind::VhostUserZramUnits(_) => "vhost-user-zram-units",
            BackendKind::External => "external",
            BackendKind::KernelZram => "kernel-zram",
            BackendKind::QsdNull => "qsd-null",
            BackendKind::QsdShmFile => "qsd-shm-file",
        }
    }

    /// The extra daemon arguments of a vhost-user-zram variant, `None` for other backends
    /// (the state variant's `--state PATH` is added where the file is made).
    pub fn daemon_variant_args(self) -> Option<Vec<String>> {
        let args: &[&str] = match self {
            BackendKind::VhostUserZram | BackendKind::VhostUserZramState => &[],
            BackendKind::VhostUserZramPolling(max_us) => {
                return Some(vec!["--poll-max-us".into(), max_us.to_string()]);
            }
            BackendKind::VhostUserZramInline => &["--workers", "0"],
            BackendKind::VhostUserZramOneWorker => &["--workers", "1"],
            BackendKind::VhostUserZramPressure => &["--reclaim-on-pressure"],
            BackendKind::VhostUserZramUnits(pages) => {
                return Some(vec![format!("--unit-max={}K", pages * 4)]);
            }
            BackendKind::External
            | BackendKind::KernelZram
            | BackendKind::QsdNull
            | BackendKind::QsdShmFile => return None,
        };
        Some(args.iter().map(|&arg| arg.to_owned()).collect())
    }

    /// Whether the backend is a vhost-user-zram the bench launched, whose CPU time goes to the
    /// crate's codec: its CPU per request is measured against the codec floor.
    pub fn runs_the_codec(self) -> bool {
        match self {
            BackendKind::VhostUserZram
            | BackendKind::VhostUserZramPolling(_)
            | BackendKind::VhostUserZramInline
            | BackendKind::VhostUserZramOneWorker
            | BackendKind::VhostUserZramState
            | BackendKind::VhostUserZramPressure
            | BackendKind::VhostUserZramUnits(_) => true,
            BackendKind::External
            | BackendKind::KernelZram
            | BackendKind::QsdNull
            | BackendKind::QsdShmFile => false,
        }
    }

    /// Whether the backend keeps what is written, so reads can be verified.
    pub fn keeps_data(self) -> bool {
        self != BackendKind::QsdNull
    }
}

impl serde::Serialize for BackendKind {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.json_name())
    }
}

/// What the bench needs to launch vhost-user-zram.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// The daemon binary.
    pub binary: PathBuf,
    /// `--algorithm`.
    pub algorithm: String,
    /// `--algorithm-level`.
    pub level: Option<i32>,
    /// `--queue-size`.
    pub queue_size: usize,
    /// Extra arguments passed through verbatim.
    pub extra_args: Vec<String>,
}

/// A running backend; dropping it tears the backend down.
pub struct Backend {
    /// Which backend this is.
    pub kind: BackendKind,
    /// How to reach it.
    pub transport: Transport,
    /// The process serving it, if the bench launched one.
    pub process: Option<ChildGuard>,
    /// vhost-user-zram's control socket, for `ctl mm_stat`.
    control_socket: Option<PathBuf>,
    daemon_binary: Option<PathBuf>,
    /// The kernel zram device, for its sysfs mm_stat.
    pub kernel_zram: Option<KernelZram>,
    /// How to start vhost-user-zram again on the same socket (and state file).
    relaunch: Option<Relaunch>,
    _backing_file: Option<FileGuard>,
}

/// The command that launched vhost-user-zram, to launch it again after a kill.
struct Relaunch {
    binary: PathBuf,
    args: Vec<std::ffi::OsString>,
    socket: PathBuf,
    log_stem: PathBuf,
    restarts: u32,
}

/// What a restart of vhost-user-zram measured, up to the socket accepting.
pub struct Restarted {
    /// When the new process was spawned.
    pub spawned: Instant,
    /// Spawn to the socket accepting a connection.
    pub accepting_after: Duration,
}

impl Backend {
    /// An already-running vhost-user-blk backend; `control` is vhost-user-zram's control
    /// socket, when it is one.
    pub fn external(socket: PathBuf, control: Option<PathBuf>, daemon_binary: PathBuf) -> Backend {
        Backend {
            kind: BackendKind::External,
            transport: Transport::VhostUser(socket),
            process: None,
            daemon_binary: control.as_ref().map(|_| daemon_binary),
            control_socket: control,
            kernel_zram: None,
            relaunch: None,
            _backing_file: None,
        }
    }

    /// Launches vhost-user-zram with a `size`-byte device and `queues` queues.
    pub fn vhost_user_zram(
        dir: &RunDir,
        kind: BackendKind,
        options: &DaemonOptions,
        size: u64,
        queues: usize,
    ) -> Result<Backend, String> {
        let variant = kind
            .daemon_variant_args()
            .ok_or("not a vhost-user-zram backend")?;
        let stem = if kind == BackendKind::VhostUserZramState {
            "vhost-user-zram-state".to_owned()
        } else {
            format!("vhost-user-zram{}", variant.concat())
        };
        Self::launch_vhost_user_zram(dir, kind, &stem, options, size, queues)
    }

    /// Launches vhost-user-zram as [`Backend::vhost_user_zram`] does, with its socket, control
    /// socket and log named after `stem` (two daemons of one kind side by side: `--migrate`).
    pub fn launch_vhost_user_zram(
        dir: &RunDir,
        kind: BackendKind,
        stem: &str,
        options: &DaemonOptions,
        size: u64,
        queues: usize,
    ) -> Result<Backend, String> {
        let variant = kind
            .daemon_variant_args()
            .ok_or("not a vhost-user-zram backend")?;
        let socket = dir.join(&format!("{stem}.sock"));
        let control = dir.join(&format!("{stem}.ctl"));
        let mut state_file = None;
        let mut command = Command::new(&options.binary);
        if kind == BackendKind::VhostUserZramState {
            // The daemon creates the file; it removes it itself when the frontend disconnects,
            // and the guard removes whatever a failed run leaves.
            let path = PathBuf::from(format!(
                "/dev/shm/vhost-user-zram-bench.{}.state",
                std::process::id()
            ));
            let _ = fs::remove_file(&path);
            command.arg("--state").arg(&path);
            state_file = Some(FileGuard(path));
        }
        command
            .arg("--socket-path")
            .arg(&socket)
            .arg("--size")
            .arg(size.to_string())
            .arg("--num-queues")
            .arg(queues.to_string())
            .arg("--queue-size")
            .arg(options.queue_size.to_string())
            .arg("--algorithm")
            .arg(&options.algorithm)
            .arg("--control-socket")
            .arg(&control)
            .args(&variant)
            .args(&options.extra_args);
        if let Some(level) = options.level {
            command.arg("--algorithm-level").arg(level.to_string());
        }
        let relaunch = Relaunch {
            binary: options.binary.clone(),
            args: command.get_args().map(ToOwned::to_owned).collect(),
            socket: socket.clone(),
            log_stem: dir.join(stem),
            restarts: 0,
        };
        let mut process =
            ChildGuard::spawn(&kind.label(), command, dir.join(&format!("{stem}.log")))?;
        process.wait_for_socket(&socket)?;
        Ok(Backend {
            kind,
            transport: Transport::VhostUser(socket),
            process: Some(process),
            control_socket: Some(control),
            daemon_binary: Some(options.binary.clone()),
            kernel_zram: None,
            relaunch: Some(relaunch),
            _backing_file: state_file,
        })
    }

    /// Kills vhost-user-zram with SIGKILL, as a crash would.
    pub fn kill_daemon(&mut self) -> Result<(), String> {
        if self.relaunch.is_none() {
            return Err("only a vhost-user-zram the bench launched can be restarted".into());
        }
        let process = self.process.as_mut().ok_or("the daemon is not running")?;
        match process.finish(Duration::ZERO) {
            Some(status) => Err(format!(
                "the daemon had already exited ({status}) before the kill"
            )),
            None => Ok(()),
        }
    }

    /// Starts vhost-user-zram again with the arguments it was first started with (the same
    /// socket, and state file), and waits until its socket accepts. The new process logs to a
    /// file of its own.
    pub fn restart_daemon(&mut self) -> Result<Restarted, String> {
        let relaunch = self
            .relaunch
            .as_mut()
            .ok_or("only a vhost-user-zram the bench launched can be restarted")?;
        relaunch.restarts += 1;
        let log = PathBuf::from(format!(
            "{}.restart{}.log",
            relaunch.log_stem.display(),
            relaunch.restarts
        ));
        let mut command = Command::new(&relaunch.binary);
        command.args(&relaunch.args);
        let spawned = Instant::now();
        let mut process = ChildGuard::spawn(&self.kind.label(), command, log)?;
        let result = process.wait_accepting(&relaunch.socket);
        let accepting_after = spawned.elapsed();
        self.process = Some(process);
        result?;
        Ok(Restarted {
            spawned,
            accepting_after,
        })
    }

    /// Launches qemu-storage-daemon exporting null-co (`kind` = QsdNull) or a file on /dev/shm
    /// (`kind` = QsdShmFile) as vhost-user-blk.
    pub fn qemu_storage_daemon(
        dir: &RunDir,
        kind: BackendKind,
        size: u64,
        queues: usize,
    ) -> Result<Backend, String> {
        let socket = dir.join(&format!("{}.sock", kind.label()));
        let mut backing_file = None;
        let blockdev = match kind {
            BackendKind::QsdNull => {
                format!("driver=null-co,node-name=disk,size={size},read-zeroes=off")
            }
            BackendKind::QsdShmFile => {
                let path = PathBuf::from(format!(
                    "/dev/shm/vhost-user-zram-bench.{}.img",
                    std::process::id()
                ));
                let file = fs::File::create(&path)
                    .map_err(|e| format!("create {}: {e}", path.display()))?;
                backing_file = Some(FileGuard(path.clone()));
                file.set_len(size)
                    .map_err(|e| format!("size {}: {e}", path.display()))?;
                format!("driver=file,node-name=disk,filename={}", path.display())
            }
            _ => unreachable!("not a qemu-storage-daemon backend"),
        };
        let mut command = Command::new("qemu-storage-daemon");
        command.arg("--blockdev").arg(blockdev).arg("--export").arg(format!(
            "type=vhost-user-blk,id=export,node-name=disk,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
            socket.display()
        ));
        let mut process = ChildGuard::spawn(
            &kind.label(),
            command,
            dir.join(&format!("{}.log", kind.label())),
        )?;
        process.wait_for_socket(&socket)?;
        Ok(Backend {
            kind,
            transport: Transport::VhostUser(socket),
            process: Some(process),
            control_socket: None,
            daemon_binary: None,
            kernel_zram: None,
            relaunch: None,
            _backing_file: backing_file,
        })
    }

    /// Makes a kernel zram device with `algorithm` and `size` bytes.
    pub fn kernel_zram(algorithm: &str, size: u64) -> Result<Backend, KernelZramError> {
        let device = KernelZram::create(algorithm, size)?;
        Ok(Backend {
            kind: BackendKind::KernelZram,
            transport: Transport::IoUring(device.device_path()),
            process: None,
            control_socket: None,
            daemon_binary: None,
            kernel_zram: Some(device),
            relaunch: None,
            _backing_file: None,
        })
    }

    /// The CPU time of the backend's process so far; `None` for a backend the bench did not
    /// launch as a process (kernel zram works in the bench's own context, an external socket
    /// is someone else's).
    pub fn cpu_time(&self) -> Option<Result<Duration, String>> {
        self.process.as_ref().and_then(ChildGuard::cpu_time)
    }

    /// The CPU time of the backend's process's live threads by kind, when the bench launched
    /// the process.
    pub fn thread_cpu(&self) -> Option<Result<ThreadCpu, String>> {
        self.process.as_ref().and_then(ChildGuard::thread_cpu)
    }

    /// What the backend's process (the latest, after a restart) has logged so far.
    pub fn daemon_log(&self) -> Option<String> {
        self.process.as_ref().map(ChildGuard::log_text)
    }

    /// vhost-user-zram's control socket, when the backend has one.
    pub fn control_socket(&self) -> Option<&Path> {
        self.control_socket.as_deref()
    }

    /// Tells, from any thread, whether the backend's process has exited.
    pub fn exit_probe(&self) -> ExitProbe {
        self.process
            .as_ref()
            .map_or_else(ExitProbe::none, ChildGuard::exit_probe)
    }

    /// The backend's zram statistics, when it has any.
    pub fn mm_stat(&self) -> Option<Result<MemorySnapshot, String>> {
        if let Some(device) = &self.kernel_zram {
            return Some(device.mm_stat().map(|mm| MemorySnapshot {
                mm,
                slot_table_bytes: None,
                units: None,
            }));
        }
        let (binary, control) = (self.daemon_binary.as_ref()?, self.control_socket.as_ref()?);
        let output = Command::new(binary)
            .arg("ctl")
            .arg("--control-socket")
            .arg(control)
            .arg("stats")
            .arg("--json")
            .stdin(Stdio::null())
            .output();
        Some(match output {
            Ok(output) if output.status.success() => {
                MemorySnapshot::from_stats_json(&String::from_utf8_lossy(&output.stdout))
            }
            Ok(output) => Err(format!(
                "ctl stats --json: {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )),
            Err(e) => Err(format!("run {} ctl: {e}", binary.display())),
        })
    }
}

impl Backend {
    /// Waits (at most `limit`) until vhost-user-zram has compressed every pending page and
    /// given its pool's memory back, so that memory figures and a following burst do not
    /// depend on how far its workers got. Other backends have nothing to wait for.
    pub fn wait_drained(&self, limit: Duration) -> Result<(), String> {
        let (Some(binary), Some(control)) = (&self.daemon_binary, &self.control_socket) else {
            return Ok(());
        };
        let deadline = Instant::now() + limit;
        loop {
            let output = Command::new(binary)
                .args(["ctl", "--control-socket"])
                .arg(control)
                .args(["stats", "--json"])
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("run {} ctl: {e}", binary.display()))?;
            let stats: Stats = serde_json::from_slice(&output.stdout)
                .map_err(|e| format!("ctl stats --json: {e}"))?;
            if stats.workers.pending_pages == 0 && stats.workers.pool_resident_bytes == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} pages still pending after {limit:?}",
                    stats.workers.pending_pages
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A backend's memory figures at one moment.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct MemorySnapshot {
    /// zram's mm_stat.
    #[serde(flatten)]
    pub mm: MmStat,
    /// vhost-user-zram's slot table, which its mem_used_total includes; kernel zram's
    /// mem_used_total counts only zsmalloc's pages, not its table.
    pub slot_table_bytes: Option<u64>,
    /// vhost-user-zram's multi-page units (`None`: kernel zram, or a daemon without units).
    pub units: Option<UnitStats>,
}

impl MemorySnapshot {
    /// Reads vhost-user-zram's `ctl stats --json`: `{"mm": {mm_stat fields}, "info":
    /// {"slot_table_bytes": N, ...}, "units": {...}, ...}`.
    fn from_stats_json(text: &str) -> Result<MemorySnapshot, String> {
        let stats: Stats = serde_json::from_str(text)
            .map_err(|e| format!("stats --json: {e}: '{}'", text.trim()))?;
        Ok(MemorySnapshot {
            mm: stats.mm,
            slot_table_bytes: Some(stats.info.slot_table_bytes),
            // A daemon from before units reports none: its `units` are all zero.
            units: (stats.units.unit_max_bytes > 0).then_some(stats.units),
        })
    }
}

/// The pages and the milliseconds of vhost-user-zram's log line `state NAME: recovered N pages
/// of WHOSE in X ms`.
pub fn parse_recovered(log: &str) -> Option<(u64, f64)> {
    let line = log
        .lines()
        .find(|l| l.contains(": recovered ") && l.contains(" pages of "))?;
    let after = &line[line.find(": recovered ")? + ": recovered ".len()..];
    let pages = after.split_whitespace().next()?.parse().ok()?;
    let tail = &after[after.rfind(" in ")? + " in ".len()..];
    let ms = tail.strip_suffix("ms")?.trim().parse().ok()?;
    Some((pages, ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recovery_line_gives_pages_and_milliseconds() {
        let log = "[2026-12-06T22:00:00Z INFO  vhost_user_zram::daemon] state /dev/shm/x.state: \
                   recovered 1048576 pages of frontend pid 42 (started at tick 7) in 312.5 ms\n\
                   [.. INFO ..] listening";
        assert_eq!(parse_recovered(log), Some((1_048_576, 312.5)));
        assert_eq!(
            parse_recovered("state x: new; the guest's pages will outlive"),
            None
        );
    }

    #[test]
    fn stats_json_gives_mm_and_the_slot_table() {
        let json = r#"{"mm":{"orig_data_size":8192,"compr_data_size":100,"mem_used_total":5000,
            "mem_limit":0,"mem_used_max":6000,"same_pages":1,"pages_compacted":0,"huge_pages":0,
            "huge_pages_since":0},"io":{},"info":{"slot_table_bytes":4096}}"#;
        let snapshot = MemorySnapshot::from_stats_json(json).expect("valid");
        assert_eq!(snapshot.mm.orig_data_size, 8192);
        assert_eq!(snapshot.mm.mem_used_max, 6000);
        assert_eq!(snapshot.slot_table_bytes, Some(4096));
        assert!(MemorySnapshot::from_stats_json(r#"{"mm":{}}"#).is_err());
    }

    #[test]
    fn stat_cpu_ticks_sums_utime_and_stime_past_a_name_with_spaces_and_parens() {
        let stat = "4242 (qemu (sto) d) S 1 4242 4242 0 -1 4194560 1000 0 0 0 \
                    170 30 0 0 20 0 5 0 12345 1000000 500 18446744073709551615";
        assert_eq!(stat_cpu_ticks(stat), Some(200));
        assert_eq!(stat_cpu_ticks("1 (x) S 1 2"), None);
    }

    #[test]
    fn this_process_has_used_some_cpu_time() {
        let spent = process_cpu_time(std::process::id()).expect("own /proc stat");
        assert!(spent < Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod thread_cpu_tests {
    use super::*;

    #[test]
    fn threads_are_counted_by_kind_and_this_process_has_some_cpu() {
        let mut cpu = ThreadCpu::default();
        *thread_kind(&mut cpu, "vring_worker") += Duration::from_millis(3);
        *thread_kind(&mut cpu, "kcompressd-0") += Duration::from_millis(2);
        *thread_kind(&mut cpu, "kcompressd-12") += Duration::from_millis(2);
        *thread_kind(&mut cpu, "writeback") += Duration::from_millis(1);
        assert_eq!(
            cpu,
            ThreadCpu {
                queue: Duration::from_millis(3),
                worker: Duration::from_millis(4),
                other: Duration::from_millis(1),
            }
        );
        // Burn a little CPU on a named thread and find it under "other".
        let spun = std::thread::Builder::new()
            .name("spinner".into())
            .spawn(|| {
                let started = std::time::Instant::now();
                let mut x = 0u64;
                while started.elapsed() < Duration::from_millis(50) {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
                thread_cpu_times(std::process::id()).unwrap()
            })
            .unwrap()
            .join()
            .unwrap();
        assert!(spun.other > Duration::ZERO, "{spun:?}");
        assert_eq!((spun.queue, spun.worker), (Duration::ZERO, Duration::ZERO));
        let later = ThreadCpu {
            queue: Duration::from_millis(5),
            ..cpu
        };
        assert_eq!(later.since(cpu).queue, Duration::from_millis(2));
    }
}
