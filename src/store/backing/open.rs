// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Opening a backing file: what a path may name (a regular file or a block device), `O_DIRECT`
//! with its buffered fallback, the `flock` against a second daemon, and the extended attribute
//! that marks a file as ours so someone else's data is never truncated.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use super::io::FileIo;
use super::{BackingError, BackingFile, BackingIo};

/// `BLKGETSIZE64`, `_IOR(0x12, 114, u64)` in the asm-generic ioctl layout (x86, arm, riscv).
const BLKGETSIZE64: u64 = (2 << 30) | (8 << 16) | (0x12 << 8) | 114;

/// The kind of file a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PathKind {
    Regular,
    BlockDevice,
}

fn path_kind(path: &Path, file_type: std::fs::FileType) -> Result<PathKind, BackingError> {
    let kind = if file_type.is_file() {
        return Ok(PathKind::Regular);
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
    /// locks it against other processes, and truncates a regular file (its contents are
    /// meaningless without the slot table that referenced them). A non-empty regular file is
    /// taken only if it carries the mark (an extended attribute) an earlier vhost-user-zram set
    /// on its backing file; any other is refused ([`BackingError::NotOurs`]), never clobbered.
    pub fn open(path: &Path) -> Result<BackingFile, BackingError> {
        BackingFile::open_with(path, true, |io| io)
    }

    /// As [`BackingFile::open`], with the file's I/O passed through `wrap`: tests put a
    /// fault injector (`FaultyIo`) between the backing file and a real file this way.
    pub fn open_wrapped(
        path: &Path,
        wrap: impl FnOnce(Box<dyn BackingIo>) -> Box<dyn BackingIo>,
    ) -> Result<BackingFile, BackingError> {
        BackingFile::open_with(path, true, wrap)
    }

    /// As [`BackingFile::open_wrapped`]; `try_direct: false` skips `O_DIRECT` (tests of the
    /// fallback).
    pub(super) fn open_with(
        path: &Path,
        try_direct: bool,
        wrap: impl FnOnce(Box<dyn BackingIo>) -> Box<dyn BackingIo>,
    ) -> Result<BackingFile, BackingError> {
        let io_error = |op, source| BackingError::Io {
            op,
            path: path.to_owned(),
            offset: 0,
            source,
        };
        let kind = match std::fs::metadata(path) {
            Ok(meta) => path_kind(path, meta.file_type())?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => PathKind::Regular,
            Err(e) => return Err(io_error("stat", e)),
        };
        let (file, direct) = if try_direct {
            match open_file(path, kind, libc::O_DIRECT) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    (open_file(path, kind, 0), false)
                }
                result => (result, true),
            }
        } else {
            (open_file(path, kind, 0), false)
        };
        let file = file.map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => BackingError::Locked {
                path: path.to_owned(),
            },
            _ => io_error("open", e),
        })?;
        let meta = file.metadata().map_err(|e| io_error("stat", e))?;
        if path_kind(path, meta.file_type())? != kind {
            return Err(io_error(
                "open",
                io::Error::other("the path changed kind while it was opened"),
            ));
        }
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
        let capacity = match kind {
            PathKind::Regular => {
                // Never clobber someone else's file: a non-empty file is taken only if an
                // earlier vhost-user-zram marked it as its backing file.
                if meta.len() > 0 && !has_owner_mark(&file) {
                    return Err(BackingError::NotOurs {
                        path: path.to_owned(),
                        len: meta.len(),
                    });
                }
                file.set_len(0).map_err(|e| io_error("truncate", e))?;
                set_owner_mark(&file);
                None
            }
            PathKind::BlockDevice => {
                let mut size = 0u64;
                // BLKGETSIZE64 fits every libc's ioctl request type (u32 bits).
                #[allow(clippy::cast_possible_truncation)]
                let request = BLKGETSIZE64 as libc::Ioctl;
                // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at a
                // live local u64; the fd is open.
                let rc = unsafe { libc::ioctl(file.as_raw_fd(), request, &mut size as *mut u64) };
                if rc != 0 {
                    return Err(io_error("BLKGETSIZE64", io::Error::last_os_error()));
                }
                Some(size)
            }
        };
        let mut backing = BackingFile::with_io(wrap(Box::new(FileIo { file, direct })), capacity);
        backing.path = path.to_owned();
        backing.direct = direct;
        Ok(backing)
    }
}

fn open_file(path: &Path, kind: PathKind, flags: libc::c_int) -> io::Result<File> {
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
