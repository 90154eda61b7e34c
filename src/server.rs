// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A bounded server for one-request connections: the control socket and the metrics over HTTP
//! both run on it.
//!
//! # Two stages: waiting for a request, then answering it
//!
//! A connection costs a thread only once its request is complete. Until then it *waits*: one
//! thread (the accept loop) polls the listener and every waiting connection at once, reads what
//! each has sent without blocking, and keeps it in a small buffer. A connection whose request
//! is complete (its terminator arrived, or it closed its side after sending something) is handed
//! to a thread of its own that answers it, at most [`ServerLimits::max_clients`] at once; a
//! complete request beyond that gets the handler's busy response.
//!
//! So a client that drips a byte at a time, or connects and sends nothing, holds a slot in the
//! waiting table and nothing else: it never keeps a thread from a client whose request is
//! complete. The waiting table holds [`ServerLimits::max_waiting`] connections; when it is full
//! a new connection takes the place of the *oldest* waiting one, which gets the busy response.
//! A client that sends its request at once (a scraper, `ctl`) waits for microseconds, so slow
//! clients can only push it out by opening `max_waiting` connections within those
//! microseconds; and each waiting connection still has [`ServerLimits::deadline`] in total, from
//! its accept to the end of its request, however slowly it sends (no timeout that each byte
//! resets).
//!
//! Why this and not a per-connection deadline alone, or an HTTP crate: a shorter deadline only
//! shortens how long each slow client holds a thread, and sixteen slow clients that reconnect
//! at once still hold all eight; an HTTP crate (hyper with tokio, tiny_http) would bring a
//! runtime or its own thread-per-connection pool for one endpoint, and would not protect the
//! control socket, which speaks no HTTP. The waiting table protects both with one `poll` loop.
//!
//! The answering thread writes the response within [`ServerLimits::deadline`] per write (the
//! stream's write timeout), so a client that does not read cannot hold it for long either.
//!
//! The server's threads watch one [`StopSignal`]: at the stop the accept loop drops every
//! waiting connection and joins its answering threads within one deadline before it ends.

use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, warn};

use crate::stop::{StopSignal, Threads};

/// How long a client has, from its accept to the end of its request, and for each write of
/// the response, unless the server is given other [`ServerLimits`].
pub const CLIENT_DEADLINE: Duration = Duration::from_secs(5);

/// How many requests are answered at once, unless the server is given other [`ServerLimits`];
/// more are refused as busy.
pub const MAX_CLIENTS: usize = 8;

/// How many connections may be sending their request at once, unless the server is given
/// other [`ServerLimits`]; a new one beyond that pushes out the oldest.
pub const MAX_WAITING: usize = 64;

/// The most connections accepted in one round of the accept loop, so that a flood of
/// connections cannot keep the loop from reading the ones it has.
const ACCEPTS_PER_ROUND: usize = 64;

/// How a [`BoundedServer`] treats its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Each client's total time to send its request, and each write's time to be taken.
    pub deadline: Duration,
    /// Requests answered at once, each on a thread of its own.
    pub max_clients: usize,
    /// Connections still sending their request, held by the accept loop without a thread.
    pub max_waiting: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            deadline: CLIENT_DEADLINE,
            max_clients: MAX_CLIENTS,
            max_waiting: MAX_WAITING,
        }
    }
}

/// A listening socket a [`BoundedServer`] accepts from.
pub trait Acceptor: AsRawFd + Send + 'static {
    /// The connection type.
    type Stream: Read + Write + AsRawFd + Send + 'static;

    /// Accepts one connection.
    fn accept_one(&self) -> io::Result<Self::Stream>;

    /// Sets the write timeout of `stream`.
    fn set_write_timeout(stream: &Self::Stream, timeout: Duration) -> io::Result<()>;

    /// Makes `stream` blocking or not.
    fn set_nonblocking(stream: &Self::Stream, nonblocking: bool) -> io::Result<()>;
}

impl Acceptor for UnixListener {
    type Stream = UnixStream;

    fn accept_one(&self) -> io::Result<UnixStream> {
        self.accept().map(|(stream, _)| stream)
    }

    fn set_write_timeout(stream: &UnixStream, timeout: Duration) -> io::Result<()> {
        stream.set_write_timeout(Some(timeout))
    }

    fn set_nonblocking(stream: &UnixStream, nonblocking: bool) -> io::Result<()> {
        stream.set_nonblocking(nonblocking)
    }
}

impl Acceptor for TcpListener {
    type Stream = std::net::TcpStream;

    fn accept_one(&self) -> io::Result<std::net::TcpStream> {
        self.accept().map(|(stream, _)| stream)
    }

    fn set_write_timeout(stream: &std::net::TcpStream, timeout: Duration) -> io::Result<()> {
        stream.set_write_timeout(Some(timeout))
    }

    fn set_nonblocking(stream: &std::net::TcpStream, nonblocking: bool) -> io::Result<()> {
        stream.set_nonblocking(nonblocking)
    }
}

/// Why a client's request could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The deadline passed before the request was complete.
    #[error("the request did not arrive before the deadline")]
    Deadline,
    /// The request is longer than allowed.
    #[error("the request is too long")]
    TooLong,
}

/// One connection whose request is complete, on the thread that answers it.
pub struct Client<S> {
    /// The connection (blocking, with the server's write timeout).
    pub stream: S,
}

impl<S: Write> Client<S> {
    /// Writes the whole response, or a part of it.
    pub fn respond(&mut self, response: &[u8]) -> io::Result<()> {
        self.stream.write_all(response)?;
        self.stream.flush()
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// What a [`BoundedServer`] does with each client.
pub trait Handler<S>: Send + Sync + 'static {
    /// The bytes that end a request (a line feed; a blank line for HTTP).
    fn terminator(&self) -> &'static [u8];

    /// The longest request read, terminator included.
    fn max_request_len(&self) -> usize;

    /// Answers `request` (everything the client sent, up to and including the terminator when
    /// it came) on a thread of its own.
    fn serve(&self, request: &[u8], client: &mut Client<S>);

    /// What a client whose request could not be read is sent before it is closed (`None`:
    /// nothing). It is sent without waiting for the client, so it must be short.
    fn refusal(&self, error: &ReadError) -> Option<Vec<u8>>;

    /// The bytes sent to a client refused because [`ServerLimits::max_clients`] requests are
    /// being answered, or pushed out of a full waiting table.
    fn busy_response(&self) -> &'static [u8];
}

/// An accept loop on its own thread that waits for each client's request without a thread of
/// its own and answers each complete request on a thread of its own, within the limits of
/// [`ServerLimits`]. Dropping it stops it.
#[derive(Debug)]
pub struct BoundedServer {
    threads: Threads,
    counts: Arc<Counts>,
    limits: ServerLimits,
}

/// What the accept loop and the answering threads count, for [`BoundedServer`]'s readers.
#[derive(Debug, Default)]
struct Counts {
    /// Requests being answered.
    answering: AtomicUsize,
    /// Connections whose request is still arriving.
    waiting: AtomicUsize,
}

impl BoundedServer {
    /// Serves `listener` with `handler` on a thread named `name` until stopped; the answering
    /// threads are named `name-client`.
    pub fn spawn<L, H>(
        name: &str,
        listener: L,
        handler: H,
        limits: ServerLimits,
    ) -> io::Result<Self>
    where
        L: Acceptor,
        H: Handler<L::Stream>,
    {
        let mut threads = Threads::new();
        // Created now, so that a failure shows here rather than in the accept loop.
        threads.signal().event_fd()?;
        let counts = Arc::new(Counts::default());
        let accept_loop = AcceptLoop {
            listener,
            handler: Arc::new(handler),
            limits,
            counts: counts.clone(),
            waiting: Vec::new(),
            clients: Threads::watching(threads.signal().clone()),
            client_name: format!("{name}-client"),
        };
        threads.spawn(name, move |signal| accept_loop.run(&signal))?;
        Ok(BoundedServer {
            threads,
            counts,
            limits,
        })
    }

    /// How many requests are being answered now.
    pub fn active_clients(&self) -> usize {
        self.counts.answering.load(Ordering::Acquire)
    }

    /// How many connections are still sending their request.
    pub fn waiting_clients(&self) -> usize {
        self.counts.waiting.load(Ordering::Acquire)
    }

    /// Stops accepting, drops the waiting connections and waits for the threads: a request
    /// being answered holds its thread until its answer is written, and a thread still busy
    /// after one deadline more is left behind.
    pub fn stop(mut self) {
        let _ = self
            .threads
            .stop_within(self.limits.deadline + Duration::from_secs(1));
    }

    /// The server's threads, for an owner that stops them with others.
    pub fn into_threads(self) -> Threads {
        self.threads
    }
}

/// A connection whose request is still arriving.
struct Waiting<S> {
    stream: S,
    request: Vec<u8>,
    deadline: Instant,
}

/// What reading a waiting connection found.
enum Progress {
    /// Nothing more to read now; the request is not complete.
    Incomplete,
    /// The request is complete.
    Complete,
    /// The client closed without sending anything, or the connection failed.
    Gone,
    /// The request could not be read.
    Failed(ReadError),
}

struct AcceptLoop<L: Acceptor, H> {
    listener: L,
    handler: Arc<H>,
    limits: ServerLimits,
    counts: Arc<Counts>,
    /// Oldest first.
    waiting: Vec<Waiting<L::Stream>>,
    clients: Threads,
    client_name: String,
}

/// Decrements the answering count when an answering thread ends, however it ends.
struct ActiveClient(Arc<Counts>);

impl Drop for ActiveClient {
    fn drop(&mut self) {
        self.0.answering.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<L: Acceptor, H: Handler<L::Stream>> AcceptLoop<L, H> {
    fn run(mut self, signal: &StopSignal) {
        let stop = match signal.event_fd() {
            Ok(event) => event,
            Err(error) => {
                warn!("{}: {error}", self.client_name);
                return;
            }
        };
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(self.limits.max_waiting + 2);
        loop {
            fds.clear();
            for fd in [stop.as_raw_fd(), self.listener.as_raw_fd()]
                .into_iter()
                .chain(self.waiting.iter().map(|w| w.stream.as_raw_fd()))
            {
                fds.push(libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            let timeout_ms = self
                .waiting
                .iter()
                .map(|w| w.deadline)
                .min()
                .map_or(-1, |deadline| {
                    let left = deadline.saturating_duration_since(Instant::now());
                    // Rounded up, so that a sub-millisecond remainder does not spin.
                    i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
                });
            let nfds = libc::nfds_t::try_from(fds.len()).unwrap_or(libc::nfds_t::MAX);
            // SAFETY: `fds` is a valid, writable array of `nfds` pollfd entries that outlives
            // the call; every descriptor in it stays open meanwhile (the stop eventfd is held,
            // the listener and the waiting streams are owned by `self` and not touched until
            // poll returns).
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), nfds, timeout_ms) };
            if ready < 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                warn!("{}: {error}", self.client_name);
                break;
            }
            if fds[0].revents != 0 || signal.is_stopped() {
                break;
            }
            let readable: Vec<bool> = fds[2..].iter().map(|fd| fd.revents != 0).collect();
            self.read_waiting(&readable);
            self.expire_waiting();
            if fds[1].revents != 0 {
                self.accept_new();
            }
            self.counts
                .waiting
                .store(self.waiting.len(), Ordering::Release);
            self.clients.join_ended().log(self.limits.deadline);
        }
        self.waiting.clear();
        self.counts.waiting.store(0, Ordering::Release);
        // A request being answered ends with its answer; each write is bounded by the deadline.
        let _ = self.clients.stop_within(self.limits.deadline);
    }

    /// Reads the waiting connections marked readable (in the order of `self.waiting`), and
    /// hands on, refuses or drops those that are done waiting.
    fn read_waiting(&mut self, readable: &[bool]) {
        let mut index = 0;
        let mut flags = readable.iter();
        while index < self.waiting.len() {
            if !flags.next().copied().unwrap_or(false) {
                index += 1;
                continue;
            }
            let progress = read_available(
                &mut self.waiting[index],
                self.handler.terminator(),
                self.handler.max_request_len(),
            );
            match progress {
                Progress::Incomplete => index += 1,
                Progress::Complete => {
                    let waiting = self.waiting.remove(index);
                    self.answer(waiting);
                }
                Progress::Gone => {
                    self.waiting.remove(index);
                }
                Progress::Failed(error) => {
                    let waiting = self.waiting.remove(index);
                    self.refuse(waiting.stream, &error);
                }
            }
        }
    }

    /// Refuses the waiting connections whose deadline has passed.
    fn expire_waiting(&mut self) {
        let now = Instant::now();
        let mut index = 0;
        while index < self.waiting.len() {
            if self.waiting[index].deadline <= now {
                let waiting = self.waiting.remove(index);
                debug!("{}: a request did not arrive in time", self.client_name);
                self.refuse(waiting.stream, &ReadError::Deadline);
            } else {
                index += 1;
            }
        }
    }

    /// Accepts what the listener has, up to [`ACCEPTS_PER_ROUND`]; a full waiting table
    /// pushes out its oldest connection for each new one.
    fn accept_new(&mut self) {
        for _ in 0..ACCEPTS_PER_ROUND {
            let stream = match self.listener.accept_one() {
                Ok(stream) => stream,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                Err(error) => {
                    debug!("{} accept: {error}", self.client_name);
                    return;
                }
            };
            if let Err(error) = L::set_nonblocking(&stream, true) {
                debug!("{}: {error}", self.client_name);
                continue;
            }
            if self.limits.max_waiting == 0 {
                send_without_waiting(stream, self.handler.busy_response());
                continue;
            }
            if self.waiting.len() >= self.limits.max_waiting {
                let oldest = self.waiting.remove(0);
                debug!(
                    "{}: {} connections are sending their request; dropping the oldest",
                    self.client_name, self.limits.max_waiting
                );
                send_without_waiting(oldest.stream, self.handler.busy_response());
            }
            self.waiting.push(Waiting {
                stream,
                request: Vec::new(),
                deadline: Instant::now() + self.limits.deadline,
            });
        }
    }

    fn refuse(&self, stream: L::Stream, error: &ReadError) {
        if let Some(response) = self.handler.refusal(error) {
            send_without_waiting(stream, &response);
        }
    }

    /// Hands a complete request to a thread of its own, or answers busy when
    /// [`ServerLimits::max_clients`] are being answered.
    fn answer(&mut self, waiting: Waiting<L::Stream>) {
        if self.counts.answering.load(Ordering::Acquire) >= self.limits.max_clients {
            send_without_waiting(waiting.stream, self.handler.busy_response());
            return;
        }
        let Waiting {
            stream, request, ..
        } = waiting;
        if let Err(error) = L::set_nonblocking(&stream, false)
            .and_then(|()| L::set_write_timeout(&stream, self.limits.deadline))
        {
            debug!("{}: {error}", self.client_name);
            return;
        }
        self.counts.answering.fetch_add(1, Ordering::AcqRel);
        let guard = ActiveClient(self.counts.clone());
        let mut client = Client { stream };
        let handler = self.handler.clone();
        let spawned = self.clients.spawn(self.client_name.clone(), move |_| {
            let _guard = guard;
            handler.serve(&request, &mut client);
        });
        if let Err(error) = spawned {
            warn!(
                "{}: cannot start a client thread: {error}",
                self.client_name
            );
        }
    }
}

/// Reads what `waiting` has sent without blocking, until the terminator, `max_len` bytes, the
/// end of what is there, or the end of the stream.
fn read_available<S: Read>(
    waiting: &mut Waiting<S>,
    terminator: &[u8],
    max_len: usize,
) -> Progress {
    let mut chunk = [0u8; 1024];
    loop {
        let want = chunk
            .len()
            .min((max_len + 1).saturating_sub(waiting.request.len()));
        let read = match waiting.stream.read(&mut chunk[..want]) {
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Progress::Incomplete,
            Err(_) => return Progress::Gone,
        };
        if read == 0 {
            // A client that closes its side after sending something has sent its request.
            return if waiting.request.is_empty() {
                Progress::Gone
            } else {
                Progress::Complete
            };
        }
        let searched_from = waiting.request.len().saturating_sub(terminator.len() - 1);
        waiting.request.extend_from_slice(&chunk[..read]);
        if let Some(at) = find(&waiting.request[searched_from..], terminator) {
            waiting
                .request
                .truncate(searched_from + at + terminator.len());
            return Progress::Complete;
        }
        if waiting.request.len() > max_len {
            return Progress::Failed(ReadError::TooLong);
        }
    }
}

/// Sends `response` to a non-blocking stream without waiting for the client (what does not fit
/// in the socket's buffer is lost), then closes the connection.
fn send_without_waiting<S: Write>(mut stream: S, response: &[u8]) {
    let _ = stream.write(response);
}
