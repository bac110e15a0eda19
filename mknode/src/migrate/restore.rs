//! Destination side: turn an image into a running process.
//!
//! A forked stub (see `sys::spawn_stub`) stops under `PTRACE_TRACEME` with a
//! one-page control area holding a `syscall` instruction. Every later step is
//! a syscall injected there (`inject`): unmap everything else (the fork,
//! its stop and this run before the image is read, while it is still on its
//! way: `Blank`), enter a time namespace and take its files from the
//! restorer (`pidfd_getfd`), map the vDSO
//! where it was (`ARCH_MAP_VDSO_64`), map each region at its address, fill it
//! with `process_vm_writev` as the pages stream in, set protections, mm
//! fields and auxv (`PR_SET_MM_MAP`), signal actions, clone the other threads
//! (`PTRACE_O_TRACECLONE` catches them stopped), give each thread its rseq,
//! altstack, robust list, name and queued signals, unmap the control page,
//! load every register file and signal mask, and detach.
//!
//! Until the detach, the stub dies with its guard (and with the restorer:
//! `PTRACE_O_EXITKILL`), so a failed restore leaves nothing behind.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::image::{
    FileKind, FileState, ImageError, ImageMeta, ImageReader, ImageStats, Mapping, MappingKind,
    MemfdState, OpenFile, Pages, PipeState, SocketPairState, ThreadState, TimerState, FLAG_LAZY,
    MAPF_DSM, MAPF_GROWSDOWN, MAPF_HUGEPAGE, MAPF_NOHUGEPAGE, MAPF_SHARED, PAGE, PROT_R, PROT_W,
    TFD_ABSTIME, TFD_CANCEL_ON_SET, USER_TOP,
};
use super::inject::{
    first_stop, inject, inject_batch, ptrace_err, Call, Outcome, BATCH_CODE, BATCH_ENTRY,
};
use super::lazy::{carried, LazyLink};
use super::memory::{fingerprint, read_remote, to_mapping, write_remote};
use super::pager::{self, LazyError, PageTable, Pager, PagerOptions};
use super::procfs::{parse_maps, ProcDir};
use super::split::{Answer, Share};
use super::vdso;
use super::{sys, SysError};
use crate::uffd::{self, Uffd};

/// What the restored process gets as fds 0, 1, 2 (the destination's own:
/// pipes to the agent, or /dev/null). Every other descriptor is closed.
#[derive(Debug)]
pub struct StdioPlan {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

impl StdioPlan {
    /// `/dev/null` for all three.
    pub fn null() -> io::Result<Self> {
        let n = || -> io::Result<OwnedFd> {
            Ok(File::options()
                .read(true)
                .write(true)
                .open("/dev/null")?
                .into())
        };
        Ok(StdioPlan {
            stdin: n()?,
            stdout: n()?,
            stderr: n()?,
        })
    }
}

/// Why a restore failed. Nothing of the new process is left running.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("reading the image")]
    Image(#[from] ImageError),
    #[error("the image was taken on another kernel ({image}) and carries no vDSO to redirect to this one's ({local})")]
    Kernel { image: String, local: String },
    #[error("vDSO layout differs: {0}")]
    Layout(String),
    #[error("{}", super::cpu::lacking_text(.0, ""))]
    Cpu(String),
    #[error("thread {tid}")]
    Registers {
        tid: u32,
        #[source]
        source: super::cpu::XstateError,
    },
    #[error("another kernel build: redirecting the process's old vDSO to this kernel's")]
    Vdso(#[from] vdso::VdsoError),
    #[error("the DSM")]
    Dsm(#[source] crate::dsm::DsmError),
    #[error("the shadow's futex filter")]
    FutexFilter(#[source] Box<super::split::SplitError>),
    #[error("rebuilding the process")]
    Sys(#[from] SysError),
    #[error("the restore stub exited before stopping (code {0})")]
    Stub(i32),
    #[error("no free page for the control page below {USER_TOP:#x}")]
    NoControlPage,
    #[error(
        "the image is lazy (its pages are served by the origin): restore it with restore_lazy"
    )]
    LazyImage,
    #[error("setting up the userfaultfd of process {pid}: {what}")]
    Uffd {
        what: &'static str,
        pid: i32,
        #[source]
        source: Errno,
    },
    #[error("lazy pages")]
    Lazy(#[source] LazyError),
    #[error("giving the process its clocks back (a time namespace with offsets): {0}")]
    Clocks(String),
    /// A POSIX timer could not be made again with its id.
    #[error("POSIX timer {id}: {why}")]
    Timer { id: u32, why: String },
    #[error("fd {fd}: cannot reopen {path} here: {why}")]
    File { fd: u32, path: String, why: String },
    #[error("reading this process's own {what}")]
    Local {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// A process rebuilt from an image, now running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// Its pid here (a child of the caller, which must reap it; a tree's
    /// top: the caller reaps `reap`).
    pub pid: i32,
    /// The caller's child to reap, whose exit status is the process's: the
    /// process itself, or a tree's holder (see `tree`).
    pub reap: i32,
    /// New tids, in the image's thread order (leader first).
    pub threads: Vec<i32>,
    pub stats: ImageStats,
}

/// A process restored lazily, now running while its pages arrive.
#[derive(Debug)]
pub struct LazyRestored {
    pub restored: Restored,
    /// Fills the rest of its memory; [`Pager::wait`] returns once every
    /// page is in (or says why the process was killed).
    pub pager: Pager,
}

/// The stub until it runs: killed and reaped on drop.
pub(super) struct Stub {
    pub(super) pid: Pid,
    pub(super) tids: Vec<Pid>,
    pub(super) armed: bool,
}

impl Drop for Stub {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let _ = kill(self.pid, Signal::SIGKILL);
        for &t in self.tids.iter().rev() {
            loop {
                match waitpid(t, Some(WaitPidFlag::__WALL)) {
                    Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) => break,
                    Err(Errno::EINTR) | Ok(_) => continue,
                    Err(_) => break,
                }
            }
        }
    }
}

const ARCH_MAP_VDSO_64: u64 = 0x2003;
const PR_SET_MM: u64 = 35;
const PR_SET_MM_MAP: u64 = 14;
const PR_SET_NAME: u64 = 15;
const RSEQ_FLAG_UNREGISTER: u64 = 1;
const SS_DISABLE: u32 = 2;
const SS_ONSTACK: u32 = 1;
const ERESTARTSYS: i64 = 512;
const ERESTARTNOINTR: i64 = 513;
const ERESTARTNOHAND: i64 = 514;
const ERESTART_RESTARTBLOCK: i64 = 516;

/// Offsets in the control page.
const CTL_BATCH_CODE: u64 = 0x20;
pub(super) const CTL_SCRATCH: u64 = 0x100;
const CTL_MM_MAP: u64 = 0x400;
const CTL_AUXV: u64 = 0x500;
/// A batch's table ([`inject_batch`]): to the end of the page. What is
/// written at `CTL_MM_MAP` and `CTL_AUXV` is used at once, never across a
/// batch.
const CTL_BATCH: u64 = 0x600;
/// Calls per batch: the table's room, less its end mark.
const BATCH_MAX: usize = (PAGE - CTL_BATCH) as usize / BATCH_ENTRY - 1;

/// Runs `calls` in the stub `tid` in batches (its control page at `ctl`
/// holds [`BATCH_CODE`]); each call's result or the errno it names, in
/// order.
fn run_batch(
    tid: Pid,
    ctl: u64,
    base: &libc::user_regs_struct,
    calls: &[Call],
) -> Result<Vec<Result<u64, SysError>>, SysError> {
    let mut out = Vec::with_capacity(calls.len());
    for chunk in calls.chunks(BATCH_MAX) {
        let got = inject_batch(tid, (ctl + CTL_BATCH_CODE, ctl + CTL_BATCH), base, chunk)?;
        for (c, ret) in chunk.iter().zip(got) {
            out.push(Outcome { ret, cloned: None }.check(c, tid));
        }
    }
    Ok(out)
}

/// The registers a thread resumes with. A thread frozen inside a syscall
/// that the kernel meant to restart (`rax` = -ERESTART*) gets the syscall
/// re-issued: `rax` = its number, `rip` back over the 2-byte `syscall`.
/// For -ERESTART_RESTARTBLOCK the original call is re-issued too, not
/// `restart_syscall`: its restart block lives in the origin kernel's task.
pub(crate) fn resume_regs(mut r: libc::user_regs_struct) -> libc::user_regs_struct {
    if (r.orig_rax as i64) >= 0
        && matches!(
            -(r.rax as i64),
            ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND | ERESTART_RESTARTBLOCK
        )
    {
        r.rax = r.orig_rax;
        r.rip = r.rip.wrapping_sub(2);
    }
    r.orig_rax = u64::MAX;
    r
}

fn local(what: &'static str) -> impl FnOnce(io::Error) -> RestoreError {
    move |source| RestoreError::Local { what, source }
}

/// How this kernel's vDSO relates to the image's.
pub(super) enum VdsoPlan {
    /// The same kernel build: its vDSO goes back where it was.
    Same,
    /// Another build: this kernel's special mappings (`local`, as in this
    /// process) go where there is room, and the old vDSO's bytes back at
    /// its address with its entries sent to `symbols` (see `vdso`).
    Proxy {
        local: Vec<Mapping>,
        symbols: Vec<vdso::Symbol>,
    },
}

/// Whether the image was taken on this kernel build (same release, build,
/// vDSO bytes and special-mapping layout): then its vDSO is mapped back as
/// it was; otherwise it goes through the proxy, which needs the old vDSO's
/// bytes in the image.
pub(super) fn check_kernel(meta: &ImageMeta) -> Result<VdsoPlan, RestoreError> {
    let maps = parse_maps(&std::fs::read_to_string("/proc/self/maps").map_err(local("maps"))?)
        .map_err(local("maps"))?;
    let mine: Vec<Mapping> = maps.iter().filter_map(to_mapping).collect();
    let vdso = mine.iter().find(|m| m.kind == MappingKind::Vdso);
    let bytes = match vdso {
        Some(v) => {
            let mut b = vec![0u8; v.len() as usize];
            File::open("/proc/self/mem")
                .and_then(|f| f.read_exact_at(&mut b, v.start))
                .map_err(local("[vdso]"))?;
            b
        }
        None => Vec::new(),
    };
    let here = fingerprint(&bytes);
    let there = &meta.header.kernel;
    let special = |v: &[Mapping]| -> Vec<(MappingKind, u64, u64)> {
        let s: Vec<&Mapping> = v.iter().filter(|m| m.kind.is_special()).collect();
        let base = s.first().map(|m| m.start).unwrap_or(0);
        s.iter()
            .map(|m| (m.kind, m.start - base, m.len()))
            .collect()
    };
    if here == *there && special(&meta.mappings) == special(&mine) {
        return Ok(VdsoPlan::Same);
    }
    if meta.process.vdso.is_empty() {
        return Err(RestoreError::Kernel {
            image: format!(
                "{} {} ({} bytes, xxh3 {:#018x})",
                there.release, there.version, there.vdso_len, there.vdso_hash
            ),
            local: format!(
                "{} {} ({} bytes, xxh3 {:#018x})",
                here.release, here.version, here.vdso_len, here.vdso_hash
            ),
        });
    }
    if vdso.is_none() {
        return Err(RestoreError::Layout("this process has no [vdso]".into()));
    }
    let symbols = vdso::symbols(&bytes, "this kernel's")?;
    Ok(VdsoPlan::Proxy {
        local: mine.into_iter().filter(|m| m.kind.is_special()).collect(),
        symbols,
    })
}

/// Transparent-huge-page advice for a restored mapping: the origin's own,
/// else `MADV_HUGEPAGE` for a dense one (at least 2 MiB and three quarters
/// resident), since filling it with 4 KiB faults is most of the restore
/// time; sparse ones (stacks, reserves) stay small-paged.
pub(crate) fn thp_advice(m: &Mapping) -> Option<libc::c_int> {
    if m.flags & MAPF_NOHUGEPAGE != 0 {
        Some(libc::MADV_NOHUGEPAGE)
    } else if m.flags & MAPF_HUGEPAGE != 0
        || (m.prot & PROT_W != 0 && m.resident >= 512 && m.resident * 4 >= (m.len() / PAGE) * 3)
    {
        Some(libc::MADV_HUGEPAGE)
    } else {
        None
    }
}

/// The lowest page at or above `mmap_min_addr` that neither the image nor
/// this process uses.
fn control_page(image: &[Mapping], mine: &[(u64, u64)]) -> Result<u64, RestoreError> {
    let min = std::fs::read_to_string("/proc/sys/vm/mmap_min_addr")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(65536)
        // Keep clear of the low pages even where the sysctl allows them.
        .max(0x10000);
    let mut used: Vec<(u64, u64)> = image.iter().map(|m| (m.start, m.end)).collect();
    used.extend_from_slice(mine);
    used.sort_unstable();
    let mut cand = min.div_ceil(PAGE) * PAGE;
    for (s, e) in used {
        if cand + PAGE <= s {
            break;
        }
        cand = cand.max(e.div_ceil(PAGE) * PAGE);
    }
    if cand + PAGE > USER_TOP {
        return Err(RestoreError::NoControlPage);
    }
    Ok(cand)
}

/// The image's memfds made again here: the same name and size, the content
/// carried outside their mappings (what they map comes with the pages);
/// sealable when the origin's was (seals come at the end, see
/// [`seal_memfds`]). Each mapping start must be a shared mapping of the
/// image.
fn make_memfds(
    memfds: &[MemfdState],
    mappings: &[Mapping],
) -> Result<Vec<(u32, OwnedFd)>, RestoreError> {
    use nix::sys::memfd::{memfd_create, MFdFlags};
    let mut out = Vec::with_capacity(memfds.len());
    for m in memfds {
        let fail =
            |why: String| RestoreError::Layout(format!("memfd {} ({}): {why}", m.id, m.name));
        for start in &m.maps {
            let ok = mappings.iter().any(|x| {
                x.start == *start && x.flags & MAPF_SHARED != 0 && x.flags & MAPF_DSM == 0
            });
            if !ok {
                return Err(fail(format!(
                    "{start:#x} is not a shared mapping of the image"
                )));
            }
        }
        let mut flags = MFdFlags::MFD_CLOEXEC;
        // F_SEAL_SEAL alone: made without MFD_ALLOW_SEALING (or sealed
        // against more seals, which behaves the same).
        if m.seals != libc::F_SEAL_SEAL as u32 {
            flags |= MFdFlags::MFD_ALLOW_SEALING;
        }
        let name = std::ffi::CString::new(m.name.as_str())
            .map_err(|_| fail("a NUL in its name".into()))?;
        let fd =
            memfd_create(name.as_c_str(), flags).map_err(|e| fail(format!("memfd_create: {e}")))?;
        let file = File::from(fd);
        file.set_len(m.size)
            .map_err(|e| fail(format!("sizing it to {} bytes: {e}", m.size)))?;
        for (off, bytes) in &m.data {
            file.write_all_at(bytes, *off)
                .map_err(|e| fail(format!("writing {} bytes at {off}: {e}", bytes.len())))?;
        }
        out.push((m.id, OwnedFd::from(file)));
    }
    Ok(out)
}

/// Adds each memfd's seals (`F_SEAL_SEAL` last: it forbids further ones).
fn seal_memfds(memfds: &[MemfdState], made: &[(u32, OwnedFd)]) -> Result<(), RestoreError> {
    for m in memfds {
        let Some((_, fd)) = made.iter().find(|x| x.0 == m.id) else {
            continue;
        };
        let seal = libc::F_SEAL_SEAL as u32;
        for add in [m.seals & !seal, m.seals & seal] {
            if add == 0 || m.seals == seal {
                continue;
            }
            // SAFETY: fcntl(F_ADD_SEALS) on a descriptor we own.
            if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, add as libc::c_int) } != 0 {
                return Err(RestoreError::Layout(format!(
                    "memfd {} ({}): adding seals {add:#x}: {} (a kernel without F_SEAL_EXEC refuses 0x20)",
                    m.id,
                    m.name,
                    io::Error::last_os_error()
                )));
            }
        }
    }
    Ok(())
}

fn own_ranges() -> Result<Vec<(u64, u64)>, RestoreError> {
    let maps = parse_maps(&std::fs::read_to_string("/proc/self/maps").map_err(local("maps"))?)
        .map_err(local("maps"))?;
    Ok(maps.iter().map(|m| (m.start, m.end)).collect())
}

/// Opens the image's files as they were: same flags and offset, and for a
/// regular file only if it is the same file (size and modification time as
/// when frozen, as CRIU checks); recreates eventfds, timerfds, signalfds
/// and pipes (with their bytes). A descriptor that shared an open file
/// description shares it again. Returns the descriptors (moved to numbers
/// at or above the returned bound, which every target is below) and the
/// stub's `(source, target, close-on-exec)` list.
type OpenedFiles = (Vec<OwnedFd>, Vec<(i32, i32, bool)>, i32);

/// [`open_files`], then `extra` (descriptors of ours) at the numbers just
/// above the files', close-on-exec; returns those numbers too.
fn open_files_and(
    files: &[OpenFile],
    pipes: &[PipeState],
    socketpairs: &[SocketPairState],
    memfds: &[(u32, OwnedFd)],
    base: (i128, i128),
    extra: &[OwnedFd],
    tree: Option<&mut TreeFiles>,
) -> Result<(OpenedFiles, Vec<i32>), RestoreError> {
    use std::os::fd::FromRawFd;
    let first = files
        .iter()
        .map(|f| f.fd as i32 + 1)
        .max()
        .unwrap_or(3)
        .max(3);
    let keep_below = first + extra.len() as i32;
    let (mut owned, mut plan, _) =
        open_files(files, pipes, socketpairs, memfds, base, keep_below, tree)?;
    let mut targets = Vec::with_capacity(extra.len());
    for (i, e) in extra.iter().enumerate() {
        // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own returns a new one.
        let high = unsafe { libc::fcntl(e.as_raw_fd(), libc::F_DUPFD_CLOEXEC, keep_below) };
        if high < 0 {
            return Err(local("duplicating a DSM descriptor")(
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: `high` was just returned by fcntl and is ours alone.
        owned.push(unsafe { OwnedFd::from_raw_fd(high) });
        plan.push((high, first + i as i32, true));
        targets.push(first + i as i32);
    }
    Ok(((owned, plan, keep_below), targets))
}

fn open_files(
    files: &[OpenFile],
    pipes: &[PipeState],
    socketpairs: &[SocketPairState],
    memfds: &[(u32, OwnedFd)],
    base: (i128, i128),
    at_least: i32,
    mut tree: Option<&mut TreeFiles>,
) -> Result<OpenedFiles, RestoreError> {
    use std::os::fd::FromRawFd;
    let keep_below = files
        .iter()
        .map(|f| f.fd as i32 + 1)
        .max()
        .unwrap_or(3)
        .max(3)
        .max(at_least);
    let mut owned = Vec::with_capacity(files.len());
    let mut plan: Vec<(i32, i32, bool)> = Vec::with_capacity(files.len());
    // Each pipe's two ends, until a descriptor takes one (then `None`:
    // another description of that end is a new open of it). A tree's are
    // the tree's, by its ids: one pipe between its processes.
    let mut made: Vec<MadePipe> = tree
        .as_deref_mut()
        .map(|t| std::mem::take(&mut t.pipes))
        .unwrap_or_default();
    let mut to_arm = Vec::new();
    let mut pairs: Vec<(u32, [OwnedFd; 2])> = Vec::new();
    for f in files {
        let fail = |why: String| RestoreError::File {
            fd: f.fd,
            path: f.path.clone(),
            why,
        };
        let cloexec = f.flags & libc::O_CLOEXEC as u32 != 0;
        if let Some(s) = f.share {
            // The decoder checked `s` is an earlier descriptor.
            let i = files.iter().position(|g| g.fd == s).unwrap_or(usize::MAX);
            let src = plan
                .get(i)
                .map(|p| p.0)
                .ok_or_else(|| fail(format!("fd {s} is not open")))?;
            plan.push((src, f.fd as i32, cloexec));
            continue;
        }
        let inherited = tree
            .as_deref()
            .and_then(|t| t.shared.iter().find(|s| s.0 == f.fd))
            .map(|s| s.1.try_clone().map_err(|e| fail(e.to_string())))
            .transpose()?;
        let file: OwnedFd = match (f.kind, f.state) {
            _ if inherited.is_some() => inherited.expect("just checked"),
            (FileKind::Eventfd, _) => eventfd(f).map_err(|e| fail(e.to_string()))?,
            (FileKind::Timerfd, FileState::Timer(t)) => {
                let fd = timerfd(f, &t).map_err(|e| fail(e.to_string()))?;
                to_arm.push((owned.len(), t, f.fd));
                fd
            }
            (FileKind::Signalfd, FileState::Signals(mask)) => {
                signalfd(f, mask).map_err(|e| fail(e.to_string()))?
            }
            (FileKind::Pipe, FileState::Pipe(local)) => {
                let id = match tree.as_deref() {
                    Some(t) => t
                        .pipe_ids
                        .iter()
                        .find(|p| p.0 == local)
                        .map(|p| p.1)
                        .ok_or_else(|| fail(format!("pipe {local} is not in the tree")))?,
                    None => local,
                };
                if !made.iter().any(|m| m.0 == id) {
                    let p = pipes
                        .iter()
                        .find(|p| p.id == local)
                        .ok_or_else(|| fail(format!("pipe {local} is not in the image")))?;
                    let (r, w) = make_pipe(p).map_err(|e| fail(e.to_string()))?;
                    let reopen = r.try_clone().map_err(|e| fail(e.to_string()))?;
                    made.push((id, Some(r), Some(w), reopen));
                }
                let m = made.iter_mut().find(|m| m.0 == id).expect("just made");
                pipe_end(f, m).map_err(|e| fail(e.to_string()))?
            }
            (FileKind::Socket, FileState::Socket { id, end }) if tree.is_some() => {
                let t = tree.as_deref_mut().expect("a tree's");
                let ((g, ge), p) = t
                    .sock_ids
                    .iter()
                    .find(|s| s.0 == (id, end))
                    .map(|s| s.1)
                    .zip(socketpairs.iter().find(|p| p.id == id))
                    .ok_or_else(|| fail(format!("socket pair {id} is not in the tree")))?;
                if !t.socks.iter().any(|m| m.0 == g) {
                    let ends = new_socketpair(p.kind).map_err(|e| fail(e.to_string()))?;
                    t.socks.push((g, ends, [false; 2], [0; 2]));
                }
                let m = t.socks.iter_mut().find(|m| m.0 == g).expect("just made");
                let (ge, le) = (usize::from(ge), usize::from(end));
                if !m.2[ge] {
                    // This end's queue and shutdown, as this process saw
                    // them: the other end's come with its holder.
                    fill_end(&m.1, ge, &p.queued[le], p.kind).map_err(|e| fail(e.to_string()))?;
                    m.2[ge] = true;
                    m.3[ge] = p.shutdown[le];
                }
                let sock = m.1[ge].try_clone().map_err(|e| fail(e.to_string()))?;
                let fl = (f.flags & libc::O_NONBLOCK as u32) as libc::c_int;
                // SAFETY: fcntl on our descriptor.
                if unsafe { libc::fcntl(sock.as_raw_fd(), libc::F_SETFL, fl) } != 0 {
                    return Err(fail(io::Error::last_os_error().to_string()));
                }
                sock
            }
            (FileKind::Socket, FileState::Socket { id, end }) => {
                if !pairs.iter().any(|m| m.0 == id) {
                    let p = socketpairs
                        .iter()
                        .find(|p| p.id == id)
                        .ok_or_else(|| fail(format!("socket pair {id} is not in the image")))?;
                    let ends = make_socketpair(p).map_err(|e| fail(e.to_string()))?;
                    pairs.push((id, ends));
                }
                let m = pairs.iter().find(|m| m.0 == id).expect("just made");
                // A socket has one open file: a second descriptor on an end
                // can only be a dup of it.
                let sock = m.1[usize::from(end)]
                    .try_clone()
                    .map_err(|e| fail(e.to_string()))?;
                let fl = (f.flags & libc::O_NONBLOCK as u32) as libc::c_int;
                // SAFETY: fcntl on our descriptor.
                if unsafe { libc::fcntl(sock.as_raw_fd(), libc::F_SETFL, fl) } != 0 {
                    return Err(fail(io::Error::last_os_error().to_string()));
                }
                sock
            }
            (FileKind::Regular | FileKind::Device, _) => open_by_path(f, &fail)?,
            // A description of its own on the memfd made again (opened
            // through /proc, as a reopen on the origin would be), with its
            // flags and offset.
            (FileKind::Memfd, FileState::Memfd(id)) => {
                let m = memfds
                    .iter()
                    .find(|m| m.0 == id)
                    .ok_or_else(|| fail(format!("memfd {id} is not in the image")))?;
                let reopen = OpenFile {
                    path: format!("/proc/self/fd/{}", m.1.as_raw_fd()),
                    ..f.clone()
                };
                open_by_path(&reopen, &fail)?
            }
            // Empty: its watches are added in the process, by the numbers
            // the program knows them by (`epoll_watches`).
            (FileKind::Epoll, _) => epoll().map_err(|e| fail(e.to_string()))?,
            _ => return Err(fail("its state does not fit its kind".into())),
        };
        // Above every target, so the stub's dup2s clobber no source.
        // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own returns a new one.
        let high = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_DUPFD_CLOEXEC, keep_below) };
        if high < 0 {
            return Err(fail(io::Error::last_os_error().to_string()));
        }
        // SAFETY: `high` was just returned by fcntl and is ours alone.
        owned.push(unsafe { OwnedFd::from_raw_fd(high) });
        if let Some(t) = tree.as_deref_mut() {
            t.opened.push((f.fd, file));
        } else {
            drop(file);
        }
        plan.push((high, f.fd as i32, cloexec));
    }
    // The pipe ends no descriptor took are closed here, as they were on
    // the origin (a reader then sees the end of the data); a tree's once
    // every process has its own.
    match tree {
        Some(t) => t.pipes = made,
        None => drop(made),
    }
    drop(pairs);
    for (i, t, fd) in to_arm {
        arm_timerfd(&owned[i], &t, base).map_err(|e| RestoreError::File {
            fd,
            path: super::image::TIMERFD.into(),
            why: e.to_string(),
        })?;
    }
    Ok((owned, plan, keep_below))
}

/// The image's POSIX timers, made again in the process with their ids and
/// armed with the time they had left. The kernel gives a new process's
/// timers ids 0, 1, 2... in turn, so every id up to the highest is made:
/// those not in the image as stand-ins, deleted at the end. `scratch`: 128
/// dead bytes of the process; `tids`: its threads, in the image's order.
fn posix_timers(
    leader: Pid,
    scratch: u64,
    timers: &[super::image::PosixTimer],
    tids: &[Pid],
    call: &dyn Fn(Call) -> Result<u64, SysError>,
) -> Result<(), RestoreError> {
    use super::image::{SIGEV_NONE, SIGEV_THREAD_ID};
    let mut standins = Vec::new();
    let mut next = 0u32;
    for t in timers {
        let fail = |why: String| RestoreError::Timer { id: t.id, why };
        loop {
            let real = next == t.id;
            // struct sigevent: value, signo, notify, then a thread's tid.
            let mut ev = [0u8; 64];
            let clock = if real {
                ev[..8].copy_from_slice(&t.sigval.to_le_bytes());
                ev[8..12].copy_from_slice(&i32::from(t.signo).to_le_bytes());
                ev[12..16].copy_from_slice(&i32::from(t.notify).to_le_bytes());
                if t.notify == SIGEV_THREAD_ID {
                    let tid = tids
                        .get(t.thread as usize)
                        .ok_or_else(|| fail(format!("no thread {} in the image", t.thread)))?;
                    ev[16..20].copy_from_slice(&tid.as_raw().to_le_bytes());
                }
                t.clockid
            } else {
                ev[12..16].copy_from_slice(&i32::from(SIGEV_NONE).to_le_bytes());
                libc::CLOCK_MONOTONIC as u32
            };
            poke(leader, scratch, &ev)?;
            call(Call::new(
                "timer_create",
                libc::SYS_timer_create,
                &[u64::from(clock), scratch, scratch + 64],
            ))?;
            let mut id = [0u8; 4];
            super::memory::read_remote(leader, scratch + 64, &mut id)
                .map_err(|e| fail(format!("reading its id: {e}")))?;
            let got = u32::from_le_bytes(id);
            if got != next {
                return Err(fail(format!(
                    "the kernel gave id {got} where {next} was due (a new process's timers are numbered from 0)"
                )));
            }
            next += 1;
            if real {
                break;
            }
            standins.push(got);
        }
        if t.value_ns > 0 {
            poke(
                leader,
                scratch,
                &words32([
                    t.interval_ns / 1_000_000_000,
                    t.interval_ns % 1_000_000_000,
                    t.value_ns / 1_000_000_000,
                    t.value_ns % 1_000_000_000,
                ]),
            )?;
            call(Call::new(
                "timer_settime",
                libc::SYS_timer_settime,
                &[u64::from(t.id), 0, scratch, 0],
            ))?;
        }
    }
    for id in standins {
        call(Call::new(
            "timer_delete",
            libc::SYS_timer_delete,
            &[u64::from(id)],
        ))?;
    }
    Ok(())
}

/// Four u64 words as the kernel reads them (a `struct itimerval`,
/// `itimerspec` or `sigaction`).
fn words32(w: [u64; 4]) -> [u8; 32] {
    let mut b = [0u8; 32];
    for (i, w) in w.iter().enumerate() {
        b[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    b
}

/// A new, empty epoll instance.
fn epoll() -> io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: epoll_create1 returns a new descriptor or -1.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just created, ours alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The watches of the image's epolls, added in the process (injected
/// `epoll_ctl(EPOLL_CTL_ADD)`, `scratch`: 12 dead bytes of it) once every
/// descriptor is in place: epoll keys a watch by file and descriptor
/// number, and the program will name it by its own number.
fn epoll_watches(
    leader: Pid,
    meta: &ImageMeta,
    scratch: u64,
    call: &dyn Fn(Call) -> Result<u64, SysError>,
) -> Result<(), RestoreError> {
    for e in &meta.process.epolls {
        for w in &e.watches {
            // struct epoll_event is packed on x86_64: events, then data.
            let mut b = [0u8; 12];
            b[..4].copy_from_slice(&w.events.to_le_bytes());
            b[4..].copy_from_slice(&w.data.to_le_bytes());
            poke(leader, scratch, &b)?;
            call(Call::new(
                "epoll_ctl(EPOLL_CTL_ADD)",
                libc::SYS_epoll_ctl,
                &[
                    u64::from(e.fd),
                    libc::EPOLL_CTL_ADD as u64,
                    u64::from(w.fd),
                    scratch,
                ],
            ))?;
        }
    }
    Ok(())
}

/// A new pipe of `p.capacity` holding `p.bytes`: (read end, write end),
/// both non-blocking until their descriptors' flags are set.
fn make_pipe(p: &PipeState) -> io::Result<(OwnedFd, OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut ends = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `ends`, which we then own.
    if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just created, ours alone.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };
    // SAFETY: fcntl on our descriptor.
    let cap = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_GETPIPE_SZ) };
    if cap != p.capacity as i32
        // SAFETY: as above.
        && unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, p.capacity as libc::c_int) } < 0
    {
        return Err(io::Error::other(format!(
            "setting its capacity to {} bytes: {}",
            p.capacity,
            io::Error::last_os_error()
        )));
    }
    let mut at = 0;
    while at < p.bytes.len() {
        let rest = &p.bytes[at..];
        // SAFETY: writes from a live slice to our descriptor.
        let n = unsafe { libc::write(w.as_raw_fd(), rest.as_ptr().cast(), rest.len()) };
        if n <= 0 {
            return Err(io::Error::other(format!(
                "putting back its {} bytes in flight: {} written, then {}",
                p.bytes.len(),
                at,
                io::Error::last_os_error()
            )));
        }
        at += n as usize;
    }
    Ok((r, w))
}

/// The descriptor for pipe end `f`: the pipe's read or write end the first
/// time one is asked for, else a new open of the pipe (another open file
/// description, as the origin had), with `f`'s status flags.
fn pipe_end(
    f: &OpenFile,
    (_, r, w, reopen): &mut (u32, Option<OwnedFd>, Option<OwnedFd>, OwnedFd),
) -> io::Result<OwnedFd> {
    let acc = f.flags & libc::O_ACCMODE as u32;
    let taken = if acc == libc::O_RDONLY as u32 {
        r.take()
    } else if acc == libc::O_WRONLY as u32 {
        w.take()
    } else {
        None
    };
    let fd = match taken {
        Some(fd) => fd,
        None => {
            // Opening a pipe's /proc link opens the pipe itself (as a
            // FIFO); a reader exists, so a writer's open does not wait.
            use std::os::unix::fs::OpenOptionsExt;
            let path = format!("/proc/self/fd/{}", reopen.as_raw_fd());
            std::fs::File::options()
                .read(acc != libc::O_WRONLY as u32)
                .write(acc != libc::O_RDONLY as u32)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(path)?
                .into()
        }
    };
    let fl = (f.flags & libc::O_NONBLOCK as u32) as libc::c_int;
    // SAFETY: fcntl on our descriptor.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// A new AF_UNIX socket pair of `p.kind` with `p.queued` at each end (sent
/// from the other end: bytes, or each datagram) and the shutdown bits of
/// each end replayed.
fn make_socketpair(p: &SocketPairState) -> io::Result<[OwnedFd; 2]> {
    let ends = new_socketpair(p.kind)?;
    for (end, q) in p.queued.iter().enumerate() {
        fill_end(&ends, end, q, p.kind)?;
    }
    shut_ends(&ends, p.shutdown)?;
    Ok(ends)
}

/// A new AF_UNIX socket pair of type `kind`, nothing queued.
fn new_socketpair(kind: u8) -> io::Result<[OwnedFd; 2]> {
    use std::os::fd::FromRawFd;
    let mut sv = [0; 2];
    // SAFETY: socketpair writes two descriptors into `sv`, which we then own.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            i32::from(kind) | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
            sv.as_mut_ptr(),
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just created, ours alone.
    Ok(unsafe { [OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])] })
}

/// Queues `q` at end `end` of `ends` (sent from the other end: the
/// stream's bytes, or each datagram whole).
fn fill_end(ends: &[OwnedFd; 2], end: usize, q: &[Vec<u8>], kind: u8) -> io::Result<()> {
    let from = ends[1 - end].as_raw_fd();
    for m in q {
        let mut at = 0;
        loop {
            let rest = &m[at..];
            // SAFETY: sends from a live slice on our socket.
            let n = unsafe {
                libc::send(
                    from,
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                return Err(io::Error::other(format!(
                    "putting back what was queued at end {end}: {}",
                    io::Error::last_os_error()
                )));
            }
            at += n as usize;
            // A datagram goes whole, in one send (even an empty one).
            if at >= m.len() || kind != libc::SOCK_STREAM as u8 {
                break;
            }
        }
    }
    Ok(())
}

/// Replays each end's shutdown bits (after every queue is filled: a shut
/// end could not take or send it).
fn shut_ends(ends: &[OwnedFd; 2], shutdown: [u8; 2]) -> io::Result<()> {
    for (end, sh) in shutdown.iter().enumerate() {
        for (bit, how) in [(2u8, libc::SHUT_WR), (1, libc::SHUT_RD)] {
            // SAFETY: shutdown on our socket.
            if sh & bit != 0 && unsafe { libc::shutdown(ends[end].as_raw_fd(), how) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// A timerfd on the clock it had, `O_NONBLOCK` if it was; [`arm_timerfd`]
/// sets the rest: the time left (or, absolute on a real-time clock, its
/// moment) and period, and its unread expirations (`TFD_IOC_SET_TICKS`). A
/// relative time left is counted from the arming, done last, just before
/// the restored process's clocks are set to go on from the freeze
/// (`clock_offsets`), so it fires at the same moment of its clocks.
fn timerfd(f: &OpenFile, t: &TimerState) -> io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    let mut flags = libc::TFD_CLOEXEC;
    if f.flags & libc::O_NONBLOCK as u32 != 0 {
        flags |= libc::TFD_NONBLOCK;
    }
    // SAFETY: timerfd_create returns a new descriptor or -1.
    let fd = unsafe { libc::timerfd_create(t.clockid as libc::clockid_t, flags) };
    if fd < 0 {
        return Err(io::Error::other(format!(
            "timerfd_create on clock {}: {}",
            t.clockid,
            io::Error::last_os_error()
        )));
    }
    // SAFETY: just created, ours alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Arms a timerfd made by [`timerfd`] as it was, and puts back its unread
/// expirations. The time left counts from `base`, this kernel's
/// `CLOCK_MONOTONIC` and `CLOCK_BOOTTIME` when the process's clocks are
/// those of the capture (`clock_offsets`): armed at an absolute time on this
/// kernel's clock, it fires at the same moment of the process's clocks
/// however long restore takes. Expiries due by now, or within the next
/// millisecond (they could fire between the arming and putting back the
/// ticks, which would drop them), are counted into the ticks and the timer
/// armed at its next period; a one-shot one stays disarmed.
fn arm_timerfd(fd: &OwnedFd, t: &TimerState, base: (i128, i128)) -> io::Result<()> {
    const SOON: i128 = 1_000_000;
    let fd = fd.as_raw_fd();
    let mut ticks = t.ticks;
    let realtime_abs = matches!(t.clockid, 0 | 8) && t.settime_flags & TFD_ABSTIME != 0;
    // The clock the expiry is set on, now and at `base`.
    let (clock, at_base) = match t.clockid {
        _ if realtime_abs => (libc::CLOCK_REALTIME, 0),
        7 | 9 => (libc::CLOCK_BOOTTIME, base.1),
        // Monotonic, and relative real-time timers (counted like the
        // process's monotonic clock: time away does not count).
        _ => (libc::CLOCK_MONOTONIC, base.0),
    };
    let now = i128::from(super::precheck::clock_ns(clock));
    let mut expiry = at_base + i128::from(t.value_ns);
    let mut armed = t.armed;
    if armed && expiry < now + SOON {
        if t.interval_ns == 0 {
            ticks = ticks.saturating_add(1);
            armed = false;
        } else {
            let i = i128::from(t.interval_ns);
            let n = ((now + SOON - expiry) + i - 1) / i;
            ticks = ticks.saturating_add(n.max(1) as u64);
            expiry += n.max(1) * i;
        }
    }
    if armed {
        let ts = |ns: i128| libc::timespec {
            tv_sec: (ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (ns % 1_000_000_000) as libc::c_long,
        };
        let spec = libc::itimerspec {
            it_interval: ts(i128::from(t.interval_ns)),
            it_value: ts(expiry - now),
        };
        // Absolute on the timer's own clock where that is the one the
        // expiry is on; a relative real-time timer relative to `now`.
        let abs_ok = realtime_abs || matches!(t.clockid, 1 | 7 | 9);
        let (spec, sflags) = if abs_ok {
            (
                libc::itimerspec {
                    it_value: ts(expiry),
                    ..spec
                },
                libc::TFD_TIMER_ABSTIME | (t.settime_flags & TFD_CANCEL_ON_SET) as libc::c_int,
            )
        } else {
            (spec, 0)
        };
        // SAFETY: timerfd_settime reads `spec`, a live local; no old value.
        if unsafe { libc::timerfd_settime(fd, sflags, &spec, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::other(format!(
                "timerfd_settime: {}",
                io::Error::last_os_error()
            )));
        }
    }
    // After timerfd_settime, which zeroes them.
    if ticks != 0 {
        // _IOW('T', 0, u64), CONFIG_CHECKPOINT_RESTORE.
        const TFD_IOC_SET_TICKS: libc::c_ulong = 0x4008_5400;
        // SAFETY: the ioctl reads one u64 from a live local.
        if unsafe { libc::ioctl(fd, TFD_IOC_SET_TICKS, &ticks) } != 0 {
            return Err(io::Error::other(format!(
                "{ticks} unread expirations need TFD_IOC_SET_TICKS (CONFIG_CHECKPOINT_RESTORE): {}",
                io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

/// A signalfd on `mask`, non-blocking if it was.
fn signalfd(f: &OpenFile, mask: u64) -> io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    let mut flags = libc::SFD_CLOEXEC;
    if f.flags & libc::O_NONBLOCK as u32 != 0 {
        flags |= libc::SFD_NONBLOCK;
    }
    // The kernel's sigset on x86_64 is the first 8 bytes of glibc's
    // sigset_t, bit n-1 for signal n; set directly, since glibc's
    // sigaddset refuses its own signals 32 and 33.
    // SAFETY: sigset_t is plain data; zeroed is an empty set.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live local of at least 8 bytes; one unaligned u64
    // write at its start.
    unsafe { std::ptr::write_unaligned((&raw mut set).cast::<u64>(), mask) };
    // SAFETY: signalfd reads `set`, a live local, and returns a new fd.
    let fd = unsafe { libc::signalfd(-1, &set, flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just created, ours alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An eventfd as it was: its counter and semaphore mode (`OpenFile::size`,
/// `mtime_ns`), non-blocking if it was.
fn eventfd(f: &OpenFile) -> io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    let mut flags = libc::EFD_CLOEXEC;
    if f.flags & libc::O_NONBLOCK as u32 != 0 {
        flags |= libc::EFD_NONBLOCK;
    }
    if f.mtime_ns == 1 {
        flags |= libc::EFD_SEMAPHORE;
    }
    // SAFETY: eventfd returns a new descriptor or -1.
    let fd = unsafe { libc::eventfd(0, flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just created, ours alone.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    if f.size != 0 {
        // The initial value is 32 bits; a write adds the whole 64-bit count.
        let b = f.size.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live local to our descriptor.
        if unsafe { libc::write(fd, b.as_ptr().cast(), 8) } != 8 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(owned)
}

/// A regular file or device reopened by path, with its flags, offset, and
/// (a regular file) the check that it is the same file.
fn open_by_path(
    f: &OpenFile,
    fail: &dyn Fn(String) -> RestoreError,
) -> Result<OwnedFd, RestoreError> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let acc = f.flags & libc::O_ACCMODE as u32;
    let rest = f.flags & !(libc::O_ACCMODE as u32 | libc::O_CLOEXEC as u32);
    let file = File::options()
        .read(acc != libc::O_WRONLY as u32)
        .write(acc != libc::O_RDONLY as u32)
        .custom_flags(rest as i32 | libc::O_NOCTTY)
        .open(&f.path)
        .map_err(|e| fail(e.to_string()))?;
    let m = file.metadata().map_err(|e| fail(e.to_string()))?;
    match f.kind {
        FileKind::Eventfd
        | FileKind::Timerfd
        | FileKind::Signalfd
        | FileKind::Pipe
        | FileKind::Socket
        | FileKind::Epoll
        | FileKind::Memfd => {}
        FileKind::Regular => {
            if !m.is_file() {
                return Err(fail("it is not a regular file here".into()));
            }
            let mtime = (m.mtime() as u64)
                .saturating_mul(1_000_000_000)
                .saturating_add(m.mtime_nsec() as u64);
            if m.len() != f.size || mtime != f.mtime_ns {
                return Err(fail(format!(
                    "it is not the same file (size {} and mtime {} ns here, {} and {} when frozen)",
                    m.len(),
                    mtime,
                    f.size,
                    f.mtime_ns
                )));
            }
        }
        FileKind::Device => {
            use std::os::unix::fs::FileTypeExt;
            if !m.file_type().is_char_device() {
                return Err(fail("it is not a character device here".into()));
            }
        }
    }
    if f.pos != 0 {
        let pos = i64::try_from(f.pos).map_err(|_| fail(format!("offset {}", f.pos)))?;
        // SAFETY: lseek on a descriptor we own.
        if unsafe { libc::lseek(file.as_raw_fd(), pos, libc::SEEK_SET) } < 0 {
            return Err(fail(format!(
                "seeking to {pos}: {}",
                io::Error::last_os_error()
            )));
        }
    }
    Ok(file.into())
}

/// What the stub writes to its time namespace's `timens_offsets` so that
/// its `CLOCK_MONOTONIC` and `CLOCK_BOOTTIME` go on from `monotonic_ns` and
/// `boottime_ns` (the process's clocks at the freeze): on another kernel,
/// booted at another time, they would jump (by seconds, backwards too) and
/// break every timeout the process holds. The time it spent frozen does not
/// show. `None` when the image does not know its clocks.
/// Also returns this kernel's `CLOCK_MONOTONIC` and `CLOCK_BOOTTIME` at the
/// moment the process's clocks equal the image's (the offsets' base).
type Offsets = (Option<Vec<u8>>, (i128, i128));

fn clock_offsets(monotonic_ns: u64, boottime_ns: u64) -> Result<Offsets, RestoreError> {
    if monotonic_ns == 0 && boottime_ns == 0 {
        let now = super::procfs::kernel_clocks()
            .map_err(|e| RestoreError::Clocks(format!("reading this kernel's clocks: {e}")))?;
        return Ok((None, now));
    }
    let clocks = |e: String| RestoreError::Clocks(e);
    let offsets = "/proc/self/timens_offsets";
    if !Path::new(offsets).exists() {
        return Err(clocks(format!(
            "no {offsets}: this kernel has no time namespaces (CONFIG_TIME_NS)"
        )));
    }
    let (kernel_m, kernel_b) = super::procfs::kernel_clocks()
        .map_err(|e| clocks(format!("reading this kernel's clocks: {e}")))?;
    let (m, b) = (
        i128::from(monotonic_ns) - kernel_m,
        i128::from(boottime_ns) - kernel_b,
    );
    let line = |name: &str, ns: i128| {
        let (sec, nsec) = (ns.div_euclid(1_000_000_000), ns.rem_euclid(1_000_000_000));
        format!("{name} {sec} {nsec}\n")
    };
    Ok((
        Some((line("monotonic", m) + &line("boottime", b)).into_bytes()),
        (kernel_m, kernel_b),
    ))
}

/// A stub forked before its image is read, so that the fork, its first stop
/// and its emptying (together ~1.5 ms on this machine, for the copies of
/// the restorer's page tables) overlap the image's arrival instead of the
/// downtime: stopped at its control page `ctl` (the batch code in it too),
/// every other mapping of it gone, with its stdio and nothing else.
pub(super) struct Blank {
    pub(super) stub: Stub,
    pub(super) ctl: u64,
    /// Its registers at the stop: the template of every injected call.
    pub(super) base: libc::user_regs_struct,
}

impl Blank {
    /// Whether the image needs the control page's place.
    pub(super) fn in_the_way(&self, image: &[Mapping]) -> bool {
        image
            .iter()
            .any(|m| m.start < self.ctl + PAGE && self.ctl < m.end)
    }
}

/// Open file descriptions that several processes of a tree share (as fork
/// left them), carried from one process's restore to the next.
#[derive(Debug, Default)]
pub(super) struct TreeFiles {
    /// The descriptors of the process being built that share an earlier
    /// process's description, by fd: that description, ours.
    pub(super) shared: Vec<(u32, OwnedFd)>,
    /// What the process being built opened, by fd (for later ones).
    pub(super) opened: Vec<(u32, OwnedFd)>,
    /// The pipes of the process being built: its id of each, the tree's.
    pub(super) pipe_ids: Vec<(u32, u32)>,
    /// The tree's pipes made so far, by the tree's ids (see
    /// [`open_files`]); their untaken ends close once every process is
    /// built.
    pub(super) pipes: Vec<MadePipe>,
    /// The socket pair ends of the process being built: its `(id, end)`
    /// of each, the tree's.
    pub(super) sock_ids: Vec<((u32, u8), (u32, u8))>,
    /// The tree's socket pairs made so far, by the tree's ids: the ends,
    /// which ends' queues are in, each end's shutdown bits (replayed once
    /// every process is built, by [`TreeFiles::shut_sockets`]).
    pub(super) socks: Vec<MadePair>,
}

/// A tree's socket pair made again: its id, its ends, which ends' queues
/// are in, each end's shutdown bits.
pub(super) type MadePair = (u32, [OwnedFd; 2], [bool; 2], [u8; 2]);

impl TreeFiles {
    /// Every socket pair's shutdown bits, now that every queue is in.
    pub(super) fn shut_sockets(&self) -> io::Result<()> {
        for (_, ends, _, shutdown) in &self.socks {
            shut_ends(ends, *shutdown)?;
        }
        Ok(())
    }
}

/// A pipe made again: its id, its read and write ends until a descriptor
/// takes one (then `None`: another description of that end is a new open
/// of it), and a descriptor to reopen it through.
pub(super) type MadePipe = (u32, Option<OwnedFd>, Option<OwnedFd>, OwnedFd);

/// Forks and empties a [`Blank`] whose control page is clear of `image`
/// (none yet: the lowest free page, which an image rarely holds) and of
/// this process.
fn blank(stdio: &StdioPlan, image: &[Mapping]) -> Result<Blank, RestoreError> {
    blank_in(stdio, image, false)
}

/// [`blank`]; `new_pid_ns`: the stub is pid 1 of a pid namespace of its own.
pub(super) fn blank_in(
    stdio: &StdioPlan,
    image: &[Mapping],
    new_pid_ns: bool,
) -> Result<Blank, RestoreError> {
    // In another pid namespace the stub cannot name this process: it gets
    // a pidfd of it (see `install_files`).
    let me = if new_pid_ns {
        let pid = Pid::from_raw(std::process::id() as i32);
        Some(uffd::pidfd_open(pid).map_err(|e| local("a pidfd of this process")(e.into()))?)
    } else {
        None
    };
    let mut last = 0;
    for _ in 0..4 {
        let ctl = control_page(image, &own_ranges()?)?;
        let plan = sys::StubPlan {
            stdio: [
                stdio.stdin.as_raw_fd(),
                stdio.stdout.as_raw_fd(),
                stdio.stderr.as_raw_fd(),
            ],
            ctl,
            // syscall; int3; int3
            code: [0x0f, 0x05, 0xcc, 0xcc],
            new_pid_ns,
            pidfd: me.as_ref().map_or(-1, |f| f.as_raw_fd()),
        };
        let pid = sys::spawn_stub(&plan).map_err(|e| SysError::Ptrace {
            op: "fork",
            tid: 0,
            source: e,
        })?;
        let mut stub = Stub {
            pid,
            tids: vec![pid],
            armed: true,
        };
        let status = loop {
            match waitpid(pid, Some(WaitPidFlag::__WALL)) {
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(ptrace_err("waitpid", pid)(e).into()),
                Ok(s) => break s,
            }
        };
        match status {
            WaitStatus::Stopped(_, Signal::SIGSTOP) => return empty(stub, ctl),
            WaitStatus::Exited(_, code) => {
                // Reaped: nothing left to kill.
                stub.armed = false;
                last = code;
                if code != sys::STUB_EXIT_MMAP {
                    return Err(RestoreError::Stub(code));
                }
                // Another thread of ours mapped the chosen page meanwhile:
                // pick again.
            }
            other => {
                return Err(SysError::Stop {
                    tid: pid.as_raw(),
                    status: format!("{other:?}"),
                    wanted: "the stub's first stop",
                }
                .into())
            }
        }
    }
    Err(RestoreError::Stub(last))
}

/// A stopped stub emptied: its inherited rseq area and every mapping but
/// the control page go.
fn empty(stub: Stub, ctl: u64) -> Result<Blank, RestoreError> {
    let leader = stub.pid;
    // (TRACEFORK: a tree's processes are forked by their parents' stubs.)
    ptrace::setoptions(
        leader,
        ptrace::Options::PTRACE_O_EXITKILL
            | ptrace::Options::PTRACE_O_TRACECLONE
            | ptrace::Options::PTRACE_O_TRACEFORK,
    )
    .map_err(ptrace_err("PTRACE_SETOPTIONS", leader))?;
    let base = ptrace::getregs(leader).map_err(ptrace_err("PTRACE_GETREGS", leader))?;
    let call =
        |c: Call| -> Result<u64, SysError> { inject(leader, ctl, &base, &c)?.check(&c, leader) };
    let rs = sys::get_rseq_config(leader).unwrap_or_default();
    if rs.rseq_abi_pointer != 0 {
        call(Call::new(
            "rseq(unregister)",
            libc::SYS_rseq,
            &[
                rs.rseq_abi_pointer,
                u64::from(rs.rseq_abi_size),
                RSEQ_FLAG_UNREGISTER,
                u64::from(rs.signature),
            ],
        ))?;
    }
    call(Call::new("munmap", libc::SYS_munmap, &[0, ctl]))?;
    call(Call::new(
        "munmap",
        libc::SYS_munmap,
        &[ctl + PAGE, USER_TOP - ctl - PAGE],
    ))?;
    poke(leader, ctl + CTL_BATCH_CODE, &BATCH_CODE)?;
    Ok(Blank { stub, ctl, base })
}

/// Gives a [`Blank`] what needs the image: its time namespace (clocks that
/// go on from the freeze, see [`clock_offsets`]) and its files, then
/// `extra` (descriptors of ours, close-on-exec) at the numbers just above
/// the files'; returns those numbers. The files are opened here and taken
/// by the stub from this process (`pidfd_getfd`), all in one batch.
fn fill(
    blank: &Blank,
    meta: &ImageMeta,
    memfds: &[(u32, OwnedFd)],
    extra: &[OwnedFd],
    tree: Option<&mut TreeFiles>,
) -> Result<Vec<i32>, RestoreError> {
    let (leader, ctl, base) = (blank.stub.pid, blank.ctl, &blank.base);
    // The clocks' base first: timers are armed against it.
    let (timens, base_clocks) = clock_offsets(meta.process.monotonic_ns, meta.process.boottime_ns)?;
    let inherited = tree.is_some();
    let ((_files, files, keep_below), targets) = open_files_and(
        &meta.process.files,
        &meta.process.pipes,
        &meta.process.socketpairs,
        memfds,
        base_clocks,
        extra,
        tree,
    )?;
    if let Some(text) = &timens {
        enter_timens(leader, ctl, base, text)?;
    }
    run_expecting(
        leader,
        ctl,
        base,
        &install_files(&files, keep_below, inherited),
    )
    .map_err(|(name, why)| RestoreError::Layout(format!("{name} in the stub: {why}")))?;
    // (`_files`, the sources, close here: the stub has its own now.)
    Ok(targets)
}

/// The calls that give the stub its files: `(source here, target there,
/// close-on-exec)`, every target below `keep_below`; each with the result
/// it must give. A blank stub holds 0-2 only, and a new descriptor takes
/// the lowest free number, so every number is known in advance: a pidfd of
/// this process at `keep_below`, then per file `pidfd_getfd` (which sets
/// close-on-exec) into the lowest free number, moved to its target.
/// `inherited`: the stub (a tree's, in another pid namespace) holds that
/// pidfd at [`sys::STUB_PIDFD`] already instead of opening one.
fn install_files(
    files: &[(i32, i32, bool)],
    keep_below: i32,
    inherited: bool,
) -> Vec<(Call, Option<u64>)> {
    let mut open: std::collections::BTreeSet<i32> = (0..3).collect();
    let lowest =
        |open: &std::collections::BTreeSet<i32>| (0..).find(|n| !open.contains(n)).unwrap_or(0);
    let mut out = Vec::new();
    let given = sys::STUB_PIDFD as u64;
    if files.is_empty() {
        if inherited {
            out.push((Call::new("close", libc::SYS_close, &[given]), Some(0)));
        }
        return out;
    }
    let me = std::process::id() as u64;
    let p = if inherited {
        sys::STUB_PIDFD
    } else {
        let p = lowest(&open);
        out.push((
            Call::new("pidfd_open", libc::SYS_pidfd_open, &[me, 0]),
            Some(p as u64),
        ));
        p
    };
    let pidfd = keep_below.max(3);
    if p != pidfd {
        out.push((
            Call::new(
                "dup3",
                libc::SYS_dup3,
                &[p as u64, pidfd as u64, libc::O_CLOEXEC as u64],
            ),
            Some(pidfd as u64),
        ));
        out.push((Call::new("close", libc::SYS_close, &[p as u64]), Some(0)));
    }
    open.insert(pidfd);
    for &(src, dst, cloexec) in files {
        let t = lowest(&open);
        out.push((
            Call::new(
                "pidfd_getfd",
                libc::SYS_pidfd_getfd,
                &[pidfd as u64, src as u64, 0],
            ),
            Some(t as u64),
        ));
        if t == dst {
            if !cloexec {
                out.push((
                    Call::new(
                        "fcntl(F_SETFD)",
                        libc::SYS_fcntl,
                        &[t as u64, libc::F_SETFD as u64, 0],
                    ),
                    Some(0),
                ));
            }
        } else {
            let flags = if cloexec { libc::O_CLOEXEC } else { 0 };
            out.push((
                Call::new(
                    "dup3",
                    libc::SYS_dup3,
                    &[t as u64, dst as u64, flags as u64],
                ),
                Some(dst as u64),
            ));
            out.push((Call::new("close", libc::SYS_close, &[t as u64]), Some(0)));
        }
        open.insert(dst);
    }
    out.push((
        Call::new("close", libc::SYS_close, &[pidfd as u64]),
        Some(0),
    ));
    out
}

/// Puts the stub in a time namespace of its own with offsets `text` (the
/// text of `timens_offsets`): unshare one, write them, enter it. The stub
/// is single-threaded (a multithreaded process cannot enter another time
/// namespace, EUSERS) and holds 0-2 only, so each open gives 3.
fn enter_timens(
    leader: Pid,
    ctl: u64,
    base: &libc::user_regs_struct,
    text: &[u8],
) -> Result<(), RestoreError> {
    const OFFSETS: &[u8] = b"/proc/self/timens_offsets\0";
    const FOR_CHILDREN: &[u8] = b"/proc/self/ns/time_for_children\0";
    let scratch = ctl + CTL_SCRATCH;
    let (offsets_at, children_at, text_at) = (scratch, scratch + 64, scratch + 128);
    if text.len() > (CTL_MM_MAP - CTL_SCRATCH - 128) as usize {
        return Err(RestoreError::Clocks(format!("offsets too long: {text:?}")));
    }
    poke(leader, offsets_at, OFFSETS)?;
    poke(leader, children_at, FOR_CHILDREN)?;
    poke(leader, text_at, text)?;
    let calls = [
        Call::new(
            "unshare(CLONE_NEWTIME)",
            libc::SYS_unshare,
            &[libc::CLONE_NEWTIME as u64],
        ),
        Call::new(
            "open(/proc/self/timens_offsets)",
            libc::SYS_open,
            &[offsets_at, (libc::O_WRONLY | libc::O_CLOEXEC) as u64],
        ),
        Call::new(
            "write to /proc/self/timens_offsets",
            libc::SYS_write,
            &[3, text_at, text.len() as u64],
        ),
        Call::new("close", libc::SYS_close, &[3]),
        Call::new(
            "open(/proc/self/ns/time_for_children)",
            libc::SYS_open,
            &[children_at, (libc::O_RDONLY | libc::O_CLOEXEC) as u64],
        ),
        Call::new(
            "setns into its time namespace",
            libc::SYS_setns,
            &[3, libc::CLONE_NEWTIME as u64],
        ),
        Call::new("close", libc::SYS_close, &[3]),
    ];
    let want = [0, 3, text.len() as u64, 0, 3, 0, 0];
    let calls: Vec<(Call, Option<u64>)> = calls.into_iter().zip(want.map(Some)).collect();
    run_expecting(leader, ctl, base, &calls).map_err(|(name, why)| {
        RestoreError::Clocks(format!(
            "the stub's {name} failed: {why} (unshare needs CAP_SYS_ADMIN; offsets {:?})",
            String::from_utf8_lossy(text)
        ))
    })
}

/// Runs `calls` in one batch ([`run_batch`]), each with the result it must
/// give where one is known; the first that fails or gives another, by name
/// and why.
fn run_expecting(
    leader: Pid,
    ctl: u64,
    base: &libc::user_regs_struct,
    calls: &[(Call, Option<u64>)],
) -> Result<(), (&'static str, String)> {
    let only: Vec<Call> = calls.iter().map(|c| c.0).collect();
    let got = run_batch(leader, ctl, base, &only).map_err(|e| ("batch", e.to_string()))?;
    for (r, (c, want)) in got.into_iter().zip(calls) {
        match (r, want) {
            (Err(e), _) => return Err((c.name, e.to_string())),
            (Ok(got), Some(w)) if got != *w => {
                return Err((c.name, format!("it gave {got}, not {w}")))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Rebuilds the process the image in `r` describes, with `stdio` as its fds
/// 0-2, and lets it run. Refuses a lazy image.
pub fn restore<R: Read>(r: R, stdio: StdioPlan) -> Result<Restored, RestoreError> {
    restore_impl(r, stdio, None, None).map(|(r, _, _)| r)
}

/// [`restore`] of a process image, or [`super::restore_tree`] of a tree
/// image, as its first bytes say; a tree gives its top's pid, its thread
/// list empty, and its holder to reap.
pub fn restore_any<R: Read>(r: R, stdio: StdioPlan) -> Result<Restored, RestoreError> {
    // A process's stub is made before its first bytes come (see `Blank`);
    // a tree, rarer, makes its own and drops this one.
    let blank_early = blank(&stdio, &[])?;
    let (tree, r) = peek_tree(r)?;
    if tree {
        drop(blank_early);
        let t = super::restore_tree(r, stdio)?;
        return Ok(Restored {
            pid: t.top(),
            reap: t.holder,
            threads: Vec::new(),
            stats: t.stats,
        });
    }
    restore_into(blank_early, r, stdio, None, None).map(|(r, _, _)| r)
}

/// Whether the image `r` begins is a tree's; `r` as it was.
fn peek_tree<R: Read>(mut r: R) -> Result<(bool, impl Read), RestoreError> {
    let mut head = [0u8; 8];
    super::image::read_exact(&mut r, &mut head, 0)?;
    Ok((head == super::TREE_MAGIC, io::Cursor::new(head).chain(r)))
}

/// [`restore_lazy`] or [`super::restore_tree_lazy`], by what the image is:
/// `links(None)` gives a lone process its pages, `links(Some(k))` a tree's
/// `k`-th live process; the pagers come back in that order.
pub fn restore_any_lazy<R: Read>(
    r: R,
    stdio: StdioPlan,
    links: &mut dyn FnMut(Option<usize>) -> LazyLink,
    opts: PagerOptions,
) -> Result<(Restored, Vec<Pager>), RestoreError> {
    let blank_early = blank(&stdio, &[])?;
    let (tree, r) = peek_tree(r)?;
    if tree {
        drop(blank_early);
        let (t, pagers) = super::restore_tree_lazy(r, stdio, &mut |k| links(Some(k)), opts)?;
        let restored = Restored {
            pid: t.top(),
            reap: t.holder,
            threads: Vec::new(),
            stats: t.stats,
        };
        return Ok((restored, pagers));
    }
    let (restored, pager, _) =
        restore_into(blank_early, r, stdio, Some((links(None), opts)), None)?;
    let pager = pager.ok_or(RestoreError::LazyImage)?;
    Ok((restored, vec![pager]))
}

/// Rebuilds the one thread of a shadow image (see `split`) as a process of
/// this kernel whose DSM memory is `share`'s, and lets it run; returns it
/// and the seccomp listener of its futex calls.
///
/// `answer`: the thread moved itself (`split::SelfMove`) and gets its
/// answer here.
pub fn restore_shadow<R: Read>(
    r: R,
    stdio: StdioPlan,
    share: &dyn Share,
    answer: Option<Answer<'_>>,
) -> Result<(Restored, OwnedFd), RestoreError> {
    let (r, _, listener) = restore_impl(r, stdio, None, Some((share, answer)))?;
    // A shadow's restore installs it (`finish`).
    match listener {
        Some(l) => Ok((r, l)),
        None => Err(RestoreError::FutexFilter(Box::new(
            super::split::SplitError::NoListener,
        ))),
    }
}

/// Rebuilds the process a lazy image describes and lets it run as soon as
/// its registers and eager pages are in; every other page comes through
/// `link` (on fault, and pushed in the background) while it runs. On error
/// nothing is left running here (the origin then resumes its original).
/// After success, a lost origin kills the process (see [`Pager::wait`]).
pub fn restore_lazy<R: Read>(
    r: R,
    stdio: StdioPlan,
    link: LazyLink,
    opts: PagerOptions,
) -> Result<LazyRestored, RestoreError> {
    let (restored, pager, _) = restore_impl(r, stdio, Some((link, opts)), None)?;
    let pager = pager.ok_or(RestoreError::LazyImage)?;
    Ok(LazyRestored { restored, pager })
}

/// `UFFD_FEATURE_EVENT_{REMAP,REMOVE,UNMAP}`: the pager must see the process
/// move or drop memory that has not arrived yet; `EVENT_FORK`: and fork,
/// whose child would otherwise read zeros where pages had not arrived.
const UFFD_FEATURES: u64 = uffd::FEATURE_EVENT_FORK
    | uffd::FEATURE_EVENT_REMAP
    | uffd::FEATURE_EVENT_REMOVE
    | uffd::FEATURE_EVENT_UNMAP;

/// The stub's userfaultfd, made inside it (it belongs to its mm) and pulled
/// into this process: `userfaultfd()` injected, `pidfd_getfd`, the stub's
/// copy closed again.
/// A userfaultfd created in the stopped process `leader` (by an injected
/// call), taken out of it; and a pidfd of the process.
pub(crate) fn take_uffd(
    leader: Pid,
    call: &dyn Fn(Call) -> Result<u64, SysError>,
) -> Result<(OwnedFd, OwnedFd), RestoreError> {
    let pid = leader.as_raw();
    let e = |what| move |source| RestoreError::Uffd { what, pid, source };
    let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
    let fd = call(Call::new("userfaultfd", libc::SYS_userfaultfd, &[flags]))? as i32;
    let got = uffd::pidfd_open(leader)
        .map_err(e("pidfd_open"))
        .and_then(|pidfd| {
            let f = uffd::pidfd_getfd(&pidfd, fd).map_err(e("pidfd_getfd"))?;
            Ok((f, pidfd))
        });
    call(Call::new("close", libc::SYS_close, &[fd as u64]))?;
    got
}

fn stub_uffd(
    leader: Pid,
    call: &dyn Fn(Call) -> Result<u64, SysError>,
    features: u64,
) -> Result<(Uffd, OwnedFd), RestoreError> {
    let pid = leader.as_raw();
    let e = |what| move |source| RestoreError::Uffd { what, pid, source };
    let (f, pidfd) = take_uffd(leader, call)?;
    let u = Uffd::from_fd(f);
    let granted = u.api(features).map_err(e("UFFDIO_API"))?;
    if granted & features != features {
        return Err(RestoreError::Uffd {
            what: "UFFDIO_API: the kernel lacks remap/remove/unmap events",
            pid,
            source: Errno::ENOTSUP,
        });
    }
    Ok((u, pidfd))
}

fn restore_impl<R: Read>(
    r: R,
    stdio: StdioPlan,
    lazy: Option<(LazyLink, PagerOptions)>,
    shadow: Option<(&dyn Share, Option<Answer<'_>>)>,
) -> Result<(Restored, Option<Pager>, Option<OwnedFd>), RestoreError> {
    // Made while the image is still on its way (see `Blank`).
    let blank_early = blank(&stdio, &[])?;
    restore_into(blank_early, r, stdio, lazy, shadow)
}

/// [`restore_impl`] with its early blank made.
fn restore_into<R: Read>(
    blank_early: Blank,
    r: R,
    stdio: StdioPlan,
    lazy: Option<(LazyLink, PagerOptions)>,
    shadow: Option<(&dyn Share, Option<Answer<'_>>)>,
) -> Result<(Restored, Option<Pager>, Option<OwnedFd>), RestoreError> {
    let (rd, meta) = ImageReader::open(r)?;
    if meta.header.flags & FLAG_LAZY != 0 && lazy.is_none() {
        return Err(RestoreError::LazyImage);
    }
    let vdso_plan = check_kernel(&meta)?;
    let blank = if blank_early.in_the_way(&meta.mappings) {
        drop(blank_early);
        blank(&stdio, &meta.mappings)?
    } else {
        blank_early
    };
    drop(stdio);
    build(blank, rd, meta, &vdso_plan, lazy, shadow, None)?.run()
}

/// A process rebuilt in its stub, every register loaded, still stopped
/// under our ptrace: [`Built::run`] lets it go; dropping it kills it.
pub(super) struct Built {
    stub: Stub,
    tids: Vec<Pid>,
    stats: ImageStats,
    pager: Option<Pager>,
    futex_listener: Option<OwnedFd>,
    /// The extensions its code was picked for (its image's).
    cpu: Vec<String>,
}

impl Built {
    /// Detaches every thread: the process runs.
    pub(super) fn run(
        mut self,
    ) -> Result<(Restored, Option<Pager>, Option<OwnedFd>), RestoreError> {
        for &tid in &self.tids {
            if let Err(e) = ptrace::detach(tid, None) {
                let err = ptrace_err("PTRACE_DETACH", tid)(e);
                drop(self.stub);
                if let Some(p) = self.pager.take() {
                    if let Some(pe) = p.abort() {
                        return Err(RestoreError::Lazy(pe));
                    }
                }
                return Err(err.into());
            }
        }
        self.stub.armed = false;
        if let Some(p) = &self.pager {
            p.set_running();
        }
        super::cpu::remember(self.stub.pid.as_raw(), &self.cpu);
        Ok((
            Restored {
                pid: self.stub.pid.as_raw(),
                reap: self.stub.pid.as_raw(),
                threads: self.tids.iter().map(|t| t.as_raw()).collect(),
                stats: self.stats,
            },
            self.pager,
            self.futex_listener,
        ))
    }

    /// What its image held.
    pub(super) fn stats(&self) -> &ImageStats {
        &self.stats
    }
}

/// Rebuilds the process `meta` describes (its pages still to read from
/// `rd`) in `blank`, up to the last step before it runs. `ns`: the pid
/// namespace the process is in, when not ours (a tree's), through which
/// its threads' tids are seen (see [`finish`]).
pub(super) fn build<R: Read>(
    blank: Blank,
    mut rd: ImageReader<R>,
    mut meta: ImageMeta,
    vdso_plan: &VdsoPlan,
    mut lazy: Option<(LazyLink, PagerOptions)>,
    shadow: Option<(&dyn Share, Option<Answer<'_>>)>,
    tree: Option<&mut TreeFiles>,
) -> Result<Built, RestoreError> {
    let share = shadow.map(|s| s.0);
    let answer = shadow.and_then(|s| s.1);
    // A CPU without an extension the program picked code for, refused;
    // register state from a CPU of another XSAVE layout, laid out for this
    // one (or refused): before anything is made.
    let lacks = super::cpu::lacking_here(&meta.process.cpu);
    if !lacks.is_empty() {
        return Err(RestoreError::Cpu(lacks.join(", ")));
    }
    let cpu = std::mem::take(&mut meta.process.cpu);
    let origin = meta.process.xfeatures;
    for t in &mut meta.threads {
        t.fp = super::cpu::fp_here(t, origin)
            .map_err(|source| RestoreError::Registers { tid: t.tid, source })?;
    }
    // DSM memory: this kernel's copy of each region, to map.
    let mut dsm: Vec<(&Mapping, u32)> = Vec::new();
    let mut dsm_fds = Vec::new();
    for m in meta.mappings.iter().filter(|m| m.flags & MAPF_DSM != 0) {
        let Some(s) = share else {
            return Err(RestoreError::Layout(format!(
                "{:#x}-{:#x} is DSM memory (region {}): restore it as a shadow",
                m.start, m.end, m.name
            )));
        };
        let (region, fd) = s.open(&m.name, m.len()).map_err(RestoreError::Dsm)?;
        dsm.push((m, region));
        dsm_fds.push(fd);
    }
    // Memfds, made again with what of their content is not mapped; each
    // mapped one also goes to the stub, to be mapped at the same offsets.
    let memfds = make_memfds(&meta.process.memfds, &meta.mappings)?;
    let mut memfd_maps: Vec<(u32, usize)> = Vec::new();
    for (id, fd) in &memfds {
        if meta
            .process
            .memfds
            .iter()
            .any(|m| m.id == *id && !m.maps.is_empty())
        {
            memfd_maps.push((*id, dsm_fds.len()));
            dsm_fds.push(fd.try_clone().map_err(local("dup of a memfd"))?);
        }
    }
    // Its executable, for /proc/PID/exe (which busybox re-executes): the
    // same path here, if it is there; else the stub's stays.
    let exe = open_exe(&meta.process.exe);
    let has_exe = exe.is_some();
    dsm_fds.extend(exe);
    let in_ns = tree.is_some();
    let mut extra_targets = fill(&blank, &meta, &memfds, &dsm_fds, tree)?;
    let exe_target = if has_exe { extra_targets.pop() } else { None };
    let Blank {
        mut stub,
        ctl,
        base,
    } = blank;
    drop(dsm_fds);
    let (dsm_targets, memfd_targets) = extra_targets.split_at(dsm.len());
    // The stub's descriptor of the memfd mapped at `start`.
    let memfd_at = |start: u64| -> Option<i32> {
        let m = meta
            .process
            .memfds
            .iter()
            .find(|m| m.maps.contains(&start))?;
        let i = memfd_maps.iter().find(|x| x.0 == m.id)?.1 - dsm.len();
        memfd_targets.get(i).copied()
    };
    let leader = stub.pid;
    let call_in = |tid: Pid, c: Call| -> Result<u64, SysError> {
        inject(tid, ctl, &base, &c)?.check(&c, tid)
    };
    let call = |c: Call| call_in(leader, c);

    // 2. The kernel's own mappings where the image had them; or, from
    //    another kernel build, this kernel's where there is room and the
    //    old vDSO's bytes at its address, sent on to them.
    let special_now = || -> Result<Vec<(MappingKind, u64, u64)>, RestoreError> {
        let now = ProcDir::new(Path::new("/proc"), leader.as_raw())
            .maps()
            .map_err(local("stub maps"))?;
        Ok(now
            .iter()
            .filter_map(to_mapping)
            .filter(|m| m.kind.is_special())
            .map(|m| (m.kind, m.start, m.end))
            .collect())
    };
    match vdso_plan {
        VdsoPlan::Same => {
            if let Some(first) = meta.mappings.iter().find(|m| m.kind.is_special()) {
                call(Call::new(
                    "arch_prctl(ARCH_MAP_VDSO_64)",
                    libc::SYS_arch_prctl,
                    &[ARCH_MAP_VDSO_64, first.start],
                ))?;
                let want: Vec<(MappingKind, u64, u64)> = meta
                    .mappings
                    .iter()
                    .filter(|m| m.kind.is_special())
                    .map(|m| (m.kind, m.start, m.end))
                    .collect();
                let got = special_now()?;
                if got != want {
                    return Err(RestoreError::Layout(format!(
                        "asked for {want:x?}, the kernel mapped {got:x?}"
                    )));
                }
            }
        }
        VdsoPlan::Proxy { local, symbols } => {
            let old = vdso::old_vdso(&meta.mappings, meta.process.vdso.len())?;
            // (The freeze takes threads out of the vDSO; one it could not
            // would resume in old code between the entries.)
            if let Some(t) = meta
                .threads
                .iter()
                .find(|t| (old.start..old.end).contains(&t.regs[16]))
            {
                return Err(vdso::VdsoError::ThreadInside {
                    tid: t.tid,
                    rip: t.regs[16],
                }
                .into());
            }
            let at = vdso::place(&meta.mappings, local, (ctl, ctl + PAGE))?;
            call(Call::new(
                "arch_prctl(ARCH_MAP_VDSO_64)",
                libc::SYS_arch_prctl,
                &[ARCH_MAP_VDSO_64, at],
            ))?;
            let base = local.first().map_or(0, |m| m.start);
            let want: Vec<(MappingKind, u64, u64)> = local
                .iter()
                .map(|m| (m.kind, m.start - base + at, m.end - base + at))
                .collect();
            let got = special_now()?;
            if got != want {
                return Err(RestoreError::Layout(format!(
                    "asked for this kernel's {want:x?}, it mapped {got:x?}"
                )));
            }
            let new_vdso = want
                .iter()
                .find(|m| m.0 == MappingKind::Vdso)
                .map_or(at, |m| m.1);
            let bytes = vdso::patch(&meta.process.vdso, old.start, symbols, new_vdso)?;
            let mapped = call(Call::new(
                "mmap",
                libc::SYS_mmap,
                &[
                    old.start,
                    old.len(),
                    (libc::PROT_READ | libc::PROT_WRITE) as u64,
                    (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED) as u64,
                    u64::MAX,
                    0,
                ],
            ))?;
            if mapped != old.start {
                return Err(RestoreError::Layout(format!(
                    "the old vDSO's place {:#x} got {mapped:#x}",
                    old.start
                )));
            }
            poke(leader, old.start, &bytes)?;
            call(Call::new(
                "mprotect",
                libc::SYS_mprotect,
                &[
                    old.start,
                    old.len(),
                    (libc::PROT_READ | libc::PROT_EXEC) as u64,
                ],
            ))?;
            log::debug!(
                "vDSO proxy: old vDSO at {:#x} sent to this kernel's at {new_vdso:#x}",
                old.start
            );
        }
    }
    let pers = ProcDir::new(Path::new("/proc"), leader.as_raw())
        .personality()
        .map_err(local("stub personality"))?;
    if pers != meta.process.personality {
        call(Call::new(
            "personality",
            libc::SYS_personality,
            &[u64::from(meta.process.personality)],
        ))?;
    }

    // The userfaultfd, before any mapping it covers exists. Lazy: the pager
    // serves its faults later. Stop-and-copy: only to place pages with
    // UFFDIO_COPY, which allocates each page and copies into it without
    // zeroing it first (a write through process_vm_writev faults a zeroed
    // page in, then copies: about twice the memory traffic). This gives up
    // huge pages for dense mappings while they are filled (UFFDIO_COPY makes
    // small ones; khugepaged may still collapse them under the advice set
    // below): measured on this machine at 256 MiB, huge-page fills took
    // 0.17-0.79 s, stalling on compaction, against 0.15-0.19 s. It is closed
    // once the pages are in; the pages never sent stay missing and fault in
    // as zero pages, as in the original. A kernel without userfaultfd gets
    // the slower writes.
    let mut uffd = match stub_uffd(
        leader,
        &call,
        if lazy.is_some() { UFFD_FEATURES } else { 0 },
    ) {
        Ok(u) => Some(u),
        Err(_) if lazy.is_none() => None,
        Err(e) => return Err(e),
    };
    let mut table = PageTable::new(&meta.mappings);

    // A shadow dies with the thread that made it (its agent's): without
    // its DSM engine its memory would go on, incoherent.
    if share.is_some() {
        call(Call::new(
            "prctl(PR_SET_PDEATHSIG)",
            libc::SYS_prctl,
            &[libc::PR_SET_PDEATHSIG as u64, libc::SIGKILL as u64],
        ))?;
    }
    // 3. DSM memory (a shadow's): this kernel's copies, each with a
    //    userfaultfd of its own handed to the engine.
    for ((m, region), fd) in dsm.iter().zip(dsm_targets) {
        let got = call(Call::new(
            "mmap",
            libc::SYS_mmap,
            &[
                m.start,
                m.len(),
                u64::from(m.prot),
                (libc::MAP_SHARED | libc::MAP_FIXED) as u64,
                *fd as u64,
                0,
            ],
        ))?;
        if got != m.start {
            return Err(RestoreError::Layout(format!(
                "mmap of {:#x}-{:#x} landed at {got:#x}",
                m.start, m.end
            )));
        }
        call(Call::new("close", libc::SYS_close, &[*fd as u64]))?;
        let (u, _) = take_uffd(leader, &call)?;
        if let Some(s) = share {
            s.attach(*region, m.start, m.len(), u, leader.as_raw())
                .map_err(RestoreError::Dsm)?;
        }
    }
    //    Every other mapping, writable until its content is in: all in
    //    batches (one stop of the stub for dozens of mappings).
    let others: Vec<&Mapping> = meta
        .mappings
        .iter()
        .filter(|m| !m.kind.is_special() && m.flags & MAPF_DSM == 0)
        .collect();
    let mut mmaps = Vec::with_capacity(others.len());
    for m in &others {
        let prot = if m.prot == 0 {
            libc::PROT_NONE
        } else {
            libc::PROT_READ | libc::PROT_WRITE
        };
        let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED;
        if m.flags & MAPF_GROWSDOWN != 0 {
            flags |= libc::MAP_GROWSDOWN;
        }
        let (mut fd, mut offset) = (u64::MAX, 0);
        if m.flags & MAPF_SHARED != 0 {
            flags = libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_FIXED;
            if let Some(t) = memfd_at(m.start) {
                flags = libc::MAP_SHARED | libc::MAP_FIXED;
                (fd, offset) = (t as u64, m.offset);
            }
        }
        mmaps.push(Call::new(
            "mmap",
            libc::SYS_mmap,
            &[m.start, m.len(), prot as u64, flags as u64, fd, offset],
        ));
    }
    for (m, got) in others.iter().zip(run_batch(leader, ctl, &base, &mmaps)?) {
        let got = got?;
        if got != m.start {
            return Err(RestoreError::Layout(format!(
                "mmap of {:#x}-{:#x} landed at {got:#x}",
                m.start, m.end
            )));
        }
    }
    let mut advice = Vec::new();
    for m in &others {
        if let (Some((u, _)), true) = (&uffd, carried(m)) {
            u.register_missing(m.start, m.len())
                .map_err(|source| RestoreError::Uffd {
                    what: "UFFDIO_REGISTER",
                    pid: leader.as_raw(),
                    source,
                })?;
        }
        if let Some(a) = thp_advice(m) {
            advice.push(Call::new(
                "madvise",
                libc::SYS_madvise,
                &[m.start, m.len(), a as u64],
            ));
        }
    }
    // Best effort: a kernel without THP refuses, which is harmless.
    run_batch(leader, ctl, &base, &advice)?;

    //    The memfds' descriptors served their mappings (the process's own
    //    descriptors of them are among its files).
    for fd in memfd_targets {
        call(Call::new("close", libc::SYS_close, &[*fd as u64]))?;
    }

    // 4. The pages, as they stream in; the checksum is checked at the end
    //    record, before anything runs.
    let mut buf = Vec::new();
    while let Some(p) = rd.next_pages(&mut buf)? {
        if let (Some((u, _)), Some(_)) = (&uffd, &lazy) {
            // Registered: only the userfaultfd may fill missing pages (a
            // write through process_vm_writev would wait on it).
            let (addr, npages) = match p {
                Pages::Data { addr, npages } => (addr, u64::from(npages)),
                Pages::Zero { addr, npages } => (addr, npages),
            };
            fill_eager(
                u,
                leader,
                addr,
                npages,
                matches!(p, Pages::Data { .. }).then_some(&buf[..]),
            )?;
            table.mark_present(addr, npages);
            continue;
        }
        if let (Pages::Data { addr, npages }, Some((u, _))) = (p, &uffd) {
            if table.holds(addr) {
                fill_eager(u, leader, addr, u64::from(npages), Some(&buf[..]))?;
                continue;
            }
        }
        if let Pages::Data { addr, .. } = p {
            let mut done = 0;
            while done < buf.len() {
                let n = write_remote(leader, addr + done as u64, &buf[done..]).map_err(|e| {
                    SysError::Mem {
                        what: "writing pages",
                        pid: leader.as_raw(),
                        source: e.into(),
                    }
                })?;
                if n == 0 {
                    return Err(SysError::Mem {
                        what: "writing pages",
                        pid: leader.as_raw(),
                        source: io::Error::other(format!("no progress at {addr:#x}")),
                    }
                    .into());
                }
                done += n;
            }
        }
    }
    let stats = rd.stats();
    if lazy.is_none() {
        // Stop-and-copy: every page is in; closing our only descriptor of
        // the userfaultfd drops its registrations.
        uffd = None;
    }
    // The pager serves from here on: what follows may touch lazy memory
    // (rseq registration writes its area; the tid words are patched).
    let mut pager = match (uffd.take(), lazy.take()) {
        (Some((u, pidfd)), Some((link, opts))) => Some(
            pager::start(u, pidfd, leader.as_raw(), table, link, opts)
                .map_err(local("pager thread"))?,
        ),
        _ => None,
    };
    // The memfds' seals, now that what they hold outside their mappings is
    // in (no mapped memfd is write-sealed, see `precheck::memfd_states`: a
    // lazy copy's pages still to come fill them through the userfaultfd).
    let rest = seal_memfds(&meta.process.memfds, &memfds).and_then(|()| {
        finish(
            &mut stub,
            &meta,
            ctl,
            &base,
            &call,
            answer,
            share.is_some(),
            (in_ns, exe_target),
        )
    });
    let (tids, futex_listener) = match rest {
        Ok(t) => t,
        Err(e) => {
            drop(stub);
            if let Some(p) = pager.take() {
                if let Some(pe) = p.abort() {
                    return Err(RestoreError::Lazy(pe));
                }
            }
            return Err(e);
        }
    };
    Ok(Built {
        stub,
        tids,
        stats,
        pager,
        futex_listener,
        cpu,
    })
}

/// Writes eager pages of a lazy image into registered memory.
fn fill_eager(
    u: &Uffd,
    leader: Pid,
    addr: u64,
    npages: u64,
    data: Option<&[u8]>,
) -> Result<(), RestoreError> {
    let len = npages * PAGE;
    let mut done = 0u64;
    while done < len {
        let r = match data {
            Some(d) => u.copy(addr + done, &d[done as usize..]),
            None => u.zeropage(addr + done, len - done),
        };
        match r {
            Ok(n) if n > 0 => done += n,
            Ok(_) => {
                return Err(RestoreError::Uffd {
                    what: "filling eager pages: no progress",
                    pid: leader.as_raw(),
                    source: Errno::EIO,
                })
            }
            Err(Errno::EAGAIN) | Err(Errno::EINTR) => {}
            Err(source) => {
                return Err(RestoreError::Uffd {
                    what: if data.is_some() {
                        "UFFDIO_COPY of an eager page"
                    } else {
                        "UFFDIO_ZEROPAGE of an eager page"
                    },
                    pid: leader.as_raw(),
                    source,
                })
            }
        }
    }
    Ok(())
}

/// Steps 4b-8: protections, process and thread state, registers (the
/// detach is [`Built::run`]'s). Returns the tids (leader first). `in_ns`:
/// the process is in a pid namespace of its own (a tree's); `exe`: the
/// stub's descriptor of its executable (see [`set_mm`]).
#[allow(clippy::too_many_arguments)]
fn finish(
    stub: &mut Stub,
    meta: &ImageMeta,
    ctl: u64,
    base: &libc::user_regs_struct,
    call: &dyn Fn(Call) -> Result<u64, SysError>,
    answer: Option<Answer<'_>>,
    futex_filter: bool,
    (in_ns, exe): (bool, Option<i32>),
) -> Result<(Vec<Pid>, Option<OwnedFd>), RestoreError> {
    let leader = stub.pid;
    let base = *base;
    let scratch = ctl + CTL_SCRATCH;
    let protect: Vec<Call> = meta
        .mappings
        .iter()
        .filter(|m| !m.kind.is_special() && m.flags & MAPF_DSM == 0)
        .filter(|m| m.prot != 0 && m.prot != PROT_R | PROT_W)
        .map(|m| {
            Call::new(
                "mprotect",
                libc::SYS_mprotect,
                &[m.start, m.len(), u64::from(m.prot)],
            )
        })
        .collect();
    for r in run_batch(leader, ctl, &base, &protect)? {
        r?;
    }

    // 5. Process-wide kernel state.
    set_mm(leader, ctl, meta, exe, call)?;
    epoll_watches(leader, meta, scratch, call)?;
    for a in &meta.process.sigactions {
        poke(
            leader,
            scratch,
            &words32([a.handler, a.flags, a.restorer, a.mask]),
        )?;
        call(Call::new(
            "rt_sigaction",
            libc::SYS_rt_sigaction,
            &[u64::from(a.signo), scratch, 0, 8],
        ))?;
    }

    // 6. The other threads, each stopped at birth. In a tree's namespace
    // each gets the tid it had there (the image gives a tree's numbers as
    // its processes saw them), as its process got its pid: what the
    // program holds of them (glibc's cached tids, a lock's owner) stays
    // true, move after move.
    let mut tids = vec![leader];
    for t in &meta.threads[1..] {
        let mut flags = (libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM) as u64;
        if t.clear_child_tid != 0 {
            flags |= libc::CLONE_CHILD_CLEARTID as u64;
        }
        let c = if in_ns {
            // No exit signal: a thread.
            clone3_set_tid(leader, scratch, (flags, t.clear_child_tid, 0), t.tid as i32)?
        } else {
            Call::new(
                "clone",
                libc::SYS_clone,
                &[flags, 0, 0, t.clear_child_tid, 0],
            )
        };
        let out = inject(leader, ctl, &base, &c)?;
        out.check(&c, leader)?;
        let new = out.cloned.ok_or(SysError::Stop {
            tid: leader.as_raw(),
            status: "no PTRACE_EVENT_CLONE".into(),
            wanted: "clone",
        })?;
        stub.tids.push(new);
        tids.push(new);
        first_stop(new, "the new thread's first stop")?;
    }

    // Each thread's tid as the process sees it: in its pid namespace (a
    // tree's), where signals are queued and timers aimed by those numbers.
    let seen: Vec<Pid> = if in_ns {
        tids.iter()
            .map(|t| {
                ProcDir::new(Path::new("/proc"), t.as_raw())
                    .ns_pid()
                    .map(Pid::from_raw)
            })
            .collect::<io::Result<_>>()
            .map_err(local("a new thread's pid in its namespace"))?
    } else {
        tids.clone()
    };
    // 7. Per-thread kernel state, injected in each thread itself.
    for (i, ((t, &tid), &own)) in meta.threads.iter().zip(&tids).zip(&seen).enumerate() {
        thread_state((leader, seen[0]), (tid, own), i == 0, t, (ctl, &base), meta)?;
    }
    // glibc caches each thread's tid at its clear_child_tid address: point
    // it at the new tid so pthread_kill & co. reach the right thread.
    for (t, &own) in meta.threads.iter().zip(&seen) {
        if t.clear_child_tid == 0 {
            continue;
        }
        let mut b = [0u8; 4];
        if read_remote(leader, t.clear_child_tid, &mut b).is_ok() && u32::from_le_bytes(b) == t.tid
        {
            poke(
                leader,
                t.clear_child_tid,
                &(own.as_raw() as u32).to_le_bytes(),
            )?;
        }
    }

    // Interval timers last, with what they had left at the freeze: their
    // time runs from here. (Every signal is blocked until the registers
    // below: an early SIGALRM waits, pending.)
    for (which, t) in &meta.process.itimers {
        poke(leader, scratch, &words32(*t))?;
        call(Call::new(
            "setitimer",
            libc::SYS_setitimer,
            &[u64::from(*which), scratch, 0],
        ))?;
    }
    posix_timers(leader, scratch, &meta.process.posix_timers, &seen, call)?;

    // A thread that moved itself: its connection here, and its answer.
    if let Some(a) = answer {
        let fd = super::split::connect_agent(call, leader.as_raw(), scratch, a.path)?;
        poke(leader, a.buf, &super::split::reply(a.status, a.kernel, fd))?;
    }

    // A shadow's futex calls go to its agent, as its process's do.
    let futex_listener = if futex_filter {
        Some(
            super::split::install_futex_listener(call, leader.as_raw(), scratch, true)
                .map_err(|e| RestoreError::FutexFilter(Box::new(e)))?,
        )
    } else {
        None
    };

    // 8. Last injection: the control page goes (a shadow keeps it: its
    // filter refuses munmap now, and a shadow maps nothing that could want
    // the place). Then the registers.
    if futex_listener.is_none() {
        call(Call::new("munmap", libc::SYS_munmap, &[ctl, PAGE]))?;
    }
    for (t, &tid) in meta.threads.iter().zip(&tids) {
        let nt = match t.fp_kind {
            super::image::FpKind::Xstate => sys::NT_X86_XSTATE,
            super::image::FpKind::Fxsave => sys::NT_PRFPREG,
        };
        sys::setregset(tid, nt, &t.fp).map_err(ptrace_err("PTRACE_SETREGSET", tid))?;
        ptrace::setregs(tid, resume_regs(sys::words_to_regs(&t.regs)))
            .map_err(ptrace_err("PTRACE_SETREGS", tid))?;
        sys::set_sigmask(tid, t.sigmask).map_err(ptrace_err("PTRACE_SETSIGMASK", tid))?;
    }
    Ok((tids, futex_listener))
}

/// The call that makes a child of `pid` (a process or a thread) with the
/// number `tid` in the innermost pid namespace: `clone3` with `set_tid`,
/// its `struct clone_args` (v2, 88 bytes) and the one pid_t after it put
/// at `scratch`. `(flags, child_tid, exit_signal)`; no stack (the child's
/// registers are set later).
pub(super) fn clone3_set_tid(
    pid: Pid,
    scratch: u64,
    (flags, child_tid, exit_signal): (u64, u64, u64),
    tid: i32,
) -> Result<Call, SysError> {
    let mut args = [0u64; 11];
    args[0] = flags;
    args[2] = child_tid;
    args[4] = exit_signal;
    args[8] = scratch + 96;
    args[9] = 1;
    let mut b: Vec<u8> = args.iter().flat_map(|x| x.to_le_bytes()).collect();
    b.resize(96, 0);
    b.extend_from_slice(&tid.to_le_bytes());
    poke(pid, scratch, &b)?;
    Ok(Call::new(
        "clone3(set_tid)",
        libc::SYS_clone3,
        &[scratch, 88],
    ))
}

pub(super) fn poke(pid: Pid, addr: u64, b: &[u8]) -> Result<(), SysError> {
    match write_remote(pid, addr, b) {
        Ok(n) if n == b.len() => Ok(()),
        Ok(n) => Err(SysError::Mem {
            what: "writing to the stub",
            pid: pid.as_raw(),
            source: io::Error::other(format!("short write {n}/{} at {addr:#x}", b.len())),
        }),
        Err(e) => Err(SysError::Mem {
            what: "writing to the stub",
            pid: pid.as_raw(),
            source: e.into(),
        }),
    }
}

/// `prctl(PR_SET_MM, PR_SET_MM_MAP)`: code/data/brk/stack/args/env bounds and
/// the auxv, as the origin had them.
/// `PR_SET_MM_MAP`: the mm fields and auxv of the image, and the
/// executable on the stub's descriptor `exe` (closed after), if any. A
/// kernel that refuses the executable (it is checked for exec rights) gets
/// the rest without it.
fn set_mm(
    leader: Pid,
    ctl: u64,
    meta: &ImageMeta,
    exe: Option<i32>,
    call: &dyn Fn(Call) -> Result<u64, SysError>,
) -> Result<(), SysError> {
    let mm = &meta.process.mm;
    let mut auxv = Vec::with_capacity(16 * (meta.process.auxv.len() + 1));
    for (t, v) in meta.process.auxv.iter().chain(std::iter::once(&(0, 0))) {
        auxv.extend_from_slice(&t.to_le_bytes());
        auxv.extend_from_slice(&v.to_le_bytes());
    }
    let mut s = Vec::with_capacity(104);
    for w in [
        mm.start_code,
        mm.end_code,
        mm.start_data,
        mm.end_data,
        mm.start_brk,
        mm.brk,
        mm.start_stack,
        mm.arg_start,
        mm.arg_end,
        mm.env_start,
        mm.env_end,
        ctl + CTL_AUXV,
    ] {
        s.extend_from_slice(&w.to_le_bytes());
    }
    s.extend_from_slice(&(auxv.len() as u32).to_le_bytes());
    poke(leader, ctl + CTL_AUXV, &auxv)?;
    let set = |exe_fd: u32| {
        let mut s = s.clone();
        s.extend_from_slice(&exe_fd.to_le_bytes()); // u32::MAX: keep
        poke(leader, ctl + CTL_MM_MAP, &s)?;
        call(Call::new(
            "prctl(PR_SET_MM_MAP)",
            libc::SYS_prctl,
            &[
                PR_SET_MM,
                PR_SET_MM_MAP,
                ctl + CTL_MM_MAP,
                s.len() as u64,
                0,
            ],
        ))
        .map(drop)
    };
    let Some(fd) = exe else {
        return set(u32::MAX);
    };
    let done = set(fd as u32).or_else(|e| {
        log::warn!("process {leader}: {e}: its /proc/PID/exe stays the restorer's");
        set(u32::MAX)
    });
    call(Call::new("close", libc::SYS_close, &[fd as u64]))?;
    done
}

/// The executable at `path` (the image's `/proc/PID/exe`), to give the
/// process, if it is a regular file here.
fn open_exe(path: &str) -> Option<OwnedFd> {
    if !path.starts_with('/') || path.ends_with(" (deleted)") {
        return None;
    }
    let f = File::open(path).ok()?;
    f.metadata().ok()?.is_file().then(|| f.into())
}

/// `(leader, pid)`, `(tid, own)`: the process and the thread, here and as
/// the process sees them (another pid namespace's numbers for a tree's).
fn thread_state(
    (leader, pid): (Pid, Pid),
    (tid, own): (Pid, Pid),
    is_leader: bool,
    t: &ThreadState,
    (ctl, base): (u64, &libc::user_regs_struct),
    meta: &ImageMeta,
) -> Result<(), SysError> {
    let scratch = ctl + CTL_SCRATCH;
    let call = |c: Call| -> Result<u64, SysError> { inject(tid, ctl, base, &c)?.check(&c, tid) };
    // One batch (one stop of the thread): its alternate stack and name are
    // placed at two spots of the scratch area first.
    let mut calls = Vec::with_capacity(5);
    if is_leader {
        // Also drops the stub's inherited clear_child_tid, which points into
        // memory that is gone.
        calls.push(Call::new(
            "set_tid_address",
            libc::SYS_set_tid_address,
            &[t.clear_child_tid],
        ));
    }
    if t.rseq.abi_pointer != 0 {
        calls.push(Call::new(
            "rseq",
            libc::SYS_rseq,
            &[
                t.rseq.abi_pointer,
                u64::from(t.rseq.abi_size),
                0,
                u64::from(t.rseq.signature),
            ],
        ));
    }
    let mut ss = [0u8; 24];
    if t.altstack.flags & SS_DISABLE != 0 || t.altstack.size == 0 {
        ss[8..12].copy_from_slice(&SS_DISABLE.to_le_bytes());
    } else {
        ss[..8].copy_from_slice(&t.altstack.sp.to_le_bytes());
        ss[8..12].copy_from_slice(&(t.altstack.flags & !SS_ONSTACK).to_le_bytes());
        ss[16..24].copy_from_slice(&t.altstack.size.to_le_bytes());
    }
    poke(leader, scratch, &ss)?;
    calls.push(Call::new(
        "sigaltstack",
        libc::SYS_sigaltstack,
        &[scratch, 0],
    ));
    calls.push(Call::new(
        "set_robust_list",
        libc::SYS_set_robust_list,
        &[t.robust_list, 24],
    ));
    let name_at = scratch + 32;
    poke(leader, name_at, &t.comm)?;
    calls.push(Call::new(
        "prctl(PR_SET_NAME)",
        libc::SYS_prctl,
        &[PR_SET_NAME, name_at],
    ));
    for r in run_batch(tid, ctl, base, &calls)? {
        r?;
    }
    let pid = pid.as_raw() as u64;
    for si in &t.pending {
        poke(leader, scratch, &si.0)?;
        call(Call::new(
            "rt_tgsigqueueinfo",
            libc::SYS_rt_tgsigqueueinfo,
            &[pid, own.as_raw() as u64, si.signo() as u64, scratch],
        ))?;
    }
    if is_leader {
        for si in &meta.process.shared_pending {
            poke(leader, scratch, &si.0)?;
            call(Call::new(
                "rt_sigqueueinfo",
                libc::SYS_rt_sigqueueinfo,
                &[pid, si.signo() as u64, scratch],
            ))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs(rax: i64, orig: i64, rip: u64) -> libc::user_regs_struct {
        let mut w = [0u64; 27];
        w[10] = rax as u64;
        w[15] = orig as u64;
        w[16] = rip;
        sys::words_to_regs(&w)
    }

    #[test]
    fn restart_rewinds_interrupted_syscalls() {
        for e in [512, 513, 514, 516] {
            let r = resume_regs(regs(-e, 230, 0x1002));
            assert_eq!((r.rax, r.rip, r.orig_rax as i64), (230, 0x1000, -1), "-{e}");
        }
        // Finished syscall, -EINTR, or not in a syscall: untouched.
        for (rax, orig) in [(5, 1), (-4, 202), (-512, -1)] {
            let r = resume_regs(regs(rax, orig, 0x1002));
            assert_eq!((r.rax as i64, r.rip), (rax, 0x1002));
            assert_eq!(r.orig_rax as i64, -1);
        }
    }

    #[test]
    fn control_page_avoids_everything() {
        let m = |s, e| Mapping {
            start: s,
            end: e,
            prot: 3,
            flags: 0,
            kind: MappingKind::Anon,
            offset: 0,
            resident: 0,
            name: String::new(),
        };
        let img = vec![m(0x10000, 0x20000), m(0x30000, 0x31000)];
        let c = control_page(&img, &[(0x20000, 0x30000)]).unwrap();
        assert_eq!(c, 0x31000);
        let c = control_page(&img, &[]).unwrap();
        assert_eq!(c, 0x20000);
    }
}
