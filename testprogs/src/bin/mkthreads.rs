//! mkthreads: the process the thread-migration tests split. A worker thread
//! counts in memory shared with the main thread (a heap block) and notes
//! which process it runs in; the main thread prints what it sees.
//!
//! ```text
//! mkthreads STOPFILE
//! mkthreads sum KERNEL N MB
//! mkthreads bounce KERNEL ROUNDS
//! ```
//! The first prints `worker_tid=T` once, then every 50 ms
//! `seen count=C worker_pid=P pid=Q` (P: the process the worker ran in at
//! its last step, Q: this process). When STOPFILE exists the main thread
//! tells the worker to stop, joins it and prints `joined count=C`, then
//! exits 0. The worker only touches atomics: it takes no lock the main
//! thread could hold (futexes do not wake across kernels).
//!
//! `sum` and `bounce` move threads themselves (`mknode::thread::migrate`,
//! what `mk_migrate()` calls), as libmk's `examples/threads.c` does: N
//! workers sum slices of an MB MiB array, the odd ones on KERNEL, and the
//! total is checked after joining them (`total=T expected=E moved=M`); one
//! worker goes to KERNEL and back ROUNDS times, checking where it runs on
//! each side (`rounds=R pids=home,away out_us=.. back_us=..`, the median
//! legs). `faults KERNEL PAGES`: a worker on KERNEL (or at home when KERNEL
//! is this kernel) reads PAGES pages the main thread has just written
//! (`faults=P us_per_page=X`). `mutex KERNEL T K ROUNDS`: T threads add 1
//! to a counter under one mutex, K times a round, moving between home and
//! KERNEL after each round (odd threads start by moving): the total must
//! be exact (`count=C expected=E`) — waits on the mutex cross kernels.
//! `pingpong KERNEL TURNS`: the main thread and a worker on KERNEL take
//! turns through a condition variable, each turn a wake of a thread asleep
//! on the other kernel (`turns=N us_per_turn=X`). `exit KERNEL CODE`: a
//! worker moves to KERNEL and calls `exit(CODE)` there; the process must
//! end with CODE. `refused KERNEL`: a worker on KERNEL tries the calls a
//! moved thread cannot make coherently, and the main thread tries `fork`
//! at home while it is away; every errno is printed as `away NAME=E ...`,
//! `home NAME=E ...` (the worker back home) and `origin fork=E` (0: the
//! call worked). `nowhere KERNEL`: the main thread moves to a kernel that
//! is not linked: `nowhere errno=E fork=F` (the move's errno, then a fork's).

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

struct Shared {
    count: AtomicU64,
    worker_pid: AtomicI64,
    worker_tid: AtomicI64,
    stop: AtomicBool,
}

fn sys(nr: libc::c_long) -> i64 {
    // SAFETY: getpid/gettid take no arguments and cannot fail.
    unsafe { libc::syscall(nr) }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize| -> u64 {
        args.get(i).and_then(|a| a.parse().ok()).unwrap_or_else(|| {
            eprintln!("usage: mkthreads STOPFILE | sum KERNEL N MB | bounce KERNEL ROUNDS");
            std::process::exit(2)
        })
    };
    match args.first().map(String::as_str) {
        Some("sum") => std::process::exit(sum(num(1) as u16, num(2) as usize, num(3) as usize)),
        Some("bounce") => std::process::exit(bounce(num(1) as u16, num(2))),
        Some("faults") => std::process::exit(faults(num(1) as u16, num(2) as usize)),
        Some("pingpong") => std::process::exit(pingpong(num(1) as u16, num(2))),
        Some("exit") => {
            // A worker moves, then ends the whole process with a code.
            let (kernel, code) = (num(1) as u16, num(2) as i32);
            std::thread::spawn(move || {
                if let Err(e) = mknode::thread::migrate(kernel) {
                    println!("FAIL {e}");
                    std::process::exit(1);
                }
                std::process::exit(code)
            });
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        Some("refused") => std::process::exit(refused(num(1) as u16)),
        Some("nowhere") => {
            // A move to a kernel that is not there fails, and leaves the
            // process as it was: a fork still works.
            let errno = match mknode::thread::migrate(num(1) as u16) {
                Ok(()) => 0,
                Err(e) => e.errno(),
            };
            // SAFETY: a fork whose child exits at once.
            let fork = unsafe {
                let r = libc::syscall(libc::SYS_fork);
                if r == 0 {
                    libc::_exit(0);
                }
                errno_of(r)
            };
            println!("nowhere errno={errno} fork={fork}");
            std::process::exit(0)
        }
        Some("mutex") => std::process::exit(mutex(num(1) as u16, num(2) as usize, num(3), num(4))),
        _ => {}
    }
    let stop_file = args.first().cloned().unwrap_or_else(|| {
        eprintln!("usage: mkthreads STOPFILE | sum KERNEL N MB | bounce KERNEL ROUNDS");
        std::process::exit(2)
    });
    let shared: &'static Shared = Box::leak(Box::new(Shared {
        count: AtomicU64::new(0),
        worker_pid: AtomicI64::new(0),
        worker_tid: AtomicI64::new(0),
        stop: AtomicBool::new(false),
    }));
    let worker = std::thread::spawn(move || {
        shared
            .worker_tid
            .store(sys(libc::SYS_gettid), Ordering::SeqCst);
        while !shared.stop.load(Ordering::Acquire) {
            shared.count.fetch_add(1, Ordering::AcqRel);
            shared
                .worker_pid
                .store(sys(libc::SYS_getpid), Ordering::Release);
            for _ in 0..2000 {
                std::hint::spin_loop();
            }
        }
    });
    while shared.worker_tid.load(Ordering::SeqCst) == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let out = std::io::stdout();
    let pid = sys(libc::SYS_getpid);
    let _ = writeln!(
        out.lock(),
        "worker_tid={}",
        shared.worker_tid.load(Ordering::SeqCst)
    );
    while !std::path::Path::new(&stop_file).exists() {
        std::thread::sleep(Duration::from_millis(50));
        let _ = writeln!(
            out.lock(),
            "seen count={} worker_pid={} pid={pid}",
            shared.count.load(Ordering::Acquire),
            shared.worker_pid.load(Ordering::Acquire),
        );
    }
    shared.stop.store(true, Ordering::Release);
    if worker.join().is_err() {
        let _ = writeln!(out.lock(), "FAIL the worker panicked");
        std::process::exit(1);
    }
    let _ = writeln!(
        out.lock(),
        "joined count={}",
        shared.count.load(Ordering::Acquire)
    );
}

fn sum(kernel: u16, n: usize, mb: usize) -> i32 {
    let len = (mb << 20) / 8;
    let a: &'static [u64] = Vec::leak(
        (0..len as u64)
            .map(|i| i * 2_654_435_761 % 1_000_003)
            .collect(),
    );
    let expected: u64 = a.iter().sum();
    let home = match mknode::thread::kernel_id() {
        Ok(k) => k,
        Err(e) => {
            println!("FAIL kernel_id: {e}");
            return 1;
        }
    };
    let per = len / n;
    let t0 = std::time::Instant::now();
    let workers: Vec<_> = (0..n)
        .map(|i| {
            let slice = &a[i * per..if i == n - 1 { len } else { (i + 1) * per }];
            std::thread::spawn(move || -> Result<(u64, u16), String> {
                if i % 2 == 1 && kernel != home {
                    mknode::thread::migrate(kernel).map_err(|e| e.to_string())?;
                }
                let s = slice.iter().sum();
                let on = mknode::thread::kernel_id().map_err(|e| e.to_string())?;
                Ok((s, on))
            })
        })
        .collect();
    let (mut total, mut moved) = (0u64, 0);
    for w in workers {
        match joined(w) {
            Ok((s, on)) => {
                total += s;
                moved += usize::from(on == kernel);
            }
            Err(e) => {
                println!("FAIL a worker: {e}");
                return 1;
            }
        }
    }
    println!(
        "total={total} expected={expected} moved={moved} home={home} ms={:.1}",
        t0.elapsed().as_secs_f64() * 1e3
    );
    i32::from(total != expected)
}

type Legs = std::sync::Mutex<Vec<(Duration, Duration)>>;

fn legs_of(l: &Legs) -> Vec<(Duration, Duration)> {
    l.lock().map(|v| v.clone()).unwrap_or_default()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn bounce(kernel: u16, rounds: u64) -> i32 {
    let done: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
    // Allocated before the worker first moves: one memory.
    let legs_cell: &'static Legs = Box::leak(Box::new(std::sync::Mutex::new(Vec::with_capacity(
        rounds as usize,
    ))));
    let w = std::thread::spawn(move || -> Result<(i64, i64), String> {
        let mut legs = Vec::with_capacity(rounds as usize);
        let home = mknode::thread::kernel_id().map_err(|e| e.to_string())?;
        let (mut here, mut there) = (0, 0);
        for r in 0..rounds {
            let t0 = std::time::Instant::now();
            mknode::thread::migrate(kernel).map_err(|e| format!("round {r} out: {e}"))?;
            let out = t0.elapsed();
            let k = mknode::thread::kernel_id().map_err(|e| e.to_string())?;
            if k != kernel {
                return Err(format!("round {r}: on {k}, not {kernel}"));
            }
            there = sys(libc::SYS_getpid);
            mknode::thread::migrate(home).map_err(|e| format!("round {r} back: {e}"))?;
            let k = mknode::thread::kernel_id().map_err(|e| e.to_string())?;
            if k != home {
                return Err(format!("round {r}: on {k}, not home {home}"));
            }
            here = sys(libc::SYS_getpid);
            legs.push((out, t0.elapsed() - out));
            done.fetch_add(1, Ordering::SeqCst);
        }
        if let Ok(mut l) = legs_cell.lock() {
            *l = legs;
        }
        Ok((here, there))
    });
    match joined(w) {
        Ok((here, there)) => {
            let mut outs: Vec<f64> = legs_of(legs_cell)
                .iter()
                .map(|l| l.0.as_secs_f64() * 1e6)
                .collect();
            let mut backs: Vec<f64> = legs_of(legs_cell)
                .iter()
                .map(|l| l.1.as_secs_f64() * 1e6)
                .collect();
            println!(
                "rounds={} pids={here},{there} out_us={:.0} back_us={:.0}",
                done.load(Ordering::SeqCst),
                median(&mut outs),
                median(&mut backs)
            );
            i32::from(done.load(Ordering::SeqCst) != rounds)
        }
        Err(e) => {
            println!("FAIL {e}");
            1
        }
    }
}

fn faults(kernel: u16, pages: usize) -> i32 {
    const PAGE: usize = 4096;
    let mem: &'static [AtomicU64] =
        Vec::leak((0..pages * PAGE / 8).map(|_| AtomicU64::new(0)).collect());
    let flag: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
    let home = mknode::thread::kernel_id().unwrap_or(0);
    let w = std::thread::spawn(move || -> Result<f64, String> {
        if kernel != home {
            mknode::thread::migrate(kernel).map_err(|e| e.to_string())?;
        }
        flag.store(1, Ordering::SeqCst);
        while flag.load(Ordering::SeqCst) != 2 {
            std::hint::spin_loop();
        }
        let t0 = std::time::Instant::now();
        let mut sum = 0;
        for p in 0..pages {
            sum += mem[p * PAGE / 8].load(Ordering::Acquire);
        }
        let us = t0.elapsed().as_secs_f64() * 1e6 / pages as f64;
        if sum != (1..=pages as u64).sum::<u64>() {
            return Err(format!("read {sum}, wrong"));
        }
        Ok(us)
    });
    while flag.load(Ordering::SeqCst) != 1 {
        std::thread::sleep(Duration::from_millis(1));
    }
    for p in 0..pages {
        mem[p * PAGE / 8].store(p as u64 + 1, Ordering::Release);
    }
    flag.store(2, Ordering::SeqCst);
    match joined(w) {
        Ok(us) => {
            println!("faults={pages} us_per_page={us:.3}");
            0
        }
        Err(e) => {
            println!("FAIL {e}");
            1
        }
    }
}

fn mutex(kernel: u16, threads: usize, k: u64, rounds: u64) -> i32 {
    let counter: &'static std::sync::Mutex<u64> = Box::leak(Box::new(std::sync::Mutex::new(0)));
    let home = match mknode::thread::kernel_id() {
        Ok(h) => h,
        Err(e) => {
            println!("FAIL kernel_id: {e}");
            return 1;
        }
    };
    let workers: Vec<_> = (0..threads)
        .map(|i| {
            std::thread::spawn(move || -> Result<(), String> {
                let mut away = false;
                if i % 2 == 1 {
                    mknode::thread::migrate(kernel).map_err(|e| e.to_string())?;
                    away = true;
                }
                for r in 0..rounds {
                    for _ in 0..k {
                        *counter.lock().map_err(|_| "poisoned")? += 1;
                    }
                    let to = if away { home } else { kernel };
                    mknode::thread::migrate(to).map_err(|e| format!("round {r}: {e}"))?;
                    away = !away;
                }
                if away {
                    mknode::thread::migrate(home).map_err(|e| e.to_string())?;
                }
                Ok(())
            })
        })
        .collect();
    for w in workers {
        match joined(w) {
            Ok(()) => {}
            Err(e) => {
                println!("FAIL a worker: {e}");
                return 1;
            }
        }
    }
    let c = *counter.lock().unwrap_or_else(|e| e.into_inner());
    let expected = threads as u64 * k * rounds;
    println!("count={c} expected={expected}");
    i32::from(c != expected)
}

fn pingpong(kernel: u16, turns: u64) -> i32 {
    let pair: &'static (std::sync::Mutex<u64>, std::sync::Condvar) = Box::leak(Box::new((
        std::sync::Mutex::new(0),
        std::sync::Condvar::new(),
    )));
    let home = mknode::thread::kernel_id().unwrap_or(0);
    let take_turns = move |me: u64| -> Result<(), String> {
        let (m, cv) = pair;
        loop {
            let mut t = m.lock().map_err(|_| "poisoned")?;
            while *t < turns && *t % 2 != me {
                t = cv.wait(t).map_err(|_| "poisoned")?;
            }
            if *t >= turns {
                return Ok(());
            }
            *t += 1;
            cv.notify_all();
        }
    };
    let w = std::thread::spawn(move || -> Result<(), String> {
        if kernel != home {
            mknode::thread::migrate(kernel).map_err(|e| e.to_string())?;
        }
        take_turns(1)
    });
    // Begin once the worker is away (its first wait is on the other side).
    std::thread::sleep(Duration::from_millis(300));
    let t0 = std::time::Instant::now();
    let mine = take_turns(0);
    let us = t0.elapsed().as_secs_f64() * 1e6 / turns as f64;
    match (mine, joined(w)) {
        (Ok(()), Ok(())) => {
            let t = *pair.0.lock().unwrap_or_else(|e| e.into_inner());
            println!("turns={t} us_per_turn={us:.1}");
            i32::from(t != turns)
        }
        (Err(e), _) | (_, Err(e)) => {
            println!("FAIL {e}");
            1
        }
    }
}

/// What `call` returned: 0, or the errno it failed with.
fn errno_of(r: i64) -> i64 {
    if r < 0 {
        i64::from(std::io::Error::last_os_error().raw_os_error().unwrap_or(-1))
    } else {
        0
    }
}

/// The errno of each call a moved thread cannot make coherently, tried on
/// memory and descriptors that survive it whether it is refused or not.
/// Allocates nothing: it may run where the heap cannot grow.
fn tries(page: *mut libc::c_void) -> [(&'static str, i64); 10] {
    // SAFETY: raw calls on our own page (`page`, 2 pages mapped read-write
    // by the caller, of which this unmaps/changes only the second) and on
    // this process; a child that fork/clone made exits at once without
    // touching anything.
    unsafe {
        let second = page.cast::<u8>().add(4096).cast::<libc::c_void>();
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        let m = libc::mmap(std::ptr::null_mut(), 4096, rw, anon, -1, 0);
        let mmap = if m == libc::MAP_FAILED {
            errno_of(-1)
        } else {
            libc::munmap(m, 4096);
            0
        };
        let mprotect = errno_of(libc::mprotect(second, 4096, libc::PROT_READ).into());
        libc::mprotect(second, 4096, rw);
        let munmap = errno_of(libc::munmap(second, 4096).into());
        let brk = errno_of(libc::syscall(libc::SYS_brk, 0));
        let fork = libc::syscall(libc::SYS_fork);
        if fork == 0 {
            libc::_exit(0);
        }
        let fork = errno_of(fork);
        let clone = libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0);
        if clone == 0 {
            libc::_exit(0);
        }
        let clone = errno_of(clone);
        let me = libc::syscall(libc::SYS_gettid);
        let tgkill = errno_of(libc::syscall(
            libc::SYS_tgkill,
            libc::syscall(libc::SYS_getpid),
            me,
            0,
        ));
        let fd = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        let open = errno_of(fd.into());
        if fd >= 0 {
            libc::close(fd);
        }
        let mut old: libc::sigaction = std::mem::zeroed();
        let get = errno_of(libc::sigaction(libc::SIGUSR2, std::ptr::null(), &mut old).into());
        let set = errno_of(libc::sigaction(libc::SIGUSR2, &old, std::ptr::null_mut()).into());
        [
            ("mmap", mmap),
            ("mprotect", mprotect),
            ("munmap", munmap),
            ("brk", brk),
            ("fork", fork),
            ("clone", clone),
            ("tgkill", tgkill),
            ("open", open),
            ("sigaction_get", get),
            ("sigaction_set", set),
        ]
    }
}

fn refused(kernel: u16) -> i32 {
    static AWAY: AtomicBool = AtomicBool::new(false);
    static DONE: AtomicBool = AtomicBool::new(false);
    let w = std::thread::spawn(move || -> Result<_, String> {
        let home = mknode::thread::kernel_id().map_err(|e| e.to_string())?;
        // SAFETY: two fresh private pages, ours alone (mapped before the
        // move: a moved thread cannot map any).
        let pages = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                2 * 4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if pages == libc::MAP_FAILED {
            return Err("mmap before the move".into());
        }
        mknode::thread::migrate(kernel).map_err(|e| e.to_string())?;
        AWAY.store(true, Ordering::SeqCst);
        let away = tries(pages);
        while !DONE.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        mknode::thread::migrate(home).map_err(|e| format!("back home: {e}"))?;
        Ok((away, tries(pages)))
    });
    while !AWAY.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: a fork whose child exits at once.
    let fork = unsafe {
        let r = libc::syscall(libc::SYS_fork);
        if r == 0 {
            libc::_exit(0);
        }
        errno_of(r)
    };
    DONE.store(true, Ordering::SeqCst);
    let line = |side: &str, r: &[(&str, i64)]| {
        let v: Vec<String> = r.iter().map(|(n, e)| format!("{n}={e}")).collect();
        println!("{side} {}", v.join(" "));
    };
    match joined(w) {
        Ok((away, home)) => {
            line("away", &away);
            line("home", &home);
            println!("origin fork={fork}");
            0
        }
        Err(e) => {
            println!("FAIL {e}");
            1
        }
    }
}

/// A worker's result, its panic as an error too.
fn joined<T>(w: std::thread::JoinHandle<Result<T, String>>) -> Result<T, String> {
    w.join()
        .unwrap_or_else(|_| Err("the worker panicked".into()))
}
