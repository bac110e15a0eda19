//! The unsafe core of userfaultfd, shared by lazy restore and the DSM: the
//! few `userfaultfd` ioctls and the pidfd calls that move a descriptor out
//! of another process, written by hand from the uAPI header
//! `include/uapi/linux/userfaultfd.h` (the `userfaultfd` crate's -sys crate
//! needs libclang at build time).
//!
//! Each wrapper passes the kernel a pointer to a `#[repr(C)]` struct laid
//! out as in that header, owned by the wrapper for the whole call; that is
//! the soundness argument of every ioctl here. No policy lives in this
//! module: it converts between the kernel's structs and plain values.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::unistd::Pid;

/// `_IOC(dir, 0xAA, nr, size)` from `asm-generic/ioctl.h`: dir in bits
/// 30-31 (1 write, 2 read), size in 16-29, type in 8-15, nr in 0-7.
const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;
/// `#define UFFDIO 0xAA`
const UFFDIO: u64 = 0xAA;
/// `#define UFFD_API ((__u64)0xAA)`
const UFFD_API: u64 = 0xAA;

/// `UFFDIO_API _IOWR(UFFDIO, _UFFDIO_API (0x3F), struct uffdio_api)`
pub(crate) const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, 0x3F, size_of::<UffdioApi>());
/// `UFFDIO_REGISTER _IOWR(UFFDIO, _UFFDIO_REGISTER (0x00), struct uffdio_register)`
pub(crate) const UFFDIO_REGISTER: u64 =
    ioc(IOC_READ | IOC_WRITE, 0x00, size_of::<UffdioRegister>());
/// `UFFDIO_WAKE _IOR(UFFDIO, _UFFDIO_WAKE (0x02), struct uffdio_range)`
pub(crate) const UFFDIO_WAKE: u64 = ioc(IOC_READ, 0x02, size_of::<UffdioRange>());
/// `UFFDIO_COPY _IOWR(UFFDIO, _UFFDIO_COPY (0x03), struct uffdio_copy)`
pub(crate) const UFFDIO_COPY: u64 = ioc(IOC_READ | IOC_WRITE, 0x03, size_of::<UffdioCopy>());
/// `UFFDIO_ZEROPAGE _IOWR(UFFDIO, _UFFDIO_ZEROPAGE (0x04), struct uffdio_zeropage)`
pub(crate) const UFFDIO_ZEROPAGE: u64 =
    ioc(IOC_READ | IOC_WRITE, 0x04, size_of::<UffdioZeropage>());
/// `UFFDIO_WRITEPROTECT _IOWR(UFFDIO, _UFFDIO_WRITEPROTECT (0x06), struct uffdio_writeprotect)`
pub(crate) const UFFDIO_WRITEPROTECT: u64 =
    ioc(IOC_READ | IOC_WRITE, 0x06, size_of::<UffdioWriteprotect>());

// The numbers the header's macros compile to on x86_64, and the sizes of
// its structs: a hand-written value or layout that drifts fails the build.
const _: () = {
    assert!(UFFDIO_API == 0xc018_aa3f);
    assert!(UFFDIO_REGISTER == 0xc020_aa00);
    assert!(UFFDIO_WAKE == 0x8010_aa02);
    assert!(UFFDIO_COPY == 0xc028_aa03);
    assert!(UFFDIO_ZEROPAGE == 0xc020_aa04);
    assert!(UFFDIO_WRITEPROTECT == 0xc018_aa06);
    assert!(size_of::<UffdioWriteprotect>() == 24);
    assert!(size_of::<UffdioApi>() == 24);
    assert!(size_of::<UffdioRange>() == 16);
    assert!(size_of::<UffdioRegister>() == 32);
    assert!(size_of::<UffdioCopy>() == 40);
    assert!(size_of::<UffdioZeropage>() == 32);
};

/// `UFFDIO_REGISTER_MODE_MISSING ((__u64)1<<0)`
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
/// `UFFDIO_REGISTER_MODE_WP ((__u64)1<<1)`
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_WRITEPROTECT_MODE_WP ((__u64)1<<0)`
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;
/// `UFFD_PAGEFAULT_FLAG_WRITE (1<<0)`, `UFFD_PAGEFAULT_FLAG_WP (1<<1)`
/// (`uffd_msg.arg.pagefault.flags`).
pub(crate) const PAGEFAULT_FLAG_WRITE: u64 = 1;
pub(crate) const PAGEFAULT_FLAG_WP: u64 = 1 << 1;

/// `UFFD_FEATURE_MISSING_SHMEM (1<<5)`: missing faults on shmem (memfd).
pub(crate) const FEATURE_MISSING_SHMEM: u64 = 1 << 5;
/// `UFFD_FEATURE_THREAD_ID (1<<8)`: the faulting thread's id in the message.
pub(crate) const FEATURE_THREAD_ID: u64 = 1 << 8;
/// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1<<12)`: write-protect on shmem (and
/// markers on pages not mapped yet, so no write slips through).
pub(crate) const FEATURE_WP_SHMEM: u64 = 1 << 12;

/// `UFFD_FEATURE_EVENT_FORK (1<<1)`: a fork of the process gives the
/// reader a userfaultfd of the child's copy of every registered range.
pub(crate) const FEATURE_EVENT_FORK: u64 = 1 << 1;
/// `UFFD_FEATURE_EVENT_REMAP (1<<2)`: mremap of a registered range keeps it
/// registered and reports the move (without it the moved range silently
/// loses its registration and its missing pages read as zero).
pub(crate) const FEATURE_EVENT_REMAP: u64 = 1 << 2;
/// `UFFD_FEATURE_EVENT_REMOVE (1<<3)`: `madvise(MADV_DONTNEED/REMOVE)`.
pub(crate) const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// `UFFD_FEATURE_EVENT_UNMAP (1<<6)`: munmap (and mmap/mremap over a range).
pub(crate) const FEATURE_EVENT_UNMAP: u64 = 1 << 6;

/// `UFFD_EVENT_PAGEFAULT 0x12` and friends (`uffd_msg.event`).
pub(crate) const EVENT_PAGEFAULT: u8 = 0x12;
pub(crate) const EVENT_FORK: u8 = 0x13;
pub(crate) const EVENT_REMAP: u8 = 0x14;
pub(crate) const EVENT_REMOVE: u8 = 0x15;
pub(crate) const EVENT_UNMAP: u8 = 0x16;

/// `struct uffdio_api { __u64 api; __u64 features; __u64 ioctls; }`
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_range { __u64 start; __u64 len; }`
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_register { struct uffdio_range range; __u64 mode; __u64 ioctls; }`
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_copy { __u64 dst; __u64 src; __u64 len; __u64 mode; __s64 copy; }`
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `struct uffdio_zeropage { struct uffdio_range range; __u64 mode; __s64 zeropage; }`
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffdio_writeprotect { struct uffdio_range range; __u64 mode; }`
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `sizeof(struct uffd_msg)`: 8 bytes of event + reserved, a 24-byte union
/// (`__attribute__((packed))`).
pub(crate) const MSG_SIZE: usize = 32;

/// One `struct uffd_msg`, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Msg {
    /// `arg.pagefault.{flags, address, feat.ptid}` (`tid` is 0 without
    /// `UFFD_FEATURE_THREAD_ID`).
    Fault {
        address: u64,
        flags: u64,
        tid: u32,
    },
    /// `arg.fork.ufd`: a descriptor the kernel put in the reader's table
    /// for the child's ranges (its owner must close it).
    Fork {
        ufd: i32,
    },
    /// `arg.remap.{from, to, len}`
    Remap {
        from: u64,
        to: u64,
        len: u64,
    },
    /// `arg.remove.{start, end}` (madvise)
    Remove {
        start: u64,
        end: u64,
    },
    /// `arg.remove.{start, end}` (munmap; same layout)
    Unmap {
        start: u64,
        end: u64,
    },
    Other(u8),
}

impl Msg {
    pub(crate) fn parse(b: &[u8; MSG_SIZE]) -> Msg {
        let w =
            |i: usize| u64::from_le_bytes(b[8 + i * 8..16 + i * 8].try_into().unwrap_or([0; 8]));
        match b[0] {
            EVENT_PAGEFAULT => Msg::Fault {
                address: w(1),
                flags: w(0),
                tid: u32::from_le_bytes(b[24..28].try_into().unwrap_or([0; 4])),
            },
            EVENT_FORK => Msg::Fork {
                ufd: i32::from_le_bytes(b[8..12].try_into().unwrap_or([0xff; 4])),
            },
            EVENT_REMAP => Msg::Remap {
                from: w(0),
                to: w(1),
                len: w(2),
            },
            EVENT_REMOVE => Msg::Remove {
                start: w(0),
                end: w(1),
            },
            EVENT_UNMAP => Msg::Unmap {
                start: w(0),
                end: w(1),
            },
            e => Msg::Other(e),
        }
    }
}

/// A userfaultfd of another process's mm, held by the restorer.
#[derive(Debug)]
pub(crate) struct Uffd(OwnedFd);

fn ioctl<T>(fd: RawFd, req: u64, arg: &mut T) -> nix::Result<()> {
    // SAFETY: `arg` is a live, exclusively borrowed `#[repr(C)]` struct whose
    // layout and size are the ones encoded in `req` (see the constants
    // above); the kernel reads and writes only within it for these ioctls.
    let r = unsafe { libc::ioctl(fd, req as libc::Ioctl, std::ptr::from_mut(arg)) };
    if r == -1 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

impl Uffd {
    pub(crate) fn from_fd(fd: OwnedFd) -> Self {
        Uffd(fd)
    }

    /// `UFFDIO_API` with `features`; returns the features the kernel grants.
    /// The descriptor, for another owner (the DSM engine registers it).
    pub(crate) fn api(&self, features: u64) -> nix::Result<u64> {
        let mut a = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        ioctl(self.0.as_raw_fd(), UFFDIO_API, &mut a)?;
        Ok(a.features)
    }

    /// `UFFDIO_REGISTER` in missing mode.
    pub(crate) fn register_missing(&self, start: u64, len: u64) -> nix::Result<u64> {
        let mut r = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        ioctl(self.0.as_raw_fd(), UFFDIO_REGISTER, &mut r)?;
        Ok(r.ioctls)
    }

    /// `UFFDIO_REGISTER` in missing and write-protect modes.
    pub(crate) fn register_missing_wp(&self, start: u64, len: u64) -> nix::Result<u64> {
        let mut r = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        ioctl(self.0.as_raw_fd(), UFFDIO_REGISTER, &mut r)?;
        Ok(r.ioctls)
    }

    /// `UFFDIO_WRITEPROTECT` of `[start, start + len)`: on (writes fault;
    /// on a page not mapped yet a marker is left, so its first write faults
    /// too), or off (which wakes the threads waiting there).
    pub(crate) fn write_protect(&self, start: u64, len: u64, on: bool) -> nix::Result<()> {
        let mut w = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode: if on { UFFDIO_WRITEPROTECT_MODE_WP } else { 0 },
        };
        ioctl(self.0.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut w)
    }

    /// `UFFDIO_COPY` of `src` (whole pages) to `dst`, waking the faulting
    /// threads. Returns the bytes copied: fewer than asked when a later page
    /// failed (e.g. it exists already); asking again from there returns
    /// that page's error.
    pub(crate) fn copy(&self, dst: u64, src: &[u8]) -> nix::Result<u64> {
        let mut c = UffdioCopy {
            dst,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: 0,
            copy: 0,
        };
        // The kernel reads `len` bytes at `src`: `src` is a live slice of
        // exactly that length for the whole call.
        ioctl(self.0.as_raw_fd(), UFFDIO_COPY, &mut c)?;
        Ok(c.copy.max(0) as u64)
    }

    /// `UFFDIO_ZEROPAGE` of `len` bytes at `start`, waking faulters; the
    /// bytes done, as for [`Uffd::copy`]. (Shared memory takes it too: the
    /// kernel places a zeroed page there, since Linux 4.14.)
    pub(crate) fn zeropage(&self, start: u64, len: u64) -> nix::Result<u64> {
        let mut z = UffdioZeropage {
            range: UffdioRange { start, len },
            mode: 0,
            zeropage: 0,
        };
        ioctl(self.0.as_raw_fd(), UFFDIO_ZEROPAGE, &mut z)?;
        Ok(z.zeropage.max(0) as u64)
    }

    /// `UFFDIO_WAKE`: wakes threads waiting on `[start, start + len)` (a
    /// fault whose page another path already filled).
    pub(crate) fn wake(&self, start: u64, len: u64) -> nix::Result<()> {
        let mut r = UffdioRange { start, len };
        ioctl(self.0.as_raw_fd(), UFFDIO_WAKE, &mut r)
    }

    /// Reads pending messages (the fd is non-blocking): `Ok(0)` when none.
    pub(crate) fn read(&self, out: &mut Vec<Msg>) -> nix::Result<usize> {
        let mut buf = [[0u8; MSG_SIZE]; 64];
        // SAFETY: `buf` is a live local array of 64 * MSG_SIZE bytes and we
        // pass exactly that length; read(2) writes only within it.
        let r = unsafe {
            libc::read(
                self.0.as_raw_fd(),
                buf.as_mut_ptr().cast::<libc::c_void>(),
                size_of_val(&buf),
            )
        };
        if r < 0 {
            return match Errno::last() {
                Errno::EAGAIN => Ok(0),
                e => Err(e),
            };
        }
        let n = r as usize / MSG_SIZE;
        out.extend(buf[..n].iter().map(Msg::parse));
        Ok(n)
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// `pidfd_open(pid, 0)`.
pub fn pidfd_open(pid: Pid) -> nix::Result<OwnedFd> {
    // SAFETY: pidfd_open takes two integers and returns a new descriptor,
    // which we own from here on.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0u32) };
    if r < 0 {
        return Err(Errno::last());
    }
    // SAFETY: `r` is a descriptor the kernel just opened for us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// Blocks until process `pid` has exited (its pidfd polls readable), without
/// waiting for it: no ptrace stop or exit report is taken from a thread that
/// traces it. Returns at once if no pidfd can be had (e.g. already reaped).
pub(crate) fn wait_exit(pid: Pid) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let Ok(fd) = pidfd_open(pid) else { return };
    loop {
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Err(Errno::EINTR) => continue,
            Ok(_) | Err(_) => return,
        }
    }
}

/// `pidfd_send_signal(pidfd, sig, NULL, 0)`: no pid-reuse race once the
/// caller has reaped the process.
pub(crate) fn pidfd_kill(pidfd: &OwnedFd, sig: i32) -> nix::Result<()> {
    // SAFETY: integers and a null siginfo pointer (the kernel then builds
    // the siginfo of a plain kill()).
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

/// A new userfaultfd of the calling process (`O_CLOEXEC | O_NONBLOCK`).
pub(crate) fn create() -> nix::Result<OwnedFd> {
    // SAFETY: userfaultfd(2) takes flags and returns a new descriptor that
    // we own from here on.
    let r = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if r < 0 {
        return Err(Errno::last());
    }
    // SAFETY: `r` is the descriptor the kernel just opened for us.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// `tgkill(pid, tid, sig)`: a signal to one thread (a DSM fault that can
/// never be served gets SIGBUS in the thread that faulted).
pub(crate) fn tgkill(pid: i32, tid: i32, sig: i32) -> nix::Result<()> {
    // SAFETY: three integers in; no memory is passed.
    let r = unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, sig) };
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

/// `pidfd_getfd(pidfd, fd, 0)`: a duplicate (close-on-exec) of descriptor
/// `fd` of the process behind `pidfd`.
pub(crate) fn pidfd_getfd(pidfd: &OwnedFd, fd: i32) -> nix::Result<OwnedFd> {
    // SAFETY: three integers in, a new descriptor out.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0u32) };
    if r < 0 {
        return Err(Errno::last());
    }
    // SAFETY: `r` is a descriptor the kernel just installed in our table.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_decode() {
        let mut b = [0u8; MSG_SIZE];
        b[0] = EVENT_PAGEFAULT;
        b[8..16].copy_from_slice(&1u64.to_le_bytes()); // flags: write
        b[16..24].copy_from_slice(&0x7f00_1234_5000u64.to_le_bytes());
        b[24..28].copy_from_slice(&77u32.to_le_bytes()); // ptid
        assert_eq!(
            Msg::parse(&b),
            Msg::Fault {
                address: 0x7f00_1234_5000,
                flags: PAGEFAULT_FLAG_WRITE,
                tid: 77
            }
        );
        b[0] = EVENT_REMAP;
        b[24..32].copy_from_slice(&0x2000u64.to_le_bytes());
        assert_eq!(
            Msg::parse(&b),
            Msg::Remap {
                from: 1,
                to: 0x7f00_1234_5000,
                len: 0x2000
            }
        );
        b[0] = EVENT_UNMAP;
        assert_eq!(
            Msg::parse(&b),
            Msg::Unmap {
                start: 1,
                end: 0x7f00_1234_5000
            }
        );
    }
}
