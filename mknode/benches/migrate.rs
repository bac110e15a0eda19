//! Migration between agents on this host kernel, next to CRIU, one run.
//!
//! Two agents (endpoints 1 and 2, plus a client as 0) are linked by a ring
//! window in /dev/shm as kernels are (`tests/common/agents.rs`). For 16, 64
//! and 256 MiB of resident, non-zero heap, `mkcounter` (3 busy threads) is
//! started with exec on agent 1 and moved to agent 2 with the request
//! `mkctl migrate` sends — once stop-and-copy, once lazy — and, in the same
//! round, a like process is dumped and restored by CRIU 4.1
//! (`benches/criu`, a Debian 13 chroot that `scripts/criu-peer.sh setup`
//! builds). The three alternate round by round, so a noisy moment of the
//! machine hits all of them.
//!
//! Printed, per size (median of ROUNDS, ms):
//! - stop-copy: downtime (first thread frozen → copy running) and total
//!   (from the request until the answer, which comes once the original is
//!   gone).
//! - lazy: downtime, and total until every page moved and the origin let
//!   go of its frozen original.
//! - CRIU: `criu dump` + `criu restore -d`, each as the wall time of the
//!   command; the process is stopped for all of it.
//! - two memcpy floors of the same bytes, measured here: between two
//!   buffers already in memory ("hot"), and into freshly mapped memory
//!   ("fresh": a destination must fault its pages in; on this virtual
//!   machine that is most of the cost).
//! - the ratios the migration issue sets targets for: lazy downtime against
//!   CRIU's dump+restore (target ≤ 1/10 at 256 MiB), stop-copy total
//!   against the floors (target ≤ 3×).
//!
//! Without CRIU (not root, no network for the chroot, `MKNODE_BENCH_CRIU=0`)
//! the CRIU columns say why and the floors remain the comparison.
//!
//! Run: `cargo bench -p mknode --bench migrate` (root). `cargo test
//! --benches` runs one small round without CRIU.

#[path = "../tests/common/mod.rs"]
mod common;
mod criu;

use common::{median, ms, rss_kib};

use std::time::{Duration, Instant};

use common::agents::{net, Net};
use mknode::wire::Msg;

const ROUNDS: usize = 5;

struct Move {
    downtime: f64,
    total: f64,
}

/// `mkcounter --mem <mib>M` on agent 1, resident, moved to agent 2.
fn agent_move(n: &Net, mib: usize, lazy: bool) -> Move {
    let mem = format!("{mib}M");
    let (pid, mut out) = common::agents::start(n, 1, &["--mem", &mem, "--interval-ms", "50"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while rss_kib(pid) < (mib as u64) << 10 {
        assert!(Instant::now() < deadline, "mkcounter never became resident");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    let r = n.agents[0]
        .call(1, Duration::from_secs(120), |req| Msg::MigrateOut {
            req,
            pid,
            to: 2,
            lazy,
            any_cpu: false,
        })
        .unwrap_or_else(|e| panic!("migrate {mib} MiB (lazy: {lazy}): {e}"));
    // The answer comes when the move is over: in lazy mode once every page
    // has moved and the origin let go of its original.
    let total = ms(t0.elapsed());
    let Msg::MigrateReport {
        new_pid,
        downtime_ns,
        ..
    } = r
    else {
        panic!("{r:?}")
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(new_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the copy");
    // Its end comes back through the origin to the exec stream.
    out.until(Duration::from_secs(30), |_| false);
    Move {
        downtime: downtime_ns as f64 / 1e6,
        total,
    }
}

/// One memcpy of `bytes` between buffers in memory, and into fresh pages.
fn memcpy_floors(bytes: usize) -> (f64, f64) {
    let src = vec![0x5au8; bytes];
    let mut hot = vec![0xa5u8; bytes];
    let t = Instant::now();
    hot.copy_from_slice(std::hint::black_box(&src));
    std::hint::black_box(&mut hot);
    let hot_ms = ms(t.elapsed());
    drop(hot);
    let t = Instant::now();
    let mut fresh: Vec<u8> = Vec::with_capacity(bytes);
    fresh.extend_from_slice(std::hint::black_box(&src));
    std::hint::black_box(&mut fresh);
    (hot_ms, ms(t.elapsed()))
}

#[derive(Default)]
struct Size {
    stop_down: Vec<f64>,
    stop_total: Vec<f64>,
    lazy_down: Vec<f64>,
    lazy_total: Vec<f64>,
    criu_dump: Vec<f64>,
    criu_restore: Vec<f64>,
    hot: Vec<f64>,
    fresh: Vec<f64>,
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing
    // and must stay quick: one small round, no CRIU.
    let full = std::env::args().any(|a| a == "--bench");
    let sizes: &[usize] = if full { &[16, 64, 256] } else { &[4] };
    let rounds = if full { ROUNDS } else { 1 };
    let criu = if !full {
        Err("skipped in a quick run (cargo bench runs it)".to_string())
    } else if std::env::var("MKNODE_BENCH_CRIU").is_ok_and(|v| v == "0") {
        Err("MKNODE_BENCH_CRIU=0".to_string())
    } else {
        criu::Criu::setup()
    };
    if let Err(why) = &criu {
        println!("CRIU not measured: {why}");
    }
    let prog = common::mkcounter();
    let n = net();
    println!(
        "mkcounter (3 threads) moved between two agents over a {} MiB ring window, host kernel; median of {rounds}, ms",
        common::agents::WINDOW >> 20
    );
    println!(
        "{:>5} | {:>9} {:>8} | {:>9} {:>8} | {:>6} {:>7} {:>6} | {:>6} {:>6} | {:>14} {:>16}",
        "MiB",
        "stop-copy",
        "total",
        "lazy",
        "all in",
        "criu d",
        "restore",
        "total",
        "memcpy",
        "fresh",
        "stop total /",
        "lazy downtime /"
    );
    println!(
        "{:>5} | {:>9} {:>8} | {:>9} {:>8} | {:>6} {:>7} {:>6} | {:>6} {:>6} | {:>14} {:>16}",
        "", "downtime", "", "downtime", "", "dump", "", "", "hot", "", "hot, fresh", "criu total"
    );
    for &mib in sizes {
        let mut s = Size::default();
        for _ in 0..rounds {
            let (hot, fresh) = memcpy_floors(mib << 20);
            s.hot.push(hot);
            s.fresh.push(fresh);
            let m = agent_move(&n, mib, false);
            s.stop_down.push(m.downtime);
            s.stop_total.push(m.total);
            let m = agent_move(&n, mib, true);
            s.lazy_down.push(m.downtime);
            s.lazy_total.push(m.total);
            if let Ok(c) = &criu {
                let args = ["--mem", &format!("{mib}M"), "--interval-ms", "50"];
                match c.round(&prog, &args, (mib as u64) << 10) {
                    Ok(r) => {
                        s.criu_dump.push(r.dump_ms);
                        s.criu_restore.push(r.restore_ms);
                    }
                    Err(e) => eprintln!("criu round at {mib} MiB failed: {e}"),
                }
            }
        }
        let criu_total: Vec<f64> = s
            .criu_dump
            .iter()
            .zip(&s.criu_restore)
            .map(|(d, r)| d + r)
            .collect();
        let ct = median(criu_total);
        let (hot, fresh) = (median(s.hot), median(s.fresh));
        let stop_total = median(s.stop_total);
        let lazy_down = median(s.lazy_down);
        println!(
            "{:>5} | {:>9.1} {:>8.1} | {:>9.1} {:>8.1} | {:>6.1} {:>7.1} {:>6.1} | {:>6.1} {:>6.1} | {:>6.1}x {:>5.1}x {:>15}",
            mib,
            median(s.stop_down),
            stop_total,
            lazy_down,
            median(s.lazy_total),
            median(s.criu_dump),
            median(s.criu_restore),
            ct,
            hot,
            fresh,
            stop_total / hot,
            stop_total / fresh,
            if ct.is_nan() {
                "-".to_string()
            } else {
                format!("1/{:.1}", ct / lazy_down)
            },
        );
    }
    println!("targets: lazy downtime at 256 MiB <= 1/10 of CRIU dump+restore; stop-copy total <= 3x the memcpy floor");
    if criu.is_ok() {
        // Leave no mounts behind (PEERS.md); `setup` mounts them again.
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/criu-peer.sh");
        let _ = std::process::Command::new(script).arg("umount").status();
    }
}
