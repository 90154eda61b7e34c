// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Live migration between two stores in one process, over a Unix socket: pre-copy while
//! writers run, the switchover, faults on the stream, authentication, a resume on the source.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost_user_zram::codec::Algorithm;
use vhost_user_zram::migrate::{
    Endpoint, Fault, Incoming, MigrationOptions, MigrationSource, MigrationState, Token,
};
use vhost_user_zram::pagegen::{fill_page, PageKind, SplitMix64};
use vhost_user_zram::store::backing::BackingFile;
use vhost_user_zram::store::{
    PageStore, PendingConfig, RecompressMode, RecompressRequest, StoreConfig, WritebackMode,
    WritebackRequest,
};
use vhost_user_zram::workers::CompressWorkers;
use vhost_user_zram::PAGE_SIZE;

const PAGES: u64 = 2048;

/// A store with two compression workers, zstd as a secondary algorithm and, if given, a
/// backing file; the workers run until the returned handle drops.
fn store_with(
    pages: u64,
    algorithm: Algorithm,
    backing: Option<&Path>,
) -> (Arc<PageStore>, CompressWorkers) {
    let mut store = PageStore::with_pending(
        StoreConfig {
            capacity_pages: pages,
            algorithm,
            level: None,
            mem_limit: None,
        },
        PendingConfig {
            workers: 2,
            max_pending_pages: 256,
        },
    )
    .unwrap();
    if algorithm != Algorithm::Zstd {
        store = store
            .with_secondary_algorithms(&["zstd".parse().unwrap()])
            .unwrap();
    }
    if let Some(path) = backing {
        store = store.with_backing_file(BackingFile::open(path).unwrap());
    }
    let store = Arc::new(store);
    let workers = CompressWorkers::start(Arc::clone(&store), &[]).unwrap();
    (store, workers)
}

fn store(pages: u64) -> (Arc<PageStore>, CompressWorkers) {
    store_with(pages, Algorithm::Lz4, None)
}

fn page(seed: u64, index: u64) -> [u8; PAGE_SIZE] {
    let mut page = [0u8; PAGE_SIZE];
    fill_page(seed, index, &mut page);
    page
}

fn fill(store: &PageStore, seed: u64) {
    for index in 0..store.capacity_pages() {
        store.write(index, &page(seed, index)).unwrap();
    }
}

/// Every page's content, or `None` where the read fails.
fn snapshot(store: &PageStore) -> Vec<Option<Box<[u8; PAGE_SIZE]>>> {
    (0..store.capacity_pages())
        .map(|index| {
            let mut out = Box::new([0u8; PAGE_SIZE]);
            store.read(index, &mut out).ok().map(|()| out)
        })
        .collect()
}

fn assert_same_pages(source: &PageStore, dest: &PageStore) {
    let (a, b) = (snapshot(source), snapshot(dest));
    for (index, (a, b)) in a.iter().zip(&b).enumerate() {
        assert!(
            a == b,
            "page {index} differs between source and destination"
        );
    }
}

fn check(store: &PageStore) {
    assert!(store.wait_drained(Duration::from_secs(10)));
    store.check_consistency().unwrap();
}

fn token(text: &str) -> Option<Token> {
    Some(Token::from_bytes(text.as_bytes()).unwrap())
}

fn quick() -> MigrationOptions {
    MigrationOptions {
        stall_timeout: Duration::from_secs(1),
        heartbeat: Duration::from_millis(100),
        resume_wait: Duration::from_secs(2),
        accept_attempts: 4,
        fault: None,
    }
}

fn socket(dir: &tempfile::TempDir) -> (PathBuf, Endpoint) {
    let path = dir.path().join("migrate.sock");
    (path.clone(), Endpoint::Unix(path))
}

/// Polls `done` every 5 ms for up to `limit`; returns whether it came true.
fn eventually(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    done()
}

/// The writers: rewrite, discard and refill random pages with every kind of page until
/// stopped.
fn start_writers(
    store: &Arc<PageStore>,
    stop: &Arc<AtomicBool>,
    threads: u64,
) -> Vec<std::thread::JoinHandle<u64>> {
    (0..threads)
        .map(|t| {
            let (store, stop) = (Arc::clone(store), Arc::clone(stop));
            std::thread::spawn(move || {
                let mut rng = SplitMix64::new(0x5eed + t);
                let mut ops = 0;
                let mut buf = [0u8; PAGE_SIZE];
                while !stop.load(Ordering::Relaxed) {
                    let index = rng.below(store.capacity_pages());
                    match rng.below(10) {
                        0 => store.discard(index..index + 1).unwrap(),
                        1 => {
                            vhost_user_zram::pagegen::fill_kind(
                                PageKind::SameFilled,
                                &mut rng,
                                &mut buf,
                            );
                            store.write(index, &buf).unwrap();
                        }
                        2 => store.write(index, &[0; PAGE_SIZE]).unwrap(),
                        3 => {
                            store
                                .modify(index, |page| page[100] = page[100].wrapping_add(1))
                                .unwrap();
                        }
                        _ => {
                            let seed = rng.next_u64();
                            store
                                .write_with(index, |page| {
                                    fill_page(seed, index, page);
                                    Ok::<(), ()>(())
                                })
                                .unwrap()
                                .unwrap();
                        }
                    }
                    ops += 1;
                    if ops % 64 == 0 {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
                ops
            })
        })
        .collect()
}

#[test]
fn a_store_migrated_while_writers_run_equals_the_source_page_for_page() {
    let dir = tempfile::tempdir().unwrap();
    let (source, _source_workers) =
        store_with(PAGES, Algorithm::Lz4, Some(&dir.path().join("backing")));
    let (dest, _dest_workers) = store(PAGES);
    fill(&source, 1);
    // Some pages go to a stronger algorithm, and idle ones to the backing file.
    source
        .recompress(&RecompressRequest {
            mode: RecompressMode::All,
            threshold: 0,
            max_pages: Some(PAGES / 4),
            target: None,
        })
        .unwrap();
    source.mark_idle();
    let written_back = source
        .writeback(&WritebackRequest::new(WritebackMode::Idle))
        .unwrap()
        .written;
    assert!(written_back > 0);
    let (_path, at) = socket(&dir);
    let incoming = Incoming::listen_with(
        Arc::clone(&dest),
        at.clone(),
        token("a shared secret!"),
        quick(),
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writers = start_writers(&source, &stop, 2);
    // Compaction moves objects under the sender's feet; it must not matter.
    let compactor = {
        let (source, stop) = (Arc::clone(&source), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                source.compact();
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };

    let migration =
        MigrationSource::start_with(Arc::clone(&source), at, token("a shared secret!"), quick())
            .unwrap();
    assert!(
        eventually(Duration::from_secs(30), || migration.status().rounds >= 4),
        "{}",
        migration.status().render()
    );
    stop.store(true, Ordering::Relaxed);
    let ops: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    compactor.join().unwrap();
    assert!(ops > 100, "the writers ran ({ops} operations)");
    migration.queues_stopped();
    incoming.wait_ready(Duration::from_secs(10)).unwrap();

    assert!(migration.join(Duration::from_secs(5)));
    let sent = migration.status();
    assert_eq!(sent.state, MigrationState::Completed, "{}", sent.render());
    assert_eq!(incoming.status().state, MigrationState::Completed);
    assert!(
        sent.rounds >= 4 && sent.pages > PAGES / 2,
        "{}",
        sent.render()
    );
    assert!(!source.dirty_tracking_active(), "the dirty log is off");
    assert!(
        migration.queues_started().is_err(),
        "the source never serves a device the destination serves"
    );
    check(&source);
    check(&dest);
    assert_same_pages(&source, &dest);
}

#[test]
fn an_idle_store_crosses_with_wire_bytes_close_to_its_stored_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (source, _w1) = store(PAGES);
    let (dest, _w2) = store(PAGES);
    fill(&source, 2);
    assert!(source.wait_drained(Duration::from_secs(10)));
    let (_path, at) = socket(&dir);
    let incoming = Incoming::listen_with(Arc::clone(&dest), at.clone(), None, quick()).unwrap();
    let migration = MigrationSource::start_with(Arc::clone(&source), at, None, quick()).unwrap();
    assert!(eventually(Duration::from_secs(20), || migration
        .status()
        .rounds
        >= 1));
    migration.queues_stopped();
    incoming.wait_ready(Duration::from_secs(10)).unwrap();
    assert!(migration.join(Duration::from_secs(5)));

    let status = migration.status();
    let mm = source.stats().mm;
    let records_without_bytes = mm.same_pages * 17;
    let allowed = mm.compr_data_size + mm.compr_data_size / 20 + records_without_bytes + 65536;
    assert!(
        status.wire_bytes <= allowed,
        "{} wire bytes for {} stored bytes ({} same-filled pages)\n{}",
        status.wire_bytes,
        mm.compr_data_size,
        mm.same_pages,
        status.render()
    );
    assert_eq!(
        status.stored_bytes,
        mm.compr_data_size,
        "{}",
        status.render()
    );
    assert!(status.render().contains("state completed\n"));
    assert_eq!(dest.stats().mm.compr_data_size, mm.compr_data_size);
    check(&source);
    check(&dest);
    assert_same_pages(&source, &dest);
}

#[test]
fn zstd_dictionaries_travel_before_the_pages_that_use_them() {
    let dir = tempfile::tempdir().unwrap();
    let (source, _w1) = store_with(PAGES, Algorithm::Zstd, None);
    let (dest, _w2) = store_with(PAGES, Algorithm::Zstd, None);
    fill(&source, 3);
    assert!(source.wait_drained(Duration::from_secs(10)));
    source
        .train_zstd_dictionary(&"samples=64 size=4096".parse().unwrap())
        .unwrap();
    for index in 0..PAGES / 2 {
        source.write(index, &page(4, index)).unwrap();
    }
    let (_path, at) = socket(&dir);
    let incoming = Incoming::listen_with(Arc::clone(&dest), at.clone(), None, quick()).unwrap();
    let migration = MigrationSource::start_with(Arc::clone(&source), at, None, quick()).unwrap();
    migration.queues_stopped();
    incoming.wait_ready(Duration::from_secs(20)).unwrap();
    assert_eq!(dest.zstd_dictionary_count(), 1);
    check(&source);
    check(&dest);
    assert_same_pages(&source, &dest);
}

/// Runs a migration whose source injects `fault`; both sides must fail within a bound and
/// the source keep every page.
/// `says` lists what the destination's error may say (either side may notice a stall first).
fn a_fault_fails_both_sides_cleanly(fault: Fault, says: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let (source, _w1) = store(PAGES);
    let (dest, _w2) = store(PAGES);
    fill(&source, 5);
    let before = snapshot(&source);
    let (_path, at) = socket(&dir);
    let incoming = Incoming::listen_with(Arc::clone(&dest), at.clone(), None, quick()).unwrap();
    let options = MigrationOptions {
        fault: Some(fault),
        ..quick()
    };
    let started = Instant::now();
    let migration = MigrationSource::start_with(Arc::clone(&source), at, None, options).unwrap();
    migration.queues_stopped();

    let ready = incoming.wait_ready(Duration::from_secs(10));
    let error = ready.expect_err("the destination must not start from a broken stream");
    let dest_failed = started.elapsed();
    assert!(migration.join(Duration::from_secs(5)), "the source ended");
    eprintln!(
        "{fault:?}: the destination failed after {dest_failed:?}, the source after {:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{fault:?}: took {:?}",
        started.elapsed()
    );
    let sent = migration.status();
    assert_eq!(
        sent.state,
        MigrationState::Failed,
        "{fault:?}\n{}",
        sent.render()
    );
    eprintln!("{fault:?}: destination: {error}; source: {:?}", sent.error);
    assert!(sent.error.is_some());
    assert!(says.iter().any(|s| error.contains(s)), "{fault:?}: {error}");
    assert_eq!(incoming.status().state, MigrationState::Failed);
    assert!(!source.dirty_tracking_active());
    assert!(
        migration.queues_started().is_ok(),
        "after a failed migration the source serves again"
    );
    assert!(before == snapshot(&source), "the source lost nothing");
    check(&source);
    check(&dest);
}

#[test]
fn a_dropped_connection_fails_both_sides() {
    a_fault_fails_both_sides_cleanly(
        Fault::DropAfter(5),
        &["closed the stream before every page"],
    );
}

#[test]
fn a_truncated_batch_fails_both_sides() {
    a_fault_fails_both_sides_cleanly(Fault::TruncateFrame(5), &["ended inside a frame"]);
}

#[test]
fn a_corrupted_batch_fails_both_sides() {
    a_fault_fails_both_sides_cleanly(Fault::CorruptFrame(5), &["fails its checksum"]);
}

#[test]
fn a_stalled_stream_fails_both_sides_within_the_stall_timeout() {
    a_fault_fails_both_sides_cleanly(
        Fault::StallAfter(5),
        &["sent nothing for the stall timeout", "closed the stream"],
    );
}

#[test]
fn a_cancelled_migration_never_lets_the_destination_start() {
    let dir = tempfile::tempdir().unwrap();
    let (source, _w1) = store(PAGES);
    let (dest, _w2) = store(PAGES);
    fill(&source, 6);
    let (_path, at) = socket(&dir);
    let incoming = Incoming::listen_with(Arc::clone(&dest), at.clone(), None, quick()).unwrap();
    let migration = MigrationSource::start_with(Arc::clone(&source), at, None, quick()).unwrap();
    assert!(eventually(Duration::from_secs(10), || migration
        .status()
        .rounds
        >= 1));
    migration.cancel();
    assert!(migration.join(Duration::from_secs(5)));
    assert_eq!(migration.status().state, MigrationState::Cancelled);
    assert!(incoming.wait_ready(Duration::from_secs(5)).is_err());
    assert!(eventually(Duration::from_secs(2), || incoming
        .status()
        .state
        == MigrationState::Cancelled));
    assert!(!source.dirty_tracking_active());
    check(&source);
}

#[test]
fn a_wrong_token_is_refused_on_both_sides_and_the_listener_waits_for_the_right_one() {
    let dir = tempfile::tempdir().unwrap();
    let (source, _w1) = store(64);
    let (dest, _w2) = store(64);
    fill(&source, 7);
    let (_path, at) = socket(&dir);
    let incoming = Incoming::listen_with(
        Arc::clone(&dest),
        at.clone(),
        token("the right token!"),
        quick(),
    )
    .unwrap();
    let wrong = MigrationSource::start_with(
        Arc::clone(&source),
        at.clone(),
        token("the wrong token!"),
        quick(),
    )
    .unwrap();
    assert!(wrong.join(Duration::from_secs(5)));
    let status = wrong.status();
    assert_eq!(status.state, MigrationState::Failed);
    assert!(
        status.error.as_deref().unwrap().contains("token"),
        "{}",
        status.render()
    );
    assert_eq!(status.pages, 0, "no page goes to an unauthenticated peer");
    assert_eq!(incoming.status().state, MigrationState::Connecting);
    assert!(eventually(Duration::from_secs(2), || incoming
        .status()
        .error
        .is_some_and(|e| e.contains("token"))));
    // A source without a token is refused too.
    let none = MigrationSource::start_with(Arc::clone(&source), at.clone(), None, quick()).unwrap();
    assert!(none.join(Duration::from_secs(5)));
    assert_eq!(none.status().state, MigrationState::Failed);

    let right =
        MigrationSource::start_with(Arc::clone(&source), at, token("the right token!"), quick())
            .unwrap();
    right.queues_stopped();
    incoming.wait_ready(Duration::from_secs(10)).unwrap();
    assert_same_pages(&source, &dest);
}

#[test]
fn tcp_without_a_token_is_refused_on_both_sides() {
    let (source, _w1) = store(64);
    let at: Endpoint = "tcp:127.0.0.1:1".parse().unwrap();
    let error = MigrationSource::start(Arc::clone(&source), at.clone(), None).unwrap_err();
    assert!(error.to_string().contains("token"), "{error}");
    let error = Incoming::listen(source, at, None).unwrap_err();
    assert!(error.to_string().contains("token"), "{error}");
}

#[test]
fn tcp_with_a_token_migrates() {
    let (source, _w1) = store(256);
    let (dest, _w2) = store(256);
    fill(&source, 8);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let at: Endpoint = format!("tcp:127.0.0.1:{port}").parse().unwrap();
    let incoming = Incoming::listen_with(
        Arc::clone(&dest),
        at.clone(),
        token("0123456789abcdef"),
        quick(),
    )
    .unwrap();
    let migration =
        MigrationSource::start_with(Arc::clone(&source), at, token("0123456789abcdef"), quick())
            .unwrap();
    migration.queues_stopped();
    incoming.wait_ready(Duration::from_secs(10)).unwrap();
    assert_same_pages(&source, &dest);
}

#[test]
fn a_device_of_another_size_is_refused_with_both_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let (source, _w1) = store(64);
    let (dest, _w2) = store(128);
    let (_path, at) = socket(&dir);
    let incoming = Incoming::listen_with(Arc::clone(&dest), at.clone(), None, quick()).unwrap();
    let migration = MigrationSource::start_with(source, at, None, quick()).unwrap();
    let error = incoming.wait_ready(Duration::from_secs(5)).unwrap_err();
    assert!(error.contains("64") && error.contains("128"), "{error}");
    assert!(migration.join(Duration::from_secs(5)));
    let status = migration.status();
    assert_eq!(status.state, MigrationState::Failed);
    let text = status.error.unwrap();
    assert!(text.contains("64") && text.contains("128"), "{text}");
}

#[test]
fn the_destination_waits_for_synced_again_after_the_source_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let (source, _w1) = store(PAGES);
    let (dest, _w2) = store(PAGES);
    fill(&source, 9);
    let (_path, at) = socket(&dir);
    let incoming = Incoming::listen_with(Arc::clone(&dest), at.clone(), None, quick()).unwrap();
    let migration = MigrationSource::start_with(Arc::clone(&source), at, None, quick()).unwrap();
    migration.queues_stopped();
    assert!(eventually(Duration::from_secs(10), || incoming
        .status()
        .state
        == MigrationState::Synced));

    // The VM resumes on the source (`cont`): the destination must not start.
    migration.queues_started().unwrap();
    assert!(eventually(Duration::from_secs(5), || incoming
        .status()
        .state
        == MigrationState::Precopy));
    assert!(incoming.wait_ready(Duration::from_millis(300)).is_err());
    for index in 0..64 {
        source.write(index, &page(10, index)).unwrap();
    }
    source.discard(64..128).unwrap();

    migration.queues_stopped();
    incoming.wait_ready(Duration::from_secs(10)).unwrap();
    assert!(migration.join(Duration::from_secs(5)));
    assert_eq!(migration.status().state, MigrationState::Completed);
    check(&source);
    check(&dest);
    assert_same_pages(&source, &dest);
}

#[test]
fn a_close_after_synced_lets_the_destination_start_without_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let (source, _w1) = store(256);
    let (dest, _w2) = store(256);
    fill(&source, 11);
    let (_path, at) = socket(&dir);
    let incoming = Incoming::listen_with(Arc::clone(&dest), at.clone(), None, quick()).unwrap();
    let migration = MigrationSource::start_with(Arc::clone(&source), at, None, quick()).unwrap();
    migration.queues_stopped();
    assert!(eventually(Duration::from_secs(10), || migration
        .status()
        .state
        == MigrationState::Synced));
    migration.frontend_gone();
    assert!(migration.join(Duration::from_secs(5)));
    drop(migration);
    incoming.wait_ready(Duration::from_secs(5)).unwrap();
    assert_same_pages(&source, &dest);
}

/// QEMU stops the source's queues and leaves at once: both notices reach the sender before it
/// wakes. The Synced the stop sends must still be followed by the Close the departure owes, so
/// that the destination starts without waiting for a grant the source can no longer give.
#[test]
fn a_frontend_that_leaves_as_it_stops_the_queues_still_closes_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let (source, _w1) = store(256);
    let (dest, _w2) = store(256);
    fill(&source, 13);
    let (_path, at) = socket(&dir);
    let incoming = Incoming::listen_with(Arc::clone(&dest), at.clone(), None, quick()).unwrap();
    let migration = MigrationSource::start_with(Arc::clone(&source), at, None, quick()).unwrap();
    assert!(eventually(Duration::from_secs(10), || migration
        .status()
        .state
        == MigrationState::Precopy));
    migration.queues_stopped();
    migration.frontend_gone();
    assert!(
        migration.join(Duration::from_secs(5)),
        "the source never ended"
    );
    assert_eq!(migration.status().state, MigrationState::Completed);
    drop(migration);
    incoming.wait_ready(Duration::from_secs(5)).unwrap();
    assert_same_pages(&source, &dest);
}

#[test]
fn a_stale_socket_is_replaced_and_a_regular_file_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (dest, _w) = store(64);
    let (path, at) = socket(&dir);
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let incoming = Incoming::listen(Arc::clone(&dest), at.clone(), None).unwrap();
    drop(incoming);
    std::fs::write(&path, b"not a socket").unwrap();
    let error = Incoming::listen(dest, at, None).unwrap_err();
    assert!(error.to_string().contains("not a socket"), "{error}");
    assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
}

#[test]
fn a_destination_out_of_memory_fails_both_sides_with_its_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let (source, _w1) = store(PAGES);
    fill(&source, 12);
    let dest = Arc::new(
        PageStore::new(StoreConfig {
            capacity_pages: PAGES,
            algorithm: Algorithm::Lz4,
            level: None,
            mem_limit: None,
        })
        .unwrap()
        .with_secondary_algorithms(&["zstd".parse().unwrap()])
        .unwrap(),
    );
    dest.set_mem_limit(Some(dest.mem_used_total() + (256 << 10)));
    let (_path, at) = socket(&dir);
    let incoming = Incoming::listen_with(Arc::clone(&dest), at.clone(), None, quick()).unwrap();
    let migration = MigrationSource::start_with(Arc::clone(&source), at, None, quick()).unwrap();
    migration.queues_stopped();
    let error = incoming.wait_ready(Duration::from_secs(10)).unwrap_err();
    assert!(error.contains("memory limit"), "{error}");
    assert!(migration.join(Duration::from_secs(5)));
    let status = migration.status();
    assert_eq!(status.state, MigrationState::Failed);
    let text = status.error.unwrap();
    assert!(text.contains("memory limit"), "{text}");
    assert!(migration.queues_started().is_ok());
    check(&source);
    check(&dest);
}

/// Connects to `path`, writes `bytes` and waits for the destination to hang up.
fn hostile_peer(path: &Path, bytes: &[u8]) {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(path).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = stream.write_all(bytes);
    let mut sink = Vec::new();
    let _ = stream.read_to_end(&mut sink);
}

#[test]
fn hostile_peers_are_refused_without_allocating_and_the_right_source_still_gets_in() {
    let dir = tempfile::tempdir().unwrap();
    let (source, _w1) = store(256);
    let (dest, _w2) = store(256);
    fill(&source, 13);
    let (path, at) = socket(&dir);
    let incoming = Incoming::listen_with(Arc::clone(&dest), at.clone(), None, quick()).unwrap();
    // A frame announcing 4 GiB, a frame of garbage, a hello of another version.
    hostile_peer(&path, &u32::MAX.to_le_bytes());
    hostile_peer(&path, &[5, 0, 0, 0, 1, 2, 3, 4, 5, 0, 0, 0, 0]);
    let mut hello = vec![1u8];
    hello.extend_from_slice(b"VUZRMIG\0");
    hello.extend_from_slice(&9u16.to_le_bytes());
    hello.extend_from_slice(&[1, 0]);
    hello.extend_from_slice(&[0; 32]);
    let mut frame = u32::try_from(hello.len()).unwrap().to_le_bytes().to_vec();
    frame.extend_from_slice(&hello);
    let crc = crc32fast::hash(&frame);
    frame.extend_from_slice(&crc.to_le_bytes());
    hostile_peer(&path, &frame);
    assert!(eventually(Duration::from_secs(2), || incoming
        .status()
        .error
        .is_some_and(|e| e.contains("version 9"))));
    assert_eq!(incoming.status().state, MigrationState::Connecting);

    let migration = MigrationSource::start_with(Arc::clone(&source), at, None, quick()).unwrap();
    migration.queues_stopped();
    incoming.wait_ready(Duration::from_secs(10)).unwrap();
    assert_same_pages(&source, &dest);
}

#[test]
fn the_listener_gives_up_after_its_bound_of_refused_peers() {
    let dir = tempfile::tempdir().unwrap();
    let (dest, _w) = store(64);
    let (path, at) = socket(&dir);
    let incoming = Incoming::listen_with(Arc::clone(&dest), at, None, quick()).unwrap();
    for _ in 0..quick().accept_attempts {
        hostile_peer(&path, b"GET / HTTP/1.0\r\n\r\n");
    }
    let error = incoming.wait_ready(Duration::from_secs(5)).unwrap_err();
    assert!(error.contains("4 peers were refused"), "{error}");
    assert_eq!(incoming.status().state, MigrationState::Failed);
    assert!(!path.exists(), "the socket is removed");
}

#[test]
fn either_side_shuts_down_within_a_bound() {
    let dir = tempfile::tempdir().unwrap();
    let (source, _w1) = store(PAGES);
    let (dest, _w2) = store(PAGES);
    fill(&source, 14);
    let (_path, at) = socket(&dir);
    // A listener nobody connects to.
    let lonely = Incoming::listen_with(Arc::clone(&dest), at.clone(), None, quick()).unwrap();
    let started = Instant::now();
    drop(lonely);
    assert!(started.elapsed() < Duration::from_millis(500));

    // A source mid-stream, and its destination.
    let incoming = Incoming::listen_with(Arc::clone(&dest), at.clone(), None, quick()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writers = start_writers(&source, &stop, 1);
    let migration = MigrationSource::start_with(Arc::clone(&source), at, None, quick()).unwrap();
    assert!(eventually(Duration::from_secs(10), || migration
        .status()
        .rounds
        >= 2));
    let started = Instant::now();
    drop(migration);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert!(!source.dirty_tracking_active());
    let started = Instant::now();
    drop(incoming);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.join().unwrap();
    }
    check(&source);
    check(&dest);
}

#[test]
fn a_resume_before_synced_returns_at_once_and_sends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (source, _w1) = store(PAGES);
    let (dest, _w2) = store(PAGES);
    fill(&source, 15);
    let (_path, at) = socket(&dir);
    let incoming = Incoming::listen_with(Arc::clone(&dest), at.clone(), None, quick()).unwrap();
    let migration = MigrationSource::start_with(Arc::clone(&source), at, None, quick()).unwrap();
    let started = Instant::now();
    migration.queues_started().unwrap();
    assert!(started.elapsed() < Duration::from_millis(100));
    // Stopped and started again before the sender took the stop: no Synced goes out.
    migration.queues_stopped();
    migration.queues_started().unwrap();
    assert!(incoming.wait_ready(Duration::from_millis(300)).is_err());
    assert!(!migration.status().state.is_final());
    migration.queues_stopped();
    incoming.wait_ready(Duration::from_secs(10)).unwrap();
    assert_same_pages(&source, &dest);
}

/// Not a check: prints what migrating an idle store of `MIGRATE_PAGES` pages (default 65536,
/// 256 MiB) costs. `cargo nextest run --test migrate --run-ignored only --no-capture`.
#[test]
#[ignore = "a measurement, not a check"]
fn measure_an_idle_migration() {
    let pages: u64 = std::env::var("MIGRATE_PAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(65536);
    let dir = tempfile::tempdir().unwrap();
    let (source, _w1) = store(pages);
    let (dest, _w2) = store(pages);
    fill(&source, 16);
    assert!(source.wait_drained(Duration::from_secs(60)));
    let (_path, at) = socket(&dir);
    let incoming = Incoming::listen(Arc::clone(&dest), at.clone(), None).unwrap();
    let started = Instant::now();
    let migration = MigrationSource::start(Arc::clone(&source), at, None).unwrap();
    assert!(eventually(Duration::from_secs(120), || migration
        .status()
        .rounds
        >= 1));
    let precopy = started.elapsed();
    let stop = Instant::now();
    migration.queues_stopped();
    incoming.wait_ready(Duration::from_secs(60)).unwrap();
    let switchover = stop.elapsed();
    let mm = source.stats().mm;
    let status = migration.status();
    eprintln!(
        "{pages} pages: orig {} B, compr_data_size {} B, wire {} B ({:.4} x compr), \
         round 1 {precopy:?}, switchover {switchover:?}\n{}",
        mm.orig_data_size,
        mm.compr_data_size,
        status.wire_bytes,
        status.wire_bytes as f64 / mm.compr_data_size as f64,
        status.render()
    );
}
