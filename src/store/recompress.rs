// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Recompression and idle marking: zram's `recomp_algorithm`, `recompress` and `idle`.
//!
//! A store has one primary algorithm (every write uses it) and up to [`MAX_SECONDARY`]
//! secondary ones, by priority 1 to 3. A recompression pass walks the slot table and, for each
//! page its mode selects, decodes the page and tries the secondary algorithms in priority order,
//! skipping those of a priority not above the one already holding it; the first result that
//! lands in a *smaller size class* (and under the threshold, if one is given) replaces the
//! object, and the slot's priority bits record which algorithm holds it, so reads decode with
//! that codec. A page that every secondary algorithm failed to shrink gets the slot's
//! incompressible flag and is never tried again until it is rewritten. These are zram's rules
//! (`recompress_slot` in drivers/block/zram/zram_drv.c).
//!
//! Concurrency: each page is recompressed *under its slot lock*: decode, compress, allocate
//! (slot lock, then class lock: the allowed order) and swap, then unlock and free the old
//! object. A write or discard of the same page waits for that (one decompression and at most
//! three compressions, tens of microseconds) and then replaces the result, so it is never lost.
//! Compressing outside the lock and re-checking the entry would not be safe: a rewrite could
//! get the very same object number and size back from the allocator (ABA), and objects carry
//! no generation. Pending pages (not compressed yet), same-filled pages and empty slots are
//! skipped. Passes may run concurrently with each other and with every other operation.
//!
//! Idle marking: [`PageStore::mark_idle`] sets the slot's idle flag on every page that holds
//! data; a read or a write of the page clears it (a write installs a fresh entry; a read clears
//! it when it unlocks the slot, which stores the entry anyway, so it costs nothing). There is
//! no per-slot access time (the 8-byte slot has no room), so "idle for N seconds" is measured
//! by two marks: a page still flagged at a sweep was not touched since the previous sweep.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use log::warn;

use super::alloc::Segment;
use super::slot::{SlotEntry, MAX_SECONDARY};
use super::stats::{add, AlgorithmStat, RecompressStats};
use super::{
    class_of, compressed_bytes, holds_page, object_class, object_len, PageStore, SlotState,
    COMPRESS_SCRATCH, HUGE_THRESHOLD,
};
use crate::codec::{
    Algorithm, Codec, CodecError, DictionaryError, UnknownCodec, Zstd, ZstdDictionaries,
};
use crate::PAGE_SIZE;

/// An algorithm and its level: `zstd`, `zstd:level=9` (zram's `algorithm_params` form).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlgorithmSpec {
    /// The algorithm.
    pub algorithm: Algorithm,
    /// Its level (`None`: the algorithm's default).
    pub level: Option<i32>,
}

impl AlgorithmSpec {
    /// Builds the codec, checking the level.
    pub fn codec(self) -> Result<Box<dyn Codec>, UnknownCodec> {
        self.algorithm.codec(self.level)
    }

    /// Whether both specs compress alike: the same algorithm at the same level, a level left
    /// out meaning the algorithm's default (`zstd` is `zstd:level=1`).
    pub fn same_as(self, other: AlgorithmSpec) -> bool {
        self.algorithm == other.algorithm
            && self.level.or(self.algorithm.default_level())
                == other.level.or(other.algorithm.default_level())
    }
}

/// Checks the secondary algorithms of a store whose primary is `primary`, as the daemon's
/// `--recompress-algorithm` flags give them: at most [`MAX_SECONDARY`], none the same as the
/// primary (it cannot shrink what the primary made: every page would end up flagged
/// incompressible), and none given twice. The same algorithm at two levels (`zstd:level=1`,
/// then `zstd:level=19`) is allowed: cheap first, thorough later.
pub fn validate_secondaries(
    primary: AlgorithmSpec,
    secondaries: &[AlgorithmSpec],
) -> Result<(), RecompressError> {
    if secondaries.len() > MAX_SECONDARY {
        return Err(RecompressError::TooMany);
    }
    for (index, &spec) in secondaries.iter().enumerate() {
        if spec.same_as(primary) {
            return Err(RecompressError::SameAsPrimary(spec));
        }
        if secondaries[..index]
            .iter()
            .any(|&earlier| earlier.same_as(spec))
        {
            return Err(RecompressError::RepeatedSecondary(spec));
        }
    }
    Ok(())
}

impl fmt::Display for AlgorithmSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.level.or(self.algorithm.default_level()) {
            Some(level) => write!(f, "{}:level={level}", self.algorithm),
            None => write!(f, "{}", self.algorithm),
        }
    }
}

impl FromStr for AlgorithmSpec {
    type Err = RecompressError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut parts = text.split(':');
        let algorithm: Algorithm = parts.next().unwrap_or_default().trim().parse()?;
        let mut level = None;
        for param in parts {
            let Some(("level", value)) = param.split_once('=') else {
                return Err(RecompressError::BadAlgorithmParameter(param.to_owned()));
            };
            if level.is_some() {
                return Err(RecompressError::RepeatedAlgorithmParameter(
                    text.chars().take(64).collect(),
                ));
            }
            level = Some(
                value
                    .trim()
                    .parse()
                    .map_err(|_| RecompressError::BadValue {
                        name: "level",
                        value: value.to_owned(),
                    })?,
            );
        }
        let spec = AlgorithmSpec { algorithm, level };
        spec.codec()?;
        Ok(spec)
    }
}

/// Which pages a pass considers (zram's `type=`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RecompressMode {
    /// Every compressed or huge page (no `type=`).
    #[default]
    All,
    /// Pages with the idle flag (`type=idle`).
    Idle,
    /// Huge pages (`type=huge`).
    Huge,
    /// Huge pages with the idle flag (`type=huge_idle`).
    HugeIdle,
}

impl RecompressMode {
    const ALL: [RecompressMode; 4] = [
        RecompressMode::All,
        RecompressMode::Idle,
        RecompressMode::Huge,
        RecompressMode::HugeIdle,
    ];

    /// The `type=` word.
    pub fn name(self) -> &'static str {
        match self {
            RecompressMode::All => "all",
            RecompressMode::Idle => "idle",
            RecompressMode::Huge => "huge",
            RecompressMode::HugeIdle => "huge_idle",
        }
    }

    fn wants_idle(self) -> bool {
        match self {
            RecompressMode::Idle | RecompressMode::HugeIdle => true,
            RecompressMode::All | RecompressMode::Huge => false,
        }
    }

    fn wants_huge(self) -> bool {
        match self {
            RecompressMode::Huge | RecompressMode::HugeIdle => true,
            RecompressMode::All | RecompressMode::Idle => false,
        }
    }
}

/// Which secondary algorithms a pass may use (zram's `algo=` / `priority=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecompressTarget {
    /// Only the secondary algorithm with this name.
    Algorithm(Algorithm),
    /// Only the secondary algorithm of this priority (1 to 3).
    Priority(usize),
}

/// One recompression request: `recompress type=idle threshold=3000 max_pages=1000 algo=zstd`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecompressRequest {
    /// Which pages.
    pub mode: RecompressMode,
    /// Only objects of at least this many bytes, and only results below it (0: any).
    pub threshold: usize,
    /// Stop after trying this many pages (`None`: no limit).
    pub max_pages: Option<u64>,
    /// One secondary algorithm only (`None`: all, in priority order).
    pub target: Option<RecompressTarget>,
}

impl fmt::Display for RecompressRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "type={}", self.mode.name())?;
        if self.threshold != 0 {
            write!(f, " threshold={}", self.threshold)?;
        }
        if let Some(max) = self.max_pages {
            write!(f, " max_pages={max}")?;
        }
        match self.target {
            Some(RecompressTarget::Algorithm(algorithm)) => write!(f, " algo={algorithm}"),
            Some(RecompressTarget::Priority(priority)) => write!(f, " priority={priority}"),
            None => Ok(()),
        }
    }
}

impl FromStr for RecompressRequest {
    type Err = RecompressError;

    /// Parses zram's `key=value` words, separated by spaces.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut request = RecompressRequest::default();
        let mut given: Vec<&str> = Vec::new();
        for word in text.split_whitespace() {
            let (name, value) = word
                .split_once('=')
                .ok_or_else(|| RecompressError::BadParameter(word.chars().take(64).collect()))?;
            if given.contains(&name) {
                return Err(RecompressError::RepeatedParameter(
                    name.chars().take(64).collect(),
                ));
            }
            if (name == "algo" && given.contains(&"priority"))
                || (name == "priority" && given.contains(&"algo"))
            {
                return Err(RecompressError::AlgoAndPriority);
            }
            let bad = |name| RecompressError::BadValue {
                name,
                value: value.chars().take(64).collect(),
            };
            match name {
                "type" => {
                    request.mode = RecompressMode::ALL
                        .into_iter()
                        .find(|mode| mode.name() == value)
                        .ok_or_else(|| bad("type"))?;
                }
                "threshold" => {
                    request.threshold = value
                        .parse()
                        .ok()
                        .filter(|&t| t <= PAGE_SIZE)
                        .ok_or_else(|| bad("threshold"))?;
                }
                "max_pages" => {
                    request.max_pages = Some(
                        value
                            .parse()
                            .ok()
                            .filter(|&n| n > 0)
                            .ok_or_else(|| bad("max_pages"))?,
                    );
                }
                "algo" => {
                    let algorithm = value.parse().map_err(|_| bad("algo"))?;
                    request.target = Some(RecompressTarget::Algorithm(algorithm));
                }
                "priority" => {
                    let priority = value
                        .parse()
                        .ok()
                        .filter(|p| (1..=MAX_SECONDARY).contains(p))
                        .ok_or_else(|| bad("priority"))?;
                    request.target = Some(RecompressTarget::Priority(priority));
                }
                _ => {
                    return Err(RecompressError::BadParameter(
                        word.chars().take(64).collect(),
                    ))
                }
            }
            given.push(name);
        }
        Ok(request)
    }
}

/// What a pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecompressOutcome {
    /// Pages a secondary algorithm tried to shrink.
    pub tried: u64,
    /// Pages replaced by a smaller object.
    pub recompressed: u64,
    /// Compressed bytes saved.
    pub bytes_saved: u64,
    /// Pages newly marked incompressible.
    pub incompressible: u64,
    /// Pages of memory the pass gave back to the host: the compaction that ends a pass that
    /// replaced objects (the old objects leave holes in their chunks, the new ones fill others).
    pub pages_given_back: u64,
    /// Whether the pass stopped early because its pacing callback asked it to.
    pub stopped: bool,
}

impl fmt::Display for RecompressOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tried {} pages, recompressed {}, saved {} bytes, {} incompressible, gave back {} \
             pages",
            self.tried,
            self.recompressed,
            self.bytes_saved,
            self.incompressible,
            self.pages_given_back
        )
    }
}

/// Errors of recompression requests and configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecompressError {
    /// The store has no secondary algorithm.
    #[error(
        "no recompression algorithm is configured; start the daemon with --recompress-algorithm"
    )]
    NoSecondary,
    /// More than three secondary algorithms.
    #[error("at most {MAX_SECONDARY} recompression algorithms can be given")]
    TooMany,
    /// `algo=` names an algorithm that is not a secondary one of this store.
    #[error("{0} is not a recompression algorithm of this device")]
    NotSecondary(Algorithm),
    /// `priority=` names a priority with no algorithm.
    #[error("no recompression algorithm has priority {0}")]
    NoSuchPriority(usize),
    /// A word that is not one of the parameters.
    #[error("'{0}' is not a recompress parameter; give type=, threshold=, max_pages=, algo= or priority=")]
    BadParameter(String),
    /// A `key=` given twice in one request.
    #[error("'{0}=' is given more than once; give each parameter once")]
    RepeatedParameter(String),
    /// Both `algo=` and `priority=`.
    #[error("give algo= or priority=, not both: each names the one algorithm to use")]
    AlgoAndPriority,
    /// `algo=` names a secondary algorithm that several priorities use (at other levels).
    #[error(
        "algo={0} names recompression algorithms {1:?} (by priority); give priority= to choose one"
    )]
    AmbiguousAlgorithm(Algorithm, Vec<usize>),
    /// `level=` twice in one algorithm.
    #[error("'{0}' gives the level more than once; give level=N once")]
    RepeatedAlgorithmParameter(String),
    /// A secondary algorithm that is the primary one.
    #[error(
        "{0} is the device's own algorithm; a recompression algorithm must differ from it \
         (another algorithm, or another level) to shrink what it made"
    )]
    SameAsPrimary(AlgorithmSpec),
    /// The same secondary algorithm twice.
    #[error("the recompression algorithm {0} is given more than once; give each once")]
    RepeatedSecondary(AlgorithmSpec),
    /// An algorithm parameter other than `level=`.
    #[error("'{0}' is not an algorithm parameter; give level=N")]
    BadAlgorithmParameter(String),
    /// A parameter's value is not valid.
    #[error("'{value}' is not a valid value for {name}")]
    BadValue {
        /// The parameter.
        name: &'static str,
        /// The value given.
        value: String,
    },
    /// The algorithm or level does not exist.
    #[error(transparent)]
    Codec(#[from] UnknownCodec),
    /// A `train-dict` word that is not `samples=16..` or `size=1024..`.
    #[error(
        "'{0}' is not a train-dict parameter; give samples=16..{MAX_TRAIN_SAMPLES} or \
         size=1024..1048576"
    )]
    BadTrainParameter(String),
    /// The memory limit has no room for the training's samples.
    #[error(
        "training on {samples} pages needs {bytes} bytes for the samples, which the memory \
         limit has no room for; give fewer samples= or raise the limit"
    )]
    TrainingMemory {
        /// The pages sampled.
        samples: usize,
        /// The bytes they need.
        bytes: u64,
    },
    /// The OS refused the samples' memory.
    #[error("cannot map {0} bytes for the training's samples")]
    TrainingMap(u64),
    /// The store has no zstd algorithm to use a dictionary.
    #[error("no algorithm of this device is zstd, so a zstd dictionary would not be used")]
    NoZstd,
    /// Too few compressible pages to train on.
    #[error(
        "only {0} compressible pages are stored; at least 16 are needed to train a dictionary"
    )]
    TooFewSamples(usize),
    /// The dictionary could not be trained or loaded.
    #[error(transparent)]
    Dictionary(#[from] DictionaryError),
    /// The dictionary could not be kept in the state file (what the file said).
    #[error("{0}; the dictionary was not loaded")]
    State(String),
}

/// The secondary algorithms of a store, and the zstd dictionaries all its zstd codecs share.
#[derive(Debug)]
pub(crate) struct Recompression {
    /// The primary algorithm (priority 0).
    primary: AlgorithmSpec,
    /// `codecs[p - 1]` holds the pages of priority `p`.
    pub(super) codecs: Box<[Box<dyn Codec>]>,
    /// Names by priority, the primary's first.
    names: Box<[String]>,
    /// The secondary algorithms, by priority (the first is 1).
    pub(crate) specs: Box<[AlgorithmSpec]>,
    /// Whether any algorithm (primary or secondary) is zstd.
    has_zstd: bool,
    pub(super) dictionaries: Arc<ZstdDictionaries>,
    /// Held while a dictionary is trained: one training at a time, so its samples are
    /// bounded by [`MAX_TRAIN_SAMPLES`] pages.
    training: Mutex<()>,
    /// Bytes of the samples of the training under way (part of `mem_used_total`).
    training_bytes: AtomicU64,
}

impl Recompression {
    pub(crate) fn new(
        primary: AlgorithmSpec,
        dictionaries: Arc<ZstdDictionaries>,
    ) -> Recompression {
        Recompression {
            primary,
            codecs: Box::new([]),
            names: Box::new([primary.to_string()]),
            specs: Box::new([]),
            has_zstd: primary.algorithm == Algorithm::Zstd,
            dictionaries,
            training: Mutex::new(()),
            training_bytes: AtomicU64::new(0),
        }
    }

    /// The algorithms by priority as their names show them (`zstd:level=3`), the primary's
    /// first: what a migration's two sides compare.
    pub(crate) fn algorithm_names(&self) -> &[String] {
        &self.names
    }

    /// Bytes of the zstd dictionaries, and of the samples of a dictionary being trained while
    /// it is (part of `mem_used_total`).
    pub(crate) fn dictionary_bytes(&self) -> u64 {
        self.dictionaries.bytes() + self.training_bytes.load(Ordering::Relaxed)
    }
}

/// The codec for `spec`; a zstd codec shares the store's dictionaries.
pub(crate) fn build_codec(
    spec: AlgorithmSpec,
    dictionaries: &Arc<ZstdDictionaries>,
) -> Result<Box<dyn Codec>, UnknownCodec> {
    let codec = spec.codec()?;
    if spec.algorithm == Algorithm::Zstd {
        let level = spec.level.or(spec.algorithm.default_level()).unwrap_or(1);
        return Ok(Box::new(Zstd::with_dictionaries(
            level,
            Arc::clone(dictionaries),
        )));
    }
    Ok(codec)
}

/// The most pages one dictionary training samples: 64 MiB of samples, the bound on its
/// memory.
pub const MAX_TRAIN_SAMPLES: usize = 16384;

/// Counts a training's sample bytes in `mem_used_total` until dropped.
struct TrainingBytes<'a> {
    counter: &'a AtomicU64,
    bytes: u64,
}

impl<'a> TrainingBytes<'a> {
    fn count(counter: &'a AtomicU64, bytes: u64) -> Self {
        counter.fetch_add(bytes, Ordering::Relaxed);
        TrainingBytes { counter, bytes }
    }
}

impl Drop for TrainingBytes<'_> {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// `train-dict [samples=N] [size=BYTES]`: how to train a zstd dictionary from stored pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainRequest {
    /// The most pages sampled (spread evenly over the device).
    pub samples: usize,
    /// The dictionary's size in bytes.
    pub size: usize,
}

impl Default for TrainRequest {
    fn default() -> Self {
        TrainRequest {
            samples: 8192,
            size: 16 << 10,
        }
    }
}

impl fmt::Display for TrainRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "samples={} size={}", self.samples, self.size)
    }
}

impl FromStr for TrainRequest {
    type Err = RecompressError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut request = TrainRequest::default();
        let mut given: Vec<&str> = Vec::new();
        for word in text.split_whitespace() {
            let bad = || RecompressError::BadTrainParameter(word.chars().take(64).collect());
            let (name, value) = word.split_once('=').ok_or_else(bad)?;
            if given.contains(&name) {
                return Err(RecompressError::RepeatedParameter(
                    name.chars().take(64).collect(),
                ));
            }
            given.push(name);
            let value: usize = value.parse().map_err(|_| bad())?;
            match name {
                "samples" if (16..=MAX_TRAIN_SAMPLES).contains(&value) => request.samples = value,
                "size" if (1024..=crate::codec::MAX_DICTIONARY_BYTES).contains(&value) => {
                    request.size = value
                }
                _ => return Err(bad()),
            }
        }
        Ok(request)
    }
}

/// A dictionary trained by [`PageStore::train_zstd_dictionary`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainedDictionary {
    /// Its zstd ID.
    pub id: u32,
    /// Its size in bytes.
    pub bytes: usize,
    /// The pages it was trained on.
    pub samples: usize,
}

impl fmt::Display for TrainedDictionary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "trained zstd dictionary {} of {} bytes from {} pages; new and recompressed zstd \
             pages use it",
            self.id, self.bytes, self.samples
        )
    }
}

/// What recompressing one slot did.
enum SlotOutcome {
    /// Not selected (state, flags, threshold), or no algorithm above its priority to try.
    Skipped,
    /// No algorithm shrank it; `marked` when it is now flagged incompressible.
    Kept { marked: bool },
    /// Replaced; the compressed bytes saved.
    Replaced { saved: u64 },
}

impl PageStore {
    /// This store with `specs` as its secondary algorithms, by priority (the first is 1).
    /// Call before sharing the store.
    pub fn with_secondary_algorithms(
        mut self,
        specs: &[AlgorithmSpec],
    ) -> Result<PageStore, RecompressError> {
        validate_secondaries(self.recompression.primary, specs)?;
        let dictionaries = &self.recompression.dictionaries;
        let codecs = specs
            .iter()
            .map(|&spec| build_codec(spec, dictionaries))
            .collect::<Result<Vec<_>, _>>()?;
        let mut names = vec![self.recompression.names[0].clone()];
        names.extend(specs.iter().map(ToString::to_string));
        self.recompression.has_zstd |= specs.iter().any(|s| s.algorithm == Algorithm::Zstd);
        self.recompression.codecs = codecs.into_boxed_slice();
        self.recompression.names = names.into_boxed_slice();
        self.recompression.specs = specs.into();
        Ok(self)
    }

    /// Loads a zstd-format dictionary (zram's `dict=`); new and recompressed zstd pages use it
    /// from now on. Returns its ID.
    pub fn load_zstd_dictionary(&self, raw: &[u8]) -> Result<u32, RecompressError> {
        if !self.recompression.has_zstd {
            return Err(RecompressError::NoZstd);
        }
        // With a state file the dictionary is in the file before any page can use it.
        self.persist_dictionary(raw)
            .map_err(|e| RecompressError::State(e.to_string()))?;
        let id = self.recompression.dictionaries.add(raw)?;
        self.counters.note_mem_used(self.mem_used_total());
        Ok(id)
    }

    /// Trains a zstd dictionary on up to `request.samples` compressed pages spread evenly over
    /// the device and loads it. Reads each sample under its slot lock, one at a time; the
    /// training itself (zstd's fastCover) runs with no lock held.
    ///
    /// Memory: the samples go into one anonymous mapping of `samples` pages (at most
    /// [`MAX_TRAIN_SAMPLES`], 64 MiB), counted in `mem_used_total` and checked against the
    /// memory limit while it lives, and unmapped at the end, so it is given back to the OS
    /// whole (4 KiB samples from malloc stayed in its arenas: ~60 MiB after a training of
    /// 16384). One training runs at a time. zstd's own tables (a few MiB) are not counted.
    pub fn train_zstd_dictionary(
        &self,
        request: &TrainRequest,
    ) -> Result<TrainedDictionary, RecompressError> {
        if !self.recompression.has_zstd {
            return Err(RecompressError::NoZstd);
        }
        let _one_at_a_time = self
            .recompression
            .training
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let wanted = request.samples.min(MAX_TRAIN_SAMPLES);
        let bytes = (wanted * PAGE_SIZE) as u64;
        if !self.may_grow(bytes) {
            return Err(RecompressError::TrainingMemory {
                samples: wanted,
                bytes,
            });
        }
        let buffer =
            Segment::map(wanted * PAGE_SIZE).map_err(|_| RecompressError::TrainingMap(bytes))?;
        let counted = TrainingBytes::count(&self.recompression.training_bytes, bytes);
        self.counters.note_mem_used(self.mem_used_total());
        // SAFETY: the segment is a fresh private mapping of `wanted * PAGE_SIZE` readable and
        // writable bytes that only this slice refers to; it outlives the slice (`buffer` is
        // dropped at the end of this function, after the last use of `samples`).
        let samples = unsafe { std::slice::from_raw_parts_mut(buffer.base(), wanted * PAGE_SIZE) };
        let taken = self.take_samples(wanted, samples);
        if taken < 16 {
            return Err(RecompressError::TooFewSamples(taken));
        }
        let sizes = vec![PAGE_SIZE; taken];
        let raw = zstd::dict::from_continuous(&samples[..taken * PAGE_SIZE], &sizes, request.size)
            .map_err(|e| DictionaryError::Zstd(e.to_string()))?;
        drop(counted);
        drop(buffer);
        let id = self.load_zstd_dictionary(&raw)?;
        Ok(TrainedDictionary {
            id,
            bytes: raw.len(),
            samples: taken,
        })
    }

    /// Decodes up to `wanted` compressed or pending pages, spread evenly over the device, into
    /// consecutive pages of `samples`; returns how many it took.
    fn take_samples(&self, wanted: usize, samples: &mut [u8]) -> usize {
        let compressible = (0..=MAX_SECONDARY)
            .map(|p| self.counters.sum(|c| &c.algorithm_pages[p]))
            .sum::<u64>()
            + self.pending_pages();
        let stride = usize::try_from(compressible / wanted.max(1) as u64)
            .unwrap_or(usize::MAX)
            .max(1);
        let mut taken = 0;
        let mut seen = 0usize;
        let mut page = [0u8; PAGE_SIZE];
        for slot in self.slots.touched_slots(0..self.slots.len()) {
            if taken >= wanted {
                break;
            }
            let wanted_state = |entry: SlotEntry| match entry.state() {
                SlotState::Compressed | SlotState::Pending | SlotState::Unit => true,
                SlotState::Empty
                | SlotState::SameFilled
                | SlotState::Huge
                | SlotState::WrittenBack
                | SlotState::Invalid => false,
            };
            if !self.slots.peek(slot).is_some_and(wanted_state) {
                continue;
            }
            seen += 1;
            if !seen.is_multiple_of(stride) {
                continue;
            }
            let guard = self.lock(slot);
            let entry = guard.entry();
            let read = wanted_state(entry) && self.decode(slot as u64, entry, &mut page).is_ok();
            drop(guard);
            if read {
                samples[taken * PAGE_SIZE..][..PAGE_SIZE].copy_from_slice(&page);
                taken += 1;
            }
        }
        taken
    }

    /// The number of secondary algorithms.
    pub fn secondary_count(&self) -> usize {
        self.recompression.codecs.len()
    }

    /// The codec that holds pages of `priority`.
    pub(super) fn codec_of(&self, priority: usize) -> Result<&dyn Codec, CodecError> {
        match priority {
            0 => Ok(&*self.codec),
            p => self
                .recompression
                .codecs
                .get(p - 1)
                .map(|codec| &**codec)
                .ok_or_else(|| {
                    CodecError::Corrupt(format!(
                        "the page names recompression algorithm {p}, which this store lacks"
                    ))
                }),
        }
    }

    /// Sets the idle flag of every page that holds data (zram's `echo all > idle`). Returns
    /// the pages newly marked. A read or write of a page clears its flag.
    pub fn mark_idle(&self) -> u64 {
        let mut marked = 0;
        for slot in self.slots.touched_slots(0..self.slots.len()) {
            let Some(entry) = self.slots.peek(slot) else {
                break;
            };
            if !holds_page(entry) || entry.is_idle() {
                continue;
            }
            let mut guard = self.lock(slot);
            let entry = guard.entry();
            if holds_page(entry) && !entry.is_idle() {
                guard.set_flags(entry.with_idle(true));
                marked += 1;
            }
        }
        add(&self.counters.local().marked_idle, marked);
        marked
    }

    /// The number of pages whose idle flag is set (walks the slot table).
    pub fn idle_pages(&self) -> u64 {
        self.slots
            .touched_slots(0..self.slots.len())
            .filter_map(|slot| self.slots.peek(slot))
            .filter(|entry| entry.is_idle())
            .count() as u64
    }

    /// Runs one recompression pass (zram's `recompress`) over the whole device.
    pub fn recompress(
        &self,
        request: &RecompressRequest,
    ) -> Result<RecompressOutcome, RecompressError> {
        self.recompress_paced(request, &mut || true)
    }

    /// Runs one recompression pass, calling `pace` before each page it tries (never with a
    /// slot locked); the pass stops when `pace` returns `false`. The background recompressor
    /// rate-limits and stops through it.
    pub fn recompress_paced(
        &self,
        request: &RecompressRequest,
        pace: &mut dyn FnMut() -> bool,
    ) -> Result<RecompressOutcome, RecompressError> {
        let count = self.recompression.codecs.len();
        if count == 0 {
            return Err(RecompressError::NoSecondary);
        }
        // Priorities lo..hi are tried.
        let (lo, hi) = match request.target {
            None => (1, count + 1),
            Some(RecompressTarget::Priority(p)) if (1..=count).contains(&p) => (p, p + 1),
            Some(RecompressTarget::Priority(p)) => return Err(RecompressError::NoSuchPriority(p)),
            Some(RecompressTarget::Algorithm(algorithm)) => {
                let priorities: Vec<usize> = (1..=count)
                    .filter(|&p| self.recompression.codecs[p - 1].algorithm() == algorithm)
                    .collect();
                match priorities[..] {
                    [] => return Err(RecompressError::NotSecondary(algorithm)),
                    [p] => (p, p + 1),
                    _ => return Err(RecompressError::AmbiguousAlgorithm(algorithm, priorities)),
                }
            }
        };
        let mut outcome = RecompressOutcome::default();
        let mut budget = request.max_pages;
        for slot in self.slots.touched_slots(0..self.slots.len()) {
            if budget == Some(0) {
                break;
            }
            let Some(entry) = self.slots.peek(slot) else {
                break;
            };
            if selected_unit(entry, request, hi) {
                if !pace() {
                    outcome.stopped = true;
                    break;
                }
                // A unit is recompressed whole, from its first member.
                self.recompress_unit(slot, request, lo, hi, &mut outcome);
                budget = budget.map(|n| n.saturating_sub(1));
                continue;
            }
            if !selected(entry, request, hi) {
                continue;
            }
            if !pace() {
                outcome.stopped = true;
                break;
            }
            // The counters move page by page, so a long, paced pass shows its progress.
            let c = self.counters.local();
            match self.recompress_slot(slot, request, lo, hi) {
                SlotOutcome::Skipped => continue,
                SlotOutcome::Kept { marked } => {
                    outcome.incompressible += u64::from(marked);
                    add(&c.recompress_incompressible, u64::from(marked));
                }
                SlotOutcome::Replaced { saved } => {
                    outcome.recompressed += 1;
                    outcome.bytes_saved += saved;
                    add(&c.recompressed, 1);
                    add(&c.recompress_saved, saved);
                }
            }
            outcome.tried += 1;
            add(&c.recompress_tried, 1);
            budget = budget.map(|n| n - 1);
        }
        add(&self.counters.local().recompress_passes, 1);
        // The memory the pass freed goes back to the host before it returns. A pass never
        // raises mem_used_max: its peak is the guest's data moving, not the guest writing.
        if outcome.recompressed > 0 {
            outcome.pages_given_back = self.compact();
        }
        Ok(outcome)
    }

    /// Recompresses one page under its slot lock with the algorithms of priorities `lo..hi`.
    fn recompress_slot(
        &self,
        slot: usize,
        request: &RecompressRequest,
        lo: usize,
        hi: usize,
    ) -> SlotOutcome {
        let mut guard = self.lock(slot);
        let old = guard.entry();
        if !selected(old, request, hi) {
            return SlotOutcome::Skipped;
        }
        let mut page = [0u8; PAGE_SIZE];
        if let Err(error) = self.decode(slot as u64, old, &mut page) {
            drop(guard);
            warn!("recompression skipped a page it cannot read: {error}");
            return SlotOutcome::Skipped;
        }
        let old_class = object_class(old).unwrap_or(usize::MAX);
        let mut tried = 0;
        let mut refused = false;
        let new = COMPRESS_SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            for priority in lo.max(old.priority() + 1)..hi {
                let codec = &self.recompression.codecs[priority - 1];
                tried += 1;
                let Ok(len) = codec.compress(&page, &mut scratch[..]) else {
                    continue;
                };
                let smaller = (1..=HUGE_THRESHOLD).contains(&len)
                    && class_of(len) < old_class
                    && (request.threshold == 0 || len < request.threshold);
                if !smaller {
                    continue;
                }
                // Allocating under the slot lock keeps the lock order (slot, then class). A
                // refusal by the memory limit leaves the page as it is, not marked.
                let stored = self.store_object(&page, &scratch[..], Some(len));
                refused = stored.is_err();
                return stored.ok().map(|entry| {
                    // Recompression is not an access: the page keeps its idle flag and age.
                    entry
                        .with_priority(priority)
                        .with_idle(old.is_idle())
                        .with_age(old.age())
                });
            }
            None
        });
        match new {
            Some(new) => {
                let swapped = guard.swap(new);
                drop(guard);
                self.account_swap(swapped, new);
                SlotOutcome::Replaced {
                    saved: compressed_bytes(old).saturating_sub(compressed_bytes(new)),
                }
            }
            None if tried == 0 => SlotOutcome::Skipped,
            None => {
                // zram marks the page only when every secondary algorithm failed on it.
                let marked = !refused && tried == self.recompression.codecs.len();
                if marked {
                    guard.set_flags(old.with_incompressible(true));
                }
                SlotOutcome::Kept { marked }
            }
        }
    }

    /// The recompression section of the statistics.
    pub(super) fn recompress_stats(&self) -> RecompressStats {
        let c = &self.counters;
        RecompressStats {
            algorithms: self
                .recompression
                .names
                .iter()
                .enumerate()
                .map(|(priority, name)| AlgorithmStat {
                    priority: priority as u64,
                    name: name.clone(),
                    pages: c.sum(|c| &c.algorithm_pages[priority]),
                    compr_bytes: c.sum(|c| &c.algorithm_bytes[priority]),
                })
                .collect(),
            pages_tried: c.sum(|c| &c.recompress_tried),
            pages_recompressed: c.sum(|c| &c.recompressed),
            bytes_saved: c.sum(|c| &c.recompress_saved),
            pages_incompressible: c.sum(|c| &c.recompress_incompressible),
            passes: c.sum(|c| &c.recompress_passes),
            pages_marked_idle: c.sum(|c| &c.marked_idle),
            zstd_dictionaries: self.recompression.dictionaries.ids(),
            zstd_dictionary: self.recompression.dictionaries.current(),
            dictionary_bytes: self.recompression.dictionaries.bytes(),
        }
    }

    /// Checks a slot's priority bits: 0 outside Compressed, and naming an algorithm the store
    /// has.
    pub(super) fn check_priority(&self, slot: usize, entry: SlotEntry) -> Result<(), String> {
        let priority = entry.priority();
        let valid = match entry.state() {
            SlotState::Compressed | SlotState::Unit => priority <= self.recompression.codecs.len(),
            // A raw page written back has priority 0; a compressed object keeps its algorithm.
            SlotState::WrittenBack => match entry.backing_object().1 {
                crate::PAGE_SIZE => priority == 0,
                _ => priority <= self.recompression.codecs.len(),
            },
            SlotState::Empty
            | SlotState::SameFilled
            | SlotState::Huge
            | SlotState::Pending
            | SlotState::Invalid => priority == 0,
        };
        if valid {
            Ok(())
        } else {
            Err(format!(
                "slot {slot} in state {:?} names priority {priority}, but the store has {} \
                 recompression algorithms",
                entry.state(),
                self.recompression.codecs.len()
            ))
        }
    }
}

/// Whether a pass looks at the unit of this member: not flagged incompressible, idle if the
/// mode asks, held by an algorithm below priority `hi - 1`; huge modes take no units (a unit
/// is never raw). The whole unit must pass under its locks (`recompress_unit`).
pub(super) fn selected_unit(entry: SlotEntry, request: &RecompressRequest, hi: usize) -> bool {
    entry.state() == SlotState::Unit
        && !entry.is_incompressible()
        && (!request.mode.wants_idle() || entry.is_idle())
        && !request.mode.wants_huge()
        && entry.priority() + 1 < hi
}

/// Whether a pass selects this entry (zram's filters in `recompress_store`): compressed or huge,
/// not flagged incompressible, idle or huge as the mode asks, at least `threshold` bytes, and
/// held by an algorithm below priority `hi - 1`.
fn selected(entry: SlotEntry, request: &RecompressRequest, hi: usize) -> bool {
    let state = entry.state();
    let stored = match state {
        SlotState::Compressed | SlotState::Huge => true,
        // A unit is recompressed whole (`recompress_units`), not page by page.
        SlotState::Empty
        | SlotState::SameFilled
        | SlotState::WrittenBack
        | SlotState::Pending
        | SlotState::Unit
        | SlotState::Invalid => false,
    };
    stored
        && !entry.is_incompressible()
        && (!request.mode.wants_idle() || entry.is_idle())
        && (!request.mode.wants_huge() || state == SlotState::Huge)
        && object_len(entry) >= request.threshold
        && entry.priority() + 1 < hi
}

#[cfg(test)]
#[path = "recompress_tests.rs"]
mod tests;
