// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A bounded server for one-request connections: the control socket and the metrics over HTTP
//! both run on it.
//!
//! An accept loop on a thread of its own serves every client on a thread of its own, at most
//! [`ServerLimits::max_clients`] at once; a client beyond that gets the handler's busy response
//! and is closed at once. Each client has [`ServerLimits::deadline`] in total, from its accept
//! to the end of its request, however slowly it sends: a client that drips a byte at a time is
//! cut off at the deadline instead of resetting a timeout with every byte, and the same
//! deadline bounds the write of the response.
//!
//! The server's threads watch one [`StopSignal`]: at the stop the accept loop ends, every read
//! of a request ends at once, and the accept loop joins its client threads within one deadline
//! before it ends itself.

use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, warn};

use crate::stop::{Readiness, StopSignal, Threads};

/// How long a client has, from its accept to the end of its request, and again to take the
/// response, unless the server is given other [`ServerLimits`].
pub const CLIENT_DEADLINE: Duration = Duration::from_secs(5);

/// How many clients are served at once, unless the server is given other [`ServerLimits`];
/// more are refused as busy.
pub const MAX_CLIENTS: usize = 8;

/// How a [`BoundedServer`] treats its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Each client's total time to send its request (and, separately, to take the response).
    pub deadline: Duration,
    /// Clients served at once.
    pub max_clients: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            deadline: CLIENT_DEADLINE,
            max_clients: MAX_CLIENTS,
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
}

impl Acceptor for UnixListener {
    type Stream = UnixStream;

    fn accept_one(&self) -> io::Result<UnixStream> {
        self.accept().map(|(stream, _)| stream)
    }

    fn set_write_timeout(stream: &UnixStream, timeout: Duration) -> io::Result<()> {
        stream.set_write_timeout(Some(timeout))
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
    /// The client closed the connection before sending anything.
    #[error("the client closed the connection without a request")]
    Closed,
    /// The server is stopping.
    #[error("the server is stopping")]
    Stopping,
    /// Reading failed.
    #[error("reading the request failed")]
    Io(#[source] io::Error),
}

/// One accepted connection with its deadline.
pub struct Client<S> {
    /// The connection.
    pub stream: S,
    deadline: Instant,
    stop: StopSignal,
}

impl<S: Read + Write + AsRawFd> Client<S> {
    /// Reads until `terminator` has arrived, at most `max_len` bytes, before the deadline. A
    /// client that closes its side after sending something gets what it sent treated as the
    /// request. Returns everything read, the terminator included.
    pub fn read_request(
        &mut self,
        terminator: &[u8],
        max_len: usize,
    ) -> Result<Vec<u8>, ReadError> {
        let mut request = Vec::with_capacity(max_len.min(4096));
        let mut chunk = [0u8; 1024];
        loop {
            if Instant::now() >= self.deadline {
                return Err(ReadError::Deadline);
            }
            match self
                .stop
                .wait_readable(self.stream.as_raw_fd(), Some(self.deadline))
                .map_err(ReadError::Io)?
            {
                Readiness::Readable => {}
                Readiness::Stopped => return Err(ReadError::Stopping),
                Readiness::TimedOut => return Err(ReadError::Deadline),
            }
            let want = chunk.len().min(max_len + 1 - request.len());
            let read = match self.stream.read(&mut chunk[..want]) {
                Ok(read) => read,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(ReadError::Io(error)),
            };
            if read == 0 {
                return if request.is_empty() {
                    Err(ReadError::Closed)
                } else {
                    Ok(request)
                };
            }
            let searched_from = request.len().saturating_sub(terminator.len() - 1);
            request.extend_from_slice(&chunk[..read]);
            if let Some(at) = find(&request[searched_from..], terminator) {
                request.truncate(searched_from + at + terminator.len());
                return Ok(request);
            }
            if request.len() > max_len {
                return Err(ReadError::TooLong);
            }
        }
    }

    /// Writes the whole response.
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
    /// Reads one request from `client` and answers it.
    fn serve(&self, client: &mut Client<S>);

    /// The bytes sent to a client refused because [`ServerLimits::max_clients`] are being
    /// served.
    fn busy_response(&self) -> &'static [u8];
}

/// An accept loop on its own thread that serves each client on a thread of its own, at most
/// [`ServerLimits::max_clients`] at once, each within [`ServerLimits::deadline`]. Dropping it
/// stops it.
#[derive(Debug)]
pub struct BoundedServer {
    threads: Threads,
    active: Arc<AtomicUsize>,
    limits: ServerLimits,
}

impl BoundedServer {
    /// Serves `listener` with `handler` on a thread named `name` until stopped; the client
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
        let active = Arc::new(AtomicUsize::new(0));
        let accept_loop = AcceptLoop {
            listener,
            handler: Arc::new(handler),
            limits,
            active: active.clone(),
            clients: Threads::watching(threads.signal().clone()),
            client_name: format!("{name}-client"),
        };
        threads.spawn(name, move |signal| accept_loop.run(&signal))?;
        Ok(BoundedServer {
            threads,
            active,
            limits,
        })
    }

    /// How many clients are being served now.
    pub fn active_clients(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Stops accepting, ends every client's read at once and waits for the threads: a client
    /// still taking its response holds its thread at most one deadline more, and a client
    /// thread still busy after that is left behind.
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

struct AcceptLoop<L: Acceptor, H> {
    listener: L,
    handler: Arc<H>,
    limits: ServerLimits,
    active: Arc<AtomicUsize>,
    clients: Threads,
    client_name: String,
}

/// Decrements the active-client count when a client thread ends, however it ends.
struct ActiveClient(Arc<AtomicUsize>);

impl Drop for ActiveClient {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<L: Acceptor, H: Handler<L::Stream>> AcceptLoop<L, H> {
    fn run(mut self, signal: &StopSignal) {
        loop {
            match signal.wait_readable(self.listener.as_raw_fd(), None) {
                Ok(Readiness::Readable) => {}
                Ok(Readiness::Stopped | Readiness::TimedOut) => break,
                Err(error) => {
                    warn!("{}: {error}", self.client_name);
                    break;
                }
            }
            match self.listener.accept_one() {
                Ok(stream) => self.admit(stream, signal),
                Err(error) => debug!("{} accept: {error}", self.client_name),
            }
            self.clients.join_ended().log(self.limits.deadline);
        }
        // Every read ends at the stop; a response is written within one deadline.
        let _ = self.clients.stop_within(self.limits.deadline);
    }

    fn admit(&mut self, stream: L::Stream, signal: &StopSignal) {
        let _ = L::set_write_timeout(&stream, self.limits.deadline);
        if self.active.load(Ordering::Acquire) >= self.limits.max_clients {
            refuse(stream, self.handler.busy_response());
            return;
        }
        self.active.fetch_add(1, Ordering::AcqRel);
        let guard = ActiveClient(self.active.clone());
        let mut client = Client {
            stream,
            deadline: Instant::now() + self.limits.deadline,
            stop: signal.clone(),
        };
        let handler = self.handler.clone();
        let spawned = self.clients.spawn(self.client_name.clone(), move |_| {
            let _guard = guard;
            handler.serve(&mut client);
        });
        if let Err(error) = spawned {
            warn!(
                "{}: cannot start a client thread: {error}",
                self.client_name
            );
        }
    }
}

/// Sends `response` to a refused client without waiting for it, then closes the connection.
fn refuse<S: Write + AsRawFd>(mut stream: S, response: &[u8]) {
    // SAFETY: fcntl(2) on a descriptor `stream` owns; no pointers.
    let flags = unsafe { libc::fcntl(stream.as_raw_fd(), libc::F_GETFL) };
    if flags >= 0 {
        // SAFETY: as above; setting O_NONBLOCK on our own descriptor.
        unsafe { libc::fcntl(stream.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) };
    }
    let _ = stream.write(response);
}
