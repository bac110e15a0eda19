//! Origin side: freeze every thread of a process under ptrace, read its
//! state, and stream its image. A [`Frozen`] process is resumed untouched
//! when the value is dropped, so a migration that fails anywhere leaves the
//! original running; only [`Frozen::kill`] ends it.
//!
//! Capture changes nothing the process can observe: the few syscalls it
//! injects (to read `clear_child_tid`, `sigaltstack` and signal actions,
//! which no `/proc` file shows) run with all signals blocked, use 64 bytes of
//! the process's own writable memory as scratch and put those bytes, the
//! registers and the signal mask back before anything else happens.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write;
use std::marker::PhantomData;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use super::image::{
    AltStack, FpKind, Header, ImageMeta, ImageStats, ImageWriter, Mapping, MappingKind, MmFields,
    PosixTimer, ProcessInfo, Rseq, SigAction, SigInfo, ThreadState, FLAG_LAZY, FLAG_ZERO_RUNS,
    MAPF_HUGEPAGE, MAPF_NOHUGEPAGE, PAGE, PROT_R, PROT_W, PROT_X, SIGEV_NONE, SIGEV_SIGNAL,
    SIGEV_THREAD_ID,
};
use super::inject::{inject, ptrace_err, wait_stop, Call, Stop};
use super::lazy::{eager_ranges, LazyOptions, PageServer};
use super::memory::{fingerprint, is_zero, read_pages, read_remote, to_mapping, write_remote};
use super::precheck::{check_within, Blocker, Precheck, Refusal, Scope};
use super::procfs::{MapsEntry, ProcDir, SmapsEntry};
use super::{sys, SysError};

/// Why a capture failed. The process is running again when this is
/// returned (the partial [`Frozen`] was dropped).
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("capture of process {pid}")]
    Sys {
        pid: i32,
        #[source]
        source: SysError,
    },
    #[error("reading /proc/{pid}/{what}")]
    Proc {
        pid: i32,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("thread {tid} of process {pid} is not a 64-bit x86 thread (cs={cs:#x})")]
    NotX86_64 { pid: i32, tid: i32, cs: u64 },
    #[error(
        "process {pid} has no [vdso]: capture needs its syscall instruction and restore its image"
    )]
    NoVdso { pid: i32 },
    #[error("process {pid} did not settle: threads kept appearing")]
    Unstable { pid: i32 },
    #[error("the process tree of {pid} cannot be moved or saved: {why}")]
    Tree {
        pid: i32,
        why: super::tree::TreeError,
    },
    #[error("writing the image of process {pid}")]
    Image {
        pid: i32,
        #[source]
        source: super::image::ImageError,
    },
}

/// How to write an image.
#[derive(Debug, Clone, Copy)]
pub struct ImageOptions {
    /// Mark all-zero pages instead of carrying their bytes.
    pub skip_zero_pages: bool,
}

impl Default for ImageOptions {
    fn default() -> Self {
        ImageOptions {
            skip_zero_pages: true,
        }
    }
}

/// Processes this process has under ptrace (by pid). When the tracer is in
/// the same thread group as a process's real parent (the agent in a guest's
/// PID 1, whose orphans are its children), the kernel reports the process's
/// ptrace stops to a wait of that parent too ("pretend the caller is
/// ptrace_do_wait", kernel/exit.c): a reaper's wait would take the stop the
/// capture thread waits for, and the capture would hang with the process
/// frozen. [`reap_orphans`] never waits on these.
static TRACED: std::sync::Mutex<BTreeSet<i32>> = std::sync::Mutex::new(BTreeSet::new());

/// `pid` stays in [`TRACED`] while this lives.
#[derive(Debug)]
struct Traced(i32);

impl Traced {
    fn new(pid: i32) -> Traced {
        TRACED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(pid);
        Traced(pid)
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        TRACED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.0);
        // A reaper that skipped the process while it was traced (it may have
        // exited meanwhile: killed after a move) gets another chance. Where
        // nobody handles SIGCHLD, its default action is to be ignored.
        let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGCHLD);
    }
}

/// Reaps the calling thread's exited children that are not under our
/// ptrace (see `TRACED`); returns how many. For PID 1's main thread on
/// SIGCHLD: its children are the orphans of the whole kernel.
pub fn reap_orphans() -> usize {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let flags = Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WNOTHREAD);
    // Held for the whole pass: no capture seizes a child between the check
    // and the wait.
    let traced = TRACED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let tid = nix::unistd::gettid();
    let listed = std::fs::read_to_string(format!("/proc/self/task/{tid}/children"));
    let mut n = 0;
    match listed {
        Ok(list) => {
            for child in list
                .split_whitespace()
                .filter_map(|c| c.parse::<i32>().ok())
            {
                if traced.contains(&child) {
                    continue;
                }
                if let Ok(st) = waitpid(Pid::from_raw(child), flags) {
                    if st != WaitStatus::StillAlive {
                        n += 1;
                    }
                }
            }
        }
        // No per-thread children list (CONFIG_PROC_CHILDREN): wait for any
        // child only while nothing is under capture.
        Err(_) if traced.is_empty() => loop {
            match waitpid(None, flags) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => n += 1,
            }
        },
        Err(_) => {}
    }
    n
}

/// A process with every thread stopped under our ptrace. Dropping it resumes
/// the process exactly where it was. Not `Send`: ptrace requests are only
/// accepted from the thread that attached.
#[derive(Debug)]
pub struct Frozen {
    pid: Pid,
    /// Leader first.
    tids: Vec<Pid>,
    meta: Option<ImageMeta>,
    live: bool,
    /// Frozen for a thread to leave (`freeze_for_split`).
    split: bool,
    /// The other processes frozen with it (a tree's).
    scope: Scope,
    /// Shared with the lazy page servers: true while the original is frozen
    /// (its memory is the image's); cleared before it is let go.
    frozen: Arc<AtomicBool>,
    /// When the first thread was seized: the process's downtime starts here.
    frozen_at: std::time::Instant,
    /// Registered before the first seize; dropped after `Drop` released the
    /// process (fields drop after `drop` runs).
    _traced: Traced,
    _not_send: PhantomData<*const ()>,
}

const PR_GET_TID_ADDRESS: u64 = 40;
const ATTEMPTS: usize = 64;

/// Freezes `pid`: refuses (without touching it) if the pre-check fails,
/// seizes and interrupts every thread until no new one appears, checks again
/// under freeze, and reads all state but memory.
pub fn freeze(pid: i32) -> Result<Frozen, CaptureError> {
    freeze_accepting(pid, |_| false, false, &Scope::default())
}

/// [`freeze`] for a thread leaving its process (see `split`): what stays
/// at home does not stop it — descriptors not carried (they are left out
/// of the image), children, POSIX timers, the process's DSM memory.
pub(crate) fn freeze_for_split(pid: i32) -> Result<Frozen, CaptureError> {
    freeze_accepting(
        pid,
        |b| match b {
            Blocker::SharedMapping { name, .. } => super::split::region_of(name).is_some(),
            Blocker::Socket { .. }
            | Blocker::OpenFd { .. }
            | Blocker::DeletedFile { .. }
            | Blocker::Stdio { .. }
            | Blocker::Children { .. }
            | Blocker::PosixTimer { .. }
            // Its futex filter (see `split`).
            | Blocker::Seccomp { mode: 2 } => true,
            _ => false,
        },
        true,
        &Scope::default(),
    )
}

/// [`freeze`], letting through the blockers `accept` says are expected;
/// `split`: the image leaves out descriptors it cannot carry; `scope`: the
/// other processes that move with it (a tree's).
pub(super) fn freeze_accepting(
    pid: i32,
    accept: impl Fn(&Blocker) -> bool,
    split: bool,
    scope: &Scope,
) -> Result<Frozen, CaptureError> {
    // A file the program opens, reads and closes (a /proc file read at
    // every step, say) may be open at the instant of the check: a refusal
    // for descriptors alone is asked again, the process thawed between,
    // before it stands.
    let mut tries = 0;
    loop {
        let r = seize_accepting(pid, &accept, split, scope).and_then(|(mut f, hints)| {
            f.settle(&hints, &accept)?;
            Ok(f)
        });
        match r {
            Err(CaptureError::Refused(Refusal::Blocked { ref blockers, .. }))
                if tries < FD_RETRIES && blockers.iter().all(Blocker::may_pass) =>
            {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

/// How many times a refusal for open descriptors alone is asked again.
const FD_RETRIES: u32 = 3;

/// The first half of [`freeze_accepting`]: the pre-check, then every
/// thread seized and stopped; nothing read yet (see [`Frozen::settle`]).
/// A tree's processes are all seized before any is read: what one holds
/// with another (a pipe's bytes, a socket pair's queue) is read once
/// neither can change it. Returns the smaps hints read before the seize.
pub(super) fn seize_accepting(
    pid: i32,
    accept: &impl Fn(&Blocker) -> bool,
    split: bool,
    scope: &Scope,
) -> Result<(Frozen, Vec<SmapsEntry>), CaptureError> {
    let keep = |r: Result<Precheck, Refusal>| match r {
        Err(Refusal::Blocked { pid, blockers }) => {
            let rest: Vec<Blocker> = blockers.into_iter().filter(|b| !accept(b)).collect();
            if rest.is_empty() {
                Ok(())
            } else {
                Err(Refusal::Blocked {
                    pid,
                    blockers: rest,
                })
            }
        }
        Err(e) => Err(e),
        Ok(_) => Ok(()),
    };
    let me = std::process::id() as i32;
    keep(check_within(Path::new("/proc"), pid, me, scope))?;
    let mut f = Frozen {
        pid: Pid::from_raw(pid),
        tids: Vec::new(),
        meta: None,
        live: true,
        split,
        scope: scope.clone(),
        frozen: Arc::new(AtomicBool::new(true)),
        frozen_at: std::time::Instant::now(),
        _traced: Traced::new(pid),
        _not_send: PhantomData,
    };
    // Residency and THP flags are hints (restore speed only): read them
    // before the freeze, since smaps walks the page tables (~20 ms at
    // 256 MiB resident) and would add that to the downtime.
    let hints = ProcDir::new(Path::new("/proc"), pid)
        .smaps()
        .unwrap_or_default();
    f.frozen_at = std::time::Instant::now();
    f.seize_all()?;
    Ok((f, hints))
}

impl Frozen {
    /// The second half of [`freeze_accepting`]: the pre-check again, the
    /// answer that counts (nothing can change any more), then all state
    /// but memory read.
    pub(super) fn settle(
        &mut self,
        hints: &[SmapsEntry],
        accept: &impl Fn(&Blocker) -> bool,
    ) -> Result<(), CaptureError> {
        // Our own trace (tracer = this thread) and its stop are expected now.
        let tracer = nix::unistd::gettid().as_raw();
        let ours = |b: &Blocker| match b {
            Blocker::Traced { tracer: t } => *t == tracer,
            Blocker::State { state } => *state == 't',
            b => accept(b),
        };
        let me = std::process::id() as i32;
        match check_within(Path::new("/proc"), self.pid.as_raw(), me, &self.scope) {
            Ok(_) => {}
            Err(Refusal::Blocked { pid, blockers }) => {
                let rest: Vec<Blocker> = blockers.into_iter().filter(|b| !ours(b)).collect();
                if !rest.is_empty() {
                    return Err(Refusal::Blocked {
                        pid,
                        blockers: rest,
                    }
                    .into());
                }
            }
            Err(e) => return Err(e.into()),
        }
        let meta = self.read_state(hints)?;
        self.meta = Some(meta);
        Ok(())
    }
}

/// Where a thread stopped inside the vDSO (`inside`) returns to: the
/// first of `[rsp]`, `[rbp + 8]` (the vDSO is built with frame pointers)
/// and the next stack words that lies in executable memory outside the
/// vDSO right after a call instruction. None when nothing there looks
/// like it.
fn return_address(
    tid: Pid,
    regs: &libc::user_regs_struct,
    inside: &std::ops::Range<u64>,
    mappings: &[Mapping],
) -> Option<u64> {
    let word = |at: u64| -> Option<u64> {
        let mut b = [0u8; 8];
        (read_remote(tid, at, &mut b).ok()? == 8).then(|| u64::from_le_bytes(b))
    };
    let after_call = |a: u64| -> bool {
        if inside.contains(&a)
            || !mappings
                .iter()
                .any(|m| m.prot & PROT_X != 0 && m.start < a && a <= m.end)
        {
            return false;
        }
        let mut b = [0u8; 7];
        if read_remote(tid, a - 7, &mut b).ok() != Some(7) {
            return false;
        }
        // call rel32 (e8 + 4), or call r/m64 (ff /2) of 2, 3, 6 or 7 bytes.
        b[2] == 0xe8
            || [5usize, 4, 1, 0]
                .iter()
                .any(|&i| b[i] == 0xff && (b[i + 1] >> 3) & 7 == 2)
    };
    let stack = (0..32).map(|k| regs.rsp + 8 * k);
    std::iter::once(regs.rsp)
        .chain(std::iter::once(regs.rbp.wrapping_add(8)))
        .chain(stack.skip(1))
        .filter_map(word)
        .find(|&a| after_call(a))
}

/// 128 bytes of dead memory in the stopped process: below a thread's stack
/// pointer (past the 128-byte red zone), where no other thread looks — in a
/// split process other threads run on while one is stopped, so their
/// memory is no place for scratch bytes.
pub(crate) fn below_stack(threads: &[ThreadState], mappings: &[Mapping]) -> Option<u64> {
    threads.iter().find_map(|t| {
        let at = sys::words_to_regs(&t.regs).rsp.checked_sub(512)? & !15;
        mappings
            .iter()
            .any(|m| {
                m.start <= at && at + 128 <= m.end && m.prot & (PROT_R | PROT_W) == PROT_R | PROT_W
            })
            .then_some(at)
    })
}

/// The mapping as `/proc/pid/maps` shows it now, with the residency and THP
/// flags of `hint` (the same range in an earlier smaps read), if any.
fn with_hints(now: &MapsEntry, hint: Option<&SmapsEntry>) -> Option<Mapping> {
    let mut m = to_mapping(now)?;
    let Some(e) = hint else {
        return Some(m);
    };
    m.resident = (e.rss_kib / 4).min(m.len() / PAGE);
    if e.hugepage {
        m.flags |= MAPF_HUGEPAGE;
    }
    if e.nohugepage {
        m.flags |= MAPF_NOHUGEPAGE;
    }
    Some(m)
}

/// One armed interval timer: which, and its `struct itimerval` words.
type ItimerState = (u8, [u64; 4]);

/// What the process said: its signal actions, interval timers, and each
/// POSIX timer's `struct itimerspec` words.
type Asked = (Vec<SigAction>, Vec<ItimerState>, Vec<[u64; 4]>);

/// What is asked of the leader only: its status, and where its signal
/// actions and interval timers go; the ids of its POSIX timers, and where
/// their `struct itimerspec` words go.
type LeaderAsks<'a> = (
    &'a super::procfs::Status,
    &'a mut Vec<SigAction>,
    &'a mut Vec<ItimerState>,
    &'a [u32],
    &'a mut Vec<[u64; 4]>,
);

/// A timer's words (interval, then time left, each as seconds and a
/// fraction) as the move carries them: no time left but a period means a
/// timer that expired while the process was stopped, which the kernel
/// re-arms (one period on) only when the process takes its signal — that
/// signal is pending and carried, and restored as it was, with no time
/// left, the timer would be disarmed for good. It gets the period, as the
/// kernel would have given it.
fn rearmed(mut t: [u64; 4]) -> [u64; 4] {
    if t[2] == 0 && t[3] == 0 {
        t[2] = t[0];
        t[3] = t[1];
    }
    t
}

/// The image's POSIX timers from what `/proc` lists and what
/// `timer_gettime` said (`times`, in the same order): a thread target
/// becomes its index among `threads`; time left as [`rearmed`] says.
fn posix_timers(
    listed: &[super::procfs::ProcTimer],
    times: &[[u64; 4]],
    threads: &[ThreadState],
) -> std::io::Result<Vec<PosixTimer>> {
    let mut out = Vec::with_capacity(listed.len());
    for (i, (t, w)) in listed.iter().zip(times).enumerate() {
        if let Some(why) = super::precheck::timer_blocker(t, i) {
            return Err(std::io::Error::other(format!("POSIX timer {} {why}", t.id)));
        }
        let w = rearmed(*w);
        let ns = |s: u64, n: u64| s.saturating_mul(1_000_000_000).saturating_add(n);
        let (interval_ns, value_ns) = (ns(w[0], w[1]), ns(w[2], w[3]));
        let (notify, thread) = match (t.notify.as_str(), t.to_thread) {
            ("none", _) => (SIGEV_NONE, 0),
            (_, false) => (SIGEV_SIGNAL, 0),
            (_, true) => {
                let i = threads
                    .iter()
                    .position(|x| x.tid as i32 == t.target)
                    .ok_or_else(|| {
                        std::io::Error::other(format!(
                            "POSIX timer {} signals thread {}, which is not in the process",
                            t.id, t.target
                        ))
                    })?;
                (SIGEV_THREAD_ID, i as u32)
            }
        };
        out.push(PosixTimer {
            id: t.id,
            clockid: super::precheck::carried_clock(t.clockid).map_err(std::io::Error::other)?,
            notify,
            signo: t.signo as u8,
            sigval: t.sigval,
            thread,
            interval_ns,
            value_ns,
        });
    }
    out.sort_by_key(|t| t.id);
    Ok(out)
}

/// `CLOCK_MONOTONIC` and `CLOCK_BOOTTIME` as process `pd` sees them now:
/// ours, moved by the difference between its time namespace's offsets and
/// ours (both are offsets from the kernel's own clocks).
pub(crate) fn process_clocks(
    pd: &ProcDir,
    (kernel_m, kernel_b): (i128, i128),
) -> std::io::Result<(u64, u64)> {
    let (their_m, their_b) = pd.timens_offsets()?;
    let (m, b) = (kernel_m + their_m, kernel_b + their_b);
    Ok((u64::try_from(m).unwrap_or(0), u64::try_from(b).unwrap_or(0)))
}

impl Frozen {
    fn sys(&self) -> impl FnOnce(SysError) -> CaptureError {
        let pid = self.pid.as_raw();
        move |source| CaptureError::Sys { pid, source }
    }

    fn proc_err(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> CaptureError {
        let pid = self.pid.as_raw();
        move |source| CaptureError::Proc { pid, what, source }
    }

    /// The address of a `syscall` instruction in the process (in its vDSO)
    /// for injected calls.
    pub(crate) fn syscall_insn(&self) -> Result<u64, CaptureError> {
        let pid = self.pid;
        let vdso = self
            .meta()
            .mappings
            .iter()
            .find(|m| m.kind == MappingKind::Vdso)
            .ok_or(CaptureError::NoVdso { pid: pid.as_raw() })?;
        let mut b = vec![0u8; vdso.len() as usize];
        read_remote(pid, vdso.start, &mut b).map_err(|e| {
            self.sys()(SysError::Mem {
                what: "reading [vdso]",
                pid: pid.as_raw(),
                source: e.into(),
            })
        })?;
        b.windows(2)
            .position(|w| w == [0x0f, 0x05])
            .map(|i| vdso.start + i as u64)
            .ok_or(CaptureError::NoVdso { pid: pid.as_raw() })
    }

    /// Seizes and stops every thread, re-reading the task list until no
    /// new thread appears.
    fn seize_all(&mut self) -> Result<(), CaptureError> {
        let pd = ProcDir::new(Path::new("/proc"), self.pid.as_raw());
        let mut seen: BTreeSet<i32> = BTreeSet::new();
        for _ in 0..ATTEMPTS {
            let tasks = pd.tasks().map_err(self.proc_err("task"))?;
            let fresh: Vec<i32> = tasks.into_iter().filter(|t| !seen.contains(t)).collect();
            if fresh.is_empty() {
                // Leader first, then by tid.
                self.tids.sort_by_key(|t| (*t != self.pid, t.as_raw()));
                if self.tids.first() != Some(&self.pid) {
                    return Err(Refusal::Blocked {
                        pid: self.pid.as_raw(),
                        blockers: vec![Blocker::LeaderGone],
                    }
                    .into());
                }
                return Ok(());
            }
            let mut started = Vec::new();
            for t in fresh {
                seen.insert(t);
                let tid = Pid::from_raw(t);
                match ptrace::seize(tid, ptrace::Options::empty()) {
                    Ok(()) => {}
                    // Exited between the listing and the seize.
                    Err(Errno::ESRCH) => continue,
                    Err(e) => return Err(self.sys()(ptrace_err("PTRACE_SEIZE", tid)(e))),
                }
                self.tids.push(tid);
                ptrace::interrupt(tid)
                    .map_err(|e| self.sys()(ptrace_err("PTRACE_INTERRUPT", tid)(e)))?;
                started.push(tid);
            }
            for tid in started {
                self.wait_frozen(tid)?;
            }
        }
        Err(CaptureError::Unstable {
            pid: self.pid.as_raw(),
        })
    }

    /// Lets `tid` run out of the vDSO (`inside`) if the freeze caught it
    /// there: restored on another kernel build, only the old vDSO's entry
    /// points lead anywhere (see `vdso`). It runs, alone, to the address
    /// its vDSO call returns to (a hardware breakpoint there, found on its
    /// stack), or, where none is found, one instruction at a time; single
    /// steps alone would not do: under TCG one takes long enough for every
    /// timer tick to send `clock_gettime` round its retry loop again. Leaves
    /// it in an interrupt stop again, with a signal that came meanwhile
    /// delivered from outside the vDSO (its handler runs after the restore;
    /// its siginfo is the tracer's). One still inside after all that is
    /// left there (the same build restores it; another refuses it).
    fn step_out(
        &mut self,
        tid: Pid,
        inside: &std::ops::Range<u64>,
        mappings: &[Mapping],
    ) -> Result<(), CaptureError> {
        const ROUNDS: u32 = 32;
        const STEPS: u32 = 256;
        let e = |op| {
            let f = self.sys();
            move |err| f(ptrace_err(op, tid)(err))
        };
        let mut held = 0;
        let mut rounds = 0;
        let mut hold = |stop: Stop| -> Result<(), CaptureError> {
            match stop {
                Stop::Status(WaitStatus::Stopped(_, Signal::SIGTRAP))
                | Stop::Status(WaitStatus::PtraceEvent(..)) => {}
                Stop::Status(WaitStatus::Stopped(_, sig)) => held = sig as i32,
                Stop::Realtime(sig) => held = sig,
                Stop::Status(other) => {
                    return Err(self.sys()(SysError::Stop {
                        tid: tid.as_raw(),
                        status: format!("{other:?}"),
                        wanted: "the way out of the vDSO",
                    }))
                }
            }
            Ok(())
        };
        while rounds < ROUNDS {
            let regs = ptrace::getregs(tid).map_err(e("PTRACE_GETREGS"))?;
            if !inside.contains(&regs.rip) {
                break;
            }
            rounds += 1;
            match return_address(tid, &regs, inside, mappings) {
                Some(to) => {
                    sys::set_debugreg(tid, 0, to).map_err(e("PTRACE_POKEUSER"))?;
                    // DR7: local enable of breakpoint 0, on execution.
                    sys::set_debugreg(tid, 7, 1).map_err(e("PTRACE_POKEUSER"))?;
                    super::inject::cont_with(tid, 0).map_err(self.sys())?;
                    let stop = match super::inject::poll_stop(
                        tid,
                        std::time::Duration::from_millis(20),
                        "the vDSO call's return",
                    )
                    .map_err(self.sys())?
                    {
                        Some(s) => s,
                        // Not there yet (a guessed address it does not
                        // reach soon): stopped again, and another look.
                        None => {
                            ptrace::interrupt(tid).map_err(e("PTRACE_INTERRUPT"))?;
                            wait_stop(tid, "the interrupt stop").map_err(self.sys())?
                        }
                    };
                    sys::set_debugreg(tid, 7, 0).map_err(e("PTRACE_POKEUSER"))?;
                    sys::set_debugreg(tid, 6, 0).map_err(e("PTRACE_POKEUSER"))?;
                    hold(stop)?;
                }
                None => {
                    for _ in 0..STEPS {
                        ptrace::step(tid, None).map_err(e("PTRACE_SINGLESTEP"))?;
                        hold(wait_stop(tid, "a single step").map_err(self.sys())?)?;
                        let rip = ptrace::getregs(tid).map_err(e("PTRACE_GETREGS"))?.rip;
                        if !inside.contains(&rip) {
                            break;
                        }
                    }
                }
            }
        }
        if rounds == 0 {
            return Ok(());
        }
        log::debug!("thread {tid} taken out of the vDSO in {rounds} rounds");
        ptrace::interrupt(tid).map_err(e("PTRACE_INTERRUPT"))?;
        super::inject::cont_with(tid, held).map_err(self.sys())?;
        self.wait_frozen(tid)
    }

    /// Waits until `tid` sits in the interrupt (or group) stop. A signal that
    /// arrives first is delivered (as it would have been) and the wait goes
    /// on; a thread that exits is forgotten.
    fn wait_frozen(&mut self, tid: Pid) -> Result<(), CaptureError> {
        loop {
            match wait_stop(tid, "the interrupt stop") {
                Ok(Stop::Status(WaitStatus::PtraceEvent(_, _, ev)))
                    if ev == libc::PTRACE_EVENT_STOP =>
                {
                    return Ok(())
                }
                Ok(Stop::Status(WaitStatus::Stopped(_, sig))) => ptrace::cont(tid, sig)
                    .map_err(|e| self.sys()(ptrace_err("PTRACE_CONT", tid)(e)))?,
                // A POSIX timer's real-time signal, say: delivered as well.
                Ok(Stop::Realtime(sig)) => {
                    super::inject::cont_with(tid, sig).map_err(|e| self.sys()(e))?
                }
                Ok(Stop::Status(other)) => {
                    return Err(self.sys()(SysError::Stop {
                        tid: tid.as_raw(),
                        status: format!("{other:?}"),
                        wanted: "the interrupt stop",
                    }))
                }
                Err(SysError::Stop { .. }) => {
                    self.tids.retain(|t| *t != tid);
                    return Ok(());
                }
                Err(e) => return Err(self.sys()(e)),
            }
        }
    }

    /// Everything but memory, read under freeze; `hints` (smaps read just
    /// before it) give each mapping that has not changed since its resident
    /// count and THP flags.
    fn read_state(&mut self, hints: &[SmapsEntry]) -> Result<ImageMeta, CaptureError> {
        let pid = self.pid;
        let pd = ProcDir::new(Path::new("/proc"), pid.as_raw());
        let maps = pd.maps().map_err(self.proc_err("maps"))?;
        let mappings: Vec<Mapping> = maps
            .iter()
            .filter_map(|m| {
                let h = hints
                    .iter()
                    .find(|h| (h.map.start, h.map.end, h.map.offset) == (m.start, m.end, m.offset));
                with_hints(m, h)
            })
            .collect();
        let vdso = mappings
            .iter()
            .find(|m| m.kind == MappingKind::Vdso)
            .ok_or(CaptureError::NoVdso { pid: pid.as_raw() })?;
        let mut vdso_bytes = vec![0u8; vdso.len() as usize];
        read_remote(pid, vdso.start, &mut vdso_bytes).map_err(|e| {
            self.sys()(SysError::Mem {
                what: "reading [vdso]",
                pid: pid.as_raw(),
                source: e.into(),
            })
        })?;
        let insn = vdso_bytes
            .windows(2)
            .position(|w| w == [0x0f, 0x05])
            .map(|i| vdso.start + i as u64)
            .ok_or(CaptureError::NoVdso { pid: pid.as_raw() })?;
        let kernel = fingerprint(&vdso_bytes);

        let stat = pd.stat().map_err(self.proc_err("stat"))?;
        let status = pd.status().map_err(self.proc_err("status"))?;
        let heap_end = mappings
            .iter()
            .find(|m| m.kind == MappingKind::Heap)
            .map(|m| m.end);
        let mm = MmFields {
            start_code: stat.start_code,
            end_code: stat.end_code,
            start_data: stat.start_data,
            end_data: stat.end_data,
            start_brk: stat.start_brk,
            // The exact brk is not in /proc; the end of [heap] is it rounded
            // up to a page, which brk() treats the same.
            brk: heap_end.unwrap_or(stat.start_brk).max(stat.start_brk),
            start_stack: stat.start_stack,
            arg_start: stat.arg_start,
            arg_end: stat.arg_end,
            env_start: stat.env_start,
            env_end: stat.env_end,
        };

        let inside = vdso.start..vdso.end;
        for tid in self.tids.clone() {
            self.step_out(tid, &inside, &mappings)?;
        }
        let mut threads = Vec::with_capacity(self.tids.len());
        for &tid in &self.tids {
            threads.push(self.read_thread(&pd, tid)?);
        }
        let shared_pending = sys::peek_siginfo(pid, true)
            .map_err(|e| self.sys()(ptrace_err("PTRACE_PEEKSIGINFO", pid)(e)))?
            .into_iter()
            .map(SigInfo)
            .collect();

        // What /proc does not show: ask the process itself.
        let scratch = below_stack(&threads, &mappings)
            .or_else(|| {
                mappings
                    .iter()
                    .find(|m| {
                        m.prot & (PROT_R | PROT_W) == PROT_R | PROT_W
                            && !m.kind.is_special()
                            && m.kind != MappingKind::File
                    })
                    .map(|m| m.start)
            })
            .ok_or_else(|| {
                self.sys()(SysError::Mem {
                    what: "finding a writable page for scratch",
                    pid: pid.as_raw(),
                    source: std::io::Error::other("no private writable anonymous mapping"),
                })
            })?;
        let mut saved = [0u8; 64];
        read_remote(pid, scratch, &mut saved).map_err(|e| {
            self.sys()(SysError::Mem {
                what: "saving scratch bytes",
                pid: pid.as_raw(),
                source: e.into(),
            })
        })?;
        // POSIX timers stay at home when a thread leaves.
        let proc_timers = if self.split {
            Vec::new()
        } else {
            pd.posix_timers().map_err(self.proc_err("timers"))?
        };
        let ids: Vec<u32> = proc_timers.iter().map(|t| t.id).collect();
        let asked = self.ask_process(insn, scratch, &status, &ids, &mut threads);
        let put_back = write_remote(pid, scratch, &saved);
        let (sigactions, itimers, times) = asked?;
        put_back.map_err(|e| {
            self.sys()(SysError::Mem {
                what: "restoring scratch bytes",
                pid: pid.as_raw(),
                source: e.into(),
            })
        })?;

        let super::precheck::CapturedFiles {
            stdio,
            files,
            pipes,
            socketpairs,
            epolls,
            memfds,
            kernel_clocks,
        } = match super::precheck::open_files(&pd, self.split, &self.scope) {
            Ok(s) => s,
            Err(e) => return Err(self.proc_err("fd")(e)),
        };
        // A thread that leaves takes no descriptor along.
        let memfds = if self.split {
            Vec::new()
        } else {
            super::precheck::memfd_states(&pd, &memfds).map_err(self.proc_err("memfd"))?
        };
        // Of the moment the timerfds' times left are of.
        let (monotonic_ns, boottime_ns) =
            process_clocks(&pd, kernel_clocks).map_err(self.proc_err("timens_offsets"))?;
        Ok(ImageMeta {
            header: Header {
                flags: FLAG_ZERO_RUNS,
                kernel,
            },
            process: ProcessInfo {
                pid: pid.as_raw() as u32,
                personality: pd.personality().map_err(self.proc_err("personality"))?,
                mm,
                auxv: pd.auxv().map_err(self.proc_err("auxv"))?,
                stdio,
                sigactions,
                shared_pending,
                exe: pd.exe(),
                files,
                monotonic_ns,
                boottime_ns,
                itimers,
                pipes,
                socketpairs,
                epolls,
                posix_timers: posix_timers(&proc_timers, &times, &threads)
                    .map_err(self.proc_err("timers"))?,
                memfds,
                vdso: vdso_bytes,
                xfeatures: super::cpu::xfeatures(),
                cpu: super::cpu::picked(pid.as_raw()),
            },
            threads,
            mappings,
        })
    }

    fn read_thread(&self, pd: &ProcDir, tid: Pid) -> Result<ThreadState, CaptureError> {
        let e = |op| {
            let f = self.sys();
            move |err| f(ptrace_err(op, tid)(err))
        };
        let regs = ptrace::getregs(tid).map_err(e("PTRACE_GETREGS"))?;
        if regs.cs != 0x33 {
            return Err(CaptureError::NotX86_64 {
                pid: self.pid.as_raw(),
                tid: tid.as_raw(),
                cs: regs.cs,
            });
        }
        let mut buf = vec![0u8; super::image::MAX_XSTATE];
        let (fp_kind, fp) = match sys::getregset(tid, sys::NT_X86_XSTATE, &mut buf) {
            Ok(n) => {
                buf.truncate(n);
                (FpKind::Xstate, buf)
            }
            Err(_) => {
                let mut b = vec![0u8; 512];
                let n =
                    sys::getregset(tid, sys::NT_PRFPREG, &mut b).map_err(e("PTRACE_GETREGSET"))?;
                b.truncate(n);
                (FpKind::Fxsave, b)
            }
        };
        let sigmask = sys::get_sigmask(tid).map_err(e("PTRACE_GETSIGMASK"))?;
        let pending = sys::peek_siginfo(tid, false)
            .map_err(e("PTRACE_PEEKSIGINFO"))?
            .into_iter()
            .map(SigInfo)
            .collect();
        let rseq = match sys::get_rseq_config(tid) {
            Ok(c) => Rseq {
                abi_pointer: c.rseq_abi_pointer,
                abi_size: c.rseq_abi_size,
                signature: c.signature,
                flags: c.flags,
            },
            // Kernels before 5.13 cannot tell; treat as unregistered.
            Err(Errno::EIO) | Err(Errno::EINVAL) => Rseq::default(),
            Err(err) => return Err(e("PTRACE_GET_RSEQ_CONFIGURATION")(err)),
        };
        let (robust_list, robust_len) = sys::get_robust_list(tid).map_err(e("get_robust_list"))?;
        Ok(ThreadState {
            tid: tid.as_raw() as u32,
            regs: sys::regs_to_words(&regs),
            fp_kind,
            fp,
            sigmask,
            rseq,
            clear_child_tid: 0,
            robust_list,
            robust_len,
            altstack: AltStack::default(),
            comm: pd.comm(tid.as_raw()),
            pending,
        })
    }

    /// Injects the read-only queries into each thread (all signals blocked,
    /// registers and mask put back after each thread).
    fn ask_process(
        &self,
        insn: u64,
        scratch: u64,
        status: &super::procfs::Status,
        timer_ids: &[u32],
        threads: &mut [ThreadState],
    ) -> Result<Asked, CaptureError> {
        let mut actions = Vec::new();
        let mut itimers = Vec::new();
        let mut times = Vec::new();
        for (i, t) in threads.iter_mut().enumerate() {
            let tid = Pid::from_raw(t.tid as i32);
            let r = self.ask_thread(
                tid,
                insn,
                scratch,
                t,
                if i == 0 {
                    Some((status, &mut actions, &mut itimers, timer_ids, &mut times))
                } else {
                    None
                },
            );
            let regs = sys::words_to_regs(&t.regs);
            let back_regs = ptrace::setregs(tid, regs);
            let back_mask = sys::set_sigmask(tid, t.sigmask);
            r?;
            back_regs.map_err(|e| self.sys()(ptrace_err("PTRACE_SETREGS", tid)(e)))?;
            back_mask.map_err(|e| self.sys()(ptrace_err("PTRACE_SETSIGMASK", tid)(e)))?;
        }
        Ok((actions, itimers, times))
    }

    fn ask_thread(
        &self,
        tid: Pid,
        insn: u64,
        scratch: u64,
        t: &mut ThreadState,
        leader: Option<LeaderAsks<'_>>,
    ) -> Result<(), CaptureError> {
        let pid = self.pid;
        let mem_err = |what| {
            let f = self.sys();
            move |e: Errno| {
                f(SysError::Mem {
                    what,
                    pid: pid.as_raw(),
                    source: e.into(),
                })
            }
        };
        sys::set_sigmask(tid, !0)
            .map_err(|e| self.sys()(ptrace_err("PTRACE_SETSIGMASK", tid)(e)))?;
        let base = sys::words_to_regs(&t.regs);
        let run = |call: Call| -> Result<u64, CaptureError> {
            inject(tid, insn, &base, &call)
                .and_then(|o| o.check(&call, tid))
                .map_err(self.sys())
        };
        let mut b8 = [0u8; 8];
        match run(Call::new(
            "prctl(PR_GET_TID_ADDRESS)",
            libc::SYS_prctl,
            &[PR_GET_TID_ADDRESS, scratch],
        )) {
            Ok(_) => {
                read_remote(pid, scratch, &mut b8).map_err(mem_err("reading clear_child_tid"))?;
                t.clear_child_tid = u64::from_le_bytes(b8);
            }
            // Kernel without CONFIG_CHECKPOINT_RESTORE: unknown, left 0.
            Err(CaptureError::Sys {
                source:
                    SysError::Syscall {
                        source: Errno::EINVAL,
                        ..
                    },
                ..
            }) => {}
            Err(e) => return Err(e),
        }
        run(Call::new(
            "sigaltstack",
            libc::SYS_sigaltstack,
            &[0, scratch],
        ))?;
        let mut ss = [0u8; 24];
        read_remote(pid, scratch, &mut ss).map_err(mem_err("reading sigaltstack"))?;
        t.altstack = AltStack {
            sp: u64::from_le_bytes(ss[..8].try_into().unwrap_or([0; 8])),
            flags: u32::from_le_bytes(ss[8..12].try_into().unwrap_or([0; 4])),
            size: u64::from_le_bytes(ss[16..24].try_into().unwrap_or([0; 8])),
        };
        if let Some((status, actions, itimers, timer_ids, times)) = leader {
            // Four u64 words the last call left at `scratch`.
            let words = |what| -> Result<[u64; 4], CaptureError> {
                let mut v = [0u8; 32];
                read_remote(pid, scratch, &mut v).map_err(mem_err(what))?;
                Ok(std::array::from_fn(|i| {
                    u64::from_le_bytes(v[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]))
                }))
            };
            for &id in timer_ids {
                run(Call::new(
                    "timer_gettime",
                    libc::SYS_timer_gettime,
                    &[u64::from(id), scratch],
                ))?;
                times.push(words("reading an itimerspec")?);
            }
            for which in 0..3u8 {
                run(Call::new(
                    "getitimer",
                    libc::SYS_getitimer,
                    &[u64::from(which), scratch],
                ))?;
                let t = rearmed(words("reading an itimerval")?);
                // Armed when time is left.
                if t[2] != 0 || t[3] != 0 {
                    itimers.push((which, t));
                }
            }
            for sig in 1..=64u8 {
                let bit = 1u64 << (sig - 1);
                if sig == 9 || sig == 19 {
                    continue;
                }
                if status.sig_cgt & bit != 0 {
                    run(Call::new(
                        "rt_sigaction",
                        libc::SYS_rt_sigaction,
                        &[u64::from(sig), 0, scratch, 8],
                    ))?;
                    let [handler, flags, restorer, mask] = words("reading a sigaction")?;
                    actions.push(SigAction {
                        signo: sig,
                        handler,
                        flags,
                        restorer,
                        mask,
                    });
                } else if status.sig_ign & bit != 0 {
                    actions.push(SigAction {
                        signo: sig,
                        handler: 1, // SIG_IGN
                        flags: 0,
                        restorer: 0,
                        mask: 0,
                    });
                }
            }
        }
        Ok(())
    }

    /// When the process stopped running (its first thread was seized): the
    /// start of the migration's downtime.
    pub fn frozen_at(&self) -> std::time::Instant {
        self.frozen_at
    }

    /// The original pid.
    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    /// Thread ids, leader first.
    pub fn threads(&self) -> Vec<i32> {
        self.tids.iter().map(|t| t.as_raw()).collect()
    }

    /// Everything captured but memory.
    pub fn meta(&self) -> &ImageMeta {
        // Set by `freeze` before the value is handed out.
        self.meta
            .as_ref()
            .unwrap_or_else(|| unreachable!("Frozen without state"))
    }

    /// Streams the image (state, then every page of every mapping) to `w`.
    /// May be called more than once; the process stays frozen.
    pub fn write_image<W: Write>(
        &self,
        w: W,
        opts: ImageOptions,
    ) -> Result<ImageStats, CaptureError> {
        let ranges: Vec<(u64, u64)> = self
            .meta()
            .mappings
            .iter()
            .filter(|m| super::lazy::carried(m))
            .map(|m| (m.start, m.end))
            .collect();
        self.write_ranges(w, opts, &ranges, false)
    }

    /// Streams a lazy image: the state, every mapping, and only the pages
    /// the process needs to resume (around each thread's stack pointer,
    /// instruction pointer and TLS; see [`LazyOptions`]). Returns the page
    /// server for every other page; the process stays frozen until the
    /// caller lets it go, which it does once
    /// [`PageServer::wait_all_sent`] says every page has moved.
    pub fn write_lazy_image<W: Write>(
        &self,
        w: W,
        opts: LazyOptions,
    ) -> Result<(ImageStats, PageServer), CaptureError> {
        let eager = eager_ranges(self.meta(), &opts);
        let stats = self.write_ranges(w, ImageOptions::default(), &eager, true)?;
        let server = PageServer::new(self.pid, Arc::clone(&self.frozen), self.meta(), &eager);
        Ok((stats, server))
    }

    /// The image with the pages of `ranges` (sorted, disjoint, each inside
    /// one carried mapping).
    fn write_ranges<W: Write>(
        &self,
        w: W,
        opts: ImageOptions,
        ranges: &[(u64, u64)],
        lazy: bool,
    ) -> Result<ImageStats, CaptureError> {
        self.write_meta(w, opts, self.meta(), ranges, lazy, true)
    }

    /// Writes `meta` (this process's state or a part of it) with the pages
    /// of `ranges`; `shared`: with the process-wide signal queue.
    pub(crate) fn write_meta<W: Write>(
        &self,
        w: W,
        opts: ImageOptions,
        meta: &ImageMeta,
        ranges: &[(u64, u64)],
        lazy: bool,
        shared: bool,
    ) -> Result<ImageStats, CaptureError> {
        let pid = self.pid.as_raw();
        let ie = move |source| CaptureError::Image { pid, source };
        let mut header = meta.header.clone();
        if !opts.skip_zero_pages {
            header.flags &= !FLAG_ZERO_RUNS;
        }
        if lazy {
            header.flags |= FLAG_LAZY;
        }
        let mut iw = ImageWriter::new(w, &header).map_err(ie)?;
        // Signals may still be queued while the process is frozen (memory
        // and registers cannot change): read the queues now.
        let mut process = meta.process.clone();
        process.shared_pending = if shared {
            self.pending(self.pid, true)?
        } else {
            Vec::new()
        };
        // The image numbers the process and its threads as they see
        // themselves (their pid namespace's numbers: NSpid), which is what
        // glibc caches and a tree's restore gives them back.
        let seen = |id: u32| {
            ProcDir::new(Path::new("/proc"), id as i32)
                .ns_pid()
                .map(|n| n as u32)
                .map_err(self.proc_err("status"))
        };
        process.pid = seen(process.pid)?;
        iw.process(&process).map_err(ie)?;
        for t in &meta.threads {
            let mut t = t.clone();
            t.pending = self.pending(Pid::from_raw(t.tid as i32), false)?;
            t.tid = seen(t.tid)?;
            iw.thread(&t).map_err(ie)?;
        }
        for m in &meta.mappings {
            iw.mapping(m).map_err(ie)?;
        }
        let mut mem: Option<File> = None;
        let mut buf = vec![0u8; 2 << 20];
        for &(start, end) in ranges {
            let Some(m) = meta
                .mappings
                .iter()
                .find(|m| m.start <= start && end <= m.end)
            else {
                continue;
            };
            let mut addr = start;
            let mut zero_run: Option<(u64, u64)> = None;
            while addr < end {
                let n = (end - addr).min(buf.len() as u64) as usize;
                let chunk = &mut buf[..n];
                read_pages(self.pid, &mut mem, m, addr, chunk).map_err(self.proc_err("mem"))?;
                let mut i = 0usize;
                while i < n {
                    let page = &chunk[i..i + PAGE as usize];
                    if opts.skip_zero_pages && is_zero(page) {
                        let a = addr + i as u64;
                        zero_run = match zero_run {
                            Some((s, c)) => Some((s, c + 1)),
                            None => Some((a, 1)),
                        };
                        i += PAGE as usize;
                        continue;
                    }
                    if let Some((s, c)) = zero_run.take() {
                        iw.zero(s, c).map_err(ie)?;
                    }
                    let mut j = i + PAGE as usize;
                    while j < n && !(opts.skip_zero_pages && is_zero(&chunk[j..j + PAGE as usize]))
                    {
                        j += PAGE as usize;
                    }
                    iw.data(addr + i as u64, &chunk[i..j]).map_err(ie)?;
                    i = j;
                }
                addr += n as u64;
            }
            if let Some((s, c)) = zero_run.take() {
                iw.zero(s, c).map_err(ie)?;
            }
        }
        let (_, stats) = iw.finish().map_err(ie)?;
        Ok(stats)
    }

    fn pending(&self, tid: Pid, shared: bool) -> Result<Vec<SigInfo>, CaptureError> {
        Ok(sys::peek_siginfo(tid, shared)
            .map_err(|e| self.sys()(ptrace_err("PTRACE_PEEKSIGINFO", tid)(e)))?
            .into_iter()
            .map(SigInfo)
            .collect())
    }

    fn release(&mut self, kill_it: bool) {
        if !self.live {
            return;
        }
        self.live = false;
        // SYNC POINT: page servers stop reading before the original moves on.
        self.frozen.store(false, Ordering::Release);
        if kill_it {
            // When we are also the real parent, the caller reaps the leader
            // itself (e.g. through its `Child`): leave that wait to it.
            let parent = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')?
                        .1
                        .split_whitespace()
                        .nth(1)?
                        .parse::<u32>()
                        .ok()
                });
            let ours = parent == Some(std::process::id());
            let _ = kill(self.pid, Signal::SIGKILL);
            // Collect the ptrace exit reports so the real parent can reap
            // the process; non-leaders first (the leader reports last).
            for &tid in self.tids.iter().rev() {
                if ours && tid == self.pid {
                    continue;
                }
                loop {
                    match nix::sys::wait::waitpid(tid, Some(nix::sys::wait::WaitPidFlag::__WALL)) {
                        Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) => break,
                        Ok(_) => continue,
                        Err(Errno::EINTR) => continue,
                        Err(_) => break,
                    }
                }
            }
        } else {
            for &tid in &self.tids {
                let _ = ptrace::detach(tid, None);
            }
        }
    }

    /// Lets the process run on, untouched.
    pub fn resume(mut self) {
        self.release(false);
    }

    /// Ends the process (after a successful migration). Its real parent
    /// still reaps it (the caller too, when it is that parent).
    pub fn kill(mut self) {
        self.release(true);
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.release(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut p = vec![0u8; 4096];
        assert!(is_zero(&p));
        p[4095] = 1;
        assert!(!is_zero(&p));
        p[4095] = 0;
        p[0] = 1;
        assert!(!is_zero(&p));
    }

    #[test]
    fn an_expired_periodic_timer_gets_its_period_and_a_disarmed_one_stays_so() {
        assert_eq!(rearmed([0, 20_000, 0, 0]), [0, 20_000, 0, 20_000]);
        assert_eq!(rearmed([1, 5, 0, 7]), [1, 5, 0, 7]);
        assert_eq!(rearmed([0; 4]), [0; 4]);
    }
}
