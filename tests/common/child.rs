// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The built daemon as a child process: started on a socket in a temporary directory of its
//! own, waited for by polling its sockets, driven through `vhost-user-zram ctl`, stopped with
//! SIGTERM, and killed and reaped if a test ends without stopping it.
//!
//! Everything the daemon writes to stderr is kept (for the tests' assertions and the panic
//! messages here) and passed on to the test's own stderr, so a failed test shows its log.

use std::ffi::{OsStr, OsString};
use std::fmt::Display;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vhost_user_zram::store::{IoStat, MmStat, Stats};

/// The daemon binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-zram");

/// How long the daemon gets to listen, to log a line, or to exit.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// How often the waits here look again.
const POLL: Duration = Duration::from_millis(5);

/// Runs the binary once with `args` to its end: for command lines that are refused, `ctl` runs
/// without a daemon, and the like.
pub fn run<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run vhost-user-zram")
}

/// Runs `command` to its end like [`run`], but kills it and fails the test if it runs longer
/// than `limit`: for command lines a daemon must refuse rather than serve.
pub fn output_within(mut command: Command, limit: Duration) -> Output {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vhost-user-zram");
    let pid = child.id();
    let (done, waited) = std::sync::mpsc::channel();
    let waiter = thread::spawn(move || {
        let output = child.wait_with_output();
        let _ = done.send(());
        output
    });
    if waited.recv_timeout(limit).is_err() {
        let pid = libc::pid_t::try_from(pid).expect("a pid");
        // SAFETY: kill(2) takes no pointers; `pid` is our child, not reaped yet (the waiter
        // has not returned).
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let output = waiter.join().expect("the waiter").expect("wait");
        panic!(
            "{command:?} still ran after {limit:?}; killed it; stderr:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    waiter.join().expect("the waiter").expect("wait")
}

/// Where the daemon is told to serve its control socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlSocket {
    /// `--control-socket DIR/control.sock`.
    InDir,
    /// No option: the daemon's default, the socket path with `.ctl` appended.
    Implied,
    /// `--control-socket none`.
    Off,
}

/// How to start a [`DaemonProcess`]: `--socket-path DIR/vhost-user.sock`, `--size 16M` and a
/// control socket in `DIR` unless told otherwise, then the extra arguments.
pub struct DaemonOptions {
    dir: tempfile::TempDir,
    socket: PathBuf,
    size: String,
    control: ControlSocket,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    passed: Option<(std::os::fd::OwnedFd, String)>,
    cgroup_procs: Option<PathBuf>,
}

impl DaemonOptions {
    /// `--size SIZE` (bytes, or with a suffix).
    pub fn size(mut self, size: impl Display) -> Self {
        self.size = size.to_string();
        self
    }

    pub fn control_socket(mut self, control: ControlSocket) -> Self {
        self.control = control;
        self
    }

    /// Arguments after the socket, size and control socket options.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Listen at `path` instead of a socket in the options' own directory (a restart on the
    /// socket of an earlier daemon).
    pub fn socket_at(mut self, path: &Path) -> Self {
        self.socket = path.to_owned();
        self
    }

    /// Sets an environment variable of the daemon.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Passes `fd` to the daemon as systemd passes a stored fd: as fd 3, with `LISTEN_FDS=1`,
    /// `LISTEN_FDNAMES=name` and `LISTEN_PID` the daemon's own pid (set by a shell that then
    /// execs the daemon, so the pid is the daemon's).
    pub fn pass_fd(mut self, fd: std::os::fd::OwnedFd, name: &str) -> Self {
        self.passed = Some((fd, name.to_owned()));
        self
    }

    /// Starts the daemon in the cgroup whose `cgroup.procs` is `procs`: the child moves itself
    /// there before it execs, so everything the daemon allocates is charged to that cgroup.
    pub fn in_cgroup(mut self, procs: &Path) -> Self {
        self.cgroup_procs = Some(procs.to_owned());
        self
    }

    /// The socket path the daemon will be given, for a test that puts something there first.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Spawns the daemon and returns at once, for a test of a daemon that refuses to start.
    pub fn spawn(self) -> DaemonProcess {
        let mut command = match &self.passed {
            None => Command::new(BIN),
            Some((fd, name)) => {
                use std::os::fd::AsRawFd;
                use std::os::unix::process::CommandExt;
                let mut command = Command::new("sh");
                command
                    .args(["-c", r#"export LISTEN_PID=$$; exec "$0" "$@""#, BIN])
                    .env("LISTEN_FDS", "1")
                    .env("LISTEN_FDNAMES", name);
                let raw = fd.as_raw_fd();
                // SAFETY: between fork and exec the closure only calls dup2 and fcntl, which
                // are async-signal-safe, on an fd this process owns (kept open by `self`).
                unsafe {
                    command.pre_exec(move || {
                        if raw != 3 && libc::dup2(raw, 3) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        // dup2 leaves the copy inheritable; fd 3 itself may have been CLOEXEC.
                        if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                command
            }
        };
        if let Some(procs) = &self.cgroup_procs {
            use std::os::unix::ffi::OsStrExt;
            use std::os::unix::process::CommandExt;
            let procs = std::ffi::CString::new(procs.as_os_str().as_bytes()).expect("no NUL");
            // SAFETY: between fork and exec the closure only calls open, write and close,
            // which are async-signal-safe, on a path allocated before the fork (`procs`, moved
            // into the closure). Writing "0" to cgroup.procs moves the writing process.
            unsafe {
                command.pre_exec(move || {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let written = libc::write(fd, b"0\n".as_ptr().cast(), 2);
                    let error = std::io::Error::last_os_error();
                    libc::close(fd);
                    if written != 2 {
                        return Err(error);
                    }
                    Ok(())
                });
            }
        }
        command.envs(self.envs.iter().map(|(k, v)| (k, v)));
        command
            .arg("--socket-path")
            .arg(&self.socket)
            .args(["--size", &self.size]);
        let control = match self.control {
            ControlSocket::InDir => {
                let path = self.dir.path().join("control.sock");
                command.arg("--control-socket").arg(&path);
                Some(path)
            }
            ControlSocket::Implied => {
                let mut path = self.socket.clone().into_os_string();
                path.push(".ctl");
                Some(PathBuf::from(path))
            }
            ControlSocket::Off => {
                command.args(["--control-socket", "none"]);
                None
            }
        };
        let mut child = command
            .args(&self.args)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vhost-user-zram");
        let (log, reader) = collect_stderr(&mut child);
        DaemonProcess {
            child,
            exited: None,
            socket: self.socket,
            control,
            log,
            reader: Some(reader),
            dir: self.dir,
        }
    }

    /// Spawns the daemon and waits until its socket and its control socket (if it has one)
    /// accept connections.
    pub fn start(self) -> DaemonProcess {
        let mut daemon = self.spawn();
        daemon.wait_until_listening(&daemon.socket.clone());
        if let Some(control) = daemon.control.clone() {
            daemon.wait_until_listening(&control);
        }
        daemon
    }
}

/// Reads `child`'s piped stderr on a thread into the returned buffer, and passes it on to ours.
fn collect_stderr(child: &mut Child) -> (Arc<Mutex<Vec<u8>>>, JoinHandle<()>) {
    let mut pipe = child.stderr.take().expect("stderr piped");
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&log);
    let reader = thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(read @ 1..) = pipe.read(&mut chunk) {
            let _ = std::io::stderr().write_all(&chunk[..read]);
            sink.lock().unwrap().extend_from_slice(&chunk[..read]);
        }
    });
    (log, reader)
}

/// How a [`DaemonProcess`] ended.
#[derive(Debug)]
pub struct Exited {
    pub status: ExitStatus,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

/// A running daemon binary; killed and reaped on drop unless it exited.
pub struct DaemonProcess {
    child: Child,
    exited: Option<ExitStatus>,
    /// Its vhost-user socket.
    pub socket: PathBuf,
    control: Option<PathBuf>,
    log: Arc<Mutex<Vec<u8>>>,
    reader: Option<JoinHandle<()>>,
    /// Removed after the daemon is reaped (fields drop after `Drop::drop`).
    dir: tempfile::TempDir,
}

impl DaemonProcess {
    /// The defaults of [`DaemonOptions`], to change before starting.
    pub fn options() -> DaemonOptions {
        let dir = tempfile::tempdir().expect("temp dir");
        DaemonOptions {
            socket: dir.path().join("vhost-user.sock"),
            dir,
            size: "16M".to_owned(),
            control: ControlSocket::InDir,
            args: Vec::new(),
            envs: Vec::new(),
            passed: None,
            cgroup_procs: None,
        }
    }

    /// Starts a daemon with a `size` device, a control socket and `args`, and waits until it
    /// listens.
    pub fn start(size: impl Display, args: &[&str]) -> DaemonProcess {
        Self::options().size(size).args(args).start()
    }

    /// Its control socket; panics if it was started without one.
    pub fn control(&self) -> &Path {
        self.control
            .as_deref()
            .expect("the daemon was started without a control socket")
    }

    /// The temporary directory of its sockets.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Polls until `path` accepts a connection; panics, with the daemon's stderr, if it exits
    /// first or [`PATIENCE`] passes. The connection closes without a message: a liveness probe
    /// the daemon ignores.
    pub fn wait_until_listening(&mut self, path: &Path) {
        let deadline = Instant::now() + PATIENCE;
        while UnixStream::connect(path).is_err() {
            if let Some(status) = self.try_exit() {
                panic!(
                    "the daemon exited with {status} before listening on {}; stderr:\n{}",
                    path.display(),
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not listen on {} within {PATIENCE:?}; stderr:\n{}",
                path.display(),
                self.stderr()
            );
            thread::sleep(POLL);
        }
    }

    /// Runs `vhost-user-zram ctl --control-socket CONTROL ARGS` to its end.
    pub fn ctl_output(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("ctl")
            .arg("--control-socket")
            .arg(self.control())
            .args(args)
            .output()
            .expect("run ctl")
    }

    /// Like [`DaemonProcess::ctl_output`], for a command that must succeed: its stdout.
    pub fn ctl(&self, args: &[&str]) -> String {
        let output = self.ctl_output(args);
        assert!(
            output.status.success(),
            "ctl {args:?} failed with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("ctl prints UTF-8")
    }

    /// `stats --json`, parsed.
    pub fn stats(&self) -> Stats {
        serde_json::from_str(&self.ctl(&["stats", "--json"])).expect("stats --json parses")
    }

    /// zram's `mm_stat` line, parsed, once the compression workers have compressed every pending page (so
    /// the figures do not depend on how far they got).
    pub fn mm_stat(&self) -> MmStat {
        let deadline = Instant::now() + PATIENCE;
        while self.stats().workers.pending_pages > 0 {
            assert!(
                Instant::now() < deadline,
                "pages still pending after {PATIENCE:?}"
            );
            thread::sleep(POLL);
        }
        let n: [u64; 9] = self.ctl_columns("mm_stat");
        MmStat {
            orig_data_size: n[0],
            compr_data_size: n[1],
            mem_used_total: n[2],
            mem_limit: n[3],
            mem_used_max: n[4],
            same_pages: n[5],
            pages_compacted: n[6],
            huge_pages: n[7],
            huge_pages_since: n[8],
        }
    }

    /// zram's `io_stat` line, parsed.
    pub fn io_stat(&self) -> IoStat {
        let [failed_reads, failed_writes, invalid_io, notify_free] = self.ctl_columns("io_stat");
        IoStat {
            failed_reads,
            failed_writes,
            invalid_io,
            notify_free,
        }
    }

    /// The numbers of a one-line `ctl` answer such as `mm_stat`'s, which must have `N`.
    pub fn ctl_columns<const N: usize>(&self, command: &str) -> [u64; N] {
        let line = self.ctl(&[command]);
        let numbers: Vec<u64> = line
            .split_whitespace()
            .map(|n| {
                n.parse()
                    .unwrap_or_else(|e| panic!("{command}: '{line}': {e}"))
            })
            .collect();
        numbers
            .try_into()
            .unwrap_or_else(|_| panic!("{command} has {N} columns: '{line}'"))
    }

    /// Sends `signal` to the daemon, which must not have been reaped.
    pub fn signal(&self, signal: libc::c_int) {
        assert!(self.exited.is_none(), "signal to a daemon that exited");
        let pid = libc::pid_t::try_from(self.child.id()).expect("a pid");
        // SAFETY: kill(2) takes no pointers; `pid` is our unreaped child's.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// What the daemon has written to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().unwrap()).into_owned()
    }

    /// Polls until the daemon has logged `needle`; panics after [`PATIENCE`].
    pub fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + PATIENCE;
        while !self.stderr().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "the daemon never logged {needle:?}; stderr:\n{}",
                self.stderr()
            );
            thread::sleep(POLL);
        }
    }

    /// Its exit status if it has exited (and is reaped now), without waiting.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("try_wait");
        }
        self.exited
    }

    /// Waits for the daemon to exit by itself; panics, with its stderr, after [`PATIENCE`].
    pub fn wait_exit(&mut self) -> Exited {
        match self.exit_within(PATIENCE) {
            Some(exited) => exited,
            None => panic!(
                "the daemon did not exit within {PATIENCE:?}; stderr:\n{}",
                self.stderr()
            ),
        }
    }

    /// Waits for the daemon to exit by itself, as it does when its frontend hangs up, and
    /// asserts that it exited with status 0; returns its stderr.
    pub fn expect_clean_exit(&mut self) -> String {
        let exited = self.wait_exit();
        assert!(
            exited.status.success(),
            "the daemon exited with {}; stderr:\n{}",
            exited.status,
            exited.stderr
        );
        exited.stderr
    }

    /// Stops the daemon with SIGTERM and waits for it to exit. One that is still running after
    /// [`PATIENCE`] is killed, and the test fails with its stderr.
    pub fn stop(&mut self) -> Exited {
        if self.try_exit().is_none() {
            self.signal(libc::SIGTERM);
        }
        if let Some(exited) = self.exit_within(PATIENCE) {
            return exited;
        }
        let _ = self.child.kill();
        self.exited = self.child.wait().ok();
        panic!(
            "the daemon did not exit within {PATIENCE:?} of SIGTERM; killed it; stderr:\n{}",
            self.stderr()
        );
    }

    /// Polls up to `limit` for the daemon to exit; then waits for the end of its stderr.
    fn exit_within(&mut self, limit: Duration) -> Option<Exited> {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.try_exit() {
                break status;
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(POLL);
        };
        if let Some(reader) = self.reader.take() {
            reader.join().expect("the stderr reader");
        }
        Some(Exited {
            status,
            stderr: self.stderr(),
        })
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
