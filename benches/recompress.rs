// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The recompression benchmark (`cargo bench --bench recompress`), one run:
//!
//! 1. fill a store with the swap-like mix (`pagegen`; 1 GiB = 262144 pages by default, set
//!    `RECOMPRESS_BENCH_PAGES` to change it) written with lz4, on one thread;
//! 2. read every page back (lz4 read throughput, verified);
//! 3. mark all idle and recompress them (`type=idle`) with a secondary zstd, optionally after
//!    training a dictionary on the stored pages (`ctl train-dict`);
//! 4. read every page back again (throughput of recompressed pages, verified) and rewrite a
//!    tenth of them (hot writes still go to lz4).
//!
//! It prints `mem_used_total` before and after, pages/s recompressed, and the read and write
//! throughputs; and, when the kernel offers zram (`/sys/class/zram-control`), the same data
//! written to a kernel zram lz4 device made with `hot_add` (and removed with `hot_remove`).
//! Target: after recompression `mem_used_total` ≤ 0.80 × kernel zram lz4's.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vhost_user_zram::codec::Algorithm;
use vhost_user_zram::pagegen::fill_page;
use vhost_user_zram::store::{
    MmStat, PageStore, RecompressMode, RecompressRequest, StoreConfig, TrainRequest,
};
use vhost_user_zram::PAGE_SIZE;

const DEFAULT_PAGES: usize = 262_144;
const SEED: u64 = 0x5704e;

fn pages_per_s(pages: usize, elapsed: Duration) -> f64 {
    pages as f64 / elapsed.as_secs_f64()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// Reads every page, checks it and returns pages/s.
fn read_all(store: &PageStore, pages: &[[u8; PAGE_SIZE]]) -> f64 {
    let mut out = [0u8; PAGE_SIZE];
    let started = Instant::now();
    for index in 0..pages.len() {
        store.read(index as u64, &mut out).expect("read");
        std::hint::black_box(&out);
    }
    let elapsed = started.elapsed();
    for (index, page) in pages.iter().enumerate() {
        store.read(index as u64, &mut out).expect("read");
        assert!(out == *page, "page {index} read back wrong");
    }
    pages_per_s(pages.len(), elapsed)
}

/// Rewrites every tenth page with its own content and returns pages/s.
fn rewrite_tenth(store: &PageStore, pages: &[[u8; PAGE_SIZE]]) -> f64 {
    let started = Instant::now();
    let mut n = 0;
    for (index, page) in pages.iter().enumerate().step_by(10) {
        store.write(index as u64, page).expect("write");
        n += 1;
    }
    pages_per_s(n, started.elapsed())
}

struct Run {
    label: String,
    before: MmStat,
    after: MmStat,
    write: f64,
    read_lz4: f64,
    read_after: f64,
    rewrite_before: f64,
    rewrite_after: f64,
    recompress_pages_per_s: f64,
    recompressed: u64,
    tried: u64,
    train: Option<(Duration, u32, usize)>,
    zstd_pages: u64,
    mark: (u64, Duration),
}

fn run(label: &str, secondary: &str, dictionary: bool, pages: &[[u8; PAGE_SIZE]]) -> Run {
    let store = PageStore::new(StoreConfig {
        capacity_pages: pages.len() as u64,
        algorithm: Algorithm::Lz4,
        level: None,
        mem_limit: None,
    })
    .expect("store")
    .with_secondary_algorithms(&[secondary.parse().expect("algorithm")])
    .expect("secondary");
    let started = Instant::now();
    for (index, page) in pages.iter().enumerate() {
        store.write(index as u64, page).expect("write");
    }
    let write = pages_per_s(pages.len(), started.elapsed());
    let before = store.stats().mm;
    let read_lz4 = read_all(&store, pages);
    let rewrite_before = rewrite_tenth(&store, pages);

    let train = dictionary.then(|| {
        let started = Instant::now();
        let trained = store
            .train_zstd_dictionary(&TrainRequest::default())
            .expect("train");
        (started.elapsed(), trained.id, trained.bytes)
    });
    let started = Instant::now();
    let marked = store.mark_idle();
    let mark_time = started.elapsed();
    let started = Instant::now();
    let outcome = store
        .recompress(&RecompressRequest {
            mode: RecompressMode::Idle,
            ..RecompressRequest::default()
        })
        .expect("recompress");
    let recompress_time = started.elapsed();
    let after = store.stats().mm;
    let zstd_pages = store.stats().recompression.algorithms[1].pages;
    let read_after = read_all(&store, pages);
    let rewrite_after = rewrite_tenth(&store, pages);
    store.check_consistency().expect("consistent");
    Run {
        label: label.to_owned(),
        before,
        after,
        write,
        read_lz4,
        read_after,
        rewrite_before,
        rewrite_after,
        recompress_pages_per_s: outcome.tried as f64 / recompress_time.as_secs_f64(),
        recompressed: outcome.recompressed,
        tried: outcome.tried,
        train,
        zstd_pages,
        mark: (marked, mark_time),
    }
}

/// A kernel zram device made with `hot_add`; removed with `hot_remove` when dropped.
struct KernelZram {
    id: u32,
}

const ZRAM_CONTROL: &str = "/sys/class/zram-control";

impl KernelZram {
    fn create(disksize: u64) -> Result<KernelZram, String> {
        let text = fs::read_to_string(Path::new(ZRAM_CONTROL).join("hot_add"))
            .map_err(|e| format!("hot_add: {e}"))?;
        let id: u32 = text.trim().parse().map_err(|e| format!("hot_add: {e}"))?;
        if id == 0 {
            return Err("hot_add returned zram0; refusing to touch it".into());
        }
        let device = KernelZram { id };
        device.write("comp_algorithm", "lz4")?;
        device.write("disksize", &disksize.to_string())?;
        Ok(device)
    }

    fn sysfs(&self, attribute: &str) -> PathBuf {
        PathBuf::from(format!("/sys/block/zram{}/{attribute}", self.id))
    }

    fn write(&self, attribute: &str, value: &str) -> Result<(), String> {
        fs::OpenOptions::new()
            .write(true)
            .open(self.sysfs(attribute))
            .and_then(|mut f| f.write_all(value.as_bytes()))
            .map_err(|e| format!("write {value} to {attribute}: {e}"))
    }

    fn mm_stat(&self) -> Result<MmStat, String> {
        fs::read_to_string(self.sysfs("mm_stat"))
            .map_err(|e| format!("mm_stat: {e}"))?
            .parse()
            .map_err(|e: vhost_user_zram::store::stats::BadMmStatLine| e.to_string())
    }
}

impl Drop for KernelZram {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let result = fs::OpenOptions::new()
                .write(true)
                .open(Path::new(ZRAM_CONTROL).join("hot_remove"))
                .and_then(|mut f| f.write_all(self.id.to_string().as_bytes()));
            match result {
                Ok(()) => return,
                Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    eprintln!("warning: could not hot_remove zram{}: {e}", self.id);
                    return;
                }
            }
        }
    }
}

/// Writes `pages` to a kernel zram lz4 device and returns its `mm_stat`.
fn kernel_zram_lz4(pages: &[[u8; PAGE_SIZE]]) -> Result<MmStat, String> {
    if !Path::new(ZRAM_CONTROL).join("hot_add").exists() {
        return Err("this kernel has no zram-control".into());
    }
    let device = KernelZram::create((pages.len() * PAGE_SIZE) as u64)?;
    {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .open(format!("/dev/zram{}", device.id))
            .map_err(|e| format!("open /dev/zram{}: {e}", device.id))?;
        for chunk in pages.chunks(256) {
            file.write_all(chunk.as_flattened())
                .map_err(|e| format!("write: {e}"))?;
        }
        file.sync_all().map_err(|e| format!("fsync: {e}"))?;
    }
    device.mm_stat()
}

fn main() {
    let count = std::env::var("RECOMPRESS_BENCH_PAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_PAGES);
    let mut pages = vec![[0u8; PAGE_SIZE]; count];
    for (index, page) in pages.iter_mut().enumerate() {
        fill_page(SEED, index as u64, page);
    }
    println!(
        "recompression benchmark: {count} pages ({} MiB) of the swap-like mix, one thread",
        (count * PAGE_SIZE) >> 20
    );

    let kernel = kernel_zram_lz4(&pages);
    match &kernel {
        Ok(mm) => println!(
            "kernel zram lz4: mem_used_total {:.1} MiB, compr_data_size {:.1} MiB, same_pages {}, \
             huge_pages {}",
            mib(mm.mem_used_total),
            mib(mm.compr_data_size),
            mm.same_pages,
            mm.huge_pages
        ),
        Err(e) => println!("kernel zram lz4: not measured ({e})"),
    }

    let runs = [
        run("lz4 -> zstd:level=1", "zstd:level=1", false, &pages),
        run("lz4 -> zstd:level=3", "zstd:level=3", false, &pages),
        run("lz4 -> zstd:level=1 + dict", "zstd:level=1", true, &pages),
        run("lz4 -> zstd:level=3 + dict", "zstd:level=3", true, &pages),
    ];
    for r in &runs {
        println!("\n{}", r.label);
        println!("  write (lz4)           {:>10.0} pages/s", r.write);
        println!(
            "  mem_used_total        {:>10.1} MiB before, {:.1} MiB after ({:.3}x)",
            mib(r.before.mem_used_total),
            mib(r.after.mem_used_total),
            r.after.mem_used_total as f64 / r.before.mem_used_total as f64
        );
        println!(
            "  compr_data_size       {:>10.1} MiB before, {:.1} MiB after",
            mib(r.before.compr_data_size),
            mib(r.after.compr_data_size)
        );
        if let Ok(kernel) = &kernel {
            println!(
                "  vs kernel zram lz4    {:>10.3}x before, {:.3}x after",
                r.before.mem_used_total as f64 / kernel.mem_used_total as f64,
                r.after.mem_used_total as f64 / kernel.mem_used_total as f64
            );
        }
        if let Some((time, id, bytes)) = r.train {
            println!(
                "  train-dict            {:>10.2} s (dictionary {id}, {bytes} bytes)",
                time.as_secs_f64()
            );
        }
        println!(
            "  idle all              {:>10.1} ms ({} pages marked)",
            r.mark.1.as_secs_f64() * 1000.0,
            r.mark.0
        );
        println!(
            "  recompress            {:>10.0} pages/s tried ({} tried, {} recompressed, {} now zstd)",
            r.recompress_pages_per_s, r.tried, r.recompressed, r.zstd_pages
        );
        println!(
            "  read                  {:>10.0} pages/s lz4, {:.0} pages/s after recompression",
            r.read_lz4, r.read_after
        );
        println!(
            "  rewrite a tenth (lz4) {:>10.0} pages/s before, {:.0} pages/s after",
            r.rewrite_before, r.rewrite_after
        );
    }
}
