// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The state file: the store's memory in one shared, sparse file that outlives the process.
//!
//! With a state file the slot table, the pending pool, the zstd dictionaries and every chunk
//! of the slab allocator live in one file on tmpfs or hugetlbfs (or a memfd that systemd keeps
//! in its file descriptor store), mapped `MAP_SHARED`. A store built on it writes its pages to
//! the file's page cache with ordinary stores, so a killed process loses nothing a store
//! instruction completed; a new process maps the same file and recovers (DESIGN.md, "State
//! file" and "Crash rules").
//!
//! Layout (every region aligned to [`REGION_ALIGN`], 2 MiB, so the file also works on
//! hugetlbfs):
//!
//! ```text
//! 0            header copy A (page 0), header copy B (page 1)
//! 2 MiB        slot table: 8 bytes a page
//! ...          pending pool: 4 KiB a buffer
//! ...          zstd dictionaries: committed count (u64), then records
//! ...          segment directory: 8 bytes an extent
//! ...          slab area: `max_extents` extents of EXTENT_BYTES (2 MiB) each
//! ...          fill words: 8 bytes a page, the words of the `FillWords` table by index
//! ```
//!
//! The header is copied in through a shared mapping (hugetlbfs has no `write`), into the older
//! copy each time with the sequence number one higher, so a kill during an update leaves the
//! other copy valid; the newest copy whose CRC-32 checks wins.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::PAGE_SIZE;

/// The format this build writes and reads.
///
/// Format 2 added the fill-word region (and the header bytes that place it); a file of
/// format 1 is refused untouched like any other format. Format 3 added the Unit slot state
/// (multi-page units, `store/unit.rs`): a format-2 file is a format-3 file without units, so
/// this build opens it and rewrites its header as format 3 at once, before any unit can be
/// stored (a build of format 2 then refuses it, rather than reading units as damaged pages).
pub const FORMAT_VERSION: u32 = 3;
/// The older format this build opens and upgrades in place.
pub const UPGRADABLE_FORMAT: u32 = 2;
/// The first bytes of each header copy.
pub const MAGIC: [u8; 8] = *b"VUZSTATE";
/// Every region starts at a multiple of this (a huge page).
pub const REGION_ALIGN: u64 = 2 << 20;
/// The size of one slab extent: one allocator segment.
pub const EXTENT_BYTES: u64 = 2 << 20;
/// The size of the zstd dictionary region.
pub const DICTIONARY_REGION_BYTES: u64 = 64 << 20;
/// `statfs` magic of tmpfs (and of a memfd).
pub const TMPFS_MAGIC: i64 = 0x0102_1994;
/// `statfs` magic of hugetlbfs.
pub const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// The bytes of a header covered by its CRC; the CRC follows them.
const HEADER_BYTES: usize = 1024;
/// [`HEADER_BYTES`] as the header records it.
const HEADER_BYTES_U32: u32 = 1024;
const _: () = assert!(HEADER_BYTES_U32 as usize == HEADER_BYTES);
/// Offset of each header copy.
const COPY_OFFSET: [u64; 2] = [0, PAGE_SIZE as u64];

/// The process that was the frontend when the state was last served (a VMM's pid and its
/// start time, from `/proc/PID/stat`), so a restarted daemon serves the same VM again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrontendIdentity {
    /// The frontend's process id.
    pub pid: u32,
    /// Its start time, in clock ticks after boot.
    pub start_time: u64,
}

/// The backing file a state file's pages may lie on: enough to reopen it as it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingRecord {
    /// The path it was opened at.
    pub path: PathBuf,
    /// The key its records are checksummed with.
    pub key: u64,
    /// Its st_dev.
    pub dev: u64,
    /// Its st_ino.
    pub ino: u64,
}

/// The most bytes of a backing file's path the header holds.
pub const MAX_BACKING_PATH: usize = BACKING_PATH_END - 288;
/// Where the backing file's path ends in the header (the fill-word region's fields follow).
const BACKING_PATH_END: usize = 512;

/// One algorithm as the header records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlgorithmRecord {
    /// Its name (`lz4`, `zstd`, ...).
    pub name: String,
    /// Its level, if one was given.
    pub level: Option<i32>,
}

impl std::fmt::Display for AlgorithmRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.level {
            Some(level) => write!(f, "{}:level={level}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// Where each region lies in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// The slot table.
    pub slots: (u64, u64),
    /// The pending pool's buffers.
    pub pool: (u64, u64),
    /// The dictionary region.
    pub dictionaries: (u64, u64),
    /// The segment directory.
    pub directory: (u64, u64),
    /// The first byte of the slab area.
    pub slab: u64,
    /// How many extents the slab area holds.
    pub max_extents: u64,
    /// The fill-word region: entry i of the `FillWords` table keeps its word at byte 8 × i.
    pub fill_words: (u64, u64),
    /// The file's length.
    pub file_len: u64,
}

impl Layout {
    /// The layout for a device of `capacity_pages` with a pool of `pool_pages`.
    pub fn new(capacity_pages: u64, pool_pages: u64) -> Layout {
        let align = |n: u64| n.div_ceil(REGION_ALIGN) * REGION_ALIGN;
        let slots = (REGION_ALIGN, capacity_pages * 8);
        let pool = (align(slots.0 + slots.1), pool_pages * PAGE_SIZE as u64);
        let dictionaries = (align(pool.0 + pool.1), DICTIONARY_REGION_BYTES);
        // Generous: in the worst case every chunk of 16 pages holds one object, so the slab
        // area could need 16 times the device; each size class also keeps a segment of its
        // own. The file is sparse, so offsets cost nothing.
        let device_extents = (capacity_pages * PAGE_SIZE as u64).div_ceil(EXTENT_BYTES);
        let max_extents = 16 * device_extents + 2 * 256 + 64;
        let directory = (align(dictionaries.0 + dictionaries.1), max_extents * 8);
        let slab = align(directory.0 + directory.1);
        // At most one distinct word a page; aligned so the file also works on hugetlbfs.
        let fill_words = (
            align(slab + max_extents * EXTENT_BYTES),
            align(capacity_pages * 8),
        );
        Layout {
            slots,
            pool,
            dictionaries,
            directory,
            slab,
            max_extents,
            fill_words,
            file_len: fill_words.0 + fill_words.1,
        }
    }
}

/// What the header of a state file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Bumped at every update; the newest valid copy wins.
    pub seq: u64,
    /// The device's size in pages.
    pub capacity_pages: u64,
    /// The primary algorithm.
    pub primary: AlgorithmRecord,
    /// The secondary algorithms, by priority.
    pub secondaries: Vec<AlgorithmRecord>,
    /// Whether `recover` has confirmed the secondaries (a file created and killed before that
    /// holds no page and is created again).
    pub configured: bool,
    /// The pending pool's buffers.
    pub pool_pages: u64,
    /// The regions.
    pub layout: Layout,
    /// The frontend the state belongs to, if any.
    pub identity: Option<FrontendIdentity>,
    /// The backing file, once the store has one.
    pub backing: Option<BackingRecord>,
}

/// Errors from opening or checking a state file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Opening, reading or writing the file failed.
    #[error("the state file {path} could not be {action}")]
    Io {
        /// The file.
        path: String,
        /// What was being done.
        action: &'static str,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The file is not on tmpfs or hugetlbfs.
    #[error(
        "the state file {path} is on a {found} file system; it must be on tmpfs or hugetlbfs \
         (or be a memfd), so that its pages are memory and not disk"
    )]
    WrongFileSystem {
        /// The file.
        path: String,
        /// The file system found (its name, or its magic number).
        found: String,
    },
    /// Another process holds the lock.
    #[error("another daemon holds the state file {path}")]
    Locked {
        /// The file.
        path: String,
    },
    /// The file is not a state file at all.
    #[error("the file {path} is not a state file (its first bytes are not a state header); it is left untouched")]
    NotAStateFile {
        /// The file.
        path: String,
    },
    /// A header of another format.
    #[error("the state file {path} is format {found}; this build reads format {FORMAT_VERSION}")]
    Format {
        /// The file.
        path: String,
        /// The format it records.
        found: u32,
    },
    /// Both header copies fail their CRC.
    #[error("both header copies of the state file {path} are corrupt; it is left untouched")]
    Corrupt {
        /// The file.
        path: String,
    },
    /// The file was made for another configuration.
    #[error(
        "the state file {path} holds a device whose {what} is {file}, but this daemon is \
         configured with {ours}; it is left untouched"
    )]
    Mismatch {
        /// The file.
        path: String,
        /// What differs.
        what: &'static str,
        /// The file's value.
        file: String,
        /// This daemon's value.
        ours: String,
    },
    /// The file is shorter than its header says.
    #[error("the state file {path} is {found} bytes long, but its header needs {needed}")]
    Truncated {
        /// The file.
        path: String,
        /// Its length.
        found: u64,
        /// The length the layout needs.
        needed: u64,
    },
    /// A full region.
    #[error("the state file {path} has no room left in its {region} region")]
    Full {
        /// The file.
        path: String,
        /// The region.
        region: &'static str,
    },
}

/// An open state file, locked for the life of the value.
#[derive(Debug)]
pub struct StateFile {
    file: File,
    name: String,
    /// The current header and which copy holds it, once read or written.
    header: std::sync::Mutex<Option<(Header, usize)>>,
}

impl StateFile {
    /// Opens (or creates, mode 0600) the state file at `path`: it must be on tmpfs or
    /// hugetlbfs, and no other process may hold it.
    pub fn open(path: &Path) -> Result<StateFile, StateError> {
        let name = path.display().to_string();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| StateError::Io {
                path: name.clone(),
                action: "opened",
                source,
            })?;
        StateFile::from_fd(OwnedFd::from(file), &name)
    }

    /// Takes a state file handed over as a descriptor (a memfd from systemd's fd store), with
    /// the same checks as [`StateFile::open`].
    pub fn from_fd(fd: OwnedFd, name: &str) -> Result<StateFile, StateError> {
        let file = File::from(fd);
        let name = name.to_owned();
        check_file_system(&file, &name)?;
        // SAFETY: flock on a descriptor we own; it reads no memory of ours.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let error = io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(StateError::Locked { path: name });
            }
            return Err(StateError::Io {
                path: name,
                action: "locked",
                source: error,
            });
        }
        let state = StateFile {
            file,
            name,
            header: std::sync::Mutex::new(None),
        };
        let header = state.read_header()?;
        let upgrade = match &header {
            Some((header, copy)) => {
                let mut version = [0u8; 4];
                state.read_at(&mut version, COPY_OFFSET[*copy] + 8)?;
                (u32::from_le_bytes(version) == UPGRADABLE_FORMAT).then(|| header.clone())
            }
            None => None,
        };
        *state.lock_header() = header;
        if let Some(header) = upgrade {
            // The older copy becomes the newest, in this build's format.
            state.write_header(header)?;
        }
        Ok(state)
    }

    /// A new, empty memfd state file named `name`.
    pub fn new_memfd(name: &str) -> Result<StateFile, StateError> {
        let cname = std::ffi::CString::new(name).map_err(|_| StateError::Io {
            path: name.to_owned(),
            action: "created (its name holds a NUL byte)",
            source: io::Error::from(io::ErrorKind::InvalidInput),
        })?;
        // SAFETY: memfd_create reads the NUL-terminated name and returns a new descriptor or -1.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(StateError::Io {
                path: name.to_owned(),
                action: "created",
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        StateFile::from_fd(fd, &format!("memfd:{name}"))
    }

    /// The file's descriptor (to hand to systemd's fd store).
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// The file's name for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the file holds no valid header yet (new, or created and never configured).
    pub fn is_new(&self) -> bool {
        self.lock_header()
            .as_ref()
            .is_none_or(|(h, _)| !h.configured)
    }

    /// The current header, if any.
    pub fn header(&self) -> Option<Header> {
        self.lock_header().as_ref().map(|(h, _)| h.clone())
    }

    /// Bytes the file occupies in memory (`st_blocks` × 512).
    pub fn allocated_bytes(&self) -> u64 {
        self.file
            .metadata()
            .map_or(0, |m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
    }

    /// Checks the header against the configuration `ours` (its `seq`, `configured` and
    /// `identity` are ignored), or writes a new header when the file is new. Returns whether
    /// the file was created. On a mismatch the file is left untouched.
    pub(crate) fn prepare(&self, ours: &Header) -> Result<bool, StateError> {
        if self.is_new() {
            if self.file_len()? != 0 {
                // Created and never configured (killed before `recover`): it holds no page
                // a guest wrote, so it starts over, every region zero.
                self.file.set_len(0).map_err(|e| self.io("truncated", e))?;
            }
            self.file
                .set_len(ours.layout.file_len)
                .map_err(|e| self.io("sized", e))?;
            let mut header = ours.clone();
            header.configured = false;
            header.identity = None;
            header.backing = None;
            self.write_header(header)?;
            return Ok(true);
        }
        let file = self.header().ok_or(StateError::Corrupt {
            path: self.name.clone(),
        })?;
        let mismatch = |what, file: String, ours: String| StateError::Mismatch {
            path: self.name.clone(),
            what,
            file,
            ours,
        };
        if file.capacity_pages != ours.capacity_pages {
            return Err(mismatch(
                "size",
                format!("{} pages", file.capacity_pages),
                format!("{} pages", ours.capacity_pages),
            ));
        }
        if file.primary != ours.primary {
            return Err(mismatch(
                "algorithm",
                file.primary.to_string(),
                ours.primary.to_string(),
            ));
        }
        if file.pool_pages != ours.pool_pages {
            return Err(mismatch(
                "pending pool",
                format!("{} pages", file.pool_pages),
                format!("{} pages", ours.pool_pages),
            ));
        }
        if file.layout != ours.layout {
            return Err(mismatch(
                "layout",
                format!("{:?}", file.layout),
                format!("{:?}", ours.layout),
            ));
        }
        let len = self.file_len()?;
        if len < file.layout.file_len {
            return Err(StateError::Truncated {
                path: self.name.clone(),
                found: len,
                needed: file.layout.file_len,
            });
        }
        Ok(false)
    }

    /// Checks the secondary algorithms against the header (once configured), or records them.
    pub(crate) fn configure(&self, secondaries: &[AlgorithmRecord]) -> Result<(), StateError> {
        let Some(mut header) = self.header() else {
            return Err(StateError::Corrupt {
                path: self.name.clone(),
            });
        };
        if header.configured {
            if header.secondaries != secondaries {
                let list = |s: &[AlgorithmRecord]| {
                    if s.is_empty() {
                        "none".to_owned()
                    } else {
                        s.iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(",")
                    }
                };
                return Err(StateError::Mismatch {
                    path: self.name.clone(),
                    what: "list of recompression algorithms",
                    file: list(&header.secondaries),
                    ours: list(secondaries),
                });
            }
            return Ok(());
        }
        header.secondaries = secondaries.to_vec();
        header.configured = true;
        self.write_header(header)
    }

    /// The backing file the header records: the daemon reopens it with
    /// [`BackingFile::reopen`](super::backing::BackingFile::reopen) before recovery.
    pub fn backing(&self) -> Option<BackingRecord> {
        self.header().and_then(|h| h.backing)
    }

    /// Records the backing file (crash-safe), before any page is written back to it.
    pub(crate) fn set_backing(&self, backing: Option<BackingRecord>) -> Result<(), StateError> {
        let Some(mut header) = self.header() else {
            return Err(StateError::Corrupt {
                path: self.name.clone(),
            });
        };
        header.backing = backing;
        self.write_header(header)
    }

    /// Records `identity` in the header (crash-safe: the older copy is written).
    pub(crate) fn set_identity(
        &self,
        identity: Option<FrontendIdentity>,
    ) -> Result<(), StateError> {
        let Some(mut header) = self.header() else {
            return Err(StateError::Corrupt {
                path: self.name.clone(),
            });
        };
        header.identity = identity;
        self.write_header(header)
    }

    /// Maps `len` bytes at `offset` shared, read-write.
    pub(crate) fn map(&self, offset: u64, len: usize) -> Result<super::alloc::Segment, io::Error> {
        super::alloc::Segment::map_shared(self.as_fd(), offset, len)
    }

    /// Gives the byte range back to the file system (it reads as zeros afterwards).
    pub(crate) fn punch(&self, offset: u64, len: u64) {
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        // SAFETY: fallocate on our own descriptor changes the file, not our memory; the range
        // holds nothing any slot references (the caller's contract).
        unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            );
        }
    }

    /// The parts of the `len` bytes at `offset` that hold data (not holes), as byte ranges
    /// relative to `offset`, found with `lseek(SEEK_DATA/SEEK_HOLE)`: recovery reads only
    /// these parts of the slot table, since reading a hole through a shared mapping of tmpfs
    /// allocates it. A file system without holes reports everything as data.
    pub(crate) fn data_ranges(
        &self,
        offset: u64,
        len: u64,
    ) -> io::Result<Vec<std::ops::Range<u64>>> {
        let fd = self.file.as_raw_fd();
        let end = offset.saturating_add(len);
        let seek = |from: u64, whence: libc::c_int| -> io::Result<Option<u64>> {
            let from = libc::off_t::try_from(from)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            // SAFETY: lseek on our own descriptor moves its offset (nothing reads through it:
            // every access is through mappings or positioned calls).
            let at = unsafe { libc::lseek(fd, from, whence) };
            match at {
                -1 => match io::Error::last_os_error() {
                    // No data past `from`.
                    e if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
                    e => Err(e),
                },
                at => Ok(u64::try_from(at).ok()),
            }
        };
        let mut ranges = Vec::new();
        let mut at = offset;
        while at < end {
            let Some(data) = seek(at, libc::SEEK_DATA)?.filter(|&d| d < end) else {
                break;
            };
            let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
            ranges.push(data - offset..hole - offset);
            at = hole;
        }
        Ok(ranges)
    }

    /// Reads `buf.len()` bytes at `offset` (inside the file).
    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StateError> {
        self.with_mapping(offset, buf.len(), |bytes| buf.copy_from_slice(bytes))
    }

    /// Writes `buf` at `offset` (inside the file).
    pub(crate) fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), StateError> {
        self.with_mapping(offset, buf.len(), |bytes| bytes.copy_from_slice(buf))
    }

    /// Runs `f` on `len` bytes of the file at `offset`, through a shared mapping of the
    /// 2 MiB-aligned range around them: hugetlbfs has no `read`/`write`, and a mapping works
    /// the same on tmpfs. Copying into a shared mapping is as crash-safe as `pwrite` here:
    /// either way a kill can tear the copy, which the header's CRC and the dictionary
    /// region's committed count are there for.
    fn with_mapping<R>(
        &self,
        offset: u64,
        len: usize,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> Result<R, StateError> {
        let end = offset + len as u64;
        if end > self.file_len()? {
            return Err(self.io(
                "read or written past its end",
                io::ErrorKind::UnexpectedEof.into(),
            ));
        }
        let start = offset / REGION_ALIGN * REGION_ALIGN;
        let span = usize::try_from(end.div_ceil(REGION_ALIGN) * REGION_ALIGN - start)
            .map_err(|_| self.io("mapped", io::ErrorKind::InvalidInput.into()))?;
        let mapping = self.map(start, span).map_err(|e| self.io("mapped", e))?;
        // The offset inside the mapping is below its span, a usize.
        #[allow(clippy::cast_possible_truncation)]
        let skip = (offset - start) as usize;
        // SAFETY: `skip + len` ≤ span bytes lie inside the mapping, and inside the file
        // (checked above), so touching them cannot fault; the slice is the only reference
        // this process makes to them and it ends before the mapping is unmapped (dropped).
        let bytes = unsafe { std::slice::from_raw_parts_mut(mapping.base().add(skip), len) };
        Ok(f(bytes))
    }

    fn file_len(&self) -> Result<u64, StateError> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| self.io("examined", e))
    }

    fn io(&self, action: &'static str, source: io::Error) -> StateError {
        StateError::Io {
            path: self.name.clone(),
            action,
            source,
        }
    }

    fn lock_header(&self) -> std::sync::MutexGuard<'_, Option<(Header, usize)>> {
        self.header.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `header` into the copy that does not hold the current one, with the next
    /// sequence number.
    fn write_header(&self, mut header: Header) -> Result<(), StateError> {
        let mut current = self.lock_header();
        let (seq, copy) = match &*current {
            Some((h, copy)) => (h.seq + 1, 1 - copy),
            None => (1, 0),
        };
        header.seq = seq;
        let bytes = encode(&header);
        self.write_at(&bytes, COPY_OFFSET[copy])?;
        *current = Some((header, copy));
        Ok(())
    }

    /// Reads both copies; the newest valid one wins. `None` for a file with no header yet.
    fn read_header(&self) -> Result<Option<(Header, usize)>, StateError> {
        let len = self.file_len()?;
        let mut copies: [Option<Vec<u8>>; 2] = [None, None];
        for (i, offset) in COPY_OFFSET.iter().enumerate() {
            if len >= offset + PAGE_SIZE as u64 {
                let mut page = vec![0u8; PAGE_SIZE];
                self.read_at(&mut page, *offset)?;
                copies[i] = Some(page);
            }
        }
        let mut best: Option<(Header, usize)> = None;
        let mut any_magic = false;
        let mut any_data = false;
        for (i, page) in copies.iter().enumerate() {
            let Some(page) = page else { continue };
            any_data |= page.iter().any(|&b| b != 0);
            if page[..8] != MAGIC {
                continue;
            }
            any_magic = true;
            let version = u32_at(page, 8);
            if version != FORMAT_VERSION && version != UPGRADABLE_FORMAT {
                return Err(StateError::Format {
                    path: self.name.clone(),
                    found: version,
                });
            }
            if let Some(header) = decode(page) {
                if best.as_ref().is_none_or(|(b, _)| header.seq > b.seq) {
                    best = Some((header, i));
                }
            }
        }
        match best {
            Some(best) => Ok(Some(best)),
            None if any_magic => Err(StateError::Corrupt {
                path: self.name.clone(),
            }),
            None if any_data => Err(StateError::NotAStateFile {
                path: self.name.clone(),
            }),
            None if len > 2 * PAGE_SIZE as u64 => {
                // No header at all but a longer file: refuse rather than reuse it.
                Err(StateError::NotAStateFile {
                    path: self.name.clone(),
                })
            }
            None => Ok(None),
        }
    }
}

fn check_file_system(file: &File, name: &str) -> Result<(), StateError> {
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: fstatfs writes one statfs into the buffer we pass, which is large enough.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(StateError::Io {
            path: name.to_owned(),
            action: "examined",
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: fstatfs succeeded, so it filled the struct.
    let stat = unsafe { stat.assume_init() };
    #[allow(clippy::useless_conversion)]
    let kind = i64::from(stat.f_type);
    if kind == TMPFS_MAGIC || kind == HUGETLBFS_MAGIC {
        return Ok(());
    }
    let found = match kind {
        0xEF53 => "ext2/ext3/ext4".to_owned(),
        0x5846_5342 => "xfs".to_owned(),
        0x9123_683E => "btrfs".to_owned(),
        0x6969 => "nfs".to_owned(),
        0x794c_7630 => "overlayfs".to_owned(),
        other => format!("type {other:#x}"),
    };
    Err(StateError::WrongFileSystem {
        path: name.to_owned(),
        found,
    })
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Bytes of one algorithm record: a 16-byte name, the level, flags.
const ALGORITHM_RECORD: usize = 24;

fn put_algorithm(b: &mut [u8], at: usize, a: &AlgorithmRecord) {
    let name = a.name.as_bytes();
    let n = name.len().min(16);
    b[at..at + n].copy_from_slice(&name[..n]);
    b[at + 16..at + 20].copy_from_slice(&a.level.unwrap_or(0).to_le_bytes());
    b[at + 20..at + 24].copy_from_slice(&u32::from(a.level.is_some()).to_le_bytes());
}

fn get_algorithm(b: &[u8], at: usize) -> Option<AlgorithmRecord> {
    let raw = &b[at..at + 16];
    let end = raw.iter().position(|&c| c == 0).unwrap_or(16);
    let name = std::str::from_utf8(&raw[..end]).ok()?.to_owned();
    let level = i32::from_le_bytes(b[at + 16..at + 20].try_into().ok()?);
    let has_level = u32_at(b, at + 20) & 1 == 1;
    Some(AlgorithmRecord {
        name,
        level: has_level.then_some(level),
    })
}

/// The header's byte layout (DESIGN.md, "State file").
fn encode(h: &Header) -> Vec<u8> {
    let mut b = vec![0u8; PAGE_SIZE];
    b[0..8].copy_from_slice(&MAGIC);
    b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&HEADER_BYTES_U32.to_le_bytes());
    b[16..24].copy_from_slice(&h.seq.to_le_bytes());
    b[24..32].copy_from_slice(&h.capacity_pages.to_le_bytes());
    b[32..40].copy_from_slice(&h.pool_pages.to_le_bytes());
    put_algorithm(&mut b, 40, &h.primary);
    let count = h.secondaries.len().min(3);
    // At most 3.
    #[allow(clippy::cast_possible_truncation)]
    b[64..68].copy_from_slice(&(count as u32).to_le_bytes());
    b[68..72].copy_from_slice(&u32::from(h.configured).to_le_bytes());
    for (i, s) in h.secondaries.iter().take(3).enumerate() {
        put_algorithm(&mut b, 72 + i * ALGORITHM_RECORD, s);
    }
    let l = &h.layout;
    let fields = [
        l.slots.0,
        l.slots.1,
        l.pool.0,
        l.pool.1,
        l.dictionaries.0,
        l.dictionaries.1,
        l.directory.0,
        l.directory.1,
        l.slab,
        EXTENT_BYTES,
        l.max_extents,
        l.file_len,
    ];
    for (i, f) in fields.iter().enumerate() {
        b[144 + i * 8..152 + i * 8].copy_from_slice(&f.to_le_bytes());
    }
    if let Some(id) = h.identity {
        b[240..244].copy_from_slice(&1u32.to_le_bytes());
        b[244..248].copy_from_slice(&id.pid.to_le_bytes());
        b[248..256].copy_from_slice(&id.start_time.to_le_bytes());
    }
    if let Some(backing) = &h.backing {
        let path = backing.path.as_os_str().as_encoded_bytes();
        let n = path.len().min(MAX_BACKING_PATH);
        b[256..260].copy_from_slice(&1u32.to_le_bytes());
        // At most MAX_BACKING_PATH (224).
        #[allow(clippy::cast_possible_truncation)]
        b[260..264].copy_from_slice(&(n as u32).to_le_bytes());
        b[264..272].copy_from_slice(&backing.key.to_le_bytes());
        b[272..280].copy_from_slice(&backing.dev.to_le_bytes());
        b[280..288].copy_from_slice(&backing.ino.to_le_bytes());
        b[288..288 + n].copy_from_slice(&path[..n]);
    }
    b[512..520].copy_from_slice(&l.fill_words.0.to_le_bytes());
    b[520..528].copy_from_slice(&l.fill_words.1.to_le_bytes());
    let crc = crc32fast::hash(&b[..HEADER_BYTES]);
    b[HEADER_BYTES..HEADER_BYTES + 4].copy_from_slice(&crc.to_le_bytes());
    b
}

fn decode(b: &[u8]) -> Option<Header> {
    let version = u32_at(b, 8);
    if b.len() < PAGE_SIZE
        || b[..8] != MAGIC
        || (version != FORMAT_VERSION && version != UPGRADABLE_FORMAT)
    {
        return None;
    }
    if u32_at(b, 12) as usize != HEADER_BYTES {
        return None;
    }
    if crc32fast::hash(&b[..HEADER_BYTES]) != u32_at(b, HEADER_BYTES) {
        return None;
    }
    let count = u32_at(b, 64) as usize;
    if count > 3 {
        return None;
    }
    let secondaries = (0..count)
        .map(|i| get_algorithm(b, 72 + i * ALGORITHM_RECORD))
        .collect::<Option<Vec<_>>>()?;
    let f = |i: usize| u64_at(b, 144 + i * 8);
    if f(9) != EXTENT_BYTES {
        return None;
    }
    let layout = Layout {
        slots: (f(0), f(1)),
        pool: (f(2), f(3)),
        dictionaries: (f(4), f(5)),
        directory: (f(6), f(7)),
        slab: f(8),
        max_extents: f(10),
        fill_words: (u64_at(b, 512), u64_at(b, 520)),
        file_len: f(11),
    };
    let identity = (u32_at(b, 240) == 1).then(|| FrontendIdentity {
        pid: u32_at(b, 244),
        start_time: u64_at(b, 248),
    });
    let backing = match u32_at(b, 256) {
        1 => {
            let n = (u32_at(b, 260) as usize).min(MAX_BACKING_PATH);
            let path =
                <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&b[288..288 + n]);
            Some(BackingRecord {
                path: PathBuf::from(path),
                key: u64_at(b, 264),
                dev: u64_at(b, 272),
                ino: u64_at(b, 280),
            })
        }
        _ => None,
    };
    Some(Header {
        backing,
        seq: u64_at(b, 16),
        capacity_pages: u64_at(b, 24),
        pool_pages: u64_at(b, 32),
        primary: get_algorithm(b, 40)?,
        secondaries,
        configured: u32_at(b, 68) == 1,
        layout,
        identity,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn header(pages: u64) -> Header {
        Header {
            seq: 0,
            capacity_pages: pages,
            primary: AlgorithmRecord {
                name: "lz4".into(),
                level: None,
            },
            secondaries: vec![],
            configured: false,
            pool_pages: 16,
            layout: Layout::new(pages, 16),
            identity: None,
            backing: None,
        }
    }

    fn shm_file() -> tempfile::NamedTempFile {
        tempfile::Builder::new()
            .prefix("vuz-state-test")
            .tempfile_in("/dev/shm")
            .unwrap()
    }

    fn file_bytes(path: &Path) -> Vec<u8> {
        let mut b = vec![0u8; 3 * PAGE_SIZE];
        File::open(path).unwrap().read_exact_at(&mut b, 0).unwrap();
        b
    }

    #[test]
    fn a_header_round_trips_through_the_file() {
        let tmp = shm_file();
        let state = StateFile::open(tmp.path()).unwrap();
        assert!(state.is_new());
        assert!(state.prepare(&header(1024)).unwrap(), "created");
        let secondaries = vec![AlgorithmRecord {
            name: "zstd".into(),
            level: Some(9),
        }];
        state.configure(&secondaries).unwrap();
        let identity = FrontendIdentity {
            pid: 4242,
            start_time: 1 << 40,
        };
        state.set_identity(Some(identity)).unwrap();
        let backing = BackingRecord {
            path: PathBuf::from("/var/lib/vuz/backing"),
            key: 0xfeed_beef,
            dev: 2049,
            ino: 77,
        };
        state.set_backing(Some(backing.clone())).unwrap();
        drop(state);
        let state = StateFile::open(tmp.path()).unwrap();
        assert!(!state.is_new());
        assert_eq!(state.backing(), Some(backing));
        let h = state.header().unwrap();
        assert_eq!(h.capacity_pages, 1024);
        assert_eq!(h.secondaries, secondaries);
        assert_eq!(h.identity, Some(identity));
        assert_eq!(h.layout, Layout::new(1024, 16));
        assert_eq!(h.seq, 4);
        assert!(
            !state.prepare(&header(1024)).unwrap(),
            "recovered, not created"
        );
    }

    #[test]
    fn a_corrupt_copy_loses_to_the_other_and_two_are_refused_untouched() {
        let tmp = shm_file();
        let state = StateFile::open(tmp.path()).unwrap();
        state.prepare(&header(64)).unwrap(); // seq 1 in copy A
        state.configure(&[]).unwrap(); // seq 2 in copy B
        drop(state);
        // Corrupt copy B (the newest): copy A wins.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(tmp.path())
            .unwrap();
        f.write_all_at(&[0xff], PAGE_SIZE as u64 + 30).unwrap();
        let state = StateFile::open(tmp.path()).unwrap();
        let h = state.header().unwrap();
        assert_eq!(h.seq, 1, "the older valid copy wins");
        assert!(!h.configured);
        drop(state);
        // Corrupt copy A too: refused, and nothing is written.
        f.write_all_at(&[0xff], 30).unwrap();
        let before = file_bytes(tmp.path());
        let error = StateFile::open(tmp.path()).unwrap_err();
        assert!(matches!(error, StateError::Corrupt { .. }), "{error}");
        assert!(error.to_string().contains("both header copies"));
        assert_eq!(file_bytes(tmp.path()), before);
    }

    #[test]
    fn an_update_killed_half_way_leaves_the_previous_header() {
        let tmp = shm_file();
        let state = StateFile::open(tmp.path()).unwrap();
        state.prepare(&header(64)).unwrap();
        state.configure(&[]).unwrap();
        let id = FrontendIdentity {
            pid: 1,
            start_time: 2,
        };
        state.set_identity(Some(id)).unwrap(); // seq 3 in copy A
        drop(state);
        // A torn write of seq 4 into copy B: half a header.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(tmp.path())
            .unwrap();
        let mut torn = encode(&Header {
            seq: 4,
            identity: None,
            configured: true,
            ..header(64)
        });
        torn[200..].fill(0);
        f.write_all_at(&torn, PAGE_SIZE as u64).unwrap();
        let state = StateFile::open(tmp.path()).unwrap();
        assert_eq!(state.header().unwrap().identity, Some(id));
    }

    #[test]
    fn a_format_2_file_opens_and_its_header_becomes_format_3() {
        let tmp = shm_file();
        let mut page = encode(&header(64));
        page[8..12].copy_from_slice(&UPGRADABLE_FORMAT.to_le_bytes());
        let crc = crc32fast::hash(&page[..HEADER_BYTES]);
        page[HEADER_BYTES..HEADER_BYTES + 4].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(tmp.path(), [page, vec![0; PAGE_SIZE]].concat()).unwrap();
        let state = StateFile::open(tmp.path()).unwrap();
        assert_eq!(state.header().unwrap().capacity_pages, 64);
        drop(state);
        let bytes = std::fs::read(tmp.path()).unwrap();
        assert_eq!(
            u32_at(&bytes[PAGE_SIZE..], 8),
            FORMAT_VERSION,
            "copy B is the newest"
        );
        assert!(StateFile::open(tmp.path()).is_ok());
    }

    #[test]
    fn a_newer_or_older_format_is_refused_and_left_untouched() {
        // Format 1 had no fill-word region: refused as well, not reused.
        for version in [FORMAT_VERSION + 1, 1] {
            let tmp = shm_file();
            let mut page = encode(&header(64));
            page[8..12].copy_from_slice(&version.to_le_bytes());
            std::fs::write(
                tmp.path(),
                [page.clone(), page, vec![0; PAGE_SIZE]].concat(),
            )
            .unwrap();
            let before = file_bytes(tmp.path());
            let error = StateFile::open(tmp.path()).unwrap_err();
            assert_eq!(
                error.to_string(),
                format!(
                    "the state file {} is format {version}; this build reads format \
                     {FORMAT_VERSION}",
                    tmp.path().display(),
                )
            );
            assert_eq!(file_bytes(tmp.path()), before);
        }
    }

    #[test]
    fn the_fill_word_region_follows_the_slab_area_with_a_word_a_page() {
        for pages in [1, 64, 1 << 20] {
            let l = Layout::new(pages, 16);
            assert!(l.fill_words.0.is_multiple_of(REGION_ALIGN));
            assert!(l.fill_words.0 >= l.slab + l.max_extents * EXTENT_BYTES);
            assert!(l.fill_words.1 >= pages * 8 && l.fill_words.1.is_multiple_of(REGION_ALIGN));
            assert_eq!(l.file_len, l.fill_words.0 + l.fill_words.1);
            let h = Header {
                layout: l,
                ..header(pages)
            };
            assert_eq!(
                decode(&encode(&h)).unwrap().layout,
                l,
                "the header records it"
            );
        }
    }

    #[test]
    fn another_size_or_algorithm_is_refused_and_left_untouched() {
        let tmp = shm_file();
        let state = StateFile::open(tmp.path()).unwrap();
        state.prepare(&header(1024)).unwrap();
        state.configure(&[]).unwrap();
        drop(state);
        let before = file_bytes(tmp.path());
        let len = std::fs::metadata(tmp.path()).unwrap().len();
        let state = StateFile::open(tmp.path()).unwrap();
        let error = state.prepare(&header(2048)).unwrap_err();
        assert!(error.to_string().contains("1024 pages"), "{error}");
        assert!(error.to_string().contains("2048 pages"), "{error}");
        let mut zstd = header(1024);
        zstd.primary.name = "zstd".into();
        let error = state.prepare(&zstd).unwrap_err();
        assert!(error.to_string().contains("algorithm is lz4"), "{error}");
        let error = state
            .configure(&[AlgorithmRecord {
                name: "zstd".into(),
                level: None,
            }])
            .unwrap_err();
        assert!(error.to_string().contains("none"), "{error}");
        drop(state);
        assert_eq!(file_bytes(tmp.path()), before);
        assert_eq!(std::fs::metadata(tmp.path()).unwrap().len(), len);
    }

    #[test]
    fn a_file_on_a_disk_file_system_is_refused() {
        let dir = std::env::temp_dir();
        let mut stat = std::mem::MaybeUninit::<libc::statfs>::zeroed();
        let c = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
        // SAFETY: statfs reads the path and fills the buffer.
        assert_eq!(unsafe { libc::statfs(c.as_ptr(), stat.as_mut_ptr()) }, 0);
        // SAFETY: filled above.
        #[allow(clippy::useless_conversion)]
        let kind = i64::from(unsafe { stat.assume_init() }.f_type);
        if kind == TMPFS_MAGIC {
            eprintln!("skipped: {} is tmpfs here", dir.display());
            return;
        }
        let tmp = tempfile::NamedTempFile::new_in(&dir).unwrap();
        let error = StateFile::open(tmp.path()).unwrap_err();
        assert!(
            matches!(error, StateError::WrongFileSystem { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("tmpfs or hugetlbfs"), "{error}");
    }

    #[test]
    fn a_second_opener_is_refused_by_the_lock() {
        let tmp = shm_file();
        let first = StateFile::open(tmp.path()).unwrap();
        let error = StateFile::open(tmp.path()).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "another daemon holds the state file {}",
                tmp.path().display()
            )
        );
        drop(first);
        StateFile::open(tmp.path()).unwrap();
    }

    #[test]
    fn a_memfd_counts_as_tmpfs_and_survives_a_handover() {
        let state = StateFile::new_memfd("vuz-test").unwrap();
        state.prepare(&header(64)).unwrap();
        state.configure(&[]).unwrap();
        let fd = state.as_fd().try_clone_to_owned().unwrap();
        drop(state);
        let again = StateFile::from_fd(fd, "memfd:vuz-test").unwrap();
        assert!(!again.is_new());
        assert_eq!(again.header().unwrap().capacity_pages, 64);
    }

    #[test]
    fn a_file_that_is_not_a_state_file_is_refused() {
        let tmp = shm_file();
        std::fs::write(tmp.path(), vec![7u8; 3 * PAGE_SIZE]).unwrap();
        let error = StateFile::open(tmp.path()).unwrap_err();
        assert!(matches!(error, StateError::NotAStateFile { .. }), "{error}");
    }
}
