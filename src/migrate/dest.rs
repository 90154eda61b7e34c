// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The receiving side: listen, accept the one authenticated source, receive into the empty
//! store, and decide when the store is complete.
//!
//! **Completeness** (DESIGN.md, "Live migration"): the store may be served once `Synced` has
//! arrived with no `Resumed` after it, *and* the source has given the device up: it either
//! answered this side's `Started` with `Granted`, or sent `Close` after `Synced`. A stream
//! that ends after `Synced` without either is incomplete: the source may have resumed the VM
//! and failed to say so, and a stale page must never be served.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::wire::{self, Conn, Endpoint, FrameReader, FrameWriter, Kind, Token};
use super::{
    join_within, lock, MigrateError, MigrationOptions, MigrationRole, MigrationState,
    MigrationStatus, Progress,
};
use crate::store::migrate::StoreShape;
use crate::store::PageStore;

/// How often the accept loop looks for a peer or a cancel.
const ACCEPT_POLL: Duration = Duration::from_millis(20);

#[derive(Debug, Default)]
struct Stream {
    synced: bool,
    /// `Started` went out for the current `Synced`.
    started_sent: bool,
    granted: bool,
    closed: bool,
    /// The receiver ended (the stream is over, cleanly or not).
    ended: bool,
    cancel: bool,
    /// Why the stream failed.
    error: Option<String>,
}

#[derive(Debug)]
struct Shared {
    store: Arc<PageStore>,
    at: String,
    progress: Mutex<Progress>,
    stream: Mutex<Stream>,
    wake: Condvar,
    /// The writing half, once a source is authenticated.
    writer: Mutex<Option<FrameWriter>>,
    conn: Mutex<Option<Conn>>,
    options: MigrationOptions,
}

/// A destination waiting for (or receiving) a migration's pages.
#[derive(Debug)]
pub struct Incoming {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

enum Listener {
    Unix(UnixListener, std::path::PathBuf),
    Tcp(std::net::TcpListener),
}

impl Listener {
    fn bind(at: &Endpoint) -> Result<Listener, MigrateError> {
        let failed = |source| MigrateError::Io {
            what: format!("the migration endpoint {at} could not be bound"),
            source,
        };
        let listener = match at {
            Endpoint::Unix(path) => {
                match std::fs::symlink_metadata(path) {
                    Ok(meta) if meta.file_type().is_socket() => {
                        // A stale socket from an earlier run.
                        std::fs::remove_file(path).map_err(failed)?;
                    }
                    Ok(_) => {
                        return Err(MigrateError::Refused(format!(
                            "{} exists and is not a socket; it is left alone",
                            path.display()
                        )))
                    }
                    Err(_) => {}
                }
                Listener::Unix(UnixListener::bind(path).map_err(failed)?, path.clone())
            }
            Endpoint::Tcp(address) => {
                Listener::Tcp(std::net::TcpListener::bind(address).map_err(failed)?)
            }
        };
        let nonblocking = match &listener {
            Listener::Unix(l, _) => l.set_nonblocking(true),
            Listener::Tcp(l) => l.set_nonblocking(true),
        };
        nonblocking.map_err(failed)?;
        Ok(listener)
    }

    /// A waiting peer, if any.
    fn accept(&self) -> std::io::Result<Option<Conn>> {
        let accepted = match self {
            Listener::Unix(l, _) => l
                .accept()
                .map(|(s, _)| s.set_nonblocking(false).map(|()| Conn::Unix(s))),
            Listener::Tcp(l) => l
                .accept()
                .map(|(s, _)| s.set_nonblocking(false).map(|()| Conn::Tcp(s))),
        };
        match accepted {
            Ok(conn) => conn.map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Incoming {
    /// Binds `at` and receives a migration into `store`, which must be empty, from the one
    /// source that proves `token` (required for TCP). Returns once bound; the receiving runs
    /// on its own thread.
    pub fn listen(
        store: Arc<PageStore>,
        at: Endpoint,
        token: Option<Token>,
    ) -> Result<Incoming, MigrateError> {
        Incoming::listen_with(store, at, token, MigrationOptions::default())
    }

    /// [`Incoming::listen`] with explicit bounds.
    pub fn listen_with(
        store: Arc<PageStore>,
        at: Endpoint,
        token: Option<Token>,
        options: MigrationOptions,
    ) -> Result<Incoming, MigrateError> {
        if matches!(at, Endpoint::Tcp(_)) && token.is_none() {
            return Err(MigrateError::Refused(format!(
                "an incoming migration over TCP ({at}) needs a token (--migrate-token); only \
                 unix: endpoints go without one"
            )));
        }
        let stats = store.stats();
        if stats.mm.orig_data_size != 0 || stats.info.damaged_pages != 0 {
            return Err(MigrateError::Refused(format!(
                "a migration is received into an empty device; this one holds {} bytes",
                stats.mm.orig_data_size
            )));
        }
        let listener = Listener::bind(&at)?;
        let shared = Arc::new(Shared {
            store,
            at: at.to_string(),
            progress: Mutex::new(Progress::new()),
            stream: Mutex::new(Stream::default()),
            wake: Condvar::new(),
            writer: Mutex::new(None),
            conn: Mutex::new(None),
            options,
        });
        let thread = std::thread::Builder::new()
            .name("migrate-recv".into())
            .spawn({
                let shared = Arc::clone(&shared);
                move || receive(&shared, listener, token.as_ref())
            })
            .map_err(|source| MigrateError::Io {
                what: "the migration thread could not be started".into(),
                source,
            })?;
        Ok(Incoming {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Called when the destination's queues start: `Ok` once the store is complete (module
    /// doc), after telling the source (`Started`) and hearing it give the device up. `Err`
    /// with a sentence if the stream failed, was cancelled, ended incomplete, or `timeout`
    /// passed first: the device must not start then.
    pub fn wait_ready(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut stream = lock(&self.shared.stream);
        loop {
            if let Some(error) = &stream.error {
                return Err(format!(
                    "the migration from {} failed: {error}",
                    self.shared.at
                ));
            }
            if stream.synced && (stream.granted || stream.closed) {
                drop(stream);
                lock(&self.shared.progress).finish(MigrationState::Completed, None);
                return Ok(());
            }
            if stream.ended {
                return Err(format!(
                    "the migration stream from {} ended before the source gave the device up; \
                     its pages are incomplete",
                    self.shared.at
                ));
            }
            if stream.synced && !stream.started_sent {
                stream.started_sent = true;
                drop(stream);
                let sent = match lock(&self.shared.writer).as_mut() {
                    Some(writer) => writer.send_frame(Kind::Started, &[]),
                    None => Err(MigrateError::Protocol("no source is connected".into())),
                };
                match sent {
                    Ok(()) => {}
                    Err(e) if e.peer_hung_up() => {
                        // The source may have given the device up already: its frontend
                        // left after Synced, it sent Close and shut its stream down, and
                        // that Close is still to be read here. What it sent decides, not
                        // this write: Close completes the store, and a stream that ends
                        // without it fails (the receiver's check).
                        log::info!(
                            "migration from {}: the source hung up before Started reached it \
                             ({}); waiting for what it sent last",
                            self.shared.at,
                            e.sentence()
                        );
                    }
                    Err(e) => {
                        let error = format!(
                            "the source could not be told that the device starts: {}",
                            e.sentence()
                        );
                        self.fail(&error);
                        return Err(error);
                    }
                }
                stream = lock(&self.shared.stream);
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                let state = lock(&self.shared.progress).state;
                return Err(format!(
                    "the migration from {} is not complete after {timeout:?} (state {state}); \
                     the device does not start",
                    self.shared.at
                ));
            }
            stream = self
                .shared
                .wake
                .wait_timeout(stream, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// A snapshot of the progress.
    pub fn status(&self) -> MigrationStatus {
        lock(&self.shared.progress).snapshot(MigrationRole::Destination, &self.shared.at)
    }

    /// Cancels the migration: the stream is closed and the store is never complete.
    pub fn cancel(&self) {
        {
            let mut stream = lock(&self.shared.stream);
            stream.cancel = true;
            if !lock(&self.shared.progress).state.is_final() && stream.error.is_none() {
                stream.error = Some("the migration was cancelled on the destination".into());
            }
        }
        lock(&self.shared.progress).finish(
            MigrationState::Cancelled,
            Some("the migration was cancelled on the destination".into()),
        );
        if let Some(writer) = lock(&self.shared.writer).as_mut() {
            let _ = writer.send_frame(Kind::Cancel, &[]);
        }
        self.shared.wake.notify_all();
        self.shared.shutdown();
    }

    /// Waits up to `timeout` for the receiving thread to end; returns whether it did.
    pub fn join(&self, timeout: Duration) -> bool {
        join_within(&self.thread, timeout)
    }

    fn fail(&self, error: &str) {
        self.shared.fail(error);
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        lock(&self.shared.stream).cancel = true;
        self.shared.shutdown();
        let bound = self.shared.options.stall_timeout + Duration::from_secs(1);
        if !self.join(bound) {
            log::error!("the migration thread did not end within {bound:?}; it is left behind");
        }
    }
}

impl Shared {
    fn shutdown(&self) {
        if let Some(conn) = lock(&self.conn).as_ref() {
            conn.shutdown();
        }
    }

    /// Records a failure (the first one wins) and wakes a waiting start.
    fn fail(&self, error: &str) {
        {
            let mut stream = lock(&self.stream);
            if stream.error.is_none() {
                stream.error = Some(error.to_owned());
            }
        }
        lock(&self.progress).finish(MigrationState::Failed, Some(error.to_owned()));
        self.wake.notify_all();
        self.shutdown();
    }
}

/// The receiving thread.
fn receive(shared: &Arc<Shared>, listener: Listener, token: Option<&Token>) {
    let result = accept_source(shared, &listener, token).and_then(|reader| {
        drop(listener);
        lock(&shared.progress).state = MigrationState::Precopy;
        receive_pages(shared, reader)
    });
    match result {
        Ok(()) => {}
        Err(MigrateError::Cancelled(text)) => {
            let mut stream = lock(&shared.stream);
            if stream.error.is_none() {
                stream.error = Some(text.clone());
            }
            drop(stream);
            lock(&shared.progress).finish(MigrationState::Cancelled, Some(text));
        }
        Err(e) => {
            let cancelled = lock(&shared.stream).cancel;
            if !cancelled {
                log::warn!("migration from {}: {}", shared.at, e.sentence());
                // Tell the source why, before hanging up (best effort).
                if let Some(writer) = lock(&shared.writer).as_mut() {
                    let _ = writer.send_frame(Kind::Refused, e.sentence().as_bytes());
                }
                shared.fail(&e.sentence());
            }
        }
    }
    lock(&shared.stream).ended = true;
    shared.wake.notify_all();
}

/// Waits for a source that authenticates and sends a shape this store can take; refuses
/// others (up to the bound of attempts).
fn accept_source(
    shared: &Arc<Shared>,
    listener: &Listener,
    token: Option<&Token>,
) -> Result<FrameReader, MigrateError> {
    let mut refused = 0;
    loop {
        if lock(&shared.stream).cancel {
            return Err(MigrateError::Cancelled(
                "the migration was cancelled on the destination".into(),
            ));
        }
        let conn = match listener.accept() {
            Ok(Some(conn)) => conn,
            Ok(None) => {
                std::thread::sleep(ACCEPT_POLL);
                continue;
            }
            Err(source) => {
                return Err(MigrateError::Io {
                    what: format!("no source could be accepted on {}", shared.at),
                    source,
                })
            }
        };
        match handshake(shared, conn, token) {
            Ok(reader) => return Ok(reader),
            Err(Handshake::WrongPeer(e)) => {
                refused += 1;
                log::warn!(
                    "migration: a peer on {} was refused ({refused} so far): {}",
                    shared.at,
                    e.sentence()
                );
                lock(&shared.progress).error = Some(format!("refused a peer: {}", e.sentence()));
                if refused >= shared.options.accept_attempts {
                    return Err(MigrateError::Refused(format!(
                        "{refused} peers were refused on {}; the last: {}",
                        shared.at,
                        e.sentence()
                    )));
                }
            }
            Err(Handshake::Fatal(e)) => return Err(e),
        }
    }
}

enum Handshake {
    /// Not our source (its hello or its proof failed): keep listening.
    WrongPeer(MigrateError),
    /// Our source, but the migration cannot go on.
    Fatal(MigrateError),
}

/// The destination's half of the handshake: the source's hello, this side's hello and
/// proof, the source's proof, the source's shape.
fn handshake(
    shared: &Arc<Shared>,
    conn: Conn,
    token: Option<&Token>,
) -> Result<FrameReader, Handshake> {
    let wrong = Handshake::WrongPeer;
    let setup = |source| {
        Handshake::WrongPeer(MigrateError::Io {
            what: "a peer's stream could not be set up".into(),
            source,
        })
    };
    conn.set_stall_timeout(shared.options.stall_timeout)
        .map_err(setup)?;
    let mut reader = FrameReader::new(conn.try_clone().map_err(setup)?);
    let shutdown = conn.try_clone().map_err(setup)?;
    let mut writer = FrameWriter::new(conn);
    let theirs = match reader.next() {
        Ok(Some((Kind::Hello, payload))) => {
            wire::check_hello(payload, wire::ROLE_SOURCE, token.is_some())
        }
        Ok(Some((kind, _))) => Err(MigrateError::Protocol(format!(
            "a peer sent {kind:?} instead of its hello"
        ))),
        Ok(None) => Err(MigrateError::Protocol(
            "a peer left before its hello".into(),
        )),
        Err(e) => Err(e),
    };
    let theirs = match theirs {
        Ok(nonce) => nonce,
        Err(e) => {
            let _ = writer.send_frame(Kind::Refused, e.to_string().as_bytes());
            return Err(wrong(e));
        }
    };
    let ours = wire::nonce().map_err(Handshake::Fatal)?;
    writer
        .send_frame(
            Kind::Hello,
            &wire::hello(wire::ROLE_DEST, token.is_some(), &ours),
        )
        .map_err(wrong)?;
    if let Some(token) = token {
        writer
            .send_frame(Kind::Proof, &token.prove(b"destination", &theirs, &ours))
            .map_err(wrong)?;
        let proven = match reader.next() {
            Ok(Some((Kind::Proof, proof))) => token.verify(b"source", &theirs, &ours, proof),
            Ok(Some((Kind::Refused, text))) => {
                return Err(wrong(MigrateError::Refused(format!(
                    "the peer refused: {}",
                    wire::peer_sentence(text)
                ))))
            }
            Ok(_) => false,
            Err(e) => return Err(wrong(e)),
        };
        if !proven {
            let error = "the peer does not hold the migration token";
            let _ = writer.send_frame(Kind::Refused, error.as_bytes());
            return Err(wrong(MigrateError::Refused(error.into())));
        }
    }
    // Authenticated: from here on a failure ends the migration.
    let shape = match reader.next() {
        Ok(Some((Kind::Shape, payload))) => parse_shape(payload),
        Ok(Some((Kind::Refused, text))) => Err(MigrateError::Refused(format!(
            "the source refused: {}",
            wire::peer_sentence(text)
        ))),
        Ok(Some((kind, _))) => Err(MigrateError::Protocol(format!(
            "the source sent {kind:?} instead of its device's shape"
        ))),
        Ok(None) => Err(MigrateError::Protocol(
            "the source left before describing its device".into(),
        )),
        Err(e) => Err(e),
    }
    .map_err(Handshake::Fatal)?;
    if let Err(mismatch) = shared.store.check_shape(&shape) {
        let error = format!("the devices do not match: {mismatch}");
        let _ = writer.send_frame(Kind::Refused, error.as_bytes());
        return Err(Handshake::Fatal(MigrateError::Refused(error)));
    }
    *lock(&shared.conn) = Some(shutdown);
    *lock(&shared.writer) = Some(writer);
    lock(&shared.progress).error = None;
    Ok(reader)
}

/// Parses a Shape frame: `capacity: u64`, `page_size: u32`, then each algorithm's name as
/// `len: u16` and its bytes.
fn parse_shape(payload: &[u8]) -> Result<StoreShape, MigrateError> {
    let bad = || MigrateError::Protocol("the source's device shape is malformed".into());
    let capacity = payload.get(..8).ok_or_else(bad)?;
    let page_size = payload.get(8..12).ok_or_else(bad)?;
    let mut rest = &payload[12..];
    let mut algorithms = Vec::new();
    while !rest.is_empty() {
        let len = rest.get(..2).ok_or_else(bad)?;
        let len = usize::from(u16::from_le_bytes([len[0], len[1]]));
        let name = rest.get(2..2 + len).ok_or_else(bad)?;
        algorithms.push(String::from_utf8_lossy(name).into_owned());
        rest = &rest[2 + len..];
        if algorithms.len() > crate::store::MAX_SECONDARY + 1 {
            return Err(bad());
        }
    }
    Ok(StoreShape {
        capacity_pages: u64::from_le_bytes(capacity.try_into().map_err(|_| bad())?),
        page_size: u32::from_le_bytes(page_size.try_into().map_err(|_| bad())?),
        algorithms,
    })
}

/// Receives frames until the source closes the stream.
fn receive_pages(shared: &Arc<Shared>, mut reader: FrameReader) -> Result<(), MigrateError> {
    let store = &shared.store;
    let pages = store.capacity_pages();
    loop {
        if lock(&shared.stream).cancel {
            return Err(MigrateError::Cancelled(
                "the migration was cancelled on the destination".into(),
            ));
        }
        lock(&shared.progress).wire_bytes = reader.read;
        let Some((kind, payload)) = reader.next()? else {
            let stream = lock(&shared.stream);
            if stream.closed || stream.granted {
                return Ok(());
            }
            return Err(MigrateError::Protocol(format!(
                "the source closed the stream {}",
                if stream.synced {
                    "after Synced without giving the device up"
                } else {
                    "before every page was sent"
                }
            )));
        };
        match kind {
            Kind::Batch => {
                let records = wire::parse_batch(payload, pages)?;
                let mut stored = 0u64;
                for (index, page) in &records {
                    store.import_slot(*index, *page).map_err(|e| {
                        MigrateError::Refused(format!(
                            "page {index} could not be stored on this device: {e}"
                        ))
                    })?;
                    if let crate::store::migrate::StoredPage::Compressed { object, .. } = page {
                        stored += object.len() as u64;
                    } else if let crate::store::migrate::StoredPage::Raw(_) = page {
                        stored += crate::PAGE_SIZE as u64;
                    }
                }
                let mut progress = lock(&shared.progress);
                progress.pages += records.len() as u64;
                progress.stored_bytes += stored;
            }
            Kind::Dictionary => store
                .import_zstd_dictionary(payload)
                .map_err(MigrateError::Refused)?,
            Kind::RoundEnd => {
                let number = |at: usize| {
                    payload
                        .get(at..at + 8)
                        .and_then(|b| b.try_into().ok())
                        .map(u64::from_le_bytes)
                        .unwrap_or(0)
                };
                let mut progress = lock(&shared.progress);
                progress.rounds = number(0);
                progress.dirty_pages = number(8);
            }
            Kind::Synced => {
                lock(&shared.stream).synced = true;
                let mut progress = lock(&shared.progress);
                progress.state = MigrationState::Synced;
                progress.dirty_pages = 0;
                drop(progress);
                shared.wake.notify_all();
            }
            Kind::Resumed => {
                {
                    let mut stream = lock(&shared.stream);
                    stream.synced = false;
                    stream.started_sent = false;
                }
                lock(&shared.progress).state = MigrationState::Precopy;
                shared.wake.notify_all();
            }
            Kind::Alive => {
                if let Some(writer) = lock(&shared.writer).as_mut() {
                    match writer.send_frame(Kind::Alive, &[]) {
                        // A source that hung up may have sent Close before it did: read on,
                        // the stream's end decides (as for Started in `wait_ready`).
                        Err(e) if !e.peer_hung_up() => return Err(e),
                        Ok(()) | Err(_) => {}
                    }
                }
            }
            Kind::Granted => {
                let mut stream = lock(&shared.stream);
                // A grant answers a Started of this Synced or, when the source resumed and
                // synced again meanwhile, of an earlier one: either way it comes after the
                // latest Synced on the stream, so every page is here.
                if !stream.synced {
                    return Err(MigrateError::Protocol(
                        "the source granted a start before Synced".into(),
                    ));
                }
                stream.granted = true;
                drop(stream);
                shared.wake.notify_all();
            }
            Kind::Close => {
                let mut stream = lock(&shared.stream);
                if !stream.synced {
                    return Err(MigrateError::Protocol(
                        "the source closed the stream before Synced".into(),
                    ));
                }
                stream.closed = true;
                drop(stream);
                shared.wake.notify_all();
                return Ok(());
            }
            Kind::Cancel => {
                return Err(MigrateError::Cancelled(
                    "the source cancelled the migration".into(),
                ))
            }
            Kind::Refused => {
                return Err(MigrateError::Refused(format!(
                    "the source refused: {}",
                    wire::peer_sentence(payload)
                )))
            }
            Kind::Hello | Kind::Proof | Kind::Shape | Kind::Started => {
                return Err(MigrateError::Protocol(format!(
                    "the source sent {kind:?} in the middle of the stream"
                )))
            }
        }
    }
}
