//! Running one syscall inside a stopped tracee: point its `rip` at a
//! `syscall` instruction, single-step it, read `rax`. Used on the origin (a
//! few read-only queries: `PR_GET_TID_ADDRESS`, `sigaltstack`,
//! `rt_sigaction`) and on the restore stub (everything that rebuilds it).
//!
//! The caller guarantees the tracee is in a ptrace-stop and has every signal
//! blocked, so the step executes exactly the injected instruction.
//!
//! Many calls in a row (a restore's mappings) go in one stop instead of one
//! each: [`inject_batch`] runs [`BATCH_CODE`], a loop over a table of calls
//! in the tracee's memory, and reads the results back. A stop costs tens of
//! µs on this machine; a syscall run in place, about one.

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use super::SysError;

/// A syscall to inject.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Call {
    pub(crate) name: &'static str,
    pub(crate) nr: libc::c_long,
    pub(crate) args: [u64; 6],
}

impl Call {
    pub(crate) fn new(name: &'static str, nr: libc::c_long, args: &[u64]) -> Self {
        let mut a = [0u64; 6];
        a[..args.len()].copy_from_slice(args);
        Call { name, nr, args: a }
    }
}

pub(crate) fn ptrace_err(op: &'static str, tid: Pid) -> impl FnOnce(Errno) -> SysError {
    move |source| SysError::Ptrace {
        op,
        tid: tid.as_raw(),
        source,
    }
}

/// Result of one injected syscall.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Outcome {
    pub(crate) ret: i64,
    /// The thread or process a `clone` or fork created (reported by
    /// `PTRACE_EVENT_CLONE` or `_FORK`).
    pub(crate) cloned: Option<Pid>,
}

impl Outcome {
    /// The return value, or the errno it encodes.
    pub(crate) fn check(self, call: &Call, tid: Pid) -> Result<u64, SysError> {
        if (-4095..0).contains(&self.ret) {
            Err(SysError::Syscall {
                name: call.name,
                tid: tid.as_raw(),
                source: Errno::from_raw(-self.ret as i32),
            })
        } else {
            Ok(self.ret as u64)
        }
    }
}

/// Waits for `tid`'s next stop and describes anything that is not one.
pub(crate) fn wait(tid: Pid, wanted: &'static str) -> Result<WaitStatus, SysError> {
    match wait_stop(tid, wanted)? {
        Stop::Status(s) => Ok(s),
        Stop::Realtime(sig) => Err(SysError::Stop {
            tid: tid.as_raw(),
            status: format!("stopped for real-time signal {sig}"),
            wanted,
        }),
    }
}

/// Waits for the first stop of `new`, a thread or process just cloned
/// from a traced one (auto-attached: a SIGSTOP, or `PTRACE_EVENT_STOP`).
pub(crate) fn first_stop(new: Pid, wanted: &'static str) -> Result<(), SysError> {
    match wait(new, wanted)? {
        WaitStatus::Stopped(_, Signal::SIGSTOP) => Ok(()),
        WaitStatus::PtraceEvent(_, _, ev) if ev == libc::PTRACE_EVENT_STOP => Ok(()),
        other => Err(SysError::Stop {
            tid: new.as_raw(),
            status: format!("{other:?}"),
            wanted,
        }),
    }
}

/// What [`wait_stop`] saw: a status nix can name, or a signal-delivery
/// stop for a real-time signal (32 and up), which nix's `Signal` cannot
/// name (its `waitpid` fails with `EINVAL` on one, the status lost).
pub(crate) enum Stop {
    Status(WaitStatus),
    Realtime(i32),
}

/// [`wait`], telling real-time signal stops apart instead of failing.
pub(crate) fn wait_stop(tid: Pid, wanted: &'static str) -> Result<Stop, SysError> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes the status into a live local.
        if unsafe { libc::waitpid(tid.as_raw(), &mut status, libc::__WALL) } >= 0 {
            break;
        }
        match Errno::last() {
            Errno::EINTR => continue,
            e => return Err(ptrace_err("waitpid", tid)(e)),
        }
    }
    decode(tid, status, wanted)
}

/// [`wait_stop`] for at most `t`: `None` if `tid` has not stopped by then.
pub(crate) fn poll_stop(
    tid: Pid,
    t: std::time::Duration,
    wanted: &'static str,
) -> Result<Option<Stop>, SysError> {
    let until = std::time::Instant::now() + t;
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes the status into a live local.
        match unsafe { libc::waitpid(tid.as_raw(), &mut status, libc::__WALL | libc::WNOHANG) } {
            0 if std::time::Instant::now() >= until => return Ok(None),
            0 => std::thread::sleep(std::time::Duration::from_micros(50)),
            r if r > 0 => return decode(tid, status, wanted).map(Some),
            _ => match Errno::last() {
                Errno::EINTR => continue,
                e => return Err(ptrace_err("waitpid", tid)(e)),
            },
        }
    }
}

fn decode(tid: Pid, status: i32, wanted: &'static str) -> Result<Stop, SysError> {
    if libc::WIFSTOPPED(status) && status >> 16 == 0 && libc::WSTOPSIG(status) >= 32 {
        return Ok(Stop::Realtime(libc::WSTOPSIG(status)));
    }
    let s = WaitStatus::from_raw(tid, status).map_err(ptrace_err("waitpid", tid))?;
    match s {
        WaitStatus::Exited(..) | WaitStatus::Signaled(..) => Err(SysError::Stop {
            tid: tid.as_raw(),
            status: format!("{s:?}"),
            wanted,
        }),
        s => Ok(Stop::Status(s)),
    }
}

/// `PTRACE_CONT` delivering signal `sig`, any number (nix's `cont` takes
/// only the signals its `Signal` names).
pub(crate) fn cont_with(tid: Pid, sig: i32) -> Result<(), SysError> {
    // SAFETY: PTRACE_CONT on a tracee stopped by us; addr is ignored and
    // data is the signal number, as ptrace(2) says.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_CONT,
            tid.as_raw(),
            std::ptr::null_mut::<libc::c_void>(),
            sig as libc::c_long as *mut libc::c_void,
        )
    };
    if r < 0 {
        return Err(ptrace_err("PTRACE_CONT", tid)(Errno::last()));
    }
    Ok(())
}

/// Machine code (x86-64) that runs the calls of a table and stops on
/// `int3`: `rbx` points at entries of [`BATCH_ENTRY`] bytes, each eight
/// words `[nr, a0, a1, a2, a3, a4, a5, result]`; an `nr` of -1 ends the
/// table. Every call runs, whatever the ones before returned (the caller
/// reads each result and gives up on the first failure).
///
/// ```text
///  0  48 8b 03           loop: mov rax, [rbx]
///  3  48 83 f8 ff              cmp rax, -1
///  7  74 24                    je done
///  9  48 8b 7b 08              mov rdi, [rbx+8]
/// 13  48 8b 73 10              mov rsi, [rbx+16]
/// 17  48 8b 53 18              mov rdx, [rbx+24]
/// 21  4c 8b 53 20              mov r10, [rbx+32]
/// 25  4c 8b 43 28              mov r8, [rbx+40]
/// 29  4c 8b 4b 30              mov r9, [rbx+48]
/// 33  0f 05                    syscall
/// 35  48 89 43 38              mov [rbx+56], rax
/// 39  48 83 c3 40              add rbx, 64
/// 43  eb d3                    jmp loop
/// 45  cc                 done: int3
/// ```
pub(crate) const BATCH_CODE: [u8; 46] = [
    0x48, 0x8b, 0x03, 0x48, 0x83, 0xf8, 0xff, 0x74, 0x24, 0x48, 0x8b, 0x7b, 0x08, 0x48, 0x8b, 0x73,
    0x10, 0x48, 0x8b, 0x53, 0x18, 0x4c, 0x8b, 0x53, 0x20, 0x4c, 0x8b, 0x43, 0x28, 0x4c, 0x8b, 0x4b,
    0x30, 0x0f, 0x05, 0x48, 0x89, 0x43, 0x38, 0x48, 0x83, 0xc3, 0x40, 0xeb, 0xd3, 0xcc,
];

/// Bytes per entry of a batch table.
pub(crate) const BATCH_ENTRY: usize = 64;

/// Runs `calls` in `tid` through [`BATCH_CODE`] (already at `code` in its
/// memory), their table written at `table` (room for `calls.len() + 1`
/// entries); returns each call's raw result, in order. `base` as for
/// [`inject`].
pub(crate) fn inject_batch(
    tid: Pid,
    (code, table): (u64, u64),
    base: &libc::user_regs_struct,
    calls: &[Call],
) -> Result<Vec<i64>, SysError> {
    let mut t = Vec::with_capacity((calls.len() + 1) * BATCH_ENTRY);
    for c in calls {
        t.extend_from_slice(&(c.nr as u64).to_ne_bytes());
        for a in c.args {
            t.extend_from_slice(&a.to_ne_bytes());
        }
        t.extend_from_slice(&u64::MAX.to_ne_bytes());
    }
    t.extend_from_slice(&u64::MAX.to_ne_bytes());
    t.resize((calls.len() + 1) * BATCH_ENTRY, 0);
    let mem = |what: &'static str| {
        move |e: Errno| SysError::Mem {
            what,
            pid: tid.as_raw(),
            source: e.into(),
        }
    };
    let n = super::memory::write_remote(tid, table, &t).map_err(mem("writing a batch of calls"))?;
    if n != t.len() {
        return Err(mem("writing a batch of calls")(Errno::EFAULT));
    }
    let mut r = *base;
    r.rip = code;
    r.rbx = table;
    r.orig_rax = u64::MAX;
    ptrace::setregs(tid, r).map_err(ptrace_err("PTRACE_SETREGS", tid))?;
    ptrace::cont(tid, None).map_err(ptrace_err("PTRACE_CONT", tid))?;
    let name = calls.first().map_or("batch", |c| c.name);
    match wait(tid, name)? {
        WaitStatus::Stopped(_, Signal::SIGTRAP) => {}
        other => {
            return Err(SysError::Stop {
                tid: tid.as_raw(),
                status: format!("{other:?}"),
                wanted: "the end of a batch of calls (int3)",
            })
        }
    }
    let mut back = vec![0u8; calls.len() * BATCH_ENTRY];
    let n = super::memory::read_remote(tid, table, &mut back)
        .map_err(mem("reading a batch's results"))?;
    if n != back.len() {
        return Err(mem("reading a batch's results")(Errno::EFAULT));
    }
    Ok(back
        .chunks_exact(BATCH_ENTRY)
        .map(|e| i64::from_ne_bytes(e[56..64].try_into().expect("8 bytes")))
        .collect())
}

/// Injects `call` at the `syscall` instruction at `insn`, starting from the
/// register file `base` (which the caller restores afterwards if it must).
pub(crate) fn inject(
    tid: Pid,
    insn: u64,
    base: &libc::user_regs_struct,
    call: &Call,
) -> Result<Outcome, SysError> {
    let mut r = *base;
    r.rip = insn;
    r.rax = call.nr as u64;
    // No syscall restart logic may touch the injected registers on resume.
    r.orig_rax = u64::MAX;
    r.rdi = call.args[0];
    r.rsi = call.args[1];
    r.rdx = call.args[2];
    r.r10 = call.args[3];
    r.r8 = call.args[4];
    r.r9 = call.args[5];
    ptrace::setregs(tid, r).map_err(ptrace_err("PTRACE_SETREGS", tid))?;
    ptrace::step(tid, None).map_err(ptrace_err("PTRACE_SINGLESTEP", tid))?;
    let mut cloned = None;
    loop {
        match wait(tid, call.name)? {
            WaitStatus::Stopped(_, Signal::SIGTRAP) => break,
            WaitStatus::PtraceEvent(_, _, ev)
                if ev == libc::PTRACE_EVENT_CLONE || ev == libc::PTRACE_EVENT_FORK =>
            {
                let t = ptrace::getevent(tid).map_err(ptrace_err("PTRACE_GETEVENTMSG", tid))?;
                cloned = Some(Pid::from_raw(t as i32));
                ptrace::step(tid, None).map_err(ptrace_err("PTRACE_SINGLESTEP", tid))?;
            }
            other => {
                return Err(SysError::Stop {
                    tid: tid.as_raw(),
                    status: format!("{other:?}"),
                    wanted: call.name,
                })
            }
        }
    }
    let out = ptrace::getregs(tid).map_err(ptrace_err("PTRACE_GETREGS", tid))?;
    if out.rip != insn + 2 {
        return Err(SysError::Stop {
            tid: tid.as_raw(),
            status: format!("step ended at {:#x}, not after the syscall", out.rip),
            wanted: call.name,
        });
    }
    Ok(Outcome {
        ret: out.rax as i64,
        cloned,
    })
}
