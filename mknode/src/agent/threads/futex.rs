//! The futexes of a split process, served by the agent of its kernel.
//!
//! A private futex is keyed by its address space, so a wake on one kernel
//! cannot reach a waiter on another. Once a thread has left, the process
//! and each shadow run under a seccomp filter that sends every `futex`
//! call to a listener (`crate::migrate::split`); the agents answer them,
//! and the process's kernel is every futex's home, as Popcorn's futex
//! server is: its [`Server`] keeps the waiters of all kernels, a shadow's
//! agent forwards its calls there (`FutexCall` → `FutexDone`).
//!
//! `FUTEX_WAIT` reads the word through the process's memory (one memory:
//! the DSM serves the read) and parks the caller when it holds the
//! expected value; `FUTEX_WAKE` answers up to `n` parked callers of that
//! address. Waits the kernel ends itself — the tid word a thread's exit
//! clears (`CLONE_CHILD_CLEARTID`, what `pthread_join` waits on), robust
//! futexes of a dying thread — are not calls: every parked caller's word
//! is read again each [`RECHECK`], and one that changed is answered 0 (a
//! futex wait may always return early; callers check again). Supported:
//! `WAIT`, `WAKE`, `WAIT_BITSET`, `WAKE_BITSET` (what glibc's mutexes,
//! condition variables, joins and semaphores use); the rest fail with
//! `ENOSYS`.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::uio::{process_vm_readv, RemoteIoVec};
use nix::unistd::Pid;

/// How often parked callers' words are read again.
pub(super) const RECHECK: Duration = Duration::from_millis(20);

const SECCOMP_IOCTL_NOTIF_RECV: u64 = 0xc050_2100;
const SECCOMP_IOCTL_NOTIF_SEND: u64 = 0xc018_2101;
const SECCOMP_IOCTL_NOTIF_ID_VALID: u64 = 0x4008_2102;

const FUTEX_WAIT: u64 = 0;
const FUTEX_WAKE: u64 = 1;
const FUTEX_WAIT_BITSET: u64 = 9;
const FUTEX_WAKE_BITSET: u64 = 10;
const FUTEX_CLOCK_REALTIME: u64 = 256;
const FUTEX_CMD_MASK: u64 = !(128 | FUTEX_CLOCK_REALTIME);

/// `struct seccomp_notif` (x86_64).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct SeccompNotif {
    id: u64,
    pid: u32,
    flags: u32,
    nr: i32,
    arch: u32,
    ip: u64,
    args: [u64; 6],
}

/// `struct seccomp_notif_resp`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct SeccompResp {
    id: u64,
    val: i64,
    error: i32,
    flags: u32,
}

const _: () = assert!(std::mem::size_of::<SeccompNotif>() == 80);
const _: () = assert!(std::mem::size_of::<SeccompResp>() == 24);

/// One intercepted call: its id on the listener, the calling thread, the
/// futex arguments.
#[derive(Debug, Clone, Copy)]
pub(super) struct Notif {
    pub(super) id: u64,
    /// The system call (`futex`, or a shadow's `exit_group`).
    pub(super) nr: i64,
    pub(super) args: [u64; 6],
}

/// One seccomp-notification ioctl `req` on `listener` with `arg`, whose
/// size must be the one `req` encodes (refused otherwise).
fn notif_ioctl<T>(listener: &OwnedFd, req: u64, arg: &mut T) -> io::Result<()> {
    // _IOC: the argument's size sits in bits 16-29 of the request.
    if (req >> 16) & 0x3fff != std::mem::size_of::<T>() as u64 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: `arg` is a live, exclusively borrowed value of exactly the
    // size the request encodes (checked above), and these requests' kernel
    // side reads or writes only that many bytes of it.
    let r = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            req as libc::Ioctl,
            std::ptr::from_mut(arg),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The next call on `listener` (blocks).
pub(super) fn recv(listener: &OwnedFd) -> io::Result<Notif> {
    let mut n = SeccompNotif::default();
    notif_ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, &mut n)?;
    Ok(Notif {
        id: n.id,
        nr: i64::from(n.nr),
        args: n.args,
    })
}

/// Answers call `id`: `ret` >= 0 is the call's result, < 0 its -errno.
pub(super) fn respond(listener: &OwnedFd, id: u64, ret: i64) -> io::Result<()> {
    let mut r = SeccompResp {
        id,
        val: ret.max(0),
        error: if ret < 0 { ret as i32 } else { 0 },
        flags: 0,
    };
    notif_ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, &mut r)
}

/// Whether call `id` still waits (its thread was not interrupted or gone).
pub(super) fn still_waits(listener: &OwnedFd, id: u64) -> bool {
    let mut id = id;
    notif_ioctl(listener, SECCOMP_IOCTL_NOTIF_ID_VALID, &mut id).is_ok()
}

/// Who made a call: a thread here (its id on the listener) or on another
/// kernel (its agent's request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Caller {
    Local(u64),
    Remote { node: u16, req: u32 },
}

#[derive(Debug)]
struct Waiter {
    caller: Caller,
    addr: u64,
    val: u32,
    bitset: u32,
    deadline: Option<Instant>,
}

/// The futex home of one split process (see the module doc).
#[derive(Debug)]
pub(super) struct Server {
    pid: i32,
    waiters: Mutex<Vec<Waiter>>,
}

/// Answers to give: who, and what.
pub(super) type Answers = Vec<(Caller, i64)>;

impl Server {
    pub(super) fn new(pid: i32) -> Self {
        Server {
            pid,
            waiters: Mutex::new(Vec::new()),
        }
    }

    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        let remote = [RemoteIoVec {
            base: addr as usize,
            len: buf.len(),
        }];
        let n = process_vm_readv(
            Pid::from_raw(self.pid),
            &mut [io::IoSliceMut::new(buf)],
            &remote,
        )?;
        if n == buf.len() {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(libc::EFAULT))
        }
    }

    fn word(&self, addr: u64) -> Option<u32> {
        let mut b = [0u8; 4];
        self.read(addr, &mut b).ok().map(|()| u32::from_le_bytes(b))
    }

    /// The deadline of a wait with timeout pointer `ts` (0: none):
    /// relative for `FUTEX_WAIT`, absolute on the monotonic (or, with
    /// `FUTEX_CLOCK_REALTIME`, the real-time) clock for `WAIT_BITSET`.
    fn deadline(&self, cmd: u64, op: u64, ts: u64) -> Result<Option<Instant>, i64> {
        if ts == 0 {
            return Ok(None);
        }
        let mut b = [0u8; 16];
        self.read(ts, &mut b)
            .map_err(|_| -i64::from(libc::EFAULT))?;
        let sec = i64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8]));
        let nsec = i64::from_le_bytes(b[8..].try_into().unwrap_or([0; 8]));
        if sec < 0 || !(0..1_000_000_000).contains(&nsec) {
            return Err(-i64::from(libc::EINVAL));
        }
        let d = Duration::new(sec as u64, nsec as u32);
        let now = Instant::now();
        if cmd == FUTEX_WAIT {
            return Ok(Some(now + d));
        }
        let left = if op & FUTEX_CLOCK_REALTIME != 0 {
            let t = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            d.saturating_sub(t)
        } else {
            let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
                .map(|t| Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32))
                .unwrap_or_default();
            d.saturating_sub(t)
        };
        Ok(Some(now + left))
    }

    /// Serves one call; returns the answers to give now (the caller's own
    /// unless it is parked, and those of the waiters a wake woke).
    pub(super) fn call(&self, caller: Caller, args: [u64; 6]) -> Answers {
        let (addr, op, val) = (args[0], args[1], args[2] as u32);
        let cmd = op & FUTEX_CMD_MASK;
        match cmd {
            FUTEX_WAIT | FUTEX_WAIT_BITSET => {
                let bitset = if cmd == FUTEX_WAIT {
                    u32::MAX
                } else {
                    args[5] as u32
                };
                if bitset == 0 {
                    return vec![(caller, -i64::from(libc::EINVAL))];
                }
                let deadline = match self.deadline(cmd, op, args[3]) {
                    Ok(d) => d,
                    Err(e) => return vec![(caller, e)],
                };
                // Read and park under the lock: a wake that comes after
                // the word changed finds the waiter (or the read saw it).
                let mut w = lock(&self.waiters);
                match self.word(addr) {
                    None => vec![(caller, -i64::from(libc::EFAULT))],
                    Some(v) if v != val => vec![(caller, -i64::from(libc::EAGAIN))],
                    Some(_) => {
                        w.push(Waiter {
                            caller,
                            addr,
                            val,
                            bitset,
                            deadline,
                        });
                        Vec::new()
                    }
                }
            }
            FUTEX_WAKE | FUTEX_WAKE_BITSET => {
                let bitset = if cmd == FUTEX_WAKE {
                    u32::MAX
                } else {
                    args[5] as u32
                };
                if bitset == 0 {
                    return vec![(caller, -i64::from(libc::EINVAL))];
                }
                let n = (val as i32).max(0) as usize;
                let mut w = lock(&self.waiters);
                let mut out = Vec::new();
                let mut i = 0;
                while i < w.len() && out.len() < n {
                    if w[i].addr == addr && w[i].bitset & bitset != 0 {
                        out.push((w.remove(i).caller, 0));
                    } else {
                        i += 1;
                    }
                }
                out.push((caller, out.len() as i64));
                out
            }
            _ => vec![(caller, -i64::from(libc::ENOSYS))],
        }
    }

    /// Waits the kernel ended (their word changed) and waits timed out;
    /// `gone` says which local callers no longer wait (interrupted).
    pub(super) fn recheck(&self, gone: impl Fn(Caller) -> bool) -> Answers {
        let now = Instant::now();
        let mut w = lock(&self.waiters);
        let mut out = Vec::new();
        w.retain(|x| {
            if gone(x.caller) {
                return false;
            }
            let answer = if x.deadline.is_some_and(|d| d <= now) {
                Some(-i64::from(libc::ETIMEDOUT))
            } else if self.word(x.addr) != Some(x.val) {
                Some(0)
            } else {
                None
            };
            match answer {
                Some(a) => {
                    out.push((x.caller, a));
                    false
                }
                None => true,
            }
        });
        out
    }

    /// The callers of node `node` (it went down): forgotten.
    pub(super) fn forget_node(&self, node: u16) {
        lock(&self.waiters)
            .retain(|x| !matches!(x.caller, Caller::Remote { node: n, .. } if n == node));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
