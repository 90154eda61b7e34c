// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The two pieces of systemd's service protocol the daemon speaks, without libsystemd:
//!
//! - `sd_notify`: a datagram to `$NOTIFY_SOCKET` — `READY=1` once the daemon listens, and the
//!   file descriptor store (`FDSTORE=1` + `FDNAME=` with the fd attached as `SCM_RIGHTS`,
//!   `FDSTOREREMOVE=1` to drop it). A unit with `FileDescriptorStoreMax=` keeps stored fds
//!   while the service restarts and hands them back to the next start.
//! - `sd_listen_fds_with_names`: the fds systemd passes (`$LISTEN_PID`, `$LISTEN_FDS`,
//!   `$LISTEN_FDNAMES`), from fd 3 on — the socket unit's listening socket and the stored fds.
//!
//! Outside systemd (`$NOTIFY_SOCKET` unset) notifications are no-ops.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Mutex;

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// Sends `message` (newline-separated `KEY=VALUE` lines) to the service manager. Returns
/// `Ok(false)` when the daemon does not run under one (`$NOTIFY_SOCKET` unset).
pub fn notify(message: &str) -> io::Result<bool> {
    send(message, None)
}

/// Puts `fd` in the unit's file descriptor store under `name`, replacing an fd stored under
/// that name before (systemd keeps one per name when the daemon removes the old one first;
/// [`remove_fd`]). Returns `Ok(false)` outside systemd.
pub fn store_fd(name: &str, fd: BorrowedFd<'_>) -> io::Result<bool> {
    check_name(name)?;
    send(&format!("FDSTORE=1\nFDNAME={name}"), Some(fd))
}

/// Removes the fds stored under `name`. Returns `Ok(false)` outside systemd.
pub fn remove_fd(name: &str) -> io::Result<bool> {
    check_name(name)?;
    send(&format!("FDSTOREREMOVE=1\nFDNAME={name}"), None)
}

/// Whether the daemon runs under a service manager that listens for notifications.
pub fn under_service_manager() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty())
}

/// Takes the fd systemd passed under `name` (`$LISTEN_FDNAMES`), if it passed one to this
/// process. Each passed fd is handed out once; it is made close-on-exec.
pub fn take_passed_fd(name: &str) -> Option<OwnedFd> {
    static TAKEN: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());
    let fd = passed_fd_named(
        std::env::var_os("LISTEN_PID"),
        std::env::var_os("LISTEN_FDS"),
        std::env::var_os("LISTEN_FDNAMES"),
        std::process::id(),
        name,
    )?;
    let mut taken = TAKEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if taken.contains(&fd) {
        return None;
    }
    // SAFETY: fcntl on an fd number has no memory effects; a closed fd fails with EBADF.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return None;
    }
    taken.push(fd);
    // SAFETY: systemd passed this fd to this process (LISTEN_PID is ours), it is open (fcntl
    // succeeded), and the TAKEN list makes this the one owner: nothing else in the daemon
    // opens fds by number except `--fd`, which names the listening socket, not a stored fd.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The fd number passed under `name`, from the three environment variables' values.
fn passed_fd_named(
    listen_pid: Option<OsString>,
    listen_fds: Option<OsString>,
    listen_fdnames: Option<OsString>,
    our_pid: u32,
    name: &str,
) -> Option<RawFd> {
    let pid: u32 = listen_pid?.to_str()?.parse().ok()?;
    if pid != our_pid {
        return None;
    }
    let count: usize = listen_fds?.to_str()?.parse().ok()?;
    let names = listen_fdnames?;
    let index = names
        .as_bytes()
        .split(|&b| b == b':')
        .take(count)
        .position(|n| n == name.as_bytes())?;
    LISTEN_FDS_START.checked_add(RawFd::try_from(index).ok()?)
}

/// Checks `name` is one systemd accepts for a stored fd: 1 to 255 printable characters, no
/// colon or space (the error says so).
pub fn check_name(name: &str) -> io::Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 255
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
    if valid {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{name:?} is not a file descriptor name systemd accepts (1 to 255 printable \
                 characters, no colon)"
            ),
        ))
    }
}

fn send(message: &str, fd: Option<BorrowedFd<'_>>) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty()) else {
        return Ok(false);
    };
    send_to(path.as_bytes(), message, fd)?;
    Ok(true)
}

/// Sends `message` (and `fd`) as one datagram to the socket at `path` (`@name`: abstract).
fn send_to(path: &[u8], message: &str, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    // SAFETY: an all-zero sockaddr_un is a valid value of the type.
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    // AF_UNIX is 1.
    #[allow(clippy::cast_possible_truncation)]
    {
        address.sun_family = libc::AF_UNIX as libc::sa_family_t;
    }
    if path.is_empty() || path.len() >= address.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "NOTIFY_SOCKET is not a socket path",
        ));
    }
    let abstract_name = path[0] == b'@';
    for (dst, &src) in address.sun_path.iter_mut().zip(path) {
        // sun_path is c_char; the bytes are copied as they are.
        #[allow(clippy::cast_possible_wrap)]
        let byte = src as libc::c_char;
        *dst = byte;
    }
    if abstract_name {
        address.sun_path[0] = 0;
    }
    let path_offset = std::mem::size_of::<libc::sa_family_t>();
    // An abstract address is exactly as long as its name; a path one has its NUL.
    let length = path_offset + path.len() + usize::from(!abstract_name);
    // SAFETY: socket() has no memory effects; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a socket we just created and own.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut iov = libc::iovec {
        iov_base: message.as_ptr().cast_mut().cast(),
        iov_len: message.len(),
    };
    // Room for one cmsghdr carrying one fd, aligned as CMSG_SPACE requires.
    let mut control = [0u64; 4];
    // SAFETY: an all-zero msghdr is a valid value of the type.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_name = std::ptr::addr_of_mut!(address).cast();
    // At most 110 bytes.
    #[allow(clippy::cast_possible_truncation)]
    {
        header.msg_namelen = length as libc::socklen_t;
    }
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    if let Some(fd) = fd {
        // Four bytes.
        #[allow(clippy::cast_possible_truncation)]
        let fd_len = std::mem::size_of::<RawFd>() as u32;
        // SAFETY: CMSG_SPACE is arithmetic.
        let space = unsafe { libc::CMSG_SPACE(fd_len) } as usize;
        debug_assert!(space <= std::mem::size_of_val(&control));
        header.msg_control = control.as_mut_ptr().cast();
        header.msg_controllen = space;
        // SAFETY: msg_control points at `control`, which is at least `space` bytes and
        // aligned for cmsghdr (u64), so CMSG_FIRSTHDR returns a pointer into it that has room
        // for one header and one fd; we write exactly those.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&header);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_len) as usize;
            libc::CMSG_DATA(cmsg)
                .cast::<RawFd>()
                .write_unaligned(fd.as_raw_fd());
        }
    }
    // SAFETY: every pointer in `header` points at a live local (address, iov, message,
    // control) of the length given, for the duration of the call.
    let sent = unsafe { libc::sendmsg(socket.as_raw_fd(), &header, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one notification on `socket` (a stand-in for systemd's) and the fd it carries, if
/// any: for tests of the daemon's notifications.
#[cfg(any(test, feature = "testing"))]
pub fn receive_notification(
    socket: &std::os::unix::net::UnixDatagram,
) -> io::Result<(String, Option<OwnedFd>)> {
    let mut buffer = [0u8; 512];
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: buffer.len(),
    };
    // SAFETY: an all-zero msghdr is valid; every pointer set below is to a live local of
    // the length given.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    header.msg_control = control.as_mut_ptr().cast();
    header.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: as above; recvmsg writes within the given lengths.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut header, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let text = String::from_utf8_lossy(&buffer[..n.cast_unsigned()]).into_owned();
    // SAFETY: the kernel filled msg_control; CMSG_FIRSTHDR/CMSG_DATA stay inside it, and
    // an SCM_RIGHTS message's data is the fd the kernel installed for us.
    let fd = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&header);
        if cmsg.is_null() || (*cmsg).cmsg_type != libc::SCM_RIGHTS {
            None
        } else {
            let raw = libc::CMSG_DATA(cmsg).cast::<RawFd>().read_unaligned();
            Some(OwnedFd::from_raw_fd(raw))
        }
    };
    Ok((text, fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    #[test]
    fn the_passed_fd_is_found_by_name_only_for_our_pid() {
        let os = |s: &str| Some(OsString::from(s));
        let find = |pid: &str, fds: &str, names: &str, name: &str| {
            passed_fd_named(os(pid), os(fds), os(names), 42, name)
        };
        assert_eq!(find("42", "3", "vuz.socket:state:other", "state"), Some(4));
        assert_eq!(find("42", "3", "vuz.socket:state:other", "other"), Some(5));
        assert_eq!(
            find("43", "3", "vuz.socket:state", "state"),
            None,
            "another pid's fds"
        );
        assert_eq!(
            find("42", "1", "vuz.socket:state", "state"),
            None,
            "past LISTEN_FDS"
        );
        assert_eq!(find("42", "2", "vuz.socket:state", "missing"), None);
        assert_eq!(find("x", "2", "a:b", "a"), None);
        assert_eq!(passed_fd_named(None, os("1"), os("a"), 42, "a"), None);
    }

    #[test]
    fn names_systemd_refuses_are_refused_here() {
        assert!(check_name("vhost-user-zram-state").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a:b").is_err());
        assert!(check_name("a b").is_err());
        assert!(check_name(&"x".repeat(256)).is_err());
    }

    #[test]
    fn a_stored_fd_arrives_with_its_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let manager = UnixDatagram::bind(&path).expect("bind");
        let file = tempfile::tempfile().expect("tempfile");
        send_to(
            path.as_os_str().as_bytes(),
            "FDSTORE=1\nFDNAME=state",
            Some(std::os::fd::AsFd::as_fd(&file)),
        )
        .expect("sendmsg");
        let (text, fd) = receive_notification(&manager).expect("recvmsg");
        assert_eq!(text, "FDSTORE=1\nFDNAME=state");
        let fd = fd.expect("an fd came with the message");
        let mut ours = std::mem::MaybeUninit::<libc::stat>::uninit();
        let mut theirs = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: both fds are open and the stat buffers are live and large enough.
        let (ours, theirs) = unsafe {
            assert_eq!(libc::fstat(file.as_raw_fd(), ours.as_mut_ptr()), 0);
            assert_eq!(libc::fstat(fd.as_raw_fd(), theirs.as_mut_ptr()), 0);
            (ours.assume_init(), theirs.assume_init())
        };
        assert_eq!((ours.st_dev, ours.st_ino), (theirs.st_dev, theirs.st_ino));
    }

    #[test]
    fn a_notification_to_an_abstract_socket_arrives() {
        let name = format!("vuz-test-notify-{}", std::process::id());
        let address =
            <std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(
                name.as_bytes(),
            )
            .expect("abstract name");
        let manager = UnixDatagram::bind_addr(&address).expect("bind abstract");
        send_to(format!("@{name}").as_bytes(), "READY=1", None).expect("send");
        let (text, fd) = receive_notification(&manager).expect("recvmsg");
        assert_eq!(text, "READY=1");
        assert!(fd.is_none());
    }
}
