//! mkcounter: the process the migration tests move.
//!
//! `mkcounter [--mem SIZE] [--threads N] [--interval-ms MS] [--scan]`
//!
//! * N worker threads (default 3) each increment their own counter in a
//!   shared array as fast as they can (with a short sleep every 4096 steps so
//!   they also sit in `nanosleep` when frozen);
//! * a heap buffer of SIZE bytes (default 16M) is filled with
//!   `testprogs::pattern_byte` once at start;
//! * the main thread prints `seq=<n> t0=<c0> t1=<c1> ... mono_ms=<m>` every MS
//!   milliseconds (default 10) with a strictly increasing `n`, and on SIGUSR1
//!   prints `checksum=<hex> bytes=<len>` of the buffer (the handler only sets a
//!   flag; the main thread does the work).
//!
//! With `--scan`, one more thread reads the whole buffer over and over (a
//! checksum it throws away): a lazily migrated copy then faults on pages
//! all the time while the rest are pushed.
//!
//! With `--eventfd N`, an eventfd (non-blocking, semaphore mode) with the
//! counter N stays open, for a move to carry.
//!
//! With `--alarm-ms MS`, an interval timer (`setitimer(ITIMER_REAL)`)
//! fires every MS and the lines end with `alarms=<count>`.
//!
//! With `--join-after-ms MS`, one more thread sleeps MS and exits, and
//! another `join`s it (glibc's `pthread_join`, which waits for the kernel to
//! clear the thread's tid word); the main thread then prints `joined`.
//!
//! Each line is one `write` so a line is either wholly in the old stdout or
//! wholly in the new one after a migration.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn usage() -> ! {
    eprintln!(
        "usage: mkcounter [--mem SIZE] [--threads N] [--interval-ms MS] [--join-after-ms MS] [--alarm-ms MS] [--eventfd N] [--scan]"
    );
    std::process::exit(2)
}

fn main() {
    let mut mem = 16usize << 20;
    let mut threads = 3usize;
    let mut interval = 10u64;
    let mut join_after: Option<u64> = None;
    let mut alarm_ms: Option<u64> = None;
    let mut scan = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--scan" {
            scan = true;
            continue;
        }
        let v = args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--mem" => mem = testprogs::parse_size(&v).unwrap_or_else(|| usage()),
            "--threads" => threads = v.parse().unwrap_or_else(|_| usage()),
            "--interval-ms" => interval = v.parse().unwrap_or_else(|_| usage()),
            "--join-after-ms" => join_after = Some(v.parse().unwrap_or_else(|_| usage())),
            "--alarm-ms" => alarm_ms = Some(v.parse().unwrap_or_else(|_| usage())),
            "--eventfd" => {
                let n: u32 = v.parse().unwrap_or_else(|_| usage());
                // SAFETY: eventfd returns a new descriptor, kept open for
                // the life of the process (a move must carry it).
                let fd = unsafe { libc::eventfd(n, libc::EFD_NONBLOCK | libc::EFD_SEMAPHORE) };
                if fd < 0 {
                    eprintln!("mkcounter: eventfd: {}", std::io::Error::last_os_error());
                    std::process::exit(1);
                }
            }
            _ => usage(),
        }
    }

    let flag = Arc::new(AtomicBool::new(false));
    if let Err(e) = signal_hook::flag::register(signal_hook::consts::SIGUSR1, Arc::clone(&flag)) {
        eprintln!("mkcounter: SIGUSR1 handler: {e}");
        std::process::exit(1);
    }

    if let Some(ms) = alarm_ms {
        // SAFETY: the handler only increments an atomic (async-signal-safe).
        let r = unsafe {
            signal_hook::low_level::register(signal_hook::consts::SIGALRM, || {
                ALARMS.fetch_add(1, Ordering::Relaxed);
            })
        };
        if let Err(e) = r {
            eprintln!("mkcounter: SIGALRM handler: {e}");
            std::process::exit(1);
        }
        let every = libc::timeval {
            tv_sec: (ms / 1000) as libc::time_t,
            tv_usec: ((ms % 1000) * 1000) as libc::suseconds_t,
        };
        let t = libc::itimerval {
            it_interval: every,
            it_value: every,
        };
        // SAFETY: setitimer reads `t`, a live local; no old value asked.
        if unsafe { libc::setitimer(libc::ITIMER_REAL, &t, std::ptr::null_mut()) } != 0 {
            eprintln!("mkcounter: setitimer: {}", std::io::Error::last_os_error());
            std::process::exit(1);
        }
    }

    let mut buf = vec![0u8; mem];
    testprogs::fill_pattern(&mut buf);
    let buf = Arc::new(buf);
    if scan {
        let b = Arc::clone(&buf);
        std::thread::spawn(move || loop {
            std::hint::black_box(testprogs::checksum(&b));
        });
    }

    let counters: Arc<Vec<AtomicU64>> = Arc::new((0..threads).map(|_| AtomicU64::new(0)).collect());
    for i in 0..threads {
        let c = Arc::clone(&counters);
        std::thread::spawn(move || loop {
            let n = c[i].fetch_add(1, Ordering::Relaxed);
            if n.is_multiple_of(4096) {
                std::thread::sleep(Duration::from_micros(200));
            }
        });
    }

    let joined = Arc::new(AtomicBool::new(false));
    if let Some(ms) = join_after {
        let sleeper = std::thread::spawn(move || std::thread::sleep(Duration::from_millis(ms)));
        let j = Arc::clone(&joined);
        std::thread::spawn(move || {
            if sleeper.join().is_ok() {
                j.store(true, Ordering::Release);
            }
        });
    }

    let out = std::io::stdout();
    let mut line = String::with_capacity(256);
    let mut seq: u64 = 0;
    loop {
        line.clear();
        if flag.swap(false, Ordering::Relaxed) {
            let sum = testprogs::checksum(&buf);
            line.push_str(&format!("checksum={sum:016x} bytes={}\n", buf.len()));
        }
        if joined.swap(false, Ordering::Acquire) {
            line.push_str("joined\n");
        }
        seq += 1;
        line.push_str(&format!("seq={seq}"));
        for (i, c) in counters.iter().enumerate() {
            line.push_str(&format!(" t{i}={}", c.load(Ordering::Relaxed)));
        }
        line.push_str(&format!(" mono_ms={}", mono_ms()));
        if alarm_ms.is_some() {
            line.push_str(&format!(" alarms={}", ALARMS.load(Ordering::Relaxed)));
        }
        line.push('\n');
        let mut lock = out.lock();
        if lock
            .write_all(line.as_bytes())
            .and_then(|()| lock.flush())
            .is_err()
        {
            // The reader went away: nothing left to report to.
            std::process::exit(0);
        }
        drop(lock);
        std::thread::sleep(Duration::from_millis(interval));
    }
}

/// SIGALRMs received (`--alarm-ms`).
static ALARMS: AtomicU64 = AtomicU64::new(0);

/// `CLOCK_MONOTONIC` in ms: a move must not make it jump.
fn mono_ms() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `t`, a live local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1000 + t.tv_nsec as u64 / 1_000_000
}
