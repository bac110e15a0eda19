//! A kernel that falls silent: its QEMU is frozen with SIGSTOP, so it
//! neither crashes nor leaves the window: its agent just stops answering
//! and its heartbeat stops. A move to it fails within seconds, saying so,
//! and the original runs on with no gap; the status shows it failed, with
//! the heartbeat as the reason, and `exec` on it is refused at once. When it
//! wakes up it stays failed; booted again with `mkctl restart`, it takes a
//! move at once: the other guest's agent, which had taken it for lost, sees
//! it back before it says a word.
//!
//! Boots real kernels under QEMU: needs `scripts/setup.sh` (fails, never
//! skips, without it).

use std::time::{Duration, Instant};

use mkctl_e2e::{
    booted, exec_watched, instance_status, migrate_json, no_gap, pid_on, refused_move, Mkctl,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn beta(m: &Mkctl) -> serde_json::Value {
    instance_status(m, "beta")
}

#[test]
fn a_silent_kernel_fails_the_move_to_it_and_takes_one_once_booted_again() {
    let m = booted("silent", "migrate.toml");
    let w = exec_watched(
        &m,
        "alpha",
        &["/bin/mkcounter", "--mem", "8M", "--interval-ms", "20"],
    );
    let pid = pid_on(&m, "alpha");
    let qemu = beta(&m)["pid"].as_u64().unwrap() as i32;
    kill(Pid::from_raw(qemu), Signal::SIGSTOP).expect("SIGSTOP beta's QEMU");

    let t = Instant::now();
    let r = refused_move(&m, pid, "alpha", "beta");
    let took = t.elapsed();
    assert!(
        r.stderr.contains("beta stopped answering") && r.stderr.contains("the original runs on"),
        "{}",
        r.stderr
    );
    // The agent takes a silent peer for lost after the ring's threshold
    // and 3 s more; the daemon fails the instance after 5 s.
    assert!(took < Duration::from_secs(20), "answered after {took:?}");
    assert_eq!(pid_on(&m, "alpha"), pid);
    let seen = w.count("seq=");
    w.wait_for(
        "lines after the failed move",
        Duration::from_secs(30),
        |l| l.iter().filter(|x| x.starts_with("seq=")).count() >= seen + 10,
    );
    no_gap(&w.seqs());

    let deadline = Instant::now() + Duration::from_secs(15);
    let b = loop {
        let b = beta(&m);
        if b["state"] == "failed" || Instant::now() > deadline {
            break b;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(b["state"], "failed", "{b}");
    assert!(
        b["reason"].as_str().unwrap().contains("heartbeat stopped"),
        "{b}"
    );
    let t = Instant::now();
    let r = m.run(&["exec", "beta", "--", "true"]);
    assert_eq!(r.code, 1, "{}", r.text());
    assert!(r.stderr.contains("has failed"), "{}", r.stderr);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    // The kernel wakes up (a stall that ended), too late: it stays failed,
    // and is booted again. The new kernel takes the move at once.
    kill(Pid::from_raw(qemu), Signal::SIGCONT).expect("SIGCONT beta's QEMU");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(beta(&m)["state"], "failed");
    m.run(&["restart", "beta"]).ok();
    assert_eq!(beta(&m)["state"], "ready");
    assert_ne!(beta(&m)["pid"].as_u64().unwrap() as i32, qemu);
    let moved = migrate_json(&m, pid, "alpha", "beta", "stop-copy");
    let new_pid = moved["new_pid"].as_u64().unwrap() as u32;
    assert_eq!(pid_on(&m, "beta"), new_pid);
    let seen = w.count("seq=");
    w.wait_for("lines after the move", Duration::from_secs(30), |l| {
        l.iter().filter(|x| x.starts_with("seq=")).count() >= seen + 10
    });
    no_gap(&w.seqs());
    m.run(&["stop", "--all"]).ok();
}
