// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Metrics in the Prometheus text exposition format (version 0.0.4), for `ctl metrics` and for
//! scraping over HTTP with `--metrics-listen`.
//!
//! Every series carries the device's serial as the `serial` label, so one Prometheus can scrape
//! the daemons of many VMs and tell them apart. The series:
//!
//! - every `mm_stat` and `io_stat` figure under zram's names (`vhost_user_zram_mm_*`,
//!   `vhost_user_zram_io_*`; bytes end in `_bytes`, monotonic counters in `_total`), and the
//!   device facts (`disksize`, the parts of `mem_used_total`, the algorithm as a label of
//!   `vhost_user_zram_info`);
//! - request counts, failures and a latency histogram by request type (`type` label), from
//!   [`RequestStats`](crate::blk::request_stats::RequestStats);
//! - the multi-page units (`vhost_user_zram_units_stored`, `…_unit_members`, `…_unit_bytes`,
//!   and counters of partial rewrites, bytes read and decompressed, and cache hits);
//! - the daemon's uptime and whether a frontend is connected.
//!
//! The HTTP side ([`MetricsServer`]) is a few lines of HTTP/1.x over `std::net`: one `GET
//! /metrics` per connection, on the [`BoundedServer`] the control socket runs on too: a
//! request head is read without a thread until it is complete (within a deadline), so slow
//! clients cannot keep a scrape from being answered, and a bounded number are answered at once. It listens on loopback unless the operator opts in
//! to another address (see [`check_listen_address`]).

use std::fmt::Write as _;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::debug;

use crate::blk::request_stats::{bucket_bound_us, RequestKind, LATENCY_BUCKETS};
use crate::migrate::{MigrationRole, MigrationStatus};
use crate::observed::Observed;
use crate::pressure::{PressureStats, ShedMode};
use crate::server::{BoundedServer, Client, Handler, ReadError, ServerLimits};
use crate::store::Stats;

/// The `Content-Type` of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The longest HTTP request head the server reads.
pub const MAX_HTTP_REQUEST_LEN: usize = 8192;

/// A metric's type, as `# TYPE` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MetricType {
    Counter,
    Gauge,
    Histogram,
}

impl MetricType {
    fn name(self) -> &'static str {
        match self {
            MetricType::Counter => "counter",
            MetricType::Gauge => "gauge",
            MetricType::Histogram => "histogram",
        }
    }
}

/// One store figure: its metric name (without the prefix), help, type and value.
struct StoreFigure {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    value: fn(&Stats) -> u64,
}

const PREFIX: &str = "vhost_user_zram_";

/// Every mm_stat and io_stat figure, the store facts, the compression workers, the
/// multi-page units and the writeback.
const STORE_FIGURES: [StoreFigure; 42] = [
    StoreFigure {
        name: "state_file_bytes",
        help: "Bytes the state file (--state) occupies in memory; 0 without one.",
        kind: MetricType::Gauge,
        value: |s| s.info.state_file_bytes,
    },
    StoreFigure {
        name: "damaged_pages",
        help: "Pages whose slot entry recovery found damaged: they read as I/O errors until written or discarded.",
        kind: MetricType::Gauge,
        value: |s| s.info.damaged_pages,
    },
    StoreFigure {
        name: "workers",
        help: "Compression worker threads (0: the queue threads compress).",
        kind: MetricType::Gauge,
        value: |s| s.workers.workers,
    },
    StoreFigure {
        name: "pending_pages",
        help: "Pages written and not yet compressed by a worker.",
        kind: MetricType::Gauge,
        value: |s| s.workers.pending_pages,
    },
    StoreFigure {
        name: "pending_pool_pages",
        help: "Pages the pending pool holds at most (--max-pending).",
        kind: MetricType::Gauge,
        value: |s| s.workers.pool_pages,
    },
    StoreFigure {
        name: "pending_pool_resident_bytes",
        help: "Memory the pending pool holds from the OS (part of mem_used_total).",
        kind: MetricType::Gauge,
        value: |s| s.workers.pool_resident_bytes,
    },
    StoreFigure {
        name: "inline_fallbacks_total",
        help: "Writes compressed on the queue thread because the pending pool was full.",
        kind: MetricType::Counter,
        value: |s| s.workers.inline_fallbacks,
    },
    StoreFigure {
        name: "inline_busy_total",
        help: "Writes compressed on the queue thread because the pending pool was filling and every CPU was busy.",
        kind: MetricType::Counter,
        value: |s| s.workers.inline_busy,
    },
    StoreFigure {
        name: "stalled_pages",
        help: "Pending pages whose compressed object the memory limit refused (retried).",
        kind: MetricType::Gauge,
        value: |s| s.workers.stalled_pages,
    },
    StoreFigure {
        name: "mm_orig_data_size_bytes",
        help: "Uncompressed size of the data stored (mm_stat orig_data_size).",
        kind: MetricType::Gauge,
        value: |s| s.mm.orig_data_size,
    },
    StoreFigure {
        name: "mm_compr_data_size_bytes",
        help: "Compressed size of the data stored (mm_stat compr_data_size).",
        kind: MetricType::Gauge,
        value: |s| s.mm.compr_data_size,
    },
    StoreFigure {
        name: "mm_mem_used_total_bytes",
        help: "Memory the store holds from the OS (mm_stat mem_used_total).",
        kind: MetricType::Gauge,
        value: |s| s.mm.mem_used_total,
    },
    StoreFigure {
        name: "mm_mem_limit_bytes",
        help: "The memory limit, 0 for none (mm_stat mem_limit).",
        kind: MetricType::Gauge,
        value: |s| s.mm.mem_limit,
    },
    StoreFigure {
        name: "mm_mem_used_max_bytes",
        help: "The most memory the store has held (mm_stat mem_used_max).",
        kind: MetricType::Gauge,
        value: |s| s.mm.mem_used_max,
    },
    StoreFigure {
        name: "mm_same_pages",
        help: "Pages stored as one repeated word (mm_stat same_pages).",
        kind: MetricType::Gauge,
        value: |s| s.mm.same_pages,
    },
    StoreFigure {
        name: "mm_pages_compacted_total",
        help: "Pages given back to the OS by compaction (mm_stat pages_compacted).",
        kind: MetricType::Counter,
        value: |s| s.mm.pages_compacted,
    },
    StoreFigure {
        name: "mm_huge_pages",
        help: "Pages stored raw because they did not compress (mm_stat huge_pages).",
        kind: MetricType::Gauge,
        value: |s| s.mm.huge_pages,
    },
    StoreFigure {
        name: "mm_huge_pages_since_total",
        help: "Huge pages ever stored (mm_stat huge_pages_since).",
        kind: MetricType::Counter,
        value: |s| s.mm.huge_pages_since,
    },
    StoreFigure {
        name: "io_failed_reads_total",
        help: "Reads that failed (io_stat failed_reads).",
        kind: MetricType::Counter,
        value: |s| s.io.failed_reads,
    },
    StoreFigure {
        name: "io_failed_writes_total",
        help: "Writes that failed, memory limit included (io_stat failed_writes).",
        kind: MetricType::Counter,
        value: |s| s.io.failed_writes,
    },
    StoreFigure {
        name: "io_invalid_io_total",
        help: "Requests refused as malformed or out of range (io_stat invalid_io).",
        kind: MetricType::Counter,
        value: |s| s.io.invalid_io,
    },
    StoreFigure {
        name: "io_notify_free_total",
        help: "Pages freed by discard (io_stat notify_free).",
        kind: MetricType::Counter,
        value: |s| s.io.notify_free,
    },
    StoreFigure {
        name: "disksize_bytes",
        help: "The device size (zram disksize).",
        kind: MetricType::Gauge,
        value: |s| s.info.disksize,
    },
    StoreFigure {
        name: "slot_table_bytes",
        help: "The slot table's part of mem_used_total.",
        kind: MetricType::Gauge,
        value: |s| s.info.slot_table_bytes,
    },
    StoreFigure {
        name: "chunk_bytes",
        help: "The allocator's live chunks' part of mem_used_total.",
        kind: MetricType::Gauge,
        value: |s| s.info.chunk_bytes,
    },
    StoreFigure {
        name: "metadata_bytes",
        help: "Allocator and same-fill metadata's part of mem_used_total.",
        kind: MetricType::Gauge,
        value: |s| s.info.metadata_bytes,
    },
    StoreFigure {
        name: "unit_max_bytes",
        help: "The largest multi-page unit (--unit-max); 4096: units are off.",
        kind: MetricType::Gauge,
        value: |s| s.units.unit_max_bytes,
    },
    StoreFigure {
        name: "units_stored",
        help: "Multi-page units stored, each one compressed object.",
        kind: MetricType::Gauge,
        value: |s| s.units.units_stored,
    },
    StoreFigure {
        name: "unit_members",
        help: "Pages stored as members of a multi-page unit.",
        kind: MetricType::Gauge,
        value: |s| s.units.unit_members,
    },
    StoreFigure {
        name: "unit_bytes",
        help: "Compressed bytes of the multi-page units (part of mm_compr_data_size_bytes).",
        kind: MetricType::Gauge,
        value: |s| s.units.unit_bytes,
    },
    StoreFigure {
        name: "unit_partial_rewrites_total",
        help: "Units rewritten page by page because too few of their members were left.",
        kind: MetricType::Counter,
        value: |s| s.units.partial_rewrites,
    },
    StoreFigure {
        name: "unit_read_bytes_total",
        help: "Bytes read from members of multi-page units.",
        kind: MetricType::Counter,
        value: |s| s.units.read_bytes,
    },
    StoreFigure {
        name: "unit_decompressed_bytes_total",
        help: "Bytes decompressed to serve reads of unit members (divided by unit_read_bytes_total: the read amplification).",
        kind: MetricType::Counter,
        value: |s| s.units.decompressed_bytes,
    },
    StoreFigure {
        name: "unit_cache_hits_total",
        help: "Reads of a unit member served from a reading thread's decoded units, decompressing nothing.",
        kind: MetricType::Counter,
        value: |s| s.units.cache_hits,
    },
    StoreFigure {
        name: "bd_count",
        help: "4 KiB blocks of the backing file holding written-back data (zram bd_count).",
        kind: MetricType::Gauge,
        value: |s| s.writeback.bd_count,
    },
    StoreFigure {
        name: "bd_reads_total",
        help: "4 KiB units read back from the backing file (zram bd_reads).",
        kind: MetricType::Counter,
        value: |s| s.writeback.bd_reads,
    },
    StoreFigure {
        name: "bd_writes_total",
        help: "4 KiB blocks written to the backing file (zram bd_writes).",
        kind: MetricType::Counter,
        value: |s| s.writeback.bd_writes,
    },
    StoreFigure {
        name: "written_back_pages",
        help: "Pages whose data lies on the backing file now.",
        kind: MetricType::Gauge,
        value: |s| s.writeback.pages_on_file,
    },
    StoreFigure {
        name: "writeback_pages_total",
        help: "Pages written back since start.",
        kind: MetricType::Counter,
        value: |s| s.writeback.pages_written_back,
    },
    StoreFigure {
        name: "writeback_failed_pages_total",
        help: "Pages whose writeback failed; they stayed in RAM.",
        kind: MetricType::Counter,
        value: |s| s.writeback.failed_writebacks,
    },
    StoreFigure {
        name: "writeback_failed_writes_total",
        help: "Writes to the backing file that failed (one a batch of pages).",
        kind: MetricType::Counter,
        value: |s| s.writeback.failed_file_writes,
    },
    StoreFigure {
        name: "backing_file_disk_bytes",
        help: "Bytes the backing file occupies on its filesystem.",
        kind: MetricType::Gauge,
        value: |s| s.writeback.file_disk_bytes,
    },
];

/// Escapes a label value: backslash, double quote and line feed, as the format requires.
pub fn escape_label_value(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    escaped
}

/// Builds the exposition text.
struct Exposition {
    text: String,
    serial: String,
}

impl Exposition {
    fn header(&mut self, name: &str, help: &str, kind: MetricType) {
        let _ = writeln!(self.text, "# HELP {PREFIX}{name} {help}");
        let _ = writeln!(self.text, "# TYPE {PREFIX}{name} {}", kind.name());
    }

    /// One sample; `labels` are extra `name="value"` pairs (already escaped).
    fn sample(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        let separator = if labels.is_empty() { "" } else { "," };
        let _ = writeln!(
            self.text,
            "{PREFIX}{name}{{serial=\"{}\"{separator}{labels}}} {value}",
            self.serial
        );
    }
}

/// Every metric of `observed`, in the text exposition format.
pub fn render(observed: &Observed) -> String {
    let stats = observed.store.stats();
    let requests = observed.requests.snapshot();
    let mut out = Exposition {
        text: String::with_capacity(16 * 1024),
        serial: escape_label_value(&observed.serial),
    };

    out.header(
        "info",
        "The device: its compression algorithm as a label; the value is always 1.",
        MetricType::Gauge,
    );
    let algorithm = format!(
        "algorithm=\"{}\"",
        escape_label_value(&stats.info.algorithm)
    );
    out.sample("info", &algorithm, 1);
    for figure in &STORE_FIGURES {
        out.header(figure.name, figure.help, figure.kind);
        out.sample(figure.name, "", (figure.value)(&stats));
    }

    out.header(
        "requests_total",
        "Requests completed, by virtio-blk request type.",
        MetricType::Counter,
    );
    for kind in RequestKind::ALL {
        let label = format!("type=\"{}\"", kind.name());
        out.sample("requests_total", &label, requests.kind(kind).count);
    }
    out.header(
        "request_errors_total",
        "Requests completed with a status other than OK, by request type.",
        MetricType::Counter,
    );
    for kind in RequestKind::ALL {
        let label = format!("type=\"{}\"", kind.name());
        out.sample("request_errors_total", &label, requests.kind(kind).errors);
    }
    out.header(
        "request_duration_seconds",
        "Time from taking a request off the queue to returning it, by request type.",
        MetricType::Histogram,
    );
    for kind in RequestKind::ALL {
        let totals = requests.kind(kind);
        let mut cumulative = 0u64;
        for bucket in 0..LATENCY_BUCKETS {
            cumulative += totals.buckets[bucket];
            let bound = bucket_bound_us(bucket) as f64 / 1e6;
            let labels = format!("type=\"{}\",le=\"{bound}\"", kind.name());
            out.sample("request_duration_seconds_bucket", &labels, cumulative);
        }
        cumulative += totals.buckets[LATENCY_BUCKETS];
        let labels = format!("type=\"{}\",le=\"+Inf\"", kind.name());
        out.sample("request_duration_seconds_bucket", &labels, cumulative);
        let label = format!("type=\"{}\"", kind.name());
        let sum = totals.latency_sum_ns as f64 / 1e9;
        out.sample("request_duration_seconds_sum", &label, sum);
        out.sample("request_duration_seconds_count", &label, cumulative);
    }

    out.header(
        "uptime_seconds",
        "Seconds since the daemon started.",
        MetricType::Gauge,
    );
    out.sample(
        "uptime_seconds",
        "",
        format_args!("{:.3}", observed.started.elapsed().as_secs_f64()),
    );
    out.header(
        "frontend_connected",
        "1 while a vhost-user frontend (the VMM) is connected, else 0.",
        MetricType::Gauge,
    );
    out.sample(
        "frontend_connected",
        "",
        u8::from(observed.connected.load(Ordering::Relaxed)),
    );
    if let Some(migrations) = &observed.migrations {
        render_migration(&mut out, &migrations.status());
    }
    render_pressure(&mut out, &observed.pressure.stats());
    out.text
}

/// The migration's figures (`ctl migrate-status`): the state as a label of a gauge that is 1,
/// and the counts of the migration running or last run.
fn render_migration(out: &mut Exposition, status: &MigrationStatus) {
    out.header(
        "migration_info",
        "The live migration running or last run: its role and state as labels; always 1.",
        MetricType::Gauge,
    );
    let role = match status.role {
        MigrationRole::Source => "source",
        MigrationRole::Destination => "destination",
    };
    let labels = format!("role=\"{role}\",state=\"{}\"", status.state.name());
    out.sample("migration_info", &labels, 1);
    let figures: [(&str, &str, MetricType, u64); 5] = [
        (
            "migration_rounds",
            "Rounds of pages the migration sent or received (the first holds every stored page).",
            MetricType::Gauge,
            status.rounds,
        ),
        (
            "migration_pages",
            "Page records the migration sent or received, resends included.",
            MetricType::Gauge,
            status.pages,
        ),
        (
            "migration_wire_bytes",
            "Bytes the migration's stream carried.",
            MetricType::Gauge,
            status.wire_bytes,
        ),
        (
            "migration_stored_bytes",
            "Stored bytes (compressed objects and raw pages) the migration's pages carried.",
            MetricType::Gauge,
            status.stored_bytes,
        ),
        (
            "migration_dirty_pages",
            "Pages the guest changed since the migration last sent them.",
            MetricType::Gauge,
            status.dirty_pages,
        ),
    ];
    for (name, help, kind, value) in figures {
        out.header(name, help, kind);
        out.sample(name, "", value);
    }
}

/// The memory cgroup's limit and what memory pressure and the limit shed
/// ([`crate::pressure`]).
fn render_pressure(out: &mut Exposition, stats: &PressureStats) {
    out.header(
        "cgroup_memory_limit_bytes",
        "The daemon's memory cgroup limit (the lowest on its path), bytes; 0 when none.",
        MetricType::Gauge,
    );
    out.sample("cgroup_memory_limit_bytes", "", stats.cgroup_limit);
    out.header(
        "memory_pressure_events_total",
        "PSI memory pressure trigger events (--reclaim-on-pressure).",
        MetricType::Counter,
    );
    out.sample("memory_pressure_events_total", "", stats.pressure_events);
    out.header(
        "reclaim_requests_total",
        "Reclaim requests, by source: ctl reclaim, the cgroup limit, memory pressure.",
        MetricType::Counter,
    );
    for (source, value) in [
        ("ctl", stats.reclaim_requests_ctl),
        ("cgroup_limit", stats.reclaim_rounds_cgroup),
        ("pressure", stats.reclaim_rounds_pressure),
    ] {
        let label = format!("source=\"{source}\"");
        out.sample("reclaim_requests_total", &label, value);
    }
    out.header(
        "shed_pages_total",
        "Pages shed for the cgroup limit or memory pressure, by mode (compact: pages given back).",
        MetricType::Counter,
    );
    for mode in ShedMode::ALL {
        let label = format!("mode=\"{}\"", mode.name());
        out.sample("shed_pages_total", &label, stats.pages(mode));
    }
    out.header(
        "shed_bytes_total",
        "Bytes of mem_used_total shed for the cgroup limit or memory pressure, by mode.",
        MetricType::Counter,
    );
    for mode in ShedMode::ALL {
        let label = format!("mode=\"{}\"", mode.name());
        out.sample("shed_bytes_total", &label, stats.bytes(mode));
    }
}

/// A `--metrics-listen` address the daemon refuses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MetricsAddressError {
    /// Not a loopback address, and no opt-in.
    #[error(
        "--metrics-listen {0} is not a loopback address; the metrics have no authentication, so \
         add --metrics-allow-remote to serve them beyond this host"
    )]
    NotLoopback(SocketAddr),
}

/// Parses a `--metrics-listen` value: `HOST:PORT` with an IP address (`127.0.0.1:9101`,
/// `[::1]:9101`), or a bare port, which means `127.0.0.1:PORT`.
pub fn parse_listen_address(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    text.parse().map_err(|_| {
        format!("'{text}' is not an address to listen on; give IP:PORT such as 127.0.0.1:9101, or a port")
    })
}

/// Refuses a non-loopback address unless `allow_remote`: the metrics tell anyone who can reach
/// them how much the guest swaps and when, and the endpoint has no authentication.
pub fn check_listen_address(
    address: SocketAddr,
    allow_remote: bool,
) -> Result<(), MetricsAddressError> {
    if address.ip().is_loopback() || allow_remote {
        Ok(())
    } else {
        Err(MetricsAddressError::NotLoopback(address))
    }
}

/// The HTTP side of the metrics as a [`Handler`].
struct HttpHandler {
    observed: Arc<Observed>,
}

/// What an HTTP request asked for.
#[derive(Debug, PartialEq, Eq)]
enum HttpRoute {
    /// `GET /metrics` (or `HEAD`): the exposition; `true` when the body is wanted.
    Metrics { body: bool },
    /// Any other path.
    NotFound,
    /// A method other than GET or HEAD.
    MethodNotAllowed,
    /// Not an HTTP/1.x request line.
    BadRequest,
}

fn route(head: &[u8]) -> HttpRoute {
    let Ok(head) = std::str::from_utf8(head) else {
        return HttpRoute::BadRequest;
    };
    let line = head.lines().next().unwrap_or("");
    let mut words = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return HttpRoute::BadRequest;
    };
    if version != "HTTP/1.0" && version != "HTTP/1.1" {
        return HttpRoute::BadRequest;
    }
    let body = match method {
        "GET" => true,
        "HEAD" => false,
        _ => return HttpRoute::MethodNotAllowed,
    };
    let path = target.split('?').next().unwrap_or("");
    if path == "/metrics" {
        HttpRoute::Metrics { body }
    } else {
        HttpRoute::NotFound
    }
}

fn http_response(status: &str, content_type: &str, body: &str, send_body: bool) -> Vec<u8> {
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if send_body {
        response.extend_from_slice(body.as_bytes());
    }
    response
}

fn plain(status: &str, body: &str) -> Vec<u8> {
    http_response(status, "text/plain; charset=utf-8", body, true)
}

impl Handler<TcpStream> for HttpHandler {
    fn terminator(&self) -> &'static [u8] {
        b"\r\n\r\n"
    }

    fn max_request_len(&self) -> usize {
        MAX_HTTP_REQUEST_LEN
    }

    fn serve(&self, head: &[u8], client: &mut Client<TcpStream>) {
        let response = match route(head) {
            HttpRoute::Metrics { body } => {
                http_response("200 OK", CONTENT_TYPE, &render(&self.observed), body)
            }
            HttpRoute::NotFound => {
                plain("404 Not Found", "not found; the metrics are at /metrics\n")
            }
            HttpRoute::MethodNotAllowed => {
                plain("405 Method Not Allowed", "only GET and HEAD are served\n")
            }
            HttpRoute::BadRequest => plain("400 Bad Request", "not an HTTP/1.x request\n"),
        };
        if let Err(error) = client.respond(&response) {
            debug!("metrics connection: {error}");
        }
    }

    fn refusal(&self, error: &ReadError) -> Option<Vec<u8>> {
        Some(match error {
            ReadError::Deadline => plain(
                "408 Request Timeout",
                "the request did not arrive in time\n",
            ),
            ReadError::TooLong => plain(
                "431 Request Header Fields Too Large",
                "the request is too long\n",
            ),
        })
    }

    fn busy_response(&self) -> &'static [u8] {
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 5\r\nConnection: close\r\n\r\nbusy\n"
    }
}

/// Serves the metrics over HTTP until stopped.
#[derive(Debug)]
pub struct MetricsServer {
    server: BoundedServer,
    address: SocketAddr,
}

impl MetricsServer {
    /// Binds `address` and serves the metrics of `observed` there, with the default limits.
    pub fn bind(address: SocketAddr, observed: Arc<Observed>) -> io::Result<Self> {
        Self::bind_with_limits(address, observed, ServerLimits::default())
    }

    /// [`MetricsServer::bind`] with other limits.
    pub fn bind_with_limits(
        address: SocketAddr,
        observed: Arc<Observed>,
        limits: ServerLimits,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind(address)?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        let server = BoundedServer::spawn("metrics", listener, HttpHandler { observed }, limits)?;
        Ok(MetricsServer { server, address })
    }

    /// The address served (with the port the kernel chose, when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }

    /// Stops the server and waits for its threads.
    pub fn stop(self) {
        self.server.stop();
    }

    /// The server's threads, for an owner that stops them with others.
    pub fn into_threads(self) -> crate::stop::Threads {
        self.server.into_threads()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blk::request_stats::RequestStats;
    use crate::codec::Algorithm;
    use crate::store::PageStore;
    use crate::store::StoreConfig;
    use crate::PAGE_SIZE;
    use std::collections::HashMap;
    use std::io::{Read, Write};
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;
    use std::time::Instant;

    /// A parsed sample: metric name, labels, value.
    #[derive(Debug)]
    struct Sample {
        name: String,
        labels: HashMap<String, String>,
        value: f64,
    }

    fn valid_metric_name(name: &str) -> bool {
        let mut chars = name.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }

    fn valid_label_name(name: &str) -> bool {
        let mut chars = name.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    }

    /// Parses `{a="x",b="y\"z"}`, unescaping values; `None` when malformed.
    fn parse_labels(text: &str) -> Option<HashMap<String, String>> {
        let mut labels = HashMap::new();
        let mut rest = text.strip_prefix('{')?;
        loop {
            if let Some(after) = rest.strip_prefix('}') {
                return after.is_empty().then_some(labels);
            }
            let (name, after) = rest.split_once("=\"")?;
            if !valid_label_name(name) {
                return None;
            }
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next()? {
                    (_, '\\') => match chars.next()?.1 {
                        '\\' => value.push('\\'),
                        '"' => value.push('"'),
                        'n' => value.push('\n'),
                        _ => return None,
                    },
                    (at, '"') => break at,
                    (_, c) => value.push(c),
                }
            };
            labels.insert(name.to_owned(), value);
            rest = &after[end + 1..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
    }

    /// Checks every line of an exposition and returns its samples and declared types.
    fn parse_exposition(text: &str) -> (Vec<Sample>, HashMap<String, String>) {
        let mut samples = Vec::new();
        let mut types = HashMap::new();
        let mut helped = std::collections::HashSet::new();
        assert!(text.ends_with('\n'), "the exposition ends with a line feed");
        for line in text.lines() {
            if let Some(help) = line.strip_prefix("# HELP ") {
                let (name, doc) = help.split_once(' ').expect("HELP has a name and text");
                assert!(valid_metric_name(name), "HELP of bad name {name}");
                assert!(!doc.is_empty());
                assert!(helped.insert(name.to_owned()), "{name} has two HELP lines");
            } else if let Some(declared) = line.strip_prefix("# TYPE ") {
                let (name, kind) = declared.split_once(' ').expect("TYPE has a name and type");
                assert!(valid_metric_name(name), "TYPE of bad name {name}");
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                    "unknown type {kind}"
                );
                assert!(
                    types.insert(name.to_owned(), kind.to_owned()).is_none(),
                    "{name} has two TYPE lines"
                );
            } else {
                let brace = line.find('{').expect("every sample has labels");
                let close = line.rfind("} ").expect("labels end before the value");
                let name = &line[..brace];
                assert!(valid_metric_name(name), "bad metric name in {line}");
                let labels = parse_labels(&line[brace..=close])
                    .unwrap_or_else(|| panic!("bad labels in {line}"));
                let value: f64 = line[close + 2..]
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line}"));
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| {
                        name.strip_suffix(suffix)
                            .filter(|base| types.get(*base).is_some_and(|t| t == "histogram"))
                    })
                    .unwrap_or(name);
                assert!(types.contains_key(family), "{name} sampled before its TYPE");
                samples.push(Sample {
                    name: name.to_owned(),
                    labels,
                    value,
                });
            }
        }
        (samples, types)
    }

    fn value_of(samples: &[Sample], name: &str) -> f64 {
        let matching: Vec<&Sample> = samples.iter().filter(|s| s.name == name).collect();
        assert_eq!(matching.len(), 1, "{name} appears once");
        matching[0].value
    }

    fn observed_with_writes() -> Observed {
        let store = PageStore::new(StoreConfig {
            capacity_pages: 256,
            algorithm: Algorithm::Lz4,
            level: None,
            mem_limit: Some(64 << 20),
        })
        .unwrap();
        let mut page = [0u8; PAGE_SIZE];
        for index in 0..40u64 {
            crate::pagegen::fill_page(7, index, &mut page);
            store.write(index, &page).unwrap();
        }
        store.write(100, &[0xab; PAGE_SIZE]).unwrap();
        store.discard(0..3).unwrap();
        let requests = Arc::new(RequestStats::new(2));
        requests.record(0, RequestKind::Read, Duration::from_micros(3), true);
        requests.record(1, RequestKind::Read, Duration::from_micros(900), true);
        requests.record(1, RequestKind::Write, Duration::from_secs(2), false);
        Observed::new(
            Arc::new(store),
            requests,
            Arc::new(AtomicBool::new(true)),
            "vm-\"7\"\\disk\nb",
        )
    }

    #[test]
    fn every_line_parses_and_every_mm_and_io_figure_has_its_value() {
        // Arrange
        let observed = observed_with_writes();
        let stats = observed.store.stats();

        // Act
        let (samples, types) = parse_exposition(&render(&observed));

        // Assert
        for sample in &samples {
            assert_eq!(
                sample.labels["serial"], "vm-\"7\"\\disk\nb",
                "{}",
                sample.name
            );
        }
        let mm = &stats.mm;
        let io = &stats.io;
        let expected = [
            ("mm_orig_data_size_bytes", mm.orig_data_size),
            ("mm_compr_data_size_bytes", mm.compr_data_size),
            ("mm_mem_used_total_bytes", mm.mem_used_total),
            ("mm_mem_limit_bytes", mm.mem_limit),
            ("mm_mem_used_max_bytes", mm.mem_used_max),
            ("mm_same_pages", mm.same_pages),
            ("mm_pages_compacted_total", mm.pages_compacted),
            ("mm_huge_pages", mm.huge_pages),
            ("mm_huge_pages_since_total", mm.huge_pages_since),
            ("io_failed_reads_total", io.failed_reads),
            ("io_failed_writes_total", io.failed_writes),
            ("io_invalid_io_total", io.invalid_io),
            ("io_notify_free_total", io.notify_free),
            ("disksize_bytes", stats.info.disksize),
            ("state_file_bytes", stats.info.state_file_bytes),
            ("damaged_pages", stats.info.damaged_pages),
        ];
        for (name, value) in expected {
            let full = format!("{PREFIX}{name}");
            assert_eq!(value_of(&samples, &full), value as f64, "{name}");
        }
        assert_eq!(
            mm.orig_data_size,
            38 * PAGE_SIZE as u64,
            "the writes landed"
        );
        assert_eq!(mm.mem_limit, 64 << 20);
        assert_eq!(io.notify_free, 3);
        assert_eq!(
            value_of(&samples, "vhost_user_zram_frontend_connected"),
            1.0
        );
        assert!(value_of(&samples, "vhost_user_zram_uptime_seconds") >= 0.0);
        assert_eq!(
            types["vhost_user_zram_request_duration_seconds"],
            "histogram"
        );
    }

    #[test]
    fn the_unit_figures_are_the_stores() {
        // Arrange: a 64 KiB unit, one of its pages read twice.
        let store = PageStore::new(StoreConfig {
            capacity_pages: 64,
            algorithm: Algorithm::Lz4,
            level: None,
            mem_limit: None,
        })
        .unwrap();
        store.set_unit_max_pages(16).unwrap();
        store
            .write_pages_with(16, 16, |i, page| {
                crate::pagegen::fill_page(3, i as u64, page);
                Ok::<(), ()>(())
            })
            .unwrap()
            .unwrap();
        let mut page = [0u8; PAGE_SIZE];
        store.read(20, &mut page).unwrap();
        store.read(21, &mut page).unwrap();
        let observed = Observed::new(
            Arc::new(store),
            Arc::new(RequestStats::new(1)),
            Arc::new(AtomicBool::new(false)),
            "units",
        );
        let units = observed.store.stats().units;

        // Act
        let (samples, types) = parse_exposition(&render(&observed));

        // Assert
        assert_eq!(units.units_stored, 1, "the write made a unit: {units:?}");
        let expected = [
            ("unit_max_bytes", units.unit_max_bytes, "gauge"),
            ("units_stored", units.units_stored, "gauge"),
            ("unit_members", units.unit_members, "gauge"),
            ("unit_bytes", units.unit_bytes, "gauge"),
            (
                "unit_partial_rewrites_total",
                units.partial_rewrites,
                "counter",
            ),
            ("unit_read_bytes_total", units.read_bytes, "counter"),
            (
                "unit_decompressed_bytes_total",
                units.decompressed_bytes,
                "counter",
            ),
            ("unit_cache_hits_total", units.cache_hits, "counter"),
        ];
        for (name, value, kind) in expected {
            let full = format!("{PREFIX}{name}");
            assert_eq!(value_of(&samples, &full), value as f64, "{name}");
            assert_eq!(types[&full], kind, "{name}");
        }
        assert_eq!(units.unit_max_bytes, 64 << 10);
        assert_eq!(units.read_bytes, 2 * PAGE_SIZE as u64);
    }

    #[test]
    fn request_histograms_are_cumulative_and_count_by_type() {
        let observed = observed_with_writes();
        let (samples, _) = parse_exposition(&render(&observed));
        let of_type = |name: &str, kind: &str| -> Vec<&Sample> {
            samples
                .iter()
                .filter(|s| s.name == name && s.labels["type"] == kind)
                .collect()
        };
        let reads = of_type("vhost_user_zram_requests_total", "read");
        assert_eq!(reads[0].value, 2.0);
        let write_errors = of_type("vhost_user_zram_request_errors_total", "write");
        assert_eq!(write_errors[0].value, 1.0);
        let buckets = of_type("vhost_user_zram_request_duration_seconds_bucket", "read");
        assert_eq!(buckets.len(), LATENCY_BUCKETS + 1);
        let le = |s: &Sample| s.labels["le"].clone();
        let at = |bound: &str| buckets.iter().find(|s| le(s) == bound).unwrap().value;
        assert_eq!(at("0.000002"), 0.0, "3 µs is above 2 µs");
        assert_eq!(at("0.000004"), 1.0);
        assert_eq!(at("0.001024"), 2.0);
        assert_eq!(at("+Inf"), 2.0);
        let write_buckets = of_type("vhost_user_zram_request_duration_seconds_bucket", "write");
        assert_eq!(
            write_buckets[LATENCY_BUCKETS - 1].value,
            0.0,
            "2 s exceeds ~1 s"
        );
        assert_eq!(write_buckets[LATENCY_BUCKETS].value, 1.0);
        let sum = of_type("vhost_user_zram_request_duration_seconds_sum", "read")[0].value;
        assert!((sum - 0.000903).abs() < 1e-9, "sum {sum}");
        for window in buckets.windows(2) {
            assert!(window[0].value <= window[1].value, "cumulative");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(Observed::serial_from_bytes(b"disk-1\0\0\0"), "disk-1");
        assert_eq!(Observed::serial_from_bytes(&[0; 20]), "");
    }

    #[test]
    fn only_loopback_addresses_are_served_without_opt_in() {
        let local = parse_listen_address("127.0.0.1:9101").unwrap();
        let v6 = parse_listen_address("[::1]:9101").unwrap();
        let any = parse_listen_address("0.0.0.0:9101").unwrap();
        assert_eq!(parse_listen_address("9101").unwrap(), local);
        assert!(parse_listen_address("localhost:x").is_err());
        assert!(check_listen_address(local, false).is_ok());
        assert!(check_listen_address(v6, false).is_ok());
        assert_eq!(
            check_listen_address(any, false),
            Err(MetricsAddressError::NotLoopback(any))
        );
        assert!(check_listen_address(any, true).is_ok());
    }

    #[test]
    fn http_requests_are_routed() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            HttpRoute::Metrics { body: true }
        );
        assert_eq!(
            route(b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n"),
            HttpRoute::Metrics { body: false }
        );
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), HttpRoute::NotFound);
        assert_eq!(
            route(b"POST /metrics HTTP/1.1\r\n\r\n"),
            HttpRoute::MethodNotAllowed
        );
        assert_eq!(route(b"GET /metrics HTTP/2\r\n\r\n"), HttpRoute::BadRequest);
        assert_eq!(route(b"garbage\r\n\r\n"), HttpRoute::BadRequest);
    }

    fn http_get(address: SocketAddr, path: &str) -> (String, String) {
        let mut stream = TcpStream::connect(address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        write!(stream, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").expect("a head and a body");
        (head.to_owned(), body.to_owned())
    }

    #[test]
    fn metrics_are_served_over_http_and_other_paths_are_not_found() {
        // Arrange
        let observed = Arc::new(observed_with_writes());
        let expected_orig = observed.store.stats().mm.orig_data_size as f64;
        let server = MetricsServer::bind(SocketAddr::from(([127, 0, 0, 1], 0)), observed).unwrap();

        // Act
        let (head, body) = http_get(server.local_addr(), "/metrics");
        let (missing_head, _) = http_get(server.local_addr(), "/");

        // Assert
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(
            head.contains(&format!("Content-Type: {CONTENT_TYPE}")),
            "{head}"
        );
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        let (samples, _) = parse_exposition(&body);
        assert_eq!(
            value_of(&samples, "vhost_user_zram_mm_orig_data_size_bytes"),
            expected_orig
        );
        assert!(
            missing_head.starts_with("HTTP/1.1 404 Not Found"),
            "{missing_head}"
        );
        server.stop();
    }

    #[test]
    fn a_silent_http_client_gets_408_at_the_deadline() {
        let server = MetricsServer::bind_with_limits(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            Arc::new(observed_with_writes()),
            ServerLimits {
                deadline: Duration::from_millis(300),
                max_clients: 2,
                max_waiting: 4,
            },
        )
        .unwrap();
        let mut stream = TcpStream::connect(server.local_addr()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.write_all(b"GET /metr").unwrap();
        let started = Instant::now();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 408"), "{response}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
