//! The process side of the DSM: [`map`] and [`unmap`], the calls behind
//! `mkdsm_map()` / `mkdsm_unmap()` (`libmk`). A process talks to its
//! kernel's agent over one connection (see `local.rs` for where it is and
//! what is said), kept for the life of the process.
//!
//! Creating the userfaultfd needs root, `CAP_SYS_PTRACE`, or
//! `vm.unprivileged_userfaultfd = 1`; without them the call fails with
//! `EPERM`.

use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Mutex;

use nix::sys::mman::{MapFlags, ProtFlags};
use nix::sys::socket;

use super::local::{self, Reply, Request};
use super::{check_name, check_size, DsmError};

/// The connection, and what this process mapped: (address, length, region).
struct Conn {
    sock: OwnedFd,
    maps: Vec<(usize, usize, u32)>,
}

static CONN: Mutex<Option<Conn>> = Mutex::new(None);

fn connect() -> Result<OwnedFd, DsmError> {
    let sock = local::connect()?;
    let tv = nix::sys::time::TimeVal::new(
        i64::try_from(local::ANSWER_TIMEOUT.as_secs()).unwrap_or(60),
        0,
    );
    let _ = socket::setsockopt(&sock, socket::sockopt::ReceiveTimeout, &tv);
    Ok(sock)
}

/// One request and its answer, with descriptors.
fn ask(conn: &Conn, req: &Request, fds: &[OwnedFd]) -> Result<(Reply, Vec<OwnedFd>), DsmError> {
    let raw: Vec<i32> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    local::send(conn.sock.as_fd(), &req.encode(), &raw).map_err(DsmError::sys("send"))?;
    let (bytes, got) = local::recv(conn.sock.as_fd())
        .map_err(DsmError::sys("receive"))?
        .ok_or(DsmError::Refused {
            errno: libc::ECONNRESET,
            message: "the agent closed the connection".into(),
        })?;
    let reply = Reply::decode(&bytes).map_err(|e| DsmError::Refused {
        errno: libc::EPROTO,
        message: e.to_string(),
    })?;
    match reply {
        Reply::Error { errno, message } => Err(DsmError::Refused { errno, message }),
        r => Ok((r, got)),
    }
}

/// Maps region `name` of `size` bytes (a multiple of 4096) shared with every
/// kernel that maps it; the first map anywhere creates it, zero-filled. The
/// memory is readable and writable at once; accesses fault in pages from
/// the kernel that holds them.
pub fn map(name: &str, size: usize) -> Result<*mut u8, DsmError> {
    let size64 = u64::try_from(size).map_err(|_| DsmError::BadSize(u64::MAX))?;
    check_name(name)?;
    check_size(size64)?;
    let mut guard = CONN.lock().unwrap_or_else(|e| e.into_inner());
    if guard.is_none() {
        *guard = Some(Conn {
            sock: connect()?,
            maps: Vec::new(),
        });
    }
    let conn = guard.as_mut().ok_or(DsmError::EngineGone)?;
    let result = map_on(conn, name, size64, size);
    if matches!(
        &result,
        Err(DsmError::Sys { .. }
            | DsmError::Refused {
                errno: libc::ECONNRESET,
                ..
            })
    ) {
        // The agent may have restarted: connect again next time.
        *guard = None;
    }
    result
}

fn map_on(conn: &mut Conn, name: &str, size64: u64, size: usize) -> Result<*mut u8, DsmError> {
    let (reply, mut fds) = ask(
        conn,
        &Request::Open {
            name: name.to_string(),
            size: size64,
        },
        &[],
    )?;
    let (Reply::Opened { region, .. }, Some(memfd)) = (reply, fds.pop()) else {
        return Err(DsmError::Refused {
            errno: libc::EPROTO,
            message: "the agent answered open without a descriptor".into(),
        });
    };
    let len = NonZeroUsize::new(size).ok_or(DsmError::BadSize(0))?;
    // SAFETY: a fresh shared mapping of `len` bytes of `memfd` at an address
    // the kernel chooses: it overlaps nothing of ours, and the caller gets
    // the pointer and its length and owns the mapping from here on.
    let addr = unsafe {
        nix::sys::mman::mmap(
            None,
            len,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
            memfd.as_fd(),
            0,
        )
    }
    .map_err(DsmError::sys("mmap"))?;
    drop(memfd);
    let undo = |e| {
        // SAFETY: `addr`/`len` is the mapping made above, not yet handed out.
        let _ = unsafe { nix::sys::mman::munmap(addr, size) };
        e
    };
    let a = addr.as_ptr() as u64;
    let uffd = crate::uffd::create()
        .map_err(DsmError::sys("userfaultfd"))
        .map_err(undo)?;
    ask(
        conn,
        &Request::Attach {
            region,
            addr: a,
            len: size64,
        },
        &[uffd],
    )
    .map_err(undo)?;
    conn.maps.push((addr.as_ptr() as usize, size, region));
    Ok(addr.as_ptr().cast())
}

/// Unmaps a region mapped by [`map`] (`addr` and `size` as it returned
/// them).
pub fn unmap(addr: *mut u8, size: usize) -> Result<(), DsmError> {
    let mut guard = CONN.lock().unwrap_or_else(|e| e.into_inner());
    let conn = guard.as_mut().ok_or(DsmError::NotMapped(addr as u64))?;
    let at = conn
        .maps
        .iter()
        .position(|m| m.0 == addr as usize && m.1 == size)
        .ok_or(DsmError::NotMapped(addr as u64))?;
    let (_, _, region) = conn.maps.remove(at);
    let ptr = std::ptr::NonNull::new(addr.cast()).ok_or(DsmError::NotMapped(0))?;
    // SAFETY: `addr`/`size` is a mapping `map` made and handed out, found in
    // our table; the caller gives it back and must not use it again.
    unsafe { nix::sys::mman::munmap(ptr, size) }.map_err(DsmError::sys("munmap"))?;
    ask(
        conn,
        &Request::Detach {
            region,
            addr: addr as u64,
        },
        &[],
    )?;
    Ok(())
}
