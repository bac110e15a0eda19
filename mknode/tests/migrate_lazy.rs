//! Lazy (post-copy) migration of real processes on this host kernel (root,
//! ptrace, userfaultfd): `mkcounter` is frozen, restored from an image that
//! carries only the pages around its registers, and runs while the rest of
//! its memory is fetched on fault and pushed in the background, over an
//! in-process link (two threads on each side).

mod common;

use std::time::{Duration, Instant};

use common::{checksum, old_tail, pipe, running, seqs, serial, start, Line, Output, T};
use mknode::migrate::{
    channel_link, freeze, image, restore_lazy, Frozen, LazyError, LazyLink, LazyOptions,
    LazyRestored, PageServer, PageSource, PagerOptions, PushPolicy, Pushed, RestoreError,
    SourceError, StdioPlan,
};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

const MIB: usize = 1 << 20;

fn plan_to_pipe() -> (StdioPlan, Output) {
    let (r, w) = pipe();
    let null = common::null;
    (
        StdioPlan {
            stdin: null(),
            stdout: w,
            stderr: null(),
        },
        Output::new(r),
    )
}

fn reap(pid: i32) -> impl FnOnce() {
    move || {
        let _ = waitpid(Pid::from_raw(pid), None);
    }
}

/// The origin's half of a move in flight.
struct Origin {
    frozen: Frozen,
    server: PageServer,
    loops: mknode::migrate::OriginLoops,
}

struct Moved {
    restored: LazyRestored,
    out: Output,
    /// freeze start → restored process running
    downtime: Duration,
    image: image::ImageStats,
    last_old: (u64, Vec<u64>),
    seen: (u64, Vec<u64>),
}

/// Freezes `pid`, writes its lazy image, restores it with a pager fed by an
/// in-process link, and returns both halves; the original stays frozen.
fn lazy_start(pid: i32, out: &Output, push: PushPolicy, opts: PagerOptions) -> (Origin, Moved) {
    let seen = seqs(&out.until(T, |l| matches!(l, Line::Seq { .. })))
        .pop()
        .expect("a seq line");
    let frozen = freeze(pid).expect("freeze");
    let t0 = frozen.frozen_at();
    let mut img = Vec::new();
    let (st, server) = frozen
        .write_lazy_image(&mut img, LazyOptions::default())
        .expect("write_lazy_image");
    let (link, loops) = channel_link(server.clone(), push).expect("link");
    let (plan, new_out) = plan_to_pipe();
    let restored = restore_lazy(&img[..], plan, link, opts).expect("restore_lazy");
    let downtime = t0.elapsed();
    (
        Origin {
            frozen,
            server,
            loops,
        },
        Moved {
            restored,
            out: new_out,
            downtime,
            image: st,
            last_old: (0, Vec::new()),
            seen,
        },
    )
}

/// The whole lazy move: waits until every page was sent, lets the original
/// go, and checks the output continues with no gap or repeat and every
/// worker keeps counting.
fn lazy_move(pid: i32, out: &Output, reap_old: impl FnOnce(), threads: usize) -> Moved {
    let (origin, mut m) = lazy_start(pid, out, PushPolicy::default(), PagerOptions::default());
    assert!(
        origin.server.wait_all_sent(T),
        "origin never sent every page: {:?}",
        origin.server.progress()
    );
    origin.frozen.kill();
    reap_old();
    drop(origin.loops);
    let mut old = vec![Line::Seq {
        seq: m.seen.0,
        counters: m.seen.1.clone(),
        mono_ms: None,
        clock: None,
    }];
    old.extend(out.drain(T));
    m.last_old = old_tail(&old);
    let first = loop {
        match m.out.next(T).expect("restored process prints") {
            Line::Seq { seq, counters, .. } => break (seq, counters),
            Line::Checksum { .. } | Line::Joined | Line::Check(_) | Line::Tree(_) => {}
        }
    };
    assert_eq!(
        first.0,
        m.last_old.0 + 1,
        "sequence continues without gap or repeat"
    );
    assert_eq!(first.1.len(), threads, "one counter per worker");
    let l = m.out.until(T, |l| {
        matches!(l, Line::Seq { counters, .. } if counters.iter().zip(&first.1).all(|(n, o)| n > o))
    });
    let s = seqs(&l);
    for w in s.windows(2) {
        assert_eq!(w[1].0, w[0].0 + 1, "hole or repeat in the new stream");
    }
    m
}

#[test]
fn lazy_round_trip_moves_most_pages_after_resume() {
    let _g = serial();
    let mem = 64 * MIB;
    let (mut child, out) = start(&["--mem", "64M"]);
    running(&out, 3);
    let pid = child.id() as i32;
    let (sum0, bytes) = checksum(pid, &out);
    assert_eq!((bytes, sum0), (mem, testprogs::expected_checksum(mem)));
    assert!(common::rss_kib(pid as u32) >= 64 << 10);

    let m = lazy_move(pid, &out, move || drop(child.wait()), 3);
    let new = m.restored.restored.pid;
    let stats = m.restored.pager.wait().expect("all pages in");
    eprintln!(
        "lazy 64 MiB: downtime {:?}, image {} KiB, all pages in after {:?}; {stats:?}",
        m.downtime,
        m.image.bytes >> 10,
        stats.complete_after
    );
    // The image carried only what resuming needs.
    assert!(
        m.image.bytes < (mem as u64) / 20,
        "eager image {} bytes is not < 5% of {mem}",
        m.image.bytes
    );
    assert!(stats.eager_pages * 20 < stats.total_pages);
    let after = stats.fetched_pages + stats.pushed_pages;
    assert!(
        after >= (mem as u64 / 4096) * 9 / 10,
        "only {after} pages moved after the resume"
    );
    assert!(stats.complete_after.is_some() && !stats.process_exited);
    // Memory is whole (every page of the buffer is read) and the copy runs
    // without the userfaultfd now.
    assert_eq!(checksum(new, &m.out).0, sum0, "memory survived the move");
    let fds = std::fs::read_dir(format!("/proc/{new}/fd"))
        .expect("fd")
        .count();
    assert_eq!(fds, 3, "only stdio: the stub's userfaultfd was closed");
    kill(Pid::from_raw(new), Signal::SIGKILL).expect("kill");
    reap(new)();
}

#[test]
fn three_lazy_round_trips_in_a_row() {
    let _g = serial();
    let (mut child, out) = start(&["--mem", "16M"]);
    running(&out, 3);
    let first = child.id() as i32;
    let (sum0, _) = checksum(first, &out);
    let mut m = lazy_move(first, &out, move || drop(child.wait()), 3);
    for round in 0..3 {
        let pid = m.restored.restored.pid;
        let stats = m.restored.pager.wait().expect("all pages in");
        eprintln!(
            "round {round}: downtime {:?}, image {} KiB, pages fetched {} pushed {} zero {}, done after {:?}",
            m.downtime,
            m.image.bytes >> 10,
            stats.fetched_pages,
            stats.pushed_pages,
            stats.zero_pages,
            stats.complete_after
        );
        assert_eq!(checksum(pid, &m.out).0, sum0, "memory after move {round}");
        if round == 2 {
            kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill");
            reap(pid)();
            break;
        }
        let out = m.out;
        m = lazy_move(pid, &out, reap(pid), 3);
    }
}

/// Starts `mkcounter args`, moves it lazily, and checks the copy: its
/// SIGUSR1 check line is `ok` (a line starting with `check`), every page
/// arrives, and the memory checksum is the original's.
fn moves_lazily_and_checks(args: &[&str], check: &str) {
    let _g = serial();
    let (mut child, out) = start(args);
    running(&out, 3);
    let first = child.id() as i32;
    let (sum0, _) = checksum(first, &out);
    let m = lazy_move(first, &out, move || drop(child.wait()), 3);
    let pid = m.restored.restored.pid;
    kill(Pid::from_raw(pid), Signal::SIGUSR1).expect("SIGUSR1");
    let got = m
        .out
        .until(T, |l| matches!(l, Line::Check(c) if c.starts_with(check)))
        .pop();
    assert_eq!(got, Some(Line::Check(format!("{check}ok"))));
    m.restored.pager.wait().expect("all pages in");
    assert_eq!(checksum(pid, &m.out).0, sum0);
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill");
    reap(pid)();
}

/// Anonymous shared memory moves lazily too: its pages (a zero one among
/// them) come on fault and by the push into shared memory, and it is
/// shared memory again where it arrives.
#[test]
fn anonymous_shared_memory_moves_lazily() {
    moves_lazily_and_checks(&["--mem", "4M", "--shared-mem", "8M"], "shm_check=");
}

/// A memfd mapped shared moves lazily too: its mapped pages come on fault
/// and by the push into the memfd made again, its unmapped content with
/// the image; one memfd again where it arrives.
#[test]
fn a_memfd_moves_lazily() {
    moves_lazily_and_checks(&["--mem", "4M", "--memfd", "8M"], "memfd_check=");
}

#[test]
fn background_push_completes_and_the_origin_lets_go() {
    let _g = serial();
    let (mut child, out) = start(&["--mem", "32M"]);
    running(&out, 3);
    let pid = child.id() as i32;
    let (sum0, _) = checksum(pid, &out);
    let (origin, m) = lazy_start(pid, &out, PushPolicy::default(), PagerOptions::default());
    // Nobody touches the buffer now: it can only arrive by push.
    assert!(
        origin.server.wait_all_sent(T),
        "{:?}",
        origin.server.progress()
    );
    assert!(origin.server.progress().all_sent());
    origin.frozen.kill();
    // The original is gone: reaped, and no /proc entry is left.
    let st = child.wait().expect("reap");
    assert!(!st.success());
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "original pid {pid} still exists"
    );
    let new = m.restored.restored.pid;
    let stats = m.restored.pager.wait().expect("all pages in");
    assert!(
        stats.pushed_pages >= (32 * MIB as u64 / 4096) * 9 / 10,
        "{stats:?}"
    );
    assert_eq!(
        stats.fetched_pages
            + stats.pushed_pages
            + stats.eager_pages
            + stats.gone_pages
            + stats.lost_pages,
        stats.total_pages
    );
    assert_eq!(checksum(new, &m.out).0, sum0);
    drop(origin.loops);
    kill(Pid::from_raw(new), Signal::SIGKILL).expect("kill");
    reap(new)();
}

/// Waits for `pid` (our child) to end; its wait status.
fn ends_within(pid: i32, t: Duration) -> Option<WaitStatus> {
    let end = Instant::now() + t;
    while Instant::now() < end {
        match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(20)),
            Ok(s) => return Some(s),
            Err(e) => panic!("waitpid {pid}: {e}"),
        }
    }
    None
}

#[test]
fn origin_dying_after_resume_kills_the_copy_with_a_clear_error() {
    let _g = serial();
    let (mut child, out) = start(&["--mem", "16M"]);
    running(&out, 3);
    let pid = child.id() as i32;
    // No pushes: the buffer moves only when touched.
    let push = PushPolicy {
        enabled: false,
        ..PushPolicy::default()
    };
    let (origin, m) = lazy_start(pid, &out, push, PagerOptions::default());
    let new = m.restored.restored.pid;
    // It runs on the pages it has (and fetches a few).
    m.out.until(T, |l| matches!(l, Line::Seq { .. }));
    assert!(!origin.server.progress().all_sent());
    // The origin dies mid-transfer.
    origin.loops.stop();
    origin.frozen.kill();
    child.wait().expect("reap original");
    // The checksum would touch pages that can no longer come.
    let _ = kill(Pid::from_raw(new), Signal::SIGUSR1);
    let st = ends_within(new, T).expect("the copy must not hang");
    assert_eq!(
        st,
        WaitStatus::Signaled(Pid::from_raw(new), Signal::SIGKILL, false)
    );
    let e = m.restored.pager.wait().expect_err("origin lost");
    assert!(matches!(e, LazyError::OriginLost { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("origin lost after resume")
            && msg.contains("killed rather than left hanging on a missing page"),
        "{msg}"
    );
}

/// A source whose origin stopped answering but kept the link open.
struct Silent;

impl PageSource for Silent {
    fn fetch(&mut self, _: u64, _: &mut [u8], _: Instant) -> Result<(), SourceError> {
        // Ignores its deadline too: the pager's watchdog must cope.
        std::thread::sleep(Duration::from_secs(3600));
        Err(SourceError::Disconnected)
    }
}

#[test]
fn origin_that_stops_answering_gets_the_copy_killed_not_hung() {
    let _g = serial();
    let (mut child, out) = start(&["--mem", "8M"]);
    running(&out, 3);
    let pid = child.id() as i32;
    out.until(T, |l| matches!(l, Line::Seq { .. }));
    let frozen = freeze(pid).expect("freeze");
    let mut img = Vec::new();
    frozen
        .write_lazy_image(&mut img, LazyOptions::default())
        .expect("image");
    let (_push_tx, pushes) = crossbeam_channel::bounded::<Pushed>(1);
    let link = LazyLink {
        source: Box::new(Silent),
        pushes,
    };
    let (plan, new_out) = plan_to_pipe();
    let timeout = Duration::from_millis(1500);
    let opts = PagerOptions {
        fetch_timeout: timeout,
        ..PagerOptions::default()
    };
    let t0 = Instant::now();
    match restore_lazy(&img[..], plan, link, opts) {
        Ok(r) => {
            // It ran; the first page it needs never comes.
            frozen.kill();
            child.wait().expect("reap original");
            let new = r.restored.pid;
            let _ = kill(Pid::from_raw(new), Signal::SIGUSR1);
            let st = ends_within(new, T).expect("the copy must not hang");
            assert_eq!(
                st,
                WaitStatus::Signaled(Pid::from_raw(new), Signal::SIGKILL, false)
            );
            let e = r.pager.wait().expect_err("timeout");
            assert!(
                matches!(e, LazyError::OriginLost { source: SourceError::Timeout(t), .. } if t == timeout),
                "{e:?}"
            );
            assert!(t0.elapsed() >= timeout);
            drop(new_out);
        }
        Err(e) => {
            // Restore itself needed a lazy page: that is before resume, and
            // the original must run on.
            assert!(
                matches!(
                    e,
                    RestoreError::Lazy(LazyError::OriginLostBeforeResume { .. })
                ),
                "{e:?}"
            );
            drop(frozen);
            out.until(T, |l| matches!(l, Line::Seq { .. }));
            child.kill().expect("kill");
            child.wait().expect("wait");
        }
    }
}

#[test]
fn failure_before_resume_leaves_the_original_running() {
    let _g = serial();
    let (mut child, out) = start(&["--mem", "8M"]);
    running(&out, 3);
    let pid = child.id() as i32;
    let (sum0, _) = checksum(pid, &out);
    let before = seqs(&out.until(T, |l| matches!(l, Line::Seq { .. })));
    let frozen = freeze(pid).expect("freeze");
    let mut img = Vec::new();
    let (_, server) = frozen
        .write_lazy_image(&mut img, LazyOptions::default())
        .expect("image");
    // Truncated: the stub is built, registered, then the stream ends.
    let (link, loops) = channel_link(server.clone(), PushPolicy::default()).expect("link");
    let cut = &img[..img.len() * 2 / 3];
    let e = restore_lazy(
        cut,
        StdioPlan::null().expect("null"),
        link,
        PagerOptions::default(),
    )
    .expect_err("truncated image");
    assert!(
        matches!(e, RestoreError::Image(image::ImageError::Truncated { .. })),
        "{e:?}"
    );
    // A stop-and-copy restore refuses a lazy image outright.
    let e = mknode::migrate::restore(&img[..], StdioPlan::null().expect("null"))
        .expect_err("lazy image without an origin");
    assert!(matches!(e, RestoreError::LazyImage), "{e:?}");
    loops.stop();
    drop(frozen); // the migration failed: the original resumes
                  // ... and the page server no longer hands out its (changing) memory.
    let mut page = vec![0u8; 4096];
    let heap = server.progress();
    assert!(!heap.all_sent());
    let after = seqs(&out.until(
        T,
        |l| matches!(l, Line::Seq { seq, .. } if *seq > before[0].0 + 20),
    ));
    assert_eq!(
        after[0].0,
        before.last().expect("line").0 + 1,
        "no hole, no repeat"
    );
    assert_eq!(checksum(pid, &out).0, sum0);
    let any = image::decode_all(&img[..]).expect("decode");
    let m = any
        .meta
        .mappings
        .iter()
        .find(|m| m.prot == 3 && m.kind == image::MappingKind::Heap)
        .or_else(|| any.meta.mappings.iter().find(|m| m.prot == 3))
        .expect("a writable mapping");
    assert!(
        server.read(m.start, &mut page).is_err(),
        "served after release"
    );
    child.kill().expect("kill");
    child.wait().expect("wait");
}
