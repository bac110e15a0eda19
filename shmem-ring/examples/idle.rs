//! What an idle link costs and how fast it wakes up, between two processes:
//! a receiver waits on an empty ring in a loop of `recv` calls with a
//! 100 ms timeout (as mknode's agents do) while a forked sender process only
//! beats its heartbeat. After each quiet spell of 5 s the sender sends one
//! message stamped with the monotonic clock (one clock for both processes
//! on one kernel), and the receiver prints how late it saw it. Over the
//! first round it also prints the CPU time it used and its voluntary context
//! switches (one per sleep), over the first second and over the rest.
//!
//! `cargo run -p shmem-ring --release --example idle [rounds]` (default 3).
//!
//! The fork is the only `unsafe` here (the crate keeps its own in
//! `src/raw.rs`).

use std::time::{Duration, Instant};

use nix::sys::resource::{getrusage, Usage, UsageWho};
use nix::sys::wait::waitpid;
use nix::time::{clock_gettime, ClockId};
use nix::unistd::{fork, ForkResult};
use shmem_ring::{Error, Layout, Window};

const QUIET: Duration = Duration::from_secs(5);

fn usage() -> Usage {
    getrusage(UsageWho::RUSAGE_THREAD).expect("getrusage")
}

/// The monotonic clock in nanoseconds: the same clock in every process.
fn now_ns() -> u64 {
    let t = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("clock_gettime");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// CPU share and wake-ups per second between two samples `secs` apart.
fn span(a: &Usage, b: &Usage, secs: f64) -> String {
    let cpu = |u: &Usage| {
        let t = |v: nix::sys::time::TimeVal| {
            Duration::from_secs(v.tv_sec() as u64) + Duration::from_micros(v.tv_usec() as u64)
        };
        t(u.user_time()) + t(u.system_time())
    };
    format!(
        "{:.3}% of a core, {:.0} wake-ups/s",
        (cpu(b) - cpu(a)).as_secs_f64() / secs * 100.0,
        (b.voluntary_context_switches() - a.voluntary_context_switches()) as f64 / secs
    )
}

/// The sender process: beats, and after each quiet spell sends the time.
fn sender(w: &Window, rounds: usize) -> Result<(), Error> {
    let a = w.attach(0)?;
    let (mut tx, _) = a.channel(1)?;
    for _ in 0..rounds {
        let start = Instant::now();
        while start.elapsed() < QUIET {
            a.heartbeat()?;
            std::thread::sleep(Duration::from_millis(50));
        }
        tx.try_send(&now_ns().to_le_bytes())?;
    }
    // Stay attached until the receiver saw the last one.
    std::thread::sleep(Duration::from_millis(200));
    Ok(())
}

fn main() -> Result<(), Error> {
    let rounds = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3usize);
    let w = Window::anonymous(Layout::with_capacity(2, 64 << 10)?)?;
    // SAFETY: no other thread exists yet in this process, so none can hold
    // a lock the child needs; the child leaves through `_exit` without
    // running this process's destructors.
    let child = match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            let code = match sender(&w, rounds) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("sender: {e}");
                    1
                }
            };
            // SAFETY: ends the child at once; nothing after it runs.
            unsafe { nix::libc::_exit(code) }
        }
        ForkResult::Parent { child } => child,
    };
    let b = w.attach(1)?;
    let (_, mut rx) = b.channel(0)?;
    let mut buf = Vec::new();
    let mut late = Vec::new();
    for round in 0..rounds {
        let start = Instant::now();
        let first = usage();
        let mut mid = None;
        loop {
            match rx.recv(&mut buf, Duration::from_millis(100)) {
                Ok(_) => break,
                Err(Error::Timeout { .. }) => {
                    if mid.is_none() && start.elapsed() >= Duration::from_secs(1) {
                        mid = Some((start.elapsed(), usage()));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        let got = now_ns();
        let last = usage();
        let sent = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
        let us = got.saturating_sub(sent) as f64 / 1e3;
        late.push(us);
        if round == 0 {
            let (mid_at, mid) = mid.expect("a second passed");
            let rest = start.elapsed() - mid_at;
            println!(
                "idle receiver: first {:.1} s: {}; next {:.1} s: {}",
                mid_at.as_secs_f64(),
                span(&first, &mid, mid_at.as_secs_f64()),
                rest.as_secs_f64(),
                span(&mid, &last, rest.as_secs_f64()),
            );
        }
        println!(
            "round {}: a message after {:.0} s of silence arrived {us:.1} µs after it was sent",
            round + 1,
            QUIET.as_secs_f64()
        );
    }
    let _ = waitpid(child, None);
    late.sort_by(f64::total_cmp);
    println!(
        "first message after {:.0} s of silence, {} rounds: median {:.1} µs, max {:.1} µs",
        QUIET.as_secs_f64(),
        late.len(),
        late[late.len() / 2],
        late[late.len() - 1]
    );
    Ok(())
}
