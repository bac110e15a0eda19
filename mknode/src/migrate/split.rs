//! Splitting a process across kernels: one of its threads leaves for another
//! kernel while the others run on, and all keep one address space (thread
//! migration; Popcorn Linux's distributed threads).
//!
//! - [`leave`] (the origin): the first time a thread leaves, every private
//!   writable mapping of the process becomes DSM memory homed on this
//!   kernel. Under freeze each is replaced by a `MAP_SHARED` mapping of a
//!   memfd created in the process (an injected `memfd_create`, taken with
//!   `pidfd_getfd`), its content goes into the region's home memory, and a
//!   userfaultfd created in the process the same way goes to the DSM engine,
//!   which from then on serves its faults as it does for `mkdsm_map()`
//!   regions ([`Share`] is the engine as seen from here). The leaving
//!   thread's state goes into a *shadow image*: that thread only, every DSM
//!   mapping flagged `MAPF_DSM` and named by its region, the pages of the
//!   other (read-only) mappings carried. The thread itself stays, parked:
//!   every signal blocked, looping on `pause()` in a page mapped for it.
//! - `restore_shadow` (the destination, in `restore`): the shadow image
//!   becomes a one-thread process whose DSM mappings are the destination
//!   kernel's copies of the same regions.
//! - [`depart`] (the destination): the shadow thread's state, as an image
//!   without pages; the shadow process ends.
//! - [`arrive`] (the origin): that state is loaded into the parked thread,
//!   which runs on where the shadow stopped.
//!
//! Memory is named after the region it is: this kernel's memfds are called
//! `mkdsm-<region>-copy`, so `/proc/<pid>/maps` tells which mapping is which
//! region (see [`region_of`]). The first `leave` also installs a seccomp
//! filter sending the process's `futex` calls to its agent (and
//! `restore_shadow` the same in each shadow): see `agent/threads/futex.rs`.
//! Limits: a mapping created, moved, resized or re-protected after the
//! split is not shared (nor are `brk` and a main stack growing down: the
//! split stack no longer grows).

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;

use nix::sys::ptrace;
use nix::unistd::Pid;

use super::capture::{below_stack, freeze_for_split, CaptureError, Frozen, ImageOptions};
use super::image::{
    ImageError, ImageMeta, ImageReader, Mapping, ThreadState, MAPF_DSM, PAGE, PROT_W,
};
use super::inject::{inject, ptrace_err, wait, Call};
use super::memory::{read_pages, write_remote};
use super::{sys, SysError};
use crate::dsm::DsmError;
use crate::uffd;

/// The DSM as the split sees it (an agent's engine and registry).
pub trait Share {
    /// Creates region `name` of `size` bytes homed on this kernel: `copy` is
    /// the memfd the process maps (its pages fault in), `memory` holds the
    /// content. Returns the region's id.
    fn adopt(&self, name: &str, size: u64, copy: File, memory: File) -> Result<u32, DsmError>;
    /// Region `name` of `size` bytes on this kernel: its id and this
    /// kernel's copy, for a process to map.
    fn open(&self, name: &str, size: u64) -> Result<(u32, OwnedFd), DsmError>;
    /// Process `pid` maps `region` at `[addr, addr + len)` and hands over
    /// its userfaultfd for it.
    fn attach(
        &self,
        region: u32,
        addr: u64,
        len: u64,
        uffd: OwnedFd,
        pid: i32,
    ) -> Result<(), DsmError>;
}

/// Why a split step failed. The process runs on, whole: a thread that could
/// not leave runs where it was.
#[derive(Debug, thiserror::Error)]
pub enum SplitError {
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error("reading the thread's state")]
    Image(#[from] ImageError),
    #[error("{tid} is not a thread of process {pid}")]
    NoThread { pid: i32, tid: i32 },
    #[error("no seccomp listener came out of the filter's installation")]
    NoListener,
    #[error("thread {tid} of {pid} does not wait for its move's answer yet")]
    NotWaiting { pid: i32, tid: i32 },
    #[error("thread {tid} of {pid} is not parked here (it runs at {rip:#x})")]
    NotParked { pid: i32, tid: i32, rip: u64 },
    #[error("the DSM")]
    Dsm(#[from] DsmError),
    #[error("thread {tid}")]
    Registers {
        tid: u32,
        #[source]
        source: super::cpu::XstateError,
    },
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error("{what}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// The name of the region a process's mapping at `start` becomes, on the
/// kernel `node` where the process `pid` began.
pub fn region_name(node: u16, pid: i32, start: u64) -> String {
    format!("{}{start:x}", region_prefix(node, pid))
}

/// What the names of every region of process `pid` of kernel `node`
/// begin with (see [`region_name`]).
pub fn region_prefix(node: u16, pid: i32) -> String {
    format!("p{node}.{pid}.")
}

/// The region a mapping is, from its name in `/proc/<pid>/maps`
/// (`/memfd:mkdsm-<region>-copy (deleted)`), if it is DSM memory.
pub fn region_of(maps_name: &str) -> Option<&str> {
    let n = maps_name.strip_prefix("/memfd:mkdsm-")?;
    let n = n.strip_suffix(" (deleted)").unwrap_or(n);
    n.strip_suffix("-copy")
}

/// `pause(); goto pause;`: where a parked thread loops.
const PARK_CODE: [u8; 9] = [0xb8, 0x22, 0, 0, 0, 0x0f, 0x05, 0xeb, 0xf7];

/// A thread that moves itself (`mk_migrate()`) has sent its request to its
/// agent and waits in `read(fd, buf, REPLY_LEN)` on that connection. Its
/// move completes that read where it arrives: the read returns
/// [`REPLY_LEN`] bytes, [`reply`]'s, written there by the agent that took
/// it in, which also gave it a connection of its own (its new `fd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SelfMove {
    pub fd: i32,
    pub buf: u64,
}

/// Where a thread that moved itself gets its answer (see [`SelfMove`]):
/// it is connected to the agent socket at `path` of the kernel it runs on,
/// `kernel`, and finds at `buf` the answer [`reply`] makes of `status`
/// (0: moved), that kernel and its new connection.
#[derive(Debug, Clone, Copy)]
pub struct Answer<'a> {
    pub path: &'a Path,
    pub kernel: u16,
    pub buf: u64,
    pub status: i32,
}

impl SelfMove {
    /// As the agents' messages carry it: `buf` 0 is a move from outside.
    pub fn from_wire(fd: i32, buf: u64) -> Option<SelfMove> {
        (buf != 0).then_some(SelfMove { fd, buf })
    }
}

/// Bytes of the answer to a self-move.
pub const REPLY_LEN: usize = 16;

/// The answer a thread finds when its self-move is done (or failed):
/// `status` (0, or a negative errno), the kernel it runs on, the
/// descriptor of its connection to that kernel's agent (-1: none).
pub fn reply(status: i32, kernel: u16, fd: i32) -> [u8; REPLY_LEN] {
    let mut b = [0u8; REPLY_LEN];
    b[..4].copy_from_slice(&status.to_le_bytes());
    b[4..8].copy_from_slice(&i32::from(kernel).to_le_bytes());
    b[8..12].copy_from_slice(&fd.to_le_bytes());
    b
}

/// Whether the thread in state `st` waits in the read of `m`.
fn waits_in_read(st: &ThreadState, m: &SelfMove) -> bool {
    let r = sys::words_to_regs(&st.regs);
    r.orig_rax == libc::SYS_read as u64 && r.rdi as i32 == m.fd && r.rsi == m.buf
}

/// Makes the thread's pending read return [`REPLY_LEN`] when it runs.
fn complete_read(st: &mut ThreadState) {
    let mut r = sys::words_to_regs(&st.regs);
    r.rax = REPLY_LEN as u64;
    r.orig_rax = u64::MAX;
    st.regs = sys::regs_to_words(&r);
}

/// Connects the stopped process (through injected calls, `scratch`: 128
/// dead bytes of it) to the agent socket at `path`; returns its descriptor.
pub(crate) fn connect_agent(
    call: &dyn Fn(Call) -> Result<u64, SysError>,
    pid: i32,
    scratch: u64,
    path: &Path,
) -> Result<i32, SysError> {
    let p = path.as_os_str().as_bytes();
    let mut addr = Vec::with_capacity(3 + p.len());
    addr.extend_from_slice(&(libc::AF_UNIX as u16).to_le_bytes());
    addr.extend_from_slice(p);
    addr.push(0);
    if addr.len() > 110 {
        return Err(SysError::Mem {
            what: "the agent's socket path",
            pid: 0,
            source: io::Error::other(format!("{} is too long", path.display())),
        });
    }
    let fd = call(Call::new(
        "socket",
        libc::SYS_socket,
        &[
            libc::AF_UNIX as u64,
            (libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC) as u64,
            0,
        ],
    ))?;
    let r = poke(pid, scratch, &addr).and_then(|()| {
        call(Call::new(
            "connect",
            libc::SYS_connect,
            &[fd, scratch, addr.len() as u64],
        ))
    });
    if let Err(e) = r {
        let _ = call(Call::new("close", libc::SYS_close, &[fd]));
        return Err(e);
    }
    Ok(fd as i32)
}

/// Installs the filter of a split process (a `shadow`'s if `shadow`; see
/// [`super::filter`]) in every thread of the stopped process `pid` (`no_new_privs` first: the filter
/// needs it without `CAP_SYS_ADMIN`) and takes its listener out of it.
/// `scratch`: 128 dead bytes of it.
pub(crate) fn install_futex_listener(
    call: &dyn Fn(Call) -> Result<u64, SysError>,
    pid: i32,
    scratch: u64,
    shadow: bool,
) -> Result<OwnedFd, SplitError> {
    const PR_SET_NO_NEW_PRIVS: u64 = 38;
    const SECCOMP_SET_MODE_FILTER: u64 = 1;
    // TSYNC | NEW_LISTENER | TSYNC_ESRCH (the two first need the third).
    const FLAGS: u64 = 1 | 8 | 16;
    call(Call::new(
        "prctl(PR_SET_NO_NEW_PRIVS)",
        libc::SYS_prctl,
        &[PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0],
    ))?;
    let filter = super::filter::program(shadow);
    let mut b = Vec::with_capacity(16 + 8 * filter.len());
    b.extend_from_slice(&(filter.len() as u16).to_le_bytes());
    b.extend_from_slice(&[0u8; 6]);
    b.extend_from_slice(&(scratch + 16).to_le_bytes());
    for &(code, jt, jf, k) in &filter {
        b.extend_from_slice(&code.to_le_bytes());
        b.push(jt);
        b.push(jf);
        b.extend_from_slice(&k.to_le_bytes());
    }
    poke(pid, scratch, &b)?;
    let fd = call(Call::new(
        "seccomp(SECCOMP_SET_MODE_FILTER)",
        libc::SYS_seccomp,
        &[SECCOMP_SET_MODE_FILTER, FLAGS, scratch],
    ))?;
    let pidfd = uffd::pidfd_open(Pid::from_raw(pid)).map_err(|e| SplitError::Io {
        what: "pidfd_open",
        source: e.into(),
    });
    let got = pidfd.and_then(|p| {
        uffd::pidfd_getfd(&p, fd as i32).map_err(|e| SplitError::Io {
            what: "pidfd_getfd of the seccomp listener",
            source: e.into(),
        })
    });
    call(Call::new("close", libc::SYS_close, &[fd]))?;
    got
}

/// What [`leave`] made.
#[derive(Debug)]
pub struct Left {
    /// The shadow image, for `restore_shadow` on the destination.
    pub image: Vec<u8>,
    /// The page the thread is parked in (pass it to the next `leave` and
    /// to [`arrive`]).
    pub park: u64,
    /// Regions made of the process's memory by this call.
    pub new_regions: Vec<String>,
    /// The seccomp listener of the process's futex calls, installed by the
    /// first `leave` (then `None`).
    pub futex_listener: Option<OwnedFd>,
}

/// Takes thread `tid` of process `pid` (on this kernel, `node`) out: makes
/// the process's private memory DSM memory if not done yet, writes the
/// shadow image, parks the thread. `park`: the page an earlier `leave`
/// returned, if any.
pub fn leave(
    pid: i32,
    tid: i32,
    node: u16,
    park: Option<u64>,
    share: &dyn Share,
    self_move: Option<SelfMove>,
) -> Result<Left, SplitError> {
    let f = freeze_for_split(pid)?;
    let Some(state) = f.meta().threads.iter().find(|t| t.tid == tid as u32) else {
        return Err(SplitError::NoThread { pid, tid });
    };
    let mut state = state.clone();
    if let Some(m) = &self_move {
        if !waits_in_read(&state, m) {
            return Err(SplitError::NotWaiting { pid, tid });
        }
    }
    let t = Pid::from_raw(tid);
    let insn = f.syscall_insn()?;
    let base = sys::words_to_regs(&state.regs);
    // Injected calls run with every signal blocked; the thread keeps that
    // mask while parked.
    sys::set_sigmask(t, !0).map_err(ptrace_err("PTRACE_SETSIGMASK", t))?;
    let call = |c: Call| -> Result<u64, SysError> { inject(t, insn, &base, &c)?.check(&c, t) };
    let mut new_regions = Vec::new();
    let split = share_memory(&f, node, &call, share, &mut new_regions).and_then(|()| {
        if park.is_some() {
            return Ok(None);
        }
        let at = below_stack(&f.meta().threads, &f.meta().mappings).ok_or(SplitError::Io {
            what: "finding room for the filter",
            source: io::Error::other("no thread's stack pointer lies in writable memory"),
        })?;
        install_futex_listener(&call, pid, at, false).map(Some)
    });
    // Whatever happened, the thread's registers go back before anything
    // else can fail: on error the process resumes as it was.
    let put_back = ptrace::setregs(t, base).map_err(ptrace_err("PTRACE_SETREGS", t));
    let put_mask = sys::set_sigmask(t, state.sigmask).map_err(ptrace_err("PTRACE_SETSIGMASK", t));
    let futex_listener = split?;
    put_back?;
    put_mask?;

    if self_move.is_some() {
        complete_read(&mut state);
    }
    let image = shadow_image(&f, state)?;

    // Park it (closing the connection it asked through: it gets another
    // where it arrives).
    sys::set_sigmask(t, !0).map_err(ptrace_err("PTRACE_SETSIGMASK", t))?;
    if let Some(m) = &self_move {
        call(Call::new("close", libc::SYS_close, &[m.fd as u64]))?;
    }
    let park = match park {
        Some(p) => p,
        None => {
            let rwx = (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64;
            let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
            let p = call(Call::new(
                "mmap",
                libc::SYS_mmap,
                &[0, PAGE, rwx, flags, u64::MAX, 0],
            ))?;
            poke(pid, p, &PARK_CODE)?;
            p
        }
    };
    let mut r = base;
    r.rip = park;
    r.rax = 0;
    r.orig_rax = u64::MAX;
    ptrace::setregs(t, r).map_err(ptrace_err("PTRACE_SETREGS", t))?;
    drop(f);
    Ok(Left {
        image,
        park,
        new_regions,
        futex_listener,
    })
}

/// The shadow image of frozen `f` for thread state `st`: that thread, the
/// memory as it is now.
fn shadow_image(f: &Frozen, mut st: ThreadState) -> Result<Vec<u8>, SplitError> {
    let pid = f.pid();
    let mut meta: ImageMeta = f.meta().clone();
    // The thread's exit is the origin's to report (its parked twin exits
    // then, and the kernel clears and wakes the tid word there).
    st.clear_child_tid = 0;
    // The thread leads its shadow.
    meta.process.pid = st.tid;
    meta.threads = vec![st];
    meta.process.itimers.clear();
    let now = super::procfs::ProcDir::new(Path::new("/proc"), pid)
        .maps()
        .map_err(io_err("reading the process's maps"))?;
    for m in &mut meta.mappings {
        if let Some(e) = now.iter().find(|e| e.start == m.start && e.end == m.end) {
            if let Some(r) = region_of(&e.name) {
                m.flags |= MAPF_DSM;
                m.name = r.to_string();
            }
        }
    }
    let ranges: Vec<(u64, u64)> = meta
        .mappings
        .iter()
        .filter(|m| super::lazy::carried(m))
        .map(|m| (m.start, m.end))
        .collect();
    let mut image = Vec::new();
    f.write_meta(
        &mut image,
        ImageOptions::default(),
        &meta,
        &ranges,
        false,
        false,
    )?;
    Ok(image)
}

/// A new shadow image for thread `tid` of split process `pid`, whose
/// parked twin stays parked, from the state in `thread_image` (what
/// [`depart`] gave back elsewhere): a thread moving from one destination to
/// another.
pub fn reshadow(pid: i32, tid: i32, thread_image: &[u8]) -> Result<Vec<u8>, SplitError> {
    let (_, meta) = ImageReader::open(thread_image)?;
    let origin = meta.process.xfeatures;
    let Some(mut st) = meta.threads.into_iter().next() else {
        return Err(SplitError::NoThread { pid, tid });
    };
    // From the kernel it ran on, laid out for this CPU, whose layout the
    // shadow image says.
    st.fp = fp_here(&st, origin)?;
    let f = freeze_for_split(pid)?;
    if !f.threads().contains(&tid) {
        return Err(SplitError::NoThread { pid, tid });
    }
    shadow_image(
        &f,
        ThreadState {
            tid: tid as u32,
            ..st
        },
    )
}

pub(crate) fn poke(pid: i32, addr: u64, b: &[u8]) -> Result<(), SysError> {
    match write_remote(Pid::from_raw(pid), addr, b) {
        Ok(n) if n == b.len() => Ok(()),
        r => Err(SysError::Mem {
            what: "writing into the process",
            pid,
            source: match r {
                Err(e) => e.into(),
                Ok(n) => io::Error::other(format!("short write {n}/{}", b.len())),
            },
        }),
    }
}

/// Makes each private writable mapping of the frozen process DSM memory.
fn share_memory(
    f: &Frozen,
    node: u16,
    call: &dyn Fn(Call) -> Result<u64, SysError>,
    share: &dyn Share,
    made: &mut Vec<String>,
) -> Result<(), SplitError> {
    let pid = f.pid();
    let pidfd = uffd::pidfd_open(Pid::from_raw(pid)).map_err(|e| SplitError::Io {
        what: "pidfd_open",
        source: e.into(),
    })?;
    let now = super::procfs::ProcDir::new(Path::new("/proc"), pid)
        .maps()
        .map_err(io_err("reading the process's maps"))?;
    for m in &f.meta().mappings {
        let already = now
            .iter()
            .any(|e| e.start == m.start && region_of(&e.name).is_some());
        if m.prot & PROT_W == 0 || m.kind.is_special() || already {
            continue;
        }
        let name = region_name(node, pid, m.start);
        share_one(f, m, &name, &pidfd, call, share)?;
        made.push(name);
    }
    Ok(())
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> SplitError {
    move |source| SplitError::Io { what, source }
}

/// One mapping: content into the home memory, the process's memfd over the
/// old memory, the userfaultfd to the engine.
fn share_one(
    f: &Frozen,
    m: &Mapping,
    name: &str,
    pidfd: &OwnedFd,
    call: &dyn Fn(Call) -> Result<u64, SysError>,
    share: &dyn Share,
) -> Result<(), SplitError> {
    let pid = f.pid();
    let len = m.len();
    // 1. The content, sparse (holes read as zeros).
    let memory = File::from(
        nix::sys::memfd::memfd_create(
            format!("mkdsm-{name}-memory").as_str(),
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )
        .map_err(|e| SplitError::Io {
            what: "memfd_create",
            source: e.into(),
        })?,
    );
    memory
        .set_len(len)
        .map_err(io_err("sizing the home memory"))?;
    let mut mem = None;
    let mut buf = vec![0u8; (2 << 20).min(len as usize)];
    let mut addr = m.start;
    while addr < m.end {
        let n = ((m.end - addr) as usize).min(buf.len());
        let chunk = &mut buf[..n];
        read_pages(Pid::from_raw(pid), &mut mem, m, addr, chunk)
            .map_err(io_err("reading the process's memory"))?;
        for (i, page) in chunk.chunks(PAGE as usize).enumerate() {
            if page.iter().any(|&b| b != 0) {
                memory
                    .write_all_at(page, addr - m.start + (i as u64) * PAGE)
                    .map_err(io_err("filling the home memory"))?;
            }
        }
        addr += n as u64;
    }
    // 2. The process's own memfd, named after the region.
    let label = format!("mkdsm-{name}-copy\0");
    let at = below_stack(&f.meta().threads, &f.meta().mappings).ok_or(SplitError::Io {
        what: "finding room for the memfd's name",
        source: io::Error::other("no thread's stack pointer lies in writable memory"),
    })?;
    poke(pid, at, label.as_bytes())?;
    let fd = call(Call::new(
        "memfd_create",
        libc::SYS_memfd_create,
        &[at, libc::MFD_CLOEXEC as u64],
    ))?;
    let got = uffd::pidfd_getfd(pidfd, fd as i32);
    let copy = match got {
        Ok(c) => File::from(c),
        Err(e) => {
            let _ = call(Call::new("close", libc::SYS_close, &[fd]));
            return Err(SplitError::Io {
                what: "pidfd_getfd",
                source: e.into(),
            });
        }
    };
    copy.set_len(len).map_err(io_err("sizing the memfd"))?;
    let keep = copy.try_clone().map_err(io_err("dup"))?;
    // 3. The region.
    let region = match share.adopt(name, len, copy, memory.try_clone().map_err(io_err("dup"))?) {
        Ok(r) => r,
        Err(e) => {
            let _ = call(Call::new("close", libc::SYS_close, &[fd]));
            return Err(e.into());
        }
    };
    // 4. Over the old memory. From here until the engine has the
    //    userfaultfd, the mapping reads as the (empty) memfd: on failure its
    //    content goes into it directly, so the process loses nothing.
    let mapped = call(Call::new(
        "mmap",
        libc::SYS_mmap,
        &[
            m.start,
            len,
            u64::from(m.prot),
            (libc::MAP_SHARED | libc::MAP_FIXED) as u64,
            fd,
            0,
        ],
    ));
    let _ = call(Call::new("close", libc::SYS_close, &[fd]));
    mapped?;
    let attached = (|| -> Result<(), SplitError> {
        let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
        let u = call(Call::new("userfaultfd", libc::SYS_userfaultfd, &[flags]))?;
        let got = uffd::pidfd_getfd(pidfd, u as i32);
        let _ = call(Call::new("close", libc::SYS_close, &[u]));
        let got = got.map_err(|e| SplitError::Io {
            what: "pidfd_getfd",
            source: e.into(),
        })?;
        share
            .attach(region, m.start, len, got, pid)
            .map_err(SplitError::from)
    })();
    if let Err(e) = attached {
        copy_file(&memory, &keep, len).map_err(io_err("putting the content back"))?;
        return Err(e);
    }
    Ok(())
}

fn copy_file(from: &File, to: &File, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        from.read_exact_at(&mut buf[..n], off)?;
        to.write_all_at(&buf[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

/// The shadow `pid` on this kernel gives its thread back: its state as an
/// image without pages (for [`arrive`] on the origin), and the shadow ends.
pub fn depart(pid: i32, self_move: Option<SelfMove>) -> Result<Vec<u8>, SplitError> {
    let f = freeze_for_split(pid)?;
    let mut image = Vec::new();
    // The thread is all the origin needs (and keeps the answer small).
    let mut meta = f.meta().clone();
    if let (Some(m), Some(st)) = (&self_move, meta.threads.first_mut()) {
        if !waits_in_read(st, m) {
            return Err(SplitError::NotWaiting {
                pid,
                tid: st.tid as i32,
            });
        }
        complete_read(st);
    }
    // (An image needs a mapping: the kernel's own ones, a few lines. The
    // files stay: stdio that is a file must be listed among them.)
    meta.mappings.retain(|m| m.kind.is_special());
    f.write_meta(
        &mut image,
        ImageOptions::default(),
        &meta,
        &[],
        false,
        false,
    )?;
    f.kill();
    Ok(image)
}

/// Thread `tid` of `pid`, parked at `park`, takes the state in `image` (from
/// [`depart`], or the shadow image of a move that failed) and runs on from
/// there.
///
/// `answer`: the thread moved itself, or tried to, and waits for the
/// answer (the image's registers complete its read).
pub fn arrive(
    pid: i32,
    tid: i32,
    park: u64,
    image: &[u8],
    answer: Option<Answer<'_>>,
) -> Result<(), SplitError> {
    let (_, meta) = ImageReader::open(image)?;
    let Some(st) = meta.threads.first() else {
        return Err(SplitError::NoThread { pid, tid });
    };
    // The shadow ran on another CPU, perhaps of another XSAVE layout.
    let fp = fp_here(st, meta.process.xfeatures)?;
    with_parked(pid, tid, park, |t| {
        if let Some(a) = answer {
            let now = ptrace::getregs(t).map_err(ptrace_err("PTRACE_GETREGS", t))?;
            let rsp = now.rsp.min(sys::words_to_regs(&st.regs).rsp);
            let scratch = (rsp - 512) & !15;
            let call =
                |c: Call| -> Result<u64, SysError> { inject(t, park + 5, &now, &c)?.check(&c, t) };
            let fd = connect_agent(&call, pid, scratch, a.path)?;
            poke(pid, a.buf, &reply(a.status, a.kernel, fd))?;
        }
        let nt = match st.fp_kind {
            super::image::FpKind::Xstate => sys::NT_X86_XSTATE,
            super::image::FpKind::Fxsave => sys::NT_PRFPREG,
        };
        sys::setregset(t, nt, &fp).map_err(ptrace_err("PTRACE_SETREGSET", t))?;
        ptrace::setregs(t, super::restore::resume_regs(sys::words_to_regs(&st.regs)))
            .map_err(ptrace_err("PTRACE_SETREGS", t))?;
        sys::set_sigmask(t, st.sigmask).map_err(ptrace_err("PTRACE_SETSIGMASK", t))?;
        Ok(())
    })
}

/// [`super::cpu::fp_here`], its failure a [`SplitError`].
fn fp_here(st: &ThreadState, origin: u64) -> Result<Vec<u8>, SplitError> {
    super::cpu::fp_here(st, origin).map_err(|source| SplitError::Registers {
        tid: st.tid,
        source,
    })
}

/// Thread `tid` of `pid`, parked at `park`, ends with `exit(code)` (its
/// shadow ended): the kernel clears its tid word and wakes its joiner here.
/// `group`: with `exit_group(code)`, the whole process (its shadow called
/// it).
pub fn end_parked(pid: i32, tid: i32, park: u64, code: i32, group: bool) -> Result<(), SplitError> {
    with_parked(pid, tid, park, |t| {
        let mut r = ptrace::getregs(t).map_err(ptrace_err("PTRACE_GETREGS", t))?;
        // The park loop's `syscall`, with exit's number.
        r.rip = park + 5;
        r.rax = if group {
            libc::SYS_exit_group
        } else {
            libc::SYS_exit
        } as u64;
        r.orig_rax = u64::MAX;
        r.rdi = code as u64;
        ptrace::setregs(t, r).map_err(ptrace_err("PTRACE_SETREGS", t))?;
        Ok(())
    })
}

/// Stops parked thread `tid` alone (its siblings run on), checks it is
/// parked at `park`, runs `f` on it and lets it go.
fn with_parked(
    pid: i32,
    tid: i32,
    park: u64,
    f: impl FnOnce(Pid) -> Result<(), SplitError>,
) -> Result<(), SplitError> {
    let t = Pid::from_raw(tid);
    ptrace::seize(t, ptrace::Options::empty()).map_err(ptrace_err("PTRACE_SEIZE", t))?;
    let r = (|| -> Result<(), SplitError> {
        ptrace::interrupt(t).map_err(ptrace_err("PTRACE_INTERRUPT", t))?;
        loop {
            match wait(t, "the interrupt stop")? {
                nix::sys::wait::WaitStatus::PtraceEvent(_, _, ev)
                    if ev == libc::PTRACE_EVENT_STOP =>
                {
                    break
                }
                // Blocked signals cannot stop it; SIGKILL ends it.
                _ => ptrace::cont(t, None).map_err(ptrace_err("PTRACE_CONT", t))?,
            }
        }
        let now = ptrace::getregs(t).map_err(ptrace_err("PTRACE_GETREGS", t))?;
        if !(park..park + PAGE).contains(&now.rip) {
            return Err(SplitError::NotParked {
                pid,
                tid,
                rip: now.rip,
            });
        }
        f(t)
    })();
    let _ = ptrace::detach(t, None);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_names_come_back_from_maps() {
        let n = region_name(3, 4242, 0x7f00_1234_5000);
        assert_eq!(n, "p3.4242.7f0012345000");
        let maps = format!("/memfd:mkdsm-{n}-copy (deleted)");
        assert_eq!(region_of(&maps), Some(n.as_str()));
        assert_eq!(region_of("/memfd:mkdsm-counters-copy"), Some("counters"));
        assert_eq!(region_of("/memfd:other (deleted)"), None);
        assert_eq!(region_of("[heap]"), None);
        assert_eq!(region_of("/memfd:mkdsm-x-memory (deleted)"), None);
    }

    #[test]
    fn the_park_loop_jumps_back_to_its_start() {
        // mov eax, 34 (pause); syscall; jmp rel8 back over all 9 bytes.
        assert_eq!(PARK_CODE[0], 0xb8);
        assert_eq!(u32::from_le_bytes(PARK_CODE[1..5].try_into().unwrap()), 34);
        assert_eq!(&PARK_CODE[5..7], &[0x0f, 0x05]);
        assert_eq!(PARK_CODE[7], 0xeb);
        assert_eq!(PARK_CODE[8] as i8 as i64, -(PARK_CODE.len() as i64));
    }
}
