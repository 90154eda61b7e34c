// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The lz4 implementations side by side (`cargo bench --bench lz4`): C liblz4 (`lz4-sys`, the
//! `lz4-c` feature) against `lz4_flex` as this crate builds it (its unsafe encoder, the
//! `safe-encode` feature off), on the same pages, one thread: ns per page to compress and to
//! decompress, best of five rounds, compressed bytes, and the ratios C / Rust.
//!
//! Pages: the swap-like mix (`pagegen`, 16384 pages) and, when `LZ4_BENCH_CORPUS` names a
//! corpus of real memory (`vhost-user-zram-bench --capture-corpus`), that corpus. Same-filled
//! pages are left out, as the store never hands them to a codec.

use std::time::Instant;

use vhost_user_zram::codec::lz4::{c, rust};
use vhost_user_zram::codec::COMPRESS_BUFFER;
use vhost_user_zram::pagegen::fill_page;
use vhost_user_zram::PAGE_SIZE;

const ROUNDS: usize = 5;

type Compress =
    fn(&[u8; PAGE_SIZE], &mut [u8]) -> Result<usize, vhost_user_zram::codec::CodecError>;
type Decompress = fn(&[u8], &mut [u8; PAGE_SIZE]) -> Result<(), vhost_user_zram::codec::CodecError>;

fn same_filled(page: &[u8; PAGE_SIZE]) -> bool {
    let word = &page[..8];
    page.chunks_exact(8).all(|w| w == word)
}

/// Best-of-rounds ns per page to compress and decompress, and the compressed bytes.
fn measure(
    pages: &[[u8; PAGE_SIZE]],
    compress: Compress,
    decompress: Decompress,
) -> (f64, f64, u64) {
    let mut objects = vec![vec![0u8; COMPRESS_BUFFER]; pages.len()];
    let mut lens = vec![0usize; pages.len()];
    let mut out = [0u8; PAGE_SIZE];
    let (mut best_c, mut best_d) = (f64::MAX, f64::MAX);
    for _ in 0..ROUNDS {
        let started = Instant::now();
        for (i, page) in pages.iter().enumerate() {
            lens[i] = compress(page, &mut objects[i]).expect("compress");
        }
        best_c = best_c.min(started.elapsed().as_nanos() as f64 / pages.len() as f64);
        let started = Instant::now();
        for (i, object) in objects.iter().enumerate() {
            decompress(&object[..lens[i]], &mut out).expect("decompress");
            std::hint::black_box(&out);
        }
        best_d = best_d.min(started.elapsed().as_nanos() as f64 / pages.len() as f64);
    }
    for (i, page) in pages.iter().enumerate() {
        decompress(&objects[i][..lens[i]], &mut out).expect("decompress");
        assert!(out == *page, "page {i} did not round-trip");
    }
    (best_c, best_d, lens.iter().map(|&n| n as u64).sum())
}

fn run(name: &str, pages: Vec<[u8; PAGE_SIZE]>) {
    let pages: Vec<[u8; PAGE_SIZE]> = pages.into_iter().filter(|p| !same_filled(p)).collect();
    // Alternate, so that load from elsewhere hits both alike.
    let rust_first = measure(&pages, rust::compress, rust::decompress);
    let c_first = measure(&pages, c::compress, c::decompress);
    let rust_again = measure(&pages, rust::compress, rust::decompress);
    let c_again = measure(&pages, c::compress, c::decompress);
    let r = (
        rust_first.0.min(rust_again.0),
        rust_first.1.min(rust_again.1),
        rust_first.2,
    );
    let k = (
        c_first.0.min(c_again.0),
        c_first.1.min(c_again.1),
        c_first.2,
    );
    println!("{name}: {} pages (same-filled ones left out)", pages.len());
    println!(
        "  compress    lz4_flex {:>6.0} ns/page   C liblz4 {:>6.0} ns/page   C / Rust {:.2}",
        r.0,
        k.0,
        k.0 / r.0
    );
    println!(
        "  decompress  lz4_flex {:>6.0} ns/page   C liblz4 {:>6.0} ns/page   C / Rust {:.2}",
        r.1,
        k.1,
        k.1 / r.1
    );
    println!(
        "  compressed  lz4_flex {:>6.1} MiB        C liblz4 {:>6.1} MiB        C / Rust {:.3}",
        r.2 as f64 / f64::from(1 << 20),
        k.2 as f64 / f64::from(1 << 20),
        k.2 as f64 / r.2 as f64
    );
}

fn main() {
    let swap: Vec<[u8; PAGE_SIZE]> = (0..16384)
        .map(|i| {
            let mut page = [0u8; PAGE_SIZE];
            fill_page(1, i, &mut page);
            page
        })
        .collect();
    run("swap-like mix", swap);
    if let Some(path) = std::env::var_os("LZ4_BENCH_CORPUS") {
        let data = std::fs::read(&path).expect("read the corpus");
        // A corpus file: one header page, then the pages.
        let pages = data[PAGE_SIZE.min(data.len())..]
            .chunks_exact(PAGE_SIZE)
            .map(|chunk| chunk.try_into().expect("a page"))
            .collect();
        run(
            &format!("corpus {}", std::path::Path::new(&path).display()),
            pages,
        );
    }
}
