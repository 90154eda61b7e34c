// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the control socket and the metrics report on, gathered in one value the daemon builds
//! and both servers share: the store, the request counters the queue threads record, whether a
//! frontend is connected, the daemon's start and the device's serial.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use crate::blk::request_stats::RequestStats;
use crate::migrating::Migrations;
use crate::pressure::PressureState;
use crate::store::PageStore;

/// What the control socket and the metrics report on: the device's store and request counters,
/// whether a frontend is connected, and since when the daemon runs.
#[derive(Debug)]
pub struct Observed {
    /// The page store.
    pub store: Arc<PageStore>,
    /// Request counts and latencies, recorded by the queue threads.
    pub requests: Arc<RequestStats>,
    /// Whether a frontend is connected; set by the backend.
    pub connected: Arc<AtomicBool>,
    /// When the daemon started.
    pub started: Instant,
    /// The device's serial number (empty when it has none), the `serial` label.
    pub serial: String,
    /// The daemon's migrations (none for a store observed without a daemon).
    pub migrations: Option<Arc<Migrations>>,
    /// The daemon's `--writeback-above` mark, bytes (none without it, or without a daemon):
    /// `ctl mem-limit` keeps the memory limit above it.
    pub writeback_above: Option<u64>,
    /// The cgroup limit and memory pressure figures, and the user's memory limit
    /// (`ctl mem-limit` sets it there, so that the cgroup's budget and it both bind).
    pub pressure: Arc<PressureState>,
}

impl Observed {
    /// Observes `store` and `requests` from now on.
    pub fn new(
        store: Arc<PageStore>,
        requests: Arc<RequestStats>,
        connected: Arc<AtomicBool>,
        serial: &str,
    ) -> Self {
        Observed {
            store,
            requests,
            connected,
            started: Instant::now(),
            serial: serial.to_owned(),
            migrations: None,
            writeback_above: None,
            pressure: Arc::new(PressureState::default()),
        }
    }

    /// The serial as text: the bytes up to the first NUL of the 20-byte GET_ID form.
    pub fn serial_from_bytes(serial: &[u8]) -> String {
        let end = serial.iter().position(|&b| b == 0).unwrap_or(serial.len());
        String::from_utf8_lossy(&serial[..end]).into_owned()
    }
}
