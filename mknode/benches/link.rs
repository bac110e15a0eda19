//! `cargo bench -p mknode --bench link`: the agents' two transports side by
//! side, through the `Link` trait the agent and the DSM engine use —
//! `RingLink` over a `shmem-ring` window in /dev/shm against `TcpLink` over
//! 127.0.0.1, blocking and busy-polling.
//!
//! One pair of processes (this one pinned to the first CPU it may use, a
//! forked child to the second) holds all four links and measures them in
//! alternation: the host moves the two vCPUs between placements from one
//! second to the next, and only neighbouring chunks are sure to share one.
//! Every figure is the median over rounds; every ratio is the median of the
//! per-round ratios against the ring measured in the same round.
//!
//! - latency: 64 B ping-pong, one-way = RTT / 2, chunks of `CHUNK_RTT` round
//!   trips per link per round;
//! - throughput: the child sends a burst of 64 B or 4 KiB messages on one
//!   link (after a "go" from the parent, so bursts do not overlap), the
//!   parent times the first to the last received.
//!
//! Without `--bench` (`cargo test --benches`) it runs two short rounds.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mknode::link::tcp::{self, TcpOptions};
use mknode::link::{Link, RingLink, TcpLink};
use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

const LONG: Duration = Duration::from_secs(30);
const SMALL: usize = 64;
const PAGE: usize = 4096;
/// Each ring of the window: what a 16 MiB window shared by three kernels
/// (`configs/demo.toml`) gives.
const RING_CAPACITY: u64 = 2 << 20;
/// Rounds thrown away first (page faults, TCP slow start, caches).
const WARM: usize = 2;

struct Plan {
    rounds: usize,
    chunk_rtt: usize,
    burst_small: usize,
    burst_page: usize,
}

const FULL: Plan = Plan {
    rounds: 21,
    chunk_rtt: 1000,
    burst_small: 20_000,
    burst_page: 5_000,
};
const QUICK: Plan = Plan {
    rounds: 2,
    chunk_rtt: 100,
    burst_small: 1_000,
    burst_page: 200,
};

const NAMES: [&str; 4] = [
    "RingLink (/dev/shm)",
    "RingLink yielding",
    "TcpLink blocking",
    "TcpLink busy-poll",
];

fn pin(cpu: usize) {
    let mut set = CpuSet::new();
    set.set(cpu).expect("cpu index");
    // Pid 0: the calling thread.
    sched_setaffinity(Pid::from_raw(0), &set).expect("sched_setaffinity");
}

fn two_cpus() -> (usize, usize) {
    let set = sched_getaffinity(Pid::from_raw(0)).expect("sched_getaffinity");
    let cpus: Vec<usize> = (0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect();
    match cpus[..] {
        [a, b, ..] => (a, b),
        _ => panic!("the benchmark needs two CPUs, found {cpus:?}"),
    }
}

/// A TCP link pair through the real handshake (endpoints 0 and 1).
fn tcp_pair(opts: TcpOptions) -> (TcpLink, TcpLink) {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let l = tcp::listen(any, 0, opts).expect("listen on loopback");
    let addr = l.local_addr().unwrap();
    let c = std::thread::spawn(move || tcp::connect(addr, 1, LONG, opts).expect("connect"));
    let (_, a) = l.accept().expect("accept");
    let (_, b) = c.join().unwrap();
    (a, b)
}

fn recv(l: &dyn Link, buf: &mut Vec<u8>) {
    assert!(l.recv(buf, LONG).expect("recv"), "nothing in {LONG:?}");
}

fn send(l: &dyn Link, m: &[u8]) {
    l.send(m, LONG).expect("send");
}

/// The child: echoes the latency chunks, then sends the bursts.
fn child(p: &Plan, links: &[&dyn Link]) {
    let mut buf = Vec::with_capacity(PAGE);
    for _ in 0..WARM + p.rounds {
        for l in links {
            for _ in 0..p.chunk_rtt {
                recv(*l, &mut buf);
                send(*l, &buf);
            }
        }
    }
    for (size, burst) in [(SMALL, p.burst_small), (PAGE, p.burst_page)] {
        let mut msg = vec![1u8; size];
        for _ in 0..WARM + p.rounds {
            for l in links {
                recv(*l, &mut buf);
                for i in 0..burst {
                    msg[0] = i as u8;
                    send(*l, &msg);
                }
            }
        }
    }
}

/// Per link, per round: one-way latency (ns), 64 B and 4 KiB messages/s.
struct Samples {
    latency: Vec<Vec<f64>>,
    small: Vec<Vec<f64>>,
    page: Vec<Vec<f64>>,
}

fn parent(p: &Plan, links: &[&dyn Link]) -> Samples {
    let n = links.len();
    let mut s = Samples {
        latency: vec![Vec::new(); n],
        small: vec![Vec::new(); n],
        page: vec![Vec::new(); n],
    };
    let msg = [7u8; SMALL];
    let mut buf = Vec::with_capacity(PAGE);
    for round in 0..WARM + p.rounds {
        for (i, l) in links.iter().enumerate() {
            let t0 = Instant::now();
            for _ in 0..p.chunk_rtt {
                send(*l, &msg);
                recv(*l, &mut buf);
            }
            let ns = t0.elapsed().as_nanos() as f64 / (2 * p.chunk_rtt) as f64;
            if round >= WARM {
                s.latency[i].push(ns);
            }
        }
    }
    for (size, burst, out) in [
        (SMALL, p.burst_small, &mut s.small),
        (PAGE, p.burst_page, &mut s.page),
    ] {
        for round in 0..WARM + p.rounds {
            for (i, l) in links.iter().enumerate() {
                send(*l, b"go");
                recv(*l, &mut buf);
                let t0 = Instant::now();
                for _ in 1..burst {
                    recv(*l, &mut buf);
                }
                let secs = t0.elapsed().as_secs_f64();
                assert_eq!(buf.len(), size);
                if round >= WARM {
                    out[i].push((burst - 1) as f64 / secs);
                }
            }
        }
    }
    s
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median over rounds of `of[i][r] / of[0][r]`.
fn ratio(of: &[Vec<f64>], i: usize) -> f64 {
    median(of[i].iter().zip(&of[0]).map(|(x, ring)| x / ring).collect())
}

fn time(ns: f64) -> String {
    if ns >= 1000.0 {
        format!("{:.1} µs", ns / 1000.0)
    } else {
        format!("{ns:.0} ns")
    }
}

fn rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2} M/s", r / 1e6)
    } else {
        format!("{:.0} k/s", r / 1e3)
    }
}

fn main() {
    let p = if std::env::args().any(|a| a == "--bench") {
        &FULL
    } else {
        &QUICK
    };
    let (c0, c1) = two_cpus();
    pin(c0);

    let dir = tempfile::Builder::new()
        .prefix("link-bench")
        .tempdir_in("/dev/shm")
        .expect("a directory in /dev/shm");
    let layout = shmem_ring::Layout::with_capacity(4, RING_CAPACITY).unwrap();
    let window = shmem_ring::Window::create_with(dir.path().join("window"), layout).unwrap();
    // Nobody beats in this benchmark: a peer is never declared dead.
    let forever = shmem_ring::Liveness {
        silent_after: Duration::from_secs(3600),
        dead_after: Duration::from_secs(3600),
    };
    let (e0, e1) = (
        window.attach_with(0, forever).unwrap(),
        window.attach_with(1, forever).unwrap(),
    );
    // The ring as a lone pair of threads gets the most from it (spinning
    // 50 µs before yielding), and as agents open it (yielding at once, for
    // their many threads: `mknode::link::AGENT_SPIN`).
    let spin = shmem_ring::wait::SPIN_FOR;
    let (ring_a, ring_b) = (
        RingLink::open(&e0, 1).unwrap().spinning(spin),
        RingLink::open(&e1, 0).unwrap().spinning(spin),
    );
    let (e2, e3) = (
        window.attach_with(2, forever).unwrap(),
        window.attach_with(3, forever).unwrap(),
    );
    let (yield_a, yield_b) = (
        RingLink::open(&e2, 3).unwrap(),
        RingLink::open(&e3, 2).unwrap(),
    );
    let (tcp_a, tcp_b) = tcp_pair(TcpOptions::default());
    let (busy_a, busy_b) = tcp_pair(TcpOptions::default().busy_poll(tcp::DEFAULT_SPIN));
    let ours: [&dyn Link; 4] = [&ring_a, &yield_a, &tcp_a, &busy_a];
    let theirs: [&dyn Link; 4] = [&ring_b, &yield_b, &tcp_b, &busy_b];

    eprintln!(
        "link bench: {} rounds, CPUs {c0} and {c1}; the four links alternate every {} round \
         trips, {} messages of 64 B, {} of 4 KiB",
        p.rounds, p.chunk_rtt, p.burst_small, p.burst_page
    );
    // SAFETY: single-threaded here (the connecting threads were joined), so
    // the child inherits no lock another thread holds; it leaves through
    // `_exit` without running destructors that would detach the parent's
    // endpoints from the window.
    let s = match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            pin(c1);
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| child(p, &theirs)))
                .is_ok();
            // SAFETY: ends the process at once; nothing after it runs.
            unsafe { nix::libc::_exit(if ok { 0 } else { 1 }) }
        }
        ForkResult::Parent { child } => {
            let s = parent(p, &ours);
            match waitpid(child, None).expect("waitpid") {
                WaitStatus::Exited(_, 0) => s,
                other => panic!("benchmark child failed: {other:?}"),
            }
        }
    };

    println!();
    println!(
        "{:<20} {:>9} {:>7}   {:>10} {:>7}   {:>10} {:>9} {:>7}",
        "link", "one-way", "x ring", "64 B", "x ring", "4 KiB", "GB/s", "x ring"
    );
    for (i, name) in NAMES.iter().enumerate() {
        let page = median(s.page[i].clone());
        println!(
            "{:<20} {:>9} {:>7.1}   {:>10} {:>7.3}   {:>10} {:>9.2} {:>7.3}",
            name,
            time(median(s.latency[i].clone())),
            ratio(&s.latency, i),
            rate(median(s.small[i].clone())),
            ratio(&s.small, i),
            rate(page),
            page * PAGE as f64 / 1e9,
            ratio(&s.page, i),
        );
    }
    println!();
    println!(
        "one-way = RTT/2 of 64 B; 64 B and 4 KiB: messages per second, one direction; \
         medians over {} rounds; x ring: median per-round ratio to RingLink",
        p.rounds
    );
    let spread = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        format!("{} .. {}", time(v[0]), time(v[v.len() - 1]))
    };
    for (i, name) in NAMES.iter().enumerate() {
        println!("  {name}: one-way over rounds {}", spread(&s.latency[i]));
    }
}
