//! Helpers for the migration tests and bench: build and start `mkcounter`,
//! read its output lines from a pipe, parse them.

#![allow(dead_code)]

pub(crate) mod agents;

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Builds `mkcounter` (release) into the target dir this binary runs from,
/// once per process, and returns its path; `$MKNODE_MKCOUNTER` overrides.
pub(crate) fn mkcounter() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| match std::env::var_os("MKNODE_MKCOUNTER") {
        // A prebuilt one (e.g. the static build for the guests).
        Some(p) => PathBuf::from(p),
        None => testprog("mkcounter"),
    })
    .clone()
}

/// Builds testprogs' `bin` (release) into the target dir this binary runs
/// from, and returns its path.
pub(crate) fn testprog(bin: &str) -> PathBuf {
    cloexec_inherited();
    let exe = std::env::current_exe().expect("current_exe");
    // <target>/<profile>/deps/<this binary>
    let target = exe
        .parent()
        .and_then(|p| p.parent())
        .and_then(|p| p.parent())
        .expect("target dir")
        .to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "testprogs",
            "--bin",
            bin,
        ])
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .unwrap_or_else(|e| panic!("running cargo build for {bin}: {e}"));
    assert!(st.success(), "building {bin} failed");
    target.join("release").join(bin)
}

/// Descriptors this test process inherited without `O_CLOEXEC` (from a
/// shell or CI runner) would leak into every process it starts and make it
/// unmigratable; mark them close-on-exec.
pub(crate) fn cloexec_inherited() {
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    for fd in fds.into_iter().filter(|&fd| fd > 2) {
        // SAFETY: F_SETFD on an integer descriptor touches no memory; a
        // descriptor that was closed meanwhile just yields EBADF.
        unsafe {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
    }
}

/// One parsed output line of mkcounter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Line {
    Seq {
        seq: u64,
        counters: Vec<u64>,
        /// `mono_ms`, and `--clock-spin`'s `(clock_spins, clock_back)`.
        mono_ms: Option<u64>,
        clock: Option<(u64, u64)>,
    },
    Checksum {
        sum: u64,
        bytes: usize,
    },
    /// The joiner thread's `pthread_join` returned.
    Joined,
    /// `pipe_check=...`, `socket_check=...`, `shm_check=...`,
    /// `epoll_check=...` or `memfd_check=...` (`--pipe-inflight`,
    /// `--socketpairs`, `--shared-mem`, `--epoll`, `--memfd`): the whole
    /// line.
    Check(String),
    /// A line of mktree (`top ...`, `kid ...`, `reaped ...`, `ended ...`):
    /// the whole line.
    Tree(String),
}

pub(crate) fn parse(line: &str) -> Option<Line> {
    if line == "joined" {
        return Some(Line::Joined);
    }
    if ["top ", "kid ", "reaped ", "ended ", "relay "]
        .iter()
        .any(|p| line.starts_with(p))
    {
        return Some(Line::Tree(line.to_string()));
    }
    if [
        "pipe_check=",
        "socket_check=",
        "shm_check=",
        "epoll_check=",
        "memfd_check=",
    ]
    .iter()
    .any(|p| line.starts_with(p))
    {
        return Some(Line::Check(line.to_string()));
    }
    if let Some(rest) = line.strip_prefix("checksum=") {
        let (sum, bytes) = rest.split_once(" bytes=")?;
        return Some(Line::Checksum {
            sum: u64::from_str_radix(sum, 16).ok()?,
            bytes: bytes.parse().ok()?,
        });
    }
    let mut it = line.split_whitespace();
    let seq = it.next()?.strip_prefix("seq=")?.parse().ok()?;
    let fields: Vec<(&str, &str)> = it.filter_map(|f| f.split_once('=')).collect();
    let counters = fields
        .iter()
        .filter(|(k, _)| k.starts_with('t'))
        .map(|(_, v)| v.parse().ok())
        .collect::<Option<Vec<u64>>>()?;
    let field =
        |name: &str| -> Option<u64> { fields.iter().find(|(k, _)| *k == name)?.1.parse().ok() };
    let clock = field("clock_spins").zip(field("clock_back"));
    Some(Line::Seq {
        seq,
        counters,
        mono_ms: field("mono_ms"),
        clock,
    })
}

/// The lines a process writes to one pipe, read by a thread.
pub(crate) struct Output {
    rx: Receiver<String>,
}

impl Output {
    pub(crate) fn new(f: impl Into<OwnedFd>) -> Self {
        let f = File::from(f.into());
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(f).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Output { rx }
    }

    /// The next line, or None at EOF / after `t`.
    pub(crate) fn next(&self, t: Duration) -> Option<Line> {
        match self.rx.recv_timeout(t) {
            Ok(l) => Some(parse(&l).unwrap_or_else(|| panic!("unparsable line {l:?}"))),
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => None,
        }
    }

    /// Reads until a line matching `f`, returning the lines before it too.
    pub(crate) fn until(&self, t: Duration, mut f: impl FnMut(&Line) -> bool) -> Vec<Line> {
        let end = Instant::now() + t;
        let mut seen = Vec::new();
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let l = self.next(left).unwrap_or_else(|| {
                panic!("no matching line within {t:?}; last: {:?}", seen.last())
            });
            let hit = f(&l);
            seen.push(l);
            if hit {
                return seen;
            }
        }
    }

    /// Everything up to EOF (the writer is gone).
    pub(crate) fn drain(&self, t: Duration) -> Vec<Line> {
        let end = Instant::now() + t;
        let mut v = Vec::new();
        loop {
            match self
                .rx
                .recv_timeout(end.saturating_duration_since(Instant::now()))
            {
                Ok(l) => v.push(parse(&l).unwrap_or_else(|| panic!("unparsable line {l:?}"))),
                Err(RecvTimeoutError::Disconnected) => return v,
                Err(RecvTimeoutError::Timeout) => panic!("pipe not closed within {t:?}"),
            }
        }
    }
}

pub(crate) fn seqs(lines: &[Line]) -> Vec<(u64, Vec<u64>)> {
    lines
        .iter()
        .filter_map(|l| match l {
            Line::Seq { seq, counters, .. } => Some((*seq, counters.clone())),
            _ => None,
        })
        .collect()
}

/// The value of `name=` in a line of `key=value` words.
pub(crate) fn field(line: &str, name: &str) -> Option<i64> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .find(|(k, _)| *k == name)?
        .1
        .parse()
        .ok()
}

/// A pipe whose write end is for the restored process.
pub(crate) fn pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe2")
}

/// The tests share two CPUs with three busy threads each: one at a time.
pub(crate) static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// How long a test waits for mkcounter's output.
pub(crate) const T: Duration = Duration::from_secs(20);

pub(crate) fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn start(args: &[&str]) -> (Child, Output) {
    start_prog(&mkcounter(), args)
}

/// `prog args` with its stdout read as [`Output`], stdin and stderr null.
pub(crate) fn start_prog(prog: &std::path::Path, args: &[&str]) -> (Child, Output) {
    let mut c = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", prog.display()));
    let out = Output::new(c.stdout.take().expect("stdout"));
    (c, out)
}

/// `/dev/null`, read-write.
pub(crate) fn null() -> OwnedFd {
    File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .expect("null")
        .into()
}

/// Waits until every worker has counted, returning the line.
pub(crate) fn running(out: &Output, threads: usize) -> (u64, Vec<u64>) {
    let l = out.until(T, |l| {
        matches!(l, Line::Seq { counters, .. } if counters.len() == threads && counters.iter().all(|&c| c > 0))
    });
    seqs(&l).pop().expect("a seq line")
}

pub(crate) fn checksum(pid: i32, out: &Output) -> (u64, usize) {
    kill(Pid::from_raw(pid), Signal::SIGUSR1).expect("SIGUSR1");
    match out.until(T, |l| matches!(l, Line::Checksum { .. })).pop() {
        Some(Line::Checksum { sum, bytes }) => (sum, bytes),
        _ => unreachable!(),
    }
}

/// Checks the old stream ends at `L` with no hole, and returns L and the
/// counters of that line.
pub(crate) fn old_tail(lines: &[Line]) -> (u64, Vec<u64>) {
    let s = seqs(lines);
    for w in s.windows(2) {
        assert_eq!(w[1].0, w[0].0 + 1, "hole or repeat in the old stream");
    }
    s.last().cloned().expect("old stream had lines")
}

/// `VmRSS` of `pid` in KiB (0 when it cannot be read).
pub(crate) fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The median (NaN for none): what the benches print, machines being noisy.
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Asserts `seqs` (a process's line numbers) go up by one each time: no
/// gap, no repeat.
pub(crate) fn no_gap(seqs: &[u64]) {
    for w in seqs.windows(2) {
        assert_eq!(
            w[1],
            w[0] + 1,
            "gap or repeat between {} and {}",
            w[0],
            w[1]
        );
    }
}

/// An extension this CPU lacks, and this CPU's extensions with it: what a
/// program that started on a wider CPU picked its code for.
pub(crate) fn wider_than_this_cpu() -> (String, Vec<String>) {
    let mut wider = mknode::migrate::cpu::user_features();
    let absent = [
        "amx_tile",
        "avx512_vp2intersect",
        "avx512_fp16",
        "fma4",
        "xop",
    ]
    .into_iter()
    .find(|f| !wider.iter().any(|t| t == f))
    .expect("an extension this CPU lacks")
    .to_string();
    wider.push(absent.clone());
    (absent, wider)
}
