// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A corpus of real memory: the anonymous pages of running processes, captured page by page
//! into a file (`--capture-corpus`), and written by the workload instead of the synthetic mix
//! (`--corpus`).
//!
//! The synthetic mix makes every page independently, so it cannot show what compressing
//! neighbouring pages together gains; real memory can. What is captured is what the kernel
//! would swap: the pages of a process's *private* mappings that are resident and anonymous
//! (`/proc/PID/pagemap`: present, not file-backed or shared), read through `/proc/PID/mem`,
//! in address order, mapping by mapping, so neighbours in the corpus were neighbours in the
//! process. Pages the kernel has not populated are not captured (a read of them would return
//! the zero page the guest would never swap).
//!
//! The file: one 4 KiB header page, then the pages. The header is text, NUL-padded:
//!
//! ```text
//! vhost-user-zram corpus 1
//! pages N
//! source pid=PID comm=COMM pages=K
//! ...
//! ```
//!
//! Capturing needs the right to read the processes' memory (`ptrace` access: root, or the
//! same user with `kernel.yama.ptrace_scope` 0) and, for `pagemap`'s frame bits, nothing more:
//! only the flag bits are used.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use vhost_user_zram::PAGE_SIZE;

/// The header's first line.
const MAGIC: &str = "vhost-user-zram corpus 1\n";
/// `pagemap`: the page is present in RAM.
const PM_PRESENT: u64 = 1 << 63;
/// `pagemap`: the page is swapped out.
const PM_SWAPPED: u64 = 1 << 62;
/// `pagemap`: the page is file-backed or shared anonymous memory.
const PM_FILE_OR_SHARED: u64 = 1 << 61;
/// Pages read from `/proc/PID/mem` in one call, at most.
const RUN_PAGES: usize = 256;

/// What one process gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Its pid.
    pub pid: u32,
    /// Its command name (`/proc/PID/comm`).
    pub comm: String,
    /// Pages captured from it.
    pub pages: u64,
}

/// A captured corpus, in memory.
#[derive(Debug)]
pub struct Corpus {
    /// The pages, in capture order.
    pub pages: Vec<[u8; PAGE_SIZE]>,
    /// Where they came from.
    pub sources: Vec<Source>,
}

/// One mapping of `/proc/PID/maps` worth capturing.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mapping {
    start: u64,
    end: u64,
}

/// The private, readable mappings of a `maps` text, except the kernel's special ones
/// (`[vsyscall]`, `[vvar]`, `[vdso]`), whose pages are not the process's data.
fn private_mappings(maps: &str) -> Vec<Mapping> {
    maps.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let range = fields.next()?;
            let perms = fields.next()?;
            let name = fields.nth(3).unwrap_or("");
            let (start, end) = range.split_once('-')?;
            let start = u64::from_str_radix(start, 16).ok()?;
            let end = u64::from_str_radix(end, 16).ok()?;
            let special = matches!(name, "[vsyscall]" | "[vvar]" | "[vvar_vclock]" | "[vdso]");
            (perms.starts_with('r') && perms.ends_with('p') && !special && end > start)
                .then_some(Mapping { start, end })
        })
        .collect()
}

/// Whether a `pagemap` entry names a page the kernel would swap: anonymous and in RAM (or
/// already swapped, which reading brings back).
fn swappable(entry: u64) -> bool {
    entry & (PM_PRESENT | PM_SWAPPED) != 0 && entry & PM_FILE_OR_SHARED == 0
}

/// Captures the swappable pages of `pid`, at most `limit`, passing each to `out`. Returns
/// the source record.
fn capture_process(
    pid: u32,
    limit: u64,
    out: &mut dyn FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<Source> {
    let proc = Path::new("/proc").join(pid.to_string());
    let context = |what: &str, e: io::Error| {
        io::Error::new(e.kind(), format!("{what} of process {pid}: {e}"))
    };
    let comm = std::fs::read_to_string(proc.join("comm"))
        .map_err(|e| context("/proc/PID/comm", e))?
        .trim()
        .to_string();
    let maps = std::fs::read_to_string(proc.join("maps")).map_err(|e| context("maps", e))?;
    let pagemap = File::open(proc.join("pagemap")).map_err(|e| context("pagemap", e))?;
    let mem = File::open(proc.join("mem")).map_err(|e| context("mem", e))?;
    let mut source = Source {
        pid,
        comm,
        pages: 0,
    };
    let page = PAGE_SIZE as u64;
    let mut entries = vec![0u8; RUN_PAGES * 8];
    let mut data = vec![0u8; RUN_PAGES * PAGE_SIZE];
    for mapping in private_mappings(&maps) {
        let mut address = mapping.start;
        while address < mapping.end && source.pages < limit {
            let count = usize::try_from(((mapping.end - address) / page).min(RUN_PAGES as u64))
                .unwrap_or(RUN_PAGES);
            let bytes = &mut entries[..count * 8];
            // A mapping can vanish under a running process: skip what cannot be read.
            if pagemap.read_exact_at(bytes, address / page * 8).is_err() {
                break;
            }
            let wanted: Vec<bool> = bytes
                .chunks_exact(8)
                .map(|e| swappable(u64::from_le_bytes(e.try_into().expect("8 bytes"))))
                .collect();
            // Read each run of wanted pages with one call.
            let mut i = 0;
            while i < count && source.pages < limit {
                if !wanted[i] {
                    i += 1;
                    continue;
                }
                let run = wanted[i..].iter().take_while(|&&w| w).count();
                let run = run.min(usize::try_from(limit - source.pages).unwrap_or(run));
                let buffer = &mut data[..run * PAGE_SIZE];
                if mem.read_exact_at(buffer, address + i as u64 * page).is_ok() {
                    for chunk in buffer.chunks_exact(PAGE_SIZE) {
                        out(chunk)?;
                    }
                    source.pages += run as u64;
                }
                i += run;
            }
            address += count as u64 * page;
        }
    }
    Ok(source)
}

/// The header page for `sources`.
fn header(sources: &[Source]) -> io::Result<[u8; PAGE_SIZE]> {
    let mut text = String::from(MAGIC);
    let total: u64 = sources.iter().map(|s| s.pages).sum();
    let _ = writeln!(text, "pages {total}");
    for s in sources {
        let comm: String = s
            .comm
            .chars()
            .map(|c| if c.is_whitespace() { '_' } else { c })
            .collect();
        let _ = writeln!(text, "source pid={} comm={comm} pages={}", s.pid, s.pages);
    }
    let mut page = [0u8; PAGE_SIZE];
    if text.len() > PAGE_SIZE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many sources for the corpus header (it is one page)",
        ));
    }
    page[..text.len()].copy_from_slice(text.as_bytes());
    Ok(page)
}

/// Captures the swappable memory of `pids`, in order, at most `max_pages` in all, into the
/// file `path`. A process that cannot be read is an error naming it.
pub fn capture(path: &Path, pids: &[u32], max_pages: u64) -> io::Result<Vec<Source>> {
    let file = File::create(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let mut writer = BufWriter::with_capacity(1 << 20, &file);
    writer.write_all(&[0u8; PAGE_SIZE])?;
    let mut sources = Vec::new();
    let mut total = 0u64;
    for &pid in pids {
        let source = capture_process(pid, max_pages - total, &mut |page| writer.write_all(page))?;
        total += source.pages;
        sources.push(source);
        if total >= max_pages {
            break;
        }
    }
    writer.flush()?;
    drop(writer);
    file.write_all_at(&header(&sources)?, 0)?;
    file.sync_all()?;
    Ok(sources)
}

/// Why a corpus file was refused.
fn invalid(path: &Path, why: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{} is not a corpus: {why}", path.display()),
    )
}

impl Corpus {
    /// Reads the corpus file at `path`, checking its header against its length.
    pub fn load(path: &Path) -> io::Result<Corpus> {
        let mut file = File::open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let mut head = [0u8; PAGE_SIZE];
        file.read_exact(&mut head)
            .map_err(|_| invalid(path, "shorter than its header"))?;
        let end = head.iter().position(|&b| b == 0).unwrap_or(PAGE_SIZE);
        let text = std::str::from_utf8(&head[..end]).map_err(|_| invalid(path, "header"))?;
        let rest = text
            .strip_prefix(MAGIC)
            .ok_or_else(|| invalid(path, "no 'vhost-user-zram corpus 1' header"))?;
        let mut lines = rest.lines();
        let pages: u64 = lines
            .next()
            .and_then(|l| l.strip_prefix("pages "))
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| invalid(path, "no 'pages N' line"))?;
        let sources = lines.filter_map(parse_source).collect();
        let length = file.metadata()?.len();
        if length != (pages + 1) * PAGE_SIZE as u64 {
            return Err(invalid(
                path,
                format!("its header says {pages} pages but it is {length} bytes long"),
            ));
        }
        if pages == 0 {
            return Err(invalid(path, "it holds no page"));
        }
        let mut all =
            vec![[0u8; PAGE_SIZE]; usize::try_from(pages).map_err(|_| invalid(path, "too large"))?];
        for page in &mut all {
            file.read_exact(page)?;
        }
        Ok(Corpus {
            pages: all,
            sources,
        })
    }

    /// One line for reports: pages, and where they came from.
    pub fn describe(&self) -> String {
        let sources: Vec<String> = self
            .sources
            .iter()
            .map(|s| format!("{} ({}, {} pages)", s.comm, s.pid, s.pages))
            .collect();
        format!("{} pages from {}", self.pages.len(), sources.join(", "))
    }
}

fn parse_source(line: &str) -> Option<Source> {
    let mut source = Source {
        pid: 0,
        comm: String::new(),
        pages: 0,
    };
    for field in line.strip_prefix("source ")?.split_whitespace() {
        match field.split_once('=')? {
            ("pid", v) => source.pid = v.parse().ok()?,
            ("comm", v) => source.comm = v.to_string(),
            ("pages", v) => source.pages = v.parse().ok()?,
            _ => return None,
        }
    }
    Some(source)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_readable_mappings_are_kept_and_special_ones_dropped() {
        let maps = "\
55d0c0000000-55d0c0021000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000004000 rw-s 00000000 00:05 1234                       /dev/shm/x
7f0000010000-7f0000012000 r--p 00000000 08:01 42                         /usr/lib/libc.so.6
7f0000020000-7f0000021000 ---p 00000000 00:00 0
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
7ffd00100000-7ffd00102000 r--p 00000000 00:00 0                          [vvar]
7ffd00102000-7ffd00104000 r-xp 00000000 00:00 0                          [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
";
        let kept = private_mappings(maps);
        assert_eq!(
            kept.iter().map(|m| m.start).collect::<Vec<_>>(),
            vec![0x55d0_c000_0000, 0x7f00_0001_0000, 0x7ffd_0000_0000]
        );
    }

    #[test]
    fn only_anonymous_present_or_swapped_pages_are_swappable() {
        assert!(swappable(PM_PRESENT | 0x1234));
        assert!(swappable(PM_SWAPPED));
        assert!(!swappable(PM_PRESENT | PM_FILE_OR_SHARED));
        assert!(!swappable(0));
    }

    #[test]
    fn our_own_memory_is_captured_and_loads_back_page_for_page() {
        // Page-aligned pages of this process, resident and anonymous, with a pattern to find.
        #[repr(align(4096))]
        struct Aligned([u8; PAGE_SIZE]);
        let marker: Vec<Aligned> = (0..16u8)
            .map(|i| {
                let mut page = [0u8; PAGE_SIZE];
                page[..16].copy_from_slice(b"corpus-marker-pg");
                page[16] = i;
                page[100..].fill(i.wrapping_mul(37) | 1);
                Aligned(page)
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("corpus");
        let sources = capture(&path, &[std::process::id()], u64::MAX).unwrap();
        assert_eq!(sources.len(), 1);
        assert!(sources[0].pages > 16, "{sources:?}");
        let corpus = Corpus::load(&path).unwrap();
        assert_eq!(corpus.pages.len() as u64, sources[0].pages);
        assert_eq!(corpus.sources, sources);
        // The marker pages are there, consecutive and in order.
        let first = corpus
            .pages
            .iter()
            .position(|p| p[..16] == *b"corpus-marker-pg" && p[16] == 0 && p[100] == 1)
            .expect("the marker's first page is in the corpus");
        for (i, page) in marker.iter().enumerate() {
            assert!(corpus.pages[first + i] == page.0, "marker page {i}");
        }
        std::hint::black_box(&marker);
    }

    #[test]
    fn a_corpus_whose_length_disagrees_with_its_header_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("corpus");
        let sources = capture(&path, &[std::process::id()], 8).unwrap();
        assert_eq!(sources[0].pages, 8);
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(5 * PAGE_SIZE as u64).unwrap();
        let error = Corpus::load(&path).unwrap_err().to_string();
        assert!(error.contains("header says 8 pages"), "{error}");
        std::fs::write(&path, b"not a corpus").unwrap();
        let error = Corpus::load(&path).unwrap_err().to_string();
        assert!(error.contains("is not a corpus"), "{error}");
    }
}
