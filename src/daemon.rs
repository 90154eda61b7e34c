// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon's lifecycle: sockets, the one frontend connection, shutdown.
//!
//! One daemon serves one device for one VM lifetime, as virtiofsd does:
//!
//! 1. [`Daemon::new`] creates the store and binds the vhost-user socket (or takes a listening
//!    one from `--fd`) and the control socket, so every configuration error shows before the
//!    daemon reports readiness.
//! 2. [`Daemon::run`] waits for the frontend, serves it, and returns `Ok` when it disconnects.
//!    A guest reboot (virtio reset) happens inside the connection and keeps the data. A
//!    connection that closes without sending one vhost-user message (a liveness probe, see
//!    below) is not the frontend: the daemon keeps waiting.
//! 3. Returning frees the store; the process then exits, so no data of one connection is ever
//!    visible to another.
//!
//! A [`StopSignal`] ([`Daemon::stop_handle`]; SIGTERM/SIGINT through
//! [`Daemon::handle_signals`], or a test) ends the daemon at any point; `run` then returns `Ok` and the socket files are removed. Stopping while the
//! frontend is connected throws the guest's data away (its swap fails at the next swap-in),
//! so `run` then logs a warning naming what was lost.
//!
//! Signals ([`Daemon::handle_signals`]): SIGTERM and SIGINT stop the daemon; SIGHUP is logged and
//! ignored (there is no configuration file or log file to reopen); SIGUSR1 logs a statistics
//! summary. A SIGBUS, which a frontend causes by shrinking a file that backs guest memory after
//! sharing it, cannot be survived: [`exit_cleanly_on_sigbus`] installs a handler that says so
//! on stderr, removes the socket files and exits with status 1, so the daemon never dies
//! silently or leaves sockets behind.
//!
//! Logging: the configuration at start; each connection at debug; when the frontend goes away,
//! the features it negotiated and what the store held ([`stats_summary`]).
//!
//! Socket files: a path held by a live daemon (a connect succeeds) is refused; a socket file
//! nobody listens on (connect is refused) is stale and replaced; anything that is not a socket
//! is left alone. The socket is created with `--socket-mode` (default 0600) and never exists
//! with wider permissions: the mode is set on the socket before `bind` creates the file.

use std::ffi::{CString, OsStr};
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use log::{debug, error, info, warn};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestAddressSpace, GuestMemoryBackend};

use crate::blk::backend::{GuestMap, GuestMemory};
use crate::blk::config::feature_names;
use crate::blk::request_stats::RequestStats;
use crate::blk::{BlkBackend, BlockBackend, Continuity, DeviceConfig, QueueHooks};
use crate::control::ControlServer;
use crate::metrics::MetricsServer;
use crate::migrate::{Endpoint, Token};
use crate::migrating::Migrations;
use crate::observed::Observed;
use crate::pressure::{Findings, PressureConfig, PressureDaemon, PressureState};
use crate::recompress::{BackgroundRecompressor, RecompressConfig};
use crate::stop::{Readiness, StopSignal, Threads, STOP_BOUND};
use crate::store::backing::{BackingFile, ForeignData};
use crate::store::stats::Stats;
use crate::store::{
    FrontendIdentity, PageStore, PendingConfig, RecompressError, StateError, StateFile, StateStart,
    StoreConfig, StoreError, StoreMemory,
};
use crate::workers::CompressWorkers;
use crate::writeback::{WritebackConfig, WritebackDaemon};
use crate::PAGE_SIZE;

/// How long the daemon, at its exit, waits for every thread it started to stop.
pub const EXIT_BOUND: std::time::Duration = STOP_BOUND;

/// The default mode of the vhost-user and control sockets (each has its own option).
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// Where the vhost-user socket comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenOn {
    /// Create and bind a socket at this path.
    Path(PathBuf),
    /// Use this already-listening socket (socket activation).
    Fd(RawFd),
}

/// Everything the daemon needs.
pub struct DaemonConfig {
    /// The vhost-user socket.
    pub listen: ListenOn,
    /// Mode of the vhost-user socket file (`--socket-mode`).
    pub socket_mode: u32,
    /// Mode of the control socket file (`--control-socket-mode`).
    pub control_socket_mode: u32,
    /// The store.
    pub store: StoreConfig,
    /// Compression workers and their pending pool.
    pub pending: PendingConfig,
    /// The largest multi-page unit, in pages (`--unit-max`): a power of two from 1 (units off)
    /// to [`MAX_UNIT_MEMBERS`](crate::store::MAX_UNIT_MEMBERS).
    pub unit_max_pages: usize,
    /// CPUs to pin the compression workers to (none: not pinned).
    pub worker_cpus: Vec<usize>,
    /// How long a queue thread may poll its ring after serving (zero: it never polls).
    pub poll_max: Duration,
    /// The device as the guest sees it.
    pub device: DeviceConfig,
    /// Where to serve the control protocol, if anywhere.
    pub control_socket: Option<PathBuf>,
    /// Where to serve the metrics over HTTP, if anywhere (the caller has vetted the address).
    pub metrics_listen: Option<SocketAddr>,
    /// Secondary algorithms and background recompression.
    pub recompress: RecompressConfig,
    /// The backing file, writeback policies and the idle clock.
    pub writeback: WritebackConfig,
    /// Memory pressure (`--reclaim-on-pressure`); the memory cgroup's limit is honoured
    /// whatever it says.
    pub pressure: PressureConfig,
    /// Where the store's state lives so that it outlives the process (`--state`,
    /// `--state-fdstore`); `None`: anonymous memory, gone with the process.
    pub state: Option<StateSource>,
    /// Live migration: receiving the pages (`--incoming`) and the token both sides prove.
    pub migration: MigrationConfig,
}

/// Live migration's settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationConfig {
    /// Receive the store's pages from a migrating daemon here before serving (`--incoming`).
    pub incoming: Option<Endpoint>,
    /// How long a queue's start waits for the incoming stream to be complete.
    pub incoming_timeout: Duration,
    /// The file holding the token both daemons of a migration prove (`--migrate-token`).
    pub token: Option<PathBuf>,
}

/// Where a state file comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateSource {
    /// A file on tmpfs or hugetlbfs (`--state PATH`).
    Path(PathBuf),
    /// A memfd in systemd's file descriptor store under this name (`--state-fdstore NAME`).
    FdStore(String),
}

/// Why the daemon could not start or failed while running.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A stop (SIGTERM, SIGINT, [`StopSignal::stop`]) came while the daemon was starting.
    #[error("stopped by request while starting")]
    Stopped,
    /// The socket path's directory does not exist (or is not a directory).
    #[error("the directory {} of {role} {} does not exist", .directory.display(), .path.display())]
    MissingDirectory {
        /// Which socket.
        role: SocketRole,
        /// The socket path.
        path: PathBuf,
        /// Its directory.
        directory: PathBuf,
    },
    /// Another daemon is serving the socket path.
    #[error("{role} {} is in use by a running daemon", .path.display())]
    SocketInUse {
        /// Which socket.
        role: SocketRole,
        /// The socket path.
        path: PathBuf,
    },
    /// The path exists and is not a socket.
    #[error("{role} {} exists and is not a socket; refusing to replace it", .path.display())]
    NotASocket {
        /// Which socket.
        role: SocketRole,
        /// The socket path.
        path: PathBuf,
    },
    /// The path is longer than a Unix socket address allows.
    #[error("{role} {} is longer than the 107 bytes a Unix socket address holds", .path.display())]
    PathTooLong {
        /// Which socket.
        role: SocketRole,
        /// The socket path.
        path: PathBuf,
    },
    /// Creating or binding the socket failed.
    #[error("cannot create {role} {}", .path.display())]
    Bind {
        /// Which socket.
        role: SocketRole,
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `--mem-limit` is below what the empty store needs.
    #[error(
        "--mem-limit {} is below the {} the empty store of this device needs (its pending pool and the slot table's bitmap of used pages); give at least that, or leave --mem-limit out",
        bytes_human(*.limit),
        bytes_human(*.needed)
    )]
    MemLimitTooLow {
        /// The limit asked for, bytes.
        limit: u64,
        /// What the empty store uses, bytes.
        needed: u64,
    },
    /// `--fd` names no listening Unix socket.
    #[error("file descriptor {fd} is not a listening Unix socket")]
    BadFd {
        /// The descriptor.
        fd: RawFd,
    },
    /// The store could not be created.
    #[error("cannot create the page store")]
    Store(#[source] StoreError),
    /// The store and device disagree on the capacity.
    #[error("the store holds {store} pages but the device announces {device}")]
    CapacityMismatch {
        /// The store's capacity.
        store: u64,
        /// The device's capacity.
        device: u64,
    },
    /// The recompression settings are not valid.
    #[error("--recompress-algorithm cannot be used")]
    Recompress(#[source] RecompressError),
    /// `--zstd-dict` names something that is not a dictionary file.
    #[error("--zstd-dict {} {problem}", .path.display())]
    DictionaryFile {
        /// The path given.
        path: PathBuf,
        /// What is wrong, as the end of a sentence.
        problem: String,
    },
    /// The zstd dictionary cannot be loaded.
    #[error("--zstd-dict {} cannot be used", .path.display())]
    ZstdDictionary {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: RecompressError,
    },
    /// The zstd dictionary file cannot be read.
    #[error("cannot read --zstd-dict {}", .path.display())]
    ReadDictionary {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The backing file cannot be used.
    #[error("cannot use the backing file {}", path.display())]
    BackingFile {
        /// The path given.
        path: PathBuf,
        /// Why.
        #[source]
        source: crate::store::backing::BackingError,
    },
    /// The state file cannot be used (`--state`, `--state-fdstore`); it is left untouched.
    #[error(transparent)]
    State(StoreError),
    /// `--state-fdstore` outside systemd: there is no file descriptor store to keep it in.
    #[error(
        "--state-fdstore {0} needs systemd's file descriptor store (NOTIFY_SOCKET is not set); outside systemd use --state PATH on tmpfs"
    )]
    NoFdStore(String),
    /// The state's pages lie partly on a backing file this start does not name.
    #[error(
        "the state keeps pages on the backing file {}; start with --backing-file {} (it was {})",
        recorded.display(),
        recorded.display(),
        match given { Some(path) => path.display().to_string(), None => "not given".to_owned() }
    )]
    StateBackingFile {
        /// The backing file the state records.
        recorded: PathBuf,
        /// The one this start names, if any.
        given: Option<PathBuf>,
    },
    /// The writeback thread could not start.
    #[error("cannot start the writeback thread")]
    Writeback(#[source] io::Error),
    /// The pressure thread could not start.
    #[error("cannot start the memory pressure thread")]
    Pressure(#[source] io::Error),
    /// The background recompressor could not start.
    #[error("cannot start the background recompressor")]
    Recompressor(#[source] io::Error),
    /// The compression workers could not start.
    #[error("cannot start the compression workers")]
    Workers(#[source] io::Error),
    /// The control server could not start.
    #[error("cannot start the control server")]
    Control(#[source] io::Error),
    /// The metrics server could not start.
    #[error("cannot serve the metrics on {address}")]
    Metrics {
        /// The address asked for.
        address: SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Waiting for the frontend failed.
    #[error("waiting for the frontend failed")]
    Wait(#[source] io::Error),
    /// The vhost-user machinery failed.
    #[error("the vhost-user connection failed: {0}")]
    VhostUser(String),
    /// The frontend set a queue up in memory it had not shared: QEMU leaves guest RAM without
    /// a file descriptor (no `share=on` memory backend) out of the memory table.
    #[error(
        "the guest's memory is not shared: use a memory backend with share=on (QEMU: -object memory-backend-memfd,id=mem,size=SIZE,share=on -numa node,memdev=mem; libvirt: <memoryBacking><access mode='shared'/></memoryBacking>); the frontend's request failed with: {0}"
    )]
    MemoryNotShared(String),
    /// `--migrate-token` cannot be used.
    #[error("--migrate-token: {0}")]
    MigrateToken(String),
    /// The incoming migration cannot be received.
    #[error("--incoming: {0}")]
    Incoming(String),
}

impl DaemonError {
    /// Whether the error is in the configuration (a value of the command line that cannot
    /// work, found while starting): the program then exits with the usage status.
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            DaemonError::MemLimitTooLow { .. }
                | DaemonError::Recompress(_)
                | DaemonError::DictionaryFile { .. }
                | DaemonError::ZstdDictionary { .. }
                | DaemonError::NoFdStore(_)
                | DaemonError::MigrateToken(_)
                | DaemonError::StateBackingFile { .. }
                | DaemonError::State(StoreError::State(
                    StateError::WrongFileSystem { .. } | StateError::Mismatch { .. }
                ))
        )
    }
}

/// Which socket a socket error is about: named by its option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketRole {
    /// The vhost-user socket (`--socket-path`).
    VhostUser,
    /// The control socket (`--control-socket`, or its default).
    Control,
}

impl std::fmt::Display for SocketRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SocketRole::VhostUser => "the vhost-user socket --socket-path",
            SocketRole::Control => "the control socket --control-socket",
        })
    }
}

/// The live frontend connection's shutdown, which the daemon's [`StopSignal`] calls at the
/// stop: vhost-user-backend's [`ShutdownHandle`] is how that crate's connection thread is told
/// to end.
#[derive(Clone, Default)]
struct LiveConnection(Arc<Mutex<Option<ShutdownHandle>>>);

impl LiveConnection {
    /// A connection slot whose connection `stop` shuts down.
    fn shut_down_by(stop: &StopSignal) -> LiveConnection {
        let connection = LiveConnection::default();
        let live = connection.clone();
        stop.on_stop(move || live.shutdown());
        connection
    }

    fn shutdown(&self) {
        let slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(connection) = slot.as_ref() {
            connection.shutdown();
        }
    }

    /// Records the live connection, or closes it at once when the stop came first (the
    /// waker may have run before the connection was recorded).
    fn set(&self, connection: Option<ShutdownHandle>, stop: &StopSignal) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = connection;
        if stop.is_stopped() {
            self.shutdown();
        }
    }
}

/// A socket file the daemon created; removed when dropped.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// The signal handling of a program that serves a device: started first thing (after
/// [`block_handled_signals`]), before the configuration is acted on, so that SIGTERM and SIGINT
/// stop the daemon at any point of its start, and handed to [`Daemon::with_signals`].
pub struct SignalHandling {
    stop: StopSignal,
    threads: Threads,
    store: Arc<OnceLock<Arc<PageStore>>>,
}

impl SignalHandling {
    /// Starts the `signals` thread: it reads the handled signals from a signalfd; SIGTERM and
    /// SIGINT stop the daemon, SIGHUP is logged and ignored, SIGUSR1 logs [`stats_summary`]
    /// once the store exists. The signals must have been blocked with
    /// [`block_handled_signals`].
    pub fn start() -> io::Result<SignalHandling> {
        let stop = StopSignal::new();
        let store = Arc::new(OnceLock::new());
        let mut threads = Threads::new();
        spawn_signal_thread(&mut threads, stop.clone(), Arc::clone(&store))?;
        Ok(SignalHandling {
            stop,
            threads,
            store,
        })
    }

    /// The signal SIGTERM and SIGINT stop.
    pub fn stop_handle(&self) -> StopSignal {
        self.stop.clone()
    }
}

/// A configured daemon, sockets bound, not yet serving.
pub struct Daemon {
    listener: UnixListener,
    socket_file: Option<SocketFile>,
    /// The incoming migration and the outgoing ones; the queue hooks of every session.
    migrations: Arc<Migrations>,
    store: Arc<PageStore>,
    device: DeviceConfig,
    observed: Arc<Observed>,
    control_socket_file: Option<SocketFile>,
    metrics_address: Option<SocketAddr>,
    stop: StopSignal,
    connection: LiveConnection,
    /// Every thread the daemon started. Their group's signal is not `stop`: a stop request
    /// ends the connection first, and the threads that serve it (the compression workers
    /// above all) stop at the exit, after the connection's threads have ended.
    threads: Threads,
    poll_max: Duration,
    /// Where the state lives, to remove it at a normal end.
    state: Option<StateSource>,
    /// Why every frontend is refused: the state could not be recovered.
    refusal: Option<String>,
}

/// `Err(DaemonError::Stopped)` once `stop` is stopped: checked between the steps of the start.
fn not_stopped(stop: &StopSignal) -> Result<(), DaemonError> {
    if stop.is_stopped() {
        Err(DaemonError::Stopped)
    } else {
        Ok(())
    }
}

impl Daemon {
    /// Creates the store and binds the sockets; [`Daemon::stop_handle`] stops it once this
    /// returns.
    pub fn new(config: DaemonConfig) -> Result<Self, DaemonError> {
        Self::start(config, StopSignal::new(), Threads::new(), None)
    }

    /// Like [`Daemon::new`], for a program whose signal handling started before: a stop
    /// requested while the daemon starts (a large dictionary loading, a slow file system)
    /// ends the start with [`DaemonError::Stopped`], and removes the sockets created so far.
    pub fn with_signals(
        config: DaemonConfig,
        signals: SignalHandling,
    ) -> Result<Self, DaemonError> {
        let SignalHandling {
            stop,
            threads,
            store,
        } = signals;
        Self::start(config, stop, threads, Some(store))
    }

    fn start(
        config: DaemonConfig,
        stop: StopSignal,
        signal_threads: Threads,
        store_for_signals: Option<Arc<OnceLock<Arc<PageStore>>>>,
    ) -> Result<Self, DaemonError> {
        // Dropped on an error below, the group stops and joins what was started.
        let mut threads = Threads::new();
        threads.adopt(signal_threads);
        let connection = LiveConnection::shut_down_by(&stop);
        // Read before anything is created: a wrong file is refused with nothing to undo.
        let dictionary = match &config.recompress.zstd_dict {
            Some(path) => match read_dictionary_file(path, &stop)? {
                Some(raw) => Some((path, raw)),
                None => return Err(DaemonError::Stopped),
            },
            None => None,
        };
        not_stopped(&stop)?;
        // The token first: a wrong file is refused before anything is created.
        let token = match &config.migration.token {
            Some(path) => Some(
                Token::from_file(path)
                    .map_err(|error| DaemonError::MigrateToken(error.sentence()))?,
            ),
            None => None,
        };
        let mut deferred_fdstore = None;
        let (store, refusal) = match build_store(&config, &stop, dictionary, &mut deferred_fdstore)
        {
            Ok(store) => (store, None),
            Err(DaemonError::State(error)) if unrecoverable(&error) => {
                // A frontend coming back for these pages must get I/O errors, not an empty
                // device, and the state must stay as it is for whoever can examine it.
                let reason = format!(
                    "{error}; its pages cannot be given back (move the state away to start \
                     afresh)"
                );
                error!("{reason}: every frontend's requests fail with an I/O error");
                let store = PageStore::with_pending(config.store.clone(), config.pending)
                    .map_err(DaemonError::Store)?;
                (store, Some(reason))
            }
            Err(error) => return Err(error),
        };
        let store = Arc::new(store);
        let migrations = Arc::new(start_migrations(&config, &store, token, deferred_fdstore)?);
        if let Some(slot) = &store_for_signals {
            let _ = slot.set(Arc::clone(&store));
        }
        not_stopped(&stop)?;
        threads.adopt(
            CompressWorkers::start(store.clone(), &config.worker_cpus)
                .map_err(DaemonError::Workers)?
                .into_threads(),
        );
        if BlockBackend::capacity_pages(&*store) != config.device.capacity_pages {
            return Err(DaemonError::CapacityMismatch {
                store: BlockBackend::capacity_pages(&*store),
                device: config.device.capacity_pages,
            });
        }
        let (listener, socket_file) = match &config.listen {
            ListenOn::Path(path) => (
                bind_socket(path, config.socket_mode, SocketRole::VhostUser)?,
                Some(SocketFile(path.clone())),
            ),
            ListenOn::Fd(fd) => (listener_from_fd(*fd)?, None),
        };
        if let Some(idle_after) = config.recompress.idle_after {
            threads.adopt(
                BackgroundRecompressor::start(store.clone(), idle_after, config.recompress.rate)
                    .map_err(DaemonError::Recompressor)?
                    .into_threads(),
            );
        }
        let writeback = WritebackDaemon::start(store.clone(), &config.writeback)
            .map_err(DaemonError::Writeback)?;
        let writeback_signal = writeback.signal();
        threads.adopt(writeback.into_threads());
        let pressure = Arc::new(PressureState::new(config.store.mem_limit));
        let mut observed = Observed::new(
            store.clone(),
            Arc::new(RequestStats::new(usize::from(config.device.num_queues))),
            Arc::new(AtomicBool::new(false)),
            &Observed::serial_from_bytes(&config.device.serial),
        );
        observed.migrations = Some(Arc::clone(&migrations));
        observed.writeback_above = config.writeback.above;
        observed.pressure = Arc::clone(&pressure);
        let observed = Arc::new(observed);
        let control_socket_file = match &config.control_socket {
            Some(path) => {
                let listener = bind_socket(path, config.control_socket_mode, SocketRole::Control)?;
                let file = SocketFile(path.clone());
                let server = ControlServer::spawn(listener, observed.clone())
                    .map_err(DaemonError::Control)?;
                threads.adopt(server.into_threads());
                Some(file)
            }
            None => None,
        };
        log_configuration(&config);
        // After the writeback thread: a write that meets a limit the cgroup set wakes the
        // pressure thread, which sheds down to the cgroup's budget.
        let findings = Findings::look(&store, &config.pressure);
        findings.log();
        let also_poke = config.writeback.above.map(|_| writeback_signal);
        if let Some(daemon) = PressureDaemon::start(store.clone(), findings, pressure, also_poke)
            .map_err(DaemonError::Pressure)?
        {
            threads.adopt(daemon.into_threads());
        }
        not_stopped(&stop)?;
        let metrics_address = match config.metrics_listen {
            Some(address) => {
                let server = MetricsServer::bind(address, observed.clone())
                    .map_err(|source| DaemonError::Metrics { address, source })?;
                let served = server.local_addr();
                info!("serving metrics on http://{served}/metrics");
                threads.adopt(server.into_threads());
                Some(served)
            }
            None => None,
        };
        not_stopped(&stop)?;
        Ok(Daemon {
            listener,
            socket_file,
            migrations,
            store,
            device: config.device,
            observed,
            control_socket_file,
            metrics_address,
            stop,
            connection,
            threads,
            poll_max: config.poll_max,
            // An unrecoverable state is left as it is: nothing here destroys or removes it.
            state: if refusal.is_some() {
                None
            } else {
                config.state
            },
            refusal,
        })
    }

    /// The signal that ends [`Daemon::run`] when stopped, from any thread: it stops waiting
    /// for a frontend, or closes the connection to it.
    pub fn stop_handle(&self) -> StopSignal {
        self.stop.clone()
    }

    /// The store the device serves.
    pub fn store(&self) -> &Arc<PageStore> {
        &self.store
    }

    /// The socket files the daemon created (the vhost-user socket unless it was inherited, and
    /// the control socket), which it removes when it ends.
    pub fn socket_paths(&self) -> Vec<PathBuf> {
        self.socket_file
            .iter()
            .chain(self.control_socket_file.iter())
            .map(|file| file.0.clone())
            .collect()
    }

    /// What the control socket and the metrics report: the backend records requests into
    /// `requests` and sets `connected`.
    pub fn observed(&self) -> &Arc<Observed> {
        &self.observed
    }

    /// The address the metrics are served on, if they are.
    pub fn metrics_address(&self) -> Option<SocketAddr> {
        self.metrics_address
    }

    /// Serves one frontend until it disconnects or the daemon is stopped; both are success.
    ///
    /// A frontend that goes away before it used the device (see [`frontend_used_device`]) —
    /// a liveness probe, or a failed negotiation such as QEMU refusing `num-queues=4` against
    /// `--num-queues 2` after `GET_FEATURES`, `GET_PROTOCOL_FEATURES` and `GET_CONFIG` —
    /// does not end the daemon: it waits for the next one, with fresh vhost-user state.
    pub fn run(self) -> Result<(), DaemonError> {
        let Daemon {
            listener,
            socket_file,
            migrations,
            store,
            device,
            observed,
            control_socket_file,
            metrics_address: _,
            stop,
            connection,
            mut threads,
            poll_max,
            state,
            refusal,
        } = self;
        match &socket_file {
            Some(file) => info!("waiting for the frontend on {}", file.0.display()),
            None => info!("waiting for the frontend on the inherited socket"),
        }
        // Under systemd (Type=notify) the unit is started once the socket is served.
        if let Err(error) = crate::systemd::notify("READY=1\nSTATUS=waiting for the frontend") {
            warn!("could not tell systemd the daemon is ready: {error}");
        }
        let open = || Session::open(&store, &device, &observed, poll_max, &migrations);
        let mut session = open()?;
        let listener_fd = listener.as_raw_fd();
        let listener = Listener::from(listener);
        let mut ending = Ending::NoFrontend;
        let result = loop {
            match stop
                .wait_readable(listener_fd, None)
                .map_err(DaemonError::Wait)?
            {
                Readiness::Readable => {}
                Readiness::Stopped => {
                    info!("stopped before a frontend connected");
                    break Ok(());
                }
                Readiness::TimedOut => continue,
            }
            let stream = match listener.accept() {
                Ok(Some(stream)) => stream,
                // The connection went away before it was accepted (ECONNABORTED) or the
                // wake-up was spurious (EAGAIN): wait for the next one.
                Ok(None) => continue,
                Err(error) => break Err(DaemonError::VhostUser(error.to_string())),
            };
            let peer = match crate::frontend::peer_of(&stream) {
                Ok(peer) => Some(peer),
                Err(error) => {
                    warn!("cannot tell which process connected: {error}");
                    None
                }
            };
            let admission = Admission::new(&store, peer, refusal.clone());
            session.backend.set_admission(move || admission.admit());
            if let Err(error) = session.daemon.start_stream(stream) {
                break Err(DaemonError::VhostUser(error.to_string()));
            }
            match &peer {
                Some(peer) => debug!("accepted a connection on the vhost-user socket from {peer}"),
                None => debug!("accepted a connection on the vhost-user socket"),
            }
            connection.set(session.daemon.shutdown_handle(), &stop);
            let served = session.daemon.wait();
            connection.set(None, &stop);
            session.backend.disconnected();
            observed.connected.store(false, Ordering::Release);
            let memory_regions = session.mem.memory().num_regions();
            let served = match served {
                Ok(()) => Ok(()),
                Err(vhost_user_backend::Error::HandleRequest(
                    VhostUserError::Disconnected | VhostUserError::PartialMessage,
                )) => Ok(()),
                Err(_) if stop.is_stopped() => Ok(()),
                Err(error) if memory_not_shared(&error, memory_regions) => {
                    Err(DaemonError::MemoryNotShared(error.to_string()))
                }
                Err(error) => Err(DaemonError::VhostUser(error.to_string())),
            };
            if session.backend.frontend_spoke() {
                // After a switchover the source's QEMU quits: its stream ends with `Close`.
                migrations.frontend_gone();
            }
            if stop.is_stopped() {
                if session.backend.frontend_spoke() {
                    ending = Ending::StoppedWhileServing;
                    if !store.has_state() {
                        warn_of_lost_data(&store.stats());
                    }
                } else {
                    info!("stopped by request");
                }
                break served;
            }
            if !session.backend.frontend_spoke() {
                debug!("a connection closed without a vhost-user message (a liveness probe?)");
                continue;
            }
            if served.is_err() {
                ending = Ending::Failed;
                break served;
            }
            if frontend_used_device(memory_regions, &observed.requests, &store.stats()) {
                info!(
                    "the frontend disconnected; freeing the device: {}",
                    stats_summary(&store.stats())
                );
                ending = Ending::FrontendEnded;
                break served;
            }
            info!(
                "the frontend disconnected before it used the device (no guest memory, no request, nothing stored); waiting for the next frontend"
            );
            // A fresh handler: the next frontend starts from SET_OWNER, as on a new daemon.
            session.close();
            session = open()?;
        };
        // Queue threads stop at their next request; reads still in the backing file are
        // cancelled, and their threads joined within the bound or named.
        disarm_sigbus_cleanup();
        session.close();
        migrations.stop();
        let kept = match &state {
            // The workers still run: a page they are compressing is installed or dropped
            // before the state is destroyed, and destroying waits for nothing of theirs.
            Some(source) => end_state(&store, source, ending),
            None => StateEnd::NoState,
        };
        // The connection's threads have ended. One stop and one bound for every thread the
        // daemon started; those that do not stop in time (a write stuck in a hung backing
        // file) are named in the log and left.
        let unjoined = threads.stop_within(EXIT_BOUND);
        match kept {
            // The backing file's blocks are the kept state's pages.
            StateEnd::Kept => {}
            StateEnd::NoState | StateEnd::Destroyed => {
                erase_backing_file(&store, &unjoined.stuck);
            }
        }
        drop(control_socket_file);
        drop(listener);
        drop(socket_file);
        result
    }
}

/// The vhost-user side of one frontend connection: the backend, vhost-user-backend's daemon
/// (its message handler and queue threads) and the guest memory map the handler fills.
struct Session {
    backend: Arc<BlkBackend<PageStore>>,
    daemon: VhostUserDaemon<Arc<BlkBackend<PageStore>>>,
    mem: GuestMemory,
}

impl Session {
    fn open(
        store: &Arc<PageStore>,
        device: &DeviceConfig,
        observed: &Observed,
        poll_max: Duration,
        migrations: &Arc<Migrations>,
    ) -> Result<Session, DaemonError> {
        let mem = GuestMemory::new(GuestMap::new());
        let backend = Arc::new(BlkBackend::new(store.clone(), device.clone(), mem.clone()));
        backend.observe(&observed.requests, observed.connected.clone());
        backend.set_poll_max(poll_max);
        backend.set_queue_hooks(Some(Arc::clone(migrations) as Arc<dyn QueueHooks>));
        let daemon =
            VhostUserDaemon::new("vhost-user-zram".to_owned(), backend.clone(), mem.clone())
                .map_err(|error| DaemonError::VhostUser(error.to_string()))?;
        backend
            .attach(&daemon)
            .map_err(|error| DaemonError::VhostUser(error.to_string()))?;
        Ok(Session {
            backend,
            daemon,
            mem,
        })
    }

    /// Stops the queue threads and the read-back threads (bounded) and drops the handler.
    fn close(self) {
        let _ = self.backend.stop(EXIT_BOUND);
        for handler in self.daemon.get_epoll_handlers() {
            handler.send_exit_event();
        }
        drop(self.daemon);
    }
}

/// Whether the frontend of a connection that ended used the device, which ends the daemon's
/// one VM lifetime: it gave the daemon guest memory (`SET_MEM_TABLE` or `ADD_MEM_REG`: a VMM
/// does so when the guest's driver starts the device, and no queue can be set up without it),
/// a request was served, or the store holds a page. A frontend that did none of these never
/// wrote to the device, so the daemon holds none of its data and may serve the next one.
pub fn frontend_used_device(memory_regions: usize, requests: &RequestStats, stats: &Stats) -> bool {
    let requests_served: u64 = requests
        .snapshot()
        .kinds
        .iter()
        .map(|kind| kind.count)
        .sum();
    memory_regions > 0
        || requests_served > 0
        || stats.mm.orig_data_size > 0
        || stats.mm.same_pages > 0
        || stats.workers.pending_pages > 0
        || stats.writeback.pages_on_file > 0
}

/// Whether the connection failed because the frontend's guest memory is not shared with the
/// daemon: a queue was set up while the memory table held no region (QEMU leaves out RAM
/// that has no file descriptor, so without `share=on` the table is empty and `SET_VRING_ADDR`
/// finds nothing: "invalid parameters"), or at an address no region covers.
fn memory_not_shared(error: &vhost_user_backend::Error, memory_regions: usize) -> bool {
    match error {
        vhost_user_backend::Error::HandleRequest(VhostUserError::InvalidParam) => {
            memory_regions == 0
        }
        vhost_user_backend::Error::HandleRequest(VhostUserError::ReqHandlerError(source)) => {
            source.to_string().contains("Missing memory mapping")
        }
        _ => false,
    }
}

/// Reads the `--zstd-dict` file at `path`: only a regular file (checked before it is opened,
/// and again on the open descriptor, so a FIFO, a device or a directory is refused without
/// blocking), of 1 byte to [`crate::codec::MAX_DICTIONARY_BYTES`], read in chunks with `stop`
/// looked at between them. `None` when `stop` ended the read.
fn read_dictionary_file(path: &Path, stop: &StopSignal) -> Result<Option<Vec<u8>>, DaemonError> {
    use std::os::unix::fs::OpenOptionsExt;
    const CHUNK: usize = 64 << 10;
    let max = crate::codec::MAX_DICTIONARY_BYTES as u64;
    let io_error = |source| DaemonError::ReadDictionary {
        path: path.to_owned(),
        source,
    };
    let refuse = |problem: String| DaemonError::DictionaryFile {
        path: path.to_owned(),
        problem,
    };
    let check = |metadata: &fs::Metadata| {
        let kind = file_kind(&metadata.file_type());
        if kind != "regular file" {
            return Err(refuse(format!(
                "is a {kind}; give a regular file holding a zstd dictionary"
            )));
        }
        match metadata.len() {
            0 => Err(refuse("is empty; give a zstd dictionary".to_owned())),
            len if len > max => Err(refuse(format!(
                "is {len} bytes; a dictionary is at most {max} bytes"
            ))),
            len => Ok(len),
        }
    };
    check(&fs::metadata(path).map_err(io_error)?)?;
    // O_NONBLOCK: should the path have been swapped for a FIFO since, the open does not wait
    // for a writer (and the check below refuses it); O_NOCTTY: never a controlling terminal.
    let mut file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(io_error)?;
    let len = check(&file.metadata().map_err(io_error)?)?;
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    let mut raw = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        if stop.is_stopped() {
            return Ok(None);
        }
        let end = (filled + CHUNK).min(len);
        match io::Read::read(&mut file, &mut raw[filled..end]) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(io_error(error)),
        }
    }
    raw.truncate(filled);
    if raw.is_empty() {
        return Err(refuse("is empty; give a zstd dictionary".to_owned()));
    }
    Ok(Some(raw))
}

/// What kind of file `file_type` is, for messages.
fn file_kind(file_type: &fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    if file_type.is_file() {
        "regular file"
    } else if file_type.is_dir() {
        "directory"
    } else if file_type.is_fifo() {
        "FIFO"
    } else if file_type.is_socket() {
        "socket"
    } else if file_type.is_block_device() {
        "block device"
    } else if file_type.is_char_device() {
        "character device"
    } else {
        "special file"
    }
}

/// Creates a listening Unix socket at `path` with permissions `mode`, replacing a stale socket
/// file and refusing a live one; errors name the socket by its `role`.
pub fn bind_socket(path: &Path, mode: u32, role: SocketRole) -> Result<UnixListener, DaemonError> {
    let directory = match path.parent() {
        Some(parent) if parent.as_os_str().is_empty() => Path::new("."),
        Some(parent) => parent,
        None => Path::new("/"),
    };
    if !directory.is_dir() {
        return Err(DaemonError::MissingDirectory {
            role,
            path: path.to_owned(),
            directory: directory.to_owned(),
        });
    }
    let bind_error = |source| DaemonError::Bind {
        role,
        path: path.to_owned(),
        source,
    };
    if let Ok(metadata) = fs::symlink_metadata(path) {
        if !metadata.file_type().is_socket() {
            return Err(DaemonError::NotASocket {
                role,
                path: path.to_owned(),
            });
        }
        match UnixStream::connect(path) {
            Ok(_) => {
                return Err(DaemonError::SocketInUse {
                    role,
                    path: path.to_owned(),
                })
            }
            Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
                info!("replacing the stale socket {}", path.display());
                fs::remove_file(path).map_err(bind_error)?;
            }
            Err(source) => return Err(bind_error(source)),
        }
    }
    let address = socket_address(path.as_os_str()).ok_or_else(|| DaemonError::PathTooLong {
        role,
        path: path.to_owned(),
    })?;
    // SAFETY: socket(2) takes no pointers; the result is checked before use.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(bind_error(io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a socket we just created and nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    let mode = mode & 0o777;
    // Linux creates the socket file with the socket inode's mode (minus the umask), so setting
    // it first means the file never exists with wider permissions than asked for.
    // SAFETY: fchmod(2) on a descriptor we own; no pointers.
    if unsafe { libc::fchmod(socket.as_raw_fd(), mode) } < 0 {
        return Err(bind_error(io::Error::last_os_error()));
    }
    let address_len = socklen_of::<libc::sockaddr_un>();
    // SAFETY: `address` is a fully initialized sockaddr_un that outlives the call and
    // `address_len` is its size.
    let bound = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&address as *const libc::sockaddr_un).cast(),
            address_len,
        )
    };
    if bound < 0 {
        return Err(bind_error(io::Error::last_os_error()));
    }
    let file = SocketFile(path.to_owned());
    // The umask may have narrowed the mode; set exactly what was asked for.
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(bind_error)?;
    // SAFETY: listen(2) on a bound socket we own; no pointers.
    if unsafe { libc::listen(socket.as_raw_fd(), 16) } < 0 {
        return Err(bind_error(io::Error::last_os_error()));
    }
    // Keep the file: the listener now owns its lifetime.
    std::mem::forget(file);
    Ok(UnixListener::from(socket))
}

/// `AF_UNIX` (1) as the address-family field's type.
#[allow(clippy::cast_possible_truncation)]
const AF_UNIX_FAMILY: libc::sa_family_t = libc::AF_UNIX as libc::sa_family_t;

/// The size of `T` as a socket-API length; only used for small fixed structures.
#[allow(clippy::cast_possible_truncation)]
const fn socklen_of<T>() -> libc::socklen_t {
    std::mem::size_of::<T>() as libc::socklen_t
}

/// A `sockaddr_un` for `path`, or `None` when it does not fit (with its NUL terminator).
fn socket_address(path: &OsStr) -> Option<libc::sockaddr_un> {
    // SAFETY: sockaddr_un is plain old data, for which all-zero bytes are a valid value.
    let mut address: libc::sockaddr_un = unsafe { MaybeUninit::zeroed().assume_init() };
    address.sun_family = AF_UNIX_FAMILY;
    let bytes = path.as_bytes();
    if bytes.is_empty() || bytes.len() >= address.sun_path.len() || bytes.contains(&0) {
        return None;
    }
    for (slot, byte) in address.sun_path.iter_mut().zip(bytes) {
        *slot = *byte as libc::c_char;
    }
    Some(address)
}

/// Takes ownership of an inherited listening Unix socket (systemd passes it as fd 3).
pub fn listener_from_fd(fd: RawFd) -> Result<UnixListener, DaemonError> {
    let bad = DaemonError::BadFd { fd };
    if fd < 0 {
        return Err(bad);
    }
    let mut stat = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat(2) writes a `stat` into the valid buffer we pass; any fd number is
    // acceptable input and failure is reported, not undefined.
    if unsafe { libc::fstat(fd, stat.as_mut_ptr()) } < 0 {
        return Err(bad);
    }
    // SAFETY: fstat succeeded, so it initialized `stat`.
    let stat = unsafe { stat.assume_init() };
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(bad);
    }
    if socket_option(fd, libc::SO_ACCEPTCONN) != Some(1)
        || socket_option(fd, libc::SO_DOMAIN) != Some(libc::AF_UNIX)
        || socket_option(fd, libc::SO_TYPE) != Some(libc::SOCK_STREAM)
    {
        return Err(bad);
    }
    // SAFETY: `fd` is open and a listening Unix stream socket (checked above). By the
    // socket-activation convention it was handed to this process for the daemon alone, and
    // nothing else in the process owns it, so taking ownership is sound.
    Ok(unsafe { UnixListener::from_raw_fd(fd) })
}

fn socket_option(fd: RawFd, option: libc::c_int) -> Option<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = socklen_of::<libc::c_int>();
    // SAFETY: `value` and `len` are valid for writes and `len` holds `value`'s size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(value)
}

/// Logs what the daemon was configured with, before it creates anything.
fn log_configuration(config: &DaemonConfig) {
    let store = &config.store;
    let device = &config.device;
    let level = match (store.level, store.algorithm.default_level()) {
        (Some(level), _) | (None, Some(level)) => format!(" level {level}"),
        (None, None) => String::new(),
    };
    let limit = match store.mem_limit {
        Some(limit) => format!("memory limit {}", bytes_human(limit)),
        None => "no memory limit".to_owned(),
    };
    let serial_len = device
        .serial
        .iter()
        .position(|&byte| byte == 0)
        .unwrap_or(device.serial.len());
    let serial = String::from_utf8_lossy(&device.serial[..serial_len]);
    let implementation = match store.algorithm {
        crate::codec::Algorithm::Lz4 => format!(" ({})", crate::codec::lz4::IMPLEMENTATION),
        crate::codec::Algorithm::Zstd
        | crate::codec::Algorithm::Deflate
        | crate::codec::Algorithm::DeflateIaa(_) => String::new(),
    };
    info!(
        "device: {} ({} pages), {}{implementation}{level}, {limit}, {} queue(s) of up to {} descriptors, {}, serial '{serial}'",
        bytes_human(store.capacity_pages.saturating_mul(PAGE_SIZE as u64)),
        store.capacity_pages,
        store.algorithm,
        device.num_queues,
        device.queue_size,
        if device.read_only { "read-only" } else { "read-write" },
    );
    match config.pending.workers {
        0 => info!("compression on the queue threads (--workers 0)"),
        workers => info!(
            "{workers} compression worker(s){}, pending pool {} ({} pages)",
            if config.worker_cpus.is_empty() {
                String::new()
            } else {
                format!(" on CPUs {:?}", config.worker_cpus)
            },
            bytes_human(config.pending.max_pending_pages as u64 * PAGE_SIZE as u64),
            config.pending.max_pending_pages
        ),
    }
    match config.unit_max_pages {
        ..=1 => info!("multi-page units off: every page is compressed alone (--unit-max 4K)"),
        pages => info!(
            "multi-page units of up to {} ({pages} pages): a write of aligned pages is compressed as one object",
            bytes_human(pages as u64 * PAGE_SIZE as u64)
        ),
    }
    if !config.poll_max.is_zero() {
        info!(
            "queues poll for up to {} µs after serving",
            config.poll_max.as_micros()
        );
    }
    let listen = match &config.listen {
        ListenOn::Path(path) => format!("vhost-user socket {}", path.display()),
        ListenOn::Fd(fd) => format!("vhost-user socket inherited as fd {fd}"),
    };
    let control = match &config.control_socket {
        Some(path) => format!(
            "control socket {} (mode {:04o})",
            path.display(),
            config.control_socket_mode & 0o777
        ),
        None => "no control socket".to_owned(),
    };
    info!(
        "{listen} (mode {:04o}), {control}",
        config.socket_mode & 0o777
    );
    info!("{}", recompression_settings(&config.recompress));
    info!("{}", writeback_settings(&config.writeback));
    debug!(
        "offering virtio features {}; vhost-user protocol features {:?}",
        feature_names(device.features()),
        DeviceConfig::protocol_features()
    );
}

/// The recompression settings as one line for the start log, given or not.
fn recompression_settings(recompress: &RecompressConfig) -> String {
    let algorithms = recompress
        .algorithms
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>();
    let mut line = if algorithms.is_empty() {
        "recompression: no secondary algorithm (ctl recompress needs --recompress-algorithm)"
            .to_owned()
    } else {
        format!(
            "recompression: secondary algorithm(s) {} by priority",
            algorithms.join(", ")
        )
    };
    match recompress.idle_after {
        Some(idle) => {
            let _ = write!(
                line,
                "; in the background, pages idle for {} s, at most {} pages/s",
                idle.as_secs(),
                recompress.rate
            );
        }
        None if !algorithms.is_empty() => line.push_str("; on request only (ctl recompress)"),
        None => {}
    }
    if let Some(path) = &recompress.zstd_dict {
        let _ = write!(line, "; zstd dictionary {}", path.display());
    }
    line
}

/// The writeback settings as one line for the start log, given or not.
fn writeback_settings(writeback: &WritebackConfig) -> String {
    let tick = writeback.idle_tick.as_secs_f64();
    let Some(path) = &writeback.backing_file else {
        return format!("writeback: no backing file; idle clock tick {tick} s");
    };
    let mut line = format!("writeback: backing file {}", path.display());
    if let Some(idle) = writeback.idle_after {
        if let Some(age) = crate::store::writeback::min_age_for(idle, writeback.idle_tick) {
            // A page of age `age` has been idle for more than `age - 1` ticks.
            let _ = write!(
                line,
                "; pages idle for at least {} s are written back (idle-clock age {age} or more: idle for more than {} s)",
                idle.as_secs_f64(),
                tick * f64::from(age.saturating_sub(1))
            );
        }
    }
    if let Some(above) = writeback.above {
        let _ = write!(
            line,
            "; the coldest pages go while mem_used_total is above {}",
            bytes_human(above)
        );
    }
    match writeback.limit {
        Some(limit) => {
            let _ = write!(line, "; at most {limit} pages");
        }
        None => line.push_str("; no writeback limit"),
    }
    let _ = write!(
        line,
        "; {} pages a write; idle clock tick {tick} s",
        writeback.batch_pages
    );
    line
}

/// `bytes` for a person: B, KiB, MiB, GiB or TiB with one decimal.
pub fn bytes_human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    #[allow(clippy::cast_precision_loss)] // one decimal is shown
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// One line of what the store holds and what went wrong: for the log at disconnect, at
/// SIGUSR1 and when data is thrown away.
pub fn stats_summary(stats: &Stats) -> String {
    let mm = &stats.mm;
    let io = &stats.io;
    let pages = mm.orig_data_size / PAGE_SIZE as u64;
    let mut line = format!(
        "{pages} pages stored ({} of data in {} of memory",
        bytes_human(mm.orig_data_size),
        bytes_human(mm.mem_used_total)
    );
    if mm.compr_data_size > 0 {
        #[allow(clippy::cast_precision_loss)] // a ratio with two decimals
        let ratio = mm.orig_data_size as f64 / mm.compr_data_size as f64;
        let _ = write!(line, ", compression ratio {ratio:.2}");
    }
    let _ = write!(
        line,
        "), {} same-filled, {} huge; most memory used {}; failed reads {}, failed writes {}, invalid requests {}, pages freed by discard {}",
        mm.same_pages,
        mm.huge_pages,
        bytes_human(mm.mem_used_max),
        io.failed_reads,
        io.failed_writes,
        io.invalid_io,
        io.notify_free
    );
    let wb = &stats.writeback;
    if wb.enabled {
        let _ = write!(
            line,
            "; backing file: {} pages on file, bd_stat {} {} {} (blocks held, read, written), {} failed writebacks",
            wb.pages_on_file, wb.bd_count, wb.bd_reads, wb.bd_writes, wb.failed_writebacks
        );
    }
    line
}

/// Logs, when the daemon is stopped under a connected frontend, that the guest's data is gone.
/// How [`Daemon::run`] ended, which decides what becomes of a state file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Stopped with no frontend connected (none came, or the last one left before it used
    /// the device).
    NoFrontend,
    /// Stopped while a frontend was connected: the upgrade path.
    StoppedWhileServing,
    /// The frontend used the device and disconnected: its VM ended.
    FrontendEnded,
    /// The connection failed: the daemon exits with an error, as a crash would.
    Failed,
}

/// What becomes of the state at the end of `run`: a normal end destroys it (and removes the
/// file, or drops the memfd from systemd's store); a stop with the frontend connected, or a
/// failure, keeps it for the next daemon. A stop with no frontend connected destroys it unless
/// the process it belongs to still runs (its QEMU may be about to reconnect).
fn end_state(store: &PageStore, source: &StateSource, ending: Ending) -> StateEnd {
    let pages = store.stats().mm.orig_data_size / PAGE_SIZE as u64;
    let where_ = match source {
        StateSource::Path(path) => path.display().to_string(),
        StateSource::FdStore(name) => format!("systemd's file descriptor store ({name})"),
    };
    let owner_alive = store
        .state_identity()
        .is_some_and(|id| crate::frontend::process_alive(id.pid, id.start_time));
    let keep = match ending {
        Ending::StoppedWhileServing | Ending::Failed => true,
        Ending::FrontendEnded => false,
        Ending::NoFrontend => owner_alive && pages > 0,
    };
    if keep {
        info!(
            "the state in {where_} is kept with the guest's {pages} pages: a daemon started on it gives them back when the same frontend reconnects"
        );
        return StateEnd::Kept;
    }
    if let Err(error) = store.destroy_state() {
        warn!("could not destroy the state in {where_}: {error}");
    }
    match source {
        StateSource::Path(path) => {
            if let Err(error) = std::fs::remove_file(path) {
                warn!(
                    "could not remove the state file {}: {error}",
                    path.display()
                );
            }
        }
        StateSource::FdStore(name) => {
            if let Err(error) = crate::systemd::remove_fd(name) {
                warn!("could not drop the state memfd {name} from systemd's store: {error}");
            }
        }
    }
    info!("the state in {where_} is destroyed ({pages} pages)");
    StateEnd::Destroyed
}

/// What became of the store's pages at the end of `run`, which decides whether the backing
/// file's blocks are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StateEnd {
    /// No state file: the pages end with the daemon.
    NoState,
    /// The state is kept for the next daemon, and with it the backing file's blocks.
    Kept,
    /// The state is destroyed.
    Destroyed,
}

/// Erases the backing file at the end of a run whose pages are not kept, so no guest data
/// stays on disk; with a thread of `stuck` still running (it may be writing to the file),
/// leaves it and says so.
fn erase_backing_file(store: &PageStore, stuck: &[String]) {
    let Some(backing) = store.backing_file() else {
        return;
    };
    let path = backing.path().display();
    if !stuck.is_empty() {
        warn!(
            "backing file {path} is not erased: thread `{}` still runs and may be using it; the data on it stays until the next start empties it",
            stuck.join("`, `")
        );
        return;
    }
    let erasure = backing.erase();
    if erasure.erased() {
        info!("backing file {path}: {erasure}; no guest data stays on it");
    } else {
        warn!("backing file {path}: {erasure}");
    }
}

/// The decision, made when a frontend first uses the device, of whether the store's pages are
/// its own: only the process the state recorded (pid and start time) gets them back; any
/// other has them destroyed before it is served, and becomes the state's frontend.
pub struct Admission {
    store: Arc<PageStore>,
    peer: Option<crate::frontend::Peer>,
    refusal: Option<String>,
}

impl Admission {
    /// The admission of `peer` (unknown: no identity) to `store`; with `refusal`, every
    /// frontend is refused for that reason.
    pub fn new(
        store: &Arc<PageStore>,
        peer: Option<crate::frontend::Peer>,
        refusal: Option<String>,
    ) -> Admission {
        Admission {
            store: Arc::clone(store),
            peer,
            refusal,
        }
    }

    /// Decides, destroying the old pages when they are another frontend's. `Err` names why
    /// the device cannot be served at all.
    pub fn admit(&self) -> Result<Continuity, String> {
        if let Some(reason) = &self.refusal {
            return Err(reason.clone());
        }
        let store = &self.store;
        if !store.has_state() {
            return Ok(Continuity::Fresh);
        }
        let identity = self.peer.and_then(|peer| {
            peer.start_time.map(|start_time| FrontendIdentity {
                pid: peer.pid,
                start_time,
            })
        });
        let who = self
            .peer
            .map_or_else(|| "an unknown process".to_owned(), |p| p.to_string());
        let recorded = store.state_identity();
        let pages = store.stats().mm.orig_data_size / PAGE_SIZE as u64;
        if identity.is_some() && recorded == identity {
            info!("the frontend, {who}, is the one the state belongs to: it gets its {pages} pages back");
            return Ok(Continuity::Recovered);
        }
        if recorded.is_some() || pages > 0 {
            let owner = recorded.map_or_else(
                || "no known frontend".to_owned(),
                |old| format!("pid {}", old.pid),
            );
            info!(
                "the frontend, {who}, is not the one the state belongs to ({owner}); destroying its {pages} pages before serving it"
            );
            store
                .destroy_state()
                .map_err(|error| format!("the old pages could not be destroyed: {error}"))?;
        }
        if identity.is_none() {
            warn!("the start time of the frontend ({who}) cannot be read: its pages will not be given back after a restart of the daemon");
        }
        store
            .set_state_identity(identity)
            .map_err(|error| format!("the state could not record its frontend: {error}"))?;
        Ok(Continuity::Fresh)
    }
}

/// A receiving daemon's state in systemd's file descriptor store: a new memfd goes there only
/// once the incoming migration is complete, so a daemon that dies mid-stream leaves no state
/// that a restart would take for the guest's pages; and a memfd systemd passes back to a
/// daemon started with `--incoming` is therefore one whose migration completed.
enum DeferredFdStore {
    /// A new memfd, for systemd once the migration is complete.
    Pending {
        /// Its name in the store.
        name: String,
        /// The memfd.
        fd: OwnedFd,
    },
    /// systemd passed the state back: the migration completed before this start.
    Completed,
}

impl DeferredFdStore {
    fn hand_over(name: &str, fd: &OwnedFd) {
        match crate::systemd::store_fd(name, fd.as_fd()) {
            Ok(_) => info!(
                "state {name}: in systemd's file descriptor store now that the migration is complete"
            ),
            Err(error) => warn!(
                "state {name}: could not be handed to systemd's file descriptor store ({error}); \
                 a restart of this daemon will not find the guest's pages"
            ),
        }
    }
}

/// The daemon's migrations: the incoming one (`--incoming`) listens from here on, before a
/// frontend can connect; a state deferred for it goes to systemd once it is complete.
fn start_migrations(
    config: &DaemonConfig,
    store: &Arc<PageStore>,
    token: Option<Token>,
    deferred: Option<DeferredFdStore>,
) -> Result<Migrations, DaemonError> {
    let incoming = match deferred {
        Some(DeferredFdStore::Completed) => None,
        Some(DeferredFdStore::Pending { .. }) | None => config
            .migration
            .incoming
            .clone()
            .map(|at| (at, config.migration.incoming_timeout)),
    };
    let migrations = Migrations::new(Arc::clone(store), token, incoming)
        .map_err(|error| DaemonError::Incoming(error.sentence()))?;
    if let Some(DeferredFdStore::Pending { name, fd }) = deferred {
        migrations.on_incoming_complete(Box::new(move || DeferredFdStore::hand_over(&name, &fd)));
    }
    Ok(migrations)
}

/// Builds the store the configuration describes: in its state file (recovered) or in
/// anonymous memory, with its secondary algorithms, memory limit, backing file and dictionary.
/// A new memfd state of a daemon receiving a migration is not handed to systemd here but
/// left in `deferred`.
fn build_store(
    config: &DaemonConfig,
    stop: &StopSignal,
    dictionary: Option<(&PathBuf, Vec<u8>)>,
    deferred: &mut Option<DeferredFdStore>,
) -> Result<PageStore, DaemonError> {
    let store_config = StoreConfig {
        mem_limit: None,
        ..config.store.clone()
    };
    let state = match &config.state {
        Some(source) => Some(open_state(
            source,
            config.migration.incoming.is_some(),
            deferred,
        )?),
        None => None,
    };
    let state_name = state.as_ref().map(|s| s.name().to_owned());
    let recorded_backing = state.as_ref().and_then(StateFile::backing);
    if let Some(record) = &recorded_backing {
        if config.writeback.backing_file.as_deref() != Some(record.path.as_path()) {
            return Err(DaemonError::StateBackingFile {
                recorded: record.path.clone(),
                given: config.writeback.backing_file.clone(),
            });
        }
    }
    let memory = match state {
        Some(file) => StoreMemory::State(file),
        None => StoreMemory::Anonymous,
    };
    let mut store = PageStore::with_memory(store_config, config.pending, memory)
        .map_err(state_or_store_error)?
        .with_secondary_algorithms(&config.recompress.algorithms)
        .map_err(DaemonError::Recompress)?;
    if let Some(limit) = config.store.mem_limit {
        let needed = store.mem_used_total();
        if needed > limit {
            return Err(DaemonError::MemLimitTooLow { limit, needed });
        }
        store.set_mem_limit(Some(limit));
    }
    not_stopped(stop)?;
    if let Some(path) = &config.writeback.backing_file {
        let foreign = if config.writeback.backing_file_overwrite {
            ForeignData::Overwrite
        } else {
            ForeignData::Refuse
        };
        let backing = match &recorded_backing {
            // The state's written-back pages are in this file: keep it as it is.
            Some(record) => BackingFile::reopen(path, record.key, (record.dev, record.ino)),
            None => BackingFile::open_with_policy(path, foreign),
        }
        .map_err(|source| DaemonError::BackingFile {
            path: path.clone(),
            source,
        })?;
        if let Some(opened) = backing.opened() {
            info!("writing back to {opened}");
            if let Some(found) = &opened.overwritten {
                log::warn!(
                    "backing file {}: overwriting {found} (--backing-file-overwrite)",
                    path.display()
                );
            }
            if let Some(message) = opened.earlier_run_message() {
                info!("{message}");
            }
        }
        store = store.with_backing_file(backing);
    }
    store.set_writeback_limit(config.writeback.limit);
    store.set_writeback_batch(config.writeback.batch_pages);
    store
        .set_unit_max_pages(config.unit_max_pages)
        .map_err(DaemonError::Store)?;
    store.set_idle_tick(config.writeback.idle_tick);
    if let Some((path, raw)) = dictionary {
        let id =
            store
                .load_zstd_dictionary(&raw)
                .map_err(|source| DaemonError::ZstdDictionary {
                    path: path.clone(),
                    source,
                })?;
        info!("zstd pages use dictionary {id} from {}", path.display());
    }
    // Before the workers start: recovery queues the pages that were waiting for them.
    let started = store.recover().map_err(state_or_store_error)?;
    log_state_start(state_name.as_deref(), &started);
    Ok(store)
}

/// Whether a state error means the state's pages cannot be given back (a damaged header or
/// an inconsistent store), rather than a wrong start (another size, file system or format,
/// another daemon on it), after which the daemon does not start.
fn unrecoverable(error: &StoreError) -> bool {
    match error {
        StoreError::Recovery { .. } => true,
        StoreError::State(state) => matches!(state, StateError::Corrupt { .. }),
        _ => false,
    }
}

/// Opens the state `source` names: a file on tmpfs or hugetlbfs, or the memfd systemd's file
/// descriptor store passed back (a new one, handed to the store, at the first start; when
/// `incoming`, once the migration is complete, through `deferred`).
fn open_state(
    source: &StateSource,
    incoming: bool,
    deferred: &mut Option<DeferredFdStore>,
) -> Result<StateFile, DaemonError> {
    let state_error = |error| DaemonError::State(StoreError::State(error));
    match source {
        StateSource::Path(path) => StateFile::open(path).map_err(state_error),
        StateSource::FdStore(name) => {
            if let Some(fd) = crate::systemd::take_passed_fd(name) {
                if incoming {
                    // A receiving daemon's memfd reaches the store only once its migration is
                    // complete: this is a restart after that, and the state is the guest's.
                    info!(
                        "state {name}: kept by systemd after the incoming migration completed; \
                         serving it rather than receiving again"
                    );
                    *deferred = Some(DeferredFdStore::Completed);
                }
                return StateFile::from_fd(fd, name).map_err(state_error);
            }
            if !crate::systemd::under_service_manager() {
                return Err(DaemonError::NoFdStore(name.clone()));
            }
            let file = StateFile::new_memfd(name).map_err(state_error)?;
            if incoming {
                let fd = file.as_fd().try_clone_to_owned().map_err(|source| {
                    DaemonError::State(StoreError::State(StateError::Io {
                        path: name.clone(),
                        action: "duplicated",
                        source,
                    }))
                })?;
                *deferred = Some(DeferredFdStore::Pending {
                    name: name.clone(),
                    fd,
                });
                return Ok(file);
            }
            crate::systemd::store_fd(name, file.as_fd()).map_err(|source| {
                DaemonError::State(StoreError::State(StateError::Io {
                    path: name.clone(),
                    action: "handed to systemd's file descriptor store",
                    source,
                }))
            })?;
            Ok(file)
        }
    }
}

/// A store error, as the state error it is when it comes from the state file.
fn state_or_store_error(error: StoreError) -> DaemonError {
    match error {
        StoreError::State(_) | StoreError::Recovery { .. } => DaemonError::State(error),
        other => DaemonError::Store(other),
    }
}

/// Logs what the start found in the state file.
fn log_state_start(name: Option<&str>, started: &StateStart) {
    let name = name.unwrap_or("the state file");
    match started {
        StateStart::Anonymous => {}
        StateStart::Created => info!(
            "state {name}: new; the guest's pages will outlive this process, for the same frontend"
        ),
        StateStart::Recovered(recovered) => {
            let whose = match recovered.identity {
                Some(identity) => format!(
                    "frontend pid {} (started at tick {})",
                    identity.pid, identity.start_time
                ),
                None => "no recorded frontend".to_owned(),
            };
            info!(
                "state {name}: recovered {} pages of {whose} in {:.1} ms",
                recovered.pages,
                recovered.elapsed.as_secs_f64() * 1000.0
            );
            if recovered.damaged_pages > 0 {
                warn!(
                    "state {name}: {} damaged pages fail their reads with an I/O error until the guest writes them again",
                    recovered.damaged_pages
                );
            }
        }
    }
}

fn warn_of_lost_data(stats: &Stats) {
    let stored = stats.mm.orig_data_size;
    if stored == 0 {
        info!("stopped by request while the frontend was connected; the device held no data");
        return;
    }
    warn!(
        "stopped by request while the frontend was connected: the guest's {} pages ({stored} bytes, {}) are lost, and a guest swapping on this device fails at its next swap-in; stop the VM (or swapoff in the guest) before the daemon",
        stored / PAGE_SIZE as u64,
        bytes_human(stored)
    );
}

/// The signals the signal thread handles: they are blocked in every thread and received from
/// a signalfd, so their default action (terminating without removing the sockets) never runs.
const HANDLED_SIGNALS: [libc::c_int; 4] =
    [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGUSR1];

fn handled_signals() -> libc::sigset_t {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initializes the set it is given; sigaddset then adds valid signal
    // numbers to that initialized set.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        for signal in HANDLED_SIGNALS {
            libc::sigaddset(set.as_mut_ptr(), signal);
        }
        set.assume_init()
    }
}

/// Blocks the signals [`Daemon::handle_signals`] handles (SIGTERM, SIGINT, SIGHUP, SIGUSR1) in
/// the calling thread and, through inheritance, in every thread it starts afterwards. Call
/// first thing in `main`, then [`Daemon::handle_signals`].
pub fn block_handled_signals() -> io::Result<()> {
    let set = handled_signals();
    // SAFETY: `set` is an initialized signal set; the old mask is not requested.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Unblocks what [`block_handled_signals`] blocked, in the calling thread: for a program that
/// turns out not to serve a device (`ctl`), whose default actions then apply again.
pub fn unblock_handled_signals() -> io::Result<()> {
    let set = handled_signals();
    // SAFETY: `set` is an initialized signal set; the old mask is not requested.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Starts the `signals` thread in `threads`: it reads the handled signals from a signalfd
/// and waits on it and on the group's signal, so that it ends with the group. SIGTERM and
/// SIGINT stop the daemon through `stop`, SIGHUP is logged and ignored, SIGUSR1 logs
/// [`stats_summary`] of `store` once it is set.
fn spawn_signal_thread(
    threads: &mut Threads,
    stop: StopSignal,
    store: Arc<OnceLock<Arc<PageStore>>>,
) -> io::Result<()> {
    let set = handled_signals();
    // SAFETY: `set` is an initialized signal set that outlives the call; -1 asks for a new
    // descriptor. The result is checked before use.
    let raw = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor signalfd just created and nothing else owns.
    let signals = unsafe { OwnedFd::from_raw_fd(raw) };
    threads.spawn("signals", move |exit| loop {
        match exit.wait_readable(signals.as_raw_fd(), None) {
            Ok(Readiness::Readable) => {}
            Ok(Readiness::Stopped) => break,
            Ok(Readiness::TimedOut) => continue,
            Err(error) => {
                warn!("cannot wait for signals any more: {error}");
                break;
            }
        }
        let Some(signal) = read_signal(&signals) else {
            continue;
        };
        match signal {
            libc::SIGTERM | libc::SIGINT => {
                info!("received {}; stopping", signal_name(signal));
                stop.stop();
            }
            libc::SIGHUP => {
                info!("received SIGHUP; ignored: there is no configuration or log file to reopen");
            }
            libc::SIGUSR1 => match store.get() {
                Some(store) => info!("statistics: {}", stats_summary(&store.stats())),
                None => info!("received SIGUSR1 while starting: no statistics yet"),
            },
            other => debug!("received signal {other}, which is not handled"),
        }
    })
}

/// Reads one signal from the signalfd `signals`; `None` when none is pending (or the read was
/// interrupted).
fn read_signal(signals: &OwnedFd) -> Option<libc::c_int> {
    const SIZE: usize = std::mem::size_of::<libc::signalfd_siginfo>();
    let mut info = MaybeUninit::<libc::signalfd_siginfo>::uninit();
    // SAFETY: `info` is valid for writes of SIZE bytes, which is what is passed; a signalfd
    // read writes whole `signalfd_siginfo` records only.
    let read = unsafe { libc::read(signals.as_raw_fd(), info.as_mut_ptr().cast(), SIZE) };
    if usize::try_from(read).ok() != Some(SIZE) {
        return None;
    }
    // SAFETY: the read filled the whole record (checked above).
    let info = unsafe { info.assume_init() };
    libc::c_int::try_from(info.ssi_signo).ok()
}

fn signal_name(signal: libc::c_int) -> &'static str {
    match signal {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGBUS => "SIGBUS",
        _ => "a signal",
    }
}

/// The socket files the SIGBUS handler removes, as C strings prepared before the handler is
/// installed: the handler may only read memory, never allocate.
static SIGBUS_CLEANUP: OnceLock<Vec<CString>> = OnceLock::new();

/// Whether the SIGBUS handler still owns the socket files; cleared before the daemon removes
/// them itself, so a late SIGBUS never unlinks a path another daemon has bound since.
static SIGBUS_CLEANUP_ARMED: AtomicBool = AtomicBool::new(false);

/// Installs a SIGBUS handler that writes one line to stderr, removes `socket_files` and exits
/// with status 1.
///
/// A SIGBUS hits the daemon when it touches guest memory that is no longer backed, which a
/// frontend causes by truncating the file of a region after `SET_MEM_TABLE`: the access cannot
/// be retried or undone, so the daemon ends, but it says why and leaves no socket behind
/// (without this, the process dies silently and a stale socket stays). Call it once, from the
/// program (not a library user), after the sockets exist; [`disarm_sigbus_cleanup`] before the
/// daemon removes them itself.
pub fn exit_cleanly_on_sigbus(socket_files: &[PathBuf]) -> io::Result<()> {
    let paths = socket_files
        .iter()
        .map(|path| CString::new(path.as_os_str().as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "a socket path holds a NUL byte",
            )
        })?;
    if SIGBUS_CLEANUP.set(paths).is_err() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the SIGBUS handler is installed already",
        ));
    }
    SIGBUS_CLEANUP_ARMED.store(true, Ordering::Release);
    // SAFETY: sigaction is plain old data, for which all-zero bytes are a valid value.
    let mut action: libc::sigaction = unsafe { MaybeUninit::zeroed().assume_init() };
    action.sa_sigaction = on_sigbus
        as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)
        as libc::sighandler_t;
    action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    // SAFETY: `action.sa_mask` is a valid signal set to initialize; `action` is fully
    // initialized and outlives the call; the old action is not requested. The handler only
    // makes async-signal-safe calls (write, unlink, _exit) and reads memory prepared before.
    let rc = unsafe {
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Tells the SIGBUS handler to leave the socket files alone: the daemon removes them now.
pub fn disarm_sigbus_cleanup() {
    SIGBUS_CLEANUP_ARMED.store(false, Ordering::Release);
}

/// A fixed buffer a signal handler formats into, without allocating.
struct SignalMessage {
    bytes: [u8; 512],
    len: usize,
}

impl SignalMessage {
    fn push(&mut self, text: &[u8]) {
        for &byte in text {
            if self.len < self.bytes.len() {
                self.bytes[self.len] = byte;
                self.len += 1;
            }
        }
    }

    fn push_decimal(&mut self, mut value: u64) {
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        loop {
            at -= 1;
            digits[at] = b'0' + (value % 10) as u8;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        self.push(&digits[at..]);
    }

    fn push_hex(&mut self, value: u64) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        self.push(b"0x");
        let mut started = false;
        for shift in (0..16).rev() {
            let nibble = ((value >> (shift * 4)) & 0xf) as usize;
            if nibble != 0 || started || shift == 0 {
                started = true;
                self.push(&HEX[nibble..=nibble]);
            }
        }
    }
}

extern "C" fn on_sigbus(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    let mut message = SignalMessage {
        bytes: [0; 512],
        len: 0,
    };
    message.push(b"error: SIGBUS: ");
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler; it is only read.
    let info = unsafe { info.as_ref() };
    match info {
        Some(info) if info.si_code == libc::SI_USER => {
            message.push(b"sent by process ");
            // SAFETY: for SI_USER the kernel fills the sender's pid.
            let pid = unsafe { info.si_pid() };
            message.push_decimal(u64::try_from(pid).unwrap_or(0));
        }
        Some(info) => {
            message.push(b"a memory access at ");
            // SAFETY: for a fault-generated SIGBUS the kernel fills the faulting address.
            let address = unsafe { info.si_addr() } as usize;
            message.push_hex(address as u64);
            message.push(
                b" failed, most likely in guest memory whose file the frontend shrank after sharing it",
            );
        }
        None => message.push(b"a memory access failed"),
    }
    message.push(b"; the guest's data is lost");
    if SIGBUS_CLEANUP_ARMED.load(Ordering::Acquire) {
        message.push(b"; removing the sockets");
    }
    message.push(b" and exiting with status 1\n");
    // SAFETY: write(2) is async-signal-safe; the buffer is valid for `len` bytes. A failed
    // write cannot be reported anywhere, so its result is ignored.
    unsafe {
        libc::write(
            libc::STDERR_FILENO,
            message.bytes.as_ptr().cast(),
            message.len,
        )
    };
    if SIGBUS_CLEANUP_ARMED.load(Ordering::Acquire) {
        for path in SIGBUS_CLEANUP.get().map(Vec::as_slice).unwrap_or(&[]) {
            // SAFETY: unlink(2) is async-signal-safe; `path` is a NUL-terminated string that
            // lives in a static for the rest of the process.
            unsafe { libc::unlink(path.as_ptr()) };
        }
    }
    // SAFETY: _exit(2) is async-signal-safe and does not return.
    unsafe { libc::_exit(1) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_shown_in_binary_units() {
        assert_eq!(bytes_human(0), "0 B");
        assert_eq!(bytes_human(1023), "1023 B");
        assert_eq!(bytes_human(4096), "4.0 KiB");
        assert_eq!(bytes_human(3 << 29), "1.5 GiB");
        assert_eq!(bytes_human(u64::MAX), "16777216.0 TiB");
    }

    #[test]
    fn stats_summary_gives_pages_sizes_and_ratio_only_when_there_is_data() {
        let mut stats = Stats::default();
        stats.mm.mem_used_total = 2048;
        assert_eq!(
            stats_summary(&stats),
            "0 pages stored (0 B of data in 2.0 KiB of memory), 0 same-filled, 0 huge; \
             most memory used 0 B; failed reads 0, failed writes 0, invalid requests 0, \
             pages freed by discard 0"
        );
        stats.mm.orig_data_size = 8192;
        stats.mm.compr_data_size = 2048;
        assert!(stats_summary(&stats).starts_with(
            "2 pages stored (8.0 KiB of data in 2.0 KiB of memory, compression ratio 4.00)"
        ));
    }
}
