//! The process side of thread migration: [`migrate`] moves the calling
//! thread to another kernel, [`kernel_id`] says where it runs. The calls
//! behind `mk_migrate()` / `mk_kernel_id()` (`libmk`).
//!
//! Each thread talks to the agent of the kernel it runs on over a
//! connection of its own (the local socket, see `crate::dsm::local`), made
//! on first use. A move is one request: the thread sends `Migrate` and
//! waits in `read()` on that connection; the agents move it while it waits
//! (`crate::agent::threads`), and the read returns where it arrives, with
//! the answer and a new connection to that kernel's agent written there
//! (`crate::migrate::split::SelfMove`). When the move fails the answer
//! comes on the same connection and the thread has not moved.

use std::cell::Cell;
use std::os::fd::IntoRawFd;

use crate::dsm::local::{self, Reply, Request};
use crate::dsm::DsmError;
use crate::migrate::split::REPLY_LEN;

thread_local! {
    /// This thread's connection to its agent (-1: none yet). A raw
    /// descriptor: after a move it names nothing here and must not be
    /// closed.
    static CONN: Cell<i32> = const { Cell::new(-1) };
}

/// This thread's connection, made if needed. No receive timeout: a read
/// interrupted by the move's freeze must restart, not fail.
fn conn() -> Result<i32, DsmError> {
    let fd = CONN.with(Cell::get);
    if fd >= 0 {
        return Ok(fd);
    }
    // No socket, or nobody at it: mk.h's ECONNREFUSED (ENOENT is a
    // kernel that is not linked).
    let sock = local::connect().map_err(|e| DsmError::Refused {
        errno: libc::ECONNREFUSED,
        message: format!("no agent answers: {e}"),
    })?;
    let fd = sock.into_raw_fd();
    CONN.with(|c| c.set(fd));
    Ok(fd)
}

/// Forgets this thread's connection after a failure (closing it).
fn drop_conn(fd: i32) {
    CONN.with(|c| c.set(-1));
    // SAFETY: `fd` is this thread's connection, made by `conn` on this
    // kernel and used by nothing else.
    unsafe { libc::close(fd) };
}

fn sent(fd: i32, req: &Request) -> Result<(), DsmError> {
    // SAFETY: `fd` is this thread's open connection (see `conn`).
    let b = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    local::send(b, &req.encode(), &[]).map_err(|e| {
        drop_conn(fd);
        DsmError::sys("sending to the agent")(e)
    })
}

/// The id of the kernel the calling thread runs on (0: the host).
pub fn kernel_id() -> Result<u16, DsmError> {
    let fd = conn()?;
    sent(fd, &Request::Whoami)?;
    // SAFETY: as in `sent`.
    let b = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    match local::recv(b) {
        Ok(Some((bytes, _))) => match Reply::decode(&bytes) {
            Ok(Reply::Kernel { id }) => Ok(id),
            _ => Err(DsmError::Refused {
                errno: libc::EPROTO,
                message: "the agent's answer is not a kernel id".into(),
            }),
        },
        Ok(None) => {
            drop_conn(fd);
            Err(DsmError::Refused {
                errno: libc::ECONNRESET,
                message: "the agent closed the connection".into(),
            })
        }
        Err(e) => {
            drop_conn(fd);
            Err(DsmError::sys("receiving from the agent")(e))
        }
    }
}

/// Moves the calling thread to kernel `to` (an instance id; 0 the host);
/// it returns there. The thread's process must have begun on the kernel
/// whose agent serves it, or be one of its threads moved before.
pub fn migrate(to: u16) -> Result<(), DsmError> {
    let fd = conn()?;
    let mut answer = [0u8; REPLY_LEN];
    // SAFETY: gettid has no arguments and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as u32;
    sent(
        fd,
        &Request::Migrate {
            tid,
            to,
            fd,
            buf: answer.as_mut_ptr() as u64,
        },
    )?;
    // The read the move completes, here or on `to`: exactly this call, on
    // this descriptor and buffer (the agent checks the registers).
    let n = loop {
        // SAFETY: `answer` is a live buffer of REPLY_LEN bytes.
        let n = unsafe { libc::read(fd, answer.as_mut_ptr().cast(), REPLY_LEN) };
        if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        break n;
    };
    if n != REPLY_LEN as isize {
        let e = std::io::Error::last_os_error();
        drop_conn(fd);
        return Err(DsmError::Refused {
            errno: if n < 0 {
                e.raw_os_error().unwrap_or(libc::EIO)
            } else {
                libc::ECONNRESET
            },
            message: "no answer from the agent".into(),
        });
    }
    let word = |i: usize| i32::from_le_bytes(answer[i..i + 4].try_into().unwrap_or([0; 4]));
    let (status, new_fd) = (word(0), word(8));
    // Where the thread runs now, this is its connection (the old one was
    // closed where it was, or is this same one if it did not move).
    CONN.with(|c| c.set(new_fd));
    if status < 0 {
        return Err(DsmError::Refused {
            errno: -status,
            message: format!(
                "the move to kernel {to} failed: {}",
                std::io::Error::from_raw_os_error(-status)
            ),
        });
    }
    Ok(())
}
