// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Tests on a real IAA device. Each one looks for a usable work queue first; without one it
//! prints `SKIPPED: ...` with the discovery report on stderr and passes, unless
//! `IAA_REQUIRE_HARDWARE=1` is set, in which case it fails (so an IAA machine whose WQ is
//! misconfigured cannot pass by skipping). See iaa/README.md for running them.

use std::fs::OpenOptions;

use iaa::aecs::CompressAecs;
use iaa::discover::{self, WorkQueue};
use iaa::portal::{MappedPortal, Portal, WritePortal};
use iaa::{CompressResult, Engine, EngineConfig, HuffmanMode, PAGE_SIZE};

type Page = [u8; PAGE_SIZE];

fn usable_queue() -> Option<WorkQueue> {
    let found = discover::discover();
    match found.usable.first() {
        Some(queue) => Some(queue.clone()),
        None => {
            assert!(
                std::env::var("IAA_REQUIRE_HARDWARE").as_deref() != Ok("1"),
                "IAA_REQUIRE_HARDWARE=1 but {found}"
            );
            eprintln!("SKIPPED: {found}");
            None
        }
    }
}

fn pages() -> Vec<Box<Page>> {
    (0..8u64)
        .map(|i| {
            let mut page = Box::new([0u8; PAGE_SIZE]);
            let text = format!("page {i}: the quick brown fox jumps over the lazy dog; ");
            for (at, byte) in page.iter_mut().enumerate() {
                *byte = if i % 4 == 3 {
                    // Incompressible-ish: a multiplicative hash of the offset.
                    ((at as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)).to_be_bytes()[0]
                } else {
                    text.as_bytes()[at % text.len()] ^ (at / 512).to_le_bytes()[0]
                };
            }
            page
        })
        .collect()
}

fn compress(engine: &Engine, pages: &[Box<Page>]) -> (Vec<Vec<u8>>, Vec<CompressResult>) {
    let mut dsts: Vec<Vec<u8>> = pages.iter().map(|_| vec![0u8; 2 * PAGE_SIZE]).collect();
    let mut results = vec![Ok(0); pages.len()];
    let refs: Vec<&Page> = pages.iter().map(|p| &**p).collect();
    let mut dst_refs: Vec<&mut [u8]> = dsts.iter_mut().map(|d| &mut d[..]).collect();
    engine.compress_batch(&refs, &mut dst_refs, &mut results);
    (dsts, results)
}

/// What the device compressed decodes with an independent software inflater.
fn device_output_decodes_in_software(engine: &Engine) {
    let pages = pages();
    let (dsts, results) = compress(engine, &pages);
    let stats = engine.stats();
    assert!(!stats.broken, "{}: {stats:?}", engine.describe());
    assert_eq!(
        stats.device_compressed + stats.device_incompressible,
        8,
        "every page done by the device: {stats:?}"
    );
    for (i, result) in results.iter().enumerate() {
        let n = result.unwrap();
        let decoded = miniz_oxide::inflate::decompress_to_vec(&dsts[i][..n]).unwrap();
        assert!(decoded[..] == pages[i][..], "page {i}");
    }
}

#[test]
fn the_device_compresses_a_batch_that_software_decodes() {
    let Some(queue) = usable_queue() else { return };
    let portal = discover::open(&queue).expect("open the work queue");
    let engine = Engine::new(portal, EngineConfig::default());
    device_output_decodes_in_software(&engine);
}

#[test]
fn both_submission_paths_work() {
    let Some(queue) = usable_queue() else { return };
    let open = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&queue.node)
            .unwrap()
    };
    let name = queue.node.display().to_string();
    let write: Box<dyn Portal> = Box::new(WritePortal::new(open(), name.clone(), queue.size));
    device_output_decodes_in_software(&Engine::new(write, EngineConfig::default()));
    match MappedPortal::map(
        open(),
        name,
        queue.mode == discover::WqMode::Dedicated,
        queue.size,
    ) {
        Ok(mapped) => device_output_decodes_in_software(&Engine::new(
            Box::new(mapped),
            EngineConfig::default(),
        )),
        Err((_, why)) => eprintln!("SKIPPED the mapped portal: {why} (needs CAP_SYS_RAWIO)"),
    }
}

#[test]
fn the_device_decodes_what_software_compressed() {
    let Some(queue) = usable_queue() else { return };
    let portal = discover::open(&queue).expect("open the work queue");
    let engine = Engine::new(portal, EngineConfig::default());
    let aecs = CompressAecs::fixed();
    let mut count = 0;
    for page in pages() {
        let mut fixed = vec![0u8; 2 * PAGE_SIZE];
        let n = iaa::deflate::compress_with_aecs(&aecs, &page[..], &mut fixed).unwrap();
        let mut dynamic = vec![0u8; 2 * PAGE_SIZE];
        let m = iaa::deflate::compress_dynamic(&page[..], &mut dynamic).unwrap();
        let other = miniz_oxide::deflate::compress_to_vec(&page[..], 6);
        for stream in [&fixed[..n], &dynamic[..m], &other[..]] {
            let mut out = [0u8; PAGE_SIZE];
            engine.decompress(stream, &mut out).unwrap();
            assert!(out[..] == page[..]);
            count += 1;
        }
    }
    let stats = engine.stats();
    assert_eq!(
        stats.device_decompressed, count,
        "no software fallback: {stats:?}"
    );
}

#[test]
fn dynamic_mode_on_a_generation_2_device() {
    let Some(queue) = usable_queue() else { return };
    let portal = discover::open(&queue).expect("open the work queue");
    let config = EngineConfig {
        mode: HuffmanMode::Dynamic,
        ..EngineConfig::default()
    };
    let engine = Engine::new(portal, config);
    let pages = pages();
    let (dsts, results) = compress(&engine, &pages);
    for (i, result) in results.iter().enumerate() {
        let decoded = miniz_oxide::inflate::decompress_to_vec(&dsts[i][..result.unwrap()]).unwrap();
        assert!(decoded[..] == pages[i][..], "page {i}");
    }
    let stats = engine.stats();
    if stats.broken && stats.device_compressed == 0 {
        eprintln!("SKIPPED: the device refused dynamic Huffman (IAA generation 1?): {stats:?}");
        return;
    }
    assert_eq!(
        stats.device_compressed + stats.device_incompressible,
        8,
        "{stats:?}"
    );
}
