// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Unit tests of the stream's format: endpoints, tokens, records.

use super::wire::{parse_batch, put_record, Endpoint, Token};
use crate::store::migrate::StoredPage;
use crate::PAGE_SIZE;

#[test]
fn endpoints_parse_and_print_back() {
    for text in [
        "unix:/run/zram.sock",
        "tcp:host.example:4444",
        "tcp:[::1]:80",
    ] {
        let endpoint: Endpoint = text.parse().unwrap();
        assert_eq!(endpoint.to_string(), text);
    }
    for bad in [
        "unix:",
        "tcp:host",
        "tcp::80",
        "tcp:host:port",
        "http://x",
        "",
    ] {
        assert!(bad.parse::<Endpoint>().is_err(), "{bad} parsed");
    }
}

#[test]
fn a_short_token_is_refused_and_proofs_depend_on_token_label_and_nonces() {
    assert!(Token::from_bytes(b"short").is_err());
    let token = Token::from_bytes(b"0123456789abcdef").unwrap();
    let other = Token::from_bytes(b"0123456789abcdeF").unwrap();
    let (a, b) = ([1u8; 32], [2u8; 32]);
    let proof = token.prove(b"source", &a, &b);
    assert!(token.verify(b"source", &a, &b, &proof));
    assert!(!other.verify(b"source", &a, &b, &proof));
    assert!(!token.verify(b"destination", &a, &b, &proof));
    assert!(!token.verify(b"source", &b, &a, &proof));
    assert_eq!(
        format!("{token:?}"),
        "Token(..)",
        "Debug never shows the secret"
    );
}

#[test]
fn records_roundtrip_and_a_bad_record_refuses_the_whole_batch() {
    let raw = [7u8; PAGE_SIZE];
    let pages = [
        (0, StoredPage::Empty),
        (1, StoredPage::SameFilled([1, 2, 3, 4, 5, 6, 7, 8])),
        (
            2,
            StoredPage::Compressed {
                priority: 1,
                object: &[9; 100],
            },
        ),
        (3, StoredPage::Raw(&raw)),
        (4, StoredPage::Damaged),
    ];
    let mut batch = Vec::new();
    let stored: u64 = pages
        .iter()
        .map(|(i, p)| put_record(&mut batch, *i, p))
        .sum();
    assert_eq!(stored, 100 + PAGE_SIZE as u64);
    assert_eq!(parse_batch(&batch, 5).unwrap(), pages.to_vec());
    assert!(parse_batch(&batch, 4).is_err(), "index past the device");
    assert!(
        parse_batch(&batch[..batch.len() - 1], 5).is_err(),
        "cut short"
    );
    let mut unknown = Vec::new();
    put_record(&mut unknown, 0, &StoredPage::Empty);
    unknown[8] = 99;
    assert!(parse_batch(&unknown, 5).is_err(), "unknown kind");
    let mut long = Vec::new();
    long.extend_from_slice(&0u64.to_le_bytes());
    long.extend_from_slice(&[2, 0, 0xff, 0x0f]);
    long.extend_from_slice(&[0; 4095]);
    assert!(
        parse_batch(&long, 5).is_err(),
        "an object longer than a slot holds"
    );
}

mod store_records {
    use crate::codec::Algorithm;
    use crate::store::migrate::{ExportScratch, StoredPage};
    use crate::store::{PageStore, StoreConfig, StoreError};
    use crate::PAGE_SIZE;

    fn store(mem_limit: Option<u64>) -> PageStore {
        PageStore::new(StoreConfig {
            capacity_pages: 16,
            algorithm: Algorithm::Lz4,
            level: None,
            mem_limit,
        })
        .unwrap()
    }

    #[test]
    fn every_kind_of_slot_exports_and_imports_to_the_same_page() {
        let source = store(None);
        let dest = store(None);
        let mut text = [0u8; PAGE_SIZE];
        for (i, b) in text.iter_mut().enumerate() {
            *b = b"swap page text "[i % 15];
        }
        let mut noise = [0u8; PAGE_SIZE];
        let mut rng = crate::pagegen::SplitMix64::new(1);
        for chunk in noise.chunks_mut(8) {
            chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
        }
        source.write(1, &[0xab; PAGE_SIZE]).unwrap();
        source.write(2, &text).unwrap();
        source.write(3, &noise).unwrap();
        source.write(4, &[0; PAGE_SIZE]).unwrap();
        let mut scratch = ExportScratch::default();
        let mut kinds = Vec::new();
        for index in 0..16 {
            let page = source.export_slot(index, &mut scratch).unwrap();
            kinds.push(match page {
                StoredPage::Empty => "empty",
                StoredPage::SameFilled(_) => "same",
                StoredPage::Compressed { .. } => "compressed",
                StoredPage::Raw(_) => "raw",
                StoredPage::Damaged => "damaged",
            });
            dest.import_slot(index, page).unwrap();
        }
        assert_eq!(
            kinds[..6],
            ["empty", "same", "compressed", "raw", "same", "empty"]
        );
        assert!(matches!(
            source.export_slot(2, &mut scratch).unwrap(),
            StoredPage::Compressed { priority: 0, .. }
        ));
        assert!(matches!(
            source.export_slot(3, &mut scratch).unwrap(),
            StoredPage::Raw(_)
        ));
        let (mut a, mut b) = ([0u8; PAGE_SIZE], [0u8; PAGE_SIZE]);
        for index in 0..16 {
            source.read(index, &mut a).unwrap();
            dest.read(index, &mut b).unwrap();
            assert!(a == b, "page {index}");
        }
        assert_eq!(
            source.stats().mm.compr_data_size,
            dest.stats().mm.compr_data_size
        );
        // A later round overwrites whatever the slot holds.
        dest.import_slot(2, StoredPage::Empty).unwrap();
        dest.import_slot(1, StoredPage::Raw(&noise)).unwrap();
        dest.read(1, &mut b).unwrap();
        assert!(b == noise);
        dest.check_consistency().unwrap();
    }

    #[test]
    fn a_damaged_record_reads_as_an_error_never_as_zeros() {
        let dest = store(None);
        dest.write(5, &[7; PAGE_SIZE]).unwrap();
        dest.import_slot(5, StoredPage::Damaged).unwrap();
        let mut page = [0u8; PAGE_SIZE];
        assert!(dest.read(5, &mut page).is_err());
        assert_eq!(dest.stats().info.damaged_pages, 1);
        dest.check_consistency().unwrap();
        let mut scratch = ExportScratch::default();
        assert_eq!(
            dest.export_slot(5, &mut scratch).unwrap(),
            StoredPage::Damaged
        );
        dest.import_slot(5, StoredPage::Empty).unwrap();
        assert_eq!(dest.stats().info.damaged_pages, 0);
        dest.check_consistency().unwrap();
    }

    #[test]
    fn an_import_past_the_memory_limit_is_refused_and_the_slot_keeps_its_content() {
        let empty = store(None).mem_used_total();
        let dest = store(Some(empty + 4096));
        let raw = [0x5a; PAGE_SIZE];
        let mut refused = None;
        for index in 0..16 {
            if let Err(e) = dest.import_slot(index, StoredPage::Raw(&raw)) {
                refused = Some((index, e));
                break;
            }
        }
        let (index, error) = refused.expect("the limit refuses some page");
        assert!(matches!(error, StoreError::MemoryLimit { .. }), "{error}");
        let mut page = [1u8; PAGE_SIZE];
        dest.read(index, &mut page).unwrap();
        assert!(page == [0; PAGE_SIZE], "the refused slot stays empty");
        dest.check_consistency().unwrap();
    }

    #[test]
    fn a_priority_the_store_lacks_is_refused() {
        let dest = store(None);
        let error = dest
            .import_slot(
                0,
                StoredPage::Compressed {
                    priority: 1,
                    object: &[1; 10],
                },
            )
            .unwrap_err();
        assert!(error.to_string().contains("priority 1"), "{error}");
        dest.check_consistency().unwrap();
    }

    #[test]
    fn the_dirty_log_marks_guest_changes_only_and_is_off_after_the_migration() {
        let s = store(None);
        s.write(3, &[1; PAGE_SIZE]).unwrap();
        let tracking = s.start_dirty_tracking().unwrap();
        assert!(s.start_dirty_tracking().is_err(), "one migration at a time");
        let mut seen = Vec::new();
        assert_eq!(
            tracking.drain_from(0, |i| {
                seen.push(i);
                true
            }),
            None
        );
        assert_eq!(seen.len(), 16, "the first pass sees every slot");
        assert_eq!(s.migration_dirty_pages(), 0);
        s.write(7, &[2; PAGE_SIZE]).unwrap();
        s.discard(3..4).unwrap();
        s.modify(9, |p| p[0] = 1).unwrap();
        s.discard(12..13).unwrap(); // already empty: nothing changes
        s.compact();
        let mut seen = Vec::new();
        tracking.drain_from(0, |i| {
            seen.push(i);
            true
        });
        assert_eq!(seen, vec![3, 7, 9]);
        // Stopping early gives the rest back.
        s.write(1, &[1; PAGE_SIZE]).unwrap();
        s.write(2, &[1; PAGE_SIZE]).unwrap();
        assert_eq!(tracking.drain_from(0, |_| false), Some(2));
        assert_eq!(s.migration_dirty_pages(), 1);
        drop(tracking);
        assert!(!s.dirty_tracking_active());
        assert_eq!(s.migration_dirty_pages(), 0);
    }
}

#[test]
fn a_token_file_loses_its_trailing_newline_and_a_short_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    std::fs::write(&path, b"0123456789abcdef\n").unwrap();
    assert_eq!(
        Token::from_file(&path).unwrap(),
        Token::from_bytes(b"0123456789abcdef").unwrap()
    );
    std::fs::write(&path, b"short\n").unwrap();
    let error = Token::from_file(&path).unwrap_err().to_string();
    assert!(error.contains("5 bytes"), "{error}");
    let missing = Token::from_file(&dir.path().join("none")).unwrap_err();
    assert!(
        missing.sentence().contains("could not be read"),
        "{missing}"
    );
}

/// A destination driven by a scripted source speaking the stream by hand.
mod scripted_source {
    use std::net::Shutdown;
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::super::wire::{self, Conn, FrameReader, FrameWriter, Kind};
    use super::super::{Incoming, MigrationState};
    use crate::codec::Algorithm;
    use crate::migrate::Endpoint;
    use crate::store::{PageStore, StoreConfig};

    /// A connected source that said hello and sent the destination's own shape.
    fn connect(dest: &PageStore, path: &std::path::Path) -> (UnixStream, FrameWriter) {
        let stream = UnixStream::connect(path).unwrap();
        let mut reader = FrameReader::new(Conn::Unix(stream.try_clone().unwrap()));
        let mut writer = FrameWriter::new(Conn::Unix(stream.try_clone().unwrap()));
        writer
            .send_frame(
                Kind::Hello,
                &wire::hello(wire::ROLE_SOURCE, false, &[7; wire::NONCE_BYTES]),
            )
            .unwrap();
        let (kind, _) = reader.next().unwrap().unwrap();
        assert_eq!(kind, Kind::Hello);
        let shape = dest.store_shape();
        let mut payload = Vec::new();
        payload.extend_from_slice(&shape.capacity_pages.to_le_bytes());
        payload.extend_from_slice(&shape.page_size.to_le_bytes());
        for name in &shape.algorithms {
            let len = u16::try_from(name.len()).unwrap();
            payload.extend_from_slice(&len.to_le_bytes());
            payload.extend_from_slice(name.as_bytes());
        }
        writer.send_frame(Kind::Shape, &payload).unwrap();
        (stream, writer)
    }

    fn wait_for(incoming: &Incoming, state: MigrationState) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while incoming.status().state != state {
            assert!(Instant::now() < deadline, "{:?}", incoming.status());
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn a_started_the_source_cannot_take_still_lets_its_close_complete_the_store() {
        // Arrange: the source sent every page and Synced, then stopped reading, as a source
        // whose frontend left does once it has sent Close and shut its stream down.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("migrate.sock");
        let dest = Arc::new(
            PageStore::new(StoreConfig {
                capacity_pages: 16,
                algorithm: Algorithm::Lz4,
                level: None,
                mem_limit: None,
            })
            .unwrap(),
        );
        let incoming =
            Incoming::listen(Arc::clone(&dest), Endpoint::Unix(path.clone()), None).unwrap();
        let (stream, mut writer) = connect(&dest, &path);
        writer.send_frame(Kind::Synced, &[]).unwrap();
        wait_for(&incoming, MigrationState::Synced);
        stream.shutdown(Shutdown::Read).unwrap();

        // Act: the destination's queues start (its Started cannot be written), then the
        // source's Close arrives.
        let before_close = incoming.wait_ready(Duration::from_millis(200));
        let close = writer.send_frame(Kind::Close, &[]);
        let after_close = incoming.wait_ready(Duration::from_secs(10));

        // Assert: not complete before the Close, complete after it.
        let early = before_close.unwrap_err();
        assert!(early.contains("is not complete after"), "{early}");
        close.unwrap();
        after_close.unwrap();
        assert_eq!(incoming.status().state, MigrationState::Completed);
    }
}
