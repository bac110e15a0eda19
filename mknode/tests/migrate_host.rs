//! Capture and restore of real processes on this host kernel (root, ptrace).
//! The process moved is `testprogs`'s `mkcounter`; each test reads its
//! stdout lines and checks the sequence, the counters and the memory
//! checksum across the move.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{checksum, mkcounter, old_tail, pipe, running, seqs, serial, start, Line, Output, T};
use mknode::migrate::{
    check_migratable, freeze, image, restore, CaptureError, ImageOptions, Refusal, RestoreError,
    StdioPlan,
};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;

fn plan_to_pipe() -> (StdioPlan, Output) {
    let (r, w) = pipe();
    let plan = StdioPlan {
        stdin: std::fs::File::open("/dev/null").expect("null").into(),
        stdout: w,
        // Not the harness's stderr: it may be a file, which the next
        // migration would refuse.
        stderr: std::fs::File::options()
            .write(true)
            .open("/dev/null")
            .expect("null")
            .into(),
    };
    (plan, Output::new(r))
}

/// Moves the process `pid` whose output is `out` through an in-memory image
/// (and a file image when `via_file`), kills the original, and checks the
/// new output continues at the next sequence number.
fn migrate(
    pid: i32,
    out: &Output,
    reap: impl FnOnce(),
    threads: usize,
    via_file: bool,
) -> (i32, Output) {
    let (p, o, _) = migrate_n(pid, out, reap, threads, threads + 1, via_file);
    (p, o)
}

/// As [`migrate`], for a process with `total` threads of which `counters`
/// print counters.
fn migrate_n(
    pid: i32,
    out: &Output,
    reap: impl FnOnce(),
    threads: usize,
    total: usize,
    via_file: bool,
) -> (i32, Output, image::ImageMeta) {
    // The last line seen before the freeze; lines printed after it are
    // drained from the old pipe below.
    let seen = seqs(&out.until(T, |l| matches!(l, Line::Seq { .. })))
        .pop()
        .expect("a seq line");
    let frozen = freeze(pid).expect("freeze");
    assert_eq!(frozen.threads().len(), total);
    let meta = frozen.meta().clone();
    let mut img = Vec::new();
    let st = frozen
        .write_image(&mut img, ImageOptions::default())
        .expect("write_image");
    assert_eq!(st.bytes, img.len() as u64);
    let (plan, new_out) = plan_to_pipe();
    let restored = if via_file {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("proc.img");
        let mut f = std::fs::File::create(&path).expect("create");
        let st2 = frozen
            .write_image(std::io::BufWriter::new(&mut f), ImageOptions::default())
            .expect("write_image to file");
        f.flush().expect("flush");
        assert_eq!(st2.checksum, st.checksum, "same frozen process, same image");
        restore(
            std::io::BufReader::new(std::fs::File::open(&path).expect("open")),
            plan,
        )
    } else {
        restore(&img[..], plan)
    }
    .expect("restore");
    assert_eq!(restored.threads.len(), total);
    assert_eq!(restored.stats.data_pages, st.data_pages);
    frozen.kill();
    reap();
    let mut old = vec![Line::Seq {
        seq: seen.0,
        counters: seen.1,
        mono_ms: None,
        clock: None,
    }];
    old.extend(out.drain(T));
    let (last, last_counters) = old_tail(&old);
    // The new stream starts right after.
    let first = loop {
        match new_out.next(T).expect("restored process prints") {
            Line::Seq { seq, counters, .. } => break (seq, counters),
            Line::Checksum { .. } | Line::Joined | Line::Check(_) | Line::Tree(_) => {}
        }
    };
    assert_eq!(
        first.0,
        last + 1,
        "sequence continues without gap or repeat"
    );
    assert_eq!(first.1.len(), threads, "one counter per worker");
    for (a, b) in first.1.iter().zip(&last_counters) {
        assert!(a >= b, "counter went back: {a} < {b}");
    }
    // Every thread keeps counting on the new process.
    let l = new_out.until(T, |l| {
        matches!(l, Line::Seq { counters, .. } if counters.iter().zip(&first.1).all(|(n, o)| n > o))
    });
    let s = seqs(&l);
    for w in s.windows(2) {
        assert_eq!(w[1].0, w[0].0 + 1, "hole or repeat in the new stream");
    }
    (restored.pid, new_out, meta)
}

/// The kernel-held state capture reads back from a restored process is the
/// state it restored.
fn same_kernel_state(a: &image::ImageMeta, b: &image::ImageMeta) {
    assert_eq!(a.process.sigactions, b.process.sigactions, "signal actions");
    assert_eq!(a.process.mm, b.process.mm, "mm fields");
    assert_eq!(a.process.auxv, b.process.auxv, "auxv");
    assert_eq!(a.threads.len(), b.threads.len());
    for (x, y) in a.threads.iter().zip(&b.threads) {
        assert!(x.rseq.abi_pointer != 0, "glibc registers rseq");
        assert_eq!(x.rseq, y.rseq, "rseq of thread {}", x.tid);
        assert_eq!(x.altstack, y.altstack, "sigaltstack of thread {}", x.tid);
        assert_eq!(
            x.robust_list, y.robust_list,
            "robust list of thread {}",
            x.tid
        );
        assert_eq!(x.clear_child_tid, y.clear_child_tid, "clear_child_tid");
        assert_eq!(x.sigmask, y.sigmask, "sigmask of thread {}", x.tid);
        assert_eq!(x.comm, y.comm, "name of thread {}", x.tid);
        assert_eq!(x.regs[21], y.regs[21], "fs_base of thread {}", x.tid);
    }
}

fn reap(pid: i32) -> impl FnOnce() {
    move || {
        let _ = waitpid(Pid::from_raw(pid), None);
    }
}

#[test]
fn three_threads_three_round_trips() {
    let _g = serial();
    let mem = 16usize << 20;
    let (mut child, out) = start(&["--mem", "16M"]);
    running(&out, 3);
    let (sum0, bytes) = checksum(child.id() as i32, &out);
    assert_eq!(bytes, mem);
    assert_eq!(sum0, testprogs::expected_checksum(mem));

    let first = child.id() as i32;
    let (mut pid, mut out, mut meta) =
        migrate_n(first, &out, move || drop(child.wait()), 3, 4, true);
    for _ in 0..2 {
        assert_eq!(checksum(pid, &out).0, sum0, "memory survived the move");
        let (p, o, m) = migrate_n(pid, &out, reap(pid), 3, 4, false);
        same_kernel_state(&meta, &m);
        pid = p;
        out = o;
        meta = m;
    }
    assert_eq!(checksum(pid, &out).0, sum0);
    // Stop-and-copy places pages through a userfaultfd: none of its
    // registrations may outlive the restore (a later fault would hang).
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
    let flags: Vec<&str> = smaps
        .lines()
        .filter(|l| l.starts_with("VmFlags:"))
        .collect();
    assert!(!flags.is_empty());
    assert!(
        flags
            .iter()
            .all(|l| !l.split_whitespace().any(|f| f == "um")),
        "a mapping is still registered with a userfaultfd:\n{}",
        flags.join("\n")
    );
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill");
    reap(pid)();
}

#[test]
fn single_threaded_round_trip() {
    let _g = serial();
    let (mut child, out) = start(&["--mem", "1M", "--threads", "0"]);
    out.until(T, |l| matches!(l, Line::Seq { seq, .. } if *seq > 3));
    let (sum0, _) = checksum(child.id() as i32, &out);
    let (pid, out) = migrate(
        child.id() as i32,
        &out,
        move || drop(child.wait()),
        0,
        false,
    );
    assert_eq!(checksum(pid, &out).0, sum0);
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill");
    reap(pid)();
}

/// A descriptor the program holds for a moment (here a socket, for 30 ms)
/// is no reason to refuse: the freeze asks again before it says no. It
/// used to refuse at once. Seen in the suite: mkcounter reads boot_id each
/// line, and the file closed between the check's listing and its stat.
#[test]
fn a_file_open_for_a_moment_does_not_refuse_the_freeze() {
    let _g = serial();
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import os, socket, time\nos.closerange(3, 1024)\ns = socket.socket()\nprint('open', flush=True)\ntime.sleep(0.03)\ns.close()\ntime.sleep(60)",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().expect("stdout")),
        &mut first,
    )
    .expect("read");
    assert_eq!(first, "open\n");
    let pid = child.id() as i32;
    let f = freeze(pid);
    assert!(f.is_ok(), "{:?}", f.err());
    drop(f);
    child.kill().expect("kill");
    child.wait().expect("wait");
}

#[test]
fn refused_process_is_untouched() {
    let _g = serial();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let script = format!(
        "exec 3<>/tmp/mk-refused-$$ 4<>/dev/tcp/127.0.0.1/{port}; rm /tmp/mk-refused-$$; exec {} --mem 1M",
        mkcounter().display()
    );
    let mut child = Command::new("bash")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("bash");
    let out = Output::new(child.stdout.take().expect("stdout"));
    out.until(T, |l| matches!(l, Line::Seq { seq, .. } if *seq > 2));
    let pid = child.id() as i32;
    let e = check_migratable(pid).expect_err("must refuse");
    let msg = e.to_string();
    assert!(
        msg.contains("fd 3 is open on a deleted file (/tmp/mk-refused-"),
        "{msg}"
    );
    assert!(msg.contains("fd 4 is a socket (socket:["), "{msg}");
    match freeze(pid) {
        Err(CaptureError::Refused(Refusal::Blocked { blockers, .. })) => {
            // At least the two above; a runner may leak one more descriptor
            // into every process it starts (seen under CI's job runner).
            assert!(blockers.len() >= 2, "{blockers:?}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Untouched: not traced, still printing with no hole.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    assert!(status.contains("TracerPid:\t0"), "{status}");
    let l = out.until(T, |l| matches!(l, Line::Seq { seq, .. } if *seq > 20));
    old_tail(&l);
    child.kill().expect("kill");
    child.wait().expect("wait");
}

#[test]
fn failed_restore_leaves_original_running() {
    let _g = serial();
    // With bytes in flight in a pipe and in socket pairs: capture reads
    // them without taking them, so the original still has every one.
    let (mut child, out) = start(&[
        "--mem",
        "4M",
        "--pipe-inflight",
        "40001",
        "--socketpairs",
        "40001",
    ]);
    running(&out, 3);
    let pid = child.id() as i32;
    let (sum0, _) = checksum(pid, &out);
    let before = seqs(&out.until(T, |l| matches!(l, Line::Seq { .. })));
    let frozen = freeze(pid).expect("freeze");
    let mut img = Vec::new();
    frozen
        .write_image(&mut img, ImageOptions::default())
        .expect("image");
    // Truncated in the middle of the pages: the stub is built, then the
    // stream ends.
    let cut = &img[..img.len() * 2 / 3];
    let e = restore(cut, StdioPlan::null().expect("null")).expect_err("truncated image");
    assert!(
        matches!(e, RestoreError::Image(image::ImageError::Truncated { .. })),
        "{e:?}"
    );
    // One flipped byte: caught by the checksum before anything runs.
    let mut bad = img.clone();
    let n = bad.len();
    bad[n / 2] ^= 0x40;
    let e = restore(&bad[..], StdioPlan::null().expect("null")).expect_err("corrupt image");
    assert!(matches!(e, RestoreError::Image(_)), "{e:?}");
    drop(frozen); // the migration failed: the original resumes
    let after = seqs(&out.until(
        T,
        |l| matches!(l, Line::Seq { seq, .. } if *seq > before[0].0 + 20),
    ));
    assert_eq!(
        after[0].0,
        before.last().expect("line").0 + 1,
        "no hole, no repeat"
    );
    assert!(after
        .last()
        .expect("line")
        .1
        .iter()
        .zip(&before[0].1)
        .all(|(a, b)| a > b));
    assert_eq!(checksum(pid, &out).0, sum0);
    let checks: Vec<String> = out
        .until(
            T,
            |l| matches!(l, Line::Check(c) if c.starts_with("socket_check=")),
        )
        .into_iter()
        .filter_map(|l| match l {
            Line::Check(c) => Some(c),
            _ => None,
        })
        .collect();
    assert_eq!(
        checks,
        ["pipe_check=ok shared=1", "socket_check=ok"],
        "the original lost bytes in flight"
    );
    child.kill().expect("kill");
    child.wait().expect("wait");
}

/// `img` encoded again after `f` changed its metadata (another kernel, as
/// far as the restore can tell).
fn reencoded(img: &[u8], f: impl FnOnce(&mut image::ImageMeta)) -> Vec<u8> {
    let mut d = image::decode_all(img).expect("decode");
    f(&mut d.meta);
    let mut w = image::ImageWriter::new(Vec::new(), &d.meta.header).expect("w");
    w.process(&d.meta.process).expect("p");
    for t in &d.meta.threads {
        w.thread(t).expect("t");
    }
    for m in &d.meta.mappings {
        w.mapping(m).expect("m");
    }
    // Data and zero runs, in address order as the writer wants them.
    let mut runs: Vec<(u64, Result<&[u8], u64>)> =
        d.data.iter().map(|(a, b)| (*a, Ok(&b[..]))).collect();
    runs.extend(d.zero.iter().map(|(a, n)| (*a, Err(*n))));
    runs.sort_by_key(|r| r.0);
    for (a, r) in runs {
        match r {
            Ok(b) => w.data(a, b).expect("d"),
            Err(n) => w.zero(a, n).expect("z"),
        }
    }
    w.finish().expect("finish").0
}

/// `(start, end, perms)` of the mapping named `name` in `pid`, or of the
/// one starting at `at`.
fn mapping(pid: i32, name: Option<&str>, at: Option<u64>) -> Option<(u64, u64, String)> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    maps.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (range, perms) = (f.next()?, f.next()?);
        let (a, b) = range.split_once('-')?;
        let (a, b) = (
            u64::from_str_radix(a, 16).ok()?,
            u64::from_str_radix(b, 16).ok()?,
        );
        let ok = name.is_none_or(|n| l.ends_with(n)) && at.is_none_or(|x| x == a);
        ok.then(|| (a, b, perms.to_string()))
    })
}

/// A thread calling `clock_gettime` in a loop is mostly inside the vDSO;
/// the freeze steps it out every time (restored on another kernel build,
/// the code between the old vDSO's entries leads nowhere).
#[test]
fn a_freeze_never_leaves_a_thread_inside_the_vdso() {
    let _g = serial();
    let (mut child, out) = start(&["--mem", "1M", "--threads", "1", "--clock-spin"]);
    running(&out, 1);
    let pid = child.id() as i32;
    let (a, b, _) = mapping(pid, Some("[vdso]"), None).expect("[vdso]");
    for i in 0..100 {
        let frozen = freeze(pid).expect("freeze");
        for t in &frozen.meta().threads {
            // The size the preflight compares is the size a restore
            // writes back.
            assert_eq!(t.fp.len(), mknode::migrate::cpu::fp_state_size() as usize);
            assert_eq!(
                frozen.meta().process.xfeatures,
                mknode::migrate::cpu::xfeatures()
            );
            let rip = t.regs[16];
            assert!(
                !(a..b).contains(&rip),
                "freeze {i}: thread {} left at {rip:#x}, inside [vdso] {a:#x}-{b:#x}",
                t.tid
            );
        }
        drop(frozen);
    }
    // And it goes on calling it: the steps did not break it.
    let spins = |out: &Output| match out.until(T, |l| matches!(l, Line::Seq { .. })).pop() {
        Some(Line::Seq { clock: Some(c), .. }) => c,
        l => panic!("{l:?}"),
    };
    let (s0, back0) = spins(&out);
    std::thread::sleep(Duration::from_millis(50));
    let (s1, back1) = spins(&out);
    assert!(
        s1 > s0 && back0 == 0 && back1 == 0,
        "{s0} {s1} {back0} {back1}"
    );
    child.kill().expect("kill");
    child.wait().expect("wait");
}

/// An image from another kernel build (its release changed here: the same
/// code runs as for a real one) is restored through the vDSO proxy: this
/// kernel's vDSO lands elsewhere, the old one's bytes stay at the old
/// address with each entry redirected, and the process, whose libc calls
/// the old entries, goes on telling the time; twice in a row (the second
/// move redirects the first one's redirection).
#[test]
fn a_process_from_another_kernel_build_runs_through_the_vdso_proxy() {
    let _g = serial();
    let (mut child, out) = start(&["--mem", "1M", "--threads", "1", "--clock-spin"]);
    running(&out, 1);
    let mut pid = child.id() as i32;
    let mut out = out;
    let (old, old_end, _) = mapping(pid, Some("[vdso]"), None).expect("[vdso]");
    let mut reap_old: Box<dyn FnOnce()> = Box::new(move || {
        let _ = child.kill();
        let _ = child.wait();
    });
    for hop in 0..2 {
        let seen = seqs(&out.until(T, |l| matches!(l, Line::Seq { .. })))
            .pop()
            .unwrap();
        let frozen = freeze(pid).expect("freeze");
        let mut img = Vec::new();
        frozen
            .write_image(&mut img, ImageOptions::default())
            .expect("image");
        let foreign = reencoded(&img, |m| {
            m.header.kernel.release = format!("5.10.{hop}-other")
        });
        let (plan, new_out) = plan_to_pipe();
        let r = restore(&foreign[..], plan).expect("restore through the proxy");
        frozen.kill();
        reap_old();
        // The old vDSO's place: its bytes, executable, not the kernel's.
        let (a, b, perms) = mapping(r.pid, None, Some(old)).expect("old vDSO place mapped");
        assert_eq!((a, b, perms.as_str()), (old, old_end, "r-xp"), "hop {hop}");
        assert!(mapping(r.pid, Some("[vdso]"), Some(old)).is_none());
        let (v, _, _) = mapping(r.pid, Some("[vdso]"), None).expect("this kernel's [vdso]");
        assert_ne!(v, old, "hop {hop}");
        // It goes on: next line, clock never back, still spinning, and
        // CLOCK_MONOTONIC where it was.
        let lines = new_out.until(
            T,
            |l| matches!(l, Line::Seq { clock: Some((s, _)), .. } if *s > 0),
        );
        let lines = [lines, new_out.until(T, |l| matches!(l, Line::Seq { .. }))].concat();
        let (mut last_spins, mut last_mono) = (0, 0);
        for l in &lines {
            if let Line::Seq {
                seq,
                clock: Some((spins, back)),
                mono_ms: Some(mono),
                ..
            } = l
            {
                assert!(*seq > seen.0, "hop {hop}: seq {seq} after {}", seen.0);
                assert_eq!(*back, 0, "hop {hop}: the clock went back");
                assert!(*spins >= last_spins && *mono >= last_mono);
                (last_spins, last_mono) = (*spins, *mono);
            }
        }
        let p = r.pid;
        reap_old = Box::new(move || {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            let _ = waitpid(Pid::from_raw(p), None);
        });
        pid = r.pid;
        out = new_out;
    }
    reap_old();
}

/// An image carries the CPU extensions the program picked its code for:
/// a CPU without one of them refuses to restore it, naming it; a copy
/// restored from an image that names fewer than this CPU has keeps those
/// fewer (its code was picked for them, not for this CPU), so its next
/// image names them again (and a next destination is asked only for them).
#[test]
fn an_image_keeps_the_extensions_its_code_was_picked_for() {
    use mknode::migrate::cpu;
    let _g = serial();
    let (mut child, out) = start(&["--mem", "1M", "--threads", "1"]);
    running(&out, 1);
    let frozen = freeze(child.id() as i32).expect("freeze");
    assert_eq!(frozen.meta().process.cpu, cpu::user_features());
    let mut img = Vec::new();
    frozen
        .write_image(&mut img, ImageOptions::default())
        .expect("image");
    drop(frozen);
    let here = cpu::user_features();
    let (absent, _) = common::wider_than_this_cpu();
    let wider = reencoded(&img, |m| m.process.cpu.push(absent.clone()));
    let e = restore(&wider[..], StdioPlan::null().expect("null")).expect_err("wider");
    assert!(matches!(&e, RestoreError::Cpu(x) if *x == absent), "{e:?}");
    assert!(e.to_string().contains("this CPU lacks"), "{e}");
    let fewer = reencoded(&img, |m| m.process.cpu = vec!["sse2".into()]);
    child.kill().expect("kill");
    child.wait().expect("wait");
    let (plan, new_out) = plan_to_pipe();
    let r = restore(&fewer[..], plan).expect("restore");
    new_out.until(T, |l| matches!(l, Line::Seq { .. }));
    assert_eq!(cpu::picked(r.pid), ["sse2"]);
    let again = freeze(r.pid).expect("freeze the copy");
    assert_eq!(again.meta().process.cpu, ["sse2"]);
    again.kill();
    let _ = waitpid(Pid::from_raw(r.pid), None);
    assert_eq!(cpu::picked(std::process::id() as i32), here);
}

/// Without the old vDSO's bytes (an image that does not carry them), an
/// image from another build is refused by what differs, and nothing runs.
#[test]
fn an_image_from_another_build_without_its_vdso_is_refused() {
    let _g = serial();
    let (mut child, out) = start(&["--mem", "1M", "--threads", "1"]);
    running(&out, 1);
    let frozen = freeze(child.id() as i32).expect("freeze");
    let mut img = Vec::new();
    frozen
        .write_image(&mut img, ImageOptions::default())
        .expect("image");
    drop(frozen);
    let foreign = reencoded(&img, |m| {
        m.header.kernel.release = "5.10.0-other".into();
        m.process.vdso.clear();
    });
    let e = restore(&foreign[..], StdioPlan::null().expect("null")).expect_err("foreign");
    assert!(
        e.to_string().contains("carries no vDSO") && e.to_string().contains("5.10.0-other"),
        "{e}"
    );
    child.kill().expect("kill");
    child.wait().expect("wait");
}

#[test]
fn pthread_join_of_a_migrated_thread_returns() {
    let _g = serial();
    // 3 counters + a thread that exits 1.5 s after start + its joiner.
    let (mut child, out) = start(&["--mem", "1M", "--join-after-ms", "1500"]);
    running(&out, 3);
    let (pid, out, _) = migrate_n(
        child.id() as i32,
        &out,
        move || drop(child.wait()),
        3,
        6,
        false,
    );
    // The kernel clears the (original) tid word through CLONE_CHILD_CLEARTID
    // when the moved thread exits, and glibc's join wakes up.
    out.until(T, |l| matches!(l, Line::Joined));
    // Both the joined thread and its joiner have exited: main + 3 counters.
    let tasks = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("task")
            .count()
    };
    for _ in 0..100 {
        if tasks() == 4 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(tasks(), 4);
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill");
    reap(pid)();
}

#[test]
fn signal_sent_to_the_frozen_process_reaches_the_copy() {
    let _g = serial();
    let (mut child, out) = start(&["--mem", "2M", "--threads", "1"]);
    running(&out, 1);
    let pid = child.id() as i32;
    let (sum0, _) = checksum(pid, &out);
    let frozen = freeze(pid).expect("freeze");
    // Queued, not delivered: every thread is stopped.
    kill(Pid::from_raw(pid), Signal::SIGUSR1).expect("SIGUSR1");
    let mut img = Vec::new();
    frozen
        .write_image(&mut img, ImageOptions::default())
        .expect("image");
    let d = image::decode_all(&img[..]).expect("decode");
    assert_eq!(
        d.meta
            .process
            .shared_pending
            .iter()
            .map(|s| s.signo())
            .collect::<Vec<_>>(),
        vec![libc::SIGUSR1]
    );
    let (plan, new_out) = plan_to_pipe();
    let r = restore(&img[..], plan).expect("restore");
    frozen.kill();
    child.wait().expect("reap");
    // The copy handles it: a checksum line nobody else asked for.
    match new_out
        .until(T, |l| matches!(l, Line::Checksum { .. }))
        .pop()
    {
        Some(Line::Checksum { sum, .. }) => assert_eq!(sum, sum0),
        other => panic!("{other:?}"),
    }
    kill(Pid::from_raw(r.pid), Signal::SIGKILL).expect("kill");
    reap(r.pid)();
}

/// A memfd on a descriptor and mapped shared moves whole: the mapped part
/// with the pages, the marker outside the mapping as the memfd's own
/// content (the hole past it is not carried), its name, size, seals and
/// the descriptor's offset; the mapping and the descriptor are one memfd
/// again (`mkcounter --memfd` checks all of it inside the copy).
#[test]
fn a_memfd_on_a_descriptor_and_mapped_shared_moves() {
    let _g = serial();
    let (mut child, out) = start(&["--mem", "1M", "--threads", "1", "--memfd", "2M"]);
    running(&out, 1);
    let pid = child.id() as i32;
    let (pid2, out2, meta) = migrate_n(pid, &out, move || drop(child.wait()), 1, 2, true);
    let m = &meta.process.memfds;
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(m[0].name, "mkcounter-memfd");
    assert_eq!(m[0].size, (2 << 20) + 8192);
    assert_eq!(m[0].seals, (libc::F_SEAL_SHRINK | libc::F_SEAL_GROW) as u32);
    assert_eq!(m[0].maps.len(), 1);
    // The page past the mapping that holds the marker, and nothing else.
    let carried: Vec<(u64, usize)> = m[0].data.iter().map(|(o, b)| (*o, b.len())).collect();
    assert_eq!(carried, vec![(2 << 20, 4096)]);
    kill(Pid::from_raw(pid2), Signal::SIGUSR1).expect("SIGUSR1");
    let check = out2
        .until(
            T,
            |l| matches!(l, Line::Check(c) if c.starts_with("memfd_check")),
        )
        .pop();
    assert_eq!(check, Some(Line::Check("memfd_check=ok".into())));
    kill(Pid::from_raw(pid2), Signal::SIGKILL).expect("kill");
    reap(pid2)();
}

/// A memfd holding more than is carried outside its mappings is refused
/// by name before anything is frozen, and one with little in it moves.
#[test]
fn a_memfd_too_full_to_carry_is_refused_before_the_freeze() {
    let _g = serial();
    let (mut child, out) = start(&["--mem", "1M", "--threads", "1", "--memfd-unmapped", "1M"]);
    running(&out, 1);
    let pid = child.id() as i32;
    let msg = check_migratable(pid).expect_err("must refuse").to_string();
    assert!(
        msg.contains(
            "memfd mkcounter-data: holds more than 256 KiB outside the memory the process maps"
        ),
        "{msg}"
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    assert!(status.contains("TracerPid:\t0"), "{status}");
    child.kill().expect("kill");
    child.wait().expect("wait");

    let (mut child, out) = start(&["--mem", "1M", "--threads", "1", "--memfd-unmapped", "100K"]);
    running(&out, 1);
    let pid = child.id() as i32;
    let (pid2, _out2, meta) = migrate_n(pid, &out, move || drop(child.wait()), 1, 2, false);
    let m = &meta.process.memfds;
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(
        (m[0].name.as_str(), m[0].size),
        ("mkcounter-data", 100 << 10)
    );
    assert_eq!(
        m[0].seals,
        libc::F_SEAL_SEAL as u32,
        "made without MFD_ALLOW_SEALING"
    );
    let carried: usize = m[0].data.iter().map(|(_, b)| b.len()).sum();
    assert_eq!(carried, 100 << 10);
    kill(Pid::from_raw(pid2), Signal::SIGKILL).expect("kill");
    reap(pid2)();
}

/// A read-only shared mapping of a file (glibc maps its gconv cache so in
/// a program that loads a UTF-8 locale's character set, here `sleep`) is
/// carried as a copy: the process moves, and the copy has the same bytes
/// at the same address, read-only.
#[test]
fn a_read_only_shared_file_mapping_moves_as_a_copy() {
    let _g = serial();
    common::cloexec_inherited();
    let mut child = std::process::Command::new("sleep")
        .arg("1000")
        .env_remove("LC_ALL")
        .env("LANG", "C.UTF-8")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn sleep");
    let pid = child.id() as i32;
    let maps = |p: i32| std::fs::read_to_string(format!("/proc/{p}/maps")).unwrap_or_default();
    let t0 = std::time::Instant::now();
    let line = loop {
        if let Some(l) = maps(pid)
            .lines()
            .find(|l| l.contains(" r--s ") && l.starts_with(|c: char| c.is_ascii_hexdigit()))
        {
            break l.to_string();
        }
        assert!(t0.elapsed() < T, "sleep maps no file shared: {}", maps(pid));
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let f: Vec<&str> = line.split_whitespace().collect();
    let (range, offset, path) = (f[0], u64::from_str_radix(f[2], 16).expect("offset"), f[5]);
    let (a, b) = range.split_once('-').expect("range");
    let (start, end) = (
        u64::from_str_radix(a, 16).expect("start"),
        u64::from_str_radix(b, 16).expect("end"),
    );
    let frozen = freeze(pid).expect("a read-only shared file mapping is no blocker");
    let mut img = Vec::new();
    frozen
        .write_image(&mut img, ImageOptions::default())
        .expect("write");
    let r = restore(&img[..], StdioPlan::null().expect("null")).expect("restore");
    frozen.kill();
    let _ = child.wait();
    // (A private copy may be merged with a neighbour of the same
    // protection: it is where it was, inside one read-only mapping.)
    let copy = maps(r.pid);
    let mine = copy
        .lines()
        .find(|l| {
            let (x, y) = l
                .split_whitespace()
                .next()
                .and_then(|r| r.split_once('-'))
                .unwrap_or(("0", "0"));
            u64::from_str_radix(x, 16).is_ok_and(|x| x <= start)
                && u64::from_str_radix(y, 16).is_ok_and(|y| y >= end)
        })
        .unwrap_or_else(|| panic!("nothing at {range} in the copy: {copy}"));
    assert!(mine.contains(" r--p "), "{mine}");
    use std::os::unix::fs::FileExt;
    let len = (end - start) as usize;
    let mut want = vec![0u8; len];
    let n = std::fs::File::open(path)
        .expect("the file")
        .read_at(&mut want, offset)
        .expect("read the file");
    let mut got = vec![0u8; len];
    std::fs::File::open(format!("/proc/{}/mem", r.pid))
        .expect("mem")
        .read_exact_at(&mut got, start)
        .expect("read the copy");
    assert!(
        n > 0 && got[..n] == want[..n],
        "the copy's bytes differ from {path}'s"
    );
    let _ = kill(Pid::from_raw(r.pid), Signal::SIGKILL);
    let _ = waitpid(Pid::from_raw(r.pid), None);
}
