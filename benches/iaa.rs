// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The IAA benchmark (`cargo bench --bench iaa`), in one run:
//!
//! 1. The batch pipeline through the software work queue: pages/s when the caller submits one
//!    page at a time against eight at a time (the zswap batching series' comparison), next to
//!    the same compressor called directly on the caller's thread. Batch 1 vs direct is the
//!    pipeline's own overhead (a descriptor, a thread hop, a completion poll); batch 8 vs
//!    batch 1 is what submitting before polling buys when the queue has several engines.
//! 2. Ratio and throughput of deflate-iaa (fixed and dynamic Huffman, on the software queue,
//!    batches of 8) against lz4 and zstd level 1 on the swap-like mix (`pagegen`), counting
//!    only the pages a store would compress (same-filled pages never reach a codec) and
//!    incompressible pages at their raw 4096 bytes, as the store keeps them.
//!
//! Pages: `IAA_BENCH_PAGES` (default 8192 = 32 MiB). Every timing is the best of 3 runs.
//! Without an IAA device these are software numbers: the device's own throughput is not
//! measured here.

use std::hint::black_box;
use std::time::{Duration, Instant};

use iaa::soft::{SoftwareQueue, SoftwareQueueConfig};
use iaa::{Engine, EngineConfig, HuffmanMode};
use vhost_user_zram::codec::{
    Algorithm, Codec, CodecError, IaaBackend, IaaMode, IaaOptions, COMPRESS_BUFFER, MAX_BATCH,
};
use vhost_user_zram::pagegen::fill_page;
use vhost_user_zram::store::same_fill;
use vhost_user_zram::PAGE_SIZE;

const SEED: u64 = 0x1aa_be7c;
const ROUNDS: usize = 3;

type Page = [u8; PAGE_SIZE];

fn best_of(mut run: impl FnMut()) -> Duration {
    (0..ROUNDS)
        .map(|_| {
            let started = Instant::now();
            run();
            started.elapsed()
        })
        .min()
        .expect("at least one round")
}

/// The swap-like pages a store would hand to a codec (not same-filled).
fn codec_pages(count: usize) -> Vec<Box<Page>> {
    let mut pages = Vec::with_capacity(count);
    let mut index = 0u64;
    while pages.len() < count {
        let mut page = Box::new([0u8; PAGE_SIZE]);
        fill_page(SEED, index, &mut page);
        index += 1;
        if same_fill::detect(&page).is_none() {
            pages.push(page);
        }
    }
    pages
}

fn software_engine(workers: usize) -> Engine {
    let queue = SoftwareQueue::new(SoftwareQueueConfig { depth: 64, workers }).expect("queue");
    let config = EngineConfig {
        mode: HuffmanMode::Fixed,
        spin_sweeps: 1_000,
        decompress_on_device: false,
        ..EngineConfig::default()
    };
    Engine::new(Box::new(queue), config)
}

/// Pages/s compressing `pages` through `engine` `batch` pages per call.
fn engine_rate(engine: &Engine, pages: &[Box<Page>], batch: usize) -> f64 {
    let mut buffers = vec![vec![0u8; COMPRESS_BUFFER]; batch];
    let mut results = vec![Ok(0); batch];
    let elapsed = best_of(|| {
        for group in pages.chunks(batch) {
            let refs: Vec<&Page> = group.iter().map(|p| &**p).collect();
            let mut dsts: Vec<&mut [u8]> = buffers.iter_mut().map(|b| &mut b[..]).collect();
            engine.compress_batch(&refs, &mut dsts[..group.len()], &mut results[..group.len()]);
            black_box(&results);
        }
    });
    pages.len() as f64 / elapsed.as_secs_f64()
}

fn direct_rate(engine: &Engine, pages: &[Box<Page>]) -> f64 {
    let mut dst = vec![0u8; COMPRESS_BUFFER];
    let elapsed = best_of(|| {
        for page in pages {
            let _ = black_box(engine.compress_in_software(page, &mut dst));
        }
    });
    pages.len() as f64 / elapsed.as_secs_f64()
}

struct CodecRow {
    name: String,
    ratio: f64,
    compress_mib_s: f64,
    decompress_mib_s: f64,
    incompressible: usize,
}

fn mib_per_s(pages: usize, elapsed: Duration) -> f64 {
    (pages * PAGE_SIZE) as f64 / (1 << 20) as f64 / elapsed.as_secs_f64()
}

/// Ratio and throughput of `codec` on `pages`, batches of `MAX_BATCH` per call (the software
/// codecs loop inside `compress_batch`).
fn measure_codec(name: &str, codec: &dyn Codec, pages: &[Box<Page>]) -> CodecRow {
    let mut buffers = vec![vec![0u8; COMPRESS_BUFFER]; pages.len()];
    let mut sizes: Vec<Result<usize, CodecError>> = (0..pages.len()).map(|_| Ok(0)).collect();
    let mut compress_all = |sizes: &mut [Result<usize, CodecError>]| {
        for ((group, dsts), results) in pages
            .chunks(MAX_BATCH)
            .zip(buffers.chunks_mut(MAX_BATCH))
            .zip(sizes.chunks_mut(MAX_BATCH))
        {
            let refs: Vec<&Page> = group.iter().map(|p| &**p).collect();
            let mut dst_refs: Vec<&mut [u8]> = dsts.iter_mut().map(|b| &mut b[..]).collect();
            codec.compress_batch(&refs, &mut dst_refs, results);
        }
    };
    let compress = best_of(|| compress_all(&mut sizes));
    let stored: usize = sizes
        .iter()
        .map(|r| match r {
            Ok(n) if *n < PAGE_SIZE => *n,
            Ok(_) | Err(CodecError::Incompressible { .. }) => PAGE_SIZE,
            Err(e) => panic!("{name}: {e}"),
        })
        .sum();
    let incompressible = sizes
        .iter()
        .filter(|r| !matches!(r, Ok(n) if *n < PAGE_SIZE))
        .count();
    let mut out = [0u8; PAGE_SIZE];
    for (i, result) in sizes.iter().enumerate() {
        if let Ok(n) = result {
            codec
                .decompress(&buffers[i][..*n], &mut out)
                .expect("decompress");
            assert!(
                out[..] == pages[i][..],
                "{name}: page {i} does not round-trip"
            );
        }
    }
    let decompress = best_of(|| {
        for (i, result) in sizes.iter().enumerate() {
            if let Ok(n) = result {
                codec
                    .decompress(&buffers[i][..*n], &mut out)
                    .expect("decompress");
                black_box(&out);
            }
        }
    });
    let decoded = sizes.iter().filter(|r| r.is_ok()).count();
    CodecRow {
        name: name.to_owned(),
        ratio: (pages.len() * PAGE_SIZE) as f64 / stored as f64,
        compress_mib_s: mib_per_s(pages.len(), compress),
        decompress_mib_s: mib_per_s(decoded, decompress),
        incompressible,
    }
}

fn main() {
    let count: usize = std::env::var("IAA_BENCH_PAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8192);
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let pages = codec_pages(count);
    println!(
        "IAA benchmark: {count} swap-like pages that are not same-filled ({} MiB), {cpus} CPUs, \
         best of {ROUNDS}",
        (count * PAGE_SIZE) >> 20
    );

    println!();
    println!("1. Batching through the software work queue (fixed Huffman), pages/s:");
    println!(
        "{:>8} {:>14} {:>14} {:>14} {:>9}",
        "workers", "direct", "batch 1", "batch 8", "8 vs 1"
    );
    for workers in [1, 2, 4] {
        let engine = software_engine(workers);
        let direct = direct_rate(&engine, &pages);
        let one = engine_rate(&engine, &pages, 1);
        let eight = engine_rate(&engine, &pages, 8);
        let stats = engine.stats();
        assert_eq!(stats.fallback_busy + stats.fallback_broken, 0, "{stats:?}");
        println!(
            "{workers:>8} {direct:>14.0} {one:>14.0} {eight:>14.0} {:>8.2}x",
            eight / one
        );
    }

    println!();
    println!("2. Ratio and throughput on the same pages (one caller thread, batches of 8):");
    println!(
        "{:<28} {:>7} {:>14} {:>16} {:>15}",
        "codec", "ratio", "compress MiB/s", "decompress MiB/s", "incompressible"
    );
    let software = |mode| {
        Algorithm::DeflateIaa(IaaOptions {
            backend: IaaBackend::Software,
            mode,
        })
    };
    let codecs: [(&str, Algorithm, Option<i32>); 4] = [
        (
            "deflate-iaa fixed (sw queue)",
            software(IaaMode::Fixed),
            None,
        ),
        (
            "deflate-iaa dynamic (sw q.)",
            software(IaaMode::Dynamic),
            None,
        ),
        ("lz4", Algorithm::Lz4, None),
        ("zstd 1", Algorithm::Zstd, Some(1)),
    ];
    for (name, algorithm, level) in codecs {
        let codec = algorithm.codec(level).expect("codec");
        let row = measure_codec(name, &*codec, &pages);
        println!(
            "{:<28} {:>7.2} {:>14.0} {:>16.0} {:>15}",
            row.name, row.ratio, row.compress_mib_s, row.decompress_mib_s, row.incompressible
        );
    }
}
