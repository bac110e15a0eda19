//! Process trees (`--tree`): a process with all its descendants, frozen,
//! written and rebuilt together, with their pids, parents, process groups,
//! sessions, zombies and the open files fork left shared between them.
//!
//! A tree image is a tree header (this module's format) followed by one
//! process image per live process, parents first. The tree is rebuilt in a
//! pid namespace of its own, so every process keeps the pid it knows
//! itself by (a copy on the same kernel, beside its frozen original, could
//! not have them otherwise): pid 1 there is a *holder*, a stub of ours
//! whose only code is a `wait4` loop that reaps what the namespace leaves
//! it and exits with the top process's status (exit code, or 128 + the
//! signal) once nothing is left. The holder is the caller's child; the top
//! process is the holder's, every other one its own parent's, forked by
//! the parent's stub (`clone3` with `set_tid`) before anything else is
//! restored, so that every relation is the kernel's own.
//!
//! ```text
//! holder (ns pid 1, blank)  --clone3(set_tid=[top])-->  top's blank
//!   top's blank  --clone3(set_tid=[child])-->  child's blank  ...
//! sessions (setsid) as each blank is made; groups (setpgid): leaders,
//! then members; zombies exit with their status; each live blank gets its
//! image (`restore::build`); all run; the holder runs its loop last.
//! ```
//!
//! Pipes between the tree's processes move as one pipe each, with their
//! bytes in flight (the header maps each process's pipe ids to the
//! tree's); a pipe on fds 0-2 is carried too unless it is the top's on the
//! same fd (the destination gives every process the top's).
//!
//! Socket pairs likewise: one pair again, each end's queue put back when
//! its holder is built (its image has it), the shutdowns once all are.
//!
//! Limits: stop-and-copy only (no lazy tree); a tty on fds 0-2 that is
//! not the top's on the same fd is refused by name; a process group or
//! session led from outside the tree is replaced by the holder's.

use std::io::{Read, Write};
use std::path::Path;

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};

use super::capture::{seize_accepting, CaptureError, Frozen, ImageOptions};
use super::image::{read_exact, ImageError, ImageReader, ImageStats, FLAG_LAZY};
use super::inject::{first_stop, inject, ptrace_err, Call};
use super::lazy::{LazyLink, LazyOptions, PageServer};
use super::pager::{Pager, PagerOptions};
use super::precheck::{same_file, stdio_kind, Blocker, Refusal, Scope};
use super::procfs::ProcDir;
use super::restore::{
    blank_in, build, check_kernel, clone3_set_tid, poke, Blank, RestoreError, StdioPlan, Stub,
    TreeFiles, CTL_SCRATCH,
};
use super::sys::STUB_PIDFD;
use super::SysError;
use crate::codec::{Reader, Writer};

/// First bytes of a tree image (a process image begins with `MKPROCIM`).
pub const TREE_MAGIC: [u8; 8] = *b"MKTREEIM";
const TREE_VERSION: u16 = 3;
/// Processes in one tree, at most.
pub const MAX_TREE: usize = 64;
/// Shared descriptions in one tree header, at most.
const MAX_SHARES: usize = 64 * 1024;

/// One process of a tree, as the header carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeProc {
    /// Its pid as it knows it (in its pid namespace).
    pub pid: i32,
    /// Index of its parent (earlier in the tree); `None` for the top.
    pub parent: Option<u32>,
    /// Index of its process group's leader, its session's leader; `None`
    /// when that leader is outside the tree.
    pub pgid: Option<u32>,
    pub sid: Option<u32>,
    /// A zombie's wait status (nothing else of it is carried).
    pub zombie: Option<i32>,
}

/// Descriptor `fd` of process `proc` is the open file description of
/// descriptor `from_fd` of the earlier process `from` (fork left it so).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedFile {
    pub proc: u32,
    pub fd: u32,
    pub from: u32,
    pub from_fd: u32,
}

/// Pipe `local` of process `proc` (its id in that process's image) is the
/// tree's pipe `global` (from 1): one pipe, which several processes may
/// hold ends of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreePipe {
    pub proc: u32,
    pub local: u32,
    pub global: u32,
}

/// End `local_end` of socket pair `local` of process `proc` (its ids in
/// that process's image) is end `end` of the tree's pair `global` (from
/// 1): one pair, whose ends may be in two processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeSocket {
    pub proc: u32,
    pub local: u32,
    pub local_end: u8,
    pub global: u32,
    pub end: u8,
}

/// The tree header: its processes, parents first (the top at 0), the
/// descriptions they share and the pipes and socket pairs between them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TreeMeta {
    pub procs: Vec<TreeProc>,
    pub shares: Vec<SharedFile>,
    pub pipes: Vec<TreePipe>,
    pub sockets: Vec<TreeSocket>,
}

const NONE: u32 = u32::MAX;

impl TreeMeta {
    /// The header's bytes: magic, version, length, body, xxh3 of the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        let mut w = Writer(&mut body);
        w.count(self.procs.len());
        for p in &self.procs {
            w.i32(p.pid);
            w.u32(p.parent.unwrap_or(NONE));
            w.u32(p.pgid.unwrap_or(NONE));
            w.u32(p.sid.unwrap_or(NONE));
            w.u8(u8::from(p.zombie.is_some()));
            w.i32(p.zombie.unwrap_or(0));
        }
        w.count(self.shares.len());
        for s in &self.shares {
            w.u32(s.proc);
            w.u32(s.fd);
            w.u32(s.from);
            w.u32(s.from_fd);
        }
        w.count(self.pipes.len());
        for p in &self.pipes {
            w.u32(p.proc);
            w.u32(p.local);
            w.u32(p.global);
        }
        w.count(self.sockets.len());
        for x in &self.sockets {
            w.u32(x.proc);
            w.u32(x.local);
            w.u8(x.local_end);
            w.u32(x.global);
            w.u8(x.end);
        }
        let mut out = Vec::with_capacity(body.len() + 30);
        let mut w = Writer(&mut out);
        w.raw(&TREE_MAGIC);
        w.u16(TREE_VERSION);
        w.count(body.len());
        w.raw(&body);
        w.u64(xxhash_rust::xxh3::xxh3_64(&body));
        out
    }

    /// Reads and checks a header (untrusted bytes: every index, pid and
    /// count is checked; never a panic).
    pub fn read<R: Read>(r: &mut R) -> Result<TreeMeta, ImageError> {
        let mut head = [0u8; 14];
        read_exact(r, &mut head, 0)?;
        let magic: [u8; 8] = head[..8].try_into().expect("8 bytes");
        if magic != TREE_MAGIC {
            return Err(ImageError::Magic(magic));
        }
        let version = u16::from_le_bytes([head[8], head[9]]);
        if version != TREE_VERSION {
            return Err(ImageError::Version(version));
        }
        let len = u32::from_le_bytes(head[10..14].try_into().expect("4 bytes")) as usize;
        let max =
            4 + MAX_TREE * 21 + 4 + MAX_SHARES * 16 + 4 + MAX_SHARES * 12 + 4 + MAX_SHARES * 14;
        if len > max {
            return Err(invalid(
                10,
                format!("a tree header of {len} bytes (at most {max})"),
            ));
        }
        let mut body = vec![0u8; len + 8];
        read_exact(r, &mut body, 14)?;
        let stored = u64::from_le_bytes(body[len..].try_into().expect("8 bytes"));
        let body = &body[..len];
        let computed = xxhash_rust::xxh3::xxh3_64(body);
        if stored != computed {
            return Err(ImageError::HeaderChecksum { stored, computed });
        }
        let short =
            |s: crate::codec::Short| invalid(14 + s.at as u64, "the tree header ends early".into());
        let mut rd = Reader::new(body);
        let n = rd.count(21).map_err(short)?;
        let idx = |v: u32, below: usize, what: &str| -> Result<Option<u32>, ImageError> {
            match v {
                NONE => Ok(None),
                v if (v as usize) < below => Ok(Some(v)),
                v => Err(invalid(
                    14,
                    format!("{what} {v} names no process of the tree"),
                )),
            }
        };
        let mut procs = Vec::with_capacity(n.min(MAX_TREE));
        if n == 0 || n > MAX_TREE {
            return Err(invalid(14, format!("{n} processes (1 to {MAX_TREE})")));
        }
        for i in 0..n {
            let pid = rd.i32().map_err(short)?;
            let parent = idx(rd.u32().map_err(short)?, i, "parent")?;
            let pgid = idx(rd.u32().map_err(short)?, n, "process group leader")?;
            let sid = idx(rd.u32().map_err(short)?, n, "session leader")?;
            let z = rd.u8().map_err(short)?;
            let status = rd.i32().map_err(short)?;
            let zombie = match z {
                0 => None,
                1 => Some(status),
                z => return Err(invalid(14, format!("zombie flag {z}"))),
            };
            procs.push(TreeProc {
                pid,
                parent,
                pgid,
                sid,
                zombie,
            });
        }
        let ns = rd.count(16).map_err(short)?;
        if ns > MAX_SHARES {
            return Err(invalid(14, format!("{ns} shared descriptions")));
        }
        let mut shares = Vec::with_capacity(ns);
        for _ in 0..ns {
            shares.push(SharedFile {
                proc: rd.u32().map_err(short)?,
                fd: rd.u32().map_err(short)?,
                from: rd.u32().map_err(short)?,
                from_fd: rd.u32().map_err(short)?,
            });
        }
        let np = rd.count(12).map_err(short)?;
        if np > MAX_SHARES {
            return Err(invalid(14, format!("{np} pipes")));
        }
        let mut pipes = Vec::with_capacity(np);
        for _ in 0..np {
            pipes.push(TreePipe {
                proc: rd.u32().map_err(short)?,
                local: rd.u32().map_err(short)?,
                global: rd.u32().map_err(short)?,
            });
        }
        let ns = rd.count(14).map_err(short)?;
        if ns > MAX_SHARES {
            return Err(invalid(14, format!("{ns} socket pair ends")));
        }
        let mut sockets = Vec::with_capacity(ns);
        for _ in 0..ns {
            sockets.push(TreeSocket {
                proc: rd.u32().map_err(short)?,
                local: rd.u32().map_err(short)?,
                local_end: rd.u8().map_err(short)?,
                global: rd.u32().map_err(short)?,
                end: rd.u8().map_err(short)?,
            });
        }
        if rd.remaining() != 0 {
            return Err(invalid(
                14,
                format!("{} bytes after the sockets", rd.remaining()),
            ));
        }
        let t = TreeMeta {
            procs,
            shares,
            pipes,
            sockets,
        };
        t.check().map_err(ImageError::Tree)?;
        Ok(t)
    }

    /// What makes a tree unbuildable, said before anything is made.
    fn check(&self) -> Result<(), TreeError> {
        use TreeError as E;
        let p = &self.procs;
        for (i, x) in p.iter().enumerate() {
            if x.pid <= 1 {
                return Err(E::HolderPid {
                    proc: i,
                    pid: x.pid,
                });
            }
            if p[..i].iter().any(|y| y.pid == x.pid) {
                return Err(E::PidTwice(x.pid));
            }
            match (i, x.parent) {
                (0, Some(_)) => return Err(E::TopHasParent),
                (0, None) => {}
                (_, None) => return Err(E::NoParent(i)),
                (_, Some(q)) if p[q as usize].zombie.is_some() => return Err(E::ZombieParent(i)),
                _ => {}
            }
            // A session leader leads its own; a member's session is its
            // parent's (fork's), or the parent leads it.
            if let Some(s) = x.sid {
                let own = s as usize == i;
                let inherited = x.parent.is_some_and(|q| p[q as usize].sid == Some(s));
                if !own && !inherited {
                    return Err(E::Session(i));
                }
            } else if x.parent.is_some_and(|q| p[q as usize].sid.is_some()) {
                return Err(E::Session(i));
            }
            if let Some(g) = x.pgid {
                if p[g as usize].sid != x.sid {
                    return Err(E::GroupSession(i));
                }
                if x.sid == Some(i as u32) && g as usize != i {
                    return Err(E::LeaderGroup(i));
                }
            }
        }
        if p[0].zombie.is_some() {
            return Err(E::TopZombie);
        }
        for s in &self.shares {
            if s.proc as usize >= p.len() || s.from >= s.proc {
                return Err(E::Share {
                    proc: s.proc,
                    from: s.from,
                });
            }
            if p[s.proc as usize].zombie.is_some() || p[s.from as usize].zombie.is_some() {
                return Err(E::ZombieShares);
            }
        }
        for (k, x) in self.pipes.iter().enumerate() {
            if x.proc as usize >= p.len() || p[x.proc as usize].zombie.is_some() {
                return Err(E::PipeProc(x.proc));
            }
            if x.global == 0 || x.global as usize > self.pipes.len() {
                return Err(E::PipeId {
                    global: x.global,
                    count: self.pipes.len(),
                });
            }
            if self.pipes[..k]
                .iter()
                .any(|y| y.proc == x.proc && y.local == x.local)
            {
                return Err(E::PipeTwice {
                    local: x.local,
                    proc: x.proc,
                });
            }
        }
        for (k, x) in self.sockets.iter().enumerate() {
            if x.proc as usize >= p.len() || p[x.proc as usize].zombie.is_some() {
                return Err(E::SocketProc(x.proc));
            }
            if x.global == 0
                || x.global as usize > self.sockets.len()
                || x.end > 1
                || x.local_end > 1
            {
                return Err(E::SocketId {
                    global: x.global,
                    end: x.end,
                    count: self.sockets.len(),
                });
            }
            if self.sockets[..k]
                .iter()
                .any(|y| (y.proc, y.local, y.local_end) == (x.proc, x.local, x.local_end))
            {
                return Err(E::SocketTwice {
                    local: x.local,
                    end: x.local_end,
                    proc: x.proc,
                });
            }
        }
        Ok(())
    }
}

/// Why a tree cannot be built: a header that says so is damaged, a tree
/// frozen so is refused (processes by their place in the header).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    #[error("it has more than {MAX_TREE} processes")]
    TooMany,
    #[error("process {proc} has pid {pid} (pid 1 is the holder's)")]
    HolderPid { proc: usize, pid: i32 },
    #[error("pid {0} appears twice")]
    PidTwice(i32),
    #[error("the top process has a parent")]
    TopHasParent,
    #[error("process {0} has no parent")]
    NoParent(usize),
    #[error("process {0}'s parent is a zombie")]
    ZombieParent(usize),
    #[error("process {0}'s session is not its parent's")]
    Session(usize),
    #[error("process {0}'s group is led from another session")]
    GroupSession(usize),
    #[error("process {0} leads a session but not its group")]
    LeaderGroup(usize),
    #[error("the top process is a zombie")]
    TopZombie,
    #[error("a shared description names processes {proc} and {from}")]
    Share { proc: u32, from: u32 },
    #[error("a zombie shares a description")]
    ZombieShares,
    #[error("a pipe names process {0}")]
    PipeProc(u32),
    #[error("pipe {global} of {count}")]
    PipeId { global: u32, count: usize },
    #[error("pipe {local} of process {proc} twice")]
    PipeTwice { local: u32, proc: u32 },
    #[error("a socket pair names process {0}")]
    SocketProc(u32),
    #[error("socket pair {global} end {end} of {count}")]
    SocketId { global: u32, end: u8, count: usize },
    #[error("socket pair {local} end {end} of process {proc} twice")]
    SocketTwice { local: u32, end: u8, proc: u32 },
    /// More than one of its processes is refused (by pid here, with what
    /// refuses each): all are named at once.
    #[error("{} of its processes are refused: {}", .0.len(), super::precheck::join_refused(.0))]
    Blocked(Vec<(i32, Vec<Blocker>)>),
}

fn invalid(at: u64, why: String) -> ImageError {
    ImageError::Invalid { at, why }
}

/// `top` and its descendants now (parents first), as `/proc` lists them
/// (they may change until frozen: for a look before the freeze).
pub fn tree_of(top: i32) -> std::io::Result<Vec<i32>> {
    let mut out = vec![top];
    let mut i = 0;
    while i < out.len() && out.len() <= MAX_TREE {
        let kids = ProcDir::new(Path::new("/proc"), out[i]).children()?;
        out.extend(kids);
        i += 1;
    }
    Ok(out)
}

/// A process tree with every live process frozen (see [`Frozen`]).
/// Dropping it lets them all run on.
#[derive(Debug)]
pub struct FrozenTree {
    meta: TreeMeta,
    /// Each live process, in the header's order (zombies are left out).
    frozen: Vec<Frozen>,
    /// Each process's pid here.
    pids: Vec<i32>,
}

/// Freezes `top` and all its descendants, parents before children (a
/// frozen parent forks no more; its children are listed once it is),
/// then reads each one's state (once all are still: what two of them hold
/// together, a pipe's bytes, is read when neither can change it), and
/// how they relate. Refuses, with everything let go again, what a
/// tree cannot carry (see the module doc).
pub fn freeze_tree(top: i32) -> Result<FrozenTree, CaptureError> {
    // (Each freeze checks that every other holder of a pipe moves too: a
    // descendant of the top, whenever it was forked.)
    if let Err(source) = std::fs::metadata(format!("/proc/{top}")) {
        return Err(Refusal::Inspect { pid: top, source }.into());
    }
    let target = |fd: i32| {
        std::fs::read_link(format!("/proc/{top}/fd/{fd}"))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let scope = Scope {
        top: Some(top),
        top_stdio: Some([target(0), target(1), target(2)]),
    };
    freeze_scope(top, &scope)
}

/// [`freeze_tree`] of the processes `scope` names.
fn freeze_scope(top: i32, scope: &Scope) -> Result<FrozenTree, CaptureError> {
    let mut t = FrozenTree {
        meta: TreeMeta::default(),
        frozen: Vec::new(),
        pids: Vec::new(),
    };
    let children = |b: &Blocker| matches!(b, Blocker::Children { .. });
    let mut hints = Vec::new();
    let mut stats = Vec::new();
    // Processes refused: the walk goes on below them, so that every one
    // is named at once (the frozen ones run on when `t` is dropped).
    let mut refused: Vec<(i32, Vec<Blocker>)> = Vec::new();
    let mut queue = std::collections::VecDeque::from([(top, None::<u32>)]);
    while let Some((pid, parent)) = queue.pop_front() {
        if t.pids.len() == MAX_TREE {
            return Err(CaptureError::Tree {
                pid: top,
                why: TreeError::TooMany,
            });
        }
        let pd = ProcDir::new(Path::new("/proc"), pid);
        let proc_err = |what| move |source| CaptureError::Proc { pid, what, source };
        let stat = pd.stat().map_err(proc_err("stat"))?;
        let zombie = if stat.state == 'Z' && parent.is_some() {
            Some(stat.exit_code)
        } else {
            match seize_accepting(pid, &children, false, scope) {
                Ok((f, h)) => {
                    t.frozen.push(f);
                    hints.push(h);
                    None
                }
                // It is exiting, or exited meanwhile: its parent is frozen,
                // so it ends a zombie (or gone, where its parent has it
                // reaped at once).
                Err(e) => match parent.and_then(|_| exit_of(&pd, &e)) {
                    Some(Some(code)) => Some(code),
                    Some(None) => continue,
                    None => match e {
                        CaptureError::Refused(Refusal::Blocked { pid, blockers }) => {
                            refused.push((pid, blockers));
                            None
                        }
                        e => return Err(e),
                    },
                },
            }
        };
        let i = t.pids.len() as u32;
        t.pids.push(pid);
        stats.push(pd.stat().map_err(proc_err("stat"))?);
        t.meta.procs.push(TreeProc {
            pid: pd.ns_pid().map_err(proc_err("status"))?,
            parent,
            pgid: None,
            sid: None,
            zombie,
        });
        if zombie.is_none() {
            for c in pd.children().map_err(proc_err("children"))? {
                queue.push_back((c, Some(i)));
            }
        }
    }
    match refused.len() {
        0 => {}
        1 => {
            let (pid, blockers) = refused.remove(0);
            return Err(Refusal::Blocked { pid, blockers }.into());
        }
        _ => {
            return Err(CaptureError::Tree {
                pid: top,
                why: TreeError::Blocked(refused),
            })
        }
    }
    // Every process stopped: now what they hold together is still.
    for (f, h) in t.frozen.iter_mut().zip(&hints) {
        f.settle(h, &children)?;
    }
    // Groups and sessions, by their leaders' places in the tree.
    let at = |pid: i32| t.pids.iter().position(|&p| p == pid).map(|i| i as u32);
    for (i, s) in stats.iter().enumerate() {
        t.meta.procs[i].pgid = at(s.pgrp);
        t.meta.procs[i].sid = at(s.session);
    }
    t.meta
        .check()
        .map_err(|why| CaptureError::Tree { pid: top, why })?;
    t.stdio_blockers()?;
    t.find_shares();
    t.find_pipes()?;
    t.find_sockets()?;
    Ok(t)
}

/// How a child that could not be seized ended: `Some(Some(status))` a
/// zombie, `Some(None)` gone; `None` where it is not ending at all (then
/// `e` stands). A process on its way out is waited for, a second at most:
/// it has let go of its memory and only has to notify its parent.
fn exit_of(pd: &ProcDir, e: &CaptureError) -> Option<Option<i32>> {
    let exiting = matches!(
        e,
        CaptureError::Refused(Refusal::Blocked { blockers, .. })
            if blockers.contains(&Blocker::Exiting)
    );
    for _ in 0..100 {
        match pd.stat() {
            Ok(s) if s.state == 'Z' => return Some(Some(s.exit_code)),
            Ok(_) if !exiting => return None,
            Ok(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Some(None),
            Err(_) => return None,
        }
    }
    None
}

impl FrozenTree {
    /// The header.
    pub fn meta(&self) -> &TreeMeta {
        &self.meta
    }

    /// Each process's pid here, in the header's order.
    pub fn pids(&self) -> &[i32] {
        &self.pids
    }

    /// When the first process was frozen.
    pub fn frozen_at(&self) -> std::time::Instant {
        self.frozen
            .first()
            .map_or_else(std::time::Instant::now, |f| f.frozen_at())
    }

    /// The live processes.
    fn live(&self) -> impl Iterator<Item = (usize, &Frozen)> {
        let idx = self
            .meta
            .procs
            .iter()
            .enumerate()
            .filter(|(_, p)| p.zombie.is_none())
            .map(|(i, _)| i);
        idx.zip(&self.frozen)
    }

    /// Processes below the top whose fds 0-2 the destination would not
    /// give them: a tty other than the top's on the same fd. (A pipe other
    /// than the top's is carried, see `Scope`.)
    fn stdio_blockers(&self) -> Result<(), CaptureError> {
        let target = |pid: i32, fd: i32| {
            std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        for (i, _) in self.live().skip(1) {
            let pid = self.pids[i];
            let mut blockers = Vec::new();
            for fd in 0..3 {
                let t = target(pid, fd);
                let replaced = stdio_kind(&t) == Some(super::image::StdioKind::Tty);
                let top = target(self.pids[0], fd);
                if replaced && t != top {
                    blockers.push(Blocker::TreeStdio {
                        fd,
                        target: t,
                        top: if top.is_empty() {
                            "nothing".into()
                        } else {
                            top
                        },
                    });
                }
            }
            if !blockers.is_empty() {
                return Err(Refusal::Blocked { pid, blockers }.into());
            }
        }
        Ok(())
    }

    /// Which pipe of the tree each process's pipes are (their ids are the
    /// process's own): by inode, numbered from 1 in order of appearance.
    fn find_pipes(&mut self) -> Result<(), CaptureError> {
        let mut inodes: Vec<String> = Vec::new();
        let mut found = Vec::new();
        for (i, f) in self.live() {
            let pid = self.pids[i];
            for file in &f.meta().process.files {
                let super::image::FileState::Pipe(local) = file.state else {
                    continue;
                };
                if found
                    .iter()
                    .any(|p: &TreePipe| p.proc == i as u32 && p.local == local)
                {
                    continue;
                }
                let ino = std::fs::read_link(format!("/proc/{pid}/fd/{}", file.fd))
                    .map_err(|source| CaptureError::Proc {
                        pid,
                        what: "fd",
                        source,
                    })?
                    .to_string_lossy()
                    .into_owned();
                let global = match inodes.iter().position(|x| *x == ino) {
                    Some(g) => g as u32 + 1,
                    None => {
                        inodes.push(ino);
                        inodes.len() as u32
                    }
                };
                found.push(TreePipe {
                    proc: i as u32,
                    local,
                    global,
                });
            }
        }
        self.meta.pipes = found;
        Ok(())
    }

    /// Which of the tree's socket pairs each process's pair ends are: a
    /// pair by its two inodes, its end 0 the lower.
    fn find_sockets(&mut self) -> Result<(), CaptureError> {
        let mut pairs: Vec<(u32, u32)> = Vec::new();
        let mut found = Vec::new();
        for (i, f) in self.live() {
            let pid = self.pids[i];
            for file in &f.meta().process.files {
                let super::image::FileState::Socket { id, end } = file.state else {
                    continue;
                };
                if found
                    .iter()
                    .any(|s: &TreeSocket| (s.proc, s.local, s.local_end) == (i as u32, id, end))
                {
                    continue;
                }
                let proc_err = |source| CaptureError::Proc {
                    pid,
                    what: "fd",
                    source,
                };
                let ino: u32 = std::fs::read_link(format!("/proc/{pid}/fd/{}", file.fd))
                    .map_err(proc_err)?
                    .to_string_lossy()
                    .strip_prefix("socket:[")
                    .and_then(|t| t.strip_suffix(']')?.parse().ok())
                    .ok_or_else(|| proc_err(std::io::Error::other("not a socket")))?;
                let peer = super::unixdiag::query(ino)
                    .map_err(proc_err)?
                    .ok_or_else(|| proc_err(std::io::Error::other("a socket gone")))?
                    .peer;
                let key = (ino.min(peer), ino.max(peer));
                let global = match pairs.iter().position(|x| *x == key) {
                    Some(g) => g as u32 + 1,
                    None => {
                        pairs.push(key);
                        pairs.len() as u32
                    }
                };
                found.push(TreeSocket {
                    proc: i as u32,
                    local: id,
                    local_end: end,
                    global,
                    end: u8::from(ino != key.0),
                });
            }
        }
        self.meta.sockets = found;
        Ok(())
    }

    /// Which carried descriptors share an earlier process's description.
    fn find_shares(&mut self) {
        let live: Vec<(usize, Vec<u32>)> = self
            .live()
            .map(|(i, f)| {
                let fds = f
                    .meta()
                    .process
                    .files
                    .iter()
                    .filter(|x| x.share.is_none())
                    .map(|x| x.fd)
                    .collect();
                (i, fds)
            })
            .collect();
        for (k, (i, fds)) in live.iter().enumerate() {
            for &fd in fds {
                let from = live[..k].iter().find_map(|(j, theirs)| {
                    theirs
                        .iter()
                        .find(|&&g| same_file(self.pids[*i], fd, self.pids[*j], g))
                        .map(|&g| (*j, g))
                });
                if let Some((j, g)) = from {
                    self.meta.shares.push(SharedFile {
                        proc: *i as u32,
                        fd,
                        from: j as u32,
                        from_fd: g,
                    });
                }
            }
        }
    }

    /// Streams the tree image: the header, then each live process's image
    /// (see [`Frozen::write_image`]). The processes stay frozen.
    pub fn write_image<W: Write>(
        &self,
        w: W,
        opts: ImageOptions,
    ) -> Result<ImageStats, CaptureError> {
        self.write_each(w, |f, w| f.write_image(w, opts))
    }

    /// Streams a lazy tree image: the header, then each live process's
    /// lazy image (see [`Frozen::write_lazy_image`]); returns a page server
    /// for each live process, in the header's order. The processes stay
    /// frozen until every server has sent all.
    pub fn write_lazy_image<W: Write>(
        &self,
        w: W,
        opts: LazyOptions,
    ) -> Result<(ImageStats, Vec<PageServer>), CaptureError> {
        let mut servers = Vec::new();
        let total = self.write_each(w, |f, w| {
            let (s, server) = f.write_lazy_image(w, opts)?;
            servers.push(server);
            Ok(s)
        })?;
        Ok((total, servers))
    }

    /// The header, then what `one` writes of each live process; the stats
    /// of all.
    fn write_each<W: Write>(
        &self,
        mut w: W,
        mut one: impl FnMut(&Frozen, &mut W) -> Result<ImageStats, CaptureError>,
    ) -> Result<ImageStats, CaptureError> {
        let head = self.meta.encode();
        w.write_all(&head).map_err(|e| CaptureError::Image {
            pid: self.pids[0],
            source: ImageError::Io(e),
        })?;
        let mut total = ImageStats {
            bytes: head.len() as u64,
            ..ImageStats::default()
        };
        for (_, f) in self.live() {
            let s = one(f, &mut w)?;
            total.data_pages += s.data_pages;
            total.zero_pages += s.zero_pages;
            total.bytes += s.bytes;
            total.checksum ^= s.checksum;
        }
        Ok(total)
    }

    /// Ends every process of the tree (after a successful move), the top
    /// first; their real parents reap them as before.
    pub fn kill(self) {
        for f in self.frozen {
            f.kill();
        }
    }

    /// Lets every process run on, untouched.
    pub fn resume(self) {
        for f in self.frozen.into_iter().rev() {
            f.resume();
        }
    }
}

/// What a freeze froze: one process, or a tree (`--tree`). (The common one
/// is not boxed: one value per move, on its thread's stack.)
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Captured {
    One(Frozen),
    Tree(FrozenTree),
}

/// [`super::freeze`] of `pid`, or [`freeze_tree`] with `tree`.
pub fn freeze_any(pid: i32, tree: bool) -> Result<Captured, CaptureError> {
    if tree {
        freeze_tree(pid).map(Captured::Tree)
    } else {
        super::freeze(pid).map(Captured::One)
    }
}

impl Captured {
    /// When the (first) process was frozen.
    pub fn frozen_at(&self) -> std::time::Instant {
        match self {
            Captured::One(f) => f.frozen_at(),
            Captured::Tree(t) => t.frozen_at(),
        }
    }

    /// Its image: a process image, or a tree image.
    pub fn write_image<W: Write>(
        &self,
        w: W,
        opts: ImageOptions,
    ) -> Result<ImageStats, CaptureError> {
        match self {
            Captured::One(f) => f.write_image(w, opts),
            Captured::Tree(t) => t.write_image(w, opts),
        }
    }

    /// Ends what was frozen (see [`Frozen::kill`], [`FrozenTree::kill`]).
    pub fn kill(self) {
        match self {
            Captured::One(f) => f.kill(),
            Captured::Tree(t) => t.kill(),
        }
    }

    /// Lets what was frozen run on, untouched.
    pub fn resume(self) {
        match self {
            Captured::One(f) => f.resume(),
            Captured::Tree(t) => t.resume(),
        }
    }
}

/// A tree rebuilt and running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoredTree {
    /// The holder: the caller's child (reap it), pid 1 of the tree's pid
    /// namespace; it exits once every process there has, with the top's
    /// status (its exit code, or 128 + the signal that ended it).
    pub holder: i32,
    /// Each process's pid here and its pid in the namespace, in the
    /// header's order (zombies included).
    pub pids: Vec<(i32, i32)>,
    pub stats: ImageStats,
}

impl RestoredTree {
    /// The top process's pid here.
    pub fn top(&self) -> i32 {
        self.pids[0].0
    }
}

/// Where the holder's loop is, in its control page (after the batch code),
/// and the word it reaps into.
const HOLDER_CODE: u64 = 0x60;
const HOLDER_STATUS: u64 = 0x300;

/// The holder's loop; registers: r12 = the top's pid (in the namespace),
/// r13 = the address of a status word, rbx = 0.
///
/// ```text
/// loop: mov eax, 61 (wait4); mov rdi, -1; mov rsi, r13; xor edx, edx;
///       xor r10d, r10d; syscall
///       cmp rax, -10 (ECHILD); je done
///       cmp rax, r12; jne loop; mov ebx, [r13]; jmp loop
/// done: edi = ebx & 0x7f ? 128 + (ebx & 0x7f) : (ebx >> 8) & 0xff
///       mov eax, 231 (exit_group); syscall; ud2
/// ```
const HOLDER_LOOP: [u8; 74] = [
    0xb8, 0x3d, 0x00, 0x00, 0x00, 0x48, 0xc7, 0xc7, 0xff, 0xff, 0xff, 0xff, 0x4c, 0x89, 0xee, 0x31,
    0xd2, 0x45, 0x31, 0xd2, 0x0f, 0x05, 0x48, 0x83, 0xf8, 0xf6, 0x74, 0x0b, 0x4c, 0x39, 0xe0, 0x75,
    0xdf, 0x41, 0x8b, 0x5d, 0x00, 0xeb, 0xd9, 0x89, 0xdf, 0x83, 0xe7, 0x7f, 0x74, 0x08, 0x81, 0xc7,
    0x80, 0x00, 0x00, 0x00, 0xeb, 0x0b, 0x89, 0xdf, 0xc1, 0xef, 0x08, 0x81, 0xe7, 0xff, 0x00, 0x00,
    0x00, 0xb8, 0xe7, 0x00, 0x00, 0x00, 0x0f, 0x05, 0x0f, 0x0b,
];

/// Forks a blank from the blank `parent` with pid `pid` in the namespace
/// (`clone3` with `set_tid`, caught stopped by `PTRACE_O_TRACEFORK`).
fn fork_blank(parent: &Blank, pid: i32) -> Result<Blank, RestoreError> {
    let p = parent.stub.pid;
    let scratch = parent.ctl + CTL_SCRATCH;
    let c = clone3_set_tid(p, scratch, (0, 0, libc::SIGCHLD as u64), pid)?;
    let out = inject(p, parent.ctl, &parent.base, &c)?;
    out.check(&c, p)?;
    let new = out.cloned.ok_or(SysError::Stop {
        tid: p.as_raw(),
        status: "no PTRACE_EVENT_FORK".into(),
        wanted: "clone3",
    })?;
    let blank = Blank {
        stub: Stub {
            pid: new,
            tids: vec![new],
            armed: true,
        },
        ctl: parent.ctl,
        base: parent.base,
    };
    first_stop(new, "the new process's first stop")?;
    Ok(blank)
}

/// Runs `c` in blank `b`: its result, or the errno it names.
fn call(b: &Blank, c: Call) -> Result<u64, SysError> {
    let p = b.stub.pid;
    inject(p, b.ctl, &b.base, &c)?.check(&c, p)
}

/// Makes blank `z` exit with wait status `status` (its parent, a blank
/// too, then holds it as a zombie), and takes the SIGCHLD that sent its
/// parent back out of the parent's queue (the original's came long ago).
fn make_zombie(z: Blank, parent: &Blank, status: i32) -> Result<(), RestoreError> {
    let pid = z.stub.pid;
    let scratch = z.ctl + CTL_SCRATCH;
    let sig = status & 0x7f;
    let mut r = z.base;
    r.rip = z.ctl;
    r.orig_rax = u64::MAX;
    if sig == 0 {
        r.rax = libc::SYS_exit_group as u64;
        r.rdi = ((status >> 8) & 0xff) as u64;
        ptrace::setregs(pid, r).map_err(ptrace_err("PTRACE_SETREGS", pid))?;
        ptrace::cont(pid, None).map_err(ptrace_err("PTRACE_CONT", pid))?;
    } else {
        // No core file: only the status is wanted. Then every signal
        // unblocked, and the signal sent.
        poke(pid, scratch, &[0u8; 16])?;
        call(
            &z,
            Call::new(
                "prlimit64(RLIMIT_CORE)",
                libc::SYS_prlimit64,
                &[0, libc::RLIMIT_CORE as u64, scratch, 0],
            ),
        )?;
        call(
            &z,
            Call::new(
                "rt_sigprocmask",
                libc::SYS_rt_sigprocmask,
                &[libc::SIG_SETMASK as u64, scratch, 0, 8],
            ),
        )?;
        let s = Signal::try_from(sig).map_err(|_| {
            RestoreError::Layout(format!("a zombie's status {status:#x} names no signal"))
        })?;
        kill(pid, s).map_err(ptrace_err("kill", pid))?;
        ptrace::cont(pid, None).map_err(ptrace_err("PTRACE_CONT", pid))?;
    }
    let mut z = z;
    loop {
        match waitpid(pid, Some(WaitPidFlag::__WALL)) {
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(ptrace_err("waitpid", pid)(e).into()),
            Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) => break,
            Ok(WaitStatus::Stopped(_, s)) => {
                ptrace::cont(pid, s).map_err(ptrace_err("PTRACE_CONT", pid))?;
            }
            Ok(_) => {
                ptrace::cont(pid, None).map_err(ptrace_err("PTRACE_CONT", pid))?;
            }
        }
    }
    // Gone from our ptrace: a zombie of its parent now.
    z.stub.armed = false;
    let ps = parent.ctl + CTL_SCRATCH;
    let mut set = (1u64 << (libc::SIGCHLD - 1)).to_le_bytes().to_vec();
    set.resize(32, 0);
    poke(parent.stub.pid, ps, &set)?;
    let c = Call::new(
        "rt_sigtimedwait(SIGCHLD)",
        libc::SYS_rt_sigtimedwait,
        &[ps, 0, ps + 16, 8],
    );
    // SIGCHLD, or EAGAIN if none was queued: either is fine.
    inject(parent.stub.pid, parent.ctl, &parent.base, &c)?;
    Ok(())
}

/// Rebuilds the tree image in `r` (see the module doc) with `stdio` as
/// every process's fds 0-2 that the image does not carry, and lets it
/// run. On error nothing of it is left (killing the holder ends the
/// namespace).
pub fn restore_tree<R: Read>(r: R, stdio: StdioPlan) -> Result<RestoredTree, RestoreError> {
    restore_tree_impl(r, stdio, None).map(|(t, _)| t)
}

/// [`restore_tree`] of a lazy tree image (see
/// [`FrozenTree::write_lazy_image`]): the `k`-th live process (in the
/// header's order) gets its pages through `links(k)`; returns its pager
/// beside the tree, in the same order. Each pager's
/// [`Pager::wait`] returns once its process has every page.
pub fn restore_tree_lazy<R: Read>(
    r: R,
    stdio: StdioPlan,
    links: &mut dyn FnMut(usize) -> LazyLink,
    opts: PagerOptions,
) -> Result<(RestoredTree, Vec<Pager>), RestoreError> {
    restore_tree_impl(r, stdio, Some((links, opts)))
}

fn restore_tree_impl<R: Read>(
    mut r: R,
    stdio: StdioPlan,
    mut lazy: Option<(&mut dyn FnMut(usize) -> LazyLink, PagerOptions)>,
) -> Result<(RestoredTree, Vec<Pager>), RestoreError> {
    let tree = TreeMeta::read(&mut r)?;
    let holder = blank_in(&stdio, &[], true)?;
    drop(stdio);
    // 1. Every process as a blank, forked by its parent's; sessions.
    let mut blanks: Vec<Option<Blank>> = Vec::with_capacity(tree.procs.len());
    for (i, p) in tree.procs.iter().enumerate() {
        let parent = match p.parent {
            None => &holder,
            Some(q) => blanks[q as usize]
                .as_ref()
                .expect("parents are live blanks"),
        };
        let b = fork_blank(parent, p.pid)?;
        if p.sid == Some(i as u32) {
            call(&b, Call::new("setsid", libc::SYS_setsid, &[]))?;
        }
        blanks.push(Some(b));
    }
    // 2. Groups: their leaders, then the members.
    let blank = |i: usize| blanks[i].as_ref().expect("every blank is made");
    for (i, p) in tree.procs.iter().enumerate() {
        if p.pgid == Some(i as u32) && p.sid != Some(i as u32) {
            call(blank(i), Call::new("setpgid", libc::SYS_setpgid, &[0, 0]))?;
        }
    }
    for (i, p) in tree.procs.iter().enumerate() {
        if let Some(g) = p.pgid.filter(|&g| g as usize != i) {
            let leader = tree.procs[g as usize].pid as u64;
            call(
                blank(i),
                Call::new("setpgid", libc::SYS_setpgid, &[0, leader]),
            )?;
        }
    }
    let pids: Vec<(i32, i32)> = tree
        .procs
        .iter()
        .zip(&blanks)
        .map(|(p, b)| (b.as_ref().map_or(0, |b| b.stub.pid.as_raw()), p.pid))
        .collect();
    // 3. Zombies, last first (none has children).
    for (i, p) in tree.procs.iter().enumerate().rev() {
        if let Some(status) = p.zombie {
            let z = blanks[i].take().expect("a zombie's blank");
            let q = p.parent.expect("checked: the top is no zombie") as usize;
            make_zombie(z, blanks[q].as_ref().expect("a live parent"), status)?;
        }
    }
    // 4. Each live process, from its image.
    let mut opened: Vec<Vec<(u32, std::os::fd::OwnedFd)>> = Vec::new();
    let mut files = TreeFiles::default();
    let mut built = Vec::new();
    let mut stats = ImageStats::default();
    for (i, p) in tree.procs.iter().enumerate() {
        opened.push(Vec::new());
        if p.zombie.is_some() {
            continue;
        }
        let b = blanks[i].take().expect("a live blank");
        let (rd, meta) = ImageReader::open(&mut r)?;
        // Each process image is lazy when the tree's is (the links say).
        let link = match (meta.header.flags & FLAG_LAZY != 0, lazy.as_mut()) {
            (false, None) => None,
            (true, Some((links, opts))) => Some((links(built.len()), *opts)),
            _ => return Err(RestoreError::LazyImage),
        };
        if b.in_the_way(&meta.mappings) {
            return Err(RestoreError::Layout(format!(
                "process {} maps {:#x}, where the tree's stubs have their control page",
                p.pid, b.ctl
            )));
        }
        let plan = check_kernel(&meta)?;
        files.shared.clear();
        files.pipe_ids = tree
            .pipes
            .iter()
            .filter(|p| p.proc as usize == i)
            .map(|p| (p.local, p.global))
            .collect();
        files.sock_ids = tree
            .sockets
            .iter()
            .filter(|s| s.proc as usize == i)
            .map(|s| ((s.local, s.local_end), (s.global, s.end)))
            .collect();
        for s in tree.shares.iter().filter(|s| s.proc as usize == i) {
            let theirs = opened[s.from as usize]
                .iter()
                .find(|o| o.0 == s.from_fd)
                .ok_or_else(|| {
                    RestoreError::Layout(format!(
                        "process {} shares fd {} of process {}, which it does not carry",
                        p.pid, s.from_fd, tree.procs[s.from as usize].pid
                    ))
                })?;
            let dup = theirs.1.try_clone().map_err(|source| RestoreError::Local {
                what: "a shared description",
                source,
            })?;
            files.shared.push((s.fd, dup));
        }
        let one = build(b, rd, meta, &plan, link, None, Some(&mut files))?;
        opened[i] = std::mem::take(&mut files.opened);
        stats.data_pages += one.stats().data_pages;
        stats.zero_pages += one.stats().zero_pages;
        stats.bytes += one.stats().bytes;
        stats.checksum ^= one.stats().checksum;
        built.push(one);
    }
    files.shut_sockets().map_err(|source| RestoreError::Local {
        what: "a socket pair's shutdown",
        source,
    })?;
    drop((opened, files));
    // 5. Everything runs: children first, then the holder's loop.
    let mut pagers = Vec::new();
    for b in built.into_iter().rev() {
        pagers.extend(b.run()?.1);
    }
    pagers.reverse();
    let h = holder.stub.pid;
    call(
        &holder,
        Call::new("close", libc::SYS_close, &[STUB_PIDFD as u64]),
    )?;
    poke(h, holder.ctl + HOLDER_CODE, &HOLDER_LOOP)?;
    poke(h, holder.ctl + HOLDER_STATUS, &[0u8; 4])?;
    let mut regs = holder.base;
    regs.rip = holder.ctl + HOLDER_CODE;
    regs.orig_rax = u64::MAX;
    regs.r12 = tree.procs[0].pid as u64;
    regs.r13 = holder.ctl + HOLDER_STATUS;
    regs.rbx = 0;
    ptrace::setregs(h, regs).map_err(ptrace_err("PTRACE_SETREGS", h))?;
    ptrace::detach(h, None).map_err(ptrace_err("PTRACE_DETACH", h))?;
    let mut holder = holder;
    holder.stub.armed = false;
    Ok((
        RestoredTree {
            holder: h.as_raw(),
            pids,
            stats,
        },
        pagers,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> TreeMeta {
        TreeMeta {
            procs: vec![
                TreeProc {
                    pid: 100,
                    parent: None,
                    pgid: Some(0),
                    sid: Some(0),
                    zombie: None,
                },
                TreeProc {
                    pid: 101,
                    parent: Some(0),
                    pgid: Some(0),
                    sid: Some(0),
                    zombie: Some(7 << 8),
                },
                TreeProc {
                    pid: 102,
                    parent: Some(0),
                    pgid: Some(2),
                    sid: Some(0),
                    zombie: None,
                },
            ],
            shares: vec![SharedFile {
                proc: 2,
                fd: 3,
                from: 0,
                from_fd: 3,
            }],
            sockets: vec![TreeSocket {
                proc: 2,
                local: 1,
                local_end: 0,
                global: 1,
                end: 1,
            }],
            pipes: vec![
                TreePipe {
                    proc: 0,
                    local: 1,
                    global: 1,
                },
                TreePipe {
                    proc: 2,
                    local: 1,
                    global: 1,
                },
            ],
        }
    }

    #[test]
    fn a_tree_header_reads_back_as_written() {
        let t = sample();
        let b = t.encode();
        assert_eq!(TreeMeta::read(&mut &b[..]).expect("read"), t);
    }

    /// Every forged or cut header is an error that says so, never a panic
    /// and never a tree that cannot be built.
    #[test]
    fn forged_and_cut_headers_are_refused() {
        let err = |t: TreeMeta| {
            TreeMeta::read(&mut &t.encode()[..])
                .expect_err("refused")
                .to_string()
        };
        let mut t = sample();
        t.procs[2].parent = Some(2);
        assert!(err(t).contains("parent 2 names no process"));
        let mut t = sample();
        t.procs[2].pid = 101;
        assert!(err(t).contains("pid 101 appears twice"));
        let mut t = sample();
        t.procs[2].parent = Some(1);
        assert!(err(t).contains("parent is a zombie"));
        let mut t = sample();
        t.procs[0].pid = 1;
        assert!(err(t).contains("pid 1 is the holder's"));
        let mut t = sample();
        t.procs[2].sid = None;
        assert!(err(t).contains("session is not its parent's"));
        let mut t = sample();
        t.shares[0].from = 2;
        assert!(err(t).contains("shared description"));
        let mut t = sample();
        t.pipes[1].proc = 1;
        assert!(err(t).contains("a pipe names process 1"));
        let mut t = sample();
        t.pipes[1].global = 3;
        assert!(err(t).contains("pipe 3 of 2"));
        let mut t = sample();
        t.pipes[1].proc = 0;
        assert!(err(t).contains("pipe 1 of process 0 twice"));
        let mut t = sample();
        t.sockets[0].end = 2;
        assert!(err(t).contains("socket pair 1 end 2 of 1"));
        let mut t = sample();
        t.sockets.push(t.sockets[0]);
        assert!(err(t).contains("end 0 of process 2 twice"));
        let b = sample().encode();
        for cut in 0..b.len() {
            assert!(TreeMeta::read(&mut &b[..cut]).is_err(), "cut at {cut}");
        }
        let mut flipped = b.clone();
        flipped[20] ^= 1;
        assert!(matches!(
            TreeMeta::read(&mut &flipped[..]),
            Err(ImageError::HeaderChecksum { .. })
        ));
        let mut magic = b;
        magic[0] = b'X';
        assert!(matches!(
            TreeMeta::read(&mut &magic[..]),
            Err(ImageError::Magic(_))
        ));
    }
}
