//! Where a migration's time goes, library level (no agents, no ring):
//! `mkcounter` with 16, 64 and 256 MiB of
//! resident, non-zero heap (plus 3 busy threads) is frozen, imaged into
//! memory, restored as a new process, and the original killed — once
//! stop-and-copy (every page in the image) and once lazy (post-copy: the
//! image carries the pages around the registers, the rest is pushed in the
//! background and fetched on fault over an in-process link).
//!
//! Printed per size (median of ROUNDS): freeze (first thread seized → all
//! state read), image write, restore, the downtime (first thread seized →
//! restored process running), the total (from the call to `freeze`, whose
//! pre-checks run while the process still runs, until the original is
//! reaped), the image size, and the floor measured in the same run: one
//! `memcpy` of the resident bytes between two pre-faulted buffers.
//! A stop-and-copy needs at least two such copies (out of the origin, into
//! the new process) plus a page fault per destination page. For lazy mode,
//! "total" is until every page has moved (the pager closed its
//! userfaultfd and the origin sent its last page), when the original is
//! killed.
//!
//! The comparison with CRIU, over agents and a ring as `mkctl migrate`
//! runs, is the `migrate` bench; this one splits the cost into phases.
//!
//! The image buffer is reused and pre-faulted (a ring or transport buffer
//! is); the destination's pages are fresh, as they are on a real move.
//!
//! Run: `cargo bench -p mknode --bench migrate_phases` (root; ptrace).

#[path = "../tests/common/mod.rs"]
mod common;

use common::{median, ms, rss_kib};

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mknode::migrate::{
    channel_link, freeze, restore, restore_lazy, ImageOptions, LazyOptions, PagerOptions,
    PushPolicy, StdioPlan,
};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;

const ROUNDS: usize = 5;

struct Round {
    freeze: f64,
    dump: f64,
    restore: f64,
    downtime: f64,
    total: f64,
    image_mib: f64,
}

fn spawn_resident(mib: usize) -> std::process::Child {
    let child = Command::new(common::mkcounter())
        .args(["--mem", &format!("{mib}M"), "--interval-ms", "50"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mkcounter");
    let want = (mib as u64) << 10;
    let deadline = Instant::now() + Duration::from_secs(60);
    while rss_kib(child.id()) < want {
        assert!(Instant::now() < deadline, "mkcounter never became resident");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    child
}

/// A resident mkcounter, frozen: the process, its `Frozen`, and the times
/// of the call to `freeze`, of the first thread stopping (the downtime
/// starts there, not at the pre-check) and of `freeze` returning.
fn freeze_resident(
    mib: usize,
) -> (
    std::process::Child,
    mknode::migrate::Frozen,
    Instant,
    Instant,
    Instant,
) {
    let child = spawn_resident(mib);
    let called = Instant::now();
    let frozen = freeze(child.id() as i32).expect("freeze");
    let returned = Instant::now();
    let stopped = frozen.frozen_at();
    (child, frozen, called, stopped, returned)
}

/// Kills and reaps a restored process (a child of this one).
fn end_restored(pid: i32) {
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill restored");
    let _ = waitpid(Pid::from_raw(pid), None);
}

fn one_round(mib: usize, img: &mut Vec<u8>) -> Round {
    let (mut child, frozen, t00, t0, t1) = freeze_resident(mib);
    img.clear();
    frozen
        .write_image(&mut *img, ImageOptions::default())
        .expect("write_image");
    let t2 = Instant::now();
    let r = restore(&img[..], StdioPlan::null().expect("null")).expect("restore");
    let t3 = Instant::now();
    frozen.kill();
    child.wait().expect("reap origin");
    let t4 = Instant::now();

    end_restored(r.pid);
    Round {
        freeze: ms(t1 - t0),
        dump: ms(t2 - t1),
        restore: ms(t3 - t2),
        downtime: ms(t3 - t0),
        total: ms(t4 - t00),
        image_mib: img.len() as f64 / f64::from(1 << 20),
    }
}

/// A lazy move: downtime ends when the copy runs; total when every page has
/// moved and the original is killed.
fn lazy_round(mib: usize, img: &mut Vec<u8>) -> Round {
    let (mut child, frozen, t00, t0, t1) = freeze_resident(mib);
    img.clear();
    let (_, server) = frozen
        .write_lazy_image(&mut *img, LazyOptions::default())
        .expect("write_lazy_image");
    let t2 = Instant::now();
    let (link, loops) = channel_link(server.clone(), PushPolicy::default()).expect("link");
    let r = restore_lazy(
        &img[..],
        StdioPlan::null().expect("null"),
        link,
        PagerOptions::default(),
    )
    .expect("restore_lazy");
    let t3 = Instant::now();
    let pid = r.restored.pid;
    let stats = r.pager.wait().expect("all pages in");
    assert!(
        server.wait_all_sent(Duration::from_secs(60)),
        "origin never sent all"
    );
    assert!(stats.complete_after.is_some());
    frozen.kill();
    child.wait().expect("reap origin");
    let t4 = Instant::now();
    drop(loops);

    end_restored(pid);
    Round {
        freeze: ms(t1 - t0),
        dump: ms(t2 - t1),
        restore: ms(t3 - t2),
        downtime: ms(t3 - t0),
        total: ms(t4 - t00),
        image_mib: img.len() as f64 / f64::from(1 << 20),
    }
}

type RoundFn = fn(usize, &mut Vec<u8>) -> Round;

fn memcpy_floor(bytes: usize) -> f64 {
    let src = vec![0x5au8; bytes];
    let mut dst = vec![0xa5u8; bytes];
    let mut best = f64::MAX;
    for _ in 0..ROUNDS {
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
        best = best.min(ms(t.elapsed()));
    }
    best
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing
    // and must stay quick: one small round.
    let full = std::env::args().any(|a| a == "--bench");
    let sizes: &[usize] = if full { &[16, 64, 256] } else { &[4] };
    let rounds = if full { ROUNDS } else { 1 };
    println!(
        "migration of mkcounter (3 threads), host kernel, image in memory; median of {rounds} (ms)"
    );
    println!(
        "{:>8} {:>10} {:>8} {:>8} {:>8} {:>9} {:>8} {:>10} {:>12} {:>10}",
        "MiB",
        "mode",
        "freeze",
        "image",
        "restore",
        "downtime",
        "total",
        "image MiB",
        "memcpy floor",
        "downtime/floor"
    );
    for &mib in sizes {
        let floor = memcpy_floor(mib << 20);
        for mode in ["stop-copy", "lazy"] {
            // The image goes to a buffer that is already faulted in, as a
            // ring or a reused transport buffer would be. Lazy needs only
            // its eager pages (~160 KiB): its restorer does not hold a
            // buffer the size of the process, which the stub's fork would
            // copy page tables of and then unmap.
            let (mut img, f): (Vec<u8>, RoundFn) = match mode {
                "lazy" => (vec![1u8; 1 << 20], lazy_round),
                _ => (vec![1u8; (mib + 8) << 20], one_round),
            };
            let rs: Vec<Round> = (0..rounds).map(|_| f(mib, &mut img)).collect();
            drop(img);
            let med = |f: fn(&Round) -> f64| median(rs.iter().map(f).collect());
            let downtime = med(|r| r.downtime);
            println!(
                "{:>8} {:>10} {:>8.2} {:>8.2} {:>8.2} {:>9.2} {:>8.2} {:>10.2} {:>12.2} {:>10.1}x",
                mib,
                mode,
                med(|r| r.freeze),
                med(|r| r.dump),
                med(|r| r.restore),
                downtime,
                med(|r| r.total),
                med(|r| r.image_mib),
                floor,
                downtime / floor
            );
        }
    }
}
