// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon's live migrations (DESIGN.md, "Live migration"): the incoming one that
//! `--incoming` names, the outgoing ones that `ctl migrate` starts, and the queue hooks through
//! which the device's queue starts and stops drive them.
//!
//! - **Destination:** a queue's start waits (up to `--incoming-timeout`) until the stream is
//!   complete ([`Incoming::wait_ready`]). If it failed, was cancelled or did not complete in
//!   time, the start fails: the queue serves nothing and every request on it gets an I/O
//!   error, and the log says why. The store is never served incomplete.
//! - **Source:** when every queue has stopped (QEMU stopped the VM for the switchover and sent
//!   `GET_VRING_BASE`), the sender sends the last dirty pages and `Synced` at once
//!   ([`MigrationSource::queues_stopped`]). A queue that starts again while a migration runs
//!   (the VM resumed here: `cont` after a failed migration, a reboot during pre-copy) first
//!   tells the destination ([`MigrationSource::queues_started`]); once the destination has been
//!   granted the device, a restarted queue here serves nothing, so two daemons never serve
//!   one guest.
//! - One outgoing migration at a time. A finished one (completed, failed or cancelled) stays
//!   for `ctl migrate-status` and the metrics until the next starts. A failed or cancelled
//!   migration changes nothing in the store: the source keeps every page and serves on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{error, info, warn};

use crate::blk::QueueHooks;
use crate::migrate::{
    Endpoint, Incoming, MigrateError, MigrationRole, MigrationSource, MigrationState,
    MigrationStatus, Token,
};
use crate::store::PageStore;

/// How long `ctl migrate` waits for the stream to connect and authenticate, so that a wrong
/// endpoint or token is the command's error rather than a status to look up.
const CONNECT_WAIT: Duration = Duration::from_secs(10);
/// How long a frontend leaving during the switchover waits for the last pages to go (past
/// the stream's stall timeout, which fails a stuck one).
const SWITCHOVER_WAIT: Duration = Duration::from_secs(15);
/// How long stopping waits for each migration thread.
const JOIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Called once, when an incoming migration has completed and the device starts (the daemon
/// hands a deferred state to systemd's file descriptor store then).
pub type OnIncomingComplete = Box<dyn FnOnce() + Send>;

/// The daemon's migrations.
pub struct Migrations {
    store: Arc<PageStore>,
    token: Option<Token>,
    incoming: Option<Incoming>,
    incoming_timeout: Duration,
    outgoing: Mutex<Option<MigrationSource>>,
    on_incoming_complete: Mutex<Option<OnIncomingComplete>>,
    /// Whether a queue has started on the completed incoming store (logged once).
    incoming_served: AtomicBool,
}

impl std::fmt::Debug for Migrations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Migrations")
            .field("incoming", &self.incoming)
            .field("outgoing", &self.outgoing)
            .finish_non_exhaustive()
    }
}

impl Migrations {
    /// The migrations of a daemon serving `store`: with `incoming`, it receives its pages
    /// from `(endpoint, how long a queue start waits for the stream)` first.
    pub fn new(
        store: Arc<PageStore>,
        token: Option<Token>,
        incoming: Option<(Endpoint, Duration)>,
    ) -> Result<Migrations, MigrateError> {
        let (incoming, incoming_timeout) = match incoming {
            Some((at, timeout)) => {
                let listening = Incoming::listen(Arc::clone(&store), at.clone(), token.clone())?;
                info!(
                    "receiving a migration on {at}: the device serves once the stream is \
                     complete (waiting up to {} s when the frontend starts it)",
                    timeout.as_secs()
                );
                (Some(listening), timeout)
            }
            None => (None, Duration::ZERO),
        };
        Ok(Migrations {
            store,
            token,
            incoming,
            incoming_timeout,
            outgoing: Mutex::new(None),
            on_incoming_complete: Mutex::new(None),
            incoming_served: AtomicBool::new(false),
        })
    }

    /// Runs `then` once the incoming migration has completed (at once if there is none).
    pub fn on_incoming_complete(&self, then: OnIncomingComplete) {
        match &self.incoming {
            Some(incoming) if incoming.status().state != MigrationState::Completed => {
                *lock(&self.on_incoming_complete) = Some(then);
            }
            Some(_) | None => then(),
        }
    }

    /// `ctl migrate ENDPOINT`: starts migrating the store to the daemon listening there.
    /// Returns once the stream is connected and both sides proved the token.
    pub fn start(&self, to: &Endpoint) -> Result<String, String> {
        if let Some(incoming) = &self.incoming {
            let state = incoming.status().state;
            if state != MigrationState::Completed {
                return Err(format!(
                    "this daemon is still receiving its own migration ({state}); it can migrate \
                     its pages on once that has completed"
                ));
            }
        }
        let mut outgoing = lock(&self.outgoing);
        if let Some(running) = outgoing.as_ref() {
            let state = running.status().state;
            if !state.is_final() {
                return Err(format!(
                    "a migration is already running ({state}); cancel it with `ctl \
                     migrate-cancel` first"
                ));
            }
            running.join(JOIN_TIMEOUT);
        }
        let source =
            MigrationSource::start(Arc::clone(&self.store), to.clone(), self.token.clone())
                .map_err(|error| error.sentence())?;
        let deadline = Instant::now() + CONNECT_WAIT;
        let status = loop {
            let status = source.status();
            if status.state != MigrationState::Connecting || Instant::now() >= deadline {
                break status;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        *outgoing = Some(source);
        drop(outgoing);
        match status.state {
            MigrationState::Failed | MigrationState::Cancelled => Err(format!(
                "the migration to {to} failed: {}",
                status.error.as_deref().unwrap_or("no reason given")
            )),
            MigrationState::Connecting => Ok(format!(
                "migrating to {to}: still connecting after {} s; follow it with `ctl \
                 migrate-status`\n",
                CONNECT_WAIT.as_secs()
            )),
            MigrationState::Idle
            | MigrationState::Precopy
            | MigrationState::Synced
            | MigrationState::Completed => {
                info!("migrating the device's pages to {to}");
                Ok(format!(
                    "migrating to {to}: connected, pre-copy started; follow it with `ctl \
                     migrate-status`\n"
                ))
            }
        }
    }

    /// The status of the outgoing migration, else of the incoming one, else an idle source's.
    pub fn status(&self) -> MigrationStatus {
        if let Some(outgoing) = lock(&self.outgoing).as_ref() {
            return outgoing.status();
        }
        match &self.incoming {
            Some(incoming) => incoming.status(),
            None => MigrationStatus::idle(MigrationRole::Source),
        }
    }

    /// `ctl migrate-cancel`: cancels the outgoing migration, or an incoming one that has not
    /// completed.
    pub fn cancel(&self) -> Result<String, String> {
        if let Some(outgoing) = lock(&self.outgoing).as_ref() {
            let state = outgoing.status().state;
            if !state.is_final() {
                outgoing.cancel();
                warn!(
                    "the migration to {} was cancelled ({state})",
                    outgoing.status().peer
                );
                return Ok(format!(
                    "cancelled the migration in state {state}; every page stays here\n"
                ));
            }
        }
        if let Some(incoming) = &self.incoming {
            let state = incoming.status().state;
            if !state.is_final() {
                incoming.cancel();
                warn!("the incoming migration was cancelled ({state})");
                return Ok(format!(
                    "cancelled the incoming migration in state {state}; this device will not \
                     start\n"
                ));
            }
        }
        Err("no migration is running".into())
    }

    /// The frontend went away: an outgoing migration after `Synced` closes its stream (the
    /// source QEMU quit after the switchover). One whose switchover has begun (the queues
    /// stopped, the last dirty pages still going) is waited for, bounded, so that the daemon's
    /// stop does not cancel it halfway: the destination needs those pages.
    pub fn frontend_gone(&self) {
        if let Some(outgoing) = lock(&self.outgoing).as_ref() {
            outgoing.frontend_gone();
            if outgoing.switching_over() && !outgoing.status().state.is_final() {
                info!("the frontend left during the switchover: finishing the stream first");
                if !outgoing.join(SWITCHOVER_WAIT) {
                    warn!(
                        "the switchover's stream did not end within {SWITCHOVER_WAIT:?}; \
                         cancelling it"
                    );
                }
            }
        }
    }

    /// The daemon stops: cancels what still runs and waits for the threads, bounded.
    pub fn stop(&self) {
        if let Some(outgoing) = lock(&self.outgoing).as_ref() {
            if !outgoing.status().state.is_final() {
                outgoing.cancel();
            }
            if !outgoing.join(JOIN_TIMEOUT) {
                warn!("the migration thread did not stop within {JOIN_TIMEOUT:?}; leaving it");
            }
        }
        if let Some(incoming) = &self.incoming {
            if !incoming.status().state.is_final() {
                incoming.cancel();
            }
            if !incoming.join(JOIN_TIMEOUT) {
                warn!("the incoming migration thread did not stop within {JOIN_TIMEOUT:?}; leaving it");
            }
        }
    }
}

impl QueueHooks for Migrations {
    fn before_start(&self, queue: usize) -> Result<(), String> {
        if let Some(incoming) = &self.incoming {
            let started = Instant::now();
            if let Err(why) = incoming.wait_ready(self.incoming_timeout) {
                error!("queue {queue} does not start: {why}");
                return Err(why);
            }
            if !self.incoming_served.swap(true, Ordering::AcqRel) {
                let status = incoming.status();
                info!(
                    "the incoming migration is complete: {} page records in {} rounds, {} \
                     stored bytes in {} on the wire; the device serves (queue {queue} waited \
                     {:.1} ms for the stream)",
                    status.pages,
                    status.rounds,
                    status.stored_bytes,
                    status.wire_bytes,
                    started.elapsed().as_secs_f64() * 1000.0
                );
            }
            if let Some(then) = lock(&self.on_incoming_complete).take() {
                then();
            }
        }
        if let Some(outgoing) = lock(&self.outgoing).as_ref() {
            if !outgoing.status().state.is_final()
                || outgoing.status().state == MigrationState::Completed
            {
                outgoing.queues_started().map_err(|why| {
                    error!("queue {queue} does not start: {why}");
                    why
                })?;
            }
        }
        Ok(())
    }

    fn after_stop(&self, _queue: usize, all_stopped: bool) {
        if !all_stopped {
            return;
        }
        if let Some(outgoing) = lock(&self.outgoing).as_ref() {
            if !outgoing.status().state.is_final() {
                info!("the queues stopped: sending the last dirty pages");
                outgoing.queues_stopped();
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
