//! Destination side: turn an image into a running process.
//!
//! A forked stub (see `sys::spawn_stub`) stops under `PTRACE_TRACEME` with a
//! one-page control area holding a `syscall` instruction. Every later step is
//! a syscall injected there (`inject`): unmap everything else, map the vDSO
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
    FileKind, ImageError, ImageMeta, ImageReader, ImageStats, Mapping, MappingKind, OpenFile,
    Pages, ThreadState, FLAG_LAZY, MAPF_GROWSDOWN, MAPF_HUGEPAGE, MAPF_NOHUGEPAGE, PAGE, PROT_R,
    PROT_W, USER_TOP,
};
use super::inject::{inject, ptrace_err, wait, Call};
use super::lazy::{carried, LazyLink};
use super::memory::{fingerprint, read_remote, to_mapping, write_remote};
use super::pager::{self, LazyError, PageTable, Pager, PagerOptions};
use super::procfs::{parse_maps, ProcDir};
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
    #[error("the image was taken on another kernel: its {what} is {image:?}, this kernel's is {local:?}; restore needs the same kernel image")]
    Kernel {
        what: &'static str,
        image: String,
        local: String,
    },
    #[error("vDSO layout differs: {0}")]
    Layout(String),
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
    /// Its pid here (a child of the caller, which must reap it).
    pub pid: i32,
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
struct Stub {
    pid: Pid,
    tids: Vec<Pid>,
    armed: bool,
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
const CTL_SCRATCH: u64 = 0x100;
const CTL_MM_MAP: u64 = 0x400;
const CTL_AUXV: u64 = 0x500;

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

/// Same kernel image as the origin, and the same special-mapping layout.
fn check_kernel(meta: &ImageMeta) -> Result<Vec<Mapping>, RestoreError> {
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
    if here.release != there.release {
        return Err(RestoreError::Kernel {
            what: "release",
            image: there.release.clone(),
            local: here.release,
        });
    }
    if here.version != there.version {
        return Err(RestoreError::Kernel {
            what: "build",
            image: there.version.clone(),
            local: here.version,
        });
    }
    if (here.vdso_hash, here.vdso_len) != (there.vdso_hash, there.vdso_len) {
        return Err(RestoreError::Kernel {
            what: "vDSO",
            image: format!("{} bytes, xxh3 {:#018x}", there.vdso_len, there.vdso_hash),
            local: format!("{} bytes, xxh3 {:#018x}", here.vdso_len, here.vdso_hash),
        });
    }
    let special = |v: &[Mapping]| -> Vec<(MappingKind, u64, u64)> {
        let s: Vec<&Mapping> = v.iter().filter(|m| m.kind.is_special()).collect();
        let base = s.first().map(|m| m.start).unwrap_or(0);
        s.iter()
            .map(|m| (m.kind, m.start - base, m.len()))
            .collect()
    };
    let (a, b) = (special(&meta.mappings), special(&mine));
    if a != b {
        return Err(RestoreError::Layout(format!(
            "image has {a:x?}, this kernel maps {b:x?}"
        )));
    }
    Ok(mine)
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

fn own_ranges() -> Result<Vec<(u64, u64)>, RestoreError> {
    let maps = parse_maps(&std::fs::read_to_string("/proc/self/maps").map_err(local("maps"))?)
        .map_err(local("maps"))?;
    Ok(maps.iter().map(|m| (m.start, m.end)).collect())
}

/// Opens the image's files as they were: same flags and offset, and for a
/// regular file only if it is the same file (size and modification time as
/// when frozen, as CRIU checks). Returns the descriptors (moved to numbers
/// at or above the returned bound, which every target is below) and the
/// stub's `(source, target, close-on-exec)` list.
type OpenedFiles = (Vec<OwnedFd>, Vec<(i32, i32, bool)>, i32);

fn open_files(files: &[OpenFile]) -> Result<OpenedFiles, RestoreError> {
    use std::os::fd::FromRawFd;
    let keep_below = files
        .iter()
        .map(|f| f.fd as i32 + 1)
        .max()
        .unwrap_or(3)
        .max(3);
    let mut owned = Vec::with_capacity(files.len());
    let mut plan = Vec::with_capacity(files.len());
    for f in files {
        let fail = |why: String| RestoreError::File {
            fd: f.fd,
            path: f.path.clone(),
            why,
        };
        let file: OwnedFd = if f.kind == FileKind::Eventfd {
            eventfd(f).map_err(|e| fail(e.to_string()))?
        } else {
            open_by_path(f, &fail)?
        };
        // Above every target, so the stub's dup2s clobber no source.
        // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own returns a new one.
        let high = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_DUPFD_CLOEXEC, keep_below) };
        if high < 0 {
            return Err(fail(io::Error::last_os_error().to_string()));
        }
        // SAFETY: `high` was just returned by fcntl and is ours alone.
        owned.push(unsafe { OwnedFd::from_raw_fd(high) });
        drop(file);
        plan.push((high, f.fd as i32, f.flags & libc::O_CLOEXEC as u32 != 0));
    }
    Ok((owned, plan, keep_below))
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
        FileKind::Eventfd => {}
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
fn clock_offsets(monotonic_ns: u64, boottime_ns: u64) -> Result<Option<Vec<u8>>, RestoreError> {
    if monotonic_ns == 0 && boottime_ns == 0 {
        return Ok(None);
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
    Ok(Some(
        (line("monotonic", m) + &line("boottime", b)).into_bytes(),
    ))
}

fn spawn(meta: &ImageMeta, stdio: &StdioPlan) -> Result<(Stub, u64), RestoreError> {
    let (_files, files, keep_below) = open_files(&meta.process.files)?;
    let timens = clock_offsets(meta.process.monotonic_ns, meta.process.boottime_ns)?;
    let mut last = 0;
    for _ in 0..4 {
        let ctl = control_page(&meta.mappings, &own_ranges()?)?;
        let plan = sys::StubPlan {
            stdio: [
                stdio.stdin.as_raw_fd(),
                stdio.stdout.as_raw_fd(),
                stdio.stderr.as_raw_fd(),
            ],
            ctl,
            // syscall; int3; int3
            code: [0x0f, 0x05, 0xcc, 0xcc],
            files: files.clone(),
            keep_below,
            timens: timens.clone(),
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
            WaitStatus::Stopped(_, Signal::SIGSTOP) => return Ok((stub, ctl)),
            WaitStatus::Exited(_, code) => {
                // Reaped: nothing left to kill.
                stub.armed = false;
                last = code;
                if let Some(step) = sys::timens_step(code) {
                    return Err(RestoreError::Clocks(format!(
                        "the stub's {step} failed (unshare needs CAP_SYS_ADMIN; offsets {:?})",
                        String::from_utf8_lossy(timens.as_deref().unwrap_or_default())
                    )));
                }
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

/// Rebuilds the process the image in `r` describes, with `stdio` as its fds
/// 0-2, and lets it run. Refuses a lazy image.
pub fn restore<R: Read>(r: R, stdio: StdioPlan) -> Result<Restored, RestoreError> {
    restore_impl(r, stdio, None).map(|(r, _)| r)
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
    let (restored, pager) = restore_impl(r, stdio, Some((link, opts)))?;
    let pager = pager.ok_or(RestoreError::LazyImage)?;
    Ok(LazyRestored { restored, pager })
}

/// `UFFD_FEATURE_EVENT_{REMAP,REMOVE,UNMAP}`: the pager must see the process
/// move or drop memory that has not arrived yet.
const UFFD_FEATURES: u64 =
    uffd::FEATURE_EVENT_REMAP | uffd::FEATURE_EVENT_REMOVE | uffd::FEATURE_EVENT_UNMAP;

/// The stub's userfaultfd, made inside it (it belongs to its mm) and pulled
/// into this process: `userfaultfd()` injected, `pidfd_getfd`, the stub's
/// copy closed again.
fn stub_uffd(
    leader: Pid,
    call: &dyn Fn(Call) -> Result<u64, SysError>,
    features: u64,
) -> Result<(Uffd, OwnedFd), RestoreError> {
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
    let (f, pidfd) = got?;
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
    mut lazy: Option<(LazyLink, PagerOptions)>,
) -> Result<(Restored, Option<Pager>), RestoreError> {
    let (mut rd, meta) = ImageReader::open(r)?;
    if meta.header.flags & FLAG_LAZY != 0 && lazy.is_none() {
        return Err(RestoreError::LazyImage);
    }
    check_kernel(&meta)?;
    let (mut stub, ctl) = spawn(&meta, &stdio)?;
    drop(stdio);
    let leader = stub.pid;
    ptrace::setoptions(
        leader,
        ptrace::Options::PTRACE_O_EXITKILL | ptrace::Options::PTRACE_O_TRACECLONE,
    )
    .map_err(ptrace_err("PTRACE_SETOPTIONS", leader))?;
    let base = ptrace::getregs(leader).map_err(ptrace_err("PTRACE_GETREGS", leader))?;
    let call_in = |tid: Pid, c: Call| -> Result<u64, SysError> {
        inject(tid, ctl, &base, &c)?.check(&c, tid)
    };
    let call = |c: Call| call_in(leader, c);

    // 1. Empty the stub: its inherited rseq area goes away with its memory.
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

    // 2. The kernel's own mappings where the image had them.
    if let Some(first) = meta.mappings.iter().find(|m| m.kind.is_special()) {
        call(Call::new(
            "arch_prctl(ARCH_MAP_VDSO_64)",
            libc::SYS_arch_prctl,
            &[ARCH_MAP_VDSO_64, first.start],
        ))?;
        let now = ProcDir::new(Path::new("/proc"), leader.as_raw())
            .maps()
            .map_err(local("stub maps"))?;
        let got: Vec<(MappingKind, u64, u64)> = now
            .iter()
            .filter_map(to_mapping)
            .filter(|m| m.kind.is_special())
            .map(|m| (m.kind, m.start, m.end))
            .collect();
        let want: Vec<(MappingKind, u64, u64)> = meta
            .mappings
            .iter()
            .filter(|m| m.kind.is_special())
            .map(|m| (m.kind, m.start, m.end))
            .collect();
        if got != want {
            return Err(RestoreError::Layout(format!(
                "asked for {want:x?}, the kernel mapped {got:x?}"
            )));
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

    // 3. Every other mapping, writable until its content is in.
    for m in meta.mappings.iter().filter(|m| !m.kind.is_special()) {
        let prot = if m.prot == 0 {
            libc::PROT_NONE
        } else {
            libc::PROT_READ | libc::PROT_WRITE
        };
        let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED;
        if m.flags & MAPF_GROWSDOWN != 0 {
            flags |= libc::MAP_GROWSDOWN;
        }
        let got = call(Call::new(
            "mmap",
            libc::SYS_mmap,
            &[m.start, m.len(), prot as u64, flags as u64, u64::MAX, 0],
        ))?;
        if got != m.start {
            return Err(RestoreError::Layout(format!(
                "mmap of {:#x}-{:#x} landed at {got:#x}",
                m.start, m.end
            )));
        }
        if let (Some((u, _)), true) = (&uffd, carried(m)) {
            u.register_missing(m.start, m.len())
                .map_err(|source| RestoreError::Uffd {
                    what: "UFFDIO_REGISTER",
                    pid: leader.as_raw(),
                    source,
                })?;
        }
        if let Some(advice) = thp_advice(m) {
            // Best effort: a kernel without THP refuses, which is harmless.
            let _ = call(Call::new(
                "madvise",
                libc::SYS_madvise,
                &[m.start, m.len(), advice as u64],
            ));
        }
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
    let rest = finish(&mut stub, &meta, ctl, &base, &call);
    let tids = match rest {
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
    if let Some(p) = &pager {
        p.set_running();
    }
    Ok((
        Restored {
            pid: leader.as_raw(),
            threads: tids.iter().map(|t| t.as_raw()).collect(),
            stats,
        },
        pager,
    ))
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

/// Steps 4b-8: protections, process and thread state, registers, detach.
/// Returns the tids (leader first); the stub is disarmed on success.
fn finish(
    stub: &mut Stub,
    meta: &ImageMeta,
    ctl: u64,
    base: &libc::user_regs_struct,
    call: &dyn Fn(Call) -> Result<u64, SysError>,
) -> Result<Vec<Pid>, RestoreError> {
    let leader = stub.pid;
    let base = *base;
    let scratch = ctl + CTL_SCRATCH;
    for m in meta.mappings.iter().filter(|m| !m.kind.is_special()) {
        if m.prot != 0 && m.prot != PROT_R | PROT_W {
            call(Call::new(
                "mprotect",
                libc::SYS_mprotect,
                &[m.start, m.len(), u64::from(m.prot)],
            ))?;
        }
    }

    // 5. Process-wide kernel state.
    set_mm(leader, ctl, meta, call)?;
    for a in &meta.process.sigactions {
        let mut b = [0u8; 32];
        for (i, w) in [a.handler, a.flags, a.restorer, a.mask].iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        poke(leader, scratch, &b)?;
        call(Call::new(
            "rt_sigaction",
            libc::SYS_rt_sigaction,
            &[u64::from(a.signo), scratch, 0, 8],
        ))?;
    }

    // 6. The other threads, each stopped at birth.
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
        let c = Call::new(
            "clone",
            libc::SYS_clone,
            &[flags, 0, 0, t.clear_child_tid, 0],
        );
        let out = inject(leader, ctl, &base, &c)?;
        out.check(&c, leader)?;
        let new = out.cloned.ok_or(SysError::Stop {
            tid: leader.as_raw(),
            status: "no PTRACE_EVENT_CLONE".into(),
            wanted: "clone",
        })?;
        stub.tids.push(new);
        tids.push(new);
        match wait(new, "the new thread's first stop")? {
            WaitStatus::Stopped(_, Signal::SIGSTOP) => {}
            WaitStatus::PtraceEvent(_, _, ev) if ev == libc::PTRACE_EVENT_STOP => {}
            other => {
                return Err(SysError::Stop {
                    tid: new.as_raw(),
                    status: format!("{other:?}"),
                    wanted: "the new thread's first stop",
                }
                .into())
            }
        }
    }

    // 7. Per-thread kernel state, injected in each thread itself.
    for (i, (t, &tid)) in meta.threads.iter().zip(&tids).enumerate() {
        thread_state(leader, tid, i == 0, t, ctl, &base, meta)?;
    }
    // glibc caches each thread's tid at its clear_child_tid address: point
    // it at the new tid so pthread_kill & co. reach the right thread.
    for (t, &tid) in meta.threads.iter().zip(&tids) {
        if t.clear_child_tid == 0 {
            continue;
        }
        let mut b = [0u8; 4];
        if read_remote(leader, t.clear_child_tid, &mut b).is_ok() && u32::from_le_bytes(b) == t.tid
        {
            poke(
                leader,
                t.clear_child_tid,
                &(tid.as_raw() as u32).to_le_bytes(),
            )?;
        }
    }

    // Interval timers last, with what they had left at the freeze: their
    // time runs from here. (Every signal is blocked until the registers
    // below: an early SIGALRM waits, pending.)
    for (which, t) in &meta.process.itimers {
        let mut b = [0u8; 32];
        for (i, w) in t.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        poke(leader, scratch, &b)?;
        call(Call::new(
            "setitimer",
            libc::SYS_setitimer,
            &[u64::from(*which), scratch, 0],
        ))?;
    }

    // 8. Last injection: the control page goes. Then the registers.
    call(Call::new("munmap", libc::SYS_munmap, &[ctl, PAGE]))?;
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
    for &tid in &tids {
        ptrace::detach(tid, None).map_err(ptrace_err("PTRACE_DETACH", tid))?;
    }
    stub.armed = false;
    Ok(tids)
}

fn poke(pid: Pid, addr: u64, b: &[u8]) -> Result<(), SysError> {
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
fn set_mm(
    leader: Pid,
    ctl: u64,
    meta: &ImageMeta,
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
    s.extend_from_slice(&u32::MAX.to_le_bytes()); // exe_fd: keep
    poke(leader, ctl + CTL_AUXV, &auxv)?;
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
}

fn thread_state(
    leader: Pid,
    tid: Pid,
    is_leader: bool,
    t: &ThreadState,
    ctl: u64,
    base: &libc::user_regs_struct,
    meta: &ImageMeta,
) -> Result<(), SysError> {
    let scratch = ctl + CTL_SCRATCH;
    let call = |c: Call| -> Result<u64, SysError> { inject(tid, ctl, base, &c)?.check(&c, tid) };
    if is_leader {
        // Also drops the stub's inherited clear_child_tid, which points into
        // memory that is gone.
        call(Call::new(
            "set_tid_address",
            libc::SYS_set_tid_address,
            &[t.clear_child_tid],
        ))?;
    }
    if t.rseq.abi_pointer != 0 {
        call(Call::new(
            "rseq",
            libc::SYS_rseq,
            &[
                t.rseq.abi_pointer,
                u64::from(t.rseq.abi_size),
                0,
                u64::from(t.rseq.signature),
            ],
        ))?;
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
    call(Call::new(
        "sigaltstack",
        libc::SYS_sigaltstack,
        &[scratch, 0],
    ))?;
    call(Call::new(
        "set_robust_list",
        libc::SYS_set_robust_list,
        &[t.robust_list, 24],
    ))?;
    poke(leader, scratch, &t.comm)?;
    call(Call::new(
        "prctl(PR_SET_NAME)",
        libc::SYS_prctl,
        &[PR_SET_NAME, scratch],
    ))?;
    let pid = leader.as_raw() as u64;
    for si in &t.pending {
        poke(leader, scratch, &si.0)?;
        call(Call::new(
            "rt_tgsigqueueinfo",
            libc::SYS_rt_tgsigqueueinfo,
            &[pid, tid.as_raw() as u64, si.signo() as u64, scratch],
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
