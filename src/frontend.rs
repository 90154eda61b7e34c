// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Who the frontend is: the process at the other end of the vhost-user socket.
//!
//! A state file gives its pages back only to the frontend process that wrote them, so that a
//! VM never reads another VM's memory, nor its own previous boot's. A process is named by its
//! pid and its start time (field 22 of `/proc/PID/stat`, in clock ticks since boot): a pid alone
//! is reused once its process ends, the pair is not while the host runs. The pid comes from the
//! kernel (`SO_PEERCRED` on the accepted connection), not from anything the frontend says.

use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

/// The process at the other end of a connection, as the kernel names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Its pid (in the daemon's pid namespace).
    pub pid: u32,
    /// Its user.
    pub uid: u32,
    /// When it started, in clock ticks since boot, or `None` when `/proc/PID/stat` cannot be
    /// read (a `ProtectProc=invisible` sandbox hides other users' processes): such a peer has
    /// no identity a state file can match.
    pub start_time: Option<u64>,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {} (uid {}", self.pid, self.uid)?;
        match self.start_time {
            Some(ticks) => write!(f, ", started at tick {ticks})"),
            None => write!(f, ", start time unknown)"),
        }
    }
}

/// The peer of `stream`, from `SO_PEERCRED` and `/proc`.
pub fn peer_of(stream: &UnixStream) -> io::Result<Peer> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = socklen_of::<libc::ucred>();
    // SAFETY: `cred` and `len` are live locals of the sizes passed; the kernel writes at most
    // `len` bytes into `cred`, and the fd is a socket the stream owns for the whole call.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::addr_of_mut!(cred).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let pid = u32::try_from(cred.pid)
        .ok()
        .filter(|&pid| pid != 0)
        .ok_or_else(|| io::Error::other("the kernel named no process at the other end"))?;
    Ok(Peer {
        pid,
        uid: cred.uid,
        start_time: process_start_time(pid).ok(),
    })
}

/// The start time of process `pid`, in clock ticks since boot (`/proc/PID/stat` field 22).
pub fn process_start_time(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    start_time_from_stat(&stat).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("/proc/{pid}/stat has no start time"),
        )
    })
}

/// Field 22 of a `/proc/PID/stat` line. The command name (field 2) is in parentheses and may
/// itself hold spaces and parentheses, so the fields are counted after the last `)`.
fn start_time_from_stat(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    // Field 3 (the state) is the first after the name; field 22 is 19 further on.
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// Whether process `pid` still runs and is the one that started at `start_time`.
pub fn process_alive(pid: u32, start_time: u64) -> bool {
    process_start_time(pid).is_ok_and(|t| t == start_time)
}

fn socklen_of<T>() -> libc::socklen_t {
    // Socket option structures are a few bytes long.
    #[allow(clippy::cast_possible_truncation)]
    let len = std::mem::size_of::<T>() as libc::socklen_t;
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_field_22_even_when_the_name_has_spaces_and_parentheses() {
        let stat = "4242 (qemu (vm 1) x) S 1 4242 4242 0 -1 4194560 9 0 0 0 1 2 0 0 20 0 3 0 \
                    987654 1000 100 18446744073709551615";
        assert_eq!(start_time_from_stat(stat), Some(987_654));
        assert_eq!(start_time_from_stat("12 (x) S 1"), None);
        assert_eq!(start_time_from_stat("no name here"), None);
    }

    #[test]
    fn this_process_is_alive_and_a_wrong_start_time_is_not() {
        let pid = std::process::id();
        let start = process_start_time(pid).expect("our own /proc/self/stat");
        assert!(process_alive(pid, start));
        assert!(!process_alive(pid, start + 1));
    }

    #[test]
    fn the_peer_of_a_socket_pair_is_this_process() {
        let (a, _b) = UnixStream::pair().expect("socketpair");
        let peer = peer_of(&a).expect("SO_PEERCRED");
        assert_eq!(peer.pid, std::process::id());
        // SAFETY: getuid has no preconditions and cannot fail.
        assert_eq!(peer.uid, unsafe { libc::getuid() });
        assert_eq!(
            peer.start_time,
            Some(process_start_time(std::process::id()).expect("stat"))
        );
    }
}
