// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon in the test process: `Daemon::run` on a thread of its own, serving a socket in a
//! temporary directory, for tests that play the frontend with the vhost crate's `Frontend` and
//! look into the store directly.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vhost_user_zram::daemon::{Daemon, DaemonConfig, DaemonError};
use vhost_user_zram::stop::StopSignal;
use vhost_user_zram::store::PageStore;

/// A daemon serving on a thread; stopped on drop unless it already returned.
pub struct InProcessDaemon {
    /// Its vhost-user socket.
    pub socket: PathBuf,
    /// The store it serves.
    pub store: Arc<PageStore>,
    stop: StopSignal,
    runner: Option<JoinHandle<Result<(), DaemonError>>>,
    _dir: tempfile::TempDir,
}

impl InProcessDaemon {
    /// Creates the daemon `config` describes for a socket path in a fresh temporary directory
    /// (its socket is bound when this returns) and runs it on a thread.
    pub fn start(config: impl FnOnce(&Path) -> DaemonConfig) -> InProcessDaemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("zram.sock");
        let daemon = Daemon::new(config(&socket)).expect("the daemon starts");
        let store = Arc::clone(daemon.store());
        let stop = daemon.stop_handle();
        let runner = thread::spawn(move || daemon.run());
        InProcessDaemon {
            socket,
            store,
            stop,
            runner: Some(runner),
            _dir: dir,
        }
    }

    /// Whether `Daemon::run` has not returned yet.
    pub fn is_running(&self) -> bool {
        self.runner.as_ref().is_some_and(|r| !r.is_finished())
    }

    /// Asks the daemon to stop, through its stop signal; does not wait.
    pub fn stop(&self) {
        self.stop.stop();
    }

    /// Waits for `Daemon::run` to return (after the frontend hung up, or a stop) and returns
    /// what it returned; fails the test after `limit`.
    pub fn join_within(mut self, limit: Duration) -> Result<(), DaemonError> {
        let runner = self.runner.take().expect("joined once");
        let deadline = Instant::now() + limit;
        while !runner.is_finished() {
            assert!(
                Instant::now() < deadline,
                "the daemon did not stop in {limit:?}"
            );
            thread::sleep(Duration::from_millis(5));
        }
        runner.join().expect("the daemon thread panicked")
    }
}

impl Drop for InProcessDaemon {
    /// A test that failed before joining leaves no daemon serving into the next one: stop it
    /// and give it a moment to return.
    fn drop(&mut self) {
        if let Some(runner) = self.runner.take() {
            self.stop.stop();
            let deadline = Instant::now() + Duration::from_secs(5);
            while !runner.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
        }
    }
}
