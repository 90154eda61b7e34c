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
//! A [`StopHandle`] (SIGTERM/SIGINT through [`stop_on_termination_signals`], or a test) ends
//! the daemon at any point; `run` then returns `Ok` and the socket file is removed.
//!
//! Socket files: a path held by a live daemon (a connect succeeds) is refused; a socket file
//! nobody listens on (connect is refused) is stale and replaced; anything that is not a socket
//! is left alone. The socket is created with `--socket-mode` (default 0600) and never exists
//! with wider permissions: the mode is set on the socket before `bind` creates the file.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use log::{debug, info};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::blk::{BlkBackend, BlockBackend, DeviceConfig};
use crate::control::ControlServer;
use crate::recompress::{BackgroundRecompressor, RecompressConfig};
use crate::store::{PageStore, PendingConfig, RecompressError, StoreConfig, StoreError};
use crate::workers::CompressWorkers;

/// The default mode of the vhost-user and control sockets.
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
    /// Mode of socket files the daemon creates.
    pub socket_mode: u32,
    /// The store.
    pub store: StoreConfig,
    /// Compression workers and their pending pool.
    pub pending: PendingConfig,
    /// CPUs to pin the compression workers to (none: not pinned).
    pub worker_cpus: Vec<usize>,
    /// How long a queue thread may poll its ring after serving (zero: it never polls).
    pub poll_max: Duration,
    /// The device as the guest sees it.
    pub device: DeviceConfig,
    /// Where to serve the control protocol, if anywhere.
    pub control_socket: Option<PathBuf>,
    /// Secondary algorithms and background recompression.
    pub recompress: RecompressConfig,
}

/// Why the daemon could not start or failed while running.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The socket path's directory does not exist.
    #[error("the directory {} of the socket path does not exist", .0.display())]
    MissingDirectory(PathBuf),
    /// Another daemon is serving the socket path.
    #[error("the socket {} is in use by a running daemon", .0.display())]
    SocketInUse(PathBuf),
    /// The path exists and is not a socket.
    #[error("{} exists and is not a socket; refusing to replace it", .0.display())]
    NotASocket(PathBuf),
    /// The path is longer than a Unix socket address allows.
    #[error("the socket path {} is longer than the 107 bytes a Unix socket address holds", .0.display())]
    PathTooLong(PathBuf),
    /// Creating or binding the socket failed.
    #[error("cannot create the socket {}", .path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
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
    #[error("invalid recompression settings")]
    Recompress(#[source] RecompressError),
    /// The zstd dictionary file cannot be read.
    #[error("cannot read the zstd dictionary {}", .path.display())]
    ReadDictionary {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The background recompressor could not start.
    #[error("cannot start the background recompressor")]
    Recompressor(#[source] io::Error),
    /// The compression workers could not start.
    #[error("cannot start the compression workers")]
    Workers(#[source] io::Error),
    /// The control server could not start.
    #[error("cannot start the control server")]
    Control(#[source] io::Error),
    /// Waiting for the frontend failed.
    #[error("waiting for the frontend failed")]
    Wait(#[source] io::Error),
    /// The vhost-user machinery failed.
    #[error("the vhost-user connection failed: {0}")]
    VhostUser(String),
}

/// Ends a running [`Daemon`] from another thread.
#[derive(Clone)]
pub struct StopHandle {
    inner: Arc<StopState>,
}

struct StopState {
    event: EventFd,
    requested: AtomicBool,
    connection: Mutex<Option<ShutdownHandle>>,
}

impl StopHandle {
    fn new() -> io::Result<Self> {
        Ok(StopHandle {
            inner: Arc::new(StopState {
                event: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
                requested: AtomicBool::new(false),
                connection: Mutex::new(None),
            }),
        })
    }

    /// Asks the daemon to stop: it stops waiting for a frontend, or closes the connection to
    /// it. Idempotent.
    pub fn stop(&self) {
        self.inner.requested.store(true, Ordering::Release);
        // The eventfd is never read, so it stays readable for every waiter.
        let _ = self.inner.event.write(1);
        if let Ok(connection) = self.inner.connection.lock() {
            if let Some(connection) = connection.as_ref() {
                connection.shutdown();
            }
        }
    }

    /// Whether [`StopHandle::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        self.inner.requested.load(Ordering::Acquire)
    }

    fn event_fd(&self) -> RawFd {
        self.inner.event.as_raw_fd()
    }

    /// Records the live connection, or closes it at once when a stop came first.
    fn set_connection(&self, connection: Option<ShutdownHandle>) {
        if let Ok(mut slot) = self.inner.connection.lock() {
            *slot = connection;
            if self.is_stopped() {
                if let Some(connection) = slot.as_ref() {
                    connection.shutdown();
                }
            }
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

/// A configured daemon, sockets bound, not yet serving.
pub struct Daemon {
    listener: UnixListener,
    socket_file: Option<SocketFile>,
    store: Arc<PageStore>,
    device: DeviceConfig,
    control: Option<(ControlServer, SocketFile)>,
    stop: StopHandle,
    workers: CompressWorkers,
    recompressor: Option<BackgroundRecompressor>,
    poll_max: Duration,
}

impl Daemon {
    /// Creates the store and binds the sockets.
    pub fn new(config: DaemonConfig) -> Result<Self, DaemonError> {
        let stop = StopHandle::new().map_err(DaemonError::Wait)?;
        let store = Arc::new(
            PageStore::with_pending(config.store, config.pending)
                .map_err(DaemonError::Store)?
                .with_secondary_algorithms(&config.recompress.algorithms)
                .map_err(DaemonError::Recompress)?,
        );
        let workers = CompressWorkers::start(store.clone(), &config.worker_cpus)
            .map_err(DaemonError::Workers)?;
        if BlockBackend::capacity_pages(&*store) != config.device.capacity_pages {
            return Err(DaemonError::CapacityMismatch {
                store: BlockBackend::capacity_pages(&*store),
                device: config.device.capacity_pages,
            });
        }
        let (listener, socket_file) = match &config.listen {
            ListenOn::Path(path) => (
                bind_socket(path, config.socket_mode)?,
                Some(SocketFile(path.clone())),
            ),
            ListenOn::Fd(fd) => (listener_from_fd(*fd)?, None),
        };
        if let Some(path) = &config.recompress.zstd_dict {
            // Read at most one byte past the largest dictionary, so a wrong path to a huge
            // file is refused without reading it all.
            let mut raw = Vec::new();
            fs::File::open(path)
                .and_then(|file| {
                    io::Read::read_to_end(
                        &mut io::Read::take(file, crate::codec::MAX_DICTIONARY_BYTES as u64 + 1),
                        &mut raw,
                    )
                })
                .map_err(|source| DaemonError::ReadDictionary {
                    path: path.clone(),
                    source,
                })?;
            let id = store
                .load_zstd_dictionary(&raw)
                .map_err(DaemonError::Recompress)?;
            info!("zstd pages use dictionary {id} from {}", path.display());
        }
        let recompressor = match config.recompress.idle_after {
            Some(idle_after) => Some(
                BackgroundRecompressor::start(store.clone(), idle_after, config.recompress.rate)
                    .map_err(DaemonError::Recompressor)?,
            ),
            None => None,
        };
        let control = match &config.control_socket {
            Some(path) => {
                let listener = bind_socket(path, config.socket_mode)?;
                let file = SocketFile(path.clone());
                let server =
                    ControlServer::spawn(listener, store.clone()).map_err(DaemonError::Control)?;
                Some((server, file))
            }
            None => None,
        };
        Ok(Daemon {
            listener,
            socket_file,
            store,
            device: config.device,
            control,
            stop,
            workers,
            recompressor,
            poll_max: config.poll_max,
        })
    }

    /// A handle that ends [`Daemon::run`].
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// The store the device serves.
    pub fn store(&self) -> &Arc<PageStore> {
        &self.store
    }

    /// Serves one frontend until it disconnects or the daemon is stopped; both are success.
    pub fn run(self) -> Result<(), DaemonError> {
        let Daemon {
            listener,
            socket_file,
            store,
            device,
            control,
            stop,
            workers,
            recompressor,
            poll_max,
        } = self;
        match &socket_file {
            Some(file) => info!("waiting for the frontend on {}", file.0.display()),
            None => info!("waiting for the frontend on the inherited socket"),
        }
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::<()>::new());
        let backend = Arc::new(BlkBackend::new(store, device, mem.clone()));
        backend.set_poll_max(poll_max);
        let mut daemon = VhostUserDaemon::new("vhost-user-zram".to_owned(), backend.clone(), mem)
            .map_err(|error| DaemonError::VhostUser(error.to_string()))?;
        let listener_fd = listener.as_raw_fd();
        let mut listener = Listener::from(listener);
        let result = loop {
            if !wait_readable(listener_fd, stop.event_fd()).map_err(DaemonError::Wait)? {
                info!("stopped before a frontend connected");
                break Ok(());
            }
            if let Err(error) = daemon.start(&mut listener) {
                break Err(DaemonError::VhostUser(error.to_string()));
            }
            stop.set_connection(daemon.shutdown_handle());
            let served = daemon.wait();
            stop.set_connection(None);
            let served = match served {
                Ok(()) => Ok(()),
                Err(vhost_user_backend::Error::HandleRequest(
                    VhostUserError::Disconnected | VhostUserError::PartialMessage,
                )) => Ok(()),
                Err(_) if stop.is_stopped() => Ok(()),
                Err(error) => Err(DaemonError::VhostUser(error.to_string())),
            };
            if stop.is_stopped() {
                info!("stopped by request");
                break served;
            }
            if backend.frontend_spoke() {
                info!("the frontend disconnected; releasing the device");
                break served;
            }
            debug!("a connection closed without a vhost-user message (a liveness probe?)");
        };
        backend.stop();
        for handler in daemon.get_epoll_handlers() {
            handler.send_exit_event();
        }
        drop(daemon);
        if let Some(recompressor) = recompressor {
            recompressor.stop();
        }
        workers.stop();
        if let Some((server, _file)) = control {
            server.stop();
        }
        drop(listener);
        drop(socket_file);
        result
    }
}

/// Blocks until `fd` is readable (`true`) or `stop_fd` is (`false`).
pub(crate) fn wait_readable(fd: RawFd, stop_fd: RawFd) -> io::Result<bool> {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop_fd,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid, writable array of two `pollfd` that outlives the call, and
        // its length is passed exactly.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if ready < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        if fds[1].revents != 0 {
            return Ok(false);
        }
        if fds[0].revents != 0 {
            return Ok(true);
        }
    }
}

/// Creates a listening Unix socket at `path` with permissions `mode`, replacing a stale socket
/// file and refusing a live one.
pub fn bind_socket(path: &Path, mode: u32) -> Result<UnixListener, DaemonError> {
    let directory = match path.parent() {
        Some(parent) if parent.as_os_str().is_empty() => Path::new("."),
        Some(parent) => parent,
        None => Path::new("/"),
    };
    if !directory.is_dir() {
        return Err(DaemonError::MissingDirectory(directory.to_owned()));
    }
    if let Ok(metadata) = fs::symlink_metadata(path) {
        if !metadata.file_type().is_socket() {
            return Err(DaemonError::NotASocket(path.to_owned()));
        }
        match UnixStream::connect(path) {
            Ok(_) => return Err(DaemonError::SocketInUse(path.to_owned())),
            Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
                info!("replacing the stale socket {}", path.display());
                fs::remove_file(path).map_err(|source| DaemonError::Bind {
                    path: path.to_owned(),
                    source,
                })?;
            }
            Err(source) => {
                return Err(DaemonError::Bind {
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
    let bind_error = |source| DaemonError::Bind {
        path: path.to_owned(),
        source,
    };
    let address = socket_address(path.as_os_str())
        .ok_or_else(|| DaemonError::PathTooLong(path.to_owned()))?;
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

fn termination_signals() -> libc::sigset_t {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initializes the set it is given; sigaddset then adds valid signal
    // numbers to that initialized set.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        libc::sigaddset(set.as_mut_ptr(), libc::SIGTERM);
        libc::sigaddset(set.as_mut_ptr(), libc::SIGINT);
        set.assume_init()
    }
}

/// Blocks SIGTERM and SIGINT in the calling thread and, through inheritance, in every thread
/// it starts afterwards. Call first thing in `main`, then
/// [`stop_on_termination_signals`].
pub fn block_termination_signals() -> io::Result<()> {
    let set = termination_signals();
    // SAFETY: `set` is an initialized signal set; the old mask is not requested.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Starts a thread that waits for SIGTERM or SIGINT and stops the daemon through `stop`.
/// The signals must have been blocked with [`block_termination_signals`].
pub fn stop_on_termination_signals(stop: StopHandle) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let set = termination_signals();
            loop {
                let mut signal = 0;
                // SAFETY: `set` is an initialized signal set and `signal` is valid for writes.
                if unsafe { libc::sigwait(&set, &mut signal) } == 0 {
                    info!("received signal {signal}; stopping");
                    stop.stop();
                }
            }
        })
}
