//! mktree: the process tree the `--tree` tests move.
//!
//! `mktree [--log PATH] [--interval-ms MS] [--socketpair] [--thread]`
//!
//! The top process makes itself a session leader (`setsid`), opens PATH
//! (when given; write-only, truncated, *not* `O_APPEND`, so the offset is
//! the one open file description's that fork shares), then forks:
//!
//! * a child that exits at once with code 7 and is not reaped: a zombie
//!   until the top gets SIGUSR1;
//! * a `kid` that makes its own process group and, every MS milliseconds
//!   (default 20), prints
//!   `kid n=<n> pid=<getpid> ppid=<getppid> pgid=<getpgid> sid=<getsid>`
//!   and writes `kid <n>` to the log.
//!
//! The top then prints, every MS milliseconds,
//! `top n=<n> pid=<getpid> pgid=<getpgid> sid=<getsid> kid=<kid's pid> zombie=<zombie's pid>`
//! and writes `top <n>` to the log. On SIGUSR1 it reaps the zombie
//! (`waitpid(zombie, WNOHANG)`) and prints `reaped pid=<what waitpid
//! returned> code=<its exit code>`; on SIGUSR2 it ends the kid (SIGTERM),
//! waits for it and prints `ended pid=<pid> signal=<the signal that ended
//! it>`, then exits with code 3.
//!
//! With `--socketpair`, a datagram socket pair made before the fork joins
//! the two: the kid sends `<n>` on it with every line, the top reads one
//! datagram every other line and prints `relay kid=<n>`, so that datagrams
//! are queued in the pair whenever it is frozen.
//!
//! With `--thread`, the kid runs a second thread that writes down its
//! `gettid` every 5 ms, and the kid's lines end with
//! ` thread=<that tid> ping=<what pthread_kill(thread, 0) returned>`:
//! 0 while glibc's cached tid of the thread is the thread's, ESRCH (3)
//! once it names no thread of the process.
//!
//! SIGWINCH is blocked in both and left pending: in the top for its thread
//! (`raise`), in the kid for the process (`kill` of itself), for a move to
//! carry (`/proc/PID/status` shows them: `SigPnd`, `ShdPnd`).
//!
//! Every line is one `write` (lines of the two processes never mix).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn say(fd: i32, s: &str) {
    let mut b = s.as_bytes().to_vec();
    b.push(b'\n');
    // SAFETY: writes from a live buffer to a descriptor of ours.
    unsafe {
        libc::write(fd, b.as_ptr().cast(), b.len());
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut log: Option<String> = None;
    let mut ms = 20u64;
    let mut pair = false;
    let mut thread = false;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--log" => log = args.next(),
            "--interval-ms" => ms = args.next().and_then(|v| v.parse().ok()).unwrap_or(ms),
            "--socketpair" => pair = true,
            "--thread" => thread = true,
            other => {
                eprintln!("mktree: unknown argument {other:?}");
                std::process::exit(2);
            }
        }
    }
    // SAFETY: setsid takes no arguments.
    if unsafe { libc::setsid() } < 0 {
        eprintln!("mktree: setsid: {}", std::io::Error::last_os_error());
        std::process::exit(2);
    }
    let logfd = match &log {
        Some(p) => {
            let c = std::ffi::CString::new(p.as_str()).expect("no NUL in the path");
            // SAFETY: open with a NUL-terminated path we own.
            let fd = unsafe {
                libc::open(
                    c.as_ptr(),
                    libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
                    0o644,
                )
            };
            if fd < 0 {
                eprintln!("mktree: open {p}: {}", std::io::Error::last_os_error());
                std::process::exit(2);
            }
            fd
        }
        None => -1,
    };
    // SAFETY: sigset calls on a live local set; the mask change and raise
    // touch this (single-threaded) process only.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGWINCH);
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::raise(libc::SIGWINCH);
    }
    let usr1 = Arc::new(AtomicBool::new(false));
    let usr2 = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGUSR1, Arc::clone(&usr1))
        .expect("SIGUSR1 handler");
    signal_hook::flag::register(signal_hook::consts::SIGUSR2, Arc::clone(&usr2))
        .expect("SIGUSR2 handler");
    // SAFETY: fork in a single-threaded process; the child only exits.
    let zombie = unsafe { libc::fork() };
    if zombie == 0 {
        // SAFETY: _exit ends the child at once.
        unsafe { libc::_exit(7) };
    }
    let mut sv = [-1; 2];
    // SAFETY: socketpair writes two descriptors into a live local array.
    if pair && unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_DGRAM, 0, sv.as_mut_ptr()) } != 0
    {
        eprintln!("mktree: socketpair: {}", std::io::Error::last_os_error());
        std::process::exit(2);
    }
    // SAFETY: fork in a single-threaded process; the child runs plain code.
    let kid = unsafe { libc::fork() };
    if kid == 0 {
        // SAFETY: plain process calls on integers.
        unsafe {
            libc::setpgid(0, 0);
            libc::kill(libc::getpid(), libc::SIGWINCH);
        }
        if pair {
            // SAFETY: closing the top's end in this process only.
            unsafe { libc::close(sv[0]) };
        }
        let seen = Arc::new(std::sync::atomic::AtomicI64::new(0));
        let other = thread.then(|| {
            let seen = Arc::clone(&seen);
            std::thread::spawn(move || loop {
                // SAFETY: gettid takes nothing.
                let tid = unsafe { libc::syscall(libc::SYS_gettid) };
                seen.store(tid, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            })
        });
        for n in 0.. {
            if pair {
                let b = n.to_string();
                // SAFETY: sends a live buffer on our own socket.
                unsafe { libc::send(sv[1], b.as_ptr().cast(), b.len(), 0) };
            }
            // SAFETY: as above.
            let (pid, ppid, pgid, sid) = unsafe {
                (
                    libc::getpid(),
                    libc::getppid(),
                    libc::getpgid(0),
                    libc::getsid(0),
                )
            };
            let threaded = other.as_ref().map_or_else(String::new, |h| {
                use std::os::unix::thread::JoinHandleExt;
                // SAFETY: signal 0 to a thread of ours that never ends:
                // only the check of its tid, no signal.
                let ping = unsafe { libc::pthread_kill(h.as_pthread_t(), 0) };
                format!(" thread={} ping={ping}", seen.load(Ordering::Relaxed))
            });
            say(
                1,
                &format!("kid n={n} pid={pid} ppid={ppid} pgid={pgid} sid={sid}{threaded}"),
            );
            if logfd >= 0 {
                say(logfd, &format!("kid {n}"));
            }
            std::thread::sleep(Duration::from_millis(ms));
        }
    }
    if pair {
        // SAFETY: closing the kid's end in this process only.
        unsafe { libc::close(sv[1]) };
    }
    for n in 0.. {
        if pair && n % 2 == 0 {
            let mut b = [0u8; 32];
            // SAFETY: receives into a live local buffer.
            let got = unsafe { libc::recv(sv[0], b.as_mut_ptr().cast(), b.len(), 0) };
            if got > 0 {
                let text = String::from_utf8_lossy(&b[..got as usize]).into_owned();
                say(1, &format!("relay kid={text}"));
            }
        }
        // SAFETY: plain process calls on integers.
        let (pid, pgid, sid) = unsafe { (libc::getpid(), libc::getpgid(0), libc::getsid(0)) };
        say(
            1,
            &format!("top n={n} pid={pid} pgid={pgid} sid={sid} kid={kid} zombie={zombie}"),
        );
        if logfd >= 0 {
            say(logfd, &format!("top {n}"));
        }
        if usr1.swap(false, Ordering::Relaxed) {
            let mut st = 0;
            // SAFETY: waitpid writes the status into a live local.
            let r = unsafe { libc::waitpid(zombie, &mut st, libc::WNOHANG) };
            let code = if libc::WIFEXITED(st) {
                libc::WEXITSTATUS(st)
            } else {
                -1
            };
            say(1, &format!("reaped pid={r} code={code}"));
        }
        if usr2.swap(false, Ordering::Relaxed) {
            let mut st = 0;
            // SAFETY: kill and waitpid on our own child; the status goes
            // into a live local.
            let r = unsafe {
                libc::kill(kid, libc::SIGTERM);
                libc::waitpid(kid, &mut st, 0)
            };
            let sig = if libc::WIFSIGNALED(st) {
                libc::WTERMSIG(st)
            } else {
                -1
            };
            say(1, &format!("ended pid={r} signal={sig}"));
            std::process::exit(3);
        }
        std::thread::sleep(Duration::from_millis(ms));
    }
}
