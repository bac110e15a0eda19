//! Is a process migratable? Decided from `/proc` alone, before anything is
//! frozen, and again once it is frozen (the answer that counts). Every
//! blocker is reported at once, each naming the offending thing.

use std::fmt;
use std::io;
use std::path::Path;

use super::image::{
    EpollState, EpollWatch, FileKind, FileState, MemfdState, OpenFile, PipeState, SocketPairState,
    StdioKind, TimerState, DEVICES, EPOLL, EVENTFD, FILE_FLAGS, MAX_FILES, MAX_MEMFD_BYTES,
    MAX_PIPE_BYTES, MAX_PIPE_CAPACITY, MAX_POSIX_TIMERS, MAX_TIMER_ID, POSIX_TIMER_CLOCKS,
    SIGNALFD, TFD_ABSTIME, TIMERFD,
};
use super::procfs::{MapsEntry, ProcDir};

/// One reason a process cannot be migrated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blocker {
    /// A descriptor other than 0, 1, 2 is open on something not carried.
    OpenFd { fd: i32, target: String },
    /// A descriptor is open on a file that was deleted.
    DeletedFile { fd: i32, target: String },
    /// A pipe (or socket of a pair) with an end outside what moves: in
    /// another process, or on one of fds 0-2 (which the destination
    /// replaces).
    PipeOutside {
        fd: i32,
        target: String,
        holder: String,
    },
    /// A socket (any descriptor).
    Socket { fd: i32, target: String },
    /// fd 0/1/2 is something other than a pipe, a tty or /dev/null.
    Stdio { fd: i32, target: String },
    /// A mapping shared with other processes (MAP_SHARED of a file, a
    /// memfd, SysV shm, ...).
    SharedMapping { start: u64, end: u64, name: String },
    /// Anonymous shared memory (carried) that something else maps too: a
    /// process (`holder`), or the process itself at another address.
    SharedElsewhere {
        start: u64,
        end: u64,
        holder: String,
    },
    /// A memfd (carried) that another process holds too.
    MemfdElsewhere { name: String, holder: String },
    /// A memfd that cannot be carried (`why`).
    Memfd { name: String, why: String },
    /// A kernel special mapping this code does not know how to recreate.
    SpecialMapping { start: u64, name: String },
    /// Already under ptrace.
    Traced { tracer: i32 },
    /// Has children (they would be orphaned, and their pids are not ours).
    Children { pids: Vec<i32> },
    /// A seccomp filter or strict mode (not restored; and it may forbid the
    /// syscalls capture injects).
    Seccomp { mode: u32 },
    /// x86 user shadow stack enabled (not restored).
    ShadowStack,
    /// A POSIX timer that is not carried (see [`timer_blocker`]).
    PosixTimer { id: u32, why: String },
    /// Stopped by job control, zombie or dead.
    State { state: char },
    /// The thread-group leader has exited while other threads run.
    LeaderGone,
    /// The caller itself.
    SelfProcess,
    /// A kernel thread: no user memory to save.
    KernelThread,
    /// A user process that has let go of its memory on its way to being a
    /// zombie.
    Exiting,
    /// In a tree (`--tree`), a process below the top whose fd 0/1/2 is a
    /// tty other than the top's on the same fd (the destination gives them
    /// all the top's).
    TreeStdio {
        fd: i32,
        target: String,
        top: String,
    },
}

impl fmt::Display for Blocker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Blocker::OpenFd { fd, target } => write!(f, "fd {fd} is open ({target})"),
            Blocker::DeletedFile { fd, target } => {
                write!(f, "fd {fd} is open on a deleted file ({target})")
            }
            Blocker::PipeOutside { fd, target, holder } => {
                let what = if target.starts_with("socket:") {
                    "socket"
                } else {
                    "pipe"
                };
                write!(f, "fd {fd} is a {what} ({target}) also open in {holder}")
            }
            Blocker::Socket { fd, target } => write!(f, "fd {fd} is a socket ({target})"),
            Blocker::Stdio { fd, target } => write!(f, "fd {fd} is {target}"),
            Blocker::SharedMapping { start, end, name } => write!(
                f,
                "shared memory mapping {start:#x}-{end:#x} ({})",
                if name.is_empty() { "anonymous" } else { name }
            ),
            Blocker::SharedElsewhere { start, end, holder } => write!(
                f,
                "anonymous shared memory {start:#x}-{end:#x} is also mapped by {holder} \
                 (it is carried only when the process alone maps it, once)"
            ),
            Blocker::MemfdElsewhere { name, holder } => write!(
                f,
                "memfd {name} is also held by {holder} (it is carried only when the process alone holds it)"
            ),
            Blocker::Memfd { name, why } => write!(f, "memfd {name}: {why}"),
            Blocker::SpecialMapping { start, name } => {
                write!(f, "kernel special mapping {name} at {start:#x}")
            }
            Blocker::Traced { tracer } => write!(f, "already traced by pid {tracer}"),
            Blocker::Children { pids } => write!(f, "has child processes {pids:?}"),
            Blocker::Seccomp { mode } => write!(f, "runs under seccomp (mode {mode})"),
            Blocker::ShadowStack => write!(f, "uses the x86 user shadow stack"),
            Blocker::PosixTimer { id, why } => write!(f, "POSIX timer {id} {why}"),
            Blocker::State { state } => {
                write!(f, "is in state {state:?} (stopped, zombie or dead)")
            }
            Blocker::LeaderGone => write!(f, "its main thread has exited"),
            Blocker::SelfProcess => write!(
                f,
                "is the process doing the move or save itself (the mkctl agent, or this mkctl)"
            ),
            Blocker::KernelThread => write!(f, "is a kernel thread"),
            Blocker::Exiting => write!(f, "is exiting"),
            Blocker::TreeStdio { fd, target, top } => write!(
                f,
                "fd {fd} is {target}, where the top of the tree has {top}"
            ),
        }
    }
}

impl Blocker {
    /// Whether it may be gone a moment later: a descriptor the program
    /// opened for a moment (not its stdio, which it keeps).
    pub fn may_pass(&self) -> bool {
        matches!(
            self,
            Blocker::OpenFd { fd: 3.., .. }
                | Blocker::DeletedFile { fd: 3.., .. }
                | Blocker::Socket { fd: 3.., .. }
        )
    }
}

/// Why a process is not migrated.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("process {pid} cannot be moved or saved: {}", join(blockers))]
    Blocked { pid: i32, blockers: Vec<Blocker> },
    #[error("{}", inspect_failure(*pid, source))]
    Inspect {
        pid: i32,
        #[source]
        source: io::Error,
    },
}

/// What a failure to read `/proc/<pid>` means, in words a user can act on.
fn inspect_failure(pid: i32, e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => format!(
            "there is no process {pid} on this kernel (it has exited, or it runs on another one)"
        ),
        io::ErrorKind::PermissionDenied => format!(
            "the kernel does not let mkctl read process {pid}'s memory map: that takes the \
             access ptrace takes (root, and a process that is dumpable and in mkctl's \
             namespaces)"
        ),
        _ => format!("cannot inspect process {pid} through /proc"),
    }
}

/// The blockers, then each rule they break, once.
fn join(b: &[Blocker]) -> String {
    let mut s = b
        .iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join("; ");
    s.push_str(&rules(b));
    s
}

/// Each refused process of a tree (`process PID: blockers`), then each
/// rule they break, once for all.
pub(crate) fn join_refused(all: &[(i32, Vec<Blocker>)]) -> String {
    let mut s = all
        .iter()
        .map(|(pid, b)| {
            let what: Vec<String> = b.iter().map(|x| x.to_string()).collect();
            format!("process {pid}: {}", what.join("; "))
        })
        .collect::<Vec<_>>()
        .join("; ");
    let every: Vec<Blocker> = all.iter().flat_map(|(_, b)| b.iter().cloned()).collect();
    s.push_str(&rules(&every));
    s
}

/// The rules that blockers `b` break, each once: ` (...)` after another.
fn rules(b: &[Blocker]) -> String {
    let mut s = String::new();
    if b.iter().any(|x| matches!(x, Blocker::Stdio { .. })) {
        s.push_str(
            " (fds 0-2 must be pipes, ttys, regular files, eventfds, timerfds, signalfds, epolls, memfds or /dev/null, zero, random, urandom)",
        );
    }
    if b.iter().any(|x| matches!(x, Blocker::OpenFd { .. })) {
        s.push_str(" (descriptors are carried when open on regular files, eventfds, timerfds, signalfds, epolls, memfds, pipes, socket pairs or /dev/null, zero, random, urandom)");
    }
    if b.iter().any(|x| matches!(x, Blocker::Socket { .. })) {
        s.push_str(" (sockets are carried as AF_UNIX stream or datagram socket pairs whose two ends move: on fds 3 and up of the process, or of the tree's processes with --tree)");
    }
    if b.iter().any(|x| matches!(x, Blocker::PipeOutside { .. })) {
        s.push_str(" (a pipe is carried with its bytes when every end of it moves: on fds 3 and up of the process, or, with --tree, on any descriptor of the tree's processes but the top's 0-2)");
    }
    if b.iter().any(|x| matches!(x, Blocker::Children { .. })) {
        s.push_str(" (--tree moves a process with all its descendants)");
    }
    if b.iter().any(|x| matches!(x, Blocker::TreeStdio { .. })) {
        s.push_str(" (in a tree, a tty on fds 0-2 must be the top's on the same fd: the destination gives them all the top's)");
    }
    if b.iter().any(|x| matches!(x, Blocker::SharedMapping { .. })) {
        s.push_str(" (a file mapped shared is carried only read-only, as a copy)");
    }
    if b.iter().any(|x| matches!(x, Blocker::DeletedFile { .. })) {
        s.push_str(" (deleted files are not carried: their content exists nowhere else)");
    }
    s
}

/// What the pre-check saw of a migratable process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Precheck {
    pub pid: i32,
    pub threads: usize,
    pub stdio: [StdioKind; 3],
    pub mappings: usize,
}

/// Classifies the target of fd 0/1/2.
pub(crate) fn stdio_kind(target: &str) -> Option<StdioKind> {
    if target.starts_with("pipe:[") {
        Some(StdioKind::Pipe)
    } else if target == "/dev/null" {
        Some(StdioKind::DevNull)
    } else if target.starts_with("/dev/pts/")
        || target.starts_with("/dev/tty")
        || target == "/dev/console"
    {
        Some(StdioKind::Tty)
    } else {
        None
    }
}

/// What a descriptor's `/proc` link says it is open on, for the files that
/// are carried: a device of [`DEVICES`], or an absolute path outside /dev
/// that was not deleted (whether it is a regular file is checked on the
/// file itself where it can be).
pub(crate) fn carried_file(target: &str) -> Option<FileKind> {
    if DEVICES.contains(&target) {
        Some(FileKind::Device)
    } else if target == EVENTFD {
        Some(FileKind::Eventfd)
    } else if target == TIMERFD {
        Some(FileKind::Timerfd)
    } else if target == SIGNALFD {
        Some(FileKind::Signalfd)
    } else if target == EPOLL {
        Some(FileKind::Epoll)
    } else if is_memfd(target) {
        Some(FileKind::Memfd)
    } else if target.starts_with("pipe:[") {
        Some(FileKind::Pipe)
    } else if target.starts_with('/')
        && !target.starts_with("/dev/")
        && !target.ends_with(" (deleted)")
    {
        Some(FileKind::Regular)
    } else {
        None
    }
}

/// The other processes a move carries with this one (a tree's, `--tree`:
/// every descendant of its top, as they are when asked, so a child forked
/// a moment ago counts too) and the top's fds 0-2: pipes and socket pairs
/// between the tree's processes are carried, and only what is the top's
/// on the same fd is the destination's to replace. The default: the
/// process alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Scope {
    /// The top of the tree.
    pub(crate) top: Option<i32>,
    /// The `/proc` link targets of the top's fds 0, 1, 2 (in a tree).
    pub(crate) top_stdio: Option<[String; 3]>,
}

impl Scope {
    /// Whether `pid` moves too: the top or one of its descendants (its
    /// parents followed up under `root`).
    fn inside(&self, root: &Path, pid: i32) -> bool {
        let Some(top) = self.top else {
            return false;
        };
        let mut p = pid;
        for _ in 0..4096 {
            if p == top {
                return true;
            }
            match ProcDir::new(root, p).stat() {
                Ok(s) if s.ppid > 1 => p = s.ppid,
                _ => return false,
            }
        }
        false
    }

    /// Whether a process of the scope holds `target` on a descriptor.
    fn holds(&self, root: &Path, target: &str) -> bool {
        let Some(top) = self.top else {
            return false;
        };
        super::tree_of(top).unwrap_or_default().iter().any(|&pid| {
            std::fs::read_dir(root.join(pid.to_string()).join("fd")).is_ok_and(|d| {
                d.flatten().any(|f| {
                    std::fs::read_link(f.path()).is_ok_and(|t| t.to_string_lossy() == target)
                })
            })
        })
    }

    /// Whether fd `fd` (0-2) open on `target` is replaced by the
    /// destination: always alone; in a tree, when it is the top's.
    fn replaced(&self, fd: i32, target: &str) -> bool {
        match &self.top_stdio {
            None => true,
            Some(top) => top[fd as usize] == target,
        }
    }
}

/// Stdio kinds, and the carried files' descriptors and kinds.
type SortedFds = ([StdioKind; 3], Vec<(i32, FileKind)>);

/// Sorts the descriptors `pd` lists into stdio kinds, carried files and
/// blockers. With `stat`, each carried file's `/proc` link is followed to
/// check it is a regular file (not a directory, socket file or FIFO).
fn sort_fds(
    pd: &ProcDir,
    stat: bool,
    scope: &Scope,
    blockers: &mut Vec<Blocker>,
) -> io::Result<SortedFds> {
    let mut stdio = [StdioKind::Closed; 3];
    let mut files = Vec::new();
    let mut peers = Vec::new();
    for (fd, target) in pd.fds()? {
        if target.starts_with("socket:") {
            // Only under the real /proc can the kernel be asked about it.
            match stat.then(|| socket_peer(&target)) {
                Some(Ok(peer)) if fd > 2 => {
                    files.push((fd, FileKind::Socket));
                    peers.push((fd, peer));
                }
                Some(Err(why)) => blockers.push(Blocker::Socket {
                    fd,
                    target: format!("{target}, {why}"),
                }),
                _ => blockers.push(Blocker::Socket { fd, target }),
            }
            continue;
        }
        if (0..3).contains(&fd) {
            if let Some(k) = stdio_kind(&target) {
                // (A pipe between a tree's processes is carried.)
                if k != StdioKind::Pipe || scope.replaced(fd, &target) {
                    stdio[fd as usize] = k;
                    continue;
                }
            }
        }
        let kind = carried_file(&target).filter(|k| {
            *k != FileKind::Regular || !stat || pd.fd_metadata(fd).is_ok_and(|m| m.is_file())
        });
        match kind {
            Some(k) => {
                if (0..3).contains(&fd) {
                    stdio[fd as usize] = StdioKind::File;
                }
                files.push((fd, k));
            }
            None if target.ends_with(" (deleted)") => {
                blockers.push(Blocker::DeletedFile { fd, target });
            }
            None if (0..3).contains(&fd) => blockers.push(Blocker::Stdio { fd, target }),
            None => blockers.push(Blocker::OpenFd { fd, target }),
        }
    }
    shared_blockers(pd, &mut files, &peers, scope, blockers);
    if files.len() > MAX_FILES {
        blockers.push(Blocker::OpenFd {
            fd: files[MAX_FILES].0,
            target: format!("more than {MAX_FILES} open files"),
        });
    }
    Ok((stdio, files))
}

/// Takes out of `files` the pipes and socket pairs that cannot be carried,
/// as blockers: a pipe with an end on fds 0-2 or in another process (every
/// process under the proc root is looked at) or in packet mode
/// (`O_DIRECT`); a socket whose peer is not on a carried socket of the
/// process, or that another process holds too. `peers`: each socket's fd
/// and its peer's inode. The processes of `scope` are not another: what
/// they hold moves too.
fn shared_blockers(
    pd: &ProcDir,
    files: &mut Vec<(i32, FileKind)>,
    peers: &[(i32, u32)],
    scope: &Scope,
    blockers: &mut Vec<Blocker>,
) {
    let target = |fd: i32| {
        std::fs::read_link(pd.path(&format!("fd/{fd}")))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let ends: Vec<(i32, FileKind, String)> = files
        .iter()
        .filter(|(_, k)| matches!(k, FileKind::Pipe | FileKind::Socket))
        .map(|&(fd, k)| (fd, k, target(fd)))
        .collect();
    if ends.is_empty() {
        return;
    }
    let peer_target = |fd: i32| {
        peers
            .iter()
            .find(|(f, _)| *f == fd)
            .map(|(_, p)| format!("socket:[{p}]"))
    };
    // What to look for in other processes: the ends and the sockets' peers.
    let mut wanted: Vec<String> = ends.iter().map(|(_, _, t)| t.clone()).collect();
    wanted.extend(ends.iter().filter_map(|(fd, _, _)| peer_target(*fd)));
    let mut outside: Vec<(String, String)> = Vec::new();
    for fd in 0..3 {
        let t = target(fd);
        if wanted.contains(&t) && scope.replaced(fd, &t) {
            outside.push((
                t,
                format!("fd {fd} of the process (the destination replaces 0-2)"),
            ));
        }
    }
    let me = pd.pid();
    if let Ok(dir) = std::fs::read_dir(pd.root()) {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            if pid == me || scope.inside(pd.root(), pid) {
                continue;
            }
            let Ok(fds) = std::fs::read_dir(e.path().join("fd")) else {
                continue;
            };
            for f in fds.flatten() {
                let Ok(t) = std::fs::read_link(f.path()) else {
                    continue;
                };
                let t = t.to_string_lossy();
                if wanted.iter().any(|w| *w == t) && !outside.iter().any(|(p, _)| *p == t) {
                    outside.push((t.into_owned(), format!("process {pid}")));
                }
            }
        }
    }
    let holder = |t: &str| outside.iter().find(|(p, _)| p == t).map(|(_, h)| h.clone());
    for (fd, kind, t) in ends {
        let blocker = if let Some(h) = holder(&t) {
            Some(Blocker::PipeOutside {
                fd,
                target: t,
                holder: h,
            })
        } else if kind == FileKind::Pipe {
            let packet = pd
                .fdinfo(fd)
                .is_ok_and(|(_, fl)| fl & libc::O_DIRECT as u32 != 0);
            packet.then(|| Blocker::OpenFd {
                fd,
                target: format!("{t} in packet mode (O_DIRECT)"),
            })
        } else {
            let peer = peer_target(fd).unwrap_or_default();
            // (Or in another process of the tree: the pair moves with it.)
            let here = files
                .iter()
                .any(|&(f, k)| k == FileKind::Socket && target(f) == peer)
                || scope.holds(pd.root(), &peer);
            (!here).then(|| Blocker::Socket {
                fd,
                target: match holder(&peer) {
                    Some(h) => format!("{t}, whose peer {peer} is open in {h}"),
                    None => format!("{t}, whose peer {peer} is not in the process"),
                },
            })
        };
        if let Some(b) = blocker {
            files.retain(|(f, _)| *f != fd);
            blockers.push(b);
        }
    }
}

/// Whether `/proc/net/unix` lists a socket with inode `ino` (sock_diag
/// answers "no such socket" too when it has no AF_UNIX handler).
fn listed_unix(ino: u32) -> bool {
    std::fs::read_to_string("/proc/net/unix").is_ok_and(|t| {
        t.lines()
            .skip(1)
            .any(|l| l.split_whitespace().nth(6) == Some(&ino.to_string()))
    })
}

/// Why a socket cannot be carried as one end of an AF_UNIX pair (the text
/// goes into its blocker).
#[derive(Debug, thiserror::Error)]
enum NotAPair {
    #[error("not a socket inode")]
    NoInode,
    #[error("sock_diag cannot describe it: {0} (AF_UNIX pairs need CONFIG_UNIX_DIAG)")]
    Diag(io::Error),
    #[error("an AF_UNIX socket sock_diag does not describe (no unix_diag in this kernel: a module not loaded?)")]
    NoUnixDiag,
    #[error("not an AF_UNIX socket")]
    NotUnix,
    #[error("an AF_UNIX socket of type {0}")]
    Type(u8),
    #[error("an AF_UNIX socket bound to a name")]
    Named,
    #[error("an AF_UNIX socket with no peer")]
    NoPeer,
}

/// The peer's inode of the AF_UNIX socket `target` (`socket:[<inode>]`),
/// or what keeps it from being carried as one end of a socket pair.
fn socket_peer(target: &str) -> Result<u32, NotAPair> {
    let ino: u32 = target
        .strip_prefix("socket:[")
        .and_then(|t| t.strip_suffix(']'))
        .and_then(|t| t.parse().ok())
        .ok_or(NotAPair::NoInode)?;
    let s = match super::unixdiag::query(ino) {
        Err(e) => return Err(NotAPair::Diag(e)),
        Ok(None) if listed_unix(ino) => return Err(NotAPair::NoUnixDiag),
        Ok(None) => return Err(NotAPair::NotUnix),
        Ok(Some(s)) => s,
    };
    if s.kind != libc::SOCK_STREAM as u8 && s.kind != libc::SOCK_DGRAM as u8 {
        return Err(NotAPair::Type(s.kind));
    }
    if s.named {
        return Err(NotAPair::Named);
    }
    if s.peer == 0 {
        return Err(NotAPair::NoPeer);
    }
    Ok(s.peer)
}

/// The files process `pid` has open that a move carries by path, as they
/// are now (the process runs: for a look before the freeze).
pub fn files_of(pid: i32) -> io::Result<Vec<(String, FileKind)>> {
    let pd = ProcDir::new(Path::new("/proc"), pid);
    let mut blockers = Vec::new();
    let (_, kinds) = sort_fds(&pd, true, &Scope::default(), &mut blockers)?;
    Ok(kinds
        .into_iter()
        .filter(|(_, k)| k.by_path())
        .filter_map(|(fd, k)| {
            let p = std::fs::read_link(pd.path(&format!("fd/{fd}"))).ok()?;
            Some((p.to_string_lossy().into_owned(), k))
        })
        .collect())
}

/// The frozen process's descriptors as the image carries them: stdio kinds,
/// the files with their flags, offsets, sizes and times (timerfds, signalfds
/// and pipes with their state), and the pipes with their bytes in flight.
/// Timers are read last, and their times left are given as of the moment
/// of [`CapturedFiles::kernel_clocks`], from which the caller makes the
/// process's clocks: both are of one moment.
/// Anything not carried is an error here (the pre-check refused it before
/// the freeze), unless `skip`: then only regular files and devices are
/// taken and the rest is left out (a split process keeps it at home: a
/// copy of a pipe or timer would not be the same one). Nothing of the process changes: a pipe's bytes are copied
/// with `tee`, which leaves them in the pipe.
pub(crate) fn open_files(pd: &ProcDir, skip: bool, scope: &Scope) -> io::Result<CapturedFiles> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut blockers = Vec::new();
    let (stdio, mut kinds) = sort_fds(pd, true, scope, &mut blockers)?;
    if skip {
        kinds.retain(|(_, k)| matches!(k, FileKind::Regular | FileKind::Device));
    } else if !blockers.is_empty() {
        return Err(io::Error::other(join(&blockers)));
    }
    let mut files: Vec<OpenFile> = Vec::with_capacity(kinds.len());
    let mut pipes: Vec<(String, PipeState)> = Vec::new();
    let mut timers = Vec::new();
    // Socket pairs: the inodes of ends 0 and 1, the state, which ends'
    // queues were read.
    let mut socks: Vec<(u32, u32, SocketPairState, [bool; 2])> = Vec::new();
    let mut pidfd = None;
    let mut epolls = Vec::new();
    // Memfds on descriptors: inode, id, the first descriptor.
    let mut memfds: Vec<(u64, u32, i32)> = Vec::new();
    for (fd, kind) in kinds {
        let (pos, flags) = pd.fdinfo(fd)?;
        let m = pd.fd_metadata(fd)?;
        let path = std::fs::read_link(pd.path(&format!("fd/{fd}")))?
            .to_string_lossy()
            .into_owned();
        let ok = match kind {
            FileKind::Regular => m.is_file(),
            FileKind::Device => m.file_type().is_char_device(),
            FileKind::Eventfd => path == EVENTFD,
            FileKind::Timerfd => path == TIMERFD,
            FileKind::Signalfd => path == SIGNALFD,
            FileKind::Epoll => path == EPOLL,
            FileKind::Memfd => m.is_file() && is_memfd(&path),
            FileKind::Pipe => m.file_type().is_fifo() && path.starts_with("pipe:["),
            FileKind::Socket => m.file_type().is_socket(),
        };
        if !ok {
            return Err(io::Error::other(format!("fd {fd} ({path}) changed kind")));
        }
        let mut state = FileState::None;
        let (size, mtime_ns) = match kind {
            FileKind::Regular => (
                m.len(),
                (m.mtime() as u64)
                    .saturating_mul(1_000_000_000)
                    .saturating_add(m.mtime_nsec() as u64),
            ),
            FileKind::Device => (0, 0),
            FileKind::Eventfd => {
                let count = pd
                    .fdinfo_field(fd, "eventfd-count:")?
                    .and_then(|v| u64::from_str_radix(&v, 16).ok());
                let sem = pd.fdinfo_field(fd, "eventfd-semaphore:")?;
                match (count, sem.as_deref()) {
                    (Some(c), Some(s @ ("0" | "1"))) => (c, u64::from(s == "1")),
                    // Older kernels (the Debian 6.1 guests) show the count
                    // only: the mode is found by trying it.
                    (Some(c), None) if !skip => {
                        if pidfd.is_none() {
                            pidfd = Some(pidfd_of(pd)?);
                        }
                        let copy = getfd(pidfd.as_ref().expect("just set"), fd)?;
                        let sem = eventfd_is_semaphore(&copy, c)
                            .map_err(|e| io::Error::other(format!("eventfd on fd {fd}: {e}")))?;
                        (c, u64::from(sem))
                    }
                    _ => {
                        return Err(io::Error::other(format!(
                            "fd {fd} is an eventfd and this kernel's fdinfo does not say its count"
                        )))
                    }
                }
            }
            FileKind::Timerfd => {
                // Read last (below), next to the caller's reading of the
                // process's clocks.
                timers.push(files.len());
                (0, 0)
            }
            FileKind::Socket => {
                let ino: u32 = path
                    .strip_prefix("socket:[")
                    .and_then(|t| t.strip_suffix(']'))
                    .and_then(|t| t.parse().ok())
                    .ok_or_else(|| io::Error::other(format!("fd {fd}: {path}?")))?;
                let sk = super::unixdiag::query(ino)?
                    .ok_or_else(|| io::Error::other(format!("fd {fd}: {path} is gone")))?;
                let i = match socks.iter().position(|x| x.0 == ino || x.1 == ino) {
                    Some(i) => i,
                    None => {
                        socks.push((
                            ino,
                            sk.peer,
                            SocketPairState {
                                id: socks.len() as u32 + 1,
                                kind: sk.kind,
                                shutdown: [0; 2],
                                queued: [Vec::new(), Vec::new()],
                            },
                            [false; 2],
                        ));
                        socks.len() - 1
                    }
                };
                let end = usize::from(socks[i].0 != ino);
                if !socks[i].3[end] {
                    if pidfd.is_none() {
                        pidfd = Some(pidfd_of(pd)?);
                    }
                    let copy = getfd(pidfd.as_ref().expect("just set"), fd)?;
                    let q = peek_queue(&copy, sk.kind, sk.shutdown)
                        .map_err(|e| io::Error::other(format!("socket on fd {fd}: {e}")))?;
                    let pair = &mut socks[i];
                    pair.2.queued[end] = q;
                    pair.2.shutdown[end] = sk.shutdown;
                    pair.3[end] = true;
                }
                state = FileState::Socket {
                    id: socks[i].2.id,
                    end: end as u8,
                };
                (0, 0)
            }
            FileKind::Signalfd => {
                state = FileState::Signals(pd.signalfd_mask(fd)?);
                (0, 0)
            }
            FileKind::Epoll => {
                epolls.push(EpollState {
                    fd: fd as u32,
                    watches: epoll_watches(pd, fd)?,
                });
                (0, 0)
            }
            FileKind::Memfd => {
                use std::os::unix::fs::MetadataExt;
                let id = match memfds.iter().find(|x| x.0 == m.ino()) {
                    Some(x) => x.1,
                    None => {
                        let id = memfds.len() as u32 + 1;
                        memfds.push((m.ino(), id, fd));
                        id
                    }
                };
                state = FileState::Memfd(id);
                (m.len(), 0)
            }
            FileKind::Pipe => {
                let id = match pipes.iter().position(|(p, _)| *p == path) {
                    Some(i) => pipes[i].1.id,
                    None => {
                        let id = pipes.len() as u32 + 1;
                        let (capacity, bytes) = pipe_bytes(pd, fd)?;
                        pipes.push((
                            path.clone(),
                            PipeState {
                                id,
                                capacity,
                                bytes,
                            },
                        ));
                        id
                    }
                };
                state = FileState::Pipe(id);
                (0, 0)
            }
        };
        files.push(OpenFile {
            fd: fd as u32,
            kind,
            flags: flags & FILE_FLAGS,
            pos,
            path,
            size,
            mtime_ns,
            state,
            share: None,
        });
    }
    let socketpairs: Vec<SocketPairState> = socks.into_iter().map(|x| x.2).collect();
    let total: usize = pipes.iter().map(|(_, p)| p.bytes.len()).sum::<usize>()
        + socketpairs
            .iter()
            .flat_map(|x| x.queued.iter().flatten())
            .map(Vec::len)
            .sum::<usize>();
    if total > MAX_PIPE_BYTES {
        return Err(io::Error::other(format!(
            "its pipes and socket pairs hold {total} bytes in flight; at most {MAX_PIPE_BYTES} are carried"
        )));
    }
    if !timers.is_empty() {
        if pidfd.is_none() {
            pidfd = Some(pidfd_of(pd)?);
        }
        let pidfd = pidfd.as_ref().expect("just set");
        for &i in &timers {
            let fd = files[i].fd as i32;
            let copy = getfd(pidfd, fd)?;
            files[i].state = FileState::Timer(timer_state(pd, fd, &copy)?);
        }
    }
    // The moment the process's clocks are taken: each timer's expiry
    // becomes the time left from it.
    let clocks = super::procfs::kernel_clocks()?;
    for &i in &timers {
        if let FileState::Timer(t) = &mut files[i].state {
            let realtime_abs = matches!(t.clockid, 0 | 8) && t.settime_flags & TFD_ABSTIME != 0;
            if t.armed && !realtime_abs {
                t.value_ns = (i128::from(t.value_ns) - clocks.0)
                    .clamp(i128::from(i64::MIN), i128::from(i64::MAX))
                    as i64;
            }
        }
    }
    for i in 1..files.len() {
        let (earlier, rest) = files.split_at_mut(i);
        share_with_earlier(pd.pid(), earlier, &mut rest[0]);
    }
    // A dup of an epoll shares its watches: listed once, with the first.
    epolls.retain(|e: &EpollState| files.iter().any(|f| f.fd == e.fd && f.share.is_none()));
    for e in &epolls {
        for w in &e.watches {
            let carried = files.iter().any(|f| f.fd == w.fd)
                || (w.fd < 3 && stdio[w.fd as usize] != StdioKind::Closed);
            if !carried {
                return Err(io::Error::other(format!(
                    "fd {} is an epoll watching fd {}, which is not carried",
                    e.fd, w.fd
                )));
            }
        }
    }
    Ok(CapturedFiles {
        stdio,
        files,
        pipes: pipes.into_iter().map(|(_, p)| p).collect(),
        socketpairs,
        epolls,
        memfds,
        kernel_clocks: clocks,
    })
}

/// The memfds the process holds: `on_fds` (inode, id, a descriptor, from
/// [`open_files`]) and those it maps shared (numbered on from there), each
/// with its name, size, seals, the starts of its mappings, and its content
/// outside them (holes left out; at most [`MAX_MEMFD_BYTES`] in all).
pub(crate) fn memfd_states(
    pd: &ProcDir,
    on_fds: &[(u64, u32, i32)],
) -> io::Result<Vec<MemfdState>> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    use std::os::unix::fs::MetadataExt;
    let maps = pd.maps()?;
    let mapped: Vec<&MapsEntry> = maps.iter().filter(|m| memfd_shared(m)).collect();
    let mut all: Vec<(u64, u32)> = on_fds.iter().map(|x| (x.0, x.1)).collect();
    for m in &mapped {
        if !all.iter().any(|x| x.0 == m.inode) {
            all.push((m.inode, all.len() as u32 + 1));
        }
    }
    let mut out = Vec::with_capacity(all.len());
    let mut total = 0usize;
    for (ino, id) in all {
        let here: Vec<&&MapsEntry> = mapped.iter().filter(|m| m.inode == ino).collect();
        // A handle on it, with a description of its own (seeking the
        // process's own would move its offset): its descriptor or the
        // mapping's file, opened again through /proc.
        let (file, path): (std::fs::File, String) = match on_fds.iter().find(|x| x.0 == ino) {
            Some(&(_, _, fd)) => {
                let link = pd.path(&format!("fd/{fd}"));
                let path = std::fs::read_link(&link)?.to_string_lossy().into_owned();
                (std::fs::File::open(&link)?, path)
            }
            None => {
                let m = here[0];
                let f =
                    std::fs::File::open(pd.path(&format!("map_files/{:x}-{:x}", m.start, m.end)))?;
                (f, m.name.clone())
            }
        };
        let name = memfd_name(&path).to_string();
        let refuse = |why: String| io::Error::other(format!("memfd {name}: {why}"));
        if file.metadata()?.ino() != ino {
            return Err(refuse("changed while it was looked at".into()));
        }
        let fs = nix::sys::statfs::fstatfs(&file).map_err(io::Error::from)?;
        if fs.filesystem_type() == nix::sys::statfs::HUGETLBFS_MAGIC {
            return Err(refuse(
                "on huge pages (MFD_HUGETLB), which are not carried".into(),
            ));
        }
        let size = file.metadata()?.len();
        // SAFETY: fcntl(F_GET_SEALS) on a descriptor we own.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 {
            return Err(refuse(format!(
                "F_GET_SEALS: {}",
                io::Error::last_os_error()
            )));
        }
        let write_seals = (libc::F_SEAL_WRITE | libc::F_SEAL_FUTURE_WRITE) as u32;
        if !here.is_empty() && seals as u32 & write_seals != 0 {
            return Err(refuse(
                "is sealed against writes and mapped: not carried (its pages would have to be written around the seal)"
                    .into(),
            ));
        }
        // What the mappings carry: their file ranges.
        let mut covered: Vec<(u64, u64)> = here
            .iter()
            .map(|m| (m.offset, m.offset + (m.end - m.start)))
            .collect();
        covered.sort_unstable();
        let mut data = Vec::new();
        let mut at = 0u64;
        while at < size {
            use nix::unistd::{lseek, Whence};
            let Ok(start) = lseek(&file, at as i64, Whence::SeekData) else {
                break; // ENXIO: no data from here on.
            };
            let start = start as u64;
            let end = lseek(&file, start as i64, Whence::SeekHole)
                .map_or(size, |e| e as u64)
                .min(size);
            // [start, end) less the covered ranges.
            let mut pieces = vec![(start, end)];
            for &(cs, ce) in &covered {
                pieces = pieces
                    .into_iter()
                    .flat_map(|(s, e)| {
                        let mut v = Vec::new();
                        if s < cs.min(e) {
                            v.push((s, cs.min(e)));
                        }
                        if ce.max(s) < e {
                            v.push((ce.max(s), e));
                        }
                        v
                    })
                    .collect();
            }
            for (s, e) in pieces {
                total += (e - s) as usize;
                if total > MAX_MEMFD_BYTES {
                    return Err(refuse(format!(
                        "holds more than {} KiB outside the memory the process maps of it; at most that is carried",
                        MAX_MEMFD_BYTES / 1024
                    )));
                }
                let mut buf = vec![0u8; (e - s) as usize];
                file.read_exact_at(&mut buf, s)?;
                data.push((s, buf));
            }
            at = end.max(start + 1);
        }
        out.push(MemfdState {
            id,
            name,
            size,
            seals: seals as u32,
            maps: here.iter().map(|m| m.start).collect(),
            data,
        });
    }
    Ok(out)
}

/// Whether the eventfd `efd` (holding `count`) is in semaphore mode, for
/// kernels whose fdinfo does not say: 2 is added and one read taken — a
/// semaphore gives 1, a counter everything — and the count is put back as
/// it was (a semaphore is read once more, a counter is written its count
/// again). Only for a frozen process alone holding it: another reader
/// could take a value meanwhile, and an edge-triggered epoll in the
/// process sees a wake-up should the move fail.
pub(crate) fn eventfd_is_semaphore(efd: &impl std::os::fd::AsFd, count: u64) -> io::Result<bool> {
    use nix::unistd::{read, write};
    // The counter holds at most u64::MAX - 1; a write that would pass it
    // blocks.
    if count > u64::MAX - 3 {
        return Err(io::Error::other(format!(
            "its count {count:#x} is too close to the top to try its mode"
        )));
    }
    let word = |v: u64| v.to_ne_bytes();
    let put = |v: u64| -> io::Result<()> {
        match write(efd, &word(v)) {
            Ok(8) => Ok(()),
            Ok(n) => Err(io::Error::other(format!("a write took {n} bytes"))),
            Err(e) => Err(e.into()),
        }
    };
    let take = || -> io::Result<u64> {
        let mut b = [0u8; 8];
        match read(efd, &mut b) {
            Ok(8) => Ok(u64::from_ne_bytes(b)),
            Ok(n) => Err(io::Error::other(format!("a read gave {n} bytes"))),
            Err(e) => Err(e.into()),
        }
    };
    put(2)?;
    let got = take()?;
    if got == 1 {
        // count + 1 left.
        take()?;
        Ok(true)
    } else if got == count + 2 {
        // 0 left.
        if count != 0 {
            put(count)?;
        }
        Ok(false)
    } else {
        Err(io::Error::other(format!(
            "a read gave {got} where 1 or {} was due: someone else uses it",
            count + 2
        )))
    }
}

/// The watches of epoll `fd` (its fdinfo's `tfd:` lines), each checked to
/// be on the file that descriptor holds now: epoll keeps a watch on a file
/// whose descriptor was closed or reused, and such a watch cannot be set
/// again by number.
fn epoll_watches(pd: &ProcDir, fd: i32) -> io::Result<Vec<EpollWatch>> {
    use std::os::unix::fs::MetadataExt;
    let text = std::fs::read_to_string(pd.path(&format!("fdinfo/{fd}")))?;
    let mut out = Vec::new();
    for w in super::procfs::parse_epoll_info(&text)? {
        let now = pd.fd_metadata(w.fd as i32).ok().map(|m| m.ino());
        if now != Some(w.ino) {
            return Err(io::Error::other(format!(
                "fd {fd} is an epoll watching a file that fd {} no longer holds (closed or replaced after it was added): not carried",
                w.fd
            )));
        }
        out.push(EpollWatch {
            fd: w.fd,
            events: w.events,
            data: w.data,
        });
    }
    Ok(out)
}

/// What [`open_files`] captures.
pub(crate) struct CapturedFiles {
    pub stdio: [StdioKind; 3],
    pub files: Vec<OpenFile>,
    pub pipes: Vec<PipeState>,
    pub socketpairs: Vec<SocketPairState>,
    pub epolls: Vec<EpollState>,
    /// Memfds on descriptors: inode, id, a descriptor ([`memfd_states`]
    /// makes their states).
    pub memfds: Vec<(u64, u32, i32)>,
    /// This kernel's `CLOCK_MONOTONIC` and `CLOCK_BOOTTIME` (its own, no
    /// time namespace) at the moment the timers' times left are of: the
    /// process's clocks are these plus its namespace's offsets.
    pub kernel_clocks: (i128, i128),
}

/// What a read at this end of a socket pair would return, without taking
/// it: a stream's bytes (one peek of all `SIOCINQ` says are queued), or the
/// datagrams one by one (`SO_PEEK_OFF` set to 0 to step through them, and
/// back to -1, its value: a socket that uses `SO_PEEK_OFF` itself is
/// refused). Descriptors in flight (`SCM_RIGHTS`) are refused. On an end
/// shut down for reading, a zero-length datagram cannot be told from the
/// end of the queue: the queue is taken to end there.
fn peek_queue(copy: &std::os::fd::OwnedFd, kind: u8, shutdown: u8) -> io::Result<Vec<Vec<u8>>> {
    use std::os::fd::AsRawFd;
    let fd = copy.as_raw_fd();
    let peek_off = |v: Option<libc::c_int>| -> io::Result<libc::c_int> {
        let mut x: libc::c_int = v.unwrap_or(0);
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: get/setsockopt on a socket we hold, one int in a live
        // local.
        let r = unsafe {
            match v {
                None => libc::getsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_PEEK_OFF,
                    (&raw mut x).cast(),
                    &mut len,
                ),
                Some(_) => libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_PEEK_OFF,
                    (&raw const x).cast(),
                    len,
                ),
            }
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(x)
    };
    if peek_off(None)? != -1 {
        return Err(io::Error::other("it uses SO_PEEK_OFF"));
    }
    if kind == libc::SOCK_STREAM as u8 {
        let mut n: libc::c_int = 0;
        // SAFETY: SIOCINQ writes one int into a live local.
        if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) } != 0 {
            return Err(io::Error::last_os_error());
        }
        if n <= 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; n as usize];
        let got = peek(fd, &mut buf)?;
        if got != buf.len() {
            return Err(io::Error::other(format!(
                "peeked {got} of its {n} bytes queued (credentials passed between them?)"
            )));
        }
        return Ok(vec![buf]);
    }
    peek_off(Some(0))?;
    let mut out = Vec::new();
    let r = (|| {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let got = match peek(fd, &mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                r => r?,
            };
            if got == 0 && shutdown & 1 != 0 {
                return Ok(());
            }
            if out.len() == super::image::MAX_DGRAMS {
                return Err(io::Error::other(format!(
                    "more than {} datagrams queued",
                    super::image::MAX_DGRAMS
                )));
            }
            out.push(buf[..got].to_vec());
        }
    })();
    let back = peek_off(Some(-1));
    r?;
    back?;
    Ok(out)
}

/// `recvmsg(MSG_PEEK | MSG_DONTWAIT)` into `buf`: the length, or an error
/// for a truncated message or descriptors in flight (those the peek put in
/// this process are closed).
fn peek(fd: i32, buf: &mut [u8]) -> io::Result<usize> {
    let mut ctl = [0u64; 64];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; zeroed then filled with live pointers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctl.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&ctl);
    // SAFETY: recvmsg writes into `buf` and `ctl` through `msg`, all live.
    let n = unsafe {
        libc::recvmsg(
            fd,
            &mut msg,
            libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut rights = false;
    // SAFETY: the CMSG_* walk stays within `msg.msg_controllen` bytes of
    // `ctl`, as the kernel filled it.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                rights = true;
                let data = libc::CMSG_DATA(c).cast::<i32>();
                let n = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                for i in 0..n {
                    libc::close(std::ptr::read_unaligned(data.add(i)));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if rights {
        return Err(io::Error::other(
            "descriptors in flight (SCM_RIGHTS) are not carried",
        ));
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(io::Error::other("a message larger than 256 KiB is queued"));
    }
    Ok(n as usize)
}

/// Marks `f` as sharing the open file description of an earlier carried
/// descriptor (a `dup`), as `kcmp(KCMP_FILE)` says; it then takes that one's
/// state (read a moment earlier: a timer may have moved on). Without
/// `kcmp` (a kernel without `CONFIG_KCMP`) descriptors stay separate.
/// Whether descriptor `a` of process `pa` and `b` of `pb` are one open
/// file description (`kcmp(KCMP_FILE)`); false where the kernel cannot say.
pub(crate) fn same_file(pa: i32, a: u32, pb: i32, b: u32) -> bool {
    // SAFETY: kcmp takes integers only.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pa,
            pb,
            0, // KCMP_FILE
            a as libc::c_ulong,
            b as libc::c_ulong,
        )
    };
    r == 0
}

fn share_with_earlier(pid: i32, earlier: &[OpenFile], f: &mut OpenFile) {
    let cloexec = libc::O_CLOEXEC as u32;
    for g in earlier {
        if g.share.is_some()
            || g.kind != f.kind
            || g.path != f.path
            || g.flags & !cloexec != f.flags & !cloexec
        {
            continue;
        }
        if same_file(pid, g.fd, pid, f.fd) {
            f.share = Some(g.fd);
            f.pos = g.pos;
            f.size = g.size;
            f.mtime_ns = g.mtime_ns;
            f.state = g.state;
            return;
        }
    }
}

fn pidfd_of(pd: &ProcDir) -> io::Result<std::os::fd::OwnedFd> {
    crate::uffd::pidfd_open(nix::unistd::Pid::from_raw(pd.pid())).map_err(io::Error::from)
}

/// A copy of descriptor `fd` of the process behind `pidfd`.
fn getfd(pidfd: &std::os::fd::OwnedFd, fd: i32) -> io::Result<std::os::fd::OwnedFd> {
    crate::uffd::pidfd_getfd(pidfd, fd)
        .map_err(|e| io::Error::other(format!("pidfd_getfd of fd {fd}: {e}")))
}

/// A timerfd as read at one moment: its state with `value_ns` the expiry on
/// this kernel's `CLOCK_MONOTONIC` (or, absolute on a real-time clock, in
/// `CLOCK_REALTIME`), to be made relative to the moment the process's
/// clocks are taken.
///
/// Clock, flags and unread expirations come from fdinfo; the time left and
/// period from `timerfd_gettime` on a copy of the descriptor (fdinfo shows
/// 0 left for a periodic timer that fired and was not read since; the call
/// moves such a timer on to its next expiry, counting the periods missed
/// into its ticks, as the process's next read would). To have ticks and
/// time left of one moment: `timerfd_gettime`, fdinfo, the clock,
/// `timerfd_gettime`, the clock, fdinfo again; done again if the ticks
/// changed in between (it expired) or the two clock readings are more than
/// 1 ms apart (this thread was held up: a TCG guest's vCPU stalls for tens
/// of ms at times, which showed as a timer early or late by as much).
///
/// A periodic timer reads 0 left for as long as its expiry has passed but
/// the timer interrupt that runs it has not come: on a TCG guest of a
/// loaded host, long enough to be read so (seen in CI). Taken for disarmed,
/// it was restored disarmed and never fired again. So 0 left with a period
/// is read again, every millisecond, until it fires (its ticks change) or
/// for [`PENDING_EXPIRY`]; after that it is what it says, disarmed with a
/// period kept (`timerfd_settime` with a period and no value), and costs
/// that much downtime.
fn timer_state(pd: &ProcDir, fd: i32, copy: &std::os::fd::OwnedFd) -> io::Result<TimerState> {
    use std::os::fd::AsRawFd;
    let gettime = || -> io::Result<libc::itimerspec> {
        // SAFETY: itimerspec is plain data; timerfd_gettime writes one into
        // this live local.
        let mut cur: libc::itimerspec = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::timerfd_gettime(copy.as_raw_fd(), &mut cur) } != 0 {
            return Err(io::Error::other(format!(
                "timerfd_gettime of fd {fd}: {}",
                io::Error::last_os_error()
            )));
        }
        Ok(cur)
    };
    let ns = |t: libc::timespec| t.tv_sec * 1_000_000_000 + t.tv_nsec;
    let since = std::time::Instant::now();
    let mut unsteady = 0;
    while unsteady < 100 {
        gettime()?;
        let (_, before, _) = pd.timerfd_info(fd)?;
        let g1 = clock_ns(libc::CLOCK_MONOTONIC);
        let r1 = clock_ns(libc::CLOCK_REALTIME);
        let cur = gettime()?;
        let g2 = clock_ns(libc::CLOCK_MONOTONIC);
        let (clockid, ticks, settime_flags) = pd.timerfd_info(fd)?;
        if ticks != before || g2.saturating_sub(g1) > 1_000_000 {
            unsteady += 1;
            continue;
        }
        let left = ns(cur.it_value);
        if expiry_pending(left, ns(cur.it_interval), since.elapsed()) {
            std::thread::sleep(std::time::Duration::from_millis(1));
            continue;
        }
        let armed = left != 0;
        let value_ns = if !armed {
            0
        } else if matches!(clockid, 0 | 8) && settime_flags & TFD_ABSTIME != 0 {
            // Real time goes on while the process is away: keep the moment.
            r1 as i64 + left
        } else {
            // The middle of the window the time left was read in.
            ((g1 / 2 + g2 / 2) as i64).saturating_add(left)
        };
        return Ok(TimerState {
            clockid,
            settime_flags,
            ticks,
            armed,
            value_ns,
            interval_ns: ns(cur.it_interval) as u64,
        });
    }
    Err(io::Error::other(format!(
        "timerfd on fd {fd}: no steady reading of it in 100 tries"
    )))
}

/// How long [`timer_state`] waits for a periodic timer reading 0 left to
/// fire before it takes it for disarmed.
const PENDING_EXPIRY: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether a timerfd reading `left` ns to go with period `interval` ns,
/// `waited` into its reading, may be one whose expiry passed and whose
/// interrupt has not come yet: read it again.
fn expiry_pending(left: i64, interval: i64, waited: std::time::Duration) -> bool {
    left == 0 && interval != 0 && waited < PENDING_EXPIRY
}

/// `clock_gettime(clock)` in ns.
pub(crate) fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `t`, a live local.
    unsafe { libc::clock_gettime(clock, &mut t) };
    (t.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(t.tv_nsec as u64)
}

/// The capacity of the pipe on `fd` and the bytes in it, copied with `tee`
/// into a pipe of ours (they stay in the process's pipe). The pipe is
/// reached through a new read-only open of `/proc/<pid>/fd/<fd>` (`tee`
/// reads from a read end; the process may hold only the write end).
fn pipe_bytes(pd: &ProcDir, fd: i32) -> io::Result<(u32, Vec<u8>)> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::fs::OpenOptionsExt;
    let err = |what: &str| {
        io::Error::other(format!(
            "pipe on fd {fd}: {what}: {}",
            io::Error::last_os_error()
        ))
    };
    let src = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(pd.path(&format!("fd/{fd}")))?;
    // SAFETY: fcntl/ioctl on a descriptor we own; FIONREAD writes one int
    // into `n`, a live local.
    let cap = unsafe { libc::fcntl(src.as_raw_fd(), libc::F_GETPIPE_SZ) };
    if cap <= 0 {
        return Err(err("F_GETPIPE_SZ"));
    }
    if cap as u32 > MAX_PIPE_CAPACITY {
        return Err(io::Error::other(format!(
            "pipe on fd {fd}: its capacity is {cap} bytes; at most {MAX_PIPE_CAPACITY} are carried"
        )));
    }
    let mut n: libc::c_int = 0;
    // SAFETY: as above.
    if unsafe { libc::ioctl(src.as_raw_fd(), libc::FIONREAD, &mut n) } != 0 {
        return Err(err("FIONREAD"));
    }
    let n = n.max(0) as usize;
    if n == 0 {
        return Ok((cap as u32, Vec::new()));
    }
    let mut ends = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `ends`, which we then own.
    if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(err("pipe2"));
    }
    // SAFETY: just created, ours alone.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };
    // As many slots as the source: every buffer of it fits in one tee.
    // SAFETY: fcntl on our descriptor.
    if unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, cap) } < cap {
        return Err(err("F_SETPIPE_SZ"));
    }
    // SAFETY: tee between two pipes we hold; no memory is passed.
    let t = unsafe { libc::tee(src.as_raw_fd(), w.as_raw_fd(), n, libc::SPLICE_F_NONBLOCK) };
    if t < 0 {
        return Err(err("tee"));
    }
    if t as usize != n {
        return Err(io::Error::other(format!(
            "pipe on fd {fd}: tee copied {t} of its {n} bytes"
        )));
    }
    drop(w);
    let mut bytes = Vec::with_capacity(n);
    std::io::Read::read_to_end(&mut std::fs::File::from(r), &mut bytes)?;
    if bytes.len() != n {
        return Err(io::Error::other(format!(
            "pipe on fd {fd}: read {} of its {n} bytes",
            bytes.len()
        )));
    }
    Ok((cap as u32, bytes))
}

/// Special mappings capture knows: carried as content (`[heap]`, `[stack]`),
/// recreated by the kernel (`[vdso]`, `[vvar]`, `[vvar_vclock]`) or fixed
/// (`[vsyscall]`).
pub(crate) fn known_special(name: &str) -> bool {
    matches!(
        name,
        "[heap]" | "[stack]" | "[vdso]" | "[vvar]" | "[vvar_vclock]" | "[vsyscall]"
    ) || name.starts_with("[anon:")
        || name.starts_with("[anon_shmem:")
}

/// Whether a `/proc` name is a memfd's (`/memfd:<name> (deleted)`), other
/// than the DSM's own (`/memfd:mkdsm-...`, a split process's memory).
pub(crate) fn is_memfd(name: &str) -> bool {
    name.starts_with("/memfd:")
        && name.ends_with(" (deleted)")
        && !name.starts_with("/memfd:mkdsm-")
}

/// A memfd's name as `memfd_create` was given it.
fn memfd_name(path: &str) -> &str {
    path.strip_prefix("/memfd:")
        .and_then(|n| n.strip_suffix(" (deleted)"))
        .unwrap_or(path)
}

/// Whether a mapping is a memfd mapped shared: carried with its pages like
/// anonymous shared memory, and mapped again from the memfd made again.
pub(crate) fn memfd_shared(m: &MapsEntry) -> bool {
    m.shared && is_memfd(&m.name)
}

/// Whether a mapping is anonymous shared memory (`MAP_SHARED |
/// MAP_ANONYMOUS`, named or not): carried with its pages and made again
/// shared and anonymous, when the process alone maps it.
pub(crate) fn shared_anon(m: &MapsEntry) -> bool {
    m.shared && (m.name == "/dev/zero (deleted)" || m.name.starts_with("[anon_shmem:"))
}

/// Anonymous shared memory of the process that is mapped elsewhere too: by
/// another process under the proc root (a `fork` child, say), or twice in
/// the process (the same pages at two addresses, which a restore would make
/// two memories).
fn shared_anon_blockers(pd: &ProcDir, maps: &[MapsEntry], out: &mut Vec<Blocker>) {
    let shm: Vec<&MapsEntry> = maps.iter().filter(|m| shared_anon(m)).collect();
    if shm.is_empty() {
        return;
    }
    let overlap = |a: &MapsEntry, b: &MapsEntry| {
        a.inode == b.inode
            && a.offset < b.offset + (b.end - b.start)
            && b.offset < a.offset + (a.end - a.start)
    };
    let mut held: Vec<(u64, String)> = Vec::new();
    for (i, a) in shm.iter().enumerate() {
        if let Some(b) = shm
            .iter()
            .enumerate()
            .find(|&(j, b)| j != i && overlap(a, b))
        {
            held.push((a.start, format!("the process at {:#x}", b.1.start)));
        }
    }
    let me = pd.pid();
    for e in std::fs::read_dir(pd.root()).into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(theirs) = ProcDir::new(pd.root(), pid).maps() else {
            continue;
        };
        for a in &shm {
            if !held.iter().any(|(s, _)| *s == a.start)
                && theirs.iter().any(|b| shared_anon(b) && overlap(a, b))
            {
                held.push((a.start, format!("process {pid}")));
            }
        }
    }
    for a in shm {
        if let Some((_, holder)) = held.iter().find(|(s, _)| *s == a.start) {
            out.push(Blocker::SharedElsewhere {
                start: a.start,
                end: a.end,
                holder: holder.clone(),
            });
        }
    }
}

/// Memfds of the process (mapped shared, or on a descriptor) that another
/// process under the proc root holds too, by a mapping or a descriptor.
fn memfd_blockers(pd: &ProcDir, maps: &[MapsEntry], out: &mut Vec<Blocker>) {
    use std::os::unix::fs::MetadataExt;
    // (inode, name) of each memfd the process holds.
    let held_by = |pd: &ProcDir, maps: &[MapsEntry]| -> Vec<(u64, String)> {
        let mut v: Vec<(u64, String)> = maps
            .iter()
            .filter(|m| memfd_shared(m) || (is_memfd(&m.name) && m.inode != 0))
            .map(|m| (m.inode, m.name.clone()))
            .collect();
        for (fd, target) in pd.fds().unwrap_or_default() {
            if is_memfd(&target) {
                if let Ok(m) = pd.fd_metadata(fd) {
                    v.push((m.ino(), target));
                }
            }
        }
        v.sort();
        v.dedup();
        v
    };
    let ours = held_by(pd, maps);
    if ours.is_empty() {
        return;
    }
    let me = pd.pid();
    let mut told: Vec<u64> = Vec::new();
    for e in std::fs::read_dir(pd.root()).into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let other = ProcDir::new(pd.root(), pid);
        let theirs = held_by(&other, &other.maps().unwrap_or_default());
        for (ino, name) in &ours {
            if !told.contains(ino) && theirs.iter().any(|(i, _)| i == ino) {
                told.push(*ino);
                out.push(Blocker::MemfdElsewhere {
                    name: memfd_name(name).to_string(),
                    holder: format!("process {pid}"),
                });
            }
        }
    }
}

/// Whether a mapping is of a file, shared and read-only (glibc's
/// `gconv-modules.cache`, a locale archive, a database read through
/// `mmap`): carried as a private copy of its content at the freeze, like
/// a private file mapping (the process cannot write it, and the file's
/// later changes are not seen). A DSM region's file is not one (it is
/// the thread-split's to carry).
pub(crate) fn read_only_file(m: &MapsEntry) -> bool {
    m.shared
        && !m.write
        && m.name.starts_with('/')
        && !m.name.ends_with(" (deleted)")
        && super::split::region_of(&m.name).is_none()
}

pub(crate) fn mapping_blockers(pd: &ProcDir, maps: &[MapsEntry], out: &mut Vec<Blocker>) {
    shared_anon_blockers(pd, maps, out);
    memfd_blockers(pd, maps, out);
    for m in maps {
        if m.shared && !shared_anon(m) && !memfd_shared(m) && !read_only_file(m) {
            out.push(Blocker::SharedMapping {
                start: m.start,
                end: m.end,
                name: m.name.clone(),
            });
        } else if m.name.starts_with('[') && !known_special(&m.name) {
            out.push(Blocker::SpecialMapping {
                start: m.start,
                name: m.name.clone(),
            });
        }
    }
}

/// Why POSIX timer `t` (the `i`-th listed) is not carried, if it is not:
/// carried are [`MAX_POSIX_TIMERS`] at most, ids below [`MAX_TIMER_ID`]
/// (a restore makes every id below the highest), on `CLOCK_REALTIME`,
/// `CLOCK_MONOTONIC` or `CLOCK_BOOTTIME`, notifying by a signal (to the
/// process or one thread) or not at all.
pub(crate) fn timer_blocker(t: &super::procfs::ProcTimer, i: usize) -> Option<String> {
    if i >= MAX_POSIX_TIMERS {
        Some(format!("is one more than the {MAX_POSIX_TIMERS} carried"))
    } else if t.id >= MAX_TIMER_ID {
        Some(format!("has an id above the {MAX_TIMER_ID} carried"))
    } else if let Err(why) = carried_clock(t.clockid) {
        Some(why.to_string())
    } else if !matches!(t.notify.as_str(), "signal" | "none") {
        Some(format!(
            "notifies by {} (carried: a signal, or none)",
            t.notify
        ))
    } else {
        None
    }
}

/// The clock a POSIX timer's `ClockID` in `/proc/pid/timers` stands for,
/// as the image carries it (one of [`POSIX_TIMER_CLOCKS`]), or why it is
/// not carried. The kernel keeps CPU clocks encoded: `~pid << 3`, then 4
/// for a thread's clock, and 0-2 for what is counted (2: the scheduler's
/// time, which `CLOCK_*_CPUTIME_ID` use); pid 0 is the timer's own process
/// (or thread).
pub(crate) fn carried_clock(clockid: i32) -> Result<u32, UncarriedClock> {
    match clockid {
        0..=i32::MAX => u32::try_from(clockid)
            .ok()
            .filter(|c| POSIX_TIMER_CLOCKS.contains(c) && *c != 2)
            .ok_or(UncarriedClock::Other(clockid)),
        // MAKE_PROCESS_CPUCLOCK(0, CPUCLOCK_SCHED): CLOCK_PROCESS_CPUTIME_ID.
        -6 => Ok(2),
        _ if clockid & 4 != 0 => Err(UncarriedClock::Thread),
        _ => Err(UncarriedClock::Process(!(clockid >> 3))),
    }
}

/// Why a POSIX timer's clock is not carried ([`carried_clock`]).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum UncarriedClock {
    #[error("runs on clock {0} ({carried})", carried = CARRIED_CLOCKS)]
    Other(i32),
    #[error("runs on the CPU clock of one thread, which /proc does not name ({carried})", carried = CARRIED_CLOCKS)]
    Thread,
    #[error("runs on the CPU clock of process {0} ({carried})", carried = CARRIED_CLOCKS)]
    Process(i32),
}

const CARRIED_CLOCKS: &str = "carried: realtime, monotonic, boottime, the process's own CPU time";

/// Checks `pid` under the proc root `root` (normally `/proc`).
pub fn check_at(root: &Path, pid: i32, self_pid: i32) -> Result<Precheck, Refusal> {
    check_within(root, pid, self_pid, &Scope::default())
}

/// [`check_at`] for a process that moves with the others of `scope`.
pub(crate) fn check_within(
    root: &Path,
    pid: i32,
    self_pid: i32,
    scope: &Scope,
) -> Result<Precheck, Refusal> {
    let inspect = |source| Refusal::Inspect { pid, source };
    let pd = ProcDir::new(root, pid);
    let mut blockers = Vec::new();
    let only = |b: Blocker| {
        Err(Refusal::Blocked {
            pid,
            blockers: vec![b],
        })
    };
    // These say all there is to say: the rest (its fds, mappings, children)
    // would only bury it.
    if pid == self_pid {
        return only(Blocker::SelfProcess);
    }
    let st = pd.status().map_err(inspect)?;
    // Older kernels print no `Kthread:`; there a process without a single
    // mapping is one too. Where they print it, a user process without one
    // is on its way out (its memory goes before it is a zombie).
    let maps = pd.maps().map_err(inspect)?;
    match (st.kthread, maps.is_empty()) {
        (Some(true), _) | (None, true) => return only(Blocker::KernelThread),
        (Some(false), true) => return only(Blocker::Exiting),
        _ => {}
    }
    if matches!(st.state, 'T' | 't' | 'Z' | 'X' | 'x') {
        blockers.push(Blocker::State { state: st.state });
    }
    if st.tracer_pid != 0 {
        blockers.push(Blocker::Traced {
            tracer: st.tracer_pid,
        });
    }
    if st.seccomp != 0 {
        blockers.push(Blocker::Seccomp { mode: st.seccomp });
    }
    if st.shadow_stack {
        blockers.push(Blocker::ShadowStack);
    }
    let tasks = pd.tasks().map_err(inspect)?;
    if !tasks.contains(&pid) {
        blockers.push(Blocker::LeaderGone);
    }
    // Under /proc itself each file is looked at; a captured tree has only
    // the links.
    let stat = root == Path::new("/proc");
    let (stdio, kinds) = sort_fds(&pd, stat, scope, &mut blockers).map_err(inspect)?;
    mapping_blockers(&pd, &maps, &mut blockers);
    // What makes a memfd not carried (its size outside its mappings, a
    // write seal on a mapped one) is known before the freeze: said now.
    if stat && blockers.is_empty() {
        use std::os::unix::fs::MetadataExt;
        let mut on_fds: Vec<(u64, u32, i32)> = Vec::new();
        for (fd, k) in &kinds {
            if *k == FileKind::Memfd {
                if let Ok(m) = pd.fd_metadata(*fd) {
                    if !on_fds.iter().any(|x| x.0 == m.ino()) {
                        on_fds.push((m.ino(), on_fds.len() as u32 + 1, *fd));
                    }
                }
            }
        }
        let any_mapped = maps.iter().any(memfd_shared);
        if !on_fds.is_empty() || any_mapped {
            if let Err(e) = memfd_states(&pd, &on_fds) {
                let why = e.to_string();
                let (name, why) = why
                    .strip_prefix("memfd ")
                    .and_then(|w| w.split_once(": "))
                    .map_or(("?".to_string(), why.clone()), |(n, w)| {
                        (n.to_string(), w.to_string())
                    });
                blockers.push(Blocker::Memfd { name, why });
            }
        }
    }
    let children = pd.children().map_err(inspect)?;
    if !children.is_empty() {
        blockers.push(Blocker::Children { pids: children });
    }
    let timers = pd.posix_timers().map_err(inspect)?;
    for (i, t) in timers.iter().enumerate() {
        if let Some(why) = timer_blocker(t, i) {
            blockers.push(Blocker::PosixTimer { id: t.id, why });
        }
    }
    if blockers.is_empty() {
        Ok(Precheck {
            pid,
            threads: tasks.len(),
            stdio,
            mappings: maps.len(),
        })
    } else {
        Err(Refusal::Blocked { pid, blockers })
    }
}

/// Checks a live process through `/proc`, touching nothing.
pub fn check_migratable(pid: i32) -> Result<Precheck, Refusal> {
    check_at(Path::new("/proc"), pid, std::process::id() as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Read-only shared mappings of files are carried (glibc's gconv cache
    /// under a UTF-8 locale); writable ones, deleted files' and anonymous
    /// ones of other kinds are not.
    #[test]
    fn only_read_only_shared_file_mappings_are_carried() {
        let m = |name: &str, write: bool| MapsEntry {
            start: 0x1000,
            end: 0x2000,
            read: true,
            write,
            exec: false,
            shared: true,
            offset: 0,
            inode: 7,
            name: name.into(),
        };
        assert!(read_only_file(&m(
            "/usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache",
            false
        )));
        assert!(!read_only_file(&m("/data/db", true)));
        assert!(!read_only_file(&m("/data/db (deleted)", false)));
        assert!(!read_only_file(&m("[anon_shmem:x]", false)));
    }

    /// 0 left with a period is read again (its expiry passed, its interrupt
    /// is late) until the wait is over; 0 left without one, or time left,
    /// is read as it is.
    #[test]
    fn a_periodic_timer_reading_nothing_left_is_read_again() {
        use std::time::Duration;
        assert!(expiry_pending(0, 5_000_000, Duration::ZERO));
        assert!(expiry_pending(0, 5_000_000, PENDING_EXPIRY / 2));
        assert!(!expiry_pending(0, 5_000_000, PENDING_EXPIRY));
        assert!(!expiry_pending(0, 0, Duration::ZERO));
        assert!(!expiry_pending(1, 5_000_000, Duration::ZERO));
    }

    /// Read through the real calls on this process's own timerfds: a
    /// periodic one is armed with its period, one disarmed with a period
    /// kept is disarmed (after the wait for a late expiry).
    #[test]
    fn timerfds_read_armed_or_disarmed_with_their_period() {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let make = |value_ns: i64, interval_ns: i64| -> OwnedFd {
            let ts = |ns: i64| libc::timespec {
                tv_sec: ns / 1_000_000_000,
                tv_nsec: ns % 1_000_000_000,
            };
            // SAFETY: timerfd_create returns a new descriptor, owned below;
            // timerfd_settime reads a live local.
            unsafe {
                let fd = libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC);
                assert!(fd >= 0);
                let spec = libc::itimerspec {
                    it_interval: ts(interval_ns),
                    it_value: ts(value_ns),
                };
                assert_eq!(libc::timerfd_settime(fd, 0, &spec, std::ptr::null_mut()), 0);
                OwnedFd::from_raw_fd(fd)
            }
        };
        let pd = ProcDir::new(Path::new("/proc"), std::process::id() as i32);
        let periodic = make(1_000_000, 5_000_000);
        std::thread::sleep(std::time::Duration::from_millis(12));
        let t = timer_state(&pd, periodic.as_raw_fd(), &periodic.try_clone().unwrap()).unwrap();
        assert!(t.armed, "{t:?}");
        assert_eq!(t.interval_ns, 5_000_000);
        assert!(t.ticks >= 2, "{t:?}");
        let disarmed = make(0, 5_000_000);
        let begun = std::time::Instant::now();
        let t = timer_state(&pd, disarmed.as_raw_fd(), &disarmed.try_clone().unwrap()).unwrap();
        assert!(!t.armed, "{t:?}");
        assert_eq!((t.interval_ns, t.ticks), (5_000_000, 0));
        assert!(begun.elapsed() >= PENDING_EXPIRY);
    }

    /// A POSIX timer on a thread's CPU clock (which thread, /proc does not
    /// say) or on another process's is refused by name; one on the
    /// process's CPU clock is carried.
    #[test]
    fn posix_timers_on_clocks_not_carried_are_named() {
        let t = |clockid: i32| super::super::procfs::ProcTimer {
            id: 4,
            signo: 34,
            sigval: 0,
            notify: "signal".into(),
            to_thread: false,
            target: 1,
            clockid,
        };
        // CLOCK_PROCESS_CPUTIME_ID as /proc shows it (-6), carried as 2.
        assert_eq!(timer_blocker(&t(-6), 0), None);
        assert_eq!(carried_clock(-6), Ok(2));
        assert_eq!(carried_clock(7), Ok(7));
        // CLOCK_THREAD_CPUTIME_ID (-2): whose, /proc does not say.
        assert!(timer_blocker(&t(-2), 0).is_some_and(|w| w.contains("CPU clock of one thread")));
        // clock_getcpuclockid(412): another process's.
        assert!(timer_blocker(&t((!412i32 << 3) | 2), 0)
            .is_some_and(|w| w.contains("CPU clock of process 412")));
        // The plain number 2 never comes from /proc, and 5 is not carried.
        assert!(timer_blocker(&t(2), 0).is_some());
        assert!(timer_blocker(&t(5), 0).is_some_and(|w| w.starts_with("runs on clock 5")));
    }
    use std::fs;

    fn tree(fds: &[(&str, &str)], maps: &str, status_extra: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("7");
        fs::create_dir_all(p.join("task/7")).unwrap();
        fs::create_dir_all(p.join("fd")).unwrap();
        for (fd, t) in fds {
            std::os::unix::fs::symlink(t, p.join("fd").join(fd)).unwrap();
        }
        fs::write(p.join("maps"), maps).unwrap();
        fs::write(
            p.join("status"),
            format!("State:\tS (sleeping)\nTracerPid:\t0\nSeccomp:\t0\n{status_extra}"),
        )
        .unwrap();
        fs::write(p.join("task/7/children"), "").unwrap();
        d
    }

    const OK_MAPS: &str = "00400000-00401000 r-xp 00000000 fe:00 1 /bin/x\n\
                           7ffe0000-7ffe1000 rw-p 00000000 00:00 0 [stack]\n";

    /// Anonymous shared memory passes when the process alone maps it; it is
    /// refused, naming the holder, when another process maps the same pages
    /// or the process maps them twice; a shared file never passes.
    #[test]
    fn anonymous_shared_memory_is_carried_only_when_the_process_alone_maps_it() {
        let shm = |start: &str, off: &str, ino: u32| {
            format!(
                "{start}-{:x} rw-s {off} 00:01 {ino} /dev/zero (deleted)\n",
                { u64::from_str_radix(start, 16).unwrap() + 0x2000 }
            )
        };
        let fds = [("0", "/dev/null"), ("1", "pipe:[5]"), ("2", "/dev/null")];
        let alone = format!("{OK_MAPS}{}", shm("7f000000", "00000000", 41));
        let d = tree(&fds, &alone, "");
        assert!(check_at(d.path(), 7, 1).is_ok());
        // Process 8 maps the second page of it (a child after fork).
        fs::create_dir_all(d.path().join("8")).unwrap();
        fs::write(d.path().join("8/maps"), shm("50000000", "00001000", 41)).unwrap();
        let e = check_at(d.path(), 7, 1).unwrap_err().to_string();
        assert!(
            e.contains("anonymous shared memory 0x7f000000-0x7f002000 is also mapped by process 8"),
            "{e}"
        );
        // Another object (another inode) in process 8 is no matter.
        fs::write(d.path().join("8/maps"), shm("50000000", "00000000", 42)).unwrap();
        assert!(check_at(d.path(), 7, 1).is_ok());
        // The same pages twice in the process itself.
        let twice = format!("{alone}{}", shm("7f100000", "00001000", 41));
        let d = tree(&fds, &twice, "");
        let e = check_at(d.path(), 7, 1).unwrap_err().to_string();
        assert!(
            e.contains("also mapped by the process at 0x7f100000"),
            "{e}"
        );
        // Disjoint parts of one object (an mprotect split) are two mappings.
        let split = format!("{alone}{}", shm("7f100000", "00002000", 41));
        let d = tree(&fds, &split, "");
        assert!(check_at(d.path(), 7, 1).is_ok());
        // A memfd the process alone maps is carried; a shared file, or
        // the DSM's own memfd, is still refused.
        let memfd =
            format!("{OK_MAPS}7f000000-7f001000 rw-s 00000000 00:01 43 /memfd:x (deleted)\n");
        let d = tree(&fds, &memfd, "");
        assert!(check_at(d.path(), 7, 1).is_ok());
        for name in ["/data/shared.db", "/memfd:mkdsm-r-copy (deleted)"] {
            let maps = format!("{OK_MAPS}7f000000-7f001000 rw-s 00000000 00:01 43 {name}\n");
            let d = tree(&fds, &maps, "");
            let e = check_at(d.path(), 7, 1).unwrap_err().to_string();
            assert!(
                e.contains(&format!(
                    "shared memory mapping 0x7f000000-0x7f001000 ({name})"
                )),
                "{e}"
            );
        }
    }

    #[test]
    fn clean_process_passes() {
        let d = tree(
            &[("0", "/dev/null"), ("1", "pipe:[5]"), ("2", "/dev/pts/3")],
            OK_MAPS,
            "",
        );
        let p = check_at(d.path(), 7, 1).unwrap();
        assert_eq!(
            p.stdio,
            [StdioKind::DevNull, StdioKind::Pipe, StdioKind::Tty]
        );
        assert_eq!(p.threads, 1);
    }

    #[test]
    fn kernel_threads_and_the_caller_are_refused_in_one_line() {
        // A kernel thread (Kthread: 1, or no mappings on older kernels),
        // with an open fd that would otherwise be listed too.
        for (maps, extra) in [(OK_MAPS, "Kthread:\t1\n"), ("", "")] {
            let d = tree(&[("5", "/etc/passwd")], maps, extra);
            let e = check_at(d.path(), 7, 1).unwrap_err().to_string();
            assert_eq!(e, "process 7 cannot be moved or saved: is a kernel thread");
        }
        // A user process between letting go of its memory and its zombie.
        let d = tree(&[("5", "/etc/passwd")], "", "Kthread:\t0\n");
        let e = check_at(d.path(), 7, 1).unwrap_err().to_string();
        assert_eq!(e, "process 7 cannot be moved or saved: is exiting");
        let d = tree(&[("5", "/etc/passwd")], OK_MAPS, "");
        let e = check_at(d.path(), 7, 7).unwrap_err().to_string();
        assert!(
            e.ends_with(
                "is the process doing the move or save itself (the mkctl agent, or this mkctl)"
            ),
            "{e}"
        );
        assert!(!e.contains("/etc/passwd"), "{e}");
    }

    /// The mode of an eventfd is told right without fdinfo's word for it,
    /// and its count is left as it was (fdinfo says so).
    #[test]
    fn an_eventfds_mode_is_found_by_trying_and_its_count_kept() {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        for sem in [false, true] {
            for count in [0u64, 1, 5, 1 << 40] {
                let flags = libc::EFD_CLOEXEC | if sem { libc::EFD_SEMAPHORE } else { 0 };
                // SAFETY: eventfd returns a new descriptor or -1.
                let fd = unsafe { libc::eventfd(0, flags) };
                assert!(fd >= 0);
                // SAFETY: just created, ours alone.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                if count != 0 {
                    nix::unistd::write(&fd, &count.to_ne_bytes()).unwrap();
                }
                assert_eq!(
                    eventfd_is_semaphore(&fd, count).unwrap(),
                    sem,
                    "count {count}"
                );
                let info =
                    fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).unwrap();
                let want = format!("eventfd-count: {count:16x}");
                let shown = info
                    .lines()
                    .find(|l| l.starts_with("eventfd-count:"))
                    .unwrap();
                assert_eq!(
                    shown
                        .split_whitespace()
                        .nth(1)
                        .map(|v| u64::from_str_radix(v, 16).unwrap()),
                    Some(count),
                    "{want} / {info}"
                );
            }
        }
        // A count that another reader changed is not taken for a mode.
        // SAFETY: eventfd returns a new descriptor or -1.
        let fd = unsafe { OwnedFd::from_raw_fd(libc::eventfd(7, libc::EFD_CLOEXEC)) };
        assert!(eventfd_is_semaphore(&fd, 3).is_err());
    }

    #[test]
    fn every_blocker_is_named() {
        let maps = format!(
            "{OK_MAPS}7f000000-7f001000 rw-s 00000000 00:01 9 /SYSV00000000 (deleted)\n\
             7f100000-7f101000 r-xp 00000000 00:00 0 [uprobes]\n"
        );
        let d = tree(
            &[
                ("1", "anon_inode:[io_uring]"),
                ("2", "pipe:[6]"),
                ("3", "socket:[77]"),
                ("4", "anon_inode:inotify"),
                ("5", "/tmp/gone (deleted)"),
                ("6", "/dev/sda"),
                ("7", "/tmp/log"),
                ("8", "/dev/urandom"),
                ("9", "pipe:[5]"),
                ("10", "pipe:[6]"),
                ("11", "pipe:[12]"),
                ("12", "pipe:[12]"),
            ],
            &maps,
            "TracerPid:\t99\n",
        );
        fs::write(d.path().join("7/task/7/children"), "8 9").unwrap();
        // Process 8 holds the other end of pipe 5.
        fs::create_dir_all(d.path().join("8/fd")).unwrap();
        std::os::unix::fs::symlink("pipe:[5]", d.path().join("8/fd/4")).unwrap();
        let e = check_at(d.path(), 7, 1).unwrap_err();
        let msg = e.to_string();
        for want in [
            "fd 1 is anon_inode:[io_uring];",
            "(fds 0-2 must be pipes, ttys, regular files, eventfds, timerfds, signalfds, epolls, memfds or /dev/null, zero, random, urandom)",
            "(descriptors are carried when open on regular files, eventfds, timerfds, signalfds, epolls, memfds, pipes, socket pairs or /dev/null, zero, random, urandom)",
            "fd 3 is a socket (socket:[77])",
            "fd 4 is open (anon_inode:inotify)",
            "fd 9 is a pipe (pipe:[5]) also open in process 8;",
            "fd 10 is a pipe (pipe:[6]) also open in fd 2 of the process (the destination replaces 0-2)",
            "(a pipe is carried with its bytes when every end of it moves: on fds 3 and up of the process, or, with --tree, on any descriptor of the tree's processes but the top's 0-2)",
            "fd 5 is open on a deleted file (/tmp/gone (deleted))",
            "(deleted files are not carried",
            "fd 6 is open (/dev/sda)",
            "shared memory mapping 0x7f000000-0x7f001000 (/SYSV00000000 (deleted))",
            "[uprobes]",
            "already traced by pid 99",
            "child processes [8, 9]",
        ] {
            assert!(msg.contains(want), "{want:?} missing from {msg}");
        }
        // Carried: a file, a device and a pipe with both ends here are not
        // blockers.
        for fd in ["fd 7 ", "fd 8 ", "fd 11 ", "fd 12 ", "fd 2 is"] {
            assert!(!msg.contains(fd), "{fd} in {msg}");
        }
    }

    #[test]
    fn files_on_any_descriptor_pass_the_precheck() {
        let d = tree(
            &[
                ("0", "/dev/zero"),
                ("1", "/var/log/run.log"),
                ("2", "/dev/null"),
                ("3", "/etc/passwd"),
                ("9", "/dev/random"),
                ("10", "anon_inode:[eventfd]"),
                ("11", "anon_inode:[timerfd]"),
                ("12", "anon_inode:[signalfd]"),
                ("13", "pipe:[40]"),
                ("14", "pipe:[40]"),
            ],
            OK_MAPS,
            "",
        );
        let p = check_at(d.path(), 7, 1).unwrap();
        assert_eq!(
            p.stdio,
            [StdioKind::File, StdioKind::File, StdioKind::DevNull]
        );
    }

    #[test]
    fn missing_process_is_inspect_error() {
        let d = tempfile::tempdir().unwrap();
        let e = check_at(d.path(), 12345, 1).unwrap_err();
        assert!(matches!(e, Refusal::Inspect { pid: 12345, .. }));
        assert!(
            e.to_string()
                .contains("there is no process 12345 on this kernel"),
            "{e}"
        );
    }
}
