//! A move whose freeze fails, on host-kernel agents: the destination heard
//! of the move before the freeze and forked its stub meanwhile; the abort
//! must take the stub away. A test binary of its own: it counts this
//! process's children, which other tests running alongside would change.

mod common;

use std::time::{Duration, Instant};

use common::agents::{move_out, net};

/// The children of this process (the agents' restores fork their stubs
/// here), from every thread.
fn children() -> Vec<u32> {
    let mut v = Vec::new();
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let c = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        v.extend(c.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
    }
    v.sort_unstable();
    v
}

/// The destination hears of a move before the freeze and forks its stub
/// meanwhile: a freeze that then fails (here: someone else traces the
/// process) aborts it there, and the stub goes; the original runs on and
/// moves once it can.
#[test]
fn a_move_whose_freeze_fails_leaves_no_stub_on_the_destination() {
    let n = net();
    let (pid, mut out) = common::agents::start(&n, 1, &["--mem", "4M", "--interval-ms", "5"]);
    out.until(Duration::from_secs(10), |t| t.matches("seq=").count() >= 5);
    let before = children();
    assert!(before.contains(&pid), "{before:?}");
    let target = nix::unistd::Pid::from_raw(pid as i32);
    nix::sys::ptrace::seize(target, nix::sys::ptrace::Options::empty()).unwrap();
    for lazy in [true, false] {
        let err = move_out(&n, (1, pid), 2, lazy, Duration::from_secs(30))
            .expect_err("a traced process cannot be frozen")
            .to_string();
        assert!(err.contains("traced"), "{err}");
    }
    let t = Instant::now();
    while children() != before {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "left behind: {:?} (before: {before:?})",
            children()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Detached from a stop only.
    nix::sys::ptrace::interrupt(target).unwrap();
    nix::sys::wait::waitpid(target, Some(nix::sys::wait::WaitPidFlag::__WALL)).unwrap();
    nix::sys::ptrace::detach(target, None).unwrap();
    let seen = out.seqs().len();
    out.until(Duration::from_secs(10), |t| {
        t.matches("seq=").count() >= seen + 10
    });
    common::agents::move_and_end(&n, (1, pid), 2, true, &mut out);
}
