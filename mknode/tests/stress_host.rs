//! Reliability figures of process migration (issue 19), on agents on the
//! host kernel linked by a real shared-memory window in /dev/shm
//! (`common::agents`), with `mkcounter` started through the client's exec
//! stream:
//!
//! - concurrent moves: several processes moving at the same time between
//!   three kernels, lazy and stop-copy mixed, round after round: every
//!   count goes on (no gap, no repeat), every checksum holds, each old pid
//!   is gone after its move, only one copy of each process runs, no agent
//!   is stuck, nothing is left behind;
//! - injected faults: the destination's kernel killed at a random point of
//!   a move (before the freeze, while the image streams, while the copy is
//!   restored, while a lazy copy's pages go, after): the move fails with
//!   its cause named and the original runs on with its output intact, or
//!   the move was over and the process ends as lost with its kernel.
//!
//! The suite runs short versions; the long ones (the README's figures):
//! `MKCTL_STRESS_ROUNDS=50 cargo test -p mknode --test stress_host concurrent -- --nocapture`
//! and `MKCTL_FAULT_EPISODES=100 cargo test -p mknode --test stress_host killed -- --nocapture`.
//! `MKCTL_STRESS_SEED` / `MKCTL_FAULT_SEED` replay a run (each run prints its seed);
//! `MKCTL_TEST_LOG=debug` shows the agents' log.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::agents::{move_out, net, net_of, tail, ExecStream, Net};
use mknode::wire::{ExitStatus, Msg};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// splitmix64: a small seeded generator (no dependency for this).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v}: a number expected"))
    })
}

fn seed(name: &str) -> u64 {
    env_u64(name).unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    })
}

fn signal(pid: u32, s: Signal) {
    kill(Pid::from_raw(pid as i32), s).unwrap_or_else(|e| panic!("{s} to {pid}: {e}"));
}

/// The processes this test process started (directly, as the agents here
/// do: execs and restore stubs alike), with their state letter; zombies
/// included.
fn children() -> Vec<(u32, char)> {
    let me = std::process::id();
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "<pid> (<comm>) <state> <ppid> ...": comm may hold anything.
        let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let state = f.next().and_then(|s| s.chars().next()).unwrap_or('?');
        if f.next().and_then(|p| p.parse::<u32>().ok()) == Some(me) {
            v.push((pid, state));
        }
    }
    v.sort_unstable();
    v
}

/// Waits until the processes this test started are exactly `want` (none
/// exited unreaped, none more); fails with what is there after 10 s.
fn only_these_run(want: &[u32], what: &str) {
    let mut want = want.to_vec();
    want.sort_unstable();
    let t = Instant::now();
    loop {
        let now = children();
        if now.iter().map(|c| c.0).collect::<Vec<_>>() == want && now.iter().all(|c| c.1 != 'Z') {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{what}: processes {now:?} run (pid, state), {want:?} expected"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// True once `pid` is gone altogether (exited and reaped), within 10 s.
fn reaped(pid: u32) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Whether `pid` is held under ptrace (frozen by a move).
fn traced(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| !s.contains("TracerPid:\t0\n"))
        .unwrap_or(false)
}

fn no_gap(what: &str, out: &ExecStream) {
    let s = out.seqs();
    assert!(!s.is_empty(), "{what}: no output");
    for w in s.windows(2) {
        assert_eq!(
            w[1],
            w[0] + 1,
            "{what}: gap or repeat between {} and {}:\n{}",
            w[0],
            w[1],
            tail(&out.text)
        );
    }
}

/// Reads until `n` more `seq=` lines arrived.
fn more_lines(out: &mut ExecStream, n: usize, t: Duration, what: &str) {
    let from = out.text.len();
    out.until(t, |s| s[from..].matches("seq=").count() >= n);
    assert!(
        out.exited.is_none() && out.failed.is_none(),
        "{what}: the process ended ({:?} {:?}):\n{}",
        out.exited,
        out.failed,
        tail(&out.text)
    );
}

/// Asks for the memory checksum of `pid` (printed into `out`).
fn checksum(pid: u32, out: &mut ExecStream, what: &str) -> String {
    let k = out.checksums().len();
    signal(pid, Signal::SIGUSR1);
    out.until(Duration::from_secs(60), |t| {
        t.matches("checksum=").count() > k
    });
    out.checksums()
        .get(k)
        .cloned()
        .unwrap_or_else(|| panic!("{what}: no checksum:\n{}", tail(&out.text)))
}

/// Every kernel's agent answers at once: none is stuck.
fn all_answer(n: &Net, kernels: &[u16]) {
    for &k in kernels {
        let r = n.agents[0].call(k, Duration::from_secs(5), |req| Msg::InfoRequest { req });
        assert!(
            matches!(r, Ok(Msg::Info { .. })),
            "agent {k} does not answer: {r:?}"
        );
    }
}

/// This process's threads (the agents' among them).
fn threads() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

// ---------------------------------------------------------------- moves at once

/// One process of the concurrent run, as its driver sees it.
struct Proc {
    at: u16,
    pid: u32,
    out: ExecStream,
    sum: String,
}

#[derive(Default)]
struct Moves {
    lazy: u32,
    stop_copy: u32,
    downtimes: Vec<Duration>,
    totals: Vec<Duration>,
}

/// Moves `p` `rounds` times, each time to another of kernels 1 to 3 at
/// random, lazy or stop-copy at random, checking each move.
fn drive(n: &Net, i: usize, p: &mut Proc, rounds: u64, rng: &mut Rng) -> Moves {
    let mut m = Moves::default();
    for round in 0..rounds {
        let what = format!("process {i}, round {round}");
        let to = [1u16, 2, 3]
            .into_iter()
            .filter(|&k| k != p.at)
            .nth(rng.below(2) as usize)
            .unwrap();
        let lazy = rng.below(2) == 1;
        let t0 = Instant::now();
        let r =
            move_out(n, (p.at, p.pid), to, lazy, Duration::from_secs(300)).unwrap_or_else(|e| {
                panic!(
                    "{what}: moving {} from {} to {to} (lazy {lazy}): {e}",
                    p.pid, p.at
                )
            });
        let Msg::MigrateReport {
            new_pid,
            downtime_ns,
            ..
        } = r
        else {
            panic!("{what}: {r:?}")
        };
        m.totals.push(t0.elapsed());
        m.downtimes.push(Duration::from_nanos(downtime_ns));
        if lazy {
            m.lazy += 1
        } else {
            m.stop_copy += 1
        }
        assert_ne!(new_pid, p.pid, "{what}");
        // The old pid is gone (killed and reaped on its kernel), the new
        // one runs: one copy of the process.
        assert!(reaped(p.pid), "{what}: the original {} still there", p.pid);
        if !std::path::Path::new(&format!("/proc/{new_pid}")).exists() {
            // What its exec says of it.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                p.out.until(Duration::from_secs(3), |_| false)
            }));
            panic!(
                "{what}: the copy {new_pid} does not run ({} -> {to}, lazy {lazy}); its exec: {:?} {:?}\n{}",
                p.at,
                p.out.exited,
                p.out.failed,
                tail(&p.out.text)
            );
        }
        let old = p.pid;
        (p.at, p.pid) = (to, new_pid);
        more_lines(&mut p.out, 5, Duration::from_secs(120), &what);
        let sum = checksum(p.pid, &mut p.out, &what);
        assert_eq!(sum, p.sum, "{what}: memory changed ({old} -> {new_pid})");
    }
    m
}

/// `MKCTL_STRESS_PROCS` processes (8) moving at the same time between three
/// kernels, `MKCTL_STRESS_ROUNDS` moves each (3 in the suite).
#[test]
fn concurrent_moves_between_three_kernels() {
    let _one = common::serial();
    let procs = env_u64("MKCTL_STRESS_PROCS").unwrap_or(8) as usize;
    let rounds = env_u64("MKCTL_STRESS_ROUNDS").unwrap_or(3);
    let seed = seed("MKCTL_STRESS_SEED");
    eprintln!("concurrent moves: {procs} processes x {rounds} rounds, MKCTL_STRESS_SEED={seed}");
    let interval = env_u64("MKCTL_STRESS_INTERVAL_MS")
        .unwrap_or(50)
        .to_string();
    let n = net_of(3, |_| mknode::agent::kernel_info);
    let mut ps: Vec<Proc> = (0..procs)
        .map(|i| {
            let at = 1 + (i % 3) as u16;
            // 1 to 8 MiB each, so moves take different times and overlap
            // in every phase. One worker thread (and the main one) and a
            // line every MKCTL_STRESS_INTERVAL_MS (50): 16 spinning
            // workers on this 2-CPU machine starve the agents.
            let mem = format!("{}M", 1 << (i % 4));
            let (pid, mut out) = common::agents::start(
                &n,
                at,
                &["--mem", &mem, "--threads", "1", "--interval-ms", &interval],
            );
            let sum = checksum(pid, &mut out, &format!("process {i}"));
            Proc { at, pid, out, sum }
        })
        .collect();
    let threads_before = threads();
    let t0 = Instant::now();
    let moves: Vec<Moves> = std::thread::scope(|s| {
        let hs: Vec<_> = ps
            .iter_mut()
            .enumerate()
            .map(|(i, p)| {
                let n = &n;
                let mut rng = Rng(seed ^ (i as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
                s.spawn(move || drive(n, i, p, rounds, &mut rng))
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    let took = t0.elapsed();
    let threads = threads();
    // Nothing stays behind on the kernels a process left, whatever the
    // number of moves: per process, a forwarding thread at its home, the
    // restore thread and its two output pumps where it runs, and perhaps a
    // lazy copy's pager about to end.
    assert!(
        threads <= threads_before + 5 * procs as u64,
        "{threads} threads after the moves, {threads_before} before"
    );
    // One copy of each process runs, nothing else: no stub, no original
    // left frozen anywhere.
    let pids: Vec<u32> = ps.iter().map(|p| p.pid).collect();
    only_these_run(&pids, "after every move");
    all_answer(&n, &[1, 2, 3]);
    // Each end reaches the exec that started it, from where it runs.
    for (i, p) in ps.iter_mut().enumerate() {
        signal(p.pid, Signal::SIGTERM);
        p.out.until(Duration::from_secs(30), |_| false);
        assert_eq!(
            p.out.exited,
            Some(ExitStatus::Signal(15)),
            "process {i}: {:?}\n{}",
            p.out.failed,
            tail(&p.out.text)
        );
        no_gap(&format!("process {i}"), &p.out);
        assert!(p.out.checksums().iter().all(|c| *c == p.sum), "process {i}");
    }
    only_these_run(&[], "after the end");
    let lazy: u32 = moves.iter().map(|m| m.lazy).sum();
    let stop_copy: u32 = moves.iter().map(|m| m.stop_copy).sum();
    let mut down: Vec<Duration> = moves.iter().flat_map(|m| m.downtimes.clone()).collect();
    let mut totals: Vec<Duration> = moves.iter().flat_map(|m| m.totals.clone()).collect();
    down.sort_unstable();
    totals.sort_unstable();
    let lines: usize = ps.iter().map(|p| p.out.seqs().len()).sum();
    assert_eq!((lazy + stop_copy) as u64, procs as u64 * rounds);
    eprintln!(
        "concurrent moves: {} moves ({lazy} lazy, {stop_copy} stop-copy) of {procs} processes in {:.1} s; \
         downtime median {:.1} ms, max {:.1} ms; move median {:.1} ms, max {:.1} ms; \
         {lines} lines, no gap, no repeat; every checksum held; leftover processes: 0; \
         {threads_before} threads in the agents' process before the moves, {threads} after",
        lazy + stop_copy,
        took.as_secs_f64(),
        ms(down[down.len() / 2]),
        ms(*down.last().unwrap()),
        ms(totals[totals.len() / 2]),
        ms(*totals.last().unwrap()),
    );
}

/// Moves `pid` from `at` to `to` through the client, and returns its new
/// pid.
fn move_once(n: &Net, pid: u32, at: u16, to: u16, lazy: bool) -> u32 {
    let r = move_out(n, (at, pid), to, lazy, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("moving {pid} from {at} to {to}: {e}"));
    match r {
        Msg::MigrateReport { new_pid, .. } => new_pid,
        other => panic!("moving {pid} from {at} to {to}: {other:?}"),
    }
}

/// A process's output and end go to its home from wherever it runs, not
/// through the kernels it passed: one of those going down later cuts
/// nothing. Started on 1, moved to 2, then to 3 (lazily); 2 is killed;
/// the process goes on writing to its exec on 1, comes back home, and its
/// end reaches the exec.
#[test]
fn a_kernel_the_process_left_can_go_down() {
    let _one = common::serial();
    let mut n = net_of(3, |_| mknode::agent::kernel_info);
    let (pid, mut out) = common::agents::start(&n, 1, &["--mem", "2M", "--interval-ms", "20"]);
    let sum = checksum(pid, &mut out, "at home");
    let pid = move_once(&n, pid, 1, 2, false);
    more_lines(&mut out, 5, Duration::from_secs(30), "on 2");
    let pid = move_once(&n, pid, 2, 3, true);
    more_lines(&mut out, 5, Duration::from_secs(30), "on 3");
    let threads_before = threads();
    kill_kernel(&mut n, 2);
    more_lines(&mut out, 20, Duration::from_secs(30), "on 3, with 2 down");
    assert_eq!(checksum(pid, &mut out, "on 3"), sum);
    let pid = move_once(&n, pid, 3, 1, false);
    more_lines(&mut out, 5, Duration::from_secs(30), "back on 1");
    signal(pid, Signal::SIGTERM);
    out.until(Duration::from_secs(30), |_| false);
    assert_eq!(
        out.exited,
        Some(ExitStatus::Signal(15)),
        "{:?}\n{}",
        out.failed,
        tail(&out.text)
    );
    no_gap("the process", &out);
    assert!(out.checksums().iter().all(|c| *c == sum));
    only_these_run(&[], "after the end");
    eprintln!("threads in the agents' process with the copy on 3: {threads_before}");
}

/// A move to a kernel already known to be down is refused at once, by
/// name, and the process runs on.
#[test]
fn a_move_to_a_kernel_known_down_fails_at_once() {
    let _one = common::serial();
    let mut n = net_of(3, |_| mknode::agent::kernel_info);
    let (pid, mut out) = common::agents::start(&n, 1, &["--mem", "1M", "--interval-ms", "20"]);
    more_lines(&mut out, 3, Duration::from_secs(30), "before");
    kill_kernel(&mut n, 2);
    let t = Instant::now();
    while n.agents[1].lost(2).is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "2 never taken as lost"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let t = Instant::now();
    let r = move_out(&n, (1, pid), 2, true, Duration::from_secs(60));
    let took = t.elapsed();
    let Err(mknode::agent::AgentError::Failed { message, .. }) = r else {
        panic!("{r:?}")
    };
    assert!(
        message.contains("endpoint 2 stopped") && message.contains("the original runs on"),
        "{message}"
    );
    assert!(took < Duration::from_secs(1), "refused after {took:?}");
    more_lines(&mut out, 3, Duration::from_secs(30), "after");
    signal(pid, Signal::SIGTERM);
    out.until(Duration::from_secs(30), |_| false);
    assert_eq!(out.exited, Some(ExitStatus::Signal(15)));
}

// ---------------------------------------------------------------- faults

/// Kills kernel `k` of `n` as a crash does: its agent stops answering (its
/// links go, its heartbeat stops), it leaves the shared window; and the
/// processes on it die with it, now and for as long as `sweep` runs (the
/// dead agent's threads go on in this test process, unlike a crashed
/// kernel's: a restore it was running could still make a copy).
fn kill_kernel(n: &mut Net, k: u16) {
    let a = &n.agents[k as usize];
    n.silenced[k as usize].store(true, std::sync::atomic::Ordering::Relaxed);
    // Its receive threads stop after the message in hand, and its links
    // all go at once (each removal waits for its receive thread, up to
    // 100 ms on an idle link: one after the other, the link to the
    // origin would serve on meanwhile).
    a.shutdown();
    std::thread::scope(|s| {
        for p in (0..n.agents.len() as u16).filter(|&p| p != k) {
            s.spawn(move || a.remove_link(p));
        }
    });
    drop(n.endpoints[k as usize].take());
}

/// Until `stop`, kills every process this test started but `keep` (the
/// original, on kernel 1): the others are the dead destination's (its
/// copy, or a stub being restored), and reaps them (the dead agent's
/// restore thread, which would, may wait for pieces that never come).
/// Returns how many it killed.
fn sweep(keep: u32, stop: &std::sync::atomic::AtomicBool) -> usize {
    use nix::sys::wait::{waitpid, WaitPidFlag};
    let mut killed = std::collections::BTreeSet::new();
    loop {
        for (pid, state) in children() {
            if pid == keep {
                continue;
            }
            let p = Pid::from_raw(pid as i32);
            if state == 'Z' {
                let _ = waitpid(p, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL));
            } else {
                let _ = kill(p, Signal::SIGKILL);
                killed.insert(pid);
            }
        }
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return killed.len();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sets its flag when dropped: a failed assertion stops the sweeper too.
struct SetOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

type Answers = std::sync::Arc<std::sync::Mutex<Vec<(Instant, Msg)>>>;

/// Sends the client's request to move `pid` from kernel 1 to 2; its
/// answers land in the returned list as they come.
fn move_request(n: &Net, pid: u32, lazy: bool) -> (Answers, std::thread::JoinHandle<()>) {
    let (_req, rx) = n.agents[0]
        .request(1, |req| Msg::MigrateOut {
            req,
            pid,
            to: 2,
            lazy,
            any_cpu: false,
        })
        .expect("move request");
    let answers: Answers = Default::default();
    let a = std::sync::Arc::clone(&answers);
    let h = std::thread::spawn(move || {
        while let Ok(m) = rx.recv_timeout(Duration::from_secs(300)) {
            let last = m.is_final();
            a.lock().unwrap().push((Instant::now(), m));
            if last {
                return;
            }
        }
    });
    (answers, h)
}

const FAULT_ARGS: [&str; 6] = ["--mem", "16M", "--threads", "2", "--interval-ms", "5"];

/// How long a whole move takes here (request to report), the longest of
/// two.
fn move_time(lazy: bool) -> Duration {
    (0..2)
        .map(|_| {
            let n = net();
            let (pid, mut out) = common::agents::start(&n, 1, &FAULT_ARGS);
            more_lines(&mut out, 5, Duration::from_secs(30), "calibration");
            let t0 = Instant::now();
            let (answers, h) = move_request(&n, pid, lazy);
            h.join().unwrap();
            let took = t0.elapsed();
            let a = answers.lock().unwrap();
            let Some((_, Msg::MigrateReport { new_pid, .. })) = a.last() else {
                panic!("calibration move: {:?}", a.last())
            };
            signal(*new_pid, Signal::SIGKILL);
            out.until(Duration::from_secs(30), |_| false);
            only_these_run(&[], "after a calibration move");
            took
        })
        .max()
        .unwrap()
}

/// Where the move was, as seen just before the kill.
fn phase(answers: &Answers, pid: u32) -> &'static str {
    let a = answers.lock().unwrap();
    if a.iter().any(|(_, m)| m.is_final()) {
        "after the move"
    } else if a
        .iter()
        .any(|(_, m)| matches!(m, Msg::MigrateProgress { .. }))
    {
        "copy running, pages still going"
    } else if children().iter().any(|c| c.0 != pid) {
        "frozen, copy being restored"
    } else if traced(pid) {
        "frozen, image streaming"
    } else {
        "before the freeze"
    }
}

/// One episode: a fresh net, `mkcounter` on kernel 1 moving to kernel 2,
/// kernel 2 killed `delay` after the request. Returns the phase the kill
/// landed in, the outcome, the failure's text if the move failed, and how
/// long after the kill the move's answer came.
fn episode(
    e: u64,
    lazy: bool,
    delay: Duration,
) -> (&'static str, &'static str, String, Option<Duration>) {
    let what = format!("episode {e} (lazy {lazy}, kill after {:.1} ms)", ms(delay));
    let mut n = net();
    let (pid, mut out) = common::agents::start(&n, 1, &FAULT_ARGS);
    more_lines(&mut out, 5, Duration::from_secs(30), &what);
    let sum = checksum(pid, &mut out, &what);
    let t0 = Instant::now();
    let (answers, h) = move_request(&n, pid, lazy);
    std::thread::sleep(delay.saturating_sub(t0.elapsed()));
    let phase = phase(&answers, pid);
    let killed_at = Instant::now();
    kill_kernel(&mut n, 2);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (outcome, why, settled) = std::thread::scope(|s| {
        let sweeper = s.spawn(|| sweep(pid, &stop));
        let stop_sweeping = SetOnDrop(&stop);
        // The move answers soon, whatever happened: the origin's agent
        // is not stuck on a dead destination.
        let t = Instant::now();
        while !answers.lock().unwrap().iter().any(|(_, m)| m.is_final()) {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "{what}: no answer to the move 30 s after the kill (killed {phase}); answers {:?}; threads:\n{}",
                answers.lock().unwrap(),
                common::agents::threads()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        h.join().unwrap();
        let (at, last) = answers.lock().unwrap().last().cloned().unwrap();
        // (None: answered before the kill.)
        let settled = at.checked_duration_since(killed_at);
        let r = match last {
            Msg::MigrateReport { .. } => {
                // The move was over: the process ran on kernel 2 and died
                // with it; its exec says so, by name.
                assert!(reaped(pid), "{what}: the original {pid} still there");
                out.until(Duration::from_secs(30), |_| false);
                let lost = out.failed.clone().unwrap_or_else(|| {
                    panic!("{what}: the exec ended with {:?}, not as lost", out.exited)
                });
                assert!(
                    lost.contains("the process was lost") && lost.contains("endpoint 2"),
                    "{what}: {lost}"
                );
                ("moved, then lost with kernel 2", String::new(), settled)
            }
            Msg::Failed { message, .. } => {
                // The failure names the destination, and what became of
                // the process.
                assert!(message.contains("endpoint 2"), "{what}: {message}");
                if message.contains("the original runs on")
                    || message.contains("nothing was frozen")
                {
                    // Same process, let go, printing on, same memory.
                    let t = Instant::now();
                    while traced(pid) {
                        assert!(
                            t.elapsed() < Duration::from_secs(5),
                            "{what}: the original {pid} is still frozen: {message}"
                        );
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    more_lines(&mut out, 20, Duration::from_secs(30), &what);
                    assert_eq!(checksum(pid, &mut out, &what), sum, "{what}");
                    signal(pid, Signal::SIGKILL);
                    out.until(Duration::from_secs(30), |_| false);
                    assert_eq!(out.exited, Some(ExitStatus::Signal(9)), "{what}");
                    ("failed, the original ran on", message, settled)
                } else {
                    // The copy had taken over (lazy: it ran while the
                    // rest of its pages went): it is lost with its
                    // kernel, the original gone, and the exec says so.
                    assert!(reaped(pid), "{what}: {message}; yet {pid} still there");
                    out.until(Duration::from_secs(30), |_| false);
                    let lost = out.failed.clone().unwrap_or_else(|| {
                        panic!("{what}: the exec ended with {:?}, not as lost", out.exited)
                    });
                    assert!(lost.contains("endpoint 2"), "{what}: {lost}");
                    ("failed, the copy lost with kernel 2", message, settled)
                }
            }
            other => panic!("{what}: answered {other:?}"),
        };
        drop(stop_sweeping);
        sweeper.join().unwrap();
        r
    });
    no_gap(&what, &out);
    only_these_run(&[], &what);
    all_answer(&n, &[1]);
    (phase, outcome, why, settled)
}

/// `MKCTL_FAULT_EPISODES` moves (10 in the suite), lazy or stop-copy at
/// random, whose destination is killed at a random point: from the
/// request to a little after a whole move's time.
#[test]
fn destination_killed_at_random_points_of_moves() {
    let _one = common::serial();
    let episodes = env_u64("MKCTL_FAULT_EPISODES").unwrap_or(10);
    let seed = seed("MKCTL_FAULT_SEED");
    let mut rng = Rng(seed);
    let took = [move_time(false), move_time(true)];
    eprintln!(
        "faults: {episodes} episodes, MKCTL_FAULT_SEED={seed}; a whole move takes {:.0} ms stop-copy, {:.0} ms lazy",
        ms(took[0]),
        ms(took[1])
    );
    let t0 = Instant::now();
    let mut count: BTreeMap<(&str, &str), u32> = BTreeMap::new();
    let mut causes: BTreeMap<String, u32> = BTreeMap::new();
    let mut slowest = Duration::ZERO;
    for e in 0..episodes {
        let lazy = rng.below(2) == 1;
        let span = took[usize::from(lazy)].as_micros() as u64 * 13 / 10;
        let delay = Duration::from_micros(rng.below(span + 1));
        let (phase, outcome, why, settled) = episode(e, lazy, delay);
        let when = match settled {
            Some(d) => format!("answered {:.0} ms after the kill", ms(d)),
            None => "answered before the kill".into(),
        };
        eprintln!(
            "episode {e}: {} killed after {:.1} ms ({phase}): {outcome} ({when}){}{why}",
            if lazy { "lazy" } else { "stop-copy" },
            ms(delay),
            if why.is_empty() { "" } else { ": " }
        );
        slowest = slowest.max(settled.unwrap_or_default());
        *count.entry((phase, outcome)).or_default() += 1;
        if !why.is_empty() {
            // The cause, without the pids and times that vary.
            let cause: String = why
                .chars()
                .map(|c| if c.is_ascii_digit() { '#' } else { c })
                .collect();
            *causes.entry(cause).or_default() += 1;
        }
    }
    eprintln!(
        "faults: {episodes} episodes in {:.1} s; the move answered at most {:.0} ms after the kill",
        t0.elapsed().as_secs_f64(),
        ms(slowest)
    );
    for ((phase, outcome), k) in &count {
        eprintln!("  {k:4}  killed {phase}: {outcome}");
    }
    eprintln!("causes given:");
    for (c, k) in &causes {
        eprintln!("  {k:4}  {c}");
    }
}
