//! The seccomp filters of a split process (see `split`): which calls go to
//! the agent (futexes, a shadow's `exit_group`), which are refused because
//! they cannot be coherent across kernels, and which run as usual.
//!
//! Once a thread has left, the process's private memory is DSM memory
//! homed at the origin (memfds mapped shared), and each moved thread runs
//! in a shadow process on another kernel. So:
//!
//! - in a **shadow**, every call that would change the address space
//!   (`mmap`, `munmap`, `mprotect`, `mremap`, `brk`, `pkey_mprotect`),
//!   make a process or a thread (`fork`, `vfork`, `clone`, `clone3`),
//!   replace the program (`execve`, `execveat`), open a file (`open`,
//!   `openat`, `openat2`, `creat`: a descriptor of the shadow alone, which
//!   the process's other threads could not use), send a signal (`kill`,
//!   `tkill`, `tgkill`, `rt_sigqueueinfo`, `rt_tgsigqueueinfo`; the ids a
//!   moved thread knows are the origin's) or set a signal handler
//!   (`rt_sigaction` with a new action; asking is fine) fails with
//!   `EOPNOTSUPP`: it would act on the shadow alone;
//! - at the **origin**, a new process (`fork`, or `clone` without
//!   `CLONE_VM`) fails with `EOPNOTSUPP`: its child would share the
//!   converted memory with its parent instead of getting a copy.
//!   `clone3` answers `ENOSYS`, so that libc falls back to `clone`, whose
//!   flags a filter can read; threads and `vfork`-style spawns go on.
//!
//! Classic BPF on `struct seccomp_data`: `nr` at 0, `arch` at 4, the
//! instruction pointer at 8, `args[i]` at 16 + 8 i (little-endian halves).

/// One classic BPF instruction: code, jump if true, jump if false, k.
pub(crate) type Insn = (u16, u8, u8, u32);

const LD_W_ABS: u16 = 0x20;
const JEQ_K: u16 = 0x15;
const JSET_K: u16 = 0x45;
const RET_K: u16 = 0x06;

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const RET_ALLOW: u32 = 0x7fff_0000;
const RET_USER_NOTIF: u32 = 0x7fc0_0000;
const RET_ERRNO: u32 = 0x0005_0000;

/// Where a call goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Allow,
    /// To the listener: the agent answers.
    Notify,
    /// Fails with this errno.
    Errno(u16),
}

impl Verdict {
    fn ret(self) -> u32 {
        match self {
            Verdict::Allow => RET_ALLOW,
            Verdict::Notify => RET_USER_NOTIF,
            Verdict::Errno(e) => RET_ERRNO | u32::from(e),
        }
    }
}

const EOPNOTSUPP: u16 = libc::EOPNOTSUPP as u16;

/// Calls a shadow refuses outright.
const SHADOW_REFUSED: [i64; 21] = [
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_pkey_mprotect,
    libc::SYS_fork,
    libc::SYS_vfork,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_creat,
    libc::SYS_kill,
    libc::SYS_tkill,
    libc::SYS_tgkill,
    libc::SYS_rt_sigqueueinfo,
    libc::SYS_rt_tgsigqueueinfo,
];

/// A filter program being written: jumps go to labels, resolved by
/// [`Asm::finish`], which appends one `ret` per verdict used.
struct Asm {
    code: Vec<(u16, Target, Target, u32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Next,
    Ret(Verdict),
}

impl Asm {
    fn new() -> Asm {
        Asm { code: Vec::new() }
    }

    fn load(&mut self, offset: u32) {
        self.code
            .push((LD_W_ABS, Target::Next, Target::Next, offset));
    }

    /// `if A == k goto t else f`.
    fn jeq(&mut self, k: u32, t: Target, f: Target) {
        self.code.push((JEQ_K, t, f, k));
    }

    /// `if A & k goto t else f`.
    fn jset(&mut self, k: u32, t: Target, f: Target) {
        self.code.push((JSET_K, t, f, k));
    }

    fn finish(self) -> Vec<Insn> {
        let mut verdicts: Vec<Verdict> = Vec::new();
        for &(_, t, f, _) in &self.code {
            for x in [t, f] {
                if let Target::Ret(v) = x {
                    if !verdicts.contains(&v) {
                        verdicts.push(v);
                    }
                }
            }
        }
        let end = self.code.len();
        let at = |i: usize, x: Target| -> u8 {
            match x {
                Target::Next => 0,
                Target::Ret(v) => {
                    let j = end + verdicts.iter().position(|&w| w == v).unwrap_or(0);
                    // Forward only, within 255: the programs here are short.
                    u8::try_from(j - i - 1).unwrap_or(u8::MAX)
                }
            }
        };
        let mut out: Vec<Insn> = (self.code.iter().enumerate())
            .map(|(i, &(c, t, f, k))| (c, at(i, t), at(i, f), k))
            .collect();
        out.extend(verdicts.iter().map(|v| (RET_K, 0, 0, v.ret())));
        out
    }
}

/// `args[i]`'s low and high 32-bit halves.
fn arg(i: u32) -> (u32, u32) {
    (16 + 8 * i, 20 + 8 * i)
}

/// The filter of a split process: its futex calls go to the agent; a
/// `shadow`'s `exit_group` too, and the calls the module doc lists are
/// refused there; at the origin only new processes are.
pub(crate) fn program(shadow: bool) -> Vec<Insn> {
    use Target::{Next, Ret};
    let allow = Ret(Verdict::Allow);
    let refuse = Ret(Verdict::Errno(EOPNOTSUPP));
    let mut a = Asm::new();
    a.load(4);
    a.jeq(AUDIT_ARCH_X86_64, Next, allow);
    a.load(0);
    a.jeq(libc::SYS_futex as u32, Ret(Verdict::Notify), Next);
    if shadow {
        a.jeq(libc::SYS_exit_group as u32, Ret(Verdict::Notify), Next);
        for nr in SHADOW_REFUSED {
            a.jeq(nr as u32, refuse, Next);
        }
        // rt_sigaction(sig, act, old): asking (act NULL) is fine.
        let (lo, hi) = arg(1);
        a.jeq(libc::SYS_rt_sigaction as u32, Next, allow);
        a.load(lo);
        a.jeq(0, Next, refuse);
        a.load(hi);
        a.jeq(0, allow, refuse);
    } else {
        a.jeq(libc::SYS_fork as u32, refuse, Next);
        a.jeq(
            libc::SYS_clone3 as u32,
            Ret(Verdict::Errno(libc::ENOSYS as u16)),
            Next,
        );
        a.jeq(libc::SYS_clone as u32, Next, allow);
        a.load(arg(0).0);
        a.jset(libc::CLONE_VM as u32, allow, refuse);
    }
    a.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `prog` as the kernel would on a call `nr` with `args`.
    fn run(prog: &[Insn], nr: i64, args: [u64; 6]) -> Verdict {
        let mut data = [0u8; 64];
        data[..4].copy_from_slice(&(nr as u32).to_le_bytes());
        data[4..8].copy_from_slice(&AUDIT_ARCH_X86_64.to_le_bytes());
        for (i, a) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        let (mut acc, mut pc) = (0u32, 0usize);
        loop {
            let (code, jt, jf, k) = prog[pc];
            pc += 1;
            match code {
                LD_W_ABS => {
                    let k = k as usize;
                    acc = u32::from_le_bytes(data[k..k + 4].try_into().unwrap());
                }
                JEQ_K | JSET_K => {
                    let hit = if code == JEQ_K {
                        acc == k
                    } else {
                        acc & k != 0
                    };
                    pc += usize::from(if hit { jt } else { jf });
                }
                RET_K => {
                    return match k {
                        RET_ALLOW => Verdict::Allow,
                        RET_USER_NOTIF => Verdict::Notify,
                        e if e & 0xffff_0000 == RET_ERRNO => Verdict::Errno(e as u16),
                        _ => panic!("unknown return {k:#x}"),
                    }
                }
                _ => panic!("unknown instruction {code:#x}"),
            }
        }
    }

    const NONE: [u64; 6] = [0; 6];

    #[test]
    fn a_shadow_sends_futexes_and_exit_group_and_refuses_what_cannot_be_coherent() {
        let p = program(true);
        assert_eq!(run(&p, libc::SYS_futex, NONE), Verdict::Notify);
        assert_eq!(run(&p, libc::SYS_exit_group, NONE), Verdict::Notify);
        for nr in SHADOW_REFUSED {
            assert_eq!(run(&p, nr, NONE), Verdict::Errno(EOPNOTSUPP), "{nr}");
        }
        for nr in [
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_exit,
            libc::SYS_madvise,
            libc::SYS_rt_sigprocmask,
            libc::SYS_getpid,
        ] {
            assert_eq!(run(&p, nr, NONE), Verdict::Allow, "{nr}");
        }
        let sigaction = |act: u64| run(&p, libc::SYS_rt_sigaction, [10, act, 0x1000, 8, 0, 0]);
        assert_eq!(sigaction(0), Verdict::Allow);
        assert_eq!(sigaction(0x7fff_0000_1000), Verdict::Errno(EOPNOTSUPP));
        assert_eq!(sigaction(0x1_0000_0000), Verdict::Errno(EOPNOTSUPP));
        assert_eq!(sigaction(0x1000), Verdict::Errno(EOPNOTSUPP));
    }

    #[test]
    fn the_origin_refuses_new_processes_only() {
        let p = program(false);
        assert_eq!(run(&p, libc::SYS_futex, NONE), Verdict::Notify);
        assert_eq!(run(&p, libc::SYS_exit_group, NONE), Verdict::Allow);
        assert_eq!(run(&p, libc::SYS_mmap, NONE), Verdict::Allow);
        assert_eq!(run(&p, libc::SYS_fork, NONE), Verdict::Errno(EOPNOTSUPP));
        let clone = |flags: i32| run(&p, libc::SYS_clone, [flags as u64, 0, 0, 0, 0, 0]);
        assert_eq!(clone(libc::SIGCHLD), Verdict::Errno(EOPNOTSUPP));
        // pthread_create's and posix_spawn's.
        let thread = libc::CLONE_VM | libc::CLONE_FS | libc::CLONE_THREAD | libc::CLONE_SIGHAND;
        assert_eq!(clone(thread), Verdict::Allow);
        assert_eq!(
            clone(libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD),
            Verdict::Allow
        );
        assert_eq!(
            run(&p, libc::SYS_clone3, NONE),
            Verdict::Errno(libc::ENOSYS as u16)
        );
    }

    #[test]
    fn another_architecture_is_let_through() {
        let p = program(true);
        let mut q = p.clone();
        // Same program, a call from a 32-bit caller: the arch check fails.
        q[1].3 = 0x4000_0003;
        assert_eq!(run(&q, libc::SYS_mmap, NONE), Verdict::Allow);
        assert_eq!(run(&p, libc::SYS_mmap, NONE), Verdict::Errno(EOPNOTSUPP));
    }

    #[test]
    fn every_jump_lands_inside_and_every_path_returns() {
        for p in [program(true), program(false)] {
            assert!(p.len() < 64);
            for (i, &(code, jt, jf, _)) in p.iter().enumerate() {
                if code == JEQ_K || code == JSET_K {
                    assert!(i + 1 + usize::from(jt) < p.len());
                    assert!(i + 1 + usize::from(jf) < p.len());
                }
            }
            assert_eq!(p[p.len() - 1].0, RET_K);
        }
    }
}
