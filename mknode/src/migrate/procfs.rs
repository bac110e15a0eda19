//! Readers of `/proc/<pid>/...` for capture and its pre-check. Every reader
//! takes the proc root, so the parsers are tested on text fixtures; nothing
//! here changes the process it reads.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// One line of `/proc/pid/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MapsEntry {
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) read: bool,
    pub(crate) write: bool,
    pub(crate) exec: bool,
    pub(crate) shared: bool,
    pub(crate) offset: u64,
    pub(crate) inode: u64,
    pub(crate) name: String,
}

fn bad(what: &str, line: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("cannot parse {what}: {line:?}"),
    )
}

/// Parses the text of `/proc/pid/maps`.
pub(crate) fn parse_maps(text: &str) -> io::Result<Vec<MapsEntry>> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let mut it = line.splitn(6, ' ');
        let range = it.next().ok_or_else(|| bad("maps range", line))?;
        let perms = it.next().ok_or_else(|| bad("maps perms", line))?;
        let offset = it.next().ok_or_else(|| bad("maps offset", line))?;
        let _dev = it.next().ok_or_else(|| bad("maps dev", line))?;
        let inode = it.next().ok_or_else(|| bad("maps inode", line))?;
        let name = it.next().unwrap_or("").trim_start().to_string();
        let (s, e) = range
            .split_once('-')
            .ok_or_else(|| bad("maps range", line))?;
        let hex = |x: &str| u64::from_str_radix(x, 16).map_err(|_| bad("maps number", line));
        let p = perms.as_bytes();
        if p.len() != 4 {
            return Err(bad("maps perms", line));
        }
        out.push(MapsEntry {
            start: hex(s)?,
            end: hex(e)?,
            read: p[0] == b'r',
            write: p[1] == b'w',
            exec: p[2] == b'x',
            shared: p[3] == b's',
            offset: hex(offset)?,
            inode: inode.parse().map_err(|_| bad("maps inode", line))?,
            name,
        });
    }
    Ok(out)
}

/// One entry of `/proc/pid/smaps`: the maps line plus what capture uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SmapsEntry {
    pub(crate) map: MapsEntry,
    pub(crate) rss_kib: u64,
    /// `VmFlags` has `hg` (MADV_HUGEPAGE).
    pub(crate) hugepage: bool,
    /// `VmFlags` has `nh` (MADV_NOHUGEPAGE).
    pub(crate) nohugepage: bool,
}

/// Parses the text of `/proc/pid/smaps`.
pub(crate) fn parse_smaps(text: &str) -> io::Result<Vec<SmapsEntry>> {
    let mut out: Vec<SmapsEntry> = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some(key) = first.strip_suffix(':') {
            let e = out
                .last_mut()
                .ok_or_else(|| bad("smaps field before header", line))?;
            let rest = line[first.len()..].trim();
            match key {
                "Rss" => {
                    e.rss_kib = rest
                        .split_whitespace()
                        .next()
                        .and_then(|n| n.parse().ok())
                        .ok_or_else(|| bad("smaps Rss", line))?
                }
                "VmFlags" => {
                    e.hugepage = rest.split_whitespace().any(|f| f == "hg");
                    e.nohugepage = rest.split_whitespace().any(|f| f == "nh");
                }
                _ => {}
            }
        } else {
            let map = parse_maps(line)?
                .pop()
                .ok_or_else(|| bad("smaps header", line))?;
            out.push(SmapsEntry {
                map,
                rss_kib: 0,
                hugepage: false,
                nohugepage: false,
            });
        }
    }
    Ok(out)
}

/// The fields of `/proc/pid/status` that decide migratability.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Status {
    pub(crate) state: char,
    pub(crate) tracer_pid: i32,
    pub(crate) seccomp: u32,
    pub(crate) shadow_stack: bool,
    pub(crate) sig_cgt: u64,
    pub(crate) sig_ign: u64,
    pub(crate) threads: u32,
    /// `Kthread:` (None where the kernel does not print it).
    pub(crate) kthread: Option<bool>,
    /// The pid in its innermost pid namespace (the last of `NSpid`); 0
    /// where the kernel does not print it.
    pub(crate) ns_pid: i32,
}

pub(crate) fn parse_status(text: &str) -> io::Result<Status> {
    let mut s = Status::default();
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        let num = || v.parse::<i64>().map_err(|_| bad("status field", line));
        let hex = || u64::from_str_radix(v, 16).map_err(|_| bad("status mask", line));
        match k {
            "State" => s.state = v.chars().next().unwrap_or('?'),
            "TracerPid" => s.tracer_pid = num()? as i32,
            "Seccomp" => s.seccomp = num()? as u32,
            "Threads" => s.threads = num()? as u32,
            "SigCgt" => s.sig_cgt = hex()?,
            "SigIgn" => s.sig_ign = hex()?,
            "x86_Thread_features" => s.shadow_stack = v.split_whitespace().any(|f| f == "shstk"),
            "Kthread" => s.kthread = Some(v == "1"),
            "NSpid" => {
                s.ns_pid = v
                    .split_whitespace()
                    .last()
                    .and_then(|x| x.parse().ok())
                    .ok_or_else(|| bad("status NSpid", line))?
            }
            _ => {}
        }
    }
    Ok(s)
}

/// Fields of `/proc/pid/stat` (1-based numbering of proc(5)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Stat {
    /// State (3), parent (4), process group (5), session (6), as this
    /// `/proc`'s pid namespace sees them.
    pub(crate) state: char,
    pub(crate) ppid: i32,
    pub(crate) pgrp: i32,
    pub(crate) session: i32,
    /// The status a `wait` would report (52; a zombie's, else 0).
    pub(crate) exit_code: i32,
    /// When it started, in clock ticks after boot (22).
    pub(crate) start_time: u64,
    pub(crate) start_code: u64,
    pub(crate) end_code: u64,
    pub(crate) start_stack: u64,
    pub(crate) start_data: u64,
    pub(crate) end_data: u64,
    pub(crate) start_brk: u64,
    pub(crate) arg_start: u64,
    pub(crate) arg_end: u64,
    pub(crate) env_start: u64,
    pub(crate) env_end: u64,
}

pub(crate) fn parse_stat(text: &str) -> io::Result<Stat> {
    // The command name (field 2) may hold spaces and parentheses: split
    // after the last ')'. Fields from 3 on follow, space separated.
    let rest = text
        .rfind(')')
        .map(|i| &text[i + 1..])
        .ok_or_else(|| bad("stat", text))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> io::Result<u64> {
        // Field n (1-based) is at index n - 3 of `f`.
        f.get(n - 3)
            .and_then(|x| x.parse::<u64>().ok())
            .ok_or_else(|| bad("stat field", text))
    };
    let int = |n: usize| -> io::Result<i32> {
        f.get(n - 3)
            .and_then(|x| x.parse::<i32>().ok())
            .ok_or_else(|| bad("stat field", text))
    };
    Ok(Stat {
        state: f
            .first()
            .and_then(|x| x.chars().next())
            .ok_or_else(|| bad("stat state", text))?,
        ppid: int(4)?,
        pgrp: int(5)?,
        session: int(6)?,
        exit_code: int(52).unwrap_or(0),
        start_time: field(22)?,
        start_code: field(26)?,
        end_code: field(27)?,
        start_stack: field(28)?,
        start_data: field(45)?,
        end_data: field(46)?,
        start_brk: field(47)?,
        arg_start: field(48)?,
        arg_end: field(49)?,
        env_start: field(50)?,
        env_end: field(51)?,
    })
}

/// Parses `/proc/pid/auxv` (native 64-bit pairs) up to AT_NULL.
pub(crate) fn parse_auxv(b: &[u8]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for c in b.chunks_exact(16) {
        let t = u64::from_le_bytes(c[..8].try_into().unwrap_or([0; 8]));
        let v = u64::from_le_bytes(c[8..].try_into().unwrap_or([0; 8]));
        if t == 0 {
            break;
        }
        out.push((t, v));
    }
    out
}

/// `clockid:` (decimal), `ticks:` (decimal) and `settime flags:` (octal)
/// of a timerfd's fdinfo.
pub(crate) fn parse_timerfd_info(text: &str) -> Option<(u32, u64, u32)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim())
    };
    Some((
        field("clockid:")?.parse().ok()?,
        field("ticks:")?.parse().ok()?,
        u32::from_str_radix(field("settime flags:")?, 8).ok()?,
    ))
}

/// One `tfd:` line of an epoll's fdinfo: the watched descriptor, the
/// watch's events and data, and the inode of the file it watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EpollInfo {
    pub fd: u32,
    pub events: u32,
    pub data: u64,
    pub ino: u64,
}

/// The watches an epoll's fdinfo lists (`tfd: %8d events: %8x data: %16llx
/// pos:%lli ino:%lx sdev:%x`, one line each).
pub(crate) fn parse_epoll_info(text: &str) -> io::Result<Vec<EpollInfo>> {
    let mut out = Vec::new();
    for l in text.lines().filter(|l| l.starts_with("tfd:")) {
        let t: Vec<&str> = l.split_whitespace().collect();
        let after = |k: &str| t.iter().position(|x| *x == k).and_then(|i| t.get(i + 1));
        let ino = t.iter().find_map(|x| x.strip_prefix("ino:"));
        let w = (|| {
            Some(EpollInfo {
                fd: after("tfd:")?.parse().ok()?,
                events: u32::from_str_radix(after("events:")?, 16).ok()?,
                data: u64::from_str_radix(after("data:")?, 16).ok()?,
                ino: u64::from_str_radix(ino?, 16).ok()?,
            })
        })();
        out.push(w.ok_or_else(|| bad("epoll fdinfo", l))?);
    }
    Ok(out)
}

/// One POSIX timer as `/proc/pid/timers` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProcTimer {
    pub id: u32,
    pub signo: u32,
    pub sigval: u64,
    /// `signal`, `none` or `thread` (SIGEV_SIGNAL, SIGEV_NONE, SIGEV_THREAD).
    pub notify: String,
    /// The signal goes to one thread (`SIGEV_THREAD_ID`), `target`.
    pub to_thread: bool,
    pub target: i32,
    /// As the kernel keeps it: a CPU clock is encoded (negative; see
    /// `precheck::carried_clock`).
    pub clockid: i32,
}

/// The timers of `/proc/pid/timers`: `ID: n`, `signal: signo/value(hex)`,
/// `notify: kind/pid.N` or `kind/tid.N`, `ClockID: n`, four lines each.
pub(crate) fn parse_posix_timers(text: &str) -> io::Result<Vec<ProcTimer>> {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut out = Vec::new();
    for rec in lines.chunks(4) {
        let field = |name: &str| rec.iter().find_map(|l| l.strip_prefix(name)).map(str::trim);
        let t = (|| {
            let (signo, val) = field("signal:")?.split_once('/')?;
            let (kind, who) = field("notify:")?.split_once('/')?;
            let (pt, target) = who.split_once('.')?;
            Some(ProcTimer {
                id: field("ID:")?.parse().ok()?,
                signo: signo.parse().ok()?,
                sigval: u64::from_str_radix(val, 16).ok()?,
                notify: kind.to_string(),
                to_thread: pt == "tid",
                target: target.parse().ok()?,
                clockid: field("ClockID:")?.parse().ok()?,
            })
        })();
        out.push(t.ok_or_else(|| bad("/proc/pid/timers", &rec.join(" | ")))?);
    }
    Ok(out)
}

/// A view of one process under a proc root.
#[derive(Debug, Clone)]
pub(crate) struct ProcDir {
    dir: PathBuf,
}

impl ProcDir {
    pub(crate) fn new(root: &Path, pid: i32) -> Self {
        ProcDir {
            dir: root.join(pid.to_string()),
        }
    }

    pub(crate) fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// The proc root this process is under.
    pub(crate) fn root(&self) -> &Path {
        self.dir.parent().unwrap_or(Path::new("/"))
    }

    /// The pid this view is of (0 if the directory name is not one).
    pub(crate) fn pid(&self) -> i32 {
        self.dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    pub(crate) fn maps(&self) -> io::Result<Vec<MapsEntry>> {
        parse_maps(&fs::read_to_string(self.path("maps"))?)
    }

    pub(crate) fn smaps(&self) -> io::Result<Vec<SmapsEntry>> {
        parse_smaps(&fs::read_to_string(self.path("smaps"))?)
    }

    pub(crate) fn status(&self) -> io::Result<Status> {
        parse_status(&fs::read_to_string(self.path("status"))?)
    }

    pub(crate) fn stat(&self) -> io::Result<Stat> {
        parse_stat(&fs::read_to_string(self.path("stat"))?)
    }

    /// Its pid as its own pid namespace numbers it (`NSpid`; the pid
    /// itself on a kernel that does not say).
    pub(crate) fn ns_pid(&self) -> io::Result<i32> {
        let s = self.status()?;
        Ok(if s.ns_pid > 0 { s.ns_pid } else { self.pid() })
    }

    pub(crate) fn auxv(&self) -> io::Result<Vec<(u64, u64)>> {
        Ok(parse_auxv(&fs::read(self.path("auxv"))?))
    }

    pub(crate) fn personality(&self) -> io::Result<u32> {
        let t = fs::read_to_string(self.path("personality"))?;
        u32::from_str_radix(t.trim(), 16).map_err(|_| bad("personality", &t))
    }

    /// Thread ids, sorted, leader first when present.
    pub(crate) fn tasks(&self) -> io::Result<Vec<i32>> {
        let mut v: Vec<i32> = fs::read_dir(self.path("task"))?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        v.sort_unstable();
        Ok(v)
    }

    /// Open descriptors and what they point to.
    pub(crate) fn fds(&self) -> io::Result<Vec<(i32, String)>> {
        let mut v = Vec::new();
        for e in fs::read_dir(self.path("fd"))? {
            let e = e?;
            let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let target = match fs::read_link(e.path()) {
                Ok(p) => p.to_string_lossy().into_owned(),
                // Closed since the listing (a running process, as in a
                // preflight): not open, so not there to carry.
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(err) => format!("<unreadable: {err}>"),
            };
            v.push((fd, target));
        }
        v.sort();
        Ok(v)
    }

    /// `pos` and `flags` (octal) of `fdinfo/<fd>`.
    pub(crate) fn fdinfo(&self, fd: i32) -> io::Result<(u64, u32)> {
        let text = fs::read_to_string(self.path(&format!("fdinfo/{fd}")))?;
        let field = |name: &str, radix: u32| -> io::Result<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| u64::from_str_radix(v.trim(), radix).ok())
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("fdinfo/{fd} has no {name}"),
                    )
                })
        };
        let flags = u32::try_from(field("flags:", 8)?)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "flags"))?;
        Ok((field("pos:", 10)?, flags))
    }

    /// The offsets of the process's time namespace (`timens_offsets`):
    /// `(monotonic, boottime)` in ns; zero without time namespaces.
    pub(crate) fn timens_offsets(&self) -> io::Result<(i128, i128)> {
        match fs::read_to_string(self.path("timens_offsets")) {
            Ok(t) => parse_timens_offsets(&t),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok((0, 0)),
            Err(e) => Err(e),
        }
    }

    /// A timerfd's clock, unread expirations and `timerfd_settime` flags
    /// (`clockid:`, `ticks:`, `settime flags:` of `fdinfo/<fd>`).
    pub(crate) fn timerfd_info(&self, fd: i32) -> io::Result<(u32, u64, u32)> {
        parse_timerfd_info(&fs::read_to_string(self.path(&format!("fdinfo/{fd}")))?)
            .ok_or_else(|| bad("timerfd fdinfo", &format!("fd {fd}")))
    }

    /// A signalfd's mask (`sigmask:` of `fdinfo/<fd>`, hex; bit n-1 for
    /// signal n).
    pub(crate) fn signalfd_mask(&self, fd: i32) -> io::Result<u64> {
        self.fdinfo_field(fd, "sigmask:")?
            .and_then(|v| u64::from_str_radix(&v, 16).ok())
            .ok_or_else(|| bad("signalfd fdinfo", &format!("fd {fd}")))
    }

    /// The value after `name` in `fdinfo/<fd>`, if that line is there.
    pub(crate) fn fdinfo_field(&self, fd: i32, name: &str) -> io::Result<Option<String>> {
        let text = fs::read_to_string(self.path(&format!("fdinfo/{fd}")))?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string()))
    }

    /// What `fd/<fd>` is open on (the link followed).
    pub(crate) fn fd_metadata(&self, fd: i32) -> io::Result<fs::Metadata> {
        fs::metadata(self.path(&format!("fd/{fd}")))
    }

    /// Children of every thread (`task/*/children`).
    pub(crate) fn children(&self) -> io::Result<Vec<i32>> {
        let mut out = Vec::new();
        for t in self.tasks()? {
            let p = self.path(&format!("task/{t}/children"));
            match fs::read_to_string(&p) {
                Ok(s) => out.extend(s.split_whitespace().filter_map(|x| x.parse::<i32>().ok())),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Number of POSIX timers (`timer_create`).
    pub(crate) fn posix_timers(&self) -> io::Result<Vec<ProcTimer>> {
        match fs::read_to_string(self.path("timers")) {
            Ok(s) => parse_posix_timers(&s),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// `comm` of a thread, NUL-padded to 16 bytes.
    pub(crate) fn comm(&self, tid: i32) -> [u8; 16] {
        let mut c = [0u8; 16];
        if let Ok(s) = fs::read(self.path(&format!("task/{tid}/comm"))) {
            let s = s.strip_suffix(b"\n").unwrap_or(&s);
            let n = s.len().min(15);
            c[..n].copy_from_slice(&s[..n]);
        }
        c
    }

    pub(crate) fn exe(&self) -> String {
        fs::read_link(self.path("exe"))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// `CLOCK_MONOTONIC` and `CLOCK_BOOTTIME` of the kernel itself (its root
/// time namespace), in ns: ours less our time namespace's offsets. Time
/// namespace offsets count from these.
pub(crate) fn kernel_clocks() -> io::Result<(i128, i128)> {
    let (m_off, b_off) =
        ProcDir::new(Path::new("/proc"), std::process::id() as i32).timens_offsets()?;
    let now = |c| -> io::Result<i128> {
        let t = nix::time::clock_gettime(c).map_err(io::Error::from)?;
        Ok(i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec()))
    };
    Ok((
        now(nix::time::ClockId::CLOCK_MONOTONIC)? - m_off,
        now(nix::time::ClockId::CLOCK_BOOTTIME)? - b_off,
    ))
}

/// `timens_offsets`: lines `<clock> <sec> <nsec>`, the clock by name
/// (`monotonic`, `boottime`) or number (1, 7).
pub(crate) fn parse_timens_offsets(text: &str) -> io::Result<(i128, i128)> {
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("timens_offsets: {text:?}"),
        )
    };
    let (mut mono, mut boot) = (0i128, 0i128);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [clock, sec, nsec] = f[..] else {
            return Err(bad());
        };
        let sec: i64 = sec.parse().map_err(|_| bad())?;
        let nsec: i64 = nsec.parse().map_err(|_| bad())?;
        let ns = i128::from(sec) * 1_000_000_000 + i128::from(nsec);
        match clock {
            "monotonic" | "1" => mono = ns,
            "boottime" | "7" => boot = ns,
            _ => return Err(bad()),
        }
    }
    Ok((mono, boot))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An epoll's fdinfo as the kernel prints it (fs/eventpoll.c).
    #[test]
    fn epoll_fdinfo() {
        let t = "pos:\t0\nflags:\t02000002\nmnt_id:\t16\nino:\t1057\n\
                 tfd:        5 events:       19 data:             1111  pos:0 ino:41a sdev:f\n\
                 tfd:        7 events: 80000001 data: ffffffffffffffff  pos:0 ino:1e0f sdev:e\n";
        assert_eq!(
            parse_epoll_info(t).unwrap(),
            [
                EpollInfo {
                    fd: 5,
                    events: 0x19,
                    data: 0x1111,
                    ino: 0x41a
                },
                EpollInfo {
                    fd: 7,
                    events: 0x8000_0001,
                    data: u64::MAX,
                    ino: 0x1e0f
                }
            ]
        );
        assert!(parse_epoll_info("pos:\t0\n").unwrap().is_empty());
        assert!(parse_epoll_info("tfd: 5 events: 19 data: 1 pos:0 sdev:f\n").is_err());
        assert!(parse_epoll_info("tfd: x events: 19 data: 1 pos:0 ino:1 sdev:f\n").is_err());
    }

    /// A timerfd's fdinfo as 6.18 prints it (6.1 prints the same lines).
    #[test]
    fn timerfd_fdinfo() {
        let t = "pos:\t0\nflags:\t02004002\nmnt_id:\t17\nino:\t1038\nclockid: 0\n\
                 ticks: 31\nsettime flags: 03\nit_value: (99, 973340548)\nit_interval: (0, 0)\n";
        assert_eq!(parse_timerfd_info(t), Some((0, 31, 3)));
        assert_eq!(parse_timerfd_info("clockid: 1\nticks: 0\n"), None);
        assert_eq!(
            parse_timerfd_info("clockid: x\nticks: 0\nsettime flags: 00\n"),
            None
        );
    }

    const MAPS: &str = "\
55d0c5a00000-55d0c5a02000 r--p 00000000 fe:00 1234                       /usr/bin/cat
55d0c6000000-55d0c6021000 rw-p 00000000 00:00 0                          [heap]
7f4ea0b1c000-7f4ea0b20000 r--p 00000000 00:00 0                          [vvar]
7f4ea0b22000-7f4ea0b24000 r-xp 00000000 00:00 0                          [vdso]
7f4ea0c00000-7f4ea0c01000 rw-s 00000000 00:01 42                         /SYSV00000000 (deleted)
7ffe56ceb000-7ffe56d0c000 rw-p 00000000 00:00 0                          [stack]
7f0000000000-7f0000001000 ---p 00000000 00:00 0 
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
";

    #[test]
    fn maps() {
        let m = parse_maps(MAPS).unwrap();
        assert_eq!(m.len(), 8);
        assert_eq!(m[0].name, "/usr/bin/cat");
        assert!(m[0].read && !m[0].write && !m[0].shared);
        assert_eq!(m[1].name, "[heap]");
        assert!(m[4].shared && m[4].write);
        assert_eq!(m[4].name, "/SYSV00000000 (deleted)");
        assert_eq!(m[6].name, "");
        assert!(!m[6].read && !m[6].write && !m[6].exec);
        assert_eq!(m[7].start, 0xffffffffff600000);
        assert!(parse_maps("zz-1 r--p 0 0 0").is_err());
    }

    #[test]
    fn smaps() {
        let t = "\
55f4b2327000-55f4b2329000 r--p 00000000 fe:00 247282                     /usr/bin/head
Size:                  8 kB
Rss:                  16 kB
VmFlags: rd mr mw me
7f0000000000-7f0000400000 rw-p 00000000 00:00 0
Size:               4096 kB
Rss:                4096 kB
VmFlags: rd wr mr mw me ac hg
";
        let s = parse_smaps(t).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].map.name, "/usr/bin/head");
        assert_eq!(s[0].rss_kib, 16);
        assert!(!s[0].hugepage);
        assert_eq!(s[1].rss_kib, 4096);
        assert!(s[1].hugepage && !s[1].nohugepage);
        assert!(parse_smaps("Rss: 4 kB\n").is_err());
    }

    #[test]
    fn status() {
        let s = parse_status(
            "Name:\tmkcounter\nState:\tS (sleeping)\nTracerPid:\t0\nThreads:\t4\n\
             SigIgn:\t0000000000001000\nSigCgt:\t0000000100000200\nSeccomp:\t0\n\
             x86_Thread_features:\t\n",
        )
        .unwrap();
        assert_eq!(s.state, 'S');
        assert_eq!(s.threads, 4);
        assert_eq!(s.sig_ign, 0x1000);
        assert_eq!(s.sig_cgt, 0x1_0000_0200);
        assert!(!s.shadow_stack);
        let s = parse_status("TracerPid:\t77\nx86_Thread_features:\tshstk wrss\n").unwrap();
        assert_eq!(s.tracer_pid, 77);
        assert!(s.shadow_stack);
    }

    #[test]
    fn stat_with_odd_comm() {
        let mut fields: Vec<String> = (3..=52).map(|i| (i * 10).to_string()).collect();
        fields[0] = "S".into();
        let text = format!("123 (a) b (c)) {}\n", fields.join(" "));
        let s = parse_stat(&text).unwrap();
        assert_eq!(s.start_code, 260);
        assert_eq!(s.end_code, 270);
        assert_eq!(s.start_stack, 280);
        assert_eq!(s.start_data, 450);
        assert_eq!(s.start_brk, 470);
        assert_eq!(s.env_end, 510);
        assert!(parse_stat("1 (x) S 2").is_err());
    }

    #[test]
    fn auxv() {
        let mut b = Vec::new();
        for (t, v) in [(6u64, 4096u64), (25, 0x7fff_1234), (0, 0), (9, 9)] {
            b.extend_from_slice(&t.to_le_bytes());
            b.extend_from_slice(&v.to_le_bytes());
        }
        assert_eq!(parse_auxv(&b), vec![(6, 4096), (25, 0x7fff_1234)]);
    }

    #[test]
    fn fake_tree() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("42");
        fs::create_dir_all(p.join("task/42")).unwrap();
        fs::create_dir_all(p.join("task/43")).unwrap();
        fs::create_dir_all(p.join("fd")).unwrap();
        fs::write(p.join("task/42/children"), "50 51 ").unwrap();
        fs::write(p.join("task/43/children"), "").unwrap();
        fs::write(p.join("task/43/comm"), "worker\n").unwrap();
        fs::write(
            p.join("timers"),
            "ID: 0\nsignal: 14/0000000000000000\nnotify: signal/pid.42\nClockID: 1\n\
             ID: 3\nsignal: 12/0000000000000077\nnotify: signal/tid.43\nClockID: 7\n",
        )
        .unwrap();
        std::os::unix::fs::symlink("pipe:[99]", p.join("fd/1")).unwrap();
        std::os::unix::fs::symlink("socket:[7]", p.join("fd/3")).unwrap();
        let pd = ProcDir::new(d.path(), 42);
        assert_eq!(pd.tasks().unwrap(), vec![42, 43]);
        assert_eq!(pd.children().unwrap(), vec![50, 51]);
        let t = pd.posix_timers().unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(
            t[1],
            ProcTimer {
                id: 3,
                signo: 12,
                sigval: 0x77,
                notify: "signal".into(),
                to_thread: true,
                target: 43,
                clockid: 7
            }
        );
        assert!(!t[0].to_thread);
        assert!(parse_posix_timers("ID: 0\nsignal: 14/0\n").is_err());
        assert_eq!(&pd.comm(43)[..7], b"worker\0");
        assert_eq!(
            pd.fds().unwrap(),
            vec![(1, "pipe:[99]".into()), (3, "socket:[7]".into())]
        );
    }

    #[test]
    fn timens_offsets_by_name_or_number_and_negative() {
        assert_eq!(
            parse_timens_offsets(
                "monotonic           0         0\nboottime            0         0\n"
            )
            .unwrap(),
            (0, 0)
        );
        assert_eq!(
            parse_timens_offsets("1 -5 250\n7 3 0\n").unwrap(),
            (-5_000_000_000 + 250, 3_000_000_000)
        );
        assert!(parse_timens_offsets("realtime 1 0\n").is_err());
        assert!(parse_timens_offsets("monotonic x 0\n").is_err());
    }

    /// A preflight lists a running process's descriptors: one closed
    /// between the listing and its readlink is not open, not "unreadable"
    /// (which refused the move, seen in a QEMU test).
    #[test]
    fn a_descriptor_closed_while_listed_is_left_out() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let churn = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    drop(fs::File::open("/dev/null").unwrap());
                }
            })
        };
        let pd = ProcDir::new(Path::new("/proc"), std::process::id() as i32);
        let mut listed = 0;
        for _ in 0..3000 {
            for (fd, target) in pd.fds().unwrap() {
                assert!(!target.starts_with("<unreadable"), "fd {fd}: {target}");
                listed += usize::from(target == "/dev/null");
            }
        }
        stop.store(true, Ordering::Relaxed);
        churn.join().unwrap();
        // The churning descriptor was seen open some of the time.
        assert!(listed > 0);
    }
}
