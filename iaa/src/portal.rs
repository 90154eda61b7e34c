// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Ways to hand a descriptor to a work queue, behind one trait.
//!
//! - [`WritePortal`]: `write(2)` of the 64-byte descriptor to `/dev/iax/wqX.Y`. Needs no
//!   special capability; the kernel fills the PASID and issues MOVDIR64B (dedicated WQ) or
//!   ENQCMDS with retries (shared WQ), and returns `EAGAIN` when a shared WQ is full (Linux
//!   `drivers/dma/idxd/cdev.c`, `idxd_cdev_write` → `idxd_submit_user_descriptor`).
//! - [`MappedPortal`]: the WQ's 4 KiB portal page mapped into this process (`mmap` of the same
//!   file; current kernels require CAP_SYS_RAWIO). A dedicated WQ takes MOVDIR64B
//!   (`66 0F 38 F8 /r`), which gives no acceptance feedback, so the caller keeps no more
//!   descriptors in flight than the WQ holds; a shared WQ takes ENQCMD (`F2 0F 38 F8 /r`),
//!   which sets ZF when the WQ refused it (full): retry. An SFENCE first makes this thread's
//!   earlier stores (the source pages, a reset completion record) visible before the device
//!   can read them, as the kernel's `wmb()` before `iosubmit_cmds512` and QPL do.
//! - The software work queue ([`crate::soft::SoftwareQueue`]) implements the same trait.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::hw::Descriptor;

/// What a work queue said to one descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submitted {
    /// The device took it; its completion record will be written.
    Accepted,
    /// The queue is full; nothing was taken. Try again.
    Busy,
}

/// A work queue's submission side.
pub trait Portal: Send + Sync + std::fmt::Debug {
    /// Hands `desc` to the queue.
    ///
    /// # Safety
    /// Every address in `desc` (source, destination, AECS, completion record) stays valid
    /// and, except for reading the completion status, untouched by the caller until the
    /// completion status is nonzero; if it never becomes nonzero, forever (the caller leaks
    /// the memory). The completion record is 64-byte aligned and zeroed.
    unsafe fn submit(&self, desc: &Descriptor) -> io::Result<Submitted>;

    /// Hands over `descs` in order, stopping at the first one the queue refuses as busy;
    /// returns how many it took. An error means none was taken. Portals that can take
    /// several descriptors in one call (`write()`) override this.
    ///
    /// # Safety
    /// As [`Portal::submit`], for every descriptor.
    unsafe fn submit_many(&self, descs: &[Descriptor]) -> io::Result<usize> {
        for (taken, desc) in descs.iter().enumerate() {
            // SAFETY: forwarded from the caller.
            match unsafe { self.submit(desc) } {
                Ok(Submitted::Accepted) => {}
                Ok(Submitted::Busy) => return Ok(taken),
                Err(_) if taken > 0 => return Ok(taken),
                Err(error) => return Err(error),
            }
        }
        Ok(descs.len())
    }

    /// A short description for logs ("write() to /dev/iax/wq1.0", "software work queue").
    fn describe(&self) -> String;

    /// How many descriptors may be in flight at once (the WQ size).
    fn capacity(&self) -> usize;
}

/// How long and how often to retry a busy queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Immediate retries (with a spin hint) before yielding the CPU between tries.
    pub spins: u32,
    /// The longest time to keep retrying one descriptor.
    pub deadline: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        // ENQCMD retries in the kernel: `enqcmds_retries`, 32 by default.
        RetryPolicy {
            spins: 32,
            deadline: Duration::from_millis(2),
        }
    }
}

/// Submits `desc`, retrying while the queue is busy, up to `policy`. Returns
/// [`Submitted::Busy`] if the queue stayed full throughout, and how many busy answers it got.
///
/// # Safety
/// As [`Portal::submit`].
pub unsafe fn submit_with_retry(
    portal: &dyn Portal,
    desc: &Descriptor,
    policy: RetryPolicy,
) -> io::Result<(Submitted, u32)> {
    let start = Instant::now();
    let mut busy = 0u32;
    loop {
        // SAFETY: forwarded from the caller.
        match unsafe { portal.submit(desc) }? {
            Submitted::Accepted => return Ok((Submitted::Accepted, busy)),
            Submitted::Busy => {
                busy += 1;
                if busy <= policy.spins {
                    std::hint::spin_loop();
                } else if start.elapsed() >= policy.deadline {
                    return Ok((Submitted::Busy, busy));
                } else {
                    std::thread::yield_now();
                }
            }
        }
    }
}

/// Submission by `write(2)` on the WQ's character device.
#[derive(Debug)]
pub struct WritePortal {
    file: File,
    name: String,
    capacity: usize,
}

impl WritePortal {
    /// Wraps an open WQ device file of a WQ holding `capacity` descriptors.
    pub fn new(file: File, name: String, capacity: usize) -> WritePortal {
        WritePortal {
            file,
            name,
            capacity,
        }
    }
}

impl Portal for WritePortal {
    unsafe fn submit(&self, desc: &Descriptor) -> io::Result<Submitted> {
        let bytes = desc.to_bytes();
        loop {
            // SAFETY: `bytes` is a live 64-byte buffer; the fd is open for the life of `self`.
            let n =
                unsafe { libc::write(self.file.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
            if n == 64 {
                return Ok(Submitted::Accepted);
            }
            if n >= 0 {
                return Err(io::Error::other(format!(
                    "the kernel took {n} of the descriptor's 64 bytes"
                )));
            }
            let error = io::Error::last_os_error();
            match error.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) | Some(libc::EBUSY) => return Ok(Submitted::Busy),
                _ => return Err(error),
            }
        }
    }

    /// One `write()` for up to eight descriptors: the kernel submits them in order and
    /// returns the bytes of those it took before the first refusal (`idxd_cdev_write`).
    unsafe fn submit_many(&self, descs: &[Descriptor]) -> io::Result<usize> {
        const CHUNK: usize = 8;
        let mut taken = 0;
        for chunk in descs.chunks(CHUNK) {
            let mut bytes = [0u8; 64 * CHUNK];
            for (slot, desc) in bytes.chunks_exact_mut(64).zip(chunk) {
                slot.copy_from_slice(&desc.to_bytes());
            }
            let len = 64 * chunk.len();
            let written = loop {
                // SAFETY: `bytes` holds `len` initialised bytes; the fd is open for the life
                // of `self`; the caller upholds each descriptor's contract.
                let n = unsafe { libc::write(self.file.as_raw_fd(), bytes.as_ptr().cast(), len) };
                if let Ok(n) = usize::try_from(n) {
                    break n;
                }
                let error = io::Error::last_os_error();
                match error.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) | Some(libc::EBUSY) => return Ok(taken),
                    _ if taken > 0 => return Ok(taken),
                    _ => return Err(error),
                }
            };
            taken += written / 64;
            if written < len {
                return Ok(taken);
            }
        }
        Ok(taken)
    }

    fn describe(&self) -> String {
        format!("write() to {}", self.name)
    }

    fn capacity(&self) -> usize {
        self.capacity
    }
}

/// Which instruction a mapped portal takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortalInstruction {
    /// Dedicated WQ: MOVDIR64B, no feedback.
    Movdir64b,
    /// Shared WQ: ENQCMD, ZF = 1 when refused.
    Enqcmd,
}

/// The instruction for a WQ mode: MOVDIR64B for dedicated, ENQCMD for shared.
pub fn instruction_for(dedicated: bool) -> PortalInstruction {
    if dedicated {
        PortalInstruction::Movdir64b
    } else {
        PortalInstruction::Enqcmd
    }
}

/// Whether this CPU has `instruction` (CPUID leaf 7, sub-leaf 0, ECX bit 28 MOVDIR64B, bit 29
/// ENQCMD).
pub fn cpu_has(instruction: PortalInstruction) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // Leaf 7 is valid when leaf 0 reports a maximum of at least 7.
        let max_leaf = std::arch::x86_64::__cpuid(0).eax;
        if max_leaf < 7 {
            return false;
        }
        let ecx = std::arch::x86_64::__cpuid_count(7, 0).ecx;
        let bit = match instruction {
            PortalInstruction::Movdir64b => 28,
            PortalInstruction::Enqcmd => 29,
        };
        ecx & (1 << bit) != 0
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = instruction;
        false
    }
}

/// Whether the kernel lets user space use ENQCMD: it clears the `enqcmd` CPU flag when it
/// cannot give processes a PASID (`arch/x86/kernel/cpu`), and ENQCMD without one faults. The
/// CPUID bit alone says only that the CPU has it.
pub fn kernel_enables_enqcmd() -> bool {
    cpuinfo_has_flag(
        &std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default(),
        "enqcmd",
    )
}

/// Whether the first `flags` line of a `/proc/cpuinfo` text lists `flag`.
fn cpuinfo_has_flag(cpuinfo: &str, flag: &str) -> bool {
    cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("flags")?.split_once(':').map(|(_, f)| f))
        .is_some_and(|flags| flags.split_whitespace().any(|f| f == flag))
}

/// Submission through the WQ's mapped portal page.
#[derive(Debug)]
pub struct MappedPortal {
    /// Kept open for the life of the mapping.
    _file: File,
    portal: *mut u8,
    instruction: PortalInstruction,
    name: String,
    capacity: usize,
}

// SAFETY: the portal is an MMIO page: submissions from several threads are independent
// 64-byte atomic stores (MOVDIR64B/ENQCMD), which the device serialises.
unsafe impl Send for MappedPortal {}
// SAFETY: as above.
unsafe impl Sync for MappedPortal {}

/// The size of a WQ portal.
const PORTAL_SIZE: usize = 4096;

impl MappedPortal {
    /// Maps the portal of the open WQ file `file`, if the kernel lets this process and the CPU
    /// has the instruction the WQ's mode needs.
    pub fn map(
        file: File,
        name: String,
        dedicated: bool,
        capacity: usize,
    ) -> Result<MappedPortal, (File, io::Error)> {
        let instruction = instruction_for(dedicated);
        if !cpu_has(instruction) {
            return Err((
                file,
                io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("this CPU has no {instruction:?}"),
                ),
            ));
        }
        if instruction == PortalInstruction::Enqcmd && !kernel_enables_enqcmd() {
            return Err((
                file,
                io::Error::new(
                    io::ErrorKind::Unsupported,
                    "the kernel does not enable ENQCMD for user space (no 'enqcmd' in \
                     /proc/cpuinfo)",
                ),
            ));
        }
        // SAFETY: maps a fresh shared region of the WQ file; the kernel validates the
        // request (idxd_cdev_mmap) and the result is checked below.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PORTAL_SIZE,
                libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                file.as_raw_fd(),
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err((file, io::Error::last_os_error()));
        }
        Ok(MappedPortal {
            _file: file,
            portal: raw.cast(),
            instruction,
            name,
            capacity,
        })
    }
}

impl Drop for MappedPortal {
    fn drop(&mut self) {
        // SAFETY: `portal` is the PORTAL_SIZE mapping made in `map`, unmapped only here.
        unsafe { libc::munmap(self.portal.cast(), PORTAL_SIZE) };
    }
}

impl Portal for MappedPortal {
    unsafe fn submit(&self, desc: &Descriptor) -> io::Result<Submitted> {
        // SAFETY: `portal` is the live portal mapping of a WQ of the mode `instruction` was
        // chosen for, on a CPU that has it (checked in `map`); `desc` is a 64-byte aligned
        // descriptor (its type's alignment); the caller upholds the descriptor's contract.
        let accepted = unsafe { portal_store(self.instruction, self.portal, desc) };
        Ok(if accepted {
            Submitted::Accepted
        } else {
            Submitted::Busy
        })
    }

    fn describe(&self) -> String {
        format!(
            "{:?} to the mapped portal of {}",
            self.instruction, self.name
        )
    }

    fn capacity(&self) -> usize {
        self.capacity
    }
}

/// Writes `desc` to the portal with `instruction`; false when ENQCMD was refused.
///
/// # Safety
/// `portal` is a mapped IAA WQ portal whose mode matches `instruction`, the CPU supports
/// `instruction`, and `desc`'s addresses satisfy [`Portal::submit`]'s contract.
#[cfg(target_arch = "x86_64")]
unsafe fn portal_store(instruction: PortalInstruction, portal: *mut u8, desc: &Descriptor) -> bool {
    let src: *const Descriptor = desc;
    match instruction {
        PortalInstruction::Movdir64b => {
            // SAFETY: the caller's contract: a 64-byte source (aligned by its type) and a
            // mapped portal; SFENCE orders earlier stores before the device sees the
            // descriptor. MOVDIR64B reg, m512 with the destination address in a register.
            unsafe {
                std::arch::asm!(
                    "sfence",
                    "movdir64b {dst}, zmmword ptr [{src}]",
                    dst = in(reg) portal,
                    src = in(reg) src,
                    options(nostack),
                );
            }
            true
        }
        PortalInstruction::Enqcmd => {
            let refused: u8;
            // SAFETY: as above; ENQCMD reports refusal in ZF, read with SETZ.
            unsafe {
                std::arch::asm!(
                    "sfence",
                    "enqcmd {dst}, zmmword ptr [{src}]",
                    "setz {refused}",
                    dst = in(reg) portal,
                    src = in(reg) src,
                    refused = out(reg_byte) refused,
                    options(nostack),
                );
            }
            refused == 0
        }
    }
}

/// No portal instructions off x86-64: never reached, since [`cpu_has`] says no.
///
/// # Safety
/// None needed; it does nothing.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn portal_store(_: PortalInstruction, _: *mut u8, _: &Descriptor) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A portal that is busy `busy_for` times, then accepts.
    #[derive(Debug)]
    struct BusyPortal {
        busy_for: u32,
        calls: AtomicU32,
    }

    impl Portal for BusyPortal {
        unsafe fn submit(&self, _: &Descriptor) -> io::Result<Submitted> {
            let call = self.calls.fetch_add(1, Ordering::Relaxed);
            Ok(if call < self.busy_for {
                Submitted::Busy
            } else {
                Submitted::Accepted
            })
        }
        fn describe(&self) -> String {
            "busy test portal".into()
        }
        fn capacity(&self) -> usize {
            1
        }
    }

    #[test]
    fn enqcmd_needs_the_kernel_flag_not_just_cpuid() {
        let with = "processor\t: 0\nflags\t\t: fpu sse2 movdiri movdir64b enqcmd\n";
        let without = "processor\t: 0\nflags\t\t: fpu sse2 movdiri movdir64b\n";
        assert!(cpuinfo_has_flag(with, "enqcmd"));
        assert!(!cpuinfo_has_flag(without, "enqcmd"));
        assert!(cpuinfo_has_flag(without, "movdir64b"));
        assert!(!cpuinfo_has_flag("", "enqcmd"));
    }

    #[test]
    fn dedicated_queues_take_movdir64b_and_shared_queues_enqcmd() {
        assert_eq!(instruction_for(true), PortalInstruction::Movdir64b);
        assert_eq!(instruction_for(false), PortalInstruction::Enqcmd);
    }

    #[test]
    fn a_briefly_busy_queue_is_retried_until_it_accepts() {
        let portal = BusyPortal {
            busy_for: 100,
            calls: AtomicU32::new(0),
        };
        // A generous deadline: yielding 68 times may take long on a loaded machine.
        let policy = RetryPolicy {
            spins: 32,
            deadline: Duration::from_secs(5),
        };
        // SAFETY: the test portal never touches the descriptor's addresses.
        let result = unsafe { submit_with_retry(&portal, &Descriptor::default(), policy) };
        assert_eq!(result.unwrap(), (Submitted::Accepted, 100));
    }

    #[test]
    fn a_queue_that_stays_busy_gives_up_at_the_deadline() {
        let portal = BusyPortal {
            busy_for: u32::MAX,
            calls: AtomicU32::new(0),
        };
        let policy = RetryPolicy {
            spins: 4,
            deadline: Duration::from_millis(5),
        };
        let start = Instant::now();
        // SAFETY: the test portal never touches the descriptor's addresses.
        let (outcome, busy) =
            unsafe { submit_with_retry(&portal, &Descriptor::default(), policy) }.unwrap();
        assert_eq!(outcome, Submitted::Busy);
        assert!(busy > 4);
        assert!(start.elapsed() >= Duration::from_millis(5));
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn write_portal_submits_a_batch_in_one_write() {
        // A SOCK_SEQPACKET pair keeps write boundaries: one message means one write().
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors socketpair writes.
        let rc =
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, fds.as_mut_ptr()) };
        assert_eq!(rc, 0);
        // SAFETY: both fds were just created and are owned by nothing else.
        let (ours, theirs) = unsafe {
            use std::os::fd::FromRawFd;
            (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))
        };
        let portal = WritePortal::new(ours, "pair".into(), 16);
        let descs: Vec<Descriptor> = (0..8u32)
            .map(|i| Descriptor {
                src1_size: i,
                ..Descriptor::default()
            })
            .collect();
        // SAFETY: nothing reads the descriptors' (zero) addresses.
        assert_eq!(unsafe { portal.submit_many(&descs) }.unwrap(), 8);
        let mut message = [0u8; 1024];
        let n = std::io::Read::read(&mut &theirs, &mut message).unwrap();
        assert_eq!(n, 512, "eight descriptors in one message");
        for (i, desc) in descs.iter().enumerate() {
            assert_eq!(message[i * 64..][..64], desc.to_bytes());
        }
    }

    #[test]
    fn write_portal_writes_the_64_descriptor_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wq");
        let file = File::create(&path).unwrap();
        let portal = WritePortal::new(file, "test".into(), 16);
        let desc = Descriptor {
            flags_opcode: Descriptor::pack_flags_opcode(0x10c, crate::hw::opcode::DECOMPRESS),
            src1_size: 99,
            ..Descriptor::default()
        };
        // SAFETY: a plain file: nothing reads the descriptor's (zero) addresses.
        let submitted = unsafe { portal.submit(&desc) };
        assert_eq!(submitted.unwrap(), Submitted::Accepted);
        assert_eq!(std::fs::read(&path).unwrap(), desc.to_bytes());
    }
}
