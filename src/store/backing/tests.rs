// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Tests of the backing file: the allocator against a model, faults, real files and mounts.

#![allow(clippy::cast_possible_truncation)]

use super::*;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// An object whose record fills one block exactly.
const WHOLE: usize = BLOCK_SIZE - RECORD_HEADER;

/// The objects written and not released: offset -> contents.
#[derive(Default)]
struct Model(BTreeMap<u64, Vec<u8>>);

/// The page an object of these tests belongs to: a function of its first bytes, so the
/// model need not keep it.
fn page_of(object: &[u8]) -> u64 {
    object
        .iter()
        .take(3)
        .fold(0, |page, &b| page << 8 | u64::from(b))
}

/// The (page, bytes) pairs [`BackingFile::write_batch`] takes.
fn with_pages(objects: &[Vec<u8>]) -> Vec<(u64, &[u8])> {
    objects.iter().map(|o| (page_of(o), o.as_slice())).collect()
}

impl Model {
    fn write(&mut self, file: &BackingFile, objects: &[Vec<u8>]) -> Result<Vec<u64>, BackingError> {
        let refs = with_pages(objects);
        let offsets = file.write_batch(&refs)?;
        for (&offset, object) in offsets.iter().zip(objects) {
            assert!(self.0.insert(offset, object.clone()).is_none());
        }
        Ok(offsets)
    }

    fn release(&mut self, file: &BackingFile, offset: u64) {
        let object = self.0.remove(&offset).expect("a live object");
        file.release(offset, object.len()).unwrap();
    }

    /// The offset of the `i`th live object (modulo their number).
    fn nth(&self, i: usize) -> Option<u64> {
        (!self.0.is_empty()).then(|| *self.0.keys().nth(i % self.0.len()).unwrap())
    }

    fn consistent(&self, file: &BackingFile) {
        file.check_consistency(&mut self.0.iter().map(|(&o, v)| (o, v.len())))
            .unwrap();
    }

    /// Checks the allocator and reads every object back.
    fn check(&self, file: &BackingFile) {
        self.consistent(file);
        let mut out = [0u8; BLOCK_SIZE];
        for (&offset, object) in &self.0 {
            file.read(offset, object.len(), page_of(object), &mut out)
                .unwrap();
            assert!(out[..object.len()] == object[..], "object at {offset}");
        }
    }

    fn live_bytes(&self) -> u64 {
        self.0.values().map(|v| v.len() as u64).sum()
    }
}

/// A deterministic generator (xorshift64*) for the long, non-shrinking tests.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// An object of `len` bytes with no zero byte, so punched-out data cannot pass.
    fn object(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| (self.next() as u8) | 1).collect()
    }

    /// The size of a written-back page: one in eight raw, the rest compressed.
    fn page_size(&mut self) -> usize {
        if self.below(8) == 0 {
            BLOCK_SIZE
        } else {
            1 + self.below(3632) as usize
        }
    }

    fn batch(&mut self, max: u64) -> Vec<Vec<u8>> {
        let n = 1 + self.below(max);
        (0..n)
            .map(|_| {
                let len = self.page_size();
                self.object(len)
            })
            .collect()
    }
}

/// A file in memory, with its fault switches and its memory.
fn memory_file(capacity: Option<u64>) -> (BackingFile, Arc<FaultyIo>, Arc<MemIo>) {
    let mem = Arc::new(MemIo::new());
    let faults = Arc::new(FaultyIo::new(Box::new(mem.clone())));
    (
        BackingFile::with_io(Box::new(faults.clone()), capacity),
        faults,
        mem,
    )
}

/// `batches` random batches, releasing about one object in three as it goes.
fn random_run(file: &BackingFile, rng: &mut Rng, model: &mut Model, batches: usize) {
    for i in 0..batches {
        let batch = rng.batch(16);
        model.write(file, &batch).unwrap();
        for _ in 0..rng.below(batch.len() as u64 + 1) {
            if let Some(offset) = model.nth(rng.next() as usize) {
                model.release(file, offset);
            }
        }
        if i % 50 == 0 {
            model.consistent(file);
        }
    }
    model.check(file);
}

/// Whether files in `dir` can be opened with O_DIRECT.
fn o_direct_works(dir: &Path) -> bool {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_DIRECT)
        .open(dir.join("probe"))
        .is_ok()
}

/// A filesystem mounted for a test, unmounted on drop (also when the test panics).
pub(in crate::store) struct Mount(PathBuf);

impl Mount {
    pub(in crate::store) fn new(fstype: &str, options: &str, dir: &Path) -> Result<Mount, String> {
        let output = Command::new("mount")
            .args(["-t", fstype, "-o", options, fstype])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "mount -t {fstype} is not permitted here: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(Mount(dir.to_owned()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A loop device over a file, detached on drop (also when the test panics).
struct LoopDevice(PathBuf);

impl LoopDevice {
    fn new(image: &Path) -> Result<LoopDevice, String> {
        let output = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(image)
            .output()
            .map_err(|e| format!("cannot run losetup: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "losetup is not permitted here: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        let device = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        Ok(LoopDevice(PathBuf::from(device)))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// Objects as (length, seed of their contents).
    Batch(Vec<(usize, u8)>),
    Release(usize),
    Read(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let len = prop_oneof![1usize..=3632, Just(BLOCK_SIZE), 1usize..=64];
    prop_oneof![
        3 => prop::collection::vec((len, any::<u8>()), 1..12).prop_map(Op::Batch),
        2 => any::<usize>().prop_map(Op::Release),
        1 => any::<usize>().prop_map(Op::Read),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn batches_and_releases_match_the_model(ops in prop::collection::vec(op(), 1..80)) {
        let (file, _, mem) = memory_file(None);
        let mut model = Model::default();
        let mut out = [0u8; BLOCK_SIZE];
        for op in ops {
            match op {
                Op::Batch(spec) => {
                    let objects: Vec<Vec<u8>> = spec
                        .iter()
                        .map(|&(len, seed)| {
                            (0..len).map(|i| seed.wrapping_add((i as u8).wrapping_mul(7)) | 1).collect()
                        })
                        .collect();
                    model.write(&file, &objects).unwrap();
                }
                Op::Release(i) => {
                    if let Some(offset) = model.nth(i) {
                        model.release(&file, offset);
                    }
                }
                Op::Read(i) => {
                    if let Some(offset) = model.nth(i) {
                        let object = &model.0[&offset];
                        file.read(offset, object.len(), page_of(object), &mut out).unwrap();
                        prop_assert!(out[..object.len()] == object[..]);
                    }
                }
            }
            model.consistent(&file);
            let stats = file.stats();
            // Every unused block was punched; every used one was written.
            prop_assert_eq!(mem.allocated_blocks(), stats.blocks_used);
            prop_assert_eq!(stats.live_bytes, model.live_bytes());
        }
        model.check(&file);
    }
}

#[test]
fn real_files_round_trip_with_direct_and_buffered_io() {
    let tmp = tempfile::tempdir().unwrap();
    let shm = tempfile::tempdir_in("/dev/shm").ok();
    let mut cases = vec![(tmp.path(), true), (tmp.path(), false)];
    if let Some(shm) = &shm {
        cases.push((shm.path(), true));
    }
    for (i, (dir, try_direct)) in cases.into_iter().enumerate() {
        let path = dir.join(format!("backing{i}"));
        let file = BackingFile::open_with(&path, ForeignData::Refuse, try_direct, |io| io).unwrap();
        assert_eq!(
            file.is_direct(),
            try_direct && o_direct_works(dir),
            "{path:?}"
        );
        let mut model = Model::default();
        random_run(&file, &mut Rng(0x9e37_79b9 + i as u64), &mut model, 300);
        let stats = file.stats();
        assert_eq!(stats.failed_writes + stats.failed_reads, 0);
        assert!(stats.punched_blocks > 0, "{stats:?}");
        assert_eq!(stats.punch_unsupported, 0);
    }
}

#[test]
fn freed_extents_are_reused_first_fit() {
    let (file, _, _) = memory_file(None);
    let mut rng = Rng(7);
    let mut model = Model::default();
    let pages =
        |rng: &mut Rng, n: usize| -> Vec<Vec<u8>> { (0..n).map(|_| rng.object(WHOLE)).collect() };
    let a = model.write(&file, &pages(&mut rng, 8)).unwrap();
    let b = model.write(&file, &pages(&mut rng, 8)).unwrap();
    assert_eq!(b[0], 8 * BLOCK, "whole pages leave no open block");
    for &offset in &a {
        model.release(&file, offset);
    }
    assert_eq!(file.stats().blocks_free, 8);
    let c = model.write(&file, &pages(&mut rng, 3)).unwrap();
    assert_eq!(c[0], 0, "the first free extent is reused");
    // [3, 8) is free but too short for 6 blocks: append.
    let d = model.write(&file, &pages(&mut rng, 6)).unwrap();
    assert_eq!(d[0], 16 * BLOCK);
    for &offset in &b {
        model.release(&file, offset);
    }
    let stats = file.stats();
    assert_eq!((stats.blocks_free, stats.file_blocks), (13, 22));
    model.consistent(&file);
    // The coalesced extent [3, 16) takes a batch of 13 blocks.
    let e = model.write(&file, &pages(&mut rng, 13)).unwrap();
    assert_eq!(e[0], 3 * BLOCK);
    assert_eq!(file.stats().file_blocks, 22);
    model.check(&file);
}

#[test]
fn an_open_block_boxed_in_by_used_blocks_is_left_behind() {
    let (file, _, _) = memory_file(None);
    let mut rng = Rng(61);
    let mut model = Model::default();
    let pages =
        |rng: &mut Rng, n: usize| -> Vec<Vec<u8>> { (0..n).map(|_| rng.object(WHOLE)).collect() };
    let a = model.write(&file, &pages(&mut rng, 8)).unwrap();
    model.write(&file, &pages(&mut rng, 8)).unwrap();
    for &offset in &a {
        model.release(&file, offset);
    }
    let mut batch = pages(&mut rng, 2);
    batch.push(rng.object(100));
    let b = model.write(&file, &batch).unwrap();
    assert_eq!(b, [0, BLOCK, 2 * BLOCK], "first fit; block 2 is open");
    // Continuing in block 2 needs blocks 3..9, but 8 is used: a fresh run is appended.
    let c = model.write(&file, &pages(&mut rng, 6)).unwrap();
    assert_eq!(c[0], 16 * BLOCK);
    let stats = file.stats();
    assert_eq!((stats.blocks_used, stats.blocks_free), (17, 5));
    model.check(&file);
}

#[test]
fn an_emptied_open_block_is_started_afresh() {
    let (file, _, _) = memory_file(None);
    let mut rng = Rng(11);
    let mut model = Model::default();
    let first = model.write(&file, &[rng.object(100)]).unwrap();
    model.release(&file, first[0]);
    let stats = file.stats();
    assert_eq!(stats.blocks_used, 1, "the open block stays pinned");
    assert_eq!(stats.punched_blocks, 0);
    let second = model.write(&file, &[rng.object(200)]).unwrap();
    assert_eq!(
        second[0], 0,
        "the batch starts at the empty open block's start"
    );
    model.check(&file);
    // A block that is no longer open is freed when its last object goes.
    let third = model.write(&file, &[rng.object(WHOLE)]).unwrap();
    assert_eq!(third[0], (RECORD_HEADER + 200) as u64);
    model.release(&file, second[0]);
    model.release(&file, third[0]);
    model.check(&file);
    assert_eq!(file.stats().punched_blocks, 1);
}

#[test]
fn releasing_objects_punches_their_blocks_out_of_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("backing");
    let file = BackingFile::open(&path).unwrap();
    let mut rng = Rng(3);
    let mut model = Model::default();
    let pages: Vec<Vec<u8>> = (0..64).map(|_| rng.object(WHOLE)).collect();
    let offsets = model.write(&file, &pages).unwrap();
    let disk = || std::fs::metadata(&path).unwrap().blocks() * 512;
    let before = disk();
    assert!(before >= 64 * BLOCK, "{before}");
    for &offset in &offsets[..32] {
        model.release(&file, offset);
    }
    let after = disk();
    assert!(before - after >= 32 * BLOCK, "{before} -> {after}");
    assert_eq!(file.stats().punched_blocks, 32);
    // Objects sharing a block: the block stays until both are gone.
    let halves = model
        .write(&file, &[rng.object(2048), rng.object(2048)])
        .unwrap();
    let shared = disk();
    model.release(&file, halves[0]);
    assert_eq!(disk(), shared);
    assert_eq!(file.stats().punched_blocks, 32);
    model.check(&file);
}

#[test]
fn packing_keeps_the_file_within_a_tenth_of_the_live_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(5);
    // (objects a batch at most, object sizes, batches)
    let mixes: [(u64, SizeOf, usize); 2] = [
        (16, Rng::page_size, 400),
        (4, |rng: &mut Rng| 16 + rng.below(200) as usize, 2000),
    ];
    for (i, (max, size, batches)) in mixes.into_iter().enumerate() {
        let path = dir.path().join(format!("packed{i}"));
        let file = BackingFile::open(&path).unwrap();
        let mut model = Model::default();
        for _ in 0..batches {
            let n = 1 + rng.below(max);
            let batch: Vec<Vec<u8>> = (0..n)
                .map(|_| {
                    let len = size(&mut rng);
                    rng.object(len)
                })
                .collect();
            model.write(&file, &batch).unwrap();
        }
        let stats = file.stats();
        assert_eq!(stats.live_bytes, model.live_bytes());
        // What the records take: the objects and a header each.
        let live = model.live_bytes() + (model.0.len() * RECORD_HEADER) as u64;
        assert_eq!(stats.write_calls, batches as u64, "one write a batch");
        assert!(
            stats.file_blocks * BLOCK * 10 <= live * 11,
            "{} blocks for {live} bytes",
            stats.file_blocks
        );
        let disk = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(disk * 10 <= live * 11, "{disk} bytes on disk for {live}");
        model.check(&file);
    }
}

#[test]
fn a_second_open_of_the_same_path_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("backing");
    let first = BackingFile::open(&path).unwrap();
    let err = BackingFile::open(&path).unwrap_err();
    assert!(matches!(err, BackingError::Locked { .. }), "{err:?}");
    assert!(err.to_string().contains("another vhost-user-zram"), "{err}");
    drop(first);
    BackingFile::open(&path).unwrap();
}

#[test]
fn files_are_created_sparse_and_private() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("backing");
    let file = BackingFile::open(&path).unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600);
    assert_eq!((meta.len(), meta.blocks()), (0, 0));
    drop(file);
    std::fs::write(&path, vec![1u8; 65536]).unwrap();
    let _file = BackingFile::open(&path).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        0,
        "stale contents go"
    );
}

#[test]
fn a_file_with_someone_elses_data_is_refused_not_clobbered() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    std::fs::write(&path, b"precious").unwrap();
    let err = BackingFile::open(&path).unwrap_err();
    assert!(
        matches!(err, BackingError::NotOurs { len: 8, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("give a new path"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    // An empty file is taken (and marked: the next start takes it again, full or not).
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    let file = BackingFile::open(&empty).unwrap();
    file.write_batch(&[(0, &[7u8; 100])]).unwrap();
    drop(file);
    assert!(std::fs::metadata(&empty).unwrap().len() > 0);
    BackingFile::open(&empty).unwrap();
}

#[test]
fn directories_and_fifos_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let err = BackingFile::open(dir.path()).unwrap_err();
    assert!(
        matches!(
            err,
            BackingError::NotSupported {
                kind: "a directory",
                ..
            }
        ),
        "{err:?}"
    );
    let fifo = dir.path().join("fifo");
    let status = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(status.success());
    let err = BackingFile::open(&fifo).unwrap_err();
    assert!(
        matches!(err, BackingError::NotSupported { kind: "a FIFO", .. }),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("regular file or a block device"),
        "{err}"
    );
}

/// Switches a fault on.
type Arm = fn(&FaultyIo);
/// Says whether an error is the one a fault should cause.
type Expect = fn(&BackingError) -> bool;
/// Draws an object size.
type SizeOf = fn(&mut Rng) -> usize;

#[test]
fn write_faults_leave_the_allocator_as_before_and_a_retry_succeeds() {
    let (file, faults, _) = memory_file(None);
    let mut rng = Rng(13);
    let mut model = Model::default();
    random_run(&file, &mut rng, &mut model, 40);
    // End on a partly filled block, so the failing batches continue in an open block.
    model.write(&file, &[rng.object(1000)]).unwrap();
    let cases: [(&str, Arm, Expect); 5] = [
        (
            "EIO",
            |f| f.set_write_error(Some(libc::EIO)),
            |e| matches!(e, BackingError::Io { op: "write", .. }),
        ),
        (
            "ENOSPC",
            |f| f.set_write_error(Some(libc::ENOSPC)),
            |e| matches!(e, BackingError::NoSpace { .. }),
        ),
        (
            "no progress",
            |f| f.set_stalled_writes(true),
            |e| matches!(e, BackingError::ShortWrite { written: 0, .. }),
        ),
        (
            "first write",
            |f| f.fail_nth_write(1, libc::EIO),
            |e| matches!(e, BackingError::Io { op: "write", .. }),
        ),
        (
            "after a short write",
            |f| {
                f.set_short_writes(true);
                f.fail_nth_write(2, libc::EIO);
            },
            |e| matches!(e, BackingError::Io { op: "write", .. }),
        ),
    ];
    for (name, arm, expected) in cases {
        let before = file.stats();
        arm(&faults);
        let batch: Vec<Vec<u8>> = (0..5).map(|_| rng.object(3000)).collect();
        let err = model.write(&file, &batch).unwrap_err();
        assert!(expected(&err), "{name}: {err:?}");
        let after = file.stats();
        assert_eq!(
            after,
            BackingStats {
                failed_writes: before.failed_writes + 1,
                write_calls: after.write_calls,
                ..before
            },
            "{name}"
        );
        model.check(&file);
        faults.clear();
        model.write(&file, &batch).unwrap();
        model.check(&file);
    }
}

#[test]
fn a_full_filesystem_sends_the_batch_into_a_free_extent() {
    let (file, faults, _) = memory_file(None);
    let mut rng = Rng(47);
    let mut model = Model::default();
    let pages =
        |rng: &mut Rng, n: usize| -> Vec<Vec<u8>> { (0..n).map(|_| rng.object(WHOLE)).collect() };
    let a = model.write(&file, &pages(&mut rng, 8)).unwrap();
    model.write(&file, &pages(&mut rng, 8)).unwrap();
    model.write(&file, &[rng.object(100)]).unwrap();
    for &offset in &a {
        model.release(&file, offset);
    }
    // The next batch would continue in the open block at the end of the file: make that
    // write find the filesystem full.
    faults.fail_nth_write(1, libc::ENOSPC);
    let offsets = model.write(&file, &pages(&mut rng, 2)).unwrap();
    assert_eq!(offsets[0], 0);
    let stats = file.stats();
    assert_eq!((stats.failed_writes, stats.file_blocks), (0, 17));
    model.check(&file);
    // No extent is long enough: the batch fails, recording nothing.
    faults.set_write_error(Some(libc::ENOSPC));
    let err = model.write(&file, &pages(&mut rng, 7)).unwrap_err();
    assert!(matches!(err, BackingError::NoSpace { .. }), "{err:?}");
    assert_eq!(file.stats().failed_writes, 1);
    model.check(&file);
}

#[test]
fn faults_between_the_backing_file_and_a_real_file() {
    let dir = tempfile::tempdir().unwrap();
    let faults = std::sync::OnceLock::new();
    let wrap = |io: Box<dyn BackingIo>| -> Box<dyn BackingIo> {
        let faulty = Arc::new(FaultyIo::new(io));
        faults.set(faulty.clone()).unwrap();
        Box::new(faulty)
    };
    let file = BackingFile::open_wrapped(&dir.path().join("backing"), wrap).unwrap();
    let faults = faults.get().unwrap();
    let mut rng = Rng(59);
    let mut model = Model::default();
    random_run(&file, &mut rng, &mut model, 20);
    faults.set_short_writes(true);
    faults.fail_nth_write(2, libc::EIO);
    let batch = rng.batch(16);
    assert!(model.write(&file, &batch).is_err());
    model.check(&file);
    faults.clear();
    model.write(&file, &batch).unwrap();
    faults.set_read_error(Some(libc::EIO));
    let offset = model.nth(0).unwrap();
    let mut out = [0u8; BLOCK_SIZE];
    let object = &model.0[&offset];
    assert!(file
        .read(offset, object.len(), page_of(object), &mut out)
        .is_err());
    faults.clear();
    model.check(&file);
}

#[test]
fn short_writes_are_completed_by_looping() {
    let (file, faults, _) = memory_file(None);
    let mut rng = Rng(17);
    let mut model = Model::default();
    faults.set_short_writes(true);
    model.write(&file, &rng.batch(16)).unwrap();
    let batch: Vec<Vec<u8>> = (0..8).map(|_| rng.object(WHOLE)).collect();
    model.write(&file, &batch).unwrap();
    assert!(file.stats().write_calls > 2);
    model.check(&file);
}

#[test]
fn writes_past_the_capacity_are_no_space_without_io() {
    let (file, faults, _) = memory_file(Some(10 * BLOCK + 100));
    let mut rng = Rng(19);
    let mut model = Model::default();
    // Objects whose records are a block each.
    let pages: Vec<Vec<u8>> = (0..10)
        .map(|_| rng.object(BLOCK_SIZE - RECORD_HEADER))
        .collect();
    model.write(&file, &pages).unwrap();
    let writes = faults.writes();
    let err = model.write(&file, &[rng.object(1)]).unwrap_err();
    assert!(matches!(err, BackingError::NoSpace { offset, .. } if offset == 10 * BLOCK));
    assert_eq!(faults.writes(), writes);
    assert_eq!(file.stats().failed_writes, 1);
    model.release(&file, 4 * BLOCK);
    model.write(&file, &[rng.object(1)]).unwrap();
    model.check(&file);
    assert_eq!(
        BackingFile::with_io(Box::new(MemIo::new()), None).limit_blocks,
        1 << 32
    );
    let huge = BackingFile::with_io(Box::new(MemIo::new()), Some(1 << 50));
    assert_eq!(huge.limit_blocks, MAX_FILE_BYTES / BLOCK);
}

#[test]
fn read_faults_are_errors_never_garbage() {
    let (file, faults, _) = memory_file(None);
    let mut rng = Rng(23);
    let mut model = Model::default();
    let offsets = model.write(&file, &rng.batch(16)).unwrap();
    let (len, page) = (model.0[&offsets[0]].len(), page_of(&model.0[&offsets[0]]));
    let mut out = [0xaa_u8; BLOCK_SIZE];
    faults.set_read_error(Some(libc::EIO));
    let err = file.read(offsets[0], len, page, &mut out).unwrap_err();
    assert!(
        matches!(err, BackingError::Io { op: "read", .. }),
        "{err:?}"
    );
    faults.set_read_error(None);
    faults.set_read_eof(true);
    let err = file.read(offsets[0], len, page, &mut out).unwrap_err();
    assert!(
        matches!(err, BackingError::ShortRead { read: 0, .. }),
        "{err:?}"
    );
    assert!(
        out.iter().all(|&b| b == 0xaa),
        "a failed read leaves the buffer alone"
    );
    let stats = file.stats();
    assert_eq!((stats.failed_reads, stats.reads), (2, 0));
    faults.clear();
    model.check(&file);
}

#[test]
fn punch_failures_are_counted_and_the_blocks_still_reused() {
    let (file, faults, _) = memory_file(None);
    let mut rng = Rng(29);
    let mut model = Model::default();
    let pages: Vec<Vec<u8>> = (0..4).map(|_| rng.object(WHOLE)).collect();
    let offsets = model.write(&file, &pages).unwrap();
    faults.set_punch_error(Some(libc::EOPNOTSUPP));
    model.release(&file, offsets[0]);
    faults.set_punch_error(Some(libc::EIO));
    model.release(&file, offsets[1]);
    let stats = file.stats();
    assert_eq!(
        (
            stats.punch_unsupported,
            stats.failed_punches,
            stats.punched_blocks
        ),
        (1, 1, 0)
    );
    assert_eq!(stats.blocks_free, 2);
    faults.clear();
    let again = model.write(&file, &[rng.object(WHOLE), rng.object(WHOLE)]);
    assert_eq!(again.unwrap()[0], 0);
    model.check(&file);
}

#[test]
fn bad_arguments_are_refused_and_change_nothing() {
    let (file, _, _) = memory_file(None);
    let mut rng = Rng(31);
    let mut model = Model::default();
    let offsets = model
        .write(&file, &[rng.object(100), rng.object(100)])
        .unwrap();
    let before = file.stats();
    let invalid = |r: Result<_, BackingError>| matches!(r, Err(BackingError::InvalidObject { .. }));
    assert!(invalid(file.write_batch(&[(0, &[])]).map(|_| ())));
    assert!(invalid(
        file.write_batch(&[(0, &[1; BLOCK_SIZE + 1])]).map(|_| ())
    ));
    assert!(invalid(
        file.write_batch(&[(1 << 32, &[1; 10])]).map(|_| ())
    ));
    let mut out = [0u8; BLOCK_SIZE];
    assert!(invalid(file.read(0, 0, 0, &mut out)));
    assert!(invalid(file.read(0, BLOCK_SIZE + 1, 0, &mut out)));
    assert!(invalid(file.read(0, 100, 0, &mut out[..99])));
    assert!(invalid(file.read(0, 100, 1 << 32, &mut out)));
    assert!(invalid(file.read(BLOCK, 1, 0, &mut out)));
    assert!(invalid(file.release(BLOCK, 1)));
    assert!(invalid(file.release(0, 0)));
    assert!(invalid(file.read(u64::MAX, 1, 0, &mut out)));
    assert!(invalid(file.release(u64::MAX - 10, 100)));
    assert!(file.write_batch(&[]).unwrap().is_empty());
    assert_eq!(file.stats(), before);
    model.check(&file);
    assert_eq!(offsets, [0, (RECORD_HEADER + 100) as u64]);
}

#[test]
fn reads_run_concurrently_with_batches_and_releases() {
    let dir = tempfile::tempdir().unwrap();
    let file = Arc::new(BackingFile::open(&dir.path().join("backing")).unwrap());
    let mut rng = Rng(37);
    let mut stable = Model::default();
    stable.write(&file, &rng.batch(16)).unwrap();
    // The last stable object sits in the open block that the next batches rewrite.
    stable.write(&file, &[rng.object(700)]).unwrap();
    let stable = Arc::new(stable);
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (file, stable, stop) = (file.clone(), stable.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut out = [0u8; BLOCK_SIZE];
                let mut rounds = 0u64;
                while !stop.load(Ordering::Relaxed) || rounds == 0 {
                    for (&offset, object) in &stable.0 {
                        file.read(offset, object.len(), page_of(object), &mut out)
                            .unwrap();
                        assert!(out[..object.len()] == object[..], "object at {offset}");
                    }
                    rounds += 1;
                }
                rounds
            })
        })
        .collect();
    let mut churn = Model::default();
    for _ in 0..300 {
        churn.write(&file, &rng.batch(8)).unwrap();
        for _ in 0..rng.below(6) {
            if let Some(offset) = churn.nth(rng.next() as usize) {
                churn.release(&file, offset);
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        assert!(reader.join().unwrap() > 0);
    }
    let mut all = stable.0.clone();
    all.extend(churn.0);
    Model(all).check(&file);
}

#[test]
fn a_full_tmpfs_gives_no_space_and_records_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let _mount = match Mount::new("tmpfs", "size=1m", dir.path()) {
        Ok(mount) => mount,
        Err(why) => {
            println!("SKIPPED: {why}");
            return;
        }
    };
    let file = BackingFile::open(&dir.path().join("backing")).unwrap();
    let mut rng = Rng(41);
    let mut model = Model::default();
    let mut batches = Vec::new();
    let err = loop {
        assert!(batches.len() < 1000, "a 1 MiB tmpfs never filled up");
        let batch = vec![
            rng.object(WHOLE),
            rng.object(WHOLE),
            rng.object(WHOLE),
            rng.object(2000),
        ];
        let before = file.stats();
        match model.write(&file, &batch) {
            Ok(offsets) => batches.push(offsets),
            Err(err) => {
                let after = file.stats();
                assert_eq!(after.failed_writes, before.failed_writes + 1);
                assert_eq!(
                    after,
                    BackingStats {
                        failed_writes: after.failed_writes,
                        write_calls: after.write_calls,
                        ..before
                    }
                );
                break err;
            }
        }
    };
    assert!(matches!(err, BackingError::NoSpace { .. }), "{err:?}");
    assert!(batches.len() > 10, "only {} batches fit", batches.len());
    model.check(&file);
    // Freed blocks are punched, so the filesystem has room again for a batch that fits
    // in them.
    for offsets in &batches[..4] {
        for &offset in offsets {
            model.release(&file, offset);
        }
    }
    model
        .write(&file, &[rng.object(WHOLE), rng.object(WHOLE)])
        .unwrap();
    model.check(&file);
    drop(file);
}

#[test]
fn a_block_device_is_used_up_to_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image");
    // The header block, then 16 blocks for records.
    std::fs::write(&image, vec![0_u8; 17 * BLOCK_SIZE]).unwrap();
    let device = match LoopDevice::new(&image) {
        Ok(device) => device,
        Err(why) => {
            println!("SKIPPED: {why}");
            return;
        }
    };
    let file = BackingFile::open(&device.0).unwrap();
    assert!(file.is_direct());
    assert_eq!(file.limit_blocks, 16);
    let err = BackingFile::open(&device.0).unwrap_err();
    assert!(matches!(err, BackingError::Locked { .. }), "{err:?}");
    let mut rng = Rng(53);
    let mut model = Model::default();
    let pages: Vec<Vec<u8>> = (0..15)
        .map(|_| rng.object(BLOCK_SIZE - RECORD_HEADER))
        .collect();
    model.write(&file, &pages).unwrap();
    model.write(&file, &[rng.object(3000)]).unwrap();
    let err = model.write(&file, &[rng.object(2000)]).unwrap_err();
    assert!(matches!(err, BackingError::NoSpace { .. }), "{err:?}");
    model.check(&file);
    let first = model.nth(0).unwrap();
    model.release(&file, first);
    model.write(&file, &[rng.object(2000)]).unwrap();
    model.check(&file);
    let stats = file.stats();
    assert_eq!(
        stats.punched_blocks + stats.punch_unsupported,
        1,
        "{stats:?}"
    );
    drop(file);
}

#[test]
fn buffered_fallback_when_the_filesystem_refuses_o_direct() {
    let dir = tempfile::tempdir().unwrap();
    let _mount = match Mount::new("ramfs", "mode=0700", dir.path()) {
        Ok(mount) => mount,
        Err(why) => {
            println!("SKIPPED: {why}");
            return;
        }
    };
    assert!(!o_direct_works(dir.path()), "ramfs takes O_DIRECT now");
    let file = BackingFile::open(&dir.path().join("backing")).unwrap();
    assert!(!file.is_direct());
    let mut model = Model::default();
    random_run(&file, &mut Rng(43), &mut model, 100);
    // ramfs cannot punch holes: counted, and the blocks are reused all the same.
    let stats = file.stats();
    assert_eq!(stats.punched_blocks + stats.failed_punches, 0, "{stats:?}");
    assert!(stats.punch_unsupported > 0, "{stats:?}");
    drop(file);
}

#[test]
fn a_pinned_object_keeps_its_bytes_after_it_is_released() {
    let (file, _faults, _mem) = memory_file(None);
    let mut rng = Rng(7);
    // An object alone in the open block, and one spanning two blocks.
    for lens in [[100usize].as_slice(), &[4000, 3000]] {
        let objects: Vec<Vec<u8>> = lens.iter().map(|&len| rng.object(len)).collect();
        let offsets = file.write_batch(&with_pages(&objects)).unwrap();
        let (offset, object) = (*offsets.last().unwrap(), objects.last().unwrap());
        let pin = file.pin(offset, object.len()).unwrap();
        for (&o, object) in offsets.iter().zip(&objects) {
            file.release(o, object.len()).unwrap();
        }
        // Without the pin, these batches would reuse (or start afresh in) its blocks.
        let mut model = Model::default();
        for _ in 0..8 {
            model.write(&file, &rng.batch(4)).unwrap();
        }
        let mut out = [0u8; BLOCK_SIZE];
        pin.read(page_of(object), &mut out).unwrap();
        assert!(
            out[..object.len()] == object[..],
            "the pinned bytes changed"
        );
        drop(pin);
        model.check(&file);
        for offset in model.0.keys().copied().collect::<Vec<_>>() {
            model.release(&file, offset);
        }
        model.consistent(&file);
    }
    assert!(
        file.pin(0, 100).is_err(),
        "an object in freed blocks cannot be pinned"
    );
}

/// Changes a record's bytes in place.
type Harm = dyn Fn(&mut [u8]);
/// Writes something at the start of a device image.
type Prepare = dyn Fn(&Path);

/// Damages the bytes at `offset` of a memory file: `f` changes them in place.
fn damage(mem: &MemIo, offset: u64, len: usize, f: impl FnOnce(&mut [u8])) {
    let mut bytes = vec![0u8; len];
    assert_eq!(mem.pread(&mut bytes, offset).unwrap(), len);
    f(&mut bytes);
    assert_eq!(mem.pwrite(&bytes, offset).unwrap(), len);
}

#[test]
fn a_record_that_does_not_verify_fails_its_page_only() {
    let (file, _faults, mem) = memory_file(None);
    let mut rng = Rng(61);
    let mut model = Model::default();
    // Small objects, a raw page whose record spans three blocks, more small ones.
    let mut objects: Vec<Vec<u8>> = (0..3).map(|_| rng.object(1345)).collect();
    objects.push(rng.object(BLOCK_SIZE));
    objects.extend((0..6).map(|_| rng.object(500)));
    let offsets = model.write(&file, &objects).unwrap();
    assert_eq!(
        blocks_of(offsets[3], BLOCK_SIZE).count(),
        3,
        "the raw page's record spans three blocks"
    );
    model.check(&file);
    let record = |i: usize| (offsets[i], record_len(objects[i].len()));
    // (which object, the damage, what the read must say)
    let cases: [(usize, &Harm, Mismatch); 4] = [
        (0, &|b| b.fill(0), Mismatch::NoHeader),
        (1, &|b| *b.last_mut().unwrap() ^= 1, Mismatch::Checksum),
        (3, &|b| b[RECORD_HEADER + 2000] ^= 0x80, Mismatch::Checksum),
        (
            5,
            &|b| b[8] ^= 1,
            Mismatch::OtherPage(page_of(&objects[5]) as u32 ^ 1),
        ),
    ];
    let mut failed = 0;
    for (i, harm, expected) in cases {
        let (offset, len) = record(i);
        damage(&mem, offset, len, harm);
        let mut out = [0x5a_u8; BLOCK_SIZE];
        let err = file
            .read(offset, objects[i].len(), page_of(&objects[i]), &mut out)
            .unwrap_err();
        failed += 1;
        assert!(
            matches!(&err, BackingError::Corrupt { why, .. } if *why == expected),
            "object {i}: {err:?}"
        );
        assert!(err.to_string().contains("does not verify"), "{err}");
        assert!(
            out.iter().all(|&b| b == 0x5a),
            "nothing of it is copied out"
        );
        // Every other object that was not damaged still reads.
        for (j, object) in objects.iter().enumerate().skip(i + 1) {
            file.read(offsets[j], object.len(), page_of(object), &mut out)
                .unwrap();
            assert!(out[..object.len()] == object[..]);
        }
    }
    // A record copied over another's place names its own page.
    let (from, len) = record(7);
    let mut moved = vec![0u8; len];
    mem.pread(&mut moved, from).unwrap();
    let (to, _) = record(6);
    damage(&mem, to, len.min(record(6).1), |b| {
        let n = b.len();
        b.copy_from_slice(&moved[..n]);
    });
    let mut out = [0u8; BLOCK_SIZE];
    let err = file
        .read(to, objects[6].len(), page_of(&objects[6]), &mut out)
        .unwrap_err();
    failed += 1;
    assert!(
        matches!(err, BackingError::Corrupt { why: Mismatch::OtherPage(p), .. } if u64::from(p) == page_of(&objects[7])),
        "{err:?}"
    );
    // The same object read as another page's, or with another length: refused.
    let err = file
        .read(
            offsets[8],
            objects[8].len(),
            page_of(&objects[8]) + 1,
            &mut out,
        )
        .unwrap_err();
    failed += 1;
    assert!(
        matches!(
            err,
            BackingError::Corrupt {
                why: Mismatch::OtherPage(_),
                ..
            }
        ),
        "{err:?}"
    );
    let err = file
        .read(
            offsets[8],
            objects[8].len() - 1,
            page_of(&objects[8]),
            &mut out,
        )
        .unwrap_err();
    failed += 1;
    assert!(
        matches!(
            err,
            BackingError::Corrupt {
                why: Mismatch::OtherLength(500),
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(file.stats().failed_reads, failed);
    file.read(offsets[9], objects[9].len(), page_of(&objects[9]), &mut out)
        .unwrap();
    model.consistent(&file);
}

#[test]
fn a_record_of_another_run_does_not_verify() {
    let object = [7u8; 300];
    let mut record = vec![0u8; record_len(object.len())];
    record::seal(1, 42, &object, &mut record);
    assert_eq!(record::open(1, 42, 300, &record), Ok(&object[..]));
    assert_eq!(&record[..4], &RECORD_MAGIC);
    assert_eq!(record::open(2, 42, 300, &record), Err(Mismatch::Checksum));
    assert_eq!(
        record::open(1, 43, 300, &record),
        Err(Mismatch::OtherPage(42))
    );
    assert_eq!(
        record::open(1, 42, 300, &vec![0u8; record.len()]),
        Err(Mismatch::NoHeader),
        "zeros never verify"
    );
    record[14] = 1;
    assert_eq!(
        record::open(1, 42, 300, &record),
        Err(Mismatch::OtherLength(300))
    );
    assert_ne!(run_key(), run_key(), "each backing file has its own key");
}

/// Opens `path`, failing the test if that takes more than a few seconds (a FIFO's open
/// blocks until a writer comes).
fn open_in_time(path: &Path) -> Result<BackingFile, BackingError> {
    let (send, receive) = std::sync::mpsc::channel();
    let path = path.to_owned();
    std::thread::spawn(move || {
        let _ = send.send(BackingFile::open(&path));
    });
    receive
        .recv_timeout(std::time::Duration::from_secs(5))
        .expect("opening the backing file blocked")
}

fn refused_as(result: Result<BackingFile, BackingError>, kind: &str) {
    match result {
        Err(BackingError::NotSupported { kind: found, .. }) if found == kind => {}
        other => panic!("expected {kind}, got {other:?}"),
    }
}

#[test]
fn fifos_sockets_char_devices_and_kernel_files_are_refused_before_any_open() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    refused_as(open_in_time(&fifo), "a FIFO");
    let link = dir.path().join("link-to-fifo");
    std::os::unix::fs::symlink(&fifo, &link).unwrap();
    refused_as(open_in_time(&link), "a FIFO");
    let socket = dir.path().join("socket");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    refused_as(open_in_time(&socket), "a socket");
    refused_as(open_in_time(Path::new("/dev/null")), "a character device");
    refused_as(
        open_in_time(Path::new("/proc/self/mem")),
        "a file of /proc (procfs)",
    );
    let err = open_in_time(Path::new("/proc/self/mem")).unwrap_err();
    assert!(
        err.to_string()
            .contains("must be a regular file or a block device"),
        "{err}"
    );
    refused_as(
        open_in_time(Path::new("/proc/self/status")),
        "a file of /proc (procfs)",
    );
    let sys = [
        "/sys/kernel/uevent_seqnum",
        "/sys/power/state",
        "/sys/kernel/mm/transparent_hugepage/enabled",
    ]
    .into_iter()
    .map(Path::new)
    .find(|p| p.exists());
    match sys {
        Some(sys) => refused_as(open_in_time(sys), "a file of /sys (sysfs)"),
        None => println!("SKIPPED the sysfs case: no known sysfs file here"),
    }
    // A link to nothing is refused, and nothing is created where it points.
    let dangling = dir.path().join("dangling");
    let target = dir.path().join("nowhere");
    std::os::unix::fs::symlink(&target, &dangling).unwrap();
    refused_as(
        open_in_time(&dangling),
        "a symbolic link to a path that does not exist",
    );
    assert!(!target.exists());
}

#[test]
fn a_symlink_is_resolved_and_the_rule_applies_to_its_target() {
    let dir = tempfile::tempdir().unwrap();
    let precious = dir.path().join("precious");
    std::fs::write(&precious, b"\x7fELF and more").unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&precious, &link).unwrap();
    let err = BackingFile::open(&link).unwrap_err();
    assert!(
        matches!(err, BackingError::NotOurs { len: 13, .. }),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("--backing-file-overwrite"),
        "{err}"
    );
    assert_eq!(std::fs::read(&precious).unwrap(), b"\x7fELF and more");
    let file = BackingFile::open_with_policy(&link, ForeignData::Overwrite).unwrap();
    let opened = file.opened().unwrap();
    assert_eq!(opened.resolved, precious.canonicalize().unwrap());
    assert!(
        opened.overwritten.as_deref().unwrap().contains("13 bytes"),
        "{opened:?}"
    );
    assert_eq!(std::fs::metadata(&precious).unwrap().len(), 0);
    assert!(opened.to_string().contains("resolved to"), "{opened}");
}

/// A loop device over a fresh image of `blocks` blocks, its start written by `prepare`.
fn prepared_device(dir: &Path, blocks: usize, prepare: &dyn Fn(&Path)) -> Option<LoopDevice> {
    let image = dir.join(format!("image{}", rand_suffix()));
    std::fs::write(&image, vec![0u8; blocks * BLOCK_SIZE]).unwrap();
    prepare(&image);
    match LoopDevice::new(&image) {
        Ok(device) => Some(device),
        Err(why) => {
            println!("SKIPPED: {why}");
            None
        }
    }
}

fn rand_suffix() -> u64 {
    run_key() % 1_000_000
}

fn first_mib(path: &Path) -> Vec<u8> {
    let mut bytes = std::fs::read(path).unwrap_or_default();
    if bytes.is_empty() {
        // A block device: read it through std (buffered).
        use std::io::Read;
        let mut f = std::fs::File::open(path).unwrap();
        bytes = vec![0u8; 1 << 20];
        f.read_exact(&mut bytes).unwrap();
    }
    bytes.truncate(1 << 20);
    bytes
}

#[test]
fn a_block_device_holding_data_is_refused_unless_overwriting() {
    let dir = tempfile::tempdir().unwrap();
    let write_at = |at: u64, bytes: &'static [u8]| {
        move |image: &Path| {
            let f = OpenOptions::new().write(true).open(image).unwrap();
            std::os::unix::fs::FileExt::write_all_at(&f, bytes, at).unwrap();
        }
    };
    let run = |tool: &'static str| {
        move |image: &Path| {
            let ok = Command::new(tool)
                .arg("-q")
                .arg(image)
                .output()
                .is_ok_and(|o| o.status.success());
            if !ok {
                // Without the tool, write the signature it would.
                let f = OpenOptions::new().write(true).open(image).unwrap();
                let (at, sig): (u64, &[u8]) = if tool == "mkswap" {
                    (4086, b"SWAPSPACE2")
                } else {
                    (1080, &[0x53, 0xef])
                };
                std::os::unix::fs::FileExt::write_all_at(&f, sig, at).unwrap();
            }
        }
    };
    let cases: [(&Prepare, &str); 5] = [
        (&run("mkfs.ext4"), "an ext2/ext3/ext4 filesystem"),
        (&run("mkswap"), "a swap area"),
        (&write_at(510, &[0x55, 0xaa]), "a DOS partition table"),
        (&write_at(512, b"EFI PART"), "a GPT partition table"),
        (
            &write_at(700_000, b"someone's data"),
            "a non-zero byte at 700000",
        ),
    ];
    for (prepare, found) in cases {
        let Some(device) = prepared_device(dir.path(), 1024, prepare) else {
            return;
        };
        // Through a symbolic link, as the report did it.
        let link = dir.path().join(format!("link{}", rand_suffix()));
        std::os::unix::fs::symlink(&device.0, &link).unwrap();
        let before = first_mib(&device.0);
        let err = BackingFile::open(&link).unwrap_err();
        assert!(matches!(err, BackingError::ForeignDevice { .. }), "{err:?}");
        assert!(err.to_string().contains(found), "{err} should name {found}");
        assert!(
            err.to_string().contains("--backing-file-overwrite"),
            "{err}"
        );
        assert!(
            first_mib(&device.0) == before,
            "a refused device is not written"
        );
        let file = BackingFile::open_with_policy(&link, ForeignData::Overwrite).unwrap();
        let opened = file.opened().unwrap().clone();
        assert!(
            opened.overwritten.as_deref().unwrap().contains(found),
            "{opened:?}"
        );
        assert!(matches!(opened.kind, BackingKind::BlockDevice(size) if size == 1024 * BLOCK));
        drop(file);
        // Ours now: the next start takes it without being told.
        let file = BackingFile::open(&link).unwrap();
        assert!(matches!(
            file.opened().unwrap().earlier_run,
            Some(EarlierRun::Device { .. })
        ));
    }
}

#[test]
fn an_empty_device_gets_our_header_and_records_start_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let Some(device) = prepared_device(dir.path(), 64, &|_| {}) else {
        return;
    };
    let file = BackingFile::open(&device.0).unwrap();
    let opened = file.opened().unwrap();
    assert_eq!(opened.earlier_run, None);
    assert!(
        opened
            .to_string()
            .contains("a block device of 262144 bytes"),
        "{opened}"
    );
    assert_eq!(
        file.limit_blocks, 63,
        "the header block is not the allocator's"
    );
    let mut model = Model::default();
    let mut rng = Rng(67);
    let offsets = model.write(&file, &rng.batch(8)).unwrap();
    assert_eq!(offsets[0], 0);
    model.check(&file);
    drop(file);
    let bytes = first_mib(&device.0);
    assert_eq!(&bytes[..16], b"vhost-user-zram\0");
    assert_eq!(&bytes[16..20], &1u32.to_le_bytes());
    assert!(bytes[20..BLOCK_SIZE].iter().all(|&b| b == 0));
    assert_eq!(
        &bytes[BLOCK_SIZE..BLOCK_SIZE + 4],
        &RECORD_MAGIC,
        "record 0 is at byte 4096"
    );
    // A second start on it: ours, and an earlier run's records never read as this run's.
    let file = BackingFile::open(&device.0).unwrap();
    assert!(matches!(
        file.opened().unwrap().earlier_run,
        Some(EarlierRun::Device { .. })
    ));
    assert!(file
        .opened()
        .unwrap()
        .earlier_run_message()
        .unwrap()
        .contains("earlier run"));
}

#[test]
fn an_earlier_runs_file_is_emptied_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("backing");
    let file = BackingFile::open(&path).unwrap();
    assert_eq!(file.opened().unwrap().earlier_run, None);
    let mut model = Model::default();
    let objects: Vec<Vec<u8>> = (0..8).map(|_| Rng(71).object(BLOCK_SIZE)).collect();
    model.write(&file, &objects).unwrap();
    drop(file);
    let disk = std::fs::metadata(&path).unwrap().blocks() * 512;
    let file = BackingFile::open(&path).unwrap();
    let opened = file.opened().unwrap();
    assert!(
        matches!(opened.earlier_run, Some(EarlierRun::File { disk_bytes, .. }) if disk_bytes == disk)
    );
    let message = opened.earlier_run_message().unwrap();
    assert!(
        message.contains(&format!("held {} blocks", disk / BLOCK)),
        "{message}"
    );
    assert!(opened.to_string().contains("a regular file"), "{opened}");
    assert!(
        !holds_data(&path),
        "the earlier run's blocks are released at start"
    );
}

/// Whether the regular file at `path` holds a data block anywhere (`SEEK_DATA` finds one).
fn holds_data(path: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    // SAFETY: lseek takes an open fd and plain integers; no memory is passed.
    let at = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_DATA) };
    at >= 0
}

#[test]
fn erasing_releases_every_block_and_the_file_takes_batches_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("backing");
    let file = BackingFile::open(&path).unwrap();
    let mut model = Model::default();
    let mut rng = Rng(73);
    for _ in 0..6 {
        model.write(&file, &rng.batch(16)).unwrap();
    }
    let forgotten = model.nth(3).unwrap();
    let forgotten_len = model.0[&forgotten].len();
    assert!(holds_data(&path));

    let erasure = file.erase();

    assert!(
        matches!(erasure, Erasure::Punched { bytes } if bytes > 0),
        "{erasure}"
    );
    assert!(!holds_data(&path), "a data block is left after {erasure}");
    assert_eq!(std::fs::metadata(&path).unwrap().blocks(), 0);
    let stats = file.stats();
    assert_eq!(
        (stats.blocks_used, stats.objects, stats.file_blocks),
        (0, 0, 0)
    );
    file.check_consistency(&mut std::iter::empty()).unwrap();
    let mut out = [0u8; BLOCK_SIZE];
    assert!(
        file.read(forgotten, forgotten_len, 0, &mut out).is_err(),
        "an object erased is never read"
    );
    assert!(file.release(forgotten, forgotten_len).is_err());
    let mut model = Model::default();
    model.write(&file, &rng.batch(8)).unwrap();
    model.check(&file);
}

#[test]
fn a_file_erased_at_the_end_is_not_reported_as_left_by_an_earlier_run() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("backing");
    let file = BackingFile::open(&path).unwrap();
    Model::default().write(&file, &Rng(79).batch(8)).unwrap();
    file.erase();
    drop(file);

    let file = BackingFile::open(&path).unwrap();

    let opened = file.opened().unwrap();
    assert!(
        matches!(
            opened.earlier_run,
            Some(EarlierRun::File { disk_bytes: 0, .. })
        ),
        "{opened:?}"
    );
    assert_eq!(opened.earlier_run_message(), None);
}

#[test]
fn erasing_a_file_whose_punch_and_discard_fail_says_why() {
    let (file, faults, _mem) = memory_file(None);
    Model::default().write(&file, &Rng(83).batch(8)).unwrap();
    faults.set_punch_error(Some(libc::EIO));

    let erasure = file.erase();

    assert_eq!(
        erasure,
        Erasure::Failed {
            bytes: erasure_bytes(erasure),
            punch: libc::EIO,
            discard: libc::EOPNOTSUPP
        }
    );
    assert!(!erasure.erased());
    let sentence = erasure.to_string();
    assert!(
        sentence.contains("could not erase") && sentence.contains("stays there"),
        "{sentence}"
    );
    assert_eq!(
        BackingFile::with_io(Box::new(MemIo::new()), None).erase(),
        Erasure::Nothing
    );
}

fn erasure_bytes(erasure: Erasure) -> u64 {
    match erasure {
        Erasure::Nothing => 0,
        Erasure::Punched { bytes }
        | Erasure::Discarded { bytes }
        | Erasure::Failed { bytes, .. } => bytes,
    }
}

#[test]
fn a_device_an_earlier_run_wrote_is_erased_at_start_and_at_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let Some(device) = prepared_device(dir.path(), 64, &|_| {}) else {
        return;
    };
    let after_header = |device: &LoopDevice| first_mib(&device.0)[BLOCK_SIZE..].to_vec();
    let file = BackingFile::open(&device.0).unwrap();
    Model::default().write(&file, &Rng(89).batch(16)).unwrap();
    drop(file);
    assert!(after_header(&device).iter().any(|&b| b != 0));

    let file = BackingFile::open(&device.0).unwrap();

    let opened = file.opened().unwrap().clone();
    let Some(EarlierRun::Device { erased }) = opened.earlier_run else {
        panic!("{opened:?}");
    };
    let message = opened.earlier_run_message().unwrap();
    assert!(message.contains(&erased.to_string()), "{message}");
    if !erased.erased() {
        println!("SKIPPED: the loop device could not be erased: {erased}");
        return;
    }
    assert!(
        matches!(erased, Erasure::Discarded { .. })
            || after_header(&device).iter().all(|&b| b == 0),
        "{erased} left data"
    );
    assert_eq!(
        &first_mib(&device.0)[..16],
        b"vhost-user-zram\0",
        "the header stays"
    );
    Model::default().write(&file, &Rng(97).batch(16)).unwrap();
    let erased = file.erase();
    assert!(erased.erased(), "{erased}");
    if matches!(erased, Erasure::Punched { .. }) {
        assert!(
            after_header(&device).iter().all(|&b| b == 0),
            "{erased} left data"
        );
    }
}

#[test]
fn the_low_space_threshold_is_the_smaller_of_the_device_and_the_floor() {
    assert_eq!(low_space_threshold(16 << 20), 16 << 20);
    assert_eq!(low_space_threshold(LOW_SPACE_FLOOR), LOW_SPACE_FLOOR);
    assert_eq!(low_space_threshold(1 << 40), LOW_SPACE_FLOOR);
}

#[test]
fn a_backing_file_with_little_room_is_warned_about_in_one_sentence() {
    let opened = Opened {
        path: PathBuf::from("/srv/zram/backing"),
        resolved: PathBuf::from("/srv/zram/backing"),
        kind: BackingKind::RegularFile,
        direct: true,
        free_bytes: Some(3 << 20),
        earlier_run: None,
        overwritten: None,
    };

    let warning = opened.low_space_warning(1 << 30).unwrap();

    for part in [
        "/srv/zram/backing",
        "3.0 MiB free",
        "64.0 MiB",
        "stay in RAM",
    ] {
        assert!(warning.contains(part), "{part:?} not in {warning}");
    }
    assert_eq!(warning.matches(". ").count(), 0, "one sentence: {warning}");
    assert_eq!(
        opened.low_space_warning(2 << 20),
        None,
        "a 2 MiB device fits"
    );
    let roomy = Opened {
        free_bytes: Some(1 << 30),
        ..opened.clone()
    };
    assert_eq!(roomy.low_space_warning(1 << 40), None);
    let unknown = Opened {
        free_bytes: None,
        ..opened.clone()
    };
    assert_eq!(unknown.low_space_warning(1 << 40), None);
    let small_device = Opened {
        kind: BackingKind::BlockDevice(1 << 20),
        ..opened
    };
    assert!(small_device
        .low_space_warning(1 << 30)
        .unwrap()
        .contains("of room for pages"));
}
