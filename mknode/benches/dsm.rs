//! The DSM between agents on this host kernel, one run, over the shared-
//! memory rings and over TCP loopback, next to the userfaultfd floor.
//!
//! Three agents stand for three kernels (linked by a ring window in
//! /dev/shm, or by TCP), each serving its processes on a socket; the
//! accesses are made by child processes (this binary run again in a role),
//! one per kernel, as programs would. Figures:
//! - **remote read fault**: a page written on kernel 1 (its home), read on
//!   kernel 2 (one request, the home takes its own copy back, one grant);
//! - **write fault, invalidating 1 / 2 copies**: kernel 2 writes pages that
//!   1 (and 0) hold read-only;
//! - **ping-pong**: kernels 1 and 2 take turns writing one page (turns/s);
//! - **sequential read of 64 MiB** written on kernel 1, read on kernel 2;
//! - **first fault after 5 s idle** against a busy one (median of 5);
//! - the **floor**: a fault resolved in this process by `UFFDIO_COPY` of a
//!   ready page, from a handler thread that polls as the engine does.
//!
//! Run: `cargo bench -p mknode --bench dsm` (root, for userfaultfd).
//! `MKNODE_DSM_BENCH_QUICK=1` runs small sizes (what `cargo test --benches`
//! does).

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mknode::agent::{Agent, Dsm};

const PAGE: usize = 4096;
/// How many first faults after idle are measured (the median is shown).
const IDLE_SAMPLES: usize = 5;

// ----------------------------------------------------------------- roles

/// A child: maps the region through `$MK_AGENT` and does one thing,
/// printing one line of numbers.
fn role(args: &[String]) {
    let (what, name) = (&args[0], &args[1]);
    let size: usize = args[2].parse().expect("size");
    let p = mknode::dsm::client::map(name, size).unwrap_or_else(|e| {
        println!("FAIL {}", mknode::error_text(&e));
        std::process::exit(1)
    });
    let pages = size / PAGE;
    let word = |i: usize| {
        // SAFETY: `p` is a live mapping of `size` bytes kept until exit;
        // page `i < pages` starts inside it, 8-aligned.
        unsafe { &*p.add(i * PAGE).cast::<std::sync::atomic::AtomicU64>() }
    };
    match what.as_str() {
        // Writes each page (this kernel then holds them exclusive).
        "write" => {
            for i in 0..pages {
                word(i).store(i as u64 + 1, Ordering::Release);
            }
            println!("ok");
        }
        // Touches each page once, timing each first access (ns per line;
        // `pages` a power of two).
        "read" | "writeeach" => {
            let mut ns = Vec::with_capacity(pages);
            // A scattered order (an odd stride over a power of two): each
            // access is a fault of its own, not one read-ahead served.
            for k in 0..pages {
                let i = (k * 7919) % pages;
                let t = Instant::now();
                if what == "read" {
                    std::hint::black_box(word(i).load(Ordering::Acquire));
                } else {
                    word(i).fetch_add(1, Ordering::AcqRel);
                }
                ns.push(t.elapsed().as_nanos() as u64);
            }
            println!(
                "{}",
                ns.iter().map(u64::to_string).collect::<Vec<_>>().join(" ")
            );
        }
        // Reads every byte, front to back (ns in all).
        "scan" => {
            let t = Instant::now();
            let mut sum = 0u64;
            for i in 0..size / 8 {
                // SAFETY: inside the mapping, 8-aligned.
                sum = sum.wrapping_add(unsafe { p.cast::<u64>().add(i).read_volatile() });
            }
            std::hint::black_box(sum);
            println!("{}", t.elapsed().as_nanos());
        }
        // Takes turns with the other side on page 0 (side 0: even, 1: odd).
        // Reads page i after `idle_ms` of quiet, for each page (ns per line).
        "idleread" => {
            let idle = Duration::from_millis(args[3].parse().expect("idle ms"));
            let mut ns = Vec::with_capacity(pages);
            // Backwards: an ascending reader would be served by read-ahead.
            for i in (0..pages).rev() {
                std::thread::sleep(idle);
                let t = Instant::now();
                std::hint::black_box(word(i).load(Ordering::Acquire));
                ns.push(t.elapsed().as_nanos() as u64);
            }
            println!(
                "{}",
                ns.iter().map(u64::to_string).collect::<Vec<_>>().join(" ")
            );
        }
        "pingpong" => {
            let side: u64 = args[3].parse().expect("side");
            let turns: u64 = args[4].parse().expect("turns");
            let w = word(0);
            let t = Instant::now();
            for k in 0..turns {
                let mine = 2 * k + side;
                // Yield while waiting: here three kernels' agents and two
                // spinning writers share 2 CPUs, and a writer that never
                // yields would measure the scheduler's time slice (the
                // agent that must take the page from it waits for a CPU).
                while w.load(Ordering::Acquire) != mine {
                    std::thread::yield_now();
                }
                w.store(mine + 1, Ordering::Release);
            }
            println!("{}", t.elapsed().as_nanos());
        }
        other => panic!("unknown role {other}"),
    }
}

// ------------------------------------------------------------ the kernels

struct Kernels {
    agents: Vec<Arc<Agent>>,
    dir: tempfile::TempDir,
    _net: Option<common::agents::Net>,
}

impl Drop for Kernels {
    fn drop(&mut self) {
        for a in &self.agents {
            a.facet::<Dsm>().stop_local();
        }
    }
}

fn kernels(tcp: bool) -> Kernels {
    let dir = tempfile::tempdir().expect("tempdir");
    let (agents, net) = if tcp {
        (common::agents::net_tcp(true), None)
    } else {
        let n = common::agents::net();
        (n.agents.clone(), Some(n))
    };
    for (i, a) in agents.iter().enumerate() {
        a.facet::<Dsm>()
            .serve_local(&dir.path().join(format!("agent{i}.sock")))
            .expect("local socket");
    }
    Kernels {
        agents,
        dir,
        _net: net,
    }
}

impl Kernels {
    fn sock(&self, on: usize) -> PathBuf {
        self.dir.path().join(format!("agent{on}.sock"))
    }

    /// Runs a role on kernel `on`; its output line.
    fn run(&self, on: usize, args: &[&str]) -> String {
        let out = self.spawn(on, args).wait_with_output().expect("role");
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            out.status.success() && !text.starts_with("FAIL"),
            "{args:?}: {text}"
        );
        text
    }

    fn spawn(&self, on: usize, args: &[&str]) -> std::process::Child {
        Command::new(std::env::current_exe().expect("exe"))
            .env("MKNODE_DSM_ROLE", "1")
            .env("MK_AGENT", self.sock(on))
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn role")
    }
}

fn nums(s: &str) -> Vec<u64> {
    s.split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect()
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn us(ns: u64) -> String {
    format!("{:.1} µs", ns as f64 / 1e3)
}

// ------------------------------------------------------------- the floor

/// Median ns of a missing fault on anonymous memory resolved by
/// `UFFDIO_COPY` of a ready page from a thread polling the userfaultfd
/// (spinning on non-blocking reads, as the engine does while busy).
fn uffd_floor(pages: usize, idle: Option<Duration>) -> u64 {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    const UFFDIO_API: u64 = 0xc018_aa3f;
    const UFFDIO_REGISTER: u64 = 0xc020_aa00;
    const UFFDIO_COPY: u64 = 0xc028_aa03;
    // SAFETY: userfaultfd(2) returns a new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    assert!(fd >= 0, "userfaultfd: {}", std::io::Error::last_os_error());
    // SAFETY: just opened, ours alone.
    let uffd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut api = [0xaau64, 0, 0];
    // SAFETY: struct uffdio_api is three u64s; `api` is live for the call.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API, api.as_mut_ptr()) };
    assert_eq!(r, 0);
    let len = pages * PAGE;
    // SAFETY: a fresh private anonymous mapping, unmapped at the end.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(base, libc::MAP_FAILED);
    let mut reg = [base as u64, len as u64, 1, 0];
    // SAFETY: struct uffdio_register is {range{start,len}, mode, ioctls}.
    let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER, reg.as_mut_ptr()) };
    assert_eq!(r, 0);
    let stop = Arc::new(AtomicBool::new(false));
    let st = Arc::clone(&stop);
    let raw = uffd.as_raw_fd();
    let handler = std::thread::spawn(move || {
        let src = vec![7u8; PAGE];
        let mut msg = [0u8; 32];
        while !st.load(Ordering::Relaxed) {
            // SAFETY: reads at most 32 bytes into `msg`.
            let n = unsafe { libc::read(raw, msg.as_mut_ptr().cast(), 32) };
            if n != 32 {
                if idle.is_some() {
                    // After idle the engine sleeps in epoll; so does this.
                    let mut p = libc::pollfd {
                        fd: raw,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one pollfd, live for the call.
                    unsafe { libc::poll(&mut p, 1, 100) };
                } else {
                    std::hint::spin_loop();
                }
                continue;
            }
            let addr = u64::from_le_bytes(msg[16..24].try_into().unwrap()) & !(PAGE as u64 - 1);
            let mut c = [addr, src.as_ptr() as u64, PAGE as u64, 0, 0];
            // SAFETY: struct uffdio_copy; `src` is a live page.
            unsafe { libc::ioctl(raw, UFFDIO_COPY, c.as_mut_ptr()) };
        }
    });
    let mut ns = Vec::with_capacity(pages);
    for i in 0..pages {
        if let Some(idle) = idle {
            std::thread::sleep(idle);
        }
        let t = Instant::now();
        // SAFETY: inside the mapping.
        std::hint::black_box(unsafe { base.cast::<u8>().add(i * PAGE).read_volatile() });
        ns.push(t.elapsed().as_nanos() as u64);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = handler.join();
    // SAFETY: the mapping made above.
    unsafe { libc::munmap(base, len) };
    median(&mut ns)
}

// ------------------------------------------------------------- the cases

struct Figures {
    read: u64,
    write1: u64,
    write2: u64,
    turns_per_s: f64,
    scan_gbs: f64,
    idle: u64,
}

fn measure(tcp: bool, pages: usize, scan_mib: usize, turns: u64, idle: Duration) -> Figures {
    let k = kernels(tcp);
    let size = (pages * PAGE).to_string();
    // Remote read: written on 1 (home), read on 2.
    k.run(1, &["write", "rd", &size]);
    let read = median(&mut nums(&k.run(2, &["read", "rd", &size])));
    // Write invalidating one copy: 1 writes (home), 2 reads, 2 writes.
    k.run(1, &["write", "w1", &size]);
    k.run(2, &["read", "w1", &size]);
    let write1 = median(&mut nums(&k.run(2, &["writeeach", "w1", &size])));
    // Two copies: 1 writes, 0 and 2 read, 2 writes (invalidates 1 and 0).
    k.run(1, &["write", "w2", &size]);
    k.run(0, &["read", "w2", &size]);
    k.run(2, &["read", "w2", &size]);
    let write2 = median(&mut nums(&k.run(2, &["writeeach", "w2", &size])));
    // Ping-pong between 1 and 2.
    let t = turns.to_string();
    let a = k.spawn(1, &["pingpong", "pp", "4096", "0", &t]);
    let b = k.spawn(2, &["pingpong", "pp", "4096", "1", &t]);
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let ns = nums(&String::from_utf8_lossy(&a.stdout))[0]
        .max(nums(&String::from_utf8_lossy(&b.stdout))[0]);
    let turns_per_s = 2.0 * turns as f64 / (ns as f64 / 1e9);
    // Sequential read.
    let scan = (scan_mib << 20).to_string();
    k.run(1, &["write", "scan", &scan]);
    let ns = nums(&k.run(2, &["scan", "scan", &scan]))[0];
    let scan_gbs = (scan_mib << 20) as f64 / ns as f64;
    // The first fault after a quiet while, a few times (the process
    // sleeps between its reads, so no mapping or start-up comes just
    // before one).
    let idle_pages = (IDLE_SAMPLES * PAGE).to_string();
    k.run(1, &["write", "idle", &idle_pages]);
    let ms = idle.as_millis().to_string();
    let idle = median(&mut nums(
        &k.run(2, &["idleread", "idle", &idle_pages, &ms]),
    ));
    Figures {
        read,
        write1,
        write2,
        turns_per_s,
        scan_gbs,
        idle,
    }
}

fn main() {
    if std::env::var_os("MKNODE_DSM_ROLE").is_some() {
        let args: Vec<String> = std::env::args().skip(1).collect();
        role(&args);
        return;
    }
    let quick = std::env::var_os("MKNODE_DSM_BENCH_QUICK").is_some()
        || std::env::args().any(|a| a == "--test");
    let (pages, scan, turns, idle) = if quick {
        (64, 4, 200, Duration::from_millis(200))
    } else {
        (1024, 64, 5000, Duration::from_secs(5))
    };
    let floor = uffd_floor(pages, None);
    let floor_idle = uffd_floor(IDLE_SAMPLES, Some(idle));
    let ring = measure(false, pages, scan, turns, idle);
    let tcp = measure(true, pages, scan, turns, idle);
    println!("DSM between agents on this host kernel; medians over {pages} pages");
    println!(
        "| operation | ring | TCP loopback | ring / TCP | ring / uffd floor |\n|---|---:|---:|---:|---:|"
    );
    let row = |name: &str, r: u64, t: u64, floor: u64| {
        println!(
            "| {name} | {} | {} | {:.2} | {:.1} |",
            us(r),
            us(t),
            r as f64 / t as f64,
            r as f64 / floor as f64
        );
    };
    row("remote read fault", ring.read, tcp.read, floor);
    row(
        "write fault, invalidates 1 copy",
        ring.write1,
        tcp.write1,
        floor,
    );
    row(
        "write fault, invalidates 2 copies",
        ring.write2,
        tcp.write2,
        floor,
    );
    row(
        "first fault after idle (x the floor after idle)",
        ring.idle,
        tcp.idle,
        floor_idle,
    );
    println!(
        "| ping-pong between two writers | {:.0} turns/s | {:.0} turns/s | {:.2} | |",
        ring.turns_per_s,
        tcp.turns_per_s,
        ring.turns_per_s / tcp.turns_per_s
    );
    println!(
        "| sequential read of {scan} MiB | {:.3} GB/s | {:.3} GB/s | {:.2} | |",
        ring.scan_gbs,
        tcp.scan_gbs,
        ring.scan_gbs / tcp.scan_gbs
    );
    println!(
        "| uffd floor (local UFFDIO_COPY) | {} | | | 1.0 |",
        us(floor)
    );
    println!(
        "| uffd floor after idle (handler asleep in poll) | {} | | | 1.0 |",
        us(floor_idle)
    );
    println!(
        "targets: remote read <= 3x floor ({:.1}), <= 0.5x TCP ({:.2}); first fault after idle <= 2x a busy one ({:.1}; the floor's own: {:.1})",
        ring.read as f64 / floor as f64,
        ring.read as f64 / tcp.read as f64,
        ring.idle as f64 / ring.read as f64,
        floor_idle as f64 / floor as f64
    );
}
