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
