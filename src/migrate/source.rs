// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The sending side: pre-copy rounds, the switchover, a resume on the source, the end.
//!
//! One thread owns the stream's writing half and the store's dirty log; a second reads what
//! the destination sends (heartbeats, `Started`, a refusal). The daemon's calls
//! ([`MigrationSource::queues_stopped`] and the others) set a flag and wake the sender, which
//! acts on the flags in one place, so a `Started` from the destination and a resume of the
//! source's queues are decided in one order: whichever the sender sees first wins, and the
//! other is answered accordingly.
//!
//! The source never changes its store because of a migration: it only reads slots and runs
//! the dirty log, which is turned off when the sender ends, however it ends.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::wire::{self, Conn, Endpoint, FrameReader, FrameWriter, Kind, Token};
use super::{
    join_within, lock, MigrateError, MigrationOptions, MigrationRole, MigrationState,
    MigrationStatus, Progress,
};
use crate::store::migrate::{DirtyTracking, ExportScratch, StoredPage};
use crate::store::PageStore;

/// How long the sender sleeps when a pass found nothing dirty.
const IDLE_PASS: Duration = Duration::from_millis(20);

/// What the daemon asked for, and what the destination said; read by the sender.
#[derive(Debug, Default)]
struct Control {
    cancel: bool,
    /// The source's queues stopped: send the rest and `Synced`.
    stopped: bool,
    /// The sender took `stopped`: `Synced` is on its way or sent, and no `Resumed` after it.
    /// Only a resume handshake lets the source serve again then.
    synced: bool,
    /// The source's queues started: a `Resumed` is wanted (`Some(None)`), or its result.
    resume: Option<Option<Result<(), String>>>,
    frontend_gone: bool,
    /// The destination sent `Started`.
    started: bool,
    /// The reader's error, if the stream broke.
    reader_error: Option<MigrateError>,
}

#[derive(Debug)]
struct Shared {
    store: Arc<PageStore>,
    peer: String,
    progress: Mutex<Progress>,
    control: Mutex<Control>,
    wake: Condvar,
    /// A clone of the connection, to shut it down from outside.
    conn: Mutex<Option<Conn>>,
    options: MigrationOptions,
}

impl Shared {
    fn shutdown(&self) {
        if let Some(conn) = lock(&self.conn).as_ref() {
            conn.shutdown();
        }
    }
}

/// A migration of a store's pages to a destination daemon.
#[derive(Debug)]
pub struct MigrationSource {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl MigrationSource {
    /// Starts migrating `store` to the destination at `to`, proving `token` (required for
    /// TCP). Returns at once; the migration runs on its own thread.
    pub fn start(
        store: Arc<PageStore>,
        to: Endpoint,
        token: Option<Token>,
    ) -> Result<MigrationSource, MigrateError> {
        MigrationSource::start_with(store, to, token, MigrationOptions::default())
    }

    /// [`MigrationSource::start`] with explicit bounds.
    pub fn start_with(
        store: Arc<PageStore>,
        to: Endpoint,
        token: Option<Token>,
        options: MigrationOptions,
    ) -> Result<MigrationSource, MigrateError> {
        if matches!(to, Endpoint::Tcp(_)) && token.is_none() {
            return Err(MigrateError::Refused(format!(
                "a migration over TCP ({to}) needs a token (--migrate-token); only unix: \
                 endpoints go without one"
            )));
        }
        if store.dirty_tracking_active() {
            return Err(MigrateError::Refused(
                "a migration of this device is already running".into(),
            ));
        }
        let shared = Arc::new(Shared {
            store,
            peer: to.to_string(),
            progress: Mutex::new(Progress::new()),
            control: Mutex::new(Control::default()),
            wake: Condvar::new(),
            conn: Mutex::new(None),
            options,
        });
        let thread = std::thread::Builder::new()
            .name("migrate-send".into())
            .spawn({
                let shared = Arc::clone(&shared);
                move || run(&shared, &to, token.as_ref())
            })
            .map_err(|source| MigrateError::Io {
                what: "the migration thread could not be started".into(),
                source,
            })?;
        Ok(MigrationSource {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The VM stopped for switchover (all the source's queues stopped): the sender sends the
    /// remaining dirty pages at once, then `Synced`. Returns at once.
    pub fn queues_stopped(&self) {
        lock(&self.shared.control).stopped = true;
        self.shared.wake.notify_all();
    }

    /// The source's queues start again. Before the daemon serves a request, the destination
    /// must learn that the VM runs here: if a `Synced` went out, a `Resumed` is sent (waiting
    /// up to the resume bound for it to be written) and pre-copy goes on. `Err` when the
    /// daemon must not serve: the destination was granted the device, or `Resumed` could not
    /// be written (the migration then fails).
    pub fn queues_started(&self) -> Result<(), String> {
        let deadline = Instant::now() + self.shared.options.resume_wait;
        let mut control = lock(&self.shared.control);
        {
            let progress = lock(&self.shared.progress);
            match progress.state {
                MigrationState::Completed => {
                    return Err(format!(
                        "the device was migrated to {}, which serves it now; this daemon \
                         must not",
                        self.shared.peer
                    ))
                }
                // Nothing reached a destination that could serve: the pages here are the
                // only ones in use.
                MigrationState::Failed | MigrationState::Cancelled | MigrationState::Idle => {
                    return Ok(())
                }
                MigrationState::Connecting | MigrationState::Precopy | MigrationState::Synced => {}
            }
        }
        if !control.synced {
            // No Synced went out nor will: the destination cannot start from this stream.
            control.stopped = false;
            return Ok(());
        }
        control.resume = Some(None);
        self.shared.wake.notify_all();
        loop {
            if let Some(Some(result)) = &control.resume {
                let result = result.clone();
                control.resume = None;
                return result;
            }
            let now = Instant::now();
            if now >= deadline {
                control.resume = None;
                drop(control);
                let error = format!(
                    "the destination could not be told within {:?} that the VM resumed here",
                    self.shared.options.resume_wait
                );
                lock(&self.shared.progress).finish(MigrationState::Failed, Some(error.clone()));
                self.shared.shutdown();
                // The sender may have granted the destination meanwhile: check once more.
                if lock(&self.shared.progress).state == MigrationState::Completed {
                    return Err("the destination serves the device now".into());
                }
                return Err(error);
            }
            control = self
                .shared
                .wake
                .wait_timeout(control, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The source's frontend went away. After `Synced` this ends the migration: the
    /// destination is told (`Close`) that this daemon will never serve again.
    pub fn frontend_gone(&self) {
        lock(&self.shared.control).frontend_gone = true;
        self.shared.wake.notify_all();
    }

    /// Whether the switchover has begun: the queues stopped, and the last dirty pages and
    /// `Synced` are on their way or sent (no resume since).
    pub fn switching_over(&self) -> bool {
        let control = lock(&self.shared.control);
        control.stopped || control.synced
    }

    /// Cancels the migration (the store keeps every page).
    pub fn cancel(&self) {
        lock(&self.shared.control).cancel = true;
        self.shared.wake.notify_all();
    }

    /// A snapshot of the progress.
    pub fn status(&self) -> MigrationStatus {
        let mut status =
            lock(&self.shared.progress).snapshot(MigrationRole::Source, &self.shared.peer);
        if !status.state.is_final() {
            status.dirty_pages = self.shared.store.migration_dirty_pages();
        }
        status
    }

    /// Waits up to `timeout` for the migration's thread to end; returns whether it did.
    pub fn join(&self, timeout: Duration) -> bool {
        join_within(&self.thread, timeout)
    }
}

impl Drop for MigrationSource {
    fn drop(&mut self) {
        if !lock(&self.shared.progress).state.is_final() {
            self.cancel();
        }
        self.shared.shutdown();
        let bound = self.shared.options.stall_timeout + Duration::from_secs(1);
        if !self.join(bound) {
            log::error!("the migration thread did not end within {bound:?}; it is left behind");
        }
    }
}

/// The sender thread: runs the session and records how it ended.
fn run(shared: &Arc<Shared>, to: &Endpoint, token: Option<&Token>) {
    let mut reader_thread = None;
    let mut result = session(shared, to, token, &mut reader_thread);
    shared.shutdown();
    if let Some(handle) = reader_thread.take() {
        let _ = handle.join();
    }
    if result.is_err() {
        // A write fails with a broken pipe when the destination refused and hung up: its
        // refusal, read by the reader, says why.
        let said = lock(&shared.control).reader_error.take();
        if let Some(e @ (MigrateError::Refused(_) | MigrateError::Cancelled(_))) = said {
            result = Err(e);
        }
    }
    let (state, error) = match result {
        Ok(state) => (state, None),
        Err(e @ MigrateError::Cancelled(_)) => (MigrationState::Cancelled, Some(e.sentence())),
        Err(e) => (MigrationState::Failed, Some(e.sentence())),
    };
    if let Some(error) = &error {
        log::warn!("migration to {}: {error}", shared.peer);
    }
    lock(&shared.progress).finish(state, error);
    {
        let mut control = lock(&shared.control);
        let final_state = lock(&shared.progress).state;
        if let Some(None) = control.resume {
            control.resume = Some(Some(match final_state {
                MigrationState::Completed => {
                    Err("the destination serves the device now".to_owned())
                }
                _ => Ok(()),
            }));
        }
    }
    shared.wake.notify_all();
}

/// Where the sender is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Precopy,
    Synced,
}

struct Sender<'a> {
    shared: &'a Shared,
    store: &'a PageStore,
    writer: FrameWriter,
    scratch: Box<ExportScratch>,
    batch: Vec<u8>,
    dictionaries_sent: usize,
    last_sent: Instant,
    rounds: u64,
}

fn session(
    shared: &Arc<Shared>,
    to: &Endpoint,
    token: Option<&Token>,
    reader_thread: &mut Option<JoinHandle<()>>,
) -> Result<MigrationState, MigrateError> {
    let options = &shared.options;
    let conn = connect(to, options.stall_timeout)?;
    conn.set_stall_timeout(options.stall_timeout)
        .map_err(|source| MigrateError::Io {
            what: "the stream's timeouts could not be set".into(),
            source,
        })?;
    let clone = |conn: &Conn| {
        conn.try_clone().map_err(|source| MigrateError::Io {
            what: "the stream could not be shared between threads".into(),
            source,
        })
    };
    *lock(&shared.conn) = Some(clone(&conn)?);
    let mut reader = FrameReader::new(clone(&conn)?);
    let mut writer = FrameWriter::new(conn);
    authenticate(&mut writer, &mut reader, token)?;
    // Authenticated: the destination hears the shape, then pages.
    let shape = shared.store.store_shape();
    let mut payload = Vec::new();
    payload.extend_from_slice(&shape.capacity_pages.to_le_bytes());
    payload.extend_from_slice(&shape.page_size.to_le_bytes());
    for name in &shape.algorithms {
        let bytes = name.as_bytes();
        let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
        payload.extend_from_slice(&len.to_le_bytes());
        payload.extend_from_slice(&bytes[..usize::from(len)]);
    }
    writer.send_frame(Kind::Shape, &payload)?;
    writer.fault = options.fault;
    let tracking = shared
        .store
        .start_dirty_tracking()
        .map_err(MigrateError::Refused)?;
    *reader_thread = Some(spawn_reader(shared, reader)?);
    lock(&shared.progress).state = MigrationState::Precopy;
    let mut sender = Sender {
        shared,
        store: &shared.store,
        writer,
        scratch: Box::default(),
        batch: Vec::with_capacity(wire::BATCH_BYTES + 8192),
        dictionaries_sent: 0,
        last_sent: Instant::now(),
        rounds: 0,
    };
    sender.run(&tracking)
}

/// Connects to `to`, within `timeout` for TCP.
fn connect(to: &Endpoint, timeout: Duration) -> Result<Conn, MigrateError> {
    let failed = |source| MigrateError::Io {
        what: format!("the destination {to} could not be reached"),
        source,
    };
    match to {
        Endpoint::Unix(path) => std::os::unix::net::UnixStream::connect(path)
            .map(Conn::Unix)
            .map_err(failed),
        Endpoint::Tcp(address) => {
            use std::net::ToSocketAddrs;
            let mut last = std::io::Error::other("the address resolved to nothing");
            for addr in address.to_socket_addrs().map_err(failed)? {
                match std::net::TcpStream::connect_timeout(&addr, timeout) {
                    Ok(stream) => return Ok(Conn::Tcp(stream)),
                    Err(e) => last = e,
                }
            }
            Err(failed(last))
        }
    }
}

/// The source's half of the handshake: hello, the destination's hello and proof (checked
/// before anything else is sent), then this side's proof.
fn authenticate(
    writer: &mut FrameWriter,
    reader: &mut FrameReader,
    token: Option<&Token>,
) -> Result<(), MigrateError> {
    let ours = wire::nonce()?;
    writer.send_frame(
        Kind::Hello,
        &wire::hello(wire::ROLE_SOURCE, token.is_some(), &ours),
    )?;
    let theirs = match expect(reader, "its hello")? {
        (Kind::Hello, payload) => wire::check_hello(payload, wire::ROLE_DEST, token.is_some()),
        (kind, _) => Err(unexpected(kind, "its hello")),
    };
    let theirs = match theirs {
        Ok(nonce) => nonce,
        Err(e) => {
            let _ = writer.send_frame(Kind::Refused, e.to_string().as_bytes());
            return Err(e);
        }
    };
    let Some(token) = token else {
        return Ok(());
    };
    let proven = match expect(reader, "its proof of the token")? {
        (Kind::Proof, proof) => token.verify(b"destination", &ours, &theirs, proof),
        (kind, _) => return Err(unexpected(kind, "its proof of the token")),
    };
    if !proven {
        let error = "the destination does not hold the migration token; nothing was sent";
        let _ = writer.send_frame(Kind::Refused, error.as_bytes());
        return Err(MigrateError::Refused(error.into()));
    }
    writer.send_frame(Kind::Proof, &token.prove(b"source", &ours, &theirs))
}

/// The next frame, which must come: the end of the stream or a refusal is an error.
fn expect<'r>(reader: &'r mut FrameReader, what: &str) -> Result<(Kind, &'r [u8]), MigrateError> {
    match reader.next()? {
        None => Err(MigrateError::Refused(format!(
            "the peer closed the stream instead of sending {what}"
        ))),
        Some((Kind::Refused, text)) => Err(MigrateError::Refused(format!(
            "the peer refused: {}",
            wire::peer_sentence(text)
        ))),
        Some(frame) => Ok(frame),
    }
}

fn unexpected(kind: Kind, wanted: &str) -> MigrateError {
    MigrateError::Protocol(format!("the peer sent {kind:?} instead of {wanted}"))
}

/// Starts the thread that reads the destination's frames into [`Control`].
fn spawn_reader(
    shared: &Arc<Shared>,
    mut reader: FrameReader,
) -> Result<JoinHandle<()>, MigrateError> {
    let shared = Arc::clone(shared);
    std::thread::Builder::new()
        .name("migrate-ack".into())
        .spawn(move || {
            let error = loop {
                match reader.next() {
                    Ok(Some((Kind::Alive, _))) => {}
                    Ok(Some((Kind::Started, _))) => {
                        lock(&shared.control).started = true;
                        shared.wake.notify_all();
                    }
                    Ok(Some((Kind::Refused, text))) => {
                        break MigrateError::Refused(format!(
                            "the destination refused: {}",
                            wire::peer_sentence(text)
                        ))
                    }
                    Ok(Some((Kind::Cancel, _))) => {
                        break MigrateError::Cancelled(
                            "the destination cancelled the migration".into(),
                        )
                    }
                    Ok(Some((kind, _))) => break unexpected(kind, "a heartbeat or Started"),
                    Ok(None) => {
                        break MigrateError::Protocol("the destination closed the stream".into())
                    }
                    Err(e) => break e,
                }
            };
            lock(&shared.control).reader_error = Some(error);
            shared.wake.notify_all();
        })
        .map_err(|source| MigrateError::Io {
            what: "the migration's reader thread could not be started".into(),
            source,
        })
}

impl Sender<'_> {
    /// The sender's loop: rounds while the guest runs, the switchover, the end.
    fn run(&mut self, tracking: &DirtyTracking<'_>) -> Result<MigrationState, MigrateError> {
        let mut phase = Phase::Precopy;
        let mut first = true;
        loop {
            let mut control = lock(&self.shared.control);
            if control.cancel {
                drop(control);
                let _ = self.writer.send_frame(Kind::Cancel, &[]);
                return Err(MigrateError::Cancelled(
                    "the migration was cancelled on the source".into(),
                ));
            }
            if let Some(error) = control.reader_error.take() {
                return Err(error);
            }
            let started = std::mem::take(&mut control.started);
            if started && phase == Phase::Synced && control.resume.is_none() {
                drop(control);
                // The destination serves from now on: this daemon never will again. Unless
                // `queues_started` gave up on the sender and failed the migration first:
                // then the source may serve, and the destination must not.
                if !lock(&self.shared.progress).finish(MigrationState::Completed, None) {
                    return Err(MigrateError::Refused(
                        "the destination's start came after the migration had failed".into(),
                    ));
                }
                self.writer.send_frame(Kind::Granted, &[])?;
                let _ = self.writer.send_frame(Kind::Close, &[]);
                self.note_wire();
                return Ok(MigrationState::Completed);
            }
            if control.resume == Some(None) {
                // Queues stopped and started again before Synced went out: no Synced then.
                control.stopped = false;
                drop(control);
                let result = match phase {
                    Phase::Precopy => Ok(()),
                    Phase::Synced => self.writer.send_frame(Kind::Resumed, &[]),
                };
                if result.is_ok() {
                    lock(&self.shared.control).synced = false;
                }
                let answer = result.as_ref().map(|_| ()).map_err(|e| {
                    format!(
                        "the destination could not be told that the VM resumed here: {}",
                        e.sentence()
                    )
                });
                lock(&self.shared.control).resume = Some(Some(answer));
                self.shared.wake.notify_all();
                result.map_err(|e| {
                    MigrateError::Refused(format!(
                        "the VM resumed on the source and the destination could not be told: \
                         {}",
                        e.sentence()
                    ))
                })?;
                phase = Phase::Precopy;
                lock(&self.shared.progress).state = MigrationState::Precopy;
                continue;
            }
            let gone = std::mem::take(&mut control.frontend_gone);
            if gone && phase == Phase::Synced {
                drop(control);
                if !lock(&self.shared.progress).finish(MigrationState::Completed, None) {
                    return Err(MigrateError::Refused(
                        "the source's frontend left after the migration had failed".into(),
                    ));
                }
                self.writer.send_frame(Kind::Close, &[])?;
                self.note_wire();
                return Ok(MigrationState::Completed);
            }
            let stop = std::mem::take(&mut control.stopped) && phase == Phase::Precopy;
            if stop {
                control.synced = true;
                // The frontend may have left right after it stopped the queues, both before
                // this thread woke: the Close its departure owes follows the Synced this stop
                // sends, on the next turn.
                control.frontend_gone |= gone;
            }
            drop(control);
            if stop {
                // The guest is stopped: what is dirty now is the last of it.
                while self.send_pass(tracking, std::mem::take(&mut first))? > 0 {}
                self.writer.send_frame(Kind::Synced, &[])?;
                self.last_sent = Instant::now();
                phase = Phase::Synced;
                lock(&self.shared.progress).state = MigrationState::Synced;
                self.note_wire();
                continue;
            }
            let sent = match phase {
                Phase::Precopy => self.send_pass(tracking, std::mem::take(&mut first))?,
                Phase::Synced => 0,
            };
            self.heartbeat()?;
            if sent == 0 {
                let control = lock(&self.shared.control);
                let idle = !control.cancel
                    && !control.stopped
                    && !control.started
                    && !control.frontend_gone
                    && control.resume != Some(None)
                    && control.reader_error.is_none();
                if idle {
                    let _ = self
                        .shared
                        .wake
                        .wait_timeout(control, IDLE_PASS)
                        .unwrap_or_else(|e| e.into_inner());
                }
            }
        }
    }

    /// One pass over the dirty log: sends every dirty page (on the first pass, every stored
    /// page) in batches; returns the pages sent.
    fn send_pass(
        &mut self,
        tracking: &DirtyTracking<'_>,
        first: bool,
    ) -> Result<u64, MigrateError> {
        let mut from = 0;
        let mut sent = 0;
        loop {
            self.batch.clear();
            let (mut pages, mut stored) = (0u64, 0u64);
            let mut failure = None;
            let store = self.store;
            let scratch = &mut self.scratch;
            let batch = &mut self.batch;
            let next = tracking.drain_from(from, |index| {
                match store.export_slot(index, scratch) {
                    Ok(StoredPage::Empty) if first => {}
                    Ok(page) => {
                        stored += wire::put_record(batch, index, &page);
                        pages += 1;
                    }
                    Err(e) => {
                        failure = Some(MigrateError::Refused(format!(
                            "page {index} could not be read for the migration: {e}"
                        )));
                        return false;
                    }
                }
                batch.len() < wire::BATCH_BYTES
            });
            if let Some(error) = failure {
                return Err(error);
            }
            if pages > 0 {
                self.send_new_dictionaries()?;
                self.writer.send_frame(Kind::Batch, &self.batch)?;
                self.last_sent = Instant::now();
                sent += pages;
                let mut progress = lock(&self.shared.progress);
                progress.pages += pages;
                progress.stored_bytes += stored;
                progress.wire_bytes = self.writer.written;
            }
            self.heartbeat()?;
            match next {
                Some(next) => from = next,
                None => break,
            }
            let mut control = lock(&self.shared.control);
            if let Some(error) = control.reader_error.take() {
                return Err(error);
            }
            if control.cancel {
                // The main loop sends the Cancel.
                break;
            }
        }
        if sent > 0 || first {
            self.rounds += 1;
            let dirty = self.store.migration_dirty_pages();
            let mut payload = [0u8; 16];
            payload[..8].copy_from_slice(&self.rounds.to_le_bytes());
            payload[8..].copy_from_slice(&dirty.to_le_bytes());
            self.writer.send_frame(Kind::RoundEnd, &payload)?;
            let mut progress = lock(&self.shared.progress);
            progress.rounds = self.rounds;
            progress.dirty_pages = dirty;
            progress.wire_bytes = self.writer.written;
        }
        Ok(sent)
    }

    /// Sends the zstd dictionaries loaded since the last were sent. Called after a batch's
    /// pages were exported and before the batch goes: a page compressed with a dictionary
    /// was compressed after the dictionary was loaded, so the batch's dictionaries are
    /// all among these.
    fn send_new_dictionaries(&mut self) -> Result<(), MigrateError> {
        if self.store.zstd_dictionary_count() <= self.dictionaries_sent {
            return Ok(());
        }
        for raw in self.store.zstd_dictionaries_from(self.dictionaries_sent) {
            self.writer.send_frame(Kind::Dictionary, &raw)?;
            self.dictionaries_sent += 1;
        }
        Ok(())
    }

    /// Sends a heartbeat when nothing was sent for a heartbeat's time.
    fn heartbeat(&mut self) -> Result<(), MigrateError> {
        if self.last_sent.elapsed() >= self.shared.options.heartbeat {
            self.writer.send_frame(Kind::Alive, &[])?;
            self.last_sent = Instant::now();
            self.note_wire();
        }
        Ok(())
    }

    fn note_wire(&self) {
        lock(&self.shared.progress).wire_bytes = self.writer.written;
    }
}
