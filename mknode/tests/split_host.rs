//! Thread migration on the host kernel, at the library level: a thread of
//! `mkthreads` leaves its process (agent 1's kernel) for a shadow process
//! served by agent 2's DSM engine, keeps counting in memory the main thread
//! still reads, comes back, and leaves again; the process then ends on its
//! own, its worker joined.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::agents::net;
use mknode::agent::Dsm;
use mknode::migrate::{restore_shadow, split, StdioPlan};

struct Prog {
    child: Child,
    lines: mpsc::Receiver<String>,
    _dir: tempfile::TempDir,
    stop: std::path::PathBuf,
}

impl Prog {
    fn start() -> Prog {
        let dir = tempfile::tempdir().expect("tempdir");
        let stop = dir.path().join("stop");
        let mut child = Command::new(common::testprog("mkthreads"))
            .arg(&stop)
            .stdout(Stdio::piped())
            .spawn()
            .expect("mkthreads");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Prog {
            child,
            lines,
            _dir: dir,
            stop,
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The next line matching `f`, within `t`.
    fn next<T>(&self, t: Duration, f: impl Fn(&str) -> Option<T>) -> T {
        let end = Instant::now() + t;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let l = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no expected line within {t:?}"));
            if let Some(v) = f(&l) {
                return v;
            }
        }
    }

    /// Waits until the worker is seen running in process `in_pid`, then
    /// checks its count goes on there over `n` more lines.
    fn counts_in(&self, in_pid: i32, n: usize) -> u64 {
        let seen = |l: &str| -> Option<(u64, i32)> {
            let mut it = l.strip_prefix("seen ")?.split_whitespace();
            let c = it.next()?.strip_prefix("count=")?.parse().ok()?;
            let p = it.next()?.strip_prefix("worker_pid=")?.parse().ok()?;
            Some((c, p))
        };
        let (mut last, _) = self.next(Duration::from_secs(20), |l| {
            seen(l).filter(|&(_, p)| p == in_pid)
        });
        let t0 = Instant::now();
        for _ in 0..n {
            let (c, p) = self.next(Duration::from_secs(20), seen);
            assert_eq!(p, in_pid, "the worker moved on its own");
            assert!(c > last, "the count stalled at {last} in {in_pid}");
            last = c;
        }
        eprintln!("{n} lines in {in_pid} in {:?}, count {last}", t0.elapsed());
        last
    }
}

impl Drop for Prog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One test at a time: each runs several processes and agents, and on 2
/// CPUs in parallel they starve each other's moves.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}

fn alive(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn a_thread_leaves_comes_back_and_leaves_again() {
    let _one = one_at_a_time();
    let n = net();
    let origin = n.agents[1].facet::<Dsm>();
    let dest = n.agents[2].facet::<Dsm>();
    let mut p = Prog::start();
    let pid = p.pid();
    let tid: i32 = p.next(Duration::from_secs(10), |l| {
        l.strip_prefix("worker_tid=")?.parse().ok()
    });
    let before = p.counts_in(pid, 2);

    // Out: the worker runs in a shadow process on "kernel 2".
    let left = split::leave(pid, tid, 1, None, &*origin, None).expect("leave");
    assert!(
        !left.new_regions.is_empty(),
        "the process's memory became no region"
    );
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let shared = maps
        .lines()
        .filter(|l| l.contains(&format!("/memfd:mkdsm-p1.{pid}.")))
        .count();
    assert_eq!(shared, left.new_regions.len(), "{maps}");
    assert!(
        !maps.contains("[heap]"),
        "the heap is still private:\n{maps}"
    );
    let t0 = Instant::now();
    // The futex listeners (of the process, of each shadow) go unserved
    // here: the worker takes no lock (the agents' tests serve them).
    let _home_futexes = left.futex_listener;
    let (shadow, _shadow_futexes) =
        restore_shadow(&left.image[..], StdioPlan::null().unwrap(), &*dest, None)
            .expect("restore the shadow");
    assert_ne!(shadow.pid, pid);
    eprintln!(
        "shadow {} running {:?} after the leave",
        shadow.pid,
        t0.elapsed()
    );
    let away = p.counts_in(shadow.pid, 4);
    assert!(away > before);

    // Back: the parked thread takes the shadow's state.
    let img = split::depart(shadow.pid, None).expect("depart");
    dest.release(shadow.pid);
    split::arrive(pid, tid, left.park, &img, None).expect("arrive");
    let home = p.counts_in(pid, 3);
    assert!(home > away);
    assert!(!alive(shadow.pid), "the shadow outlived its thread");

    // Out again: the memory is DSM memory already; the same park page.
    let again = split::leave(pid, tid, 1, Some(left.park), &*origin, None).expect("leave again");
    assert!(again.new_regions.len() < left.new_regions.len());
    let (shadow2, _futexes2) =
        restore_shadow(&again.image[..], StdioPlan::null().unwrap(), &*dest, None)
            .expect("restore the shadow again");
    let away2 = p.counts_in(shadow2.pid, 3);
    assert!(away2 > home);
    let img = split::depart(shadow2.pid, None).expect("depart again");
    dest.release(shadow2.pid);
    split::arrive(pid, tid, again.park, &img, None).expect("arrive again");
    p.counts_in(pid, 2);

    // (Joining needs the futexes served: the agents' tests do it.)
    p.child.kill().unwrap();
    p.child.wait().unwrap();
    origin.release(pid);
}

/// Asks agent `origin` (through agent 0, the client) to move thread `tid`
/// of its process `pid` to `to`: its answer.
fn ask_move(
    n: &common::agents::Net,
    origin: u16,
    (pid, tid): (i32, i32),
    to: u16,
) -> Result<mknode::wire::Msg, mknode::agent::AgentError> {
    n.agents[0].call(origin, Duration::from_secs(60), |req| {
        mknode::wire::Msg::ThreadMove {
            req,
            pid: pid as u32,
            tid: tid as u32,
            to,
            reply_fd: -1,
            reply_buf: 0,
        }
    })
}

/// [`ask_move`] that must succeed: where the thread runs and its shadow.
fn move_thread(n: &common::agents::Net, origin: u16, pid: i32, tid: i32, to: u16) -> (u16, u32) {
    match ask_move(n, origin, (pid, tid), to)
        .unwrap_or_else(|e| panic!("moving {pid}/{tid} to {to}: {e}"))
    {
        mknode::wire::Msg::ThreadMoved { at, shadow_pid, .. } => (at, shadow_pid),
        other => panic!("{other:?}"),
    }
}

/// [`ask_move`] that must be refused: the refusal's text.
fn refused_thread_move(
    n: &common::agents::Net,
    origin: u16,
    pid: i32,
    tid: i32,
    to: u16,
) -> String {
    ask_move(n, origin, (pid, tid), to)
        .expect_err("the move must be refused")
        .to_string()
}

/// The program's worker thread, once it started.
fn started() -> (Prog, i32, i32) {
    let p = Prog::start();
    let pid = p.pid();
    let tid: i32 = p.next(Duration::from_secs(10), |l| {
        l.strip_prefix("worker_tid=")?.parse().ok()
    });
    p.counts_in(pid, 1);
    (p, pid, tid)
}

fn gone_within(pid: i32, t: Duration) -> bool {
    let end = Instant::now() + t;
    while alive(pid) {
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

#[test]
fn the_agents_move_a_thread_between_kernels_and_home() {
    let _one = one_at_a_time();
    let n = net();
    let (mut p, pid, tid) = started();
    // 1 → 2, then 2 → 0 (through the origin), then home.
    let (at, s2) = move_thread(&n, 1, pid, tid, 2);
    assert_eq!(at, 2);
    p.counts_in(s2 as i32, 3);
    let away = n.agents[1].facet::<mknode::agent::Threads>().away();
    assert_eq!(
        away.iter()
            .map(|a| (a.pid, a.tid, a.at, a.shadow_pid))
            .collect::<Vec<_>>(),
        vec![(pid as u32, tid as u32, 2, s2)]
    );
    let (at, s0) = move_thread(&n, 1, pid, tid, 0);
    assert_eq!(at, 0);
    assert!(
        gone_within(s2 as i32, Duration::from_secs(5)),
        "shadow {s2} stayed on 2"
    );
    p.counts_in(s0 as i32, 3);
    let (at, none) = move_thread(&n, 1, pid, tid, 1);
    assert_eq!((at, none), (1, 0));
    assert!(n.agents[1]
        .facet::<mknode::agent::Threads>()
        .away()
        .is_empty());
    assert!(gone_within(s0 as i32, Duration::from_secs(5)));
    p.counts_in(pid, 2);
    // A thread at home cannot go home; the refusal says where it is.
    let e = refused_thread_move(&n, 1, pid, tid, 1);
    assert!(e.contains("already"), "{e}");
    // Out again, and the worker ends there: its parked twin ends at home,
    // so the main thread's join returns.
    let (_, s) = move_thread(&n, 1, pid, tid, 2);
    p.counts_in(s as i32, 2);
    std::fs::write(&p.stop, b"").unwrap();
    let joined: u64 = p.next(Duration::from_secs(20), |l| {
        l.strip_prefix("joined count=")?.parse().ok()
    });
    assert!(joined > 0);
    assert!(p.child.wait().expect("wait").success());
    assert!(gone_within(s as i32, Duration::from_secs(5)));
}

/// A thread whose code was picked for an extension the destination lacks
/// (remembered so, as after a restore from such an image) is refused
/// before anything stops, by name, and counts on where it is: the process
/// is not split.
#[test]
fn a_thread_is_refused_where_its_code_could_not_run_and_runs_on() {
    use mknode::migrate::cpu;
    let _one = one_at_a_time();
    let n = net();
    let (mut p, pid, tid) = started();
    let (absent, wider) = common::wider_than_this_cpu();
    cpu::remember(pid, &wider);
    let e = refused_thread_move(&n, 1, pid, tid, 2);
    assert!(
        e.contains(&format!("this CPU lacks {absent}"))
            && e.contains("the thread runs on where it is")
            && e.contains("a thread's move is always checked")
            && !e.contains("--any-cpu moves one"),
        "{e}"
    );
    assert!(n.agents[1]
        .facet::<mknode::agent::Threads>()
        .away()
        .is_empty());
    p.counts_in(pid, 2);
    std::fs::write(&p.stop, b"").unwrap();
    assert!(p.child.wait().expect("wait").success());
}

#[test]
fn killing_the_shadow_ends_the_whole_process() {
    let _one = one_at_a_time();
    let n = net();
    let (mut p, pid, tid) = started();
    let (_, s) = move_thread(&n, 1, pid, tid, 2);
    p.counts_in(s as i32, 1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(s as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let st = p.child.wait().expect("wait");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.signal(), Some(9), "{st:?}");
    assert!(gone_within(s as i32, Duration::from_secs(5)));
}

#[test]
fn the_shadow_goes_when_the_process_ends_at_home() {
    let _one = one_at_a_time();
    let n = net();
    let (mut p, pid, tid) = started();
    let (_, s) = move_thread(&n, 1, pid, tid, 2);
    p.counts_in(s as i32, 1);
    // The regions its memory became, in the registry (agent 0).
    let prefix = mknode::migrate::split::region_prefix(1, pid);
    let its = || -> Vec<String> {
        n.agents[0]
            .facet::<mknode::agent::Dsm>()
            .regions()
            .into_iter()
            .map(|r| r.name)
            .filter(|name| name.starts_with(&prefix))
            .collect()
    };
    assert!(!its().is_empty(), "no region {prefix}*");
    p.child.kill().unwrap();
    p.child.wait().unwrap();
    assert!(
        gone_within(s as i32, Duration::from_secs(5)),
        "shadow {s} outlived its process"
    );
    // ...go with it (they held its memory: ~2 MB a process on a guest).
    let t = std::time::Instant::now();
    while !its().is_empty() {
        assert!(t.elapsed() < Duration::from_secs(5), "left: {:?}", its());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The three agents serving their processes at `<dir>/agent<N>.sock`.
fn serving(n: &common::agents::Net) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, a) in n.agents.iter().enumerate() {
        a.facet::<Dsm>()
            .serve_local(&dir.path().join(format!("agent{i}.sock")))
            .expect("serving the local socket");
    }
    dir
}

/// Runs `mkthreads args` as a process of agent 1's kernel, to its end.
fn run_on_1(dir: &tempfile::TempDir, args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut c = Command::new(common::testprog("mkthreads"));
    c.args(args)
        .env("MK_AGENT", dir.path().join("agent1.sock"))
        .stdout(Stdio::piped());
    let child = c.spawn().expect("mkthreads");
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = rx
        .recv_timeout(Duration::from_secs(120))
        .unwrap_or_else(|_| {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("mkthreads {args:?} did not end within 120 s")
        });
    let out = out.expect("mkthreads output");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn a_thread_moves_itself_there_and_back() {
    let _one = one_at_a_time();
    let n = net();
    let dir = serving(&n);
    let (st, out) = run_on_1(&dir, &["bounce", "2", "6"]);
    assert!(st.success(), "{out}");
    let line = out.lines().find(|l| l.starts_with("rounds=")).expect(&out);
    assert!(line.starts_with("rounds=6 "), "{line}");
    // At home it ran in the process itself, away in another (its shadow).
    let pids = line.split("pids=").nth(1).unwrap();
    let (here, there) = pids.split_once(',').unwrap();
    assert_ne!(here, there, "{line}");
    assert_ne!(there, "0", "{line}");
}

#[test]
fn workers_sum_their_slices_on_two_kernels_and_are_joined_at_home() {
    let _one = one_at_a_time();
    let n = net();
    let dir = serving(&n);
    let (st, out) = run_on_1(&dir, &["sum", "2", "4", "16"]);
    assert!(st.success(), "{out}");
    let line = out.lines().find(|l| l.starts_with("total=")).expect(&out);
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(k))
            .unwrap()
            .to_string()
    };
    assert_eq!(field("total="), field("expected="), "{line}");
    assert_eq!(field("moved="), "2", "{line}");
    assert_eq!(field("home="), "1", "{line}");
}

#[test]
fn a_kernel_lost_with_a_thread_on_it_ends_the_process_not_a_hang() {
    let _one = one_at_a_time();
    let n = net();
    let (mut p, pid, tid) = started();
    let (_, s) = move_thread(&n, 1, pid, tid, 2);
    p.counts_in(s as i32, 1);
    // Kernel 2 goes down as a killed QEMU does: links gone, no heartbeat.
    for peer in [0, 1] {
        n.agents[2].remove_link(peer);
    }
    n.silenced[2].store(true, std::sync::atomic::Ordering::Relaxed);
    let t0 = Instant::now();
    let (tx, rx) = mpsc::channel();
    let mut child = std::mem::replace(
        &mut p.child,
        Command::new("true").spawn().expect("a placeholder"),
    );
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let st = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the process hung after losing kernel 2")
        .expect("wait");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.signal(), Some(9), "{st:?}");
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    // The shadow went too (its agent lost the process's kernel).
    assert!(gone_within(s as i32, Duration::from_secs(10)));
}

#[test]
fn threads_on_two_kernels_share_a_mutex_and_the_count_is_exact() {
    let _one = one_at_a_time();
    let n = net();
    let dir = serving(&n);
    let (st, out) = run_on_1(&dir, &["mutex", "2", "4", "2000", "4"]);
    assert!(st.success(), "{out}");
    let line = out.lines().find(|l| l.starts_with("count=")).expect(&out);
    assert_eq!(line, "count=32000 expected=32000");
}

#[test]
fn a_thread_asleep_on_one_kernel_is_woken_from_the_other() {
    let _one = one_at_a_time();
    let n = net();
    let dir = serving(&n);
    let (st, out) = run_on_1(&dir, &["pingpong", "2", "200"]);
    assert!(st.success(), "{out}");
    assert!(out.contains("turns=200 "), "{out}");
}

#[test]
fn exit_called_by_a_moved_thread_ends_the_whole_process_with_its_code() {
    let _one = one_at_a_time();
    let n = net();
    let dir = serving(&n);
    // (A process that did not end, exit_group away ending only its
    // thread, fails in run_on_1.)
    let (st, out) = run_on_1(&dir, &["exit", "2", "7"]);
    assert_eq!(st.code(), Some(7), "{out}");
}

#[test]
fn calls_that_cannot_be_coherent_are_refused_away_and_fork_at_home() {
    let _one = one_at_a_time();
    let n = net();
    let dir = serving(&n);
    let (st, out) = run_on_1(&dir, &["refused", "2"]);
    assert!(st.success(), "{out}");
    let line = |side: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(side))
            .unwrap_or_else(|| panic!("no {side:?} line in {out}"))
            .to_string()
    };
    let nope = libc::EOPNOTSUPP;
    // Away: the address space, processes, files opened, signals and
    // handlers are the shadow's alone, so each such call fails; asking for
    // a handler works.
    assert_eq!(
        line("away "),
        format!(
            "mmap={nope} mprotect={nope} munmap={nope} brk={nope} fork={nope} \
             clone={nope} tgkill={nope} open={nope} sigaction_get=0 sigaction_set={nope}"
        )
    );
    // Back home all of it works again but a new process: the process's
    // memory stays shared (memfd) for good, a child would share it too.
    assert_eq!(
        line("home "),
        format!(
            "mmap=0 mprotect=0 munmap=0 brk=0 fork={nope} clone={nope} tgkill=0 open=0 \
             sigaction_get=0 sigaction_set=0"
        )
    );
    assert_eq!(line("origin "), format!("fork={nope}"));
}

#[test]
fn a_move_to_a_kernel_not_there_fails_and_changes_nothing() {
    let _one = one_at_a_time();
    let n = net();
    let dir = serving(&n);
    let (st, out) = run_on_1(&dir, &["nowhere", "9"]);
    assert!(st.success(), "{out}");
    // ENOENT, as mk.h says, and the process was not split: it may fork.
    assert!(out.contains("nowhere errno=2 fork=0"), "{out}");
}
