//! Is a process migratable? Decided from `/proc` alone, before anything is
//! frozen, and again once it is frozen (the answer that counts). Every
//! blocker is reported at once, each naming the offending thing.

use std::fmt;
use std::io;
use std::path::Path;

use super::image::{FileKind, OpenFile, StdioKind, DEVICES, EVENTFD, FILE_FLAGS, MAX_FILES};
use super::procfs::{MapsEntry, ProcDir};

/// One reason a process cannot be migrated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blocker {
    /// A descriptor other than 0, 1, 2 is open on something not carried.
    OpenFd { fd: i32, target: String },
    /// A descriptor is open on a file that was deleted.
    DeletedFile { fd: i32, target: String },
    /// A socket (any descriptor).
    Socket { fd: i32, target: String },
    /// fd 0/1/2 is something other than a pipe, a tty or /dev/null.
    Stdio { fd: i32, target: String },
    /// A mapping shared with other processes (MAP_SHARED, SysV shm, ...).
    SharedMapping { start: u64, end: u64, name: String },
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
    /// POSIX timers exist (not restored).
    PosixTimers { count: usize },
    /// Stopped by job control, zombie or dead.
    State { state: char },
    /// The thread-group leader has exited while other threads run.
    LeaderGone,
    /// The caller itself.
    SelfProcess,
    /// A kernel thread: no user memory to save.
    KernelThread,
}

impl fmt::Display for Blocker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Blocker::OpenFd { fd, target } => write!(f, "fd {fd} is open ({target})"),
            Blocker::DeletedFile { fd, target } => {
                write!(f, "fd {fd} is open on a deleted file ({target})")
            }
            Blocker::Socket { fd, target } => write!(f, "fd {fd} is a socket ({target})"),
            Blocker::Stdio { fd, target } => write!(f, "fd {fd} is {target}"),
            Blocker::SharedMapping { start, end, name } => write!(
                f,
                "shared memory mapping {start:#x}-{end:#x} ({})",
                if name.is_empty() { "anonymous" } else { name }
            ),
            Blocker::SpecialMapping { start, name } => {
                write!(f, "kernel special mapping {name} at {start:#x}")
            }
            Blocker::Traced { tracer } => write!(f, "already traced by pid {tracer}"),
            Blocker::Children { pids } => write!(f, "has child processes {pids:?}"),
            Blocker::Seccomp { mode } => write!(f, "runs under seccomp (mode {mode})"),
            Blocker::ShadowStack => write!(f, "uses the x86 user shadow stack"),
            Blocker::PosixTimers { count } => write!(f, "has {count} POSIX timer(s)"),
            Blocker::State { state } => {
                write!(f, "is in state {state:?} (stopped, zombie or dead)")
            }
            Blocker::LeaderGone => write!(f, "its main thread has exited"),
            Blocker::SelfProcess => write!(
                f,
                "is the process doing the move or save itself (the mkctl agent, or this mkctl)"
            ),
            Blocker::KernelThread => write!(f, "is a kernel thread"),
        }
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
    if b.iter().any(|x| matches!(x, Blocker::Stdio { .. })) {
        s.push_str(
            " (fds 0-2 must be pipes, ttys, regular files, eventfds or /dev/null, zero, random, urandom)",
        );
    }
    if b.iter().any(|x| matches!(x, Blocker::OpenFd { .. })) {
        s.push_str(" (descriptors are carried when open on regular files, eventfds or /dev/null, zero, random, urandom)");
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
    } else if target.starts_with('/')
        && !target.starts_with("/dev/")
        && !target.ends_with(" (deleted)")
    {
        Some(FileKind::Regular)
    } else {
        None
    }
}

/// Stdio kinds, and the carried files' descriptors and kinds.
type SortedFds = ([StdioKind; 3], Vec<(i32, FileKind)>);

/// Sorts the descriptors `pd` lists into stdio kinds, carried files and
/// blockers. With `stat`, each carried file's `/proc` link is followed to
/// check it is a regular file (not a directory, socket file or FIFO).
fn sort_fds(pd: &ProcDir, stat: bool, blockers: &mut Vec<Blocker>) -> io::Result<SortedFds> {
    let mut stdio = [StdioKind::Closed; 3];
    let mut files = Vec::new();
    for (fd, target) in pd.fds()? {
        if target.starts_with("socket:") {
            blockers.push(Blocker::Socket { fd, target });
            continue;
        }
        if (0..3).contains(&fd) {
            if let Some(k) = stdio_kind(&target) {
                stdio[fd as usize] = k;
                continue;
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
    if files.len() > MAX_FILES {
        blockers.push(Blocker::OpenFd {
            fd: files[MAX_FILES].0,
            target: format!("more than {MAX_FILES} open files"),
        });
    }
    Ok((stdio, files))
}

/// The files process `pid` has open that a move carries by path, as they
/// are now (the process runs: for a look before the freeze).
pub fn files_of(pid: i32) -> io::Result<Vec<(String, FileKind)>> {
    let pd = ProcDir::new(Path::new("/proc"), pid);
    let mut blockers = Vec::new();
    let (_, kinds) = sort_fds(&pd, true, &mut blockers)?;
    Ok(kinds
        .into_iter()
        .filter_map(|(fd, k)| {
            let p = std::fs::read_link(pd.path(&format!("fd/{fd}"))).ok()?;
            Some((p.to_string_lossy().into_owned(), k))
        })
        .collect())
}

/// The frozen process's descriptors as the image carries them: stdio kinds
/// and the files with their flags, offsets, sizes and times. Anything not
/// carried is an error here (the pre-check refused it before the freeze).
pub(crate) fn open_files(pd: &ProcDir) -> io::Result<([StdioKind; 3], Vec<OpenFile>)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut blockers = Vec::new();
    let (stdio, kinds) = sort_fds(pd, true, &mut blockers)?;
    if !blockers.is_empty() {
        return Err(io::Error::other(join(&blockers)));
    }
    let mut files = Vec::with_capacity(kinds.len());
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
        };
        if !ok {
            return Err(io::Error::other(format!("fd {fd} ({path}) changed kind")));
        }
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
                    _ => {
                        return Err(io::Error::other(format!(
                            "fd {fd} is an eventfd and this kernel's fdinfo does not say its count and whether it is a semaphore (newer kernels do; the Debian 6.1 guests do not)"
                        )))
                    }
                }
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
        });
    }
    Ok((stdio, files))
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

pub(crate) fn mapping_blockers(maps: &[MapsEntry], out: &mut Vec<Blocker>) {
    for m in maps {
        if m.shared {
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

/// Checks `pid` under the proc root `root` (normally `/proc`).
pub fn check_at(root: &Path, pid: i32, self_pid: i32) -> Result<Precheck, Refusal> {
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
    // Older kernels print no `Kthread:`; a process without a single mapping
    // is one too.
    let maps = pd.maps().map_err(inspect)?;
    if st.kthread || maps.is_empty() {
        return only(Blocker::KernelThread);
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
    let (stdio, _) = sort_fds(&pd, stat, &mut blockers).map_err(inspect)?;
    mapping_blockers(&maps, &mut blockers);
    let children = pd.children().map_err(inspect)?;
    if !children.is_empty() {
        blockers.push(Blocker::Children { pids: children });
    }
    let timers = pd.posix_timers().map_err(inspect)?;
    if timers > 0 {
        blockers.push(Blocker::PosixTimers { count: timers });
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

    #[test]
    fn every_blocker_is_named() {
        let maps = format!(
            "{OK_MAPS}7f000000-7f001000 rw-s 00000000 00:01 9 /SYSV00000000 (deleted)\n\
             7f100000-7f101000 r-xp 00000000 00:00 0 [uprobes]\n"
        );
        let d = tree(
            &[
                ("1", "anon_inode:[signalfd]"),
                ("3", "socket:[77]"),
                ("4", "anon_inode:[timerfd]"),
                ("5", "/tmp/gone (deleted)"),
                ("6", "/dev/sda"),
                ("7", "/tmp/log"),
                ("8", "/dev/urandom"),
            ],
            &maps,
            "TracerPid:\t99\n",
        );
        fs::write(d.path().join("7/task/7/children"), "8 9").unwrap();
        let e = check_at(d.path(), 7, 1).unwrap_err();
        let msg = e.to_string();
        for want in [
            "fd 1 is anon_inode:[signalfd];",
            "(fds 0-2 must be pipes, ttys, regular files, eventfds or /dev/null, zero, random, urandom)",
            "(descriptors are carried when open on regular files, eventfds or /dev/null, zero, random, urandom)",
            "fd 3 is a socket (socket:[77])",
            "fd 4 is open (anon_inode:[timerfd])",
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
        // Carried: a file and a device are not blockers.
        assert!(!msg.contains("fd 7") && !msg.contains("fd 8"), "{msg}");
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
