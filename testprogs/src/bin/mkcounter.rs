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
//! With `--timerfd-ms MS`, a periodic `CLOCK_MONOTONIC` timerfd (armed at
//! an absolute time) fires every MS and is read once per line: the lines end with
//! `timerfd_fires=<expirations read> timerfd_due=<whole periods since it was
//! armed, by CLOCK_MONOTONIC>` (equal, or due one more, when the timer and
//! the clock both go on as they were). A one-shot `CLOCK_BOOTTIME` timerfd
//! of 1 ms expires at start and is not read until the process finds itself
//! moved (its pid changed): that line then says `timerfd_oneshot=<its
//! expirations>` (1 if the unread expiration was carried).
//!
//! With `--clock-spin`, one more thread calls `clock_gettime` (the vDSO)
//! in a loop and nothing else, so that a freeze mostly finds it inside the
//! vDSO: lines end with `clock_spins=<calls> clock_back=<times the clock
//! went back>`.
//!
//! With `--signalfd`, SIGUSR2 is blocked in every thread and read from a
//! signalfd (non-blocking) once per line: `sigusr2=<count>`.
//!
//! With `--pipe-inflight N`, a pipe made by the process holds N bytes of a
//! pattern that it does not read (in flight when it is moved); its read end
//! is also `dup`ed. Lines end with `pipe_bytes=<FIONREAD>`. When the
//! process finds itself moved (another pid or another kernel's boot id),
//! and on SIGUSR1, it checks the pipe: reads
//! it through the dup (the pattern, byte for byte, then nothing), writes
//! the pattern and reads it back through the read end (the ends are
//! connected), writes it once more (in flight again), and asks `kcmp`
//! whether the dup still shares the read end's open file: it prints
//! `pipe_check=ok shared=<0|1>` or `pipe_check=bad <why>`.
//!
//! With `--socketpairs N`, two AF_UNIX socket pairs the process made hold
//! what it did not read: N pattern bytes queued at one end of a stream
//! pair, and three datagrams (1, 0 and 1000 bytes) at one end of a
//! datagram pair. When the process finds itself moved, and on SIGUSR1, it
//! reads them (byte for byte, datagram by datagram, then nothing), sends
//! them again through the other ends and reads them back (the ends are
//! connected), and sends them once more (queued again): it prints
//! `socket_check=ok` or `socket_check=bad <why>`.
//!
//! With `--epoll`, an epoll instance (also `dup`ed) watches the read end
//! of a pipe holding a byte (level-triggered, data 0x1111) and the read
//! end of an empty pipe (edge-triggered, data 0x2222). When the process
//! finds itself moved, and on SIGUSR1, it checks it: a wait returns the
//! first pipe alone; a byte written into the second makes a wait return both,
//! the byte is read back; the pipe's watch is changed and deleted and
//! added again by its number (`EPOLL_CTL_MOD`/`DEL`/`ADD`): it prints
//! `epoll_check=ok` or `epoll_check=bad <why>`. `--epoll-stale` also
//! watches an eventfd and then closes that descriptor while a dup keeps
//! the file open: epoll keeps the watch, which no move can set again.
//!
//! With `--shared-mem SIZE`, SIZE bytes of anonymous shared memory
//! (`MAP_SHARED | MAP_ANONYMOUS`) hold a pattern but for the last page,
//! never touched (zero); the page table entries of
//! its second page are dropped (`MADV_DONTNEED`: the page stays in the
//! memory, out of the process's page tables). When the process finds
//! itself moved, and on SIGUSR1, it checks it: the pattern is all there,
//! `/proc/self/maps` shows the range shared, and a child it forks writes a
//! byte there that the parent then reads: `shm_check=ok` or
//! `shm_check=bad <why>`.
//!
//! With `--memfd SIZE`, a memfd (`mkcounter-memfd`, sealable) of SIZE
//! bytes plus two pages: the SIZE bytes mapped shared and holding a
//! pattern, a marker written by `pwrite` in the first page past the
//! mapping (so not mapped: carried as the memfd's own content), the last
//! page a hole; sealed against shrinking and growing; its descriptor at
//! offset 123. When the process finds itself moved, and on SIGUSR1, it
//! checks it: pattern, marker, size, seals and offset as they were, the
//! range shown shared from the memfd, and a byte written through the
//! mapping read back through the descriptor (one memfd):
//! `memfd_check=ok` or `memfd_check=bad <why>`.
//!
//! With `--memfd-unmapped SIZE`, a memfd (`mkcounter-data`) holding SIZE
//! bytes written with `write`, never mapped (a move carries at most 256 KiB
//! of such content).
//!
//! With `--posix-timer-ms MS`, POSIX timers (`timer_create`, raw ids):
//! id 0 made and deleted, then id 1 signalling the process (SIGRTMIN+2,
//! value 0x77) every MS, and id 2 signalling the main thread alone
//! (`SIGEV_THREAD_ID`, SIGRTMIN+3, value 0x88) every 2 MS, and id 3 on
//! the process's CPU clock (SIGRTMIN+4, value 0x99) every 8 MS of CPU time
//! (it fires only while a thread computes: `--threads`). The lines end
//! with `ptimer_fires=<id 1's> ptimer_tid_fires=<id 2's>
//! ptimer_cpu_fires=<id 3's> ptimer_bad=<a signal with a wrong value, or
//! id 2's on another thread> ptimer_ids=<ok: 1, 2 and 3 exist, 0 does not>`.
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
        "usage: mkcounter [--mem SIZE] [--threads N] [--interval-ms MS] [--join-after-ms MS] [--alarm-ms MS] [--eventfd N] [--timerfd-ms MS] [--signalfd] [--pipe-inflight N] [--socketpairs N] [--epoll] [--epoll-stale] [--shared-mem SIZE] [--memfd SIZE] [--memfd-unmapped SIZE] [--posix-timer-ms MS] [--clock-spin] [--scan]"
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
    let mut timer: Option<Timer> = None;
    let mut sigfd: Option<i32> = None;
    let mut pipe: Option<InFlight> = None;
    let mut socks: Option<Queued> = None;
    let mut epoll: Option<Epoll> = None;
    let mut shm: Option<SharedMem> = None;
    let mut memfd: Option<Memfd> = None;
    let mut ptimer: Option<()> = None;
    let mut clock_spin = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--scan" {
            scan = true;
            continue;
        }
        if a == "--epoll" || a == "--epoll-stale" {
            epoll = Some(Epoll::new(a == "--epoll-stale"));
            continue;
        }
        if a == "--clock-spin" {
            clock_spin = true;
            continue;
        }
        if a == "--signalfd" {
            sigfd = Some(signalfd_usr2());
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
            "--posix-timer-ms" => {
                posix_timers(v.parse().unwrap_or_else(|_| usage()));
                ptimer = Some(());
            }
            "--shared-mem" => {
                shm = Some(SharedMem::new(
                    testprogs::parse_size(&v).unwrap_or_else(|| usage()),
                ))
            }
            "--memfd" => {
                memfd = Some(Memfd::new(
                    testprogs::parse_size(&v).unwrap_or_else(|| usage()),
                ))
            }
            "--memfd-unmapped" => {
                let n = testprogs::parse_size(&v).unwrap_or_else(|| usage());
                // SAFETY: a NUL-terminated name; the descriptor is kept
                // open for the life of the process (a move must carry it).
                let fd = unsafe { libc::memfd_create(c"mkcounter-data".as_ptr(), 0) };
                if fd < 0 {
                    die("memfd_create");
                }
                let data = vec![0x5au8; n];
                // SAFETY: a write of our buffer to our descriptor.
                if unsafe { libc::write(fd, data.as_ptr().cast(), n) } != n as isize {
                    die("write to the memfd");
                }
            }
            "--timerfd-ms" => timer = Some(Timer::new(v.parse().unwrap_or_else(|_| usage()))),
            "--socketpairs" => socks = Some(Queued::new(v.parse().unwrap_or_else(|_| usage()))),
            "--pipe-inflight" => {
                pipe = Some(InFlight::new(v.parse().unwrap_or_else(|_| usage())));
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

    if clock_spin {
        std::thread::spawn(|| {
            let mut last = 0;
            loop {
                let now = mono_ns();
                if now < last {
                    CLOCK_BACK.fetch_add(1, Ordering::Relaxed);
                }
                last = now;
                CLOCK_SPINS.fetch_add(1, Ordering::Relaxed);
            }
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
    let mut sigusr2 = 0u64;
    // Where it runs: a move changes the pid or the kernel (two guests'
    // pids may well coincide).
    let here = || {
        // SAFETY: getpid takes nothing.
        let pid = unsafe { libc::getpid() };
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        (pid, boot)
    };
    let watch_moves = timer.is_some()
        || pipe.is_some()
        || socks.is_some()
        || epoll.is_some()
        || shm.is_some()
        || memfd.is_some();
    let mut at = if watch_moves {
        here()
    } else {
        (0, String::new())
    };
    loop {
        line.clear();
        let moved = watch_moves && {
            let now = here();
            let moved = now != at;
            at = now;
            moved
        };
        let usr1 = flag.swap(false, Ordering::Relaxed);
        if usr1 {
            let sum = testprogs::checksum(&buf);
            line.push_str(&format!("checksum={sum:016x} bytes={}\n", buf.len()));
        }
        if let Some(p) = &pipe {
            if usr1 || moved {
                line.push_str(&p.check());
                line.push('\n');
            }
        }
        if let Some(q) = &socks {
            if usr1 || moved {
                line.push_str(&q.check());
                line.push('\n');
            }
        }
        if let Some(m) = &shm {
            if usr1 || moved {
                line.push_str(&m.check());
                line.push('\n');
            }
        }
        if let Some(m) = &memfd {
            if usr1 || moved {
                line.push_str(&m.check());
                line.push('\n');
            }
        }
        if let Some(e) = &epoll {
            if usr1 || moved {
                line.push_str(&e.check());
                line.push('\n');
            }
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
        if clock_spin {
            line.push_str(&format!(
                " clock_spins={} clock_back={}",
                CLOCK_SPINS.load(Ordering::Relaxed),
                CLOCK_BACK.load(Ordering::Relaxed)
            ));
        }
        if alarm_ms.is_some() {
            line.push_str(&format!(" alarms={}", ALARMS.load(Ordering::Relaxed)));
        }
        if ptimer.is_some() {
            line.push_str(&ptimer_line());
        }
        if let Some(t) = &mut timer {
            line.push_str(&t.line(moved));
        }
        if let Some(fd) = sigfd {
            sigusr2 += read_usr2(fd);
            line.push_str(&format!(" sigusr2={sigusr2}"));
        }
        if let Some(p) = &pipe {
            line.push_str(&format!(" pipe_bytes={}", p.queued()));
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

/// `--clock-spin`: calls to `clock_gettime` (through the vDSO) by a thread
/// that does nothing else, and how often its clock went back.
static CLOCK_SPINS: AtomicU64 = AtomicU64::new(0);
static CLOCK_BACK: AtomicU64 = AtomicU64::new(0);

/// `CLOCK_MONOTONIC` in ns.
fn mono_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `t`, a live local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// `CLOCK_MONOTONIC` in ms: a move must not make it jump.
fn mono_ms() -> u64 {
    mono_ns() / 1_000_000
}

fn die(what: &str) -> ! {
    eprintln!("mkcounter: {what}: {}", std::io::Error::last_os_error());
    std::process::exit(1)
}

/// `--timerfd-ms`: a periodic timerfd and a one-shot one.
struct Timer {
    fd: i32,
    oneshot: i32,
    period_ns: u64,
    armed_ns: u64,
    fires: u64,
}

impl Timer {
    fn new(ms: u64) -> Timer {
        let spec = |value_ns: u64, interval_ns: u64| libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: (interval_ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (interval_ns % 1_000_000_000) as libc::c_long,
            },
            it_value: libc::timespec {
                tv_sec: (value_ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (value_ns % 1_000_000_000) as libc::c_long,
            },
        };
        let period_ns = ms.max(1) * 1_000_000;
        // SAFETY: timerfd_create returns new descriptors, kept for the life
        // of the process; timerfd_settime reads a live local.
        unsafe {
            let fd = libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            );
            let oneshot = libc::timerfd_create(libc::CLOCK_BOOTTIME, libc::TFD_NONBLOCK);
            if fd < 0 || oneshot < 0 {
                die("timerfd_create");
            }
            // Absolute: its expiries are exactly `armed_ns` + k periods,
            // the moments `timerfd_due` counts, however late this call runs
            // after the clock was read (a TCG guest's vCPU can stall for
            // tens of ms: armed relative, the timer then ran that many
            // periods behind the count from the start, seen in a test).
            let armed_ns = mono_ns();
            if libc::timerfd_settime(
                fd,
                libc::TFD_TIMER_ABSTIME,
                &spec(armed_ns + period_ns, period_ns),
                std::ptr::null_mut(),
            ) != 0
                || libc::timerfd_settime(oneshot, 0, &spec(1_000_000, 0), std::ptr::null_mut()) != 0
            {
                die("timerfd_settime");
            }
            Timer {
                fd,
                oneshot,
                period_ns,
                armed_ns,
                fires: 0,
            }
        }
    }

    fn line(&mut self, moved: bool) -> String {
        self.fires += read_u64(self.fd);
        let due = (mono_ns() - self.armed_ns) / self.period_ns;
        let mut s = format!(" timerfd_fires={} timerfd_due={due}", self.fires);
        if moved {
            s.push_str(&format!(" timerfd_oneshot={}", read_u64(self.oneshot)));
        }
        s
    }
}

/// The u64 a read of a timerfd returns; 0 when it would block.
fn read_u64(fd: i32) -> u64 {
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into a live local.
    let n = unsafe { libc::read(fd, (&raw mut v).cast(), 8) };
    if n == 8 {
        v
    } else {
        0
    }
}

/// `--signalfd`: SIGUSR2 blocked (before any thread exists, so in all)
/// and a non-blocking signalfd for it.
fn signalfd_usr2() -> i32 {
    // SAFETY: sigset operations on a live local; pthread_sigmask and
    // signalfd read it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR2);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            die("pthread_sigmask");
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
        if fd < 0 {
            die("signalfd");
        }
        fd
    }
}

/// SIGUSR2s read from the signalfd now.
fn read_usr2(fd: i32) -> u64 {
    let mut n = 0;
    loop {
        // SAFETY: signalfd_siginfo is plain data; read fills at most its size.
        let mut si: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `size` bytes into the live local `si`.
        let r = unsafe { libc::read(fd, (&raw mut si).cast(), size) };
        if r != size as isize {
            return n;
        }
        if si.ssi_signo == libc::SIGUSR2 as u32 {
            n += 1;
        }
    }
}

/// `--pipe-inflight`: a pipe holding a pattern, its read end `dup`ed.
struct InFlight {
    r: i32,
    dup: i32,
    w: i32,
    pattern: Vec<u8>,
}

impl InFlight {
    fn new(n: usize) -> InFlight {
        let pattern: Vec<u8> = (0..n as u64)
            .map(|i| testprogs::pattern_byte(i + 77))
            .collect();
        let mut ends = [0; 2];
        // SAFETY: pipe2 writes two descriptors into `ends`; dup returns one.
        let (r, w, dup) = unsafe {
            if libc::pipe2(ends.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) != 0 {
                die("pipe2");
            }
            (ends[0], ends[1], libc::dup(ends[0]))
        };
        if dup < 0 {
            die("dup");
        }
        let p = InFlight { r, dup, w, pattern };
        if let Err(e) = p.put() {
            eprintln!("mkcounter: filling the pipe: {e}");
            std::process::exit(1);
        }
        p
    }

    fn put(&self) -> Result<(), String> {
        let mut at = 0;
        while at < self.pattern.len() {
            let rest = &self.pattern[at..];
            // SAFETY: writes from a live slice.
            let n = unsafe { libc::write(self.w, rest.as_ptr().cast(), rest.len()) };
            if n <= 0 {
                return Err(format!(
                    "write after {at} bytes: {}",
                    std::io::Error::last_os_error()
                ));
            }
            at += n as usize;
        }
        Ok(())
    }

    /// Everything readable from `fd` now.
    fn take(fd: i32) -> Vec<u8> {
        let mut out = Vec::new();
        let mut b = [0u8; 4096];
        loop {
            // SAFETY: reads into a live local buffer.
            let n = unsafe { libc::read(fd, b.as_mut_ptr().cast(), b.len()) };
            if n <= 0 {
                return out;
            }
            out.extend_from_slice(&b[..n as usize]);
        }
    }

    fn queued(&self) -> i32 {
        let mut n: libc::c_int = -1;
        // SAFETY: FIONREAD writes one int into a live local.
        unsafe { libc::ioctl(self.r, libc::FIONREAD, &mut n) };
        n
    }

    fn compare(&self, got: &[u8], what: &str) -> Result<(), String> {
        if got == self.pattern {
            return Ok(());
        }
        let first = got
            .iter()
            .zip(&self.pattern)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(self.pattern.len()));
        Err(format!(
            "{what}: {} bytes, {} expected, first difference at {first}",
            got.len(),
            self.pattern.len()
        ))
    }

    fn check(&self) -> String {
        let r = (|| {
            self.compare(&InFlight::take(self.dup), "in flight")?;
            self.put()?;
            self.compare(&InFlight::take(self.r), "written and read back")?;
            self.put()
        })();
        // SAFETY: kcmp takes integers only.
        let shared = unsafe {
            let me = libc::getpid();
            libc::syscall(libc::SYS_kcmp, me, me, 0, self.r, self.dup) == 0
        };
        match r {
            Ok(()) => format!("pipe_check=ok shared={}", u8::from(shared)),
            Err(e) => format!("pipe_check=bad {e}"),
        }
    }
}

/// `--socketpairs`: a stream pair and a datagram pair with messages queued.
struct Queued {
    /// Stream: `sa` reads what `sb` sent.
    sa: i32,
    sb: i32,
    /// Datagrams: `da` reads what `db` sent.
    da: i32,
    db: i32,
    pattern: Vec<u8>,
    dgrams: Vec<Vec<u8>>,
}

impl Queued {
    fn new(n: usize) -> Queued {
        let pair = |ty: i32| {
            let mut sv = [0; 2];
            // SAFETY: socketpair writes two descriptors into `sv`.
            if unsafe {
                libc::socketpair(
                    libc::AF_UNIX,
                    ty | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    0,
                    sv.as_mut_ptr(),
                )
            } != 0
            {
                die("socketpair");
            }
            sv
        };
        let [sa, sb] = pair(libc::SOCK_STREAM);
        let [da, db] = pair(libc::SOCK_DGRAM);
        let q = Queued {
            sa,
            sb,
            da,
            db,
            pattern: (0..n as u64)
                .map(|i| testprogs::pattern_byte(i + 991))
                .collect(),
            dgrams: vec![
                vec![7],
                vec![],
                (0..1000u64)
                    .map(|i| testprogs::pattern_byte(i + 5))
                    .collect(),
            ],
        };
        if let Err(e) = q.put() {
            eprintln!("mkcounter: filling the socket pairs: {e}");
            std::process::exit(1);
        }
        q
    }

    fn put(&self) -> Result<(), String> {
        let send = |fd: i32, b: &[u8]| -> Result<usize, String> {
            // SAFETY: sends from a live slice.
            let n = unsafe { libc::send(fd, b.as_ptr().cast(), b.len(), libc::MSG_NOSIGNAL) };
            if n < 0 {
                return Err(format!("send: {}", std::io::Error::last_os_error()));
            }
            Ok(n as usize)
        };
        let mut at = 0;
        while at < self.pattern.len() {
            at += send(self.sb, &self.pattern[at..])?;
        }
        for d in &self.dgrams {
            send(self.db, d)?;
        }
        Ok(())
    }

    /// The messages readable at `fd` now (a stream's in one piece).
    fn take(fd: i32, stream: bool) -> Vec<Vec<u8>> {
        let mut out: Vec<Vec<u8>> = Vec::new();
        let mut b = vec![0u8; 65536];
        loop {
            // SAFETY: receives into a live local buffer.
            let n = unsafe { libc::recv(fd, b.as_mut_ptr().cast(), b.len(), libc::MSG_DONTWAIT) };
            if n < 0 || (stream && n == 0) {
                return out;
            }
            match out.last_mut() {
                Some(last) if stream => last.extend_from_slice(&b[..n as usize]),
                _ => out.push(b[..n as usize].to_vec()),
            }
        }
    }

    fn compare(&self, what: &str) -> Result<(), String> {
        let s = Queued::take(self.sa, true);
        let want = if self.pattern.is_empty() {
            vec![]
        } else {
            vec![self.pattern.clone()]
        };
        if s != want {
            return Err(format!(
                "{what}: stream read {:?} bytes, {} expected",
                s.iter().map(Vec::len).collect::<Vec<_>>(),
                self.pattern.len()
            ));
        }
        let d = Queued::take(self.da, false);
        if d != self.dgrams {
            return Err(format!(
                "{what}: datagrams of {:?} bytes, {:?} expected",
                d.iter().map(Vec::len).collect::<Vec<_>>(),
                self.dgrams.iter().map(Vec::len).collect::<Vec<_>>()
            ));
        }
        Ok(())
    }

    fn check(&self) -> String {
        let r = (|| {
            self.compare("queued")?;
            self.put()?;
            self.compare("sent and read back")?;
            self.put()
        })();
        match r {
            Ok(()) => "socket_check=ok".into(),
            Err(e) => format!("socket_check=bad {e}"),
        }
    }
}

/// `--epoll`: an epoll, a dup of it, a pipe it sees readable (`full`: its
/// read end; the byte stays), an empty pipe.
struct Epoll {
    ep: i32,
    dup: i32,
    full: i32,
    /// The pipe's read end (watched) and write end.
    r: i32,
    w: i32,
}

const EPOLL_FULL: u64 = 0x1111;
const EPOLL_PIPE: u64 = 0x2222;

impl Epoll {
    fn new(stale: bool) -> Epoll {
        let (mut ends, mut full) = ([0; 2], [0; 2]);
        // SAFETY: plain calls making descriptors kept for the process's
        // life; `ends` and `full` receive two each; one byte from a live
        // local.
        let e = unsafe {
            let ep = libc::epoll_create1(libc::EPOLL_CLOEXEC);
            if ep < 0
                || libc::pipe2(ends.as_mut_ptr(), libc::O_NONBLOCK) != 0
                || libc::pipe2(full.as_mut_ptr(), libc::O_NONBLOCK) != 0
                || libc::write(full[1], b"f".as_ptr().cast(), 1) != 1
            {
                die("epoll_create1/pipe2");
            }
            Epoll {
                ep,
                dup: libc::dup(ep),
                full: full[0],
                r: ends[0],
                w: ends[1],
            }
        };
        let add = |fd: i32, events: u32, data: u64| {
            if e.ctl(libc::EPOLL_CTL_ADD, fd, events, data).is_err() {
                die("epoll_ctl");
            }
        };
        add(e.full, libc::EPOLLIN as u32, EPOLL_FULL);
        add(e.r, (libc::EPOLLIN | libc::EPOLLET) as u32, EPOLL_PIPE);
        if stale {
            // SAFETY: a new eventfd, dup'ed, watched, its first fd closed.
            let fd = unsafe { libc::eventfd(0, 0) };
            // SAFETY: as above.
            if fd < 0 || unsafe { libc::dup(fd) } < 0 {
                die("eventfd/dup");
            }
            add(fd, libc::EPOLLIN as u32, 0x3333);
            // SAFETY: our descriptor, not used again.
            unsafe { libc::close(fd) };
        }
        e
    }

    fn ctl(&self, op: i32, fd: i32, events: u32, data: u64) -> Result<(), String> {
        let mut ev = libc::epoll_event { events, u64: data };
        // SAFETY: epoll_ctl reads `ev`, a live local.
        if unsafe { libc::epoll_ctl(self.ep, op, fd, &mut ev) } != 0 {
            return Err(format!(
                "epoll_ctl({op}, fd {fd}): {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    /// The data of what a wait on `fd` (the epoll or its dup) returns now.
    fn ready(fd: i32) -> Vec<u64> {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 8];
        // SAFETY: epoll_wait writes at most 8 events into `evs`.
        let n = unsafe { libc::epoll_wait(fd, evs.as_mut_ptr(), 8, 0) };
        let mut v: Vec<u64> = evs[..n.max(0) as usize].iter().map(|e| e.u64).collect();
        v.sort_unstable();
        v
    }

    fn check(&self) -> String {
        let r = (|| -> Result<(), String> {
            let got = Epoll::ready(self.ep);
            if got != [EPOLL_FULL] {
                return Err(format!("waited {got:x?}, the full pipe alone expected"));
            }
            // SAFETY: one byte from/into live locals on our own pipe.
            if unsafe { libc::write(self.w, b"x".as_ptr().cast(), 1) } != 1 {
                return Err("write into the pipe".into());
            }
            let got = Epoll::ready(self.dup);
            if got != [EPOLL_FULL, EPOLL_PIPE] {
                return Err(format!("waited {got:x?} through the dup, both expected"));
            }
            let mut b = [0u8; 8];
            // SAFETY: as above.
            if unsafe { libc::read(self.r, b.as_mut_ptr().cast(), 8) } != 1 {
                return Err("read the byte back".into());
            }
            let et = (libc::EPOLLIN | libc::EPOLLET) as u32;
            self.ctl(libc::EPOLL_CTL_MOD, self.r, et, EPOLL_PIPE)?;
            self.ctl(libc::EPOLL_CTL_DEL, self.r, 0, 0)?;
            self.ctl(libc::EPOLL_CTL_ADD, self.r, et, EPOLL_PIPE)
        })();
        match r {
            Ok(()) => "epoll_check=ok".into(),
            Err(e) => format!("epoll_check=bad {e}"),
        }
    }
}

/// `--shared-mem`: anonymous shared memory holding a pattern.
struct SharedMem {
    at: *mut u8,
    len: usize,
}

impl SharedMem {
    fn new(len: usize) -> SharedMem {
        let len = len.max(2 * 4096).next_multiple_of(4096);
        // SAFETY: a new shared anonymous mapping, ours for the process's life.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if at == libc::MAP_FAILED {
            die("mmap(MAP_SHARED | MAP_ANONYMOUS)");
        }
        let m = SharedMem { at: at.cast(), len };
        testprogs::fill_pattern(&mut m.bytes()[..len - 4096]);
        // SAFETY: the second page of our mapping; shared memory keeps it.
        if unsafe { libc::madvise(at.cast::<u8>().add(4096).cast(), 4096, libc::MADV_DONTNEED) }
            != 0
        {
            die("madvise");
        }
        m
    }

    #[allow(clippy::mut_from_ref)]
    fn bytes(&self) -> &mut [u8] {
        // SAFETY: the mapping lives as long as the process; only the main
        // thread touches it (and a forked child, in its own copy of us).
        unsafe { std::slice::from_raw_parts_mut(self.at, self.len) }
    }

    fn check(&self) -> String {
        let r = (|| -> Result<(), String> {
            let b = self.bytes();
            let want = |i: usize| {
                if i < b.len() - 4096 {
                    testprogs::pattern_byte(i as u64)
                } else {
                    0
                }
            };
            if let Some(i) = (0..b.len()).find(|&i| b[i] != want(i)) {
                return Err(format!("byte {i} of {} differs", b.len()));
            }
            let start = format!("{:x}-", self.at as usize);
            let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| e.to_string())?;
            let line = maps
                .lines()
                .find(|l| l.starts_with(&start))
                .ok_or("the range is not in /proc/self/maps")?;
            if line
                .split_whitespace()
                .nth(1)
                .is_none_or(|p| !p.ends_with('s'))
            {
                return Err(format!("not shared: {line}"));
            }
            let old = b[0];
            // SAFETY: the child only writes one byte and exits at once.
            let child = unsafe { libc::fork() };
            if child == 0 {
                b[0] = old ^ 0xff;
                // SAFETY: leaves the child without running our destructors.
                unsafe { libc::_exit(0) };
            }
            if child < 0 {
                return Err("fork".into());
            }
            let mut status = 0;
            // SAFETY: waits for our own child.
            unsafe { libc::waitpid(child, &mut status, 0) };
            // SAFETY: a read of our own mapping (volatile: another process
            // wrote it).
            let seen = unsafe { std::ptr::read_volatile(self.at) } == old ^ 0xff;
            b[0] = old;
            if !seen {
                return Err("a child's write is not seen: the memory is not shared".into());
            }
            Ok(())
        })();
        match r {
            Ok(()) => "shm_check=ok".into(),
            Err(e) => format!("shm_check=bad {e}"),
        }
    }
}

/// `--memfd`: a memfd, mapped in part, with a marker past the mapping.
struct Memfd {
    fd: i32,
    at: *mut u8,
    len: usize,
}

/// Where `--memfd`'s marker is, past the mapping, and what it says.
const MEMFD_MARK_AT: usize = 100;
const MEMFD_MARK: &[u8] = b"memfd marker, not mapped";
const MEMFD_POS: i64 = 123;

impl Memfd {
    fn new(len: usize) -> Memfd {
        let len = len.max(4096).next_multiple_of(4096);
        // SAFETY: a NUL-terminated name and flags; returns a new descriptor
        // kept for the life of the process.
        let fd = unsafe {
            libc::memfd_create(
                c"mkcounter-memfd".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            die("memfd_create");
        }
        // SAFETY: calls on our own descriptor; the mapping is ours for the
        // process's life.
        unsafe {
            if libc::ftruncate(fd, (len + 2 * 4096) as i64) != 0 {
                die("ftruncate");
            }
            let at = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            if at == libc::MAP_FAILED {
                die("mmap of the memfd");
            }
            let mark_at = (len + MEMFD_MARK_AT) as i64;
            if libc::pwrite(fd, MEMFD_MARK.as_ptr().cast(), MEMFD_MARK.len(), mark_at)
                != MEMFD_MARK.len() as isize
            {
                die("pwrite");
            }
            if libc::fcntl(
                fd,
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
            ) != 0
            {
                die("F_ADD_SEALS");
            }
            if libc::lseek(fd, MEMFD_POS, libc::SEEK_SET) != MEMFD_POS {
                die("lseek");
            }
            let m = Memfd {
                fd,
                at: at.cast(),
                len,
            };
            testprogs::fill_pattern(m.bytes());
            m
        }
    }

    #[allow(clippy::mut_from_ref)]
    fn bytes(&self) -> &mut [u8] {
        // SAFETY: the mapping lives as long as the process; only the main
        // thread touches it.
        unsafe { std::slice::from_raw_parts_mut(self.at, self.len) }
    }

    fn check(&self) -> String {
        let r = (|| -> Result<(), String> {
            let b = self.bytes();
            if let Some(i) = (0..b.len()).find(|&i| b[i] != testprogs::pattern_byte(i as u64)) {
                return Err(format!("byte {i} of {} differs", b.len()));
            }
            let fd = self.fd;
            let mut mark = vec![0u8; MEMFD_MARK.len()];
            // SAFETY: calls on our own descriptor and buffers.
            let (got, pos, seals, size) = unsafe {
                let got = libc::pread(
                    fd,
                    mark.as_mut_ptr().cast(),
                    mark.len(),
                    (self.len + MEMFD_MARK_AT) as i64,
                );
                let pos = libc::lseek(fd, 0, libc::SEEK_CUR);
                let seals = libc::fcntl(fd, libc::F_GET_SEALS);
                let mut st: libc::stat = std::mem::zeroed();
                libc::fstat(fd, &mut st);
                (got, pos, seals, st.st_size)
            };
            if got != mark.len() as isize || mark != MEMFD_MARK {
                return Err(format!("the marker past the mapping reads {mark:?}"));
            }
            if pos != MEMFD_POS {
                return Err(format!("offset {pos}, not {MEMFD_POS}"));
            }
            if seals != libc::F_SEAL_SHRINK | libc::F_SEAL_GROW {
                return Err(format!("seals {seals:#x}"));
            }
            if size != (self.len + 2 * 4096) as i64 {
                return Err(format!("size {size}"));
            }
            let link =
                std::fs::read_link(format!("/proc/self/fd/{fd}")).map_err(|e| e.to_string())?;
            let want = "/memfd:mkcounter-memfd (deleted)";
            if link.to_string_lossy() != want {
                return Err(format!("fd {fd} is {link:?}"));
            }
            let start = format!("{:x}-", self.at as usize);
            let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| e.to_string())?;
            let line = maps
                .lines()
                .find(|l| l.starts_with(&start))
                .ok_or("the range is not in /proc/self/maps")?;
            if !line.ends_with(want)
                || line
                    .split_whitespace()
                    .nth(1)
                    .is_none_or(|p| !p.ends_with('s'))
            {
                return Err(format!("not the memfd mapped shared: {line}"));
            }
            // One memfd: a write through the mapping is read through the
            // descriptor.
            let old = b[5];
            b[5] = old ^ 0xff;
            let mut one = [0u8; 1];
            // SAFETY: a one-byte read into our buffer.
            let n = unsafe { libc::pread(fd, one.as_mut_ptr().cast(), 1, 5) };
            b[5] = old;
            if n != 1 || one[0] != old ^ 0xff {
                return Err(
                    "a write through the mapping is not read through the descriptor".into(),
                );
            }
            Ok(())
        })();
        match r {
            Ok(()) => "memfd_check=ok".into(),
            Err(e) => format!("memfd_check=bad {e}"),
        }
    }
}

/// `--posix-timer-ms`: what the timers' signals found.
static PTIMER_FIRES: AtomicU64 = AtomicU64::new(0);
static PTIMER_TID_FIRES: AtomicU64 = AtomicU64::new(0);
static PTIMER_CPU_FIRES: AtomicU64 = AtomicU64::new(0);
static PTIMER_BAD: AtomicU64 = AtomicU64::new(0);

/// `si_value` of a timer's siginfo (x86_64: the union at 16, the value
/// after `si_tid` and `si_overrun`).
///
/// # Safety
/// `info` points to the kernel's siginfo for this signal.
unsafe fn timer_value(info: *const libc::siginfo_t) -> u64 {
    // SAFETY: the caller's; a siginfo_t is 128 bytes.
    unsafe { std::ptr::read_unaligned(info.cast::<u8>().add(24).cast::<u64>()) }
}

extern "C" fn on_ptimer(_: i32, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel's siginfo for this SA_SIGINFO handler.
    let ok = unsafe { timer_value(info) } == 0x77;
    if ok {
        PTIMER_FIRES.fetch_add(1, Ordering::Relaxed);
    } else {
        PTIMER_BAD.fetch_add(1, Ordering::Relaxed);
    }
}

extern "C" fn on_ptimer_tid(_: i32, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: as above; gettid and getpid take nothing. The main thread's
    // tid is the pid (before a move and after it).
    let (v, main) = unsafe {
        (
            timer_value(info),
            libc::syscall(libc::SYS_gettid) == libc::syscall(libc::SYS_getpid),
        )
    };
    if v == 0x88 && main {
        PTIMER_TID_FIRES.fetch_add(1, Ordering::Relaxed);
    } else {
        PTIMER_BAD.fetch_add(1, Ordering::Relaxed);
    }
}

extern "C" fn on_ptimer_cpu(_: i32, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel's siginfo for this SA_SIGINFO handler.
    if unsafe { timer_value(info) } == 0x99 {
        PTIMER_CPU_FIRES.fetch_add(1, Ordering::Relaxed);
    } else {
        PTIMER_BAD.fetch_add(1, Ordering::Relaxed);
    }
}

/// A raw `timer_create` on `CLOCK_MONOTONIC` (the kernel's ids, not libc's
/// `timer_t`).
fn ptimer_create(signo: i32, notify: i32, value: u64, tid: i32) -> i32 {
    ptimer_create_on(libc::CLOCK_MONOTONIC, signo, notify, value, tid)
}

/// A raw `timer_create` on `clock`.
fn ptimer_create_on(clock: libc::clockid_t, signo: i32, notify: i32, value: u64, tid: i32) -> i32 {
    // struct sigevent: value, signo, notify, then the thread id.
    let mut ev = [0u8; 64];
    ev[..8].copy_from_slice(&value.to_le_bytes());
    ev[8..12].copy_from_slice(&signo.to_le_bytes());
    ev[12..16].copy_from_slice(&notify.to_le_bytes());
    ev[16..20].copy_from_slice(&tid.to_le_bytes());
    let mut id = -1i32;
    // SAFETY: the kernel reads `ev` and writes `id`, both live locals.
    let r = unsafe {
        libc::syscall(
            libc::SYS_timer_create,
            clock,
            ev.as_ptr(),
            &mut id as *mut i32,
        )
    };
    if r != 0 {
        die("timer_create");
    }
    id
}

fn posix_timers(ms: u64) {
    // SAFETY: getpid takes nothing (the main thread's tid).
    let main = unsafe { libc::getpid() };
    let handle = |sig: i32, f: extern "C" fn(i32, *mut libc::siginfo_t, *mut libc::c_void)| {
        // SAFETY: installs a handler that only touches atomics.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = f as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
            if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                die("sigaction");
            }
        }
    };
    let (s1, s2, s3) = (
        libc::SIGRTMIN() + 2,
        libc::SIGRTMIN() + 3,
        libc::SIGRTMIN() + 4,
    );
    handle(s1, on_ptimer);
    handle(s2, on_ptimer_tid);
    handle(s3, on_ptimer_cpu);
    let arm = |id: i32, period: u64| {
        let ts = libc::timespec {
            tv_sec: (period / 1000) as libc::time_t,
            tv_nsec: ((period % 1000) * 1_000_000) as libc::c_long,
        };
        let its = libc::itimerspec {
            it_interval: ts,
            it_value: ts,
        };
        // SAFETY: the kernel reads `its`, a live local.
        if unsafe { libc::syscall(libc::SYS_timer_settime, id, 0, &its, 0) } != 0 {
            die("timer_settime");
        }
    };
    let zero = ptimer_create(s1, libc::SIGEV_NONE, 0, 0);
    // SAFETY: deletes the timer just made.
    unsafe { libc::syscall(libc::SYS_timer_delete, zero) };
    let p = ptimer_create(s1, libc::SIGEV_SIGNAL, 0x77, 0);
    let t = ptimer_create(s2, libc::SIGEV_THREAD_ID, 0x88, main);
    let c = ptimer_create_on(
        libc::CLOCK_PROCESS_CPUTIME_ID,
        s3,
        libc::SIGEV_SIGNAL,
        0x99,
        0,
    );
    if (zero, p, t, c) != (0, 1, 2, 3) {
        die("timer ids (0, 1, 2, 3 expected)");
    }
    arm(p, ms);
    arm(t, 2 * ms);
    arm(c, 8 * ms);
}

fn ptimer_line() -> String {
    let exists = |id: i32| {
        // SAFETY: itimerspec is plain integers; all-zero is valid.
        let mut its: libc::itimerspec = unsafe { std::mem::zeroed() };
        // SAFETY: the kernel writes `its`, a live local.
        unsafe { libc::syscall(libc::SYS_timer_gettime, id, &mut its) == 0 }
    };
    let ids = if exists(1) && exists(2) && exists(3) && !exists(0) {
        "ok"
    } else {
        "bad"
    };
    format!(
        " ptimer_fires={} ptimer_tid_fires={} ptimer_cpu_fires={} ptimer_bad={} ptimer_ids={ids}",
        PTIMER_FIRES.load(Ordering::Relaxed),
        PTIMER_TID_FIRES.load(Ordering::Relaxed),
        PTIMER_CPU_FIRES.load(Ordering::Relaxed),
        PTIMER_BAD.load(Ordering::Relaxed),
    )
}
