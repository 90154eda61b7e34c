// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Opening a backing file: what a path may name (a regular file or a block device, after
//! symbolic links are resolved; never a FIFO, socket, character device or a file of a kernel
//! interface such as `/proc`), checked with `lstat`/`statfs` before any open that could block;
//! `O_DIRECT` with its buffered fallback; the `flock` against a second daemon; and the rule
//! that someone else's data is never clobbered: a regular file must be empty or carry our
//! extended attribute, a block device must be empty or carry our device header, unless the
//! operator says to overwrite ([`ForeignData::Overwrite`]).
//!
//! The device header is the first 4096 bytes of a block device:
//!
//! ```text
//! byte  0..16  "vhost-user-zram\0"
//! byte 16..20  format version, u32 little-endian: 1
//! byte 20..4096 zero
//! ```
//!
//! The backing file's offsets start after it ([`DEVICE_HEADER_BYTES`]).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::erase::Erasure;
use super::io::FileIo;
use super::{as_bytes_mut, BackingError, BackingFile, BackingIo, Block, BLOCK_SIZE, ZERO_BLOCK};

/// Bytes at the start of a block device that hold the device header; the backing file's
/// byte 0 is the device's byte 4096.
pub const DEVICE_HEADER_BYTES: u64 = BLOCK_SIZE as u64;
const DEVICE_MAGIC: &[u8; 16] = b"vhost-user-zram\0";
const DEVICE_FORMAT: u32 = 1;
/// How much of a device (or a regular file not marked ours) is looked at for other data.
const PROBE_BYTES: usize = 1 << 20;

/// `BLKGETSIZE64`, `_IOR(0x12, 114, u64)` in the asm-generic ioctl layout (x86, arm, riscv).
const BLKGETSIZE64: u64 = (2 << 30) | (8 << 16) | (0x12 << 8) | 114;

/// The kind of file a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PathKind {
    Regular,
    BlockDevice,
}

/// What to do with a backing file or device that holds data vhost-user-zram did not write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ForeignData {
    /// Refuse it, naming what was found (the default).
    #[default]
    Refuse,
    /// Overwrite it (`--backing-file-overwrite`): the operator said its data is not needed.
    Overwrite,
}

/// What a backing file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingKind {
    /// A regular file: emptied at open, grows as pages are written back.
    RegularFile,
    /// A block device of this many bytes (the first [`DEVICE_HEADER_BYTES`] hold the header).
    BlockDevice(u64),
}

/// What an earlier run left in the backing file, released at open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EarlierRun {
    /// A regular file marked ours, of `size` bytes of which `disk_bytes` were allocated.
    File {
        /// Its size.
        size: u64,
        /// Its allocated bytes (`st_blocks` × 512).
        disk_bytes: u64,
    },
    /// A block device with our header: its blocks after the header were erased (punched,
    /// or discarded) as `erased` says, and are all reused; whatever of the old records
    /// stays never verifies in this run (their checksums are keyed to the earlier run).
    Device {
        /// What erasing its blocks did.
        erased: Erasure,
    },
}

/// How [`BackingFile::open`] found and opened a path: the daemon's start log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The path as given.
    pub path: PathBuf,
    /// The file it names, symbolic links resolved.
    pub resolved: PathBuf,
    /// A regular file or a block device.
    pub kind: BackingKind,
    /// Whether I/O bypasses the page cache.
    pub direct: bool,
    /// Free bytes on the regular file's filesystem (for the unprivileged user).
    pub free_bytes: Option<u64>,
    /// What an earlier run left there, now released.
    pub earlier_run: Option<EarlierRun>,
    /// Other data found there and overwritten ([`ForeignData::Overwrite`]).
    pub overwritten: Option<String>,
}

fn mib(bytes: u64) -> String {
    #[allow(clippy::cast_precision_loss)]
    let mib = bytes as f64 / f64::from(1u32 << 20);
    format!("{mib:.1} MiB")
}

impl std::fmt::Display for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "backing file {}", self.path.display())?;
        if self.resolved != self.path {
            write!(f, " (resolved to {})", self.resolved.display())?;
        }
        match self.kind {
            BackingKind::RegularFile => {
                write!(
                    f,
                    ": a regular file, emptied, growing as pages are written back"
                )?;
                if let Some(free) = self.free_bytes {
                    write!(f, " ({} free on its filesystem)", mib(free))?;
                }
            }
            BackingKind::BlockDevice(size) => write!(
                f,
                ": a block device of {} bytes ({}), {} of them for pages",
                size,
                mib(size),
                size.saturating_sub(DEVICE_HEADER_BYTES)
            )?,
        }
        f.write_str(if self.direct {
            ", O_DIRECT"
        } else {
            ", buffered (the filesystem refused O_DIRECT)"
        })
    }
}

/// Room for pages below which a backing file is warned about at start, unless the device is
/// smaller: [`low_space_threshold`].
pub const LOW_SPACE_FLOOR: u64 = 64 << 20;

/// The room a backing file should have for a device of `device_bytes`: the smaller of the
/// device's size and [`LOW_SPACE_FLOOR`]. Less than that is worth a warning at start.
pub fn low_space_threshold(device_bytes: u64) -> u64 {
    device_bytes.min(LOW_SPACE_FLOOR)
}

impl Opened {
    /// The room for pages: the free bytes of a regular file's filesystem, or the part of a
    /// block device after its header (`None` if the system did not say).
    pub fn room(&self) -> Option<u64> {
        match self.kind {
            BackingKind::RegularFile => self.free_bytes,
            BackingKind::BlockDevice(size) => Some(size.saturating_sub(DEVICE_HEADER_BYTES)),
        }
    }

    /// A warning, for a device of `device_bytes`, if the file has less room than
    /// [`low_space_threshold`]: it names the file, the room and what writeback will do.
    pub fn low_space_warning(&self, device_bytes: u64) -> Option<String> {
        let room = self.room()?;
        let threshold = low_space_threshold(device_bytes);
        if room >= threshold {
            return None;
        }
        let where_ = match self.kind {
            BackingKind::RegularFile => "free on its filesystem",
            BackingKind::BlockDevice(_) => "of room for pages",
        };
        Some(format!(
            "backing file {} has only {} {where_}, less than {} (the smaller of the device's \
             size and {}): writeback will write what fits, then refuse the pages it cannot \
             write, which stay in RAM",
            self.path.display(),
            mib(room),
            mib(threshold),
            mib(LOW_SPACE_FLOOR)
        ))
    }

    /// A sentence on what an earlier run left and this one released, if anything.
    pub fn earlier_run_message(&self) -> Option<String> {
        let path = self.path.display();
        match self.earlier_run? {
            // Punched out at the end of that run: nothing was left.
            EarlierRun::File { disk_bytes: 0, .. } => None,
            EarlierRun::File { size, disk_bytes } => Some(format!(
                "backing file {path} held {} blocks ({}, {size} bytes long) from an earlier \
                 run, a daemon that was killed or exited: released them (the pages they held \
                 went with that daemon)",
                disk_bytes.div_ceil(BLOCK_SIZE as u64),
                mib(disk_bytes)
            )),
            EarlierRun::Device { erased } => Some(format!(
                "backing device {path} carries the header of an earlier run, a daemon that \
                 was killed or exited: released whatever of its blocks it left (the pages \
                 they held went with that daemon), {erased}"
            )),
        }
    }
}

fn path_kind(path: &Path, file_type: std::fs::FileType) -> Result<PathKind, BackingError> {
    let kind = if file_type.is_file() {
        return Ok(PathKind::Regular);
    } else if file_type.is_symlink() {
        "a symbolic link that changed while it was opened"
    } else if file_type.is_block_device() {
        return Ok(PathKind::BlockDevice);
    } else if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_char_device() {
        "a character device"
    } else {
        "neither a file nor a device"
    };
    Err(BackingError::NotSupported {
        path: path.to_owned(),
        kind,
    })
}

/// The extended attribute that marks a regular file as a vhost-user-zram backing file.
const OWNER_MARK: &std::ffi::CStr = c"user.vhost-user-zram";

/// Whether `file` carries [`OWNER_MARK`].
fn has_owner_mark(file: &File) -> bool {
    // SAFETY: fgetxattr with a null buffer and size 0 only reports the value's size; the name
    // is a NUL-terminated string that outlives the call.
    let size = unsafe {
        libc::fgetxattr(
            file.as_raw_fd(),
            OWNER_MARK.as_ptr(),
            std::ptr::null_mut(),
            0,
        )
    };
    size >= 0
}

/// Marks `file` with [`OWNER_MARK`]; a filesystem without user extended attributes leaves it
/// unmarked (the file is then refused if it is found non-empty at the next start).
fn set_owner_mark(file: &File) {
    const VALUE: &[u8] = b"1";
    // SAFETY: fsetxattr reads VALUE.len() bytes from VALUE and the NUL-terminated name.
    let done = unsafe {
        libc::fsetxattr(
            file.as_raw_fd(),
            OWNER_MARK.as_ptr(),
            VALUE.as_ptr().cast(),
            VALUE.len(),
            0,
        )
    };
    if done != 0 {
        log::debug!(
            "cannot mark the backing file (no user extended attributes?): {}",
            io::Error::last_os_error()
        );
    }
}

impl BackingFile {
    /// Opens (creating if missing, mode 0600) the regular file or block device at `path`,
    /// locks it against other processes, and empties it (an earlier run's contents are
    /// meaningless without the slot table that referenced them). Data that is not ours is
    /// refused ([`BackingError::NotOurs`], [`BackingError::ForeignDevice`]), never clobbered:
    /// see [`BackingFile::open_with_policy`].
    pub fn open(path: &Path) -> Result<BackingFile, BackingError> {
        BackingFile::open_with(path, ForeignData::Refuse, true, |io| io)
    }

    /// As [`BackingFile::open`], with what to do about data that is not ours. A path is
    /// resolved (symbolic links followed; one to nothing is refused) and the file it names
    /// checked with `lstat` and `statfs` before it is opened, so a FIFO, socket, character
    /// device, directory or a file of a kernel interface (`/proc`, `/sys`, ...) is refused
    /// without an open that could block. A non-empty regular file is taken if it carries the
    /// mark (an extended attribute) an earlier vhost-user-zram set; a block device if its
    /// first MiB is all zeros or it starts with our device header. Anything else is refused
    /// with [`ForeignData::Refuse`], naming what was found, and overwritten with
    /// [`ForeignData::Overwrite`].
    pub fn open_with_policy(
        path: &Path,
        foreign: ForeignData,
    ) -> Result<BackingFile, BackingError> {
        BackingFile::open_with(path, foreign, true, |io| io)
    }

    /// As [`BackingFile::open`], with the file's I/O passed through `wrap`: tests put a
    /// fault injector (`FaultyIo`) between the backing file and a real file this way.
    pub fn open_wrapped(
        path: &Path,
        wrap: impl FnOnce(Box<dyn BackingIo>) -> Box<dyn BackingIo>,
    ) -> Result<BackingFile, BackingError> {
        BackingFile::open_with(path, ForeignData::Refuse, true, wrap)
    }

    /// Reopens the backing file a state file records, for a store recovered from it: the
    /// same file (`identity`, its st_dev and st_ino), with the same checks as
    /// [`BackingFile::open`], but kept as it is — not emptied, a device's header not rewritten
    /// — and with `key`, the key of the run that wrote its records, so they verify. A file
    /// that is not the recorded one (another st_dev or st_ino), or a device without our
    /// header, is refused.
    pub fn reopen(
        path: &Path,
        key: u64,
        identity: (u64, u64),
    ) -> Result<BackingFile, BackingError> {
        BackingFile::open_inner(
            path,
            ForeignData::Refuse,
            Some((key, identity)),
            true,
            |io| io,
        )
    }

    /// As [`BackingFile::open_with_policy`], with the I/O wrapped; `try_direct: false` skips
    /// `O_DIRECT` (tests of the fallback).
    pub(super) fn open_with(
        path: &Path,
        foreign: ForeignData,
        try_direct: bool,
        wrap: impl FnOnce(Box<dyn BackingIo>) -> Box<dyn BackingIo>,
    ) -> Result<BackingFile, BackingError> {
        BackingFile::open_inner(path, foreign, None, try_direct, wrap)
    }

    /// Opens `path`: emptied (`keep` None), or kept with the recorded key and identity.
    fn open_inner(
        path: &Path,
        foreign: ForeignData,
        keep: Option<(u64, (u64, u64))>,
        try_direct: bool,
        wrap: impl FnOnce(Box<dyn BackingIo>) -> Box<dyn BackingIo>,
    ) -> Result<BackingFile, BackingError> {
        let io_error = |op, source| BackingError::Io {
            op,
            path: path.to_owned(),
            offset: 0,
            source,
        };
        let (resolved, existing) = resolve(path)?;
        let kind = match &existing {
            Some(meta) => path_kind(&resolved, meta.file_type())?,
            None => PathKind::Regular,
        };
        refuse_kernel_interfaces(&resolved, existing.is_some())?;
        let (file, direct) = if try_direct {
            match open_file(&resolved, kind, libc::O_DIRECT) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    (open_file(&resolved, kind, 0), false)
                }
                result => (result, true),
            }
        } else {
            (open_file(&resolved, kind, 0), false)
        };
        let file = file.map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => BackingError::Locked {
                path: path.to_owned(),
            },
            _ => io_error("open", e),
        })?;
        let meta = file.metadata().map_err(|e| io_error("stat", e))?;
        let same_file = existing
            .as_ref()
            .is_none_or(|before| (before.dev(), before.ino()) == (meta.dev(), meta.ino()));
        if path_kind(&resolved, meta.file_type())? != kind || !same_file {
            return Err(io_error(
                "open",
                io::Error::other("the path changed while it was opened"),
            ));
        }
        clear_nonblocking(&file).map_err(|e| io_error("fcntl", e))?;
        // SAFETY: flock takes a file descriptor we own and plain flags; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                BackingError::Locked {
                    path: path.to_owned(),
                }
            } else {
                io_error("flock", e)
            });
        }
        let identity = (meta.dev(), meta.ino());
        if let Some((_, recorded)) = keep {
            if recorded != identity {
                return Err(BackingError::NotRecorded {
                    path: path.to_owned(),
                    recorded,
                    found: identity,
                });
            }
        }
        let mut opened = Opened {
            path: path.to_owned(),
            resolved: resolved.clone(),
            kind: BackingKind::RegularFile,
            direct,
            free_bytes: None,
            earlier_run: None,
            overwritten: None,
        };
        let (capacity, base) = match kind {
            PathKind::Regular => {
                // Never clobber someone else's file: a non-empty file is taken only if an
                // earlier vhost-user-zram marked it as its backing file.
                if keep.is_some() {
                    // Kept as it is: it is the recorded file (same st_dev and st_ino, checked
                    // above), and its records are the recovered store's pages.
                } else if meta.len() > 0 && has_owner_mark(&file) {
                    opened.earlier_run = Some(EarlierRun::File {
                        size: meta.len(),
                        disk_bytes: meta.blocks() * 512,
                    });
                } else if meta.len() > 0 {
                    let head = read_head(&file).map_err(|e| io_error("read", e))?;
                    let found = identify(&head).unwrap_or_else(|| "zeros".to_owned());
                    if foreign == ForeignData::Refuse {
                        return Err(BackingError::NotOurs {
                            path: path.to_owned(),
                            len: meta.len(),
                            found,
                        });
                    }
                    opened.overwritten = Some(format!("{} bytes of {found}", meta.len()));
                }
                if keep.is_none() {
                    file.set_len(0).map_err(|e| io_error("truncate", e))?;
                    set_owner_mark(&file);
                }
                opened.free_bytes = free_bytes(&file);
                (None, 0)
            }
            PathKind::BlockDevice => {
                let size = device_size(&file).map_err(|e| io_error("BLKGETSIZE64", e))?;
                opened.kind = BackingKind::BlockDevice(size);
                let head = read_head(&file).map_err(|e| io_error("read", e))?;
                let ours = head.len() >= BLOCK_SIZE && head[..BLOCK_SIZE] == device_header().0;
                if keep.is_some() && !ours {
                    return Err(BackingError::ForeignDevice {
                        path: path.to_owned(),
                        found: identify(&head).unwrap_or_else(|| "no device header".to_owned()),
                    });
                }
                if ours {
                    // Erased once the I/O is set up, below.
                    opened.earlier_run = keep.is_none().then_some(EarlierRun::Device {
                        erased: Erasure::Nothing,
                    });
                } else if let Some(found) = identify(&head) {
                    if foreign == ForeignData::Refuse {
                        return Err(BackingError::ForeignDevice {
                            path: path.to_owned(),
                            found,
                        });
                    }
                    opened.overwritten = Some(found);
                }
                if size < DEVICE_HEADER_BYTES {
                    return Err(BackingError::NoSpace {
                        path: path.to_owned(),
                        offset: 0,
                        len: DEVICE_HEADER_BYTES,
                    });
                }
                if keep.is_none() {
                    let header = Box::new(device_header());
                    file.write_all_at(&header.0, 0)
                        .and_then(|()| file.sync_data())
                        .map_err(|e| io_error("write", e))?;
                }
                (Some(size - DEVICE_HEADER_BYTES), DEVICE_HEADER_BYTES)
            }
        };
        let io = FileIo {
            file,
            direct,
            base,
            device: kind == PathKind::BlockDevice,
        };
        let mut backing = BackingFile::with_io(wrap(Box::new(io)), capacity);
        if let Some(EarlierRun::Device { erased }) = &mut opened.earlier_run {
            // The earlier run's records are its guest's pages: none stays on the device.
            *erased = backing.erase_range(capacity.unwrap_or(0));
        }
        backing.path = path.to_owned();
        backing.direct = direct;
        backing.opened = Some(opened);
        backing.identity = Some(identity);
        if let Some((key, _)) = keep {
            backing.key = key;
            backing.kept = true;
        }
        Ok(backing)
    }
}

/// Resolves `path`'s symbolic links: the file it names and its `lstat`, or `None` if nothing
/// is there yet (the file is created in the resolved directory). A link to nothing is refused:
/// opening it would create a file wherever it points.
fn resolve(path: &Path) -> Result<(PathBuf, Option<std::fs::Metadata>), BackingError> {
    let stat_error = |source| BackingError::Io {
        op: "stat",
        path: path.to_owned(),
        offset: 0,
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(_) => {
            let resolved = std::fs::canonicalize(path).map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    BackingError::NotSupported {
                        path: path.to_owned(),
                        kind: "a symbolic link to a path that does not exist",
                    }
                } else {
                    stat_error(e)
                }
            })?;
            let meta = std::fs::symlink_metadata(&resolved).map_err(stat_error)?;
            Ok((resolved, Some(meta)))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let resolved = match (path.parent(), path.file_name()) {
                (Some(parent), Some(name)) if !parent.as_os_str().is_empty() => {
                    std::fs::canonicalize(parent)
                        .map_err(stat_error)?
                        .join(name)
                }
                _ => path.to_owned(),
            };
            Ok((resolved, None))
        }
        Err(e) => Err(stat_error(e)),
    }
}

/// Filesystems whose files are kernel interfaces, not storage: (`statfs` magic, what to call
/// a file there).
const KERNEL_INTERFACES: [(u64, &str); 14] = [
    (0x9fa0, "a file of /proc (procfs)"),
    (0x6265_6572, "a file of /sys (sysfs)"),
    (0x6462_6720, "a file of debugfs"),
    (0x7472_6163, "a file of tracefs"),
    (0x7363_6673, "a file of securityfs"),
    (0x0027_e0eb, "a file of a cgroup filesystem"),
    (0x6367_7270, "a file of a cgroup2 filesystem"),
    (0xcafe_4a11, "a file of the BPF filesystem"),
    (0x6265_6570, "a file of configfs"),
    (0xde5e_81e4, "a file of efivarfs"),
    (0x6165_676c, "a file of pstore"),
    (0x4249_4e4d, "a file of binfmt_misc"),
    (0x6573_5543, "a file of fusectl"),
    (0x1980_0202, "a file of mqueue"),
];

/// Refuses a path on a kernel interface's filesystem (`/proc/self/mem`, a sysfs attribute):
/// `statfs` of the file, or of its directory if it does not exist yet.
fn refuse_kernel_interfaces(resolved: &Path, exists: bool) -> Result<(), BackingError> {
    let probe = if exists {
        resolved
    } else {
        resolved.parent().unwrap_or(resolved)
    };
    let Ok(name) = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes()) else {
        return Ok(());
    };
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs reads the NUL-terminated name, which outlives the call, and writes one
    // statfs through the pointer to our local.
    if unsafe { libc::statfs(name.as_ptr(), &mut stat) } != 0 {
        // The open below reports a path that cannot be reached.
        return Ok(());
    }
    // f_type is a filesystem magic, a 32-bit value in a signed or unsigned word.
    #[allow(
        clippy::cast_sign_loss,
        clippy::cast_possible_truncation,
        clippy::unnecessary_cast
    )]
    let magic = (stat.f_type as u64) & 0xffff_ffff;
    match KERNEL_INTERFACES.iter().find(|(m, _)| *m == magic) {
        Some(&(_, kind)) => Err(BackingError::NotSupported {
            path: resolved.to_owned(),
            kind,
        }),
        None => Ok(()),
    }
}

/// Clears the `O_NONBLOCK` the file was opened with (so that opening could not block).
fn clear_nonblocking(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl F_GETFL takes an open fd and no memory.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fcntl F_SETFL takes an open fd and plain flags; no memory is passed.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The size of a block device.
fn device_size(file: &File) -> io::Result<u64> {
    let mut size = 0u64;
    // BLKGETSIZE64 fits every libc's ioctl request type (u32 bits).
    #[allow(clippy::cast_possible_truncation)]
    let request = BLKGETSIZE64 as libc::Ioctl;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at a live local
    // u64; the fd is open.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request, &mut size as *mut u64) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// Free bytes on `file`'s filesystem for an unprivileged user, if the system says.
fn free_bytes(file: &File) -> Option<u64> {
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatvfs takes an open fd and writes one statvfs to our local.
    if unsafe { libc::fstatvfs(file.as_raw_fd(), &mut stat) } != 0 {
        return None;
    }
    #[allow(clippy::unnecessary_cast)]
    Some((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

/// The device header block.
fn device_header() -> Block {
    let mut block = ZERO_BLOCK;
    block.0[..16].copy_from_slice(DEVICE_MAGIC);
    block.0[16..20].copy_from_slice(&DEVICE_FORMAT.to_le_bytes());
    block
}

/// Reads up to the first [`PROBE_BYTES`] of `file` (an aligned buffer: the file may be
/// opened with `O_DIRECT`), fewer if it ends sooner.
fn read_head(file: &File) -> io::Result<Vec<u8>> {
    let mut blocks = vec![ZERO_BLOCK; PROBE_BYTES / BLOCK_SIZE];
    let buf = as_bytes_mut(&mut blocks);
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(buf[..done].to_vec())
}

/// Signatures other programs leave at the start of a device: (byte offset, bytes, what).
const SIGNATURES: [(usize, &[u8], &str); 16] = [
    (0, b"LUKS\xba\xbe", "a LUKS encrypted volume"),
    (0, b"XFSB", "an XFS filesystem"),
    (
        0,
        b"vhost-user-zram\0",
        "a vhost-user-zram header of another format version",
    ),
    (3, b"NTFS    ", "an NTFS filesystem"),
    (54, b"FAT1", "a FAT filesystem"),
    (82, b"FAT32   ", "a FAT filesystem"),
    (512, b"EFI PART", "a GPT partition table"),
    (536, b"LVM2 001", "an LVM physical volume"),
    (1024, &[0x10, 0x20, 0xf5, 0xf2], "an F2FS filesystem"),
    (1080, &[0x53, 0xef], "an ext2/ext3/ext4 filesystem"),
    (4086, b"SWAPSPACE2", "a swap area"),
    (4086, b"SWAP-SPACE", "a swap area"),
    (32769, b"CD001", "an ISO 9660 image"),
    (65600, b"_BHRfS_M", "a btrfs filesystem"),
    (0x1_0000 + 0x20, b"ReIsEr", "a ReiserFS filesystem"),
    (510, &[0x55, 0xaa], "a DOS partition table or boot sector"),
];

/// What the first bytes of a device or file look like: a known signature's name, "data (a
/// non-zero byte at N)", or `None` if they are all zeros.
fn identify(head: &[u8]) -> Option<String> {
    for (at, signature, what) in SIGNATURES {
        if head.get(at..at + signature.len()) == Some(signature) {
            return Some(what.to_owned());
        }
    }
    head.iter()
        .position(|&b| b != 0)
        .map(|at| format!("data of another program (a non-zero byte at {at})"))
}

/// Opens `path` (resolved: no symbolic link) as `kind`: never following a link swapped in
/// since it was resolved, never blocking (`O_NONBLOCK`, cleared after the type is checked),
/// never becoming a controlling terminal.
fn open_file(path: &Path, kind: PathKind, flags: libc::c_int) -> io::Result<File> {
    let flags = flags | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY;
    let mut options = OpenOptions::new();
    options.read(true).write(true);
    match kind {
        PathKind::Regular => {
            options.create(true).truncate(false).mode(0o600);
            options.custom_flags(flags | libc::O_CLOEXEC);
        }
        PathKind::BlockDevice => {
            // O_EXCL on a block device: refused (EBUSY) while it is mounted or held.
            options.custom_flags(flags | libc::O_CLOEXEC | libc::O_EXCL);
        }
    }
    options.open(path)
}
