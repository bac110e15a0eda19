//! Migration between agents on the host kernel (lazy and stop-copy hops): three agents (a client as
//! endpoint 0, origin and destination) linked by a real shared-memory
//! window in /dev/shm, the same protocol the kernels use. A multithreaded
//! `mkcounter` started with exec on one agent moves there and back and
//! there again; its output keeps flowing into the original exec stream
//! with no gap and no repeat, its memory checksum is unchanged, and its
//! final exit status comes back through the hops. A destination that goes
//! away mid-transfer leaves the original running. A process tree (mktree)
//! moves there and back with `tree`.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::agents::{move_out, move_tree, net, start_argv, tail, ExecStream, Net};
use common::no_gap;
use mknode::wire::{ExitStatus, Msg};

/// Starts mkcounter on agent `on` (`mem` resident) with its output
/// flowing; returns its pid.
fn start(n: &Net, on: u16, mem: &str) -> (u32, ExecStream) {
    let (pid, mut s) = common::agents::start(n, on, &["--mem", mem, "--interval-ms", "5"]);
    s.until(Duration::from_secs(10), |t| t.matches("seq=").count() >= 5);
    (pid, s)
}

fn usr1(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .unwrap();
}

/// True once `pid` is gone altogether (exited and reaped), within 5 s.
fn reaped(pid: u32) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// True once `pid` has exited (gone or a zombie), within 5 s.
fn gone(pid: u32) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.is_empty() || stat.contains(") Z") || stat.contains(") X") {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Moves `pid` from agent `at` to the other one (1 <-> 2) and checks the
/// move: the original gone and reaped, the copy printing on, its memory
/// checksum `before`. Returns the new pid and the bytes the move carried.
fn hop_and_check(
    n: &Net,
    out: &mut ExecStream,
    (at, pid): (u16, u32),
    lazy: bool,
    before: &str,
    hop: usize,
) -> (u32, u64) {
    let to = 3 - at;
    let r = move_out(n, (at, pid), to, lazy, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("hop {hop}: {e}"));
    let Msg::MigrateReport {
        new_pid,
        downtime_ns,
        image_bytes,
        ..
    } = r
    else {
        panic!("{r:?}")
    };
    eprintln!(
        "hop {hop}: {at} -> {to}, pid {pid} -> {new_pid}, downtime {:.1} ms, {} KiB moved",
        downtime_ns as f64 / 1e6,
        image_bytes >> 10
    );
    assert!(gone(pid), "hop {hop}: the original {pid} still runs");
    // Reaped by its exec on the origin, not left a zombie while the copy's
    // output goes on.
    assert!(reaped(pid), "hop {hop}: the original {pid} was not reaped");
    // Moving the old pid again, at once, is refused in words.
    let again = move_out(n, (at, pid), to, lazy, Duration::from_secs(30));
    let Err(e) = again else {
        panic!("hop {hop}: a second move of {pid}: {again:?}")
    };
    assert!(
        e.to_string()
            .contains(&format!("there is no process {pid} on this kernel")),
        "hop {hop}: {e}"
    );
    let seen = out.seqs().len();
    out.until(Duration::from_secs(10), |t| {
        t.matches("seq=").count() >= seen + 20
    });
    assert!(
        out.exited.is_none(),
        "hop {hop}: the copy ended:\n{}",
        tail(&out.text)
    );
    usr1(new_pid);
    let k = out.checksums().len();
    out.until(Duration::from_secs(10), |t| {
        t.matches("checksum=").count() > k
    });
    assert_eq!(out.checksums()[k], before, "memory changed at hop {hop}");
    (new_pid, image_bytes)
}

#[test]
fn there_and_back_and_there_again() {
    let n = net();
    let (pid, mut out) = start(&n, 1, "16M");
    usr1(pid);
    out.until(Duration::from_secs(10), |t| t.contains("checksum="));
    let before = out.checksums()[0].clone();

    let mut cur = pid;
    let mut at = 1u16;
    let mut bytes = Vec::new();
    for hop in 0..3 {
        // 1 -> 2 -> 1 -> 2: lazy, stop-copy, lazy.
        let b;
        (cur, b) = hop_and_check(&n, &mut out, (at, cur), hop % 2 == 0, &before, hop);
        bytes.push(b);
        at = 3 - at;
    }
    // A lazy move carries what a stop-copy one does: zero pages pushed as
    // a count, not as 4096 bytes each (they were a third more here).
    let (lazy, stop_copy) = (bytes[0], bytes[1]);
    assert!(
        lazy <= stop_copy + stop_copy / 20 + (64 << 10),
        "lazy {lazy} bytes, stop-copy {stop_copy}"
    );
    no_gap(&out.seqs());
    // The end of the process comes back to the exec, from where it runs.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(cur as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    out.until(Duration::from_secs(20), |_| false);
    assert_eq!(
        out.exited,
        Some(ExitStatus::Signal(15)),
        "{}",
        tail(&out.text)
    );
    no_gap(&out.seqs());
}

#[test]
fn destination_gone_mid_transfer_leaves_the_original_running() {
    let mut n = net();
    let (pid, mut out) = start(&n, 1, "64M");
    usr1(pid);
    out.until(Duration::from_secs(10), |t| t.contains("checksum="));
    let before = out.checksums()[0].clone();
    // Agent 2 goes away while the image streams to it.
    let b = Arc::clone(&n.agents[2]);
    let ep = n.endpoints[2].take();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(30));
        for p in [0, 1] {
            b.remove_link(p);
        }
        drop(ep);
    });
    let r = move_out(&n, (1, pid), 2, false, Duration::from_secs(120));
    killer.join().unwrap();
    let err = r.expect_err("the move must fail").to_string();
    assert!(err.contains("the original runs on"), "{err}");
    // Same process, still printing, same memory.
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    let seen = out.seqs().len();
    out.until(Duration::from_secs(10), |t| {
        t.matches("seq=").count() >= seen + 20
    });
    usr1(pid);
    out.until(Duration::from_secs(10), |t| {
        t.matches("checksum=").count() >= 2
    });
    assert_eq!(out.checksums()[1], before);
    no_gap(&out.seqs());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

/// A process moved to a kernel that then goes down (its endpoint detaches,
/// its agent stops answering, the copy dies with it): the exec that started
/// it on the origin ends with why, instead of waiting for an exit status
/// that will never come.
#[test]
fn a_process_lost_with_its_kernel_ends_its_exec() {
    let n = net();
    let (pid, mut out) = start(&n, 1, "4M");
    let r = move_out(&n, (1, pid), 2, false, Duration::from_secs(60)).expect("move to 2");
    let Msg::MigrateReport { new_pid, .. } = r else {
        panic!("{r:?}")
    };
    let seen = out.seqs().len();
    out.until(Duration::from_secs(10), |t| {
        t.matches("seq=").count() >= seen + 5
    });
    // Kernel 2 goes down as a killed QEMU does: its agent stops answering,
    // its heartbeat stops, and the copy goes with it.
    for p in [0, 1] {
        n.agents[2].remove_link(p);
    }
    n.silenced[2].store(true, std::sync::atomic::Ordering::Relaxed);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(new_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let t0 = std::time::Instant::now();
    out.until(Duration::from_secs(20), |_| false);
    let why = out.failed.clone().unwrap_or_else(|| {
        panic!(
            "the exec ended with {:?}, not as lost:\n{}",
            out.exited,
            tail(&out.text)
        )
    });
    assert!(
        why.contains("the process was lost: endpoint 2 stopped answering (no heartbeat"),
        "{why}"
    );
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
}

/// A lazy copy that reads all of its memory while the rest is pushed: its
/// faults race the pushes, and a fetch can still be on its way when the
/// last page has gone out. The origin must answer it (not drop the move
/// and let the copy be killed for a "missing" page).
#[test]
fn lazy_copy_reading_all_its_memory_survives_the_last_pushes() {
    let n = net();
    let (pid, mut out) =
        common::agents::start(&n, 1, &["--mem", "32M", "--interval-ms", "5", "--scan"]);
    usr1(pid);
    out.until(Duration::from_secs(10), |t| t.contains("checksum="));
    let before = out.checksums()[0].clone();
    let mut cur = pid;
    let mut at = 1u16;
    for hop in 0..4 {
        cur = hop_and_check(&n, &mut out, (at, cur), true, &before, hop).0;
        at = 3 - at;
    }
    no_gap(&out.seqs());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(cur as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

/// A destination that says it runs another kernel build is not refused
/// for that (the restore redirects the vDSO where it must; these agents
/// share one kernel, so here it need not): the process moves and goes on.
#[test]
fn destination_on_another_kernel_build_is_moved_to() {
    let n = common::agents::net_where(|| {
        let mut k = mknode::agent::kernel_info();
        k.release = "0.0.0-another-build".into();
        k
    });
    let (pid, mut out) = start(&n, 1, "1M");
    common::agents::move_and_end(&n, (1, pid), 2, true, &mut out);
}

/// The preflight names what of the origin's CPU the destination lacks: an
/// extension it does not have, and another size of register state.
#[test]
fn the_restore_probe_names_what_the_cpu_lacks() {
    use mknode::migrate::cpu;
    let n = net();
    let (absent, theirs) = common::wider_than_this_cpu();
    let r = n.agents[0]
        .call(2, Duration::from_secs(10), |req| Msg::RestoreProbe {
            req,
            paths: vec![],
            devices: vec![],
            cpu: theirs,
            fp_size: cpu::fp_state_size() + 64,
            xfeatures: cpu::xfeatures() | 0xe0,
        })
        .expect("probe");
    let Msg::RestoreProbed { problems, .. } = r else {
        panic!("{r:?}")
    };
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(
        problems[0].contains(&format!(
            "lacks {absent}, which the program picked its code for"
        )),
        "{problems:?}"
    );
    assert!(problems[1].contains("register state"), "{problems:?}");
    // The same CPU: nothing.
    let r = n.agents[0]
        .call(2, Duration::from_secs(10), |req| Msg::RestoreProbe {
            req,
            paths: vec![],
            devices: vec![],
            cpu: cpu::user_features(),
            fp_size: cpu::fp_state_size(),
            xfeatures: cpu::xfeatures(),
        })
        .expect("probe");
    assert!(
        matches!(r, Msg::RestoreProbed { ref problems, .. } if problems.is_empty()),
        "{r:?}"
    );
}

/// A process whose code was picked for an extension the destination lacks
/// (remembered so here, as after a restore from such an image) is refused
/// by name before anything is frozen, and runs on; the move the user
/// vouches for (`any_cpu`) asks for no extension and goes, and the copy
/// then counts as picked for the CPU it runs on.
#[test]
fn a_move_vouched_for_asks_the_destination_for_no_extension() {
    use mknode::migrate::cpu;
    let n = net();
    let (pid, mut out) = start(&n, 1, "1M");
    let here = cpu::user_features();
    let (absent, wider) = common::wider_than_this_cpu();
    cpu::remember(pid as i32, &wider);
    let e = move_out(&n, (1, pid), 2, true, Duration::from_secs(30))
        .expect_err("refused")
        .to_string();
    assert!(
        e.contains(&format!("this CPU lacks {absent}")) && e.contains("nothing was frozen"),
        "{e}"
    );
    let seen = out.seqs().len();
    out.until(Duration::from_secs(10), |t| {
        t.matches("seq=").count() >= seen + 10
    });
    let r = n.agents[0]
        .call(1, Duration::from_secs(60), |req| Msg::MigrateOut {
            req,
            pid,
            to: 2,
            lazy: true,
            any_cpu: true,
        })
        .expect("the vouched move");
    let Msg::MigrateReport { new_pid, .. } = r else {
        panic!("{r:?}")
    };
    let seen = out.seqs().len();
    out.until(Duration::from_secs(10), |t| {
        t.matches("seq=").count() >= seen + 10
    });
    no_gap(&out.seqs());
    assert_eq!(cpu::picked(new_pid as i32), here);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(new_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

/// The `n=` of each line of `who` (`top` or `kid`) in `text`, in order.
fn counts(text: &str, who: &str) -> Vec<u64> {
    text.lines()
        .filter(|l| l.starts_with(who))
        .filter_map(|l| common::field(l, "n"))
        .map(|n| n as u64)
        .collect()
}

/// A process tree (`MigrateOut` with `tree`): mktree, started with exec on
/// agent 1, moves 1 -> 2 -> 1. Its lines flow on into the exec stream with
/// no gap in either process's count; every pid it knows itself by stays
/// (the copy's, here, is another: a pid namespace of its own); the top's
/// end (through the tree's holder) comes back to the exec.
#[test]
fn a_tree_moves_there_and_back_with_its_pids_and_its_end() {
    tree_there_and_back(false);
}

/// The same, lazily: every process of the tree runs on the destination
/// before its pages have all come (a page server and a pager each), and
/// the report counts pages pushed after the copy ran.
#[test]
fn a_tree_moves_lazily_there_and_back_with_its_pids_and_its_end() {
    tree_there_and_back(true);
}

fn tree_there_and_back(lazy: bool) {
    let n = net();
    let argv = vec![
        common::testprog("mktree").display().to_string(),
        "--interval-ms".into(),
        "10".into(),
    ];
    let (pid, mut out) = start_argv(&n, 1, argv, |t| t.matches("kid n=").count() >= 3);
    let first = out
        .text
        .lines()
        .find(|l| l.starts_with("top "))
        .expect("a top line")
        .to_string();
    let get = |l: &str, k: &str| common::field(l, k).unwrap_or_else(|| panic!("{k} in {l}"));
    let (top, kid) = (get(&first, "pid"), get(&first, "kid"));
    assert_eq!(top, i64::from(pid));
    let (mut cur, mut at) = (pid, 1u16);
    for _ in 0..2 {
        let to = 3 - at;
        let seen = out.text.len();
        let r = move_tree(&n, (at, cur), (to, lazy), Duration::from_secs(60)).expect("moved");
        let Msg::MigrateReport {
            new_pid,
            image_bytes,
            pages,
            ..
        } = r
        else {
            panic!("{r:?}")
        };
        // Lazily, most pages go after the image; either way all of them.
        assert!(pages > 100, "{r:?}");
        if lazy {
            assert!(image_bytes > pages / 2 * 4096, "{r:?}");
        }
        assert_ne!(new_pid, cur, "the copy runs beside the original here");
        let status = std::fs::read_to_string(format!("/proc/{new_pid}/status")).expect("status");
        assert!(
            status
                .lines()
                .any(|l| l.starts_with("NSpid:") && l.ends_with(&format!("\t{top}"))),
            "the copy is {top} in its namespace: {status}"
        );
        out.until(Duration::from_secs(20), |t| {
            t[seen..].matches("kid n=").count() >= 3 && t[seen..].matches("top n=").count() >= 3
        });
        for l in out.text[seen..].lines() {
            if l.starts_with("top ") {
                assert_eq!((get(l, "pid"), get(l, "kid")), (top, kid), "{l}");
            } else if l.starts_with("kid ") {
                assert_eq!((get(l, "pid"), get(l, "ppid")), (kid, top), "{l}");
            }
        }
        (cur, at) = (new_pid, to);
    }
    for who in ["top ", "kid "] {
        let c = counts(&out.text, who);
        for w in c.windows(2) {
            assert_eq!(w[1], w[0] + 1, "{who}lines: {c:?}");
        }
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(cur as i32),
        nix::sys::signal::Signal::SIGUSR2,
    )
    .expect("SIGUSR2");
    out.until(Duration::from_secs(20), |_| false);
    assert!(
        out.text.contains(&format!("ended pid={kid} signal=15")),
        "{}",
        tail(&out.text)
    );
    assert_eq!(out.exited, Some(ExitStatus::Code(3)), "{}", tail(&out.text));
}
