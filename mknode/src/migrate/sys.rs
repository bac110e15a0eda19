//! The unsafe core of migration: the few syscalls `nix` does not wrap
//! (ptrace register sets by iovec, signal mask, queued signals, rseq
//! configuration, robust list) and the stub child's first steps after
//! `fork`. Everything above this module is safe code.
//!
//! Each wrapper hands the kernel a pointer to a buffer it owns for the whole
//! call, with the buffer's real length; that is the whole soundness argument
//! of the ptrace ones. This module must not grow policy: it only converts
//! between the kernel's structs and plain Rust values.

use nix::errno::Errno;
use nix::unistd::Pid;

/// `NT_PRFPREG`: 512-byte FXSAVE area.
pub(crate) const NT_PRFPREG: u32 = 2;
/// `NT_X86_XSTATE`: XSAVE area in user ABI layout.
pub(crate) const NT_X86_XSTATE: u32 = 0x202;
const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
const PTRACE_PEEKSIGINFO_SHARED: u32 = 1;

// Checked against the libc crate where it has them (NT_X86_XSTATE it has
// not: 0x202 in include/uapi/linux/elf.h), and the layouts against the
// kernel's structs.
const _: () = {
    assert!(NT_PRFPREG as i32 == libc::NT_PRFPREG);
    assert!(PTRACE_GET_RSEQ_CONFIGURATION == libc::PTRACE_GET_RSEQ_CONFIGURATION);
    assert!(PTRACE_PEEKSIGINFO_SHARED == libc::PTRACE_PEEKSIGINFO_SHARED);
    // struct ptrace_peeksiginfo_args { __u64 off; __u32 flags; __s32 nr; }
    assert!(size_of::<PeekSiginfoArgs>() == 16);
    // struct ptrace_rseq_configuration { __u64; __u32 x2; __u32 flags; __u32 pad; }
    assert!(size_of::<RseqConfig>() == 24);
};

fn check(r: libc::c_long) -> nix::Result<libc::c_long> {
    if r == -1 {
        Err(Errno::last())
    } else {
        Ok(r)
    }
}

/// `PTRACE_GETREGSET`: fills `buf` and returns how many bytes the kernel wrote.
pub(crate) fn getregset(tid: Pid, nt: u32, buf: &mut [u8]) -> nix::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: `iov` describes `buf`, which is valid for writes of
    // `buf.len()` bytes and outlives the call; the kernel writes at most
    // `iov_len` bytes into it and updates `iov_len`, a local we own.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGSET,
            tid.as_raw(),
            nt as usize as *mut libc::c_void,
            (&raw mut iov).cast::<libc::c_void>(),
        )
    };
    check(r)?;
    Ok(iov.iov_len)
}

/// `PTRACE_SETREGSET` from `buf`.
pub(crate) fn setregset(tid: Pid, nt: u32, buf: &[u8]) -> nix::Result<()> {
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr().cast_mut().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: `iov` describes `buf`, valid for reads of `buf.len()` bytes for
    // the whole call; SETREGSET only reads through `iov_base`.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_SETREGSET,
            tid.as_raw(),
            nt as usize as *mut libc::c_void,
            (&raw mut iov).cast::<libc::c_void>(),
        )
    };
    check(r).map(drop)
}

/// `PTRACE_GETSIGMASK`: the thread's blocked set as a 64-bit mask.
pub(crate) fn get_sigmask(tid: Pid) -> nix::Result<u64> {
    let mut mask: u64 = 0;
    // SAFETY: the kernel writes exactly `addr` = 8 bytes (the size we pass)
    // into `mask`, a live local u64.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_GETSIGMASK,
            tid.as_raw(),
            8usize as *mut libc::c_void,
            (&raw mut mask).cast::<libc::c_void>(),
        )
    };
    check(r)?;
    Ok(mask)
}

/// `PTRACE_SETSIGMASK`.
pub(crate) fn set_sigmask(tid: Pid, mask: u64) -> nix::Result<()> {
    // SAFETY: the kernel reads 8 bytes (the size we pass) from `mask`, a live
    // local u64.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_SETSIGMASK,
            tid.as_raw(),
            8usize as *mut libc::c_void,
            (&raw const mask).cast_mut().cast::<libc::c_void>(),
        )
    };
    check(r).map(drop)
}

/// XCR0 (`XGETBV` with ECX = 0): the XSAVE components the kernel enabled.
/// Only where CPUID.1:ECX.OSXSAVE is set (`cpu::xfeatures` checks).
pub(crate) fn xgetbv0() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: XGETBV with ECX = 0 reads XCR0 into EDX:EAX; it is valid
    // once the kernel has set CR4.OSXSAVE, which the only caller checks
    // first (CPUID.1:ECX.27). No memory is touched.
    unsafe {
        std::arch::asm!(
            "xgetbv",
            in("ecx") 0,
            out("eax") lo,
            out("edx") hi,
            options(nomem, nostack, preserves_flags)
        );
    }
    u64::from(hi) << 32 | u64::from(lo)
}

/// Offset of `u_debugreg` in x86_64's `struct user` (`sys/user.h`): 27
/// registers, `u_fpvalid` and padding, the 512-byte FXSAVE area, three
/// sizes, two addresses, `signal`, `reserved` and padding, two pointers,
/// `magic`, `u_comm[32]`.
const U_DEBUGREG: usize = 848;

/// `PTRACE_POKEUSER` of debug register `n` (0-3: addresses, 6: status, 7:
/// control) of a stopped tracee.
pub(crate) fn set_debugreg(tid: Pid, n: usize, value: u64) -> nix::Result<()> {
    // SAFETY: POKEUSER writes `value` into the tracee's debug register at
    // that offset of its `struct user`; no memory of ours is touched.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_POKEUSER,
            tid.as_raw(),
            (U_DEBUGREG + 8 * n) as *mut libc::c_void,
            value as *mut libc::c_void,
        )
    };
    check(r).map(drop)
}

#[repr(C)]
struct PeekSiginfoArgs {
    off: u64,
    flags: u32,
    nr: i32,
}

/// `PTRACE_PEEKSIGINFO`: every queued signal of the thread (or of the whole
/// process when `shared`), oldest first, without dequeuing them.
pub(crate) fn peek_siginfo(tid: Pid, shared: bool) -> nix::Result<Vec<[u8; 128]>> {
    const BATCH: usize = 32;
    let mut out = Vec::new();
    loop {
        let mut buf = [[0u8; 128]; BATCH];
        let mut args = PeekSiginfoArgs {
            off: out.len() as u64,
            flags: if shared { PTRACE_PEEKSIGINFO_SHARED } else { 0 },
            nr: BATCH as i32,
        };
        // SAFETY: `args` is a live `struct ptrace_peeksiginfo_args` (same
        // layout, repr(C)); the kernel writes at most `nr` = BATCH siginfos of
        // 128 bytes into `buf`, which has exactly that room.
        let r = unsafe {
            libc::ptrace(
                libc::PTRACE_PEEKSIGINFO,
                tid.as_raw(),
                (&raw mut args).cast::<libc::c_void>(),
                buf.as_mut_ptr().cast::<libc::c_void>(),
            )
        };
        let n = check(r)? as usize;
        out.extend_from_slice(&buf[..n.min(BATCH)]);
        if n < BATCH || out.len() > 4096 {
            return Ok(out);
        }
    }
}

/// `struct ptrace_rseq_configuration`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct RseqConfig {
    pub(crate) rseq_abi_pointer: u64,
    pub(crate) rseq_abi_size: u32,
    pub(crate) signature: u32,
    pub(crate) flags: u32,
    pub(crate) pad: u32,
}

/// `PTRACE_GET_RSEQ_CONFIGURATION`.
pub(crate) fn get_rseq_config(tid: Pid) -> nix::Result<RseqConfig> {
    let mut c = RseqConfig::default();
    // SAFETY: `addr` is the size of `c` (24 bytes, the kernel's struct); the
    // kernel copies at most that many bytes into `c`, a live local.
    let r = unsafe {
        libc::ptrace(
            PTRACE_GET_RSEQ_CONFIGURATION,
            tid.as_raw(),
            std::mem::size_of::<RseqConfig>() as *mut libc::c_void,
            (&raw mut c).cast::<libc::c_void>(),
        )
    };
    check(r)?;
    Ok(c)
}

/// `get_robust_list(tid)`: (head, len) of another thread (ptrace access).
pub(crate) fn get_robust_list(tid: Pid) -> nix::Result<(u64, u64)> {
    let mut head: u64 = 0;
    let mut len: libc::size_t = 0;
    // SAFETY: the kernel stores one pointer into `head` and one size_t into
    // `len`, both live locals of those sizes.
    let r = unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            tid.as_raw(),
            &raw mut head,
            &raw mut len,
        )
    };
    check(r)?;
    Ok((head, len as u64))
}

/// What the stub child sets up before it stops for the tracer.
#[derive(Debug)]
pub(crate) struct StubPlan {
    /// Descriptors to become 0, 1, 2 (owned by the caller, open across fork).
    pub(crate) stdio: [libc::c_int; 3],
    /// Address of the control page (free in the image and in this process).
    pub(crate) ctl: u64,
    /// Bytes placed at the start of the control page.
    pub(crate) code: [u8; 4],
    /// The stub starts a pid namespace of its own (its pid 1 there).
    pub(crate) new_pid_ns: bool,
    /// A pidfd of the restorer, to keep at [`STUB_PIDFD`] (-1: none). A
    /// stub in another pid namespace cannot open one itself (the restorer
    /// has no pid there).
    pub(crate) pidfd: libc::c_int,
}

/// Where a stub keeps the restorer's pidfd it was given.
pub(crate) const STUB_PIDFD: i32 = 1000;

/// Exit codes of a stub that failed before stopping.
pub(crate) const STUB_EXIT_MMAP: i32 = 100;
pub(crate) const STUB_EXIT_TRACEME: i32 = 101;
pub(crate) const STUB_EXIT_RESUMED: i32 = 102;
pub(crate) const STUB_EXIT_DUP: i32 = 103;

/// Forks the stub. The child dups the stdio plan onto 0/1/2, closes every
/// other descriptor, blocks all signals and resets their dispositions, maps
/// the control page with `plan.code` at its start, and stops itself under
/// `PTRACE_TRACEME` (the forking thread is its tracer). The rest (its time
/// namespace, its files) needs the image and is injected. Returns the child's pid; the caller must wait for the
/// stop (or the exit code of a failed stub).
pub(crate) fn spawn_stub(plan: &StubPlan) -> nix::Result<Pid> {
    // SAFETY: after fork the child runs only `stub_child`, which makes raw
    // syscalls and writes memory it has just mapped: no allocation, no locks,
    // no Rust runtime, so running in a copy of a multithreaded process is
    // sound. The parent side only reads the return value. The raw `clone`
    // (a fork into a new pid namespace: no new stack, the child returns on
    // a copy of this one, as from fork) skips libc's fork handlers, which
    // the child, running only `stub_child`, does not need.
    let r = unsafe {
        if plan.new_pid_ns {
            libc::syscall(
                libc::SYS_clone,
                (libc::CLONE_NEWPID | libc::SIGCHLD) as u64,
                0u64,
                0u64,
                0u64,
                0u64,
            ) as libc::pid_t
        } else {
            libc::fork()
        }
    };
    match r {
        -1 => Err(Errno::last()),
        0 => stub_child(plan),
        pid => Ok(Pid::from_raw(pid)),
    }
}

fn stub_exit(code: i32) -> ! {
    // SAFETY: `_exit` never returns and touches no process state that could
    // be inconsistent in a forked child (no atexit handlers, no flushing).
    unsafe { libc::_exit(code) }
}

fn stub_child(plan: &StubPlan) -> ! {
    for (target, &fd) in plan.stdio.iter().enumerate() {
        let target = target as libc::c_int;
        // SAFETY: plain fd syscalls on integers; no memory is passed.
        let ok = unsafe {
            if fd == target {
                libc::fcntl(fd, libc::F_SETFD, 0) != -1
            } else {
                libc::dup2(fd, target) != -1
            }
        };
        if !ok {
            stub_exit(STUB_EXIT_DUP);
        }
    }
    // SAFETY: dup2 and close_range on integers; they change this child's
    // descriptors only: every one but 0-2 (and the pidfd given) closes.
    unsafe {
        if plan.pidfd >= 0 {
            if libc::dup2(plan.pidfd, STUB_PIDFD) != STUB_PIDFD {
                stub_exit(STUB_EXIT_DUP);
            }
            libc::syscall(libc::SYS_close_range, 3u32, STUB_PIDFD as u32 - 1, 0u32);
            libc::syscall(libc::SYS_close_range, STUB_PIDFD as u32 + 1, u32::MAX, 0u32);
        } else {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        }
    }
    let all: u64 = !0;
    // SAFETY: rt_sigprocmask reads 8 bytes from `all`, a live local; the old
    // set pointer is null.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &raw const all,
            std::ptr::null_mut::<u64>(),
            8usize,
        );
    }
    let dfl = [0u64; 4];
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: rt_sigaction reads a 32-byte kernel `struct sigaction`
        // from `dfl` (all zero = SIG_DFL, no flags), a live local array of
        // that size; the old action pointer is null.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                dfl.as_ptr(),
                std::ptr::null_mut::<u64>(),
                8usize,
            );
        }
    }
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping, so no
    // memory this child (or its Rust-level state) uses can be affected.
    let p = unsafe {
        libc::mmap(
            plan.ctl as usize as *mut libc::c_void,
            4096,
            libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if p as usize as u64 != plan.ctl {
        stub_exit(STUB_EXIT_MMAP);
    }
    // SAFETY: `p` is a fresh private 4096-byte writable mapping owned by
    // this child alone; we write 4 bytes at its start.
    unsafe {
        std::ptr::copy_nonoverlapping(plan.code.as_ptr(), p.cast::<u8>(), plan.code.len());
    }
    // SAFETY: PTRACE_TRACEME takes no pointers.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_TRACEME,
            0,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
    if r == -1 {
        stub_exit(STUB_EXIT_TRACEME);
    }
    // SAFETY: kill/getpid take no pointers.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGSTOP);
    }
    stub_exit(STUB_EXIT_RESUMED)
}

/// `user_regs_struct` as the image's 27 words, in declaration order.
pub(crate) fn regs_to_words(r: &libc::user_regs_struct) -> [u64; 27] {
    [
        r.r15, r.r14, r.r13, r.r12, r.rbp, r.rbx, r.r11, r.r10, r.r9, r.r8, r.rax, r.rcx, r.rdx,
        r.rsi, r.rdi, r.orig_rax, r.rip, r.cs, r.eflags, r.rsp, r.ss, r.fs_base, r.gs_base, r.ds,
        r.es, r.fs, r.gs,
    ]
}

/// Inverse of [`regs_to_words`].
pub(crate) fn words_to_regs(w: &[u64; 27]) -> libc::user_regs_struct {
    libc::user_regs_struct {
        r15: w[0],
        r14: w[1],
        r13: w[2],
        r12: w[3],
        rbp: w[4],
        rbx: w[5],
        r11: w[6],
        r10: w[7],
        r9: w[8],
        r8: w[9],
        rax: w[10],
        rcx: w[11],
        rdx: w[12],
        rsi: w[13],
        rdi: w[14],
        orig_rax: w[15],
        rip: w[16],
        cs: w[17],
        eflags: w[18],
        rsp: w[19],
        ss: w[20],
        fs_base: w[21],
        gs_base: w[22],
        ds: w[23],
        es: w[24],
        fs: w[25],
        gs: w[26],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regs_words_round_trip() {
        let mut w = [0u64; 27];
        for (i, x) in w.iter_mut().enumerate() {
            *x = i as u64 * 0x1111;
        }
        assert_eq!(regs_to_words(&words_to_regs(&w)), w);
    }
}
