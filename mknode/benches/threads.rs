//! Thread migration between agents on this host kernel, one run: three
//! agents linked by a ring window in /dev/shm stand for three kernels, and
//! `mkthreads` (testprogs) runs as a process of kernel 1, moving its own
//! threads with `mknode::thread::migrate` (what `mk_migrate()` calls).
//! Figures, each next to an alternative measured in the same run:
//! - **round trip**: a thread goes to kernel 2 and back (median legs),
//!   against one request to its agent (`kernel_id`, the IPC floor);
//! - **a moved thread's fault**: a worker on kernel 2 reads pages the main
//!   thread just wrote on kernel 1 (per page), against the same worker
//!   reading them at home;
//! - **a futex wake across kernels**: the main thread and a worker on
//!   kernel 2 take turns through a condition variable (per turn: a wake of
//!   a thread asleep on the other kernel), against both at home;
//! - **compute spread over 2 kernels**: 4 workers sum a 64 MiB array, two
//!   of them moved to kernel 2, against all four at home (both kernels share
//!   this machine's 2 CPUs: the ratio is the cost of the DSM, not a
//!   speed-up from more CPUs).
//!
//! Run: `cargo bench -p mknode --bench threads` (root, for ptrace and
//! userfaultfd). `MKNODE_THREADS_BENCH_QUICK=1` runs small sizes (what
//! `cargo test --benches` does).

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Command;

use mknode::agent::Dsm;

fn field(out: &str, k: &str) -> f64 {
    out.split_whitespace()
        .find_map(|f| f.strip_prefix(k))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {k} in {out}"))
}

fn main() {
    let quick = std::env::var_os("MKNODE_THREADS_BENCH_QUICK").is_some()
        || std::env::args().any(|a| a == "--test");
    let n = common::agents::net();
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, a) in n.agents.iter().enumerate() {
        a.facet::<Dsm>()
            .serve_local(&dir.path().join(format!("agent{i}.sock")))
            .expect("serving the local socket");
    }
    let prog = common::testprog("mkthreads");
    let run = |args: &[&str]| -> String {
        let out = Command::new(&prog)
            .args(args)
            .env("MK_AGENT", dir.path().join("agent1.sock"))
            .output()
            .expect("mkthreads");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "mkthreads {args:?}: {text}");
        text
    };

    let rounds = if quick { "3" } else { "40" };
    let b = run(&["bounce", "2", rounds]);
    let (out_us, back_us) = (field(&b, "out_us="), field(&b, "back_us="));
    // The floor: one request and answer on the thread's own connection,
    // timed in this process (same socket, same agent).
    let floor_us = {
        std::env::set_var("MK_AGENT", dir.path().join("agent1.sock"));
        let k = if quick { 20 } else { 2000 };
        let mut v: Vec<f64> = (0..k)
            .map(|_| {
                let t0 = std::time::Instant::now();
                mknode::thread::kernel_id().expect("kernel_id");
                t0.elapsed().as_secs_f64() * 1e6
            })
            .collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "round trip 1 -> 2 -> 1: out {out_us:.0} µs, back {back_us:.0} µs, total {:.0} µs = {:.0}x one agent request ({floor_us:.1} µs)",
        out_us + back_us,
        (out_us + back_us) / floor_us
    );

    let pages = if quick { "64" } else { "2048" };
    let away = field(&run(&["faults", "2", pages]), "us_per_page=");
    let home = field(&run(&["faults", "1", pages]), "us_per_page=");
    println!(
        "a moved thread reads a page written at home: {away:.1} µs/page (a DSM read fault); the same read at home {:.0} ns/page (a cache hit)",
        home * 1e3
    );

    let turns = if quick { "20" } else { "500" };
    let across = field(&run(&["pingpong", "2", turns]), "us_per_turn=");
    let local = field(&run(&["pingpong", "1", turns]), "us_per_turn=");
    println!(
        "condvar turns main <-> worker: across kernels {across:.0} µs/turn, both at home {local:.0} µs/turn ({:.0}x)",
        across / local.max(0.1)
    );

    let mb = if quick { "8" } else { "64" };
    let spread = run(&["sum", "2", "4", mb]);
    let local = run(&["sum", "1", "4", mb]);
    assert_eq!(field(&spread, "moved="), 2.0);
    let (s, l) = (field(&spread, "ms="), field(&local, "ms="));
    println!(
        "sum of {mb} MiB by 4 threads: 2 kernels {s:.0} ms, 1 kernel {l:.0} ms ({:.2}x the time)",
        s / l
    );
}
